//! Metrics, health endpoints and graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use weir_client::weir_proto::v1::IsolationLevel;

#[tokio::test]
async fn metrics_count_calls_rows_and_rejections() {
    let toml = tenant("obs", "requests_per_second = 1\nburst = 4", &sqlite_demo("obs", "shop"));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-obs").await;
    client.list_sources().await.expect("list");
    let r = client
        .execute("shop", "SELECT * FROM products LIMIT 7", vec![])
        .await
        .expect("query");
    assert_eq!(r.rows.len(), 7);
    client.execute("shop", "SELEC", vec![]).await.expect_err("bad sql");
    client.list_sources().await.expect("last token");
    let err = client.list_sources().await.expect_err("rate limited");
    assert_eq!(err.code(), Code::ResourceExhausted);

    let (status, text) = http_get(&server.metrics_url, "/metrics").await;
    assert_eq!(status, 200);
    let calls = |method: &str, code: &str| {
        sample(
            &text,
            "weir_calls_total",
            &[("tenant", "obs"), ("method", method), ("code", code)],
        )
    };
    assert_eq!(calls("/weir.v1.SchemaService/ListSources", "Ok"), 2.0, "{text}");
    assert_eq!(calls("/weir.v1.QueryService/Execute", "Ok"), 1.0);
    assert_eq!(calls("/weir.v1.QueryService/Execute", "InvalidArgument"), 1.0);
    assert_eq!(calls("/weir.v1.SchemaService/ListSources", "ResourceExhausted"), 1.0);
    assert_eq!(
        sample(&text, "weir_rows_total", &[("tenant", "obs"), ("source", "shop")]),
        7.0
    );
    assert!(sample(&text, "weir_bytes_total", &[("tenant", "obs"), ("source", "shop")]) > 0.0);
    assert_eq!(
        sample(
            &text,
            "weir_limiter_rejections_total",
            &[("tenant", "obs"), ("limit", "rate")]
        ),
        1.0
    );
    assert!(sample(&text, "weir_call_duration_seconds_count", &[("tenant", "obs")]) >= 4.0);

    let (status, _) = http_get(&server.metrics_url, "/healthz").await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = http_get(&server.metrics_url, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, text) = http_get(&server.metrics_url, "/metrics").await;
    assert_eq!(
        sample(&text, "weir_source_up", &[("tenant", "obs"), ("source", "shop")]),
        1.0
    );
    assert!(
        text.contains("weir_pool_connections{tenant=\"obs\",source=\"shop\",state=\"idle\"}"),
        "{text}"
    );
    server.stop().await;
}

/// A stream its client leaves counts the rows and bytes it sent (they were
/// counted only when a stream ended complete).
#[tokio::test]
async fn a_stream_cut_short_counts_what_it_sent() {
    // A tenant of its own: the metrics are the process's, shared by its tests.
    let server = TestServer::start(&tenant("cut", "", &sqlite_demo("cut", "shop"))).await;
    let client = server.client("key-cut").await;
    let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c";
    let mut stream = client.execute_stream("shop", endless, vec![]).await.expect("stream");
    for _ in 0..3 {
        stream.next_batch().await.expect("a batch").expect("more rows");
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = http_get(&server.metrics_url, "/metrics").await;
        if sample(&text, "weir_rows_total", &[("tenant", "cut"), ("source", "shop")]) > 0.0 {
            assert!(sample(&text, "weir_bytes_total", &[("tenant", "cut"), ("source", "shop")]) > 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut stream's rows are not counted: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_streams_and_rolls_back_transactions() {
    pg_direct()
        .await
        .batch_execute("CREATE TABLE IF NOT EXISTS weir_shutdown (note text)")
        .await
        .expect("setup");
    let mut toml = tenant("bye", "", &postgres("bye", "pg", ""));
    toml.push_str("[server]\nshutdown_grace = \"1s\"\n");
    let server = TestServer::start(&toml).await;
    let client = server.client("key-bye").await;
    let marker = format!("shutdown-{}", std::process::id());
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(
            &tx,
            "pg",
            "INSERT INTO weir_shutdown VALUES ($1)",
            vec![marker.as_str().into()],
        )
        .await
        .expect("insert in tx");
    let mut stream = client
        .execute_stream(
            "pg",
            "SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g",
            vec![],
        )
        .await
        .expect("stream");
    stream.next_batch().await.expect("first batch");
    // A unary statement that outlasts the grace period is cut too, and its
    // statement cancelled, instead of running on after the process exits.
    let unary = {
        let client = client.clone();
        tokio::spawn(async move { client.execute("pg", "SELECT pg_sleep(20) AS unary", vec![]).await })
    };
    let pg = pg_direct().await;
    assert!(
        wait_until_running(&pg, "pg_sleep(20) AS unary", Duration::from_secs(5)).await,
        "the unary statement reached PostgreSQL"
    );

    let started = Instant::now();
    let metrics_url = server.metrics_url.clone();
    let stopping = tokio::spawn(server.stop());
    // While calls drain, the metrics port still answers: not ready, and
    // the counters can be scraped one last time.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, _) = http_get(&metrics_url, "/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said 503 while draining: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, text) = http_get(&metrics_url, "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("weir_calls_total"), "{text}");
    // The stream ends (cut after the grace period) instead of hanging.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next_batch().await {
                Ok(Some(_)) => continue,
                other => break other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stream ended");
    assert!(ended.is_err(), "a cut stream reports an error, not a clean end");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("server stopped")
        .expect("clean stop");
    assert!(started.elapsed() < Duration::from_secs(8));

    let pg = pg_direct().await;
    let kept: i64 = pg
        .query_one("SELECT count(*) FROM weir_shutdown WHERE note = $1", &[&marker])
        .await
        .expect("count")
        .get(0);
    assert_eq!(kept, 0, "the open transaction was rolled back");
    assert!(wait_until_gone(&pg, "generate_series(1, 100000)", Duration::from_secs(5)).await);
    let cut = unary.await.expect("task").expect_err("cut at shutdown");
    assert_eq!(cut.code(), tonic::Code::Unavailable, "{cut:?}");
    assert_eq!(reason(&cut), "SHUTTING_DOWN");
    assert!(wait_until_gone(&pg, "pg_sleep(20) AS unary", Duration::from_secs(5)).await);
}

/// With `shutdown_delay`, health says NOT_SERVING at the signal while new
/// connections and calls are still taken until the delay is over, so that
/// a load balancer that polls health stops sending before the port closes.
#[tokio::test]
async fn shutdown_delay_keeps_taking_calls_while_health_says_not_serving() {
    let mut toml = tenant("late", "", &sqlite_demo("late", "db"));
    toml.push_str("[server]\nshutdown_delay = \"2s\"\n");
    let server = TestServer::start(&toml).await;
    let (addr, metrics_url) = (server.addr.clone(), server.metrics_url.clone());
    let started = Instant::now();
    let stopping = tokio::spawn(server.stop());
    let deadline = Instant::now() + Duration::from_secs(1);
    while http_get(&metrics_url, "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never said 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new connection, as a load balancer that has not yet noticed makes.
    let late = weir_client::WeirClient::connect(&addr, "key-late")
        .await
        .expect("the port is still open");
    late.execute("db", "SELECT 1", vec![])
        .await
        .expect("a call during the delay is served");
    assert!(started.elapsed() < Duration::from_secs(2), "checked within the delay");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("server stopped")
        .expect("clean stop");
    assert!(started.elapsed() >= Duration::from_secs(2), "the delay was waited out");
}

/// A scraper that never finishes its request does not hold up shutdown: the
/// metrics port's graceful close is bounded.
#[tokio::test]
async fn a_half_sent_scrape_does_not_hold_up_shutdown() {
    use tokio::io::AsyncWriteExt;
    let mut toml = tenant("half", "", &sqlite_demo("half", "db"));
    toml.push_str("[server]\nshutdown_grace = \"1s\"\n");
    let server = TestServer::start(&toml).await;
    let address = server.metrics_url.trim_start_matches("http://").to_string();
    let mut scraper = tokio::net::TcpStream::connect(&address).await.expect("connect");
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a request");
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("the server stops although a scrape never ended");
    drop(scraper);
}

/// `server.worker_threads` sets how many threads the process's runtime
/// serves calls with (its start line says); 0, the default, is one per CPU
/// the process may use.
#[test]
fn the_runtime_has_the_configured_worker_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (threads, expected) in [(3, 3), (1, 1), (0, cpus)] {
        let config = format!(
            "[server]\nworker_threads = {threads}\n{}",
            tenant("t", "", &sqlite_demo("t", "db"))
        );
        std::fs::write(&path, config).expect("config");
        let weir = WeirProcess::start(&["--config", path.to_str().expect("utf-8 path")]);
        assert_eq!(
            weir.started["worker_threads"], expected,
            "worker_threads = {threads}: {}",
            weir.started
        );
    }
}

/// In the real process, a unary statement cut at shutdown is cancelled in
/// PostgreSQL before the process exits: the cancel runs on the process's
/// runtime, which is gone afterwards.
#[tokio::test]
async fn the_process_cancels_a_cut_statement_before_it_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("weir.toml");
    let config = format!(
        "[server]\nshutdown_grace = \"1s\"\n{}",
        tenant("exit", "", &postgres("exit", "pg", ""))
    );
    std::fs::write(&path, config).expect("config");
    let weir = WeirProcess::start(&["--config", path.to_str().expect("utf-8 path")]);
    let client = weir_client::WeirClient::connect(&weir.addr, "key-exit")
        .await
        .expect("connect");
    let call = tokio::spawn(async move { client.execute("pg", "SELECT pg_sleep(30) AS cut_at_exit", vec![]).await });
    let pg = pg_direct().await;
    assert!(
        wait_until_running(&pg, "cut_at_exit", Duration::from_secs(5)).await,
        "the statement reached PostgreSQL"
    );
    tokio::task::spawn_blocking(move || weir.stop())
        .await
        .expect("weir stopped");
    // At once: the process waited for the cancel before it exited.
    assert!(
        wait_until_gone(&pg, "cut_at_exit", Duration::from_secs(3)).await,
        "the statement runs on after the process exited"
    );
    let cut = call.await.expect("task").expect_err("cut");
    assert_eq!(cut.code(), tonic::Code::Unavailable, "{cut:?}");
}

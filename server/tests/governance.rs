//! Gateway-wide admission through the real server in front of PostgreSQL:
//! when every slot is taken, waiting calls go by priority (up to each
//! tenant's maximum) and tenants share by weight; a call that waits too long
//! gets RESOURCE_EXHAUSTED with a retry delay. Also the per-tenant caps on
//! result streams and open transactions.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_get, postgres, reason, sample, tenant, TestServer};
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

fn server_section(slots: u32, wait: &str) -> String {
    format!("[server]\nmax_concurrent_requests = {slots}\nmax_queue_wait = \"{wait}\"\n")
}

/// Generous per-tenant limits, so that only the gateway's slots decide.
const OPEN: &str = "requests_per_second = 10000\nburst = 10000\nmax_concurrent_requests = 64\n";

async fn execute(client: &WeirClient, sql: &str, priority: pb::Priority) -> Result<pb::ExecuteResponse, tonic::Status> {
    let request = pb::ExecuteRequest {
        source: "pg".into(),
        sql: sql.into(),
        options: Some(pb::RequestOptions {
            priority: priority as i32,
            tag: String::new(),
        }),
        ..Default::default()
    };
    Ok(client.query().execute(request).await?.into_inner())
}

/// Waits until the gateway has `n` calls of `SELECT pg_sleep(0.6) AS <marker>`
/// running in PostgreSQL's view (the marker keeps tests that run at the same
/// time from counting each other's).
async fn wait_for_sleepers(marker: &str, n: i64) {
    let pg = common::pg_direct().await;
    let pattern = format!("%pg_sleep(0.6) AS {marker}%");
    for _ in 0..100 {
        let running: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' AND query LIKE $1 AND state = 'active'",
                &[&pattern],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the holding call did not start");
}

#[tokio::test]
async fn waiting_calls_go_by_priority_up_to_the_tenants_maximum() {
    let config = format!(
        "{}{}{}",
        server_section(1, "20s"),
        tenant("a", &format!("{OPEN}max_priority = \"high\""), &postgres("a", "pg", "")),
        tenant("b", OPEN, &postgres("b", "pg", ""))
    );
    let server = TestServer::start(&config).await;
    let a = server.client("key-a").await;
    let b = server.client("key-b").await;
    let holder = {
        let a = a.clone();
        tokio::spawn(async move { execute(&a, "SELECT pg_sleep(0.6) AS by_priority", pb::Priority::Medium).await })
    };
    wait_for_sleepers("by_priority", 1).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut calls = Vec::new();
    // In arrival order: a's low calls, b asking for high (lowered to its
    // maximum, medium), then a's high calls.
    let queue = [
        ("a-low", pb::Priority::Low),
        ("a-low", pb::Priority::Low),
        ("b-high-as-medium", pb::Priority::High),
        ("a-high", pb::Priority::High),
        ("a-high", pb::Priority::High),
    ];
    for (label, priority) in queue {
        let client = if label.starts_with('b') { b.clone() } else { a.clone() };
        let tx = tx.clone();
        calls.push(tokio::spawn(async move {
            let r = execute(&client, "SELECT 1", priority).await.expect("admitted");
            let _ = tx.send((label, r.stats.and_then(|s| s.queued)));
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    drop(tx);
    holder.await.expect("task").expect("holder");
    let mut order = Vec::new();
    while let Some((label, queued)) = rx.recv().await {
        let queued = queued.expect("stats.queued");
        assert!(queued.seconds > 0 || queued.nanos > 0, "{label} waited, and says so");
        order.push(label);
    }
    assert_eq!(
        order,
        vec!["a-high", "a-high", "b-high-as-medium", "a-low", "a-low"],
        "completion order"
    );
    server.stop().await;
}

/// A statement that waited for a gateway slot while its transaction was
/// rolled back does not run afterwards on the session, where it would
/// have autocommitted.
#[tokio::test]
async fn a_statement_queued_past_its_transactions_end_does_not_run() {
    common::pg_direct()
        .await
        .batch_execute("DROP TABLE IF EXISTS weir_gov_queued; CREATE TABLE weir_gov_queued (id int)")
        .await
        .expect("table");
    let config = format!(
        "{}{}",
        server_section(1, "5s"),
        tenant(
            "a",
            OPEN,
            &(postgres("a", "pg", "") + &common::sqlite_demo("a", "lite"))
        )
    );
    let server = TestServer::start(&config).await;
    let a = server.client("key-a").await;
    a.execute("lite", "CREATE TABLE weir_gov_queued (id int)", vec![])
        .await
        .expect("sqlite table");
    for source in ["pg", "lite"] {
        let tx = a
            .begin(source, pb::IsolationLevel::Unspecified, false)
            .await
            .expect("begin");
        // The one gateway slot, held.
        let holder = {
            let a = a.clone();
            tokio::spawn(async move { execute(&a, "SELECT pg_sleep(0.6) AS past_its_end", pb::Priority::Medium).await })
        };
        wait_for_sleepers("past_its_end", 1).await;
        let queued = {
            let (a, tx) = (a.clone(), tx.clone());
            tokio::spawn(async move {
                a.execute_in(&tx, source, "INSERT INTO weir_gov_queued VALUES (1)", vec![])
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.rollback(&tx).await.expect("rollback, which takes no gateway slot");
        holder.await.expect("task").expect("holder");
        let err = queued
            .await
            .expect("task")
            .expect_err("the transaction ended while it waited");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::NotFound, "TRANSACTION_NOT_FOUND"),
            "{source}: {}",
            err.message()
        );
        let rows = a
            .execute(source, "SELECT count(*) FROM weir_gov_queued", vec![])
            .await
            .expect("count");
        assert_eq!(
            common::int(&rows.rows[0].values[0]),
            0,
            "{source}: nothing ran outside the transaction"
        );
    }
    server.stop().await;
}

type Holder = tokio::task::JoinHandle<Result<pb::ExecuteResponse, tonic::Status>>;

/// A server with one gateway slot (calls wait `max_queue_wait` for it) and
/// tenant `a`'s client, the slot held by a call sleeping 0.6 s as `marker`.
async fn one_slot_held(max_queue_wait: &str, marker: &str) -> (TestServer, WeirClient, Holder) {
    one_slot_held_by("a", max_queue_wait, marker).await
}

/// The same for tenant `name`: the metrics are the process's, shared by the
/// tests that run in it, so a test that counts a tenant's calls has its own.
async fn one_slot_held_by(name: &str, max_queue_wait: &str, marker: &str) -> (TestServer, WeirClient, Holder) {
    let config = format!(
        "{}{}",
        server_section(1, max_queue_wait),
        tenant(name, OPEN, &postgres(name, "pg", ""))
    );
    let server = TestServer::start(&config).await;
    let a = server.client(&format!("key-{name}")).await;
    let holder = {
        let (a, sql) = (a.clone(), format!("SELECT pg_sleep(0.6) AS {marker}"));
        tokio::spawn(async move { execute(&a, &sql, pb::Priority::Medium).await })
    };
    wait_for_sleepers(marker, 1).await;
    (server, a, holder)
}

#[tokio::test]
async fn a_call_that_waits_too_long_is_refused_with_a_retry_delay() {
    // A tenant of its own: the test counts its rejections.
    let (server, a, holder) = one_slot_held_by("waits", "200ms", "waits_too_long").await;
    // A call that cannot run is refused for what it is, at once, not queued.
    let started = Instant::now();
    let err = a
        .execute("nowhere", "SELECT 1", vec![])
        .await
        .expect_err("unknown source");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let err = execute(&a, "SELECT 1", pb::Priority::Medium)
        .await
        .expect_err("no slot within max_queue_wait");
    assert!(started.elapsed() >= Duration::from_millis(190));
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "GATEWAY_SATURATED");
    {
        use tonic_types::StatusExt;
        let retry = err.get_error_details().retry_info().and_then(|r| r.retry_delay);
        assert!(retry.is_some_and(|d| d > Duration::ZERO), "{err:?}");
    }
    holder.await.expect("task").expect("holder");
    // The slot is free again.
    execute(&a, "SELECT 1", pb::Priority::Low).await.expect("free slot");
    let (_, metrics) = common::http_get(&server.metrics_url, "/metrics").await;
    assert!(
        metrics.contains("weir_limiter_rejections_total{tenant=\"waits\",limit=\"gateway_queue\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

/// A deadline that comes before `max_queue_wait` ends the wait for a slot
/// with the gateway's own answer, before the transport's timer would cut
/// the call with a bare CANCELLED that no metric counted.
#[tokio::test]
async fn a_deadline_that_ends_a_wait_for_a_slot_is_answered_and_counted() {
    let (server, a, holder) = one_slot_held_by("queued", "5s", "deadline_in_queue").await;
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "pg".into(),
        sql: "SELECT 1".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(400));
    let started = Instant::now();
    let err = a.query().execute(request).await.expect_err("no slot in time");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::DeadlineExceeded, "QUEUED_PAST_DEADLINE"),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    holder.await.expect("task").expect("holder");
    let (_, metrics) = common::http_get(&server.metrics_url, "/metrics").await;
    assert!(
        metrics.contains("weir_limiter_rejections_total{tenant=\"queued\",limit=\"gateway_queue\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

/// A call whose client gives up before any answer (here while it waits for
/// a slot) is still counted, as CANCELLED, and audited.
#[tokio::test]
async fn a_call_given_up_before_its_answer_is_counted() {
    let (server, a, holder) = one_slot_held_by("given_up", "5s", "given_up").await;
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { execute(&a, "SELECT 1", pb::Priority::Medium).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    waiting.abort();
    holder.await.expect("task").expect("holder");
    let cancelled = |metrics: &str| {
        metrics.lines().any(|l| {
            l.starts_with("weir_calls_total{")
                && l.contains("tenant=\"given_up\"")
                && l.contains("Execute")
                && l.contains("code=\"Cancelled\"")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, metrics) = common::http_get(&server.metrics_url, "/metrics").await;
        if cancelled(&metrics) {
            break;
        }
        assert!(Instant::now() < deadline, "the given-up call is not counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// A call's deadline runs from its arrival, through its wait for a gateway
/// slot: its statement gets what is left, and ends with STATEMENT_TIMEOUT
/// (cancelled in the engine) before the transport would cut it with a bare
/// CANCELLED.
#[tokio::test]
async fn a_call_that_waited_for_a_slot_times_out_with_its_reason() {
    let (server, a, holder) = one_slot_held("5s", "holds_the_slot").await;
    // About 0.6 s in the queue, then a second left of its 1.6 s.
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "pg".into(),
        sql: "SELECT pg_sleep(5)".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("grpc-timeout", "1600m".parse().expect("header value"));
    let err = a.query().execute(request).await.expect_err("past its deadline");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::DeadlineExceeded, "STATEMENT_TIMEOUT"),
        "{err:?}"
    );
    holder.await.expect("task").expect("holder");
    server.stop().await;
}

/// Two tenants keep more calls waiting than there are slots for `run`;
/// returns how many calls each completed.
async fn share(weights: (u32, u32), run: Duration) -> (u64, u64) {
    let config = format!(
        "{}{}{}",
        server_section(2, "30s"),
        tenant("a", &format!("{OPEN}weight = {}", weights.0), &postgres("a", "pg", "")),
        tenant("b", &format!("{OPEN}weight = {}", weights.1), &postgres("b", "pg", ""))
    );
    let server = TestServer::start(&config).await;
    let done: Arc<parking_lot::Mutex<HashMap<&'static str, u64>>> = Arc::default();
    let stop = Instant::now() + run;
    let mut workers = Vec::new();
    for name in ["a", "b"] {
        let client = server.client(&format!("key-{name}")).await;
        for _ in 0..6 {
            let client = client.clone();
            let done = done.clone();
            workers.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    execute(&client, "SELECT pg_sleep(0.01)", pb::Priority::Medium)
                        .await
                        .expect("admitted");
                    *done.lock().entry(name).or_default() += 1;
                }
            }));
        }
    }
    for w in workers {
        w.await.expect("worker");
    }
    server.stop().await;
    let done = done.lock();
    (done["a"], done["b"])
}

#[tokio::test]
async fn tenants_of_equal_weight_get_equal_shares() {
    let (a, b) = share((1, 1), Duration::from_secs(3)).await;
    eprintln!("equal weights: a completed {a}, b {b}");
    let gap = a.abs_diff(b) as f64 / a.max(b) as f64;
    assert!(gap <= 0.10, "a completed {a}, b {b}");
}

#[tokio::test]
async fn tenants_share_by_weight() {
    let (a, b) = share((3, 1), Duration::from_secs(3)).await;
    eprintln!("weights 3:1: a completed {a}, b {b}");
    let ratio = a as f64 / b as f64;
    assert!((2.4..=3.6).contains(&ratio), "a completed {a}, b {b}");
}

#[tokio::test]
async fn result_streams_and_transactions_are_capped_per_tenant() {
    let config = tenant(
        "a",
        &format!("{OPEN}max_concurrent_streams = 1\nmax_open_transactions = 2"),
        &postgres("a", "pg", ""),
    );
    let server = TestServer::start(&config).await;
    let a = server.client("key-a").await;
    let open = a
        .execute_stream("pg", "SELECT g FROM generate_series(1, 1000000) g", vec![])
        .await
        .expect("first stream");
    let err = match a.execute_stream("pg", "SELECT 1", vec![]).await {
        Err(e) => e,
        Ok(_) => panic!("a second stream is over the cap"),
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "STREAM_CONCURRENCY_LIMITED");
    // One that could never run is told so, not sent to retry after the cap.
    let err = a
        .query()
        .execute_stream(pb::ExecuteStreamRequest {
            source: "pg".into(),
            sql: "SELECT 1".into(),
            options: common::unknown_priority(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown priority");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    drop(open);
    // The slot comes back once the server notices the stream is gone.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(s) = a.execute_stream("pg", "SELECT 1", vec![]).await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "the stream slot was released");

    let t1 = a
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("first");
    let _t2 = a
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("second");
    let err = a
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect_err("a third transaction is over the cap");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "TRANSACTION_LIMIT");
    a.commit(&t1).await.expect("commit");
    a.begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("room again after a commit");
    // Both refusals are counted, by the cap that refused them.
    let (_, metrics) = http_get(&server.metrics_url, "/metrics").await;
    for limit in ["streams", "transactions"] {
        assert!(
            sample(
                &metrics,
                "weir_limiter_rejections_total",
                &[("tenant", "a"), ("limit", limit)]
            ) >= 1.0,
            "{limit}"
        );
    }
    server.stop().await;
}

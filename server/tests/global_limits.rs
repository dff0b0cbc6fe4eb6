//! Request-rate limits shared through a real Redis by two gateway
//! replicas, and what happens when Redis cannot be reached.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;

/// A tenant id of its own per run: Redis keeps buckets between runs.
fn tenant_id() -> String {
    format!("g{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// The test Redis's `host:port`.
fn redis_address() -> String {
    redis_url()
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .expect("host:port")
        .to_string()
}

/// Health probes (and so readiness) five times a second.
const FAST_HEALTH: &str = "[server]\nhealth_check_interval = \"200ms\"\n";

/// Waits for `/readyz` to answer `status`.
async fn readiness_becomes(server: &TestServer, status: u16) {
    for _ in 0..100 {
        if http_get(&server.metrics_url, "/readyz").await.0 == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz did not become {status}");
}

/// `[limits]` settings for a Redis reached through `proxy`, refusing calls
/// without it, within 200 ms.
fn fail_closed_through(proxy: &common::Proxy) -> String {
    format!(
        "redis_url = \"redis://127.0.0.1:{}/0\"\nredis_timeout = \"200ms\"\non_redis_failure = \"fail_closed\"",
        proxy.port
    )
}

fn config(id: &str, limits: &str, redis: &str) -> String {
    format!("[limits]\n{redis}\n") + &tenant(id, limits, &sqlite_demo(id, "demo"))
}

/// Two replicas of one configuration sharing the test Redis, and a client of
/// each. A Redis answer slowed by a busy machine fails the call loudly
/// instead of letting the replica count on its own for a second.
async fn replicas(id: &str, limits: &str) -> (TestServer, TestServer, [weir_client::WeirClient; 2]) {
    let redis = format!(
        "redis_url = \"{}\"\nredis_timeout = \"2s\"\non_redis_failure = \"fail_closed\"",
        redis_url()
    );
    let (a, b) = (
        TestServer::start(&config(id, limits, &redis)).await,
        TestServer::start(&config(id, limits, &redis)).await,
    );
    let key = format!("key-{id}");
    let clients = [a.client(&key).await, b.client(&key).await];
    (a, b, clients)
}

/// Calls `SELECT 1` `n` times, alternating between the clients; counts the admitted ones.
async fn admitted(clients: &[weir_client::WeirClient], n: usize) -> (usize, Vec<tonic::Status>) {
    let (mut ok, mut rejected) = (0, Vec::new());
    for i in 0..n {
        match clients[i % clients.len()].execute("demo", "SELECT 1", vec![]).await {
            Ok(_) => ok += 1,
            Err(status) => rejected.push(status),
        }
    }
    (ok, rejected)
}

#[tokio::test]
async fn two_replicas_share_one_bucket() {
    let id = tenant_id();
    // Slow refill, so that the test's own duration adds at most a token or two.
    let (a, b, clients) = replicas(&id, "requests_per_second = 2\nburst = 10").await;
    let (ok, rejected) = admitted(&clients, 30).await;
    // Each replica alone would admit its own burst of 10: 20 together.
    assert!((10..=12).contains(&ok), "admitted {ok} of 30 across two replicas");
    let status = rejected.first().expect("some calls were refused");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(status), "RATE_LIMITED");
    {
        use tonic_types::StatusExt;
        let delay = status.get_error_details().retry_info().and_then(|r| r.retry_delay);
        assert!(
            delay.is_some_and(|d| d.as_millis() > 0 && d.as_millis() <= 500),
            "{delay:?}"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// A bucket whose stored time is far ahead of Redis's clock (the clock
/// stepped back an hour: NTP, a failover) admits again within a bucket's
/// worth of time, instead of refusing every call for an hour. Keys carry
/// the configured prefix, so deployments sharing a Redis keep apart.
#[tokio::test]
async fn a_redis_clock_that_steps_back_locks_no_tenant_out() {
    use redis::AsyncCommands;
    let id = tenant_id();
    let redis_settings = format!(
        "redis_url = \"{}\"\nredis_timeout = \"2s\"\non_redis_failure = \"fail_closed\"\nredis_key_prefix = \"staging\"",
        redis_url()
    );
    let server = TestServer::start(&config(&id, "requests_per_second = 10\nburst = 5", &redis_settings)).await;
    let client = server.client(&format!("key-{id}")).await;
    client.execute("demo", "SELECT 1", vec![]).await.expect("a first call");
    let mut redis = redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("staging:gcra:rate:{id}");
    let stored: Option<String> = redis.get(&key).await.expect("get");
    assert!(stored.is_some(), "the bucket is under the configured prefix");
    // Redis's clock as the script counts it (µs since 2024), plus an hour.
    let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut redis).await.expect("TIME");
    let hour_ahead = (seconds - 1_704_067_200) * 1_000_000 + micros + 3_600_000_000;
    let _: () = redis.set(&key, hour_ahead.to_string()).await.expect("set");
    let mut admitted = 0;
    for _ in 0..5 {
        match client.execute("demo", "SELECT 1", vec![]).await {
            Ok(_) => admitted += 1,
            Err(status) => {
                use tonic_types::StatusExt;
                assert_eq!(reason(&status), "RATE_LIMITED", "{status:?}");
                let delay = status.get_error_details().retry_info().and_then(|r| r.retry_delay);
                assert!(delay.is_some_and(|d| d < Duration::from_secs(2)), "{delay:?}");
            }
        }
    }
    assert!(admitted >= 1, "calls are admitted again at once");
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_redis_fails_open_or_closed_as_configured() {
    let id = tenant_id();
    let open = TestServer::start(&config(
        &id,
        "",
        "redis_url = \"redis://127.0.0.1:1/0\"\nredis_timeout = \"200ms\"\non_redis_failure = \"fail_open\"",
    ))
    .await;
    let client = open.client(&format!("key-{id}")).await;
    assert_serves(&client, "demo", 3).await;
    let (_, body) = http_get(&open.metrics_url, "/metrics").await;
    assert!(
        body.contains("weir_global_limit_failures_total"),
        "the failures are counted"
    );
    open.stop().await;

    let closed = TestServer::start(&config(
        &id,
        "",
        "redis_url = \"redis://127.0.0.1:1/0\"\nredis_timeout = \"200ms\"\non_redis_failure = \"fail_closed\"",
    ))
    .await;
    let client = closed.client(&format!("key-{id}")).await;
    let err = client
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect_err("fail closed");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "GLOBAL_LIMITS_UNAVAILABLE");
    assert!(!err.message().contains("127.0.0.1"), "{}", err.message());
    closed.stop().await;
}

/// A Redis that answers but refuses every check (here an ACL that takes
/// away SET; MISCONF or OOM do the same) is a failed Redis, as one that
/// cannot be reached: calls fail open, and Redis is rested rather than
/// asked (and a warning logged) on every call.
#[tokio::test]
async fn a_redis_that_refuses_every_check_is_rested() {
    let id = tenant_id();
    let user = format!("weir_noset_{id}");
    let mut redis = redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", &user, "on", ">pw", "~*", "+@all", "-set"])
        .query_async(&mut redis)
        .await
        .expect("acl setuser");
    let url = redis_url().replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let server = TestServer::start(&config(
        &id,
        "",
        &format!("redis_url = \"{url}\"\nredis_timeout = \"2s\"\non_redis_failure = \"fail_open\""),
    ))
    .await;
    let client = server.client(&format!("key-{id}")).await;
    let (ok, refused) = admitted(std::slice::from_ref(&client), 20).await;
    assert_eq!((ok, refused.len()), (20, 0), "{refused:?}");
    let (_, body) = http_get(&server.metrics_url, "/metrics").await;
    let asked = sample(&body, "weir_shared_limit_checks_total", &[("tenant", &id)]);
    assert!(
        (1.0..=5.0).contains(&asked),
        "Redis was asked {asked} times for 20 calls"
    );
    server.stop().await;
    let _: () = redis::cmd("ACL")
        .arg(&["DELUSER", &user])
        .query_async(&mut redis)
        .await
        .expect("acl deluser");
}

/// A port that takes connections and never answers (a Redis gone silent),
/// and the task holding them.
async fn silent_redis() -> (u16, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = silent.local_addr().expect("address").port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    (port, hold)
}

/// A Redis that takes connections and never answers costs one
/// `redis_timeout`, not one per call: calls then do without it for a second.
/// The time spent waiting for Redis is not a wait for a turn: it was
/// counted as the tenant throttled by its rate (as every call's Redis round
/// trip was).
#[tokio::test]
async fn a_silent_redis_costs_one_timeout_not_one_per_call() {
    let (port, hold) = silent_redis().await;
    let id = tenant_id();
    let redis = format!("redis_url = \"redis://127.0.0.1:{port}/0\"\nredis_timeout = \"300ms\"");
    let server = TestServer::start(&config(&id, "", &redis)).await;
    let client = server.client(&format!("key-{id}")).await;
    let started = Instant::now();
    assert_serves(&client, "demo", 10).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(1500), "10 calls took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(600),
        "the first calls waited for Redis"
    );
    let (_, body) = http_get(&server.metrics_url, "/metrics").await;
    let throttled = sample(
        &body,
        "weir_throttled_seconds_total",
        &[("tenant", &id), ("limit", "rate")],
    );
    assert_eq!(throttled, 0.0, "waiting for Redis counted as throttling");
    hold.abort();
    server.stop().await;
}

/// A first connection to Redis slower than `redis_timeout` (TLS, AUTH, a
/// distant Redis) fails the calls that come before it and rests Redis; once
/// the connection is made, the rest ends at once instead of refusing every
/// call (`fail_closed`) for the rest of its second.
#[tokio::test]
async fn a_slow_first_connection_to_redis_rests_it_only_until_it_is_made() {
    let upstream = redis_address();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    // Takes connections, and forwards them to Redis once released.
    let released = std::sync::Arc::new(tokio::sync::Notify::new());
    let gate = released.clone();
    let proxy = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (gate, upstream) = (gate.clone(), upstream.clone());
            tokio::spawn(async move {
                gate.notified().await;
                gate.notify_one();
                if let Ok(mut redis) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut socket, &mut redis).await;
                }
            });
        }
    });
    let id = tenant_id();
    let redis = format!(
        "redis_url = \"redis://127.0.0.1:{port}/0\"\nredis_timeout = \"50ms\"\non_redis_failure = \"fail_closed\""
    );
    let server = TestServer::start(&format!("{FAST_HEALTH}{}", config(&id, "", &redis))).await;
    // Refusing every call for want of Redis, the replica is not ready
    // (after health rounds, not only before the first).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(http_get(&server.metrics_url, "/readyz").await.0, 503);
    let client = server.client(&format!("key-{id}")).await;
    for _ in 0..3 {
        let err = client
            .execute("demo", "SELECT 1", vec![])
            .await
            .expect_err("no connection to Redis yet");
        assert_eq!(reason(&err), "GLOBAL_LIMITS_UNAVAILABLE", "{err:?}");
    }
    // Three failures in a row: Redis is rested for a second from here.
    let rested = Instant::now();
    released.notify_one();
    loop {
        match client.execute("demo", "SELECT 1", vec![]).await {
            Ok(_) => break,
            Err(err) => assert_eq!(reason(&err), "GLOBAL_LIMITS_UNAVAILABLE", "{err:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admitted_after = rested.elapsed();
    assert!(
        admitted_after < Duration::from_millis(800),
        "calls were refused for {admitted_after:?} after the connection could be made"
    );
    readiness_becomes(&server, 200).await;
    proxy.abort();
    server.stop().await;
}

/// A connection to Redis that goes silent (a Redis gone without a reset,
/// its address now another's) is given up when Redis is rested: the try
/// after the rest goes through a new connection, and calls are admitted by
/// the shared bucket again within seconds, not once the kernel gives up on
/// the old connection (about a quarter of an hour).
#[tokio::test]
async fn a_redis_connection_gone_silent_is_replaced() {
    let proxy = common::Proxy::start(redis_address()).await;
    let id = tenant_id();
    let redis = fail_closed_through(&proxy);
    let server = TestServer::start(&config(&id, "", &redis)).await;
    let client = server.client(&format!("key-{id}")).await;
    // With fail_closed, an admitted call is a check Redis answered.
    let until = Instant::now() + Duration::from_secs(5);
    while client.execute("demo", "SELECT 1", vec![]).await.is_err() {
        assert!(Instant::now() < until, "never admitted through Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.freeze_open();
    let frozen = Instant::now();
    let mut refused = 0;
    loop {
        match client.execute("demo", "SELECT 1", vec![]).await {
            Ok(_) if refused > 0 => break,
            Ok(_) => {}
            Err(err) => {
                assert_eq!(reason(&err), "GLOBAL_LIMITS_UNAVAILABLE", "{err:?}");
                refused += 1;
            }
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(10),
            "still refused {:?} after the connection went silent",
            frozen.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// With `fail_closed`, each health round asks Redis itself: a replica that
/// has no calls goes out of service when Redis stops answering (it used to
/// stay ready, and refuse the first calls that came), and one out of
/// service, which gets no calls, is ready again at the first round after
/// Redis answers, not once the calls' rest (grown to many seconds through
/// the outage) is over.
#[tokio::test]
async fn readiness_follows_redis_without_calls_to_learn_from() {
    let proxy = common::Proxy::start(redis_address()).await;
    let id = tenant_id();
    let redis = fail_closed_through(&proxy);
    let server = TestServer::start(&format!("{FAST_HEALTH}{}", config(&id, "", &redis))).await;
    readiness_becomes(&server, 200).await;
    proxy.freeze(true);
    let frozen = Instant::now();
    readiness_becomes(&server, 503).await;
    assert!(frozen.elapsed() < Duration::from_secs(3), "{:?}", frozen.elapsed());
    // Calls that still come fail, and rest Redis; the rests grow while the
    // outage lasts (1 s, 2 s, 4 s, ...).
    let client = server.client(&format!("key-{id}")).await;
    while frozen.elapsed() < Duration::from_secs(10) {
        let err = client.execute("demo", "SELECT 1", vec![]).await.expect_err("no Redis");
        assert_eq!(reason(&err), "GLOBAL_LIMITS_UNAVAILABLE", "{err:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.freeze(false);
    let back = Instant::now();
    readiness_becomes(&server, 200).await;
    assert!(back.elapsed() < Duration::from_millis(1500), "{:?}", back.elapsed());
    client
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect("admitted once Redis answers");
    // Its connection gone silent for good (a Redis moved, its old address
    // black-holed), new ones carried: the health rounds, failing, make a
    // new one, where only calls' failures did (and a replica out of service
    // gets none).
    proxy.freeze_open();
    tokio::time::sleep(Duration::from_secs(2)).await;
    readiness_becomes(&server, 200).await;
    client
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect("admitted through a new connection");
    server.stop().await;
}

/// Through a long outage, one call at a time tries Redis again after each
/// rest, and the rests grow (1 s, 2 s, 4 s, ... up to 30 s): calls do not
/// each pay `redis_timeout` every time a rest ends.
#[tokio::test]
async fn a_long_redis_outage_is_tried_by_one_call_at_ever_longer_intervals() {
    let (port, hold) = silent_redis().await;
    let id = tenant_id();
    let redis = format!("redis_url = \"redis://127.0.0.1:{port}/0\"\nredis_timeout = \"200ms\"");
    let server = TestServer::start(&config(&id, "", &redis)).await;
    let client = server.client(&format!("key-{id}")).await;
    let started = Instant::now();
    let mut slow = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let call = Instant::now();
        client.execute("demo", "SELECT 1", vec![]).await.expect("fails open");
        if call.elapsed() >= Duration::from_millis(150) {
            slow += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Three to begin the first rest, then one try after each rest (at
    // about 1.6 s, 3.8 s): about 5, where every rest's end cost three
    // (14 in a run without the tries); some room for a slow machine.
    assert!(slow <= 8, "{slow} calls waited for Redis");
    hold.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_the_configured_rate_under_overload() {
    let id = tenant_id();
    let (rate, burst) = (40u32, 40u32);
    // Refused at once, so that the callers overload the buckets.
    let limits = format!(
        "requests_per_second = {rate}\nburst = {burst}\nmax_concurrent_requests = 1000\nmax_rate_wait = \"0s\""
    );
    let (a, b, clients) = replicas(&id, &limits).await;
    let window = Duration::from_secs(10);
    let started = tokio::time::Instant::now();
    let mut callers = Vec::new();
    // Eight callers, four per replica, each as fast as it can: far above the rate.
    for i in 0..8 {
        let client = clients[i % 2].clone();
        callers.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            while started.elapsed() < window {
                match client.execute("demo", "SELECT 1", vec![]).await {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
                    Err(s) => panic!("unexpected {s:?}"),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0u64, 0u64);
    for c in callers {
        let (o, r) = c.await.expect("caller");
        ok += o;
        refused += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = f64::from(burst) + f64::from(rate) * elapsed;
    let deviation = (ok as f64 - expected) / expected;
    println!(
        "admitted {ok} (expected {expected:.0}, {:+.1} %), refused {refused}",
        deviation * 100.0
    );
    assert!(
        refused as f64 >= 5.0 * ok as f64,
        "the test must overload: {ok} admitted, {refused} refused"
    );
    assert!(
        deviation.abs() <= 0.05,
        "admitted {ok}, expected {expected:.0} within 5 %"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_rate_wait_for_turns_of_the_shared_bucket() {
    let id = tenant_id();
    // 20/s across both replicas, one token in reserve, waits of up to 2 s.
    let (a, b, clients) = replicas(&id, "requests_per_second = 20\nburst = 1\nmax_rate_wait = \"2s\"").await;
    let started = Instant::now();
    // Two callers per replica, five calls each: 20 calls. Each replica's own
    // bucket would let its 10 through in half a second; the shared one takes
    // about a second for all 20.
    let callers = (0..4).map(|i| {
        let client = clients[i % 2].clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                client.execute("demo", "SELECT 1", vec![]).await?;
            }
            Ok::<_, tonic::Status>(())
        })
    });
    for r in futures::future::join_all(callers).await {
        r.expect("caller")
            .expect("every call waits for its turn; none is refused");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "20 calls at 20/s across two replicas took {elapsed:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_buckets_are_shared_too() {
    let id = tenant_id();
    // One second of burst: 1,000 rows. Two replicas loading 1,000 rows each at
    // once must together wait about a second for the second thousand.
    let (a, b, clients) = replicas(&id, "load_rows_per_second = 1000").await;
    let rows = (0..1000).map(Kind::Int64Value).collect();
    let elapsed = load_on_both(&clients, rows, 1).await;
    assert!(elapsed >= Duration::from_millis(800), "shared rows bucket: {elapsed:?}");
    a.stop().await;
    b.stop().await;
}

/// Rates past a million a second hold across replicas too: at 4 MB/s, two
/// replicas loading 4 MB each wait about a second. Whole microseconds per
/// byte had capped the shared bucket at 1 MB/s, a wait of four seconds.
#[tokio::test]
async fn shared_byte_buckets_keep_rates_past_a_million_a_second() {
    let id = tenant_id();
    let (a, b, clients) = replicas(&id, "load_bytes_per_second = 4000000").await;
    let rows = (0..4000).map(|_| Kind::BytesValue(vec![7; 1000])).collect();
    let elapsed = load_on_both(&clients, rows, 4).await;
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_millis(2500),
        "8 MB at 4 MB/s with 4 MB of burst: {elapsed:?}"
    );
    a.stop().await;
    b.stop().await;
}

/// Loads the one-column `rows` through every client at once, in `batches`
/// messages each, into a table of each replica's own; how long that took.
async fn load_on_both(clients: &[weir_client::WeirClient], rows: Vec<Kind>, batches: usize) -> Duration {
    let count = rows.len() as u64;
    for c in clients {
        c.execute("demo", "CREATE TABLE shared_cost (v)", vec![])
            .await
            .expect("table");
    }
    let rows: Vec<pb::Row> = rows
        .into_iter()
        .map(|kind| pb::Row {
            values: vec![pb::Value { kind: Some(kind) }],
        })
        .collect();
    let messages: Vec<Vec<pb::Row>> = rows.chunks(rows.len().div_ceil(batches)).map(<[_]>::to_vec).collect();
    let header = pb::LoadHeader {
        source: "demo".into(),
        table: "shared_cost".into(),
        columns: vec!["v".into()],
        ..Default::default()
    };
    let started = Instant::now();
    let loads = clients
        .iter()
        .map(|c| c.load(header.clone(), tokio_stream::iter(messages.clone())));
    for r in futures::future::join_all(loads).await {
        assert_eq!(r.expect("load").rows_inserted, count);
    }
    started.elapsed()
}

/// A bucket key that holds no number (another program's value, "nan", a
/// key of another type) counts as a full bucket and is overwritten: it
/// fails neither that tenant's calls nor, by resting Redis, every tenant's.
#[tokio::test]
async fn a_bucket_key_holding_no_number_is_taken_as_full() {
    use redis::AsyncCommands;
    let id = tenant_id();
    let redis_settings = format!(
        "redis_url = \"{}\"\nredis_timeout = \"2s\"\non_redis_failure = \"fail_closed\"\nredis_key_prefix = \"odd\"",
        redis_url()
    );
    let server = TestServer::start(&config(&id, "requests_per_second = 100\nburst = 10", &redis_settings)).await;
    let client = server.client(&format!("key-{id}")).await;
    let mut redis = redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("odd:gcra:rate:{id}");
    for odd in ["garbage", "nan"] {
        let _: () = redis.set(&key, odd).await.expect("set");
        client.execute("demo", "SELECT 1", vec![]).await.expect(odd);
    }
    let _: () = redis.del(&key).await.expect("del");
    let _: () = redis.hset(&key, "field", "value").await.expect("hset");
    for _ in 0..5 {
        client
            .execute("demo", "SELECT 1", vec![])
            .await
            .expect("a key of another type");
    }
    let _: () = redis.del(&key).await.expect("del");
    server.stop().await;
}

//! Request-rate limits shared through a real Redis by two gateway
//! replicas, and what happens when Redis cannot be reached.

mod common;

use common::*;
use tonic::Code;

/// A tenant id of its own per run: Redis keeps buckets between runs.
fn tenant_id() -> String {
    format!("g{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn config(id: &str, limits: &str, redis: &str) -> String {
    format!("[limits]\n{redis}\n") + &tenant(id, limits, &sqlite_demo(id, "demo"))
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
    let limits = "requests_per_second = 2\nburst = 10";
    let redis = format!("redis_url = \"{}\"", redis_url());
    let (a, b) = (
        TestServer::start(&config(&id, limits, &redis)).await,
        TestServer::start(&config(&id, limits, &redis)).await,
    );
    let key = format!("key-{id}");
    let clients = [a.client(&key).await, b.client(&key).await];
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

//! The Rust client (`weir-client`) against the real gateway: what only a
//! real server shows (compression, connections sent away by age).

mod common;

use std::time::Duration;

use common::*;
use weir_client::weir_proto::v1 as pb;

const ORDERS: &str = "SELECT o.id, c.name, c.email, o.status FROM orders o JOIN customers c ON c.id = o.customer_id";

/// With `server.compression`, answers to the client come compressed
/// without the caller asking: it names the encodings it accepts.
#[tokio::test]
async fn answers_are_compressed_when_the_server_compresses() {
    for encoding in ["zstd", "gzip"] {
        let config = format!(
            "[server]\ncompression = \"{encoding}\"\n{}",
            tenant("cz", "", &sqlite_demo("cz", "shop"))
        );
        let server = TestServer::start(&config).await;
        let client = server.client("key-cz").await;
        let request = pb::ExecuteStreamRequest {
            source: "shop".into(),
            sql: ORDERS.into(),
            ..Default::default()
        };
        let response = client.query().execute_stream(request).await.expect("stream");
        let used = response.metadata().get("grpc-encoding").and_then(|v| v.to_str().ok());
        assert_eq!(used, Some(encoding));
        // Every helper still reads its answers.
        let mut rows = 0;
        let mut stream = response.into_inner();
        while let Some(message) = stream.message().await.expect("message") {
            if let Some(pb::execute_stream_response::Payload::Batch(batch)) = message.payload {
                rows += batch.rows.len();
            }
        }
        assert_eq!(rows, 3000);
        let mut raw = client.execute_stream_raw("shop", ORDERS, vec![]).await.expect("raw");
        let mut raw_rows = 0;
        while let Some(batch) = raw.next_batch().await.expect("raw batch") {
            raw_rows += batch.iter().count();
        }
        assert_eq!(raw_rows, 3000);
        let mut arrow = client
            .execute_stream_arrow("shop", ORDERS, vec![])
            .await
            .expect("arrow");
        let mut arrow_rows = 0;
        while let Some(batch) = arrow.next_batch().await.expect("arrow batch") {
            arrow_rows += batch.num_rows();
        }
        assert_eq!(arrow_rows, 3000);
        let unary = client.execute("shop", ORDERS, vec![]).await.expect("unary");
        assert_eq!(unary.rows.len(), 3000);
        assert!(!client.list_tables("shop", "").await.expect("tables").is_empty());
        // Unless told not to.
        let request = pb::ExecuteStreamRequest {
            source: "shop".into(),
            sql: ORDERS.into(),
            ..Default::default()
        };
        let plain = client
            .uncompressed()
            .query()
            .execute_stream(request)
            .await
            .expect("plain stream");
        assert!(plain.metadata().get("grpc-encoding").is_none());
        server.stop().await;
    }
}

/// Connections past `server.max_connection_age` are sent GOAWAY: calls the
/// server never took are sent again on a new connection, so none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_outlive_connections_sent_away_by_age() {
    let config = format!(
        "[server]\nmax_connection_age = \"1s\"\n{}",
        tenant(
            "age",
            "requests_per_second = 1000000\nburst = 1000000\nmax_concurrent_requests = 64",
            &sqlite_demo("age", "db")
        )
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-age").await;
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    let callers: Vec<_> = (0..32)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut served, mut failed) = (0u32, Vec::new());
                while tokio::time::Instant::now() < until {
                    match client.execute("db", "SELECT 1 AS one", vec![]).await {
                        Ok(_) => served += 1,
                        Err(status) => failed.push(status),
                    }
                }
                (served, failed)
            })
        })
        .collect();
    let (mut served, mut failed) = (0, Vec::new());
    for caller in callers {
        let (s, f) = caller.await.expect("caller");
        served += s;
        failed.extend(f);
    }
    assert!(served > 100, "{served} calls served");
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        served as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    server.stop().await;
}

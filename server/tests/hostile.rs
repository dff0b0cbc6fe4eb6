//! Hostile input through the real server: oversized and malformed messages,
//! identifiers built to inject SQL, forged handles, unknown enum values and
//! absurd sizes. Each gets a clear error and changes nothing; the server
//! goes on serving.

mod common;

use common::{mysql, postgres, raw_grpc, reason, sqlite_demo, tenant, TestServer};
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

fn config() -> String {
    format!(
        "[server]\nmax_request_bytes = 65536\n{}{}",
        tenant(
            "h",
            "",
            &(sqlite_demo("h", "demo") + &postgres("h", "pg", "") + &mysql("h", "my", ""))
        ),
        tenant("o", "", &sqlite_demo("o", "demo"))
    )
}

/// Names that try to leave their quotes, end the statement or hide what they are.
const NASTY: &[&str] = &[
    "customers\"; DROP TABLE customers; --",
    "customers`; DROP TABLE customers; --",
    "customers]; DROP TABLE customers; --",
    "customers' OR '1'='1",
    "customers/*",
    "cust\u{202e}sremo", // right-to-left override
    "customers\u{0000}", // NUL
    "сustomers",         // Cyrillic с
    "customers\u{200b}", // zero-width space
];

/// A load of nothing into `table`'s `column`, which must be refused.
async fn load_refused(client: &WeirClient, source: &str, table: &str, column: &str) -> tonic::Status {
    let header = pb::LoadHeader {
        source: source.into(),
        table: table.into(),
        columns: vec![column.into()],
        ..Default::default()
    };
    client
        .load(header, tokio_stream::iter(Vec::<Vec<pb::Row>>::new()))
        .await
        .expect_err("no such table or column")
}

#[tokio::test]
async fn identifiers_are_quoted_or_refused_never_injected() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-h").await;
    let table = format!("hostile_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    for source in ["pg", "my"] {
        client
            .execute(source, &format!("CREATE TABLE {table} (id INT PRIMARY KEY)"), vec![])
            .await
            .expect("create");
    }
    for source in ["demo", "pg", "my"] {
        let real = if source == "demo" {
            "customers".to_string()
        } else {
            table.clone()
        };
        for nasty in NASTY {
            let name = nasty.replace("customers", &real);
            let e = client
                .describe_table(source, "", &name)
                .await
                .expect_err("no such table");
            assert!(
                matches!(e.code(), Code::NotFound | Code::InvalidArgument),
                "{source} {name:?}: {e:?}"
            );
            let e = load_refused(&client, source, &name, "id").await;
            assert!(
                matches!(e.code(), Code::NotFound | Code::InvalidArgument),
                "{source} {name:?}: {e:?}"
            );
            // A hostile column name of a real table.
            let e = load_refused(&client, source, &real, &nasty.replace("customers", "id")).await;
            assert!(
                matches!(e.code(), Code::NotFound | Code::InvalidArgument),
                "{source} column {nasty:?}: {e:?}"
            );
        }
        // The tables are all still there.
        client.describe_table(source, "", &real).await.expect("untouched");
    }
    // Subscription and consumer-group names are refused unless plain.
    for nasty in NASTY {
        let start = pb::WatchChangesRequest {
            message: Some(pb::watch_changes_request::Message::Start(pb::WatchStart {
                source: "pg".into(),
                subscription: (*nasty).into(),
                tables: vec![pb::TableRef {
                    schema: String::new(),
                    table: table.clone(),
                }],
                ..Default::default()
            })),
        };
        let e = client
            .stream()
            .watch_changes(tokio_stream::iter(vec![start]))
            .await
            .expect_err("not a plain name");
        assert_eq!(e.code(), Code::InvalidArgument, "{nasty:?}: {e:?}");
    }
    for source in ["pg", "my"] {
        client
            .execute(source, &format!("DROP TABLE {table}"), vec![])
            .await
            .expect("drop");
    }
    server.stop().await;
}

#[tokio::test]
async fn forged_handles_and_unknown_enums_are_refused() {
    let server = TestServer::start(&config()).await;
    let h = server.client("key-h").await;
    let o = server.client("key-o").await;
    // Another tenant's handle, random handles, and handles of the wrong size.
    let theirs = o
        .begin("demo", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    // (An empty handle means no transaction: autocommit.)
    for handle in [theirs.clone(), vec![0u8; 16], vec![0xff; 1000], vec![1]] {
        let e = h
            .execute_in(&handle, "demo", "SELECT 1", vec![])
            .await
            .expect_err("not this caller's transaction");
        assert_eq!(e.code(), Code::NotFound, "{handle:?}: {e:?}");
        assert_eq!(reason(&e), "TRANSACTION_NOT_FOUND");
        let e = h.commit(&handle).await.expect_err("not this caller's transaction");
        assert_eq!(e.code(), Code::NotFound);
    }
    o.commit(&theirs).await.expect("the owner still commits");

    let e = h
        .query()
        .begin_transaction(pb::BeginTransactionRequest {
            source: "demo".into(),
            isolation: 99,
            ..Default::default()
        })
        .await
        .expect_err("unknown isolation");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = h
        .query()
        .execute(pb::ExecuteRequest {
            source: "demo".into(),
            sql: "SELECT 1".into(),
            options: common::unknown_priority(),
            ..Default::default()
        })
        .await
        .expect_err("unknown priority");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let load = pb::LoadHeader {
        source: "demo".into(),
        table: "customers".into(),
        columns: vec!["id".into()],
        mode: 42,
        ..Default::default()
    };
    let e = h
        .load(load, tokio_stream::iter(Vec::<Vec<pb::Row>>::new()))
        .await
        .expect_err("unknown load mode");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // An absurd batch size is capped (at 100,000 rows), not obeyed: 150,000
    // small rows (under the 1 MiB a batch is also cut at) come in two.
    let mut stream = h
        .query()
        .execute_stream(pb::ExecuteStreamRequest {
            source: "demo".into(),
            sql: "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 150000) SELECT x FROM n"
                .into(),
            max_batch_rows: u32::MAX,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    let mut batches = Vec::new();
    while let Some(m) = stream.message().await.expect("message") {
        if let Some(pb::execute_stream_response::Payload::Batch(batch)) = m.payload {
            batches.push(batch.rows.len());
        }
    }
    assert_eq!(batches, [100_000, 50_000], "batches of at most the cap");
    server.stop().await;
}

/// A message type with `bytes` where the API has `string`, to send what a
/// correct client never would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawExecute {
    #[prost(string, tag = "1")]
    source: String,
    #[prost(bytes = "vec", tag = "2")]
    sql: Vec<u8>,
}

async fn raw_execute(server: &TestServer, body: RawExecute) -> tonic::Status {
    let mut grpc = raw_grpc(server.addr.clone()).await;
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", "Bearer key-h".parse().expect("header"));
    let path = http::uri::PathAndQuery::from_static("/weir.v1.QueryService/Execute");
    let codec = tonic_prost::ProstCodec::<RawExecute, pb::ExecuteResponse>::default();
    grpc.unary(request, path, codec).await.expect_err("refused")
}

#[tokio::test]
async fn malformed_and_oversized_messages_are_invalid_arguments() {
    let server = TestServer::start(&config()).await;
    // Invalid UTF-8 in a string field.
    let e = raw_execute(
        &server,
        RawExecute {
            source: "demo".into(),
            sql: vec![b'S', 0xff, 0xfe, b'1'],
        },
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Larger than server.max_request_bytes.
    let client = server.client("key-h").await;
    let e = client
        .execute("demo", &format!("SELECT '{}'", "x".repeat(100_000)), vec![])
        .await
        .expect_err("too large");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // The same as the first message of a stream.
    let e = client
        .watch(pb::WatchStart {
            source: "demo".into(),
            subscription: "s".repeat(100_000),
            ..Default::default()
        })
        .await
        .err()
        .expect("too large");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Nested deeper than the decoder allows.
    let mut value = pb::Value {
        kind: Some(pb::value::Kind::Int64Value(1)),
    };
    for _ in 0..200 {
        value = pb::Value {
            kind: Some(pb::value::Kind::ListValue(pb::ListValue { values: vec![value] })),
        };
    }
    let e = client
        .execute("demo", "SELECT ?", vec![value])
        .await
        .expect_err("too deep");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // And the server serves on.
    client.execute("demo", "SELECT 1", vec![]).await.expect("still serving");
    server.stop().await;
}

#[tokio::test]
async fn unauthenticated_callers_learn_nothing() {
    let server = TestServer::start(&config()).await;
    let mut answers = Vec::new();
    let long = "k".repeat(10_000);
    for key in ["x", "key-nobody", "KEY-H", "Bearer key-h", long.as_str()] {
        let client = WeirClient::connect(&server.addr, key).await.expect("connect");
        for call in 0..2 {
            let e = if call == 0 {
                client.list_sources().await.map(|_| ()).expect_err("refused")
            } else {
                client
                    .execute("demo", "SELECT 1", vec![])
                    .await
                    .map(|_| ())
                    .expect_err("refused")
            };
            assert_eq!(e.code(), Code::Unauthenticated, "{key:?}");
            answers.push(e.message().to_string());
            assert!(!e.message().contains("demo") && !e.message().contains("sqlite"));
        }
    }
    answers.dedup();
    assert_eq!(answers.len(), 1, "one answer for every failure: {answers:?}");
    server.stop().await;
}

/// A connection is told how many calls it may have open at once (tonic's
/// default set no limit, so streams that take no credential, health's
/// Watch, could pile up on one connection without end).
#[tokio::test]
async fn a_connection_is_told_how_many_streams_it_may_open() {
    let server = TestServer::start(&config()).await;
    let tcp = tokio::net::TcpStream::connect(server.addr.trim_start_matches("http://"))
        .await
        .expect("connect");
    let (_send, mut connection) = h2::client::handshake(tcp).await.expect("handshake");
    // Until the server's SETTINGS have arrived and been read.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while connection.max_concurrent_send_streams() != 1024 && std::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), &mut connection).await;
    }
    assert_eq!(connection.max_concurrent_send_streams(), 1024);
    server.stop().await;
}

/// Requests of millions of tiny elements (a few bytes each on the wire,
/// many times that once decoded and converted) are refused by count before
/// they are converted or held.
#[tokio::test]
async fn requests_of_countless_tiny_elements_are_refused_by_count() {
    let server = TestServer::start(&tenant("h", "", &sqlite_demo("h", "demo"))).await;
    let client = server.client("key-h").await;
    let empty = pb::Value { kind: None };
    let err = client
        .execute("demo", "SELECT 1", vec![empty; 70_000])
        .await
        .expect_err("too many parameters");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at most 65535"), "{err:?}");
    let err = client
        .stream()
        .produce(pb::ProduceRequest {
            source: "demo".into(),
            topic: "t".into(),
            records: vec![pb::ProducerRecord::default(); 100_001],
            ..Default::default()
        })
        .await
        .expect_err("too many records");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at most 100000"), "{err:?}");
    server.stop().await;
}

/// A row too large for one message (here 70 MiB of text, or one SQLite
/// makes of a blob repeated) ends its stream with RESOURCE_EXHAUSTED
/// (`ROW_TOO_LARGE`) instead of a message the client cannot read; SQLite's
/// row is refused as it grows, before it takes the gateway's memory.
#[tokio::test]
async fn rows_too_large_for_a_message_are_refused_by_the_server() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-h").await;
    for (source, sql) in [
        ("pg", "SELECT repeat('x', 70 * 1024 * 1024) AS big"),
        (
            "demo",
            "SELECT b AS b1, b AS b2, b AS b3, b AS b4, b AS b5 FROM (SELECT zeroblob(30000000) AS b)",
        ),
    ] {
        let outcome = async {
            let mut stream = client.execute_stream(source, sql, vec![]).await?;
            while stream.next_batch().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        let err = outcome.await.expect_err(source);
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::ResourceExhausted, "ROW_TOO_LARGE"),
            "{source}: {err:?}"
        );
    }
    // The sources go on serving.
    for source in ["pg", "demo"] {
        client.execute(source, "SELECT 1", vec![]).await.expect(source);
    }
    // A row that fits alone is sent whatever rows came before it in its batch.
    let mut stream = client
        .execute_stream(
            "demo",
            "WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n < 100) \
             SELECT zeroblob(CASE WHEN n < 100 THEN 10000 ELSE 65500000 END) FROM s",
            vec![],
        )
        .await
        .expect("stream");
    let mut rows = 0;
    while let Some(batch) = stream.next_batch().await.expect("every row fits a message") {
        rows += batch.len();
    }
    assert_eq!(rows, 101);
    server.stop().await;
}

//! The gateway on its embedded SQLite source: queries, schema, transactions,
//! authentication, isolation between tenants, limits and errors.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use tonic_types::StatusExt;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::IsolationLevel;

fn two_tenants() -> String {
    let mut toml = tenant("alpha", "", &sqlite_demo("alpha", "shop"));
    toml.push_str(&tenant("beta", "", &sqlite_demo("beta", "crm")));
    toml
}

#[tokio::test]
async fn demo_configuration_serves_the_demo_source() {
    let server = TestServer::start(weir_server::config::DEMO_CONFIG).await;
    let client = server.client("demo").await;
    let result = client
        .execute("demo", "SELECT count(*) AS n FROM customers", vec![])
        .await
        .expect("query the demo data");
    assert_eq!(result.columns[0].name, "n");
    assert_eq!(int(&result.rows[0].values[0]), 500);
    let tables = client.list_tables("demo", "").await.expect("tables");
    let names: Vec<_> = tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["customers", "order_items", "order_totals", "orders", "products"]
    );
    let orders = tables.iter().find(|t| t.name == "orders").expect("orders");
    assert_eq!(orders.row_estimate, Some(3000));
    assert_eq!(
        tables.iter().find(|t| t.name == "order_totals").map(|t| t.kind),
        Some(pb::TableKind::View as i32)
    );
    server.stop().await;
}

#[tokio::test]
async fn typed_parameters_and_values() {
    let server = TestServer::start(&two_tenants()).await;
    let client = server.client("key-alpha").await;
    let r = client
        .execute(
            "shop",
            "SELECT id, name, price, signed_up, vip FROM customers JOIN products ON products.id = customers.id WHERE customers.id = ?",
            vec![7i64.into()],
        )
        .await;
    // Ambiguous column names are the engine's error, reported as such.
    let err = r.expect_err("ambiguous column");
    assert_eq!(err.code(), Code::InvalidArgument);

    let r = client
        .execute(
            "shop",
            "SELECT id, name, signed_up, vip FROM customers WHERE id = ? AND country <> ?",
            vec![7i64.into(), "XX".into()],
        )
        .await
        .expect("customer 7");
    assert_eq!(r.rows.len(), 1);
    let row = &r.rows[0].values;
    assert_eq!(int(&row[0]), 7);
    assert!(
        matches!(row[2].kind, Some(pb::value::Kind::DateValue(_))),
        "DATE column gives a date: {:?}",
        row[2]
    );
    assert!(
        matches!(row[3].kind, Some(pb::value::Kind::BoolValue(_))),
        "BOOLEAN column gives a bool"
    );
    let types: Vec<_> = r.columns.iter().map(|c| c.r#type).collect();
    assert_eq!(
        types,
        [
            pb::ColumnType::Int as i32,
            pb::ColumnType::String as i32,
            pb::ColumnType::Date as i32,
            pb::ColumnType::Bool as i32
        ]
    );

    let r = client
        .execute(
            "shop",
            "SELECT ? IS NULL, typeof(?), ?",
            vec![pb::Value::null(), 2.5f64.into(), vec![1u8, 2, 3].into()],
        )
        .await
        .expect("null and blob parameters");
    let row = &r.rows[0].values;
    assert_eq!(int(&row[0]), 1);
    assert_eq!(text(&row[1]), "real");
    assert_eq!(row[2].kind, Some(pb::value::Kind::BytesValue(vec![1, 2, 3])));

    let err = client
        .execute("shop", "SELECT ?", vec![])
        .await
        .expect_err("missing parameter");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1 parameter"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn statements_report_rows_affected_and_streams_end_with_stats() {
    let server = TestServer::start(&two_tenants()).await;
    let client = server.client("key-alpha").await;
    let r = client
        .execute(
            "shop",
            "UPDATE products SET stock = stock + 1 WHERE category = ?",
            vec!["books".into()],
        )
        .await
        .expect("update");
    let affected = r.stats.and_then(|s| s.rows_affected).expect("rows affected");
    let count = client
        .execute("shop", "SELECT count(*) FROM products WHERE category = 'books'", vec![])
        .await
        .expect("count");
    assert_eq!(affected as i64, int(&count.rows[0].values[0]));

    let mut stream = client
        .execute_stream("shop", "SELECT * FROM order_items ORDER BY order_id", vec![])
        .await
        .expect("stream");
    assert_eq!(stream.columns().len(), 4);
    let mut rows = 0;
    let mut batches = 0;
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        assert!(batch.len() <= 1000, "default batches hold at most 1000 rows");
        rows += batch.len();
        batches += 1;
    }
    let stats = stream.stats().expect("stats come last");
    assert_eq!(stats.rows_returned as usize, rows);
    assert!(rows > 8000 && batches >= 9, "{rows} rows in {batches} batches");
    server.stop().await;
}

#[tokio::test]
async fn schema_calls_describe_the_source() {
    let server = TestServer::start(&two_tenants()).await;
    let client = server.client("key-alpha").await;
    let sources = client.list_sources().await.expect("sources");
    assert_eq!(sources.len(), 1);
    assert_eq!(sources[0].name, "shop");
    assert_eq!(sources[0].engine, pb::Engine::Sqlite as i32);
    assert_eq!(
        sources[0].capabilities.as_ref().map(|c| c.parameter_style.as_str()),
        Some("?")
    );

    let ping = client.test_connection("shop").await.expect("ping");
    assert!(ping.server_version.starts_with("SQLite 3."), "{}", ping.server_version);

    let schemas = client.list_schemas("shop").await.expect("schemas");
    assert_eq!(schemas.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["main"]);

    let d = client
        .describe_table("shop", "", "order_items")
        .await
        .expect("describe");
    let pk = d.primary_key.expect("primary key");
    assert_eq!(pk.columns, ["order_id", "product_id"]);
    assert_eq!(d.foreign_keys.len(), 2);
    let to_orders = d
        .foreign_keys
        .iter()
        .find(|f| f.referenced_table == "orders")
        .expect("fk to orders");
    assert_eq!(to_orders.on_delete, "CASCADE");
    let price = d
        .columns
        .iter()
        .find(|c| c.column.as_ref().is_some_and(|c| c.name == "unit_price"))
        .expect("unit_price");
    let col = price.column.as_ref().expect("column");
    assert_eq!(col.native_type, "DECIMAL(10,2)");
    assert_eq!(col.r#type, pb::ColumnType::Decimal as i32);
    assert!(!col.nullable);
    assert!(!d.change_streams.expect("readiness").ready);

    let err = client
        .describe_table("shop", "", "nope")
        .await
        .expect_err("unknown table");
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .execute("shop", "SELECT * FROM nope", vec![])
        .await
        .expect_err("unknown table");
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn transactions_commit_and_roll_back() {
    let server = TestServer::start(&two_tenants()).await;
    let client = server.client("key-alpha").await;
    let tx = client
        .begin("shop", IsolationLevel::Serializable, false)
        .await
        .expect("begin");
    client
        .execute_in(
            &tx,
            "shop",
            "INSERT INTO products VALUES (1001, 'SKU-TX1', 'Rolled back', 'toys', 1.00, 1)",
            vec![],
        )
        .await
        .expect("insert in tx");
    let seen = client
        .execute_in(&tx, "", "SELECT count(*) FROM products WHERE id = 1001", vec![])
        .await
        .expect("read own write");
    assert_eq!(int(&seen.rows[0].values[0]), 1);
    client.rollback(&tx).await.expect("rollback");
    let after = client
        .execute("shop", "SELECT count(*) FROM products WHERE id = 1001", vec![])
        .await
        .expect("count");
    assert_eq!(int(&after.rows[0].values[0]), 0);
    assert_eq!(
        client.commit(&tx).await.expect_err("handle is spent").code(),
        Code::NotFound
    );

    let tx = client
        .begin("shop", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(
            &tx,
            "shop",
            "INSERT INTO products VALUES (1002, 'SKU-TX2', 'Committed', 'toys', 1.00, 1)",
            vec![],
        )
        .await
        .expect("insert");
    client.commit(&tx).await.expect("commit");
    let after = client
        .execute("shop", "SELECT name FROM products WHERE id = 1002", vec![])
        .await
        .expect("read");
    assert_eq!(text(&after.rows[0].values[0]), "Committed");

    let tx = client
        .begin("shop", IsolationLevel::Unspecified, true)
        .await
        .expect("read-only begin");
    // Nor can the transaction switch its read-only pragma off.
    for off in [
        "PRAGMA query_only = OFF",
        "PRAGMA query_only = 0",
        "PRAGMA query_only = 'no'",
    ] {
        let err = client
            .execute_in(&tx, "shop", off, vec![])
            .await
            .expect_err("query_only stays on");
        assert_eq!(err.code(), Code::PermissionDenied, "{off}: {err:?}");
    }
    let err = client
        .execute_in(&tx, "shop", "DELETE FROM products", vec![])
        .await
        .expect_err("read-only transaction");
    assert_eq!(err.code(), Code::PermissionDenied);
    client.rollback(&tx).await.expect("rollback");
    // The connection writes again once the read-only transaction is over.
    client
        .execute("shop", "UPDATE products SET stock = stock WHERE id = 1", vec![])
        .await
        .expect("writes after a read-only transaction");
    server.stop().await;
}

#[tokio::test]
async fn tenants_are_isolated() {
    let server = TestServer::start(&two_tenants()).await;
    let alpha = server.client("key-alpha").await;
    let beta = server.client("key-beta").await;

    let foreign = alpha
        .execute("crm", "SELECT 1", vec![])
        .await
        .expect_err("beta's source");
    let unknown = alpha
        .execute("nope", "SELECT 1", vec![])
        .await
        .expect_err("unknown source");
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        foreign.message().replace("crm", "X"),
        unknown.message().replace("nope", "X"),
        "same answer either way"
    );
    assert_eq!(reason(&foreign), "SOURCE_NOT_FOUND");

    let tx = alpha
        .begin("shop", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = beta
        .execute_in(&tx, "", "SELECT 1", vec![])
        .await
        .expect_err("alpha's transaction");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        beta.rollback(&tx).await.expect_err("alpha's transaction").code(),
        Code::NotFound
    );
    alpha.rollback(&tx).await.expect("the owner can still use it");
    let forged = alpha
        .execute_in(b"not-a-handle", "", "SELECT 1", vec![])
        .await
        .expect_err("forged handle");
    assert_eq!(forged.code(), Code::NotFound);
    server.stop().await;
}

/// A client watching health (gRPC client-side health checking keeps a
/// `Watch` open on each connection) hears NOT_SERVING at shutdown and then
/// the end of its stream, which does not hold the shutdown for its grace.
#[tokio::test]
async fn a_health_watch_does_not_hold_up_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let config = format!("[server]\nshutdown_grace = \"30s\"\n{}", two_tenants());
    let server = TestServer::start(&config).await;
    let mut health = health_client(&server).await;
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("watch")
        .into_inner();
    let started = std::time::Instant::now();
    let stopped = tokio::spawn(server.stop());
    let mut last = None;
    while let Some(status) = tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("the watch ends before the grace does")
        .expect("a status")
    {
        last = Some(status.status);
    }
    assert_eq!(last, Some(ServingStatus::NotServing as i32));
    tokio::time::timeout(Duration::from_secs(20), stopped)
        .await
        .expect("stopped before the grace ran out")
        .expect("server task");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}

#[tokio::test]
async fn bad_keys_are_unauthenticated_and_health_needs_none() {
    let server = TestServer::start(&two_tenants()).await;
    for key in ["wrong", "", "key-gamma"] {
        let client = server.client(if key.is_empty() { "x" } else { key }).await;
        let err = client.list_sources().await.expect_err("bad key");
        assert_eq!(err.code(), Code::Unauthenticated, "{key}");
        assert!(!err.message().contains("alpha") && !err.message().contains("shop"));
    }
    let mut health = health_client(&server).await;
    // SERVING once the first round of probes has answered.
    let mut status = 0;
    for _ in 0..50 {
        status = health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .expect("health without a key")
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Every service a client may check by name (gRPC's per-service health checking).
    for service in [
        "weir.v1.QueryService",
        "weir.v1.SchemaService",
        "weir.v1.StreamService",
        "weir.v1.BulkLoadService",
    ] {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{service}: {e}"))
            .into_inner();
        assert_eq!(
            answer.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    let channel = tonic::transport::Channel::from_shared(server.addr.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut raw = weir_client::weir_proto::v1::schema_service_client::SchemaServiceClient::new(channel);
    let err = raw
        .list_sources(pb::ListSourcesRequest {})
        .await
        .expect_err("no key at all");
    assert_eq!(err.code(), Code::Unauthenticated);
    let request_id = err
        .metadata()
        .get("x-request-id")
        .expect("request id echoed on errors too");
    assert!(!request_id.is_empty());
    server.stop().await;
}

/// An error that ends a stream after its first messages carries the call's
/// request id with the status, as the headers did: many gRPC libraries show
/// a caller only the status and its trailers.
#[tokio::test]
async fn an_error_midway_through_a_stream_carries_the_request_id() {
    let server = TestServer::start(&tenant("midway", "", &sqlite_demo("midway", "db"))).await;
    // The generated stub, not `execute_stream_raw`, which adds the id itself.
    let mut raw = server.client("key-midway").await.query();
    // 5,000 rows in batches of 1,000, then an integer overflow (an
    // expression of the row's own: SQLite evaluates constant ones first).
    let request = tonic::Request::new(pb::ExecuteStreamRequest {
        source: "db".into(),
        sql: "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5001) \
              SELECT CASE WHEN x = 5001 THEN abs(x - 5001 - 9223372036854775807 - 1) ELSE x END FROM c"
            .into(),
        ..Default::default()
    });
    let response = raw.execute_stream(request).await.expect("the stream starts");
    let sent = response
        .metadata()
        .get("x-request-id")
        .cloned()
        .expect("the request id in the headers");
    let mut stream = response.into_inner();
    let mut messages = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => messages += 1,
            Ok(None) => panic!("the statement fails at its last row"),
            Err(e) => break e,
        }
    };
    assert!(messages > 1, "the error came after rows: {messages} messages");
    assert_eq!(err.metadata().get("x-request-id"), Some(&sent), "{err:?}");
    server.stop().await;
}

/// A Rollback is never refused for the tenant's rate: it only lets go of
/// what a transaction holds, which a refusal would keep until the
/// transaction's idle timeout.
#[tokio::test]
async fn a_rollback_is_admitted_over_the_tenants_rate() {
    let limits = "requests_per_second = 1\nburst = 1\nmax_rate_wait = \"0s\"";
    let server = TestServer::start(&tenant("rollback", limits, &sqlite_demo("rollback", "db"))).await;
    let client = server.client("key-rollback").await;
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    // Until the bucket is empty (a slow machine may have refilled it).
    let mut limited = false;
    for _ in 0..100 {
        match client.execute_in(&tx, "db", "SELECT 1", vec![]).await {
            Ok(_) => continue,
            Err(e) if reason(&e) == "RATE_LIMITED" => {
                limited = true;
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(limited, "the tenant's rate was reached");
    client.rollback(&tx).await.expect("a rollback over the rate");
    server.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_with_a_retry_delay() {
    let toml = tenant("slow", "requests_per_second = 2\nburst = 3", &sqlite_demo("slow", "db"));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-slow").await;
    for _ in 0..3 {
        client.list_sources().await.expect("within the burst");
    }
    let err = client.list_sources().await.expect_err("over the rate");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "RATE_LIMITED");
    let delay = err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(500),
        "{delay:?}"
    );
    tokio::time::sleep(delay).await;
    client.list_sources().await.expect("admitted after the advised delay");
    server.stop().await;
}

#[tokio::test]
async fn a_call_over_the_rate_waits_for_a_turn_that_comes_soon() {
    // 20/s: a token every 50 ms, none in reserve after the first call. The
    // default max_rate_wait (250 ms) covers the next four turns.
    let toml = tenant(
        "paced",
        "requests_per_second = 20\nburst = 1",
        &sqlite_demo("paced", "db"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-paced").await;
    client.execute("db", "SELECT 1", vec![]).await.expect("the burst");
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.execute("db", "SELECT 1", vec![]).await })
        })
        .collect();
    let mut queued = Vec::new();
    for call in calls {
        let response = call.await.expect("task").expect("admitted at its turn, not refused");
        let waited = response.stats.and_then(|s| s.queued).expect("stats.queued");
        queued.push(Duration::new(waited.seconds as u64, waited.nanos as u32));
    }
    queued.sort();
    // Turns 50 ms apart: the four waited about 50, 100, 150 and 200 ms, and
    // said so. Measured between each other, not from the burst, so that a
    // slow start of the calls does not shorten every wait alike.
    assert!(queued[3] >= Duration::from_millis(100), "{queued:?}");
    assert!(queued[3] - queued[0] >= Duration::from_millis(100), "{queued:?}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    // A caller whose deadline comes before its turn is refused at once,
    // with the delay after which it would be admitted at once.
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "db".into(),
        sql: "SELECT 1".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(10));
    // Refused, not left to wait: a caller that waited would get its
    // deadline's DEADLINE_EXCEEDED instead.
    let err = client.query().execute(request).await.expect_err("its turn is too late");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "RATE_LIMITED");
    assert!(err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .is_some());
    server.stop().await;
}

#[tokio::test]
async fn a_caller_that_leaves_while_waiting_for_its_turn_frees_its_slot() {
    // 1/s with no reserve: the second call's turn is a second away, and it
    // waits for it in the tenant's only concurrency slot.
    let limits = "requests_per_second = 1\nburst = 1\nmax_rate_wait = \"5s\"\nmax_concurrent_requests = 1";
    let server = TestServer::start(&tenant("leaver", limits, &sqlite_demo("leaver", "db"))).await;
    let client = server.client("key-leaver").await;
    client.execute("db", "SELECT 1", vec![]).await.expect("the burst");
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.execute("db", "SELECT 1", vec![]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect_err("the waiting call holds the slot");
    assert_eq!(reason(&err), "CONCURRENCY_LIMITED");
    // The waiting caller goes away (its stream is reset): the slot is free
    // again, and the token it waited for is spent.
    waiting.abort();
    let _ = waiting.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect("the slot was freed; the call waits for the next turn");
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test]
async fn concurrency_limit_counts_open_streams() {
    let toml = tenant("one", "max_concurrent_requests = 1", &sqlite_demo("one", "db"));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-one").await;
    let mut open = client.query();
    let request = pb::ExecuteStreamRequest {
        source: "db".into(),
        sql: "SELECT * FROM order_items".into(),
        max_batch_rows: 10,
        ..Default::default()
    };
    let mut stream = open.execute_stream(request).await.expect("first stream").into_inner();
    assert!(stream.message().await.expect("metadata").is_some());
    let err = client.list_sources().await.expect_err("the stream holds the only slot");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "CONCURRENCY_LIMITED");
    drop(stream);
    let mut admitted = false;
    for _ in 0..50 {
        if client.list_sources().await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "the slot is released when the stream is dropped");
    server.stop().await;
}

#[tokio::test]
async fn unary_results_are_capped_not_truncated() {
    let toml = tenant(
        "capped",
        "max_rows_per_response = 100\nmax_bytes_per_response = 100000",
        &sqlite_demo("capped", "db"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-capped").await;
    let err = client
        .execute("db", "SELECT * FROM orders", vec![])
        .await
        .expect_err("3000 rows > 100");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "RESULT_TOO_LARGE");
    assert!(err.message().contains("ExecuteStream"), "{}", err.message());
    assert!(err.get_error_details().retry_info().is_none(), "retrying cannot help");
    let ok = client
        .execute("db", "SELECT * FROM orders LIMIT 100", vec![])
        .await
        .expect("at the cap");
    assert_eq!(ok.rows.len(), 100);
    let err = client
        .execute("db", "SELECT zeroblob(200000)", vec![])
        .await
        .expect_err("bytes cap");
    assert_eq!(reason(&err), "RESULT_TOO_LARGE");
    server.stop().await;
}

/// `server.max_connection_age`: an old connection is sent GOAWAY and ends
/// once its calls have; a call in progress still gets its answer, and the
/// client's next call goes on a new connection.
#[tokio::test]
async fn connections_past_their_age_are_sent_away_once_their_calls_end() {
    let toml = format!(
        "[server]\nmax_connection_age = \"1s\"\n{}",
        tenant("aged", "", &postgres("aged", "pg", ""))
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-aged").await;
    let idle = tokio::net::TcpStream::connect(server.host_port())
        .await
        .expect("connect");
    let (_send, idle) = h2::client::handshake(idle).await.expect("handshake");
    // Outlives the connection's age by a second.
    let slow = client
        .execute("pg", "SELECT pg_sleep(2)::text AS slept", vec![])
        .await
        .expect("a call in progress at the age is answered");
    assert_eq!(slow.rows.len(), 1);
    let ended = tokio::time::timeout(Duration::from_secs(10), idle).await;
    assert!(
        matches!(ended, Ok(Ok(()))),
        "the idle connection was not closed: {ended:?}"
    );
    assert_serves(&client, "pg", 3).await;
    server.stop().await;
}

#[tokio::test]
async fn statement_timeout_cancels_sqlite_work() {
    let toml = tenant("t", "statement_timeout = \"300ms\"", &sqlite_demo("t", "db"));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-t").await;
    let started = std::time::Instant::now();
    let slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    let err = client.execute("db", slow, vec![]).await.expect_err("endless query");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(reason(&err), "STATEMENT_TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The interrupted connection is healthy and back in the pool.
    assert_serves(&client, "db", 10).await;
    server.stop().await;
}

/// SQLite rolls a transaction back when a write in it is interrupted; the
/// handle then refuses statements, which would have autocommitted, and Commit.
/// A SQLite source with a table `name` and a transaction that wrote a row
/// to it (so holds the write lock).
async fn sqlite_transaction_holding(name: &str) -> (TestServer, weir_client::WeirClient, Vec<u8>) {
    let server = TestServer::start(&tenant("t", "", &sqlite_demo("t", "db"))).await;
    let client = server.client("key-t").await;
    client
        .execute("db", &format!("CREATE TABLE {name} (x INTEGER)"), vec![])
        .await
        .expect("table");
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", &format!("INSERT INTO {name} VALUES (1)"), vec![])
        .await
        .expect("the transaction takes the write lock");
    (server, client, tx)
}

#[tokio::test]
async fn an_interrupted_sqlite_write_loses_its_transaction_loudly() {
    let (server, client, tx) = sqlite_transaction_holding("lost").await;
    let endless = "WITH RECURSIVE c(x) AS (SELECT 2 UNION ALL SELECT x + 1 FROM c) INSERT INTO lost SELECT x FROM c";
    let err = execute_within(&client, &tx, "db", endless, Duration::from_millis(300))
        .await
        .expect_err("interrupted");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    // SQLite ended that transaction, so the source's write turn is free for
    // others before the handle is rolled back or reaped.
    execute_within(
        &client,
        &[],
        "db",
        "INSERT INTO lost VALUES (4)",
        Duration::from_secs(3),
    )
    .await
    .expect("a write while the lost transaction's handle is still open");
    assert_transaction_lost(&client, &tx, "db", "INSERT INTO lost VALUES (3)").await;
    let count = client
        .execute("db", "SELECT count(*) FROM lost WHERE x <> 4", vec![])
        .await
        .expect("count");
    assert_eq!(
        int(&count.rows[0].values[0]),
        0,
        "nothing of the lost transaction autocommitted"
    );
    server.stop().await;
}

/// A read written as a common table expression does not wait for the
/// source's write turn, which an open read-write transaction holds.
#[tokio::test]
async fn a_sqlite_read_with_a_cte_does_not_wait_for_the_writers_turn() {
    let (server, client, tx) = sqlite_transaction_holding("cte_turn").await;
    execute_within(
        &client,
        &[],
        "db",
        "WITH x AS (SELECT 1 AS one) SELECT one FROM x",
        Duration::from_secs(2),
    )
    .await
    .expect("a read beside the open write transaction");
    let err = execute_within(
        &client,
        &[],
        "db",
        "WITH x AS (SELECT 5 AS v) INSERT INTO cte_turn SELECT v FROM x",
        Duration::from_secs(2),
    )
    .await
    .expect_err("a write waits for the turn");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    client.rollback(&tx).await.expect("rollback");
    server.stop().await;
}

/// SQLite takes `$2` as a name and numbers names by where they first
/// appear: Weir binds `$N`, `:N` and `@N` by their digits, as PostgreSQL
/// does, so SQL written for PostgreSQL does not get its values swapped.
#[tokio::test]
async fn sqlite_numbered_parameters_take_the_value_their_number_names() {
    let server = TestServer::start(&tenant("k", "", &sqlite_demo("k", "db"))).await;
    let client = server.client("key-k").await;
    let ints = |r: &pb::ExecuteResponse| r.rows[0].values.iter().map(int).collect::<Vec<_>>();
    for sql in ["SELECT $2, $1", "SELECT :2, :1", "SELECT @2, $1", "SELECT ?2, ?1"] {
        let r = client
            .execute("db", sql, vec![1i64.into(), 2i64.into()])
            .await
            .expect(sql);
        assert_eq!(ints(&r), [2, 1], "{sql}");
    }
    let r = client
        .execute("db", "SELECT $1 + $1, ?", vec![3i64.into(), 4i64.into()])
        .await
        .expect("one value twice, then the next slot");
    assert_eq!(ints(&r), [6, 4]);
    let err = client
        .execute("db", "SELECT $2", vec![1i64.into()])
        .await
        .expect_err("$2 needs two values");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await;
}

/// A decimal parameter compares as a number with what has no affinity in
/// SQLite (a view's SUM, an expression): bound as text, it compared greater
/// than every number, and `total > ?` found nothing.
#[tokio::test]
async fn sqlite_decimal_parameters_compare_as_numbers() {
    let server = TestServer::start(&tenant("t", "", &sqlite_demo("t", "db"))).await;
    let client = server.client("key-t").await;
    let count = |sql: &'static str, params: Vec<pb::Value>| {
        let client = client.clone();
        async move {
            let r = client.execute("db", sql, params).await.expect(sql);
            int(&r.rows[0].values[0])
        }
    };
    let orders = count("SELECT count(*) FROM order_totals", vec![]).await;
    assert!(orders > 0);
    let decimal = |d: &str| pb::Value {
        kind: Some(pb::value::Kind::DecimalValue(d.into())),
    };
    assert_eq!(
        count("SELECT count(*) FROM order_totals WHERE total > ?", vec![decimal("0")]).await,
        orders
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM order_totals WHERE total < ?",
            vec![decimal("0.01")]
        )
        .await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM (SELECT 1) WHERE ? < 2", vec![decimal("1.25")]).await,
        1
    );
    server.stop().await;
}

/// A RETURNING statement makes all its writes at its first step: one that
/// fails on a later row (a value Weir cannot read), or whose caller leaves,
/// leaves none of them behind, pooled or in a transaction.
#[tokio::test]
async fn a_sqlite_write_that_fails_after_its_first_row_leaves_nothing() {
    let (server, client, tx) = sqlite_transaction_holding("dated").await;
    client
        .rollback(&tx)
        .await
        .expect("rollback of the helper's transaction");
    client
        .execute("db", "CREATE TABLE days (v DATE)", vec![])
        .await
        .expect("table");
    let insert = "INSERT INTO days VALUES ('2024-01-01'), ('soon') RETURNING v";
    let err = client.execute("db", insert, vec![]).await.expect_err("not a date");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let count = |client: weir_client::WeirClient| async move {
        let r = client
            .execute("db", "SELECT count(*) FROM days", vec![])
            .await
            .expect("count");
        int(&r.rows[0].values[0])
    };
    assert_eq!(
        count(client.clone()).await,
        0,
        "the unary statement's writes were undone"
    );
    // Streamed, the statement runs on a pooled connection, in autocommit.
    let outcome = async {
        let mut stream = client.execute_stream("db", insert, vec![]).await?;
        while stream.next_batch().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    };
    let err = outcome.await.expect_err("not a date");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(
        count(client.clone()).await,
        0,
        "the streamed statement's writes were undone"
    );

    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", "INSERT INTO days VALUES ('2024-02-02')", vec![])
        .await
        .expect("a first write");
    let err = client
        .execute_in(&tx, "db", insert, vec![])
        .await
        .expect_err("not a date");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_transaction_lost(&client, &tx, "db", "INSERT INTO days VALUES ('2024-03-03')").await;
    assert_eq!(count(client.clone()).await, 0, "the transaction's writes were undone");

    // A write SQLite itself refuses (a key taken) undoes only its own
    // writes: the transaction goes on.
    client
        .execute("db", "CREATE TABLE keyed (id INTEGER PRIMARY KEY, v DATE)", vec![])
        .await
        .expect("table");
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", "INSERT INTO keyed VALUES (1, '2024-01-01')", vec![])
        .await
        .expect("a first write");
    for taken in [
        "INSERT INTO keyed VALUES (1, '2024-01-02')",
        "INSERT INTO keyed VALUES (2, '2024-01-02'), (1, '2024-01-03') RETURNING id",
    ] {
        let err = client.execute_in(&tx, "db", taken, vec![]).await.expect_err(taken);
        assert_eq!(err.code(), Code::AlreadyExists, "{taken}: {err:?}");
    }
    client.commit(&tx).await.expect("the transaction goes on");
    let r = client
        .execute("db", "SELECT count(*) FROM keyed", vec![])
        .await
        .expect("count");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    server.stop().await;
}

/// A pooled SQLite connection that a caller's pragma or temporary table
/// changed is closed, not handed to the next caller.
#[tokio::test]
async fn sqlite_session_state_does_not_reach_the_next_caller() {
    let source = format!("{}[tenants.t.sources.db.pool]\nmax_size = 1\n", sqlite_demo("t", "db"));
    let server = TestServer::start(&tenant("t", "", &source)).await;
    let client = server.client("key-t").await;
    let run = |sql: &'static str| {
        let client = client.clone();
        async move {
            client
                .execute("db", sql, vec![])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {}", e.message()))
        }
    };
    run("PRAGMA foreign_keys = OFF").await;
    assert_eq!(int(&run("PRAGMA foreign_keys").await.rows[0].values[0]), 1);
    // SQLite sets a flag pragma while it prepares the statement, EXPLAIN or not.
    run("EXPLAIN PRAGMA foreign_keys = OFF").await;
    assert_eq!(int(&run("PRAGMA foreign_keys").await.rows[0].values[0]), 1);
    run("EXPLAIN QUERY PLAN PRAGMA foreign_keys = OFF").await;
    assert_eq!(int(&run("PRAGMA foreign_keys").await.rows[0].values[0]), 1);
    // ... and as a second statement, refused, but prepared to see that it is there.
    let err = client
        .execute("db", "SELECT 1; PRAGMA foreign_keys = OFF", vec![])
        .await
        .expect_err("two statements");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(int(&run("PRAGMA foreign_keys").await.rows[0].values[0]), 1);
    run("/* a comment first */ PRAGMA query_only = ON").await;
    run("UPDATE products SET stock = stock WHERE id = 1").await;
    run("CREATE TEMP TABLE products (x INTEGER)").await;
    let count = run("SELECT count(*) FROM products").await;
    assert!(
        int(&count.rows[0].values[0]) > 0,
        "the demo's products, not an empty temporary table"
    );
    // The same for a transaction's connection, once the transaction ends.
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", "PRAGMA query_only = ON", vec![])
        .await
        .expect("pragma");
    client.commit(&tx).await.expect("commit");
    run("UPDATE products SET stock = stock WHERE id = 1").await;
    server.stop().await;
}

/// DDL changes no rows, whatever the connection's last DELETE changed;
/// infinite decimals are spelled as PostgreSQL's numeric spells them.
#[tokio::test]
async fn sqlite_ddl_reports_no_rows_affected_and_infinite_decimals_are_named_and_nan_refused() {
    let source = format!("{}[tenants.t.sources.db.pool]\nmax_size = 1\n", sqlite_demo("t", "db"));
    let server = TestServer::start(&tenant("t", "", &source)).await;
    let client = server.client("key-t").await;
    let affected = |r: pb::ExecuteResponse| r.stats.and_then(|s| s.rows_affected);
    let deleted = client
        .execute("db", "DELETE FROM order_items", vec![])
        .await
        .expect("delete");
    assert!(affected(deleted).is_some_and(|n| n > 100));
    let created = client
        .execute("db", "CREATE TABLE after_delete (x INTEGER)", vec![])
        .await
        .expect("create");
    assert_eq!(affected(created), Some(0));
    // Infinities in a DECIMAL column read as numeric spells them, not Rust's inf.
    client
        .execute("db", "CREATE TABLE huge (v DECIMAL)", vec![])
        .await
        .expect("table");
    client
        .execute("db", "INSERT INTO huge VALUES (9e999), (-9e999)", vec![])
        .await
        .expect("infinities");
    let r = client
        .execute("db", "SELECT v FROM huge ORDER BY v DESC", vec![])
        .await
        .expect("read");
    let spelled: Vec<_> = r
        .rows
        .iter()
        .map(|row| match &row.values[0].kind {
            Some(pb::value::Kind::DecimalValue(d)) => d.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(spelled, ["Infinity", "-Infinity"]);
    // SQLite stores a NaN it is given as NULL: refused, not changed.
    let nan = pb::Value {
        kind: Some(pb::value::Kind::DoubleValue(f64::NAN)),
    };
    let e = client
        .execute("db", "SELECT typeof(?)", vec![nan])
        .await
        .expect_err("NaN would become NULL");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("NaN"), "{e:?}");
    // A leap second stored as text cannot be a timestamp: refused, not moved.
    for sql in [
        "CREATE TABLE leap (t TIMESTAMP)",
        "INSERT INTO leap VALUES ('2016-12-31 23:59:60')",
    ] {
        client.execute("db", sql, vec![]).await.expect(sql);
    }
    let e = client
        .execute("db", "SELECT t FROM leap", vec![])
        .await
        .expect_err("a leap second");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("leap second"), "{e:?}");
    server.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_rejected_with_the_field() {
    let server = TestServer::start(&two_tenants()).await;
    let client = server.client("key-alpha").await;
    let err = client.execute("shop", "   ", vec![]).await.expect_err("empty sql");
    assert_eq!(err.code(), Code::InvalidArgument);
    let violations = err
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.clone())
        .unwrap_or_default();
    assert_eq!(violations.first().map(|v| v.field.as_str()), Some("sql"));
    let bad_uuid = pb::Value {
        kind: Some(pb::value::Kind::UuidValue("nope".into())),
    };
    let err = client
        .execute("shop", "SELECT ?", vec![bad_uuid])
        .await
        .expect_err("bad uuid");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("parameter 1"), "{}", err.message());
    let err = client.execute("", "SELECT 1", vec![]).await.expect_err("no source");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client.execute("shop", "selec 1", vec![]).await.expect_err("syntax");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!engine_code(&err).is_empty(), "engine code attached");
    server.stop().await;
}

#[tokio::test]
async fn sqlite_sources_cannot_reach_other_files() {
    let server = TestServer::start(&two_tenants()).await;
    let client = server.client("key-alpha").await;
    let other = std::env::temp_dir().join(format!("weir-attach-probe-{}.db", std::process::id()));
    let attach = format!("ATTACH DATABASE '{}' AS other", other.display());
    let err = client
        .execute("shop", &attach, vec![])
        .await
        .expect_err("attach is refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let vacuum = format!("VACUUM INTO '{}'", other.display());
    let err = client
        .execute("shop", &vacuum, vec![])
        .await
        .expect_err("vacuum into is refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // A file name SQLite does not show the check (a parameter, an
    // expression) is refused too.
    let path = other.display().to_string();
    for (sql, params) in [
        ("ATTACH DATABASE ? AS other", vec![pb::Value::from(path.as_str())]),
        ("ATTACH DATABASE ? || '' AS other", vec![pb::Value::from(path.as_str())]),
        ("VACUUM INTO ?", vec![pb::Value::from(path.as_str())]),
    ] {
        let err = client.execute("shop", sql, params).await.expect_err(sql);
        assert_eq!(err.code(), Code::PermissionDenied, "{sql}: {err:?}");
    }
    assert!(!other.exists(), "no file was written");
    // A plain VACUUM (its copy in a private temporary database) runs, also
    // after a caller attached a temporary database of its own.
    client
        .execute("shop", "ATTACH DATABASE '' AS scratch", vec![])
        .await
        .expect("a private temporary database");
    for _ in 0..3 {
        client.execute("shop", "VACUUM", vec![]).await.expect("vacuum");
    }
    server.stop().await;
}

/// `max_file_bytes` bounds what a tenant can write, in its tables and its
/// temporary ones, and a tenant cannot lift it.
#[tokio::test]
async fn a_sqlite_source_holds_at_most_max_file_bytes() {
    let source = format!(
        "{}max_file_bytes = 1048576\n",
        sqlite_demo("f", "db").replace("demo_data = true\n", "")
    );
    let server = TestServer::start(&tenant("f", "", &source)).await;
    let client = server.client("key-f").await;
    client
        .execute("db", "CREATE TABLE big (b BLOB)", vec![])
        .await
        .expect("create");
    let err = client
        .execute("db", "INSERT INTO big VALUES (zeroblob(2000000))", vec![])
        .await
        .expect_err("past the bound");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // A temporary table lives as long as its connection: a transaction's.
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", "CREATE TEMP TABLE scratch (b BLOB)", vec![])
        .await
        .expect("create temp");
    let err = client
        .execute_in(&tx, "db", "INSERT INTO scratch VALUES (zeroblob(2000000))", vec![])
        .await
        .expect_err("past the bound");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let _ = client.rollback(&tx).await;
    client
        .execute("db", "INSERT INTO big VALUES (zeroblob(100000))", vec![])
        .await
        .expect("a write within the bound");
    for sql in ["PRAGMA max_page_count = 1000000", "PRAGMA page_size = 65536"] {
        let err = client.execute("db", sql, vec![]).await.expect_err(sql);
        assert_eq!(err.code(), Code::PermissionDenied, "{sql}: {err:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn sqlite_schema_shows_every_kind_of_table_and_column() {
    let server = TestServer::start(&tenant("k", "", &sqlite_demo("k", "db"))).await;
    let client = server.client("key-k").await;
    for sql in [
        "CREATE TABLE gen (a INTEGER, b INTEGER GENERATED ALWAYS AS (a * 2) STORED, c INTEGER AS (a + 1), \
         [d e] TEXT AS ('x,) AS (' || \"a\") VIRTUAL)",
        "CREATE TABLE ids (id INTEGER PRIMARY KEY AUTOINCREMENT, x INTEGER)",
        "CREATE TABLE desc_key (id INTEGER PRIMARY KEY DESC, x INTEGER)",
        "CREATE TABLE no_rowid_key (id INTEGER PRIMARY KEY, x INTEGER) WITHOUT ROWID",
        "CREATE VIRTUAL TABLE notes USING fts5(body)",
        "CREATE TABLE parent (x INTEGER, y INTEGER, PRIMARY KEY (x, y))",
        "CREATE TABLE child (px INTEGER, py INTEGER, FOREIGN KEY (px, py) REFERENCES parent)",
        "CREATE TABLE strict_t (x INTEGER) STRICT",
        "CREATE TABLE plain (x)",
    ] {
        client.execute("db", sql, vec![]).await.expect(sql);
    }
    let names = |d: &pb::DescribeTableResponse| -> Vec<String> {
        d.columns
            .iter()
            .filter_map(|c| c.column.as_ref().map(|c| c.name.clone()))
            .collect()
    };
    // Generated columns are columns; a table is found whatever its case.
    let gen = client.describe_table("db", "", "GEN").await.expect("describe");
    assert_eq!(names(&gen), ["a", "b", "c", "d e"]);
    assert_eq!(gen.table.as_ref().map(|t| t.name.as_str()), Some("gen"));
    // How each column is filled: generated ones with their expression, and
    // the rowid alias (only a lone INTEGER PRIMARY KEY of a rowid table, not
    // a DESC one) numbered when left out.
    let filled = |d: &pb::DescribeTableResponse| -> Vec<(pb::ColumnGeneration, String)> {
        d.columns
            .iter()
            .map(|c| (c.generation(), c.generation_expression.clone()))
            .collect()
    };
    use pb::ColumnGeneration as G;
    assert_eq!(
        filled(&gen),
        [
            (G::Unspecified, String::new()),
            (G::Computed, "a * 2".into()),
            (G::Computed, "a + 1".into()),
            (G::Computed, "'x,) AS (' || \"a\"".into()),
        ]
    );
    // The rowid alias and a WITHOUT ROWID table's key refuse NULL; a DESC
    // integer key is an ordinary column, which SQLite lets hold NULLs.
    for (table, first, key_takes_null) in [
        ("ids", G::IdentityByDefault, false),
        ("desc_key", G::Unspecified, true),
        ("no_rowid_key", G::Unspecified, false),
    ] {
        let d = client.describe_table("db", "", table).await.expect(table);
        assert_eq!(
            filled(&d),
            [(first, String::new()), (G::Unspecified, String::new())],
            "{table}"
        );
        assert_eq!(
            d.columns[0].column.as_ref().map(|c| c.nullable),
            Some(key_takes_null),
            "{table}"
        );
    }
    client
        .execute("db", "INSERT INTO desc_key VALUES (NULL, 1)", vec![])
        .await
        .expect("a DESC key takes NULL");
    // Schema names are not case-sensitive either.
    let upper = client.describe_table("db", "MAIN", "gen").await.expect("schema MAIN");
    assert_eq!(upper.table.as_ref().map(|t| t.schema.as_str()), Some("main"));
    let listed = client.list_tables("db", "MAIN").await.expect("tables of MAIN");
    assert!(listed.iter().any(|t| t.name == "gen"), "{listed:?}");
    // A virtual (full-text) table is listed and described.
    let tables = client.list_tables("db", "").await.expect("tables");
    assert!(tables.iter().any(|t| t.name == "notes"), "{tables:?}");
    let notes = client.describe_table("db", "", "notes").await.expect("virtual table");
    assert_eq!(names(&notes), ["body"]);
    // REFERENCES without columns means the parent's primary key.
    let child = client.describe_table("db", "", "child").await.expect("describe");
    assert_eq!(child.foreign_keys[0].referenced_columns, ["x", "y"]);
    // Errors get the codes PostgreSQL's get.
    for (sql, code, engine) in [
        ("SELECT no_such_function(1)", Code::NotFound, "1"),
        ("INSERT INTO strict_t VALUES ('abc')", Code::InvalidArgument, "3091"),
        (
            "INSERT INTO plain (rowid, x) VALUES (1, 1), (1, 2)",
            Code::AlreadyExists,
            "2579",
        ),
    ] {
        let err = client.execute("db", sql, vec![]).await.expect_err(sql);
        assert_eq!(
            (err.code(), engine_code(&err).as_str()),
            (code, engine),
            "{sql}: {err:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn no_tenant_can_change_sqlite_for_the_whole_process() {
    let server = TestServer::start(&two_tenants()).await;
    let alpha = server.client("key-alpha").await;
    let beta = server.client("key-beta").await;
    // hard_heap_limit can only be lowered: one tenant would leave every
    // SQLite statement of every tenant out of memory until a restart.
    // An exclusive lock or a rollback journal would block the source's
    // other connections (its other callers) for good or while one reads.
    for sql in [
        "PRAGMA hard_heap_limit = 1",
        "PRAGMA main.soft_heap_limit = 1",
        "PRAGMA temp_store_directory = '/tmp'",
        "PRAGMA locking_mode = EXCLUSIVE",
        "PRAGMA journal_mode = DELETE",
        "PRAGMA main.journal_mode = 'truncate'",
    ] {
        let err = alpha.execute("shop", sql, vec![]).await.expect_err(sql);
        assert_eq!(err.code(), Code::PermissionDenied, "{sql}: {err:?}");
        assert_eq!(engine_code(&err), "23", "{sql}: SQLITE_AUTH");
    }
    // Reading them, and per-connection pragmas, are allowed.
    alpha
        .execute("shop", "PRAGMA hard_heap_limit", vec![])
        .await
        .expect("read");
    for sql in [
        "PRAGMA cache_size = 100",
        "PRAGMA journal_mode = WAL",
        "PRAGMA locking_mode",
    ] {
        alpha.execute("shop", sql, vec![]).await.expect(sql);
    }
    let counted = beta
        .execute("crm", "SELECT count(*) FROM customers", vec![])
        .await
        .expect("the other tenant is served");
    assert_eq!(int(&counted.rows[0].values[0]), 500);
    // One value cannot take the process's memory.
    let err = alpha
        .execute("shop", "SELECT zeroblob(200000000)", vec![])
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(engine_code(&err), "18", "SQLITE_TOOBIG");
    server.stop().await;
}

#[tokio::test]
async fn an_abandoned_sqlite_write_waiting_for_the_lock_never_commits() {
    let (server, client, tx) = sqlite_transaction_holding("waits").await;
    // Waits for the lock, and its caller leaves before it comes.
    let err = execute_within(
        &client,
        &[],
        "db",
        "INSERT INTO waits VALUES (42)",
        Duration::from_millis(300),
    )
    .await
    .expect_err("the lock is held past the deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.rollback(&tx).await.expect("rollback frees the lock");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = client
        .execute("db", "SELECT count(*) FROM waits WHERE x = 42", vec![])
        .await
        .expect("count");
    assert_eq!(int(&left.rows[0].values[0]), 0, "the abandoned write did not commit");
    server.stop().await;
}

#[tokio::test]
async fn sqlite_writers_waiting_for_the_lock_leave_connections_to_readers() {
    let source = format!(
        "{}[tenants.t.sources.db.pool]\nmax_size = 3\nacquire_timeout = \"1s\"\n",
        sqlite_demo("t", "db")
    );
    let server = TestServer::start(&tenant("t", "", &source)).await;
    let client = server.client("key-t").await;
    client
        .execute("db", "CREATE TABLE queued (x INTEGER)", vec![])
        .await
        .expect("table");
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("a read-write transaction takes the write lock");
    // Two writers wait behind it; before, each held a connection meanwhile.
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .execute("db", &format!("INSERT INTO queued VALUES ({i})"), vec![])
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = client
        .execute("db", "SELECT count(*) FROM customers", vec![])
        .await
        .expect("a reader gets a connection while writers wait");
    assert_eq!(int(&read.rows[0].values[0]), 500);
    client.commit(&tx).await.expect("commit");
    for w in writers {
        w.await
            .expect("task")
            .expect("each writer's turn comes after the commit");
    }
    let n = client
        .execute("db", "SELECT count(*) FROM queued", vec![])
        .await
        .expect("count");
    assert_eq!(int(&n.rows[0].values[0]), 2);
    server.stop().await;
}

#[tokio::test]
async fn sqlite_writers_behind_one_waiting_for_a_connection_are_told_the_pool_is_full() {
    let source = format!(
        "{}[tenants.t.sources.db.pool]\nmax_size = 2\nacquire_timeout = \"8s\"\n",
        sqlite_demo("t", "db")
    );
    let server = TestServer::start(&tenant("t", "", &source)).await;
    let client = server.client("key-t").await;
    client
        .execute("db", "CREATE TABLE full_pool (x INTEGER)", vec![])
        .await
        .expect("table");
    // Read-only transactions hold every connection, and no write turn.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let tx = client
            .begin("db", IsolationLevel::Unspecified, true)
            .await
            .expect("a read-only transaction");
        readers.push(tx);
    }
    // One writer takes the turn and waits for a connection; the other
    // waits for the turn, and gives up after 5 s.
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .execute("db", &format!("INSERT INTO full_pool VALUES ({i})"), vec![])
                    .await
            })
        })
        .collect();
    let (first, _, waiting) = futures::future::select_all(writers).await;
    let err = first.expect("task").expect_err("no connection came within 5 s");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::ResourceExhausted, "POOL_EXHAUSTED"),
        "a full pool, not a write, held it: {err:?}"
    );
    for tx in &readers {
        client.rollback(tx).await.expect("rollback");
    }
    for w in waiting {
        w.await
            .expect("task")
            .expect("the writer holding the turn gets a connection once a reader ends");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_sqlite_writer_whose_turn_does_not_come_is_told_after_five_seconds() {
    let (server, client, tx) = sqlite_transaction_holding("held").await;
    let started = std::time::Instant::now();
    let err = client
        .execute("db", "INSERT INTO held VALUES (2)", vec![])
        .await
        .expect_err("the transaction keeps the write turn");
    assert!(started.elapsed() >= Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::Aborted, "5"),
        "{err:?}"
    );
    // The pool served others meanwhile, and the turn comes once the transaction ends.
    client.rollback(&tx).await.expect("rollback");
    client
        .execute("db", "INSERT INTO held VALUES (3)", vec![])
        .await
        .expect("the turn is free again");
    server.stop().await;
}

#[tokio::test]
async fn a_read_only_sqlite_source_writes_nothing_to_its_file() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("kept.db");
    {
        let conn = rusqlite::Connection::open(&file).expect("create");
        conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (7);")
            .expect("fill");
    }
    let source = |path: &std::path::Path| {
        format!(
            "[tenants.r.sources.ro]\nengine = \"sqlite\"\npath = \"{}\"\nread_only = true\n",
            path.display()
        )
    };
    let server = TestServer::start(&tenant("r", "", &source(&file))).await;
    let client = server.client("key-r").await;
    let seven = client.execute("ro", "SELECT x FROM t", vec![]).await.expect("read");
    assert_eq!(int(&seven.rows[0].values[0]), 7);
    server.stop().await;
    let mode: String = rusqlite::Connection::open(&file)
        .expect("open")
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal mode");
    assert_eq!(mode, "delete", "the journal mode was not changed");
    // A missing file is an error, not a new empty database.
    let missing = dir.path().join("typo.db");
    let config = weir_server::Config::from_toml(&tenant("r", "", &source(&missing))).expect("config");
    let refused = weir_server::backend::connect("ro", &config.tenants["r"].sources["ro"], None);
    assert!(refused.is_err(), "a missing read-only file is refused");
    assert!(!missing.exists(), "and not created");
    // So is a file that is not a database (which SQLite opens all the same).
    let garbage = dir.path().join("not-a-database.db");
    std::fs::write(&garbage, "not a database. ".repeat(256)).expect("write");
    let config = weir_server::Config::from_toml(&tenant("r", "", &source(&garbage))).expect("config");
    let refused = weir_server::backend::connect("ro", &config.tenants["r"].sources["ro"], None);
    assert!(refused.is_err(), "a file that is not a database is refused");
    for (extra, key) in [("demo_data = true\n", "demo_data"), ("", "path")] {
        let toml = if key == "path" {
            tenant(
                "r",
                "",
                "[tenants.r.sources.ro]\nengine = \"sqlite\"\npath = \":memory:\"\nread_only = true\n",
            )
        } else {
            tenant("r", "", &format!("{}{extra}", source(&file)))
        };
        let err = weir_server::Config::from_toml(&toml).expect_err(key).to_string();
        assert!(err.contains(&format!("sources.ro.{key}")), "{err}");
    }
}

#[tokio::test]
async fn a_sqlite_wal_grown_by_one_big_write_is_cut_back() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("big.db");
    let source = format!(
        "[tenants.w.sources.db]\nengine = \"sqlite\"\npath = \"{}\"\n",
        file.display()
    );
    let server = TestServer::start(&tenant("w", "", &source)).await;
    let client = server.client("key-w").await;
    client
        .execute("db", "CREATE TABLE t (b BLOB)", vec![])
        .await
        .expect("create");
    // 100 MB in one transaction: the WAL holds all of it until a checkpoint.
    client
        .execute(
            "db",
            "INSERT INTO t SELECT randomblob(1000000) FROM \
             (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100) SELECT x FROM c)",
            vec![],
        )
        .await
        .expect("big write");
    let wal = dir.path().join("big.db-wal");
    let size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(size() > 100_000_000, "the WAL took the write: {}", size());
    // Its commit checkpointed it; the next writes restart the WAL and cut it back.
    for _ in 0..2 {
        client
            .execute("db", "DELETE FROM t WHERE rowid = 1", vec![])
            .await
            .expect("small write");
    }
    assert!(size() <= 64 << 20, "the WAL kept {} bytes", size());
    server.stop().await;
}

#[tokio::test]
async fn a_compressed_request_that_expands_past_the_limit_is_refused() {
    use tonic::codec::CompressionEncoding::{Gzip, Zstd};
    let shop = tenant("alpha", "", &sqlite_demo("alpha", "shop"));
    let server = TestServer::start(&format!("[server]\nmax_request_bytes = 65536\n{shop}")).await;
    let client = server.client("key-alpha").await;
    // A megabyte of blanks: about a kilobyte on the wire, 16 times the limit once expanded.
    let request = |blanks: usize| pb::ExecuteRequest {
        source: "shop".into(),
        sql: format!("SELECT 1{}", " ".repeat(blanks)),
        ..Default::default()
    };
    for encoding in [Gzip, Zstd] {
        let refused = client
            .query()
            .send_compressed(encoding)
            .execute(request(1 << 20))
            .await
            .expect_err("past the limit");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{encoding:?}: {refused:?}"
        );
        assert!(refused.message().contains("65536"), "{refused:?}");
    }
    // The same request, small enough once expanded, is served.
    let served = client
        .query()
        .send_compressed(Gzip)
        .execute(request(1 << 14))
        .await
        .expect("served");
    assert_eq!(served.into_inner().rows.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn responses_are_compressed_when_configured_and_requests_always_may_be() {
    use tonic::codec::CompressionEncoding::{self, Gzip, Zstd};
    let sql = "SELECT o.id, c.name, c.email, o.status FROM orders o JOIN customers c ON c.id = o.customer_id";
    fn encoding_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
        metadata
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
    // Streams 3,000 rows and reads one unary row, the client accepting
    // `accepts` and compressing its requests with it; the answers' encoding.
    async fn call(
        client: &weir_client::WeirClient,
        sql: &str,
        accepts: CompressionEncoding,
    ) -> (Option<String>, Option<String>) {
        // Accepting only that encoding (a `WeirClient` accepts both).
        let mut query = client
            .uncompressed()
            .query()
            .accept_compressed(accepts)
            .send_compressed(accepts);
        let request = pb::ExecuteStreamRequest {
            source: "shop".into(),
            sql: sql.into(),
            ..Default::default()
        };
        let response = query.execute_stream(request).await.expect("stream");
        let streamed = encoding_of(response.metadata());
        let mut stream = response.into_inner();
        let mut rows = 0;
        while let Some(message) = stream.message().await.expect("message") {
            if let Some(pb::execute_stream_response::Payload::Batch(batch)) = message.payload {
                rows += batch.rows.len();
            }
        }
        assert_eq!(rows, 3000);
        let one = format!("{sql} ORDER BY o.id LIMIT 1");
        let plain = client.execute("shop", &one, vec![]).await.expect("plain");
        let unary = query
            .execute(pb::ExecuteRequest {
                source: "shop".into(),
                sql: one,
                ..Default::default()
            })
            .await
            .expect("unary");
        let answered = encoding_of(unary.metadata());
        assert_eq!(unary.into_inner().rows, plain.rows);
        (streamed, answered)
    }
    let shop = tenant("alpha", "", &sqlite_demo("alpha", "shop"));
    for (setting, gzip, zstd) in [
        // Off by default; compressed requests are taken all the same.
        ("", None, None),
        ("[server]\ncompression = \"gzip\"\n", Some("gzip"), None),
        ("[server]\ncompression = \"zstd\"\n", None, Some("zstd")),
    ] {
        let server = TestServer::start(&format!("{setting}{shop}")).await;
        let client = server.client("key-alpha").await;
        for (accepts, want) in [(Gzip, gzip), (Zstd, zstd)] {
            let want = want.map(str::to_owned);
            assert_eq!(
                call(&client, sql, accepts).await,
                (want.clone(), want),
                "{setting} {accepts:?}"
            );
        }
        // A client that accepts nothing gets plain answers.
        let request = pb::ExecuteStreamRequest {
            source: "shop".into(),
            sql: sql.into(),
            ..Default::default()
        };
        let response = client
            .uncompressed()
            .query()
            .execute_stream(request)
            .await
            .expect("plain stream");
        assert_eq!(encoding_of(response.metadata()), None);
        server.stop().await;
    }
}

/// A ListTables that can never succeed (a negative page size, a page token
/// that is no token) is INVALID_ARGUMENT before its source is looked up or
/// a gateway slot waited for: not SOURCE_NOT_FOUND for a typo'd source, nor
/// GATEWAY_SATURATED with a retry hint when the gateway is busy.
#[tokio::test]
async fn a_list_tables_request_that_cannot_succeed_is_refused_first() {
    let server = TestServer::start(&tenant("lt", "", &sqlite_demo("lt", "shop"))).await;
    let client = server.client("key-lt").await;
    for (page_size, page_token) in [(-1, ""), (10, "not a token")] {
        let err = client
            .schema()
            .list_tables(pb::ListTablesRequest {
                source: "no_such_source".into(),
                schema: String::new(),
                page_size,
                page_token: page_token.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{page_size} {page_token:?}: {err:?}"
        );
    }
    server.stop().await;
}

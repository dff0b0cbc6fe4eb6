//! The gateway in front of a real PostgreSQL: every type, parameters,
//! transactions, cancellation, timeouts, schema and engine errors.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use weir_client::arrow_ipc::reader::StreamReader;
use weir_client::arrow_schema::DataType;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;
use weir_client::weir_proto::v1::IsolationLevel;

fn config(limits: &str) -> String {
    let mut toml = tenant(
        "acme",
        limits,
        &postgres("acme", "pg", "[tenants.acme.sources.pg.pool]\nmax_size = 4\n"),
    );
    toml.push_str(&tenant("other", "", &sqlite_demo("other", "lite")));
    toml
}

async fn setup(sql: &str) {
    pg_direct().await.batch_execute(sql).await.expect("setup SQL");
}

fn kind(v: &pb::Value) -> &Kind {
    v.kind.as_ref().expect("value kind set")
}

#[tokio::test]
async fn every_type_maps_to_a_value() {
    setup(
        "DROP TABLE IF EXISTS weir_types; DROP TYPE IF EXISTS weir_mood; DROP DOMAIN IF EXISTS weir_positive;
         CREATE TYPE weir_mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN weir_positive AS int4 CHECK (VALUE > 0);
         CREATE TABLE weir_types (
            b bool, i2 int2, i4 int4, i8 int8, n numeric(12,4), n_big numeric, f4 float4, f8 float8,
            t text, vc varchar(10), c char(3), by bytea, d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz,
            iv interval, u uuid, j json, jb jsonb, ai int4[], at text[], a2 int8[][], e weir_mood, dom weir_positive,
            o oid, ip inet, nul int4);
         INSERT INTO weir_types VALUES (
            true, -32768, 2147483647, -9223372036854775808, 12345678.9012, 123456789012345678901234567890.123456789,
            1.5, 2.25, 'héllo', 'short', 'ab', '\\x00ff10', '2024-02-29', '23:59:59.5', '10:00:00+02', '2024-01-02 03:04:05.678901',
            '2024-01-02 03:04:05+00', '1 year 2 months 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{\"a\": [1, 2]}', '{\"b\": null}', '{1,NULL,3}', '{\"x,y\",\"q\\\"z\"}', '{{1,2},{3,4}}', 'happy', 7,
            42, '192.168.0.1/24', NULL);",
    )
    .await;
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    let r = client
        .execute("pg", "SELECT * FROM weir_types", vec![])
        .await
        .expect("select every type");
    let v = &r.rows[0].values;
    let col = |name: &str| r.columns.iter().position(|c| c.name == name).expect(name);
    let at = |name: &str| kind(&v[col(name)]);

    assert_eq!(at("b"), &Kind::BoolValue(true));
    assert_eq!(at("i2"), &Kind::Int64Value(-32768));
    assert_eq!(at("i4"), &Kind::Int64Value(2147483647));
    assert_eq!(at("i8"), &Kind::Int64Value(i64::MIN));
    assert_eq!(at("n"), &Kind::DecimalValue("12345678.9012".into()));
    assert_eq!(
        at("n_big"),
        &Kind::DecimalValue("123456789012345678901234567890.123456789".into())
    );
    assert_eq!(at("f4"), &Kind::DoubleValue(1.5));
    assert_eq!(at("f8"), &Kind::DoubleValue(2.25));
    assert_eq!(at("t"), &Kind::StringValue("héllo".into()));
    assert_eq!(at("vc"), &Kind::StringValue("short".into()));
    assert_eq!(at("c"), &Kind::StringValue("ab ".into()));
    assert_eq!(at("by"), &Kind::BytesValue(vec![0, 255, 16]));
    assert_eq!(
        at("d"),
        &Kind::DateValue(pb::Date {
            year: 2024,
            month: 2,
            day: 29
        })
    );
    assert_eq!(
        at("tm"),
        &Kind::TimeValue(pb::TimeOfDay {
            hours: 23,
            minutes: 59,
            seconds: 59,
            nanos: 500_000_000,
            utc_offset_seconds: None
        })
    );
    assert_eq!(
        at("tmtz"),
        &Kind::TimeValue(pb::TimeOfDay {
            hours: 10,
            minutes: 0,
            seconds: 0,
            nanos: 0,
            utc_offset_seconds: Some(7200)
        })
    );
    assert_eq!(
        at("ts"),
        &Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_704_164_645,
            nanos: 678_901_000
        })
    );
    assert_eq!(
        at("tstz"),
        &Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_704_164_645,
            nanos: 0
        })
    );
    assert_eq!(
        at("iv"),
        &Kind::IntervalValue(pb::Interval {
            months: 14,
            days: 3,
            microseconds: 14_706_500_000
        })
    );
    assert_eq!(at("u"), &Kind::UuidValue("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into()));
    assert_eq!(at("j"), &Kind::JsonValue("{\"a\": [1, 2]}".into()));
    assert_eq!(at("jb"), &Kind::JsonValue("{\"b\": null}".into()));
    let list = |values: Vec<Kind>| {
        Kind::ListValue(pb::ListValue {
            values: values.into_iter().map(|k| pb::Value { kind: Some(k) }).collect(),
        })
    };
    assert_eq!(
        at("ai"),
        &list(vec![Kind::Int64Value(1), Kind::Null(true), Kind::Int64Value(3)])
    );
    assert_eq!(
        at("at"),
        &list(vec![Kind::StringValue("x,y".into()), Kind::StringValue("q\"z".into())])
    );
    assert_eq!(
        at("a2"),
        &list(vec![
            list(vec![Kind::Int64Value(1), Kind::Int64Value(2)]),
            list(vec![Kind::Int64Value(3), Kind::Int64Value(4)])
        ])
    );
    assert_eq!(at("e"), &Kind::StringValue("happy".into()));
    assert_eq!(at("dom"), &Kind::Int64Value(7));
    assert_eq!(at("o"), &Kind::Int64Value(42));
    assert_eq!(at("ip"), &Kind::StringValue("192.168.0.1/24".into()));
    assert!(is_null(&v[col("nul")]));

    let meta = |name: &str| &r.columns[col(name)];
    assert_eq!(meta("n").r#type, pb::ColumnType::Decimal as i32);
    assert_eq!((meta("n").precision, meta("n").scale), (Some(12), Some(4)));
    assert_eq!(meta("vc").max_length, Some(10));
    assert_eq!(meta("tstz").r#type, pb::ColumnType::TimestampTz as i32);
    assert_eq!(meta("ts").r#type, pb::ColumnType::Timestamp as i32);
    assert_eq!(meta("ai").r#type, pb::ColumnType::List as i32);
    assert_eq!(meta("ai").element_type, pb::ColumnType::Int as i32);
    assert_eq!(meta("e").native_type, "weir_mood");

    // Types without a lossless mapping fail clearly, naming the column and a fix.
    let err = client
        .execute("pg", "SELECT int4range(1, 5) AS r", vec![])
        .await
        .expect_err("range type");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "UNSUPPORTED_TYPE");
    assert!(
        err.message().contains("\"r\"") && err.message().contains("::text"),
        "{}",
        err.message()
    );
    let ok = client
        .execute("pg", "SELECT int4range(1, 5)::text AS r", vec![])
        .await
        .expect("cast works");
    assert_eq!(text(&ok.rows[0].values[0]), "[1,5)");
    // Infinity cannot become a Timestamp: a clear error, not a wrong value.
    let err = client
        .execute("pg", "SELECT 'infinity'::timestamptz", vec![])
        .await
        .expect_err("infinite timestamp");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("infinite"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn parameters_are_bound_by_the_engine() {
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    let ts = pb::Value {
        kind: Some(Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5_000,
        })),
    };
    let date = pb::Value {
        kind: Some(Kind::DateValue(pb::Date {
            year: 1999,
            month: 12,
            day: 31,
        })),
    };
    let dec = pb::Value {
        kind: Some(Kind::DecimalValue("-0.000123".into())),
    };
    let uuid = pb::Value {
        kind: Some(Kind::UuidValue("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into())),
    };
    let json = pb::Value {
        kind: Some(Kind::JsonValue("{\"k\": 1}".into())),
    };
    let arr = pb::Value {
        kind: Some(Kind::ListValue(pb::ListValue {
            values: vec!["a\"b".into(), pb::Value::null(), "c".into()],
        })),
    };
    let r = client
        .execute(
            "pg",
            "SELECT $1::int4 + 1, $2::numeric * 2, $3::timestamptz, $4::date, $5::uuid, $6::jsonb -> 'k', $7::text[], $8::bytea, $9::bool, $10::text IS NULL, $11::float8",
            vec![41i64.into(), dec, ts, date, uuid, json, arr, vec![0u8, 1, 2].into(), true.into(), pb::Value::null(), 0.5f64.into()],
        )
        .await
        .expect("typed parameters");
    let v = &r.rows[0].values;
    assert_eq!(int(&v[0]), 42);
    assert_eq!(kind(&v[1]), &Kind::DecimalValue("-0.000246".into()));
    assert_eq!(
        kind(&v[2]),
        &Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5_000
        })
    );
    assert_eq!(
        kind(&v[3]),
        &Kind::DateValue(pb::Date {
            year: 1999,
            month: 12,
            day: 31
        })
    );
    assert_eq!(
        kind(&v[4]),
        &Kind::UuidValue("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into())
    );
    assert_eq!(kind(&v[5]), &Kind::JsonValue("1".into()));
    let Kind::ListValue(list) = kind(&v[6]) else {
        panic!("text[] is a list")
    };
    assert_eq!(text(&list.values[0]), "a\"b");
    assert!(is_null(&list.values[1]));
    assert_eq!(kind(&v[7]), &Kind::BytesValue(vec![0, 1, 2]));
    assert_eq!(kind(&v[8]), &Kind::BoolValue(true));
    assert_eq!(kind(&v[9]), &Kind::BoolValue(true));
    assert_eq!(kind(&v[10]), &Kind::DoubleValue(0.5));

    // Bytes where text is expected would be stored as the literal "\x0102".
    let err = client
        .execute("pg", "SELECT $1::text", vec![vec![1u8, 2].into()])
        .await
        .expect_err("bytes for text");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("$1::bytea"), "{err:?}");

    // A parameter is data, never SQL.
    let hostile = "1; DROP TABLE weir_types; --";
    let r = client
        .execute("pg", "SELECT $1::text", vec![hostile.into()])
        .await
        .expect("bound as text");
    assert_eq!(text(&r.rows[0].values[0]), hostile);

    let err = client
        .execute("pg", "SELECT $1::int4", vec!["forty-two".into()])
        .await
        .expect_err("not an int");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(engine_code(&err), "22P02");
    let err = client
        .execute("pg", "SELECT $1::int4, $2::int4", vec![1i64.into()])
        .await
        .expect_err("too few");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("2 parameter"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn engine_errors_keep_their_sqlstate() {
    use tonic_types::StatusExt;
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    let err = client.execute("pg", "selec 1", vec![]).await.expect_err("syntax");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::InvalidArgument, "42601")
    );
    assert!(err.message().contains("42601"));
    let err = client
        .execute("pg", "SELECT * FROM weir_missing_table", vec![])
        .await
        .expect_err("unknown table");
    assert_eq!((err.code(), engine_code(&err).as_str()), (Code::NotFound, "42P01"));
    let err = client
        .execute("pg", "SELECT 1/0", vec![])
        .await
        .expect_err("division by zero");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::InvalidArgument, "22012")
    );
    setup("DROP TABLE IF EXISTS weir_unique; CREATE TABLE weir_unique (id int PRIMARY KEY); INSERT INTO weir_unique VALUES (1);").await;
    let err = client
        .execute("pg", "INSERT INTO weir_unique VALUES (1)", vec![])
        .await
        .expect_err("duplicate key");
    assert_eq!((err.code(), engine_code(&err).as_str()), (Code::AlreadyExists, "23505"));
    // A database or an authorization a statement names is the statement's
    // error, not a refused login of Weir's (UNAVAILABLE, retried for ever).
    for (sql, code, state) in [
        ("SELECT pg_database_size('weir_no_such_db')", Code::NotFound, "3D000"),
        (
            "DO $$BEGIN RAISE EXCEPTION 'not yours' USING ERRCODE = '28000'; END$$",
            Code::PermissionDenied,
            "28000",
        ),
    ] {
        let err = client.execute("pg", sql, vec![]).await.expect_err(sql);
        assert_eq!(
            (err.code(), engine_code(&err).as_str()),
            (code, state),
            "{sql}: {err:?}"
        );
    }
    // Errors mid-stream arrive as the stream's status.
    let mut stream = client
        .execute_stream("pg", "SELECT 10 / (5000 - g) FROM generate_series(1, 10000) g", vec![])
        .await
        .expect("stream starts");
    let err = loop {
        match stream.next_batch().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream should fail"),
            Err(e) => break e,
        }
    };
    assert_eq!(engine_code(&err), "22012");
    // An engine busy for now says when to try again; one out of disk does
    // not, since waiting will not free it.
    let raise = |sqlstate: &str| format!("DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{sqlstate}'; END $$");
    let busy = client
        .execute("pg", &raise("53300"), vec![])
        .await
        .expect_err("too many connections");
    assert_eq!(
        (busy.code(), engine_code(&busy).as_str()),
        (Code::ResourceExhausted, "53300")
    );
    assert_eq!(
        busy.get_error_details().retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1)),
        "{busy:?}"
    );
    let full = client
        .execute("pg", &raise("53100"), vec![])
        .await
        .expect_err("disk full");
    assert_eq!(
        (full.code(), engine_code(&full).as_str()),
        (Code::ResourceExhausted, "53100")
    );
    assert!(full.get_error_details().retry_info().is_none(), "{full:?}");
    // The connection pool is unharmed.
    assert_serves(&client, "pg", 1).await;
    server.stop().await;
}

#[tokio::test]
async fn streamed_rows_are_the_rows_of_execute() {
    // ExecuteStream encodes rows as they arrive, with text lent straight from
    // the driver's buffer; Execute builds messages. Both must say the same.
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    let sql = "SELECT g, 'héllo ' || g AS t, ('v' || g)::varchar(10) AS v, 'x'::char(3) AS c, \
               'pg_class'::name AS n, CASE WHEN g % 2 = 0 THEN NULL ELSE 'odd' END AS maybe, '' AS empty, \
               g::numeric / 3 AS d, '2024-01-02 03:04:05+00'::timestamptz AS ts, ARRAY['a', NULL] AS arr, \
               '{\"k\": 1}'::jsonb AS j, NULL::text AS nothing \
               FROM generate_series(1, 2500) g ORDER BY g";
    let unary = client.execute("pg", sql, vec![]).await.expect("execute");
    let mut stream = client.execute_stream("pg", sql, vec![]).await.expect("stream");
    let mut streamed = Vec::new();
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        streamed.extend(batch);
    }
    assert_eq!(streamed.len(), 2500);
    assert_eq!(text(&streamed[0].values[1]), "héllo 1");
    assert_eq!(streamed, unary.rows);
    // Read in wire form, value by value, the rows are the same too.
    let mut raw = client.execute_stream_raw("pg", sql, vec![]).await.expect("raw stream");
    assert_eq!(raw.columns(), stream.columns());
    let mut read = Vec::new();
    while let Some(batch) = raw.next_batch().await.expect("batch") {
        for row in batch.iter() {
            let values = row.expect("row").values().map(|v| v.expect("value").to_value());
            read.push(pb::Row {
                values: values.collect(),
            });
        }
    }
    assert_eq!(read, unary.rows);
    assert_eq!(raw.stats().map(|s| s.rows_returned), Some(2500));
    // A value that cannot be decoded mid-stream ends the stream with an
    // error naming its column, after the rows before it; the pool is unharmed.
    let mut stream = client
        .execute_stream(
            "pg",
            "SELECT g, CASE WHEN g = 1500 THEN 'infinity'::date ELSE DATE '2024-01-01' END AS day \
             FROM generate_series(1, 2000) g ORDER BY g",
            vec![],
        )
        .await
        .expect("stream starts");
    let mut before = 0;
    let err = loop {
        match stream.next_batch().await {
            Ok(Some(batch)) => before += batch.len(),
            Ok(None) => panic!("the stream should fail"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("\"day\"") && err.message().contains("infinite"),
        "{}",
        err.message()
    );
    assert!(before < 1500, "{before} rows arrived before the bad one");
    assert_serves(&client, "pg", 1).await;
    server.stop().await;
}

/// PostgreSQL answers COMMIT of a transaction an error aborted with a
/// silent rollback: Commit says so (ABORTED, 25P02) instead of succeeding.
/// A transaction that rolled back to a savepoint past its error commits.
/// Statements that would end a transaction behind its handle are refused.
#[tokio::test]
async fn a_commit_after_a_failed_statement_says_the_transaction_was_rolled_back() {
    setup("DROP TABLE IF EXISTS weir_tx_failed; CREATE TABLE weir_tx_failed (id int PRIMARY KEY);").await;
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    let run = |tx: Vec<u8>, sql: &'static str| {
        let client = client.clone();
        async move { client.execute_in(&tx, "pg", sql, vec![]).await }
    };

    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    run(tx.clone(), "INSERT INTO weir_tx_failed VALUES (1)")
        .await
        .expect("insert");
    run(tx.clone(), "SELECT 1 / 0").await.expect_err("division by zero");
    let err = client
        .commit(&tx)
        .await
        .expect_err("an aborted transaction does not commit");
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert_eq!(engine_code(&err), "25P02");
    assert!(err.message().contains("rolled back"), "{}", err.message());

    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    run(tx.clone(), "INSERT INTO weir_tx_failed VALUES (2)")
        .await
        .expect("insert");
    run(tx.clone(), "SAVEPOINT s").await.expect("savepoint");
    run(tx.clone(), "SELECT 1 / 0").await.expect_err("division by zero");
    run(tx.clone(), "ROLLBACK TO SAVEPOINT s")
        .await
        .expect("back to the savepoint");
    client.commit(&tx).await.expect("commit");

    // Ending the transaction by statement would leave the handle behind.
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, true)
        .await
        .expect("read-only begin");
    for sql in ["COMMIT", "BEGIN READ WRITE", "ROLLBACK", "END"] {
        let err = run(tx.clone(), sql).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {}", err.message());
    }
    let err = run(tx.clone(), "INSERT INTO weir_tx_failed VALUES (3)")
        .await
        .expect_err("still the read-only transaction");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    client.rollback(&tx).await.expect("rollback");

    let rows = client
        .execute("pg", "SELECT id FROM weir_tx_failed ORDER BY id", vec![])
        .await
        .expect("rows");
    assert_eq!(rows.rows.iter().map(|r| int(&r.values[0])).collect::<Vec<_>>(), [2]);
    assert_serves(&client, "pg", 2).await;
    server.stop().await;
}

#[tokio::test]
async fn transactions_commit_roll_back_and_expire() {
    setup("DROP TABLE IF EXISTS weir_tx; CREATE TABLE weir_tx (id int PRIMARY KEY, note text);").await;
    let server = TestServer::start(&config("transaction_idle_timeout = \"1s\"")).await;
    let client = server.client("key-acme").await;

    let tx = client
        .begin("pg", IsolationLevel::RepeatableRead, false)
        .await
        .expect("begin");
    client
        .execute_in(
            &tx,
            "pg",
            "INSERT INTO weir_tx VALUES ($1, $2)",
            vec![1i64.into(), "rolled back".into()],
        )
        .await
        .expect("insert");
    let level = client
        .execute_in(&tx, "pg", "SHOW transaction_isolation", vec![])
        .await
        .expect("isolation");
    assert_eq!(text(&level.rows[0].values[0]), "repeatable read");
    let outside = client
        .execute("pg", "SELECT count(*) FROM weir_tx", vec![])
        .await
        .expect("outside");
    assert_eq!(
        int(&outside.rows[0].values[0]),
        0,
        "uncommitted rows are invisible outside"
    );
    client.rollback(&tx).await.expect("rollback");

    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "pg", "INSERT INTO weir_tx VALUES (2, 'kept')", vec![])
        .await
        .expect("insert");
    let mut stream = weir_client::ResultStream::new(
        client
            .query()
            .execute_stream(pb::ExecuteStreamRequest {
                transaction_id: tx.clone(),
                sql: "SELECT note FROM weir_tx".into(),
                ..Default::default()
            })
            .await
            .expect("stream in tx")
            .into_inner(),
    )
    .await
    .expect("metadata");
    let batch = stream.next_batch().await.expect("batch").expect("rows");
    assert_eq!(text(&batch[0].values[0]), "kept");
    while stream.next_batch().await.expect("drain").is_some() {}
    client.commit(&tx).await.expect("commit");
    let rows = client
        .execute("pg", "SELECT id FROM weir_tx ORDER BY id", vec![])
        .await
        .expect("after commit");
    assert_eq!(rows.rows.iter().map(|r| int(&r.values[0])).collect::<Vec<_>>(), [2]);

    let tx = client
        .begin("pg", IsolationLevel::Unspecified, true)
        .await
        .expect("read-only");
    let err = client
        .execute_in(&tx, "pg", "DELETE FROM weir_tx", vec![])
        .await
        .expect_err("read-only");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::PermissionDenied, "25006")
    );
    client.rollback(&tx).await.expect("rollback");

    // An idle transaction is rolled back and its connection returned.
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "pg", "INSERT INTO weir_tx VALUES (3, 'abandoned')", vec![])
        .await
        .expect("insert");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let err = client
        .execute_in(&tx, "pg", "SELECT 1", vec![])
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::NotFound);
    let rows = client
        .execute("pg", "SELECT count(*) FROM weir_tx WHERE id = 3", vec![])
        .await
        .expect("count");
    assert_eq!(int(&rows.rows[0].values[0]), 0);
    let pg = pg_direct().await;
    let idle_in_tx: i64 = pg
        // This test's sessions only (their last statement names weir_tx):
        // tests running beside it hold transactions of their own.
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' \
             AND state LIKE 'idle in transaction%' AND query ~ 'weir_tx\\M'",
            &[],
        )
        .await
        .expect("activity")
        .get(0);
    assert_eq!(idle_in_tx, 0, "no connection is left inside a transaction");
    server.stop().await;
}

#[tokio::test]
async fn cancelled_and_timed_out_statements_stop_in_the_engine() {
    let server = TestServer::start(&config("statement_timeout = \"1s\"")).await;
    let client = server.client("key-acme").await;
    let pg = pg_direct().await;

    // The tenant's statement timeout.
    let started = std::time::Instant::now();
    let err = client
        .execute("pg", "SELECT pg_sleep(30) AS timeout_probe", vec![])
        .await
        .expect_err("timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(reason(&err), "STATEMENT_TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        wait_until_gone(&pg, "timeout_probe", Duration::from_secs(5)).await,
        "statement still running after timeout"
    );

    // The caller's own deadline on a stream.
    let mut request = tonic::Request::new(pb::ExecuteStreamRequest {
        source: "pg".into(),
        sql: "SELECT pg_sleep(30) AS deadline_probe".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let outcome = async {
        let mut s = client.query().execute_stream(request).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    assert!(outcome.is_err(), "the deadline passes first");
    assert!(wait_until_gone(&pg, "deadline_probe", Duration::from_secs(5)).await);

    // Cancellation leaves every pooled connection usable.
    assert_serves(&client, "pg", 8).await;
    server.stop().await;
}

/// Source `name` of `tenant` logging in as the test's own role `user`
/// with `password` (made by the test), then `extra` lines.
fn role_source(tenant: &str, name: &str, user: &str, password: &str, extra: &str) -> String {
    let variable = format!("WEIR_TEST_{}_PASSWORD", user.to_ascii_uppercase());
    std::env::set_var(&variable, password);
    format!(
        "[tenants.{tenant}.sources.{name}]\nengine = \"postgres\"\nhost = \"{}\"\nport = {}\nuser = \"{user}\"\n\
         database = \"{}\"\npassword_env = \"{variable}\"\n{extra}",
        env_or("WEIR_TEST_PG_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_PG_PORT", "5432"),
        env_or("WEIR_TEST_PG_DATABASE", "test"),
    )
}

/// A source's role sees only the schemas it may use and the tables it has
/// a privilege on: tenants that share a database, each with its own role,
/// do not see each other's tables.
#[tokio::test]
async fn schema_calls_show_only_what_the_sources_role_may_use() {
    setup(
        "DROP SCHEMA IF EXISTS weir_priv_open CASCADE; DROP SCHEMA IF EXISTS weir_priv_closed CASCADE;
         DROP SCHEMA IF EXISTS weir_priv_reader CASCADE; DROP ROLE IF EXISTS weir_priv_reader;
         CREATE ROLE weir_priv_reader LOGIN PASSWORD 'weir-priv-reader';
         CREATE SCHEMA weir_priv_reader AUTHORIZATION weir_priv_reader;
         ALTER ROLE weir_priv_reader SET search_path = \"$user\", weir_priv_open;
         CREATE SCHEMA weir_priv_open; CREATE SCHEMA weir_priv_closed;
         CREATE TABLE weir_priv_open.granted (id int); CREATE TABLE weir_priv_open.withheld (id int);
         CREATE TABLE weir_priv_open.one_column (id int, secret text PRIMARY KEY);
         CREATE UNIQUE INDEX one_column_id ON weir_priv_open.one_column (id);
         CREATE INDEX one_column_secret ON weir_priv_open.one_column (id, secret);
         CREATE INDEX one_column_expression ON weir_priv_open.one_column (lower(secret));
         CREATE TABLE weir_priv_closed.hidden (id int);
         GRANT USAGE ON SCHEMA weir_priv_open TO weir_priv_reader;
         GRANT SELECT ON weir_priv_open.granted TO weir_priv_reader;
         GRANT SELECT (id) ON weir_priv_open.one_column TO weir_priv_reader;",
    )
    .await;
    let source = role_source("acme", "limited", "weir_priv_reader", "weir-priv-reader", "");
    let server = TestServer::start(&tenant("acme", "", &source)).await;
    let client = server.client("key-acme").await;
    let schemas: Vec<String> = client
        .list_schemas("limited")
        .await
        .expect("schemas")
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(schemas.iter().any(|s| s == "weir_priv_open"), "{schemas:?}");
    assert!(!schemas.iter().any(|s| s == "weir_priv_closed"), "{schemas:?}");
    let tables: Vec<String> = client
        .list_tables("limited", "weir_priv_open")
        .await
        .expect("tables")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(tables, ["granted", "one_column"]);
    // A schema the role may not use is as one that is not there.
    for schema in ["weir_priv_closed", "weir_priv_nowhere"] {
        let err = client
            .list_tables("limited", schema)
            .await
            .expect_err("not the role's schema");
        assert_eq!(err.code(), Code::NotFound, "{schema}: {err:?}");
    }
    client
        .describe_table("limited", "weir_priv_open", "granted")
        .await
        .expect("a granted table");
    // Without a schema, where a query would find it: the role's search_path
    // (its own schema first, which does not hold it).
    let found = client
        .describe_table("limited", "", "granted")
        .await
        .expect("found along the search path");
    assert_eq!(found.table.as_ref().map(|t| t.schema.as_str()), Some("weir_priv_open"));
    // Columns the role holds no privilege on are not shown.
    let one = client
        .describe_table("limited", "weir_priv_open", "one_column")
        .await
        .expect("a table with one granted column");
    let names: Vec<_> = one
        .columns
        .iter()
        .filter_map(|c| c.column.as_ref().map(|c| c.name.as_str()))
        .collect();
    assert_eq!(names, ["id"]);
    // Nor are keys and indexes over them.
    assert_eq!(one.primary_key, None);
    let indexes: Vec<_> = one.indexes.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(indexes, ["one_column_id"]);
    for (schema, table) in [("weir_priv_open", "withheld"), ("weir_priv_closed", "hidden")] {
        let err = client
            .describe_table("limited", schema, table)
            .await
            .expect_err("not the role's");
        assert_eq!(err.code(), Code::NotFound, "{schema}.{table}: {}", err.message());
    }
    server.stop().await;
}

#[tokio::test]
async fn schema_calls_read_the_catalog() {
    setup(
        "DROP SCHEMA IF EXISTS weir_shop CASCADE; CREATE SCHEMA weir_shop;
         CREATE TABLE weir_shop.customers (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, credit numeric(10,2) DEFAULT 0);
         COMMENT ON TABLE weir_shop.customers IS 'people who buy';
         CREATE TABLE weir_shop.orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES weir_shop.customers(id) ON DELETE CASCADE, tags text[]);
         CREATE INDEX orders_by_customer ON weir_shop.orders (customer_id);
         CREATE VIEW weir_shop.big_customers AS SELECT * FROM weir_shop.customers WHERE credit > 100;
         INSERT INTO weir_shop.customers SELECT g, 'c' || g || '@x', g FROM generate_series(1, 500) g; ANALYZE weir_shop.customers;
         CREATE TABLE weir_shop.visits (at date NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE weir_shop.visits_2024 PARTITION OF weir_shop.visits FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE weir_shop.visits_2025 PARTITION OF weir_shop.visits FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO weir_shop.visits SELECT DATE '2024-06-01' + (g % 400) FROM generate_series(1, 300) g; ANALYZE weir_shop.visits;
         CREATE TABLE weir_shop.visits_2027 PARTITION OF weir_shop.visits FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');",
    )
    .await;
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;

    let sources = client.list_sources().await.expect("sources");
    assert_eq!(sources[0].engine, pb::Engine::Postgres as i32);
    let ping = client.test_connection("pg").await.expect("ping");
    assert!(
        ping.server_version.starts_with("PostgreSQL "),
        "{}",
        ping.server_version
    );
    assert!(!ping.database.is_empty() && !ping.user.is_empty());
    let sources = client.list_sources().await.expect("sources");
    assert!(sources[0].healthy && sources[0].server_version.starts_with("PostgreSQL"));

    let schemas = client.list_schemas("pg").await.expect("schemas");
    assert!(schemas.iter().any(|s| s.name == "weir_shop"));
    assert!(
        !schemas.iter().any(|s| s.name == "pg_catalog"),
        "system schemas are left out"
    );

    let tables = client.list_tables("pg", "weir_shop").await.expect("tables");
    let names: Vec<_> = tables.iter().map(|t| (t.name.as_str(), t.kind)).collect();
    assert_eq!(
        names,
        [
            ("big_customers", pb::TableKind::View as i32),
            ("customers", pb::TableKind::Table as i32),
            ("orders", pb::TableKind::Table as i32),
            ("visits", pb::TableKind::PartitionedTable as i32)
        ],
        "a partitioned table once, without its partitions"
    );
    // PostgreSQL's names are case-sensitive: another case is another schema.
    let err = client
        .list_tables("pg", "WEIR_SHOP")
        .await
        .expect_err("no schema WEIR_SHOP");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Also where the schema of that name in another case is empty: an empty
    // answer would pass the wrong name off as an empty schema.
    setup("DROP SCHEMA IF EXISTS weir_empty; CREATE SCHEMA weir_empty").await;
    assert!(client.list_tables("pg", "weir_empty").await.expect("empty").is_empty());
    let err = client
        .list_tables("pg", "WEIR_EMPTY")
        .await
        .expect_err("no schema WEIR_EMPTY");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let customers = &tables[1];
    assert_eq!(customers.row_estimate, Some(500));
    assert_eq!(
        tables[3].row_estimate,
        Some(300),
        "its partitions' rows (an empty one never analyzed holds none)"
    );
    assert_eq!(customers.comment, "people who buy");
    // Rows in a partition not analyzed yet (a new one, just loaded): the
    // partitions' sum is no estimate, so there is none, not a low one. (The
    // statistics counters tell such a partition, once the session that
    // loaded it has reported them: here at once.)
    setup(
        "CREATE TABLE weir_shop.visits_2026 PARTITION OF weir_shop.visits FOR VALUES FROM ('2026-01-01') TO ('2027-01-01') \
         WITH (autovacuum_enabled = off);
         INSERT INTO weir_shop.visits SELECT DATE '2026-01-01' + g FROM generate_series(1, 200) g;
         SELECT pg_stat_force_next_flush();",
    )
    .await;
    let tables = client.list_tables("pg", "weir_shop").await.expect("tables");
    assert_eq!(tables[3].row_estimate, None, "{:?}", tables[3]);

    let d = client
        .describe_table("pg", "weir_shop", "orders")
        .await
        .expect("describe");
    let cols: Vec<_> = d
        .columns
        .iter()
        .filter_map(|c| c.column.as_ref())
        .map(|c| (c.name.as_str(), c.native_type.as_str(), c.nullable))
        .collect();
    assert_eq!(
        cols,
        [
            ("id", "bigint", false),
            ("customer_id", "bigint", false),
            ("tags", "text[]", true)
        ]
    );
    assert!(d.columns[0].default_expression.starts_with("nextval("));
    assert_eq!(
        d.columns[2].column.as_ref().map(|c| (c.r#type, c.element_type)),
        Some((pb::ColumnType::List as i32, pb::ColumnType::String as i32))
    );
    assert_eq!(
        d.primary_key.as_ref().map(|p| p.columns.clone()),
        Some(vec!["id".to_string()])
    );
    let fk = &d.foreign_keys[0];
    assert_eq!(
        (
            fk.referenced_schema.as_str(),
            fk.referenced_table.as_str(),
            fk.on_delete.as_str()
        ),
        ("weir_shop", "customers", "CASCADE")
    );
    assert_eq!(fk.columns, ["customer_id"]);
    let idx = d
        .indexes
        .iter()
        .find(|i| i.name == "orders_by_customer")
        .expect("index");
    assert_eq!(
        (idx.columns.clone(), idx.unique, idx.method.as_str()),
        (vec!["customer_id".to_string()], false, "btree")
    );
    assert!(d.indexes.iter().any(|i| i.primary));
    assert!(d.change_streams.is_some());

    let d = client
        .describe_table("pg", "weir_shop", "customers")
        .await
        .expect("describe");
    let credit = d
        .columns
        .iter()
        .filter_map(|c| c.column.as_ref())
        .find(|c| c.name == "credit")
        .expect("credit");
    assert_eq!((credit.precision, credit.scale), (Some(10), Some(2)));
    assert!(d.indexes.iter().any(|i| i.unique && i.columns == ["email"]));

    let err = client
        .describe_table("pg", "weir_shop", "nope")
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = client.describe_table("pg", "", "").await.expect_err("no table");
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn read_only_sources_refuse_writes_in_the_engine() {
    let toml = tenant("ro", "", &postgres("ro", "pg", "read_only = true\n"));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-ro").await;
    let err = client
        .execute("pg", "CREATE TABLE weir_ro_probe (id int)", vec![])
        .await
        .expect_err("read-only source");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::PermissionDenied, "25006")
    );
    let r = client.execute("pg", "SELECT 1", vec![]).await.expect("reads work");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    // A DO block (or a procedure) that turns the read-only default off and
    // commits would write in the transaction after its COMMIT: in Weir's
    // read-only block it cannot commit.
    let pg = pg_direct().await;
    pg.batch_execute(
        "DROP TABLE IF EXISTS weir_ro_target; CREATE TABLE weir_ro_target (id int); \
         CREATE OR REPLACE PROCEDURE weir_ro_escape() LANGUAGE plpgsql AS $$ BEGIN \
           SET default_transaction_read_only = off; COMMIT; INSERT INTO weir_ro_target VALUES (2); END $$",
    )
    .await
    .expect("setup");
    for sql in [
        "DO $$ BEGIN SET default_transaction_read_only = off; COMMIT; \
         INSERT INTO weir_ro_target VALUES (1); END $$",
        "CALL weir_ro_escape()",
    ] {
        let err = client
            .execute("pg", sql, vec![])
            .await
            .expect_err("no write through a read-only source");
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(err.message().contains("read-only transaction"), "{}", err.message());
        // In a read-only transaction it runs, atomically: its COMMIT is refused.
        let tx = client
            .begin("pg", pb::IsolationLevel::Unspecified, true)
            .await
            .expect("begin read-only");
        client
            .execute_in(&tx, "pg", sql, vec![])
            .await
            .expect_err("cannot commit inside a transaction block");
        let _ = client.rollback(&tx).await;
    }
    // Later statements on the same sessions are read-only as before, and nothing was written.
    let err = client
        .execute("pg", "INSERT INTO weir_ro_target VALUES (3)", vec![])
        .await
        .expect_err("still read-only");
    assert_eq!(engine_code(&err), "25006", "{err:?}");
    let written: i64 = pg
        .query_one("SELECT count(*) FROM weir_ro_target", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(written, 0);
    pg.batch_execute("DROP TABLE weir_ro_target; DROP PROCEDURE weir_ro_escape()")
        .await
        .expect("drop");
    server.stop().await;
}

/// A caller's DISCARD ALL or DEALLOCATE ALL drops every statement the
/// session had prepared, the driver's own lookups of user-defined types
/// among them: later calls prepare theirs again instead of failing with
/// 26000 (prepared statement does not exist), also for a type not met yet.
#[tokio::test]
async fn a_discard_all_does_not_break_the_sessions_statement_cache() {
    pg_direct()
        .await
        .batch_execute(
            "DO $$ BEGIN \
               CREATE TYPE weir_dc_1 AS ENUM ('a'); CREATE TYPE weir_dc_2 AS ENUM ('b'); \
               CREATE TYPE weir_dc_3 AS ENUM ('c'); CREATE TYPE weir_dc_4 AS ENUM ('d'); \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await
        .expect("types");
    let toml = tenant(
        "dc",
        "",
        &postgres("dc", "pg", "[tenants.dc.sources.pg.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-dc").await;
    for (discard, seen, unseen) in [
        ("DISCARD ALL", "'a'::weir_dc_1", "'b'::weir_dc_2"),
        ("DEALLOCATE ALL", "'c'::weir_dc_3", "'d'::weir_dc_4"),
    ] {
        client.execute("pg", "SELECT 1 AS one", vec![]).await.expect("cached");
        // The driver looks the type up with statements of its own.
        client
            .execute("pg", &format!("SELECT {seen}"), vec![])
            .await
            .expect("a user-defined type");
        client.execute("pg", discard, vec![]).await.expect(discard);
        let unseen = client
            .execute("pg", &format!("SELECT {unseen}"), vec![])
            .await
            .unwrap_or_else(|e| panic!("a type not looked up before {discard}: {e:?}"));
        assert_eq!(unseen.rows.len(), 1);
        let again = client
            .execute("pg", "SELECT 1 AS one", vec![])
            .await
            .unwrap_or_else(|e| panic!("after {discard}: {e:?}"));
        assert_eq!(int(&again.rows[0].values[0]), 1);
    }
    server.stop().await;
}

/// A COPY to or from the client sent through Execute leaves the query
/// protocol: it is refused (INVALID_ARGUMENT, naming BulkLoadService), and
/// its session is closed rather than handed, mid-COPY, to the next caller,
/// who would hang for its whole deadline.
#[tokio::test]
async fn a_copy_through_execute_is_refused_and_leaves_no_session_behind() {
    let toml = tenant(
        "cp",
        "",
        &postgres("cp", "pg", "[tenants.cp.sources.pg.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-cp").await;
    let pg = pg_direct().await;
    pg.batch_execute("DROP TABLE IF EXISTS weir_copy_probe; CREATE TABLE weir_copy_probe (id int)")
        .await
        .expect("table");
    for sql in [
        "COPY weir_copy_probe FROM STDIN",
        "COPY (SELECT generate_series(1, 5000000)) TO STDOUT",
    ] {
        let err = client.execute("pg", sql, vec![]).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(err.message().contains("BulkLoadService"), "{}", err.message());
        // The one pooled session is usable at once by the next call.
        let next = tokio::time::timeout(Duration::from_secs(5), client.execute("pg", "SELECT 1", vec![]))
            .await
            .expect("the next call is not held up")
            .expect("the next call works");
        assert_eq!(int(&next.rows[0].values[0]), 1);
    }
    pg.batch_execute("DROP TABLE weir_copy_probe").await.expect("drop");
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_without_leaking_where() {
    let toml = tenant(
        "down",
        "",
        "[tenants.down.sources.pg]\nengine = \"postgres\"\nhost = \"127.0.0.1\"\nport = 1\nuser = \"secret_user\"\n[tenants.down.sources.pg.pool]\nconnect_timeout = \"1s\"\n",
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-down").await;
    let err = client
        .execute("pg", "SELECT 1", vec![])
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "SOURCE_UNAVAILABLE");
    for secret in ["127.0.0.1", "secret_user", ":1"] {
        assert!(
            !err.message().contains(secret),
            "message leaks {secret}: {}",
            err.message()
        );
    }
    let err = client.test_connection("pg").await.expect_err("ping fails");
    assert_eq!(err.code(), Code::Unavailable);
    let sources = client.list_sources().await.expect("listing still works");
    assert!(!sources[0].healthy);
    server.stop().await;
}

/// A database that is not there at login is the operator's to fix: the
/// caller gets UNAVAILABLE with the engine's code, never the database's name.
#[tokio::test]
async fn a_database_missing_at_login_is_unavailable_without_its_name() {
    let source = postgres("gone", "pg", "").replace(
        &format!("database = \"{}\"", env_or("WEIR_TEST_PG_DATABASE", "test")),
        "database = \"weir_no_such_database\"",
    );
    let server = TestServer::start(&tenant("gone", "", &source)).await;
    let client = server.client("key-gone").await;
    let err = client
        .execute("pg", "SELECT 1", vec![])
        .await
        .expect_err("no such database");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "SOURCE_UNAVAILABLE")
    );
    assert!(err.message().contains("engine code 3D000"), "{}", err.message());
    assert!(!err.message().contains("weir_no_such_database"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn a_callers_session_state_does_not_reach_the_next_caller() {
    pg_direct()
        .await
        .batch_execute("CREATE TABLE IF NOT EXISTS weir_session (id int); CREATE SEQUENCE IF NOT EXISTS weir_session_s")
        .await
        .expect("setup");
    let toml = tenant(
        "solo",
        "",
        &postgres("solo", "pg", "[tenants.solo.sources.pg.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-solo").await;
    let marker = i64::from(std::process::id());
    // A bare BEGIN outside a Weir transaction must not leave the pooled connection inside one.
    client
        .execute("pg", "BEGIN", vec![])
        .await
        .expect("begin as a statement");
    client
        .execute("pg", "INSERT INTO weir_session VALUES ($1)", vec![marker.into()])
        .await
        .expect("insert");
    client
        .execute("pg", "SET application_name = 'changed'", vec![])
        .await
        .expect("set");
    let name = client
        .execute("pg", "SHOW application_name", vec![])
        .await
        .expect("show");
    assert_eq!(
        text(&name.rows[0].values[0]),
        "weir",
        "settings are reset between callers"
    );
    // State left by statements that look like plain queries is found too.
    let left_behind = [
        (
            "SELECT set_config('application_name', 'sneaky', false)",
            "SELECT current_setting('application_name') = 'weir'",
        ),
        (
            "SELECT pg_advisory_lock(4242)",
            "SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
        ),
        // Called on a value in attribute notation, without a `(`.
        (
            "SELECT (4243::bigint).pg_advisory_lock",
            "SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
        ),
        (
            "LISTEN weir_channel",
            "SELECT NOT EXISTS (SELECT 1 FROM pg_listening_channels())",
        ),
        (
            "CREATE TEMP TABLE weir_scratch (x int)",
            "SELECT NOT EXISTS (SELECT 1 FROM pg_class WHERE relnamespace = pg_my_temp_schema())",
        ),
        (
            "DECLARE weir_held CURSOR WITH HOLD FOR SELECT 42",
            "SELECT NOT EXISTS (SELECT 1 FROM pg_cursors WHERE name = 'weir_held')",
        ),
        (
            "PREPARE weir_theirs AS SELECT 1",
            "SELECT NOT EXISTS (SELECT 1 FROM pg_prepared_statements WHERE from_sql)",
        ),
    ];
    for (leave, check) in left_behind {
        client.execute("pg", leave, vec![]).await.expect(leave);
        // A plain read next (its reset travels with it once it is prepared)
        // leaves nothing of its own for the check to find.
        client.execute("pg", "SELECT 1", vec![]).await.expect("plain read");
        let clean = client.execute("pg", check, vec![]).await.expect(check);
        assert!(
            matches!(clean.rows[0].values[0].kind, Some(pb::value::Kind::BoolValue(true))),
            "{leave} reached the next caller"
        );
    }
    // lastval() has no value in a session that used no sequence.
    client
        .execute("pg", "SELECT nextval('weir_session_s')", vec![])
        .await
        .expect("nextval");
    client.execute("pg", "SELECT 1", vec![]).await.expect("plain read");
    let err = client
        .execute("pg", "SELECT lastval()", vec![])
        .await
        .expect_err("the last caller's sequence value reached the next caller");
    assert_eq!(engine_code(&err), "55000", "{}", err.message());
    let seen: i64 = pg_direct()
        .await
        .query_one("SELECT count(*) FROM weir_session WHERE id = $1", &[&(marker as i32)])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        seen, 1,
        "the insert was committed, not swallowed by a leftover transaction"
    );
    server.stop().await;

    let toml = tenant(
        "ro2",
        "",
        &postgres(
            "ro2",
            "pg",
            "read_only = true\n[tenants.ro2.sources.pg.pool]\nmax_size = 1\n",
        ),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-ro2").await;
    // Also when the call hides behind a comment that PostgreSQL ends at a
    // carriage return (and a lexer reading to the newline would not).
    for sneaky in [
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "SELECT 1 --\r, set_config('default_transaction_read_only', 'off', false)",
        // An E'' string continued on the next line escapes there too.
        "SELECT E'a'\n'\\' x', set_config($$default_transaction_read_only$$, $$off$$, false) --'",
    ] {
        client
            .execute("pg", sneaky, vec![])
            .await
            .expect("a caller may change its session");
        let err = client
            .execute("pg", "INSERT INTO weir_session VALUES (0)", vec![])
            .await
            .expect_err("still read-only");
        assert_eq!(engine_code(&err), "25006", "after {sneaky:?}");
    }
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "pg", "SET TRANSACTION READ WRITE", vec![])
        .await
        .expect_err("mode is fixed");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    client.rollback(&tx).await.expect("rollback");
    server.stop().await;
}

#[tokio::test]
async fn session_reset_always_covers_reads_through_views() {
    // A view can hide a session-changing function from any reading of the
    // statement's text: `session_reset = "always"` resets after it too.
    pg_direct()
        .await
        .batch_execute(
            "CREATE OR REPLACE FUNCTION weir_sneaky() RETURNS text LANGUAGE sql AS \
             $$ SELECT set_config('application_name', 'sneaky', false) $$; \
             CREATE OR REPLACE VIEW weir_sneaky_view AS SELECT weir_sneaky() AS v",
        )
        .await
        .expect("setup");
    let toml = tenant(
        "always",
        "",
        &postgres(
            "always",
            "pg",
            "session_reset = \"always\"\n[tenants.always.sources.pg.pool]\nmax_size = 1\n",
        ),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-always").await;
    client
        .execute("pg", "SELECT v FROM weir_sneaky_view", vec![])
        .await
        .expect("read the view");
    let name = client
        .execute("pg", "SELECT current_setting('application_name')", vec![])
        .await
        .expect("setting");
    assert_eq!(text(&name.rows[0].values[0]), "weir", "the view's setting was reset");
    server.stop().await;
}

#[tokio::test]
async fn many_cancelled_calls_leak_no_connections() {
    // The rate limit is not under test: 200 calls drain the default burst.
    let toml = tenant(
        "churn",
        "requests_per_second = 100000",
        &postgres("churn", "pg", "[tenants.churn.sources.pg.pool]\nmax_size = 3\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-churn").await;
    let mut calls = Vec::new();
    for i in 0..200u64 {
        let mut query = client.query();
        calls.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(pb::ExecuteStreamRequest {
                source: "pg".into(),
                // Far longer than the wait below: only a cancel ends it.
                sql: "SELECT pg_sleep(30) AS churn_probe".into(),
                ..Default::default()
            });
            // Some calls give up while waiting for a connection, some mid-statement.
            request.set_timeout(Duration::from_millis(5 + i % 40));
            let _ = async {
                let mut s = query.execute_stream(request).await?.into_inner();
                while s.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            }
            .await;
        }));
    }
    for call in calls {
        call.await.expect("call task");
    }
    let pg = pg_direct().await;
    assert!(
        wait_until_gone(&pg, "churn_probe", Duration::from_secs(10)).await,
        "cancelled statements still run"
    );
    let open: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' AND query LIKE '%churn_probe%'",
            &[],
        )
        .await
        .expect("activity")
        .get(0);
    assert!(open <= 3, "{open} connections for a pool of 3");
    assert_pool_holds(&client, "pg", 3).await;
    server.stop().await;
}

/// The application name of the source's sessions, as `sql` sees it.
const APP: &str = "SELECT current_setting('application_name')";

/// The `multiplex` section of a PostgreSQL source.
fn multiplex(tenant: &str, source: &str, connections: u32, statement_timeout: &str) -> String {
    format!(
        "[tenants.{tenant}.sources.{source}.multiplex]\nconnections = {connections}\nstatement_timeout = \"{statement_timeout}\"\n"
    )
}

/// A shared session whose server goes silent (a failover left its address
/// dead, packets dropped) is replaced once an abandoned read's check finds
/// no answer within the shared statement timeout and a grace, instead of
/// taking every later read until the operating system gives up on it.
#[tokio::test]
async fn a_shared_session_gone_silent_is_replaced() {
    let proxy = Proxy::start(pg_address()).await;
    let toml = tenant(
        "silent",
        "",
        &postgres_at(
            "silent",
            "pg",
            &proxy.port.to_string(),
            &format!(
                "[tenants.silent.sources.pg.pool]\nmax_size = 2\n{}",
                multiplex("silent", "pg", 1, "500ms")
            ),
        ),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-silent").await;
    let read = |deadline: Duration| {
        let mut request = tonic::Request::new(pb::ExecuteRequest {
            source: "pg".into(),
            sql: "SELECT 1 AS n".into(),
            ..Default::default()
        });
        request.set_timeout(deadline);
        let mut query = client.query();
        async move { query.execute(request).await }
    };
    read(Duration::from_secs(5)).await.expect("the shared session serves");
    proxy.freeze_open();
    let err = read(Duration::from_millis(300)).await.expect_err("no answer");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // 500 ms of statement timeout and 5 s of grace later, a new session.
    let started = std::time::Instant::now();
    loop {
        match read(Duration::from_secs(1)).await {
            Ok(r) => break assert_eq!(r.into_inner().rows.len(), 1),
            Err(e) if started.elapsed() < Duration::from_secs(15) => {
                assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}")
            }
            Err(e) => panic!("reads still go to the silent session: {e:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn multiplexed_reads_share_sessions_and_nothing_else_does() {
    let toml = tenant(
        "mux",
        "",
        &postgres(
            "mux",
            "pg",
            &format!(
                "[tenants.mux.sources.pg.pool]\nmax_size = 3\n{}",
                multiplex("mux", "pg", 1, "300ms")
            ),
        ),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-mux").await;
    // Many callers pipelined on one session each get their own answer.
    let calls: Vec<_> = (0..24i64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let sql = "SELECT $1::int8 * 2, current_setting('application_name')";
                (i, client.execute("pg", sql, vec![i.into()]).await)
            })
        })
        .collect();
    for call in calls {
        let (i, result) = call.await.expect("task");
        let rows = result.expect("shared read").rows;
        assert_eq!(int(&rows[0].values[0]), i * 2, "caller {i} got another caller's row");
        assert_eq!(text(&rows[0].values[1]), "weir-multiplexed");
    }
    // Whatever may change a session keeps a connection of its own (and its
    // reset), and so do streams and transactions.
    let set = "SELECT set_config('application_name', 'changed', false)";
    client.execute("pg", set, vec![]).await.expect("set_config");
    let shared = client.execute("pg", APP, vec![]).await.expect("shared read");
    assert_eq!(text(&shared.rows[0].values[0]), "weir-multiplexed");
    let mut stream = client.execute_stream("pg", APP, vec![]).await.expect("stream");
    let rows = stream.next_batch().await.expect("batch").expect("rows");
    assert_eq!(text(&rows[0].values[0]), "weir", "a stream runs on a pooled session");
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let in_tx = client.execute_in(&tx, "pg", APP, vec![]).await.expect("read in tx");
    assert_eq!(text(&in_tx.rows[0].values[0]), "weir");
    client.rollback(&tx).await.expect("rollback");
    // A caller cannot cancel a shared statement, so the engine's timeout ends it.
    let err = client
        .execute("pg", "SELECT count(*) FROM generate_series(1, 2000000000)", vec![])
        .await
        .expect_err("past the shared statement timeout");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::DeadlineExceeded, "57014")
    );
    assert_serves(&client, "pg", 1).await;
    // A shared session that the server ends is replaced on the next call.
    let pid = |r: pb::ExecuteResponse| int(&r.rows[0].values[0]);
    let shared_pid = pid(client
        .execute("pg", "SELECT pg_backend_pid()", vec![])
        .await
        .expect("pid"));
    let direct = pg_direct().await;
    let shared_pid = i32::try_from(shared_pid).expect("a pid");
    let killed: bool = direct
        .query_one("SELECT pg_terminate_backend($1)", &[&shared_pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(killed, "the shared session ended");
    for _ in 0..100 {
        let left = direct
            .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&shared_pid])
            .await
            .expect("activity");
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The gateway reads the server's goodbye as soon as it is sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shared = client.execute("pg", APP, vec![]).await.expect("read after the kill");
    assert_eq!(text(&shared.rows[0].values[0]), "weir-multiplexed");
    let new_pid = pid(client
        .execute("pg", "SELECT pg_backend_pid()", vec![])
        .await
        .expect("pid"));
    assert_ne!(new_pid, i64::from(shared_pid), "a new session");
    server.stop().await;
}

#[tokio::test]
async fn reads_go_on_when_one_of_two_shared_connections_is_killed() {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let toml = tenant(
        "failover",
        "requests_per_second = 100000",
        &postgres("failover", "pg", &multiplex("failover", "pg", 2, "5s")),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-failover").await;
    // Each read names the shared session it ran on (other tests' shared
    // sessions run beside these, so they are told apart this way only).
    let read = "SELECT $1::int8, pg_backend_pid()";
    let sessions = Arc::new(Mutex::new(HashSet::new()));
    let (killed, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    // Eight callers read their own numbers back until told to stop.
    let callers: Vec<_> = (0..8i64)
        .map(|caller| {
            let (client, sessions, killed, stop) = (client.clone(), sessions.clone(), killed.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut served_after_kill, mut lost) = (0, 0);
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let after_kill = killed.load(Ordering::Relaxed);
                    let n = caller * 1_000_000 + i;
                    match client.execute("pg", read, vec![n.into()]).await {
                        Ok(r) => {
                            assert_eq!(int(&r.rows[0].values[0]), n, "caller {caller} got another caller's row");
                            sessions.lock().expect("sessions").insert(int(&r.rows[0].values[1]));
                            served_after_kill += usize::from(after_kill);
                        }
                        // Sent on the killed connection: it may have run, so it is not sent again.
                        Err(e) => {
                            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                            lost += 1;
                        }
                    }
                }
                (served_after_kill, lost)
            })
        })
        .collect();
    let seen = || sessions.lock().expect("sessions").iter().copied().collect::<Vec<_>>();
    for _ in 0..100 {
        if seen().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = seen();
    assert_eq!(before.len(), 2, "both shared connections in use under load");
    let victim = i32::try_from(before[0]).expect("a pid");
    let direct = pg_direct().await;
    let terminated: bool = direct
        .query_one("SELECT pg_terminate_backend($1)", &[&victim])
        .await
        .expect("terminate")
        .get(0);
    assert!(terminated);
    killed.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lost = 0;
    for caller in callers {
        let (served, caller_lost) = caller.await.expect("caller");
        assert!(served > 0, "a caller was not served after the kill");
        lost += caller_lost;
    }
    // At most the reads that were on the killed connection, one per caller.
    assert!(lost <= 8, "{lost} reads lost");
    // The lost connection was replaced: slow reads at once take both shared
    // connections, neither of them the killed one.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let r = client
                    .execute(
                        "pg",
                        "SELECT pg_backend_pid(), count(*) FROM generate_series(1, 1000000)",
                        vec![],
                    )
                    .await
                    .expect("read after the kill");
                int(&r.rows[0].values[0])
            })
        })
        .collect();
    let mut after = HashSet::new();
    for read in slow {
        after.insert(read.await.expect("read"));
    }
    assert_eq!(after.len(), 2, "two shared connections again: {after:?}");
    assert!(
        !after.contains(&i64::from(victim)),
        "the killed session is gone: {after:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_shared_read_lost_while_running_is_resent_only_where_writes_are_impossible() {
    // A read on a shared connection whose backend ends mid-statement: it may
    // have run, so it is sent again only on a read-only source (a view could
    // hide a function with effects from the session lexer).
    let shared = |name: &str| multiplex("lost", name, 1, "60s");
    let sources = format!(
        "{}{}",
        postgres("lost", "ro", &format!("read_only = true\n{}", shared("ro"))),
        postgres("lost", "rw", &shared("rw")),
    );
    let server = TestServer::start(&tenant("lost", "statement_timeout = \"60s\"", &sources)).await;
    let client = server.client("key-lost").await;
    let direct = pg_direct().await;
    for (source, rows, resent) in [("ro", 40_000_001i64, true), ("rw", 40_000_002, false)] {
        let sql = format!("SELECT count(*) FROM generate_series(1, {rows})");
        let call = {
            let client = client.clone();
            let sql = sql.clone();
            tokio::spawn(async move { client.execute(source, &sql, vec![]).await })
        };
        // End the shared backend while it runs this statement (well past
        // preparing it: a read lost while being prepared is always resent).
        let mut killed = false;
        for _ in 0..200 {
            let ended = direct
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'weir-multiplexed' AND state = 'active' AND query = $1 \
                     AND clock_timestamp() - query_start > interval '300 milliseconds'",
                    &[&sql],
                )
                .await
                .expect("terminate");
            if !ended.is_empty() {
                killed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(killed, "{source}: the statement was seen running");
        let result = call.await.expect("task");
        if resent {
            let response = result.expect("resent on a new connection");
            assert_eq!(int(&response.rows[0].values[0]), rows);
        } else {
            let err = result.expect_err("not resent");
            assert_eq!(
                (err.code(), engine_code(&err).as_str()),
                (Code::Unavailable, "57P01"),
                "{err:?}"
            );
        }
        // The source serves again either way.
        assert_serves(&client, source, 1).await;
    }
    server.stop().await;
}

/// A shared read that its caller leaves runs on until the shared statement
/// timeout (3 s here): meanwhile reads go to the other shared connection
/// instead of queueing behind it.
async fn reads_go_to_the_shared_connection_that_a_left_read_does_not_hold(
    leave: impl AsyncFnOnce(&weir_client::WeirClient),
) {
    let toml = tenant(
        "left",
        "max_rows_per_response = 10",
        &postgres("left", "pg", &multiplex("left", "pg", 2, "3s")),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-left").await;
    // Both shared connections open and idle.
    assert_serves(&client, "pg", 2).await;
    leave(&client).await;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert_serves(&client, "pg", 1).await;
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "a read waited {:?} behind the one left running",
            started.elapsed()
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn reads_go_to_the_shared_connection_that_a_read_left_after_its_first_rows_holds_no_more() {
    reads_go_to_the_shared_connection_that_a_left_read_does_not_hold(async |client| {
        // Refused at its 11th row; the engine goes on sending rows.
        let err = client
            .execute("pg", "SELECT generate_series(1, 500000000) AS left_running", vec![])
            .await
            .expect_err("over the row cap");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn reads_go_to_the_shared_connection_that_a_read_left_before_its_first_row_holds_no_more() {
    reads_go_to_the_shared_connection_that_a_left_read_does_not_hold(async |client| {
        // The caller's deadline passes long before the count's one row.
        let mut request = tonic::Request::new(pb::ExecuteRequest {
            source: "pg".into(),
            sql: "SELECT count(*) FROM generate_series(1, 2000000000) AS left_waiting".into(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(200));
        let err = client.query().execute(request).await.expect_err("gave up");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    })
    .await;
}

/// A write that returns rows, streamed, commits only once the transport
/// has taken its last rows: here they fit the stream's buffer, so the
/// statement is done while the client reads nothing, and the client that
/// stopped reading gets `STREAM_STALLED` and nothing is written (it was
/// committed before, and the client never had `stats`).
#[tokio::test]
async fn a_streamed_write_whose_client_stopped_reading_before_its_last_rows_is_rolled_back() {
    setup("DROP TABLE IF EXISTS weir_stalled_write; CREATE TABLE weir_stalled_write (id int4 PRIMARY KEY, note text)")
        .await;
    let server = TestServer::start(&format!("[server]\nstream_idle_timeout = \"2s\"\n{}", config(""))).await;
    let client = server.client("key-acme").await;
    // About 5 MB: more than the client's HTTP/2 window (2 MiB) takes
    // unread, less than that and the stream's buffer (4 batches of 1 MiB).
    let sql =
        "INSERT INTO weir_stalled_write SELECT g, repeat('x', 2000) FROM generate_series(1, 2500) g RETURNING note";
    let mut stream = client
        .query()
        .execute_stream(pb::ExecuteStreamRequest {
            source: "pg".into(),
            sql: sql.into(),
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let stats = matches!(m.payload, Some(pb::execute_stream_response::Payload::Stats(_)));
                assert!(!stats, "stats for a client that stopped reading");
            }
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(reason(&ended), "STREAM_STALLED", "{ended:?}");
    let written = pg_direct()
        .await
        .query_one("SELECT count(*) FROM weir_stalled_write", &[])
        .await
        .expect("count")
        .get::<_, i64>(0);
    assert_eq!(written, 0, "rolled back");
    server.stop().await;
}

/// A transaction's own DDL, temporary tables and `search_path` change what
/// its later statements name and return: statements the session prepared
/// before are prepared again, not reused (a cached `SELECT *` failed with
/// 0A000 at every retry; a temporary table was not read where it shadows
/// the permanent one).
#[tokio::test]
async fn a_transactions_own_ddl_is_seen_by_its_later_statements() {
    setup(
        "DROP TABLE IF EXISTS weir_own_ddl, weir_staging; CREATE TABLE weir_own_ddl (a int4); \
         INSERT INTO weir_own_ddl VALUES (1); CREATE TABLE weir_staging (n int4); INSERT INTO weir_staging VALUES (1), (2); \
         CREATE SCHEMA IF NOT EXISTS weir_ddl_other; DROP TABLE IF EXISTS weir_ddl_other.weir_staging; \
         CREATE TABLE weir_ddl_other.weir_staging (n int4, m text);",
    )
    .await;
    let single = postgres("ddl", "single", "[tenants.ddl.sources.single.pool]\nmax_size = 1\n");
    let server = TestServer::start(&tenant("ddl", "", &single)).await;
    let client = server.client("key-ddl").await;
    let count = "SELECT count(*)::text AS n FROM weir_staging";
    for _ in 0..2 {
        let tx = client
            .begin("single", IsolationLevel::Unspecified, false)
            .await
            .expect("begin");
        let run = |sql: &'static str| client.execute_in(&tx, "single", sql, vec![]);
        assert_eq!(
            run("SELECT * FROM weir_own_ddl").await.expect("before").columns.len(),
            1
        );
        run("ALTER TABLE weir_own_ddl ADD COLUMN b int4").await.expect("alter");
        let after = run("SELECT * FROM weir_own_ddl")
            .await
            .expect("the table's columns of now");
        assert_eq!(after.columns.len(), 2);
        assert_eq!(text(&run(count).await.expect("permanent").rows[0].values[0]), "2");
        // The search path set by function: the same text names another table.
        let all = "SELECT * FROM weir_staging";
        assert_eq!(run(all).await.expect("public's").columns.len(), 1);
        run("SELECT set_config('search_path', 'weir_ddl_other', true)")
            .await
            .expect("search path");
        assert_eq!(run(all).await.expect("the other schema's").columns.len(), 2);
        run("SELECT set_config('search_path', 'public', true)")
            .await
            .expect("back");
        run("CREATE TEMP TABLE weir_staging (n int4) ON COMMIT DROP")
            .await
            .expect("temp");
        run("INSERT INTO weir_staging VALUES (7)").await.expect("insert");
        let shadowed = run(count).await.expect("the temporary table");
        assert_eq!(text(&shadowed.rows[0].values[0]), "1", "read from the temporary table");
        // Rolled back: the same transaction again, on the same session,
        // with every statement's text cached from the first time.
        client.rollback(&tx).await.expect("rollback");
    }
    server.stop().await;
}

#[tokio::test]
async fn statements_prepared_before_their_table_changed_are_prepared_again() {
    setup(
        "DROP TABLE IF EXISTS weir_altered; CREATE TABLE weir_altered (a int4); INSERT INTO weir_altered VALUES (1);",
    )
    .await;
    let pooled = postgres("ddl", "pooled", "[tenants.ddl.sources.pooled.pool]\nmax_size = 4\n");
    let shared = postgres("ddl", "shared", &multiplex("ddl", "shared", 2, "5s"));
    let single = postgres("ddl", "single", "[tenants.ddl.sources.single.pool]\nmax_size = 1\n");
    let server = TestServer::start(&tenant("ddl", "", &format!("{pooled}{shared}{single}"))).await;
    let client = server.client("key-ddl").await;
    // Slow enough that four at once take four pooled connections, or both
    // shared ones, and each prepares `t.*` with the table's columns of now.
    let read = "SELECT current_setting('application_name') AS app, t.* FROM weir_altered t \
                WHERE (SELECT count(*) FROM generate_series(1, 300000)) > 0";
    let read_everywhere = |source: &'static str, width: usize| {
        let client = client.clone();
        async move {
            let calls: Vec<_> = (0..4)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move { client.execute(source, read, vec![]).await })
                })
                .collect();
            for call in calls {
                let result = call.await.expect("task").unwrap_or_else(|e| panic!("{source}: {e:?}"));
                assert_eq!(result.columns.len(), width, "{source}: the table's columns of now");
                let app = if source == "shared" { "weir-multiplexed" } else { "weir" };
                assert_eq!(text(&result.rows[0].values[0]), app, "on the {source} connections");
            }
        }
    };
    for source in ["pooled", "shared"] {
        read_everywhere(source, 2).await;
    }
    setup("ALTER TABLE weir_altered ADD COLUMN b text DEFAULT 'added'").await;
    for source in ["pooled", "shared"] {
        read_everywhere(source, 3).await;
    }
    // The first statement of a transaction is begun again and rerun: nothing
    // in it has run yet.
    setup("ALTER TABLE weir_altered ADD COLUMN c int8").await;
    let tx = client
        .begin("pooled", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let result = client
        .execute_in(&tx, "pooled", read, vec![])
        .await
        .expect("first in a transaction");
    assert_eq!(result.columns.len(), 4);
    client.commit(&tx).await.expect("commit");
    // A later one cannot be: the transaction is aborted, and the caller told
    // to run it again.
    let tx = client
        .begin("pooled", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "pooled", "SELECT 1", vec![])
        .await
        .expect("a first statement");
    setup("ALTER TABLE weir_altered ADD COLUMN d int8").await;
    let err = client
        .execute_in(&tx, "pooled", read, vec![])
        .await
        .expect_err("a plan prepared before the change");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::Aborted, "0A000"),
        "{err:?}"
    );
    assert!(err.message().contains("run the transaction again"), "{err:?}");
    client.rollback(&tx).await.expect("rollback");
    let tx = client
        .begin("pooled", IsolationLevel::Unspecified, false)
        .await
        .expect("begin again");
    let result = client.execute_in(&tx, "pooled", read, vec![]).await.expect("run again");
    assert_eq!(result.columns.len(), 5);
    client.commit(&tx).await.expect("commit");
    // A write that hands back its rows runs in a transaction of its own, and
    // is rerun there too (one connection: the one that prepared it).
    let write = "INSERT INTO weir_altered (a) VALUES (2) RETURNING *";
    let result = client.execute("single", write, vec![]).await.expect("write");
    assert_eq!(result.columns.len(), 4);
    setup("ALTER TABLE weir_altered ADD COLUMN e int8").await;
    let result = client
        .execute("single", write, vec![])
        .await
        .expect("write after the change");
    assert_eq!(result.columns.len(), 5);
    server.stop().await;
}

#[tokio::test]
async fn shared_reads_that_fail_or_are_abandoned_leave_the_connection_serving_the_right_rows() {
    // One shared connection, so every read below is pipelined behind the one before.
    let toml = tenant(
        "gone",
        "max_rows_per_response = 10",
        &postgres("gone", "pg", &multiplex("gone", "pg", 1, "1500ms")),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-gone").await;
    let lookup = "SELECT $1::int8 + 1";
    let check = |client: weir_client::WeirClient, i: i64| async move {
        let r = client.execute("pg", lookup, vec![i.into()]).await.expect("lookup");
        assert_eq!(
            (r.rows.len(), int(&r.rows[0].values[0])),
            (1, i + 1),
            "rows of another read"
        );
    };
    // A result over the row cap: refused; its remaining rows reach no one else.
    let err = client
        .execute("pg", "SELECT g FROM generate_series(1, 100000) g", vec![])
        .await
        .expect_err("over the cap");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    check(client.clone(), 1).await;
    // Bad input: a parameter count that does not fit, a table that does not exist.
    let err = client.execute("pg", lookup, vec![]).await.expect_err("no parameter");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client
        .execute("pg", "SELECT * FROM weir_no_such_table", vec![])
        .await
        .expect_err("missing table");
    assert_eq!((err.code(), engine_code(&err).as_str()), (Code::NotFound, "42P01"));
    check(client.clone(), 2).await;
    // A caller that gives up: it gets DEADLINE_EXCEEDED at its own deadline;
    // the statement runs on until the shared statement timeout ends it, and
    // the reads queued behind it then get their own rows.
    let long = "SELECT count(*) FROM generate_series(1, 2000000000) AS abandoned";
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "pg".into(),
        sql: long.into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = client.query().execute(request).await.expect_err("gave up");
    // The client's own timer or the server's, whichever fires first.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "at the caller's deadline");
    let queued: Vec<_> = (10..20).map(|i| tokio::spawn(check(client.clone(), i))).collect();
    for call in queued {
        call.await.expect("queued read");
    }
    let direct = pg_direct().await;
    let running = direct
        .query(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query = $1",
            &[&long],
        )
        .await
        .expect("activity");
    assert!(running.is_empty(), "the engine ended the abandoned statement");
    check(client.clone(), 3).await;
    server.stop().await;
}

/// Whether the session that runs the statement is encrypted, as PostgreSQL sees it.
const SESSION_IN_TLS: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[tokio::test]
async fn tls_sessions_are_encrypted_and_the_server_certificate_is_verified() {
    let pg = pg_direct().await;
    let ssl: String = pg.query_one("SHOW ssl", &[]).await.expect("SHOW ssl").get(0);
    assert_eq!(
        ssl, "on",
        "the test PostgreSQL serves TLS (scripts/services.sh turns it on)"
    );
    // Its certificate is self-signed without subject alternative names
    // (Debian's snakeoil, or the one scripts/services.sh makes): trusted as
    // it is, a session is only encrypted.
    let snakeoil = pg_certificate_file(&pg).await;
    let sources = [
        postgres("acme", "trusting", "tls = true\ntrust_server_certificate = true\n"),
        postgres(
            "acme",
            "shared",
            "tls = true\ntrust_server_certificate = true\n[tenants.acme.sources.shared.pool]\nmax_size = 3\n\
             [tenants.acme.sources.shared.multiplex]\nconnections = 1\n",
        ),
        postgres("acme", "verifying", "tls = true\n"),
        postgres("acme", "own_ca", &format!("tls = true\ntls_ca_file = \"{snakeoil}\"\n")),
        postgres("acme", "plain", ""),
        plain_postgres("acme", "no_tls_server", "tls = true\n"),
    ];
    let server = TestServer::start(&tenant("acme", "", &sources.concat())).await;
    let client = server.client("key-acme").await;
    let in_tls = |r: pb::ExecuteResponse| matches!(kind(&r.rows[0].values[0]), Kind::BoolValue(true));
    for source in ["trusting", "shared"] {
        let r = client.execute(source, SESSION_IN_TLS, vec![]).await.expect(source);
        assert!(in_tls(r), "{source}: the session is in TLS");
    }
    let r = client.execute("plain", SESSION_IN_TLS, vec![]).await.expect("plain");
    assert!(!in_tls(r), "without tls the session is plaintext");
    // Verified against the public roots, the self-signed certificate fails;
    // against itself as the authority, its missing host name does.
    for (source, why) in [
        ("verifying", "is not signed by an authority Weir trusts"),
        ("own_ca", "is not valid for the source's host"),
    ] {
        let err = client.execute(source, "SELECT 1", vec![]).await.expect_err(source);
        assert_eq!(err.code(), Code::Unavailable, "{source}: {err:?}");
        assert!(err.message().contains(why), "{source}: {}", err.message());
        assert!(!err.message().contains("localhost"), "no host named: {}", err.message());
    }
    // A caller that leaves stops its statement: the cancel request goes over TLS too.
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "trusting".into(),
        sql: "SELECT pg_sleep(20) AS tls_cancel_probe".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    client
        .query()
        .execute(request)
        .await
        .expect_err("the deadline passes first");
    assert!(
        wait_until_gone(&pg, "tls_cancel_probe", Duration::from_secs(5)).await,
        "the statement was cancelled in the engine"
    );
    // A server that offers no TLS is refused, never used in plaintext.
    let err = client
        .execute("no_tls_server", "SELECT 1", vec![])
        .await
        .expect_err("no TLS there");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("TLS"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn arrow_results_hold_what_rows_hold() {
    // RESULT_FORMAT_ARROW_IPC: each column's Arrow type holds exactly the
    // values the row format gives, NULLs included, across batches.
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    let sql = "SELECT g, g::int2 AS small, g::float4 / 4 AS f4, g % 3 = 0 AS b, 'héllo ' || g AS t, \
               CASE WHEN g % 2 = 0 THEN NULL ELSE 'odd' END AS maybe, g::numeric / 3 AS d, 'NaN'::numeric AS nan, \
               '2024-01-02 03:04:05.25+00'::timestamptz + g * interval '1 second' AS ts, \
               '2024-01-02 03:04:05'::timestamp AS wall, '2024-02-29'::date - g AS day, '13:14:15.5'::time AS tod, \
               make_interval(months => 1, days => g, secs => 1.5) AS iv, \
               md5(g::text)::uuid AS u, decode(lpad(to_hex(g), 6, '0'), 'hex') AS bin, \
               ARRAY[g, NULL, -g] AS ints, ARRAY['a', NULL] AS texts, '{\"k\": 1}'::jsonb AS j, NULL::text AS nothing \
               FROM generate_series(1, 2500) g ORDER BY g";
    let unary = client.execute("pg", sql, vec![]).await.expect("execute");
    let request = pb::ExecuteStreamRequest {
        source: "pg".into(),
        sql: sql.into(),
        format: pb::ResultFormat::ArrowIpc.into(),
        max_batch_rows: 1000,
        ..Default::default()
    };
    let mut pieces = Vec::new();
    let mut stream = client
        .query()
        .execute_stream(request)
        .await
        .expect("stream")
        .into_inner();
    while let Some(m) = stream.message().await.expect("message") {
        if let Some(pb::execute_stream_response::Payload::ArrowIpc(piece)) = m.payload {
            pieces.push(piece);
        }
    }
    // Schema with the first batch, three batches, the end marker alone.
    assert_eq!(pieces.len(), 4);
    // Joined, the pieces are one Arrow IPC stream, as any Arrow reader takes it.
    let reader = StreamReader::try_new(std::io::Cursor::new(pieces.concat()), None).expect("IPC stream");
    let batches: Vec<_> = reader.collect::<Result<_, _>>().expect("batches");
    assert_eq!(
        batches.iter().map(|b| b.num_rows()).collect::<Vec<_>>(),
        [1000, 1000, 500]
    );
    let schema = batches[0].schema();
    assert_eq!(schema.field(13).metadata()["ARROW:extension:name"], "arrow.uuid");
    assert_eq!(schema.field(17).metadata()["ARROW:extension:name"], "arrow.json");
    assert_eq!(schema.field(1).metadata()["weir.native_type"], "int2");
    assert_eq!(unary.rows.len(), 2500);
    assert_arrow_holds_rows(&batches, &unary.rows);

    // Values without an exact Arrow form fail the call by row and column.
    for (sql, column, says) in [
        (
            "SELECT g, CASE WHEN g = 3 THEN '12:00+02'::timetz END AS tz FROM generate_series(1, 5) g",
            "tz",
            "time zone",
        ),
        ("SELECT ARRAY[[1, 2], [3, 4]] AS m", "m", "list"),
        ("SELECT '24:00'::time AS midnight", "midnight", "24:00:00"),
    ] {
        let mut stream = client
            .execute_stream_arrow("pg", sql, vec![])
            .await
            .expect("stream starts");
        let e = loop {
            match stream.next_batch().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{sql}: no error"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{sql}: {e:?}");
        assert_eq!(reason(&e), "NOT_REPRESENTABLE_IN_ARROW");
        assert!(
            e.message().contains(&format!("column \"{column}\"")) && e.message().contains(says),
            "{}",
            e.message()
        );
    }
    let e = client.execute_stream_arrow("pg", "SELECT 1 AS x", vec![]);
    let mut stream = e.await.expect("the session is unharmed");
    assert!(stream.next_batch().await.expect("batch").is_some());

    // A batch whose bytes end as the end-of-stream marker does (the int8
    // 4294967295 is FF FF FF FF 00 00 00 00; eight of them fill the 64-byte
    // aligned buffer) does not end the stream.
    let sql = "SELECT CASE WHEN g = 8 THEN 4294967295 ELSE g END::int8 AS x FROM generate_series(1, 8) g";
    let mut stream = client
        .execute_stream_arrow("pg", sql, vec![])
        .await
        .expect("marker-like batch");
    let batch = stream.next_batch().await.expect("batch").expect("rows");
    assert_eq!(batch.num_rows(), 8);
    assert!(stream.next_batch().await.expect("the end").is_none());

    // Rows without columns keep their count; a void column (no type of its own) is Null.
    let mut stream = client
        .execute_stream_arrow("pg", "SELECT FROM generate_series(1, 3)", vec![])
        .await
        .expect("no columns");
    assert_eq!(stream.next_batch().await.expect("batch").map(|b| b.num_rows()), Some(3));
    let mut stream = client
        .execute_stream_arrow("pg", "SELECT pg_sleep(0) AS slept", vec![])
        .await
        .expect("untyped");
    let batch = stream.next_batch().await.expect("batch").expect("a row");
    assert_eq!(batch.schema().field(0).data_type(), &DataType::Null);

    // An unknown format is the caller's mistake.
    let request = pb::ExecuteStreamRequest {
        source: "pg".into(),
        sql: "SELECT 1".into(),
        format: 99,
        ..Default::default()
    };
    let e = client
        .query()
        .execute_stream(request)
        .await
        .expect_err("unknown format");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("format"), "{}", e.message());
    server.stop().await;
}

/// A stream left once its statement has finished is cancelled in the engine
/// all the same (Weir cannot know it has ended); the server acts on a cancel
/// request a moment after it is sent, so the connection must not go to the
/// next caller before then, or that caller's statement is the one cancelled.
/// A cancel that goes astray leaves its statement running: here a proxy
/// closes the cancel connection at once, as a server that does not hold the
/// session would (a host name that now resolves elsewhere, a proxy). The
/// session is closed after a short wait instead of being held, with the pool
/// slot, until the statement ends, so the next caller gets a new one.
#[tokio::test]
async fn a_session_whose_cancel_goes_astray_is_closed_not_held() {
    let proxy = Proxy::start(pg_address()).await;
    let toml = tenant(
        "lone",
        "",
        &postgres_at(
            "lone",
            "pg",
            &proxy.port.to_string(),
            "[tenants.lone.sources.pg.pool]\nmax_size = 1\n",
        ),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-lone").await;
    let pg = pg_direct().await;
    // The one session is open before new connections are refused.
    assert_serves(&client, "pg", 1).await;
    proxy.refuse(true);
    let started = std::time::Instant::now();
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "pg".into(),
        sql: "SELECT pg_sleep(60) AS astray_probe".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let err = client.query().execute(request).await.expect_err("the deadline passes");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.refuse(false);
    // Until the session is closed, the pool has no slot to give.
    let served = loop {
        match client.execute("pg", "SELECT 1 AS n", vec![]).await {
            Ok(r) => break r,
            Err(e) if started.elapsed() < Duration::from_secs(40) => {
                assert!(matches!(e.code(), Code::Unavailable | Code::ResourceExhausted), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the next caller was held behind the abandoned statement: {e:?}"),
        }
    };
    assert_eq!(served.rows.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the next caller waited for the abandoned statement"
    );
    // The cancel did go astray: the statement still runs, on a closed session.
    let running: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%astray_probe%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("activity")
        .get(0);
    assert_eq!(running, 1, "the abandoned statement was cancelled after all");
    // In a transaction, neither its next statement nor its Rollback waits
    // behind such a statement: closing the session rolls it back.
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    proxy.refuse(true);
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "pg".into(),
        sql: "SELECT pg_sleep(60) AS astray_probe".into(),
        transaction_id: tx.clone(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let err = client.query().execute(request).await.expect_err("the deadline passes");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    // Busy while the cancel is waited for (up to 5 s), then over.
    let next = loop {
        let next = tokio::time::timeout(Duration::from_secs(5), client.execute_in(&tx, "pg", "SELECT 1", vec![]))
            .await
            .expect("the next statement is answered at once")
            .expect_err("the transaction is over");
        if next.code() != Code::FailedPrecondition || started.elapsed() > Duration::from_secs(50) {
            break next;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(next.code(), Code::Aborted, "{next:?}");
    tokio::time::timeout(Duration::from_secs(5), client.rollback(&tx))
        .await
        .expect("the rollback is answered at once")
        .expect("rolled back");
    proxy.refuse(false);
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%astray_probe%' AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .expect("terminate");
    server.stop().await;
}

#[tokio::test]
async fn a_late_cancel_does_not_reach_the_next_caller() {
    let toml = tenant(
        "lone",
        "",
        &postgres("lone", "pg", "[tenants.lone.sources.pg.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-lone").await;
    for round in 0..40 {
        // Refused as Arrow at its first row: the gateway leaves the
        // statement, which the engine has finished by then.
        let sql = "SELECT '24:00'::time AS t FROM generate_series(1, 2)";
        let mut refused = client.execute_stream_arrow("pg", sql, vec![]).await.expect("stream");
        let e = refused.next_batch().await.expect_err("24:00 is not an Arrow time");
        assert_eq!(e.code(), Code::InvalidArgument);
        // On the one pooled connection, running while a late signal would land.
        let next = client
            .execute("pg", "SELECT pg_sleep(0.02), $1::int AS round", vec![round.into()])
            .await;
        let next = next.unwrap_or_else(|e| panic!("round {round}: the next caller's statement failed: {e:?}"));
        assert_eq!(next.rows.len(), 1);
    }
    server.stop().await;
}

/// A Commit call dropped after COMMIT was sent (its deadline passed while a
/// deferred trigger ran, and failed) still ends the transaction: a second
/// Commit on it is NOT_FOUND, not a success that nothing was committed for.
#[tokio::test]
async fn a_commit_run_again_after_its_call_was_dropped_is_not_a_success() {
    let pg = pg_direct().await;
    let table = format!("recommit_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id int);
         CREATE FUNCTION {table}_fails() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(1); RAISE EXCEPTION 'refused at commit'; END $$;
         CREATE CONSTRAINT TRIGGER fails AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION {table}_fails();"
    ))
    .await
    .expect("setup");
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "pg", &format!("INSERT INTO {table} VALUES (1)"), vec![])
        .await
        .expect("insert");
    let mut commit = tonic::Request::new(pb::CommitRequest {
        transaction_id: tx.clone(),
    });
    commit
        .metadata_mut()
        .insert("grpc-timeout", "200m".parse().expect("header value"));
    let first = client.query().commit(commit).await.expect_err("past its deadline");
    assert!(
        matches!(first.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{first:?}"
    );
    // After the trigger has failed the COMMIT.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = client.commit(&tx).await.expect_err("the transaction did not commit");
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    assert_eq!(pg_count(&pg, &table).await, 0);
    pg.batch_execute(&format!("DROP TABLE {table}; DROP FUNCTION {table}_fails()"))
        .await
        .expect("cleanup");
    server.stop().await;
}

/// A fresh table `<prefix>_<random>` (id int) whose deferred trigger sleeps
/// `seconds` in the COMMIT of a transaction that inserted into it.
async fn table_with_a_slow_commit(pg: &tokio_postgres::Client, prefix: &str, seconds: f64) -> String {
    let table = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id int);
         CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION {table}_slow();"
    ))
    .await
    .expect("setup");
    table
}

/// The COMMIT of the transaction a write that hands back rows runs in is
/// part of the call: still running at the call's deadline, its outcome is
/// unknown, and the caller hears so in time rather than a bare
/// DEADLINE_EXCEEDED from its own timer.
#[tokio::test]
async fn an_own_transactions_commit_past_the_deadline_is_reported_as_unknown() {
    let pg = pg_direct().await;
    let table = table_with_a_slow_commit(&pg, "owncommit", 2.0).await;
    let server = TestServer::start(&tenant("c", "", &postgres("c", "db", ""))).await;
    let client = server.client("key-c").await;
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "db".into(),
        sql: format!("INSERT INTO {table} VALUES (1) RETURNING id"),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(1));
    let e = client.query().execute(request).await.expect_err("past the deadline");
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unknown, "COMMIT_OUTCOME_UNKNOWN"),
        "{e:?}"
    );
    assert!(e.message().contains("time limit"), "{e:?}");
    // The trigger ends and the table is free again.
    pg.batch_execute(&format!("DROP TABLE {table}; DROP FUNCTION {table}_slow()"))
        .await
        .expect("cleanup");
    server.stop().await;
}

/// A Commit is bounded by the tenant's statement timeout like a statement:
/// one the database does not answer (here a deferred trigger that outlasts
/// it) is answered as unknown in time, and the transaction and its
/// connection are let go, not held for as long as the engine takes.
#[tokio::test]
async fn a_commit_past_the_statement_timeout_is_reported_as_unknown() {
    let pg = pg_direct().await;
    let table = table_with_a_slow_commit(&pg, "slowcommit", 4.0).await;
    let server = TestServer::start(&tenant("c", "statement_timeout = \"1s\"", &postgres("c", "db", ""))).await;
    let client = server.client("key-c").await;
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", &format!("INSERT INTO {table} VALUES (1)"), vec![])
        .await
        .expect("insert");
    let started = std::time::Instant::now();
    let e = client.commit(&tx).await.expect_err("past the time limit");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unknown, "COMMIT_OUTCOME_UNKNOWN"),
        "{e:?}"
    );
    let gone = client.commit(&tx).await.expect_err("the transaction is gone");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // Waits for the closed connection's backend, whose trigger holds the table.
    pg.batch_execute(&format!("DROP TABLE {table}; DROP FUNCTION {table}_slow()"))
        .await
        .expect("cleanup");
    server.stop().await;
}

/// A session lost after COMMIT was sent leaves the outcome unknown: the
/// database may have committed (here it did), so the caller is not told that
/// the transaction was rolled back and should be run again, which would
/// apply it twice. A session lost before COMMIT is still TRANSACTION_LOST.
#[tokio::test]
async fn a_commit_whose_session_is_lost_midway_is_reported_as_unknown() {
    use tonic_types::StatusExt;
    let pg = pg_direct().await;
    let table = table_with_a_slow_commit(&pg, "commit", 1.5).await;
    let proxy = Proxy::start(pg_address()).await;
    let server = TestServer::start(&tenant("c", "", &postgres_at("c", "db", &proxy.port.to_string(), ""))).await;
    let client = server.client("key-c").await;
    let begin = || client.begin("db", IsolationLevel::Unspecified, false);
    let insert = format!("INSERT INTO {table} VALUES (1)");

    let tx = begin().await.expect("begin");
    client.execute_in(&tx, "db", &insert, vec![]).await.expect("insert");
    let committing = {
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move { client.commit(&tx).await })
    };
    // COMMIT is running the deferred trigger when the connection goes.
    let mut sleeping = false;
    for _ in 0..100 {
        sleeping = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' AND wait_event = 'PgSleep' AND query = 'SELECT 1; COMMIT'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get::<_, i64>(0)
            > 0;
        if sleeping {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sleeping, "COMMIT reached the deferred trigger");
    proxy.cut();
    let e = committing.await.expect("task").expect_err("the session was lost");
    assert_eq!(e.code(), Code::Unknown, "{e:?}");
    assert_eq!(reason(&e), "COMMIT_OUTCOME_UNKNOWN");
    assert!(e.get_error_details().retry_info().is_none(), "no retry delay: {e:?}");
    let mut committed = 0i64;
    for _ in 0..50 {
        committed = pg_count(&pg, &table).await;
        if committed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(committed, 1, "the database committed it");

    // Lost before COMMIT: known rolled back. (The pool's idle sessions went
    // with the cut too: they are passed over, not handed to this caller.)
    let tx = begin().await.expect("begin on a session of its own");
    client.execute_in(&tx, "db", &insert, vec![]).await.expect("insert");
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = client.commit(&tx).await.expect_err("the session was lost");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert_eq!(reason(&e), "TRANSACTION_LOST");
    pg.batch_execute(&format!("DROP TABLE {table}; DROP FUNCTION {table}_slow()"))
        .await
        .expect("drop");
}

/// An interval parameter keeps each field's sign whatever the session's
/// intervalstyle: under sql_standard a leading '-' with no other sign
/// negates every field.
#[tokio::test]
async fn interval_parameters_keep_their_signs_under_every_intervalstyle() {
    let server = TestServer::start(&tenant("i", "", &postgres("i", "db", ""))).await;
    let client = server.client("key-i").await;
    let interval = |months, days, microseconds| pb::Value {
        kind: Some(Kind::IntervalValue(pb::Interval {
            months,
            days,
            microseconds,
        })),
    };
    for style in ["postgres", "sql_standard", "iso_8601"] {
        let tx = client
            .begin("db", IsolationLevel::Unspecified, false)
            .await
            .expect("begin");
        client
            .execute_in(&tx, "db", &format!("SET LOCAL intervalstyle = '{style}'"), vec![])
            .await
            .expect("style");
        for (months, days, micros) in [(-1, 15, 0), (2, -3, -1), (0, 0, -4_000_000_000), (-7, 0, 1_500_000)] {
            let r = client
                .execute_in(&tx, "db", "SELECT $1::interval", vec![interval(months, days, micros)])
                .await
                .expect("interval");
            assert_eq!(
                r.rows[0].values[0],
                interval(months, days, micros),
                "{style}: {months} months {days} days {micros} µs"
            );
        }
        client.rollback(&tx).await.expect("rollback");
    }
}

/// A statement abandoned while it is still being prepared (its parse waits
/// for a lock another session holds) is cancelled like one abandoned while
/// it runs: the session serves the next caller at once, instead of going
/// back to the pool with the parse still queued ahead of its statement.
#[tokio::test]
async fn a_statement_abandoned_while_being_prepared_is_cancelled() {
    let pg = pg_direct().await;
    let table = format!("locked_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    pg.batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .expect("create");
    let locker = pg_direct().await;
    locker
        .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .await
        .expect("lock");
    let toml = tenant(
        "p",
        "",
        &postgres("p", "pg", "[tenants.p.sources.pg.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-p").await;
    let within = |sql: String, deadline| {
        let client = client.clone();
        async move { execute_within(&client, &[], "pg", &sql, Duration::from_millis(deadline)).await }
    };
    let e = within(format!("SELECT * FROM {table} WHERE id = 1"), 300)
        .await
        .expect_err("its parse waits for the lock");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    // The one pooled session, while the lock is still held.
    within("SELECT 1".into(), 5000)
        .await
        .expect("the session is free for the next caller");
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    pg.batch_execute(&format!("DROP TABLE {table}")).await.expect("drop");
}

/// Values at PostgreSQL's edges go both ways unchanged: dates before year 1
/// (44 BC is year -43, astronomically) and after 9999, a "char" past ASCII
/// as PostgreSQL writes it, a negative numeric scale; an integer a double
/// parameter would round is refused.
#[tokio::test]
async fn values_at_postgresqls_edges() {
    let server = TestServer::start(&tenant("e", "", &postgres("e", "pg", ""))).await;
    let client = server.client("key-e").await;
    let date = |year, month, day| pb::Value {
        kind: Some(Kind::DateValue(pb::Date { year, month, day })),
    };
    for d in [date(-43, 3, 15), date(0, 2, 29), date(10000, 1, 1)] {
        let r = client
            .execute("pg", "SELECT $1::date", vec![d.clone()])
            .await
            .unwrap_or_else(|e| panic!("{d:?}: {e:?}"));
        assert_eq!(r.rows[0].values[0], d);
    }
    // 0001-01-01T00:00:00Z is -62135596800: a day and a year before it.
    for seconds in [-62_135_683_200_i64, -62_167_219_200] {
        let ts = pb::Value {
            kind: Some(Kind::TimestampValue(prost_types::Timestamp { seconds, nanos: 0 })),
        };
        for cast in ["timestamptz", "timestamp"] {
            let r = client
                .execute("pg", &format!("SELECT $1::{cast}"), vec![ts.clone()])
                .await
                .unwrap_or_else(|e| panic!("{seconds} as {cast}: {e:?}"));
            assert_eq!(r.rows[0].values[0], ts, "{cast}");
        }
    }
    let r = client
        .execute(
            "pg",
            "SELECT 'é'::\"char\" AS c, 'é'::\"char\"::text AS own, 1::numeric(5,-2) AS n",
            vec![],
        )
        .await
        .expect("char and numeric");
    assert_eq!(text(&r.rows[0].values[0]), text(&r.rows[0].values[1]));
    assert_eq!(text(&r.rows[0].values[0]), "\\303");
    assert_eq!(r.columns[2].scale, Some(-2));
    let e = client
        .execute("pg", "SELECT $1::float8", vec![((1_i64 << 53) + 1).into()])
        .await
        .expect_err("rounded");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("9007199254740993"), "{e:?}");
    // The same for a float array's elements and a float domain.
    client
        .execute(
            "pg",
            "DO $$ BEGIN CREATE DOMAIN weir_exact_double AS float8; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            vec![],
        )
        .await
        .expect("domain");
    let list = |values: Vec<pb::Value>| pb::Value {
        kind: Some(Kind::ListValue(pb::ListValue { values })),
    };
    let rounded = ((1_i64 << 53) + 1).into();
    for (sql, value) in [
        ("SELECT $1::float8[]", list(vec![1_i64.into(), rounded])),
        ("SELECT $1::weir_exact_double", ((1_i64 << 53) + 1).into()),
        (
            "SELECT $1::float4[][]",
            list(vec![list(vec![(-((1_i64 << 53) + 1)).into()])]),
        ),
    ] {
        let e = client.execute("pg", sql, vec![value]).await.expect_err(sql);
        assert_eq!(e.code(), Code::InvalidArgument, "{sql}: {e:?}");
        assert!(e.message().contains("9007199254740993"), "{sql}: {e:?}");
    }
    let exact = client
        .execute("pg", "SELECT $1::float8[]", vec![list(vec![(1_i64 << 53).into()])])
        .await
        .expect("2^53 is exact");
    assert_eq!(exact.rows.len(), 1);
    // A real holds every whole number up to 2^24 only.
    let e = client
        .execute("pg", "SELECT $1::real", vec![((1_i64 << 24) + 1).into()])
        .await
        .expect_err("rounded in a real");
    assert!(e.message().contains("16777217"), "{e:?}");
    client
        .execute("pg", "SELECT $1::real", vec![(1_i64 << 24).into()])
        .await
        .expect("2^24 is exact in a real");
    // Decimals and text are held to the same: what the float would round is
    // refused with what it would keep; what it reads back the same is bound.
    let decimal = |s: &str| pb::Value {
        kind: Some(Kind::DecimalValue(s.into())),
    };
    for (sql, value, kept) in [
        ("SELECT $1::float8", decimal("9007199254740993"), "9007199254740992"),
        ("SELECT $1::real", "16777217".into(), "16777216"),
        (
            "SELECT $1::float8[]",
            list(vec![decimal("0.1"), decimal("3.14159265358979323846")]),
            "3.141592653589793",
        ),
    ] {
        let e = client.execute("pg", sql, vec![value]).await.expect_err(sql);
        assert_eq!(e.code(), Code::InvalidArgument, "{sql}: {e:?}");
        assert!(e.message().contains(kept), "{sql}: {e:?}");
    }
    let exact = client
        .execute(
            "pg",
            "SELECT $1::float8, $2::real",
            vec![decimal("0.30000000000000004"), "0.1".into()],
        )
        .await
        .expect("decimals the floats hold");
    assert_eq!(
        exact.rows[0].values[0].kind,
        Some(Kind::DoubleValue(0.300_000_000_000_000_04))
    );
}

/// A foreign key to a partitioned table is one key, not one more per
/// partition; a generated column offers no default but says it is computed
/// and how; identity columns say whether an INSERT may name them, and a
/// serial column is an ordinary one with a nextval default.
#[tokio::test]
async fn foreign_keys_to_partitioned_tables_and_generated_columns_are_described_as_declared() {
    let toml = tenant("fkp", "", &postgres("fkp", "pg", ""));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-fkp").await;
    let pg = pg_direct().await;
    pg.batch_execute(
        "DROP TABLE IF EXISTS weir_fk_lines, weir_fk_events; \
         CREATE TABLE weir_fk_events (id int, kind int, PRIMARY KEY (id, kind)) PARTITION BY LIST (kind); \
         CREATE TABLE weir_fk_events_1 PARTITION OF weir_fk_events FOR VALUES IN (1); \
         CREATE TABLE weir_fk_events_2 PARTITION OF weir_fk_events FOR VALUES IN (2); \
         CREATE TABLE weir_fk_lines (id int PRIMARY KEY, event_id int, kind int, price numeric, qty int, \
           total numeric GENERATED ALWAYS AS (price * qty) STORED, \
           line_no int GENERATED ALWAYS AS IDENTITY, batch_no bigint GENERATED BY DEFAULT AS IDENTITY, \
           legacy serial, \
           FOREIGN KEY (event_id, kind) REFERENCES weir_fk_events (id, kind))",
    )
    .await
    .expect("tables");
    let d = client
        .describe_table("pg", "", "weir_fk_lines")
        .await
        .expect("describe");
    let keys: Vec<_> = d
        .foreign_keys
        .iter()
        .map(|f| (f.referenced_table.as_str(), f.columns.clone()))
        .collect();
    assert_eq!(
        keys,
        [("weir_fk_events", vec!["event_id".to_string(), "kind".to_string()])]
    );
    let total = d
        .columns
        .iter()
        .find(|c| c.column.as_ref().is_some_and(|c| c.name == "total"))
        .expect("total");
    assert_eq!(total.default_expression, "", "a generated column has no default");
    let filled: Vec<_> = d
        .columns
        .iter()
        .map(|c| {
            (
                c.column.as_ref().map_or("", |c| c.name.as_str()),
                c.generation(),
                c.generation_expression.as_str(),
                c.default_expression.as_str(),
            )
        })
        .filter(|(name, ..)| ["id", "total", "line_no", "batch_no", "legacy"].contains(name))
        .collect();
    use pb::ColumnGeneration as G;
    assert_eq!(
        filled,
        [
            ("id", G::Unspecified, "", ""),
            ("total", G::Computed, "(price * (qty)::numeric)", ""),
            ("line_no", G::IdentityAlways, "", ""),
            ("batch_no", G::IdentityByDefault, "", ""),
            (
                "legacy",
                G::Unspecified,
                "",
                "nextval('weir_fk_lines_legacy_seq'::regclass)"
            ),
        ]
    );
    pg.batch_execute("DROP TABLE weir_fk_lines, weir_fk_events")
        .await
        .expect("drop");
    server.stop().await;
}

/// Columns are described as the values come: a domain's precision, scale
/// and NOT NULL; arrays of enums as lists of strings and arrays of a type
/// Weir cannot carry as unsupported; ordinals as places in `SELECT *`
/// after a dropped column; a deferrable key is not offered as unique (ON
/// CONFLICT cannot use it).
#[tokio::test]
async fn domains_arrays_dropped_columns_and_deferrable_keys_are_described_as_they_behave() {
    let toml = tenant("dd", "", &postgres("dd", "pg", ""));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-dd").await;
    let pg = pg_direct().await;
    pg.batch_execute(
        "DROP TABLE IF EXISTS weir_dd; DROP DOMAIN IF EXISTS weir_dd_amount, weir_dd_id2, weir_dd_id; \
         DROP TYPE IF EXISTS weir_dd_mood; \
         CREATE DOMAIN weir_dd_amount AS numeric(12,2) NOT NULL; \
         CREATE DOMAIN weir_dd_id AS int; CREATE DOMAIN weir_dd_id2 AS weir_dd_id; \
         CREATE TYPE weir_dd_mood AS ENUM ('ok', 'sad'); \
         CREATE TABLE weir_dd (id int, gone int, amount weir_dd_amount, moods weir_dd_mood[], cash money[], \
           ids weir_dd_id[], nested weir_dd_id2, \
           CONSTRAINT weir_dd_pk PRIMARY KEY (id) DEFERRABLE); \
         ALTER TABLE weir_dd DROP COLUMN gone",
    )
    .await
    .expect("table");
    let d = client.describe_table("pg", "", "weir_dd").await.expect("describe");
    let columns: Vec<_> = d
        .columns
        .iter()
        .map(|c| (c.ordinal, c.column.clone().expect("column")))
        .collect();
    let by_name = |name: &str| {
        columns
            .iter()
            .find(|(_, c)| c.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(
        columns.iter().map(|(o, c)| (*o, c.name.as_str())).collect::<Vec<_>>(),
        [
            (1, "id"),
            (2, "amount"),
            (3, "moods"),
            (4, "cash"),
            (5, "ids"),
            (6, "nested")
        ]
    );
    // Domains over domains and arrays of domains, as results carry them.
    let (_, ids) = by_name("ids");
    assert_eq!(
        (ids.r#type(), ids.element_type()),
        (pb::ColumnType::List, pb::ColumnType::Int)
    );
    assert_eq!(by_name("nested").1.r#type(), pb::ColumnType::Int);
    // A column of a type change events cannot carry: not ready, naming it.
    let readiness = d.change_streams.clone().expect("readiness");
    assert!(!readiness.ready && readiness.reason.contains("cash"), "{readiness:?}");
    let (_, amount) = by_name("amount");
    assert_eq!(
        (amount.precision, amount.scale, amount.nullable),
        (Some(12), Some(2), false)
    );
    let (_, moods) = by_name("moods");
    assert_eq!(
        (moods.r#type(), moods.element_type()),
        (pb::ColumnType::List, pb::ColumnType::String)
    );
    let (_, cash) = by_name("cash");
    assert_eq!(cash.r#type(), pb::ColumnType::Unspecified, "{cash:?}");
    let pk = d
        .indexes
        .iter()
        .find(|i| i.name == "weir_dd_pk")
        .expect("the key's index");
    assert!(pk.primary && !pk.unique, "{pk:?}");
    pg.batch_execute("DROP TABLE weir_dd; DROP DOMAIN weir_dd_amount, weir_dd_id2, weir_dd_id; DROP TYPE weir_dd_mood")
        .await
        .expect("drop");
    server.stop().await;
}

/// A transaction's next statement waits a moment for one its deadline just
/// abandoned (being cancelled, it still holds the session), and gets the
/// engine's answer, not TRANSACTION_BUSY; a statement whose stream is still
/// being read keeps the transaction busy.
#[tokio::test]
async fn a_transactions_next_statement_waits_for_an_abandoned_one_not_a_running_one() {
    let toml = tenant("w", "", &postgres("w", "pg", "")) + &tenant("patient", "", &postgres("patient", "pg", ""));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-w").await;
    let begin = || client.begin("pg", IsolationLevel::Unspecified, false);
    for _ in 0..5 {
        let tx = begin().await.expect("begin");
        let e = execute_within(&client, &tx, "pg", "SELECT pg_sleep(5)", Duration::from_millis(300))
            .await
            .expect_err("past its deadline");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        // PostgreSQL aborted the transaction with the cancelled statement.
        let e = client
            .execute_in(&tx, "pg", "SELECT 1", vec![])
            .await
            .expect_err("aborted");
        assert_eq!(engine_code(&e), "25P02", "{e:?}");
        client.rollback(&tx).await.expect("rollback");
    }
    // Another tenant's client, as before this test took deadlines per call.
    let client = server.client("key-patient").await;
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let mut stream = client
        .query()
        .execute_stream(pb::ExecuteStreamRequest {
            source: "pg".into(),
            sql: "SELECT g FROM generate_series(1, 1000000) g".into(),
            transaction_id: tx.clone(),
            max_batch_rows: 10,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    assert!(stream.message().await.expect("first message").is_some());
    let e = client
        .execute_in(&tx, "pg", "SELECT 1", vec![])
        .await
        .expect_err("the stream still runs");
    assert_eq!(reason(&e), "TRANSACTION_BUSY", "{e:?}");
    // Passing by itself: retried after the delay given.
    let retry = tonic_types::StatusExt::get_error_details(&e)
        .retry_info()
        .and_then(|r| r.retry_delay);
    assert_eq!(retry, Some(Duration::from_secs(1)), "{e:?}");
    drop(stream);
}

/// A server that refuses a session for being full (too many connections,
/// here for the role) is answered RESOURCE_EXHAUSTED with its SQLSTATE, as
/// a statement refused for it is, not as an unreachable source without a code.
#[tokio::test]
async fn a_server_full_at_connect_keeps_its_sqlstate() {
    let pg = pg_direct().await;
    let password = std::env::var("WEIR_TEST_PG_PASSWORD")
        .map(|p| format!(" PASSWORD '{}'", p.replace('\'', "''")))
        .unwrap_or_default();
    pg.batch_execute("DROP ROLE IF EXISTS weir_full_role")
        .await
        .expect("drop");
    pg.batch_execute(&format!(
        "CREATE ROLE weir_full_role LOGIN CONNECTION LIMIT 0{password}"
    ))
    .await
    .expect("role");
    let user = format!("user = \"{}\"", env_or("WEIR_TEST_PG_USER", "postgres"));
    let source = postgres("fullrole", "pg", "").replace(&user, "user = \"weir_full_role\"");
    let server = TestServer::start(&tenant("fullrole", "", &source)).await;
    let client = server.client("key-fullrole").await;
    let err = client
        .execute("pg", "SELECT 1", vec![])
        .await
        .expect_err("no session for the role");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::ResourceExhausted, "53300"),
        "{err:?}"
    );
    server.stop().await;
    pg.batch_execute("DROP ROLE weir_full_role").await.expect("drop");
}

/// A login whose own settings turn standard_conforming_strings off (any role
/// may do that to itself) would have PostgreSQL read `\'` in a plain string
/// as a quote while Weir's statement checks read it as the string's end: a
/// session change hidden in such a text would reach the next caller of the
/// session unreset. Sessions start with the setting on.
#[tokio::test]
async fn strings_are_read_alike_by_weir_and_postgres() {
    setup(
        "DROP ROLE IF EXISTS weir_scs_off;
         CREATE ROLE weir_scs_off LOGIN PASSWORD 'weir-scs-off';
         ALTER ROLE weir_scs_off SET standard_conforming_strings = off;",
    )
    .await;
    let source = role_source(
        "scs",
        "pg",
        "weir_scs_off",
        "weir-scs-off",
        "read_only = true\n[tenants.scs.sources.pg.pool]\nmax_size = 1\n",
    );
    let server = TestServer::start(&tenant("scs", "", &source)).await;
    let client = server.client("key-scs").await;
    let smuggled = "SELECT '\\' ' , set_config($$application_name$$, $$weir_smuggled$$, false) , '\\' '";
    let _ = client.execute("pg", smuggled, vec![]).await;
    let name = client
        .execute("pg", "SHOW application_name", vec![])
        .await
        .expect("show");
    assert_ne!(text(&name.rows[0].values[0]), "weir_smuggled");
    let plain = client
        .execute("pg", "SELECT 'a\\b'", vec![])
        .await
        .expect("a backslash");
    assert_eq!(text(&plain.rows[0].values[0]), "a\\b");
    server.stop().await;
    setup("DROP ROLE weir_scs_off;").await;
}

/// The session reset names pg_catalog's functions: a role whose own
/// search_path puts another schema first (any role may set its own) would
/// otherwise have its functions run in every reset, here failing them all.
#[tokio::test]
async fn the_session_reset_runs_pg_catalogs_functions_whatever_the_search_path() {
    setup(
        "DROP ROLE IF EXISTS weir_path_role;
         CREATE ROLE weir_path_role LOGIN PASSWORD 'weir-path-role';
         ALTER ROLE weir_path_role SET search_path = public, pg_catalog;
         CREATE OR REPLACE FUNCTION public.pg_advisory_unlock_all() RETURNS void LANGUAGE plpgsql
           AS $$ BEGIN RAISE EXCEPTION 'weir: the reset ran a function of the role''s'; END $$;
         CREATE OR REPLACE FUNCTION public.quote_ident(text) RETURNS text LANGUAGE plpgsql
           AS $$ BEGIN RAISE EXCEPTION 'weir: the reset ran a function of the role''s'; END $$;",
    )
    .await;
    let source = role_source(
        "path",
        "pg",
        "weir_path_role",
        "weir-path-role",
        "[tenants.path.sources.pg.pool]\nmax_size = 1\n",
    );
    let server = TestServer::start(&tenant("path", "", &source)).await;
    let client = server.client("key-path").await;
    // Each changes the session, so the next call is reset first.
    for sql in [
        "SELECT set_config('application_name', 'changed', false)",
        "PREPARE weir_path_prepared AS SELECT 1",
        "SELECT 1",
    ] {
        client.execute("pg", sql, vec![]).await.expect(sql);
    }
    server.stop().await;
    setup(
        "DROP FUNCTION public.pg_advisory_unlock_all(); DROP FUNCTION public.quote_ident(text);
         DROP ROLE weir_path_role;",
    )
    .await;
}

/// A statement that sets `client_encoding` is refused, pooled or in a
/// transaction: Weir sends text as UTF-8, so in a transaction every later
/// text parameter would be stored mangled, without an error.
#[tokio::test]
async fn statements_that_set_client_encoding_are_refused() {
    let server = TestServer::start(&config("")).await;
    let client = server.client("key-acme").await;
    for sql in [
        "SET client_encoding = 'LATIN1'",
        "SET NAMES 'LATIN1'",
        "SELECT set_config('client_encoding', 'LATIN1', false)",
    ] {
        let err = client.execute("pg", sql, vec![]).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(err.message().contains("client_encoding"), "{err:?}");
    }
    // Other settings, and the word as a value, are not refused.
    client
        .execute("pg", "SET search_path TO names, public", vec![])
        .await
        .expect("search_path");
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "pg", "SET LOCAL client_encoding TO 'LATIN1'", vec![])
        .await
        .expect_err("in a transaction");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let r = client
        .execute_in(
            &tx,
            "pg",
            "SELECT $1::text AS t, current_setting('client_encoding') AS e",
            vec!["é".into()],
        )
        .await
        .expect("the transaction goes on");
    assert_eq!((text(&r.rows[0].values[0]), text(&r.rows[0].values[1])), ("é", "UTF8"));
    client.commit(&tx).await.expect("commit");
    server.stop().await;
}

/// A catalog call given up on while its query waits for a lock (a
/// migration's ACCESS EXCLUSIVE) cancels that query before its session
/// serves the next call: queued behind it, the next statement would wait
/// for the lock too, and a cancel sent on its behalf would stop the
/// catalog query instead of it.
#[tokio::test]
async fn a_catalog_call_given_up_on_leaves_no_query_on_its_session() {
    let toml = tenant(
        "cat",
        "statement_timeout = \"1s\"",
        &postgres("cat", "pg", "[tenants.cat.sources.pg.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-cat").await;
    let table = "weir_locked_catalog";
    client
        .execute("pg", &format!("DROP TABLE IF EXISTS {table}"), vec![])
        .await
        .expect("drop");
    client
        .execute("pg", &format!("CREATE TABLE {table} (id int PRIMARY KEY)"), vec![])
        .await
        .expect("create");
    let pg = pg_direct().await;
    pg.batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .await
        .expect("lock");
    let err = client
        .describe_table("pg", "", table)
        .await
        .expect_err("waits for the lock past its time");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let started = std::time::Instant::now();
    let r = client
        .execute("pg", "SELECT 1 AS one", vec![])
        .await
        .expect("the session is free for the next call");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    pg.batch_execute("ROLLBACK").await.expect("unlock");
    client
        .execute("pg", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("drop");
    server.stop().await;
}

/// The transaction `tx` on source `pg` is still open: a statement runs in
/// it, and it commits.
async fn still_open_and_commits(client: &weir_client::WeirClient, tx: &[u8]) {
    let r = client
        .execute_in(tx, "pg", "SELECT 1 AS one", vec![])
        .await
        .expect("the transaction is still open");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    client.commit(tx).await.expect("commit");
}

/// A transaction running a statement longer than its idle timeout is not
/// reaped, and meanwhile it stays found and counted: the tenant cannot open
/// one past `max_open_transactions`, and its handle is never NOT_FOUND
/// while the reaper waits for the statement to end.
#[tokio::test]
async fn a_transaction_busy_past_its_idle_timeout_stays_open_and_counted() {
    let toml = tenant(
        "busy",
        "transaction_idle_timeout = \"1s\"\nstatement_timeout = \"10s\"\nmax_open_transactions = 1",
        &postgres("busy", "pg", "[tenants.busy.sources.pg.pool]\nmax_size = 3\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-busy").await;
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let sleeper = {
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move { client.execute_in(&tx, "pg", "SELECT pg_sleep(3)", vec![]).await })
    };
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(2700) {
        match client.begin("pg", IsolationLevel::Unspecified, false).await {
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
            Ok(second) => {
                let _ = client.rollback(&second).await;
                panic!("a second transaction opened at {:?}", started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A request that could never succeed is told so, not sent to retry
    // after a limit it would meet again.
    let err = client
        .query()
        .begin_transaction(pb::BeginTransactionRequest {
            source: "pg".into(),
            isolation: 99,
            ..Default::default()
        })
        .await
        .expect_err("an unknown isolation level");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    sleeper.await.expect("task").expect("the long statement ran to its end");
    still_open_and_commits(&client, &tx).await;
    server.stop().await;
}

/// A streamed write that hands back rows commits once its client has taken
/// them, and that wait is within the statement's time limit: a client slow
/// to take the last rows does not hold the write's locks past it, and the
/// write is rolled back.
#[tokio::test]
async fn a_streamed_write_whose_rows_are_taken_past_its_time_limit_is_rolled_back() {
    setup("DROP TABLE IF EXISTS weir_slow_taker; CREATE TABLE weir_slow_taker (id int, filler text)").await;
    let server = TestServer::start(&config("statement_timeout = \"3s\"")).await;
    let client = server.client("key-acme").await;
    // Five messages of 2.5 MB: the first fills the client's 2 MiB window,
    // the others the stream's buffer (four messages), so the statement ends
    // at once and its last rows wait for the client past the time limit.
    let request = pb::ExecuteStreamRequest {
        source: "pg".into(),
        sql: "INSERT INTO weir_slow_taker SELECT g, repeat('x', 2500000) FROM generate_series(1, 5) g \
              RETURNING id, filler"
            .into(),
        max_batch_rows: 1,
        ..Default::default()
    };
    let mut stream = client
        .query()
        .execute_stream(request)
        .await
        .expect("stream")
        .into_inner();
    assert!(stream.message().await.expect("the metadata").is_some());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let outcome = async {
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let e = outcome.expect_err("its rows were taken past the time limit");
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::DeadlineExceeded, "STATEMENT_TIMEOUT"),
        "{e:?}"
    );
    assert_eq!(
        pg_count(&pg_direct().await, "weir_slow_taker").await,
        0,
        "the write was rolled back"
    );
    server.stop().await;
}

/// A statement that outlasts its transaction's idle timeout and succeeds
/// leaves the transaction open: the reaper, which decided before it had
/// the session, used to wait for the statement and roll back right after
/// its caller was told it succeeded.
#[tokio::test]
async fn a_statement_longer_than_the_idle_timeout_keeps_its_transaction() {
    let toml = tenant(
        "long",
        "transaction_idle_timeout = \"2s\"\nstatement_timeout = \"10s\"",
        &postgres("long", "pg", ""),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-long").await;
    let tx = client
        .begin("pg", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    // Ends within the reaper's wait for the session (1 s after its first
    // look past the idle timeout, which comes within 0.5 s of it).
    client
        .execute_in(&tx, "pg", "SELECT pg_sleep(2.5)", vec![])
        .await
        .expect("the long statement");
    still_open_and_commits(&client, &tx).await;
    server.stop().await;
}

/// A Commit whose call ends first (its deadline) still ends the
/// transaction: its handle, connection and place in the tenant's limit are
/// let go once the COMMIT is answered, not at the idle timeout.
#[tokio::test]
async fn a_commit_cut_by_its_deadline_frees_the_transactions_place() {
    let pg = pg_direct().await;
    let table = table_with_a_slow_commit(&pg, "cutcommit", 2.5).await;
    let toml = tenant("cut", "max_open_transactions = 1", &postgres("cut", "db", ""));
    let server = TestServer::start(&toml).await;
    let client = server.client("key-cut").await;
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", &format!("INSERT INTO {table} VALUES (1)"), vec![])
        .await
        .expect("insert");
    let mut request = tonic::Request::new(pb::CommitRequest {
        transaction_id: tx.clone(),
    });
    // Long enough to reach the gateway on a loaded machine, far shorter than the COMMIT.
    request.set_timeout(Duration::from_millis(800));
    let e = client.query().commit(request).await.expect_err("cut by its deadline");
    assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled), "{e:?}");
    let started = std::time::Instant::now();
    let second = loop {
        match client.begin("db", IsolationLevel::Unspecified, false).await {
            Ok(second) => break second,
            Err(e) => {
                assert_eq!(reason(&e), "TRANSACTION_LIMIT", "{e:?}");
                assert!(
                    started.elapsed() < Duration::from_secs(6),
                    "the cut Commit still holds the tenant's only transaction"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    client.rollback(&second).await.expect("rollback");
    assert_eq!(pg_count(&pg, &table).await, 1, "the COMMIT ran to its end");
    pg.batch_execute(&format!("DROP TABLE {table}; DROP FUNCTION {table}_slow()"))
        .await
        .expect("cleanup");
    server.stop().await;
}

/// A statement Weir refused when it described it (a column of a type it
/// does not support) is prepared again on its next call: after the table
/// is changed, the same text runs, on the same session.
#[tokio::test]
async fn a_statement_refused_for_its_columns_runs_once_the_table_is_changed() {
    let toml = tenant(
        "stale",
        "",
        &postgres("stale", "pg", "[tenants.stale.sources.pg.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-stale").await;
    let table = "weir_refused_columns";
    for sql in [
        format!("DROP TABLE IF EXISTS {table}"),
        format!("CREATE TABLE {table} (id int, pt point)"),
        format!("INSERT INTO {table} VALUES (1, '(1,2)')"),
    ] {
        client.execute("pg", &sql, vec![]).await.expect("setup");
    }
    let select = format!("SELECT * FROM {table}");
    let err = client.execute("pg", &select, vec![]).await.expect_err("point");
    assert_eq!(reason(&err), "UNSUPPORTED_TYPE", "{err:?}");
    client
        .execute("pg", &format!("ALTER TABLE {table} DROP COLUMN pt"), vec![])
        .await
        .expect("alter");
    let r = client
        .execute("pg", &select, vec![])
        .await
        .expect("prepared again for the changed table");
    assert_eq!((r.columns.len(), int(&r.rows[0].values[0])), (1, 1));
    client
        .execute("pg", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("drop");
    server.stop().await;
}

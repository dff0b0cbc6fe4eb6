//! MySQL/MariaDB specifics beyond the conformance suite: every column type,
//! unsigned integers, zero dates, isolation levels and the server flavour.

mod common;

use common::*;
use mysql_async::prelude::Queryable;
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;
use weir_client::weir_proto::v1::IsolationLevel;

fn config() -> String {
    tenant("shop", "", &mysql("shop", "maria", ""))
}

#[tokio::test]
async fn every_mysql_type_maps_to_a_value() {
    let mut direct = mysql_direct().await;
    direct
        .query_drop(
            "DROP TABLE IF EXISTS weir_my_types;
             CREATE TABLE weir_my_types (
               ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, mi MEDIUMINT, i INT, iu INT UNSIGNED,
               bi BIGINT, biu BIGINT UNSIGNED, de DECIMAL(30,10), fl FLOAT, db DOUBLE,
               ch CHAR(3), vc VARCHAR(20), tx TEXT, bn BINARY(2), vb VARBINARY(8), bl BLOB,
               d DATE, t TIME(3), dt DATETIME(6), ts TIMESTAMP(6) NULL, y YEAR, j JSON,
               e ENUM('small','large'), st SET('a','b','c'), bt BIT(10), n INT
             ) DEFAULT CHARSET = utf8mb4;
             INSERT INTO weir_my_types VALUES (
               -128, 255, -32768, -8388608, -2147483648, 4294967295,
               -9223372036854775808, 18446744073709551615, 12345678901234567890.0123456789, 1.5, 2.25,
               'ab', 'vär 😀', 'long text', x'0102', x'ff00', x'deadbeef',
               '2024-02-29', '13:14:15.678', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05', 2024, '{\"a\": 1}',
               'large', 'a,c', b'1000000001', NULL)",
        )
        .await
        .expect("setup");
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let r = client
        .execute("maria", "SELECT * FROM weir_my_types", vec![])
        .await
        .expect("select every type");
    let col = |name: &str| r.columns.iter().position(|c| c.name == name).expect(name);
    let at = |name: &str| r.rows[0].values[col(name)].kind.clone().expect("kind");

    assert_eq!(at("ti"), Kind::Int64Value(-128));
    assert_eq!(at("tiu"), Kind::Int64Value(255));
    assert_eq!(at("si"), Kind::Int64Value(-32768));
    assert_eq!(at("mi"), Kind::Int64Value(-8388608));
    assert_eq!(at("i"), Kind::Int64Value(-2147483648));
    assert_eq!(at("iu"), Kind::Int64Value(4294967295));
    assert_eq!(at("bi"), Kind::Int64Value(i64::MIN));
    assert_eq!(
        at("biu"),
        Kind::Uint64Value(u64::MAX),
        "BIGINT UNSIGNED keeps its full range"
    );
    assert_eq!(at("de"), Kind::DecimalValue("12345678901234567890.0123456789".into()));
    assert_eq!(at("fl"), Kind::DoubleValue(1.5));
    assert_eq!(at("db"), Kind::DoubleValue(2.25));
    assert_eq!(at("ch"), Kind::StringValue("ab".into()));
    assert_eq!(at("vc"), Kind::StringValue("vär 😀".into()), "utf8mb4 throughout");
    assert_eq!(at("tx"), Kind::StringValue("long text".into()));
    assert_eq!(at("bn"), Kind::BytesValue(vec![1, 2]));
    assert_eq!(at("vb"), Kind::BytesValue(vec![0xff, 0]));
    assert_eq!(at("bl"), Kind::BytesValue(vec![0xde, 0xad, 0xbe, 0xef]));
    assert_eq!(
        at("d"),
        Kind::DateValue(pb::Date {
            year: 2024,
            month: 2,
            day: 29
        })
    );
    assert_eq!(
        at("t"),
        Kind::TimeValue(pb::TimeOfDay {
            hours: 13,
            minutes: 14,
            seconds: 15,
            nanos: 678_000_000,
            utc_offset_seconds: None
        })
    );
    assert_eq!(
        at("dt"),
        Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_704_164_645,
            nanos: 123_456_000
        })
    );
    // Sessions run in UTC, so TIMESTAMP values are UTC instants.
    assert_eq!(
        at("ts"),
        Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_704_164_645,
            nanos: 0
        })
    );
    assert_eq!(at("y"), Kind::Int64Value(2024));
    // MariaDB's JSON is LONGTEXT with a check: it arrives as text.
    assert_eq!(at("j"), Kind::StringValue("{\"a\": 1}".into()));
    assert_eq!(at("e"), Kind::StringValue("large".into()));
    assert_eq!(at("st"), Kind::StringValue("a,c".into()));
    assert_eq!(at("bt"), Kind::Uint64Value(513));
    assert!(is_null(&r.rows[0].values[col("n")]));

    let meta = |name: &str| &r.columns[col(name)];
    assert_eq!(meta("biu").native_type, "BIGINT UNSIGNED");
    assert_eq!(meta("biu").r#type, pb::ColumnType::Uint as i32);
    assert_eq!((meta("de").precision, meta("de").scale), (Some(30), Some(10)));
    assert_eq!(meta("ts").r#type, pb::ColumnType::TimestampTz as i32);
    assert_eq!(meta("dt").r#type, pb::ColumnType::Timestamp as i32);
    assert_eq!(meta("e").native_type, "ENUM");

    // Out-of-day TIME values are durations: an interval, not a wrapped time of day.
    let r = client
        .execute("maria", "SELECT CAST('-01:00:00' AS TIME) AS neg", vec![])
        .await
        .expect("negative time");
    assert_eq!(
        r.rows[0].values[0].kind,
        Some(Kind::IntervalValue(pb::Interval {
            months: 0,
            days: 0,
            microseconds: -3_600_000_000
        }))
    );

    let d = client
        .describe_table("maria", "", "weir_my_types")
        .await
        .expect("describe");
    let described = |name: &str| {
        d.columns
            .iter()
            .filter_map(|c| c.column.as_ref())
            .find(|c| c.name == name)
            .cloned()
            .expect(name)
    };
    assert_eq!(described("biu").r#type, pb::ColumnType::Uint as i32);
    assert_eq!(described("de").native_type, "decimal(30,10)");
    assert_eq!((described("de").precision, described("de").scale), (Some(30), Some(10)));
    assert_eq!(described("vc").max_length, Some(20));
    assert!(
        !d.change_streams.expect("readiness").ready,
        "no binlog here, no primary key"
    );
    server.stop().await;
}

#[tokio::test]
async fn every_mysql_type_reads_the_same_as_arrow() {
    // The table of the test above, with a row of NULLs, read as rows and as
    // Arrow IPC: every cell the same.
    let mut direct = mysql_direct().await;
    direct
        .query_drop(
            "DROP TABLE IF EXISTS weir_my_arrow;
             CREATE TABLE weir_my_arrow (
               id INT PRIMARY KEY, ti TINYINT, tiu TINYINT UNSIGNED, bi BIGINT, biu BIGINT UNSIGNED,
               de DECIMAL(30,10), fl FLOAT, db DOUBLE, vc VARCHAR(20), tx TEXT, bn BINARY(2), bl BLOB,
               d DATE, t TIME(3), dt DATETIME(6), ts TIMESTAMP(6) NULL, y YEAR, j JSON,
               e ENUM('small','large'), st SET('a','b','c'), bt BIT(10), flag BOOLEAN
             ) DEFAULT CHARSET = utf8mb4;
             INSERT INTO weir_my_arrow VALUES (
               1, -128, 255, -9223372036854775808, 18446744073709551615, 12345678901234567890.0123456789, 1.5, 2.25,
               'vär 😀', 'long text', x'0102', x'deadbeef', '1969-07-20', '13:14:15.678',
               '1900-01-02 03:04:05.123456', '2024-01-02 03:04:05', 2024, '{\"a\": 1}', 'large', 'a,c',
               b'1000000001', true);
             INSERT INTO weir_my_arrow (id) VALUES (2)",
        )
        .await
        .expect("setup");
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let sql = "SELECT * FROM weir_my_arrow ORDER BY id";
    let rows = client.execute("maria", sql, vec![]).await.expect("rows");
    let mut stream = client.execute_stream_arrow("maria", sql, vec![]).await.expect("arrow");
    let mut batches = Vec::new();
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        batches.push(batch);
    }
    assert_eq!(rows.rows.len(), 2);
    assert_arrow_holds_rows(&batches, &rows.rows);
    server.stop().await;
}

/// A procedure that returns two result sets fails rather than dropping the
/// second; one that returns one (then its closing status) answers with it.
/// A view's comment column holds the word VIEW (or the error of a view
/// whose table is gone): views are listed without a comment.
#[tokio::test]
async fn views_are_listed_without_the_servers_word_for_them() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    for sql in [
        "DROP VIEW IF EXISTS weir_my_view_gone, weir_my_view",
        "DROP TABLE IF EXISTS weir_my_viewed",
        "CREATE TABLE weir_my_viewed (id INT PRIMARY KEY) COMMENT 'kept'",
        "CREATE VIEW weir_my_view AS SELECT id FROM weir_my_viewed",
        "CREATE TABLE weir_my_view_base (id INT)",
        "CREATE VIEW weir_my_view_gone AS SELECT id FROM weir_my_view_base",
        "DROP TABLE weir_my_view_base",
        "CREATE OR REPLACE SEQUENCE weir_my_sequence",
    ] {
        client.execute("maria", sql, vec![]).await.expect(sql);
    }
    let tables = client.list_tables("maria", "").await.expect("tables");
    // The database's name in another case: another database where the
    // server compares names by case (lower_case_table_names = 0, Linux's
    // default), the same one otherwise.
    let settings = client
        .execute("maria", "SELECT @@lower_case_table_names, DATABASE()", vec![])
        .await
        .expect("settings");
    let upper = text(&settings.rows[0].values[1]).to_uppercase();
    let listed = client.list_tables("maria", &upper).await;
    match &settings.rows[0].values[0].kind {
        Some(pb::value::Kind::Uint64Value(0) | pb::value::Kind::Int64Value(0)) => {
            assert_eq!(listed.map(|_| ()).map_err(|e| e.code()), Err(Code::NotFound))
        }
        _ => assert!(!listed.expect("the same database").is_empty()),
    }
    // MariaDB's catalog lists sequences among tables; they are not tables.
    assert!(!tables.iter().any(|t| t.name == "weir_my_sequence"), "{tables:?}");
    client
        .execute("maria", "DROP SEQUENCE weir_my_sequence", vec![])
        .await
        .expect("drop sequence");
    let comment = |name: &str| {
        tables
            .iter()
            .find(|t| t.name == name)
            .map(|t| (t.kind, t.comment.clone()))
            .expect(name)
    };
    assert_eq!(
        comment("weir_my_viewed"),
        (pb::TableKind::Table as i32, "kept".to_string())
    );
    assert_eq!(comment("weir_my_view"), (pb::TableKind::View as i32, String::new()));
    assert_eq!(
        comment("weir_my_view_gone"),
        (pb::TableKind::View as i32, String::new())
    );
    client
        .execute("maria", "DROP VIEW weir_my_view_gone, weir_my_view", vec![])
        .await
        .expect("drop views");
    client
        .execute("maria", "DROP TABLE weir_my_viewed", vec![])
        .await
        .expect("drop table");
    server.stop().await;
}

/// A page of tables is chosen by name, which MariaDB's catalog lists without
/// opening a table, and only its own tables are opened for their estimates
/// and comments: in one query, every table of the listing was opened to
/// sort them, for each page again.
#[tokio::test]
async fn a_page_of_tables_opens_only_its_own_tables() {
    let mut direct = mysql_direct().await;
    let mut ddl = String::from("DROP DATABASE IF EXISTS weir_my_many; CREATE DATABASE weir_my_many;");
    for i in 0..300 {
        ddl.push_str(&format!(
            "CREATE TABLE weir_my_many.t{i:03} (id INT PRIMARY KEY) COMMENT 'number {i}';"
        ));
    }
    direct.query_drop(ddl).await.expect("300 tables");
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    async fn opened(direct: &mut mysql_async::Conn) -> u64 {
        let row: Option<(String, u64)> = direct
            .query_first("SHOW GLOBAL STATUS LIKE 'Opened_tables'")
            .await
            .expect("status");
        row.expect("a row").1
    }
    direct.query_drop("FLUSH TABLES").await.expect("flush");
    let before = opened(&mut direct).await;
    let page = |token: String| {
        let request = pb::ListTablesRequest {
            source: "maria".into(),
            schema: "weir_my_many".into(),
            page_size: 10,
            page_token: token,
        };
        let mut api = client.schema();
        async move { api.list_tables(request).await.expect("a page").into_inner() }
    };
    let first = page(String::new()).await;
    let second = page(first.next_page_token.clone()).await;
    let opened_by_pages = opened(&mut direct).await - before;
    let names: Vec<_> = first
        .tables
        .iter()
        .chain(&second.tables)
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(names, (0..20).map(|i| format!("t{i:03}")).collect::<Vec<_>>());
    assert_eq!(second.tables[5].comment, "number 15");
    assert_eq!(second.tables[5].row_estimate, Some(0));
    // 20 tables, and what other tests opened meanwhile; not 600.
    assert!(
        opened_by_pages < 150,
        "{opened_by_pages} tables opened for two pages of 10"
    );
    direct.query_drop("DROP DATABASE weir_my_many").await.expect("drop");
    server.stop().await;
}

#[tokio::test]
async fn a_second_result_set_is_refused_not_dropped() {
    let mut direct = mysql_direct().await;
    direct
        .query_drop(
            "DROP PROCEDURE IF EXISTS weir_my_two_sets;
             CREATE PROCEDURE weir_my_two_sets() BEGIN SELECT 1 AS a; SELECT 2 AS b; END;
             DROP PROCEDURE IF EXISTS weir_my_one_set;
             CREATE PROCEDURE weir_my_one_set() BEGIN SELECT 7 AS a; END",
        )
        .await
        .expect("setup");
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let one = client
        .execute("maria", "CALL weir_my_one_set()", vec![])
        .await
        .expect("one result set");
    assert_eq!(int(&one.rows[0].values[0]), 7);
    let err = client
        .execute("maria", "CALL weir_my_two_sets()", vec![])
        .await
        .expect_err("two result sets");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("more than one result set") && err.message().contains("it ran"),
        "{}",
        err.message()
    );
    assert_serves(&client, "maria", 3).await;
    server.stop().await;
}

/// A direct session that has run `setup`, and a gateway client in a transaction of its own.
async fn in_a_transaction(setup: &str) -> (mysql_async::Conn, TestServer, weir_client::WeirClient, Vec<u8>) {
    let mut direct = mysql_direct().await;
    direct.query_drop(setup).await.expect("setup");
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let tx = client
        .begin("maria", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    (direct, server, client, tx)
}

/// A stream inside a transaction that its client leaves is killed on the
/// server, and what is left of its result is read then: the transaction's
/// next call (here its Commit) does not fail with the killed statement's
/// "query execution was interrupted".
#[tokio::test]
async fn a_transaction_goes_on_after_a_stream_its_client_left() {
    let (mut other, server, client, tx) = in_a_transaction(
        "DROP TABLE IF EXISTS weir_my_tx_left_stream;
         CREATE TABLE weir_my_tx_left_stream (id INT PRIMARY KEY) ENGINE = InnoDB",
    )
    .await;
    client
        .execute_in(&tx, "maria", "INSERT INTO weir_my_tx_left_stream VALUES (1)", vec![])
        .await
        .expect("insert");
    let mut stream = client
        .query()
        .execute_stream(pb::ExecuteStreamRequest {
            source: "maria".into(),
            sql: "SELECT seq FROM seq_1_to_50000000".into(),
            transaction_id: tx.clone(),
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("a first batch").expect("open");
    drop(stream);
    // The statement is killed once the server sees the client gone.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    client.commit(&tx).await.expect("the transaction commits");
    let rows: Vec<i64> = other
        .query("SELECT id FROM weir_my_tx_left_stream")
        .await
        .expect("read");
    assert_eq!(rows, [1]);
    other
        .query_drop("DROP TABLE weir_my_tx_left_stream")
        .await
        .expect("drop");
    server.stop().await;
}

/// A deadlock ends a MySQL transaction: the handle then refuses further
/// statements (which would have autocommitted) and Commit, as ABORTED.
#[tokio::test]
async fn a_transaction_that_lost_a_deadlock_takes_no_more_statements() {
    let (mut other, server, client, tx) = in_a_transaction(
        "DROP TABLE IF EXISTS weir_my_tx_deadlock;
         CREATE TABLE weir_my_tx_deadlock (id INT PRIMARY KEY, v INT) ENGINE = InnoDB;
         INSERT INTO weir_my_tx_deadlock SELECT seq, 0 FROM seq_1_to_300",
    )
    .await;
    client
        .execute_in(
            &tx,
            "maria",
            "UPDATE weir_my_tx_deadlock SET v = 1 WHERE id = 1",
            vec![],
        )
        .await
        .expect("row 1");
    // The other transaction changes more rows: InnoDB makes ours the victim.
    other.query_drop("START TRANSACTION").await.expect("begin");
    other
        .query_drop("UPDATE weir_my_tx_deadlock SET v = 2 WHERE id >= 2")
        .await
        .expect("rows 2 and on");
    let waiting = {
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move {
            client
                .execute_in(
                    &tx,
                    "maria",
                    "UPDATE weir_my_tx_deadlock SET v = 1 WHERE id = 2",
                    vec![],
                )
                .await
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mysql_running(&mut other, "UPDATE weir_my_tx_deadlock SET v = 1%").await == 0 {
        assert!(std::time::Instant::now() < deadline, "ours never waited for row 2");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    other
        .query_drop("UPDATE weir_my_tx_deadlock SET v = 2 WHERE id = 1")
        .await
        .expect("the other transaction goes on once ours gave way");
    other.query_drop("ROLLBACK").await.expect("rollback");
    let err = waiting.await.expect("task").expect_err("a deadlock");
    assert_eq!(engine_code(&err), "1213", "{}", err.message());

    assert_transaction_lost(
        &client,
        &tx,
        "maria",
        "INSERT INTO weir_my_tx_deadlock VALUES (1000, 9)",
    )
    .await;
    let left: Option<i64> = other
        .query_first("SELECT COUNT(*) FROM weir_my_tx_deadlock WHERE id = 1000 OR v <> 0")
        .await
        .expect("count");
    assert_eq!(left, Some(0), "no statement of the lost transaction autocommitted");
    assert_serves(&client, "maria", 2).await;
    server.stop().await;
}

/// MariaDB's snapshot isolation (on by default from 11.6.2) rolls a
/// transaction back when a row it read changed before it writes it (errno
/// 1020): the handle then takes no more statements, which would otherwise
/// autocommit one by one after the first half was lost, and Commit would say OK.
#[tokio::test]
async fn a_transaction_rolled_back_for_a_changed_row_takes_no_more_statements() {
    let (mut other, server, client, tx) = in_a_transaction(
        "DROP TABLE IF EXISTS weir_my_tx_snapshot;
         CREATE TABLE weir_my_tx_snapshot (id INT PRIMARY KEY, v INT) ENGINE = InnoDB;
         INSERT INTO weir_my_tx_snapshot VALUES (1, 0)",
    )
    .await;
    for sql in [
        "SET SESSION innodb_snapshot_isolation = ON",
        "INSERT INTO weir_my_tx_snapshot VALUES (2, 0)",
        "SELECT v FROM weir_my_tx_snapshot WHERE id = 1",
    ] {
        client.execute_in(&tx, "maria", sql, vec![]).await.expect(sql);
    }
    other
        .query_drop("UPDATE weir_my_tx_snapshot SET v = 5 WHERE id = 1")
        .await
        .expect("the other session's update");
    let err = client
        .execute_in(
            &tx,
            "maria",
            "UPDATE weir_my_tx_snapshot SET v = v + 1 WHERE id = 1",
            vec![],
        )
        .await
        .expect_err("the row changed since it was read");
    assert_eq!(
        (engine_code(&err).as_str(), err.code()),
        ("1020", Code::Aborted),
        "{err:?}"
    );
    assert_transaction_lost(&client, &tx, "maria", "INSERT INTO weir_my_tx_snapshot VALUES (3, 9)").await;
    let rows: Option<i64> = other
        .query_first("SELECT COUNT(*) FROM weir_my_tx_snapshot")
        .await
        .expect("count");
    assert_eq!(
        rows,
        Some(1),
        "nothing of the lost transaction was kept or autocommitted"
    );
    server.stop().await;
}

#[tokio::test]
async fn zero_dates_become_null() {
    let mut direct = mysql_direct().await;
    direct
        .query_drop(
            "SET SESSION sql_mode = '';
             DROP TABLE IF EXISTS weir_my_zero;
             CREATE TABLE weir_my_zero (d DATE, dt DATETIME);
             INSERT INTO weir_my_zero VALUES ('0000-00-00', '0000-00-00 00:00:00'), ('2024-00-10', '2024-01-01 00:00:00')",
        )
        .await
        .expect("setup");
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let r = client
        .execute("maria", "SELECT d, dt FROM weir_my_zero", vec![])
        .await
        .expect("zero dates");
    assert!(is_null(&r.rows[0].values[0]) && is_null(&r.rows[0].values[1]));
    assert!(is_null(&r.rows[1].values[0]), "a zero month is not a date either");
    assert!(!is_null(&r.rows[1].values[1]));
    // A NOT NULL column can hold zero dates, which come back NULL: the
    // metadata says so. A date that does not exist otherwise is refused.
    direct
        .query_drop(
            "SET SESSION sql_mode = 'ALLOW_INVALID_DATES';
             DROP TABLE IF EXISTS weir_my_zero_nn;
             CREATE TABLE weir_my_zero_nn (d DATE NOT NULL, n INT NOT NULL);
             INSERT INTO weir_my_zero_nn VALUES ('0000-00-00', 1), ('2024-02-31', 2)",
        )
        .await
        .expect("setup");
    let r = client
        .execute("maria", "SELECT d, n FROM weir_my_zero_nn WHERE n = 1", vec![])
        .await
        .expect("zero date");
    assert!(is_null(&r.rows[0].values[0]));
    assert!(r.columns[0].nullable, "a NOT NULL date column can still read as NULL");
    assert!(!r.columns[1].nullable);
    let e = client
        .execute("maria", "SELECT d FROM weir_my_zero_nn WHERE n = 2", vec![])
        .await
        .expect_err("2024-02-31 is no date");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("2024-02-31"), "{e:?}");
    direct.query_drop("DROP TABLE weir_my_zero_nn").await.expect("drop");
    server.stop().await;
}

#[tokio::test]
async fn parameters_of_every_kind_bind() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let ts = pb::Value {
        kind: Some(Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
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
    let r = client
        .execute(
            "maria",
            "SELECT ? + 1, CAST(? AS DECIMAL(10,6)) * 2, CAST(? AS DATETIME), CAST(? AS DATE), ?, HEX(?), ? IS NULL, ?",
            vec![
                41i64.into(),
                dec,
                ts,
                date,
                "héllo".into(),
                vec![0u8, 255].into(),
                pb::Value::null(),
                u64::MAX.into(),
            ],
        )
        .await
        .expect("typed parameters");
    let v: Vec<_> = r.rows[0].values.iter().map(|v| v.kind.clone().expect("kind")).collect();
    assert_eq!(v[0], Kind::Int64Value(42));
    assert_eq!(v[1], Kind::DecimalValue("-0.000246".into()));
    assert_eq!(
        v[2],
        Kind::TimestampValue(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0
        })
    );
    assert_eq!(
        v[3],
        Kind::DateValue(pb::Date {
            year: 1999,
            month: 12,
            day: 31
        })
    );
    assert_eq!(v[4], Kind::StringValue("héllo".into()));
    assert_eq!(v[5], Kind::StringValue("00FF".into()));
    assert_eq!(v[6], Kind::Int64Value(1));
    assert_eq!(v[7], Kind::Uint64Value(u64::MAX));
    // An interval binds as a TIME (a duration too), and what reads back as
    // one binds back; months do not (their length varies).
    let interval = |months, microseconds| pb::Value {
        kind: Some(Kind::IntervalValue(pb::Interval {
            months,
            days: 0,
            microseconds,
        })),
    };
    let span = -(25 * 3_600_000_000 + 1);
    let r = client
        .execute("maria", "SELECT CAST(? AS TIME(6))", vec![interval(0, span)])
        .await
        .expect("an interval as a TIME");
    assert_eq!(r.rows[0].values[0], interval(0, span));
    let err = client
        .execute("maria", "SELECT ?", vec![interval(1, 0)])
        .await
        .expect_err("no months in a TIME");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "INVALID_PARAMETER");
    assert!(err.message().contains("months"), "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn isolation_levels_and_flavour() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let ping = client.test_connection("maria").await.expect("ping");
    assert!(
        ping.server_version.starts_with("MariaDB 10."),
        "{}",
        ping.server_version
    );
    assert_eq!(ping.database, "test");
    let sources = client.list_sources().await.expect("sources");
    assert_eq!(sources[0].engine, pb::Engine::Mysql as i32);
    // Isolation is observable: only READ COMMITTED sees a row committed
    // by someone else after the transaction's first read.
    let mut direct = mysql_direct().await;
    direct
        .query_drop(
            "CREATE TABLE IF NOT EXISTS weir_my_iso (id INT PRIMARY KEY) ENGINE = InnoDB; DELETE FROM weir_my_iso",
        )
        .await
        .expect("setup");
    for (level, sees_new_row) in [
        (IsolationLevel::RepeatableRead, false),
        (IsolationLevel::ReadCommitted, true),
    ] {
        let tx = client.begin("maria", level, false).await.expect("begin");
        let count = "SELECT COUNT(*) FROM weir_my_iso";
        let before = int(&client.execute_in(&tx, "maria", count, vec![]).await.expect("read").rows[0].values[0]);
        direct
            .query_drop("INSERT INTO weir_my_iso SELECT COALESCE(MAX(id), 0) + 1 FROM weir_my_iso")
            .await
            .expect("insert");
        let after = int(&client.execute_in(&tx, "maria", count, vec![]).await.expect("read").rows[0].values[0]);
        assert_eq!(after == before + 1, sees_new_row, "{level:?}");
        client.rollback(&tx).await.expect("rollback");
    }
    server.stop().await;
}

#[tokio::test]
async fn read_only_sources_refuse_writes_in_the_engine() {
    let mut direct = mysql_direct().await;
    direct
        .query_drop("CREATE TABLE IF NOT EXISTS weir_my_ro (id INT)")
        .await
        .expect("setup");
    let server = TestServer::start(&tenant("ro", "", &mysql("ro", "maria", "read_only = true\n"))).await;
    let client = server.client("key-ro").await;
    let err = client
        .execute("maria", "INSERT INTO weir_my_ro VALUES (1)", vec![])
        .await
        .expect_err("read-only source");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::PermissionDenied, "1792")
    );
    // The session setting, changed for one statement or for the session
    // (whose transaction DDL's implicit commit then ends).
    let err = client
        .execute(
            "maria",
            "SET STATEMENT tx_read_only = 0 FOR INSERT INTO weir_my_ro VALUES (1)",
            vec![],
        )
        .await
        .expect_err("not for one statement either");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let tx = client
        .begin("maria", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    for sql in [
        "SET SESSION TRANSACTION READ WRITE",
        "CREATE TABLE weir_my_ro_made (id INT)",
        "INSERT INTO weir_my_ro VALUES (2)",
    ] {
        let err = client.execute_in(&tx, "maria", sql, vec![]).await.expect_err(sql);
        assert_eq!(err.code(), Code::PermissionDenied, "{sql}: {err:?}");
    }
    client.rollback(&tx).await.expect("rollback");
    let made: Option<String> = direct
        .query_first("SHOW TABLES LIKE 'weir_my_ro_made'")
        .await
        .expect("tables");
    assert_eq!(made, None, "DDL ran on a read-only source");
    let r = client
        .execute("maria", "SELECT COUNT(*) FROM weir_my_ro", vec![])
        .await
        .expect("reads work");
    assert_eq!(int(&r.rows[0].values[0]), 0);
    server.stop().await;
}

/// A read-only transaction of a read-write source stays read-only: DDL's
/// implicit commit ended `START TRANSACTION READ ONLY`, and the DDL and
/// every write after it ran, autocommitted, so that Rollback undid nothing.
/// The session's characteristic refuses them; it goes with the transaction.
#[tokio::test]
async fn a_read_only_transaction_stays_read_only_past_ddl() {
    let mut direct = mysql_direct().await;
    direct
        .query_drop("DROP TABLE IF EXISTS weir_my_ro_tx_made; CREATE TABLE IF NOT EXISTS weir_my_ro_tx (id INT)")
        .await
        .expect("setup");
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let tx = client
        .begin("maria", IsolationLevel::Unspecified, true)
        .await
        .expect("begin read-only");
    for sql in [
        "CREATE TABLE weir_my_ro_tx_made (id INT)",
        "INSERT INTO weir_my_ro_tx VALUES (1)",
        "SET SESSION TRANSACTION READ WRITE",
    ] {
        let err = client.execute_in(&tx, "maria", sql, vec![]).await.expect_err(sql);
        assert_eq!(err.code(), Code::PermissionDenied, "{sql}: {err:?}");
    }
    client.rollback(&tx).await.expect("rollback");
    let made: Option<String> = direct
        .query_first("SHOW TABLES LIKE 'weir_my_ro_tx_made'")
        .await
        .expect("tables");
    assert_eq!(made, None, "DDL ran in a read-only transaction");
    // The pool's sessions are read-write again, for a transaction and alone.
    let tx = client
        .begin("maria", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "maria", "INSERT INTO weir_my_ro_tx VALUES (2)", vec![])
        .await
        .expect("a read-write transaction writes");
    client.rollback(&tx).await.expect("rollback");
    assert_serves(&client, "maria", 2).await;
    let count = client
        .execute("maria", "SELECT COUNT(*) FROM weir_my_ro_tx", vec![])
        .await
        .expect("count");
    assert_eq!(int(&count.rows[0].values[0]), 0);
    server.stop().await;
}

/// A statement's own `LOAD DATA LOCAL` asks the gateway for a file of its
/// choosing: it is refused as a bad request, reads nothing, and the source
/// goes on serving.
#[tokio::test]
async fn a_statements_own_load_data_local_reads_no_file() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    client
        .execute("maria", "CREATE TABLE IF NOT EXISTS weir_my_infile (line TEXT)", vec![])
        .await
        .expect("setup");
    let err = client
        .execute(
            "maria",
            "LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE weir_my_infile",
            vec![],
        )
        .await
        .expect_err("no file is read");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("BulkLoadService.Load"), "{}", err.message());
    let r = client
        .execute("maria", "SELECT COUNT(*) FROM weir_my_infile", vec![])
        .await
        .expect("the source still serves");
    assert_eq!(int(&r.rows[0].values[0]), 0);
    server.stop().await;
}

#[tokio::test]
async fn tls_sessions_are_encrypted_and_the_server_certificate_is_verified() {
    let mut direct = mysql_direct().await;
    let (have_ssl, cert): (String, String) = direct
        .query_first("SELECT @@have_ssl, @@ssl_cert")
        .await
        .expect("the server's TLS settings")
        .expect("one row");
    assert_eq!(
        have_ssl, "YES",
        "the test MariaDB serves TLS (scripts/services.sh turns it on)"
    );
    // Its certificate (made by scripts/services.sh) is self-signed for the
    // name localhost only: trusted as its own authority it verifies when the
    // source names localhost, and not when it names 127.0.0.1.
    let host = format!("host = \"{}\"", env_or("WEIR_TEST_MYSQL_HOST", "127.0.0.1"));
    let at_localhost = |name: &str, extra: &str| mysql("acme", name, extra).replace(&host, "host = \"localhost\"");
    let own_ca = format!("tls = true\ntls_ca_file = \"{cert}\"\n");
    let sources = [
        at_localhost("verified", &own_ca),
        mysql("acme", "trusting", "tls = true\ntrust_server_certificate = true\n"),
        mysql("acme", "plain", ""),
        mysql("acme", "web_roots", "tls = true\n"),
        mysql("acme", "wrong_host", &own_ca),
        plain_mysql("acme", "no_tls_server", "tls = true\ntrust_server_certificate = true\n"),
    ];
    let server = TestServer::start(&tenant("acme", "", &sources.concat())).await;
    let client = server.client("key-acme").await;
    let cipher = |source: &'static str| {
        let client = &client;
        async move {
            let r = client
                .execute(source, "SHOW SESSION STATUS LIKE 'Ssl_cipher'", vec![])
                .await
                .expect(source);
            match r.rows[0].values[1].kind.clone() {
                Some(Kind::StringValue(cipher)) => cipher,
                other => panic!("{source}: {other:?}"),
            }
        }
    };
    for source in ["verified", "trusting"] {
        assert!(!cipher(source).await.is_empty(), "{source}: the session is in TLS");
    }
    assert_eq!(cipher("plain").await, "", "without tls the session is plaintext");
    for (source, why) in [
        ("web_roots", "is not signed by an authority Weir trusts"),
        ("wrong_host", "is not valid for the source's host"),
    ] {
        let err = client.execute(source, "SELECT 1", vec![]).await.expect_err(source);
        assert_eq!(err.code(), Code::Unavailable, "{source}: {err:?}");
        assert!(err.message().contains(why), "{source}: {}", err.message());
        assert!(
            !err.message().contains("localhost") && !err.message().contains("127.0.0.1"),
            "no host named: {}",
            err.message()
        );
    }
    // A caller that leaves stops its statement: the KILL goes over TLS too.
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "verified".into(),
        sql: "SELECT SLEEP(20) AS tls_kill_probe".into(),
        ..Default::default()
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    client
        .query()
        .execute(request)
        .await
        .expect_err("the deadline passes first");
    let started = std::time::Instant::now();
    loop {
        if mysql_running(&mut direct, "%tls_kill_probe%").await == 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the statement was killed in the engine"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A server that offers no TLS is refused, never used in plaintext.
    let err = client
        .execute("no_tls_server", "SELECT 1", vec![])
        .await
        .expect_err("no TLS there");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("SSL"), "{}", err.message());
    server.stop().await;
}

/// A caller's mistakes get the code the other engines give them, with the
/// errno attached, not INTERNAL (which says the gateway has a bug).
#[tokio::test]
async fn caller_errors_get_the_codes_other_engines_give_them() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    let table = format!("weir_my_codes_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    client
        .execute(
            "maria",
            &format!("CREATE TABLE {table} (id INT PRIMARY KEY, e ENUM('a','b'), n INT NOT NULL)"),
            vec![],
        )
        .await
        .expect("create");
    client
        .execute(
            "maria",
            &format!(
                "CREATE TABLE {table}_parts (id INT) PARTITION BY RANGE (id) (PARTITION p0 VALUES LESS THAN (10))"
            ),
            vec![],
        )
        .await
        .expect("create partitioned");
    for (sql, code, errno) in [
        (
            format!("INSERT INTO {table} VALUES (1, 'z', 1)"),
            Code::InvalidArgument,
            "1265",
        ),
        (
            format!("INSERT INTO {table} (id, e) VALUES (2, 'a')"),
            Code::FailedPrecondition,
            "1364",
        ),
        (
            "BEGIN NOT ATOMIC SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'no such order'; END".to_string(),
            Code::FailedPrecondition,
            "1644",
        ),
        // They were INTERNAL (SQLSTATE HY000).
        ("SELECT DATE'2024-13-01'".to_string(), Code::InvalidArgument, "1525"),
        (
            "SELECT CAST('::1' AS INET6) + 1".to_string(),
            Code::InvalidArgument,
            "4078",
        ),
        (
            format!("INSERT INTO {table}_parts VALUES (20)"),
            Code::FailedPrecondition,
            "1526",
        ),
        (
            format!("INSERT INTO {table} VALUES (3, 'a', STR_TO_DATE('x', '%Y'))"),
            Code::InvalidArgument,
            "1411",
        ),
    ] {
        let e = client.execute("maria", &sql, vec![]).await.expect_err(&sql);
        assert_eq!((e.code(), engine_code(&e).as_str()), (code, errno), "{sql}: {e:?}");
    }
    client
        .execute("maria", &format!("DROP TABLE {table}, {table}_parts"), vec![])
        .await
        .expect("drop");
}

/// A statement abandoned while MariaDB prepares it (waiting for a metadata
/// lock behind an ALTER TABLE that waits for an open transaction) is killed,
/// as one abandoned while it runs: its connection serves the next caller
/// instead of waiting out lock_wait_timeout, a year by default.
#[tokio::test]
async fn a_statement_abandoned_while_being_prepared_is_killed() {
    let table = format!("weir_my_locked_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut reader = mysql_direct().await;
    reader
        .query_drop(format!("CREATE TABLE {table} (id INT)"))
        .await
        .expect("create");
    reader.query_drop("BEGIN").await.expect("begin");
    reader
        .query_drop(format!("SELECT * FROM {table}"))
        .await
        .expect("hold a shared metadata lock");
    let alter = {
        let table = table.clone();
        tokio::spawn(async move {
            let mut alterer = mysql_direct().await;
            alterer
                .query_drop(format!("ALTER TABLE {table} ADD COLUMN x INT"))
                .await
        })
    };
    // The ALTER waits for the reader's transaction.
    let mut waiting = false;
    for _ in 0..100 {
        waiting = mysql_running(&mut reader, &format!("ALTER TABLE {table}%")).await > 0;
        if waiting {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(waiting, "the ALTER is waiting");
    let toml = tenant(
        "m",
        "",
        &mysql("m", "maria", "[tenants.m.sources.maria.pool]\nmax_size = 1\n"),
    );
    let server = TestServer::start(&toml).await;
    let client = server.client("key-m").await;
    let ms = std::time::Duration::from_millis;
    let sql = format!("SELECT * FROM {table} WHERE id = 1");
    let e = execute_within(&client, &[], "maria", &sql, ms(300))
        .await
        .expect_err("its prepare waits behind the ALTER");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    execute_within(&client, &[], "maria", "SELECT 1", ms(5000))
        .await
        .expect("the connection is free for the next caller");
    reader.query_drop("COMMIT").await.expect("commit");
    alter.await.expect("task").expect("alter");
    reader.query_drop(format!("DROP TABLE {table}")).await.expect("drop");
}

/// Sessions of the MariaDB user `user`.
async fn sessions_of(direct: &mut mysql_async::Conn, user: &str) -> i64 {
    let n: Option<i64> = direct
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ?",
            (user,),
        )
        .await
        .expect("processlist");
    n.unwrap_or(0)
}

/// Abandons a statement marked `marker` at a 300 ms deadline and waits
/// until MariaDB no longer runs it (it was killed).
async fn abandon_and_see_it_killed(client: &weir_client::WeirClient, direct: &mut mysql_async::Conn, marker: &str) {
    let ms = std::time::Duration::from_millis;
    let sql = format!("SELECT SLEEP(30), '{marker}'");
    let e = execute_within(client, &[], "maria", &sql, ms(300))
        .await
        .expect_err("abandoned at its deadline");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    for _ in 0..100 {
        if mysql_running(direct, &format!("%{marker}%")).await == 0 {
            return;
        }
        tokio::time::sleep(ms(50)).await;
    }
    panic!("{marker} is still running: it was not killed");
}

/// Abandoned statements are killed from one session the source keeps, not
/// a login each, and a kept session the server closed is opened again.
#[tokio::test]
async fn abandoned_statements_are_killed_from_one_kept_session() {
    let mut direct = mysql_direct().await;
    for host in ["%", "localhost"] {
        direct
            .query_drop(format!(
                "CREATE USER IF NOT EXISTS 'weir_killer'@'{host}' IDENTIFIED BY 'weir-killer'"
            ))
            .await
            .expect("a user of its own, to count its sessions");
    }
    std::env::set_var("WEIR_TEST_KILLER_PASSWORD", "weir-killer");
    let source = format!(
        "[tenants.k.sources.maria]\nengine = \"mysql\"\nhost = \"{}\"\nport = {}\nuser = \"weir_killer\"\n\
         password_env = \"WEIR_TEST_KILLER_PASSWORD\"\n[tenants.k.sources.maria.pool]\nmax_size = 1\n",
        env_or("WEIR_TEST_MYSQL_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_MYSQL_PORT", "3306"),
    );
    let server = TestServer::start(&tenant("k", "", &source)).await;
    let client = server.client("key-k").await;
    for round in 0..3 {
        abandon_and_see_it_killed(&client, &mut direct, &format!("weir_killed_{round}")).await;
    }
    assert_eq!(
        sessions_of(&mut direct, "weir_killer").await,
        2,
        "the pooled session and the one kept for kills"
    );
    // The server closes both; the next kill opens a session again.
    direct
        .query_drop(
            "BEGIN NOT ATOMIC FOR s IN (SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'weir_killer') \
             DO KILL CONNECTION s.ID; END FOR; END",
        )
        .await
        .expect("kill its sessions");
    let mut served = false;
    for _ in 0..20 {
        served = client.execute("maria", "SELECT 1", vec![]).await.is_ok();
        if served {
            break;
        }
    }
    assert!(served, "the pool opens a session again");
    abandon_and_see_it_killed(&client, &mut direct, "weir_killed_again").await;
    server.stop().await;
}

/// A statement abandoned in a transaction that cannot be killed (no session
/// to send KILL QUERY from) runs on to its end: the transaction then does
/// not commit what its caller was told was cancelled.
#[tokio::test]
async fn a_transaction_whose_statement_could_not_be_killed_does_not_commit() {
    let (proxy, source) =
        mysql_behind_proxy("unkilled", "my", "[tenants.unkilled.sources.my.pool]\nmax_size = 1\n").await;
    let server = TestServer::start(&tenant("unkilled", "", &source)).await;
    let client = server.client("key-unkilled").await;
    let (table, tx) = table_and_transaction(&client, "unkilled", "slept INT").await;
    // The transaction's session is open; a new one (the killer's) is not.
    proxy.refuse(true);
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "my".into(),
        sql: format!("INSERT INTO {table} SELECT SLEEP(1.5)"),
        transaction_id: tx.clone(),
        ..Default::default()
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    let err = client.query().execute(request).await.expect_err("the deadline passes");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The INSERT ends after its sleep, its row in the transaction.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let refused = client.commit(&tx).await.expect_err("not committed");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    proxy.refuse(false);
    let rows = client
        .execute("my", &format!("SELECT COUNT(*) FROM {table}"), vec![])
        .await
        .expect("count");
    assert_eq!(
        rows.rows[0].values[0].kind,
        Some(Kind::Int64Value(0)),
        "the cancelled INSERT committed"
    );
    client
        .execute("my", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("drop");
    server.stop().await;
}

/// A statement of a transaction abandoned by its deadline (killed in the
/// engine) leaves the transaction open, and it is not taken as ended: what
/// the driver last read as an OK packet is then not the statement's own
/// answer (judged by it, the transaction was taken as committed).
#[tokio::test]
async fn a_transaction_goes_on_after_an_abandoned_statement() {
    let server = TestServer::start(&tenant("abandoned", "", &mysql("abandoned", "my", ""))).await;
    let client = server.client("key-abandoned").await;
    let (table, tx) = table_and_transaction(&client, "weir_my_abandoned", "id INT").await;
    client
        .execute_in(&tx, "my", &format!("INSERT INTO {table} VALUES (1)"), vec![])
        .await
        .expect("insert");
    // A text of its own: prepared anew, so its prepare reply is read last.
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "my".into(),
        sql: format!("SELECT SLEEP(5) AS abandoned_{}", &table[table.len() - 8..]),
        transaction_id: tx.clone(),
        ..Default::default()
    });
    request.set_timeout(std::time::Duration::from_millis(300));
    client.query().execute(request).await.expect_err("the deadline passes");
    let started = std::time::Instant::now();
    let next = loop {
        match client
            .execute_in(&tx, "my", &format!("INSERT INTO {table} VALUES (2)"), vec![])
            .await
        {
            Err(e) if reason(&e) == "TRANSACTION_BUSY" && started.elapsed() < std::time::Duration::from_secs(5) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    next.expect("the transaction goes on");
    client.commit(&tx).await.expect("commit");
    let rows = client
        .execute("my", &format!("SELECT COUNT(*) FROM {table}"), vec![])
        .await
        .expect("count");
    assert_eq!(int(&rows.rows[0].values[0]), 2);
    client
        .execute("my", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("cleanup");
    server.stop().await;
}

/// A new table `<prefix>_<random>` of `columns` on source `my`, and a
/// transaction begun there.
async fn table_and_transaction(client: &weir_client::WeirClient, prefix: &str, columns: &str) -> (String, Vec<u8>) {
    let table = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    client
        .execute("my", &format!("CREATE TABLE {table} ({columns})"), vec![])
        .await
        .expect("create");
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    (table, tx)
}

/// DDL in a transaction commits it implicitly on MySQL/MariaDB (DDL that
/// fails too, since the commit comes first): the statements after it are refused, not run on their own with autocommit,
/// and Rollback says that what ran before was committed (the handle goes).
/// Statements that leave the transaction open (reads, writes, savepoints)
/// go on as before.
#[tokio::test]
async fn ddl_in_a_transaction_ends_it_and_says_so() {
    let server = TestServer::start(&tenant("ddl", "", &mysql("ddl", "my", ""))).await;
    let client = server.client("key-ddl").await;
    let (table, tx) = table_and_transaction(&client, "weir_my_implicit", "id INT").await;
    let made = format!("{table}_made");
    for sql in [
        format!("INSERT INTO {table} VALUES (1)"),
        "SAVEPOINT s".to_string(),
        format!("SELECT count(*) FROM {table}"),
        format!("CREATE TABLE {made} (id INT)"),
    ] {
        client.execute_in(&tx, "my", &sql, vec![]).await.expect(&sql);
    }
    let committed =
        |e: &tonic::Status| e.code() == Code::FailedPrecondition && reason(e) == "TRANSACTION_COMMITTED_IMPLICITLY";
    let e = client
        .execute_in(&tx, "my", &format!("INSERT INTO {table} VALUES (2)"), vec![])
        .await
        .expect_err("the transaction ended at the DDL");
    assert!(committed(&e), "{e:?}");
    let e = client.rollback(&tx).await.expect_err("nothing left to roll back");
    assert!(committed(&e), "{e:?}");
    let gone = client.rollback(&tx).await.expect_err("the handle is gone");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // DDL that fails has committed all the same: MySQL commits before it runs.
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "my", &format!("INSERT INTO {table} VALUES (3)"), vec![])
        .await
        .expect("insert");
    client
        .execute_in(&tx, "my", &format!("CREATE TABLE {table} (id INT)"), vec![])
        .await
        .expect_err("the table exists");
    let e = client.rollback(&tx).await.expect_err("committed by the failed DDL");
    assert!(committed(&e), "{e:?}");
    // Commit says what happened: what ran is committed.
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "my", &format!("INSERT INTO {table} VALUES (4)"), vec![])
        .await
        .expect("insert");
    client
        .execute_in(&tx, "my", &format!("DROP TABLE {made}"), vec![])
        .await
        .expect("ddl");
    client.commit(&tx).await.expect("committed");
    let rows = client
        .execute("my", &format!("SELECT id FROM {table} ORDER BY id"), vec![])
        .await
        .expect("rows");
    let ids: Vec<_> = rows.rows.iter().map(|r| int(&r.values[0])).collect();
    assert_eq!(
        ids,
        [1, 3, 4],
        "the rows before each DDL were committed, the one after never ran"
    );
    client
        .execute("my", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("cleanup");
    server.stop().await;
}

/// A transaction whose session the driver lost was rolled back by the
/// server: its Commit says so (ABORTED), instead of sending COMMIT into the
/// closed connection and calling the outcome unknown.
#[tokio::test]
async fn a_commit_after_the_transactions_session_was_lost_says_it_was_rolled_back() {
    let server = TestServer::start(&tenant("lostsession", "", &mysql("lostsession", "my", ""))).await;
    let client = server.client("key-lostsession").await;
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let id = client
        .execute_in(&tx, "my", "SELECT CAST(CONNECTION_ID() AS SIGNED)", vec![])
        .await
        .expect("its session");
    let Some(Kind::Int64Value(id)) = id.rows[0].values[0].kind else {
        panic!("{:?}", id.rows[0].values[0])
    };
    mysql_direct()
        .await
        .query_drop(format!("KILL CONNECTION {id}"))
        .await
        .expect("kill its session");
    let lost = client
        .execute_in(&tx, "my", "SELECT 1", vec![])
        .await
        .expect_err("its session is gone");
    assert_eq!(lost.code(), Code::Aborted, "{lost:?}");
    let refused = client.commit(&tx).await.expect_err("nothing left to commit");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("session was lost"), "{refused:?}");
    // The same when the driver itself closed the session: a statement's own
    // LOAD DATA LOCAL, which it refuses to answer.
    client
        .execute("my", "CREATE TABLE IF NOT EXISTS weir_my_infile (line TEXT)", vec![])
        .await
        .expect("setup");
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(
            &tx,
            "my",
            "LOAD DATA LOCAL INFILE '/etc/hostname' INTO TABLE weir_my_infile",
            vec![],
        )
        .await
        .expect_err("no file is read");
    let refused = client.commit(&tx).await.expect_err("nothing left to commit");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    server.stop().await;
}

/// A statement the driver refuses before sending it (a `:name`
/// placeholder, which mysql_async reads as a named parameter) is the
/// caller's to fix: INVALID_ARGUMENT, not "source unreachable", and a
/// transaction it was sent in is neither reported lost nor lost.
/// A value Weir cannot read (a date that does not exist, as
/// ALLOW_INVALID_DATES lets MariaDB return) ends its statement in the engine
/// at once: the caller hears INVALID_ARGUMENT without waiting for the rest
/// of a long result, and the transaction it ran in goes on.
#[tokio::test]
async fn a_value_that_cannot_be_read_stops_its_statement_at_once() {
    let server = TestServer::start(&tenant(
        "undecodable",
        "statement_timeout = \"60s\"",
        &mysql("undecodable", "my", ""),
    ))
    .await;
    let client = server.client("key-undecodable").await;
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "my", "SET SESSION sql_mode = 'ALLOW_INVALID_DATES'", vec![])
        .await
        .expect("sql_mode");
    let started = std::time::Instant::now();
    // A row a second, for 30 s, each larger than the server's network buffer (sent as it is made).
    let err = client
        .execute_in(
            &tx,
            "my",
            "SELECT CAST('2024-02-31' AS DATE) AS d, REPEAT('x', 40000) AS pad, SLEEP(1) AS s FROM seq_1_to_30",
            vec![],
        )
        .await
        .expect_err("not a date");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
    client
        .execute_in(&tx, "my", "SELECT 1", vec![])
        .await
        .expect("the transaction goes on");
    client.rollback(&tx).await.expect("rollback");
    server.stop().await;
}

/// A transaction whose statement could not be stopped (no session to send
/// KILL QUERY from) is rolled back at once on request, not after the
/// statement has run to its end.
#[tokio::test]
async fn a_transaction_whose_statement_could_not_be_stopped_rolls_back_at_once() {
    let (proxy, source) =
        mysql_behind_proxy("unstopped", "my", "[tenants.unstopped.sources.my.pool]\nmax_size = 1\n").await;
    let server = TestServer::start(&tenant("unstopped", "", &source)).await;
    let client = server.client("key-unstopped").await;
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    // The transaction's session is open; a new one (the killer's) is not.
    proxy.refuse(true);
    let err = execute_within(
        &client,
        &tx,
        "my",
        // A first row at once (larger than the server's network buffer, so
        // sent as it is made), the second after 20 s.
        "SELECT SLEEP(IF(seq = 1, 0, 20)) AS weir_unstoppable, REPEAT('x', 40000) AS pad FROM seq_1_to_2",
        std::time::Duration::from_millis(500),
    )
    .await
    .expect_err("past its deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let started = std::time::Instant::now();
    // The statement's task may still be giving up on its kill.
    loop {
        match client.rollback(&tx).await {
            Err(e) if reason(&e) == "TRANSACTION_BUSY" && started.elapsed() < std::time::Duration::from_secs(5) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            other => break other.expect("rollback"),
        }
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "rolled back after {:?}",
        started.elapsed()
    );
    proxy.refuse(false);
    server.stop().await;
}

#[tokio::test]
async fn statements_the_driver_refuses_are_invalid_and_leave_the_transaction_open() {
    let server = TestServer::start(&tenant("drvrefuse", "", &mysql("drvrefuse", "my", ""))).await;
    let client = server.client("key-drvrefuse").await;
    client
        .execute(
            "my",
            "CREATE TABLE IF NOT EXISTS weir_my_drvrefuse (id INT PRIMARY KEY)",
            vec![],
        )
        .await
        .expect("setup");
    client
        .execute("my", "DELETE FROM weir_my_drvrefuse", vec![])
        .await
        .expect("empty");
    let named = |client: &weir_client::WeirClient, tx: Option<Vec<u8>>| {
        let client = client.clone();
        async move {
            let (sql, params) = (
                "SELECT :id, ?",
                vec![pb::Value {
                    kind: Some(Kind::Int64Value(1)),
                }],
            );
            match tx {
                Some(tx) => client.execute_in(&tx, "my", sql, params).await,
                None => client.execute("my", sql, params).await,
            }
        }
    };
    let err = named(&client, None).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "my", "INSERT INTO weir_my_drvrefuse VALUES (1)", vec![])
        .await
        .expect("insert");
    let err = named(&client, Some(tx.clone())).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    client.commit(&tx).await.expect("the transaction went on");
    let rows = client
        .execute("my", "SELECT id FROM weir_my_drvrefuse", vec![])
        .await
        .expect("select");
    assert_eq!(rows.rows.len(), 1);
    client
        .execute("my", "DROP TABLE weir_my_drvrefuse", vec![])
        .await
        .expect("drop");
    server.stop().await;
}

/// ABORTED means "run the whole transaction again" on every engine. A lock
/// wait timeout leaves MariaDB's transaction open (without
/// `innodb_rollback_on_timeout`, the default), holding its locks against
/// that retry: Weir rolls it back, and its Commit says it was.
#[tokio::test]
async fn a_lock_wait_timeout_ends_the_transaction_it_aborts() {
    let table = format!("weir_my_lockwait_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut holder = mysql_direct().await;
    holder
        .query_drop(format!("CREATE TABLE {table} (id INT PRIMARY KEY, v INT)"))
        .await
        .expect("create");
    holder
        .query_drop(format!("INSERT INTO {table} VALUES (1, 0)"))
        .await
        .expect("insert");
    holder.query_drop("BEGIN").await.expect("begin");
    holder
        .query_drop(format!("SELECT * FROM {table} WHERE id = 1 FOR UPDATE"))
        .await
        .expect("lock row 1");
    let server = TestServer::start(&tenant("lockwait", "", &mysql("lockwait", "my", ""))).await;
    let client = server.client("key-lockwait").await;
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "my", &format!("INSERT INTO {table} VALUES (2, 0)"), vec![])
        .await
        .expect("insert row 2");
    let err = client
        .execute_in(
            &tx,
            "my",
            &format!("SET STATEMENT innodb_lock_wait_timeout = 1 FOR UPDATE {table} SET v = 1 WHERE id = 1"),
            vec![],
        )
        .await
        .expect_err("waits for row 1 and times out");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::Aborted, "1205"),
        "{err:?}"
    );
    let refused = client.commit(&tx).await.expect_err("the transaction is over");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("lock wait timeout"), "{refused:?}");
    holder.query_drop("COMMIT").await.expect("commit");
    let left: Vec<i64> = holder
        .query(format!("SELECT id FROM {table} ORDER BY id"))
        .await
        .expect("select");
    assert_eq!(left, [1], "the aborted transaction's insert was rolled back");
    holder.query_drop(format!("DROP TABLE {table}")).await.expect("drop");
    server.stop().await;
}

/// A foreign key's rules come with it (read apart from the key's columns:
/// joined, MariaDB opened every table on the server to find them).
#[tokio::test]
async fn foreign_keys_are_described_with_their_rules() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    for sql in [
        "DROP TABLE IF EXISTS weir_my_fk_child, weir_my_fk_parent",
        "CREATE TABLE weir_my_fk_parent (a INT, b INT, PRIMARY KEY (a, b), UNIQUE KEY (b, a))",
        "CREATE TABLE weir_my_fk_child (id INT PRIMARY KEY, x INT, y INT, \
         CONSTRAINT weir_my_fk FOREIGN KEY (y, x) REFERENCES weir_my_fk_parent (b, a) \
         ON DELETE CASCADE ON UPDATE SET NULL)",
    ] {
        client.execute("maria", sql, vec![]).await.expect(sql);
    }
    let d = client
        .describe_table("maria", "", "weir_my_fk_child")
        .await
        .expect("describe");
    let fk = &d.foreign_keys[0];
    assert_eq!(
        (
            fk.name.as_str(),
            fk.columns.clone(),
            fk.referenced_columns.clone(),
            fk.on_delete.as_str(),
            fk.on_update.as_str()
        ),
        (
            "weir_my_fk",
            vec!["y".to_string(), "x".into()],
            vec!["b".to_string(), "a".into()],
            "CASCADE",
            "SET NULL"
        )
    );
    client
        .execute("maria", "DROP TABLE weir_my_fk_child, weir_my_fk_parent", vec![])
        .await
        .expect("drop");
    server.stop().await;
}

/// An INVISIBLE column is left out of `SELECT *`, so its ordinal is 0 and
/// the columns after it keep their place in `SELECT *`'s rows.
#[tokio::test]
async fn invisible_columns_have_no_place_in_select_star() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    for sql in [
        "DROP TABLE IF EXISTS weir_my_invisible",
        "CREATE TABLE weir_my_invisible (a INT, b INT INVISIBLE, c INT)",
        "INSERT INTO weir_my_invisible (a, b, c) VALUES (1, 2, 3)",
    ] {
        client.execute("maria", sql, vec![]).await.expect(sql);
    }
    let d = client
        .describe_table("maria", "", "weir_my_invisible")
        .await
        .expect("describe");
    let ordinals: Vec<_> = d
        .columns
        .iter()
        .map(|c| (c.column.as_ref().map(|c| c.name.clone()).unwrap_or_default(), c.ordinal))
        .collect();
    assert_eq!(ordinals, [("a".to_string(), 1), ("b".into(), 0), ("c".into(), 2)]);
    let star = client
        .execute("maria", "SELECT * FROM weir_my_invisible", vec![])
        .await
        .expect("select");
    let names: Vec<_> = star.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    client
        .execute("maria", "DROP TABLE weir_my_invisible", vec![])
        .await
        .expect("drop");
    server.stop().await;
}

/// AUTO_INCREMENT takes a value given, so it is an identity by default;
/// generated columns (VIRTUAL, PERSISTENT, STORED) are computed, with the
/// expression the server prints, and never written.
#[tokio::test]
async fn auto_increment_and_generated_columns_say_how_they_are_filled() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    for sql in [
        "DROP TABLE IF EXISTS weir_my_gen",
        "CREATE TABLE weir_my_gen (id INT AUTO_INCREMENT PRIMARY KEY, a INT DEFAULT 5, \
         v INT AS (a + 1) VIRTUAL, p INT GENERATED ALWAYS AS (a * 2) PERSISTENT, s INT AS (a * 3) STORED, \
         t TIMESTAMP NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP)",
    ] {
        client.execute("maria", sql, vec![]).await.expect(sql);
    }
    let d = client
        .describe_table("maria", "", "weir_my_gen")
        .await
        .expect("describe");
    let filled: Vec<_> = d
        .columns
        .iter()
        .map(|c| {
            (
                c.column.as_ref().map_or("", |c| c.name.as_str()),
                c.generation(),
                c.generation_expression.as_str(),
            )
        })
        .collect();
    use pb::ColumnGeneration as G;
    assert_eq!(
        filled,
        [
            ("id", G::IdentityByDefault, ""),
            ("a", G::Unspecified, ""),
            ("v", G::Computed, "`a` + 1"),
            ("p", G::Computed, "`a` * 2"),
            ("s", G::Computed, "`a` * 3"),
            // ON UPDATE fills it only when left out: an ordinary column.
            ("t", G::Unspecified, ""),
        ]
    );
    client
        .execute("maria", "DROP TABLE weir_my_gen", vec![])
        .await
        .expect("drop");
    server.stop().await;
}

/// A statement that sets the session's time zone or character sets is
/// refused, pooled or in a transaction: Weir reads and binds TIMESTAMPs as
/// UTC and text as utf8mb4, so inside a transaction every later TIMESTAMP
/// would be read and written hours off without an error.
#[tokio::test]
async fn statements_that_set_the_time_zone_or_character_sets_are_refused() {
    let server = TestServer::start(&tenant("tzset", "", &mysql("tzset", "my", ""))).await;
    let client = server.client("key-tzset").await;
    for sql in ["SET time_zone = '+05:00'", "SET NAMES latin1"] {
        let err = client.execute("my", sql, vec![]).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(err.message().contains("time_zone or character sets"), "{err:?}");
    }
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "my", "SET @@session.time_zone = '+05:00'", vec![])
        .await
        .expect_err("in a transaction");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The transaction goes on, its TIMESTAMPs still read as UTC.
    let r = client
        .execute_in(&tx, "my", "SELECT @@session.time_zone", vec![])
        .await
        .expect("the transaction goes on");
    assert_eq!(text(&r.rows[0].values[0]), "+00:00");
    client.commit(&tx).await.expect("commit");
    server.stop().await;
}

/// `USE` is refused, pooled or in a transaction: the pool's reset of a
/// returned connection keeps its default database, so later callers'
/// unqualified names would reach the other database's tables.
#[tokio::test]
async fn use_is_refused_so_no_caller_moves_a_pooled_connection_to_another_database() {
    let server = TestServer::start(&tenant(
        "usedb",
        "",
        &mysql("usedb", "my", "[tenants.usedb.sources.my.pool]\nmax_size = 1\n"),
    ))
    .await;
    let client = server.client("key-usedb").await;
    for sql in ["USE mysql", "/* c */ use `mysql`"] {
        let err = client.execute("my", sql, vec![]).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(err.message().contains("USE is refused"), "{err:?}");
    }
    let tx = client
        .begin("my", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "my", "USE mysql", vec![])
        .await
        .expect_err("in a transaction");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    client.commit(&tx).await.expect("commit");
    // Run as dynamic SQL, which no check of the text sees, it moves only
    // the statement's own session: the pool sets the source's database
    // again before the next caller (the pool's reset keeps it).
    client
        .execute("my", "EXECUTE IMMEDIATE 'USE information_schema'", vec![])
        .await
        .expect("dynamic SQL");
    let db = client
        .execute("my", "SELECT DATABASE()", vec![])
        .await
        .expect("the one pooled connection");
    assert_eq!(text(&db.rows[0].values[0]), env_or("WEIR_TEST_MYSQL_DATABASE", "test"));
    // Roles stay active through the pool's reset too.
    let err = client
        .execute("my", "SET ROLE NONE", vec![])
        .await
        .expect_err("SET ROLE");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("SET ROLE is refused"), "{err:?}");
    server.stop().await;
}

/// A database the source's login cannot reach at connect (missing, or not
/// its to use) is the operator's to fix: UNAVAILABLE, as a refused login,
/// not the caller's NOT_FOUND, and the message names neither.
#[tokio::test]
async fn a_database_missing_at_login_is_unavailable_without_its_name() {
    let source = mysql("nodb", "my", "").replace(
        &format!("database = \"{}\"", env_or("WEIR_TEST_MYSQL_DATABASE", "test")),
        "database = \"weir_no_such_database\"",
    );
    assert!(source.contains("weir_no_such_database"), "{source}");
    let server = TestServer::start(&tenant("nodb", "", &source)).await;
    let client = server.client("key-nodb").await;
    let err = client
        .execute("my", "SELECT 1", vec![])
        .await
        .expect_err("no such database");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "SOURCE_UNAVAILABLE"),
        "{err:?}"
    );
    assert!(!err.message().contains("weir_no_such_database"), "{err:?}");
    server.stop().await;
}

/// Statements the server cannot prepare (error 1295: on MariaDB PREPARE,
/// EXECUTE and DEALLOCATE; on Oracle MySQL also SAVEPOINT, LOCK TABLES,
/// CREATE PROCEDURE) run as text when they have no parameters, and their
/// rows come typed as a prepared statement's would (they were refused after
/// the statement had run: a write with RETURNING was done, and reported as
/// not). With parameters they are INVALID_ARGUMENT (they were INTERNAL).
#[tokio::test]
async fn statements_the_server_cannot_prepare_run_as_text_without_parameters() {
    let server = TestServer::start(&config()).await;
    let client = server.client("key-shop").await;
    client
        .execute(
            "maria",
            "CREATE OR REPLACE TABLE weir_my_unprepared (id INT PRIMARY KEY)",
            vec![],
        )
        .await
        .expect("create");
    client
        .execute("maria", "INSERT INTO weir_my_unprepared VALUES (1), (2), (3)", vec![])
        .await
        .expect("insert");
    let tx = client
        .begin("maria", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let select = "SELECT 7 AS i, CAST(18446744073709551615 AS UNSIGNED) AS u, 2.5e0 AS f, \
                  CAST(-1.25 AS DECIMAL(5,2)) AS d, DATE '2024-02-29' AS day, \
                  CAST('2024-02-29 13:14:15.25' AS DATETIME(2)) AS at, CAST('-838:59:59.5' AS TIME(1)) AS span, \
                  CAST('12:00:01' AS TIME) AS tod, YEAR(NOW()) - YEAR(NOW()) + 2001 AS y, 'é' AS s, NULL AS n, \
                  X'00ff' AS b, CAST(NULL AS DATE) AS no_day, CAST(0.1 AS FLOAT) AS single";
    let prepared = client.execute_in(&tx, "maria", select, vec![]).await.expect("prepared");
    client
        .execute_in(
            &tx,
            "maria",
            &format!("PREPARE weir_p FROM '{}'", select.replace('\'', "''")),
            vec![],
        )
        .await
        .expect("PREPARE runs as text");
    let as_text = client
        .execute_in(&tx, "maria", "EXECUTE weir_p", vec![])
        .await
        .expect("the rows of an unprepared statement");
    assert_eq!(as_text.columns, prepared.columns);
    assert_eq!(as_text.rows, prepared.rows, "typed as the binary protocol types them");
    client
        .execute_in(&tx, "maria", "DEALLOCATE PREPARE weir_p", vec![])
        .await
        .expect("DEALLOCATE runs as text");
    let deleted = client
        .execute_in(
            &tx,
            "maria",
            "EXECUTE IMMEDIATE 'DELETE FROM weir_my_unprepared WHERE id = 2 RETURNING id'",
            vec![],
        )
        .await
        .expect("a write returning rows, run as text");
    assert_eq!(deleted.rows.len(), 1);
    assert_eq!(int(&deleted.rows[0].values[0]), 2);
    let err = client
        .execute_in(&tx, "maria", "PREPARE weir_q FROM ?", vec!["SELECT 1".into()])
        .await
        .expect_err("with a parameter it cannot run as text");
    assert_eq!(
        (err.code(), engine_code(&err).as_str()),
        (Code::InvalidArgument, "1295"),
        "{err:?}"
    );
    client.rollback(&tx).await.expect("rollback");
    let left = client
        .execute("maria", "SELECT COUNT(*) FROM weir_my_unprepared", vec![])
        .await
        .expect("count");
    assert_eq!(
        int(&left.rows[0].values[0]),
        3,
        "the delete was rolled back with its transaction"
    );
    client
        .execute("maria", "DROP TABLE weir_my_unprepared", vec![])
        .await
        .expect("drop");
    server.stop().await;
}

/// A statement, or values, past the server's `max_allowed_packet` (4 MiB on
/// the second test server) are refused before they are sent: sent, the
/// session was closed (a transaction's with it), and the caller was told
/// the source was unreachable.
#[tokio::test]
async fn statements_past_the_servers_packet_limit_are_refused_before_they_are_sent() {
    let server = TestServer::start(&tenant("shop", "", &plain_mysql("shop", "maria", ""))).await;
    let client = server.client("key-shop").await;
    let big = "x".repeat(5_000_000);
    let err = client
        .execute("maria", &format!("SELECT LENGTH('{big}')"), vec![])
        .await
        .expect_err("a 5 MB statement");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_allowed_packet"), "{}", err.message());
    let tx = client
        .begin("maria", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "maria", "SELECT LENGTH(?)", vec![big.clone().into()])
        .await
        .expect_err("a 5 MB value");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_allowed_packet"), "{}", err.message());
    let fits = client
        .execute_in(&tx, "maria", "SELECT LENGTH(?)", vec!["y".repeat(3_000_000).into()])
        .await
        .expect("the transaction goes on, and a 3 MB value fits");
    assert_eq!(int(&fits.rows[0].values[0]), 3_000_000);
    client.commit(&tx).await.expect("commit");
    assert_serves(&client, "maria", 2).await;
    server.stop().await;
}

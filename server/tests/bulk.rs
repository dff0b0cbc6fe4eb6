//! Bulk loads through the real gRPC server into real engines: every mode,
//! the common types, a million rows, bad rows anywhere in a load, clients
//! that vanish mid-load, retried load ids, unknown tables and columns, and
//! the tenant's load limits. After every failure the table must be exactly
//! as it was.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;
use weir_client::WeirClient;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Engine {
    Postgres,
    Mysql,
    Sqlite,
    Mssql,
}

impl Engine {
    fn source(self, tenant_id: &str, limits: &str) -> String {
        let source = match self {
            Engine::Postgres => postgres(tenant_id, "db", ""),
            Engine::Mysql => mysql(tenant_id, "db", ""),
            Engine::Sqlite => format!("[tenants.{tenant_id}.sources.db]\nengine = \"sqlite\"\npath = \":memory:\"\n"),
            Engine::Mssql => mssql_live(tenant_id, "db", ""),
        };
        tenant(tenant_id, limits, &source)
    }

    fn text_type(self) -> &'static str {
        match self {
            Engine::Mysql => "VARCHAR(200)",
            Engine::Mssql => "NVARCHAR(200)",
            _ => "TEXT",
        }
    }
}

struct Ctx {
    engine: Engine,
    server: TestServer,
    client: WeirClient,
}

impl Ctx {
    async fn new(engine: Engine, limits: &str) -> Ctx {
        let server = TestServer::start(&engine.source("bulk", limits)).await;
        let client = server.client("key-bulk").await;
        Ctx { engine, server, client }
    }

    /// On the second MariaDB, which refuses LOAD DATA LOCAL and takes
    /// packets of at most 4 MiB.
    async fn plain_mysql() -> Ctx {
        let server = TestServer::start(&tenant("bulk", "", &plain_mysql("bulk", "db", ""))).await;
        let client = server.client("key-bulk").await;
        Ctx {
            engine: Engine::Mysql,
            server,
            client,
        }
    }

    async fn exec(&self, sql: &str) -> pb::ExecuteResponse {
        self.client
            .execute("db", sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{:?}: {sql}: {}", self.engine, e.message()))
    }

    /// A fresh table `name` (id, name, score) with a CHECK on score and `rows` rows already in it.
    async fn table(&self, name: &str, rows: i64) {
        self.exec(&format!("DROP TABLE IF EXISTS {name}")).await;
        self.exec(&format!(
            "CREATE TABLE {name} (id INT PRIMARY KEY, name {} NOT NULL, score INT CHECK (score >= 0))",
            self.engine.text_type()
        ))
        .await;
        for i in 0..rows {
            self.exec(&format!("INSERT INTO {name} VALUES ({}, 'old{i}', {i})", 1_000_000 + i))
                .await;
        }
    }

    /// Every row of the table, as "id:name:score" text, in id order.
    async fn contents(&self, name: &str) -> Vec<String> {
        let r = self
            .exec(&format!("SELECT id, name, score FROM {name} ORDER BY id"))
            .await;
        r.rows
            .iter()
            .map(|row| {
                let score = if is_null(&row.values[2]) {
                    "null".to_string()
                } else {
                    int(&row.values[2]).to_string()
                };
                format!("{}:{}:{score}", int(&row.values[0]), text(&row.values[1]))
            })
            .collect()
    }

    async fn load(
        &self,
        header: pb::LoadHeader,
        batches: Vec<Vec<pb::Row>>,
    ) -> Result<pb::LoadResponse, tonic::Status> {
        self.client.load(header, tokio_stream::iter(batches)).await
    }
}

fn header(table: &str, mode: pb::BulkLoadMode) -> pb::LoadHeader {
    pb::LoadHeader {
        source: "db".into(),
        table: table.into(),
        columns: vec!["id".into(), "name".into(), "score".into()],
        mode: mode as i32,
        ..Default::default()
    }
}

fn v(kind: Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

fn row(id: i64, name: &str, score: i64) -> pb::Row {
    pb::Row {
        values: vec![
            v(Kind::Int64Value(id)),
            v(Kind::StringValue(name.into())),
            v(Kind::Int64Value(score)),
        ],
    }
}

fn rows(range: std::ops::Range<i64>) -> Vec<pb::Row> {
    range.map(|i| row(i, &format!("n{i}"), i)).collect()
}

async fn every_mode_appends_upserts_and_replaces(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_modes", 0).await;
    let r = ctx
        .load(
            header("weir_bulk_modes", pb::BulkLoadMode::Append),
            vec![rows(0..2), rows(2..3)],
        )
        .await
        .expect("append");
    assert_eq!((r.rows_inserted, r.rows_updated, r.replayed), (3, 0, false));
    assert!(!r.engine_path.is_empty() && r.bytes_received > 0);
    if engine == Engine::Mysql {
        assert_eq!(r.engine_path, "mysql-load-data-local");
    }

    let mut upsert = header("weir_bulk_modes", pb::BulkLoadMode::Upsert);
    upsert.conflict_columns = vec!["id".into()];
    let r = ctx
        .load(upsert, vec![vec![row(1, "changed", 10), row(7, "new", 7)]])
        .await
        .expect("upsert");
    assert_eq!((r.rows_inserted, r.rows_updated), (1, 1), "{engine:?}");
    assert_eq!(
        ctx.contents("weir_bulk_modes").await,
        ["0:n0:0", "1:changed:10", "2:n2:2", "7:new:7"]
    );

    let r = ctx
        .load(header("weir_bulk_modes", pb::BulkLoadMode::Replace), vec![rows(5..7)])
        .await
        .expect("replace");
    assert_eq!(r.rows_inserted, 2);
    if engine == Engine::Mysql {
        assert_eq!(r.engine_path, "mysql-delete-load-data-local");
    }
    assert_eq!(ctx.contents("weir_bulk_modes").await, ["5:n5:5", "6:n6:6"]);

    // Columns may be named in any order and case; the rest take their defaults.
    let mut partial = header("weir_bulk_modes", pb::BulkLoadMode::Append);
    partial.columns = vec!["NAME".into(), "Id".into()];
    let r = ctx
        .load(
            partial,
            vec![vec![pb::Row {
                values: vec![v(Kind::StringValue("p".into())), v(Kind::Int64Value(9))],
            }]],
        )
        .await
        .expect("partial columns");
    assert_eq!(r.rows_inserted, 1);
    assert_eq!(
        ctx.contents("weir_bulk_modes").await.last().map(String::as_str),
        Some("9:p:null")
    );

    // A load with no rows commits nothing and succeeds.
    let r = ctx
        .load(header("weir_bulk_modes", pb::BulkLoadMode::Append), vec![])
        .await
        .expect("empty load");
    assert_eq!(r.rows_inserted, 0);
    ctx.server.stop().await;
}

/// Column DDL, the value sent, and the value read back when it differs.
fn typed_columns(engine: Engine) -> Vec<(&'static str, &'static str, pb::Value, Option<pb::Value>)> {
    let date = v(Kind::DateValue(pb::Date {
        year: 2024,
        month: 2,
        day: 29,
    }));
    let ts = v(Kind::TimestampValue(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 123_456_000,
    }));
    let time = v(Kind::TimeValue(pb::TimeOfDay {
        hours: 13,
        minutes: 14,
        seconds: 15,
        nanos: 500_000_000,
        utc_offset_seconds: None,
    }));
    let uuid = "6f1c6b4e-2d1a-4b8e-9a7e-3c2b1a0f9e8d";
    let json = r#"{"a":[1,2]}"#;
    let mut cols = vec![
        ("b", "BOOLEAN", v(Kind::BoolValue(true)), None),
        ("i", "BIGINT", v(Kind::Int64Value(-9_000_000_000)), None),
        ("f", "DOUBLE PRECISION", v(Kind::DoubleValue(1.5)), None),
        ("d", "DECIMAL(12,3)", v(Kind::DecimalValue("12345.678".into())), None),
        (
            "s",
            "TEXT",
            v(Kind::StringValue("tab\tnew\nline \\ 'q' \"dq\" é".into())),
            None,
        ),
        ("dt", "DATE", date, None),
    ];
    match engine {
        Engine::Postgres => cols.extend([
            ("bin", "BYTEA", v(Kind::BytesValue(vec![0, 1, 254, 255])), None),
            ("tm", "TIME", time, None),
            ("ts", "TIMESTAMP", ts.clone(), None),
            ("tstz", "TIMESTAMPTZ", ts, None),
            ("u", "UUID", v(Kind::UuidValue(uuid.into())), None),
            (
                "j",
                "JSONB",
                v(Kind::JsonValue(json.into())),
                Some(v(Kind::JsonValue(r#"{"a": [1, 2]}"#.into()))),
            ),
            (
                "arr",
                "INT[]",
                v(Kind::ListValue(pb::ListValue {
                    values: vec![v(Kind::Int64Value(1)), v(Kind::Null(true))],
                })),
                None,
            ),
            (
                "iv",
                "INTERVAL",
                v(Kind::IntervalValue(pb::Interval {
                    months: 1,
                    days: 2,
                    microseconds: 3_000_000,
                })),
                None,
            ),
            // As weirctl reads it from a file: text that PostgreSQL parses.
            (
                "iv_text",
                "INTERVAL",
                v(Kind::StringValue("1 mon 2 days 00:00:03".into())),
                Some(v(Kind::IntervalValue(pb::Interval {
                    months: 1,
                    days: 2,
                    microseconds: 3_000_000,
                }))),
            ),
        ]),
        Engine::Mysql => {
            // MariaDB's BOOLEAN is TINYINT(1): true reads back as 1.
            cols[0].3 = Some(v(Kind::Int64Value(1)));
            cols[2].1 = "DOUBLE";
            cols.extend([
                ("bin", "BLOB", v(Kind::BytesValue(vec![0, 1, 254, 255])), None),
                ("tm", "TIME(6)", time, None),
                ("ts", "DATETIME(6)", ts, None),
                // What LOAD DATA's text format would misread: bytes that
                // need escaping, NUL in text, and BIT (sent as a number).
                (
                    "bin2",
                    "VARBINARY(16)",
                    v(Kind::BytesValue(b"\t\n\\\0\r\\N x".to_vec())),
                    None,
                ),
                ("s0", "VARCHAR(20)", v(Kind::StringValue("nul\0here\r\\N".into())), None),
                ("bits", "BIT(10)", v(Kind::Uint64Value(517)), None),
                // A text `0` would be read as the year 2000.
                ("y0", "YEAR", v(Kind::Int64Value(0)), None),
                ("y", "YEAR", v(Kind::Int64Value(2024)), None),
                (
                    "u",
                    "CHAR(36)",
                    v(Kind::UuidValue(uuid.into())),
                    Some(v(Kind::StringValue(uuid.into()))),
                ),
            ]);
        }
        Engine::Sqlite => {
            cols[0].3 = None;
            cols[2].1 = "REAL";
            cols.extend([
                ("bin", "BLOB", v(Kind::BytesValue(vec![0, 1, 254, 255])), None),
                ("ts", "TIMESTAMP", ts, None),
                ("j", "JSON", v(Kind::JsonValue(json.into())), None),
            ]);
        }
        Engine::Mssql => {
            cols[0].1 = "BIT";
            cols[2].1 = "FLOAT";
            cols[4].1 = "NVARCHAR(MAX)";
            cols.extend([
                ("bin", "VARBINARY(MAX)", v(Kind::BytesValue(vec![0, 1, 254, 255])), None),
                ("ts", "DATETIME2", ts, None),
                ("u", "UNIQUEIDENTIFIER", v(Kind::UuidValue(uuid.into())), None),
            ]);
        }
    }
    cols
}

async fn every_common_type_round_trips(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    let cols = typed_columns(engine);
    let ddl: Vec<String> = cols.iter().map(|(n, t, _, _)| format!("{n} {t}")).collect();
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_types").await;
    ctx.exec(&format!(
        "CREATE TABLE weir_bulk_types (id INT PRIMARY KEY, {})",
        ddl.join(", ")
    ))
    .await;
    let mut columns = vec!["id".to_string()];
    columns.extend(cols.iter().map(|(n, ..)| n.to_string()));
    let mut values = vec![v(Kind::Int64Value(1))];
    values.extend(cols.iter().map(|(_, _, value, _)| value.clone()));
    let mut nulls = vec![v(Kind::Int64Value(2))];
    nulls.extend(cols.iter().map(|_| v(Kind::Null(true))));
    let load = pb::LoadHeader {
        source: "db".into(),
        table: "weir_bulk_types".into(),
        columns: columns.clone(),
        ..Default::default()
    };
    let r = ctx
        .load(load, vec![vec![pb::Row { values }, pb::Row { values: nulls }]])
        .await
        .unwrap_or_else(|e| panic!("{engine:?}: {}", e.message()));
    assert_eq!(r.rows_inserted, 2);
    let back = ctx
        .exec(&format!(
            "SELECT {} FROM weir_bulk_types ORDER BY id",
            columns.join(", ")
        ))
        .await;
    for (i, (name, _, sent, expected)) in cols.iter().enumerate() {
        let got = &back.rows[0].values[i + 1];
        assert_eq!(got, expected.as_ref().unwrap_or(sent), "{engine:?}: column {name}");
        assert!(is_null(&back.rows[1].values[i + 1]), "{engine:?}: column {name} NULL");
    }
    ctx.server.stop().await;
}

async fn a_million_rows_load_in_one_call(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_million").await;
    ctx.exec("CREATE TABLE weir_bulk_million (id INT PRIMARY KEY, v BIGINT NOT NULL)")
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for start in (0..1_000_000i64).step_by(10_000) {
            let batch = (start..start + 10_000)
                .map(|i| pb::Row {
                    values: vec![v(Kind::Int64Value(i)), v(Kind::Int64Value(i * 3))],
                })
                .collect();
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    });
    let load = pb::LoadHeader {
        source: "db".into(),
        table: "weir_bulk_million".into(),
        columns: vec!["id".into(), "v".into()],
        ..Default::default()
    };
    let r = ctx.client.load(load, ReceiverStream::new(rx)).await.expect("1M rows");
    assert_eq!(r.rows_inserted, 1_000_000);
    let check = ctx
        .exec("SELECT COUNT(*), SUM(v), MIN(id), MAX(id) FROM weir_bulk_million")
        .await;
    let cells = &check.rows[0].values;
    assert_eq!(int(&cells[0]), 1_000_000);
    let sum = match &cells[1].kind {
        Some(Kind::Int64Value(i)) => i.to_string(),
        Some(Kind::DecimalValue(d)) => d.clone(),
        other => panic!("sum: {other:?}"),
    };
    assert_eq!(sum, (3 * (999_999i64 * 1_000_000 / 2)).to_string());
    assert_eq!((int(&cells[2]), int(&cells[3])), (0, 999_999));
    ctx.server.stop().await;
}

async fn a_bad_row_anywhere_leaves_the_table_unchanged(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_bad", 3).await;
    let before = ctx.contents("weir_bulk_bad").await;
    for at in [0usize, 500, 999] {
        // Found by the engine: a CHECK constraint.
        let mut batch = rows(0..1000);
        batch[at] = row(at as i64, "bad", -1);
        let err = ctx
            .load(
                header("weir_bulk_bad", pb::BulkLoadMode::Append),
                batch.chunks(300).map(<[_]>::to_vec).collect(),
            )
            .await
            .expect_err("a CHECK violation fails the load");
        assert_eq!(err.code(), Code::InvalidArgument, "{engine:?}: {}", err.message());
        assert_eq!(reason(&err), "BAD_ROW");
        assert_eq!(
            error_metadata(&err, "row_index"),
            at.to_string(),
            "{engine:?}: {}",
            err.message()
        );
        assert!(
            !engine_code(&err).is_empty(),
            "{engine:?}: the engine's code is attached"
        );
        assert_eq!(ctx.contents("weir_bulk_bad").await, before, "{engine:?}: row {at}");

        // The same under UPSERT, where PostgreSQL checks constraints only as
        // it merges its staging table into the target (SQL Server's MERGE
        // does not name the row yet).
        if engine != Engine::Mssql {
            let mut batch = rows(0..1000);
            batch[at] = row(at as i64, "bad", -1);
            let mut upsert = header("weir_bulk_bad", pb::BulkLoadMode::Upsert);
            upsert.conflict_columns = vec!["id".into()];
            let err = ctx
                .load(upsert, batch.chunks(300).map(<[_]>::to_vec).collect())
                .await
                .expect_err("a CHECK violation fails the upsert");
            assert_eq!(
                (err.code(), reason(&err), error_metadata(&err, "row_index")),
                (Code::InvalidArgument, "BAD_ROW".to_string(), at.to_string()),
                "{engine:?}: {}",
                err.message()
            );
            assert!(!engine_code(&err).is_empty(), "{engine:?}");
            assert_eq!(
                ctx.contents("weir_bulk_bad").await,
                before,
                "{engine:?}: upsert at {at}"
            );
        }

        // Found by the gateway: a value of the wrong type, named by column.
        let mut batch = rows(0..1000);
        batch[at].values[2] = v(Kind::StringValue("x".into()));
        let err = ctx
            .load(header("weir_bulk_bad", pb::BulkLoadMode::Replace), vec![batch])
            .await
            .expect_err("a string into an integer column");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(error_metadata(&err, "row_index"), at.to_string());
        assert!(err.message().contains("column \"score\""), "{}", err.message());
        assert_eq!(
            ctx.contents("weir_bulk_bad").await,
            before,
            "{engine:?}: replace at row {at}"
        );
    }
    // A duplicate of an existing key, under REPLACE (which first empties the table).
    let err = ctx
        .load(
            header("weir_bulk_bad", pb::BulkLoadMode::Replace),
            vec![vec![row(1, "a", 1), row(1, "b", 2)]],
        )
        .await
        .expect_err("duplicate key");
    assert_eq!(err.code(), Code::InvalidArgument, "{engine:?}: {}", err.message());
    assert_eq!(error_metadata(&err, "row_index"), "1", "{engine:?}: {}", err.message());
    assert_eq!(ctx.contents("weir_bulk_bad").await, before);

    // NULL into a NOT NULL column, and a row of the wrong width.
    let mut null_name = row(5, "", 5);
    null_name.values[1] = v(Kind::Null(true));
    let err = ctx
        .load(
            header("weir_bulk_bad", pb::BulkLoadMode::Append),
            vec![vec![row(4, "a", 1), null_name]],
        )
        .await
        .expect_err("NULL into NOT NULL");
    assert_eq!(error_metadata(&err, "column"), "name");
    let err = ctx
        .load(
            header("weir_bulk_bad", pb::BulkLoadMode::Append),
            vec![vec![pb::Row {
                values: vec![v(Kind::Int64Value(1))],
            }]],
        )
        .await
        .expect_err("short row");
    assert!(err.message().contains("has 1 values"), "{}", err.message());
    assert_eq!(ctx.contents("weir_bulk_bad").await, before);
    assert_serves(&ctx.client, "db", 3).await;
    ctx.server.stop().await;
}

async fn bad_rows_can_be_skipped_and_reported(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_skip", 0).await;
    let mut batch = rows(0..10);
    batch[3].values[2] = v(Kind::StringValue("x".into()));
    batch[8].values.pop();
    // A value the engine's own path refuses (PostgreSQL text cannot hold
    // NUL; SQLite's and SQL Server's integers end at i64::MAX, where MySQL's
    // unsigned ones go on) is skipped like the others, not the end of the load.
    let refused = match engine {
        Engine::Postgres => Some((1, Kind::StringValue("nu\0l".into()), "name")),
        Engine::Sqlite | Engine::Mssql => Some((2, Kind::Uint64Value(u64::MAX), "score")),
        Engine::Mysql => None,
    };
    if let Some((column, value, _)) = &refused {
        batch[5].values[*column] = v(value.clone());
    }
    let mut load = header("weir_bulk_skip", pb::BulkLoadMode::Append);
    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let r = ctx.load(load, vec![batch]).await.expect("skips");
    let kept = if refused.is_some() { 7 } else { 8 };
    assert_eq!(
        (r.rows_inserted, r.rows_skipped),
        (kept, 10 - kept),
        "{:?}",
        r.row_errors
    );
    let skipped: Vec<_> = r.row_errors.iter().map(|e| (e.row_index, e.column.as_str())).collect();
    if let Some((_, _, column)) = refused {
        assert_eq!(skipped, [(3, "score"), (5, column), (8, "")]);
    } else {
        assert_eq!(skipped, [(3, "score"), (8, "")]);
    }
    assert_eq!(ctx.contents("weir_bulk_skip").await.len(), kept as usize);

    // An engine error after skipped rows still names the caller's row.
    let mut batch = rows(100..110);
    batch[1].values[2] = v(Kind::StringValue("x".into()));
    batch[6] = row(106, "bad", -5);
    let mut load = header("weir_bulk_skip", pb::BulkLoadMode::Append);
    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let err = ctx.load(load, vec![batch]).await.expect_err("CHECK violation");
    assert_eq!(error_metadata(&err, "row_index"), "6", "{engine:?}: {}", err.message());
    assert_eq!(ctx.contents("weir_bulk_skip").await.len(), kept as usize);
    ctx.server.stop().await;
}

async fn a_client_that_vanishes_mid_load_changes_nothing(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_gone", 5).await;
    let before = ctx.contents("weir_bulk_gone").await;
    for mode in [pb::BulkLoadMode::Append, pb::BulkLoadMode::Replace] {
        let addr = ctx.server.addr.clone();
        // A client process that dies mid-load: its own runtime, dropped with
        // the call in flight, so its socket closes without ending the stream.
        let crashed = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime");
            let tx = runtime.block_on(async move {
                let client = WeirClient::connect(&addr, "key-bulk").await.expect("connect");
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                tokio::spawn(async move {
                    client
                        .load(header("weir_bulk_gone", mode), ReceiverStream::new(rx))
                        .await
                });
                for i in 0..5 {
                    tx.send(rows(i * 100..(i + 1) * 100)).await.expect("send");
                }
                // Let the rows reach the engine (visible to the load's own transaction only).
                tokio::time::sleep(Duration::from_millis(300)).await;
                tx
            });
            drop(runtime);
            drop(tx);
        });
        crashed.join().expect("client thread");
        // The rollback is asynchronous; the table must stay as it was for good.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(ctx.contents("weir_bulk_gone").await, before, "{engine:?} {mode:?}");
    }
    // A client that finds its own input bad part way aborts explicitly.
    let batches = vec![
        Ok(rows(0..100)),
        Err("line 101: not a number".to_string()),
        Ok(rows(100..200)),
    ];
    let err = ctx
        .client
        .load_or_abort(
            header("weir_bulk_gone", pb::BulkLoadMode::Replace),
            tokio_stream::iter(batches),
        )
        .await
        .expect_err("aborted");
    assert_eq!(err.code(), Code::Aborted);
    assert!(err.message().contains("line 101: not a number"), "{}", err.message());
    assert_eq!(ctx.contents("weir_bulk_gone").await, before);
    // Locks and connections were released: another load goes through.
    let r = ctx
        .load(header("weir_bulk_gone", pb::BulkLoadMode::Append), vec![rows(0..10)])
        .await
        .expect("a load after the abandoned ones");
    assert_eq!(r.rows_inserted, 10);
    assert_serves(&ctx.client, "db", 3).await;
    ctx.server.stop().await;
}

/// The request stream of a REPLACE load into `table`, its header and 100
/// rows sent and the stream left open (it ends when the sender is dropped).
async fn open_load(
    table: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::LoadRequest>,
    ReceiverStream<pb::LoadRequest>,
) {
    use weir_client::weir_proto::v1::load_request::Message as LoadMessage;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // Engine batches of 10 rows: the engine has rows of it soon after the call starts.
    let mut first = header(table, pb::BulkLoadMode::Replace);
    first.batch_size_hint = 10;
    tx.send(pb::LoadRequest {
        message: Some(LoadMessage::Header(first)),
    })
    .await
    .expect("header");
    tx.send(pb::LoadRequest {
        message: Some(LoadMessage::Rows(pb::LoadRows { rows: rows(0..100) })),
    })
    .await
    .expect("rows");
    (tx, ReceiverStream::new(rx))
}

async fn a_load_past_its_deadline_changes_nothing(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_deadline", 2).await;
    let before = ctx.contents("weir_bulk_deadline").await;
    let (tx, requests) = open_load("weir_bulk_deadline").await;
    // The stream then stalls, open, past the call's deadline. The server
    // answers a little ahead of it, so its reason reaches the client before
    // the client's own timer ends the call.
    let mut request = tonic::Request::new(requests);
    request
        .metadata_mut()
        .insert("grpc-timeout", "500m".parse().expect("header value"));
    let err = ctx.client.bulk().load(request).await.expect_err("past its deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{engine:?}: {}", err.message());
    assert_eq!(reason(&err), "LOAD_TIMEOUT");
    drop(tx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ctx.contents("weir_bulk_deadline").await, before, "{engine:?}");
    assert_serves(&ctx.client, "db", 3).await;
    ctx.server.stop().await;
}

/// Past the shutdown grace period, a load still receiving rows is rolled
/// back and its caller told so (UNAVAILABLE, retry elsewhere), instead of
/// being left hanging on a server that has stopped serving.
/// `keeps_sending`: the client sends rows all along, rather than stalls
/// (a load reads ahead what was received at the cut, looking for its end,
/// and must not take rows for ever).
async fn a_load_cut_by_shutdown_changes_nothing(engine: Engine, keeps_sending: bool) {
    // A client that keeps sending to a load held back by the tenant's load
    // rate always has a message waiting in the server's buffers.
    let limits = if keeps_sending {
        "load_rows_per_second = 2000"
    } else {
        ""
    };
    let with_grace = format!("{}[server]\nshutdown_grace = \"1s\"\n", engine.source("bulk", limits));
    let server = TestServer::start(&with_grace).await;
    let client = server.client("key-bulk").await;
    let ctx = Ctx { engine, server, client };
    ctx.table("weir_bulk_shutdown", 2).await;
    let before = ctx.contents("weir_bulk_shutdown").await;
    let (tx, requests) = open_load("weir_bulk_shutdown").await;
    let feeder = keeps_sending.then(|| {
        let tx = tx.clone();
        tokio::spawn(async move {
            for batch in 0.. {
                let message = pb::LoadRequest {
                    message: Some(pb::load_request::Message::Rows(pb::LoadRows {
                        rows: rows(1000 + batch * 10..1010 + batch * 10),
                    })),
                };
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        })
    });
    let mut bulk = ctx.client.bulk();
    let call = tokio::spawn(async move { bulk.load(requests).await });
    // The load is under way, its stream open, when the server is told to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let stopping = tokio::spawn(ctx.server.stop());
    let err = tokio::time::timeout(Duration::from_secs(8), call)
        .await
        .expect("the load ends after the grace period")
        .expect("load task")
        .expect_err("a cut load fails");
    assert_eq!(err.code(), Code::Unavailable, "{engine:?}: {}", err.message());
    // A client still sending when the stopping server closes its connection
    // may meet the reset (the server's socket held unread rows) before the
    // status: UNAVAILABLE all the same, without the reason.
    if !keeps_sending {
        assert_eq!(reason(&err), "SHUTTING_DOWN", "{err:?}");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the grace period"
    );
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    if let Some(feeder) = feeder {
        feeder.abort();
    }
    tokio::time::timeout(Duration::from_secs(8), stopping)
        .await
        .expect("server stopped")
        .expect("clean stop");
    drop(tx);
    // Read back through a second server: the rows the first one received are gone.
    let server = TestServer::start(&engine.source("bulk", "")).await;
    let client = server.client("key-bulk").await;
    let ctx = Ctx { engine, server, client };
    assert_eq!(ctx.contents("weir_bulk_shutdown").await, before, "{engine:?}");
    ctx.server.stop().await;
}

/// A load whose client has sent everything commits during shutdown, even
/// when its rows are still waiting behind the tenant's load rate as the
/// grace period ends.
async fn a_load_sent_in_full_commits_during_shutdown(engine: Engine) {
    // 120 rows at 40 rows/s: the last of them wait about 2 s, past the 1 s grace.
    let with_grace = format!(
        "{}[server]\nshutdown_grace = \"1s\"\n",
        engine.source("bulk", "load_rows_per_second = 40")
    );
    let server = TestServer::start(&with_grace).await;
    let client = server.client("key-bulk").await;
    let ctx = Ctx { engine, server, client };
    ctx.table("weir_bulk_sent", 2).await;
    // Three messages of rows, then the end: the last two wait in the
    // server's buffers when the grace period ends, and are still loaded.
    let (tx, requests) = open_load("weir_bulk_sent").await;
    for more in [100..110, 110..120] {
        tx.send(pb::LoadRequest {
            message: Some(pb::load_request::Message::Rows(pb::LoadRows { rows: rows(more) })),
        })
        .await
        .expect("rows");
    }
    drop(tx);
    let mut bulk = ctx.client.bulk();
    let call = tokio::spawn(async move { bulk.load(requests).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(ctx.server.stop());
    let loaded = tokio::time::timeout(Duration::from_secs(8), call)
        .await
        .expect("the load ends")
        .expect("load task")
        .unwrap_or_else(|e| panic!("{engine:?}: a load sent in full commits: {e:?}"));
    assert_eq!(loaded.into_inner().rows_inserted, 120, "{engine:?}");
    tokio::time::timeout(Duration::from_secs(8), stopping)
        .await
        .expect("server stopped")
        .expect("clean stop");
    let server = TestServer::start(&engine.source("bulk", "")).await;
    let client = server.client("key-bulk").await;
    let ctx = Ctx { engine, server, client };
    assert_eq!(ctx.contents("weir_bulk_sent").await.len(), 120, "{engine:?}");
    ctx.server.stop().await;
}

#[tokio::test]
async fn a_load_sent_in_full_commits_during_shutdown_in_postgres() {
    a_load_sent_in_full_commits_during_shutdown(Engine::Postgres).await;
}

#[tokio::test]
async fn a_load_sent_in_full_commits_during_shutdown_in_mysql() {
    a_load_sent_in_full_commits_during_shutdown(Engine::Mysql).await;
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn a_load_sent_in_full_commits_during_shutdown_in_mssql() {
    a_load_sent_in_full_commits_during_shutdown(Engine::Mssql).await;
}

#[tokio::test]
async fn a_load_cut_by_shutdown_changes_nothing_in_postgres() {
    a_load_cut_by_shutdown_changes_nothing(Engine::Postgres, true).await;
}

#[tokio::test]
async fn a_load_cut_by_shutdown_changes_nothing_in_mysql() {
    a_load_cut_by_shutdown_changes_nothing(Engine::Mysql, false).await;
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn a_load_cut_by_shutdown_changes_nothing_in_mssql() {
    a_load_cut_by_shutdown_changes_nothing(Engine::Mssql, true).await;
}

async fn a_retried_load_id_loads_once(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_once", 0).await;
    ctx.table("weir_bulk_other", 0).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut load = header("weir_bulk_once", pb::BulkLoadMode::Append);
    load.load_id = id.clone();
    let first = ctx.load(load.clone(), vec![rows(0..3)]).await.expect("first");
    assert_eq!((first.rows_inserted, first.replayed), (3, false));
    let again = ctx.load(load.clone(), vec![rows(0..3)]).await.expect("retry");
    assert!(again.replayed, "{engine:?}");
    assert_eq!(
        (again.rows_inserted, again.bytes_received, again.engine_path.as_str()),
        (3, first.bytes_received, first.engine_path.as_str())
    );
    assert_eq!(ctx.contents("weir_bulk_once").await.len(), 3);

    // Ids compare exactly: the id in capitals is another load.
    let mut capitals = load.clone();
    capitals.load_id = id.to_uppercase();
    let r = ctx
        .load(capitals, vec![vec![row(60, "c", 1)]])
        .await
        .expect("the id in capitals");
    assert_eq!((r.rows_inserted, r.replayed), (1, false), "{engine:?}");
    // So is the id with a trailing space, except on SQL Server, whose
    // comparisons ignore trailing spaces (docs/api.md).
    if engine != Engine::Mssql {
        let mut spaced = load.clone();
        spaced.load_id = format!("{id} ");
        let r = ctx
            .load(spaced, vec![vec![row(61, "s", 1)]])
            .await
            .expect("the id with a trailing space");
        assert_eq!((r.rows_inserted, r.replayed), (1, false), "{engine:?}");
    }

    // A failed load does not use up its id.
    let failed_id = uuid::Uuid::new_v4().to_string();
    let mut failing = header("weir_bulk_once", pb::BulkLoadMode::Append);
    failing.load_id = failed_id.clone();
    ctx.load(failing.clone(), vec![vec![row(50, "x", -1)]])
        .await
        .expect_err("CHECK violation");
    let r = ctx
        .load(failing, vec![vec![row(50, "x", 1)]])
        .await
        .expect("retry after a failure");
    assert_eq!((r.rows_inserted, r.replayed), (1, false));

    // The same id for another table is refused, not silently replayed.
    let mut other = header("weir_bulk_other", pb::BulkLoadMode::Append);
    other.load_id = id;
    let err = ctx.load(other, vec![rows(0..3)]).await.expect_err("reused id");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(ctx.contents("weir_bulk_other").await.is_empty());
    ctx.server.stop().await;
}

async fn unknown_tables_and_columns_load_nothing(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_names", 1).await;
    let err = ctx
        .load(
            header("weir_bulk_no_such_table", pb::BulkLoadMode::Append),
            vec![rows(0..1)],
        )
        .await
        .expect_err("unknown table");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let mut load = header("weir_bulk_names", pb::BulkLoadMode::Append);
    load.columns[2] = "score\"; DROP TABLE weir_bulk_names; --".into();
    let err = ctx.load(load, vec![rows(0..1)]).await.expect_err("unknown column");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("its columns are id, name, score"),
        "{}",
        err.message()
    );
    let mut load = header("weir_bulk_names", pb::BulkLoadMode::Upsert);
    load.conflict_columns = vec!["name".into()];
    let err = ctx
        .load(load, vec![rows(0..1)])
        .await
        .expect_err("no unique key on name");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(ctx.contents("weir_bulk_names").await.len(), 1);
    ctx.server.stop().await;
}

async fn load_limits_are_enforced(engine: Engine) {
    let ctx = Ctx::new(
        engine,
        "max_rows_per_load = 100\nmax_concurrent_loads = 1\nload_rows_per_second = 200",
    )
    .await;
    ctx.table("weir_bulk_limits", 2).await;
    let before = ctx.contents("weir_bulk_limits").await;
    let err = ctx
        .load(
            header("weir_bulk_limits", pb::BulkLoadMode::Replace),
            vec![rows(0..60), rows(60..120)],
        )
        .await
        .expect_err("over max_rows_per_load");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "LOAD_TOO_LARGE");
    assert_eq!(ctx.contents("weir_bulk_limits").await, before);

    // A second load while one is open is refused with a retry delay.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let client = ctx.client.clone();
    let open = tokio::spawn(async move {
        client
            .load(
                header("weir_bulk_limits", pb::BulkLoadMode::Append),
                ReceiverStream::new(rx),
            )
            .await
    });
    tx.send(rows(0..1)).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = ctx
        .load(header("weir_bulk_limits", pb::BulkLoadMode::Append), vec![rows(10..11)])
        .await
        .expect_err("second concurrent load");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "LOAD_CONCURRENCY_LIMITED");
    {
        use tonic_types::StatusExt;
        assert!(err.get_error_details().retry_info().is_some());
    }
    drop(tx);
    assert_eq!(
        open.await.expect("task").expect("the open load commits").rows_inserted,
        1
    );

    // Over the row rate, loads are slowed down, not refused: the first two
    // spend the burst of 200 rows, the third waits for 100 rows at 200/s.
    // The response says how long the load was held back.
    let started = Instant::now();
    let mut throttled = Vec::new();
    let mut took = Vec::new();
    for start in [100, 200, 300] {
        let load_started = Instant::now();
        let r = ctx
            .load(
                header("weir_bulk_limits", pb::BulkLoadMode::Append),
                vec![rows(start..start + 100)],
            )
            .await
            .expect("slowed, not refused");
        took.push(load_started.elapsed());
        assert_eq!(r.rows_inserted, 100);
        let t = r.throttled.expect("throttled is always set");
        throttled.push(Duration::new(t.seconds as u64, t.nanos as u32));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(throttled[0], Duration::ZERO, "{throttled:?}");
    // 300 rows at 200/s after a burst of 200 take 0.5 s from the first
    // charge to the last: whatever of it the first two loads' own time did
    // not cover (a slow engine refills the bucket), the third waited for,
    // and reports.
    assert!(
        throttled[2] + took[0] + took[1] >= Duration::from_millis(450),
        "the third load waited for the bucket: throttled {throttled:?}, loads took {took:?}"
    );
    ctx.server.stop().await;
}

/// REPLACE empties its table with DELETE: where another table's foreign key
/// would carry that on (ON DELETE CASCADE deletes the child rows, SET NULL
/// unlinks them) it is refused before anything changes, not committed with
/// the children's rows gone. A plain foreign key (NO ACTION) does not stop it.
async fn a_replace_that_would_cascade_into_other_tables_is_refused(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    let (parent, child) = ("weir_bulk_cascade_parent", "weir_bulk_cascade_child");
    ctx.exec(&format!("DROP TABLE IF EXISTS {child}")).await;
    ctx.table(parent, 2).await;
    ctx.exec(&format!(
        "CREATE TABLE {child} (id INT PRIMARY KEY, parent INT, FOREIGN KEY (parent) REFERENCES {parent} (id) ON DELETE CASCADE)"
    ))
    .await;
    ctx.exec(&format!("INSERT INTO {child} VALUES (1, 1000000)")).await;
    let before = ctx.contents(parent).await;
    let err = ctx
        .load(
            header(parent, pb::BulkLoadMode::Replace),
            vec![vec![row(1_000_000, "again", 1)]],
        )
        .await
        .expect_err("a replace that would delete the child's row");
    assert_eq!(err.code(), Code::FailedPrecondition, "{engine:?}: {err:?}");
    assert!(err.message().contains(child), "{engine:?}: {}", err.message());
    assert_eq!(ctx.contents(parent).await, before, "{engine:?}");
    let children = ctx.exec(&format!("SELECT count(*) FROM {child}")).await;
    assert_eq!(int(&children.rows[0].values[0]), 1, "{engine:?}: the child's row stays");
    ctx.exec(&format!("DROP TABLE {child}")).await;
    ctx.server.stop().await;
}

macro_rules! suite {
    ($module:ident, $engine:expr $(, #[$attr:meta])?) => {
        mod $module {
            use super::*;
            #[tokio::test]
            $(#[$attr])?
            async fn every_mode_appends_upserts_and_replaces() {
                super::every_mode_appends_upserts_and_replaces($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn every_common_type_round_trips() {
                super::every_common_type_round_trips($engine).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])?
            async fn a_million_rows_load_in_one_call() {
                super::a_million_rows_load_in_one_call($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_bad_row_anywhere_leaves_the_table_unchanged() {
                super::a_bad_row_anywhere_leaves_the_table_unchanged($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn bad_rows_can_be_skipped_and_reported() {
                super::bad_rows_can_be_skipped_and_reported($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_client_that_vanishes_mid_load_changes_nothing() {
                super::a_client_that_vanishes_mid_load_changes_nothing($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_load_past_its_deadline_changes_nothing() {
                super::a_load_past_its_deadline_changes_nothing($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_retried_load_id_loads_once() {
                super::a_retried_load_id_loads_once($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn unknown_tables_and_columns_load_nothing() {
                super::unknown_tables_and_columns_load_nothing($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn load_limits_are_enforced() {
                super::load_limits_are_enforced($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_replace_that_would_cascade_into_other_tables_is_refused() {
                super::a_replace_that_would_cascade_into_other_tables_is_refused($engine).await
            }
        }
    };
}

/// MySQL's TIME is also a duration, read back as an interval when it is no
/// time of day (`25:00:00`): such an interval loads into it again, through
/// `LOAD DATA` and through INSERTs alike. A time-of-day column of another
/// engine refuses one as a bad row.
#[tokio::test]
async fn mysql_times_past_a_day_load_as_they_are_read() {
    let interval = |microseconds: i64| {
        v(Kind::IntervalValue(pb::Interval {
            months: 0,
            days: 0,
            microseconds,
        }))
    };
    const HOUR: i64 = 3_600_000_000;
    let values = [
        interval(25 * HOUR),
        interval(-(HOUR + HOUR / 2)),
        interval(838 * HOUR + 3_599_999_999),
    ];
    for ctx in [Ctx::new(Engine::Mysql, "").await, Ctx::plain_mysql().await] {
        let table = "weir_bulk_time_past_a_day";
        ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
        ctx.exec(&format!("CREATE TABLE {table} (id INT PRIMARY KEY, d TIME(6))"))
            .await;
        let rows: Vec<pb::Row> = values
            .iter()
            .enumerate()
            .map(|(i, d)| pb::Row {
                values: vec![v(Kind::Int64Value(i as i64)), d.clone()],
            })
            .collect();
        let mut load = header(table, pb::BulkLoadMode::Append);
        load.columns = vec!["id".into(), "d".into()];
        let r = ctx.load(load, vec![rows]).await.expect("intervals into TIME");
        assert_eq!(r.rows_inserted, 3, "{}", r.engine_path);
        let back = ctx.exec(&format!("SELECT d FROM {table} ORDER BY id")).await;
        let got: Vec<_> = back.rows.iter().map(|r| r.values[0].clone()).collect();
        assert_eq!(got, values, "{}", r.engine_path);
        ctx.exec(&format!("DROP TABLE {table}")).await;
        ctx.server.stop().await;
    }
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_time_of_day";
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    ctx.exec(&format!("CREATE TABLE {table} (id INT PRIMARY KEY, d TIME)"))
        .await;
    let mut load = header(table, pb::BulkLoadMode::Append);
    load.columns = vec!["id".into(), "d".into()];
    let err = ctx
        .load(
            load,
            vec![vec![pb::Row {
                values: vec![v(Kind::Int64Value(1)), interval(HOUR)],
            }]],
        )
        .await
        .expect_err("no interval into a time of day");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "BAD_ROW"),
        "{err:?}"
    );
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
}

/// A server that refuses `LOAD DATA LOCAL` (the second MariaDB runs with
/// `local_infile` off) loads through INSERTs instead, and still names a bad row.
#[tokio::test]
async fn mysql_without_local_infile_loads_through_inserts() {
    let ctx = Ctx::plain_mysql().await;
    ctx.table("weir_bulk_no_local", 0).await;
    let r = ctx
        .load(
            header("weir_bulk_no_local", pb::BulkLoadMode::Append),
            vec![rows(0..3), rows(3..5)],
        )
        .await
        .expect("an append without LOCAL");
    assert_eq!((r.rows_inserted, r.engine_path.as_str()), (5, "mysql-multirow-insert"));
    let mut batch = rows(10..20);
    batch[4] = row(14, "bad", -1);
    let err = ctx
        .load(header("weir_bulk_no_local", pb::BulkLoadMode::Append), vec![batch])
        .await
        .expect_err("a CHECK violation fails the load");
    assert_eq!(error_metadata(&err, "row_index"), "4", "{}", err.message());
    assert_eq!(ctx.contents("weir_bulk_no_local").await.len(), 5);
    ctx.server.stop().await;
}

/// Rows whose values together pass the server's `max_allowed_packet` (4 MiB
/// on the second MariaDB) go in several statements, each fitting one
/// packet: one statement of them closed the session, and the load failed
/// as if the source were unreachable. A row too large alone is a bad row.
#[tokio::test]
async fn mysql_loads_cut_statements_to_the_servers_packet_limit() {
    let ctx = Ctx::plain_mysql().await;
    let table = "weir_bulk_wide_rows";
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    ctx.exec(&format!("CREATE TABLE {table} (id INT PRIMARY KEY, b LONGBLOB)"))
        .await;
    let wide = |id: i64, size: usize| pb::Row {
        values: vec![v(Kind::Int64Value(id)), v(Kind::BytesValue(vec![7; size]))],
    };
    let header = |mode: pb::BulkLoadMode| pb::LoadHeader {
        source: "db".into(),
        table: table.into(),
        columns: vec!["id".into(), "b".into()],
        mode: mode as i32,
        conflict_columns: match mode {
            pb::BulkLoadMode::Upsert => vec!["id".into()],
            _ => Vec::new(),
        },
        ..Default::default()
    };
    let batch: Vec<_> = (0..10).map(|id| wide(id, 1_000_000)).collect();
    let r = ctx
        .load(header(pb::BulkLoadMode::Append), vec![batch.clone()])
        .await
        .expect("10 MB of rows into a server taking 4 MB packets");
    assert_eq!((r.rows_inserted, r.engine_path.as_str()), (10, "mysql-multirow-insert"));
    let r = ctx
        .load(header(pb::BulkLoadMode::Upsert), vec![batch])
        .await
        .expect("and upserted");
    assert_eq!((r.rows_inserted, r.rows_updated), (0, 10));
    let err = ctx
        .load(
            header(pb::BulkLoadMode::Append),
            vec![vec![wide(20, 10), wide(21, 5_000_000)]],
        )
        .await
        .expect_err("a row larger than a packet");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_metadata(&err, "row_index"), "1", "{}", err.message());
    assert!(err.message().contains("max_allowed_packet"), "{}", err.message());
    let count = ctx.exec(&format!("SELECT COUNT(*), SUM(LENGTH(b)) FROM {table}")).await;
    assert_eq!(int(&count.rows[0].values[0]), 10, "nothing of the failed load");
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
}

/// A bad row in a later `LOAD DATA` chunk (10,000 rows each) is named by
/// its index in the whole load, also when it clashes with a row of an
/// earlier chunk: undoing the bad chunk to its savepoint keeps the chunks
/// before it for the INSERTs that find the row. The load then rolls back whole.
#[tokio::test]
async fn mysql_bad_rows_in_later_chunks_are_named() {
    let ctx = Ctx::new(Engine::Mysql, "").await;
    ctx.table("weir_bulk_chunks", 2).await;
    let before = ctx.contents("weir_bulk_chunks").await;
    let load = |batch: Vec<pb::Row>| {
        ctx.load(
            header("weir_bulk_chunks", pb::BulkLoadMode::Append),
            batch.chunks(1000).map(<[_]>::to_vec).collect(),
        )
    };
    // The key of row 500, again at row 15,000.
    let mut batch = rows(0..20_000);
    batch[15_000] = row(500, "again", 1);
    let err = load(batch).await.expect_err("a duplicate key across chunks");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(error_metadata(&err, "row_index"), "15000", "{}", err.message());
    assert_eq!(engine_code(&err), "1062");
    // A CHECK violation, which LOAD DATA LOCAL would only warn about.
    let mut batch = rows(0..20_000);
    batch[12_345] = row(12_345, "bad", -1);
    let err = load(batch).await.expect_err("a CHECK violation in the second chunk");
    assert_eq!(error_metadata(&err, "row_index"), "12345", "{}", err.message());
    assert_eq!(ctx.contents("weir_bulk_chunks").await, before);
    // And a clean load of several chunks commits them all.
    let r = load(rows(0..25_000)).await.expect("25,000 good rows");
    assert_eq!(
        (r.rows_inserted, r.engine_path.as_str()),
        (25_000, "mysql-load-data-local")
    );
    let count = ctx.exec("SELECT COUNT(*) FROM weir_bulk_chunks").await;
    assert_eq!(int(&count.rows[0].values[0]), 25_002);
    ctx.server.stop().await;
}

/// An error raised in a trigger (a SIGNAL, a bad value in the trigger's own
/// INSERT) fails LOAD DATA LOCAL outright, where a bad value would only be
/// warned about, and names a row and a column of the trigger's statement:
/// the chunk is loaded again with INSERTs, and the row is found by trying
/// the statement's rows one at a time.
#[tokio::test]
async fn mysql_rows_a_trigger_refuses_are_named() {
    let ctx = Ctx::new(Engine::Mysql, "").await;
    let table = "weir_bulk_trigger";
    ctx.table(table, 0).await;
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}_audit")).await;
    ctx.exec(&format!("CREATE TABLE {table}_audit (x VARCHAR(2))")).await;
    ctx.exec(&format!(
        "CREATE TRIGGER {table}_check BEFORE INSERT ON {table} FOR EACH ROW BEGIN \
         IF NEW.score = 12345 THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'no 12345'; \
         ELSEIF NEW.score = 2 THEN INSERT INTO {table}_audit VALUES ('too long'); END IF; END"
    ))
    .await;
    let batches = |range| rows(range).chunks(1000).map(<[_]>::to_vec).collect::<Vec<_>>();
    let err = ctx
        .load(header(table, pb::BulkLoadMode::Append), batches(3..20_000))
        .await
        .expect_err("a SIGNAL in the second chunk");
    assert_eq!(error_metadata(&err, "row_index"), "12342", "{}", err.message());
    assert_eq!(engine_code(&err), "1644", "{err:?}");
    let mut upsert = header(table, pb::BulkLoadMode::Upsert);
    upsert.conflict_columns = vec!["id".into()];
    let err = ctx
        .load(upsert, batches(0..3))
        .await
        .expect_err("a bad value in the trigger's INSERT");
    assert_eq!(error_metadata(&err, "row_index"), "2", "{}", err.message());
    assert_eq!(engine_code(&err), "1406", "{err:?}");
    assert_eq!(error_metadata(&err, "column"), "", "not a column of the load: {err:?}");
    assert!(ctx.contents(table).await.is_empty());
    ctx.exec(&format!("DROP TABLE {table}, {table}_audit")).await;
    ctx.server.stop().await;
}

/// Savepoints undo nothing in a table without transactions (MyISAM), so
/// loads into one go through the strict INSERTs, which stop at a bad row.
#[tokio::test]
async fn mysql_loads_into_tables_without_transactions_use_inserts() {
    let ctx = Ctx::new(Engine::Mysql, "").await;
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_myisam").await;
    ctx.exec("CREATE TABLE weir_bulk_myisam (id INT PRIMARY KEY, name VARCHAR(20) NOT NULL, score INT) ENGINE=MyISAM")
        .await;
    let r = ctx
        .load(header("weir_bulk_myisam", pb::BulkLoadMode::Append), vec![rows(0..3)])
        .await
        .expect("a MyISAM append");
    assert_eq!((r.rows_inserted, r.engine_path.as_str()), (3, "mysql-multirow-insert"));
    let before = ctx.contents("weir_bulk_myisam").await;
    assert_eq!(before.len(), 3);
    // What such a table cannot promise is refused before anything runs: a
    // REPLACE that fails would leave it emptied, and a load id would not be
    // kept when the rows are, so a retry would load them twice.
    let mut with_id = header("weir_bulk_myisam", pb::BulkLoadMode::Append);
    with_id.load_id = "myisam-1".into();
    for refused in [header("weir_bulk_myisam", pb::BulkLoadMode::Replace), with_id] {
        let err = ctx.load(refused, vec![rows(10..13)]).await.expect_err("refused");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(err.message().contains("ENGINE = InnoDB"), "{}", err.message());
        assert_eq!(ctx.contents("weir_bulk_myisam").await, before);
    }
    // A bad row stops the statement where it is, and the rows before it stay
    // (nothing undoes them here): they are not tried again one by one to
    // name it, which would store them twice.
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_myisam_nokey").await;
    ctx.exec(
        "CREATE TABLE weir_bulk_myisam_nokey (id INT, name VARCHAR(20) NOT NULL, score INT CHECK (score >= 0)) \
         ENGINE=MyISAM",
    )
    .await;
    let mut batch = rows(0..10);
    batch[5] = row(5, "n5", -1);
    ctx.load(header("weir_bulk_myisam_nokey", pb::BulkLoadMode::Append), vec![batch])
        .await
        .expect_err("a row fails its CHECK");
    let stored = ctx.contents("weir_bulk_myisam_nokey").await;
    assert_eq!(stored.len(), 5, "each row before the bad one once: {stored:?}");
    ctx.exec("DROP TABLE weir_bulk_myisam_nokey").await;
    ctx.server.stop().await;
}

/// A batch bigger than the server's largest packet (`max_allowed_packet`,
/// 16 MB here) reaches it in pieces.
#[tokio::test]
async fn mysql_loads_batches_larger_than_a_server_packet() {
    let ctx = Ctx::new(Engine::Mysql, "").await;
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_big").await;
    ctx.exec("CREATE TABLE weir_bulk_big (id INT PRIMARY KEY, b LONGBLOB)")
        .await;
    // Sent as hex, 6 MB of bytes per row is 12 MB of text: two rows make
    // a 24 MB batch.
    let blob: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    let batch = (0..2)
        .map(|id| pb::Row {
            values: vec![v(Kind::Int64Value(id)), v(Kind::BytesValue(blob.clone()))],
        })
        .collect();
    let load = pb::LoadHeader {
        source: "db".into(),
        table: "weir_bulk_big".into(),
        columns: vec!["id".into(), "b".into()],
        ..Default::default()
    };
    let r = ctx.load(load, vec![batch]).await.expect("a 24 MB batch");
    assert_eq!((r.rows_inserted, r.engine_path.as_str()), (2, "mysql-load-data-local"));
    let back = ctx
        .exec("SELECT LENGTH(b), HEX(SUBSTRING(b, 250, 4)) FROM weir_bulk_big ORDER BY id")
        .await;
    for row in &back.rows {
        assert_eq!(int(&row.values[0]), 6_000_000);
        assert_eq!(text(&row.values[1]), "F9FA0001");
    }
    ctx.server.stop().await;
}

/// A client that pauses mid-load for longer than the server waits for the
/// next packet of a `LOAD DATA LOCAL` file (`net_read_timeout`, lowered to
/// 4 s here) still loads every row: the pause ends a chunk, not the load.
#[tokio::test]
async fn mysql_loads_outlast_a_client_that_pauses() {
    use mysql_async::prelude::Queryable;
    let mut direct = mysql_direct().await;
    let old: u64 = direct
        .query_first("SELECT @@GLOBAL.net_read_timeout")
        .await
        .expect("read the server's wait")
        .expect("a value");
    direct
        .query_drop("SET GLOBAL net_read_timeout = 4")
        .await
        .expect("lower the server's wait");
    // Put back even if the test fails: the server outlives the run.
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            let old = self.0;
            let restored = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let mut direct = mysql_direct().await;
                    direct.query_drop(format!("SET GLOBAL net_read_timeout = {old}")).await
                })?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .join();
            if !matches!(restored, Ok(Ok(()))) {
                eprintln!("net_read_timeout was not restored to {old}");
            }
        }
    }
    let restore = Restore(old);
    // The gateway's sessions start after this, with the lowered wait.
    let ctx = Ctx::new(Engine::Mysql, "").await;
    ctx.table("weir_bulk_pause", 0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let client = tokio::spawn(async move {
        let _ = tx.send(rows(0..5)).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let _ = tx.send(rows(5..10)).await;
    });
    let loaded = ctx
        .client
        .load(
            header("weir_bulk_pause", pb::BulkLoadMode::Append),
            ReceiverStream::new(rx),
        )
        .await;
    drop(restore);
    client.await.expect("the client task");
    let r = loaded.expect("a load with a pause");
    assert_eq!((r.rows_inserted, r.engine_path.as_str()), (10, "mysql-load-data-local"));
    assert_eq!(ctx.contents("weir_bulk_pause").await.len(), 10);
    ctx.server.stop().await;
}

/// A PostgreSQL load, a transaction and the schema calls take their session
/// from the pool as a statement does: reset of what the caller before left
/// on it. Before, only statements reset it, so a temporary table of the
/// same name took a load's rows, which vanished with the session's reset.
#[tokio::test]
async fn a_postgres_load_and_transaction_find_their_session_reset() {
    // One pooled session: what one caller leaves on it, the next one gets.
    let one_session = postgres("bulk", "db", "[tenants.bulk.sources.db.pool]\nmax_size = 1\n");
    let server = TestServer::start(&tenant("bulk", "", &one_session)).await;
    let client = server.client("key-bulk").await;
    let ctx = Ctx {
        engine: Engine::Postgres,
        server,
        client,
    };
    ctx.table("weir_bulk_shadowed", 0).await;
    ctx.exec("CREATE TEMP TABLE weir_bulk_shadowed (id INT, name TEXT, score INT)")
        .await;
    let loaded = ctx
        .load(header("weir_bulk_shadowed", pb::BulkLoadMode::Append), vec![rows(0..3)])
        .await
        .expect("load");
    assert_eq!(loaded.rows_inserted, 3);
    assert_eq!(
        ctx.contents("weir_bulk_shadowed").await,
        ["0:n0:0", "1:n1:1", "2:n2:2"],
        "the rows went to the earlier caller's temporary table"
    );
    ctx.exec("SET application_name = 'left_behind'").await;
    let tx = ctx
        .client
        .begin("db", weir_client::weir_proto::v1::IsolationLevel::RepeatableRead, false)
        .await
        .expect("begin");
    let seen = ctx
        .client
        .execute_in(&tx, "db", "SELECT current_setting('application_name')", vec![])
        .await
        .expect("in the transaction");
    ctx.client.rollback(&tx).await.expect("rollback");
    assert_eq!(
        text(&seen.rows[0].values[0]),
        "weir",
        "the transaction ran with another caller's setting"
    );
    ctx.server.stop().await;
}

/// A deadline that passes after the last rows, while the engine still
/// finishes the load (here a statement trigger that takes 1.5 s), rolls the
/// load back, as the caller is told; before, the engine went on to commit.
#[tokio::test]
async fn a_load_whose_deadline_passes_after_its_last_rows_is_rolled_back() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    slow_end_load_times_out(&ctx, "weir_bulk_slow_end", "700m").await;
    ctx.server.stop().await;
}

/// The same when the load first waited for its turn at the tenant's rate:
/// the transport's timer ran during that wait, so the gateway's own must
/// count it. Before, the transport cut the call first with a bare CANCELLED
/// and the engine went on to commit.
#[tokio::test]
async fn a_load_that_waited_for_its_turn_still_times_out_and_rolls_back() {
    let ctx = Ctx::new(
        Engine::Postgres,
        "requests_per_second = 1\nburst = 1\nmax_rate_wait = \"2s\"",
    )
    .await;
    // Each statement before the load takes a turn, so the load waits about a second for its own.
    slow_end_load_times_out(&ctx, "weir_bulk_slow_turn", "1700m").await;
    ctx.server.stop().await;
}

/// Loads 10 rows into a fresh `table` whose statement trigger takes 1.5 s,
/// with the deadline `grpc_timeout`, which passes during the trigger: the
/// caller hears LOAD_TIMEOUT, and the table stays empty.
async fn slow_end_load_times_out(ctx: &Ctx, table: &str, grpc_timeout: &str) {
    let mut request = tonic::Request::new(tokio_stream::iter(slow_ending_load(ctx, table).await));
    request
        .metadata_mut()
        .insert("grpc-timeout", grpc_timeout.parse().expect("header value"));
    let err = ctx.client.bulk().load(request).await.expect_err("past its deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert_eq!(reason(&err), "LOAD_TIMEOUT");
    assert_ends_empty(ctx, table, "the caller was told of a timeout, and the load committed").await;
}

/// The messages of an APPEND of 10 rows into a fresh PostgreSQL `table`
/// whose statement trigger takes 1.5 s: the load's end outlasts its rows.
async fn slow_ending_load(ctx: &Ctx, table: &str) -> Vec<pb::LoadRequest> {
    load_ending_after(ctx, table, 1.5).await
}

/// The same, with a trigger that takes `seconds`.
async fn load_ending_after(ctx: &Ctx, table: &str, seconds: f64) -> Vec<pb::LoadRequest> {
    use weir_client::weir_proto::v1::load_request::Message as LoadMessage;
    ctx.table(table, 0).await;
    ctx.exec(&format!(
        "CREATE OR REPLACE FUNCTION {table}() RETURNS trigger LANGUAGE plpgsql \
         AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
    ))
    .await;
    ctx.exec(&format!(
        "CREATE TRIGGER {table} AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {table}()"
    ))
    .await;
    vec![
        pb::LoadRequest {
            message: Some(LoadMessage::Header(header(table, pb::BulkLoadMode::Append))),
        },
        pb::LoadRequest {
            message: Some(LoadMessage::Rows(pb::LoadRows { rows: rows(0..10) })),
        },
    ]
}

/// A load its caller gave up on (its deadline) stops the statement it runs
/// in the engine at once: run to its end, it would hold its locks, its
/// session and its load id, and a retry would wait behind it.
#[tokio::test]
async fn a_postgres_load_given_up_on_stops_its_statement() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_given_up";
    let mut request = tonic::Request::new(tokio_stream::iter(load_ending_after(&ctx, table, 60.0).await));
    request
        .metadata_mut()
        .insert("grpc-timeout", "1S".parse().expect("header value"));
    let err = ctx.client.bulk().load(request).await.expect_err("past its deadline");
    assert_eq!(reason(&err), "LOAD_TIMEOUT", "{err:?}");
    let pg = pg_direct().await;
    assert!(
        wait_until_gone(&pg, table, Duration::from_secs(5)).await,
        "the load's statement still runs"
    );
    assert_eq!(ctx.contents(table).await, Vec::<String>::new());
    ctx.server.stop().await;
}

/// A single-precision column (PostgreSQL's `real`, MySQL's `FLOAT`) holds
/// whole numbers exactly up to 2^24 and about 6 digits: a value it would
/// round is the row's error, as a `real` placeholder's is, not a silent
/// rounding.
async fn single_precision_columns_take_only_what_they_hold_exactly(engine: Engine) {
    let real = if engine == Engine::Postgres { "real" } else { "FLOAT" };
    let values = [
        Kind::Int64Value(16_777_216),
        Kind::Int64Value(16_777_217),
        Kind::DecimalValue("2.5".into()),
        Kind::DecimalValue("1.23456789".into()),
    ];
    assert_eq!(
        load_skipping(engine, "weir_bulk_single", real, values).await,
        (2, vec![1, 3])
    );
}

/// Loads `values` into a new table `table` (id, a column of `column_type`)
/// with bad rows skipped: the rows inserted and the indexes of those skipped.
async fn load_skipping(
    engine: Engine,
    table: &str,
    column_type: &str,
    values: impl IntoIterator<Item = Kind>,
) -> (u64, Vec<u64>) {
    let ctx = Ctx::new(engine, "").await;
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    ctx.exec(&format!("CREATE TABLE {table} (id INT PRIMARY KEY, x {column_type})"))
        .await;
    let rows = values
        .into_iter()
        .enumerate()
        .map(|(i, x)| pb::Row {
            values: vec![v(Kind::Int64Value(i as i64)), v(x)],
        })
        .collect();
    let mut load = pb::LoadHeader {
        columns: vec!["id".into(), "x".into()],
        ..header(table, pb::BulkLoadMode::Append)
    };
    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let r = ctx.load(load, vec![rows]).await.expect("load");
    eprintln!("{engine:?} row errors: {:?}", r.row_errors);
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
    (r.rows_inserted, r.row_errors.iter().map(|e| e.row_index).collect())
}

#[tokio::test]
async fn single_precision_columns_take_only_what_they_hold_exactly_in_postgres() {
    single_precision_columns_take_only_what_they_hold_exactly(Engine::Postgres).await;
}

#[tokio::test]
async fn single_precision_columns_take_only_what_they_hold_exactly_in_mysql() {
    single_precision_columns_take_only_what_they_hold_exactly(Engine::Mysql).await;
}

/// A decimal column of declared precision and scale takes a number only
/// when it holds it without rounding: digits past its scale (which every
/// engine would round without a word) and past its precision are the
/// row's error.
async fn decimal_columns_take_only_what_they_hold_exactly(engine: Engine) {
    let values = [
        Kind::DecimalValue("1.5".into()),
        Kind::DecimalValue("1.005".into()),
        Kind::DoubleValue(1.2345),
        Kind::Int64Value(12_345),
        Kind::DecimalValue("-9999.99".into()),
        Kind::DoubleValue(0.25),
    ];
    assert_eq!(
        load_skipping(engine, "weir_bulk_decimal", "DECIMAL(6,2)", values).await,
        (3, vec![1, 2, 3])
    );
}

#[tokio::test]
async fn decimal_columns_take_only_what_they_hold_exactly_in_postgres() {
    decimal_columns_take_only_what_they_hold_exactly(Engine::Postgres).await;
}

#[tokio::test]
async fn decimal_columns_take_only_what_they_hold_exactly_in_mysql() {
    decimal_columns_take_only_what_they_hold_exactly(Engine::Mysql).await;
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn decimal_columns_take_only_what_they_hold_exactly_in_mssql() {
    decimal_columns_take_only_what_they_hold_exactly(Engine::Mssql).await;
}

/// A PostgreSQL array's elements are checked as the scalar column's value
/// would be: an integer a `real[]` would round, or bytes and booleans a
/// `text[]` would store as their text, are the row's error; NULL elements
/// and nested (multidimensional) lists of good elements load.
#[tokio::test]
async fn array_elements_are_checked_like_values_in_postgres() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_arrays";
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    ctx.exec(&format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, f REAL[], t TEXT[])"
    ))
    .await;
    let list = |values: Vec<Kind>| {
        v(Kind::ListValue(pb::ListValue {
            values: values.into_iter().map(v).collect(),
        }))
    };
    let string = |s: &str| Kind::StringValue(s.into());
    let good_text = || list(vec![string("a")]);
    let cases = vec![
        (list(vec![Kind::Int64Value(16), Kind::Null(true)]), good_text()),
        (list(vec![Kind::Int64Value(16_777_217)]), good_text()),
        (
            list(vec![
                Kind::ListValue(pb::ListValue {
                    values: vec![v(Kind::DoubleValue(1.5)), v(Kind::DoubleValue(2.5))],
                }),
                Kind::ListValue(pb::ListValue {
                    values: vec![v(Kind::DoubleValue(3.5)), v(Kind::DecimalValue("1.23456789".into()))],
                }),
            ]),
            good_text(),
        ),
        (
            list(vec![Kind::DoubleValue(0.5)]),
            list(vec![Kind::BytesValue(vec![1, 2])]),
        ),
        (list(vec![Kind::DoubleValue(0.5)]), list(vec![Kind::BoolValue(true)])),
        (
            list(vec![Kind::ListValue(pb::ListValue {
                values: vec![v(Kind::DoubleValue(1.5)), v(Kind::Null(true))],
            })]),
            list(vec![string("b"), Kind::Null(true)]),
        ),
    ];
    let rows = cases
        .into_iter()
        .enumerate()
        .map(|(i, (f, t))| pb::Row {
            values: vec![v(Kind::Int64Value(i as i64)), f, t],
        })
        .collect();
    let mut load = pb::LoadHeader {
        columns: vec!["id".into(), "f".into(), "t".into()],
        ..header(table, pb::BulkLoadMode::Append)
    };
    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let r = ctx.load(load, vec![rows]).await.expect("load");
    let skipped: Vec<_> = r.row_errors.iter().map(|e| e.row_index).collect();
    assert_eq!((r.rows_inserted, skipped), (2, vec![1, 2, 3, 4]), "{:?}", r.row_errors);
    let stored = ctx
        .exec(&format!("SELECT f::text, t::text FROM {table} ORDER BY id"))
        .await;
    let stored: Vec<(String, String)> = stored
        .rows
        .iter()
        .map(|r| (text(&r.values[0]).to_string(), text(&r.values[1]).to_string()))
        .collect();
    assert_eq!(
        stored,
        vec![
            ("{16,NULL}".to_string(), "{a}".to_string()),
            ("{{1.5,NULL}}".to_string(), "{b,NULL}".to_string()),
        ]
    );
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
}

/// PostgreSQL's `time` would drop a value's UTC offset and `timetz` give a
/// value without one the session's: both are the row's error, and a time
/// with its offset into `timetz` keeps it.
#[tokio::test]
async fn postgres_times_keep_their_offsets_or_are_refused() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_times";
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    ctx.exec(&format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, a TIME, b TIMETZ[])"
    ))
    .await;
    let time = |offset: Option<i32>| {
        Kind::TimeValue(pb::TimeOfDay {
            hours: 10,
            utc_offset_seconds: offset,
            ..Default::default()
        })
    };
    let list = |values: Vec<Kind>| {
        v(Kind::ListValue(pb::ListValue {
            values: values.into_iter().map(v).collect(),
        }))
    };
    let cases = vec![
        (v(time(None)), list(vec![time(Some(7200))])),
        (v(time(Some(7200))), list(vec![time(Some(0))])),
        (v(time(None)), list(vec![time(Some(0)), time(None)])),
    ];
    let rows = cases
        .into_iter()
        .enumerate()
        .map(|(i, (a, b))| pb::Row {
            values: vec![v(Kind::Int64Value(i as i64)), a, b],
        })
        .collect();
    let mut load = pb::LoadHeader {
        columns: vec!["id".into(), "a".into(), "b".into()],
        ..header(table, pb::BulkLoadMode::Append)
    };
    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let r = ctx.load(load, vec![rows]).await.expect("load");
    let skipped: Vec<_> = r.row_errors.iter().map(|e| (e.row_index, e.column.as_str())).collect();
    assert_eq!(
        (r.rows_inserted, skipped),
        (1, vec![(1, "a"), (2, "b")]),
        "{:?}",
        r.row_errors
    );
    let stored = ctx.exec(&format!("SELECT a::text, b::text FROM {table}")).await;
    let row = &stored.rows[0].values;
    assert_eq!((text(&row[0]), text(&row[1])), ("10:00:00", "{10:00:00+02}"));
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
}

/// Large messages of narrow rows take much more memory decoded than on the
/// wire (a value is 32 bytes): two of them do not fit the load's feed at
/// once. The MySQL path, which keeps a chunk's rows until the chunk is
/// loaded, lets them go before it waits for the next batch, which needs
/// that memory, instead of waiting for ever.
#[tokio::test]
async fn a_mysql_load_of_messages_larger_than_half_its_feed_completes() {
    let ctx = Ctx::new(Engine::Mysql, "").await;
    let table = "weir_bulk_wide_messages";
    let columns: Vec<String> = (1..=10).map(|i| format!("c{i}")).collect();
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    ctx.exec(&format!(
        "CREATE TABLE {table} ({}) ENGINE = InnoDB",
        columns
            .iter()
            .map(|c| format!("{c} BIGINT"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await;
    // 100,000 rows of 10 numbers: about 4 MB sent, about 37 MB decoded.
    let message = |base: i64| -> Vec<pb::Row> {
        (0..100_000)
            .map(|i| pb::Row {
                values: (0..10).map(|c| v(Kind::Int64Value(base + i * 10 + c))).collect(),
            })
            .collect()
    };
    let header = pb::LoadHeader {
        columns,
        ..header(table, pb::BulkLoadMode::Append)
    };
    let loaded = tokio::time::timeout(
        Duration::from_secs(120),
        ctx.load(header, vec![message(0), message(1_000_000)]),
    )
    .await
    .expect("the load does not wait for ever")
    .expect("loaded");
    assert_eq!(loaded.rows_inserted, 200_000);
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
}

/// The same on MySQL: the LOAD DATA whose row trigger sleeps is killed.
#[tokio::test]
async fn a_mysql_load_given_up_on_stops_its_statement() {
    use mysql_async::prelude::Queryable;
    use weir_client::weir_proto::v1::load_request::Message as LoadMessage;
    let ctx = Ctx::new(Engine::Mysql, "").await;
    let table = "weir_bulk_given_up";
    ctx.table(table, 0).await;
    // What the processlist shows while the trigger runs is its statement.
    let marker = format!("weir_slept_{}", uuid::Uuid::new_v4().simple());
    ctx.exec(&format!(
        "CREATE TRIGGER {table}_slow AFTER INSERT ON {table} FOR EACH ROW SET @{marker} = SLEEP(60)"
    ))
    .await;
    let messages = vec![
        pb::LoadRequest {
            message: Some(LoadMessage::Header(header(table, pb::BulkLoadMode::Append))),
        },
        pb::LoadRequest {
            message: Some(LoadMessage::Rows(pb::LoadRows { rows: rows(0..10) })),
        },
    ];
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    request
        .metadata_mut()
        .insert("grpc-timeout", "1S".parse().expect("header value"));
    let err = ctx.client.bulk().load(request).await.expect_err("past its deadline");
    assert_eq!(reason(&err), "LOAD_TIMEOUT", "{err:?}");
    let mut direct = mysql_direct().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running: Option<i64> = direct
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE CONCAT('%', ?, '%') \
                 AND ID <> CONNECTION_ID()",
                (&marker,),
            )
            .await
            .expect("processlist");
        if running == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the load's statement still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ctx.contents(table).await, Vec::<String>::new());
    ctx.server.stop().await;
}

/// Once the load's statement is over (past the trigger's end and the
/// transaction's), `table` is still empty.
async fn assert_ends_empty(ctx: &Ctx, table: &str, why: &str) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let still_running = format!(
        "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%{table}%' \
         AND state = 'active' AND pid <> pg_backend_pid()"
    );
    while !ctx.exec(&still_running).await.rows.is_empty() {
        assert!(Instant::now() < deadline, "the load did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ctx.contents(table).await, Vec::<String>::new(), "{why}");
}

/// A client that cancels after its last message, while the engine still
/// works on the load, leaves the table as it was: told nothing, it would
/// run the load again.
#[tokio::test]
async fn a_load_cancelled_after_its_last_message_changes_nothing() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_cancelled";
    let messages = slow_ending_load(&ctx, table).await;
    let mut bulk = ctx.client.bulk();
    let call = tokio::spawn(async move { bulk.load(tokio_stream::iter(messages)).await });
    // The rows are in and the trigger is running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    call.abort();
    assert!(
        call.await.is_err_and(|e| e.is_cancelled()),
        "the call ended before its cancel"
    );
    assert_ends_empty(&ctx, table, "the caller cancelled, and the load committed").await;
    ctx.server.stop().await;
}

/// A role without the CREATE privilege on its schema loads with load ids
/// into a receipt table a DBA made and granted: CREATE TABLE IF NOT EXISTS
/// would be refused for it even with the table there.
#[tokio::test]
async fn load_ids_need_no_create_privilege_once_their_table_exists() {
    let owner = Ctx::new(Engine::Postgres, "").await;
    owner.table("weir_bulk_granted", 0).await;
    // The receipt table exists: a first load with an id made it.
    let mut load = header("weir_bulk_granted", pb::BulkLoadMode::Append);
    load.load_id = uuid::Uuid::new_v4().to_string();
    owner
        .load(load.clone(), vec![rows(0..1)])
        .await
        .expect("the owner's load");
    let password = env_or("WEIR_TEST_PG_PASSWORD", "no-create");
    pg_direct()
        .await
        .batch_execute(&format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'weir_no_create') THEN \
             CREATE ROLE weir_no_create LOGIN PASSWORD '{password}'; END IF; END $$; \
             REVOKE CREATE ON SCHEMA public FROM PUBLIC; REVOKE CREATE ON SCHEMA public FROM weir_no_create; \
             GRANT USAGE ON SCHEMA public TO weir_no_create; \
             GRANT SELECT, INSERT, UPDATE ON weir_load_ids, weir_bulk_granted TO weir_no_create"
        ))
        .await
        .expect("a role that may not create tables");
    let user = format!("user = \"{}\"", env_or("WEIR_TEST_PG_USER", "postgres"));
    let source = postgres("granted", "db", "").replace(&user, "user = \"weir_no_create\"");
    let server = TestServer::start(&tenant("granted", "", &source)).await;
    let client = server.client("key-granted").await;
    let ctx = Ctx {
        engine: Engine::Postgres,
        server,
        client,
    };
    load.load_id = uuid::Uuid::new_v4().to_string();
    let r = ctx
        .load(load, vec![rows(1..3)])
        .await
        .unwrap_or_else(|e| panic!("a load with an id by a role that may not create tables: {e:?}"));
    assert_eq!(r.rows_inserted, 2);
    assert_eq!(owner.contents("weir_bulk_granted").await.len(), 3);
    ctx.server.stop().await;
    owner.server.stop().await;
}

/// A row PostgreSQL refuses near the start of a large load is reported while
/// the client is still sending (a COPY ends every 16 MiB, and PostgreSQL
/// reports a COPY's bad row when it ends), named by its place in the load.
#[tokio::test]
async fn a_bad_row_early_in_a_large_load_is_reported_before_the_client_ends() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    ctx.table("weir_bulk_early", 0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = {
        let client = ctx.client.clone();
        let header = header("weir_bulk_early", pb::BulkLoadMode::Append);
        tokio::spawn(async move { client.load(header, ReceiverStream::new(rx)).await })
    };
    // Row 3 breaks the CHECK; then about 40 MiB of good rows, and the
    // stream is left open: only an early report ends the call.
    let mut first = rows(0..10_000);
    first[3] = row(3, "bad", -5);
    let sender = tokio::spawn(async move {
        let mut batch = first;
        for i in 1..200 {
            if tx.send(batch).await.is_err() {
                break;
            }
            batch = rows(i * 10_000..(i + 1) * 10_000);
        }
        tx
    });
    let err = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("reported before the client ended the load")
        .expect("load task")
        .expect_err("the CHECK is violated");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_metadata(&err, "row_index"), "3", "{err:?}");
    drop(sender.await.expect("sender"));
    assert_eq!(ctx.contents("weir_bulk_early").await, Vec::<String>::new());
    ctx.server.stop().await;
}

/// An SQLite upsert into a table whose unique index compares keys its own
/// way (COLLATE NOCASE) fails on the row the index matched but `=` does not,
/// instead of dropping it while counting it updated.
#[tokio::test]
async fn sqlite_upserts_lose_no_row_to_a_key_compared_otherwise() {
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    ctx.exec("CREATE TABLE weir_bulk_nocase (email TEXT NOT NULL, n INTEGER)")
        .await;
    ctx.exec("CREATE UNIQUE INDEX weir_bulk_nocase_email ON weir_bulk_nocase (email COLLATE NOCASE)")
        .await;
    ctx.exec("INSERT INTO weir_bulk_nocase VALUES ('a@x', 1)").await;
    let mut load = header("weir_bulk_nocase", pb::BulkLoadMode::Upsert);
    load.columns = vec!["email".into(), "n".into()];
    load.conflict_columns = vec!["email".into()];
    let row = |email: &str, n: i64| pb::Row {
        values: vec![v(Kind::StringValue(email.into())), v(Kind::Int64Value(n))],
    };
    let err = ctx
        .load(load, vec![vec![row("b@x", 3), row("A@x", 2)]])
        .await
        .expect_err("the second row has no equal key to update");
    assert_eq!(
        (reason(&err).as_str(), error_metadata(&err, "row_index").as_str()),
        ("BAD_ROW", "1"),
        "{err:?}"
    );
    let rows = ctx
        .exec("SELECT email, n FROM weir_bulk_nocase ORDER BY email")
        .await
        .rows;
    assert_eq!(rows.len(), 1, "the load was rolled back");
    ctx.server.stop().await;
}

/// A SQLite table's own conflict clause (`UNIQUE ON CONFLICT REPLACE`,
/// `... IGNORE`) does not apply to loads: an upsert does not delete the
/// other row holding a unique value, an append does not drop a duplicate
/// and count it stored. Both fail on the row, as on the other engines.
#[tokio::test]
async fn sqlite_tables_own_conflict_clauses_neither_delete_nor_drop_rows() {
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    ctx.exec(
        "CREATE TABLE weir_bulk_clauses (id INTEGER PRIMARY KEY, name TEXT UNIQUE ON CONFLICT REPLACE, \
         score INTEGER UNIQUE ON CONFLICT IGNORE)",
    )
    .await;
    ctx.exec("INSERT INTO weir_bulk_clauses VALUES (3, 'a@x', 30)").await;
    let mut upsert = header("weir_bulk_clauses", pb::BulkLoadMode::Upsert);
    upsert.conflict_columns = vec!["id".into()];
    let append = header("weir_bulk_clauses", pb::BulkLoadMode::Append);
    for (load, bad, what) in [
        (upsert, row(5, "a@x", 50), "an upsert meeting another row's unique name"),
        (
            append,
            row(6, "b@x", 30),
            "an append meeting another row's unique score",
        ),
    ] {
        let err = ctx
            .load(load, vec![vec![row(4, "c@x", 40), bad]])
            .await
            .expect_err(what);
        assert_eq!(
            (
                reason(&err).as_str(),
                error_metadata(&err, "row_index").as_str(),
                engine_code(&err).as_str()
            ),
            ("BAD_ROW", "1", "2067"),
            "{what}: {err:?}"
        );
        let rows = ctx
            .exec("SELECT id, name, score FROM weir_bulk_clauses ORDER BY id")
            .await
            .rows;
        assert_eq!(rows.len(), 1, "{what}: the load was rolled back, row 3 kept");
        assert_eq!(int(&rows[0].values[0]), 3, "{what}");
    }
    ctx.server.stop().await;
}

/// SQLite reads no text as an infinity: a decimal `Infinity` is loaded as
/// SQLite's REAL infinity (as Execute binds it), not as the text
/// "Infinity", and a NaN (which SQLite would store as NULL) is the row's
/// error, skipped like any other bad row when the caller asks. A TEXT
/// column keeps all three as the text they came as.
#[tokio::test]
async fn sqlite_loads_store_infinite_decimals_as_numbers_and_refuse_nan() {
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    ctx.exec("CREATE TABLE weir_bulk_special (id INTEGER PRIMARY KEY, d NUMERIC, t TEXT)")
        .await;
    let mut load = header("weir_bulk_special", pb::BulkLoadMode::Append);
    load.columns = vec!["id".into(), "d".into(), "t".into()];
    let row = |id: i64, d: &str, t: &str| pb::Row {
        values: vec![
            v(Kind::Int64Value(id)),
            v(Kind::DecimalValue(d.into())),
            v(Kind::DecimalValue(t.into())),
        ],
    };
    let err = ctx
        .load(load.clone(), vec![vec![row(1, "1.5", "NaN"), row(2, "NaN", "1")]])
        .await
        .expect_err("NaN is refused");
    assert_eq!(
        (
            reason(&err).as_str(),
            error_metadata(&err, "row_index").as_str(),
            error_metadata(&err, "column").as_str()
        ),
        ("BAD_ROW", "1", "d"),
        "{err:?}"
    );
    assert!(ctx.exec("SELECT id FROM weir_bulk_special").await.rows.is_empty());

    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let batch = vec![
        row(1, "Infinity", "Infinity"),
        row(2, "-NaN", "0"),
        row(3, "-Infinity", "NaN"),
        row(4, "12.50", "12.50"),
    ];
    let r = ctx.load(load, vec![batch]).await.expect("the NaN row is skipped");
    assert_eq!((r.rows_inserted, r.rows_skipped), (3, 1), "{:?}", r.row_errors);
    assert_eq!(r.row_errors[0].row_index, 1);
    let stored: Vec<String> = ctx
        .exec(
            "SELECT typeof(d) || ':' || (d > 1e308) || ':' || (d < -1e308) || ':' || t \
             FROM weir_bulk_special ORDER BY id",
        )
        .await
        .rows
        .iter()
        .map(|r| text(&r.values[0]).to_string())
        .collect();
    assert_eq!(stored, ["real:1:0:Infinity", "real:0:1:NaN", "real:0:0:12.50"]);
    ctx.server.stop().await;
}

/// A column of no declared type converts no text: a decimal loaded into it
/// is a number, as the same decimal sent as a parameter is, and compares
/// as one (bound as text, `10.5 > 100` held and `= 10.5` did not).
#[tokio::test]
async fn sqlite_decimals_loaded_into_untyped_columns_are_numbers() {
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    ctx.exec("CREATE TABLE weir_bulk_untyped (id INTEGER PRIMARY KEY, amount)")
        .await;
    let mut load = header("weir_bulk_untyped", pb::BulkLoadMode::Append);
    load.columns = vec!["id".into(), "amount".into()];
    let row = |id: i64, d: &str| pb::Row {
        values: vec![v(Kind::Int64Value(id)), v(Kind::DecimalValue(d.into()))],
    };
    let batch = vec![row(1, "10.5"), row(2, "7"), row(3, "123456789012345678901234")];
    ctx.load(load, vec![batch]).await.expect("load");
    let stored: Vec<String> = ctx
        .exec(
            "SELECT typeof(amount) || ':' || (amount > 100) || ':' || (amount = 10.5) \
             FROM weir_bulk_untyped ORDER BY id",
        )
        .await
        .rows
        .iter()
        .map(|r| text(&r.values[0]).to_string())
        .collect();
    // Beyond a double's digits it stays exact, as text.
    assert_eq!(stored, ["real:0:1", "integer:0:0", "text:1:0"]);
    ctx.server.stop().await;
}

/// SQLite stores a number in a column of numeric affinity (`DECIMAL`,
/// `MONEY`, `INTEGER`) as a double when it is not a 64-bit integer: a
/// decimal with more digits than that keeps is a bad row, not rounded,
/// and a `TEXT` column keeps it exact.
#[tokio::test]
async fn sqlite_decimals_a_numeric_column_would_round_are_refused() {
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    ctx.exec("CREATE TABLE weir_bulk_money (id INTEGER PRIMARY KEY, balance DECIMAL(38,2), m MONEY, t TEXT)")
        .await;
    let mut load = header("weir_bulk_money", pb::BulkLoadMode::Append);
    load.columns = vec!["id".into(), "balance".into(), "m".into(), "t".into()];
    let row = |id: i64, balance: &str, m: &str| pb::Row {
        values: vec![
            v(Kind::Int64Value(id)),
            v(Kind::DecimalValue(balance.into())),
            v(Kind::DecimalValue(m.into())),
            v(Kind::DecimalValue("12345678901234567890.12".into())),
        ],
    };
    let err = ctx
        .load(
            load.clone(),
            vec![vec![row(1, "10.50", "1"), row(2, "12345678901234567890.12", "1")]],
        )
        .await
        .expect_err("20 digits do not fit a double");
    assert_eq!(
        (
            reason(&err).as_str(),
            error_metadata(&err, "row_index").as_str(),
            error_metadata(&err, "column").as_str()
        ),
        ("BAD_ROW", "1", "balance"),
        "{err:?}"
    );
    assert!(ctx.exec("SELECT id FROM weir_bulk_money").await.rows.is_empty());
    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let batch = vec![
        row(1, "10.50", "9223372036854775807"),
        row(2, "1", "1e-400"),
        row(3, "12345678901234.5", "2"),
    ];
    let r = ctx
        .load(load, vec![batch])
        .await
        .expect("the row past a double is skipped");
    assert_eq!((r.rows_inserted, r.rows_skipped), (2, 1), "{:?}", r.row_errors);
    assert_eq!((r.row_errors[0].row_index, r.row_errors[0].column.as_str()), (1, "m"));
    let stored: Vec<String> = ctx
        .exec("SELECT balance || ':' || m || ':' || t FROM weir_bulk_money ORDER BY id")
        .await
        .rows
        .iter()
        .map(|r| text(&r.values[0]).to_string())
        .collect();
    assert_eq!(
        stored,
        [
            "10.5:9223372036854775807:12345678901234567890.12",
            "12345678901234.5:2:12345678901234567890.12"
        ]
    );
    ctx.server.stop().await;
}

/// A SQLite load its caller gave up on stops inside the statement it runs
/// (here a REPLACE's DELETE, which checks an unindexed foreign key for each
/// row, for minutes), so the source's write turn is free again at once.
#[tokio::test]
async fn a_sqlite_load_given_up_on_stops_inside_its_statement() {
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    let series = |n: u32| format!("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) ");
    ctx.exec("CREATE TABLE weir_bulk_parent (id INTEGER PRIMARY KEY, name TEXT, score INTEGER)")
        .await;
    ctx.exec("CREATE TABLE weir_bulk_child (parent_id INTEGER REFERENCES weir_bulk_parent (id))")
        .await;
    ctx.exec(&format!(
        "{}INSERT INTO weir_bulk_parent SELECT i, 'p', i FROM s",
        series(60_000)
    ))
    .await;
    ctx.exec(&format!(
        "{}INSERT INTO weir_bulk_child SELECT NULL FROM s",
        series(60_000)
    ))
    .await;
    let (tx, requests) = open_load("weir_bulk_parent").await;
    let mut request = tonic::Request::new(requests);
    request
        .metadata_mut()
        .insert("grpc-timeout", "500m".parse().expect("header value"));
    let err = ctx.client.bulk().load(request).await.expect_err("past its deadline");
    assert_eq!(reason(&err), "LOAD_TIMEOUT", "{err:?}");
    drop(tx);
    // Another write gets the source's turn within its 5 s wait.
    let mut write = tonic::Request::new(pb::ExecuteRequest {
        source: "db".into(),
        sql: "INSERT INTO weir_bulk_child VALUES (NULL)".into(),
        ..Default::default()
    });
    write.set_timeout(Duration::from_secs(4));
    ctx.client.query().execute(write).await.expect("the write turn is free");
    ctx.server.stop().await;
}

/// A bad row in a later COPY of a large PostgreSQL load is named by its
/// place in the load also when a trigger keeps rows out of the table (which
/// a COPY's row count leaves out, and its line numbers do not).
#[tokio::test]
async fn a_bad_row_past_the_first_copy_is_named_though_a_trigger_skips_rows() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    ctx.table("weir_bulk_sparse", 0).await;
    ctx.exec(
        "CREATE OR REPLACE FUNCTION weir_bulk_sparse_even() RETURNS trigger LANGUAGE plpgsql \
         AS $$ BEGIN IF NEW.id % 2 = 0 THEN RETURN NULL; END IF; RETURN NEW; END $$",
    )
    .await;
    ctx.exec(
        "CREATE TRIGGER weir_bulk_sparse_even BEFORE INSERT ON weir_bulk_sparse \
         FOR EACH ROW EXECUTE FUNCTION weir_bulk_sparse_even()",
    )
    .await;
    // About 24 MiB: the bad row is in the second COPY.
    let bad = 1_000_003;
    let batches: Vec<Vec<pb::Row>> = (0..120)
        .map(|i| {
            let mut batch = rows(i * 10_000..(i + 1) * 10_000);
            if let Some(r) = batch.iter_mut().find(|r| r.values[0] == v(Kind::Int64Value(bad))) {
                *r = row(bad, "bad", -5);
            }
            batch
        })
        .collect();
    let err = ctx
        .load(header("weir_bulk_sparse", pb::BulkLoadMode::Append), batches)
        .await
        .expect_err("the CHECK is violated");
    assert_eq!(error_metadata(&err, "row_index"), bad.to_string(), "{err:?}");
    ctx.server.stop().await;
}

/// A batch over `max_request_bytes` gets OUT_OF_RANGE, as a unary call's
/// oversized request does, not ABORTED (which says "run it again", and the
/// same batch would fail the same way); the rows before it are not loaded.
#[tokio::test]
async fn a_batch_over_the_request_size_limit_is_out_of_range_and_loads_nothing() {
    let engine = Engine::Sqlite;
    let server = TestServer::start(&format!(
        "[server]\nmax_request_bytes = 65536\n{}",
        engine.source("bulk", "")
    ))
    .await;
    let client = server.client("key-bulk").await;
    let ctx = Ctx { engine, server, client };
    ctx.table("weir_bulk_oversized", 2).await;
    let before = ctx.contents("weir_bulk_oversized").await;
    let err = ctx
        .load(
            header("weir_bulk_oversized", pb::BulkLoadMode::Append),
            // About 15 bytes a row: the second batch is several times the limit.
            vec![rows(0..10), rows(10..20_000)],
        )
        .await
        .expect_err("an oversized batch");
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(err.message().contains("65536"), "{}", err.message());
    assert_eq!(ctx.contents("weir_bulk_oversized").await, before);
    ctx.server.stop().await;
}

/// A load message that does not decode (a batch whose bytes are cut short)
/// fails the load with INVALID_ARGUMENT, not ABORTED, and loads nothing of
/// the batches before it.
#[tokio::test]
async fn an_undecodable_load_message_is_invalid_and_loads_nothing() {
    /// `LoadRequest`, with its rows as raw bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawLoadRequest {
        #[prost(message, optional, tag = "1")]
        header: Option<pb::LoadHeader>,
        #[prost(bytes = "vec", tag = "2")]
        rows: Vec<u8>,
    }
    let engine = Engine::Sqlite;
    let server = TestServer::start(&engine.source("bulk", "")).await;
    let client = server.client("key-bulk").await;
    let ctx = Ctx { engine, server, client };
    ctx.table("weir_bulk_undecodable", 2).await;
    let before = ctx.contents("weir_bulk_undecodable").await;
    let batch = |rows: Vec<u8>| RawLoadRequest { header: None, rows };
    let messages = vec![
        RawLoadRequest {
            header: Some(header("weir_bulk_undecodable", pb::BulkLoadMode::Append)),
            rows: Vec::new(),
        },
        batch(prost::Message::encode_to_vec(&pb::LoadRows { rows: rows(0..10) })),
        // A row of 255 bytes announced, none sent.
        batch(vec![0x0a, 0xff, 0x01]),
    ];
    let mut grpc = raw_grpc(ctx.server.addr.clone()).await;
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    request
        .metadata_mut()
        .insert("authorization", "Bearer key-bulk".parse().expect("header"));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/weir.v1.BulkLoadService/Load");
    let err = grpc
        .client_streaming::<_, _, pb::LoadResponse, _>(request, path, tonic_prost::ProstCodec::default())
        .await
        .expect_err("an undecodable batch");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(ctx.contents("weir_bulk_undecodable").await, before);
    ctx.server.stop().await;
}

/// A unique index with INCLUDE columns is unique on its key columns alone,
/// and a partial one only among the rows its predicate selects: an upsert
/// matches rows on the first, and is refused on the second before any row
/// is sent (ON CONFLICT could not use it). DescribeTable says which is which.
#[tokio::test]
async fn upserts_match_on_covering_unique_indexes_and_not_on_partial_ones() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_covering";
    ctx.table(table, 0).await;
    ctx.exec(&format!(
        "CREATE UNIQUE INDEX {table}_name ON {table} (name) INCLUDE (score)"
    ))
    .await;
    ctx.exec(&format!(
        "CREATE UNIQUE INDEX {table}_score ON {table} (score) WHERE score > 100"
    ))
    .await;
    let described = ctx.client.describe_table("db", "", table).await.expect("describe");
    let index = |name: &str| {
        described
            .indexes
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("{name} in {:?}", described.indexes))
    };
    let covering = index("weir_bulk_covering_name");
    assert_eq!(
        (covering.columns.as_slice(), covering.partial),
        (&["name".to_string()][..], false)
    );
    assert!(index("weir_bulk_covering_score").partial);

    let upsert = |conflict: &str| {
        let mut h = header(table, pb::BulkLoadMode::Upsert);
        h.conflict_columns = vec![conflict.into()];
        h
    };
    let first = ctx
        .load(upsert("name"), vec![vec![row(1, "a", 1)]])
        .await
        .expect("covering key");
    assert_eq!((first.rows_inserted, first.rows_updated), (1, 0));
    let again = ctx
        .load(upsert("name"), vec![vec![row(2, "a", 2)]])
        .await
        .expect("covering key");
    assert_eq!((again.rows_inserted, again.rows_updated), (0, 1));
    assert_eq!(ctx.contents(table).await, ["2:a:2"]);
    let err = ctx
        .load(upsert("score"), vec![vec![row(3, "b", 200)]])
        .await
        .expect_err("a partial unique index");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("partial"), "{}", err.message());
    assert_eq!(ctx.contents(table).await, ["2:a:2"]);

    // A DEFERRABLE primary key, which ON CONFLICT cannot use, is refused
    // before any row is sent, as partial indexes are.
    let deferred = "weir_bulk_deferred_key";
    ctx.exec(&format!("DROP TABLE IF EXISTS {deferred}")).await;
    ctx.exec(&format!(
        "CREATE TABLE {deferred} (id INT PRIMARY KEY DEFERRABLE, name TEXT NOT NULL, score INT)"
    ))
    .await;
    let mut h = header(deferred, pb::BulkLoadMode::Upsert);
    h.conflict_columns = vec!["id".into()];
    let err = ctx
        .load(h, vec![vec![row(1, "a", 1)]])
        .await
        .expect_err("a deferrable key");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("deferrable"), "{}", err.message());
    // Weir's refusal of the header, not the engine's of the merge.
    assert_eq!(engine_code(&err), "", "{err:?}");
    ctx.server.stop().await;
}

/// A partitioned table's rows have no xmax, which the merge counted its
/// inserted rows by: an upsert into one merged nothing and failed. Rows
/// inserted and updated are counted, with update columns and with key
/// columns only (DO NOTHING).
#[tokio::test]
async fn upserts_into_a_partitioned_table_count_what_they_did() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_partitioned";
    ctx.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    ctx.exec(&format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, name TEXT NOT NULL, score INT) PARTITION BY RANGE (id)"
    ))
    .await;
    ctx.exec(&format!(
        "CREATE TABLE {table}_low PARTITION OF {table} FOR VALUES FROM (0) TO (100)"
    ))
    .await;
    ctx.exec(&format!(
        "CREATE TABLE {table}_high PARTITION OF {table} FOR VALUES FROM (100) TO (200)"
    ))
    .await;
    ctx.exec(&format!("INSERT INTO {table} VALUES (1, 'old', 1), (150, 'old', 150)"))
        .await;
    let mut h = header(table, pb::BulkLoadMode::Upsert);
    h.conflict_columns = vec!["id".into()];
    let r = ctx
        .load(h, vec![vec![row(1, "new", 10), row(2, "new", 20), row(150, "new", 30)]])
        .await
        .expect("an upsert into a partitioned table");
    assert_eq!((r.rows_inserted, r.rows_updated), (1, 2));
    assert_eq!(ctx.contents(table).await, ["1:new:10", "2:new:20", "150:new:30"]);

    let mut h = header(table, pb::BulkLoadMode::Upsert);
    h.columns = vec!["id".into(), "name".into()];
    h.conflict_columns = vec!["id".into()];
    let key_only = |id: i64| pb::Row {
        values: vec![v(Kind::Int64Value(id)), v(Kind::StringValue("keyed".into()))],
    };
    let mut h_keys = h.clone();
    h_keys.columns = vec!["id".into()];
    ctx.exec(&format!("ALTER TABLE {table} ALTER COLUMN name SET DEFAULT 'default'"))
        .await;
    let r = ctx
        .load(
            h_keys,
            vec![vec![
                pb::Row {
                    values: vec![v(Kind::Int64Value(2))],
                },
                pb::Row {
                    values: vec![v(Kind::Int64Value(3))],
                },
            ]],
        )
        .await
        .expect("key columns only");
    assert_eq!((r.rows_inserted, r.rows_updated), (1, 1));
    let r = ctx
        .load(h, vec![vec![key_only(3), key_only(4)]])
        .await
        .expect("two columns");
    assert_eq!((r.rows_inserted, r.rows_updated), (1, 1));
    assert_eq!(
        ctx.contents(table).await,
        ["1:new:10", "2:new:20", "3:keyed:null", "4:keyed:null", "150:new:30"]
    );
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
}

/// A MySQL key over a column prefix is unique over the prefix only: an
/// upsert matching on it would update the row that shares the prefix, so it
/// is refused before any row is sent, for a unique index and a primary key
/// alike. DescribeTable names the prefix as the engine prints it.
#[tokio::test]
async fn upserts_do_not_match_on_mysql_keys_over_a_column_prefix() {
    let ctx = Ctx::new(Engine::Mysql, "").await;
    let table = "weir_bulk_prefix_key";
    ctx.table(table, 0).await;
    ctx.exec(&format!("CREATE UNIQUE INDEX {table}_name ON {table} (name(3))"))
        .await;
    ctx.exec(&format!("INSERT INTO {table} VALUES (1, 'abcX', 1)")).await;
    let described = ctx.client.describe_table("db", "", table).await.expect("describe");
    let prefix = described
        .indexes
        .iter()
        .find(|i| i.name == format!("{table}_name"))
        .unwrap_or_else(|| panic!("{:?}", described.indexes));
    assert_eq!(
        (prefix.columns.as_slice(), prefix.unique),
        (&["name(3)".to_string()][..], true)
    );
    let mut h = header(table, pb::BulkLoadMode::Upsert);
    h.conflict_columns = vec!["name".into()];
    let err = ctx
        .load(h, vec![vec![row(2, "abcY", 2)]])
        .await
        .expect_err("a key over a prefix");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("prefix"), "{}", err.message());
    assert_eq!(ctx.contents(table).await, ["1:abcX:1"]);

    let keyed = "weir_bulk_prefix_primary";
    ctx.exec(&format!("DROP TABLE IF EXISTS {keyed}")).await;
    ctx.exec(&format!(
        "CREATE TABLE {keyed} (id INT, name TEXT NOT NULL, score INT, PRIMARY KEY (name(3)))"
    ))
    .await;
    ctx.exec(&format!("INSERT INTO {keyed} VALUES (1, 'abcX', 1)")).await;
    let described = ctx.client.describe_table("db", "", keyed).await.expect("describe");
    let primary = described.primary_key.as_ref().expect("a primary key");
    assert_eq!(primary.columns, ["name"]);
    let mut h = header(keyed, pb::BulkLoadMode::Upsert);
    h.conflict_columns = vec!["name".into()];
    let err = ctx
        .load(h, vec![vec![row(2, "abcY", 2)]])
        .await
        .expect_err("a primary key over a prefix");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(ctx.contents(keyed).await, ["1:abcX:1"]);
    ctx.exec(&format!("DROP TABLE {table}, {keyed}")).await;
    ctx.server.stop().await;
}

/// REPLACE on PostgreSQL empties the table with DELETE: readers go on
/// seeing the old rows while the load runs (TRUNCATE's lock made them wait
/// for the whole load), and a table that a foreign key references can be
/// replaced (TRUNCATE refused it even with no row referencing it).
#[tokio::test]
async fn a_postgres_replace_leaves_readers_the_old_rows_and_allows_foreign_keys() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_replace_read";
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_replace_child").await;
    ctx.table(table, 2).await;
    ctx.exec(&format!(
        "CREATE TABLE weir_bulk_replace_child (parent INT REFERENCES {table} (id))"
    ))
    .await;
    let before = ctx.contents(table).await;
    let (tx, requests) = open_load(table).await;
    let mut bulk = ctx.client.bulk();
    let call = tokio::spawn(async move { bulk.load(requests).await });
    let pg = pg_direct().await;
    assert!(
        wait_until_running(&pg, table, Duration::from_secs(5)).await,
        "the load reached the engine"
    );
    let seen = tokio::time::timeout(Duration::from_secs(3), ctx.contents(table))
        .await
        .expect("a reader is not held up by the load");
    assert_eq!(seen, before, "the old rows until the load commits");
    drop(tx);
    let done = call.await.expect("task").expect("the load commits").into_inner();
    assert_eq!(
        (done.rows_inserted, done.engine_path.as_str()),
        (100, "postgres-delete-copy")
    );
    assert_eq!(ctx.contents(table).await.len(), 100);
    ctx.server.stop().await;
}

/// A load the client aborts stops what the engine runs at once: here a
/// REPLACE's DELETE waiting behind another session's lock, which would
/// otherwise hold the load (and the answer) until that lock was let go.
#[tokio::test]
async fn postgres_an_aborted_load_stops_its_waiting_statement() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_abort_waiting";
    ctx.table(table, 2).await;
    let before = ctx.contents(table).await;
    let holder = common::pg_direct().await;
    holder
        .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN SHARE MODE"))
        .await
        .expect("lock");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<pb::Row>, String>>(1);
    let load = tokio::spawn({
        let client = ctx.client.clone();
        async move {
            client
                .load_or_abort(header(table, pb::BulkLoadMode::Replace), ReceiverStream::new(rx))
                .await
        }
    });
    // The REPLACE's DELETE is waiting for the lock now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    tx.send(Err("the input is bad".to_string())).await.expect("abort");
    let err = tokio::time::timeout(Duration::from_secs(10), load)
        .await
        .expect("answered while the lock is still held")
        .expect("task")
        .expect_err("aborted");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    holder.batch_execute("ROLLBACK").await.expect("unlock");
    assert_eq!(ctx.contents(table).await, before);
    ctx.exec(&format!("DROP TABLE {table}")).await;
    ctx.server.stop().await;
}

/// Two PostgreSQL REPLACE loads of one table at once leave the rows of
/// the one that committed last, not both loads' rows: the second waits for
/// the first (readers still see the old rows meanwhile, as tested above).
#[tokio::test]
async fn postgres_replaces_at_once_leave_one_loads_rows() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    replaces_at_once_leave_one_loads_rows(&ctx, "weir_bulk_replace_twice", 2, Duration::ZERO).await;
    ctx.server.stop().await;
}

/// The same as a role whose defaults are REPEATABLE READ (whose snapshot,
/// taken before the lock, would keep the first load's rows from the
/// second's DELETE: both loads' rows stayed) and a one-second statement
/// timeout (a load lasts as long as its client streams: the first is held
/// open past it).
#[tokio::test]
async fn postgres_loads_ignore_the_roles_isolation_and_statement_timeout() {
    let password = env_or("WEIR_TEST_PG_PASSWORD", "weir-strict-loads");
    pg_direct()
        .await
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE weir_strict_loads LOGIN SUPERUSER; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             ALTER ROLE weir_strict_loads PASSWORD '{password}'; \
             ALTER ROLE weir_strict_loads SET default_transaction_isolation = 'repeatable read'; \
             ALTER ROLE weir_strict_loads SET statement_timeout = '1s'"
        ))
        .await
        .expect("a role with strict defaults");
    let user = format!("user = \"{}\"", env_or("WEIR_TEST_PG_USER", "postgres"));
    let source = postgres("strict", "db", "").replace(&user, "user = \"weir_strict_loads\"");
    let server = TestServer::start(&tenant("strict", "", &source)).await;
    let client = server.client("key-strict").await;
    let ctx = Ctx {
        engine: Engine::Postgres,
        server,
        client,
    };
    replaces_at_once_leave_one_loads_rows(&ctx, "weir_bulk_replace_strict", 0, Duration::from_millis(1500)).await;
    ctx.server.stop().await;
}

/// A bad row the gateway finds is reported at once, even while the engine
/// still waits for a lock (another load's REPLACE holds the table): the
/// engine's statement is stopped, not waited for.
#[tokio::test]
async fn a_bad_row_is_reported_while_the_engine_waits_for_a_lock() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_bad_while_locked";
    ctx.table(table, 2).await;
    let (tx, requests) = open_load(table).await;
    let mut bulk = ctx.client.bulk();
    let first = tokio::spawn(async move { bulk.load(requests).await });
    let pg = pg_direct().await;
    assert!(
        wait_until_running(&pg, table, Duration::from_secs(5)).await,
        "the first load reached the engine"
    );
    let mut bad = rows(200..250);
    bad[10].values[2] = v(Kind::StringValue("x".into()));
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        ctx.client
            .load(header(table, pb::BulkLoadMode::Append), tokio_stream::iter(vec![bad])),
    )
    .await
    .expect("answered while the first load still holds the table")
    .expect_err("a bad row");
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::InvalidArgument, "BAD_ROW".to_string()),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(!first.is_finished(), "the first load was still open");
    drop(tx);
    let first = first.await.expect("task").expect("the first load commits").into_inner();
    assert_eq!(first.rows_inserted, 100);
    assert_eq!(ctx.contents(table).await.len(), 100, "the bad load left nothing");
    ctx.server.stop().await;
}

/// A REPLACE of `table` (with `rows_before` rows) held open for `held`
/// once a second REPLACE waits for it; then both commit.
async fn replaces_at_once_leave_one_loads_rows(ctx: &Ctx, table: &str, rows_before: i64, held: Duration) {
    ctx.table(table, rows_before).await;
    let (tx, requests) = open_load(table).await;
    let mut bulk = ctx.client.bulk();
    let first = tokio::spawn(async move { bulk.load(requests).await });
    let pg = pg_direct().await;
    assert!(
        wait_until_running(&pg, table, Duration::from_secs(5)).await,
        "the first load reached the engine"
    );
    let header = header(table, pb::BulkLoadMode::Replace);
    let client = ctx.client.clone();
    let second = tokio::spawn(async move { client.load(header, tokio_stream::iter(vec![rows(200..250)])).await });
    // Seen waiting for a lock the first holds, rather than given a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' \
                   AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'";
    while pg
        .query_one(waiting, &[&table])
        .await
        .expect("pg_stat_activity")
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the second load never waited for the first");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!second.is_finished(), "the second load waits for the first");
    tokio::time::sleep(held).await;
    drop(tx);
    let first = first.await.expect("task").expect("the first load commits").into_inner();
    assert_eq!(first.rows_inserted, 100);
    let second = second.await.expect("task").expect("the second load commits");
    assert_eq!(second.rows_inserted, 50);
    let after = ctx.contents(table).await;
    assert_eq!(after.len(), 50, "only the last load's rows: {after:?}");
    assert_eq!(after.first().map(String::as_str), Some("200:n200:200"));
}

/// A PostgreSQL REPLACE into a foreign table (postgres_fdw, back to this
/// server) replaces its rows: the lock a table's REPLACE takes first is not
/// one PostgreSQL takes on a foreign table.
#[tokio::test]
async fn a_postgres_replace_into_a_foreign_table_replaces_its_rows() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_fdw";
    let pg = pg_direct().await;
    pg.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw;
         DROP FOREIGN TABLE IF EXISTS {table};
         DROP SERVER IF EXISTS weir_bulk_loopback CASCADE;
         CREATE SERVER weir_bulk_loopback FOREIGN DATA WRAPPER postgres_fdw
             OPTIONS (host '{}', port '{}', dbname '{}');
         CREATE USER MAPPING FOR CURRENT_USER SERVER weir_bulk_loopback
             OPTIONS (user '{}', password '{}');",
        env_or("WEIR_TEST_PG_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_PG_PORT", "5432"),
        env_or("WEIR_TEST_PG_DATABASE", "test"),
        env_or("WEIR_TEST_PG_USER", "postgres"),
        env_or("WEIR_TEST_PG_PASSWORD", "postgres"),
    ))
    .await
    .expect("a loopback server");
    ctx.table("weir_bulk_fdw_base", 3).await;
    pg.batch_execute(&format!(
        "CREATE FOREIGN TABLE {table} (id INT, name TEXT NOT NULL, score INT) \
         SERVER weir_bulk_loopback OPTIONS (table_name 'weir_bulk_fdw_base')"
    ))
    .await
    .expect("a foreign table");
    let done = ctx
        .load(header(table, pb::BulkLoadMode::Replace), vec![rows(0..5)])
        .await
        .expect("the foreign table is replaced");
    assert_eq!(done.rows_inserted, 5);
    assert_eq!(ctx.contents("weir_bulk_fdw_base").await, ctx.contents(table).await);
    assert_eq!(ctx.contents(table).await.len(), 5);
    pg.batch_execute("DROP SERVER weir_bulk_loopback CASCADE; DROP TABLE weir_bulk_fdw_base")
        .await
        .expect("cleanup");
    ctx.server.stop().await;
}

/// A PostgreSQL REPLACE of a table that others inherit from replaces its
/// own rows only: the inheriting tables keep theirs. A partitioned table's
/// rows are its partitions', and all of them are replaced.
#[tokio::test]
async fn a_postgres_replace_leaves_inheriting_tables_alone() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let (parent, kid, parted) = ("weir_bulk_inherited", "weir_bulk_inheriting", "weir_bulk_parted");
    for table in [parent, parted] {
        ctx.exec(&format!("DROP TABLE IF EXISTS {table} CASCADE")).await;
    }
    ctx.table(parent, 2).await;
    ctx.exec(&format!("CREATE TABLE {kid} () INHERITS ({parent})")).await;
    ctx.exec(&format!("INSERT INTO {kid} VALUES (1, 'kept', 1)")).await;
    ctx.load(header(parent, pb::BulkLoadMode::Replace), vec![rows(10..12)])
        .await
        .expect("replace");
    assert_eq!(
        ctx.contents(kid).await,
        ["1:kept:1"],
        "the inheriting table keeps its rows"
    );
    assert_eq!(
        ctx.contents(parent).await,
        ["1:kept:1", "10:n10:10", "11:n11:11"],
        "the parent's own rows are replaced"
    );
    for sql in [
        format!("CREATE TABLE {parted} (id INT, name TEXT NOT NULL, score INT) PARTITION BY RANGE (id)"),
        format!("CREATE TABLE {parted}_low PARTITION OF {parted} FOR VALUES FROM (MINVALUE) TO (100)"),
        format!("CREATE TABLE {parted}_high PARTITION OF {parted} FOR VALUES FROM (100) TO (MAXVALUE)"),
        format!("INSERT INTO {parted} VALUES (1, 'old', 1), (200, 'old', 2)"),
    ] {
        ctx.exec(&sql).await;
    }
    ctx.load(header(parted, pb::BulkLoadMode::Replace), vec![rows(10..12)])
        .await
        .expect("replace");
    assert_eq!(ctx.contents(parted).await, ["10:n10:10", "11:n11:11"]);
    for table in [parent, parted] {
        ctx.exec(&format!("DROP TABLE {table} CASCADE")).await;
    }
    ctx.server.stop().await;
}

/// A client that sends nothing for the tenant's transaction_idle_timeout
/// in the middle of a load loses it (DEADLINE_EXCEEDED, LOAD_IDLE): it held
/// a transaction and, on SQLite, the source's one write turn, which other
/// writers wait for.
#[tokio::test]
async fn a_load_whose_client_falls_silent_is_rolled_back() {
    let ctx = Ctx::new(Engine::Sqlite, "transaction_idle_timeout = \"1s\"").await;
    let table = "weir_bulk_silent";
    ctx.table(table, 2).await;
    let before = ctx.contents(table).await;
    let (tx, requests) = open_load(table).await;
    let mut bulk = ctx.client.bulk();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), bulk.load(requests))
        .await
        .expect("the load ends by itself")
        .expect_err("rolled back");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::DeadlineExceeded, "LOAD_IDLE"),
        "{err:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    drop(tx);
    assert_eq!(ctx.contents(table).await, before, "nothing of the load stays");
    ctx.exec(&format!("INSERT INTO {table} VALUES (7, 'other', 7)")).await;
    // A load whose client never sends its header ends the same way.
    let (silent, requests) = tokio::sync::mpsc::channel::<pb::LoadRequest>(1);
    let err = tokio::time::timeout(Duration::from_secs(10), bulk.load(ReceiverStream::new(requests)))
        .await
        .expect("the load ends by itself")
        .expect_err("no header");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::DeadlineExceeded, "LOAD_IDLE"),
        "{err:?}"
    );
    drop(silent);
    ctx.server.stop().await;
}

/// A REPLACE whose every row was skipped as bad (column types that
/// drifted) would commit an emptied table: it is refused, nothing changed.
#[tokio::test]
async fn a_replace_whose_every_row_was_skipped_changes_nothing() {
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    let table = "weir_bulk_all_skipped";
    ctx.table(table, 2).await;
    let before = ctx.contents(table).await;
    let mut load = header(table, pb::BulkLoadMode::Replace);
    load.bad_rows = pb::BadRowPolicy::Skip as i32;
    let drifted = |id: &str| pb::Row {
        values: vec![
            v(Kind::StringValue(id.into())),
            v(Kind::StringValue("n".into())),
            v(Kind::Int64Value(1)),
        ],
    };
    let err = ctx
        .load(load, vec![vec![drifted("one"), drifted("two")]])
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(ctx.contents(table).await, before);
    ctx.server.stop().await;
}

/// The engine's bad row comes before the gateway's: the first bad row is
/// the one reported, not a later one the gateway found while the engine
/// had already failed (SQLite checks each row as it goes in).
#[tokio::test]
async fn the_first_bad_row_is_reported_when_the_engine_found_it() {
    use weir_client::weir_proto::v1::load_request::Message as LoadMessage;
    let ctx = Ctx::new(Engine::Sqlite, "").await;
    let table = "weir_bulk_first_bad";
    ctx.table(table, 0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::LoadRequest {
        message: Some(LoadMessage::Header(header(table, pb::BulkLoadMode::Append))),
    })
    .await
    .expect("header");
    // Row 3 breaks the CHECK (score >= 0), which only the engine sees.
    let mut first = rows(0..10);
    first[3] = row(3, "negative", -1);
    tx.send(pb::LoadRequest {
        message: Some(LoadMessage::Rows(pb::LoadRows { rows: first })),
    })
    .await
    .expect("rows");
    let mut bulk = ctx.client.bulk();
    let call = tokio::spawn(async move { bulk.load(ReceiverStream::new(rx)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Row 15 has text for an integer, which the gateway sees.
    let mut second = rows(10..20);
    second[5].values[0] = v(Kind::StringValue("x".into()));
    let _ = tx
        .send(pb::LoadRequest {
            message: Some(LoadMessage::Rows(pb::LoadRows { rows: second })),
        })
        .await;
    drop(tx);
    let err = call.await.expect("task").expect_err("bad rows");
    let details = {
        use tonic_types::StatusExt;
        err.get_error_details()
    };
    let index = details
        .error_info()
        .and_then(|i| i.metadata.get("row_index").cloned())
        .unwrap_or_default();
    assert_eq!(index, "3", "{err:?}");
    assert!(ctx.contents(table).await.is_empty());
    ctx.server.stop().await;
}

/// A load whose connection is lost while its COMMIT runs may have
/// committed: the caller hears UNKNOWN (COMMIT_OUTCOME_UNKNOWN, no retry
/// delay), not UNAVAILABLE with a retry hint that would load the rows twice.
#[tokio::test]
async fn a_load_whose_commit_answer_is_lost_is_reported_as_unknown() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "weir_bulk_slow_commit";
    ctx.table(table, 0).await;
    let pg = pg_direct().await;
    pg.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED \
           FOR EACH ROW EXECUTE FUNCTION {table}_slow()"
    ))
    .await
    .expect("a slow commit");
    let client = ctx.client.clone();
    let load = tokio::spawn(async move {
        let header = header(table, pb::BulkLoadMode::Append);
        client
            .load(header, tokio_stream::iter(vec![vec![row(1, "a", 1)]]))
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let killed = pg
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE query = 'COMMIT' AND state = 'active' AND wait_event = 'PgSleep' \
                   AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("terminate");
        if !killed.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the load's COMMIT never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = load.await.expect("task").expect_err("the commit's answer was lost");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unknown, "COMMIT_OUTCOME_UNKNOWN"),
        "{err:?}"
    );
    {
        use tonic_types::StatusExt;
        assert!(err.get_error_details().retry_info().is_none(), "no retry hint");
    }
    pg.batch_execute(&format!("DROP TABLE {table}; DROP FUNCTION {table}_slow()"))
        .await
        .expect("drop");
    ctx.server.stop().await;
}

/// A deadlock met on a row of a load is not that row's fault: the caller
/// gets ABORTED (run the load again), not INVALID_ARGUMENT naming the row,
/// which a client would not retry.
#[tokio::test]
async fn a_deadlock_in_a_load_is_aborted_not_a_bad_row() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    ctx.table("weir_bulk_deadlock", 0).await;
    let other = pg_direct().await;
    // The other session looks for deadlocks only after 10 s, so the load,
    // checking after PostgreSQL's default 1 s, is the one to find it.
    other
        .batch_execute("SET deadlock_timeout = '10s'; BEGIN; INSERT INTO weir_bulk_deadlock VALUES (2, 'theirs', 2)")
        .await
        .expect("the other transaction");
    let client = ctx.client.clone();
    let load = tokio::spawn(async move {
        let rows = vec![row(1, "ours", 1), row(2, "ours", 2)];
        let header = header("weir_bulk_deadlock", pb::BulkLoadMode::Append);
        client.load(header, tokio_stream::iter(vec![rows])).await
    });
    // The load has row 1 and waits for the other transaction's row 2.
    let deadline = Instant::now() + Duration::from_secs(10);
    let waits_for_us = "SELECT 1 FROM pg_locks WHERE NOT granted AND locktype = 'transactionid' \
         AND transactionid = (SELECT backend_xid FROM pg_stat_activity WHERE pid = pg_backend_pid())";
    while other.query(waits_for_us, &[]).await.expect("locks").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the load never waited for the other transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now the other one wants row 1: a deadlock, which the load is first to
    // find, and gives way.
    other
        .execute("INSERT INTO weir_bulk_deadlock VALUES (1, 'theirs', 1)", &[])
        .await
        .expect("the other transaction goes on once the load gave way");
    other.batch_execute("ROLLBACK").await.expect("rollback");
    let err = load.await.expect("task").expect_err("the load gave way");
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert!(err.message().contains("deadlock"), "{}", err.message());
    assert!(ctx.contents("weir_bulk_deadlock").await.is_empty());
    ctx.server.stop().await;
}

/// The same on MySQL/MariaDB, where a deadlock also ends the transaction:
/// the rows of the failed statement, tried one by one to find a bad one,
/// each committed on their own, so the caller was told ABORTED of a load
/// whose rows were in the table.
#[tokio::test]
async fn a_deadlock_in_a_mysql_load_commits_no_row() {
    use mysql_async::prelude::Queryable;
    let ctx = Ctx::new(Engine::Mysql, "").await;
    ctx.table("weir_bulk_deadlock", 0).await;
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_deadlock_weight").await;
    ctx.exec("CREATE TABLE weir_bulk_deadlock_weight (n INT)").await;
    let mut other = mysql_direct().await;
    other.query_drop("START TRANSACTION").await.expect("begin");
    // InnoDB gives way with the transaction that changed fewer rows: the load's.
    other
        .query_drop("INSERT INTO weir_bulk_deadlock_weight SELECT seq FROM seq_1_to_500")
        .await
        .expect("weight");
    other
        .query_drop("INSERT INTO weir_bulk_deadlock VALUES (2, 'theirs', 2)")
        .await
        .expect("row 2");
    let client = ctx.client.clone();
    let load = tokio::spawn(async move {
        let rows = vec![row(1, "ours", 1), row(2, "ours", 2)];
        let mut header = header("weir_bulk_deadlock", pb::BulkLoadMode::Upsert);
        header.conflict_columns = vec!["id".into()];
        client.load(header, tokio_stream::iter(vec![rows])).await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if mysql_running(&mut other, "INSERT INTO%weir_bulk_deadlock%").await > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the load never waited for the other transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Running: past row 1, and waiting for row 2.
    tokio::time::sleep(Duration::from_millis(200)).await;
    other
        .query_drop("INSERT INTO weir_bulk_deadlock VALUES (1, 'theirs', 1)")
        .await
        .expect("the other transaction goes on once the load gave way");
    other.query_drop("ROLLBACK").await.expect("rollback");
    let err = load.await.expect("task").expect_err("the load gave way");
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert_eq!(
        ctx.contents("weir_bulk_deadlock").await,
        Vec::<String>::new(),
        "rows of a load that failed were committed"
    );
    ctx.exec("DROP TABLE weir_bulk_deadlock_weight").await;
    ctx.server.stop().await;
}

/// Upserts count every row that matched a key as updated, changed or not,
/// however the rows were split into statements: MySQL reports duplicates
/// only for multi-row statements, and counts an unchanged row as no change.
async fn upserts_count_every_matched_row(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.table("weir_bulk_counted", 0).await;
    let upsert = || {
        let mut h = header("weir_bulk_counted", pb::BulkLoadMode::Upsert);
        h.conflict_columns = vec!["id".into()];
        h
    };
    ctx.load(upsert(), vec![rows(0..3)]).await.expect("first");
    for (batch, expected) in [
        // One row alone, which changes.
        (vec![row(1, "changed", 1)], (0, 1)),
        // One row alone, unchanged.
        (vec![row(1, "changed", 1)], (0, 1)),
        // Several, one new, one changed, one unchanged.
        (vec![row(5, "new", 5), row(0, "changed", 0), row(2, "n2", 2)], (1, 2)),
    ] {
        let r = ctx.load(upsert(), vec![batch]).await.expect("upsert");
        assert_eq!((r.rows_inserted, r.rows_updated), expected, "{engine:?}");
    }
    // Only key columns: a matched row has nothing to update, and still counts.
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_keys").await;
    ctx.exec("CREATE TABLE weir_bulk_keys (id INT PRIMARY KEY)").await;
    let keys = || pb::LoadHeader {
        source: "db".into(),
        table: "weir_bulk_keys".into(),
        columns: vec!["id".into()],
        mode: pb::BulkLoadMode::Upsert as i32,
        conflict_columns: vec!["id".into()],
        ..Default::default()
    };
    let ids = |ids: &[i64]| -> Vec<pb::Row> {
        ids.iter()
            .map(|&i| pb::Row {
                values: vec![v(Kind::Int64Value(i))],
            })
            .collect()
    };
    ctx.load(keys(), vec![ids(&[0, 1, 2])]).await.expect("first");
    for (batch, expected) in [(ids(&[1]), (0, 1)), (ids(&[1, 5, 2]), (1, 2))] {
        let r = ctx.load(keys(), vec![batch]).await.expect("keys only");
        assert_eq!((r.rows_inserted, r.rows_updated), expected, "{engine:?}, keys only");
    }
    ctx.server.stop().await;
}

#[tokio::test]
async fn upserts_count_every_matched_row_in_postgres() {
    upserts_count_every_matched_row(Engine::Postgres).await
}

#[tokio::test]
async fn upserts_count_every_matched_row_in_mysql() {
    upserts_count_every_matched_row(Engine::Mysql).await
}

#[tokio::test]
async fn upserts_count_every_matched_row_in_sqlite() {
    upserts_count_every_matched_row(Engine::Sqlite).await
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn upserts_count_every_matched_row_in_mssql() {
    upserts_count_every_matched_row(Engine::Mssql).await
}

/// A value MySQL refuses with an error of no usual class (1265, "data
/// truncated", for an ENUM it lacks) still names its row.
#[tokio::test]
async fn a_mysql_enum_value_it_lacks_names_its_row() {
    let ctx = Ctx::new(Engine::Mysql, "").await;
    ctx.exec("DROP TABLE IF EXISTS weir_bulk_enum").await;
    ctx.exec("CREATE TABLE weir_bulk_enum (id INT PRIMARY KEY, name ENUM('a', 'b') NOT NULL, score INT)")
        .await;
    let batch = vec![row(1, "a", 1), row(2, "b", 2), row(3, "c", 3)];
    let err = ctx
        .load(header("weir_bulk_enum", pb::BulkLoadMode::Append), vec![batch])
        .await
        .expect_err("no such ENUM value");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(reason(&err), "BAD_ROW", "{}", err.message());
    assert_eq!(error_metadata(&err, "row_index"), "2", "{}", err.message());
    assert!(ctx.exec("SELECT id FROM weir_bulk_enum").await.rows.is_empty());
    ctx.server.stop().await;
}

suite!(postgres, Engine::Postgres);
suite!(mysql, Engine::Mysql);
suite!(sqlite, Engine::Sqlite);
suite!(mssql, Engine::Mssql, #[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]);

/// A receipt table created when ids were text in the server's collation
/// (case- and trailing-space-insensitive) is upgraded to compare them exactly.
#[tokio::test]
async fn mysql_receipt_tables_of_earlier_builds_compare_ids_exactly() {
    use mysql_async::prelude::Queryable;
    let mut direct = mysql_direct().await;
    direct
        .query_drop("DROP TABLE IF EXISTS weir_bulk_old_receipts")
        .await
        .expect("drop");
    direct
        .query_drop(
            "CREATE TABLE weir_bulk_old_receipts (`tenant` VARCHAR(255) NOT NULL, `load_id` VARCHAR(255) NOT NULL, \
             `target` TEXT NOT NULL, `rows_inserted` BIGINT NOT NULL DEFAULT 0, `rows_updated` BIGINT NOT NULL DEFAULT 0, \
             `bytes` BIGINT NOT NULL DEFAULT 0, `engine_path` VARCHAR(255) NOT NULL DEFAULT '', \
             `committed_at` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (`tenant`, `load_id`)) \
             DEFAULT CHARSET utf8mb4 COLLATE utf8mb4_general_ci",
        )
        .await
        .expect("an old receipt table");
    let config = format!(
        "[bulk]\nload_id_table = \"weir_bulk_old_receipts\"\n{}",
        Engine::Mysql.source("bulk", "")
    );
    let server = TestServer::start(&config).await;
    let ctx = Ctx {
        engine: Engine::Mysql,
        client: server.client("key-bulk").await,
        server,
    };
    ctx.table("weir_bulk_old_ids", 0).await;
    for (i, id) in ["batch-1", "Batch-1", "batch-1 "].into_iter().enumerate() {
        let mut load = header("weir_bulk_old_ids", pb::BulkLoadMode::Append);
        load.load_id = id.into();
        let first = i64::try_from(i).expect("small") * 10;
        let r = ctx.load(load, vec![rows(first..first + 2)]).await.expect(id);
        assert_eq!((r.rows_inserted, r.replayed), (2, false), "{id:?}");
    }
    assert_eq!(ctx.contents("weir_bulk_old_ids").await.len(), 6);
    let kinds: Vec<String> = direct
        .query(
            "SELECT DATA_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_NAME = 'weir_bulk_old_receipts' AND COLUMN_NAME IN ('tenant', 'load_id')",
        )
        .await
        .expect("column types");
    assert_eq!(kinds, ["varbinary", "varbinary"]);
    ctx.server.stop().await;
}

/// A load_id table without transactions (MyISAM, made by hand or by a server
/// whose default engine is not InnoDB) would keep a failed load's claim, and
/// its retry would be taken for a replay and load nothing: refused.
#[tokio::test]
async fn mysql_a_load_id_table_without_transactions_is_refused() {
    use mysql_async::prelude::Queryable;
    let mut direct = mysql_direct().await;
    direct
        .query_drop(
            "DROP TABLE IF EXISTS weir_bulk_myisam_receipts; \
             CREATE TABLE weir_bulk_myisam_receipts (`tenant` VARBINARY(255) NOT NULL, \
             `load_id` VARBINARY(255) NOT NULL, `target` TEXT NOT NULL, `rows_inserted` BIGINT NOT NULL DEFAULT 0, \
             `rows_updated` BIGINT NOT NULL DEFAULT 0, `bytes` BIGINT NOT NULL DEFAULT 0, \
             `engine_path` VARCHAR(255) NOT NULL DEFAULT '', \
             `committed_at` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (`tenant`, `load_id`)) \
             ENGINE=MyISAM",
        )
        .await
        .expect("a ledger without transactions");
    let config = format!(
        "[bulk]\nload_id_table = \"weir_bulk_myisam_receipts\"\n{}",
        Engine::Mysql.source("bulk", "")
    );
    let server = TestServer::start(&config).await;
    let ctx = Ctx {
        engine: Engine::Mysql,
        client: server.client("key-bulk").await,
        server,
    };
    ctx.table("weir_bulk_myisam_ids", 0).await;
    let mut load = header("weir_bulk_myisam_ids", pb::BulkLoadMode::Append);
    load.load_id = "once".into();
    let err = ctx.load(load, vec![rows(0..2)]).await.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("ENGINE=InnoDB"), "{err:?}");
    assert!(ctx.contents("weir_bulk_myisam_ids").await.is_empty());
    direct
        .query_drop("DROP TABLE weir_bulk_myisam_receipts")
        .await
        .expect("drop");
    ctx.server.stop().await;
}

/// A bad row is named by its index even in a table whose name looks like
/// a position in PostgreSQL's COPY context (`COPY Sales, Q1 2024, line 3`).
#[tokio::test]
async fn a_bad_row_in_a_table_named_like_a_position_is_named_right() {
    let ctx = Ctx::new(Engine::Postgres, "").await;
    let table = "Sales, Q1 2024";
    ctx.exec(&format!("DROP TABLE IF EXISTS \"{table}\"")).await;
    ctx.exec(&format!(
        "CREATE TABLE \"{table}\" (id INT PRIMARY KEY, name TEXT NOT NULL, score INT CHECK (score >= 0))"
    ))
    .await;
    let mut batch = rows(0..5);
    batch[3] = row(3, "bad", -1);
    let err = ctx
        .load(header(table, pb::BulkLoadMode::Append), vec![batch])
        .await
        .expect_err("a CHECK violation");
    assert_eq!(
        (reason(&err).as_str(), error_metadata(&err, "row_index").as_str()),
        ("BAD_ROW", "3"),
        "{err:?}"
    );
    ctx.exec(&format!("DROP TABLE \"{table}\"")).await;
    ctx.server.stop().await;
}

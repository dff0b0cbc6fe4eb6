//! One conformance suite, the same cases on every engine, through the real
//! gRPC server. Per-engine expectations appear only where the engines truly
//! differ (placeholders, engine error codes, how a boolean is stored).
//! Adding an engine means adding an `Engine` variant and a `suite!` line.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use weir_client::arrow_array::cast::AsArray;
use weir_client::arrow_array::types::{Date32Type, Float64Type, Int64Type, TimestampMicrosecondType};
use weir_client::arrow_array::Array;
use weir_client::arrow_schema::{DataType, TimeUnit};
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;
use weir_client::weir_proto::v1::IsolationLevel;
use weir_client::WeirClient;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Engine {
    Postgres,
    Mysql,
    Sqlite,
    /// Live only when WEIR_TEST_MSSQL_URL names a server (the tests are ignored otherwise).
    Mssql,
}

impl Engine {
    fn source(self, limits: &str) -> String {
        let source = match self {
            Engine::Postgres => postgres("conf", "db", ""),
            Engine::Mysql => mysql("conf", "db", ""),
            Engine::Sqlite => "[tenants.conf.sources.db]\nengine = \"sqlite\"\npath = \":memory:\"\n".to_string(),
            Engine::Mssql => mssql_live("conf", "db", ""),
        };
        tenant("conf", limits, &source)
    }

    /// The i-th (1-based) placeholder, with a cast where PostgreSQL needs one to infer a type.
    fn ph(self, i: usize, pg_type: &str) -> String {
        match self {
            Engine::Postgres if pg_type.is_empty() => format!("${i}"),
            Engine::Postgres => format!("${i}::{pg_type}"),
            Engine::Mssql => format!("@P{i}"),
            _ => "?".into(),
        }
    }

    fn series(self, n: u32) -> String {
        match self {
            Engine::Postgres => format!("SELECT g FROM generate_series(1, {n}) g"),
            // MariaDB stops recursive CTEs at max_recursive_iterations (1000); its sequence engine has no limit.
            Engine::Mysql => format!("SELECT CAST(seq AS SIGNED) AS g FROM seq_1_to_{n}"),
            Engine::Mssql => format!(
                "SELECT TOP ({n}) ROW_NUMBER() OVER (ORDER BY (SELECT NULL)) AS g FROM sys.all_objects a CROSS JOIN sys.all_objects b"
            ),
            Engine::Sqlite => {
                format!("WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {n}) SELECT g FROM s")
            }
        }
    }

    /// A statement that runs for a long time; `tag` names it in the engine's process list.
    fn slow(self, tag: &str) -> String {
        match self {
            Engine::Postgres => format!("SELECT pg_sleep(30) AS {tag}"),
            Engine::Mysql => format!("SELECT SLEEP(30) AS {tag}"),
            Engine::Mssql => format!("WAITFOR DELAY '00:00:30'; SELECT 1 AS {tag}"),
            Engine::Sqlite => {
                format!(
                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) AS {tag} FROM c"
                )
            }
        }
    }

    /// Rows that trickle out slowly, for dropping a stream half way.
    fn slow_rows(self, tag: &str) -> String {
        match self {
            Engine::Postgres => format!("SELECT g, pg_sleep(0.0005) AS {tag} FROM generate_series(1, 100000) g"),
            Engine::Mysql => format!("SELECT seq AS g, SLEEP(0.0005) AS {tag} FROM seq_1_to_100000"),
            Engine::Mssql => format!(
                "SELECT ROW_NUMBER() OVER (ORDER BY (SELECT NULL)) AS g, 1 AS {tag} FROM sys.all_objects a CROSS JOIN sys.all_objects b CROSS JOIN sys.all_objects c"
            ),
            Engine::Sqlite => {
                format!("WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s) SELECT g, g AS {tag} FROM s")
            }
        }
    }

    fn syntax_error_code(self) -> &'static str {
        match self {
            Engine::Postgres => "42601",
            Engine::Mysql => "1064",
            Engine::Sqlite => "1",
            Engine::Mssql => "156",
        }
    }

    fn unknown_table_code(self) -> &'static str {
        match self {
            Engine::Postgres => "42P01",
            Engine::Mysql => "1146",
            Engine::Sqlite => "1",
            Engine::Mssql => "208",
        }
    }

    fn unique_violation_code(self) -> &'static str {
        match self {
            Engine::Postgres => "23505",
            Engine::Mysql => "1062",
            Engine::Sqlite => "1555",
            Engine::Mssql => "2627",
        }
    }

    fn types_ddl(self) -> &'static str {
        match self {
            Engine::Postgres => "CREATE TABLE weir_conf_types (id int PRIMARY KEY, i bigint, d numeric(10,2), f double precision, t varchar(50), b bytea, flag boolean, day date, at timestamp)",
            Engine::Mysql => "CREATE TABLE weir_conf_types (id int PRIMARY KEY, i bigint, d decimal(10,2), f double, t varchar(50), b varbinary(50), flag boolean, day date, at datetime(6))",
            Engine::Sqlite => "CREATE TABLE weir_conf_types (id INTEGER PRIMARY KEY, i BIGINT, d DECIMAL(10,2), f DOUBLE, t VARCHAR(50), b BLOB, flag BOOLEAN, day DATE, at DATETIME)",
            Engine::Mssql => "CREATE TABLE weir_conf_types (id int PRIMARY KEY, i bigint, d decimal(10,2), f float, t nvarchar(50), b varbinary(50), flag bit, day date, at datetime2(6))",
        }
    }

    /// Waits up to 5 s for the statement tagged `tag` to leave the engine.
    async fn assert_stops(self, ctx: &Ctx, tag: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.running(ctx, tag).await {
            assert!(Instant::now() < deadline, "{self:?}: {what} still runs in the engine");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether a statement tagged `tag` still runs in the engine.
    async fn running(self, ctx: &Ctx, tag: &str) -> bool {
        match self {
            Engine::Postgres => !wait_until_gone(&pg_direct().await, tag, Duration::ZERO).await,
            Engine::Mysql => mysql_running(&mut mysql_direct().await, &format!("%{tag}%")).await > 0,
            // An embedded engine has no process list; the pool check below covers it.
            Engine::Sqlite => false,
            Engine::Mssql => {
                let r = ctx
                    .client
                    .execute(
                        "db",
                        "SELECT COUNT(*) FROM sys.dm_exec_requests r CROSS APPLY sys.dm_exec_sql_text(r.sql_handle) t \
                         WHERE t.text LIKE '%' + @P1 + '%' AND r.session_id <> @@SPID",
                        vec![tag.into()],
                    )
                    .await
                    .expect("dm_exec_requests");
                int(&r.rows[0].values[0]) > 0
            }
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
        let server = TestServer::start(&engine.source(limits)).await;
        let client = server.client("key-conf").await;
        Ctx { engine, server, client }
    }

    async fn run(&self, sql: &str) -> pb::ExecuteResponse {
        self.client
            .execute("db", sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{:?}: {sql}: {e}", self.engine))
    }

    async fn fail(&self, sql: &str) -> tonic::Status {
        self.client.execute("db", sql, vec![]).await.expect_err(sql)
    }

    async fn recreate(&self, drop_first: &[&str], ddl: &[&str]) {
        for table in drop_first {
            self.run(&format!("DROP TABLE IF EXISTS {table}")).await;
        }
        for statement in ddl {
            self.run(statement).await;
        }
    }

    /// The generated client's stream, message by message.
    async fn raw_stream(
        &self,
        sql: &str,
        max_batch_rows: u32,
        format: pb::ResultFormat,
    ) -> tonic::Streaming<pb::ExecuteStreamResponse> {
        let request = pb::ExecuteStreamRequest {
            source: "db".into(),
            sql: sql.into(),
            max_batch_rows,
            format: format.into(),
            ..Default::default()
        };
        let stream = self.client.query().execute_stream(request).await;
        stream
            .unwrap_or_else(|e| panic!("{:?}: {sql}: {e}", self.engine))
            .into_inner()
    }

    async fn assert_pool_serves(&self) {
        assert_serves(&self.client, "db", 6).await;
    }
}

fn value(kind: Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

async fn round_trips_common_types(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.recreate(&["weir_conf_types"], &[engine.types_ddl()]).await;
    let mut placeholders: Vec<_> = (1..=9).map(|i| engine.ph(i, "")).collect();
    if engine == Engine::Mssql {
        // An untyped NULL parameter is nvarchar to SQL Server, which will not convert it to varbinary.
        placeholders[5] = "CAST(@P6 AS varbinary(50))".into();
    }
    let insert = format!("INSERT INTO weir_conf_types VALUES ({})", placeholders.join(", "));
    let at = prost_types::Timestamp {
        seconds: 1_704_164_645,
        nanos: 123_456_000,
    };
    let day = pb::Date {
        year: 2024,
        month: 2,
        day: 29,
    };
    let params = vec![
        1i64.into(),
        (-9_007_199_254_740_993i64).into(),
        value(Kind::DecimalValue("12.34".into())),
        2.5f64.into(),
        "héllo ✓".into(),
        vec![0u8, 1, 255].into(),
        true.into(),
        value(Kind::DateValue(day)),
        value(Kind::TimestampValue(at)),
    ];
    let r = ctx
        .client
        .execute("db", &insert, params)
        .await
        .expect("insert with parameters");
    assert_eq!(r.stats.and_then(|s| s.rows_affected), Some(1), "{engine:?}");
    let nulls = vec![2i64.into()]
        .into_iter()
        .chain((0..8).map(|_| pb::Value::null()))
        .collect();
    ctx.client.execute("db", &insert, nulls).await.expect("insert NULLs");

    let r = ctx
        .run("SELECT id, i, d, f, t, b, flag, day, at FROM weir_conf_types ORDER BY id")
        .await;
    assert_eq!(r.rows.len(), 2);
    let v: Vec<_> = r.rows[0].values.iter().map(|v| v.kind.clone().expect("kind")).collect();
    assert_eq!(v[0], Kind::Int64Value(1), "{engine:?}");
    assert_eq!(
        v[1],
        Kind::Int64Value(-9_007_199_254_740_993),
        "{engine:?}: no float rounding"
    );
    assert_eq!(v[2], Kind::DecimalValue("12.34".into()), "{engine:?}");
    assert_eq!(v[3], Kind::DoubleValue(2.5), "{engine:?}");
    assert_eq!(v[4], Kind::StringValue("héllo ✓".into()), "{engine:?}");
    assert_eq!(v[5], Kind::BytesValue(vec![0, 1, 255]), "{engine:?}");
    // MySQL's BOOLEAN is TINYINT(1): it comes back as the integer it stores.
    let flag = if engine == Engine::Mysql {
        Kind::Int64Value(1)
    } else {
        Kind::BoolValue(true)
    };
    assert_eq!(v[6], flag, "{engine:?}");
    assert_eq!(v[7], Kind::DateValue(day), "{engine:?}");
    assert_eq!(v[8], Kind::TimestampValue(at), "{engine:?}");
    assert!(r.rows[1].values[1..].iter().all(is_null), "{engine:?}: NULLs stay NULL");

    let types: Vec<_> = r
        .columns
        .iter()
        .map(|c| pb::ColumnType::try_from(c.r#type).expect("known"))
        .collect();
    use pb::ColumnType as T;
    let flag_type = if engine == Engine::Mysql { T::Int } else { T::Bool };
    assert_eq!(
        types,
        [
            T::Int,
            T::Int,
            T::Decimal,
            T::Float,
            T::String,
            T::Bytes,
            flag_type,
            T::Date,
            T::Timestamp
        ],
        "{engine:?}"
    );
    ctx.server.stop().await;
}

async fn parameters_are_data_not_sql(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    let hostile = "x'); DROP TABLE weir_conf_types; --";
    let sql = format!(
        "SELECT {} AS s, {} + 1 AS n",
        engine.ph(1, "text"),
        engine.ph(2, "int8")
    );
    let r = ctx
        .client
        .execute("db", &sql, vec![hostile.into(), 41i64.into()])
        .await
        .expect("parameters");
    assert_eq!(text(&r.rows[0].values[0]), hostile, "{engine:?}");
    assert_eq!(int(&r.rows[0].values[1]), 42, "{engine:?}");
    let err = ctx
        .client
        .execute("db", &sql, vec![hostile.into()])
        .await
        .expect_err("missing parameter");
    assert_eq!(err.code(), Code::InvalidArgument, "{engine:?}");
    assert!(err.message().contains("2 parameter"), "{engine:?}: {}", err.message());
    ctx.server.stop().await;
}

async fn empty_results_keep_their_columns(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    let r = ctx
        .run("SELECT 1 AS a, 'x' AS b FROM (SELECT 1 AS one) t WHERE 1 = 0")
        .await;
    assert_eq!(
        r.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"],
        "{engine:?}"
    );
    assert!(r.rows.is_empty());
    assert_eq!(r.stats.map(|s| s.rows_returned), Some(0));
    let mut stream = ctx
        .client
        .execute_stream("db", "SELECT 1 AS a FROM (SELECT 1 AS one) t WHERE 1 = 0", vec![])
        .await
        .expect("stream");
    assert_eq!(stream.columns().len(), 1);
    assert!(stream.next_batch().await.expect("end").is_none(), "{engine:?}");
    assert_eq!(stream.stats().map(|s| s.rows_returned), Some(0));
    ctx.server.stop().await;
}

async fn large_results_stream_in_batches(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    let n = 100_000i64;
    let mut stream = ctx
        .client
        .execute_stream("db", &engine.series(n as u32), vec![])
        .await
        .expect("stream");
    let (mut count, mut sum, mut batches) = (0i64, 0i64, 0);
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        batches += 1;
        count += batch.len() as i64;
        sum += batch.iter().map(|r| int(&r.values[0])).sum::<i64>();
    }
    assert_eq!((count, sum), (n, n * (n + 1) / 2), "{engine:?}");
    assert!(batches >= 100, "{engine:?}: {batches} batches for {n} rows");
    assert_eq!(stream.stats().map(|s| s.rows_returned), Some(n as u64));
    ctx.server.stop().await;
}

async fn statement_timeout_stops_the_statement(engine: Engine) {
    let ctx = Ctx::new(engine, "statement_timeout = \"500ms\"").await;
    let started = Instant::now();
    let err = ctx.fail(&engine.slow("weir_timeout_probe")).await;
    assert_eq!(err.code(), Code::DeadlineExceeded, "{engine:?}: {}", err.message());
    assert_eq!(reason(&err), "STATEMENT_TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(5), "{engine:?}");
    engine
        .assert_stops(&ctx, "weir_timeout_probe", "the timed-out statement")
        .await;
    ctx.assert_pool_serves().await;
    ctx.server.stop().await;
}

async fn dropped_streams_are_cancelled(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    for format in [pb::ResultFormat::Rows, pb::ResultFormat::ArrowIpc] {
        let mut stream = ctx.raw_stream(&engine.slow_rows("weir_drop_probe"), 100, format).await;
        use pb::execute_stream_response::Payload;
        let metadata = stream.message().await.expect("metadata").and_then(|m| m.payload);
        assert!(matches!(metadata, Some(Payload::Metadata(_))), "{engine:?} {format:?}");
        let first = stream.message().await.expect("batch").and_then(|m| m.payload);
        match first {
            Some(Payload::Batch(rows)) => assert!(!rows.rows.is_empty()),
            Some(Payload::ArrowIpc(piece)) => assert!(!piece.is_empty()),
            other => panic!("{engine:?} {format:?}: {other:?} instead of rows"),
        }
        drop(stream);
        engine
            .assert_stops(&ctx, "weir_drop_probe", &format!("the abandoned {format:?} statement"))
            .await;
        ctx.assert_pool_serves().await;
    }
    ctx.server.stop().await;
}

async fn transactions_commit_and_roll_back(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.recreate(
        &["weir_conf_tx"],
        &["CREATE TABLE weir_conf_tx (id INT PRIMARY KEY, note VARCHAR(20))"],
    )
    .await;
    let insert = format!(
        "INSERT INTO weir_conf_tx VALUES ({}, {})",
        engine.ph(1, ""),
        engine.ph(2, "")
    );
    let count = "SELECT COUNT(*) FROM weir_conf_tx";

    let tx = ctx
        .client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    ctx.client
        .execute_in(&tx, "db", &insert, vec![1i64.into(), "gone".into()])
        .await
        .expect("insert");
    let inside = ctx
        .client
        .execute_in(&tx, "db", count, vec![])
        .await
        .expect("count inside");
    assert_eq!(
        int(&inside.rows[0].values[0]),
        1,
        "{engine:?}: a transaction sees its own writes"
    );
    ctx.client.rollback(&tx).await.expect("rollback");
    assert_eq!(
        int(&ctx.run(count).await.rows[0].values[0]),
        0,
        "{engine:?}: rolled back"
    );

    let tx = ctx
        .client
        .begin("db", IsolationLevel::Serializable, false)
        .await
        .expect("begin");
    ctx.client
        .execute_in(&tx, "db", &insert, vec![2i64.into(), "kept".into()])
        .await
        .expect("insert");
    ctx.client.commit(&tx).await.expect("commit");
    assert_eq!(int(&ctx.run(count).await.rows[0].values[0]), 1, "{engine:?}: committed");
    assert_eq!(
        ctx.client.commit(&tx).await.expect_err("spent handle").code(),
        Code::NotFound
    );

    let tx = ctx
        .client
        .begin("db", IsolationLevel::Unspecified, true)
        .await
        .expect("read-only begin");
    let err = ctx
        .client
        .execute_in(&tx, "db", "DELETE FROM weir_conf_tx", vec![])
        .await
        .expect_err("read-only");
    assert_eq!(err.code(), Code::PermissionDenied, "{engine:?}: {}", err.message());
    ctx.client.rollback(&tx).await.expect("rollback");
    ctx.server.stop().await;
}

/// A write that hands back its rows runs alone; refused for returning more
/// than the response caps allow, it must leave nothing written.
async fn writes_refused_for_their_returned_rows_leave_nothing(engine: Engine) {
    let ctx = Ctx::new(engine, "max_rows_per_response = 5\nmax_bytes_per_response = 1000").await;
    ctx.recreate(
        &["weir_conf_capped"],
        &["CREATE TABLE weir_conf_capped (id INT PRIMARY KEY, note VARCHAR(2000))"],
    )
    .await;
    let count = "SELECT COUNT(*) FROM weir_conf_capped";
    let insert = |n: u32, returned: &str| {
        let rows = engine.series(n);
        match engine {
            Engine::Mssql => {
                format!(
                    "INSERT INTO weir_conf_capped (id, note) OUTPUT inserted.{returned} SELECT g, 'x' FROM ({rows}) s"
                )
            }
            _ => format!("INSERT INTO weir_conf_capped (id, note) SELECT g, 'x' FROM ({rows}) s RETURNING {returned}"),
        }
    };
    let err = ctx.fail(&insert(6, "id")).await;
    assert_eq!(reason(&err), "RESULT_TOO_LARGE", "{engine:?}: {err:?}");
    assert_eq!(
        int(&ctx.run(count).await.rows[0].values[0]),
        0,
        "{engine:?}: rows over the cap"
    );

    let within = ctx.run(&insert(5, "id")).await;
    assert_eq!(within.rows.len(), 5, "{engine:?}");
    assert_eq!(
        int(&ctx.run(count).await.rows[0].values[0]),
        5,
        "{engine:?}: within the cap"
    );
    // PostgreSQL's writing CTEs: the rows come from the outer SELECT,
    // with or without RETURNING, and a comment may come before parentheses.
    if engine == Engine::Postgres {
        for sql in [
            "WITH d AS (DELETE FROM weir_conf_capped) SELECT g FROM generate_series(1, 6) g",
            "/* tag */ (WITH d AS (DELETE FROM weir_conf_capped RETURNING id) SELECT g FROM generate_series(1, 6) g)",
        ] {
            let err = ctx.fail(sql).await;
            assert_eq!(reason(&err), "RESULT_TOO_LARGE", "{sql}: {err:?}");
            assert_eq!(int(&ctx.run(count).await.rows[0].values[0]), 5, "{sql}");
        }
    }

    let wide = "y".repeat(1500);
    let update = match engine {
        Engine::Mssql => format!("UPDATE weir_conf_capped SET note = '{wide}' OUTPUT inserted.note WHERE id = 1"),
        // MariaDB has no UPDATE ... RETURNING: a delete and an insert, in one statement each.
        Engine::Mysql => format!("REPLACE INTO weir_conf_capped (id, note) VALUES (1, '{wide}') RETURNING note"),
        _ => format!("UPDATE weir_conf_capped SET note = '{wide}' WHERE id = 1 RETURNING note"),
    };
    let err = ctx.fail(&update).await;
    assert_eq!(reason(&err), "RESULT_TOO_LARGE", "{engine:?}: {err:?}");
    let note = ctx.run("SELECT note FROM weir_conf_capped WHERE id = 1").await;
    assert_eq!(text(&note.rows[0].values[0]), "x", "{engine:?}: bytes over the cap");

    // Streamed, such a write commits once its last row is sent, before
    // `stats`; a stream left part way leaves nothing written.
    ctx.run("DELETE FROM weir_conf_capped").await;
    let mut whole = ctx
        .client
        .execute_stream("db", &insert(3, "id"), vec![])
        .await
        .expect("stream");
    let mut streamed = 0;
    while let Some(batch) = whole.next_batch().await.expect("rows") {
        streamed += batch.len();
    }
    assert!(whole.stats().is_some() && streamed == 3, "{engine:?}");
    assert_eq!(int(&ctx.run(count).await.rows[0].values[0]), 3, "{engine:?}: committed");
    let sql = insert(3000, "id").replace("SELECT g,", "SELECT g + 100,");
    let mut left = ctx.raw_stream(&sql, 10, pb::ResultFormat::Rows).await;
    for _ in 0..2 {
        assert!(
            left.message().await.expect("metadata, then rows").is_some(),
            "{engine:?}"
        );
    }
    drop(left);
    // Given time to commit, had it been left to.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    ctx.assert_pool_serves().await;
    assert_eq!(
        int(&ctx.run(count).await.rows[0].values[0]),
        3,
        "{engine:?}: a stream left part way"
    );
    ctx.server.stop().await;
}

async fn schema_is_listed_and_described(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.recreate(
        &["weir_conf_child", "weir_conf_parent"],
        &[
            "CREATE TABLE weir_conf_parent (id INT PRIMARY KEY, name VARCHAR(20) NOT NULL)",
            "CREATE TABLE weir_conf_child (id INT PRIMARY KEY, parent_id INT NOT NULL, note VARCHAR(20), \
             FOREIGN KEY (parent_id) REFERENCES weir_conf_parent (id))",
            "CREATE INDEX weir_conf_child_note ON weir_conf_child (note)",
        ],
    )
    .await;
    let ping = ctx.client.test_connection("db").await.expect("ping");
    assert!(!ping.server_version.is_empty());
    let schemas = ctx.client.list_schemas("db").await.expect("schemas");
    assert!(!schemas.is_empty() && schemas.iter().all(|s| !s.system), "{engine:?}");
    let tables = ctx.client.list_tables("db", "").await.expect("tables");
    for name in ["weir_conf_parent", "weir_conf_child"] {
        let t = tables
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{engine:?}: {name} listed"));
        assert_eq!(t.kind, pb::TableKind::Table as i32);
    }
    let d = ctx
        .client
        .describe_table("db", "", "weir_conf_child")
        .await
        .expect("describe");
    let columns: Vec<_> = d
        .columns
        .iter()
        .filter_map(|c| c.column.as_ref())
        .map(|c| (c.name.as_str(), c.nullable))
        .collect();
    // SQLite stores NULL in a rowid table's key unless it is the rowid itself.
    let sqlite_key_takes_null = matches!(engine, Engine::Sqlite);
    assert_eq!(
        columns,
        [("id", sqlite_key_takes_null), ("parent_id", false), ("note", true)],
        "{engine:?}"
    );
    assert_eq!(
        d.columns[1].column.as_ref().map(|c| c.r#type),
        Some(pb::ColumnType::Int as i32)
    );
    assert_eq!(
        d.primary_key.map(|p| p.columns),
        Some(vec!["id".to_string()]),
        "{engine:?}"
    );
    assert_eq!(d.foreign_keys.len(), 1, "{engine:?}");
    assert_eq!(d.foreign_keys[0].referenced_table, "weir_conf_parent");
    assert_eq!(d.foreign_keys[0].columns, ["parent_id"]);
    assert_eq!(d.foreign_keys[0].referenced_columns, ["id"]);
    assert!(
        d.indexes
            .iter()
            .any(|i| i.name == "weir_conf_child_note" && i.columns == ["note"] && !i.unique),
        "{engine:?}"
    );
    let err = ctx
        .client
        .describe_table("db", "", "weir_conf_missing")
        .await
        .expect_err("unknown table");
    assert_eq!(err.code(), Code::NotFound, "{engine:?}");
    ctx.server.stop().await;
}

async fn tables_are_listed_a_page_at_a_time(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    // In byte order "_" comes before letters; the usual collations of
    // PostgreSQL and MariaDB skip it or put it after them.
    let names = [
        "weir_conf_page_ab",
        "weir_conf_page_a_c",
        "weir_conf_page_b",
        "weir_conf_page_a",
    ];
    let ddl: Vec<String> = names.iter().map(|n| format!("CREATE TABLE {n} (id INT)")).collect();
    ctx.recreate(&names, &ddl.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let schema = ctx
        .client
        .list_tables("db", "")
        .await
        .expect("tables")
        .into_iter()
        .find(|t| t.name == "weir_conf_page_a")
        .map(|t| t.schema)
        .unwrap_or_else(|| panic!("{engine:?}: the table is listed"));

    let page = |page_size: i32, page_token: String, schema: &str| {
        let mut api = ctx.client.schema();
        let request = pb::ListTablesRequest {
            source: "db".into(),
            schema: schema.into(),
            page_size,
            page_token,
        };
        async move { api.list_tables(request).await.map(|r| r.into_inner()) }
    };
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let answer = page(2, token, &schema).await.expect("page");
        assert!(
            answer.tables.len() <= 2,
            "{engine:?}: a page holds at most page_size tables"
        );
        listed.extend(answer.tables.into_iter().map(|t| t.name));
        if answer.next_page_token.is_empty() {
            break;
        }
        token = answer.next_page_token;
        assert!(listed.len() < 100_000, "{engine:?}: paging ends");
    }
    // Other tests make and drop tables meanwhile; these four stay, and the
    // pages together are in byte order without repeats or gaps among them.
    assert!(
        listed.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()),
        "{engine:?}: pages in byte order, no table twice: {listed:?}"
    );
    let ours: Vec<&str> = listed
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with("weir_conf_page_"))
        .collect();
    assert_eq!(
        ours,
        [
            "weir_conf_page_a",
            "weir_conf_page_a_c",
            "weir_conf_page_ab",
            "weir_conf_page_b"
        ],
        "{engine:?}"
    );

    // Without a page size, every table in one answer.
    let whole = page(0, String::new(), &schema).await.expect("all");
    assert!(whole.next_page_token.is_empty());
    assert!(
        whole
            .tables
            .iter()
            .filter(|t| t.name.starts_with("weir_conf_page_"))
            .count()
            == 4
    );

    // A token is for the source and schema it was returned for.
    let first = page(1, String::new(), &schema).await.expect("first page");
    assert_eq!(first.tables.len(), 1);
    assert!(!first.next_page_token.is_empty(), "{engine:?}: more follow");
    for (size, token, schema, what) in [
        (1, first.next_page_token.clone(), "", "another schema's token"),
        (1, "not-a-token".to_string(), schema.as_str(), "a made-up token"),
        (-1, String::new(), schema.as_str(), "a negative page size"),
    ] {
        let err = page(size, token, schema).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{engine:?}: {what}: {err:?}");
    }
    for name in names {
        ctx.run(&format!("DROP TABLE {name}")).await;
    }
    ctx.server.stop().await;
}

async fn engine_errors_map_to_the_same_codes(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    let err = ctx.fail("SELECT FROM WHERE").await;
    assert_eq!(
        (err.code(), engine_code(&err)),
        (Code::InvalidArgument, engine.syntax_error_code().to_string()),
        "{engine:?}"
    );
    let err = ctx.fail("SELECT * FROM weir_conf_missing").await;
    assert_eq!(
        (err.code(), engine_code(&err)),
        (Code::NotFound, engine.unknown_table_code().to_string()),
        "{engine:?}"
    );
    ctx.recreate(
        &["weir_conf_unique"],
        &[
            "CREATE TABLE weir_conf_unique (id INT PRIMARY KEY)",
            "INSERT INTO weir_conf_unique VALUES (1)",
        ],
    )
    .await;
    let err = ctx.fail("INSERT INTO weir_conf_unique VALUES (1)").await;
    assert_eq!(
        (err.code(), engine_code(&err)),
        (Code::AlreadyExists, engine.unique_violation_code().to_string()),
        "{engine:?}: {}",
        err.message()
    );
    ctx.assert_pool_serves().await;
    ctx.server.stop().await;
}

/// An integer cell. SQLite's expressions (`COUNT(*)`, a recursive CTE's
/// column) declare no type: their first batch's integers make them Int64 too.
fn arrow_int(column: &dyn Array, row: usize) -> i64 {
    column.as_primitive::<Int64Type>().value(row)
}

async fn arrow_results_hold_the_same_values(engine: Engine) {
    let ctx = Ctx::new(engine, "").await;
    ctx.recreate(
        &["weir_conf_arrow"],
        &[&engine.types_ddl().replace("weir_conf_types", "weir_conf_arrow")],
    )
    .await;
    let insert = format!(
        "INSERT INTO weir_conf_arrow VALUES (1, -9007199254740993, 12.34, 2.5, 'héllo ✓', {}, {}, '2024-02-29', '2024-01-02 03:04:05.123456')",
        match engine {
            Engine::Postgres => "'\\x0001ff'",
            _ => "X'0001ff'",
        },
        match engine {
            Engine::Postgres => "true",
            _ => "1",
        },
    );
    ctx.run(&insert).await;
    ctx.run("INSERT INTO weir_conf_arrow (id) VALUES (2)").await;
    let mut stream = ctx
        .client
        .execute_stream_arrow(
            "db",
            "SELECT id, i, d, f, t, b, flag, day, at FROM weir_conf_arrow ORDER BY id",
            vec![],
        )
        .await
        .unwrap_or_else(|e| panic!("{engine:?}: {e}"));
    assert_eq!(stream.columns().len(), 9);
    let batch = stream.next_batch().await.expect("batch").expect("one batch");
    assert!(stream.next_batch().await.expect("end").is_none(), "{engine:?}");
    assert_eq!(stream.stats().map(|s| s.rows_returned), Some(2));
    assert_eq!(batch.num_rows(), 2);
    let schema = batch.schema();
    let types: Vec<_> = schema.fields().iter().map(|f| f.data_type().clone()).collect();
    // MySQL's BOOLEAN is TINYINT(1), an integer column.
    let flag_type = if engine == Engine::Mysql {
        DataType::Int64
    } else {
        DataType::Boolean
    };
    assert_eq!(
        types,
        [
            DataType::Int64,
            DataType::Int64,
            DataType::Utf8,
            DataType::Float64,
            DataType::Utf8,
            DataType::Binary,
            flag_type,
            DataType::Date32,
            DataType::Timestamp(TimeUnit::Microsecond, None),
        ],
        "{engine:?}"
    );
    let c = |i: usize| batch.column(i);
    assert_eq!(c(0).as_primitive::<Int64Type>().value(0), 1);
    assert_eq!(
        c(1).as_primitive::<Int64Type>().value(0),
        -9_007_199_254_740_993,
        "{engine:?}: no float rounding"
    );
    assert_eq!(c(2).as_string::<i32>().value(0), "12.34", "{engine:?}");
    assert_eq!(c(3).as_primitive::<Float64Type>().value(0), 2.5);
    assert_eq!(c(4).as_string::<i32>().value(0), "héllo ✓");
    assert_eq!(c(5).as_binary::<i32>().value(0), [0u8, 1, 255]);
    match engine {
        Engine::Mysql => assert_eq!(c(6).as_primitive::<Int64Type>().value(0), 1),
        _ => assert!(c(6).as_boolean().value(0), "{engine:?}"),
    }
    // Days since 1970-01-01, and microseconds since its midnight.
    assert_eq!(c(7).as_primitive::<Date32Type>().value(0), 19_782, "{engine:?}");
    assert_eq!(
        c(8).as_primitive::<TimestampMicrosecondType>().value(0),
        1_704_164_645_123_456,
        "{engine:?}"
    );
    assert!((1..9).all(|i| c(i).is_null(1)), "{engine:?}: NULLs stay NULL");
    assert_eq!(
        schema
            .field(1)
            .metadata()
            .get("weir.native_type")
            .map(|t| !t.is_empty()),
        Some(true)
    );

    // A large result: whole Arrow batches, the last one short.
    let n = 100_000i64;
    let mut stream = ctx
        .client
        .execute_stream_arrow(
            "db",
            &format!("SELECT COUNT(*) AS n FROM ({}) s", engine.series(n as u32)),
            vec![],
        )
        .await
        .expect("count");
    let batch = stream.next_batch().await.expect("batch").expect("a row");
    assert_eq!(arrow_int(batch.column(0).as_ref(), 0), n, "{engine:?}");
    let mut stream = ctx
        .client
        .execute_stream_arrow("db", &engine.series(n as u32), vec![])
        .await
        .expect("series");
    let (mut count, mut sum, mut batches) = (0i64, 0i64, 0);
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        batches += 1;
        count += batch.num_rows() as i64;
        sum += (0..batch.num_rows())
            .map(|r| arrow_int(batch.column(0).as_ref(), r))
            .sum::<i64>();
    }
    assert_eq!((count, sum), (n, n * (n + 1) / 2), "{engine:?}");
    assert!(batches >= 2, "{engine:?}: {batches} batches");
    assert_eq!(stream.stats().map(|s| s.rows_returned), Some(n as u64));

    // An empty result still has its schema.
    let mut stream = ctx
        .client
        .execute_stream_arrow("db", "SELECT id FROM weir_conf_arrow WHERE id < 0", vec![])
        .await
        .expect("empty");
    assert!(stream.next_batch().await.expect("end").is_none(), "{engine:?}");
    assert_eq!(stream.schema().map(|s| s.fields().len()), Some(1), "{engine:?}");
    ctx.assert_pool_serves().await;
    ctx.server.stop().await;
}

macro_rules! suite {
    ($module:ident, $engine:expr $(, #[$attr:meta])?) => {
        mod $module {
            use super::*;
            #[tokio::test]
            $(#[$attr])?
            async fn round_trips_common_types() {
                super::round_trips_common_types($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn arrow_results_hold_the_same_values() {
                super::arrow_results_hold_the_same_values($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn parameters_are_data_not_sql() {
                super::parameters_are_data_not_sql($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn empty_results_keep_their_columns() {
                super::empty_results_keep_their_columns($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn large_results_stream_in_batches() {
                super::large_results_stream_in_batches($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn statement_timeout_stops_the_statement() {
                super::statement_timeout_stops_the_statement($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn dropped_streams_are_cancelled() {
                super::dropped_streams_are_cancelled($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn transactions_commit_and_roll_back() {
                super::transactions_commit_and_roll_back($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn writes_refused_for_their_returned_rows_leave_nothing() {
                super::writes_refused_for_their_returned_rows_leave_nothing($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn schema_is_listed_and_described() {
                super::schema_is_listed_and_described($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn tables_are_listed_a_page_at_a_time() {
                super::tables_are_listed_a_page_at_a_time($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn engine_errors_map_to_the_same_codes() {
                super::engine_errors_map_to_the_same_codes($engine).await
            }
        }
    };
}

suite!(postgres, Engine::Postgres);
suite!(mysql, Engine::Mysql);
suite!(sqlite, Engine::Sqlite);
suite!(mssql, Engine::Mssql, #[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]);

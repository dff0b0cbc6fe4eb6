//! The gateway in front of SQL Server, through the real gRPC server and client.
//!
//! Without a SQL Server, `mock_*` tests run against mssql-mock-tds, a TDS
//! server that answers canned queries: they prove the login, statements,
//! parameters' arity check, error numbers, rows affected, cancellation by
//! closing the connection, transactions' plumbing and TestConnection. The
//! mock's TLS does not interoperate with tiberius (it answers the TLS
//! handshake in TabularResult packets, where tiberius asserts PreLogin), so
//! these sessions are plaintext; `tls = true` is shown to refuse such a server.
//!
//! `live_*` tests need a real SQL Server named by `WEIR_TEST_MSSQL_URL`, a
//! `;`-separated list of `key=value` (values cannot contain `;`):
//!
//! ```text
//! WEIR_TEST_MSSQL_URL='host=127.0.0.1;port=1433;user=sa;password=Secret_123;database=master;trust_server_certificate=true'
//! ```
//!
//! Keys: `host` (required), `port` (1433), `user` (sa), `password`,
//! `database` (the login's default), `tls` and `trust_server_certificate`
//! (true/false, default false). They are marked ignored, so cargo names them
//! as ignored unless run with `--include-ignored` (scripts/test does that
//! when the variable is set).

mod common;

use std::time::{Duration, Instant};

use common::*;
use mssql_mock_tds::{
    ColumnDefinition, ColumnValue, MockTdsServer, QueryRegistry, QueryResponse, Row as MockRow, SqlDataType,
    TerminalError,
};
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;
use weir_client::weir_proto::v1::IsolationLevel;
use weir_client::WeirClient;

// A throwaway self-signed certificate (P-256, valid until 2126) for the
// mock's TLS, whose handshake tiberius cannot complete. Not a secret.
const MOCK_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBgDCCASWgAwIBAgIUYkiKUWCN3WxGWg/xeAf5vz2/po0wCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyMzEzNDE1OFoYDzIxMjYxMDMw
MTM0MTU4WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARS0Ne9//KVYCEgF3GFJBKG6/Ezrr7PcoYByt+6/oqwne3vGcnksf2Y
TbYL62Z4sphxstItv8uThFh56MrQA4Eko1MwUTAdBgNVHQ4EFgQUNaF4h3U6PAM5
8oO3JDGrxPllLMkwHwYDVR0jBBgwFoAUNaF4h3U6PAM58oO3JDGrxPllLMkwDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEA7M/2mG6wMzI5CGT2nyZ7
Fq2YFM0BeQid8QU88VgibggCIQDzyY74sFQrzm0/MlPRO2hq6pUjCNQyvGYOVHZA
YvzSSg==
-----END CERTIFICATE-----
";
const MOCK_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgwzbBg9E944jvCLqN
8FDSkST5tG3IY7+Bagjf1vHLmB6hRANCAARS0Ne9//KVYCEgF3GFJBKG6/Ezrr7P
coYByt+6/oqwne3vGcnksf2YTbYL62Z4sphxstItv8uThFh56MrQA4Ek
-----END PRIVATE KEY-----
";

/// A mock SQL Server on 127.0.0.1:0 (no TLS), stopped when dropped.
struct Mock {
    port: u16,
    registry: std::sync::Arc<tokio::sync::Mutex<QueryRegistry>>,
    connections: std::sync::Arc<tokio::sync::Mutex<mssql_mock_tds::ConnectionStore>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Mock {
    async fn start() -> Mock {
        Self::serve(MockTdsServer::new("127.0.0.1:0").await.expect("mock TDS server"))
    }

    async fn start_with_tls() -> Mock {
        let identity =
            mssql_mock_tds::create_test_identity(MOCK_CERT.as_bytes(), MOCK_KEY.as_bytes()).expect("test identity");
        let server = MockTdsServer::new_with_tls("127.0.0.1:0", Some(identity))
            .await
            .expect("mock TDS server");
        Self::serve(server)
    }

    fn serve(server: MockTdsServer) -> Mock {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let mock = Mock {
            port: server.local_addr().port(),
            registry: server.query_registry(),
            connections: server.connection_store(),
            _stop: stop,
        };
        tokio::spawn(server.run_with_shutdown(stopped));
        mock
    }

    /// Answers statements containing `sql` (upper case: the mock matches the
    /// upper-cased text inside the request).
    async fn answer(&self, sql: &str, response: QueryResponse) {
        self.registry.lock().await.register(sql, response);
    }

    async fn connections(&self) -> usize {
        self.connections.lock().await.count()
    }

    /// One tenant `mock` with a source `db` on this server, whose pool has
    /// one connection (so that replaced connections show in the count).
    fn config(&self, limits: &str, extra: &str, pool: &str) -> String {
        let source = format!(
            "[tenants.mock.sources.db]\nengine = \"mssql\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"sa\"\n\
             database = \"weirdb\"\n{extra}\n[tenants.mock.sources.db.pool]\nmax_size = 1\n{pool}\n",
            self.port
        );
        tenant("mock", limits, &source)
    }
}

/// A server on `mock` (which answers `SELECT 1`), its one pooled
/// connection made; and how many connections the mock has taken so far.
async fn serving(mock: &Mock) -> (TestServer, weir_client::WeirClient, usize) {
    let server = TestServer::start(&mock.config("", "", "")).await;
    let client = server.client("key-mock").await;
    client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect("a first connection");
    let connections = mock.connections().await;
    (server, client, connections)
}

fn int_column(name: &str, value: i32) -> QueryResponse {
    QueryResponse::new(
        vec![ColumnDefinition::new(name, SqlDataType::Int)],
        vec![MockRow::new(vec![ColumnValue::Int(value)])],
    )
}

#[tokio::test]
async fn mock_serves_select_one_and_test_connection() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    let version = ["16.0.4135.4", "Developer Edition (64-bit)", "weirdb", "sa"];
    mock.answer(
        // The version query of TestConnection.
        "SERVERPROPERTY(",
        QueryResponse::new(
            ["version", "edition", "db", "who"]
                .map(|n| ColumnDefinition::new(n, SqlDataType::NVarChar))
                .to_vec(),
            vec![MockRow::new(version.map(|v| ColumnValue::NVarChar(v.into())).to_vec())],
        ),
    )
    .await;
    let server = TestServer::start(&mock.config("", "", "")).await;
    let client = server.client("key-mock").await;

    let r = client.execute("db", "SELECT 1", vec![]).await.expect("SELECT 1");
    assert_eq!(r.rows.len(), 1);
    assert_eq!(int(&r.rows[0].values[0]), 1);
    let column = &r.columns[0];
    assert_eq!((column.name.as_str(), column.native_type.as_str()), ("one", "int"));
    assert_eq!(column.r#type, pb::ColumnType::Int as i32);
    assert_eq!(
        r.stats.and_then(|s| s.rows_affected),
        None,
        "a result set reports no rows affected"
    );

    let ping = client.test_connection("db").await.expect("test connection");
    assert_eq!(ping.engine, pb::Engine::Mssql as i32);
    assert_eq!(ping.server_version, "SQL Server 16.0.4135.4 Developer Edition (64-bit)");
    assert_eq!((ping.database.as_str(), ping.user.as_str()), ("weirdb", "sa"));
    let sources = client.list_sources().await.expect("sources");
    assert_eq!(sources[0].engine, pb::Engine::Mssql as i32);

    let logins = mock
        .connections
        .lock()
        .await
        .all()
        .values()
        .cloned()
        .collect::<Vec<_>>();
    assert!(!logins.is_empty() && logins.iter().all(|c| c.authenticated));
    assert!(logins.iter().all(|c| c.received_database.as_deref() == Some("weirdb")));
    server.stop().await;
}

#[tokio::test]
async fn mock_results_read_as_arrow_hold_the_rows() {
    // SQL Server's values, decoded from TDS by tiberius, through the Arrow
    // result format: the same cells as the rows format, NULLs included. (The
    // mock finds statements sent as RPCs by their upper-cased text.)
    let mock = Mock::start().await;
    let columns = vec![
        ColumnDefinition::new("tiny", SqlDataType::TinyInt),
        ColumnDefinition::new("small", SqlDataType::SmallInt),
        ColumnDefinition::new("n", SqlDataType::Int),
        ColumnDefinition::new("big", SqlDataType::BigInt),
        ColumnDefinition::new("name", SqlDataType::NVarChar),
    ];
    let row = |i: i32| {
        MockRow::new(vec![
            ColumnValue::TinyInt(i as u8),
            ColumnValue::SmallInt(-(i as i16)),
            ColumnValue::Int(i * 1000),
            ColumnValue::BigInt(i64::from(i) << 40),
            ColumnValue::NVarChar(format!("näme {i}")),
        ])
    };
    // The mock writes NULL as an IntN's: only the integer columns can carry one.
    let nulls = MockRow::new(vec![
        ColumnValue::Null,
        ColumnValue::Null,
        ColumnValue::Null,
        ColumnValue::Null,
        ColumnValue::NVarChar(String::new()),
    ]);
    mock.answer(
        "SELECT * FROM SHAPES",
        QueryResponse::new(columns, vec![row(1), nulls, row(2)]),
    )
    .await;
    let server = TestServer::start(&mock.config("", "", "")).await;
    let client = server.client("key-mock").await;
    let rows = client
        .execute("db", "SELECT * FROM SHAPES", vec![])
        .await
        .expect("rows");
    let mut stream = client
        .execute_stream_arrow("db", "SELECT * FROM SHAPES", vec![])
        .await
        .expect("arrow");
    let mut batches = Vec::new();
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        batches.push(batch);
    }
    assert_eq!(rows.rows.len(), 3, "{:?}", rows.columns);
    assert_arrow_holds_rows(&batches, &rows.rows);
    assert_eq!(stream.stats().map(|s| s.rows_returned), Some(3));
    server.stop().await;
}

#[tokio::test]
async fn mock_errors_keep_their_numbers_and_the_connection() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    let errors = [
        ("SELECT * FROM WEIR_MISSING", 208, Code::NotFound),
        ("INSERT INTO WEIR_DUP", 2627, Code::AlreadyExists),
        ("SELECT 7/0 AS WEIR_ZERO", 8134, Code::InvalidArgument),
        ("UPDATE WEIR_LOCKED", 1205, Code::Aborted),
    ];
    for (sql, number, _) in errors {
        let error = TerminalError::new(number, 16, format!("error {number} from the mock"));
        mock.answer(sql, QueryResponse::error_only(error)).await;
    }
    // After a failed statement Weir asks whether it left a transaction open.
    mock.answer("SELECT @@TRANCOUNT", int_column("n", 0)).await;
    let server = TestServer::start(&mock.config("", "", "")).await;
    let client = server.client("key-mock").await;
    for (sql, number, code) in errors {
        let err = client.execute("db", sql, vec![]).await.expect_err(sql);
        assert_eq!(
            (err.code(), engine_code(&err)),
            (code, number.to_string()),
            "{sql}: {}",
            err.message()
        );
        assert!(err.message().contains(&format!("error {number} from the mock")));
    }
    // Errors end their response: the one pooled connection serves on.
    let r = client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect("SELECT 1 after errors");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    assert_eq!(mock.connections().await, 1, "no connection was replaced");

    // Placeholders and parameters must agree before anything is sent.
    let err = client
        .execute("db", "SELECT @P1 + @P2", vec![1i64.into()])
        .await
        .expect_err("missing parameter");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("2 parameter"), "{}", err.message());
    let interval = pb::Value {
        kind: Some(Kind::IntervalValue(pb::Interval {
            months: 1,
            days: 0,
            microseconds: 0,
        })),
    };
    let err = client
        .execute("db", "SELECT @P1", vec![interval])
        .await
        .expect_err("interval parameter");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "INVALID_PARAMETER")
    );
    server.stop().await;
}

#[tokio::test]
async fn mock_reports_rows_affected_of_statements_without_results() {
    let mock = Mock::start().await;
    // Asked after a statement that returned no result set.
    mock.answer(
        "SELECT ROWCOUNT_BIG()",
        QueryResponse::new(
            vec![ColumnDefinition::new("", SqlDataType::BigInt)],
            vec![MockRow::new(vec![ColumnValue::BigInt(3)])],
        ),
    )
    .await;
    let server = TestServer::start(&mock.config("", "", "")).await;
    let client = server.client("key-mock").await;
    let r = client
        .execute("db", "UPDATE weir_t SET x = @P1", vec![7i64.into()])
        .await
        .expect("update");
    assert!(r.columns.is_empty() && r.rows.is_empty());
    assert_eq!(r.stats.and_then(|s| s.rows_affected), Some(3));
    server.stop().await;
}

#[tokio::test]
async fn mock_abandoned_statements_close_their_connection() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    mock.answer(
        "WAITFOR DELAY",
        int_column("late", 2).with_delay(Duration::from_secs(30)),
    )
    .await;
    let server = TestServer::start(&mock.config("statement_timeout = \"300ms\"", "", "")).await;
    let client = server.client("key-mock").await;
    client.execute("db", "SELECT 1", vec![]).await.expect("warm the pool");
    assert_eq!(mock.connections().await, 1);

    let started = Instant::now();
    let err = client
        .execute("db", "WAITFOR DELAY '00:00:30'; SELECT 2 AS late", vec![])
        .await
        .expect_err("times out");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::DeadlineExceeded, "STATEMENT_TIMEOUT")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The connection with the unfinished request was closed, not reused: the
    // next statement logs in again on the pool's only slot.
    let r = client.execute("db", "SELECT 1", vec![]).await.expect("pool serves");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    assert_eq!(mock.connections().await, 2);

    // Inside a transaction the same closes the transaction's connection.
    let tx = client
        .begin("db", IsolationLevel::Serializable, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "db", "WAITFOR DELAY '00:00:30'; SELECT 2 AS late", vec![])
        .await
        .expect_err("times out");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    let err = client
        .execute_in(&tx, "db", "SELECT 1", vec![])
        .await
        .expect_err("the transaction is gone");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Aborted, "TRANSACTION_LOST"),
        "{}",
        err.message()
    );
    client
        .rollback(&tx)
        .await
        .expect("rolling back a closed transaction succeeds");
    server.stop().await;
}

/// After a failed statement the handle asks SQL Server whether the
/// transaction is still open (@@TRANCOUNT): an error that undid only its
/// statement leaves it usable; a deadlock victim's is gone, and the handle
/// says so rather than running later statements on their own.
#[tokio::test]
async fn a_transaction_sql_server_ended_takes_no_more_statements() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    let error = |number, text: &str| QueryResponse::error_only(TerminalError::new(number, 13, text.to_string()));
    mock.answer("INSERT INTO WEIR_DUP_TX", error(2627, "duplicate key"))
        .await;
    mock.answer("UPDATE WEIR_DEADLOCKED", error(1205, "Transaction was deadlocked"))
        .await;
    mock.answer("SELECT @@TRANCOUNT", int_column("n", 1)).await;
    let server = TestServer::start(&mock.config("", "", "")).await;
    let client = server.client("key-mock").await;

    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "db", "INSERT INTO WEIR_DUP_TX", vec![])
        .await
        .expect_err("duplicate");
    assert_eq!(err.code(), Code::AlreadyExists);
    client
        .execute_in(&tx, "db", "SELECT 1", vec![])
        .await
        .expect("the transaction goes on");
    client.commit(&tx).await.expect("commit");

    mock.answer("SELECT @@TRANCOUNT", int_column("n", 0)).await;
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "db", "UPDATE WEIR_DEADLOCKED", vec![])
        .await
        .expect_err("deadlock");
    assert_eq!((err.code(), engine_code(&err).as_str()), (Code::Aborted, "1205"));
    assert_transaction_lost(&client, &tx, "db", "SELECT 1").await;
    assert_serves(&client, "db", 2).await;

    // A lock timeout leaves SQL Server's transaction open, with its locks;
    // ABORTED tells the caller to run it all again, so Weir ends it.
    mock.answer("SELECT @@TRANCOUNT", int_column("n", 1)).await;
    mock.answer(
        "UPDATE WEIR_LOCK_TIMEOUT",
        error(1222, "Lock request time out period exceeded"),
    )
    .await;
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "db", "UPDATE WEIR_LOCK_TIMEOUT", vec![])
        .await
        .expect_err("lock timeout");
    assert_eq!((err.code(), engine_code(&err).as_str()), (Code::Aborted, "1222"));
    assert_transaction_lost(&client, &tx, "db", "SELECT 1").await;
    assert_serves(&client, "db", 2).await;
    server.stop().await;
}

#[tokio::test]
async fn mock_a_failed_statement_leaves_no_transaction_open_on_the_pool() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    // SQL Server reports a batch's first error only: `BEGIN TRAN; INSERT`
    // whose INSERT failed says nothing of the transaction it left open.
    let fk = QueryResponse::error_only(TerminalError::new(547, 16, "FOREIGN KEY conflict".to_string()));
    mock.answer("BEGIN TRAN; INSERT INTO WEIR_FK", fk.clone()).await;
    mock.answer("INSERT INTO WEIR_FK; BEGIN TRAN", fk).await;
    mock.answer("SELECT @@TRANCOUNT", int_column("n", 0)).await;
    let (server, client, before) = serving(&mock).await;
    let err = client
        .execute("db", "BEGIN TRAN; INSERT INTO WEIR_FK", vec![])
        .await
        .expect_err("fk");
    assert_eq!(err.code(), Code::FailedPrecondition);
    client.execute("db", "SELECT 1", vec![]).await.expect("served");
    assert_eq!(
        mock.connections().await,
        before,
        "no transaction left: the connection is kept"
    );
    mock.answer("SELECT @@TRANCOUNT", int_column("n", 1)).await;
    client
        .execute("db", "BEGIN TRAN; INSERT INTO WEIR_FK", vec![])
        .await
        .expect_err("fk");
    client.execute("db", "SELECT 1", vec![]).await.expect("served");
    assert_eq!(
        mock.connections().await,
        before + 1,
        "the connection left inside a transaction was closed, not pooled"
    );
    // In a transaction, a statement that nested another one fails the handle:
    // its COMMIT would leave the work uncommitted.
    mock.answer("SELECT @@TRANCOUNT", int_column("n", 2)).await;
    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    let err = client
        .execute_in(&tx, "db", "INSERT INTO WEIR_FK; BEGIN TRAN", vec![])
        .await
        .expect_err("fk");
    // Its own code (a retry would fail the same way), saying the
    // transaction went with the connection.
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(error_metadata(&err, "transaction_lost"), "true", "{err:?}");
    assert_eq!(engine_code(&err), "547");
    assert_transaction_lost(&client, &tx, "db", "SELECT 1").await;
    server.stop().await;
}

/// A statement that commits or rolls back its transaction itself (a
/// procedure's COMMIT: error 266, and no transaction left) is not reported
/// as rolled back, which a client would answer by running the work again:
/// which of the two it did cannot be told, and the handle says so to every
/// later call. The session, out of any transaction, is kept.
#[tokio::test]
async fn mock_a_statement_that_ends_its_transaction_is_not_reported_rolled_back() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    let mismatch = TerminalError::new(
        266,
        16,
        "Transaction count after EXECUTE indicates a mismatching number of BEGIN and COMMIT statements. \
         Previous count = 1, current count = 0."
            .to_string(),
    );
    mock.answer("EXEC DBO.WEIR_COMMITS", QueryResponse::error_only(mismatch))
        .await;
    mock.answer("SELECT @@TRANCOUNT", int_column("n", 0)).await;
    let (server, client, connections) = serving(&mock).await;
    let ended = |err: &tonic::Status| {
        assert_eq!(
            (err.code(), reason(err).as_str()),
            (Code::FailedPrecondition, "TRANSACTION_ENDED_BY_STATEMENT"),
            "{}",
            err.message()
        );
        assert!(!err.message().contains("was rolled back"), "{}", err.message());
    };
    // Seen as an error the mock answers that exact batch with: the session
    // leaves a serializable transaction set back to READ COMMITTED.
    mock.answer(
        "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION; SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
        QueryResponse::error_only(TerminalError::new(50001, 16, "reset seen".to_string())),
    )
    .await;
    for (end_with_commit, isolation) in [
        (true, IsolationLevel::Unspecified),
        (false, IsolationLevel::Serializable),
    ] {
        let tx = client.begin("db", isolation, false).await.expect("begin");
        let err = client
            .execute_in(&tx, "db", "EXEC DBO.WEIR_COMMITS", vec![])
            .await
            .expect_err("the transaction ended");
        ended(&err);
        assert_eq!(error_metadata(&err, "transaction_lost"), "", "{err:?}");
        ended(
            &client
                .execute_in(&tx, "db", "SELECT 1", vec![])
                .await
                .expect_err("ended"),
        );
        let end = if end_with_commit {
            client.commit(&tx).await
        } else {
            client.rollback(&tx).await
        };
        ended(&end.expect_err("ended"));
    }
    // The default level's session was kept; the serializable one, whose
    // reset failed (here), was closed rather than pooled at that level.
    client.execute("db", "SELECT 1", vec![]).await.expect("the pool serves");
    assert_eq!(mock.connections().await, connections + 1);
    server.stop().await;
}

#[tokio::test]
async fn mock_transactions_and_read_only_sources() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    let server = TestServer::start(&mock.config("", "", "")).await;
    let client = server.client("key-mock").await;
    let tx = client
        .begin("db", IsolationLevel::RepeatableRead, false)
        .await
        .expect("begin");
    let r = client
        .execute_in(&tx, "db", "SELECT 1", vec![])
        .await
        .expect("in transaction");
    assert_eq!(int(&r.rows[0].values[0]), 1);
    client.commit(&tx).await.expect("commit");
    let err = client
        .begin("db", IsolationLevel::Unspecified, true)
        .await
        .expect_err("read-only transactions");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("read-only"), "{}", err.message());

    // What the server is sent: the level with BEGIN, and its reset with COMMIT
    // (seen here as errors the mock answers those exact batches with).
    let seen = |what: &str| QueryResponse::error_only(TerminalError::new(50001, 16, format!("{what} seen")));
    let begin = "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN TRANSACTION";
    mock.answer(begin, seen("begin")).await;
    mock.answer(
        "COMMIT TRANSACTION; SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
        seen("commit"),
    )
    .await;
    let err = client
        .begin("db", IsolationLevel::Serializable, false)
        .await
        .expect_err("begin answered with an error");
    assert_eq!(
        (err.code(), err.message()),
        (Code::FailedPrecondition, "begin seen (engine code 50001)")
    );
    let tx = client
        .begin("db", IsolationLevel::ReadUncommitted, false)
        .await
        .expect("begin");
    let err = client.commit(&tx).await.expect_err("commit answered with an error");
    assert_eq!(err.message(), "commit seen (engine code 50001)");
    let connections = mock.connections().await;
    // A transaction that did not end cleanly does not go back to the pool.
    client.execute("db", "SELECT 1", vec![]).await.expect("pool serves");
    assert_eq!(mock.connections().await, connections + 1);
    server.stop().await;

    // A read-only source cannot be honoured by SQL Server: the gateway refuses to start.
    let config = weir_server::Config::from_toml(&mock.config("", "read_only = true", "")).expect("valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let listeners = weir_server::Listeners {
        grpc: listener,
        metrics: None,
    };
    let err = weir_server::run(config, listeners, std::future::pending())
        .await
        .expect_err("refused");
    assert!(format!("{err:#}").contains("db_datareader"), "{err:#}");
}

#[tokio::test]
async fn mock_without_tls_is_refused_when_tls_is_required() {
    let mock = Mock::start().await;
    mock.answer("SELECT 1", int_column("one", 1)).await;
    let config = mock.config(
        "",
        "tls = true\ntrust_server_certificate = true",
        "connect_timeout = \"1s\"",
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-mock").await;
    let err = client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect_err("no plaintext fallback");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn handshakes_the_driver_cannot_complete_do_not_cost_pool_slots() {
    // tiberius panics on this server's TLS handshake; the pool (one slot)
    // must report it and stay usable rather than wait for a lost connection.
    // A lost slot would hold the second call for the whole acquire timeout,
    // set far above the bound so that a slow machine cannot blur the two.
    let mock = Mock::start_with_tls().await;
    let server = TestServer::start(&mock.config(
        "",
        "tls = true\ntrust_server_certificate = true",
        "acquire_timeout = \"60s\"",
    ))
    .await;
    let client = server.client("key-mock").await;
    for _ in 0..2 {
        let started = Instant::now();
        let err = client
            .execute("db", "SELECT 1", vec![])
            .await
            .expect_err("handshake fails");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        assert!(err.message().contains("handshake"), "{}", err.message());
        assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    }
    server.stop().await;
}

#[tokio::test]
async fn unreachable_servers_are_unavailable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    // The acquire timeout far above the bound: a refused connection must
    // fail the call at once, not after a wait for a free connection.
    let source = format!(
        "[tenants.mock.sources.db]\nengine = \"mssql\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"sa\"\n\
         [tenants.mock.sources.db.pool]\nacquire_timeout = \"60s\"\n"
    );
    let server = TestServer::start(&tenant("mock", "", &source)).await;
    let client = server.client("key-mock").await;
    let started = Instant::now();
    let err = client.test_connection("db").await.expect_err("nothing listens");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no wait for the acquire timeout: {:?}",
        started.elapsed()
    );
    server.stop().await;
}

// ---- live SQL Server ----

/// The source section for the server in WEIR_TEST_MSSQL_URL.
struct Live {
    server: TestServer,
    client: WeirClient,
}

impl Live {
    async fn new(limits: &str, extra: &str) -> Live {
        let server = TestServer::start(&tenant("live", limits, &mssql_live("live", "db", extra))).await;
        let client = server.client("key-live").await;
        Live { server, client }
    }

    async fn run(&self, sql: &str) -> pb::ExecuteResponse {
        self.client
            .execute("db", sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
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
}

fn value(kind: Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

fn timestamp(seconds: i64, nanos: i32) -> Kind {
    Kind::TimestampValue(prost_types::Timestamp { seconds, nanos })
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn live_types_round_trip() {
    let live = Live::new("", "").await;
    live.recreate(
        &["weir_ms_types"],
        &[
            "CREATE TABLE weir_ms_types (id int PRIMARY KEY, b bit, ti tinyint, si smallint, i int, bi bigint, \
           d decimal(38,10), n numeric(10,2), m money, sm smallmoney, r real, f float, c char(3), vc varchar(50), \
           nc nchar(3), nv nvarchar(max), vmax varchar(max), bin binary(3), vb varbinary(max), dt date, tm time(7), \
           dtm datetime, dt2 datetime2(7), sdt smalldatetime, dto datetimeoffset(7), u uniqueidentifier, x xml)",
        ],
    )
    .await;
    let placeholders: Vec<_> = (1..=27).map(|i| format!("@P{i}")).collect();
    let insert = format!("INSERT INTO weir_ms_types VALUES ({})", placeholders.join(", "));
    let long_text = "héllo ✓ ".repeat(700); // more than 4000 characters: nvarchar(max)
    let long_bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let day = pb::Date {
        year: 2024,
        month: 2,
        day: 29,
    };
    let time = pb::TimeOfDay {
        hours: 23,
        minutes: 59,
        seconds: 59,
        nanos: 123_456_700,
        utc_offset_seconds: None,
    };
    // 2024-01-02 03:04:05 UTC
    let at = 1_704_164_645;
    let params = vec![
        1i64.into(),
        true.into(),
        255i64.into(),
        (-32768i64).into(),
        i64::from(i32::MIN).into(),
        (-9_007_199_254_740_993i64).into(),
        value(Kind::DecimalValue("-123456789012345678901234567.0123456789".into())),
        value(Kind::DecimalValue("12.34".into())),
        value(Kind::DecimalValue("123456789.1234".into())),
        value(Kind::DecimalValue("-214748.3648".into())),
        1.5f64.into(),
        2.25f64.into(),
        "abc".into(),
        "héllo".into(),
        "✓ok".into(),
        long_text.as_str().into(),
        "x".repeat(9000).as_str().into(),
        vec![0u8, 1, 255].into(),
        long_bytes.clone().into(),
        value(Kind::DateValue(day)),
        value(Kind::TimeValue(time)),
        value(timestamp(at, 123_000_000)),
        value(timestamp(at, 123_456_700)),
        value(timestamp(at - 5, 0)),
        value(timestamp(at, 123_456_700)),
        value(Kind::UuidValue(uuid.into())),
        "<a>1</a>".into(),
    ];
    let r = live.client.execute("db", &insert, params).await.expect("insert");
    assert_eq!(r.stats.and_then(|s| s.rows_affected), Some(1));
    // NULL parameters convert to every non-binary type; binary ones need a CAST.
    let nulls = (0..5).map(|_| pb::Value::null()).collect::<Vec<_>>();
    live.client
        .execute(
            "db",
            "INSERT INTO weir_ms_types (id, i, d, dt, u, x, vb) VALUES (2, @P1, @P2, @P3, @P4, @P5, CAST(NULL AS varbinary(max)))",
            nulls,
        )
        .await
        .expect("insert NULLs");

    let r = live.run("SELECT * FROM weir_ms_types ORDER BY id").await;
    let v: Vec<_> = r.rows[0].values.iter().map(|v| v.kind.clone().expect("kind")).collect();
    let expected = [
        Kind::Int64Value(1),
        Kind::BoolValue(true),
        Kind::Int64Value(255),
        Kind::Int64Value(-32768),
        Kind::Int64Value(i64::from(i32::MIN)),
        Kind::Int64Value(-9_007_199_254_740_993),
        Kind::DecimalValue("-123456789012345678901234567.0123456789".into()),
        Kind::DecimalValue("12.34".into()),
        Kind::DecimalValue("123456789.1234".into()),
        Kind::DecimalValue("-214748.3648".into()),
        Kind::DoubleValue(1.5),
        Kind::DoubleValue(2.25),
        Kind::StringValue("abc".into()),
        Kind::StringValue("héllo".into()),
        Kind::StringValue("✓ok".into()),
        Kind::StringValue(long_text.clone()),
        Kind::StringValue("x".repeat(9000)),
        Kind::BytesValue(vec![0, 1, 255]),
        Kind::BytesValue(long_bytes),
        Kind::DateValue(day),
        Kind::TimeValue(time),
        // datetime keeps 1/300 s: .123 is stored as 37/300 s.
        timestamp(at, 123_333_333),
        timestamp(at, 123_456_700),
        timestamp(at - 5, 0),
        timestamp(at, 123_456_700),
        Kind::UuidValue(uuid.into()),
        Kind::StringValue("<a>1</a>".into()),
    ];
    for (i, (got, want)) in v.iter().zip(expected.iter()).enumerate() {
        assert_eq!(got, want, "column {}", r.columns[i].name);
    }
    assert!(r.rows[1].values[1..].iter().all(is_null), "NULLs stay NULL");
    use pb::ColumnType as T;
    let types: Vec<_> = r
        .columns
        .iter()
        .map(|c| pb::ColumnType::try_from(c.r#type).expect("known"))
        .collect();
    assert_eq!(
        types,
        [
            T::Int,
            T::Bool,
            T::Int,
            T::Int,
            T::Int,
            T::Int,
            T::Decimal,
            T::Decimal,
            T::Decimal,
            T::Decimal,
            T::Float,
            T::Float,
            T::String,
            T::String,
            T::String,
            T::String,
            T::String,
            T::Bytes,
            T::Bytes,
            T::Date,
            T::Time,
            T::Timestamp,
            T::Timestamp,
            T::Timestamp,
            T::TimestampTz,
            T::Uuid,
            T::String
        ]
    );

    // Values computed by the server: money exact, datetimeoffset as its UTC instant.
    let r = live
        .run(
            "SELECT CAST(922337.2037 AS money) AS m, CAST(-0.0001 AS smallmoney) AS sm, \
             CAST('2024-01-02T03:04:05.1234567+02:00' AS datetimeoffset) AS dto, CAST(0.5 AS decimal(38,37)) AS d, \
             CAST('1753-01-01' AS datetime) AS old, NULL AS nothing",
        )
        .await;
    let v: Vec<_> = r.rows[0].values.iter().map(|v| v.kind.clone().expect("kind")).collect();
    assert_eq!(v[0], Kind::DecimalValue("922337.2037".into()));
    assert_eq!(v[1], Kind::DecimalValue("-0.0001".into()));
    assert_eq!(v[2], timestamp(at - 7200, 123_456_700));
    assert_eq!(v[3], Kind::DecimalValue(format!("0.5{}", "0".repeat(36))));
    assert_eq!(v[4], timestamp(-6_847_804_800, 0));
    assert!(is_null(&r.rows[0].values[5]));
    assert_eq!(r.columns[0].native_type, "money");

    let r = live.run("UPDATE weir_ms_types SET i = 5").await;
    assert_eq!(r.stats.and_then(|s| s.rows_affected), Some(2));
    live.server.stop().await;
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn live_parameter_markers_are_counted_outside_literals() {
    // Binding in general is in the conformance suite; these are SQL Server's own cases.
    let live = Live::new("", "").await;
    let err = live
        .client
        .execute("db", "SELECT 1", vec![1i64.into()])
        .await
        .expect_err("unused parameter");
    assert_eq!(err.code(), Code::InvalidArgument);
    let r = live
        .client
        .execute("db", "SELECT '@P9' AS literal, @P1 AS p", vec![7i64.into()])
        .await
        .expect("placeholders in literals are text");
    assert_eq!(text(&r.rows[0].values[0]), "@P9");
    live.server.stop().await;
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn live_transactions_commit_roll_back_and_isolate() {
    // One connection: the isolation level must be reset before it is reused.
    let live = Live::new("", "[tenants.live.sources.db.pool]\nmax_size = 1").await;
    live.recreate(
        &["weir_ms_tx"],
        &["CREATE TABLE weir_ms_tx (id int PRIMARY KEY, note varchar(20))"],
    )
    .await;
    let client = &live.client;
    let insert = "INSERT INTO weir_ms_tx VALUES (@P1, @P2)";
    let count = "SELECT COUNT(*) FROM weir_ms_tx";
    let level = "SELECT CAST(transaction_isolation_level AS int) FROM sys.dm_exec_sessions WHERE session_id = @@SPID";

    let tx = client
        .begin("db", IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", insert, vec![1i64.into(), "gone".into()])
        .await
        .expect("insert");
    let inside = client.execute_in(&tx, "db", count, vec![]).await.expect("count");
    assert_eq!(int(&inside.rows[0].values[0]), 1, "a transaction sees its own writes");
    client.rollback(&tx).await.expect("rollback");
    assert_eq!(int(&live.run(count).await.rows[0].values[0]), 0, "rolled back");

    let levels = [
        (IsolationLevel::ReadUncommitted, 1),
        (IsolationLevel::ReadCommitted, 2),
        (IsolationLevel::RepeatableRead, 3),
        (IsolationLevel::Serializable, 4),
    ];
    for (i, (isolation, expected)) in levels.into_iter().enumerate() {
        let tx = client.begin("db", isolation, false).await.expect("begin");
        let r = client.execute_in(&tx, "db", level, vec![]).await.expect("level");
        assert_eq!(int(&r.rows[0].values[0]), expected, "{isolation:?}");
        client
            .execute_in(&tx, "db", insert, vec![(i as i64 + 10).into(), "kept".into()])
            .await
            .expect("insert");
        // A failed statement leaves the transaction open.
        let err = client
            .execute_in(&tx, "db", insert, vec![(i as i64 + 10).into(), "dup".into()])
            .await
            .expect_err("duplicate");
        assert_eq!(
            (err.code(), engine_code(&err)),
            (Code::AlreadyExists, "2627".to_string())
        );
        client.commit(&tx).await.expect("commit");
        assert_eq!(
            int(&live.run(level).await.rows[0].values[0]),
            2,
            "read committed again after {isolation:?}"
        );
        assert_eq!(
            client.commit(&tx).await.expect_err("spent handle").code(),
            Code::NotFound
        );
    }
    assert_eq!(int(&live.run(count).await.rows[0].values[0]), 4, "committed");

    let err = client
        .begin("db", IsolationLevel::Unspecified, true)
        .await
        .expect_err("read-only");
    assert_eq!(err.code(), Code::InvalidArgument);
    // A statement that leaves a transaction open is an error, and its connection is not reused.
    let err = live.fail("BEGIN TRANSACTION").await;
    assert_eq!(engine_code(&err), "266", "{}", err.message());
    assert_eq!(int(&live.run("SELECT @@TRANCOUNT").await.rows[0].values[0]), 0);
    live.server.stop().await;
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn live_errors_map_with_their_numbers() {
    let live = Live::new("", "").await;
    live.recreate(
        &["weir_ms_child", "weir_ms_unique"],
        &[
            "CREATE TABLE weir_ms_unique (id int PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO weir_ms_unique VALUES (1, 1)",
            "CREATE TABLE weir_ms_child (id int PRIMARY KEY, parent int REFERENCES weir_ms_unique (id))",
        ],
    )
    .await;
    let cases = [
        ("SELECT FROM weir_ms_unique", Code::InvalidArgument, "156"),
        ("SELECT 1 +", Code::InvalidArgument, "102"),
        ("SELECT * FROM weir_ms_missing", Code::NotFound, "208"),
        ("INSERT INTO weir_ms_unique VALUES (1, 1)", Code::AlreadyExists, "2627"),
        (
            "INSERT INTO weir_ms_unique VALUES (2, NULL)",
            Code::FailedPrecondition,
            "515",
        ),
        (
            "INSERT INTO weir_ms_child VALUES (1, 99)",
            Code::FailedPrecondition,
            "547",
        ),
        ("SELECT 1 / 0", Code::InvalidArgument, "8134"),
        ("SELECT CAST('x' AS int)", Code::InvalidArgument, "245"),
        (
            "RAISERROR('a rule of the application', 16, 1)",
            Code::FailedPrecondition,
            "50000",
        ),
    ];
    for (sql, code, number) in cases {
        let err = live.fail(sql).await;
        assert_eq!(
            (err.code(), engine_code(&err)),
            (code, number.to_string()),
            "{sql}: {}",
            err.message()
        );
    }
    for _ in 0..4 {
        assert_eq!(int(&live.run("SELECT 1").await.rows[0].values[0]), 1);
    }
    live.server.stop().await;
}

#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn live_schema_is_listed_and_described() {
    let live = Live::new("", "").await;
    live.run("DROP VIEW IF EXISTS weir_ms_view").await;
    live.recreate(
        &["weir_ms_kid", "weir_ms_parent"],
        &[
            "CREATE TABLE weir_ms_parent (id int PRIMARY KEY, name nvarchar(20) NOT NULL, amount decimal(10,2))",
            "INSERT INTO weir_ms_parent VALUES (1, N'a', 1.5), (2, N'b', NULL), (3, N'c', 2)",
            "CREATE TABLE weir_ms_kid (id int CONSTRAINT weir_ms_kid_pk PRIMARY KEY, parent_id int NOT NULL, \
             note nvarchar(20) DEFAULT N'none', CONSTRAINT weir_ms_kid_fk FOREIGN KEY (parent_id) \
             REFERENCES weir_ms_parent (id) ON DELETE CASCADE)",
            "CREATE INDEX weir_ms_kid_note ON weir_ms_kid (note)",
            "CREATE VIEW weir_ms_view AS SELECT id FROM weir_ms_parent",
        ],
    )
    .await;
    let client = &live.client;
    let ping = client.test_connection("db").await.expect("ping");
    assert!(
        ping.server_version.starts_with("SQL Server "),
        "{}",
        ping.server_version
    );
    assert!(!ping.user.is_empty() && !ping.database.is_empty());

    let schemas = client.list_schemas("db").await.expect("schemas");
    assert!(schemas.iter().any(|s| s.name == "dbo"));
    assert!(schemas
        .iter()
        .all(|s| !s.system && s.name != "sys" && s.name != "db_owner"));

    let tables = client.list_tables("db", "dbo").await.expect("tables");
    let find = |name: &str| {
        tables
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} listed"))
    };
    assert_eq!(find("weir_ms_parent").kind, pb::TableKind::Table as i32);
    assert_eq!(find("weir_ms_parent").row_estimate, Some(3));
    assert_eq!(find("weir_ms_view").kind, pb::TableKind::View as i32);
    assert_eq!(find("weir_ms_view").row_estimate, None);
    assert!(client
        .list_tables("db", "")
        .await
        .expect("all")
        .iter()
        .any(|t| t.name == "weir_ms_kid"));

    let d = client.describe_table("db", "", "weir_ms_kid").await.expect("describe");
    let columns: Vec<_> = d
        .columns
        .iter()
        .filter_map(|c| c.column.as_ref())
        .map(|c| (c.name.as_str(), c.native_type.as_str(), c.nullable))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", "int", false),
            ("parent_id", "int", false),
            ("note", "nvarchar(20)", true)
        ]
    );
    assert_eq!(d.columns[2].default_expression, "N'none'");
    assert_eq!(d.columns[2].column.as_ref().and_then(|c| c.max_length), Some(20));
    let pk = d.primary_key.expect("primary key");
    assert_eq!(
        (pk.name.as_str(), pk.columns.as_slice()),
        ("weir_ms_kid_pk", ["id".to_string()].as_slice())
    );
    assert_eq!(d.foreign_keys.len(), 1);
    let fk = &d.foreign_keys[0];
    assert_eq!(
        (fk.name.as_str(), fk.referenced_schema.as_str()),
        ("weir_ms_kid_fk", "dbo")
    );
    assert_eq!(
        (fk.referenced_table.as_str(), fk.on_delete.as_str()),
        ("weir_ms_parent", "CASCADE")
    );
    assert_eq!(
        (fk.columns.as_slice(), fk.referenced_columns.as_slice()),
        (["parent_id".to_string()].as_slice(), ["id".to_string()].as_slice())
    );
    assert!(d
        .indexes
        .iter()
        .any(|i| i.name == "weir_ms_kid_note" && i.columns == ["note"] && !i.unique && !i.primary));
    assert!(d
        .indexes
        .iter()
        .any(|i| i.name == "weir_ms_kid_pk" && i.primary && i.unique && i.method == "clustered"));

    let parent = client
        .describe_table("db", "dbo", "weir_ms_parent")
        .await
        .expect("describe");
    let amount = parent.columns[2].column.as_ref().expect("column");
    assert_eq!(
        (amount.r#type, amount.precision, amount.scale),
        (pb::ColumnType::Decimal as i32, Some(10), Some(2))
    );
    let err = client
        .describe_table("db", "", "weir_ms_missing")
        .await
        .expect_err("unknown table");
    assert_eq!(err.code(), Code::NotFound);

    // HIDDEN period columns are not among SELECT *'s columns: ordinal 0.
    live.recreate(
        &["weir_ms_periods"],
        &["CREATE TABLE weir_ms_periods (id int PRIMARY KEY, \
           valid_from datetime2 GENERATED ALWAYS AS ROW START HIDDEN NOT NULL, \
           valid_to datetime2 GENERATED ALWAYS AS ROW END HIDDEN NOT NULL, note nvarchar(10), \
           PERIOD FOR SYSTEM_TIME (valid_from, valid_to))"],
    )
    .await;
    let periods = client
        .describe_table("db", "dbo", "weir_ms_periods")
        .await
        .expect("describe");
    let ordinals: Vec<_> = periods
        .columns
        .iter()
        .map(|c| (c.column.as_ref().map_or("", |c| c.name.as_str()), c.ordinal))
        .collect();
    assert_eq!(ordinals, [("id", 1), ("valid_from", 0), ("valid_to", 0), ("note", 2)]);
    live.run("DROP TABLE weir_ms_periods").await;

    // IDENTITY takes a value only under IDENTITY_INSERT; computed columns
    // (persisted or not) never, and come with their definition.
    live.recreate(
        &["weir_ms_filled"],
        &["CREATE TABLE weir_ms_filled (id int IDENTITY(1,1) PRIMARY KEY, a int, \
           twice AS (a * 2), kept AS (a + 1) PERSISTED)"],
    )
    .await;
    let filled = client
        .describe_table("db", "dbo", "weir_ms_filled")
        .await
        .expect("describe");
    let generation: Vec<_> = filled
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
        generation,
        [
            ("id", G::IdentityAlways, ""),
            ("a", G::Unspecified, ""),
            ("twice", G::Computed, "[a]*(2)"),
            ("kept", G::Computed, "[a]+(1)"),
        ]
    );
    live.run("DROP TABLE weir_ms_filled").await;
    live.server.stop().await;
}

/// State a statement leaves on its session beyond its own batch (a
/// session-owned application lock, session context) does not reach the next
/// caller of the pooled connection: the session is closed, not pooled.
#[tokio::test]
#[ignore = "needs a SQL Server: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]
async fn live_session_state_does_not_reach_the_next_caller() {
    let live = Live::new("", "[tenants.live.sources.db.pool]\nmax_size = 1\n").await;
    live.run(
        "DECLARE @r int; EXEC @r = sp_getapplock @Resource = N'weir_live_lock', @LockMode = N'Exclusive', \
         @LockOwner = N'Session'; EXEC sys.sp_set_session_context N'weir_live', 1",
    )
    .await;
    let next = live
        .run(
            "SELECT APPLOCK_MODE(N'public', N'weir_live_lock', N'Session'), \
             CAST(ISNULL(SESSION_CONTEXT(N'weir_live'), 0) AS int)",
        )
        .await;
    let values: Vec<_> = next.rows[0].values.iter().map(|v| v.kind.clone()).collect();
    assert_eq!(
        values,
        [Some(Kind::StringValue("NoLock".into())), Some(Kind::Int64Value(0))]
    );
    live.server.stop().await;
}

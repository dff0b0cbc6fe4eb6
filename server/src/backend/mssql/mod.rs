//! Microsoft SQL Server (and Azure SQL) through tiberius and a bb8 pool. A
//! statement runs in a task that owns the connection and streams rows
//! through a bounded channel.
//!
//! tiberius 0.12 cannot send a TDS attention (cancel), so a statement the
//! caller abandons is stopped by closing its connection: the server ends the
//! request, and rolls back its transaction, when it sees the connection go.
//! A connection is marked broken from the moment a request is sent until
//! its response has been read to the end, and the pool closes broken
//! connections instead of reusing them.

mod bulk;
mod changes;
mod schema;
pub mod types;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bb8::PooledConnection;
use futures::{FutureExt, TryStreamExt};
use tiberius::{AuthMethod, Client, ColumnData, EncryptionLevel, Query, QueryItem};
use tokio::net::TcpStream;
use tokio::sync::OwnedMutexGuard;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use crate::backend::channel::{self, Worker};
use crate::backend::pool::FailFastPool;
use crate::backend::{
    BackendError, Capabilities, ChangeFeed, ConnectionInfo, Engine, EngineErrorKind, Isolation, LoadOutcome, LoadSpec,
    PoolStatus, QueryStream, RowFeed, RowSink, SchemaInfo, SqlSource, SqlTransaction, Statement, TableDescription,
    TableInfo, TablePage, TxOptions, WatchSpec,
};
use crate::config::SourceConfig;
use types::Param;

type TdsClient = Client<Compat<TcpStream>>;
type Conn = PooledConnection<'static, Manager>;

/// SQL Server keeps a transaction's isolation level for the session, so a
/// transaction that changed it puts the default back before the connection
/// returns to the pool.
const RESET_ISOLATION: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED";
/// Rows affected by the statement that ran last on the session; an EXECUTE
/// (the sp_executesql that ran the statement) keeps its inner statement's.
const ROW_COUNT: &str = "SELECT ROWCOUNT_BIG()";
const PING: &str = "SELECT 1";
const VERSION: &str = "SELECT CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128)), \
    CAST(SERVERPROPERTY('Edition') AS nvarchar(128)), DB_NAME(), SUSER_SNAME()";

const READ_ONLY_SOURCE: &str = "read_only cannot be enforced by SQL Server for a session: give this source a \
    login that may only read (for example a member of db_datareader only) instead";
const READ_ONLY_TRANSACTION: &str = "SQL Server cannot make a transaction read-only; use a source whose login \
    may only read";

struct MssqlConn {
    client: TdsClient,
    /// Set while a response is unread (or after the connection failed): the
    /// pool closes the connection instead of handing it out again.
    broken: bool,
    /// Set between BEGIN and a completed COMMIT/ROLLBACK, for the same reason.
    in_transaction: bool,
    /// Set once a statement may have left state that outlives it on the
    /// session (see `sql_text::may_keep_mssql_session_state`): the driver
    /// cannot reset a session, so it is closed rather than pooled.
    keeps_session_state: bool,
    /// A statement of the transaction this connection holds committed or
    /// rolled it back itself: the session is out of it, and the handle
    /// answers `EndedByStatement` until it is ended.
    ended_by_statement: bool,
}

/// Whether a connection can serve another request after this error. Errors
/// of severity 20 and above close the connection. 266 (a statement that
/// began or ended a transaction it did not finish) leaves the session in a
/// transaction count the next borrower must not inherit: a failed
/// statement's count is checked (`Hold::check_transaction`), and the
/// connection closed unless it is the one expected.
fn reusable_after(e: &tiberius::error::Error) -> bool {
    matches!(e, tiberius::error::Error::Server(t) if t.class() < 20)
}

impl MssqlConn {
    fn settle<T>(&mut self, result: tiberius::Result<T>) -> Result<T, BackendError> {
        self.broken = result.as_ref().is_err_and(|e| !reusable_after(e));
        result.map_err(map_error)
    }

    /// Runs a parameterized statement and reads its first result set.
    async fn fetch(&mut self, sql: &str, params: Vec<ColumnData<'static>>) -> Result<Vec<tiberius::Row>, BackendError> {
        self.broken = true;
        let mut query = Query::new(sql);
        for p in params {
            query.bind(Param(p));
        }
        let rows = match query.query(&mut self.client).await {
            Ok(stream) => stream.into_first_result().await,
            Err(e) => Err(e),
        };
        self.settle(rows)
    }

    /// Runs a batch of fixed SQL (transaction control), discarding results.
    async fn batch(&mut self, sql: &str) -> Result<(), BackendError> {
        self.broken = true;
        let done = match self.client.simple_query(sql).await {
            Ok(stream) => stream.into_results().await.map(drop),
            Err(e) => Err(e),
        };
        self.settle(done)
    }
}

#[derive(Clone)]
struct Manager {
    config: tiberius::Config,
    connect_timeout: Duration,
}

/// Opens a connection, following one redirect (Azure SQL's gateway may send
/// the client on to the node that holds the database).
async fn open(config: &tiberius::Config) -> tiberius::Result<TdsClient> {
    async fn connect(config: tiberius::Config) -> tiberius::Result<TdsClient> {
        let tcp = TcpStream::connect(config.get_addr()).await?;
        tcp.set_nodelay(true)?;
        Client::connect(config, tcp.compat_write()).await
    }
    match connect(config.clone()).await {
        Err(tiberius::error::Error::Routing { host, port }) => {
            let mut routed = config.clone();
            routed.host(host);
            routed.port(port);
            connect(routed).await
        }
        other => other,
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = MssqlConn;
    type Error = tiberius::error::Error;

    async fn connect(&self) -> Result<MssqlConn, Self::Error> {
        // tiberius panics on some handshakes it does not expect; a panic here
        // would also cost the pool its slot for good.
        let opening = AssertUnwindSafe(open(&self.config)).catch_unwind();
        let opened = tokio::time::timeout(self.connect_timeout, opening).await;
        let client = opened
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "opening the connection timed out"))?
            .map_err(|_| tiberius::error::Error::Protocol("the server's handshake was not understood".into()))??;
        Ok(MssqlConn {
            client,
            broken: false,
            in_transaction: false,
            keeps_session_state: false,
            ended_by_statement: false,
        })
    }

    async fn is_valid(&self, conn: &mut MssqlConn) -> Result<(), Self::Error> {
        conn.client.simple_query(PING).await?.into_results().await.map(drop)
    }

    fn has_broken(&self, conn: &mut MssqlConn) -> bool {
        conn.broken || conn.in_transaction || conn.keeps_session_state || conn.ended_by_statement
    }
}

pub struct MssqlSource {
    pool: FailFastPool<Manager>,
    /// Opens the sessions change streams hold for their lifetime (outside the pool).
    changes: Manager,
}

impl MssqlSource {
    pub fn new(config: &SourceConfig) -> Result<Self, BackendError> {
        if config.read_only {
            return Err(BackendError::Invalid(READ_ONLY_SOURCE.into()));
        }
        let mut tds = tiberius::Config::new();
        tds.host(config.host.as_deref().unwrap_or("localhost"));
        tds.port(config.port.unwrap_or(1433));
        if let Some(db) = &config.database {
            tds.database(db);
        }
        tds.application_name("weir");
        let password = config.password().map_err(BackendError::Invalid)?.unwrap_or_default();
        tds.authentication(AuthMethod::sql_server(
            config.user.as_deref().unwrap_or_default(),
            password,
        ));
        // Without `tls` nothing is encrypted, the login included, unless the
        // server requires it (tiberius then encrypts the whole session).
        tds.encryption(if config.tls {
            EncryptionLevel::Required
        } else {
            EncryptionLevel::NotSupported
        });
        if config.trust_server_certificate {
            tds.trust_cert();
        } else if let Some(path) = &config.tls_ca_file {
            tds.trust_cert_ca(sql_server_authority(path)?);
        }
        let changes = Manager {
            config: tds.clone(),
            connect_timeout: config.pool.connect_timeout,
        };
        let pool = FailFastPool::new(
            Manager {
                config: tds,
                connect_timeout: config.pool.connect_timeout,
            },
            &config.pool,
            "mssql",
            connect_error,
        );
        Ok(Self { pool, changes })
    }

    async fn lease(&self) -> Result<Conn, BackendError> {
        self.pool.lease().await
    }
}

/// The connection a statement runs on: from the pool, or a transaction's
/// (gone once a cancelled statement closed it).
// One per running statement; boxing the larger variant would allocate per statement.
#[allow(clippy::large_enum_variant)]
enum Hold {
    Pooled(Conn),
    Transaction(OwnedMutexGuard<Option<Conn>>),
}

impl Hold {
    fn conn(&mut self) -> Option<&mut MssqlConn> {
        match self {
            Hold::Pooled(c) => Some(&mut **c),
            Hold::Transaction(c) => c.as_deref_mut(),
        }
    }

    /// Whether `release` closes a transaction's connection.
    fn closes_transaction(&self) -> bool {
        matches!(self, Hold::Transaction(guard) if guard.as_ref().is_some_and(|c| c.broken))
    }

    /// Gives the connection back. A transaction's broken connection is
    /// closed now, which ends its statement and rolls the transaction back.
    fn release(self) {
        if let Hold::Transaction(mut guard) = self {
            if guard.as_ref().is_some_and(|c| c.broken) {
                guard.take();
            }
        }
    }

    /// After a statement failed: whether the session holds the transactions
    /// it should, none on a pooled connection and one in a transaction.
    /// SQL Server reports only a batch's first error, so in `BEGIN TRAN;
    /// INSERT ...` whose INSERT failed the transaction it left open goes
    /// unreported, and so does one a handle's statement nested (which its
    /// COMMIT would leave open); it may also have ended the transaction (a
    /// deadlock victim, a snapshot conflict, any error under XACT_ABORT).
    /// If the count is wrong, or cannot be told, the connection is marked
    /// broken: it is closed, which rolls back, and a handle refuses later
    /// statements, which would otherwise run on their own. A transaction's
    /// statement that failed with `mismatched` (error 266) and took the
    /// count to zero committed or rolled back the transaction itself (where
    /// a deadlock victim's count is zero, SQL Server rolled it back):
    /// nothing is left to roll back, and whether its work was kept cannot
    /// be told, so the session is kept and the handle says so (returns
    /// true then).
    async fn check_transaction(&mut self, mismatched: bool) -> bool {
        let expected = match self {
            Hold::Pooled(_) => 0,
            Hold::Transaction(_) => 1,
        };
        let Some(conn) = self.conn().filter(|c| !c.broken) else {
            return false;
        };
        let count = conn.fetch("SELECT @@TRANCOUNT", vec![]).await;
        let count = count
            .ok()
            .and_then(|rows| rows.first().and_then(|r| r.get::<i32, _>(0)));
        if mismatched && expected == 1 && count == Some(0) {
            conn.in_transaction = false;
            conn.ended_by_statement = true;
            return true;
        }
        conn.broken |= count != Some(expected);
        false
    }
}

/// Errors that already tell the caller the transaction is over (or that
/// its session was lost, which the service reports so).
fn rolls_back_anyway(e: &BackendError) -> bool {
    e.is_unavailable()
        || matches!(
            e,
            BackendError::TransactionRolledBack(_)
                | BackendError::Engine {
                    kind: EngineErrorKind::Aborted,
                    ..
                }
        )
}

fn transaction_closed() -> BackendError {
    BackendError::TransactionRolledBack("a failed or cancelled statement (its connection was closed)")
}

/// tiberius panics on what it cannot decode instead of returning an error.
pub(super) fn driver_panic() -> BackendError {
    BackendError::Invalid(
        "the SQL Server driver could not read this result: sql_variant, CLR types (geometry, geography, \
         hierarchyid) and decimals with a scale of 38 are not supported; CAST such columns, for example \
         CAST(c AS nvarchar(max))"
            .into(),
    )
}

/// Starts a statement in a task that owns the connection until it ends.
async fn start(hold: Hold, statement: Statement) -> Result<QueryStream, BackendError> {
    let (mut worker, pending) = channel::channel(None);
    tokio::spawn(async move {
        let mut hold = hold;
        let outcome = match hold.conn() {
            Some(conn) if conn.ended_by_statement => Err(BackendError::EndedByStatement),
            Some(conn) => AssertUnwindSafe(execute(conn, &statement, &mut worker))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(driver_panic())),
            None => Err(transaction_closed()),
        };
        // Release the connection (and a transaction's lock) before the caller
        // learns the statement is over, so its next call finds it free.
        let mut ended_by_statement = false;
        if let Err(e) = &outcome {
            let mismatched = matches!(e, BackendError::Engine { code, .. } if code == "266");
            ended_by_statement =
                !matches!(e, BackendError::EndedByStatement) && hold.check_transaction(mismatched).await;
            // ABORTED tells the caller to run the whole transaction again: one
            // SQL Server kept open (a lock timeout, 1222) is closed with its
            // connection, which rolls it back and frees its locks.
            if let (
                Hold::Transaction(_),
                BackendError::Engine {
                    kind: EngineErrorKind::Aborted,
                    ..
                },
            ) = (&hold, e)
            {
                if let Some(conn) = hold.conn() {
                    conn.broken = true;
                }
            }
        }
        // A transaction whose connection closes now is rolled back: its
        // caller must hear that, not only why the statement failed.
        let outcome = match outcome {
            Err(_) if ended_by_statement => Err(BackendError::EndedByStatement),
            Err(e) if hold.closes_transaction() && !rolls_back_anyway(&e) => {
                Err(BackendError::RolledBackBy(Box::new(e)))
            }
            other => other,
        };
        hold.release();
        worker.finish(outcome).await;
    });
    pending.started().await
}

/// Runs a statement, streaming its rows; returns rows affected. Returning
/// early leaves `conn.broken` set, so the connection is closed.
async fn execute(
    conn: &mut MssqlConn,
    statement: &Statement,
    worker: &mut Worker,
) -> Result<Option<u64>, BackendError> {
    let expected = types::placeholder_count(&statement.sql);
    if expected != statement.params.len() {
        return Err(BackendError::Invalid(format!(
            "the statement has {expected} parameter(s) but {} were given",
            statement.params.len()
        )));
    }
    let mut query = Query::new(statement.sql.as_str());
    for (i, p) in statement.params.iter().enumerate() {
        let data = types::param(p).map_err(|message| BackendError::Parameter { index: i + 1, message })?;
        query.bind(Param(data));
    }
    conn.keeps_session_state |= crate::backend::sql_text::may_keep_mssql_session_state(&statement.sql);
    conn.broken = true;
    let started = tokio::select! {
        biased;
        r = query.query(&mut conn.client) => Some(r),
        () = worker.closed() => None,
    };
    // Moved whole into the match: a partly moved variable would keep the
    // client borrowed to the end of the function.
    let mut stream = match started.transpose() {
        Ok(None) => return Ok(None),
        Ok(Some(s)) => s,
        Err(e) => {
            conn.broken = !reusable_after(&e);
            return Err(map_error(e));
        }
    };
    let first = tokio::select! {
        biased;
        item = stream.try_next() => item,
        () = worker.closed() => return Ok(None),
    };
    let meta = match first {
        Ok(Some(QueryItem::Metadata(meta))) => meta,
        Ok(Some(QueryItem::Row(_))) => return Err(BackendError::Internal("rows arrived before their columns".into())),
        Ok(None) => {
            // No result set: the statement's row count is asked for separately.
            drop(stream);
            let affected = last_row_count(&mut conn.client).await;
            let affected = conn.settle(affected)?;
            worker.describe(Vec::new());
            return Ok(affected);
        }
        Err(e) => {
            conn.broken = !reusable_after(&e);
            return Err(map_error(e));
        }
    };
    let described: Vec<_> = meta
        .columns()
        .iter()
        .map(|c| types::column(c.name(), c.column_type()))
        .collect();
    let decoders: Vec<_> = described.iter().map(|(_, d)| *d).collect();
    let names: Vec<_> = described.iter().map(|(c, _)| c.name.clone()).collect();
    if !worker.describe(described.into_iter().map(|(c, _)| c).collect()) {
        return Ok(None);
    }
    let mut gather = worker.gather();
    loop {
        let item = tokio::select! {
            biased;
            item = stream.try_next() => item,
            () = worker.closed() => return Ok(None),
        };
        let row = match item {
            Ok(Some(QueryItem::Row(row))) => row,
            Ok(None) => break,
            Ok(Some(QueryItem::Metadata(_))) => return Err(crate::backend::error::second_result_set()),
            Err(e) => {
                conn.broken = !reusable_after(&e);
                return Err(map_error(e));
            }
        };
        for (i, data) in row.into_iter().enumerate() {
            let decode = decoders.get(i).copied().unwrap_or(types::Decode::Plain);
            let value = types::decode(data, decode).map_err(|m| {
                BackendError::Invalid(format!("column \"{}\": {m}", names.get(i).map_or("?", String::as_str)))
            })?;
            gather.value(value);
        }
        if let Some(chunk) = gather.end_row() {
            if !worker.send(chunk).await {
                return Ok(None);
            }
        }
    }
    drop(stream);
    conn.broken = false;
    if let Some(rest) = gather.rest() {
        // Whether the caller is still there no longer matters.
        let _ = worker.send(rest).await;
    }
    Ok(None)
}

async fn last_row_count(client: &mut TdsClient) -> tiberius::Result<Option<u64>> {
    let row = client.simple_query(ROW_COUNT).await?.into_row().await?;
    Ok(row
        .and_then(|r| r.try_get::<i64, usize>(0).ok().flatten())
        .and_then(|n| u64::try_from(n).ok()))
}

/// The batch that opens a transaction at an isolation level.
fn begin_batch(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::EngineDefault => "BEGIN TRANSACTION",
        Isolation::ReadUncommitted => "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; BEGIN TRANSACTION",
        Isolation::ReadCommitted => "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; BEGIN TRANSACTION",
        Isolation::RepeatableRead => "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; BEGIN TRANSACTION",
        Isolation::Serializable => "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN TRANSACTION",
    }
}

/// The batches that end a transaction: commit, then rollback. ROLLBACK is
/// conditional because SQL Server may already have rolled back (a deadlock
/// victim, an error of high severity).
fn end_batches(isolation: Isolation) -> (String, String) {
    let commit = "COMMIT TRANSACTION";
    let rollback = "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION";
    if isolation == Isolation::EngineDefault {
        (commit.into(), rollback.into())
    } else {
        (
            format!("{commit}; {RESET_ISOLATION}"),
            format!("{rollback}; {RESET_ISOLATION}"),
        )
    }
}

#[async_trait]
impl SqlSource for MssqlSource {
    fn engine(&self) -> Engine {
        Engine::Mssql
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            change_streams: true,
            ..Capabilities::sql("@P1")
        }
    }

    async fn watch(&self, spec: WatchSpec) -> Result<ChangeFeed, BackendError> {
        changes::watch(&self.changes, spec).await
    }

    async fn delete_subscription(&self, id: &str, name: &str) -> Result<(), BackendError> {
        changes::delete(&self.changes, id, name).await
    }

    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        start(Hold::Pooled(self.lease().await?), statement).await
    }

    async fn begin(&self, options: TxOptions) -> Result<Box<dyn SqlTransaction>, BackendError> {
        // No session or transaction setting refuses writes in SQL Server
        // (ApplicationIntent=ReadOnly only routes to a readable secondary).
        if options.read_only {
            return Err(BackendError::Invalid(READ_ONLY_TRANSACTION.into()));
        }
        let mut conn = self.lease().await?;
        conn.in_transaction = true;
        conn.batch(begin_batch(options.isolation)).await?;
        let (commit, rollback) = end_batches(options.isolation);
        Ok(Box::new(MssqlTransaction {
            conn: super::TxSession::new(Some(conn)),
            commit,
            rollback,
        }))
    }

    async fn connection_info(&self) -> Result<ConnectionInfo, BackendError> {
        let mut conn = self.lease().await?;
        let started = Instant::now();
        conn.fetch(PING, vec![]).await?;
        let round_trip = started.elapsed();
        let rows = conn.fetch(VERSION, vec![]).await?;
        let row = rows
            .first()
            .ok_or_else(|| BackendError::Internal("no version row".into()))?;
        let text = |i: usize| -> String {
            row.try_get::<&str, usize>(i)
                .ok()
                .flatten()
                .unwrap_or_default()
                .to_string()
        };
        Ok(ConnectionInfo {
            server_version: format!("SQL Server {} {}", text(0), text(1)).trim_end().to_string(),
            database: text(2),
            user: text(3),
            round_trip,
            ..Default::default()
        })
    }

    async fn list_schemas(&self, include_system: bool) -> Result<Vec<SchemaInfo>, BackendError> {
        let mut conn = self.lease().await?;
        schema::list_schemas(&mut conn, include_system).await
    }

    async fn list_tables(&self, schema: Option<&str>, page: TablePage) -> Result<Vec<TableInfo>, BackendError> {
        let mut conn = self.lease().await?;
        schema::list_tables(&mut conn, schema, &page).await
    }

    fn refuses(&self, column: &crate::backend::Column, value: &crate::backend::Value) -> Option<String> {
        bulk::refusal(column, value)
    }

    async fn describe_table(&self, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError> {
        let mut conn = self.lease().await?;
        schema::describe_table(&mut conn, schema, table).await
    }

    async fn load(&self, spec: LoadSpec, rows: RowFeed) -> Result<LoadOutcome, BackendError> {
        let mut conn = self.lease().await?;
        bulk::load(&mut conn, spec, rows).await
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        Some(self.pool.status())
    }

    fn circuit(&self) -> Option<crate::backend::breaker::CircuitState> {
        Some(self.pool.circuit())
    }
}

struct MssqlTransaction {
    conn: super::TxSession<Option<Conn>>,
    commit: String,
    rollback: String,
}

impl MssqlTransaction {
    /// Ends the transaction; the connection goes back to the pool only when
    /// that succeeded, and is closed otherwise. `closed` is the outcome when
    /// a cancelled statement already closed the connection.
    async fn end(&self, sql: &str, closed: fn() -> Result<(), BackendError>) -> Result<(), BackendError> {
        let Some(mut conn) = self.conn.to_end().await?.take() else {
            return closed();
        };
        // Out of the transaction already, the session goes back to the pool,
        // its isolation level set back as the rollback batch does (the
        // driver cannot reset a session); closed if that fails.
        if std::mem::take(&mut conn.ended_by_statement) {
            if conn.batch(&self.rollback).await.is_err() {
                conn.broken = true;
            }
            return Err(BackendError::EndedByStatement);
        }
        conn.batch(sql).await?;
        conn.in_transaction = false;
        Ok(())
    }
}

#[async_trait]
impl SqlTransaction for MssqlTransaction {
    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        start(Hold::Transaction(self.conn.for_statement().await?), statement).await
    }

    async fn commit(&self) -> Result<(), BackendError> {
        self.end(&self.commit, || Err(transaction_closed())).await
    }

    async fn rollback(&self) -> Result<(), BackendError> {
        // Closing the connection has rolled it back already.
        self.end(&self.rollback, || Ok(())).await
    }
}

/// Classifies a SQL Server error number (and its severity, for numbers not
/// listed) the way every engine's errors are classified.
fn classify(number: u32, severity: u8) -> EngineErrorKind {
    use EngineErrorKind as K;
    match number {
        // Syntax, unknown column, conversions, arithmetic, truncation, parameters.
        102 | 105 | 156 | 170 | 137 | 201 | 206 | 207 | 241 | 242 | 245 | 257 | 8114 | 8115 | 8134 | 8144 | 8152
        | 2628 | 8178 | 4145 | 1038 => K::InvalidArgument,
        // Unknown object, procedure, function, database; dropping what does not exist.
        // 6401: a savepoint that is not there.
        208 | 2812 | 4121 | 911 | 3701 | 15151 | 6401 | 4701 | 4902 | 1088 | 2760 => K::NotFound,
        // Duplicate key in a unique constraint or a unique index.
        2627 | 2601 => K::AlreadyExists,
        // Constraint conflicts (547: foreign key or check, 515: NOT NULL); transaction state.
        // 550: a view's WITH CHECK OPTION.
        547 | 515 | 266 | 3902 | 3903 | 3930 | 3971 | 3998 | 550 => K::FailedPrecondition,
        // Deadlock victim, lock timeout, snapshot update conflicts; In-Memory
        // OLTP's write, validation and dependency conflicts (retryable).
        1205 | 1222 | 3960 | 3961 | 41301 | 41302 | 41305 | 41325 => K::Aborted,
        // Permission denied; a read-only database. A login refused in a
        // statement (a linked server's, OPENROWSET's): Weir's own, refused
        // while it connects, is told apart (`connect_error`).
        229 | 230 | 262 | 297 | 300 | 916 | 3906 | 18456 | 18452 | 18463..=18470 | 18486..=18488 | 4060 => {
            K::PermissionDenied
        }
        // Connections, and Azure SQL's "busy, retry later" limits.
        17809 | 10928 | 10929 | 40501 => K::Overloaded,
        // Memory, disk, log, locks, Azure SQL's size quota and long transactions.
        701 | 1105 | 9002 | 1204 | 8645 | 40544 | 40549 => K::ResourceExhausted,
        // Database unavailable, shutting down, session killed. Azure SQL's
        // transient 49918-49920 (too many operations in progress).
        40613 | 40197 | 6005 | 596 | 49918..=49920 => K::Unavailable,
        // RAISERROR / THROW by user code: a rule of the application.
        50000.. => K::FailedPrecondition,
        _ => match severity {
            11..=16 => K::InvalidArgument,
            17 => K::ResourceExhausted,
            20.. => K::Unavailable,
            _ => K::Internal,
        },
    }
}

/// Weir's own login refused while it connects (with its states), a
/// password expired or to be changed, the login's database that cannot be
/// opened: the operator's to fix, told as the source unavailable (the text
/// names the login, and stays in the server's log).
fn refused_login(code: u32, message: &str) -> Option<BackendError> {
    matches!(code, 18456 | 18452 | 18463..=18470 | 18486..=18488 | 4060)
        .then(|| crate::backend::error::login_refused(&code.to_string(), message))
}

/// Maps an error opening a connection: as `map_error`, Weir's own login
/// refused aside (in a statement, such a code is a linked server's or
/// OPENROWSET's login, the caller's to fix).
pub(crate) fn connect_error(e: tiberius::error::Error) -> BackendError {
    if let tiberius::error::Error::Server(t) = &e {
        if let Some(refused) = refused_login(t.code(), t.message()) {
            return refused;
        }
    }
    map_error(e)
}

/// An error SQL Server reported, of number `code` and severity `class`.
fn server_error(code: u32, class: u8, message: &str) -> BackendError {
    BackendError::Engine {
        kind: classify(code, class),
        code: code.to_string(),
        message: message.to_string(),
    }
}

/// Maps a tiberius error; the engine code is the SQL Server error number.
pub(crate) fn map_error(e: tiberius::error::Error) -> BackendError {
    use tiberius::error::Error as E;
    match e {
        E::Server(t) => server_error(t.code(), t.class(), t.message()),
        E::Io { message, .. } => BackendError::Unavailable(message),
        E::Tls(message) => BackendError::Unavailable(format!("TLS: {message}")),
        E::Routing { .. } => BackendError::Unavailable("the server redirected the connection more than once".into()),
        other => BackendError::Internal(other.to_string()),
    }
}

/// tiberius trusts exactly one authority, read from a `.pem` or `.crt` file
/// at each connection: check the file once, so that a wrong one fails the
/// configuration instead of every connection.
fn sql_server_authority(path: &std::path::Path) -> Result<String, BackendError> {
    let certs = crate::pem::certificates(path, "tls_ca_file").map_err(BackendError::Invalid)?;
    let pem = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("pem") || ext.eq_ignore_ascii_case("crt"));
    if certs.len() != 1 || !pem {
        return Err(BackendError::Invalid(format!(
            "tls_ca_file {}: SQL Server takes one authority's certificate, in a .pem or .crt file",
            path.display()
        )));
    }
    Ok(path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_logins_name_no_login() {
        for code in [18456, 18487, 4060] {
            match refused_login(code, "Login failed for user 'weir'.") {
                Some(BackendError::Unavailable(m)) => {
                    assert!(m.contains(&code.to_string()) && !m.contains("weir'"), "{m}");
                }
                other => panic!("{code}: {other:?}"),
            }
            // In a statement, a linked server's login: the caller's to fix.
            assert!(matches!(
                server_error(code, 14, "Login failed for user 'remote'."),
                BackendError::Engine {
                    kind: EngineErrorKind::PermissionDenied,
                    ..
                }
            ));
        }
        assert!(refused_login(208, "Invalid object name 'x'.").is_none());
        assert!(matches!(
            server_error(208, 16, "Invalid object name 'x'."),
            BackendError::Engine {
                kind: EngineErrorKind::NotFound,
                ..
            }
        ));
    }

    #[test]
    fn error_numbers_map_to_kinds() {
        use EngineErrorKind as K;
        let cases = [
            (102, K::InvalidArgument),
            (156, K::InvalidArgument),
            (207, K::InvalidArgument),
            (8134, K::InvalidArgument),
            (245, K::InvalidArgument),
            (208, K::NotFound),
            (2812, K::NotFound),
            (2627, K::AlreadyExists),
            (2601, K::AlreadyExists),
            (547, K::FailedPrecondition),
            (515, K::FailedPrecondition),
            (3971, K::FailedPrecondition),
            (266, K::FailedPrecondition),
            (1205, K::Aborted),
            (1222, K::Aborted),
            (6401, K::NotFound),
            // "Cannot find the object ... because it does not exist": TRUNCATE,
            // ALTER TABLE, CREATE INDEX; a schema that does not exist.
            (4701, K::NotFound),
            (4902, K::NotFound),
            (1088, K::NotFound),
            (2760, K::NotFound),
            (550, K::FailedPrecondition),
            (3960, K::Aborted),
            (41302, K::Aborted),
            (41325, K::Aborted),
            (49919, K::Unavailable),
            (229, K::PermissionDenied),
            (230, K::PermissionDenied),
            (3906, K::PermissionDenied),
            (18456, K::PermissionDenied),
            (4060, K::PermissionDenied),
            (9002, K::ResourceExhausted),
            (40501, K::Overloaded),
            (10928, K::Overloaded),
            (50001, K::FailedPrecondition),
        ];
        for (number, kind) in cases {
            assert_eq!(classify(number, 16), kind, "error {number}");
        }
        assert_eq!(classify(4_999, 16), K::InvalidArgument, "unlisted user error");
        assert_eq!(classify(4_999, 17), K::ResourceExhausted);
        assert_eq!(classify(4_999, 21), K::Unavailable, "fatal: the connection is gone");
        assert_eq!(classify(4_999, 10), K::Internal);
    }

    #[test]
    fn transport_errors_are_unavailable() {
        let io = tiberius::error::Error::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(matches!(map_error(io.clone()), BackendError::Unavailable(m) if m == "refused"));
        assert!(!reusable_after(&io));
        assert!(matches!(
            map_error(tiberius::error::Error::Tls("bad certificate".into())),
            BackendError::Unavailable(m) if m.contains("bad certificate")
        ));
        assert!(matches!(
            map_error(tiberius::error::Error::Protocol("odd token".into())),
            BackendError::Internal(_)
        ));
    }

    #[test]
    fn transactions_set_and_reset_their_isolation() {
        assert_eq!(begin_batch(Isolation::EngineDefault), "BEGIN TRANSACTION");
        assert_eq!(
            begin_batch(Isolation::RepeatableRead),
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; BEGIN TRANSACTION"
        );
        for level in crate::backend::ALL_ISOLATION_LEVELS {
            assert!(begin_batch(level).ends_with("; BEGIN TRANSACTION"), "{level:?}");
            let (commit, rollback) = end_batches(level);
            assert!(commit.starts_with("COMMIT TRANSACTION;") && commit.ends_with(RESET_ISOLATION));
            assert!(rollback.starts_with("IF @@TRANCOUNT > 0 ROLLBACK") && rollback.ends_with(RESET_ISOLATION));
        }
        let (commit, rollback) = end_batches(Isolation::EngineDefault);
        assert_eq!(
            (commit.as_str(), rollback.as_str()),
            ("COMMIT TRANSACTION", "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION")
        );
    }

    #[test]
    fn a_trusted_authority_is_one_certificate_in_a_pem_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pem = |n: usize| {
            (0..n)
                .map(|_| {
                    rcgen::generate_simple_self_signed(vec!["db".to_string()])
                        .expect("certificate")
                        .cert
                        .pem()
                })
                .collect::<String>()
        };
        let one = dir.path().join("ca.pem");
        std::fs::write(&one, pem(1)).expect("write");
        assert_eq!(sql_server_authority(&one).ok(), Some(one.display().to_string()));
        let two = dir.path().join("bundle.crt");
        std::fs::write(&two, pem(2)).expect("write");
        let renamed = dir.path().join("ca.txt");
        std::fs::write(&renamed, pem(1)).expect("write");
        for (path, says) in [
            (&two, "one authority"),
            (&renamed, ".pem or .crt"),
            (&dir.path().join("none.pem"), "none.pem"),
        ] {
            let err = match sql_server_authority(path) {
                Err(BackendError::Invalid(message)) => message,
                other => panic!("{}: {other:?}", path.display()),
            };
            assert!(err.contains("tls_ca_file") && err.contains(says), "{err}");
        }
    }

    #[test]
    fn configuration_keys() {
        use crate::config::Config;
        let ok = "[tenants.a.sources.s]\nengine = \"mssql\"\nhost = \"h\"\nport = 1433\nuser = \"u\"\n\
                  database = \"d\"\npassword_env = \"P\"\ntls = true\ntrust_server_certificate = true\n";
        let config = Config::from_toml(ok).expect("every SQL Server key");
        assert!(config.tenants["a"].sources["s"].trust_server_certificate);
        let err = Config::from_toml("[tenants.a.sources.s]\nengine = \"mssql\"\nhost = \"h\"\n")
            .expect_err("user is required")
            .to_string();
        assert!(err.contains("tenants.a.sources.s.user"), "{err}");
        let err = Config::from_toml(
            "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"u\"\ntrust_server_certificate = true\n",
        )
        .expect_err("PostgreSQL: only with tls = true")
        .to_string();
        assert!(err.contains("trust_server_certificate"), "{err}");
        let err =
            Config::from_toml("[tenants.a.sources.s]\nengine = \"mssql\"\nhost = \"h\"\nuser = \"u\"\npath = \"x\"\n")
                .expect_err("not a SQL Server key")
                .to_string();
        assert!(err.contains("tenants.a.sources.s.path"), "{err}");
    }

    #[test]
    fn read_only_sources_are_refused() {
        let config: crate::config::Config = crate::config::Config::from_toml(
            "[tenants.a.sources.s]\nengine = \"mssql\"\nhost = \"h\"\nuser = \"u\"\nread_only = true\n",
        )
        .expect("valid configuration");
        let source = &config.tenants["a"].sources["s"];
        assert!(matches!(MssqlSource::new(source), Err(BackendError::Invalid(m)) if m.contains("db_datareader")));
    }
}

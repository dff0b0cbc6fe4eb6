//! Embedded SQLite (bundled, nothing to install). SQLite calls block, so every
//! statement runs on tokio's blocking pool and hands rows over through a
//! bounded channel: a slow client slows the statement instead of growing memory.

mod bulk;
mod demo;
mod schema;

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{NaiveDate, NaiveDateTime};
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::backend::channel::{self, Worker};
use crate::backend::sql_text;
use crate::backend::types::special_decimal;
use crate::backend::{
    BackendError, Capabilities, Column, ColumnType, ConnectionInfo, Engine, EngineErrorKind, LoadOutcome, LoadSpec,
    PoolStatus, QueryStream, RowFeed, RowSink, SchemaInfo, SqlSource, SqlTransaction, Statement, TableDescription,
    TableInfo, TablePage, TxOptions, Value,
};
use crate::config::SourceConfig;

/// SQLite VM instructions between checks for cancellation.
const PROGRESS_OPS: i32 = 10_000;

/// The largest string or blob a statement may make or return.
const MAX_VALUE_BYTES: i32 = 64 * 1024 * 1024;

/// What the WAL file is cut back to when it restarts after a checkpoint (64 MiB).
const WAL_SIZE_LIMIT: &str = "PRAGMA journal_size_limit = 67108864";

/// How long a statement waits for another connection's write lock.
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// Pauses between tries for the lock (ms), the last repeated: SQLite's own.
const BUSY_PAUSES: [u64; 12] = [1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100];

thread_local! {
    /// The abandon flag of the statement running on this blocking thread,
    /// for the busy handler, which SQLite gives no context.
    static RUNNING: std::cell::RefCell<Option<Arc<AtomicBool>>> = const { std::cell::RefCell::new(None) };
}

/// Waits for a write lock in short steps, and gives up at once when the
/// caller abandoned the statement: a write whose caller was told
/// DEADLINE_EXCEEDED must not take the lock later and commit.
fn wait_for_lock(tries: i32) -> bool {
    let abandoned = RUNNING.with(|r| r.borrow().as_ref().is_some_and(|f| f.load(Ordering::Relaxed)));
    let tries = usize::try_from(tries).unwrap_or(0);
    let pause = |i: usize| BUSY_PAUSES[i.min(BUSY_PAUSES.len() - 1)];
    let waited: u64 = (0..tries).map(pause).sum();
    if abandoned || Duration::from_millis(waited) >= BUSY_WAIT {
        return false;
    }
    std::thread::sleep(Duration::from_millis(pause(tries)));
    true
}

/// Clears what `start` sets on a connection for one statement, also when
/// the statement panics: a pooled connection must not keep another
/// statement's abandon flag in its hooks.
struct StatementHooks<'a> {
    conn: &'a Connection,
}

impl<'a> StatementHooks<'a> {
    fn install(conn: &'a Connection, abandoned: &Arc<AtomicBool>, pooled: bool) -> Self {
        let interrupt = abandoned.clone();
        conn.progress_handler(PROGRESS_OPS, Some(move || interrupt.load(Ordering::Relaxed)));
        if pooled {
            // An abandoned statement's own commit becomes a rollback.
            let abandoned = abandoned.clone();
            conn.commit_hook(Some(move || abandoned.load(Ordering::Relaxed)));
        }
        RUNNING.with(|r| *r.borrow_mut() = Some(abandoned.clone()));
        Self { conn }
    }
}

impl Drop for StatementHooks<'_> {
    fn drop(&mut self) {
        RUNNING.with(|r| r.borrow_mut().take());
        self.conn.progress_handler(PROGRESS_OPS, None::<fn() -> bool>);
        self.conn.commit_hook(None::<fn() -> bool>);
    }
}

/// PRAGMAs a tenant may read but not set: those that set state of the
/// whole process, not of one connection (one tenant could take every other
/// tenant's memory, as `hard_heap_limit` can only be lowered, or move
/// everyone's temporary files), those that would lift the source's
/// `max_file_bytes` (`max_page_count`, and `page_size`, which a VACUUM
/// makes larger under the same page count), and `locking_mode`, whose
/// exclusive lock (taken at the next write, kept to the connection's end)
/// blocks the source's other connections.
const UNSETTABLE_PRAGMAS: &[&str] = &[
    "locking_mode",
    "hard_heap_limit",
    "soft_heap_limit",
    "temp_store_directory",
    "data_store_directory",
    "max_page_count",
    "page_size",
];

/// What a tenant's statement may not do to the process, its host or the
/// source's other callers: set `UNSETTABLE_PRAGMAS`, or a journal mode other
/// than WAL, or attach a database by file name (`ATTACH`,
/// `VACUUM INTO`), which would reach any file the gateway can read or
/// write. A private temporary database, named by the empty string, is
/// what a plain `VACUUM` attaches for its copy; a name that is not a
/// literal (`ATTACH ? AS o`, `'a' || 'b'`) is not told, so it is refused.
/// Nor may it switch `query_only` off: that would make a read-only
/// transaction writable (the gateway switches it off with
/// `set_query_only`).
fn authorize(ctx: rusqlite::hooks::AuthContext<'_>) -> rusqlite::hooks::Authorization {
    use rusqlite::hooks::{AuthAction, Authorization};
    match ctx.action {
        AuthAction::Pragma {
            pragma_name,
            pragma_value: Some(_),
        } if UNSETTABLE_PRAGMAS.iter().any(|p| p.eq_ignore_ascii_case(pragma_name)) => Authorization::Deny,
        AuthAction::Pragma {
            pragma_name,
            pragma_value: Some(value),
        } if pragma_name.eq_ignore_ascii_case("query_only")
            && !["1", "on", "yes", "true"]
                .iter()
                .any(|on| on.eq_ignore_ascii_case(value)) =>
        {
            Authorization::Deny
        }
        // Kept in the file: a rollback journal would let a reader part-way
        // through a result block every writer of the source (WAL is set
        // at open, and again only when the source is opened again).
        AuthAction::Pragma {
            pragma_name,
            pragma_value: Some(value),
        } if pragma_name.eq_ignore_ascii_case("journal_mode") && !value.eq_ignore_ascii_case("wal") => {
            Authorization::Deny
        }
        AuthAction::Attach { filename } if !filename.is_empty() => Authorization::Deny,
        AuthAction::Unknown {
            code: rusqlite::ffi::SQLITE_ATTACH,
            ..
        } => Authorization::Deny,
        _ => Authorization::Allow,
    }
}

/// Sets `query_only` past `authorize`, which refuses a tenant's statement
/// that switches it off.
fn set_query_only(conn: &Connection, on: bool) -> Result<(), BackendError> {
    conn.authorizer(None::<fn(rusqlite::hooks::AuthContext<'_>) -> rusqlite::hooks::Authorization>);
    let set = conn.pragma_update(None, "query_only", on).map_err(map_error);
    conn.authorizer(Some(authorize));
    set
}

struct Pool {
    path: String,
    read_only: bool,
    idle: parking_lot::Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    max_size: u32,
    acquire_timeout: Duration,
    /// `max_file_bytes`: set on each connection, as SQLite keeps it per connection.
    max_file_bytes: Option<u64>,
    /// Keeps the temporary file of a ":memory:" source alive (shared with
    /// the pool of a source a reload replaces this one with).
    temp: Option<Arc<tempfile::TempPath>>,
}

impl Pool {
    fn open(&self) -> Result<Connection, BackendError> {
        let access = if self.read_only {
            // Enforced by SQLite for every statement, whatever its text.
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        };
        let conn =
            Connection::open_with_flags(&self.path, access | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(map_error)?;
        // One attached database at a time, and only a private temporary one
        // (see `authorize`): VACUUM's copy.
        conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_ATTACHED, 1)
            .map_err(map_error)?;
        // One value (`zeroblob(900000000)`) must not take the process's memory.
        conn.set_limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
            .map_err(map_error)?;
        // No writes to the schema table or other ways to corrupt the file.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)
            .map_err(map_error)?;
        // Before the authorizer, which refuses it to tenants.
        if let Some(bytes) = self.max_file_bytes {
            let page_size: u64 = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(map_error)?;
            let pages = bytes / page_size.max(1);
            // Temporary tables' file counts against the same bound.
            conn.execute_batch(&format!(
                "PRAGMA main.max_page_count = {pages}; PRAGMA temp.max_page_count = {pages}"
            ))
            .map_err(map_error)?;
        }
        conn.authorizer(Some(authorize));
        conn.busy_handler(Some(wait_for_lock)).map_err(map_error)?;
        conn.execute_batch("PRAGMA foreign_keys = ON").map_err(map_error)?;
        if !self.read_only {
            // The WAL grows to the largest transaction since the last
            // checkpoint and keeps that size; cut it back at each reset, so
            // one big load does not hold its size on disk for good.
            conn.execute_batch(WAL_SIZE_LIMIT).map_err(map_error)?;
        }
        Ok(conn)
    }

    async fn lease(self: &Arc<Self>) -> Result<Lease, BackendError> {
        let started = Instant::now();
        let permit = tokio::time::timeout(self.acquire_timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| BackendError::PoolExhausted {
                max_size: self.max_size,
                waited: started.elapsed(),
            })?
            .map_err(|_| BackendError::Internal("sqlite pool closed".into()))?;
        let idle = self.idle.lock().pop();
        let conn = match idle {
            Some(c) => c,
            None => {
                let pool = self.clone();
                tokio::task::spawn_blocking(move || pool.open())
                    .await
                    .map_err(|e| BackendError::Internal(e.to_string()))??
            }
        };
        Ok(Lease {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
            discard: false,
            turn: None,
        })
    }
}

impl Drop for Pool {
    /// The last holder of a replaced or removed source's pool may be a lease
    /// dropped on a runtime thread (a transaction's end after a reload):
    /// closing the last connection to a file checkpoints its WAL, with
    /// fsync, so the connections close on the blocking pool.
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut());
        if !idle.is_empty() || self.temp.is_some() {
            crate::backend::drop_off_runtime((idle, self.temp.take()));
        }
    }
}

/// A pooled connection, returned to the pool on drop unless it was left
/// inside a transaction or changed for the next caller (`discard`).
struct Lease {
    conn: Option<Connection>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    discard: bool,
    /// The source's write turn, for a statement, transaction or load that
    /// may write; released after the connection is back in the pool.
    turn: Option<OwnedMutexGuard<()>>,
}

impl Lease {
    fn conn(&self) -> Result<&Connection, BackendError> {
        self.conn
            .as_ref()
            .ok_or_else(|| BackendError::Internal("sqlite connection missing".into()))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if conn.is_autocommit() && !self.discard {
            self.pool.idle.lock().push(conn);
            return;
        }
        // Closing rolls back a transaction left open, and the last
        // connection checkpoints the WAL: blocking work, which a lease
        // dropped on a runtime thread (a transaction given up on) would do
        // there. The write turn goes with it, so that the next writer's turn
        // begins once the lock is released.
        crate::backend::drop_off_runtime((conn, self.turn.take()));
    }
}

/// The connection a statement runs on: from the pool, or a transaction's.
// One per running statement; boxing the larger variant would allocate per statement.
#[allow(clippy::large_enum_variant)]
enum Hold {
    Pooled(Lease),
    Transaction(OwnedMutexGuard<Lease>),
}

impl Hold {
    fn conn(&self) -> Result<&Connection, BackendError> {
        match self {
            Hold::Pooled(l) => l.conn(),
            Hold::Transaction(l) => l.conn(),
        }
    }
}

pub struct SqliteSource {
    pool: Arc<Pool>,
    label: String,
    writer: Arc<Writer>,
}

/// One writer at a time, as SQLite allows: writers wait for their turn
/// here, where waiting is cancellable and holds no pooled connection,
/// instead of in SQLite's busy handler with one (which let waiting
/// writers take every connection from readers WAL could serve).
#[derive(Default)]
struct Writer {
    turn: Arc<tokio::sync::Mutex<()>>,
    /// The turn's holder is still waiting for a pooled connection: writers
    /// behind it that give up were held by a full pool, not by a write.
    holder_needs_connection: AtomicBool,
}

/// Clears `holder_needs_connection` however the wait for a connection ends.
struct NeedsConnection<'a>(&'a AtomicBool);

impl Drop for NeedsConnection<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Reads the file's header, as nothing else a probe runs does: opening a
/// file that is not a database succeeds, and so does `sqlite_version()`.
fn read_header(conn: &Connection) -> Result<(), BackendError> {
    conn.query_row("PRAGMA schema_version", [], |_| Ok(()))
        .map_err(map_error)
}

/// What a source hands to the one a reload replaces it with at the same
/// place (`SqlSource::carried`): a ":memory:" source's database, which
/// would otherwise start empty and take with it what transactions kept
/// across the reload commit, and the write turn, so that old and new
/// writers still take turns.
struct Carried {
    temp: Option<Arc<tempfile::TempPath>>,
    writer: Arc<Writer>,
}

impl SqliteSource {
    /// `carried`: what the source this one replaces at the same place carried.
    pub fn open(
        name: &str,
        config: &SourceConfig,
        carried: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Self, BackendError> {
        let carried = carried.and_then(|c| c.downcast::<Carried>().ok());
        let configured = config.path.clone().unwrap_or_else(|| ":memory:".into());
        let kept_temp = carried
            .as_ref()
            .and_then(|c| c.temp.clone())
            .filter(|_| configured == ":memory:");
        let seed = config.demo_data && kept_temp.is_none();
        // A private temporary file instead of SQLite's in-memory mode, so the
        // pool's connections share one database with WAL concurrency.
        let (path, temp, label) = if let Some(temp) = kept_temp {
            (
                temp.to_string_lossy().into_owned(),
                Some(temp),
                format!("{name} (temporary)"),
            )
        } else if configured == ":memory:" {
            let file = tempfile::Builder::new()
                .prefix(&format!("weir-{name}-"))
                .suffix(".db")
                .tempfile()
                .map_err(|e| BackendError::Internal(format!("cannot create a temporary database: {e}")))?;
            let temp = file.into_temp_path();
            (
                temp.to_string_lossy().into_owned(),
                Some(Arc::new(temp)),
                format!("{name} (temporary)"),
            )
        } else {
            let label = Path::new(&configured)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            (configured, None, label)
        };
        let pool = Arc::new(Pool {
            path,
            read_only: config.read_only,
            idle: parking_lot::Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(config.pool.max_size as usize)),
            max_size: config.pool.max_size,
            acquire_timeout: config.pool.acquire_timeout,
            max_file_bytes: config.max_file_bytes,
            temp,
        });
        if config.read_only {
            // Opened as the pool will, so a missing or unreadable file fails
            // here, and nothing is written (not even the journal mode).
            read_header(&pool.open()?)?;
        } else {
            let setup = Connection::open(&pool.path).map_err(map_error)?;
            setup.execute_batch("PRAGMA journal_mode = WAL").map_err(map_error)?;
            // (Not again into a database carried over: it holds what the tenant made of it.)
            if seed {
                demo::seed(&setup).map_err(map_error)?;
            }
        }
        Ok(Self {
            pool,
            label,
            writer: carried.map_or_else(Arc::default, |c| c.writer.clone()),
        })
    }

    /// A pooled connection, with the source's write turn when `writes`
    /// (none on a read-only source, which cannot write). The turn is waited
    /// for first, as long as SQLite's busy handler would wait for the lock,
    /// so that waiting writers hold no connection.
    async fn lease(&self, writes: bool) -> Result<Lease, BackendError> {
        if !writes || self.pool.read_only {
            return self.pool.lease().await;
        }
        let turn = match tokio::time::timeout(BUSY_WAIT, self.writer.turn.clone().lock_owned()).await {
            Ok(turn) => turn,
            Err(_) if self.writer.holder_needs_connection.load(Ordering::Relaxed) => {
                return Err(BackendError::PoolExhausted {
                    max_size: self.pool.max_size,
                    waited: BUSY_WAIT,
                })
            }
            Err(_) => {
                return Err(BackendError::Engine {
                    kind: EngineErrorKind::Aborted,
                    code: "5".into(),
                    message: format!(
                        "database is locked: another write (a transaction or a load) held it for {} s",
                        BUSY_WAIT.as_secs()
                    ),
                })
            }
        };
        self.writer.holder_needs_connection.store(true, Ordering::Relaxed);
        let waiting = NeedsConnection(&self.writer.holder_needs_connection);
        let mut lease = self.pool.lease().await?;
        drop(waiting);
        lease.turn = Some(turn);
        Ok(lease)
    }

    /// Runs `f` on a pooled connection on the blocking pool, with the write
    /// turn when it `writes`.
    async fn with_conn<T: Send + 'static>(
        &self,
        writes: bool,
        f: impl FnOnce(&Connection) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let lease = self.lease(writes).await?;
        tokio::task::spawn_blocking(move || f(lease.conn()?))
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?
    }
}

#[async_trait]
impl SqlSource for SqliteSource {
    fn engine(&self) -> Engine {
        Engine::Sqlite
    }

    fn carried(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        Some(Arc::new(Carried {
            temp: self.pool.temp.clone(),
            writer: self.writer.clone(),
        }))
    }

    fn capabilities(&self) -> Capabilities {
        // SQLite transactions are always serializable, which satisfies every level.
        Capabilities::sql("?")
    }

    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        let lease = self.lease(may_write(&statement.sql)).await?;
        start(Hold::Pooled(lease), statement).await
    }

    async fn begin(&self, options: TxOptions) -> Result<Box<dyn SqlTransaction>, BackendError> {
        let read_only = options.read_only || self.pool.read_only;
        // BEGIN IMMEDIATE takes the write lock: the turn is held to the end.
        let lease = self.lease(!read_only).await?;
        let lease = tokio::task::spawn_blocking(move || {
            let conn = lease.conn()?;
            // IMMEDIATE takes the write lock up front, so a read-write
            // transaction cannot fail later on a lock upgrade.
            if read_only {
                set_query_only(conn, true)?;
            }
            let sql = if read_only { "BEGIN" } else { "BEGIN IMMEDIATE" };
            conn.execute_batch(sql).map_err(map_error)?;
            Ok::<_, BackendError>(lease)
        })
        .await
        .map_err(|e| BackendError::Internal(e.to_string()))??;
        Ok(Box::new(SqliteTransaction {
            lease: super::TxSession::new(lease),
            restore_writes: read_only && !self.pool.read_only,
        }))
    }

    async fn connection_info(&self) -> Result<ConnectionInfo, BackendError> {
        let label = self.label.clone();
        self.with_conn(false, move |conn| {
            let started = Instant::now();
            read_header(conn)?;
            let version: String = conn
                .query_row("SELECT sqlite_version()", [], |r| r.get(0))
                .map_err(map_error)?;
            Ok(ConnectionInfo {
                server_version: format!("SQLite {version}"),
                database: label,
                user: String::new(),
                round_trip: started.elapsed(),
                ..Default::default()
            })
        })
        .await
    }

    async fn list_schemas(&self, _include_system: bool) -> Result<Vec<SchemaInfo>, BackendError> {
        self.with_conn(false, schema::list_schemas).await
    }

    async fn list_tables(&self, schema: Option<&str>, page: TablePage) -> Result<Vec<TableInfo>, BackendError> {
        let schema = schema.map(str::to_string);
        self.with_conn(false, move |c| schema::list_tables(c, schema.as_deref(), &page))
            .await
    }

    async fn describe_table(&self, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError> {
        let (schema, table) = (schema.map(str::to_string), table.to_string());
        self.with_conn(false, move |c| schema::describe_table(c, schema.as_deref(), &table))
            .await
    }

    fn refuses(&self, column: &crate::backend::Column, value: &Value) -> Option<String> {
        match value {
            Value::Decimal(d) => bulk::load_decimal(d, column).err(),
            value => refusal(value),
        }
    }

    async fn load(&self, spec: LoadSpec, rows: RowFeed) -> Result<LoadOutcome, BackendError> {
        self.with_conn(true, move |conn| bulk::load(conn, &spec, rows)).await
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        let idle = self.pool.idle.lock().len() as u32;
        let in_use = self
            .pool
            .max_size
            .saturating_sub(self.pool.permits.available_permits() as u32);
        Some(PoolStatus {
            open: idle + in_use,
            idle,
        })
    }
}

struct SqliteTransaction {
    lease: super::TxSession<Lease>,
    /// A read-only transaction on a writable source switched query_only on.
    restore_writes: bool,
}

/// SQLite rolls a whole transaction back when a write in it is interrupted
/// (a deadline, a cancel) or fails on a full disk, and goes on in autocommit.
const ROLLED_BACK_BY_SQLITE: &str = "an interrupted or failed write";

impl SqliteTransaction {
    async fn end(&self, commit: bool) -> Result<(), BackendError> {
        let guard = self.lease.to_end().await?;
        let restore = self.restore_writes;
        tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            let conn = guard.conn()?;
            let ended = match (conn.is_autocommit(), commit) {
                (true, true) => Err(BackendError::TransactionRolledBack(ROLLED_BACK_BY_SQLITE)),
                (true, false) => Ok(()),
                (false, true) => conn.execute_batch("COMMIT").map_err(map_error),
                (false, false) => conn.execute_batch("ROLLBACK").map_err(map_error),
            };
            // Restored even when the statement failed (a caller may have ended
            // the transaction itself), or later writers would find it read-only.
            if restore {
                set_query_only(conn, false)?;
            }
            // Over: the next writer's turn now, not when the handle goes.
            if conn.is_autocommit() {
                guard.turn = None;
            }
            ended
        })
        .await
        .map_err(|e| BackendError::Internal(e.to_string()))?
    }
}

#[async_trait]
impl SqlTransaction for SqliteTransaction {
    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        let guard = self.lease.for_statement().await?;
        if guard.conn()?.is_autocommit() {
            return Err(BackendError::TransactionRolledBack(ROLLED_BACK_BY_SQLITE));
        }
        start(Hold::Transaction(guard), statement).await
    }

    async fn commit(&self) -> Result<(), BackendError> {
        self.end(true).await
    }

    async fn rollback(&self) -> Result<(), BackendError> {
        self.end(false).await
    }
}

/// Starts a statement on the blocking pool and returns once its columns are known.
async fn start(hold: Hold, statement: Statement) -> Result<QueryStream, BackendError> {
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    // Interrupts a statement still running when the caller gives up.
    let (mut worker, pending) = channel::channel(Some(Box::new(move || cancelled.store(true, Ordering::Relaxed))));
    tokio::task::spawn_blocking(move || {
        let mut hold = hold;
        let pooled = matches!(hold, Hold::Pooled(_));
        let unfinished_write = Cell::new(false);
        let outcome = hold.conn().and_then(|conn| {
            let _hooks = StatementHooks::install(conn, &flag, pooled);
            execute(conn, &statement, &mut worker, &flag, &unfinished_write)
        });
        // Closed rather than pooled: the next caller must not find another's
        // pragmas (foreign_keys off, query_only on) or temporary tables,
        // which would shadow the real ones; a transaction's, once it ends.
        let lease: &mut Lease = match &mut hold {
            Hold::Pooled(lease) => lease,
            Hold::Transaction(lease) => {
                // Its writes would stay in the transaction, which the caller
                // could commit believing the statement failed: the
                // transaction ends, as when SQLite itself rolls it back (the
                // caller learns it at its next statement, as on PostgreSQL).
                if unfinished_write.get() {
                    if let Ok(conn) = lease.conn() {
                        if !conn.is_autocommit() && conn.execute_batch("ROLLBACK").is_err() {
                            lease.discard = true;
                        }
                    }
                }
                // SQLite rolled the transaction back (an interrupted or failed
                // write): its write turn is over, whenever the handle ends.
                if lease.conn().is_ok_and(Connection::is_autocommit) {
                    lease.turn = None;
                }
                lease
            }
        };
        if lease.conn().is_ok_and(|c| changed_session(c, &statement.sql)) {
            lease.discard = true;
        }
        // Release the connection (and a transaction's lock) before the caller
        // learns the statement is over, so its next call finds it free.
        drop(hold);
        worker.finish_blocking(outcome);
    });
    pending.started().await
}

/// Whether a statement may write, and so waits for the write turn:
/// anything but a plain read. A `WITH` reads unless a verb that writes is
/// among its words (one in a string or a comment only costs a wait).
fn may_write(sql: &str) -> bool {
    sql_text::leading_words(sql, 1)
        .iter()
        .any(|w| match w.first().map(String::as_str) {
            Some("select" | "values" | "explain") => false,
            Some("with") => sql_text::has_word(sql, &["insert", "update", "delete", "replace"]),
            _ => true,
        })
}

/// Whether `sql` may have left `conn` different for its next caller: a
/// PRAGMA anywhere in it (SQLite sets a flag pragma while it prepares the
/// statement: under EXPLAIN, or as a second statement that is refused,
/// since preparing the first prepares the next to see that there is one),
/// an ATTACH (a temporary database stays with the connection), or a CREATE
/// that made a temporary object. Other statements, reads above all, cost
/// no query here; the word in a string or a comment costs a new connection.
fn changed_session(conn: &Connection, sql: &str) -> bool {
    if sql_text::has_word(sql, &["pragma", "attach"]) {
        return true;
    }
    sql_text::leading_words(sql, 1)
        .iter()
        .any(|w| w.first().is_some_and(|f| f == "create"))
        && conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM temp.sqlite_schema)")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, bool>(0)))
            .unwrap_or(true)
}

/// Marks a writing statement's rows as not all handed over unless disarmed.
/// A `RETURNING` statement makes all its writes at its first step, and
/// resetting it commits them (in autocommit), though its caller is told it
/// failed or has gone; marked, a pooled statement's commit becomes a
/// rollback (its commit hook) and `start` ends a transaction's.
struct Unfinished<'a> {
    abandoned: &'a AtomicBool,
    write: Option<&'a Cell<bool>>,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(write) = self.write {
            write.set(true);
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// Which parameter (0-based) each of the statement's slots takes. SQLite
/// numbers `$2`, `:2` and `@2` by where they first appear, as names, so
/// `SELECT $2, $1` would take its values swapped: their digits say which
/// value they take, as in PostgreSQL. `?`, `?NNN` and names that are not
/// numbers take the slot's own place.
fn param_of_each_slot(prepared: &rusqlite::Statement<'_>) -> Vec<usize> {
    (1..=prepared.parameter_count())
        .map(|slot| {
            prepared
                .parameter_name(slot)
                .and_then(|name| name.strip_prefix(['$', ':', '@']))
                .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|digits| digits.parse::<usize>().ok())
                .filter(|&n| n >= 1)
                .map_or(slot - 1, |n| n - 1)
        })
        .collect()
}

/// Runs the statement, sending its columns and rows; returns rows affected.
fn execute(
    conn: &Connection,
    statement: &Statement,
    worker: &mut Worker,
    abandoned: &AtomicBool,
    unfinished_write: &Cell<bool>,
) -> Result<Option<u64>, BackendError> {
    // `changes()` keeps the last INSERT, UPDATE or DELETE's count through
    // DDL and pragmas: it is this statement's only if the total moved.
    let changed_before = conn.total_changes();
    let mut prepared = conn.prepare(&statement.sql).map_err(map_error)?;
    let takes = param_of_each_slot(&prepared);
    let expected = takes.iter().max().map_or(0, |p| p + 1);
    if expected != statement.params.len() {
        return Err(BackendError::Invalid(format!(
            "the statement has {expected} parameter(s) but {} were given",
            statement.params.len()
        )));
    }
    for (slot, &param) in takes.iter().enumerate() {
        let p = &statement.params[param];
        let value = to_sql(p).map_err(|message| BackendError::Parameter {
            index: param + 1,
            message,
        })?;
        prepared.raw_bind_parameter(slot + 1, value).map_err(map_error)?;
    }
    let columns: Vec<Column> = prepared
        .columns()
        .iter()
        .map(|c| column(c.name(), c.decl_type()))
        .collect();
    let types: Vec<ColumnType> = columns.iter().map(|c| c.column_type).collect();
    let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    let returns_rows = !columns.is_empty();
    if !worker.describe(columns) {
        return Ok(None);
    }
    let writes = !prepared.readonly();
    let mut rows = prepared.raw_query();
    // Declared after `rows`, so dropped (and marking) before `rows` resets
    // the statement. Armed at the first row: a statement SQLite itself
    // failed before that has undone its own writes.
    let mut unfinished = Unfinished { abandoned, write: None };
    let mut gather = worker.gather();
    while let Some(row) = rows.next().map_err(map_error)? {
        if writes {
            unfinished.write = Some(unfinished_write);
        }
        for (i, ty) in types.iter().enumerate() {
            let raw = row.get_ref(i).map_err(map_error)?;
            put(raw, *ty, &mut gather).map_err(|m| BackendError::Invalid(format!("column \"{}\": {m}", names[i])))?;
            gather.check_row_size()?;
        }
        if let Some(chunk) = gather.end_row() {
            if !worker.send_blocking(chunk) {
                return Ok(None);
            }
        }
    }
    drop(rows);
    // Still armed: a caller gone before the last rows reached it leaves
    // its transaction's writes rolled back whichever chunk it missed.
    if gather.rest().is_some_and(|rest| !worker.send_blocking(rest)) {
        return Ok(None);
    }
    unfinished.write = None;
    drop(unfinished);
    let changed = conn.total_changes() != changed_before;
    Ok((!returns_rows).then(|| if changed { conn.changes() } else { 0 }))
}

/// Column metadata from the declared type, following SQLite's affinity rules.
fn column(name: &str, decl: Option<&str>) -> Column {
    let Some(decl) = decl else {
        return Column::new(name, "", ColumnType::Dynamic);
    };
    let upper = decl.to_ascii_uppercase();
    let ty = if upper.starts_with("BOOL") {
        ColumnType::Bool
    } else if upper == "DATE" {
        ColumnType::Date
    } else if upper.starts_with("DATETIME") || upper.starts_with("TIMESTAMP") {
        ColumnType::Timestamp
    } else if upper == "JSON" {
        ColumnType::Json
    } else if upper.contains("INT") {
        ColumnType::Int
    } else if upper.contains("BLOB") {
        ColumnType::Bytes
    } else if upper.contains("CHAR") || upper.contains("CLOB") || upper.contains("TEXT") {
        ColumnType::String
    } else if upper.contains("REAL") || upper.contains("FLOA") || upper.contains("DOUB") {
        ColumnType::Float
    } else if upper.starts_with("DECIMAL") || upper.starts_with("NUMERIC") {
        ColumnType::Decimal
    } else {
        ColumnType::Dynamic
    };
    Column::new(name, decl, ty)
}

/// Gives a stored value, converted for a column of declared type `ty`, to
/// `sink`. SQLite lets any column hold anything, so values that do not fit
/// their declared type fail clearly rather than changing type mid-result.
fn put(raw: ValueRef<'_>, ty: ColumnType, sink: &mut impl RowSink) -> Result<(), String> {
    let text = |b| std::str::from_utf8(b).map_err(|_| "text is not valid UTF-8".to_string());
    let value = match (raw, ty) {
        (ValueRef::Null, _) => Value::Null,
        (ValueRef::Integer(i), ColumnType::Bool) => Value::Bool(i != 0),
        (ValueRef::Integer(i), ColumnType::Decimal) => Value::Decimal(i.to_string()),
        (ValueRef::Real(f), ColumnType::Decimal) => Value::Decimal(match f {
            // Spelled as PostgreSQL's numeric spells them, not Rust's inf.
            f if f == f64::INFINITY => "Infinity".into(),
            f if f == f64::NEG_INFINITY => "-Infinity".into(),
            f => f.to_string(),
        }),
        (ValueRef::Text(t), ColumnType::Date) => {
            let s = text(t)?;
            Value::Date(
                NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| format!("'{s}' is not a date (YYYY-MM-DD)"))?,
            )
        }
        (ValueRef::Text(t), ColumnType::Timestamp) => {
            let s = text(t)?;
            let parsed = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"));
            let parsed = parsed.map_err(|_| format!("'{s}' is not a timestamp (YYYY-MM-DD HH:MM:SS)"))?;
            // chrono reads :60 as a leap second, which no result format can carry.
            if parsed.and_utc().timestamp_subsec_nanos() >= 1_000_000_000 {
                return Err(format!("'{s}' is a leap second, which a timestamp cannot hold"));
            }
            Value::Timestamp(parsed)
        }
        (ValueRef::Text(t), ColumnType::Json) => Value::Json(text(t)?.to_string()),
        // The commonest two are lent, not built.
        (ValueRef::Integer(i), _) => {
            sink.int(i);
            return Ok(());
        }
        (ValueRef::Text(t), _) => {
            sink.text(text(t)?);
            return Ok(());
        }
        (ValueRef::Real(f), _) => Value::Float(f),
        (ValueRef::Blob(b), _) => Value::Bytes(b.to_vec()),
    };
    sink.value(value);
    Ok(())
}

/// SQLite's date functions read four-digit years only (chrono would write
/// `+10000` or `-0044`, which they take for NULL).
fn sqlite_year(d: &chrono::NaiveDate) -> Result<&chrono::NaiveDate, String> {
    use chrono::Datelike;
    if (0..=9999).contains(&d.year()) {
        Ok(d)
    } else {
        Err(format!(
            "year {} is outside SQLite's date range (0000 to 9999)",
            d.year()
        ))
    }
}

/// Why a load would refuse `v` (NaN, an integer past SQLite's, a year
/// outside 0000-9999), checked without converting it: a load asks for every
/// value, then binds it.
fn refusal(v: &Value) -> Option<String> {
    match v {
        // Refused or converted without a copy.
        Value::UInt(_) | Value::Float(_) | Value::Time(_, Some(_)) | Value::Interval { .. } | Value::List(_) => {
            to_sql(v).err()
        }
        Value::Date(d) => sqlite_year(d).err(),
        Value::Timestamp(t) => sqlite_year(&t.date()).err(),
        Value::TimestampTz(t) => sqlite_year(&t.date_naive()).err(),
        _ => None,
    }
}

/// A decimal's infinity as SQLite's REAL one (as Weir reads it back); NaN
/// SQLite cannot store (it would become NULL).
pub(super) fn special(s: &str) -> Result<Option<SqlValue>, String> {
    match special_decimal(s) {
        Some(f) if f.is_nan() => Err(NO_NAN.into()),
        special => Ok(special.map(SqlValue::Real)),
    }
}

const NO_NAN: &str = "SQLite cannot store NaN (it would become NULL)";

/// Binds a value as the SQLite storage class that represents it.
fn to_sql(v: &Value) -> Result<SqlValue, String> {
    Ok(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Int(i) => SqlValue::Integer(*i),
        Value::UInt(u) => {
            SqlValue::Integer(i64::try_from(*u).map_err(|_| format!("{u} is larger than SQLite's 64-bit integers"))?)
        }
        // SQLite stores a NaN it is given as NULL.
        Value::Float(f) if f.is_nan() => return Err(NO_NAN.into()),
        Value::Float(f) => SqlValue::Real(*f),
        Value::Decimal(s) => decimal(s)?,
        Value::Text(s) | Value::Json(s) => SqlValue::Text(s.clone()),
        Value::Bytes(b) => SqlValue::Blob(b.clone()),
        Value::Date(d) => SqlValue::Text(sqlite_year(d)?.format("%Y-%m-%d").to_string()),
        Value::Time(t, None) => SqlValue::Text(t.format("%H:%M:%S%.f").to_string()),
        // Dropped, it would change the time without a word.
        Value::Time(_, Some(_)) => return Err("SQLite's times have no UTC offset; send the time without one".into()),
        Value::Timestamp(t) => {
            sqlite_year(&t.date())?;
            SqlValue::Text(t.format("%Y-%m-%d %H:%M:%S%.f").to_string())
        }
        // SQLite has no zones: store UTC in the form its date functions read.
        Value::TimestampTz(t) => {
            sqlite_year(&t.date_naive())?;
            SqlValue::Text(t.naive_utc().format("%Y-%m-%d %H:%M:%S%.f").to_string())
        }
        Value::Uuid(u) => SqlValue::Text(u.to_string()),
        Value::Interval { .. } => return Err("SQLite has no interval type".into()),
        Value::List(_) => return Err("SQLite has no array type".into()),
    })
}

/// A decimal as SQLite's own NUMERIC affinity would store it: an integer
/// when it is one, a REAL when 15 significant digits hold it (trailing
/// zeros, before the point too, are the exponent's: `100000000000000000000`
/// is 1e20), else its text (kept exact). Bound as text it would compare as
/// text where the other side has no affinity (an expression, a view's SUM):
/// in SQLite every number is less than every text, so `total > '100'` is
/// never true. NaN and the infinities as `special`.
pub(super) fn decimal(s: &str) -> Result<SqlValue, String> {
    if let Ok(i) = s.parse::<i64>() {
        return Ok(SqlValue::Integer(i));
    }
    if let Some(special) = special(s)? {
        return Ok(special);
    }
    let mantissa = s.split(['e', 'E']).next().unwrap_or_default();
    let significant = mantissa
        .chars()
        .filter(char::is_ascii_digit)
        .skip_while(|d| *d == '0')
        .collect::<String>()
        .trim_end_matches('0')
        .len();
    // Digits a double holds, and no more: one that underflows to zero or to
    // a subnormal (1e-400, 1e-320) would lose them without a word.
    Ok(match s.parse::<f64>() {
        Ok(f) if f.is_finite() && significant <= 15 && (significant == 0 || f.abs() >= f64::MIN_POSITIVE) => {
            SqlValue::Real(f)
        }
        _ => SqlValue::Text(s.to_string()),
    })
}

fn map_error(e: rusqlite::Error) -> BackendError {
    use rusqlite::ErrorCode as C;
    use EngineErrorKind as K;
    let (err, message) = match e {
        rusqlite::Error::SqliteFailure(err, message) => (err, message.unwrap_or_else(|| err.to_string())),
        // Prepare errors carry the offending offset in the SQL text.
        rusqlite::Error::SqlInputError { error, msg, offset, .. } => (error, format!("{msg} (at offset {offset})")),
        rusqlite::Error::InvalidParameterCount(given, expected) => {
            return BackendError::Invalid(format!(
                "the statement has {expected} parameter(s) but {given} were given"
            ));
        }
        other => {
            return BackendError::Engine {
                kind: K::InvalidArgument,
                code: String::new(),
                message: other.to_string(),
            }
        }
    };
    let kind = match err.code {
        C::ConstraintViolation => match err.extended_code {
            // SQLITE_CONSTRAINT_PRIMARYKEY, _UNIQUE, _ROWID
            1555 | 2067 | 2579 => K::AlreadyExists,
            // SQLITE_CONSTRAINT_DATATYPE: a value a STRICT table's column cannot take.
            3091 => K::InvalidArgument,
            _ => K::FailedPrecondition,
        },
        C::DatabaseBusy | C::DatabaseLocked => K::Aborted,
        C::ReadOnly | C::AuthorizationForStatementDenied => K::PermissionDenied,
        C::OperationInterrupted => K::DeadlineExceeded,
        C::CannotOpen | C::SystemIoFailure => K::Unavailable,
        // Retrying a damaged file does not help.
        C::DatabaseCorrupt | C::NotADatabase => K::Internal,
        C::DiskFull | C::OutOfMemory | C::TooBig => K::ResourceExhausted,
        C::TypeMismatch | C::ParameterOutOfRange => K::InvalidArgument,
        // As PostgreSQL's 42P01, 42883 and 42704 (an unknown column stays
        // INVALID_ARGUMENT, as 42703 does).
        _ if ["no such table", "no such function", "no such index", "no such view"]
            .iter()
            .any(|p| message.starts_with(p)) =>
        {
            K::NotFound
        }
        C::Unknown => K::InvalidArgument,
        _ => K::Internal,
    };
    BackendError::Engine {
        kind,
        code: err.extended_code.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_bound_as_the_numbers_sqlite_would_store() {
        let decimal = |s: &str| decimal(s).expect(s);
        assert_eq!(decimal("100"), SqlValue::Integer(100));
        assert_eq!(decimal("-7"), SqlValue::Integer(-7));
        assert_eq!(decimal("9.99"), SqlValue::Real(9.99));
        assert_eq!(decimal("0.000123400"), SqlValue::Real(0.0001234));
        assert_eq!(decimal("1.5e3"), SqlValue::Real(1500.0));
        assert_eq!(decimal("123456789012345.6"), SqlValue::Text("123456789012345.6".into()));
        assert_eq!(
            decimal("98765432109876543210"),
            SqlValue::Text("98765432109876543210".into())
        );
        // Past i64, as Weir writes a large REAL of a DECIMAL column.
        assert_eq!(decimal("100000000000000000000"), SqlValue::Real(1e20));
        assert_eq!(decimal("Infinity"), SqlValue::Real(f64::INFINITY));
        assert_eq!(decimal("-Infinity"), SqlValue::Real(f64::NEG_INFINITY));
        assert!(super::decimal("NaN").is_err());
        // Too small for a double's digits: kept as text, not made zero.
        for tiny in ["1e-400", "1e-320", "-2.5e-310"] {
            assert_eq!(decimal(tiny), SqlValue::Text(tiny.into()), "{tiny}");
        }
        assert_eq!(decimal("0.000e-400"), SqlValue::Real(0.0));
        assert_eq!(decimal("2.5e-308"), SqlValue::Real(2.5e-308));
    }

    #[test]
    fn loaded_decimals_bind_by_their_columns_type() {
        let load =
            |d: &str, declared: &str| bulk::load_decimal(d, &column("c", Some(declared).filter(|t| !t.is_empty())));
        // No declared type converts no text: a number binds as a number.
        assert_eq!(load("10.5", ""), Ok(SqlValue::Real(10.5)));
        assert_eq!(load("7", ""), Ok(SqlValue::Integer(7)));
        assert_eq!(load("10.50", "TEXT"), Ok(SqlValue::Text("10.50".into())));
        assert_eq!(load("10.50", "DECIMAL(10,2)"), Ok(SqlValue::Text("10.50".into())));
        assert_eq!(load("Infinity", "DECIMAL"), Ok(SqlValue::Real(f64::INFINITY)));
        assert_eq!(load("NaN", "TEXT"), Ok(SqlValue::Text("NaN".into())));
        assert!(load("NaN", "DECIMAL").is_err() && load("NaN", "").is_err());
        // Past what SQLite keeps of a number: refused where the column's
        // affinity would round it (or make it 0), kept where nothing converts.
        let long = "12345678901234567890.12";
        for declared in ["DECIMAL(38,2)", "NUMERIC", "MONEY", "REAL", "BIGINT"] {
            assert!(
                load(long, declared).is_err_and(|e| e.contains("TEXT column")),
                "{declared}"
            );
            assert!(load("1e-400", declared).is_err(), "{declared}");
        }
        assert_eq!(load(long, "VARCHAR(40)"), Ok(SqlValue::Text(long.into())));
        assert_eq!(load(long, ""), Ok(SqlValue::Text(long.into())));
        assert_eq!(load(long, "BLOB"), Ok(SqlValue::Text(long.into())));
        assert_eq!(
            load("9223372036854775807", "DECIMAL"),
            Ok(SqlValue::Text("9223372036854775807".into()))
        );
    }

    #[test]
    fn times_with_a_utc_offset_are_refused_not_cut() {
        let ten = chrono::NaiveTime::from_hms_opt(10, 0, 0).expect("time");
        assert!(matches!(to_sql(&Value::Time(ten, None)), Ok(SqlValue::Text(s)) if s == "10:00:00"));
        assert!(to_sql(&Value::Time(ten, Some(7200))).is_err());
    }

    #[test]
    fn dates_beyond_four_digit_years_are_refused() {
        let date = |y| chrono::NaiveDate::from_ymd_opt(y, 3, 15).expect("date");
        assert!(matches!(to_sql(&Value::Date(date(44))), Ok(SqlValue::Text(s)) if s == "0044-03-15"));
        for year in [-44, 10_000] {
            let at = date(year).and_hms_opt(12, 0, 0).expect("timestamp");
            assert!(
                to_sql(&Value::Date(date(year))).is_err_and(|e| e.contains("0000 to 9999")),
                "{year}"
            );
            assert!(to_sql(&Value::Timestamp(at)).is_err(), "{year}");
            assert!(to_sql(&Value::TimestampTz(at.and_utc())).is_err(), "{year}");
        }
    }
}

//! Engine-independent backend interface. Services talk to these traits only;
//! engines never see protobuf types.

pub mod breaker;
pub mod bulk;
pub mod changes;
pub mod channel;
pub mod error;
pub mod kafka;
pub mod mssql;
pub mod mysql;
pub mod pool;
pub mod postgres;
pub mod sql_text;
pub mod sqlite;
pub mod tls;
pub mod topics;
pub mod types;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::Stream;

pub use bulk::{LoadMode, LoadOutcome, LoadSpec, RowFeed};
pub use changes::{ChangeFeed, WatchSpec};
pub use error::{BackendError, EngineErrorKind};
pub use topics::TopicSource;
pub use types::*;

use crate::config::{EngineKind, SourceConfig};

/// Cancels and kills of abandoned statements: shutdown waits for these
/// (`settle_cancels`), so that a statement cut at shutdown is cancelled in
/// the engine before the process, and its runtime, are gone.
pub static CANCELS: std::sync::LazyLock<tokio_util::task::TaskTracker> =
    std::sync::LazyLock::new(tokio_util::task::TaskTracker::new);

/// Waits, at most `within`, for the cancels under way.
pub async fn settle_cancels(within: std::time::Duration) {
    CANCELS.close();
    let _ = tokio::time::timeout(within, CANCELS.wait()).await;
    // Other servers of the process (tests run several) go on tracking.
    CANCELS.reopen();
}

/// How long a transaction's statement, or its end, waits for the statement
/// before it. A statement abandoned by its deadline or its caller holds the
/// session a moment longer while it is cancelled; without the wait, the
/// caller's next statement would find the transaction busy.
pub(crate) const TURN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A transaction's session, which its statements and its end take in turn.
pub struct TxSession<T> {
    session: Arc<tokio::sync::Mutex<T>>,
    /// Commit or Rollback has begun; set and read under the session's lock.
    ended: std::sync::atomic::AtomicBool,
}

impl<T> TxSession<T> {
    pub fn new(session: T) -> Self {
        Self {
            session: Arc::new(tokio::sync::Mutex::new(session)),
            ended: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The session, once the statement before is done with it (`Busy` when
    /// it runs on past `TURN_WAIT`).
    async fn turn(&self) -> Result<tokio::sync::OwnedMutexGuard<T>, BackendError> {
        tokio::time::timeout(TURN_WAIT, self.session.clone().lock_owned())
            .await
            .map_err(|_| BackendError::Busy)
    }

    /// The session for a statement. One that waited behind Commit or
    /// Rollback is refused: run on the session, it would run outside the
    /// transaction.
    pub async fn for_statement(&self) -> Result<tokio::sync::OwnedMutexGuard<T>, BackendError> {
        let session = self.turn().await?;
        if self.ended.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BackendError::TransactionEnded);
        }
        Ok(session)
    }

    /// The session, to end the transaction on: later statements are
    /// refused, and so is a second Commit or Rollback (one that raced the
    /// first, or the reaper): run again, PostgreSQL's `SELECT 1; COMMIT`
    /// would find no transaction and report success whatever became of the
    /// first.
    pub async fn to_end(&self) -> Result<tokio::sync::OwnedMutexGuard<T>, BackendError> {
        let session = self.turn().await?;
        if self.ended.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return Err(BackendError::TransactionEnded);
        }
        Ok(session)
    }
}

/// Takes a row's values one at a time, so that an engine can hand over text
/// straight from its receive buffer instead of copying it into a `Value`.
pub trait RowSink {
    fn value(&mut self, value: Value);
    /// A text value (what would be `Value::Text`), borrowed.
    fn text(&mut self, text: &str);
    /// An integer (what would be `Value::Int`), the commonest column type.
    fn int(&mut self, value: i64);
}

/// A row collected as owned values.
impl RowSink for Row {
    fn value(&mut self, value: Value) {
        self.push(value);
    }

    fn text(&mut self, text: &str) {
        self.push(Value::Text(text.to_owned()));
    }

    fn int(&mut self, value: i64) {
        self.push(Value::Int(value));
    }
}

/// Rows of a running statement. Dropping it before the end cancels the
/// statement in the engine.
pub trait RowStream: Stream<Item = Result<Row, BackendError>> + Send {
    /// Rows inserted/updated/deleted, known once the stream has ended.
    fn rows_affected(&self) -> Option<u64>;

    /// The next row, given value by value to `sink` (`Some(Ok(()))` once a
    /// row is complete). Engines that can lend their text override it (and
    /// may then collect their own rows through it: `Row` is a sink).
    fn poll_next_into(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        sink: &mut dyn RowSink,
    ) -> Poll<Option<Result<(), BackendError>>> {
        self.poll_next(cx).map(|next| {
            next.map(|row| {
                row.map(|values| {
                    for value in values {
                        sink.value(value);
                    }
                })
            })
        })
    }
}

/// Drops `value` on the blocking pool when there is a runtime: a drop that
/// blocks (closing a Kafka consumer, or a SQLite connection that rolls back
/// and checkpoints) would hold up every call a runtime worker serves.
pub(crate) fn drop_off_runtime<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(value))),
        Err(_) => drop(value),
    }
}

/// `Stream::poll_next` of a row stream that overrides `poll_next_into`
/// (else the two would call each other): the next row, collected as owned values.
pub fn collect_row<S: RowStream + ?Sized>(
    stream: Pin<&mut S>,
    cx: &mut Context<'_>,
    width: usize,
) -> Poll<Option<Result<Row, BackendError>>> {
    let mut values = Row::with_capacity(width);
    stream
        .poll_next_into(cx, &mut values)
        .map(|next| next.map(|row| row.map(|()| values)))
}

/// A statement that has started: its columns, then its rows.
pub struct QueryStream {
    pub columns: Vec<Column>,
    pub rows: Pin<Box<dyn RowStream>>,
}

/// The most one row of a result may hold, encoded: it goes in one message,
/// and the Rust client takes messages of up to 64 MiB. A row past it ends
/// the result ([`BackendError::RowTooLarge`]) instead of a message no
/// client reads, and before an embedded engine's row grows without bound.
pub const MAX_ROW_BYTES: usize = 63 * 1024 * 1024;

/// A SQL source: a pooled connection to one database.
#[async_trait]
pub trait SqlSource: Send + Sync + 'static {
    fn engine(&self) -> Engine;
    fn capabilities(&self) -> Capabilities;
    /// Runs a statement in autocommit mode.
    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError>;
    /// Opens a transaction on a connection of its own.
    async fn begin(&self, options: TxOptions) -> Result<Box<dyn SqlTransaction>, BackendError>;
    /// Reaches the engine and reports who and where we are.
    async fn connection_info(&self) -> Result<ConnectionInfo, BackendError>;
    async fn list_schemas(&self, include_system: bool) -> Result<Vec<SchemaInfo>, BackendError>;
    async fn list_tables(&self, schema: Option<&str>, page: TablePage) -> Result<Vec<TableInfo>, BackendError>;
    async fn describe_table(&self, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError>;
    /// Loads `rows` into the table through the engine's bulk path, in one
    /// transaction that commits only when the feed ends complete.
    async fn load(&self, spec: LoadSpec, rows: RowFeed) -> Result<LoadOutcome, BackendError>;
    /// Why the engine's load path would refuse `value` for `column` whatever
    /// the table holds (PostgreSQL text cannot hold NUL, SQLite no NaN), so
    /// that a load that skips bad rows skips such a row too instead of
    /// failing on it.
    fn refuses(&self, column: &Column, value: &Value) -> Option<String> {
        let _ = (column, value);
        None
    }
    /// Starts streaming the changes of `spec.tables`, creating the
    /// subscription's engine state on first use.
    async fn watch(&self, spec: WatchSpec) -> Result<ChangeFeed, BackendError> {
        let _ = spec;
        Err(self.no_change_streams())
    }
    /// Drops the subscription's engine state so the engine stops retaining changes for it.
    async fn delete_subscription(&self, id: &str, name: &str) -> Result<(), BackendError> {
        let _ = (id, name);
        Err(self.no_change_streams())
    }
    fn no_change_streams(&self) -> BackendError {
        BackendError::ChangesNotReady(format!("{:?} sources have no change streams", self.engine()))
    }
    /// What this source hands to the source a reload replaces it with at
    /// the same place (see [`connect`]): an embedded database's file and
    /// write turn; `None` for a server, which keeps its data itself.
    fn carried(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        None
    }
    /// Connections open and idle, for metrics; `None` where the pool does not tell.
    fn pool_status(&self) -> Option<PoolStatus> {
        None
    }
    /// The source's circuit breaker, for metrics; `None` for embedded engines.
    fn circuit(&self) -> Option<breaker::CircuitState> {
        None
    }
}

/// An open transaction. Statements run one at a time: a statement issued
/// while another is still streaming fails with `BackendError::Busy`.
#[async_trait]
pub trait SqlTransaction: Send + Sync {
    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError>;
    async fn commit(&self) -> Result<(), BackendError>;
    async fn rollback(&self) -> Result<(), BackendError>;
}

/// A source's backend: SQL, or topics. Services ask for the kind a call
/// needs and get FAILED_PRECONDITION for the other.
#[derive(Clone)]
pub enum Backend {
    Sql(Arc<dyn SqlSource>),
    Topics(Arc<dyn TopicSource>),
}

impl Backend {
    pub fn engine(&self) -> Engine {
        match self {
            Backend::Sql(s) => s.engine(),
            Backend::Topics(_) => Engine::Kafka,
        }
    }

    pub fn capabilities(&self) -> Capabilities {
        match self {
            Backend::Sql(s) => s.capabilities(),
            Backend::Topics(t) => t.capabilities(),
        }
    }

    pub async fn connection_info(&self) -> Result<ConnectionInfo, BackendError> {
        match self {
            Backend::Sql(s) => s.connection_info().await,
            Backend::Topics(t) => t.connection_info().await,
        }
    }

    pub fn pool_status(&self) -> Option<PoolStatus> {
        match self {
            Backend::Sql(s) => s.pool_status(),
            Backend::Topics(_) => None,
        }
    }

    pub fn circuit(&self) -> Option<breaker::CircuitState> {
        match self {
            Backend::Sql(s) => s.circuit(),
            Backend::Topics(_) => None,
        }
    }

    /// The SQL backend, or why this source has none.
    pub fn sql(&self) -> Result<&Arc<dyn SqlSource>, BackendError> {
        match self {
            Backend::Sql(s) => Ok(s),
            Backend::Topics(_) => Err(BackendError::WrongKind(
                "this is a Kafka source: use StreamService (Produce, Consume, ListTopics)",
            )),
        }
    }

    /// The topic backend, or why this source has none.
    pub fn topics(&self) -> Result<&Arc<dyn TopicSource>, BackendError> {
        match self {
            Backend::Topics(t) => Ok(t),
            Backend::Sql(_) => Err(BackendError::WrongKind(
                "this is a SQL source: use QueryService, SchemaService or BulkLoadService",
            )),
        }
    }
}

/// Builds the backend for a configured source. Pools connect lazily, so a
/// source that is down at start does not stop the gateway.
/// `replaces`: the backend of the source this one takes over from, when
/// it reaches the same place (see [`SourceConfig::same_target`]); what its
/// running streams are known by passes on (see [`topics::TopicSource::carried`]),
/// and an embedded database's file (see [`SqlSource::carried`]).
pub fn connect(name: &str, config: &SourceConfig, replaces: Option<&Backend>) -> Result<Backend, BackendError> {
    Ok(match config.engine {
        EngineKind::Postgres => Backend::Sql(Arc::new(postgres::PostgresSource::new(config)?)),
        EngineKind::Mysql => Backend::Sql(Arc::new(mysql::MysqlSource::new(config)?)),
        EngineKind::Sqlite => {
            let carried = replaces.and_then(|b| b.sql().ok()).and_then(|s| s.carried());
            Backend::Sql(Arc::new(sqlite::SqliteSource::open(name, config, carried)?))
        }
        EngineKind::Mssql => Backend::Sql(Arc::new(mssql::MssqlSource::new(config)?)),
        EngineKind::Kafka => {
            let carried = replaces.and_then(|b| b.topics().ok()).map(|t| t.carried());
            Backend::Topics(Arc::new(kafka::KafkaSource::new(config, carried)?))
        }
    })
}

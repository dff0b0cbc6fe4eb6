//! Engine-independent backend interface. Services talk to these traits only;
//! engines never see protobuf types.

pub mod bulk;
pub mod channel;
pub mod error;
pub mod mssql;
pub mod mysql;
pub mod pool;
pub mod postgres;
pub mod sqlite;
pub mod types;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::Stream;

pub use bulk::{LoadMode, LoadOutcome, LoadSpec, RowFeed};
pub use error::{BackendError, EngineErrorKind};
pub use types::*;

use crate::config::{EngineKind, SourceConfig};

/// Rows of a running statement. Dropping it before the end cancels the
/// statement in the engine.
pub trait RowStream: Stream<Item = Result<Row, BackendError>> + Send {
    /// Rows inserted/updated/deleted, known once the stream has ended.
    fn rows_affected(&self) -> Option<u64>;
}

/// A statement that has started: its columns, then its rows.
pub struct QueryStream {
    pub columns: Vec<Column>,
    pub rows: Pin<Box<dyn RowStream>>,
}

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
    async fn list_tables(&self, schema: Option<&str>) -> Result<Vec<TableInfo>, BackendError>;
    async fn describe_table(&self, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError>;
    /// Loads `rows` into the table through the engine's bulk path, in one
    /// transaction that commits only when the feed ends complete.
    async fn load(&self, spec: LoadSpec, rows: RowFeed) -> Result<LoadOutcome, BackendError>;
    /// Connections open and idle, for metrics; `None` where the pool does not tell.
    fn pool_status(&self) -> Option<PoolStatus> {
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

/// Builds the backend for a configured source. Pools connect lazily, so a
/// source that is down at start does not stop the gateway.
pub fn connect(name: &str, config: &SourceConfig) -> Result<Arc<dyn SqlSource>, BackendError> {
    Ok(match config.engine {
        EngineKind::Postgres => Arc::new(postgres::PostgresSource::new(config)?),
        EngineKind::Mysql => Arc::new(mysql::MysqlSource::new(config)?),
        EngineKind::Sqlite => Arc::new(sqlite::SqliteSource::open(name, config)?),
        EngineKind::Mssql => Arc::new(mssql::MssqlSource::new(config)?),
    })
}

//! PostgreSQL through tokio-postgres and a bb8 pool, with a prepared-statement
//! cache per connection and cancellation of abandoned statements.

mod bulk;
mod cancel;
mod changes;
mod multiplex;
mod net;
mod pgoutput;
mod replication;
mod schema;
mod session;
mod tls;
pub mod types;
pub use changes::lock_key;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bb8::PooledConnection;
use futures::Stream;
use tokio::net::TcpStream;
use tokio::sync::OwnedMutexGuard;
use tokio::task::AbortHandle;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::Type;
use tokio_postgres::{CancelToken, Client, NoTls};

use crate::backend::error::{classify_sqlstate, EngineErrorKind};
use crate::backend::pool::FailFastPool;
use crate::backend::{
    BackendError, Capabilities, ChangeFeed, Column, ColumnType, ConnectionInfo, Engine, Isolation, LoadOutcome,
    LoadSpec, PoolStatus, QueryStream, Row, RowFeed, RowSink, RowStream, SchemaInfo, SqlSource, SqlTransaction,
    Statement, TableDescription, TableInfo, TablePage, TxOptions, Value, WatchSpec,
};
use crate::config::{PoolConfig, SessionReset, SourceConfig};
use multiplex::{InFlight, Multiplexer};
use tls::Tls;
use types::{PgParam, PgValue};

/// Longer statements are prepared each time, so the cache stays small whatever callers send.
const MAX_CACHED_SQL: usize = 16 * 1024;
/// Prepared statements kept per connection; the cache is cleared when full.
const STATEMENT_CACHE_SIZE: usize = 256;

/// A statement prepared on one connection.
#[derive(Clone)]
struct Prepared {
    statement: tokio_postgres::Statement,
    /// It cannot change the session (see `session`): no reset is needed after it.
    leaves_session: bool,
    /// A `DISCARD` or `DEALLOCATE`, which may drop the statements the
    /// driver prepared for itself (see `PgConn::retire`).
    drops_statements: bool,
}

/// Kinds of statements after which a statement prepared before may name
/// another object or return other columns: DDL (`ALTER TABLE ... ADD
/// COLUMN` in a transaction left a cached `SELECT *` to fail with 0A000 at
/// every retry, as only a transaction's first statement is prepared
/// again), a temporary table shadowing a table (a cached statement went on
/// reading the permanent one, without an error), `DEALLOCATE`, code that
/// may do any of these (`DO`, `CALL`), and the settings names resolve by
/// (`search_path`, the role). PostgreSQL plans a prepared statement again
/// after DDL, but refuses one whose columns changed, and never looks its
/// names up again for a temporary table that shadows one. Other `SET`s
/// (`SET LOCAL app.tenant_id`, at the start of every transaction of a
/// row-level-security design) keep the cache.
fn changes_what_names_mean(sql: &str) -> bool {
    const KINDS: &[&str] = &[
        "create",
        "alter",
        "drop",
        "discard",
        "deallocate",
        "do",
        "call",
        "import",
    ];
    const NAMING: &[&str] = &["search_path", "role", "authorization", "all"];
    KINDS.iter().any(|w| crate::backend::sql_text::starts_with_word(sql, w))
        || crate::backend::sql_text::leading_words(sql, 3).iter().any(|words| {
            matches!(words.first().map(String::as_str), Some("set" | "reset"))
                && words.iter().skip(1).any(|w| NAMING.contains(&w.as_str()))
        })
        || sets_names_by_function(sql)
}

/// `SELECT set_config('search_path', ...)` (or `'role'`) in the text: a
/// `set_config` of another setting (`'app.user_role'`), as row-level-security
/// designs run in every transaction, keeps the cache.
fn sets_names_by_function(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    lower.split("set_config").skip(1).any(|call| {
        let name = call
            .trim_start()
            .strip_prefix('(')
            .map(str::trim_start)
            .and_then(|args| args.strip_prefix('\''))
            .and_then(|args| args.split_once('\''))
            .map(|(name, _)| name);
        matches!(name, Some("search_path" | "role"))
    })
}

pub struct PgConn {
    client: Client,
    /// Ends the connection at once (see `Drop`).
    driver: AbortHandle,
    cancel: CancelToken,
    /// Where `cancel` goes (TLS or not, as the session itself).
    target: Arc<Target>,
    /// The address the session reached: its cancel requests go there, not
    /// to whatever the host name resolves to by then.
    address: Option<SocketAddr>,
    statements: HashMap<String, Prepared>,
    /// Set between BEGIN and COMMIT/ROLLBACK: a connection returned to the
    /// pool in that state is discarded rather than reused.
    in_transaction: bool,
    /// A statement that may have changed the session ran since the last
    /// reset: its BEGIN, SET, advisory locks, LISTEN or temporary tables must
    /// not reach the next caller (nor undo a read-only default). Plain reads
    /// do not set it (see `session`), unless `session_reset = "always"`.
    needs_reset: bool,
    /// The session may be inside a transaction block, so its reset starts
    /// with ROLLBACK. A statement that returns rows (SELECT, SHOW, ...
    /// RETURNING) cannot open one, whatever functions it calls; only the
    /// others can (BEGIN, but also a plain INSERT as far as the driver can
    /// tell). Without this, every reset would write "there is no transaction
    /// in progress" to the database's log.
    needs_rollback: bool,
    /// Why the session is not to be used again: a statement on it was
    /// abandoned and may still run, or be cancelled by a signal that has not
    /// arrived yet (or a transaction could not be begun again). It is closed
    /// rather than given to the next caller.
    broken: Option<&'static str>,
    /// The session lost statements the driver prepared for itself and keeps
    /// for its life (its lookups of user-defined types: `DISCARD ALL`,
    /// `DEALLOCATE ALL`): every later statement meeting a type not looked up
    /// yet would fail. Closed rather than pooled, once its caller is done.
    retire: bool,
    /// The BEGIN of a transaction none of whose statements has run yet. Its
    /// first statement, refused for a plan gone stale, begins it again and
    /// runs again: nothing in it has been seen or written.
    fresh_begin: Option<String>,
}

impl PgConn {
    async fn prepare(&mut self, sql: &str) -> Result<Prepared, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let prepared = Prepared {
            statement: self.client.prepare(sql).await?,
            leaves_session: session::leaves_session_unchanged(sql),
            drops_statements: ["discard", "deallocate"]
                .iter()
                .any(|w| crate::backend::sql_text::starts_with_word(sql, w)),
        };
        // One that may change what the others name or return (see
        // `changes_what_names_mean`) empties the cache before it runs, and
        // is not kept itself: every run of it empties it again.
        if changes_what_names_mean(sql) {
            self.statements.clear();
        } else {
            cache_statement(&mut self.statements, sql, prepared.clone());
        }
        Ok(prepared)
    }
}

/// Keeps what was prepared for `sql`, within the cache's bounds.
fn cache_statement<T>(statements: &mut HashMap<String, T>, sql: &str, prepared: T) {
    if sql.len() > MAX_CACHED_SQL {
        return;
    }
    if statements.len() >= STATEMENT_CACHE_SIZE {
        statements.clear();
    }
    statements.insert(sql.to_string(), prepared);
}

/// Where and how a session is opened: tokio-postgres's settings, and TLS
/// when the source asks for it.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Option<Tls>,
}

impl Target {
    /// A target without TLS.
    #[cfg(test)]
    fn plain(config: tokio_postgres::Config) -> Self {
        Self { config, tls: None }
    }

    /// The server's port.
    fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }

    /// Opens a session whose connection is driven by a task of its own, and
    /// says which address it reached (none over a Unix socket): a host name
    /// may resolve to several, and a cancel request must go to this one.
    async fn connect(&self) -> Result<Driven, BackendError> {
        let port = self.port();
        let timeout = self.config.get_connect_timeout().copied();
        match self.config.get_hosts().first() {
            Some(Host::Tcp(name)) => {
                let addresses = net::addresses(name, port).await.map_err(connect_error)?;
                let ((client, driver), address) = self.open_first(name, addresses, timeout).await?;
                Ok(Driven {
                    client,
                    address: Some(address),
                    driver,
                })
            }
            #[cfg(unix)]
            Some(host @ Host::Unix(_)) => {
                if self.tls.is_some() {
                    return Err(BackendError::Invalid(
                        "tls = true needs a host name, not a Unix socket directory".into(),
                    ));
                }
                let session = async {
                    let stream = net::socket(host, port).await.map_err(connect_error)?;
                    self.config.connect_raw(stream, NoTls).await.map_err(map_connect_error)
                };
                let (client, driver) = drive(bounded(timeout, session).await?);
                Ok(Driven {
                    client,
                    address: None,
                    driver,
                })
            }
            None => Err(BackendError::Invalid("the source names no host".into())),
        }
    }

    /// A session at the first of `addresses` that takes one, each tried
    /// through startup and authentication, as tokio-postgres does: one server
    /// of several may be down, starting up or refusing.
    async fn open_first(
        &self,
        name: &str,
        addresses: Vec<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Result<((Client, AbortHandle), SocketAddr), BackendError> {
        let mut last = BackendError::Unavailable("the host name has no address".into());
        for address in addresses {
            match self.open(name, address, timeout).await {
                Ok(client) => return Ok((client, address)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A session at `address` of the server named `name` (TLS verifies that name).
    async fn open(
        &self,
        name: &str,
        address: SocketAddr,
        timeout: Option<Duration>,
    ) -> Result<(Client, AbortHandle), BackendError> {
        let session = async {
            let stream = net::session_tcp(address, &self.config).await.map_err(connect_error)?;
            match &self.tls {
                Some(tls) => {
                    let tls =
                        MakeTlsConnect::<TcpStream>::make_tls_connect(&mut tls.clone(), name).map_err(connect_error)?;
                    Ok(drive(
                        self.config.connect_raw(stream, tls).await.map_err(map_connect_error)?,
                    ))
                }
                None => Ok(drive(
                    self.config
                        .connect_raw(stream, NoTls)
                        .await
                        .map_err(map_connect_error)?,
                )),
            }
        };
        bounded(timeout, session).await
    }
}

/// `session` (socket, TLS, startup and authentication) within `timeout`. A
/// server that takes connections and then never answers (a stalled disk, a
/// proxy whose database is gone) is down: unbounded, each attempt would hold
/// a pool slot and callers would see a busy pool instead of UNAVAILABLE.
async fn bounded<T>(
    timeout: Option<Duration>,
    session: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    match timeout {
        Some(limit) => tokio::time::timeout(limit, session).await.unwrap_or_else(|_| {
            Err(BackendError::Unavailable(format!(
                "the server did not open a session within connect_timeout ({limit:?})"
            )))
        }),
        None => session.await,
    }
}

/// A socket that could not be opened; the error names no host.
fn connect_error(e: std::io::Error) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

/// A session and the task that drives its connection.
struct Driven {
    client: Client,
    /// The address reached; none over a Unix socket.
    address: Option<SocketAddr>,
    /// Ends the connection at once. Dropping the client alone lets it
    /// answer every statement already sent first.
    driver: AbortHandle,
}

/// Spawns the task that drives a session's connection.
fn drive<S, T>((client, connection): (Client, tokio_postgres::Connection<S, T>)) -> (Client, AbortHandle)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    (client, driver.abort_handle())
}

pub struct PgManager {
    target: Arc<Target>,
}

/// A session the pool lets go of while its state is unknown (broken, or
/// left in a transaction: a statement that would not stop, a protocol
/// lost) is closed at once. Dropping the client alone would keep the
/// server's session, its transaction and locks with it, until every
/// statement sent had been answered, while the pool opened another.
impl Drop for PgConn {
    fn drop(&mut self) {
        if self.broken.is_some() || self.in_transaction {
            self.driver.abort();
        }
    }
}

impl bb8::ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = BackendError;

    async fn connect(&self) -> Result<PgConn, BackendError> {
        let Driven {
            client,
            address,
            driver,
        } = self.target.connect().await?;
        // Set here and again by every reset, not as a startup option, which
        // poolers such as PgBouncer refuse unless told to ignore it. Bounded
        // as the login is (each address has its own `connect_timeout`): a
        // server that takes the login and then never answers must not hold
        // one of the pool's opening slots, nor its connection, for ever.
        let timeout = self.target.config.get_connect_timeout().copied();
        let setup = async {
            client
                .batch_execute(STRINGS_AS_WEIR_READS_THEM)
                .await
                .map_err(map_error)
        };
        if let Err(e) = bounded(timeout, setup).await {
            driver.abort();
            return Err(e);
        }
        let cancel = client.cancel_token();
        Ok(PgConn {
            client,
            driver,
            cancel,
            target: self.target.clone(),
            address,
            statements: HashMap::new(),
            in_transaction: false,
            needs_reset: false,
            needs_rollback: false,
            broken: None,
            retire: false,
            fresh_begin: None,
        })
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), BackendError> {
        conn.client.simple_query("").await.map(|_| ()).map_err(map_error)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed() || conn.in_transaction || conn.broken.is_some() || conn.retire
    }
}

pub struct PostgresSource {
    pool: FailFastPool<PgManager>,
    read_only: bool,
    session_reset: SessionReset,
    /// Shared connections for unary plain reads, when configured.
    multiplex: Option<Multiplexer>,
    /// For change streams, which hold a session of their own (slot reads and
    /// the subscription's advisory lock). Not read-only: watching a read-only
    /// source still creates its slot and publication.
    changes: Target,
}

impl PostgresSource {
    pub fn new(config: &SourceConfig) -> Result<Self, BackendError> {
        let mut pg = tokio_postgres::Config::new();
        pg.host(config.host.as_deref().unwrap_or("localhost"))
            .port(config.port.unwrap_or(5432))
            .user(config.user.as_deref().unwrap_or("postgres"))
            .application_name("weir")
            .connect_timeout(config.pool.connect_timeout);
        if let Some(db) = &config.database {
            pg.dbname(db);
        }
        if let Some(password) = config.password().map_err(BackendError::Invalid)? {
            pg.password(password);
        }
        let tls = Tls::new(config).map_err(BackendError::Invalid)?;
        pg.ssl_mode(if tls.is_some() {
            SslMode::Require
        } else {
            SslMode::Disable
        });
        let changes = Target {
            config: pg.clone(),
            tls: tls.clone(),
        };
        let mut options = Vec::new();
        if config.read_only {
            // Enforced by the engine for every statement, whatever its text.
            options.push("-c default_transaction_read_only=on".to_string());
            pg.options(options.join(" "));
        }
        let multiplex = config.multiplex.as_ref().map(|m| {
            Multiplexer::new(
                &Target {
                    config: pg.clone(),
                    tls: tls.clone(),
                },
                &options,
                m,
                config.read_only,
            )
        });
        // The shared connections count against the pool's size.
        let pool_config = PoolConfig {
            max_size: config.own_pool_size(),
            ..config.pool.clone()
        };
        let pool = FailFastPool::new(
            PgManager {
                target: Arc::new(Target { config: pg, tls }),
            },
            &pool_config,
            "postgres",
            std::convert::identity,
        )
        // A session the server ended (a restart, a failover) has its
        // connection task ended by the time it is taken: no round trip.
        .passing_over(|conn: &mut PgConn| conn.client.is_closed());
        Ok(Self {
            pool,
            read_only: config.read_only,
            session_reset: config.session_reset.unwrap_or(SessionReset::Auto),
            multiplex,
            changes,
        })
    }

    /// A pooled session as a caller must find it: what an earlier caller's
    /// statement left behind (settings, temporary tables, an open block) is
    /// reset first. Statements (`run`) take theirs from the pool as it is,
    /// and send the reset in the same round trip as the statement.
    /// A pooled session for catalog queries, guarded as a statement's: a
    /// call given up on (its time budget, the client gone) while a query
    /// waits, behind a lock say, cancels it before the session serves
    /// anyone else, whose statement would queue behind it.
    async fn catalog_lease(&self) -> Result<StatementGuard, BackendError> {
        Ok(StatementGuard {
            lease: Some(Lease::Pooled(self.lease().await?)),
        })
    }

    async fn lease(&self) -> Result<PooledConnection<'static, PgManager>, BackendError> {
        let mut conn = self.pool.lease().await?;
        if conn.needs_reset {
            conn.client.batch_execute(reset_sql(&conn)).await.map_err(map_error)?;
            conn.needs_reset = false;
            conn.needs_rollback = false;
        }
        Ok(conn)
    }
}

/// A connection held for one statement: from the pool, or a transaction's.
// One per running statement; boxing the larger variant would allocate per statement.
#[allow(clippy::large_enum_variant)]
enum Lease {
    Pooled(PooledConnection<'static, PgManager>),
    Transaction(OwnedMutexGuard<PooledConnection<'static, PgManager>>),
}

impl Deref for Lease {
    type Target = PgConn;
    fn deref(&self) -> &PgConn {
        match self {
            Lease::Pooled(c) => c,
            Lease::Transaction(c) => c,
        }
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PgConn {
        match self {
            Lease::Pooled(c) => c,
            Lease::Transaction(c) => c,
        }
    }
}

/// Longest wait for a cancelled statement to end before its session is
/// closed instead (a cancel that reached another server, or a statement
/// that does not heed it, would hold the session for its whole run).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the connection until the statement is over. Dropped early (client
/// gone, deadline passed), it cancels the statement in the engine and waits
/// for the connection to be idle again before anyone else can use it; a
/// session whose statement could not be cancelled, or did not end soon
/// after, is closed instead.
struct StatementGuard {
    lease: Option<Lease>,
}

impl StatementGuard {
    fn finish(&mut self) {
        self.lease = None;
    }

    /// The session's client, until `finish`.
    fn client(&self) -> Result<&tokio_postgres::Client, BackendError> {
        let lease = self.lease.as_ref();
        lease
            .map(|l| &l.client)
            .ok_or_else(|| BackendError::Internal("statement lease missing".into()))
    }
}

/// Returns a session to its connect-time state without dropping Weir's own
/// prepared statements (DISCARD ALL would empty the statement cache): the
/// callers' SQL-level ones (`PREPARE`) go one by one. Every name is
/// pg_catalog's: a role whose search_path puts another schema first (any
/// role may set its own) would have its functions, types or operators run
/// in the reset instead.
/// A role may turn standard_conforming_strings off for itself; PostgreSQL
/// then reads `\'` in a plain string as a quote, and the statement checks
/// (which calls may change the session, which may share a connection) would
/// read the text otherwise than it runs.
const STRINGS_AS_WEIR_READS_THEM: &str = "SET standard_conforming_strings = on";

macro_rules! session_reset {
    () => {
        "RESET ALL; SET standard_conforming_strings = on; SET SESSION AUTHORIZATION DEFAULT; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); \
         DISCARD TEMP; CLOSE ALL; DISCARD SEQUENCES; \
         DO $weir$ DECLARE s pg_catalog.text; BEGIN FOR s IN SELECT name FROM pg_catalog.pg_prepared_statements \
         WHERE from_sql LOOP EXECUTE 'DEALLOCATE ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(s); \
         END LOOP; END $weir$"
    };
}
const SESSION_RESET: &str = session_reset!();
/// The same for a session that may be inside a transaction block.
const SESSION_RESET_WITH_ROLLBACK: &str = concat!("ROLLBACK; ", session_reset!());

/// The reset a session is due, with ROLLBACK when it may be inside a block.
fn reset_sql(conn: &PgConn) -> &'static str {
    if conn.needs_rollback {
        SESSION_RESET_WITH_ROLLBACK
    } else {
        SESSION_RESET
    }
}

impl Drop for StatementGuard {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(super::CANCELS.track_future(async move {
            let mut lease = lease;
            let settled = match cancel::cancel(&lease.cancel, lease.address, &lease.target).await {
                // Responses of the cancelled statement arrive before this one's.
                Ok(()) => tokio::time::timeout(SETTLE_TIMEOUT, lease.client.simple_query(""))
                    .await
                    .is_ok_and(|answer| answer.is_ok()),
                Err(e) => {
                    tracing::warn!(error = %e, "could not cancel an abandoned postgres statement");
                    false
                }
            };
            // Still running, or a cancel still on its way: not for the next caller.
            if !settled {
                lease.broken = Some(NOT_CANCELLED);
            }
        }));
    }
}

/// The result columns of a prepared statement, once its parameters are known to fit.
fn describe(prepared: &tokio_postgres::Statement, statement: &Statement) -> Result<Vec<Column>, BackendError> {
    let expected = prepared.params().len();
    if statement.params.len() != expected {
        return Err(BackendError::Invalid(format!(
            "the statement has {expected} parameter(s) but {} were given",
            statement.params.len()
        )));
    }
    for (i, (ty, value)) in prepared.params().iter().zip(&statement.params).enumerate() {
        types::check_param_type(i, ty, value)?;
    }
    prepared.columns().iter().map(types::column).collect()
}

async fn run(mut lease: Lease, statement: Statement, reset: SessionReset) -> Result<QueryStream, BackendError> {
    types::check_params(&statement.params)?;
    // Refused before it is sent (never cached, so checked on every call of it).
    if !lease.statements.contains_key(&statement.sql) && session::copies_with_client(&statement.sql) {
        return Err(copy_refused());
    }
    // A pooled session is reset before its next statement; when the statement
    // is already prepared the reset travels in the same round trip. (A cancel
    // that lands on the reset, not the statement, does not stop the statement
    // queued behind it. Waiting for the reset's answer first would close that
    // window at a round trip per write after a write: about 60 % more time
    // per single-row INSERT, measured.)
    let pooled = matches!(lease, Lease::Pooled(_));
    let mut reset_first = pooled && lease.needs_reset;
    let reset_sql = reset_sql(&lease);
    // After the reset, the block (if any) is gone; this statement may open one.
    let mut block_after = lease.needs_rollback && !reset_first;
    // Armed from here: dropping this future mid-call (a deadline, a cancel)
    // cancels what the session is doing, the reset, a prepare waiting for a
    // lock or the statement, before the session serves anyone else.
    let mut begin_again = match &mut lease {
        Lease::Transaction(session) => session.fresh_begin.take(),
        Lease::Pooled(_) => None,
    };
    let mut guard = StatementGuard { lease: Some(lease) };
    // A statement whose table changed since it was prepared here is refused
    // before it runs: outside a transaction, or first in one, it is prepared
    // again and rerun.
    let mut replanned = !pooled && begin_again.is_none();
    loop {
        let Some(lease) = guard.lease.as_mut() else {
            return Err(BackendError::Internal("statement lease missing".into()));
        };
        if reset_first && !lease.statements.contains_key(&statement.sql) {
            if let Err(e) = lease.client.batch_execute(reset_sql).await {
                guard.finish();
                return Err(map_error(e));
            }
            lease.needs_rollback = false;
            lease.needs_reset = false;
            reset_first = false;
        }
        let Prepared {
            statement: prepared,
            leaves_session,
            drops_statements,
        } = match lease.prepare(&statement.sql).await {
            Ok(p) => p,
            Err(e) => {
                let e = map_error(e);
                // The driver's lookup of a type failed for its own statement gone.
                lease.retire |= drops_driver_statements(&e);
                // An answer, not an abandonment: the session is settled.
                guard.finish();
                return Err(e);
            }
        };
        lease.retire |= drops_statements;
        // What the session needs once this statement has run.
        let dirty_after = pooled && (reset == SessionReset::Always || !leaves_session);
        lease.needs_reset |= dirty_after;
        let columns = match describe(&prepared, &statement) {
            Ok(columns) => columns,
            Err(e) => {
                // Not kept: PostgreSQL never sees it, so no stale-plan
                // error would ever replace what was refused here (a column
                // of an unsupported type, dropped since).
                lease.statements.remove(&statement.sql);
                guard.finish();
                return Err(e);
            }
        };
        block_after |= pooled && columns.is_empty();
        // Before the statement goes: a call abandoned while it runs (a
        // deadline, a cancel) must leave a BEGIN it sent to be rolled back.
        lease.needs_rollback |= block_after;
        let started = match guard.lease.as_ref() {
            Some(l) => {
                let query = l.client.query_raw(&prepared, statement.params.iter().map(PgParam));
                if reset_first {
                    let (reset, query) = futures::join!(l.client.batch_execute(reset_sql), query);
                    reset.map_err(map_error)?;
                    query
                } else {
                    query.await
                }
            }
            None => return Err(BackendError::Internal("statement lease missing".into())),
        };
        // The reset (if any) went through; until the next one, this is what is known.
        if let Some(l) = guard.lease.as_mut() {
            l.needs_rollback = block_after;
            if reset_first {
                l.needs_reset = dirty_after;
            }
        }
        reset_first = false;
        let inner = match started {
            Ok(s) => s,
            Err(e) => {
                if let (Some(lost), Some(l)) = (left_the_protocol(&e), guard.lease.as_mut()) {
                    l.broken = Some(PROTOCOL_LOST);
                    guard.finish();
                    return Err(lost);
                }
                let e = map_error(e);
                // The statement is over: the connection goes back as it is.
                let Some(mut l) = guard.lease.take() else {
                    return Err(e);
                };
                l.statements.remove(&statement.sql);
                // A caller's DISCARD ALL or DEALLOCATE ALL dropped every
                // statement this session had prepared: the cache is
                // emptied, and this one prepared again and run (Bind failed,
                // so nothing ran); the session is retired once done.
                let discarded = drops_driver_statements(&e);
                if discarded {
                    l.statements.clear();
                    l.retire = true;
                }
                if !replanned && (plan_went_stale(&e) || discarded) {
                    replanned = true;
                    if let Some(begin) = begin_again.take() {
                        // The refusal aborted the transaction.
                        if let Err(e) = l.client.batch_execute(&format!("ROLLBACK; {begin}")).await {
                            // Neither in the transaction nor surely out of it: not to be committed.
                            l.broken = Some("its first statement could not be run again after its plan went stale");
                            return Err(map_error(e));
                        }
                    }
                    guard.lease = Some(l);
                    continue;
                }
                return Err(e);
            }
        };
        return Ok(QueryStream {
            columns,
            rows: Box::pin(PgRowStream {
                inner: Box::pin(inner),
                guard,
                rows_affected: None,
                width: prepared.columns().len(),
                in_flight: None,
                first: None,
            }),
        });
    }
}

struct PgRowStream {
    inner: Pin<Box<tokio_postgres::RowStream>>,
    guard: StatementGuard,
    rows_affected: Option<u64>,
    width: usize,
    /// Set on a shared connection: counts the statement until it is over.
    in_flight: Option<InFlight>,
    /// The first row (or the end: `Some(None)`), already read.
    first: Option<Option<tokio_postgres::Row>>,
}

/// Why a session whose statement left the query protocol is closed.
const PROTOCOL_LOST: &str = "a statement on it left the query protocol (COPY to or from the client)";

/// An answer the query protocol does not expect (a COPY's data exchange):
/// where the session stands is unknown, so it is to be closed, not given to
/// the next caller, and the caller is told what to use instead.
fn left_the_protocol(e: &tokio_postgres::Error) -> Option<BackendError> {
    // tokio-postgres does not expose its error kinds; this is its text for one.
    (e.as_db_error().is_none() && e.to_string().contains("unexpected message from server")).then(copy_refused)
}

fn copy_refused() -> BackendError {
    BackendError::Invalid(
        "COPY to or from the client leaves the query protocol and is not supported here: load rows with \
         BulkLoadService.Load, read them with a query"
            .into(),
    )
}

impl PgRowStream {
    /// The engine is done with the statement.
    fn over(&mut self) {
        self.guard.finish();
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.finish();
        }
    }
}

impl Stream for PgRowStream {
    type Item = Result<Row, BackendError>;

    /// The values of the next row, decoded as for a stream (one decoder for both).
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let width = self.width;
        super::collect_row(self, cx, width)
    }
}

/// A value that did not decode, named by its column.
fn column_error(row: &tokio_postgres::Row, i: usize, e: &tokio_postgres::Error) -> BackendError {
    let name = row.columns().get(i).map(|c| c.name().to_string()).unwrap_or_default();
    let source = std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_default();
    BackendError::Invalid(format!("column \"{name}\": {source}"))
}

fn put_int(sink: &mut dyn RowSink, value: Option<i64>) {
    match value {
        Some(v) => sink.int(v),
        None => sink.value(Value::Null),
    }
}

impl RowStream for PgRowStream {
    fn rows_affected(&self) -> Option<u64> {
        self.rows_affected
    }

    /// Text and integer columns skip `Value`: text is lent from the
    /// driver's buffer, integers go straight to the sink.
    fn poll_next_into(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        sink: &mut dyn RowSink,
    ) -> Poll<Option<Result<(), BackendError>>> {
        let this = &mut *self;
        let next = match this.first.take() {
            Some(first) => Poll::Ready(first.map(Ok)),
            None => this.inner.as_mut().poll_next(cx),
        };
        let row = match next {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                this.rows_affected = this.inner.rows_affected();
                this.over();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                if let (Some(lost), Some(lease)) = (left_the_protocol(&e), this.guard.lease.as_mut()) {
                    lease.broken = Some(PROTOCOL_LOST);
                    this.over();
                    return Poll::Ready(Some(Err(lost)));
                }
                this.over();
                return Poll::Ready(Some(Err(map_error(e))));
            }
            Poll::Ready(Some(Ok(row))) => row,
        };
        for (i, column) in row.columns().iter().enumerate() {
            let decoded = match *column.type_() {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                    row.try_get::<_, Option<&str>>(i).map(|v| match v {
                        Some(text) => sink.text(text),
                        None => sink.value(Value::Null),
                    })
                }
                Type::INT4 => row
                    .try_get::<_, Option<i32>>(i)
                    .map(|v| put_int(sink, v.map(i64::from))),
                Type::INT8 => row.try_get::<_, Option<i64>>(i).map(|v| put_int(sink, v)),
                Type::INT2 => row
                    .try_get::<_, Option<i16>>(i)
                    .map(|v| put_int(sink, v.map(i64::from))),
                _ => row.try_get::<_, PgValue>(i).map(|v| sink.value(v.0)),
            };
            if let Err(e) = decoded {
                return Poll::Ready(Some(Err(column_error(&row, i, &e))));
            }
        }
        Poll::Ready(Some(Ok(())))
    }
}

#[async_trait]
impl SqlSource for PostgresSource {
    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            change_streams: true,
            schema_names_exact: true,
            ..Capabilities::sql("$1")
        }
    }

    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        if let Some(multiplex) = &self.multiplex {
            if statement.whole_result && multiplex.shares(&statement.sql) {
                return multiplex.query(statement, self.pool.breaker()).await;
            }
        }
        // Outside a transaction block PostgreSQL runs a top-level DO or CALL
        // non-atomically: it could `SET default_transaction_read_only = off`,
        // COMMIT, and write in the transaction after.
        if self.read_only && crate::backend::sql_text::may_commit_inside(&statement.sql) {
            return Err(BackendError::Invalid(
                "a DO block or CALL may commit on its own, so a read-only source runs it only inside a \
                 read-only transaction (BeginTransaction with read_only), where it cannot"
                    .into(),
            ));
        }
        refuse_client_encoding(&statement.sql)?;
        run(Lease::Pooled(self.pool.lease().await?), statement, self.session_reset).await
    }

    async fn begin(&self, options: TxOptions) -> Result<Box<dyn SqlTransaction>, BackendError> {
        let mut conn = self.pool.lease().await?;
        let mut sql = String::from("BEGIN");
        sql.push_str(match options.isolation {
            Isolation::EngineDefault => "",
            Isolation::ReadUncommitted => " ISOLATION LEVEL READ UNCOMMITTED",
            Isolation::ReadCommitted => " ISOLATION LEVEL READ COMMITTED",
            Isolation::RepeatableRead => " ISOLATION LEVEL REPEATABLE READ",
            Isolation::Serializable => " ISOLATION LEVEL SERIALIZABLE",
        });
        if options.read_only || self.read_only {
            sql.push_str(" READ ONLY");
        }
        // What an earlier caller left: settings, or a block that may be open.
        let reset_due = conn.needs_reset || conn.needs_rollback;
        conn.in_transaction = true;
        // Whatever the transaction SETs lasts past COMMIT: reset before the next caller.
        conn.needs_reset = true;
        if options.read_only || self.read_only {
            // A first query fixes the access mode: SET TRANSACTION READ WRITE now fails.
            sql.push_str("; SELECT 1");
        }
        if reset_due {
            // The reset an earlier caller left due goes in the same round trip,
            // as a query of its own: in BEGIN's, its SELECT would take the
            // snapshot before BEGIN could set the isolation level.
            let (reset, begun) = futures::join!(
                conn.client.batch_execute(reset_sql(&conn)),
                conn.client.batch_execute(&sql)
            );
            reset.map_err(map_error)?;
            begun.map_err(map_error)?;
            // Any block before it was rolled back; this one is `in_transaction`'s.
            conn.needs_rollback = false;
        } else {
            conn.client.batch_execute(&sql).await.map_err(map_error)?;
        }
        conn.fresh_begin = Some(sql);
        Ok(Box::new(PgTransaction::new(conn)))
    }

    async fn connection_info(&self) -> Result<ConnectionInfo, BackendError> {
        let mut guard = self.catalog_lease().await?;
        let info = async {
            let client = guard.client()?;
            let started = Instant::now();
            client.simple_query("").await.map_err(map_error)?;
            let round_trip = started.elapsed();
            let row = client
                .query_one(
                    "SELECT current_setting('server_version'), current_database()::text, current_user::text",
                    &[],
                )
                .await
                .map_err(map_error)?;
            Ok(ConnectionInfo {
                server_version: format!("PostgreSQL {}", row.get::<_, String>(0)),
                database: row.get(1),
                user: row.get(2),
                round_trip,
                ..Default::default()
            })
        }
        .await;
        guard.finish();
        info
    }

    async fn list_schemas(&self, include_system: bool) -> Result<Vec<SchemaInfo>, BackendError> {
        let mut guard = self.catalog_lease().await?;
        let schemas = schema::list_schemas(guard.client()?, include_system).await;
        guard.finish();
        schemas.map_err(map_error)
    }

    async fn list_tables(&self, schema: Option<&str>, page: TablePage) -> Result<Vec<TableInfo>, BackendError> {
        let mut guard = self.catalog_lease().await?;
        let tables = schema::list_tables(guard.client()?, schema, &page).await;
        guard.finish();
        tables.map_err(map_error)
    }

    fn refuses(&self, column: &Column, value: &Value) -> Option<String> {
        /// Whether `v`, or any element of it, is `wrong`.
        fn holds(v: &Value, wrong: &dyn Fn(&Value) -> bool) -> bool {
            match v {
                Value::List(items) => items.iter().any(|item| holds(item, wrong)),
                v => wrong(v),
            }
        }
        let of_time = column.column_type == ColumnType::Time || column.element_type == Some(ColumnType::Time);
        if of_time {
            // MySQL's TIME takes an interval; a PostgreSQL time (or time[]) does not.
            if holds(value, &|v| matches!(v, Value::Interval { .. })) {
                return Some(format!(
                    "an interval cannot go into a column of type {} (a time of day)",
                    column.native_type
                ));
            }
            // `time` would drop an offset, and `timetz` give a time without
            // one the session's: either changes the time without a word. (A
            // domain's native type is its own name: its values are not
            // checked so.)
            let native = &column.native_type;
            let zoned = native.contains("with time zone");
            if (zoned || native.contains("without time zone"))
                && holds(
                    value,
                    &|v| matches!(v, Value::Time(_, offset) if offset.is_some() != zoned),
                )
            {
                return Some(if zoned {
                    format!(
                        "a time without utc_offset_seconds cannot go into a column of type {}",
                        column.native_type
                    )
                } else {
                    format!(
                        "a time with utc_offset_seconds cannot go into a column of type {} (the offset would be dropped)",
                        column.native_type
                    )
                });
            }
        }
        types::has_nul(value).then(|| types::NO_NUL.to_string())
    }

    async fn describe_table(&self, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError> {
        let mut guard = self.catalog_lease().await?;
        let described = schema::describe_table(guard.client()?, schema, table).await;
        guard.finish();
        described
    }

    async fn load(&self, spec: LoadSpec, rows: RowFeed) -> Result<LoadOutcome, BackendError> {
        let mut conn = self.lease().await?;
        bulk::load(&mut conn, spec, rows).await
    }

    async fn watch(&self, spec: WatchSpec) -> Result<ChangeFeed, BackendError> {
        changes::watch(&self.changes, spec).await
    }

    async fn delete_subscription(&self, id: &str, name: &str) -> Result<(), BackendError> {
        changes::delete(&self.changes, id, name).await
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        let mut status = self.pool.status();
        if let Some(multiplex) = &self.multiplex {
            status.open += multiplex.open();
            status.idle += multiplex.idle();
        }
        Some(status)
    }

    fn circuit(&self) -> Option<crate::backend::breaker::CircuitState> {
        Some(self.pool.circuit())
    }
}

type PgTransaction = super::TxSession<PooledConnection<'static, PgManager>>;

/// Refuses a statement that sets `client_encoding`
/// (`sql_text::sets_postgres_client_encoding`): the text of every later
/// parameter of the session would be stored mangled, without an error.
fn refuse_client_encoding(sql: &str) -> Result<(), BackendError> {
    if crate::backend::sql_text::sets_postgres_client_encoding(sql) {
        return Err(BackendError::Invalid(
            "statements that set client_encoding (SET client_encoding, SET NAMES, set_config, an UPDATE of \
             pg_settings) are refused: Weir exchanges text with PostgreSQL as UTF-8; convert in the statement \
             instead (convert_to(text, 'LATIN1'))"
                .into(),
        ));
    }
    Ok(())
}

#[async_trait]
impl SqlTransaction for PgTransaction {
    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        refuse_client_encoding(&statement.sql)?;
        let lease = self.for_statement().await?;
        // It would queue behind a statement that could not be cancelled.
        if let Some(cause) = lease.broken {
            return Err(BackendError::TransactionBroken(cause));
        }
        run(Lease::Transaction(lease), statement, SessionReset::Always).await
    }

    async fn commit(&self) -> Result<(), BackendError> {
        let mut conn = self.to_end().await?;
        conn.fresh_begin = None;
        // A session already closed cannot have committed; past this point a
        // lost session leaves the outcome unknown.
        if conn.client.is_closed() {
            return Err(BackendError::TransactionRolledBack("its database session was lost"));
        }
        // A statement of it that could not be cancelled may still be running:
        // COMMIT would wait for it and commit what the caller was told failed.
        // The session is closed instead of pooled, which rolls it back.
        if let Some(cause) = conn.broken {
            return Err(BackendError::TransactionRolledBack(cause));
        }
        // COMMIT of a transaction an error aborted rolls it back and reports
        // success. The SELECT before it, in the same round trip, fails there
        // instead (25P02), and COMMIT is then never run.
        match conn.client.batch_execute("SELECT 1; COMMIT").await.map_err(map_error) {
            Err(BackendError::Engine { code, .. }) if code == IN_FAILED_TRANSACTION => {
                // COMMIT never ran, whatever becomes of the ROLLBACK; a session
                // whose ROLLBACK failed stays marked and is closed, not pooled.
                if conn.client.batch_execute("ROLLBACK").await.is_ok() {
                    conn.in_transaction = false;
                }
                Err(BackendError::Engine {
                    kind: EngineErrorKind::Aborted,
                    code,
                    message: "the transaction was rolled back, not committed: a statement in it failed; \
                              run it again from BeginTransaction"
                        .into(),
                })
            }
            Err(e) => Err(e),
            Ok(()) => {
                conn.in_transaction = false;
                Ok(())
            }
        }
    }

    async fn rollback(&self) -> Result<(), BackendError> {
        let mut conn = self.to_end().await?;
        conn.fresh_begin = None;
        // A statement that could not be cancelled may still be running, and
        // ROLLBACK would wait behind it: the session is closed instead of
        // pooled (still `in_transaction`), which rolls the transaction back.
        if conn.broken.is_some() {
            return Ok(());
        }
        conn.client.batch_execute("ROLLBACK").await.map_err(map_error)?;
        conn.in_transaction = false;
        Ok(())
    }
}

/// Why a session whose abandoned statement was not known to end is not used again.
const NOT_CANCELLED: &str = "a statement in it could not be cancelled";

/// The session itself was lost (its connection closed, or the server ended
/// it: a restart, `pg_terminate_backend`), rather than a statement failing
/// on a live one.
fn session_lost(e: &BackendError) -> bool {
    match e {
        BackendError::Unavailable(_) => true,
        // admin_shutdown, crash_shutdown, cannot_connect_now
        BackendError::Engine { code, .. } => matches!(code.as_str(), "57P01" | "57P02" | "57P03"),
        _ => false,
    }
}

/// SQLSTATE of a statement in a transaction an earlier error aborted.
const IN_FAILED_TRANSACTION: &str = "25P02";

/// What the engine says when a prepared statement's result columns changed
/// (ALTER TABLE under `SELECT *`). It checks this when binding, before the
/// statement runs, so running it again after a new prepare is safe. Told
/// by the function raising it, which the server names in every language
/// (the message is translated by `lc_messages`); the English text for
/// servers that name none.
const STALE_PLAN: (&str, &str, &str) = (
    "0A000",
    "RevalidateCachedQuery",
    "cached plan must not change result type",
);

/// Whether a 26000 message (`prepared statement "s12" does not exist`, or
/// `»s12«` in German) names one of tokio-postgres's statements, which it
/// names `s<N>`: a word of that shape, whatever the quotes around it.
fn names_a_driver_statement(message: &str) -> bool {
    message.split(|c: char| !c.is_alphanumeric()).any(|word| {
        word.strip_prefix('s')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A 26000 for one of the driver's own statements, which a caller's
/// `DISCARD ALL` or `DEALLOCATE ALL` dropped. (A procedure's `EXECUTE` of a
/// missing statement raises 26000 too, naming one of its own.)
fn drops_driver_statements(e: &BackendError) -> bool {
    matches!(e, BackendError::Engine { code, message, .. } if code == "26000" && names_a_driver_statement(message))
}

/// (`engine_error` gives a stale plan's 0A000, and only it, `Aborted`.)
fn plan_went_stale(e: &BackendError) -> bool {
    matches!(e, BackendError::Engine { kind: EngineErrorKind::Aborted, code, .. } if code == STALE_PLAN.0)
}

/// Classifies a tokio-postgres error. Connection errors never carry the
/// host list or credentials into the message.
pub(crate) fn map_error(e: tokio_postgres::Error) -> BackendError {
    if let Some(db) = e.as_db_error() {
        let position = match db.position() {
            Some(tokio_postgres::error::ErrorPosition::Original(p)) => Some(*p),
            _ => None,
        };
        let stale =
            db.code().code() == STALE_PLAN.0 && (db.routine() == Some(STALE_PLAN.1) || db.message() == STALE_PLAN.2);
        return engine_error(db.code().code(), db.message(), db.detail(), position, stale);
    }
    if e.is_closed() {
        return BackendError::Unavailable("the connection to the database was lost".into());
    }
    // Connect and I/O errors: describe the cause, never the target.
    let cause = std::error::Error::source(&e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string());
    BackendError::Unavailable(cause)
}

/// An error of a connection's start: a refused login (class 28) or a
/// database that is not there (3D000) is the operator's to fix. From a
/// statement the same codes are the statement's (`pg_database_size('x')`,
/// a function's `RAISE ... ERRCODE '28000'`), so `map_error` leaves them be.
fn map_connect_error(e: tokio_postgres::Error) -> BackendError {
    match e.as_db_error().map(|db| db.code().code()) {
        Some(code) if refuses_login(code) => crate::backend::error::login_refused(code, &e.to_string()),
        _ => map_error(e),
    }
}

/// Whether a SQLSTATE met while a connection starts refuses Weir's login.
pub(crate) fn refuses_login(code: &str) -> bool {
    code.starts_with("28") || code == "3D000"
}

/// An error PostgreSQL reported, as callers see it (SQLSTATE attached).
/// `stale_plan`: the error says a prepared statement's plan went stale (see `STALE_PLAN`).
pub(crate) fn engine_error(
    code: &str,
    text: &str,
    detail: Option<&str>,
    position: Option<u32>,
    stale_plan: bool,
) -> BackendError {
    let mut message = text.to_string();
    if let Some(detail) = detail {
        message.push_str(": ");
        message.push_str(detail);
    }
    if let Some(p) = position {
        message.push_str(&format!(" (at character {p})"));
    }
    let mut kind = classify_sqlstate(code);
    if stale_plan {
        // Only inside a transaction does the caller see it (elsewhere the
        // statement is prepared again): the transaction is over, and
        // running it again works.
        kind = EngineErrorKind::Aborted;
        message.push_str(": a table it reads changed since it was prepared; run the transaction again");
    }
    BackendError::Engine {
        kind,
        code: code.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_change_what_names_mean_are_told_apart() {
        for sql in [
            "ALTER TABLE t ADD c int",
            "create temp table s (n int)",
            "SET search_path = a",
            "SET LOCAL search_path TO b",
            "RESET ALL",
            "SET ROLE r",
            "SET SESSION AUTHORIZATION u",
            "DEALLOCATE ALL",
            "DO $$ BEGIN END $$",
            "SELECT set_config('search_path', 'archive', false)",
            "select pg_catalog.SET_CONFIG('role', 'auditor', true)",
        ] {
            assert!(changes_what_names_mean(sql), "{sql}");
        }
        for sql in [
            "SET LOCAL app.tenant_id = '7'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET statement_timeout = 0",
            "SELECT set_config('app.tenant_id', $1, true)",
            "SELECT set_config('app.user_role', $1, true)",
            "SELECT set_config('request.jwt.claim.role', $1, true), current_setting('search_path')",
            "SELECT * FROM t",
            "INSERT INTO t VALUES (1)",
        ] {
            assert!(!changes_what_names_mean(sql), "{sql}");
        }
    }

    #[test]
    fn a_stale_plan_is_told_by_the_function_raising_it_not_its_text() {
        let german = engine_error(
            "0A000",
            "gecachter Plan darf den Ergebnistyp nicht ändern",
            None,
            None,
            true,
        );
        assert!(plan_went_stale(&german), "{german:?}");
        assert!(matches!(
            &german,
            BackendError::Engine {
                kind: EngineErrorKind::Aborted,
                ..
            }
        ));
        let other = engine_error("0A000", "cached plan must not change result type", None, None, false);
        assert!(!plan_went_stale(&other), "{other:?}");
    }

    #[test]
    fn a_missing_statement_is_the_drivers_in_any_language() {
        assert!(names_a_driver_statement("prepared statement \"s12\" does not exist"));
        assert!(names_a_driver_statement("vorbereitete Anweisung »s3« existiert nicht"));
        assert!(!names_a_driver_statement(
            "prepared statement \"report\" does not exist"
        ));
        assert!(!names_a_driver_statement("prepared statement \"s\" does not exist"));
    }

    fn var(name: &str, default: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| default.to_string())
    }

    /// The test PostgreSQL (WEIR_TEST_PG_*, as scripts/test sets them), at `port`.
    fn test_config(port: u16) -> tokio_postgres::Config {
        test_config_at(&var("WEIR_TEST_PG_HOST", "127.0.0.1"), port)
    }

    /// The same, reached at `host` (a name, an address or a socket directory).
    fn test_config_at(host: &str, port: u16) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port)
            .user(var("WEIR_TEST_PG_USER", "postgres"))
            .dbname(var("WEIR_TEST_PG_DATABASE", "test"));
        if let Ok(password) = std::env::var("WEIR_TEST_PG_PASSWORD") {
            config.password(password);
        }
        config
    }

    fn test_port() -> u16 {
        std::env::var("WEIR_TEST_PG_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5432)
    }

    async fn backend_pid(client: &Client) -> i32 {
        client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("its pid")
            .get(0)
    }

    #[tokio::test]
    async fn a_session_goes_on_to_the_next_address_when_one_refuses_it() {
        // A server that accepts connections and closes them at once: TCP
        // succeeds, startup fails.
        let refuser = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
        let refusing = refuser.local_addr().expect("its address");
        tokio::spawn(async move {
            while let Ok((socket, _)) = refuser.accept().await {
                drop(socket);
            }
        });
        let target = Target::plain(test_config(test_port()));
        let host = var("WEIR_TEST_PG_HOST", "127.0.0.1");
        let real = net::addresses(&host, test_port()).await.expect("resolves")[0];
        let timeout = Some(Duration::from_secs(5));
        let ((client, _), address) = target
            .open_first(&host, vec![refusing, real], timeout)
            .await
            .expect("the second address serves");
        assert_eq!(address, real);
        assert!(backend_pid(&client).await > 0);
        let Err(e) = target.open_first(&host, vec![refusing], timeout).await else {
            panic!("a server that refuses every session cannot serve one");
        };
        assert!(matches!(e, BackendError::Unavailable(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_cancel_goes_to_the_address_the_session_is_on() {
        let manager = PgManager {
            target: Arc::new(Target::plain(test_config(test_port()))),
        };
        let pool = bb8::Pool::builder().max_size(1).build(manager).await.expect("a pool");
        let mut lease = pool.get_owned().await.expect("a session");
        let pid = backend_pid(&lease.client).await;
        // The source's name now leads elsewhere, as a name that resolves to
        // several addresses may: to a port where nothing listens.
        let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        lease.target = Arc::new(Target::plain(test_config(nowhere)));
        let statement = Statement {
            sql: "SELECT pg_sleep(60)".into(),
            params: vec![],
            whole_result: false,
        };
        // tokio-postgres returns the rows only once the statement sends one.
        let query = tokio::spawn(run(Lease::Pooled(lease), statement, SessionReset::Auto));
        let (observer, connection) = test_config(test_port()).connect(NoTls).await.expect("an observer");
        tokio::spawn(connection);
        let running = || async {
            observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep%' AND state = 'active'",
                    &[&pid],
                )
                .await
                .expect("activity")
                .get::<_, i64>(0)
                == 1
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !running().await {
            assert!(Instant::now() < deadline, "the statement did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Abandoned while it runs: its guard cancels it.
        query.abort();
        let deadline = Instant::now() + Duration::from_secs(4);
        while running().await {
            if Instant::now() > deadline {
                observer
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .expect("terminate");
                panic!("the cancel request did not reach the session's server");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Cancelled where it ran, the session is whole and serves the next caller.
        let next = tokio::time::timeout(Duration::from_secs(10), pool.get())
            .await
            .expect("the session back within the settle wait")
            .expect("the session again");
        let again = backend_pid(&next.client).await;
        assert_eq!(again, pid, "the session was closed instead of reused");
    }

    #[tokio::test]
    async fn a_session_opens_over_the_servers_unix_socket_too() {
        let Driven { client, address, .. } = Target::plain(test_config(test_port()))
            .connect()
            .await
            .expect("over TCP");
        assert!(address.is_some(), "a TCP session knows its address");
        let dirs: String = client
            .query_one("SHOW unix_socket_directories", &[])
            .await
            .expect("the socket directories")
            .get(0);
        let dir = dirs.split(',').next().map(str::trim).expect("a socket directory");
        let over_socket = Target::plain(test_config_at(dir, test_port()));
        let driven = over_socket.connect().await.expect("over the Unix socket");
        assert_eq!(driven.address, None);
        let one: i32 = driven.client.query_one("SELECT 1", &[]).await.expect("a query").get(0);
        assert_eq!(one, 1);
    }
}

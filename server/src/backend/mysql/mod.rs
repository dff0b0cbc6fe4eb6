//! MySQL and MariaDB through mysql_async and its pool. A statement runs in a
//! task that owns the connection and streams rows through a bounded channel;
//! when the caller goes away the task kills the statement on the server.

mod bulk;
mod changes;
pub use changes::lock_name;
mod load_data;
mod schema;
pub mod types;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use mysql_async::prelude::{Protocol, Queryable};
use mysql_async::{Conn, Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, SslOpts};
use tokio::sync::OwnedMutexGuard;

use crate::backend::breaker::{Breaker, CircuitState};
use crate::backend::channel::{self, Worker};
use crate::backend::error::classify_sqlstate;
use crate::backend::{
    BackendError, Capabilities, ChangeFeed, ConnectionInfo, Engine, EngineErrorKind, Isolation, LoadOutcome, LoadSpec,
    PoolStatus, QueryStream, RowFeed, RowSink, SchemaInfo, SqlSource, SqlTransaction, Statement, TableDescription,
    TableInfo, TablePage, TxOptions, WatchSpec,
};
use crate::config::SourceConfig;

/// How long a session of Weir's own (outside the pool) may take to open,
/// and a kill to be answered: the driver waits for ever on a host that
/// takes the connection and then says nothing.
const OWN_SESSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A session of Weir's own outside the pool (kills, change streams);
/// `None` when the server did not answer within `OWN_SESSION_TIMEOUT`.
async fn own_session(opts: &Opts) -> Option<Result<Conn, mysql_async::Error>> {
    tokio::time::timeout(OWN_SESSION_TIMEOUT, Conn::new(opts.clone()))
        .await
        .ok()
}
/// Prepared statements kept per connection.
const STATEMENT_CACHE_SIZE: usize = 256;

pub struct MysqlSource {
    pool: Pool,
    killer: Arc<Killer>,
    /// For change streams: the same server, without the read-only session setting.
    change_opts: Opts,
    config: SourceConfig,
    breaker: Breaker,
    /// The load id table's key columns were checked (and converted) once.
    receipts_checked: std::sync::atomic::AtomicBool,
    /// Whether the change-positions table has the restart columns (see `changes::watch`).
    restart_columns: tokio::sync::OnceCell<bool>,
    packets: Arc<PacketLimit>,
}

/// The most bytes a packet may carry, the protocol's own limit: a longer
/// one goes in pieces.
const MAX_PAYLOAD_LEN: usize = 16 * 1024 * 1024 - 1;

/// The server's `max_allowed_packet`, read once per source. A statement or
/// value past it is refused before it is sent: sent, the driver (or the
/// server) would close the session, a transaction's with it, and the caller
/// would hear the source was unreachable.
#[derive(Default)]
pub(crate) struct PacketLimit(parking_lot::Mutex<Option<usize>>);

impl PacketLimit {
    pub(crate) async fn of(&self, conn: &mut Conn) -> Result<usize, BackendError> {
        let known = *self.0.lock();
        match known {
            Some(limit) => Ok(limit),
            None => self.read(conn).await,
        }
    }

    /// Reads the server's value anew: before refusing what the last value
    /// refuses, since the operator may have raised it as the refusal says.
    pub(crate) async fn read(&self, conn: &mut Conn) -> Result<usize, BackendError> {
        let limit: Option<u64> = conn
            .query_first("SELECT @@max_allowed_packet")
            .await
            .map_err(map_error)?;
        let limit = limit.map_or(MAX_PAYLOAD_LEN, |l| usize::try_from(l).unwrap_or(usize::MAX));
        *self.0.lock() = Some(limit);
        Ok(limit)
    }
}

/// Refuses a statement whose text, or whose values, the server would not
/// take under `limit` (its `max_allowed_packet`). The values go in the
/// execute packet, or, when that would pass the protocol's own packet
/// length, text and bytes go ahead as long data, each counted alone.
fn refuse_past_packet_limit(sql: &str, params: &[mysql_async::Value], limit: usize) -> Result<(), BackendError> {
    let over = |what: String, bytes: usize| {
        BackendError::Invalid(format!(
            "{what} is {bytes} bytes, more than the server takes in one packet (max_allowed_packet, {limit} bytes): \
             send large values as parameters, in parts, or raise max_allowed_packet on the server"
        ))
    };
    // The command byte, and the statement id and flags of the execute.
    if sql.len() + 1 > limit {
        return Err(over("the statement".into(), sql.len()));
    }
    // As the driver measures it to choose between one packet and long data.
    let values: usize = params.iter().map(|v| v.bin_len() as usize).sum();
    let body = 10 + params.len().div_ceil(8) + 1 + 2 * params.len() + values;
    if body <= MAX_PAYLOAD_LEN {
        return match body > limit {
            true => Err(over("the statement's values".into(), body)),
            false => Ok(()),
        };
    }
    match params.iter().position(|v| v.bin_len() as usize + 7 > limit) {
        Some(i) => Err(BackendError::Parameter {
            index: i + 1,
            message: format!(
                "{} bytes, more than the server takes in one packet (max_allowed_packet, {limit} bytes); \
                 send it in parts, or raise max_allowed_packet on the server",
                params[i].bin_len()
            ),
        }),
        None => Ok(()),
    }
}

/// How long the server may wait to write to a session that does not read.
/// Far past the 60 s default, which a client pausing a query stream, or a
/// change stream's reader slowed by its tenant's rate behind a large
/// transaction, meets: the server then closes the session, and a
/// transaction on it is lost. Weir ends a client that stops reading itself
/// (`stream_idle_timeout`). Short enough that a gateway cut off from the
/// server lets go of what its sessions hold (a transaction's locks, a
/// subscription's) within minutes.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl MysqlSource {
    pub fn new(config: &SourceConfig) -> Result<Self, BackendError> {
        let constraints = PoolConstraints::new(config.pool.min_idle as usize, config.pool.max_size as usize)
            .ok_or_else(|| BackendError::Invalid("pool.min_idle must not exceed pool.max_size".into()))?;
        // The setup runs again after every reset, so on every checkout: its
        // statements go as one text (multi-statements are on), one round trip.
        let mut base_setup = vec![format!(
            "SET NAMES utf8mb4, time_zone = '+00:00', net_write_timeout = {}",
            WRITE_TIMEOUT.as_secs()
        )];
        // The pool's reset keeps a session's default database: a `USE` run
        // as dynamic SQL (`EXECUTE IMMEDIATE 'USE other'`), which no text
        // check sees, would otherwise move every later caller of the
        // session to another database. After the character set is set
        // again, so a name past ASCII reads right.
        if let Some(database) = config.database.as_deref().filter(|d| !d.is_empty()) {
            base_setup.push(format!("USE `{}`", database.replace('`', "``")));
        }
        let mut setup = base_setup.clone();
        if config.read_only {
            // Enforced by the engine for every statement, whatever its text.
            setup.push("SET SESSION TRANSACTION READ ONLY".into());
        }
        let (base_setup, setup) = (vec![base_setup.join("; ")], vec![setup.join("; ")]);
        let mut builder = OptsBuilder::default()
            .ip_or_hostname(config.host.clone().unwrap_or_else(|| "localhost".into()))
            .tcp_port(config.port.unwrap_or(3306))
            .user(config.user.clone())
            .pass(config.password().map_err(BackendError::Invalid)?)
            .db_name(config.database.clone())
            .prefer_socket(false)
            // A server gone dark (a failover that drops no packets back)
            // fails its sessions instead of leaving them waiting for ever.
            .tcp_keepalive(Some(std::time::Duration::from_secs(30)))
            .stmt_cache_size(STATEMENT_CACHE_SIZE)
            .setup(setup)
            .pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    .with_inactive_connection_ttl(config.pool.idle_timeout),
            );
        if config.tls {
            builder = builder.ssl_opts(ssl_opts(config)?);
        }
        let change_opts = Opts::from(builder.clone().setup(base_setup));
        let opts = Opts::from(builder);
        Ok(Self {
            pool: Pool::new(opts.clone()),
            killer: Arc::new(Killer {
                opts,
                conn: tokio::sync::Mutex::new(None),
                failed: parking_lot::Mutex::default(),
            }),
            change_opts,
            config: config.clone(),
            breaker: Breaker::default(),
            receipts_checked: std::sync::atomic::AtomicBool::new(false),
            restart_columns: tokio::sync::OnceCell::new(),
            packets: Arc::default(),
        })
    }

    /// A pooled session. One whose kill failed (a transaction's, back in
    /// the pool at its end) is closed instead, in the background: the kill
    /// may still reach the server and stop this caller's statement.
    async fn conn(&self) -> Result<Conn, BackendError> {
        loop {
            let conn = self.checkout().await?;
            if !self.killer.failed.lock().remove(&conn.id()) {
                return Ok(conn);
            }
            drop(tokio::spawn(conn.disconnect()));
        }
    }

    async fn checkout(&self) -> Result<Conn, BackendError> {
        self.breaker.admit()?;
        let started = Instant::now();
        let connect = tokio::time::timeout(self.config.pool.acquire_timeout, self.pool.get_conn()).await;
        let conn = match connect {
            Ok(conn) => conn.map_err(map_connect_error),
            // mysql_async opens connections within get_conn, with no bound of
            // its own: with none in use, nothing was busy, and the host did
            // not answer in time.
            Err(_) if self.pool.metrics().connections_in_use.load(Ordering::Relaxed) == 0 => {
                Err(BackendError::Unavailable(format!(
                    "no connection could be opened within acquire_timeout ({:?})",
                    started.elapsed()
                )))
            }
            Err(_) => Err(BackendError::PoolExhausted {
                max_size: self.config.pool.max_size,
                waited: started.elapsed(),
            }),
        };
        self.breaker.record(&conn);
        conn
    }
}

/// The connection a statement runs on: from the pool, or a transaction's.
enum Hold {
    Pooled(Conn),
    Transaction(OwnedMutexGuard<TxConn>),
}

impl Hold {
    fn conn(&mut self) -> &mut Conn {
        match self {
            Hold::Pooled(c) => c,
            Hold::Transaction(t) => &mut t.conn,
        }
    }
}

/// A transaction's connection, and what made the server roll the
/// transaction back on its own: later statements would autocommit.
struct TxConn {
    conn: Conn,
    rolled_back: Option<&'static str>,
    /// A statement committed the transaction implicitly (DDL): the server
    /// is out of it, and a later statement would autocommit.
    committed: bool,
    /// Why the transaction cannot go on though it is still open (a
    /// statement of it could not be stopped and ran on with its writes).
    broken: Option<&'static str>,
}

/// Whether `error` ended the transaction on `conn`: a deadlock always does,
/// a lock wait timeout with `innodb_rollback_on_timeout`; others undo only
/// their statement. ABORTED tells the caller to run the whole transaction
/// again, on every engine: one the server kept open after such an error (a
/// lock wait timeout without `innodb_rollback_on_timeout`, the default) is
/// rolled back here, so it holds no locks against that retry.
async fn rolled_back_by(conn: &mut Conn, error: &BackendError) -> Option<&'static str> {
    let BackendError::Engine { kind, code, .. } = error else {
        return None;
    };
    match code.as_str() {
        "1213" => return Some("a deadlock (errno 1213)"),
        "1206" => return Some("running out of lock table (errno 1206)"),
        "1205" => {
            // Unknown counts as rolled back: the handle then refuses, never autocommits.
            let whole: Option<i64> = conn
                .query_first("SELECT @@innodb_rollback_on_timeout")
                .await
                .ok()
                .flatten();
            if whole != Some(0) {
                return Some("a lock wait timeout (errno 1205)");
            }
        }
        _ => {}
    }
    if *kind != EngineErrorKind::Aborted {
        return None;
    }
    // A failed ROLLBACK leaves a session that closes with the handle.
    let _ = conn.query_drop("ROLLBACK").await;
    Some(match code.as_str() {
        "1205" => "a lock wait timeout (errno 1205); Weir rolled it back",
        _ => "an error that aborts transactions; Weir rolled it back",
    })
}

/// Pings the session. A 1317 ("query execution was interrupted") is the
/// kill of an abandoned statement answered to the ping (it landed after the
/// statement ended, or the statement's error was still unread), not a
/// session lost: it is asked again.
async fn ping(conn: &mut Conn) -> Result<(), mysql_async::Error> {
    match conn.ping().await {
        Err(mysql_async::Error::Server(e)) if e.code == 1317 => conn.ping().await,
        other => other,
    }
}

/// Whether the server says the session is out of its transaction after a
/// statement that succeeded in it: the statement committed it implicitly.
/// Read from the statement's last OK packet (no round trip); without one,
/// the transaction is taken as open, as before.
fn left_transaction(conn: &Conn) -> bool {
    conn.last_ok_packet().is_some_and(|ok| {
        !ok.status_flags()
            .contains(mysql_async::consts::StatusFlags::SERVER_STATUS_IN_TRANS)
    })
}

/// Starts a statement in a task that owns the connection until it ends.
async fn start(
    hold: Hold,
    statement: Statement,
    (killer, packets): (Arc<Killer>, Arc<PacketLimit>),
) -> Result<QueryStream, BackendError> {
    let (mut worker, pending) = channel::channel(None);
    tokio::spawn(async move {
        let mut hold = hold;
        let in_transaction = matches!(hold, Hold::Transaction(_));
        let outcome = execute(
            hold.conn(),
            &statement,
            (&mut worker, &killer, &packets),
            in_transaction,
        )
        .await;
        if let Hold::Transaction(tx) = &mut hold {
            // Only a statement read to its end left its own last OK packet:
            // an abandoned one may have left its prepare's reply there,
            // which reads as an OK packet without the transaction's flag.
            let read_to_end = outcome.is_ok() && !worker.is_closed();
            match &outcome {
                Err(BackendError::TransactionBroken(cause)) => tx.broken = Some(cause),
                Err(e) => tx.rolled_back = rolled_back_by(&mut tx.conn, e).await,
                Ok(_) => {}
            }
            if tx.broken.is_none() && tx.rolled_back.is_none() {
                if read_to_end {
                    tx.committed = left_transaction(&tx.conn);
                // After a failure or an abandon, a round trip: the session
                // may be gone with the error (an I/O error, the server going
                // away, a `LOAD DATA LOCAL` the driver refused), and the
                // transaction with it: Commit must say so, not send COMMIT
                // into a closed connection and call its outcome unknown. And
                // DDL commits before it runs, so one that fails (a table that
                // exists) or is killed has still ended the transaction: the
                // ping's answer carries the session's flags as they are now.
                } else if ping(&mut tx.conn).await.is_err() {
                    tx.rolled_back = Some("its database session was lost");
                } else {
                    tx.committed = left_transaction(&tx.conn);
                }
            }
        }
        // Release the connection (and a transaction's lock) before the caller
        // learns the statement is over, so its next call finds it free. A
        // session whose kill failed goes back too, still listed: the pool's
        // next checkout closes it (see `MysqlSource::conn`).
        drop(hold);
        worker.finish(outcome).await;
    });
    pending.started().await
}

/// Stops a statement whose result is being read: `KILL QUERY`, then what
/// is left of the result (the server ends it with "query execution was
/// interrupted"). Left unread, mysql_async would read it before the
/// connection's next command, and that command (a transaction's next
/// statement, its COMMIT) would wait for it and fail with it. A kill that
/// fails leaves the result unread: the transaction cannot go on behind it.
async fn stop_reading<P: Protocol>(
    killer: &Killer,
    connection_id: u32,
    result: mysql_async::QueryResult<'_, '_, P>,
) -> Result<(), BackendError> {
    killer.kill(connection_id).await?;
    let _ = result.drop_result().await;
    Ok(())
}

/// Runs a statement, streaming its rows; returns rows affected.
async fn execute(
    conn: &mut Conn,
    statement: &Statement,
    (worker, killer, packets): (&mut Worker, &Killer, &PacketLimit),
    in_transaction: bool,
) -> Result<Option<u64>, BackendError> {
    let connection_id = conn.id();
    let params = statement
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| types::param(p).map_err(|message| BackendError::Parameter { index: i + 1, message }))
        .collect::<Result<Vec<_>, _>>()?;
    if refuse_past_packet_limit(&statement.sql, &params, packets.of(conn).await?).is_err() {
        refuse_past_packet_limit(&statement.sql, &params, packets.read(conn).await?)?;
    }
    // A prepare can wait for a metadata lock (behind an ALTER TABLE, say) for
    // lock_wait_timeout, a year by default: a caller that leaves meanwhile
    // gets it killed, as during execution.
    let Some(prepared) = unless_abandoned(conn.prep(statement.sql.as_str()), worker, killer, connection_id).await?
    else {
        return Ok(None);
    };
    let prepared = match prepared {
        Err(mysql_async::Error::Server(e)) if e.code == NOT_PREPARABLE && statement.params.is_empty() => {
            return execute_unprepared(conn, &statement.sql, worker, killer, in_transaction).await;
        }
        prepared => prepared.map_err(map_error)?,
    };
    let expected = usize::from(prepared.num_params());
    if expected != statement.params.len() {
        return Err(BackendError::Invalid(format!(
            "the statement has {expected} parameter(s) but {} were given",
            statement.params.len()
        )));
    }
    let params = if params.is_empty() {
        Params::Empty
    } else {
        Params::Positional(params)
    };
    let exec = conn.exec_iter(prepared, params);
    let Some(result) = unless_abandoned(exec, worker, killer, connection_id).await? else {
        return Ok(None);
    };
    read_result(
        result.map_err(map_error)?,
        types::decode,
        (worker, killer, connection_id),
        in_transaction,
    )
    .await
}

/// Streams a result's rows to the caller, each value read by `decode`;
/// returns the rows affected (`None`: the caller left).
async fn read_result<P: Protocol>(
    mut result: mysql_async::QueryResult<'_, '_, P>,
    decode: fn(mysql_async::Value, types::Decode) -> Result<crate::backend::Value, String>,
    (worker, killer, connection_id): (&mut Worker, &Killer, u32),
    in_transaction: bool,
) -> Result<Option<u64>, BackendError> {
    let described: Vec<_> = result.columns_ref().iter().map(types::column).collect();
    let decoders: Vec<_> = described.iter().map(|(_, d)| *d).collect();
    let names: Vec<_> = described.iter().map(|(c, _)| c.name.clone()).collect();
    let returns_rows = !described.is_empty();
    if !worker.describe(described.into_iter().map(|(c, _)| c).collect()) {
        stop_reading(killer, connection_id, result).await?;
        return Ok(None);
    }
    let mut gather = worker.gather();
    loop {
        let next = tokio::select! {
            biased;
            row = result.next() => row.map_err(map_error)?,
            () = worker.closed() => {
                stop_reading(killer, connection_id, result).await?;
                return Ok(None);
            }
        };
        let Some(row) = next else { break };
        for (i, raw) in row.unwrap_raw().into_iter().enumerate() {
            let decoder = decoders.get(i).copied().unwrap_or(types::Decode::Text);
            match decode(raw.unwrap_or(mysql_async::Value::NULL), decoder) {
                Ok(value) => gather.value(value),
                Err(m) => {
                    // Stopped, not read to its end: the rest of a long
                    // result would otherwise hold the session (and, in a
                    // transaction, the caller's next call) until it ends.
                    // Pooled, the pool reads what a failed kill left before
                    // the session serves again: the caller hears the cause.
                    if let Err(broken) = stop_reading(killer, connection_id, result).await {
                        if in_transaction {
                            return Err(broken);
                        }
                    }
                    return Err(BackendError::Invalid(format!(
                        "column \"{}\": {m}",
                        names.get(i).map_or("?", String::as_str)
                    )));
                }
            }
        }
        if let Some(chunk) = gather.end_row() {
            if !worker.send(chunk).await {
                stop_reading(killer, connection_id, result).await?;
                return Ok(None);
            }
        }
    }
    let affected = result.affected_rows();
    // A procedure's second SELECT; its closing status is no result set.
    if !result.is_empty() {
        result.drop_result().await.map_err(map_error)?;
        return Err(crate::backend::error::second_result_set());
    }
    drop(result);
    if let Some(rest) = gather.rest() {
        if !worker.send(rest).await {
            return Ok(None);
        }
    }
    Ok((!returns_rows).then_some(affected))
}

/// Runs `work` on session `connection_id` unless the caller leaves first:
/// then its statement is killed and `work` let finish, so the session
/// stays usable, and the answer is `None`. Unless it failed on its own
/// meanwhile: that error is the answer, so that one that ended the
/// transaction (a deadlock) is seen to, not followed by statements that
/// would each commit on their own.
async fn unless_abandoned<T>(
    work: impl std::future::Future<Output = Result<T, mysql_async::Error>>,
    worker: &Worker,
    killer: &Killer,
    connection_id: u32,
) -> Result<Option<Result<T, mysql_async::Error>>, BackendError> {
    tokio::pin!(work);
    tokio::select! {
        biased;
        done = &mut work => Ok(Some(done)),
        () = worker.closed() => {
            let killed = killer.kill(connection_id).await;
            match work.await {
                // 1317: the kill's own "query execution was interrupted".
                Err(mysql_async::Error::Server(e)) if e.code != 1317 => {
                    Err(map_error(mysql_async::Error::Server(e)))
                }
                _ => killed.map(|()| None),
            }
        }
    }
}

/// The server's "not supported in the prepared statement protocol": Oracle
/// MySQL prepares none of SAVEPOINT, LOCK TABLES, CREATE PROCEDURE and
/// others, MariaDB none of PREPARE, EXECUTE and DEALLOCATE.
const NOT_PREPARABLE: u16 = 1295;

/// Runs a statement the server cannot prepare, which has no parameters, as
/// text (its rows, text too, read by their columns' types, as the binary
/// protocol's would be); returns rows affected.
async fn execute_unprepared(
    conn: &mut Conn,
    sql: &str,
    worker: &mut Worker,
    killer: &Killer,
    in_transaction: bool,
) -> Result<Option<u64>, BackendError> {
    let connection_id = conn.id();
    let Some(result) = unless_abandoned(conn.query_iter(sql), worker, killer, connection_id).await? else {
        return Ok(None);
    };
    read_result(
        result.map_err(map_error)?,
        types::decode_text,
        (worker, killer, connection_id),
        in_transaction,
    )
    .await
}

/// Stops statements callers abandoned, with `KILL QUERY` from a session of
/// its own, kept for the next one: one session per source (which
/// `backend_hosts` counts), not a login per abandoned statement.
struct Killer {
    opts: Opts,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// Sessions whose kill failed: the kill may still reach the server
    /// later, and stop whatever runs there then, so they are not pooled again.
    failed: parking_lot::Mutex<std::collections::HashSet<u32>>,
}

impl Killer {
    /// Kills the statement running on `connection_id`. When that fails, the
    /// statement runs on to its end, its writes kept: a transaction holding
    /// it must not commit what its caller was told was cancelled.
    async fn kill(&self, connection_id: u32) -> Result<(), BackendError> {
        let killed = async {
            let mut kept = self.conn.lock().await;
            // A kept session the server has since closed (wait_timeout) fails
            // once; the second try opens a new one.
            let mut last = None;
            for _ in 0..2 {
                let conn = match kept.as_mut() {
                    Some(conn) => conn,
                    None => {
                        let opened = own_session(&self.opts).await.ok_or_else(|| {
                            mysql_async::Error::Other("timed out connecting to kill a statement".into())
                        })?;
                        kept.insert(opened?)
                    }
                };
                let kill = conn.query_drop(format!("KILL QUERY {connection_id}"));
                match tokio::time::timeout(OWN_SESSION_TIMEOUT, kill).await {
                    Ok(Ok(())) => return Ok(()),
                    // 1094 (no such thread) while the statement still holds its
                    // session: the kill reached another server than the
                    // statement's (a host name with several addresses), so the
                    // statement runs on.
                    Ok(Err(mysql_async::Error::Server(e))) if e.code == 1094 => {
                        return Err(mysql_async::Error::Other(
                            "the statement's thread is not on the server the kill reached".into(),
                        ))
                    }
                    Ok(Err(e)) => {
                        kept.take();
                        last = Some(e);
                    }
                    // The kept session's server stopped answering (a failover).
                    Err(_) => {
                        kept.take();
                        last = Some(mysql_async::Error::Other("timed out killing a statement".into()));
                    }
                }
            }
            Err(last.unwrap_or_else(|| mysql_async::Error::Other("no session to kill a statement from".into())))
        };
        // Tracked, so that shutdown waits for it.
        crate::backend::CANCELS.track_future(killed).await.map_err(|e| {
            self.failed.lock().insert(connection_id);
            tracing::warn!(error = %e, "could not kill an abandoned mysql statement");
            BackendError::TransactionBroken("a statement in it could not be stopped")
        })
    }
}

#[async_trait]
impl SqlSource for MysqlSource {
    fn engine(&self) -> Engine {
        Engine::Mysql
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            change_streams: true,
            ..Capabilities::sql("?")
        }
    }

    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        if self.config.read_only {
            refuse_leaving_read_only(&statement.sql)?;
        }
        refuse_session_changes(&statement.sql)?;
        let shared = (self.killer.clone(), self.packets.clone());
        start(Hold::Pooled(self.conn().await?), statement, shared).await
    }

    async fn begin(&self, options: TxOptions) -> Result<Box<dyn SqlTransaction>, BackendError> {
        let mut conn = self.conn().await?;
        let level = match options.isolation {
            Isolation::EngineDefault => None,
            Isolation::ReadUncommitted => Some("READ UNCOMMITTED"),
            Isolation::ReadCommitted => Some("READ COMMITTED"),
            Isolation::RepeatableRead => Some("REPEATABLE READ"),
            Isolation::Serializable => Some("SERIALIZABLE"),
        };
        if let Some(level) = level {
            conn.query_drop(format!("SET TRANSACTION ISOLATION LEVEL {level}"))
                .await
                .map_err(map_error)?;
        }
        // A read-only transaction of a read-write source: START TRANSACTION
        // READ ONLY alone ends at DDL's implicit commit, after which the
        // session would run the DDL and autocommit writes. The session's own
        // characteristic holds for every transaction of it, and refuses the
        // DDL too, until the transaction ends.
        let read_only_session = options.read_only && !self.config.read_only;
        let start = match (read_only_session, self.config.read_only) {
            (true, _) => "SET SESSION TRANSACTION READ ONLY; START TRANSACTION",
            (false, true) => "START TRANSACTION READ ONLY",
            (false, false) => "START TRANSACTION",
        };
        conn.query_drop(start).await.map_err(map_error)?;
        Ok(Box::new(MysqlTransaction {
            conn: super::TxSession::new(TxConn {
                conn,
                rolled_back: None,
                committed: false,
                broken: None,
            }),
            killer: self.killer.clone(),
            packets: self.packets.clone(),
            read_only_source: self.config.read_only,
            read_only_session,
        }))
    }

    fn circuit(&self) -> Option<CircuitState> {
        Some(self.breaker.state())
    }

    fn pool_status(&self) -> Option<PoolStatus> {
        let metrics = self.pool.metrics();
        let idle = u32::try_from(metrics.connections_in_pool.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        let in_use = u32::try_from(metrics.connections_in_use.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        Some(PoolStatus {
            open: idle.saturating_add(in_use),
            idle,
        })
    }

    async fn connection_info(&self) -> Result<ConnectionInfo, BackendError> {
        let mut conn = self.conn().await?;
        let started = Instant::now();
        conn.query_drop("DO 1").await.map_err(map_error)?;
        let round_trip = started.elapsed();
        let row: Option<(String, Option<String>, String)> = conn
            .query_first("SELECT VERSION(), DATABASE(), CURRENT_USER()")
            .await
            .map_err(map_error)?;
        let (version, database, user) = row.ok_or_else(|| BackendError::Internal("no version row".into()))?;
        Ok(ConnectionInfo {
            server_version: flavour(&version),
            database: database.unwrap_or_default(),
            user,
            round_trip,
            ..Default::default()
        })
    }

    async fn list_schemas(&self, include_system: bool) -> Result<Vec<SchemaInfo>, BackendError> {
        schema::list_schemas(&mut self.conn().await?, include_system).await
    }

    async fn list_tables(&self, schema: Option<&str>, page: TablePage) -> Result<Vec<TableInfo>, BackendError> {
        schema::list_tables(&mut self.conn().await?, schema, &page).await
    }

    async fn describe_table(&self, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError> {
        schema::describe_table(&mut self.conn().await?, schema, table).await
    }

    fn refuses(&self, _column: &crate::backend::Column, value: &crate::backend::Value) -> Option<String> {
        types::refusal(value)
    }

    async fn load(&self, spec: LoadSpec, rows: RowFeed) -> Result<LoadOutcome, BackendError> {
        bulk::load(
            &mut self.conn().await?,
            spec,
            rows,
            &self.receipts_checked,
            (&self.killer, &self.packets),
        )
        .await
    }

    async fn watch(&self, spec: WatchSpec) -> Result<ChangeFeed, BackendError> {
        changes::watch(&self.change_opts, &self.restart_columns, spec).await
    }

    async fn delete_subscription(&self, id: &str, name: &str) -> Result<(), BackendError> {
        changes::delete(&self.change_opts, id, name).await
    }
}

/// "10.11.19-MariaDB-0+deb12u1" → "MariaDB 10.11.19"; otherwise "MySQL 8.0.36".
fn flavour(version: &str) -> String {
    let number = version.split(['-', ' ']).next().unwrap_or(version);
    if version.to_ascii_lowercase().contains("mariadb") {
        format!("MariaDB {number}")
    } else {
        format!("MySQL {number}")
    }
}

struct MysqlTransaction {
    conn: super::TxSession<TxConn>,
    killer: Arc<Killer>,
    packets: Arc<PacketLimit>,
    read_only_source: bool,
    /// The session was made read-only for this transaction alone: it is
    /// made read-write again when the transaction ends (the pool's reset
    /// does so too, on servers that have one).
    read_only_session: bool,
}

/// A read-only source's sessions are read-only by a session setting any
/// statement could change for itself or its session (`SET STATEMENT
/// tx_read_only=0 FOR INSERT ...`, or `SET SESSION TRANSACTION READ WRITE`
/// and then DDL's implicit commit in a transaction): such statements are
/// refused before they are sent.
fn refuse_leaving_read_only(sql: &str) -> Result<(), BackendError> {
    if crate::backend::sql_text::may_leave_read_only(sql) {
        return Err(BackendError::Engine {
            kind: EngineErrorKind::PermissionDenied,
            code: String::new(),
            message: "the source is read-only: statements that name a READ WRITE access mode or the \
                      transaction_read_only variable, CALL procedures or run dynamic SQL (PREPARE, EXECUTE) \
                      are refused on it"
                .into(),
        });
    }
    Ok(())
}

/// Refuses a statement that changes what every session is set up with: its
/// time zone or character sets (`sql_text::sets_mysql_time_zone_or_charset`:
/// every TIMESTAMP after it would be read and bound hours off, and text
/// mangled, without an error), or its default database (`USE`, which the
/// pool's reset of a returned connection keeps: later callers' unqualified
/// names, a load's receipt among them, would reach the other database).
fn refuse_session_changes(sql: &str) -> Result<(), BackendError> {
    if crate::backend::sql_text::starts_with_word(sql, "use") {
        return Err(BackendError::Invalid(
            "USE is refused: it would change the database of a pooled connection for the callers after you; \
             name the other database in the statement instead (other_db.table)"
                .into(),
        ));
    }
    // The pool's reset keeps a session's active roles (MariaDB): `SET ROLE
    // NONE` would take rights from the callers after this one, another
    // role widen theirs.
    if crate::backend::sql_text::leading_words(sql, 2)
        .iter()
        .any(|words| words.len() == 2 && words[0] == "set" && words[1] == "role")
    {
        return Err(BackendError::Invalid(
            "SET ROLE is refused: the role would stay active on a pooled connection for the callers after you; \
             give the source's login the rights it needs, or a default role"
                .into(),
        ));
    }
    if crate::backend::sql_text::sets_mysql_time_zone_or_charset(sql) {
        return Err(BackendError::Invalid(
            "statements that set the session's time_zone or character sets (SET time_zone, SET NAMES, \
             character_set_*, collation_connection) are refused: Weir reads and sends TIMESTAMP values as UTC \
             and text as utf8mb4; convert in the statement instead (CONVERT_TZ, CONVERT(... USING ...))"
                .into(),
        ));
    }
    Ok(())
}

impl MysqlTransaction {
    /// Sets a session made read-only for the transaction back to read-write.
    async fn read_write_again(&self, conn: &mut Conn) {
        if self.read_only_session {
            if let Err(e) = conn.query_drop("SET SESSION TRANSACTION READ WRITE").await {
                // The session is broken: the pool drops it.
                tracing::debug!(error = %e, "could not make a session read-write again");
            }
        }
    }
}

#[async_trait]
impl SqlTransaction for MysqlTransaction {
    async fn query(&self, statement: Statement) -> Result<QueryStream, BackendError> {
        if self.read_only_source || self.read_only_session {
            refuse_leaving_read_only(&statement.sql)?;
        }
        refuse_session_changes(&statement.sql)?;
        let tx = self.conn.for_statement().await?;
        if let Some(cause) = tx.rolled_back {
            return Err(BackendError::TransactionRolledBack(cause));
        }
        if let Some(cause) = tx.broken {
            return Err(BackendError::TransactionBroken(cause));
        }
        if tx.committed {
            return Err(BackendError::CommittedImplicitly);
        }
        start(
            Hold::Transaction(tx),
            statement,
            (self.killer.clone(), self.packets.clone()),
        )
        .await
    }

    async fn commit(&self) -> Result<(), BackendError> {
        let mut tx = self.conn.to_end().await?;
        // Refused, the handle goes, and the pool's reset rolls it back.
        if let Some(cause) = tx.broken {
            return Err(BackendError::TransactionRolledBack(cause));
        }
        if let Some(cause) = tx.rolled_back {
            self.read_write_again(&mut tx.conn).await;
            return Err(BackendError::TransactionRolledBack(cause));
        }
        let committed = tx.conn.query_drop("COMMIT").await.map_err(map_error);
        self.read_write_again(&mut tx.conn).await;
        committed
    }

    async fn rollback(&self) -> Result<(), BackendError> {
        let mut tx = self.conn.to_end().await?;
        // A statement that could not be stopped still runs on the session,
        // and ROLLBACK would wait behind it: the handle goes instead, and
        // the pool's reset rolls the transaction back once it has ended.
        if tx.broken.is_some() {
            return Ok(());
        }
        let rolled_back = tx.conn.query_drop("ROLLBACK").await.map_err(map_error);
        self.read_write_again(&mut tx.conn).await;
        // What the implicit commit took in stays: the caller must know.
        if tx.committed {
            return Err(BackendError::CommittedImplicitly);
        }
        rolled_back
    }
}

/// `tls = true`: verify the certificate and host against the public web
/// roots, or against `tls_ca_file` alone (read once here, so that a bad file
/// fails the configuration, not every connection); `trust_server_certificate`
/// accepts any certificate and still encrypts.
fn ssl_opts(config: &SourceConfig) -> Result<SslOpts, BackendError> {
    let mut ssl = SslOpts::default().with_danger_accept_invalid_certs(config.trust_server_certificate);
    if let Some(path) = &config.tls_ca_file {
        let roots = crate::pem::certificates(path, "tls_ca_file").map_err(BackendError::Invalid)?;
        ssl = ssl
            .with_root_certs(roots.iter().map(|der| der.to_vec().into()).collect())
            .with_disable_built_in_roots(true);
    }
    Ok(ssl)
}

/// A rejected certificate says why without naming hosts.
fn io_error(e: mysql_async::IoError) -> BackendError {
    let rustls = match &e {
        mysql_async::IoError::Io(io) => crate::backend::tls::in_io(io),
        mysql_async::IoError::Tls(mysql_async::TlsError::Tls(tls)) => Some(tls),
        mysql_async::IoError::Tls(_) => None,
    };
    BackendError::Unavailable(
        rustls
            .and_then(crate::backend::tls::rejection)
            .unwrap_or_else(|| e.to_string()),
    )
}

/// Whether a binlog read's error 1236 says the position is not in the
/// server's binary log (as MySQL and MariaDB word it).
fn binlog_position_gone(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "could not find first log",
        "purged",
        "impossible position",
        "position >",
        "file size",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// Classifies a mysql_async error by errno first, then by SQLSTATE.
/// Errors opening a session (its setup included): a database that is
/// missing or that the login may not use (1049, 1044) is the operator's to
/// fix, as a refused login is, not the caller's NOT_FOUND or
/// PERMISSION_DENIED, whose message would name the login.
fn map_connect_error(e: mysql_async::Error) -> BackendError {
    match &e {
        mysql_async::Error::Server(s) if matches!(s.code, 1049 | 1044) => {
            crate::backend::error::login_refused(&s.code.to_string(), &s.message)
        }
        _ => map_error(e),
    }
}

pub(crate) fn map_error(e: mysql_async::Error) -> BackendError {
    use EngineErrorKind as K;
    match e {
        mysql_async::Error::Server(s) => {
            let kind = match s.code {
                // 1008: DROP DATABASE of one that is not there.
                1146 | 1305 | 1049 | 1051 | 1008 => K::NotFound,
                // Syntax, unknown column, bad or truncated values (1265: an ENUM
                // value not in the list; 1525: a bad literal, `DATE'2024-13-01'`),
                // misused SQL (1093, 1111), collations that do not mix (1267,
                // 1270, 1271), operands of types an operation does not take
                // (MariaDB 4078, 4079: `inet6_col = 1`).
                // 1411: a value a function cannot read (STR_TO_DATE in a strict INSERT).
                1064 | 1054 | 1292 | 1366 | 1406 | 1264 | 1365 | 1110 | 1136 | 1265 | 1525 | 1093 | 1111 | 1267
                | 1270 | 1271 | 4078 | 4079 | 1411 => K::InvalidArgument,
                1062 | 1586 | 1022 | 1169 => K::AlreadyExists,
                // Constraints (1364: a NOT NULL column without a default left
                // out), and SIGNAL's unhandled user exception (1644).
                // 1369: a view's WITH CHECK OPTION. 1526: no partition for the
                // value; 1356: a view whose tables or columns are gone; 1175:
                // safe-update mode refusing an unkeyed UPDATE or DELETE.
                // 1100, 1099: a table not locked, or locked for reading, under
                // LOCK TABLES; 1192: a statement not allowed while a
                // transaction or lock is active; 1442: a table a trigger or
                // function may not change, as the statement uses it.
                1048 | 1451 | 1452 | 3819 | 4025 | 1364 | 1644 | 1369 | 1526 | 1356 | 1175 | 1100 | 1099 | 1192
                | 1442 => K::FailedPrecondition,
                // 1206 (the lock table full) and 1637 (too many active
                // transactions) end the transaction, as a deadlock does.
                // 3572: a NOWAIT lock not granted (PostgreSQL's 55P03). 1020:
                // a row changed since the transaction read it (MariaDB's
                // innodb_snapshot_isolation, on by default from 11.6.2), and
                // 3101: a commit rolled back (group replication); both end
                // the transaction.
                1213 | 1205 | 1206 | 1637 | 1180 | 1181 | 3572 | 1020 | 3101 => K::Aborted,
                1317 | 3024 | 1969 => K::DeadlineExceeded,
                // 1370: a routine's EXECUTE; 1419: SUPER for routines under
                // binary logging; 1095: another user's thread.
                1792 | 1290 | 1142 | 1143 | 1044 | 1227 | 1370 | 1419 | 1095 => K::PermissionDenied,
                // Too many connections, to the server or for the user.
                1040 | 1203 => K::Overloaded,
                // 1226: a per-user quota (queries, updates or connections an hour).
                // 1461: the server's max_prepared_stmt_count.
                1041 | 1114 | 1226 | 1461 => K::ResourceExhausted,
                // A packet over max_allowed_packet: the statement's size is
                // the caller's to change (the server closes the session, which
                // a transaction then finds lost).
                1153 => K::InvalidArgument,
                // Not preparable, and sent with parameters (`execute_unprepared`).
                NOT_PREPARABLE => K::InvalidArgument,
                // Access denied, account locked (MySQL 3118, MariaDB 4151),
                // host not allowed or blocked, password expired, an
                // authentication method the driver lacks.
                1045 | 1698 | 3118 | 4151 | 1130 | 1129 | 1820 | 1862 | 1251 => {
                    return crate::backend::error::login_refused(&s.code.to_string(), &s.message);
                }
                // The binary log cannot be read from the position asked for:
                // purged, reset (`RESET MASTER`), or another server at this
                // address after a failover. Never INTERNAL, retried for ever.
                // (1236 also reports an event past `max_allowed_packet` or a
                // truncated log: the position is kept, a setting is to fix.)
                1236 if binlog_position_gone(&s.message) => {
                    return BackendError::PositionNotRetained(format!(
                        "the server's binary log does not hold the subscription's position (MySQL error 1236: {}); \
                         delete the subscription and watch it anew",
                        s.message
                    ));
                }
                1236 => K::FailedPrecondition,
                _ => classify_sqlstate(&s.state),
            };
            BackendError::Engine {
                kind,
                code: s.code.to_string(),
                message: s.message,
            }
        }
        mysql_async::Error::Io(e) => io_error(e),
        // A statement's own `LOAD DATA LOCAL`: Weir answers only its loads' file requests.
        mysql_async::Error::Driver(mysql_async::DriverError::LocalInfile(mysql_async::LocalInfileError::NoHandler)) => {
            BackendError::Invalid(
                "LOAD DATA LOCAL INFILE cannot read files through Weir, and the driver closed the session it ran on \
                 (a transaction on it is rolled back); send the rows with BulkLoadService.Load"
                    .into(),
            )
        }
        // The statement and its parameters, refused before they were sent: the
        // session is as it was (`:name` is a named parameter to the driver).
        mysql_async::Error::Driver(
            e @ (mysql_async::DriverError::Params(_)
            | mysql_async::DriverError::MixedParams
            | mysql_async::DriverError::StmtParamsMismatch { .. }
            | mysql_async::DriverError::StmtParamsNumberExceedsLimit { .. }
            | mysql_async::DriverError::PacketTooLarge
            | mysql_async::DriverError::NestedTransaction
            | mysql_async::DriverError::ReadOnlyTransNotSupported),
        ) => BackendError::Invalid(format!(
            "{e} (write parameters as ?, not :name; a statement and its values must fit the server's max_allowed_packet)"
        )),
        mysql_async::Error::Driver(e @ (mysql_async::DriverError::FromValue { .. } | mysql_async::DriverError::FromRow { .. })) => {
            BackendError::Internal(e.to_string())
        }
        mysql_async::Error::Driver(e) => BackendError::Unavailable(e.to_string()),
        other => BackendError::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_and_values_are_measured_against_the_servers_packet() {
        use mysql_async::Value as V;
        const MB: usize = 1024 * 1024;
        let bytes = |n: usize| V::Bytes(vec![0; n]);
        assert!(refuse_past_packet_limit("SELECT 1", &[bytes(3 * MB)], 4 * MB).is_ok());
        let err = refuse_past_packet_limit("SELECT ?, ?", &[bytes(3 * MB), bytes(2 * MB)], 4 * MB);
        assert!(
            matches!(err, Err(BackendError::Invalid(m)) if m.contains("values")),
            "one packet of 5 MB"
        );
        // Past the protocol's packet length, text and bytes go as long data, each alone.
        assert!(refuse_past_packet_limit("SELECT ?, ?", &[bytes(9 * MB), bytes(9 * MB)], 16 * MB).is_ok());
        let err = refuse_past_packet_limit("SELECT ?, ?", &[V::Int(1), bytes(17 * MB)], 16 * MB);
        assert!(matches!(err, Err(BackendError::Parameter { index: 2, .. })), "{err:?}");
        assert!(refuse_past_packet_limit("SELECT ?", &[bytes(17 * MB)], 64 * MB).is_ok());
        let err = refuse_past_packet_limit(&"x".repeat(2048), &[], 2048);
        assert!(matches!(err, Err(BackendError::Invalid(m)) if m.contains("the statement is 2048 bytes")));
    }
    use crate::config::Config;

    fn source(keys: &str) -> Result<SourceConfig, String> {
        let toml = format!("[tenants.a.sources.s]\nengine = \"mysql\"\nhost = \"h\"\nuser = \"u\"\n{keys}");
        Config::from_toml(&toml)
            .map(|c| c.tenants["a"].sources["s"].clone())
            .map_err(|e| e.to_string())
    }

    /// The same situations as PostgreSQL's and SQL Server's classify them.
    #[test]
    fn errnos_of_situations_every_engine_meets() {
        use EngineErrorKind as K;
        for (code, state, kind) in [
            (3572u16, "HY000", K::Aborted),
            (1305, "42000", K::NotFound),
            (1370, "42000", K::PermissionDenied),
            (1369, "HY000", K::FailedPrecondition),
            (1022, "23000", K::AlreadyExists),
            (1226, "42000", K::ResourceExhausted),
        ] {
            let e = map_error(mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: String::new(),
                state: state.into(),
            }));
            assert!(
                matches!(e, BackendError::Engine { kind: k, .. } if k == kind),
                "{code}: {e:?}"
            );
        }
    }

    #[test]
    fn an_unreadable_binlog_position_is_not_retained() {
        let e = map_error(mysql_async::Error::Server(mysql_async::ServerError {
            code: 1236,
            message: "Could not find first log file name in binary log index file".into(),
            state: "HY000".into(),
        }));
        assert!(
            matches!(&e, BackendError::PositionNotRetained(m) if m.contains("1236") && m.contains("first log file")),
            "{e:?}"
        );
        // The same errno for an event past max_allowed_packet: the position
        // is kept, a setting is to fix.
        let e = map_error(mysql_async::Error::Server(mysql_async::ServerError {
            code: 1236,
            message: "log event entry exceeded max_allowed_packet; Increase max_allowed_packet on master".into(),
            state: "HY000".into(),
        }));
        assert!(
            matches!(&e, BackendError::Engine { kind: EngineErrorKind::FailedPrecondition, code, .. } if code == "1236"),
            "{e:?}"
        );
    }

    #[test]
    fn refused_logins_name_no_user_or_host() {
        for code in [1045u16, 3118, 4151, 1130, 1862] {
            let e = map_error(mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: "Access denied for user 'weir'@'10.0.3.7'".into(),
                state: "HY000".into(),
            }));
            match e {
                BackendError::Unavailable(m) => {
                    assert!(
                        m.contains(&code.to_string()) && !m.contains("weir'") && !m.contains("10.0.3.7"),
                        "{m}"
                    )
                }
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn tls_settings_cover_pooled_sessions_and_change_streams() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["db".to_string()]).expect("certificate");
        std::fs::write(&ca, cert.cert.pem()).expect("write");
        let own_ca =
            MysqlSource::new(&source(&format!("tls = true\ntls_ca_file = \"{}\"", ca.display())).expect("keys"))
                .expect("source");
        let trusting =
            MysqlSource::new(&source("tls = true\ntrust_server_certificate = true").expect("keys")).expect("source");
        for opts in [&own_ca.killer.opts, &own_ca.change_opts] {
            let ssl = opts.ssl_opts().expect("TLS");
            assert!(ssl.disable_built_in_roots() && ssl.root_certs().len() == 1 && !ssl.accept_invalid_certs());
        }
        for opts in [&trusting.killer.opts, &trusting.change_opts] {
            let ssl = opts.ssl_opts().expect("TLS");
            assert!(ssl.accept_invalid_certs() && !ssl.disable_built_in_roots());
        }
        let plain = MysqlSource::new(&source("").expect("keys")).expect("source");
        assert!(plain.killer.opts.ssl_opts().is_none() && plain.change_opts.ssl_opts().is_none());

        let missing = source("tls = true\ntls_ca_file = \"/nonexistent/ca.pem\"").expect("checked when read");
        assert!(
            matches!(MysqlSource::new(&missing), Err(BackendError::Invalid(m)) if m.contains("tls_ca_file") && m.contains("/nonexistent/ca.pem"))
        );
        for keys in ["trust_server_certificate = true", "tls_ca_file = \"/x.pem\""] {
            let err = source(keys).expect_err(keys);
            assert!(err.contains("applies only with tls = true"), "{keys}: {err}");
        }
    }

    /// Errors after which InnoDB has rolled the whole transaction back are
    /// not about a row: a load does not try its rows one by one after them
    /// (each would commit on its own).
    #[test]
    fn errors_that_end_the_transaction_are_aborted() {
        for code in [1213, 1205, 1206, 1637] {
            let e = map_error(mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: "m".into(),
                state: "HY000".into(),
            }));
            assert!(
                matches!(
                    e,
                    BackendError::Engine {
                        kind: EngineErrorKind::Aborted,
                        ..
                    }
                ),
                "{code}: {e:?}"
            );
        }
    }
}

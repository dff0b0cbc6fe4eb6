//! Multiplexing: unary plain reads share a few connections instead of taking
//! one each. tokio-postgres pipelines what is sent on one client (each
//! statement goes out without waiting for the previous result), so the
//! engine reads several statements per wake-up and the gateway sends them in
//! one write; on a machine short of cores that wake-up is most of a point
//! lookup's cost. Only statements that cannot change the session (see
//! `session`) are shared, so no session state passes between callers.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use parking_lot::Mutex;
use tokio_postgres::Client;

use super::{cache_statement, describe, map_error, plan_went_stale, session_lost, PgRowStream, StatementGuard, Target};
use crate::backend::breaker::Breaker;
use crate::backend::{BackendError, Column, QueryStream, Statement};
use crate::config::MultiplexConfig;

/// One shared connection and the statements prepared on it.
struct Session {
    client: Client,
    /// Ends the connection when the session is dropped (see `Drop`).
    driver: tokio::task::AbortHandle,
    statements: Mutex<HashMap<String, tokio_postgres::Statement>>,
    /// An abandoned statement's empty query found no answer within the
    /// statement timeout and a grace: the server or the network is gone
    /// silent (a failover), and the session is replaced rather than left to
    /// gather reads until the operating system gives up on it.
    silent: AtomicBool,
}

/// A session replaced (found silent, or its slot reconnected) is closed
/// once the last caller reading from it is done, not left to work through
/// the abandoned reads queued on it (each up to the statement timeout) on a
/// connection no longer counted against the source's connections.
impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Session {
    async fn prepare(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.lock().get(sql) {
            return Ok(s.clone());
        }
        // Two callers may prepare the same text at once; both statements work.
        let statement = self.client.prepare(sql).await?;
        cache_statement(&mut self.statements.lock(), sql, statement.clone());
        Ok(statement)
    }

    /// Sends `statement` and reads its first row, so that a session lost
    /// before any row arrived can still be handled by the caller.
    async fn start(&self, statement: &Statement) -> Result<Started, (Stage, BackendError)> {
        let prepared = self
            .prepare(&statement.sql)
            .await
            .map_err(|e| (Stage::Prepare, map_error(e)))?;
        let columns = describe(&prepared, statement).map_err(|e| (Stage::Prepare, e))?;
        let params = statement.params.iter().map(super::PgParam);
        let rows = self
            .client
            .query_raw(&prepared, params)
            .await
            .map_err(|e| (Stage::Run, map_error(e)))?;
        let mut rows = Box::pin(rows);
        let first = match poll_fn(|cx| rows.as_mut().poll_next(cx)).await {
            Some(Err(e)) => return Err((Stage::Run, map_error(e))),
            Some(Ok(row)) => Some(row),
            None => None,
        };
        Ok(Started {
            width: prepared.columns().len(),
            columns,
            rows,
            first,
        })
    }
}

/// A statement running on a shared session.
struct Started {
    columns: Vec<Column>,
    width: usize,
    rows: Pin<Box<tokio_postgres::RowStream>>,
    /// `None` when the result has no rows.
    first: Option<tokio_postgres::Row>,
}

struct Slot {
    /// Opened on first use and again after the connection is lost.
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// Statements on this slot whose results are not all read, counting
    /// those waiting for it to connect.
    in_flight: AtomicUsize,
    /// Connected, as far as the last call knows.
    open: AtomicBool,
    /// Its last connection attempt failed: until then, it is chosen only
    /// when every slot is failing.
    failed_until: Mutex<Option<Instant>>,
    /// How long an abandoned statement may take to end: the shared
    /// statement timeout and a grace.
    settles_within: Duration,
}

/// Beyond the shared statement timeout, how long an abandoned statement's
/// session may take to answer before it is presumed gone.
const SETTLE_GRACE: Duration = Duration::from_secs(5);

/// How long a slot that could not connect is passed over.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);

impl Slot {
    fn avoided(&self) -> bool {
        !self.open.load(Ordering::Relaxed) && self.failed_until.lock().is_some_and(|t| Instant::now() < t)
    }
}

/// Counts a statement against its slot until the engine is done with it.
pub(super) struct InFlight {
    slot: Arc<Slot>,
    /// Where it was sent. Keeps the client, and so the connection, open while rows arrive.
    session: Option<Arc<Session>>,
    /// Its result was read to the end or it failed.
    over: bool,
}

impl InFlight {
    fn new(slot: &Arc<Slot>) -> Self {
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            slot: slot.clone(),
            session: None,
            over: false,
        }
    }

    pub(super) fn finish(mut self) {
        self.over = true;
    }
}

/// A shared statement that its caller left (deadline, row cap, dropped
/// stream), before or after its first row, runs on: it cannot be cancelled
/// without cancelling the others on its connection. It stays counted, so new
/// reads go to a free connection, until an empty query sent behind it is
/// answered, which the engine does only once it is over.
impl Drop for InFlight {
    fn drop(&mut self) {
        let left = self.session.take().filter(|_| !self.over);
        if let (Some(session), Ok(runtime)) = (left, tokio::runtime::Handle::try_current()) {
            let slot = self.slot.clone();
            runtime.spawn(async move {
                if tokio::time::timeout(slot.settles_within, session.client.simple_query(""))
                    .await
                    .is_err()
                {
                    session.silent.store(true, Ordering::Relaxed);
                }
                slot.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        } else {
            self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

pub struct Multiplexer {
    target: Target,
    slots: Vec<Arc<Slot>>,
    /// The engine refuses writes: any statement may be sent twice.
    read_only: bool,
    /// Whether each statement text seen may be shared: lexing it again on
    /// every call cost more than the rest of the choice.
    shareable: Mutex<HashMap<String, bool>>,
}

/// Where a statement was when its connection was lost.
#[derive(PartialEq)]
enum Stage {
    /// Preparing: the statement has not run.
    Prepare,
    /// Bound and executed: it may have run.
    Run,
}

impl Multiplexer {
    /// `base` is the source's connection settings; `options` its session
    /// options (read-only), to which the shared statement timeout is added.
    pub fn new(base: &Target, options: &[String], multiplex: &MultiplexConfig, read_only: bool) -> Self {
        let mut target = base.clone();
        let mut options = options.to_vec();
        options.push(format!(
            "-c statement_timeout={}",
            multiplex.statement_timeout.as_millis().max(1)
        ));
        // As pooled sessions (`STRINGS_AS_WEIR_READS_THEM`): the shareable
        // check must read strings as the server does; a shared session is
        // never reset, so a startup option, which no statement undoes.
        options.push("-c standard_conforming_strings=on".to_string());
        // Tells operators in pg_stat_activity which sessions are shared.
        target
            .config
            .application_name("weir-multiplexed")
            .options(options.join(" "));
        let slots = (0..multiplex.connections)
            .map(|_| {
                Arc::new(Slot {
                    session: tokio::sync::Mutex::new(None),
                    in_flight: AtomicUsize::new(0),
                    open: AtomicBool::new(false),
                    failed_until: Mutex::new(None),
                    settles_within: multiplex.statement_timeout + SETTLE_GRACE,
                })
            })
            .collect();
        Self {
            target,
            slots,
            read_only,
            shareable: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `sql` cannot change the session, so it may run on a shared one.
    pub fn shares(&self, sql: &str) -> bool {
        if let Some(&verdict) = self.shareable.lock().get(sql) {
            return verdict;
        }
        let verdict = super::session::leaves_session_unchanged(sql);
        cache_statement(&mut self.shareable.lock(), sql, verdict);
        verdict
    }

    /// Shared connections open now.
    pub fn open(&self) -> u32 {
        self.count(|s| s.open.load(Ordering::Relaxed))
    }

    /// Shared connections open with no statement on them.
    pub fn idle(&self) -> u32 {
        self.count(|s| s.open.load(Ordering::Relaxed) && s.in_flight.load(Ordering::Relaxed) == 0)
    }

    fn count(&self, which: impl Fn(&Slot) -> bool) -> u32 {
        let n = self.slots.iter().filter(|s| which(s)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The slot with the fewest statements in flight (counting those waiting
    /// for it to connect), so that a slow read or a reconnect holds up as few
    /// others as possible; one that just failed to connect only as a last resort.
    fn pick(&self) -> Result<&Arc<Slot>, BackendError> {
        self.slots
            .iter()
            .min_by_key(|s| (s.avoided(), s.in_flight.load(Ordering::Relaxed)))
            .ok_or_else(|| BackendError::Internal("multiplexing has no connections".into()))
    }

    async fn session(&self, slot: &Slot, breaker: &Breaker) -> Result<Arc<Session>, BackendError> {
        let mut current = slot.session.lock().await;
        if let Some(session) = current
            .as_ref()
            .filter(|s| !s.client.is_closed() && !s.silent.load(Ordering::Relaxed))
        {
            return Ok(session.clone());
        }
        *current = None;
        slot.open.store(false, Ordering::Relaxed);
        breaker.admit()?;
        let connected = self.target.connect().await;
        breaker.record(&connected);
        if let Err(e) = &connected {
            tracing::warn!(error = %e, "cannot open a shared postgres connection");
        }
        *slot.failed_until.lock() = connected.is_err().then(|| Instant::now() + CONNECT_BACKOFF);
        let driven = connected?;
        let session = Arc::new(Session {
            client: driven.client,
            driver: driven.driver,
            statements: Mutex::new(HashMap::new()),
            silent: AtomicBool::new(false),
        });
        *current = Some(session.clone());
        slot.open.store(true, Ordering::Relaxed);
        Ok(session)
    }

    /// Runs `statement` on the least busy shared connection. A caller that
    /// leaves early does not cancel it: the engine's statement timeout does.
    pub async fn query(&self, statement: Statement, breaker: &Breaker) -> Result<QueryStream, BackendError> {
        super::types::check_params(&statement.params)?;
        let mut retried = false;
        let mut connect_failures = 0;
        // Each shared connection may hold a statement prepared before its table changed.
        let mut replans = 0;
        loop {
            let slot = self.pick()?;
            // Counted while it waits for a connection, so others go elsewhere.
            let mut in_flight = InFlight::new(slot);
            let session = match self.session(slot, breaker).await {
                Ok(session) => session,
                // Nothing was sent: another slot that is open can take it.
                Err(_) if connect_failures < self.slots.len() && self.open() > 0 => {
                    connect_failures += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            in_flight.session = Some(session.clone());
            let started = session.start(&statement).await;
            if let Err((_, e)) = &started {
                // The statement was refused or its session lost: nothing runs on.
                in_flight.over = true;
                session.statements.lock().remove(&statement.sql);
                if plan_went_stale(e) && replans < self.slots.len() {
                    replans += 1;
                    continue;
                }
            }
            match started {
                Ok(started) => {
                    return Ok(QueryStream {
                        columns: started.columns,
                        rows: Box::pin(PgRowStream {
                            inner: started.rows,
                            guard: StatementGuard { lease: None },
                            rows_affected: None,
                            width: started.width,
                            in_flight: Some(in_flight),
                            first: Some(started.first),
                        }),
                    })
                }
                // Sent again on a new connection when the shared one was lost
                // before the statement ran, or when the engine refuses writes.
                // Otherwise it may have run: a view or policy can hide a
                // function with effects that the session lexer cannot see.
                Err((stage, e)) if !retried && session_lost(&e) && (stage == Stage::Prepare || self.read_only) => {
                    retried = true;
                    let mut current = slot.session.lock().await;
                    if current.as_ref().is_some_and(|s| Arc::ptr_eq(s, &session)) {
                        *current = None;
                    }
                }
                Err((_, e)) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn multiplexer(config: &tokio_postgres::Config, connections: u32) -> Multiplexer {
        let multiplex = MultiplexConfig {
            connections,
            statement_timeout: Duration::from_secs(1),
        };
        Multiplexer::new(&Target::plain(config.clone()), &[], &multiplex, false)
    }

    fn picked(m: &Multiplexer) -> usize {
        let slot = m.pick().expect("a slot");
        m.slots.iter().position(|s| Arc::ptr_eq(s, slot)).expect("one of them")
    }

    #[test]
    fn the_verdict_on_a_statement_is_the_lexers_and_is_kept() {
        let m = multiplexer(&tokio_postgres::Config::new(), 1);
        for _ in 0..2 {
            assert!(m.shares("SELECT abalance FROM pgbench_accounts WHERE aid = $1"));
            assert!(!m.shares("SELECT set_config('role', 'x', false)"));
            assert!(!m.shares("SET search_path = x"));
        }
        assert_eq!(m.shareable.lock().len(), 3);
    }

    #[test]
    fn reads_go_to_the_least_busy_slot_and_around_one_that_cannot_connect() {
        let m = multiplexer(&tokio_postgres::Config::new(), 3);
        assert_eq!(picked(&m), 0);
        // Statements in flight, or waiting for their slot to connect, count.
        let first = InFlight::new(&m.slots[0]);
        assert_eq!(picked(&m), 1);
        let second = InFlight::new(&m.slots[1]);
        assert_eq!(picked(&m), 2);
        drop((first, second));
        assert_eq!(picked(&m), 0);
        // A slot that just failed to connect is passed over, however idle...
        *m.slots[0].failed_until.lock() = Some(Instant::now() + CONNECT_BACKOFF);
        let busy: Vec<_> = (0..5).map(|_| InFlight::new(&m.slots[1])).collect();
        assert_eq!(picked(&m), 2);
        // ...until its back-off is over,
        *m.slots[0].failed_until.lock() = Some(Instant::now());
        assert_eq!(picked(&m), 0);
        // ...or every slot is failing: then the least busy again.
        for slot in &m.slots {
            *slot.failed_until.lock() = Some(Instant::now() + CONNECT_BACKOFF);
        }
        assert_eq!(picked(&m), 0);
        drop(busy);
        assert!(m.slots.iter().all(|s| s.in_flight.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn shared_connections_are_idle_when_open_with_nothing_on_them() {
        let m = multiplexer(&tokio_postgres::Config::new(), 3);
        assert_eq!((m.open(), m.idle()), (0, 0));
        m.slots[0].open.store(true, Ordering::Relaxed);
        m.slots[1].open.store(true, Ordering::Relaxed);
        let running = InFlight::new(&m.slots[1]);
        assert_eq!((m.open(), m.idle()), (2, 1));
        running.finish();
        assert_eq!((m.open(), m.idle()), (2, 2));
    }

    #[tokio::test]
    async fn a_server_that_cannot_be_reached_is_unavailable_and_passed_over() {
        let mut config = tokio_postgres::Config::new();
        // Nothing listens on port 1.
        config
            .host("127.0.0.1")
            .port(1)
            .user("nobody")
            .connect_timeout(Duration::from_secs(2));
        let m = multiplexer(&config, 2);
        let statement = Statement {
            sql: "SELECT 1".into(),
            params: vec![],
            whole_result: true,
        };
        let err = m
            .query(statement, &Breaker::default())
            .await
            .err()
            .expect("nothing to connect to");
        assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
        assert_eq!(m.open(), 0);
        assert!(m.slots[0].avoided(), "the slot that failed waits out its back-off");
        assert_eq!(picked(&m), 1);
        assert_eq!(m.slots[0].in_flight.load(Ordering::Relaxed), 0, "nothing left counted");
    }
}

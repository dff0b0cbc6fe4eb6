//! A bb8 pool that fails fast: when the database cannot be reached and no
//! connection is open, callers waiting for one learn at once (UNAVAILABLE
//! with the cause) instead of waiting out the acquire timeout and mistaking
//! it for a busy pool. While connections are open, a failed attempt to open
//! another fails no one: a busy connection may still come free. Each failed
//! attempt counts once toward the breaker. Shared by the engines pooled with
//! bb8.

use std::sync::Arc;
use std::time::Instant;

use bb8::{ManageConnection, Pool, PooledConnection, RunError};

use super::breaker::{Breaker, CircuitState};
use super::{BackendError, EngineErrorKind, PoolStatus};
use crate::config::PoolConfig;

/// The last failed attempt to open a connection, as its waiting callers
/// hear of it: an engine's refusal (too many connections) keeps its code.
#[derive(Clone, Default)]
struct Failure {
    message: String,
    engine: Option<(EngineErrorKind, String)>,
}

impl Failure {
    fn of(error: &BackendError) -> Failure {
        match error {
            BackendError::Engine { kind, code, message } => Failure {
                message: message.clone(),
                engine: Some((*kind, code.clone())),
            },
            BackendError::Unavailable(m) => Failure {
                message: m.clone(),
                engine: None,
            },
            other => Failure {
                message: other.to_string(),
                engine: None,
            },
        }
    }

    fn error(&self) -> BackendError {
        match &self.engine {
            Some((kind, code)) => BackendError::Engine {
                kind: *kind,
                code: code.clone(),
                message: self.message.clone(),
            },
            None => BackendError::Unavailable(self.message.clone()),
        }
    }
}

/// Publishes connection failures to the callers waiting in `lease`.
struct ConnectErrors<E> {
    latest: Arc<tokio::sync::watch::Sender<Failure>>,
    breaker: Arc<Breaker>,
    map: fn(E) -> BackendError,
    engine: &'static str,
}

impl<E> Clone for ConnectErrors<E> {
    fn clone(&self) -> Self {
        Self {
            latest: self.latest.clone(),
            breaker: self.breaker.clone(),
            map: self.map,
            engine: self.engine,
        }
    }
}

impl<E> std::fmt::Debug for ConnectErrors<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectErrors").field("engine", &self.engine).finish()
    }
}

impl<E: Send + 'static> bb8::ErrorSink<E> for ConnectErrors<E> {
    fn sink(&self, error: E) {
        let error = (self.map)(error);
        let failure = Failure::of(&error);
        // One count per failed attempt, however many callers wait for it.
        self.breaker.record::<()>(&Err(error));
        tracing::warn!(engine = self.engine, error = %failure.message, "cannot open a connection");
        self.latest.send_replace(failure);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(self.clone())
    }
}

/// Counts each connection opened as the source's success: the caller of a
/// breaker's probe may give up before its connection comes (the connect runs
/// on in the pool), and the breaker would then stay half-open, refusing
/// calls, until its probe limit though the source is back.
#[derive(Debug)]
struct Opened(Arc<Breaker>);

impl<C: Send + 'static, E: 'static> bb8::CustomizeConnection<C, E> for Opened {
    fn on_acquire<'a>(
        &'a self,
        _connection: &'a mut C,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send + 'a>> {
        self.0.success();
        Box::pin(async { Ok(()) })
    }
}

pub struct FailFastPool<M: ManageConnection> {
    pool: Pool<M>,
    failures: Arc<tokio::sync::watch::Sender<Failure>>,
    max_size: u32,
    map: fn(M::Error) -> BackendError,
    breaker: Arc<Breaker>,
    /// Idle connections known dead without a round trip.
    dead: fn(&mut M::Connection) -> bool,
}

impl<M: ManageConnection> FailFastPool<M> {
    /// Connections open lazily, so a source that is down at start does not stop the gateway.
    pub fn new(manager: M, config: &PoolConfig, engine: &'static str, map: fn(M::Error) -> BackendError) -> Self {
        let failures = Arc::new(tokio::sync::watch::channel(Failure::default()).0);
        let breaker = Arc::new(Breaker::default());
        let sink = ConnectErrors {
            latest: failures.clone(),
            breaker: breaker.clone(),
            map,
            engine,
        };
        let pool = Pool::builder()
            .error_sink(Box::new(sink))
            .connection_customizer(Box::new(Opened(breaker.clone())))
            .max_size(config.max_size)
            .min_idle(config.min_idle)
            .idle_timeout(config.idle_timeout)
            .connection_timeout(config.acquire_timeout)
            // A round trip per checkout would double the cost of short calls;
            // broken connections are found by `has_broken` instead.
            .test_on_check_out(false)
            // The most recently used connection first: under a steady load the
            // same few sessions stay warm in the engine, and the rest go idle
            // long enough for idle_timeout to close them.
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .retry_connection(false)
            .build_unchecked(manager);
        Self {
            pool,
            failures,
            max_size: config.max_size,
            map,
            breaker,
            dead: |_| false,
        }
    }

    /// Connections for which `dead` holds are dropped, not handed out. bb8
    /// runs `has_broken` only when a connection comes back, so without this
    /// every idle connection of a database that restarted would fail a call.
    /// (bb8's own checkout test would publish its failure to every waiting
    /// caller through the error sink.)
    pub fn passing_over(mut self, dead: fn(&mut M::Connection) -> bool) -> Self {
        self.dead = dead;
        self
    }

    pub async fn lease(&self) -> Result<PooledConnection<'static, M>, BackendError> {
        self.breaker.admit()?;
        let started = Instant::now();
        let mut failures = self.failures.subscribe();
        // Whether an attempt to open a connection failed while this caller waited.
        let mut failed = false;
        loop {
            let get = self.pool.get_owned();
            tokio::pin!(get);
            let got = loop {
                tokio::select! {
                    // The connection first: no random draw per call, and a
                    // free connection is taken before a failure is looked at.
                    biased;
                    got = &mut get => break got,
                    // A connection attempt failed (the sink counted it for the
                    // breaker, once). With no connection open there is nothing
                    // to wait for; otherwise a busy one may still come free.
                    Ok(()) = failures.changed() => {
                        failed = true;
                        if self.pool.state().connections == 0 {
                            return Err(failures.borrow().error());
                        }
                    }
                }
            };
            let leased = match got {
                Ok(mut conn) => {
                    // Back to the pool, whose `has_broken` closes it; each pass drops one.
                    if (self.dead)(&mut conn) {
                        continue;
                    }
                    Ok(conn)
                }
                Err(RunError::User(e)) => Err((self.map)(e)),
                // Busy only if connections are open and none failed to open:
                // otherwise the source did not give one in time, and its
                // attempt is counted by the sink when it ends.
                Err(RunError::TimedOut) if failed || self.pool.state().connections == 0 => {
                    return Err(if failed {
                        failures.borrow().error()
                    } else {
                        BackendError::Unavailable(format!(
                            "no connection could be opened within acquire_timeout ({:?})",
                            started.elapsed()
                        ))
                    });
                }
                Err(RunError::TimedOut) => Err(BackendError::PoolExhausted {
                    max_size: self.max_size,
                    waited: started.elapsed(),
                }),
            };
            self.breaker.record(&leased);
            return leased;
        }
    }

    /// The source's circuit breaker, for connections opened outside the pool.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub fn circuit(&self) -> CircuitState {
        self.breaker.state()
    }

    pub fn status(&self) -> PoolStatus {
        let state = self.pool.state();
        PoolStatus {
            open: state.connections,
            idle: state.idle_connections,
        }
    }
}

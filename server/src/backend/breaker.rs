//! A circuit breaker per source. After `FAILURES` connection failures in a
//! row the source is known to be down: calls fail fast with UNAVAILABLE and
//! the time until the next probe, instead of each one waiting out a connect
//! attempt and piling load on a database that is starting up. When the open
//! period is over, one call probes (half-open): success closes the breaker,
//! failure opens it again for twice as long, with jitter, up to `MAX_OPEN`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;

use super::{BackendError, EngineErrorKind};

/// Consecutive connection failures that open the breaker.
const FAILURES: u32 = 3;
/// The first open period, doubled after each failed probe.
const FIRST_OPEN: Duration = Duration::from_millis(500);
const MAX_OPEN: Duration = Duration::from_secs(30);
/// A probe not heard back from within this is taken as lost: its caller gave
/// up (a deadline, a cancel) before the connect attempt ended, and without a
/// limit the breaker would refuse every call until the process restarts.
const PROBE_LIMIT: Duration = Duration::from_secs(30);

/// The breaker's state, as the `weir_source_circuit_state` metric shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
enum Phase {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        period: Duration,
    },
    /// One probe is out since `since`; `period` is the open period that preceded it.
    Probing {
        period: Duration,
        since: Instant,
    },
}

#[derive(Debug)]
pub struct Breaker {
    phase: Mutex<Phase>,
    /// Set while the phase is closed with no failure counted: every call
    /// checks and ends its lease with the breaker, and in that state (all
    /// but always) neither needs the lock.
    healthy: AtomicBool,
    probe_limit: Duration,
    /// The last connection error, for the fail-fast answer.
    cause: Mutex<String>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            phase: Mutex::new(Phase::Closed { failures: 0 }),
            healthy: AtomicBool::new(true),
            probe_limit: PROBE_LIMIT,
            cause: Mutex::new(String::new()),
        }
    }
}

/// `period` with ±20 % jitter, so replicas do not probe in step.
fn jittered(period: Duration) -> Duration {
    period.mul_f64(rand::rng().random_range(0.8..1.2))
}

impl Breaker {
    /// Whether a call may try to connect: `Err` (fail fast) while open, or
    /// while another call is probing.
    pub fn admit(&self) -> Result<(), BackendError> {
        if self.healthy.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut phase = self.phase.lock();
        let refuse = |retry_after: Duration| BackendError::CircuitOpen {
            cause: self.cause.lock().clone(),
            retry_after,
        };
        match *phase {
            Phase::Closed { .. } => Ok(()),
            Phase::Open { until, period } => {
                let now = Instant::now();
                if now < until {
                    return Err(refuse(until - now));
                }
                *phase = Phase::Probing { period, since: now };
                Ok(())
            }
            Phase::Probing { period, since } => {
                let now = Instant::now();
                if now.duration_since(since) < self.probe_limit {
                    return Err(refuse(Duration::from_millis(100)));
                }
                *phase = Phase::Probing { period, since: now };
                Ok(())
            }
        }
    }

    /// A connection was made (or the source answered).
    pub fn success(&self) {
        if self.healthy.load(Ordering::Acquire) {
            return;
        }
        self.close(&mut self.phase.lock());
    }

    /// Closed with no failure counted, under the phase's lock.
    fn close(&self, phase: &mut Phase) {
        *phase = Phase::Closed { failures: 0 };
        self.healthy.store(true, Ordering::Release);
    }

    /// A connection attempt failed because the source could not be reached.
    pub fn failure(&self, cause: &str) {
        *self.cause.lock() = cause.to_string();
        let mut phase = self.phase.lock();
        self.healthy.store(false, Ordering::Release);
        let open = |period: Duration| Phase::Open {
            until: Instant::now() + jittered(period),
            period,
        };
        *phase = match *phase {
            Phase::Closed { failures } if failures + 1 < FAILURES => Phase::Closed { failures: failures + 1 },
            Phase::Closed { .. } => {
                tracing::warn!(
                    error = cause,
                    "source unreachable {FAILURES} times in a row: failing fast until it answers a probe"
                );
                open(FIRST_OPEN)
            }
            Phase::Probing { period, .. } => open((period * 2).min(MAX_OPEN)),
            // A call admitted before the breaker opened failed too: the period stands.
            Phase::Open { until, period } => Phase::Open { until, period },
        };
    }

    /// Counts the outcome of one connection attempt.
    pub fn record<T>(&self, result: &Result<T, BackendError>) {
        match result {
            Ok(_) => self.success(),
            Err(BackendError::Unavailable(cause)) => self.failure(cause),
            // A busy pool has open connections, so the source is up: that
            // ends a probe, and left alone it would refuse calls until PROBE_LIMIT.
            Err(BackendError::PoolExhausted { .. }) => {
                let mut phase = self.phase.lock();
                if matches!(*phase, Phase::Probing { .. }) {
                    self.close(&mut phase);
                }
            }
            Err(BackendError::CircuitOpen { .. }) => {}
            // The engine refused the session (a login, a database it cannot
            // open): no call can succeed until that is fixed, so it counts.
            Err(BackendError::Engine {
                kind: EngineErrorKind::Unavailable,
                message,
                ..
            }) => self.failure(message),
            // Too many connections: the source is up, and full for now. Like a
            // busy pool, that ends a probe (else calls are refused until PROBE_LIMIT).
            Err(BackendError::Engine {
                kind: EngineErrorKind::Overloaded,
                ..
            }) => {
                let mut phase = self.phase.lock();
                if matches!(*phase, Phase::Probing { .. }) {
                    self.close(&mut phase);
                }
            }
            Err(_) => self.success(),
        }
    }

    pub fn state(&self) -> CircuitState {
        match *self.phase.lock() {
            Phase::Closed { .. } => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::Probing { .. } => CircuitState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(b: &Breaker) {
        b.record::<()>(&Err(BackendError::Unavailable("connection refused".into())));
    }

    #[test]
    fn opens_after_repeated_failures_and_probes_half_open() {
        let b = Breaker::default();
        down(&b);
        down(&b);
        assert!(b.admit().is_ok(), "two failures are not yet an outage");
        down(&b);
        assert_eq!(b.state(), CircuitState::Open);
        match b.admit() {
            Err(BackendError::CircuitOpen { retry_after, cause }) => {
                assert!(retry_after <= FIRST_OPEN.mul_f64(1.2));
                assert_eq!(cause, "connection refused");
            }
            other => panic!("expected fail-fast, got {other:?}"),
        }
        std::thread::sleep(FIRST_OPEN.mul_f64(1.25));
        assert!(b.admit().is_ok(), "one probe after the open period");
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.admit().is_err(), "only one probe at a time");
        // The probe fails: open again, for longer.
        down(&b);
        match b.admit() {
            Err(BackendError::CircuitOpen { retry_after, .. }) => assert!(retry_after > FIRST_OPEN.mul_f64(1.2)),
            other => panic!("expected fail-fast, got {other:?}"),
        }
        // A success closes it at once.
        b.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.admit().is_ok());
    }

    #[test]
    fn a_refused_login_counts_and_a_full_server_does_not() {
        let refused = |kind| {
            Err::<(), _>(BackendError::Engine {
                kind,
                code: "18456".into(),
                message: "the database rejected Weir's connection".into(),
            })
        };
        // Too many connections: the source is up. A refused login: each call
        // would try it again.
        for (kind, times, state) in [
            (EngineErrorKind::Overloaded, 5, CircuitState::Closed),
            (EngineErrorKind::Unavailable, 3, CircuitState::Open),
        ] {
            let b = Breaker::default();
            for _ in 0..times {
                b.record(&refused(kind));
            }
            assert_eq!(b.state(), state, "{kind:?}");
        }
        // A probe answered "too many connections" found the source up.
        let probing = Breaker::default();
        for _ in 0..3 {
            probing.record(&refused(EngineErrorKind::Unavailable));
        }
        std::thread::sleep(FIRST_OPEN.mul_f64(1.25));
        assert!(probing.admit().is_ok(), "the probe");
        probing.record(&refused(EngineErrorKind::Overloaded));
        assert_eq!(probing.state(), CircuitState::Closed);
    }

    #[test]
    fn a_probe_whose_caller_gave_up_is_replaced_after_the_probe_limit() {
        let b = Breaker {
            probe_limit: Duration::from_millis(50),
            ..Breaker::default()
        };
        for _ in 0..FAILURES {
            down(&b);
        }
        std::thread::sleep(FIRST_OPEN.mul_f64(1.25));
        assert!(b.admit().is_ok(), "the probe");
        // Its caller never reports back.
        assert!(b.admit().is_err(), "while the probe may still answer");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.admit().is_ok(), "a new probe once the first is taken as lost");
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.success();
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn busy_pools_and_engine_errors_do_not_count() {
        let b = Breaker::default();
        for _ in 0..10 {
            b.record::<()>(&Err(BackendError::PoolExhausted {
                max_size: 1,
                waited: Duration::ZERO,
            }));
        }
        assert_eq!(b.state(), CircuitState::Closed);
        down(&b);
        down(&b);
        b.record::<()>(&Err(BackendError::Invalid("bad".into())));
        down(&b);
        assert_eq!(b.state(), CircuitState::Closed, "the source answered in between");
    }

    #[test]
    fn a_probe_that_finds_the_pool_busy_closes_the_breaker() {
        let b = Breaker::default();
        for _ in 0..FAILURES {
            down(&b);
        }
        std::thread::sleep(FIRST_OPEN.mul_f64(1.25));
        assert!(b.admit().is_ok(), "the probe");
        b.record::<()>(&Err(BackendError::PoolExhausted {
            max_size: 1,
            waited: Duration::ZERO,
        }));
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.admit().is_ok(), "calls go through, not refused until the probe limit");
    }
}

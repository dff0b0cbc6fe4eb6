//! Request-rate limits that hold across replicas: each tenant's bucket is
//! kept in Redis and checked with one atomic script (GCRA, the generic cell
//! rate algorithm), so N replicas together admit the configured rate, not N
//! times it. The local bucket stays the fast first check; this one runs
//! only for calls the local bucket admitted. Redis's own clock is used, so
//! replicas' clocks do not need to agree.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::watch;

use crate::config::{GlobalLimitsConfig, RedisFailure};
use crate::error::Error;

/// GCRA: the bucket is one key holding the theoretical arrival time, in
/// µs since 2024 as a fraction: whole µs per unit would cap every rate at
/// 1,000,000/s (bytes!) and round the rest, and µs since 1970 are too large
/// for a double to keep the fraction.
/// KEYS[1] = bucket; ARGV = emission interval (µs, fractional), tolerance
/// (µs), cost, the longest the caller may wait for its turn (µs).
/// Returns {1, µs until the turn} when admitted (0: at once), {0, µs until a
/// call would be admitted at once} otherwise, taking nothing.
/// A stored time further ahead than any admission leaves one (the tolerance
/// plus the longest wait, `max_rate_wait` being at most 10 s) means Redis's
/// clock stepped back (NTP, a failover to a replica with another clock): it
/// is taken as a full bucket's worth ahead, not as hours of refusals.
/// A key that holds no number (written by something else, or of another
/// type) counts as a full bucket and is overwritten: a script error would
/// count as Redis failing, for every tenant.
/// `replicate_commands` lets Redis before 5 write after reading TIME.
const GCRA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1704067200) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local stored = redis.pcall('GET', KEYS[1])
local tat = type(stored) == 'string' and tonumber(stored) or now
if tat ~= tat or tat < now then tat = now end
if tat > now + tolerance + 10000000 then tat = now + tolerance end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at - now > max_wait then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.ceil(math.max(allow_at - now, 0))}
";

/// How far ahead a cost charge books its turn in the shared bucket: within
/// the script's 10 s allowance for stored times ahead of Redis's clock.
const BOOKING_AHEAD: Duration = Duration::from_secs(5);
/// After Redis failed to answer, calls do without it for this long: an
/// outage then costs neither `redis_timeout` per call nor a log line per call.
/// Then one call tries it again; while it still fails, the rest doubles, up
/// to `MAX_REST`.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);
const MAX_REST: Duration = Duration::from_secs(30);
/// Failures in a row before Redis is rested: one slow answer (a fork for
/// BGSAVE) fails its own call, not every call of the next second.
const FAILURES_BEFORE_REST: u32 = 3;
/// How long the first connection (DNS, TCP, TLS, AUTH, the script's load)
/// may take. It is made in the background: `redis_timeout` bounds the
/// checks, a round trip or two, not the setting up of a connection.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Ends a call's try of Redis after a rest (also when the call is dropped
/// while it waits for Redis's answer).
struct Probing<'a>(&'a AtomicBool);

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub struct GlobalLimiter {
    url: String,
    timeout: Duration,
    on_failure: RedisFailure,
    /// Before every key: deployments sharing one Redis keep apart.
    key_prefix: String,
    script: redis::Script,
    /// Connected in the background from the start, so a replica starts while Redis is down.
    /// The connection once made, and how many attempts failed so far.
    conn: Arc<watch::Sender<(Option<ConnectionManager>, u64)>>,
    connecting: Arc<AtomicBool>,
    /// The zero of `resting_until`.
    started: Instant,
    /// Milliseconds since `started` before which Redis is not asked again.
    resting_until: AtomicU64,
    /// Length of the last rest (ms); 0 while Redis answers.
    rest_ms: AtomicU64,
    /// The rest began before any connection was made: it ends when one is.
    rested_unconnected: AtomicBool,
    /// A call is trying Redis again after a rest: the others do without it.
    probing: AtomicBool,
    /// Failures since the last answer.
    failures_in_a_row: AtomicU32,
    /// Health rounds in a row whose check failed.
    rounds_failed: AtomicU32,
    /// Milliseconds since `started` of the last warning (0: none yet).
    last_warned: AtomicU64,
}

/// What a health round found of Redis, for a replica that refuses calls
/// without it (`fail_closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisReadiness {
    Answers,
    /// One round's check failed, where calls have not failed: asked again
    /// soon, as a source's first failed probe is, so that one slow answer
    /// (a Redis forking for a snapshot) takes no replica out of service.
    InDoubt,
    /// Calls are refused for want of Redis.
    Refusing,
}

impl GlobalLimiter {
    /// `None` when no Redis is configured (limits then count per replica).
    pub fn new(config: &GlobalLimitsConfig) -> Option<Self> {
        let url = config.redis_url.clone()?;
        let limiter = Self {
            url,
            timeout: config.redis_timeout,
            on_failure: config.on_redis_failure,
            key_prefix: config.redis_key_prefix.clone(),
            script: redis::Script::new(GCRA),
            conn: Arc::new(watch::Sender::new((None, 0))),
            connecting: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            resting_until: AtomicU64::new(0),
            rest_ms: AtomicU64::new(0),
            rested_unconnected: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            failures_in_a_row: AtomicU32::new(0),
            rounds_failed: AtomicU32::new(0),
            last_warned: AtomicU64::new(0),
        };
        // Made now, not at the first call: most of the time it is ready by
        // the time calls come.
        if tokio::runtime::Handle::try_current().is_ok() {
            limiter.start_connecting();
        }
        Some(limiter)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a failure and logs it (at most once per `REDIS_BACKOFF`);
    /// after a few in a row, or a failed try after a rest, rests Redis:
    /// for `REDIS_BACKOFF`, then twice as long as the last rest.
    fn failed(&self, error: String, probe: bool) -> String {
        crate::metrics::METRICS.global_limit_failures.inc();
        let now = self.now_ms();
        let backoff = u64::try_from(REDIS_BACKOFF.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(MAX_REST.as_millis()).unwrap_or(u64::MAX);
        let last = self.rest_ms.load(Ordering::Relaxed);
        // Only a failed try after a rest doubles it. Calls that were under
        // way when the first rest began fail too, and extend nothing.
        let rest = if probe {
            Some(last.saturating_mul(2).clamp(backoff, max))
        } else if last == 0 && self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= FAILURES_BEFORE_REST {
            Some(backoff)
        } else {
            None
        };
        if let Some(rest) = rest {
            let unconnected = self.conn.borrow().0.is_none();
            self.rested_unconnected.store(unconnected, Ordering::Relaxed);
            // The try after the rest goes through a new connection, made
            // meanwhile.
            self.reconnect();
            self.failures_in_a_row.store(0, Ordering::Relaxed);
            self.rest_ms.store(rest, Ordering::Relaxed);
            self.resting_until.store(now.saturating_add(rest), Ordering::Relaxed);
        }
        let last = self.last_warned.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= backoff;
        if due
            && self
                .last_warned
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let without = match self.on_failure {
                RedisFailure::FailOpen => "admitting calls on local limits only",
                RedisFailure::FailClosed => "refusing calls",
            };
            tracing::warn!(error = %error, "Redis unavailable for the shared limits: {without}; cost buckets count locally");
        } else {
            tracing::debug!(error = %error, "a shared-limit check failed");
        }
        error
    }

    /// Gives up the connection and starts making a new one: redis-rs
    /// reconnects after errors, not after silence, so one to a Redis gone
    /// without a reset (its pod moved, its address black-holed) would fail
    /// every check until the kernel gave up on it, about a quarter of an
    /// hour; nor does it leave a primary since demoted (READONLY).
    fn reconnect(&self) {
        self.conn.send_modify(|(made, _)| *made = None);
        self.start_connecting();
    }

    /// Starts making the connection in the background (with the script
    /// loaded), unless an attempt is under way.
    fn start_connecting(&self) {
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let (cell, connecting, url, script) = (
                self.conn.clone(),
                self.connecting.clone(),
                self.url.clone(),
                self.script.clone(),
            );
            tokio::spawn(async move {
                let connect = async {
                    let mut conn = ConnectionManager::new(redis::Client::open(url.as_str())?).await?;
                    script.prepare_invoke().load_async(&mut conn).await?;
                    redis::RedisResult::Ok(conn)
                };
                let outcome = tokio::time::timeout(CONNECT_WAIT, connect).await;
                // Before the outcome is published: the next call may try again.
                connecting.store(false, Ordering::Release);
                match outcome {
                    Ok(Ok(conn)) => cell.send_modify(|(made, _)| *made = Some(conn)),
                    // Logged by the calls that waited for it (`failed`).
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "cannot connect to Redis for the shared limits");
                        cell.send_modify(|(_, failures)| *failures += 1);
                    }
                    Err(_) => cell.send_modify(|(_, failures)| *failures += 1),
                }
            });
        }
    }

    /// The connection, once made. A call waits for it within its
    /// `redis_timeout`, and one that cannot does as when Redis does not
    /// answer, while the connection goes on being made for later calls.
    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(conn) = self.conn.borrow().0.clone() {
            return Ok(conn);
        }
        // Subscribed before any attempt starts: its outcome is not missed.
        let mut made = self.conn.subscribe();
        let failures_before = made.borrow_and_update().1;
        self.start_connecting();
        loop {
            let (conn, failures) = made.borrow_and_update().clone();
            if let Some(conn) = conn {
                return Ok(conn);
            }
            // The attempt failed: the calls waiting for it fail now, not at their timeout.
            if failures != failures_before {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::IoError,
                    "cannot connect to Redis",
                )));
            }
            // The sender lives as long as `self`: an error cannot come.
            if made.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn check(
        &self,
        conn: ConnectionManager,
        key: &str,
        rate: u32,
        burst: u32,
        cost: u32,
        max_wait: Duration,
    ) -> redis::RedisResult<(i64, i64)> {
        let interval = 1e6 / f64::from(rate.max(1));
        let tolerance = interval * f64::from(burst.max(1));
        let mut conn = conn;
        self.script
            .key(key)
            .arg(interval)
            .arg(tolerance)
            .arg(cost)
            .arg(u64::try_from(max_wait.as_micros()).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await
    }

    /// Asks bucket `name` of the tenant for `cost` tokens, at a turn within
    /// `max_wait`: `Ok(Ok(wait))` when admitted (to go ahead after `wait`),
    /// `Ok(Err(delay))` when not until `delay`, `Err` when Redis did not answer.
    async fn take(
        &self,
        name: &str,
        tenant: &str,
        (rate, burst): (u32, u32),
        cost: u32,
        max_wait: Duration,
    ) -> Result<Result<Duration, Duration>, String> {
        let key = self.key(name, tenant);
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        if self.now_ms() < self.resting_until.load(Ordering::Relaxed) {
            // A first connection slower than `redis_timeout` (TLS, AUTH, a
            // distant Redis) fails the calls that came before it, as a
            // silent Redis would; once it is made, the rest is over.
            let connected = self.conn.borrow().0.is_some();
            if !(connected && self.rested_unconnected.swap(false, Ordering::Relaxed)) {
                return Err("Redis failed to answer lately".into());
            }
            self.failures_in_a_row.store(0, Ordering::Relaxed);
            self.rest_ms.store(0, Ordering::Relaxed);
            self.resting_until.store(0, Ordering::Relaxed);
        }
        // After a rest one call tries Redis again; the others do without it
        // until it has its answer, rather than each paying `redis_timeout`.
        let probe = self.rest_ms.load(Ordering::Relaxed) != 0;
        if probe && self.probing.swap(true, Ordering::AcqRel) {
            return Err("Redis failed to answer lately".into());
        }
        // Released however the call ends, after `failed` has set the next rest.
        let _probing = probe.then_some(Probing(&self.probing));
        let labels = crate::metrics::TenantLabels {
            tenant: tenant.to_string(),
        };
        crate::metrics::METRICS.shared_limit_checks.get_or_create(&labels).inc();
        let checked = async {
            let conn = self.connection().await?;
            self.check(conn, &key, rate, burst, cost, max_wait).await
        };
        let answer = tokio::time::timeout(self.timeout, checked).await;
        if matches!(answer, Ok(Ok(_))) {
            self.answered();
        }

        match answer {
            Ok(Ok((1, wait_us))) => Ok(Ok(micros(wait_us))),
            Ok(Ok((_, delay_us))) => Ok(Err(micros(delay_us))),
            // The error text names no password: redis-rs does not print the
            // URL. Every failure counts: a Redis that answers but refuses
            // every write (MISCONF after a failed save, OOM under noeviction,
            // an ACL) fails every check as surely as one that cannot be
            // reached, and is rested the same way, with its log paced.
            Ok(Err(e)) => Err(self.failed(e.to_string(), probe)),
            Err(_) => Err(self.failed(format!("no answer within {:?}", self.timeout), probe)),
        }
    }

    /// The key of bucket `name` of `tenant`.
    fn key(&self, name: &str, tenant: &str) -> String {
        // Not `weir:{name}:{tenant}`: those keys held µs since 1970.
        format!("{}:gcra:{name}:{tenant}", self.key_prefix)
    }

    /// Redis answered a check: no rest, no failures counted.
    fn answered(&self) {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        self.rest_ms.store(0, Ordering::Relaxed);
        self.resting_until.store(0, Ordering::Relaxed);
    }

    /// Takes `cost` units from a cost bucket (rows, bytes, records), waiting
    /// while the tenant is over its rate. Cost buckets slow, never refuse:
    /// without Redis they fall back to the local bucket, whatever
    /// `on_redis_failure` says.
    /// Returns how long it waited for its turns.
    pub async fn charge(&self, name: &str, tenant: &str, rate: u32, cost: u64) -> Duration {
        let mut left = cost;
        let mut waited = Duration::ZERO;
        while left > 0 {
            // Pieces no larger than the burst (one second's worth). Each books
            // its turn up to BOOKING_AHEAD away: one that had to find the
            // whole piece free at once would be passed over, for as long as
            // they come, by smaller charges of the same tenant.
            let piece = u32::try_from(left.min(u64::from(rate.max(1)))).unwrap_or(u32::MAX);
            // The script admits by when the piece's turn ends; a booking is
            // allowed by where it starts (BOOKING_AHEAD from now at most),
            // the same for every size: otherwise a full second's piece needs
            // the bucket a second emptier than a small one, and smaller
            // charges keeping it between the two pass it over for ever. (The
            // burst, a second's worth, is the tolerance.)
            let max_wait = BOOKING_AHEAD.saturating_sub(Duration::from_secs(1))
                + Duration::from_secs_f64(f64::from(piece) / f64::from(rate.max(1)));
            loop {
                match self.take(name, tenant, (rate, rate), piece, max_wait).await {
                    Ok(Ok(wait)) => {
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        waited += wait;
                        break;
                    }
                    // The delay is until it would be admitted at once; it
                    // may book as soon as its turn is within `max_wait`.
                    Ok(Err(delay)) => {
                        let wait = delay.saturating_sub(max_wait).max(Duration::from_millis(1));
                        tokio::time::sleep(wait).await;
                        waited += wait;
                    }
                    // Logged by `failed`: the local bucket has charged it.
                    Err(_) => return waited,
                }
            }
            left -= u64::from(piece);
        }
        waited
    }

    /// Whether calls are refused for want of Redis (`fail_closed`, and Redis
    /// not answering): the replica is then not ready, so that traffic goes
    /// to replicas that can serve it. Redis is asked at every health round
    /// as a call asks it (the check itself, at no cost, on a bucket of no
    /// tenant's), whatever the calls found and however long they rest it: a
    /// replica without calls would not notice Redis gone, and one not ready
    /// gets no calls to learn that it is back (waiting out the calls' rests,
    /// up to 30 s, every replica stayed out of service that long after a
    /// short outage). A Redis that answers PING but refuses the check
    /// (MISCONF, OOM, an ACL) still refuses calls. An answer ends the calls'
    /// rest. A failed round is in doubt unless calls already rest Redis;
    /// the next failed one in a row counts as a call's failure, and
    /// replaces the connection: a replica out of service gets no calls
    /// whose failures would replace one gone silent or to a demoted
    /// primary, and would stay out of service for good.
    pub async fn health_round(&self) -> RedisReadiness {
        if self.on_failure != RedisFailure::FailClosed {
            return RedisReadiness::Answers;
        }
        let key = self.key("health", "");
        let checked = async {
            let conn = self.connection().await?;
            self.check(conn, &key, 1, 1, 0, Duration::ZERO).await
        };
        let error = match tokio::time::timeout(self.timeout, checked).await {
            Ok(Ok(_)) => {
                self.answered();
                self.rounds_failed.store(0, Ordering::Relaxed);
                return RedisReadiness::Answers;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        let rounds = self.rounds_failed.fetch_add(1, Ordering::Relaxed) + 1;
        if rounds == 1 && self.rest_ms.load(Ordering::Relaxed) == 0 {
            return RedisReadiness::InDoubt;
        }
        self.failed(error, false);
        self.reconnect();
        RedisReadiness::Refusing
    }

    /// Takes one token from the tenant's shared request bucket, at a turn
    /// within `max_wait`: returns how long to wait for it.
    pub async fn admit(&self, tenant: &str, rate: u32, burst: u32, max_wait: Duration) -> Result<Duration, Error> {
        match self.take("rate", tenant, (rate, burst), 1, max_wait).await {
            Ok(Ok(wait)) => Ok(wait),
            Ok(Err(retry_after)) => Err(Error::RateLimited { rate, retry_after }),
            // Logged by `failed`, once per outage and back-off.
            Err(_) => match self.on_failure {
                RedisFailure::FailOpen => Ok(Duration::ZERO),
                RedisFailure::FailClosed => Err(Error::GlobalLimitsUnavailable),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Redis that refuses connections (nothing listens on port 1).
    fn refused(on_failure: RedisFailure) -> GlobalLimiter {
        let config = GlobalLimitsConfig {
            redis_url: Some("redis://127.0.0.1:1/0".into()),
            redis_timeout: Duration::from_millis(500),
            on_redis_failure: on_failure,
            ..GlobalLimitsConfig::default()
        };
        GlobalLimiter::new(&config).expect("a Redis is configured")
    }

    #[tokio::test]
    async fn one_failed_health_round_is_in_doubt_and_the_next_refuses() {
        let limiter = refused(RedisFailure::FailClosed);
        assert_eq!(limiter.health_round().await, RedisReadiness::InDoubt);
        assert_eq!(limiter.health_round().await, RedisReadiness::Refusing);
        assert_eq!(limiter.health_round().await, RedisReadiness::Refusing);
        // Calls that rest Redis already refuse: the first failed round says so.
        let resting = refused(RedisFailure::FailClosed);
        for _ in 0..FAILURES_BEFORE_REST {
            assert!(resting.admit("t", 10, 10, Duration::ZERO).await.is_err());
        }
        assert_eq!(resting.health_round().await, RedisReadiness::Refusing);
        assert_eq!(
            refused(RedisFailure::FailOpen).health_round().await,
            RedisReadiness::Answers,
            "calls go on without Redis"
        );
    }
}

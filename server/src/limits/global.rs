//! Request-rate limits that hold across replicas: each tenant's bucket is
//! kept in Redis and checked with one atomic script (GCRA, the generic cell
//! rate algorithm), so N replicas together admit the configured rate, not N
//! times it. The local bucket stays the fast first check; this one runs
//! only for calls the local bucket admitted. Redis's own clock is used, so
//! replicas' clocks do not need to agree.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::config::{GlobalLimitsConfig, RedisFailure};
use crate::error::Error;

/// GCRA: the bucket is one key holding the theoretical arrival time (µs).
/// KEYS[1] = bucket; ARGV = emission interval (µs), tolerance (µs), cost,
/// the longest the caller may wait for its turn (µs).
/// Returns {1, µs until the turn} when admitted (0: at once), {0, µs until a
/// call would be admitted at once} otherwise, taking nothing.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at - now > max_wait then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.max(allow_at - now, 0)}
";

pub struct GlobalLimiter {
    url: String,
    timeout: Duration,
    on_failure: RedisFailure,
    script: redis::Script,
    /// Connected on first use, so a replica starts while Redis is down.
    conn: OnceCell<ConnectionManager>,
}

impl GlobalLimiter {
    /// `None` when no Redis is configured (limits then count per replica).
    pub fn new(config: &GlobalLimitsConfig) -> Option<Self> {
        let url = config.redis_url.clone()?;
        Some(Self {
            url,
            timeout: config.redis_timeout,
            on_failure: config.on_redis_failure,
            script: redis::Script::new(GCRA),
            conn: OnceCell::new(),
        })
    }

    async fn check(
        &self,
        key: &str,
        rate: u32,
        burst: u32,
        cost: u32,
        max_wait: Duration,
    ) -> redis::RedisResult<(i64, i64)> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.url.as_str())?;
                ConnectionManager::new(client).await
            })
            .await?;
        // Microseconds per token; rates above 1,000,000/s round to 1 µs.
        let interval = (1_000_000 / i64::from(rate.max(1))).max(1);
        let tolerance = interval * i64::from(burst.max(1));
        let mut conn = conn.clone();
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
        let key = format!("weir:{name}:{tenant}");
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        match tokio::time::timeout(self.timeout, self.check(&key, rate, burst, cost, max_wait)).await {
            Ok(Ok((1, wait_us))) => Ok(Ok(micros(wait_us))),
            Ok(Ok((_, delay_us))) => Ok(Err(micros(delay_us))),
            // The error text names no password: redis-rs does not print the URL.
            Ok(Err(e)) => {
                crate::metrics::METRICS.global_limit_failures.inc();
                Err(e.to_string())
            }
            Err(_) => {
                crate::metrics::METRICS.global_limit_failures.inc();
                Err(format!("no answer within {:?}", self.timeout))
            }
        }
    }

    /// Takes `cost` units from a cost bucket (rows, bytes, records), waiting
    /// while the tenant is over its rate. Cost buckets slow, never refuse:
    /// without Redis they fall back to the local bucket, whatever
    /// `on_redis_failure` says.
    pub async fn charge(&self, name: &str, tenant: &str, rate: u32, cost: u64) {
        let mut left = cost;
        while left > 0 {
            // Pieces no larger than the burst (one second's worth), which the bucket can grant.
            let piece = u32::try_from(left.min(u64::from(rate.max(1)))).unwrap_or(u32::MAX);
            loop {
                match self.take(name, tenant, (rate, rate), piece, Duration::ZERO).await {
                    Ok(Ok(_)) => break,
                    Ok(Err(wait)) => tokio::time::sleep(wait).await,
                    Err(e) => {
                        tracing::warn!(error = %e, bucket = name, "Redis unavailable for a shared cost bucket: local limits only");
                        return;
                    }
                }
            }
            left -= u64::from(piece);
        }
    }

    /// Takes one token from the tenant's shared request bucket, at a turn
    /// within `max_wait`: returns how long to wait for it.
    pub async fn admit(&self, tenant: &str, rate: u32, burst: u32, max_wait: Duration) -> Result<Duration, Error> {
        let failure = match self.take("rate", tenant, (rate, burst), 1, max_wait).await {
            Ok(Ok(wait)) => return Ok(wait),
            Ok(Err(retry_after)) => return Err(Error::RateLimited { rate, retry_after }),
            Err(e) => e,
        };
        match self.on_failure {
            RedisFailure::FailOpen => {
                tracing::warn!(error = %failure, "Redis unavailable for global limits: admitting on local limits only");
                Ok(Duration::ZERO)
            }
            RedisFailure::FailClosed => {
                tracing::warn!(error = %failure, "Redis unavailable for global limits: refusing the call");
                Err(Error::GlobalLimitsUnavailable)
            }
        }
    }
}

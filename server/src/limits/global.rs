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
/// KEYS[1] = bucket; ARGV = emission interval (µs), tolerance (µs).
/// Returns {1, 0} when admitted, {0, µs until a retry can succeed} otherwise.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((tolerance + interval) / 1000) + 1)
return {1, 0}
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

    async fn check(&self, key: &str, rate: u32, burst: u32) -> redis::RedisResult<(i64, i64)> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.url.as_str())?;
                ConnectionManager::new(client).await
            })
            .await?;
        let interval = 1_000_000 / i64::from(rate.max(1));
        let tolerance = interval * i64::from(burst.max(1));
        let mut conn = conn.clone();
        self.script
            .key(key)
            .arg(interval)
            .arg(tolerance)
            .invoke_async(&mut conn)
            .await
    }

    /// Takes one token from the tenant's shared bucket.
    pub async fn admit(&self, tenant: &str, rate: u32, burst: u32) -> Result<(), Error> {
        let key = format!("weir:rate:{tenant}");
        let checked = tokio::time::timeout(self.timeout, self.check(&key, rate, burst)).await;
        let failure = match checked {
            Ok(Ok((1, _))) => return Ok(()),
            Ok(Ok((_, wait_us))) => {
                return Err(Error::RateLimited {
                    rate,
                    retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
                })
            }
            // The error text names no password: redis-rs does not print the URL.
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        crate::metrics::METRICS.global_limit_failures.inc();
        match self.on_failure {
            RedisFailure::FailOpen => {
                tracing::warn!(error = %failure, "Redis unavailable for global limits: admitting on local limits only");
                Ok(())
            }
            RedisFailure::FailClosed => {
                tracing::warn!(error = %failure, "Redis unavailable for global limits: refusing the call");
                Err(Error::GlobalLimitsUnavailable)
            }
        }
    }
}

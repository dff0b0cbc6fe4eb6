//! Per-tenant admission: a token bucket for the request rate and a cap on
//! calls in progress. Over a limit the answer is RESOURCE_EXHAUSTED with the
//! delay after which a retry can succeed, never an unbounded queue.

pub mod admission;
pub mod global;
pub mod scheduler;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::error::Error;
use crate::metrics::{LimitLabels, METRICS};
use global::GlobalLimiter;

pub struct TenantLimiter {
    rate: DefaultDirectRateLimiter,
    rps: u32,
    concurrency: Slots,
    loads: Slots,
    /// Cost buckets of loads: rows and request bytes, one second of burst each.
    load_rows: DefaultDirectRateLimiter,
    load_bytes: DefaultDirectRateLimiter,
    consumers: Slots,
    subscriptions: Slots,
    streams: Slots,
    /// Cost buckets of Kafka records and change events, produced and consumed.
    stream_records: DefaultDirectRateLimiter,
    stream_bytes: DefaultDirectRateLimiter,
    /// The buckets shared by every replica through Redis, when configured.
    shared: Option<Arc<GlobalLimiter>>,
    tenant: String,
    limits: LimitsConfig,
}

/// A cap on things in progress at once (calls, loads, consumers).
struct Slots {
    semaphore: Arc<Semaphore>,
    limit: u32,
}

impl Slots {
    fn new(limit: u32) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(limit as usize)),
            limit,
        }
    }

    /// A slot held until the permit is dropped, or the error `full` makes of the limit.
    fn take(&self, full: fn(u32) -> Error) -> Result<OwnedSemaphorePermit, Error> {
        self.semaphore.clone().try_acquire_owned().map_err(|_| full(self.limit))
    }
}

/// A bucket whose burst is one second's worth.
fn per_second(n: u32) -> DefaultDirectRateLimiter {
    let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(n).allow_burst(n))
}

/// Takes `cost` tokens, waiting for them rather than refusing: a load that
/// sends faster than its tenant's rate is slowed down by backpressure.
async fn take(bucket: &DefaultDirectRateLimiter, cost: u64) {
    let mut left = cost;
    while left > 0 {
        // Charged in pieces no larger than the burst, which the bucket can always grant.
        let mut piece = u32::try_from(left).unwrap_or(u32::MAX);
        loop {
            let Some(n) = NonZeroU32::new(piece) else {
                return;
            };
            match bucket.until_n_ready(n).await {
                Ok(()) => break,
                Err(_) => piece /= 2,
            }
        }
        left -= u64::from(piece);
    }
}

impl TenantLimiter {
    pub fn new(tenant: &str, limits: &LimitsConfig, shared: Option<Arc<GlobalLimiter>>) -> Self {
        let rps = NonZeroU32::new(limits.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            rate: RateLimiter::direct(Quota::per_second(rps).allow_burst(burst)),
            rps: rps.get(),
            concurrency: Slots::new(limits.max_concurrent_requests),
            loads: Slots::new(limits.max_concurrent_loads),
            load_rows: per_second(limits.load_rows_per_second),
            load_bytes: per_second(limits.load_bytes_per_second),
            consumers: Slots::new(limits.max_concurrent_consumers),
            subscriptions: Slots::new(limits.max_concurrent_subscriptions),
            streams: Slots::new(limits.max_concurrent_streams),
            stream_records: per_second(limits.stream_records_per_second),
            stream_bytes: per_second(limits.stream_bytes_per_second),
            shared,
            tenant: tenant.to_string(),
            limits: limits.clone(),
        }
    }

    /// After `admit`: the request-rate bucket shared by every replica, when there is one.
    pub async fn admit_shared(&self) -> Result<(), Error> {
        match &self.shared {
            Some(g) => {
                g.admit(&self.tenant, self.limits.requests_per_second, self.limits.burst)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Charges the shared bucket `name` after the local one.
    async fn charge_shared(&self, name: &str, rate: u32, cost: u64) {
        if let Some(g) = &self.shared {
            g.charge(name, &self.tenant, rate, cost).await;
        }
    }

    /// Admits one Kafka consumer; its slot is held until the permit is dropped.
    pub fn admit_consumer(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.consumers.take(|limit| Error::TooManyConsumers { limit })
    }

    /// Admits one change stream; its slot is held until the permit is dropped.
    pub fn admit_subscription(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.subscriptions.take(|limit| Error::TooManySubscriptions { limit })
    }

    /// Admits one `ExecuteStream`; its slot is held until the permit is dropped.
    pub fn admit_stream(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.streams.take(|limit| Error::TooManyStreams { limit })
    }

    /// Charges Kafka records (or change events) and their bytes, waiting
    /// while the tenant is over its rate; returns how long it waited.
    pub async fn charge_records(&self, records: u64, bytes: u64) -> Duration {
        let started = Instant::now();
        take(&self.stream_records, records).await;
        take(&self.stream_bytes, bytes).await;
        self.charge_shared("stream_records", self.limits.stream_records_per_second, records)
            .await;
        self.charge_shared("stream_bytes", self.limits.stream_bytes_per_second, bytes)
            .await;
        self.throttled("stream", started)
    }

    /// The time since `started` if it is a wait worth reporting, counted in metrics.
    fn throttled(&self, limit: &'static str, started: Instant) -> Duration {
        let waited = started.elapsed();
        // Below this it is the cost of the checks, not a wait.
        if waited < Duration::from_micros(500) {
            return Duration::ZERO;
        }
        METRICS
            .throttled_seconds
            .get_or_create(&LimitLabels {
                tenant: self.tenant.clone(),
                limit,
            })
            .inc_by(waited.as_secs_f64());
        waited
    }

    /// Admits one bulk load; its slot is held until the permit is dropped.
    pub fn admit_load(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.loads.take(|limit| Error::TooManyLoads { limit })
    }

    /// Charges rows and bytes of a load, waiting while the tenant is over
    /// its rate; returns how long it waited.
    pub async fn charge_load(&self, rows: u64, bytes: u64) -> Duration {
        let started = Instant::now();
        take(&self.load_rows, rows).await;
        take(&self.load_bytes, bytes).await;
        self.charge_shared("load_rows", self.limits.load_rows_per_second, rows)
            .await;
        self.charge_shared("load_bytes", self.limits.load_bytes_per_second, bytes)
            .await;
        self.throttled("load", started)
    }

    /// Admits one call: takes a token and a concurrency slot that is held
    /// until the returned permit is dropped (the end of the response).
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        let permit = self.concurrency.take(|limit| Error::TooManyConcurrent { limit })?;
        if let Err(not_until) = self.rate.check() {
            let retry_after = not_until.wait_time_from(DefaultClock::default().now());
            return Err(Error::RateLimited {
                rate: self.rps,
                retry_after,
            });
        }
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_limited_with_delay() {
        let limits = LimitsConfig {
            requests_per_second: 10,
            burst: 3,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None);
        for _ in 0..3 {
            drop(limiter.admit().expect("within burst"));
        }
        match limiter.admit() {
            Err(Error::RateLimited { retry_after, .. }) => {
                assert!(
                    retry_after > std::time::Duration::ZERO && retry_after <= std::time::Duration::from_millis(100)
                );
            }
            other => panic!("expected rate limit, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn loads_are_slowed_to_their_rate() {
        let limits = LimitsConfig {
            load_rows_per_second: 1000,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None);
        let started = std::time::Instant::now();
        // One second of burst, then 500 more rows at 1000 rows/s; charges above the burst are split.
        limiter.charge_load(1000, 10).await;
        limiter.charge_load(500, 10).await;
        let waited = started.elapsed();
        assert!(waited >= std::time::Duration::from_millis(400), "{waited:?}");
        limiter.charge_load(1500, 0).await;
        assert!(started.elapsed() >= std::time::Duration::from_millis(1900));
    }

    #[test]
    fn load_slots_are_limited() {
        let limits = LimitsConfig {
            max_concurrent_loads: 1,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None);
        let held = limiter.admit_load().expect("first");
        assert!(matches!(limiter.admit_load(), Err(Error::TooManyLoads { limit: 1 })));
        drop(held);
        assert!(limiter.admit_load().is_ok());
    }

    #[test]
    fn concurrency_slots_are_released() {
        let limits = LimitsConfig {
            max_concurrent_requests: 1,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None);
        let held = limiter.admit().expect("first");
        assert!(matches!(limiter.admit(), Err(Error::TooManyConcurrent { limit: 1 })));
        drop(held);
        assert!(limiter.admit().is_ok());
    }
}

//! Per-tenant admission: a token bucket for the request rate and a cap on
//! calls in progress. Over a limit the answer is RESOURCE_EXHAUSTED with the
//! delay after which a retry can succeed, never an unbounded queue.

pub mod admission;

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::error::Error;

pub struct TenantLimiter {
    rate: DefaultDirectRateLimiter,
    rps: u32,
    concurrency: Arc<Semaphore>,
    max_concurrent: u32,
}

impl TenantLimiter {
    pub fn new(limits: &LimitsConfig) -> Self {
        let rps = NonZeroU32::new(limits.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            rate: RateLimiter::direct(Quota::per_second(rps).allow_burst(burst)),
            rps: rps.get(),
            concurrency: Arc::new(Semaphore::new(limits.max_concurrent_requests as usize)),
            max_concurrent: limits.max_concurrent_requests,
        }
    }

    /// Admits one call: takes a token and a concurrency slot that is held
    /// until the returned permit is dropped (the end of the response).
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        let permit = self
            .concurrency
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::TooManyConcurrent {
                limit: self.max_concurrent,
            })?;
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
        let limiter = TenantLimiter::new(&limits);
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

    #[test]
    fn concurrency_slots_are_released() {
        let limits = LimitsConfig {
            max_concurrent_requests: 1,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new(&limits);
        let held = limiter.admit().expect("first");
        assert!(matches!(limiter.admit(), Err(Error::TooManyConcurrent { limit: 1 })));
        drop(held);
        assert!(limiter.admit().is_ok());
    }
}

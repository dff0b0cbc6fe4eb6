//! A tenant's request-rate bucket (GCRA, the generic cell rate algorithm)
//! that can hand out turns: a call over the rate may reserve the next free
//! token and wait for it, up to a bound, instead of being refused. Turns are
//! taken in arrival order, and a reserved turn is the token itself, so
//! waiting never admits more than the configured rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct RequestRate {
    /// The clock's zero: times below are nanoseconds since it.
    base: Instant,
    /// The theoretical arrival time of the next call at the sustained rate.
    tat: AtomicU64,
    /// Nanoseconds per token.
    interval: u64,
    /// How far the theoretical arrival time may run ahead of now: the burst.
    tolerance: u64,
}

impl RequestRate {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let interval = 1_000_000_000 / u64::from(per_second.max(1));
        Self {
            base: Instant::now(),
            tat: AtomicU64::new(0),
            interval,
            tolerance: interval * u64::from(burst.max(1)),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes a token whose turn comes within `max_wait`: `Ok(wait)`, zero
    /// when one is free now, or `Err(delay)` until a call would get a token
    /// at once (nothing is taken then).
    pub fn reserve(&self, max_wait: Duration) -> Result<Duration, Duration> {
        self.take(1, u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Books `n` tokens in arrival order however far ahead their turn is,
    /// and returns the wait for it: a charge larger than what is free is
    /// not passed over by smaller ones that come after it.
    pub fn book(&self, n: u64) -> Duration {
        match self.take(n, u64::MAX) {
            Ok(wait) | Err(wait) => wait,
        }
    }

    /// Takes `n` tokens whose turn comes within `max_wait` ns.
    fn take(&self, n: u64, max_wait: u64) -> Result<Duration, Duration> {
        let now = self.now();
        let cost = self.interval.saturating_mul(n);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            let wait = next.saturating_sub(self.tolerance).saturating_sub(now);
            if wait > max_wait {
                return Err(Duration::from_nanos(wait));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(Duration::from_nanos(wait)),
                Err(current) => tat = current,
            }
        }
    }

    /// Time per token.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// Returns `n` tokens taken and not used: one `reserve` took for a call
    /// refused after all (by the bucket shared through Redis), or a booking
    /// whose charge was given up on before its turn. Unused tokens would
    /// otherwise push every later turn further out.
    pub fn give_back(&self, n: u64) {
        let cost = self.interval.saturating_mul(n);
        let _ = self.tat.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
            Some(tat.saturating_sub(cost))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_token_given_back_can_be_taken_again() {
        let rate = RequestRate::new(1, 2);
        assert!(rate.reserve(Duration::ZERO).is_ok() && rate.reserve(Duration::ZERO).is_ok());
        assert!(rate.reserve(Duration::ZERO).is_err(), "the burst is spent");
        rate.give_back(1);
        assert_eq!(rate.reserve(Duration::ZERO), Ok(Duration::ZERO));
        assert!(rate.reserve(Duration::ZERO).is_err());
    }

    #[test]
    fn a_burst_at_once_then_turns_in_order_then_refusals() {
        // 10/s: a token every 100 ms; a burst of 3. The margins allow for a
        // slow machine between the calls.
        let rate = RequestRate::new(10, 3);
        for _ in 0..3 {
            assert_eq!(rate.reserve(Duration::ZERO), Ok(Duration::ZERO));
        }
        // Without waiting allowed, the next is refused until its token is due.
        let Err(delay) = rate.reserve(Duration::ZERO) else {
            panic!("a fourth call at once must be refused")
        };
        assert!(delay > 50 * MS && delay <= 100 * MS, "{delay:?}");
        // Allowed to wait 350 ms: three more turns, 100 ms apart, then
        // refusals naming when a call would get in at once.
        let waits: Vec<Duration> = (0..3).map(|_| rate.reserve(350 * MS).expect("a turn")).collect();
        assert!(waits[0] > 50 * MS && waits[0] <= 100 * MS, "{waits:?}");
        assert!(
            waits[1] > waits[0] + 50 * MS && waits[2] > waits[1] + 50 * MS,
            "{waits:?}"
        );
        let Err(delay) = rate.reserve(350 * MS) else {
            panic!("a turn 400 ms away is beyond the wait allowed")
        };
        assert!(delay > 350 * MS && delay <= 400 * MS, "{delay:?}");
    }

    #[test]
    fn bookings_given_back_leave_later_turns_where_they_were() {
        // 10/s with a burst of 10: the burst, then two bookings of a second
        // each, the first of which is given up on before its turn.
        let rate = RequestRate::new(10, 10);
        assert_eq!(rate.book(10), Duration::ZERO);
        let first = rate.book(10);
        assert!(first > 900 * MS, "{first:?}");
        rate.give_back(10);
        let second = rate.book(10);
        assert!(second <= first, "the abandoned second is not waited for: {second:?}");
    }

    #[test]
    fn refused_calls_take_nothing() {
        let rate = RequestRate::new(100, 1);
        assert_eq!(rate.reserve(Duration::ZERO), Ok(Duration::ZERO));
        for _ in 0..100 {
            assert!(rate.reserve(Duration::ZERO).is_err());
        }
        // The next turn is still the one 10 ms after the first call.
        let wait = rate.reserve(Duration::from_secs(1)).expect("a turn");
        assert!(wait <= 10 * MS, "{wait:?}");
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let rate = RequestRate::new(1000, 2);
        assert!(rate.reserve(Duration::ZERO).is_ok());
        assert!(rate.reserve(Duration::ZERO).is_ok());
        assert!(rate.reserve(Duration::ZERO).is_err());
        std::thread::sleep(3 * MS);
        assert_eq!(rate.reserve(Duration::ZERO), Ok(Duration::ZERO));
    }
}

//! Per-tenant admission: a token bucket for the request rate and a cap on
//! calls in progress. A call over the rate waits for its turn when the turn
//! comes soon (`max_rate_wait`); otherwise, and over the other limits, the
//! answer is RESOURCE_EXHAUSTED with the delay after which a retry can
//! succeed, never an unbounded queue.

pub mod admission;
pub mod global;
pub mod request_rate;
pub mod scheduler;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::config::LimitsConfig;
use crate::error::Error;
use crate::metrics::{LimitLabels, METRICS};
use global::GlobalLimiter;
use request_rate::RequestRate;

pub struct TenantLimiter {
    buckets: Buckets,
    concurrency: Slots,
    loads: Slots,
    consumers: Slots,
    subscriptions: Slots,
    streams: Slots,
    /// The buckets shared by every replica through Redis, when configured.
    shared: Option<Arc<GlobalLimiter>>,
    tenant: String,
    limits: LimitsConfig,
    /// The limiter a reload put in force in this one's place: the loads and
    /// streams still running on this one charge that one, so that a rate
    /// an operator lowers holds them too, from their next batch.
    successor: OnceLock<Arc<TenantLimiter>>,
}

/// Which pair of cost buckets a charge goes to.
#[derive(Clone, Copy)]
enum Costs {
    Load,
    Stream,
}

/// A tenant's rate buckets. Each is kept across a reload that leaves its
/// own rate as it was, whatever else changed: a tenant whose statement
/// timeout, weight or caps changed gets no fresh burst.
struct Buckets {
    rate: Arc<RequestRate>,
    /// Cost buckets of loads: rows and request bytes, one second of burst each.
    load_rows: Arc<CostBucket>,
    load_bytes: Arc<CostBucket>,
    /// Cost buckets of Kafka records and change events, produced and consumed.
    stream_records: Arc<CostBucket>,
    stream_bytes: Arc<CostBucket>,
}

impl Buckets {
    /// Buckets for `limits`, each the one of `previous` where its rate is the same.
    fn new(limits: &LimitsConfig, previous: Option<&TenantLimiter>) -> Self {
        // Each bucket of `previous` whose rate reads the same there and here.
        let cost = |rate: fn(&LimitsConfig) -> u32, bucket: fn(&Buckets) -> &Arc<CostBucket>| {
            let per_second = rate(limits);
            previous
                .filter(|p| rate(&p.limits) == per_second)
                .map_or_else(|| Arc::new(CostBucket::new(per_second)), |p| bucket(&p.buckets).clone())
        };
        let same_rate = |p: &&TenantLimiter| {
            (p.limits.requests_per_second, p.limits.burst) == (limits.requests_per_second, limits.burst)
        };
        Self {
            rate: previous.filter(same_rate).map_or_else(
                || Arc::new(RequestRate::new(limits.requests_per_second, limits.burst)),
                |p| p.buckets.rate.clone(),
            ),
            load_rows: cost(|l| l.load_rows_per_second, |b| &b.load_rows),
            load_bytes: cost(|l| l.load_bytes_per_second, |b| &b.load_bytes),
            stream_records: cost(|l| l.stream_records_per_second, |b| &b.stream_records),
            stream_bytes: cost(|l| l.stream_bytes_per_second, |b| &b.stream_bytes),
        }
    }
}

/// A cap on things in progress at once (calls, loads, consumers). The
/// count in use outlives a reload that changes the limit: the calls still
/// running count against the new one.
struct Slots {
    used: Arc<AtomicU32>,
    limit: u32,
}

impl Slots {
    /// Counting what `previous` (the same slots before a reload) has in use.
    fn new(limit: u32, previous: Option<&Slots>) -> Self {
        Self {
            used: previous.map_or_else(Arc::default, |p| p.used.clone()),
            limit,
        }
    }

    /// A slot held until the permit is dropped, or the error `full` makes of the limit.
    fn take(&self, full: fn(u32) -> Error) -> Result<SlotPermit, Error> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .map(|_| SlotPermit(self.used.clone()))
            .map_err(|_| full(self.limit))
    }
}

/// One slot of a `Slots`, given back when dropped.
pub struct SlotPermit(Arc<AtomicU32>);

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Units a cost bucket counts per second at most.
const UNITS_PER_SECOND: u64 = 1_000_000;

/// A bucket of rows, records or bytes whose burst is one second's worth.
/// It counts in units of `unit` so that a unit lasts at least a microsecond
/// (whole nanoseconds per unit would make 512 MiB/s, counted in bytes at
/// 1.86 ns each, let 1 GB/s through). Charges book their turns in arrival
/// order: a large one is not passed over, for ever, by smaller ones that
/// keep the bucket from filling.
struct CostBucket {
    rate: RequestRate,
    /// Units per second: the burst, and the most booked at once.
    per_second: u32,
    unit: u64,
    /// Charged here but not yet to the bucket shared through Redis, which
    /// gets them in amounts of at least `gather`: a round trip per change
    /// event would cap a stream at a few thousand events a second.
    unshared: AtomicU64,
    gather: u64,
    /// Everything charged so far: each charge takes the units it completes,
    /// so charges smaller than a unit (one change event's bytes) add up
    /// instead of each costing a whole unit.
    charged: AtomicU64,
}

impl CostBucket {
    fn new(rate: u32) -> Self {
        let (units, unit) = cost_units(rate);
        Self {
            rate: RequestRate::new(units, units),
            per_second: units,
            unit,
            charged: AtomicU64::new(0),
            unshared: AtomicU64::new(0),
            gather: u64::from(rate / 100).max(1),
        }
    }

    /// Adds `cost` to what the shared bucket has not been charged yet; all
    /// of it once that reaches a hundredth of a second's worth.
    fn gathered(&self, cost: u64) -> Option<u64> {
        let unshared = self.unshared.fetch_add(cost, Ordering::Relaxed).saturating_add(cost);
        (unshared >= self.gather)
            .then(|| self.unshared.swap(0, Ordering::Relaxed))
            .filter(|due| *due > 0)
    }

    /// Takes `cost`, waiting for its turn rather than refusing: a load that
    /// sends faster than its tenant's rate is slowed down by backpressure.
    /// Booked a second's worth at a time; a call given up on while it waits
    /// (a deadline, a client gone) gives back the piece it waited for, so
    /// that calls retried with short deadlines do not book turns without
    /// end and starve every stream of the tenant.
    /// Returns how long it waited.
    async fn take(&self, cost: u64) -> Duration {
        let before = self.charged.fetch_add(cost, Ordering::Relaxed);
        let mut units = before.saturating_add(cost) / self.unit - before / self.unit;
        let mut waited = Duration::ZERO;
        while units > 0 {
            let piece = units.min(u64::from(self.per_second));
            units -= piece;
            let wait = self.rate.book(piece);
            if !wait.is_zero() {
                let mut booking = Booking {
                    rate: &self.rate,
                    units: piece,
                };
                tokio::time::sleep(wait).await;
                booking.units = 0;
                waited += wait;
            }
        }
        waited
    }
}

/// A booked piece of a cost charge, given back unless its turn came.
struct Booking<'a> {
    rate: &'a RequestRate,
    units: u64,
}

impl Drop for Booking<'_> {
    fn drop(&mut self) {
        if self.units > 0 {
            self.rate.give_back(self.units);
        }
    }
}

/// Units per second of a cost bucket of `rate` per second, and its unit.
fn cost_units(rate: u32) -> (u32, u64) {
    let unit = u64::from(rate).div_ceil(UNITS_PER_SECOND).max(1);
    let units = u32::try_from(u64::from(rate) / unit).unwrap_or(u32::MAX).max(1);
    (units, unit)
}

impl TenantLimiter {
    /// The tenant's limiter; `previous` is the one it replaces on a reload,
    /// whose slots in use count against the new limits. Its buckets carry
    /// over where their rates are the same (the shared limits may have
    /// changed); one whose rate changed starts full.
    pub fn new(
        tenant: &str,
        limits: &LimitsConfig,
        shared: Option<Arc<GlobalLimiter>>,
        previous: Option<&TenantLimiter>,
    ) -> Self {
        Self {
            buckets: Buckets::new(limits, previous),
            concurrency: Slots::new(limits.max_concurrent_requests, previous.map(|p| &p.concurrency)),
            loads: Slots::new(limits.max_concurrent_loads, previous.map(|p| &p.loads)),
            consumers: Slots::new(limits.max_concurrent_consumers, previous.map(|p| &p.consumers)),
            subscriptions: Slots::new(limits.max_concurrent_subscriptions, previous.map(|p| &p.subscriptions)),
            streams: Slots::new(limits.max_concurrent_streams, previous.map(|p| &p.streams)),
            shared,
            tenant: tenant.to_string(),
            limits: limits.clone(),
            successor: OnceLock::new(),
        }
    }

    /// Once a reload has put `next` in force in this limiter's place: what
    /// is still running on this one is charged to `next` from now on.
    pub fn hand_over(&self, next: &Arc<TenantLimiter>) {
        if !std::ptr::eq(self, next.as_ref()) {
            // Set once: a snapshot is replaced once.
            let _ = self.successor.set(next.clone());
        }
    }

    /// The limiter in force for this tenant: this one, or the last that a
    /// reload put in its place.
    fn in_force(&self) -> &TenantLimiter {
        let mut limiter = self;
        while let Some(next) = limiter.successor.get() {
            limiter = next;
        }
        limiter
    }

    /// Charges the shared bucket `name` after the local one `bucket`;
    /// returns how long it waited for its turn.
    async fn charge_shared(&self, bucket: &CostBucket, name: &str, rate: u32, cost: u64) -> Duration {
        match (&self.shared, bucket.gathered(cost)) {
            (Some(g), Some(due)) => g.charge(name, &self.tenant, rate, due).await,
            _ => Duration::ZERO,
        }
    }

    /// Admits one Kafka consumer; its slot is held until the permit is dropped.
    pub fn admit_consumer(&self) -> Result<SlotPermit, Error> {
        self.consumers
            .take(|limit| Error::TooManyConsumers { limit })
            .inspect_err(|e| admission::count_refusal(&self.tenant, e))
    }

    /// Admits one change stream; its slot is held until the permit is dropped.
    pub fn admit_subscription(&self) -> Result<SlotPermit, Error> {
        self.subscriptions
            .take(|limit| Error::TooManySubscriptions { limit })
            .inspect_err(|e| admission::count_refusal(&self.tenant, e))
    }

    /// Admits one `ExecuteStream`; its slot is held until the permit is dropped.
    pub fn admit_stream(&self) -> Result<SlotPermit, Error> {
        self.streams
            .take(|limit| Error::TooManyStreams { limit })
            .inspect_err(|e| admission::count_refusal(&self.tenant, e))
    }

    /// Charges Kafka records (or change events) and their bytes, waiting
    /// while the tenant is over its rate; returns how long it waited.
    pub async fn charge_records(&self, records: u64, bytes: u64) -> Duration {
        self.charge(Costs::Stream, records, bytes).await
    }

    /// Charges `count` (rows or records) and `bytes` to the pair of cost
    /// buckets `costs` names, locally and then shared, on the limiter in
    /// force (a reload may have replaced this one since the call began).
    async fn charge(&self, costs: Costs, count: u64, bytes: u64) -> Duration {
        let this = self.in_force();
        let (b, l) = (&this.buckets, &this.limits);
        let (counted, sized, label) = match costs {
            Costs::Load => (
                (&b.load_rows, "load_rows", l.load_rows_per_second),
                (&b.load_bytes, "load_bytes", l.load_bytes_per_second),
                "load",
            ),
            Costs::Stream => (
                (&b.stream_records, "stream_records", l.stream_records_per_second),
                (&b.stream_bytes, "stream_bytes", l.stream_bytes_per_second),
                "stream",
            ),
        };
        let waited = counted.0.take(count).await
            + sized.0.take(bytes).await
            + this.charge_shared(counted.0, counted.1, counted.2, count).await
            + this.charge_shared(sized.0, sized.1, sized.2, bytes).await;
        this.throttled(label, waited)
    }

    /// `waited`, the time a call slept for its turns (not the time it took
    /// to ask Redis for them, which is no throttling), if it is worth
    /// reporting, counted in metrics.
    fn throttled(&self, limit: &'static str, waited: Duration) -> Duration {
        // Below the timer's granularity: not a wait anyone would see.
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
    pub fn admit_load(&self) -> Result<SlotPermit, Error> {
        self.loads
            .take(|limit| Error::TooManyLoads { limit })
            .inspect_err(|e| admission::count_refusal(&self.tenant, e))
    }

    /// Charges rows and bytes of a load, waiting while the tenant is over
    /// its rate; returns how long it waited.
    pub async fn charge_load(&self, rows: u64, bytes: u64) -> Duration {
        self.charge(Costs::Load, rows, bytes).await
    }

    /// Admits one call: takes a concurrency slot, held until the returned
    /// permit is dropped (the end of the response), and a token of the
    /// request rate, now or at a turn the call waits for (`Turn::wait`)
    /// when it comes within `max_rate_wait` and before the call's deadline.
    pub fn admit(&self, deadline: Option<Duration>) -> Result<Turn, Error> {
        let permit = self.concurrency.take(|limit| Error::TooManyConcurrent { limit })?;
        match self.buckets.rate.reserve(self.max_wait(deadline, Duration::ZERO)) {
            Ok(wait) => Ok(Turn { permit, wait }),
            Err(retry_after) => Err(self.rate_limited(retry_after)),
        }
    }

    /// After `admit`: waits for the call's turn, then takes a token of the
    /// request-rate bucket shared by every replica, when there is one,
    /// waiting for that turn too within what is left of `max_rate_wait`.
    /// Returns how long the call waited.
    pub async fn wait_turn(&self, wait: Duration, deadline: Option<Duration>) -> Result<Duration, Error> {
        // Nearly every call: a token free now and no shared bucket to ask.
        if wait.is_zero() && self.shared.is_none() {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let mut waited = wait;
        if let Some(g) = &self.shared {
            let max_wait = self.max_wait(deadline, started.elapsed());
            match g
                .admit(
                    &self.tenant,
                    self.limits.requests_per_second,
                    self.limits.burst,
                    max_wait,
                )
                .await
            {
                Ok(wait) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    waited += wait;
                }
                Err(e) => {
                    self.buckets.rate.give_back(1);
                    return Err(e);
                }
            }
        }
        Ok(self.throttled("rate", waited))
    }

    /// Gives back the turn a call admitted by [`Self::admit`] will not use
    /// (it was stopped while it waited for it); a turn taken from the
    /// shared bucket stays taken.
    pub fn give_back_turn(&self) {
        self.buckets.rate.give_back(1);
    }

    /// The longest a call that already waited `waited` may still wait for a
    /// turn: what is left of `max_rate_wait`, ending before its deadline.
    fn max_wait(&self, deadline: Option<Duration>, waited: Duration) -> Duration {
        let left = self.limits.max_rate_wait.saturating_sub(waited);
        // A turn at the deadline itself would leave the call no time to run.
        deadline.map_or(left, |d| left.min(d.saturating_sub(waited).saturating_sub(TIME_TO_RUN)))
    }

    fn rate_limited(&self, retry_after: Duration) -> Error {
        Error::RateLimited {
            rate: self.limits.requests_per_second,
            retry_after,
        }
    }
}

/// How long before the caller's deadline the gateway ends a call itself and
/// says why: the answer must reach the caller before its own client gives
/// up (gRPC clients time the call from before it was sent), on a busy
/// machine too.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// Left of a deadline after a wait for a turn, at the least: the gateway's
/// margin and a little time to run in. A turn later than that would be
/// spent on a call the gateway ends at once (STATEMENT_TIMEOUT after 0 ms),
/// where it should be refused with a retry delay.
const TIME_TO_RUN: Duration = DEADLINE_MARGIN.saturating_add(Duration::from_millis(10));

/// A call admitted by its tenant's limits: its concurrency slot, and how
/// long it must wait for its turn at the request rate.
pub struct Turn {
    pub permit: SlotPermit,
    pub wait: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_limited_with_delay() {
        let limits = LimitsConfig {
            requests_per_second: 10,
            burst: 3,
            max_rate_wait: Duration::ZERO,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None, None);
        for _ in 0..3 {
            let turn = limiter.admit(None).expect("within burst");
            assert_eq!(turn.wait, Duration::ZERO);
        }
        match limiter.admit(None) {
            Err(Error::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(100));
            }
            other => panic!("expected rate limit, got {:?}", other.map(|t| t.wait)),
        }
    }

    /// A reload that leaves the tenant's limits alone keeps its buckets even
    /// when the limiter is built anew (the shared limits changed); changed
    /// limits start full.
    #[test]
    fn buckets_outlive_a_reload_that_leaves_the_tenants_limits_alone() {
        let limits = LimitsConfig {
            requests_per_second: 1,
            burst: 1,
            max_rate_wait: Duration::ZERO,
            ..LimitsConfig::default()
        };
        let before = TenantLimiter::new("t", &limits, None, None);
        drop(before.admit(None).expect("the burst"));
        let same = TenantLimiter::new("t", &limits, None, Some(&before));
        assert!(
            matches!(same.admit(None), Err(Error::RateLimited { .. })),
            "no second burst"
        );
        // Another limit changed: the request bucket is the same.
        let other = LimitsConfig {
            statement_timeout: Duration::from_secs(1),
            ..limits.clone()
        };
        let same_rate = TenantLimiter::new("t", &other, None, Some(&before));
        assert!(
            matches!(same_rate.admit(None), Err(Error::RateLimited { .. })),
            "no burst for a change of another limit"
        );
        let raised = LimitsConfig { burst: 2, ..limits };
        let changed = TenantLimiter::new("t", &raised, None, Some(&before));
        assert!(changed.admit(None).is_ok(), "a changed rate starts with a full bucket");
    }

    #[tokio::test]
    async fn over_the_rate_a_call_waits_for_a_turn_that_comes_soon_and_before_its_deadline() {
        let limits = LimitsConfig {
            requests_per_second: 10,
            burst: 1,
            max_rate_wait: Duration::from_millis(250),
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None, None);
        assert_eq!(limiter.admit(None).expect("the burst").wait, Duration::ZERO);
        // The next token is due in 100 ms: too late for a call with 50 ms
        // left, which is refused at once and takes no token...
        // (nor is one with 150 ms left: that turn would leave it less than
        // the gateway's margin before its deadline)...
        for left in [50, 150] {
            let refused = limiter.admit(Some(Duration::from_millis(left)));
            assert!(
                matches!(refused, Err(Error::RateLimited { rate: 10, .. })),
                "{left} ms: {:?}",
                refused.map(|t| t.wait)
            );
        }
        // ...while a call without a deadline takes that turn and waits for it.
        let turn = limiter.admit(None).expect("a turn within 250 ms");
        assert!(
            turn.wait > Duration::from_millis(50) && turn.wait <= Duration::from_millis(100),
            "{:?}",
            turn.wait
        );
        // Turns are 100 ms apart: one more comes within 250 ms, the next does not.
        assert!(limiter.admit(None).is_ok());
        match limiter.admit(None) {
            Err(Error::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::from_millis(250), "{retry_after:?}");
            }
            other => panic!("expected rate limit, got {:?}", other.map(|t| t.wait)),
        }
        let started = Instant::now();
        let waited = limiter.wait_turn(turn.wait, None).await.expect("no shared bucket");
        assert!(started.elapsed() >= turn.wait && waited >= turn.wait, "{waited:?}");
    }

    #[tokio::test]
    async fn loads_are_slowed_to_their_rate() {
        let limits = LimitsConfig {
            load_rows_per_second: 1000,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None, None);
        let started = std::time::Instant::now();
        // One second of burst, then 500 more rows at 1000 rows/s; charges above the burst are split.
        limiter.charge_load(1000, 10).await;
        limiter.charge_load(500, 10).await;
        let waited = started.elapsed();
        assert!(waited >= std::time::Duration::from_millis(400), "{waited:?}");
        limiter.charge_load(1500, 0).await;
        assert!(started.elapsed() >= std::time::Duration::from_millis(1900));
    }

    /// A charge given up on while it waits (a `Produce` past its deadline)
    /// leaves nothing booked: retries with short deadlines do not push the
    /// tenant's turns out without end.
    #[tokio::test]
    async fn charges_given_up_on_give_back_their_turn() {
        let limits = LimitsConfig {
            stream_records_per_second: 1000,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None, None);
        limiter.charge_records(1000, 0).await;
        for _ in 0..5 {
            let given_up = tokio::time::timeout(Duration::from_millis(50), limiter.charge_records(500, 0)).await;
            assert!(given_up.is_err(), "half a second's records wait past the burst");
        }
        let started = Instant::now();
        limiter.charge_records(500, 0).await;
        // Behind five abandoned bookings it would wait about 2.75 s.
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(900), "{waited:?}");
    }

    /// Charges smaller than a unit add up rather than costing a unit each.
    #[tokio::test]
    async fn small_charges_add_up() {
        let bucket = CostBucket::new(536_870_912);
        assert!(bucket.unit > 100);
        for _ in 0..10 {
            bucket.take(100).await;
        }
        assert_eq!(bucket.charged.load(Ordering::Relaxed), 1000);
        // A second's burst in units, less what 1,000 bytes took, is still free.
        let (units, unit) = cost_units(536_870_912);
        assert_eq!(bucket.rate.book(u64::from(units) - 1000 / unit), Duration::ZERO);
        // More than the time since refills: a millisecond's worth.
        assert!(bucket.rate.book(1_000) > Duration::ZERO);
    }

    /// A large charge books its turn: smaller ones after it wait behind it
    /// instead of keeping the bucket from ever holding all of it.
    #[test]
    fn a_large_charge_is_not_passed_over_by_small_ones() {
        let bucket = CostBucket::new(100);
        assert_eq!(bucket.rate.book(100), Duration::ZERO, "a second's burst");
        let large = bucket.rate.book(100);
        let small = bucket.rate.book(1);
        assert!(large > Duration::from_millis(900), "{large:?}");
        assert!(small > large, "{small:?} after {large:?}");
    }

    /// Every rate, 512 MiB/s of bytes included, is kept to within 0.1 %.
    #[test]
    fn cost_buckets_keep_their_rate() {
        for rate in [1, 999, 1_000_000, 1_000_001, 268_435_456, 536_870_912, u32::MAX] {
            let (units, unit) = cost_units(rate);
            let bucket = RequestRate::new(units, units);
            let per_unit = bucket.interval().as_nanos() as f64;
            let kept = unit as f64 * 1e9 / per_unit;
            let error = (kept - f64::from(rate)).abs() / f64::from(rate);
            assert!(error < 0.001, "{rate}/s runs at {kept}/s");
            let burst = (u64::from(units) * unit) as f64;
            assert!(
                (burst - f64::from(rate)).abs() / f64::from(rate) < 0.001,
                "a second's burst of {rate}/s is {burst}"
            );
        }
    }

    #[test]
    fn load_slots_are_limited() {
        let limits = LimitsConfig {
            max_concurrent_loads: 1,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None, None);
        let held = limiter.admit_load().expect("first");
        assert!(matches!(limiter.admit_load(), Err(Error::TooManyLoads { limit: 1 })));
        drop(held);
        assert!(limiter.admit_load().is_ok());
    }

    /// A reload that changes a tenant's limits keeps counting the slots its
    /// calls, loads and streams still hold.
    #[test]
    fn slots_in_use_count_against_reloaded_limits() {
        let before = LimitsConfig {
            max_concurrent_loads: 1,
            ..LimitsConfig::default()
        };
        let old = TenantLimiter::new("t", &before, None, None);
        let held = old.admit_load().expect("first");
        let after = LimitsConfig {
            max_concurrent_loads: 2,
            weight: before.weight + 1,
            ..LimitsConfig::default()
        };
        let new = TenantLimiter::new("t", &after, None, Some(&old));
        let second = new.admit_load().expect("a second slot under the new limit");
        assert!(matches!(new.admit_load(), Err(Error::TooManyLoads { limit: 2 })));
        drop(held);
        let third = new.admit_load().expect("the old load's slot came back");
        drop((second, third));
        assert!(old.admit_load().is_ok() && new.admit_load().is_ok());
    }

    #[test]
    fn concurrency_slots_are_released() {
        let limits = LimitsConfig {
            max_concurrent_requests: 1,
            ..LimitsConfig::default()
        };
        let limiter = TenantLimiter::new("t", &limits, None, None);
        let held = limiter.admit(None).expect("first");
        assert!(matches!(
            limiter.admit(None),
            Err(Error::TooManyConcurrent { limit: 1 })
        ));
        drop(held);
        assert!(limiter.admit(None).is_ok());
    }
}

//! Gateway-wide admission: at most `capacity` data calls run at once across
//! all tenants. When all slots are taken, calls wait: the highest priority
//! first, and within a priority the tenants share by weighted fair queueing
//! (the waiting tenant that has received least per unit of weight goes
//! next), each tenant's own calls in arrival order. A call that waits past
//! `max_wait` is refused with the time after which a retry may find room.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

// Tenant ids come from the configuration, not from callers: the faster
// hasher (three lookups per call under the lock) needs no flood resistance.
use foldhash::HashMap;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::config::Priority;
use crate::error::Error;
use crate::metrics::{TenantLabels, METRICS};

pub struct Scheduler {
    capacity: usize,
    max_wait: Duration,
    state: Mutex<State>,
}

struct Waiter {
    id: u64,
    /// The slot itself travels: a waiter that leaves after it was sent drops
    /// it with the channel, which hands it on.
    grant: oneshot::Sender<Slot>,
}

#[derive(Default)]
struct State {
    running: usize,
    /// Waiting calls by priority, then tenant.
    waiting: BTreeMap<Priority, HashMap<Arc<str>, VecDeque<Waiter>>>,
    /// Each tenant's virtual finish time: slots received divided by weight.
    virtual_time: HashMap<Arc<str>, f64>,
    weights: HashMap<Arc<str>, u32>,
    /// The virtual time of the last grant; a tenant that starts waiting
    /// after being idle starts here, so idleness is not saved up as credit.
    clock: f64,
    next_id: u64,
}

impl State {
    fn charge(&mut self, tenant: &str) {
        let weight = f64::from(self.weights.get(tenant).copied().unwrap_or(1).max(1));
        let start = self.enter(tenant);
        if let Some(vt) = self.virtual_time.get_mut(tenant) {
            *vt = start + 1.0 / weight;
        }
        self.clock = start;
    }

    /// The tenant's virtual time, brought up to the clock: a tenant that was
    /// idle re-enters at the current virtual time.
    fn enter(&mut self, tenant: &str) -> f64 {
        let clock = self.clock;
        match self.virtual_time.get_mut(tenant) {
            Some(vt) => {
                *vt = vt.max(clock);
                *vt
            }
            None => {
                self.virtual_time.insert(Arc::from(tenant), clock);
                clock
            }
        }
    }

    /// The next waiter to run: highest priority, then least virtual time.
    fn pop(&mut self) -> Option<(Arc<str>, Waiter)> {
        let (&priority, tenants) = self.waiting.iter_mut().next_back()?;
        let tenant = tenants
            .keys()
            .min_by(|a, b| {
                let va = self.virtual_time.get(*a).copied().unwrap_or(self.clock);
                let vb = self.virtual_time.get(*b).copied().unwrap_or(self.clock);
                va.total_cmp(&vb)
            })?
            .clone();
        let queue = tenants.get_mut(&tenant)?;
        let waiter = queue.pop_front()?;
        if queue.is_empty() {
            tenants.remove(&tenant);
        }
        if tenants.is_empty() {
            self.waiting.remove(&priority);
        }
        Some((tenant, waiter))
    }

    fn remove(&mut self, priority: Priority, tenant: &str, id: u64) {
        let Some(tenants) = self.waiting.get_mut(&priority) else {
            return;
        };
        let Some(queue) = tenants.get_mut(tenant) else {
            return;
        };
        queue.retain(|w| w.id != id);
        if queue.is_empty() {
            tenants.remove(tenant);
        }
        if tenants.is_empty() {
            self.waiting.remove(&priority);
        }
    }
}

/// A running call's slot, handed to the next waiter when dropped.
pub struct Slot {
    scheduler: Option<Arc<Scheduler>>,
}

impl Slot {
    fn new(scheduler: &Arc<Scheduler>) -> Self {
        Self {
            scheduler: Some(scheduler.clone()),
        }
    }

    /// Drops a slot that was not handed over without releasing it.
    fn disarm(mut self) {
        self.scheduler = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(scheduler) = self.scheduler.take() {
            scheduler.release();
        }
    }
}

/// A call in the queue, counted in `weir_queued_calls` until it leaves it
/// by any way, its wait then observed. Unless it was granted a slot (and
/// so already popped), it is taken out of the queue then: a caller that
/// timed out or went away must not count as its tenant's turn later.
struct Queued<'a> {
    scheduler: &'a Scheduler,
    priority: Priority,
    tenant: &'a str,
    id: u64,
    granted: bool,
    labels: TenantLabels,
    started: Instant,
}

impl<'a> Queued<'a> {
    fn new(scheduler: &'a Scheduler, priority: Priority, tenant: &'a str, id: u64) -> Self {
        let labels = TenantLabels {
            tenant: tenant.to_string(),
        };
        METRICS.queued.get_or_create(&labels).inc();
        Self {
            scheduler,
            priority,
            tenant,
            id,
            granted: false,
            labels,
            started: Instant::now(),
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.granted {
            self.scheduler.state.lock().remove(self.priority, self.tenant, self.id);
        }
        METRICS.queued.get_or_create(&self.labels).dec();
        METRICS
            .queue_seconds
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Scheduler {
    pub fn new(capacity: u32, max_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1) as usize,
            max_wait,
            state: Mutex::new(State::default()),
        })
    }

    /// Waits for a slot for one call of `tenant`.
    pub async fn acquire(self: &Arc<Self>, tenant: &str, weight: u32, priority: Priority) -> Result<Slot, Error> {
        let (id, granted) = {
            let mut state = self.state.lock();
            if state.weights.get(tenant) != Some(&weight) {
                state.weights.insert(Arc::from(tenant), weight);
            }
            if state.running < self.capacity && state.waiting.is_empty() {
                state.running += 1;
                state.charge(tenant);
                return Ok(Slot::new(self));
            }
            let id = state.next_id;
            state.next_id += 1;
            let (grant, granted) = oneshot::channel();
            state.enter(tenant);
            let tenants = state.waiting.entry(priority).or_default();
            if !tenants.contains_key(tenant) {
                tenants.insert(Arc::from(tenant), VecDeque::new());
            }
            if let Some(queue) = tenants.get_mut(tenant) {
                queue.push_back(Waiter { id, grant });
            }
            (id, granted)
        };
        // Dropped when the wait ends; a slot sent meanwhile to a caller that
        // went away goes with the dropped receiver, which passes it on.
        let mut queued = Queued::new(self, priority, tenant, id);
        match tokio::time::timeout(self.max_wait, granted).await {
            Ok(Ok(slot)) => {
                // `release` popped it: nothing to take out of the queue.
                queued.granted = true;
                Ok(slot)
            }
            _ => Err(self.busy(queued.started.elapsed())),
        }
    }

    /// The refusal of a call that waited `waited` for a slot in vain.
    pub fn busy(&self, waited: Duration) -> Error {
        Error::GatewayBusy {
            waited,
            retry_after: self.max_wait / 4,
        }
    }

    /// Hands a finished call's slot to the next waiter that is still there.
    fn release(self: &Arc<Self>) {
        let mut state = self.state.lock();
        while let Some((tenant, waiter)) = state.pop() {
            match waiter.grant.send(Slot::new(self)) {
                // Only a slot received is the tenant's turn.
                Ok(()) => return state.charge(&tenant),
                // That waiter left; this slot was never running.
                Err(unsent) => unsent.disarm(),
            }
        }
        state.running = state.running.saturating_sub(1);
    }

    /// Calls running now.
    pub fn running(&self) -> usize {
        self.state.lock().running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills the scheduler, queues `waiters`, then frees slots one at a time and records who got each.
    async fn order(capacity: u32, waiters: Vec<(&'static str, u32, Priority)>) -> Vec<&'static str> {
        let scheduler = Scheduler::new(capacity, Duration::from_secs(10));
        let held = fill(&scheduler, capacity).await;
        grants(&scheduler, held, waiters).await
    }

    async fn fill(scheduler: &Arc<Scheduler>, capacity: u32) -> Vec<Slot> {
        let mut held = Vec::new();
        for _ in 0..capacity {
            held.push(scheduler.acquire("filler", 1, Priority::Medium).await.expect("free"));
        }
        held
    }

    /// Queues `waiters` on a full scheduler, then frees its slots one at a time.
    async fn grants(
        scheduler: &Arc<Scheduler>,
        mut held: Vec<Slot>,
        waiters: Vec<(&'static str, u32, Priority)>,
    ) -> Vec<&'static str> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (tenant, weight, priority) in waiters {
            let s = scheduler.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let slot = s.acquire(tenant, weight, priority).await.expect("granted");
                let _ = tx.send((tenant, slot));
            });
            // Queue in a known order.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(tx);
        let mut got = Vec::new();
        drop(held.pop());
        while let Some((tenant, slot)) = rx.recv().await {
            got.push(tenant);
            drop(slot);
        }
        got
    }

    #[tokio::test]
    async fn free_slots_are_taken_at_once() {
        let s = Scheduler::new(2, Duration::from_millis(10));
        let a = s.acquire("a", 1, Priority::Low).await.expect("slot");
        let _b = s.acquire("b", 1, Priority::Low).await.expect("slot");
        assert_eq!(s.running(), 2);
        match s.acquire("c", 1, Priority::High).await {
            Err(Error::GatewayBusy { retry_after, .. }) => assert!(retry_after > Duration::ZERO),
            other => panic!("expected GatewayBusy, got {:?}", other.map(|_| ())),
        }
        drop(a);
        assert_eq!(s.running(), 1);
        assert!(s.acquire("c", 1, Priority::High).await.is_ok());
    }

    #[tokio::test]
    async fn higher_priority_goes_first() {
        let got = order(
            1,
            vec![
                ("low", 1, Priority::Low),
                ("medium", 1, Priority::Medium),
                ("high", 1, Priority::High),
            ],
        )
        .await;
        assert_eq!(got, vec!["high", "medium", "low"]);
    }

    #[tokio::test]
    async fn tenants_share_by_weight() {
        // a queues 6 calls before b queues 6: fair queueing interleaves them.
        let mut waiters = vec![("a", 1, Priority::Medium); 6];
        waiters.extend(vec![("b", 1, Priority::Medium); 6]);
        let got = order(1, waiters).await;
        let first_half = &got[..6];
        let a = first_half.iter().filter(|t| **t == "a").count();
        assert!((2..=4).contains(&a), "{got:?}");
        // Weight 3 against 1: a gets three of every four slots while both wait.
        let mut waiters = vec![("a", 3, Priority::Medium); 9];
        waiters.extend(vec![("b", 1, Priority::Medium); 9]);
        let got = order(1, waiters).await;
        let a = got[..8].iter().filter(|t| **t == "a").count();
        assert!((5..=7).contains(&a), "{got:?}");
    }

    #[tokio::test]
    async fn callers_that_left_the_queue_cost_their_tenant_no_turn() {
        let s = Scheduler::new(1, Duration::from_secs(10));
        let held = fill(&s, 1).await;
        let mut left = Vec::new();
        for _ in 0..5 {
            let s = s.clone();
            left.push(tokio::spawn(async move {
                s.acquire("a", 1, Priority::Medium).await.map(|_| ())
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        for waiter in left {
            waiter.abort();
            let _ = waiter.await;
        }
        let mut waiters = vec![("a", 1, Priority::Medium); 3];
        waiters.extend(vec![("b", 1, Priority::Medium); 3]);
        let got = grants(&s, held, waiters).await;
        let a = got[..4].iter().filter(|t| **t == "a").count();
        assert_eq!(a, 2, "both tenants wait, so they take turns: {got:?}");
    }

    fn queued(tenant: &str) -> i64 {
        let labels = TenantLabels {
            tenant: tenant.to_string(),
        };
        METRICS.queued.get_or_create(&labels).get()
    }

    #[tokio::test]
    async fn a_waiter_that_left_does_not_take_a_slot() {
        let s = Scheduler::new(1, Duration::from_secs(10));
        let held = s.acquire("a", 1, Priority::Medium).await.expect("slot");
        let s2 = s.clone();
        let gone = tokio::spawn(async move { s2.acquire("left-queue", 1, Priority::High).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(queued("left-queue"), 1);
        gone.abort();
        let _ = gone.await;
        assert_eq!(
            queued("left-queue"),
            0,
            "a caller that left is no longer counted as queued"
        );
        drop(held);
        assert_eq!(s.running(), 0);
        assert!(s.acquire("c", 1, Priority::Low).await.is_ok());
    }

    /// A waiter that leaves after its slot was sent, before it saw it,
    /// hands the slot on rather than keeping it forever.
    #[tokio::test]
    async fn a_slot_sent_to_a_waiter_that_left_passes_on() {
        let s = Scheduler::new(1, Duration::from_secs(10));
        let held = s.acquire("a", 1, Priority::Medium).await.expect("slot");
        let mut waiting = Box::pin(s.acquire("b", 1, Priority::Medium));
        assert!(futures::poll!(&mut waiting).is_pending(), "queued");
        drop(held);
        drop(waiting);
        assert_eq!(s.running(), 0);
        let again = tokio::time::timeout(Duration::from_secs(1), s.acquire("c", 1, Priority::Low)).await;
        assert!(matches!(again, Ok(Ok(_))), "the slot is free again");
    }
}

//! A consumer's group membership as its stream sees it: which records it
//! read before a rebalance took their partition away. Their offsets are not
//! committed: committed after another member read further, they would send
//! the group back (the broker takes them from a member of the current
//! generation, also once the partition is given back). The records
//! themselves are still handed out: one that did not come again (from a
//! partition the group has no offset for, read from its end by a `latest`
//! start) would be lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, TopicPartitionList};

use crate::backend::topics::PartitionOffset;

/// A consumer as the Kafka source makes them.
pub type GroupConsumer = StreamConsumer<Membership>;

#[derive(Default)]
pub struct Membership {
    /// Revocations so far, of any partition.
    revocations: AtomicU64,
    /// Per partition, the count of revocations just after its last one.
    revoked_at: Mutex<HashMap<(String, i32), u64>>,
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    /// Runs inside the consumer's poll (its `recv`), before librdkafka lets
    /// go of the partitions: a record `recv` returned before it was read
    /// under the assignment that ends here, one returned after under the
    /// next (librdkafka drops what it fetched under the old one).
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.revoke(partitions);
        }
    }
}

impl Membership {
    fn revoke(&self, partitions: &TopicPartitionList) {
        let mut revoked_at = self.revoked_at.lock();
        let now = self.revocations.fetch_add(1, Ordering::AcqRel) + 1;
        for p in partitions.elements() {
            revoked_at.insert((p.topic().to_string(), p.partition()), now);
        }
    }

    /// What a record read now carries as its [`InRecord::assignment`].
    pub fn now(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    /// Whether `partition` of `topic` was taken away since a record of it
    /// was read under `assignment`.
    fn revoked_since(&self, topic: &str, partition: i32, assignment: u64) -> bool {
        assignment < self.now()
            && self
                .revoked_at
                .lock()
                .get(&(topic.to_string(), partition))
                .is_some_and(|&at| at > assignment)
    }

    /// Keeps of `offsets` those of partitions this consumer has had since
    /// it read the records they follow.
    pub fn still_ours(&self, offsets: &mut Vec<PartitionOffset>) {
        offsets.retain(|o| !self.revoked_since(&o.topic, o.partition, o.assignment));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(partition: i32, assignment: u64) -> PartitionOffset {
        PartitionOffset {
            topic: "t".into(),
            partition,
            offset: 10,
            assignment,
        }
    }

    #[test]
    fn only_what_was_read_before_its_partition_was_taken_away_is_dropped() {
        let member = Membership::default();
        let before = member.now();
        let mut revoked = TopicPartitionList::new();
        revoked.add_partition("t", 1);
        member.revoke(&revoked);
        let mut offsets = vec![offset(0, before), offset(1, before), offset(1, member.now())];
        member.still_ours(&mut offsets);
        assert_eq!(offsets, [offset(0, before), offset(1, member.now())]);
    }
}

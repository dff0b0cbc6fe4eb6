//! Topic sources (Kafka), engine-independent: records out and in, start
//! positions, topic metadata. No pretend schema of a topic: these sources
//! sit behind their own trait, not `SqlSource`.

use std::time::Duration;

use async_trait::async_trait;

use super::{BackendError, Capabilities, ConnectionInfo};

/// A record header: its key, and its value (`None`: a null value, which
/// Kafka tells from an empty one).
pub type Header = (String, Option<Vec<u8>>);

/// A record to produce.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    /// Explicit partition; `None` lets the partitioner choose by key.
    pub partition: Option<i32>,
    /// Milliseconds since the epoch; `None` for the broker's time.
    pub timestamp_ms: Option<i64>,
}

impl OutRecord {
    /// Bytes the record carries: key, value and headers, each header
    /// counted at least as what it costs to hold ([`HEADER_BYTES`]).
    pub fn size(&self) -> usize {
        record_size(&self.key, &self.value, &self.headers)
    }
}

/// Where a produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq)]
pub struct InRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Which of its consumer's assignments of the partition the record was
    /// read under (a count of the consumer's rebalances), for telling
    /// whether the partition is still the consumer's when its offset is
    /// committed; 0 outside a group.
    pub assignment: u64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
}

impl InRecord {
    /// As [`OutRecord::size`].
    pub fn size(&self) -> usize {
        record_size(&self.key, &self.value, &self.headers)
    }
}

/// What each header costs beyond its key and value: its place in memory (a
/// `String` and a `Vec`, 48 bytes on 64-bit targets; fixed, so that the
/// limits a record is checked against do not depend on the build). Without
/// it, a record of a million empty headers (2 bytes each on the wire) would
/// count as 0 bytes against the batch size, `max_record_bytes` and the byte
/// rate, while holding tens of MB.
pub const HEADER_BYTES: usize = 48;

fn record_size(key: &Option<Vec<u8>>, value: &Option<Vec<u8>>, headers: &[Header]) -> usize {
    key.as_ref().map_or(0, Vec::len)
        + value.as_ref().map_or(0, Vec::len)
        + headers
            .iter()
            .map(|(k, v)| HEADER_BYTES + k.len() + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

/// A topic partition and an offset (the next record to read, for commits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// For one that follows records read: their [`InRecord::assignment`].
    pub assignment: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The group's committed offsets, else the earliest record.
    Earliest,
    /// The group's committed offsets, else only new records.
    Latest,
    /// Exactly these partitions, from these offsets.
    Offsets(Vec<PartitionOffset>),
    /// Every partition of the topics, from the first record at or after this time (ms).
    Timestamp(i64),
}

#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    pub topics: Vec<String>,
    /// The group id on the broker, already namespaced for the tenant.
    pub group: String,
    pub start: Start,
}

/// Records as they arrive, in batches. Dropping it leaves the group.
#[async_trait]
pub trait RecordStream: Send {
    /// The next batch; `None` when the stream ended.
    async fn next(&mut self) -> Option<Result<Vec<InRecord>, BackendError>>;
    /// Commits, for the stream's group, these offsets (each partition's
    /// next record after those delivered to the client).
    fn commit(&mut self, next: Vec<PartitionOffset>) -> Result<(), BackendError>;
    /// Ends the stream once the commits made through it have reached the
    /// broker (or a bounded wait for them is over).
    async fn close(self: Box<Self>);
}

/// The offsets a group resumes from after `delivered`: per partition, the
/// one after the last record.
pub fn next_offsets(delivered: &[InRecord]) -> Vec<PartitionOffset> {
    let mut next: Vec<PartitionOffset> = Vec::new();
    merge_offsets(
        &mut next,
        delivered.iter().map(|r| PartitionOffset {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset + 1,
            assignment: r.assignment,
        }),
    );
    next
}

/// Adds `more` to `into`, keeping per partition the offset of the latest
/// assignment, and of it the furthest (a partition given back may be read
/// again from behind where an older assignment got to).
pub fn merge_offsets(into: &mut Vec<PartitionOffset>, more: impl IntoIterator<Item = PartitionOffset>) {
    for o in more {
        match into
            .iter_mut()
            .find(|n| n.partition == o.partition && n.topic == o.topic)
        {
            Some(n) => {
                if (o.assignment, o.offset) > (n.assignment, n.offset) {
                    *n = o;
                }
            }
            None => into.push(o),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub id: i32,
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub low: i64,
    pub high: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: Vec<PartitionInfo>,
}

#[async_trait]
pub trait TopicSource: Send + Sync + 'static {
    fn capabilities(&self) -> Capabilities;
    /// Reaches the cluster: broker count and cluster id.
    async fn connection_info(&self) -> Result<ConnectionInfo, BackendError>;
    /// Whether the tenant may use `topic` at all. Topics it may not use
    /// are answered exactly like topics that do not exist.
    fn allows(&self, topic: &str) -> bool;
    /// The largest record (by [`OutRecord::size`]) the source can send.
    fn max_record_bytes(&self) -> u64;
    /// Produces `records` to `topic`; answers once the broker acknowledged every one.
    /// `within`: how long the answers may take (what is left of the
    /// caller's deadline); records not answered by then are reported as unknown.
    async fn produce(
        &self,
        topic: &str,
        records: Vec<OutRecord>,
        within: Option<Duration>,
    ) -> Result<Vec<Ack>, BackendError>;
    async fn consume(&self, spec: ConsumeSpec) -> Result<Box<dyn RecordStream>, BackendError>;
    /// Commits offsets for a group (already namespaced).
    async fn commit(&self, group: &str, offsets: Vec<PartitionOffset>) -> Result<(), BackendError>;
    /// The allowed topics that exist, with partitions and watermarks.
    async fn list_topics(&self) -> Result<Vec<TopicInfo>, BackendError>;
    /// A reload replaced or removed this source: its streams reading a
    /// topic `still_allowed` refuses end now (NOT_FOUND), the others go on.
    fn retire(&self, still_allowed: &dyn Fn(&str) -> bool);
    /// What this source's running streams are known by, handed to the
    /// source a reload replaces it with when both reach the same cluster as
    /// the same login (see [`super::connect`]), so that the successor can
    /// still end them and commit through them.
    fn carried(&self) -> std::sync::Arc<dyn std::any::Any + Send + Sync>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_headers_count_what_they_take_to_hold() {
        let headers = vec![(String::new(), Some(Vec::new())); 100_000];
        let out = OutRecord {
            headers: headers.clone(),
            ..Default::default()
        };
        let consumed = InRecord {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            assignment: 0,
            timestamp_ms: None,
            key: Some(vec![1; 16]),
            value: None,
            headers,
        };
        assert_eq!(out.size(), 100_000 * HEADER_BYTES);
        assert_eq!(consumed.size(), 16 + 100_000 * HEADER_BYTES);
    }
}

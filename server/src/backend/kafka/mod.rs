//! Kafka through librdkafka (rdkafka): one idempotent producer per source,
//! shared by every call (see `producer`); one consumer per `Consume` call, which leaves its
//! group when the call ends. librdkafka's metadata and watermark calls
//! block, so they run on the blocking pool.

mod membership;
mod producer;

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use membership::{GroupConsumer, Membership};
use producer::{Producer, Record};

use super::topics::{
    merge_offsets, Ack, ConsumeSpec, InRecord, OutRecord, PartitionInfo, PartitionOffset, RecordStream, Start,
    TopicInfo, TopicSource,
};
use super::{BackendError, Capabilities, ConnectionInfo, EngineErrorKind};
use crate::config::SourceConfig;

/// Longest a metadata, watermark or offset lookup may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Records per batch handed to a consumer's caller at most.
const BATCH_RECORDS: usize = 500;
/// Bytes of keys, values and headers per batch, past which it is handed
/// over (a record larger than this goes alone): 500 large records would make
/// a message past gRPC clients' usual 4 MiB limit.
const BATCH_BYTES: usize = 1 << 20;
/// A batch is handed over after this long even when not full.
const BATCH_WAIT: Duration = Duration::from_millis(20);
/// Batches buffered between a consumer and its caller; the consumer stops
/// reading when they are full, so memory stays bounded by librdkafka's
/// prefetch queue (`queued.max.messages.kbytes`) plus these.
const CONSUMER_BUFFER: usize = 2;
/// How long a consumer waits for room in its caller's buffer before it
/// pauses its partitions (see `paused_until_room`): long enough for a
/// caller that keeps up, far below `max.poll.interval.ms`.
const PAUSE_AFTER: Duration = Duration::from_millis(250);

pub struct KafkaSource {
    base: ClientConfig,
    /// Replaced after a fatal error, which an idempotent producer never
    /// recovers from (every later record would be refused).
    producer: Mutex<Arc<Producer>>,
    producer_config: ClientConfig,
    /// What the producer's `message.max.bytes` leaves for a record.
    max_record_bytes: u64,
    topics: Vec<String>,
    prefix: Option<String>,
    /// Shared with the versions of this source before and after it that
    /// reach the same cluster as the same login (see [`TopicSource::carried`]).
    live: Arc<Live>,
    /// Set by `retire`, under `live.streams`' lock: a stream that passed
    /// its topic check on this version of the source but registers only
    /// after a reload replaced it would escape that reload's `retire`.
    superseded: AtomicBool,
}

/// What a source's running streams are known by. A reload that only
/// rotates a password or adds a topic replaces the source, not its
/// streams: its successor must still find them, to end those of a topic a
/// later reload takes away and to commit through their group membership.
#[derive(Default)]
struct Live {
    /// Each running stream's topics and the token that ends it, for `retire`.
    streams: Mutex<Vec<(Vec<String>, CancellationToken)>>,
    /// Live consumers by group, so that CommitOffsets for a group being
    /// consumed on this replica commits through one of its members (the
    /// broker refuses a commit from outside a group that has members).
    consumers: Mutex<HashMap<String, Vec<Weak<GroupConsumer>>>>,
    /// CommitOffsets whose callers stopped waiting (a deadline, a cancel)
    /// while librdkafka's synchronous commit, which waits for a coordinator
    /// without end, goes on: each holds a blocking thread (and, alone, a
    /// Kafka client), so a source takes no new commit while
    /// `COMMITS_WAITING` of them wait. Commits whose callers still wait are
    /// not counted: the gateway's concurrency limits bound those.
    abandoned_commits: Arc<AtomicUsize>,
}

const COMMITS_WAITING: usize = 4;

impl KafkaSource {
    /// `carried`: what the source this one replaces carried (see
    /// [`TopicSource::carried`]), when both reach the same cluster as the same login.
    pub fn new(config: &SourceConfig, carried: Option<Arc<dyn Any + Send + Sync>>) -> Result<Self, BackendError> {
        let mut base = ClientConfig::new();
        base.set(
            "bootstrap.servers",
            config.bootstrap_servers.clone().unwrap_or_default(),
        )
        .set("client.id", "weir")
        // librdkafka logs through its own callbacks; keep the noise down.
        .set("log_level", "3");
        if let Some(user) = &config.user {
            base.set("sasl.username", user);
        }
        if let Some(password) = config.password().map_err(BackendError::Invalid)? {
            base.set("sasl.password", password);
        }
        for (k, v) in &config.kafka_options {
            base.set(k, v);
        }
        let mut producer = base.clone();
        producer.set("enable.idempotence", "true").set("acks", "all");
        or_default(&mut producer, "message.timeout.ms", "10000");
        or_default(&mut producer, "linger.ms", "5");
        // How long librdkafka waits for a topic it has not seen in metadata
        // before failing its records as unknown (30 s by default): past
        // `message.timeout.ms`, records for a topic that does not exist (on
        // a cluster that does not create topics on use) timed out after
        // 10 s as possibly written (`UNAVAILABLE`) instead of failing as
        // not found. Topic creation reaches every broker well within it.
        or_default(&mut producer, "topic.metadata.propagation.max.ms", "3000");
        // The Java client's hash of the key: records of one key land on the
        // partition Java producers, Kafka Streams and Kafka Connect choose
        // (librdkafka's own default, a CRC32, spreads keys elsewhere).
        or_default(&mut producer, "partitioner", "murmur2_random");
        let producer_config = producer;
        let producer =
            Producer::new(&producer_config).map_err(|e| BackendError::Invalid(settings_error("producer", &e)))?;
        let max_record_bytes = largest_record(&producer_config);
        Ok(Self {
            base,
            max_record_bytes,
            producer: Mutex::new(Arc::new(producer)),
            producer_config,
            topics: config.topics.clone(),
            prefix: config.topic_prefix.clone().filter(|p| !p.is_empty()),
            live: carried.and_then(|c| c.downcast::<Live>().ok()).unwrap_or_default(),
            superseded: AtomicBool::new(false),
        })
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base.clone();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        or_default(&mut c, "session.timeout.ms", "10000");
        or_default(&mut c, "queued.max.messages.kbytes", "16384");
        c
    }

    /// Puts a new producer in the place of `used` if librdkafka has declared
    /// `used` unusable (and no other call has replaced it yet); whether it was.
    fn replace_if_fatal(&self, used: &Arc<Producer>) -> bool {
        let Some((code, reason)) = used.client().fatal_error() else {
            return false;
        };
        let mut current = self.producer.lock();
        if !Arc::ptr_eq(&current, used) {
            return true;
        }
        match Producer::new(&self.producer_config) {
            Ok(fresh) => {
                tracing::warn!(?code, %reason, "the Kafka producer met a fatal error; a new one takes its place");
                *current = Arc::new(fresh);
            }
            Err(e) => tracing::warn!(?code, error = %e, "the Kafka producer met a fatal error and cannot be replaced"),
        }
        true
    }

    /// Runs a blocking librdkafka call on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Producer>) -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let producer = self.producer.lock().clone();
        tokio::task::spawn_blocking(move || f(producer))
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?
            .map_err(map_error)
    }
}

/// librdkafka's refusal of the source's settings, without the refused value:
/// a mistyped secret key (`sasl.pasword`) would otherwise put the password
/// in the log. At a call it is the operator's to fix, not the caller's
/// (INTERNAL); at load it refuses the configuration.
fn settings_error(client: &str, e: &KafkaError) -> String {
    match e {
        // librdkafka's description of an invalid value quotes the value.
        KafkaError::ClientConfig(rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, description, key, _) => {
            format!("Kafka {client} settings: {description} (kafka_options \"{key}\")")
        }
        KafkaError::ClientConfig(_, _, key, _) => {
            format!("Kafka {client} settings: kafka_options \"{key}\" has a value librdkafka refuses")
        }
        other => format!("Kafka {client} settings: {other}"),
    }
}

/// librdkafka's framing of one record beyond its key, value and headers'
/// bytes, at most (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: length, attributes,
/// timestamp and offset deltas, key and value lengths, header count), and
/// of each header beyond its key and value (two lengths). [`OutRecord::size`]
/// counts a header as `HEADER_BYTES` more, which covers the latter.
const RECORD_FRAMING: u64 = 36;

/// The largest record the producer takes: librdkafka refuses one whose
/// framed size passes its `message.max.bytes` (1,000,000 by default)
/// before sending it, and fails every later record of the call with it.
fn largest_record(producer: &ClientConfig) -> u64 {
    producer
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1_000_000)
        .saturating_sub(RECORD_FRAMING)
}

/// Sets `key` unless the source's `kafka_options` did.
fn or_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// A topic named in the allow-list, or under its prefix.
fn allowed(topics: &[String], prefix: Option<&str>, topic: &str) -> bool {
    topics.iter().any(|t| t == topic) || prefix.is_some_and(|p| topic.starts_with(p))
}

/// Classifies a librdkafka error; the text never carries credentials.
pub fn map_error(e: KafkaError) -> BackendError {
    use RDKafkaErrorCode as C;
    let Some(code) = e.rdkafka_error_code() else {
        return match e {
            // The producer went (its source was removed or changed by a reload) before the broker answered.
            KafkaError::Canceled => {
                BackendError::Unavailable("the Kafka source was closed before the broker answered".into())
            }
            e => BackendError::Internal(e.to_string()),
        };
    };
    let kind = match code {
        C::UnknownTopicOrPartition | C::UnknownTopic => {
            // The broker's one code for both: a commit to partition 7 of a
            // topic with 3 is told so, not that its topic is missing.
            let message = match code {
                C::UnknownTopic => "topic not found",
                _ => "topic or partition not found: the topic does not exist, or has no partition of that number",
            };
            return BackendError::Engine {
                kind: EngineErrorKind::NotFound,
                code: format!("{code:?}"),
                message: message.into(),
            };
        }
        C::UnknownPartition => {
            return BackendError::not_found("partition not found: the topic has no partition of that number");
        }
        C::PurgeQueue => {
            return BackendError::Unavailable("the Kafka source was closed before the record was sent".into());
        }
        C::PurgeInflight => {
            return BackendError::Unavailable("the Kafka source was closed before the broker answered".into());
        }
        // Room in the producer's queue did not come within the wait: the
        // cluster is not taking records as fast as they come. Transient.
        C::QueueFull => {
            return BackendError::Unavailable(
                "the producer's queue stayed full: the Kafka cluster is not taking records as fast as they come".into(),
            );
        }
        // The source's own credentials or TLS settings: the operator's to
        // fix, so like a SQL source whose login is refused.
        C::Authentication | C::SaslAuthenticationFailed | C::SSL => {
            return BackendError::Unavailable(format!(
                "the Kafka cluster refused the source's credentials or TLS handshake ({code:?}); \
                 the operator must fix the source's settings"
            ));
        }
        // The idempotent producer cannot go on; the source makes a new one.
        C::Fatal => {
            return BackendError::Unavailable(
                "the Kafka producer met a fatal error and is being replaced; send again the records not acknowledged"
                    .into(),
            );
        }
        // The record itself: a tombstone without a key on a compacted topic,
        // a timestamp the topic refuses, a size over the broker's limit.
        C::MessageSizeTooLarge
        | C::MessageBatchTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidArgument
        | C::InvalidRecord
        | C::InvalidTopic
        | C::InvalidTimestamp
        // A good record whose batch the broker refused for another one.
        | C::InvalidDifferentRecord => EngineErrorKind::InvalidArgument,
        // A broker quota, or a group at its size limit: the same call can succeed soon.
        C::ThrottlingQuotaExceeded | C::GroupMaxSizeReached => EngineErrorKind::Overloaded,
        C::PolicyViolation => EngineErrorKind::FailedPrecondition,
        C::TopicAuthorizationFailed | C::GroupAuthorizationFailed | C::ClusterAuthorizationFailed => {
            EngineErrorKind::PermissionDenied
        }
        // The group is being rebalanced: a commit tried again shortly goes through.
        C::RebalanceInProgress => EngineErrorKind::Unavailable,
        C::UnknownMemberId | C::IllegalGeneration => EngineErrorKind::FailedPrecondition,
        C::OffsetOutOfRange | C::AutoOffsetReset => {
            return BackendError::PositionNotRetained(
                "an offset asked for is not in its partition (before its oldest record, or past its end); \
                 start from earliest, latest or a timestamp instead"
                    .into(),
            );
        }
        code => match transient(code) {
            // No answer came: like a SQL server that cannot be reached, no
            // engine code to show.
            Some(Transient::NoAnswer) => {
                return BackendError::Unavailable(format!("the Kafka cluster did not answer ({code:?})"));
            }
            Some(Transient::Answered) => EngineErrorKind::Unavailable,
            None => EngineErrorKind::Internal,
        },
    };
    BackendError::Engine {
        kind,
        code: format!("{code:?}"),
        message: e.to_string(),
    }
}

/// A member's commit refused for its generation or id: a rebalance ended
/// while it was on the way, and the member rejoins on its next poll, after
/// which the same commit goes through. (A standalone client's refusal for
/// the same codes is for good while the group has members.)
fn member_commit_error(e: KafkaError) -> BackendError {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(code @ (C::IllegalGeneration | C::UnknownMemberId)) => BackendError::Engine {
            kind: EngineErrorKind::Unavailable,
            code: format!("{code:?}"),
            message: "the group was rebalanced while the commit was on the way; commit again shortly".into(),
        },
        _ => map_error(e),
    }
}

fn owned_headers(headers: &[crate::backend::topics::Header]) -> Option<OwnedHeaders> {
    if headers.is_empty() {
        return None;
    }
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: value.as_ref(),
        });
    }
    Some(owned)
}

/// A record's headers. Read through librdkafka's C calls, not rdkafka's
/// `Headers::iter`, which panics on a key that is not UTF-8 (any client
/// outside Weir can write one): the record could then never be delivered,
/// and its group would stop at it for good. Such a key is kept lossily.
#[allow(unsafe_code)] // The only unsafe code in Weir: rdkafka has no safe call that does not panic here.
fn read_headers(m: &BorrowedMessage<'_>) -> Vec<crate::backend::topics::Header> {
    use rdkafka::bindings as rd;
    let ok = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a live message while `m` is borrowed; librdkafka
    // sets `headers` to the message's own header list (or answers NOENT).
    if unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut headers) } != ok || headers.is_null() {
        return Vec::new();
    }
    // SAFETY: the list belongs to the message, alive while `m` is borrowed.
    let count = unsafe { rd::rd_kafka_header_cnt(headers) };
    (0..count)
        .filter_map(|index| {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let mut value: *const std::ffi::c_void = std::ptr::null();
            let mut size = 0usize;
            // SAFETY: an index below the count; librdkafka fills the
            // out-pointers with a NUL-terminated name and `size` bytes of
            // value (or a null value), both owned by the list.
            let err = unsafe { rd::rd_kafka_header_get_all(headers, index, &mut name, &mut value, &mut size) };
            if err != ok || name.is_null() {
                return None;
            }
            // SAFETY: as above, valid while `m` is borrowed; copied out at once.
            let key = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned();
            let value = (!value.is_null()).then(|| {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
            });
            Some((key, value))
        })
        .collect()
}

/// `m`, as read by `consumer` now.
fn record(consumer: &GroupConsumer, m: &BorrowedMessage<'_>) -> InRecord {
    let headers = read_headers(m);
    InRecord {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        assignment: consumer.context().now(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

struct KafkaRecords {
    rx: mpsc::Receiver<Result<Vec<InRecord>, BackendError>>,
    /// Cancelled by `retire` when a reload takes one of the stream's topics
    /// away (and when the stream is dropped, which ends its registration).
    retired: CancellationToken,
    /// Taken when the stream is dropped, to be let go of by [`release`].
    consumer: Option<Arc<GroupConsumer>>,
    /// The offsets committed through this stream so far, to wait for at its end.
    committed: Vec<PartitionOffset>,
}

impl Drop for KafkaRecords {
    fn drop(&mut self) {
        // Ends its registration for `retire`.
        self.retired.cancel();
        if let Some(consumer) = self.consumer.take() {
            release(consumer);
        }
    }
}

/// Lets go of a consumer on the blocking pool. The last holder's drop
/// closes the consumer (it leaves the group and sends its last commits),
/// which blocks until the broker answers, or gives up.
fn release(consumer: Arc<GroupConsumer>) {
    super::drop_off_runtime(consumer);
}

#[async_trait]
impl RecordStream for KafkaRecords {
    async fn next(&mut self) -> Option<Result<Vec<InRecord>, BackendError>> {
        // The reader ends only after sending why, or once this side is gone:
        // an end without a word is a reader that panicked, not the end of
        // the records, which would end the stream with OK every time.
        let received = tokio::select! {
            biased;
            () = self.retired.cancelled() => {
                return Some(Err(BackendError::not_found(
                    "a topic of this stream is no longer among the source's topics (the configuration was reloaded)",
                )));
            }
            received = self.rx.recv() => received,
        };
        Some(received.unwrap_or_else(|| {
            Err(BackendError::Internal(
                "the consumer's reader stopped unexpectedly (see the server log); the stream ends here".into(),
            ))
        }))
    }

    /// Queued in librdkafka, which sends commits in order and retries them
    /// across a lost coordinator. It reports an asynchronous manual
    /// commit's outcome to no one (its event API carries only automatic
    /// commits'): a refused commit shows only as records read again.
    fn commit(&mut self, mut next: Vec<PartitionOffset>) -> Result<(), BackendError> {
        if next.is_empty() {
            return Ok(());
        }
        let Some(consumer) = &self.consumer else {
            return Err(BackendError::Internal("the consumer was closed".into()));
        };
        // Only for partitions this member has had since it read the records:
        // a batch read before a rebalance took its partition away would
        // commit an offset behind what the member that had it since
        // committed (the broker takes it from a member of the current
        // generation, also once the partition is given back), and the
        // group would read those records again.
        consumer.context().still_ours(&mut next);
        if next.is_empty() {
            return Ok(());
        }
        let tpl = partition_list(&next).map_err(map_error)?;
        consumer.commit(&tpl, CommitMode::Async).map_err(map_error)?;
        merge_offsets(&mut self.committed, next);
        Ok(())
    }

    /// Commits the latest offsets once more, synchronously: librdkafka sends
    /// commits in order, so when this one is answered the earlier ones are
    /// too. A client told that its stream ended then resumes after what it
    /// was given, even on a replica of its own.
    async fn close(mut self: Box<Self>) {
        // The reader lets go of its handle on the consumer once it sees this.
        self.rx.close();
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        // Not for a partition taken away since: it may have gone further
        // under another member, and the group's offsets may not be learnt.
        consumer.context().still_ours(&mut self.committed);
        if self.committed.is_empty() {
            release(consumer);
            return;
        }
        let Ok(tpl) = partition_list(&self.committed) else {
            release(consumer);
            return;
        };
        // Given up on, the task still ends, and drops the consumer there.
        let last = tokio::task::spawn_blocking(move || {
            // Tried again while the coordinator is being found again (a
            // broker that just came back), within the wait; a refusal for
            // good is not waited out.
            let deadline = Instant::now() + LAST_COMMIT_WAIT;
            loop {
                // The group's offsets asked for within a second at most; not
                // answered, every offset is committed, as without the check:
                // a rare rewind is better than no last commit.
                let ask = deadline
                    .saturating_duration_since(Instant::now())
                    .min(GROUP_OFFSETS_WAIT);
                let outcome = match ahead_of_group(&consumer, &tpl, ask) {
                    Ok(ahead) if ahead.count() == 0 => Ok(()),
                    Ok(ahead) => consumer.commit(&ahead, CommitMode::Sync),
                    Err(_) => consumer.commit(&tpl, CommitMode::Sync),
                };
                let again = outcome.as_ref().is_err_and(commit_may_go_through);
                if !again || Instant::now() + LAST_COMMIT_RETRY >= deadline {
                    return (outcome, consumer);
                }
                std::thread::sleep(LAST_COMMIT_RETRY);
            }
        });
        match tokio::time::timeout(LAST_COMMIT_WAIT + LAST_COMMIT_RETRY, last).await {
            Ok(Ok((outcome, consumer))) => {
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, "a consumer's last commit failed; its group may read some records again");
                }
                release(consumer);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "a consumer's last commit did not run"),
            Err(_) => tracing::warn!(
                "a consumer's last commit took longer than {LAST_COMMIT_WAIT:?}; the stream ends without waiting for it"
            ),
        }
    }
}

/// The offsets of `ours` ahead of what the group has committed. One the
/// group has at or past it needs no commit: this stream's own commit got
/// there, or another member had the partition since (a rebalance took it
/// away and gave it back) and read further, which an old offset committed
/// now would undo, and the group would read those records again.
fn ahead_of_group(
    consumer: &GroupConsumer,
    ours: &TopicPartitionList,
    timeout: Duration,
) -> KafkaResult<TopicPartitionList> {
    let group = consumer.committed_offsets(ours.clone(), timeout)?;
    let mut ahead = TopicPartitionList::new();
    for ours in ours.elements() {
        let theirs = group.find_partition(ours.topic(), ours.partition()).map(|p| p.offset());
        if let (Offset::Offset(mine), Some(Offset::Offset(theirs))) = (ours.offset(), theirs) {
            if theirs >= mine {
                continue;
            }
        }
        ahead.add_partition_offset(ours.topic(), ours.partition(), ours.offset())?;
    }
    Ok(ahead)
}

/// The cause a Produce whose deadline passed gives.
fn late() -> BackendError {
    BackendError::Engine {
        kind: EngineErrorKind::DeadlineExceeded,
        code: String::new(),
        message: "the call's deadline passed before the broker acknowledged every record".into(),
    }
}

/// Longest the last commit waits to learn the group's own offsets.
const GROUP_OFFSETS_WAIT: Duration = Duration::from_secs(1);

/// How long the end of a stream waits for its consumer's last commit.
const LAST_COMMIT_WAIT: Duration = Duration::from_secs(5);
/// Between tries of that commit.
const LAST_COMMIT_RETRY: Duration = Duration::from_millis(200);

/// The offsets as librdkafka takes them.
fn partition_list(offsets: &[PartitionOffset]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for o in offsets {
        tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.offset))?;
    }
    Ok(tpl)
}

/// Batches the consumer's records for its caller until either side ends,
/// then lets go of the consumer.
async fn pump(consumer: Arc<GroupConsumer>, tx: mpsc::Sender<Result<Vec<InRecord>, BackendError>>) {
    read_batches(&consumer, &tx).await;
    answer_group_until_closed(&consumer, &tx).await;
    release(consumer);
}

/// After the reader's last word (an error), until the stream lets go of
/// the consumer while its client still takes the batches before it: the
/// partitions paused, the consumer is polled on, since librdkafka serves
/// the group's rebalances only while polled, and a member left unpolled
/// would hold the whole group still for up to `max.poll.interval.ms`.
async fn answer_group_until_closed(consumer: &GroupConsumer, tx: &Batches) {
    // Never resumed: the consumer is closed next.
    let _ = pause_all(consumer);
    loop {
        tokio::select! {
            biased;
            () = tx.closed() => return,
            m = consumer.recv() => match m {
                // Of a partition assigned since: neither delivered nor committed.
                Ok(_) => {
                    let _ = pause_all(consumer);
                }
                Err(_) => tokio::time::sleep(OUTAGE_PAUSE).await,
            },
        }
    }
}

/// How long a consumer reads on through connection errors (a broker that
/// restarts, its name not resolving while its pod comes back; librdkafka
/// reconnects by itself) before its stream ends with UNAVAILABLE.
const CONSUMER_OUTAGE: Duration = Duration::from_secs(60);
/// After such an error, before the consumer is asked again.
const OUTAGE_PAUSE: Duration = Duration::from_millis(50);

/// Connection errors further apart than this are separate outages
/// (librdkafka tries to reconnect at least every 10 s while one lasts): a
/// quiet topic's blip an hour after the last must not count as one outage.
const OUTAGE_GAP: Duration = Duration::from_secs(15);

/// Counts a connection error in the outage (when it began, when its last
/// error came); whether the stream rides it out.
fn ride_out(outage: &mut Option<(Instant, Instant)>) -> bool {
    let now = Instant::now();
    let (began, last) = outage.get_or_insert((now, now));
    if now.duration_since(*last) > OUTAGE_GAP {
        *began = now;
    }
    *last = now;
    now.duration_since(*began) < CONSUMER_OUTAGE
}

/// An error librdkafka reports while it recovers on its own: a lost or
/// unresolvable broker, a leader or coordinator moving, a request that
/// timed out, and a member that left its group after `max.poll.interval.ms`
/// without a poll (a slow client: it rejoins at the next one). Most of what
/// a consumer reports is of this kind; the stream ends on them only when
/// no record comes between them for `CONSUMER_OUTAGE`.
fn connection_error(e: &KafkaError) -> bool {
    matches!(e, KafkaError::MessageConsumption(code) if transient(*code).is_some())
}

/// How an error librdkafka recovers from by itself came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transient {
    /// No answer came (librdkafka's own codes, a broker that went away
    /// mid-request).
    NoAnswer,
    /// A broker answered that it cannot serve this now: a leader or
    /// coordinator moving, too few in-sync replicas, a request it timed
    /// out, a failed log directory.
    Answered,
}

/// Sorts the codes of [`connection_error`]; `None` for every other.
fn transient(code: RDKafkaErrorCode) -> Option<Transient> {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageTimedOut
        | C::AllBrokersDown
        | C::BrokerTransportFailure
        | C::NetworkException
        | C::OperationTimedOut
        | C::WaitingForCoordinator
        | C::Resolve
        | C::PollExceeded => Some(Transient::NoAnswer),
        C::RequestTimedOut
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::BrokerNotAvailable
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::CoordinatorLoadInProgress
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::KafkaStorageError => Some(Transient::Answered),
        _ => None,
    }
}

/// Whether a commit that failed so may go through when tried again soon:
/// not one the group refuses for good (authorization, a member that left
/// the group, an offset the broker will not take).
fn commit_may_go_through(e: &KafkaError) -> bool {
    e.rdkafka_error_code()
        .is_some_and(|code| transient(code).is_some() || code == RDKafkaErrorCode::RebalanceInProgress)
}

/// A CommitOffsets in librdkafka, and who was done with it first.
struct PendingCommit {
    state: Mutex<CommitState>,
    /// The source's count of commits whose callers gave up on them.
    abandoned: Arc<AtomicUsize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CommitState {
    Running,
    /// Its caller stopped waiting; librdkafka has not answered yet.
    Abandoned,
    Done,
}

impl PendingCommit {
    /// librdkafka answered.
    fn finish(&self) {
        let mut state = self.state.lock();
        if *state == CommitState::Abandoned {
            self.abandoned.fetch_sub(1, Ordering::Relaxed);
        }
        *state = CommitState::Done;
    }
}

/// Held by the CommitOffsets call while it waits for librdkafka.
struct CallerWaits(Arc<PendingCommit>);

impl Drop for CallerWaits {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        if *state == CommitState::Running {
            *state = CommitState::Abandoned;
            self.0.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type Batches = mpsc::Sender<Result<Vec<InRecord>, BackendError>>;

async fn read_batches(consumer: &GroupConsumer, tx: &Batches) {
    // The connection errors without a record between them.
    let mut outage = None;
    // Records read while the consumer was paused, to start the next batch.
    let mut held = Vec::new();
    loop {
        let first = if held.is_empty() {
            tokio::select! {
                m = consumer.recv() => Some(m),
                () = tx.closed() => return,
            }
        } else {
            None
        };
        let mut batch = match first {
            None => std::mem::take(&mut held),
            Some(Ok(m)) => {
                outage = None;
                vec![record(consumer, &m)]
            }
            Some(Err(e)) if connection_error(&e) && ride_out(&mut outage) => {
                tracing::debug!(error = %e, "a consumer's broker connection failed; librdkafka reconnects");
                // Not at once: librdkafka reconnects on its own time.
                tokio::time::sleep(OUTAGE_PAUSE).await;
                continue;
            }
            Some(Err(e)) => {
                let _ = tx.send(Err(map_error(e))).await;
                return;
            }
        };
        let mut bytes: usize = batch.iter().map(InRecord::size).sum();
        let deadline = Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.recv()).await {
                Ok(Ok(m)) => {
                    let r = record(consumer, &m);
                    bytes += r.size();
                    batch.push(r);
                }
                // The batch goes; the next read meets the outage.
                Ok(Err(e)) if connection_error(&e) => break,
                Ok(Err(e)) => {
                    let _ = tx.send(Ok(batch)).await;
                    let _ = tx.send(Err(map_error(e))).await;
                    return;
                }
                Err(_) => break,
            }
        }
        let room = match tx.try_reserve() {
            Ok(room) => room,
            Err(mpsc::error::TrySendError::Closed(())) => return,
            // A caller a moment behind (its buffer full while a batch is on
            // the wire) gets its room unpaused: a pause drops what
            // librdkafka had fetched, and its fetch again waits out the one
            // in flight (`fetch.wait.max.ms`, 500 ms), which, once per
            // buffer's worth, held a fast reader to 3,000 records a second.
            Err(mpsc::error::TrySendError::Full(())) => match tokio::time::timeout(PAUSE_AFTER, tx.reserve()).await {
                Ok(Ok(room)) => room,
                Ok(Err(_)) => return,
                Err(_) => {
                    let (room, failed) = paused_until_room(consumer, tx, &mut held).await;
                    let Some(room) = room else {
                        return;
                    };
                    if let Some(e) = failed {
                        room.send(Ok(batch));
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    room
                }
            },
        };
        room.send(Ok(batch));
    }
}

/// Waits, while the caller is slow, for room in its buffer. The consumer's
/// partitions are paused meanwhile, and it goes on polling: a rebalance of
/// its group (a member joining or leaving) is served at once, where a
/// consumer left unpolled would hold the whole group still for up to
/// `max.poll.interval.ms`. librdkafka drops what it had fetched for paused
/// partitions and fetches again from the last record handed over. Records
/// of partitions assigned during the wait, before they too are paused, are
/// kept in `held`. Every partition paused is resumed after, whether the
/// consumer has it now or not: librdkafka keeps a partition's pause through
/// a rebalance that takes it away, and one given back later would stay
/// paused, never read again by this stream.
async fn paused_until_room<'a>(
    consumer: &GroupConsumer,
    tx: &'a Batches,
    held: &mut Vec<InRecord>,
) -> (
    Option<mpsc::Permit<'a, Result<Vec<InRecord>, BackendError>>>,
    Option<BackendError>,
) {
    let mut paused = Paused::default();
    if let Err(e) = pause_all(consumer).map(|now| paused.add(&now)) {
        tracing::debug!(error = %e, "a slow consumer's partitions could not be paused; it waits unpolled");
        return (tx.reserve().await.ok(), None);
    }
    let mut held_bytes: usize = held.iter().map(InRecord::size).sum();
    let mut failed = None;
    let room = loop {
        // A batch's worth kept aside, or the stream is to end: wait without polling.
        if held_bytes >= BATCH_BYTES || held.len() >= BATCH_RECORDS || failed.is_some() {
            break tx.reserve().await.ok();
        }
        tokio::select! {
            biased;
            room = tx.reserve() => break room.ok(),
            m = consumer.recv() => match m {
                Ok(m) => {
                    let r = record(consumer, &m);
                    held_bytes += r.size();
                    held.push(r);
                    if let Ok(now) = pause_all(consumer) {
                        paused.add(&now);
                    }
                }
                // librdkafka reconnects; the reads after the wait meet it if it lasts.
                Err(e) if connection_error(&e) => {
                    tracing::debug!(error = %e, "a paused consumer's broker connection failed");
                    tokio::time::sleep(OUTAGE_PAUSE).await;
                }
                Err(e) => failed = Some(map_error(e)),
            },
        }
    };
    if let Err(e) = consumer.resume(&paused.list()) {
        failed.get_or_insert(map_error(e));
    }
    (room, failed)
}

/// Pauses every partition the consumer has now; returns them.
fn pause_all(consumer: &GroupConsumer) -> KafkaResult<TopicPartitionList> {
    let assigned = consumer.assignment()?;
    consumer.pause(&assigned)?;
    Ok(assigned)
}

/// Every partition a wait paused, whether the consumer still has it or not.
#[derive(Default)]
struct Paused(std::collections::HashSet<(String, i32)>);

impl Paused {
    fn add(&mut self, partitions: &TopicPartitionList) {
        self.0.extend(
            partitions
                .elements()
                .iter()
                .map(|p| (p.topic().to_string(), p.partition())),
        );
    }

    fn list(&self) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in &self.0 {
            list.add_partition(topic, *partition);
        }
        list
    }
}

/// Subscribes `consumer` to the topics of `spec`, or assigns it the
/// partitions and offsets its start names.
async fn start(consumer: &Arc<GroupConsumer>, spec: &ConsumeSpec) -> Result<(), BackendError> {
    match &spec.start {
        // librdkafka waits for its main thread to take the subscription.
        Start::Earliest | Start::Latest => {
            let (c, names) = (consumer.clone(), spec.topics.clone());
            tokio::task::spawn_blocking(move || {
                let topics: Vec<&str> = names.iter().map(String::as_str).collect();
                c.subscribe(&topics)
            })
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?
            .map_err(map_error)?
        }
        Start::Offsets(offsets) => {
            // A blocking librdkafka call, as long as the list is.
            let (c, list) = (consumer.clone(), partition_list(offsets).map_err(map_error)?);
            tokio::task::spawn_blocking(move || c.assign(&list))
                .await
                .map_err(|e| BackendError::Internal(e.to_string()))?
                .map_err(map_error)?;
        }
        Start::Timestamp(ms) => {
            let (c, ms, names) = (consumer.clone(), *ms, spec.topics.clone());
            tokio::task::spawn_blocking(move || {
                // One bound for all the lookups: a blocking thread is
                // shared with every tenant's SQLite and Kafka calls.
                let deadline = Instant::now() + METADATA_TIMEOUT;
                let mut wanted = TopicPartitionList::new();
                for topic in &names {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut));
                    }
                    let metadata = c.fetch_metadata(Some(topic), left)?;
                    let mut partitions = Vec::new();
                    for t in metadata.topics() {
                        // The broker's word for it: not authorized is not "not found".
                        if let Some(e) = t.error() {
                            return Err(KafkaError::MetadataFetch(e.into()));
                        }
                        partitions.extend(t.partitions().iter().map(|p| p.id()));
                    }
                    // A topic without partitions would add nothing to read and
                    // the stream would wait for ever: it is not there.
                    if partitions.is_empty() {
                        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition));
                    }
                    for p in partitions {
                        wanted.add_partition_offset(topic, p, Offset::Offset(ms))?;
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::OperationTimedOut));
                }
                let found = c.offsets_for_times(wanted, left)?;
                // A partition whose lookup failed (a leader being elected)
                // would start at an offset no one asked for.
                for p in found.elements() {
                    p.error()?;
                    if matches!(p.offset(), Offset::Invalid) {
                        return Err(KafkaError::OffsetFetch(RDKafkaErrorCode::OperationTimedOut));
                    }
                }
                c.assign(&found)
            })
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?
            .map_err(map_error)?;
        }
    }
    Ok(())
}

#[async_trait]
impl TopicSource for KafkaSource {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            query: false,
            kafka: true,
            transactions: false,
            isolation_levels: vec![],
            change_streams: false,
            parameter_style: "",
            load_modes: vec![],
            schema_names_exact: false,
        }
    }

    async fn connection_info(&self) -> Result<ConnectionInfo, BackendError> {
        let started = Instant::now();
        // A source whose producer failed while no call produced recovers here.
        let current = self.producer.lock().clone();
        let _ = self.replace_if_fatal(&current);
        let (brokers, cluster_id) = self
            .blocking(|p| {
                let client = p.client();
                let metadata = client.fetch_metadata(None, METADATA_TIMEOUT)?;
                let cluster = client.fetch_cluster_id(METADATA_TIMEOUT).unwrap_or_default();
                Ok((metadata.brokers().len() as u32, cluster))
            })
            .await?;
        Ok(ConnectionInfo {
            server_version: format!("Kafka ({brokers} brokers)"),
            database: cluster_id.clone(),
            round_trip: started.elapsed(),
            brokers,
            cluster_id,
            ..Default::default()
        })
    }

    fn max_record_bytes(&self) -> u64 {
        self.max_record_bytes
    }

    fn allows(&self, topic: &str) -> bool {
        allowed(&self.topics, self.prefix.as_deref(), topic)
    }

    async fn produce(
        &self,
        topic: &str,
        records: Vec<OutRecord>,
        within: Option<Duration>,
    ) -> Result<Vec<Ack>, BackendError> {
        let queued: Vec<Record<'_>> = records
            .iter()
            .map(|r| Record {
                topic,
                key: r.key.as_deref(),
                payload: r.value.as_deref(),
                partition: r.partition,
                timestamp: r.timestamp_ms,
                headers: owned_headers(&r.headers),
            })
            .collect();
        // The answer waits for every record's acknowledgement.
        // No time left (spent waiting for a turn or a slot): nothing is
        // queued, and every record is failed, to be sent again.
        if within.is_some_and(|w| w.is_zero()) {
            return Err(BackendError::ProducePartial {
                cause: Box::new(late()),
                acknowledged: Vec::new(),
                failed: (0..records.len()).collect(),
                unknown: Vec::new(),
            });
        }
        let answer_by = within.map(|w| Instant::now() + w);
        let producer = self.producer.lock().clone();
        let results = producer.send_all(queued, Duration::from_secs(5), answer_by).await;
        let (mut acks, mut acknowledged, mut failed, mut unknown, mut cause) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), None);
        // A record failed only for another one of its batch (the broker
        // refuses a batch for one bad record): the cause only when no record
        // failed for its own reason.
        let mut for_another = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(d) => {
                    acknowledged.push(i);
                    acks.push(Ack {
                        partition: d.partition,
                        offset: d.offset,
                    });
                }
                Err(e) if e == producer::LATE => {
                    unknown.push(i);
                    cause.get_or_insert_with(late);
                }
                Err(e) => {
                    // Purged in flight, never reported, or timed out waiting
                    // for the broker's answer (which librdkafka cannot tell
                    // from a record never sent): the broker may have written it.
                    let in_flight = matches!(
                        e,
                        KafkaError::Canceled
                            | KafkaError::MessageProduction(
                                RDKafkaErrorCode::PurgeInflight | RDKafkaErrorCode::MessageTimedOut
                            )
                    );
                    if in_flight {
                        unknown.push(i);
                    } else {
                        failed.push(i);
                    }
                    if e == KafkaError::MessageProduction(RDKafkaErrorCode::InvalidDifferentRecord) {
                        for_another.get_or_insert_with(|| map_error(e));
                    } else {
                        cause.get_or_insert_with(|| map_error(e));
                    }
                }
            }
        }
        let mut cause = cause.or(for_another);
        if cause.is_some() && self.replace_if_fatal(&producer) {
            cause = Some(map_error(KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)));
            // Its errors include ones librdkafka itself counts as possibly
            // written (an out-of-order sequence, a producer id lost in
            // flight): none of its unacknowledged records is known unwritten.
            unknown.append(&mut failed);
            unknown.sort_unstable();
        }
        match cause {
            None => Ok(acks),
            // Only the records the broker did not acknowledge are reported as failed.
            Some(cause) => Err(BackendError::ProducePartial {
                cause: Box::new(cause),
                acknowledged,
                failed,
                unknown,
            }),
        }
    }

    async fn consume(&self, spec: ConsumeSpec) -> Result<Box<dyn RecordStream>, BackendError> {
        let mut config = self.consumer_config(&spec.group);
        let reset = match spec.start {
            Start::Latest => "latest",
            // An offset the partition does not hold (records deleted by
            // retention, a topic made again) is refused, not quietly read
            // from the start again.
            Start::Offsets(_) => "error",
            _ => "earliest",
        };
        config.set("auto.offset.reset", reset);
        // Creating a client reads its CA files and starts its threads.
        let consumer: GroupConsumer =
            tokio::task::spawn_blocking(move || config.create_with_context(Membership::default()))
                .await
                .map_err(|e| BackendError::Internal(e.to_string()))?
                .map_err(|e| BackendError::Internal(settings_error("consumer", &e)))?;
        let consumer = Arc::new(consumer);
        // A consumer dropped here would close on this runtime thread (a
        // blocking wait): every failure to start lets go of it through `release`.
        if let Err(e) = start(&consumer, &spec).await {
            release(consumer);
            return Err(e);
        }
        // Only members of the group commit for it: a consumer given explicit
        // partitions (offsets, a timestamp) has no generation, and the broker
        // refuses its commits while the group has members.
        if matches!(spec.start, Start::Earliest | Start::Latest) {
            let mut live = self.live.consumers.lock();
            live.retain(|_, members| {
                members.retain(|m| m.strong_count() > 0);
                !members.is_empty()
            });
            live.entry(spec.group.clone())
                .or_default()
                .push(Arc::downgrade(&consumer));
        }
        let retired = CancellationToken::new();
        {
            let mut streams = self.live.streams.lock();
            // Its topics were checked against an allow-list a reload has
            // since replaced, whose `retire` this stream came too late for.
            if self.superseded.load(Ordering::Relaxed) {
                drop(streams);
                release(consumer);
                return Err(BackendError::Unavailable(
                    "the source's configuration was reloaded while this stream started; consume again".into(),
                ));
            }
            streams.retain(|(_, token)| !token.is_cancelled());
            // Explicit start offsets may name topics beside `topics`: a
            // reload that disallows any topic read ends the stream.
            let mut read = spec.topics.clone();
            if let Start::Offsets(offsets) = &spec.start {
                read.extend(offsets.iter().map(|o| o.topic.clone()));
                read.sort_unstable();
                read.dedup();
            }
            streams.push((read, retired.clone()));
        }
        let (tx, rx) = mpsc::channel(CONSUMER_BUFFER);
        tokio::spawn(pump(consumer.clone(), tx));
        Ok(Box::new(KafkaRecords {
            rx,
            retired,
            consumer: Some(consumer),
            committed: Vec::new(),
        }))
    }

    async fn commit(&self, group: &str, offsets: Vec<PartitionOffset>) -> Result<(), BackendError> {
        let tpl = partition_list(&offsets).map_err(map_error)?;
        if self.live.abandoned_commits.load(Ordering::Relaxed) >= COMMITS_WAITING {
            return Err(BackendError::Unavailable(format!(
                "{COMMITS_WAITING} commits of this source are still waiting for the Kafka cluster; try again later"
            )));
        }
        let pending = Arc::new(PendingCommit {
            state: Mutex::new(CommitState::Running),
            abandoned: self.live.abandoned_commits.clone(),
        });
        // Dropped with this call; counts the commit as abandoned if it runs on.
        let _caller = CallerWaits(pending.clone());
        // A member of the group here, else the settings of a standalone client.
        let member = self
            .live
            .consumers
            .lock()
            .get(group)
            .and_then(|members| members.iter().find_map(Weak::upgrade))
            .ok_or_else(|| self.consumer_config(group));
        tokio::task::spawn_blocking(move || {
            let committed = match member {
                Ok(consumer) => consumer.commit(&tpl, CommitMode::Sync).map_err(member_commit_error),
                // No member here: commit as a standalone client of the group
                // (the broker accepts that while the group has no live
                // members), made on the blocking pool as `consume` makes its consumer.
                Err(config) => config
                    .create::<BaseConsumer>()
                    .map_err(|e| BackendError::Internal(settings_error("consumer", &e)))
                    .and_then(|consumer| consumer.commit(&tpl, CommitMode::Sync).map_err(map_error)),
            };
            pending.finish();
            committed
        })
        .await
        .map_err(|e| BackendError::Internal(e.to_string()))?
    }

    fn carried(&self) -> Arc<dyn Any + Send + Sync> {
        self.live.clone()
    }

    fn retire(&self, still_allowed: &dyn Fn(&str) -> bool) {
        let streams = self.live.streams.lock();
        self.superseded.store(true, Ordering::Relaxed);
        for (topics, token) in streams.iter() {
            if !topics.iter().all(|t| still_allowed(t)) {
                token.cancel();
            }
        }
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, BackendError> {
        let topics: Vec<String> = self.topics.clone();
        let prefix = self.prefix.clone();
        self.blocking(move |p| {
            let client = p.client();
            // One bound for the whole listing, on a blocking thread other
            // tenants' calls share.
            let deadline = Instant::now() + METADATA_TIMEOUT;
            let metadata = client.fetch_metadata(None, METADATA_TIMEOUT)?;
            let mut out = Vec::new();
            for t in metadata.topics() {
                if !allowed(&topics, prefix.as_deref(), t.name()) || t.error().is_some() {
                    continue;
                }
                let mut partitions = Vec::new();
                for p in t.partitions() {
                    // A partition without a leader (an election under way)
                    // has no watermarks to give: -1, not a failed listing.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let (low, high) = match p.leader() >= 0 && p.error().is_none() && !left.is_zero() {
                        true => client.fetch_watermarks(t.name(), p.id(), left).unwrap_or((-1, -1)),
                        false => (-1, -1),
                    };
                    partitions.push(PartitionInfo {
                        id: p.id(),
                        leader: p.leader(),
                        replicas: p.replicas().to_vec(),
                        low,
                        high,
                    });
                }
                partitions.sort_by_key(|p| p.id);
                out.push(TopicInfo {
                    name: t.name().to_string(),
                    partitions,
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::EngineErrorKind;

    #[test]
    fn connection_errors_are_ridden_out_for_a_minute_and_blips_apart_are_outages_of_their_own() {
        let now = Instant::now();
        let mut outage = None;
        assert!(ride_out(&mut outage), "a first error");
        // Errors every few seconds for over a minute: the stream ends.
        outage = Some((now - Duration::from_secs(61), now - Duration::from_secs(5)));
        assert!(!ride_out(&mut outage));
        // One blip long after the last: a new outage, ridden out.
        outage = Some((now - Duration::from_secs(3600), now - Duration::from_secs(3000)));
        assert!(ride_out(&mut outage));
    }

    fn unavailable(e: KafkaError) -> String {
        match map_error(e) {
            BackendError::Unavailable(m) => m,
            other => panic!("not UNAVAILABLE: {other:?}"),
        }
    }

    #[test]
    fn refused_settings_do_not_show_their_value() {
        use rdkafka::types::RDKafkaConfRes as R;
        for (result, description, key) in [
            (
                R::RD_KAFKA_CONF_UNKNOWN,
                "No such configuration property",
                "sasl.pasword",
            ),
            (
                R::RD_KAFKA_CONF_INVALID,
                "Invalid value \"hunter2\" for configuration property \"sasl.mechanism\"",
                "sasl.mechanism",
            ),
        ] {
            let e = KafkaError::ClientConfig(result, description.into(), key.into(), "hunter2".into());
            let text = settings_error("producer", &e);
            assert!(text.contains(key) && !text.contains("hunter2"), "{text}");
        }
    }

    #[test]
    fn every_compression_type_is_built_in() {
        for codec in ["gzip", "snappy", "lz4", "zstd"] {
            let config = crate::config::Config::from_toml(&format!(
                "[tenants.t.sources.k]\nengine = \"kafka\"\nbootstrap_servers = \"127.0.0.1:1\"\ntopics = [\"a\"]\n\
                 [tenants.t.sources.k.kafka_options]\n\"compression.type\" = \"{codec}\"\n"
            ))
            .expect("config");
            let source = KafkaSource::new(&config.tenants["t"].sources["k"], None);
            assert!(source.is_ok(), "{codec}: {:?}", source.err());
        }
    }

    #[test]
    fn transient_producer_failures_are_unavailable_and_say_why() {
        use RDKafkaErrorCode as C;
        assert!(unavailable(KafkaError::MessageProduction(C::QueueFull)).contains("queue stayed full"));
        assert!(unavailable(KafkaError::Canceled).contains("closed before the broker answered"));
        assert!(unavailable(KafkaError::MessageProduction(C::PurgeQueue)).contains("before the record was sent"));
        assert!(unavailable(KafkaError::MessageProduction(C::PurgeInflight)).contains("before the broker answered"));
        assert!(unavailable(KafkaError::MessageProduction(C::MessageTimedOut)).contains("did not answer"));
    }

    #[test]
    fn outages_credentials_and_quotas_map_to_what_a_caller_can_act_on() {
        use KafkaError::{MessageConsumption as Consuming, MessageProduction as Producing};
        use RDKafkaErrorCode as C;
        // Ridden out by a consumer for a minute; then the stream ends retryable.
        for code in [C::Resolve, C::PollExceeded] {
            unavailable(Consuming(code));
        }
        assert!(unavailable(Consuming(C::SaslAuthenticationFailed)).contains("credentials"));
        assert!(unavailable(Producing(C::Authentication)).contains("credentials"));
        assert!(unavailable(Producing(C::Fatal)).contains("fatal"));
        let kind = |e| match map_error(e) {
            BackendError::Engine { kind, code, .. } => (kind, code),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind(Producing(C::MessageBatchTooLarge)).0,
            EngineErrorKind::InvalidArgument
        );
        assert_eq!(kind(Producing(C::InvalidTopic)).0, EngineErrorKind::InvalidArgument);
        assert_eq!(
            kind(Producing(C::InvalidDifferentRecord)).0,
            EngineErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(Producing(C::ThrottlingQuotaExceeded)).0,
            EngineErrorKind::Overloaded
        );
        assert_eq!(
            kind(Producing(C::UnknownTopicOrPartition)),
            (EngineErrorKind::NotFound, "UnknownTopicOrPartition".to_string())
        );
        assert!(matches!(
            map_error(Consuming(C::OffsetOutOfRange)),
            BackendError::PositionNotRetained(_)
        ));
        // No answer: nothing of the broker's to show.
        for code in [C::AllBrokersDown, C::BrokerTransportFailure, C::OperationTimedOut] {
            assert!(unavailable(Producing(code)).contains(&format!("{code:?}")));
        }
        // The broker's own answer: its code goes to the caller.
        for code in [C::NotEnoughReplicas, C::RequestTimedOut, C::RebalanceInProgress] {
            assert_eq!(
                kind(Producing(code)),
                (EngineErrorKind::Unavailable, format!("{code:?}"))
            );
        }
    }

    #[test]
    fn a_records_own_faults_keep_their_kind_and_code() {
        match map_error(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) {
            BackendError::Engine { kind, code, .. } => {
                assert_eq!(kind, EngineErrorKind::InvalidArgument);
                assert_eq!(code, "MessageSizeTooLarge");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map_error(KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition)),
            BackendError::Engine {
                kind: EngineErrorKind::NotFound,
                ..
            }
        ));
    }
}

//! StreamService, Kafka part: produce, consume as a server stream, commit
//! offsets, list topics. Every topic is checked against the source's
//! allow-list first (a topic outside it is NOT_FOUND, exactly like one that
//! does not exist), and consumer groups are namespaced per tenant so that
//! two tenants can never join each other's groups.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::v1 as pb;
use weir_proto::v1::stream_service_server::StreamService;

use super::{bad, caller, changes, check_plain_name, convert, source, Gate, StreamIn, StreamOut};
use crate::backend::topics::{ConsumeSpec, InRecord, OutRecord, PartitionOffset, Start};
use crate::backend::{BackendError, TopicSource};
use crate::config::ChangesConfig;
use crate::config::Priority;
use crate::error::{Error, Result};
use crate::limits::DEADLINE_MARGIN;
use crate::tenant::Caller;

/// Longest accepted consumer group name, before namespacing.
const MAX_GROUP: usize = 200;
/// Response batches buffered for a slow client before the consumer pauses.
const CONSUME_BUFFER: usize = 2;
/// Topics one Consume may name: each costs the broker a metadata lookup.
const MAX_TOPICS: usize = 100;
/// Partitions one Consume or CommitOffsets names.
const MAX_PARTITION_OFFSETS: usize = 10_000;
/// Records in one Produce call: each is converted and held until the
/// broker acknowledges the whole call, so a call of millions of empty
/// records (a few bytes each on the wire) would hold their memory as long.
const MAX_RECORDS: usize = 100_000;

pub struct StreamApi {
    /// Cancelled when the shutdown grace period is over: consumers still running are cut.
    cut: CancellationToken,
    changes: ChangesConfig,
    gate: Gate,
    /// A stream whose client takes nothing for this long is ended.
    stream_idle: std::time::Duration,
}

impl StreamApi {
    pub fn new(cut: CancellationToken, changes: ChangesConfig, gate: Gate, stream_idle: std::time::Duration) -> Self {
        Self {
            cut,
            changes,
            gate,
            stream_idle,
        }
    }
}

fn topics_of(caller: &Caller, name: &str) -> Result<Arc<dyn TopicSource>> {
    Ok(source(caller, name)?.backend.topics()?.clone())
}

/// Kafka's own rule for topic names; anything else (a NUL, which
/// librdkafka's bindings panic on) never reaches the client library.
const MAX_TOPIC: usize = 249;

fn check_topic(topics: &dyn TopicSource, topic: &str) -> Result<()> {
    if topic.is_empty() {
        return Err(bad("topic", "a topic name is required"));
    }
    check_plain_name("topic", topic, MAX_TOPIC)?;
    if topic == "." || topic == ".." {
        return Err(bad("topic", "'.' and '..' are not topic names"));
    }
    if !topics.allows(topic) {
        return Err(Error::TopicNotFound(topic.to_string()));
    }
    Ok(())
}

/// The group's id on the broker: the tenant's namespace, then the caller's name.
fn group_id(caller: &Caller, group: &str) -> Result<String> {
    check_plain_name("group", group, MAX_GROUP)?;
    Ok(format!("weir.{}.{group}", caller.tenant.id))
}

fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

fn out_record(index: usize, r: pb::ProducerRecord) -> Result<OutRecord> {
    let value = match (r.null_value, r.value.is_empty()) {
        (false, _) => Some(r.value),
        (true, true) => None,
        (true, false) => {
            return Err(bad(
                "records",
                format!("record {index} has null_value set and a value: send one or the other"),
            ))
        }
    };
    if let Some(h) = r.headers.iter().find(|h| h.null_value && !h.value.is_empty()) {
        return Err(bad(
            "records",
            format!(
                "record {index}'s header {:?} has null_value set and a value: send one or the other",
                h.key
            ),
        ));
    }
    // Kafka carries header keys as C strings on the way out: a NUL would cut one short.
    if let Some(h) = r.headers.iter().find(|h| h.key.contains('\0')) {
        return Err(bad(
            "records",
            format!("record {index} has a header key with a NUL character ({:?})", h.key),
        ));
    }
    if let Some(p) = r.partition.filter(|p| *p < 0) {
        return Err(bad(
            "records",
            format!("record {index} names partition {p}: partitions are never negative; leave it unset to let the key choose"),
        ));
    }
    let timestamp_ms = r.timestamp.as_ref().map(timestamp_ms);
    // librdkafka reads 0 as "now", and Kafka has no time before the epoch.
    if let Some(ms) = timestamp_ms.filter(|ms| *ms < 1) {
        return Err(bad(
            "records",
            format!("record {index} has timestamp {ms} ms: Kafka takes times from 1 ms after 1970-01-01T00:00:00Z; leave it unset for the time it is sent"),
        ));
    }
    Ok(OutRecord {
        key: (!r.key.is_empty()).then_some(r.key),
        value,
        headers: r
            .headers
            .into_iter()
            .map(|h| (h.key, (!h.null_value).then_some(h.value)))
            .collect(),
        partition: r.partition,
        timestamp_ms,
    })
}

fn in_record(r: InRecord) -> pb::ConsumedRecord {
    pb::ConsumedRecord {
        topic: r.topic,
        partition: r.partition,
        offset: r.offset,
        timestamp: r.timestamp_ms.map(|ms| prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        null_key: r.key.is_none(),
        null_value: r.value.is_none(),
        key: r.key.unwrap_or_default(),
        value: r.value.unwrap_or_default(),
        headers: r
            .headers
            .into_iter()
            .map(|(key, value)| pb::RecordHeader {
                key,
                null_value: value.is_none(),
                value: value.unwrap_or_default(),
            })
            .collect(),
    }
}

fn partition_offsets(topics: &dyn TopicSource, offsets: Vec<pb::PartitionOffset>) -> Result<Vec<PartitionOffset>> {
    // librdkafka takes each partition into lists it searches one by one:
    // millions of them would hold a thread for hours.
    if offsets.len() > MAX_PARTITION_OFFSETS {
        return Err(bad(
            "offsets",
            format!("{} partitions; name at most {MAX_PARTITION_OFFSETS}", offsets.len()),
        ));
    }
    let mut named = std::collections::HashSet::with_capacity(offsets.len());
    offsets
        .into_iter()
        .map(|o| {
            check_topic(topics, &o.topic)?;
            if o.partition < 0 || o.offset < 0 {
                return Err(bad("offsets", "partitions and offsets are never negative"));
            }
            if !named.insert((o.topic.clone(), o.partition)) {
                return Err(bad(
                    "offsets",
                    format!("partition {} of {} is named twice", o.partition, o.topic),
                ));
            }
            Ok(PartitionOffset {
                topic: o.topic,
                partition: o.partition,
                offset: o.offset,
                assignment: 0,
            })
        })
        .collect()
}

fn start(topics: &dyn TopicSource, start: Option<pb::StartPosition>) -> Result<Start> {
    use pb::start_position::Position;
    Ok(match start.and_then(|s| s.position) {
        None | Some(Position::Earliest(_)) => Start::Earliest,
        Some(Position::Latest(_)) => Start::Latest,
        Some(Position::Offsets(o)) if o.offsets.is_empty() => {
            // librdkafka takes an empty assignment and waits for ever.
            return Err(bad("start.offsets", "name at least one partition offset"));
        }
        Some(Position::Offsets(o)) => Start::Offsets(partition_offsets(topics, o.offsets)?),
        Some(Position::Timestamp(t)) => match timestamp_ms(&t) {
            // Kafka reads -1, -2 and -3 as "latest", "earliest" and "the
            // newest timestamp", not as times.
            ms if ms < 0 => {
                return Err(bad(
                    "start.timestamp",
                    format!("{ms} ms is before 1970-01-01T00:00:00Z, where Kafka's times start"),
                ))
            }
            ms => Start::Timestamp(ms),
        },
    })
}

type ConsumeSender = StreamOut<pb::ConsumeResponse>;

/// Moves records from the consumer to the client until the client goes
/// away, `max_records` are sent, the server shuts down, or the caller's
/// credential is revoked or expires. The commits for what was delivered are
/// waited for before the client hears that the stream ended, so a client
/// that resumes at once resumes after those records.
async fn deliver(
    caller: Caller,
    (source, retired, removed): (String, CancellationToken, Arc<std::sync::atomic::AtomicBool>),
    mut records: Box<dyn crate::backend::topics::RecordStream>,
    auto_commit: bool,
    max_records: u64,
    tx: ConsumeSender,
    cut: CancellationToken,
) {
    let ends = Ends {
        caller: &caller,
        source: &source,
        cut: &cut,
        retired: &retired,
        removed: &removed,
        deadline: caller.deadline.map(|d| {
            let now = tokio::time::Instant::now();
            let margin = CONSUME_DEADLINE_MARGIN
                .min(d.saturating_duration_since(now) / 4)
                .max(LEAST_CONSUME_MARGIN);
            d.checked_sub(margin).unwrap_or(now).max(now)
        }),
    };
    let mut tally = super::Tally::default();
    let ended = pass_on(&ends, records.as_mut(), auto_commit, max_records, &tx, &mut tally).await;
    // The last commit waits for the broker (up to seconds, while the group
    // rebalances): not past the caller's deadline, which would cut the call
    // and what is on its way to the client.
    match caller.deadline {
        Some(d) => {
            let by = d.checked_sub(DEADLINE_MARGIN).unwrap_or(d);
            if tokio::time::timeout_at(by, records.close()).await.is_err() {
                tracing::warn!(
                    "a consumer's last commit did not finish before the call's deadline; \
                     the stream ends without waiting for it, and its group may read some records again"
                );
            }
        }
        None => records.close().await,
    }
    if let Err(e) = ended {
        tx.fail(e);
    }
    // The consumer is let go of (`close`: it leaves its group on the
    // blocking pool); the slots go once the last batches have left the buffer.
    tx.drained().await;
}

/// What ends a consumer's stream from outside: the caller's credential and
/// the server's shutdown (see [`super::stopped`]), the caller's deadline,
/// and a reload that points its source elsewhere or removes it.
struct Ends<'a> {
    caller: &'a Caller,
    source: &'a str,
    cut: &'a CancellationToken,
    /// The source's [`crate::tenant::Source::retired`] and `removed`.
    retired: &'a CancellationToken,
    removed: &'a std::sync::atomic::AtomicBool,
    /// When the stream ends itself, ahead of the caller's deadline.
    deadline: Option<tokio::time::Instant>,
}

/// How long before the caller's deadline a Consume ends itself (at most a
/// quarter of the time it has). A client cut by its deadline loses what was
/// on its way to it, which automatic commits have committed; ended by the
/// server first, it gets every record sent, then the status. Time for the
/// stream's last commit, which the status waits for.
const CONSUME_DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);
/// The least of it: the last commit gets until `DEADLINE_MARGIN` before the
/// deadline, and some time for it must be left.
const LEAST_CONSUME_MARGIN: std::time::Duration = std::time::Duration::from_millis(200);

impl Ends<'_> {
    async fn reached(&self) -> Error {
        tokio::select! {
            e = super::stopped(self.cut, &self.caller.revoked, self.caller.expires) => e,
            () = super::until(self.deadline) => Error::ConsumeDeadline,
            () = self.retired.cancelled() => {
                // A removed source is not found (as its topics are), one
                // pointed elsewhere can be read again at once.
                if self.removed.load(std::sync::atomic::Ordering::Acquire) {
                    BackendError::not_found("the source of this stream was removed (the configuration was reloaded)")
                        .into()
                } else {
                    Error::SourceRetired
                }
            }
        }
    }
}

/// The loop of [`deliver`]; the error, if any, the stream ends with.
async fn pass_on(
    ends: &Ends<'_>,
    records: &mut dyn crate::backend::topics::RecordStream,
    auto_commit: bool,
    max_records: u64,
    tx: &ConsumeSender,
    tally: &mut super::Tally,
) -> Result<(), Error> {
    let mut commits = auto_commit.then(|| tx.taken()).flatten().map(AutoCommit::new);
    let ended = pass_on_until_done(ends, records, &mut commits, (max_records, tally), tx).await;
    if ended.is_err() {
        // Decided: batches still buffered stay with the broker, uncommitted.
        tx.discard_buffered();
    }
    // What the transport took before the end was given to the client. A
    // stream that reached its end (max_records) waits for its last batches
    // to be taken; one whose client left or stopped reading, one cut
    // short, and a server stopping do not.
    match commits {
        Some(mut c) => {
            if matches!(ended, Ok(Ended::Complete)) {
                tokio::select! {
                    () = tx.taken_up_to(c.delivered) => {}
                    _ = super::stopped(ends.cut, &ends.caller.revoked, ends.caller.expires) => {}
                }
            }
            ended.and(c.commit_taken(records).map_err(Error::from))
        }
        None => ended.map(|_| ()),
    }
}

/// How a stream that ended without an error ended.
enum Ended {
    /// Every record it was to give (`max_records`), or the records ended.
    Complete,
    /// The client left, or stopped reading for the idle time.
    Gone,
}

/// Offsets of delivered batches, committed once the transport has taken the
/// batch from the stream's buffer: a batch still buffered when the call
/// ends (a cancel, a deadline, a client that stopped reading) never reached
/// the client, and its records must come again to the next consumer.
struct AutoCommit {
    taken: tokio::sync::watch::Receiver<u64>,
    delivered: u64,
    waiting: std::collections::VecDeque<(u64, Vec<PartitionOffset>)>,
}

impl AutoCommit {
    fn new(taken: tokio::sync::watch::Receiver<u64>) -> Self {
        AutoCommit {
            taken,
            delivered: 0,
            waiting: std::collections::VecDeque::new(),
        }
    }

    fn delivered(&mut self, next: Vec<PartitionOffset>) {
        self.delivered += 1;
        self.waiting.push_back((self.delivered, next));
    }

    /// Commits the offsets of every batch the transport has taken.
    fn commit_taken(
        &mut self,
        records: &mut dyn crate::backend::topics::RecordStream,
    ) -> std::result::Result<(), crate::backend::BackendError> {
        let taken = *self.taken.borrow_and_update();
        let mut next: Vec<PartitionOffset> = Vec::new();
        while self.waiting.front().is_some_and(|(n, _)| *n <= taken) {
            let Some((_, offsets)) = self.waiting.pop_front() else {
                break;
            };
            crate::backend::topics::merge_offsets(&mut next, offsets);
        }
        records.commit(next)
    }

    /// Completes when the transport takes a batch still waiting to be committed.
    async fn more_taken(commits: &mut Option<AutoCommit>) {
        match commits {
            Some(c) if !c.waiting.is_empty() => {
                if c.taken.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ => std::future::pending().await,
        }
    }
}

async fn pass_on_until_done(
    ends: &Ends<'_>,
    records: &mut dyn crate::backend::topics::RecordStream,
    commits: &mut Option<AutoCommit>,
    (max_records, tally): (u64, &mut super::Tally),
    tx: &ConsumeSender,
) -> Result<Ended, Error> {
    let (caller, source) = (ends.caller, ends.source);
    let mut sent = 0u64;
    let mut throttled = std::time::Duration::ZERO;
    loop {
        let batch = tokio::select! {
            b = records.next() => Some(b),
            () = tx.closed() => return Ok(Ended::Gone),
            e = ends.reached() => return Err(e),
            () = AutoCommit::more_taken(commits) => None,
        };
        let Some(batch) = batch else {
            if let Some(c) = commits.as_mut() {
                c.commit_taken(records)?;
            }
            continue;
        };
        let mut batch = match batch {
            None => return Ok(Ended::Complete),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(b)) => b,
        };
        if max_records > 0 {
            batch.truncate(usize::try_from(max_records - sent).unwrap_or(usize::MAX));
        }
        let bytes: usize = batch.iter().map(InRecord::size).sum();
        // A throttled tenant may wait long here: a revocation or a client
        // that left still ends the stream at once (the batch undelivered,
        // so uncommitted).
        throttled += tokio::select! {
            biased;
            e = ends.reached() => return Err(e),
            () = tx.closed() => return Ok(Ended::Gone),
            waited = caller.tenant.limiter.charge_records(batch.len() as u64, bytes as u64) => waited,
        };
        sent += batch.len() as u64;
        caller.tenant.count_returned(source, batch.len() as u64, bytes as u64);
        tally.add(batch.len() as u64, bytes as u64);
        let delivered = commits.is_some().then(|| crate::backend::topics::next_offsets(&batch));
        let response = pb::ConsumeResponse {
            records: batch.into_iter().map(in_record).collect(),
            throttled: Some(convert::duration(throttled)),
        };
        // Not delivered, not committed: a consumer that resumes gets these
        // records again. A client that stopped reading holds this wait until
        // its idle timeout; a revocation or a shutdown still ends it at once.
        let delivered_now = tokio::select! {
            biased;
            e = ends.reached() => return Err(e),
            sent = tx.deliver(response) => sent,
        };
        if !delivered_now {
            return Ok(Ended::Gone);
        }
        if let (Some(c), Some(delivered)) = (commits.as_mut(), delivered) {
            c.delivered(delivered);
            c.commit_taken(records)?;
        }
        if max_records > 0 && sent >= max_records {
            return Ok(Ended::Complete);
        }
    }
}

#[tonic::async_trait]
impl StreamService for StreamApi {
    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> std::result::Result<Response<pb::ProduceResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        if r.records.len() > MAX_RECORDS {
            return Err(bad(
                "records",
                format!("{} records; send at most {MAX_RECORDS} per call", r.records.len()),
            )
            .into());
        }
        let topics = topics_of(&caller, &r.source)?;
        check_topic(topics.as_ref(), &r.topic)?;
        super::record_object(&r.topic);
        // The tenant's limit, or what the source's producer can send, if less.
        let limit = caller.tenant.limits.max_record_bytes.min(topics.max_record_bytes());
        let records = r
            .records
            .into_iter()
            .enumerate()
            .map(|(index, record)| out_record(index, record))
            .collect::<Result<Vec<_>>>()?;
        let mut bytes = 0u64;
        for (index, record) in records.iter().enumerate() {
            let size = record.size();
            if size as u64 > limit {
                return Err(Error::RecordTooLarge { index, size, limit }.into());
            }
            bytes += size as u64;
        }
        // The tenant's record rate first: a tenant waiting out its own
        // throttle must not hold gateway-wide slots other tenants need. The
        // wait ends at the caller's deadline (answered before the client's
        // own timer with why) or its revocation; what it booked and did not
        // use is at most a second's worth (see `CostBucket::take`).
        // An unknown priority is refused before the rate is charged.
        let priority = Gate::priority(r.options.as_ref())?;
        let (started, left) = (tokio::time::Instant::now(), super::deadline_left(&caller));
        let throttled = tokio::select! {
            biased;
            e = super::stopped(&self.cut, &caller.revoked, caller.expires) => return Err(e.into()),
            waited = caller.tenant.limiter.charge_records(records.len() as u64, bytes) => waited,
            () = super::until(left.map(|left| started + left)) => {
                return Err(Error::ThrottledPastDeadline(started.elapsed()).into())
            }
        };
        let _admitted = self.gate.admit(&caller, priority).await?;
        let acks = topics.produce(&r.topic, records, super::deadline_left(&caller)).await?;
        Ok(Response::new(pb::ProduceResponse {
            acks: acks
                .into_iter()
                .map(|a| pb::RecordAck {
                    partition: a.partition,
                    offset: a.offset,
                })
                .collect(),
            throttled: Some(convert::duration(throttled)),
        }))
    }

    type ConsumeStream = StreamIn<pb::ConsumeResponse>;

    async fn consume(
        &self,
        request: Request<pb::ConsumeRequest>,
    ) -> std::result::Result<Response<Self::ConsumeStream>, Status> {
        let caller = caller(&request)?;
        let slot = super::slot_until_end(&request);
        let r = request.into_inner();
        let (topics, retired, removed) = {
            let source = source(&caller, &r.source)?;
            let topics = source.backend.topics()?.clone();
            (topics, source.retired.clone(), source.removed.clone())
        };
        if r.topics.is_empty() {
            return Err(bad("topics", "name at least one topic").into());
        }
        if r.topics.len() > MAX_TOPICS {
            return Err(bad("topics", format!("name at most {MAX_TOPICS} topics")).into());
        }
        for (i, t) in r.topics.iter().enumerate() {
            check_topic(topics.as_ref(), t)?;
            if r.topics[..i].contains(t) {
                return Err(bad("topics", format!("topic \"{t}\" is named twice")).into());
            }
        }
        super::record_object(&r.topics.join(","));
        let spec = ConsumeSpec {
            topics: r.topics,
            group: group_id(&caller, &r.group)?,
            start: start(topics.as_ref(), r.start)?,
        };
        let auto_commit = match pb::CommitMode::try_from(r.commit_mode) {
            // A replay from explicit offsets or a time reads outside the
            // group: committing its offsets by default would move a group
            // whose members are away past records they never processed.
            Ok(pb::CommitMode::Unspecified) => matches!(spec.start, Start::Earliest | Start::Latest),
            Ok(pb::CommitMode::Automatic) => true,
            Ok(pb::CommitMode::Manual) => false,
            Err(_) => return Err(bad("commit_mode", format!("unknown commit mode {}", r.commit_mode)).into()),
        };
        let permit = caller.tenant.limiter.admit_consumer()?;
        let records = topics.consume(spec).await?;
        let (tx, rx) = StreamOut::counted(CONSUME_BUFFER, self.stream_idle);
        let cut = self.cut.clone();
        let task = async move {
            let _slots = (permit, slot);
            let _active = caller.tenant.metrics.stream_started();
            deliver(
                caller,
                (r.source, retired, removed),
                records,
                auto_commit,
                r.max_records,
                tx,
                cut,
            )
            .await;
        };
        // In the call's span: what it logs names the tenant and the call.
        tokio::spawn(tracing::Instrument::in_current_span(task));
        Ok(Response::new(rx))
    }

    async fn commit_offsets(
        &self,
        request: Request<pb::CommitOffsetsRequest>,
    ) -> std::result::Result<Response<pb::CommitOffsetsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let topics = topics_of(&caller, &r.source)?;
        let group = group_id(&caller, &r.group)?;
        if r.offsets.is_empty() {
            return Err(bad("offsets", "name at least one partition offset").into());
        }
        let offsets = partition_offsets(topics.as_ref(), r.offsets)?;
        // Each may build a Kafka client and hold a blocking thread: counted
        // against the gateway's concurrency like every other call. The
        // caller is answered within its time (librdkafka's synchronous
        // commit waits for a coordinator without end); the source bounds
        // how many commits may still wait after their callers were answered.
        let _admitted = self.gate.admit(&caller, Priority::default()).await?;
        let limit = super::statement_timeout(&caller);
        match tokio::time::timeout(limit, topics.commit(&group, offsets)).await {
            Ok(committed) => committed?,
            Err(_) => {
                return Err(Error::from(BackendError::Unavailable(format!(
                    "the Kafka cluster did not confirm the commit within {limit:?}; \
                     committing the same offsets again is safe"
                )))
                .into())
            }
        }
        Ok(Response::new(pb::CommitOffsetsResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> std::result::Result<Response<pb::ListTopicsResponse>, Status> {
        let caller = caller(&request)?;
        let topics = topics_of(&caller, &request.get_ref().source)?;
        let _admitted = self.gate.admit(&caller, Priority::default()).await?;
        let listed = topics.list_topics().await?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: listed
                .into_iter()
                .map(|t| pb::TopicInfo {
                    name: t.name,
                    partitions: t
                        .partitions
                        .into_iter()
                        .map(|p| pb::PartitionInfo {
                            partition: p.id,
                            leader: p.leader,
                            replicas: p.replicas,
                            low_watermark: p.low,
                            high_watermark: p.high,
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    type WatchChangesStream = StreamIn<pb::WatchChangesResponse>;

    async fn watch_changes(
        &self,
        request: Request<Streaming<pb::WatchChangesRequest>>,
    ) -> std::result::Result<Response<Self::WatchChangesStream>, Status> {
        let rx = changes::watch(request, &self.changes, self.cut.clone(), self.stream_idle).await?;
        Ok(Response::new(rx))
    }

    async fn delete_subscription(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> std::result::Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        changes::delete(request).await?;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_times_convert_both_ways() {
        let t = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_000_000,
        };
        let ms = timestamp_ms(&t);
        assert_eq!(ms, 1_700_000_000_123);
        let back = in_record(InRecord {
            topic: "t".into(),
            partition: 0,
            offset: 1,
            assignment: 0,
            timestamp_ms: Some(ms),
            key: None,
            value: Some(b"v".to_vec()),
            headers: vec![("h".into(), Some(b"1".to_vec())), ("n".into(), None)],
        });
        assert_eq!(back.timestamp, Some(t));
        assert!(back.key.is_empty() && back.null_key && !back.null_value);
        let nulls: Vec<_> = back
            .headers
            .iter()
            .map(|h| (h.value.as_slice(), h.null_value))
            .collect();
        assert_eq!(nulls, [(&b"1"[..], false), (&b""[..], true)]);
    }

    #[test]
    fn empty_keys_mean_no_key_and_null_values_are_asked_for() {
        let record = |value: &[u8], null_value| pb::ProducerRecord {
            key: vec![],
            value: value.to_vec(),
            null_value,
            ..Default::default()
        };
        let r = out_record(0, record(b"x", false)).expect("a record");
        assert_eq!((r.key, r.value), (None, Some(b"x".to_vec())));
        let empty = out_record(0, record(b"", false)).expect("an empty value");
        assert_eq!(empty.value, Some(vec![]));
        let tombstone = out_record(0, record(b"", true)).expect("a tombstone");
        assert_eq!(tombstone.value, None);
        let both = out_record(3, record(b"x", true)).expect_err("a value and null_value");
        assert!(both.to_string().contains("record 3"), "{both}");
    }

    #[test]
    fn null_header_values_are_asked_for_and_kept_apart_from_empty_ones() {
        let header = |value: &[u8], null_value| pb::RecordHeader {
            key: "h".into(),
            value: value.to_vec(),
            null_value,
        };
        let record = |headers| pb::ProducerRecord {
            headers,
            ..Default::default()
        };
        let r = out_record(0, record(vec![header(b"", false), header(b"", true)])).expect("a record");
        assert_eq!(r.headers, [("h".to_string(), Some(vec![])), ("h".to_string(), None)]);
        let both = out_record(2, record(vec![header(b"x", true)])).expect_err("a value and null_value");
        assert!(both.to_string().contains("record 2's header"), "{both}");
    }
}

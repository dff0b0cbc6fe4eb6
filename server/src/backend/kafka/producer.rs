//! The source's producer, whose delivery reports one thread serves.
//!
//! Not rdkafka's `FutureProducer`: its thread waits at most 100 ms per poll
//! and then, its remaining wait rounded down to 0 ms, spins through the last
//! millisecond of each: about 1 % of a core per idle Kafka source. This one
//! waits up to a second, so that cost is a tenth; a report is handled as soon
//! as it arrives either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

/// Longest wait of one poll: also how long the thread outlives its producer.
const POLL_WAIT: Duration = Duration::from_secs(1);
/// Pause before queueing again when librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);
/// The report of a record whose answer did not come by the call's deadline
/// (it is still in flight: the broker may write it).
pub const LATE: KafkaError = KafkaError::MessageProduction(RDKafkaErrorCode::OperationTimedOut);

/// Where the broker stored a record.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
}

type Report = oneshot::Sender<KafkaResult<Delivery>>;

/// Hands each delivery report to the call that produced the record.
pub struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Report>;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Box<Report>) {
        let outcome = match result {
            Ok(m) => Ok(Delivery {
                partition: m.partition(),
                offset: m.offset(),
            }),
            Err((e, _)) => Err(e.clone()),
        };
        // The call may have gone away; the record is stored all the same.
        let _ = report.send(outcome);
    }
}

/// What one record carries.
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub partition: Option<i32>,
    pub timestamp: Option<i64>,
    pub headers: Option<OwnedHeaders>,
}

pub struct Producer {
    inner: Arc<BaseProducer<Deliveries>>,
    stop: Arc<AtomicBool>,
}

impl Producer {
    pub fn new(config: &ClientConfig) -> KafkaResult<Self> {
        let inner = Arc::new(config.create_with_context::<_, BaseProducer<Deliveries>>(Deliveries)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (inner.clone(), stop.clone());
        std::thread::Builder::new()
            .name("weir-kafka-poll".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    polled.poll(POLL_WAIT);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("cannot start the delivery thread: {e}")))?;
        Ok(Self { inner, stop })
    }

    /// For metadata and watermark lookups.
    pub fn client(&self) -> &Client<Deliveries> {
        self.inner.client()
    }

    /// Queues the records in their order, then waits for the broker's
    /// answer to each. A full queue is waited on (up to `queue_timeout` per
    /// record, and never past `answer_by`) before the next record is queued:
    /// queueing them all at once, the records retried after a full queue
    /// could go out in any order. Once one record waited in vain, or was
    /// refused, the rest are not queued. Answers that do not come by
    /// `answer_by` are [`LATE`].
    pub async fn send_all<'a>(
        &self,
        records: impl IntoIterator<Item = Record<'a>>,
        queue_timeout: Duration,
        answer_by: Option<Instant>,
    ) -> Vec<KafkaResult<Delivery>> {
        let mut reports = Vec::new();
        let mut stuck: Option<KafkaError> = None;
        for record in records {
            let queued = match &stuck {
                Some(e) => Err(e.clone()),
                None => {
                    let give_up = Instant::now() + queue_timeout;
                    self.queue(record, answer_by.map_or(give_up, |at| at.min(give_up)))
                        .await
                }
            };
            // Any record refused before it was queued (a full queue, a size
            // over librdkafka's message.max.bytes) stops the rest: sent after
            // it, they would overtake it once the caller sent it again.
            if let Err(e) = &queued {
                stuck.get_or_insert_with(|| e.clone());
            }
            reports.push(queued);
        }
        // librdkafka reports every queued record, if only as purged when the producer goes.
        let answers = reports.into_iter().map(|queued| async move {
            let report = queued?;
            let answer = match answer_by {
                Some(at) => tokio::time::timeout_at(at.into(), report).await.map_err(|_| LATE)?,
                None => report.await,
            };
            answer.unwrap_or(Err(KafkaError::Canceled))
        });
        futures::future::join_all(answers).await
    }

    /// Queues one record, waiting while the queue is full until `give_up`;
    /// returns where its report will arrive. A record is queued or refused whole.
    async fn queue(
        &self,
        record: Record<'_>,
        give_up: Instant,
    ) -> KafkaResult<oneshot::Receiver<KafkaResult<Delivery>>> {
        let (tx, rx) = oneshot::channel();
        let mut base: BaseRecord<'_, [u8], [u8], Box<Report>> = BaseRecord::with_opaque_to(record.topic, Box::new(tx));
        base.key = record.key;
        base.payload = record.payload;
        base.partition = record.partition;
        base.timestamp = record.timestamp;
        base.headers = record.headers;
        loop {
            match self.inner.send(base) {
                Ok(()) => return Ok(rx),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) if Instant::now() < give_up => {
                    base = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The thread ends within POLL_WAIT and drops the last reference,
        // which purges what is still queued.
        self.stop.store(true, Ordering::Relaxed);
    }
}

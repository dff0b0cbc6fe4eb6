//! gRPC services: proto requests become validated domain calls on the
//! caller's own sources; engines are reached only through backend traits.

mod arrow_ipc;
pub mod bulk;
pub mod changes;
pub mod convert;
pub mod query;
pub mod schema;
pub mod stream;
pub mod transactions;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};
use weir_proto::v1 as pb;

use crate::config::Priority;
use crate::error::Error;
use crate::limits::scheduler::{Scheduler, Slot};
use crate::limits::DEADLINE_MARGIN;
use crate::tenant::{Caller, Source};
use crate::transport::auth::CallSlot;

/// Whether a client message's read failed because the transport refused the
/// message (too large, or not decodable), not because the client went away
/// or reset the call: the caller is to hear of it as `Error::BadMessage`.
fn refused_by_transport(status: &Status) -> bool {
    match status.code() {
        // Over `max_request_bytes` as sent, or once decompressed.
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => true,
        // Answered as INVALID_ARGUMENT by the transport.
        tonic::Code::Internal => crate::transport::auth::is_decode_failure(status.message()),
        _ => false,
    }
}

/// A request field the caller must change.
fn bad(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field,
        message: message.into(),
    }
}

/// The gateway-wide slots every data call takes before it reaches a backend.
#[derive(Clone)]
pub struct Gate {
    scheduler: Arc<Scheduler>,
    /// The root of every credential's revocation token (see [`stopped`]).
    cut: CancellationToken,
}

/// A call's gateway slot and how long it waited for it and for its turn at the tenant's rate.
pub struct Admitted {
    _slot: Slot,
    pub queued: Duration,
}

impl Gate {
    pub fn new(scheduler: Arc<Scheduler>, cut: CancellationToken) -> Self {
        Self { scheduler, cut }
    }

    /// The priority a call asks for. Calls that take a cap of their own
    /// before their gateway slot check it first: a request that can never
    /// succeed is INVALID_ARGUMENT, not a limit to retry after.
    pub fn priority(options: Option<&pb::RequestOptions>) -> Result<Priority, Error> {
        match options.map(|o| pb::Priority::try_from(o.priority)) {
            Some(Ok(pb::Priority::Low)) => Ok(Priority::Low),
            Some(Ok(pb::Priority::High)) => Ok(Priority::High),
            Some(Ok(pb::Priority::Medium)) => Ok(Priority::Medium),
            None | Some(Ok(pb::Priority::Unspecified)) => Ok(Priority::default()),
            Some(Err(_)) => Err(Error::InvalidArgument {
                field: "options.priority",
                message: "unknown priority; use LOW, MEDIUM or HIGH".into(),
            }),
        }
    }

    /// Waits for a slot at the call's priority (read by [`Self::priority`]
    /// before any cap or throttle, so that a call that could never run is
    /// told so first), lowered to the tenant's maximum.
    pub async fn admit(&self, caller: &Caller, priority: Priority) -> Result<Admitted, Error> {
        let priority = priority.min(caller.tenant.limits.max_priority);
        let started = std::time::Instant::now();
        let wait = self
            .scheduler
            .acquire(&caller.tenant.id, caller.tenant.limits.weight, priority);
        // A caller's deadline that comes before `max_queue_wait` ends the
        // wait, answered by the gateway (and counted), not cut by the
        // transport's timer with a bare CANCELLED.
        let slot = async {
            match deadline_left(caller) {
                Some(left) => tokio::time::timeout(left, wait)
                    .await
                    .unwrap_or_else(|_| Err(Error::QueuedPastDeadline(started.elapsed()))),
                None => wait.await,
            }
        };
        // A credential revoked (or expired) while its call queued is refused
        // before the call reaches a source, as one waiting for its rate is.
        // The slot first: a free one is taken without a waiter on the stop
        // (this is every call's path), then the stop is checked once more.
        let slot = tokio::select! {
            biased;
            slot = slot => slot,
            e = stopped(&self.cut, &caller.revoked, caller.expires) => return Err(e),
        };
        if let Some(e) = stop_due(&self.cut, &caller.revoked, caller.expires) {
            return Err(e);
        }
        if let Err(e) = &slot {
            crate::limits::admission::count_rejection(caller, e);
        }
        Ok(Admitted {
            _slot: slot?,
            queued: caller.rate_wait + started.elapsed(),
        })
    }
}

/// The caller the auth layer attached; its absence is an authentication failure.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Error> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(Error::Unauthenticated)
}

/// Gives back the call's concurrency slot when dropped: held by the task of
/// a server stream, whose end frees the slot even while the client keeps
/// the response open without reading it (see [`CallSlot`]).
pub struct SlotUntilEnd(Option<CallSlot>);

impl Drop for SlotUntilEnd {
    fn drop(&mut self) {
        if let Some(slot) = &self.0 {
            slot.release();
        }
    }
}

/// The call's concurrency slot, to be held by the task that feeds its stream.
pub fn slot_until_end<T>(request: &Request<T>) -> SlotUntilEnd {
    SlotUntilEnd(request.extensions().get::<CallSlot>().cloned())
}

/// One of the caller's sources; unknown and foreign names get the same answer.
pub fn source(caller: &Caller, name: &str) -> Result<Arc<Source>, Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument {
            field: "source",
            message: "a source name is required".into(),
        });
    }
    let source = caller
        .tenant
        .source(name)
        .ok_or_else(|| Error::SourceNotFound(name.to_string()))?;
    name_on_span(name, &source);
    Ok(source)
}

/// Names the source and its engine on the call's span.
pub fn record_source(caller: &Caller, name: &str) {
    if let Some(source) = caller.tenant.source(name) {
        name_on_span(name, &source);
    }
}

fn name_on_span(name: &str, source: &Source) {
    record_pair(("source", &name), ("engine", &source.backend.engine().name()));
}

/// Rows (records, change events) and bytes a stream returned, put on its
/// call's span when the tally is dropped, at the stream's end (before the
/// stream's sender, so before the status and the call's audit line): once,
/// since a trace exporter keeps every value a field is given.
#[derive(Default)]
pub struct Tally {
    rows: u64,
    bytes: u64,
}

impl Tally {
    pub fn add(&mut self, rows: u64, bytes: u64) {
        self.rows += rows;
        self.bytes += bytes;
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        record_pair(
            ("rows", &i64::try_from(self.rows).unwrap_or(i64::MAX)),
            ("bytes", &i64::try_from(self.bytes).unwrap_or(i64::MAX)),
        );
    }
}

/// Records two fields of the call's span in one pass through the
/// subscriber's layers (each pass costs about as much as formatting them).
/// The span is named by id: `Span::current()` would take a reference to it
/// and give it back, two more passes.
pub fn record_pair(first: (&str, &dyn tracing::Value), second: (&str, &dyn tracing::Value)) {
    tracing::dispatcher::get_default(|dispatch| {
        let current = dispatch.current_span();
        let (Some(id), Some(metadata)) = (current.id(), current.metadata()) else {
            return;
        };
        let fields = metadata.fields();
        if let (Some(a), Some(b)) = (fields.field(first.0), fields.field(second.0)) {
            let values = [(&a, Some(first.1)), (&b, Some(second.1))];
            dispatch.record(id, &tracing::span::Record::new(&fields.value_set(&values)));
        }
    });
}

/// The sending side of a server stream. It gives up on a client that takes
/// nothing for `idle`: a stalled reader must not hold a statement, a
/// connection and buffered rows for ever. Errors that end the stream are
/// kept aside and follow the buffered messages, so ending never blocks on
/// a full buffer and a stream cut short never ends with OK.
pub struct StreamOut<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    /// The receiving end, to drop the buffered messages of a stalled stream.
    rx: Buffered<T>,
    last: Arc<Mutex<Option<Status>>>,
    idle: Duration,
    /// With [`StreamOut::counted`]: how many messages the transport took.
    taken: Option<watch::Receiver<u64>>,
}

/// A stream's buffer of messages, shared by both sides (see [`StreamOut::send`]).
type Buffered<T> = Arc<Mutex<Option<mpsc::Receiver<Result<T, Status>>>>>;

/// The response side of a [`StreamOut`]: its messages, then its closing error, if any.
pub struct StreamIn<T> {
    rx: Buffered<T>,
    last: Arc<Mutex<Option<Status>>>,
    /// Messages the transport has taken from the buffer, for a counted stream only.
    taken: Option<watch::Sender<u64>>,
}

impl<T> StreamOut<T> {
    pub fn channel(buffer: usize, idle: Duration) -> (StreamOut<T>, StreamIn<T>) {
        Self::build(buffer, idle, None)
    }

    /// A channel that also counts the messages the transport has taken
    /// (see [`StreamOut::taken`]); the other streams do without the cost.
    pub fn counted(buffer: usize, idle: Duration) -> (StreamOut<T>, StreamIn<T>) {
        let (sender, receiver) = watch::channel(0);
        Self::build(buffer, idle, Some((sender, receiver)))
    }

    fn build(
        buffer: usize,
        idle: Duration,
        taken: Option<(watch::Sender<u64>, watch::Receiver<u64>)>,
    ) -> (StreamOut<T>, StreamIn<T>) {
        let (tx, rx) = mpsc::channel(buffer);
        let rx = Arc::new(Mutex::new(Some(rx)));
        let last = Arc::new(Mutex::new(None));
        let (counter, taken) = taken.unzip();
        (
            StreamOut {
                tx,
                rx: rx.clone(),
                last: last.clone(),
                idle,
                taken,
            },
            StreamIn {
                rx,
                last,
                taken: counter,
            },
        )
    }

    /// How many messages the transport has taken from the buffer so far
    /// (a [`StreamOut::counted`] stream's): those sent and not yet taken
    /// never reached the client if the call ends now (a cancel, a deadline).
    pub fn taken(&self) -> Option<watch::Receiver<u64>> {
        self.taken.clone()
    }

    /// `Ok(true)` when sent, `Ok(false)` when the client has gone, and
    /// `Err` when the client took nothing for the idle time.
    /// A stalled stream's buffered messages are dropped at once: the
    /// client that stopped reading may keep its connection (and this
    /// stream) open for ever, and would keep them in memory, with no slot
    /// of its tenant held any more. It reads the error next.
    pub async fn send(&self, item: T) -> Result<bool, Error> {
        match tokio::time::timeout(self.idle, self.tx.send(Ok(item))).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(_)) => Ok(false),
            Err(_) => {
                // The error first: a stream found without its buffer ends with what `last` holds.
                self.fail(Error::StreamStalled(self.idle));
                self.rx.lock().take();
                Err(Error::StreamStalled(self.idle))
            }
        }
    }

    /// Sends `item`; `false` when the stream is over (the client went away,
    /// or stopped reading, which then ends the stream with STREAM_STALLED).
    pub async fn deliver(&self, item: T) -> bool {
        match self.send(item).await {
            Ok(sent) => sent,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Waits until the transport has taken `sent` messages, the client has
    /// gone, or it took none for the idle time.
    pub async fn taken_up_to(&self, sent: u64) {
        let Some(mut taken) = self.taken.clone() else {
            return;
        };
        while *taken.borrow_and_update() < sent {
            tokio::select! {
                changed = tokio::time::timeout(self.idle, taken.changed()) => {
                    if !matches!(changed, Ok(Ok(()))) {
                        return;
                    }
                }
                () = self.tx.closed() => return,
            }
        }
    }

    /// Drops the messages buffered and not yet taken by the transport; the
    /// stream stays open for what comes next (its closing error). Once a
    /// consumer's end is decided, records it has not handed over stay with
    /// the broker: an auto-committing one would not commit them, and a
    /// revoked caller must not be given them.
    pub fn discard_buffered(&self) {
        if let Some(rx) = self.rx.lock().as_mut() {
            while rx.try_recv().is_ok() {}
        }
    }

    /// Ends the stream with `error`, after the messages already buffered.
    pub fn fail(&self, error: impl Into<Status>) {
        *self.last.lock() = Some(error.into());
    }

    /// Completes when the client has gone.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Waits until the transport has taken every message buffered: true
    /// then, false when the client went away or took nothing for the idle
    /// time first (its messages are then dropped and the stream ends
    /// STREAM_STALLED, unless it already holds its error). A slow client
    /// that keeps taking messages is waited for, as `send` waits for it. A
    /// stream's task waits for this before it gives its slots back (its
    /// last messages, up to a buffer's worth, megabytes, stay in memory
    /// until then), and a write's own transaction before it commits.
    pub async fn drained(&self) -> bool {
        let all = self.tx.max_capacity();
        loop {
            let free = self.tx.capacity();
            if free >= all {
                return true;
            }
            // One more free slot than now: one more message taken.
            match tokio::time::timeout(self.idle, self.tx.reserve_many(free + 1)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return false,
                Err(_) => {
                    self.last
                        .lock()
                        .get_or_insert_with(|| Error::StreamStalled(self.idle).into());
                    self.rx.lock().take();
                    return false;
                }
            }
        }
    }
}

/// The client has gone: the buffer goes with it, which tells the sender
/// (its `send` fails, `closed` completes).
impl<T> Drop for StreamIn<T> {
    fn drop(&mut self) {
        self.rx.lock().take();
    }
}

impl<T> Stream for StreamIn<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut rx = self.rx.lock();
        let polled = match rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        };
        match polled {
            Poll::Ready(None) => {
                drop(rx);
                Poll::Ready(self.last.lock().take().map(Err))
            }
            Poll::Ready(Some(item)) => {
                // Counted under the buffer's lock: a message taken is either
                // counted or still there for `discard_buffered`.
                if let Some(taken) = &self.taken {
                    taken.send_modify(|n| *n += 1);
                }
                Poll::Ready(Some(item))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Completes at `at`; never without one.
pub async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Completes with the reason a call in progress must stop: the shutdown
/// grace period is over (`ShuttingDown`: `cut`, the registry's root token,
/// is cancelled), a reload revoked the credential the call was made with
/// (`Revoked`), or the credential's validity ended (`CredentialExpired`: a
/// JWT's `exp`). Never completes otherwise. One token to wait on for the
/// first two: every credential's token is a child of `cut`.
pub async fn stopped(
    cut: &CancellationToken,
    revoked: &CancellationToken,
    expires: Option<tokio::time::Instant>,
) -> Error {
    tokio::select! {
        biased;
        () = revoked.cancelled() => revocation(cut),
        () = until(expires) => Error::CredentialExpired,
    }
}

/// The reason of [`stopped`], if it is already due, for a call that waited
/// without watching for it (for its turn at the tenant's rate).
pub fn stop_due(
    cut: &CancellationToken,
    revoked: &CancellationToken,
    expires: Option<tokio::time::Instant>,
) -> Option<Error> {
    if revoked.is_cancelled() {
        return Some(revocation(cut));
    }
    expires
        .filter(|at| *at <= tokio::time::Instant::now())
        .map(|_| Error::CredentialExpired)
}

/// What a cancelled revocation token means: `cut`, the root of every
/// credential's token, is cancelled at the end of the shutdown grace.
fn revocation(cut: &CancellationToken) -> Error {
    if cut.is_cancelled() {
        Error::ShuttingDown
    } else {
        Error::Revoked
    }
}

/// `work`, or the reason it was [`stopped`]. Dropping the work cancels its
/// statement in the engine while the runtime still runs; left alone at
/// shutdown, the process would exit under it and the statement run on.
pub async fn until_stopped<T>(
    cut: &CancellationToken,
    revoked: &CancellationToken,
    expires: Option<tokio::time::Instant>,
    work: impl std::future::Future<Output = T>,
) -> Result<T, Error> {
    tokio::select! {
        // The stop first: a call revoked while it waited for its turn must
        // not start its statement.
        biased;
        e = stopped(cut, revoked, expires) => Err(e),
        out = work => Ok(out),
    }
}

/// The table as the caller named it, for receipts, messages and the audit log.
pub fn display_table(schema: Option<&str>, table: &str) -> String {
    match schema {
        Some(s) => format!("{s}.{table}"),
        None => table.to_string(),
    }
}

/// Names the table(s) or topic(s) a call works on, for its span and audit line.
/// Records the call's object (table, topic) on its span, cut short: the
/// name is the caller's, of any length up to `max_request_bytes`, and would
/// be carried (escaped) by every line of the call and its audit line.
pub fn record_object(name: &str) {
    tracing::Span::current().record("object", crate::telemetry::cut(name, SHOWN_OBJECT_BYTES));
}

const SHOWN_OBJECT_BYTES: usize = 256;

/// Checks a caller-chosen name (consumer group, subscription): 1 to `max`
/// characters of A-Z, a-z, 0-9, '.', '_' and '-', so it is safe in every
/// engine's namespace.
pub fn check_plain_name(field: &'static str, name: &str, max: usize) -> Result<(), Error> {
    let plain = !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        return Err(Error::InvalidArgument {
            field,
            message: format!("1-{max} characters of A-Z, a-z, 0-9, '.', '_' and '-'"),
        });
    }
    Ok(())
}

/// The time the gateway has left to answer before the caller's deadline
/// (`grpc-timeout`), less the margin. The transport's timer runs from the
/// call's arrival, through its waits for a turn at the tenant's rate and
/// for a gateway slot: a service timer set for more would fire after the
/// transport or the client cut the call with a bare CANCELLED or
/// DEADLINE_EXCEEDED (and a load's engine would go on to commit).
fn deadline_left(caller: &Caller) -> Option<Duration> {
    caller.deadline.map(|d| {
        d.saturating_duration_since(tokio::time::Instant::now())
            .saturating_sub(DEADLINE_MARGIN)
    })
}

/// The time a statement may take from now, once admitted: the tenant's
/// limit, or what is left of the caller's deadline if sooner.
pub fn statement_timeout(caller: &Caller) -> Duration {
    let limit = caller.tenant.limits.statement_timeout;
    deadline_left(caller).map_or(limit, |d| d.min(limit))
}

//! Change streams, engine-independent: what a subscription asks for and
//! what an engine's change feed yields. Engines run the feed on a task of
//! their own and advance their retention point (replication slot, stored
//! binlog position) only to positions the client acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::backend::{BackendError, Column, Row, Value};

/// A table as the caller named it; `schema` empty means the source's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub table: String,
}

/// An engine's position in its change log. Engines encode positions so that
/// byte order is stream order: the service compares them without knowing
/// the engine (an acknowledgement may not run ahead of what was delivered).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(pub Vec<u8>);

impl Position {
    /// Big-endian fields of the given byte widths (at most 8 each), so that
    /// byte order is the order of the field tuple.
    pub fn pack<const N: usize>(widths: [usize; N], fields: [u64; N]) -> Position {
        let mut out = Vec::with_capacity(widths.iter().sum());
        for (width, field) in widths.into_iter().zip(fields) {
            out.extend_from_slice(&field.to_be_bytes()[8 - width..]);
        }
        Position(out)
    }

    /// The fields `pack` wrote, or `None` for bytes of another length.
    pub fn unpack<const N: usize>(&self, widths: [usize; N]) -> Option<[u64; N]> {
        if self.0.len() != widths.iter().sum::<usize>() {
            return None;
        }
        let mut out = [0u64; N];
        let mut at = 0;
        for (slot, width) in out.iter_mut().zip(widths) {
            *slot = self.0[at..at + width]
                .iter()
                .fold(0, |acc, b| (acc << 8) | u64::from(*b));
            at += width;
        }
        Some(out)
    }
}

/// Checks a resume position against what the subscription has acknowledged
/// (`acked`, shown as `acked_text`; earlier changes are no longer retained)
/// and, where the engine can tell, what the database has written (`head`).
pub fn check_resume<P: PartialOrd>(
    subscription: &str,
    resume: &P,
    acked: &P,
    acked_text: &str,
    head: Option<&P>,
) -> Result<(), BackendError> {
    if resume < acked {
        return Err(BackendError::PositionNotRetained(format!(
            "the position is before what subscription \"{subscription}\" has acknowledged ({acked_text}); \
             those changes are no longer retained; resume without a position to continue from there"
        )));
    }
    if head.is_some_and(|h| resume > h) {
        return Err(BackendError::Invalid(
            "the resume position is ahead of the database".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Unique per tenant and subscription, and safe as an engine identifier
    /// (slot, publication, lock and state-row name): `[a-z0-9_]`, at most 63 bytes.
    pub id: String,
    /// The subscription's name as the caller gave it, for messages.
    pub name: String,
    pub tables: Vec<TableName>,
    /// Deliver only what comes after this position.
    pub resume: Option<Position>,
    pub snapshot: bool,
    pub take_over: bool,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    Insert,
    Update,
    Delete,
    SnapshotRead,
    Truncate,
}

/// One changed row (or, for `Truncate`, one emptied table).
#[derive(Debug, Clone)]
pub struct RowChange {
    pub op: ChangeOp,
    pub schema: String,
    pub table: String,
    pub columns: Arc<[Column]>,
    /// The old row, where the engine provides it.
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// Columns of `after` left unchanged whose value the engine did not
    /// send (NULL in `after`, which does not mean NULL).
    pub unchanged: Vec<String>,
    pub primary_key: Arc<[String]>,
    pub txid: String,
    pub commit_time: Option<DateTime<Utc>>,
    pub position: Position,
}

impl RowChange {
    /// Bytes its rows' values hold in memory, roughly.
    pub fn size(&self) -> usize {
        let row = |r: &Option<Row>| r.as_ref().map_or(0, |r| r.iter().map(Value::size).sum::<usize>());
        row(&self.before) + row(&self.after) + self.unchanged.iter().map(String::len).sum::<usize>()
    }
}

/// What every row of one table's snapshot shares.
pub struct SnapshotTable {
    pub schema: String,
    pub table: String,
    pub columns: Arc<[Column]>,
    pub primary_key: Arc<[String]>,
    /// Where streaming continues once the snapshot is read.
    pub position: Position,
}

impl SnapshotTable {
    pub fn row(&self, values: Row) -> ChangeItem {
        ChangeItem::Change(RowChange {
            op: ChangeOp::SnapshotRead,
            schema: self.schema.clone(),
            table: self.table.clone(),
            columns: self.columns.clone(),
            before: None,
            after: Some(values),
            unchanged: Vec::new(),
            primary_key: self.primary_key.clone(),
            txid: String::new(),
            commit_time: None,
            position: self.position.clone(),
        })
    }
}

#[derive(Debug, Clone)]
pub enum ChangeItem {
    Begin {
        txid: String,
        commit_time: Option<DateTime<Utc>>,
        position: Position,
    },
    Change(RowChange),
    Commit {
        txid: String,
        commit_time: Option<DateTime<Utc>>,
        position: Position,
        events: u64,
    },
    /// Nothing to report up to `position`; acknowledging it lets the engine
    /// release the log it retains for quiet tables.
    Heartbeat {
        position: Position,
    },
}

impl ChangeItem {
    pub fn position(&self) -> &Position {
        match self {
            ChangeItem::Begin { position, .. }
            | ChangeItem::Commit { position, .. }
            | ChangeItem::Heartbeat { position } => position,
            ChangeItem::Change(c) => &c.position,
        }
    }

    /// Bytes it holds in memory, roughly: its rows' values and names.
    fn size(&self) -> usize {
        let own = std::mem::size_of::<ChangeItem>() + self.position().0.len();
        let ChangeItem::Change(c) = self else {
            return own;
        };
        own + c.size()
    }

    /// Moves a position that lies before `floor` up to it.
    pub fn not_before(&mut self, floor: &Position) {
        let position = match self {
            ChangeItem::Begin { position, .. }
            | ChangeItem::Commit { position, .. }
            | ChangeItem::Heartbeat { position } => position,
            ChangeItem::Change(c) => &mut c.position,
        };
        if *position < *floor {
            *position = floor.clone();
        }
    }
}

/// Items an engine reader may be ahead of its stream by, and their bytes:
/// wide rows (documents of megabytes) reach the byte budget first, so a
/// stream's buffer holds at most about `FEED_BYTES` plus one item.
const FEED_ITEMS: usize = 256;
const FEED_BYTES: usize = 16 << 20;

/// An item on its way, holding its share of the byte budget until taken.
struct Sent {
    item: Result<ChangeItem, BackendError>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The channel between an engine's reader and its stream: the reader's
/// [`Outbox`], the reader task's [`FeedEnd`] and the stream's [`FeedItems`].
pub fn feed() -> (Outbox, FeedEnd, FeedItems) {
    feed_of(FEED_BYTES)
}

fn feed_of(budget: usize) -> (Outbox, FeedEnd, FeedItems) {
    let (tx, rx) = mpsc::channel(FEED_ITEMS);
    let outbox = Outbox {
        tx: tx.clone(),
        bytes: Arc::new(Semaphore::new(budget)),
        budget,
        last_sent: Instant::now(),
    };
    (outbox, FeedEnd(tx), FeedItems(rx))
}

/// An engine reader's side of the feed: items out, and when it last sent one
/// (a quiet stream sends heartbeats).
pub struct Outbox {
    tx: mpsc::Sender<Sent>,
    bytes: Arc<Semaphore>,
    budget: usize,
    last_sent: Instant,
}

impl Outbox {
    /// `Err(())` when the client has gone: the reader stops.
    pub async fn send(&mut self, item: ChangeItem) -> Result<(), ()> {
        // An item over the whole budget waits for the buffer to empty.
        let wanted = u32::try_from(item.size().min(self.budget)).unwrap_or(u32::MAX);
        let held = tokio::select! {
            held = self.bytes.clone().acquire_many_owned(wanted) => held.map_err(|_| ())?,
            () = self.tx.closed() => return Err(()),
        };
        self.last_sent = Instant::now();
        let sent = Sent {
            item: Ok(item),
            _bytes: Some(held),
        };
        self.tx.send(sent).await.map_err(|_| ())
    }

    /// Sends a heartbeat at `at` when it is past `delivered` and nothing was
    /// sent for `every`, moving `delivered` there.
    pub async fn heartbeat<P: Ord + Copy>(
        &mut self,
        delivered: &mut P,
        at: P,
        every: Duration,
        encode: fn(P) -> Position,
    ) -> Result<(), ()> {
        if at <= *delivered || self.last_sent.elapsed() < every {
            return Ok(());
        }
        *delivered = at;
        self.send(ChangeItem::Heartbeat { position: encode(at) }).await
    }

    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The reader task's side of the feed: why the stream ended.
pub struct FeedEnd(mpsc::Sender<Sent>);

impl FeedEnd {
    /// Whether the stream is gone.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    pub async fn fail(self, e: BackendError) {
        let sent = Sent {
            item: Err(e),
            _bytes: None,
        };
        let _ = self.0.send(sent).await;
    }
}

/// The stream's side of the feed.
pub struct FeedItems(mpsc::Receiver<Sent>);

impl FeedItems {
    /// The next item; `None` once the reader has ended.
    pub async fn recv(&mut self) -> Option<Result<ChangeItem, BackendError>> {
        self.0.recv().await.map(|sent| sent.item)
    }
}

/// A running change stream. Dropping `items` ends the engine's task and
/// releases the subscription for the next consumer.
pub struct ChangeFeed {
    pub items: FeedItems,
    /// The furthest position the client acknowledged.
    pub acks: watch::Sender<Option<Position>>,
    /// Where a stream without a resume position starts, when that may be
    /// inside a transaction (a stored acknowledgement of one of its
    /// changes): the transaction's Begin is raised to it, as for a resume.
    pub start: Option<Position>,
    /// For a stream without a resume position, the furthest position its
    /// subscription had acknowledged: acknowledgements up to it count as
    /// delivered (a client acknowledging its last position again as it
    /// reconnects, before anything comes).
    pub acknowledged: Option<Position>,
}

/// The client's acknowledgements as the engine's reader takes them: only
/// the latest counts, so a client acknowledging every change of a long
/// snapshot, which the reader reads no acknowledgement during, queues nothing.
pub struct Acks(watch::Receiver<Option<Position>>);

impl Acks {
    pub fn channel() -> (watch::Sender<Option<Position>>, Acks) {
        let (tx, rx) = watch::channel(None);
        (tx, Acks(rx))
    }

    /// The latest acknowledgement, if any (also once the stream is gone).
    pub fn latest(&mut self) -> Option<Position> {
        self.0.borrow_and_update().clone()
    }

    /// Waits for a newer acknowledgement; `None` once the stream is gone.
    pub async fn next(&mut self) -> Option<Position> {
        self.0.changed().await.ok()?;
        self.latest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_positions_round_trip_and_sort_as_their_fields() {
        let widths = [4, 8, 4];
        let a = Position::pack(widths, [1, 500, 2]);
        let b = Position::pack(widths, [1, 501, 0]);
        let c = Position::pack(widths, [2, 4, 0]);
        assert!(a < b && b < c);
        assert_eq!(c.unpack(widths), Some([2, 4, 0]));
        assert_eq!(Position(vec![1, 2]).unpack(widths), None);
    }

    #[test]
    fn resume_positions_must_lie_between_the_ack_and_the_head() {
        assert!(check_resume("s", &5, &5, "5", Some(&9)).is_ok());
        assert!(check_resume("s", &9, &5, "5", Some(&9)).is_ok());
        match check_resume("s", &4, &5, "0/5", Some(&9)) {
            Err(BackendError::PositionNotRetained(m)) => assert!(m.contains("\"s\"") && m.contains("0/5"), "{m}"),
            other => panic!("expected PositionNotRetained, got {other:?}"),
        }
        assert!(matches!(
            check_resume("s", &10, &5, "5", Some(&9)),
            Err(BackendError::Invalid(_))
        ));
        // Without a known head, only the lower bound is checked.
        assert!(check_resume("s", &10, &5, "5", None).is_ok());
    }

    fn wide_row(bytes: usize) -> ChangeItem {
        ChangeItem::Change(RowChange {
            op: ChangeOp::Insert,
            schema: "public".into(),
            table: "docs".into(),
            columns: Arc::from(Vec::new()),
            before: None,
            after: Some(vec![Value::Text("x".repeat(bytes))]),
            unchanged: Vec::new(),
            primary_key: Arc::from(Vec::new()),
            txid: String::new(),
            commit_time: None,
            position: Position(vec![0; 8]),
        })
    }

    #[tokio::test]
    async fn a_reader_waits_while_its_stream_holds_the_byte_budget() {
        let (mut out, _end, mut items) = feed_of(1000);
        out.send(wide_row(600)).await.unwrap();
        // Far below the item count, but past the bytes: the reader waits.
        let second = tokio::time::timeout(Duration::from_millis(200), out.send(wide_row(600))).await;
        assert!(second.is_err(), "a second wide row was buffered beyond the byte budget");
        assert!(items.recv().await.unwrap().is_ok());
        out.send(wide_row(600)).await.unwrap();
        // An item larger than the whole budget still passes, alone.
        assert!(items.recv().await.unwrap().is_ok());
        out.send(wide_row(5000)).await.unwrap();
        assert!(items.recv().await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_reader_waiting_for_bytes_stops_when_its_stream_goes() {
        let (mut out, _end, items) = feed_of(1000);
        out.send(wide_row(900)).await.unwrap();
        let waiting = tokio::spawn(async move { out.send(wide_row(900)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(items);
        let stopped = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(stopped, Ok(Ok(Err(())))), "{stopped:?}");
    }
}

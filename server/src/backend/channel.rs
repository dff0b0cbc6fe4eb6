//! Rows handed over from a worker (a blocking thread or a task that owns the
//! connection) through a bounded channel: a slow client slows the worker
//! instead of growing memory, and dropping the stream tells the worker to stop.

use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use super::{BackendError, Column, QueryStream, Row, RowSink, RowStream, Value, MAX_ROW_BYTES};

/// Most rows sent from the worker at a time. Every hand-over can wake
/// another thread: at 256 rows SQLite streamed a quarter slower.
const CHUNK_ROWS: usize = 1024;
/// Most bytes of values in one chunk, so that wide rows keep memory bounded.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between worker and caller.
const CHUNKS_BUFFERED: usize = 4;
/// Text capacity above which a read chunk is freed rather than reused, so
/// that one huge value does not stay allocated for the rest of the stream.
const REUSED_TEXT_BYTES: usize = 4 * CHUNK_BYTES;

/// One value of a chunk. Integers and text, the commonest, take no
/// allocation of their own: text lives in the chunk's one buffer.
enum Cell {
    Int(i64),
    Text(Range<usize>),
    Other(Value),
}

/// Rows gathered by a worker, in a few allocations per chunk instead of
/// some per row (freed on another thread, each would cost more again). Read
/// chunks go back to the worker to be filled again: new ones cost allocator
/// work and page faults (half of a SQLite stream's page faults were theirs).
pub struct Rows {
    cells: Vec<Cell>,
    text: String,
    /// Where each row's cells end.
    ends: Vec<usize>,
}

impl Rows {
    fn new() -> Self {
        Self {
            cells: Vec::new(),
            text: String::new(),
            ends: Vec::with_capacity(CHUNK_ROWS),
        }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Empty, keeping its capacity; `None` when that is too large to keep.
    fn emptied(mut self) -> Option<Self> {
        if self.text.capacity() > REUSED_TEXT_BYTES {
            return None;
        }
        self.cells.clear();
        self.text.clear();
        self.ends.clear();
        Some(self)
    }
}

pub enum Chunk {
    Rows(Rows),
    /// The statement ended; rows affected for statements that report them.
    Done(Option<u64>),
}

type ChunkSender = mpsc::Sender<Result<Chunk, BackendError>>;

/// The worker's side: describe the result once, send rows, then finish.
pub struct Worker {
    columns: Option<oneshot::Sender<Result<Vec<Column>, BackendError>>>,
    rows: ChunkSender,
    /// Chunks the caller has read, until `gather` takes them.
    spare: Option<mpsc::Receiver<Rows>>,
}

impl Worker {
    /// Where to gather the rows to send: it fills the chunks the caller has read again.
    pub fn gather(&mut self) -> Gather {
        Gather {
            spare: self.spare.take(),
            ..Gather::default()
        }
    }

    /// Sends the result's columns; false when the caller is gone.
    pub fn describe(&mut self, columns: Vec<Column>) -> bool {
        self.columns.take().is_some_and(|tx| tx.send(Ok(columns)).is_ok())
    }

    /// Sends rows from a blocking thread; false when the caller is gone.
    pub fn send_blocking(&self, rows: Rows) -> bool {
        self.rows.blocking_send(Ok(Chunk::Rows(rows))).is_ok()
    }

    /// Sends rows from a task, waiting for room; false when the caller is gone.
    pub async fn send(&self, rows: Rows) -> bool {
        self.rows.send(Ok(Chunk::Rows(rows))).await.is_ok()
    }

    /// Whether the caller has dropped the rows.
    pub fn is_closed(&self) -> bool {
        self.rows.is_closed()
    }

    /// Resolves when the caller has dropped the rows.
    pub async fn closed(&self) {
        self.rows.closed().await
    }

    /// Reports the outcome: a failure before the columns fails the call itself.
    fn outcome(
        mut self,
        result: Result<Option<u64>, BackendError>,
    ) -> Option<(ChunkSender, Result<Chunk, BackendError>)> {
        match (result, self.columns.take()) {
            (Err(e), Some(columns)) => {
                let _ = columns.send(Err(e));
                None
            }
            (Err(e), None) => Some((self.rows, Err(e))),
            (Ok(affected), _) => Some((self.rows, Ok(Chunk::Done(affected)))),
        }
    }

    pub fn finish_blocking(self, result: Result<Option<u64>, BackendError>) {
        if let Some((rows, last)) = self.outcome(result) {
            let _ = rows.blocking_send(last);
        }
    }

    pub async fn finish(self, result: Result<Option<u64>, BackendError>) {
        if let Some((rows, last)) = self.outcome(result) {
            let _ = rows.send(last).await;
        }
    }
}

/// Takes a worker's rows value by value (end each with `end_row`) until they make a chunk.
pub struct Gather {
    rows: Rows,
    bytes: usize,
    /// `bytes` when the row in progress began.
    row_from: usize,
    spare: Option<mpsc::Receiver<Rows>>,
}

impl Default for Gather {
    fn default() -> Self {
        Self {
            rows: Rows::new(),
            bytes: 0,
            row_from: 0,
            spare: None,
        }
    }
}

impl RowSink for Gather {
    fn value(&mut self, value: Value) {
        match value {
            Value::Int(i) => self.int(i),
            Value::Text(s) => self.text(&s),
            other => {
                self.bytes += other.size();
                self.rows.cells.push(Cell::Other(other));
            }
        }
    }

    fn text(&mut self, text: &str) {
        let start = self.rows.text.len();
        self.rows.text.push_str(text);
        self.bytes += std::mem::size_of::<Cell>() + text.len();
        self.rows.cells.push(Cell::Text(start..self.rows.text.len()));
    }

    fn int(&mut self, value: i64) {
        self.bytes += std::mem::size_of::<Cell>();
        self.rows.cells.push(Cell::Int(value));
    }
}

impl Gather {
    /// Ends the row in progress; returns the chunk to send once it is full.
    pub fn end_row(&mut self) -> Option<Rows> {
        self.rows.ends.push(self.rows.cells.len());
        if self.rows.len() < CHUNK_ROWS && self.bytes < CHUNK_BYTES {
            self.row_from = self.bytes;
            return None;
        }
        self.bytes = 0;
        self.row_from = 0;
        // The next chunk will likely be like this one: size it so.
        let mut next = self
            .spare
            .as_mut()
            .and_then(|spare| spare.try_recv().ok())
            .unwrap_or_else(Rows::new);
        next.cells.reserve(self.rows.cells.len());
        next.text.reserve(self.rows.text.len());
        Some(std::mem::replace(&mut self.rows, next))
    }

    /// Fails once the row in progress holds more than a row may: an
    /// engine that makes its values in this process (SQLite) would
    /// otherwise build a row of any size here, value by value.
    pub fn check_row_size(&self) -> Result<(), BackendError> {
        match self.bytes - self.row_from > MAX_ROW_BYTES {
            true => Err(BackendError::RowTooLarge { limit: MAX_ROW_BYTES }),
            false => Ok(()),
        }
    }

    /// The rows ended since the last full chunk, if any.
    pub fn rest(self) -> Option<Rows> {
        (self.rows.len() > 0).then_some(self.rows)
    }
}

/// The rows of the chunk being read by the caller.
struct Reading {
    rows: Rows,
    /// Rows and cells read so far.
    read: usize,
    at: usize,
}

impl From<Rows> for Reading {
    fn from(rows: Rows) -> Self {
        Self { rows, read: 0, at: 0 }
    }
}

impl Reading {
    /// Gives the next row to `sink`; false when the chunk is used up.
    fn next_into(&mut self, sink: &mut dyn RowSink) -> bool {
        let Rows { cells, text, ends } = &mut self.rows;
        let Some(&end) = ends.get(self.read) else {
            return false;
        };
        for cell in cells.get_mut(self.at..end).unwrap_or_default() {
            match cell {
                Cell::Int(i) => sink.int(*i),
                Cell::Text(range) => sink.text(text.get(range.clone()).unwrap_or_default()),
                Cell::Other(value) => sink.value(std::mem::replace(value, Value::Null)),
            }
        }
        self.read += 1;
        self.at = end;
        true
    }
}

/// The caller's side, until the worker has described the result.
pub struct Pending {
    columns: oneshot::Receiver<Result<Vec<Column>, BackendError>>,
    stream: ChannelRowStream,
}

/// A worker/caller pair; `on_drop` runs when the caller drops the rows early
/// or late, to interrupt a worker that is busy in the engine.
pub fn channel(on_drop: Option<Box<dyn FnOnce() + Send>>) -> (Worker, Pending) {
    let (columns_tx, columns_rx) = oneshot::channel();
    let (tx, rx) = mpsc::channel(CHUNKS_BUFFERED);
    let (spare_tx, spare_rx) = mpsc::channel(CHUNKS_BUFFERED);
    let stream = ChannelRowStream {
        rx,
        spare: spare_tx,
        buffer: None,
        done: false,
        rows_affected: None,
        on_drop,
    };
    (
        Worker {
            columns: Some(columns_tx),
            rows: tx,
            spare: Some(spare_rx),
        },
        Pending {
            columns: columns_rx,
            stream,
        },
    )
}

impl Pending {
    /// Waits until the statement has started (or failed to).
    pub async fn started(mut self) -> Result<QueryStream, BackendError> {
        match self.columns.await {
            Ok(Ok(columns)) => Ok(QueryStream {
                columns,
                rows: Box::pin(self.stream),
            }),
            Ok(Err(e)) => Err(e),
            // The worker failed before describing the result: its error is in the row channel.
            Err(_) => Err(match self.stream.rx.recv().await {
                Some(Err(e)) => e,
                _ => BackendError::Internal("the statement worker ended unexpectedly".into()),
            }),
        }
    }
}

pub struct ChannelRowStream {
    rx: mpsc::Receiver<Result<Chunk, BackendError>>,
    /// Read chunks, back to the worker (never waiting: one is dropped when the worker has enough).
    spare: mpsc::Sender<Rows>,
    buffer: Option<Reading>,
    done: bool,
    rows_affected: Option<u64>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl Stream for ChannelRowStream {
    type Item = Result<Row, BackendError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        super::collect_row(self, cx, 0)
    }
}

impl RowStream for ChannelRowStream {
    fn rows_affected(&self) -> Option<u64> {
        self.rows_affected
    }

    /// Lends text from the chunk's buffer: no value is built for it.
    fn poll_next_into(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        sink: &mut dyn RowSink,
    ) -> Poll<Option<Result<(), BackendError>>> {
        loop {
            if self.buffer.as_mut().is_some_and(|rows| rows.next_into(sink)) {
                return Poll::Ready(Some(Ok(())));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(Chunk::Rows(rows)))) => {
                    let read = self.buffer.replace(rows.into());
                    if let Some(emptied) = read.and_then(|read| read.rows.emptied()) {
                        let _ = self.spare.try_send(emptied);
                    }
                }
                Poll::Ready(Some(Ok(Chunk::Done(affected)))) => {
                    self.rows_affected = affected;
                    self.done = true;
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let e = BackendError::Internal("the statement worker ended unexpectedly".into());
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl Drop for ChannelRowStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn drain(gather: &mut Gather, rows: impl IntoIterator<Item = Row>) -> Vec<usize> {
        rows.into_iter()
            .filter_map(|row| {
                row.into_iter().for_each(|v| gather.value(v));
                gather.end_row()
            })
            .map(|chunk| chunk.len())
            .collect()
    }

    #[test]
    fn narrow_rows_go_in_chunks_of_a_fixed_count_and_the_rest_last() {
        let mut gather = Gather::default();
        let chunks = drain(&mut gather, (0..CHUNK_ROWS * 2 + 5).map(|i| vec![Value::Int(i as i64)]));
        assert_eq!(chunks, vec![CHUNK_ROWS, CHUNK_ROWS]);
        assert_eq!(gather.rest().map(|r| r.len()), Some(5));
        assert!(Gather::default().rest().is_none());
    }

    #[test]
    fn wide_rows_make_smaller_chunks() {
        let mut gather = Gather::default();
        let wide = || vec![Value::Text("x".repeat(64 * 1024)), Value::Bytes(vec![0; 1024])];
        let chunks = drain(&mut gather, (0..12).map(|_| wide()));
        // About 65 KiB a row: a chunk is full at its fourth row.
        assert_eq!(chunks, vec![4, 4, 4]);
        assert!(gather.rest().is_none());
    }

    #[tokio::test]
    async fn chunks_filled_again_hold_only_their_own_rows() {
        // Rows of changing width and kind, over many chunks, so that a
        // reused chunk left holding anything of its last rows would show.
        let rows: Vec<Row> = (0..CHUNK_ROWS * 6 + 7)
            .map(|i| match i % 3 {
                0 => vec![Value::Int(i as i64), Value::Text("t".repeat(i % 50))],
                1 => vec![Value::Bytes(vec![i as u8; i % 7])],
                _ => vec![Value::Null, Value::Text(i.to_string()), Value::Float(i as f64)],
            })
            .collect();
        let (mut worker, pending) = channel(None);
        let sent = rows.clone();
        tokio::spawn(async move {
            worker.describe(Vec::new());
            let mut gather = worker.gather();
            for row in sent {
                row.into_iter().for_each(|v| gather.value(v));
                if let Some(chunk) = gather.end_row() {
                    assert!(worker.send(chunk).await);
                }
            }
            if let Some(rest) = gather.rest() {
                assert!(worker.send(rest).await);
            }
            worker.finish(Ok(None)).await;
        });
        let stream = pending.started().await.expect("started");
        let got: Vec<Row> = stream.rows.map(|r| r.expect("row")).collect().await;
        assert_eq!(got, rows);
    }

    #[tokio::test]
    async fn a_read_chunk_goes_back_to_the_worker() {
        let (mut worker, pending) = channel(None);
        worker.describe(Vec::new());
        let mut gather = worker.gather();
        let fill = |gather: &mut Gather| loop {
            gather.value(Value::Text("x".into()));
            if let Some(chunk) = gather.end_row() {
                return chunk;
            }
        };
        assert!(worker.send(fill(&mut gather)).await);
        assert!(worker.send(fill(&mut gather)).await);
        let mut stream = pending.started().await.expect("started").rows;
        // Reading into the second chunk hands the first back.
        for _ in 0..=CHUNK_ROWS {
            stream.next().await.expect("a row").expect("no error");
        }
        let spare = |gather: &Gather| gather.spare.as_ref().map_or(0, |spare| spare.len());
        assert_eq!(spare(&gather), 1);
        let _third = fill(&mut gather);
        assert_eq!(spare(&gather), 0, "the next chunk was not the one handed back");
        assert_eq!(gather.rows.len(), 0);
    }

    #[tokio::test]
    async fn rows_arrive_as_they_were_given_whatever_their_values() {
        let rows: Vec<Row> = vec![
            vec![Value::Int(1), Value::Text("one".into()), Value::Null],
            vec![Value::Int(-2), Value::Text(String::new()), Value::Bytes(vec![0, 1])],
            vec![
                Value::Float(0.5),
                Value::Text("tab\there".into()),
                Value::Text("é".into()),
            ],
        ];
        let (mut worker, pending) = channel(None);
        let sent = rows.clone();
        tokio::spawn(async move {
            worker.describe(Vec::new());
            let mut gather = Gather::default();
            // Row by row and through the borrowed-text path, as engines do.
            for (i, row) in sent.into_iter().enumerate() {
                for value in row {
                    match (i, value) {
                        (0, Value::Text(s)) => gather.text(&s),
                        (0, Value::Int(n)) => gather.int(n),
                        (_, v) => gather.value(v),
                    }
                }
                assert!(gather.end_row().is_none());
            }
            let rest = gather.rest().expect("rows");
            assert!(worker.send(rest).await);
            worker.finish(Ok(None)).await;
        });
        let stream = pending.started().await.expect("started");
        let got: Vec<Row> = stream.rows.map(|r| r.expect("row")).collect().await;
        assert_eq!(got, rows);
    }
}

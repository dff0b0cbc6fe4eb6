//! Rows handed over from a worker (a blocking thread or a task that owns the
//! connection) through a bounded channel: a slow client slows the worker
//! instead of growing memory, and dropping the stream tells the worker to stop.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use super::{BackendError, Column, QueryStream, Row, RowStream, Value};

/// Most rows sent from the worker at a time. Every hand-over can wake
/// another thread: at 256 rows SQLite streamed a quarter slower.
const CHUNK_ROWS: usize = 1024;
/// Most bytes of values in one chunk, so that wide rows keep memory bounded.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between worker and caller.
const CHUNKS_BUFFERED: usize = 4;

pub enum Chunk {
    Rows(Vec<Row>),
    /// The statement ended; rows affected for statements that report them.
    Done(Option<u64>),
}

type ChunkSender = mpsc::Sender<Result<Chunk, BackendError>>;

/// The worker's side: describe the result once, send rows, then finish.
pub struct Worker {
    columns: Option<oneshot::Sender<Result<Vec<Column>, BackendError>>>,
    rows: ChunkSender,
}

impl Worker {
    /// Sends the result's columns; false when the caller is gone.
    pub fn describe(&mut self, columns: Vec<Column>) -> bool {
        self.columns.take().is_some_and(|tx| tx.send(Ok(columns)).is_ok())
    }

    /// Sends rows from a blocking thread; false when the caller is gone.
    pub fn send_blocking(&self, rows: Vec<Row>) -> bool {
        self.rows.blocking_send(Ok(Chunk::Rows(rows))).is_ok()
    }

    /// Sends rows from a task, waiting for room; false when the caller is gone.
    pub async fn send(&self, rows: Vec<Row>) -> bool {
        self.rows.send(Ok(Chunk::Rows(rows))).await.is_ok()
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

/// Rows gathered by a worker until they make a chunk.
pub struct Gather {
    rows: Vec<Row>,
    bytes: usize,
}

impl Default for Gather {
    fn default() -> Self {
        Self {
            rows: Vec::with_capacity(CHUNK_ROWS),
            bytes: 0,
        }
    }
}

impl Gather {
    /// Adds a row; returns the chunk to send once it is full.
    pub fn push(&mut self, row: Row) -> Option<Vec<Row>> {
        self.bytes += row.iter().map(Value::size).sum::<usize>();
        self.rows.push(row);
        if self.rows.len() < CHUNK_ROWS && self.bytes < CHUNK_BYTES {
            return None;
        }
        self.bytes = 0;
        Some(std::mem::replace(&mut self.rows, Vec::with_capacity(CHUNK_ROWS)))
    }

    /// The rows gathered since the last full chunk, if any.
    pub fn rest(self) -> Option<Vec<Row>> {
        (!self.rows.is_empty()).then_some(self.rows)
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
    let stream = ChannelRowStream {
        rx,
        buffer: Vec::new().into_iter(),
        done: false,
        rows_affected: None,
        on_drop,
    };
    (
        Worker {
            columns: Some(columns_tx),
            rows: tx,
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
    buffer: std::vec::IntoIter<Row>,
    done: bool,
    rows_affected: Option<u64>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl Stream for ChannelRowStream {
    type Item = Result<Row, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(row) = self.buffer.next() {
                return Poll::Ready(Some(Ok(row)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(Chunk::Rows(rows)))) => self.buffer = rows.into_iter(),
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

impl RowStream for ChannelRowStream {
    fn rows_affected(&self) -> Option<u64> {
        self.rows_affected
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
    use super::*;

    fn drain(gather: &mut Gather, rows: impl IntoIterator<Item = Row>) -> Vec<usize> {
        rows.into_iter()
            .filter_map(|row| gather.push(row))
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
}

//! Bulk loads, engine-independent: what to load, the rows as they arrive,
//! and what came of it. Each engine turns a `LoadSpec` into its own bulk
//! path inside one transaction, so a load either commits whole or leaves
//! the table as it was.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use super::{BackendError, Column, EngineErrorKind, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Insert every row.
    Append,
    /// Insert, or update the row with the same conflict key.
    Upsert,
    /// Empty the table, then insert, in the same transaction.
    Replace,
}

/// Every mode, for engines that support them all.
pub const ALL_LOAD_MODES: [LoadMode; 3] = [LoadMode::Append, LoadMode::Upsert, LoadMode::Replace];

/// The committed-load record that makes a retried `load_id` load nothing.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// Table holding the records (`bulk.load_id_table`).
    pub table: String,
    pub tenant: String,
    pub load_id: String,
    /// The load's target, so that a load id reused for another table is refused.
    pub target: String,
}

/// What a load writes, validated against the table's real columns.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `None` for the connection's default schema.
    pub schema: Option<String>,
    pub table: String,
    /// Target columns with their engine types, in the order row values come in.
    pub columns: Vec<Column>,
    pub mode: LoadMode,
    /// Columns of the unique key an upsert matches on (a subset of `columns`).
    pub conflict: Vec<String>,
    pub receipt: Option<Receipt>,
    /// Rows per engine statement or COPY chunk.
    pub batch_rows: usize,
    /// The target's kind, as DescribeTable found it before the load (a
    /// partitioned table's rows are its partitions').
    pub kind: super::TableKind,
}

/// A load's COMMIT that failed: when the connection was lost on the way,
/// the load may have committed, and a retry hint would load it twice.
pub fn commit_failed(e: BackendError) -> BackendError {
    if e.is_unavailable() {
        BackendError::CommitOutcomeUnknown(e.to_string())
    } else {
        e
    }
}

/// A REPLACE refused because its DELETE would reach other tables: the
/// foreign keys of `children` delete or change their rows with the target's.
pub fn replace_would_cascade(children: &[String]) -> BackendError {
    BackendError::Engine {
        kind: EngineErrorKind::FailedPrecondition,
        code: String::new(),
        message: format!(
            "REPLACE empties the table with DELETE, and the ON DELETE CASCADE, SET NULL or SET DEFAULT \
             foreign keys of {} would carry that into those tables' rows; nothing was loaded. \
             Load with APPEND or UPSERT, or change those foreign keys",
            children.join(", ")
        ),
    }
}

impl LoadSpec {
    /// Non-key columns, which an upsert overwrites.
    pub fn update_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| !self.conflict.contains(&c.name))
    }

    /// The schema-qualified target, quoted with `quote`.
    pub fn qualified(&self, quote: fn(&str) -> String) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote(s), quote(&self.table)),
            None => quote(&self.table),
        }
    }

    /// The target columns as a quoted, comma-separated list.
    pub fn column_list(&self, quote: fn(&str) -> String) -> String {
        self.columns
            .iter()
            .map(|c| quote(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Quotes an identifier between `open` and `close`, doubling `close` inside
/// it: `"a""b"`, `` `a``b` ``, `[a]]b]`.
pub fn quote_ident(name: &str, open: char, close: char) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push(open);
    for c in name.chars() {
        if c == close {
            quoted.push(close);
        }
        quoted.push(c);
    }
    quoted.push(close);
    quoted
}

/// Appends `bytes` escaped for tab-separated load text, the format of
/// PostgreSQL's `COPY` and of MySQL's `LOAD DATA` defaults: backslash, tab,
/// newline and carriage return get a backslash escape, NUL becomes `nul`.
/// Returns false, with part of `bytes` written, at a NUL when `nul` is None.
/// Inlined: it runs once per text value of a load, in the loads' hot loops.
#[inline]
pub fn write_escaped(bytes: &[u8], nul: Option<&[u8]>, out: &mut BytesMut) -> bool {
    // Most text needs no escape: one pass without an early exit, which the
    // compiler vectorises, tells (tab, newline, return and NUL are below 0x20).
    if !bytes.iter().fold(false, |any, &b| any | (b < 0x20) | (b == b'\\')) {
        out.put_slice(bytes);
        return true;
    }
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            0 => match nul {
                Some(nul) => nul,
                None => return false,
            },
            _ => continue,
        };
        out.put_slice(&bytes[start..i]);
        out.put_slice(escaped);
        start = i + 1;
    }
    out.put_slice(&bytes[start..]);
    true
}

/// Appends `batch` as tab-separated lines, each value written by `field`
/// (given its column's index); a value it refuses fails the load naming
/// its row and column.
pub fn write_lines(
    batch: &Batch,
    columns: &[Column],
    out: &mut BytesMut,
    mut field: impl FnMut(usize, &super::Value, &mut BytesMut) -> Result<(), String>,
) -> Result<(), BackendError> {
    for (i, row) in batch.rows.iter().enumerate() {
        for (c, value) in row.iter().enumerate() {
            if c > 0 {
                out.put_u8(b'\t');
            }
            field(c, value, out).map_err(|message| {
                let column = columns.get(c).map(|c| c.name.clone());
                row_error(batch.first_row + i as u64, column, String::new(), message)
            })?;
        }
        out.put_u8(b'\n');
    }
    Ok(())
}

/// Standard SQL's double-quoted identifier (PostgreSQL, SQLite).
pub fn quote_ansi(name: &str) -> String {
    quote_ident(name, '"', '"')
}

/// What a load did, or what the first load with the same id did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOutcome {
    pub inserted: u64,
    pub updated: u64,
    pub bytes: u64,
    /// The engine path, for example "postgres-copy".
    pub engine_path: String,
    /// The load id had committed before: nothing was loaded this time.
    pub replayed: bool,
}

impl LoadOutcome {
    /// A load that ran: its counts, the bytes its feed received, and the engine path.
    pub fn loaded(inserted: u64, updated: u64, feed: &RowFeed, engine_path: &str) -> Self {
        Self {
            inserted,
            updated,
            bytes: feed.bytes(),
            engine_path: engine_path.to_string(),
            replayed: false,
        }
    }
}

/// Whether a load's transaction ends in COMMIT: it ran, was not a replay,
/// and its caller still waits for it. A load its caller gave up on (the
/// deadline passed while the engine finished it) is rolled back and ends
/// as abandoned, as the caller was told.
pub fn commits(result: &mut Result<LoadOutcome, BackendError>, feed: &RowFeed) -> bool {
    if !matches!(result, Ok(outcome) if !outcome.replayed) {
        return false;
    }
    if feed.verdict.claim_commit() {
        return true;
    }
    *result = Err(BackendError::LoadAbandoned);
    false
}

/// Who decides a load whose rows are all in: the engine, by starting its
/// COMMIT, or the caller, by giving up at its deadline. Whichever comes
/// first wins, so a caller told "rolled back" never finds the rows committed.
#[derive(Clone, Default)]
pub struct Verdict(Arc<Decision>);

#[derive(Default)]
struct Decision {
    state: AtomicU8,
    /// Told when the caller gives up, for engines that stop what runs then.
    given_up: Notify,
}

const UNDECIDED: u8 = 0;
const COMMITTING: u8 = 1;
const ABANDONED: u8 = 2;

impl Verdict {
    /// The caller gives up: true unless the engine has begun to commit.
    pub fn abandon(&self) -> bool {
        match self
            .0
            .state
            .compare_exchange(UNDECIDED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                self.0.given_up.notify_waiters();
                true
            }
            Err(state) => state == ABANDONED,
        }
    }

    /// Whether the caller gave up: a load still running in the engine
    /// (one long statement) may stop at once, as it can no longer commit.
    pub fn abandoned(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == ABANDONED
    }

    /// Completes once the caller has given up; never for a load that began to commit.
    pub async fn given_up(&self) {
        loop {
            let told = self.0.given_up.notified();
            tokio::pin!(told);
            // Registered before the check: a notice between the two is not missed.
            told.as_mut().enable();
            if self.abandoned() {
                return;
            }
            told.await;
        }
    }

    /// Runs `load`, a load's work in its engine. If the caller gives up
    /// first, runs `stop`, which ends the statement running now (a merge, a
    /// REPLACE's DELETE, a trigger) so that `load` soon fails, rather than
    /// running it to its end holding its locks, its session and its load
    /// id; then waits for `load`.
    pub async fn stopping_if_given_up<T, E: std::fmt::Display>(
        &self,
        load: impl std::future::Future<Output = T>,
        stop: impl std::future::Future<Output = Result<(), E>>,
    ) -> T {
        tokio::pin!(load);
        tokio::select! {
            // Given up first: a caller that gives up also closes the feed,
            // which would let `load` end first and its ROLLBACK wait behind
            // the statement it did not stop.
            biased;
            () = self.given_up() => {
                if let Err(e) = stop.await {
                    tracing::warn!(error = %e, "cannot stop the statement of a load given up on");
                }
                load.await
            }
            done = &mut load => done,
        }
    }

    fn claim_commit(&self) -> bool {
        self.0
            .state
            .compare_exchange(UNDECIDED, COMMITTING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Converted rows a load may hold between the client and the engine, the
/// batch in the engine's hands included. Counted in memory, not batches: a
/// NULL is two bytes on the wire and a `Value` here, so a few messages of
/// wide rows of NULLs would otherwise hold gigabytes.
pub const FEED_MEMORY: usize = 64 << 20;

/// Rows of a load in arrival order, with the index of the first row.
pub struct Batch {
    pub first_row: u64,
    pub rows: Vec<Row>,
    /// Its share of the feed's memory, given back when the engine drops it.
    _memory: OwnedSemaphorePermit,
}

enum Feed {
    Rows(Vec<Row>, u64, OwnedSemaphorePermit),
    End,
}

impl Batch {
    /// Its share of the feed's memory, in bytes.
    pub fn memory(&self) -> usize {
        self._memory.num_permits()
    }
}

/// About what `rows` hold in memory: each row's and value's own size (a
/// list's elements too: an empty element is 2 bytes of request and a whole
/// `Value` here), and at most the request bytes they came in for text and
/// bytes.
fn in_memory(rows: &[Row], bytes: u64) -> usize {
    fn slots(v: &super::Value) -> usize {
        match v {
            super::Value::List(items) => 1 + items.iter().map(slots).sum::<usize>(),
            _ => 1,
        }
    }
    let values: usize = rows.iter().flatten().map(slots).sum();
    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    std::mem::size_of_val(rows)
        .saturating_add(values * std::mem::size_of::<super::Value>())
        .saturating_add(bytes)
}

/// The rows of a load as the client sends them. It ends with `Ok(None)`
/// only when the sender said the load is complete: a sender that goes away
/// without saying so (client gone, limit reached, bad row) yields
/// `BackendError::LoadAbandoned`, and the engine rolls back.
pub struct RowFeed {
    rx: mpsc::Receiver<Feed>,
    next_row: u64,
    bytes: u64,
    verdict: Verdict,
}

/// The sending side, held by the service.
pub struct RowSender {
    tx: mpsc::Sender<Feed>,
    /// [`FEED_MEMORY`], shared out among the batches not yet dropped.
    memory: Arc<Semaphore>,
}

/// A feed that buffers at most `depth` batches between client and engine,
/// for a load that `verdict` lets the caller give up on.
pub fn row_feed(depth: usize, verdict: Verdict) -> (RowSender, RowFeed) {
    let (tx, rx) = mpsc::channel(depth.max(1));
    (
        RowSender {
            tx,
            memory: Arc::new(Semaphore::new(FEED_MEMORY)),
        },
        RowFeed {
            rx,
            next_row: 0,
            bytes: 0,
            verdict,
        },
    )
}

impl RowFeed {
    /// Who decides the load (see [`Verdict`]), for an engine that can stop a
    /// statement in progress when its caller gives up.
    pub fn verdict(&self) -> Verdict {
        self.verdict.clone()
    }
}

impl RowSender {
    /// Hands a batch of `bytes` request bytes to the engine, once the feed
    /// has room for it in memory (a batch larger than all of it goes alone);
    /// false once the engine has stopped.
    pub async fn send(&self, rows: Vec<Row>, bytes: u64) -> bool {
        let size = u32::try_from(in_memory(&rows, bytes).min(FEED_MEMORY)).unwrap_or(u32::MAX);
        let Ok(memory) = self.memory.clone().acquire_many_owned(size).await else {
            return false;
        };
        self.tx.send(Feed::Rows(rows, bytes, memory)).await.is_ok()
    }

    /// Marks the load complete: the engine may commit.
    pub async fn finish(self) -> bool {
        self.tx.send(Feed::End).await.is_ok()
    }
}

impl RowFeed {
    fn accept(&mut self, item: Option<Feed>) -> Result<Option<Batch>, BackendError> {
        match item {
            Some(Feed::Rows(rows, bytes, memory)) => {
                let first_row = self.next_row;
                self.next_row += rows.len() as u64;
                self.bytes += bytes;
                Ok(Some(Batch {
                    first_row,
                    rows,
                    _memory: memory,
                }))
            }
            Some(Feed::End) => Ok(None),
            None => Err(BackendError::LoadAbandoned),
        }
    }

    pub async fn next(&mut self) -> Result<Option<Batch>, BackendError> {
        let item = self.rx.recv().await;
        self.accept(item)
    }

    /// Whether a batch (or the end) is waiting to be taken.
    pub fn has_ready(&self) -> bool {
        !self.rx.is_empty()
    }

    /// For engines whose calls block (SQLite); never from an async task.
    pub fn blocking_next(&mut self) -> Result<Option<Batch>, BackendError> {
        let item = self.rx.blocking_recv();
        self.accept(item)
    }

    /// Rows received so far.
    pub fn rows(&self) -> u64 {
        self.next_row
    }

    /// Request bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// An engine's error met on row `index`: that row's error when the fault
/// may be the row's (`EngineErrorKind::is_about_data`), else as it is.
pub fn on_row(index: u64, column: Option<String>, error: BackendError) -> BackendError {
    match error {
        BackendError::Engine { kind, code, message } if kind.is_about_data() => row_error(index, column, code, message),
        other => other,
    }
}

/// A row the engine rejected, located from the engine's own report.
pub fn row_error(index: u64, column: Option<String>, code: String, message: String) -> BackendError {
    BackendError::Row {
        index,
        column,
        code,
        message,
    }
}

/// How an engine spells the receipt table and its statements.
pub struct Dialect {
    pub quote: fn(&str) -> String,
    /// The i-th (1-based) parameter placeholder.
    pub placeholder: fn(usize) -> String,
    /// Column types: a short key string, a longer text, a 64-bit integer, a timestamp with its default.
    pub key_type: &'static str,
    pub text_type: &'static str,
    pub int_type: &'static str,
    pub timestamp: &'static str,
    /// Creates the table unless it exists; `{table}` (quoted), `{name}` (plain) and `{body}` are filled in.
    pub create_new: &'static str,
    /// Inserts a row unless its key exists; `{table}`, `{columns}`, `{values}` and `{key}` are filled in.
    pub insert_new: &'static str,
}

/// The statements that record committed load ids in `Receipt::table`.
/// Parameters in order of appearance (so `?` placeholders work too): claim
/// and lookup take tenant, load id (and target); record takes rows
/// inserted, rows updated, bytes, engine path, then tenant and load id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptSql {
    pub create: String,
    /// Inserts the load's record, or nothing when the id is taken (waiting
    /// for a concurrent load with the same id to end first).
    pub claim: String,
    /// Reads target, rows inserted, rows updated, bytes and engine path.
    pub lookup: String,
    /// Stores the outcome: rows inserted, rows updated, bytes, engine path.
    pub record: String,
}

impl ReceiptSql {
    pub fn new(table: &str, d: &Dialect) -> Self {
        let t = (d.quote)(table);
        let q = d.quote;
        let p = d.placeholder;
        let key_at = |i: usize| format!("{} = {} AND {} = {}", q("tenant"), p(i), q("load_id"), p(i + 1));
        let key = key_at(1);
        let body = format!(
            "{tenant} {k} NOT NULL, {id} {k} NOT NULL, {target} {x} NOT NULL, \
             {ins} {i} NOT NULL DEFAULT 0, {upd} {i} NOT NULL DEFAULT 0, {bytes} {i} NOT NULL DEFAULT 0, \
             {path} {k} NOT NULL DEFAULT '', {at} {ts}, PRIMARY KEY ({tenant}, {id})",
            tenant = q("tenant"),
            id = q("load_id"),
            target = q("target"),
            ins = q("rows_inserted"),
            upd = q("rows_updated"),
            bytes = q("bytes"),
            path = q("engine_path"),
            at = q("committed_at"),
            k = d.key_type,
            x = d.text_type,
            i = d.int_type,
            ts = d.timestamp,
        );
        let create = d
            .create_new
            .replace("{table}", &t)
            .replace("{name}", table)
            .replace("{body}", &body);
        let claim = d
            .insert_new
            .replace("{table}", &t)
            .replace("{columns}", &[q("tenant"), q("load_id"), q("target")].join(", "))
            .replace("{values}", &[p(1), p(2), p(3)].join(", "))
            .replace("{key}", &key);
        let lookup = format!(
            "SELECT {}, {}, {}, {}, {} FROM {t} WHERE {key}",
            q("target"),
            q("rows_inserted"),
            q("rows_updated"),
            q("bytes"),
            q("engine_path")
        );
        let record = format!(
            "UPDATE {t} SET {} = {}, {} = {}, {} = {}, {} = {} WHERE {}",
            q("rows_inserted"),
            p(1),
            q("rows_updated"),
            p(2),
            q("bytes"),
            p(3),
            q("engine_path"),
            p(4),
            key_at(5)
        );
        Self {
            create,
            claim,
            lookup,
            record,
        }
    }
}

/// What a receipt lookup found: the first load's outcome, or a refusal
/// when the id was used for another table.
pub fn replay(
    receipt: &Receipt,
    target: String,
    inserted: i64,
    updated: i64,
    bytes: i64,
    engine_path: String,
) -> Result<LoadOutcome, BackendError> {
    if target != receipt.target {
        return Err(BackendError::LoadIdReused(target));
    }
    let count = |n: i64| u64::try_from(n).unwrap_or_default();
    Ok(LoadOutcome {
        inserted: count(inserted),
        updated: count(updated),
        bytes: count(bytes),
        engine_path,
        replayed: true,
    })
}

/// Converts an outcome's counts for storing in a signed 64-bit column.
pub fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ColumnType, Value};

    #[test]
    fn list_elements_count_in_a_batchs_memory() {
        // About 4 MB of request: 2 million empty elements of one list.
        let rows = vec![vec![Value::List(vec![Value::Null; 2_000_000])]];
        assert!(in_memory(&rows, 4_000_000) >= 2_000_000 * std::mem::size_of::<Value>());
        let flat = vec![vec![Value::Int(1), Value::Null]];
        assert_eq!(
            in_memory(&flat, 10),
            std::mem::size_of_val(flat.as_slice()) + 2 * std::mem::size_of::<Value>() + 10
        );
    }

    proptest::proptest! {
        /// Whatever the name (quotes, semicolons, comments, Unicode), its
        /// quoted form is one identifier: it ends only at its last character,
        /// and undoing the doubling gives the name back.
        #[test]
        fn any_name_quotes_to_one_identifier(name in ".*", pick in 0usize..3) {
            let (open, close) = [('"', '"'), ('`', '`'), ('[', ']')][pick];
            let quoted = quote_ident(&name, open, close);
            let inner: Vec<char> = quoted.chars().skip(1).collect();
            proptest::prop_assert_eq!(quoted.chars().next(), Some(open));
            let mut back = String::new();
            let mut i = 0;
            while i + 1 < inner.len() {
                if inner[i] == close {
                    // Inside, a closing quote only ever comes doubled.
                    proptest::prop_assert_eq!(inner[i + 1], close);
                    i += 1;
                }
                back.push(inner[i]);
                i += 1;
            }
            proptest::prop_assert_eq!(i + 1, inner.len());
            proptest::prop_assert_eq!(inner[i], close);
            proptest::prop_assert_eq!(back, name);
        }
    }

    #[test]
    fn identifiers_are_quoted_with_the_closing_quote_doubled() {
        assert_eq!(quote_ident("a\"b", '"', '"'), "\"a\"\"b\"");
        assert_eq!(quote_ident("x`; DROP TABLE t; --", '`', '`'), "`x``; DROP TABLE t; --`");
        assert_eq!(quote_ident("a]b[c", '[', ']'), "[a]]b[c]");
    }

    #[test]
    fn spec_lists_columns_and_update_columns() {
        let spec = LoadSpec {
            schema: Some("s".into()),
            table: "t".into(),
            columns: ["id", "name", "score"]
                .iter()
                .map(|n| Column::new(*n, "int", ColumnType::Int))
                .collect(),
            mode: LoadMode::Upsert,
            conflict: vec!["id".into()],
            receipt: None,
            batch_rows: 10,
            kind: crate::backend::TableKind::Table,
        };
        let q = |n: &str| quote_ident(n, '"', '"');
        assert_eq!(spec.qualified(q), "\"s\".\"t\"");
        assert_eq!(spec.column_list(q), "\"id\", \"name\", \"score\"");
        let updates: Vec<_> = spec.update_columns().map(|c| c.name.as_str()).collect();
        assert_eq!(updates, ["name", "score"]);
    }

    #[test]
    fn the_engine_or_the_caller_decides_a_load_first() {
        let v = Verdict::default();
        assert!(v.claim_commit());
        assert!(!v.abandon(), "a load whose COMMIT began cannot be given up");
        let v = Verdict::default();
        assert!(v.abandon());
        assert!(v.abandon(), "giving up twice is still giving up");
        assert!(!v.claim_commit(), "a load given up on cannot commit");
    }

    #[tokio::test]
    async fn a_feed_without_its_end_is_abandoned() {
        let (tx, mut feed) = row_feed(2, Verdict::default());
        assert!(tx.send(vec![vec![Value::Int(1)], vec![Value::Int(2)]], 10).await);
        drop(tx);
        let batch = feed.next().await.expect("first batch").expect("rows");
        assert_eq!((batch.first_row, batch.rows.len()), (0, 2));
        assert!(matches!(feed.next().await, Err(BackendError::LoadAbandoned)));

        let (tx, mut feed) = row_feed(2, Verdict::default());
        assert!(tx.send(vec![vec![Value::Int(1)]], 4).await);
        assert!(tx.send(vec![vec![Value::Int(2)]], 4).await);
        let done = tokio::spawn(tx.finish());
        assert_eq!(feed.next().await.expect("batch").map(|b| b.first_row), Some(0));
        assert_eq!(feed.next().await.expect("batch").map(|b| b.first_row), Some(1));
        assert!(feed.next().await.expect("end").is_none());
        assert!(done.await.expect("task"));
        assert_eq!((feed.rows(), feed.bytes()), (2, 8));
    }

    #[tokio::test]
    async fn a_feed_holds_batches_up_to_its_memory_not_their_number() {
        let (tx, mut feed) = row_feed(4, Verdict::default());
        // One batch as large as the feed's memory: the next waits for it to be dropped.
        assert!(tx.send(vec![vec![Value::Null; 1000]], FEED_MEMORY as u64).await);
        let second = tokio::spawn(async move { tx.send(vec![vec![Value::Null]], 4).await });
        let first = feed.next().await.expect("first batch").expect("rows");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "the second batch waits while the first is in hand"
        );
        drop(first);
        assert!(second.await.expect("task"));
        let batch = feed.next().await.expect("second batch").expect("rows");
        assert_eq!(batch.first_row, 1);
    }
}

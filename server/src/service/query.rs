//! QueryService: unary and streaming statements, and transactions.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use weir_proto::v1 as pb;
use weir_proto::v1::query_service_server::QueryService;
use weir_proto::v1::RowBatch;

use super::arrow_ipc::ArrowBatches;
use super::convert;
use super::transactions::{InUse, Transactions};
use super::{caller, source, statement_timeout, Gate, StreamIn, StreamOut};
use crate::backend::{
    sql_text, BackendError, QueryStream, RowSink, SqlTransaction, Statement, TxOptions, MAX_ROW_BYTES,
};
use crate::error::{Error, Result};
use crate::telemetry;
use crate::tenant::{Caller, Source};

/// Batches of a result stream are cut at about this many encoded bytes.
const BATCH_BYTES: usize = 1024 * 1024;

/// The most a batch may hold: a row of up to MAX_ROW_BYTES after rows under
/// BATCH_BYTES, less room for the message's own framing (an Arrow batch's
/// metadata and padding, the schema with the first), within the 64 MiB the
/// Rust client reads.
const MAX_BATCH_BYTES: usize = MAX_ROW_BYTES + BATCH_BYTES - 64 * 1024;
/// Rows per batch when the caller does not say.
const DEFAULT_BATCH_ROWS: usize = 1000;
/// The same for Arrow IPC batches.
const DEFAULT_ARROW_BATCH_ROWS: usize = 65_536;
/// Largest row count a caller may ask for per batch.
const MAX_BATCH_ROWS: usize = 100_000;
/// Batches buffered between the engine and the client.
const STREAM_BUFFER: usize = 4;
/// Longest the rollback of a refused statement's own transaction is waited for.
const ROLLBACK_WAIT: Duration = Duration::from_secs(5);

/// The least time an own transaction's COMMIT gets when the caller set no deadline.
const COMMIT_SLICE: Duration = Duration::from_secs(5);

pub struct QueryApi {
    transactions: Arc<Transactions>,
    /// Cancelled when the shutdown grace period is over: streams still running are cut.
    cut: CancellationToken,
    gate: Gate,
    /// A result stream whose client takes nothing for this long is ended.
    stream_idle: Duration,
}

impl QueryApi {
    pub fn new(transactions: Arc<Transactions>, cut: CancellationToken, gate: Gate, stream_idle: Duration) -> Self {
        Self {
            transactions,
            cut,
            gate,
            stream_idle,
        }
    }
}

/// Where a statement runs.
enum Runs {
    /// In the caller's open transaction.
    InTransaction(InUse),
    /// On a pooled session of the source.
    Pooled(Arc<Source>),
    /// On a session of the source in a transaction of its own (set once
    /// started), committed only once the whole result is within the
    /// response caps: a write that hands back its rows, refused for them,
    /// must not stay written.
    OwnTransaction(Arc<Source>, Option<Box<dyn SqlTransaction>>),
}

/// What a statement runs on, resolved before it starts.
struct Target {
    runs: Runs,
    statement: Statement,
    caller: Caller,
}

impl QueryApi {
    fn target(
        &self,
        caller: Caller,
        source_name: &str,
        tx_id: &[u8],
        sql: String,
        params: Vec<pb::Value>,
        whole_result: bool,
    ) -> Result<Target> {
        if sql.trim().is_empty() {
            return Err(Error::InvalidArgument {
                field: "sql",
                message: "the statement is empty".into(),
            });
        }
        if caller.tenant.audit_sql {
            tracing::Span::current().record("sql", audited_sql(&sql).as_ref());
        }
        if !tx_id.is_empty() && sql_text::controls_transaction(&sql) {
            return Err(Error::InvalidArgument {
                field: "sql",
                message: "a statement that begins, commits or rolls back a transaction would end this one \
                          behind its handle: use Commit or Rollback (savepoints are fine)"
                    .into(),
            });
        }
        // Unary or streamed alike: a stream that fails part way (a value it
        // cannot send, a row too large, a client gone) leaves nothing written.
        let own_transaction = tx_id.is_empty() && sql_text::writes_and_returns_rows(&sql);
        let statement = Statement {
            sql,
            params: convert::params(params)?,
            whole_result,
        };
        let runs = if own_transaction {
            Runs::OwnTransaction(source(&caller, source_name)?, None)
        } else if tx_id.is_empty() {
            Runs::Pooled(source(&caller, source_name)?)
        } else {
            let tx = self.transactions.get(&caller, tx_id)?;
            if !source_name.is_empty() && source_name != tx.source {
                return Err(Error::InvalidArgument {
                    field: "source",
                    message: format!("the transaction belongs to source \"{}\"", tx.source),
                });
            }
            super::record_source(&caller, &tx.source);
            Runs::InTransaction(tx)
        };
        Ok(Target {
            runs,
            statement,
            caller,
        })
    }
}

impl Target {
    /// Starts the statement, handing it to the backend (a target starts once).
    async fn start(&mut self) -> Result<QueryStream> {
        let statement = std::mem::take(&mut self.statement);
        let stream = match &mut self.runs {
            Runs::InTransaction(tx) => tx.tx.query(statement).await?,
            Runs::Pooled(source) => source.backend.sql()?.query(statement).await?,
            Runs::OwnTransaction(source, own) => {
                let tx = own.insert(source.backend.sql()?.begin(TxOptions::default()).await?);
                tx.query(statement).await?
            }
        };
        Ok(stream)
    }

    /// Commits the statement's own transaction when the call succeeded, and
    /// rolls it back otherwise (in the background: the caller's answer does
    /// not wait for a cancelled statement to settle). A commit that fails
    /// fails the call. The commit is part of the call: it ends by `ends_by`
    /// and with the server's stop or the caller's revocation, its outcome
    /// then unknown.
    async fn settle<T>(
        &mut self,
        outcome: Result<T>,
        ends_by: tokio::time::Instant,
        cut: &CancellationToken,
    ) -> Result<T> {
        let Runs::OwnTransaction(_, own) = &mut self.runs else {
            return outcome;
        };
        let Some(tx) = own.take() else {
            return outcome;
        };
        if outcome.is_ok() {
            // A session lost while COMMIT was on its way: the write may have
            // committed, and running it again could write it twice.
            let caller = &self.caller;
            // What is left of the caller's deadline; without one, at least a
            // few seconds, so that a statement that took most of its time
            // limit is not cut at its COMMIT.
            let now = tokio::time::Instant::now();
            let commit_by = match super::deadline_left(caller) {
                Some(left) => now + left,
                None => ends_by.max(now + COMMIT_SLICE),
            };
            let commit = tokio::time::timeout_at(commit_by, tx.commit());
            match super::until_stopped(cut, &caller.revoked, caller.expires, commit).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) if e.is_unavailable() => {
                    return Err(BackendError::CommitOutcomeUnknown(e.to_string()).into())
                }
                Ok(Ok(Err(e))) => return Err(Error::from(e)),
                Ok(Err(_)) => {
                    return Err(
                        BackendError::CommitOutcomeUnknown("the statement's time limit passed first".into()).into(),
                    )
                }
                Err(stop) => {
                    return Err(BackendError::CommitOutcomeUnknown(format!("the call was ended: {stop}")).into())
                }
            }
        } else {
            tokio::spawn(async move {
                // Given up on, the transaction's session is dropped, which rolls it back too.
                match tokio::time::timeout(ROLLBACK_WAIT, tx.rollback()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "rolling back a refused statement's transaction"),
                    Err(_) => tracing::debug!("rolling back a refused statement's transaction took too long"),
                }
            });
        }
        outcome
    }

    /// The error as the caller should see it: in a transaction, a lost session is a lost transaction.
    fn lost(&self, e: Error) -> Error {
        if matches!(self.runs, Runs::InTransaction(_)) {
            e.in_transaction()
        } else {
            e
        }
    }

    /// Counts what was returned, in metrics and on the call's span.
    fn returned(&self, rows: u64, bytes: u64) {
        match &self.runs {
            Runs::InTransaction(tx) => self.caller.tenant.count_returned(&tx.source, rows, bytes),
            Runs::Pooled(source) | Runs::OwnTransaction(source, _) => source.count_returned(rows, bytes),
        }
        // Signed, so that trace exporters keep them as integers.
        super::record_pair(
            ("rows", &i64::try_from(rows).unwrap_or(i64::MAX)),
            ("bytes", &i64::try_from(bytes).unwrap_or(i64::MAX)),
        );
    }
}

/// When a call started and how long it waited for a gateway slot.
#[derive(Clone, Copy)]
struct Timing {
    started: Instant,
    queued: Duration,
}

fn stats(rows: u64, bytes: u64, affected: Option<u64>, timing: Timing, first_row: Option<Duration>) -> pb::QueryStats {
    let elapsed = timing.started.elapsed();
    pb::QueryStats {
        rows_returned: rows,
        rows_affected: affected,
        bytes_returned: bytes,
        elapsed: Some(convert::duration(elapsed)),
        time_to_first_row: Some(convert::duration(first_row.unwrap_or(elapsed))),
        queued: Some(convert::duration(timing.queued)),
    }
}

async fn execute_unary(target: &mut Target, timing: Timing) -> Result<pb::ExecuteResponse> {
    let started = timing.started;
    let mut query = target.start().instrument(telemetry::engine_span()).await?;
    let limits = &target.caller.tenant.limits;
    // Encoded as the engine hands the values over, as a stream's batches are.
    // A row alone past the byte cap is refused as its values arrive.
    let mut rows = convert::RowEncoder::response(usize::try_from(limits.max_bytes_per_response).unwrap_or(usize::MAX));
    let mut first_row = None;
    while let Some(row) = poll_fn(|cx| query.rows.as_mut().poll_next_into(cx, &mut rows)).await {
        first_row.get_or_insert_with(|| started.elapsed());
        row?;
        let within = rows.finish_row();
        let (count, bytes) = rows.pending();
        if count as u64 > limits.max_rows_per_response {
            return Err(Error::ResultTooLarge {
                what: "rows",
                limit: limits.max_rows_per_response,
            });
        }
        if !within || bytes as u64 > limits.max_bytes_per_response {
            return Err(Error::ResultTooLarge {
                what: "bytes",
                limit: limits.max_bytes_per_response,
            });
        }
    }
    let affected = query.rows.rows_affected();
    let (count, bytes) = rows.pending();
    let (count, bytes) = (count as u64, bytes as u64);
    target.returned(count, bytes);
    Ok(pb::ExecuteResponse {
        columns: query.columns.into_iter().map(convert::column).collect(),
        rows: Vec::new(),
        stats: Some(stats(count, bytes, affected, timing, first_row)),
        encoded_rows: rows.into_rows(),
    })
}

type StreamSender = StreamOut<pb::ExecuteStreamResponse>;

fn encoded_batch(encoded: Bytes) -> pb::ExecuteStreamResponse {
    message(pb::execute_stream_response::Payload::Batch(RowBatch {
        rows: Vec::new(),
        encoded,
    }))
}

fn message(payload: pb::execute_stream_response::Payload) -> pb::ExecuteStreamResponse {
    pb::ExecuteStreamResponse { payload: Some(payload) }
}

/// How the rows of a stream are put into its messages: one implementation
/// per `ResultFormat`, chosen once per call.
trait Batches: RowSink + Send {
    /// Ends the row whose values were given.
    fn finish_row(&mut self) -> Result<()>;
    /// Complete rows, and about how many bytes, in the batch in progress.
    fn pending(&self) -> (usize, usize);
    /// The batch in progress as a message, with its encoded size.
    fn take(&mut self) -> Result<(pb::ExecuteStreamResponse, usize)>;
    /// The message that ends the rows, in formats that have one.
    fn end(&mut self) -> Result<Option<(pb::ExecuteStreamResponse, usize)>>;
}

/// `RowBatch` messages, each row encoded as it arrives.
impl Batches for convert::RowEncoder {
    fn finish_row(&mut self) -> Result<()> {
        if !convert::RowEncoder::finish_row(self) {
            return Err(BackendError::RowTooLarge { limit: MAX_ROW_BYTES }.into());
        }
        Ok(())
    }

    fn pending(&self) -> (usize, usize) {
        convert::RowEncoder::pending(self)
    }

    fn take(&mut self) -> Result<(pb::ExecuteStreamResponse, usize)> {
        let full = self.take_batch();
        let size = full.len();
        Ok((encoded_batch(full), size))
    }

    fn end(&mut self) -> Result<Option<(pb::ExecuteStreamResponse, usize)>> {
        Ok(None)
    }
}

fn arrow_piece(bytes: Vec<u8>) -> (pb::ExecuteStreamResponse, usize) {
    let size = bytes.len();
    (message(pb::execute_stream_response::Payload::ArrowIpc(bytes)), size)
}

impl Batches for ArrowBatches {
    fn finish_row(&mut self) -> Result<()> {
        ArrowBatches::finish_row(self)
    }

    fn pending(&self) -> (usize, usize) {
        (self.rows(), self.finished_bytes())
    }

    fn take(&mut self) -> Result<(pb::ExecuteStreamResponse, usize)> {
        Ok(arrow_piece(ArrowBatches::take(self)?))
    }

    fn end(&mut self) -> Result<Option<(pb::ExecuteStreamResponse, usize)>> {
        Ok(Some(arrow_piece(ArrowBatches::end(self)?)))
    }
}

/// The most of a statement an audit line carries: the text is the caller's,
/// up to `max_request_bytes`, and would be repeated by every line of the
/// call and exported on its span.
const AUDITED_SQL_BYTES: usize = 4096;

/// Text that a statement carrying a credential contains: `ALTER ROLE ...
/// PASSWORD`, `IDENTIFIED BY`, MySQL's `SOURCE_PASSWORD`/`MASTER_PASSWORD`,
/// SQL Server's `CREATE CREDENTIAL ... SECRET`, `@rmtpassword`, application
/// roles' passwords and connection strings' `PWD=`; and the keys and
/// passphrases of encryption functions (`pgp_sym_encrypt`, `AES_ENCRYPT`,
/// `ENCRYPTBYPASSPHRASE`, `crypt`, `hmac`). Matched anywhere in a word, in
/// any case: a column named `password_hash` costs the line its statement,
/// never a secret.
const CREDENTIAL_MARKS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "identified",
    "secret",
    "credential",
    "sp_setapprole",
    "passphrase",
    "crypt",
    "hmac",
];

/// A statement as the audit line records it: cut to AUDITED_SQL_BYTES (its
/// full length said), and left out when it may carry a credential (see
/// `CREDENTIAL_MARKS`).
fn audited_sql(sql: &str) -> std::borrow::Cow<'_, str> {
    let marked = CREDENTIAL_MARKS.iter().any(|mark| {
        sql.as_bytes()
            .windows(mark.len())
            .any(|w| w.eq_ignore_ascii_case(mark.as_bytes()))
    });
    if marked {
        return format!(
            "(not recorded: a statement that may carry a credential, {} bytes)",
            sql.len()
        )
        .into();
    }
    match crate::telemetry::cut(sql, AUDITED_SQL_BYTES) {
        whole if whole.len() == sql.len() => whole.into(),
        head => format!("{head}… ({} bytes in all)", sql.len()).into(),
    }
}

/// Streams a result in bounded batches, and answers the statistics to send
/// last (once the statement's own transaction, if any, has committed).
/// Returns early, with none, dropping (and so cancelling) the statement, as
/// soon as the client goes away or stops reading.
async fn execute_stream(
    target: &mut Target,
    format: Format,
    tx: &StreamSender,
    timing: Timing,
) -> Result<Option<pb::QueryStats>> {
    use pb::execute_stream_response::Payload;
    let _active = target.caller.tenant.metrics.stream_started();
    let mut query = target.start().instrument(telemetry::engine_span()).await?;
    let columns = std::mem::take(&mut query.columns);
    // Checked before anything is sent: a column without an Arrow type fails the call whole.
    let arrow = match format.arrow {
        true => Some(ArrowBatches::new(&columns)?),
        false => None,
    };
    let metadata = pb::ResultMetadata {
        columns: columns.into_iter().map(convert::column).collect(),
    };
    if !tx.send(message(Payload::Metadata(metadata))).await? {
        return Ok(None);
    }
    match arrow {
        Some(batches) => send_rows(target, query, batches, format.batch_rows, tx, timing).await,
        None => {
            send_rows(
                target,
                query,
                convert::RowEncoder::batch(MAX_ROW_BYTES),
                format.batch_rows,
                tx,
                timing,
            )
            .await
        }
    }
}

/// The rows of a started statement; answers its statistics.
async fn send_rows(
    target: &Target,
    mut query: QueryStream,
    mut batches: impl Batches,
    batch_rows: usize,
    tx: &StreamSender,
    timing: Timing,
) -> Result<Option<pb::QueryStats>> {
    let mut first_row = None;
    // Counted however the stream ends: cut, failed or complete.
    let mut sent = Returned {
        target,
        rows: 0,
        bytes: 0,
    };
    // Rows are encoded as they arrive, on this task: each row's values are
    // freed while still in cache, and the response task only copies bytes.
    loop {
        let filled = tokio::select! {
            biased;
            filled = poll_fn(|cx| fill(cx, &mut query, &mut batches, batch_rows, &mut first_row, &timing)) => filled?,
            () = tx.closed() => return Ok(None),
        };
        if !filled {
            break;
        }
        // Counted once the stream took them: a batch its client left
        // before was not returned.
        let (rows, _) = batches.pending();
        let (batch, size) = batches.take()?;
        if !tx.send(batch).await? {
            return Ok(None);
        }
        sent.rows += rows as u64;
        sent.bytes += size as u64;
    }
    let (rows, _) = batches.pending();
    let mut last = Vec::with_capacity(2);
    if rows > 0 {
        last.push((batches.take()?, rows as u64));
    }
    last.extend(batches.end()?.into_iter().map(|m| (m, 0)));
    for ((message, size), rows) in last {
        if !tx.send(message).await? {
            return Ok(None);
        }
        sent.rows += rows;
        sent.bytes += size as u64;
    }
    let affected = query.rows.rows_affected();
    Ok(Some(stats(sent.rows, sent.bytes, affected, timing, first_row)))
}

/// Rows and bytes a stream has sent, counted for its source when it ends.
struct Returned<'a> {
    target: &'a Target,
    rows: u64,
    bytes: u64,
}

impl Drop for Returned<'_> {
    fn drop(&mut self) {
        self.target.returned(self.rows, self.bytes);
    }
}

/// Takes rows into `batches` for as long as the engine has them ready:
/// `Ready(true)` once a batch is full, `Ready(false)` at the end of the
/// rows. Looping here rather than in `send_rows` keeps the look at whether
/// the client is still there to when the engine makes the stream wait.
fn fill(
    cx: &mut std::task::Context<'_>,
    query: &mut QueryStream,
    batches: &mut impl Batches,
    batch_rows: usize,
    first_row: &mut Option<Duration>,
    timing: &Timing,
) -> std::task::Poll<Result<bool>> {
    use std::task::Poll;
    loop {
        let Some(row) = std::task::ready!(query.rows.as_mut().poll_next_into(cx, batches)) else {
            return Poll::Ready(Ok(false));
        };
        first_row.get_or_insert_with(|| timing.started.elapsed());
        // A failed row ends the stream: what it left half-encoded is never sent.
        row?;
        let (_, before) = batches.pending();
        batches.finish_row()?;
        let (rows, bytes) = batches.pending();
        // The batch goes in one message. A row past MAX_ROW_BYTES ends the
        // stream, whatever came before it; the rows before it are under
        // BATCH_BYTES, so the batch stays within what a message may carry
        // (MAX_BATCH_BYTES keeps the few bytes of its framing in it).
        if bytes - before > MAX_ROW_BYTES || bytes > MAX_BATCH_BYTES {
            return Poll::Ready(Err(BackendError::RowTooLarge { limit: MAX_ROW_BYTES }.into()));
        }
        if rows >= batch_rows || bytes >= BATCH_BYTES {
            return Poll::Ready(Ok(true));
        }
    }
}

/// What a stream's rows are encoded as, and how many go in a batch.
#[derive(Clone, Copy)]
struct Format {
    arrow: bool,
    batch_rows: usize,
}

impl Format {
    fn of(request: &pb::ExecuteStreamRequest) -> Result<Format> {
        let (arrow, default_rows) = match pb::ResultFormat::try_from(request.format) {
            Ok(pb::ResultFormat::Unspecified | pb::ResultFormat::Rows) => (false, DEFAULT_BATCH_ROWS),
            // Arrow readers work best on large batches; the byte cap still bounds them.
            Ok(pb::ResultFormat::ArrowIpc) => (true, DEFAULT_ARROW_BATCH_ROWS),
            Err(_) => {
                return Err(Error::InvalidArgument {
                    field: "format",
                    message: format!("unknown result format {}", request.format),
                })
            }
        };
        let batch_rows = match request.max_batch_rows as usize {
            0 => default_rows,
            n => n.min(MAX_BATCH_ROWS),
        };
        Ok(Format { arrow, batch_rows })
    }
}

#[tonic::async_trait]
impl QueryService for QueryApi {
    async fn execute(&self, request: Request<pb::ExecuteRequest>) -> Result<Response<pb::ExecuteResponse>, Status> {
        let started = Instant::now();
        let caller = caller(&request)?;
        let r = request.into_inner();
        let mut target = self.target(caller, &r.source, &r.transaction_id, r.sql, r.params, true)?;
        let admitted = self
            .gate
            .admit(&target.caller, Gate::priority(r.options.as_ref())?)
            .await?;
        let timeout = statement_timeout(&target.caller);
        let ends_by = tokio::time::Instant::now() + timeout;
        let timing = Timing {
            started,
            queued: admitted.queued,
        };
        let revoked = target.caller.revoked.clone();
        let result = super::until_stopped(
            &self.cut,
            &revoked,
            target.caller.expires,
            tokio::time::timeout(timeout, execute_unary(&mut target, timing)),
        )
        .await;
        let response = result.and_then(|r| r.map_err(|_| Error::Timeout(timeout))?.map_err(|e| target.lost(e)));
        Ok(Response::new(target.settle(response, ends_by, &self.cut).await?))
    }

    type ExecuteStreamStream = StreamIn<pb::ExecuteStreamResponse>;

    async fn execute_stream(
        &self,
        request: Request<pb::ExecuteStreamRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let started = Instant::now();
        let caller = caller(&request)?;
        let call_slot = super::slot_until_end(&request);
        let r = request.into_inner();
        let format = Format::of(&r)?;
        let mut target = self.target(caller, &r.source, &r.transaction_id, r.sql, r.params, false)?;
        let priority = Gate::priority(r.options.as_ref())?;
        let stream_slot = target.caller.tenant.limiter.admit_stream()?;
        let admitted = self.gate.admit(&target.caller, priority).await?;
        let timeout = statement_timeout(&target.caller);
        let timing = Timing {
            started,
            queued: admitted.queued,
        };
        let (tx, rx) = StreamOut::channel(STREAM_BUFFER, self.stream_idle);
        let cut = self.cut.clone();
        let (revoked, expires) = (target.caller.revoked.clone(), target.caller.expires);
        let ends_by = tokio::time::Instant::now() + timeout;
        let own_transaction = matches!(target.runs, Runs::OwnTransaction(..));
        let stream_idle = self.stream_idle;
        tokio::spawn(
            async move {
                // The slots are held until the stream ends.
                let _slots = (stream_slot, admitted, call_slot);
                let outcome = tokio::select! {
                    // The stop first, as in `until_stopped`.
                    biased;
                    e = super::stopped(&cut, &revoked, expires) => Err(e),
                    r = tokio::time::timeout(timeout, execute_stream(&mut target, format, &tx, timing)) => {
                        r.map_err(|_| Error::Timeout(timeout)).and_then(|r| r)
                    }
                    // The client left before the first row: stop waiting for the engine too.
                    () = tx.closed() => Ok(None),
                };
                // A stream the client left ends without a word; its own
                // transaction, if any, is rolled back as it is dropped.
                let outcome = match outcome.map_err(|e| target.lost(e)) {
                    Ok(None) => Ok(()),
                    // A write's own transaction commits only once the
                    // transport has taken its last rows: a client that left,
                    // or stopped reading, before them was handed rows of a
                    // write it must take as not done.
                    // The wait is within the statement's time limit, as the
                    // rows were: a client slow to take the last ones must not
                    // hold the write's locks (SQLite's write turn) past it.
                    Ok(Some(stats)) => {
                        let delivered = if own_transaction {
                            let drained = tokio::time::timeout_at(ends_by, tx.drained());
                            match super::until_stopped(&cut, &revoked, expires, drained).await {
                                Ok(Ok(true)) => Ok(stats),
                                Ok(Ok(false)) => Err(Error::StreamStalled(stream_idle)),
                                Ok(Err(_)) => {
                                    // Rows of a write rolled back: not handed over now.
                                    tx.discard_buffered();
                                    Err(Error::Timeout(timeout))
                                }
                                Err(e) => Err(e),
                            }
                        } else {
                            Ok(stats)
                        };
                        let settled = target.settle(delivered, ends_by, &cut).await;
                        // Committed: a client that left meanwhile is owed nothing more.
                        if let Ok(stats) = settled {
                            tx.deliver(message(pb::execute_stream_response::Payload::Stats(stats)))
                                .await;
                        }
                        settled.map(|_| ())
                    }
                    Err(e) => target.settle(Err::<(), _>(e), ends_by, &cut).await,
                };
                if let Err(e) = outcome {
                    let status = Status::from(e);
                    // Not the message: an engine's may quote a parameter or a row's values.
                    tracing::info!(code = ?status.code(), "stream ended with an error");
                    tx.fail(status);
                }
                // The statement and its session are done with; the slots go
                // once the last rows have left the buffer.
                drop(target);
                tx.drained().await;
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(rx))
    }

    async fn begin_transaction(
        &self,
        request: Request<pb::BeginTransactionRequest>,
    ) -> Result<Response<pb::BeginTransactionResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let options = TxOptions {
            isolation: convert::isolation(r.isolation)?,
            read_only: r.read_only,
        };
        let priority = Gate::priority(r.options.as_ref())?;
        let source = source(&caller, &r.source)?;
        self.transactions.check_room(&caller)?;
        let _admitted = self.gate.admit(&caller, priority).await?;
        let timeout = statement_timeout(&caller);
        let tx = tokio::time::timeout(timeout, source.backend.sql()?.begin(options))
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(Error::from)?;
        let transaction_id = self
            .transactions
            .insert(&caller, &source, options.read_only, tx)
            .await?;
        Ok(Response::new(pb::BeginTransactionResponse {
            transaction_id,
            idle_timeout: Some(convert::duration(caller.tenant.limits.transaction_idle_timeout)),
        }))
    }

    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        let caller = caller(&request)?;
        self.transactions
            .finish(&caller, &request.get_ref().transaction_id, true)
            .await?;
        Ok(Response::new(pb::CommitResponse {}))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        let caller = caller(&request)?;
        self.transactions
            .finish(&caller, &request.get_ref().transaction_id, false)
            .await?;
        Ok(Response::new(pb::RollbackResponse {}))
    }
}

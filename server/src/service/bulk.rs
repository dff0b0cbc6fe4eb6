//! BulkLoadService: a header, then row batches, into one engine transaction.
//! The header is checked against the table's real columns before any row is
//! read; rows are checked against those columns as they arrive, charged to
//! the tenant's load rate (slowing the client, not refusing it), and handed
//! to the engine through a bounded feed. Whatever stops a load early (a bad
//! row, a limit, the client going away, a deadline) ends the feed without
//! its completion mark, and the engine rolls back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::v1 as pb;
use weir_proto::v1::bulk_load_service_server::BulkLoadService;
use weir_proto::v1::load_request::Message as LoadMessage;

use super::{bad, caller, convert, deadline_left, display_table, source, Gate};
use crate::backend::bulk::{row_feed, Receipt, RowSender, Verdict};
use crate::backend::{BackendError, Column, ColumnGeneration, LoadMode, LoadOutcome, LoadSpec, Row, TableDescription};
use crate::config::BulkConfig;
use crate::error::{Error, Result};
use crate::tenant::{Caller, Revocation, Source};

/// Rows per engine batch when the caller gives no hint.
const DEFAULT_BATCH_ROWS: usize = 5000;
/// Largest batch hint honoured, and most rows in one message.
const MAX_BATCH_ROWS: usize = 100_000;
/// Batches buffered between the client and the engine.
const FEED_DEPTH: usize = 4;
/// Skipped rows reported back in `row_errors`; later ones are counted only.
const MAX_REPORTED_ROW_ERRORS: usize = 1000;
/// Longest accepted `load_id`.
const MAX_LOAD_ID: usize = 200;
/// Most a load cut by the end of the grace period reads ahead of what it
/// loaded, looking for its client's end (HTTP/2 flow control holds about
/// a megabyte per call; a client that keeps sending is not waited for).
/// Held decoded, outside the feed's budget: narrow rows take many times
/// their wire size.
const READ_AHEAD_BYTES: usize = 4 << 20;
/// How long a load the gateway found a bad row in waits for the engine to
/// report an earlier one from the rows it has, before stopping what it runs
/// (a COPY waiting for a lock, a REPLACE's DELETE of a large table).
const ENGINE_ROW_GRACE: Duration = Duration::from_secs(1);

pub struct BulkApi {
    config: BulkConfig,
    gate: Gate,
    /// Cancelled when the shutdown grace period is over: loads still
    /// receiving rows are rolled back and their callers told to retry.
    cut: CancellationToken,
}

impl BulkApi {
    pub fn new(config: BulkConfig, gate: Gate, cut: CancellationToken) -> Self {
        Self { config, gate, cut }
    }
}

/// The checked header: everything the load needs except the table's columns.
struct Header {
    source: String,
    schema: Option<String>,
    table: String,
    columns: Vec<String>,
    mode: LoadMode,
    conflict: Vec<String>,
    load_id: Option<String>,
    batch_rows: usize,
    skip_bad_rows: bool,
}

impl TryFrom<pb::LoadHeader> for Header {
    type Error = Error;

    fn try_from(h: pb::LoadHeader) -> Result<Self> {
        if h.table.is_empty() {
            return Err(bad("header.table", "a table name is required"));
        }
        if h.columns.is_empty() {
            return Err(bad("header.columns", "name the columns the row values go into"));
        }
        let mode = convert::load_mode(h.mode)?;
        match mode {
            LoadMode::Upsert if h.conflict_columns.is_empty() => {
                return Err(bad(
                    "header.conflict_columns",
                    "an UPSERT needs the columns of a unique key",
                ));
            }
            LoadMode::Append | LoadMode::Replace if !h.conflict_columns.is_empty() => {
                return Err(bad("header.conflict_columns", "conflict columns apply to UPSERT only"));
            }
            _ => {}
        }
        if h.load_id.len() > MAX_LOAD_ID {
            return Err(bad(
                "header.load_id",
                format!("at most {MAX_LOAD_ID} bytes (a UUID is a good load id)"),
            ));
        }
        let batch_rows = match h.batch_size_hint {
            0 => DEFAULT_BATCH_ROWS,
            n => (n as usize).min(MAX_BATCH_ROWS),
        };
        let skip_bad_rows = match pb::BadRowPolicy::try_from(h.bad_rows) {
            Ok(pb::BadRowPolicy::Unspecified) => false,
            Ok(pb::BadRowPolicy::Skip) => true,
            Err(_) => return Err(bad("header.bad_rows", format!("unknown policy {}", h.bad_rows))),
        };
        Ok(Header {
            source: h.source,
            schema: (!h.schema.is_empty()).then_some(h.schema),
            table: h.table,
            columns: h.columns,
            mode,
            conflict: h.conflict_columns,
            load_id: (!h.load_id.is_empty()).then_some(h.load_id),
            batch_rows,
            skip_bad_rows,
        })
    }
}

/// Finds a requested column among the table's: exactly, or else by a
/// case-insensitive match that is unambiguous (CSV headers rarely match case).
fn find_column<'a, I>(columns: I, name: &str) -> Option<&'a Column>
where
    I: Iterator<Item = &'a Column> + Clone,
{
    if let Some(c) = columns.clone().find(|c| c.name == name) {
        return Some(c);
    }
    let mut folded = columns.filter(|c| c.name.eq_ignore_ascii_case(name));
    match (folded.next(), folded.next()) {
        (Some(c), None) => Some(c),
        _ => None,
    }
}

/// The load's columns with their engine types, and the upsert key, checked
/// against the table as it is now.
fn resolve(header: &Header, table: &TableDescription) -> Result<(Vec<Column>, Vec<String>)> {
    let name = display_table(header.schema.as_deref(), &header.table);
    let mut columns: Vec<Column> = Vec::with_capacity(header.columns.len());
    for requested in &header.columns {
        let column = find_column(table.columns.iter().map(|c| &c.column), requested).ok_or_else(|| {
            let known: Vec<_> = table.columns.iter().map(|c| c.column.name.as_str()).collect();
            bad(
                "header.columns",
                format!(
                    "{name} has no column \"{requested}\"; its columns are {}",
                    known.join(", ")
                ),
            )
        })?;
        if columns.iter().any(|c| c.name == column.name) {
            return Err(bad(
                "header.columns",
                format!("column \"{}\" is named twice", column.name),
            ));
        }
        // The engine computes these and refuses them in a load, each engine
        // with an error of its own.
        let computed = table
            .columns
            .iter()
            .any(|c| c.column.name == column.name && c.generation == ColumnGeneration::Computed);
        if computed {
            return Err(bad(
                "header.columns",
                format!(
                    "column \"{}\" is computed by the engine: leave it out of the load",
                    column.name
                ),
            ));
        }
        columns.push(column.clone());
    }
    let mut conflict = Vec::with_capacity(header.conflict.len());
    for requested in &header.conflict {
        match find_column(columns.iter(), requested) {
            Some(c) if !conflict.contains(&c.name) => conflict.push(c.name.clone()),
            Some(c) => {
                return Err(bad(
                    "header.conflict_columns",
                    format!("column \"{}\" is named twice", c.name),
                ))
            }
            None => {
                return Err(bad(
                    "header.conflict_columns",
                    format!("conflict column \"{requested}\" must also be one of the loaded columns"),
                ))
            }
        }
    }
    if !conflict.is_empty() {
        let same = |key: &[String]| key.len() == conflict.len() && key.iter().all(|k| conflict.contains(k));
        // The primary key counts as its index does where one is listed: a
        // PostgreSQL DEFERRABLE one is listed as not unique, and a MySQL one
        // over a prefix names it (`s(3)`): an UPSERT matching on either would
        // fail, or update the row that shares the prefix.
        let usable_primary = table
            .indexes
            .iter()
            .find(|i| i.primary)
            .is_none_or(|i| i.unique && same(&i.columns));
        let keyed = table
            .primary_key
            .as_ref()
            .is_some_and(|pk| usable_primary && same(&pk.columns))
            || table.indexes.iter().any(|i| i.unique && !i.partial && same(&i.columns));
        if !keyed {
            return Err(bad(
                "header.conflict_columns",
                format!(
                    "{name} has no primary key or unique index on ({}) (a partial, deferrable or column-prefix one \
                     does not count); an UPSERT matches rows on one",
                    conflict.join(", ")
                ),
            ));
        }
    }
    Ok((columns, conflict))
}

/// Rows skipped under BAD_ROW_POLICY_SKIP, to report them and to translate
/// the engine's row numbers (which count only the rows it received) back
/// into the caller's.
#[derive(Default)]
struct Skipped {
    /// One bit per row of the caller's up to the last one skipped, set for
    /// the skipped ones: bounded by the rows received (12.5 MB at 100M),
    /// where a list of runs grew by an entry per bad row of a load that
    /// alternates good and bad rows.
    bits: Vec<u64>,
    count: u64,
    reported: Vec<pb::RowError>,
}

impl Skipped {
    fn add(&mut self, index: u64, column: Option<&str>, message: String) {
        self.count += 1;
        let word = usize::try_from(index / 64).unwrap_or(usize::MAX);
        if self.bits.len() <= word {
            self.bits.resize(word.saturating_add(1), 0);
        }
        if let Some(w) = self.bits.get_mut(word) {
            *w |= 1 << (index % 64);
        }
        if self.reported.len() < MAX_REPORTED_ROW_ERRORS {
            // Each cut as a status message is: a thousand of them travel in
            // one response, which a client's receive limit must take.
            self.reported.push(pb::RowError {
                row_index: index,
                column: column.unwrap_or_default().to_string(),
                message: crate::error::shortened(message),
            });
        }
    }

    /// The caller's index of the engine's `sent`-th row: the `sent`-th row
    /// (from 0) not skipped. Asked once, for an engine's row error.
    fn caller_index(&self, sent: u64) -> u64 {
        let mut left = sent;
        for (i, &w) in self.bits.iter().enumerate() {
            let base = i as u64 * 64;
            let kept = u64::from((!w).count_ones());
            if left >= kept {
                left -= kept;
                continue;
            }
            // The `left`-th clear bit of this word.
            let mut clear = !w;
            for _ in 0..left {
                clear &= clear - 1;
            }
            return base + u64::from(clear.trailing_zeros());
        }
        self.bits.len() as u64 * 64 + left
    }

    fn translate(&self, e: BackendError) -> BackendError {
        match e {
            BackendError::Row {
                index,
                column,
                code,
                message,
            } => BackendError::Row {
                index: self.caller_index(index),
                column,
                code,
                message,
            },
            other => other,
        }
    }
}

/// Converts one row; the error names the column at fault. `keys`: which
/// columns are an upsert's conflict columns, where NULL is refused: it never
/// matches a key, so the row would be inserted again by every run of an
/// upsert meant to be idempotent (SQL Server's MERGE would fail instead).
fn convert_row<'a>(row: pb::Row, checks: &RowChecks<'a>) -> std::result::Result<Row, (Option<&'a str>, String)> {
    let (columns, keys) = (checks.columns, checks.keys);
    if row.values.len() != columns.len() {
        return Err((
            None,
            format!(
                "has {} values, but the load names {} columns",
                row.values.len(),
                columns.len()
            ),
        ));
    }
    row.values
        .into_iter()
        .zip(columns)
        .zip(keys)
        .map(|((v, c), key)| match convert::value_for_column(v, c) {
            Ok(crate::backend::Value::Null) if *key => Err((
                Some(c.name.as_str()),
                "is NULL, and NULL matches no key: an upsert's conflict columns need values".to_string(),
            )),
            Ok(v) => match (checks.refuses)(c, &v) {
                Some(refusal) => Err((Some(c.name.as_str()), refusal)),
                None => Ok(v),
            },
            converted => converted.map_err(|m| (Some(c.name.as_str()), m)),
        })
        .collect()
}

/// The client's messages, until the shutdown grace period is over or the
/// caller's credential is revoked or expires.
struct Incoming<'a> {
    stream: &'a mut Streaming<pb::LoadRequest>,
    /// Cancelled when the grace period is over.
    cut: CancellationToken,
    revoked: Revocation,
    expires: Option<tokio::time::Instant>,
    /// A client that sends nothing for this long loses its load: it holds
    /// a transaction, its locks and a connection (and, on SQLite, the
    /// source's one write turn) while it is silent.
    idle: Duration,
    /// The grace period is over and the client's last messages, its end
    /// among them, had been received: they are taken, then the end.
    draining: Option<std::collections::VecDeque<pb::LoadRequest>>,
}

impl Incoming<'_> {
    /// The next message, or why the load was stopped: a load with rows
    /// still to come then is rolled back, and one whose client has sent its
    /// last message goes on to its commit.
    async fn message(&mut self) -> Result<std::result::Result<Option<pb::LoadRequest>, Status>> {
        if let Some(received) = &mut self.draining {
            return Ok(Ok(received.pop_front()));
        }
        let stop = tokio::select! {
            // The stop first: a client that always has rows ready must still see it.
            biased;
            e = super::stopped(&self.cut, &self.revoked, self.expires) => e,
            message = tokio::time::timeout(self.idle, self.stream.message()) => {
                return message.map_err(|_| Error::LoadIdle(self.idle));
            }
        };
        // Stopped: what the client has sent already may run to the stream's
        // end (its last messages waited behind the tenant's load rate, say).
        // At shutdown the messages already received are read ahead, and the
        // load commits if its end is among them; a revoked caller's load
        // commits only if its end is the next.
        let reading_ahead = matches!(stop, Error::ShuttingDown);
        let mut received = std::collections::VecDeque::new();
        let mut bytes = 0;
        loop {
            match self.stream.message().now_or_never() {
                Some(Ok(None)) => {
                    let next = received.pop_front();
                    self.draining = Some(received);
                    return Ok(Ok(next));
                }
                Some(Ok(Some(message))) if reading_ahead && bytes < READ_AHEAD_BYTES => {
                    bytes += message.encoded_len();
                    received.push_back(message);
                }
                _ => return Err(stop),
            }
        }
    }

    /// Waits for `wait` (a turn at the tenant's load rate, room in the
    /// engine's feed), unless the caller's credential is revoked or expires
    /// first: such a load does not keep its transaction and slots for the
    /// seconds a large batch's turn may take, or while the engine waits for
    /// a lock. The end of the grace period does not cut the wait: a load
    /// whose client has sent everything still commits (`message` tells).
    async fn unless_stopped<T>(&self, wait: impl std::future::Future<Output = T>) -> Result<T> {
        tokio::pin!(wait);
        tokio::select! {
            biased;
            e = super::stopped(&self.cut, &self.revoked, self.expires) => match e {
                Error::ShuttingDown => Ok(wait.await),
                e => Err(e),
            },
            done = &mut wait => Ok(done),
        }
    }
}

/// Why the load's request stream could not be read. A message the gRPC
/// layer refused (too large, or not decodable) is the caller's to hear as
/// such: ABORTED would say "run it again", and the same message would fail
/// the same way. Anything else is the client going away or resetting the
/// call. Either way nothing is committed.
fn unreadable(status: Status) -> Error {
    if super::refused_by_transport(&status) {
        tracing::info!(code = ?status.code(), "a load message was refused; rolling back");
        return Error::BadMessage(status);
    }
    tracing::info!(code = ?status.code(), "the client ended the load before its end; rolling back");
    Error::Backend(BackendError::LoadAbandoned)
}

/// How the client's rows stopped coming.
enum Fed {
    /// The client ended its stream after `received` rows.
    Ended { received: u64 },
    /// The engine stopped taking rows (an error, or a replayed load id).
    EngineStopped,
}

/// What each row is checked against: its columns, which of them are an
/// upsert's conflict columns, and whether a bad row is skipped.
struct RowChecks<'a> {
    columns: &'a [Column],
    keys: &'a [bool],
    skip_bad_rows: bool,
    /// The engine's own refusals (`SqlSource::refuses`), checked here so
    /// that skipping covers them.
    refuses: &'a (dyn Fn(&Column, &crate::backend::Value) -> Option<String> + Sync),
}

/// Reads the row batches of the stream into the engine's feed until the
/// stream ends; returns early with the reason when the load must stop.
async fn feed_rows(
    incoming: &mut Incoming<'_>,
    sender: &RowSender,
    caller: &Caller,
    checks: &RowChecks<'_>,
    skipped: &mut Skipped,
    throttled: &mut Duration,
) -> Result<Fed> {
    let limits = &caller.tenant.limits;
    let mut received = 0u64;
    loop {
        let message = match incoming.message().await? {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Fed::Ended { received }),
            Err(status) => return Err(unreadable(status)),
        };
        let rows = match message.message {
            Some(LoadMessage::Rows(rows)) => rows.rows,
            Some(LoadMessage::Header(_)) => return Err(bad("header", "a load has one header, in its first message")),
            Some(LoadMessage::Abort(abort)) => {
                let reason: String = abort.reason.chars().take(200).collect();
                return Err(Error::LoadAborted(reason));
            }
            None => continue,
        };
        // Rows of a message are converted and queued together: millions of
        // empty ones (two bytes each on the wire) would hold gigabytes.
        if rows.len() > MAX_BATCH_ROWS {
            return Err(bad(
                "rows",
                format!("{} rows in one message; send at most {MAX_BATCH_ROWS}", rows.len()),
            ));
        }
        let bytes = rows.iter().map(|r| r.encoded_len() as u64).sum::<u64>();
        let first = received;
        received += rows.len() as u64;
        if received > limits.max_rows_per_load {
            return Err(Error::LoadTooLarge {
                limit: limits.max_rows_per_load,
            });
        }
        let mut batch = Vec::with_capacity(rows.len());
        for (i, row) in rows.into_iter().enumerate() {
            let index = first + i as u64;
            match convert_row(row, checks) {
                Ok(values) => batch.push(values),
                Err((column, message)) if checks.skip_bad_rows => skipped.add(index, column, message),
                Err((column, message)) => {
                    return Err(Error::Backend(BackendError::Row {
                        index,
                        column: column.map(str::to_string),
                        code: String::new(),
                        message,
                    }))
                }
            }
        }
        *throttled += incoming
            .unless_stopped(caller.tenant.limiter.charge_load(batch.len() as u64, bytes))
            .await?;
        if !incoming.unless_stopped(sender.send(batch, bytes)).await? {
            // The engine stopped (an error, or a replayed load id): its result says why.
            return Ok(Fed::EngineStopped);
        }
    }
}

impl BulkApi {
    async fn run(
        &self,
        caller: Caller,
        mut stream: Streaming<pb::LoadRequest>,
        verdict: Verdict,
    ) -> Result<pb::LoadResponse> {
        let started = Instant::now();
        // A client that opens a load and says nothing holds a stream and a
        // concurrency slot: as long as a silent one mid-load, no longer.
        let idle = caller.tenant.limits.transaction_idle_timeout;
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| Error::LoadIdle(idle))?;
        let (header, options) = match first {
            Ok(Some(pb::LoadRequest {
                message: Some(LoadMessage::Header(mut h)),
            })) => {
                let options = h.options.take();
                (Header::try_from(h)?, options)
            }
            Ok(_) => return Err(bad("header", "the first message of a load must be its header")),
            Err(status) => return Err(unreadable(status)),
        };
        let priority = Gate::priority(options.as_ref())?;
        let source: Arc<Source> = source(&caller, &header.source)?;
        let slot = caller.tenant.limiter.admit_load()?;
        let admitted = self.gate.admit(&caller, priority).await?;
        let table = tokio::time::timeout(
            caller.tenant.limits.statement_timeout,
            source
                .backend
                .sql()?
                .describe_table(header.schema.as_deref(), &header.table),
        )
        .await
        .map_err(|_| Error::Timeout(caller.tenant.limits.statement_timeout))??;
        let (columns, conflict) = resolve(&header, &table)?;
        let keys: Vec<bool> = columns.iter().map(|c| conflict.contains(&c.name)).collect();
        let target = display_table(header.schema.as_deref(), &header.table);
        super::record_object(&target);
        let spec = LoadSpec {
            schema: header.schema.clone(),
            table: header.table.clone(),
            columns: columns.clone(),
            mode: header.mode,
            conflict,
            receipt: header.load_id.clone().map(|load_id| Receipt {
                table: self.config.load_id_table.clone(),
                tenant: caller.tenant.id.clone(),
                load_id,
                target,
            }),
            batch_rows: header.batch_rows,
            kind: table.table.kind,
        };
        let (sender, feed) = row_feed(FEED_DEPTH, verdict.clone());
        // The engine side runs on its own task: if this call is dropped (client
        // gone, deadline), the feed closes and that task rolls back cleanly.
        let backend = source.backend.sql()?.clone();
        // The load's slot is held until its rollback or commit is over, even if this call is gone.
        let engine = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _slots = (slot, admitted);
            backend.load(spec, feed).await
        }));
        let mut skipped = Skipped::default();
        let mut throttled = Duration::ZERO;
        let backend_for_checks = source.backend.sql()?;
        let mut incoming = Incoming {
            stream: &mut stream,
            cut: self.cut.clone(),
            revoked: caller.revoked.clone(),
            expires: caller.expires,
            idle: caller.tenant.limits.transaction_idle_timeout,
            draining: None,
        };
        let fed = feed_rows(
            &mut incoming,
            &sender,
            &caller,
            &RowChecks {
                columns: &columns,
                keys: &keys,
                skip_bad_rows: header.skip_bad_rows,
                refuses: &|c, v| backend_for_checks.refuses(c, v),
            },
            &mut skipped,
            &mut throttled,
        )
        .await;
        match fed {
            // Every row of a REPLACE skipped (types that drifted, say): a
            // commit would leave the table emptied by what was meant to refill it.
            Ok(Fed::Ended { received })
                if header.mode == LoadMode::Replace && received > 0 && skipped.count == received =>
            {
                verdict.abandon();
                drop(sender);
                let _ = engine.await;
                let first = skipped
                    .reported
                    .first()
                    .map(|r| format!("; the first, row {}: {}", r.row_index, r.message))
                    .unwrap_or_default();
                return Err(Error::Backend(BackendError::Engine {
                    kind: crate::backend::EngineErrorKind::FailedPrecondition,
                    code: String::new(),
                    message: format!(
                        "every row of this REPLACE ({received}) was skipped as bad, which would leave the table \
                         empty: nothing was changed{first}"
                    ),
                }));
            }
            Ok(Fed::Ended { .. }) => {
                sender.finish().await;
            }
            Ok(Fed::EngineStopped) => drop(sender),
            Err(e) => {
                // The load cannot commit now: what the engine runs stops too
                // (a REPLACE's DELETE, a COPY waiting for a lock, which would
                // hold the load's slots and locks until done), given up before
                // the feed closes so that the engine hears of it first. For a
                // bad row the gateway found, not at once: the engine may
                // still meet one before it in the rows it has, which is the
                // one to report; it has a moment to, and is then stopped.
                let gateway_row = matches!(e, Error::Backend(BackendError::Row { .. }));
                if !gateway_row {
                    verdict.abandon();
                }
                drop(sender);
                let mut engine = engine;
                let ended = match tokio::time::timeout(ENGINE_ROW_GRACE, &mut engine).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        verdict.abandon();
                        engine.await
                    }
                };
                // Waited for the rollback, so the table is as it was when the
                // caller hears of it. The engine may have met a bad row that
                // came before this one: the first is the one to fix.
                let engine_failed = ended.ok().and_then(Result::err).map(|f| skipped.translate(f));
                let engines_first = match (&engine_failed, &e) {
                    (
                        Some(BackendError::Row { index: earlier, .. }),
                        Error::Backend(BackendError::Row { index, .. }),
                    ) => earlier < index,
                    _ => false,
                };
                return match engine_failed {
                    Some(first) if engines_first => Err(Error::Backend(first)),
                    _ => Err(e),
                };
            }
        }
        let outcome: LoadOutcome = engine
            .await
            .map_err(|e| Error::Backend(BackendError::Internal(format!("load task failed: {e}"))))?
            .map_err(|e| Error::Backend(skipped.translate(e)))?;
        let span = tracing::Span::current();
        span.record(
            "rows",
            i64::try_from(outcome.inserted + outcome.updated).unwrap_or(i64::MAX),
        );
        span.record("bytes", i64::try_from(outcome.bytes).unwrap_or(i64::MAX));
        // A replay's rows were not loaded by this call: what it skipped on
        // the way to the receipt is not the first load's (which are not kept).
        if outcome.replayed {
            skipped = Skipped::default();
        }
        Ok(pb::LoadResponse {
            rows_inserted: outcome.inserted,
            rows_updated: outcome.updated,
            bytes_received: outcome.bytes,
            elapsed: Some(convert::duration(started.elapsed())),
            engine_path: outcome.engine_path,
            replayed: outcome.replayed,
            rows_skipped: skipped.count,
            row_errors: skipped.reported,
            throttled: Some(convert::duration(throttled)),
        })
    }
}

/// A call dropped before its answer (the client cancelled or went away after
/// its last message, while the engine still merged or committed) gives the
/// load up: a COMMIT not begun by then never runs, as the client, told
/// nothing, would run the load again. Once COMMIT has begun, or the load is
/// over, this changes nothing.
struct AbandonOnDrop(Verdict);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

#[tonic::async_trait]
impl BulkLoadService for BulkApi {
    async fn load(&self, request: Request<Streaming<pb::LoadRequest>>) -> Result<Response<pb::LoadResponse>, Status> {
        let caller = caller(&request)?;
        let deadline = deadline_left(&caller);
        let verdict = Verdict::default();
        let _abandoned_if_dropped = AbandonOnDrop(verdict.clone());
        let run = self.run(caller, request.into_inner(), verdict.clone());
        let response = match deadline {
            // A little ahead of the transport, which cuts an expired call with
            // a bare CANCELLED: this way the caller learns why, with a reason.
            Some(limit) => {
                tokio::pin!(run);
                match tokio::time::timeout(limit, &mut run).await {
                    Ok(response) => response,
                    // The engine rolls back, even if it has every row by now.
                    Err(_) if verdict.abandon() => Err(Error::LoadTimeout(limit)),
                    // It has begun to commit: its outcome is the answer.
                    Err(_) => run.await,
                }
            }
            None => run.await,
        }?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ColumnInfo, ColumnType, Index, PrimaryKey, TableInfo, TableKind};

    fn table() -> TableDescription {
        let column = |name: &str, ordinal| ColumnInfo {
            column: Column::new(name, "integer", ColumnType::Int),
            ordinal,
            default_expression: String::new(),
            comment: String::new(),
            generation: ColumnGeneration::None,
            generation_expression: String::new(),
        };
        TableDescription {
            table: TableInfo {
                schema: "public".into(),
                name: "t".into(),
                kind: TableKind::Table,
                row_estimate: None,
                comment: String::new(),
            },
            columns: vec![column("id", 1), column("Code", 2), column("v", 3)],
            primary_key: Some(PrimaryKey {
                name: "t_pkey".into(),
                columns: vec!["id".into()],
            }),
            foreign_keys: vec![],
            indexes: vec![Index {
                name: "t_code".into(),
                columns: vec!["Code".into()],
                unique: true,
                primary: false,
                method: "btree".into(),
                partial: false,
            }],
            change_stream_ready: false,
            change_stream_reason: String::new(),
        }
    }

    fn header(columns: &[&str], mode: LoadMode, conflict: &[&str]) -> Header {
        Header {
            source: "s".into(),
            schema: None,
            table: "t".into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            mode,
            conflict: conflict.iter().map(|c| c.to_string()).collect(),
            load_id: None,
            batch_rows: 10,
            skip_bad_rows: false,
        }
    }

    fn message(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn columns_resolve_to_the_tables_own_names() {
        let (columns, _) = resolve(&header(&["v", "code"], LoadMode::Append, &[]), &table()).expect("resolves");
        let names: Vec<_> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["v", "Code"]);
        let err = message(resolve(&header(&["id", "nope"], LoadMode::Append, &[]), &table()).unwrap_err());
        assert!(
            err.contains("no column \"nope\"") && err.contains("id, Code, v"),
            "{err}"
        );
        let err = message(resolve(&header(&["id", "ID"], LoadMode::Append, &[]), &table()).unwrap_err());
        assert!(err.contains("named twice"), "{err}");
    }

    #[test]
    fn computed_columns_are_refused() {
        let mut t = table();
        t.columns[0].generation = ColumnGeneration::IdentityAlways;
        t.columns[2].generation = ColumnGeneration::Computed;
        let err = message(resolve(&header(&["v"], LoadMode::Append, &[]), &t).unwrap_err());
        assert!(err.contains("computed") && err.contains("leave it out"), "{err}");
        // Identities are the engine's to accept or refuse (PostgreSQL's COPY
        // stores the values given, as migrations need).
        assert!(resolve(&header(&["id", "Code"], LoadMode::Append, &[]), &t).is_ok());
    }

    #[test]
    fn upserts_need_a_unique_key_among_the_loaded_columns() {
        let (_, conflict) = resolve(&header(&["id", "v"], LoadMode::Upsert, &["id"]), &table()).expect("pk");
        assert_eq!(conflict, ["id"]);
        assert!(resolve(&header(&["code", "v"], LoadMode::Upsert, &["CODE"]), &table()).is_ok());
        let err = message(resolve(&header(&["id", "v"], LoadMode::Upsert, &["v"]), &table()).unwrap_err());
        assert!(err.contains("no primary key or unique index on (v)"), "{err}");
        let err = message(resolve(&header(&["v"], LoadMode::Upsert, &["id"]), &table()).unwrap_err());
        assert!(err.contains("must also be one of the loaded columns"), "{err}");
        // Unique only among the rows its predicate selects: ON CONFLICT cannot match on it.
        let mut partial = table();
        partial.indexes[0].partial = true;
        let err = message(resolve(&header(&["Code", "v"], LoadMode::Upsert, &["Code"]), &partial).unwrap_err());
        assert!(err.contains("no primary key or unique index on (Code)"), "{err}");
    }

    /// "Code" and "code" both loaded, both unique: the conflict column
    /// named exactly is the one, and a name matching both only by case is
    /// neither's.
    #[test]
    fn conflict_columns_prefer_the_exact_name() {
        let mut table = table();
        let mut lower = table.columns[1].clone();
        lower.column.name = "code".into();
        table.columns.push(lower);
        table.indexes.push(Index {
            name: "t_code_lower".into(),
            columns: vec!["code".into()],
            unique: true,
            primary: false,
            method: "btree".into(),
            partial: false,
        });
        let loaded = ["Code", "code", "v"];
        let (_, conflict) = resolve(&header(&loaded, LoadMode::Upsert, &["code"]), &table).expect("exact");
        assert_eq!(conflict, ["code"]);
        let (_, conflict) = resolve(&header(&loaded, LoadMode::Upsert, &["Code"]), &table).expect("exact");
        assert_eq!(conflict, ["Code"]);
        let err = message(resolve(&header(&loaded, LoadMode::Upsert, &["CODE"]), &table).unwrap_err());
        assert!(err.contains("must also be one of the loaded columns"), "{err}");
    }

    #[test]
    fn headers_are_checked() {
        let ok = pb::LoadHeader {
            source: "s".into(),
            table: "t".into(),
            columns: vec!["a".into()],
            ..Default::default()
        };
        assert!(Header::try_from(ok.clone()).is_ok());
        let cases = [
            pb::LoadHeader {
                table: String::new(),
                ..ok.clone()
            },
            pb::LoadHeader {
                columns: vec![],
                ..ok.clone()
            },
            pb::LoadHeader {
                mode: pb::BulkLoadMode::Upsert as i32,
                ..ok.clone()
            },
            pb::LoadHeader {
                conflict_columns: vec!["a".into()],
                ..ok.clone()
            },
            pb::LoadHeader { mode: 99, ..ok.clone() },
            pb::LoadHeader {
                load_id: "x".repeat(201),
                ..ok.clone()
            },
        ];
        for case in cases {
            assert!(matches!(Header::try_from(case), Err(Error::InvalidArgument { .. })));
        }
    }

    #[test]
    fn reported_row_errors_are_cut_to_what_a_response_carries() {
        let mut skipped = Skipped::default();
        skipped.add(0, Some("c"), "x".repeat(1 << 20));
        assert!(
            skipped.reported[0].message.len() < 1100,
            "{}",
            skipped.reported[0].message.len()
        );
    }

    #[test]
    fn engine_row_numbers_skip_over_skipped_rows() {
        let mut skipped = Skipped::default();
        for i in [1, 2, 5] {
            skipped.add(i, None, "bad".into());
        }
        // Sent rows 0,1,2,3,.. are the caller's rows 0,3,4,6,..
        let mapped: Vec<_> = (0..4).map(|i| skipped.caller_index(i)).collect();
        assert_eq!(mapped, [0, 3, 4, 6]);
        // Every row skipped from there on: one run, counted in full.
        for i in 7..1_000_000 {
            skipped.add(i, None, "bad".into());
        }
        assert_eq!((skipped.bits.len(), skipped.count), (15_625, 999_996));
        assert_eq!(skipped.reported.len(), MAX_REPORTED_ROW_ERRORS);
        assert_eq!(skipped.caller_index(4), 1_000_000);
        // Every other row skipped: a bit each, across words.
        let mut alternate = Skipped::default();
        for i in (1..200).step_by(2) {
            alternate.add(i, None, String::new());
        }
        assert_eq!(alternate.bits.len(), 4);
        let mapped: Vec<_> = [0, 40, 99, 100, 101, 200].map(|i| alternate.caller_index(i)).to_vec();
        assert_eq!(mapped, [0, 80, 198, 200, 201, 300]);
    }

    #[test]
    fn rows_are_checked_against_their_columns() {
        let mut columns = vec![
            Column::new("id", "int4", ColumnType::Int),
            Column::new("at", "timestamp", ColumnType::Timestamp),
        ];
        columns[0].nullable = false;
        let int = |i| pb::Value {
            kind: Some(pb::value::Kind::Int64Value(i)),
        };
        let text = |s: &str| pb::Value {
            kind: Some(pb::value::Kind::StringValue(s.into())),
        };
        let ts = pb::Value {
            kind: Some(pb::value::Kind::TimestampValue(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            })),
        };
        let null = pb::Value { kind: None };
        let row = convert_row(
            pb::Row {
                values: vec![int(1), ts],
            },
            &checks(&columns, &[false, false]),
        )
        .expect("fits");
        assert!(matches!(row[1], crate::backend::Value::Timestamp(_)));
        let (column, message) = convert_row(
            pb::Row {
                values: vec![text("x"), null.clone()],
            },
            &checks(&columns, &[false, false]),
        )
        .unwrap_err();
        assert_eq!(column, Some("id"));
        assert!(
            message.contains("string value cannot go into a column of type int4"),
            "{message}"
        );
        let (column, message) = convert_row(
            pb::Row {
                values: vec![null.clone(), null],
            },
            &checks(&columns, &[false, false]),
        )
        .unwrap_err();
        assert_eq!((column, message.as_str()), (Some("id"), "NULL into a NOT NULL column"));
        let (column, _) =
            convert_row(pb::Row { values: vec![int(1)] }, &checks(&columns, &[false, false])).unwrap_err();
        assert_eq!(column, None);
        // NULL in an upsert's conflict column matches no key: refused, naming it.
        let (column, message) = convert_row(
            pb::Row {
                values: vec![int(1), null_again()],
            },
            &checks(&columns, &[false, true]),
        )
        .unwrap_err();
        assert_eq!(column, Some("at"));
        assert!(message.contains("conflict columns"), "{message}");
    }

    fn checks<'a>(columns: &'a [Column], keys: &'a [bool]) -> RowChecks<'a> {
        RowChecks {
            columns,
            keys,
            skip_bad_rows: false,
            refuses: &|_, _| None,
        }
    }

    fn null_again() -> pb::Value {
        pb::Value { kind: None }
    }
}

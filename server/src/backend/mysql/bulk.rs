//! MySQL/MariaDB bulk loads, in one transaction in strict mode: appends
//! and replaces through `LOAD DATA LOCAL INFILE` (`load_data`), upserts
//! through multi-row prepared `INSERT ... ON DUPLICATE KEY UPDATE`s.
//!
//! The INSERTs here also check whatever `LOAD DATA` did not load cleanly:
//! a failed multi-row statement is undone by the engine on its own, and the
//! rows are then tried one by one to name the failing row.

use std::sync::atomic::{AtomicBool, Ordering};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params};

use super::{load_data, map_error, types};
use crate::backend::bulk::{self, Dialect, LoadSpec, ReceiptSql, RowFeed};
use crate::backend::{BackendError, EngineErrorKind, LoadMode, LoadOutcome, Row};

/// The protocol's limit on placeholders in one prepared statement.
const MAX_PLACEHOLDERS: usize = 65_535;
/// Rows per INSERT at most, whatever the hint.
const MAX_ROWS_PER_STATEMENT: usize = 2000;

pub fn quote(name: &str) -> String {
    bulk::quote_ident(name, '`', '`')
}

const DIALECT: Dialect = Dialect {
    quote,
    placeholder: |_| "?".to_string(),
    // Bytes, not text: a collation would make `Batch-1`, `batch-1` and
    // `batch-1 ` one id (and one tenant), and skip a load as another's replay.
    key_type: "VARBINARY(255)",
    text_type: "TEXT",
    int_type: "BIGINT",
    timestamp: "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP",
    // InnoDB whatever the server's default engine: a claim row of a load
    // that failed must be rolled back with it, or its retry is taken for a
    // replay and loads nothing.
    create_new: "CREATE TABLE IF NOT EXISTS {table} ({body}) ENGINE=InnoDB",
    insert_new: "INSERT IGNORE INTO {table} ({columns}) VALUES ({values})",
};

/// `INSERT` of `rows` rows, with the upsert clause when the load is an upsert.
fn insert_sql(spec: &LoadSpec, rows: usize) -> String {
    let one = format!("({})", vec!["?"; spec.columns.len()].join(", "));
    let mut sql = format!(
        "INSERT INTO {} ({}) VALUES {}",
        spec.qualified(quote),
        spec.column_list(quote),
        vec![one.as_str(); rows].join(", ")
    );
    if spec.mode == LoadMode::Upsert {
        let mut updates: Vec<String> = spec
            .update_columns()
            .map(|c| format!("{0} = VALUES({0})", quote(&c.name)))
            .collect();
        if updates.is_empty() {
            // Key columns only: a no-op update keeps existing rows as they are.
            let key = quote(&spec.conflict[0]);
            updates.push(format!("{key} = {key}"));
        }
        sql.push_str(" ON DUPLICATE KEY UPDATE ");
        sql.push_str(&updates.join(", "));
    }
    sql
}

/// Rows per statement: the hint, bounded by the placeholder limit.
fn rows_per_statement(spec: &LoadSpec) -> usize {
    let width = spec.columns.len().max(1);
    spec.batch_rows
        .clamp(1, MAX_ROWS_PER_STATEMENT)
        .min(MAX_PLACEHOLDERS / width)
        .max(1)
}

/// `Duplicates: N` from the OK packet's info ("Records: 3  Duplicates: 1  Warnings: 0").
/// Rows an upsert statement of `n` rows inserted. MySQL counts 1 per row
/// inserted, 2 per row changed and 0 per row that matched unchanged, and
/// names the changed ones as duplicates, in multi-row statements only.
fn upserted(n: u64, affected: u64, info: &str) -> u64 {
    match duplicates(info) {
        Some(changed) => affected.saturating_sub(2 * changed).min(n),
        // One row: inserted, changed or unchanged, as the count says.
        None if n == 1 => u64::from(affected == 1),
        None => affected.min(n),
    }
}

fn duplicates(info: &str) -> Option<u64> {
    let rest = &info[info.find("Duplicates: ")? + "Duplicates: ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The 1-based row and the column an error names ("... for column `db`.`t`.`c` at row 3").
fn error_position(message: &str) -> (Option<u64>, Option<String>) {
    let row = message
        .rfind(" at row ")
        .and_then(|i| message[i + " at row ".len()..].trim().parse().ok());
    let column = message.find("for column ").and_then(|i| {
        let rest = &message[i + "for column ".len()..];
        let end = rest.find(" at row ").unwrap_or(rest.len());
        let name = rest[..end].rsplit('.').next()?.trim();
        Some(name.trim_matches(['`', '\'']).to_string())
    });
    (row, column)
}

fn params(rows: &[Row], first_row: u64) -> Result<Vec<mysql_async::Value>, BackendError> {
    let mut values = Vec::with_capacity(rows.len() * rows.first().map_or(0, Vec::len));
    for (i, row) in rows.iter().enumerate() {
        for v in row {
            values.push(
                types::param(v)
                    .map_err(|message| bulk::row_error(first_row + i as u64, None, String::new(), message))?,
            );
        }
    }
    Ok(values)
}

/// Closes a statement the load prepared. A multi-row INSERT has thousands of
/// placeholders, whose descriptions the driver keeps with each statement in
/// its per-connection cache: left there, the statements of past loads would
/// hold megabytes per connection, and count against the server's
/// `max_prepared_stmt_count`.
async fn close(conn: &mut Conn, statement: mysql_async::Statement) {
    if let Err(e) = conn.close(statement).await {
        // The connection is broken: the pool drops it, and its cache with it.
        tracing::debug!(error = %e, "could not close a bulk insert statement");
    }
}

/// Rows buffered into full statements.
pub(super) struct Writer<'s> {
    spec: &'s LoadSpec,
    per_statement: usize,
    /// The full-size INSERT, prepared at its first use and closed by `close`.
    full: Option<mysql_async::Statement>,
    pending: Vec<Row>,
    pending_first: u64,
    inserted: u64,
    updated: u64,
    /// A failed statement is undone (the table has transactions), so its rows
    /// may be tried one by one to name the bad one. In a MyISAM table the
    /// rows before it stay, and trying them again would store them twice.
    undone: bool,
    /// The server's `max_allowed_packet`: a statement's values are cut to
    /// fit one packet (wide rows make statements of fewer rows).
    packet_limit: usize,
    /// About the bytes the pending rows' values take (their memory, a little more).
    pending_bytes: usize,
}

impl<'s> Writer<'s> {
    fn new(spec: &'s LoadSpec, undone: bool, packet_limit: usize) -> Self {
        let per_statement = rows_per_statement(spec);
        Self {
            spec,
            per_statement,
            full: None,
            pending: Vec::with_capacity(per_statement),
            pending_first: 0,
            inserted: 0,
            updated: 0,
            undone,
            packet_limit,
            pending_bytes: 0,
        }
    }

    pub(super) async fn push(&mut self, conn: &mut Conn, first_row: u64, rows: Vec<Row>) -> Result<(), BackendError> {
        // Room for the statement's own bytes (its header and NULL bitmap).
        let room = self.packet_limit.min(super::MAX_PAYLOAD_LEN).saturating_sub(64 * 1024);
        for (i, row) in rows.into_iter().enumerate() {
            // A value's memory, and room for its type and length on the wire.
            let bytes: usize = row.iter().map(|v| v.size() + 16).sum();
            if !self.pending.is_empty() && self.pending_bytes + bytes > room {
                self.flush(conn).await?;
            }
            if self.pending.is_empty() {
                self.pending_first = first_row + i as u64;
            }
            self.pending.push(row);
            self.pending_bytes += bytes;
            if self.pending.len() == self.per_statement {
                self.flush(conn).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self, conn: &mut Conn) -> Result<(), BackendError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let first = self.pending_first;
        let values = params(&rows, first)?;
        // Only a row too large alone reaches the server's limit (rows are
        // cut to fit it): it is the load's bad row.
        super::refuse_past_packet_limit("", &values, self.packet_limit)
            .map_err(|e| bulk::row_error(first, None, String::new(), e.to_string()))?;
        let values = Params::Positional(values);
        // A statement that cannot be prepared names no row: only what fails
        // when it runs is located.
        let full = rows.len() == self.per_statement;
        let statement = match &self.full {
            Some(statement) if full => statement.clone(),
            _ => conn.prep(insert_sql(self.spec, rows.len())).await.map_err(map_error)?,
        };
        let executed = conn.exec_drop(&statement, values).await;
        if full {
            self.full = Some(statement);
        } else {
            close(conn, statement).await;
        }
        match executed {
            Ok(()) => {
                let n = rows.len() as u64;
                let inserted = match self.spec.mode {
                    LoadMode::Upsert => upserted(n, conn.affected_rows(), &conn.info()),
                    _ => n,
                };
                self.inserted += inserted;
                // Every other row matched a key, changed or not.
                self.updated += n - inserted;
                self.pending = rows;
                self.pending.clear();
                Ok(())
            }
            Err(e) => Err(locate(conn, self.spec, (&rows, first), map_error(e), self.undone).await),
        }
    }

    /// Closes the full-size statement once the load is over.
    async fn close(&mut self, conn: &mut Conn) {
        if let Some(full) = self.full.take() {
            close(conn, full).await;
        }
    }
}

/// The row (1-based in its statement) and the column an engine's message
/// names, when they are the load's: an error raised in a trigger names a row
/// of the trigger's own statement and a column of its own table.
fn named_position(spec: &LoadSpec, rows: usize, message: &str) -> Option<(u64, Option<String>)> {
    let (row, column) = error_position(message);
    let row = row.filter(|r| (1..=rows as u64).contains(r))?;
    match column {
        Some(c) if !loaded(spec, &c) => None,
        column => Some((row, column)),
    }
}

fn loaded(spec: &LoadSpec, column: &str) -> bool {
    spec.columns.iter().any(|c| c.name == column)
}

/// Names the row a failed multi-row statement stumbled on: from the
/// engine's message when it names one of the statement's rows, else, when
/// the failed statement has been undone (`undone`; the transaction rolls
/// back after), by trying the rows one at a time.
async fn locate(
    conn: &mut Conn,
    spec: &LoadSpec,
    (rows, first): (&[Row], u64),
    error: BackendError,
    undone: bool,
) -> BackendError {
    let BackendError::Engine { code, message, kind } = error else {
        return error;
    };
    // A deadlock also ends the transaction: rows tried one by one after it
    // would each commit on their own.
    if !kind.is_about_data() {
        return BackendError::Engine { kind, code, message };
    }
    if let Some((row, column)) = named_position(spec, rows.len(), &message) {
        return bulk::row_error(first + row - 1, column, code, message);
    }
    // So may an error Weir does not know: its row is found only where the
    // message says.
    if kind == EngineErrorKind::Internal || !undone {
        return BackendError::Engine { kind, code, message };
    }
    let single = insert_sql(spec, 1);
    for (i, row) in rows.iter().enumerate() {
        let index = first + i as u64;
        let Ok(p) = params(std::slice::from_ref(row), index) else {
            continue;
        };
        if let Err(e) = conn.exec_drop(single.as_str(), p).await {
            let e = map_error(e);
            let column = match &e {
                BackendError::Engine { message, .. } => error_position(message).1.filter(|c| loaded(spec, c)),
                _ => None,
            };
            return bulk::on_row(index, column, e);
        }
    }
    BackendError::Engine { kind, code, message }
}

/// In a table without transactions (MyISAM, Aria, MEMORY) what a load wrote
/// stays when it fails: a REPLACE would leave the table emptied, and a load
/// id would not be kept (its receipt rolls back, its rows do not), so a
/// retry would load the rows twice. Both are refused before anything runs;
/// APPEND and UPSERT go on, as any write to such a table does.
fn refuse_without_transactions(spec: &LoadSpec) -> Result<(), BackendError> {
    let asked = match (spec.mode, &spec.receipt) {
        (LoadMode::Replace, _) => "REPLACE",
        (_, Some(_)) => "a load_id",
        _ => return Ok(()),
    };
    Err(BackendError::Engine {
        kind: EngineErrorKind::FailedPrecondition,
        code: String::new(),
        message: format!(
            "{} uses a storage engine without transactions (MyISAM, Aria or MEMORY), or is a view (whose \
             tables' engines Weir cannot tell), where a failed load may not be undone, so {asked} is refused: \
             load into an InnoDB table itself (ALTER TABLE ... ENGINE = InnoDB converts one), or load with \
             APPEND or UPSERT and no load_id",
            spec.qualified(quote)
        ),
    })
}

async fn load_in_transaction(
    conn: &mut Conn,
    spec: &LoadSpec,
    feed: &mut RowFeed,
    receipts: Option<&ReceiptSql>,
    (transactional, packet_limit): (Option<bool>, usize),
) -> Result<LoadOutcome, BackendError> {
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        conn.exec_drop(sql.claim.as_str(), (&r.tenant, &r.load_id, &r.target))
            .await
            .map_err(map_error)?;
        if conn.affected_rows() == 0 {
            let row: Option<(String, i64, i64, i64, String)> = conn
                .exec_first(sql.lookup.as_str(), (&r.tenant, &r.load_id))
                .await
                .map_err(map_error)?;
            let (target, inserted, updated, bytes, path) =
                row.ok_or_else(|| BackendError::Internal("a claimed load id has no record".into()))?;
            return bulk::replay(r, target, inserted, updated, bytes, path);
        }
    }
    if spec.mode == LoadMode::Replace {
        let children: Vec<String> = conn
            .exec(
                "SELECT DISTINCT CONCAT(CONSTRAINT_SCHEMA, '.', TABLE_NAME) FROM information_schema.REFERENTIAL_CONSTRAINTS \
                 WHERE UNIQUE_CONSTRAINT_SCHEMA = COALESCE(?, DATABASE()) AND REFERENCED_TABLE_NAME = ? \
                   AND DELETE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT') \
                   AND NOT (CONSTRAINT_SCHEMA = UNIQUE_CONSTRAINT_SCHEMA AND TABLE_NAME = REFERENCED_TABLE_NAME) \
                 ORDER BY 1",
                (spec.schema.as_deref(), spec.table.as_str()),
            )
            .await
            .map_err(map_error)?;
        if !children.is_empty() {
            return Err(bulk::replace_would_cascade(&children));
        }
        // DELETE, not TRUNCATE: TRUNCATE commits implicitly and could not be rolled back.
        conn.query_drop(format!("DELETE FROM {}", spec.qualified(quote)))
            .await
            .map_err(map_error)?;
    }
    // Not asked for a plain upsert: trying its rows again only applies them again.
    let mut writer = Writer::new(spec, transactional != Some(false), packet_limit);
    let written = match spec.mode {
        LoadMode::Upsert => write_all(&mut writer, conn, feed).await.map(|()| (0, false)),
        LoadMode::Append | LoadMode::Replace => {
            load_data::load(conn, spec, feed, &mut writer, transactional != Some(false)).await
        }
    };
    writer.close(conn).await;
    let (loaded, load_data) = written?;
    let path = match (spec.mode, load_data) {
        (LoadMode::Append, true) => "mysql-load-data-local",
        (LoadMode::Append, false) => "mysql-multirow-insert",
        (LoadMode::Replace, true) => "mysql-delete-load-data-local",
        (LoadMode::Replace, false) => "mysql-delete-multirow-insert",
        (LoadMode::Upsert, _) => "mysql-insert-on-duplicate-key-update",
    };
    let outcome = LoadOutcome::loaded(loaded + writer.inserted, writer.updated, feed, path);
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        conn.exec_drop(
            sql.record.as_str(),
            (
                bulk::signed(outcome.inserted),
                bulk::signed(outcome.updated),
                bulk::signed(outcome.bytes),
                &outcome.engine_path,
                &r.tenant,
                &r.load_id,
            ),
        )
        .await
        .map_err(map_error)?;
    }
    Ok(outcome)
}

pub(super) async fn write_all(
    writer: &mut Writer<'_>,
    conn: &mut Conn,
    feed: &mut RowFeed,
) -> Result<(), BackendError> {
    while let Some(batch) = feed.next().await? {
        writer.push(conn, batch.first_row, batch.rows).await?;
    }
    writer.flush(conn).await
}

/// Runs a whole load: the receipt table first (DDL commits implicitly, so
/// outside the transaction), then one strict-mode transaction.
/// `receipts_checked` is the source's: the receipt table of an earlier
/// build is looked for once per process, not on every load. `killer` stops
/// the statement of a load whose caller gave up.
pub async fn load(
    conn: &mut Conn,
    spec: LoadSpec,
    mut feed: RowFeed,
    receipts_checked: &AtomicBool,
    (killer, packets): (&super::Killer, &super::PacketLimit),
) -> Result<LoadOutcome, BackendError> {
    // Whether the table has transactions, asked only where it matters: the
    // LOAD DATA path (APPEND, REPLACE) and the refusals below. A plain
    // UPSERT writes with INSERTs either way.
    let transactional = match (spec.mode, &spec.receipt) {
        (LoadMode::Upsert, None) => None,
        _ => Some(load_data::transactional(conn, &spec).await?),
    };
    if transactional == Some(false) {
        refuse_without_transactions(&spec)?;
    }
    // Read anew for each load: one refused for it names the setting to raise.
    let packet_limit = packets.read(conn).await?;
    let receipts = spec.receipt.as_ref().map(|r| ReceiptSql::new(&r.table, &DIALECT));
    if let (Some(sql), Some(r)) = (&receipts, &spec.receipt) {
        // CREATE TABLE IF NOT EXISTS needs the CREATE privilege even where
        // the table exists (one a DBA made and granted).
        let exists: Option<u8> = conn
            .exec_first(
                "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                (r.table.as_str(),),
            )
            .await
            .map_err(map_error)?;
        if exists.is_none() {
            conn.query_drop(sql.create.as_str()).await.map_err(map_error)?;
        }
        if !receipts_checked.load(Ordering::Relaxed) {
            upgrade_receipts(conn, &r.table).await?;
            // One made by hand, or before ENGINE=InnoDB was given: a claim
            // would outlive its load's rollback.
            let ledger = LoadSpec {
                schema: None,
                table: r.table.clone(),
                ..spec.clone()
            };
            if !load_data::transactional(conn, &ledger).await? {
                return Err(BackendError::Engine {
                    kind: crate::backend::EngineErrorKind::FailedPrecondition,
                    code: String::new(),
                    message: format!(
                        "the load_id table {0} has no transactions (its storage engine is not InnoDB), so a failed \
                         load's id would stay claimed: ALTER TABLE {0} ENGINE=InnoDB",
                        r.table
                    ),
                });
            }
            receipts_checked.store(true, Ordering::Relaxed);
        }
    }
    // Strict mode turns bad values into errors instead of warnings; the
    // session's own mode comes back afterwards (and the pool resets sessions).
    // Notes are not counted as warnings, which make `load_data` check a
    // chunk with INSERTs.
    conn.query_drop(
        "SET @weir_sql_mode = @@SESSION.sql_mode, @weir_sql_notes = @@SESSION.sql_notes, \
         SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'STRICT_ALL_TABLES'), \
         SESSION sql_notes = 0",
    )
    .await
    .map_err(map_error)?;
    conn.query_drop("START TRANSACTION").await.map_err(map_error)?;
    let (verdict, connection_id) = (feed.verdict(), conn.id());
    let mut result = verdict
        .stopping_if_given_up(
            load_in_transaction(conn, &spec, &mut feed, receipts.as_ref(), (transactional, packet_limit)),
            killer.kill(connection_id),
        )
        .await;
    let end = if bulk::commits(&mut result, &feed) {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = conn
        .query_drop(end)
        .await
        .map_err(|e| bulk::commit_failed(map_error(e)));
    let restored = conn
        .query_drop("SET SESSION sql_mode = @weir_sql_mode, SESSION sql_notes = @weir_sql_notes")
        .await
        .map_err(map_error);
    match (result, ended, restored) {
        (Ok(outcome), Ok(()), Ok(())) => Ok(outcome),
        // Committed: a session setting not put back is the pool's to reset
        // (or the lost connection's to take along), not a failed load to send again.
        (Ok(outcome), Ok(()), Err(e)) if end == "COMMIT" => {
            tracing::warn!(error = %e, "the load committed, but its session settings could not be put back");
            Ok(outcome)
        }
        (Err(e), _, _) | (Ok(_), Err(e), _) | (Ok(_), Ok(()), Err(e)) => Err(e),
    }
}

/// Receipt tables created by earlier builds held tenant and load id as text in the
/// server's default collation; their key columns become bytes once.
async fn upgrade_receipts(conn: &mut Conn, table: &str) -> Result<(), BackendError> {
    let kind: Option<String> = conn
        .exec_first(
            "SELECT DATA_TYPE FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = 'load_id'",
            (table,),
        )
        .await
        .map_err(map_error)?;
    if kind.is_some_and(|k| !k.eq_ignore_ascii_case("varbinary")) {
        // Bounded: the ALTER waits for loads that hold the table, and new
        // loads wait behind it. A failure (no ALTER privilege) only warns:
        // ids then compare in the old collation, as before.
        conn.query_drop("SET @weir_lock_wait = @@SESSION.lock_wait_timeout, SESSION lock_wait_timeout = 5")
            .await
            .map_err(map_error)?;
        if let Err(e) = convert_receipts(conn, &quote(table)).await {
            tracing::warn!(table, error = %e, "the load id table keeps comparing ids in its collation: converting its keys to bytes failed");
        }
        conn.query_drop("SET SESSION lock_wait_timeout = @weir_lock_wait")
            .await
            .map_err(map_error)?;
    }
    Ok(())
}

/// Converts the key columns to utf8mb4 text first, so that the bytes kept
/// are those new ids are sent as, then to bytes.
async fn convert_receipts(conn: &mut Conn, table: &str) -> Result<(), mysql_async::Error> {
    for key in ["VARCHAR(255) CHARACTER SET utf8mb4", DIALECT.key_type] {
        conn.query_drop(format!(
            "ALTER TABLE {table} MODIFY `tenant` {key} NOT NULL, MODIFY `load_id` {key} NOT NULL"
        ))
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Column, ColumnType};

    fn spec(mode: LoadMode, columns: &[&str], conflict: &[&str]) -> LoadSpec {
        LoadSpec {
            schema: None,
            table: "t`x".into(),
            columns: columns
                .iter()
                .map(|c| Column::new(*c, "int", ColumnType::Int))
                .collect(),
            mode,
            conflict: conflict.iter().map(|c| c.to_string()).collect(),
            receipt: None,
            batch_rows: 5000,
            kind: crate::backend::TableKind::Table,
        }
    }

    #[test]
    fn inserts_are_quoted_multirow_statements() {
        let s = spec(LoadMode::Append, &["id", "v"], &[]);
        assert_eq!(
            insert_sql(&s, 2),
            "INSERT INTO `t``x` (`id`, `v`) VALUES (?, ?), (?, ?)"
        );
        let s = spec(LoadMode::Upsert, &["id", "v"], &["id"]);
        assert_eq!(
            insert_sql(&s, 1),
            "INSERT INTO `t``x` (`id`, `v`) VALUES (?, ?) ON DUPLICATE KEY UPDATE `v` = VALUES(`v`)"
        );
        let s = spec(LoadMode::Upsert, &["id"], &["id"]);
        assert!(insert_sql(&s, 1).ends_with("ON DUPLICATE KEY UPDATE `id` = `id`"));
    }

    #[test]
    fn statements_stay_under_the_placeholder_limit() {
        let wide: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let names: Vec<&str> = wide.iter().map(String::as_str).collect();
        assert_eq!(rows_per_statement(&spec(LoadMode::Append, &names, &[])), 655);
        assert_eq!(
            rows_per_statement(&spec(LoadMode::Append, &["a"], &[])),
            MAX_ROWS_PER_STATEMENT
        );
    }

    #[test]
    fn engine_messages_name_rows_and_columns() {
        assert_eq!(
            error_position("Incorrect integer value: 'x' for column `test`.`t`.`n` at row 3"),
            (Some(3), Some("n".into()))
        );
        assert_eq!(error_position("Column 'name' cannot be null"), (None, None));
        assert_eq!(
            error_position("Out of range value for column 'v' at row 2"),
            (Some(2), Some("v".into()))
        );
        assert_eq!(duplicates("Records: 3  Duplicates: 1  Warnings: 0"), Some(1));
        assert_eq!(duplicates(""), None);
        // One new, one changed, one unchanged: 1 + 2 + 0 affected, one duplicate.
        assert_eq!(upserted(3, 3, "Records: 3  Duplicates: 1  Warnings: 0"), 1);
        // A row alone: no info; inserted, changed, unchanged.
        assert_eq!((upserted(1, 1, ""), upserted(1, 2, ""), upserted(1, 0, "")), (1, 0, 0));
    }
}

//! SQLite bulk loads: one `BEGIN IMMEDIATE` transaction of prepared
//! single-row inserts. SQLite runs in-process, so a prepared insert costs no
//! round trip and a multi-row statement gains little; one row per execution
//! names the failing row exactly. Upserts insert with `ON CONFLICT DO
//! NOTHING` and update the rows that conflicted, which tells inserted from
//! updated rows apart.

use rusqlite::types::Value as SqlValue;
use rusqlite::{params_from_iter, Connection, Statement};

use super::{decimal, map_error, special, to_sql};
use crate::backend::bulk::{self, Dialect, LoadSpec, ReceiptSql, RowFeed};
use crate::backend::{BackendError, Column, ColumnType, LoadMode, LoadOutcome, Row, Value};

use bulk::quote_ansi as quote;

const DIALECT: Dialect = Dialect {
    quote,
    placeholder: |i| format!("?{i}"),
    key_type: "TEXT",
    text_type: "TEXT",
    int_type: "INTEGER",
    timestamp: "TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP",
    create_new: "CREATE TABLE IF NOT EXISTS {table} ({body})",
    insert_new: "INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING",
};

fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
}

/// A decimal as a load binds it into `column`: as text, which the column's
/// affinity converts (NUMERIC to a number, TEXT keeps it exact, as
/// "10.50"), as a load of text would; but SQLite reads no text as an
/// infinity, and a NaN would stay the text "NaN" in a number column: those
/// bind as numbers (`special`), but into TEXT columns, which keep them as
/// they came. A column of no declared type converts nothing (text stays
/// text, and compares as text): there it binds as a parameter does.
///
/// A column whose affinity converts text to numbers (INTEGER, REAL,
/// NUMERIC: `DECIMAL(38,2)`, `MONEY`) keeps 15 significant digits of a
/// number that is not a 64-bit integer, and makes one too small or too
/// large for a double 0 or infinite: such a decimal is refused, not rounded.
pub(super) fn load_decimal(d: &str, column: &Column) -> Result<SqlValue, String> {
    if column.column_type == ColumnType::String {
        return Ok(SqlValue::Text(d.to_string()));
    }
    let number = decimal(d)?;
    if matches!(number, SqlValue::Text(_)) && converts_text(&column.native_type) {
        return Err(format!(
            "{d} has more digits than a SQLite {} column keeps (15 significant digits, or a double's range): \
             store it in a TEXT column to keep it exact",
            column.native_type
        ));
    }
    Ok(match column.column_type {
        ColumnType::Dynamic => number,
        _ => special(d)?.unwrap_or_else(|| SqlValue::Text(d.to_string())),
    })
}

/// Whether a column of declared type `declared` turns text that reads as a
/// number into one: SQLite's affinity rules, in their order.
fn converts_text(declared: &str) -> bool {
    let upper = declared.to_ascii_uppercase();
    if upper.contains("INT") {
        return true;
    }
    let text = ["CHAR", "CLOB", "TEXT"].iter().any(|t| upper.contains(t));
    !(text || upper.contains("BLOB") || upper.is_empty())
}

/// Binds `values` (each with its column's type) and runs the statement;
/// errors name the row.
fn run(statement: &mut Statement<'_>, values: &[(&Value, &Column)], index: u64) -> Result<usize, BackendError> {
    let bound = values
        .iter()
        .map(|&(v, column)| match v {
            Value::Decimal(d) => load_decimal(d, column),
            v => to_sql(v),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|message| bulk::row_error(index, None, String::new(), message))?;
    statement
        .execute(params_from_iter(bound))
        .map_err(|e| bulk::on_row(index, None, map_error(e)))
}

/// The statements of one load, prepared once.
struct Writer<'c> {
    insert: Statement<'c>,
    /// Upserts: `UPDATE ... SET non-key columns WHERE key columns`, and the
    /// positions of those columns in a row.
    update: Option<(Statement<'c>, Vec<usize>)>,
    upsert: bool,
    /// The columns, in the row's order.
    columns: Vec<Column>,
}

impl<'c> Writer<'c> {
    fn new(conn: &'c Connection, spec: &LoadSpec) -> Result<Self, BackendError> {
        let target = spec.qualified(quote);
        // OR ABORT: a table's own `ON CONFLICT REPLACE` or `IGNORE` clause
        // would delete another row or drop this one without a word.
        let mut insert = format!(
            "INSERT OR ABORT INTO {target} ({}) VALUES ({})",
            spec.column_list(quote),
            placeholders(spec.columns.len())
        );
        let mut update = None;
        if spec.mode == LoadMode::Upsert {
            let conflict: Vec<String> = spec.conflict.iter().map(|c| quote(c)).collect();
            insert.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", conflict.join(", ")));
            let position = |name: &str| spec.columns.iter().position(|c| c.name == name);
            let sets: Vec<&str> = spec.update_columns().map(|c| c.name.as_str()).collect();
            if !sets.is_empty() {
                let order: Vec<usize> = sets
                    .iter()
                    .copied()
                    .chain(spec.conflict.iter().map(String::as_str))
                    .filter_map(position)
                    .collect();
                let assign: Vec<String> = sets
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{} = ?{}", quote(c), i + 1))
                    .collect();
                let matches: Vec<String> = conflict
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c} = ?{}", sets.len() + i + 1))
                    .collect();
                let sql = format!(
                    "UPDATE OR ABORT {target} SET {} WHERE {}",
                    assign.join(", "),
                    matches.join(" AND ")
                );
                update = Some((conn.prepare(&sql).map_err(map_error)?, order));
            }
        }
        Ok(Self {
            insert: conn.prepare(&insert).map_err(map_error)?,
            update,
            upsert: spec.mode == LoadMode::Upsert,
            columns: spec.columns.clone(),
        })
    }

    /// Writes one row; true when it was inserted rather than updated.
    fn write(&mut self, row: &Row, index: u64) -> Result<bool, BackendError> {
        let all: Vec<_> = row.iter().zip(&self.columns).collect();
        // Outside upserts the INSERT took the row, even where it reports no
        // change (an INSTEAD OF trigger of a view).
        if run(&mut self.insert, &all, index)? == 1 || !self.upsert {
            return Ok(true);
        }
        if let Some((update, order)) = &mut self.update {
            let values: Vec<_> = order
                .iter()
                .filter_map(|&i| Some((row.get(i)?, self.columns.get(i)?)))
                .collect();
            // The conflict was found by the index's own comparison (COLLATE
            // NOCASE, say), the UPDATE looks for equal keys: finding none, the
            // row would be lost without a word.
            if run(update, &values, index)? != 1 {
                return Err(bulk::row_error(
                    index,
                    None,
                    String::new(),
                    "the row's key conflicts with a row under the unique index, which compares it otherwise \
                     than = does (a COLLATE of its own): no row has the same key to update; load into a \
                     table whose key compares with ="
                        .into(),
                ));
            }
        }
        Ok(false)
    }
}

fn load_in_transaction(
    conn: &Connection,
    spec: &LoadSpec,
    feed: &mut RowFeed,
    receipts: Option<&ReceiptSql>,
) -> Result<LoadOutcome, BackendError> {
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        conn.execute_batch(&sql.create).map_err(map_error)?;
        let claimed = conn
            .execute(&sql.claim, [&r.tenant, &r.load_id, &r.target])
            .map_err(map_error)?;
        if claimed == 0 {
            return conn
                .query_row(&sql.lookup, [&r.tenant, &r.load_id], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
                })
                .map_err(map_error)
                .and_then(|(target, inserted, updated, bytes, path)| {
                    bulk::replay(r, target, inserted, updated, bytes, path)
                });
        }
    }
    if spec.mode == LoadMode::Replace {
        let schema = spec.schema.as_deref().unwrap_or("main");
        let mut children = conn
            .prepare(&format!(
                "SELECT DISTINCT m.name FROM {}.sqlite_schema m, pragma_foreign_key_list(m.name, ?1) f \
                 WHERE m.type = 'table' AND f.\"table\" = ?2 COLLATE NOCASE AND m.name <> ?2 COLLATE NOCASE \
                   AND f.on_delete IN ('CASCADE', 'SET NULL', 'SET DEFAULT') ORDER BY 1",
                quote(schema)
            ))
            .map_err(map_error)?;
        let children = children
            .query_map(rusqlite::params![schema, spec.table], |r| r.get::<_, String>(0))
            .map_err(map_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error)?;
        if !children.is_empty() {
            return Err(bulk::replace_would_cascade(&children));
        }
        conn.execute_batch(&format!("DELETE FROM {}", spec.qualified(quote)))
            .map_err(map_error)?;
    }
    let (mut inserted, mut updated) = (0u64, 0u64);
    {
        let mut writer = Writer::new(conn, spec)?;
        while let Some(batch) = feed.blocking_next()? {
            for (i, row) in batch.rows.iter().enumerate() {
                // A row not inserted matched a key, updated or (only key columns) left alone.
                if writer.write(row, batch.first_row + i as u64)? {
                    inserted += 1;
                } else {
                    updated += 1;
                }
            }
        }
    }
    let path = match spec.mode {
        LoadMode::Append => "sqlite-insert",
        LoadMode::Replace => "sqlite-delete-insert",
        LoadMode::Upsert => "sqlite-insert-on-conflict",
    };
    let outcome = LoadOutcome::loaded(inserted, updated, feed, path);
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        conn.execute(
            &sql.record,
            rusqlite::params![
                bulk::signed(inserted),
                bulk::signed(updated),
                bulk::signed(outcome.bytes),
                outcome.engine_path,
                r.tenant,
                r.load_id
            ],
        )
        .map_err(map_error)?;
    }
    Ok(outcome)
}

/// Runs a whole load in one transaction; blocks, so it runs on the blocking pool.
pub fn load(conn: &Connection, spec: &LoadSpec, mut feed: RowFeed) -> Result<LoadOutcome, BackendError> {
    // A load its caller gave up on (its deadline, a client gone) is stopped
    // inside the statement it runs, which may be long (a REPLACE's DELETE
    // checking an unindexed foreign key), instead of holding the source's
    // write turn until it ends: it could no longer commit anyway.
    let verdict = feed.verdict();
    let interruptible = Interruptible::install(conn, move || verdict.abandoned());
    let receipts = spec.receipt.as_ref().map(|r| ReceiptSql::new(&r.table, &DIALECT));
    conn.execute_batch("BEGIN IMMEDIATE").map_err(map_error)?;
    let mut result = load_in_transaction(conn, spec, &mut feed, receipts.as_ref());
    // Not over the transaction's end: a ROLLBACK must not be stopped.
    drop(interruptible);
    let end = if bulk::commits(&mut result, &feed) {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    match conn.execute_batch(end) {
        Ok(()) => result,
        Err(e) if result.is_ok() => Err(map_error(e)),
        Err(_) => result,
    }
}

/// A progress handler for as long as it lives, removed on every way out:
/// the connection goes back to the pool.
struct Interruptible<'c>(&'c Connection);

impl<'c> Interruptible<'c> {
    fn install(conn: &'c Connection, stop: impl FnMut() -> bool + Send + 'static) -> Self {
        conn.progress_handler(super::PROGRESS_OPS, Some(stop));
        Self(conn)
    }
}

impl Drop for Interruptible<'_> {
    fn drop(&mut self) {
        self.0.progress_handler(super::PROGRESS_OPS, None::<fn() -> bool>);
    }
}

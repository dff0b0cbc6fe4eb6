//! PostgreSQL bulk loads: `COPY ... FROM STDIN` in text format inside one
//! transaction, straight into the table (APPEND, REPLACE after DELETE) or
//! into a temporary table merged with `INSERT ... ON CONFLICT` (UPSERT).
//!
//! Text rather than binary COPY: every value then goes through the
//! column type's own input function, exactly as parameters do, so enums,
//! domains, arrays, ranges and extension types load without a per-type
//! binary encoder, and a bad value is reported by PostgreSQL with its line
//! and column.

use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use tokio_postgres::error::DbError;

use super::types::write_text;
use super::{map_error, PgConn};
use crate::backend::bulk::{self, Dialect, LoadSpec, ReceiptSql, RowFeed};
use crate::backend::{BackendError, Column, LoadMode, LoadOutcome, TableKind, Value};

/// COPY data is sent in chunks of at least this size (whole batches).
const CHUNK_BYTES: usize = 256 * 1024;

/// Bytes after which a COPY is ended and the next one begun, in the same
/// transaction. PostgreSQL reports a bad row only when its COPY ends: in one
/// COPY for the whole load, a bad row near the start of a large load would
/// be reported only after the client had sent everything.
const SEGMENT_BYTES: usize = 16 * 1024 * 1024;
/// Name of the staging table of an upsert (temporary, dropped at commit).
const STAGE: &str = "weir_load_stage";
/// The staging table's own column: each row's 1-based place in the load,
/// filled in COPY order, so that a merge that fails can name its row.
const STAGE_ROW: &str = "\"weir load row\"";

use bulk::quote_ansi as quote;

const DIALECT: Dialect = Dialect {
    quote,
    placeholder: |i| format!("${i}"),
    key_type: "text",
    text_type: "text",
    int_type: "bigint",
    timestamp: "timestamptz NOT NULL DEFAULT now()",
    create_new: "CREATE TABLE IF NOT EXISTS {table} ({body})",
    insert_new: "INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT DO NOTHING",
};

/// Appends one value in COPY text format: `\N` for NULL, else the value's
/// text form (as parameters are sent), escaped.
fn write_field(value: &Value, scratch: &mut String, out: &mut BytesMut) -> Result<(), String> {
    match value {
        Value::Null => out.put_slice(b"\\N"),
        // The common cases skip the intermediate text.
        Value::Int(i) => out.put_slice(itoa::Buffer::new().format(*i).as_bytes()),
        Value::Text(s) => write_escaped(s, out)?,
        other => {
            scratch.clear();
            write_text(other, scratch, false);
            write_escaped(scratch, out)?;
        }
    }
    Ok(())
}

/// Appends text escaped for COPY; PostgreSQL text cannot hold NUL at all.
fn write_escaped(text: &str, out: &mut BytesMut) -> Result<(), String> {
    if bulk::write_escaped(text.as_bytes(), None, out) {
        Ok(())
    } else {
        Err(super::types::NO_NUL.into())
    }
}

/// The row and column of a COPY into `relname` (unquoted, as PostgreSQL
/// names it) of `columns`, from its context line (`COPY t, line 3, column
/// n: "abc"`); lines count from 1. The words are in the server's
/// `lc_messages` (`COPY t, Zeile 3, Spalte n: ...`), so only the shape is
/// relied on: the first ", <word> <number>" after the table's name, then
/// the column after the next word.
fn copy_position(db: &DbError, relname: &str, columns: &[Column]) -> Option<(u64, Option<String>)> {
    position_in(db.where_()?, relname, columns)
}

/// The position in the context's COPY line: its last line (a trigger's
/// statement can come before it, with numbers of its own). Read after the
/// table's name, which may hold what looks like a position itself (`Sales,
/// Q1 2024`); a column is one of `columns` (a name may hold a colon).
fn position_in(context: &str, relname: &str, columns: &[Column]) -> Option<(u64, Option<String>)> {
    let context = context.lines().rev().find(|l| l.starts_with("COPY "))?;
    let rest = context
        .strip_prefix("COPY ")
        .and_then(|r| r.strip_prefix(relname))
        .filter(|r| r.starts_with(", "))
        .unwrap_or(context);
    let (line, after) = rest.match_indices(", ").find_map(|(at, _)| {
        let (_, tail) = rest[at + 2..].split_once(' ')?;
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        let line: u64 = digits.parse().ok()?;
        Some((line, &tail[digits.len()..]))
    })?;
    let column = after.strip_prefix(", ").and_then(|c| c.split_once(' ')).map(|(_, c)| {
        let named = columns
            .iter()
            .map(|col| col.name.as_str())
            .filter(|name| {
                c.strip_prefix(name)
                    .is_some_and(|r| r.trim_start().starts_with(':') || r.is_empty())
            })
            .max_by_key(|name| name.len());
        match named {
            Some(name) => name.to_string(),
            None => c[..c.find(':').unwrap_or(c.len())].trim_end().to_string(),
        }
    });
    Some((line.checked_sub(1)?, column))
}

/// Maps an error of a COPY into `relname` whose first row is the load's
/// `first_row` to the row it names, when it names one and the fault is in
/// the data.
fn copy_error(e: tokio_postgres::Error, first_row: u64, relname: &str, columns: &[Column]) -> BackendError {
    match e.as_db_error().and_then(|db| copy_position(db, relname, columns)) {
        Some((index, column)) => bulk::on_row(first_row + index, column, map_error(e)),
        None => map_error(e),
    }
}

/// Streams the feed's rows into `COPY target (columns) FROM STDIN`, one
/// COPY per `SEGMENT_BYTES`; returns the rows copied. `relname`: the
/// target's name as PostgreSQL writes it in errors.
async fn copy_rows(
    conn: &PgConn,
    (target, relname): (&str, &str),
    spec: &LoadSpec,
    feed: &mut RowFeed,
) -> Result<u64, BackendError> {
    let copy_error = |e, first_row| copy_error(e, first_row, relname, &spec.columns);
    let sql = format!("COPY {target} ({}) FROM STDIN", spec.column_list(quote));
    let begin = || async {
        conn.client
            .copy_in::<_, Bytes>(&sql)
            .await
            .map_err(map_error)
            .map(Box::pin)
    };
    let mut sink = begin().await?;
    // The rows the ended COPYs report, the bytes sent in this one, and the
    // load's index of its first row (its line 1). A trigger that keeps a row
    // out leaves it out of a COPY's report, not out of its lines.
    let (mut copied, mut sent, mut first) = (0u64, 0usize, None);
    let mut buffer = BytesMut::with_capacity(CHUNK_BYTES + 4096);
    let mut scratch = String::new();
    while let Some(batch) = feed.next().await? {
        bulk::write_lines(&batch, &spec.columns, &mut buffer, |_, value, out| {
            write_field(value, &mut scratch, out)
        })?;
        let part = *first.get_or_insert(batch.first_row);
        if buffer.len() >= CHUNK_BYTES {
            sent += buffer.len();
            sink.send(buffer.split().freeze())
                .await
                .map_err(|e| copy_error(e, part))?;
        }
        if sent >= SEGMENT_BYTES {
            if !buffer.is_empty() {
                sink.send(buffer.split().freeze())
                    .await
                    .map_err(|e| copy_error(e, part))?;
            }
            copied += sink.as_mut().finish().await.map_err(|e| copy_error(e, part))?;
            sink = begin().await?;
            (sent, first) = (0, None);
        }
    }
    let last = first.unwrap_or_default();
    if !buffer.is_empty() {
        sink.send(buffer.split().freeze())
            .await
            .map_err(|e| copy_error(e, last))?;
    }
    Ok(copied + sink.as_mut().finish().await.map_err(|e| copy_error(e, last))?)
}

/// Merges the staging table into the target; returns the rows inserted.
/// The target's constraints apply only here (the stage has none): when the
/// merge fails on one of them, the first row it fails on is found by a
/// binary search over prefixes of the stage (in load order), each merge
/// undone, so that the error names its row as a COPY's would.
async fn merge(
    conn: &PgConn,
    (target, partitioned): (&str, bool),
    spec: &LoadSpec,
    staged: u64,
) -> Result<u64, BackendError> {
    let sql = merge_sql(target, partitioned, spec);
    let (client, sql) = (&conn.client, &sql);
    let merge_upto = |rows: u64| async move {
        let rows = bulk::signed(rows);
        client.query_one(sql, &[&rows]).await
    };
    client.batch_execute("SAVEPOINT weir_merge").await.map_err(map_error)?;
    let failed = match merge_upto(staged).await {
        Ok(row) => return Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or_default()),
        Err(e) if !about_data(&e) => return Err(map_error(e)),
        Err(e) => e,
    };
    // Prefix `passes` merges, prefix `fails` does not: a prefix fails
    // exactly when it holds a row that fails (a bad value, or a key it
    // shares with a row before it or in the table).
    let (mut passes, mut fails, mut failed) = (0, staged, failed);
    while fails - passes > 1 {
        let mid = passes + (fails - passes) / 2;
        client
            .batch_execute("ROLLBACK TO SAVEPOINT weir_merge")
            .await
            .map_err(map_error)?;
        match merge_upto(mid).await {
            Ok(_) => passes = mid,
            Err(e) if about_data(&e) => (fails, failed) = (mid, e),
            Err(e) => return Err(map_error(e)),
        }
    }
    let column = failed.as_db_error().and_then(DbError::column).map(str::to_string);
    Err(bulk::on_row(fails - 1, column, map_error(failed)))
}

/// The merge of the stage's first `$1` rows, answering the rows inserted.
fn merge_sql(target: &str, partitioned: bool, spec: &LoadSpec) -> String {
    let columns = spec.column_list(quote);
    let conflict = spec.conflict.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let updates: Vec<String> = spec
        .update_columns()
        .map(|c| format!("{0} = EXCLUDED.{0}", quote(&c.name)))
        .collect();
    let insert = format!(
        "INSERT INTO {target} ({columns}) SELECT {columns} FROM {STAGE} WHERE {STAGE_ROW} <= $1 \
         ON CONFLICT ({conflict}) DO"
    );
    if updates.is_empty() {
        // Only key columns: nothing to update (a DO UPDATE would have to set
        // something), and DO NOTHING returns the inserted rows alone.
        return format!("WITH merged AS ({insert} NOTHING RETURNING 1) SELECT count(*) FROM merged");
    }
    let update = format!("UPDATE SET {}", updates.join(", "));
    if !partitioned {
        // xmax is 0 for a freshly inserted row version and set for an updated one.
        return format!(
            "WITH merged AS ({insert} {update} RETURNING (xmax = 0) AS inserted) \
             SELECT count(*) FILTER (WHERE inserted) FROM merged"
        );
    }
    // A partitioned table's rows have no xmax to return. Every staged row is
    // inserted or updates one: the updated are those whose key the table
    // held when the statement began (its parts share one snapshot; a row
    // another transaction inserts meanwhile with the same key counts as
    // inserted).
    let same_key = spec
        .conflict
        .iter()
        .map(|c| format!("t.{0} = s.{0}", quote(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "WITH matched AS (SELECT count(*) AS n FROM {STAGE} s WHERE s.{STAGE_ROW} <= $1 \
         AND EXISTS (SELECT 1 FROM {target} t WHERE {same_key})), \
         merged AS ({insert} {update} RETURNING 1) \
         SELECT count(*) - (SELECT n FROM matched) FROM merged"
    )
}

/// Whether a merge's error is the fault of a row it wrote.
/// Only data exceptions (22), integrity violations (23) and a key two rows
/// of the load share (21000): errors no single row causes (a conflict
/// target without its unique index, 42P10) fail every prefix alike, and a
/// search would name row 0 for them.
fn about_data(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        let code = d.code().code();
        code.starts_with("22") || code.starts_with("23") || code == "21000"
    })
}

/// Everything between BEGIN and COMMIT; the caller rolls back on error.
async fn load_in_transaction(
    conn: &PgConn,
    spec: &LoadSpec,
    feed: &mut RowFeed,
    receipts: Option<&ReceiptSql>,
) -> Result<LoadOutcome, BackendError> {
    let client = &conn.client;
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        let claimed = client
            .execute(&sql.claim, &[&r.tenant, &r.load_id, &r.target])
            .await
            .map_err(map_error)?;
        if claimed == 0 {
            let row = client
                .query_one(&sql.lookup, &[&r.tenant, &r.load_id])
                .await
                .map_err(map_error)?;
            return bulk::replay(r, row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        }
    }
    let target = spec.qualified(quote);
    let (inserted, updated, path) = match spec.mode {
        LoadMode::Append => (
            copy_rows(conn, (&target, &spec.table), spec, feed).await?,
            0,
            "postgres-copy",
        ),
        // DELETE, not TRUNCATE: TRUNCATE would lock out even readers for the
        // whole load (they wait instead of seeing the old rows), fails on any
        // table a foreign key references, and needs its own privilege.
        LoadMode::Replace => {
            let children: Vec<String> = client
                .query(
                    "SELECT DISTINCT conrelid::regclass::text FROM pg_constraint \
                     WHERE contype = 'f' AND confrelid = to_regclass($1) AND conrelid <> confrelid \
                       AND confdeltype IN ('c', 'n', 'd') ORDER BY 1",
                    &[&target],
                )
                .await
                .map_err(map_error)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !children.is_empty() {
                return Err(bulk::replace_would_cascade(&children));
            }
            // A table others inherit from: its own rows only (without ONLY,
            // theirs would go too, and the load refill only it). A
            // partitioned table's rows are its partitions', which it replaces.
            let only = if spec.kind == TableKind::PartitionedTable {
                ""
            } else {
                "ONLY "
            };
            // Other writers wait until the load commits; readers go on
            // seeing the old rows. Without it, two REPLACE loads at once
            // each delete only what their snapshot sees, so both loads'
            // rows would stay (or the second fail on the first's keys).
            // Tables only: PostgreSQL locks no foreign table, and a view's
            // DELETE locks what it reaches.
            let lock = match spec.kind {
                TableKind::Table | TableKind::PartitionedTable => {
                    format!("LOCK TABLE {only}{target} IN SHARE ROW EXCLUSIVE MODE; ")
                }
                _ => String::new(),
            };
            client
                .batch_execute(&format!("{lock}DELETE FROM {only}{target}"))
                .await
                .map_err(map_error)?;
            (
                copy_rows(conn, (&target, &spec.table), spec, feed).await?,
                0,
                "postgres-delete-copy",
            )
        }
        LoadMode::Upsert => {
            // Only the loaded columns, with their types and no constraints:
            // the target's own constraints apply when the rows are merged.
            client
                .batch_execute(&format!(
                    "CREATE TEMPORARY TABLE {STAGE} ON COMMIT DROP AS SELECT {} FROM {target} WITH NO DATA; \
                     ALTER TABLE {STAGE} ADD COLUMN {STAGE_ROW} bigint GENERATED ALWAYS AS IDENTITY",
                    spec.column_list(quote)
                ))
                .await
                .map_err(map_error)?;
            let staged = copy_rows(conn, (STAGE, STAGE), spec, feed).await?;
            let partitioned = spec.kind == TableKind::PartitionedTable;
            let inserted = merge(conn, (&target, partitioned), spec, staged).await?;
            // Every other row matched a key, whether updated or, with only
            // key columns, left alone (DO NOTHING returns no row for it).
            (inserted, staged.saturating_sub(inserted), "postgres-copy-merge")
        }
    };
    let outcome = LoadOutcome::loaded(inserted, updated, feed, path);
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        client
            .execute(
                &sql.record,
                &[
                    &bulk::signed(inserted),
                    &bulk::signed(updated),
                    &bulk::signed(outcome.bytes),
                    &outcome.engine_path,
                    &r.tenant,
                    &r.load_id,
                ],
            )
            .await
            .map_err(map_error)?;
    }
    Ok(outcome)
}

/// Runs a whole load on `conn`: the receipt table first (outside the
/// transaction, as DDL racing with another replica), then one transaction.
pub async fn load(conn: &mut PgConn, spec: LoadSpec, mut feed: RowFeed) -> Result<LoadOutcome, BackendError> {
    let receipts = spec.receipt.as_ref().map(|r| ReceiptSql::new(&r.table, &DIALECT));
    if let (Some(sql), Some(r)) = (&receipts, &spec.receipt) {
        // CREATE TABLE IF NOT EXISTS needs the CREATE privilege on the schema
        // even where the table exists (one a DBA made and granted). The name
        // is a checked plain one (`bulk.load_id_table`).
        let found = conn
            .client
            .simple_query(&format!("SELECT to_regclass('{}') IS NOT NULL", r.table))
            .await
            .map_err(map_error)?;
        let exists = found.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
            _ => false,
        });
        if !exists {
            if let Err(e) = conn.client.batch_execute(&sql.create).await {
                // Two first loads may race to create it: either way it exists now.
                let raced = e
                    .as_db_error()
                    .is_some_and(|d| matches!(d.code().code(), "23505" | "42P07"));
                if !raced {
                    return Err(map_error(e));
                }
            }
        }
    }
    // From BEGIN until COMMIT or ROLLBACK succeeds, a dropped connection is discarded, never reused.
    conn.in_transaction = true;
    conn.needs_reset = true;
    // READ COMMITTED whatever the role's default: under REPEATABLE READ a
    // REPLACE's DELETE would see the table as it was before the lock it
    // waited for, and keep the rows of a load committed meanwhile. No
    // statement timeout: a COPY lasts as long as its client streams, bounded
    // by the load's deadline and Weir's idle limit. (A role's
    // `idle_in_transaction_session_timeout` is kept: a load waits for its
    // client inside a COPY, which does not count as idle, so it only ends a
    // load whose gateway went between two statements.)
    conn.client
        .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = 0")
        .await
        .map_err(map_error)?;
    let verdict = feed.verdict();
    let mut result = verdict
        .stopping_if_given_up(
            load_in_transaction(conn, &spec, &mut feed, receipts.as_ref()),
            super::cancel::cancel(&conn.cancel, conn.address, &conn.target),
        )
        .await;
    let ended = if bulk::commits(&mut result, &feed) {
        conn.client.batch_execute("COMMIT").await
    } else {
        // A load that ended on its own (its feed closed) may have left its
        // COPY waiting for a lock, with the ROLLBACK queued behind it: one
        // given up on meanwhile, or already, stops that statement first.
        verdict
            .stopping_if_given_up(
                conn.client.batch_execute("ROLLBACK"),
                super::cancel::cancel(&conn.cancel, conn.address, &conn.target),
            )
            .await
    };
    match ended {
        Ok(()) => conn.in_transaction = false,
        // A COMMIT refused (a deferred constraint) loaded nothing: report it
        // rather than the outcome; one whose answer was lost may have committed.
        Err(e) if result.is_ok() => return Err(bulk::commit_failed(map_error(e))),
        Err(_) => {}
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(v: Value) -> String {
        let mut out = BytesMut::new();
        write_field(&v, &mut String::new(), &mut out).expect("encodes");
        String::from_utf8(out.to_vec()).expect("utf-8")
    }

    #[test]
    fn copy_errors_name_their_row_in_any_language() {
        let columns = [
            Column::new("n", "text", crate::backend::ColumnType::String),
            Column::new("a:b", "text", crate::backend::ColumnType::String),
        ];
        let at = |context: &str, relname: &str| position_in(context, relname, &columns);
        assert_eq!(at("COPY t, line 3, column n: \"x\"", "t"), Some((2, Some("n".into()))));
        assert_eq!(at("COPY t, Zeile 3, Spalte n: »x«", "t"), Some((2, Some("n".into()))));
        assert_eq!(at("COPY a, b, line 12", "a, b"), Some((11, None)));
        assert_eq!(at("COPY t", "t"), None);
        // A trigger's statement comes first; French puts a space before the colon.
        assert_eq!(
            at(
                "SQL statement \"INSERT INTO log VALUES (1, 'x', 3)\"\nCOPY t, ligne 7, colonne n : « x »",
                "t"
            ),
            Some((6, Some("n".into())))
        );
        // A table's name that looks like a position, a column's with a colon.
        assert_eq!(
            at("COPY Sales, Q1 2024, line 3, column a:b: \"x\"", "Sales, Q1 2024"),
            Some((2, Some("a:b".into())))
        );
    }

    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        assert_eq!(field(Value::Null), "\\N");
        assert_eq!(field(Value::Text("a\tb\nc\\d\re".into())), "a\\tb\\nc\\\\d\\re");
        assert_eq!(field(Value::Text("\\N".into())), "\\\\N");
        // Text without any goes whole; other control characters stay as they are.
        assert_eq!(field(Value::Text("plain text, é".into())), "plain text, é");
        assert_eq!(field(Value::Text("bell\u{7}".into())), "bell\u{7}");
        assert_eq!(field(Value::Int(i64::MIN)), i64::MIN.to_string());
        assert_eq!(field(Value::Bytes(vec![0xde, 0xad])), "\\\\xdead");
        assert_eq!(
            field(Value::List(vec![Value::Text("x y".into()), Value::Null])),
            "{\"x y\",NULL}"
        );
        let mut out = BytesMut::new();
        assert!(write_field(&Value::Text("a\0b".into()), &mut String::new(), &mut out).is_err());
    }

    #[test]
    fn receipt_statements_are_quoted_and_numbered() {
        let sql = ReceiptSql::new("weir_load_ids", &DIALECT);
        assert!(sql
            .create
            .starts_with("CREATE TABLE IF NOT EXISTS \"weir_load_ids\" (\"tenant\" text NOT NULL"));
        assert_eq!(
            sql.claim,
            "INSERT INTO \"weir_load_ids\" (\"tenant\", \"load_id\", \"target\") VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
        );
        assert!(sql.record.ends_with("WHERE \"tenant\" = $5 AND \"load_id\" = $6"));
    }
}

//! Appends and replaces through `LOAD DATA LOCAL INFILE`: the rows stream to
//! the server as tab-separated text, a chunk per statement, each chunk
//! behind a savepoint.
//!
//! With LOCAL the server cannot stop the client mid-file, so it turns bad
//! values, duplicate keys and failed CHECKs into warnings and skips or
//! coerces the row (MySQL documents LOCAL as implying IGNORE). A chunk that
//! ends with any warning, or with fewer rows than it was sent, is therefore
//! undone to its savepoint and loaded again through the strict-mode INSERTs
//! of `bulk::Writer`, which stop at the first bad row and name it. A load
//! thus commits exactly what the INSERTs would have, or nothing; the INSERTs
//! only run where something is wrong.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, InfileData};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::bulk::{quote, Writer};
use super::map_error;
use super::types::{write_load_text, LoadAs};
use crate::backend::bulk::{self, Batch, LoadSpec, RowFeed};
use crate::backend::{BackendError, EngineErrorKind};

/// Rows per `LOAD DATA` statement at most. The chunk's rows are kept until
/// it is loaded, for the INSERTs that name a bad row.
const CHUNK_ROWS: u64 = 10_000;
/// Bytes of text per statement at most (a client batch is never split).
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Text is handed to the driver in pieces of about this size (or less, when the feed has nothing more ready).
const SEND_BYTES: usize = 256 * 1024;
/// A chunk ends when the feed brings nothing for this long, well within
/// the server's wait for the file's next packet.
const STALL: Duration = Duration::from_secs(2);

/// The statement that reads one chunk; hex literals for the separators, so
/// that a session with `NO_BACKSLASH_ESCAPES` reads them the same.
fn statement(spec: &LoadSpec, load_as: &[LoadAs]) -> String {
    let mut targets = Vec::with_capacity(spec.columns.len());
    let mut conversions = Vec::new();
    for (i, (column, as_)) in spec.columns.iter().zip(load_as).enumerate() {
        let name = quote(&column.name);
        match as_ {
            LoadAs::Text => targets.push(name),
            LoadAs::Hex => {
                targets.push(format!("@weir{i}"));
                conversions.push(format!("{name} = UNHEX(@weir{i})"));
            }
            LoadAs::Integer(cast) => {
                targets.push(format!("@weir{i}"));
                conversions.push(format!("{name} = CAST(@weir{i} AS {cast})"));
            }
        }
    }
    let mut sql = format!(
        "LOAD DATA LOCAL INFILE 'weir' INTO TABLE {} CHARACTER SET utf8mb4 \
         FIELDS TERMINATED BY X'09' ESCAPED BY X'5C' LINES TERMINATED BY X'0A' ({})",
        spec.qualified(quote),
        targets.join(", ")
    );
    if !conversions.is_empty() {
        sql.push_str(" SET ");
        sql.push_str(&conversions.join(", "));
    }
    sql
}

/// MySQL's and MariaDB's errors for a server that takes no LOCAL files.
const LOCAL_DISABLED: [&str; 3] = [
    "1148", // ER_NOT_ALLOWED_COMMAND
    "3948", // MySQL 8: ER_CLIENT_LOCAL_FILES_DISABLED
    "4166", // MariaDB: ER_LOAD_INFILE_CAPABILITY_DISABLED
];

fn local_disabled(e: &BackendError) -> bool {
    matches!(e, BackendError::Engine { code, .. } if LOCAL_DISABLED.contains(&code.as_str()))
}

/// Whether the table's storage engine has transactions (InnoDB does; MyISAM,
/// Aria and MEMORY do not). False for what is not a base table.
pub(super) async fn transactional(conn: &mut Conn, spec: &LoadSpec) -> Result<bool, BackendError> {
    let engine: Option<String> = conn
        .exec_first(
            "SELECT e.TRANSACTIONS FROM information_schema.TABLES t \
             JOIN information_schema.ENGINES e ON e.ENGINE = t.ENGINE \
             WHERE t.TABLE_SCHEMA = COALESCE(?, DATABASE()) AND t.TABLE_NAME = ?",
            (spec.schema.as_deref(), spec.table.as_str()),
        )
        .await
        .map_err(map_error)?;
    Ok(engine.as_deref() == Some("YES"))
}

/// What the feeding side of one chunk did.
#[derive(Default)]
struct Fed {
    /// The feed said the load is complete.
    ended: bool,
    /// Why feeding stopped early: the load is abandoned, or a value cannot be sent.
    error: Option<BackendError>,
}

/// Appends `batch` as lines of load text.
fn encode(
    spec: &LoadSpec,
    load_as: &[LoadAs],
    batch: &Batch,
    scratch: &mut String,
    out: &mut BytesMut,
) -> Result<(), BackendError> {
    bulk::write_lines(batch, &spec.columns, out, |c, value, out| {
        write_load_text(value, load_as.get(c).copied().unwrap_or(LoadAs::Text), scratch, out)
    })
}

/// Moves one chunk of the feed, starting with `first`, into `text`, and
/// keeps its batches in `kept`. Every batch taken from the feed is in
/// `kept` before the next wait, so the chunk's rows are all there even when
/// this is stopped midway. The server gives up on a file that stalls
/// (`net_read_timeout`, 30 s by default), so text goes out whenever the
/// feed has nothing ready, and the chunk ends when the feed stalls.
async fn feed_chunk(
    spec: &LoadSpec,
    load_as: &[LoadAs],
    feed: &mut RowFeed,
    first: Batch,
    kept: &mut Vec<Batch>,
    text: mpsc::Sender<io::Result<Bytes>>,
    fed: &mut Fed,
) {
    let mut buffer = BytesMut::with_capacity(SEND_BYTES + 4096);
    let mut scratch = String::new();
    let mut sent = 0usize;
    let mut rows = 0u64;
    let mut held = 0usize;
    let mut next = Some(first);
    loop {
        let batch = match next.take() {
            Some(batch) => batch,
            None => match tokio::time::timeout(STALL, feed.next()).await {
                Ok(Ok(Some(batch))) => batch,
                Ok(Ok(None)) => {
                    fed.ended = true;
                    break;
                }
                Ok(Err(e)) => {
                    fed.error = Some(e);
                    break;
                }
                Err(_stalled) => break,
            },
        };
        let encoded = encode(spec, load_as, &batch, &mut scratch, &mut buffer);
        rows += batch.rows.len() as u64;
        held += batch.memory();
        kept.push(batch);
        if let Err(e) = encoded {
            fed.error = Some(e);
            break;
        }
        // Pieces of at most SEND_BYTES, each one packet: the server refuses
        // packets over its max_allowed_packet, and a batch of large values
        // can be bigger. LOAD DATA reads a byte stream, so a piece may end
        // mid-row.
        while buffer.len() >= SEND_BYTES || (!buffer.is_empty() && !feed.has_ready()) {
            let piece = buffer.split_to(buffer.len().min(SEND_BYTES));
            sent += piece.len();
            if text.send(Ok(piece.freeze())).await.is_err() {
                // The statement is over; what it did decides the chunk.
                return;
            }
        }
        // Also at half the feed's memory: the next batch may need the rest,
        // and waits for it until this chunk's rows are let go of.
        if rows >= CHUNK_ROWS || sent >= CHUNK_BYTES || held >= bulk::FEED_MEMORY / 2 {
            break;
        }
    }
    // Stopped by an error, the file still ends cleanly, with what was sent:
    // the load rolls back after, and the connection stays usable (an error
    // in the stream would make the driver close it).
    if fed.error.is_none() {
        while !buffer.is_empty() {
            let piece = buffer.split_to(buffer.len().min(SEND_BYTES));
            if text.send(Ok(piece.freeze())).await.is_err() {
                return;
            }
        }
    }
}

/// Runs one `LOAD DATA` statement over the next chunk of the feed.
async fn load_chunk(
    conn: &mut Conn,
    sql: &str,
    spec: &LoadSpec,
    load_as: &[LoadAs],
    feed: &mut RowFeed,
    first: Batch,
    kept: &mut Vec<Batch>,
) -> (Result<(), mysql_async::Error>, Fed) {
    let (tx, rx) = mpsc::channel(4);
    // Taken by the driver when the server asks for the file; a connection
    // given back to the pool loses a handler it did not take.
    conn.set_infile_handler(async move { Ok(Box::pin(ReceiverStream::new(rx)) as InfileData) });
    let mut fed = Fed::default();
    let loaded = {
        let mut feeding = std::pin::pin!(feed_chunk(spec, load_as, feed, first, kept, tx, &mut fed));
        let mut load = std::pin::pin!(conn.query_drop(sql));
        let mut fed_all = false;
        loop {
            tokio::select! {
                loaded = &mut load => break loaded,
                () = &mut feeding, if !fed_all => fed_all = true,
            }
        }
    };
    (loaded, fed)
}

/// Loads the whole feed: `LOAD DATA` chunk by chunk, and INSERTs for a
/// chunk that `LOAD DATA` did not load cleanly. Returns the rows that
/// `LOAD DATA` loaded (the writer counts its own), and whether the server
/// took `LOAD DATA` at all.
pub(super) async fn load(
    conn: &mut Conn,
    spec: &LoadSpec,
    feed: &mut RowFeed,
    writer: &mut Writer<'_>,
    transactional: bool,
) -> Result<(u64, bool), BackendError> {
    if !transactional {
        // Savepoints undo nothing there, so a chunk could not be checked
        // and loaded again.
        super::bulk::write_all(writer, conn, feed).await?;
        return Ok((0, false));
    }
    let load_as: Vec<LoadAs> = spec.columns.iter().map(LoadAs::of).collect();
    let sql = statement(spec, &load_as);
    let mut loaded = 0;
    let mut kept = Vec::new();
    loop {
        // The last chunk's rows are in: their share of the feed's memory
        // goes back before the next batch is waited for, which may need it.
        kept.clear();
        // A chunk's statement starts once it has rows to read: the server
        // would time out a file that waits for a slow client.
        let Some(first) = feed.next().await? else {
            return Ok((loaded, true));
        };
        conn.query_drop("SAVEPOINT weir_chunk").await.map_err(map_error)?;
        let (result, fed) = load_chunk(conn, &sql, spec, &load_as, feed, first, &mut kept).await;
        if let Some(e) = fed.error {
            return Err(e);
        }
        let rows: u64 = kept.iter().map(|b| b.rows.len() as u64).sum();
        let refused = match result.map_err(map_error) {
            Ok(()) if conn.get_warnings() == 0 && conn.affected_rows() == rows => {
                loaded += rows;
                if fed.ended {
                    return Ok((loaded, true));
                }
                continue;
            }
            Ok(()) => {
                tracing::debug!(
                    warnings = conn.get_warnings(),
                    "a LOAD DATA chunk did not load cleanly; loading it again with INSERTs"
                );
                None
            }
            // The server does not take LOCAL files: the INSERTs take the rest.
            Err(e @ BackendError::Engine { .. }) if local_disabled(&e) => Some(e),
            // A row's fault that is no warning under LOCAL (a trigger's
            // SIGNAL, or its own statement's bad value): the INSERTs name
            // the row, which LOAD DATA's message does not (or counts from
            // the chunk's start).
            Err(BackendError::Engine { kind, .. }) if kind.is_about_data() && kind != EngineErrorKind::Internal => {
                tracing::debug!("a LOAD DATA chunk failed on a row; loading it again with INSERTs to name it");
                None
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = conn.query_drop("ROLLBACK TO SAVEPOINT weir_chunk").await {
            // A deadlock, say, has ended the whole transaction, savepoint and all.
            return Err(refused.unwrap_or_else(|| map_error(e)));
        }
        for batch in kept.drain(..) {
            writer.push(conn, batch.first_row, batch.rows).await?;
        }
        writer.flush(conn).await?;
        if refused.is_some() {
            // The INSERTs took what LOAD DATA would not: they take the rest.
            tracing::debug!("LOAD DATA LOCAL refused by the server; the load goes on with INSERTs");
            if !fed.ended {
                super::bulk::write_all(writer, conn, feed).await?;
            }
            return Ok((loaded, loaded > 0));
        }
        if fed.ended {
            return Ok((loaded, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Column, ColumnType, LoadMode};

    #[test]
    fn binary_and_bit_columns_go_through_variables() {
        let spec = LoadSpec {
            schema: Some("s".into()),
            table: "t`x".into(),
            columns: vec![
                Column::new("id", "int(11)", ColumnType::Int),
                Column::new("b", "blob", ColumnType::Bytes),
                Column::new("f", "bit(8)", ColumnType::UInt),
                Column::new("y", "year(4)", ColumnType::Int),
            ],
            mode: LoadMode::Append,
            conflict: vec![],
            receipt: None,
            batch_rows: 1000,
            kind: crate::backend::TableKind::Table,
        };
        let load_as: Vec<LoadAs> = spec.columns.iter().map(LoadAs::of).collect();
        assert_eq!(
            statement(&spec, &load_as),
            "LOAD DATA LOCAL INFILE 'weir' INTO TABLE `s`.`t``x` CHARACTER SET utf8mb4 \
             FIELDS TERMINATED BY X'09' ESCAPED BY X'5C' LINES TERMINATED BY X'0A' \
             (`id`, @weir1, @weir2, @weir3) SET `b` = UNHEX(@weir1), `f` = CAST(@weir2 AS UNSIGNED), \
             `y` = CAST(@weir3 AS SIGNED)"
        );
    }
}

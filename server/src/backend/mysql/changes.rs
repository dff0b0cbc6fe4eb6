//! MySQL/MariaDB change streams from the binary log (ROW format, full row
//! images), read as a replica with mysql_async's binlog stream.
//!
//! The binlog is not retained per consumer, so the acknowledged position is
//! stored in a table of the source's database (`weir_change_positions`);
//! a resume without a position continues from it. The subscription's lock
//! (`GET_LOCK`) is taken on the binlog connection itself, so it lives
//! exactly as long as the stream and holds across gateway replicas.
//!
//! Positions are (binlog file number, offset, sequence): a row change is
//! (file, offset where its transaction starts, index from 1); a commit or
//! heartbeat is (file, offset just past it, 0). Reading resumes at the
//! offset and skips what the position already covers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::binlog::jsonb::JsonDom;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts, Value as MyValue};
use sha2::{Digest, Sha256};

use super::types::{self, Decode};
use super::{map_error, schema};
use crate::backend::changes::{
    self, check_resume, Acks, ChangeFeed, ChangeItem, ChangeOp, Outbox, Position, RowChange, SnapshotTable, TableName,
    WatchSpec,
};
use crate::backend::{BackendError, Column, ColumnType, Row, Value};

/// Where acknowledged positions are kept, in the source's database.
const POSITIONS_TABLE: &str = "weir_change_positions";
/// How long a take-over waits for the old consumer's session to end.
const TAKE_OVER_WAIT: u32 = 5;
/// How long a new consumer waits for the subscription's lock: a consumer
/// that reconnects at once finds its old session still ending.
const LOCK_WAIT: u32 = 2;
/// How long ending the dump and looking for a take-over may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A session of the stream's own (see `own_session`).
async fn connect(opts: &Opts) -> Result<Conn, BackendError> {
    super::own_session(opts)
        .await
        .ok_or_else(|| BackendError::Unavailable("the database did not answer a new connection within 5s".into()))?
        .map_err(map_error)
}

const BINLOG_POSITION: [usize; 3] = [4, 8, 4];
/// With a restart point: (file, offset) after the three fields.
const BINLOG_POSITION_RESTART: [usize; 5] = [4, 8, 4, 4, 8];

/// Ordered by (file, offset, seq): `restart` says only where reading must
/// begin to resume there.
#[derive(Debug, Clone, Copy)]
struct BinlogPos {
    file: u32,
    offset: u64,
    seq: u32,
    /// (file, offset) of the earliest XA transaction prepared before this
    /// position and committed after it, whose changes are read at its
    /// prepare; `None` when reading may begin at (file, offset).
    restart: Option<(u32, u64)>,
}

impl BinlogPos {
    fn at(file: u32, offset: u64, seq: u32) -> BinlogPos {
        BinlogPos {
            file,
            offset,
            seq,
            restart: None,
        }
    }

    fn key(&self) -> (u32, u64, u32) {
        (self.file, self.offset, self.seq)
    }

    /// Where reading begins to resume at this position.
    fn read_from(&self) -> (u32, u64) {
        self.restart.unwrap_or((self.file, self.offset))
    }

    fn encode(self) -> Position {
        let (file, offset, seq) = (u64::from(self.file), self.offset, u64::from(self.seq));
        match self.restart {
            None => Position::pack(BINLOG_POSITION, [file, offset, seq]),
            Some((rf, ro)) => Position::pack(BINLOG_POSITION_RESTART, [file, offset, seq, u64::from(rf), ro]),
        }
    }

    fn decode(p: &Position) -> Result<Self, BackendError> {
        let fields = match p.unpack(BINLOG_POSITION) {
            Some([file, offset, seq]) => Some((file, offset, seq, None)),
            None => p
                .unpack(BINLOG_POSITION_RESTART)
                .map(|[file, offset, seq, rf, ro]| (file, offset, seq, Some((rf as u32, ro)))),
        };
        let not = || BackendError::Invalid("not a MySQL change position".into());
        let (file, offset, seq, restart) = fields.ok_or_else(not)?;
        let p = BinlogPos {
            file: file as u32,
            offset,
            seq: seq as u32,
            restart,
        };
        // A restart point lies before its position (these bytes are the client's).
        if p.restart.is_some_and(|r| r >= (p.file, p.offset)) {
            return Err(not());
        }
        Ok(p)
    }
}

impl PartialEq for BinlogPos {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for BinlogPos {}

impl PartialOrd for BinlogPos {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for BinlogPos {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// Binlog file names are `<base>.<number>`.
fn split_file(name: &str) -> Result<(String, u32), BackendError> {
    name.rsplit_once('.')
        .and_then(|(base, n)| Some((base.to_string(), n.parse().ok()?)))
        .ok_or_else(|| BackendError::Internal(format!("unexpected binlog file name {name:?}")))
}

fn file_name(base: &str, number: u32) -> String {
    format!("{base}.{number:06}")
}

/// A replica id for one binlog connection, at or above 2^30 (below is left
/// to real replicas). The server ends an older dump with the same id, so it
/// is drawn at random: derived from the subscription, it let a tenant pick
/// a subscription name whose id was another tenant's and end that stream.
/// The subscription's own lock (`GET_LOCK`) keeps it single-consumer.
fn server_id() -> u32 {
    0x4000_0000 | (rand::random::<u32>() & 0x3fff_ffff)
}

/// The labels of an `enum('a','b')` or `set(...)` column type, which
/// COLUMN_TYPE writes as string literals: `''` and backslash escapes undone.
fn labels(native: &str) -> Vec<String> {
    let Some(inner) = native.split_once('(').and_then(|(_, rest)| rest.strip_suffix(')')) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut label = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    label.push('\'');
                }
                '\'' => break,
                '\\' => match chars.next() {
                    Some('0') => label.push('\0'),
                    Some('n') => label.push('\n'),
                    Some('r') => label.push('\r'),
                    Some('t') => label.push('\t'),
                    Some('b') => label.push('\u{8}'),
                    Some('Z') => label.push('\u{1a}'),
                    // As in MySQL's literals, `\%` and `\_` keep their backslash.
                    Some(c @ ('%' | '_')) => {
                        label.push('\\');
                        label.push(c);
                    }
                    Some(c) => label.push(c),
                    None => label.push('\\'),
                },
                c => label.push(c),
            }
        }
        out.push(label);
    }
    out
}

/// How the binlog's raw value of a column becomes a `Value`.
#[derive(Debug, Clone)]
enum Shape {
    Plain(Decode),
    /// Unsigned integers of this many bits: the binlog carries them signed.
    Unsigned(u32),
    Enum(Vec<String>),
    Set(Vec<String>),
    /// `BINARY(n)`: the binary log drops trailing zero bytes, which the
    /// column's value (as queries return it) has.
    FixedBinary(usize),
    /// MariaDB's `UUID`, `INET6` and `INET4`: logged in binary form (also
    /// without trailing zero bytes), returned by queries as text.
    Uuid,
    Inet6,
    Inet4,
    /// `TIME(1)` and `TIME(2)`, whose negative values with a fraction the
    /// binlog reader decodes wrongly (see `unwrapped_time`).
    ShortFractionTime,
}

fn shape(c: &Column) -> Shape {
    let native = c.native_type.to_ascii_lowercase();
    let unsigned = native.contains("unsigned");
    let word = native.split(['(', ' ']).next().unwrap_or_default();
    match word {
        "enum" => return Shape::Enum(labels(&c.native_type)),
        "set" => return Shape::Set(labels(&c.native_type)),
        "bit" => return Shape::Plain(Decode::Bit),
        "binary" => return Shape::FixedBinary(width(&native).unwrap_or(1)),
        "uuid" => return Shape::Uuid,
        "inet6" => return Shape::Inet6,
        "inet4" => return Shape::Inet4,
        "time" if matches!(width(&native), Some(1 | 2)) => return Shape::ShortFractionTime,
        _ => {}
    }
    if unsigned {
        if let Some(bits) = match word {
            "tinyint" => Some(8),
            "smallint" => Some(16),
            "mediumint" => Some(24),
            "int" | "integer" => Some(32),
            "bigint" => Some(64),
            _ => None,
        } {
            return Shape::Unsigned(bits);
        }
    }
    Shape::Plain(match c.column_type {
        ColumnType::Int => Decode::Int,
        ColumnType::UInt => Decode::UInt,
        ColumnType::Float => Decode::Float,
        ColumnType::Decimal => Decode::Decimal,
        ColumnType::Bytes => Decode::Bytes,
        ColumnType::Date => Decode::Date,
        ColumnType::Timestamp => Decode::DateTime,
        ColumnType::TimestampTz => Decode::Timestamp,
        ColumnType::Time => Decode::Time,
        ColumnType::Json => Decode::Json,
        _ => Decode::Text,
    })
}

/// How long a binlog connection may stay silent: three heartbeat periods,
/// and never under 10 s (a loaded server's heartbeats may come late).
fn silence_limit(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(3).max(Duration::from_secs(10))
}

/// The `n` of a type written `name(n)`.
fn width(native: &str) -> Option<usize> {
    let (_, rest) = native.split_once('(')?;
    rest.split_once(')')?.0.trim().parse().ok()
}

/// Writes MySQL's binary JSON as the text a query of the column returns:
/// decimals (`12.50`, from `JSON_OBJECT('p', 12.50)` or a DECIMAL column
/// cast to JSON) as numbers, digits kept; the driver's document model
/// writes them as strings. Dates, times and other opaque scalars are
/// strings, as MySQL writes them.
fn write_json(dom: JsonDom, out: &mut String) {
    use mysql_async::binlog::jsonb::{JsonContainer, JsonNumber, JsonScalar};
    match dom {
        JsonDom::Container(JsonContainer::Array(items)) => {
            out.push('[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        JsonDom::Container(JsonContainer::Object(members)) => {
            out.push('{');
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key).to_string());
                out.push(':');
                write_json(value, out);
            }
            out.push('}');
        }
        JsonDom::Scalar(JsonScalar::Number(JsonNumber::Decimal(d))) => {
            let text = d.to_string();
            let text = match text.strip_prefix('-') {
                Some(rest) if rest.starts_with('.') => format!("-0{rest}"),
                _ if text.starts_with('.') => format!("0{text}"),
                _ => text,
            };
            // A number as JSON reads one, else (never seen) its text.
            match serde_json::from_str::<serde_json::Number>(&text) {
                Ok(_) => out.push_str(&text),
                Err(_) => out.push_str(&serde_json::Value::String(text).to_string()),
            }
        }
        JsonDom::Scalar(scalar) => out.push_str(&serde_json::Value::from(scalar).to_string()),
    }
}

fn convert(v: BinlogValue<'_>, shape: &Shape) -> Result<Value, String> {
    let v = match v {
        BinlogValue::Value(v) => v,
        BinlogValue::Jsonb(j) => {
            let mut text = String::new();
            write_json(j.parse().map_err(|e| format!("binary JSON: {e}"))?, &mut text);
            return Ok(Value::Json(text));
        }
        BinlogValue::JsonDiff(_) => {
            return Err("partial JSON updates are not supported; set binlog_row_value_options = ''".into())
        }
    };
    Ok(match (v, shape) {
        (MyValue::NULL, _) => Value::Null,
        // With signedness in the table map (MySQL 8's default row metadata).
        (MyValue::UInt(u), &Shape::Unsigned(bits)) => {
            if bits == 64 {
                Value::UInt(u)
            } else {
                Value::Int(i64::try_from(u).map_err(|_| format!("{u} is not a {bits}-bit value"))?)
            }
        }
        // YEAR comes as its text, 1900 plus the stored byte: the year 0000 as 1900.
        (MyValue::Bytes(b), Shape::Plain(Decode::Int)) => {
            let year: i64 = std::str::from_utf8(&b)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or("invalid YEAR")?;
            Value::Int(if year == 1900 { 0 } else { year })
        }
        (MyValue::Int(i), &Shape::Unsigned(bits)) => {
            let raw = if bits == 64 {
                i as u64
            } else {
                (i as u64) & ((1u64 << bits) - 1)
            };
            if bits == 64 {
                Value::UInt(raw)
            } else {
                Value::Int(raw as i64)
            }
        }
        (MyValue::Int(i), Shape::Enum(labels)) => match usize::try_from(i) {
            // Index 0 is the empty string MySQL stores for invalid values.
            Ok(0) => Value::Text(String::new()),
            Ok(n) => Value::Text(labels.get(n - 1).cloned().ok_or("enum index out of range")?),
            Err(_) => return Err("negative enum index".into()),
        },
        (MyValue::Bytes(mask), Shape::Set(labels)) => {
            let bits = mask.iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            let chosen: Vec<&str> = labels
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 64 && bits & (1 << i) != 0)
                .map(|(_, l)| l.as_str())
                .collect();
            Value::Text(chosen.join(","))
        }
        (MyValue::Bytes(mut b), &Shape::FixedBinary(n)) => {
            if b.len() < n {
                b.resize(n, 0);
            }
            Value::Bytes(b)
        }
        (MyValue::Bytes(b), Shape::Uuid) => Value::Text(uuid_text(&fixed::<16>(b, "UUID")?)),
        (MyValue::Bytes(b), Shape::Inet6) => Value::Text(inet6_text(&fixed::<16>(b, "INET6")?)),
        (MyValue::Bytes(b), Shape::Inet4) => Value::Text(std::net::Ipv4Addr::from(fixed::<4>(b, "INET4")?).to_string()),
        // TIMESTAMP columns come as seconds since the epoch, with a fraction.
        // The zero date is logged as 0: no TIMESTAMP holds that instant (the
        // range starts at 00:00:01), so it is NULL, as in queries.
        (MyValue::Bytes(b), Shape::Plain(Decode::Timestamp)) => {
            let text = String::from_utf8(b).map_err(|_| "invalid TIMESTAMP")?;
            let (secs, frac) = text.split_once('.').unwrap_or((&text, "0"));
            let secs: i64 = secs.parse().map_err(|_| "invalid TIMESTAMP")?;
            let micros: u32 = format!("{frac:0<6}")
                .get(..6)
                .and_then(|m| m.parse().ok())
                .ok_or("invalid TIMESTAMP")?;
            if secs == 0 && micros == 0 {
                return Ok(Value::Null);
            }
            Value::TimestampTz(DateTime::from_timestamp(secs, micros * 1000).ok_or("TIMESTAMP out of range")?)
        }
        (MyValue::Int(0), Shape::Plain(Decode::Timestamp)) => Value::Null,
        (MyValue::Int(secs), Shape::Plain(Decode::Timestamp)) => {
            Value::TimestampTz(DateTime::from_timestamp(secs, 0).ok_or("TIMESTAMP out of range")?)
        }
        (v, &Shape::Plain(decode)) => types::decode(v, decode)?,
        (v, Shape::ShortFractionTime) => types::decode(unwrapped_time(v), Decode::Time)?,
        (v, _) => types::decode(v, Decode::Text)?,
    })
}

/// A `TIME(1)` or `TIME(2)` value as logged. mysql_common reads the
/// fraction of a negative one in unsigned arithmetic, where MySQL's own code
/// borrows from it, so what it gives is the packed value plus 10000·2³²
/// (a positive time whose microseconds pass a second, or a negative one with
/// a fraction, which no negative value of these columns decodes to
/// otherwise: they all take that path). Its own packing is undone here.
fn unwrapped_time(v: MyValue) -> MyValue {
    const WRAPPED: i64 = 10_000 << 32;
    let MyValue::Time(negative, days, h, m, s, micros) = v else {
        return v;
    };
    if !((negative && micros > 0) || (!negative && micros >= 1_000_000)) {
        return v;
    }
    let hms = ((i64::from(days) * 24 + i64::from(h)) << 12) | (i64::from(m) << 6) | i64::from(s);
    let logged = (hms << 24) + i64::from(micros);
    let packed = if negative { -logged } else { logged } - WRAPPED;
    let magnitude = packed.abs();
    let (hms, micros) = (magnitude >> 24, magnitude & 0xff_ffff);
    let hours = (hms >> 12) & 0x3ff;
    MyValue::Time(
        packed < 0,
        (hours / 24) as u32,
        (hours % 24) as u8,
        ((hms >> 6) & 0x3f) as u8,
        (hms & 0x3f) as u8,
        micros as u32,
    )
}

/// A fixed-size binary value whose trailing zero bytes the binary log dropped.
fn fixed<const N: usize>(mut b: Vec<u8>, type_name: &str) -> Result<[u8; N], String> {
    if b.len() < N {
        b.resize(N, 0);
    }
    <[u8; N]>::try_from(b).map_err(|b| format!("a {type_name} of {} bytes", b.len()))
}

/// As MariaDB prints a UUID: the binary log holds it in text order (the
/// swapped segments of time-based UUIDs are only how it is stored).
fn uuid_text(b: &[u8; 16]) -> String {
    let hex = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// As MariaDB prints an INET6 (its `Inet6::to_string`), which differs from
/// RFC 5952 (`std::net::Ipv6Addr`): a single zero group is compressed too
/// (`1::3:4:5:6:7:8`), and IPv4-compatible addresses end in dotted form
/// (`::1.2.3.4`), as IPv4-mapped ones do.
fn inet6_text(b: &[u8; 16]) -> String {
    use std::fmt::Write;
    let words: [u16; 8] = std::array::from_fn(|i| u16::from_be_bytes([b[2 * i], b[2 * i + 1]]));
    // The first longest run of zero words, however short.
    let (mut gap, mut run) = ((0, 0), None::<(usize, usize)>);
    for (i, w) in words.iter().enumerate() {
        run = match (*w, run) {
            (0, Some((start, len))) => Some((start, len + 1)),
            (0, None) => Some((i, 1)),
            (_, _) => None,
        };
        if let Some(r) = run.filter(|r| r.1 > gap.1) {
            gap = r;
        }
    }
    let mut out = String::new();
    let mut i = 0;
    while i < 8 {
        if gap.1 > 0 && i == gap.0 {
            out.push_str(if i == 0 { "::" } else { ":" });
            i += gap.1;
            continue;
        }
        if i == 6 && gap.0 == 0 && (gap.1 == 6 || (gap.1 == 5 && words[5] == 0xffff)) {
            let _ = write!(out, "{}", std::net::Ipv4Addr::new(b[12], b[13], b[14], b[15]));
            break;
        }
        let _ = write!(out, "{:x}", words[i]);
        if i < 7 {
            out.push(':');
        }
        i += 1;
    }
    out
}

struct Watched {
    columns: Arc<[Column]>,
    shapes: Vec<Shape>,
    primary_key: Arc<[String]>,
    schema: String,
    table: String,
}

/// Checks the binlog settings, naming the one to change.
async fn check_binlog(conn: &mut Conn) -> Result<(), BackendError> {
    let compression: Vec<(String, String)> = conn
        .query("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('log_bin_compress', 'binlog_transaction_compression')")
        .await
        .map_err(map_error)?;
    if let Some((name, _)) = compression.iter().find(|(_, value)| value.eq_ignore_ascii_case("ON")) {
        return Err(compressed(&format!("{name} = ON")));
    }
    let row: Option<(i64, String, String)> = conn
        .query_first("SELECT @@log_bin, @@binlog_format, @@binlog_row_image")
        .await
        .map_err(map_error)?;
    match row {
        Some((1, format, image)) if format == "ROW" && image == "FULL" => Ok(()),
        Some((1, format, image)) => Err(BackendError::ChangesNotReady(format!(
            "the server has binlog_format = {format} and binlog_row_image = {image}; change streams need \
             binlog_format = ROW and binlog_row_image = FULL"
        ))),
        _ => Err(BackendError::ChangesNotReady(
            "the server's binary log is off; change streams need log_bin on, with binlog_format = ROW and \
             binlog_row_image = FULL (set them in the server configuration and restart)"
                .into(),
        )),
    }
}

/// Compressed binlog events (MariaDB's compressed query and row events,
/// MySQL's transaction payloads) hold rows this reader cannot see: a stream
/// that met one would miss changes, so it stops instead.
fn compressed(detail: &str) -> BackendError {
    BackendError::ChangesNotReady(format!(
        "the server compresses its binary log ({detail}); change streams need log_bin_compress \
         (MariaDB) and binlog_transaction_compression (MySQL) off"
    ))
}

/// MariaDB's compressed event types (QUERY_COMPRESSED_EVENT through
/// DELETE_ROWS_COMPRESSED_EVENT) and MySQL's TRANSACTION_PAYLOAD_EVENT.
fn is_compressed_event(event_type: u8) -> bool {
    matches!(event_type, 165..=171 | 40)
}

async fn resolve(conn: &mut Conn, tables: &[TableName]) -> Result<HashMap<(String, String), Watched>, BackendError> {
    let mut out = HashMap::new();
    for t in tables {
        let d = schema::describe_table(conn, t.schema.as_deref(), &t.table).await?;
        if !d.change_stream_ready {
            return Err(BackendError::ChangesNotReady(format!(
                "table {}.{} cannot be watched: {}",
                d.table.schema, d.table.name, d.change_stream_reason
            )));
        }
        let columns: Vec<Column> = d.columns.into_iter().map(|c| c.column).collect();
        out.insert(
            (d.table.schema.clone(), d.table.name.clone()),
            Watched {
                shapes: columns.iter().map(shape).collect(),
                columns: columns.into(),
                primary_key: d.primary_key.map(|p| p.columns).unwrap_or_default().into(),
                schema: d.table.schema,
                table: d.table.name,
            },
        );
    }
    Ok(out)
}

/// MySQL's parse error: 8.4 has no `SHOW MASTER STATUS`.
const PARSE_ERROR: u16 = 1064;

async fn current_position(conn: &mut Conn) -> Result<(String, u64), BackendError> {
    let row: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
        Err(mysql_async::Error::Server(e)) if e.code == PARSE_ERROR => {
            conn.query_first("SHOW BINARY LOG STATUS").await.map_err(map_error)?
        }
        other => other.map_err(map_error)?,
    };
    let mut row = row.ok_or_else(|| BackendError::ChangesNotReady("the server's binary log is off".into()))?;
    let file: String = row
        .take(0)
        .ok_or_else(|| BackendError::Internal("SHOW MASTER STATUS".into()))?;
    let pos: u64 = row
        .take(1)
        .ok_or_else(|| BackendError::Internal("SHOW MASTER STATUS".into()))?;
    Ok((file, pos))
}

/// The restart point's columns, added to tables made before there was one.
const RESTART_COLUMNS: &str = "restart_file VARCHAR(255) NULL, restart_offset BIGINT UNSIGNED NULL";

async fn ensure_positions_table(conn: &mut Conn) -> Result<(), BackendError> {
    conn.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS {POSITIONS_TABLE} (
           subscription VARCHAR(64) NOT NULL PRIMARY KEY,
           binlog_file VARCHAR(255) NOT NULL,
           binlog_offset BIGINT UNSIGNED NOT NULL,
           event_seq INT UNSIGNED NOT NULL,
           updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
           {RESTART_COLUMNS}
         )"
    ))
    .await
    .map_err(map_error)
}

/// Whether the positions table has the restart point's columns, adding
/// them to a table made before there were any. The ALTER waits at most 5 s
/// for the table (every stream's position store queues behind it), and may
/// not be allowed (it needs the ALTER privilege): without the columns, a
/// restart point is stored as the position itself (see `store`).
async fn restart_columns(conn: &mut Conn) -> Result<bool, BackendError> {
    async fn count(conn: &mut Conn) -> Result<Option<i64>, mysql_async::Error> {
        conn.exec_first(
            "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_NAME = ? AND COLUMN_NAME IN ('restart_file', 'restart_offset')",
            (POSITIONS_TABLE,),
        )
        .await
    }
    if count(conn).await.map_err(map_error)? == Some(2) {
        return Ok(true);
    }
    conn.query_drop("SET @weir_lock_wait = @@SESSION.lock_wait_timeout, SESSION lock_wait_timeout = 5")
        .await
        .map_err(map_error)?;
    let added = conn
        .query_drop(format!("ALTER TABLE {POSITIONS_TABLE} ADD COLUMN ({RESTART_COLUMNS})"))
        .await;
    conn.query_drop("SET SESSION lock_wait_timeout = @weir_lock_wait")
        .await
        .map_err(map_error)?;
    match added {
        Ok(()) => Ok(true),
        // 1060: another stream added them first.
        Err(mysql_async::Error::Server(e)) if e.code == 1060 => Ok(count(conn).await.map_err(map_error)? == Some(2)),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot add restart_file and restart_offset to {POSITIONS_TABLE}: a position acknowledged while \
                 an XA transaction waits for its commit is stored as that transaction's prepare, so a resume \
                 without a position may deliver changes between the two again"
            );
            Ok(false)
        }
    }
}

/// Stores `p` as the subscription's position, unless a session other than
/// `holder` (the stream's binlog connection) holds its lock: a reader
/// replaced by a take-over, still waiting on its slow client, must not
/// write its older acknowledgement over its successor's when it ends.
async fn store(
    conn: &mut Conn,
    names: &Names,
    restart_columns: bool,
    base: &str,
    p: BinlogPos,
    holder: u32,
) -> Result<(), BackendError> {
    let (p, restart) = match restart_columns {
        true => (p, p.restart),
        // Resumed from there, the stream reads from the prepare on.
        false => (
            p.restart.map_or(p, |(file, offset)| BinlogPos::at(file, offset, 0)),
            None,
        ),
    };
    let (columns, values, updates) = match restart_columns {
        true => (
            ", restart_file, restart_offset",
            ", ?, ?",
            ", restart_file = VALUES(restart_file), restart_offset = VALUES(restart_offset)",
        ),
        false => ("", "", ""),
    };
    let mut params: Vec<MyValue> = vec![
        names.id.as_str().into(),
        file_name(base, p.file).into(),
        p.offset.into(),
        p.seq.into(),
    ];
    if restart_columns {
        params.push(restart.map(|(file, _)| file_name(base, file)).into());
        params.push(restart.map(|(_, offset)| offset).into());
    }
    params.extend([names.lock.as_str().into(), holder.into(), holder.into()]);
    conn.exec_drop(
        format!(
            "INSERT INTO {POSITIONS_TABLE} (subscription, binlog_file, binlog_offset, event_seq{columns})
             SELECT ?, ?, ?, ?{values} FROM DUAL WHERE IFNULL(IS_USED_LOCK(?), ?) = ?
             ON DUPLICATE KEY UPDATE binlog_file = VALUES(binlog_file), binlog_offset = VALUES(binlog_offset),
             event_seq = VALUES(event_seq){updates}"
        ),
        params,
    )
    .await
    .map_err(map_error)
}

async fn stored(conn: &mut Conn, names: &Names, restart_columns: bool) -> Result<Option<BinlogPos>, BackendError> {
    type Stored = (String, u64, u32, Option<String>, Option<u64>);
    let restart = if restart_columns {
        "restart_file, restart_offset"
    } else {
        "NULL, NULL"
    };
    let row: Option<Stored> = conn
        .exec_first(
            format!(
                "SELECT binlog_file, binlog_offset, event_seq, {restart}
                 FROM {POSITIONS_TABLE} WHERE subscription = ?"
            ),
            (names.id.as_str(),),
        )
        .await
        .map_err(map_error)?;
    row.map(|(file, offset, seq, restart_file, restart_offset)| {
        let restart = match (restart_file, restart_offset) {
            (Some(file), Some(offset)) => Some((split_file(&file)?.1, offset)),
            _ => None,
        };
        Ok(BinlogPos {
            file: split_file(&file)?.1,
            offset,
            seq,
            restart,
        })
    })
    .transpose()
}

/// A subscription's names in the database: its row in the positions table
/// and its `GET_LOCK` lock.
struct Names {
    id: String,
    lock: String,
}

impl Names {
    /// Lock names are server-wide, but a subscription is its database's (its
    /// positions are kept there): two sources of a tenant on two databases
    /// of one server, with one subscription name, are two subscriptions, and
    /// one's take-over must not end the other's stream. The lock's name is
    /// the id (readable) with a hash of database and id, at most 63
    /// characters (MySQL allows 64).
    async fn of(conn: &mut Conn, opts: &Opts, id: &str) -> Result<Names, BackendError> {
        // Where the server ignores the case of names (`lower_case_table_names`
        // 1 or 2), `App` and `app` are one database with one positions table,
        // and must share one lock; elsewhere they are two.
        let folds: Option<u8> = conn
            .query_first("SELECT @@lower_case_table_names")
            .await
            .map_err(map_error)?;
        let database = opts.db_name().unwrap_or_default();
        let database = match folds {
            Some(0) | None => database.to_string(),
            Some(_) => database.to_lowercase(),
        };
        Ok(Names {
            id: id.to_string(),
            lock: lock_name(&database, id),
        })
    }
}

/// The `GET_LOCK` name of subscription `id` of `database` (see [`Names::of`]).
pub fn lock_name(database: &str, id: &str) -> String {
    let digest = Sha256::digest(format!("{database}\0{id}").as_bytes());
    let readable: String = id.chars().take(46).collect();
    format!("{readable}_{}", hex::encode(&digest[..8]))
}

/// Takes the subscription's lock on `conn`'s session; with `take_over`,
/// ends the session holding it first.
async fn lock(conn: &mut Conn, names: &Names, name: &str, take_over: bool) -> Result<(), BackendError> {
    let id = names.lock.as_str();
    let wait = if take_over { 0 } else { LOCK_WAIT };
    let got: Option<Option<i64>> = conn
        .exec_first("SELECT GET_LOCK(?, ?)", (id, wait))
        .await
        .map_err(map_error)?;
    if got.flatten() == Some(1) {
        return Ok(());
    }
    if !take_over {
        return Err(BackendError::SubscriptionActive(name.to_string()));
    }
    let holder: Option<Option<u64>> = conn
        .exec_first("SELECT IS_USED_LOCK(?)", (id,))
        .await
        .map_err(map_error)?;
    if let Some(holder) = holder.flatten() {
        // Already gone is fine: the lock is then free.
        let _ = conn.query_drop(format!("KILL CONNECTION {holder}")).await;
    }
    let got: Option<Option<i64>> = conn
        .exec_first("SELECT GET_LOCK(?, ?)", (id, TAKE_OVER_WAIT))
        .await
        .map_err(map_error)?;
    if got.flatten() == Some(1) {
        Ok(())
    } else {
        Err(BackendError::SubscriptionActive(name.to_string()))
    }
}

/// Whether a session other than `own` holds the subscription's lock within a moment.
async fn taken_over(opts: &Opts, names: &Names, own: u32) -> bool {
    let id = names.lock.as_str();
    let Ok(mut conn) = connect(opts).await else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let holder: Result<Option<Option<u64>>, _> = conn.exec_first("SELECT IS_USED_LOCK(?)", (id,)).await;
        match holder {
            Ok(Some(Some(holder))) if holder != u64::from(own) => return true,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return false,
        }
    }
    false
}

struct Txn {
    begin: u64,
    file: u32,
    seq: u32,
    begun: bool,
    time: Option<DateTime<Utc>>,
    /// What tables it wrote (see `run`).
    wrote: Wrote,
    /// An XA transaction's changes, held from its prepare to its commit.
    held: Option<Held>,
}

/// Which tables a transaction wrote: a transaction that wrote only
/// subscription positions does not move heartbeats on (see `run`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wrote {
    Nothing,
    OnlyPositions,
    Others,
}

impl Wrote {
    fn with(self, table: Option<&str>) -> Wrote {
        match (self, table == Some(POSITIONS_TABLE)) {
            (Wrote::Others, _) | (_, false) => Wrote::Others,
            (_, true) => Wrote::OnlyPositions,
        }
    }
}

/// Changes of an XA transaction; decoded when read, so that an error is
/// raised only if one is delivered (not when read again on a resume).
#[derive(Default)]
struct Held {
    changes: Vec<Result<RowChange, BackendError>>,
    /// What they hold in memory, roughly.
    bytes: usize,
}

/// What a prepared XA transaction's commit delivers.
struct Prepared {
    /// Where its event group starts: reading resumes there while it waits.
    file: u32,
    begin: u64,
    held: Held,
    /// When it was prepared, by the binlog (a resume reads it again later).
    at: Option<DateTime<Utc>>,
    /// Whether a warning said it waits long.
    warned: bool,
}

/// How much prepared XA transactions' changes may hold in all, in memory.
const MAX_HELD_BYTES: usize = 64 << 20;
/// A prepared XA transaction waiting longer is logged (once): it holds the
/// stream's restart point, and so its binlog files, until it is decided.
const LONG_PREPARED: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

impl Txn {
    /// A transaction whose event group starts with the event read (`log_pos`
    /// is its end, `size` its length); `xa` for an XA transaction's.
    fn starting(file: u32, log_pos: u64, size: u64, timestamp: u32, xa: bool) -> Txn {
        Txn {
            begin: log_pos.saturating_sub(size),
            file,
            seq: 0,
            begun: false,
            time: DateTime::from_timestamp(i64::from(timestamp), 0),
            wrote: Wrote::Nothing,
            held: xa.then(Held::default),
        }
    }

    fn id(&self) -> String {
        format!("{}:{}", self.file, self.begin)
    }
}

/// MariaDB's GTID event, which starts each event group for a replica that
/// says it understands them (see `run`).
const MARIADB_GTID_EVENT: u8 = 0xa2;

/// What a MariaDB GTID event starts: `None` for a group that is no
/// transaction (DDL, an XA COMMIT or ROLLBACK), `Some(xa)` for one, `xa`
/// for an XA transaction's changes up to its prepare.
fn mariadb_group(data: &[u8]) -> Option<bool> {
    const STANDALONE: u8 = 1;
    const PREPARED_XA: u8 = 64;
    const COMPLETED_XA: u8 = 128;
    // Sequence number (8 bytes) and domain (4), then the flags.
    let flags = data.get(12).copied().unwrap_or(STANDALONE);
    (flags & (STANDALONE | COMPLETED_XA) == 0).then_some(flags & PREPARED_XA != 0)
}

/// Whether a query event starts an XA transaction's group (MySQL's `XA START <xid>`).
fn xa_start(query: &str) -> bool {
    after(query, "XA START ").is_some()
}

/// What follows `prefix` (any case) in `query`, trimmed.
fn after<'a>(query: &'a str, prefix: &str) -> Option<&'a str> {
    query
        .get(..prefix.len())
        .filter(|p| p.eq_ignore_ascii_case(prefix))
        .map(|_| query[prefix.len()..].trim())
}

/// The XID of an XA_PREPARE event, as XA COMMIT and XA ROLLBACK name it
/// in the binlog (`X'6131',X'',1`) in lower case, and whether it was a
/// one-phase commit.
fn xa_prepared(data: &[u8]) -> Option<(String, bool)> {
    let one_phase = *data.first()?;
    let number = |at: usize| Some(i32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?));
    let (format, gtrid, bqual) = (number(1)?, number(5)?, number(9)?);
    let (gtrid, bqual) = (usize::try_from(gtrid).ok()?, usize::try_from(bqual).ok()?);
    let xid = data.get(13..13 + gtrid + bqual)?;
    let (gtrid, bqual) = xid.split_at(gtrid);
    let xid = format!("x'{}',x'{}',{format}", hex::encode(gtrid), hex::encode(bqual));
    Some((xid, one_phase != 0))
}

/// `XA COMMIT <xid>` or `XA ROLLBACK <xid>` as logged: whether it commits, and the XID.
fn xa_decision(query: &str) -> Option<(bool, &str)> {
    after(query, "XA COMMIT ")
        .map(|xid| (true, xid))
        .or_else(|| after(query, "XA ROLLBACK ").map(|xid| (false, xid)))
}

struct Reader {
    spec: WatchSpec,
    names: Names,
    /// Writes acknowledged positions (the binlog connection cannot run queries).
    writer: Conn,
    /// How to open another writer, and the sessions that end the stream.
    opts: Opts,
    /// The binlog connection's id, which holds the subscription's lock.
    holder: u32,
    /// Whether the positions table has the restart point's columns.
    restart_columns: bool,
    base: String,
    watched: HashMap<(String, String), Watched>,
    out: Outbox,
    delivered: BinlogPos,
    acked: BinlogPos,
    file: u32,
    /// Offset just past the last event read.
    end: u64,
    /// XA transactions prepared and not yet committed or rolled back, by
    /// XID, that changed watched tables.
    prepared: HashMap<String, Prepared>,
}

/// `Err(())` when the client has gone.
type Sent = Result<(), ()>;

impl Reader {
    async fn store_acks(&mut self, acks: &mut Acks, stored: &mut BinlogPos) -> Result<(), BackendError> {
        if let Some(p) = acks.latest() {
            self.acked = self.acked.max(BinlogPos::decode(&p)?);
        }
        if self.acked > *stored {
            // Bounded like the binlog connection's silence: a session to a
            // host gone dark would otherwise hold the stream for ever.
            let limit = silence_limit(self.spec.heartbeat_interval);
            let mut retried = false;
            loop {
                let storing = store(
                    &mut self.writer,
                    &self.names,
                    self.restart_columns,
                    &self.base,
                    self.acked,
                    self.holder,
                );
                let failed = match tokio::time::timeout(limit, storing).await {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => e,
                    Err(_) => {
                        return Err(BackendError::Unavailable(format!(
                            "storing the acknowledged position took over {}s: the connection is taken as lost",
                            limit.as_secs()
                        )))
                    }
                };
                // The writer sits idle while no acknowledgement moves (a
                // quiet source): the server's `wait_timeout`, or a proxy's
                // idle limit, may have closed it. Storing is idempotent: once
                // more, on a new session.
                if retried {
                    return Err(failed);
                }
                tracing::debug!(error = %failed, "storing an acknowledged position failed; on a new session");
                retried = true;
                self.writer = connect(&self.opts).await?;
            }
            *stored = self.acked;
        }
        Ok(())
    }

    async fn snapshot(&mut self, conn: &mut Conn) -> Result<Result<BinlogPos, ()>, BackendError> {
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await
            .map_err(map_error)?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(map_error)?;
        // MariaDB reports the binlog position its consistent snapshot corresponds to.
        let status: Vec<(String, String)> = conn
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
            .await
            .map_err(map_error)?;
        let value = |name: &str| {
            status
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let (Some(file), Some(offset)) = (value("binlog_snapshot_file"), value("binlog_snapshot_position")) else {
            return Err(BackendError::ChangesNotReady(
                "a snapshot needs the server's binlog_snapshot_file status (MariaDB, Percona Server); \
                 start without snapshot on this server"
                    .into(),
            ));
        };
        let offset = offset
            .parse()
            .map_err(|_| BackendError::Internal("binlog_snapshot_position".into()))?;
        let at = BinlogPos::at(split_file(&file)?.1, offset, 0);
        let position = at.encode();
        let mut tables: Vec<_> = self.watched.keys().cloned().collect();
        tables.sort();
        for key in tables {
            let Some(w) = self.watched.get(&key) else { continue };
            let (columns, shapes) = (w.columns.clone(), w.shapes.clone());
            let snapshot = SnapshotTable {
                schema: w.schema.clone(),
                table: w.table.clone(),
                columns: w.columns.clone(),
                primary_key: w.primary_key.clone(),
                position: position.clone(),
            };
            let list: Vec<String> = columns.iter().map(|c| super::bulk::quote(&c.name)).collect();
            let sql = format!(
                "SELECT {} FROM {}.{}",
                list.join(", "),
                super::bulk::quote(&snapshot.schema),
                super::bulk::quote(&snapshot.table)
            );
            // Prepared, so values come typed (the text protocol returns every value as text).
            let mut result = conn.exec_iter(sql, ()).await.map_err(map_error)?;
            while let Some(mut row) = result.next().await.map_err(map_error)? {
                let mut values = Vec::with_capacity(columns.len());
                for (i, shape) in shapes.iter().enumerate() {
                    let raw = row.take(i).unwrap_or(MyValue::NULL);
                    values.push(
                        snapshot_value(raw, shape).map_err(|message| BackendError::UnsupportedType {
                            column: columns[i].name.clone(),
                            type_name: format!("{} ({message})", columns[i].native_type),
                        })?,
                    );
                }
                if self.out.send(snapshot.row(values)).await.is_err() {
                    return Ok(Err(()));
                }
            }
        }
        conn.query_drop("COMMIT").await.map_err(map_error)?;
        Ok(Ok(at))
    }
}

/// Query results use the text of ENUM and SET values; everything else decodes as in queries.
fn snapshot_value(raw: MyValue, shape: &Shape) -> Result<Value, String> {
    match shape {
        Shape::Plain(decode) => types::decode(raw, *decode),
        Shape::ShortFractionTime => types::decode(raw, Decode::Time),
        Shape::Unsigned(64) => types::decode(raw, Decode::UInt),
        Shape::Unsigned(_) => types::decode(raw, Decode::Int),
        Shape::FixedBinary(_) => types::decode(raw, Decode::Bytes),
        Shape::Enum(_) | Shape::Set(_) | Shape::Uuid | Shape::Inet6 | Shape::Inet4 => types::decode(raw, Decode::Text),
    }
}

impl Reader {
    /// One row image as the table's row. An image need not hold every column
    /// (`binlog_row_image` MINIMAL or NOBLOB, which any session may set): each
    /// value goes to its column by the column's place in the table, and a
    /// column missing from the image is NULL, which does not mean NULL: it
    /// is added to `left_out`.
    fn row(
        &self,
        w: &Watched,
        logged_columns: u64,
        row: Option<mysql_async::binlog::row::BinlogRow>,
        left_out: &mut Vec<String>,
    ) -> Result<Option<Row>, BackendError> {
        let Some(mut row) = row else { return Ok(None) };
        let changed = || {
            BackendError::ChangesNotReady(format!(
                "the binlog row of {}.{} has {logged_columns} columns where the table had {} when the stream \
                 started; restart the stream after schema changes",
                w.schema,
                w.table,
                w.columns.len()
            ))
        };
        // Fewer: logged before columns were added at the table's end (as ADD
        // COLUMN does), which are NULL in it. More: logged after a change
        // this stream has not seen.
        if usize::try_from(logged_columns).map_or(true, |n| n > w.columns.len()) {
            return Err(changed());
        }
        // A full image holds every column in order; a partial one names each
        // column by its place (`@N`), or by its name with full row metadata.
        let full = row.len() == w.columns.len();
        let logged = row.columns();
        let mut values: Row = w.columns.iter().map(|_| Value::Null).collect();
        let mut carried = vec![full; w.columns.len()];
        for (i, c) in logged.iter().enumerate() {
            let place = if full {
                Some(i)
            } else {
                let name = c.name_str();
                match name.strip_prefix('@').and_then(|n| n.parse().ok()) {
                    Some(place) => Some(place),
                    None => w.columns.iter().position(|column| column.name == name),
                }
            };
            let v = row.take(i).unwrap_or(BinlogValue::Value(MyValue::NULL));
            let slot = place.map(|p| (w.columns.get(p), w.shapes.get(p), values.get_mut(p), carried.get_mut(p)));
            let Some((Some(column), Some(shape), Some(value), Some(carried))) = slot else {
                return Err(changed());
            };
            *carried = true;
            *value = convert(v, shape).map_err(|message| BackendError::UnsupportedType {
                column: column.name.clone(),
                type_name: format!("{} ({message})", column.native_type),
            })?;
        }
        // Columns past those logged were added since: NULL is what they held.
        let logged_columns = usize::try_from(logged_columns).unwrap_or(usize::MAX);
        left_out.extend(
            w.columns
                .iter()
                .zip(&carried)
                .take(logged_columns)
                .filter(|(_, carried)| !**carried)
                .map(|(column, _)| column.name.clone()),
        );
        Ok(Some(values))
    }

    /// A position of the stream, with the restart point that resuming there needs.
    fn position(&self, file: u32, offset: u64, seq: u32) -> BinlogPos {
        with_restart(self.oldest_prepare(), file, offset, seq)
    }

    /// Where the changes of the oldest XA transaction still waiting for its
    /// decision begin.
    fn oldest_prepare(&self) -> Option<(u32, u64)> {
        self.prepared.values().map(|p| (p.file, p.begin)).min()
    }

    /// Sends `t`'s Begin boundary unless sent, at the start of its changes
    /// (raised to a resume position inside it by the service).
    async fn begin(&mut self, t: &mut Txn) -> Sent {
        if std::mem::replace(&mut t.begun, true) {
            return Ok(());
        }
        let item = ChangeItem::Begin {
            txid: t.id(),
            commit_time: t.time,
            position: self.position(t.file, t.begin, 0).encode(),
        };
        self.out.send(item).await
    }

    /// Sends `change` of `t` at `position`, after `t`'s Begin.
    async fn send(&mut self, t: &mut Txn, position: BinlogPos, mut change: RowChange) -> Sent {
        self.begin(t).await?;
        self.delivered = position;
        (change.txid, change.commit_time, change.position) = (t.id(), t.time, position.encode());
        self.out.send(ChangeItem::Change(change)).await
    }

    /// Delivers one event's row changes, or holds them in an XA
    /// transaction; `Err(())` when the client has gone.
    async fn rows(
        &mut self,
        txn: &mut Option<Txn>,
        stream: &mysql_async::BinlogStream,
        rows: &RowsEventData<'_>,
    ) -> Result<Sent, BackendError> {
        let tme = stream.get_tme(rows.table_id());
        if let Some(t) = txn.as_mut() {
            t.wrote = t.wrote.with(tme.map(|m| m.table_name()).as_deref());
        }
        let Some(tme) = tme else {
            return Ok(Ok(()));
        };
        let key = (tme.database_name().into_owned(), tme.table_name().into_owned());
        let Some(w) = self.watched.get(&key) else {
            return Ok(Ok(()));
        };
        let op = match rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => ChangeOp::Insert,
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => ChangeOp::Delete,
            _ => ChangeOp::Update,
        };
        let Some(t) = txn.as_mut() else {
            return Ok(Ok(()));
        };
        let logged = tme.columns_count();
        let change = |before, after| -> Result<RowChange, BackendError> {
            // A partial before image holds the key: the rest is not told.
            let before = self.row(w, logged, before, &mut Vec::new())?;
            let mut unchanged = Vec::new();
            let after = self.row(w, logged, after, &mut unchanged)?;
            Ok(RowChange {
                op,
                schema: w.schema.clone(),
                table: w.table.clone(),
                columns: w.columns.clone(),
                before,
                after,
                unchanged,
                primary_key: w.primary_key.clone(),
                txid: String::new(),
                commit_time: None,
                position: Position(Vec::new()),
            })
        };
        // Prepared XA transactions do not change within one event.
        let (oldest_prepare, held_by_others) = (
            self.oldest_prepare(),
            self.prepared.values().map(|p| p.held.bytes).sum::<usize>(),
        );
        let mut changes = Vec::new();
        for r in rows.rows(tme) {
            let (before, after) = r.map_err(|e| BackendError::Internal(format!("binlog rows: {e}")))?;
            if let Some(held) = t.held.as_mut() {
                let change = change(before, after);
                // The change with its own copies of the table's names.
                held.bytes += std::mem::size_of_val(&change)
                    + change.as_ref().map_or(0, |c| c.size() + c.schema.len() + c.table.len());
                held.changes.push(change);
                if held.bytes + held_by_others > MAX_HELD_BYTES {
                    return Err(BackendError::ChangesNotReady(format!(
                        "XA transactions hold more than {} MiB of changes to the watched tables, which wait \
                         in the gateway's memory from XA START to XA COMMIT: every resume stops here again; \
                         delete the subscription and watch again with a snapshot, and commit XA transactions \
                         in smaller parts",
                        MAX_HELD_BYTES >> 20
                    )));
                }
                continue;
            }
            // Rows delivered before (a resume) are numbered but not decoded:
            // one logged before a schema change must not stop the stream again.
            t.seq += 1;
            let position = with_restart(oldest_prepare, t.file, t.begin, t.seq);
            if position > self.delivered {
                changes.push((position, change(before, after)?));
            }
        }
        for (position, change) in changes {
            if self.send(t, position, change).await.is_err() {
                return Ok(Err(()));
            }
        }
        Ok(Ok(()))
    }

    /// Ends the transaction being read at the commit event ending at `end`.
    async fn commit(&mut self, txn: &mut Option<Txn>, end: u64) -> Sent {
        let Some(mut t) = txn.take() else { return Ok(()) };
        let position = self.position(self.file, end, 0);
        // Resumed at the transaction's last change: none of it came again,
        // but its boundaries do, so that it is closed.
        let resumed_at_its_end =
            self.delivered.file == t.file && self.delivered.offset == t.begin && self.delivered.seq > 0;
        if !t.begun && resumed_at_its_end && position > self.delivered {
            self.begin(&mut t).await?;
        }
        if t.begun && position > self.delivered {
            let item = ChangeItem::Commit {
                txid: t.id(),
                commit_time: t.time,
                position: position.encode(),
                events: u64::from(t.seq),
            };
            self.out.send(item).await?;
            self.delivered = self.delivered.max(position);
        }
        // Otherwise nothing of it was sent: the next heartbeat carries a
        // position past it, so that a subscription whose tables stay quiet
        // still moves on (a commit of other tables is no delivery).
        Ok(())
    }

    /// An XA transaction's prepare (the XA_PREPARE event ending at `end`)
    /// ends the group of its changes: they wait for its XA COMMIT, unless
    /// it committed in one phase (MySQL logs XA COMMIT ... ONE PHASE so).
    async fn prepare(&mut self, txn: &mut Option<Txn>, data: &[u8], end: u64) -> Result<Sent, BackendError> {
        let Some((xid, one_phase)) = xa_prepared(data) else {
            return Err(BackendError::Internal("an XA_PREPARE event that does not parse".into()));
        };
        if one_phase {
            return self.end_group(txn, end).await;
        }
        let Some(mut t) = txn.take() else { return Ok(Ok(())) };
        let Some(held) = t.held.take() else {
            // Its changes would be lost: they were read as a plain transaction's.
            return Err(BackendError::Internal(format!(
                "an XA prepare of {xid} ends an event group that did not start as an XA transaction's"
            )));
        };
        if !held.changes.is_empty() {
            let (file, begin, at, warned) = (t.file, t.begin, t.time, false);
            self.prepared.insert(
                xid,
                Prepared {
                    file,
                    begin,
                    held,
                    at,
                    warned,
                },
            );
        }
        Ok(Ok(()))
    }

    /// An XA COMMIT or XA ROLLBACK (the query event read, which ends at
    /// `log_pos` and is `size` long): a commit delivers what its prepare
    /// held, as a transaction of its own event group. Its changes' positions
    /// (and its Begin's) still carry the prepare's restart point; its
    /// Commit's no longer does.
    async fn decide(&mut self, commit: bool, xid: &str, header: (u64, u64, u32)) -> Result<Sent, BackendError> {
        let (log_pos, size, timestamp) = header;
        let xid = xid.to_ascii_lowercase();
        let held = match self.prepared.get_mut(&xid) {
            Some(p) if commit => std::mem::take(&mut p.held),
            _ => {
                self.prepared.remove(&xid);
                return Ok(Ok(()));
            }
        };
        let mut t = Txn::starting(self.file, log_pos, size, timestamp, false);
        if self.deliver_held(&mut t, held).await?.is_err() {
            return Ok(Err(()));
        }
        self.prepared.remove(&xid);
        Ok(self.commit(&mut Some(t), log_pos).await)
    }

    /// Logs each XA transaction prepared over `LONG_PREPARED` ago, once:
    /// one never decided (a transaction manager gone, or MySQL before
    /// 8.0.30 rolling it back at a crash without logging it) holds every
    /// resume of this stream to its prepare, and its binlog file with it.
    fn warn_of_long_prepared(&mut self) {
        let (subscription, base) = (&self.spec.name, &self.base);
        let now = Utc::now();
        for (xid, p) in self.prepared.iter_mut().filter(|(_, p)| !p.warned) {
            if p.at.is_some_and(|at| now - at > LONG_PREPARED) {
                p.warned = true;
                tracing::warn!(
                    %subscription,
                    %xid,
                    prepared_at = %format!("{}:{}", file_name(base, p.file), p.begin),
                    "an XA transaction prepared {} minutes ago is not committed or rolled back yet: resuming \
                     this stream reads the binlog again from its prepare (XA RECOVER lists it)",
                    LONG_PREPARED.num_minutes()
                );
            }
        }
    }

    /// Ends the transaction being read at its commit event, which ends at
    /// `end`; one of XA changes (MySQL's one-phase commit) delivers them first.
    async fn end_group(&mut self, txn: &mut Option<Txn>, end: u64) -> Result<Sent, BackendError> {
        if let Some(t) = txn.as_mut() {
            if let Some(held) = t.held.take() {
                if self.deliver_held(t, held).await?.is_err() {
                    return Ok(Err(()));
                }
            }
        }
        Ok(self.commit(txn, end).await)
    }

    /// Numbers held changes as `t`'s and sends those not delivered before.
    async fn deliver_held(&mut self, t: &mut Txn, held: Held) -> Result<Sent, BackendError> {
        for change in held.changes {
            t.seq += 1;
            let position = self.position(t.file, t.begin, t.seq);
            if position > self.delivered && self.send(t, position, change?).await.is_err() {
                return Ok(Err(()));
            }
        }
        Ok(Ok(()))
    }

    /// Streams until the client goes or the stream fails; the caller stores
    /// the acknowledgements still pending afterwards.
    async fn run(&mut self, mut conn: Conn, acks: &mut Acks, stored: &mut BinlogPos) -> Result<(), BackendError> {
        if self.spec.snapshot {
            match self.snapshot(&mut conn).await? {
                Ok(at) => self.delivered = self.delivered.max(at),
                Err(()) => return Ok(()),
            }
        }
        // Before the position: XA transactions prepared before it and
        // committed after it are read again from their prepare.
        let (start_file, start_offset) = self.delivered.read_from();
        self.file = start_file;
        self.end = start_offset;
        // Keeps the connection alive on a quiet server (nanoseconds).
        let period = self.spec.heartbeat_interval.as_nanos().min(u128::from(u64::MAX / 2)) as u64;
        conn.query_drop(format!("SET @master_heartbeat_period = {period}"))
            .await
            .map_err(map_error)?;
        // MariaDB sends its GTID events as they are to a replica that says it
        // reads them (4: MARIA_SLAVE_CAPABILITY_GTID); to others it rewrites
        // each as BEGIN, and fails the whole stream at an XA transaction's
        // ("Failed to replace GTID event with backwards-compatible event").
        // MySQL ignores the variable. (The session's `net_write_timeout` is
        // the source's setup's, see `WRITE_TIMEOUT`.)
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(map_error)?;
        let file = file_name(&self.base, start_file);
        let request = BinlogStreamRequest::new(server_id())
            .with_filename(file.as_bytes())
            .with_pos(start_offset);
        let mut stream = conn.get_binlog_stream(request).await.map_err(map_error)?;
        let mut txn: Option<Txn> = None;
        // Whether a format description was read: rotates parse whole from then on.
        let mut described = false;
        let mut ticker = tokio::time::interval(self.spec.heartbeat_interval.min(Duration::from_secs(1)));
        // The server sends a heartbeat event after each quiet period: nothing
        // for several of them means the connection is gone without a word
        // (a host gone dark), which TCP on a receiving socket never reports.
        // Only time spent waiting for the server counts as its silence, not
        // time spent delivering (to a slow or throttled client) or storing.
        let silence = silence_limit(self.spec.heartbeat_interval);
        let mut heard = tokio::time::Instant::now();
        let mut delivering = false;
        loop {
            if std::mem::take(&mut delivering) {
                heard = tokio::time::Instant::now();
            }
            let event = tokio::select! {
                e = stream.next() => {
                    delivering = true;
                    e
                }
                _ = ticker.tick() => {
                    if heard.elapsed() > silence {
                        return Err(BackendError::Unavailable(format!(
                            "the database sent nothing, not even a heartbeat, for {}s: the connection is taken as lost",
                            silence.as_secs()
                        )));
                    }
                    let busy = tokio::time::Instant::now();
                    self.store_acks(acks, stored).await?;
                    self.warn_of_long_prepared();
                    // Inside a transaction the log offset is no place to resume from.
                    if txn.is_none() {
                        let at = self.position(self.file, self.end, 0);
                        let every = self.spec.heartbeat_interval;
                        if self.out.heartbeat(&mut self.delivered, at, every, BinlogPos::encode).await.is_err() {
                            return Ok(());
                        }
                    }
                    heard += busy.elapsed();
                    continue;
                }
                () = self.out.closed() => return Ok(()),
            };
            let event = match event {
                None => return Err(BackendError::Unavailable("the binlog stream ended".into())),
                Some(e) => e.map_err(map_error)?,
            };
            let header = event.header();
            if is_compressed_event(header.event_type_raw()) {
                return Err(compressed("a compressed event was read"));
            }
            let (log_pos, size) = (u64::from(header.log_pos()), u64::from(header.event_size()));
            let file = self.file;
            let starting = |xa| Txn::starting(file, log_pos, size, header.timestamp(), xa);
            // A GTID event starts an event group, and so ends whatever group
            // was left open (one ended by a ROLLBACK query). It is no place to
            // resume from: its group's end is.
            if header.event_type_raw() == MARIADB_GTID_EVENT {
                txn = mariadb_group(event.data()).map(starting);
                continue;
            }
            let data = event
                .read_data()
                .map_err(|e| BackendError::Internal(format!("binlog event: {e}")))?;
            let mut bookkeeping = false;
            // True when the client went away and the stream is over.
            let ended = match data {
                Some(EventData::FormatDescriptionEvent(_)) => {
                    described = true;
                    false
                }
                Some(EventData::RotateEvent(r)) if follows_rotate(log_pos, header.timestamp(), described) => {
                    self.file = split_file(&r.name())?.1;
                    self.end = r.position();
                    continue;
                }
                Some(EventData::GtidEvent(_) | EventData::AnonymousGtidEvent(_)) => {
                    txn = None;
                    continue;
                }
                Some(EventData::XaPrepareLogEvent(data)) => self.prepare(&mut txn, &data, log_pos).await?.is_err(),
                Some(EventData::QueryEvent(q)) => {
                    let query = q.query();
                    if query.eq_ignore_ascii_case("BEGIN") {
                        txn = Some(starting(false));
                        false
                    } else if xa_start(&query) {
                        // MySQL starts an XA transaction's group so.
                        txn = Some(starting(true));
                        false
                    } else if let Some((commit, xid)) = xa_decision(&query) {
                        // A group of its own: one left open is over.
                        txn = None;
                        let header = (log_pos, size, header.timestamp());
                        self.decide(commit, xid, header).await?.is_err()
                    } else if query.eq_ignore_ascii_case("COMMIT") {
                        // Non-transactional tables end their statement group so.
                        bookkeeping = txn.as_ref().is_some_and(|t| t.wrote == Wrote::OnlyPositions);
                        self.end_group(&mut txn, log_pos).await?.is_err()
                    } else {
                        false
                    }
                }
                Some(EventData::RowsEvent(rows)) => self.rows(&mut txn, &stream, &rows).await?.is_err(),
                Some(EventData::XidEvent(_)) => {
                    bookkeeping = txn.as_ref().is_some_and(|t| t.wrote == Wrote::OnlyPositions);
                    self.end_group(&mut txn, log_pos).await?.is_err()
                }
                // Its position is the end of what was read, bookkeeping included.
                Some(EventData::HeartbeatEvent) => continue,
                _ => false,
            };
            if ended {
                return Ok(());
            }
            // Artificial events (the first rotate) carry no position; inside
            // a transaction the log offset is no place to resume from. A
            // transaction that only stored positions (this stream's or
            // another's, after an acknowledgement) does not move heartbeats
            // on: on a quiet server each acknowledged heartbeat would store
            // a position, which moves the log on for the next one, for ever.
            if log_pos > 0 && txn.is_none() && !bookkeeping {
                self.end = log_pos;
            }
        }
    }
}

/// The position at `(file, offset, seq)`, with the restart point
/// `oldest_prepare` when it lies before it.
fn with_restart(oldest_prepare: Option<(u32, u64)>, file: u32, offset: u64, seq: u32) -> BinlogPos {
    BinlogPos {
        restart: oldest_prepare.filter(|w| *w < (file, offset)),
        ..BinlogPos::at(file, offset, seq)
    }
}

/// `opts` are the source's, without its read-only session setting: a
/// read-only source still records its subscriptions' positions.
/// `restart_columns_known` is the source's: whether its positions table has
/// the restart columns is asked (and the ALTER tried, which may wait 5 s)
/// once per source, not at every watch and reconnect.
pub(super) async fn watch(
    opts: &Opts,
    restart_columns_known: &tokio::sync::OnceCell<bool>,
    spec: WatchSpec,
) -> Result<ChangeFeed, BackendError> {
    let mut setup = connect(opts).await?;
    check_binlog(&mut setup).await?;
    let watched = resolve(&mut setup, &spec.tables).await?;
    ensure_positions_table(&mut setup).await?;
    // The binlog connection holds the lock for as long as it streams.
    let mut conn = connect(opts).await?;
    let names = Names::of(&mut setup, opts, &spec.id).await?;
    let restart_columns = *restart_columns_known
        .get_or_try_init(|| restart_columns(&mut setup))
        .await?;
    lock(&mut conn, &names, &spec.name, spec.take_over).await?;
    let (current_file, current_offset) = current_position(&mut setup).await?;
    let (base, current_number) = split_file(&current_file)?;
    let current = BinlogPos::at(current_number, current_offset, 0);
    let stored_position = match stored(&mut setup, &names, restart_columns).await? {
        Some(p) => p,
        None => {
            store(&mut setup, &names, restart_columns, &base, current, conn.id()).await?;
            current
        }
    };
    let start = match &spec.resume {
        Some(resume) => {
            let p = BinlogPos::decode(resume)?;
            let acked = format!("{}:{}", file_name(&base, stored_position.file), stored_position.offset);
            check_resume(&spec.name, &p, &stored_position, &acked, Some(&current))?;
            p
        }
        None => stored_position,
    };
    let from_stored = spec.resume.is_none().then(|| stored_position.encode());
    let logs: Vec<mysql_async::Row> = setup.query("SHOW BINARY LOGS").await.map_err(map_error)?;
    let oldest = logs
        .into_iter()
        .filter_map(|mut r| r.take::<String, _>(0))
        .filter_map(|name| split_file(&name).ok().map(|(_, n)| n))
        .min();
    let (first_file, _) = start.read_from();
    if oldest.is_some_and(|o| first_file < o) {
        return Err(BackendError::PositionNotRetained(format!(
            "binlog file {} has been purged; the subscription's changes since then are gone. \
             Delete the subscription and start again (with a snapshot)",
            file_name(&base, first_file)
        )));
    }
    let (out, end, items) = changes::feed();
    let (acks, ack_rx) = Acks::channel();
    let reader = Reader {
        writer: setup,
        opts: opts.clone(),
        holder: conn.id(),
        restart_columns,
        base,
        watched,
        out,
        delivered: start,
        acked: start,
        file: start.file,
        end: start.offset,
        prepared: HashMap::new(),
        spec,
        names,
    };
    let own = conn.id();
    tokio::spawn(async move {
        let name = reader.spec.name.clone();
        let (mut reader, mut ack_rx, mut stored) = (reader, ack_rx, stored_position);
        let mut outcome = reader.run(conn, &mut ack_rx, &mut stored).await;
        let flushed = reader.store_acks(&mut ack_rx, &mut stored).await;
        if outcome.is_ok() {
            outcome = flushed;
        }
        // A dump thread notices a closed socket only when it next writes, and
        // holds the subscription's lock until then: end it now.
        if let Ok(mut c) = connect(&reader.opts).await {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, c.query_drop(format!("KILL CONNECTION {own}"))).await;
        }
        if let Err(e) = outcome {
            tracing::debug!(subscription = %name, error = %e, "change stream ended");
            // A take-over ends this session from outside: say so rather than "connection lost".
            let e = if !end.is_closed()
                && tokio::time::timeout(CONNECT_TIMEOUT, taken_over(&reader.opts, &reader.names, own))
                    .await
                    .unwrap_or(false)
            {
                BackendError::SubscriptionTakenOver(name)
            } else {
                e
            };
            end.fail(e).await;
        }
    });
    Ok(ChangeFeed {
        items,
        acks,
        acknowledged: from_stored.clone(),
        start: from_stored,
    })
}

pub(super) async fn delete(opts: &Opts, id: &str, name: &str) -> Result<(), BackendError> {
    let mut conn = connect(opts).await?;
    let names = Names::of(&mut conn, opts, id).await?;
    lock(&mut conn, &names, name, false).await?;
    ensure_positions_table(&mut conn).await?;
    conn.exec_drop(format!("DELETE FROM {POSITIONS_TABLE} WHERE subscription = ?"), (id,))
        .await
        .map_err(map_error)?;
    if conn.affected_rows() == 0 {
        return Err(BackendError::SubscriptionNotFound(name.to_string()));
    }
    Ok(())
}

/// Whether a Rotate event moves the stream to the file it names. Real
/// rotates do. So do the server's artificial ones (no position, no time)
/// once a format description has been read: after a server restart the old
/// file ends with a Stop event, not a Rotate, and an artificial rotate is
/// the only word of the new file (ignoring it, the stream went on under the
/// old file's number, and skipped changes as already delivered). Only the
/// first one, before any format description, is passed over: it names the
/// file asked for, with its checksum still attached (the reader does not
/// know yet that checksums are on).
fn follows_rotate(log_pos: u64, timestamp: u32, described: bool) -> bool {
    log_pos > 0 || timestamp > 0 || described
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What mysql_common gives for these TIME(2) values, worked out from
    /// MySQL's packing (`my_time_packed_to_binary`) and its reading.
    #[test]
    fn short_fraction_times_read_with_a_wrapped_fraction_are_undone() {
        let cases = [
            ((false, 26, 0, 63, 62, 16_277_216), (true, 0, 0, 0, 1, 500_000)),
            ((true, 3, 3, 0, 0, 500_000), (true, 29, 4, 0, 0, 500_000)),
            ((true, 8, 21, 59, 59, 990_000), (true, 34, 22, 59, 59, 990_000)),
            ((false, 26, 0, 63, 63, 16_767_216), (true, 0, 0, 0, 0, 10_000)),
            ((false, 25, 12, 29, 7, 16_077_216), (true, 0, 12, 34, 56, 700_000)),
            // Read right: negative without a fraction, and positive ones.
            ((true, 0, 5, 0, 0, 0), (true, 0, 5, 0, 0, 0)),
            ((false, 0, 1, 2, 3, 450_000), (false, 0, 1, 2, 3, 450_000)),
        ];
        for ((n, d, h, m, s, u), (en, ed, eh, em, es, eu)) in cases {
            assert_eq!(
                unwrapped_time(MyValue::Time(n, d, h, m, s, u)),
                MyValue::Time(en, ed, eh, em, es, eu)
            );
        }
    }

    #[test]
    fn json_decimals_are_numbers_as_a_query_returns_them() {
        use mysql_async::binlog::jsonb::{JsonContainer, JsonNumber, JsonScalar};
        use mysql_common::binlog::decimal::Decimal;
        let number = |n: JsonNumber| JsonDom::Scalar(JsonScalar::Number(n));
        let decimal = |d: &str| number(JsonNumber::Decimal(d.parse::<Decimal>().expect("decimal")));
        let dom = JsonDom::Container(JsonContainer::Object(
            [
                ("price".to_string(), decimal("12.50")),
                ("small".to_string(), decimal("-0.5")),
                (
                    "list".to_string(),
                    JsonDom::Container(JsonContainer::Array(vec![
                        number(JsonNumber::Int(-1)),
                        number(JsonNumber::Double(1.5)),
                        JsonDom::Scalar(JsonScalar::String("a\"b".into())),
                        JsonDom::Scalar(JsonScalar::Null),
                    ])),
                ),
            ]
            .into_iter()
            .collect(),
        ));
        let mut text = String::new();
        write_json(dom, &mut text);
        assert_eq!(text, r#"{"list":[-1,1.5,"a\"b",null],"price":12.50,"small":-0.5}"#);
        serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
    }

    #[test]
    fn rotates_are_followed_except_the_first_artificial_one() {
        // The stream's first event: the file asked for, checksum attached.
        assert!(!follows_rotate(0, 0, false));
        // A real rotate (FLUSH BINARY LOGS, a full file).
        assert!(follows_rotate(4_521, 1_733_400_000, true));
        // The artificial rotate to the next file after a restart.
        assert!(follows_rotate(0, 0, true));
    }

    #[test]
    fn compressed_events_are_known_by_their_type() {
        // MariaDB's QUERY_COMPRESSED_EVENT to DELETE_ROWS_COMPRESSED_EVENT, MySQL's TRANSACTION_PAYLOAD_EVENT.
        for compressed in [165, 166, 169, 171, 40] {
            assert!(is_compressed_event(compressed), "{compressed}");
        }
        // QUERY_EVENT, TABLE_MAP_EVENT, WRITE_ROWS_EVENT(V2), XID_EVENT, MariaDB's GTID and ANNOTATE_ROWS.
        for plain in [2, 19, 30, 16, 162, 160] {
            assert!(!is_compressed_event(plain), "{plain}");
        }
    }

    #[test]
    fn positions_order_as_the_binlog() {
        let p = BinlogPos::at;
        let mut all = [p(2, 4, 0), p(1, 900, 0), p(1, 500, 2), p(1, 500, 1), p(1, 500, 0)];
        let mut encoded: Vec<Position> = all.iter().map(|x| x.encode()).collect();
        all.sort();
        encoded.sort();
        assert_eq!(encoded, all.iter().map(|x| x.encode()).collect::<Vec<_>>());
        assert_eq!(BinlogPos::decode(&p(7, 123, 4).encode()).ok(), Some(p(7, 123, 4)));
        assert!(BinlogPos::decode(&Position(vec![1, 2, 3])).is_err());
        // A restart point rides along, and does not change the order.
        let with = BinlogPos {
            restart: Some((6, 99)),
            ..p(7, 123, 4)
        };
        let back = BinlogPos::decode(&with.encode()).expect("decodes");
        assert_eq!((back, back.restart, back.read_from()), (with, Some((6, 99)), (6, 99)));
        assert_eq!(p(7, 123, 4).read_from(), (7, 123));
        assert!(with < p(7, 123, 5) && with > p(7, 123, 3) && with == p(7, 123, 4));
        // A restart point at or past its position is no position of ours.
        for restart in [(7, 123), (7, 124), (8, 1)] {
            let bad = BinlogPos {
                restart: Some(restart),
                ..p(7, 123, 4)
            };
            assert!(BinlogPos::decode(&bad.encode()).is_err(), "{restart:?}");
        }
    }

    #[test]
    fn xa_events_are_read_as_mariadb_and_mysql_log_them() {
        // What MariaDB 10.11 sent: a GTID event of an XA transaction's
        // changes (flags 76), of a plain one (12), of an XA COMMIT (141).
        let gtid = |flags: u8| [[0u8; 12].as_slice(), &[flags, 0, 0]].concat();
        assert_eq!(mariadb_group(&gtid(76)), Some(true));
        assert_eq!(mariadb_group(&gtid(12)), Some(false));
        assert_eq!(mariadb_group(&gtid(141)), None);
        assert_eq!(mariadb_group(&gtid(1)), None);
        // XA_PREPARE: one phase, format 1, gtrid "x1" and bqual "q".
        let prepare = [&[0u8, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0][..], b"x1q"].concat();
        assert_eq!(xa_prepared(&prepare), Some(("x'7831',x'71',1".to_string(), false)));
        assert_eq!(xa_prepared(&prepare[..14]), None, "cut short");
        // Format -1, as the server prints it.
        let negative = [&[0u8, 255, 255, 255, 255, 1, 0, 0, 0, 0, 0, 0, 0][..], b"x"].concat();
        assert_eq!(xa_prepared(&negative), Some(("x'78',x'',-1".to_string(), false)));
        assert_eq!(
            xa_decision("XA COMMIT X'7831',X'71',1"),
            Some((true, "X'7831',X'71',1"))
        );
        assert_eq!(xa_decision("xa rollback X'7831',X'',1"), Some((false, "X'7831',X'',1")));
        assert_eq!(xa_decision("XA END X'7831',X'',1"), None);
        assert!(xa_start("XA START X'7831',X'',1") && !xa_start("XA END X'7831',X'',1"));
    }

    #[test]
    fn lock_names_are_per_database_and_fit_mysqls_limit() {
        let id = crate::service::changes::subscription_id(&"t".repeat(80), &"s".repeat(80));
        let lock = lock_name("shop", &id);
        assert!(lock.len() <= 64 && lock.starts_with("weir_t"), "{lock}");
        assert_ne!(lock, lock_name("shop2", &id));
        assert_ne!(lock, lock_name("SHOP", &id));
        assert_ne!(
            lock,
            lock_name("shop", &crate::service::changes::subscription_id("t", "s"))
        );
    }

    #[test]
    fn file_names_split_and_join() {
        let (base, n) = split_file("mysql-bin.000042").expect("name");
        assert_eq!((base.as_str(), n), ("mysql-bin", 42));
        assert_eq!(file_name(&base, n), "mysql-bin.000042");
        assert!(split_file("nonumber").is_err());
    }

    #[test]
    fn enum_and_set_labels_are_parsed_with_quotes() {
        assert_eq!(labels("enum('a','b c','it''s')"), ["a", "b c", "it's"]);
        assert_eq!(labels("set('x','y')"), ["x", "y"]);
        // As COLUMN_TYPE writes them on MariaDB 10.11: a backslash doubled,
        // NUL, LF and CR escaped, other control characters as they are.
        assert_eq!(
            labels(r"enum('c\\d','n\0n','x\ny','c\rr','t	b','\\%')"),
            ["c\\d", "n\0n", "x\ny", "c\rr", "t\tb", "\\%"]
        );
        // The rest of MySQL's string-literal escapes.
        assert_eq!(
            labels(r"set('a\'b','\t\b\Z\\\x','a\%\_')"),
            ["a'b", "\t\u{8}\u{1a}\\x", "a\\%\\_"]
        );
        let set = Shape::Set(labels("set('x','y','z')"));
        assert_eq!(
            convert(BinlogValue::Value(MyValue::Bytes(vec![0b101])), &set).ok(),
            Some(Value::Text("x,z".into()))
        );
        let e = Shape::Enum(labels("enum('a','b')"));
        assert_eq!(
            convert(BinlogValue::Value(MyValue::Int(2)), &e).ok(),
            Some(Value::Text("b".into()))
        );
    }

    #[test]
    fn the_zero_timestamp_is_null_and_the_first_half_second_is_not() {
        let ts = |v| convert(BinlogValue::Value(v), &Shape::Plain(Decode::Timestamp)).ok();
        assert_eq!(ts(MyValue::Bytes(b"0".to_vec())), Some(Value::Null));
        assert_eq!(ts(MyValue::Int(0)), Some(Value::Null));
        assert_eq!(
            ts(MyValue::Bytes(b"0.500000".to_vec())),
            Some(Value::TimestampTz(
                DateTime::from_timestamp(0, 500_000_000).expect("time")
            ))
        );
    }

    #[test]
    fn uuids_and_addresses_are_written_as_mariadb_writes_them() {
        let text = |shape: &Shape, hex_value: &str| {
            let bytes = hex::decode(hex_value).expect("hex");
            match convert(BinlogValue::Value(MyValue::Bytes(bytes)), shape) {
                Ok(Value::Text(t)) => t,
                other => panic!("{hex_value}: {other:?}"),
            }
        };
        assert_eq!(
            text(&Shape::Uuid, "6ccd780cbaba102695645b8c656024db"),
            "6ccd780c-baba-1026-9564-5b8c656024db"
        );
        // Trailing zero bytes are not logged.
        assert_eq!(
            text(&Shape::Uuid, "550e8400e29b41d4a71644665544"),
            "550e8400-e29b-41d4-a716-446655440000"
        );
        assert_eq!(text(&Shape::Uuid, ""), "00000000-0000-0000-0000-000000000000");
        assert_eq!(text(&Shape::Inet4, "0a000001"), "10.0.0.1");
        assert_eq!(text(&Shape::Inet4, "01"), "1.0.0.0");
        // What SELECT printed on MariaDB 10.11 for each address.
        for (hex_value, printed) in [
            ("", "::"),
            ("00000000000000000000000000000001", "::1"),
            ("000000000000000000000000010203", "::1.2.3.0"),
            ("00000000000000000000ffff01020304", "::ffff:1.2.3.4"),
            ("00000000000000000000ffff", "::ffff:0.0.0.0"),
            ("00010000000000010000000000000001", "1:0:0:1::1"),
            ("00010000000000020000000000030004", "1::2:0:0:3:4"),
            ("20010db8000000000000000000000001", "2001:db8::1"),
            ("20010db8", "2001:db8::"),
            ("00010002000300040005000600070000", "1:2:3:4:5:6:7::"),
            ("00010000000300040005000600070008", "1::3:4:5:6:7:8"),
            ("00000002000300040005000600070008", "::2:3:4:5:6:7:8"),
            ("0064ff9b000000000000000001020304", "64:ff9b::102:304"),
            ("00000000000000000001", "::1:0:0:0"),
            ("ffffabcd", "ffff:abcd::"),
            ("00010002000300040005000600070008", "1:2:3:4:5:6:7:8"),
        ] {
            assert_eq!(text(&Shape::Inet6, hex_value), printed, "{hex_value}");
        }
        assert!(convert(BinlogValue::Value(MyValue::Bytes(vec![0; 17])), &Shape::Uuid).is_err());
    }

    #[test]
    fn unsigned_integers_are_restored_from_the_binlog_sign() {
        assert_eq!(
            convert(BinlogValue::Value(MyValue::Int(-1)), &Shape::Unsigned(32)).ok(),
            Some(Value::Int(4_294_967_295))
        );
        assert_eq!(
            convert(BinlogValue::Value(MyValue::Int(-1)), &Shape::Unsigned(64)).ok(),
            Some(Value::UInt(u64::MAX))
        );
        // With signedness in the table map, as the snapshot and queries give them.
        assert_eq!(
            convert(BinlogValue::Value(MyValue::UInt(u64::MAX)), &Shape::Unsigned(64)).ok(),
            Some(Value::UInt(u64::MAX))
        );
        assert_eq!(
            convert(BinlogValue::Value(MyValue::UInt(4_294_967_295)), &Shape::Unsigned(32)).ok(),
            Some(Value::Int(4_294_967_295))
        );
        // YEAR as a number, 0000 included.
        let year = |text: &[u8]| {
            convert(
                BinlogValue::Value(MyValue::Bytes(text.to_vec())),
                &Shape::Plain(Decode::Int),
            )
            .ok()
        };
        assert_eq!(year(b"2024"), Some(Value::Int(2024)));
        assert_eq!(year(b"1900"), Some(Value::Int(0)));
        let ts = convert(
            BinlogValue::Value(MyValue::Bytes(b"1700000000.25".to_vec())),
            &Shape::Plain(Decode::Timestamp),
        );
        assert_eq!(
            ts.ok(),
            Some(Value::TimestampTz(
                DateTime::from_timestamp(1_700_000_000, 250_000_000).expect("time")
            ))
        );
    }

    #[test]
    fn replica_ids_are_drawn_apart_from_real_replicas() {
        let ids: std::collections::HashSet<u32> = (0..64).map(|_| server_id()).collect();
        assert!(ids.len() > 1, "every connection got the same id");
        assert!(ids.iter().all(|id| *id >= 0x4000_0000));
    }
}

//! Conversions between protobuf messages and domain types. Incoming values
//! are validated here, once; outgoing values cannot fail.

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Timelike};
use prost::encoding::{self, WireType};
use weir_proto::v1 as pb;
use weir_proto::v1::value::Kind;

use super::bad;
use crate::backend::{self as domain, ColumnType, Isolation, LoadMode, Value, EXACT_IN_DOUBLE};
use crate::error::Error;

const NANOS_PER_SECOND: u32 = 1_000_000_000;

/// Deepest list nesting accepted in a parameter (PostgreSQL allows 6 dimensions).
const MAX_LIST_DEPTH: usize = 6;

/// A caller's value as quoted in an error: short enough for a gRPC trailer.
fn quote(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("'{}…'", &s[..end]),
        None => format!("'{s}'"),
    }
}

pub const MAX_PARAMS: usize = 65_535;

pub fn params(values: Vec<pb::Value>) -> Result<Vec<Value>, Error> {
    // The most any engine binds (PostgreSQL's and MySQL's wire limit); a
    // request of millions of empty values is refused before it is converted.
    if values.len() > MAX_PARAMS {
        return Err(bad(
            "params",
            format!("{} parameters; a statement takes at most {MAX_PARAMS}", values.len()),
        ));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| value_from_proto(v, 0).map_err(|m| bad("params", format!("parameter {}: {m}", i + 1))))
        .collect()
}

#[inline]
fn value_from_proto(v: pb::Value, depth: usize) -> Result<Value, String> {
    Ok(match v.kind {
        None | Some(Kind::Null(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::Int64Value(i)) => Value::Int(i),
        Some(Kind::Uint64Value(u)) => Value::UInt(u),
        Some(Kind::DoubleValue(f)) => Value::Float(f),
        Some(Kind::StringValue(s)) => Value::Text(s),
        Some(Kind::BytesValue(b)) => Value::Bytes(b),
        Some(Kind::DecimalValue(s)) => {
            if !is_decimal(&s) {
                return Err(format!("{} is not a decimal number", quote(&s)));
            }
            Value::Decimal(s)
        }
        Some(Kind::DateValue(d)) => Value::Date(
            u32::try_from(d.month)
                .ok()
                .zip(u32::try_from(d.day).ok())
                .and_then(|(m, day)| NaiveDate::from_ymd_opt(d.year, m, day))
                .ok_or_else(|| format!("{}-{}-{} is not a valid date", d.year, d.month, d.day))?,
        ),
        Some(Kind::TimeValue(t)) => {
            // chrono would take nanos past a second at :59 as a leap second.
            let time = [t.hours, t.minutes, t.seconds, t.nanos]
                .map(u32::try_from)
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .ok()
                .filter(|p| p[3] < NANOS_PER_SECOND)
                .and_then(|p| NaiveTime::from_hms_nano_opt(p[0], p[1], p[2], p[3]))
                .ok_or("not a valid time of day")?;
            Value::Time(time, t.utc_offset_seconds)
        }
        Some(Kind::TimestampValue(ts)) => {
            let nanos = u32::try_from(ts.nanos)
                .ok()
                .filter(|n| *n < NANOS_PER_SECOND)
                .ok_or("timestamp nanos must be 0..999999999")?;
            Value::TimestampTz(DateTime::from_timestamp(ts.seconds, nanos).ok_or("timestamp out of range")?)
        }
        Some(Kind::IntervalValue(i)) => Value::Interval {
            months: i.months,
            days: i.days,
            microseconds: i.microseconds,
        },
        Some(Kind::UuidValue(s)) => {
            Value::Uuid(uuid::Uuid::parse_str(&s).map_err(|_| format!("{} is not a UUID", quote(&s)))?)
        }
        Some(Kind::JsonValue(s)) => {
            serde_json::from_str::<serde::de::IgnoredAny>(&s).map_err(|e| format!("invalid JSON: {e}"))?;
            Value::Json(s)
        }
        Some(Kind::ListValue(l)) => {
            if depth >= MAX_LIST_DEPTH {
                return Err(format!("lists nest at most {MAX_LIST_DEPTH} deep"));
            }
            Value::List(
                l.values
                    .into_iter()
                    .map(|v| value_from_proto(v, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// The largest integer a double holds exactly, and every one below it.
fn inexact(v: impl std::fmt::Display) -> String {
    format!("{v} cannot be stored exactly in a float column; send it as a double if rounding is meant")
}

/// Digits of a decimal's text from its first non-zero digit to its last one.
fn significant_digits(decimal: &str) -> usize {
    significant_span(decimal).map_or(0, |(high, low)| usize::try_from(high - low + 1).unwrap_or(usize::MAX))
}

/// What a float column holds exactly: every whole number up to `whole`,
/// and decimals of up to `digits` significant digits in its normal range.
struct FloatExactness {
    whole: u64,
    digits: usize,
    min_positive: f64,
    max: f64,
}

/// `column`'s, by the bits of its mantissa (`precision`: 24 for a
/// single-precision column, as PostgreSQL's and SQL Server's `real` and
/// MySQL's `FLOAT`; a double otherwise).
fn float_exactness(column: &domain::Column) -> FloatExactness {
    match column.precision {
        Some(bits) if bits <= 24 => FloatExactness {
            whole: domain::EXACT_IN_FLOAT,
            digits: 6,
            min_positive: f64::from(f32::MIN_POSITIVE),
            max: f64::from(f32::MAX),
        },
        _ => FloatExactness {
            whole: EXACT_IN_DOUBLE,
            digits: 15,
            min_positive: f64::MIN_POSITIVE,
            max: f64::MAX,
        },
    }
}

impl FloatExactness {
    /// Whether the column holds `decimal` exactly enough to read back the
    /// same: few enough significant digits, and within the normal range
    /// (1e-400 would become 0, 1e400 infinity, and NaN is no number to check).
    fn holds(&self, decimal: &str) -> bool {
        let Ok(f) = decimal.parse::<f64>() else {
            return false;
        };
        let zero = significant_digits(decimal) == 0;
        significant_digits(decimal) <= self.digits
            && f.is_finite()
            && f.abs() <= self.max
            && (zero || f.abs() >= self.min_positive)
    }
}

/// A value of a bulk-load row, checked against the column it goes into.
/// Only lossless conversions happen here (an integer into a float or
/// decimal column, a timestamp into a zoneless one as UTC wall-clock time);
/// anything else is refused with a message naming what was expected.
pub fn value_for_column(v: pb::Value, column: &domain::Column) -> Result<Value, String> {
    match value_from_proto(v, 0)? {
        Value::Null if !column.nullable => Err("NULL into a NOT NULL column".into()),
        Value::Null => Ok(Value::Null),
        value => fit(value, column.column_type, column),
    }
}

/// `value` (not NULL) checked against a column's type `ty`: the column's
/// own, or its elements' for a list's elements.
fn fit(value: Value, ty: ColumnType, column: &domain::Column) -> Result<Value, String> {
    use ColumnType as T;
    // Each element as a value of the element type, so that an array is
    // refused what the scalar column would refuse (a rounded float, bytes
    // stored as their `\x` text).
    let value = match (value, ty, column.element_type) {
        (Value::List(items), T::List, Some(element)) => return elements(items, element, column).map(Value::List),
        (value, ..) => value,
    };
    let fits = match (&value, ty) {
        (_, T::Dynamic | T::Unsupported) => true,
        (Value::TimestampTz(t), T::Timestamp) => return Ok(Value::Timestamp(t.naive_utc())),
        (Value::Int(i), T::UInt) if *i < 0 => return Err(format!("{i} into an unsigned column")),
        // BOOLEAN is an integer type in MySQL and SQLite.
        (Value::Bool(b), T::Int | T::UInt) => return Ok(Value::Int(i64::from(*b))),
        (Value::Text(s), T::Json) => {
            serde_json::from_str::<serde::de::IgnoredAny>(s).map_err(|e| format!("invalid JSON: {e}"))?;
            true
        }
        // Checked here, so that a load that skips bad rows skips this one.
        (Value::Text(s), T::Uuid) => {
            return uuid::Uuid::parse_str(s)
                .map(Value::Uuid)
                .map_err(|e| format!("{} is not a UUID: {e}", quote(s)))
        }
        // A double holds integers up to 2^53 and decimals of up to 15
        // significant digits exactly, a single-precision float up to 2^24
        // and 6; past that the engine would round.
        (Value::Int(i), T::Float) if i.unsigned_abs() > float_exactness(column).whole => return Err(inexact(i)),
        (Value::UInt(u), T::Float) if *u > float_exactness(column).whole => return Err(inexact(u)),
        (Value::Decimal(d), T::Float) if !float_exactness(column).holds(d) => return Err(inexact(quote(d))),
        // A decimal column with a declared precision and scale rounds digits
        // past its scale and refuses (failing the whole load) a number
        // past its precision: both are the row's error here.
        (Value::Int(_) | Value::UInt(_) | Value::Float(_) | Value::Decimal(_), T::Decimal)
            if !decimal_holds(&value, column) =>
        {
            return Err(format!(
                "{} does not fit {} exactly (it would be rounded or refused)",
                quote(&number_text(&value).unwrap_or_default()),
                column.native_type
            ))
        }
        (Value::Bool(_), T::Bool)
        | (Value::Int(_) | Value::UInt(_), T::Int | T::UInt)
        | (Value::Int(_) | Value::UInt(_) | Value::Float(_) | Value::Decimal(_), T::Float | T::Decimal)
        | (Value::Text(_) | Value::Uuid(_) | Value::Decimal(_) | Value::Json(_), T::String)
        // PostgreSQL's interval text (`1 day 02:00:00`, ISO 8601): only it has
        // the type, and its COPY parses the text as the column's own input.
        | (Value::Text(_), T::Interval)
        | (Value::Bytes(_), T::Bytes)
        | (Value::Date(_), T::Date)
        | (Value::Time(..), T::Time)
        | (Value::TimestampTz(_), T::TimestampTz)
        | (Value::Interval { .. }, T::Interval)
        // MySQL's TIME is also a duration (as it is read back); the other
        // engines' backends refuse it (`refuses`).
        | (Value::Interval { .. }, T::Time)
        | (Value::Uuid(_), T::Uuid)
        | (Value::Json(_), T::Json)
        | (Value::List(_), T::List) => true,
        _ => false,
    };
    if fits {
        Ok(value)
    } else if ty == column.column_type {
        Err(format!(
            "a {} value cannot go into a column of type {} ({ty:?})",
            value.kind(),
            column.native_type,
        ))
    } else {
        Err(format!(
            "a {} element cannot go into an array of type {} ({ty:?} elements)",
            value.kind(),
            column.native_type,
        ))
    }
}

/// A number's decimal text (Rust writes a float's shortest round-trip
/// digits, never with an exponent); None for other values.
fn number_text(value: &Value) -> Option<String> {
    match value {
        Value::Int(i) => Some(i.to_string()),
        Value::UInt(u) => Some(u.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Decimal(d) => Some(d.clone()),
        _ => None,
    }
}

/// Whether a decimal column of `column`'s precision and scale (when it
/// declares them) holds `value` without rounding: every significant digit
/// at or above 10^-scale, and none at or above 10^(precision - scale).
/// NaN and the infinities are left to the engine (PostgreSQL's numeric
/// holds them; the others refuse them with their own message).
fn decimal_holds(value: &Value, column: &domain::Column) -> bool {
    let (Some(precision), Some(scale)) = (column.precision, column.scale) else {
        return true;
    };
    let special = match value {
        Value::Float(f) => !f.is_finite(),
        Value::Decimal(d) => crate::backend::types::special_decimal(d).is_some(),
        _ => false,
    };
    let Some(text) = number_text(value).filter(|_| !special) else {
        return true;
    };
    match significant_span(&text) {
        None => true,
        Some((high, low)) => low >= -i64::from(scale) && high < i64::from(precision) - i64::from(scale),
    }
}

/// The powers of ten of the highest and lowest non-zero digits of a decimal
/// number (`-12.50e2`, -1250: 3 and 1), or None for zero (and for text that
/// is not a number, which [`is_decimal`] refused before).
fn significant_span(decimal: &str) -> Option<(i64, i64)> {
    let body = decimal.strip_prefix(['-', '+']).unwrap_or(decimal);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        // An exponent past i64 is as far out of any column as i64's end.
        Some((m, e)) => (
            m,
            e.parse::<i64>()
                .unwrap_or(if e.starts_with('-') { i64::MIN / 2 } else { i64::MAX / 2 }),
        ),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let first = digits.iter().position(|d| *d != b'0')?;
    let last = digits.iter().rposition(|d| *d != b'0')?;
    // The digit at index i stands for 10^(len(int) - 1 - i + exponent).
    let power = |i: usize| (int.len() as i64 - 1 - i as i64).saturating_add(exponent);
    Some((power(first), power(last)))
}

/// A list's elements checked as values of `element`; NULL elements stay, and
/// a multidimensional array's inner lists hold the same elements.
fn elements(items: Vec<Value>, element: ColumnType, column: &domain::Column) -> Result<Vec<Value>, String> {
    items
        .into_iter()
        .map(|item| match item {
            Value::Null => Ok(Value::Null),
            Value::List(inner) => elements(inner, element, column).map(Value::List),
            item => fit(item, element, column),
        })
        .collect()
}

pub fn load_mode(mode: i32) -> Result<LoadMode, Error> {
    use pb::BulkLoadMode as M;
    match M::try_from(mode).map_err(|_| bad("header.mode", format!("unknown load mode {mode}")))? {
        M::Unspecified | M::Append => Ok(LoadMode::Append),
        M::Upsert => Ok(LoadMode::Upsert),
        M::Replace => Ok(LoadMode::Replace),
    }
}

pub fn load_mode_to_proto(mode: LoadMode) -> pb::BulkLoadMode {
    match mode {
        LoadMode::Append => pb::BulkLoadMode::Append,
        LoadMode::Upsert => pb::BulkLoadMode::Upsert,
        LoadMode::Replace => pb::BulkLoadMode::Replace,
    }
}

fn is_decimal(s: &str) -> bool {
    if crate::backend::types::special_decimal(s).is_some() {
        return true;
    }
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    !(int.is_empty() && frac.is_empty()) && digits(int) && digits(frac) && exponent_ok
}

pub fn value(v: Value) -> pb::Value {
    let kind = match v {
        Value::Null => Kind::Null(true),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Int(i) => Kind::Int64Value(i),
        Value::UInt(u) => Kind::Uint64Value(u),
        Value::Float(f) => Kind::DoubleValue(f),
        Value::Text(s) => Kind::StringValue(s),
        Value::Bytes(b) => Kind::BytesValue(b),
        Value::Decimal(s) => Kind::DecimalValue(s),
        Value::Date(d) => Kind::DateValue(pb::Date {
            year: d.year(),
            month: d.month() as i32,
            day: d.day() as i32,
        }),
        Value::Time(t, offset) => Kind::TimeValue(time_of_day(t, offset)),
        Value::Timestamp(t) => Kind::TimestampValue(timestamp(t.and_utc())),
        Value::TimestampTz(t) => Kind::TimestampValue(timestamp(t)),
        Value::Interval {
            months,
            days,
            microseconds,
        } => Kind::IntervalValue(pb::Interval {
            months,
            days,
            microseconds,
        }),
        Value::Uuid(u) => Kind::UuidValue(u.to_string()),
        Value::Json(s) => Kind::JsonValue(s),
        Value::List(items) => Kind::ListValue(pb::ListValue {
            values: items.into_iter().map(value).collect(),
        }),
    };
    pb::Value { kind: Some(kind) }
}

fn time_of_day(t: NaiveTime, offset: Option<i32>) -> pb::TimeOfDay {
    let nanos = t.nanosecond();
    // chrono writes PostgreSQL's 24:00:00 as a leap second of 23:59:59.
    if nanos >= 1_000_000_000 && t.hour() == 23 && t.minute() == 59 && t.second() == 59 {
        return pb::TimeOfDay {
            hours: 24,
            minutes: 0,
            seconds: 0,
            nanos: (nanos - 1_000_000_000) as i32,
            utc_offset_seconds: offset,
        };
    }
    pb::TimeOfDay {
        hours: t.hour() as i32,
        minutes: t.minute() as i32,
        seconds: t.second() as i32,
        nanos: nanos.min(999_999_999) as i32,
        utc_offset_seconds: offset,
    }
}

pub fn timestamp(t: DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos().min(999_999_999) as i32,
    }
}

/// The most room a row encoder keeps for its next row or batch: a batch
/// is cut at about 1 MiB; only very large rows make one larger, and a
/// stream of them keeps room for the next.
const KEPT_ROOM: usize = 16 * 1024 * 1024;

/// Encodes result rows as `rows` fields (of a `RowBatch` or an
/// `ExecuteResponse`) while the engine hands their values over: no `pb::Row`
/// is built, and borrowed text is copied once, into the batch.
pub struct RowEncoder {
    /// The field number the rows are written as (one-byte keys: below 16).
    field: u8,
    /// The `Row.values` fields of the row in progress.
    row: BytesMut,
    /// The `rows` fields of the finished rows, and their count.
    batch: BytesMut,
    rows: usize,
    /// The most bytes one row may take. Past it, a row's values are no
    /// longer copied (a huge value would otherwise be held twice more
    /// before its row is refused), and `finish_row` refuses the row.
    row_limit: usize,
    over: bool,
}

impl domain::RowSink for RowEncoder {
    fn value(&mut self, v: Value) {
        // The commonest kinds after integers and text are written as prost
        // writes them (a oneof field is written even when it is zero).
        let head = Head::key(1, WireType::LengthDelimited);
        match v {
            Value::Null => head.byte(2).and_key(1, WireType::Varint).byte(1),
            Value::Bool(b) => head.byte(2).and_key(2, WireType::Varint).byte(u8::from(b)),
            Value::Float(f) => head.byte(9).and_key(5, WireType::SixtyFourBit).fixed64(f.to_bits()),
            other => {
                let v = value(other);
                if self.fits(encoding::message::encoded_len(1, &v)) {
                    encoding::message::encode(1, &v, &mut self.row);
                }
                return;
            }
        }
        .put(&mut self.row);
    }

    fn text(&mut self, text: &str) {
        // Value { kind: string_value (field 6) }, as prost writes a oneof string.
        let kind_len = encoding::key_len(6) + encoding::encoded_len_varint(text.len() as u64) + text.len();
        if !self.fits(encoding::key_len(1) + encoding::encoded_len_varint(kind_len as u64) + kind_len) {
            return;
        }
        Head::key(1, WireType::LengthDelimited)
            .varint(kind_len as u64)
            .put(&mut self.row);
        Head::key(6, WireType::LengthDelimited)
            .varint(text.len() as u64)
            .put(&mut self.row);
        self.row.put_slice(text.as_bytes());
    }

    fn int(&mut self, v: i64) {
        // Value { kind: int64_value (field 3) }.
        let kind_len = encoding::key_len(3) + encoding::encoded_len_varint(v as u64);
        // At most 2 + 1 + 10 bytes.
        Head::key(1, WireType::LengthDelimited)
            .varint(kind_len as u64)
            .and_key(3, WireType::Varint)
            .varint(v as u64)
            .put(&mut self.row);
    }
}

impl RowEncoder {
    /// Rows of a `RowBatch` (`rows = 1`), each of at most `row_limit` bytes.
    pub fn batch(row_limit: usize) -> Self {
        Self::of_field(1, row_limit)
    }

    /// Rows of an `ExecuteResponse` (`rows = 2`), each of at most `row_limit` bytes.
    pub fn response(row_limit: usize) -> Self {
        Self::of_field(weir_proto::execute_response::ROWS_FIELD as u8, row_limit)
    }

    fn of_field(field: u8, row_limit: usize) -> Self {
        // Room for a small result from the start: growing from nothing
        // would reallocate a few times for every one-row lookup.
        Self {
            field,
            row: BytesMut::with_capacity(128),
            batch: BytesMut::with_capacity(256),
            rows: 0,
            row_limit,
            over: false,
        }
    }

    /// Whether a value of `more` encoded bytes keeps the row in progress
    /// within its limit; once one would not, nothing more of it is kept.
    fn fits(&mut self, more: usize) -> bool {
        self.over |= self.row.len().saturating_add(more) > self.row_limit;
        if self.over {
            self.row.clear();
        }
        !self.over
    }

    /// Appends the row in progress to the batch as one `rows` field; false,
    /// with nothing appended, when the row went past its limit.
    #[must_use]
    pub fn finish_row(&mut self) -> bool {
        let within = !std::mem::take(&mut self.over) && self.row.len() <= self.row_limit;
        if within {
            Head::key(self.field, WireType::LengthDelimited)
                .varint(self.row.len() as u64)
                .put(&mut self.batch);
            self.batch.put_slice(&self.row);
            self.rows += 1;
        }
        self.row.clear();
        // One very large row is not a reason to keep its room for the rest.
        if self.row.capacity() > KEPT_ROOM {
            self.row = BytesMut::new();
        }
        within
    }

    /// Finished rows, and their encoded size.
    pub fn pending(&self) -> (usize, usize) {
        (self.rows, self.batch.len())
    }

    /// All the finished rows, encoded, when no batch follows.
    pub fn into_rows(self) -> Bytes {
        self.batch.freeze()
    }

    /// The finished rows, encoded; the next batch gets room for as many.
    pub fn take_batch(&mut self) -> Bytes {
        let full = self.batch.split().freeze();
        self.batch.reserve((full.len() + full.len() / 8).min(KEPT_ROOM));
        self.rows = 0;
        full
    }
}

/// A key and the varints after it, assembled in a register and appended
/// with one fixed-size copy. prost's `encode_varint` into a `BytesMut` makes
/// a capacity-checked write per byte (a tenth of the gateway's work
/// streaming SQLite rows), and bytes stored one by one and then copied as a
/// block stall the load that copies them.
struct Head {
    /// The bytes, first in the lowest: at most 16, so at most one key and
    /// varint of any size, or two keys and two varints below 2^56.
    bytes: u128,
    len: u32,
}

impl Head {
    /// Starts with the key of `field`, which must be below 16 to fit in one byte.
    fn key(field: u8, wire: WireType) -> Self {
        Head { bytes: 0, len: 0 }.and_key(field, wire)
    }

    fn and_key(self, field: u8, wire: WireType) -> Self {
        debug_assert!(field < 16);
        self.byte(field << 3 | wire as u8)
    }

    fn byte(mut self, b: u8) -> Self {
        debug_assert!(self.len < 16);
        self.bytes |= u128::from(b) << (8 * self.len);
        self.len += 1;
        self
    }

    fn varint(mut self, mut v: u64) -> Self {
        while v >= 0x80 {
            self = self.byte(v as u8 | 0x80);
            v >>= 7;
        }
        self.byte(v as u8)
    }

    fn fixed64(mut self, v: u64) -> Self {
        debug_assert!(self.len <= 8);
        self.bytes |= u128::from(v) << (8 * self.len);
        self.len += 8;
        self
    }

    fn put(self, out: &mut BytesMut) {
        let end = out.len() + self.len as usize;
        out.put_u128_le(self.bytes);
        out.truncate(end);
    }
}

pub fn row(values: domain::Row) -> pb::Row {
    pb::Row {
        values: values.into_iter().map(value).collect(),
    }
}

fn column_type(t: ColumnType) -> pb::ColumnType {
    use pb::ColumnType as P;
    match t {
        ColumnType::Bool => P::Bool,
        ColumnType::Int => P::Int,
        ColumnType::UInt => P::Uint,
        ColumnType::Float => P::Float,
        ColumnType::Decimal => P::Decimal,
        ColumnType::String => P::String,
        ColumnType::Bytes => P::Bytes,
        ColumnType::Date => P::Date,
        ColumnType::Time => P::Time,
        ColumnType::Timestamp => P::Timestamp,
        ColumnType::TimestampTz => P::TimestampTz,
        ColumnType::Interval => P::Interval,
        ColumnType::Uuid => P::Uuid,
        ColumnType::Json => P::Json,
        ColumnType::List => P::List,
        ColumnType::Dynamic => P::Dynamic,
        ColumnType::Unsupported => P::Unspecified,
    }
}

pub fn column(c: domain::Column) -> pb::Column {
    pb::Column {
        name: c.name,
        native_type: c.native_type,
        r#type: column_type(c.column_type) as i32,
        element_type: c.element_type.map(column_type).unwrap_or(pb::ColumnType::Unspecified) as i32,
        nullable: c.nullable,
        precision: c.precision,
        scale: c.scale,
        max_length: c.max_length,
    }
}

pub fn isolation(level: i32) -> Result<Isolation, Error> {
    use pb::IsolationLevel as L;
    Ok(
        match L::try_from(level).map_err(|_| bad("isolation", format!("unknown isolation level {level}")))? {
            L::Unspecified => Isolation::EngineDefault,
            L::ReadUncommitted => Isolation::ReadUncommitted,
            L::ReadCommitted => Isolation::ReadCommitted,
            L::RepeatableRead => Isolation::RepeatableRead,
            L::Serializable => Isolation::Serializable,
        },
    )
}

pub fn isolation_to_proto(level: Isolation) -> pb::IsolationLevel {
    use pb::IsolationLevel as L;
    match level {
        Isolation::EngineDefault => L::Unspecified,
        Isolation::ReadUncommitted => L::ReadUncommitted,
        Isolation::ReadCommitted => L::ReadCommitted,
        Isolation::RepeatableRead => L::RepeatableRead,
        Isolation::Serializable => L::Serializable,
    }
}

pub fn engine(e: domain::Engine) -> pb::Engine {
    match e {
        domain::Engine::Postgres => pb::Engine::Postgres,
        domain::Engine::Mysql => pb::Engine::Mysql,
        domain::Engine::Sqlite => pb::Engine::Sqlite,
        domain::Engine::Kafka => pb::Engine::Kafka,
        domain::Engine::Mssql => pb::Engine::Mssql,
    }
}

pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

pub fn table(t: domain::TableInfo) -> pb::TableInfo {
    let kind = match t.kind {
        domain::TableKind::Table => pb::TableKind::Table,
        domain::TableKind::View => pb::TableKind::View,
        domain::TableKind::MaterializedView => pb::TableKind::MaterializedView,
        domain::TableKind::ForeignTable => pb::TableKind::ForeignTable,
        domain::TableKind::PartitionedTable => pb::TableKind::PartitionedTable,
    };
    pb::TableInfo {
        schema: t.schema,
        name: t.name,
        kind: kind as i32,
        row_estimate: t.row_estimate,
        comment: t.comment,
    }
}

pub fn description(d: domain::TableDescription) -> pb::DescribeTableResponse {
    pb::DescribeTableResponse {
        table: Some(table(d.table)),
        columns: d
            .columns
            .into_iter()
            .map(|c| pb::ColumnInfo {
                column: Some(column(c.column)),
                ordinal: c.ordinal,
                default_expression: c.default_expression,
                comment: c.comment,
                generation: match c.generation {
                    domain::ColumnGeneration::None => pb::ColumnGeneration::Unspecified,
                    domain::ColumnGeneration::IdentityAlways => pb::ColumnGeneration::IdentityAlways,
                    domain::ColumnGeneration::IdentityByDefault => pb::ColumnGeneration::IdentityByDefault,
                    domain::ColumnGeneration::Computed => pb::ColumnGeneration::Computed,
                } as i32,
                generation_expression: c.generation_expression,
            })
            .collect(),
        primary_key: d.primary_key.map(|pk| pb::PrimaryKey {
            name: pk.name,
            columns: pk.columns,
        }),
        foreign_keys: d
            .foreign_keys
            .into_iter()
            .map(|f| pb::ForeignKey {
                name: f.name,
                columns: f.columns,
                referenced_schema: f.referenced_schema,
                referenced_table: f.referenced_table,
                referenced_columns: f.referenced_columns,
                on_update: f.on_update,
                on_delete: f.on_delete,
            })
            .collect(),
        indexes: d
            .indexes
            .into_iter()
            .map(|i| pb::Index {
                name: i.name,
                columns: i.columns,
                unique: i.unique,
                primary: i.primary,
                method: i.method,
                partial: i.partial,
            })
            .collect(),
        change_streams: Some(pb::ChangeStreamReadiness {
            ready: d.change_stream_ready,
            reason: d.change_stream_reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RowSink;

    #[test]
    fn decimal_columns_take_only_what_they_hold_without_rounding() {
        let decimal = |precision, scale| {
            let mut column = domain::Column::new("d", "numeric(6,2)", ColumnType::Decimal);
            (column.precision, column.scale) = (Some(precision), Some(scale));
            column
        };
        let column = decimal(6, 2);
        let holds = |v: Value| decimal_holds(&v, &column);
        for ok in ["1.5", "1234.50", "-9999.99", "0", "0.000", "1.2e1", "12300e-4", "NaN"] {
            assert!(holds(Value::Decimal(ok.into())), "{ok}");
        }
        for rounded in [
            "1.005",
            "0.001",
            "10000",
            "99999.9",
            "1e4",
            "-1.234",
            "1e99999999999999999999",
            "1e-99999999999999999999",
        ] {
            assert!(!holds(Value::Decimal(rounded.into())), "{rounded}");
        }
        assert!(holds(Value::Float(0.25)) && holds(Value::Int(-9999)));
        assert!(!holds(Value::Float(1.2345)) && !holds(Value::Int(10_000)) && !holds(Value::UInt(u64::MAX)));
        // PostgreSQL's negative scale (hundreds) and scale past precision.
        let hundreds = decimal(3, -2);
        let holds = |v: Value| decimal_holds(&v, &hundreds);
        assert!(holds(Value::Int(12_300)) && !holds(Value::Int(12_340)) && !holds(Value::Int(123_400)));
        let small = decimal(2, 5);
        let holds = |v: Value| decimal_holds(&v, &small);
        assert!(holds(Value::Decimal("0.00012".into())) && !holds(Value::Decimal("0.0012".into())));
        // Without a declared precision, any number.
        assert!(decimal_holds(
            &Value::Decimal("1.000001".into()),
            &domain::Column::new("d", "numeric", ColumnType::Decimal)
        ));
        let err = fit(Value::Decimal("1.005".into()), ColumnType::Decimal, &column).expect_err("rounded");
        assert!(err.contains("'1.005' does not fit numeric(6,2) exactly"), "{err}");
    }

    #[test]
    fn text_goes_into_uuid_columns_only_as_a_uuid() {
        let column = domain::Column::new("id", "uuid", ColumnType::Uuid);
        let text = |s: &str| pb::Value {
            kind: Some(pb::value::Kind::StringValue(s.into())),
        };
        let id = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(
            value_for_column(text(id), &column).ok(),
            uuid::Uuid::parse_str(id).ok().map(Value::Uuid)
        );
        let err = value_for_column(text("not-a-uuid"), &column).expect_err("no UUID");
        assert!(err.contains("'not-a-uuid' is not a UUID"), "{err}");
    }

    #[test]
    fn numbers_go_into_float_columns_only_when_exact() {
        let float = domain::Column::new("x", "double precision", ColumnType::Float);
        let int = |i: i64| pb::Value {
            kind: Some(pb::value::Kind::Int64Value(i)),
        };
        let decimal = |d: &str| pb::Value {
            kind: Some(pb::value::Kind::DecimalValue(d.into())),
        };
        assert!(value_for_column(int(1 << 53), &float).is_ok());
        assert!(value_for_column(int(-(1 << 53)), &float).is_ok());
        let err = value_for_column(int((1 << 53) + 1), &float).expect_err("rounds");
        assert!(err.contains("9007199254740993 cannot be stored exactly"), "{err}");
        assert!(value_for_column(int(i64::MIN), &float).is_err());
        assert!(value_for_column(decimal("123456789012345"), &float).is_ok());
        assert!(value_for_column(decimal("-0.000123456789012345000"), &float).is_ok());
        assert!(value_for_column(decimal("1234567890.123456"), &float).is_err());
        assert!(value_for_column(decimal("1.5e300"), &float).is_ok());
        assert!(value_for_column(decimal("0.000"), &float).is_ok());
        for out_of_range in ["1e-400", "1e400", "NaN", "-Infinity"] {
            assert!(
                value_for_column(decimal(out_of_range), &float).is_err(),
                "{out_of_range}"
            );
        }
        // A single-precision column (precision 24: its mantissa's bits).
        let mut real = domain::Column::new("x", "real", ColumnType::Float);
        real.precision = Some(24);
        assert!(value_for_column(int(1 << 24), &real).is_ok());
        assert!(value_for_column(int((1 << 24) + 1), &real).is_err());
        assert!(value_for_column(decimal("123456"), &real).is_ok());
        assert!(value_for_column(decimal("1.23456789"), &real).is_err());
        assert!(value_for_column(decimal("1e39"), &real).is_err());
        assert!(value_for_column(decimal("1e-39"), &real).is_err());
        // Decimal columns take them all, exactly.
        let numeric = domain::Column::new("x", "numeric", ColumnType::Decimal);
        assert!(value_for_column(int(i64::MAX), &numeric).is_ok());
        assert!(value_for_column(decimal("1234567890.123456"), &numeric).is_ok());
    }

    #[test]
    fn list_elements_are_checked_as_the_element_type() {
        let list = |values: Vec<pb::value::Kind>| pb::Value {
            kind: Some(pb::value::Kind::ListValue(pb::ListValue {
                values: values.into_iter().map(|k| pb::Value { kind: Some(k) }).collect(),
            })),
        };
        use pb::value::Kind as K;
        let mut reals = domain::Column::new("f", "_float4", ColumnType::List);
        reals.element_type = Some(ColumnType::Float);
        reals.precision = Some(24);
        assert!(value_for_column(list(vec![K::Int64Value(1 << 24), K::Null(true)]), &reals).is_ok());
        let err = value_for_column(list(vec![K::Int64Value((1 << 24) + 1)]), &reals).expect_err("rounds");
        assert!(err.contains("cannot be stored exactly"), "{err}");
        let nested = |inner: i64| {
            K::ListValue(pb::ListValue {
                values: vec![pb::Value {
                    kind: Some(K::Int64Value(inner)),
                }],
            })
        };
        assert!(value_for_column(list(vec![nested(1), nested(2)]), &reals).is_ok());
        assert!(value_for_column(list(vec![nested(1), nested((1 << 24) + 1)]), &reals).is_err());
        let mut texts = domain::Column::new("t", "_text", ColumnType::List);
        texts.element_type = Some(ColumnType::String);
        let err = value_for_column(list(vec![K::BytesValue(vec![1])]), &texts).expect_err("bytes");
        assert!(err.contains("element cannot go into an array of type _text"), "{err}");
        assert!(value_for_column(list(vec![K::BoolValue(true)]), &texts).is_err());
        // Without a known element type (no engine says it), as before.
        let untyped = domain::Column::new("x", "array", ColumnType::List);
        assert!(value_for_column(list(vec![K::BoolValue(true)]), &untyped).is_ok());
    }

    #[test]
    fn a_row_past_its_limit_is_refused_without_its_values_kept() {
        let mut encoder = RowEncoder::batch(64);
        encoder.text(&"x".repeat(50));
        assert!(encoder.finish_row(), "within the limit");
        let (_, kept) = encoder.pending();
        encoder.int(1);
        encoder.text(&"y".repeat(1000));
        assert!(encoder.row.is_empty(), "the value and the row before it are let go");
        encoder.value(Value::Bytes(vec![0; 10]));
        encoder.text("z");
        assert!(encoder.row.is_empty(), "nothing more of the row is kept");
        assert!(!encoder.finish_row());
        assert_eq!(encoder.pending(), (1, kept), "the row refused is not in the batch");
        encoder.text("next");
        assert!(encoder.finish_row(), "the next row starts afresh");
        assert_eq!(encoder.pending().0, 2);
        // Exactly at the limit: a text value of n bytes takes n + 4 here.
        let mut exact = RowEncoder::batch(64);
        exact.text(&"x".repeat(60));
        assert!(exact.finish_row());
        exact.text(&"x".repeat(61));
        assert!(!exact.finish_row());
    }

    #[test]
    fn encoded_rows_are_the_rows_prost_would_write() {
        use prost::Message;
        let mut encoder = RowEncoder::batch(usize::MAX);
        // One row with lent text, one with owned values only, one with empty text.
        encoder.value(Value::Int(7));
        encoder.text("héllo");
        encoder.value(Value::Null);
        encoder.value(Value::Text("owned".into()));
        assert!(encoder.finish_row());
        encoder.value(Value::Float(1.5));
        for i in [0, 1, -1, i64::MAX, i64::MIN] {
            encoder.int(i);
        }
        for v in [
            Value::Float(0.0),
            Value::Float(-f64::MAX),
            Value::Bool(false),
            Value::Bool(true),
        ] {
            encoder.value(v);
        }
        assert!(encoder.finish_row());
        encoder.text("");
        assert!(encoder.finish_row());
        // Lengths of two and three varint bytes, in the value and the row.
        let (long, longer) = ("x".repeat(200), "y".repeat(20_000));
        encoder.text(&long);
        encoder.text(&longer);
        encoder.int(300);
        assert!(encoder.finish_row());
        let want = pb::RowBatch {
            rows: vec![
                row(vec![
                    Value::Int(7),
                    Value::Text("héllo".into()),
                    Value::Null,
                    Value::Text("owned".into()),
                ]),
                row(vec![
                    Value::Float(1.5),
                    Value::Int(0),
                    Value::Int(1),
                    Value::Int(-1),
                    Value::Int(i64::MAX),
                    Value::Int(i64::MIN),
                    Value::Float(0.0),
                    Value::Float(-f64::MAX),
                    Value::Bool(false),
                    Value::Bool(true),
                ]),
                row(vec![Value::Text(String::new())]),
                row(vec![
                    Value::Text(long.clone()),
                    Value::Text(longer.clone()),
                    Value::Int(300),
                ]),
            ],
            ..Default::default()
        };
        assert_eq!(encoder.pending().0, 4);
        let batch = encoder.take_batch();
        assert_eq!(batch.to_vec(), want.encode_to_vec());
        assert_eq!(encoder.pending(), (0, 0));
        let decoded = pb::RowBatch::decode(batch).expect("decodes");
        assert_eq!(decoded.rows, want.rows);
    }

    fn arbitrary_value() -> impl proptest::strategy::Strategy<Value = pb::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<bool>().prop_map(Kind::BoolValue),
            any::<i64>().prop_map(Kind::Int64Value),
            any::<u64>().prop_map(Kind::Uint64Value),
            any::<f64>().prop_map(Kind::DoubleValue),
            ".*".prop_map(Kind::StringValue),
            proptest::collection::vec(any::<u8>(), 0..32).prop_map(Kind::BytesValue),
            ".*".prop_map(Kind::DecimalValue),
            ".*".prop_map(Kind::UuidValue),
            ".*".prop_map(Kind::JsonValue),
            (any::<i32>(), any::<i32>(), any::<i32>()).prop_map(|(year, month, day)| Kind::DateValue(pb::Date {
                year,
                month,
                day
            })),
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| Kind::TimestampValue(prost_types::Timestamp { seconds, nanos })),
        ]
        .prop_map(|k| pb::Value { kind: Some(k) });
        // Lists nest deeper than any engine allows.
        leaf.prop_recursive(40, 200, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(|values| pb::Value {
                kind: Some(Kind::ListValue(pb::ListValue { values })),
            })
        })
    }

    fn arbitrary_result_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<u64>().prop_map(Value::UInt),
            any::<f64>().prop_map(Value::Float),
            ".{0,300}".prop_map(Value::Text),
        ]
    }

    proptest::proptest! {
        /// Whatever the values, and whether lent or given, rows are encoded byte for byte as prost encodes them.
        #[test]
        fn any_rows_encode_as_prost_would(rows in proptest::collection::vec(
            proptest::collection::vec((arbitrary_result_value(), proptest::prelude::any::<bool>()), 0..6), 0..4)
        ) {
            use prost::Message;
            let mut encoder = RowEncoder::batch(usize::MAX);
            for values in &rows {
                for (value, lend) in values {
                    match (value, lend) {
                        (Value::Int(i), true) => encoder.int(*i),
                        (Value::Text(t), true) => encoder.text(t),
                        (other, _) => encoder.value(other.clone()),
                    }
                }
                proptest::prop_assert!(encoder.finish_row());
            }
            let want = pb::RowBatch {
                rows: rows.into_iter().map(|values| row(values.into_iter().map(|(v, _)| v).collect())).collect(),
                ..Default::default()
            };
            proptest::prop_assert_eq!(encoder.take_batch().to_vec(), want.encode_to_vec());
        }

        /// Any parameter a client can send is converted or refused with INVALID_ARGUMENT; never a panic.
        #[test]
        fn any_parameter_converts_or_is_refused(values in proptest::collection::vec(arbitrary_value(), 0..4)) {
            match params(values) {
                Ok(_) => {}
                Err(Error::InvalidArgument { field, .. }) => proptest::prop_assert_eq!(field, "params"),
                Err(other) => proptest::prop_assert!(false, "unexpected error {other:?}"),
            }
        }
    }

    #[test]
    fn decimals_are_checked() {
        for ok in ["0", "-1.50", "+3", ".5", "1e10", "2.5E-3", "NaN", "-Infinity"] {
            assert!(is_decimal(ok), "{ok}");
        }
        for bad in ["", "1.2.3", "abc", "1e", "--1", "1;drop"] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }

    #[test]
    fn values_round_trip() {
        let values = vec![
            Value::Null,
            Value::Bool(true),
            Value::Int(-7),
            Value::UInt(u64::MAX),
            Value::Float(1.5),
            Value::Text("héllo".into()),
            Value::Bytes(vec![0, 255]),
            Value::Decimal("12.340".into()),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).expect("date")),
            Value::Interval {
                months: 1,
                days: 2,
                microseconds: 3,
            },
            Value::Uuid(uuid::Uuid::nil()),
            Value::Json("{\"a\":1}".into()),
            Value::List(vec![Value::Int(1), Value::Null]),
        ];
        for v in values {
            assert_eq!(value_from_proto(value(v.clone()), 0).expect("valid"), v);
        }
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        let bad_date = pb::Value {
            kind: Some(Kind::DateValue(pb::Date {
                year: 2023,
                month: 2,
                day: 30,
            })),
        };
        let err = params(vec![pb::Value::default(), bad_date]).unwrap_err().to_string();
        assert!(err.contains("parameter 2") && err.contains("not a valid date"), "{err}");
        let mut nested = pb::Value {
            kind: Some(Kind::Int64Value(1)),
        };
        for _ in 0..10 {
            nested = pb::Value {
                kind: Some(Kind::ListValue(pb::ListValue { values: vec![nested] })),
            };
        }
        assert!(params(vec![nested]).is_err());
    }

    /// Nanos are under a second: chrono reads more at second 59 as a leap second.
    #[test]
    fn leap_seconds_are_not_times() {
        let time = |nanos| pb::Value {
            kind: Some(Kind::TimeValue(pb::TimeOfDay {
                hours: 23,
                minutes: 59,
                seconds: 59,
                nanos,
                ..Default::default()
            })),
        };
        let at = |nanos| pb::Value {
            kind: Some(Kind::TimestampValue(prost_types::Timestamp {
                seconds: 1_700_000_039,
                nanos,
            })),
        };
        assert!(params(vec![time(999_999_999), at(999_999_999)]).is_ok());
        assert!(params(vec![time(1_500_000_000)]).is_err());
        assert!(params(vec![at(1_500_000_000)]).is_err());
    }
}

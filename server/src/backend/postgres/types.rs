//! PostgreSQL type mapping: result columns are decoded from the binary wire
//! format into `Value`s; parameters are sent in text format so that the
//! server's own input functions parse them for whatever type it inferred.

use std::error::Error as StdError;
use std::fmt::Write as _;

use bytes::BytesMut;
use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, NaiveDateTime, NaiveTime};
use postgres_protocol::types as wire;
use tokio_postgres::types::{Format, FromSql, IsNull, Kind, ToSql, Type};

use crate::backend::{BackendError, Column, ColumnType, Value};

type BoxError = Box<dyn StdError + Sync + Send>;

/// The normalized type of a PostgreSQL type, or `None` when Weir has no
/// lossless mapping for it.
pub fn column_type(ty: &Type) -> Option<(ColumnType, Option<ColumnType>)> {
    let simple = |t| Some((t, None));
    match *ty {
        Type::BOOL => simple(ColumnType::Bool),
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => simple(ColumnType::Int),
        Type::FLOAT4 | Type::FLOAT8 => simple(ColumnType::Float),
        Type::NUMERIC => simple(ColumnType::Decimal),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::CHAR | Type::UNKNOWN | Type::XML => {
            simple(ColumnType::String)
        }
        Type::INET | Type::CIDR | Type::MACADDR => simple(ColumnType::String),
        Type::BYTEA => simple(ColumnType::Bytes),
        Type::DATE => simple(ColumnType::Date),
        Type::TIME | Type::TIMETZ => simple(ColumnType::Time),
        Type::TIMESTAMP => simple(ColumnType::Timestamp),
        Type::TIMESTAMPTZ => simple(ColumnType::TimestampTz),
        Type::INTERVAL => simple(ColumnType::Interval),
        Type::UUID => simple(ColumnType::Uuid),
        Type::JSON | Type::JSONB => simple(ColumnType::Json),
        // Functions returning void (pg_sleep, ...) yield NULL.
        Type::VOID => simple(ColumnType::Dynamic),
        _ => match ty.kind() {
            Kind::Enum(_) => simple(ColumnType::String),
            Kind::Domain(inner) => column_type(inner),
            Kind::Array(elem) => column_type(elem).map(|(t, _)| (ColumnType::List, Some(t))),
            // citext is an extension type whose binary form is text.
            Kind::Simple if ty.name() == "citext" => simple(ColumnType::String),
            _ => None,
        },
    }
}

/// Result column metadata. Fails for types that cannot be represented, before any row is sent.
pub fn column(c: &tokio_postgres::Column) -> Result<Column, BackendError> {
    column_of(c.name(), c.type_(), c.type_modifier())
}

/// Column metadata from a name, type and type modifier (result columns and change-stream relations alike).
pub fn column_of(name: &str, ty: &Type, typmod: i32) -> Result<Column, BackendError> {
    let (column_type, element_type) = column_type(ty).ok_or_else(|| BackendError::UnsupportedType {
        column: name.to_string(),
        type_name: ty.name().to_string(),
    })?;
    let mut col = Column::new(name, ty.name(), column_type);
    col.element_type = element_type;
    (col.precision, col.scale, col.max_length) = typmod_details(ty, typmod);
    Ok(col)
}

/// The type itself, or what it stands for through domains and arrays (an
/// `int[]`'s `int4`, a domain over `bytea[]`'s `bytea`).
fn element_base(ty: &Type) -> &Type {
    match ty.kind() {
        Kind::Domain(inner) | Kind::Array(inner) => element_base(inner),
        _ => ty,
    }
}

/// The bits of a float type's mantissa, also as a domain's base or an
/// array's elements; None for other types.
fn float_bits(ty: &Type) -> Option<i32> {
    match *element_base(ty) {
        Type::FLOAT4 => Some(24),
        Type::FLOAT8 => Some(53),
        _ => None,
    }
}

/// Precision, scale and maximum length encoded in a type modifier.
pub fn typmod_details(ty: &Type, typmod: i32) -> (Option<i32>, Option<i32>, Option<i64>) {
    // A float's precision is the bits of its mantissa, as information_schema
    // gives it; an array's, its elements' (loads check each against it).
    if let Some(bits) = float_bits(ty) {
        return (Some(bits), None, None);
    }
    if typmod < 4 {
        return (None, None, None);
    }
    let m = typmod - 4;
    if *element_base(ty) == Type::NUMERIC {
        // The scale is 11 bits, signed since PostgreSQL 15 (numeric(5,-2)).
        // An array's type modifier is its elements' (numeric(6,2)[]): loads
        // check each element against it.
        return (Some((m >> 16) & 0xffff), Some(((m & 0x7ff) ^ 1024) - 1024), None);
    }
    match *ty {
        Type::VARCHAR | Type::BPCHAR => (None, None, Some(i64::from(m))),
        _ => (None, None, None),
    }
}

/// Refuses an integer parameter that a floating-point parameter type would
/// round (past 2^24 for `real`, 2^53 for `double precision`).
pub fn check_param_type(index: usize, ty: &Type, value: &Value) -> Result<(), BackendError> {
    /// The value, or the first element of a (nested) list, past `exact`.
    fn rounded(value: &Value, exact: u64) -> Option<u64> {
        match value {
            Value::List(items) => items.iter().find_map(|v| rounded(v, exact)),
            v => v.rounded_past(exact),
        }
    }
    fn has_bytes(value: &Value) -> bool {
        match value {
            Value::List(items) => items.iter().any(has_bytes),
            v => matches!(v, Value::Bytes(_)),
        }
    }
    /// The type, or a domain's base, is an array.
    fn is_array(ty: &Type) -> bool {
        match ty.kind() {
            Kind::Domain(inner) => is_array(inner),
            Kind::Array(_) => true,
            _ => false,
        }
    }
    if matches!(value, Value::List(_)) && !is_array(ty) {
        // Sent as its array literal's text, which `text` or `bytea` would
        // store as such (`{"a","b"}`).
        return Err(BackendError::Parameter {
            index: index + 1,
            message: format!(
                "a list where PostgreSQL expects {ty}: send a single value, or cast the parameter to an array type (${}::{ty}[])",
                index + 1
            ),
        });
    }
    if has_bytes(value) && *element_base(ty) != Type::BYTEA {
        // Sent as text, the bytes would be stored as the literal `\x...`.
        return Err(BackendError::Parameter {
            index: index + 1,
            message: format!(
                "bytes where PostgreSQL expects {ty}: send a string, or cast the parameter (${}::bytea)",
                index + 1
            ),
        });
    }
    /// A decimal (or text) value, or a list's first, that the float would round.
    fn rounded_decimal(value: &Value, single: bool) -> Option<(&str, String)> {
        match value {
            Value::List(items) => items.iter().find_map(|v| rounded_decimal(v, single)),
            Value::Decimal(s) | Value::Text(s) => {
                crate::backend::types::decimal_rounded_in_float(s, single).map(|kept| (s.as_str(), kept))
            }
            _ => None,
        }
    }
    let Some(bits) = float_bits(ty) else {
        return Ok(());
    };
    // The largest whole number the float holds with every one below it.
    if let Some(magnitude) = rounded(value, 1u64 << bits) {
        return Err(BackendError::Parameter {
            index: index + 1,
            message: format!("{magnitude} cannot be stored exactly in {ty}; send it as a decimal or a double"),
        });
    }
    match rounded_decimal(value, bits == 24) {
        Some((sent, kept)) => Err(BackendError::Parameter {
            index: index + 1,
            message: format!(
                "{sent} cannot be stored exactly in {ty}, which would keep {kept}; send a double if that rounding is meant"
            ),
        }),
        None => Ok(()),
    }
}

/// Writes `d` as PostgreSQL reads it: years before 1 as `YYYY-MM-DD` with
/// " BC" after the value (returned, to go last), since chrono's `%Y` writes
/// 0 and signed years, which PostgreSQL refuses. Year 0 is 1 BC.
fn write_date(out: &mut String, d: NaiveDate) -> &'static str {
    use chrono::Datelike;
    let (year, bc) = match d.year() {
        y if y <= 0 => (1 - y, " BC"),
        y => (y, ""),
    };
    let _ = write!(out, "{year:04}-{:02}-{:02}", d.month(), d.day());
    bc
}

/// A decoded cell: a result's (`PgValue`), or a change event's or snapshot
/// row's (`ChangeValue`), where an infinite date or timestamp comes as the
/// text `infinity` or `-infinity`. A query can cast such a column to text;
/// a change stream cannot, and refusing the value would stop the
/// subscription at that change for good, every resume meeting it again.
pub struct Cell<const IN_CHANGES: bool>(pub Value);

pub type PgValue = Cell<false>;
pub type ChangeValue = Cell<true>;

impl<'a, const IN_CHANGES: bool> FromSql<'a> for Cell<IN_CHANGES> {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let decoded = if IN_CHANGES {
            decode_change(ty, raw)
        } else {
            decode(ty, raw)
        };
        decoded.map(Cell)
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Cell(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// [`decode`], with infinite dates and timestamps as their text (see [`ChangeValue`]).
pub(super) fn decode_change(ty: &Type, raw: &[u8]) -> Result<Value, BoxError> {
    match ty.kind() {
        Kind::Domain(base) => return decode_change(base, raw),
        // An infinite element must not stop the stream either.
        Kind::Array(elem) => return decode_array(elem, raw, decode_change),
        _ => {}
    }
    decode(ty, raw).or_else(|e| {
        let infinite = match *ty {
            Type::DATE => wire::date_from_sql(raw).ok().and_then(|d| match d {
                i32::MAX => Some("infinity"),
                i32::MIN => Some("-infinity"),
                _ => None,
            }),
            Type::TIMESTAMP | Type::TIMESTAMPTZ => wire::timestamp_from_sql(raw).ok().and_then(|t| match t {
                i64::MAX => Some("infinity"),
                i64::MIN => Some("-infinity"),
                _ => None,
            }),
            Type::INTERVAL => infinite_interval(raw),
            _ => None,
        };
        infinite.map(|text| Value::Text(text.to_string())).ok_or(e)
    })
}

/// `infinity` or `-infinity` for an interval PostgreSQL 17 or later wrote
/// as one: every field at its largest, or every one at its smallest.
fn infinite_interval(raw: &[u8]) -> Option<&'static str> {
    let fields = (
        wire::int8_from_sql(raw.get(..8)?).ok()?,
        wire::int4_from_sql(raw.get(8..12)?).ok()?,
        wire::int4_from_sql(raw.get(12..16)?).ok()?,
    );
    match fields {
        (i64::MAX, i32::MAX, i32::MAX) => Some("infinity"),
        (i64::MIN, i32::MIN, i32::MIN) => Some("-infinity"),
        _ => None,
    }
}

pub(super) fn pg_epoch() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2000, 1, 1)
        .unwrap_or_default()
        .and_time(NaiveTime::MIN)
}

fn timestamp(micros: i64) -> Result<NaiveDateTime, BoxError> {
    if micros == i64::MAX || micros == i64::MIN {
        return Err("infinite timestamps cannot be represented; cast to text".into());
    }
    pg_epoch()
        .checked_add_signed(ChronoDuration::microseconds(micros))
        .ok_or_else(|| "timestamp out of range".into())
}

fn time_of_day(micros: i64) -> Result<NaiveTime, BoxError> {
    let secs = u32::try_from(micros.div_euclid(1_000_000)).map_err(|_| "time out of range")?;
    let nanos = u32::try_from(micros.rem_euclid(1_000_000) * 1000).map_err(|_| "time out of range")?;
    // 24:00:00 is a valid PostgreSQL time; chrono represents it as a leap second.
    if secs == 86_400 {
        return NaiveTime::from_hms_nano_opt(23, 59, 59, 1_000_000_000 + nanos)
            .ok_or_else(|| "time out of range".into());
    }
    NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos).ok_or_else(|| "time out of range".into())
}

pub(super) fn decode(ty: &Type, raw: &[u8]) -> Result<Value, BoxError> {
    Ok(match *ty {
        Type::BOOL => Value::Bool(wire::bool_from_sql(raw)?),
        Type::INT2 => Value::Int(i64::from(wire::int2_from_sql(raw)?)),
        Type::INT4 => Value::Int(i64::from(wire::int4_from_sql(raw)?)),
        Type::INT8 => Value::Int(wire::int8_from_sql(raw)?),
        Type::OID => Value::Int(i64::from(wire::oid_from_sql(raw)?)),
        Type::FLOAT4 => Value::Float(f64::from(wire::float4_from_sql(raw)?)),
        Type::FLOAT8 => Value::Float(wire::float8_from_sql(raw)?),
        Type::NUMERIC => Value::Decimal(numeric_to_string(raw)?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::XML => {
            Value::Text(wire::text_from_sql(raw)?.to_string())
        }
        // "char" is one byte; a byte past ASCII is written \ooo, as PostgreSQL's own output does.
        Type::CHAR => Value::Text(match raw.first() {
            None | Some(0) => String::new(),
            Some(b) if b.is_ascii() => char::from(*b).to_string(),
            Some(b) => format!("\\{b:03o}"),
        }),
        Type::VOID => Value::Null,
        Type::BYTEA => Value::Bytes(raw.to_vec()),
        Type::DATE => {
            let days = wire::date_from_sql(raw)?;
            if days == i32::MAX || days == i32::MIN {
                return Err("infinite dates cannot be represented; cast to text".into());
            }
            let date = pg_epoch()
                .date()
                .checked_add_signed(ChronoDuration::days(i64::from(days)));
            Value::Date(date.ok_or("date out of range")?)
        }
        Type::TIME => Value::Time(time_of_day(wire::time_from_sql(raw)?)?, None),
        Type::TIMETZ => {
            if raw.len() != 12 {
                return Err("invalid timetz length".into());
            }
            let micros = wire::time_from_sql(&raw[..8])?;
            // PostgreSQL stores the offset in seconds west of UTC.
            let west = wire::int4_from_sql(&raw[8..])?;
            Value::Time(time_of_day(micros)?, Some(-west))
        }
        Type::TIMESTAMP => Value::Timestamp(timestamp(wire::timestamp_from_sql(raw)?)?),
        Type::TIMESTAMPTZ => {
            let ts = timestamp(wire::timestamp_from_sql(raw)?)?;
            Value::TimestampTz(DateTime::from_naive_utc_and_offset(ts, chrono::Utc))
        }
        Type::INTERVAL => {
            if raw.len() != 16 {
                return Err("invalid interval length".into());
            }
            // PostgreSQL 17's infinite intervals, each field at its limit:
            // not a span of 178 million years.
            if infinite_interval(raw).is_some() {
                return Err("infinite intervals cannot be represented; cast to text".into());
            }
            Value::Interval {
                microseconds: wire::int8_from_sql(&raw[..8])?,
                days: wire::int4_from_sql(&raw[8..12])?,
                months: wire::int4_from_sql(&raw[12..])?,
            }
        }
        Type::UUID => Value::Uuid(uuid::Uuid::from_bytes(wire::uuid_from_sql(raw)?)),
        Type::JSON => Value::Json(wire::text_from_sql(raw)?.to_string()),
        Type::JSONB => match raw.split_first() {
            Some((1, rest)) => Value::Json(std::str::from_utf8(rest)?.to_string()),
            _ => return Err("unsupported jsonb format version".into()),
        },
        Type::INET | Type::CIDR => {
            let inet = wire::inet_from_sql(raw)?;
            Value::Text(format!("{}/{}", inet.addr(), inet.netmask()))
        }
        Type::MACADDR => {
            let m = wire::macaddr_from_sql(raw)?;
            Value::Text(m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
        }
        _ => match ty.kind() {
            Kind::Domain(inner) => decode(inner, raw)?,
            Kind::Array(elem) => decode_array(elem, raw, decode)?,
            Kind::Enum(_) => Value::Text(wire::text_from_sql(raw)?.to_string()),
            Kind::Simple if ty.name() == "citext" => Value::Text(wire::text_from_sql(raw)?.to_string()),
            _ => return Err(format!("type {} cannot be represented; cast it to text", ty.name()).into()),
        },
    })
}

/// An array, each element read by `element` (`decode`, or `decode_change`).
fn decode_array(
    elem: &Type,
    raw: &[u8],
    element: fn(&Type, &[u8]) -> Result<Value, BoxError>,
) -> Result<Value, BoxError> {
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::types::ArrayDimension;

    let array = wire::array_from_sql(raw)?;
    let dims: Vec<ArrayDimension> = array.dimensions().collect()?;
    let mut flat = Vec::new();
    let mut values = array.values();
    while let Some(v) = values.next()? {
        flat.push(match v {
            Some(bytes) => element(elem, bytes)?,
            None => Value::Null,
        });
    }
    if dims.is_empty() {
        return Ok(Value::List(Vec::new()));
    }
    // Nest row-major values by dimension, innermost first.
    let mut level = flat;
    for d in dims.iter().skip(1).rev() {
        let len = usize::try_from(d.len).map_err(|_| "invalid array dimension")?;
        if len == 0 {
            return Ok(Value::List(Vec::new()));
        }
        let mut grouped = Vec::with_capacity(level.len() / len);
        let mut it = level.into_iter();
        loop {
            let chunk: Vec<Value> = it.by_ref().take(len).collect();
            if chunk.is_empty() {
                break;
            }
            grouped.push(Value::List(chunk));
        }
        level = grouped;
    }
    Ok(Value::List(level))
}

/// Renders PostgreSQL's binary NUMERIC (base-10000 digits) as exact decimal text.
fn numeric_to_string(raw: &[u8]) -> Result<String, BoxError> {
    let read = |i: usize| -> Result<i16, BoxError> {
        raw.get(i..i + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "numeric too short".into())
    };
    let ndigits = usize::try_from(read(0)?).map_err(|_| "invalid numeric")?;
    let weight = i32::from(read(2)?);
    let sign = read(4)? as u16;
    let dscale = usize::try_from(read(6)?).map_err(|_| "invalid numeric")?;
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let mut digits = Vec::with_capacity(ndigits);
    for i in 0..ndigits {
        digits.push(read(8 + 2 * i)?);
    }
    let digit = |i: i32| -> i16 {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut s = String::with_capacity(ndigits * 4 + 4);
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                let _ = write!(s, "{}", digit(i));
            } else {
                let _ = write!(s, "{:04}", digit(i));
            }
        }
    }
    if dscale > 0 {
        s.push('.');
        let mut frac = String::with_capacity(dscale + 4);
        let mut i = weight + 1;
        while frac.len() < dscale {
            let _ = write!(frac, "{:04}", digit(i));
            i += 1;
        }
        frac.truncate(dscale);
        s.push_str(&frac);
    }
    Ok(s)
}

pub const NO_NUL: &str = "PostgreSQL text cannot contain NUL characters; send binary data as bytes";

/// Whether `v` holds text with a NUL character, which PostgreSQL cannot store.
pub fn has_nul(v: &Value) -> bool {
    match v {
        Value::Text(s) | Value::Decimal(s) | Value::Json(s) => s.contains('\0'),
        Value::List(items) => items.iter().any(has_nul),
        _ => false,
    }
}

/// PostgreSQL text cannot hold NUL characters; refuse them before sending.
pub fn check_params(params: &[Value]) -> Result<(), BackendError> {
    match params.iter().position(has_nul) {
        Some(i) => Err(BackendError::Parameter {
            index: i + 1,
            message: NO_NUL.into(),
        }),
        None => Ok(()),
    }
}

/// A parameter, sent as text so PostgreSQL parses it for the type it expects
/// (an integer literal binds to int4, numeric or text alike).
pub struct PgParam<'a>(pub &'a Value);

/// tokio-postgres logs its parameters at debug level: their kinds, never their values.
impl std::fmt::Debug for PgParam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.kind())
    }
}

impl ToSql for PgParam<'_> {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        if matches!(self.0, Value::Null) {
            return Ok(IsNull::Yes);
        }
        let mut text = String::new();
        write_text(self.0, &mut text, false);
        out.extend_from_slice(text.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

/// PostgreSQL's text input form of a value; `in_array` quotes elements as
/// array literals require.
pub(super) fn write_text(v: &Value, out: &mut String, in_array: bool) {
    let start = out.len();
    match v {
        Value::Null => out.push_str("NULL"),
        Value::Bool(b) => out.push_str(if *b { "t" } else { "f" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Value::Float(f) => {
            if f.is_nan() {
                out.push_str("NaN");
            } else if f.is_infinite() {
                out.push_str(if *f > 0.0 { "Infinity" } else { "-Infinity" });
            } else {
                let _ = write!(out, "{f:?}");
            }
        }
        Value::Text(s) | Value::Decimal(s) | Value::Json(s) => out.push_str(s),
        Value::Bytes(b) => {
            out.push_str("\\x");
            for byte in b {
                let _ = write!(out, "{byte:02x}");
            }
        }
        Value::Date(d) => {
            let bc = write_date(out, *d);
            out.push_str(bc);
        }
        Value::Time(t, offset) => {
            let _ = write!(out, "{}", t.format("%H:%M:%S%.f"));
            if let Some(o) = offset {
                let sign = if *o < 0 { '-' } else { '+' };
                let o = o.unsigned_abs();
                let _ = write!(out, "{sign}{:02}:{:02}:{:02}", o / 3600, (o % 3600) / 60, o % 60);
            }
        }
        Value::Timestamp(t) => {
            let bc = write_date(out, t.date());
            let _ = write!(out, " {}{bc}", t.time().format("%H:%M:%S%.f"));
        }
        Value::TimestampTz(t) => {
            let bc = write_date(out, t.date_naive());
            let _ = write!(out, " {}+00{bc}", t.time().format("%H:%M:%S%.f"));
        }
        Value::Interval {
            months,
            days,
            microseconds,
        } => {
            // A sign on every field: under intervalstyle sql_standard a leading
            // '-' with no other sign negates every field. Seconds, not
            // microseconds: before PostgreSQL 15 each number had to fit 32 bits.
            let sign = if *microseconds < 0 { '-' } else { '+' };
            let us = microseconds.unsigned_abs();
            let _ = write!(
                out,
                "{months:+} mons {days:+} days {sign}{}.{:06} secs",
                us / 1_000_000,
                us % 1_000_000
            );
        }
        Value::Uuid(u) => {
            let _ = write!(out, "{u}");
        }
        Value::List(items) => {
            out.push('{');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_text(item, out, true);
            }
            out.push('}');
            return;
        }
    }
    if in_array && !matches!(v, Value::Null) {
        let element = out.split_off(start);
        out.push('"');
        for c in element.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_17_infinite_intervals_are_not_taken_for_spans() {
        let interval = |micros: i64, days: i32, months: i32| {
            let mut raw = micros.to_be_bytes().to_vec();
            raw.extend_from_slice(&days.to_be_bytes());
            raw.extend_from_slice(&months.to_be_bytes());
            raw
        };
        let plus = interval(i64::MAX, i32::MAX, i32::MAX);
        let minus = interval(i64::MIN, i32::MIN, i32::MIN);
        assert!(decode(&Type::INTERVAL, &plus).is_err());
        assert!(decode(&Type::INTERVAL, &minus).is_err());
        assert_eq!(
            decode_change(&Type::INTERVAL, &plus).ok(),
            Some(Value::Text("infinity".into()))
        );
        assert_eq!(
            decode_change(&Type::INTERVAL, &minus).ok(),
            Some(Value::Text("-infinity".into()))
        );
        // One field at its limit is a span like any other.
        assert_eq!(
            decode(&Type::INTERVAL, &interval(i64::MAX, 0, 0)).ok(),
            Some(Value::Interval {
                microseconds: i64::MAX,
                days: 0,
                months: 0
            })
        );
    }

    #[test]
    fn float_precision_reaches_through_arrays_and_domains() {
        let domain = Type::new("pos_real".into(), 1, Kind::Domain(Type::FLOAT4), "public".into());
        let array = Type::new("_pos_real".into(), 2, Kind::Array(domain.clone()), "public".into());
        for ty in [Type::FLOAT4, Type::FLOAT4_ARRAY, domain, array] {
            assert_eq!(typmod_details(&ty, -1).0, Some(24), "{ty}");
        }
        assert_eq!(typmod_details(&Type::FLOAT8_ARRAY, -1).0, Some(53));
        assert_eq!(typmod_details(&Type::INT4_ARRAY, -1).0, None);
    }

    #[test]
    fn numeric_precision_and_scale_reach_array_elements() {
        let six_two = ((6 << 16) | 2) + 4;
        for ty in [Type::NUMERIC, Type::NUMERIC_ARRAY] {
            assert_eq!(typmod_details(&ty, six_two), (Some(6), Some(2), None), "{ty}");
        }
        assert_eq!(typmod_details(&Type::NUMERIC_ARRAY, -1), (None, None, None));
    }

    #[test]
    fn lists_go_only_to_array_placeholders() {
        let list = Value::List(vec![Value::Bytes(vec![1, 2])]);
        for ty in [Type::BYTEA, Type::TEXT, Type::INT4] {
            let refused = check_param_type(0, &ty, &list);
            assert!(
                matches!(&refused, Err(BackendError::Parameter { index: 1, message }) if message.contains("a list where")),
                "{ty}: {refused:?}"
            );
        }
        assert!(check_param_type(0, &Type::BYTEA_ARRAY, &list).is_ok());
        let ints = Value::List(vec![Value::Int(1), Value::Null]);
        assert!(check_param_type(0, &Type::INT4_ARRAY, &ints).is_ok());
    }

    #[test]
    fn parameters_show_their_kind_not_their_value() {
        let secret = Value::Text("hunter2".into());
        assert_eq!(format!("{:?}", [PgParam(&secret)]), "[string]");
    }

    fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: i16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [ndigits, weight, sign as i16, dscale] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_text() {
        assert_eq!(
            numeric_to_string(&numeric(2, 1, 0, 2, &[12, 3456])).unwrap(),
            "123456.00"
        );
        assert_eq!(
            numeric_to_string(&numeric(2, 0, 0x4000, 4, &[1, 2300])).unwrap(),
            "-1.2300"
        );
        assert_eq!(numeric_to_string(&numeric(1, -2, 0, 8, &[12])).unwrap(), "0.00000012");
        assert_eq!(numeric_to_string(&numeric(0, 0, 0, 0, &[])).unwrap(), "0");
        assert_eq!(numeric_to_string(&numeric(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
        assert_eq!(numeric_to_string(&numeric(1, 2, 0, 0, &[7])).unwrap(), "700000000");
    }

    #[test]
    fn array_literals_quote_elements() {
        let mut s = String::new();
        write_text(
            &Value::List(vec![Value::Text("a\"b".into()), Value::Null, Value::Text("c,d".into())]),
            &mut s,
            false,
        );
        assert_eq!(s, r#"{"a\"b",NULL,"c,d"}"#);
    }
}

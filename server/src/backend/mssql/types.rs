//! SQL Server type mapping. Dates and times are decoded from their TDS parts
//! here rather than through tiberius' chrono conversions, which read a
//! datetimeoffset as local time (its wire value is UTC) and panic on some
//! out-of-range input.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use tiberius::numeric::Numeric;
use tiberius::time::{Date, DateTime2, DateTimeOffset, Time};
use tiberius::{ColumnData, ColumnType as Tds, IntoSql};

use crate::backend::{Column, ColumnType, Value};

/// Largest precision of a SQL Server decimal.
const MAX_PRECISION: usize = 38;
/// Days from 0001-01-01 to 9999-12-31, the range of date and datetime2.
const MAX_DAYS: i32 = 3_652_058;
const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// How the values of one result column are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// By the value's own TDS type.
    Plain,
    /// money and smallmoney, which tiberius hands over as `f64`: the exact
    /// four-place decimal is recovered from it (see `money_text`).
    Money,
}

/// The domain column for a result column, and how to decode its values.
/// tiberius reports neither nullability nor precision of result columns.
pub fn column(name: &str, ty: Tds) -> (Column, Decode) {
    use ColumnType as C;
    let (native, column_type) = match ty {
        Tds::Null => ("null", C::Dynamic),
        Tds::Bit | Tds::Bitn => ("bit", C::Bool),
        // tinyint is unsigned 0..255: it fits an int64 like the other integers.
        Tds::Int1 => ("tinyint", C::Int),
        Tds::Int2 => ("smallint", C::Int),
        Tds::Int4 | Tds::Intn => ("int", C::Int),
        Tds::Int8 => ("bigint", C::Int),
        Tds::Float4 => ("real", C::Float),
        Tds::Float8 | Tds::Floatn => ("float", C::Float),
        Tds::Money => ("money", C::Decimal),
        Tds::Money4 => ("smallmoney", C::Decimal),
        Tds::Decimaln => ("decimal", C::Decimal),
        Tds::Numericn => ("numeric", C::Decimal),
        Tds::Datetime | Tds::Datetimen => ("datetime", C::Timestamp),
        Tds::Datetime4 => ("smalldatetime", C::Timestamp),
        Tds::Datetime2 => ("datetime2", C::Timestamp),
        Tds::Daten => ("date", C::Date),
        Tds::Timen => ("time", C::Time),
        Tds::DatetimeOffsetn => ("datetimeoffset", C::TimestampTz),
        Tds::Guid => ("uniqueidentifier", C::Uuid),
        Tds::BigChar => ("char", C::String),
        Tds::BigVarChar => ("varchar", C::String),
        Tds::NChar => ("nchar", C::String),
        Tds::NVarchar => ("nvarchar", C::String),
        Tds::Text => ("text", C::String),
        Tds::NText => ("ntext", C::String),
        Tds::Xml => ("xml", C::String),
        Tds::BigBinary => ("binary", C::Bytes),
        Tds::BigVarBin => ("varbinary", C::Bytes),
        Tds::Image => ("image", C::Bytes),
        // CLR types (geometry, geography, hierarchyid) and sql_variant:
        // tiberius 0.12 cannot decode them (it panics, see `driver_panic`).
        Tds::Udt => ("udt", C::Unsupported),
        Tds::SSVariant => ("sql_variant", C::Unsupported),
    };
    let mut c = Column::new(name, native, column_type);
    let decode = if matches!(ty, Tds::Money | Tds::Money4) {
        c.scale = Some(4);
        Decode::Money
    } else {
        Decode::Plain
    };
    (c, decode)
}

/// Decodes one value; NULL of any type is `Value::Null`.
pub fn decode(data: ColumnData<'static>, how: Decode) -> Result<Value, String> {
    let value = match data {
        ColumnData::U8(v) => v.map(|v| Value::Int(i64::from(v))),
        ColumnData::I16(v) => v.map(|v| Value::Int(i64::from(v))),
        ColumnData::I32(v) => v.map(|v| Value::Int(i64::from(v))),
        ColumnData::I64(v) => v.map(Value::Int),
        ColumnData::F32(v) => v.map(|v| Value::Float(f64::from(v))),
        ColumnData::F64(v) if how == Decode::Money => v.map(money_text).transpose()?.map(Value::Decimal),
        ColumnData::F64(v) => v.map(Value::Float),
        ColumnData::Bit(v) => v.map(Value::Bool),
        ColumnData::String(v) => v.map(|s| Value::Text(s.into_owned())),
        ColumnData::Guid(v) => v.map(Value::Uuid),
        ColumnData::Binary(v) => v.map(|b| Value::Bytes(b.into_owned())),
        ColumnData::Numeric(v) => v.map(|n| Value::Decimal(decimal_text(n.value(), n.scale()))),
        ColumnData::Xml(v) => v.map(|x| Value::Text(x.into_owned().into_string())),
        ColumnData::DateTime(v) => v
            .map(|d| datetime(d.days(), d.seconds_fragments()).map(Value::Timestamp))
            .transpose()?,
        ColumnData::SmallDateTime(v) => v
            .map(|d| smalldatetime(d.days(), d.seconds_fragments()).map(Value::Timestamp))
            .transpose()?,
        ColumnData::Date(v) => v.map(|d| date(d).map(Value::Date)).transpose()?,
        ColumnData::Time(v) => v.map(|t| time(t).map(|t| Value::Time(t, None))).transpose()?,
        ColumnData::DateTime2(v) => v.map(|d| datetime2(d).map(Value::Timestamp)).transpose()?,
        // The wire value is the UTC instant; the offset only says where it was written.
        ColumnData::DateTimeOffset(v) => v
            .map(|d| {
                datetime2(d.datetime2()).map(|at| Value::TimestampTz(DateTime::from_naive_utc_and_offset(at, Utc)))
            })
            .transpose()?,
    };
    Ok(value.unwrap_or(Value::Null))
}

/// An exact decimal as text: `value` scaled down by `scale` digits.
pub fn decimal_text(value: i128, scale: u8) -> String {
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    let scale = usize::from(scale);
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

/// Recovers the exact money value from tiberius' `raw / 1e4` in f64 (raw is
/// the wire's integer count of ten-thousandths). Below 2^52 ten-thousandths
/// (about 450 billion) every raw value gives a distinct f64, and the one
/// candidate that reproduces it is the wire value; larger amounts are refused
/// rather than rounded.
pub fn money_text(f: f64) -> Result<String, String> {
    const LIMIT: f64 = 4_503_599_627_370_496.0; // 2^52
    let too_large = || format!("the money value {f} is too large to read exactly; CAST it AS decimal(19,4)");
    let guess = (f * 1e4).round();
    if !guess.is_finite() || guess.abs() > LIMIT {
        return Err(too_large());
    }
    // |guess| <= 2^52: the conversion is exact, and so is `raw as f64` below.
    let guess = guess as i64;
    let mut matching = (guess - 2..=guess + 2).filter(|raw| *raw as f64 / 1e4 == f);
    match (matching.next(), matching.next()) {
        (Some(raw), None) => Ok(decimal_text(i128::from(raw), 4)),
        _ => Err(too_large()),
    }
}

fn date(d: Date) -> Result<NaiveDate, String> {
    i32::try_from(d.days())
        .ok()
        .and_then(|days| days.checked_add(1))
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .ok_or_else(|| format!("date {} days after 0001-01-01 is out of range", d.days()))
}

fn time(t: Time) -> Result<NaiveTime, String> {
    let invalid = || {
        format!(
            "invalid time of day ({} increments at scale {})",
            t.increments(),
            t.scale()
        )
    };
    let unit = 9u32
        .checked_sub(u32::from(t.scale()))
        .map(|e| 10u64.pow(e))
        .ok_or_else(invalid)?;
    let nanos = t.increments().checked_mul(unit).ok_or_else(invalid)?;
    let seconds = u32::try_from(nanos / NANOS_PER_SECOND).map_err(|_| invalid())?;
    let fraction = (nanos % NANOS_PER_SECOND) as u32;
    NaiveTime::from_num_seconds_from_midnight_opt(seconds, fraction).ok_or_else(invalid)
}

fn datetime2(d: DateTime2) -> Result<NaiveDateTime, String> {
    Ok(NaiveDateTime::new(date(d.date())?, time(d.time())?))
}

/// Days since 1900-01-01, the epoch of datetime and smalldatetime.
fn day_since_1900(days: i32) -> Result<NaiveDate, String> {
    const DAYS_FROM_CE_TO_1900: i32 = 693_596;
    days.checked_add(DAYS_FROM_CE_TO_1900)
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .ok_or_else(|| format!("datetime {days} days after 1900-01-01 is out of range"))
}

/// datetime: days since 1900 and 1/300 s since midnight (kept to the
/// nanosecond, as SQL Server converts it to datetime2).
fn datetime(days: i32, ticks: u32) -> Result<NaiveDateTime, String> {
    let nanos = (ticks % 300) * 10_000_000 / 3;
    let time = NaiveTime::from_num_seconds_from_midnight_opt(ticks / 300, nanos)
        .ok_or_else(|| format!("invalid datetime time of day ({ticks}/300 s)"))?;
    Ok(NaiveDateTime::new(day_since_1900(days)?, time))
}

/// smalldatetime: days since 1900 and minutes since midnight.
fn smalldatetime(days: u16, minutes: u16) -> Result<NaiveDateTime, String> {
    let time = NaiveTime::from_num_seconds_from_midnight_opt(u32::from(minutes) * 60, 0)
        .ok_or_else(|| format!("invalid smalldatetime time of day ({minutes} min)"))?;
    Ok(NaiveDateTime::new(day_since_1900(i32::from(days))?, time))
}

/// A bound parameter: tiberius declares its SQL type from the value.
pub struct Param(pub ColumnData<'static>);

impl<'a> IntoSql<'a> for Param {
    fn into_sql(self) -> ColumnData<'a> {
        self.0
    }
}

/// Converts a parameter. NULL is sent as nvarchar, which SQL Server converts
/// implicitly to every type but binary ones: a NULL for a varbinary column
/// needs `CAST(@P1 AS varbinary(max))`.
pub fn param(v: &Value) -> Result<ColumnData<'static>, String> {
    Ok(match v {
        Value::Null => ColumnData::String(None),
        Value::Bool(b) => ColumnData::Bit(Some(*b)),
        Value::Int(i) => ColumnData::I64(Some(*i)),
        Value::UInt(u) => match i64::try_from(*u) {
            Ok(i) => ColumnData::I64(Some(i)),
            // Beyond bigint: an exact decimal(20,0).
            Err(_) => ColumnData::Numeric(Some(Numeric::new_with_scale(i128::from(*u), 0))),
        },
        Value::Float(f) => ColumnData::F64(Some(*f)),
        Value::Text(s) | Value::Json(s) => ColumnData::String(Some(s.clone().into())),
        Value::Bytes(b) => ColumnData::Binary(Some(b.clone().into())),
        Value::Decimal(s) => ColumnData::Numeric(Some(numeric(s)?)),
        Value::Date(d) => ColumnData::Date(Some(to_date(*d)?)),
        Value::Time(t, None) => ColumnData::Time(Some(to_time(*t))),
        Value::Time(_, Some(_)) => {
            return Err("SQL Server's time has no UTC offset; send the time without one".into());
        }
        Value::Timestamp(t) => ColumnData::DateTime2(Some(to_datetime2(*t)?)),
        // The UTC instant at offset +00:00: exact in a datetimeoffset column,
        // and the UTC wall-clock time when SQL Server converts it to datetime2.
        Value::TimestampTz(t) => ColumnData::DateTimeOffset(Some(DateTimeOffset::new(to_datetime2(t.naive_utc())?, 0))),
        Value::Uuid(u) => ColumnData::Guid(Some(*u)),
        Value::Interval { .. } => return Err("SQL Server has no interval type".into()),
        Value::List(_) => return Err("SQL Server has no array type".into()),
    })
}

fn to_date(d: NaiveDate) -> Result<Date, String> {
    let days = d.num_days_from_ce() - 1;
    u32::try_from(days)
        .ok()
        .filter(|_| days <= MAX_DAYS)
        .map(Date::new)
        .ok_or_else(|| format!("{d} is outside SQL Server's dates (0001-01-01 to 9999-12-31)"))
}

/// A time of day in 100 ns increments (time(7)); a leap second is clamped.
fn to_time(t: NaiveTime) -> Time {
    let nanos =
        u64::from(t.num_seconds_from_midnight()) * NANOS_PER_SECOND + u64::from(t.nanosecond().min(999_999_999));
    Time::new(nanos / 100, 7)
}

fn to_datetime2(t: NaiveDateTime) -> Result<DateTime2, String> {
    Ok(DateTime2::new(to_date(t.date())?, to_time(t.time())))
}

/// Parses a decimal (as validated at the API: digits, an optional point and
/// exponent, or NaN/Infinity) into SQL Server's numeric(p, s).
pub fn numeric(text: &str) -> Result<Numeric, String> {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let negative = text.starts_with('-');
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (
            m,
            e.parse::<i32>()
                .map_err(|_| format!("'{text}': exponent out of range"))?,
        ),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !(int.chars().chain(frac.chars())).all(|c| c.is_ascii_digit()) || (int.is_empty() && frac.is_empty()) {
        return Err(format!(
            "'{text}' is not a number SQL Server can store (no NaN or Infinity)"
        ));
    }
    let mut digits = format!("{int}{frac}");
    let mut scale = i64::try_from(frac.len()).unwrap_or(i64::MAX) - i64::from(exponent);
    // A negative scale is that many trailing zeros; excess scale may be trailing zeros too.
    while scale < 0 {
        digits.push('0');
        scale += 1;
        if digits.len() > MAX_PRECISION * 2 {
            break;
        }
    }
    while scale > 0 && digits.ends_with('0') && (scale >= MAX_PRECISION as i64 || digits.len() > MAX_PRECISION) {
        digits.pop();
        scale -= 1;
    }
    let significant = digits.trim_start_matches('0');
    let scale = usize::try_from(scale).unwrap_or(usize::MAX);
    let int_digits = significant.len().saturating_sub(scale).max(1);
    if scale >= MAX_PRECISION || int_digits + scale > MAX_PRECISION {
        return Err(format!(
            "'{text}' needs more than {MAX_PRECISION} digits, the precision of SQL Server's decimal"
        ));
    }
    let value: i128 = if significant.is_empty() {
        0
    } else {
        significant.parse().map_err(|_| format!("'{text}' is out of range"))?
    };
    // scale < 38 was checked above, as Numeric requires.
    Ok(Numeric::new_with_scale(
        if negative { -value } else { value },
        scale as u8,
    ))
}

/// The number of parameters a statement uses: its highest `@Pn`, outside
/// string literals, quoted identifiers and comments. sp_executesql would
/// otherwise accept unused parameters and report a missing one only as an
/// undeclared variable.
pub fn placeholder_count(sql: &str) -> usize {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c >= 0x80 || matches!(c, b'_' | b'@' | b'#' | b'$');
    let skip_to = |from: usize, end: u8| {
        b[from..]
            .iter()
            .position(|c| *c == end)
            .map_or(b.len(), |p| from + p + 1)
    };
    let mut highest = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // A doubled quote inside a literal just closes and reopens it.
            b'\'' => i = skip_to(i + 1, b'\''),
            b'"' => i = skip_to(i + 1, b'"'),
            b'[' => {
                i = skip_to(i + 1, b']');
                // `]]` inside a bracketed name is a `]` of the name.
                while b.get(i) == Some(&b']') {
                    i = skip_to(i + 1, b']');
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => i = skip_to(i + 2, b'\n'),
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // T-SQL block comments nest.
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'@' if (i == 0 || !ident(b[i - 1])) && matches!(b.get(i + 1), Some(b'P' | b'p')) => {
                let start = i + 2;
                let end = b[start..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .map_or(b.len(), |p| start + p);
                let whole = end > start && b.get(end).is_none_or(|c| !ident(*c));
                if let (true, Ok(n)) = (whole, sql[start..end].parse::<usize>()) {
                    highest = highest.max(n);
                }
                i = end.max(start);
            }
            _ => i += 1,
        }
    }
    highest
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use tiberius::time::{DateTime as TdsDateTime, SmallDateTime};
    use tiberius::xml::XmlData;

    use super::*;

    fn plain(data: ColumnData<'static>) -> Value {
        decode(data, Decode::Plain).expect("decodes")
    }

    fn naive(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").expect("timestamp")
    }

    #[test]
    fn result_columns_map_to_domain_types() {
        use ColumnType as C;
        let cases = [
            (Tds::Bit, "bit", C::Bool),
            (Tds::Bitn, "bit", C::Bool),
            (Tds::Int1, "tinyint", C::Int),
            (Tds::Int2, "smallint", C::Int),
            (Tds::Int4, "int", C::Int),
            (Tds::Int8, "bigint", C::Int),
            (Tds::Decimaln, "decimal", C::Decimal),
            (Tds::Numericn, "numeric", C::Decimal),
            (Tds::Money, "money", C::Decimal),
            (Tds::Money4, "smallmoney", C::Decimal),
            (Tds::Float4, "real", C::Float),
            (Tds::Float8, "float", C::Float),
            (Tds::BigChar, "char", C::String),
            (Tds::BigVarChar, "varchar", C::String),
            (Tds::NChar, "nchar", C::String),
            (Tds::NVarchar, "nvarchar", C::String),
            (Tds::BigBinary, "binary", C::Bytes),
            (Tds::BigVarBin, "varbinary", C::Bytes),
            (Tds::Daten, "date", C::Date),
            (Tds::Timen, "time", C::Time),
            (Tds::Datetime, "datetime", C::Timestamp),
            (Tds::Datetimen, "datetime", C::Timestamp),
            (Tds::Datetime4, "smalldatetime", C::Timestamp),
            (Tds::Datetime2, "datetime2", C::Timestamp),
            (Tds::DatetimeOffsetn, "datetimeoffset", C::TimestampTz),
            (Tds::Guid, "uniqueidentifier", C::Uuid),
            (Tds::Xml, "xml", C::String),
            (Tds::Null, "null", C::Dynamic),
            (Tds::Udt, "udt", C::Unsupported),
            (Tds::SSVariant, "sql_variant", C::Unsupported),
        ];
        for (tds, native, domain) in cases {
            let (c, _) = column("c", tds);
            assert_eq!((c.native_type.as_str(), c.column_type), (native, domain), "{tds:?}");
        }
        assert_eq!(column("m", Tds::Money).1, Decode::Money);
        assert_eq!(column("m", Tds::Money4).0.scale, Some(4));
        assert_eq!(column("f", Tds::Float8).1, Decode::Plain);
    }

    #[test]
    fn integers_bits_and_floats() {
        assert_eq!(plain(ColumnData::U8(Some(255))), Value::Int(255), "tinyint is unsigned");
        assert_eq!(plain(ColumnData::I16(Some(-32768))), Value::Int(-32768));
        assert_eq!(plain(ColumnData::I32(Some(i32::MIN))), Value::Int(i64::from(i32::MIN)));
        assert_eq!(plain(ColumnData::I64(Some(i64::MAX))), Value::Int(i64::MAX));
        assert_eq!(plain(ColumnData::Bit(Some(true))), Value::Bool(true));
        assert_eq!(plain(ColumnData::F32(Some(1.5))), Value::Float(1.5));
        assert_eq!(plain(ColumnData::F64(Some(2.25))), Value::Float(2.25));
    }

    #[test]
    fn nulls_of_every_type_are_null() {
        let nulls = [
            ColumnData::U8(None),
            ColumnData::I64(None),
            ColumnData::F64(None),
            ColumnData::Bit(None),
            ColumnData::String(None),
            ColumnData::Guid(None),
            ColumnData::Binary(None),
            ColumnData::Numeric(None),
            ColumnData::Xml(None),
            ColumnData::DateTime(None),
            ColumnData::SmallDateTime(None),
            ColumnData::Date(None),
            ColumnData::Time(None),
            ColumnData::DateTime2(None),
            ColumnData::DateTimeOffset(None),
        ];
        for data in nulls {
            assert_eq!(plain(data), Value::Null);
        }
        assert_eq!(decode(ColumnData::F64(None), Decode::Money), Ok(Value::Null));
    }

    #[test]
    fn text_binary_uuid_and_xml() {
        assert_eq!(
            plain(ColumnData::String(Some("héllo ✓".into()))),
            Value::Text("héllo ✓".into())
        );
        assert_eq!(
            plain(ColumnData::Binary(Some(vec![0, 1, 255].into()))),
            Value::Bytes(vec![0, 1, 255])
        );
        let id = uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").expect("uuid");
        assert_eq!(plain(ColumnData::Guid(Some(id))), Value::Uuid(id));
        let xml = XmlData::new("<a>1</a>");
        assert_eq!(
            plain(ColumnData::Xml(Some(Cow::Owned(xml)))),
            Value::Text("<a>1</a>".into())
        );
    }

    #[test]
    fn decimals_are_exact_text() {
        let n = |v: i128, s: u8| plain(ColumnData::Numeric(Some(Numeric::new_with_scale(v, s))));
        assert_eq!(n(1234, 2), Value::Decimal("12.34".into()));
        assert_eq!(n(-5, 2), Value::Decimal("-0.05".into()));
        assert_eq!(n(0, 3), Value::Decimal("0.000".into()));
        assert_eq!(n(42, 0), Value::Decimal("42".into()));
        let big = 99_999_999_999_999_999_999_999_999_999_999_999_999i128;
        assert_eq!(
            n(-big, 10),
            Value::Decimal("-9999999999999999999999999999.9999999999".into())
        );
    }

    #[test]
    fn money_is_exact_with_four_places() {
        // What tiberius computes from the wire's ten-thousandths.
        let wire = |raw: i64| raw as f64 / 1e4;
        let money = |raw: i64| decode(ColumnData::F64(Some(wire(raw))), Decode::Money);
        assert_eq!(money(123_456), Ok(Value::Decimal("12.3456".into())));
        assert_eq!(money(-1), Ok(Value::Decimal("-0.0001".into())));
        assert_eq!(money(10_000), Ok(Value::Decimal("1.0000".into())));
        assert_eq!(
            money(i64::from(i32::MIN)),
            Ok(Value::Decimal("-214748.3648".into())),
            "smallmoney min"
        );
        assert_eq!(money(1_234_567_891_234), Ok(Value::Decimal("123456789.1234".into())));
        // Across the range it accepts, every amount comes back exactly.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let raw = (x >> 11) as i64 * if x & 1 == 0 { 1 } else { -1 }; // |raw| < 2^53
            let expected = decimal_text(i128::from(raw), 4);
            match money_text(wire(raw)) {
                Ok(text) => assert_eq!(text, expected, "raw {raw}"),
                Err(_) => assert!(raw.unsigned_abs() > 1 << 51, "raw {raw} refused"),
            }
        }
        // money's extremes are refused rather than rounded.
        assert!(money(i64::MAX).is_err());
        assert!(money(i64::MIN).is_err());
    }

    #[test]
    fn dates_and_times() {
        let date = |days| plain(ColumnData::Date(Some(Date::new(days))));
        assert_eq!(date(0), Value::Date(NaiveDate::from_ymd_opt(1, 1, 1).expect("date")));
        assert_eq!(
            date(3_652_058),
            Value::Date(NaiveDate::from_ymd_opt(9999, 12, 31).expect("date"))
        );
        let leap = NaiveDate::from_ymd_opt(2024, 2, 29).expect("date");
        assert_eq!(date(to_date(leap).expect("in range").days()), Value::Date(leap));

        let at = NaiveTime::from_hms_nano_opt(23, 59, 59, 123_456_700).expect("time");
        assert_eq!(
            plain(ColumnData::Time(Some(Time::new(863_991_234_567, 7)))),
            Value::Time(at, None)
        );
        let at = NaiveTime::from_hms_milli_opt(10, 0, 0, 500).expect("time");
        assert_eq!(
            plain(ColumnData::Time(Some(Time::new(360_005, 1)))),
            Value::Time(at, None),
            "time(1)"
        );
        assert!(decode(ColumnData::Time(Some(Time::new(864_000_000_000, 7))), Decode::Plain).is_err());

        let day = to_date(NaiveDate::from_ymd_opt(2024, 1, 2).expect("date")).expect("in range");
        let dt2 = DateTime2::new(day, Time::new(111_451_234_567, 7));
        assert_eq!(
            plain(ColumnData::DateTime2(Some(dt2))),
            Value::Timestamp(naive("2024-01-02 03:05:45.1234567"))
        );
    }

    #[test]
    fn legacy_datetimes() {
        // 2024-01-02 is 45291 days after 1900-01-01; 1/300 s ticks.
        let dt = |ticks| plain(ColumnData::DateTime(Some(TdsDateTime::new(45_291, ticks))));
        assert_eq!(dt(0), Value::Timestamp(naive("2024-01-02 00:00:00")));
        assert_eq!(
            dt(3 * 300 + 1),
            Value::Timestamp(naive("2024-01-02 00:00:03.003333333"))
        );
        assert_eq!(dt(25_919_999), Value::Timestamp(naive("2024-01-02 23:59:59.996666666")));
        let before_1900 = plain(ColumnData::DateTime(Some(TdsDateTime::new(-53_690, 0))));
        assert_eq!(before_1900, Value::Timestamp(naive("1753-01-01 00:00:00")));
        let small = plain(ColumnData::SmallDateTime(Some(SmallDateTime::new(45_291, 61))));
        assert_eq!(small, Value::Timestamp(naive("2024-01-02 01:01:00")));
    }

    #[test]
    fn datetimeoffset_is_the_utc_instant() {
        // 10:00 at +02:00 travels as 08:00 UTC with offset 120.
        let day = to_date(NaiveDate::from_ymd_opt(2024, 1, 2).expect("date")).expect("in range");
        let utc = DateTime2::new(day, to_time(NaiveTime::from_hms_opt(8, 0, 0).expect("time")));
        let v = plain(ColumnData::DateTimeOffset(Some(DateTimeOffset::new(utc, 120))));
        let expected = DateTime::from_naive_utc_and_offset(naive("2024-01-02 08:00:00"), Utc);
        assert_eq!(v, Value::TimestampTz(expected));
    }

    #[test]
    fn parameters_round_trip_through_the_decoder() {
        let values = [
            Value::Int(-9_007_199_254_740_993),
            Value::Bool(true),
            Value::Float(2.5),
            Value::Text("x'); DROP TABLE t; --".into()),
            Value::Bytes(vec![0, 1, 255]),
            Value::Uuid(uuid::Uuid::nil()),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).expect("date")),
            Value::Time(NaiveTime::from_hms_micro_opt(1, 2, 3, 456_789).expect("time"), None),
            Value::Timestamp(naive("2024-01-02 03:04:05.123456")),
            Value::TimestampTz(DateTime::from_naive_utc_and_offset(naive("1999-12-31 23:59:59.5"), Utc)),
            Value::Decimal("-12.34".into()),
        ];
        for v in values {
            let data = param(&v).expect("converts");
            assert_eq!(plain(data), v);
        }
        assert_eq!(
            plain(param(&Value::Json("{}".into())).expect("json")),
            Value::Text("{}".into())
        );
        assert_eq!(param(&Value::Null).expect("null"), ColumnData::String(None));
    }

    #[test]
    fn parameters_sql_server_cannot_take() {
        assert!(param(&Value::Interval {
            months: 1,
            days: 0,
            microseconds: 0
        })
        .is_err());
        assert!(param(&Value::List(vec![])).is_err());
        let t = NaiveTime::from_hms_opt(1, 0, 0).expect("time");
        assert!(param(&Value::Time(t, Some(3600))).is_err());
        let far = NaiveDate::from_ymd_opt(10_000, 1, 1).expect("date");
        assert!(param(&Value::Date(far)).is_err());
        assert!(param(&Value::Decimal("NaN".into())).is_err());
        assert!(param(&Value::Decimal("1e40".into())).is_err());
        assert!(param(&Value::Decimal("0.12345678901234567890123456789012345678".into())).is_err());
        assert_eq!(
            param(&Value::UInt(u64::MAX)).expect("fits a decimal"),
            ColumnData::Numeric(Some(Numeric::new_with_scale(i128::from(u64::MAX), 0)))
        );
        assert_eq!(param(&Value::UInt(7)).expect("fits bigint"), ColumnData::I64(Some(7)));
    }

    #[test]
    fn decimal_parameters_keep_their_scale() {
        let parts = |s: &str| numeric(s).map(|n| (n.value(), n.scale()));
        assert_eq!(parts("12.34"), Ok((1234, 2)));
        assert_eq!(parts("-0.5"), Ok((-5, 1)));
        assert_eq!(parts("+7"), Ok((7, 0)));
        assert_eq!(parts(".5"), Ok((5, 1)));
        assert_eq!(parts("5."), Ok((5, 0)));
        assert_eq!(parts("1.5e3"), Ok((1500, 0)));
        assert_eq!(parts("15E-4"), Ok((15, 4)));
        // Trailing zeros go only as far as SQL Server's limits require.
        assert_eq!(
            parts("0.10000000000000000000000000000000000000000"),
            Ok((10i128.pow(36), 37))
        );
        assert_eq!(parts("12.30"), Ok((1230, 2)));
        assert_eq!(
            parts("12345678901234567890123456789012345678"),
            Ok((12345678901234567890123456789012345678, 0))
        );
        assert!(parts("123456789012345678901234567890123456789").is_err(), "39 digits");
        assert!(parts("Infinity").is_err());
    }

    #[test]
    fn placeholders_are_counted_outside_literals_and_comments() {
        assert_eq!(placeholder_count("SELECT 1"), 0);
        assert_eq!(placeholder_count("SELECT @P1 + @P2"), 2);
        assert_eq!(placeholder_count("SELECT @p3"), 3, "gaps count up to the highest");
        assert_eq!(placeholder_count("INSERT INTO t VALUES (@P1,@P2,@P10)"), 10);
        assert_eq!(
            placeholder_count("SELECT '@P9', N'it''s @P8', [@P7], \"@P6\" FROM t WHERE a = @P1"),
            1
        );
        assert_eq!(placeholder_count("SELECT @P1 -- @P5\n, @P2 /* @P6 /* @P7 */ @P8 */"), 2);
        assert_eq!(placeholder_count("SELECT @@PACK_RECEIVED, @Price, @P1x, x@P4"), 0);
        assert_eq!(placeholder_count("SELECT 'unterminated @P3"), 0);
        assert_eq!(placeholder_count("SELECT @P"), 0);
        assert_eq!(placeholder_count("SELECT [a]]@P2] FROM t WHERE id = @P1"), 1);
        assert_eq!(placeholder_count("SELECT [a]]] + [b]]]]] + @P2"), 2);
        assert_eq!(
            placeholder_count("SELECT ✓@P2, @P1"),
            1,
            "non-ASCII letters are identifier characters"
        );
    }
}

//! MySQL/MariaDB type mapping (binary protocol). Sessions run with
//! `time_zone = '+00:00'`, so TIMESTAMP values are UTC instants.

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};
use mysql_async::consts::{ColumnFlags, ColumnType as My};
use mysql_async::Value as MyValue;

use crate::backend::types::special_decimal;
use crate::backend::{Column, ColumnType, Value};

/// MySQL's character set number for binary strings.
const BINARY_CHARSET: u16 = 63;

/// How the values of one result column are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    Int,
    UInt,
    Float,
    /// FLOAT: single precision (read from text as such, as the binary protocol sends it).
    Single,
    Decimal,
    Text,
    Bytes,
    Bit,
    Date,
    DateTime,
    Timestamp,
    Time,
    Json,
    Null,
}

pub fn column(c: &mysql_async::Column) -> (Column, Decode) {
    let flags = c.flags();
    let unsigned = flags.contains(ColumnFlags::UNSIGNED_FLAG);
    let binary = c.character_set() == BINARY_CHARSET;
    let (native, ty, decode) = match c.column_type() {
        My::MYSQL_TYPE_TINY => ("TINYINT", ColumnType::Int, Decode::Int),
        My::MYSQL_TYPE_SHORT => ("SMALLINT", ColumnType::Int, Decode::Int),
        My::MYSQL_TYPE_INT24 => ("MEDIUMINT", ColumnType::Int, Decode::Int),
        My::MYSQL_TYPE_LONG => ("INT", ColumnType::Int, Decode::Int),
        // Only BIGINT UNSIGNED can exceed int64.
        My::MYSQL_TYPE_LONGLONG if unsigned => ("BIGINT", ColumnType::UInt, Decode::UInt),
        My::MYSQL_TYPE_LONGLONG => ("BIGINT", ColumnType::Int, Decode::Int),
        My::MYSQL_TYPE_YEAR => ("YEAR", ColumnType::Int, Decode::Int),
        My::MYSQL_TYPE_FLOAT => ("FLOAT", ColumnType::Float, Decode::Single),
        My::MYSQL_TYPE_DOUBLE => ("DOUBLE", ColumnType::Float, Decode::Float),
        My::MYSQL_TYPE_DECIMAL | My::MYSQL_TYPE_NEWDECIMAL => ("DECIMAL", ColumnType::Decimal, Decode::Decimal),
        My::MYSQL_TYPE_DATE | My::MYSQL_TYPE_NEWDATE => ("DATE", ColumnType::Date, Decode::Date),
        My::MYSQL_TYPE_DATETIME | My::MYSQL_TYPE_DATETIME2 => ("DATETIME", ColumnType::Timestamp, Decode::DateTime),
        My::MYSQL_TYPE_TIMESTAMP | My::MYSQL_TYPE_TIMESTAMP2 => {
            ("TIMESTAMP", ColumnType::TimestampTz, Decode::Timestamp)
        }
        My::MYSQL_TYPE_TIME | My::MYSQL_TYPE_TIME2 => ("TIME", ColumnType::Time, Decode::Time),
        My::MYSQL_TYPE_BIT => ("BIT", ColumnType::UInt, Decode::Bit),
        My::MYSQL_TYPE_JSON => ("JSON", ColumnType::Json, Decode::Json),
        My::MYSQL_TYPE_NULL => ("NULL", ColumnType::Dynamic, Decode::Null),
        My::MYSQL_TYPE_GEOMETRY => ("GEOMETRY", ColumnType::Bytes, Decode::Bytes),
        _ if flags.contains(ColumnFlags::ENUM_FLAG) => ("ENUM", ColumnType::String, Decode::Text),
        _ if flags.contains(ColumnFlags::SET_FLAG) => ("SET", ColumnType::String, Decode::Text),
        My::MYSQL_TYPE_TINY_BLOB | My::MYSQL_TYPE_MEDIUM_BLOB | My::MYSQL_TYPE_LONG_BLOB | My::MYSQL_TYPE_BLOB => {
            if binary {
                ("BLOB", ColumnType::Bytes, Decode::Bytes)
            } else {
                ("TEXT", ColumnType::String, Decode::Text)
            }
        }
        My::MYSQL_TYPE_STRING => {
            if binary {
                ("BINARY", ColumnType::Bytes, Decode::Bytes)
            } else {
                ("CHAR", ColumnType::String, Decode::Text)
            }
        }
        _ => {
            if binary {
                ("VARBINARY", ColumnType::Bytes, Decode::Bytes)
            } else {
                ("VARCHAR", ColumnType::String, Decode::Text)
            }
        }
    };
    // MariaDB flags TIMESTAMP, YEAR and BIT columns UNSIGNED too.
    let numeric = matches!(
        decode,
        Decode::Int | Decode::UInt | Decode::Float | Decode::Single | Decode::Decimal
    ) && native != "YEAR";
    let native = if unsigned && numeric {
        format!("{native} UNSIGNED")
    } else {
        native.to_string()
    };
    let mut col = Column::new(c.name_str(), native, ty);
    // A zero date arrives as NULL even in a NOT NULL column.
    col.nullable = !flags.contains(ColumnFlags::NOT_NULL_FLAG)
        || matches!(decode, Decode::Date | Decode::DateTime | Decode::Timestamp);
    if decode == Decode::Decimal {
        // column_length counts digits plus sign and point.
        let scale = i32::from(c.decimals());
        let length = i32::try_from(c.column_length()).unwrap_or(i32::MAX);
        col.precision = Some(length - i32::from(scale > 0) - i32::from(!unsigned));
        col.scale = Some(scale);
    }
    (col, decode)
}

fn date(y: u16, m: u8, d: u8) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(i32::from(y), u32::from(m), u32::from(d))
}

fn time(h: u8, i: u8, s: u8, us: u32) -> Option<NaiveTime> {
    NaiveTime::from_hms_micro_opt(u32::from(h), u32::from(i), u32::from(s), us)
}

fn text(bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|_| "text is not valid UTF-8".to_string())
}

/// Decodes one value. Zero dates ('0000-00-00', and dates with a zero month
/// or day, which MariaDB accepts in some SQL modes) become NULL.
pub fn decode(v: MyValue, as_: Decode) -> Result<Value, String> {
    Ok(match (v, as_) {
        (MyValue::NULL, _) => Value::Null,
        (MyValue::Int(i), Decode::UInt) => Value::UInt(u64::try_from(i).map_err(|_| format!("{i} is negative"))?),
        (MyValue::UInt(u), Decode::UInt | Decode::Bit) => Value::UInt(u),
        (MyValue::Int(i), _) => Value::Int(i),
        (MyValue::UInt(u), _) => Value::Int(i64::try_from(u).map_err(|_| format!("{u} does not fit in int64"))?),
        (MyValue::Float(f), _) => Value::Float(f64::from(f)),
        (MyValue::Double(f), _) => Value::Float(f),
        (MyValue::Bytes(b), Decode::Decimal) => Value::Decimal(text(b)?),
        (MyValue::Bytes(b), Decode::Json) => Value::Json(text(b)?),
        (MyValue::Bytes(b), Decode::Bytes) => Value::Bytes(b),
        (MyValue::Bytes(b), Decode::Bit) => {
            if b.len() > 8 {
                return Err("BIT values wider than 64 bits cannot be represented".into());
            }
            Value::UInt(b.iter().fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte)))
        }
        (MyValue::Bytes(b), _) => Value::Text(text(b)?),
        (MyValue::Date(y, m, d, h, i, s, us), kind) => {
            let Some(day) = date(y, m, d) else {
                // Zero dates, and those with a zero month or day, stand for "no
                // date" (documented); a date that does not exist otherwise
                // (2024-02-31 under ALLOW_INVALID_DATES) is refused.
                if y == 0 || m == 0 || d == 0 {
                    return Ok(Value::Null);
                }
                return Err(format!(
                    "{y:04}-{m:02}-{d:02} is not a date; CAST it AS CHAR to read it as stored"
                ));
            };
            let at = NaiveDateTime::new(day, time(h, i, s, us).ok_or("invalid time of day")?);
            match kind {
                Decode::Date => Value::Date(day),
                Decode::Timestamp => Value::TimestampTz(DateTime::from_naive_utc_and_offset(at, chrono::Utc)),
                _ => Value::Timestamp(at),
            }
        }
        // MySQL's TIME is also a duration (-838:59:59 to 838:59:59): one
        // that is no time of day is an interval, of microseconds only.
        (MyValue::Time(negative, days, h, i, s, us), _) if negative || days > 0 => {
            let seconds = ((i128::from(days) * 24 + i128::from(h)) * 60 + i128::from(i)) * 60 + i128::from(s);
            let microseconds = seconds * 1_000_000 + i128::from(us);
            let microseconds = if negative { -microseconds } else { microseconds };
            Value::Interval {
                months: 0,
                days: 0,
                microseconds: i64::try_from(microseconds).map_err(|_| "TIME out of range")?,
            }
        }
        (MyValue::Time(_, _, h, i, s, us), _) => Value::Time(time(h, i, s, us).ok_or("invalid time of day")?, None),
    })
}

/// Decodes a value of the text protocol, which carries every value as its
/// text, as the same value read through the binary protocol would be.
pub fn decode_text(v: MyValue, as_: Decode) -> Result<Value, String> {
    let MyValue::Bytes(bytes) = v else {
        return decode(v, as_);
    };
    let typed = {
        let s = || std::str::from_utf8(&bytes).map_err(|_| "a value the server sent is not text".to_string());
        let bad = |what: &str| {
            format!(
                "{what} {:?} sent by the server could not be read",
                String::from_utf8_lossy(&bytes)
            )
        };
        match as_ {
            Decode::Int => MyValue::Int(s()?.parse().map_err(|_| bad("integer"))?),
            Decode::UInt => MyValue::UInt(s()?.parse().map_err(|_| bad("integer"))?),
            Decode::Float => MyValue::Double(s()?.parse().map_err(|_| bad("number"))?),
            Decode::Single => MyValue::Float(s()?.parse().map_err(|_| bad("number"))?),
            Decode::Date | Decode::DateTime | Decode::Timestamp => {
                let (y, m, d, h, i, sec, us) = date_time_text(s()?).ok_or_else(|| bad("date"))?;
                MyValue::Date(y, m, d, h, i, sec, us)
            }
            Decode::Time => {
                let (negative, days, h, i, sec, us) = time_text(s()?).ok_or_else(|| bad("time"))?;
                MyValue::Time(negative, days, h, i, sec, us)
            }
            Decode::Decimal | Decode::Text | Decode::Bytes | Decode::Bit | Decode::Json | Decode::Null => {
                MyValue::Bytes(bytes)
            }
        }
    };
    decode(typed, as_)
}

/// `YYYY-MM-DD[ HH:MM:SS[.ffffff]]`, as the server prints DATE, DATETIME
/// and TIMESTAMP values.
fn date_time_text(s: &str) -> Option<(u16, u8, u8, u8, u8, u8, u32)> {
    let (day, at) = s.split_once(' ').unwrap_or((s, "00:00:00"));
    let mut parts = day.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    let (negative, days, h, i, sec, us) = time_text(at)?;
    if negative || days > 0 {
        return None;
    }
    Some((y.parse().ok()?, m.parse().ok()?, d.parse().ok()?, h, i, sec, us))
}

/// `[-]H:MM:SS[.ffffff]`, as the server prints TIME values (the hours may
/// run to 838), as the binary protocol's (negative, days, hours, ...).
fn time_text(s: &str) -> Option<(bool, u32, u8, u8, u8, u32)> {
    let (negative, s) = s.strip_prefix('-').map_or((false, s), |rest| (true, rest));
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    let mut parts = whole.splitn(3, ':');
    let hours: u32 = parts.next()?.parse().ok()?;
    let (i, sec) = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let us = format!("{fraction:0<6}").parse().ok()?;
    Some((negative, hours / 24, u8::try_from(hours % 24).ok()?, i, sec, us))
}

/// An interval as a MySQL TIME, which is also a duration (-838:59:59 to
/// 838:59:59): what a TIME outside one day reads as (see `decode`) binds
/// back. Months have no fixed length, and are refused.
fn interval_as_time(v: &Value) -> Result<(bool, u32, u8, u8, u8, u32), String> {
    const MAX: i128 = (838 * 3600 + 59 * 60 + 59) * 1_000_000 + 999_999;
    let Value::Interval {
        months,
        days,
        microseconds,
    } = *v
    else {
        return Err(format!("a {} is not an interval", v.kind()));
    };
    if months != 0 {
        return Err("MySQL's TIME holds no months (their length varies); send days and time only".into());
    }
    let total = i128::from(days) * 86_400_000_000 + i128::from(microseconds);
    if total.abs() > MAX {
        return Err("outside MySQL's TIME (-838:59:59 to 838:59:59)".into());
    }
    let (negative, total) = (total < 0, total.unsigned_abs());
    let (seconds, micros) = (total / 1_000_000, (total % 1_000_000) as u32);
    let (hours, minutes, seconds) = (seconds / 3600, (seconds / 60 % 60) as u8, (seconds % 60) as u8);
    Ok((
        negative,
        (hours / 24) as u32,
        (hours % 24) as u8,
        minutes,
        seconds,
        micros,
    ))
}

const NO_ARRAY: &str = "MySQL has no array type";
const NO_OFFSET: &str = "MySQL's TIME has no UTC offset; send the time without one";
/// MySQL reads `NaN` or `Infinity` as a decimal as 0, with only a warning.
const NO_SPECIAL_DECIMAL: &str = "MySQL's DECIMAL has no NaN or infinity (it would read 0); send NULL or a number";

/// Converts a parameter; MySQL parses text for the type it expects.
pub fn param(v: &Value) -> Result<MyValue, String> {
    use chrono::{Datelike, Timelike};
    let date = |d: NaiveDate, t: NaiveTime| {
        let year = u16::try_from(d.year())
            .ok()
            .filter(|y| *y <= 9999)
            .ok_or_else(|| format!("year {} is outside MySQL's dates (0000 to 9999)", d.year()))?;
        Ok::<_, String>(MyValue::Date(
            year,
            d.month() as u8,
            d.day() as u8,
            t.hour() as u8,
            t.minute() as u8,
            t.second() as u8,
            t.nanosecond() / 1000,
        ))
    };
    Ok(match v {
        Value::Null => MyValue::NULL,
        Value::Bool(b) => MyValue::Int(i64::from(*b)),
        Value::Int(i) => MyValue::Int(*i),
        Value::UInt(u) => MyValue::UInt(*u),
        Value::Float(f) => MyValue::Double(*f),
        Value::Decimal(s) if special_decimal(s).is_some() => return Err(NO_SPECIAL_DECIMAL.into()),
        Value::Text(s) | Value::Decimal(s) | Value::Json(s) => MyValue::Bytes(s.clone().into_bytes()),
        Value::Bytes(b) => MyValue::Bytes(b.clone()),
        Value::Date(d) => date(*d, NaiveTime::MIN)?,
        Value::Timestamp(t) => date(t.date(), t.time())?,
        Value::TimestampTz(t) => date(t.date_naive(), t.time())?,
        Value::Time(_, Some(_)) => return Err(NO_OFFSET.into()),
        Value::Time(t, None) => MyValue::Time(
            false,
            0,
            t.hour() as u8,
            t.minute() as u8,
            t.second() as u8,
            t.nanosecond() / 1000,
        ),
        Value::Uuid(u) => MyValue::Bytes(u.to_string().into_bytes()),
        Value::Interval { .. } => {
            let (negative, days, h, i, s, us) = interval_as_time(v)?;
            MyValue::Time(negative, days, h, i, s, us)
        }
        Value::List(_) => return Err(NO_ARRAY.into()),
    })
}

/// How `LOAD DATA` receives a column: text it parses itself, or a user
/// variable the statement converts, for what its text input would misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadAs {
    Text,
    /// Binary strings, sent as hex and `UNHEX`ed: raw bytes would be read in the file's character set.
    Hex,
    /// Sent as a number and `CAST` to this type: BIT columns would store
    /// the digits' characters, and YEAR columns read a text `0` as 2000.
    Integer(&'static str),
}

impl LoadAs {
    pub fn of(column: &Column) -> Self {
        let native = column.native_type.to_ascii_lowercase();
        if column.column_type == ColumnType::Bytes {
            LoadAs::Hex
        } else if native.starts_with("bit") {
            LoadAs::Integer("UNSIGNED")
        } else if native.starts_with("year") {
            LoadAs::Integer("SIGNED")
        } else {
            LoadAs::Text
        }
    }
}

/// Why a load would refuse `v` whatever its column (a time with an offset,
/// a year MySQL's dates lack): the parameter conversion's verdict, for the
/// values it can refuse (they convert without copying much).
pub fn refusal(v: &Value) -> Option<String> {
    match v {
        Value::Date(_)
        | Value::Timestamp(_)
        | Value::TimestampTz(_)
        | Value::Time(..)
        | Value::Interval { .. }
        | Value::List(_) => param(v).err(),
        Value::Decimal(s) if special_decimal(s).is_some() => Some(NO_SPECIAL_DECIMAL.into()),
        _ => None,
    }
}

/// Appends a value as `LOAD DATA` reads it in its default text format:
/// `\N` for NULL, else the text MySQL would parse the parameter from
/// (dates, times and micro-seconds as `param` sends them), escaped.
pub fn write_load_text(v: &Value, as_: LoadAs, scratch: &mut String, out: &mut BytesMut) -> Result<(), String> {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let datetime = |s: &mut String, d: NaiveDate, t: NaiveTime| {
        write!(
            s,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
            d.year(),
            d.month(),
            d.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.nanosecond() / 1000
        )
    };
    scratch.clear();
    let mut number = itoa::Buffer::new();
    // Formatting into a String cannot fail: the results of write! are ignored.
    let text: &[u8] = match v {
        Value::Null => {
            out.put_slice(b"\\N");
            return Ok(());
        }
        Value::Decimal(s) if special_decimal(s).is_some() => return Err(NO_SPECIAL_DECIMAL.into()),
        Value::Text(s) | Value::Decimal(s) | Value::Json(s) => s.as_bytes(),
        Value::Bytes(b) => b,
        Value::Int(i) => number.format(*i).as_bytes(),
        Value::UInt(u) => number.format(*u).as_bytes(),
        Value::Bool(true) => b"1",
        Value::Bool(false) => b"0",
        Value::Float(f) => {
            // Shortest text that reads back as the same double.
            let _ = write!(scratch, "{f}");
            scratch.as_bytes()
        }
        Value::Date(d) => {
            let _ = write!(scratch, "{:04}-{:02}-{:02}", d.year(), d.month(), d.day());
            scratch.as_bytes()
        }
        Value::Timestamp(t) => {
            let _ = datetime(scratch, t.date(), t.time());
            scratch.as_bytes()
        }
        Value::TimestampTz(t) => {
            let _ = datetime(scratch, t.date_naive(), t.time());
            scratch.as_bytes()
        }
        Value::Time(_, Some(_)) => return Err(NO_OFFSET.into()),
        Value::Time(t, None) => {
            let _ = write!(
                scratch,
                "{:02}:{:02}:{:02}.{:06}",
                t.hour(),
                t.minute(),
                t.second(),
                t.nanosecond() / 1000
            );
            scratch.as_bytes()
        }
        Value::Uuid(u) => {
            let _ = write!(scratch, "{u}");
            scratch.as_bytes()
        }
        Value::Interval { .. } => {
            let (negative, days, h, i, s, us) = interval_as_time(v)?;
            let sign = if negative { "-" } else { "" };
            let _ = write!(scratch, "{sign}{}:{i:02}:{s:02}.{us:06}", days * 24 + u32::from(h));
            scratch.as_bytes()
        }
        Value::List(_) => return Err(NO_ARRAY.into()),
    };
    if as_ == LoadAs::Hex {
        let start = out.len();
        out.resize(start + 2 * text.len(), 0);
        hex::encode_to_slice(text, &mut out[start..]).map_err(|e| e.to_string())?;
    } else {
        // NUL is a value byte like any other to MySQL.
        crate::backend::bulk::write_escaped(text, Some(b"\\0"), out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_protocol_values_read_as_binary_ones() {
        let read = |s: &str, as_| decode_text(MyValue::Bytes(s.as_bytes().to_vec()), as_);
        assert_eq!(
            read("0000-00-00 00:00:00", Decode::DateTime),
            Ok(Value::Null),
            "a zero date"
        );
        assert_eq!(
            read("2024-02-29", Decode::Date),
            decode(MyValue::Date(2024, 2, 29, 0, 0, 0, 0), Decode::Date)
        );
        assert_eq!(time_text("838:59:59"), Some((false, 34, 22, 59, 59, 0)));
        assert_eq!(time_text("-00:00:01.000005"), Some((true, 0, 0, 0, 1, 5)));
        assert_eq!(time_text("1:2"), None);
        assert_eq!(time_text("00:00:00.1234567"), None, "MySQL has microseconds");
        assert_eq!(date_time_text("2024-01-02 -01:00:00"), None);
        assert!(read("12x", Decode::Int).is_err());
        assert_eq!(read("-12", Decode::Int), Ok(Value::Int(-12)));
        // A FLOAT column's text is a single's: widened as the binary protocol's.
        assert_eq!(read("0.1", Decode::Single), Ok(Value::Float(f64::from(0.1f32))));
        assert_eq!(read("0.1", Decode::Float), Ok(Value::Float(0.1)));
        assert_eq!(read("1.5", Decode::Decimal), Ok(Value::Decimal("1.5".into())));
        assert_eq!(decode_text(MyValue::NULL, Decode::Int), Ok(Value::Null));
    }

    #[test]
    fn decimals_that_are_no_number_are_refused_not_read_as_zero() {
        for s in ["NaN", "Infinity", "-Infinity", "+Infinity"] {
            let v = Value::Decimal(s.into());
            assert!(param(&v).is_err(), "{s}");
            assert!(refusal(&v).is_some(), "{s}");
            let (mut scratch, mut out) = (String::new(), BytesMut::new());
            assert!(
                write_load_text(&v, LoadAs::Text, &mut scratch, &mut out).is_err(),
                "{s}"
            );
        }
        assert!(param(&Value::Decimal("-1.5".into())).is_ok());
        assert!(refusal(&Value::Decimal("12".into())).is_none());
    }

    #[test]
    fn zero_dates_are_null() {
        assert_eq!(
            decode(MyValue::Date(0, 0, 0, 0, 0, 0, 0), Decode::Date).unwrap(),
            Value::Null
        );
        assert_eq!(
            decode(MyValue::Date(2020, 0, 1, 0, 0, 0, 0), Decode::DateTime).unwrap(),
            Value::Null
        );
    }

    #[test]
    fn load_text_is_what_mysql_parses_escaped() {
        use chrono::TimeZone;
        let text = |v: Value, as_: LoadAs| {
            let mut out = BytesMut::new();
            write_load_text(&v, as_, &mut String::new(), &mut out).map(|()| String::from_utf8_lossy(&out).into_owned())
        };
        let day = NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        let at = day.and_hms_micro_opt(13, 14, 15, 500).unwrap();
        let cases = [
            (Value::Null, "\\N"),
            (Value::Bool(true), "1"),
            (Value::Int(-42), "-42"),
            (Value::UInt(u64::MAX), "18446744073709551615"),
            (Value::Float(0.1), "0.1"),
            (Value::Text("a\tb\nc\\d\0e\rf".into()), "a\\tb\\nc\\\\d\\0e\\rf"),
            (Value::Date(day), "2024-02-29"),
            (Value::Timestamp(at), "2024-02-29 13:14:15.000500"),
            (
                Value::TimestampTz(chrono::Utc.from_utc_datetime(&at)),
                "2024-02-29 13:14:15.000500",
            ),
            (Value::Time(at.time(), None), "13:14:15.000500"),
        ];
        for (value, expected) in cases {
            assert_eq!(text(value.clone(), LoadAs::Text).unwrap(), expected, "{value:?}");
        }
        assert_eq!(text(Value::Bytes(vec![0, b'\t', 255]), LoadAs::Hex).unwrap(), "0009ff");
        assert_eq!(text(Value::Text("é".into()), LoadAs::Hex).unwrap(), "c3a9");
        assert_eq!(text(Value::Null, LoadAs::Hex).unwrap(), "\\N");
        assert!(text(Value::List(vec![]), LoadAs::Text).is_err());
        // MySQL's TIME has no offset to keep: refused, not dropped.
        assert!(text(Value::Time(at.time(), Some(3600)), LoadAs::Text).is_err());
        assert!(param(&Value::Time(at.time(), Some(3600))).is_err());
    }

    #[test]
    fn dates_outside_mysqls_years_are_refused() {
        let year = |y| param(&Value::Date(NaiveDate::from_ymd_opt(y, 1, 1).unwrap()));
        assert!(matches!(year(9999), Ok(MyValue::Date(9999, 1, 1, 0, 0, 0, 0))));
        assert!(matches!(year(0), Ok(MyValue::Date(0, 1, 1, 0, 0, 0, 0))));
        for y in [-1, 10_000, 70_000] {
            let err = year(y).expect_err("out of range");
            assert!(err.contains(&y.to_string()), "{err}");
        }
    }

    #[test]
    fn bits_and_unsigned() {
        assert_eq!(
            decode(MyValue::Bytes(vec![1, 0]), Decode::Bit).unwrap(),
            Value::UInt(256)
        );
        assert_eq!(
            decode(MyValue::UInt(u64::MAX), Decode::UInt).unwrap(),
            Value::UInt(u64::MAX)
        );
    }

    #[test]
    fn intervals_bind_as_times_and_come_back_the_same() {
        let hour = 3_600_000_000;
        for microseconds in [
            0,
            1,
            -1,
            25 * hour + 7,
            -(838 * hour + 3_599_999_999),
            838 * hour + 3_599_999_999,
        ] {
            let v = Value::Interval {
                months: 0,
                days: 0,
                microseconds,
            };
            let bound = param(&v).expect("binds");
            let back = decode(bound, Decode::Time).expect("decodes");
            let same = match back {
                Value::Time(t, None) => {
                    use chrono::Timelike;
                    i64::from(t.num_seconds_from_midnight()) * 1_000_000 + i64::from(t.nanosecond() / 1000)
                        == microseconds
                }
                other => other == v,
            };
            assert!(same, "{microseconds}");
        }
        let day = Value::Interval {
            months: 0,
            days: 2,
            microseconds: -hour,
        };
        assert_eq!(param(&day).ok(), Some(MyValue::Time(false, 1, 23, 0, 0, 0)));
        for refused in [(1, 0, 0), (0, 35, 0), (0, 0, 839 * hour)] {
            let v = Value::Interval {
                months: refused.0,
                days: refused.1,
                microseconds: refused.2,
            };
            assert!(param(&v).is_err() && refusal(&v).is_some(), "{v:?}");
        }
        let (mut scratch, mut out) = (String::new(), BytesMut::new());
        let v = Value::Interval {
            months: 0,
            days: 0,
            microseconds: -(25 * hour + 1),
        };
        write_load_text(&v, LoadAs::Text, &mut scratch, &mut out).expect("load text");
        assert_eq!(&out[..], b"-25:00:00.000001");
    }

    #[test]
    fn times_outside_a_day_are_intervals() {
        let interval = |microseconds| Value::Interval {
            months: 0,
            days: 0,
            microseconds,
        };
        let hour = 3_600_000_000;
        assert_eq!(
            decode(MyValue::Time(false, 1, 1, 0, 0, 0), Decode::Time).unwrap(),
            interval(25 * hour)
        );
        assert_eq!(
            decode(MyValue::Time(true, 0, 1, 30, 0, 500_000), Decode::Time).unwrap(),
            interval(-(hour + hour / 2 + 500_000))
        );
        assert_eq!(
            decode(MyValue::Time(true, 34, 22, 59, 59, 0), Decode::Time).unwrap(),
            interval(-(838 * hour + 3_599_000_000))
        );
        assert!(matches!(
            decode(MyValue::Time(false, 0, 23, 59, 59, 0), Decode::Time),
            Ok(Value::Time(_, None))
        ));
    }
}

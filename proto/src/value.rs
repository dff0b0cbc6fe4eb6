//! Conversions into [`Value`] and its human-readable rendering.
//!
//! These live here rather than in the server or client because Rust's orphan
//! rule only allows trait impls for `Value` in the crate that defines it.

use std::fmt;

use crate::v1::value::Kind;
use crate::v1::{Date, Interval, TimeOfDay, Value};

impl Value {
    /// SQL NULL.
    pub fn null() -> Self {
        Kind::Null(true).into()
    }
}

impl From<Kind> for Value {
    fn from(kind: Kind) -> Self {
        Value { kind: Some(kind) }
    }
}

macro_rules! from_via_kind {
    ($($ty:ty => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for Value {
            fn from(v: $ty) -> Self {
                Kind::$variant(v.into()).into()
            }
        })*
    };
}

from_via_kind! {
    i64 => Int64Value,
    i32 => Int64Value,
    u64 => Uint64Value,
    f64 => DoubleValue,
    bool => BoolValue,
    &str => StringValue,
    String => StringValue,
    Vec<u8> => BytesValue,
}

/// Renders a value for people: `NULL`, ISO-8601 dates and times, RFC 3339
/// timestamps in UTC, `\x`-prefixed hex for bytes, `[a, b]` for lists,
/// PostgreSQL-style intervals; text-carried variants (decimal, uuid, json) as
/// they are. An unset `kind` is rendered like NULL, as proto3 decodes it so.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(kind) = &self.kind else {
            return f.write_str("NULL");
        };
        match kind {
            Kind::Null(_) => f.write_str("NULL"),
            Kind::BoolValue(b) => write!(f, "{b}"),
            Kind::Int64Value(i) => write!(f, "{i}"),
            Kind::Uint64Value(u) => write!(f, "{u}"),
            Kind::DoubleValue(d) => fmt_double(f, *d),
            Kind::StringValue(s) | Kind::DecimalValue(s) | Kind::UuidValue(s) | Kind::JsonValue(s) => f.write_str(s),
            Kind::BytesValue(bytes) => {
                f.write_str("\\x")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Kind::DateValue(d) => fmt_date(f, d),
            Kind::TimeValue(t) => fmt_time(f, t),
            Kind::TimestampValue(ts) => write!(f, "{ts}"),
            Kind::IntervalValue(iv) => fmt_interval(f, iv),
            Kind::ListValue(list) => {
                f.write_str("[")?;
                for (i, v) in list.values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Shortest round-trip decimal, switching to exponent notation for very large
/// or small magnitudes (plain `{}` would print 1e300 with 300 zeros).
/// Non-finite values use PostgreSQL's spelling.
fn fmt_double(f: &mut fmt::Formatter<'_>, d: f64) -> fmt::Result {
    if d.is_nan() {
        f.write_str("NaN")
    } else if d.is_infinite() {
        f.write_str(if d > 0.0 { "Infinity" } else { "-Infinity" })
    } else if d != 0.0 && !(1e-5..1e16).contains(&d.abs()) {
        write!(f, "{d:e}")
    } else {
        write!(f, "{d}")
    }
}

/// ISO-8601 year: at least four digits, a sign outside 0..=9999.
fn fmt_date(f: &mut fmt::Formatter<'_>, d: &Date) -> fmt::Result {
    if d.year > 9999 {
        write!(f, "+{}", d.year)?;
    } else if d.year < 0 {
        write!(f, "-{:04}", d.year.unsigned_abs())?;
    } else {
        write!(f, "{:04}", d.year)?;
    }
    write!(f, "-{:02}-{:02}", d.month, d.day)
}

fn fmt_time(f: &mut fmt::Formatter<'_>, t: &TimeOfDay) -> fmt::Result {
    write!(f, "{:02}:{:02}:{:02}", t.hours, t.minutes, t.seconds)?;
    fmt_fraction(f, u64::from(t.nanos.unsigned_abs()), 9)?;
    if let Some(offset) = t.utc_offset_seconds {
        let sign = if offset < 0 { '-' } else { '+' };
        let abs = offset.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", abs / 3600, abs / 60 % 60)?;
        if abs % 60 != 0 {
            write!(f, ":{:02}", abs % 60)?;
        }
    }
    Ok(())
}

/// Writes `.ddd` for a fraction of `digits` decimal places, without trailing
/// zeros; nothing when it is zero.
fn fmt_fraction(f: &mut fmt::Formatter<'_>, fraction: u64, digits: usize) -> fmt::Result {
    if fraction == 0 {
        return Ok(());
    }
    let text = format!("{fraction:0digits$}");
    write!(f, ".{}", text.trim_end_matches('0'))
}

/// PostgreSQL's default `IntervalStyle` (postgres): "1 year 2 mons 3 days
/// 04:05:06.5", where a field that follows a negative one carries an explicit
/// `+`, and a zero interval is "00:00:00".
fn fmt_interval(f: &mut fmt::Formatter<'_>, iv: &Interval) -> fmt::Result {
    let mut is_zero = true;
    let mut is_before = false;
    let fields = [
        (i64::from(iv.months / 12), "year"),
        (i64::from(iv.months % 12), "mon"),
        (i64::from(iv.days), "day"),
    ];
    for (value, unit) in fields {
        if value == 0 {
            continue;
        }
        let space = if is_zero { "" } else { " " };
        let plus = if is_before && value > 0 { "+" } else { "" };
        let plural = if value == 1 { "" } else { "s" };
        write!(f, "{space}{plus}{value} {unit}{plural}")?;
        is_before = value < 0;
        is_zero = false;
    }
    if iv.microseconds != 0 || is_zero {
        let space = if is_zero { "" } else { " " };
        let sign = if iv.microseconds < 0 {
            "-"
        } else if is_before {
            "+"
        } else {
            ""
        };
        let micros = iv.microseconds.unsigned_abs();
        let secs = micros / 1_000_000;
        write!(
            f,
            "{space}{sign}{:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )?;
        fmt_fraction(f, micros % 1_000_000, 6)?;
    }
    Ok(())
}

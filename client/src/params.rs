//! Parsing of query parameters given as text on the command line.

use chrono::{DateTime, Datelike, NaiveDate};
use weir_proto::v1::value::Kind;
use weir_proto::v1::{Date, Value};

/// Parses one parameter.
///
/// An explicit type prefix is `int:`, `uint:`, `float:`, `bool:`, `str:`,
/// `decimal:`, `bytes:` (hex), `date:` (YYYY-MM-DD), `ts:` (RFC 3339),
/// `uuid:` or `json:`; `null` is SQL NULL. Without a prefix the text is an
/// integer if it is one (digits with a leading zero or `+` stay text), else
/// a finite float if it is one, else `true` or `false`, else a string. Integers beyond `i64` become `uint` when they fit
/// and are rejected otherwise, rather than silently rounded to a float.
pub fn parse_param(s: &str) -> Result<Value, String> {
    if s == "null" {
        return Ok(Value::null());
    }
    if let Some((prefix, rest)) = s.split_once(':') {
        if let Some(value) = parse_prefixed(prefix, rest) {
            return value;
        }
    }
    parse_untyped(s)
}

/// `None` when `prefix` is not a type prefix, so that text such as
/// "12:30" or "a:b" stays an untyped value.
fn parse_prefixed(prefix: &str, s: &str) -> Option<Result<Value, String>> {
    let value = match prefix {
        "int" => s.parse::<i64>().map(Value::from).map_err(|e| e.to_string()),
        "uint" => s.parse::<u64>().map(Value::from).map_err(|e| e.to_string()),
        "float" => s.parse::<f64>().map(Value::from).map_err(|e| e.to_string()),
        "bool" => parse_bool(s).map(Value::from),
        "str" => Ok(Value::from(s)),
        "decimal" => parse_decimal(s),
        "bytes" => hex::decode(s).map(Value::from).map_err(|e| e.to_string()),
        "date" => parse_date(s),
        "ts" => parse_timestamp(s),
        "uuid" => parse_uuid(s),
        "json" => serde_json::from_str::<serde_json::Value>(s)
            .map(|_| Kind::JsonValue(s.to_owned()).into())
            .map_err(|e| e.to_string()),
        _ => return None,
    };
    Some(value.map_err(|e| format!("invalid {prefix} parameter {s:?}: {e}")))
}

fn parse_untyped(s: &str) -> Result<Value, String> {
    // Digits with a leading zero or plus sign (a zip code, a phone number)
    // stay text: as a number they would lose what was typed.
    let digits = s.strip_prefix('-').unwrap_or(s);
    if s.starts_with('+') || (digits.len() > 1 && digits.starts_with('0') && looks_like_integer(digits)) {
        return Ok(s.into());
    }
    if let Ok(i) = s.parse::<i64>() {
        return Ok(i.into());
    }
    if looks_like_integer(s) {
        return s
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| format!("integer {s} is out of range; use a decimal: or float: prefix"));
    }
    // Rust also parses "inf" and "nan"; those are more likely meant as text.
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite() {
            if !keeps_digits(s, f) {
                return Err(format!(
                    "{s} has more digits than a double keeps; use a decimal: prefix to keep them, or float: to round"
                ));
            }
            return Ok(f.into());
        }
    }
    match s {
        "true" => Ok(true.into()),
        "false" => Ok(false.into()),
        _ => Ok(s.into()),
    }
}

/// Whether the double `f` read from `s` keeps every digit typed: its
/// shortest decimal form has the same significant digits.
pub(crate) fn keeps_digits(s: &str, f: f64) -> bool {
    fn digits(mantissa: &str) -> String {
        let all: String = mantissa.chars().filter(char::is_ascii_digit).collect();
        all.trim_start_matches('0').trim_end_matches('0').to_owned()
    }
    let typed = s.split(['e', 'E']).next().unwrap_or(s);
    let shortest = format!("{f:e}");
    digits(typed) == digits(shortest.split('e').next().unwrap_or(&shortest))
}

fn looks_like_integer(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "on" | "1" => Ok(true),
        "false" | "f" | "no" | "n" | "off" | "0" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// Checks the syntax only; the text is sent unchanged so no digit is lost.
fn parse_decimal(s: &str) -> Result<Value, String> {
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    // In any case here, spelled as the server reads them.
    if let Some(name) = ["NaN", "Infinity"]
        .iter()
        .find(|name| unsigned.eq_ignore_ascii_case(name))
    {
        let sign = &s[..s.len() - unsigned.len()];
        return Ok(Kind::DecimalValue(format!("{sign}{name}")).into());
    }
    let (mantissa, exponent) = unsigned.split_once(['e', 'E']).unwrap_or((unsigned, "0"));
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let is_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    let numeric =
        is_digits(int) && is_digits(frac) && !(int.is_empty() && frac.is_empty()) && exponent.parse::<i32>().is_ok();
    if numeric {
        Ok(Kind::DecimalValue(s.to_owned()).into())
    } else {
        Err("expected digits with an optional sign, point and exponent, or NaN".into())
    }
}

fn parse_date(s: &str) -> Result<Value, String> {
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|e| e.to_string())?;
    Ok(Kind::DateValue(Date {
        year: date.year(),
        // Both are at most 31, so the conversions cannot fail.
        month: date.month() as i32,
        day: date.day() as i32,
    })
    .into())
}

fn parse_timestamp(s: &str) -> Result<Value, String> {
    let ts = DateTime::parse_from_rfc3339(s).map_err(|e| e.to_string())?;
    let nanos = i32::try_from(ts.timestamp_subsec_nanos()).map_err(|e| e.to_string())?;
    let mut timestamp = prost_types::Timestamp {
        seconds: ts.timestamp(),
        nanos,
    };
    // A leap second (":60") arrives as nanos past one second.
    timestamp.normalize();
    Ok(Kind::TimestampValue(timestamp).into())
}

/// Accepts the hyphenated form in either case and sends it in the canonical
/// lower case.
fn parse_uuid(s: &str) -> Result<Value, String> {
    let valid = s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if valid {
        Ok(Kind::UuidValue(s.to_ascii_lowercase()).into())
    } else {
        Err("expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> Kind {
        parse_param(s)
            .unwrap_or_else(|e| panic!("{s:?} did not parse: {e}"))
            .kind
            .unwrap_or_else(|| panic!("{s:?} parsed to a value without kind"))
    }

    fn error(s: &str) -> String {
        match parse_param(s) {
            Ok(v) => panic!("{s:?} parsed to {v:?}"),
            Err(e) => e,
        }
    }

    fn string(s: &str) -> Kind {
        Kind::StringValue(s.to_owned())
    }

    #[test]
    fn untyped_values_take_the_first_matching_type() {
        assert_eq!(kind("42"), Kind::Int64Value(42));
        assert_eq!(kind("-7"), Kind::Int64Value(-7));
        assert_eq!(kind("+7"), string("+7"));
        assert_eq!(kind("+15551234567"), string("+15551234567"));
        assert_eq!(kind("00123"), string("00123"));
        assert_eq!(kind("-007"), string("-007"));
        assert_eq!(kind("0"), Kind::Int64Value(0));
        assert_eq!(kind("0.5"), Kind::DoubleValue(0.5));
        assert_eq!(kind("9223372036854775807"), Kind::Int64Value(i64::MAX));
        assert_eq!(kind("1.5"), Kind::DoubleValue(1.5));
        assert_eq!(kind("-1e3"), Kind::DoubleValue(-1000.0));
        assert_eq!(kind("true"), Kind::BoolValue(true));
        assert_eq!(kind("false"), Kind::BoolValue(false));
        assert_eq!(kind("null"), Kind::Null(true));
        assert_eq!(kind("hello"), string("hello"));
        assert_eq!(kind(""), string(""));
        assert_eq!(kind("TRUE"), string("TRUE"));
        assert_eq!(kind("NULL"), string("NULL"));
    }

    #[test]
    fn untyped_numbers_a_double_would_round_are_refused() {
        assert!(error("12345678901234567.89").contains("decimal:"));
        assert!(error("1.0000000000000001").contains("decimal:"));
        assert_eq!(kind("3.141592653589793"), Kind::DoubleValue(std::f64::consts::PI));
        assert_eq!(kind("0.1"), Kind::DoubleValue(0.1));
        assert_eq!(kind("1.50"), Kind::DoubleValue(1.5));
        assert_eq!(kind("2.5e-300"), Kind::DoubleValue(2.5e-300));
        assert_eq!(
            kind("decimal:12345678901234567.89"),
            Kind::DecimalValue("12345678901234567.89".into())
        );
    }

    #[test]
    fn untyped_text_that_only_rust_reads_as_a_float_stays_text() {
        assert_eq!(kind("nan"), string("nan"));
        assert_eq!(kind("inf"), string("inf"));
        assert_eq!(kind("Infinity"), string("Infinity"));
    }

    #[test]
    fn untyped_text_with_a_colon_but_no_type_prefix_stays_text() {
        assert_eq!(kind("12:30"), string("12:30"));
        assert_eq!(kind("a:b"), string("a:b"));
        assert_eq!(kind("http://x"), string("http://x"));
    }

    #[test]
    fn untyped_integers_beyond_i64_are_never_rounded() {
        assert_eq!(kind("18446744073709551615"), Kind::Uint64Value(u64::MAX));
        assert!(error("18446744073709551616").contains("out of range"));
        assert!(error("-9223372036854775809").contains("out of range"));
    }

    #[test]
    fn numeric_prefixes() {
        assert_eq!(kind("int:-5"), Kind::Int64Value(-5));
        assert_eq!(kind("uint:18446744073709551615"), Kind::Uint64Value(u64::MAX));
        assert_eq!(kind("float:2"), Kind::DoubleValue(2.0));
        assert!(matches!(kind("float:NaN"), Kind::DoubleValue(f) if f.is_nan()));
        assert!(error("int:1.5").starts_with("invalid int parameter \"1.5\": "));
        assert!(error("uint:-1").starts_with("invalid uint parameter"));
        assert!(error("float:x").starts_with("invalid float parameter"));
    }

    #[test]
    fn bool_prefix_accepts_common_spellings() {
        for s in ["bool:true", "bool:T", "bool:yes", "bool:on", "bool:1"] {
            assert_eq!(kind(s), Kind::BoolValue(true), "{s}");
        }
        for s in ["bool:false", "bool:F", "bool:no", "bool:off", "bool:0"] {
            assert_eq!(kind(s), Kind::BoolValue(false), "{s}");
        }
        assert!(error("bool:maybe").starts_with("invalid bool parameter"));
    }

    #[test]
    fn str_prefix_keeps_the_rest_verbatim() {
        assert_eq!(kind("str:42"), string("42"));
        assert_eq!(kind("str:null"), string("null"));
        assert_eq!(kind("str:"), string(""));
        assert_eq!(kind("str:int:1"), string("int:1"));
    }

    #[test]
    fn decimal_prefix_checks_syntax_and_keeps_the_text() {
        for s in [
            "-12345.6789",
            "0.10",
            "+1",
            "1.",
            ".5",
            "1e-3",
            "2E+10",
            "NaN",
            "-Infinity",
        ] {
            assert_eq!(kind(&format!("decimal:{s}")), Kind::DecimalValue(s.to_owned()));
        }
        // The server reads these spellings only.
        assert_eq!(kind("decimal:-infinity"), Kind::DecimalValue("-Infinity".into()));
        assert_eq!(kind("decimal:nan"), Kind::DecimalValue("NaN".into()));
        for s in ["", ".", "-", "1,5", "1e", "1.2.3", "abc", "0x10"] {
            assert!(
                error(&format!("decimal:{s}")).starts_with("invalid decimal parameter"),
                "{s}"
            );
        }
    }

    #[test]
    fn bytes_prefix_takes_hex() {
        assert_eq!(kind("bytes:00fF10"), Kind::BytesValue(vec![0, 255, 16]));
        assert_eq!(kind("bytes:"), Kind::BytesValue(vec![]));
        assert!(error("bytes:abc").starts_with("invalid bytes parameter"));
        assert!(error("bytes:zz").starts_with("invalid bytes parameter"));
    }

    #[test]
    fn date_prefix() {
        assert_eq!(
            kind("date:2024-02-29"),
            Kind::DateValue(Date {
                year: 2024,
                month: 2,
                day: 29
            })
        );
        assert!(error("date:2023-02-29").starts_with("invalid date parameter"));
        assert!(error("date:29.02.2024").starts_with("invalid date parameter"));
    }

    #[test]
    fn ts_prefix_takes_rfc3339_with_any_offset() {
        let ts = |seconds, nanos| Kind::TimestampValue(prost_types::Timestamp { seconds, nanos });
        assert_eq!(kind("ts:2023-11-14T22:13:20Z"), ts(1_700_000_000, 0));
        assert_eq!(kind("ts:2023-11-14T23:13:20.25+01:00"), ts(1_700_000_000, 250_000_000));
        assert_eq!(kind("ts:1969-12-31T23:59:59.5Z"), ts(-1, 500_000_000));
        assert_eq!(kind("ts:2016-12-31T23:59:60Z"), ts(1_483_228_800, 0));
        assert!(error("ts:2023-11-14").starts_with("invalid ts parameter"));
        assert!(error("ts:2023-11-14T22:13:20").starts_with("invalid ts parameter"));
    }

    #[test]
    fn uuid_prefix_canonicalizes_case() {
        assert_eq!(
            kind("uuid:123E4567-E89B-12D3-A456-426614174000"),
            Kind::UuidValue("123e4567-e89b-12d3-a456-426614174000".to_owned())
        );
        for s in [
            "123e4567e89b12d3a456426614174000",
            "123e4567-e89b-12d3-a456-42661417400g",
            "123e4567-e89b-12d3-a456-4266141740000",
        ] {
            assert!(error(&format!("uuid:{s}")).starts_with("invalid uuid parameter"));
        }
    }

    #[test]
    fn json_prefix_validates_and_keeps_the_text() {
        let text = r#"{"a": [1, 2.50, 12345678901234567890123]}"#;
        assert_eq!(kind(&format!("json:{text}")), Kind::JsonValue(text.to_owned()));
        assert_eq!(kind("json:null"), Kind::JsonValue("null".to_owned()));
        assert!(error("json:{").starts_with("invalid json parameter"));
    }
}

use weir_proto::v1::value::Kind;
use weir_proto::v1::{Date, Interval, ListValue, TimeOfDay, Value};

fn show(kind: Kind) -> String {
    Value::from(kind).to_string()
}

fn interval(months: i32, days: i32, microseconds: i64) -> String {
    show(Kind::IntervalValue(Interval {
        months,
        days,
        microseconds,
    }))
}

fn time(hours: i32, minutes: i32, seconds: i32, nanos: i32, offset: Option<i32>) -> String {
    show(Kind::TimeValue(TimeOfDay {
        hours,
        minutes,
        seconds,
        nanos,
        utc_offset_seconds: offset,
    }))
}

fn date(year: i32, month: i32, day: i32) -> String {
    show(Kind::DateValue(Date { year, month, day }))
}

fn timestamp(seconds: i64, nanos: i32) -> String {
    show(Kind::TimestampValue(prost_types::Timestamp { seconds, nanos }))
}

#[test]
fn from_impls_pick_the_matching_variant() {
    assert_eq!(Value::from(1i64).kind, Some(Kind::Int64Value(1)));
    assert_eq!(Value::from(-1i32).kind, Some(Kind::Int64Value(-1)));
    assert_eq!(Value::from(u64::MAX).kind, Some(Kind::Uint64Value(u64::MAX)));
    assert_eq!(Value::from(0.5).kind, Some(Kind::DoubleValue(0.5)));
    assert_eq!(Value::from(true).kind, Some(Kind::BoolValue(true)));
    assert_eq!(Value::from("a").kind, Some(Kind::StringValue("a".into())));
    assert_eq!(Value::from(String::from("b")).kind, Some(Kind::StringValue("b".into())));
    assert_eq!(Value::from(vec![1u8]).kind, Some(Kind::BytesValue(vec![1])));
    assert_eq!(Value::null().kind, Some(Kind::Null(true)));
}

#[test]
fn null_and_unset_kind_show_as_null() {
    assert_eq!(Value::null().to_string(), "NULL");
    assert_eq!(Value { kind: None }.to_string(), "NULL");
}

#[test]
fn scalars() {
    assert_eq!(Value::from(true).to_string(), "true");
    assert_eq!(Value::from(false).to_string(), "false");
    assert_eq!(Value::from(i64::MIN).to_string(), "-9223372036854775808");
    assert_eq!(Value::from(u64::MAX).to_string(), "18446744073709551615");
    assert_eq!(Value::from("naïve, \"quoted\"").to_string(), "naïve, \"quoted\"");
    assert_eq!(show(Kind::DecimalValue("-0.10".into())), "-0.10");
    assert_eq!(
        show(Kind::UuidValue("123e4567-e89b-12d3-a456-426614174000".into())),
        "123e4567-e89b-12d3-a456-426614174000"
    );
    assert_eq!(show(Kind::JsonValue(r#"{"a": 1}"#.into())), r#"{"a": 1}"#);
}

#[test]
fn doubles_are_short_and_exact() {
    assert_eq!(Value::from(1.5).to_string(), "1.5");
    assert_eq!(Value::from(1.0).to_string(), "1");
    assert_eq!(Value::from(-0.1).to_string(), "-0.1");
    assert_eq!(Value::from(0.0).to_string(), "0");
    assert_eq!(Value::from(123456789.125).to_string(), "123456789.125");
    assert_eq!(Value::from(1e300).to_string(), "1e300");
    assert_eq!(Value::from(-2.5e-7).to_string(), "-2.5e-7");
    assert_eq!(Value::from(f64::NAN).to_string(), "NaN");
    assert_eq!(Value::from(f64::INFINITY).to_string(), "Infinity");
    assert_eq!(Value::from(f64::NEG_INFINITY).to_string(), "-Infinity");
}

#[test]
fn bytes_are_backslash_x_hex() {
    assert_eq!(Value::from(vec![0xde, 0xad, 0x01]).to_string(), "\\xdead01");
    assert_eq!(Value::from(Vec::new()).to_string(), "\\x");
}

#[test]
fn dates_are_iso_8601() {
    assert_eq!(date(2024, 2, 29), "2024-02-29");
    assert_eq!(date(33, 1, 1), "0033-01-01");
    assert_eq!(date(-44, 3, 15), "-0044-03-15");
    assert_eq!(date(10000, 1, 1), "+10000-01-01");
}

#[test]
fn times_are_iso_8601_with_trimmed_fractions() {
    assert_eq!(time(9, 5, 0, 0, None), "09:05:00");
    assert_eq!(time(12, 34, 56, 500_000_000, None), "12:34:56.5");
    assert_eq!(time(23, 59, 59, 123_456_789, None), "23:59:59.123456789");
    assert_eq!(time(1, 2, 3, 1_000, None), "01:02:03.000001");
    assert_eq!(time(10, 0, 0, 0, Some(0)), "10:00:00+00:00");
    assert_eq!(time(10, 0, 0, 0, Some(19_800)), "10:00:00+05:30");
    assert_eq!(time(10, 0, 0, 250_000_000, Some(-3_600)), "10:00:00.25-01:00");
    assert_eq!(time(10, 0, 0, 0, Some(-(3_600 + 75))), "10:00:00-01:01:15");
}

#[test]
fn timestamps_are_rfc3339_in_utc() {
    assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00Z");
    assert_eq!(timestamp(1_700_000_000, 123_000_000), "2023-11-14T22:13:20.123Z");
    assert_eq!(timestamp(1_700_000_000, 1_000), "2023-11-14T22:13:20.000001Z");
    assert_eq!(timestamp(-1, 500_000_000), "1969-12-31T23:59:59.500Z");
}

#[test]
fn intervals_look_like_postgresql() {
    assert_eq!(interval(1, 2, 1_500_000), "1 mon 2 days 00:00:01.5");
    assert_eq!(interval(0, 0, 0), "00:00:00");
    assert_eq!(interval(14, 1, 0), "1 year 2 mons 1 day");
    assert_eq!(interval(24, 0, 0), "2 years");
    assert_eq!(interval(0, -1, 0), "-1 days");
    assert_eq!(interval(0, -1, 3_600_000_000), "-1 days +01:00:00");
    assert_eq!(interval(0, 1, -3_600_000_000), "1 day -01:00:00");
    assert_eq!(interval(-14, 0, 0), "-1 years -2 mons");
    assert_eq!(interval(0, 0, -1_500_000), "-00:00:01.5");
    assert_eq!(interval(0, 0, 100 * 3_600_000_000 + 61_000_001), "100:01:01.000001");
    assert_eq!(interval(0, 0, i64::MIN), "-2562047788:00:54.775808");
}

#[test]
fn lists_are_bracketed_and_nest() {
    let list = |values: Vec<Value>| Value::from(Kind::ListValue(ListValue { values }));
    assert_eq!(list(vec![]).to_string(), "[]");
    assert_eq!(
        list(vec![1i64.into(), Value::null(), "a b".into()]).to_string(),
        "[1, NULL, a b]"
    );
    assert_eq!(
        list(vec![
            list(vec![1i64.into(), 2i64.into()]),
            list(vec![3i64.into(), 4i64.into()])
        ])
        .to_string(),
        "[[1, 2], [3, 4]]"
    );
}

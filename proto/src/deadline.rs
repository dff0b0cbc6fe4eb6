//! The `grpc-timeout` header, which carries a call's deadline: read by the
//! server to bound the statement, and by the client to stop waiting.

use std::time::Duration;

/// The header's value ("100m", "5S", ...): up to 8 digits and a unit, as
/// the gRPC spec writes it. Anything else is no deadline.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `timeout` as the header's value: milliseconds while 8 digits hold them
/// (27 hours), whole seconds past that, hours past 8 digits of seconds; at
/// least 1 ms, so that a deadline already passed still reads as one.
pub fn format_grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let millis = timeout.as_millis().max(1);
    if millis <= MAX {
        return format!("{millis}m");
    }
    let secs = u128::from(timeout.as_secs());
    if secs <= MAX {
        return format!("{secs}S");
    }
    format!("{}H", (secs / 3600).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_written_in_the_finest_unit_that_holds_them() {
        for (timeout, sent) in [
            (Duration::ZERO, "1m"),
            (Duration::from_micros(1500), "1m"),
            (Duration::from_secs(5), "5000m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_millis(100_000_000), "100000S"),
            (Duration::from_secs(99_999_999), "99999999S"),
            (Duration::from_secs(100_000_000), "27777H"),
            (Duration::MAX, "99999999H"),
        ] {
            assert_eq!(format_grpc_timeout(timeout), sent, "{timeout:?}");
            assert!(parse_grpc_timeout(sent).is_some(), "{sent}");
        }
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_bad_ones_ignored() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "123456789m", "12x", "-1m", "+1m", "1.5S", "S5", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}

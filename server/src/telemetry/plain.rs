//! The text log's fields and timestamps, written straight into the line.
//!
//! tracing-subscriber's defaults route every field name through ANSI
//! styling (a no-op style when colours are off, but formatted all the
//! same) and format each timestamp field by field. A call's span records
//! seven fields and its audit line is one event: in a profile of point
//! lookups that was about 20,000 instructions per call, a seventh of the
//! gateway's work. The output is the same: `name=value` pairs (strings
//! quoted), the message first and unquoted, RFC 3339 timestamps in UTC with
//! microseconds.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::FormatFields;

/// Fields as `name=value`, separated by spaces.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    fn pad(&mut self) -> fmt::Result {
        if self.first {
            self.first = false;
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // Metadata of events from the `log` crate, already in the line's header.
        if name.starts_with("log.") {
            return;
        }
        // A message that is not text (a number, an error) is written bare too.
        if name == "message" {
            self.result = self.pad().and_then(|()| value(&mut self.writer));
            return;
        }
        self.result = self.write_field(name.strip_prefix("r#").unwrap_or(name), value);
    }

    fn write_field(&mut self, name: &str, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) -> fmt::Result {
        self.pad()?;
        self.writer.write_str(name)?;
        self.writer.write_char('=')?;
        value(&mut self.writer)
    }

    fn message(&mut self, message: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        self.result = self.write_message(message);
    }

    fn write_message(&mut self, message: fmt::Arguments<'_>) -> fmt::Result {
        self.pad()?;
        // Control characters are escaped, as the default formatter does, so
        // that a message cannot move a terminal's cursor or fake a line.
        let sanitize = self.writer.sanitizes_ansi_escapes();
        write!(
            Escaping {
                inner: &mut self.writer,
                sanitize
            },
            "{message}"
        )
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message(format_args!("{value}"));
        } else {
            self.field(field, |w| quoted(w, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let sanitize = self.writer.sanitizes_ansi_escapes();
        self.field(field, |w| {
            let mut out = Escaping { inner: w, sanitize };
            write!(out, "{value}")?;
            let mut source = value.source();
            if source.is_some() {
                write!(out, " {}.sources=[", field.name())?;
                let mut first = true;
                while let Some(s) = source {
                    if !first {
                        out.write_str(", ")?;
                    }
                    first = false;
                    write!(out, "{s}")?;
                    source = s.source();
                }
                out.write_char(']')?;
            }
            Ok(())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message(format_args!("{value:?}"));
        } else {
            let sanitize = self.writer.sanitizes_ansi_escapes();
            self.field(field, |w| write!(Escaping { inner: w, sanitize }, "{value:?}"));
        }
    }
}

/// `value` as `{:?}` writes it. Ids, names and methods are printable ASCII
/// without quotes or backslashes, which need no escaping: copied whole, not
/// checked character by character against Unicode's tables.
fn quoted(w: &mut Writer<'_>, value: &str) -> fmt::Result {
    // Printable ASCII but `"` and `\`, as one pattern of byte ranges: the
    // values of every call's audit line pass through here.
    if value
        .bytes()
        .all(|b| matches!(b, b' ' | b'!' | b'#'..=b'[' | b']'..=b'~'))
    {
        w.write_char('"')?;
        w.write_str(value)?;
        w.write_char('"')
    } else {
        write!(w, "{value:?}")
    }
}

/// Writes through to `W`, escaping (when `sanitize`) the control
/// characters a terminal acts on.
struct Escaping<'a, W: fmt::Write> {
    inner: &'a mut W,
    sanitize: bool,
}

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Line breaks always: a value a tenant chose (an engine's error
        // message) must not start a line that reads as another log line.
        // Printable ASCII, the common case, without decoding characters.
        if s.bytes().all(|b| matches!(b, b' '..=b'~')) {
            return self.inner.write_str(s);
        }
        let sanitize = self.sanitize;
        let plain = |c: char| {
            !(matches!(c, '\n' | '\r')
                || sanitize && matches!(c, '\x07' | '\x08' | '\x0c' | '\x1b' | '\x7f' | '\u{80}'..='\u{9f}'))
        };
        if s.chars().all(plain) {
            return self.inner.write_str(s);
        }
        for c in s.chars() {
            match c {
                c if plain(c) => self.inner.write_char(c)?,
                '\n' => self.inner.write_str("\\n")?,
                '\r' => self.inner.write_str("\\r")?,
                c if c.is_ascii() => write!(self.inner, "\\x{:02x}", c as u32)?,
                c => write!(self.inner, "\\u{{{:x}}}", c as u32)?,
            }
        }
        Ok(())
    }
}

/// RFC 3339 timestamps in UTC with microseconds, as tracing-subscriber's
/// `SystemTime` writes them; the date and time of day are formatted once a
/// second per thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct UtcMicros;

/// The second last formatted on this thread and its text up to the '.'.
type Prefix = (u64, [u8; PREFIX_LEN]);
const PREFIX_LEN: usize = "2026-12-04T05:30:10.".len();
/// 9999-12-31T23:59:59, the last second with a four-digit year.
const LAST_SECOND: u64 = 253_402_300_799;

thread_local! {
    static PREFIX: Cell<Option<Prefix>> = const { Cell::new(None) };
}

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_time(w, SystemTime::now())
    }
}

fn write_time(w: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    // A clock outside 1970-9999 is written as the nearest end of that range.
    let since = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .min(std::time::Duration::from_micros(LAST_SECOND * 1_000_000 + 999_999));
    let second = since.as_secs();
    let prefix = match PREFIX.get() {
        Some((s, text)) if s == second => text,
        _ => {
            let text = prefix(second);
            PREFIX.set(Some((second, text)));
            text
        }
    };
    let mut line = [0u8; PREFIX_LEN + 7];
    line[..PREFIX_LEN].copy_from_slice(&prefix);
    let mut micros = since.subsec_micros();
    for digit in line[PREFIX_LEN..PREFIX_LEN + 6].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    line[PREFIX_LEN + 6] = b'Z';
    w.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
}

/// `YYYY-MM-DDTHH:MM:SS.` of a second since the epoch (years 1970 to 9999).
fn prefix(second: u64) -> [u8; PREFIX_LEN] {
    let (days, in_day) = (second / 86_400, second % 86_400);
    let (year, month, day) = civil_date(days);
    let mut text = [0u8; PREFIX_LEN];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    let _ = std::io::Write::write_fmt(
        &mut cursor,
        format_args!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
            in_day / 3600,
            in_day / 60 % 60,
            in_day % 60
        ),
    );
    text
}

/// Year, month and day of a day since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64, micros: u64) -> String {
        let mut out = String::new();
        write_time(
            &mut out,
            UNIX_EPOCH + Duration::from_micros(seconds * 1_000_000 + micros),
        )
        .expect("format");
        out
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        // A leap day, the last second of a year, and a date in this decade.
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_704_067_199, 999_999), "2023-12-31T23:59:59.999999Z");
        assert_eq!(at(1_796_362_210, 123_456), "2026-12-04T05:30:10.123456Z");
        // The cached second is not reused for another one.
        assert_eq!(at(1_796_362_211, 5), "2026-12-04T05:30:11.000005Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        assert_eq!(at(LAST_SECOND + 10, 0), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn timestamps_match_tracing_subscribers_own() {
        let mut ours = String::new();
        let mut theirs = String::new();
        // Retried when a second boundary falls between the two readings.
        for _ in 0..3 {
            ours.clear();
            theirs.clear();
            UtcMicros.format_time(&mut Writer::new(&mut ours)).expect("ours");
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .expect("theirs");
            if ours[..PREFIX_LEN] == theirs[..PREFIX_LEN] {
                break;
            }
        }
        assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
        assert_eq!(ours[..PREFIX_LEN], theirs[..PREFIX_LEN]);
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("cannot load")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Formats one event with both field formatters and returns (ours, default).
    fn both(event: impl Fn()) -> (String, String) {
        use std::sync::{Arc, Mutex};
        let lines = |fields: bool| {
            let out = Arc::new(Mutex::new(Vec::<u8>::new()));
            let sink = out.clone();
            let writer = move || crate::telemetry::tests::Lines(sink.clone());
            let builder = tracing_subscriber::fmt()
                .with_ansi(false)
                .without_time()
                .with_writer(writer);
            if fields {
                tracing::subscriber::with_default(builder.fmt_fields(PlainFields).finish(), &event);
            } else {
                tracing::subscriber::with_default(builder.finish(), &event);
            }
            let bytes = out.lock().expect("lock").clone();
            String::from_utf8(bytes).expect("utf-8")
        };
        (lines(true), lines(false))
    }

    #[test]
    fn lines_read_as_the_default_formatters_do() {
        let (ours, theirs) = both(|| {
            let span = tracing::info_span!(
                "call",
                request_id = "4711",
                tenant = tracing::field::Empty,
                rows = tracing::field::Empty
            );
            span.record("tenant", "acme");
            span.record("rows", 7_i64);
            let _enter = span.enter();
            let error = Outer(std::io::Error::other("disk full"));
            tracing::info!(
                target: "weir::audit",
                method = "/weir.v1.QueryService/Execute",
                code = ?tonic::Code::Ok,
                duration_ms = 0.25,
                ok = true,
                r#type = 3_u64,
                error = &error as &(dyn std::error::Error + 'static),
                "call"
            );
            tracing::info!(message = 5_u64, answer = -42_i64);
            tracing::info!(message = &error as &(dyn std::error::Error + 'static));
            tracing::warn!(
                sql = "SELECT 'a'",
                quote = "say \"hi\"\\ \n ok",
                accent = "café",
                "a \x1b[31m message\u{9b} with {} escapes",
                2
            );
        });
        assert_eq!(ours, theirs);
        assert!(
            ours.contains(r#"call{request_id="4711" tenant="acme" rows=7}: weir::audit: call method="/weir.v1.QueryService/Execute" code=Ok duration_ms=0.25 ok=true type=3 error=cannot load error.sources=[disk full]"#),
            "{ours}"
        );
        assert!(ours.contains(r"a \x1b[31m message\u{9b} with 2 escapes"), "{ours}");
    }

    #[test]
    fn a_logged_value_cannot_start_a_line_of_its_own() {
        let (ours, _) = both(|| {
            let engine = "duplicate key\n2026-12-05T00:00:00.000000Z  INFO weir::audit: call tenant=\"other\"\r";
            tracing::warn!(error = %engine, "statement failed: {engine}");
        });
        assert_eq!(ours.lines().count(), 1, "{ours}");
        assert!(ours.contains(r"duplicate key\n2026"), "{ours}");
        assert!(ours.contains(r#"other"\r"#), "{ours}");
    }
}

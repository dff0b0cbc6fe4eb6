//! Reading a file to load: CSV with a header line, or JSON Lines (one
//! object per line), converted into typed rows using the table's column
//! types from `DescribeTable`, so that the server receives integers,
//! decimals, dates and so on rather than text. A value that does not parse
//! is reported with its line and column.

use std::io::{self, BufRead, Read};

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde_json::value::RawValue;
use weir_proto::v1::value::Kind;
use weir_proto::v1::{Column, ColumnType, Date, Interval, ListValue, Row, TimeOfDay, Value};

/// A value or line that cannot be loaded, located in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {message}", column.as_ref().map(|c| format!(", column \"{c}\"")).unwrap_or_default())]
pub struct InputError {
    /// 1-based line of the file.
    pub line: u64,
    pub column: Option<String>,
    pub message: String,
}

/// The file's columns matched to the table's (by exact name, else
/// case-insensitively), in file order.
pub fn match_columns(names: &[String], table: &[Column]) -> Result<Vec<Column>, String> {
    names
        .iter()
        .map(|name| {
            table
                .iter()
                .find(|c| c.name == *name)
                .or_else(|| table.iter().find(|c| c.name.eq_ignore_ascii_case(name)))
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<_> = table.iter().map(|c| c.name.as_str()).collect();
                    format!(
                        "the table has no column \"{name}\"; its columns are {}",
                        known.join(", ")
                    )
                })
        })
        .collect()
}

fn value(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

fn null() -> Value {
    value(Kind::Null(true))
}

fn timestamp(s: &str) -> Result<prost_types::Timestamp, String> {
    let utc = DateTime::parse_from_rfc3339(s)
        .map(|t| t.to_utc())
        .or_else(|_| {
            // The last: years past 9999 and before 0, which RFC 3339 cannot
            // write, as weirctl writes them (`+10000-01-01T00:00:00Z`).
            [
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M",
                "%Y-%m-%dT%H:%M:%S%.fZ",
            ]
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
            .map(|t| t.and_utc())
            .ok_or(())
        })
        .map_err(|_| format!("'{s}' is not a timestamp (RFC 3339, or YYYY-MM-DD HH:MM:SS taken as UTC)"))?;
    Ok(prost_types::Timestamp {
        seconds: utc.timestamp(),
        nanos: utc.timestamp_subsec_nanos() as i32,
    })
}

/// A text field as a value of the column's type.
pub fn from_text(text: &str, column: &Column) -> Result<Value, String> {
    let ty = ColumnType::try_from(column.r#type).unwrap_or(ColumnType::String);
    let bad = |what: &str| format!("'{text}' is not {what}");
    Ok(value(match ty {
        ColumnType::Bool => Kind::BoolValue(match text.to_ascii_lowercase().as_str() {
            "true" | "t" | "1" | "yes" | "y" => true,
            "false" | "f" | "0" | "no" | "n" => false,
            _ => return Err(bad("a boolean (true/false, t/f, 1/0)")),
        }),
        ColumnType::Int => Kind::Int64Value(text.trim().parse().map_err(|_| bad("an integer"))?),
        ColumnType::Uint => Kind::Uint64Value(text.trim().parse().map_err(|_| bad("an unsigned integer"))?),
        ColumnType::Float => {
            let t = text.trim();
            let f: f64 = t.parse().map_err(|_| bad("a number"))?;
            // `1e400` parses as infinity: only a spelled-out infinity is one.
            if f.is_infinite() && !t.trim_start_matches(['+', '-']).to_ascii_lowercase().starts_with("inf") {
                return Err(bad("a number a double can hold"));
            }
            Kind::DoubleValue(f)
        }
        ColumnType::Decimal => {
            let t = text.trim();
            t.parse::<f64>().map_err(|_| bad("a decimal number"))?;
            Kind::DecimalValue(t.to_string())
        }
        ColumnType::Bytes => {
            let hex_text = text.strip_prefix("\\x").unwrap_or(text);
            Kind::BytesValue(hex::decode(hex_text).map_err(|_| bad("hex bytes (optionally \\x-prefixed)"))?)
        }
        ColumnType::Date => {
            let d = NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").map_err(|_| bad("a date (YYYY-MM-DD)"))?;
            Kind::DateValue(Date {
                year: chrono::Datelike::year(&d),
                month: chrono::Datelike::month(&d) as i32,
                day: chrono::Datelike::day(&d) as i32,
            })
        }
        // A MySQL `TIME` outside one day is a duration, written as one.
        ColumnType::Time => match (time_of_day(text.trim()), duration(text.trim())) {
            (Some(t), _) => Kind::TimeValue(t),
            (None, Some(d)) => Kind::IntervalValue(d),
            (None, None) => return Err(bad("a time of day (HH:MM:SS[+HH:MM]) or a duration ([-]HHH:MM:SS)")),
        },
        ColumnType::Timestamp | ColumnType::TimestampTz => Kind::TimestampValue(timestamp(text.trim())?),
        ColumnType::Uuid => Kind::UuidValue(text.trim().to_ascii_lowercase()),
        // Checked as JSON text only (a number past a double's range, deep
        // nesting: valid JSON, which a parse into values would refuse).
        ColumnType::Json => {
            serde_json::from_str::<&RawValue>(text).map_err(|e| format!("invalid JSON: {e}"))?;
            Kind::JsonValue(text.to_string())
        }
        ColumnType::List => {
            let parsed: Box<RawValue> =
                serde_json::from_str(text).map_err(|_| bad("a list (a JSON array such as [1,2])"))?;
            return from_json(&parsed, column);
        }
        // A column of no one type (SQLite's): a number written as a number
        // is one, as in JSON input, or as weirctl's CSV writes a double
        // (`3.0`, `1e20`, `1.5e-7`); anything else (`007`, `1.50`, `1e3`)
        // stays text.
        ColumnType::Dynamic => match (text.parse::<i64>(), text.parse::<f64>()) {
            (Ok(i), _) if i.to_string() == text => Kind::Int64Value(i),
            (_, Ok(f)) if f.is_finite() && (f.to_string() == text || crate::output::csv_double(f) == text) => {
                Kind::DoubleValue(f)
            }
            _ => Kind::StringValue(text.to_string()),
        },
        // Text, and types the server parses itself (intervals, network addresses, ...).
        _ => Kind::StringValue(text.to_string()),
    }))
}

/// A time of day, with the UTC offset that weirctl writes after a
/// PostgreSQL `timetz` (`12:34:56.5+02:00`, `-05`, `Z`), if any.
fn time_of_day(text: &str) -> Option<TimeOfDay> {
    let (clock, offset) = match text.rfind(['+', '-']) {
        Some(at) => (&text[..at], Some(offset_seconds(&text[at..])?)),
        None => match text.strip_suffix(['Z', 'z']) {
            Some(clock) => (clock, Some(0)),
            None => (text, None),
        },
    };
    let t = NaiveTime::parse_from_str(clock, "%H:%M:%S%.f")
        .or_else(|_| NaiveTime::parse_from_str(clock, "%H:%M"))
        .ok()?;
    Some(TimeOfDay {
        hours: t.hour() as i32,
        minutes: t.minute() as i32,
        seconds: t.second() as i32,
        nanos: t.nanosecond() as i32,
        utc_offset_seconds: offset,
    })
}

/// A duration as weirctl writes a MySQL `TIME` outside one day
/// (`25:00:00`, `-01:30:00.5`): hours, minutes, seconds and a fraction of
/// up to six digits.
fn duration(text: &str) -> Option<Interval> {
    let (sign, rest) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = rest.split(':');
    let (hours, minutes, seconds) = (parts.next()?, parts.next()?, parts.next()?);
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
    let fits = parts.next().is_none()
        && digits(hours)
        && hours.len() <= 4
        && [minutes, whole].iter().all(|p| p.len() == 2 && digits(p))
        && (fraction.is_empty() || (fraction.len() <= 6 && digits(fraction)));
    if !fits {
        return None;
    }
    let (minutes, whole): (i64, i64) = (minutes.parse().ok()?, whole.parse().ok()?);
    if minutes >= 60 || whole >= 60 {
        return None;
    }
    let micros = format!("{fraction:0<6}").parse::<i64>().ok()?;
    let seconds = hours.parse::<i64>().ok()? * 3600 + minutes * 60 + whole;
    Some(Interval {
        months: 0,
        days: 0,
        microseconds: sign * (seconds * 1_000_000 + micros),
    })
}

/// `+HH`, `+HH:MM` or `+HH:MM:SS` (or `-`) in seconds east of UTC.
fn offset_seconds(text: &str) -> Option<i32> {
    let (sign, rest) = match text.split_at_checked(1)? {
        ("+", rest) => (1, rest),
        ("-", rest) => (-1, rest),
        _ => return None,
    };
    let mut seconds = 0;
    let mut parts = 0;
    for (part, scale) in rest.split(':').zip([3600, 60, 1]) {
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        seconds += part.parse::<i32>().ok()? * scale;
        parts += 1;
    }
    (parts == rest.split(':').count() && seconds < 24 * 3600).then_some(sign * seconds)
}

/// A JSON value, given as its text, as a value of the column's type.
/// Numbers are read from their text, so that no digit is lost to a double
/// on the way (`12345678901234567.89` for a decimal column, an integer past
/// 2^53 for an integer or JSON column).
pub fn from_json(raw: &RawValue, column: &Column) -> Result<Value, String> {
    use serde_json::Value as J;
    let ty = ColumnType::try_from(column.r#type).unwrap_or(ColumnType::String);
    let text = raw.get().trim();
    let misfit = || format!("{text} does not fit a column of type {}", column.native_type);
    // Into a JSON column every value goes as the document it is (the line
    // was read as JSON): a string stays a JSON string, `true` a JSON boolean.
    if ty == ColumnType::Json {
        return Ok(if text == "null" {
            null()
        } else {
            value(Kind::JsonValue(text.to_string()))
        });
    }
    if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        let number = |what: &str| format!("{text} is not {what}");
        // Past a double's range, `parse` gives infinity: refused, as text.
        let double = || match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(f),
            _ => Err(number("a number a double can hold")),
        };
        return Ok(value(match ty {
            ColumnType::Int => Kind::Int64Value(text.parse().map_err(|_| number("a 64-bit integer"))?),
            ColumnType::Uint => Kind::Uint64Value(text.parse().map_err(|_| number("an unsigned integer"))?),
            ColumnType::Decimal => Kind::DecimalValue(text.to_string()),
            ColumnType::Float => Kind::DoubleValue(double()?),
            // A column of no one type (SQLite's): integers stay integers, and
            // a number a double would round goes as a decimal, which the
            // server stores exactly (as text) when a double cannot hold it.
            ColumnType::Dynamic => match (text.parse::<i64>(), text.parse::<u64>(), text.parse::<f64>()) {
                (Ok(i), _, _) => Kind::Int64Value(i),
                (_, Ok(u), _) => Kind::Uint64Value(u),
                (_, _, Ok(f)) if f.is_finite() && crate::params::keeps_digits(text, f) => Kind::DoubleValue(f),
                _ => Kind::DecimalValue(text.to_string()),
            },
            ColumnType::String => Kind::StringValue(text.to_string()),
            _ => return Err(misfit()),
        }));
    }
    if ty == ColumnType::List && text.starts_with('[') {
        let items: Vec<Box<RawValue>> = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let element = Column {
            r#type: column.element_type,
            ..column.clone()
        };
        let values = items.iter().map(|i| from_json(i, &element)).collect::<Result<_, _>>()?;
        return Ok(value(Kind::ListValue(ListValue { values })));
    }
    Ok(
        match serde_json::from_str::<J>(text).map_err(|e| format!("invalid JSON: {e}"))? {
            J::Null => null(),
            // Into text as written (a boolean would be stored as the
            // engine prints one: `t`, `1`); into bytes not at all.
            J::Bool(_) if ty == ColumnType::String => value(Kind::StringValue(text.to_string())),
            J::Bool(_) if ty == ColumnType::Bytes => return Err(misfit()),
            J::Bool(b) => value(Kind::BoolValue(b)),
            // A JSON string is text to a column of no one type: only CSV,
            // which has no strings apart from numbers, reads `42` as one.
            J::String(s) if ty == ColumnType::Dynamic => value(Kind::StringValue(s)),
            J::String(s) => from_text(&s, column)?,
            // Bytes as `weirctl query --format json` writes them.
            J::Object(o) if matches!(ty, ColumnType::Bytes | ColumnType::Dynamic) => match hex_object(&o) {
                Some(bytes) => value(Kind::BytesValue(bytes)),
                None => return Err(format!("{text} is not bytes ({{\"hex\": \"...\"}} or a hex string)")),
            },
            // An object or array as written, numbers and all.
            _ if ty == ColumnType::String => value(Kind::StringValue(text.to_string())),
            _ => return Err(misfit()),
        },
    )
}

/// The bytes of `{"hex": "..."}`.
fn hex_object(object: &serde_json::Map<String, serde_json::Value>) -> Option<Vec<u8>> {
    match object.get("hex") {
        Some(serde_json::Value::String(text)) if object.len() == 1 => hex::decode(text).ok(),
        _ => None,
    }
}

/// A source of rows: the column names it carries and the rows themselves.
pub trait RowReader: Send {
    fn column_names(&self) -> &[String];
    /// The next row, converted for `columns` (the table's columns in file order).
    fn next_row(&mut self, columns: &[Column]) -> Option<Result<Row, InputError>>;
    /// Bytes read so far.
    fn bytes_read(&self) -> u64;
    /// The input line the last row read starts on (1-based).
    fn row_line(&self) -> u64;
}

/// Where each row of a load starts in its input, for the server's row
/// indexes (which count rows from 0): kept only where a row's line is not
/// the last row's plus one (a line break inside a quoted field, a blank
/// line), so it stays small however many rows a load has.
#[derive(Debug, Default, Clone)]
pub struct RowLines {
    /// (row index, its line less its index) from that row on.
    offsets: Vec<(u64, u64)>,
}

impl RowLines {
    /// Records that row `row` starts on line `line`.
    pub fn record(&mut self, row: u64, line: u64) {
        let offset = line.saturating_sub(row);
        if self.offsets.last().is_none_or(|&(_, last)| last != offset) {
            self.offsets.push((row, offset));
        }
    }

    /// The line row `row` starts on; rows past the last one recorded are
    /// taken to follow it line by line.
    pub fn line_of(&self, row: u64) -> Option<u64> {
        let at = self.offsets.partition_point(|&(r, _)| r <= row);
        at.checked_sub(1).map(|i| row + self.offsets[i].1)
    }
}

/// CSV (RFC 4180) with a header line. An unquoted field equal to the NULL
/// marker is NULL; a quoted one never is, so `""` stays an empty string
/// (as PostgreSQL's CSV COPY reads it, and as `weirctl query --format csv`
/// writes them).
pub struct CsvReader<R: Read> {
    input: io::BufReader<R>,
    names: Vec<String>,
    /// The record just read: each field, and whether it was quoted.
    fields: Vec<(String, bool)>,
    null_marker: String,
    /// Lines read so far, and bytes.
    line: u64,
    bytes: u64,
    buffer: String,
    /// The first line of the last row read.
    row_line: u64,
}

impl<R: Read + Send> CsvReader<R> {
    pub fn new(input: R, null_marker: &str) -> Result<Self, InputError> {
        let mut reader = Self {
            input: io::BufReader::new(input),
            names: Vec::new(),
            fields: Vec::new(),
            null_marker: null_marker.to_string(),
            line: 0,
            bytes: 0,
            buffer: String::new(),
            row_line: 0,
        };
        if reader.read_record()?.is_none() {
            return Err(InputError {
                line: 1,
                column: None,
                message: "cannot read the CSV header: the input is empty".into(),
            });
        }
        reader.names = reader.fields.drain(..).map(|(name, _)| name).collect();
        Ok(reader)
    }

    /// Appends the next line to the buffer; 0 at the end of the input.
    fn read_line(&mut self) -> Result<usize, InputError> {
        let n = self.input.read_line(&mut self.buffer).map_err(|e| InputError {
            line: self.line + 1,
            column: None,
            message: format!("cannot read the input: {e}"),
        })?;
        if n > 0 {
            // Spreadsheets write UTF-8 CSV with a byte-order mark first: it
            // goes before parsing, so that a quoted first name stays quoted.
            if self.line == 0 && self.buffer.starts_with('\u{feff}') {
                self.buffer.drain(..'\u{feff}'.len_utf8());
            }
            self.line += 1;
            self.bytes += n as u64;
        }
        Ok(n)
    }

    /// Reads the next record into `fields`, skipping blank lines (except
    /// with one column, where a blank line is a NULL, as PostgreSQL's CSV
    /// COPY reads it and `weirctl query --format csv` writes it); its first
    /// line, or `None` at the end of the input.
    fn read_record(&mut self) -> Result<Option<u64>, InputError> {
        self.fields.clear();
        loop {
            self.buffer.clear();
            if self.read_line()? == 0 {
                return Ok(None);
            }
            if self.names.len() == 1 || !self.buffer.trim_end_matches(['\r', '\n']).is_empty() {
                break;
            }
        }
        let first = self.line;
        let (mut field, mut quoted, mut in_quotes, mut at) = (String::new(), false, false, 0);
        loop {
            let Some(c) = self.buffer[at..].chars().next() else {
                if in_quotes {
                    // A quoted field goes on across lines.
                    if self.read_line()? == 0 {
                        return Err(InputError {
                            line: first,
                            column: None,
                            message: "a quoted field is not closed before the end of the input".into(),
                        });
                    }
                    continue;
                }
                // The last line, without a line break.
                self.fields.push((field, quoted));
                return Ok(Some(first));
            };
            at += c.len_utf8();
            let next = self.buffer[at..].chars().next();
            if in_quotes {
                match (c, next) {
                    ('"', Some('"')) => {
                        field.push('"');
                        at += 1;
                    }
                    ('"', _) => in_quotes = false,
                    _ => field.push(c),
                }
                continue;
            }
            match (c, next) {
                ('"', _) if field.is_empty() && !quoted => {
                    quoted = true;
                    in_quotes = true;
                }
                (',', _) => self
                    .fields
                    .push((std::mem::take(&mut field), std::mem::take(&mut quoted))),
                ('\n', _) | ('\r', Some('\n') | None) => {
                    self.fields.push((field, quoted));
                    return Ok(Some(first));
                }
                _ => field.push(c),
            }
        }
    }
}

impl<R: Read + Send> RowReader for CsvReader<R> {
    fn column_names(&self) -> &[String] {
        &self.names
    }

    fn next_row(&mut self, columns: &[Column]) -> Option<Result<Row, InputError>> {
        let line = match self.read_record() {
            Ok(None) => return None,
            Ok(Some(line)) => line,
            Err(e) => return Some(Err(e)),
        };
        self.row_line = line;
        if self.fields.len() != columns.len() {
            return Some(Err(InputError {
                line,
                column: None,
                message: format!("{} fields, but the header names {}", self.fields.len(), columns.len()),
            }));
        }
        let values = self
            .fields
            .iter()
            .zip(columns)
            .map(|((field, quoted), c)| {
                if !quoted && *field == self.null_marker {
                    return Ok(null());
                }
                from_text(field, c).map_err(|message| InputError {
                    line,
                    column: Some(c.name.clone()),
                    message,
                })
            })
            .collect::<Result<_, _>>();
        Some(values.map(|values| Row { values }))
    }

    fn bytes_read(&self) -> u64 {
        self.bytes
    }

    fn row_line(&self) -> u64 {
        self.row_line
    }
}

/// One line's object, each value kept as its text (keys in sorted order).
type JsonObject = std::collections::BTreeMap<String, Box<RawValue>>;

pub struct JsonLinesReader<R: BufRead> {
    lines: R,
    names: Vec<String>,
    /// The first object, read to learn the column names.
    first: Option<JsonObject>,
    line: u64,
    bytes: u64,
    buffer: String,
}

impl<R: BufRead + Send> JsonLinesReader<R> {
    /// Reads the first object: its keys are the columns of the load.
    pub fn new(lines: R) -> Result<Self, InputError> {
        let mut reader = Self {
            lines,
            names: Vec::new(),
            first: None,
            line: 0,
            bytes: 0,
            buffer: String::new(),
        };
        if let Some(first) = reader.read_object().transpose()? {
            reader.names = first.keys().cloned().collect();
            reader.first = Some(first);
        }
        Ok(reader)
    }

    fn read_object(&mut self) -> Option<Result<JsonObject, InputError>> {
        loop {
            self.buffer.clear();
            let n = match self.lines.read_line(&mut self.buffer) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) => {
                    return Some(Err(InputError {
                        line: self.line + 1,
                        column: None,
                        message: e.to_string(),
                    }))
                }
            };
            self.line += 1;
            self.bytes += n as u64;
            if self.buffer.trim().is_empty() {
                continue;
            }
            // A byte-order mark (Windows tools write one) is not part of the object.
            let line = self.buffer.trim_start_matches('\u{feff}').trim_start();
            return Some(match serde_json::from_str::<JsonObject>(line) {
                Ok(map) => Ok(map),
                Err(_) if !line.starts_with('{') => Err(InputError {
                    line: self.line,
                    column: None,
                    message: "each line must be a JSON object".into(),
                }),
                Err(e) => Err(InputError {
                    line: self.line,
                    column: None,
                    message: format!("invalid JSON: {e}"),
                }),
            });
        }
    }
}

impl<R: BufRead + Send> RowReader for JsonLinesReader<R> {
    fn column_names(&self) -> &[String] {
        &self.names
    }

    fn next_row(&mut self, columns: &[Column]) -> Option<Result<Row, InputError>> {
        let object = match self.first.take() {
            Some(first) => first,
            None => match self.read_object()? {
                Ok(o) => o,
                Err(e) => return Some(Err(e)),
            },
        };
        let line = self.line;
        if let Some(extra) = object.keys().find(|k| !self.names.contains(k)) {
            return Some(Err(InputError {
                line,
                column: Some(extra.clone()),
                message: "a key the first line does not have".into(),
            }));
        }
        let values = self
            .names
            .iter()
            .zip(columns)
            .map(|(name, c)| {
                // A missing key is not taken for NULL: an upsert would overwrite
                // the stored value with it, and an insert skip the column's default.
                object
                    .get(name)
                    .map_or_else(
                        || Err("a key the first line has is missing (write null for NULL)".to_string()),
                        |j| from_json(j, c),
                    )
                    .map_err(|message| InputError {
                        line,
                        column: Some(c.name.clone()),
                        message,
                    })
            })
            .collect::<Result<_, _>>();
        Some(values.map(|values| Row { values }))
    }

    fn bytes_read(&self) -> u64 {
        self.bytes
    }

    fn row_line(&self) -> u64 {
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: ColumnType) -> Column {
        Column {
            name: name.into(),
            native_type: format!("{ty:?}"),
            r#type: ty as i32,
            nullable: true,
            ..Default::default()
        }
    }

    fn kinds(row: &Row) -> Vec<Option<Kind>> {
        row.values.iter().map(|v| v.kind.clone()).collect()
    }

    #[test]
    fn csv_fields_take_the_column_types() {
        let table = vec![
            col("id", ColumnType::Int),
            col("price", ColumnType::Decimal),
            col("day", ColumnType::Date),
        ];
        let input = "ID,price,day\n1,12.50,2024-02-29\n2,,2024-03-01\n3,x,2024-03-02\n";
        let mut reader = CsvReader::new(input.as_bytes(), "").expect("header");
        let columns = match_columns(reader.column_names(), &table).expect("columns");
        let first = reader.next_row(&columns).expect("row").expect("parses");
        assert_eq!(
            kinds(&first),
            vec![
                Some(Kind::Int64Value(1)),
                Some(Kind::DecimalValue("12.50".into())),
                Some(Kind::DateValue(Date {
                    year: 2024,
                    month: 2,
                    day: 29
                })),
            ]
        );
        let second = reader.next_row(&columns).expect("row").expect("parses");
        assert_eq!(second.values[1].kind, Some(Kind::Null(true)));
        let err = reader.next_row(&columns).expect("row").expect_err("x is no decimal");
        assert_eq!((err.line, err.column.as_deref()), (4, Some("price")));
        assert!(reader.next_row(&columns).is_none());
        assert!(match_columns(&["nope".into()], &table)
            .unwrap_err()
            .contains("id, price, day"));
    }

    #[test]
    fn csv_tells_null_from_empty_text_as_weirctl_writes_them() {
        let table = vec![
            col("a", ColumnType::String),
            col("b", ColumnType::String),
            col("n", ColumnType::Int),
        ];
        let input = "a,b,n\n,\"\",1\r\n\"x,y\",\"two\nlines \"\"quoted\"\"\",2\n\n\\N,\"\\N\",x\n";
        let mut reader = CsvReader::new(input.as_bytes(), "").expect("header");
        let columns = match_columns(reader.column_names(), &table).expect("columns");
        let first = reader.next_row(&columns).expect("row").expect("parses");
        assert_eq!(
            kinds(&first),
            vec![Some(Kind::Null(true)), Some(string("")), Some(Kind::Int64Value(1))],
            "an empty unquoted field is NULL, a quoted one empty text"
        );
        let second = reader.next_row(&columns).expect("row").expect("parses");
        assert_eq!(second.values[0].kind, Some(string("x,y")));
        assert_eq!(second.values[1].kind, Some(string("two\nlines \"quoted\"")));
        // Its line counts the line break inside the quoted field and the blank line.
        let err = reader.next_row(&columns).expect("row").expect_err("x is no integer");
        assert_eq!((err.line, err.column.as_deref()), (6, Some("n")));
        assert_eq!(reader.row_line(), 6);
        assert!(reader.next_row(&columns).is_none());
        // With a marker of its own, only the unquoted one is NULL.
        let mut reader = CsvReader::new("a,b\n\\N,\"\\N\"\n".as_bytes(), "\\N").expect("header");
        let columns = match_columns(reader.column_names(), &table[..2]).expect("columns");
        let row = reader.next_row(&columns).expect("row").expect("parses");
        assert_eq!(kinds(&row), vec![Some(Kind::Null(true)), Some(string("\\N"))]);
        let mut unclosed = CsvReader::new("a\n\"open\n".as_bytes(), "").expect("header");
        let err = unclosed.next_row(&table[..1]).expect("row").expect_err("unclosed");
        assert_eq!(err.line, 2);
    }

    /// As Python's csv module writes with utf-8-sig and QUOTE_ALL.
    #[test]
    fn a_byte_order_mark_before_a_quoted_header_is_dropped() {
        let reader = CsvReader::new("\u{feff}\"id\",\"n\"\n1,a\n".as_bytes(), "").expect("header");
        assert_eq!(reader.column_names(), ["id", "n"]);
    }

    #[test]
    fn a_one_column_null_row_is_kept_and_a_byte_order_mark_dropped() {
        let table = vec![col("note", ColumnType::String)];
        // As `weirctl query --format csv` writes a one-column result whose middle row is NULL.
        let input = "\u{feff}note\nfirst\n\n\"\"\n";
        let mut reader = CsvReader::new(input.as_bytes(), "").expect("header");
        let columns = match_columns(reader.column_names(), &table).expect("the mark is not part of the name");
        let mut rows = Vec::new();
        while let Some(row) = reader.next_row(&columns) {
            rows.push(kinds(&row.expect("parses")));
        }
        assert_eq!(
            rows,
            vec![
                vec![Some(string("first"))],
                vec![Some(Kind::Null(true))],
                vec![Some(string(""))]
            ]
        );
    }

    #[test]
    fn row_indexes_map_to_their_lines() {
        let mut lines = RowLines::default();
        // Header on line 1; row 2 spans lines 4-5; a blank line 8.
        for (row, line) in [(0, 2), (1, 3), (2, 4), (3, 6), (4, 7), (5, 9)] {
            lines.record(row, line);
        }
        let found: Vec<_> = (0..7).map(|r| lines.line_of(r)).collect();
        assert_eq!(found, [Some(2), Some(3), Some(4), Some(6), Some(7), Some(9), Some(10)]);
        assert_eq!(lines.offsets.len(), 3, "kept only where the offset changes");
        assert_eq!(RowLines::default().line_of(0), None);
    }

    fn string(s: &str) -> Kind {
        Kind::StringValue(s.into())
    }

    #[test]
    fn json_lines_take_the_column_types() {
        let table = vec![
            col("id", ColumnType::Int),
            col("at", ColumnType::TimestampTz),
            col("tags", ColumnType::List),
            col("doc", ColumnType::Json),
        ];
        let input =
            "{\"id\": 1, \"at\": \"2024-01-01T00:00:00Z\", \"tags\": [\"a\"], \"doc\": {\"k\": 1}}\n\n{\"id\": 2.5, \"at\": null, \"tags\": null, \"doc\": null}\n{\"id\": 3, \"at\": null, \"tags\": null}\n";
        let mut reader = JsonLinesReader::new(input.as_bytes()).expect("first line");
        let columns = match_columns(reader.column_names(), &table).expect("columns");
        let first = reader.next_row(&columns).expect("row").expect("parses");
        let at = |name: &str| {
            let i = columns.iter().position(|c| c.name == name).expect("column");
            first.values[i].kind.clone()
        };
        assert_eq!(at("id"), Some(Kind::Int64Value(1)));
        assert_eq!(
            at("at"),
            Some(Kind::TimestampValue(prost_types::Timestamp {
                seconds: 1_704_067_200,
                nanos: 0
            }))
        );
        assert_eq!(at("doc"), Some(Kind::JsonValue("{\"k\": 1}".into())));
        let err = reader
            .next_row(&columns)
            .expect("row")
            .expect_err("2.5 is not an integer");
        assert_eq!((err.line, err.column.as_deref()), (3, Some("id")));
        // A key left out is an error, not a NULL that an upsert would write.
        let err = reader.next_row(&columns).expect("row").expect_err("doc is missing");
        assert_eq!((err.line, err.column.as_deref()), (4, Some("doc")));
    }

    #[test]
    fn a_json_lines_file_may_start_with_a_byte_order_mark() {
        let reader = JsonLinesReader::new("\u{feff}{\"id\": 1}\n".as_bytes()).expect("first line");
        assert_eq!(reader.column_names(), ["id".to_string()]);
    }

    #[test]
    fn timestamps_of_any_year_read_back_as_they_are_written() {
        let column = col("t", ColumnType::TimestampTz);
        // 44 BC (year -43), year 10000, and an ordinary one with a fraction.
        for (seconds, nanos) in [(-63_524_361_600, 0), (253_402_300_800, 0), (1_700_000_000, 123_456_789)] {
            let ts = prost_types::Timestamp { seconds, nanos };
            let written = Value::from(Kind::TimestampValue(ts)).to_string();
            assert_eq!(
                from_text(&written, &column).map(|v| v.kind),
                Ok(Some(Kind::TimestampValue(ts))),
                "{written}"
            );
        }
    }

    #[test]
    fn text_numbers_keep_to_what_they_say() {
        let float = col("f", ColumnType::Float);
        assert!(from_text("1e400", &float).is_err());
        for text in ["Infinity", "-inf", "NaN", "1e300"] {
            assert!(from_text(text, &float).is_ok(), "{text}");
        }
        // A column of no one type: numbers as numbers, other text as text.
        let any = col("v", ColumnType::Dynamic);
        let kind = |text: &str| from_text(text, &any).expect(text).kind;
        assert_eq!(kind("1"), Some(Kind::Int64Value(1)));
        assert_eq!(kind("-2.5"), Some(Kind::DoubleValue(-2.5)));
        // Doubles as weirctl's CSV writes them load back as doubles.
        for d in [1e20, 1.5e-7, -2.5e300, 3.0] {
            let written = crate::output::csv_double(d);
            assert_eq!(kind(&written), Some(Kind::DoubleValue(d)), "{written}");
        }
        for text in ["007", "1.50", "1e3", "abc", ""] {
            assert_eq!(kind(text), Some(Kind::StringValue(text.into())), "{text}");
        }
        // In JSON Lines a string is text, whatever it spells; a number a number.
        let json = |text: &str| {
            let raw: Box<RawValue> = serde_json::from_str(text).expect("json");
            from_json(&raw, &any).expect(text).kind
        };
        assert_eq!(json("\"42\""), Some(Kind::StringValue("42".into())));
        assert_eq!(json("42"), Some(Kind::Int64Value(42)));
        assert_eq!(json("-2.5e-3"), Some(Kind::DoubleValue(-2.5e-3)));
        // Digits a double would lose are sent as they are written.
        for text in ["123456789012345678901", "12345678901234567.89", "1e400"] {
            assert_eq!(json(text), Some(Kind::DecimalValue(text.into())), "{text}");
        }
    }

    #[test]
    fn json_documents_past_what_serde_parses_load_as_they_are() {
        let doc = col("doc", ColumnType::Json);
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        for text in [r#"{"a":1e400}"#, deep.as_str(), "1e400", r#""s""#] {
            let raw: Box<RawValue> = serde_json::from_str(text).expect("json");
            assert_eq!(
                from_json(&raw, &doc).map(|v| v.kind),
                Ok(Some(Kind::JsonValue(text.into())))
            );
            assert_eq!(
                from_text(text, &doc).map(|v| v.kind),
                Ok(Some(Kind::JsonValue(text.into())))
            );
        }
        let raw: Box<RawValue> = serde_json::from_str("null").expect("json");
        assert_eq!(from_json(&raw, &doc), Ok(null()));
        assert!(from_text("{", &doc).is_err());
    }

    #[test]
    fn mysql_times_outside_one_day_load_back_as_durations() {
        let time = col("t", ColumnType::Time);
        let kind = |text: &str| from_text(text, &time).map(|v| v.kind);
        let span = |microseconds| {
            Ok(Some(Kind::IntervalValue(Interval {
                months: 0,
                days: 0,
                microseconds,
            })))
        };
        assert_eq!(kind("25:00:00"), span(90_000_000_000));
        assert_eq!(kind("-01:30:00"), span(-5_400_000_000));
        assert_eq!(kind("-00:00:01.5"), span(-1_500_000));
        assert_eq!(kind("838:59:59.000001"), span(3_020_399_000_001));
        assert!(matches!(kind("12:34:56"), Ok(Some(Kind::TimeValue(_)))));
        assert!(
            matches!(kind("12:34:56-05:00"), Ok(Some(Kind::TimeValue(t))) if t.utc_offset_seconds == Some(-18_000))
        );
        for text in ["25:60:00", "25:00", "--01:00:00", "25:00:00.1234567", "x"] {
            assert!(kind(text).is_err(), "{text}");
        }
        // What weirctl writes for such a value reads back as it was.
        let written = Value::from(Kind::IntervalValue(Interval {
            months: 0,
            days: 0,
            microseconds: -5_400_000_001,
        }))
        .to_string();
        assert_eq!(kind(&written), span(-5_400_000_001));
    }

    #[test]
    fn json_booleans_go_into_text_as_written() {
        let json = |text: &str, ty: ColumnType| {
            let raw: Box<RawValue> = serde_json::from_str(text).expect("json");
            from_json(&raw, &col("c", ty)).map(|v| v.kind)
        };
        assert_eq!(
            json("true", ColumnType::String),
            Ok(Some(Kind::StringValue("true".into())))
        );
        assert_eq!(json("false", ColumnType::Bool), Ok(Some(Kind::BoolValue(false))));
        // MySQL's BOOLEAN is TINYINT(1).
        assert_eq!(json("true", ColumnType::Int), Ok(Some(Kind::BoolValue(true))));
        assert!(json("true", ColumnType::Bytes).is_err());
    }

    #[test]
    fn json_values_go_into_json_columns_as_the_documents_they_are() {
        let doc = col("doc", ColumnType::Json);
        let json = |text: &str| {
            let raw: Box<RawValue> = serde_json::from_str(text).expect("json");
            from_json(&raw, &doc).expect(text).kind
        };
        for text in ["\"42\"", "\"hi\"", "true", "7", "[1,\"a\"]"] {
            assert_eq!(json(text), Some(Kind::JsonValue(text.into())), "{text}");
        }
        assert_eq!(json("null"), Some(Kind::Null(true)));
    }

    #[test]
    fn bytes_read_back_as_json_output_writes_them() {
        let mut list = col("l", ColumnType::List);
        list.element_type = ColumnType::Bytes as i32;
        let columns = [col("b", ColumnType::Bytes), col("any", ColumnType::Dynamic), list];
        let values = vec![
            Value::from(vec![0xde, 0xad, 0x01]),
            Value::from(vec![0xff]),
            Value::from(Kind::ListValue(ListValue {
                values: vec![Value::from(vec![0x41]), Value::null()],
            })),
        ];
        let line = crate::output::row_json(&columns, &Row { values: values.clone() }).expect("a line");
        assert_eq!(
            line,
            r#"{"b":{"hex":"dead01"},"any":{"hex":"ff"},"l":[{"hex":"41"},null]}"#
        );
        let mut reader = JsonLinesReader::new(line.as_bytes()).expect("first line");
        let matched = match_columns(reader.column_names(), &columns).expect("columns");
        let row = reader.next_row(&matched).expect("row").expect("parses");
        for (c, value) in matched.iter().zip(&row.values) {
            let i = columns.iter().position(|o| o.name == c.name).expect("a column");
            assert_eq!(value, &values[i], "{}", c.name);
        }
        // Hex text still reads as bytes; other objects do not.
        let raw = |t: &str| serde_json::from_str::<Box<RawValue>>(t).expect("json");
        assert_eq!(from_json(&raw("\"\\\\x41\""), &columns[0]), Ok(Value::from(vec![0x41])));
        for bad in [r#"{"hex":"zz"}"#, r#"{"hex":"41","x":1}"#, r#"{"b64":"QQ=="}"#] {
            assert!(from_json(&raw(bad), &columns[0]).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_keep_the_offset_weirctl_writes() {
        let time = col("t", ColumnType::Time);
        let parsed = |text: &str| match from_text(text, &time).map(|v| v.kind) {
            Ok(Some(Kind::TimeValue(t))) => Some((t.hours, t.minutes, t.seconds, t.nanos, t.utc_offset_seconds)),
            _ => None,
        };
        assert_eq!(parsed("12:34:56"), Some((12, 34, 56, 0, None)));
        assert_eq!(parsed("12:34:56.5+02:00"), Some((12, 34, 56, 500_000_000, Some(7200))));
        assert_eq!(parsed("12:34:56-05"), Some((12, 34, 56, 0, Some(-18000))));
        assert_eq!(parsed("01:02:03+05:30:15"), Some((1, 2, 3, 0, Some(19815))));
        assert_eq!(parsed("12:34Z"), Some((12, 34, 0, 0, Some(0))));
        for bad in ["12:34:56+2", "12:34:56+25:00", "12:34:56+02:00:00:00", "noon"] {
            assert_eq!(parsed(bad), None, "{bad}");
        }
        // What weirctl writes reads back the same.
        let written = Value {
            kind: Some(Kind::TimeValue(TimeOfDay {
                hours: 23,
                minutes: 59,
                seconds: 1,
                nanos: 250_000_000,
                utc_offset_seconds: Some(-34_200),
            })),
        };
        assert_eq!(from_text(&written.to_string(), &time), Ok(written));
    }

    #[test]
    fn json_numbers_keep_every_digit() {
        let mut ids = col("ids", ColumnType::List);
        ids.element_type = ColumnType::Decimal as i32;
        let table = [
            col("amt", ColumnType::Decimal),
            col("big", ColumnType::Uint),
            col("doc", ColumnType::Json),
            col("any", ColumnType::Dynamic),
            ids,
        ];
        let input = "{\"amt\": 12345678901234567.89, \"big\": 18446744073709551615, \
                     \"doc\": {\"id\": 123456789012345678901}, \"any\": 42, \"ids\": [0.10, 1e400]}\n";
        let mut reader = JsonLinesReader::new(input.as_bytes()).expect("first line");
        let columns = match_columns(reader.column_names(), &table).expect("columns");
        let row = reader.next_row(&columns).expect("row").expect("parses");
        let at = |name: &str| {
            let i = columns.iter().position(|c| c.name == name).expect("column");
            row.values[i].kind.clone()
        };
        assert_eq!(at("amt"), Some(Kind::DecimalValue("12345678901234567.89".into())));
        assert_eq!(at("big"), Some(Kind::Uint64Value(u64::MAX)));
        assert_eq!(
            at("doc"),
            Some(Kind::JsonValue("{\"id\": 123456789012345678901}".into()))
        );
        assert_eq!(at("any"), Some(Kind::Int64Value(42)), "not the double 42.0");
        let float = col("f", ColumnType::Float);
        let raw = |t: &str| serde_json::from_str::<Box<RawValue>>(t).expect("json");
        assert!(from_json(&raw("1e400"), &float).is_err(), "no infinity");
        let text = col("t", ColumnType::String);
        assert_eq!(
            from_json(&raw("{\"n\": 123456789012345678901}"), &text).map(|v| v.kind),
            Ok(Some(Kind::StringValue("{\"n\": 123456789012345678901}".into())))
        );
        let decimal = |d: &str| Value::from(Kind::DecimalValue(d.into()));
        assert_eq!(
            at("ids"),
            Some(Kind::ListValue(ListValue {
                values: vec![decimal("0.10"), decimal("1e400")]
            }))
        );
    }
}

//! Rendering of result rows as an aligned table, CSV or JSON Lines, batch by
//! batch so that output can start before a streamed result ends.

use std::collections::HashSet;
use std::io::{self, Write};

use weir_proto::v1::value::Kind;
use weir_proto::v1::{Column, ColumnType, Row, Value};

/// Stands in for values missing from a row shorter than its columns.
static MISSING: Value = Value { kind: None };

/// How rows are rendered (also the `--format` values of weirctl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with a header.
    Table,
    /// RFC 4180 CSV with a header line; NULL is an empty field.
    Csv,
    /// JSON Lines: one object per row, keyed by column name.
    Json,
}

/// Writes rows of one result in a [`Format`].
#[derive(Debug)]
pub struct RowWriter<W: Write> {
    out: W,
    columns: Vec<Column>,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Widths are fixed by the header and the first batch.
    Table {
        widths: Option<Vec<usize>>,
    },
    Csv {
        header_written: bool,
    },
    /// Column names encoded as JSON strings, made unique.
    Json {
        keys: Vec<String>,
    },
}

impl<W: Write> RowWriter<W> {
    /// Nothing is written until the first batch or [`Self::finish`].
    pub fn new(format: Format, columns: &[Column], out: W) -> Self {
        let state = match format {
            Format::Table => State::Table { widths: None },
            Format::Csv => State::Csv { header_written: false },
            Format::Json => State::Json {
                keys: json_keys(columns),
            },
        };
        RowWriter {
            out,
            columns: columns.to_vec(),
            state,
        }
    }

    /// Writes a batch and flushes, so each batch shows as soon as it arrives.
    pub fn write_rows(&mut self, rows: &[Row]) -> io::Result<()> {
        let RowWriter { out, columns, state } = self;
        // A statement without a result set (INSERT, DDL) has nothing to show;
        // an empty batch must not fix the table's widths.
        if columns.is_empty() || rows.is_empty() {
            return Ok(());
        }
        match state {
            State::Table { widths } => {
                let cells: Vec<Vec<String>> = rows
                    .iter()
                    .map(|row| (0..columns.len()).map(|i| table_cell(value_at(row, i))).collect())
                    .collect();
                let widths = match widths {
                    Some(widths) => widths,
                    None => {
                        let header = header_widths(columns);
                        let widths = widths.insert(column_widths(header, &cells));
                        write_table_header(out, columns, widths)?;
                        widths
                    }
                };
                for row in &cells {
                    write_table_line(out, row, widths, columns)?;
                }
            }
            State::Csv { header_written } => {
                if !*header_written {
                    write_csv_header(out, columns)?;
                    *header_written = true;
                }
                for row in rows {
                    let fields = (0..columns.len())
                        .map(|i| csv_field(value_at(row, i)))
                        .collect::<io::Result<Vec<String>>>()?;
                    writeln!(out, "{}", fields.join(","))?;
                }
            }
            State::Json { keys } => {
                let mut line = Vec::new();
                for row in rows {
                    line.clear();
                    write_json_object(&mut line, keys, row)?;
                    line.push(b'\n');
                    out.write_all(&line)?;
                }
            }
        }
        out.flush()
    }

    /// Writes the header if no batch did (an empty result still shows its
    /// columns), flushes, and gives the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.columns.is_empty() {
            match &mut self.state {
                State::Table { widths: None } => {
                    let widths = header_widths(&self.columns);
                    write_table_header(&mut self.out, &self.columns, &widths)?;
                }
                State::Csv { header_written: false } => write_csv_header(&mut self.out, &self.columns)?,
                _ => {}
            }
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One row as a JSON object keyed by column name, as in the JSON format.
pub fn row_json(columns: &[Column], row: &Row) -> io::Result<String> {
    let mut line = Vec::new();
    write_json_object(&mut line, &json_keys(columns), row)?;
    String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `{"key":value,...}` for one row; `keys` are already JSON-quoted.
fn write_json_object(line: &mut Vec<u8>, keys: &[String], row: &Row) -> io::Result<()> {
    line.push(b'{');
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        line.extend_from_slice(key.as_bytes());
        line.push(b':');
        write_json_value(line, value_at(row, i))?;
    }
    line.push(b'}');
    Ok(())
}

fn value_at(row: &Row, i: usize) -> &Value {
    row.values.get(i).unwrap_or(&MISSING)
}

fn is_null(value: &Value) -> bool {
    matches!(value.kind, None | Some(Kind::Null(_)))
}

// ---- table ----

/// Escapes control characters so that every row stays on one line.
fn table_cell(value: &Value) -> String {
    escape_controls(&value.to_string())
}

/// Control characters as Rust escapes (`\n`, `\u{1b}`), the rest as it is.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn width(text: &str) -> usize {
    text.chars().count()
}

fn header_widths(columns: &[Column]) -> Vec<usize> {
    columns.iter().map(|c| width(&escape_controls(&c.name))).collect()
}

fn column_widths(mut widths: Vec<usize>, rows: &[Vec<String>]) -> Vec<usize> {
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    widths
}

/// Numbers are right-aligned, as in psql.
fn is_numeric(column: &Column) -> bool {
    matches!(
        column.r#type(),
        ColumnType::Int | ColumnType::Uint | ColumnType::Float | ColumnType::Decimal
    )
}

fn write_table_header(out: &mut impl Write, columns: &[Column], widths: &[usize]) -> io::Result<()> {
    let names: Vec<String> = columns.iter().map(|c| escape_controls(&c.name)).collect();
    write_table_line(out, &names, widths, columns)?;
    let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    writeln!(out, "{}", dashes.join("-+-"))
}

fn write_table_line(out: &mut impl Write, cells: &[String], widths: &[usize], columns: &[Column]) -> io::Result<()> {
    let mut line = String::new();
    let last = cells.len().saturating_sub(1);
    for (i, ((cell, w), column)) in cells.iter().zip(widths).zip(columns).enumerate() {
        if i > 0 {
            line.push_str(" | ");
        }
        let pad = " ".repeat(w.saturating_sub(width(cell)));
        if is_numeric(column) {
            line.push_str(&pad);
            line.push_str(cell);
        } else {
            line.push_str(cell);
            // No trailing blanks after the last column.
            if i < last {
                line.push_str(&pad);
            }
        }
    }
    writeln!(out, "{line}")
}

// ---- CSV ----

fn write_csv_header(out: &mut impl Write, columns: &[Column]) -> io::Result<()> {
    let names: Vec<String> = columns.iter().map(|c| csv_quote(&c.name)).collect();
    writeln!(out, "{}", names.join(","))
}

/// NULL is an empty field and an empty string is `""`, so the two stay
/// distinguishable (as in PostgreSQL's CSV COPY). A list is written as a
/// JSON array, which keeps its elements apart (`["a, b", null]`) and is
/// what `weirctl load` reads back. A double is `csv_double`'s.
fn csv_field(value: &Value) -> io::Result<String> {
    Ok(match &value.kind {
        _ if is_null(value) => String::new(),
        Some(Kind::DoubleValue(d)) => csv_double(*d),
        Some(Kind::ListValue(_)) => {
            let mut json = Vec::new();
            write_json_value(&mut json, value)?;
            csv_quote(&String::from_utf8_lossy(&json))
        }
        _ => csv_quote(&value.to_string()),
    })
}

/// A double as shown elsewhere, with `.0` after a whole number (`3.0`, as
/// JSON writes it): `3` would load back into a column of no one type
/// (SQLite's) as an integer.
pub(crate) fn csv_double(d: f64) -> String {
    let text = Value::from(d).to_string();
    if text.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) {
        text + ".0"
    } else {
        text
    }
}

fn csv_quote(text: &str) -> String {
    if text.is_empty() || text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

// ---- JSON ----

/// Duplicate column names (say `a.id, b.id`) would make keys collide and
/// most JSON readers keep only the last one, so later duplicates get a
/// `_2`, `_3`... suffix, skipping names other columns have (`id, id, id_2`
/// gives `id, id_3, id_2`: every column that has a name of its own keeps it).
fn json_keys(columns: &[Column]) -> Vec<String> {
    let mut used: HashSet<String> = columns.iter().map(|c| c.name.clone()).collect();
    let mut first = HashSet::new();
    columns
        .iter()
        .map(|c| {
            let mut key = c.name.clone();
            if !first.insert(key.clone()) {
                let mut n = 1;
                while !used.insert(key.clone()) {
                    n += 1;
                    key = format!("{}_{n}", c.name);
                }
            }
            serde_json::Value::String(key).to_string()
        })
        .collect()
}

/// Every integer up to 2^53 in magnitude is exact in a double; past it, not.
const EXACT_IN_A_DOUBLE: u64 = 1 << 53;

/// Integers past what JSON readers' doubles hold exactly (2^53) and decimals
/// are strings so that they stay exact, as in Protobuf's JSON mapping;
/// `weirctl load` reads them back from strings. Bytes are `{"hex": "..."}`.
fn write_json_value(buf: &mut Vec<u8>, value: &Value) -> io::Result<()> {
    let Some(kind) = &value.kind else {
        buf.extend_from_slice(b"null");
        return Ok(());
    };
    match kind {
        Kind::Null(_) => buf.extend_from_slice(b"null"),
        Kind::BoolValue(b) => write!(buf, "{b}")?,
        Kind::Int64Value(i) if i.unsigned_abs() <= EXACT_IN_A_DOUBLE => write!(buf, "{i}")?,
        Kind::Int64Value(i) => write!(buf, "\"{i}\"")?,
        Kind::DoubleValue(d) => match serde_json::Number::from_f64(*d) {
            Some(n) => write!(buf, "{n}")?,
            // JSON has no NaN or infinities.
            None => serde_json::to_writer(&mut *buf, &value.to_string())?,
        },
        // Not a bare hex string, which text could be too; `weirctl load` reads it back.
        Kind::BytesValue(bytes) => write!(buf, "{{\"hex\":\"{}\"}}", hex::encode(bytes))?,
        Kind::StringValue(s) | Kind::DecimalValue(s) | Kind::UuidValue(s) => serde_json::to_writer(&mut *buf, s)?,
        Kind::JsonValue(text) => {
            // Checked as JSON text only: numbers past a double's range
            // (`1e400`, which PostgreSQL keeps) and nesting of any depth are
            // valid JSON, which a parse into values would refuse, and the
            // document would come out (and load back) as a string.
            if serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok() {
                // Copied rather than re-serialized, which would round large
                // numbers to doubles.
                buf.extend_from_slice(minify_json(text).as_bytes());
            } else {
                serde_json::to_writer(&mut *buf, text)?;
            }
        }
        Kind::ListValue(list) => {
            buf.push(b'[');
            for (i, v) in list.values.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                write_json_value(buf, v)?;
            }
            buf.push(b']');
        }
        Kind::Uint64Value(_)
        | Kind::DateValue(_)
        | Kind::TimeValue(_)
        | Kind::TimestampValue(_)
        | Kind::IntervalValue(_) => serde_json::to_writer(&mut *buf, &value.to_string())?,
    }
    Ok(())
}

/// Drops whitespace outside strings, so that a pretty-printed document fits
/// on its JSON Lines line. `text` must be valid JSON.
fn minify_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if c.is_ascii_whitespace() {
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use weir_proto::v1::{Date, Interval, ListValue, TimeOfDay};

    use super::*;

    fn column(name: &str, r#type: ColumnType) -> Column {
        Column {
            name: name.to_owned(),
            r#type: r#type.into(),
            ..Default::default()
        }
    }

    fn row(values: Vec<Value>) -> Row {
        Row { values }
    }

    /// One value of every variant, with a column of the matching type.
    fn every_variant() -> Vec<(Column, Value)> {
        let list = Kind::ListValue(ListValue {
            values: vec![1i64.into(), Value::null(), 3i64.into()],
        });
        vec![
            (column("null", ColumnType::String), Value::null()),
            (column("bool", ColumnType::Bool), true.into()),
            (column("int", ColumnType::Int), (-42i64).into()),
            (column("uint", ColumnType::Uint), u64::MAX.into()),
            (column("float", ColumnType::Float), 1.5.into()),
            (column("text", ColumnType::String), "a,\"b\"\nc".into()),
            (column("bytes", ColumnType::Bytes), vec![0xde, 0xad, 0x01].into()),
            (
                column("decimal", ColumnType::Decimal),
                Kind::DecimalValue("-12345.6789".into()).into(),
            ),
            (
                column("date", ColumnType::Date),
                Kind::DateValue(Date {
                    year: 2024,
                    month: 2,
                    day: 29,
                })
                .into(),
            ),
            (
                column("time", ColumnType::Time),
                Kind::TimeValue(TimeOfDay {
                    hours: 12,
                    minutes: 34,
                    seconds: 56,
                    nanos: 500_000_000,
                    utc_offset_seconds: None,
                })
                .into(),
            ),
            (
                column("timestamp", ColumnType::TimestampTz),
                Kind::TimestampValue(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 123_000_000,
                })
                .into(),
            ),
            (
                column("interval", ColumnType::Interval),
                Kind::IntervalValue(Interval {
                    months: 1,
                    days: 2,
                    microseconds: 1_500_000,
                })
                .into(),
            ),
            (
                column("uuid", ColumnType::Uuid),
                Kind::UuidValue("123e4567-e89b-12d3-a456-426614174000".into()).into(),
            ),
            (
                column("json", ColumnType::Json),
                Kind::JsonValue("{\"a\": [1, 2.50],\n \"b\": \"x y\\\"\"}".into()).into(),
            ),
            (column("list", ColumnType::List), list.into()),
        ]
    }

    fn render(format: Format, columns: &[Column], batches: &[Vec<Row>]) -> String {
        let mut writer = RowWriter::new(format, columns, Vec::new());
        for batch in batches {
            writer.write_rows(batch).expect("writing to a Vec cannot fail");
        }
        let bytes = writer.finish().expect("writing to a Vec cannot fail");
        String::from_utf8(bytes).expect("output is UTF-8")
    }

    fn render_every_variant(format: Format) -> String {
        let (columns, values): (Vec<_>, Vec<_>) = every_variant().into_iter().unzip();
        render(format, &columns, &[vec![row(values)]])
    }

    #[test]
    fn table_shows_every_variant() {
        // One row per variant, so that the expected output stays readable.
        let columns = [
            column("variant", ColumnType::String),
            column("value", ColumnType::Dynamic),
        ];
        let rows: Vec<Row> = every_variant()
            .into_iter()
            .map(|(c, v)| row(vec![c.name.into(), v]))
            .collect();
        let expected = "\
variant   | value
----------+-------------------------------------
null      | NULL
bool      | true
int       | -42
uint      | 18446744073709551615
float     | 1.5
text      | a,\"b\"\\nc
bytes     | \\xdead01
decimal   | -12345.6789
date      | 2024-02-29
time      | 12:34:56.5
timestamp | 2023-11-14T22:13:20.123Z
interval  | 1 mon 2 days 00:00:01.5
uuid      | 123e4567-e89b-12d3-a456-426614174000
json      | {\"a\": [1, 2.50],\\n \"b\": \"x y\\\"\"}
list      | [1, NULL, 3]
";
        assert_eq!(render(Format::Table, &columns, &[rows]), expected);
    }

    #[test]
    fn table_right_aligns_numbers_and_sizes_columns_by_the_first_batch() {
        let columns = [
            column("id", ColumnType::Int),
            column("name", ColumnType::String),
            column("note", ColumnType::String),
        ];
        let first = vec![
            row(vec![1i64.into(), "ann".into(), "x".into()]),
            row(vec![100i64.into(), "bo".into(), Value::null()]),
        ];
        let second = vec![row(vec![123456i64.into(), "christopher".into(), "y".into()])];
        let expected = concat!(
            " id | name | note\n",
            "----+------+-----\n",
            "  1 | ann  | x\n",
            "100 | bo   | NULL\n",
            // Later batches keep the widths and overflow them.
            "123456 | christopher | y\n",
        );
        assert_eq!(render(Format::Table, &columns, &[vec![], first, second]), expected);
    }

    #[test]
    fn table_of_an_empty_result_still_has_a_header() {
        let columns = [column("a", ColumnType::Int), column("bee", ColumnType::String)];
        assert_eq!(render(Format::Table, &columns, &[]), "a | bee\n--+----\n");
        assert_eq!(render(Format::Table, &columns, &[vec![]]), "a | bee\n--+----\n");
    }

    #[test]
    fn a_result_without_columns_prints_nothing() {
        for format in [Format::Table, Format::Csv, Format::Json] {
            assert_eq!(render(format, &[], &[vec![row(vec![])]]), "");
        }
    }

    #[test]
    fn missing_values_of_short_rows_are_null() {
        let columns = [column("a", ColumnType::Int), column("b", ColumnType::Int)];
        let rows = vec![row(vec![1i64.into()])];
        assert_eq!(render(Format::Csv, &columns, std::slice::from_ref(&rows)), "a,b\n1,\n");
        assert_eq!(render(Format::Json, &columns, &[rows]), "{\"a\":1,\"b\":null}\n");
    }

    #[test]
    fn csv_shows_every_variant() {
        let expected = "\
null,bool,int,uint,float,text,bytes,decimal,date,time,timestamp,interval,uuid,json,list
,true,-42,18446744073709551615,1.5,\"a,\"\"b\"\"\nc\",\\xdead01,-12345.6789,2024-02-29,\
12:34:56.5,2023-11-14T22:13:20.123Z,1 mon 2 days 00:00:01.5,\
123e4567-e89b-12d3-a456-426614174000,\
\"{\"\"a\"\": [1, 2.50],\n \"\"b\"\": \"\"x y\\\"\"\"\"}\",\"[1,null,3]\"
";
        assert_eq!(render_every_variant(Format::Csv), expected);
    }

    #[test]
    fn csv_lists_read_back_as_they_were() {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec!["a, b".into(), Value::null(), "say \"hi\"".into()],
            })),
        };
        let mut tags = column("tags", ColumnType::List);
        tags.element_type = ColumnType::String.into();
        tags.nullable = true;
        let text = render(
            Format::Csv,
            std::slice::from_ref(&tags),
            &[vec![row(vec![list.clone()])]],
        );
        let mut reader = crate::load_input::CsvReader::new(text.as_bytes(), "").expect("header");
        let columns = crate::load_input::match_columns(crate::load_input::RowReader::column_names(&reader), &[tags])
            .expect("columns");
        let back = crate::load_input::RowReader::next_row(&mut reader, &columns)
            .expect("a row")
            .expect("parses");
        assert_eq!(back.values, [list]);
    }

    #[test]
    fn csv_doubles_read_back_as_doubles_into_columns_of_no_one_type() {
        let any = column("v", ColumnType::Dynamic);
        let doubles = [3.0, -0.0, 2.5, 1e20, 1.5e-7, -42.0];
        let rows: Vec<_> = doubles.iter().map(|d| row(vec![Value::from(*d)])).collect();
        let text = render(Format::Csv, std::slice::from_ref(&any), &[rows]);
        assert!(text.contains("\n3.0\n-0.0\n2.5\n1e20\n"), "{text}");
        let mut reader = crate::load_input::CsvReader::new(text.as_bytes(), "").expect("header");
        let columns = crate::load_input::match_columns(crate::load_input::RowReader::column_names(&reader), &[any])
            .expect("columns");
        for d in doubles {
            let back = crate::load_input::RowReader::next_row(&mut reader, &columns)
                .expect("a row")
                .expect("parses");
            assert_eq!(back.values[0].kind, Some(Kind::DoubleValue(d)), "{d}");
        }
    }

    #[test]
    fn csv_tells_null_from_empty_text_and_quotes_headers() {
        let columns = [column("a,b", ColumnType::String), column("c", ColumnType::String)];
        let rows = vec![
            row(vec![Value::null(), "".into()]),
            row(vec!["x\ry".into(), " padded ".into()]),
        ];
        assert_eq!(
            render(Format::Csv, &columns, &[rows]),
            "\"a,b\",c\n,\"\"\n\"x\ry\", padded \n"
        );
    }

    #[test]
    fn csv_of_an_empty_result_is_the_header() {
        let columns = [column("a", ColumnType::Int)];
        assert_eq!(render(Format::Csv, &columns, &[]), "a\n");
        assert_eq!(render(Format::Csv, &columns, &[vec![], vec![]]), "a\n");
    }

    #[test]
    fn json_shows_every_variant() {
        let expected = concat!(
            r#"{"null":null,"bool":true,"int":-42,"uint":"18446744073709551615","#,
            r#""float":1.5,"text":"a,\"b\"\nc","bytes":{"hex":"dead01"},"decimal":"-12345.6789","#,
            r#""date":"2024-02-29","time":"12:34:56.5","timestamp":"2023-11-14T22:13:20.123Z","#,
            r#""interval":"1 mon 2 days 00:00:01.5","uuid":"123e4567-e89b-12d3-a456-426614174000","#,
            r#""json":{"a":[1,2.50],"b":"x y\""},"list":[1,null,3]}"#,
            "\n"
        );
        assert_eq!(render_every_variant(Format::Json), expected);
    }

    #[test]
    fn json_writes_integers_past_2_to_the_53_as_strings() {
        let columns = [column("n", ColumnType::Int)];
        let rows: Vec<_> = [1 << 53, -(1 << 53), (1 << 53) + 1, i64::MIN]
            .into_iter()
            .map(|i| row(vec![Kind::Int64Value(i).into()]))
            .collect();
        assert_eq!(
            render(Format::Json, &columns, &[rows]),
            concat!(
                "{\"n\":9007199254740992}\n{\"n\":-9007199254740992}\n",
                "{\"n\":\"9007199254740993\"}\n{\"n\":\"-9223372036854775808\"}\n"
            )
        );
    }

    #[test]
    fn json_keeps_embedded_json_exact_and_falls_back_to_a_string_for_other_text() {
        let columns = [column("doc", ColumnType::Json)];
        let rows = vec![
            row(vec![Kind::JsonValue("[12345678901234567890123, 1e400]".into()).into()]),
            row(vec![Kind::JsonValue("{\n  \"k\": \"a  b\"\n}".into()).into()]),
            row(vec![Kind::JsonValue("not json".into()).into()]),
        ];
        // Past a double's range, and deeper than serde_json parses values:
        // still JSON documents, embedded as they are.
        let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
        let deep_row = vec![row(vec![Kind::JsonValue(deep.clone()).into()])];
        assert_eq!(
            render(Format::Json, &columns, &[deep_row]),
            format!("{{\"doc\":{deep}}}\n")
        );
        let expected = concat!(
            r#"{"doc":[12345678901234567890123,1e400]}"#,
            "\n",
            r#"{"doc":{"k":"a  b"}}"#,
            "\n",
            r#"{"doc":"not json"}"#,
            "\n"
        );
        assert_eq!(render(Format::Json, &columns, &[rows]), expected);
    }

    #[test]
    fn json_writes_non_finite_floats_as_strings() {
        let columns = [column("f", ColumnType::Float)];
        let rows = vec![
            row(vec![f64::NAN.into()]),
            row(vec![f64::NEG_INFINITY.into()]),
            row(vec![1.0.into()]),
            row(vec![1e300.into()]),
        ];
        assert_eq!(
            render(Format::Json, &columns, &[rows]),
            "{\"f\":\"NaN\"}\n{\"f\":\"-Infinity\"}\n{\"f\":1.0}\n{\"f\":1e+300}\n"
        );
    }

    #[test]
    fn json_makes_duplicate_column_names_unique() {
        let columns = [
            column("id", ColumnType::Int),
            column("id", ColumnType::Int),
            column("id_2", ColumnType::Int),
            column("say \"hi\"", ColumnType::Int),
        ];
        let rows = vec![row(vec![1i64.into(), 2i64.into(), 3i64.into(), 4i64.into()])];
        assert_eq!(
            render(Format::Json, &columns, &[rows]),
            "{\"id\":1,\"id_3\":2,\"id_2\":3,\"say \\\"hi\\\"\":4}\n"
        );
    }

    #[test]
    fn json_of_an_empty_result_is_empty() {
        let columns = [column("a", ColumnType::Int)];
        assert_eq!(render(Format::Json, &columns, &[vec![]]), "");
    }
}

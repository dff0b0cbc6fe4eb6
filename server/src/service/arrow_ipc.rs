//! `ExecuteStream` results as Arrow IPC (`RESULT_FORMAT_ARROW_IPC`). The rows
//! of a batch go into one column builder per result column and leave as one
//! Arrow record batch message. The `arrow_ipc` pieces of a call, joined in
//! order, are one Arrow IPC stream (the schema first, the end-of-stream
//! marker last), which Arrow libraries read as it is, for example with
//! `pyarrow.ipc.open_stream`.
//!
//! Each column has one Arrow type: from its declared type, or, for a column
//! typed value by value (SQLite expressions, NULL literals), from the values
//! of the first batch. A value that type cannot hold exactly ends the stream
//! with INVALID_ARGUMENT naming the row and column, instead of being stored
//! lossily. The one rounding is to the microsecond, Arrow timestamps' unit.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{
    ArrayBuilder, BinaryBuilder, BooleanBuilder, Date32Builder, FixedSizeBinaryBuilder, Float64Builder, Int64Builder,
    IntervalMonthDayNanoBuilder, StringBuilder, Time64NanosecondBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::IntervalMonthDayNano;
use arrow_array::{Array, ArrayRef, ListArray, NullArray, RecordBatch, RecordBatchOptions, UnionArray};
use arrow_buffer::{NullBufferBuilder, OffsetBuffer, ScalarBuffer};
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{
    ArrowError, DataType, Field, FieldRef, IntervalUnit, Schema, SchemaRef, TimeUnit, UnionFields, UnionMode,
};
use chrono::{Datelike, Timelike};

use crate::backend::{BackendError, Column, ColumnType, RowSink, Value, MAX_ROW_BYTES};
use crate::error::{Error, Result};

/// Days from 0001-01-01 (chrono's day 1) to 1970-01-01, Arrow's day 0.
const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;
/// Arrow's canonical extension names, for readers that know them.
const EXTENSION_NAME: &str = "ARROW:extension:name";
/// The engine's own type name, kept on each field.
const NATIVE_TYPE: &str = "weir.native_type";

/// The Arrow type of a column, and the extension that refines it.
fn arrow_type(
    t: ColumnType,
    element: Option<ColumnType>,
) -> std::result::Result<(DataType, Option<&'static str>), String> {
    Ok(match t {
        ColumnType::Bool => (DataType::Boolean, None),
        ColumnType::Int => (DataType::Int64, None),
        ColumnType::UInt => (DataType::UInt64, None),
        ColumnType::Float => (DataType::Float64, None),
        // Exact decimal text, as in rows: an engine's decimals can exceed
        // Decimal128 and carry NaN, and many have no declared scale.
        ColumnType::Decimal | ColumnType::String => (DataType::Utf8, None),
        ColumnType::Json => (DataType::Utf8, Some("arrow.json")),
        ColumnType::Bytes => (DataType::Binary, None),
        ColumnType::Date => (DataType::Date32, None),
        ColumnType::Time => (DataType::Time64(TimeUnit::Nanosecond), None),
        ColumnType::Timestamp => (DataType::Timestamp(TimeUnit::Microsecond, None), None),
        ColumnType::TimestampTz => (DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), None),
        ColumnType::Interval => (DataType::Interval(IntervalUnit::MonthDayNano), None),
        ColumnType::Uuid => (DataType::FixedSizeBinary(16), Some("arrow.uuid")),
        ColumnType::List => {
            let element = element.unwrap_or(ColumnType::Dynamic);
            if element == ColumnType::List {
                return Err("lists of lists have no fixed depth".into());
            }
            (DataType::List(Arc::new(item_field(element)?)), None)
        }
        // Decided by the first batch's values (`decide`); Null until then.
        ColumnType::Dynamic => (DataType::Null, None),
        ColumnType::Unsupported => return Err("its type cannot be represented".into()),
    })
}

fn item_field(t: ColumnType) -> std::result::Result<Field, String> {
    let (data_type, extension) = arrow_type(t, None)?;
    Ok(with_extension(Field::new("item", data_type, true), extension))
}

fn with_extension(field: Field, extension: Option<&'static str>) -> Field {
    match extension {
        Some(name) => {
            let mut metadata = field.metadata().clone();
            metadata.insert(EXTENSION_NAME.into(), name.into());
            field.with_metadata(metadata)
        }
        None => field,
    }
}

const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// Type ids of the dense union that holds values typed value by value
/// (SQLite's storage classes).
const DYN_NULL: i8 = 0;
const DYN_INT: i8 = 1;
const DYN_FLOAT: i8 = 2;
const DYN_TEXT: i8 = 3;
const DYN_BYTES: i8 = 4;

fn dynamic_fields() -> UnionFields {
    let fields = [
        Field::new("null", DataType::Null, true),
        Field::new("int", DataType::Int64, true),
        Field::new("float", DataType::Float64, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("bytes", DataType::Binary, true),
    ];
    // Five distinct ids for five fields: nothing for try_new to refuse.
    UnionFields::try_new([DYN_NULL, DYN_INT, DYN_FLOAT, DYN_TEXT, DYN_BYTES], fields)
        .unwrap_or_else(|_| UnionFields::empty())
}

/// The Arrow fields of a result: one nullable field per column, named as
/// the column, with the engine's type name in its metadata.
fn fields(columns: &[Column]) -> Result<Vec<Field>> {
    let fields = columns
        .iter()
        .map(|c| {
            let (data_type, extension) =
                arrow_type(c.column_type, c.element_type).map_err(|message| Error::NotArrow {
                    row: None,
                    column: c.name.clone(),
                    message,
                })?;
            let field = Field::new(&c.name, data_type, true)
                .with_metadata(HashMap::from([(NATIVE_TYPE.to_string(), c.native_type.clone())]));
            Ok(with_extension(field, extension))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(fields)
}

/// The Arrow type of a column typed value by value, from its first batch:
/// the values' one kind, floats for integers among floats (when each is
/// exact as a float), a dense union of the kinds for other mixtures, and
/// Null for nothing but NULLs.
fn decided_type(values: &[Value]) -> DataType {
    let mut kinds = values
        .iter()
        .filter(|v| !matches!(v, Value::Null))
        .map(std::mem::discriminant);
    let Some(first) = kinds.next() else {
        return DataType::Null;
    };
    if kinds.clone().all(|k| k == first) {
        let one = values.iter().find(|v| !matches!(v, Value::Null));
        let column_type = match one {
            Some(Value::Bool(_)) => ColumnType::Bool,
            Some(Value::Int(_)) => ColumnType::Int,
            Some(Value::UInt(_)) => ColumnType::UInt,
            Some(Value::Float(_)) => ColumnType::Float,
            Some(Value::Text(_)) => ColumnType::String,
            Some(Value::Bytes(_)) => ColumnType::Bytes,
            Some(Value::Decimal(_)) => ColumnType::Decimal,
            Some(Value::Date(_)) => ColumnType::Date,
            Some(Value::Time(..)) => ColumnType::Time,
            Some(Value::Timestamp(_)) => ColumnType::Timestamp,
            Some(Value::TimestampTz(_)) => ColumnType::TimestampTz,
            Some(Value::Interval { .. }) => ColumnType::Interval,
            Some(Value::Uuid(_)) => ColumnType::Uuid,
            Some(Value::Json(_)) => ColumnType::Json,
            // Lists have no element type to go by: the union refuses them by row.
            Some(Value::List(_)) | Some(Value::Null) | None => ColumnType::Dynamic,
        };
        if let Ok((data_type, _)) = arrow_type(column_type, None) {
            if column_type != ColumnType::Dynamic {
                return data_type;
            }
        }
    }
    let exact_numbers = values.iter().all(|v| match v {
        Value::Null | Value::Float(_) => true,
        Value::Int(i) => i.unsigned_abs() <= crate::backend::EXACT_IN_DOUBLE,
        _ => false,
    });
    if exact_numbers {
        return DataType::Float64;
    }
    DataType::Union(dynamic_fields(), UnionMode::Dense)
}

/// One column's values of the batch in progress.
enum Builder {
    Bool(BooleanBuilder),
    Int(Int64Builder),
    UInt(UInt64Builder),
    Float(Float64Builder),
    Text(StringBuilder),
    Bytes(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64NanosecondBuilder),
    /// With a time zone (UTC) or without.
    Timestamp(TimestampMicrosecondBuilder, bool),
    Interval(IntervalMonthDayNanoBuilder),
    Uuid(FixedSizeBinaryBuilder),
    List(Box<ListBuilder>),
    /// Values of several kinds, each kept as its own (a dense union).
    Dynamic(Box<DynamicBuilder>),
    /// Only NULLs: a column typed value by value whose first batch held nothing else.
    Null(usize),
    /// A column typed value by value, before its first batch decides its type.
    Undecided(Vec<Value>),
}

struct ListBuilder {
    field: FieldRef,
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
    items: Builder,
}

#[derive(Default)]
struct DynamicBuilder {
    type_ids: Vec<i8>,
    offsets: Vec<i32>,
    nulls: usize,
    ints: Int64Builder,
    floats: Float64Builder,
    texts: StringBuilder,
    bytes: BinaryBuilder,
}

/// Why a value does not fit its column's Arrow type.
type Misfit = String;

fn misfit(value: &Value, builder: &Builder) -> Misfit {
    format!(
        "the value is of kind {}, which its {} column cannot hold",
        value.kind(),
        builder.kind()
    )
}

/// Microseconds since 1970, the nearest to `secs` and `nanos` (SQL Server's
/// `datetime` ticks and `datetime2(7)`'s last digit are finer; rounded as a
/// cast to `datetime2(6)` rounds them).
fn micros(secs: i64, nanos: u32) -> std::result::Result<i64, Misfit> {
    secs.checked_mul(1_000_000)
        .and_then(|us| us.checked_add((i64::from(nanos) + 500) / 1000))
        .ok_or_else(|| "the timestamp is out of Arrow's range".to_string())
}

/// Arrow's size of a value, for cutting batches at about `BATCH_BYTES`.
/// A NULL is counted as a whole `Value` (32 bytes), what it takes in a
/// column whose type is not known yet and more than its width in any typed
/// column: counted as nothing, a result of NULLs grew batches without bound.
fn arrow_size(value: &Value) -> usize {
    match value {
        Value::Null => std::mem::size_of::<Value>(),
        Value::Bool(_) => 1,
        Value::Date(_) => 4,
        Value::Interval { .. } | Value::Uuid(_) => 16,
        Value::Text(s) | Value::Decimal(s) | Value::Json(s) => s.len() + 4,
        Value::Bytes(b) => b.len() + 4,
        Value::List(items) => items.iter().map(arrow_size).sum::<usize>() + 4,
        _ => 8,
    }
}

/// The bytes of variable-length data an array holds (not its capacity).
fn data_bytes(array: &dyn Array) -> usize {
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value_data().len(),
        DataType::Binary => array.as_binary::<i32>().value_data().len(),
        DataType::List(_) => data_bytes(array.as_list::<i32>().values().as_ref()),
        _ => 0,
    }
}

impl Builder {
    /// A builder with room for `rows` values and `data` bytes of text.
    fn new(data_type: &DataType, rows: usize, data: usize) -> Builder {
        match data_type {
            DataType::Boolean => Builder::Bool(BooleanBuilder::with_capacity(rows)),
            DataType::Int64 => Builder::Int(Int64Builder::with_capacity(rows)),
            DataType::UInt64 => Builder::UInt(UInt64Builder::with_capacity(rows)),
            DataType::Float64 => Builder::Float(Float64Builder::with_capacity(rows)),
            DataType::Binary => Builder::Bytes(BinaryBuilder::with_capacity(rows, data)),
            DataType::Date32 => Builder::Date(Date32Builder::with_capacity(rows)),
            DataType::Time64(_) => Builder::Time(Time64NanosecondBuilder::with_capacity(rows)),
            DataType::Timestamp(_, zone) => Builder::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(rows).with_timezone_opt(zone.clone()),
                zone.is_some(),
            ),
            DataType::Interval(_) => Builder::Interval(IntervalMonthDayNanoBuilder::with_capacity(rows)),
            DataType::FixedSizeBinary(width) => Builder::Uuid(FixedSizeBinaryBuilder::with_capacity(rows, *width)),
            DataType::List(field) => Builder::List(Box::new(ListBuilder {
                field: field.clone(),
                offsets: {
                    let mut offsets = Vec::with_capacity(rows + 1);
                    offsets.push(0);
                    offsets
                },
                nulls: NullBufferBuilder::new(rows),
                items: Builder::new(field.data_type(), rows, data),
            })),
            DataType::Union(..) => Builder::Dynamic(Box::default()),
            DataType::Null => Builder::Null(0),
            // Utf8, and anything `arrow_type` might add later, as text.
            _ => Builder::Text(StringBuilder::with_capacity(rows, data)),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Builder::Bool(_) => "boolean",
            Builder::Int(_) => "integer",
            Builder::UInt(_) => "unsigned integer",
            Builder::Float(_) => "float",
            Builder::Text(_) => "text",
            Builder::Bytes(_) => "bytes",
            Builder::Date(_) => "date",
            Builder::Time(_) => "time",
            Builder::Timestamp(_, true) => "timestamp with time zone",
            Builder::Timestamp(_, false) => "timestamp",
            Builder::Interval(_) => "interval",
            Builder::Uuid(_) => "UUID",
            Builder::List(_) => "list",
            Builder::Dynamic(_) => "dynamically typed",
            Builder::Null(_) | Builder::Undecided(_) => "NULL (it held only NULLs in its first batch)",
        }
    }

    fn null(&mut self) {
        match self {
            Builder::Bool(b) => b.append_null(),
            Builder::Int(b) => b.append_null(),
            Builder::UInt(b) => b.append_null(),
            Builder::Float(b) => b.append_null(),
            Builder::Text(b) => b.append_null(),
            Builder::Bytes(b) => b.append_null(),
            Builder::Date(b) => b.append_null(),
            Builder::Time(b) => b.append_null(),
            Builder::Timestamp(b, _) => b.append_null(),
            Builder::Interval(b) => b.append_null(),
            Builder::Uuid(b) => b.append_null(),
            Builder::Null(n) => *n += 1,
            Builder::Undecided(values) => values.push(Value::Null),
            Builder::List(l) => {
                let end = l.offsets.last().copied().unwrap_or(0);
                l.offsets.push(end);
                l.nulls.append_null();
            }
            Builder::Dynamic(d) => {
                d.type_ids.push(DYN_NULL);
                d.offsets.push(d.nulls as i32);
                d.nulls += 1;
            }
        }
    }

    /// Text lent by the engine.
    fn text(&mut self, text: &str) -> std::result::Result<(), Misfit> {
        match self {
            Builder::Text(b) => b.append_value(text),
            Builder::Undecided(values) => values.push(Value::Text(text.to_owned())),
            Builder::Dynamic(d) => {
                d.type_ids.push(DYN_TEXT);
                d.offsets.push(d.texts.len() as i32);
                d.texts.append_value(text);
            }
            other => return Err(misfit(&Value::Text(String::new()), other)),
        }
        Ok(())
    }

    fn int(&mut self, v: i64) -> std::result::Result<(), Misfit> {
        match self {
            Builder::Int(b) => b.append_value(v),
            Builder::UInt(b) if v >= 0 => b.append_value(v as u64),
            // Exact as text: a decimal column of an engine that stores whole numbers as integers.
            Builder::Text(b) => b.append_value(itoa::Buffer::new().format(v)),
            // Whole numbers a float holds exactly (a value-typed column whose first batch mixed both).
            Builder::Float(b) if v.unsigned_abs() <= crate::backend::EXACT_IN_DOUBLE => b.append_value(v as f64),
            Builder::Undecided(values) => values.push(Value::Int(v)),
            Builder::Dynamic(d) => {
                d.type_ids.push(DYN_INT);
                d.offsets.push(d.ints.len() as i32);
                d.ints.append_value(v);
            }
            other => return Err(misfit(&Value::Int(v), other)),
        }
        Ok(())
    }

    fn value(&mut self, value: Value) -> std::result::Result<(), Misfit> {
        match (self, value) {
            (b, Value::Null) => b.null(),
            (Builder::Undecided(values), v) => values.push(v),
            (b, Value::Text(s) | Value::Decimal(s) | Value::Json(s)) => return b.text(&s),
            (b, Value::Int(v)) => return b.int(v),
            (Builder::Bool(b), Value::Bool(v)) => b.append_value(v),
            (Builder::UInt(b), Value::UInt(v)) => b.append_value(v),
            (Builder::Int(b), Value::UInt(v)) if v <= i64::MAX as u64 => b.append_value(v as i64),
            (Builder::Text(b), Value::UInt(v)) => b.append_value(itoa::Buffer::new().format(v)),
            (Builder::Float(b), Value::Float(v)) => b.append_value(v),
            // Shortest text that reads back as the same float; the other
            // values spelled as decimal text spells them.
            (Builder::Text(b), Value::Float(v)) if v.is_finite() => b.append_value(v.to_string()),
            (Builder::Text(b), Value::Float(v)) => b.append_value(if v.is_nan() {
                "NaN"
            } else if v > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            }),
            (Builder::Bytes(b), Value::Bytes(v)) => b.append_value(v),
            (Builder::Date(b), Value::Date(d)) => b.append_value(d.num_days_from_ce() - UNIX_EPOCH_DAYS_FROM_CE),
            (Builder::Time(_), Value::Time(_, Some(_))) => {
                return Err("a time with a time zone has no Arrow type; cast it to time or text".into())
            }
            (Builder::Time(b), Value::Time(t, None)) => {
                let nanos = i64::from(t.num_seconds_from_midnight()) * 1_000_000_000 + i64::from(t.nanosecond());
                // chrono keeps PostgreSQL's 24:00:00 as a leap second past 23:59:59.
                if nanos >= NANOS_PER_DAY {
                    return Err("24:00:00 is past the end of Arrow's time of day; cast it to text".into());
                }
                b.append_value(nanos)
            }
            (Builder::Timestamp(b, false), Value::Timestamp(t)) => {
                b.append_value(micros(t.and_utc().timestamp(), t.nanosecond())?)
            }
            (Builder::Timestamp(b, true), Value::TimestampTz(t)) => {
                b.append_value(micros(t.timestamp(), t.nanosecond())?)
            }
            (
                Builder::Interval(b),
                Value::Interval {
                    months,
                    days,
                    microseconds,
                },
            ) => {
                let nanos = microseconds
                    .checked_mul(1000)
                    .ok_or("the interval's time part is too long for Arrow's nanosecond intervals")?;
                b.append_value(IntervalMonthDayNano::new(months, days, nanos))
            }
            (Builder::Uuid(b), Value::Uuid(u)) => b.append_value(u.as_bytes()).map_err(|e| e.to_string())?,
            (Builder::List(l), Value::List(items)) => {
                for item in items {
                    l.items.value(item)?;
                }
                let end = l.offsets.last().copied().unwrap_or(0);
                let count = i32::try_from(l.items.len() - end as usize).map_err(|_| "the list is too long")?;
                l.offsets.push(end + count);
                l.nulls.append_non_null();
            }
            (Builder::Dynamic(d), Value::Float(v)) => {
                d.type_ids.push(DYN_FLOAT);
                d.offsets.push(d.floats.len() as i32);
                d.floats.append_value(v);
            }
            (Builder::Dynamic(d), Value::Bytes(v)) => {
                d.type_ids.push(DYN_BYTES);
                d.offsets.push(d.bytes.len() as i32);
                d.bytes.append_value(v);
            }
            (b, v) => return Err(misfit(&v, b)),
        }
        Ok(())
    }

    fn len(&self) -> usize {
        match self {
            Builder::Bool(b) => b.len(),
            Builder::Int(b) => b.len(),
            Builder::UInt(b) => b.len(),
            Builder::Float(b) => b.len(),
            Builder::Text(b) => b.len(),
            Builder::Bytes(b) => b.len(),
            Builder::Date(b) => b.len(),
            Builder::Time(b) => b.len(),
            Builder::Timestamp(b, _) => b.len(),
            Builder::Interval(b) => b.len(),
            Builder::Uuid(b) => b.len(),
            Builder::List(l) => l.offsets.len() - 1,
            Builder::Dynamic(d) => d.type_ids.len(),
            Builder::Null(n) => *n,
            Builder::Undecided(values) => values.len(),
        }
    }

    /// The column's values so far, leaving the builder empty.
    fn finish(&mut self) -> std::result::Result<ArrayRef, ArrowError> {
        Ok(match self {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Int(b) => Arc::new(b.finish()),
            Builder::UInt(b) => Arc::new(b.finish()),
            Builder::Float(b) => Arc::new(b.finish()),
            Builder::Text(b) => Arc::new(b.finish()),
            Builder::Bytes(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Time(b) => Arc::new(b.finish()),
            Builder::Timestamp(b, _) => Arc::new(b.finish()),
            Builder::Null(n) => Arc::new(NullArray::new(std::mem::take(n))),
            // `decide` replaced it before any batch is finished.
            Builder::Undecided(values) => Arc::new(NullArray::new(std::mem::take(values).len())),
            Builder::Interval(b) => Arc::new(b.finish()),
            Builder::Uuid(b) => Arc::new(b.finish()),
            Builder::List(l) => {
                let offsets = std::mem::replace(&mut l.offsets, vec![0]);
                Arc::new(ListArray::try_new(
                    l.field.clone(),
                    OffsetBuffer::new(ScalarBuffer::from(offsets)),
                    l.items.finish()?,
                    l.nulls.finish(),
                )?)
            }
            Builder::Dynamic(d) => {
                let children: Vec<ArrayRef> = vec![
                    Arc::new(NullArray::new(std::mem::take(&mut d.nulls))),
                    Arc::new(d.ints.finish()),
                    Arc::new(d.floats.finish()),
                    Arc::new(d.texts.finish()),
                    Arc::new(d.bytes.finish()),
                ];
                Arc::new(UnionArray::try_new(
                    dynamic_fields(),
                    ScalarBuffer::from(std::mem::take(&mut d.type_ids)),
                    Some(ScalarBuffer::from(std::mem::take(&mut d.offsets))),
                    children,
                )?)
            }
        })
    }
}

/// Rows into Arrow record batches, written as pieces of one IPC stream.
pub struct ArrowBatches {
    /// The schema's fields; those of columns typed value by value change
    /// when the first batch decides their type.
    fields: Vec<Field>,
    /// The schema and the stream it starts, once the types are all known.
    writing: Option<(SchemaRef, StreamWriter<Vec<u8>>)>,
    names: Vec<String>,
    columns: Vec<Builder>,
    /// Column of the next value of the row in progress.
    next: usize,
    /// Complete rows in the builders, and rows sent before them.
    rows: usize,
    rows_before: u64,
    /// About how many bytes the builders hold, and held at the last finished row.
    bytes: usize,
    finished_bytes: usize,
    /// The first value of the row in progress that did not fit.
    misfit: Option<(usize, Misfit)>,
    /// Columns typed value by value (from their first batch).
    by_value: Vec<bool>,
    /// The row in progress has a value past what a message may carry.
    too_large: bool,
}

impl ArrowBatches {
    pub fn new(columns: &[Column]) -> Result<Self> {
        let fields = fields(columns)?;
        Ok(ArrowBatches {
            columns: columns
                .iter()
                .zip(&fields)
                .map(|(c, f)| match c.column_type {
                    ColumnType::Dynamic => Builder::Undecided(Vec::new()),
                    _ => Builder::new(f.data_type(), 0, 0),
                })
                .collect(),
            names: columns.iter().map(|c| c.name.clone()).collect(),
            by_value: columns.iter().map(|c| c.column_type == ColumnType::Dynamic).collect(),
            too_large: false,
            fields,
            writing: None,
            next: 0,
            rows: 0,
            rows_before: 0,
            bytes: 0,
            finished_bytes: 0,
            misfit: None,
        })
    }

    /// Types the columns typed value by value from the values they hold
    /// (the first batch's), and starts the stream with the schema.
    fn start(&mut self) -> Result<(SchemaRef, StreamWriter<Vec<u8>>)> {
        for ((builder, field), name) in self.columns.iter_mut().zip(&mut self.fields).zip(&self.names) {
            let Builder::Undecided(values) = builder else { continue };
            let data_type = decided_type(values);
            let mut decided = Builder::new(&data_type, values.len(), 0);
            for (row, value) in std::mem::take(values).into_iter().enumerate() {
                decided.value(value).map_err(|message| Error::NotArrow {
                    row: Some(self.rows_before + row as u64),
                    column: name.clone(),
                    message,
                })?;
            }
            *builder = decided;
            *field = field.clone().with_data_type(data_type);
        }
        let schema = Arc::new(Schema::new(self.fields.clone()));
        let writer = StreamWriter::try_new(Vec::new(), &schema).map_err(internal)?;
        Ok((schema, writer))
    }

    fn writing(&mut self) -> Result<&mut (SchemaRef, StreamWriter<Vec<u8>>)> {
        if self.writing.is_none() {
            self.writing = Some(self.start()?);
        }
        self.writing
            .as_mut()
            .ok_or_else(|| internal(ArrowError::InvalidArgumentError("no Arrow stream".into())))
    }

    fn put(&mut self, size: usize, add: impl FnOnce(&mut Builder) -> std::result::Result<(), Misfit>) {
        let column = self.next;
        self.next += 1;
        if self.misfit.is_some() || self.too_large {
            return;
        }
        // Refused before Arrow's builders take it: past 2 GiB their offsets
        // overflow, and they panic.
        if size > MAX_ROW_BYTES {
            self.too_large = true;
            return;
        }
        self.bytes += size;
        let result = match self.columns.get_mut(column) {
            Some(builder) => add(builder),
            None => Err("the row has more values than the result has columns".into()),
        };
        if let Err(why) = result {
            self.misfit = Some((column, why));
        }
    }

    /// Ends the row whose values were given.
    pub fn finish_row(&mut self) -> Result<()> {
        if self.too_large {
            return Err(BackendError::RowTooLarge { limit: MAX_ROW_BYTES }.into());
        }
        if let Some((column, message)) = self.misfit.take() {
            return Err(Error::NotArrow {
                row: Some(self.rows_before + self.rows as u64),
                column: self.names.get(column).cloned().unwrap_or_default(),
                message,
            });
        }
        self.next = 0;
        self.rows += 1;
        self.finished_bytes = self.bytes;
        Ok(())
    }

    /// Complete rows waiting in the batch in progress.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// About how many bytes the complete rows of the batch in progress hold
    /// (not the row being given, as the row encoder's count does not).
    pub fn finished_bytes(&self) -> usize {
        self.finished_bytes
    }

    /// The IPC bytes written since the last call: the schema message comes
    /// with the first.
    fn written(writer: &mut StreamWriter<Vec<u8>>) -> Vec<u8> {
        // The next batch is about as large: room for it now, no regrowth.
        let room = writer.get_ref().len();
        std::mem::replace(writer.get_mut(), Vec::with_capacity(room))
    }

    /// The batch in progress as IPC bytes (after the schema, the first time).
    pub fn take(&mut self) -> Result<Vec<u8>> {
        let schema = self.writing()?.0.clone();
        let arrays = self
            .columns
            .iter_mut()
            .map(Builder::finish)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(internal)?;
        // Finished builders keep none of their buffers: the next batch, about
        // as large, gets room for itself at once instead of growing into it.
        for ((builder, field), array) in self.columns.iter_mut().zip(schema.fields()).zip(&arrays) {
            *builder = Builder::new(field.data_type(), self.rows, data_bytes(array.as_ref()));
        }
        // The row count is given for results without columns (`SELECT FROM t`).
        let options = RecordBatchOptions::new().with_row_count(Some(self.rows));
        let batch = RecordBatch::try_new_with_options(schema, arrays, &options).map_err(internal)?;
        let (_, writer) = self.writing()?;
        writer.write(&batch).map_err(internal)?;
        let piece = Self::written(writer);
        self.rows_before += self.rows as u64;
        self.rows = 0;
        self.bytes = 0;
        self.finished_bytes = 0;
        Ok(piece)
    }

    /// What ends the stream: the schema too when no batch was sent, then the
    /// end-of-stream marker.
    pub fn end(&mut self) -> Result<Vec<u8>> {
        let (_, writer) = self.writing()?;
        writer.finish().map_err(internal)?;
        Ok(Self::written(writer))
    }
}

fn internal(e: ArrowError) -> Error {
    Error::Backend(BackendError::Internal(format!("encoding an Arrow batch failed: {e}")))
}

impl ArrowBatches {
    /// Whether the next value, a number, goes to a column its first batch
    /// typed as text: the text builder's exact conversions of numbers are
    /// for declared decimal columns, while a column typed value by value
    /// keeps each value's kind (a number there would arrive as text).
    fn number_for_text_by_value(&self) -> bool {
        self.by_value.get(self.next).copied().unwrap_or(false)
            && matches!(self.columns.get(self.next), Some(Builder::Text(_)))
    }

    fn misfit_number(&mut self) {
        self.put(0, |_| {
            Err(
                "a number in a column its first batch typed as text; cast the column so that every row has one type"
                    .into(),
            )
        });
    }
}

impl RowSink for ArrowBatches {
    fn value(&mut self, value: Value) {
        if matches!(value, Value::Int(_) | Value::UInt(_) | Value::Float(_)) && self.number_for_text_by_value() {
            return self.misfit_number();
        }
        let size = arrow_size(&value);
        self.put(size, |b| b.value(value));
    }

    fn text(&mut self, text: &str) {
        self.put(text.len() + 4, |b| b.text(text));
    }

    fn int(&mut self, value: i64) {
        if self.number_for_text_by_value() {
            return self.misfit_number();
        }
        self.put(8, |b| b.int(value));
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType};
    use arrow_array::Array;
    use arrow_ipc::reader::StreamReader;
    use chrono::{NaiveDate, TimeZone, Utc};

    use super::*;

    fn read(pieces: &[Vec<u8>]) -> (SchemaRef, Vec<RecordBatch>) {
        let stream = pieces.concat();
        let reader = StreamReader::try_new(std::io::Cursor::new(stream), None).unwrap();
        let schema = reader.schema();
        (schema, reader.collect::<std::result::Result<Vec<_>, _>>().unwrap())
    }

    /// NULLs take room in the batch (their column's width, or a whole value
    /// while the column's type is unknown), so a result of NULLs is cut into
    /// batches like any other instead of growing one without bound.
    #[test]
    fn nulls_count_toward_the_batch_size() {
        let columns = vec![Column::new("i", "interval", ColumnType::Interval)];
        let mut batches = ArrowBatches::new(&columns).unwrap();
        for _ in 0..1000 {
            batches.value(Value::Null);
            batches.finish_row().unwrap();
        }
        assert!(batches.finished_bytes() >= 16 * 1000, "{}", batches.finished_bytes());
    }

    #[test]
    fn typed_rows_read_back_as_the_same_values() {
        let columns = vec![
            Column::new("id", "int8", ColumnType::Int),
            Column::new("name", "text", ColumnType::String),
            Column::new("at", "timestamptz", ColumnType::TimestampTz),
            Column {
                element_type: Some(ColumnType::Int),
                ..Column::new("tags", "_int4", ColumnType::List)
            },
            Column::new("price", "numeric", ColumnType::Decimal),
            Column::new("u", "uuid", ColumnType::Uuid),
        ];
        let mut batches = ArrowBatches::new(&columns).unwrap();
        let at = Utc.with_ymd_and_hms(2026, 12, 4, 10, 0, 0).unwrap();
        let u = uuid::Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        batches.int(1);
        batches.text("ä");
        batches.value(Value::TimestampTz(at));
        batches.value(Value::List(vec![Value::Int(1), Value::Null, Value::Int(3)]));
        batches.value(Value::Decimal("12.50".into()));
        batches.value(Value::Uuid(u));
        batches.finish_row().unwrap();
        let first = batches.take().unwrap();
        for _ in 0..2 {
            for _ in 0..columns.len() {
                batches.value(Value::Null);
            }
            batches.finish_row().unwrap();
        }
        let second = batches.take().unwrap();
        let end = batches.end().unwrap();
        let (schema, read) = read(&[first, second, end]);
        assert_eq!(schema.field(0).metadata()[NATIVE_TYPE], "int8");
        assert_eq!(schema.field(5).metadata()[EXTENSION_NAME], "arrow.uuid");
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].num_rows(), read[1].num_rows()), (1, 2));
        let b = &read[0];
        assert_eq!(b.column(0).as_primitive::<Int64Type>().value(0), 1);
        assert_eq!(b.column(1).as_string::<i32>().value(0), "ä");
        assert_eq!(
            b.column(2).as_primitive::<TimestampMicrosecondType>().value(0),
            at.timestamp_micros()
        );
        let tags = b.column(3).as_list::<i32>().value(0);
        let tags = tags.as_primitive::<Int64Type>();
        assert_eq!((tags.value(0), tags.is_null(1), tags.value(2)), (1, true, 3));
        assert_eq!(b.column(4).as_string::<i32>().value(0), "12.50");
        assert_eq!(b.column(5).as_fixed_size_binary().value(0), u.as_bytes());
        assert!((0..6).all(|c| read[1].column(c).null_count() == 2));
    }

    #[test]
    fn an_empty_result_still_carries_its_schema() {
        let mut batches = ArrowBatches::new(&[Column::new("d", "date", ColumnType::Date)]).unwrap();
        let (schema, read) = read(&[batches.end().unwrap()]);
        assert_eq!(schema.field(0).data_type(), &DataType::Date32);
        assert!(read.is_empty());
    }

    #[test]
    fn columns_typed_value_by_value_take_the_type_of_their_first_batch() {
        let read_one = |values: Vec<Value>| {
            let mut batches = ArrowBatches::new(&[Column::new("x", "", ColumnType::Dynamic)]).unwrap();
            for v in values {
                batches.value(v);
                batches.finish_row().unwrap();
            }
            let pieces = [batches.take().unwrap(), batches.end().unwrap()];
            read(&pieces).1.remove(0).column(0).clone()
        };
        let ints = read_one(vec![Value::Int(1), Value::Null, Value::Int(3)]);
        assert_eq!(ints.as_primitive::<Int64Type>().values(), &[1, 0, 3]);
        assert!(ints.is_null(1));
        let mixed = read_one(vec![Value::Int(2), Value::Float(0.5)]);
        assert_eq!(mixed.as_primitive::<Float64Type>().values(), &[2.0, 0.5]);
        assert_eq!(read_one(vec![Value::Null, Value::Null]).data_type(), &DataType::Null);
        let texts = read_one(vec![Value::Text("a".into())]);
        assert_eq!(texts.as_string::<i32>().value(0), "a");
        // An integer a float cannot hold exactly keeps the union.
        let big = read_one(vec![Value::Int(i64::MAX), Value::Float(0.5)]);
        assert!(matches!(big.data_type(), DataType::Union(..)));

        // A later batch must fit the type the first one chose.
        let mut batches = ArrowBatches::new(&[Column::new("x", "", ColumnType::Dynamic)]).unwrap();
        batches.int(1);
        batches.finish_row().unwrap();
        batches.take().unwrap();
        batches.text("two");
        let e = batches.finish_row().unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("integer column"), "{e}");
        // Nor does a number become text in a column its first batch typed as text.
        let typed_as_text = || {
            let mut batches = ArrowBatches::new(&[Column::new("x", "", ColumnType::Dynamic)]).unwrap();
            batches.text("n/a");
            batches.finish_row().unwrap();
            batches.take().unwrap();
            batches
        };
        for number in [Value::Int(2), Value::Float(0.5)] {
            let mut batches = typed_as_text();
            batches.value(number);
            let e = batches.finish_row().unwrap_err().to_string();
            assert!(e.contains("row 1") && e.contains("typed as text"), "{e}");
        }
        let mut batches = typed_as_text();
        batches.int(3);
        assert!(batches.finish_row().is_err());
        // A value past what a message may carry is refused before Arrow's
        // builders take it.
        let mut batches = ArrowBatches::new(&[Column::new("t", "text", ColumnType::String)]).unwrap();
        batches.text(&"x".repeat(MAX_ROW_BYTES + 1));
        let e = batches.finish_row().unwrap_err().to_string();
        assert!(e.contains("more than one message may carry"), "{e}");
        // A declared decimal column still takes whole numbers as exact text.
        let mut batches = ArrowBatches::new(&[Column::new("d", "numeric", ColumnType::Decimal)]).unwrap();
        batches.int(7);
        batches.finish_row().unwrap();
        // With no rows at all the column is Null.
        let mut batches = ArrowBatches::new(&[Column::new("x", "", ColumnType::Dynamic)]).unwrap();
        let (schema, _) = read(&[batches.end().unwrap()]);
        assert_eq!(schema.field(0).data_type(), &DataType::Null);
    }

    #[test]
    fn results_without_columns_keep_their_row_count() {
        let mut batches = ArrowBatches::new(&[]).unwrap();
        for _ in 0..3 {
            batches.finish_row().unwrap();
        }
        let (_, read) = read(&[batches.take().unwrap(), batches.end().unwrap()]);
        assert_eq!(read[0].num_rows(), 3);
    }

    #[test]
    fn sub_microsecond_digits_round_to_the_nearest_microsecond() {
        let day = NaiveDate::from_ymd_opt(1969, 12, 31).unwrap();
        let mut batches = ArrowBatches::new(&[Column::new("t", "datetime", ColumnType::Timestamp)]).unwrap();
        // SQL Server datetime ticks (1/300 s), and a time just before 1970.
        for nanos in [3_333_333, 6_666_667, 999_999_600] {
            batches.value(Value::Timestamp(day.and_hms_nano_opt(23, 59, 59, nanos).unwrap()));
            batches.finish_row().unwrap();
        }
        let (_, read) = read(&[batches.take().unwrap(), batches.end().unwrap()]);
        let t = read[0].column(0).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(t.values(), &[-996_667, -993_333, 0]);
    }

    #[test]
    fn values_of_varying_types_go_into_a_union() {
        let mut batches = ArrowBatches::new(&[Column::new("x", "", ColumnType::Dynamic)]).unwrap();
        for v in [
            Value::Int(7),
            Value::Null,
            Value::Text("a".into()),
            Value::Float(1.5),
            Value::Bytes(vec![0]),
        ] {
            batches.value(v);
            batches.finish_row().unwrap();
        }
        let pieces = [batches.take().unwrap(), batches.end().unwrap()];
        let (_, read) = read(&pieces);
        let union = read[0].column(0).as_union();
        assert_eq!(union.type_ids(), &[DYN_INT, DYN_NULL, DYN_TEXT, DYN_FLOAT, DYN_BYTES]);
        assert_eq!(union.value(2).as_string::<i32>().value(0), "a");
    }

    #[test]
    fn values_an_arrow_type_cannot_hold_name_their_row_and_column() {
        let columns = [
            Column::new("t", "timestamp", ColumnType::Timestamp),
            Column::new("n", "int4", ColumnType::Int),
        ];
        let mut batches = ArrowBatches::new(&columns).unwrap();
        let t = NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_nano_opt(0, 0, 0, 100)
            .unwrap();
        batches.value(Value::Timestamp(t.with_nanosecond(1000).unwrap()));
        batches.int(1);
        batches.finish_row().unwrap();
        batches.value(Value::TimestampTz(t.and_utc()));
        batches.int(2);
        let e = batches.finish_row().unwrap_err().to_string();
        assert!(
            e.contains("row 1") && e.contains("\"t\"") && e.contains("its timestamp column"),
            "{e}"
        );

        let mut batches = ArrowBatches::new(&columns).unwrap();
        batches.value(Value::Null);
        batches.text("x");
        let e = batches.finish_row().unwrap_err().to_string();
        assert!(
            e.contains("row 0") && e.contains("\"n\"") && e.contains("kind string, which its integer column"),
            "{e}"
        );

        // Text in a binary column (SQLite keeps any value in any column).
        let mut batches = ArrowBatches::new(&[Column::new("b", "BLOB", ColumnType::Bytes)]).unwrap();
        batches.text("x");
        assert!(batches.finish_row().is_err());
        // PostgreSQL's 24:00:00 is past Arrow's time of day.
        let mut batches = ArrowBatches::new(&[Column::new("t", "time", ColumnType::Time)]).unwrap();
        batches.value(Value::Time(
            chrono::NaiveTime::from_hms_nano_opt(23, 59, 59, 1_000_000_000).unwrap(),
            None,
        ));
        assert!(batches.finish_row().unwrap_err().to_string().contains("24:00:00"));

        let time = Column::new("tz", "timetz", ColumnType::Time);
        let mut batches = ArrowBatches::new(&[time]).unwrap();
        batches.value(Value::Time(t.time(), Some(3600)));
        assert!(batches.finish_row().unwrap_err().to_string().contains("time zone"));
    }

    #[test]
    fn columns_without_an_arrow_type_are_refused_before_any_row() {
        let nested = Column {
            element_type: Some(ColumnType::List),
            ..Column::new("m", "_int4", ColumnType::List)
        };
        let e = ArrowBatches::new(&[nested]).err().unwrap().to_string();
        assert!(e.contains("\"m\""), "{e}");
    }
}

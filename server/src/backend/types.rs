//! Domain types shared by every engine: values, columns, statements and
//! schema descriptions.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

/// A typed value, engine-independent.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// Exact decimal as text.
    Decimal(String),
    Date(NaiveDate),
    /// Time of day; the offset (seconds east of UTC) for time-with-time-zone.
    Time(NaiveTime, Option<i32>),
    /// Wall-clock timestamp without a zone.
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
    Interval {
        months: i32,
        days: i32,
        microseconds: i64,
    },
    Uuid(uuid::Uuid),
    /// JSON document text.
    Json(String),
    List(Vec<Value>),
}

/// Whole numbers up to 2^53 in magnitude are exact in a double.
pub const EXACT_IN_DOUBLE: u64 = 1 << 53;
/// And up to 2^24 in a single-precision float.
pub const EXACT_IN_FLOAT: u64 = 1 << 24;

/// The float a decimal's special value stands for (`NaN`, `Infinity`,
/// signed, the spellings PostgreSQL's numeric writes and the API admits),
/// or None for a number.
pub fn special_decimal(s: &str) -> Option<f64> {
    let negative = s.starts_with('-');
    match s.strip_prefix(['-', '+']).unwrap_or(s) {
        "NaN" => Some(f64::NAN),
        "Infinity" if negative => Some(f64::NEG_INFINITY),
        "Infinity" => Some(f64::INFINITY),
        _ => None,
    }
}

/// What a float (`single`: 24 bits of mantissa, else 53) keeps of the
/// decimal number `s`, when that is not `s` itself: the digits past what it
/// holds are lost. None when it holds `s` (reads back as the same number),
/// or when `s` is no finite decimal number (the engine judges those).
pub fn decimal_rounded_in_float(s: &str, single: bool) -> Option<String> {
    // The shortest text that reads back as the float, and its exact value
    // (Rust prints as many digits as asked exactly; 1100 places reach the
    // smallest double).
    let (kept, exact) = if single {
        let f: f32 = s.trim().parse().ok()?;
        f.is_finite().then(|| (f.to_string(), format!("{f:.1100}")))?
    } else {
        let f: f64 = s.trim().parse().ok()?;
        f.is_finite().then(|| (f.to_string(), format!("{f:.1100}")))?
    };
    let sent = normalized_decimal(s)?;
    (sent != normalized_decimal(&kept)? && sent != normalized_decimal(&exact)?).then_some(kept)
}

/// A decimal number as (negative, its significant digits, the power of ten
/// of the last): `1.10` and `11e-1` are both `(false, "11", -1)`; zero is
/// `(false, "", 0)`, whatever its sign.
fn normalized_decimal(s: &str) -> Option<(bool, String, i64)> {
    let s = s.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    // Exponents past what any float reaches are left to the engine.
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (
            &s[..i],
            s[i + 1..]
                .parse::<i64>()
                .ok()
                .filter(|e| (-100_000..100_000).contains(e))?,
        ),
        None => (s, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (whole.is_empty() && fraction.is_empty()) || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let significant = digits.trim_start_matches('0').trim_end_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    let trailing_zeros = digits.len() - digits.trim_end_matches('0').len();
    let exponent = exponent - fraction.len() as i64 + trailing_zeros as i64;
    Some((negative, significant.to_string(), exponent))
}

impl Value {
    /// The magnitude of an integer a double would round, past 2^53.
    pub fn rounded_in_double(&self) -> Option<u64> {
        self.rounded_past(EXACT_IN_DOUBLE)
    }

    /// An integer's magnitude when it is past `exact`, the largest whole
    /// number a floating-point type holds with every one below it.
    pub fn rounded_past(&self, exact: u64) -> Option<u64> {
        let magnitude = match self {
            Value::Int(i) => i.unsigned_abs(),
            Value::UInt(u) => *u,
            _ => return None,
        };
        (magnitude > exact).then_some(magnitude)
    }

    /// The name of its kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int64",
            Value::UInt(_) => "uint64",
            Value::Float(_) => "double",
            Value::Text(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Decimal(_) => "decimal",
            Value::Date(_) => "date",
            Value::Time(..) => "time",
            Value::Timestamp(_) | Value::TimestampTz(_) => "timestamp",
            Value::Interval { .. } => "interval",
            Value::Uuid(_) => "uuid",
            Value::Json(_) => "json",
            Value::List(_) => "list",
        }
    }

    /// Bytes it takes in memory, its heap part included.
    pub fn size(&self) -> usize {
        let heap = match self {
            Value::Text(s) | Value::Decimal(s) | Value::Json(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::List(items) => items.iter().map(Value::size).sum(),
            _ => 0,
        };
        std::mem::size_of::<Value>() + heap
    }
}

pub type Row = Vec<Value>;

/// The normalized family of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Bool,
    Int,
    UInt,
    Float,
    Decimal,
    String,
    Bytes,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Interval,
    Uuid,
    Json,
    List,
    /// Each value carries its own type (SQLite expressions).
    Dynamic,
    /// Described by DescribeTable, but its values cannot be represented:
    /// selecting it fails with a message that suggests a cast.
    Unsupported,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub native_type: String,
    pub column_type: ColumnType,
    pub element_type: Option<ColumnType>,
    pub nullable: bool,
    pub precision: Option<i32>,
    pub scale: Option<i32>,
    pub max_length: Option<i64>,
}

impl Column {
    pub fn new(name: impl Into<String>, native_type: impl Into<String>, column_type: ColumnType) -> Self {
        Self {
            name: name.into(),
            native_type: native_type.into(),
            column_type,
            element_type: None,
            nullable: true,
            precision: None,
            scale: None,
            max_length: None,
        }
    }
}

/// A statement and its positional parameters.
#[derive(Debug, Clone, Default)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Value>,
    /// The caller takes the whole result at once (unary Execute), so the
    /// statement may share a pipelined connection: a slow reader of a
    /// stream would hold up every statement behind it.
    pub whole_result: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    #[default]
    EngineDefault,
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

/// Every isolation level, for engines that honour (or exceed) them all.
pub const ALL_ISOLATION_LEVELS: [Isolation; 4] = [
    Isolation::ReadUncommitted,
    Isolation::ReadCommitted,
    Isolation::RepeatableRead,
    Isolation::Serializable,
];

#[derive(Debug, Clone, Copy, Default)]
pub struct TxOptions {
    pub isolation: Isolation,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Mysql,
    Sqlite,
    Mssql,
    Kafka,
}

impl Engine {
    /// Lower-case name, as logs and traces show it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
            Engine::Sqlite => "sqlite",
            Engine::Mssql => "mssql",
            Engine::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Capabilities {
    /// SQL statements (QueryService, SchemaService, BulkLoadService).
    pub query: bool,
    /// Kafka topics (StreamService produce/consume).
    pub kafka: bool,
    pub transactions: bool,
    pub isolation_levels: Vec<Isolation>,
    pub change_streams: bool,
    pub parameter_style: &'static str,
    pub load_modes: Vec<super::LoadMode>,
    /// Schema names compare exactly, whatever the server's settings
    /// (PostgreSQL): one in another case is another schema.
    pub schema_names_exact: bool,
}

impl Capabilities {
    /// A SQL engine with transactions at every isolation level (or stronger).
    pub fn sql(parameter_style: &'static str) -> Self {
        Self {
            query: true,
            kafka: false,
            transactions: true,
            isolation_levels: ALL_ISOLATION_LEVELS.to_vec(),
            change_streams: false,
            parameter_style,
            load_modes: super::bulk::ALL_LOAD_MODES.to_vec(),
            schema_names_exact: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub server_version: String,
    pub database: String,
    pub user: String,
    /// One round trip to the engine on a pooled connection.
    pub round_trip: std::time::Duration,
    /// Kafka: brokers in the cluster, and its id.
    pub brokers: u32,
    pub cluster_id: String,
}

#[derive(Debug, Clone)]
pub struct SchemaInfo {
    pub name: String,
    pub system: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Table,
    View,
    MaterializedView,
    ForeignTable,
    PartitionedTable,
}

#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub kind: TableKind,
    pub row_estimate: Option<i64>,
    pub comment: String,
}

/// Which of a ListTables call's tables to read: those after `after` in
/// (schema, name) order with names compared as bytes, as the engine orders
/// them, so that a page ends and the next begins at the same place; at most
/// `limit` of them.
#[derive(Debug, Clone, Default)]
pub struct TablePage {
    pub after: Option<(String, String)>,
    pub limit: Option<u32>,
}

/// How the engine fills a column: what an INSERT or a load may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColumnGeneration {
    #[default]
    None,
    /// Numbered by the engine; naming it needs an override (PostgreSQL
    /// OVERRIDING SYSTEM VALUE, SQL Server IDENTITY_INSERT).
    IdentityAlways,
    /// Numbered by the engine when left out; a value given is taken.
    IdentityByDefault,
    /// Computed from other columns; never written.
    Computed,
}

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub column: Column,
    pub ordinal: i32,
    pub default_expression: String,
    pub comment: String,
    pub generation: ColumnGeneration,
    /// A computed column's expression as the engine prints it; empty otherwise.
    pub generation_expression: String,
}

#[derive(Debug, Clone)]
pub struct PrimaryKey {
    pub name: String,
    pub columns: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ForeignKey {
    pub name: String,
    pub columns: Vec<String>,
    pub referenced_schema: String,
    pub referenced_table: String,
    pub referenced_columns: Vec<String>,
    pub on_update: String,
    pub on_delete: String,
}

#[derive(Debug, Clone)]
pub struct Index {
    pub name: String,
    /// The key columns, in order (not PostgreSQL's or SQL Server's INCLUDE columns).
    pub columns: Vec<String>,
    pub unique: bool,
    pub primary: bool,
    pub method: String,
    /// Over the rows a predicate selects only (a partial or filtered index).
    pub partial: bool,
}

#[derive(Debug, Clone)]
pub struct TableDescription {
    pub table: TableInfo,
    pub columns: Vec<ColumnInfo>,
    pub primary_key: Option<PrimaryKey>,
    pub foreign_keys: Vec<ForeignKey>,
    pub indexes: Vec<Index>,
    /// Whether WatchChanges can follow this table, and why not.
    pub change_stream_ready: bool,
    pub change_stream_reason: String,
}

#[derive(Debug, Clone, Copy)]
pub struct PoolStatus {
    pub open: u32,
    pub idle: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_a_float_would_round_are_told_with_what_it_keeps() {
        let kept = |s, single| decimal_rounded_in_float(s, single);
        assert_eq!(kept("9007199254740993", false).as_deref(), Some("9007199254740992"));
        assert_eq!(kept("16777217", true).as_deref(), Some("16777216"));
        assert_eq!(
            kept("3.14159265358979323846", false).as_deref(),
            Some("3.141592653589793")
        );
        assert_eq!(kept("1e-400", false).as_deref(), Some("0"), "too small: zero");
        // Held exactly, though its shortest text is shorter (2^-30).
        assert_eq!(kept("0.000000000931322574615478515625", false), None);
        assert_eq!(
            kept("0.1e-9223372036854775808", false),
            None,
            "an exponent past any float's"
        );
        for exact in [
            "0.1",
            "0.30000000000000004",
            "1.10",
            "1e3",
            "-0",
            " 2.5 ",
            "+7",
            "-1.5E-3",
            "123456789012345",
        ] {
            assert_eq!(kept(exact, false), None, "{exact}");
        }
        assert_eq!(kept("0.1", true), None, "a float's 0.1 reads back as 0.1");
        for judged_by_the_engine in ["NaN", "Infinity", "1e400", "abc", "", "."] {
            assert_eq!(kept(judged_by_the_engine, false), None, "{judged_by_the_engine}");
        }
    }
}

//! SQL Server bulk loads: TDS bulk insert (`INSERT BULK`, tiberius
//! `bulk_insert`) into a session temporary table, then one `INSERT ...
//! SELECT` (APPEND, REPLACE after DELETE) or `MERGE` (UPSERT) into the
//! target, all in one transaction.
//!
//! The staging table's column types follow the values Weir sends (bigint,
//! float, nvarchar(max) for exact decimals, ...), not the target's: TDS
//! bulk rows must match their column types exactly, and SQL Server's own
//! conversions then apply when the rows move into the target.

use tiberius::{ColumnData, TokenRow};

use super::types::{decimal_text, numeric, param};
use super::MssqlConn;
use crate::backend::bulk::{self, Dialect, LoadSpec, ReceiptSql, RowFeed};
use crate::backend::{BackendError, Column, ColumnType, LoadMode, LoadOutcome, Value};

/// Session temporary table of a load; dropped before commit, and by the
/// rollback (SQL Server's DDL is transactional) otherwise.
const STAGE: &str = "#weir_load_stage";

pub fn quote(name: &str) -> String {
    bulk::quote_ident(name, '[', ']')
}

const DIALECT: Dialect = Dialect {
    quote,
    placeholder: |i| format!("@P{i}"),
    // A binary collation: the database's (often case-insensitive) would make
    // `Batch-1` and `batch-1` one id, and skip a load as another's replay.
    key_type: "nvarchar(255) COLLATE Latin1_General_100_BIN2",
    text_type: "nvarchar(max)",
    int_type: "bigint",
    timestamp: "datetime2 NOT NULL DEFAULT SYSUTCDATETIME()",
    // Two first loads at once may both find no table: the one that loses
    // the race to create it goes on (error 2714: the name exists).
    create_new: "BEGIN TRY IF OBJECT_ID(N'{name}', N'U') IS NULL CREATE TABLE {table} ({body}) END TRY \
        BEGIN CATCH IF ERROR_NUMBER() <> 2714 THROW; END CATCH",
    insert_new: "INSERT INTO {table} ({columns}) SELECT {values} WHERE NOT EXISTS \
        (SELECT 1 FROM {table} WITH (UPDLOCK, HOLDLOCK) WHERE {key}); SELECT CAST(@@ROWCOUNT AS bigint)",
};

/// The type a staging column is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    BigInt,
    Bit,
    Float,
    /// Exact decimals and money, as plain decimal text (SQL Server's
    /// conversion from text refuses exponents).
    Decimal,
    Text,
    Binary,
    Date,
    Time,
    DateTime2,
    DateTimeOffset,
    Guid,
}

/// Why a load would refuse `value` for `column` (a bigint's range, a value
/// longer than bulk rows take, NaN, a date before year 1): the staging
/// conversion itself, so that the two never disagree, but text and bytes
/// going as such, which only their length can fail, without a copy.
pub fn refusal(column: &Column, value: &Value) -> Option<String> {
    let stage = Stage::of(column);
    match (stage, value) {
        (Stage::Text, Value::Text(s) | Value::Json(s)) => text_fits(s).err(),
        (Stage::Binary, Value::Bytes(b)) => binary_fits(b).err(),
        _ => stage.value(value).err(),
    }
}

impl Stage {
    fn of(column: &Column) -> Self {
        match column.column_type {
            ColumnType::Bool => Stage::Bit,
            ColumnType::Int | ColumnType::UInt => Stage::BigInt,
            ColumnType::Float => Stage::Float,
            ColumnType::Bytes => Stage::Binary,
            ColumnType::Date => Stage::Date,
            ColumnType::Time => Stage::Time,
            ColumnType::Timestamp => Stage::DateTime2,
            ColumnType::TimestampTz => Stage::DateTimeOffset,
            ColumnType::Uuid => Stage::Guid,
            ColumnType::Decimal => Stage::Decimal,
            // Text, JSON and anything else go as text, converted by SQL Server.
            _ => Stage::Text,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Stage::BigInt => "bigint",
            Stage::Bit => "bit",
            Stage::Float => "float",
            // In the database's collation, not tempdb's (the server's): a
            // MERGE comparing text keys across two collations fails (error 468).
            Stage::Text => "nvarchar(max) COLLATE DATABASE_DEFAULT",
            Stage::Decimal => "varchar(100)",
            Stage::Binary => "varbinary(max)",
            Stage::Date => "date",
            Stage::Time => "time(7)",
            Stage::DateTime2 => "datetime2(7)",
            Stage::DateTimeOffset => "datetimeoffset(7)",
            Stage::Guid => "uniqueidentifier",
        }
    }

    fn null(self) -> ColumnData<'static> {
        match self {
            Stage::BigInt => ColumnData::I64(None),
            Stage::Bit => ColumnData::Bit(None),
            Stage::Float => ColumnData::F64(None),
            Stage::Text | Stage::Decimal => ColumnData::String(None),
            Stage::Binary => ColumnData::Binary(None),
            Stage::Date => ColumnData::Date(None),
            Stage::Time => ColumnData::Time(None),
            Stage::DateTime2 => ColumnData::DateTime2(None),
            Stage::DateTimeOffset => ColumnData::DateTimeOffset(None),
            Stage::Guid => ColumnData::Guid(None),
        }
    }

    /// The value as this staging type expects it.
    fn value(self, v: &Value) -> Result<ColumnData<'static>, String> {
        let text = |s: String| ColumnData::String(Some(s.into()));
        let data = match (self, v) {
            (_, Value::Null) => self.null(),
            (Stage::BigInt, Value::UInt(u)) => ColumnData::I64(Some(
                i64::try_from(*u).map_err(|_| format!("{u} is beyond SQL Server's bigint"))?,
            )),
            (Stage::Float, Value::Int(i)) => ColumnData::F64(Some(*i as f64)),
            (Stage::Float, Value::UInt(u)) => ColumnData::F64(Some(*u as f64)),
            (Stage::Float, Value::Decimal(d)) => {
                ColumnData::F64(Some(d.parse().map_err(|_| format!("'{d}' is not a number"))?))
            }
            (Stage::Decimal, Value::Decimal(d)) => {
                let n = numeric(d)?;
                text(decimal_text(n.value(), n.scale()))
            }
            // Through SQL Server's own decimal, so that a double past its 38
            // digits (1e-200) is the row's error, not the staging column's.
            (Stage::Decimal, Value::Float(f)) if f.is_finite() => {
                let n = numeric(&format!("{f:?}"))?;
                text(decimal_text(n.value(), n.scale()))
            }
            (Stage::Text, Value::Decimal(d)) => text(d.clone()),
            (Stage::Text | Stage::Decimal, Value::Int(i)) => text(i.to_string()),
            (Stage::Text | Stage::Decimal, Value::UInt(u)) => text(u.to_string()),
            (Stage::Text, Value::Float(f)) => text(format!("{f:?}")),
            (Stage::Text, Value::Bool(b)) => text(u8::from(*b).to_string()),
            (Stage::Text, Value::Uuid(u)) => text(u.to_string()),
            (Stage::Guid, Value::Text(s)) => ColumnData::Guid(Some(
                uuid::Uuid::parse_str(s).map_err(|_| format!("'{s}' is not a UUID"))?,
            )),
            _ => param(v)?,
        };
        // TDS bulk rows must match their column's type exactly; anything
        // else would fail the whole load as a protocol error.
        if std::mem::discriminant(&data) != std::mem::discriminant(&self.null()) {
            return Err(format!(
                "a {} value cannot be loaded into this column (sent as {})",
                v.kind(),
                self.sql()
            ));
        }
        // Refused here, as the row's error: past this point they would fail
        // the whole load (the bulk encoder holds every value, `(max)` ones
        // too, to 65,535 bytes; SQL Server's float has no NaN or infinity).
        match &data {
            ColumnData::String(Some(s)) => text_fits(s).map(|()| data),
            ColumnData::Binary(Some(b)) => binary_fits(b).map(|()| data),
            ColumnData::F64(Some(f)) if !f.is_finite() => Err(format!(
                "{f} cannot be stored: SQL Server's float has no NaN or infinity"
            )),
            _ => Ok(data),
        }
    }
}

/// The most bytes one value of a SQL Server load may take on the wire
/// (tiberius checks every value against the length a `(max)` column
/// reports, 0xFFFF).
const MAX_BULK_VALUE_BYTES: usize = 0xFFFF;

fn text_fits(s: &str) -> Result<(), String> {
    let units = s.encode_utf16().count();
    if units * 2 > MAX_BULK_VALUE_BYTES {
        return Err(format!(
            "text of {units} UTF-16 units is longer than SQL Server loads take ({} per value); \
             insert it with Execute",
            MAX_BULK_VALUE_BYTES / 2
        ));
    }
    Ok(())
}

fn binary_fits(b: &[u8]) -> Result<(), String> {
    if b.len() > MAX_BULK_VALUE_BYTES {
        return Err(format!(
            "{} bytes are more than SQL Server loads take ({MAX_BULK_VALUE_BYTES} per value); \
             insert them with Execute",
            b.len()
        ));
    }
    Ok(())
}

/// The staging table's name for the `i`th loaded column: `INSERT BULK`
/// writes column names unquoted, so the target's own (`Order Date`) would
/// not parse.
fn staged(i: usize) -> String {
    format!("c{}", i + 1)
}

/// `CREATE TABLE #stage (...)` with one nullable column per loaded column.
fn create_stage(spec: &LoadSpec) -> String {
    let columns: Vec<String> = spec
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} {} NULL", staged(i), Stage::of(c).sql()))
        .collect();
    format!("CREATE TABLE {STAGE} ({})", columns.join(", "))
}

/// The collations of the upsert key's text columns. The staging table's
/// text is in the database's collation; a key column in another one
/// (`Latin1_General_BIN2` in a case-insensitive database) would fail the
/// MERGE's comparison with error 468, so the ON clause names the target's.
async fn key_collations(conn: &mut MssqlConn, spec: &LoadSpec) -> Result<Vec<(String, String)>, BackendError> {
    let rows = conn
        .fetch(
            "SELECT c.name, c.collation_name FROM sys.columns c \
             WHERE c.object_id = OBJECT_ID(@P1) AND c.collation_name IS NOT NULL",
            vec![text(&spec.qualified(quote))],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name = r.try_get::<&str, _>(0).ok().flatten()?;
            let collation = r.try_get::<&str, _>(1).ok().flatten()?;
            spec.conflict
                .iter()
                .any(|k| k == name)
                .then(|| (name.to_string(), collation.to_string()))
        })
        .collect())
}

/// `COLLATE <name>` for a key column with a known collation. Collation
/// names are identifiers of letters, digits and underscores; anything else
/// is left out rather than written into the statement.
fn collate(column: &str, collations: &[(String, String)]) -> String {
    collations
        .iter()
        .find(|(name, _)| name == column)
        .filter(|(_, c)| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'))
        .map_or_else(String::new, |(_, c)| format!(" COLLATE {c}"))
}

/// A temporal key column's own type (`datetime2(0)`, `datetime`, ...): its
/// staged value, at the stage's 100 ns, is compared with the key at the
/// column's precision, as the INSERT it would become rounds it. Compared
/// as staged, `00:00:00.4` would miss the `00:00:00` a `datetime2(0)` key
/// holds, and the MERGE insert it as a duplicate key.
fn temporal_type(column: &Column) -> Option<&str> {
    let ty = column.native_type.as_str();
    let (base, precision) = match ty.split_once('(') {
        Some((base, rest)) => (base, rest.strip_suffix(')')?),
        None => (ty, "0"),
    };
    let temporal = matches!(
        base,
        "date" | "time" | "datetime" | "datetime2" | "smalldatetime" | "datetimeoffset"
    );
    (temporal && precision.len() == 1 && precision.bytes().all(|b| b.is_ascii_digit())).then_some(ty)
}

/// The type a key's staged value is cast to before it is compared:
/// temporal keys at their column's precision (`temporal_type`), decimal
/// ones (staged as text) as numbers, so that `1.5` and `1.50` are one key
/// when rows are told apart, as the comparison with the table tells them
/// (also for an alias type, known by its precision and scale), and `real`
/// ones (staged as `float`) as `real`: the stored 0.1 widened to `float`
/// is not the staged 0.1, and an upsert of an existing key inserted it again.
fn key_type(column: &Column) -> Option<String> {
    if let Some(ty) = temporal_type(column) {
        return Some(ty.to_string());
    }
    match (column.column_type, column.precision, column.scale) {
        (ColumnType::Decimal, Some(p @ 1..=38), Some(s)) if (0..=p).contains(&s) => Some(format!("decimal({p},{s})")),
        (ColumnType::Float, Some(24), _) => Some("real".into()),
        _ => None,
    }
}

/// Moves the staged rows into the target; the batch's one result row is
/// the number of rows inserted. `collations` are the key columns' own.
fn move_rows(spec: &LoadSpec, collations: &[(String, String)]) -> String {
    let target = spec.qualified(quote);
    let columns = spec.column_list(quote);
    let staged_as = |name: &str| {
        spec.columns
            .iter()
            .position(|c| c.name == name)
            .map_or_else(String::new, staged)
    };
    if spec.mode != LoadMode::Upsert {
        let from: Vec<String> = (0..spec.columns.len()).map(staged).collect();
        return format!(
            "INSERT INTO {target} ({columns}) SELECT {} FROM {STAGE}; \
             SELECT CAST(ROWCOUNT_BIG() AS bigint)",
            from.join(", ")
        );
    }
    // Each key as the target compares it: in its column's collation, a
    // date or time at its column's precision, a decimal as a number.
    let keys: Vec<(String, String)> = spec
        .conflict
        .iter()
        .map(|c| {
            let staged = staged_as(c);
            let key = match spec.columns.iter().find(|col| col.name == *c).and_then(key_type) {
                Some(ty) => format!("CAST(s.{staged} AS {ty})"),
                None => format!("s.{staged}"),
            };
            (quote(c), format!("{key}{}", collate(c, collations)))
        })
        .collect();
    let on: Vec<String> = keys.iter().map(|(column, key)| format!("t.{column} = {key}")).collect();
    let sets: Vec<String> = spec
        .update_columns()
        .map(|c| format!("t.{} = s.{}", quote(&c.name), staged_as(&c.name)))
        .collect();
    // With nothing to update, MERGE would insert a new key sent twice
    // twice (it compares each row with the table as it was): one row per
    // key goes in, keys told apart as the ON clause tells them, and the
    // others are skipped, as on the other engines.
    let (matched, source) = if sets.is_empty() {
        let partition: Vec<&str> = keys.iter().map(|(_, key)| key.as_str()).collect();
        (
            String::new(),
            format!(
                "(SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY {} ORDER BY (SELECT 0)) AS weir_n \
                 FROM {STAGE} AS s) AS d WHERE d.weir_n = 1)",
                partition.join(", ")
            ),
        )
    } else {
        (
            format!(" WHEN MATCHED THEN UPDATE SET {}", sets.join(", ")),
            STAGE.to_string(),
        )
    };
    let values: Vec<String> = (0..spec.columns.len()).map(|i| format!("s.{}", staged(i))).collect();
    // HOLDLOCK: without it two concurrent MERGEs can both decide to insert the same key.
    format!(
        "DECLARE @weir_actions TABLE (action nvarchar(10)); \
         MERGE INTO {target} WITH (HOLDLOCK) AS t USING {source} AS s ON {}{matched} \
         WHEN NOT MATCHED BY TARGET THEN INSERT ({columns}) VALUES ({}) \
         OUTPUT $action INTO @weir_actions; \
         SELECT CAST(COUNT(CASE WHEN action = 'INSERT' THEN 1 END) AS bigint) FROM @weir_actions",
        on.join(" AND "),
        values.join(", ")
    )
}

fn text(s: &str) -> ColumnData<'static> {
    ColumnData::String(Some(s.to_string().into()))
}

fn count(row: Option<&tiberius::Row>, i: usize) -> u64 {
    row.and_then(|r| r.try_get::<i64, _>(i).ok().flatten())
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or_default()
}

/// Sends the feed's rows through TDS bulk insert into the staging table.
async fn bulk_rows(conn: &mut MssqlConn, spec: &LoadSpec, feed: &mut RowFeed) -> Result<(), BackendError> {
    let stages: Vec<Stage> = spec.columns.iter().map(Stage::of).collect();
    conn.broken = true;
    let mut request = conn.client.bulk_insert(STAGE).await.map_err(super::map_error)?;
    while let Some(batch) = feed.next().await? {
        for (i, row) in batch.rows.iter().enumerate() {
            let index = batch.first_row + i as u64;
            let mut token = TokenRow::new();
            for (c, (value, stage)) in row.iter().zip(&stages).enumerate() {
                let data = stage.value(value).map_err(|message| {
                    bulk::row_error(
                        index,
                        spec.columns.get(c).map(|c| c.name.clone()),
                        String::new(),
                        message,
                    )
                })?;
                token.push(data);
            }
            // The rows are checked above; what fails here is the connection.
            request.send(token).await.map_err(super::map_error)?;
        }
    }
    request.finalize().await.map_err(super::map_error)?;
    conn.broken = false;
    Ok(())
}

async fn load_in_transaction(
    conn: &mut MssqlConn,
    spec: &LoadSpec,
    feed: &mut RowFeed,
    receipts: Option<&ReceiptSql>,
) -> Result<LoadOutcome, BackendError> {
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        let claimed = conn
            .fetch(&sql.claim, vec![text(&r.tenant), text(&r.load_id), text(&r.target)])
            .await?;
        if count(claimed.first(), 0) == 0 {
            let rows = conn.fetch(&sql.lookup, vec![text(&r.tenant), text(&r.load_id)]).await?;
            let row = rows
                .first()
                .ok_or_else(|| BackendError::Internal("a claimed load id has no record".into()))?;
            let get_text = |i| row.try_get::<&str, _>(i).ok().flatten().unwrap_or_default().to_string();
            let get_int = |i| row.try_get::<i64, _>(i).ok().flatten().unwrap_or_default();
            return bulk::replay(r, get_text(0), get_int(1), get_int(2), get_int(3), get_text(4));
        }
    }
    if spec.mode == LoadMode::Replace {
        let children = conn
            .fetch(
                "SELECT DISTINCT OBJECT_SCHEMA_NAME(fk.parent_object_id) + '.' + OBJECT_NAME(fk.parent_object_id) \
                 FROM sys.foreign_keys fk WHERE fk.referenced_object_id = OBJECT_ID(@P1) \
                   AND fk.parent_object_id <> fk.referenced_object_id AND fk.delete_referential_action IN (1, 2, 3)",
                vec![ColumnData::String(Some(spec.qualified(quote).into()))],
            )
            .await?
            .iter()
            .filter_map(|r| r.try_get::<&str, _>(0).ok().flatten().map(str::to_string))
            .collect::<Vec<_>>();
        if !children.is_empty() {
            return Err(bulk::replace_would_cascade(&children));
        }
    }
    let collations = match spec.mode {
        LoadMode::Upsert => key_collations(conn, spec).await?,
        _ => Vec::new(),
    };
    conn.batch(&create_stage(spec)).await?;
    bulk_rows(conn, spec, feed).await?;
    // REPLACE empties the table only once every row is staged: its locks
    // (escalated to the whole table past a few thousand rows) then last for
    // the move, not for as long as the client takes to send the rows.
    if spec.mode == LoadMode::Replace {
        conn.batch(&format!("DELETE FROM {}", spec.qualified(quote))).await?;
    }
    let counts = conn.fetch(&move_rows(spec, &collations), vec![]).await?;
    conn.batch(&format!("DROP TABLE {STAGE}")).await?;
    let path = match spec.mode {
        LoadMode::Append => "mssql-bulk-insert",
        LoadMode::Replace => "mssql-delete-bulk-insert",
        LoadMode::Upsert => "mssql-bulk-insert-merge",
    };
    let inserted = count(counts.first(), 0);
    // Every other row of an upsert matched a key, whether updated or, with
    // only key columns, left alone (MERGE reports no action for it).
    let updated = match spec.mode {
        LoadMode::Upsert => feed.rows().saturating_sub(inserted),
        _ => 0,
    };
    let outcome = LoadOutcome::loaded(inserted, updated, feed, path);
    if let (Some(sql), Some(r)) = (receipts, &spec.receipt) {
        let n = |v: u64| ColumnData::I64(Some(bulk::signed(v)));
        conn.fetch(
            &sql.record,
            vec![
                n(outcome.inserted),
                n(outcome.updated),
                n(outcome.bytes),
                text(&outcome.engine_path),
                text(&r.tenant),
                text(&r.load_id),
            ],
        )
        .await?;
    }
    Ok(outcome)
}

/// Runs a whole load: the receipt table first, then one transaction.
/// Ordinary columns a SQL Server table may have: the staging table's
/// bound (a wide table's sparse columns past it cannot be staged).
const MAX_STAGED_COLUMNS: usize = 1024;

pub async fn load(conn: &mut MssqlConn, spec: LoadSpec, mut feed: RowFeed) -> Result<LoadOutcome, BackendError> {
    if spec.columns.len() > MAX_STAGED_COLUMNS {
        return Err(BackendError::Invalid(format!(
            "a SQL Server load takes at most {MAX_STAGED_COLUMNS} columns (it stages rows in a table of \
             ordinary columns), this one names {}; insert such rows with Execute",
            spec.columns.len()
        )));
    }
    let receipts = spec.receipt.as_ref().map(|r| ReceiptSql::new(&r.table, &DIALECT));
    if let Some(sql) = &receipts {
        conn.batch(&sql.create).await?;
    }
    conn.in_transaction = true;
    conn.batch("BEGIN TRANSACTION").await?;
    let mut result = load_in_transaction(conn, &spec, &mut feed, receipts.as_ref()).await;
    let end = if bulk::commits(&mut result, &feed) {
        "COMMIT"
    } else {
        "IF @@TRANCOUNT > 0 ROLLBACK"
    };
    // A connection left mid-request (`broken`) is closed by the pool, which rolls back on the server.
    if !conn.broken {
        match conn.batch(end).await {
            Ok(()) => conn.in_transaction = false,
            Err(e) if result.is_ok() => return Err(bulk::commit_failed(e)),
            Err(_) => {}
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: LoadMode) -> LoadSpec {
        let mut columns = vec![
            Column::new("id", "int", ColumnType::Int),
            Column::new("price", "decimal(10,2)", ColumnType::Decimal),
            Column::new("na]me", "nvarchar(50)", ColumnType::String),
        ];
        columns[0].nullable = false;
        LoadSpec {
            schema: Some("dbo".into()),
            table: "items".into(),
            columns,
            mode,
            conflict: if mode == LoadMode::Upsert {
                vec!["id".into()]
            } else {
                vec![]
            },
            receipt: None,
            batch_rows: 1000,
            kind: crate::backend::TableKind::Table,
        }
    }

    #[test]
    fn the_stage_has_one_typed_column_per_loaded_column() {
        assert_eq!(
            create_stage(&spec(LoadMode::Append)),
            "CREATE TABLE #weir_load_stage (c1 bigint NULL, c2 varchar(100) NULL, \
             c3 nvarchar(max) COLLATE DATABASE_DEFAULT NULL)"
        );
    }

    #[test]
    fn appends_insert_from_the_stage() {
        assert_eq!(
            move_rows(&spec(LoadMode::Append), &[]),
            "INSERT INTO [dbo].[items] ([id], [price], [na]]me]) SELECT c1, c2, c3 FROM #weir_load_stage; \
             SELECT CAST(ROWCOUNT_BIG() AS bigint)"
        );
    }

    #[test]
    fn upserts_merge_and_count_their_actions() {
        let sql = move_rows(&spec(LoadMode::Upsert), &[]);
        assert!(
            sql.contains(
                "MERGE INTO [dbo].[items] WITH (HOLDLOCK) AS t USING #weir_load_stage AS s ON t.[id] = s.c1 \
             WHEN MATCHED THEN UPDATE SET t.[price] = s.c2, t.[na]]me] = s.c3 \
             WHEN NOT MATCHED BY TARGET THEN INSERT ([id], [price], [na]]me]) VALUES (s.c1, s.c2, s.c3) \
             OUTPUT $action INTO @weir_actions;"
            ),
            "{sql}"
        );
        assert!(sql.ends_with("FROM @weir_actions"));
        let mut keys_only = spec(LoadMode::Upsert);
        keys_only.columns.truncate(1);
        let keys_only = move_rows(&keys_only, &[]);
        assert!(!keys_only.contains("WHEN MATCHED"));
        // A key sent twice is inserted once, keys compared as ON compares them.
        assert!(
            keys_only.contains(
                "USING (SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY s.c1 ORDER BY (SELECT 0)) AS weir_n \
                 FROM #weir_load_stage AS s) AS d WHERE d.weir_n = 1) AS s ON t.[id] = s.c1"
            ),
            "{keys_only}"
        );
        let mut keys_only = spec(LoadMode::Upsert);
        keys_only.columns.truncate(1);
        keys_only.columns[0] = Column::new("id", "datetime2(0)", ColumnType::Timestamp);
        let sql = move_rows(&keys_only, &[]);
        assert!(
            sql.contains("PARTITION BY CAST(s.c1 AS datetime2(0)) ORDER BY"),
            "{sql}"
        );
        keys_only.columns[0] = Column::new("id", "nvarchar(20)", ColumnType::String);
        let cs = [("id".to_string(), "Latin1_General_CS_AS".to_string())];
        let sql = move_rows(&keys_only, &cs);
        assert!(
            sql.contains("PARTITION BY s.c1 COLLATE Latin1_General_CS_AS ORDER BY"),
            "{sql}"
        );
        // A temporal key is compared at its column's precision.
        let mut at_seconds = spec(LoadMode::Upsert);
        at_seconds.columns[0] = Column::new("id", "datetime2(0)", ColumnType::Timestamp);
        assert!(move_rows(&at_seconds, &[]).contains("ON t.[id] = CAST(s.c1 AS datetime2(0)) WHEN"));
        at_seconds.columns[0] = Column::new("id", "smalldatetime", ColumnType::Timestamp);
        assert!(move_rows(&at_seconds, &[]).contains("ON t.[id] = CAST(s.c1 AS smalldatetime) WHEN"));
        // A decimal key (staged as text) is told apart as a number: 1.5 and
        // 1.50 are one key.
        keys_only.columns[0] = Column::new("id", "Price", ColumnType::Decimal);
        (keys_only.columns[0].precision, keys_only.columns[0].scale) = (Some(10), Some(2));
        let sql = move_rows(&keys_only, &[]);
        assert!(
            sql.contains("PARTITION BY CAST(s.c1 AS decimal(10,2)) ORDER BY")
                && sql.contains("ON t.[id] = CAST(s.c1 AS decimal(10,2))"),
            "{sql}"
        );
        // A `real` key (staged as `float`) is compared as `real`.
        let mut single = spec(LoadMode::Upsert);
        single.columns[0] = Column::new("id", "real", ColumnType::Float);
        single.columns[0].precision = Some(24);
        assert!(move_rows(&single, &[]).contains("ON t.[id] = CAST(s.c1 AS real) WHEN"));
        single.columns[0].precision = Some(53);
        assert!(move_rows(&single, &[]).contains("ON t.[id] = s.c1 WHEN"));
        // A key in a collation of its own is compared in it (error 468 otherwise).
        let bin = [("id".to_string(), "Latin1_General_100_BIN2".to_string())];
        assert!(
            move_rows(&spec(LoadMode::Upsert), &bin).contains("ON t.[id] = s.c1 COLLATE Latin1_General_100_BIN2 WHEN"),
            "{}",
            move_rows(&spec(LoadMode::Upsert), &bin)
        );
        // A name that is not an identifier is not written into the statement.
        let odd = [("id".to_string(), "x; DROP TABLE t".to_string())];
        assert!(move_rows(&spec(LoadMode::Upsert), &odd).contains("ON t.[id] = s.c1 WHEN"));
    }

    #[test]
    fn receipts_claim_under_a_key_lock() {
        let sql = ReceiptSql::new("weir_load_ids", &DIALECT);
        assert!(sql
            .create
            .starts_with("BEGIN TRY IF OBJECT_ID(N'weir_load_ids', N'U') IS NULL CREATE TABLE [weir_load_ids] ([tenant] nvarchar(255) COLLATE Latin1_General_100_BIN2 NOT NULL, \
                [load_id] nvarchar(255) COLLATE Latin1_General_100_BIN2 NOT NULL"));
        // The loser of a race to create the table goes on; any other error stops the load.
        assert!(sql
            .create
            .ends_with(") END TRY BEGIN CATCH IF ERROR_NUMBER() <> 2714 THROW; END CATCH"));
        assert_eq!(
            sql.claim,
            "INSERT INTO [weir_load_ids] ([tenant], [load_id], [target]) SELECT @P1, @P2, @P3 WHERE NOT EXISTS \
             (SELECT 1 FROM [weir_load_ids] WITH (UPDLOCK, HOLDLOCK) WHERE [tenant] = @P1 AND [load_id] = @P2); \
             SELECT CAST(@@ROWCOUNT AS bigint)"
        );
    }

    #[test]
    fn values_take_their_staging_type() {
        let stage = |c: ColumnType| Stage::of(&Column::new("c", "x", c));
        assert!(matches!(
            stage(ColumnType::Int).value(&Value::Int(7)),
            Ok(ColumnData::I64(Some(7)))
        ));
        assert!(matches!(
            stage(ColumnType::Int).value(&Value::Null),
            Ok(ColumnData::I64(None))
        ));
        assert!(matches!(
            stage(ColumnType::Decimal).value(&Value::Decimal("12.50".into())),
            Ok(ColumnData::String(Some(s))) if s == "12.50"
        ));
        assert!(
            matches!(stage(ColumnType::Decimal).value(&Value::Int(3)), Ok(ColumnData::String(Some(s))) if s == "3")
        );
        assert!(matches!(stage(ColumnType::Float).value(&Value::Int(2)), Ok(ColumnData::F64(Some(f))) if f == 2.0));
        assert!(matches!(
            stage(ColumnType::Bool).value(&Value::Bool(true)),
            Ok(ColumnData::Bit(Some(true)))
        ));
        assert!(matches!(
            stage(ColumnType::Uuid).value(&Value::Null),
            Ok(ColumnData::Guid(None))
        ));
        assert!(stage(ColumnType::Uuid).value(&Value::Text("nope".into())).is_err());
        assert!(stage(ColumnType::Int).value(&Value::UInt(u64::MAX)).is_err());
        // SQL Server's text-to-decimal conversion refuses exponents.
        for (value, sent) in [
            (Value::Decimal("1.5E3".into()), "1500"),
            (Value::Decimal("-2.5e-3".into()), "-0.0025"),
            (Value::Float(1e-5), "0.00001"),
            (Value::Float(1e16), "10000000000000000"),
            (Value::Float(-2.5), "-2.5"),
        ] {
            assert!(
                matches!(stage(ColumnType::Decimal).value(&value), Ok(ColumnData::String(Some(ref s))) if s == sent),
                "{value:?}"
            );
        }
        // A value that fits no staging type is the row's error, not the load's.
        for (column, value) in [
            (ColumnType::Float, Value::Float(f64::NAN)),
            (ColumnType::Float, Value::Float(f64::NEG_INFINITY)),
            // Past what the bulk encoder takes of one value.
            (ColumnType::String, Value::Text("x".repeat(32_768))),
            (ColumnType::String, Value::Text("é".repeat(40_000))),
            (ColumnType::Bytes, Value::Bytes(vec![1; 65_536])),
            (ColumnType::Unsupported, Value::Bytes(vec![1])),
            (ColumnType::Int, Value::Text("x".into())),
            (ColumnType::Decimal, Value::Float(f64::NAN)),
            (ColumnType::Decimal, Value::Float(1e-200)),
        ] {
            assert!(stage(column).value(&value).is_err(), "{column:?} {value:?}");
        }
        assert!(stage(ColumnType::String)
            .value(&Value::Text("x".repeat(32_767)))
            .is_ok());
        assert!(stage(ColumnType::Bytes).value(&Value::Bytes(vec![1; 65_535])).is_ok());
        assert!(matches!(
            stage(ColumnType::Unsupported).value(&Value::Bool(true)),
            Ok(ColumnData::String(Some(s))) if s == "1"
        ));
    }
}

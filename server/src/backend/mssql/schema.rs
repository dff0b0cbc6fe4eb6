//! Catalog queries behind SchemaService for SQL Server, from sys.* views.
//! Every name the caller gives is bound as a parameter; the SQL is constant.
//! Row counts come from sys.partitions, which any user who can see a table
//! may read (sys.dm_db_partition_stats needs VIEW DATABASE STATE).

use std::sync::LazyLock;

use tiberius::{ColumnData, Row};

use super::MssqlConn;
use crate::backend::{
    BackendError, Column, ColumnGeneration, ColumnInfo, ColumnType, ForeignKey, Index, PrimaryKey, SchemaInfo,
    TableDescription, TableInfo, TableKind, TablePage,
};

/// Built-in schemas: sys, INFORMATION_SCHEMA, guest, the fixed database
/// roles', and `cdc`, which enabling change data capture makes.
const SYSTEM_SCHEMAS: [&str; 13] = [
    "sys",
    "cdc",
    "INFORMATION_SCHEMA",
    "guest",
    "db_owner",
    "db_accessadmin",
    "db_securityadmin",
    "db_ddladmin",
    "db_backupoperator",
    "db_datareader",
    "db_datawriter",
    "db_denydatareader",
    "db_denydatawriter",
];

const LIST_SCHEMAS: &str = "SELECT name FROM sys.schemas ORDER BY name";

/// Tables, views and external tables, with a row estimate for tables and the
/// MS_Description extended property as comment.
macro_rules! table_select {
    () => {
        "SELECT o.object_id, s.name, o.name, RTRIM(o.type), \
                CAST((SELECT SUM(p.rows) FROM sys.partitions p \
                      WHERE p.object_id = o.object_id AND p.index_id IN (0, 1)) AS bigint), \
                CAST(ep.value AS nvarchar(4000)) \
         FROM sys.objects o \
         JOIN sys.schemas s ON s.schema_id = o.schema_id \
         LEFT JOIN sys.extended_properties ep \
           ON ep.class = 1 AND ep.major_id = o.object_id AND ep.minor_id = 0 AND ep.name = N'MS_Description' \
         WHERE o.type IN ('U', 'V', 'ET') "
    };
}

/// Without a schema, the tables of every schema but the built-in ones (a
/// user's table in `guest` or `db_owner` is not the application's), as
/// ListSchemas leaves them out.
static LIST_TABLES: LazyLock<String> = LazyLock::new(|| {
    let system: Vec<String> = SYSTEM_SCHEMAS.iter().map(|s| format!("N'{s}'")).collect();
    format!(
        "{}AND o.is_ms_shipped = 0 AND ((@P1 IS NULL AND s.name NOT IN ({})) OR s.name = @P1) \
         AND (@P2 IS NULL OR s.name COLLATE Latin1_General_BIN2 > @P2 \
              OR (s.name COLLATE Latin1_General_BIN2 = @P2 AND o.name COLLATE Latin1_General_BIN2 > @P3)) \
         ORDER BY s.name COLLATE Latin1_General_BIN2, o.name COLLATE Latin1_General_BIN2 \
         OFFSET 0 ROWS FETCH NEXT @P4 ROWS ONLY",
        table_select!(),
        system.join(", ")
    )
});

/// Without a schema, the table a query naming it alone would find: in the
/// caller's default schema, else in `dbo` (`OBJECT_ID` resolves it so).
const FIND_TABLE: &str = concat!(
    table_select!(),
    "AND ((@P1 IS NULL AND o.object_id = OBJECT_ID(QUOTENAME(@P2))) OR (s.name = @P1 AND o.name = @P2))"
);

/// Columns with their declared type and, for alias types, the base type
/// (also for `sysname`, which is no user-defined type but has a base).
/// `IsHidden` (SQL Server 2016 and later; NULL before) marks columns
/// `SELECT *` leaves out: HIDDEN period columns of temporal tables.
/// Identity and computed columns, with a computed column's definition.
const COLUMNS: &str = "SELECT c.name, t.name, \
        CASE WHEN t.user_type_id <> t.system_type_id AND t.is_assembly_type = 0 THEN TYPE_NAME(c.system_type_id) ELSE t.name END, \
        CAST(c.max_length AS int), CAST(c.precision AS int), CAST(c.scale AS int), c.is_nullable, \
        d.definition, CAST(ep.value AS nvarchar(4000)), \
        CAST(ISNULL(COLUMNPROPERTY(c.object_id, c.name, 'IsHidden'), 0) AS bit), \
        c.is_identity, c.is_computed, cc.definition \
 FROM sys.columns c \
 JOIN sys.types t ON t.user_type_id = c.user_type_id \
 LEFT JOIN sys.default_constraints d ON d.object_id = c.default_object_id \
 LEFT JOIN sys.computed_columns cc ON cc.object_id = c.object_id AND cc.column_id = c.column_id \
 LEFT JOIN sys.extended_properties ep \
   ON ep.class = 1 AND ep.major_id = c.object_id AND ep.minor_id = c.column_id AND ep.name = N'MS_Description' \
 WHERE c.object_id = @P1 ORDER BY c.column_id";

const PRIMARY_KEY: &str = "SELECT kc.name, c.name \
 FROM sys.key_constraints kc \
 JOIN sys.index_columns ic ON ic.object_id = kc.parent_object_id AND ic.index_id = kc.unique_index_id \
 JOIN sys.columns c ON c.object_id = ic.object_id AND c.column_id = ic.column_id \
 WHERE kc.parent_object_id = @P1 AND kc.type = 'PK' ORDER BY ic.key_ordinal";

const FOREIGN_KEYS: &str = "SELECT fk.name, pc.name, rs.name, ro.name, rc.name, \
        fk.update_referential_action_desc, fk.delete_referential_action_desc \
 FROM sys.foreign_keys fk \
 JOIN sys.foreign_key_columns fkc ON fkc.constraint_object_id = fk.object_id \
 JOIN sys.columns pc ON pc.object_id = fkc.parent_object_id AND pc.column_id = fkc.parent_column_id \
 JOIN sys.objects ro ON ro.object_id = fkc.referenced_object_id \
 JOIN sys.schemas rs ON rs.schema_id = ro.schema_id \
 JOIN sys.columns rc ON rc.object_id = fkc.referenced_object_id AND rc.column_id = fkc.referenced_column_id \
 WHERE fk.parent_object_id = @P1 ORDER BY fk.name, fkc.constraint_column_id";

/// Key columns of each index: not included columns, nor the partitioning
/// columns SQL Server adds to an index on a partition scheme (key_ordinal 0).
/// A columnstore index has no key: its columns are listed as stored.
const INDEXES: &str = "SELECT i.name, i.is_unique, i.is_primary_key, i.type_desc, c.name, i.has_filter \
 FROM sys.indexes i \
 JOIN sys.index_columns ic ON ic.object_id = i.object_id AND ic.index_id = i.index_id \
 JOIN sys.columns c ON c.object_id = ic.object_id AND c.column_id = ic.column_id \
 WHERE i.object_id = @P1 AND i.name IS NOT NULL AND i.is_hypothetical = 0 \
 AND ((ic.is_included_column = 0 AND ic.key_ordinal > 0) OR i.type IN (5, 6)) \
 ORDER BY i.name, ic.key_ordinal, ic.index_column_id";

fn name(s: &str) -> ColumnData<'static> {
    ColumnData::String(Some(s.to_owned().into()))
}

fn optional_name(s: Option<&str>) -> ColumnData<'static> {
    ColumnData::String(s.map(|s| s.to_owned().into()))
}

/// Names compare as code points (a binary collation), not as the database's
/// collation orders them, so that a page ends where the next begins.
fn list_tables_query(schema: Option<&str>, page: &TablePage) -> (&'static str, Vec<ColumnData<'static>>) {
    let (after_schema, after_name) = page.after.as_ref().map(|(s, n)| (s.as_str(), n.as_str())).unzip();
    let limit = page.limit.map_or(i64::MAX, i64::from);
    (
        LIST_TABLES.as_str(),
        vec![
            optional_name(schema),
            optional_name(after_schema),
            optional_name(after_name),
            ColumnData::I64(Some(limit)),
        ],
    )
}

fn find_table_query(schema: Option<&str>, table: &str) -> (&'static str, Vec<ColumnData<'static>>) {
    (FIND_TABLE, vec![optional_name(schema), name(table)])
}

/// The queries that describe one table, each bound to its object_id.
fn object_queries() -> [&'static str; 4] {
    [COLUMNS, PRIMARY_KEY, FOREIGN_KEYS, INDEXES]
}

fn catalog_error(i: usize, e: tiberius::error::Error) -> BackendError {
    BackendError::Internal(format!("unexpected catalog value in column {i}: {e}"))
}

fn opt_text(row: &Row, i: usize) -> Result<Option<String>, BackendError> {
    row.try_get::<&str, usize>(i)
        .map(|s| s.map(str::to_owned))
        .map_err(|e| catalog_error(i, e))
}

fn text(row: &Row, i: usize) -> Result<String, BackendError> {
    Ok(opt_text(row, i)?.unwrap_or_default())
}

fn int(row: &Row, i: usize) -> Result<Option<i32>, BackendError> {
    row.try_get::<i32, usize>(i).map_err(|e| catalog_error(i, e))
}

fn flag(row: &Row, i: usize) -> Result<bool, BackendError> {
    Ok(row
        .try_get::<bool, usize>(i)
        .map_err(|e| catalog_error(i, e))?
        .unwrap_or(false))
}

pub async fn list_schemas(conn: &mut MssqlConn, include_system: bool) -> Result<Vec<SchemaInfo>, BackendError> {
    let rows = conn.fetch(LIST_SCHEMAS, vec![]).await?;
    let mut schemas = Vec::with_capacity(rows.len());
    for row in &rows {
        let name = text(row, 0)?;
        let system = SYSTEM_SCHEMAS.contains(&name.as_str());
        if include_system || !system {
            schemas.push(SchemaInfo { name, system });
        }
    }
    Ok(schemas)
}

/// A row of `table_select!`, and the table's object_id.
fn table_info(row: &Row) -> Result<(i32, TableInfo), BackendError> {
    let kind = match text(row, 3)?.as_str() {
        "V" => TableKind::View,
        "ET" => TableKind::ForeignTable,
        _ => TableKind::Table,
    };
    let rows = row.try_get::<i64, usize>(4).map_err(|e| catalog_error(4, e))?;
    let info = TableInfo {
        schema: text(row, 1)?,
        name: text(row, 2)?,
        row_estimate: rows.filter(|_| kind == TableKind::Table),
        kind,
        comment: text(row, 5)?,
    };
    Ok((int(row, 0)?.unwrap_or_default(), info))
}

pub async fn list_tables(
    conn: &mut MssqlConn,
    schema: Option<&str>,
    page: &TablePage,
) -> Result<Vec<TableInfo>, BackendError> {
    let (sql, params) = list_tables_query(schema, page);
    let rows = conn.fetch(sql, params).await?;
    rows.iter().map(|r| table_info(r).map(|(_, t)| t)).collect()
}

/// The normalized family of a (base) type name from sys.types.
fn column_type(base: &str) -> ColumnType {
    match base {
        "bit" => ColumnType::Bool,
        "tinyint" | "smallint" | "int" | "bigint" => ColumnType::Int,
        "decimal" | "numeric" | "money" | "smallmoney" => ColumnType::Decimal,
        "real" | "float" => ColumnType::Float,
        "char" | "varchar" | "nchar" | "nvarchar" | "text" | "ntext" | "xml" | "sysname" => ColumnType::String,
        "binary" | "varbinary" | "image" | "timestamp" => ColumnType::Bytes,
        "date" => ColumnType::Date,
        "time" => ColumnType::Time,
        "datetime" | "datetime2" | "smalldatetime" => ColumnType::Timestamp,
        "datetimeoffset" => ColumnType::TimestampTz,
        "uniqueidentifier" => ColumnType::Uuid,
        // sql_variant, CLR types (geometry, geography, hierarchyid), json, vector.
        _ => ColumnType::Unsupported,
    }
}

/// Characters (or bytes) a string or binary column holds; None for (max).
fn max_length(base: &str, bytes: i32) -> Option<i64> {
    match base {
        _ if bytes < 0 => None,
        "nchar" | "nvarchar" => Some(i64::from(bytes / 2)),
        "char" | "varchar" | "binary" | "varbinary" => Some(i64::from(bytes)),
        _ => None,
    }
}

/// The type as written in DDL: "nvarchar(50)", "decimal(10,2)", "varbinary(max)".
fn native_type(declared: &str, base: &str, bytes: i32, precision: i32, scale: i32) -> String {
    if declared != base {
        return declared.to_string(); // an alias type, such as sysname
    }
    match base {
        "char" | "varchar" | "nchar" | "nvarchar" | "binary" | "varbinary" => match max_length(base, bytes) {
            Some(n) => format!("{base}({n})"),
            None => format!("{base}(max)"),
        },
        "decimal" | "numeric" => format!("{base}({precision},{scale})"),
        "datetime2" | "time" | "datetimeoffset" => format!("{base}({scale})"),
        _ => base.to_string(),
    }
}

/// SQL Server stores defaults in parentheses: "((0))" is shown as "0".
fn default_expression(definition: &str) -> &str {
    let mut d = definition.trim();
    while let Some(inner) = d.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        // Only when the outer pair encloses everything: not "(1)+(2)".
        let (mut depth, mut quoted) = (0i32, false);
        let balanced = inner.chars().all(|c| {
            match c {
                '\'' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => depth -= 1,
                _ => {}
            }
            depth >= 0
        });
        if !balanced || depth != 0 {
            break;
        }
        d = inner.trim();
    }
    d
}

/// How the engine fills a column, and a computed column's expression (in
/// parentheses as stored, which are removed as from defaults). An IDENTITY
/// column takes a value only under SET IDENTITY_INSERT ON.
fn generation(identity: bool, computed: bool, definition: &str) -> (ColumnGeneration, String) {
    if computed {
        (ColumnGeneration::Computed, default_expression(definition).to_string())
    } else if identity {
        (ColumnGeneration::IdentityAlways, String::new())
    } else {
        (ColumnGeneration::None, String::new())
    }
}

/// "NO_ACTION" → "NO ACTION", as the other engines spell referential actions.
fn referential_action(desc: &str) -> String {
    desc.replace('_', " ")
}

/// The newest capture instance of a table (@P1: its object id), which is
/// the one a change stream reads.
const NEWEST_INSTANCE_SQL: &str = "SELECT TOP 1 capture_instance FROM cdc.change_tables \
     WHERE source_object_id = @P1 ORDER BY create_date DESC";

const CAPTURED_COLUMNS_SQL: &str = "SELECT cc.column_name FROM cdc.captured_columns cc \
     JOIN cdc.change_tables ct ON ct.object_id = cc.object_id WHERE ct.capture_instance = @P1";

/// The newest capture instance of the table `object_id`, if any.
pub(super) async fn newest_instance(conn: &mut MssqlConn, object_id: i32) -> Result<Option<String>, BackendError> {
    let rows = conn
        .fetch(NEWEST_INSTANCE_SQL, vec![ColumnData::I32(Some(object_id))])
        .await?;
    Ok(rows.first().and_then(|r| r.get::<&str, _>(0)).map(str::to_string))
}

/// The columns of a table that its capture instance does not capture
/// (added after the instance was made, or left out of its
/// `@captured_column_list`): a change query naming them fails. Computed
/// columns are not asked for: CDC stores them as NULL, so change events
/// leave them out.
pub(super) async fn uncaptured(
    conn: &mut MssqlConn,
    instance: &str,
    columns: &[ColumnInfo],
) -> Result<Vec<String>, BackendError> {
    let rows = conn
        .fetch(
            CAPTURED_COLUMNS_SQL,
            vec![ColumnData::String(Some(instance.to_string().into()))],
        )
        .await?;
    let captured: Vec<&str> = rows.iter().filter_map(|r| r.get::<&str, _>(0)).collect();
    Ok(columns
        .iter()
        .filter(|c| c.generation != ColumnGeneration::Computed && !captured.contains(&c.column.name.as_str()))
        .map(|c| c.column.name.clone())
        .collect())
}

/// Why a capture instance cannot serve a change stream: the columns it lacks.
pub(super) fn uncaptured_reason(instance: &str, missing: &[String]) -> String {
    format!(
        "its capture instance {instance} does not capture column(s) {} (added after the instance was made, or \
         left out of its @captured_column_list): make one that captures every column with \
         sys.sp_cdc_enable_table and a new @capture_instance name",
        missing.join(", ")
    )
}

/// Whether CDC is on for the database and tracks the table (@P1: object id).
const CDC_READINESS_SQL: &str = "SELECT CAST(d.is_cdc_enabled AS int), CAST(t.is_tracked_by_cdc AS int) \
     FROM sys.databases d CROSS JOIN sys.tables t WHERE d.database_id = DB_ID() AND t.object_id = @P1";

pub async fn describe_table(
    conn: &mut MssqlConn,
    schema: Option<&str>,
    table: &str,
) -> Result<TableDescription, BackendError> {
    let (sql, params) = find_table_query(schema, table);
    let found = conn.fetch(sql, params).await?;
    let Some(row) = found.first() else {
        let qualified = schema
            .map(|s| format!("{s}.{table}"))
            .unwrap_or_else(|| table.to_string());
        return Err(BackendError::not_found(format!("table \"{qualified}\" not found")));
    };
    let (object_id, info) = table_info(row)?;
    let [columns_sql, pk_sql, fk_sql, index_sql] = object_queries();
    let id = || vec![ColumnData::I32(Some(object_id))];

    let mut columns = Vec::new();
    let mut shown = 0;
    for row in &conn.fetch(columns_sql, id()).await? {
        let (declared, base) = (text(row, 1)?, text(row, 2)?);
        let bytes = int(row, 3)?.unwrap_or_default();
        let (precision, scale) = (int(row, 4)?.unwrap_or_default(), int(row, 5)?.unwrap_or_default());
        let mut column = Column::new(
            text(row, 0)?,
            native_type(&declared, &base, bytes, precision, scale),
            column_type(&base),
        );
        column.nullable = flag(row, 6)?;
        column.max_length = max_length(&base, bytes);
        if column.column_type == ColumnType::Decimal {
            column.precision = Some(precision);
            column.scale = Some(scale);
        }
        // A float's precision is the bits of its mantissa: 24 for `real`
        // and `float(1)` to `float(24)`, 53 otherwise (sys.columns says so).
        if column.column_type == ColumnType::Float {
            column.precision = Some(if precision > 0 && precision <= 24 { 24 } else { 53 });
        }
        // The place among the columns `SELECT *` returns (column_id keeps
        // gaps of dropped columns); 0 for a hidden column, which it leaves out.
        let ordinal = if flag(row, 9)? {
            0
        } else {
            shown += 1;
            shown
        };
        let (generation, generation_expression) = generation(flag(row, 10)?, flag(row, 11)?, &text(row, 12)?);
        columns.push(ColumnInfo {
            column,
            ordinal,
            default_expression: default_expression(&text(row, 7)?).to_string(),
            comment: text(row, 8)?,
            generation,
            generation_expression,
        });
    }

    let mut primary_key: Option<PrimaryKey> = None;
    for row in &conn.fetch(pk_sql, id()).await? {
        let name = text(row, 0)?;
        primary_key
            .get_or_insert_with(|| PrimaryKey {
                name,
                columns: Vec::new(),
            })
            .columns
            .push(text(row, 1)?);
    }

    let mut foreign_keys: Vec<ForeignKey> = Vec::new();
    for row in &conn.fetch(fk_sql, id()).await? {
        let (name, column, referenced) = (text(row, 0)?, text(row, 1)?, text(row, 4)?);
        match foreign_keys.last_mut() {
            Some(fk) if fk.name == name => {
                fk.columns.push(column);
                fk.referenced_columns.push(referenced);
            }
            _ => foreign_keys.push(ForeignKey {
                name,
                columns: vec![column],
                referenced_schema: text(row, 2)?,
                referenced_table: text(row, 3)?,
                referenced_columns: vec![referenced],
                on_update: referential_action(&text(row, 5)?),
                on_delete: referential_action(&text(row, 6)?),
            }),
        }
    }

    let mut indexes: Vec<Index> = Vec::new();
    for row in &conn.fetch(index_sql, id()).await? {
        let (name, column) = (text(row, 0)?, text(row, 4)?);
        match indexes.last_mut() {
            Some(i) if i.name == name => i.columns.push(column),
            _ => indexes.push(Index {
                name,
                columns: vec![column],
                unique: flag(row, 1)?,
                primary: flag(row, 2)?,
                method: text(row, 3)?.to_ascii_lowercase(),
                partial: flag(row, 5)?,
            }),
        }
    }

    let cdc = conn.fetch(CDC_READINESS_SQL, id()).await?;
    let (db_cdc, table_cdc) = cdc
        .first()
        .map(|r| (r.get::<i32, _>(0) == Some(1), r.get::<i32, _>(1) == Some(1)))
        .unwrap_or_default();
    let (change_stream_ready, change_stream_reason) = if info.kind != TableKind::Table {
        (false, "only tables can be watched (CDC tracks tables)".to_string())
    } else if !db_cdc {
        (
            false,
            "Change Data Capture is off for the database (sys.sp_cdc_enable_db)".to_string(),
        )
    } else if !table_cdc {
        (
            false,
            "the table is not tracked by CDC (sys.sp_cdc_enable_table)".to_string(),
        )
    } else {
        // Unknown (a login that may not read the CDC catalog) counts as ready,
        // as before this was asked: WatchChanges says what is missing.
        let missing = match newest_instance(conn, object_id).await {
            Ok(Some(instance)) => uncaptured(conn, &instance, &columns)
                .await
                .ok()
                .filter(|m| !m.is_empty())
                .map(|m| uncaptured_reason(&instance, &m)),
            _ => None,
        };
        match missing {
            Some(reason) => (false, reason),
            None => (true, String::new()),
        }
    };

    Ok(TableDescription {
        table: info,
        columns,
        primary_key,
        foreign_keys,
        indexes,
        change_stream_ready,
        change_stream_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::super::types::placeholder_count;
    use super::*;

    const HOSTILE: &str = "x'; DROP TABLE weir; --";

    fn texts(params: &[ColumnData<'static>]) -> Vec<Option<String>> {
        params
            .iter()
            .map(|p| match p {
                ColumnData::String(s) => s.as_ref().map(|s| s.to_string()),
                other => panic!("expected a string parameter, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn names_are_bound_never_spliced() {
        let page = TablePage {
            after: Some((HOSTILE.to_string(), HOSTILE.to_string())),
            limit: Some(2),
        };
        let (sql, params) = list_tables_query(Some(HOSTILE), &page);
        assert!(!sql.contains(HOSTILE));
        assert_eq!(texts(&params[..3]), vec![Some(HOSTILE.to_string()); 3]);
        assert!(matches!(params[3], ColumnData::I64(Some(2))));
        assert_eq!(placeholder_count(sql), params.len());

        let (sql, params) = list_tables_query(None, &TablePage::default());
        assert_eq!(
            texts(&params[..3]),
            [None, None, None],
            "NULL lists every schema, from the first"
        );
        for system in SYSTEM_SCHEMAS {
            assert!(sql.contains(&format!("N'{system}'")), "{system} left out: {sql}");
        }
        assert!(
            sql.contains("(@P1 IS NULL AND s.name NOT IN (N'sys', N'cdc', "),
            "{sql}"
        );
        assert!(matches!(params[3], ColumnData::I64(Some(i64::MAX))), "no limit");
        assert!(sql.contains("OR s.name = @P1)"));
        // Ordered as the page's end is compared: by code point, whatever the database's collation.
        assert!(sql.contains("ORDER BY s.name COLLATE Latin1_General_BIN2, o.name COLLATE Latin1_General_BIN2"));

        let (sql, params) = find_table_query(Some(HOSTILE), HOSTILE);
        assert!(!sql.contains(HOSTILE));
        assert_eq!(texts(&params), [Some(HOSTILE.to_string()), Some(HOSTILE.to_string())]);
        assert_eq!(placeholder_count(sql), 2);
        let (sql, params) = find_table_query(None, "t");
        assert_eq!(texts(&params), [None, Some("t".to_string())]);
        assert!(sql.contains("@P1 IS NULL AND o.object_id = OBJECT_ID(QUOTENAME(@P2))"));
    }

    #[test]
    fn object_queries_take_only_the_object_id() {
        for sql in object_queries() {
            assert_eq!(placeholder_count(sql), 1, "{sql}");
            assert!(sql.contains("= @P1"), "{sql}");
        }
        assert_eq!(placeholder_count(LIST_SCHEMAS), 0);
    }

    #[test]
    fn catalog_sql_reads_the_documented_views() {
        assert!(LIST_TABLES.contains("sys.partitions p") && LIST_TABLES.contains("p.index_id IN (0, 1)"));
        assert!(LIST_TABLES.contains("o.type IN ('U', 'V', 'ET')") && LIST_TABLES.contains("is_ms_shipped = 0"));
        assert!(COLUMNS.contains("sys.columns c") && COLUMNS.contains("sys.default_constraints"));
        assert!(PRIMARY_KEY.contains("sys.key_constraints") && PRIMARY_KEY.contains("kc.type = 'PK'"));
        assert!(FOREIGN_KEYS.contains("sys.foreign_key_columns"));
        assert!(INDEXES.contains("sys.index_columns") && INDEXES.contains("is_included_column = 0"));
        // Partitioning columns SQL Server adds to an index are not its key.
        assert!(INDEXES.contains("ic.key_ordinal > 0"));
        // sql_variant values would stop the driver: comments are cast first.
        assert!(LIST_TABLES.contains("CAST(ep.value AS nvarchar(4000))"));
        assert!(COLUMNS.contains("CAST(ep.value AS nvarchar(4000))"));
        // Hidden period columns have no place among SELECT *'s columns.
        assert!(COLUMNS.contains("COLUMNPROPERTY(c.object_id, c.name, 'IsHidden')"));
        // Identity and computed columns, and a computed column's expression.
        assert!(COLUMNS.contains("c.is_identity, c.is_computed, cc.definition"));
        assert!(COLUMNS.contains(
            "LEFT JOIN sys.computed_columns cc ON cc.object_id = c.object_id AND cc.column_id = c.column_id"
        ));
    }

    #[test]
    fn identity_and_computed_columns() {
        use crate::backend::ColumnGeneration as G;
        // IDENTITY takes a value only under SET IDENTITY_INSERT ON.
        assert_eq!(generation(true, false, ""), (G::IdentityAlways, String::new()));
        assert_eq!(
            generation(false, true, "([a]*(2))"),
            (G::Computed, "[a]*(2)".to_string())
        );
        assert_eq!(generation(false, false, ""), (G::None, String::new()));
    }

    #[test]
    fn system_schemas() {
        for s in ["sys", "INFORMATION_SCHEMA", "guest", "db_owner", "db_datareader", "cdc"] {
            assert!(SYSTEM_SCHEMAS.contains(&s), "{s}");
        }
        assert!(!SYSTEM_SCHEMAS.contains(&"dbo"));
    }

    #[test]
    fn catalog_types() {
        assert_eq!(column_type("int"), ColumnType::Int);
        assert_eq!(column_type("money"), ColumnType::Decimal);
        assert_eq!(column_type("nvarchar"), ColumnType::String);
        assert_eq!(column_type("xml"), ColumnType::String);
        assert_eq!(column_type("timestamp"), ColumnType::Bytes, "rowversion");
        assert_eq!(column_type("datetimeoffset"), ColumnType::TimestampTz);
        assert_eq!(column_type("uniqueidentifier"), ColumnType::Uuid);
        assert_eq!(column_type("geography"), ColumnType::Unsupported);
        assert_eq!(column_type("sql_variant"), ColumnType::Unsupported);

        assert_eq!(native_type("nvarchar", "nvarchar", 100, 0, 0), "nvarchar(50)");
        assert_eq!(native_type("varbinary", "varbinary", -1, 0, 0), "varbinary(max)");
        assert_eq!(native_type("decimal", "decimal", 9, 10, 2), "decimal(10,2)");
        assert_eq!(native_type("datetime2", "datetime2", 8, 27, 7), "datetime2(7)");
        assert_eq!(native_type("sysname", "nvarchar", 256, 0, 0), "sysname");
        assert_eq!(native_type("int", "int", 4, 10, 0), "int");
        assert_eq!(max_length("nchar", 20), Some(10));
        assert_eq!(max_length("varchar", -1), None);
        assert_eq!(max_length("int", 4), None);
    }

    #[test]
    fn defaults_and_actions() {
        assert_eq!(default_expression("((0))"), "0");
        assert_eq!(default_expression("(getdate())"), "getdate()");
        assert_eq!(default_expression("((1)+(2))"), "(1)+(2)");
        assert_eq!(default_expression("(N'a)b(c')"), "N'a)b(c'");
        assert_eq!(default_expression(""), "");
        assert_eq!(referential_action("NO_ACTION"), "NO ACTION");
        assert_eq!(referential_action("SET_NULL"), "SET NULL");
        assert_eq!(referential_action("CASCADE"), "CASCADE");
    }
}

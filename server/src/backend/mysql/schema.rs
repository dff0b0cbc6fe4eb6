//! Catalog queries behind SchemaService for MySQL/MariaDB (databases are
//! schemas), from information_schema with bound parameters.

use std::collections::HashMap;

use mysql_async::prelude::{FromRow, FromValue, Queryable};
use mysql_async::{Conn, FromRowError, Params, Row};

use super::map_error;
use crate::backend::{
    BackendError, Column, ColumnGeneration, ColumnInfo, ColumnType, ForeignKey, Index, PrimaryKey, SchemaInfo,
    TableDescription, TableInfo, TableKind, TablePage,
};

const SYSTEM_SCHEMAS: [&str; 4] = ["mysql", "information_schema", "performance_schema", "sys"];

/// The rows of a catalog query, each read as `T`. mysql_async's typed reads
/// panic on a value that does not convert (a NULL where none was expected);
/// here that is an error of the call.
async fn catalog<T: FromRow>(
    conn: &mut Conn,
    sql: impl AsRef<str>,
    params: impl Into<Params> + Send,
) -> Result<Vec<T>, BackendError> {
    let rows: Vec<Row> = conn.exec(sql.as_ref(), params).await.map_err(map_error)?;
    rows.into_iter()
        .map(|row| {
            mysql_async::from_row_opt(row).map_err(|_| {
                BackendError::Internal(format!(
                    "the server's catalog returned a value of an unexpected kind for: {}",
                    sql.as_ref().split_whitespace().take(8).collect::<Vec<_>>().join(" ")
                ))
            })
        })
        .collect()
}

pub async fn list_schemas(conn: &mut Conn, include_system: bool) -> Result<Vec<SchemaInfo>, BackendError> {
    let names: Vec<String> = catalog(
        conn,
        "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY 1",
        (),
    )
    .await?;
    Ok(names
        .into_iter()
        .map(|name| SchemaInfo {
            system: SYSTEM_SCHEMAS.contains(&name.as_str()),
            name,
        })
        .filter(|s| include_system || !s.system)
        .collect())
}

type TableRow = (String, String, String, Option<u64>, String);

/// MariaDB lists its sequences among the tables (TABLE_TYPE `SEQUENCE`);
/// like PostgreSQL's, they are not tables.
const TABLE_COLUMNS: &str = "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE, TABLE_ROWS, TABLE_COMMENT \
     FROM information_schema.TABLES WHERE TABLE_TYPE <> 'SEQUENCE' AND";
/// The same tables' names alone.
const TABLE_NAMES: &str =
    "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES WHERE TABLE_TYPE <> 'SEQUENCE' AND";
/// Pages up to this size are listed names first (see `list_tables`).
const NAMES_FIRST_UP_TO: u32 = 5000;

fn table_info((schema, name, kind, rows, comment): TableRow) -> TableInfo {
    let kind = if kind.contains("VIEW") {
        TableKind::View
    } else {
        TableKind::Table
    };
    let row_estimate = (kind == TableKind::Table)
        .then_some(rows)
        .flatten()
        .and_then(|r| i64::try_from(r).ok());
    // A view's TABLE_COMMENT is the word VIEW, or the error of a view whose
    // tables are gone: no comment of the caller's.
    let comment = match kind {
        TableKind::View => String::new(),
        _ => comment,
    };
    TableInfo {
        schema,
        name,
        kind,
        row_estimate,
        comment,
    }
}

pub async fn list_tables(
    conn: &mut Conn,
    schema: Option<&str>,
    page: &TablePage,
) -> Result<Vec<TableInfo>, BackendError> {
    let mut sql = String::from(TABLE_COLUMNS);
    let mut params: Vec<mysql_async::Value> = Vec::new();
    match schema {
        Some(s) => {
            sql.push_str(" TABLE_SCHEMA = ?");
            params.push(s.into());
        }
        None => {
            let excluded = SYSTEM_SCHEMAS.map(|s| format!("'{s}'")).join(", ");
            sql.push_str(&format!(" TABLE_SCHEMA NOT IN ({excluded})"));
        }
    }
    // Ordered and compared as bytes: the catalog's collation ignores case,
    // and two tables whose names differ only in case would be one place.
    if let Some((after_schema, after_name)) = &page.after {
        sql.push_str(" AND (BINARY TABLE_SCHEMA, BINARY TABLE_NAME) > (BINARY ?, BINARY ?)");
        params.extend([after_schema.as_str().into(), after_name.as_str().into()]);
    }
    sql.push_str(" ORDER BY BINARY TABLE_SCHEMA, BINARY TABLE_NAME");
    let Some(limit) = page.limit.filter(|l| *l <= NAMES_FIRST_UP_TO) else {
        // Every table (or a page of most of them): each is opened anyway.
        if let Some(limit) = page.limit {
            sql.push_str(" LIMIT ?");
            params.push(limit.into());
        }
        let rows: Vec<TableRow> = catalog(conn, sql, params).await?;
        return Ok(rows.into_iter().map(table_info).collect());
    };
    // A page: its names first, which the catalog lists without opening a
    // table; then the estimates and comments of its tables alone. In one
    // query, MariaDB opened every table the listing covers to sort them,
    // each page again.
    sql.push_str(" LIMIT ?");
    params.push(limit.into());
    let sql = sql.replacen(TABLE_COLUMNS, TABLE_NAMES, 1);
    // A table dropped between the two queries leaves the page short, which
    // would read as the last page: the page is listed again (the dropped
    // table is not in it then), a few times at most under constant churn.
    let mut tries = 0;
    loop {
        tries += 1;
        let names: Vec<(String, String)> = catalog(conn, &sql, params.clone()).await?;
        let listed = names.len();
        let tables = page_details(conn, names).await?;
        if tables.len() == listed || tries == PAGE_TRIES {
            return Ok(tables);
        }
    }
}

/// Times a page is listed again for tables dropped while it was listed.
const PAGE_TRIES: usize = 3;

/// The estimates and comments of a page's tables (`names`, in order); a
/// table dropped since its name was listed is left out.
async fn page_details(conn: &mut Conn, names: Vec<(String, String)>) -> Result<Vec<TableInfo>, BackendError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut details = String::from(TABLE_COLUMNS);
    let mut params: Vec<mysql_async::Value> = Vec::new();
    for (i, (schema, tables)) in names.chunk_by(|a, b| a.0 == b.0).map(|t| (&t[0].0, t)).enumerate() {
        let marks = vec!["?"; tables.len()].join(", ");
        details.push_str(if i == 0 { " (" } else { " OR " });
        details.push_str(&format!("(TABLE_SCHEMA = ? AND TABLE_NAME IN ({marks}))"));
        params.push(schema.as_str().into());
        params.extend(tables.iter().map(|(_, name)| name.as_str().into()));
    }
    details.push(')');
    let rows: Vec<TableRow> = catalog(conn, details, params).await?;
    // Matched as the catalog compares, without case: kept by exact name, in
    // the page's order (a table dropped since is left out).
    let mut found: HashMap<(String, String), TableRow> =
        rows.into_iter().map(|r| ((r.0.clone(), r.1.clone()), r)).collect();
    Ok(names
        .into_iter()
        .filter_map(|key| found.remove(&key))
        .map(table_info)
        .collect())
}

/// Normalized type from information_schema's DATA_TYPE and COLUMN_TYPE.
fn column_type(data_type: &str, column_type: &str) -> ColumnType {
    match data_type {
        "bigint" if column_type.contains("unsigned") => ColumnType::UInt,
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" => ColumnType::Int,
        "decimal" | "numeric" => ColumnType::Decimal,
        "float" | "double" | "real" => ColumnType::Float,
        "bit" => ColumnType::UInt,
        "date" => ColumnType::Date,
        "datetime" => ColumnType::Timestamp,
        "timestamp" => ColumnType::TimestampTz,
        "time" => ColumnType::Time,
        "json" => ColumnType::Json,
        // Geometry comes as its binary form (WKB with an SRID), as in results.
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry" | "point"
        | "linestring" | "polygon" | "multipoint" | "multilinestring" | "multipolygon" | "geometrycollection"
        | "geomcollection" => ColumnType::Bytes,
        _ => ColumnType::String,
    }
}

/// A row of information_schema.COLUMNS as describe_table reads it.
struct ColumnRow {
    name: String,
    native: String,
    data_type: String,
    nullable: String,
    default: Option<String>,
    precision: Option<u64>,
    scale: Option<u64>,
    length: Option<u64>,
    comment: String,
    charset: Option<String>,
    extra: String,
    generation_expression: Option<String>,
}

impl FromRow for ColumnRow {
    fn from_row_opt(mut row: Row) -> Result<Self, FromRowError> {
        fn take<T: FromValue>(row: &mut Row, i: usize) -> Option<T> {
            row.take_opt(i)?.ok()
        }
        let r = &mut row;
        let read = (|| {
            Some(ColumnRow {
                name: take(r, 0)?,
                native: take(r, 1)?,
                data_type: take(r, 2)?,
                nullable: take(r, 3)?,
                default: take(r, 4)?,
                precision: take(r, 5)?,
                scale: take(r, 6)?,
                length: take(r, 7)?,
                comment: take(r, 8)?,
                charset: take(r, 9)?,
                extra: take(r, 10)?,
                generation_expression: take(r, 11)?,
            })
        })();
        read.filter(|_| row.len() == 12).ok_or(FromRowError(row))
    }
}

/// How MySQL/MariaDB fill a column, from COLUMNS.EXTRA. AUTO_INCREMENT takes
/// a value given; generated columns are "VIRTUAL GENERATED" or "STORED
/// GENERATED" (MySQL 8's "DEFAULT_GENERATED" marks an expression default).
fn generation(extra: &str, expression: Option<String>) -> (ColumnGeneration, String) {
    let extra = extra.to_ascii_lowercase();
    if ["virtual generated", "stored generated", "persistent generated"]
        .iter()
        .any(|g| extra.contains(g))
    {
        (ColumnGeneration::Computed, expression.unwrap_or_default())
    } else if extra.contains("auto_increment") {
        (ColumnGeneration::IdentityByDefault, String::new())
    } else {
        (ColumnGeneration::None, String::new())
    }
}

fn invisible(extra: &str) -> bool {
    extra
        .split_ascii_whitespace()
        .any(|word| word.eq_ignore_ascii_case("INVISIBLE"))
}

/// Character sets whose text is UTF-8 as the binary log carries it.
const UTF8_CHARSETS: [&str; 5] = ["utf8mb4", "utf8mb3", "utf8", "ascii", "binary"];

pub async fn describe_table(
    conn: &mut Conn,
    schema: Option<&str>,
    table: &str,
) -> Result<TableDescription, BackendError> {
    let found: Option<TableRow> = catalog(
        conn,
        format!("{TABLE_COLUMNS} TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?"),
        (schema, table),
    )
    .await?
    .into_iter()
    .next();
    let Some(found) = found else {
        let qualified = schema
            .map(|s| format!("{s}.{table}"))
            .unwrap_or_else(|| table.to_string());
        return Err(BackendError::not_found(format!("table \"{qualified}\" not found")));
    };
    let info = table_info(found);
    let key = (info.schema.clone(), info.name.clone());

    let settings: Option<(i64, String, String, String)> = catalog(
        conn,
        "SELECT @@log_bin, @@binlog_format, @@binlog_row_image, VERSION()",
        (),
    )
    .await?
    .into_iter()
    .next();
    let mariadb = settings
        .as_ref()
        .is_some_and(|(.., version)| version.to_ascii_lowercase().contains("mariadb"));
    let binlog = settings.map(|(log_bin, format, image, _)| (log_bin, format, image));
    let rows: Vec<ColumnRow> = catalog(
        conn,
        "SELECT COLUMN_NAME, COLUMN_TYPE, DATA_TYPE, IS_NULLABLE, COLUMN_DEFAULT, \
                    NUMERIC_PRECISION, NUMERIC_SCALE, CHARACTER_MAXIMUM_LENGTH, COLUMN_COMMENT, \
                    CHARACTER_SET_NAME, EXTRA, GENERATION_EXPRESSION \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
        key.clone(),
    )
    .await?;
    // The binary log carries text in its column's character set, which
    // change events (UTF-8) cannot carry as it is. (ENUM and SET values are
    // logged as numbers, their labels read from the column's type.)
    let not_utf8 = rows
        .iter()
        .filter(|r| !matches!(r.data_type.as_str(), "enum" | "set"))
        .find_map(|r| {
            r.charset
                .as_ref()
                .filter(|charset| !UTF8_CHARSETS.contains(&charset.to_ascii_lowercase().as_str()))
                .map(|charset| (r.name.clone(), charset.clone()))
        });
    // The place in `SELECT *`, which leaves INVISIBLE columns out (MariaDB
    // 10.3, MySQL 8.0.23); ORDINAL_POSITION counts them.
    let mut shown = 0;
    let columns = rows
        .into_iter()
        .map(|r| {
            let ordinal = if invisible(&r.extra) {
                0
            } else {
                shown += 1;
                shown
            };
            let mut column = Column::new(r.name, r.native.clone(), column_type(&r.data_type, &r.native));
            column.nullable = r.nullable == "YES";
            if column.column_type == ColumnType::Decimal {
                column.precision = r.precision.and_then(|p| i32::try_from(p).ok());
                column.scale = r.scale.and_then(|s| i32::try_from(s).ok());
            }
            // A float's precision is the bits of its mantissa (MySQL's own
            // NUMERIC_PRECISION counts decimal digits): FLOAT is single.
            if column.column_type == ColumnType::Float {
                column.precision = Some(if r.data_type == "float" { 24 } else { 53 });
            }
            column.max_length = r.length.and_then(|l| i64::try_from(l).ok());
            let default_expression = default_expression(r.default, &r.data_type, &r.extra, mariadb);
            let (generation, generation_expression) = generation(&r.extra, r.generation_expression);
            ColumnInfo {
                column,
                ordinal,
                default_expression,
                comment: r.comment,
                generation,
                generation_expression,
            }
        })
        .collect();

    type KeyRow = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    type KeyColumn = (String, String, Option<String>, Option<String>, Option<String>);
    let key_columns: Vec<KeyColumn> = catalog(
        conn,
        "SELECT CONSTRAINT_NAME, COLUMN_NAME, REFERENCED_TABLE_SCHEMA, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME \
             FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
               AND (CONSTRAINT_NAME = 'PRIMARY' OR REFERENCED_TABLE_NAME IS NOT NULL) \
             ORDER BY CONSTRAINT_NAME, ORDINAL_POSITION",
        key.clone(),
    )
    .await?;
    // A query of its own: joined to KEY_COLUMN_USAGE, MariaDB opened every
    // table of every database on the server to read REFERENTIAL_CONSTRAINTS.
    let rules: Vec<(String, String, String)> = catalog(
        conn,
        "SELECT CONSTRAINT_NAME, UPDATE_RULE, DELETE_RULE FROM information_schema.REFERENTIAL_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
        key.clone(),
    )
    .await?;
    let rules: HashMap<String, (String, String)> = rules
        .into_iter()
        .map(|(name, update, delete)| (name, (update, delete)))
        .collect();
    let keys: Vec<KeyRow> = key_columns
        .into_iter()
        .map(|(name, column, ref_schema, ref_table, ref_column)| {
            let (on_update, on_delete) = rules.get(&name).cloned().unzip();
            (name, column, ref_schema, ref_table, ref_column, on_update, on_delete)
        })
        .collect();
    let mut primary_key: Option<PrimaryKey> = None;
    let mut foreign_keys: Vec<ForeignKey> = Vec::new();
    for (name, column, ref_schema, ref_table, ref_column, on_update, on_delete) in keys {
        if name == "PRIMARY" {
            primary_key
                .get_or_insert_with(|| PrimaryKey {
                    name: name.clone(),
                    columns: Vec::new(),
                })
                .columns
                .push(column);
            continue;
        }
        match foreign_keys.last_mut() {
            Some(fk) if fk.name == name => {
                fk.columns.push(column);
                fk.referenced_columns.push(ref_column.unwrap_or_default());
            }
            _ => foreign_keys.push(ForeignKey {
                name,
                columns: vec![column],
                referenced_schema: ref_schema.unwrap_or_default(),
                referenced_table: ref_table.unwrap_or_default(),
                referenced_columns: vec![ref_column.unwrap_or_default()],
                on_update: on_update.unwrap_or_else(|| "NO ACTION".into()),
                on_delete: on_delete.unwrap_or_else(|| "NO ACTION".into()),
            }),
        }
    }

    // Name, NON_UNIQUE, column (none for an expression), prefix length, type.
    type IndexColumn = (String, i64, Option<String>, Option<i64>, String);
    let index_rows: Vec<IndexColumn> = catalog(
        conn,
        "SELECT INDEX_NAME, NON_UNIQUE, COLUMN_NAME, SUB_PART, INDEX_TYPE FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY INDEX_NAME, SEQ_IN_INDEX",
        key,
    )
    .await?;
    let mut indexes: Vec<Index> = Vec::new();
    for (name, non_unique, column, prefix, method) in index_rows {
        let column = key_column(column, prefix);
        match indexes.last_mut() {
            Some(i) if i.name == name => i.columns.push(column),
            _ => indexes.push(Index {
                primary: name == "PRIMARY",
                unique: non_unique == 0,
                name,
                columns: vec![column],
                method: method.to_ascii_lowercase(),
                // MySQL and MariaDB have no partial indexes.
                partial: false,
            }),
        }
    }

    let (change_stream_ready, change_stream_reason) = match binlog {
        _ if info.kind != TableKind::Table => (false, "only base tables can be watched".to_string()),
        Some((1, format, image)) if format == "ROW" && image == "FULL" => match (&primary_key, not_utf8) {
            (None, _) => (false, "the table has no primary key".to_string()),
            (Some(_), Some((column, charset))) => (
                false,
                format!(
                    "column {column} uses the character set {charset}, and change events carry text as UTF-8; \
                     convert the table (ALTER TABLE ... CONVERT TO CHARACTER SET utf8mb4)"
                ),
            ),
            (Some(_), None) => (true, String::new()),
        },
        Some((1, format, image)) => (
            false,
            format!("binlog_format is {format} and binlog_row_image {image}; change streams need ROW and FULL"),
        ),
        _ => (
            false,
            "the binary log is off (log_bin); change streams need it with binlog_format = ROW".to_string(),
        ),
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

/// A column's default as MariaDB prints it, on either server: a literal in
/// quotes (`''`, `'NULL'`, `'2024-01-01'`), an expression or a number as
/// it is, and no default (or `DEFAULT NULL`, which MariaDB prints as the
/// word NULL) as nothing. MySQL 8 prints literals without their quotes, so
/// that `DEFAULT ''` read as no default at all; it marks expressions
/// (`DEFAULT_GENERATED` in EXTRA).
fn default_expression(default: Option<String>, data_type: &str, extra: &str, mariadb: bool) -> String {
    let Some(default) = default else {
        return String::new();
    };
    if mariadb {
        return if default == "NULL" { String::new() } else { default };
    }
    let number = matches!(
        data_type,
        "tinyint"
            | "smallint"
            | "mediumint"
            | "int"
            | "integer"
            | "bigint"
            | "decimal"
            | "numeric"
            | "float"
            | "double"
            | "real"
            | "bit"
            | "year"
    );
    // MySQL before 8.0.13 does not mark CURRENT_TIMESTAMP (a date-time's
    // only expression default there); a binary column's literal is hex.
    let upper = default.to_ascii_uppercase();
    let expression = extra.contains("DEFAULT_GENERATED")
        || (matches!(data_type, "datetime" | "timestamp") && upper.starts_with("CURRENT_TIMESTAMP"))
        || (matches!(
            data_type,
            "binary" | "varbinary" | "blob" | "tinyblob" | "mediumblob" | "longblob"
        ) && upper.starts_with("0X"));
    if number || expression {
        default
    } else {
        format!("'{}'", default.replace('\'', "''"))
    }
}

/// An index's key column as the engine prints it: `s(3)` for a prefix of `s`
/// (a unique index over it is unique over the prefix only).
fn key_column(column: Option<String>, prefix: Option<i64>) -> String {
    match (column, prefix) {
        (Some(column), Some(length)) => format!("{column}({length})"),
        (Some(column), None) => column,
        (None, _) => "<expression>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_read_alike_on_mysql_and_mariadb() {
        let read = |d: Option<&str>, ty: &str, extra: &str, mariadb| {
            default_expression(d.map(str::to_string), ty, extra, mariadb)
        };
        for mariadb in [true, false] {
            assert_eq!(read(None, "varchar", "", mariadb), "", "no default");
            assert_eq!(read(Some("0"), "int", "", mariadb), "0");
        }
        assert_eq!(read(Some("''"), "varchar", "", true), "''");
        assert_eq!(read(Some(""), "varchar", "", false), "''", "MySQL's empty literal");
        assert_eq!(read(Some("NULL"), "varchar", "", true), "", "MariaDB's DEFAULT NULL");
        assert_eq!(
            read(Some("NULL"), "varchar", "", false),
            "'NULL'",
            "MySQL's literal 'NULL'"
        );
        assert_eq!(read(Some("it's"), "char", "", false), "'it''s'");
        assert_eq!(read(Some("2024-01-01"), "date", "", false), "'2024-01-01'");
        assert_eq!(
            read(Some("CURRENT_TIMESTAMP"), "datetime", "DEFAULT_GENERATED", false),
            "CURRENT_TIMESTAMP"
        );
        assert_eq!(read(Some("b'101'"), "bit", "", false), "b'101'");
        // MySQL 5.7 marks no expression default.
        assert_eq!(
            read(
                Some("CURRENT_TIMESTAMP"),
                "timestamp",
                "on update CURRENT_TIMESTAMP",
                false
            ),
            "CURRENT_TIMESTAMP"
        );
        assert_eq!(
            read(Some("CURRENT_TIMESTAMP(3)"), "datetime", "", false),
            "CURRENT_TIMESTAMP(3)"
        );
        assert_eq!(read(Some("0x0102"), "varbinary", "", false), "0x0102");
    }

    #[test]
    fn generation_follows_extra() {
        let computed = |extra: &str| generation(extra, Some("`a` + 1".into()));
        for extra in [
            "VIRTUAL GENERATED",
            "STORED GENERATED",
            "PERSISTENT GENERATED",
            "STORED GENERATED INVISIBLE",
        ] {
            assert_eq!(
                computed(extra),
                (ColumnGeneration::Computed, "`a` + 1".into()),
                "{extra}"
            );
        }
        assert_eq!(
            generation("auto_increment", None),
            (ColumnGeneration::IdentityByDefault, String::new())
        );
        // MySQL 8's expression defaults are defaults, not generated columns.
        for extra in ["DEFAULT_GENERATED", "DEFAULT_GENERATED on update CURRENT_TIMESTAMP", ""] {
            assert_eq!(
                generation(extra, None),
                (ColumnGeneration::None, String::new()),
                "{extra}"
            );
        }
    }
}

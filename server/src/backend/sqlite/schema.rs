//! Catalog queries behind SchemaService for SQLite, through the pragma
//! table-valued functions so names are bound as parameters, never spliced.

use rusqlite::{params, Connection, OptionalExtension};

use super::{column, map_error};
use crate::backend::{
    BackendError, ColumnInfo, ForeignKey, Index, PrimaryKey, SchemaInfo, TableDescription, TableInfo, TableKind,
};

pub fn list_schemas(conn: &Connection) -> Result<Vec<SchemaInfo>, BackendError> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_database_list WHERE name <> 'temp' ORDER BY seq")
        .map_err(map_error)?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(map_error)?;
    names
        .map(|n| n.map(|name| SchemaInfo { name, system: false }).map_err(map_error))
        .collect()
}

/// Row counts recorded by ANALYZE, if it has run.
fn row_estimate(conn: &Connection, schema: &str, table: &str) -> Result<Option<i64>, BackendError> {
    let has_stats: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_list WHERE schema = ?1 AND name = 'sqlite_stat1')",
            [schema],
            |r| r.get(0),
        )
        .map_err(map_error)?;
    if !has_stats {
        return Ok(None);
    }
    // The stat column starts with the row count; only "main" is read this way.
    if schema != "main" {
        return Ok(None);
    }
    conn.query_row(
        "SELECT MAX(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = ?1",
        [table],
        |r| r.get(0),
    )
    .optional()
    .map(Option::flatten)
    .map_err(map_error)
}

fn tables(conn: &Connection, schema: Option<&str>, name: Option<&str>) -> Result<Vec<TableInfo>, BackendError> {
    let mut stmt = conn
        .prepare(
            "SELECT schema, name, type FROM pragma_table_list \
             WHERE type IN ('table', 'view', 'virtual') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND schema <> 'temp' AND (?1 IS NULL OR schema = ?1) AND (?2 IS NULL OR name = ?2 COLLATE NOCASE) \
             ORDER BY schema, name",
        )
        .map_err(map_error)?;
    let rows = stmt
        .query_map(params![schema, name], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })
        .map_err(map_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error)?;
    rows.into_iter()
        .map(|(schema, name, kind)| {
            let kind = if kind == "view" {
                TableKind::View
            } else {
                TableKind::Table
            };
            let row_estimate = if kind == TableKind::Table {
                row_estimate(conn, &schema, &name)?
            } else {
                None
            };
            Ok(TableInfo {
                schema,
                name,
                kind,
                row_estimate,
                comment: String::new(),
            })
        })
        .collect()
}

/// A table's primary key columns, in key order.
fn primary_key_columns(conn: &Connection, schema: &str, table: &str) -> Result<Vec<String>, BackendError> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info(?1, ?2) WHERE pk > 0 ORDER BY pk")
        .map_err(map_error)?;
    let names = stmt
        .query_map(params![table, schema], |r| r.get::<_, String>(0))
        .map_err(map_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error);
    names
}

pub fn list_tables(conn: &Connection, schema: Option<&str>) -> Result<Vec<TableInfo>, BackendError> {
    tables(conn, schema, None)
}

pub fn describe_table(conn: &Connection, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError> {
    let schema = schema.unwrap_or("main");
    // Table names are not case-sensitive in SQLite.
    let Some(info) = tables(conn, Some(schema), Some(table))?.into_iter().next() else {
        return Err(BackendError::not_found(format!("table \"{schema}.{table}\" not found")));
    };
    let table = info.name.as_str();

    let mut stmt = conn
        .prepare("SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_xinfo(?1, ?2) WHERE hidden <> 1 ORDER BY cid")
        .map_err(map_error)?;
    // A primary key refuses NULL only in a WITHOUT ROWID table, or as the
    // rowid itself (a lone INTEGER PRIMARY KEY); elsewhere SQLite stores NULLs in it.
    let without_rowid: bool = conn
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE schema = ?1 AND name = ?2",
            params![schema, table],
            |r| r.get(0),
        )
        .map_err(map_error)?;
    let mut pk_columns: Vec<(i64, String)> = Vec::new();
    let columns = stmt
        .query_map(params![table, schema], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, bool>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(map_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error)?;
    let lone_integer_key = columns.iter().filter(|c| c.4 > 0).count() == 1
        && columns.iter().any(|c| c.4 > 0 && c.1.eq_ignore_ascii_case("INTEGER"));
    let columns = columns
        .into_iter()
        .enumerate()
        .map(|(place, (name, decl, not_null, default, pk))| {
            if pk > 0 {
                pk_columns.push((pk, name.clone()));
            }
            let mut col = column(&name, (!decl.is_empty()).then_some(decl.as_str()));
            col.nullable = !not_null && !(pk > 0 && (without_rowid || lone_integer_key));
            ColumnInfo {
                column: col,
                // The place among the columns `SELECT *` returns (hidden ones left out).
                ordinal: i32::try_from(place + 1).unwrap_or(i32::MAX),
                default_expression: default.unwrap_or_default(),
                comment: String::new(),
            }
        })
        .collect::<Vec<_>>();
    pk_columns.sort();
    let primary_key = (!pk_columns.is_empty()).then(|| PrimaryKey {
        name: String::new(),
        columns: pk_columns.into_iter().map(|(_, n)| n).collect(),
    });

    let mut stmt = conn
        .prepare("SELECT id, seq, \"table\", \"from\", \"to\", on_update, on_delete FROM pragma_foreign_key_list(?1, ?2) ORDER BY id, seq")
        .map_err(map_error)?;
    let mut foreign_keys: Vec<(i64, ForeignKey)> = Vec::new();
    let fk_rows = stmt
        .query_map(params![table, schema], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, usize>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
            ))
        })
        .map_err(map_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error)?;
    for (id, seq, target, from, to, on_update, on_delete) in fk_rows {
        // `REFERENCES parent` without columns means the parent's primary key.
        let to = match to {
            Some(to) => to,
            None => primary_key_columns(conn, schema, &target)?
                .into_iter()
                .nth(seq)
                .unwrap_or_default(),
        };
        match foreign_keys.last_mut() {
            Some((last, fk)) if *last == id => {
                fk.columns.push(from);
                fk.referenced_columns.push(to);
            }
            _ => foreign_keys.push((
                id,
                ForeignKey {
                    name: String::new(),
                    columns: vec![from],
                    referenced_schema: schema.to_string(),
                    referenced_table: target,
                    referenced_columns: vec![to],
                    on_update,
                    on_delete,
                },
            )),
        }
    }

    let mut stmt = conn
        .prepare("SELECT name, \"unique\", origin, partial FROM pragma_index_list(?1, ?2) ORDER BY name")
        .map_err(map_error)?;
    let index_rows = stmt
        .query_map(params![table, schema], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .map_err(map_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error)?;
    let mut indexes = Vec::with_capacity(index_rows.len());
    for (name, unique, origin, partial) in index_rows {
        let mut cols = conn
            .prepare("SELECT COALESCE(name, '<expression>') FROM pragma_index_info(?1, ?2) ORDER BY seqno")
            .map_err(map_error)?;
        let columns = cols
            .query_map(params![name, schema], |r| r.get::<_, String>(0))
            .map_err(map_error)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_error)?;
        indexes.push(Index {
            name,
            columns,
            unique,
            primary: origin == "pk",
            method: "btree".into(),
            partial,
        });
    }

    Ok(TableDescription {
        table: info,
        columns,
        primary_key,
        foreign_keys: foreign_keys.into_iter().map(|(_, fk)| fk).collect(),
        indexes,
        change_stream_ready: false,
        change_stream_reason: "SQLite sources have no change streams".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nullable(conn: &Connection, table: &str) -> Vec<(String, bool, i32)> {
        describe_table(conn, None, table)
            .expect("describe")
            .columns
            .into_iter()
            .map(|c| (c.column.name, c.column.nullable, c.ordinal))
            .collect()
    }

    #[test]
    fn primary_keys_refuse_null_only_where_sqlite_does() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE text_key (code TEXT PRIMARY KEY, v INT NOT NULL); \
             CREATE TABLE rowid_key (id INTEGER PRIMARY KEY, v INT); \
             CREATE TABLE no_rowid (code TEXT PRIMARY KEY, v INT) WITHOUT ROWID; \
             INSERT INTO text_key VALUES (NULL, 1);",
        )
        .expect("tables");
        // SQLite stored a NULL key above: the column is nullable, as it behaves.
        assert_eq!(
            nullable(&conn, "text_key"),
            [("code".into(), true, 1), ("v".into(), false, 2)]
        );
        assert_eq!(nullable(&conn, "rowid_key")[0], ("id".into(), false, 1));
        assert_eq!(nullable(&conn, "no_rowid")[0], ("code".into(), false, 1));
    }
}

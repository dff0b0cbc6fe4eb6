//! Catalog queries behind SchemaService for SQLite, through the pragma
//! table-valued functions so names are bound as parameters, never spliced.

use rusqlite::{params, Connection, OptionalExtension};

use super::{column, map_error};
use crate::backend::bulk::quote_ansi;
use crate::backend::{
    BackendError, ColumnGeneration, ColumnInfo, ForeignKey, Index, PrimaryKey, SchemaInfo, TableDescription, TableInfo,
    TableKind, TablePage,
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
    // The stat column starts with the row count; each attached database
    // has a sqlite_stat1 of its own.
    conn.query_row(
        &format!(
            "SELECT MAX(CAST(stat AS INTEGER)) FROM {}.sqlite_stat1 WHERE tbl = ?1",
            quote_ansi(schema)
        ),
        [table],
        |r| r.get(0),
    )
    .optional()
    .map(Option::flatten)
    .map_err(map_error)
}

fn tables(
    conn: &Connection,
    schema: Option<&str>,
    name: Option<&str>,
    page: &TablePage,
) -> Result<Vec<TableInfo>, BackendError> {
    // Names compare as bytes (BINARY, the columns' collation); LIMIT -1 is no limit.
    let mut stmt = conn
        .prepare(
            "SELECT schema, name, type FROM pragma_table_list \
             WHERE type IN ('table', 'view', 'virtual') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND schema <> 'temp' AND (?1 IS NULL OR schema = ?1 COLLATE NOCASE) \
             AND (?2 IS NULL OR name = ?2 COLLATE NOCASE) \
             AND (?3 IS NULL OR (schema, name) > (?3, ?4)) \
             ORDER BY schema, name LIMIT ?5",
        )
        .map_err(map_error)?;
    let (after_schema, after_name) = page.after.as_ref().map(|(s, n)| (s, n)).unzip();
    let limit = page.limit.map_or(-1, i64::from);
    let rows = stmt
        .query_map(params![schema, name, after_schema, after_name, limit], |r| {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    Comma,
    Word,
    Quoted,
}

/// The tokens of a statement as (kind, start, end) byte spans, comments left
/// out; None when a quote or comment is not closed. Every delimiter is
/// ASCII, so the spans are on character boundaries.
fn sql_tokens(sql: &str) -> Option<Vec<(Token, usize, usize)>> {
    let b = sql.as_bytes();
    let starts_comment = |i: usize| b[i..].starts_with(b"--") || b[i..].starts_with(b"/*");
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let kind = match b[i] {
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'-' if starts_comment(i) => {
                i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
                continue;
            }
            b'/' if starts_comment(i) => {
                i += 2 + b.get(i + 2..)?.windows(2).position(|w| w == b"*/")? + 2;
                continue;
            }
            b'(' => Token::Open,
            b')' => Token::Close,
            b',' => Token::Comma,
            quote @ (b'\'' | b'"' | b'`' | b'[') => {
                let close = if quote == b'[' { b']' } else { quote };
                let mut at = i + 1;
                loop {
                    at += b.get(at..)?.iter().position(|&c| c == close)?;
                    // A doubled quote is one quote character of the text.
                    if close != b']' && b.get(at + 1) == Some(&close) {
                        at += 2;
                    } else {
                        break;
                    }
                }
                i = at;
                Token::Quoted
            }
            _ => {
                while i + 1 < b.len()
                    && !b[i + 1].is_ascii_whitespace()
                    && !b"(),'\"`[".contains(&b[i + 1])
                    && !starts_comment(i + 1)
                {
                    i += 1;
                }
                Token::Word
            }
        };
        i += 1;
        tokens.push((kind, start, i));
    }
    Some(tokens)
}

/// A name token's text, unquoted.
fn unquoted(sql: &str, (kind, start, end): (Token, usize, usize)) -> String {
    let text = &sql[start..end];
    match (kind, text.chars().next()) {
        (Token::Quoted, Some('[')) => text[1..text.len() - 1].to_string(),
        (Token::Quoted, Some(q)) => text[1..text.len() - 1].replace(&format!("{q}{q}"), &q.to_string()),
        _ => text.to_string(),
    }
}

/// The expression of generated column `column` (`[GENERATED ALWAYS] AS
/// (expr)`) in a CREATE TABLE statement, as written. SQLite keeps it only
/// there: pragma table_xinfo shows no default for a generated column.
fn generation_expression(create_sql: &str, column: &str) -> Option<String> {
    let tokens = sql_tokens(create_sql)?;
    let list = tokens.iter().position(|t| t.0 == Token::Open)?;
    // Each definition in the column list: the tokens between its top-level commas.
    let (mut depth, mut from) = (0usize, list + 1);
    for at in list + 1..tokens.len() {
        match tokens[at].0 {
            Token::Open => depth += 1,
            Token::Close if depth > 0 => depth -= 1,
            Token::Comma | Token::Close if depth == 0 => {
                let found = generated_in(create_sql, &tokens[from..at], column);
                if found.is_some() || tokens[at].0 == Token::Close {
                    return found;
                }
                from = at + 1;
            }
            _ => {}
        }
    }
    None
}

/// The expression of one column definition if it defines generated `column`:
/// what the parentheses after a top-level AS enclose.
fn generated_in(sql: &str, definition: &[(Token, usize, usize)], column: &str) -> Option<String> {
    let (&name, rest) = definition.split_first()?;
    if !unquoted(sql, name).eq_ignore_ascii_case(column) {
        return None;
    }
    let mut depth = 0usize;
    let mut open = None;
    for (at, &(kind, start, end)) in rest.iter().enumerate() {
        match kind {
            Token::Open => {
                let after_as = at > 0
                    && rest[at - 1].0 == Token::Word
                    && sql[rest[at - 1].1..rest[at - 1].2].eq_ignore_ascii_case("AS");
                if depth == 0 && after_as {
                    open = Some(end);
                }
                depth += 1;
            }
            Token::Close => {
                depth = depth.checked_sub(1)?;
                if let (0, Some(open)) = (depth, open) {
                    return Some(sql[open..start].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

pub fn list_tables(conn: &Connection, schema: Option<&str>, page: &TablePage) -> Result<Vec<TableInfo>, BackendError> {
    tables(conn, schema, None, page)
}

pub fn describe_table(conn: &Connection, schema: Option<&str>, table: &str) -> Result<TableDescription, BackendError> {
    let schema = schema.unwrap_or("main");
    // Table names are not case-sensitive in SQLite.
    let Some(info) = tables(conn, Some(schema), Some(table), &TablePage::default())?
        .into_iter()
        .next()
    else {
        return Err(BackendError::not_found(format!("table \"{schema}.{table}\" not found")));
    };
    // As SQLite names them: schema and table names are not case-sensitive.
    let (schema, table) = (info.schema.as_str(), info.name.as_str());

    // hidden: 1 for a virtual table's hidden columns (left out), 2 and 3
    // for generated columns (virtual and stored).
    let mut stmt = conn
        .prepare("SELECT name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo(?1, ?2) WHERE hidden <> 1 ORDER BY cid")
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
                r.get::<_, i64>(5)?,
            ))
        })
        .map_err(map_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error)?;
    let lone_integer_key = columns.iter().filter(|c| c.4 > 0).count() == 1
        && columns.iter().any(|c| c.4 > 0 && c.1.eq_ignore_ascii_case("INTEGER"));
    // The lone INTEGER PRIMARY KEY of a rowid table is the rowid, numbered
    // when left out, unless declared DESC: that one is an ordinary column
    // with an index of its own (origin 'pk'), as any other primary key.
    let rowid_alias = lone_integer_key
        && !without_rowid
        && !conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_index_list(?1, ?2) WHERE origin = 'pk')",
                params![table, schema],
                |r| r.get::<_, bool>(0),
            )
            .map_err(map_error)?;
    // Generated columns' expressions are only in the table's SQL. The schema
    // cannot be bound here: it is quoted (and comes from pragma_table_list).
    let create_sql: String = if columns.iter().any(|c| c.5 >= 2) {
        conn.query_row(
            &format!(
                "SELECT COALESCE(sql, '') FROM {}.sqlite_schema WHERE type = 'table' AND name = ?1",
                quote_ansi(schema)
            ),
            [table],
            |r| r.get(0),
        )
        .optional()
        .map_err(map_error)?
        .unwrap_or_default()
    } else {
        String::new()
    };
    let columns = columns
        .into_iter()
        .enumerate()
        .map(|(place, (name, decl, not_null, default, pk, hidden))| {
            if pk > 0 {
                pk_columns.push((pk, name.clone()));
            }
            let (generation, generation_expression) = match hidden {
                2 | 3 => (
                    ColumnGeneration::Computed,
                    generation_expression(&create_sql, &name).unwrap_or_default(),
                ),
                _ if pk > 0 && rowid_alias => (ColumnGeneration::IdentityByDefault, String::new()),
                _ => (ColumnGeneration::None, String::new()),
            };
            let mut col = column(&name, (!decl.is_empty()).then_some(decl.as_str()));
            // A key that is not the rowid (also an INTEGER PRIMARY KEY DESC)
            // takes NULLs in a rowid table, as SQLite has always let it.
            col.nullable = !not_null && !(pk > 0 && (without_rowid || rowid_alias));
            ColumnInfo {
                column: col,
                // The place among the columns `SELECT *` returns (hidden ones left out).
                ordinal: i32::try_from(place + 1).unwrap_or(i32::MAX),
                default_expression: default.unwrap_or_default(),
                comment: String::new(),
                generation,
                generation_expression,
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

    #[test]
    fn generated_expressions_are_read_from_the_table_definition() {
        let sql = "CREATE TABLE t (a INT CHECK (CAST(a AS TEXT) <> ''), -- b AS (no)\n\
                   \"b\"\"q\" VARCHAR(10) GENERATED ALWAYS AS ( upper(a) || ',)' ) STORED, \
                   [c d] AS (a /* AS (no) */ + 1), `e` TEXT DEFAULT ('AS (x)'), f as(a*2)virtual, \
                   CONSTRAINT k CHECK (a AS (b)))";
        assert_eq!(generation_expression(sql, "b\"q").as_deref(), Some("upper(a) || ',)'"));
        assert_eq!(
            generation_expression(sql, "C D").as_deref(),
            Some("a /* AS (no) */ + 1")
        );
        assert_eq!(generation_expression(sql, "f").as_deref(), Some("a*2"));
        assert_eq!(generation_expression(sql, "a"), None);
        assert_eq!(generation_expression(sql, "e"), None);
        assert_eq!(generation_expression(sql, "missing"), None);
        assert_eq!(generation_expression("CREATE TABLE broken (a AS (1", "a"), None);
    }

    #[test]
    fn rowid_aliases_and_generated_columns_say_how_they_are_filled() {
        use crate::backend::ColumnGeneration as G;
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE ids (id INTEGER PRIMARY KEY, v INT, w INT AS (v * 2) STORED, x AS (v + 1)); \
             CREATE TABLE auto (id integer PRIMARY KEY AUTOINCREMENT); \
             CREATE TABLE desc_key (id INTEGER PRIMARY KEY DESC); \
             CREATE TABLE int_key (id INT PRIMARY KEY); \
             CREATE TABLE pair (a INTEGER, b INTEGER, PRIMARY KEY (a, b)); \
             CREATE TABLE no_rowid (id INTEGER PRIMARY KEY) WITHOUT ROWID;",
        )
        .expect("tables");
        let filled = |table: &str| -> Vec<(G, String)> {
            describe_table(&conn, None, table)
                .expect("describe")
                .columns
                .into_iter()
                .map(|c| (c.generation, c.generation_expression))
                .collect()
        };
        assert_eq!(
            filled("ids"),
            [
                (G::IdentityByDefault, String::new()),
                (G::None, String::new()),
                (G::Computed, "v * 2".into()),
                (G::Computed, "v + 1".into())
            ]
        );
        assert_eq!(filled("auto"), [(G::IdentityByDefault, String::new())]);
        // Not rowid aliases: a DESC key, an INT key, a composite key, WITHOUT ROWID.
        for table in ["desc_key", "int_key", "no_rowid"] {
            assert_eq!(filled(table), [(G::None, String::new())], "{table}");
        }
        assert_eq!(filled("pair"), [(G::None, String::new()), (G::None, String::new())]);
    }
}

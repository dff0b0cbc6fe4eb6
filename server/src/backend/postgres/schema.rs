//! Catalog queries behind SchemaService for PostgreSQL.

use tokio_postgres::Client;

use super::changes::{column_unwatchable, partitions_unwatchable, table_unwatchable};
use super::map_error;
use super::types::{column_type, typmod_details};
use crate::backend::bulk::quote_ansi;
use crate::backend::{
    BackendError, Column, ColumnGeneration, ColumnInfo, ColumnType, ForeignKey, Index, PrimaryKey, SchemaInfo,
    TableDescription, TableInfo, TableKind, TablePage,
};

const SYSTEM_SCHEMA: &str = "(n.nspname IN ('pg_catalog', 'information_schema') OR n.nspname LIKE 'pg\\_%')";

/// The catalog shows every role every object; the source's role sees only
/// schemas it may use and tables it holds some privilege on (as in
/// information_schema), so tenants sharing a database with their own roles
/// do not see each other's tables.
const MAY_USE_SCHEMA: &str = "has_schema_privilege(n.oid, 'USAGE')";
const MAY_USE_TABLE: &str = "has_schema_privilege(n.oid, 'USAGE') \
     AND (has_any_column_privilege(c.oid, 'SELECT, INSERT, UPDATE, REFERENCES') \
     OR has_table_privilege(c.oid, 'DELETE, TRUNCATE, TRIGGER'))";

pub async fn list_schemas(client: &Client, include_system: bool) -> Result<Vec<SchemaInfo>, tokio_postgres::Error> {
    let sql = format!("SELECT n.nspname::text, {SYSTEM_SCHEMA} FROM pg_namespace n WHERE {MAY_USE_SCHEMA} ORDER BY 1");
    let rows = client.query(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| SchemaInfo {
            name: r.get(0),
            system: r.get(1),
        })
        .filter(|s| include_system || !s.system)
        .collect())
}

fn table_kind(relkind: &str) -> TableKind {
    match relkind {
        "v" => TableKind::View,
        "m" => TableKind::MaterializedView,
        "f" => TableKind::ForeignTable,
        "p" => TableKind::PartitionedTable,
        _ => TableKind::Table,
    }
}

/// Whether the estimate of relation `$t` is unknown: reltuples is -1 for
/// tables never analyzed (PostgreSQL 14 and later); before 14 such a table
/// has 0 with relpages 0: unknown either way, not empty.
macro_rules! unknown_estimate {
    ($t:literal) => {
        concat!(
            "(",
            $t,
            ".reltuples < 0 OR (",
            $t,
            ".reltuples = 0 AND ",
            $t,
            ".relpages = 0 ",
            "AND current_setting('server_version_num')::int < 140000))"
        )
    };
}

// A partitioned table holds no rows itself: its estimate is its partitions'
// (unknown while none of them was analyzed, or while one not analyzed holds
// rows by the statistics counters: a partition just loaded would count as
// empty). The counters, not the partition's size: pg_relation_size would
// lock the partition, and wait behind DDL on it.
const TABLE_COLUMNS: &str = concat!(
    "n.nspname::text, c.relname::text, c.relkind::text, ",
    "CASE WHEN c.relkind = 'p' THEN ",
    "(SELECT CASE WHEN bool_and(",
    unknown_estimate!("pc"),
    ") OR bool_or((",
    unknown_estimate!("pc"),
    ") AND (pg_stat_get_live_tuples(pc.oid) > 0 OR pg_stat_get_tuples_inserted(pc.oid) > 0)) THEN -1 ",
    "ELSE sum(CASE WHEN ",
    unknown_estimate!("pc"),
    " THEN 0 ELSE pc.reltuples END) END ",
    "FROM pg_partition_tree(c.oid) t JOIN pg_class pc ON pc.oid = t.relid WHERE t.isleaf) ",
    "WHEN ",
    unknown_estimate!("c"),
    " THEN -1 ELSE c.reltuples END::float8, ",
    "COALESCE(obj_description(c.oid, 'pg_class'), '')"
);

fn table_info(r: &tokio_postgres::Row) -> TableInfo {
    let kind = table_kind(r.get::<_, &str>(2));
    // NULL: a partitioned table without partitions.
    let reltuples: f64 = r.get::<_, Option<f64>>(3).unwrap_or(-1.0);
    // Unknown (see TABLE_COLUMNS), and meaningless for views.
    let row_estimate = (reltuples >= 0.0
        && matches!(
            kind,
            TableKind::Table | TableKind::MaterializedView | TableKind::PartitionedTable
        ))
    .then_some(reltuples as i64);
    TableInfo {
        schema: r.get(0),
        name: r.get(1),
        kind,
        row_estimate,
        comment: r.get(4),
    }
}

pub async fn list_tables(
    client: &Client,
    schema: Option<&str>,
    page: &TablePage,
) -> Result<Vec<TableInfo>, tokio_postgres::Error> {
    // Ordered and compared as bytes (COLLATE "C"): the database's collation
    // may order names otherwise than a page's end compares with them.
    let sql = format!(
        "SELECT {TABLE_COLUMNS} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition AND {MAY_USE_TABLE} \
         AND (($1::text IS NULL AND NOT {SYSTEM_SCHEMA}) OR n.nspname = $1::text) \
         AND ($2::text IS NULL OR (n.nspname::text COLLATE \"C\", c.relname::text COLLATE \"C\") \
              > ($2::text COLLATE \"C\", $3::text COLLATE \"C\")) \
         ORDER BY n.nspname::text COLLATE \"C\", c.relname::text COLLATE \"C\" LIMIT $4::int8"
    );
    let (after_schema, after_name) = page.after.as_ref().map(|(s, n)| (s, n)).unzip();
    let limit = page.limit.map(i64::from);
    let rows = client
        .query(&sql, &[&schema, &after_schema, &after_name, &limit])
        .await?;
    Ok(rows.iter().map(table_info).collect())
}

fn fk_action(code: &str) -> &'static str {
    match code {
        "r" => "RESTRICT",
        "c" => "CASCADE",
        "n" => "SET NULL",
        "d" => "SET DEFAULT",
        _ => "NO ACTION",
    }
}

pub async fn describe_table(
    client: &Client,
    schema: Option<&str>,
    table: &str,
) -> Result<TableDescription, BackendError> {
    let sql = format!(
        "SELECT {TABLE_COLUMNS}, c.oid, c.relreplident::text, current_setting('wal_level'), \
                current_setting('server_version_num')::int \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = $2::text AND c.relkind IN ('r', 'v', 'm', 'f', 'p') AND {MAY_USE_TABLE} \
         AND CASE WHEN $1::text IS NULL THEN pg_table_is_visible(c.oid) ELSE n.nspname = $1::text END"
    );
    let row = client.query_opt(&sql, &[&schema, &table]).await.map_err(map_error)?;
    let Some(row) = row else {
        let qualified = schema
            .map(|s| format!("{s}.{table}"))
            .unwrap_or_else(|| table.to_string());
        return Err(BackendError::not_found(format!("table \"{qualified}\" not found")));
    };
    let info = table_info(&row);
    let relkind: String = row.get(2);
    let oid: u32 = row.get(5);
    let replica_identity: String = row.get(6);
    let wal_level: String = row.get(7);
    let version: i32 = row.get(8);

    // Types as results (and change events) carry them: through a prepared
    // `SELECT *`, whose column types tokio-postgres resolves (domains over
    // domains, arrays of domains, enums), so that "unsupported" here is what
    // a query or a watch finds, and a table WatchChanges accepts is ready.
    let qualified = format!("{}.{}", quote_ansi(&info.schema), quote_ansi(&info.name));
    let prepared = client
        .prepare(&format!("SELECT * FROM {qualified} LIMIT 0"))
        .await
        .map_err(map_error)?;
    // A domain column's typmod and NOT NULL are the domain's (its own
    // atttypmod is -1), as information_schema reads them.
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    NOT (a.attnotnull OR (t.typtype = 'd' AND t.typnotnull)), \
                    CASE WHEN a.attgenerated = '' THEN COALESCE(pg_get_expr(d.adbin, d.adrelid), '') ELSE '' END, \
                    COALESCE(col_description(a.attrelid, a.attnum), ''), \
                    CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END, \
                    a.attgenerated <> '', \
                    has_column_privilege(a.attrelid, a.attnum, 'SELECT, INSERT, UPDATE, REFERENCES'), \
                    a.attidentity::text, \
                    CASE WHEN a.attgenerated <> '' THEN COALESCE(pg_get_expr(d.adbin, d.adrelid), '') ELSE '' END \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(map_error)?;
    let mut unwatchable_column = None;
    let mut columns = Vec::with_capacity(rows.len());
    for (at, r) in rows.iter().enumerate() {
        // As information_schema: a column the role holds no privilege on is
        // not shown (another tenant's role may hold them).
        if !r.get::<_, bool>(7) {
            continue;
        }
        let name: String = r.get(0);
        let ty = prepared.columns().iter().find(|c| c.name() == name).map(|c| c.type_());
        let (column_type, element_type) = ty.and_then(column_type).unwrap_or((ColumnType::Unsupported, None));
        let mut column = Column::new(name, r.get::<_, String>(1), column_type);
        column.element_type = element_type;
        column.nullable = r.get(2);
        if let Some(ty) = ty {
            // A domain's modifier applies to its base type.
            let base = match ty.kind() {
                tokio_postgres::types::Kind::Domain(base) => base,
                _ => ty,
            };
            (column.precision, column.scale, column.max_length) = typmod_details(base, r.get(5));
        }
        // Generated columns are not published: their type does not matter.
        if column_type == ColumnType::Unsupported && !r.get::<_, bool>(6) && unwatchable_column.is_none() {
            unwatchable_column = Some((column.name.clone(), column.native_type.clone()));
        }
        // attgenerated 's' (stored) or 'v' (virtual, PostgreSQL 18); a
        // serial column is neither: an ordinary one with a nextval default.
        let generation = match (r.get::<_, bool>(6), r.get::<_, &str>(8)) {
            (true, _) => ColumnGeneration::Computed,
            (false, "a") => ColumnGeneration::IdentityAlways,
            (false, "d") => ColumnGeneration::IdentityByDefault,
            _ => ColumnGeneration::None,
        };
        columns.push(ColumnInfo {
            column,
            // The place among the columns a `SELECT *` returns (dropped columns leave gaps in attnum).
            ordinal: at as i32 + 1,
            default_expression: r.get(3),
            comment: r.get(4),
            generation,
            generation_expression: r.get(9),
        });
    }

    // Keys and indexes over a column not shown are not shown either (an
    // expression index's text may name any column).
    let mut primary_key = None;
    let mut foreign_keys = Vec::new();
    let constraints = client
        .query(
            "SELECT con.conname::text, con.contype::text, \
               ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o) \
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o), \
               COALESCE(fn.nspname::text, ''), COALESCE(fc.relname::text, ''), \
               ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o) \
                     JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o), \
               con.confupdtype::text, con.confdeltype::text \
             FROM pg_constraint con \
             LEFT JOIN pg_class fc ON fc.oid = con.confrelid \
             LEFT JOIN pg_namespace fn ON fn.oid = fc.relnamespace \
             WHERE con.conrelid = $1 AND con.contype IN ('p', 'f') \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint p WHERE p.oid = con.conparentid AND p.conrelid = con.conrelid) \
               AND NOT EXISTS (SELECT 1 FROM unnest(con.conkey) k(n) WHERE NOT has_column_privilege(con.conrelid, k.n, 'SELECT, INSERT, UPDATE, REFERENCES')) \
               AND NOT EXISTS (SELECT 1 FROM unnest(con.confkey) k(n) WHERE NOT has_column_privilege(con.confrelid, k.n, 'SELECT, INSERT, UPDATE, REFERENCES')) \
             ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(map_error)?;
    for r in &constraints {
        if r.get::<_, &str>(1) == "p" {
            primary_key = Some(PrimaryKey {
                name: r.get(0),
                columns: r.get(2),
            });
        } else {
            foreign_keys.push(ForeignKey {
                name: r.get(0),
                columns: r.get(2),
                referenced_schema: r.get(3),
                referenced_table: r.get(4),
                referenced_columns: r.get(5),
                on_update: fk_action(r.get(6)).to_string(),
                on_delete: fk_action(r.get(7)).to_string(),
            });
        }
    }

    let indexes = client
        .query(
            // Unique only where ON CONFLICT can use it: not while it is being
            // built (invalid), and not deferrable (PostgreSQL refuses those).
            "SELECT ic.relname::text, ix.indisunique AND ix.indisvalid AND ix.indimmediate, ix.indisprimary, am.amname::text, \
               ARRAY(SELECT COALESCE(a.attname::text, pg_get_indexdef(ix.indexrelid, k.o::int, true)) \
                     FROM unnest(ix.indkey::int2[]) WITH ORDINALITY k(n, o) \
                     LEFT JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.n \
                     WHERE k.o <= ix.indnkeyatts ORDER BY k.o), \
               ix.indpred IS NOT NULL \
             FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid JOIN pg_am am ON am.oid = ic.relam \
             WHERE ix.indrelid = $1 \
               AND NOT EXISTS (SELECT 1 FROM unnest(ix.indkey::int2[]) k(n) \
                               WHERE k.n <> 0 AND NOT has_column_privilege(ix.indrelid, k.n, 'SELECT, INSERT, UPDATE, REFERENCES')) \
               AND (ix.indexprs IS NULL OR NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = ix.indrelid \
                      AND a.attnum > 0 AND NOT a.attisdropped \
                      AND NOT has_column_privilege(a.attrelid, a.attnum, 'SELECT, INSERT, UPDATE, REFERENCES'))) \
             ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(map_error)?
        .iter()
        .map(|r| Index {
            name: r.get(0),
            unique: r.get(1),
            primary: r.get(2),
            method: r.get(3),
            columns: r.get(4),
            partial: r.get(5),
        })
        .collect();

    // WatchChanges' own rule, so that "ready" means a watch would start.
    let mut refused = table_unwatchable(&qualified, &relkind, &replica_identity, primary_key.is_some())
        .or_else(|| unwatchable_column.map(|(column, type_name)| column_unwatchable(&qualified, &column, &type_name)));
    if refused.is_none() && relkind == "p" {
        refused = partitions_unwatchable(client, (oid, &qualified), &replica_identity).await?;
    }
    let (change_stream_ready, change_stream_reason) = match refused {
        Some(BackendError::Invalid(why) | BackendError::ChangesNotReady(why)) => (false, why),
        Some(other) => (false, other.to_string()),
        None if version < 140_000 => (false, "change streams need PostgreSQL 14 or later".to_string()),
        None if wal_level != "logical" => (
            false,
            format!("wal_level is '{wal_level}'; change streams need wal_level = logical"),
        ),
        None => (true, String::new()),
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

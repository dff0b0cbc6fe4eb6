//! Catalog queries behind SchemaService for PostgreSQL.

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::map_error;
use super::types::{column_type, typmod_details};
use crate::backend::{
    BackendError, Column, ColumnInfo, ColumnType, ForeignKey, Index, PrimaryKey, SchemaInfo, TableDescription,
    TableInfo, TableKind,
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

const TABLE_COLUMNS: &str = "n.nspname::text, c.relname::text, c.relkind::text, c.reltuples::float8, \
     COALESCE(obj_description(c.oid, 'pg_class'), '')";

fn table_info(r: &tokio_postgres::Row) -> TableInfo {
    let kind = table_kind(r.get::<_, &str>(2));
    let reltuples: f64 = r.get(3);
    // reltuples is -1 for tables never analyzed, and meaningless for views.
    let row_estimate = (reltuples >= 0.0 && matches!(kind, TableKind::Table | TableKind::MaterializedView))
        .then_some(reltuples as i64);
    TableInfo {
        schema: r.get(0),
        name: r.get(1),
        kind,
        row_estimate,
        comment: r.get(4),
    }
}

pub async fn list_tables(client: &Client, schema: Option<&str>) -> Result<Vec<TableInfo>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {TABLE_COLUMNS} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND {MAY_USE_TABLE} \
         AND (($1::text IS NULL AND NOT {SYSTEM_SCHEMA}) OR n.nspname = $1::text) ORDER BY 1, 2"
    );
    let rows = client.query(&sql, &[&schema]).await?;
    Ok(rows.iter().map(table_info).collect())
}

/// Normalized type of a catalog type, after resolving domains.
fn catalog_type(oid: u32, typtype: &str, typname: &str, elem: u32) -> (ColumnType, Option<ColumnType>) {
    if let Some(t) = Type::from_oid(oid).as_ref().and_then(column_type) {
        return t;
    }
    if typtype == "e" || typname == "citext" {
        return (ColumnType::String, None);
    }
    if elem != 0 && typname.starts_with('_') {
        let element = Type::from_oid(elem).as_ref().and_then(column_type).map(|(t, _)| t);
        return (ColumnType::List, element);
    }
    (ColumnType::Unsupported, None)
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
        "SELECT {TABLE_COLUMNS}, c.oid, c.relreplident::text, current_setting('wal_level') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = $2::text AND c.relkind IN ('r', 'v', 'm', 'f', 'p') AND {MAY_USE_TABLE} \
         AND n.nspname = COALESCE($1::text, current_schema())"
    );
    let row = client.query_opt(&sql, &[&schema, &table]).await.map_err(map_error)?;
    let Some(row) = row else {
        let qualified = schema
            .map(|s| format!("{s}.{table}"))
            .unwrap_or_else(|| table.to_string());
        return Err(BackendError::not_found(format!("table \"{qualified}\" not found")));
    };
    let info = table_info(&row);
    let oid: u32 = row.get(5);
    let replica_identity: String = row.get(6);
    let wal_level: String = row.get(7);

    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull, \
                    CASE WHEN a.attgenerated = '' THEN COALESCE(pg_get_expr(d.adbin, d.adrelid), '') ELSE '' END, \
                    a.attnum::int4, \
                    COALESCE(col_description(a.attrelid, a.attnum), ''), a.atttypmod, \
                    bt.oid, bt.typtype::text, bt.typname::text, bt.typelem \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(map_error)?
        .iter()
        .map(|r| {
            let base_oid: u32 = r.get(7);
            let (column_type, element_type) = catalog_type(base_oid, r.get(8), r.get(9), r.get(10));
            let mut column = Column::new(r.get::<_, String>(0), r.get::<_, String>(1), column_type);
            column.element_type = element_type;
            column.nullable = r.get(2);
            if let Some(ty) = Type::from_oid(base_oid) {
                (column.precision, column.scale, column.max_length) = typmod_details(&ty, r.get(6));
            }
            ColumnInfo {
                column,
                ordinal: r.get(4),
                default_expression: r.get(3),
                comment: r.get(5),
            }
        })
        .collect::<Vec<_>>();

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
            "SELECT ic.relname::text, ix.indisunique, ix.indisprimary, am.amname::text, \
               ARRAY(SELECT COALESCE(a.attname::text, pg_get_indexdef(ix.indexrelid, k.o::int, true)) \
                     FROM unnest(ix.indkey::int2[]) WITH ORDINALITY k(n, o) \
                     LEFT JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.n \
                     WHERE k.o <= ix.indnkeyatts ORDER BY k.o), \
               ix.indpred IS NOT NULL \
             FROM pg_index ix JOIN pg_class ic ON ic.oid = ix.indexrelid JOIN pg_am am ON am.oid = ic.relam \
             WHERE ix.indrelid = $1 ORDER BY 1",
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

    let (change_stream_ready, change_stream_reason) = if info.kind != TableKind::Table {
        (false, "only ordinary tables can be watched".to_string())
    } else if wal_level != "logical" {
        (
            false,
            format!("wal_level is '{wal_level}'; change streams need wal_level = logical"),
        )
    } else if primary_key.is_none() && replica_identity != "f" {
        (
            false,
            "the table has no primary key; add one or set REPLICA IDENTITY FULL".to_string(),
        )
    } else {
        (true, String::new())
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

//! PostgreSQL change streams: one logical replication slot (`pgoutput`, binary
//! tuples) and one publication per subscription, read over a replication
//! connection (`START_REPLICATION`): the server pushes each transaction as it
//! decodes it. The slot's confirmed position moves only to what the client
//! acknowledged, so a crash loses nothing. An ordinary connection beside it
//! holds the subscription's lock, takes snapshots and resolves types.
//!
//! Positions are (LSN, sequence): a row change is (commit LSN of its
//! transaction, its index in the transaction from 1); a commit or heartbeat is
//! (LSN past it, 0), meaning "everything before this LSN". Confirming a
//! position's LSN, or starting the stream there, never skips an
//! unacknowledged transaction: the slot skips only transactions whose commit
//! record starts before that LSN.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{pin_mut, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use super::pgoutput::{self, lsn_text, Datum, Message, Relation};
use super::replication::{slot_held, status_interval, Event, Replication, SLOT_RETRY};
use super::types::{column_of, decode_change, pg_epoch, ChangeValue};
use super::{map_error, Target};
use crate::backend::bulk::quote_ansi;
use crate::backend::changes::{
    self, check_resume, Acks, ChangeFeed, ChangeItem, ChangeOp, Outbox, Position, RowChange, SnapshotTable, TableName,
    WatchSpec,
};
use crate::backend::{BackendError, Column, ColumnType, Row, Value};

/// Items buffered between the reading task and a slow client.
/// How long a take-over waits for the old consumer's connection to end.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(5);
/// How long the replication connection may stay silent while the reader
/// asks for the server's position every second, at the least (see `silence`).
const SILENCE: Duration = Duration::from_secs(30);

/// The silence after which the replication connection counts as lost, for
/// the server's `wal_sender_timeout` (milliseconds). While a WAL sender
/// replays a large transaction none of whose changes are published, it
/// answers only with its own keepalives, half a `wal_sender_timeout` apart;
/// with the timeout off (0) it sends none, and only a long limit is safe.
fn silence(wal_sender_timeout_ms: i64) -> Duration {
    match u64::try_from(wal_sender_timeout_ms) {
        Ok(0) | Err(_) => Duration::from_secs(600),
        Ok(ms) => SILENCE.max(Duration::from_millis(ms) + Duration::from_secs(5)),
    }
}
/// How long a new consumer waits for the subscription's lock: a consumer
/// that reconnects at once finds its old session still ending.
const LOCK_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PgPos {
    lsn: u64,
    seq: u32,
}

impl PgPos {
    fn encode(self) -> Position {
        let mut b = Vec::with_capacity(12);
        b.extend_from_slice(&self.lsn.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        Position(b)
    }

    fn decode(p: &Position) -> Result<Self, BackendError> {
        let bytes: [u8; 12] =
            p.0.as_slice()
                .try_into()
                .map_err(|_| BackendError::Invalid("not a PostgreSQL change position".into()))?;
        let (lsn, seq) = bytes.split_at(8);
        Ok(PgPos {
            lsn: u64::from_be_bytes(lsn.try_into().unwrap_or_default()),
            seq: u32::from_be_bytes(seq.try_into().unwrap_or_default()),
        })
    }
}

/// A watched table as the catalog describes it.
struct Watched {
    schema: String,
    table: String,
    qualified: String,
    primary_key: Arc<[String]>,
    /// A partitioned table: its partitions' changes come under its name.
    partitioned: bool,
    /// Its published columns (not the generated ones), quoted, for the
    /// snapshot: its rows have the columns its change events have.
    published: String,
}

/// The longest WAL page header (a segment's first page's).
const LONG_PAGE_HEADER: u64 = 40;

/// The WAL insert position `insert`, moved back to its page's start when it
/// is just past the page's header (24 bytes, 40 at a segment's): there
/// nothing was written yet, and the sender's position, on a quiet server,
/// stops at the page boundary and would never reach it.
fn before_page_header(insert: u64, page: u64) -> u64 {
    let into_page = insert % page.max(1);
    if into_page <= LONG_PAGE_HEADER {
        insert - into_page
    } else {
        insert
    }
}

/// A watched table found replaced (see `Reader::replaced`).
struct Replaced {
    /// WAL position by which its name had moved.
    by: u64,
    table: String,
    /// Its name names another table now (rather than none).
    elsewhere: bool,
    /// The last change sent once the stream is past `by`: every change of
    /// the table has been sent by then.
    delivered: Option<PgPos>,
}

impl Replaced {
    fn error(&self) -> BackendError {
        let now = if self.elsewhere {
            "names another table now (dropped and made again, or swapped by a rename)"
        } else {
            "names no table now (dropped or renamed)"
        };
        BackendError::ChangesNotReady(format!(
            "watched table {} {now}: its changes up to then were delivered and acknowledged. Watch again to \
             follow the table under that name (with snapshot = true for the rows it holds: its changes before \
             the new watch are not in the subscription), or name the table's new name",
            self.table
        ))
    }
}

/// Longest wait of a snapshot for its share lock on the watched tables.
const SNAPSHOT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A relation as pgoutput announced it, with its columns resolved to Weir's types.
struct Rel {
    schema: String,
    table: String,
    columns: Arc<[Column]>,
    types: Vec<Type>,
    primary_key: Arc<[String]>,
}

/// A session of its own, driven like the pool's.
/// A session of a stream's own (its lock, its snapshot). Timeouts a role or
/// database sets for applications do not apply: a snapshot read at the
/// consumer's pace is one long statement, and the lock's session sits idle
/// for the stream's whole life; cut, the snapshot failed on every retry,
/// and the stream ended every few minutes. (`idle_session_timeout` is
/// PostgreSQL 14's; older servers have none to lift.)
async fn connect(target: &Target) -> Result<Client, BackendError> {
    let client = target.connect().await?.client;
    client
        .batch_execute(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             SELECT set_config('idle_session_timeout', '0', false) \
             WHERE current_setting('server_version_num')::int >= 140000",
        )
        .await
        .map_err(map_error)?;
    Ok(client)
}

fn lsn_sql(expr: &str) -> String {
    format!("(({expr}) - '0/0'::pg_lsn)::int8")
}

async fn current_lsn(client: &Client) -> Result<u64, BackendError> {
    let row = client
        .query_one(&format!("SELECT {}", lsn_sql("pg_current_wal_lsn()")), &[])
        .await
        .map_err(map_error)?;
    Ok(row.get::<_, i64>(0) as u64)
}

async fn check_wal_level(client: &Client, config: &Target) -> Result<(), BackendError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_version_num')::int, \
             current_setting('server_version'), current_setting('synchronous_standby_names')",
            &[],
        )
        .await
        .map_err(map_error)?;
    let (level, version): (String, i32) = (row.get(0), row.get(1));
    // The stream asks pgoutput for binary tuples, which PostgreSQL 14 added:
    // refused before a slot is made, not at START_REPLICATION after it.
    if version < 140_000 {
        return Err(BackendError::ChangesNotReady(format!(
            "change streams need PostgreSQL 14 or later; this server is {}",
            row.get::<_, String>(2)
        )));
    }
    if level != "logical" {
        return Err(BackendError::ChangesNotReady(format!(
            "PostgreSQL has wal_level = {level}; change streams need wal_level = logical \
             (set it in postgresql.conf and restart the server)"
        )));
    }
    let standbys: String = row.get(3);
    let name = super::replication::application_name(config);
    if would_be_synchronous(&standbys, name) {
        return Err(BackendError::ChangesNotReady(format!(
            "synchronous_standby_names = '{standbys}' takes this stream's replication connection \
             (application_name {name}) as a synchronous standby: every commit on the server would then wait \
             for the stream's consumer to acknowledge it. Name the standbys instead of '*'"
        )));
    }
    Ok(())
}

/// Whether `synchronous_standby_names` matches `application_name` (or is
/// `*`, which matches every WAL sender, logical ones too).
fn would_be_synchronous(setting: &str, application_name: &str) -> bool {
    setting
        .split(|c: char| c == ',' || c == '(' || c == ')' || c.is_whitespace())
        .map(|t| t.trim_matches('"'))
        .any(|t| t == "*" || t.eq_ignore_ascii_case(application_name))
}

/// Resolves each table and checks it can be published without breaking the
/// application's own UPDATEs and DELETEs (which need a replica identity).
async fn resolve(client: &Client, tables: &[TableName]) -> Result<HashMap<u32, Watched>, BackendError> {
    let mut out = HashMap::new();
    for t in tables {
        let name = match &t.schema {
            Some(s) => format!("{}.{}", quote_ansi(s), quote_ansi(&t.table)),
            None => quote_ansi(&t.table),
        };
        let row = client
            .query_opt(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relreplident::text,
                        ARRAY(SELECT a.attname::text FROM pg_index i
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                              WHERE i.indrelid = c.oid AND i.indisprimary
                              ORDER BY array_position(i.indkey::int2[], a.attnum)),
                        ARRAY(SELECT attname::text FROM pg_attribute
                              WHERE attrelid = c.oid AND attnum > 0 AND attgenerated <> '')
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass($1)",
                &[&name],
            )
            .await
            .map_err(map_error)?
            .ok_or_else(|| BackendError::not_found(format!("table {name} not found")))?;
        let (oid, schema, table): (u32, String, String) = (row.get(0), row.get(1), row.get(2));
        let (kind, identity, primary_key): (String, String, Vec<String>) = (row.get(3), row.get(4), row.get(5));
        // Generated columns are not published (pgoutput leaves them out).
        let generated: Vec<String> = row.get(6);
        let qualified = format!("{}.{}", quote_ansi(&schema), quote_ansi(&table));
        if let Some(refused) = table_unwatchable(&qualified, &kind, &identity, !primary_key.is_empty()) {
            return Err(refused);
        }
        if kind == "p" {
            if let Some(refused) = partitions_unwatchable(client, (oid, &qualified), &identity).await? {
                return Err(refused);
            }
        }
        // A column of a type change events cannot carry would stop the
        // stream at the table's first change, and at it again on every
        // resume: refused before a slot holds any WAL for it.
        let described = client
            .prepare(&format!("SELECT * FROM {qualified} LIMIT 0"))
            .await
            .map_err(map_error)?;
        let mut published = Vec::new();
        for c in described
            .columns()
            .iter()
            .filter(|c| !generated.iter().any(|g| g == c.name()))
        {
            if let Err(BackendError::UnsupportedType { column, type_name }) = column_of(c.name(), c.type_(), -1) {
                return Err(column_unwatchable(&qualified, &column, &type_name));
            }
            published.push(quote_ansi(c.name()));
        }
        out.insert(
            oid,
            Watched {
                schema,
                table,
                qualified,
                primary_key: primary_key.into(),
                partitioned: kind == "p",
                published: published.join(", "),
            },
        );
    }
    Ok(out)
}

/// Why a table of this kind (`relkind`) and replica identity cannot be
/// watched, if it cannot. One rule for WatchChanges and DescribeTable.
pub(super) fn table_unwatchable(
    qualified: &str,
    relkind: &str,
    identity: &str,
    has_primary_key: bool,
) -> Option<BackendError> {
    if relkind != "r" && relkind != "p" {
        return Some(BackendError::Invalid(format!(
            "{qualified} is not an ordinary table; only tables can be watched"
        )));
    }
    let identified = match identity {
        "f" | "i" => true,
        "d" => has_primary_key,
        _ => false,
    };
    (!identified).then(|| {
        BackendError::ChangesNotReady(format!(
            "table {qualified} has no primary key (nor REPLICA IDENTITY FULL or USING INDEX): \
             its updates and deletes cannot be identified; add a primary key or run \
             ALTER TABLE {qualified} REPLICA IDENTITY FULL"
        ))
    })
}

/// Why a partitioned table cannot be watched for its partitions, if it
/// cannot. Each partition's own replica identity is the one its updates and
/// deletes need (the table's is not passed on to them), and the one its old
/// rows are logged with: one without a key fails the application's updates
/// once published, and one short of the table's FULL would give `before`
/// rows with NULL for every column but its key, marked as full rows.
pub(super) async fn partitions_unwatchable(
    client: &Client,
    (oid, qualified): (u32, &str),
    identity: &str,
) -> Result<Option<BackendError>, BackendError> {
    let partitions = client
        .query(
            "SELECT c.oid::regclass::text, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
             FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid
             WHERE t.isleaf ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(map_error)?;
    for p in &partitions {
        let (partition, own): (String, String) = (p.get(0), p.get(1));
        if let Some(refused) = table_unwatchable(&partition, "r", &own, p.get(2)) {
            return Ok(Some(refused));
        }
        if identity == "f" && own != "f" {
            return Ok(Some(BackendError::ChangesNotReady(format!(
                "{qualified} has REPLICA IDENTITY FULL but its partition {partition} does not (partitions keep \
                 their own): the old rows of its updates and deletes would hold its key alone; run \
                 ALTER TABLE {partition} REPLICA IDENTITY FULL"
            ))));
        }
    }
    Ok(None)
}

/// A published column of a type change events cannot carry: it would stop
/// the stream at the table's first change, and at it again on every resume.
pub(super) fn column_unwatchable(qualified: &str, column: &str, type_name: &str) -> BackendError {
    BackendError::ChangesNotReady(format!(
        "column {column} of {qualified} has type {type_name}, which change events cannot carry; \
         change its type (or watch a table without it)"
    ))
}

/// The key of the advisory lock that makes a subscription single-consumer:
/// 64 bits of a SHA-256 of its id. A 32-bit hash (`hashtext`) would let a
/// tenant find, offline, a subscription name whose lock is another tenant's,
/// and end that tenant's stream by taking its own over.
pub fn lock_key(spec_id: &str) -> i64 {
    let digest = Sha256::digest(format!("weir subscription lock\0{spec_id}").as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(key)
}

/// The `pg_locks` row of that lock ($1 its key): a one-key lock shows its
/// high and low 32 bits as `classid` and `objid`, with `objsubid` 1. Only
/// this database's: advisory locks are per database, and another source on
/// the same server may use the same subscription name.
const LOCK_ROW: &str = "locktype = 'advisory' AND objsubid = 1 \
     AND ((classid::int8 << 32) | objid::int8) = $1::int8 \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Tries the subscription's advisory lock until `wait` has passed.
async fn try_lock_for(client: &Client, spec_id: &str, wait: Duration) -> Result<bool, BackendError> {
    let key = lock_key(spec_id);
    let deadline = Instant::now() + wait;
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(map_error)?;
        if row.get::<_, bool>(0) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes the subscription's advisory lock on `client`'s session; with
/// `take_over`, ends the session holding it first.
async fn lock(client: &Client, spec_id: &str, name: &str, take_over: bool) -> Result<(), BackendError> {
    let wait = if take_over { Duration::ZERO } else { LOCK_WAIT };
    if try_lock_for(client, spec_id, wait).await? {
        return Ok(());
    }
    if take_over {
        // The old consumer's two sessions: the one holding the lock, and the
        // replication session reading the slot (named as the subscription id).
        client
            .execute(
                &format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE {LOCK_ROW} AND pid <> pg_backend_pid() \
                     UNION ALL SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name::text = $2 AND database = current_database() AND active_pid IS NOT NULL"
                ),
                &[&lock_key(spec_id), &spec_id],
            )
            .await
            .map_err(map_error)?;
        if try_lock_for(client, spec_id, TAKE_OVER_WAIT).await? {
            return Ok(());
        }
    }
    Err(BackendError::SubscriptionActive(name.to_string()))
}

/// Whether another session takes the subscription's lock within a moment:
/// how a consumer whose session was ended tells a take-over from an outage.
/// Bounded: in an outage the database may not answer at all.
async fn taken_over(config: &Target, spec_id: &str) -> bool {
    let check = async {
        let Ok(client) = connect(config).await else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let held = client
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE {LOCK_ROW} AND granted)"),
                    &[&lock_key(spec_id)],
                )
                .await;
            match held {
                Ok(row) if row.get::<_, bool>(0) => return true,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(_) => return false,
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(3), check)
        .await
        .unwrap_or(false)
}

/// The acknowledged LSN of the subscription's slot, if it has one.
/// Slot names are server-wide: a slot of that name in another database is
/// another source's subscription (same tenant and name), never this one's.
async fn slot_confirmed(client: &Client, id: &str, name: &str) -> Result<Option<u64>, BackendError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT database IS NOT DISTINCT FROM current_database(), {}, wal_status = 'lost' \
                 FROM pg_replication_slots WHERE slot_name = $1",
                lsn_sql("confirmed_flush_lsn")
            ),
            &[&id],
        )
        .await
        .map_err(map_error)?;
    let Some(row) = row else {
        return Ok(None);
    };
    // The server removed WAL the slot still needed (`max_slot_wal_keep_size`):
    // the changes since its position are gone, as a purged position's are.
    if row.get::<_, Option<bool>>(2) == Some(true) {
        return Err(BackendError::PositionNotRetained(format!(
            "the replication slot of subscription \"{name}\" ({id}) lost WAL it needed (the server's \
             max_slot_wal_keep_size): the changes since its position are gone; delete the subscription and \
             watch it again with a snapshot"
        )));
    }
    match (row.get::<_, bool>(0), row.get::<_, Option<i64>>(1)) {
        (true, Some(lsn)) => Ok(Some(lsn as u64)),
        // Another database's slot, or a physical slot (no database).
        (false, _) => Err(BackendError::ChangesNotReady(format!(
            "subscription name \"{name}\" is in use by a source of another database, or by a physical \
             replication slot, on this PostgreSQL server (replication slots are named server-wide): use \
             another subscription name here"
        ))),
        // A logical slot of this database that has not started (one being made).
        (true, None) => Err(BackendError::ChangesNotReady(format!(
            "the replication slot of subscription \"{name}\" ({id}) is not ready to stream; try again"
        ))),
    }
}

/// The slot's acknowledged LSN (`existing`, when it has one), creating
/// slot and publication on first use. An existing publication is pointed
/// at the requested tables.
async fn ensure_slot(
    client: &Client,
    id: &str,
    existing: Option<u64>,
    watched: &HashMap<u32, Watched>,
) -> Result<u64, BackendError> {
    // ONLY: a table others inherit from would publish them too, and their
    // updates and deletes would then need a replica identity of their own
    // (failing the application's without one), for changes the stream drops.
    let mut tables: Vec<String> = watched.values().map(|w| format!("ONLY {}", w.qualified)).collect();
    tables.sort_unstable();
    let list = tables.join(", ");
    let publication = quote_ansi(id);
    // Without this, pgoutput names each change by the partition it landed
    // in. (Partitioned tables are published from PostgreSQL 13, which has
    // the setting: only then is it read.)
    let via_root = watched.values().any(|w| w.partitioned);
    let (option, has_option) = if via_root {
        (" WITH (publish_via_partition_root = true)", "p.pubviaroot")
    } else {
        ("", "true")
    };
    let published: Option<(Vec<u32>, bool)> = client
        .query_opt(
            &format!(
                "SELECT ARRAY(SELECT prrelid FROM pg_publication_rel WHERE prpubid = p.oid ORDER BY 1), {has_option}
                 FROM pg_publication p WHERE pubname = $1"
            ),
            &[&id],
        )
        .await
        .map_err(map_error)?
        .map(|r| (r.get(0), r.get(1)));
    match published {
        None => client
            .batch_execute(&format!("CREATE PUBLICATION {publication} FOR TABLE {list}{option}"))
            .await
            .map_err(map_error)?,
        Some((oids, has_option)) => {
            // Tables are only ever added. pgoutput publishes a change by the
            // publication as it was when the change was logged: a table taken
            // out and later put back would lose its changes in between, on a
            // resume from before them. The reader drops tables it does not watch.
            let mut missing: Vec<String> = watched
                .iter()
                .filter(|(oid, _)| !oids.contains(oid))
                .map(|(_, w)| format!("ONLY {}", w.qualified))
                .collect();
            if !missing.is_empty() {
                missing.sort_unstable();
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {publication} ADD TABLE {}",
                        missing.join(", ")
                    ))
                    .await
                    .map_err(map_error)?;
            }
            // A publication from before this setting, or from a watch without partitioned tables.
            if !has_option {
                client
                    .batch_execute(&format!(
                        "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
                    ))
                    .await
                    .map_err(map_error)?;
            }
        }
    }
    if let Some(confirmed) = existing {
        return Ok(confirmed);
    }
    let row = client
        .query_one(
            &format!(
                "SELECT {} FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                lsn_sql("lsn")
            ),
            &[&id],
        )
        .await
        .map_err(map_error)?;
    Ok(row.get::<_, i64>(0) as u64)
}

fn commit_time(micros: i64) -> Option<DateTime<Utc>> {
    pg_epoch()
        .checked_add_signed(chrono::Duration::microseconds(micros))
        .map(|t| DateTime::from_naive_utc_and_offset(t, Utc))
}

/// The transaction being read.
struct Txn {
    final_lsn: u64,
    xid: String,
    commit_time: Option<DateTime<Utc>>,
    seq: u32,
    /// Its Begin was delivered (sent lazily, before its first delivered change).
    begun: bool,
}

/// The Begin boundary of `t`, at the start of its changes (raised to a
/// resume position inside it by the service).
fn begin_of(t: &Txn) -> ChangeItem {
    ChangeItem::Begin {
        txid: t.xid.clone(),
        commit_time: t.commit_time,
        position: PgPos {
            lsn: t.final_lsn,
            seq: 0,
        }
        .encode(),
    }
}

struct Reader {
    client: Client,
    config: Target,
    spec: WatchSpec,
    watched: HashMap<u32, Watched>,
    relations: HashMap<u32, Rel>,
    types: HashMap<u32, Type>,
    /// The last position delivered (or the resume point): later items only.
    delivered: PgPos,
    /// The last change event's position sent (or the resume point).
    last_change: PgPos,
    acked: PgPos,
    out: Outbox,
}

impl Reader {
    async fn type_of(&mut self, oid: u32) -> Result<Type, BackendError> {
        if let Some(t) = Type::from_oid(oid).or_else(|| self.types.get(&oid).cloned()) {
            return Ok(t);
        }
        // A type dropped since the change was logged (a column's type
        // changed, then the old enum dropped): a column of it is read as
        // PostgreSQL's binary form (see `relation`). Refused, the stream
        // would stop at that change on every resume.
        let gone = || {
            Type::new(
                format!("type {oid}"),
                oid,
                tokio_postgres::types::Kind::Simple,
                String::new(),
            )
        };
        // Enums, domains and extension types: let the driver resolve them.
        let name: Option<String> = self
            .client
            .query_one("SELECT format_type($1, NULL)", &[&oid])
            .await
            .map_err(map_error)?
            .get(0);
        let Some(name) = name.filter(|n| n != "???") else {
            return Ok(gone());
        };
        let statement = match self.client.prepare(&format!("SELECT NULL::{name}")).await {
            Ok(statement) => statement,
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => return Ok(gone()),
            Err(e) => return Err(map_error(e)),
        };
        let ty = statement
            .columns()
            .first()
            .map(|c| c.type_().clone())
            .ok_or_else(|| BackendError::Internal(format!("type {name} has no column")))?;
        self.types.insert(oid, ty.clone());
        Ok(ty)
    }

    async fn relation(&mut self, r: Relation) -> Result<(), BackendError> {
        // A table this watch no longer names (see `change`): its columns
        // are not read, so a type Weir cannot represent there stops nothing.
        if !self.watched.contains_key(&r.id) {
            return Ok(());
        }
        let mut columns = Vec::with_capacity(r.columns.len());
        let mut types = Vec::with_capacity(r.columns.len());
        for c in &r.columns {
            let ty = self.type_of(c.type_oid).await?;
            // A column of a type Weir cannot represent, added while the
            // stream runs (the watch refused the table with one at its
            // start): its values come as PostgreSQL's binary form. Refused,
            // the stream would stop at this change on every resume, since
            // the log describes each change with the table as it was then.
            let column = column_of(&c.name, &ty, c.typmod)
                .unwrap_or_else(|_| Column::new(&c.name, ty.name(), ColumnType::Unsupported));
            columns.push(column);
            types.push(ty);
        }
        let primary_key = match self.watched.get(&r.id) {
            Some(w) if !w.primary_key.is_empty() => w.primary_key.clone(),
            _ => r.columns.iter().filter(|c| c.key).map(|c| c.name.clone()).collect(),
        };
        self.relations.insert(
            r.id,
            Rel {
                schema: r.schema,
                table: r.name,
                columns: columns.into(),
                types,
                primary_key,
            },
        );
        Ok(())
    }

    /// The current rows of every watched table as SNAPSHOT_READ, consistent
    /// with the LSN returned: transactions committing before it are in the
    /// snapshot, the rest come from the slot. Writers to the tables are
    /// held off only while the snapshot is taken, not while it is read.
    async fn snapshot(&mut self) -> Result<Result<u64, ()>, BackendError> {
        let locker = connect(&self.config).await?;
        let mut tables: Vec<(u32, String)> = self.watched.iter().map(|(o, w)| (*o, w.qualified.clone())).collect();
        tables.sort();
        let list: Vec<&str> = tables.iter().map(|(_, q)| q.as_str()).collect();
        // Queued for its lock, the snapshot would hold off every new writer
        // of the tables behind it for as long as a long transaction runs:
        // it waits a few seconds at most (55P03, ABORTED: try again).
        let lock_sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN SHARE MODE",
            SNAPSHOT_LOCK_TIMEOUT.as_millis(),
            list.join(", ")
        );
        let lock = locker.batch_execute(&lock_sql);
        tokio::select! {
            locked = lock => locked.map_err(map_error)?,
            () = self.out.closed() => return Ok(Err(())),
        }
        // The insert position, not the write position: a transaction committed
        // asynchronously (synchronous_commit = off) is visible to the snapshot
        // before its commit record is written, and would come from the slot too.
        let row = locker
            .query_one(
                &format!(
                    "SELECT {}, pg_export_snapshot()",
                    lsn_sql("pg_current_wal_insert_lsn()")
                ),
                &[],
            )
            .await
            .map_err(map_error)?;
        let (lsn, snapshot): (i64, String) = (row.get(0), row.get(1));
        self.client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                snapshot.replace('\'', "''")
            ))
            .await
            .map_err(map_error)?;
        locker.batch_execute("COMMIT").await.map_err(map_error)?;
        drop(locker);
        let position = PgPos {
            lsn: lsn as u64,
            seq: 0,
        }
        .encode();
        for (oid, qualified) in &tables {
            let Some((published, partitioned)) = self.watched.get(oid).map(|w| (w.published.clone(), w.partitioned))
            else {
                continue;
            };
            // The table's own rows, as published: not those of tables that
            // inherit from it (a partitioned table's are its partitions').
            let only = if partitioned { "" } else { "ONLY " };
            let statement = self
                .client
                .prepare(&format!("SELECT {published} FROM {only}{qualified}"))
                .await
                .map_err(map_error)?;
            let columns: Arc<[Column]> = statement
                .columns()
                .iter()
                .map(super::types::column)
                .collect::<Result<Vec<_>, _>>()?
                .into();
            let Some(w) = self.watched.get(oid) else { continue };
            let snapshot = SnapshotTable {
                schema: w.schema.clone(),
                table: w.table.clone(),
                columns: columns.clone(),
                primary_key: w.primary_key.clone(),
                position: position.clone(),
            };
            let rows = self
                .client
                .query_raw(&statement, std::iter::empty::<&(dyn ToSql + Sync)>())
                .await
                .map_err(map_error)?;
            pin_mut!(rows);
            while let Some(row) = rows.try_next().await.map_err(map_error)? {
                let mut values = Vec::with_capacity(columns.len());
                for (i, column) in columns.iter().enumerate() {
                    // A value that does not decode (a date past chrono's
                    // years) is the row's, not a lost session's.
                    let value = row
                        .try_get::<_, ChangeValue>(i)
                        .map_err(|e| BackendError::UnsupportedType {
                            column: column.name.clone(),
                            type_name: format!("{} ({e})", column.native_type),
                        })?;
                    values.push(value.0);
                }
                if self.out.send(snapshot.row(values)).await.is_err() {
                    return Ok(Err(()));
                }
            }
        }
        self.client.batch_execute("COMMIT").await.map_err(map_error)?;
        Ok(Ok(lsn as u64))
    }

    /// A tuple's values; a TOASTed value PostgreSQL did not resend comes from
    /// `fill` (a full old row) or, unknown, is NULL and named in `unchanged`.
    fn values(
        &self,
        rel: &Rel,
        tuple: &[Datum<'_>],
        fill: Option<&Row>,
        unchanged: &mut Vec<String>,
    ) -> Result<Row, BackendError> {
        let mut row = Vec::with_capacity(tuple.len());
        for (i, d) in tuple.iter().enumerate() {
            let column = || rel.columns.get(i).map(|c| c.name.clone()).unwrap_or_default();
            row.push(match d {
                Datum::Null => Value::Null,
                // A TOASTed value is never NULL: a NULL in `fill` is a column
                // a key-only old row (a key update's) left out.
                Datum::Unchanged => match fill.and_then(|r| r.get(i)).filter(|v| !matches!(v, Value::Null)) {
                    Some(known) => known.clone(),
                    None => {
                        unchanged.push(column());
                        Value::Null
                    }
                },
                Datum::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                Datum::Binary(b)
                    if rel
                        .columns
                        .get(i)
                        .is_some_and(|c| c.column_type == ColumnType::Unsupported) =>
                {
                    Value::Bytes(b.to_vec())
                }
                Datum::Binary(b) => {
                    let ty = rel
                        .types
                        .get(i)
                        .ok_or_else(|| BackendError::Internal("tuple wider than its relation".into()))?;
                    decode_change(ty, b).map_err(|e| BackendError::UnsupportedType {
                        column: column(),
                        type_name: format!("{} ({e})", ty.name()),
                    })?
                }
            });
        }
        Ok(row)
    }

    /// Reports the client's acknowledgement to the server as flushed.
    fn confirm(&mut self, repl: &mut Replication, ack: Option<Position>) -> Result<(), BackendError> {
        if let Some(p) = ack {
            self.acked = self.acked.max(PgPos::decode(&p)?);
            repl.confirm(self.acked.lsn);
        }
        Ok(())
    }

    /// A watched table whose name no longer names it (dropped and made
    /// again, or swapped by renames): its changes end at its drop or rename,
    /// and the table under its name now is not in the subscription's
    /// publication, so the stream would go on without it and without a
    /// word. With the WAL position by which that had happened.
    async fn replaced(&self) -> Result<Option<Replaced>, BackendError> {
        let (ids, names): (Vec<u32>, Vec<&str>) =
            self.watched.iter().map(|(id, w)| (*id, w.qualified.as_str())).unzip();
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT ARRAY(SELECT COALESCE(to_regclass(n)::oid, 0) FROM unnest($1::text[]) \
                     WITH ORDINALITY AS t(n, i) ORDER BY i), {}, current_setting('wal_block_size')::int8",
                    lsn_sql("pg_current_wal_insert_lsn()")
                ),
                &[&names],
            )
            .await
            .map_err(map_error)?;
        let now: Vec<u32> = row.try_get(0).map_err(map_error)?;
        let (insert, page): (i64, i64) = (row.try_get(1).map_err(map_error)?, row.try_get(2).map_err(map_error)?);
        Ok(ids.iter().zip(&now).position(|(id, now)| id != now).map(|i| Replaced {
            by: before_page_header(insert as u64, page as u64),
            table: names[i].to_string(),
            elsewhere: now[i] != 0,
            delivered: None,
        }))
    }

    /// [`Self::replaced`], unless the session does not answer within
    /// `silence`: the stream's loop serves nothing else meanwhile.
    async fn replaced_within(&self, silence: Duration) -> Result<Option<Replaced>, BackendError> {
        tokio::time::timeout(silence, self.replaced()).await.map_err(|_| {
            BackendError::Unavailable(format!(
                "the database did not answer a catalog query within {} s",
                silence.as_secs()
            ))
        })?
    }

    /// Delivers what the slot's stream brings until the client goes (`Ok`)
    /// or the database fails.
    /// `silence`: after how long without a word from the server the
    /// connection counts as lost (see `silence`).
    async fn stream(&mut self, repl: &mut Replication, acks: &mut Acks, silence: Duration) -> Result<(), BackendError> {
        let every = self.spec.heartbeat_interval;
        let mut tick = tokio::time::interval(every.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut txn: Option<Txn> = None;
        // When the reader last waited for the server and heard from it.
        let mut heard = Instant::now();
        let mut names_checked = Instant::now();
        let mut replaced: Option<Replaced> = None;
        loop {
            if replaced
                .as_ref()
                .is_some_and(|r| r.delivered.is_some_and(|d| self.acked >= d))
            {
                // Once more: a name renamed away and back between two checks
                // names its table again, and the stream goes on.
                match self.replaced_within(silence).await? {
                    // Another table replaced since: its changes up to its
                    // replacement are delivered and acknowledged first.
                    Some(now) if replaced.as_ref().is_some_and(|r| r.table != now.table) => replaced = Some(now),
                    Some(now) => return Err(now.error()),
                    None => replaced = None,
                }
            }
            let event = tokio::select! {
                // Both are ready once the stream is gone: the client's last
                // ack may not have been taken yet.
                () = self.out.closed() => return self.confirm(repl, acks.latest()),
                ack = acks.next() => {
                    let Some(p) = ack else { return self.confirm(repl, acks.latest()) };
                    self.confirm(repl, Some(p))?;
                    continue;
                }
                _ = tick.tick() => {
                    // That session holds the subscription's lock: without it,
                    // another consumer could start.
                    if self.client.is_closed() {
                        return Err(BackendError::Unavailable("the connection to the database was lost".into()));
                    }
                    // A cut network can leave both sockets open for many
                    // minutes; the server answers each `ask_position` at
                    // once, or with its next keepalive while it replays.
                    if heard.elapsed() > silence {
                        return Err(BackendError::Unavailable(format!(
                            "the database did not answer on the replication connection for {} s",
                            silence.as_secs()
                        )));
                    }
                    // Its answer, a keepalive, gives a quiet stream its heartbeat.
                    repl.ask_position();
                    continue;
                }
                event = repl.next() => event?,
            };
            let gone = match event {
                // Every transaction committed before `wal_end` has been sent.
                Event::Keepalive { wal_end } if txn.is_none() => {
                    // A replaced table's changes are all delivered once the
                    // stream is past where it was seen replaced; the stream
                    // ends when the client has acknowledged them, so that a
                    // resume (which no longer reads that table) loses none.
                    match &mut replaced {
                        Some(r) if r.delivered.is_none() && wal_end >= r.by => r.delivered = Some(self.last_change),
                        Some(_) => {}
                        None if names_checked.elapsed() >= every => {
                            names_checked = Instant::now();
                            replaced = self.replaced_within(silence).await?;
                        }
                        None => {}
                    }
                    let at = PgPos { lsn: wal_end, seq: 0 };
                    self.out
                        .heartbeat(&mut self.delivered, at, every, PgPos::encode)
                        .await
                        .is_err()
                }
                Event::Keepalive { .. } => false,
                Event::Data(data) => self.message(&mut txn, &data).await?,
            };
            if gone {
                return Ok(());
            }
            heard = Instant::now();
        }
    }

    /// Delivers what one pgoutput message brings; `true` when the client has gone.
    async fn message(&mut self, txn: &mut Option<Txn>, data: &[u8]) -> Result<bool, BackendError> {
        let message = pgoutput::parse(data).map_err(BackendError::Internal)?;
        let (rel_id, op, old, new) = match message {
            Message::Begin {
                final_lsn,
                commit_time: ts,
                xid,
            } => {
                *txn = Some(Txn {
                    final_lsn,
                    xid: xid.to_string(),
                    commit_time: commit_time(ts),
                    seq: 0,
                    begun: false,
                });
                return Ok(false);
            }
            Message::Commit { end_lsn, .. } => {
                let Some(mut t) = txn.take() else { return Ok(false) };
                let position = PgPos { lsn: end_lsn, seq: 0 };
                if position <= self.delivered {
                    return Ok(false);
                }
                // Resumed at the transaction's last change: none of it came
                // again, but its boundaries do, so that it is closed.
                if !t.begun && self.delivered.lsn == t.final_lsn && self.delivered.seq > 0 {
                    t.begun = true;
                    if self.out.send(begin_of(&t)).await.is_err() {
                        return Ok(true);
                    }
                }
                if t.begun {
                    let item = ChangeItem::Commit {
                        txid: t.xid,
                        commit_time: t.commit_time,
                        position: position.encode(),
                        events: u64::from(t.seq),
                    };
                    if self.out.send(item).await.is_err() {
                        return Ok(true);
                    }
                }
                self.delivered = position;
                return Ok(false);
            }
            Message::Relation(r) => {
                self.relation(r).await?;
                return Ok(false);
            }
            Message::Insert { relation, new } => (relation, ChangeOp::Insert, None, Some(new)),
            // A key-only old row carries NULL for every non-key column.
            Message::Update { relation, old, new, .. } => (relation, ChangeOp::Update, old, Some(new)),
            Message::Delete { relation, old, .. } => (relation, ChangeOp::Delete, Some(old), None),
            Message::Truncate { relations } => {
                for relation in relations {
                    if self.change(txn, relation, ChangeOp::Truncate, None, None).await? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
            Message::Other => return Ok(false),
        };
        self.change(txn, rel_id, op, old, new).await
    }

    /// Delivers one row change; `true` when the client has gone.
    async fn change(
        &mut self,
        txn: &mut Option<Txn>,
        relation: u32,
        op: ChangeOp,
        old: Option<Vec<Datum<'_>>>,
        new: Option<Vec<Datum<'_>>>,
    ) -> Result<bool, BackendError> {
        let Some(t) = txn.as_mut() else {
            return Ok(false);
        };
        t.seq += 1;
        let position = PgPos {
            lsn: t.final_lsn,
            seq: t.seq,
        };
        // The publication keeps every table the subscription ever watched:
        // those this watch does not name still come. Counted above all the
        // same, so positions stay what they were.
        if position <= self.delivered || !self.watched.contains_key(&relation) {
            return Ok(false);
        }
        let Some(rel) = self.relations.get(&relation) else {
            return Err(BackendError::Internal(format!(
                "change for unannounced relation {relation}"
            )));
        };
        let mut unchanged = Vec::new();
        let before = old
            .as_deref()
            .map(|o| self.values(rel, o, None, &mut unchanged))
            .transpose()?;
        let after = new
            .as_deref()
            .map(|n| self.values(rel, n, before.as_ref(), &mut unchanged))
            .transpose()?;
        let change = RowChange {
            op,
            schema: rel.schema.clone(),
            table: rel.table.clone(),
            columns: rel.columns.clone(),
            before,
            after,
            unchanged,
            primary_key: rel.primary_key.clone(),
            txid: t.xid.clone(),
            commit_time: t.commit_time,
            position: position.encode(),
        };
        if !t.begun {
            t.begun = true;
            if self.out.send(begin_of(t)).await.is_err() {
                return Ok(true);
            }
        }
        self.delivered = position;
        self.last_change = position;
        Ok(self.out.send(ChangeItem::Change(change)).await.is_err())
    }

    async fn run(mut self, mut acks: Acks) -> Result<(), BackendError> {
        if self.spec.snapshot {
            match self.snapshot().await? {
                Ok(lsn) => self.delivered = self.delivered.max(PgPos { lsn, seq: 0 }),
                Err(()) => return Ok(()),
            }
        }
        let timeout_ms: i64 = self
            .client
            .query_one(
                "SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout'",
                &[],
            )
            .await
            .map_err(map_error)?
            .try_get(0)
            .map_err(map_error)?;
        let positions = (self.delivered.lsn, self.acked.lsn);
        let every = status_interval(timeout_ms);
        let mut repl = Replication::start(&self.config, &self.spec.id, positions, every).await?;
        self.stream(&mut repl, &mut acks, silence(timeout_ms)).await
    }
}

pub(super) async fn watch(config: &Target, spec: WatchSpec) -> Result<ChangeFeed, BackendError> {
    let client = connect(config).await?;
    check_wal_level(&client, config).await?;
    let watched = resolve(&client, &spec.tables).await?;
    lock(&client, &spec.id, &spec.name, spec.take_over).await?;
    // First: a name another database's source holds makes nothing here.
    let existing = slot_confirmed(&client, &spec.id, &spec.name).await?;
    // A position of a subscription without a slot (deleted, or never
    // watched in this database): nothing was kept for it, and a slot made
    // now would keep WAL for a client that may never come back.
    if spec.resume.is_some() && existing.is_none() {
        return Err(BackendError::PositionNotRetained(format!(
            "subscription \"{}\" keeps no changes (it was deleted, or never watched here); watch without a \
             position to start it anew",
            spec.name
        )));
    }
    // Checked before the publication changes: a refused resume changes nothing.
    let resumed = match (&spec.resume, existing) {
        (Some(resume), Some(confirmed)) => {
            let pos = PgPos::decode(resume)?;
            let head = current_lsn(&client).await?;
            check_resume(&spec.name, &pos.lsn, &confirmed, &lsn_text(confirmed), Some(&head))?;
            Some(pos)
        }
        _ => None,
    };
    let confirmed = ensure_slot(&client, &spec.id, existing, &watched).await?;
    let delivered = resumed.unwrap_or(PgPos { lsn: confirmed, seq: 0 });
    let (out, end, items) = changes::feed();
    let (acks, ack_rx) = Acks::channel();
    let reader = Reader {
        client,
        config: config.clone(),
        watched,
        relations: HashMap::new(),
        types: HashMap::new(),
        delivered,
        last_change: delivered,
        acked: delivered,
        out,
        spec,
    };
    let config = config.clone();
    tokio::spawn(async move {
        let (id, name) = (reader.spec.id.clone(), reader.spec.name.clone());
        if let Err(e) = reader.run(ack_rx).await {
            // A take-over ends this session from outside: say so rather than
            // "connection closed". Only then: the reader's own session, still
            // closing after an error of its own (a lock it could not get),
            // holds the subscription's lock for a moment too.
            let e = if super::session_lost(&e) && !end.is_closed() && taken_over(&config, &id).await {
                BackendError::SubscriptionTakenOver(name)
            } else {
                e
            };
            end.fail(e).await;
        }
    });
    // The slot resumes whole transactions: nothing starts inside one. Its
    // position is a transaction's start (acknowledged inside it) or end,
    // so any change of that transaction was acknowledged or is to come.
    Ok(ChangeFeed {
        items,
        acks,
        start: None,
        acknowledged: resumed.is_none().then(|| {
            PgPos {
                lsn: delivered.lsn,
                seq: u32::MAX,
            }
            .encode()
        }),
    })
}

pub(super) async fn delete(config: &Target, id: &str, name: &str) -> Result<(), BackendError> {
    let client = connect(config).await?;
    lock(&client, id, name, false).await?;
    // A reader that just ended may hold the slot a moment longer.
    let deadline = Instant::now() + SLOT_RETRY;
    let slot = loop {
        let dropped = client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND database = current_database()",
                &[&id],
            )
            .await
            .map_err(map_error);
        match dropped {
            Err(e) if slot_held(&e, deadline) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other?,
        }
    };
    let publication = client
        .execute("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&id])
        .await
        .map_err(map_error)?;
    if slot == 0 && publication == 0 {
        return Err(BackendError::SubscriptionNotFound(name.to_string()));
    }
    client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ansi(id)))
        .await
        .map_err(map_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_position_just_past_a_page_header_is_the_pages_start() {
        assert_eq!(before_page_header(8192 * 3 + 24, 8192), 8192 * 3);
        assert_eq!(before_page_header(16 << 20 | 40, 8192), 16 << 20);
        assert_eq!(before_page_header(8192 * 3 + 41, 8192), 8192 * 3 + 41);
        assert_eq!(before_page_header(8192 * 3, 8192), 8192 * 3);
    }

    #[test]
    fn streams_that_would_be_synchronous_standbys_are_seen() {
        for setting in ["*", "FIRST 1 (*)", "ANY 2 (standby1, \"*\")", "weir", "2 (s1, Weir)"] {
            assert!(would_be_synchronous(setting, "weir"), "{setting}");
        }
        for setting in ["", "standby1", "FIRST 1 (standby1, standby2)", "ANY 1 (weirdo)"] {
            assert!(!would_be_synchronous(setting, "weir"), "{setting}");
        }
    }

    #[test]
    fn the_silence_limit_outlasts_the_servers_keepalives() {
        assert_eq!(silence(60_000), Duration::from_secs(65));
        assert_eq!(silence(10_000), SILENCE);
        assert_eq!(silence(300_000), Duration::from_secs(305));
        assert_eq!(silence(0), Duration::from_secs(600));
    }
}

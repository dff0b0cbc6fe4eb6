//! SQL Server change streams from Change Data Capture: the change tables of
//! each watched table's capture instance, read with
//! `cdc.fn_cdc_get_all_changes_<instance>` and polled with backoff.
//!
//! Positions are (commit LSN, sequence value), both `binary(10)`, whose
//! byte order is log order; a commit or heartbeat has the sequence value
//! `0xFF…`, meaning "all of this LSN". The acknowledged position is stored
//! in `weir_change_positions` in the source's database, and the
//! subscription's single consumer holds a session-owned `sp_getapplock`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8::ManageConnection;
use chrono::{DateTime, Utc};
use tiberius::ColumnData;

use super::bulk::quote;
use super::{schema, types, Manager, MssqlConn};
use crate::backend::changes::{
    self, check_resume, Acks, ChangeFeed, ChangeItem, ChangeOp, Outbox, Position, RowChange, WatchSpec,
};
use crate::backend::{BackendError, Column, ColumnGeneration, ColumnType, Row, Value};

const POSITIONS_TABLE: &str = "weir_change_positions";
/// The longest pause between polls of a quiet subscription.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a new consumer waits for the subscription's lock (milliseconds).
const LOCK_WAIT_MS: i32 = 2000;
/// The sequence value of a whole-LSN position (commit, heartbeat).
const ALL: [u8; 10] = [0xFF; 10];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct CdcPos {
    lsn: [u8; 10],
    seqval: [u8; 10],
    /// Which of the changes logged under one sequence value: an update of a
    /// key column is logged as a delete and an insert that share it.
    event: u32,
}

impl CdcPos {
    fn encode(self) -> Position {
        let mut b = self.lsn.to_vec();
        b.extend_from_slice(&self.seqval);
        b.extend_from_slice(&self.event.to_be_bytes());
        Position(b)
    }

    /// Positions of 20 bytes, from before `event`, are the first change of
    /// their sequence value: the others were never delivered under them.
    fn decode(p: &Position) -> Result<Self, BackendError> {
        let bad = || BackendError::Invalid("not a SQL Server change position".into());
        let (lsn, rest) = p.0.split_at_checked(10).ok_or_else(bad)?;
        let (seqval, event) = rest.split_at_checked(10).ok_or_else(bad)?;
        let event = match event.len() {
            0 => 0,
            _ => u32::from_be_bytes(event.try_into().map_err(|_| bad())?),
        };
        Ok(CdcPos {
            lsn: lsn.try_into().map_err(|_| bad())?,
            seqval: seqval.try_into().map_err(|_| bad())?,
            event,
        })
    }

    fn whole(lsn: [u8; 10]) -> Self {
        CdcPos {
            lsn,
            seqval: ALL,
            event: u32::MAX,
        }
    }
}

fn lsn(bytes: &[u8]) -> Result<[u8; 10], BackendError> {
    bytes
        .try_into()
        .map_err(|_| BackendError::Internal(format!("a CDC LSN of {} bytes", bytes.len())))
}

/// The change query of one capture instance: old and new images of
/// updates (operations 3 and 4), in log order.
/// The commit time is the server's local time: it goes to UTC with the
/// server's offset now (exact but across a daylight-saving change).
fn changes_sql(instance: &str, columns: &[Column]) -> String {
    let list: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
    format!(
        "SELECT __$start_lsn, __$seqval, __$operation, \
         DATEADD(minute, -DATEPART(TZOFFSET, SYSDATETIMEOFFSET()), sys.fn_cdc_map_lsn_to_time(__$start_lsn)), {} \
         FROM cdc.{}(@P1, @P2, N'all update old') ORDER BY __$start_lsn, __$seqval, __$operation",
        list.join(", "),
        quote(&format!("fn_cdc_get_all_changes_{instance}"))
    )
}

const CAPTURE_INSTANCE_SQL: &str = "SELECT TOP 1 capture_instance FROM cdc.change_tables \
     WHERE source_object_id = OBJECT_ID(@P1) ORDER BY create_date DESC";
const CDC_ENABLED_SQL: &str = "SELECT CAST(is_cdc_enabled AS int) FROM sys.databases WHERE database_id = DB_ID()";
const MAX_LSN_SQL: &str = "SELECT sys.fn_cdc_get_max_lsn()";
const MIN_LSN_SQL: &str = "SELECT sys.fn_cdc_get_min_lsn(@P1)";

/// Takes the subscription's applock and, once granted, names this session
/// its holder in the same batch, whom `take_over` ends (the stored one may
/// be an earlier consumer's, its number since reused). Answers sp_getapplock's
/// result (>= 0 when granted) and this session's id.
fn lock_sql() -> String {
    format!(
        "DECLARE @r int; EXEC @r = sp_getapplock @Resource = @P1, @LockMode = 'Exclusive', \
         @LockOwner = 'Session', @LockTimeout = @P2; \
         IF @r >= 0 UPDATE {POSITIONS_TABLE} SET holder = @@SPID WHERE subscription = @P1; \
         SELECT @r, CAST(@@SPID AS int)"
    )
}

/// Two first streams at once may both find no table: the one that loses
/// the race to create it goes on (error 2714: the name exists), as loads'
/// receipts table does.
fn positions_table_sql() -> String {
    format!(
        "BEGIN TRY IF OBJECT_ID(N'{POSITIONS_TABLE}') IS NULL CREATE TABLE {POSITIONS_TABLE} (\
         subscription nvarchar(64) NOT NULL PRIMARY KEY, position varbinary(64) NOT NULL, holder int NULL, \
         updated_at datetime2 NOT NULL DEFAULT SYSUTCDATETIME()) END TRY \
         BEGIN CATCH IF ERROR_NUMBER() <> 2714 THROW; END CATCH"
    )
}

fn store_sql() -> String {
    format!(
        "MERGE {POSITIONS_TABLE} WITH (HOLDLOCK) AS t USING (SELECT @P1 AS subscription) AS s \
         ON t.subscription = s.subscription \
         WHEN MATCHED THEN UPDATE SET position = @P2, holder = @@SPID, updated_at = SYSUTCDATETIME() \
         WHEN NOT MATCHED THEN INSERT (subscription, position, holder) VALUES (@P1, @P2, @@SPID);"
    )
}

/// One change-table row: operation 1 delete, 2 insert, 3 update (old), 4 update (new).
struct CdcRow {
    lsn: [u8; 10],
    seqval: [u8; 10],
    op: u8,
    time: Option<DateTime<Utc>>,
    table: usize,
    values: Row,
}

/// One row change: position, operation, before and after images, table index, commit time.
type Paired = (CdcPos, ChangeOp, Option<Row>, Option<Row>, usize, Option<DateTime<Utc>>);

/// The transaction being delivered: commit LSN, events so far, commit time.
type OpenTxn = Option<([u8; 10], u64, Option<DateTime<Utc>>)>;

/// Row changes from change-table rows in log order; an update's old and
/// new images (same LSN and sequence value) become one change. Changes that
/// share a sequence value (the delete and insert of a key update) are told
/// apart by their order under it.
fn pair(rows: Vec<CdcRow>) -> Vec<Paired> {
    let mut out = Vec::with_capacity(rows.len());
    let mut old: Option<CdcRow> = None;
    let mut last: Option<CdcPos> = None;
    for r in rows {
        if r.op == 3 {
            old = Some(r);
            continue;
        }
        let event = match last {
            Some(l) if l.lsn == r.lsn && l.seqval == r.seqval => l.event + 1,
            _ => 0,
        };
        let pos = CdcPos {
            lsn: r.lsn,
            seqval: r.seqval,
            event,
        };
        last = Some(pos);
        match r.op {
            1 => out.push((pos, ChangeOp::Delete, Some(r.values), None, r.table, r.time)),
            2 => out.push((pos, ChangeOp::Insert, None, Some(r.values), r.table, r.time)),
            _ => {
                let before = old
                    .take()
                    .filter(|o| o.lsn == r.lsn && o.seqval == r.seqval && o.table == r.table)
                    .map(|o| o.values);
                out.push((pos, ChangeOp::Update, before, Some(r.values), r.table, r.time));
            }
        }
    }
    out
}

/// The pause before the next poll: back to the base after changes, doubling while quiet.
fn next_pause(current: Duration, got_changes: bool, base: Duration) -> Duration {
    if got_changes {
        base
    } else {
        (current * 2).min(MAX_BACKOFF.max(base))
    }
}

struct Watched {
    instance: String,
    schema: String,
    table: String,
    columns: Arc<[Column]>,
    decoders: Vec<types::Decode>,
    primary_key: Arc<[String]>,
    sql: String,
}

async fn first_bytes(
    conn: &mut MssqlConn,
    sql: &str,
    params: Vec<ColumnData<'static>>,
) -> Result<Option<Vec<u8>>, BackendError> {
    let rows = conn.fetch(sql, params).await?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|r| r.get::<&[u8], _>(0).map(<[u8]>::to_vec)))
}

async fn max_lsn(conn: &mut MssqlConn) -> Result<[u8; 10], BackendError> {
    let bytes = first_bytes(conn, MAX_LSN_SQL, vec![]).await?.ok_or_else(|| {
        BackendError::ChangesNotReady(
            "CDC has no log position yet: is the SQL Server Agent capture job running?".into(),
        )
    })?;
    lsn(&bytes)
}

fn text(s: &str) -> ColumnData<'static> {
    ColumnData::String(Some(s.to_string().into()))
}

fn bytes(b: &[u8]) -> ColumnData<'static> {
    ColumnData::Binary(Some(b.to_vec().into()))
}

async fn resolve(conn: &mut MssqlConn, spec: &WatchSpec) -> Result<Vec<Watched>, BackendError> {
    let enabled = conn.fetch(CDC_ENABLED_SQL, vec![]).await?;
    if enabled.first().and_then(|r| r.get::<i32, _>(0)) != Some(1) {
        return Err(BackendError::ChangesNotReady(
            "Change Data Capture is off for this database; run EXEC sys.sp_cdc_enable_db (and keep the SQL Server \
             Agent running)"
                .into(),
        ));
    }
    let mut out = Vec::new();
    for t in &spec.tables {
        let d = schema::describe_table(conn, t.schema.as_deref(), &t.table).await?;
        let qualified = format!("{}.{}", quote(&d.table.schema), quote(&d.table.name));
        let rows = conn.fetch(CAPTURE_INSTANCE_SQL, vec![text(&qualified)]).await?;
        let Some(instance) = rows.first().and_then(|r| r.get::<&str, _>(0)).map(str::to_string) else {
            return Err(BackendError::ChangesNotReady(format!(
                "table {qualified} has no CDC capture instance; run EXEC sys.sp_cdc_enable_table \
                 @source_schema = N'{}', @source_name = N'{}', @role_name = NULL",
                d.table.schema.replace('\'', "''"),
                d.table.name.replace('\'', "''")
            )));
        };
        let missing = schema::uncaptured(conn, &instance, &d.columns).await?;
        if !missing.is_empty() {
            return Err(BackendError::ChangesNotReady(format!(
                "table {qualified}: {}",
                schema::uncaptured_reason(&instance, &missing)
            )));
        }
        // CDC stores computed columns as NULL: left out, as PostgreSQL
        // leaves out generated ones.
        let columns: Vec<Column> = d
            .columns
            .into_iter()
            .filter(|c| c.generation != ColumnGeneration::Computed)
            .map(|c| c.column)
            .collect();
        let decoders = columns
            .iter()
            .map(|c| {
                // tiberius hands money over as a double; no other type of a
                // DECIMAL column comes as one (an alias type of money shows
                // its own name, not "money").
                if c.column_type == ColumnType::Decimal {
                    types::Decode::Money
                } else {
                    types::Decode::Plain
                }
            })
            .collect();
        out.push(Watched {
            sql: changes_sql(&instance, &columns),
            instance,
            schema: d.table.schema,
            table: d.table.name,
            columns: columns.into(),
            decoders,
            primary_key: d.primary_key.map(|p| p.columns).unwrap_or_default().into(),
        });
    }
    Ok(out)
}

/// Takes the subscription's applock within `wait_ms`: this session's id when granted.
async fn try_lock(conn: &mut MssqlConn, id: &str, wait_ms: i32) -> Result<Option<i32>, BackendError> {
    let rows = conn
        .fetch(&lock_sql(), vec![text(id), ColumnData::I32(Some(wait_ms))])
        .await?;
    let row = rows.first();
    let granted = row.and_then(|r| r.get::<i32, _>(0)).is_some_and(|r| r >= 0);
    Ok(row.and_then(|r| r.get::<i32, _>(1)).filter(|_| granted))
}

/// Takes the subscription's lock; returns this session's id.
async fn lock(conn: &mut MssqlConn, id: &str, name: &str, take_over: bool) -> Result<i32, BackendError> {
    if let Some(own) = try_lock(conn, id, if take_over { 0 } else { LOCK_WAIT_MS }).await? {
        return Ok(own);
    }
    if take_over {
        let rows = conn
            .fetch(
                &format!("SELECT holder FROM {POSITIONS_TABLE} WHERE subscription = @P1"),
                vec![text(id)],
            )
            .await?;
        if let Some(holder) = rows.first().and_then(|r| r.get::<i32, _>(0)) {
            // A number from our own table, never caller input; gone already is fine.
            let _ = conn.batch(&format!("KILL {holder}")).await;
        }
        if let Some(own) = try_lock(conn, id, 5000).await? {
            return Ok(own);
        }
    }
    Err(BackendError::SubscriptionActive(name.to_string()))
}

/// Whether the subscription has a holder other than session `own` (which
/// a take-over KILLed), asked for up to a second while the new consumer
/// takes the lock and names itself.
async fn taken_over(manager: &Manager, id: &str, own: i32) -> bool {
    let Ok(mut conn) = manager.connect().await else {
        return false;
    };
    let sql = format!("SELECT holder FROM {POSITIONS_TABLE} WHERE subscription = @P1");
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match conn.fetch(&sql, vec![text(id)]).await {
            Ok(rows) if rows.first().and_then(|r| r.get::<i32, _>(0)).is_some_and(|h| h != own) => return true,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return false,
        }
    }
    false
}

struct Reader {
    spec: WatchSpec,
    conn: MssqlConn,
    watched: Vec<Watched>,
    out: Outbox,
    delivered: CdcPos,
    acked: CdcPos,
    stored: CdcPos,
}

impl Reader {
    async fn store(&mut self) -> Result<(), BackendError> {
        if self.acked > self.stored {
            let p = self.acked.encode();
            self.conn
                .fetch(&store_sql(), vec![text(&self.spec.id), bytes(&p.0)])
                .await?;
            self.stored = self.acked;
        }
        Ok(())
    }

    async fn read(&mut self, from: [u8; 10], to: [u8; 10]) -> Result<Vec<CdcRow>, BackendError> {
        let mut all = Vec::new();
        for (table, w) in self.watched.iter().enumerate() {
            // Changes CDC cleanup removed are gone: reading starts at what is left.
            let min = first_bytes(&mut self.conn, MIN_LSN_SQL, vec![text(&w.instance)]).await?;
            let min = min.map(|m| lsn(&m)).transpose()?.unwrap_or([0; 10]);
            let start = from.max(min);
            if start > to {
                continue;
            }
            let rows = self.conn.fetch(&w.sql, vec![bytes(&start), bytes(&to)]).await?;
            for row in rows {
                let mut cells = row.into_iter();
                let (Some(ColumnData::Binary(Some(l))), Some(ColumnData::Binary(Some(s))), Some(op), Some(time)) =
                    (cells.next(), cells.next(), cells.next(), cells.next())
                else {
                    return Err(BackendError::Internal("unexpected CDC row shape".into()));
                };
                let op = match op {
                    ColumnData::I32(Some(o)) => o as u8,
                    other => return Err(BackendError::Internal(format!("CDC operation {other:?}"))),
                };
                let time = match types::decode(time, types::Decode::Plain) {
                    Ok(Value::Timestamp(t)) => Some(DateTime::from_naive_utc_and_offset(t, Utc)),
                    _ => None,
                };
                let mut values = Vec::with_capacity(w.columns.len());
                for (i, data) in cells.enumerate() {
                    let decode = w.decoders.get(i).copied().unwrap_or(types::Decode::Plain);
                    values.push(types::decode(data, decode).map_err(|m| {
                        BackendError::Invalid(format!(
                            "column \"{}\": {m}",
                            w.columns.get(i).map_or("?", |c| c.name.as_str())
                        ))
                    })?);
                }
                all.push(CdcRow {
                    lsn: lsn(&l)?,
                    seqval: lsn(&s)?,
                    op,
                    time,
                    table,
                    values,
                });
            }
        }
        all.sort_by_key(|a| (a.lsn, a.seqval, a.op));
        Ok(all)
    }

    /// Delivers the changes after `delivered`, a transaction (one LSN) at a time.
    async fn deliver(&mut self, rows: Vec<CdcRow>) -> Result<Result<bool, ()>, BackendError> {
        let mut any = false;
        let mut current: OpenTxn = None;
        for (pos, op, before, after, table, time) in pair(rows) {
            if pos <= self.delivered {
                continue;
            }
            if current.is_some_and(|(l, _, _)| l != pos.lsn) && self.commit(&mut current).await.is_err() {
                return Ok(Err(()));
            }
            let txid = hex::encode(pos.lsn);
            if current.is_none() {
                current = Some((pos.lsn, 0, time));
                let begin = ChangeItem::Begin {
                    txid: txid.clone(),
                    commit_time: time,
                    position: CdcPos {
                        lsn: pos.lsn,
                        seqval: [0; 10],
                        event: 0,
                    }
                    .encode(),
                };
                if self.out.send(begin).await.is_err() {
                    return Ok(Err(()));
                }
            }
            if let Some(c) = current.as_mut() {
                c.1 += 1;
            }
            let Some(w) = self.watched.get(table) else {
                return Err(BackendError::Internal("a change of an unknown table".into()));
            };
            let change = RowChange {
                op,
                schema: w.schema.clone(),
                table: w.table.clone(),
                columns: w.columns.clone(),
                before,
                after,
                unchanged: Vec::new(),
                primary_key: w.primary_key.clone(),
                txid,
                commit_time: time,
                position: pos.encode(),
            };
            self.delivered = pos;
            any = true;
            if self.out.send(ChangeItem::Change(change)).await.is_err() {
                return Ok(Err(()));
            }
        }
        if self.commit(&mut current).await.is_err() {
            return Ok(Err(()));
        }
        Ok(Ok(any))
    }

    async fn commit(&mut self, current: &mut OpenTxn) -> Result<(), ()> {
        let Some((l, events, time)) = current.take() else {
            return Ok(());
        };
        let position = CdcPos::whole(l);
        self.delivered = position;
        self.out
            .send(ChangeItem::Commit {
                txid: hex::encode(l),
                commit_time: time,
                position: position.encode(),
                events,
            })
            .await
    }

    /// Takes in the acknowledgements that arrived and stores the furthest.
    async fn take_acks(&mut self, acks: &mut Acks) -> Result<(), BackendError> {
        if let Some(p) = acks.latest() {
            self.acked = self.acked.max(CdcPos::decode(&p)?);
        }
        self.store().await
    }

    async fn run(mut self, mut acks: Acks) -> Result<(), BackendError> {
        let read = self.read_on(&mut acks).await;
        // Whatever ended the reading (the client gone, or a failed read on
        // a session that still answers, such as a capture instance dropped),
        // what the client acknowledged last is kept for its return.
        let stored = self.take_acks(&mut acks).await;
        read.and(stored)
    }

    async fn read_on(&mut self, acks: &mut Acks) -> Result<(), BackendError> {
        let mut pause = self.spec.poll_interval;
        loop {
            self.take_acks(acks).await?;
            let to = max_lsn(&mut self.conn).await?;
            let rows = self.read(self.delivered.lsn, to).await?;
            let Ok(any) = self.deliver(rows).await? else {
                break;
            };
            let every = self.spec.heartbeat_interval;
            let beat = self
                .out
                .heartbeat(&mut self.delivered, CdcPos::whole(to), every, CdcPos::encode);
            if beat.await.is_err() {
                break;
            }
            pause = next_pause(pause, any, self.spec.poll_interval);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.out.closed() => break,
            }
        }
        Ok(())
    }
}

pub(super) async fn watch(manager: &Manager, spec: WatchSpec) -> Result<ChangeFeed, BackendError> {
    // Refused before a new subscription's position is stored: a later watch
    // would start from this refused call's time.
    if spec.snapshot {
        return Err(BackendError::ChangesNotReady(
            "snapshots are not available on SQL Server sources; read the table with ExecuteStream, then \
             watch from the position of the first heartbeat"
                .into(),
        ));
    }
    let mut conn = manager.connect().await.map_err(super::connect_error)?;
    let watched = resolve(&mut conn, &spec).await?;
    conn.batch(&positions_table_sql()).await?;
    let own = lock(&mut conn, &spec.id, &spec.name, spec.take_over).await?;
    let stored_bytes = first_bytes(
        &mut conn,
        &format!("SELECT position FROM {POSITIONS_TABLE} WHERE subscription = @P1"),
        vec![text(&spec.id)],
    )
    .await?;
    let stored = match stored_bytes {
        Some(b) => CdcPos::decode(&Position(b))?,
        None => {
            let now = CdcPos::whole(max_lsn(&mut conn).await?);
            conn.fetch(&store_sql(), vec![text(&spec.id), bytes(&now.encode().0)])
                .await?;
            now
        }
    };
    let start = match &spec.resume {
        Some(p) => {
            let p = CdcPos::decode(p)?;
            // A position past the log's end is another database's.
            let head = CdcPos::whole(max_lsn(&mut conn).await?);
            check_resume(&spec.name, &p, &stored, &hex::encode(stored.lsn), Some(&head))?;
            p
        }
        None => stored,
    };
    let from_stored = spec.resume.is_none().then(|| stored.encode());
    let (out, end, items) = changes::feed();
    let (acks, ack_rx) = Acks::channel();
    let reader = Reader {
        spec,
        conn,
        watched,
        out,
        delivered: start,
        acked: start,
        stored,
    };
    let (manager, id, name) = (manager.clone(), reader.spec.id.clone(), reader.spec.name.clone());
    tokio::spawn(async move {
        // tiberius panics on a value it cannot read (sql_variant, CLR types).
        let ran = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(reader.run(ack_rx)))
            .await
            .unwrap_or_else(|_| Err(super::driver_panic()));
        if let Err(e) = ran {
            // A take-over KILLs this session from outside: say so rather than "connection lost".
            let e = if !end.is_closed() && taken_over(&manager, &id, own).await {
                BackendError::SubscriptionTakenOver(name)
            } else {
                e
            };
            end.fail(e).await;
        }
    });
    Ok(ChangeFeed {
        items,
        acks,
        acknowledged: from_stored.clone(),
        start: from_stored,
    })
}

pub(super) async fn delete(manager: &Manager, id: &str, name: &str) -> Result<(), BackendError> {
    let mut conn = manager.connect().await.map_err(super::connect_error)?;
    conn.batch(&positions_table_sql()).await?;
    lock(&mut conn, id, name, false).await?;
    let rows = conn
        .fetch(
            &format!("DELETE FROM {POSITIONS_TABLE} OUTPUT deleted.subscription WHERE subscription = @P1"),
            vec![text(id)],
        )
        .await?;
    if rows.is_empty() {
        return Err(BackendError::SubscriptionNotFound(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ColumnType;

    fn row(lsn: u8, seq: u8, op: u8, v: i64) -> CdcRow {
        let mut l = [0u8; 10];
        l[9] = lsn;
        let mut s = [0u8; 10];
        s[9] = seq;
        CdcRow {
            lsn: l,
            seqval: s,
            op,
            time: None,
            table: 0,
            values: vec![Value::Int(v)],
        }
    }

    #[test]
    fn the_change_query_reads_old_and_new_images_in_log_order() {
        let columns = [
            Column::new("id", "int", ColumnType::Int),
            Column::new("odd]name", "nvarchar", ColumnType::String),
        ];
        let sql = changes_sql("dbo_orders", &columns);
        assert_eq!(
            sql,
            "SELECT __$start_lsn, __$seqval, __$operation, \
             DATEADD(minute, -DATEPART(TZOFFSET, SYSDATETIMEOFFSET()), sys.fn_cdc_map_lsn_to_time(__$start_lsn)), \
             [id], [odd]]name] \
             FROM cdc.[fn_cdc_get_all_changes_dbo_orders](@P1, @P2, N'all update old') \
             ORDER BY __$start_lsn, __$seqval, __$operation"
        );
    }

    /// An update of a key column is logged as a delete and an insert under
    /// one sequence value: both are delivered, each at a position of its own.
    #[test]
    fn a_key_update_logged_as_delete_and_insert_keeps_both_changes() {
        let rows = vec![row(1, 1, 1, 10), row(1, 1, 2, 100), row(1, 2, 2, 7)];
        let changes: Vec<_> = pair(rows)
            .into_iter()
            .map(|(p, op, _, _, _, _)| (p.seqval[9], p.event, op))
            .collect();
        assert_eq!(
            changes,
            [
                (1, 0, ChangeOp::Delete),
                (1, 1, ChangeOp::Insert),
                (2, 0, ChangeOp::Insert)
            ]
        );
    }

    #[test]
    fn update_images_pair_and_other_operations_stand_alone() {
        let rows = vec![row(1, 1, 2, 10), row(1, 2, 3, 10), row(1, 2, 4, 11), row(2, 1, 1, 11)];
        let changes: Vec<_> = pair(rows)
            .into_iter()
            .map(|(p, op, before, after, _, _)| (p.lsn[9], p.seqval[9], op, before, after))
            .collect();
        assert_eq!(
            changes,
            [
                (1, 1, ChangeOp::Insert, None, Some(vec![Value::Int(10)])),
                (
                    1,
                    2,
                    ChangeOp::Update,
                    Some(vec![Value::Int(10)]),
                    Some(vec![Value::Int(11)])
                ),
                (2, 1, ChangeOp::Delete, Some(vec![Value::Int(11)]), None),
            ]
        );
    }

    #[test]
    fn positions_order_by_lsn_then_sequence_and_whole_lsns_last() {
        let a = CdcPos {
            lsn: [0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
            seqval: [0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            event: 0,
        };
        let b = CdcPos { event: 1, ..a };
        let whole = CdcPos::whole(a.lsn);
        let next = CdcPos {
            lsn: [0, 0, 0, 0, 0, 0, 0, 0, 0, 6],
            seqval: [0; 10],
            event: 0,
        };
        assert!(a < b && b < whole && whole < next);
        assert!(a.encode() < b.encode() && b.encode() < whole.encode() && whole.encode() < next.encode());
        assert_eq!(CdcPos::decode(&whole.encode()).ok(), Some(whole));
        // A position from before `event` is its sequence value's first change.
        assert_eq!(CdcPos::decode(&Position(a.encode().0[..20].to_vec())).ok(), Some(a));
        assert!(CdcPos::decode(&Position(vec![1; 12])).is_err());
        assert!(lsn(&[0; 9]).is_err());
    }

    #[test]
    fn polling_backs_off_while_quiet_and_resets_on_changes() {
        let base = Duration::from_millis(50);
        let mut pause = base;
        for _ in 0..10 {
            pause = next_pause(pause, false, base);
        }
        assert_eq!(pause, MAX_BACKOFF);
        assert_eq!(next_pause(pause, true, base), base);
        assert_eq!(next_pause(base, false, base), Duration::from_millis(100));
    }

    #[test]
    fn state_sql_is_one_statement_each() {
        assert!(
            positions_table_sql().starts_with("BEGIN TRY IF OBJECT_ID(N'weir_change_positions') IS NULL CREATE TABLE")
        );
        assert!(positions_table_sql().ends_with("END TRY BEGIN CATCH IF ERROR_NUMBER() <> 2714 THROW; END CATCH"));
        assert!(store_sql().starts_with("MERGE weir_change_positions WITH (HOLDLOCK)"));
        let lock = lock_sql();
        assert!(lock.contains("@LockOwner = 'Session'"));
        assert!(lock.contains(
            "IF @r >= 0 UPDATE weir_change_positions SET holder = @@SPID WHERE subscription = @P1; \
             SELECT @r, CAST(@@SPID AS int)"
        ));
    }
}

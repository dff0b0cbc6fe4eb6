//! Change streams (`WatchChanges`) through the real gRPC server against real
//! engines: PostgreSQL with wal_level = logical and MariaDB with a ROW
//! binlog, both set up by ./scripts/test, and SQL Server with CDC when
//! WEIR_TEST_MSSQL_URL names one (ignored by name otherwise). Writes go
//! through the gateway's own QueryService; the events must match them exactly.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::watch_changes_response::Message;
use weir_client::{ChangeWatch, WeirClient};

/// How long a test waits for an event that must come.
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Postgres,
    Mysql,
    /// Live only with WEIR_TEST_MSSQL_URL (a database with CDC enabled and the SQL Server Agent running).
    Mssql,
}

impl Engine {
    fn source(self, tenant_id: &str) -> String {
        match self {
            Engine::Postgres => postgres(tenant_id, "db", ""),
            Engine::Mysql => mysql(tenant_id, "db", ""),
            Engine::Mssql => mssql_live(tenant_id, "db", ""),
        }
    }

    fn text_type(self) -> &'static str {
        match self {
            Engine::Mysql => "VARCHAR(200)",
            Engine::Mssql => "NVARCHAR(200)",
            Engine::Postgres => "TEXT",
        }
    }
}

struct Ctx {
    engine: Engine,
    server: TestServer,
    client: WeirClient,
    /// Unique per test run: tables and subscriptions never collide.
    tag: String,
}

const CONFIG: &str = "[changes]\npoll_interval = \"20ms\"\nheartbeat_interval = \"300ms\"\n";

impl Ctx {
    async fn new(engine: Engine) -> Ctx {
        Ctx::with_changes(engine, CONFIG).await
    }

    /// With `changes` as the server's `[changes]` section.
    async fn with_changes(engine: Engine, changes: &str) -> Ctx {
        Ctx::with_source(engine, changes, &engine.source("cs")).await
    }

    /// With `source` as the tested tenant's source `db`.
    async fn with_source(engine: Engine, changes: &str, source: &str) -> Ctx {
        Ctx::with_limits(engine, changes, source, "max_concurrent_subscriptions = 2").await
    }

    /// With a second source `db2` of the tenant, on database `other` of the
    /// same server.
    async fn with_second_database(engine: Engine, other: &str) -> Ctx {
        let (second, database) = match engine {
            Engine::Postgres => (postgres("cs", "db2", ""), "WEIR_TEST_PG_DATABASE"),
            Engine::Mysql => (mysql("cs", "db2", ""), "WEIR_TEST_MYSQL_DATABASE"),
            Engine::Mssql => panic!("the tests have one SQL Server database"),
        };
        let second = second.replace(
            &format!("database = \"{}\"", env_or(database, "test")),
            &format!("database = \"{other}\""),
        );
        Ctx::with_source(engine, CONFIG, &format!("{}{}", engine.source("cs"), second)).await
    }

    /// With `limits` as the tested tenant's limits.
    async fn with_limits(engine: Engine, changes: &str, source: &str, limits: &str) -> Ctx {
        let config = format!(
            "{changes}{}{}{}",
            tenant("cs", limits, source),
            tenant("other", "", &engine.source("other")),
            sqlite_demo("cs", "lite")
        );
        let server = TestServer::start(&config).await;
        let client = server.client("key-cs").await;
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        Ctx {
            engine,
            server,
            client,
            tag,
        }
    }

    fn name(&self, base: &str) -> String {
        format!("{base}_{}", self.tag)
    }

    async fn sql(&self, sql: &str) {
        self.client
            .execute("db", sql, vec![])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// A keyed table `name(id INT PRIMARY KEY, v TEXT, n DECIMAL)`.
    async fn table(&self, base: &str) -> String {
        let name = self.name(base);
        self.sql(&format!(
            "CREATE TABLE {name} (id INT PRIMARY KEY, v {}, n DECIMAL(10,2))",
            self.engine.text_type()
        ))
        .await;
        if self.engine == Engine::Mssql {
            self.sql(&format!(
                "EXEC sys.sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'{name}', @role_name = NULL"
            ))
            .await;
        }
        name
    }

    fn start(&self, tables: &[&str], subscription: &str) -> pb::WatchStart {
        pb::WatchStart {
            source: "db".into(),
            tables: tables
                .iter()
                .map(|t| pb::TableRef {
                    schema: String::new(),
                    table: (*t).into(),
                })
                .collect(),
            subscription: subscription.into(),
            ..Default::default()
        }
    }

    async fn watch(&self, start: pb::WatchStart) -> ChangeWatch {
        self.client.watch(start).await.expect("WatchChanges starts")
    }

    /// The error a watch of `table` is refused with, which must be
    /// FAILED_PRECONDITION, CHANGE_STREAMS_NOT_READY.
    async fn refused_as_not_ready(&self, table: &str, subscription: &str) -> tonic::Status {
        let e = self
            .client
            .watch(self.start(&[table], subscription))
            .await
            .err()
            .expect("refused");
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::FailedPrecondition, "CHANGE_STREAMS_NOT_READY"),
            "{e:?}"
        );
        e
    }

    async fn delete(&self, subscription: &str) -> Result<(), tonic::Status> {
        self.delete_from("db", subscription).await
    }

    async fn delete_from(&self, source: &str, subscription: &str) -> Result<(), tonic::Status> {
        self.client
            .stream()
            .delete_subscription(pb::DeleteSubscriptionRequest {
                source: source.into(),
                subscription: subscription.into(),
            })
            .await
            .map(|_| ())
    }

    /// Deletes subscription `s`, retrying while the server still ends its
    /// dropped stream (within `WAIT`); one already gone counts as deleted.
    async fn delete_once_released(&self, s: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.delete(s).await {
                Ok(()) => return,
                Err(e) if e.code() == Code::NotFound => return,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("subscription {s} was never released: {e:?}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Deletes the subscriptions so no slot keeps retaining WAL, then the tables.
    async fn finish(self, subscriptions: &[&str], tables: &[&str]) {
        for s in subscriptions {
            self.delete_once_released(s).await;
        }
        for t in tables {
            self.sql(&format!("DROP TABLE {t}")).await;
        }
        self.server.stop().await;
    }
}

/// Reads responses until `n` change events arrived; returns every response.
async fn read_changes(watch: &mut ChangeWatch, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    let mut changes = 0;
    while changes < n {
        let message = next_message(watch).await;
        changes += usize::from(matches!(message, Message::Change(_)));
        out.push(message);
    }
    out
}

/// The next response's message, which must come within `WAIT`.
async fn next_message(watch: &mut ChangeWatch) -> Message {
    tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("a response within the wait")
        .expect("the stream stays healthy")
        .expect("the stream stays open")
        .message
        .expect("a response carries a message")
}

/// The error that ends the stream, which must come within `WAIT`; events before it are skipped.
async fn stream_error(watch: &mut ChangeWatch) -> tonic::Status {
    stream_error_within(watch, WAIT).await
}

async fn stream_error_within(watch: &mut ChangeWatch, wait: Duration) -> tonic::Status {
    tokio::time::timeout(wait, async {
        loop {
            match watch.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the stream ends with an error")
}

/// The position of the next transaction's Commit boundary.
async fn next_commit(watch: &mut ChangeWatch) -> Vec<u8> {
    loop {
        if let Message::Transaction(b) = next_message(watch).await {
            if !b.begin {
                return b.position;
            }
        }
    }
}

fn changes(messages: &[Message]) -> Vec<&pb::ChangeEvent> {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::Change(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn op(c: &pb::ChangeEvent) -> pb::ChangeOperation {
    pb::ChangeOperation::try_from(c.op).expect("a known operation")
}

/// The value of column `name` in a row of event `c`.
fn col<'a>(c: &'a pb::ChangeEvent, row: &'a pb::Row, name: &str) -> &'a pb::Value {
    let i = c
        .columns
        .iter()
        .position(|col| col.name == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    &row.values[i]
}

fn id_of(c: &pb::ChangeEvent) -> i64 {
    let row = c.after.as_ref().or(c.before.as_ref()).expect("a row");
    int(col(c, row, "id"))
}

fn decimal(v: &pb::Value) -> &str {
    match &v.kind {
        Some(pb::value::Kind::DecimalValue(d)) => d,
        other => panic!("expected a decimal, got {other:?}"),
    }
}

async fn inserts_updates_deletes_and_transactions_arrive_in_commit_order(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("orders").await;
    let sub = ctx.name("order-feed");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;

    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1.50)")).await;
    let tx = ctx
        .client
        .begin("db", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    for sql in [
        format!("INSERT INTO {t} VALUES (2, 'two', NULL)"),
        format!("INSERT INTO {t} VALUES (3, 'three', 3)"),
        format!("UPDATE {t} SET v = 'uno', n = 1.25 WHERE id = 1"),
    ] {
        ctx.client
            .execute_in(&tx, "db", &sql, vec![])
            .await
            .expect("statement in transaction");
    }
    ctx.client.commit(&tx).await.expect("commit");
    ctx.sql(&format!("DELETE FROM {t} WHERE id = 2")).await;

    let messages = read_changes(&mut watch, 5).await;
    let events = changes(&messages);
    let ops: Vec<_> = events.iter().map(|c| (op(c), id_of(c))).collect();
    use pb::ChangeOperation as O;
    assert_eq!(
        ops,
        [
            (O::Insert, 1),
            (O::Insert, 2),
            (O::Insert, 3),
            (O::Update, 1),
            (O::Delete, 2)
        ]
    );
    for c in &events {
        assert_eq!(c.table, t);
        assert_eq!(c.primary_key, ["id"]);
        assert!(c.commit_time.is_some(), "commit time on {c:?}");
        assert!(!c.transaction_id.is_empty());
    }
    let first = events[0].after.as_ref().expect("insert has an after row");
    assert_eq!(text(col(events[0], first, "v")), "one");
    assert_eq!(decimal(col(events[0], first, "n")), "1.50");
    assert!(is_null(col(events[1], events[1].after.as_ref().expect("after"), "n")));
    let update = events[3].after.as_ref().expect("update has an after row");
    assert_eq!(text(col(events[3], update, "v")), "uno");
    assert_eq!(decimal(col(events[3], update, "n")), "1.25");
    let deleted = events[4].before.as_ref().expect("delete has a before row");
    assert_eq!(int(col(events[4], deleted, "id")), 2);
    assert!(events[4].after.is_none());

    // The three statements of the transaction come between one begin and one commit.
    let txids: Vec<_> = events.iter().map(|c| c.transaction_id.clone()).collect();
    assert!(txids[1] == txids[2] && txids[2] == txids[3]);
    assert!(txids[0] != txids[1] && txids[3] != txids[4]);
    let boundaries: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Transaction(b) if b.transaction_id == txids[1] => Some((b.begin, b.event_count)),
            _ => None,
        })
        .collect();
    assert_eq!(boundaries, [(true, 0), (false, 3)], "{messages:?}");
    // Positions only ever grow.
    let positions: Vec<_> = events.iter().map(|c| c.position.clone()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions grow");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A subscription watched again with fewer tables streams only those,
/// also for the changes it had not acknowledged before.
async fn a_table_taken_out_of_a_subscription_is_not_streamed_again(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let (kept, dropped) = (ctx.table("kept").await, ctx.table("dropped").await);
    let sub = ctx.name("narrowed");
    let mut watch = ctx.watch(ctx.start(&[&kept, &dropped], &sub)).await;
    for id in [1, 2] {
        ctx.sql(&format!("INSERT INTO {kept} VALUES ({id}, 'k', 1)")).await;
        ctx.sql(&format!("INSERT INTO {dropped} VALUES ({id}, 'd', 1)")).await;
    }
    assert_eq!(changes(&read_changes(&mut watch, 4).await).len(), 4);
    drop(watch);
    // Nothing acknowledged: the same changes come again, of `kept` only.
    let mut narrowed = ctx.watch(ctx.start(&[&kept], &sub)).await;
    ctx.sql(&format!("INSERT INTO {dropped} VALUES (3, 'd', 1)")).await;
    ctx.sql(&format!("INSERT INTO {kept} VALUES (3, 'k', 1)")).await;
    let messages = read_changes(&mut narrowed, 3).await;
    let got: Vec<_> = changes(&messages).iter().map(|c| (c.table.clone(), id_of(c))).collect();
    assert_eq!(got, [(kept.clone(), 1), (kept.clone(), 2), (kept.clone(), 3)]);
    drop(narrowed);
    ctx.finish(&[&sub], &[&kept, &dropped]).await;
}

/// A table taken out of a subscription and later put back: a resume from
/// before its changes in between still gets them.
async fn a_table_taken_out_and_put_back_misses_none_of_its_changes(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let (kept, back) = (ctx.table("keptback").await, ctx.table("back").await);
    let sub = ctx.name("putback");
    let mut watch = ctx.watch(ctx.start(&[&kept, &back], &sub)).await;
    ctx.sql(&format!("INSERT INTO {kept} VALUES (1, 'k', 1)")).await;
    read_changes(&mut watch, 1).await;
    let acked = next_commit(&mut watch).await;
    watch.ack(acked.clone()).await.expect("ack");
    watch.finish().await.expect("the acknowledgement reaches the server");
    // A consumer of an older version watches without `back` for a moment.
    drop(ctx.watch(ctx.start(&[&kept], &sub)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    ctx.sql(&format!("INSERT INTO {back} VALUES (1, 'b', 1)")).await;
    ctx.sql(&format!("INSERT INTO {kept} VALUES (2, 'k', 1)")).await;
    let mut start = ctx.start(&[&kept, &back], &sub);
    start.resume_position = acked;
    let mut resumed = ctx.watch(start).await;
    let messages = read_changes(&mut resumed, 2).await;
    let got: Vec<_> = changes(&messages).iter().map(|c| (c.table.clone(), id_of(c))).collect();
    assert_eq!(got, [(back.clone(), 1), (kept.clone(), 2)]);
    drop(resumed);
    ctx.finish(&[&sub], &[&kept, &back]).await;
}

async fn a_consumer_resumed_from_its_last_ack_gets_every_later_change_once(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("resumed").await;
    let sub = ctx.name("resume");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    for i in 1..=10 {
        ctx.sql(&format!("INSERT INTO {t} VALUES ({i}, 'v{i}', {i})")).await;
    }
    let first = read_changes(&mut watch, 5).await;
    let fifth = changes(&first)[4].clone();
    assert_eq!(id_of(&fifth), 5);
    watch.ack(fifth.position.clone()).await.expect("ack");
    watch.finish().await.expect("the acknowledgement reaches the server");
    // A client that acknowledges its last change again as it reconnects
    // without a position, before anything comes (on PostgreSQL the slot
    // went back to that change's transaction's start).
    let mut reconnected = ctx.watch(ctx.start(&[&t], &sub)).await;
    reconnected.ack(fifth.position.clone()).await.expect("ack again");
    reconnected.finish().await.expect("the acknowledgement again is taken");

    for i in 11..=15 {
        ctx.sql(&format!("INSERT INTO {t} VALUES ({i}, 'v{i}', {i})")).await;
    }
    let mut start = ctx.start(&[&t], &sub);
    start.resume_position = fifth.position.clone();
    let mut resumed = ctx.watch(start).await;
    let rest = read_changes(&mut resumed, 10).await;
    let ids: Vec<_> = changes(&rest).iter().map(|c| id_of(c)).collect();
    assert_eq!(ids, (6..=15).collect::<Vec<_>>());

    // Acknowledge the last commit: a resume without a position starts after it.
    let last_txid = changes(&rest)[9].transaction_id.clone();
    let last_commit = loop {
        if let Message::Transaction(b) = next_message(&mut resumed).await {
            if !b.begin && b.transaction_id == last_txid {
                break b.position;
            }
        }
    };
    resumed.ack(last_commit.clone()).await.expect("ack");
    resumed.finish().await.expect("the acknowledgement reaches the server");
    let mut again = ctx.watch(ctx.start(&[&t], &sub)).await;
    // A client that acknowledges its last position again as it reconnects,
    // before anything comes: what the subscription stored counts as delivered.
    again.ack(last_commit).await.expect("ack again");
    ctx.sql(&format!("INSERT INTO {t} VALUES (16, 'v16', 16)")).await;
    let next = read_changes(&mut again, 1).await;
    assert_eq!(
        id_of(changes(&next)[0]),
        16,
        "nothing before the acknowledged commit comes again"
    );
    drop(again);
    ctx.finish(&[&sub], &[&t]).await;
}

/// Resumed from a change inside a transaction, the stream starts with that
/// transaction's Begin, at the resume position and not before it: every
/// position sent can be acknowledged and resumed from.
async fn a_consumer_resumed_inside_a_transaction_can_acknowledge_and_resume_from_every_position(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("midtx").await;
    let sub = ctx.name("midtx");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    let tx = ctx
        .client
        .begin("db", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    for i in 1..=3 {
        let sql = format!("INSERT INTO {t} VALUES ({i}, 'v{i}', {i})");
        ctx.client.execute_in(&tx, "db", &sql, vec![]).await.expect("insert");
    }
    ctx.client.commit(&tx).await.expect("commit");
    let first = changes(&read_changes(&mut watch, 1).await)[0].clone();
    assert_eq!(id_of(&first), 1);
    watch.ack(first.position.clone()).await.expect("ack");
    watch.finish().await.expect("the acknowledgement reaches the server");

    let resume_from = |position: &[u8]| {
        let mut start = ctx.start(&[&t], &sub);
        start.resume_position = position.to_vec();
        start
    };
    // Restarted without a position, from the stored acknowledgement: its
    // first position, the transaction's Begin, can be resumed from too
    // (on PostgreSQL, whose slot keeps whole transactions, the transaction
    // comes again from its start).
    let mut restarted = ctx.watch(ctx.start(&[&t], &sub)).await;
    let begin = match next_message(&mut restarted).await {
        Message::Transaction(b) if b.begin => b,
        other => panic!("{engine:?}: expected the transaction's Begin, got {other:?}"),
    };
    drop(restarted);
    if engine != Engine::Postgres {
        assert!(
            begin.position >= first.position,
            "{engine:?}: a Begin before the stored position"
        );
    }
    drop(ctx.watch(resume_from(&begin.position)).await);
    let mut resumed = ctx.watch(resume_from(&first.position)).await;
    let begin = match next_message(&mut resumed).await {
        Message::Transaction(b) if b.begin => b,
        other => panic!("{engine:?}: expected the transaction's Begin, got {other:?}"),
    };
    assert!(
        begin.position >= first.position,
        "{engine:?}: the Begin of a resumed transaction comes before the resume position"
    );
    // Acknowledging what was acknowledged before, then the Begin, keeps the stream going.
    resumed.ack(first.position.clone()).await.expect("ack");
    resumed.ack(begin.position.clone()).await.expect("ack");
    let ids: Vec<_> = changes(&read_changes(&mut resumed, 2).await)
        .iter()
        .map(|c| id_of(c))
        .collect();
    assert_eq!(ids, [2, 3], "{engine:?}");
    resumed.finish().await.expect("the acknowledgements reach the server");

    let mut again = ctx.watch(resume_from(&begin.position)).await;
    let messages = read_changes(&mut again, 2).await;
    let rest = changes(&messages);
    let ids: Vec<_> = rest.iter().map(|c| id_of(c)).collect();
    assert_eq!(ids, [2, 3], "{engine:?}: resumed from the Begin's position");
    let last = rest[1].position.clone();
    drop(again);

    // Resumed at the transaction's last change: nothing of it comes again
    // but its boundaries, so that a consumer grouping by transaction closes
    // it. (Not yet on SQL Server: its reader sends neither.)
    if engine == Engine::Mssql {
        ctx.finish(&[&sub], &[&t]).await;
        return;
    }
    let mut at_end = ctx.watch(resume_from(&last)).await;
    let mut boundaries = Vec::new();
    while boundaries.len() < 2 {
        match next_message(&mut at_end).await {
            Message::Transaction(b) => boundaries.push((b.begin, b.position >= last)),
            Message::Heartbeat(_) => {}
            other => panic!("{engine:?}: expected the transaction's boundaries, got {other:?}"),
        }
    }
    assert_eq!(boundaries, [(true, true), (false, true)], "{engine:?}");
    drop(at_end);
    ctx.finish(&[&sub], &[&t]).await;
}

async fn a_snapshot_then_stream_misses_and_doubles_nothing(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("snap").await;
    let sub = ctx.name("snap");
    ctx.sql(&format!(
        "INSERT INTO {t} (id, v, n) VALUES {}",
        (1..=500)
            .map(|i| format!("({i}, 'start', {i})"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await;

    // Writers keep changing the table while the snapshot is taken and read.
    let writer = {
        let client = ctx.client.clone();
        let t = t.clone();
        tokio::spawn(async move {
            for round in 0..150i64 {
                let id = 1 + (round * 37) % 700;
                let sql = match round % 3 {
                    0 => format!("UPDATE {t} SET v = 'r{round}' WHERE id = {id}"),
                    1 => format!("DELETE FROM {t} WHERE id = {id}"),
                    _ => format!("INSERT INTO {t} (id, v, n) VALUES ({}, 'new', 0)", 1000 + round),
                };
                client.execute("db", &sql, vec![]).await.expect("concurrent write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut start = ctx.start(&[&t], &sub);
    start.snapshot = true;
    let mut watch = ctx.watch(start).await;
    if engine == Engine::Mssql {
        let e = watch.next().await.expect_err("SQL Server has no snapshots");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        writer.await.expect("writer");
        drop(watch);
        return ctx.finish(&[&sub], &[&t]).await;
    }
    writer.await.expect("writer");
    ctx.sql(&format!("INSERT INTO {t} (id, v, n) VALUES (99999, 'end', 0)"))
        .await;

    let mut state: BTreeMap<i64, String> = BTreeMap::new();
    let mut streaming = false;
    loop {
        let Message::Change(c) = next_message(&mut watch).await else {
            continue;
        };
        let id = id_of(&c);
        match op(&c) {
            pb::ChangeOperation::SnapshotRead => {
                assert!(!streaming, "snapshot rows come before streamed changes");
                assert!(state
                    .insert(id, text(col(&c, c.after.as_ref().expect("row"), "v")).to_string())
                    .is_none());
            }
            pb::ChangeOperation::Insert => {
                streaming = true;
                let v = text(col(&c, c.after.as_ref().expect("row"), "v")).to_string();
                assert!(state.insert(id, v).is_none(), "insert of {id} doubles a snapshot row");
            }
            pb::ChangeOperation::Update => {
                streaming = true;
                let v = text(col(&c, c.after.as_ref().expect("row"), "v")).to_string();
                assert!(state.insert(id, v).is_some(), "update of {id}, which the replay lacks");
            }
            pb::ChangeOperation::Delete => {
                streaming = true;
                assert!(state.remove(&id).is_some(), "delete of {id}, which the replay lacks");
            }
            other => panic!("unexpected {other:?}"),
        }
        if id == 99999 {
            break;
        }
    }
    let table = ctx
        .client
        .execute("db", &format!("SELECT id, v FROM {t} ORDER BY id"), vec![])
        .await
        .expect("read table");
    let actual: BTreeMap<i64, String> = table
        .rows
        .iter()
        .map(|r| (int(&r.values[0]), text(&r.values[1]).to_string()))
        .collect();
    assert_eq!(state, actual, "the replayed stream equals the table");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

async fn one_consumer_per_subscription_unless_taken_over(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("single").await;
    let sub = ctx.name("single");
    let mut first = ctx.watch(ctx.start(&[&t], &sub)).await;
    let second = ctx.client.watch(ctx.start(&[&t], &sub)).await;
    let e = second.err().expect("a second consumer is refused");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(reason(&e), "SUBSCRIPTION_ACTIVE");

    let mut start = ctx.start(&[&t], &sub);
    start.take_over = true;
    let mut taker = ctx.watch(start).await;
    let e = stream_error(&mut first).await;
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert_eq!(reason(&e), "SUBSCRIPTION_TAKEN_OVER");
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'x', 1)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut taker, 1).await)[0]), 1);
    // Deleting an active subscription waits 2 s for its lock, in a session
    // outside the pool: a source runs one such delete at a time, so a burst
    // of them holds one session, not one each.
    let started = std::time::Instant::now();
    let deletes: Vec<_> = (0..3)
        .map(|_| {
            let client = ctx.client.clone();
            let subscription = sub.clone();
            tokio::spawn(async move {
                client
                    .stream()
                    .delete_subscription(pb::DeleteSubscriptionRequest {
                        source: "db".into(),
                        subscription,
                    })
                    .await
            })
        })
        .collect();
    for delete in deletes {
        let e = delete.await.expect("task").expect_err("the subscription is active");
        assert_eq!(reason(&e), "SUBSCRIPTION_ACTIVE");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "the three deletes ran one after another: {:?}",
        started.elapsed()
    );
    drop(taker);
    ctx.finish(&[&sub], &[&t]).await;
}

async fn heartbeats_advance_a_quiet_subscription(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("quiet").await;
    let noisy = ctx.table("noisy").await;
    let sub = ctx.name("quiet");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    // Changes to a table nobody watches still move the log on.
    ctx.sql(&format!("INSERT INTO {noisy} VALUES (1, 'x', 1)")).await;
    let heartbeat = match next_message(&mut watch).await {
        Message::Heartbeat(h) => h,
        other => panic!("only heartbeats on a quiet table, got {other:?}"),
    };
    assert!(heartbeat.server_time.is_some());
    watch.ack(heartbeat.position.clone()).await.expect("ack heartbeat");
    // The acknowledged heartbeat position is a valid resume point.
    watch.finish().await.expect("the acknowledgement reaches the server");
    let mut start = ctx.start(&[&t], &sub);
    start.resume_position = heartbeat.position;
    let mut resumed = ctx.watch(start).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (7, 'x', 1)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut resumed, 1).await)[0]), 7);
    drop(resumed);
    ctx.finish(&[&sub], &[&t, &noisy]).await;
}

async fn deleting_a_subscription_releases_the_engine_state(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("deleted").await;
    let sub = ctx.name("deleted");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'a', 1)")).await;
    let position = changes(&read_changes(&mut watch, 1).await)[0].position.clone();
    let busy = ctx.delete(&sub).await.expect_err("a live subscription is not deleted");
    assert_eq!(busy.code(), Code::AlreadyExists);
    drop(watch);
    // The server notices the closed stream shortly after.
    ctx.delete_once_released(&sub).await;
    assert!(
        !engine_state_exists(&ctx, &sub).await,
        "slot or stored state left behind"
    );
    let gone = ctx.delete(&sub).await.expect_err("deleted twice");
    assert_eq!(gone.code(), Code::NotFound);
    assert_eq!(reason(&gone), "SUBSCRIPTION_NOT_FOUND");
    if engine == Engine::Postgres {
        // A resume from one of its positions finds nothing retained, and
        // makes no new slot that would keep WAL for a client that goes.
        let mut resume = ctx.start(&[&t], &sub);
        resume.resume_position = position;
        let err = ctx.client.watch(resume).await.err().expect("nothing retained");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::OutOfRange, "POSITION_NOT_RETAINED"),
            "{err:?}"
        );
        assert!(
            !engine_state_exists(&ctx, &sub).await,
            "a slot made for a refused resume"
        );
    }
    ctx.finish(&[], &[&t]).await;
}

/// Whether the engine still keeps anything for the subscription.
async fn engine_state_exists(ctx: &Ctx, subscription: &str) -> bool {
    let id = weir_server::service::changes::subscription_id("cs", subscription);
    match ctx.engine {
        Engine::Mssql => {
            let sql = "SELECT COUNT(*) FROM weir_change_positions WHERE subscription = @P1";
            let param = pb::Value {
                kind: Some(pb::value::Kind::StringValue(id)),
            };
            let r = ctx
                .client
                .execute("db", sql, vec![param])
                .await
                .expect("count positions");
            int(&r.rows[0].values[0]) > 0
        }
        Engine::Postgres => {
            let pg = pg_direct().await;
            let slots: i64 = pg
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1)
                          + (SELECT count(*) FROM pg_publication WHERE pubname = $1)",
                    &[&id],
                )
                .await
                .expect("catalog")
                .get(0);
            slots > 0
        }
        Engine::Mysql => {
            use mysql_async::prelude::Queryable;
            let mut conn = mysql_direct().await;
            let n: Option<i64> = conn
                .exec_first(
                    "SELECT COUNT(*) FROM weir_change_positions WHERE subscription = ?",
                    (id,),
                )
                .await
                .unwrap_or(Some(0));
            n.unwrap_or(0) > 0
        }
    }
}

/// Ends the engine session that reads `subscription`, as a database restart
/// or a network cut would.
async fn kill_reader(ctx: &Ctx, subscription: &str) {
    let id = weir_server::service::changes::subscription_id("cs", subscription);
    match ctx.engine {
        Engine::Postgres => {
            let pg = pg_direct().await;
            let killed: i64 = pg
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory'
                       AND objsubid = 1 AND ((classid::int8 << 32) | objid::int8) = $1",
                    &[&weir_server::backend::postgres::lock_key(&id)],
                )
                .await
                .expect("terminate")
                .get(0);
            assert_eq!(killed, 1, "one session reads the subscription");
        }
        Engine::Mysql => {
            use mysql_async::prelude::Queryable;
            let mut conn = mysql_direct().await;
            let lock = weir_server::backend::mysql::lock_name(&env_or("WEIR_TEST_MYSQL_DATABASE", "test"), &id);
            let holder: Option<Option<u64>> = conn.exec_first("SELECT IS_USED_LOCK(?)", (lock,)).await.expect("lock");
            let holder = holder.flatten().expect("one session reads the subscription");
            conn.query_drop(format!("KILL CONNECTION {holder}"))
                .await
                .expect("kill");
        }
        Engine::Mssql => {
            let sql = "DECLARE @s int = (SELECT holder FROM weir_change_positions WHERE subscription = @P1); \
                       DECLARE @k nvarchar(40) = N'KILL ' + CAST(@s AS nvarchar(20)); EXEC (@k)";
            let param = pb::Value {
                kind: Some(pb::value::Kind::StringValue(id)),
            };
            ctx.client.execute("db", sql, vec![param]).await.expect("kill");
        }
    }
}

/// Which of a reader's database sessions a test ends.
enum Lost {
    /// The session holding the subscription (every engine).
    Reader,
    /// PostgreSQL's WAL sender, reading the slot.
    WalSender,
}

async fn a_lost_database_session_ends_the_stream_and_a_resume_loses_nothing(engine: Engine) {
    a_lost_session_ends_the_stream_and_a_resume_loses_nothing(engine, Lost::Reader).await
}

async fn a_lost_session_ends_the_stream_and_a_resume_loses_nothing(engine: Engine, lost: Lost) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("lost").await;
    let sub = ctx.name("lost");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'a', 1)")).await;
    let first = changes(&read_changes(&mut watch, 1).await)[0].clone();
    watch.ack(first.position.clone()).await.expect("ack");
    match lost {
        Lost::Reader => kill_reader(&ctx, &sub).await,
        Lost::WalSender => kill_wal_sender(&sub).await,
    }
    let ended = stream_error(&mut watch).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    // Written while nobody reads: kept by the database, delivered on resume.
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'b', 2)")).await;
    let mut start = ctx.start(&[&t], &sub);
    start.resume_position = first.position;
    let mut resumed = ctx.watch(start).await;
    assert_eq!(id_of(changes(&read_changes(&mut resumed, 1).await)[0]), 2);
    drop(resumed);
    ctx.finish(&[&sub], &[&t]).await;
}

async fn limits_and_silent_callers_get_clear_errors(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("limits").await;
    let (a, b, c) = (ctx.name("lim-a"), ctx.name("lim-b"), ctx.name("lim-c"));
    // The tenant may hold two change streams at once.
    let first = ctx.watch(ctx.start(&[&t], &a)).await;
    let second = ctx.watch(ctx.start(&[&t], &b)).await;
    let e = ctx
        .client
        .watch(ctx.start(&[&t], &c))
        .await
        .err()
        .expect("a third is refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(reason(&e), "SUBSCRIPTION_CONCURRENCY_LIMITED");
    drop((first, second));
    // A call that never sends its WatchStart is ended, not kept open.
    let silent = ctx
        .client
        .stream()
        .watch_changes(futures::stream::pending::<pb::WatchChangesRequest>())
        .await
        .expect_err("a call without WatchStart is refused");
    assert_eq!(silent.code(), Code::InvalidArgument, "{silent:?}");
    ctx.finish(&[&a, &b], &[&t]).await;
}

/// An acknowledgement on a watch the server has ended (taken over by
/// another consumer) fails with the server's own status, not a bare
/// CANCELLED that hides why.
#[tokio::test]
async fn an_ack_on_a_watch_the_server_ended_gets_its_status() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.table("ackended").await;
    let sub = ctx.name("ackended");
    let mut first = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'x', 1)")).await;
    let position = changes(&read_changes(&mut first, 1).await)[0].position.clone();
    let mut start = ctx.start(&[&t], &sub);
    start.take_over = true;
    let taker = ctx.watch(start).await;
    let started = std::time::Instant::now();
    let e = loop {
        match first.ack(position.clone()).await {
            Ok(()) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "acks fail once the call is over"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Aborted, "SUBSCRIPTION_TAKEN_OVER"),
        "{e:?}"
    );
    drop(taker);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A snapshot row with a value Weir cannot decode (a date past chrono's
/// year 262143, which PostgreSQL takes) ends the stream as the value's
/// error, INVALID_ARGUMENT naming the column, not as a lost session
/// (UNAVAILABLE, which a client would retry, reading the snapshot again).
#[tokio::test]
async fn postgres_a_snapshot_value_that_does_not_decode_is_its_columns_error() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.name("far_dates");
    ctx.sql(&format!("CREATE TABLE {t} (id INT PRIMARY KEY, far date)"))
        .await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, '300000-01-01')")).await;
    let sub = ctx.name("far_dates");
    let mut start = ctx.start(&[&t], &sub);
    start.snapshot = true;
    let mut watch = ctx.watch(start).await;
    let e = stream_error(&mut watch).await;
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "UNSUPPORTED_TYPE"),
        "{e:?}"
    );
    assert!(e.message().contains("far"), "{e:?}");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A column of a type Weir cannot represent, added to a watched table while
/// its stream runs, does not stop the stream at that change for good: its
/// values come as PostgreSQL's binary form, the column's type unspecified
/// (its native type named).
#[tokio::test]
async fn postgres_a_column_of_an_unsupported_type_added_midway_comes_as_bytes() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.table("added_point").await;
    let sub = ctx.name("added_point");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("ALTER TABLE {t} ADD COLUMN pt point")).await;
    ctx.sql(&format!("INSERT INTO {t} (id, v, pt) VALUES (1, 'a', '(1,2)')"))
        .await;
    ctx.sql(&format!("INSERT INTO {t} (id, v) VALUES (2, 'b')")).await;
    let messages = read_changes(&mut watch, 2).await;
    let got = changes(&messages);
    let row = got[0].after.as_ref().expect("a row");
    let pt = got[0].columns.iter().find(|c| c.name == "pt").expect("the new column");
    assert_eq!(
        (pt.r#type, pt.native_type.as_str()),
        (pb::ColumnType::Unspecified as i32, "point"),
        "{pt:?}"
    );
    let mut point = 1f64.to_be_bytes().to_vec();
    point.extend_from_slice(&2f64.to_be_bytes());
    assert_eq!(col(got[0], row, "pt").kind, Some(pb::value::Kind::BytesValue(point)));
    assert_eq!(id_of(got[1]), 2);
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A change logged while a column had a type since dropped (an enum turned
/// to text, then dropped) comes with the value's binary form, its type
/// unspecified: the old type's lookup failed, and the stream stopped with
/// INVALID_ARGUMENT at that change on every resume.
#[tokio::test]
async fn postgres_a_change_of_a_type_dropped_since_comes_as_bytes() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.name("dropped_type");
    let mood = format!("{t}_mood");
    ctx.sql(&format!("CREATE TYPE {mood} AS ENUM ('calm', 'glad')")).await;
    ctx.sql(&format!("CREATE TABLE {t} (id INT PRIMARY KEY, m {mood})"))
        .await;
    let sub = ctx.name("dropped_type");
    // The slot is made, and the stream left before any change.
    drop(ctx.watch(ctx.start(&[&t], &sub)).await);
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'glad')")).await;
    ctx.sql(&format!("ALTER TABLE {t} ALTER COLUMN m TYPE text")).await;
    ctx.sql(&format!("DROP TYPE {mood}")).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'calm')")).await;
    let mut start = ctx.start(&[&t], &sub);
    start.take_over = true;
    let mut watch = ctx.watch(start).await;
    let messages = read_changes(&mut watch, 2).await;
    let got = changes(&messages);
    let m = got[0].columns.iter().find(|c| c.name == "m").expect("the column");
    assert_eq!(m.r#type, pb::ColumnType::Unspecified as i32, "{m:?}");
    let row = got[0].after.as_ref().expect("a row");
    assert_eq!(
        col(got[0], row, "m").kind,
        Some(pb::value::Kind::BytesValue(b"glad".to_vec()))
    );
    let row = got[1].after.as_ref().expect("a row");
    assert_eq!(text(col(got[1], row, "m")), "calm");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// An infinite date or timestamp (a common "valid until" value) has no
/// typed form: in a change event or a snapshot row it comes as the text
/// `infinity`, so the subscription reads on instead of failing at that
/// change on every resume.
#[tokio::test]
async fn postgres_infinite_dates_and_timestamps_come_as_text() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.name("infinite");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, until timestamptz, day date, days date[])"
    ))
    .await;
    ctx.sql(&format!(
        "INSERT INTO {t} VALUES (1, 'infinity', '-infinity', '{{infinity,2024-01-02,NULL}}')"
    ))
    .await;
    let sub = ctx.name("infinite");
    let mut start = ctx.start(&[&t], &sub);
    start.snapshot = true;
    let mut watch = ctx.watch(start).await;
    let mut messages = read_changes(&mut watch, 1).await;
    ctx.sql(&format!(
        "INSERT INTO {t} VALUES (2, '-infinity', 'infinity'), (3, now(), '2024-01-02')"
    ))
    .await;
    messages.extend(read_changes(&mut watch, 2).await);
    let got = changes(&messages);
    assert_eq!(got.iter().map(|c| id_of(c)).collect::<Vec<_>>(), [1, 2, 3]);
    let texts = |c: &pb::ChangeEvent| {
        let row = c.after.as_ref().expect("a row");
        ["until", "day"].map(|name| match &col(c, row, name).kind {
            Some(pb::value::Kind::StringValue(s)) => s.clone(),
            other => format!("{other:?}"),
        })
    };
    assert_eq!(texts(got[0]), ["infinity", "-infinity"]);
    assert_eq!(texts(got[1]), ["-infinity", "infinity"]);
    // Inside an array too, each element as it would come alone.
    let row = got[0].after.as_ref().expect("a row");
    let Some(pb::value::Kind::ListValue(days)) = &col(got[0], row, "days").kind else {
        panic!("a list: {row:?}");
    };
    let kinds: Vec<_> = days.values.iter().map(|v| v.kind.clone()).collect();
    assert!(
        matches!(
            kinds.as_slice(),
            [Some(pb::value::Kind::StringValue(inf)), Some(pb::value::Kind::DateValue(_)), Some(pb::value::Kind::Null(_))]
                if inf == "infinity"
        ),
        "{kinds:?}"
    );
    let row = got[2].after.as_ref().expect("a row");
    assert!(
        matches!(col(got[2], row, "until").kind, Some(pb::value::Kind::TimestampValue(_))),
        "finite values keep their type"
    );
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A MySQL consumer replaced by a take-over while it waited on its slow
/// client does not, when that client finally leaves, store its older
/// acknowledgement over its successor's: the subscription resumes where
/// the successor left it.
#[tokio::test]
async fn mysql_a_replaced_consumer_does_not_store_its_position_over_its_successors() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("replaced");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, v LONGTEXT, n DECIMAL(10,2))"
    ))
    .await;
    let sub = ctx.name("replaced");
    let mut slow = ctx.watch(ctx.start(&[&t], &sub)).await;
    // 1,000 changes of 10 kB: more than the reader's feed (256), the stream's
    // buffer (64) and the client's HTTP/2 window (2 MiB) hold.
    ctx.sql(&format!(
        "INSERT INTO {t} (id, v, n) SELECT seq, REPEAT('x', 10000), seq FROM seq_1_to_1000"
    ))
    .await;
    let first = read_changes(&mut slow, 5).await;
    slow.ack(changes(&first)[4].position.clone()).await.expect("ack");
    // `slow` reads no more; another consumer takes over and reads to the commit.
    let mut start = ctx.start(&[&t], &sub);
    start.take_over = true;
    let mut taker = ctx.watch(start).await;
    let commit = loop {
        if let Message::Transaction(b) = next_message(&mut taker).await {
            if !b.begin {
                break b.position;
            }
        }
    };
    taker.ack(commit).await.expect("ack the commit");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The slow client leaves: its reader ends, and must store nothing.
    drop(slow);
    tokio::time::sleep(Duration::from_secs(1)).await;
    taker.finish().await.expect("acknowledgements sent");
    ctx.sql(&format!("INSERT INTO {t} VALUES (1001, 'y', 1)")).await;
    let mut resumed = ctx.watch(ctx.start(&[&t], &sub)).await;
    let next = read_changes(&mut resumed, 1).await;
    assert_eq!(
        id_of(changes(&next)[0]),
        1001,
        "resumed after the successor's acknowledgement"
    );
    drop(resumed);
    ctx.finish(&[&sub], &[&t]).await;
}

async fn bad_requests_get_clear_errors(engine: Engine) {
    let ctx = Ctx::new(engine).await;
    let t = ctx.table("errs").await;
    let keyless = ctx.name("keyless");
    ctx.sql(&format!("CREATE TABLE {keyless} (a INT, b INT)")).await;
    let sub = ctx.name("errs");

    let status = |r: Result<ChangeWatch, tonic::Status>| r.err().expect("refused");
    let e = status(ctx.client.watch(ctx.start(&[&keyless], &sub)).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(reason(&e), "CHANGE_STREAMS_NOT_READY");
    let why = if engine == Engine::Mssql { "CDC" } else { "primary key" };
    assert!(e.message().contains(why), "{}", e.message());

    let e = status(ctx.client.watch(ctx.start(&["no_such_table_x"], &sub)).await);
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let e = status(ctx.client.watch(ctx.start(&[&t], "bad name;drop")).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let e = status(ctx.client.watch(ctx.start(&[], &sub)).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let mut lite = ctx.start(&["customers"], &sub);
    lite.source = "lite".into();
    let e = status(ctx.client.watch(lite).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A position from another tenant's subscription of the same name is refused.
    let other = ctx.server.client("key-other").await;
    let mut theirs = other.watch(ctx.start(&[&t], &sub)).await.expect("other tenant's watch");
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'x', 1)")).await;
    let their_position = changes(&read_changes(&mut theirs, 1).await)[0].position.clone();
    drop(theirs);
    let mut start = ctx.start(&[&t], &sub);
    start.resume_position = their_position.clone();
    let e = status(ctx.client.watch(start).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Acknowledging something never delivered ends the stream with INVALID_ARGUMENT.
    let mut mine = ctx.watch(ctx.start(&[&t], &sub)).await;
    mine.ack(their_position).await.expect("ack is sent");
    let e = stream_error(&mut mine).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let other_ctx_sub = sub.clone();
    let _ = other
        .stream()
        .delete_subscription(pb::DeleteSubscriptionRequest {
            source: "db".into(),
            subscription: other_ctx_sub,
        })
        .await;
    ctx.finish(&[&sub], &[&t, &keyless]).await;
}

/// An acknowledgement the transport refuses (over `max_request_bytes`) ends
/// the stream with that error: a stream cut short never ends with OK.
#[tokio::test]
async fn an_ack_over_the_request_size_limit_ends_the_stream_with_its_error() {
    let ctx = Ctx::with_changes(Engine::Postgres, "[server]\nmax_request_bytes = 65536\n").await;
    let t = ctx.table("big_ack").await;
    let sub = ctx.name("big_ack");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    watch.ack(vec![0; 100_000]).await.expect("sent");
    let err = stream_error(&mut watch).await;
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A table with a column of a type change events cannot carry is refused
/// before any slot exists: its first change would stop the stream, and every
/// resume at it again.
#[tokio::test]
async fn postgres_tables_with_columns_change_events_cannot_carry_are_refused() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.name("pointy");
    ctx.sql(&format!("CREATE TABLE {t} (id INT PRIMARY KEY, at point)"))
        .await;
    let sub = ctx.name("pointy");
    let e = ctx.refused_as_not_ready(&t, &sub).await;
    assert!(
        e.message().contains("column at") && e.message().contains("point"),
        "{e:?}"
    );
    let slots = pg_direct()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1",
            &[&format!("%{}%", ctx.tag)],
        )
        .await
        .expect("slots")
        .get::<_, i64>(0);
    assert_eq!(slots, 0, "no slot holds WAL for a stream that cannot run");
    // A generated column is not published, whatever its type.
    let g = ctx.name("generated");
    ctx.sql(&format!(
        "CREATE TABLE {g} (id INT PRIMARY KEY, body text, \
         search tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED)"
    ))
    .await;
    let generated_sub = ctx.name("generated");
    ctx.sql(&format!("INSERT INTO {g} (id, body) VALUES (1, 'a b')")).await;
    let mut start = ctx.start(&[&g], &generated_sub);
    start.snapshot = true;
    let mut watch = ctx.watch(start).await;
    let mut messages = read_changes(&mut watch, 1).await;
    ctx.sql(&format!("INSERT INTO {g} (id, body) VALUES (2, 'c')")).await;
    messages.extend(read_changes(&mut watch, 1).await);
    let got = changes(&messages);
    assert_eq!(
        got.iter().map(|c| (op(c), id_of(c))).collect::<Vec<_>>(),
        [(pb::ChangeOperation::SnapshotRead, 1), (pb::ChangeOperation::Insert, 2)]
    );
    for c in got {
        let names: Vec<&str> = c.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "body"], "the snapshot's columns are the events' columns");
    }
    drop(watch);
    ctx.finish(&[&sub, &generated_sub], &[&t, &g]).await;
}

/// A MySQL stream resumed after a column was added at the table's end
/// delivers what was logged before (the new column NULL) and after.
#[tokio::test]
async fn mysql_a_stream_resumed_after_a_column_was_added_reads_on() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.table("grown").await;
    let sub = ctx.name("grown");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'a', 1)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), 1);
    drop(watch);
    ctx.sql(&format!("ALTER TABLE {t} ADD COLUMN extra INT")).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'b', 2, 7)")).await;
    // Not acknowledged: the first row comes again, logged with one column less.
    let mut resumed = ctx.watch(ctx.start(&[&t], &sub)).await;
    let messages = read_changes(&mut resumed, 2).await;
    let got = changes(&messages);
    assert_eq!(got.iter().map(|c| id_of(c)).collect::<Vec<_>>(), [1, 2]);
    let (first, second) = (
        got[0].after.as_ref().expect("after"),
        got[1].after.as_ref().expect("after"),
    );
    assert!(is_null(col(got[0], first, "extra")), "{:?}", got[0]);
    assert_eq!(int(col(got[1], second, "extra")), 7);
    drop(resumed);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A table with text in a character set other than UTF-8 is refused before
/// the stream starts, naming the column: the binary log carries its bytes
/// as they are stored, which change events could only garble or stop at.
#[tokio::test]
async fn mysql_tables_with_text_not_in_utf8_are_refused() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("latin");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, v VARCHAR(20) CHARACTER SET latin1)"
    ))
    .await;
    let sub = ctx.name("latin");
    let e = ctx.refused_as_not_ready(&t, &sub).await;
    assert!(e.message().contains("column v uses the character set latin1"), "{e:?}");
    let readiness = ctx
        .client
        .describe_table("db", "", &t)
        .await
        .expect("describe")
        .change_streams
        .expect("readiness");
    assert!(!readiness.ready);
    // ENUM values are logged as numbers, their labels read from the type.
    let e = ctx.name("latin_enum");
    ctx.sql(&format!(
        "CREATE TABLE {e} (id INT PRIMARY KEY, status ENUM('a','b') CHARACTER SET latin1)"
    ))
    .await;
    let enum_sub = ctx.name("latin_enum");
    drop(ctx.watch(ctx.start(&[&e], &enum_sub)).await);
    ctx.finish(&[&sub, &enum_sub], &[&t, &e]).await;
}

/// DescribeTable's readiness follows WatchChanges' own rule: a table it
/// calls ready can be watched (a partitioned table, one identified by a
/// unique index), and one it calls not ready is refused (REPLICA IDENTITY
/// NOTHING, a column change events cannot carry).
#[tokio::test]
async fn postgres_readiness_in_describe_table_is_what_watch_changes_finds() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let (parted, unique, nothing, pointy) = (
        ctx.name("rparted"),
        ctx.name("runique"),
        ctx.name("rnothing"),
        ctx.name("rpoint"),
    );
    for sql in [
        format!("CREATE TABLE {parted} (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k)"),
        format!("CREATE TABLE {parted}_1 PARTITION OF {parted} FOR VALUES IN (1)"),
        format!("CREATE TABLE {unique} (a int NOT NULL)"),
        format!("CREATE UNIQUE INDEX {unique}_a ON {unique} (a)"),
        format!("ALTER TABLE {unique} REPLICA IDENTITY USING INDEX {unique}_a"),
        format!("CREATE TABLE {nothing} (id int PRIMARY KEY)"),
        format!("ALTER TABLE {nothing} REPLICA IDENTITY NOTHING"),
        format!("CREATE TABLE {pointy} (id int PRIMARY KEY, at point)"),
    ] {
        ctx.sql(&sql).await;
    }
    let mut subscriptions = Vec::new();
    for (table, ready) in [(&parted, true), (&unique, true), (&nothing, false), (&pointy, false)] {
        let readiness = ctx
            .client
            .describe_table("db", "", table)
            .await
            .expect("describe")
            .change_streams
            .expect("readiness");
        assert_eq!(readiness.ready, ready, "{table}: {readiness:?}");
        let subscription = format!("{table}_s");
        let watched = ctx.client.watch(ctx.start(&[table], &subscription)).await;
        assert_eq!(watched.is_ok(), ready, "{table}: {:?}", watched.err());
        if let Err(e) = watched {
            assert!(
                e.message().contains(&readiness.reason),
                "the same reason: {e:?} / {readiness:?}"
            );
        }
        subscriptions.push(subscription);
    }
    let subscriptions: Vec<&str> = subscriptions.iter().map(String::as_str).collect();
    ctx.finish(&subscriptions, &[&parted, &unique, &nothing, &pointy]).await;
}

/// A port of the second servers ./scripts/test starts without change streams.
/// Servers that cannot stream changes say which setting is missing.
#[tokio::test]
async fn servers_without_logical_decoding_or_binlog_say_what_to_change() {
    let pg = common::plain_postgres("np", "db", "");
    let my = common::plain_mysql("np", "my", "");
    let server = TestServer::start(&tenant("np", "", &(pg + &my))).await;
    let client = server.client("key-np").await;
    let table = format!("plain_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    for (source, setting) in [("db", "wal_level"), ("my", "binary log")] {
        client
            .execute(source, &format!("CREATE TABLE {table} (id INT PRIMARY KEY)"), vec![])
            .await
            .expect("create table");
        let start = pb::WatchStart {
            source: source.into(),
            tables: vec![pb::TableRef {
                schema: String::new(),
                table: table.clone(),
            }],
            subscription: "s".into(),
            ..Default::default()
        };
        let e = client.watch(start).await.err().expect("refused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{source}: {e:?}");
        assert_eq!(reason(&e), "CHANGE_STREAMS_NOT_READY");
        assert!(e.message().contains(setting), "{source}: {}", e.message());
        let d = client.describe_table(source, "", &table).await.expect("describe");
        let readiness = d.change_streams.expect("readiness");
        assert!(!readiness.ready, "{source}");
        client
            .execute(source, &format!("DROP TABLE {table}"), vec![])
            .await
            .expect("drop");
    }
    server.stop().await;
}

/// Subscriptions whose ids share a 32-bit hash still lock apart: taking one
/// over does not end the other's stream (the names are found here as a
/// tenant could find them offline, by a birthday search over `hashtext`).
#[tokio::test]
async fn postgres_subscriptions_whose_ids_share_a_32_bit_hash_do_not_take_each_other_over() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.table("collide").await;
    let names: Vec<String> = (0..300_000).map(|i| format!("c{i}_{}", ctx.tag)).collect();
    let ids: Vec<String> = names
        .iter()
        .map(|n| weir_server::service::changes::subscription_id("cs", n))
        .collect();
    let pair: Vec<i64> = pg_direct()
        .await
        .query_one(
            "SELECT array_agg(i ORDER BY i) FROM unnest($1::text[]) WITH ORDINALITY u(id, i) \
             GROUP BY hashtext(id) HAVING count(*) > 1 LIMIT 1",
            &[&ids],
        )
        .await
        .expect("two ids among 300,000 share a hashtext")
        .get(0);
    let name = |i: i64| names[usize::try_from(i - 1).expect("ordinal")].clone();
    let (a, b) = (name(pair[0]), name(pair[1]));
    let mut first = ctx.watch(ctx.start(&[&t], &a)).await;
    let mut start = ctx.start(&[&t], &b);
    start.take_over = true;
    let mut second = ctx.watch(start).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1)")).await;
    assert_eq!(
        id_of(changes(&read_changes(&mut first, 1).await)[0]),
        1,
        "the first stream goes on"
    );
    assert_eq!(id_of(changes(&read_changes(&mut second, 1).await)[0]), 1);
    // A reader whose lock session was ended stops at its next check (a
    // heartbeat interval): both still stream after a few.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'two', 2)")).await;
    assert_eq!(
        id_of(changes(&read_changes(&mut first, 1).await)[0]),
        2,
        "the first stream goes on"
    );
    assert_eq!(id_of(changes(&read_changes(&mut second, 1).await)[0]), 2);
    drop((first, second));
    ctx.finish(&[&a, &b], &[&t]).await;
}

/// Two PostgreSQL sources of one tenant on two databases of one server,
/// with one subscription name: replication slots are named server-wide, so
/// the second source neither deletes nor takes over the first's slot (which
/// would make the first's next watch start from now, skipping every change
/// since its last acknowledgement); it is told the name is in use.
#[tokio::test]
async fn postgres_a_subscription_name_on_two_databases_of_one_server_stays_apart() {
    let other_db = "weir_changes_other";
    let pg = pg_direct().await;
    let exists: bool = pg
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&other_db],
        )
        .await
        .expect("pg_database")
        .get(0);
    if !exists {
        // Another test binary may make it at the same moment.
        let _ = pg.batch_execute(&format!("CREATE DATABASE {other_db}")).await;
    }
    let ctx = Ctx::with_second_database(Engine::Postgres, other_db).await;
    let t = ctx.table("perdb").await;
    let other = pg_direct_to(other_db).await;
    other
        .batch_execute(&format!(
            "CREATE TABLE {t} (id INT PRIMARY KEY, v TEXT, n DECIMAL(10,2))"
        ))
        .await
        .expect("the same table in the other database");
    let sub = ctx.name("perdb");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1)")).await;
    let position = changes(&read_changes(&mut watch, 1).await)[0].position.clone();
    watch.ack(position.clone()).await.expect("ack");
    drop(watch);
    // A position of the first source's subscription is not one of the
    // second's, whatever its log position would say there.
    let mut elsewhere = ctx.start(&[&t], &sub);
    elsewhere.source = "db2".into();
    elsewhere.resume_position = position;
    let e = ctx
        .client
        .watch(elsewhere)
        .await
        .err()
        .expect("another source's position");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("of source \"db2\""), "{e:?}");
    // Until the first source's reader has let its slot go.
    let id = weir_server::service::changes::subscription_id("cs", &sub);
    let deadline = tokio::time::Instant::now() + WAIT;
    while pg
        .query_one(
            "SELECT coalesce(bool_or(active), true) FROM pg_replication_slots WHERE slot_name = $1",
            &[&id],
        )
        .await
        .expect("slot")
        .get::<_, bool>(0)
    {
        assert!(tokio::time::Instant::now() < deadline, "the slot stays active");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deleted = ctx
        .delete_from("db2", &sub)
        .await
        .expect_err("nothing of it on the second database");
    assert_eq!(deleted.code(), Code::NotFound, "{deleted:?}");
    let mut on_second = ctx.start(&[&t], &sub);
    on_second.source = "db2".into();
    on_second.take_over = true;
    let taken = ctx.client.watch(on_second).await.err().expect("the name is in use");
    assert_eq!(
        (taken.code(), reason(&taken).as_str()),
        (Code::FailedPrecondition, "CHANGE_STREAMS_NOT_READY"),
        "{taken:?}"
    );
    assert!(taken.message().contains("another database"), "{taken:?}");
    // The first source's subscription kept its place: a watch without a
    // position gets what was written since.
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'two', 2)")).await;
    let mut resumed = ctx.watch(ctx.start(&[&t], &sub)).await;
    // (The first change may come again: its acknowledgement may not have
    // reached the slot before the first stream ended.)
    let mut ids = Vec::new();
    while ids.last() != Some(&2) {
        ids.extend(changes(&read_changes(&mut resumed, 1).await).iter().map(|c| id_of(c)));
        assert!(ids.len() <= 2, "{ids:?}");
    }
    drop(resumed);
    other.batch_execute(&format!("DROP TABLE {t}")).await.expect("cleanup");
    ctx.finish(&[&sub], &[&t]).await;
}

/// `GET_LOCK` names are server-wide, but a MySQL subscription is its
/// database's (its positions are kept there): a second source on another
/// database of the server, watching under the same subscription name, even
/// as a take-over, streams on its own and leaves the first's stream alone.
#[tokio::test]
async fn mysql_a_subscription_name_on_two_databases_of_one_server_stays_apart() {
    use mysql_async::prelude::Queryable;
    let other_db = "weir_changes_other";
    let mut my = mysql_direct().await;
    my.query_drop(format!("CREATE DATABASE IF NOT EXISTS {other_db}"))
        .await
        .expect("the other database");
    let ctx = Ctx::with_second_database(Engine::Mysql, other_db).await;
    let t = ctx.table("perdb").await;
    my.query_drop(format!(
        "CREATE TABLE {other_db}.{t} (id INT PRIMARY KEY, v VARCHAR(200), n DECIMAL(10,2))"
    ))
    .await
    .expect("the same table in the other database");
    let sub = ctx.name("perdb");
    let mut first = ctx.watch(ctx.start(&[&t], &sub)).await;
    let mut on_second = ctx.start(&[&t], &sub);
    on_second.source = "db2".into();
    on_second.take_over = true;
    let mut second = ctx.watch(on_second).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1)")).await;
    my.query_drop(format!("INSERT INTO {other_db}.{t} VALUES (2, 'two', 2)"))
        .await
        .expect("a row in the other database");
    let ids = |messages: &[Message]| changes(messages).iter().map(|c| id_of(c)).collect::<Vec<_>>();
    assert_eq!(ids(&read_changes(&mut second, 1).await), [2]);
    assert_eq!(ids(&read_changes(&mut first, 1).await), [1]);
    drop((first, second));
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = ctx.delete_from("db2", &sub).await {
        // Until the second source's reader has let its lock go.
        assert!(tokio::time::Instant::now() < deadline, "{e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    my.query_drop(format!("DROP TABLE {other_db}.{t}"))
        .await
        .expect("cleanup");
    ctx.finish(&[&sub], &[&t]).await;
}

/// Two subscriptions whose binlog readers would have had the same replica
/// id when it was a 30-bit hash of the subscription (names found as a tenant
/// could find them offline) both stream: the server ends an older dump with
/// the same id, so a tenant could end another's stream.
#[tokio::test]
async fn mysql_subscriptions_once_sharing_a_replica_id_both_stream() {
    use sha2::{Digest, Sha256};
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.table("collide").await;
    let old_replica_id = |name: &str| {
        let id = weir_server::service::changes::subscription_id("cs", name);
        let d = Sha256::digest(id.as_bytes());
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & 0x3fff_ffff
    };
    let mut seen = std::collections::HashMap::new();
    let (a, b) = (0..1_000_000)
        .find_map(|i| {
            let name = format!("c{i}_{}", ctx.tag);
            seen.insert(old_replica_id(&name), name.clone())
                .map(|earlier| (earlier, name))
        })
        .expect("two names among a million share 30 bits");
    let mut first = ctx.watch(ctx.start(&[&t], &a)).await;
    let mut second = ctx.watch(ctx.start(&[&t], &b)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1)")).await;
    assert_eq!(
        id_of(changes(&read_changes(&mut first, 1).await)[0]),
        1,
        "the first stream goes on"
    );
    assert_eq!(id_of(changes(&read_changes(&mut second, 1).await)[0]), 1);
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'two', 2)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut first, 1).await)[0]), 2);
    assert_eq!(id_of(changes(&read_changes(&mut second, 1).await)[0]), 2);
    drop((first, second));
    ctx.finish(&[&a, &b], &[&t]).await;
}

/// Storing an acknowledged heartbeat writes to the positions table, which
/// moves the binlog on: that write must not make the next heartbeat, or a
/// quiet server gets one write per heartbeat for ever. Every heartbeat
/// must cover something in the binlog besides positions being stored.
#[tokio::test]
async fn mysql_acknowledged_heartbeats_do_not_feed_themselves() {
    use mysql_async::prelude::Queryable;
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.table("selffed").await;
    let noisy = ctx.table("selffed_noisy").await;
    let sub = ctx.name("selffed");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {noisy} VALUES (1, 'x', 1)")).await;
    let mut heartbeats = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while let Ok(message) = tokio::time::timeout_at(until, next_message(&mut watch)).await {
        if let Message::Heartbeat(h) = message {
            watch.ack(h.position.clone()).await.expect("ack heartbeat");
            heartbeats.push(h.position);
        }
    }
    drop(watch);
    assert!(!heartbeats.is_empty(), "the write to another table makes a heartbeat");
    let mut my = common::mysql_direct().await;
    let status: mysql_async::Row = my
        .query_first("SHOW MASTER STATUS")
        .await
        .expect("status")
        .expect("a binlog");
    let file: String = status.get(0).expect("the binlog file");
    let base = file.rsplit_once('.').expect("numbered binlog files").0.to_string();
    // Positions end in the engine's (file number, offset, sequence) as 4, 8
    // and 4 big-endian bytes (no restart point: no XA transaction here).
    let decode = |p: &[u8]| {
        let p = &p[p.len() - 16..];
        let number = u32::from_be_bytes(p[0..4].try_into().expect("file"));
        let offset = u64::from_be_bytes(p[4..12].try_into().expect("offset"));
        (format!("{base}.{number:06}"), offset)
    };
    // The last acknowledgement was stored: a write to the positions table
    // after the last heartbeat, which (were it to feed heartbeats) would
    // have made another.
    // (Stored at the reader's next tick, or as its stream ends.)
    let last = heartbeats.last().map(|p| decode(p));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stored: Option<(String, u64)> = my
            .exec_first(
                "SELECT binlog_file, binlog_offset FROM weir_change_positions WHERE subscription LIKE ?",
                (format!("%{sub}%"),),
            )
            .await
            .expect("the stored position");
        if stored == last {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last acknowledgement was never stored: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pair in heartbeats.windows(2) {
        let ((file, from), (to_file, to)) = (decode(&pair[0]), decode(&pair[1]));
        if file != to_file {
            continue;
        }
        // (Event_type, End_log_pos, Info) of each event from the first heartbeat on.
        let events: Vec<(String, u64, String)> = my
            .query_map(
                format!("SHOW BINLOG EVENTS IN '{file}' FROM {from}"),
                |row: mysql_async::Row| {
                    let text = |i| row.get::<String, _>(i).unwrap_or_default();
                    (text(2), row.get::<u64, _>(4).unwrap_or(0), text(5))
                },
            )
            .await
            .unwrap_or_else(|e| panic!("binlog events of {file} from {from}: {e}"));
        let covered: Vec<_> = events
            .into_iter()
            .take_while(|(_, end, _)| *end <= to)
            .filter(|(kind, _, info)| {
                kind == "Table_map" || (kind == "Query" && !["BEGIN", "COMMIT"].contains(&info.as_str()))
            })
            .map(|(kind, _, info)| format!("{kind} {info}"))
            .collect();
        assert!(
            covered.iter().any(|e| !e.contains("weir_change_positions")),
            "a heartbeat moved on over nothing but stored positions: {covered:?}"
        );
    }
    drop(my);
    ctx.finish(&[&sub], &[&t, &noisy]).await;
}

/// Database `db` made anew with a positions table as Weir made it before
/// restart points, and a keyed table `table`; a session to it.
async fn database_with_old_positions_table(db: &str, table: &str) -> mysql_async::Conn {
    use mysql_async::prelude::Queryable;
    let mut my = mysql_direct().await;
    for sql in [
        format!("DROP DATABASE IF EXISTS {db}"),
        format!("CREATE DATABASE {db}"),
        format!(
            "CREATE TABLE {db}.weir_change_positions (subscription VARCHAR(64) NOT NULL PRIMARY KEY, \
             binlog_file VARCHAR(255) NOT NULL, binlog_offset BIGINT UNSIGNED NOT NULL, \
             event_seq INT UNSIGNED NOT NULL, updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) \
             ON UPDATE CURRENT_TIMESTAMP(6))"
        ),
        format!("CREATE TABLE {db}.{table} (id INT PRIMARY KEY)"),
    ] {
        my.query_drop(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    my
}

/// Deletes subscription `sub` of source db2 once its stream let go, drops `db`, stops the server.
async fn finish_on_second_database(ctx: Ctx, sub: &str, my: &mut mysql_async::Conn, db: &str) {
    use mysql_async::prelude::Queryable;
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = ctx.delete_from("db2", sub).await {
        assert!(tokio::time::Instant::now() < deadline, "{e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    my.query_drop(format!("DROP DATABASE {db}")).await.expect("cleanup");
    ctx.server.stop().await;
}

/// A positions table made before restart points (without their columns)
/// gets them at the next stream, which then stores and resumes as usual.
#[tokio::test]
async fn mysql_a_positions_table_from_before_restart_points_is_upgraded() {
    use mysql_async::prelude::Queryable;
    let db = "weir_changes_upgrade";
    let mut my = database_with_old_positions_table(db, "upgraded").await;
    let ctx = Ctx::with_second_database(Engine::Mysql, db).await;
    let sub = ctx.name("upgraded");
    let mut start = ctx.start(&["upgraded"], &sub);
    start.source = "db2".into();
    let mut watch = ctx.watch(start.clone()).await;
    my.query_drop(format!("INSERT INTO {db}.upgraded VALUES (1)"))
        .await
        .expect("insert");
    let first = changes(&read_changes(&mut watch, 1).await)[0].clone();
    watch.ack(first.position.clone()).await.expect("ack");
    watch.finish().await.expect("the acknowledgement reaches the server");
    my.query_drop(format!("INSERT INTO {db}.upgraded VALUES (2)"))
        .await
        .expect("insert");
    let mut resumed = ctx.watch(start).await;
    assert_eq!(
        id_of(changes(&read_changes(&mut resumed, 1).await)[0]),
        2,
        "resumed from the stored position"
    );
    drop(resumed);
    let columns: Vec<String> = my
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? \
             AND TABLE_NAME = 'weir_change_positions' AND COLUMN_NAME LIKE 'restart%' ORDER BY 1",
            (db,),
        )
        .await
        .expect("columns");
    assert_eq!(columns, ["restart_file", "restart_offset"]);
    finish_on_second_database(ctx, &sub, &mut my, db).await;
}

/// Where the positions table cannot get the restart point's columns (here
/// its ALTER waits out its 5 s on a session holding the table; else a
/// missing ALTER privilege), the stream still runs, and a position
/// acknowledged while an XA transaction waits is stored as that
/// transaction's prepare: a resume without a position still gets it.
#[tokio::test]
async fn mysql_without_restart_columns_an_acknowledgement_is_stored_at_the_prepare() {
    use mysql_async::prelude::Queryable;
    let db = "weir_changes_noalter";
    let mut my = mysql_direct().await;
    // A run that failed midway left its XA transaction prepared (it
    // outlives its session), holding the table the database drop needs.
    let left: Vec<String> = my
        .query_map("XA RECOVER", |row: mysql_async::Row| {
            row.get::<String, _>(3).unwrap_or_default()
        })
        .await
        .expect("XA RECOVER");
    for xid in left.iter().filter(|x| x.starts_with("noalter_")) {
        my.query_drop(format!("XA ROLLBACK '{xid}'"))
            .await
            .expect("XA ROLLBACK");
    }
    drop(my);
    let mut my = database_with_old_positions_table(db, "held").await;
    let mut holder = mysql_direct().await;
    mysql_run(
        &mut holder,
        &[
            "BEGIN".into(),
            format!("SELECT COUNT(*) FROM {db}.weir_change_positions"),
        ],
    )
    .await;
    let ctx = Ctx::with_second_database(Engine::Mysql, db).await;
    let sub = ctx.name("noalter");
    let mut start = ctx.start(&["held"], &sub);
    start.source = "db2".into();
    let mut watch = ctx.watch(start.clone()).await;
    mysql_run(&mut holder, &["COMMIT".into()]).await;
    let mut xa = mysql_direct().await;
    let xid = format!("noalter_{}", ctx.tag);
    mysql_run(
        &mut xa,
        &[
            format!("XA START '{xid}'"),
            format!("INSERT INTO {db}.held VALUES (1)"),
            format!("XA END '{xid}'"),
            format!("XA PREPARE '{xid}'"),
        ],
    )
    .await;
    my.query_drop(format!("INSERT INTO {db}.held VALUES (2)"))
        .await
        .expect("insert");
    assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), 2);
    let commit = next_commit(&mut watch).await;
    watch.ack(commit.clone()).await.expect("ack");
    watch.finish().await.expect("the acknowledgement reaches the server");
    // The position ends in (file, offset, seq) and the restart point's (file, offset).
    let engine = &commit[commit.len() - 28..];
    let restart = u64::from_be_bytes(engine[20..28].try_into().expect("offset"));
    // Stored as the reader ends, after the call.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stored: Option<(u64, u32)> = my
            .exec_first(
                format!("SELECT binlog_offset, event_seq FROM {db}.weir_change_positions WHERE subscription LIKE ?"),
                (format!("%{sub}%"),),
            )
            .await
            .expect("stored");
        if stored == Some((restart, 0)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not stored at the XA transaction's prepare ({restart}): {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mysql_run(&mut xa, &[format!("XA COMMIT '{xid}'")]).await;
    let mut resumed = ctx.watch(start).await;
    let ids: Vec<_> = changes(&read_changes(&mut resumed, 2).await)
        .iter()
        .map(|c| id_of(c))
        .collect();
    assert_eq!(
        ids,
        [2, 1],
        "the change after the prepare again, then the XA transaction at its commit"
    );
    drop((resumed, xa, holder));
    finish_on_second_database(ctx, &sub, &mut my, db).await;
}

/// A session that logs partial row images (`binlog_row_image = MINIMAL`,
/// which any session may set) still has each value under its own column;
/// a column not in the image is NULL and named in `unchanged_columns`
/// (without, a consumer would write NULL over its value).
#[tokio::test]
async fn mysql_minimal_row_images_keep_values_under_their_columns() {
    use mysql_async::prelude::Queryable;
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.table("minimal").await;
    let sub = ctx.name("minimal");
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1.50)")).await;
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    let mut my = common::mysql_direct().await;
    my.query_drop("SET SESSION binlog_row_image = 'MINIMAL'")
        .await
        .expect("minimal row images");
    my.query_drop(format!("UPDATE {t} SET n = 9.75 WHERE id = 1"))
        .await
        .expect("update");
    let messages = read_changes(&mut watch, 1).await;
    let c = changes(&messages)[0];
    let before = c.before.as_ref().expect("the key before");
    assert_eq!(int(col(c, before, "id")), 1);
    let after = c.after.as_ref().expect("the changed column after");
    assert_eq!(decimal(col(c, after, "n")), "9.75");
    assert!(is_null(col(c, after, "v")), "{c:?}");
    assert_eq!(c.unchanged_columns, ["id", "v"], "{c:?}");
    drop((watch, my));
    ctx.finish(&[&sub], &[&t]).await;
}

/// Every MySQL geometry type is BYTES, in DescribeTable and in change
/// events: a MULTIPOINT was described as STRING, and its change events
/// (decoded by that type) stopped the stream at the first row.
#[tokio::test]
async fn mysql_multi_geometries_are_bytes_in_descriptions_and_change_events() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("multigeo");
    ctx.sql(&format!("CREATE TABLE {t} (id INT PRIMARY KEY, m MULTIPOINT)"))
        .await;
    let d = ctx.client.describe_table("db", "", &t).await.expect("describe");
    let m = d
        .columns
        .iter()
        .filter_map(|c| c.column.as_ref())
        .find(|c| c.name == "m")
        .expect("m");
    assert_eq!(m.r#type(), pb::ColumnType::Bytes, "{m:?}");
    let sub = ctx.name("multigeo");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!(
        "INSERT INTO {t} VALUES (1, ST_GeomFromText('MULTIPOINT(1.5 2.5, 3 4)'))"
    ))
    .await;
    let messages = read_changes(&mut watch, 1).await;
    let c = changes(&messages)[0];
    let after = c.after.as_ref().expect("after");
    assert!(
        matches!(&col(c, after, "m").kind, Some(pb::value::Kind::BytesValue(b)) if b.len() > 20),
        "{c:?}"
    );
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A table taken out of a PostgreSQL watch is not decoded at all: a column
/// added to it of a type Weir cannot represent does not end the stream of
/// the tables still watched (narrowing the watch is how a user gets past it).
#[tokio::test]
async fn postgres_a_table_taken_out_is_not_decoded() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let (kept, dropped) = (ctx.table("keptdec").await, ctx.table("droppeddec").await);
    let sub = ctx.name("undecoded");
    drop(ctx.watch(ctx.start(&[&kept, &dropped], &sub)).await);
    ctx.sql(&format!("ALTER TABLE {dropped} ADD COLUMN p point")).await;
    ctx.sql(&format!("INSERT INTO {dropped} VALUES (1, 'd', 1, point(1, 2))"))
        .await;
    ctx.sql(&format!("INSERT INTO {kept} VALUES (1, 'k', 1)")).await;
    let mut narrowed = ctx.watch(ctx.start(&[&kept], &sub)).await;
    let messages = read_changes(&mut narrowed, 1).await;
    assert_eq!(changes(&messages)[0].table, kept);
    drop(narrowed);
    ctx.finish(&[&sub], &[&kept, &dropped]).await;
}

/// A TOASTed value an UPDATE left alone is not resent by PostgreSQL: it is
/// NULL in `after` and named in `unchanged_columns`, so that a consumer
/// keeps the value it has instead of writing NULL over it; a real NULL is
/// not named.
#[tokio::test]
async fn postgres_unchanged_toasted_values_are_named_not_passed_off_as_null() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.name("toasted");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, status TEXT, body TEXT)"
    ))
    .await;
    // Stored out of line, uncompressed, whatever its content.
    ctx.sql(&format!("ALTER TABLE {t} ALTER COLUMN body SET STORAGE EXTERNAL"))
        .await;
    let sub = ctx.name("toasted");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'new', repeat('x', 10000))"))
        .await;
    ctx.sql(&format!("UPDATE {t} SET status = 'done' WHERE id = 1")).await;
    // A key update sends the old key only: the rest of that row is unknown.
    ctx.sql(&format!("UPDATE {t} SET id = 2 WHERE id = 1")).await;
    ctx.sql(&format!("UPDATE {t} SET status = 'gone', body = NULL WHERE id = 2"))
        .await;
    let messages = read_changes(&mut watch, 4).await;
    let got = changes(&messages);
    let body = |c: &pb::ChangeEvent| col(c, c.after.as_ref().expect("after"), "body").clone();
    assert!(matches!(&body(got[0]).kind, Some(pb::value::Kind::StringValue(s)) if s.len() == 10000));
    assert!(got[0].unchanged_columns.is_empty(), "{:?}", got[0].unchanged_columns);
    for key_too in [1, 2] {
        assert!(is_null(&body(got[key_too])));
        assert_eq!(got[key_too].unchanged_columns, ["body"], "{key_too}");
    }
    assert!(is_null(&body(got[3])));
    assert!(
        got[3].unchanged_columns.is_empty(),
        "a real NULL: {:?}",
        got[3].unchanged_columns
    );
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// A MySQL `BINARY(n)` value ending in zero bytes arrives whole: the
/// binary log drops those bytes, and the value was one byte short.
#[tokio::test]
async fn mysql_binary_values_ending_in_zero_bytes_arrive_whole() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("fixedbin");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, b BINARY(4), v VARBINARY(4))"
    ))
    .await;
    let sub = ctx.name("fixedbin");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 0x01020000, 0x0100)"))
        .await;
    let messages = read_changes(&mut watch, 1).await;
    let c = changes(&messages)[0];
    let after = c.after.as_ref().expect("after");
    let bytes = |name: &str| match &col(c, after, name).kind {
        Some(pb::value::Kind::BytesValue(b)) => b.clone(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(bytes("b"), [1, 2, 0, 0], "as SELECT returns it");
    assert_eq!(bytes("v"), [1, 0], "VARBINARY keeps its own length");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// Execute's values of `sql`, whose first column is `id`: by id, then by column.
async fn rows_by_id(ctx: &Ctx, sql: &str) -> BTreeMap<i64, BTreeMap<String, pb::Value>> {
    let r = ctx
        .client
        .execute("db", sql, vec![])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    r.rows
        .iter()
        .map(|row| {
            let values: BTreeMap<String, pb::Value> = r
                .columns
                .iter()
                .map(|c| c.name.clone())
                .zip(row.values.iter().cloned())
                .collect();
            (int(&row.values[0]), values)
        })
        .collect()
}

/// Watches MySQL table `t` (subscription `t`) with a snapshot of the rows
/// `seed` wrote, streams `writes` (each touching a row once, `streamed`
/// events in all) and checks every value of every event against Execute's:
/// snapshot rows and the old rows of updates and deletes against a SELECT
/// before the writes, new rows against one after them. Both run in a
/// session without sql_mode (zero dates allowed), in UTC.
async fn mysql_events_equal_execute(ctx: &Ctx, t: &str, seed: &[String], writes: &[String], streamed: usize) {
    use mysql_async::prelude::Queryable;
    let mut my = common::mysql_direct().await;
    my.query_drop("SET SESSION sql_mode = '', SESSION time_zone = '+00:00'")
        .await
        .expect("session");
    for sql in seed {
        my.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let select = format!("SELECT * FROM {t} ORDER BY id");
    let old = rows_by_id(ctx, &select).await;
    let mut start = ctx.start(&[t], t);
    start.snapshot = true;
    let mut watch = ctx.watch(start).await;
    // The snapshot is read once the stream has begun: the writes wait for
    // its rows, or it could see some of them.
    let mut messages = read_changes(&mut watch, old.len()).await;
    for sql in writes {
        my.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let new = rows_by_id(ctx, &select).await;
    messages.extend(read_changes(&mut watch, streamed).await);
    let same = |c: &pb::ChangeEvent, row: Option<&pb::Row>, expected: &BTreeMap<i64, BTreeMap<String, pb::Value>>| {
        let row = row.expect("a row");
        for (name, value) in &expected[&int(col(c, row, "id"))] {
            assert_eq!(
                col(c, row, name),
                value,
                "column {name} of a {:?} event: {row:?}",
                op(c)
            );
        }
    };
    for c in changes(&messages) {
        match op(c) {
            pb::ChangeOperation::SnapshotRead => same(c, c.after.as_ref(), &old),
            pb::ChangeOperation::Insert => same(c, c.after.as_ref(), &new),
            pb::ChangeOperation::Update => {
                same(c, c.before.as_ref(), &old);
                same(c, c.after.as_ref(), &new);
            }
            pb::ChangeOperation::Delete => same(c, c.before.as_ref(), &old),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop((watch, my));
}

/// MariaDB's UUID, INET6 and INET4 values arrive as SELECT prints them:
/// the binary log holds their binary form (without its trailing zero
/// bytes), which was read as text, and a UUID stopped the stream.
#[tokio::test]
async fn mysql_uuid_and_inet_values_arrive_as_select_prints_them() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("inet");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, u UUID, i6 INET6, i4 INET4)"
    ))
    .await;
    let row = |id: i64, u: &str, i6: &str, i4: &str| format!("INSERT INTO {t} VALUES ({id}, {u}, {i6}, {i4})");
    let seed = [
        // A time-based (v1) UUID, which MariaDB stores with its segments swapped.
        row(1, "'6ccd780c-baba-1026-9564-5b8c656024db'", "'::1'", "'10.0.0.1'"),
        row(
            2,
            "'550e8400-e29b-41d4-a716-446655440000'",
            "'::ffff:1.2.3.4'",
            "'1.2.3.0'",
        ),
    ];
    let writes = [
        row(
            3,
            "'0190d8f1-2b3c-7abc-9def-0123456789ab'",
            "'2001:db8::1'",
            "'0.0.0.0'",
        ),
        row(4, "UUID()", "'2001:db8::'", "'255.255.255.255'"),
        row(5, "'00000000-0000-0000-0000-000000000000'", "'1:2:3:4:5:6:7:0'", "NULL"),
        row(6, "NULL", "'::1.2.3.4'", "'192.168.0.0'"),
        row(
            7,
            "'6ccd780c-baba-1026-c564-5b8c656024db'",
            "'1:0:3:4:5:6:7:8'",
            "'0.0.0.1'",
        ),
        row(8, "'ffffffff-ffff-ffff-ffff-ffffffffffff'", "'::'", "'1.0.0.0'"),
        row(9, "'6ccd780c-baba-1026-9564-5b8c656024db'", "'1:0:0:1:0:0:0:1'", "NULL"),
        row(10, "NULL", "'::ffff:0:0'", "NULL"),
        format!("UPDATE {t} SET u = '550e8400-e29b-41d4-a716-446655440000', i6 = 'fe80::1:0:0:0' WHERE id = 1"),
        format!("DELETE FROM {t} WHERE id = 2"),
    ];
    mysql_events_equal_execute(&ctx, &t, &seed, &writes, 10).await;
    // What Execute returns, and the events with it.
    let r = rows_by_id(&ctx, &format!("SELECT id, u, i6, i4 FROM {t}")).await;
    assert_eq!(text(&r[&1]["u"]), "550e8400-e29b-41d4-a716-446655440000");
    assert_eq!(text(&r[&1]["i6"]), "fe80::1:0:0:0");
    assert_eq!(text(&r[&3]["i6"]), "2001:db8::1");
    assert_eq!(text(&r[&5]["i6"]), "1:2:3:4:5:6:7::");
    assert_eq!(text(&r[&6]["i6"]), "::1.2.3.4");
    assert_eq!(text(&r[&9]["u"]), "6ccd780c-baba-1026-9564-5b8c656024db");
    assert_eq!(text(&r[&10]["i6"]), "::ffff:0.0.0.0");
    assert_eq!(text(&r[&6]["i4"]), "192.168.0.0");
    ctx.finish(&[&t], &[&t]).await;
}

/// Zero dates are NULL in change events as in queries: a zero TIMESTAMP,
/// logged as 0 seconds, arrived as 1970-01-01T00:00:00Z (an instant no
/// TIMESTAMP holds: its range starts later).
#[tokio::test]
async fn mysql_zero_dates_are_null_in_change_events_as_in_queries() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("zerodate");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, ts TIMESTAMP NULL, ts6 TIMESTAMP(6) NULL, \
         dt DATETIME, dt6 DATETIME(6), d DATE)"
    ))
    .await;
    let zero = "'0000-00-00 00:00:00'";
    let zeros = |id: i64| format!("INSERT INTO {t} VALUES ({id}, {zero}, {zero}, {zero}, {zero}, '0000-00-00')");
    let seed = [zeros(1), zeros(2)];
    let writes = [
        zeros(3),
        // A zero month or day is no date either; half a second past the epoch is a TIMESTAMP.
        format!(
            "INSERT INTO {t} VALUES (4, '1970-01-01 00:00:01', '1970-01-01 00:00:00.5', \
             '2024-00-10 00:00:00', '0000-01-01 00:00:00', '2024-01-00')"
        ),
        format!("INSERT INTO {t} VALUES (5, '2024-02-29 12:00:00', NULL, '1970-01-01 00:00:00', NULL, '0000-01-01')"),
        format!("UPDATE {t} SET ts = '2024-01-01 00:00:00', d = '2024-01-01' WHERE id = 1"),
        format!("DELETE FROM {t} WHERE id = 2"),
    ];
    mysql_events_equal_execute(&ctx, &t, &seed, &writes, 5).await;
    let r = rows_by_id(&ctx, &format!("SELECT * FROM {t}")).await;
    for name in ["ts", "ts6", "dt", "dt6", "d"] {
        assert!(is_null(&r[&3][name]), "{name}: {:?}", r[&3][name]);
    }
    assert!(!is_null(&r[&4]["ts6"]) && !is_null(&r[&4]["dt6"]));
    assert!(is_null(&r[&4]["dt"]) && is_null(&r[&4]["d"]));
    ctx.finish(&[&t], &[&t]).await;
}

/// ENUM and SET labels with a backslash, a quote or a control character
/// arrive as stored: COLUMN_TYPE, where the stream reads them, writes them
/// as string literals (`'c\\d'`), of which only `''` was undone.
#[tokio::test]
async fn mysql_enum_and_set_labels_with_escapes_arrive_as_stored() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("labels");
    ctx.sql(&format!(
        r"CREATE TABLE {t} (id INT PRIMARY KEY,
          e ENUM('c\\d', 'it''s', 'x\ny', 'c\rr', 'n\0n', 't\tb', '\Z\b\%'),
          s SET('p\\q', 'r''s', 't\nu'))"
    ))
    .await;
    let row = |id: i64, e: i64, s: i64| format!("INSERT INTO {t} VALUES ({id}, {e}, {s})");
    let seed = [row(1, 1, 1), row(2, 2, 2)];
    let writes = [
        row(3, 3, 4),
        row(4, 4, 7),
        row(5, 5, 0),
        row(6, 6, 5),
        row(7, 7, 3),
        format!("UPDATE {t} SET e = 3, s = 6 WHERE id = 1"),
        format!("DELETE FROM {t} WHERE id = 2"),
    ];
    mysql_events_equal_execute(&ctx, &t, &seed, &writes, 7).await;
    let r = rows_by_id(&ctx, &format!("SELECT * FROM {t}")).await;
    let at = |id: i64, name: &str| text(&r[&id][name]).to_string();
    assert_eq!(at(1, "e"), "x\ny");
    assert_eq!(at(1, "s"), "r's,t\nu");
    assert_eq!(at(4, "e"), "c\rr");
    assert_eq!(at(4, "s"), "p\\q,r's,t\nu");
    assert_eq!(at(5, "e"), "n\0n");
    assert_eq!(at(6, "e"), "t\tb");
    assert_eq!(at(7, "e"), "\u{1a}\u{8}\\%", "MySQL keeps the backslash of \\%");
    assert_eq!(at(7, "s"), "p\\q,r's");
    ctx.finish(&[&t], &[&t]).await;
}

fn interval(microseconds: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::IntervalValue(pb::Interval {
            months: 0,
            days: 0,
            microseconds,
        })),
    }
}

/// A MySQL TIME outside a day (-838:59:59 to 838:59:59) is an interval in
/// change events as in queries: its change event failed to decode, and
/// every resume failed again at that row.
#[tokio::test]
async fn mysql_times_outside_a_day_are_intervals_in_change_events_as_in_queries() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.name("longtime");
    // TIME(1) and TIME(2) are logged in a form of their own (negative
    // values with a fraction borrow from the whole seconds).
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, t TIME, t6 TIME(6), t2 TIME(2), t1 TIME(1))"
    ))
    .await;
    let row = |id: i64, a: &str, b: &str, c: &str| format!("INSERT INTO {t} VALUES ({id}, {a}, {b}, {c}, {c})");
    let seed = [
        row(1, "'25:00:00'", "'-01:30:00.5'", "'-00:00:01.5'"),
        row(2, "'12:00:00'", "'-00:00:01'", "'-700:00:00.5'"),
    ];
    let writes = [
        row(3, "'838:59:59'", "'-838:59:59.999999'", "'-838:59:59.9'"),
        row(4, "'23:59:59'", "'24:00:00'", "'-00:00:00.1'"),
        row(5, "'25:00:00'", "'-01:30:00'", "'-12:34:56.7'"),
        row(6, "'00:00:00'", "'00:00:00'", "'-05:00:00'"),
        row(7, "'00:00:00'", "'00:00:00'", "'01:02:03.4'"),
        format!("UPDATE {t} SET t = '-01:30:00', t6 = '100:00:00.000001', t2 = '-00:00:00.01' WHERE id = 1"),
        format!("DELETE FROM {t} WHERE id = 2"),
    ];
    mysql_events_equal_execute(&ctx, &t, &seed, &writes, 7).await;
    let r = rows_by_id(&ctx, &format!("SELECT * FROM {t}")).await;
    const HOUR: i64 = 3_600_000_000;
    assert_eq!(r[&5]["t"], interval(25 * HOUR));
    assert_eq!(r[&5]["t6"], interval(-(HOUR + HOUR / 2)));
    assert_eq!(r[&1]["t6"], interval(100 * HOUR + 1));
    assert_eq!(r[&3]["t"], interval(838 * HOUR + 3_599_000_000));
    assert_eq!(r[&3]["t6"], interval(-(838 * HOUR + 3_599_999_999)));
    assert_eq!(r[&4]["t6"], interval(24 * HOUR), "24:00:00 is past a time of day");
    assert_eq!(r[&1]["t2"], interval(-10_000));
    assert_eq!(r[&1]["t1"], interval(-1_500_000));
    assert_eq!(r[&3]["t1"], interval(-(838 * HOUR + 3_599_900_000)));
    assert_eq!(
        r[&5]["t2"],
        interval(-(12 * HOUR + (34 * 60 + 56) * 1_000_000 + 700_000))
    );
    assert!(
        matches!(&r[&4]["t"].kind, Some(pb::value::Kind::TimeValue(t)) if t.hours == 23),
        "{:?}",
        r[&4]["t"]
    );
    ctx.finish(&[&t], &[&t]).await;
}

/// PostgreSQL pushes each transaction over a replication connection as it
/// commits: nothing waits for `poll_interval` (an hour here), and between
/// changes the slot stays held by that connection's walsender.
/// A change stream waiting out its tenant's rate (here 10 bytes a second,
/// so that one change event waits for many seconds) still sees its client
/// leave: its subscription slot is free again at once, not after the wait.
#[tokio::test]
async fn postgres_a_throttled_change_stream_whose_client_leaves_frees_its_slot_at_once() {
    let engine = Engine::Postgres;
    let limits = "max_concurrent_subscriptions = 1\nstream_bytes_per_second = 10";
    let ctx = Ctx::with_limits(engine, CONFIG, &engine.source("cs"), limits).await;
    let t = ctx.table("throttled").await;
    let (first, next) = (ctx.name("throttled"), ctx.name("throttled-next"));
    let watch = ctx.watch(ctx.start(&[&t], &first)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1)")).await;
    // The event has reached the stream, which waits for its turn.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(watch);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let again = loop {
        match ctx.client.watch(ctx.start(&[&t], &next)).await {
            Ok(w) => break w,
            Err(e) if reason(&e) == "SUBSCRIPTION_CONCURRENCY_LIMITED" && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the first stream's slot is still held: {e:?}"),
        }
    };
    drop(again);
    ctx.finish(&[&first, &next], &[&t]).await;
}

/// A snapshot behind a long transaction writing to its table waits a few
/// seconds for its lock, then fails with ABORTED (try again), instead of
/// queueing every new writer of the table behind it for as long as the
/// long transaction runs.
#[tokio::test]
async fn postgres_a_snapshot_behind_a_long_writer_gives_up_its_lock_wait() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.table("locked").await;
    let sub = ctx.name("locked");
    // The slot first: creating one waits for every transaction that writes.
    let mut first = ctx.watch(ctx.start(&[&t], &sub)).await;
    next_message(&mut first).await;
    let writer = pg_direct().await;
    writer
        .batch_execute(&format!("BEGIN; INSERT INTO {t} (id, v, n) VALUES (1, 'long', 0)"))
        .await
        .expect("a long transaction");
    let mut start = ctx.start(&[&t], &sub);
    (start.snapshot, start.take_over) = (true, true);
    let started = std::time::Instant::now();
    let mut watch = tokio::time::timeout(Duration::from_secs(20), ctx.watch(start))
        .await
        .expect("the watch starts");
    let e = stream_error_within(&mut watch, Duration::from_secs(20)).await;
    assert_eq!((e.code(), engine_code(&e).as_str()), (Code::Aborted, "55P03"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    drop((first, watch));
    writer.batch_execute("ROLLBACK").await.expect("rollback");
    ctx.finish(&[&sub], &[&t]).await;
}

/// A partitioned table's changes come under its own name, whichever
/// partition they landed in, as its snapshot rows do.
#[tokio::test]
async fn postgres_a_partitioned_tables_changes_come_under_its_name() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.name("parted");
    ctx.sql(&format!(
        "CREATE TABLE {t} (id INT PRIMARY KEY, v TEXT, n DECIMAL(10,2)) PARTITION BY RANGE (id)"
    ))
    .await;
    ctx.sql(&format!(
        "CREATE TABLE {t}_low PARTITION OF {t} FOR VALUES FROM (0) TO (100)"
    ))
    .await;
    ctx.sql(&format!(
        "CREATE TABLE {t}_high PARTITION OF {t} FOR VALUES FROM (100) TO (200)"
    ))
    .await;
    // The subscription's publication is first made for a plain table, so
    // the partitioned one is added to a publication without the setting.
    let plain = ctx.table("unparted").await;
    let sub = ctx.name("parted");
    let mut first = ctx.watch(ctx.start(&[&plain], &sub)).await;
    next_message(&mut first).await;
    let mut start = ctx.start(&[&t], &sub);
    start.take_over = true;
    let mut watch = ctx.watch(start).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'low', 1), (150, 'high', 2)"))
        .await;
    ctx.sql(&format!("UPDATE {t} SET v = 'moved' WHERE id = 150")).await;
    let messages = read_changes(&mut watch, 3).await;
    let seen = changes(&messages);
    assert_eq!(seen.len(), 3, "{seen:?}");
    for c in &seen {
        assert_eq!(c.table, t, "{c:?}");
        assert_eq!(c.primary_key, ["id"], "{c:?}");
    }
    assert_eq!(seen.iter().map(|c| id_of(c)).collect::<Vec<_>>(), [1, 150, 150]);
    drop((first, watch));
    ctx.finish(&[&sub], &[&t, &plain]).await;
}

/// A watch publishes the table it names, not those inheriting from it: they
/// were published too, so that their own updates and deletes needed a
/// replica identity and the application's failed without one, and the
/// snapshot read their rows while the stream dropped their changes. A
/// partitioned table with REPLICA IDENTITY FULL whose partitions lack it
/// (they keep their own) is refused, as DescribeTable says, naming one.
#[tokio::test]
async fn postgres_a_watch_publishes_only_the_table_it_names() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.table("inherited").await;
    let child = format!("{t}_child");
    ctx.sql(&format!("CREATE TABLE {child} (extra INT) INHERITS ({t})"))
        .await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'own', 1)")).await;
    ctx.sql(&format!("INSERT INTO {child} VALUES (2, 'child''s', 2, 0)"))
        .await;
    let sub = ctx.name("inherited");
    let mut start = ctx.start(&[&t], &sub);
    start.snapshot = true;
    let mut watch = ctx.watch(start).await;
    let snapshot = changes(&read_changes(&mut watch, 1).await)
        .into_iter()
        .map(id_of)
        .collect::<Vec<_>>();
    assert_eq!(snapshot, [1], "the table's own rows");
    ctx.sql(&format!("UPDATE {child} SET v = 'still writable' WHERE id = 2"))
        .await;
    ctx.sql(&format!("DELETE FROM {t} WHERE id = 2")).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (3, 'after', 3)")).await;
    let next = changes(&read_changes(&mut watch, 1).await)
        .into_iter()
        .map(id_of)
        .collect::<Vec<_>>();
    assert_eq!(next, [3]);
    drop(watch);

    let parted = ctx.name("full_parted");
    ctx.sql(&format!(
        "CREATE TABLE {parted} (id INT, v TEXT) PARTITION BY RANGE (id)"
    ))
    .await;
    ctx.sql(&format!(
        "CREATE TABLE {parted}_p PARTITION OF {parted} FOR VALUES FROM (0) TO (10)"
    ))
    .await;
    ctx.sql(&format!("ALTER TABLE {parted} REPLICA IDENTITY FULL")).await;
    let described = ctx.client.describe_table("db", "", &parted).await.expect("describe");
    let readiness = described.change_streams.expect("readiness");
    assert!(
        !readiness.ready && readiness.reason.contains(&format!("{parted}_p")),
        "{readiness:?}"
    );
    let e = ctx.refused_as_not_ready(&parted, &ctx.name("full_parted")).await;
    assert!(e.message().contains("REPLICA IDENTITY FULL"), "{e:?}");
    ctx.sql(&format!("ALTER TABLE {parted}_p REPLICA IDENTITY FULL")).await;
    let described = ctx.client.describe_table("db", "", &parted).await.expect("describe");
    assert!(described.change_streams.expect("readiness").ready);
    ctx.finish(&[&sub], &[&child, &t, &parted]).await;
}

#[tokio::test]
async fn postgres_pushes_each_change_as_it_commits() {
    let ctx = Ctx::with_changes(
        Engine::Postgres,
        "[changes]\npoll_interval = \"1h\"\nheartbeat_interval = \"300ms\"\n",
    )
    .await;
    let t = ctx.table("pushed").await;
    let sub = ctx.name("pushed");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    for id in 1..=3 {
        ctx.sql(&format!("INSERT INTO {t} VALUES ({id}, 'x', 1)")).await;
        assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), id);
    }
    let slot = weir_server::service::changes::subscription_id("cs", &sub);
    let reader: String = pg_direct()
        .await
        .query_one(
            "SELECT a.backend_type FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
             WHERE s.slot_name::text = $1",
            &[&slot],
        )
        .await
        .expect("the slot is held")
        .get(0);
    assert_eq!(reader, "walsender");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// With Redis configured, change events are charged to the shared buckets
/// in gathered amounts: not two Redis round trips per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_events_are_charged_to_redis_together() {
    let config = format!("{CONFIG}[limits]\nredis_url = \"{}\"\n", redis_url());
    let ctx = Ctx::with_changes(Engine::Postgres, &config).await;
    let t = ctx.table("gathered").await;
    let sub = ctx.name("gathered");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!(
        "INSERT INTO {t} SELECT g, 'x', 1 FROM generate_series(1, 400) g"
    ))
    .await;
    assert_eq!(changes(&read_changes(&mut watch, 400).await).len(), 400);
    let (_, metrics) = http_get(&ctx.server.metrics_url, "/metrics").await;
    let checks = sample(&metrics, "weir_shared_limit_checks_total", &[("tenant", "cs")]);
    assert!(checks > 0.0, "no Redis checks counted for the tenant:\n{metrics}");
    assert!(checks < 40.0, "{checks} Redis round trips for 400 events");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// Tenant cs's PostgreSQL source `db` on the test server's host, at `port`.
fn pg_source(port: &str, user: &str, password: &str) -> String {
    format!(
        "[tenants.cs.sources.db]\nengine = \"postgres\"\nhost = \"{}\"\nport = {port}\nuser = \"{user}\"\n\
         database = \"{}\"\n{password}\n",
        env_or("WEIR_TEST_PG_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_PG_DATABASE", "test"),
    )
}

/// A network that stops carrying packets leaves every socket open: TCP
/// alone would notice after many minutes. The reader asks the server for its
/// position every second, and ends the stream with UNAVAILABLE once the
/// server's `wal_sender_timeout` (60 s here) and 5 s pass without an answer.
#[tokio::test]
async fn postgres_stream_ends_when_the_network_goes_silent() {
    let proxy = Proxy::start(pg_address()).await;
    let password = if std::env::var("WEIR_TEST_PG_PASSWORD").is_ok() {
        "password_env = \"WEIR_TEST_PG_PASSWORD\""
    } else {
        ""
    };
    let source = pg_source(
        &proxy.port.to_string(),
        &env_or("WEIR_TEST_PG_USER", "postgres"),
        password,
    );
    let ctx = Ctx::with_source(Engine::Postgres, CONFIG, &source).await;
    let t = ctx.table("silent").await;
    let sub = ctx.name("silent");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'a', 1)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), 1);

    proxy.freeze(true);
    let ended = stream_error_within(&mut watch, Duration::from_secs(90)).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("did not answer"), "{ended:?}");
    proxy.freeze(false);
    ctx.finish(&[&sub], &[&t]).await;
}

/// The same for MySQL: the server sends a heartbeat event after every quiet
/// `heartbeat_interval`, and a binlog connection silent for three of them
/// (10 s at the least) ends the stream with UNAVAILABLE; so does a position
/// store that takes as long (the client acknowledges what it reads).
#[tokio::test]
async fn mysql_stream_ends_when_the_network_goes_silent() {
    let (proxy, source) = mysql_behind_proxy("cs", "db", "").await;
    let ctx = Ctx::with_source(Engine::Mysql, CONFIG, &source).await;
    let t = ctx.table("silent").await;
    let sub = ctx.name("silent");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'a', 1)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), 1);

    proxy.freeze(true);
    // 10 s of silence, then at most 10 s to store the last acknowledgement
    // and 5 s each for the sessions that end the dump and look for a take-over.
    let ended = stream_error_within(&mut watch, Duration::from_secs(45)).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("taken as lost"), "{ended:?}");
    proxy.freeze(false);
    ctx.finish(&[&sub], &[&t]).await;
}

/// Ends the WAL sender reading `subscription`'s slot, as a restart or a
/// failover of PostgreSQL does first.
async fn kill_wal_sender(subscription: &str) {
    let slot = weir_server::service::changes::subscription_id("cs", subscription);
    let killed: i64 = pg_direct()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots
             WHERE slot_name::text = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 1, "one WAL sender reads the slot");
}

/// A killed WAL sender ends the stream with UNAVAILABLE, and a resume from
/// the last acknowledgement gets every later change once.
#[tokio::test]
async fn postgres_a_killed_wal_sender_ends_the_stream_and_a_resume_loses_nothing() {
    a_lost_session_ends_the_stream_and_a_resume_loses_nothing(Engine::Postgres, Lost::WalSender).await
}

/// Weir logs in to the replication connection by itself (tokio-postgres does
/// not speak that protocol): with SCRAM-SHA-256, and with an MD5-stored
/// password. ./scripts/test sets up both logins and makes them give a password.
#[tokio::test]
async fn postgres_change_streams_log_in_with_scram_and_md5() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for (user, password) in [("weir_scram", "weir-scram"), ("weir_md5", "weir-md5")] {
        let file = dir.path().join(user);
        std::fs::write(&file, password).expect("password file");
        let source = pg_source(
            &env_or("WEIR_TEST_PG_PORT", "5432"),
            user,
            &format!("password_file = \"{}\"", file.display()),
        );
        let ctx = Ctx::with_source(Engine::Postgres, CONFIG, &source).await;
        let t = ctx.table(user).await;
        let sub = ctx.name(user);
        let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
        ctx.sql(&format!("INSERT INTO {t} VALUES (7, 'x', 1)")).await;
        assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), 7, "{user}");
        drop(watch);
        ctx.finish(&[&sub], &[&t]).await;
    }
}

/// A watched table swapped for another under its name (renamed away and a
/// new one made, as online schema-change tools do) is not in the
/// subscription's publication: the stream said nothing and went on without
/// its changes. It now ends with FAILED_PRECONDITION, once the client has
/// acknowledged every change of the old table (so that the watch again,
/// which follows the new table, loses none), and a watch again with a
/// snapshot has the new table's rows.
#[tokio::test]
async fn postgres_a_table_replaced_under_its_name_ends_the_stream() {
    let ctx = Ctx::new(Engine::Postgres).await;
    let t = ctx.table("replaced").await;
    let old = format!("{t}_old");
    let sub = ctx.name("replaced");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'one', 1)")).await;
    let commit = next_commit(&mut watch).await;
    ctx.sql(&format!("ALTER TABLE {t} RENAME TO {old}")).await;
    ctx.sql(&format!("CREATE TABLE {t} (LIKE {old} INCLUDING ALL)")).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'two', 2)")).await;
    // Not before the change of the old table is acknowledged.
    let early = tokio::time::timeout(Duration::from_millis(1500), stream_error(&mut watch)).await;
    assert!(
        early.is_err(),
        "ended before its last change was acknowledged: {early:?}"
    );
    watch.ack(commit).await.expect("ack");
    let err = stream_error(&mut watch).await;
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "CHANGE_STREAMS_NOT_READY"),
        "{err:?}"
    );
    assert!(err.message().contains("names another table now"), "{}", err.message());
    drop(watch);
    let mut start = ctx.start(&[&t], &sub);
    start.snapshot = true;
    let mut watch = tokio::time::timeout(WAIT, async {
        loop {
            match ctx.client.watch(start.clone()).await {
                Ok(watch) => return watch,
                Err(e) if e.code() == Code::AlreadyExists => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("watch again: {e:?}"),
            }
        }
    })
    .await
    .expect("the old stream's lock is released");
    let again = read_changes(&mut watch, 1).await;
    let c = changes(&again)[0];
    assert_eq!(c.op(), pb::ChangeOperation::SnapshotRead, "{c:?}");
    assert_eq!(int(col(c, c.after.as_ref().expect("after"), "id")), 2);
    drop(watch);
    ctx.finish(&[&sub], &[&t, &old]).await;
}

/// A role's (or database's) `statement_timeout` does not cut a snapshot,
/// which is one statement read at the consumer's pace: it failed on every
/// retry once the snapshot took longer to read than the timeout.
#[tokio::test]
async fn postgres_a_snapshot_outlasts_the_roles_statement_timeout() {
    let pg = pg_direct().await;
    pg.batch_execute(
        "DO $$ BEGIN CREATE ROLE weir_timeouts LOGIN SUPERUSER; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
         ALTER ROLE weir_timeouts PASSWORD 'weir-timeouts'; \
         ALTER ROLE weir_timeouts SET statement_timeout = '1s'",
    )
    .await
    .expect("a role with a statement timeout");
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("password");
    std::fs::write(&file, "weir-timeouts").expect("password file");
    let source = pg_source(
        &env_or("WEIR_TEST_PG_PORT", "5432"),
        "weir_timeouts",
        &format!("password_file = \"{}\"", file.display()),
    );
    let ctx = Ctx::with_source(Engine::Postgres, CONFIG, &source).await;
    let t = ctx.table("slow_snapshot").await;
    // More than socket buffers hold, so that the statement waits for the reader.
    ctx.sql(&format!(
        "INSERT INTO {t} SELECT g, repeat('x', 2000), g FROM generate_series(1, 20000) g"
    ))
    .await;
    let sub = ctx.name("slow_snapshot");
    let mut start = ctx.start(&[&t], &sub);
    start.snapshot = true;
    let mut watch = ctx.watch(start).await;
    let first = read_changes(&mut watch, 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rest = read_changes(&mut watch, 19_999).await;
    assert_eq!(changes(&first).len() + changes(&rest).len(), 20_000);
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

macro_rules! suite {
    ($module:ident, $engine:expr $(, #[$attr:meta])?) => {
        mod $module {
            use super::*;
            #[tokio::test]
            $(#[$attr])?
            async fn inserts_updates_deletes_and_transactions_arrive_in_commit_order() {
                super::inserts_updates_deletes_and_transactions_arrive_in_commit_order($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_consumer_resumed_inside_a_transaction_can_acknowledge_and_resume_from_every_position() {
                super::a_consumer_resumed_inside_a_transaction_can_acknowledge_and_resume_from_every_position($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_table_taken_out_of_a_subscription_is_not_streamed_again() {
                super::a_table_taken_out_of_a_subscription_is_not_streamed_again($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_table_taken_out_and_put_back_misses_none_of_its_changes() {
                super::a_table_taken_out_and_put_back_misses_none_of_its_changes($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_consumer_resumed_from_its_last_ack_gets_every_later_change_once() {
                super::a_consumer_resumed_from_its_last_ack_gets_every_later_change_once($engine).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])?
            async fn a_snapshot_then_stream_misses_and_doubles_nothing() {
                super::a_snapshot_then_stream_misses_and_doubles_nothing($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn one_consumer_per_subscription_unless_taken_over() {
                super::one_consumer_per_subscription_unless_taken_over($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn heartbeats_advance_a_quiet_subscription() {
                super::heartbeats_advance_a_quiet_subscription($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn deleting_a_subscription_releases_the_engine_state() {
                super::deleting_a_subscription_releases_the_engine_state($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn a_lost_database_session_ends_the_stream_and_a_resume_loses_nothing() {
                super::a_lost_database_session_ends_the_stream_and_a_resume_loses_nothing($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn limits_and_silent_callers_get_clear_errors() {
                super::limits_and_silent_callers_get_clear_errors($engine).await
            }
            #[tokio::test]
            $(#[$attr])?
            async fn bad_requests_get_clear_errors() {
                super::bad_requests_get_clear_errors($engine).await
            }
        }
    };
}

suite!(postgres_changes, Engine::Postgres);
suite!(mysql_changes, Engine::Mysql);
suite!(mssql_changes, Engine::Mssql, #[ignore = "needs a SQL Server with CDC: set WEIR_TEST_MSSQL_URL and run with --include-ignored"]);

#[tokio::test]
async fn a_postgres_change_stream_reads_over_tls_when_the_source_asks_for_it() {
    let source = postgres("cs", "db", "tls = true\ntrust_server_certificate = true\n");
    let ctx = Ctx::with_source(Engine::Postgres, CONFIG, &source).await;
    let t = ctx.table("sealed").await;
    let sub = ctx.name("sealed");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (1, 'a', 1)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), 1);
    // The replication session reading the slot is the one encrypted.
    let id = weir_server::service::changes::subscription_id("cs", &sub);
    let encrypted: bool = pg_direct()
        .await
        .query_one(
            "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = $1",
            &[&id],
        )
        .await
        .expect("the slot is read by a session")
        .get(0);
    assert!(encrypted, "the replication session is in TLS");
    drop(watch);
    ctx.finish(&[&sub], &[&t]).await;
}

/// Runs each statement on one direct MariaDB session.
async fn mysql_run(my: &mut mysql_async::Conn, statements: &[String]) {
    use mysql_async::prelude::Queryable;
    for sql in statements {
        my.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// XA START, one insert, XA END and XA PREPARE of `xid`.
fn xa_prepared(t: &str, xid: &str, id: i64) -> Vec<String> {
    vec![
        format!("XA START '{xid}'"),
        format!("INSERT INTO {t} VALUES ({id}, 'xa', 1)"),
        format!("XA END '{xid}'"),
        format!("XA PREPARE '{xid}'"),
    ]
}

/// An XA transaction's changes are logged at its prepare, and it commits
/// or rolls back later: its changes arrive at its XA COMMIT (after what
/// committed in between), none after an XA ROLLBACK, and a one-phase XA
/// commit is a transaction like any. MariaDB failed the whole stream at the
/// first prepared XA transaction (error 1236, for any table), for good.
#[tokio::test]
async fn mysql_xa_transactions_arrive_at_their_commit_and_not_after_a_rollback() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.table("xa").await;
    let sub = ctx.name("xa");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    let (mut a, mut b) = (common::mysql_direct().await, common::mysql_direct().await);
    let tag = ctx.tag.clone();
    let plain = ctx.name("xa_myisam");
    ctx.sql(&format!("CREATE TABLE {plain} (id INT PRIMARY KEY) ENGINE = MyISAM"))
        .await;
    mysql_run(&mut a, &xa_prepared(&t, &format!("c{tag}"), 1)).await;
    mysql_run(&mut b, &xa_prepared(&t, &format!("r{tag}"), 2)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (3, 'plain', 1)")).await;
    mysql_run(&mut b, &[format!("XA ROLLBACK 'r{tag}'")]).await;
    // A group the binlog ends with ROLLBACK, not a commit (a session
    // logging statements; its MyISAM write is kept): the XA COMMIT after it
    // must still be read as one.
    mysql_run(
        &mut b,
        &[
            "SET SESSION binlog_format = 'STATEMENT'".into(),
            "BEGIN".into(),
            format!("INSERT INTO {t} VALUES (9, 'rolled back', 1)"),
            format!("INSERT INTO {plain} VALUES (1)"),
            "ROLLBACK".into(),
            "SET SESSION binlog_format = 'ROW'".into(),
        ],
    )
    .await;
    mysql_run(&mut a, &[format!("XA COMMIT 'c{tag}'")]).await;
    let mut one_phase = xa_prepared(&t, &format!("o{tag}"), 4);
    one_phase.truncate(3);
    one_phase.push(format!("XA COMMIT 'o{tag}' ONE PHASE"));
    mysql_run(&mut a, &one_phase).await;
    let messages = read_changes(&mut watch, 3).await;
    let got: Vec<_> = changes(&messages).iter().map(|c| id_of(c)).collect();
    assert_eq!(got, [3, 1, 4], "in commit order, without the rolled-back inserts");
    // Each arrives inside its own Begin and Commit, at positions that never go back.
    let boundaries: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Transaction(b) => Some(b.begin),
            _ => None,
        })
        .collect();
    assert_eq!(boundaries, [true, false, true, false, true], "{messages:?}");
    let positions: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Transaction(b) => Some(b.position.clone()),
            Message::Change(c) => Some(c.position.clone()),
            _ => None,
        })
        .collect();
    assert!(
        positions.windows(2).all(|p| p[0] <= p[1]),
        "positions go back: {messages:?}"
    );
    ctx.sql(&format!("INSERT INTO {t} VALUES (5, 'after', 1)")).await;
    assert_eq!(id_of(changes(&read_changes(&mut watch, 1).await)[0]), 5);
    drop((watch, a, b));
    ctx.finish(&[&sub], &[&t, &plain]).await;
}

/// An XA transaction's changes are decoded when its prepare is read, but a
/// change that does not decode (logged after a column was added to the
/// watched table) fails the stream only if it is delivered: rolled back, it
/// stops nothing; committed, the stream ends at its commit with the
/// column-change error, as a plain transaction's would.
#[tokio::test]
async fn mysql_an_xa_change_that_does_not_decode_fails_only_if_committed() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let (t, other) = (ctx.table("xabad").await, ctx.table("xabad_other").await);
    let sub = ctx.name("xabad");
    let mut watch = ctx.watch(ctx.start(&[&t, &other], &sub)).await;
    ctx.sql(&format!("ALTER TABLE {t} ADD COLUMN extra INT")).await;
    let mut a = common::mysql_direct().await;
    let insert = |id: i64| format!("INSERT INTO {t} VALUES ({id}, 'xa', 1, 7)");
    let xa = |xid: &str, id: i64, decision: &str| {
        vec![
            format!("XA START '{xid}'"),
            insert(id),
            format!("XA END '{xid}'"),
            format!("XA PREPARE '{xid}'"),
            format!("XA {decision} '{xid}'"),
        ]
    };
    mysql_run(&mut a, &xa(&format!("r{}", ctx.tag), 1, "ROLLBACK")).await;
    ctx.sql(&format!("INSERT INTO {other} VALUES (2, 'after', 1)")).await;
    let got = changes(&read_changes(&mut watch, 1).await)
        .iter()
        .map(|c| (c.table.clone(), id_of(c)))
        .collect::<Vec<_>>();
    assert_eq!(got, [(other.clone(), 2)], "the rolled-back change stopped nothing");
    mysql_run(&mut a, &xa(&format!("c{}", ctx.tag), 3, "COMMIT")).await;
    let e = stream_error(&mut watch).await;
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "CHANGE_STREAMS_NOT_READY"),
        "{e:?}"
    );
    assert!(e.message().contains("restart the stream"), "{e:?}");
    drop((watch, a));
    ctx.finish(&[&sub], &[&t, &other]).await;
}

/// A position acknowledged while an XA transaction waits between its
/// prepare and its commit still leads to that transaction's changes: a
/// resume from it (given, or the stored one) reads again from the prepare,
/// also from an older binlog file. Resumed inside its delivery, nothing of
/// it comes again but its boundaries; resumed at its Commit, nothing.
#[tokio::test]
async fn mysql_a_resume_past_an_xa_prepare_still_gets_its_commit() {
    let ctx = Ctx::new(Engine::Mysql).await;
    let t = ctx.table("xaresume").await;
    let sub = ctx.name("xaresume");
    let mut watch = ctx.watch(ctx.start(&[&t], &sub)).await;
    let mut a = common::mysql_direct().await;
    let xid = format!("w{}", ctx.tag);
    mysql_run(&mut a, &xa_prepared(&t, &xid, 1)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (2, 'plain', 1)")).await;
    let messages = read_changes(&mut watch, 1).await;
    assert_eq!(id_of(changes(&messages)[0]), 2);
    let commit = next_commit(&mut watch).await;
    watch.ack(commit.clone()).await.expect("ack");
    watch.finish().await.expect("the acknowledgement reaches the server");
    // Its commit in a later binlog file than its prepare.
    mysql_run(&mut common::mysql_direct().await, &["FLUSH BINARY LOGS".into()]).await;
    mysql_run(&mut a, &[format!("XA COMMIT '{xid}'")]).await;
    let from = |position: &[u8]| {
        let mut start = ctx.start(&[&t], &sub);
        start.resume_position = position.to_vec();
        start
    };
    let mut delivered = None;
    for (how, start) in [("given", from(&commit)), ("stored", ctx.start(&[&t], &sub))] {
        let mut resumed = ctx.watch(start).await;
        let messages = read_changes(&mut resumed, 1).await;
        assert_eq!(id_of(changes(&messages)[0]), 1, "resumed from the {how} position");
        delivered = Some(changes(&messages)[0].position.clone());
        drop(resumed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let change = delivered.expect("the XA transaction's change");
    let mut at_change = ctx.watch(from(&change)).await;
    let mut boundaries = Vec::new();
    let end = loop {
        match next_message(&mut at_change).await {
            Message::Transaction(b) if b.begin => boundaries.push(true),
            Message::Transaction(b) => break b.position,
            Message::Heartbeat(_) => {}
            other => panic!("only the boundaries of the XA transaction come again, got {other:?}"),
        }
    };
    assert_eq!(boundaries, [true]);
    drop(at_change);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut at_commit = ctx.watch(from(&end)).await;
    ctx.sql(&format!("INSERT INTO {t} VALUES (3, 'after', 1)")).await;
    assert_eq!(
        id_of(changes(&read_changes(&mut at_commit, 1).await)[0]),
        3,
        "nothing of it again"
    );
    drop((at_commit, a));
    ctx.finish(&[&sub], &[&t]).await;
}

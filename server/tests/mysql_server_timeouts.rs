//! MySQL/MariaDB streams (of changes, of query results) against the
//! server's own session timeouts.
//! Alone in their binary: they change the server's global settings, which
//! every session opened meanwhile takes (cargo runs test binaries one after
//! another, so no other test's sessions are opened then).

mod common;

use std::time::Duration;

use common::*;
use mysql_async::prelude::Queryable;
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::watch_changes_response::Message;
use weir_client::ChangeWatch;

const WAIT: Duration = Duration::from_secs(20);

/// One test at a time: each sets a global the other's sessions would take.
static GLOBALS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Sets global `variable` to `value` around `opening` (which opens the
/// sessions meant to take it), then back.
async fn with_global<T>(variable: &str, value: u64, opening: impl std::future::Future<Output = T>) -> T {
    let mut direct = mysql_direct().await;
    let default: u64 = direct
        .query_first(format!("SELECT @@GLOBAL.{variable}"))
        .await
        .expect("the global")
        .expect("a value");
    direct
        .query_drop(format!("SET GLOBAL {variable} = {value}"))
        .await
        .expect("set the global");
    let opened = opening.await;
    direct
        .query_drop(format!("SET GLOBAL {variable} = {default}"))
        .await
        .expect("the global restored");
    opened
}

/// Deletes `subscription` once its stream has let it go.
async fn delete_subscription(client: &weir_client::WeirClient, subscription: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let deleted = client
            .stream()
            .delete_subscription(pb::DeleteSubscriptionRequest {
                source: "db".into(),
                subscription: subscription.into(),
            })
            .await;
        match deleted {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("never deleted: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn watch_server() -> TestServer {
    let config = format!(
        "[changes]\npoll_interval = \"20ms\"\nheartbeat_interval = \"300ms\"\n{}",
        tenant("w", "", &mysql("w", "db", ""))
    );
    TestServer::start(&config).await
}

fn unique(base: &str) -> String {
    format!("{base}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// The position of the change event for row `id`, reading past others.
async fn change_of(watch: &mut ChangeWatch, id: i64) -> Vec<u8> {
    tokio::time::timeout(WAIT, async {
        loop {
            let message = watch
                .next()
                .await
                .expect("the stream stays healthy")
                .expect("the stream stays open")
                .message;
            if let Some(Message::Change(c)) = message {
                if c.after.as_ref().is_some_and(|r| int(&r.values[0]) == id) {
                    return c.position;
                }
            }
        }
    })
    .await
    .expect("the change within the wait")
}

fn start(table: &str, subscription: &str) -> pb::WatchStart {
    pb::WatchStart {
        source: "db".into(),
        tables: vec![pb::TableRef {
            schema: String::new(),
            table: table.into(),
        }],
        subscription: subscription.into(),
        ..Default::default()
    }
}

/// A stream of `table` (made again with `columns`) whose sessions opened
/// while the server's global `variable` was 2, with what reaches it.
struct Watching {
    table: String,
    direct: mysql_async::Conn,
    server: TestServer,
    client: weir_client::WeirClient,
    watch: ChangeWatch,
    subscription: String,
}

impl Watching {
    /// Lets go of the stream, its subscription and its table; stops the server.
    async fn end(mut self) {
        drop(self.watch);
        delete_subscription(&self.client, &self.subscription).await;
        self.direct
            .query_drop(format!("DROP TABLE {}", self.table))
            .await
            .expect("drop");
        self.server.stop().await;
    }
}

async fn watching_with(table: &str, columns: &str, variable: &str) -> Watching {
    let mut direct = mysql_direct().await;
    let subscription = unique(table);
    direct
        .query_drop(format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} ({columns})"
        ))
        .await
        .expect("table");
    let server = watch_server().await;
    let client = server.client("key-w").await;
    let watched = with_global(variable, 2, client.watch(start(table, &subscription))).await;
    let watch = watched.expect("WatchChanges starts");
    Watching {
        table: table.to_string(),
        direct,
        server,
        client,
        watch,
        subscription,
    }
}

/// The session that stores a stream's acknowledgements sits idle while no
/// acknowledgement moves (a quiet source), and the server closes it after
/// its `wait_timeout`: the next acknowledgement is stored on a new session,
/// not the stream ended with UNAVAILABLE (and the change sent again on the
/// next watch).
#[tokio::test]
async fn acknowledgements_are_stored_after_the_servers_wait_timeout() {
    let _alone = GLOBALS.lock().await;
    let table = "weir_idle_writer";
    let mut w = watching_with(table, "id INT PRIMARY KEY", "wait_timeout").await;
    // Past the stream's sessions' wait_timeout, with nothing to store.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    w.direct
        .query_drop(format!("INSERT INTO {table} VALUES (1)"))
        .await
        .expect("insert");
    let position = change_of(&mut w.watch, 1).await;
    w.watch.ack(position).await.expect("ack");
    w.watch.finish().await.expect("the acknowledgement is stored");
    // Resumed from what was stored: the acknowledged change does not come again.
    w.direct
        .query_drop(format!("INSERT INTO {table} VALUES (2)"))
        .await
        .expect("insert");
    w.watch = w
        .client
        .watch(start(table, &w.subscription))
        .await
        .expect("watch again");
    let first = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Message::Change(c)) = w.watch.next().await.expect("healthy").expect("open").message {
                return c.after.map(|r| int(&r.values[0]));
            }
        }
    })
    .await
    .expect("a change");
    assert_eq!(first, Some(2), "the acknowledged change came again");
    w.end().await;
}

/// A client that reads slowly (its tenant's rate, a pause) behind a large
/// transaction leaves the server's log writer waiting on a full socket:
/// past the server's `net_write_timeout` the server closed the stream's
/// session, and the stream ended with UNAVAILABLE.
#[tokio::test]
async fn a_slow_reader_outlasts_the_servers_net_write_timeout() {
    let _alone = GLOBALS.lock().await;
    let table = "weir_slow_reader";
    let mut w = watching_with(table, "id INT PRIMARY KEY, v TEXT", "net_write_timeout").await;
    // More than the stream's buffers and the sockets' hold: 40 MB.
    w.direct
        .query_drop(format!(
            "INSERT INTO {table} SELECT seq, REPEAT('x', 2000) FROM seq_1_to_20000"
        ))
        .await
        .expect("a large transaction");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut changes = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while changes < 20_000 {
            let message = w
                .watch
                .next()
                .await
                .expect("the stream stays healthy")
                .expect("open")
                .message;
            changes += usize::from(matches!(message, Some(Message::Change(_))));
        }
    })
    .await
    .expect("every change");
    w.end().await;
}

/// A query stream whose client pauses leaves the server waiting on a full
/// socket too: past its `net_write_timeout` the server closed the pooled
/// session, and the stream ended with UNAVAILABLE (inside a transaction,
/// the transaction was lost), where Weir's own `stream_idle_timeout` is the
/// limit on a client that stops reading.
#[tokio::test]
async fn a_paused_query_stream_outlasts_the_servers_net_write_timeout() {
    let _alone = GLOBALS.lock().await;
    let server = watch_server().await;
    let client = server.client("key-w").await;
    // More than the stream's buffers and the sockets' hold: 40 MB.
    let sql = "SELECT seq, REPEAT('x', 2000) AS v FROM seq_1_to_20000";
    let (mut stream, first) = with_global("net_write_timeout", 2, async {
        let mut stream = client
            .execute_stream("db", sql, vec![])
            .await
            .expect("the stream starts");
        let first = stream.next_batch().await.expect("a first batch").expect("rows").len();
        (stream, first)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rows = tokio::time::timeout(Duration::from_secs(60), async {
        let mut rows = first;
        while let Some(batch) = stream.next_batch().await.expect("the stream stays healthy") {
            rows += batch.len();
        }
        rows
    })
    .await
    .expect("every row");
    assert_eq!(rows, 20_000);
    assert!(stream.stats().is_some());
    server.stop().await;
}

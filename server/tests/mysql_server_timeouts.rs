//! MySQL/MariaDB change streams against the server's own session timeouts.
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

/// The session that stores a stream's acknowledgements sits idle while no
/// acknowledgement moves (a quiet source), and the server closes it after
/// its `wait_timeout`: the next acknowledgement is stored on a new session,
/// not the stream ended with UNAVAILABLE (and the change sent again on the
/// next watch).
#[tokio::test]
async fn acknowledgements_are_stored_after_the_servers_wait_timeout() {
    let mut direct = mysql_direct().await;
    let table = "weir_idle_writer";
    let subscription = format!("idle_writer_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    direct
        .query_drop(format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id INT PRIMARY KEY)"
        ))
        .await
        .expect("table");
    let config = format!(
        "[changes]\npoll_interval = \"20ms\"\nheartbeat_interval = \"300ms\"\n{}",
        tenant("w", "", &mysql("w", "db", ""))
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-w").await;
    let default: u64 = direct
        .query_first("SELECT @@GLOBAL.wait_timeout")
        .await
        .expect("wait_timeout")
        .expect("a value");
    direct
        .query_drop("SET GLOBAL wait_timeout = 2")
        .await
        .expect("a short wait_timeout");
    let watched = client.watch(start(table, &subscription)).await;
    direct
        .query_drop(format!("SET GLOBAL wait_timeout = {default}"))
        .await
        .expect("wait_timeout restored");
    let mut watch = watched.expect("WatchChanges starts");
    // Past the stream's sessions' wait_timeout, with nothing to store.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    direct
        .query_drop(format!("INSERT INTO {table} VALUES (1)"))
        .await
        .expect("insert");
    let position = change_of(&mut watch, 1).await;
    watch.ack(position).await.expect("ack");
    watch.finish().await.expect("the acknowledgement is stored");
    // Resumed from what was stored: the acknowledged change does not come again.
    direct
        .query_drop(format!("INSERT INTO {table} VALUES (2)"))
        .await
        .expect("insert");
    let mut watch = client.watch(start(table, &subscription)).await.expect("watch again");
    let first = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Message::Change(c)) = watch.next().await.expect("healthy").expect("open").message {
                return c.after.map(|r| int(&r.values[0]));
            }
        }
    })
    .await
    .expect("a change");
    assert_eq!(first, Some(2), "the acknowledged change came again");
    drop(watch);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let deleted = client
            .stream()
            .delete_subscription(pb::DeleteSubscriptionRequest {
                source: "db".into(),
                subscription: subscription.clone(),
            })
            .await;
        match deleted {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("never deleted: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    direct.query_drop(format!("DROP TABLE {table}")).await.expect("drop");
    server.stop().await;
}

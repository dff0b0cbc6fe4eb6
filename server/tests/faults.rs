//! Faults, with real servers: PostgreSQL and MariaDB stopped and started
//! under the gateway (the second, "plain" servers that `./scripts/test`
//! starts, so no other test loses its database), a source that is down at
//! start-up, thousands of cancelled calls, and a client that stops reading.
//! The gateway is never restarted: it must recover by itself.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{http_get, plain_mysql, plain_postgres, reason, sqlite_demo, tenant, TestServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

/// One fault at a time: the tests stop shared servers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn services(command: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    // -e: a step that fails (a server that did not start) fails the call.
    let status = Command::new("bash")
        .arg("-ec")
        .arg(format!(". {script}; {command}"))
        .status()
        .expect("run scripts/services.sh");
    assert!(status.success(), "{command} failed");
}

fn stop(engine: &str) {
    services(&format!("stop_plain_server {engine}"));
}

fn start_again() {
    services("ensure_plain_servers");
}

/// Starts the stopped servers again even when a test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        start_again();
    }
}

const FAST: &str = "[server]\nhealth_check_interval = \"200ms\"\n";
const POOL: &str = "required = true\n[POOL]\nmax_size = 4\nacquire_timeout = \"2s\"\nconnect_timeout = \"1s\"\n";

fn pool(tenant: &str, source: &str) -> String {
    POOL.replace("POOL", &format!("tenants.{tenant}.sources.{source}.pool"))
}

/// Retries `sql` until it succeeds, for up to 20 s; returns how long it took.
async fn until_it_serves(client: &WeirClient, source: &str, sql: &str) -> Duration {
    let started = Instant::now();
    loop {
        match client.execute(source, sql, vec![]).await {
            Ok(_) => return started.elapsed(),
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::ResourceExhausted),
                    "while the database comes back: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the source did not come back: {e:?}"),
        }
    }
}

async fn ready(server: &TestServer) -> u16 {
    http_get(&server.metrics_url, "/readyz").await.0
}

/// Waits for `/readyz` to answer `status`.
async fn readiness_becomes(server: &TestServer, status: u16) {
    for _ in 0..100 {
        if ready(server).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz did not become {status}");
}

/// Probes run side by side: Kafka clusters that never answer (a listener
/// that accepts and says nothing; each probe waits out its 6 s) do not hold
/// up readiness, which the required source decides. One after another,
/// five of them took 30 s.
#[tokio::test]
async fn sources_that_never_answer_do_not_hold_up_readiness() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = hole.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let mut sources = sqlite_demo("h", "db") + "required = true\n";
    for i in 0..5 {
        sources += &format!(
            "[tenants.h.sources.k{i}]\nengine = \"kafka\"\nbootstrap_servers = \"{address}\"\ntopics = [\"t\"]\n"
        );
    }
    let server = TestServer::start(&format!("{FAST}{}", tenant("h", "", &sources))).await;
    let started = Instant::now();
    readiness_becomes(&server, 200).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    server.stop().await;
}

/// A required database that refuses new sessions for too many connections
/// (53300) answers: the replica stays ready, as the circuit breaker takes
/// it. Every replica probes the same database, and calling it down took
/// them all out of service at once.
#[tokio::test]
async fn a_database_full_of_connections_is_busy_not_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let full = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = full.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = full.accept().await {
            tokio::spawn(async move {
                // The startup message, then PostgreSQL's refusal.
                let mut startup = [0u8; 1024];
                let _ = socket.read(&mut startup).await;
                let mut fields = Vec::new();
                for (code, text) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', "53300"),
                    (b'M', "sorry, too many clients already"),
                ] {
                    fields.push(code);
                    fields.extend_from_slice(text.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut message = vec![b'E'];
                message.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
                message.extend_from_slice(&fields);
                let _ = socket.write_all(&message).await;
            });
        }
    });
    let source = common::postgres_at("full", "db", &port.to_string(), "required = true\n");
    let server = TestServer::start(&format!("{FAST}{}", tenant("full", "", &source))).await;
    readiness_becomes(&server, 200).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(ready(&server).await, 200, "still ready after more probes");
    let client = server.client("key-full").await;
    let err = client
        .execute("db", "SELECT 1", vec![])
        .await
        .expect_err("no session to be had");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // TestConnection takes it as the probe does: busy, the source still healthy.
    let err = client.test_connection("db").await.expect_err("no session to be had");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let sources = client.list_sources().await.expect("list sources");
    assert!(sources.iter().all(|s| s.healthy), "{sources:?}");
    server.stop().await;
}

/// Reads a stream to its end, which must be an error, not a complete result.
async fn stream_error(stream: &mut weir_client::ResultStream) -> tonic::Status {
    loop {
        match stream.next_batch().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a stream cut short must not end as complete"),
            Err(e) => return e,
        }
    }
}

fn rows(range: std::ops::Range<i64>) -> Vec<pb::Row> {
    range
        .map(|i| pb::Row {
            values: vec![pb::Value {
                kind: Some(pb::value::Kind::Int64Value(i)),
            }],
        })
        .collect()
}

/// A database that stops under the gateway: the stream, the transaction and
/// the load in progress fail with a clear code, nothing partial is
/// committed, other sources go on serving, calls fail fast while it is
/// down, and the gateway serves again by itself once it is back.
/// `after_pool` adds tables of the source after its pool's.
async fn database_restart(engine: &str, section: String, after_pool: &str) {
    let _serial = SERIAL.lock().await;
    let config = format!(
        "{FAST}{}",
        tenant(
            "f",
            "",
            &(section + &pool("f", "db") + after_pool + &sqlite_demo("f", "demo"))
        )
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-f").await;
    let table = format!("fault_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    client
        .execute("db", &format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY)"), vec![])
        .await
        .expect("create");
    client
        .execute("db", &format!("INSERT INTO {table} VALUES (1), (2), (3)"), vec![])
        .await
        .expect("insert");
    readiness_becomes(&server, 200).await;

    let tx = client
        .begin("db", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "db", &format!("INSERT INTO {table} VALUES (4)"), vec![])
        .await
        .expect("insert in the transaction");
    let big = if engine == "pg" {
        "SELECT g FROM generate_series(1, 5000000) g".to_string()
    } else {
        // Rows for a while: a cross join of the catalogue (MariaDB caps recursive CTEs at 1000 rounds).
        "SELECT a.COLUMN_NAME, b.COLUMN_NAME FROM information_schema.COLUMNS a, information_schema.COLUMNS b"
            .to_string()
    };
    let mut stream = client.execute_stream("db", &big, vec![]).await.expect("stream");
    stream.next_batch().await.expect("first batch");
    let (load_tx, load_rx) = tokio::sync::mpsc::channel(1);
    let loader = {
        let client = client.clone();
        let header = pb::LoadHeader {
            source: "db".into(),
            table: table.clone(),
            columns: vec!["id".into()],
            ..Default::default()
        };
        tokio::spawn(async move { client.load(header, ReceiverStream::new(load_rx)).await })
    };
    load_tx.send(rows(100..200)).await.expect("first rows");

    let _restart = Restart;
    stop(engine);

    // The stream in progress ends with UNAVAILABLE.
    let ended = stream_error(&mut stream).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    // The transaction is lost: ABORTED, with a retry delay. mysql_async
    // cannot tell a session gone before COMMIT from one lost after it was
    // sent, so MariaDB's answer is that the outcome is unknown.
    let lost = client.commit(&tx).await.expect_err("the transaction's session is gone");
    if engine == "mysql" {
        assert_eq!(lost.code(), Code::Unknown, "{lost:?}");
        assert_eq!(reason(&lost), "COMMIT_OUTCOME_UNKNOWN");
    } else {
        assert_eq!(lost.code(), Code::Aborted, "{lost:?}");
        assert_eq!(reason(&lost), "TRANSACTION_LOST");
    }
    // The load fails.
    let _ = load_tx.send(rows(200..300)).await;
    drop(load_tx);
    let load = loader.await.expect("load task");
    assert!(load.is_err(), "a load whose database stopped cannot commit: {load:?}");
    // Other sources go on serving; the required source makes the replica unready.
    client
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect("another source serves");
    readiness_becomes(&server, 503).await;
    // Once the source is known to be down, calls fail fast with a retry delay.
    let mut fast = None;
    for _ in 0..20 {
        let started = Instant::now();
        let e = client.execute("db", "SELECT 1", vec![]).await.expect_err("down");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        if reason(&e) == "SOURCE_CIRCUIT_OPEN" {
            use tonic_types::StatusExt;
            assert!(e.get_error_details().retry_info().is_some(), "{e:?}");
            fast = Some(started.elapsed());
            break;
        }
    }
    let fast = fast.expect("the circuit opens after repeated failures");
    // Well under connect_timeout (1 s) and acquire_timeout (2 s).
    assert!(fast < Duration::from_millis(800), "failing fast took {fast:?}");
    // The metric follows the source's health probes, which keep failing:
    // it shows the breaker open (or probing) within a few probe intervals.
    let mut shown = false;
    for _ in 0..100 {
        let (_, metrics) = http_get(&server.metrics_url, "/metrics").await;
        shown = metrics.contains("weir_source_circuit_state{tenant=\"f\",source=\"db\"} 1")
            || metrics.contains("weir_source_circuit_state{tenant=\"f\",source=\"db\"} 2");
        if shown {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shown, "the breaker's state is a metric");

    start_again();
    let back = until_it_serves(&client, "db", "SELECT 1").await;
    eprintln!("{engine}: serving again {back:?} after the database was back");
    readiness_becomes(&server, 200).await;
    // Nothing of the transaction or the load was committed.
    let count = client
        .execute("db", &format!("SELECT COUNT(*) FROM {table}"), vec![])
        .await
        .expect("count");
    assert_eq!(common::int(&count.rows[0].values[0]), 3);
    client
        .execute("db", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("drop");
    server.stop().await;
}

#[tokio::test]
async fn postgres_restart_mid_stream_transaction_and_load() {
    database_restart("pg", plain_postgres("f", "db", ""), "").await;
}

/// The same with plain reads on a shared, pipelined connection: lost with
/// the server, failing fast while it is down, and opened again after.
#[tokio::test]
async fn postgres_restart_with_multiplexed_reads() {
    let multiplex = "[tenants.f.sources.db.multiplex]\nconnections = 1\n";
    database_restart("pg", plain_postgres("f", "db", ""), multiplex).await;
}

#[tokio::test]
async fn mariadb_restart_mid_stream_transaction_and_load() {
    database_restart("mysql", plain_mysql("f", "db", ""), "").await;
}

#[tokio::test]
async fn a_source_down_at_start_does_not_stop_the_gateway_and_recovers() {
    let _serial = SERIAL.lock().await;
    let _restart = Restart;
    stop("pg");
    let section = plain_postgres("s", "db", "") + &pool("s", "db") + &sqlite_demo("s", "demo");
    let server = TestServer::start(&format!("{FAST}{}", tenant("s", "", &section))).await;
    let client = server.client("key-s").await;
    client
        .execute("demo", "SELECT 1", vec![])
        .await
        .expect("the other source serves");
    let e = client.execute("db", "SELECT 1", vec![]).await.expect_err("down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    readiness_becomes(&server, 503).await;
    let sources = client.list_sources().await.expect("list");
    let db = sources.iter().find(|s| s.name == "db").expect("db listed");
    assert!(!db.healthy);
    start_again();
    until_it_serves(&client, "db", "SELECT 1").await;
    readiness_becomes(&server, 200).await;
    server.stop().await;
}

/// Cancelled calls, expired deadlines and abandoned streams return their
/// connections: after two thousand of them the pool is idle, no statement is
/// left running, and the source still serves.
#[tokio::test]
async fn thousands_of_cancelled_calls_leak_no_connection() {
    let section =
        common::postgres("l", "db", "") + "[tenants.l.sources.db.pool]\nmax_size = 16\nacquire_timeout = \"5s\"\n";
    let limits =
        "requests_per_second = 100000\nburst = 100000\nmax_concurrent_requests = 512\nmax_concurrent_streams = 512";
    let server = TestServer::start(&format!("{FAST}{}", tenant("l", limits, &section))).await;
    let client = server.client("key-l").await;
    let marker = format!("leak_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // Both run far longer than the test waits for them to be gone: only a
    // cancel ends them. (A set-returning function in the select list
    // streams its rows; in FROM it would be materialized first.)
    let sql = format!("SELECT pg_sleep(60), '{marker}'");
    let stream_sql = format!("SELECT generate_series(1, 2000000000), '{marker}'");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let client = client.clone();
        let (sql, stream_sql) = (sql.clone(), stream_sql.clone());
        tasks.spawn(async move {
            match i % 3 {
                // The client gives up: the call is cancelled mid-statement.
                0 => {
                    let _ = tokio::time::timeout(Duration::from_millis(20), client.execute("db", &sql, vec![])).await;
                }
                // A gRPC deadline the server enforces.
                1 => {
                    let mut request = tonic::Request::new(pb::ExecuteRequest {
                        source: "db".into(),
                        sql,
                        ..Default::default()
                    });
                    request.set_timeout(Duration::from_millis(30));
                    let _ = client.query().execute(request).await;
                }
                // A stream dropped after its first batch.
                _ => {
                    if let Ok(mut s) = client.execute_stream("db", &stream_sql, vec![]).await {
                        let _ = s.next_batch().await;
                    }
                }
            }
        });
        while tasks.len() >= 100 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    eprintln!("2000 abandoned calls in {:?}", started.elapsed());
    let pg = common::pg_direct().await;
    assert!(
        common::wait_until_gone(&pg, &marker, Duration::from_secs(10)).await,
        "every abandoned statement was cancelled in the database"
    );
    // The pool has all its connections back: sixteen calls hold one each at once.
    common::assert_pool_holds(&client, "db", 16).await;
    // This test's sessions: each last ran one of its marked statements (other
    // tests running beside it have sessions of their own).
    let open: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' AND query LIKE $1",
            &[&format!("%{marker}%")],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert!(open <= 16, "no more connections than the pool's size: {open}");
    server.stop().await;
}

/// A client that stops reading a large stream: the server stops the stream
/// after `stream_idle_timeout`, cancels the statement, and says why.
#[tokio::test]
async fn a_stalled_stream_is_ended_and_its_statement_cancelled() {
    let section = common::postgres("z", "db", "");
    let config = format!(
        "[server]\nstream_idle_timeout = \"500ms\"\n{}",
        tenant(
            "z",
            "statement_timeout = \"60s\"\nmax_concurrent_requests = 1",
            &section
        )
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-z").await;
    let marker = format!("stall_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut stream = client
        .execute_stream(
            "db",
            &format!("SELECT g, repeat('x', 200) AS pad, '{marker}' FROM generate_series(1, 20000000) g"),
            vec![],
        )
        .await
        .expect("stream");
    stream.next_batch().await.expect("first batch");
    // Stop reading. The server's buffers and the HTTP/2 window fill, then it waits 500 ms.
    let pg = common::pg_direct().await;
    assert!(
        common::wait_until_gone(&pg, &marker, Duration::from_secs(10)).await,
        "the stalled stream's statement was cancelled"
    );
    // Nor does it keep its tenant's one slot while its response stays open
    // (another connection: this one's window is full).
    let other = server.client("key-z").await;
    other
        .execute("db", "SELECT 1", vec![])
        .await
        .expect("the stalled stream's slot is free");
    // What the client reads after the stall is what was already on its way
    // (its HTTP/2 window, a message in the server's send buffer), not the
    // server's buffer of messages: that was dropped at the stall, as the
    // client might never read it.
    let mut after = 0usize;
    let ended = loop {
        match stream.next_batch().await {
            Ok(Some(batch)) => after += batch.len(),
            Ok(None) => panic!("a stream cut short must not end as complete"),
            Err(e) => break e,
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert_eq!(reason(&ended), "STREAM_STALLED");
    // The Weir client's 2 MiB stream window holds about 9,700 of these rows
    // (batches of 1,000), the server's send buffer one batch more; the four
    // batches of the server's own buffer would add 4,000 (14,000 measured).
    assert!(after <= 12_000, "{after} rows read after the stall");
    server.stop().await;
}

/// A stream whose statement is over but whose last rows still wait in the
/// server's buffer for a client that does not read keeps its tenant's slot
/// until they leave: freed at once, a tenant could hold any number of such
/// buffers (megabytes each) within `max_concurrent_requests = 1`.
#[tokio::test]
async fn a_finished_stream_holds_its_slot_until_its_rows_leave_the_buffer() {
    let section = common::postgres("z", "db", "");
    let config = format!(
        "[server]\nstream_idle_timeout = \"30s\"\n{}",
        tenant("z", "max_concurrent_requests = 1", &section)
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-z").await;
    let marker = format!("drain_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // About 2.5 MB: more than the client's 2 MiB window, less than the
    // window and the server's buffers together, so the statement ends.
    let mut stream = client
        .execute_stream(
            "db",
            &format!("SELECT g, repeat('x', 200) AS pad, '{marker}' FROM generate_series(1, 12000) g"),
            vec![],
        )
        .await
        .expect("stream");
    let mut read = stream.next_batch().await.expect("first batch").map_or(0, |b| b.len());
    let pg = common::pg_direct().await;
    assert!(
        common::wait_until_gone(&pg, &marker, Duration::from_secs(10)).await,
        "the statement is over"
    );
    let other = server.client("key-z").await;
    let err = other
        .execute("db", "SELECT 1", vec![])
        .await
        .expect_err("the slot is held while rows wait in the buffer");
    assert_eq!(reason(&err), "CONCURRENCY_LIMITED", "{err:?}");
    while let Some(batch) = stream.next_batch().await.expect("the rest") {
        read += batch.len();
    }
    assert_eq!(read, 12_000);
    let started = std::time::Instant::now();
    while other.execute("db", "SELECT 1", vec![]).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slot came back once the rows left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// The gateway's Kafka source on librdkafka's mock cluster, whose broker
/// can be taken down and brought back.
mod kafka_broker {
    use rdkafka::mocking::MockCluster;

    use super::*;

    async fn produce(client: &WeirClient, values: &[&str]) -> Result<pb::ProduceResponse, tonic::Status> {
        let request = pb::ProduceRequest {
            source: "events".into(),
            topic: "loss.events".into(),
            records: values
                .iter()
                .map(|v| pb::ProducerRecord {
                    value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
            options: None,
        };
        Ok(client.stream().produce(request).await?.into_inner())
    }

    /// Reads `n` records of group `g` from its committed offsets (committing them).
    async fn consume(client: &WeirClient, n: u64) -> Vec<String> {
        let request = pb::ConsumeRequest {
            source: "events".into(),
            topics: vec!["loss.events".into()],
            group: "g".into(),
            start: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Earliest(true)),
            }),
            max_records: n,
            ..Default::default()
        };
        let mut stream = client.stream().consume(request).await.expect("consume").into_inner();
        let mut values = Vec::new();
        while let Some(batch) = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("records within 30 s")
            .expect("consume stream")
        {
            values.extend(
                batch
                    .records
                    .into_iter()
                    .map(|r| String::from_utf8_lossy(&r.value).into_owned()),
            );
        }
        values
    }

    #[tokio::test]
    async fn broker_loss_fails_only_unacknowledged_records_and_consumers_resume() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("loss.events", 1, 1).expect("topic");
        let source = format!(
            "[tenants.k.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\ntopic_prefix = \"loss.\"\n\
             [tenants.k.sources.events.kafka_options]\n\"message.timeout.ms\" = \"2000\"\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
            cluster.bootstrap_servers()
        );
        let server = TestServer::start(&tenant("k", "", &source)).await;
        let client = server.client("key-k").await;
        let acked = produce(&client, &["a1", "a2", "a3"]).await.expect("acknowledged");
        assert_eq!(acked.acks.len(), 3);
        assert_eq!(consume(&client, 3).await, vec!["a1", "a2", "a3"]);

        cluster.broker_down(1).expect("broker down");
        let e = produce(&client, &["b1", "b2"]).await.expect_err("no broker");
        assert!(matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded), "{e:?}");
        {
            use tonic_types::StatusExt;
            let info = e.get_error_details().error_info().cloned().expect("error info");
            // Timed out waiting for the broker: librdkafka cannot tell a
            // record never sent from one whose answer was lost.
            assert_eq!(
                info.metadata.get("unknown_records").map(String::as_str),
                Some("0,1"),
                "{e:?}"
            );
            assert_eq!(
                info.metadata.get("failed_records").map(String::as_str),
                Some(""),
                "{e:?}"
            );
            assert_eq!(
                info.metadata.get("acknowledged_records").map(String::as_str),
                Some(""),
                "{e:?}"
            );
        }

        cluster.broker_up(1).expect("broker up");
        let started = Instant::now();
        loop {
            match produce(&client, &["c1", "c2"]).await {
                Ok(r) => {
                    assert_eq!(r.acks.len(), 2);
                    break;
                }
                Err(e) if started.elapsed() < Duration::from_secs(20) => {
                    assert!(matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded), "{e:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the broker came back but produce still fails: {e:?}"),
            }
        }
        // The group resumes after what it committed; the records whose
        // answer timed out were not written here (the broker was down).
        let after = consume(&client, 2).await;
        assert!(
            after.len() == 2 && after.iter().all(|v| v.starts_with('c')),
            "resumed from the committed offset, without the timed-out records: {after:?}"
        );
        server.stop().await;
    }
}

/// A required source whose every connection is in use is busy, not down: the
/// replica stays ready, so a loaded gateway is not taken out of service.
/// MySQL's pool does not tell how many connections are in use, so its probe
/// learns it from the acquire timeout.
#[tokio::test]
async fn a_busy_required_source_keeps_the_replica_ready() {
    let one = |source: &str| {
        format!("required = true\n[tenants.b.sources.{source}.pool]\nmax_size = 1\nacquire_timeout = \"500ms\"\n")
    };
    let config = format!(
        "{FAST}{}",
        tenant(
            "b",
            "",
            &(common::postgres("b", "pg", &one("pg")) + &common::mysql("b", "my", &one("my")))
        )
    );
    let server = TestServer::start(&config).await;
    let client = server.client("key-b").await;
    readiness_becomes(&server, 200).await;
    let pg = client
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin pg");
    let my = client
        .begin("my", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin my");
    // Several probes, each of which would wait out the acquire timeout.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(ready(&server).await, 200, "a busy source is not a down one");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = http_get(&server.metrics_url, "/metrics").await;
    for source in ["pg", "my"] {
        assert_eq!(
            common::sample(&metrics, "weir_source_up", &[("tenant", "b"), ("source", source)]),
            1.0,
            "{source}"
        );
    }
    // The breaker never saw a failure: calls wait for the pool as before.
    let busy = client
        .execute("pg", "SELECT 1", vec![])
        .await
        .expect_err("the pool is busy");
    assert_eq!(reason(&busy), "POOL_EXHAUSTED", "{busy:?}");
    // Nor does a TestConnection that finds the pool busy call the source down.
    let tested = client.test_connection("pg").await.expect_err("the pool is busy");
    assert_eq!(reason(&tested), "POOL_EXHAUSTED", "{tested:?}");
    let sources = client.list_sources().await.expect("list sources");
    assert!(sources.iter().all(|s| s.healthy), "{sources:?}");
    client.rollback(&pg).await.expect("rollback pg");
    client.rollback(&my).await.expect("rollback my");
    client.execute("my", "SELECT 1", vec![]).await.expect("serves again");
}

/// A server that takes connections and then never answers (a stalled disk,
/// a proxy whose database is gone) is down, not busy: calls get UNAVAILABLE
/// within `connect_timeout` and the breaker opens, instead of every caller
/// waiting out the acquire timeout for POOL_EXHAUSTED. Until the first probe
/// has answered, the server is not SERVING, not even under the name "".
#[tokio::test]
async fn a_server_that_never_answers_is_down_not_busy() {
    let proxy = common::Proxy::start(common::pg_address()).await;
    proxy.freeze(true);
    let source = common::postgres_at(
        "s",
        "pg",
        &proxy.port.to_string(),
        "required = true\n[tenants.s.sources.pg.pool]\nconnect_timeout = \"500ms\"\nacquire_timeout = \"3s\"\n",
    );
    let server = TestServer::start(&format!("{FAST}{}", tenant("s", "", &source))).await;
    let mut health = common::health_client(&server).await;
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let client = server.client("key-s").await;
    let started = Instant::now();
    let e = client.execute("pg", "SELECT 1", vec![]).await.expect_err("no session");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("connect_timeout"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let mut open = false;
    for _ in 0..10 {
        let e = client.execute("pg", "SELECT 1", vec![]).await.expect_err("no session");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        if reason(&e) == "SOURCE_CIRCUIT_OPEN" {
            open = true;
            break;
        }
    }
    assert!(open, "repeated timeouts open the breaker");
    proxy.freeze(false);
    until_it_serves(&client, "pg", "SELECT 1").await;
}

/// One failed connection attempt while every connection is busy fails none
/// of the callers waiting (a busy connection may still come free for them)
/// and counts once toward the breaker, not once per waiting caller.
#[tokio::test]
async fn a_failed_connection_attempt_fails_no_caller_a_busy_connection_can_serve() {
    let proxy = common::Proxy::start(common::pg_address()).await;
    let source = common::postgres_at(
        "o",
        "db",
        &proxy.port.to_string(),
        "required = true\n[tenants.o.sources.db.pool]\nmax_size = 3\nacquire_timeout = \"5s\"\n",
    );
    let server = TestServer::start(&tenant("o", "", &source)).await;
    let client = server.client("key-o").await;
    // The first probe is done: its connection is the pool's one idle connection.
    readiness_becomes(&server, 200).await;
    let begin = || client.begin("db", pb::IsolationLevel::Unspecified, false);
    let (tx, other) = (begin().await.expect("begin"), begin().await.expect("begin"));
    proxy.refuse_slowly(true);
    // The pool opens its third connection for these callers, all of them
    // waiting on that one attempt, which fails after 300 ms.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.execute("db", "SELECT 1", vec![]).await })
        })
        .collect();
    // A breaker opened by the failure would stay open for 400 ms at least.
    tokio::time::sleep(Duration::from_millis(450)).await;
    proxy.refuse_slowly(false);
    // One failed attempt is one failure, not one per waiting caller: the
    // breaker is still closed, so this caller waits too instead of failing fast.
    let fourth = {
        let client = client.clone();
        tokio::spawn(async move { client.execute("db", "SELECT 1", vec![]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.rollback(&tx).await.expect("rollback frees its connection");
    client.rollback(&other).await.expect("rollback");
    for call in calls {
        call.await.expect("task").expect("served once a connection came free");
    }
    fourth.await.expect("task").expect("the breaker stayed closed");
}

/// A server that never answers is down whichever timeout ends the wait
/// first: with acquire_timeout shorter than connect_timeout, and on MySQL,
/// whose driver bounds no connect, a caller's wait for a connection still
/// being opened ends UNAVAILABLE, not POOL_EXHAUSTED, and the replica is not
/// ready. Nothing was busy.
#[tokio::test]
async fn a_frozen_server_is_down_whichever_timeout_ends_the_wait() {
    let pg_proxy = common::Proxy::start(common::pg_address()).await;
    let pool = |source: &str| {
        format!("required = true\n[tenants.z.sources.{source}.pool]\nacquire_timeout = \"300ms\"\nconnect_timeout = \"1s\"\n")
    };
    let (my_proxy, my) = common::mysql_behind_proxy("z", "my", &pool("my")).await;
    pg_proxy.freeze(true);
    my_proxy.freeze(true);
    let sources = common::postgres_at("z", "pg", &pg_proxy.port.to_string(), &pool("pg")) + &my;
    let server = TestServer::start(&format!("{FAST}{}", tenant("z", "", &sources))).await;
    let client = server.client("key-z").await;
    for source in ["pg", "my"] {
        let e = client.execute(source, "SELECT 1", vec![]).await.expect_err("frozen");
        assert_eq!(e.code(), Code::Unavailable, "{source}: {e:?}");
    }
    // Once probed, both are down (not busy), and the replica is not ready.
    let mut probed = false;
    for _ in 0..100 {
        let (_, metrics) = http_get(&server.metrics_url, "/metrics").await;
        probed = ["pg", "my"]
            .iter()
            .all(|source| metrics.contains(&format!("weir_source_up{{tenant=\"z\",source=\"{source}\"}} 0")));
        if probed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(probed, "both sources are probed down");
    assert_eq!(ready(&server).await, 503);
}

/// TestConnection against a source that stops answering: a caller whose own
/// deadline comes first gets DEADLINE_EXCEEDED and leaves the source's
/// health as it was (a tenant's short deadline says nothing of the source);
/// one that waits the tenant's statement_timeout learns it is UNAVAILABLE.
#[tokio::test]
async fn test_connection_tells_a_short_deadline_from_a_silent_source() {
    let proxy = common::Proxy::start(common::pg_address()).await;
    let source = common::postgres_at("tc", "pg", &proxy.port.to_string(), "");
    let server = TestServer::start(&tenant("tc", "statement_timeout = \"1s\"", &source)).await;
    let client = server.client("key-tc").await;
    client.test_connection("pg").await.expect("answers");
    proxy.freeze(true);
    let mut short = tonic::Request::new(pb::TestConnectionRequest { source: "pg".into() });
    short.set_timeout(Duration::from_millis(300));
    let err = client.schema().test_connection(short).await.expect_err("frozen");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let listed = client.list_sources().await.expect("sources");
    assert!(listed[0].healthy, "a caller's deadline marked the source down");
    let err = client.test_connection("pg").await.expect_err("frozen");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("did not answer within"), "{err:?}");
    // One failure, as one probe's: the source that was up is in doubt, not
    // down (two in a row take it down).
    assert!(client.list_sources().await.expect("sources")[0].healthy);
    client.test_connection("pg").await.expect_err("frozen");
    assert!(!client.list_sources().await.expect("sources")[0].healthy);
    proxy.freeze(false);
    server.stop().await;
}

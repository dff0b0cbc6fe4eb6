//! `weirctl` as people run it: the binary in a child process, against the
//! real gateway in front of PostgreSQL (WEIR_TEST_PG_*) and SQLite.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

/// The weirctl binary. Cargo builds a package's binaries only for that
/// package's own tests, so this builds it (once per run) beside this test.
fn weirctl_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // <target>/<profile>/deps/<this test>
        let exe = std::env::current_exe().expect("the test's path");
        let profile = exe.parent().and_then(Path::parent).expect("<target>/<profile>");
        let target = profile.parent().expect("<target>");
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo
            .args([
                "build",
                "--quiet",
                "-p",
                "weir-client",
                "--bin",
                "weirctl",
                "--target-dir",
            ])
            .arg(target);
        if profile.ends_with("release") {
            cargo.arg("--release");
        }
        let built = cargo.status().expect("run cargo");
        assert!(built.success(), "cargo build --bin weirctl: {built}");
        profile.join("weirctl")
    })
}

/// weirctl with `args` against `server` (with key `key`), and nothing
/// from the environment.
fn weirctl_command(server: &TestServer, key: &str, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(weirctl_path());
    command
        .args(["--addr", &server.addr, "--key", key])
        .args(args)
        .env_remove("WEIR_API_KEY")
        .env_remove("WEIR_API_KEY_FILE")
        .env_remove("WEIR_ADDR");
    command
}

/// Starts weirctl and writes `first` to its input, which stays open.
fn weirctl_fed(
    server: &TestServer,
    key: &str,
    args: &[&str],
    first: &[u8],
) -> (std::process::Child, std::process::ChildStdin) {
    use std::io::Write;
    let mut child = weirctl_command(server, key, args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run weirctl");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(first).expect("write");
    input.flush().expect("flush");
    (child, input)
}

/// Runs weirctl with `args` against `server` (with key `key`), off the
/// runtime's thread, which keeps serving meanwhile.
async fn weirctl(server: &TestServer, key: &str, args: &[&str]) -> Output {
    let mut command = weirctl_command(server, key, args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the weirctl thread")
        .expect("run weirctl");
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn unique(base: &str) -> String {
    format!("{base}_{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

async fn pg_server(tenant_id: &str) -> (TestServer, WeirClient) {
    let config = format!(
        "[changes]\npoll_interval = \"20ms\"\nheartbeat_interval = \"300ms\"\n{}",
        tenant(tenant_id, "", &postgres(tenant_id, "db", ""))
    );
    let server = TestServer::start(&config).await;
    let client = server.client(&format!("key-{tenant_id}")).await;
    (server, client)
}

async fn sql(client: &WeirClient, sql: &str) {
    client
        .execute("db", sql, vec![])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// `watch --max N` acknowledges the Nth change before it exits, so that
/// the next run goes on after it instead of printing it again.
#[tokio::test]
async fn watch_max_acknowledges_its_last_change_before_exiting() {
    let (server, client) = pg_server("wm").await;
    let table = unique("watched");
    let sub = unique("feed");
    sql(&client, &format!("CREATE TABLE {table} (id INT PRIMARY KEY, v TEXT)")).await;
    // The subscription starts here; the rows come after it.
    let start = pb::WatchStart {
        source: "db".into(),
        tables: vec![pb::TableRef {
            schema: String::new(),
            table: table.clone(),
        }],
        subscription: sub.clone(),
        ..Default::default()
    };
    drop(client.watch(start).await.expect("the subscription starts"));
    for id in 1..=3 {
        sql(&client, &format!("INSERT INTO {table} VALUES ({id}, 'v{id}')")).await;
    }
    let mut ids = Vec::new();
    for _ in 0..2 {
        let args = ["watch", "db", &table, "--subscription", &sub, "--max", "1"];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let output = loop {
            let output = weirctl(&server, "key-wm", &args).await;
            // The run before may still hold the subscription for a moment.
            if !stderr(&output).contains("ALREADY_EXISTS") {
                break output;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the subscription was never released"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let changes: Vec<_> = lines.iter().filter(|l| l["op"] == "insert").collect();
        assert_eq!(changes.len(), 1, "{text}");
        ids.push(changes[0]["after"]["id"].as_i64().expect("an id"));
    }
    assert_eq!(ids, [1, 2], "the second run goes on after the first");
    let deleted = client
        .stream()
        .delete_subscription(pb::DeleteSubscriptionRequest {
            source: "db".into(),
            subscription: sub.clone(),
        })
        .await;
    assert!(deleted.is_ok(), "{deleted:?}");
    sql(&client, &format!("DROP TABLE {table}")).await;
    server.stop().await;
}

/// An error line names the server's request id, which its logs carry.
#[tokio::test]
async fn errors_carry_the_request_id() {
    let server = TestServer::start(&tenant("rid", "", &sqlite_demo("rid", "db"))).await;
    let output = weirctl(&server, "key-rid", &["query", "db", "SELECT * FROM no_such_table"]).await;
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    let id = text
        .split("request id ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no request id in {text:?}"));
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{text}");
    // Also for a call refused before it runs.
    let output = weirctl(&server, "wrong-key", &["sources"]).await;
    assert!(stderr(&output).contains("UNAUTHENTICATED") && stderr(&output).contains("request id "));
    server.stop().await;
}

/// An empty key file is an input error, not a call with `Bearer ` and no key.
#[tokio::test]
async fn an_empty_key_file_is_refused() {
    let server = TestServer::start(&tenant("kf", "", &sqlite_demo("kf", "db"))).await;
    let dir = tempfile::tempdir().expect("dir");
    let empty = dir.path().join("key");
    for content in ["", "\n", "  \nkey-kf\n"] {
        std::fs::write(&empty, content).expect("write the key file");
        let mut command = std::process::Command::new(weirctl_path());
        command
            .args(["--addr", &server.addr, "--key-file"])
            .arg(&empty)
            .arg("sources")
            .env_remove("WEIR_API_KEY");
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("thread")
            .expect("run weirctl");
        assert_eq!(output.status.code(), Some(1), "{content:?}");
        let text = stderr(&output);
        assert!(
            text.contains("--key-file") && text.contains("empty"),
            "{content:?}: {text}"
        );
        assert!(!text.contains("UNAUTHENTICATED"), "nothing was sent: {text}");
    }
    server.stop().await;
}

/// Writes `text` to `file` and loads it into `table` of source `db` with
/// `weirctl load`, which must succeed.
async fn load_file(server: &TestServer, key: &str, table: &str, file: &Path, text: &str) {
    std::fs::write(file, text).expect("write");
    let file = file.to_string_lossy().into_owned();
    let loaded = weirctl(server, key, &["load", "db", table, &file]).await;
    assert!(loaded.status.success(), "{file}: {}", stderr(&loaded));
}

/// Bytes print as `{"hex": ...}` in JSON, apart from text that looks like
/// hex, and `weirctl load` reads that form back.
#[tokio::test]
async fn json_output_tells_bytes_from_text_and_loads_back() {
    let (server, client) = pg_server("jb").await;
    let (from, to) = (unique("bytes_from"), unique("bytes_to"));
    for t in [&from, &to] {
        sql(
            &client,
            &format!("CREATE TABLE {t} (id INT PRIMARY KEY, b BYTEA, t TEXT)"),
        )
        .await;
    }
    sql(
        &client,
        &format!("INSERT INTO {from} VALUES (1, '\\xdead01', 'dead01'), (2, NULL, NULL)"),
    )
    .await;
    let query = format!("SELECT id, b, t FROM {from} ORDER BY id");
    let output = weirctl(&server, "key-jb", &["--format", "json", "query", "db", &query]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert_eq!(
        text,
        "{\"id\":1,\"b\":{\"hex\":\"dead01\"},\"t\":\"dead01\"}\n{\"id\":2,\"b\":null,\"t\":null}\n"
    );
    let dir = tempfile::tempdir().expect("dir");
    load_file(&server, "key-jb", &to, &dir.path().join("rows.jsonl"), &text).await;
    let back = client
        .execute("db", &format!("SELECT id, b, t FROM {to} ORDER BY id"), vec![])
        .await
        .expect("read back");
    let original = client.execute("db", &query, vec![]).await.expect("read");
    assert_eq!(back.rows, original.rows);
    for t in [&from, &to] {
        sql(&client, &format!("DROP TABLE {t}")).await;
    }
    server.stop().await;
}

/// MySQL's `TIME` is a duration too: what weirctl writes for one outside
/// a day (`25:00:00`, `-01:30:00`) loads back, as CSV and as JSON Lines.
#[tokio::test]
async fn mysql_durations_export_and_load_back() {
    let server = TestServer::start(&tenant("jt", "", &mysql("jt", "db", ""))).await;
    let client = server.client("key-jt").await;
    let (from, to) = (unique("times_from"), unique("times_to"));
    for t in [&from, &to] {
        sql(&client, &format!("CREATE TABLE {t} (id INT PRIMARY KEY, d TIME(6))")).await;
    }
    sql(
        &client,
        &format!("INSERT INTO {from} VALUES (1, '25:00:00'), (2, '-01:30:00.5'), (3, '12:34:56'), (4, NULL)"),
    )
    .await;
    let query = format!("SELECT id, d FROM {from} ORDER BY id");
    let original = client.execute("db", &query, vec![]).await.expect("read");
    let dir = tempfile::tempdir().expect("dir");
    for (format, name) in [("csv", "rows.csv"), ("json", "rows.jsonl")] {
        let output = weirctl(&server, "key-jt", &["--format", format, "query", "db", &query]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        sql(&client, &format!("DELETE FROM {to}")).await;
        load_file(&server, "key-jt", &to, &dir.path().join(name), &stdout(&output)).await;
        let back = client
            .execute("db", &format!("SELECT id, d FROM {to} ORDER BY id"), vec![])
            .await
            .expect("read back");
        assert_eq!(back.rows, original.rows, "{format}");
    }
    for t in [&from, &to] {
        sql(&client, &format!("DROP TABLE {t}")).await;
    }
    server.stop().await;
}

/// A Kafka server for weirctl's topic commands (topics under `weir-w-`).
async fn kafka_server() -> (TestServer, WeirClient) {
    let server = TestServer::start(&tenant("kw", "", &kafka("kw", "events", "weir-w-"))).await;
    let client = server.client("key-kw").await;
    (server, client)
}

/// `consume --format json` prints a record's headers as they came: in
/// order, a key as often as it came (an object would keep only the last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_headers_print_in_order_with_repeated_keys() {
    let (server, client) = kafka_server().await;
    let topic = format!("weir-w-headers-{}", uuid::Uuid::new_v4().simple());
    create_topic(&topic, 1).await;
    let header = |key: &str, value: &str| pb::RecordHeader {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    let null = pb::RecordHeader {
        key: "n".into(),
        null_value: true,
        ..Default::default()
    };
    produce(
        &client,
        &topic,
        vec![pb::ProducerRecord {
            value: b"v".to_vec(),
            headers: vec![
                header("h", "a"),
                header("b", "x"),
                header("h", "b"),
                null,
                header("e", ""),
            ],
            ..Default::default()
        }],
    )
    .await
    .expect("produce");
    let out = weirctl(
        &server,
        "key-kw",
        &[
            "consume", "events", &topic, "--group", "printer", "--from", "earliest", "--max", "1", "--format", "json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("a JSON line");
    assert_eq!(
        line["headers"],
        serde_json::json!([["h", "a"], ["b", "x"], ["h", "b"], ["n", null], ["e", ""]])
    );
    server.stop().await;
}

/// A line longer than the server's request limit cannot be sent in any
/// call: `produce` fails with the server's OUT_OF_RANGE, which names the
/// limit, and says where the failed call started in the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_of_a_line_over_the_request_limit_says_so_and_where() {
    let config = format!(
        "[server]\nmax_request_bytes = 65536\n{}",
        tenant("kw", "", &kafka("kw", "events", "weir-w-"))
    );
    let server = TestServer::start(&config).await;
    let topic = format!("weir-w-over-{}", uuid::Uuid::new_v4().simple());
    create_topic(&topic, 1).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("over.txt");
    std::fs::write(&file, format!("a\n{}\nb\n", "x".repeat(100_000))).expect("write");
    let path = file.to_str().expect("path");
    let out = weirctl(&server, "key-kw", &["produce", "events", &topic, "--file", path]).await;
    assert!(!out.status.success(), "{}", stdout(&out));
    let said = stderr(&out);
    assert!(said.contains("OUT_OF_RANGE") && said.contains("65536"), "{said}");
    assert!(
        said.contains("0 records were produced") && said.contains("started at record 1"),
        "{said}"
    );
    server.stop().await;
}

/// `produce` of long lines splits its calls by bytes too: 300 lines of
/// 100 KB (30 MB) in calls of 1,000 lines would go past the server's 16 MiB
/// request limit, and produce nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_of_long_lines_stays_under_the_request_limit() {
    let (server, _client) = kafka_server().await;
    let topic = format!("weir-w-long-{}", uuid::Uuid::new_v4().simple());
    create_topic(&topic, 1).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("long.txt");
    let line = "x".repeat(100_000);
    std::fs::write(&file, format!("{line}\n").repeat(300)).expect("write");
    let path = file.to_str().expect("path");
    let out = weirctl(&server, "key-kw", &["produce", "events", &topic, "--file", path]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Every line acknowledged: the last one at offset 299 of the one partition.
    let said = stdout(&out);
    assert!(
        said.contains("produced 300 records") && said.contains("offset 299"),
        "{said}"
    );
    server.stop().await;
}

/// `tail -F log | weirctl produce ...`: a line is sent as it comes, not
/// held until a batch of 1,000 is full or the input ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_from_a_slow_input_sends_each_line_as_it_comes() {
    let (server, client) = kafka_server().await;
    let topic = format!("weir-w-slow-{}", uuid::Uuid::new_v4().simple());
    create_topic(&topic, 1).await;
    let (child, input) = weirctl_fed(&server, "key-kw", &["produce", "events", &topic], b"first\n");
    // `input` stays open while the line is looked for.
    let request = consume_request(&topic, "slow", 1, false);
    let mut stream = client.stream().consume(request).await.expect("consume").into_inner();
    let batch = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the line arrives while the input is still open")
        .expect("stream")
        .expect("a batch");
    assert_eq!(batch.records[0].value, b"first");
    drop(input);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("the weirctl thread")
        .expect("weirctl's output");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("produced 1 record"), "{}", stdout(&out));
    server.stop().await;
}

/// A load the server refuses ends weirctl with the server's answer at once,
/// even while its input (stdin, still open) has more to come: it does not
/// wait for the reader of that input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_load_exits_while_its_input_is_still_open() {
    let server = TestServer::start(&tenant("ri", "", &sqlite_demo("ri", "db"))).await;
    let args = ["load", "db", "customers", "-", "--mode", "upsert", "--input", "csv"];
    let (mut child, input) = weirctl_fed(&server, "key-ri", &args, b"id,name\n1,a\n");
    // `input` stays open: no end of input comes.
    let waited = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some((status, child.wait_with_output().expect("output")));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("the waiting thread");
    drop(input);
    let (status, out) = waited.expect("weirctl exited with its input still open");
    assert!(!status.success());
    assert!(stderr(&out).contains("INVALID_ARGUMENT"), "{}", stderr(&out));
    server.stop().await;
}

/// Runs weirctl with its standard output closed from the start, as when
/// the reader of a pipe (`| head`) has gone.
async fn weirctl_unread(server: &TestServer, key: &str, args: &[&str]) -> Output {
    let mut child = weirctl_command(server, key, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run weirctl");
    drop(child.stdout.take());
    tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("the weirctl thread")
        .expect("weirctl's output")
}

/// `weirctl query ... | head` stops the statement where the reader left:
/// a write returning rows whose result was cut is rolled back, which
/// weirctl says, exiting as SIGPIPE would (141). One whose result ended
/// before that committed and exits 0.
#[tokio::test]
async fn a_result_cut_by_a_closed_output_says_its_write_was_rolled_back() {
    let (server, client) = pg_server("wcut").await;
    let table = unique("cut");
    sql(&client, &format!("CREATE TABLE {table} (id INT, pad TEXT)")).await;
    let count = || async {
        let rows = client
            .execute("db", &format!("SELECT count(*) FROM {table}"), vec![])
            .await
            .expect("count");
        int(&rows.rows[0].values[0])
    };
    let big =
        format!("INSERT INTO {table} SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g RETURNING id, pad");
    let out = weirctl_unread(&server, "key-wcut", &["query", "db", &big]).await;
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count().await, 0);

    let small = format!("INSERT INTO {table} VALUES (1, 'a') RETURNING id");
    let out = weirctl_unread(&server, "key-wcut", &["query", "db", &small]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(count().await, 1);
    sql(&client, &format!("DROP TABLE {table}")).await;
    server.stop().await;
}

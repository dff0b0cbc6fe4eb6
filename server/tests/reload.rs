//! Hot reload of the real `weir` process: a change of its configuration
//! file (written as Kubernetes does, by an atomic rename) or SIGHUP puts
//! new tenants, keys, limits and sources in force without a restart and
//! without dropping calls in progress; a broken file is refused and logged
//! and the old configuration stays.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{env_or, kafka, key_hash, postgres, reason, WeirProcess};
use tonic::Code;
use weir_client::weir_proto::v1 as pb;
use weir_client::WeirClient;

struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weir.toml");
        let file = ConfigFile { _dir: dir, path };
        file.write(text);
        file
    }

    /// Replaces the file in one step, as a ConfigMap update does.
    fn write(&self, text: &str) {
        let next = self.path.with_extension("next");
        std::fs::write(&next, text).expect("write");
        std::fs::rename(&next, &self.path).expect("rename");
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

/// `api_keys` with `key-<name>` for each name.
fn api_keys(keys: &[&str]) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|k| format!("{{ id = \"{k}\", sha256 = \"{}\" }}", key_hash(&format!("key-{k}"))))
        .collect();
    format!("api_keys = [{}]\n", keys.join(", "))
}

/// A tenant with the given keys and a SQLite source.
fn tenant(id: &str, keys: &[&str], extra: &str) -> String {
    format!(
        "[tenants.{id}]\n{}{extra}\n[tenants.{id}.sources.demo]\nengine = \"sqlite\"\npath = \":memory:\"\ndemo_data = true\n",
        api_keys(keys)
    )
}

const FAST: &str = "[server]\nreload_interval = \"100ms\"\n";

fn start(file: &ConfigFile) -> WeirProcess {
    WeirProcess::start(&["--config", file.path()])
}

fn reloaded(weir: &WeirProcess) -> serde_json::Value {
    weir.next_log(|l| l["message"] == "configuration reloaded")
}

fn refused(weir: &WeirProcess) -> serde_json::Value {
    weir.next_log(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("configuration reload refused"))
    })
}

async fn works(weir: &WeirProcess, key: &str) -> Result<(), tonic::Status> {
    let client = WeirClient::connect(&weir.addr, key).await.expect("connect");
    client.execute("demo", "SELECT 1", vec![]).await.map(|_| ())
}

#[tokio::test]
async fn a_key_revoked_in_the_file_stops_working_on_the_next_call() {
    let file = ConfigFile::new(&format!("{FAST}{}", tenant("a", &["a1", "a2"], "")));
    let weir = start(&file);
    works(&weir, "key-a1").await.expect("a1");
    works(&weir, "key-a2").await.expect("a2");
    file.write(&format!("{FAST}{}", tenant("a", &["a1"], "")));
    let line = reloaded(&weir);
    assert_eq!(line["sources_kept"], 1, "the unchanged source keeps its pool: {line}");
    let err = works(&weir, "key-a2").await.expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    works(&weir, "key-a1").await.expect("a1 still works");
}

/// A ":memory:" source whose pool settings change keeps its database: what
/// was written before is there after, and a transaction kept across the
/// reload commits into the database the source now serves.
#[tokio::test]
async fn a_memory_sqlite_source_keeps_its_data_across_a_reload() {
    let file = ConfigFile::new(&format!("{FAST}{}", tenant("a", &["a1"], "")));
    let weir = start(&file);
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("connect");
    client
        .execute("demo", "CREATE TABLE kept (x INTEGER)", vec![])
        .await
        .expect("create");
    client
        .execute("demo", "INSERT INTO kept VALUES (1)", vec![])
        .await
        .expect("insert");
    let tx = client
        .begin("demo", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "demo", "INSERT INTO kept VALUES (2)", vec![])
        .await
        .expect("insert in the transaction");
    file.write(&format!(
        "{FAST}{}[tenants.a.sources.demo.pool]\nmax_size = 3\n",
        tenant("a", &["a1"], "")
    ));
    let line = reloaded(&weir);
    assert_eq!(line["sources_new"], 1, "a new pool: {line}");
    client.commit(&tx).await.expect("commit");
    let rows = client
        .execute("demo", "SELECT x FROM kept ORDER BY x", vec![])
        .await
        .expect("the table is still there");
    let xs: Vec<_> = rows.rows.iter().map(|r| common::int(&r.values[0])).collect();
    assert_eq!(xs, [1, 2]);
}

/// A required source that a reload adds while it is down makes the server
/// NOT_SERVING at once (the reload starts a round of probes), not at the
/// next `health_check_interval` (10 s by default).
#[tokio::test]
async fn a_required_source_added_while_down_is_not_serving_at_once() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let file = ConfigFile::new(&format!("{FAST}{}", tenant("a", &["a1"], "")));
    let weir = start(&file);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", weir.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = || {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .expect("health")
                .into_inner()
                .status
        }
    };
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while status().await != ServingStatus::Serving as i32 {
        assert!(std::time::Instant::now() < until, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    file.write(&format!(
        "{FAST}{}[tenants.a.sources.down]\nengine = \"postgres\"\nhost = \"127.0.0.1\"\nport = 1\nuser = \"x\"\nrequired = true\n",
        tenant("a", &["a1"], "")
    ));
    reloaded(&weir);
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while status().await != ServingStatus::NotServing as i32 {
        assert!(std::time::Instant::now() < until, "still SERVING 3 s after the reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_broken_file_is_refused_and_the_old_configuration_stays() {
    let good = format!("{FAST}{}", tenant("a", &["a1"], ""));
    let file = ConfigFile::new(&good);
    let weir = start(&file);
    for broken in [
        "[tenants.a\nthis is not TOML".to_string(),
        // Valid TOML, invalid configuration: the error names the key.
        format!("{FAST}{}\n[tenants.a.limits]\nburst = 0\n", tenant("a", &[], "")),
    ] {
        file.write(&broken);
        let refused = refused(&weir);
        assert_eq!(refused["level"], "ERROR");
        let error = refused["error"].as_str().unwrap_or_default().to_string();
        assert!(!error.is_empty(), "the reason is logged: {refused}");
        works(&weir, "key-a1").await.expect("the old configuration serves");
    }
    file.write(&format!("{FAST}{}", tenant("a", &["a1", "a2"], "")));
    reloaded(&weir);
    works(&weir, "key-a2").await.expect("a good file is taken again");
}

/// How `weir` with the demo configuration and `env` ends within `wait`:
/// its exit code and what it wrote; None if it was still running.
fn weir_exit_with(env: &[(&str, &str)], wait: Duration) -> Option<(Option<i32>, String)> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .env("WEIR__SERVER__LISTEN", "127.0.0.1:0")
        .env("WEIR__METRICS__ENABLED", "false")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start weir");
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            return Some((status.code(), stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// An override that names a tenant the configuration does not define (a
/// misspelt name), or that would not be read as an override at all (one
/// underscore after WEIR), stops the start as a typo in the file does,
/// instead of leaving the setting meant unchanged.
#[test]
fn misspelt_environment_overrides_are_refused_at_start() {
    for (name, value) in [
        ("WEIR__TENANTS__DEMOO__LIMITS__BURST", "1"),
        ("WEIR_SERVER__MAX_QUEUE_WAIT", "\"1s\""),
    ] {
        let (code, stderr) =
            weir_exit_with(&[(name, value)], Duration::from_secs(10)).unwrap_or_else(|| panic!("{name}: weir started"));
        assert_eq!(code, Some(2), "{name}: {stderr}");
        let named = if name.starts_with("WEIR__") {
            "tenants.demoo"
        } else {
            name
        };
        assert!(stderr.contains(named), "{name}: {stderr}");
    }
    // The tenant the demo defines may be changed.
    assert!(
        weir_exit_with(&[("WEIR__TENANTS__DEMO__LIMITS__BURST", "1")], Duration::from_secs(2)).is_none(),
        "an override of a defined tenant starts"
    );
}

/// A reload refused for a file its configuration names but which is not
/// there yet (a Secret volume that syncs after its ConfigMap) is tried
/// again once the file appears, and the rest of the edit, a revoked key,
/// then takes effect.
#[tokio::test]
async fn a_reload_refused_for_a_missing_file_is_applied_once_the_file_appears() {
    let file = ConfigFile::new(&format!("{FAST}{}", tenant("a", &["a1", "a2"], "")));
    let weir = start(&file);
    works(&weir, "key-a2").await.expect("a2");
    let secret = file.path.with_file_name("b-password");
    let b = format!(
        "[tenants.b]\n{}[tenants.b.sources.demo]\nengine = \"postgres\"\nhost = \"{}\"\nport = {}\nuser = \"{}\"\n\
         database = \"{}\"\npassword_file = \"{}\"\n",
        api_keys(&["b1"]),
        env_or("WEIR_TEST_PG_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_PG_PORT", "5432"),
        env_or("WEIR_TEST_PG_USER", "postgres"),
        env_or("WEIR_TEST_PG_DATABASE", "test"),
        secret.display()
    );
    file.write(&format!("{FAST}{}{b}", tenant("a", &["a1"], "")));
    let refused = refused(&weir);
    assert!(
        refused["error"].as_str().is_some_and(|e| e.contains("password_file")),
        "{refused}"
    );
    works(&weir, "key-a2").await.expect("the old configuration serves");
    std::fs::write(&secret, std::env::var("WEIR_TEST_PG_PASSWORD").unwrap_or_default()).expect("secret");
    reloaded(&weir);
    let err = works(&weir, "key-a2").await.expect_err("revoked by the edit");
    assert_eq!(err.code(), Code::Unauthenticated);
    works(&weir, "key-b1").await.expect("the new tenant serves");
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_at_once() {
    // Checked only hourly: the signal, not the poll, makes this reload.
    let slow = "[server]\nreload_interval = \"1h\"\n";
    let file = ConfigFile::new(&format!("{slow}{}", tenant("a", &["a1"], "")));
    let weir = start(&file);
    let err = works(&weir, "key-b1").await.expect_err("no tenant b yet");
    assert_eq!(err.code(), Code::Unauthenticated);
    file.write(&format!(
        "{slow}{}{}",
        tenant("a", &["a1"], ""),
        tenant("b", &["b1"], "")
    ));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &weir.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let line = reloaded(&weir);
    assert_eq!(line["sources_new"], 1, "{line}");
    works(&weir, "key-b1").await.expect("tenant b after SIGHUP");
}

#[tokio::test]
async fn audit_sql_is_switched_on_per_tenant_by_reload() {
    let file = ConfigFile::new(&format!("{FAST}{}", tenant("a", &["a1"], "")));
    let weir = start(&file);
    let audit = |sql: String| {
        let weir = &weir;
        async move {
            let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("connect");
            client.execute("demo", &sql, vec![]).await.expect("execute");
            weir.next_log(|l| l["target"] == "weir::audit")
        }
    };
    let line = audit("SELECT 1 AS quiet".into()).await;
    assert!(line["span"].get("sql").is_none(), "{line}");
    file.write(&format!("{FAST}{}", tenant("a", &["a1"], "audit_sql = true")));
    reloaded(&weir);
    let line = audit("SELECT 2 AS loud".into()).await;
    assert_eq!(line["span"]["sql"], "SELECT 2 AS loud", "{line}");
    // Cut to 4 KiB, its length said; and left out where it names a password.
    let line = audit(format!("SELECT '{}' AS long", "x".repeat(100_000))).await;
    let sql = line["span"]["sql"].as_str().unwrap_or_default();
    assert!(
        sql.len() < 4200 && sql.ends_with("(100017 bytes in all)"),
        "{}",
        sql.len()
    );
    for statement in [
        "SELECT 'hunter2' AS password",
        // Inside a longer word (MySQL's CHANGE REPLICATION SOURCE), and SQL
        // Server's credentials, whose word is SECRET.
        "SELECT 'hunter2' AS source_password",
        "SELECT 'hunter2' AS secret",
        // Keys of encryption functions (SQLite has none: named, not called).
        "SELECT 'hunter2' AS pgp_sym_encrypt",
        "SELECT 'hunter2' AS encryptbypassphrase",
        "SELECT 'hunter2' AS hmac",
    ] {
        let line = audit(statement.into()).await;
        let sql = line["span"]["sql"].as_str().unwrap_or_default();
        assert!(
            !sql.contains("hunter2") && sql.contains("may carry a credential"),
            "{sql}"
        );
    }
}

fn pg_config(pool_size: u32) -> String {
    format!(
        "{FAST}[tenants.a]\napi_keys = [{{ id = \"a1\", sha256 = \"{}\" }}]\n{}",
        key_hash("key-a1"),
        postgres(
            "a",
            "pg",
            &format!("[tenants.a.sources.pg.pool]\nmax_size = {pool_size}\nacquire_timeout = \"300ms\"\n")
        )
    )
}

#[tokio::test]
async fn a_new_pool_size_applies_without_dropping_a_stream_in_progress() {
    let file = ConfigFile::new(&pg_config(1));
    let weir = start(&file);
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("connect");
    // With one connection, a second transaction cannot get one.
    let held = client
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("first");
    let err = client
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect_err("the pool has one connection");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "POOL_EXHAUSTED");
    client.rollback(&held).await.expect("rollback");

    let mut stream = client
        .execute_stream("pg", "SELECT g FROM generate_series(1, 300000) g", vec![])
        .await
        .expect("stream");
    let mut rows = stream.next_batch().await.expect("first batch").map_or(0, |b| b.len());
    assert!(rows > 0);
    file.write(&pg_config(2));
    let line = reloaded(&weir);
    assert_eq!(line["sources_new"], 1, "a changed source gets a new pool: {line}");
    // The new pool has two connections while the stream still holds the old pool's one.
    let t1 = client
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("new pool, first");
    let t2 = client
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("new pool, second");
    while let Some(batch) = stream.next_batch().await.expect("the stream goes on") {
        rows += batch.len();
    }
    assert_eq!(rows, 300_000, "every row of the stream that began before the reload");
    client.commit(&t1).await.expect("commit");
    client.commit(&t2).await.expect("commit");
}

/// Tenant `a` with the given keys and a PostgreSQL source `pg`.
fn pg_keys(keys: &[&str]) -> String {
    format!("{FAST}[tenants.a]\n{}{}", api_keys(keys), postgres("a", "pg", ""))
}

/// `table` on source `pg`, made again with one bigint column `id` and no rows.
async fn empty_table(client: &WeirClient, table: &str) {
    for sql in [
        format!("DROP TABLE IF EXISTS {table}"),
        format!("CREATE TABLE {table} (id bigint)"),
    ] {
        client.execute("pg", &sql, vec![]).await.expect(&sql);
    }
}

/// Rows of one bigint column holding each of `range`.
fn ids(range: std::ops::Range<i64>) -> Vec<pb::Row> {
    range
        .map(|i| pb::Row {
            values: vec![pb::Value {
                kind: Some(pb::value::Kind::Int64Value(i)),
            }],
        })
        .collect()
}

/// A load into `table`'s `id` column on `pg` that has sent `first` and
/// goes on with what the returned sender sends, until it is dropped.
async fn open_load(
    client: &WeirClient,
    table: &str,
    first: Vec<pb::Row>,
) -> (
    tokio::sync::mpsc::Sender<Vec<pb::Row>>,
    tokio::task::JoinHandle<Result<pb::LoadResponse, tonic::Status>>,
) {
    let (more_rows, rows_in) = tokio::sync::mpsc::channel::<Vec<pb::Row>>(1);
    more_rows.send(first).await.expect("rows");
    let header = pb::LoadHeader {
        source: "pg".into(),
        table: table.into(),
        columns: vec!["id".into()],
        ..Default::default()
    };
    let client = client.clone();
    let load = tokio::spawn(async move {
        client
            .load(header, tokio_stream::wrappers::ReceiverStream::new(rows_in))
            .await
    });
    (more_rows, load)
}

/// A load by key a1 of 100 rows into a fresh `table`, once it has reached the engine.
async fn load_in_the_engine(
    weir: &WeirProcess,
    table: &str,
) -> (
    tokio::sync::mpsc::Sender<Vec<pb::Row>>,
    tokio::task::JoinHandle<Result<pb::LoadResponse, tonic::Status>>,
) {
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    empty_table(&client, table).await;
    let (more_rows, load) = open_load(&client, table, ids(0..100)).await;
    let pg = common::pg_direct().await;
    assert!(
        common::wait_until_running(&pg, table, Duration::from_secs(5)).await,
        "the load reached the engine"
    );
    (more_rows, load)
}

/// A reload that lowers a tenant's rate holds the loads already running to
/// it from their next rows, not only the loads that start after it.
#[tokio::test]
async fn a_lowered_rate_holds_a_load_already_running() {
    let config = |rate: u32| {
        format!(
            "{FAST}[tenants.a]\n{}[tenants.a.limits]\nload_rows_per_second = {rate}\n{}",
            api_keys(&["a1"]),
            postgres("a", "pg", "")
        )
    };
    let file = ConfigFile::new(&config(1_000_000));
    let weir = start(&file);
    let (more_rows, load) = load_in_the_engine(&weir, "weir_reload_lowered_rate").await;
    file.write(&config(500));
    reloaded(&weir);
    // 1,500 rows at 500 a second, with a second's burst: about 2 s of waiting.
    more_rows.send(ids(100..1600)).await.expect("rows");
    drop(more_rows);
    let done = tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .expect("the load ends")
        .expect("load task")
        .expect("the load succeeds");
    assert_eq!(done.rows_inserted, 1600);
    let throttled = done.throttled.expect("throttled is always set");
    assert!(
        throttled.seconds >= 1,
        "the rows after the reload went at the old rate: throttled {throttled:?}"
    );
}

/// A load waiting out its turn at the tenant's row rate is ended at once
/// when its key is revoked, not once the turn comes: it holds a
/// transaction, its locks and its slots meanwhile.
#[tokio::test]
async fn a_load_waiting_for_its_rate_ends_when_its_key_is_revoked() {
    let config = |keys: &[&str]| {
        format!(
            "{FAST}[tenants.a]\n{}[tenants.a.limits]\nload_rows_per_second = 1000\n{}",
            api_keys(keys),
            postgres("a", "pg", "")
        )
    };
    let file = ConfigFile::new(&config(&["a1", "a2"]));
    let weir = start(&file);
    let (more_rows, load) = load_in_the_engine(&weir, "weir_reload_revoked_rate").await;
    // 20,000 rows at 1,000 a second: about 20 s of waiting for their turn.
    more_rows.send(ids(100..20_100)).await.expect("rows");
    tokio::time::sleep(Duration::from_millis(500)).await;
    revoke_during(&weir, &file, &config(&["a2"]), load).await;
    drop(more_rows);
}

/// Reloads `file` as `revoked` (key a1 gone) and expects `load` to end
/// with CREDENTIAL_REVOKED within 5 s.
async fn revoke_during(
    weir: &WeirProcess,
    file: &ConfigFile,
    revoked: &str,
    load: tokio::task::JoinHandle<Result<pb::LoadResponse, tonic::Status>>,
) {
    file.write(revoked);
    reloaded(weir);
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .expect("the load ends")
        .expect("load task")
        .expect_err("revoked");
    assert_eq!(reason(&err), "CREDENTIAL_REVOKED", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the load ended {:?} after the reload",
        started.elapsed()
    );
}

/// A load whose engine is held up (its COPY waits for a key another
/// transaction holds) ends at once when its key is revoked: its statement
/// is cancelled, instead of the load keeping its slots and session until
/// the engine moves on. Nothing of it is kept.
#[tokio::test]
async fn a_load_held_up_in_the_engine_ends_when_its_key_is_revoked() {
    let file = ConfigFile::new(&pg_keys(&["a1", "a2"]));
    let weir = start(&file);
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    let table = "weir_held_up_load";
    for sql in [
        format!("DROP TABLE IF EXISTS {table}"),
        format!("CREATE TABLE {table} (id bigint PRIMARY KEY)"),
    ] {
        client.execute("pg", &sql, vec![]).await.expect(&sql);
    }
    let holder = common::pg_direct().await;
    holder
        .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (5000)"))
        .await
        .expect("another transaction holds key 5000");
    let (more_rows, load) = open_load(&client, table, ids(0..100)).await;
    // Rows from 5000 on, more than the COPY's chunks, socket and feed hold:
    // the COPY waits at row 5000, and the rest back up behind it.
    let sending = tokio::spawn(async move {
        for i in 0..40 {
            let from = 5000 + i * 10_000;
            if more_rows.send(ids(from..from + 10_000)).await.is_err() {
                break;
            }
        }
        more_rows
    });
    let pg = common::pg_direct().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' \
                 AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
                &[&table],
            )
            .await
            .expect("activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the load never waited for key 5000"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    revoke_during(&weir, &file, &pg_keys(&["a2"]), load).await;
    holder.batch_execute("ROLLBACK").await.expect("rollback");
    sending.abort();
    let kept: i64 = pg
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(kept, 0, "nothing of the revoked load is kept");
}

/// A transaction on a source that a reload takes away, or makes read-only,
/// does not go on: its next statement or its commit finds it rolled back,
/// and nothing it wrote is kept.
#[tokio::test]
async fn a_transaction_on_a_source_a_reload_withdraws_is_rolled_back() {
    let config = |other: Option<&str>| {
        let other = other.map_or(String::new(), |extra| postgres("a", "other", extra));
        format!(
            "{FAST}[tenants.a]\n{}{}{other}",
            api_keys(&["a1"]),
            postgres("a", "pg", "")
        )
    };
    let file = ConfigFile::new(&config(Some("")));
    let weir = start(&file);
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    let table = "weir_reload_withdrawn";
    empty_table(&client, table).await;
    let count = || async {
        let r = client
            .execute("pg", &format!("SELECT count(*) FROM {table}"), vec![])
            .await
            .expect("count");
        common::int(&r.rows[0].values[0])
    };
    let lost = |e: &tonic::Status| e.code() == Code::Aborted && reason(e) == "TRANSACTION_LOST";
    let insert = format!("INSERT INTO {table} VALUES (1)");
    for (withdrawn, commit) in [(config(None), false), (config(Some("read_only = true\n")), true)] {
        let tx = client
            .begin("other", pb::IsolationLevel::Unspecified, false)
            .await
            .expect("begin");
        client.execute_in(&tx, "other", &insert, vec![]).await.expect("insert");
        file.write(&withdrawn);
        reloaded(&weir);
        let err = if commit {
            client.commit(&tx).await.expect_err("commit after the reload")
        } else {
            client
                .execute_in(&tx, "other", &insert, vec![])
                .await
                .expect_err("a statement after the reload")
        };
        assert!(lost(&err), "{err:?}");
        assert!(err.message().contains("configuration reload"), "{}", err.message());
        assert_eq!(count().await, 0, "nothing the transaction wrote is kept");
        file.write(&config(Some("")));
        reloaded(&weir);
    }
    // A transaction begun read-only could not write anyway: it goes on.
    let tx = client
        .begin("other", pb::IsolationLevel::Unspecified, true)
        .await
        .expect("begin read-only");
    file.write(&config(Some("read_only = true\n")));
    reloaded(&weir);
    client
        .execute_in(&tx, "other", "SELECT 1", vec![])
        .await
        .expect("a read-only transaction goes on");
    client.commit(&tx).await.expect("commit");
}

/// A reload that points a source at another server, database or login ends
/// the work that still runs on the old one: its transactions are rolled
/// back and its change streams end (UNAVAILABLE, `SOURCE_RECONFIGURED`, to
/// be resumed on the source as it now is). A new pool size alone ends
/// neither (the stream test above).
#[tokio::test]
async fn a_source_pointed_elsewhere_ends_its_transactions_and_change_streams() {
    // The same server behind a proxy's port: another address in the configuration.
    let proxy = common::Proxy::start(common::pg_address()).await;
    let config = |port: &str, pool: u32| {
        format!(
            "{FAST}[tenants.a]\n{}{}",
            api_keys(&["a1"]),
            common::postgres_at(
                "a",
                "pg",
                port,
                &format!("[tenants.a.sources.pg.pool]\nmax_size = {pool}\n")
            )
        )
    };
    let direct = env_or("WEIR_TEST_PG_PORT", "5432");
    let file = ConfigFile::new(&config(&direct, 4));
    let weir = start(&file);
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    let table = "weir_reload_repointed";
    for sql in [
        format!("DROP TABLE IF EXISTS {table}"),
        format!("CREATE TABLE {table} (id bigint PRIMARY KEY)"),
    ] {
        client.execute("pg", &sql, vec![]).await.expect(&sql);
    }
    let subscription = format!("repointed_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut watch = client
        .watch(pb::WatchStart {
            source: "pg".into(),
            tables: vec![pb::TableRef {
                schema: String::new(),
                table: table.into(),
            }],
            subscription: subscription.clone(),
            ..Default::default()
        })
        .await
        .expect("watch");
    let tx = client
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    client
        .execute_in(&tx, "pg", &format!("INSERT INTO {table} VALUES (1)"), vec![])
        .await
        .expect("insert");

    // A new pool size first: the source keeps its place, and what began
    // before it ends when the source moves later.
    file.write(&config(&direct, 5));
    reloaded(&weir);
    client
        .execute_in(&tx, "pg", &format!("INSERT INTO {table} VALUES (3)"), vec![])
        .await
        .expect("the transaction goes on after a new pool size");
    file.write(&config(&proxy.port.to_string(), 5));
    reloaded(&weir);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the change stream ended without an error"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the change stream ends");
    assert_eq!(
        (ended.code(), reason(&ended).as_str()),
        (Code::Unavailable, "SOURCE_RECONFIGURED"),
        "{ended:?}"
    );
    let err = client
        .execute_in(&tx, "pg", &format!("INSERT INTO {table} VALUES (2)"), vec![])
        .await
        .expect_err("a statement after the reload");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Aborted, "TRANSACTION_LOST"),
        "{err:?}"
    );
    assert!(err.message().contains("configuration reload"), "{}", err.message());
    let r = client
        .execute("pg", &format!("SELECT count(*) FROM {table}"), vec![])
        .await
        .expect("the source as it now is serves");
    assert_eq!(
        common::int(&r.rows[0].values[0]),
        0,
        "nothing the transaction wrote is kept"
    );
    // Resumed on the source as it now is.
    drop(watch);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let deleted = client
            .stream()
            .delete_subscription(pb::DeleteSubscriptionRequest {
                source: "pg".into(),
                subscription: subscription.clone(),
            })
            .await;
        match deleted {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("delete the subscription: {e:?}"),
        }
    }
    client
        .execute("pg", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("drop");
}

/// A source's CA bundle is read again when it changes (a rotated bundle, a
/// renewed server certificate): the source gets a new pool, which verifies
/// against the file as it now is, without a restart.
#[tokio::test]
async fn a_sources_changed_ca_file_is_read_again() {
    use mysql_async::prelude::Queryable;
    let mut direct = common::mysql_direct().await;
    let cert: String = direct
        .query_first("SELECT @@ssl_cert")
        .await
        .expect("the server's TLS settings")
        .expect("one row");
    // MariaDB's certificate is its own authority, for the name localhost.
    let right = std::fs::read_to_string(&cert).expect("MariaDB's certificate");
    let other = common::pg_certificate_file(&common::pg_direct().await).await;
    let wrong = std::fs::read_to_string(other).expect("PostgreSQL's certificate");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &right).expect("ca");
    let host = format!("host = \"{}\"", env_or("WEIR_TEST_MYSQL_HOST", "127.0.0.1"));
    let source = common::mysql(
        "a",
        "my",
        &format!("tls = true\ntls_ca_file = {:?}\n", ca.display().to_string()),
    )
    .replace(&host, "host = \"localhost\"");
    let file = ConfigFile::new(&format!("{FAST}[tenants.a]\n{}{source}", api_keys(&["a1"])));
    let weir = start(&file);
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    client
        .execute("my", "SELECT 1", vec![])
        .await
        .expect("verified by the bundle");
    std::fs::write(&ca, &wrong).expect("ca");
    reloaded(&weir);
    let err = client
        .execute("my", "SELECT 1", vec![])
        .await
        .expect_err("a bundle that does not sign the server's certificate");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("certificate"), "{}", err.message());
    std::fs::write(&ca, &right).expect("ca");
    reloaded(&weir);
    client.execute("my", "SELECT 1", vec![]).await.expect("verified again");
}

/// A source whose password file cannot be read for a while (its Secret
/// deleted and made again) serves on as it was, and does not hold up the
/// rest of the reload: a key taken away in the same change is revoked.
#[tokio::test]
async fn an_unreadable_password_file_does_not_hold_up_a_key_revocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("pg-password");
    std::fs::write(&password, env_or("WEIR_TEST_PG_PASSWORD", "postgres")).expect("password");
    let config = |keys: &[&str]| {
        format!(
            "{FAST}[tenants.a]\n{}[tenants.a.sources.pg]\nengine = \"postgres\"\nhost = \"{}\"\nport = {}\n\
             user = \"{}\"\ndatabase = \"{}\"\npassword_file = {:?}\n",
            api_keys(keys),
            env_or("WEIR_TEST_PG_HOST", "127.0.0.1"),
            env_or("WEIR_TEST_PG_PORT", "5432"),
            env_or("WEIR_TEST_PG_USER", "postgres"),
            env_or("WEIR_TEST_PG_DATABASE", "test"),
            password.display().to_string(),
        )
    };
    let file = ConfigFile::new(&config(&["a1", "a2"]));
    let weir = start(&file);
    let leaked = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    leaked.execute("pg", "SELECT 1", vec![]).await.expect("a1 works");
    std::fs::remove_file(&password).expect("the Secret goes");
    file.write(&config(&["a2"]));
    let line = reloaded(&weir);
    assert_eq!(line["credentials_revoked"], 1, "{line}");
    let stale = weir.next_log(|l| l["message"] == "a source was kept as it was: its new settings could not be used");
    assert!(
        stale["error"].as_str().is_some_and(|e| e.contains("source pg")),
        "{stale}"
    );
    let err = leaked
        .execute("pg", "SELECT 1", vec![])
        .await
        .expect_err("a1 is revoked");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let kept = WeirClient::connect(&weir.addr, "key-a2").await.expect("a2");
    kept.execute("pg", "SELECT 1", vec![])
        .await
        .expect("the source serves on as it was");
    // An edit that changes more of such a source (here: read-only) cannot
    // be left out silently: the reload is refused until the password can
    // be read, and then applies.
    file.write(&format!("{}read_only = true\n", config(&["a2"])));
    let refused = refused(&weir);
    assert!(
        refused["error"].as_str().is_some_and(|e| e.contains("source pg")),
        "{refused}"
    );
    std::fs::write(&password, env_or("WEIR_TEST_PG_PASSWORD", "postgres")).expect("password");
    reloaded(&weir);
    let err = kept
        .execute("pg", "CREATE TEMP TABLE weir_reload_ro (id int)", vec![])
        .await
        .expect_err("read-only now");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// A source a reload replaced closes its pool once no call uses it, even
/// while a long call of the tenant (here a stream on another source) still
/// holds the snapshot it began with: the old pool's idle sessions do not
/// stay open, nor log in again with an old password, for as long as that
/// call lasts.
#[tokio::test]
async fn a_replaced_sources_idle_sessions_close_while_a_long_call_runs() {
    let config = |pool: u32| {
        format!(
            "{FAST}[tenants.a]\n{}{}{}",
            api_keys(&["a1"]),
            postgres("a", "pg", &format!("[tenants.a.sources.pg.pool]\nmax_size = {pool}\n")),
            postgres("a", "other", "")
        )
    };
    let file = ConfigFile::new(&config(2));
    let weir = start(&file);
    let client = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    // Both of the pool's sessions, by their server process ids.
    let pid = || async {
        let r = client
            .execute("pg", "SELECT pg_backend_pid(), pg_sleep(0.3)", vec![])
            .await
            .expect("pid");
        common::int(&r.rows[0].values[0])
    };
    let mut long = client
        .execute_stream("other", "SELECT g FROM generate_series(1, 20000000) g", vec![])
        .await
        .expect("stream");
    long.next_batch().await.expect("first batch");
    let pg = common::pg_direct().await;
    // Twice: the long call holds the first snapshot, which the second
    // reload must point on as well.
    for pool in [3, 4] {
        let (first, second) = tokio::join!(pid(), pid());
        assert_ne!(first, second);
        file.write(&config(pool));
        reloaded(&weir);
        client
            .execute("pg", "SELECT 1", vec![])
            .await
            .expect("the new pool serves");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let open: i64 = pg
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                    &[&vec![first as i32, second as i32]],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if open == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pool replaced by reload {pool} still has its sessions open"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    long.next_batch().await.expect("the long stream goes on");
}

/// A key taken away by a reload ends what was started with it: its result
/// streams and loads fail with UNAUTHENTICATED (`CREDENTIAL_REVOKED`), a
/// load leaving the table as it was, and its open transactions are rolled
/// back. The tenant's other key goes on.
#[tokio::test]
async fn a_revoked_key_ends_its_streams_loads_and_transactions() {
    let file = ConfigFile::new(&pg_keys(&["a1", "a2"]));
    let weir = start(&file);
    let kept = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    let gone = WeirClient::connect(&weir.addr, "key-a2").await.expect("a2");
    let table = "weir_reload_revoked";
    empty_table(&kept, table).await;

    // Two streams left unread after their first batch: each waits for its client.
    let rows = 1_000_000;
    let sql = format!("SELECT g FROM generate_series(1, {rows}) g");
    let mut kept_stream = kept.execute_stream("pg", &sql, vec![]).await.expect("a1 stream");
    let mut gone_stream = gone.execute_stream("pg", &sql, vec![]).await.expect("a2 stream");
    let mut kept_rows = kept_stream.next_batch().await.expect("a1 batch").map_or(0, |b| b.len());
    let mut gone_rows = gone_stream.next_batch().await.expect("a2 batch").map_or(0, |b| b.len());
    assert!(kept_rows > 0 && gone_rows > 0);

    // A transaction holding a lock, and a load with rows still to come.
    let lock = "47110815";
    let tx = gone
        .begin("pg", pb::IsolationLevel::Unspecified, false)
        .await
        .expect("begin");
    gone.execute_in(&tx, "pg", &format!("SELECT pg_advisory_xact_lock({lock})"), vec![])
        .await
        .expect("lock");
    let (more_rows, load) = open_load(&gone, table, ids(1..2)).await;
    let pg = common::pg_direct().await;
    assert!(
        common::wait_until_running(&pg, table, Duration::from_secs(5)).await,
        "the load reached the engine"
    );

    file.write(&pg_keys(&["a1"]));
    let line = reloaded(&weir);
    assert_eq!(line["credentials_revoked"], 1, "{line}");

    let revoked = |e: &tonic::Status| e.code() == Code::Unauthenticated && reason(e) == "CREDENTIAL_REVOKED";
    let err = loop {
        match gone_stream.next_batch().await {
            Ok(Some(batch)) => gone_rows += batch.len(),
            Ok(None) => panic!("the revoked key's stream ended as if complete after {gone_rows} rows"),
            Err(e) => break e,
        }
    };
    assert!(revoked(&err), "{err:?}");
    assert!(gone_rows < rows, "{gone_rows}");

    let err = tokio::time::timeout(Duration::from_secs(10), load)
        .await
        .expect("the load ends without its client ending it")
        .expect("load task")
        .expect_err("the load is stopped");
    assert!(revoked(&err), "{err:?}");
    drop(more_rows);
    let count = kept
        .execute("pg", &format!("SELECT count(*) FROM {table}"), vec![])
        .await
        .expect("count");
    assert_eq!(common::int(&count.rows[0].values[0]), 0, "nothing was loaded");

    // The transaction is rolled back: its lock is free again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let free = kept
            .execute("pg", &format!("SELECT pg_try_advisory_xact_lock({lock})"), vec![])
            .await
            .expect("try lock");
        if matches!(free.rows[0].values[0].kind, Some(pb::value::Kind::BoolValue(true))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked key's transaction still holds its lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = kept
        .execute_in(&tx, "pg", "SELECT 1", vec![])
        .await
        .expect_err("the handle is gone");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    while let Some(batch) = kept_stream.next_batch().await.expect("the kept key's stream goes on") {
        kept_rows += batch.len();
    }
    assert_eq!(kept_rows, rows);
    kept.execute("pg", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("drop");
}

/// A call that authenticated before the reload and waited for its turn at
/// the tenant's rate meanwhile never reaches its source. It is refused at
/// the revocation, not at its turn: waiting, it held a slot of its tenant
/// and a turn a valid key could have had, which it gives back.
#[tokio::test]
async fn a_call_revoked_while_waiting_for_its_turn_never_runs() {
    let paced = |keys: &[&str]| {
        format!(
            "{}[tenants.a.limits]\nrequests_per_second = 1\nburst = 1\nmax_rate_wait = \"9s\"\n",
            pg_keys(keys)
        )
    };
    let file = ConfigFile::new(&paced(&["a1", "a2"]));
    let weir = start(&file);
    let kept = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    let gone = WeirClient::connect(&weir.addr, "key-a2").await.expect("a2");
    let table = "weir_reload_waiting";
    kept.execute("pg", &format!("CREATE TABLE IF NOT EXISTS {table} (id bigint)"), vec![])
        .await
        .expect("create");
    // The bucket is empty now: these wait about one, two, three and four
    // seconds for their turns. The last is a transaction that would begin.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let gone = gone.clone();
        waiting.push(tokio::spawn(async move {
            gone.execute("pg", &format!("INSERT INTO {table} VALUES (1)"), vec![])
                .await
                .map(|_| ())
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waiting.push(tokio::spawn({
        let gone = gone.clone();
        async move {
            gone.begin("pg", pb::IsolationLevel::Unspecified, false)
                .await
                .map(|_| ())
        }
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    file.write(&paced(&["a1"]));
    reloaded(&weir);
    let revoked = std::time::Instant::now();
    for call in waiting {
        let err = call.await.expect("task").expect_err("revoked while waiting");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert_eq!(reason(&err), "CREDENTIAL_REVOKED");
    }
    assert!(
        revoked.elapsed() < Duration::from_millis(1500),
        "refused at their turns, not at the revocation: {:?}",
        revoked.elapsed()
    );
    // The revoked key's turns went back to the bucket: the kept key's call
    // takes the first (within about a second), not the fifth.
    let count = kept
        .execute("pg", &format!("SELECT count(*) FROM {table}"), vec![])
        .await
        .expect("count");
    assert!(
        revoked.elapsed() < Duration::from_millis(2500),
        "the revoked calls' turns were kept: {:?}",
        revoked.elapsed()
    );
    assert_eq!(common::int(&count.rows[0].values[0]), 0, "the statement never ran");
    kept.execute("pg", &format!("DROP TABLE {table}"), vec![])
        .await
        .expect("drop");
}

/// A call that waited for a gateway slot while its key was revoked is
/// refused at the revocation, and never reaches its source.
#[tokio::test]
async fn a_call_revoked_while_queued_for_a_gateway_slot_never_runs() {
    let one_slot = |keys: &[&str]| {
        format!(
            "[server]\nreload_interval = \"100ms\"\nmax_concurrent_requests = 1\nmax_queue_wait = \"20s\"\n\
             [tenants.a]\n{}{}",
            api_keys(keys),
            postgres("a", "pg", "")
        )
    };
    let file = ConfigFile::new(&one_slot(&["a1", "a2"]));
    let weir = start(&file);
    let kept = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    let gone = WeirClient::connect(&weir.addr, "key-a2").await.expect("a2");
    // The gateway's one slot, held for 8 s.
    let holder = tokio::spawn({
        let kept = kept.clone();
        async move { kept.execute("pg", "SELECT pg_sleep(8)", vec![]).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let begin = tokio::spawn({
        let gone = gone.clone();
        async move { gone.begin("pg", pb::IsolationLevel::Unspecified, false).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    file.write(&one_slot(&["a1"]));
    reloaded(&weir);
    let err = tokio::time::timeout(Duration::from_secs(4), begin)
        .await
        .expect("refused at the revocation, not when the slot frees")
        .expect("task")
        .expect_err("revoked while queued");
    assert_eq!(reason(&err), "CREDENTIAL_REVOKED", "{err:?}");
    assert!(
        !holder.is_finished(),
        "the slot was still held when the queued call was refused"
    );
    holder.await.expect("task").expect("the holder's statement");
}

/// Threads of the process named `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

/// A consumer whose client stopped reading ends when its key is revoked,
/// not at its idle timeout: it leaves its group, and a member with a key
/// still valid gets every partition, where the revoked one used to keep
/// its share (paused, still a member) until the stream's idle timeout.
#[tokio::test]
async fn a_revoked_consumer_whose_client_stopped_reading_leaves_its_group() {
    let config = |keys: &[&str]| {
        format!(
            "{FAST}{}{}",
            tenant("a", keys, ""),
            kafka("a", "events", "weir-reload-")
        )
    };
    let file = ConfigFile::new(&config(&["a1", "a2"]));
    let weir = start(&file);
    let kept = WeirClient::connect(&weir.addr, "key-a1").await.expect("a1");
    let gone = WeirClient::connect(&weir.addr, "key-a2").await.expect("a2");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("weir-reload-unread-{tag}");
    common::create_topic(&topic, 2).await;
    common::produce_ballast(&kept, &topic, 2_000).await;
    let group = format!("unread-{tag}");
    let consume = |client: &WeirClient| {
        let mut stream = client.stream();
        let request = common::consume_request(&topic, &group, 0, false);
        async move { stream.consume(request).await.expect("consume").into_inner() }
    };
    let mut unread = consume(&gone).await;
    let first = tokio::time::timeout(Duration::from_secs(30), unread.message()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
    // Its buffers fill, and its stream waits for the client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    file.write(&config(&["a1"]));
    let line = reloaded(&weir);
    assert_eq!(line["credentials_revoked"], 1, "{line}");
    let mut reader = consume(&kept).await;
    let mut partitions = std::collections::HashSet::new();
    let within = tokio::time::timeout(Duration::from_secs(30), async {
        while partitions.len() < 2 {
            let batch = reader.message().await.expect("the kept key's stream").expect("open");
            partitions.extend(batch.records.iter().map(|r| r.partition));
        }
    })
    .await;
    assert!(
        within.is_ok(),
        "the kept member got only partitions {partitions:?}: the revoked one still holds the rest"
    );
    drop(unread);
}

#[tokio::test]
async fn a_removed_kafka_source_leaves_no_thread_behind() {
    let with = format!(
        "{FAST}{}{}",
        tenant("a", &["a1"], ""),
        kafka("a", "events", "weir-reload-")
    );
    let file = ConfigFile::new(&with);
    let weir = start(&file);
    // Each Kafka source's producer has a thread that serves its delivery reports.
    assert_eq!(threads_named(weir.pid(), "weir-kafka-poll"), 1);
    file.write(&format!("{FAST}{}", tenant("a", &["a1"], "")));
    let line = reloaded(&weir);
    assert_eq!(line["sources_dropped"], 1, "{line}");
    // It polls for up to a second at a time, then sees that its producer is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while threads_named(weir.pid(), "weir-kafka-poll") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the removed source's delivery thread is still running"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    works(&weir, "key-a1")
        .await
        .expect("the tenant's other source still works");
}

/// A source removed by a reload takes its metric series with it: a
/// `weir_source_up` of 0 left behind would keep an alert firing for a source
/// that no longer exists.
#[tokio::test]
async fn a_removed_sources_series_go_with_it() {
    let base = format!(
        "[server]\nreload_interval = \"100ms\"\nhealth_check_interval = \"100ms\"\n{}",
        tenant("series", &["s"], "")
    );
    let extra = "[tenants.series.sources.gone]\nengine = \"sqlite\"\npath = \":memory:\"\n";
    let file = ConfigFile::new(&format!("{base}{extra}"));
    let server = common::TestServer::start_file(&file.path).await;
    let shown = || async {
        let (_, text) = common::http_get(&server.metrics_url, "/metrics").await;
        text.lines()
            .any(|l| l.contains("tenant=\"series\"") && l.contains("source=\"gone\""))
    };
    let mut seen = false;
    for _ in 0..50 {
        seen = shown().await;
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the source's series appear");
    file.write(&base);
    let mut gone = false;
    for _ in 0..50 {
        gone = !shown().await;
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, text) = common::http_get(&server.metrics_url, "/metrics").await;
    let left: Vec<_> = text
        .lines()
        .filter(|l| l.contains("tenant=\"series\"") && l.contains("source=\"gone\""))
        .collect();
    assert!(gone, "the removed source's series are gone: {left:?}");
    server.stop().await;
}

/// A reload that takes a topic out of a Kafka source's allow-list ends the
/// streams reading it (NOT_FOUND, as a topic outside the list is), instead
/// of letting them read on for as long as they run; a stream of a topic
/// still allowed goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_topic_list_ends_the_streams_reading_what_it_took_away() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (kept, dropped) = (format!("weir-keep-{tag}"), format!("weir-narrow-{tag}"));
    let source = |prefix: &str| {
        format!(
            "[tenants.a.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\ntopics = [\"{kept}\"]\n{prefix}",
            common::kafka_bootstrap()
        )
    };
    let config = |prefix: &str| format!("{FAST}{}{}", tenant("a", &["a1"], ""), source(prefix));
    let file = ConfigFile::new(&config("topic_prefix = \"weir-narrow-\"\n"));
    let server = common::TestServer::start_file(&file.path).await;
    let client = server.client("key-a1").await;
    let mut streams = Vec::new();
    for topic in [&kept, &dropped] {
        common::create_topic(topic, 1).await;
        produce_to_events(&client, topic, 1).await;
        let mut stream = client
            .stream()
            .consume(common::consume_request(topic, &format!("g-{topic}"), 0, false))
            .await
            .expect("consume")
            .into_inner();
        assert!(next_batch(&mut stream).await.expect("a batch").is_some());
        streams.push(stream);
    }
    // Explicit start offsets may name a topic beside `topics`: it is read too.
    let mut sideways = common::consume_request(&kept, &format!("g-{kept}"), 0, false);
    sideways.start = Some(pb::StartPosition {
        position: Some(pb::start_position::Position::Offsets(pb::PartitionOffsets {
            offsets: vec![pb::PartitionOffset {
                topic: dropped.clone(),
                partition: 0,
                offset: 0,
            }],
        })),
    });
    let mut sideways = client.stream().consume(sideways).await.expect("consume").into_inner();
    assert!(next_batch(&mut sideways).await.expect("a batch").is_some());
    file.write(&config(""));
    let ended = error_ending(&mut sideways).await;
    assert_eq!(ended.code(), Code::NotFound, "the stream reading by offsets: {ended:?}");
    let ended = error_ending(&mut streams.pop().expect("stream")).await;
    assert_eq!(ended.code(), Code::NotFound, "{ended:?}");
    let mut on_kept = streams.pop().expect("stream");
    produce_to_events(&client, &kept, 1).await;
    assert!(next_batch(&mut on_kept)
        .await
        .expect("the kept topic's stream goes on")
        .is_some());
    server.stop().await;
}

/// A reload that replaces a Kafka source without moving it (a topic added,
/// a password rotated) leaves its running streams known to the source in
/// force: CommitOffsets still goes through their group membership, and a
/// later reload that takes their topic away still ends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_kafka_source_still_knows_the_streams_begun_before() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (read, added) = (format!("weir-narrow-{tag}"), format!("weir-added-{tag}"));
    let config = |topics: &str, prefix: &str| {
        format!(
            "{FAST}{}[tenants.a.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\n\
             topics = [{topics}]\n{prefix}",
            tenant("a", &["a1"], ""),
            common::kafka_bootstrap()
        )
    };
    let prefix = "topic_prefix = \"weir-narrow-\"\n";
    let file = ConfigFile::new(&config("", prefix));
    let server = common::TestServer::start_file(&file.path).await;
    let client = server.client("key-a1").await;
    common::create_topic(&read, 1).await;
    common::create_topic(&added, 1).await;
    produce_to_events(&client, &read, 3).await;
    let group = format!("g-{tag}");
    let request = common::consume_request(&read, &group, 0, true);
    let mut stream = client.stream().consume(request).await.expect("consume").into_inner();
    assert!(next_batch(&mut stream).await.expect("a batch").is_some());
    // A topic added: the source is replaced (a new client), not moved.
    file.write(&config(&format!("\"{added}\""), prefix));
    let listed = || async {
        common::list_topics(&client)
            .await
            .topics
            .iter()
            .any(|t| t.name == added)
    };
    let started = std::time::Instant::now();
    while !listed().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the reload took the added topic"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    produce_to_events(&client, &read, 1).await;
    assert!(
        next_batch(&mut stream).await.expect("the stream reads on").is_some(),
        "the stream reads on"
    );
    let commit = pb::CommitOffsetsRequest {
        source: "events".into(),
        group: group.clone(),
        offsets: vec![pb::PartitionOffset {
            topic: read.clone(),
            partition: 0,
            offset: 2,
        }],
    };
    client
        .stream()
        .commit_offsets(commit)
        .await
        .expect("committed through the stream's membership");
    // Its topic taken away by the next reload: the stream ends.
    file.write(&config(&format!("\"{added}\""), ""));
    let ended = error_ending(&mut stream).await;
    assert_eq!(ended.code(), Code::NotFound, "{ended:?}");
    server.stop().await;
}

/// A consumer whose stream a reload ended (its key revoked) hands over no
/// more of what it had buffered: every batch the client was given was
/// committed, and the next consumer of the group starts right after them,
/// neither reading them twice nor skipping any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_ended_by_a_reload_gives_nothing_it_does_not_commit() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("weir-ended-{tag}");
    let config = |keys: &[&str]| {
        format!(
            "{FAST}{}[tenants.a.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\n\
             topic_prefix = \"weir-ended-\"\n",
            tenant("a", keys, ""),
            common::kafka_bootstrap()
        )
    };
    let file = ConfigFile::new(&config(&["a1", "a2"]));
    let server = common::TestServer::start_file(&file.path).await;
    let client = server.client("key-a2").await;
    common::create_topic(&topic, 1).await;
    // Records of 200 KiB: batches of about 1 MiB, more than the buffers between hold.
    for call in 0..8u8 {
        let records = (0..5)
            .map(|i| pb::ProducerRecord {
                value: vec![call * 5 + i; 200 * 1024],
                ..Default::default()
            })
            .collect();
        common::produce(&client, &topic, records).await.expect("produce");
    }
    // HTTP/2's smallest windows: the transport takes a batch only as the client reads.
    let mut raw = common::small_window_stream_client(&server.addr, "key-a1").await;
    let group = format!("g-{tag}");
    let request = |max_records: u64| common::consume_request(&topic, &group, max_records, false);
    let mut stream = raw.consume(request(0)).await.expect("consume").into_inner();
    let mut last = next_batch(&mut stream)
        .await
        .expect("a batch")
        .and_then(|b| b.records.last().map(|r| r.offset))
        .expect("records");
    // The server's reader fills its buffer meanwhile; then a1 is revoked,
    // before the client reads on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    file.write(&config(&["a2"]));
    let a1 = server.client("key-a1").await;
    let started = std::time::Instant::now();
    while a1.execute("demo", "SELECT 1", vec![]).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "a1 was revoked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = loop {
        match next_batch(&mut stream).await {
            Ok(Some(batch)) => last = batch.records.last().map_or(last, |r| r.offset),
            Ok(None) => panic!("ended with OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let mut again = client.stream().consume(request(1)).await.expect("consume").into_inner();
    let resumed = next_batch(&mut again)
        .await
        .expect("a batch")
        .and_then(|b| b.records.first().map(|r| r.offset))
        .expect("a record");
    assert_eq!(resumed, last + 1, "given up to {last}, the group resumed at {resumed}");
    server.stop().await;
}

/// A Kafka source pointed elsewhere by a reload (here, other client
/// settings) ends the streams begun on it, as it ends change streams: they
/// may be begun again at once on the source as it now is. A source removed
/// ends them as not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_end_when_their_source_moves_or_goes() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("weir-moved-{tag}");
    let source = |options: &str| {
        format!(
            "[tenants.a.sources.events]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\n\
             topic_prefix = \"weir-moved-\"\n{options}",
            common::kafka_bootstrap()
        )
    };
    let config = |source: &str| format!("{FAST}{}{source}", tenant("a", &["a1"], ""));
    let file = ConfigFile::new(&config(&source("")));
    let server = common::TestServer::start_file(&file.path).await;
    let client = server.client("key-a1").await;
    common::create_topic(&topic, 1).await;
    produce_to_events(&client, &topic, 1).await;
    let open = || async {
        let request = common::consume_request(&topic, &format!("g-{}", uuid::Uuid::new_v4().simple()), 0, false);
        let mut stream = client.stream().consume(request).await.expect("consume").into_inner();
        assert!(next_batch(&mut stream).await.expect("a batch").is_some());
        stream
    };
    let mut stream = open().await;
    let moved = source("[tenants.a.sources.events.kafka_options]\n\"client.rack\" = \"r1\"\n");
    file.write(&config(&moved));
    let ended = error_ending(&mut stream).await;
    assert_eq!(
        (ended.code(), reason(&ended).as_str()),
        (Code::Unavailable, "SOURCE_RECONFIGURED"),
        "{ended:?}"
    );
    let mut stream = open().await;
    file.write(&config(""));
    let ended = error_ending(&mut stream).await;
    assert_eq!(ended.code(), Code::NotFound, "{ended:?}");
    server.stop().await;
}

/// Produces `n` records of one byte to `topic` of the source `events`.
async fn produce_to_events(client: &WeirClient, topic: &str, n: usize) {
    let records = (0..n)
        .map(|_| pb::ProducerRecord {
            value: b"v".to_vec(),
            ..Default::default()
        })
        .collect();
    common::produce(client, topic, records).await.expect("produce");
}

/// The error a Consume stream ends with, after the batches before it.
async fn error_ending(stream: &mut tonic::Streaming<pb::ConsumeResponse>) -> tonic::Status {
    loop {
        match next_batch(stream).await {
            Err(status) => return status,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended with OK"),
        }
    }
}

/// The next batch of a Consume stream, within 30 s.
async fn next_batch(
    stream: &mut tonic::Streaming<pb::ConsumeResponse>,
) -> Result<Option<pb::ConsumeResponse>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("within 30 s")
}

//! Test harness: the real gateway on port 0, reached through the real client,
//! in front of real engines (PostgreSQL from WEIR_TEST_PG_*, embedded SQLite).
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use weir_client::arrow_array::cast::AsArray;
use weir_client::arrow_array::types::{
    Date32Type, Float64Type, Int64Type, IntervalMonthDayNanoType, Time64NanosecondType, TimestampMicrosecondType,
    UInt64Type,
};
use weir_client::arrow_array::{Array, RecordBatch};
use weir_client::arrow_schema::{DataType, TimeUnit};
use weir_client::weir_proto::v1 as pb;
use weir_client::weir_proto::v1::value::Kind;
use weir_client::WeirClient;
use weir_server::{Config, Listeners};

pub struct TestServer {
    pub addr: String,
    /// Base URL of the metrics/health HTTP port.
    pub metrics_url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(toml: &str) -> TestServer {
        Self::start_config(Config::from_toml(toml).expect("test configuration is valid")).await
    }

    /// Starts on a configuration file, which is then watched for changes.
    pub async fn start_file(path: &std::path::Path) -> TestServer {
        Self::start_config(Config::load(Some(path)).expect("test configuration is valid")).await
    }

    pub async fn start_config(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = format!("http://{}", listener.local_addr().expect("local addr"));
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let metrics_url = format!("http://{}", metrics.local_addr().expect("local addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = Listeners {
            grpc: listener,
            metrics: Some(metrics),
        };
        let handle = tokio::spawn(weir_server::run(config, listeners, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            metrics_url,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// "127.0.0.1:port", for building other URLs (https).
    pub fn host_port(&self) -> &str {
        self.addr.trim_start_matches("http://")
    }

    pub async fn client(&self, key: &str) -> WeirClient {
        WeirClient::connect(&self.addr, key)
            .await
            .expect("connect to the test server")
    }

    /// Stops the server and waits for it to finish draining.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task").expect("server ran cleanly");
        }
    }
}

/// Request options with a priority no version of the API has.
pub fn unknown_priority() -> Option<pb::RequestOptions> {
    Some(pb::RequestOptions {
        priority: 77,
        tag: String::new(),
    })
}

/// A gRPC health client of `server` (no key needed).
pub async fn health_client(
    server: &TestServer,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(server.addr.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
}

pub fn key_hash(key: &str) -> String {
    hex::encode(weir_server::tenant::hash_key(key))
}

/// A tenant section: `id` with API key `key-<id>`, extra limit lines and sources.
pub fn tenant(id: &str, limits: &str, sources: &str) -> String {
    format!(
        "[tenants.{id}]\napi_keys = [{{ id = \"k\", sha256 = \"{}\" }}]\n[tenants.{id}.limits]\n{limits}\n{sources}\n",
        key_hash(&format!("key-{id}"))
    )
}

pub fn sqlite_demo(tenant: &str, name: &str) -> String {
    format!("[tenants.{tenant}.sources.{name}]\nengine = \"sqlite\"\npath = \":memory:\"\ndemo_data = true\n")
}

/// Gives a password variable the documented default, so that sources can
/// always name it in `password_env` (set before any server starts).
fn default_env(name: &str, default: &str) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock();
    if std::env::var_os(name).is_none() {
        std::env::set_var(name, default);
    }
}

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// A PostgreSQL source section for the test server (WEIR_TEST_PG_* variables).
pub fn postgres(tenant: &str, name: &str, extra: &str) -> String {
    postgres_at(tenant, name, &env_or("WEIR_TEST_PG_PORT", "5432"), extra)
}

/// The same, reached at `port` of the test PostgreSQL's host (a [`Proxy`]'s).
pub fn postgres_at(tenant: &str, name: &str, port: &str, extra: &str) -> String {
    let password = if std::env::var("WEIR_TEST_PG_PASSWORD").is_ok() {
        "password_env = \"WEIR_TEST_PG_PASSWORD\"\n"
    } else {
        ""
    };
    format!(
        "[tenants.{tenant}.sources.{name}]\nengine = \"postgres\"\nhost = \"{}\"\nport = {port}\nuser = \"{}\"\ndatabase = \"{}\"\n{password}{extra}\n",
        env_or("WEIR_TEST_PG_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_PG_USER", "postgres"),
        env_or("WEIR_TEST_PG_DATABASE", "test"),
    )
}

/// The file of the test PostgreSQL's TLS certificate.
pub async fn pg_certificate_file(pg: &tokio_postgres::Client) -> String {
    pg.query_one(
        "SELECT CASE WHEN setting LIKE '/%' THEN setting
                ELSE current_setting('data_directory') || '/' || setting END
         FROM pg_settings WHERE name = 'ssl_cert_file'",
        &[],
    )
    .await
    .expect("the server's certificate file")
    .get(0)
}

/// The test PostgreSQL's address, for a [`Proxy`] in front of it.
pub fn pg_address() -> String {
    format!(
        "{}:{}",
        env_or("WEIR_TEST_PG_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_PG_PORT", "5432")
    )
}

/// A TCP proxy that can stop carrying bytes while every connection stays
/// open, as a cut network does, or close new connections at once, as a
/// server that is not the one meant would close a cancel request's.
pub struct Proxy {
    pub port: u16,
    /// Every connection frozen, and those opened before the n-th frozen.
    frozen: tokio::sync::watch::Sender<(bool, u64)>,
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stalling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u32>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (frozen, rx) = tokio::sync::watch::channel((false, 0u64));
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = opened.clone();
        let (cuts, cut) = tokio::sync::watch::channel(0u32);
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse = refusing.clone();
        let stalling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stall = stalling.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                if stall.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        drop(inbound);
                    });
                    continue;
                }
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let id = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (from_client, to_client) = inbound.into_split();
                let (from_server, to_server) = outbound.into_split();
                tokio::spawn(carry(from_client, to_server, (id, rx.clone()), cut.clone()));
                tokio::spawn(carry(from_server, to_client, (id, rx.clone()), cut.clone()));
            }
        });
        Proxy {
            port,
            frozen,
            opened,
            refusing,
            stalling,
            cuts,
        }
    }

    /// New connections are held 300 ms, carrying nothing, then closed: a
    /// connection attempt that fails, slowly enough for callers to queue on it.
    pub fn refuse_slowly(&self, stalling: bool) {
        self.stalling.store(stalling, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every connection open now, both ways, as a network failure
    /// that ends in resets would; new connections are carried again.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_modify(|f| f.0 = frozen);
    }

    /// Stops carrying the connections open now, for good; new ones are
    /// carried: a server that went silent behind a failover's new address.
    pub fn freeze_open(&self) {
        let opened = self.opened.load(std::sync::atomic::Ordering::SeqCst);
        self.frozen.send_modify(|f| f.1 = opened);
    }

    /// New connections are closed at once while `refusing`; open ones carry on.
    pub fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    (id, mut frozen): (u64, tokio::sync::watch::Receiver<(bool, u64)>),
    mut cut: tokio::sync::watch::Receiver<u32>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    cut.mark_unchanged();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Both halves go when both directions return: the sockets close.
            _ = cut.changed() => return,
        };
        // Bytes read while frozen are held, not lost.
        let carried = |(all, before): &(bool, u64)| !*all && id >= *before;
        if frozen.wait_for(carried).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A direct connection to the test PostgreSQL, for setup and for checking
/// what the gateway did (pg_stat_activity).
pub async fn pg_direct() -> tokio_postgres::Client {
    pg_direct_to(&env_or("WEIR_TEST_PG_DATABASE", "test")).await
}

/// The rows of `table`, counted by `pg`.
pub async fn pg_count(pg: &tokio_postgres::Client, table: &str) -> i64 {
    pg.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// The same, to another database of the test PostgreSQL server.
pub async fn pg_direct_to(database: &str) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host(env_or("WEIR_TEST_PG_HOST", "127.0.0.1"))
        .port(env_or("WEIR_TEST_PG_PORT", "5432").parse().expect("port"))
        .user(env_or("WEIR_TEST_PG_USER", "postgres"))
        .dbname(database);
    if let Ok(p) = std::env::var("WEIR_TEST_PG_PASSWORD") {
        config.password(p);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.expect(
        "PostgreSQL for tests is not reachable: run ./scripts/test, or set WEIR_TEST_PG_HOST/PORT/USER/PASSWORD/DATABASE",
    );
    tokio::spawn(connection);
    client
}

/// Waits until a backend of the gateway runs a statement containing `needle`.
pub async fn wait_until_running(pg: &tokio_postgres::Client, needle: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while wait_until_gone(pg, needle, Duration::ZERO).await {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Waits until no backend of the gateway runs a statement containing `needle`.
pub async fn wait_until_gone(pg: &tokio_postgres::Client, needle: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let running: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weir' AND state = 'active' AND query LIKE '%' || $1 || '%'",
                &[&needle],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running == 0 {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One entry of the `ErrorInfo` metadata of a status ("" when absent).
pub fn error_metadata(status: &tonic::Status, key: &str) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get(key).cloned())
        .unwrap_or_default()
}

pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

pub fn engine_code(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get("engine_code").cloned())
        .unwrap_or_default()
}

pub fn int(v: &pb::Value) -> i64 {
    match v.kind {
        Some(pb::value::Kind::Int64Value(i)) => i,
        ref other => panic!("expected an int64 value, got {other:?}"),
    }
}

pub fn text(v: &pb::Value) -> &str {
    match &v.kind {
        Some(pb::value::Kind::StringValue(s)) => s,
        other => panic!("expected a string value, got {other:?}"),
    }
}

pub fn is_null(v: &pb::Value) -> bool {
    matches!(v.kind, Some(pb::value::Kind::Null(_)) | None)
}

/// A MySQL/MariaDB source section for the test server (WEIR_TEST_MYSQL_* variables).
pub fn mysql(tenant: &str, name: &str, extra: &str) -> String {
    default_env("WEIR_TEST_MYSQL_PASSWORD", "weir");
    format!(
        "[tenants.{tenant}.sources.{name}]\nengine = \"mysql\"\nhost = \"{}\"\nport = {}\nuser = \"{}\"\ndatabase = \"{}\"\npassword_env = \"WEIR_TEST_MYSQL_PASSWORD\"\n{extra}\n",
        env_or("WEIR_TEST_MYSQL_HOST", "127.0.0.1"),
        env_or("WEIR_TEST_MYSQL_PORT", "3306"),
        env_or("WEIR_TEST_MYSQL_USER", "weir"),
        env_or("WEIR_TEST_MYSQL_DATABASE", "test"),
    )
}

/// Source `name` of `tenant` on the test MySQL/MariaDB (see [`mysql`]),
/// reached through a new [`Proxy`] in front of it.
pub async fn mysql_behind_proxy(tenant: &str, name: &str, extra: &str) -> (Proxy, String) {
    let port = env_or("WEIR_TEST_MYSQL_PORT", "3306");
    let proxy = Proxy::start(format!("{}:{port}", env_or("WEIR_TEST_MYSQL_HOST", "127.0.0.1"))).await;
    let source = mysql(tenant, name, extra).replace(&format!("port = {port}"), &format!("port = {}", proxy.port));
    (proxy, source)
}

/// A direct connection to the test MySQL/MariaDB.
pub async fn mysql_direct() -> mysql_async::Conn {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(env_or("WEIR_TEST_MYSQL_HOST", "127.0.0.1"))
        .tcp_port(env_or("WEIR_TEST_MYSQL_PORT", "3306").parse().expect("port"))
        .user(Some(env_or("WEIR_TEST_MYSQL_USER", "weir")))
        .pass(Some(env_or("WEIR_TEST_MYSQL_PASSWORD", "weir")))
        .db_name(Some(env_or("WEIR_TEST_MYSQL_DATABASE", "test")))
        .prefer_socket(false);
    mysql_async::Conn::new(opts).await.expect(
        "MariaDB for tests is not reachable: run ./scripts/test, or set WEIR_TEST_MYSQL_HOST/PORT/USER/PASSWORD/DATABASE",
    )
}

/// How many statements whose text is like `pattern` (SQL LIKE) other
/// sessions of the test MariaDB are running.
pub async fn mysql_running(direct: &mut mysql_async::Conn, pattern: &str) -> i64 {
    use mysql_async::prelude::Queryable;
    let n: Option<i64> = direct
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE ? AND ID <> CONNECTION_ID()",
            (pattern,),
        )
        .await
        .expect("processlist");
    n.unwrap_or(0)
}

/// The value of one sample line of the exposition, by metric name and
/// labels (summed over lines that match; 0 when none does).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.0 GET (the metrics port), returning status and body.
pub async fn http_get(base: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("connect to the metrics port");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A SQL Server source from `WEIR_TEST_MSSQL_URL`, a `;`-separated list of
/// `key=value` (values cannot contain `;`):
/// `host=127.0.0.1;port=1433;user=sa;password=Secret_123;database=master;trust_server_certificate=true`.
/// Keys: `host` (required), `port` (1433), `user` (sa), `password`,
/// `database` (the login's default), `tls` and `trust_server_certificate`
/// (true/false, default false). Tests that use it are marked ignored and run
/// with `--include-ignored` (scripts/test does that when the variable is set).
pub fn mssql_live(tenant: &str, name: &str, extra: &str) -> String {
    let url = std::env::var("WEIR_TEST_MSSQL_URL").expect("set WEIR_TEST_MSSQL_URL to run the SQL Server tests");
    let mut keys = std::collections::HashMap::new();
    for part in url.split(';').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .expect("WEIR_TEST_MSSQL_URL: key=value pairs separated by ';'");
        keys.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let get = |k: &str, default: &str| keys.get(k).cloned().unwrap_or_else(|| default.to_string());
    let mut toml = format!(
        "[tenants.{tenant}.sources.{name}]\nengine = \"mssql\"\nhost = \"{}\"\nport = {}\nuser = \"{}\"\n\
         tls = {}\ntrust_server_certificate = {}\n",
        keys.get("host").expect("WEIR_TEST_MSSQL_URL needs host="),
        get("port", "1433"),
        get("user", "sa"),
        get("tls", "false"),
        get("trust_server_certificate", "false"),
    );
    if let Some(db) = keys.get("database") {
        toml.push_str(&format!("database = \"{db}\"\n"));
    }
    if let Some(password) = keys.get("password") {
        // Sources read passwords from the environment or a file, never the configuration.
        default_env("WEIR_TEST_MSSQL_PASSWORD", password);
        toml.push_str("password_env = \"WEIR_TEST_MSSQL_PASSWORD\"\n");
    }
    // Last: `extra` may open a sub-table such as the pool's.
    toml.push_str(extra);
    toml.push('\n');
    toml
}

/// The source still answers `SELECT 1`, `times` times in a row: no pooled
/// connection was left broken or busy.
/// A transaction the database rolled back on its own refuses `sql` (which
/// would otherwise run outside it) and Commit, as ABORTED / TRANSACTION_LOST.
pub async fn assert_transaction_lost(client: &WeirClient, tx: &[u8], source: &str, sql: &str) {
    let err = client
        .execute_in(tx, source, sql, vec![])
        .await
        .expect_err("the transaction is gone");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (tonic::Code::Aborted, "TRANSACTION_LOST"),
        "{}",
        err.message()
    );
    let err = client.commit(tx).await.expect_err("nothing to commit");
    assert_eq!(err.code(), tonic::Code::Aborted, "{}", err.message());
}

/// Runs `n` calls of `SELECT pg_sleep(1)` on PostgreSQL source `source` at
/// once and asserts they ran side by side (all done within 1.9 s): the pool
/// has `n` usable connections, not fewer taking turns.
pub async fn assert_pool_holds(client: &WeirClient, source: &str, n: usize) {
    let started = tokio::time::Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (client, source) = (client.clone(), source.to_string());
            tokio::spawn(async move { client.execute(&source, "SELECT pg_sleep(1)", vec![]).await })
        })
        .collect();
    for call in calls {
        call.await.expect("call task").expect("a connection for each call");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1900),
        "{n} calls took turns ({took:?}): connections were lost"
    );
}

pub async fn assert_serves(client: &WeirClient, source: &str, times: usize) {
    for _ in 0..times {
        let r = client
            .execute(source, "SELECT 1", vec![])
            .await
            .expect("the source still serves");
        assert_eq!(int(&r.rows[0].values[0]), 1);
    }
}

/// The Kafka-protocol broker for tests (WEIR_TEST_KAFKA_BOOTSTRAP, default 127.0.0.1:9092).
pub fn kafka_bootstrap() -> String {
    env_or("WEIR_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
}

/// A Kafka source section: the test broker, topics under `prefix`, short
/// group session timeouts so that joins take seconds, not tens of seconds.
pub fn kafka(tenant: &str, name: &str, prefix: &str) -> String {
    format!(
        "[tenants.{tenant}.sources.{name}]\nengine = \"kafka\"\nbootstrap_servers = \"{}\"\ntopic_prefix = \"{prefix}\"\n\
         [tenants.{tenant}.sources.{name}.kafka_options]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
        kafka_bootstrap()
    )
}

/// Creates a topic on the test broker through the Kafka admin API.
pub async fn create_topic(name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("the Kafka broker for tests is not reachable: run ./scripts/test, or set WEIR_TEST_KAFKA_BOOTSTRAP");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e:?}"));
    }
}

/// A bare gRPC client of `url`, for calls the Weir client cannot make
/// (raw message bytes, a path of the caller's own).
pub async fn raw_grpc(url: String) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc
}

/// The Redis for tests (WEIR_TEST_REDIS_URL, default redis://127.0.0.1:6379/0).
pub fn redis_url() -> String {
    env_or("WEIR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
}

/// The real `weir` binary in a child process with JSON logs on stderr,
/// for what only a process shows: signals, the log lines themselves.
pub struct WeirProcess {
    child: std::process::Child,
    logs: std::sync::mpsc::Receiver<serde_json::Value>,
    pub addr: String,
    /// The "weir listening" line.
    pub started: serde_json::Value,
}

impl WeirProcess {
    /// Starts `weir` with `args` on a free port and waits until it listens.
    pub fn start(args: &[&str]) -> WeirProcess {
        Self::start_logging("json", args)
    }

    /// As `start`, with logs in `format`; a line that is not JSON is read as a string.
    pub fn start_logging(format: &str, args: &[&str]) -> WeirProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["--log-format", format])
            .args(args)
            .env("WEIR__SERVER__LISTEN", "127.0.0.1:0")
            .env("WEIR__METRICS__ENABLED", "false")
            // What the test's own environment says is not the test's configuration.
            .env_remove("WEIR__SERVER__WORKER_THREADS")
            .env_remove("TOKIO_WORKER_THREADS")
            .env("WEIR_LOG", "warn,weir::audit=info,weir_server=info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start weir");
        let stderr = child.stderr.take().expect("stderr");
        let text = format == "text";
        let (tx, logs) = std::sync::mpsc::channel::<serde_json::Value>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Other lines of a JSON log (a library's own output) are not log lines.
                let v = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(_) if text => serde_json::Value::String(line),
                    Err(_) => continue,
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut process = WeirProcess {
            child,
            logs,
            addr: String::new(),
            started: serde_json::Value::Null,
        };
        let listening = process.next_log(|l| {
            l["message"] == "weir listening" || l.as_str().is_some_and(|l| l.contains(" weir listening "))
        });
        let addr = match listening.as_str() {
            Some(text) => text.split_once("addr=").and_then(|(_, a)| a.split(' ').next()),
            None => listening["addr"].as_str(),
        };
        process.addr = addr.expect("addr").to_string();
        process.started = listening;
        process
    }

    /// The next log line that satisfies `pred` (within 20 s).
    pub fn next_log(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        loop {
            let line = self
                .logs
                .recv_timeout(Duration::from_secs(20))
                .expect("a log line within 20 s");
            if pred(&line) {
                return line;
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server with SIGTERM and returns the log lines not read yet,
    /// up to the end of its stderr.
    pub fn stop(mut self) -> Vec<serde_json::Value> {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let status = self.child.wait().expect("weir exits");
        assert!(status.success(), "weir exits cleanly on SIGTERM: {status}");
        let mut rest = Vec::new();
        while let Ok(line) = self.logs.recv_timeout(Duration::from_secs(20)) {
            rest.push(line);
        }
        rest
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of a second test server (PostgreSQL without logical decoding,
/// MariaDB without binlog) that `./scripts/test` starts.
pub fn plain_port(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run ./scripts/test, which starts a PostgreSQL without logical decoding and a MariaDB without binlog")
    })
}

/// A source section on the second PostgreSQL (WEIR_TEST_PG_PLAIN_PORT).
pub fn plain_postgres(tenant: &str, name: &str, extra: &str) -> String {
    postgres(tenant, name, extra).replace(
        &format!("port = {}", env_or("WEIR_TEST_PG_PORT", "5432")),
        &format!("port = {}", plain_port("WEIR_TEST_PG_PLAIN_PORT")),
    )
}

/// A source section on the second MariaDB (WEIR_TEST_MYSQL_PLAIN_PORT).
pub fn plain_mysql(tenant: &str, name: &str, extra: &str) -> String {
    mysql(tenant, name, extra).replace(
        &format!("port = {}", env_or("WEIR_TEST_MYSQL_PORT", "3306")),
        &format!("port = {}", plain_port("WEIR_TEST_MYSQL_PLAIN_PORT")),
    )
}

/// Whether an Arrow cell holds what the row format's value says.
pub fn arrow_cell_is(column: &dyn Array, row: usize, v: &pb::Value) -> bool {
    use chrono::Datelike;
    if column.is_null(row) || is_null(v) {
        return column.is_null(row) && is_null(v);
    }
    match (column.data_type(), v.kind.as_ref().expect("value kind set")) {
        (DataType::Int64, Kind::Int64Value(i)) => column.as_primitive::<Int64Type>().value(row) == *i,
        (DataType::UInt64, Kind::Uint64Value(u)) => column.as_primitive::<UInt64Type>().value(row) == *u,
        (DataType::Float64, Kind::DoubleValue(f)) => column.as_primitive::<Float64Type>().value(row) == *f,
        (DataType::Boolean, Kind::BoolValue(b)) => column.as_boolean().value(row) == *b,
        (DataType::Utf8, Kind::StringValue(s) | Kind::DecimalValue(s) | Kind::JsonValue(s)) => {
            column.as_string::<i32>().value(row) == s
        }
        (DataType::Binary, Kind::BytesValue(b)) => column.as_binary::<i32>().value(row) == b.as_slice(),
        (DataType::FixedSizeBinary(16), Kind::UuidValue(u)) => {
            column.as_fixed_size_binary().value(row) == uuid::Uuid::parse_str(u).expect("uuid").as_bytes()
        }
        (DataType::Date32, Kind::DateValue(d)) => {
            let day = chrono::NaiveDate::from_ymd_opt(d.year, d.month as u32, d.day as u32).expect("date");
            column.as_primitive::<Date32Type>().value(row) == day.num_days_from_ce() - 719_163
        }
        (DataType::Timestamp(TimeUnit::Microsecond, _), Kind::TimestampValue(t)) => {
            column.as_primitive::<TimestampMicrosecondType>().value(row)
                == t.seconds * 1_000_000 + i64::from(t.nanos) / 1000
        }
        (DataType::Time64(TimeUnit::Nanosecond), Kind::TimeValue(t)) => {
            let nanos = (i64::from(t.hours) * 3600 + i64::from(t.minutes) * 60 + i64::from(t.seconds)) * 1_000_000_000
                + i64::from(t.nanos);
            column.as_primitive::<Time64NanosecondType>().value(row) == nanos
        }
        (DataType::Interval(_), Kind::IntervalValue(i)) => {
            let got = column.as_primitive::<IntervalMonthDayNanoType>().value(row);
            (got.months, got.days, got.nanoseconds) == (i.months, i.days, i.microseconds * 1000)
        }
        (DataType::List(_), Kind::ListValue(items)) => {
            let list = column.as_list::<i32>().value(row);
            list.len() == items.values.len()
                && items
                    .values
                    .iter()
                    .enumerate()
                    .all(|(i, item)| arrow_cell_is(list.as_ref(), i, item))
        }
        _ => false,
    }
}

/// Asserts that Arrow batches hold, cell by cell, the rows of the same result.
pub fn assert_arrow_holds_rows(batches: &[RecordBatch], rows: &[pb::Row]) {
    let mut row = 0;
    for batch in batches {
        let schema = batch.schema();
        for r in 0..batch.num_rows() {
            for (c, want) in rows[row].values.iter().enumerate() {
                let column = batch.column(c);
                assert!(
                    arrow_cell_is(column.as_ref(), r, want),
                    "row {row}, column {}: {:?} in Arrow is not {want:?}",
                    schema.field(c).name(),
                    column.slice(r, 1)
                );
            }
            row += 1;
        }
    }
    assert_eq!(row, rows.len(), "rows in Arrow");
}

/// `sql` (in `transaction`, unless it is empty) with a deadline of its own:
/// the call's grpc-timeout, which the server takes as the statement's limit.
/// Only this call is abandoned; the caller's next ones have the tenant's.
pub async fn execute_within(
    client: &WeirClient,
    transaction: &[u8],
    source: &str,
    sql: &str,
    deadline: Duration,
) -> Result<pb::ExecuteResponse, tonic::Status> {
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: source.into(),
        sql: sql.into(),
        transaction_id: transaction.to_vec(),
        ..Default::default()
    });
    request.set_timeout(deadline);
    client.query().execute(request).await.map(tonic::Response::into_inner)
}

/// Adds `authorization: Bearer <key>` to each request of a raw tonic client.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type RawStreamClient = pb::stream_service_client::StreamServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A raw StreamService client on HTTP/2's smallest windows: the server's
/// transport takes a message only as the client reads.
pub async fn small_window_stream_client(addr: &str, key: &str) -> RawStreamClient {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
        .expect("endpoint")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let bearer = format!("Bearer {key}").parse().expect("header");
    pb::stream_service_client::StreamServiceClient::with_interceptor(channel, Bearer(bearer))
}

/// `records` records of 10 kB to `topic`, alternating between partitions
/// 0 and 1: far more than a Consume stream's buffers hold.
pub async fn produce_ballast(client: &WeirClient, topic: &str, records: usize) {
    for call in 0..records.div_ceil(500) {
        let records = (call * 500..records.min((call + 1) * 500))
            .map(|i| pb::ProducerRecord {
                partition: Some(i32::from(i % 2 == 1)),
                value: vec![b'v'; 10_000],
                ..Default::default()
            })
            .collect();
        produce(client, topic, records).await.expect("produce");
    }
}

/// Produces `records` to `topic` of the source `events`.
pub async fn produce(
    client: &WeirClient,
    topic: &str,
    records: Vec<pb::ProducerRecord>,
) -> Result<pb::ProduceResponse, tonic::Status> {
    let mut stream = client.stream();
    stream
        .produce(pb::ProduceRequest {
            source: "events".into(),
            topic: topic.into(),
            records,
            options: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Consume `topic` of the source `events` from the group's start.
pub fn consume_request(topic: &str, group: &str, max: u64, manual: bool) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        source: "events".into(),
        topics: vec![topic.into()],
        group: group.into(),
        start: Some(pb::StartPosition {
            position: Some(pb::start_position::Position::Earliest(true)),
        }),
        commit_mode: if manual {
            pb::CommitMode::Manual as i32
        } else {
            pb::CommitMode::Unspecified as i32
        },
        max_records: max,
        options: None,
    }
}

/// The topics of source `events`.
pub async fn list_topics(client: &WeirClient) -> pb::ListTopicsResponse {
    client
        .stream()
        .list_topics(pb::ListTopicsRequest {
            source: "events".into(),
        })
        .await
        .expect("list topics")
        .into_inner()
}

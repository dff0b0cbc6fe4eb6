//! Typed configuration: a TOML file (or the built-in demo configuration),
//! overridden by `WEIR__SECTION__KEY` environment variables, validated once at
//! start with errors that name the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// The configuration used when `weir` starts without `--config`: one local
/// tenant `demo` (API key `demo`) with an embedded SQLite source seeded with
/// sample data. Local use only: the key is public.
pub const DEMO_CONFIG: &str = r#"
[tenants.demo]
api_keys = [{ id = "demo", sha256 = "2a97516c354b68848cdbd8f54a226a0a55b21ed138e207ad6c5cbb9c00aa5aea" }]

[tenants.demo.sources.demo]
engine = "sqlite"
path = ":memory:"
demo_data = true
"#;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("cannot read configuration: {path}: not valid TOML at line {line}, column {column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
}

/// Refuses a file that is not TOML, saying where: figment's own error
/// quotes the line the parser stopped at, which may hold a password (a
/// `redis_url` whose password has a `\` in it), and would reach the log.
/// A file that cannot be read is left to figment to report.
fn check_syntax(path: &Path) -> Result<(), ConfigError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Err(e) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let at = e.span().map_or(0, |span| span.start).min(text.len());
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = at - before.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) + 1;
    Err(ConfigError::Syntax {
        path: path.display().to_string(),
        line,
        column,
        message: e.message().trim().to_string(),
    })
}

/// A variable that looks meant as an override but would not be read as
/// one (`WEIR_SERVER__LISTEN`: overrides begin with two underscores) is an
/// error, as a misspelt key in the file is. Only one that goes on with a
/// section of the configuration: `WEIR_ACME__PG_PASSWORD` may well be a
/// source's `password_env`.
fn misnamed_overrides(vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>) -> Result<(), ConfigError> {
    for (name, _) in vars {
        let Some(name) = name.to_str() else { continue };
        let upper = name.to_ascii_uppercase();
        let Some(rest) = upper.strip_prefix("WEIR").filter(|_| !upper.starts_with("WEIR__")) else {
            continue;
        };
        let section = rest.trim_start_matches('_').split_once("__").map(|(head, _)| head);
        if section.is_some_and(is_section) {
            return Err(invalid(
                name,
                "looks like a configuration override, but overrides begin with WEIR__ (two underscores): rename it",
            ));
        }
    }
    Ok(())
}

/// Whether `head` (an override's first part, `SERVER`) names one of
/// `Config`'s tables: asked of `Config` itself, which refuses unknown ones,
/// so that a table added later counts without a list to keep.
fn is_section(head: &str) -> bool {
    !head.is_empty()
        && head.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && Config::from_toml(&format!("[{}]\n", head.to_ascii_lowercase())).is_ok()
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub metrics: MetricsConfig,
    pub telemetry: TelemetryConfig,
    pub bulk: BulkConfig,
    pub changes: ChangesConfig,
    pub limits: GlobalLimitsConfig,
    pub auth: AuthConfig,
    /// Caps on database servers shared by several sources, by "host:port".
    pub backend_hosts: BTreeMap<String, BackendHostConfig>,
    /// Tenants by id.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// The file this configuration was read from, reread on SIGHUP or when it changes.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Largest request message accepted, in bytes.
    pub max_request_bytes: usize,
    /// How often every source is probed for gRPC health and `ListSources`.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// How long open streams may run after a shutdown signal before they are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long, after a shutdown signal, health says NOT_SERVING while
    /// new calls are still taken, so that a load balancer that polls
    /// health stops sending first (what a Kubernetes `preStop` sleep does).
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// How often the configuration file and the TLS files are checked for
    /// changes (a ConfigMap or Secret update); SIGHUP reloads at once.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Data calls in progress at once across all tenants. Calls beyond it
    /// wait, by priority and fairly across tenants, for `max_queue_wait`.
    pub max_concurrent_requests: u32,
    /// Longest a call waits for a free slot before RESOURCE_EXHAUSTED.
    #[serde(with = "humantime_serde")]
    pub max_queue_wait: Duration,
    /// A server stream whose client takes no message for this long is
    /// ended (DEADLINE_EXCEEDED, STREAM_STALLED) and its statement cancelled.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// A client connection idle this long is probed with TCP keepalives. A
    /// client that vanished without closing (its node lost, a NAT that
    /// dropped the flow) would otherwise hold a load's transaction, a
    /// consumer's partitions or a subscription until restart. Read at start.
    #[serde(with = "humantime_serde")]
    pub keepalive_time: Duration,
    /// Time between unanswered keepalive probes. Read at start.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Unanswered probes after which the connection, and every call on it,
    /// is ended. Read at start.
    pub keepalive_retries: u32,
    /// A client connection older than this is sent GOAWAY: its calls in
    /// progress run to their end, its next calls open a new connection,
    /// which a headless Service and `round_robin` place on any replica
    /// (new pods get traffic; long-lived channels otherwise stay where they
    /// first landed). A transaction's later calls may then reach another
    /// replica, which does not know its handle. Unset: connections live on.
    /// Read at start.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Option<Duration>,
    /// Compress responses with this encoding for clients that accept it.
    /// Off by default: most gRPC libraries advertise gzip whether or not
    /// the network needs it. Compressed requests are always accepted. Read at start.
    pub compression: Option<Compression>,
    /// Threads of the async runtime that serves every call; 0: one per CPU
    /// the process may use (a container's CPU limit included). Read at start.
    pub worker_threads: usize,
    /// Serve gRPC over TLS (and mutual TLS with `client_ca_file`).
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates are verified against;
    /// a verified certificate authenticates as the tenant whose
    /// `client_identities` name its subject CN or a SAN.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse connections without a client certificate (otherwise callers
    /// without one authenticate by API key or JWT).
    #[serde(default)]
    pub require_client_cert: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendHostConfig {
    /// Connections all sources on this server may open together, at most;
    /// keep it below the server's own max_connections.
    pub max_connections: u32,
}

/// Change streams open sessions of their own beside the pool: a reader, a
/// lock or position store, and a snapshot, at most.
pub const SESSIONS_PER_CHANGE_STREAM: u32 = 3;
/// Sessions a SQL source opens for `DeleteSubscription`, one at a time.
pub const DELETE_SESSIONS: u64 = 1;
/// The session a MySQL source keeps to `KILL` abandoned statements.
pub const KILL_SESSIONS: u64 = 1;

/// Ways to authenticate besides API keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer JWTs from one trusted issuer.
    pub jwt: Option<JwtConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Signature algorithm: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 or EdDSA.
    pub algorithm: String,
    /// HS*: environment variable holding the shared secret.
    pub secret_env: Option<String>,
    /// HS*: file holding the shared secret.
    pub secret_file: Option<PathBuf>,
    /// RS*, PS*, ES*, EdDSA: PEM public key of the issuer.
    pub public_key_file: Option<PathBuf>,
    /// Claim naming the tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

fn default_tenant_claim() -> String {
    "tenant".into()
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// The longest `auth.jwt.leeway` allowed.
const MAX_JWT_LEEWAY: Duration = Duration::from_secs(300);

/// More runtime threads than this is a typo, not a tuning.
const MAX_WORKER_THREADS: usize = 1024;

/// The least `max_file_bytes` of a SQLite source.
const MIN_SQLITE_FILE_BYTES: u64 = 64 * 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_request_bytes: 16 * 1024 * 1024,
            health_check_interval: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            reload_interval: Duration::from_secs(5),
            max_concurrent_requests: 1024,
            max_queue_wait: Duration::from_secs(1),
            stream_idle_timeout: Duration::from_secs(60),
            keepalive_time: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_retries: 3,
            max_connection_age: None,
            compression: None,
            worker_threads: 0,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz`.
    pub enabled: bool,
    /// HTTP listen address of the metrics endpoint.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint for traces (for example http://otel-collector:4317);
    /// OTEL_EXPORTER_OTLP_ENDPOINT is used when unset. No endpoint, no tracing cost.
    pub otlp_endpoint: Option<String>,
    /// service.name of exported spans; OTEL_SERVICE_NAME or "weir" when unset.
    pub service_name: Option<String>,
    /// PEM CA certificate(s) an https:// collector is verified against;
    /// OTEL_EXPORTER_OTLP_CERTIFICATE when unset, else the public web roots.
    pub otlp_ca_file: Option<PathBuf>,
}

/// What a global-limit check does when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailure {
    /// Admit on the local (per-replica) limits alone, counting the failure in metrics.
    #[default]
    FailOpen,
    /// Refuse the call with UNAVAILABLE.
    FailClosed,
}

/// Limits shared by every replica.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalLimitsConfig {
    /// Redis holding every tenant's request-rate bucket ("redis://host:6379/0").
    /// Unset: every limit counts per replica.
    pub redis_url: Option<String>,
    /// Longest a check may wait for Redis before `on_redis_failure` applies.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    pub on_redis_failure: RedisFailure,
    /// First part of every key Weir writes ("<prefix>:gcra:<bucket>:<tenant>"):
    /// deployments sharing one Redis database give each its own.
    pub redis_key_prefix: String,
}

/// `redis_url` may carry a password (`redis://:secret@host`): printed
/// without it, so that no debug line of a configuration shows it.
impl std::fmt::Debug for GlobalLimitsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A socket URL gives them as its query (`redis+unix:///s?user=u&pass=p`): it goes too.
        let url = self.redis_url.as_deref().map(|u| {
            let u = u.split_once('?').map_or(u, |(path, _)| path);
            match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => format!("{}://<credentials>@{}", &u[..scheme], &u[at + 1..]),
                _ => u.to_string(),
            }
        });
        f.debug_struct("GlobalLimitsConfig")
            .field("redis_url", &url)
            .field("redis_timeout", &self.redis_timeout)
            .field("on_redis_failure", &self.on_redis_failure)
            .field("redis_key_prefix", &self.redis_key_prefix)
            .finish()
    }
}

impl Default for GlobalLimitsConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_timeout: Duration::from_millis(50),
            on_redis_failure: RedisFailure::FailOpen,
            redis_key_prefix: "weir".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkConfig {
    /// Table in each target database where committed `load_id`s are recorded,
    /// in the same transaction as the rows they loaded. Created on first use
    /// in the connection's default schema.
    pub load_id_table: String,
}

impl Default for BulkConfig {
    fn default() -> Self {
        Self {
            load_id_table: "weir_load_ids".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChangesConfig {
    /// SQL Server change streams' pause after a poll that found changes; it
    /// doubles while polls find none, up to 2 s (PostgreSQL and MySQL push theirs).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A quiet stream sends a heartbeat with an advancing position this often.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for ChangesConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(50),
            heartbeat_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    pub api_keys: Vec<ApiKeyConfig>,
    /// mTLS: client-certificate identities of this tenant, each matched
    /// exactly against the subject CN and every DNS, URI and email SAN.
    pub client_identities: Vec<String>,
    /// Put each call's SQL text in the audit log (off: it may hold personal data).
    pub audit_sql: bool,
    pub limits: LimitsConfig,
    /// Sources by name; names are private to the tenant.
    pub sources: BTreeMap<String, SourceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A label for logs and audit (never the key itself).
    pub id: String,
    /// Hex SHA-256 of the key, as printed by `weir hash-key`.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sustained requests per second (token refill rate).
    pub requests_per_second: u32,
    /// Requests that may arrive at once above the sustained rate.
    pub burst: u32,
    /// Over the rate, a call whose turn comes within this long (and before
    /// its deadline) waits for it instead of being refused; zero refuses at once.
    #[serde(with = "humantime_serde")]
    pub max_rate_wait: Duration,
    /// Calls in progress at once, streams included.
    pub max_concurrent_requests: u32,
    /// Rows a unary `Execute` may return; larger results fail (use ExecuteStream).
    pub max_rows_per_response: u64,
    /// Encoded bytes a unary `Execute` may return.
    pub max_bytes_per_response: u64,
    /// Longest a statement may run (a shorter gRPC deadline wins).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// An unused transaction is rolled back after this long.
    #[serde(with = "humantime_serde")]
    pub transaction_idle_timeout: Duration,
    /// Bulk loads in progress at once.
    pub max_concurrent_loads: u32,
    /// Rows one load may carry; more fails the load (RESOURCE_EXHAUSTED) and rolls it back.
    pub max_rows_per_load: u64,
    /// Sustained rows per second across the tenant's loads; faster senders are slowed, not refused.
    pub load_rows_per_second: u32,
    /// Sustained request bytes per second across the tenant's loads; likewise slowed.
    pub load_bytes_per_second: u32,
    /// Kafka `Consume` streams open at once.
    pub max_concurrent_consumers: u32,
    /// Largest Kafka record produced (key, value and headers), in bytes.
    pub max_record_bytes: u64,
    /// Change streams (`WatchChanges`) open at once.
    pub max_concurrent_subscriptions: u32,
    /// Sustained StreamService records per second: Kafka records produced and
    /// consumed, and change events, together; faster callers are slowed.
    pub stream_records_per_second: u32,
    /// Sustained StreamService bytes per second, likewise.
    pub stream_bytes_per_second: u32,
    /// `ExecuteStream` result streams open at once.
    pub max_concurrent_streams: u32,
    /// Transactions open at once.
    pub max_open_transactions: u32,
    /// Share of the gateway's slots, relative to other tenants, when calls wait for one.
    pub weight: u32,
    /// Highest priority the tenant's calls may ask for; higher requests are lowered to it.
    pub max_priority: Priority,
}

/// A gRPC message encoding for responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Accepted by every gRPC library.
    Gzip,
    /// Cheaper for the same ratio; accepted by fewer clients (tonic, grpc-go with its package).
    Zstd,
}

/// Scheduling priority of a call (`RequestOptions.priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    /// What a call that names none gets.
    #[default]
    Medium,
    High,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 100,
            burst: 200,
            max_rate_wait: Duration::from_millis(250),
            max_concurrent_requests: 32,
            max_rows_per_response: 10_000,
            max_bytes_per_response: 16 * 1024 * 1024,
            statement_timeout: Duration::from_secs(30),
            transaction_idle_timeout: Duration::from_secs(60),
            max_concurrent_loads: 4,
            max_rows_per_load: 100_000_000,
            load_rows_per_second: 2_000_000,
            load_bytes_per_second: 512 * 1024 * 1024,
            max_concurrent_consumers: 8,
            max_record_bytes: 1024 * 1024,
            max_concurrent_subscriptions: 4,
            stream_records_per_second: 200_000,
            stream_bytes_per_second: 256 * 1024 * 1024,
            max_concurrent_streams: 16,
            max_open_transactions: 16,
            weight: 1,
            max_priority: Priority::Medium,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
    Sqlite,
    /// Microsoft SQL Server or Azure SQL, with SQL Server authentication.
    Mssql,
    /// Apache Kafka or a Kafka-protocol broker (Redpanda, tansu, ...).
    Kafka,
}

/// One source. Engine-specific keys are checked by `validate`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub engine: EngineKind,
    /// Writes are refused by the engine (read-only sessions), not by parsing SQL.
    #[serde(default)]
    pub read_only: bool,
    /// gRPC health reports NOT_SERVING while a required source is unreachable.
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub pool: PoolConfig,
    // PostgreSQL
    pub host: Option<String>,
    pub port: Option<u16>,
    pub database: Option<String>,
    pub user: Option<String>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (a mounted Kubernetes Secret).
    pub password_file: Option<PathBuf>,
    /// The password sealed by `weir seal` (AES-256-GCM under a key from WEIR_SEAL_KEYS).
    pub password_sealed: Option<String>,
    /// Connect with TLS, verifying the server's certificate (PostgreSQL,
    /// MySQL, SQL Server). Without it a SQL Server session is plaintext, the
    /// login's password included, unless the server itself requires encryption.
    #[serde(default)]
    pub tls: bool,
    /// Accept the server's certificate without verifying it (a fresh SQL
    /// Server presents a self-signed one). Still encrypted, but open to an
    /// impostor on the network path.
    #[serde(default)]
    pub trust_server_certificate: bool,
    /// PEM file of the authorities that sign the server's certificate (a
    /// cloud provider's bundle), instead of the public web roots (PostgreSQL,
    /// MySQL) or the system's (SQL Server, which takes one certificate).
    pub tls_ca_file: Option<PathBuf>,
    /// PostgreSQL: when a pooled session is reset for its next caller.
    /// Default `auto`: after every statement but plain reads (see
    /// docs/configuration.md); `always`: after every statement.
    pub session_reset: Option<SessionReset>,
    /// PostgreSQL: unary plain reads share a few pipelined connections
    /// instead of taking one each (off unless set).
    pub multiplex: Option<MultiplexConfig>,
    // SQLite
    /// Database file, or ":memory:" for a private in-memory database.
    pub path: Option<String>,
    /// Seed the database with the demo data set (customers, products, orders).
    #[serde(default)]
    pub demo_data: bool,
    /// The most bytes the database may hold (SQLite's `max_page_count`);
    /// a write past it fails with RESOURCE_EXHAUSTED. Unset: the disk's.
    pub max_file_bytes: Option<u64>,
    // Kafka
    /// Brokers to bootstrap from, "host:port,host:port".
    pub bootstrap_servers: Option<String>,
    /// Topics the tenant may use, by exact name.
    #[serde(default)]
    pub topics: Vec<String>,
    /// And every topic whose name starts with this.
    pub topic_prefix: Option<String>,
    /// librdkafka settings passed through as they are (security.protocol,
    /// sasl.mechanism, ssl.ca.location, compression.type, linger.ms, ...).
    /// Secrets do not belong here: `user` and `password_env`/`password_file`
    /// give sasl.username and sasl.password.
    #[serde(default)]
    pub kafka_options: BTreeMap<String, String>,
}

/// When a pooled PostgreSQL session is returned to its connect-time state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionReset {
    /// After every statement except a read that calls only built-in
    /// functions known to leave the session alone.
    Auto,
    /// After every statement, for databases whose views or policies call
    /// functions that change session state.
    Always,
}

/// Pipelined PostgreSQL connections shared by unary plain reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiplexConfig {
    /// Shared connections, taken from `pool.max_size`.
    pub connections: u32,
    /// The engine ends a shared statement that runs longer: a caller that
    /// leaves cannot cancel it (a cancel would hit whichever statement runs
    /// on that session), and the statements behind it wait for it.
    #[serde(default = "MultiplexConfig::default_statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl MultiplexConfig {
    fn default_statement_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub max_size: u32,
    pub min_idle: u32,
    /// Longest a call waits for a free connection before RESOURCE_EXHAUSTED.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Longest a new connection may take to open.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle connections above `min_idle` are closed after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: 8,
            min_idle: 0,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

impl Config {
    /// Loads `path` (or the demo configuration when `None`), applies
    /// `WEIR__...` environment overrides and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        misnamed_overrides(std::env::vars_os())?;
        let base = match path {
            Some(p) => {
                check_syntax(p)?;
                Figment::from(Toml::file_exact(p))
            }
            None => Figment::from(Toml::string(DEMO_CONFIG)),
        };
        // An override changes a tenant the file defines; one that made a
        // tenant of its own is a misspelt name (`WEIR__TENANTS__ACMEE__...`),
        // which would leave the tenant meant as it was without a word.
        let defined: std::collections::HashSet<String> = base
            .find_value("tenants")
            .ok()
            .and_then(|v| v.into_dict())
            .map(|tenants| tenants.into_keys().collect())
            .unwrap_or_default();
        let mut config = Self::from_figment(base.merge(Env::prefixed("WEIR__").split("__")))?;
        if let Some(id) = config.tenants.keys().find(|id| !defined.contains(*id)) {
            return Err(invalid(
                format!("tenants.{id}"),
                "is named only by an environment override (WEIR__TENANTS__...), not by the configuration \
                 file; overrides change the tenants the file defines: check the tenant's name",
            ));
        }
        config.path = path.map(Path::to_path_buf);
        Ok(config)
    }

    /// Parses a TOML text (tests, embedded configurations) without environment overrides.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    fn from_figment(f: Figment) -> Result<Self, ConfigError> {
        let config: Config = f.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_request_bytes < 1024 {
            return Err(invalid("server.max_request_bytes", "must be at least 1024"));
        }
        if let Some(url) = &self.limits.redis_url {
            if redis::Client::open(url.as_str()).is_err() {
                return Err(invalid("limits.redis_url", "not a Redis URL (redis://host:port/db)"));
            }
        }
        if self.limits.redis_key_prefix.is_empty() || self.limits.redis_key_prefix.len() > 100 {
            return Err(invalid("limits.redis_key_prefix", "must be 1 to 100 characters"));
        }
        if self.limits.redis_timeout.is_zero() {
            return Err(invalid("limits.redis_timeout", "must be greater than 0"));
        }
        for (name, value) in [
            ("changes.poll_interval", self.changes.poll_interval),
            ("changes.heartbeat_interval", self.changes.heartbeat_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        for (name, value) in [
            ("server.reload_interval", self.server.reload_interval),
            ("server.max_queue_wait", self.server.max_queue_wait),
            ("server.stream_idle_timeout", self.server.stream_idle_timeout),
            ("server.health_check_interval", self.server.health_check_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "server.worker_threads",
                format!("at most {MAX_WORKER_THREADS} (0: one per CPU)"),
            ));
        }
        // Set in whole seconds: Linux refuses 0 and values past 32767, and
        // the socket would then keep its defaults (2 hours).
        for (name, value) in [
            ("server.keepalive_time", self.server.keepalive_time),
            ("server.keepalive_interval", self.server.keepalive_interval),
        ] {
            if value < Duration::from_secs(1) || value.as_secs() > 32_767 {
                return Err(invalid(name, "from 1s to 32767s (about 9 hours)"));
            }
        }
        if self
            .server
            .max_connection_age
            .is_some_and(|age| age < Duration::from_secs(1))
        {
            return Err(invalid("server.max_connection_age", "at least 1s, or unset"));
        }
        if !(1..=127).contains(&self.server.keepalive_retries) {
            return Err(invalid("server.keepalive_retries", "from 1 to 127"));
        }
        if self.server.max_concurrent_requests == 0 {
            return Err(invalid("server.max_concurrent_requests", "must be greater than 0"));
        }
        if let Some(tls) = &self.server.tls {
            if tls.require_client_cert && tls.client_ca_file.is_none() {
                return Err(invalid(
                    "server.tls.require_client_cert",
                    "needs client_ca_file, the CAs that sign the client certificates it requires",
                ));
            }
        }
        if let Some(jwt) = &self.auth.jwt {
            // Clock skew is seconds: a day's leeway accepts expired tokens
            // for a day, and one past the Unix time overflows the check.
            if jwt.leeway > MAX_JWT_LEEWAY {
                return Err(invalid(
                    "auth.jwt.leeway",
                    format!("at most {MAX_JWT_LEEWAY:?}: it is the clock skew allowed, not a token lifetime"),
                ));
            }
            crate::transport::jwt::JwtVerifier::new(jwt).map_err(|e| invalid("auth.jwt", e))?;
        }
        let table = &self.bulk.load_id_table;
        let plain = table.len() <= 63
            && table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && table
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain {
            return Err(invalid(
                "bulk.load_id_table",
                "a table name of 1-63 characters a-z, 0-9 and '_', not starting with a digit",
            ));
        }
        self.check_backend_hosts()?;
        let mut seen_keys = std::collections::HashSet::new();
        let mut seen_identities = std::collections::HashSet::new();
        let asks_for_certificates = self.server.tls.as_ref().is_some_and(|tls| tls.client_ca_file.is_some());
        for (tenant_id, tenant) in &self.tenants {
            let t = format!("tenants.{tenant_id}");
            check_name(&t, tenant_id)?;
            for (i, key) in tenant.api_keys.iter().enumerate() {
                let k = format!("{t}.api_keys[{i}].sha256");
                let bytes =
                    hex::decode(&key.sha256).map_err(|_| invalid(&k, "must be 64 hex digits (see `weir hash-key`)"))?;
                if bytes.len() != 32 {
                    return Err(invalid(&k, "must be 64 hex digits (see `weir hash-key`)"));
                }
                if !seen_keys.insert(bytes) {
                    return Err(invalid(&k, "the same key is configured twice"));
                }
            }
            if !tenant.client_identities.is_empty() && !asks_for_certificates {
                // Without client CAs no certificate is asked for: these names could never match.
                return Err(invalid(
                    format!("{t}.client_identities"),
                    "needs server.tls.client_ca_file, the CAs that sign these clients' certificates",
                ));
            }
            for (i, identity) in tenant.client_identities.iter().enumerate() {
                if identity.is_empty() {
                    return Err(invalid(format!("{t}.client_identities[{i}]"), "must not be empty"));
                }
                if tenant.client_identities[..i].contains(identity) {
                    return Err(invalid(format!("{t}.client_identities[{i}]"), "listed twice"));
                }
                if !seen_identities.insert(identity.as_str()) {
                    return Err(invalid(
                        format!("{t}.client_identities[{i}]"),
                        "the same identity is configured for two tenants",
                    ));
                }
            }
            tenant.limits.validate(&format!("{t}.limits"))?;
            for (name, source) in &tenant.sources {
                let s = format!("{t}.sources.{name}");
                check_name(&s, name)?;
                source.validate(&s)?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// `backend_hosts` entries no source connects to: their cap protects
    /// nothing (a typo, or a port left out), worth a warning at start and at
    /// each reload. Logged by the caller: at load the log is not set up yet.
    pub fn unused_backend_hosts(&self) -> Vec<&str> {
        self.backend_hosts
            .keys()
            .filter(|host| self.sources_on(host).next().is_none())
            .map(String::as_str)
            .collect()
    }

    /// The sources that connect to `host` ("host:port"): tenant id, tenant, source name, source.
    fn sources_on<'a>(
        &'a self,
        host: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a TenantConfig, &'a str, &'a SourceConfig)> + 'a {
        self.tenants.iter().flat_map(move |(tenant_id, tenant)| {
            tenant
                .sources
                .iter()
                .filter(move |(_, source)| source.host_port().as_deref() == Some(host))
                .map(move |(name, source)| (tenant_id.as_str(), tenant, name.as_str(), source))
        })
    }

    /// Every configured database server's cap must hold even with every
    /// pool full and every change stream open, so tenants together cannot
    /// exhaust the server's connections.
    fn check_backend_hosts(&self) -> Result<(), ConfigError> {
        for (host, cap) in &self.backend_hosts {
            let key = format!("backend_hosts.\"{host}\".max_connections");
            if cap.max_connections == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
            // Matched against each source's "host:port" as written: without a
            // port the cap would silently protect nothing.
            if host
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(invalid(
                    format!("backend_hosts.\"{host}\""),
                    "name the server as host:port, as its sources' host and port (db.internal:5432)",
                ));
            }
            let mut total = 0u64;
            let mut parts = Vec::new();
            for (tenant_id, tenant, name, source) in self.sources_on(host) {
                let streams = u64::from(tenant.limits.max_concurrent_subscriptions)
                    * u64::from(SESSIONS_PER_CHANGE_STREAM)
                    + DELETE_SESSIONS;
                let streams = match source.engine {
                    EngineKind::Kafka => 0,
                    EngineKind::Mysql => streams + KILL_SESSIONS,
                    _ => streams,
                };
                let n = u64::from(source.pool.max_size) + streams;
                total += n;
                parts.push(format!("tenants.{tenant_id}.sources.{name}: {n}"));
            }
            if total > u64::from(cap.max_connections) {
                return Err(invalid(
                    key,
                    format!(
                        "the sources on {host} may open up to {total} connections ({}; pool.max_size plus {SESSIONS_PER_CHANGE_STREAM} per change stream the tenant may open, {DELETE_SESSIONS} for DeleteSubscription and, on MySQL, {KILL_SESSIONS} to stop abandoned statements), more than {}; lower pool.max_size or max_concurrent_subscriptions",
                        parts.join(", "),
                        cap.max_connections
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Tenant and source names appear in metrics and handles: keep them plain.
fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(key, "names are 1-63 characters of a-z, 0-9, '_' and '-'"))
    }
}

/// The longest `max_rate_wait` allowed.
const MAX_RATE_WAIT: Duration = Duration::from_secs(10);

impl LimitsConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let positive = [
            ("requests_per_second", u64::from(self.requests_per_second)),
            ("burst", u64::from(self.burst)),
            ("max_concurrent_requests", u64::from(self.max_concurrent_requests)),
            ("max_rows_per_response", self.max_rows_per_response),
            ("max_bytes_per_response", self.max_bytes_per_response),
            ("max_concurrent_loads", u64::from(self.max_concurrent_loads)),
            ("max_rows_per_load", self.max_rows_per_load),
            ("load_rows_per_second", u64::from(self.load_rows_per_second)),
            ("load_bytes_per_second", u64::from(self.load_bytes_per_second)),
            ("max_concurrent_consumers", u64::from(self.max_concurrent_consumers)),
            ("max_record_bytes", self.max_record_bytes),
            (
                "max_concurrent_subscriptions",
                u64::from(self.max_concurrent_subscriptions),
            ),
            ("stream_records_per_second", u64::from(self.stream_records_per_second)),
            ("stream_bytes_per_second", u64::from(self.stream_bytes_per_second)),
            ("max_concurrent_streams", u64::from(self.max_concurrent_streams)),
            ("max_open_transactions", u64::from(self.max_open_transactions)),
            ("weight", u64::from(self.weight)),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(invalid(format!("{key}.{name}"), "must be greater than 0"));
            }
        }
        for (name, value) in [
            ("statement_timeout", self.statement_timeout),
            ("transaction_idle_timeout", self.transaction_idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(format!("{key}.{name}"), "must be greater than 0"));
            }
        }
        // Waiting calls hold their concurrency slots: a long wait is a queue.
        if self.max_rate_wait > MAX_RATE_WAIT {
            return Err(invalid(
                format!("{key}.max_rate_wait"),
                format!(
                    "at most {MAX_RATE_WAIT:?}; callers that can wait longer should retry after the RetryInfo delay"
                ),
            ));
        }
        Ok(())
    }
}

impl SourceConfig {
    /// Files the source's connections read besides its password file: the
    /// CA bundle, and Kafka's certificate, key and keystore files
    /// (`kafka_options` keys ending in `.location`). A reload rereads them
    /// when they change (a renewed certificate, a rotated CA bundle).
    pub fn credential_files(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.tls_ca_file.iter().cloned().chain(
            self.kafka_options
                .iter()
                .filter(|(key, _)| key.ends_with(".location"))
                .map(|(_, path)| PathBuf::from(path)),
        )
    }

    /// Whether `other` reaches the same database as the same login: a
    /// reload that changes only how Weir pools, checks or multiplexes it, or
    /// where its password comes from (a rotation), leaves the work in
    /// progress on the old sessions alone; one that points the source at
    /// another server, database or login, or changes its TLS settings, ends
    /// it (see `Tenants::retire_replaced_sources`). `read_only` has a check
    /// of its own: it ends only the transactions that could write.
    pub fn same_target(&self, other: &SourceConfig) -> bool {
        let target = |c: &SourceConfig| SourceConfig {
            read_only: false,
            required: false,
            pool: PoolConfig::default(),
            password_env: None,
            password_file: None,
            password_sealed: None,
            session_reset: None,
            multiplex: None,
            // A Kafka source's allow-list: what a reload takes out of it ends
            // the streams reading it, the rest go on (`retire_replaced_topics`).
            topics: Vec::new(),
            topic_prefix: None,
            max_file_bytes: None,
            ..c.clone()
        };
        target(self) == target(other)
    }

    /// Whether the two differ at most in where the password comes from.
    pub fn same_but_password(&self, other: &SourceConfig) -> bool {
        let rest = |c: &SourceConfig| SourceConfig {
            password_env: None,
            password_file: None,
            password_sealed: None,
            ..c.clone()
        };
        rest(self) == rest(other)
    }

    /// The pool's own connections: `pool.max_size` less those that
    /// multiplexing shares out.
    pub fn own_pool_size(&self) -> u32 {
        let shared = self.multiplex.as_ref().map_or(0, |m| m.connections);
        self.pool.max_size.saturating_sub(shared)
    }

    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.pool.max_size == 0 {
            return Err(invalid(format!("{key}.pool.max_size"), "must be greater than 0"));
        }
        if self.pool.min_idle > self.pool.max_size {
            return Err(invalid(format!("{key}.pool.min_idle"), "must not exceed pool.max_size"));
        }
        // Zero is not "never" here: it would refuse every call or close every connection at once.
        for (name, value) in [
            ("acquire_timeout", self.pool.acquire_timeout),
            ("connect_timeout", self.pool.connect_timeout),
            ("idle_timeout", self.pool.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(format!("{key}.pool.{name}"), "must be greater than 0"));
            }
        }
        const PASSWORDS: &[&str] = &["password_env", "password_file", "password_sealed"];
        const SERVER: &[&str] = &["host", "port", "database", "user"];
        let (allowed, required): (Vec<&str>, &[&str]) = match self.engine {
            EngineKind::Postgres => (
                [
                    SERVER,
                    PASSWORDS,
                    &[
                        "session_reset",
                        "multiplex",
                        "tls",
                        "trust_server_certificate",
                        "tls_ca_file",
                    ],
                ]
                .concat(),
                &["host", "user"],
            ),
            EngineKind::Mysql => (
                [SERVER, PASSWORDS, &["tls", "trust_server_certificate", "tls_ca_file"]].concat(),
                &["host", "user"],
            ),
            EngineKind::Sqlite => (vec!["path", "demo_data", "max_file_bytes"], &["path"]),
            EngineKind::Mssql => (
                [SERVER, PASSWORDS, &["tls", "trust_server_certificate", "tls_ca_file"]].concat(),
                &["host", "user"],
            ),
            EngineKind::Kafka => (
                [
                    &["bootstrap_servers", "topics", "topic_prefix", "kafka_options", "user"],
                    PASSWORDS,
                ]
                .concat(),
                &["bootstrap_servers"],
            ),
        };
        let present = [
            ("host", self.host.is_some()),
            ("port", self.port.is_some()),
            ("database", self.database.is_some()),
            ("user", self.user.is_some()),
            ("password_env", self.password_env.is_some()),
            ("password_file", self.password_file.is_some()),
            ("password_sealed", self.password_sealed.is_some()),
            ("path", self.path.is_some()),
            ("demo_data", self.demo_data),
            ("max_file_bytes", self.max_file_bytes.is_some()),
            ("tls", self.tls),
            ("trust_server_certificate", self.trust_server_certificate),
            ("tls_ca_file", self.tls_ca_file.is_some()),
            ("session_reset", self.session_reset.is_some()),
            ("multiplex", self.multiplex.is_some()),
            ("bootstrap_servers", self.bootstrap_servers.is_some()),
            ("topics", !self.topics.is_empty()),
            ("topic_prefix", self.topic_prefix.is_some()),
            ("kafka_options", !self.kafka_options.is_empty()),
        ];
        for (name, set) in present {
            if set && !allowed.contains(&name) {
                return Err(invalid(
                    format!("{key}.{name}"),
                    format!("not a setting of engine {:?}", self.engine),
                ));
            }
            if !set && required.contains(&name) {
                return Err(invalid(format!("{key}.{name}"), "is required for this engine"));
            }
        }
        // PostgreSQL's and MySQL's TLS settings would be silently ignored with
        // TLS off (SQL Server's apply also when the server asks for TLS).
        for (name, set) in [
            ("trust_server_certificate", self.trust_server_certificate),
            ("tls_ca_file", self.tls_ca_file.is_some()),
        ] {
            if set && !self.tls && matches!(self.engine, EngineKind::Postgres | EngineKind::Mysql) {
                return Err(invalid(format!("{key}.{name}"), "applies only with tls = true"));
            }
        }
        // PostgreSQL does not speak TLS over a Unix socket (host = its directory).
        let socket = self.host.as_deref().is_some_and(|h| h.starts_with('/'));
        if self.tls && socket && self.engine == EngineKind::Postgres {
            return Err(invalid(
                format!("{key}.tls"),
                "PostgreSQL offers no TLS over a Unix socket: name a TCP host, or leave tls off",
            ));
        }
        // Below a few pages SQLite could not even hold its schema.
        if self.max_file_bytes.is_some_and(|b| b < MIN_SQLITE_FILE_BYTES) {
            return Err(invalid(
                format!("{key}.max_file_bytes"),
                format!("must be at least {MIN_SQLITE_FILE_BYTES} (64 KiB)"),
            ));
        }
        // Each pooled connection would open a database of its own (SQLite
        // takes URIs): what one call wrote, the next would not see. Only
        // ":memory:" is shared among a source's connections.
        if let Some(path) = self.path.as_deref().filter(|_| self.engine == EngineKind::Sqlite) {
            let uri = path.to_ascii_lowercase();
            // `file:` with no name is a temporary database too.
            if path.is_empty()
                || uri == "file:"
                || uri.starts_with("file:?")
                || uri.starts_with("file::memory:")
                || (uri.starts_with("file:") && uri.contains("mode=memory"))
            {
                return Err(invalid(
                    format!("{key}.path"),
                    "an in-memory database is written \":memory:\" (which the source's connections share); \
                     an empty path or a memory URI would give each connection a database of its own",
                ));
            }
        }
        // A read-only SQLite source is never written, so it cannot be seeded
        // or start empty.
        if self.engine == EngineKind::Sqlite && self.read_only {
            if self.demo_data {
                return Err(invalid(
                    format!("{key}.demo_data"),
                    "a read_only source cannot be seeded",
                ));
            }
            if self.path.as_deref() == Some(":memory:") {
                return Err(invalid(
                    format!("{key}.path"),
                    "a read_only source needs a database file (\":memory:\" would stay empty)",
                ));
            }
        }
        if self.trust_server_certificate && self.tls_ca_file.is_some() {
            return Err(invalid(
                format!("{key}.tls_ca_file"),
                "trust_server_certificate accepts any certificate: set one or the other",
            ));
        }
        if let Some(multiplex) = &self.multiplex {
            if multiplex.connections == 0 || multiplex.connections >= self.pool.max_size {
                return Err(invalid(
                    format!("{key}.multiplex.connections"),
                    "must be at least 1 and less than pool.max_size (the rest serve everything else)",
                ));
            }
            if self.pool.min_idle > self.own_pool_size() {
                return Err(invalid(
                    format!("{key}.pool.min_idle"),
                    "must not exceed pool.max_size less multiplex.connections (the pool's own connections)",
                ));
            }
            if multiplex.statement_timeout.is_zero() {
                return Err(invalid(
                    format!("{key}.multiplex.statement_timeout"),
                    "must be greater than 0",
                ));
            }
            if self.session_reset == Some(SessionReset::Always) {
                return Err(invalid(
                    format!("{key}.multiplex"),
                    "shares sessions between plain reads, which session_reset = \"always\" says are not safe to share",
                ));
            }
        }
        if self.engine == EngineKind::Kafka {
            if self.topics.is_empty() && self.topic_prefix.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    format!("{key}.topics"),
                    "name the topics the tenant may use (topics, topic_prefix, or both)",
                ));
            }
            // Also a private key given inline, and OAUTHBEARER's settings,
            // which carry the client secret.
            if let Some(secret) = self.kafka_options.keys().find(|k| {
                let k = k.to_ascii_lowercase();
                k.contains("password")
                    || k.contains("secret")
                    || matches!(k.as_str(), "ssl.key.pem" | "ssl_key" | "sasl.oauthbearer.config")
            }) {
                return Err(invalid(
                    format!("{key}.kafka_options.{secret}"),
                    "secrets do not belong in the configuration file: use password_env, password_file or password_sealed \
                     (sasl.password), and ssl.key.location for a private key in a mounted file",
                ));
            }
            if self.read_only {
                return Err(invalid(
                    format!("{key}.read_only"),
                    "not a setting of Kafka sources: limit the topics instead",
                ));
            }
        }
        let ways = [
            ("password_env", self.password_env.is_some()),
            ("password_file", self.password_file.is_some()),
            ("password_sealed", self.password_sealed.is_some()),
        ];
        // Named by the second one set.
        if let Some((second, _)) = ways.iter().filter(|(_, set)| *set).nth(1) {
            return Err(invalid(
                format!("{key}.{second}"),
                "set one of password_env, password_file and password_sealed",
            ));
        }
        Ok(())
    }

    /// "host:port" of a database server source, with the engine's default port.
    pub fn host_port(&self) -> Option<String> {
        let port = self.port.or(match self.engine {
            EngineKind::Postgres => Some(5432),
            EngineKind::Mysql => Some(3306),
            EngineKind::Mssql => Some(1433),
            EngineKind::Sqlite | EngineKind::Kafka => None,
        })?;
        Some(format!("{}:{port}", self.host.as_deref()?))
    }

    /// Reads the password from its environment variable or file, if one is configured.
    pub fn password(&self) -> Result<Option<String>, String> {
        // Trailing line breaks go, from a variable as from a file: a Secret
        // made from a file (`--from-file`, then `envFrom`) often ends in one.
        let line = |s: String| Some(s.trim_end_matches(['\r', '\n']).to_string());
        if let Some(var) = &self.password_env {
            return std::env::var(var)
                .map(line)
                .map_err(|_| format!("environment variable {var} (password_env) is not set"));
        }
        if let Some(path) = &self.password_file {
            return std::fs::read_to_string(path)
                .map(line)
                .map_err(|e| format!("cannot read password_file {}: {e}", path.display()));
        }
        if let Some(sealed) = &self.password_sealed {
            return crate::sealed::open(sealed)
                .map(Some)
                .map_err(|e| format!("password_sealed: {e}"));
        }
        Ok(None)
    }
}

/// A `[server.tls]` that asks for client certificates, for tests of `client_identities`.
#[cfg(test)]
pub(crate) const MUTUAL_TLS: &str =
    "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"ca.pem\"\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_age_under_a_second_is_refused() {
        let age = |value: &str| Config::from_toml(&format!("[server]\nmax_connection_age = \"{value}\"\n"));
        let err = age("500ms").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("server.max_connection_age"), "{err}");
        assert_eq!(
            age("30m").expect("an age").server.max_connection_age,
            Some(std::time::Duration::from_secs(1800))
        );
    }

    #[test]
    fn a_redis_password_is_not_printed() {
        let config = Config::from_toml("[limits]\nredis_url = \"rediss://weir:hunter2@redis.internal:6380/0\"\n")
            .expect("config");
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("hunter2") && printed.contains("redis.internal:6380/0"),
            "{printed}"
        );
        let config = Config::from_toml("[limits]\nredis_url = \"redis+unix:///run/redis.sock?db=1&pass=hunter2\"\n")
            .expect("config");
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("hunter2") && printed.contains("/run/redis.sock"),
            "{printed}"
        );
    }

    #[test]
    fn a_file_that_is_not_toml_is_refused_without_quoting_its_line() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("weir.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[limits]\nredis_url = \"redis://:pa\\ss@redis:6379/0\"\n",
        )
        .expect("file");
        let err = Config::load(Some(&path)).expect_err("an invalid escape").to_string();
        assert!(!err.contains("pa\\ss") && !err.contains("redis:6379"), "{err}");
        assert!(err.contains("line 5, column"), "{err}");
    }

    #[test]
    fn kafka_secrets_stay_out_of_kafka_options() {
        let source = |key: &str| {
            Config::from_toml(&format!(
                "[tenants.t.sources.k]\nengine = \"kafka\"\nbootstrap_servers = \"b:9092\"\ntopics = [\"a\"]\n\
                 [tenants.t.sources.k.kafka_options]\n\"{key}\" = \"x\"\n"
            ))
        };
        for key in [
            "sasl.password",
            "ssl.key.pem",
            "sasl.oauthbearer.config",
            "ssl.keystore.password",
        ] {
            let err = source(key).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                err.contains(key) && err.contains("secrets do not belong"),
                "{key}: {err}"
            );
        }
        assert!(source("ssl.key.location").is_ok());
    }

    proptest::proptest! {
        /// Any text is a configuration or an error naming why; never a panic.
        #[test]
        fn any_text_loads_or_errs(text in ".{0,200}") {
            let _ = Config::from_toml(&text);
        }

        /// Limits of any size are accepted or refused by name; zero is always refused.
        #[test]
        fn any_limit_value_is_checked(key in proptest::sample::select(vec![
            "requests_per_second", "burst", "max_concurrent_requests", "max_concurrent_streams",
            "max_open_transactions", "weight", "max_rows_per_load", "stream_records_per_second",
        ]), value in proptest::num::i64::ANY) {
            let result = Config::from_toml(&format!("[tenants.a.limits]\n{key} = {value}\n"));
            if value <= 0 {
                let err = result.err().map(|e| e.to_string()).unwrap_or_default();
                proptest::prop_assert!(err.contains(key), "{}", err);
            }
        }
    }

    #[test]
    fn demo_config_is_valid() {
        let c = Config::from_toml(DEMO_CONFIG).expect("demo config");
        let demo = &c.tenants["demo"];
        assert_eq!(demo.sources["demo"].engine, EngineKind::Sqlite);
        assert_eq!(c.server.listen.port(), 50051);
    }

    #[test]
    fn redis_urls_may_ask_for_tls() {
        let parse = |url: &str| Config::from_toml(&format!("[limits]\nredis_url = \"{url}\"\n"));
        parse("redis://127.0.0.1:6379/0").expect("plain");
        // Managed Redis with encryption in transit: needs redis' TLS feature built in.
        parse("rediss://cache.example:6380/0").expect("TLS");
        assert!(parse("http://cache.example").is_err());
    }

    #[test]
    fn a_password_from_the_environment_loses_its_trailing_line_break() {
        const VAR: &str = "WEIR_TEST_PASSWORD_WITH_LINE_BREAK";
        std::env::set_var(VAR, "s3cret\r\n");
        let config = Config::from_toml(&format!(
            "[tenants.a.sources.pg]\nengine = \"postgres\"\nhost = \"h\"\ndatabase = \"d\"\nuser = \"u\"\npassword_env = \"{VAR}\"\n"
        ))
        .expect("config");
        let password = config.tenants["a"].sources["pg"].password().expect("password");
        assert_eq!(password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn a_jwt_leeway_longer_than_clock_skew_is_refused() {
        let parse = |v: &str| {
            Config::from_toml(&format!(
                "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\nalgorithm = \"HS256\"\n\
                 secret_env = \"WEIR_TEST_UNSET_SECRET\"\nleeway = \"{v}\"\n"
            ))
        };
        let err = parse("100y").expect_err("a century").to_string();
        assert!(err.contains("auth.jwt.leeway"), "{err}");
        let err = parse("301s").expect_err("past five minutes").to_string();
        assert!(err.contains("auth.jwt.leeway"), "{err}");
    }

    #[test]
    fn max_rate_wait_may_be_zero_but_not_long() {
        let parse = |v: &str| Config::from_toml(&format!("[tenants.a.limits]\nmax_rate_wait = \"{v}\"\n"));
        let zero = parse("0s").expect("zero refuses at once");
        assert_eq!(zero.tenants["a"].limits.max_rate_wait, Duration::ZERO);
        let err = parse("11s").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("max_rate_wait"), "{err}");
        assert_eq!(LimitsConfig::default().max_rate_wait, Duration::from_millis(250));
    }

    #[test]
    fn variables_that_look_like_overrides_but_are_not_read_are_refused() {
        let vars = |names: &[&str]| {
            names
                .iter()
                .map(|n| (std::ffi::OsString::from(n), std::ffi::OsString::from("x")))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let err = misnamed_overrides(vars(&["PATH", "WEIR_SERVER__LISTEN"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("WEIR_SERVER__LISTEN") && err.contains("WEIR__"), "{err}");
        assert!(misnamed_overrides(vars(&["WEIRSERVER__LISTEN"])).is_err());
        assert!(misnamed_overrides(vars(&["weir_tenants__acme__limits__burst"])).is_err());
        assert!(misnamed_overrides(vars(&["WEIR__SERVER__LISTEN", "WEIR_LOG", "WEIR_PG_PASSWORD"])).is_ok());
        // Another variable of the deployment's, such as a password_env.
        assert!(misnamed_overrides(vars(&["WEIR_ACME__PG_PASSWORD", "WEIRD__THING"])).is_ok());
        // Config's tables, and nothing else.
        for section in [
            "SERVER",
            "METRICS",
            "TELEMETRY",
            "BULK",
            "CHANGES",
            "LIMITS",
            "AUTH",
            "BACKEND_HOSTS",
            "TENANTS",
        ] {
            assert!(is_section(section), "{section}");
        }
        for other in ["ACME", "", "SERVER]\n[X", "WEIRD"] {
            assert!(!is_section(other), "{other:?}");
        }
    }

    #[test]
    fn a_source_keeps_its_target_through_pool_and_password_changes_only() {
        let source = |extra: &str| {
            let text = format!(
                "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"u\"\ndatabase = \"d\"\n{extra}"
            );
            let config = Config::from_toml(&text).expect("config");
            config.tenants["a"].sources["s"].clone()
        };
        let base = source("");
        for same in [
            "password_file = \"/run/secrets/pg\"\n",
            "read_only = true\nrequired = true\n",
            "[tenants.a.sources.s.pool]\nmax_size = 3\n",
        ] {
            assert!(base.same_target(&source(same)), "{same}");
        }
        for moved in ["port = 6432\n", "tls = true\n"] {
            assert!(!base.same_target(&source(moved)), "{moved}");
        }
        let other_login = Config::from_toml(
            "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"reader\"\ndatabase = \"d\"\n",
        )
        .expect("config");
        assert!(!base.same_target(&other_login.tenants["a"].sources["s"]));
        // A Kafka source's allow-list is not where it reaches; its client settings are.
        let kafka = |extra: &str| {
            let text = format!("[tenants.a.sources.k]\nengine = \"kafka\"\nbootstrap_servers = \"b:9092\"\n{extra}");
            Config::from_toml(&text).expect("config").tenants["a"].sources["k"].clone()
        };
        let topics = kafka("topics = [\"a\"]\n");
        assert!(topics.same_target(&kafka("topics = [\"a\", \"b\"]\ntopic_prefix = \"c-\"\n")));
        assert!(!topics.same_target(&kafka(
            "topics = [\"a\"]\n[tenants.a.sources.k.kafka_options]\n\"security.protocol\" = \"ssl\"\n"
        )));
    }

    #[test]
    fn zero_durations_that_would_break_every_call_are_refused() {
        let pg = "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"u\"\n";
        for key in ["acquire_timeout", "connect_timeout", "idle_timeout"] {
            let err = Config::from_toml(&format!("{pg}[tenants.a.sources.s.pool]\n{key} = \"0s\"\n"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(&format!("tenants.a.sources.s.pool.{key}")), "{key}: {err}");
        }
        let err = Config::from_toml("[server]\nhealth_check_interval = \"0s\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("server.health_check_interval"), "{err}");
        // Beyond what Linux takes, the socket would keep its own defaults.
        for (setting, key) in [
            ("keepalive_time = \"12h\"", "server.keepalive_time"),
            ("keepalive_interval = \"10h\"", "server.keepalive_interval"),
            ("keepalive_time = \"500ms\"", "server.keepalive_time"),
            ("keepalive_retries = 128", "server.keepalive_retries"),
        ] {
            let err = Config::from_toml(&format!("[server]\n{setting}\n"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(key), "{setting}: {err}");
        }
    }

    /// A string key whose value looks like a number is quoted in the
    /// environment (configuration.md says so).
    #[test]
    fn numeric_looking_strings_are_quoted_in_the_environment() {
        std::env::set_var("WEIR__TELEMETRY__SERVICE_NAME", "\"2024\"");
        let config = Config::load(None);
        std::env::remove_var("WEIR__TELEMETRY__SERVICE_NAME");
        assert_eq!(config.expect("loads").telemetry.service_name.as_deref(), Some("2024"));
    }

    #[test]
    fn backend_hosts_are_named_with_their_port() {
        let err = Config::from_toml("[backend_hosts.\"db.internal\"]\nmax_connections = 10\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("backend_hosts.\"db.internal\"") && err.contains("host:port"),
            "{err}"
        );
        let unused = Config::from_toml("[backend_hosts.\"db.internal:5432\"]\nmax_connections = 10\n").expect("valid");
        assert_eq!(unused.unused_backend_hosts(), ["db.internal:5432"]);
        let used = Config::from_toml(
            "[backend_hosts.\"db.internal:5432\"]\nmax_connections = 100\n\
             [tenants.t.sources.pg]\nengine = \"postgres\"\nhost = \"db.internal\"\nport = 5432\nuser = \"u\"\ndatabase = \"d\"\n",
        )
        .expect("valid");
        assert!(used.unused_backend_hosts().is_empty());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[server]\nlisten_addr = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn engine_specific_keys_are_checked() {
        let err = Config::from_toml("[tenants.a.sources.s]\nengine = \"sqlite\"\npath = \"x\"\nhost = \"h\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants.a.sources.s.host"), "{err}");
        let err = Config::from_toml("[tenants.a.sources.s]\nengine = \"postgres\"\nuser = \"u\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tenants.a.sources.s.host") && err.contains("required"),
            "{err}"
        );
        // The session reset is PostgreSQL's; a value it does not know is refused.
        let err = Config::from_toml(
            "[tenants.a.sources.s]\nengine = \"mysql\"\nhost = \"h\"\nuser = \"u\"\nsession_reset = \"always\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tenants.a.sources.s.session_reset"), "{err}");
        let err = Config::from_toml(
            "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"u\"\nsession_reset = \"sometimes\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("session_reset") || err.contains("sometimes"), "{err}");
        let ok = Config::from_toml(
            "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"u\"\nsession_reset = \"always\"\n",
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn multiplexing_is_checked() {
        let pg = "[tenants.a.sources.s]\nengine = \"postgres\"\nhost = \"h\"\nuser = \"u\"\n";
        let config = Config::from_toml(&format!("{pg}[tenants.a.sources.s.multiplex]\nconnections = 2\n")).unwrap();
        let multiplex = config.tenants["a"].sources["s"].multiplex.clone().unwrap();
        assert_eq!(multiplex.connections, 2);
        assert_eq!(multiplex.statement_timeout, Duration::from_secs(5));
        for (extra, key) in [
            // The pool (8 by default) must keep a connection for everything else.
            (
                "[tenants.a.sources.s.multiplex]\nconnections = 8\n",
                "multiplex.connections",
            ),
            (
                "[tenants.a.sources.s.multiplex]\nconnections = 0\n",
                "multiplex.connections",
            ),
            (
                "[tenants.a.sources.s.pool]\nmin_idle = 8\n[tenants.a.sources.s.multiplex]\nconnections = 2\n",
                "pool.min_idle",
            ),
            (
                "[tenants.a.sources.s.multiplex]\nconnections = 1\nstatement_timeout = \"0s\"\n",
                "multiplex.statement_timeout",
            ),
            (
                "session_reset = \"always\"\n[tenants.a.sources.s.multiplex]\nconnections = 1\n",
                "multiplex",
            ),
        ] {
            let err = Config::from_toml(&format!("{pg}{extra}")).unwrap_err().to_string();
            assert!(err.contains(&format!("tenants.a.sources.s.{key}")), "{extra}: {err}");
        }
        let err = Config::from_toml(
            "[tenants.a.sources.s]\nengine = \"mysql\"\nhost = \"h\"\nuser = \"u\"\n\
             [tenants.a.sources.s.multiplex]\nconnections = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("tenants.a.sources.s.multiplex"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::from_toml("[tenants.a.limits]\nburst = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants.a.limits.burst"), "{err}");
        let err = Config::from_toml("[tenants.A]\n").unwrap_err().to_string();
        assert!(err.contains("tenants.A"), "{err}");
        let err = Config::from_toml("[tenants.a]\napi_keys = [{ id = \"k\", sha256 = \"zz\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("api_keys[0].sha256"), "{err}");
        // Client certificates cannot be required without CAs to verify them.
        let err = Config::from_toml(
            "[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nrequire_client_cert = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.tls.require_client_cert"), "{err}");
        // Nor can a tenant be named by certificates that are never asked for.
        let identities = "[tenants.a]\nclient_identities = [\"a.internal\"]\n";
        let err = Config::from_toml(identities).unwrap_err().to_string();
        assert!(
            err.contains("tenants.a.client_identities") && err.contains("client_ca_file"),
            "{err}"
        );
        Config::from_toml(&format!("{MUTUAL_TLS}{identities}")).expect("with client CAs");
        // A SQLite bound too small to hold a schema.
        let sqlite = "[tenants.a.sources.s]\nengine = \"sqlite\"\npath = \":memory:\"\nmax_file_bytes = ";
        let err = Config::from_toml(&format!("{sqlite}4096\n")).unwrap_err().to_string();
        assert!(err.contains("tenants.a.sources.s.max_file_bytes"), "{err}");
        Config::from_toml(&format!("{sqlite}65536\n")).expect("64 KiB");
        // In-memory databases other than ":memory:", one per connection.
        let at = |path: &str| format!("[tenants.a.sources.s]\nengine = \"sqlite\"\npath = \"{path}\"\n");
        for path in [
            "",
            "file:",
            "file:?cache=shared",
            "file::memory:",
            "file:x?mode=memory&cache=shared",
            "FILE:y?MODE=MEMORY",
        ] {
            let err = Config::from_toml(&at(path))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("tenants.a.sources.s.path"), "{path:?}: {err}");
        }
        for path in [
            ":memory:",
            "/var/lib/weir/shop.db",
            "file:/var/lib/weir/shop.db?mode=ro",
        ] {
            Config::from_toml(&at(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }

    #[test]
    fn backend_host_caps_hold_with_every_pool_full() {
        let source = |tenant: &str, size: u32| {
            format!("[tenants.{tenant}.sources.pg]\nengine = \"postgres\"\nhost = \"db\"\nuser = \"u\"\n[tenants.{tenant}.sources.pg.pool]\nmax_size = {size}\n")
        };
        let limits = |tenant: &str| format!("[tenants.{tenant}.limits]\nmax_concurrent_subscriptions = 1\n");
        // 2 x (10 pooled + 3 for one change stream + 1 for DeleteSubscription) = 28.
        let base = format!("{}{}{}{}", source("a", 10), limits("a"), source("b", 10), limits("b"));
        Config::from_toml(&format!("{base}[backend_hosts.\"db:5432\"]\nmax_connections = 28\n")).expect("fits");
        let err = Config::from_toml(&format!("{base}[backend_hosts.\"db:5432\"]\nmax_connections = 27\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("backend_hosts.\"db:5432\"") && err.contains("28") && err.contains("tenants.b.sources.pg: 14"),
            "{err}"
        );
        // Another port is another server.
        Config::from_toml(&format!("{base}[backend_hosts.\"db:5433\"]\nmax_connections = 1\n")).expect("other server");
        // A MySQL source keeps one more session, to kill abandoned statements.
        let mysql = format!("{}{}", source("m", 10).replace("postgres", "mysql"), limits("m"));
        let err = Config::from_toml(&format!("{mysql}[backend_hosts.\"db:3306\"]\nmax_connections = 14\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants.m.sources.pg: 15"), "{err}");
    }

    #[test]
    fn durations_parse() {
        let c = Config::from_toml("[tenants.a.limits]\nstatement_timeout = \"250ms\"\n").expect("config");
        assert_eq!(c.tenants["a"].limits.statement_timeout, Duration::from_millis(250));
    }
}

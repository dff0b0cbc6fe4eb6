//! Starts the real `weir` binary as a child process, so that its memory can
//! be measured apart from the load generator's.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};
use weir_client::WeirClient;

use crate::Args;

pub const KEY: &str = "bench-key";
/// Shared connections of the multiplexed PostgreSQL source.
pub const MULTIPLEXED: u32 = 1;
/// The API keys of the tenants that flood the gateway in the noisy-neighbour
/// figures: one with the default `max_rate_wait` (calls over the rate wait
/// for a turn that comes soon), one refused at once (`max_rate_wait = "0s"`).
pub const NOISY_KEY: &str = "noisy-key";
pub const EAGER_NOISY_KEY: &str = "eager-noisy-key";
/// Those tenants' request rate and burst.
pub const NOISY_RATE: u32 = 200;

pub struct Weir {
    child: Child,
    pub addr: String,
    _config: tempfile::NamedTempFile,
}

pub fn binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.weir {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("weir"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Weir {
    pub async fn start(args: &Args, sqlite_path: &std::path::Path) -> anyhow::Result<Weir> {
        let port = free_port()?;
        let key_hash = |key: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
        let hash = key_hash(KEY);
        // The PostgreSQL sources differ only in name and extra settings.
        let pg_source = |table: &str, extra: &str| {
            format!(
                "[{table}]\nengine = \"postgres\"\nhost = \"{host}\"\nport = {port}\nuser = \"{user}\"\n\
                 database = \"{db}\"\npassword_env = \"WEIR_BENCH_PG_PASSWORD\"\n{extra}",
                host = args.pg_host,
                port = args.pg_port,
                user = args.pg_user,
                db = args.pg_database,
            )
        };
        let pool = format!("max_size = {}\n", crate::figures::POOL_SIZE);
        let pg = pg_source(
            "tenants.bench.sources.pg",
            &format!("[tenants.bench.sources.pg.pool]\n{pool}"),
        );
        let pg_multiplexed = pg_source(
            "tenants.bench.sources.pg_multiplexed",
            &format!(
                "[tenants.bench.sources.pg_multiplexed.pool]\n{pool}\
                 [tenants.bench.sources.pg_multiplexed.multiplex]\nconnections = {MULTIPLEXED}\n"
            ),
        );
        // The flooding tenants differ only in name, key and extra limits.
        let flooder = |id: &str, key: &str, extra: &str| {
            format!(
                "[tenants.{id}]\napi_keys = [{{ id = \"{id}\", sha256 = \"{hash}\" }}]\n\
                 [tenants.{id}.limits]\nrequests_per_second = {NOISY_RATE}\nburst = {NOISY_RATE}\n\
                 max_concurrent_requests = 10000\n{extra}\n{pg}",
                hash = key_hash(key),
                pg = pg_source(&format!("tenants.{id}.sources.pg"), ""),
            )
        };
        let noisy = flooder("noisy", NOISY_KEY, "");
        let eager = flooder("eager", EAGER_NOISY_KEY, "max_rate_wait = \"0s\"");
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
# Only for clients that ask: the compression figure's.
compression = "zstd"

[metrics]
enabled = false

[tenants.bench]
api_keys = [{{ id = "bench", sha256 = "{hash}" }}]

[tenants.bench.limits]
requests_per_second = 10000000
burst = 10000000
max_concurrent_requests = 10000
statement_timeout = "10m"
stream_records_per_second = 100000000
stream_bytes_per_second = 2000000000

{pg}
{pg_multiplexed}

[tenants.bench.sources.maria]
engine = "mysql"
host = "{my_host}"
port = {my_port}
user = "{my_user}"
database = "{my_db}"
password_env = "WEIR_BENCH_MYSQL_PASSWORD"

[tenants.bench.sources.lite]
engine = "sqlite"
path = "{sqlite}"

{noisy}
{eager}
[tenants.bench.sources.kafka]
engine = "kafka"
bootstrap_servers = "{kafka}"
topic_prefix = "weir-bench-"
"#,
            kafka = args.kafka_bootstrap,
            my_host = args.mysql_host,
            my_port = args.mysql_port,
            my_user = args.mysql_user,
            my_db = args.mysql_database,
            sqlite = sqlite_path.display(),
        );
        let file = tempfile::Builder::new().suffix(".toml").tempfile()?;
        std::fs::write(file.path(), config)?;
        let path = binary(args)?;
        let (log_reader, log_writer) = std::io::pipe()?;
        let child = Command::new(&path)
            .arg("--config")
            .arg(file.path())
            .env("WEIR_BENCH_PG_PASSWORD", &args.pg_password)
            .env("WEIR_BENCH_MYSQL_PASSWORD", &args.mysql_password)
            // Its default logging (an audit line per call), read from a
            // pipe as a container runtime reads it: what a deployment pays.
            .env_remove("WEIR_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_writer))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it with `cargo build --release --bin weir`)",
                    path.display()
                )
            })?;
        drain_log(log_reader);
        let addr = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while WeirClient::connect(&addr, KEY).await.is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "weir did not start listening on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Weir {
            child,
            addr,
            _config: file,
        })
    }

    /// A client that asks for no compression: the figures measure plain
    /// answers (the compression figure asks for zstd itself).
    pub async fn client(&self) -> anyhow::Result<WeirClient> {
        Ok(WeirClient::connect(&self.addr, KEY).await?.uncompressed())
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Peak resident memory of the server so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        self.memory("VmHWM:")
    }

    /// Sets the server's VmHWM back to its RSS now (Linux's `clear_refs`
    /// 5), so that the next `peak_rss` is the peak from here on; false
    /// where that cannot be done.
    pub fn reset_peak_rss(&self) -> bool {
        self.child
            .id()
            .is_some_and(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }

    /// Resident memory of the server now (VmRSS), in bytes.
    pub fn rss(&self) -> Option<u64> {
        self.memory("VmRSS:")
    }

    fn memory(&self, field: &str) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM: the server drains and exits on its own.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Reads the server's log as it comes, from a blocking pipe on an OS
/// thread of its own (an audit line per call, refused ones too: read on
/// the benchmark's runtime, they would take its threads from the callers
/// being measured); passes on its warnings and errors.
fn drain_log(log: std::io::PipeReader) {
    use std::io::BufRead;
    std::thread::spawn(move || {
        let lines = std::io::BufReader::new(log).lines();
        for line in lines.map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("weir: {line}");
            }
        }
    });
}

//! The `weir` binary: arguments → configuration → logging → run.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weir_server::telemetry::{self, LogFormat};
use weir_server::{Config, Listeners};

#[derive(Parser)]
#[command(name = "weir", version, about = "Multi-tenant gRPC gateway to databases")]
struct Args {
    /// TOML configuration file; without it Weir serves the local demo configuration.
    #[arg(long, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "WEIR_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the SHA-256 of an API key for `api_keys[].sha256` (reads stdin without KEY).
    HashKey { key: Option<String> },
    /// Seal a password read from stdin for `password_sealed`, with the newest
    /// key in WEIR_SEAL_KEYS (`v1=<base64>,v2=<base64>`).
    Seal {
        /// Print a new random key for WEIR_SEAL_KEYS instead.
        #[arg(long)]
        generate_key: bool,
    },
}

/// The one line of stdin, without its line ending. More than one line is
/// refused: hashing or sealing them joined would give a value that matches
/// nothing the caller meant.
fn read_stdin_line() -> Result<String, String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).map_err(|e| e.to_string())?;
    let line = s.strip_suffix('\n').unwrap_or(&s);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.contains(['\r', '\n']) {
        return Err("stdin holds more than one line; give it exactly one".into());
    }
    Ok(line.to_string())
}

/// Listens for SIGTERM and SIGINT from now on, and resolves on the first.
/// Installed before anything else starts: the server is PID 1 in its
/// container, which ignores a signal it has no handler for, so a SIGTERM
/// during start-up (a rollout, a scale-down) would be lost and the pod
/// killed only at its grace period's end.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// mysql_async keeps up to 128 spent packet buffers for reuse, each of up to
/// 4 MiB by default: after a few bulk loads into MySQL, tens of megabytes
/// held for good. Unless the operator sets it, each kept buffer is cut to this.
const MYSQL_BUFFER_SIZE_CAP: &str = "65536";

/// How long work still on the blocking pool may hold up the exit.
const BLOCKING_WORK_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    // Set before the runtime starts any thread; the driver reads it once.
    if std::env::var_os("MYSQL_ASYNC_BUFFER_SIZE_CAP").is_none() {
        std::env::set_var("MYSQL_ASYNC_BUFFER_SIZE_CAP", MYSQL_BUFFER_SIZE_CAP);
    }
    let args = Args::parse();
    if let Some(command) = args.command {
        return run_command(command);
    }
    // Read before the runtime is built: it says how many threads to build.
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => {
            let (code, telemetry) = runtime.block_on(serve(&args, config));
            // What is left on the blocking pool (a Kafka consumer closing
            // against a broker that is gone would wait for it for ever) gets
            // this long, then the process exits without it.
            runtime.shutdown_timeout(BLOCKING_WORK_AT_EXIT);
            // Only now: what the runtime's last tasks logged (a consumer's
            // last commit failing, the audit line of a call ended by the
            // shutdown) is written, and its spans exported.
            if let Some(telemetry) = telemetry {
                telemetry.shutdown();
            }
            code
        }
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The subcommands, which need neither the runtime nor a configuration.
fn run_command(command: Command) -> ExitCode {
    match command {
        Command::HashKey { key } => {
            let key = match key.map_or_else(read_stdin_line, Ok) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: cannot read the key from stdin: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("{}", hex::encode(weir_server::tenant::hash_key(&key)));
            ExitCode::SUCCESS
        }
        Command::Seal { generate_key: true } => {
            println!("{}", weir_server::sealed::generate_key());
            ExitCode::SUCCESS
        }
        Command::Seal { generate_key: false } => {
            // From stdin only: an argument would stay in the shell's history.
            let sealed = read_stdin_line()
                .map_err(|e| format!("cannot read the password from stdin: {e}"))
                .and_then(|secret| weir_server::sealed::seal(&secret).map_err(|e| e.to_string()));
            match sealed {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(args: &Args, config: Config) -> (ExitCode, Option<telemetry::Telemetry>) {
    let shutdown = shutdown_signal();
    let format = if args.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let telemetry = match telemetry::init(format, &config.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot start logging or tracing: {e}");
            return (ExitCode::FAILURE, None);
        }
    };
    if args.config.is_none() {
        tracing::warn!(
            "no --config given: serving the local demo configuration (tenant 'demo', API key 'demo'); do not expose it"
        );
    }
    let code = match bind(&config).await {
        Ok(listeners) => match weir_server::run(config, listeners, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    };
    (code, Some(telemetry))
}

async fn bind(config: &Config) -> Result<Listeners, String> {
    let grpc = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on server.listen {}: {e}", config.server.listen))?;
    let metrics = if config.metrics.enabled {
        let listener = tokio::net::TcpListener::bind(config.metrics.listen)
            .await
            .map_err(|e| format!("cannot listen on metrics.listen {}: {e}", config.metrics.listen))?;
        Some(listener)
    } else {
        None
    };
    Ok(Listeners { grpc, metrics })
}

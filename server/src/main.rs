//! The `weir` binary: arguments → configuration → logging → run.

use std::io::Read;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;
use weir_server::Config;

#[derive(Parser)]
#[command(name = "weir", version, about = "Multi-tenant gRPC gateway to databases")]
struct Args {
    /// TOML configuration file; without it Weir serves the local demo configuration.
    #[arg(long, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "WEIR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the SHA-256 of an API key for `api_keys[].sha256` (reads stdin without KEY).
    HashKey { key: Option<String> },
}

fn init_logging(format: LogFormat) {
    // h2, hyper and tower trace every frame; keep them quiet unless asked.
    let filter = EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,tonic=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::HashKey { key }) = args.command {
        let key = match key {
            Some(k) => k,
            None => {
                let mut s = String::new();
                if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                    eprintln!("error: cannot read the key from stdin: {e}");
                    return std::process::ExitCode::FAILURE;
                }
                s.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        println!("{}", hex::encode(weir_server::tenant::hash_key(&key)));
        return std::process::ExitCode::SUCCESS;
    }
    init_logging(args.log_format);
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.config.is_none() {
        tracing::warn!(
            "no --config given: serving the local demo configuration (tenant 'demo', API key 'demo'); do not expose it"
        );
    }
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.server.listen, "cannot listen: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match weir_server::run(config, listener, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! `weir-bench`: measures Weir against the direct drivers on the same machine
//! in the same run and prints direct, Weir and the ratio for every figure
//! (see docs/benchmarks.md). `--quick` is the CI smoke mode: small data,
//! one run, no conclusions.

mod changes;
mod cpu;
mod figures;
mod kafka;
mod load;
mod neighbour;
mod result_formats;
mod server;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "weir-bench",
    about = "Weir against the direct drivers, same machine, same run"
)]
pub struct Args {
    /// Small data and one short run per figure (a smoke test, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds per point-lookup run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Only these groups of figures (comma-separated): lookups, stream, formats, load, kafka, changes, neighbour, memory. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Also write the results as Markdown to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `weir` binary to start (default: next to this one).
    #[arg(long, env = "WEIR_BIN")]
    pub weir: Option<PathBuf>,
    #[arg(long, env = "WEIR_TEST_PG_HOST", default_value = "127.0.0.1")]
    pub pg_host: String,
    #[arg(long, env = "WEIR_TEST_PG_PORT", default_value_t = 5432)]
    pub pg_port: u16,
    #[arg(long, env = "WEIR_TEST_PG_USER", default_value = "postgres")]
    pub pg_user: String,
    #[arg(long, env = "WEIR_TEST_PG_PASSWORD", default_value = "postgres")]
    pub pg_password: String,
    #[arg(long, env = "WEIR_TEST_PG_DATABASE", default_value = "test")]
    pub pg_database: String,
    #[arg(long, env = "WEIR_TEST_MYSQL_HOST", default_value = "127.0.0.1")]
    pub mysql_host: String,
    #[arg(long, env = "WEIR_TEST_MYSQL_PORT", default_value_t = 3306)]
    pub mysql_port: u16,
    #[arg(long, env = "WEIR_TEST_MYSQL_USER", default_value = "weir")]
    pub mysql_user: String,
    #[arg(long, env = "WEIR_TEST_MYSQL_PASSWORD", default_value = "weir")]
    pub mysql_password: String,
    #[arg(long, env = "WEIR_TEST_MYSQL_DATABASE", default_value = "test")]
    pub mysql_database: String,
    #[arg(long, env = "WEIR_TEST_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,
}

impl Args {
    fn normalize(mut self) -> Self {
        if self.quick {
            self.runs = 1;
            self.seconds = 1;
        }
        self
    }

    /// Whether the run includes the figures of `group`.
    pub fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }

    pub fn lookup_duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    /// pgbench scale: 10 (1,000,000 accounts) for a measurement, 1 in quick mode.
    pub fn scale(&self) -> u32 {
        if self.quick {
            1
        } else {
            10
        }
    }
}

/// One line of the report.
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub direct: f64,
    pub weir: f64,
    /// Whether larger is better (throughput) or smaller (latency, memory).
    pub higher_is_better: bool,
}

impl Figure {
    fn ratio(&self) -> f64 {
        if self.higher_is_better {
            self.weir / self.direct
        } else {
            self.direct / self.weir
        }
    }
}

/// Lines that explain figures (where the CPU went), printed as they are
/// measured and listed again under the report's table.
static DETAILS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub fn detail(line: String) {
    println!("  {line}");
    if let Ok(mut details) = DETAILS.lock() {
        details.push(line);
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn report(args: &Args, figures: &[Figure]) -> String {
    let mut out = String::new();
    out.push_str("| figure | direct | Weir | ratio (Weir vs direct, >1 is better) |\n| --- | ---: | ---: | ---: |\n");
    for f in figures {
        // Latencies are fractions of a millisecond: one decimal would hide them.
        let digits = if f.unit == "ms" { 2 } else { 1 };
        out.push_str(&format!(
            "| {} | {:.*} {} | {:.*} {} | {:.2} |\n",
            f.name,
            digits,
            f.direct,
            f.unit,
            digits,
            f.weir,
            f.unit,
            f.ratio()
        ));
    }
    if let Ok(details) = DETAILS.lock() {
        if !details.is_empty() {
            out.push_str("\nWhere the CPU and memory went (per call or per row, median run):\n\n");
            for line in details.iter() {
                out.push_str(&format!("- {line}\n"));
            }
        }
    }
    out.push_str(&format!(
        "\nMode: {}, {} run(s) per figure (median), {} s per lookup run.\n",
        if args.quick {
            "quick (smoke test, not a measurement)"
        } else {
            "full"
        },
        args.runs,
        args.seconds
    ));
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse().normalize();
    let sqlite = tempfile::Builder::new()
        .prefix("weir-bench-")
        .suffix(".db")
        .tempfile()?
        .into_temp_path();
    figures::prepare_sqlite(&sqlite, figures::rows(&args)).await?;
    let weir = server::Weir::start(&args, &sqlite).await?;
    let figures = figures::all(&args, &weir, &sqlite).await;
    weir.stop().await;
    let figures = figures?;
    let text = report(&args, &figures);
    println!("\n{text}");
    if let Some(path) = &args.out {
        let header = format!(
            "# Benchmarks\n\nProduced by `weir-bench` on {} ({} cores). Each figure is measured directly and through Weir in the same run; ratios are what count. The load generator, Weir and the databases share the machine's cores, so every microsecond of CPU the gateway path adds (gRPC encoding on both sides, HTTP/2, the extra hop) comes out of the same budget as the engine's.\n\n",
            chrono::Utc::now().format("%Y-%m-%d"),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        std::fs::write(path, header + &text)?;
    }
    Ok(())
}

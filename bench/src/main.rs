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

/// The median; of an even number of values, the mean of the middle two
/// (not the upper one, which of two runs would be the better).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
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
        let section = format!(
            "## A run of `weir-bench` ({})\n\n{}\n\n{text}\n",
            chrono::Utc::now().format("%Y-%m-%d"),
            machine(&args)
        );
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        std::fs::write(path, with_section(&existing, &section))?;
    }
    Ok(())
}

/// Where and what was measured: the machine, the commit and the build.
fn machine(args: &Args) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|m| m.split_once(':'))
                    .map(|(_, m)| m.trim().to_string())
            })
        })
        .unwrap_or_else(|| "an unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    // The build is the directory the gateway's binary is in (release, production, debug).
    let weir = server::binary(args).unwrap_or_default();
    let profile = weir
        .parent()
        .and_then(|d| d.file_name())
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "{cores} cores of {cpu}; commit `{commit}`, the gateway's `{profile}` build ({}).",
        weir.display()
    )
}

/// `existing` (the benchmarks document) with `section` put before its first
/// section, newest first as the document keeps them; the document's title
/// and introduction when there is none yet.
fn with_section(existing: &str, section: &str) -> String {
    const INTRO: &str = "# Benchmarks\n\nProduced by `weir-bench`; each section gives its date and command. Each figure is measured directly and through Weir in the same run; ratios are what count.\n\n";
    match existing.find("\n## ") {
        Some(at) => format!("{}{section}{}", &existing[..=at], &existing[at + 1..]),
        None if existing.is_empty() => format!("{INTRO}{section}"),
        None => format!("{existing}\n{section}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_an_even_count_are_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn a_run_is_added_before_the_earlier_ones() {
        let doc = "# Benchmarks\n\nIntro.\n\n## Older\n\nold\n";
        let added = with_section(doc, "## New\n\nnew\n\n");
        assert_eq!(added, "# Benchmarks\n\nIntro.\n\n## New\n\nnew\n\n## Older\n\nold\n");
        assert!(with_section("", "## New\n").starts_with("# Benchmarks\n"));
    }
}

//! Tenant isolation figures (../shared/benchmarks.md): a quiet tenant's p99
//! latency alone and while another tenant floods the gateway, and the rate
//! the flooding tenant is admitted at compared with its configured rate.
//!
//! The protocol's flood is an open loop at ten times the noisy tenant's
//! quota: calls are sent on schedule whatever became of the earlier ones,
//! as independent clients would send them. A second figure floods with 16
//! callers that retry at once when refused (a closed loop as fast as they
//! can go, far past 10×), with calls over the rate refused at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use weir_client::WeirClient;

use crate::server::{Weir, EAGER_NOISY_KEY, NOISY_KEY, NOISY_RATE};
use crate::{median, Args, Figure};

const LOOKUP: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
/// The quiet tenant: this many callers, one lookup each per interval.
const QUIET_CALLERS: usize = 2;
const QUIET_INTERVAL: Duration = Duration::from_millis(5);
/// The open-loop flood's calls per second: the protocol's 10× overload.
const OVERLOAD: u32 = 10;
/// The closed-loop flood's callers, each as fast as it can.
const EAGER_CALLERS: usize = 16;

/// The quiet tenant's p99 (ms) at its normal pace; fails if any call is
/// refused. Each call is timed from when it was due, not from when it was
/// sent, so that a stall that delays the calls after it counts for each of
/// them (no coordinated omission).
async fn quiet_p99(args: &Args, client: &WeirClient, rows: i64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + args.lookup_duration();
    let mut tasks = Vec::new();
    for _ in 0..QUIET_CALLERS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut tick = tokio::time::interval(QUIET_INTERVAL);
            while Instant::now() < deadline {
                let due = tick.tick().await;
                let aid = rand::rng().random_range(1..=rows);
                client.execute("pg", LOOKUP, vec![aid.into()]).await?;
                latencies.push(due.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    let i = ((all.len() as f64 * 0.99) as usize).min(all.len().saturating_sub(1));
    Ok(all.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3))
}

/// The noisy tenant's calls, on a runtime and OS thread of their own, as
/// another application's would be: sharing the quiet callers' runtime, the
/// flood's calls would queue the quiet ones' replies inside this benchmark,
/// and the figure would measure the benchmark instead of the gateway.
const NOISY_THREADS: usize = 2;

/// How a flood sends its calls.
#[derive(Clone, Copy)]
enum Shape {
    /// On a fixed schedule of `OVERLOAD` times the quota.
    OpenLoop,
    /// `EAGER_CALLERS` callers, each sending its next call when the last is answered.
    ClosedLoop,
}

struct Flood {
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    admitted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

/// Floods with the tenant of `key` until `stop`.
fn flood(addr: String, key: &'static str, rows: i64, shape: Shape, stop: Arc<AtomicBool>) -> Flood {
    let (admitted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counters = (admitted.clone(), refused.clone());
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(NOISY_THREADS)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let noisy = WeirClient::connect(&addr, key).await?.uncompressed();
            let (admitted, refused) = counters;
            let call = move || {
                let (noisy, admitted, refused) = (noisy.clone(), admitted.clone(), refused.clone());
                async move {
                    let aid = rand::rng().random_range(1..=rows);
                    match noisy.execute("pg", LOOKUP, vec![aid.into()]).await {
                        Ok(_) => admitted.fetch_add(1, Ordering::Relaxed),
                        Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
            };
            let mut tasks = Vec::new();
            match shape {
                Shape::OpenLoop => {
                    let mut tick = tokio::time::interval(Duration::from_secs(1) / (NOISY_RATE * OVERLOAD));
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        tasks.push(tokio::spawn(call()));
                    }
                }
                Shape::ClosedLoop => {
                    for _ in 0..EAGER_CALLERS {
                        let (call, stop) = (call.clone(), stop.clone());
                        tasks.push(tokio::spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                call().await;
                            }
                        }));
                    }
                }
            }
            for t in tasks {
                let _ = t.await;
            }
            Ok(())
        })
    });
    Flood {
        thread,
        admitted,
        refused,
    }
}

/// The quiet tenant's p99 beside one flood, and what the flood got.
struct Beside {
    p99: f64,
    /// Calls of the flood admitted per second, once its full first bucket was spent.
    admitted_rate: f64,
    /// Calls of the flood sent per second, as a multiple of its quota.
    sent: f64,
}

async fn beside(
    args: &Args,
    weir: &Weir,
    quiet: &WeirClient,
    rows: i64,
    key: &'static str,
    shape: Shape,
) -> anyhow::Result<Beside> {
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = flood(weir.addr.clone(), key, rows, shape, stop.clone());
    // The noisy bucket starts full: the counts are taken from a second in,
    // so that the admitted rate measured is the sustained one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    anyhow::ensure!(!flooding.thread.is_finished(), "the flood stopped early");
    let count = |f: &Flood| (f.admitted.load(Ordering::Relaxed), f.refused.load(Ordering::Relaxed));
    let (admitted_before, refused_before) = count(&flooding);
    let started = Instant::now();
    let p99 = quiet_p99(args, quiet, rows).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (admitted, refused) = count(&flooding);
    stop.store(true, Ordering::Relaxed);
    let thread = flooding.thread;
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the flood panicked"))??;
    let answered = (admitted - admitted_before) + (refused - refused_before);
    Ok(Beside {
        p99,
        admitted_rate: (admitted - admitted_before) as f64 / elapsed,
        sent: answered as f64 / elapsed / f64::from(NOISY_RATE),
    })
}

pub async fn figures(args: &Args, weir: &Weir, rows: i64, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    println!("noisy neighbour: a quiet tenant alone, then beside a flood at {OVERLOAD}x its quota, and beside callers retrying at once...");
    let quiet = weir.client().await?;
    let mut alone = vec![];
    let (mut open, mut eager): (Vec<Beside>, Vec<Beside>) = (vec![], vec![]);
    for _ in 0..args.runs {
        alone.push(quiet_p99(args, &quiet, rows).await?);
        open.push(beside(args, weir, &quiet, rows, NOISY_KEY, Shape::OpenLoop).await?);
        eager.push(beside(args, weir, &quiet, rows, EAGER_NOISY_KEY, Shape::ClosedLoop).await?);
    }
    let alone = median(alone);
    for (runs, how) in [
        (
            open,
            format!("a flood sent at {OVERLOAD}x its quota whatever the answers (calls over the rate wait up to max_rate_wait 250 ms)"),
        ),
        (
            eager,
            format!("{EAGER_CALLERS} callers retrying at once (calls over the rate refused at once, max_rate_wait 0)"),
        ),
    ] {
        let sent = median(runs.iter().map(|b| b.sent).collect());
        figures.push(Figure {
            name: format!("noisy neighbour: quiet tenant p99 alone (direct) vs beside {how}: {sent:.0}x the quota answered"),
            unit: "ms",
            direct: alone,
            weir: median(runs.iter().map(|b| b.p99).collect()),
            higher_is_better: false,
        });
        figures.push(Figure {
            name: format!(
                "limiter: admitted rate of that flooding tenant vs its configured {NOISY_RATE}/s (1.00 is exact; target within 0.95 to 1.05)"
            ),
            unit: "/s",
            direct: f64::from(NOISY_RATE),
            weir: median(runs.iter().map(|b| b.admitted_rate).collect()),
            higher_is_better: true,
        });
    }
    Ok(())
}

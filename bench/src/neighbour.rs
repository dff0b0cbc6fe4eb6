//! Tenant isolation figures: a quiet tenant's p99 latency alone and while
//! another tenant floods the gateway far above its quota, retrying at once
//! whatever it is told, and the rate the flooding tenant is actually
//! admitted at compared with its configured rate. Twice: a flooding tenant
//! with the default `max_rate_wait` (calls over the rate wait for a turn
//! that comes soon) and one whose calls over the rate are refused at once.

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
/// The noisy tenant's callers, each as fast as it can.
const NOISY_CALLERS: usize = 16;

/// The quiet tenant's p99 (ms) at its normal pace; fails if any call is refused.
async fn quiet_p99(args: &Args, client: &WeirClient, rows: i64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + args.lookup_duration();
    let mut tasks = Vec::new();
    for _ in 0..QUIET_CALLERS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut tick = tokio::time::interval(QUIET_INTERVAL);
            while Instant::now() < deadline {
                tick.tick().await;
                let aid = rand::rng().random_range(1..=rows);
                let t = Instant::now();
                client.execute("pg", LOOKUP, vec![aid.into()]).await?;
                latencies.push(t.elapsed());
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

/// The noisy tenant's callers, on a runtime and OS thread of their own, as
/// another application's would be: sharing the quiet callers' runtime, the
/// flood's calls would queue the quiet ones' replies inside this benchmark,
/// and the figure would measure the benchmark instead of the gateway.
const NOISY_THREADS: usize = 2;

type Flood = std::thread::JoinHandle<anyhow::Result<(u64, u64)>>;

/// Floods with the tenant of `key` until `stop`; returns (admitted, refused).
fn flood(addr: String, key: &'static str, rows: i64, stop: Arc<AtomicBool>) -> Flood {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(NOISY_THREADS)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let noisy = WeirClient::connect(&addr, key).await?.uncompressed();
            let (admitted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let mut tasks = Vec::new();
            for _ in 0..NOISY_CALLERS {
                let (noisy, stop, admitted, refused) = (noisy.clone(), stop.clone(), admitted.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let aid = rand::rng().random_range(1..=rows);
                        match noisy.execute("pg", LOOKUP, vec![aid.into()]).await {
                            Ok(_) => admitted.fetch_add(1, Ordering::Relaxed),
                            Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            Ok((admitted.load(Ordering::Relaxed), refused.load(Ordering::Relaxed)))
        })
    })
}

/// The quiet tenant's p99 beside one flood, and what the flood got.
struct Beside {
    p99: f64,
    /// Calls of the flood admitted per second, its first bucketful aside.
    admitted_rate: f64,
    /// Calls of the flood answered per second, as a multiple of its quota.
    answered: f64,
}

async fn beside(args: &Args, weir: &Weir, quiet: &WeirClient, rows: i64, key: &'static str) -> anyhow::Result<Beside> {
    // The noisy bucket starts full: let it drain first, so the admitted
    // rate measured is the sustained one.
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = flood(weir.addr.clone(), key, rows, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    anyhow::ensure!(!flooding.is_finished(), "the flood stopped early");
    let p99 = quiet_p99(args, quiet, rows).await?;
    stop.store(true, Ordering::Relaxed);
    let (admitted, refused) = tokio::task::spawn_blocking(move || flooding.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the flood panicked"))??;
    // The whole flood, its first second included.
    let elapsed = started.elapsed().as_secs_f64() + 1.0;
    Ok(Beside {
        p99,
        // A full bucket's burst, then the sustained rate.
        admitted_rate: (admitted as f64 - f64::from(NOISY_RATE)) / elapsed,
        answered: (admitted + refused) as f64 / elapsed / f64::from(NOISY_RATE),
    })
}

pub async fn figures(args: &Args, weir: &Weir, rows: i64, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
    println!("noisy neighbour: a quiet tenant alone, then beside a flood, paced and refused at once...");
    let quiet = weir.client().await?;
    let mut alone = vec![];
    let (mut paced, mut eager): (Vec<Beside>, Vec<Beside>) = (vec![], vec![]);
    for _ in 0..args.runs {
        alone.push(quiet_p99(args, &quiet, rows).await?);
        paced.push(beside(args, weir, &quiet, rows, NOISY_KEY).await?);
        eager.push(beside(args, weir, &quiet, rows, EAGER_NOISY_KEY).await?);
    }
    let alone = median(alone);
    for (runs, how) in [
        (paced, "calls over the rate wait for their turn (max_rate_wait 250 ms)"),
        (eager, "calls over the rate refused at once (max_rate_wait 0)"),
    ] {
        let answered = median(runs.iter().map(|b| b.answered).collect());
        figures.push(Figure {
            name: format!(
                "noisy neighbour: quiet tenant p99 alone (direct) vs beside {NOISY_CALLERS} callers retrying at once, \
                 {how}: answered at {answered:.0}x the quota"
            ),
            unit: "ms",
            direct: alone,
            weir: median(runs.iter().map(|b| b.p99).collect()),
            higher_is_better: false,
        });
        figures.push(Figure {
            name: format!("limiter: admitted rate of that flooding tenant vs its configured {NOISY_RATE}/s"),
            unit: "/s",
            direct: f64::from(NOISY_RATE),
            weir: median(runs.iter().map(|b| b.admitted_rate).collect()),
            higher_is_better: true,
        });
    }
    Ok(())
}

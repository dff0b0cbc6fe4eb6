//! Weir: a multi-tenant gRPC gateway to databases.
//!
//! A call flows one way: transport → auth (bearer key → tenant) → limits
//! (rate, concurrency) → service (proto → domain) → backend trait → engine pool.

pub mod backend;
pub mod config;
pub mod error;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod pem;
pub mod sealed;
pub mod service;
pub mod telemetry;
pub mod tenant;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::Config;
use metrics::Readiness;
use service::transactions::Transactions;
use tenant::reload::{self, Registry};
use transport::tls::TlsReloader;

/// How often idle transactions are looked for.
const REAP_INTERVAL: Duration = Duration::from_millis(500);

/// How long the steps after the calls (cut streams ending, the metrics
/// port closing, transactions rolled back, statements cancelled) may take
/// together before the server stops waiting: one budget, so that the time
/// to exit has one bound a supervisor's stop timeout can be set above.
const WRAP_UP: Duration = Duration::from_secs(10);

/// The longest the metrics port's graceful close may take of that budget.
const METRICS_CLOSE: Duration = Duration::from_secs(2);

/// What the wait for cut streams leaves of the budget, for the rollbacks
/// and cancels after it.
const AFTER_THE_CUT: Duration = Duration::from_secs(4);

/// Where the gateway listens: gRPC, and optionally the metrics/health HTTP port.
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// Runs the gateway until `shutdown` completes, then drains calls for up to
/// `server.shutdown_grace` and rolls back open transactions.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let hangup = reload::Hangup::listen();
    let tls = match &config.server.tls {
        Some(files) => Some(Arc::new(TlsReloader::new(files).map_err(anyhow::Error::msg)?)),
        None => None,
    };
    let tenants = Arc::new(Registry::new(&config, tls.clone())?);
    reload::warn_about(&config);
    let watcher = config.path.clone().map(|path| {
        // Taken now, before the server listens, so that no later change is missed.
        let seen = tenants.fingerprint(&path);
        tokio::spawn(reload::watch(
            tenants.clone(),
            path,
            config.server.reload_interval,
            seen,
            hangup,
        ))
    });
    let transactions = Arc::new(Transactions::default());
    let readiness = Readiness::default();
    let (mut reporter, health_service) = tonic_health::server::health_reporter();
    // Not SERVING until the first round of probes says so ("" starts SERVING in tonic-health).
    health::set_all(&reporter, tonic_health::ServingStatus::NotServing).await;
    let monitor = tokio::spawn(health::monitor(
        tenants.clone(),
        reporter.clone(),
        readiness.clone(),
        config.server.health_check_interval,
    ));
    let reaper = {
        let transactions = transactions.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(REAP_INTERVAL);
            loop {
                ticker.tick().await;
                transactions.reap_idle();
            }
        })
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The metrics port stays open through the drain (/readyz answers 503,
    // the last counters can be scraped) and closes after the gRPC port.
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = listeners.metrics.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics, /healthz and /readyz listening");
        }
        tokio::spawn(metrics::serve(listener, readiness.clone(), async move {
            let _ = metrics_stopped.await;
        }))
    });
    let stop_monitor = monitor.abort_handle();
    let delay = config.server.shutdown_delay;
    let signal = async move {
        shutdown.await;
        // Load balancers stop sending before the listener closes.
        monitor.abort();
        // A probe round in the middle of saying SERVING on another thread
        // finishes that step first: NOT_SERVING must come after it.
        let _ = monitor.await;
        readiness.set(false);
        health::set_all(&reporter, tonic_health::ServingStatus::NotServing).await;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutting down: NOT_SERVING, still taking calls for shutdown_delay"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("shutting down: no new calls; draining calls in progress");
        let _ = stop_tx.send(true);
        health::end_watches(&mut reporter).await;
    };
    let grace = config.server.shutdown_grace;
    let deadline = async move {
        let mut stop = stop_rx;
        if stop.wait_for(|s| *s).await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    if let Ok(addr) = listeners.grpc.local_addr() {
        tracing::info!(
            %addr,
            tenants = tenants.current().all().len(),
            tls = tls.is_some(),
            worker_threads = tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_workers()),
            "weir listening"
        );
    }
    let registry = tenants.clone();
    let cut = registry.stop_token().clone();
    let served = transport::serve(
        &config,
        listeners.grpc,
        tenants,
        transactions.clone(),
        health_service,
        cut,
        signal,
    );
    tokio::pin!(served);
    let mut wrap_up_by = None;
    let result = tokio::select! {
        r = &mut served => r,
        () = deadline => {
            tracing::warn!(?grace, "shutdown grace elapsed; cutting the remaining streams");
            // The reaper first: it would take every transaction for revoked
            // and roll it back unawaited, where `rollback_all` awaits each.
            reaper.abort();
            registry.stop_all();
            let by = *wrap_up_by.insert(tokio::time::Instant::now() + WRAP_UP);
            tokio::time::timeout_at(by - AFTER_THE_CUT, &mut served).await.unwrap_or(Ok(()))
        }
    };
    let wrap_up_by = wrap_up_by.unwrap_or_else(|| tokio::time::Instant::now() + WRAP_UP);
    stop_monitor.abort();
    reaper.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    // A scraper that never finishes its request would hold the graceful
    // close of the metrics port for ever. Transactions not rolled back in
    // time are when their connections close.
    let _ = metrics_stop.send(());
    let metrics_closed = async {
        if let Some(server) = metrics_server {
            let by = wrap_up_by.min(tokio::time::Instant::now() + METRICS_CLOSE);
            let _ = tokio::time::timeout_at(by, server).await;
        }
    };
    let rolled_back = tokio::time::timeout_at(wrap_up_by, transactions.rollback_all());
    let _ = futures::join!(metrics_closed, rolled_back);
    // Statements cut or abandoned above are cancelled in their engines
    // before the runtime, and the cancels with it, are gone.
    backend::settle_cancels(wrap_up_by.saturating_duration_since(tokio::time::Instant::now())).await;
    tracing::info!("weir stopped");
    result
}

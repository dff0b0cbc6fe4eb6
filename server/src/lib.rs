//! Weir: a multi-tenant gRPC gateway to databases.
//!
//! A call flows one way: transport → auth (bearer key → tenant) → limits
//! (rate, concurrency) → service (proto → domain) → backend trait → engine pool.

pub mod backend;
pub mod config;
pub mod error;
pub mod health;
pub mod limits;
pub mod service;
pub mod tenant;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::Config;
use service::transactions::Transactions;
use tenant::Tenants;

/// How often idle transactions are looked for.
const REAP_INTERVAL: Duration = Duration::from_millis(500);

/// Runs the gateway on `listener` until `shutdown` completes, then drains
/// calls for up to `server.shutdown_grace` and rolls back open transactions.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tenants = Arc::new(Tenants::build(&config)?);
    let transactions = Arc::new(Transactions::default());
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let monitor = tokio::spawn(health::monitor(
        tenants.clone(),
        reporter.clone(),
        config.server.health_check_interval,
    ));
    let reaper = {
        let transactions = transactions.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(REAP_INTERVAL);
            loop {
                ticker.tick().await;
                transactions.reap_idle().await;
            }
        })
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_probes = monitor.abort_handle();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new calls; draining calls in progress");
        // Load balancers stop sending before the listener closes.
        stop_probes.abort();
        health::set_all(&reporter, tonic_health::ServingStatus::NotServing).await;
        let _ = stop_tx.send(true);
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
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tenants = tenants.all().len(), "weir listening");
    }
    let served = transport::serve(&config, listener, tenants, transactions.clone(), health_service, signal);
    let result = tokio::select! {
        r = served => r,
        () = deadline => {
            tracing::warn!(?grace, "shutdown grace elapsed; cutting the remaining calls");
            Ok(())
        }
    };
    monitor.abort();
    reaper.abort();
    transactions.rollback_all().await;
    result
}

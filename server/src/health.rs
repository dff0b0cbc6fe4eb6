//! Background probes of every source, feeding `ListSources` and gRPC health.
//! The server reports NOT_SERVING while any source marked `required` is down;
//! other sources' health is visible to their tenant only.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::backend::ConnectionInfo;
use crate::limits::global::RedisReadiness;
use crate::metrics::{PoolLabels, Readiness, SourceLabels, METRICS};
use crate::tenant::reload::Registry;
use crate::tenant::{Source, Tenants};

/// gRPC health names that follow the gateway's overall state.
const SERVICES: [&str; 5] = [
    "",
    "weir.v1.QueryService",
    "weir.v1.SchemaService",
    "weir.v1.StreamService",
    "weir.v1.BulkLoadService",
];
/// Longest a single probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a source that failed a probe while up is probed again, to
/// confirm it down (or not) well before the next round.
const CONFIRM_AFTER: Duration = Duration::from_secs(1);
/// Probes run at once: a source that does not answer waits out its timeout
/// beside the others, not before them (30 unreachable ones in a row held a
/// round, and so the readiness of every required source, for minutes).
const PROBES_AT_ONCE: usize = 16;

enum Probe {
    Up(ConnectionInfo),
    /// Every connection is in use: the source answers, it is only busy. A
    /// probe that waited for a connection would call a loaded source down and
    /// take the replica out of service exactly when it is most needed.
    Busy,
    Down,
}

/// Whether every connection `source` may open is open and in use: a wait
/// for one then says the source is busy, not that it is down.
pub fn pool_is_full(source: &Source) -> bool {
    source
        .backend
        .pool_status()
        .is_some_and(|p| p.idle == 0 && p.open >= source.config.pool.max_size)
}

async fn probe(source: &Source) -> Probe {
    if pool_is_full(source) {
        return Probe::Busy;
    }
    // Long enough for a pool that fills up meanwhile to say so (PoolExhausted).
    let limit = PROBE_TIMEOUT.max(source.config.pool.acquire_timeout + Duration::from_secs(1));
    match tokio::time::timeout(limit, source.backend.connection_info()).await {
        Ok(Ok(info)) => Probe::Up(info),
        Ok(Err(e)) if e.is_busy() => Probe::Busy,
        _ => Probe::Down,
    }
}

/// What a round of probes found.
struct Round {
    /// Every required source is up.
    required_ok: bool,
    /// A source up before failed its probe, to be confirmed by another.
    in_doubt: bool,
    /// The sources probed (their metric series).
    probed: HashSet<SourceLabels>,
}

/// Probes every source.
async fn probe_all(tenants: &Tenants) -> Round {
    use futures::StreamExt;
    let mut required_ok = true;
    let mut in_doubt = false;
    let mut probed = HashSet::new();
    // Owned: a future that borrows them is not known to be Send for every
    // lifetime, which the spawned monitor needs.
    let sources: Vec<_> = tenants
        .all()
        .iter()
        .flat_map(|tenant| tenant.sources().map(|source| (tenant.clone(), source.clone())))
        .collect();
    let results: Vec<_> = futures::stream::iter(sources)
        .map(|(tenant, source)| async move {
            let result = probe(&source).await;
            (tenant, source, result)
        })
        .buffer_unordered(PROBES_AT_ONCE)
        .collect()
        .await;
    for (tenant, source, result) in results {
        match result {
            Probe::Up(info) => source.status.write().answered(Some(info.server_version)),
            Probe::Busy => source.status.write().answered(None),
            Probe::Down => source.probe_failed(&tenant.id),
        }
        let healthy = {
            let status = source.status.read();
            in_doubt |= status.in_doubt();
            status.healthy
        };
        let labels = SourceLabels {
            tenant: tenant.id.clone(),
            source: source.name.clone(),
        };
        METRICS.source_up.get_or_create(&labels).set(i64::from(healthy));
        probed.insert(labels.clone());
        if let Some(state) = source.backend.circuit() {
            METRICS.circuit_state.get_or_create(&labels).set(state as i64);
        }
        if let Some(pool) = source.backend.pool_status() {
            for (state, n) in [("idle", pool.idle), ("in_use", pool.open.saturating_sub(pool.idle))] {
                let labels = PoolLabels {
                    tenant: tenant.id.clone(),
                    source: source.name.clone(),
                    state,
                };
                METRICS.pool_connections.get_or_create(&labels).set(i64::from(n));
            }
        }
        if source.config.required && !healthy {
            required_ok = false;
        }
    }
    Round {
        required_ok,
        in_doubt,
        probed,
    }
}

/// Drops the series of a source a reload removed: a `weir_source_up` of 0
/// left behind would keep an alert firing for a source that is gone.
fn forget(source: &SourceLabels) {
    METRICS.source_up.remove(source);
    METRICS.rows.remove(source);
    METRICS.bytes.remove(source);
    METRICS.circuit_state.remove(source);
    for state in ["idle", "in_use"] {
        METRICS.pool_connections.remove(&PoolLabels {
            tenant: source.tenant.clone(),
            source: source.source.clone(),
            state,
        });
    }
}

pub async fn monitor(tenants: Arc<Registry>, reporter: HealthReporter, readiness: Readiness, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    let mut known = HashSet::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = tenants.reloaded() => ticker.reset(),
        }
        let current = tenants.current();
        let Round {
            required_ok: sources_ready,
            in_doubt,
            probed,
        } = probe_all(&current).await;
        // With `on_redis_failure = fail_closed`, a replica without Redis
        // refuses every call: it is not ready either.
        let redis = match current.shared_limits() {
            Some(limits) => limits.health_round().await,
            None => RedisReadiness::Answers,
        };
        let refusing = redis == RedisReadiness::Refusing;
        if in_doubt || redis == RedisReadiness::InDoubt {
            ticker.reset_after(CONFIRM_AFTER.min(interval));
        }
        let ready = sources_ready && !refusing;
        for gone in known.difference(&probed) {
            forget(gone);
        }
        known = probed;
        readiness.set(ready);
        set_all(
            &reporter,
            if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            },
        )
        .await;
    }
}

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// Ends the health `Watch` streams (after the status they have not seen
/// yet, NOT_SERVING), which a graceful shutdown would otherwise wait for
/// until its grace ran out: they never end by themselves. Checks are then
/// NOT_FOUND, as no new call reaches the server any more.
pub async fn end_watches(reporter: &mut HealthReporter) {
    for name in SERVICES {
        reporter.clear_service_status(name).await;
    }
}

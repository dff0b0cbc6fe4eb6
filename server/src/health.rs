//! Background probes of every source, feeding `ListSources` and gRPC health.
//! The server reports NOT_SERVING while any source marked `required` is down;
//! other sources' health is visible to their tenant only.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::tenant::{SourceStatus, Tenants};

/// gRPC health names that follow the gateway's overall state.
const SERVICES: [&str; 3] = ["", "weir.v1.QueryService", "weir.v1.SchemaService"];
/// Longest a single probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn probe_all(tenants: &Tenants) -> bool {
    let mut required_ok = true;
    for tenant in tenants.all() {
        for source in tenant.sources() {
            let result = tokio::time::timeout(PROBE_TIMEOUT, source.backend.connection_info()).await;
            let healthy = matches!(result, Ok(Ok(_)));
            let mut status = source.status.write();
            if let Ok(Ok(info)) = result {
                *status = SourceStatus {
                    healthy: true,
                    server_version: info.server_version,
                };
            } else {
                if status.healthy {
                    tracing::warn!(tenant = tenant.id, source = source.name, "source became unreachable");
                }
                status.healthy = false;
            }
            if source.config.required && !healthy {
                required_ok = false;
            }
        }
    }
    required_ok
}

pub async fn monitor(tenants: Arc<Tenants>, reporter: HealthReporter, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let status = if probe_all(&tenants).await {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_all(&reporter, status).await;
    }
}

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

//! Prometheus metrics, served with `/healthz` and `/readyz` on their own
//! HTTP port so that scraping never competes with gRPC traffic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub tenant: String,
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub tenant: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub tenant: String,
    pub source: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub tenant: String,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

pub struct Metrics {
    registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub call_seconds: Family<CallLabels, Histogram>,
    pub rows: Family<SourceLabels, Counter>,
    pub bytes: Family<SourceLabels, Counter>,
    pub rejections: Family<LimitLabels, Counter>,
    pub active_streams: Family<TenantLabels, Gauge>,
    pub pool_connections: Family<PoolLabels, Gauge>,
    pub source_up: Family<SourceLabels, Gauge>,
    /// Global-limit checks that could not reach Redis.
    pub global_limit_failures: Counter,
    /// Log bytes the log writer could not write (stderr failed).
    pub log_bytes_dropped: Counter,
    /// Round trips to Redis for a tenant's shared limits.
    pub shared_limit_checks: Family<TenantLabels, Counter>,
    /// Circuit breaker per source: 0 closed, 1 open (failing fast), 2 half-open (probing).
    pub circuit_state: Family<SourceLabels, Gauge>,
    /// Configuration reloads by outcome ("applied", "rejected").
    pub config_reloads: Family<OutcomeLabels, Counter>,
    /// Calls waiting for a gateway slot, per tenant.
    pub queued: Family<TenantLabels, Gauge>,
    /// Time calls waited for a gateway slot.
    pub queue_seconds: Family<TenantLabels, Histogram>,
    /// Time streams and loads were slowed by their tenant's cost buckets.
    pub throttled_seconds: Family<LimitLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn call_histogram() -> Histogram {
    // 50 µs (a point lookup takes about a tenth of a millisecond in the
    // gateway: buckets from 0.5 ms put nearly every call in the first, and
    // a fourfold slowdown was invisible) to about 7.5 hours: streams and
    // loads last long.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 30))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("weir");
        let calls = Family::<CallLabels, Counter>::default();
        let call_seconds = Family::<CallLabels, Histogram>::new_with_constructor(call_histogram as fn() -> Histogram);
        let rows = Family::<SourceLabels, Counter>::default();
        let bytes = Family::<SourceLabels, Counter>::default();
        let rejections = Family::<LimitLabels, Counter>::default();
        let active_streams = Family::<TenantLabels, Gauge>::default();
        let pool_connections = Family::<PoolLabels, Gauge>::default();
        let source_up = Family::<SourceLabels, Gauge>::default();
        let global_limit_failures = Counter::default();
        let log_bytes_dropped = Counter::default();
        let shared_limit_checks = Family::<TenantLabels, Counter>::default();
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        let circuit_state = Family::<SourceLabels, Gauge>::default();
        registry.register(
            "source_circuit_state",
            "Circuit breaker of each source: 0 closed, 1 open (calls fail fast), 2 half-open (probing)",
            circuit_state.clone(),
        );
        let queued = Family::<TenantLabels, Gauge>::default();
        let queue_seconds =
            Family::<TenantLabels, Histogram>::new_with_constructor(call_histogram as fn() -> Histogram);
        let throttled_seconds = Family::<LimitLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome (applied, rejected)",
            config_reloads.clone(),
        );
        registry.register("queued_calls", "Calls waiting for a gateway slot", queued.clone());
        registry.register(
            "queue_wait_seconds",
            "Time calls waited for a gateway slot",
            queue_seconds.clone(),
        );
        registry.register(
            "throttled_seconds",
            "Time streams and loads were slowed by their tenant's cost buckets",
            throttled_seconds.clone(),
        );
        registry.register(
            "global_limit_failures",
            "Global-limit checks that could not reach Redis (admitted with fail_open, refused with fail_closed)",
            global_limit_failures.clone(),
        );
        registry.register(
            "log_bytes_dropped",
            "Log bytes that could not be written (stderr failed); a full stderr is waited for, not dropped",
            log_bytes_dropped.clone(),
        );
        registry.register(
            "shared_limit_checks",
            "Round trips to Redis for a tenant's shared limits (rate checks and gathered cost charges)",
            shared_limit_checks.clone(),
        );
        registry.register("calls", "gRPC calls by tenant, method and status code", calls.clone());
        registry.register(
            "call_duration_seconds",
            "Time from the call's arrival (authentication and waits for admission included) to the end of the response, by status code",
            call_seconds.clone(),
        );
        registry.register("rows", "Rows returned to callers", rows.clone());
        registry.register("bytes", "Encoded bytes of rows returned to callers", bytes.clone());
        registry.register(
            "limiter_rejections",
            "Calls rejected by a tenant limit",
            rejections.clone(),
        );
        registry.register("active_streams", "Result streams in progress", active_streams.clone());
        registry.register(
            "pool_connections",
            "Pooled connections per source by state",
            pool_connections.clone(),
        );
        registry.register(
            "source_up",
            "1 when the last health probe reached the source",
            source_up.clone(),
        );
        Self {
            registry,
            calls,
            call_seconds,
            rows,
            bytes,
            rejections,
            active_streams,
            pool_connections,
            source_up,
            global_limit_failures,
            log_bytes_dropped,
            shared_limit_checks,
            config_reloads,
            circuit_state,
            queued,
            queue_seconds,
            throttled_seconds,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// A tenant's call metrics, resolved once when the tenant is built: a call
/// then costs two atomic updates instead of hashing its labels (a `String`
/// made for each) and a lock in the registry's maps.
pub struct TenantMetrics {
    tenant: String,
    /// By method index, then by status code.
    calls: Vec<[OnceLock<Counter>; CODES]>,
    call_seconds: Vec<[OnceLock<Histogram>; CODES]>,
    active_streams: OnceLock<Gauge>,
}

/// Status codes, 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;

impl TenantMetrics {
    pub fn new(tenant: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            calls: (0..=METHODS.len())
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            call_seconds: (0..=METHODS.len())
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            active_streams: OnceLock::new(),
        }
    }

    /// The metrics of calls that name no tenant (refused before one was known).
    pub fn anonymous() -> &'static TenantMetrics {
        static ANONYMOUS: LazyLock<TenantMetrics> = LazyLock::new(|| TenantMetrics::new(""));
        &ANONYMOUS
    }

    pub fn record_call(&self, method: Method, code: tonic::Code, elapsed: Duration) {
        let code_index = usize::try_from(code as i32).unwrap_or(0).min(CODES - 1);
        if let Some(counter) = self.calls.get(method.0).and_then(|c| c.get(code_index)) {
            counter
                .get_or_init(|| {
                    METRICS
                        .calls
                        .get_or_create(&CallLabels {
                            tenant: self.tenant.clone(),
                            method: method.label(),
                            code: code_label(code),
                        })
                        .clone()
                })
                .inc();
        }
        if let Some(histogram) = self.call_seconds.get(method.0).and_then(|h| h.get(code_index)) {
            histogram
                .get_or_init(|| {
                    METRICS
                        .call_seconds
                        .get_or_create(&CallLabels {
                            tenant: self.tenant.clone(),
                            method: method.label(),
                            code: code_label(code),
                        })
                        .clone()
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    pub fn stream_started(&self) -> StreamGauge {
        let gauge = self.active_streams.get_or_init(|| {
            METRICS
                .active_streams
                .get_or_create(&TenantLabels {
                    tenant: self.tenant.clone(),
                })
                .clone()
        });
        gauge.inc();
        StreamGauge(gauge.clone())
    }
}

/// Rows and bytes a source returned to one tenant's callers, resolved once.
pub struct SourceMetrics {
    rows: Counter,
    bytes: Counter,
}

impl SourceMetrics {
    pub fn new(tenant: &str, source: &str) -> Self {
        let labels = SourceLabels {
            tenant: tenant.into(),
            source: source.into(),
        };
        Self {
            rows: METRICS.rows.get_or_create(&labels).clone(),
            bytes: METRICS.bytes.get_or_create(&labels).clone(),
        }
    }

    pub fn returned(&self, rows: u64, bytes: u64) {
        self.rows.inc_by(rows);
        self.bytes.inc_by(bytes);
    }
}

/// Counts a stream as active until dropped.
pub struct StreamGauge(Gauge);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Paths of the API's methods. Any other path is labelled "unknown", so that
/// callers cannot create unbounded label values.
const METHODS: [&str; 17] = [
    "/weir.v1.QueryService/Execute",
    "/weir.v1.QueryService/ExecuteStream",
    "/weir.v1.QueryService/BeginTransaction",
    "/weir.v1.QueryService/Commit",
    "/weir.v1.QueryService/Rollback",
    "/weir.v1.SchemaService/ListSources",
    "/weir.v1.SchemaService/TestConnection",
    "/weir.v1.SchemaService/ListSchemas",
    "/weir.v1.SchemaService/ListTables",
    "/weir.v1.SchemaService/DescribeTable",
    "/weir.v1.BulkLoadService/Load",
    "/weir.v1.StreamService/Produce",
    "/weir.v1.StreamService/Consume",
    "/weir.v1.StreamService/CommitOffsets",
    "/weir.v1.StreamService/ListTopics",
    "/weir.v1.StreamService/WatchChanges",
    "/weir.v1.StreamService/DeleteSubscription",
];

/// The code's name as its `Debug` form writes it ("Ok", "InvalidArgument", ...).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "Ok",
        C::Cancelled => "Cancelled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

/// One of the API's methods, or "unknown" for any other path.
#[derive(Clone, Copy, Debug)]
pub struct Method(usize);

impl Method {
    pub fn of(path: &str) -> Self {
        Method(METHODS.iter().position(|m| *m == path).unwrap_or(METHODS.len()))
    }

    pub fn label(self) -> &'static str {
        METHODS.get(self.0).copied().unwrap_or("unknown")
    }
}

/// The process-wide metrics (one registry per process, as Prometheus expects).
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Readiness: configuration loaded and every required source reachable.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        METRICS.encode(),
    )
}

async fn ready(State(readiness): State<Readiness>) -> impl IntoResponse {
    if readiness.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: a required source is unreachable or the server is stopping\n",
        )
    }
}

pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(readiness);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "metrics server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_metrics_rebuilt_by_a_reload_count_on_the_same_series() {
        let method = Method::of("/weir.v1.QueryService/Execute");
        let before = TenantMetrics::new("metrics-unit");
        before.record_call(method, tonic::Code::Ok, Duration::from_millis(1));
        before.record_call(method, tonic::Code::NotFound, Duration::from_millis(1));
        let after = TenantMetrics::new("metrics-unit");
        after.record_call(method, tonic::Code::Ok, Duration::from_millis(1));
        let count = |code| {
            METRICS
                .calls
                .get_or_create(&CallLabels {
                    tenant: "metrics-unit".into(),
                    method: "/weir.v1.QueryService/Execute",
                    code,
                })
                .get()
        };
        assert_eq!(count("Ok"), 2);
        assert_eq!(count("NotFound"), 1);
        let text = METRICS.encode();
        assert!(
            text.contains(
                r#"weir_call_duration_seconds_count{tenant="metrics-unit",method="/weir.v1.QueryService/Execute",code="Ok"} 2"#
            ),
            "{text}"
        );
        let streams = || {
            METRICS
                .active_streams
                .get_or_create(&TenantLabels {
                    tenant: "metrics-unit".into(),
                })
                .get()
        };
        let stream = after.stream_started();
        assert_eq!(streams(), 1);
        drop(stream);
        assert_eq!(streams(), 0);
        let unknown = Method::of("/somewhere/else");
        assert_eq!(unknown.label(), "unknown");
        TenantMetrics::anonymous().record_call(unknown, tonic::Code::Unauthenticated, Duration::ZERO);
        assert!(METRICS
            .encode()
            .contains(r#"weir_calls_total{tenant="",method="unknown",code="Unauthenticated"}"#));
    }

    #[test]
    fn code_labels_are_the_codes_debug_names() {
        for i in 0..=16 {
            let code = tonic::Code::from_i32(i);
            assert_eq!(code_label(code), format!("{code:?}"));
        }
    }
}

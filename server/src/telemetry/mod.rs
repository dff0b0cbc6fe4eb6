//! Logging and tracing: human-readable or JSON logs, and, when an OTLP
//! endpoint is configured, a span per call exported over OTLP/gRPC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tonic::transport::{Certificate, ClientTlsConfig};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetryConfig;

mod batch_writer;
mod plain;

use batch_writer::{BatchWriter, Flusher};
use plain::{PlainFields, UtcMicros};

/// Set when spans are exported as traces (an OTLP endpoint is configured).
static EXPORTING_TRACES: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported as traces.
pub fn exporting_traces() -> bool {
    EXPORTING_TRACES.load(Ordering::Relaxed)
}

/// The span around a statement's start in the engine, a child of the
/// call's span in exported traces. Without an exporter nothing reads it
/// (log lines carry the call's span), so none is made: making, entering
/// and closing one cost about 3 % of a point lookup.
pub fn engine_span() -> tracing::Span {
    if exporting_traces() {
        tracing::info_span!("engine.start")
    } else {
        tracing::Span::none()
    }
}

/// Log lines reach stderr within this time (warnings and errors at once).
const LOG_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes of waiting lines that are written without waiting for the interval.
const LOG_BATCH: usize = 64 * 1024;
/// Bytes of waiting lines at which loggers wait for the writer.
const LOG_LIMIT: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the trace pipeline and the log writer alive; `shutdown` (or
/// dropping it) flushes what is pending.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _log_writer: Flusher,
}

impl Telemetry {
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }

    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "trace export did not shut down cleanly");
            }
        }
    }
}

/// The OTLP exporter runs on tonic, which needs a Tokio reactor; the SDK's
/// batch processor exports from a plain thread. This adapter gives the
/// exporter a small runtime of its own.
#[derive(Debug)]
struct OnOwnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for OnOwnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.runtime.block_on(self.inner.export(batch))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

fn provider(config: &TelemetryConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let endpoint = config
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok());
    let Some(endpoint) = endpoint.filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    let service = config
        .service_name
        .clone()
        .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
        .unwrap_or_else(|| "weir".to_string());
    // Read before the runtime is made: dropped on an error inside the
    // server's runtime, it would panic and hide the cause.
    let tls = match endpoint.starts_with("https://") {
        true => Some(collector_tls(config)?),
        false => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weir-otlp")
        .enable_all()
        .build()?;
    let built = {
        let _entered = runtime.enter();
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        let exporter = match tls {
            Some(tls) => exporter.with_tls_config(tls),
            None => exporter,
        };
        exporter
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
    };
    let inner = match built {
        Ok(inner) => inner,
        Err(e) => {
            runtime.shutdown_background();
            return Err(e.into());
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnOwnRuntime { inner, runtime })
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    Ok(Some(provider))
}

/// How an https:// collector is verified: against `otlp_ca_file` (or
/// OTEL_EXPORTER_OTLP_CERTIFICATE), else the public web roots (tonic trusts
/// no root unless told, and every export's handshake would fail).
fn collector_tls(config: &TelemetryConfig) -> anyhow::Result<ClientTlsConfig> {
    let (path, named) = match (&config.otlp_ca_file, std::env::var_os("OTEL_EXPORTER_OTLP_CERTIFICATE")) {
        (Some(path), _) => (path.clone(), "telemetry.otlp_ca_file"),
        (None, Some(path)) => (path.into(), "OTEL_EXPORTER_OTLP_CERTIFICATE"),
        (None, None) => return Ok(ClientTlsConfig::new().with_webpki_roots()),
    };
    let pem = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{named} {}: {e}", path.display()))?;
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
}

/// `text` cut to at most `max` bytes, at a character boundary: for values
/// the caller chooses, which would otherwise make log lines as long.
pub fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The log filter unless WEIR_LOG sets one. h2, hyper and tower trace
/// every frame. The database drivers log what tenants' statements say
/// (tiberius every server error and PRINT, tokio-postgres every NOTICE,
/// mysql_async its errors): duplicate keys, RAISE texts, row values. Weir
/// logs the failures it answers with itself, so the drivers stay silent.
pub const DEFAULT_LOG_FILTER: &str =
    "info,h2=warn,hyper=warn,tower=warn,tonic=info,tiberius=off,tokio_postgres=off,mysql_async=off";

/// The drivers that log tenants' statements and values, and stay silent
/// under any WEIR_LOG that does not name them (`WEIR_LOG=debug` would
/// otherwise log every statement's parameters).
const DRIVERS: [&str; 3] = ["tiberius", "tokio_postgres", "mysql_async"];

/// A filter of its own that turns off the drivers `asked` (WEIR_LOG) does
/// not name. Not directives in the EnvFilter: there a span-scoped directive
/// (`[call{tenant=shop}]=debug`) enables every event inside its spans,
/// drivers' too, whatever the others say.
/// `max`: the EnvFilter's most verbose level, which this one's default
/// follows: a TRACE default would raise the process's level hint (and the
/// `log` crate's) to TRACE, and every dependency's trace call would then
/// reach the filters before being dropped.
fn drivers_silenced(asked: Option<&str>, max: LevelFilter) -> Targets {
    let named = |driver: &str| {
        asked.is_some_and(|asked| {
            asked.split(',').any(|d| {
                let target = d.trim().split(['=', '[']).next().unwrap_or_default();
                target == driver || target.starts_with(&format!("{driver}::"))
            })
        })
    };
    DRIVERS
        .into_iter()
        .filter(|d| !named(d))
        .fold(Targets::new().with_default(max), |t, d| {
            t.with_target(d, LevelFilter::OFF)
        })
}

/// The log filters for WEIR_LOG (`asked`): the filter itself, or the
/// default with why `asked` was refused, and the drivers' own.
fn log_filters(asked: Option<&str>) -> (EnvFilter, Targets, Option<tracing_subscriber::filter::ParseError>) {
    let (filter, refused) = match asked.map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (EnvFilter::new(DEFAULT_LOG_FILTER), Some(e)),
        None => (EnvFilter::new(DEFAULT_LOG_FILTER), None),
    };
    let drivers = drivers_silenced(
        asked.filter(|_| refused.is_none()),
        filter.max_level_hint().unwrap_or(LevelFilter::TRACE),
    );
    (filter, drivers, refused)
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, config: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    // A WEIR_LOG that does not parse is said so once logging runs, not
    // passed over in silence (an `weir::audit=off` that did nothing).
    let (filter, drivers, refused) = log_filters(std::env::var("WEIR_LOG").ok().as_deref());
    let (writer, flusher) = BatchWriter::start(std::io::stderr(), LOG_INTERVAL, LOG_BATCH, LOG_LIMIT)?;
    // Colours only on a terminal: a log collector would keep the escape codes.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(terminal)
        .with_writer(writer)
        .with_timer(UtcMicros);
    let fmt = match format {
        LogFormat::Text if terminal => fmt.boxed(),
        // The same lines without the styling machinery (see `plain`).
        LogFormat::Text => fmt.fmt_fields(PlainFields).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let provider = provider(config)?;
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("weir")));
    tracing_subscriber::registry()
        .with(filter)
        .with(drivers)
        .with(fmt)
        .with(otel)
        .try_init()?;
    if let Some(e) = refused {
        tracing::warn!(error = %e, default = DEFAULT_LOG_FILTER, "WEIR_LOG is not a valid filter; the default is used");
    }
    EXPORTING_TRACES.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry {
        provider,
        _log_writer: flusher,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn the_driver_filter_raises_no_level() {
        let (_, drivers, _) = log_filters(None);
        assert_eq!(
            Layer::<tracing_subscriber::Registry>::max_level_hint(&drivers),
            Some(LevelFilter::INFO)
        );
    }

    #[test]
    fn drivers_stay_silent_unless_weir_log_names_them() {
        // Also under a directive scoped to a span, which EnvFilter lets
        // every event inside it through.
        // None: no WEIR_LOG, the default filter.
        for (asked, heard) in [
            (None, ""),
            (Some("debug"), ""),
            (Some("info,[call]=debug"), ""),
            (Some("info,[call{tenant=shop}]=debug"), ""),
            (Some("info,tokio_postgres::query=debug"), "4111"),
            (Some("tokio_postgres[call]=trace,[call]=debug"), "4111"),
        ] {
            let lines = Lines::default();
            let sink = lines.clone();
            let (filter, drivers, refused) = log_filters(asked);
            assert!(refused.is_none(), "{asked:?}");
            let subscriber = tracing_subscriber::registry()
                .with(filter)
                .with(drivers)
                .with(tracing_subscriber::fmt::layer().with_writer(move || sink.clone()));
            tracing::subscriber::with_default(subscriber, || {
                let _call = tracing::info_span!("call", tenant = "shop").entered();
                tracing::error!(target: "tiberius::tds::stream::token", "Violation of PRIMARY KEY: (alice@example.com)");
                tracing::debug!(target: "tokio_postgres::query", "preparing query s1: card 4111-1111");
                tracing::error!(target: "mysql_async::tracing_utils", "Duplicate entry 'bob'");
                tracing::error!(target: "weir_server::service", "kept");
            });
            let logged = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
            assert!(logged.contains("kept"), "{asked:?}: {logged}");
            for secret in ["alice", "4111", "bob"] {
                assert_eq!(logged.contains(secret), secret == heard, "{asked:?}: {logged}");
            }
        }
    }

    /// A log writer that keeps what it is given, for tests to read.
    #[derive(Clone, Default)]
    pub(crate) struct Lines(pub Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_https_collector_is_reached_over_tls() {
        // Without a TLS feature the exporter refuses https:// and the server would not start.
        let https = TelemetryConfig {
            otlp_endpoint: Some("https://collector.example:4317".into()),
            ..Default::default()
        };
        let tracing = provider(&https)
            .expect("an https endpoint builds")
            .expect("tracing is on");
        drop(tracing.shutdown());
        let missing_ca = TelemetryConfig {
            otlp_ca_file: Some("/nonexistent/ca.pem".into()),
            ..https
        };
        let err = provider(&missing_ca).expect_err("a CA file that cannot be read");
        assert!(err.to_string().contains("otlp_ca_file"), "{err}");
        // Inside the server's runtime too, where dropping the exporter's
        // runtime on the error path would panic.
        let inside = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let err = inside
            .block_on(async { provider(&missing_ca) })
            .expect_err("a CA file that cannot be read");
        assert!(err.to_string().contains("otlp_ca_file"), "{err}");
        // A plain-text collector does not read the CA file at all.
        let plain = TelemetryConfig {
            otlp_endpoint: Some("http://collector.example:4317".into()),
            ..missing_ca
        };
        let tracing = provider(&plain)
            .expect("http ignores the CA file")
            .expect("tracing is on");
        drop(tracing.shutdown());
    }
}

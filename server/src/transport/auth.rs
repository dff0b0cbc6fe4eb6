//! The auth layer: gives every call a request id (echoed in `x-request-id`)
//! and a tracing span (continuing an incoming W3C `traceparent`), turns the
//! bearer key of `weir.v1` calls into a `Caller` in the request extensions
//! once the call is admitted against its tenant's limits, and records each
//! call's outcome when its response body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::HeaderValue;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::tls::PeerInfo;
use crate::error::Error;
use crate::limits::{admission, SlotPermit};
use crate::metrics::{code_label, Method, TenantMetrics};
use crate::service::{stop_due, stopped};
use crate::tenant::reload::Registry;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Paths of the gateway's own API; everything else (health, reflection) is public.
const API_PREFIX: &str = "/weir.";

/// Audit lines of calls refused for their credentials, a second: anyone can
/// send such calls, and a flood of them must not flood the log pipeline.
/// Past it they are counted (as every call is, in the metrics), and the
/// next line logged says how many were not.
const REFUSALS_LOGGED_PER_SECOND: u32 = 20;

static REFUSALS: RefusalLog = RefusalLog {
    second: std::sync::atomic::AtomicU64::new(0),
    logged: std::sync::atomic::AtomicU32::new(0),
    unlogged: std::sync::atomic::AtomicU64::new(0),
};

struct RefusalLog {
    /// The second (of the Unix clock) `logged` counts.
    second: std::sync::atomic::AtomicU64,
    logged: std::sync::atomic::AtomicU32,
    /// Refusals not logged since the last line that was.
    unlogged: std::sync::atomic::AtomicU64,
}

enum Logged {
    Yes { unlogged_before: u64 },
    No,
}

impl RefusalLog {
    /// Whether this refusal gets its line. Races between calls at the turn
    /// of a second may log a line or two more than the limit.
    fn take(&self) -> Logged {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Relaxed) != now {
            self.logged.store(0, Relaxed);
        }
        if self.logged.fetch_add(1, Relaxed) < REFUSALS_LOGGED_PER_SECOND {
            Logged::Yes {
                unlogged_before: self.unlogged.swap(0, Relaxed),
            }
        } else {
            self.unlogged.fetch_add(1, Relaxed);
            Logged::No
        }
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    tenants: Arc<Registry>,
}

impl AuthLayer {
    pub fn new(tenants: Arc<Registry>) -> Self {
        Self { tenants }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tenants: self.tenants.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tenants: Arc<Registry>,
}

/// A caller-supplied id is kept when it is short and printable; otherwise a new one is made.
fn request_id(req: &http::Request<Body>) -> HeaderValue {
    let mut id = new_or_given_id(req);
    // Sent as never-indexed: a value that differs on every response would
    // only churn both ends' HPACK tables (each insert evicts an older entry,
    // and every lookup walks the chain of earlier ids).
    id.set_sensitive(true);
    id
}

fn new_or_given_id(req: &http::Request<Body>) -> HeaderValue {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| v.len() <= 64 && v.to_str().is_ok_and(|s| s.chars().all(|c| c.is_ascii_graphic())))
        .cloned()
        .unwrap_or_else(|| {
            // From the thread's own generator: Uuid::new_v4 asks the kernel
            // for randomness, a system call on every request.
            let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
            HeaderValue::from_str(id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()))
                .unwrap_or(HeaderValue::from_static("unknown"))
        })
}

fn bearer(req: &http::Request<Body>) -> Option<&str> {
    let value = req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// tonic answers a request message that does not decode (invalid UTF-8, a
/// value nested past prost's recursion limit, a truncated field) with
/// INTERNAL; it is the caller's input that is wrong, so it is INVALID_ARGUMENT.
// Named once: a lookup by `&str` parses the name on every call.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
const GRPC_DETAILS: http::HeaderName = http::HeaderName::from_static("grpc-status-details-bin");

/// What every status leaving the gateway gets, in headers or trailers.
fn settle_status(headers: &mut http::HeaderMap) {
    // Most calls: no status yet (the headers of a response with a body) or
    // OK, which carries no message or details. One lookup instead of five.
    match headers.get(GRPC_STATUS) {
        None => return,
        Some(code) if code == "0" => return,
        Some(_) => {}
    }
    caller_input_errors_are_invalid_argument(headers);
    // An error's message and details differ from call to call (a retry
    // delay, a row, a request id): sent never-indexed, as the request id
    // is, so that a flood of refusals does not churn the HPACK tables.
    for name in [GRPC_MESSAGE, GRPC_DETAILS] {
        if let Some(value) = headers.get_mut(name) {
            value.set_sensitive(true);
        }
    }
}

/// tonic's words for a request message that does not decode, which it
/// answers INTERNAL as if the server had failed: the caller's input is at
/// fault. Also as percent-encoded in the `grpc-message` header.
pub(crate) fn is_decode_failure(message: &str) -> bool {
    message.starts_with("failed to decode") || message.starts_with("failed%20to%20decode")
}

fn caller_input_errors_are_invalid_argument(headers: &mut http::HeaderMap) {
    let internal = headers.get(GRPC_STATUS).is_some_and(|v| v == "13");
    let decode = headers
        .get(GRPC_MESSAGE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_decode_failure);
    if internal && decode {
        headers.insert(GRPC_STATUS, HeaderValue::from_static("3"));
    }
}

fn status_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get(GRPC_STATUS)?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(value))
}

/// Other services served beside weir.v1, named in traces as they are.
const OTHER_METHODS: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The span's name: a method Weir serves, or "unknown". A path of the
/// caller's own choosing would make a new operation name in the tracing
/// backend's index for every call.
fn span_name(path: &str) -> &'static str {
    OTHER_METHODS
        .iter()
        .find(|m| **m == path)
        .copied()
        .unwrap_or_else(|| Method::of(path).label())
}

const ROLLBACK: &str = "/weir.v1.QueryService/Rollback";

/// At most this many bytes of a request's path go into its span and audit
/// line: the path is the caller's to choose, authenticated or not, up to
/// the 16 KB a header list may hold, and each log line would carry it twice.
const SHOWN_PATH_BYTES: usize = 128;

fn shown_path(path: &str) -> &str {
    crate::telemetry::cut(path, SHOWN_PATH_BYTES)
}

/// The address the call's connection came from (behind a proxy or a
/// Kubernetes Service, the proxy's or the node's).
fn peer_address(req: &http::Request<Body>) -> Option<std::net::SocketAddr> {
    match req.extensions().get::<PeerInfo>() {
        Some(tls) => tls.addr,
        None => req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(tonic::transport::server::TcpConnectInfo::remote_addr),
    }
}

impl<S> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let started = Instant::now();
        let id = request_id(&req);
        let method = req.uri().path().to_string();
        // Authenticated before the span is made, so that the span is born
        // with the tenant and key id: a field recorded later costs a trip
        // through every layer of the subscriber.
        let authenticated = method.starts_with(API_PREFIX).then(|| {
            let peer = req.extensions().get::<PeerInfo>();
            // A certificate the client CA now in force no longer accepts
            // names no one, on connections made before the change too.
            let trusted = peer.filter(|p| self.tenants.still_trusts(p));
            if peer.is_some_and(|p| self.tenants.wants_certificate_of(p, trusted.is_some())) {
                return Err("this server now requires a client certificate its client CA accepts, unexpired: connect again with one".to_string());
            }
            let identities = trusted.map(|p| p.identities.clone()).unwrap_or_default();
            let not_after = peer.and_then(|p| p.not_after);
            self.tenants
                .current()
                .authenticate(bearer(&req), &identities, not_after)
        });
        let caller = authenticated.as_ref().and_then(|a| a.as_ref().ok());
        // Anyone can send refused calls, and probes call health all the
        // time: neither makes a span (exported traces) but for the refusals
        // the audit log takes, at most `REFUSALS_LOGGED_PER_SECOND`.
        let refusal = matches!(authenticated, Some(Err(_))).then(|| REFUSALS.take());
        let traced = method.starts_with(API_PREFIX) && !matches!(refusal, Some(Logged::No));
        let span = if !traced {
            tracing::Span::none()
        } else {
            tracing::info_span!(
            "call",
            otel.name = %span_name(&method),
            request_id = id.to_str().unwrap_or_default(),
            method = shown_path(&method),
            peer = peer_address(&req).map(tracing::field::display),
            tenant = caller.map(|c| c.tenant.id.as_str()),
            key_id = caller.map(|c| &*c.key_id),
            source = tracing::field::Empty,
            engine = tracing::field::Empty,
            object = tracing::field::Empty,
            rows = tracing::field::Empty,
            bytes = tracing::field::Empty,
            sql = tracing::field::Empty,
            code = tracing::field::Empty,
            limit = tracing::field::Empty,
            )
        };
        // Only exported traces have a parent to join; without an exporter the
        // propagator's global lock and the extraction would be per-call waste.
        if crate::telemetry::exporting_traces() {
            let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
            let _ = span.set_parent(parent);
        }
        let caller = match authenticated {
            None => None,
            Some(Ok(caller)) => Some(caller),
            Some(Err(reason)) => {
                let _enter = span.enter();
                // The reason is for the operator; the caller gets one answer for every failure.
                match refusal {
                    Some(Logged::Yes { unlogged_before }) => {
                        if unlogged_before > 0 {
                            tracing::warn!(
                                target: AUDIT,
                                unlogged = unlogged_before,
                                "calls refused for their credentials were not logged one by one (over {REFUSALS_LOGGED_PER_SECOND} a second)"
                            );
                        }
                        tracing::info!(target: AUDIT, method = shown_path(&method), code = ?tonic::Code::Unauthenticated, reason = %reason, duration_ms = 0.0, "call");
                    }
                    Some(Logged::No) | None => {}
                }
                TenantMetrics::anonymous().record_call(
                    Method::of(&method),
                    tonic::Code::Unauthenticated,
                    started.elapsed(),
                );
                let mut response = tonic::Status::from(Error::Unauthenticated).into_http::<Body>();
                response.headers_mut().insert(REQUEST_ID_HEADER, id);
                return Box::pin(async move { Ok(response) });
            }
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let body_span = span.clone();
        let registry = self.tenants.clone();
        Box::pin(
            async move {
                // Then the tenant's limits, inside the call's span (a refusal
                // names its limit there), and only then the service.
                let (mut response, record) = match caller {
                    None => (inner.call(req).await?, None),
                    Some(mut caller) => {
                        // Recorded however the call ends, also when it is
                        // dropped before its response starts (the client
                        // reset the stream, the connection went).
                        let record = CallRecord {
                            code: None,
                            tenant: caller.tenant.clone(),
                            method: Method::of(&method),
                            started,
                            span: body_span,
                            slot: CallSlot::default(),
                        };
                        // A Rollback only lets go of what a transaction holds
                        // (its locks, its session): refused for the tenant's
                        // rate or concurrency, it would keep them until the
                        // transaction's idle timeout.
                        let deadline = admission::take_deadline(&mut caller, req.headers());
                        let admitted = if method == ROLLBACK {
                            Ok(None)
                        } else {
                            let stop = stopped(registry.stop_token(), &caller.revoked, caller.expires);
                            admission::admit(&caller, deadline, stop).await.map(|(permit, waited)| {
                                caller.rate_wait = waited;
                                Some(permit)
                            })
                        };
                        match admitted {
                            // Authenticated before it waited for its turn:
                            // revoked, cut or expired meanwhile, it does not run.
                            Ok(permit) => {
                                *record.slot.0.lock() = permit;
                                match stop_due(registry.stop_token(), &caller.revoked, caller.expires) {
                                    Some(e) => (tonic::Status::from(e).into_http(), Some(record)),
                                    None => {
                                        req.extensions_mut().insert(caller);
                                        req.extensions_mut().insert(record.slot.clone());
                                        (inner.call(req).await?, Some(record))
                                    }
                                }
                            }
                            Err(refusal) => (refusal, Some(record)),
                        }
                    }
                };
                settle_status(response.headers_mut());
                response.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
                let Some(mut record) = record else {
                    return Ok(response);
                };
                record.code = status_code(response.headers());
                Ok(response.map(|body| {
                    Body::new(ObservedBody {
                        inner: body,
                        record,
                        request_id: id,
                    })
                }))
            }
            .instrument(span),
        )
    }
}

/// The tracing target of the audit log.
pub const AUDIT: &str = "weir::audit";

/// A response body that reads the call's outcome from its trailers for its
/// `CallRecord`, which it holds until the response is over.
struct ObservedBody {
    inner: Body,
    record: CallRecord,
    /// Also sent with an error that ends the call after its headers (a
    /// stream failing midway): many gRPC libraries show a caller only the
    /// status and its trailers, not the headers the id came in first.
    request_id: HeaderValue,
}

/// An authenticated call's outcome (CANCELLED if the client left first) and
/// duration, recorded in the metrics and the audit log when it is dropped;
/// holds the call's concurrency slot until then.
struct CallRecord {
    code: Option<tonic::Code>,
    tenant: Arc<crate::tenant::Tenant>,
    method: Method,
    started: Instant,
    span: tracing::Span,
    /// The tenant's concurrency slot, given back after the outcome is
    /// recorded, or before by the task of a server stream that ended.
    slot: CallSlot,
}

/// A call's concurrency slot of its tenant, shared by its response body
/// and, for a server stream, the task that feeds it. hyper holds a body
/// whose client stopped reading for as long as the connection stays open,
/// so a stream's task lets go of the slot when it ends (at a stall, say):
/// a client that opens streams and reads none must not keep its tenant's
/// slots for good.
#[derive(Clone, Default)]
pub struct CallSlot(Arc<parking_lot::Mutex<Option<SlotPermit>>>);

impl CallSlot {
    /// Gives the slot back now.
    pub fn release(&self) {
        self.0.lock().take();
    }
}

impl HttpBody for ObservedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            if let Some(trailers) = frame.trailers_mut() {
                settle_status(trailers);
                if let Some(code) = status_code(trailers) {
                    self.record.code = Some(code);
                    if code != tonic::Code::Ok {
                        trailers.insert(REQUEST_ID_HEADER, self.request_id.clone());
                    }
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        let elapsed = self.started.elapsed();
        self.tenant.metrics.record_call(self.method, code, elapsed);
        // For the exported span; the audit line below carries the code itself,
        // and a field recorded costs a pass through every layer.
        if crate::telemetry::exporting_traces() {
            self.span.record("code", code_label(code));
        }
        let _enter = self.span.enter();
        // One line per call on its own target, so that it can be shipped (or
        // silenced, WEIR_LOG=weir::audit=off) separately; the call span adds
        // request id, tenant, key id, source, rows and bytes.
        tracing::info!(target: AUDIT, method = self.method.label(), code = ?code, duration_ms = elapsed.as_secs_f64() * 1e3, "call");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_named_by_known_methods_only() {
        assert_eq!(
            span_name("/weir.v1.QueryService/Execute"),
            "/weir.v1.QueryService/Execute"
        );
        assert_eq!(
            span_name("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(span_name("/weir.v1.Nope/6f1c0d9e"), "unknown");
    }

    #[test]
    fn paths_are_shown_cut_short_at_a_character() {
        assert_eq!(
            shown_path("/weir.v1.QueryService/Execute"),
            "/weir.v1.QueryService/Execute"
        );
        let long = format!("/weir.{}", "é".repeat(100));
        let shown = shown_path(&long);
        assert!(shown.len() <= SHOWN_PATH_BYTES && long.starts_with(shown) && shown.len() > 100);
    }

    fn request(id: Option<&str>) -> http::Request<Body> {
        let mut req = http::Request::new(Body::empty());
        if let Some(id) = id {
            req.headers_mut()
                .insert(REQUEST_ID_HEADER, HeaderValue::from_str(id).expect("header value"));
        }
        req
    }

    #[test]
    fn request_ids_are_kept_or_made_and_never_indexed() {
        let given = request_id(&request(Some("order-4711")));
        assert_eq!(given, "order-4711");
        let made = request_id(&request(None));
        assert_eq!(made.len(), 36, "a UUID: {made:?}");
        let refused = request_id(&request(Some("has space")));
        assert_ne!(refused, "has space");
        // Never-indexed in HPACK: unique values would only churn the tables.
        assert!(given.is_sensitive() && made.is_sensitive() && refused.is_sensitive());
    }

    #[test]
    fn statuses_keep_their_code_and_send_varying_values_never_indexed() {
        let mut headers = http::HeaderMap::new();
        headers.insert(GRPC_STATUS, HeaderValue::from_static("8"));
        headers.insert(GRPC_MESSAGE, HeaderValue::from_static("rate%20limited"));
        headers.insert(GRPC_DETAILS, HeaderValue::from_static("CAgSDHJhdGU"));
        settle_status(&mut headers);
        assert_eq!(headers[GRPC_STATUS], "8");
        assert!(!headers[GRPC_STATUS].is_sensitive());
        assert!(headers[GRPC_MESSAGE].is_sensitive() && headers[GRPC_DETAILS].is_sensitive());

        // A request the server could not decode is the caller's error.
        let mut headers = http::HeaderMap::new();
        headers.insert(GRPC_STATUS, HeaderValue::from_static("13"));
        headers.insert(
            GRPC_MESSAGE,
            HeaderValue::from_static("failed%20to%20decode%20Protobuf"),
        );
        settle_status(&mut headers);
        assert_eq!(headers[GRPC_STATUS], "3");
    }
}

//! The limits layer: admits an authenticated call against its tenant's
//! limits and holds the concurrency slot until the response body ends, so
//! a stream counts for as long as it runs.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::Mutex;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::error::Error;
use crate::limits::SlotPermit;
use crate::metrics::{LimitLabels, METRICS};
use crate::tenant::Caller;

#[derive(Clone, Default)]
pub struct AdmissionLayer;

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Admission { inner }
    }
}

#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
}

/// Counts a call refused by a limit, by tenant and limit, and names the
/// limit on the call's span (its audit line). The refusal's own text is
/// logged at debug only: under a flood an info line per refused call would
/// double the log volume the audit lines already make.
pub fn count_rejection(caller: &Caller, e: &Error) {
    count_refusal(&caller.tenant.id, e);
}

/// `count_rejection` by the tenant's id alone, for the caps that the
/// limiter and the transaction registry refuse themselves.
pub fn count_refusal(tenant: &str, e: &Error) {
    tracing::debug!(error = %e, "call rejected by tenant limits");
    let limit = match e {
        Error::RateLimited { .. } => "rate",
        Error::GlobalLimitsUnavailable => "global_unavailable",
        Error::GatewayBusy { .. } => "gateway_queue",
        Error::TooManyStreams { .. } => "streams",
        Error::TooManyTransactions { .. } => "transactions",
        Error::TooManyLoads { .. } => "loads",
        Error::TooManyConsumers { .. } => "consumers",
        Error::TooManySubscriptions { .. } => "subscriptions",
        _ => "concurrency",
    };
    tracing::Span::current().record("limit", limit);
    METRICS
        .rejections
        .get_or_create(&LimitLabels {
            tenant: tenant.to_string(),
            limit,
        })
        .inc();
}

/// Rate-limit answers by (rate, retry delay in whole milliseconds). Under a
/// flood the same few go out thousands of times a second, and building one
/// (message, details, their encodings) cost a third of answering a refusal.
static RATE_LIMITED: LazyLock<Mutex<HashMap<(u32, u64), http::HeaderMap>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
/// Distinct answers kept at most (slow rates give long delays, in many steps).
const RATE_LIMITED_KEPT: usize = 1024;

/// Counts a rejection and answers it.
fn reject(caller: Option<&Caller>, e: Error) -> http::Response<Body> {
    if let Some(caller) = caller {
        count_rejection(caller, &e);
    }
    let Error::RateLimited { rate, retry_after } = e else {
        return tonic::Status::from(e).into_http();
    };
    // Rounded up: a caller told to wait a little longer loses nothing.
    let millis = u64::try_from(retry_after.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    let mut kept = RATE_LIMITED.lock();
    if kept.len() >= RATE_LIMITED_KEPT {
        kept.clear();
    }
    let headers = kept.entry((rate, millis)).or_insert_with(|| {
        let e = Error::RateLimited {
            rate,
            retry_after: Duration::from_millis(millis),
        };
        tonic::Status::from(e).into_http::<Body>().into_parts().0.headers
    });
    let mut response = http::Response::new(Body::empty());
    *response.headers_mut() = headers.clone();
    response
}

impl<S> Service<http::Request<Body>> for Admission<S>
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
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| weir_proto::deadline::parse_grpc_timeout(v.to_str().ok()?));
        // Calls without a caller (health, reflection) are not tenant calls.
        let admitted = req
            .extensions()
            .get::<Caller>()
            .map(|c| c.tenant.limiter.admit(deadline));
        let turn = match admitted {
            None => None,
            Some(Ok(turn)) => Some(turn),
            Some(Err(e)) => {
                let response = reject(req.extensions().get::<Caller>(), e);
                return Box::pin(async move { Ok(response) });
            }
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let Some(turn) = turn else {
                return inner.call(req).await;
            };
            // Admitted locally: the call waits for its turn, if it has one to
            // wait for, and asks the shared bucket next, when there is one.
            if let Some(caller) = req.extensions_mut().get_mut::<Caller>() {
                match caller.tenant.limiter.wait_turn(turn.wait, deadline).await {
                    Ok(waited) => caller.rate_wait = waited,
                    Err(e) => return Ok(reject(Some(caller), e)),
                }
            }
            let response = inner.call(req).await?;
            Ok(response.map(|body| {
                Body::new(PermitBody {
                    inner: body,
                    _permit: turn.permit,
                })
            }))
        })
    }
}

/// A response body that releases the tenant's concurrency slot when it is dropped.
struct PermitBody {
    inner: Body,
    _permit: SlotPermit,
}

impl HttpBody for PermitBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    fn refusal(rate: u32, retry_after: Duration) -> tonic::Status {
        let response = reject(None, Error::RateLimited { rate, retry_after });
        tonic::Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn rate_limit_answers_are_kept_and_round_the_delay_up() {
        let first = refusal(7, Duration::from_micros(2_100));
        assert_eq!(first.code(), tonic::Code::ResourceExhausted);
        let delay = first.get_error_details().retry_info().and_then(|r| r.retry_delay);
        assert_eq!(delay, Some(Duration::from_millis(3)));
        assert!(first.message().contains("7 requests per second"), "{}", first.message());
        // Another delay within the same millisecond gets the same answer.
        let again = refusal(7, Duration::from_micros(2_900));
        assert_eq!(again.message(), first.message());
        assert_eq!(again.details(), first.details());
        assert_eq!(
            refusal(7, Duration::from_millis(40))
                .get_error_details()
                .retry_info()
                .and_then(|r| r.retry_delay),
            Some(Duration::from_millis(40))
        );
    }
}

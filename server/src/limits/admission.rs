//! The limits layer: admits an authenticated call against its tenant's
//! limits and holds the concurrency slot until the response body ends, so
//! a stream counts for as long as it runs.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::OwnedSemaphorePermit;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::error::Error;
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

/// Counts a call refused by a limit, by tenant and limit.
pub fn count_rejection(caller: &Caller, e: &Error) {
    tracing::info!(error = %e, "call rejected by tenant limits");
    let limit = match e {
        Error::RateLimited { .. } => "rate",
        Error::GlobalLimitsUnavailable => "global_unavailable",
        Error::GatewayBusy { .. } => "gateway_queue",
        Error::TooManyStreams { .. } => "streams",
        Error::TooManyTransactions { .. } => "transactions",
        _ => "concurrency",
    };
    METRICS
        .rejections
        .get_or_create(&LimitLabels {
            tenant: caller.tenant.id.clone(),
            limit,
        })
        .inc();
}

/// Counts a rejection and answers it.
fn reject(caller: Option<&Caller>, e: Error) -> http::Response<Body> {
    if let Some(caller) = caller {
        count_rejection(caller, &e);
    }
    tonic::Status::from(e).into_http()
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

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Calls without a caller (health, reflection) are not tenant calls.
        let admitted = req.extensions().get::<Caller>().map(|c| c.tenant.limiter.admit());
        let permit = match admitted {
            None => None,
            Some(Ok(permit)) => Some(permit),
            Some(Err(e)) => {
                let response = reject(req.extensions().get::<Caller>(), e);
                return Box::pin(async move { Ok(response) });
            }
        };
        // Admitted locally; the shared bucket is asked next, when there is one.
        let caller = req.extensions().get::<Caller>().cloned();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            if let Some(caller) = caller {
                if let Err(e) = caller.tenant.limiter.admit_shared().await {
                    return Ok(reject(Some(&caller), e));
                }
            }
            let response = inner.call(req).await?;
            Ok(match permit {
                Some(permit) => response.map(|body| {
                    Body::new(PermitBody {
                        inner: body,
                        _permit: permit,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that releases the tenant's concurrency slot when it is dropped.
struct PermitBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
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

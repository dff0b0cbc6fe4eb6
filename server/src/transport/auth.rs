//! The auth layer: gives every call a request id (echoed in `x-request-id`)
//! and a tracing span, and turns the bearer key of `weir.v1` calls into a
//! `Caller` in the request extensions. Health and reflection need no key.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http::HeaderValue;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::error::Error;
use crate::tenant::Tenants;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Paths of the gateway's own API; everything else (health, reflection) is public.
const API_PREFIX: &str = "/weir.";

#[derive(Clone)]
pub struct AuthLayer {
    tenants: Arc<Tenants>,
}

impl AuthLayer {
    pub fn new(tenants: Arc<Tenants>) -> Self {
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
    tenants: Arc<Tenants>,
}

/// A caller-supplied id is kept when it is short and printable; otherwise a new one is made.
fn request_id(req: &http::Request<Body>) -> HeaderValue {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| v.len() <= 64 && v.to_str().is_ok_and(|s| s.chars().all(|c| c.is_ascii_graphic())))
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).unwrap_or(HeaderValue::from_static("unknown"))
        })
}

fn bearer(req: &http::Request<Body>) -> Option<&str> {
    let value = req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
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
        let id = request_id(&req);
        let method = req.uri().path().to_string();
        let span = tracing::info_span!(
            "call",
            request_id = id.to_str().unwrap_or_default(),
            method = %method,
            tenant = tracing::field::Empty,
            key_id = tracing::field::Empty,
        );
        if method.starts_with(API_PREFIX) {
            match bearer(&req).and_then(|key| self.tenants.authenticate(key)) {
                Some(caller) => {
                    span.record("tenant", caller.tenant.id.as_str());
                    span.record("key_id", &*caller.key_id);
                    req.extensions_mut().insert(caller);
                }
                None => {
                    let _enter = span.enter();
                    tracing::info!("call rejected: missing or unknown API key");
                    let mut response = tonic::Status::from(Error::Unauthenticated).into_http::<Body>();
                    response.headers_mut().insert(REQUEST_ID_HEADER, id);
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let started = Instant::now();
                let mut response = inner.call(req).await?;
                response.headers_mut().insert(REQUEST_ID_HEADER, id);
                let grpc_status = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0");
                tracing::debug!(
                    grpc_status,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "call answered"
                );
                Ok(response)
            }
            .instrument(span),
        )
    }
}

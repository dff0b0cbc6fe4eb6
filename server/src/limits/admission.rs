//! Admission: an authenticated call is admitted against its tenant's limits
//! (concurrency, then its turn at the request rate) before it reaches a
//! service. The auth layer calls it, so that one layer, one boxed future
//! and one response body serve both steps; the concurrency slot it returns
//! is held until the response body ends, so a stream counts for as long as
//! it runs.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use parking_lot::Mutex;
use tonic::body::Body;

use crate::error::Error;
use crate::limits::SlotPermit;
use crate::metrics::{LimitLabels, METRICS};
use crate::tenant::Caller;

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
        Error::GatewayBusy { .. } | Error::QueuedPastDeadline(_) => "gateway_queue",
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

/// Admits `caller`'s call, or answers its refusal: takes a concurrency
/// slot, then waits for the call's turn at the tenant's request rate (and
/// the shared bucket's, when there is one) within the call's deadline.
/// Returns the slot and how long the call waited. `stop` completes with
/// why the call must not run (its credential revoked or expired, the
/// shutdown's end): such a call waits no longer, and gives back its turn
/// and its slot to the tenant's other callers.
pub async fn admit(
    caller: &Caller,
    deadline: Option<Duration>,
    stop: impl std::future::Future<Output = Error>,
) -> Result<(SlotPermit, Duration), http::Response<Body>> {
    let limiter = &caller.tenant.limiter;
    let turn = limiter.admit(deadline).map_err(|e| reject(Some(caller), e))?;
    // The turn first: a call with a token free now is admitted without
    // polling the stop (the auth layer checks it once more after).
    let waited = tokio::select! {
        biased;
        waited = limiter.wait_turn(turn.wait, deadline) => waited.map_err(|e| reject(Some(caller), e))?,
        e = stop => {
            limiter.give_back_turn();
            return Err(tonic::Status::from(e).into_http());
        }
    };
    Ok((turn.permit, waited))
}

/// Records the call's deadline (its `grpc-timeout`) on the caller; returns it.
pub fn take_deadline(caller: &mut Caller, headers: &http::HeaderMap) -> Option<Duration> {
    let deadline = headers
        .get("grpc-timeout")
        .and_then(|v| weir_proto::deadline::parse_grpc_timeout(v.to_str().ok()?));
    caller.deadline = deadline.and_then(|d| tokio::time::Instant::now().checked_add(d));
    deadline
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

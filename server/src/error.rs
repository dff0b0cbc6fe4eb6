//! The gateway's error kinds and their one conversion to `tonic::Status`,
//! with google.rpc details: `ErrorInfo` (a stable reason and the engine's
//! code), `RetryInfo` where waiting helps, `BadRequest` for invalid fields.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::backend::{BackendError, EngineErrorKind};

/// `ErrorInfo.domain` of every Weir error.
pub const ERROR_DOMAIN: &str = "weir.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "missing or invalid credentials: send metadata 'authorization: Bearer <API key or token>', or connect \
         with a client certificate the server knows (a renewed certificate needs a new connection)"
    )]
    Unauthenticated,
    /// The same answer for unknown sources and other tenants' sources.
    #[error("source \"{0}\" not found")]
    SourceNotFound(String),
    #[error("transaction not found: it was committed, rolled back, timed out, or belongs to another caller")]
    TransactionNotFound,
    #[error(
        "the transaction's database session was lost ({0}); it was rolled back: run it again from BeginTransaction"
    )]
    /// The session's loss, and the engine's code for it (may be empty).
    TransactionLost(String, String),
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("rate limit of {rate} requests per second exceeded; retry in {retry_after:?}")]
    RateLimited { rate: u32, retry_after: Duration },
    #[error("too many concurrent requests (limit {limit}); retry when a call finishes")]
    TooManyConcurrent { limit: u32 },
    #[error("result exceeds the unary {what} limit of {limit}; use ExecuteStream or narrow the query")]
    ResultTooLarge { what: &'static str, limit: u64 },
    #[error("statement exceeded its time limit of {0:?} and was cancelled")]
    Timeout(Duration),
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
    /// A reload took away the key, client identity or tenant the call was
    /// made with (or changed the JWT settings), while the call was running.
    #[error("the credential this call was made with was revoked by a configuration change; the call was ended")]
    Revoked,
    /// The bearer token's `exp` (plus the leeway), or the client
    /// certificate's end, passed while the call was running or waiting for
    /// its turn.
    #[error(
        "the credential (bearer token or client certificate) expired while the call was running or waiting for \
         its turn; the call was ended. Call again with a fresh token, or reconnect with a renewed certificate"
    )]
    CredentialExpired,
    #[error("too many bulk loads in progress (limit {limit}); retry when one finishes")]
    TooManyLoads { limit: u32 },
    #[error("the load exceeds the limit of {limit} rows per load and was rolled back; split it into several loads")]
    LoadTooLarge { limit: u64 },
    #[error("the load did not finish within {0:?} and was rolled back")]
    LoadTimeout(Duration),
    #[error(
        "the call's deadline passed after {0:?} of waiting for its turn at the tenant's record rate; nothing was \
         produced: send fewer records per call, or give the call more time"
    )]
    ThrottledPastDeadline(Duration),
    #[error(
        "the call's deadline is near, so the stream ends here, after the records sent (committed, with automatic \
         commits); consume again to read on"
    )]
    ConsumeDeadline,
    #[error(
        "the call's deadline passed after {0:?} of waiting for a gateway slot (every slot was in use); nothing \
         ran: give the call more time, or send it again later"
    )]
    QueuedPastDeadline(Duration),
    #[error("the client aborted the load ({0}); nothing was loaded")]
    LoadAborted(String),
    #[error("too many Kafka consumers open (limit {limit}); retry when one ends")]
    TooManyConsumers { limit: u32 },
    #[error("too many change streams open (limit {limit}); retry when one ends")]
    TooManySubscriptions { limit: u32 },
    #[error(
        "record {index} has {size} bytes, more than the limit of {limit} (the tenant's max_record_bytes, or the \
         source's producer's message.max.bytes less librdkafka's framing of a record, whichever is less); nothing was sent"
    )]
    RecordTooLarge { index: usize, size: usize, limit: u64 },
    /// Topics outside the tenant's allow-list get the same answer as topics that do not exist.
    #[error("topic \"{0}\" not found")]
    TopicNotFound(String),
    #[error("the shared rate limits cannot be checked (Redis is unreachable); retry shortly")]
    GlobalLimitsUnavailable,
    #[error(
        "a configuration reload removed the source or pointed it at another server, database or login; \
         watch again to resume from the last acknowledged position"
    )]
    SourceRetired,
    #[error("the gateway is saturated: no slot came free within {waited:?}; retry in {retry_after:?} or with a higher priority")]
    GatewayBusy { waited: Duration, retry_after: Duration },
    #[error(
        "the client took no message for {0:?}, so the stream was ended (and its statement cancelled); read it faster"
    )]
    StreamStalled(Duration),
    #[error(
        "no whole message came from the client for {0:?} (the tenant's transaction_idle_timeout), so the load was rolled back; \
         send its rows without pausing that long"
    )]
    LoadIdle(Duration),
    #[error("too many result streams open (limit {limit}); retry when one ends")]
    TooManyStreams { limit: u32 },
    #[error("too many transactions open (limit {limit}); commit or roll back one first")]
    TooManyTransactions { limit: u32 },
    /// A result asked for as Arrow IPC holds a column or value that its Arrow type cannot hold exactly.
    #[error(
        "{}column \"{column}\": {message}; cast the column in SQL, or ask for RESULT_FORMAT_ROWS",
        row.map(|r| format!("row {r}, ")).unwrap_or_default()
    )]
    NotArrow {
        /// 0-based in the whole result; None when the column itself has no Arrow type.
        row: Option<u64>,
        column: String,
        message: String,
    },
    /// A request message the gRPC layer refused (over `max_request_bytes`,
    /// or not a valid message), passed on as it answers such a message of a
    /// unary call.
    #[error("{}", .0.message())]
    BadMessage(Status),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Inside a transaction a lost session loses the transaction: ABORTED, not UNAVAILABLE.
    pub fn in_transaction(self) -> Error {
        match self {
            Error::Backend(e) if e.is_unavailable() => {
                let code = match &e {
                    BackendError::Engine { code, .. } => code.clone(),
                    _ => String::new(),
                };
                Error::TransactionLost(e.to_string(), code)
            }
            other => other,
        }
    }
}

fn info(reason: &str, metadata: Vec<(&str, String)>) -> ErrorDetails {
    let metadata: std::collections::HashMap<String, String> =
        metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata)
}

/// A per-tenant cap on things in progress: retry once one of them ends.
fn at_cap(reason: &str, limit: u32) -> (Code, ErrorDetails) {
    let mut d = info(reason, vec![("limit", limit.to_string())]);
    d.set_retry_info(Some(Duration::from_secs(1)));
    (Code::ResourceExhausted, d)
}

fn engine_code(kind: EngineErrorKind) -> (Code, &'static str) {
    use EngineErrorKind as K;
    match kind {
        K::InvalidArgument => (Code::InvalidArgument, "ENGINE_INVALID_ARGUMENT"),
        K::NotFound => (Code::NotFound, "ENGINE_OBJECT_NOT_FOUND"),
        K::AlreadyExists => (Code::AlreadyExists, "ENGINE_UNIQUE_VIOLATION"),
        K::FailedPrecondition => (Code::FailedPrecondition, "ENGINE_FAILED_PRECONDITION"),
        K::PermissionDenied => (Code::PermissionDenied, "ENGINE_PERMISSION_DENIED"),
        K::Aborted => (Code::Aborted, "ENGINE_ABORTED"),
        K::ResourceExhausted | K::Overloaded => (Code::ResourceExhausted, "ENGINE_RESOURCE_EXHAUSTED"),
        K::Unavailable => (Code::Unavailable, "ENGINE_UNAVAILABLE"),
        K::DeadlineExceeded => (Code::DeadlineExceeded, "ENGINE_TIMEOUT"),
        K::Internal => (Code::Internal, "ENGINE_ERROR"),
    }
}

impl From<BackendError> for Status {
    fn from(e: BackendError) -> Status {
        Error::from(e).into()
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        let (code, details) = match &e {
            Error::BadMessage(status) => return status.clone(),
            Error::Unauthenticated => (Code::Unauthenticated, info("UNAUTHENTICATED", vec![])),
            Error::Revoked => (Code::Unauthenticated, info("CREDENTIAL_REVOKED", vec![])),
            Error::CredentialExpired => (Code::Unauthenticated, info("CREDENTIAL_EXPIRED", vec![])),
            Error::SourceNotFound(_) => (Code::NotFound, info("SOURCE_NOT_FOUND", vec![])),
            Error::TransactionNotFound => (Code::NotFound, info("TRANSACTION_NOT_FOUND", vec![])),
            Error::TransactionLost(_, engine_code) => {
                let meta = match engine_code.is_empty() {
                    true => vec![],
                    false => vec![("engine_code", engine_code.clone())],
                };
                let mut d = info("TRANSACTION_LOST", meta);
                d.set_retry_info(Some(Duration::from_secs(1)));
                (Code::Aborted, d)
            }
            Error::InvalidArgument { field, message } => {
                let mut d = ErrorDetails::with_bad_request_violation(*field, shortened(message.clone()));
                d.set_error_info("INVALID_ARGUMENT", ERROR_DOMAIN, std::collections::HashMap::new());
                (Code::InvalidArgument, d)
            }
            Error::RateLimited { retry_after, rate } => {
                let mut d = info("RATE_LIMITED", vec![("limit", rate.to_string())]);
                d.set_retry_info(Some(*retry_after));
                (Code::ResourceExhausted, d)
            }
            Error::TooManyConcurrent { limit } => {
                let mut d = info("CONCURRENCY_LIMITED", vec![("limit", limit.to_string())]);
                d.set_retry_info(Some(Duration::from_millis(100)));
                (Code::ResourceExhausted, d)
            }
            Error::ResultTooLarge { what, limit } => (
                Code::ResourceExhausted,
                info(
                    "RESULT_TOO_LARGE",
                    vec![("limit", limit.to_string()), ("unit", what.to_string())],
                ),
            ),
            Error::Timeout(limit) => (
                Code::DeadlineExceeded,
                info("STATEMENT_TIMEOUT", vec![("limit_ms", limit.as_millis().to_string())]),
            ),
            Error::ShuttingDown => {
                let mut d = info("SHUTTING_DOWN", vec![]);
                d.set_retry_info(Some(Duration::from_secs(1)));
                (Code::Unavailable, d)
            }
            Error::TooManyLoads { limit } => at_cap("LOAD_CONCURRENCY_LIMITED", *limit),
            Error::LoadTooLarge { limit } => (
                Code::ResourceExhausted,
                info(
                    "LOAD_TOO_LARGE",
                    vec![("limit", limit.to_string()), ("unit", "rows".into())],
                ),
            ),
            Error::LoadAborted(_) => (Code::Aborted, info("LOAD_ABORTED", vec![])),
            Error::TooManyConsumers { limit } => at_cap("CONSUMER_CONCURRENCY_LIMITED", *limit),
            Error::TooManySubscriptions { limit } => at_cap("SUBSCRIPTION_CONCURRENCY_LIMITED", *limit),
            Error::RecordTooLarge { limit, .. } => (
                Code::InvalidArgument,
                info("RECORD_TOO_LARGE", vec![("limit", limit.to_string())]),
            ),
            Error::TopicNotFound(_) => (Code::NotFound, info("TOPIC_NOT_FOUND", vec![])),
            Error::NotArrow { column, .. } => (
                Code::InvalidArgument,
                info("NOT_REPRESENTABLE_IN_ARROW", vec![("column", column.clone())]),
            ),
            Error::GatewayBusy { waited, retry_after } => {
                let mut d = info("GATEWAY_SATURATED", vec![("waited_ms", waited.as_millis().to_string())]);
                d.set_retry_info(Some(*retry_after));
                (Code::ResourceExhausted, d)
            }
            Error::StreamStalled(idle) => (
                Code::DeadlineExceeded,
                info("STREAM_STALLED", vec![("idle_ms", idle.as_millis().to_string())]),
            ),
            Error::LoadIdle(idle) => (
                Code::DeadlineExceeded,
                info("LOAD_IDLE", vec![("idle_ms", idle.as_millis().to_string())]),
            ),
            Error::TooManyStreams { limit } => at_cap("STREAM_CONCURRENCY_LIMITED", *limit),
            Error::TooManyTransactions { limit } => at_cap("TRANSACTION_LIMIT", *limit),
            Error::GlobalLimitsUnavailable => {
                let mut d = info("GLOBAL_LIMITS_UNAVAILABLE", vec![]);
                d.set_retry_info(Some(Duration::from_secs(1)));
                (Code::Unavailable, d)
            }
            Error::SourceRetired => {
                let mut d = info("SOURCE_RECONFIGURED", vec![]);
                d.set_retry_info(Some(Duration::from_secs(1)));
                (Code::Unavailable, d)
            }
            Error::LoadTimeout(limit) => (
                Code::DeadlineExceeded,
                info("LOAD_TIMEOUT", vec![("limit_ms", limit.as_millis().to_string())]),
            ),
            Error::ThrottledPastDeadline(limit) => (
                Code::DeadlineExceeded,
                info(
                    "THROTTLED_PAST_DEADLINE",
                    vec![("waited_ms", limit.as_millis().to_string())],
                ),
            ),
            Error::ConsumeDeadline => (Code::DeadlineExceeded, info("DEADLINE_REACHED", vec![])),
            Error::QueuedPastDeadline(waited) => (
                Code::DeadlineExceeded,
                info(
                    "QUEUED_PAST_DEADLINE",
                    vec![("waited_ms", waited.as_millis().to_string())],
                ),
            ),
            Error::Backend(b) => backend_parts(b),
        };
        let message = shortened(message);
        let message = match &e {
            Error::Backend(BackendError::Engine { code, .. } | BackendError::Row { code, .. }) if !code.is_empty() => {
                format!("{message} (engine code {code})")
            }
            _ => message,
        };
        Status::with_error_details(code, message, details)
    }
}

/// The most of a message a status carries. It travels in the trailers twice
/// (`grpc-message`, percent-encoded, and the details' copy), and clients
/// refuse trailers past 8 KiB (gRPC C-core, grpc-java) or 16 KiB (hyper,
/// which closes the whole connection past 64 KiB); an engine's message
/// can be any length (a RAISE, a wide table's failing row).
const MAX_MESSAGE_BYTES: usize = 1024;

/// The most the record lists of a failed Produce take (see `index_ranges`).
const MAX_RECORD_LISTS_BYTES: usize = 4096;

/// Ascending indexes as `0-4,7,9-12`: runs of three or more as ranges.
fn index_ranges(indexes: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while let Some(&first) = indexes.get(i) {
        let mut last = first;
        while indexes.get(i + 1) == Some(&(last + 1)) {
            last += 1;
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        match last - first {
            0 => out.push_str(&first.to_string()),
            1 => out.push_str(&format!("{first},{last}")),
            _ => out.push_str(&format!("{first}-{last}")),
        }
        i += 1;
    }
    out
}

pub fn shortened(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let cut = message.len() - end;
        message.truncate(end);
        message.push_str(&format!("... ({cut} bytes more)"));
    }
    message
}

/// The code and details of a backend error.
fn backend_parts(b: &BackendError) -> (Code, ErrorDetails) {
    match b {
        BackendError::Engine { kind, code, .. } => {
            let (grpc, reason) = engine_code(*kind);
            let mut meta = vec![];
            if !code.is_empty() {
                meta.push(("engine_code", code.clone()));
            }
            let mut d = info(reason, meta);
            let retry = match kind {
                EngineErrorKind::Aborted | EngineErrorKind::Unavailable => Some(Duration::from_millis(100)),
                // Busy now, not out of disk: a retry can succeed once load falls.
                EngineErrorKind::Overloaded => Some(Duration::from_secs(1)),
                _ => None,
            };
            if retry.is_some() {
                d.set_retry_info(retry);
            }
            (grpc, d)
        }
        BackendError::Unavailable(_) => {
            let mut d = info("SOURCE_UNAVAILABLE", vec![]);
            d.set_retry_info(Some(Duration::from_secs(1)));
            (Code::Unavailable, d)
        }
        BackendError::CircuitOpen { retry_after, .. } => {
            let mut d = info("SOURCE_CIRCUIT_OPEN", vec![]);
            d.set_retry_info(Some(*retry_after));
            (Code::Unavailable, d)
        }
        BackendError::PoolExhausted { max_size, waited } => {
            let mut d = info(
                "POOL_EXHAUSTED",
                vec![
                    ("pool_size", max_size.to_string()),
                    ("waited_ms", waited.as_millis().to_string()),
                ],
            );
            d.set_retry_info(Some(Duration::from_millis(200)));
            (Code::ResourceExhausted, d)
        }
        BackendError::UnsupportedType { .. } => (Code::InvalidArgument, info("UNSUPPORTED_TYPE", vec![])),
        BackendError::Parameter { .. } => (Code::InvalidArgument, info("INVALID_PARAMETER", vec![])),
        BackendError::Busy => {
            // Passing: the statement before is being cancelled, or its stream read.
            let mut d = info("TRANSACTION_BUSY", vec![]);
            d.set_retry_info(Some(Duration::from_secs(1)));
            (Code::FailedPrecondition, d)
        }
        BackendError::Invalid(_) => (Code::InvalidArgument, info("INVALID_REQUEST", vec![])),
        BackendError::Row {
            index,
            column,
            code,
            message,
        } => {
            let field = match column {
                Some(c) => format!("rows[{index}].{c}"),
                None => format!("rows[{index}]"),
            };
            let mut d = ErrorDetails::with_bad_request_violation(field, shortened(message.clone()));
            let mut meta = vec![("row_index", index.to_string())];
            if let Some(c) = column {
                meta.push(("column", c.clone()));
            }
            if !code.is_empty() {
                meta.push(("engine_code", code.clone()));
            }
            let meta: std::collections::HashMap<String, String> =
                meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            d.set_error_info("BAD_ROW", ERROR_DOMAIN, meta);
            (Code::InvalidArgument, d)
        }
        BackendError::LoadAbandoned => (Code::Aborted, info("LOAD_ABANDONED", vec![])),
        BackendError::RowTooLarge { limit } => (
            Code::ResourceExhausted,
            info(
                "ROW_TOO_LARGE",
                vec![("limit", limit.to_string()), ("unit", "bytes".into())],
            ),
        ),
        BackendError::CommitOutcomeUnknown(_) => (Code::Unknown, info("COMMIT_OUTCOME_UNKNOWN", vec![])),
        BackendError::TransactionEnded => (Code::NotFound, info("TRANSACTION_NOT_FOUND", vec![])),
        BackendError::CommittedImplicitly => (
            Code::FailedPrecondition,
            info("TRANSACTION_COMMITTED_IMPLICITLY", vec![]),
        ),
        BackendError::EndedByStatement => (Code::FailedPrecondition, info("TRANSACTION_ENDED_BY_STATEMENT", vec![])),
        BackendError::TransactionRolledBack(_) | BackendError::TransactionBroken(_) => {
            let mut d = info("TRANSACTION_LOST", vec![]);
            d.set_retry_info(Some(Duration::from_secs(1)));
            (Code::Aborted, d)
        }
        // The statement's own answer (a retry would fail the same way),
        // marked: its transaction is gone too.
        BackendError::RolledBackBy(cause) => {
            let (code, mut d) = backend_parts(cause);
            if let Some(info) = d.error_info().cloned() {
                let mut metadata = info.metadata;
                metadata.insert("transaction_lost".into(), "true".into());
                d.set_error_info(info.reason, info.domain, metadata);
            }
            (code, d)
        }
        BackendError::WrongKind(_) => (Code::FailedPrecondition, info("WRONG_SOURCE_KIND", vec![])),
        BackendError::LoadIdReused(_) => (Code::FailedPrecondition, info("LOAD_ID_REUSED", vec![])),
        BackendError::ChangesNotReady(_) => (Code::FailedPrecondition, info("CHANGE_STREAMS_NOT_READY", vec![])),
        BackendError::SubscriptionActive(_) => (Code::AlreadyExists, info("SUBSCRIPTION_ACTIVE", vec![])),
        BackendError::SubscriptionTakenOver(_) => (Code::Aborted, info("SUBSCRIPTION_TAKEN_OVER", vec![])),
        BackendError::SubscriptionNotFound(_) => (Code::NotFound, info("SUBSCRIPTION_NOT_FOUND", vec![])),
        BackendError::PositionNotRetained(_) => (Code::OutOfRange, info("POSITION_NOT_RETAINED", vec![])),
        BackendError::Internal(_) => (Code::Internal, info("INTERNAL", vec![])),

        BackendError::ProducePartial {
            cause,
            acknowledged,
            failed,
            unknown,
        } => {
            // The cause's code and reason, and which records to send again.
            let (code, mut d) = backend_parts(cause);
            let (reason, mut meta) = d
                .error_info()
                .map(|i| (i.reason.clone(), i.metadata.clone()))
                .unwrap_or_default();
            let mut lists = [failed, unknown, acknowledged].map(|v| index_ranges(v));
            // Past what a client takes in trailers (gRPC C-core and Java
            // refuse more than 8 KiB, hyper closes the connection past 64):
            // every record is unknown, which is true of none it wrongly
            // names written or not.
            if lists.iter().map(String::len).sum::<usize>() > MAX_RECORD_LISTS_BYTES {
                let all: Vec<usize> = (0..failed.len() + unknown.len() + acknowledged.len()).collect();
                lists = [String::new(), index_ranges(&all), String::new()];
            }
            let [failed, unknown, acknowledged] = lists;
            meta.insert("failed_records".into(), failed);
            meta.insert("unknown_records".into(), unknown);
            meta.insert("acknowledged_records".into(), acknowledged);
            d.set_error_info(reason, ERROR_DOMAIN, meta);
            (code, d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_record_lists_are_ranges_and_stay_small() {
        assert_eq!(index_ranges(&[]), "");
        assert_eq!(index_ranges(&[1, 2]), "1,2");
        assert_eq!(index_ranges(&[0, 1, 2, 3, 7, 9, 10, 11]), "0-3,7,9-11");
        let partial = |failed: Vec<usize>, acknowledged: Vec<usize>| {
            let status = tonic::Status::from(Error::Backend(BackendError::ProducePartial {
                cause: Box::new(BackendError::Unavailable("gone".into())),
                acknowledged,
                failed,
                unknown: Vec::new(),
            }));
            let info = status.get_error_details().error_info().cloned().expect("info");
            let list = |k: &str| info.metadata.get(k).cloned().unwrap_or_default();
            (
                list("failed_records"),
                list("unknown_records"),
                list("acknowledged_records"),
            )
        };
        assert_eq!(
            partial((0..50_000).collect(), (50_000..100_000).collect()),
            ("0-49999".into(), String::new(), "50000-99999".into())
        );
        // Every other record of 100,000 failed: too long to list, all unknown.
        let (odd, even): (Vec<usize>, Vec<usize>) = (0..100_000).partition(|i| i % 2 == 1);
        assert_eq!(partial(odd, even), (String::new(), "0-99999".into(), String::new()));
    }

    #[test]
    fn a_lost_transaction_keeps_the_engines_code() {
        let lost = Error::Backend(BackendError::Engine {
            kind: EngineErrorKind::Unavailable,
            code: "57P01".into(),
            message: "terminating connection due to administrator command".into(),
        })
        .in_transaction();
        let status = Status::from(lost);
        assert_eq!(status.code(), Code::Aborted);
        let info = status.get_error_details().error_info().cloned().expect("error info");
        assert_eq!(info.reason, "TRANSACTION_LOST");
        assert_eq!(info.metadata.get("engine_code").map(String::as_str), Some("57P01"));
    }

    #[test]
    fn a_statement_that_closed_its_transaction_says_so_with_its_cause() {
        let status = Status::from(Error::Backend(BackendError::RolledBackBy(Box::new(
            crate::backend::error::second_result_set(),
        ))));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("more than one result set"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("rolled back"), "{}", status.message());
        let info = status.get_error_details().error_info().cloned().expect("error info");
        assert_eq!(info.reason, "INVALID_REQUEST");
        assert_eq!(info.metadata.get("transaction_lost").map(String::as_str), Some("true"));
        assert!(status.get_error_details().retry_info().is_none());
    }

    #[test]
    fn a_long_engine_message_is_cut_and_keeps_its_code() {
        let status = Status::from(Error::Backend(BackendError::Engine {
            kind: EngineErrorKind::FailedPrecondition,
            code: "P0001".into(),
            message: "é".repeat(50_000),
        }));
        assert!(
            status.message().len() < MAX_MESSAGE_BYTES + 64,
            "{}",
            status.message().len()
        );
        assert!(
            status.message().ends_with("(98976 bytes more) (engine code P0001)"),
            "{}",
            status.message()
        );
        assert!(
            status.details().len() < 2 * MAX_MESSAGE_BYTES,
            "{}",
            status.details().len()
        );
        // A bad row's message is also in its BadRequest details: cut there too.
        let status = Status::from(Error::Backend(BackendError::Row {
            index: 3,
            column: Some("id".into()),
            code: String::new(),
            message: format!("{:?} is not a UUID", "x".repeat(1 << 20)),
        }));
        assert!(
            status.details().len() < 3 * MAX_MESSAGE_BYTES,
            "{}",
            status.details().len()
        );
        let status = Status::from(Error::InvalidArgument {
            field: "sql",
            message: "y".repeat(1 << 20),
        });
        assert!(
            status.details().len() < 3 * MAX_MESSAGE_BYTES,
            "{}",
            status.details().len()
        );
    }

    #[test]
    fn rate_limit_carries_retry_info() {
        let status = Status::from(Error::RateLimited {
            rate: 5,
            retry_after: Duration::from_millis(150),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_millis(150))
        );
        assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("RATE_LIMITED"));
    }

    #[test]
    fn a_partial_produce_lists_what_to_send_again() {
        let status = Status::from(Error::Backend(BackendError::ProducePartial {
            cause: Box::new(BackendError::Unavailable("the Kafka cluster did not answer".into())),
            acknowledged: vec![0, 3],
            failed: vec![1],
            unknown: vec![2],
        }));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("2 of 4 records"), "{}", status.message());
        let info = status.get_error_details().error_info().cloned().expect("error info");
        let meta = |k: &str| info.metadata.get(k).cloned().unwrap_or_default();
        assert_eq!(meta("acknowledged_records"), "0,3");
        assert_eq!(meta("failed_records"), "1");
        assert_eq!(meta("unknown_records"), "2");
    }

    #[test]
    fn engine_errors_keep_their_code() {
        let status = Status::from(Error::Backend(BackendError::Engine {
            kind: EngineErrorKind::InvalidArgument,
            code: "42601".into(),
            message: "syntax error at or near \"selec\"".into(),
        }));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("42601"));
        let info = status.get_error_details().error_info().cloned().expect("error info");
        assert_eq!(info.metadata.get("engine_code").map(String::as_str), Some("42601"));
    }
}

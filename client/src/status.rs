//! One-line descriptions of gRPC errors for people.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Describes `status` on one line, for example
/// `NOT_FOUND: source "x" not found (reason SOURCE_NOT_FOUND)`, appending the
/// `google.rpc.ErrorInfo` reason and metadata (such as `sqlstate`), the
/// retry delay and the server's `x-request-id` when the status carries them.
pub fn describe_status(status: &Status) -> String {
    let mut line = code_name(status.code()).to_owned();
    // Engine messages may span lines (PostgreSQL's DETAIL and HINT).
    let message = status
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if !message.is_empty() {
        line.push_str(": ");
        line.push_str(&message);
    }
    let error_details = status.get_error_details();
    let mut details = Vec::new();
    if let Some(info) = error_details.error_info() {
        if !info.reason.is_empty() {
            details.push(format!("reason {}", info.reason));
        }
        // Sorted so that the line is the same on every run.
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        details.extend(metadata.into_iter().map(|(k, v)| format!("{k} {v}")));
    }
    // The server's advice on when a refused call may be sent again.
    if let Some(delay) = error_details.retry_info().and_then(|r| r.retry_delay) {
        // A rate limit's delay is often a few milliseconds.
        details.push(if delay < std::time::Duration::from_secs(1) {
            format!("retry after {} ms", delay.as_millis())
        } else {
            format!("retry after {:.1} s", delay.as_secs_f64())
        });
    }
    // What the server's logs name the call by.
    if let Some(id) = status.metadata().get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        details.push(format!("request id {id}"));
    }
    if !details.is_empty() {
        line.push_str(&format!(" ({})", details.join(", ")));
    }
    line
}

/// The header the server answers every call's request id in.
const REQUEST_ID: &str = "x-request-id";

/// The request id the server answered a call's headers with.
pub fn request_id<T>(response: &tonic::Response<T>) -> Option<MetadataValue<Ascii>> {
    response.metadata().get(REQUEST_ID).cloned()
}

/// `status` with the call's request id, unless it has one: errors made on
/// the client's side of a call (a stream cut, a protocol violation) name
/// the call the server's logs know, as the server's own errors do.
pub fn with_request_id(mut status: Status, id: Option<&MetadataValue<Ascii>>) -> Status {
    if let Some(id) = id {
        if !status.metadata().contains_key(REQUEST_ID) {
            status.metadata_mut().insert(REQUEST_ID, id.clone());
        }
    }
    status
}

/// The canonical upper-case name, as in the gRPC specification.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn with_info(code: Code, message: &str, reason: &str, metadata: &[(&str, &str)]) -> Status {
        let metadata: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, "weir", metadata))
    }

    #[test]
    fn appends_the_error_info_reason() {
        let status = with_info(Code::NotFound, r#"source "x" not found"#, "SOURCE_NOT_FOUND", &[]);
        assert_eq!(
            describe_status(&status),
            r#"NOT_FOUND: source "x" not found (reason SOURCE_NOT_FOUND)"#
        );
    }

    #[test]
    fn appends_metadata_sorted_by_key() {
        let status = with_info(
            Code::InvalidArgument,
            r#"relation "t" does not exist"#,
            "SQL_ERROR",
            &[("sqlstate", "42P01"), ("position", "15")],
        );
        assert_eq!(
            describe_status(&status),
            r#"INVALID_ARGUMENT: relation "t" does not exist (reason SQL_ERROR, position 15, sqlstate 42P01)"#
        );
    }

    #[test]
    fn appends_the_retry_delay() {
        let line = |ms: u64| {
            let mut details = ErrorDetails::with_error_info("RATE_LIMITED", "weir", HashMap::new());
            details.set_retry_info(Some(std::time::Duration::from_millis(ms)));
            describe_status(&Status::with_error_details(
                Code::ResourceExhausted,
                "rate limit",
                details,
            ))
        };
        assert_eq!(
            line(2500),
            "RESOURCE_EXHAUSTED: rate limit (reason RATE_LIMITED, retry after 2.5 s)"
        );
        // A rate limit's few milliseconds are not "0.0 s".
        assert!(line(30).ends_with("retry after 30 ms)"), "{}", line(30));
    }

    #[test]
    fn appends_the_request_id_last() {
        let mut status = with_info(Code::NotFound, "no table", "ENGINE_OBJECT_NOT_FOUND", &[]);
        status
            .metadata_mut()
            .insert("x-request-id", "order-4711".parse().expect("header value"));
        assert_eq!(
            describe_status(&status),
            "NOT_FOUND: no table (reason ENGINE_OBJECT_NOT_FOUND, request id order-4711)"
        );
        let mut plain = Status::internal("boom");
        plain
            .metadata_mut()
            .insert("x-request-id", "r1".parse().expect("header value"));
        assert_eq!(describe_status(&plain), "INTERNAL: boom (request id r1)");
    }

    #[test]
    fn plain_status_has_no_details() {
        let status = Status::unauthenticated("invalid API key");
        assert_eq!(describe_status(&status), "UNAUTHENTICATED: invalid API key");
        assert_eq!(describe_status(&Status::deadline_exceeded("")), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn multi_line_messages_become_one_line() {
        let status = Status::failed_precondition("duplicate key\nDETAIL:  Key (id)=(1) exists.\n");
        assert_eq!(
            describe_status(&status),
            "FAILED_PRECONDITION: duplicate key DETAIL:  Key (id)=(1) exists."
        );
    }

    #[test]
    fn code_names_are_upper_snake_case() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
    }
}

//! Errors raised by backends, classified so that every engine maps to the
//! same gRPC codes.

use std::time::Duration;

/// What kind of failure an engine reported, independent of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// Syntax errors, bad data, wrong parameters: the caller must change the request.
    InvalidArgument,
    /// Unknown table, column or function.
    NotFound,
    /// Unique violation.
    AlreadyExists,
    /// Other constraint violations, read-only transactions, aborted transaction state.
    FailedPrecondition,
    PermissionDenied,
    /// Serialization failures, deadlocks, lock timeouts: retry the transaction.
    Aborted,
    /// The engine is out of a resource (disk, memory, a quota).
    ResourceExhausted,
    /// The engine is busy for now (too many connections, a service tier's
    /// limit on concurrent work): the same call can succeed soon.
    Overloaded,
    /// Connection lost, server shutting down.
    Unavailable,
    /// The engine cancelled the statement on its own timeout.
    DeadlineExceeded,
    Internal,
}

impl EngineErrorKind {
    /// Whether an error met on a row of a load may be that row's fault, so
    /// that the load names the row. Not a deadlock, a lock timeout, a full
    /// disk, a lost connection or a missing privilege: those are retried
    /// whole or fixed elsewhere. Everything else may be (a bad value, a
    /// constraint, a trigger's SIGNAL, an extension type's input function).
    pub fn is_about_data(self) -> bool {
        !matches!(
            self,
            EngineErrorKind::Aborted
                | EngineErrorKind::Unavailable
                | EngineErrorKind::DeadlineExceeded
                | EngineErrorKind::ResourceExhausted
                | EngineErrorKind::Overloaded
                | EngineErrorKind::PermissionDenied
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An error the engine reported, with its own code (SQLSTATE, errno).
    #[error("{message}")]
    Engine {
        kind: EngineErrorKind,
        code: String,
        message: String,
    },
    /// The engine could not be reached. The message never contains hosts or credentials.
    #[error("source unreachable: {0}")]
    Unavailable(String),
    /// The source failed to connect repeatedly; calls fail fast until a probe succeeds.
    #[error("source unreachable ({cause}); failing fast until the next connection attempt in {retry_after:?}")]
    CircuitOpen { cause: String, retry_after: Duration },
    /// Records of a produce call that the broker did not acknowledge; the
    /// others were. `failed`, `unknown` and `acknowledged` are indexes in the call.
    #[error(
        "{} of {} records were not acknowledged ({cause}); send again those listed as failed",
        failed.len() + unknown.len(),
        failed.len() + unknown.len() + acknowledged.len()
    )]
    ProducePartial {
        cause: Box<BackendError>,
        acknowledged: Vec<usize>,
        /// Not written.
        failed: Vec<usize>,
        /// In flight when the producer closed: the broker may have written them.
        unknown: Vec<usize>,
    },
    /// Every pooled connection stayed busy for the whole acquire timeout.
    #[error("all {max_size} connections of the source are busy")]
    PoolExhausted { max_size: u32, waited: Duration },
    /// A result column of a type Weir cannot represent.
    #[error("column \"{column}\" has type {type_name}, which Weir cannot represent; cast it in SQL (for example {column}::text)")]
    UnsupportedType { column: String, type_name: String },
    /// A parameter that cannot be bound to the type the engine expects.
    #[error("parameter {index}: {message}")]
    Parameter { index: usize, message: String },
    /// The transaction is running another statement.
    #[error("the transaction is busy with another statement")]
    Busy,
    /// A request the engine cannot serve as asked (wrong object, bad option).
    #[error("{0}")]
    Invalid(String),
    /// A bulk-load row that cannot be stored; `index` is 0-based in the whole load.
    #[error("row {index}{}: {message}", column.as_ref().map(|c| format!(", column \"{c}\"")).unwrap_or_default())]
    Row {
        index: u64,
        column: Option<String>,
        /// The engine's code (SQLSTATE, errno), empty when Weir found the fault itself.
        code: String,
        message: String,
    },
    /// A statement that waited for its turn while its transaction was
    /// committed or rolled back: run on the session, it would autocommit.
    #[error("transaction not found: it was committed or rolled back while this statement waited for its turn")]
    TransactionEnded,
    /// The engine rolled a transaction back on its own (a deadlock, an
    /// interrupted write): its later statements would otherwise autocommit.
    #[error("the transaction was rolled back after {0}; run it again from BeginTransaction")]
    TransactionRolledBack(&'static str),
    /// A statement's failure that closed its transaction's connection (a
    /// result the driver could not read), and so rolled the transaction back.
    #[error("{0}; the transaction was rolled back with its connection: run it again from BeginTransaction")]
    RolledBackBy(Box<BackendError>),
    /// The transaction cannot go on (a statement of it could not be
    /// stopped and ran on to its end), but is still open, with its locks,
    /// until it is rolled back.
    #[error("the transaction cannot go on: {0}; roll it back, then run it again from BeginTransaction")]
    TransactionBroken(&'static str),
    /// A statement ended its transaction inside the engine (MySQL's DDL
    /// commits implicitly, as does `LOCK TABLES`; a procedure or a prepared
    /// statement may commit or roll back): later statements would run on
    /// their own, outside any transaction.
    #[error(
        "a statement of this transaction ended it: MySQL commits before DDL such as CREATE, ALTER, DROP or \
         TRUNCATE (even one that fails) and at LOCK TABLES, and a procedure or prepared statement may commit or \
         roll back; its work so far cannot be rolled back here, and later statements would not run in it; \
         begin a new transaction"
    )]
    CommittedImplicitly,
    /// A statement committed or rolled back the transaction it ran in, and
    /// the engine cannot tell which (SQL Server's error 266: a procedure or
    /// batch whose COMMIT or ROLLBACK left the count at zero).
    #[error(
        "a statement of this transaction committed or rolled it back itself (a COMMIT or ROLLBACK in a procedure \
         or batch; SQL Server error 266), and which of the two cannot be told: look at the data before running \
         the work again; later statements would not run in it: begin a new transaction"
    )]
    EndedByStatement,
    /// One row of a result is larger than a message may be (see
    /// [`crate::backend::MAX_ROW_BYTES`]).
    #[error(
        "a row of the result holds more than {limit} bytes, more than one message may carry; \
         select fewer or shorter columns (substring, a length, a hash), or read the value in parts"
    )]
    RowTooLarge { limit: usize },
    /// The rows of a load stopped coming before the load was complete; it was rolled back.
    #[error("the load ended before its last row and was rolled back")]
    LoadAbandoned,
    /// COMMIT (of a transaction, or of a load) was sent and its answer
    /// never came: running the work again could apply it twice.
    #[error(
        "COMMIT was sent but its answer never came ({0}): what it would commit may or may not be there; \
         check before running it again (a load with a load_id can be sent again: it loads once)"
    )]
    CommitOutcomeUnknown(String),
    /// A load id that committed for another table.
    #[error("load_id was already used for a load into {0}; use a new load_id for another table")]
    LoadIdReused(String),
    /// A call aimed at the other kind of source (SQL versus topics).
    #[error("{0}")]
    WrongKind(&'static str),
    /// The source (or one of its tables) cannot stream changes as configured; says what to change.
    #[error("{0}")]
    ChangesNotReady(String),
    /// Another consumer is reading the subscription.
    #[error("subscription \"{0}\" has a live consumer; pass take_over to replace it")]
    SubscriptionActive(String),
    /// A newer consumer took the subscription over with `take_over`.
    #[error("subscription \"{0}\" was taken over by another consumer")]
    SubscriptionTakenOver(String),
    #[error("subscription \"{0}\" not found")]
    SubscriptionNotFound(String),
    /// A resume position before what the database still retains.
    #[error("{0}")]
    PositionNotRetained(String),
    #[error("internal backend error: {0}")]
    Internal(String),
}

impl BackendError {
    /// The source answers but is busy, not down: its pool is full, or the
    /// engine's own "too many connections" (53300, errno 1040), which the
    /// circuit breaker takes so too. Every replica probes the same
    /// database: calling it down would take them all out.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            BackendError::PoolExhausted { .. }
                | BackendError::Engine {
                    kind: EngineErrorKind::Overloaded,
                    ..
                }
        )
    }

    /// The engine could not be reached or its session was lost.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable(_)
                | BackendError::CircuitOpen { .. }
                | BackendError::Engine {
                    kind: EngineErrorKind::Unavailable,
                    ..
                }
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::Engine {
            kind: EngineErrorKind::NotFound,
            code: String::new(),
            message: message.into(),
        }
    }
}

/// A statement's second result set, which Weir does not return. It is seen
/// only once the statement has run, so the caller hears that it ran.
pub fn second_result_set() -> BackendError {
    BackendError::Invalid(
        "the statement returned more than one result set, which Weir does not return (it ran: outside a \
         transaction, what it wrote is committed); make it return one"
            .into(),
    )
}

/// An engine's refusal of Weir's own login (wrong password, locked or
/// expired account, host not allowed, database gone): the operator's to fix.
/// The engine's text names hosts and logins, so it is logged, not returned.
pub fn login_refused(code: &str, detail: &str) -> BackendError {
    tracing::warn!(engine_code = %code, %detail, "the database rejected Weir's connection");
    BackendError::Unavailable(format!("the database rejected Weir's connection (engine code {code})"))
}

/// Classifies an SQLSTATE (PostgreSQL's, or MySQL's as it reports them).
pub fn classify_sqlstate(code: &str) -> EngineErrorKind {
    use EngineErrorKind as K;
    match code {
        // 3B001: a savepoint not defined; 58P01: a file the server cannot find.
        // 3D000: a database (`pg_database_size('x')`; at login it is the operator's).
        "42P01" | "42883" | "3F000" | "42704" | "42S02" | "3B001" | "58P01" | "3D000" => K::NotFound,
        "23505" | "58P02" => K::AlreadyExists,
        "42501" | "25006" => K::PermissionDenied,
        // 72000: snapshot too old (run it again).
        "40001" | "40P01" | "55P03" | "72000" => K::Aborted,
        "57014" => K::DeadlineExceeded,
        // too_many_connections
        "53300" => K::Overloaded,
        _ => match code.get(..2).unwrap_or_default() {
            "42" | "22" | "0A" | "54" | "2F" | "34" | "26" | "07" | "21" => K::InvalidArgument,
            // 45: MySQL's SIGNAL SQLSTATE '45000', as PostgreSQL's RAISE is P0.
            // 44: a view's WITH CHECK OPTION.
            "23" | "25" | "P0" | "55" | "2B" | "2D" | "39" | "38" | "45" | "44" => K::FailedPrecondition,
            "40" => K::Aborted,
            // Invalid authorization, raised by a statement (a login's is `login_refused`).
            "28" => K::PermissionDenied,
            "53" => K::ResourceExhausted,
            "08" | "57" | "58" => K::Unavailable,
            _ => K::Internal,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same situations as MySQL's and SQL Server's tables classify them.
    #[test]
    fn sqlstates_of_situations_every_engine_meets() {
        use EngineErrorKind as K;
        for (code, kind) in [
            ("3B001", K::NotFound),
            ("58P01", K::NotFound),
            ("44000", K::FailedPrecondition),
            ("72000", K::Aborted),
            ("55P03", K::Aborted),
            ("42501", K::PermissionDenied),
            ("53300", K::Overloaded),
            ("58030", K::Unavailable),
        ] {
            assert_eq!(classify_sqlstate(code), kind, "{code}");
        }
    }
}

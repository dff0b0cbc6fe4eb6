//! Rust client for Weir: an authenticated connection with typed helpers for
//! the query and schema services, parameter parsing and result formatting
//! shared with the `weirctl` command line.

mod client;
pub mod load_input;
pub mod output;
mod params;
mod status;
mod transport;
mod watch;

pub use client::{
    ApiKeyInterceptor, ArrowStream, AuthChannel, ClientError, Part, ResultStream, StreamMessage, TlsOptions, WeirClient,
};
pub use params::parse_param;
pub use status::{code_name, describe_status, request_id, with_request_id};
pub use transport::H2Channel;
pub use watch::ChangeWatch;
pub use weir_proto;
pub use weir_proto::raw::{RawDecodeError, RawRows, RowRef, ValueRef};
pub use {arrow_array, arrow_ipc, arrow_schema};

/// Tests of `Display for Value`, which lives in `weir-proto` for the orphan
/// rule but is exercised here with the formats built on it.
#[cfg(test)]
mod value_display_tests;

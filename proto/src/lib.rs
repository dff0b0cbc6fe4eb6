//! Generated code for the `weir.v1` API, shared by the server and every Rust
//! client.

/// The `weir.v1` package: messages, `*_client` and `*_server` modules.
pub mod v1 {
    tonic::include_proto!("weir.v1");
    pub use crate::execute_response::ExecuteResponse;
    pub use crate::row_batch::RowBatch;
}

pub mod deadline;
pub mod execute_response;
pub mod raw;
pub mod row_batch;
pub mod value;

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/weir_descriptor.bin"));

//! Compiles `weir/v1/*.proto` with a pure-Rust compiler (no protoc needed) and
//! keeps the descriptor set for server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "weir/v1/values.proto",
        "weir/v1/options.proto",
        "weir/v1/query.proto",
        "weir/v1/schema.proto",
        "weir/v1/bulk.proto",
        "weir/v1/stream.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("weir_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        // Hand-written so that the server can send rows it has already encoded.
        .extern_path(".weir.v1.RowBatch", "crate::row_batch::RowBatch")
        .extern_path(".weir.v1.ExecuteResponse", "crate::execute_response::ExecuteResponse")
        .compile_fds(fds)?;
    Ok(())
}

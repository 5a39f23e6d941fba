//! Compiles `proto/` with protox (pure Rust, so no system `protoc` is needed) and generates the
//! tonic services plus a descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/brain/ops/v1/types.proto",
        "proto/brain/ops/v1/safe_mode.proto",
        "proto/brain/ops/v1/audit.proto",
        "proto/brain/ops/v1/evidence.proto",
        "proto/brain/ops/v1/metrics.proto",
        "proto/brain/ops/v1/override.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds takes the descriptors as given, so the set for reflection is written here.
    std::fs::write(
        out.join("brain_ops_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Default stubs answer UNIMPLEMENTED for RPCs a service does not implement yet.
    tonic_prost_build::configure().generate_default_stubs(true).compile_fds(descriptors)?;
    Ok(())
}

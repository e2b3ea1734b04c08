//! Generates the Rust types and the tonic client and server of the
//! `.proto` files, with protox (a protobuf compiler in Rust), so that a
//! build needs no `protoc` installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "infermesh/mesh/v1/certificates.proto",
        "infermesh/mesh/v1/config.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}

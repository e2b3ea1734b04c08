//! The infermesh control plane's gRPC API, package `infermesh.mesh.v1`:
//! the messages, and tonic's client and server for each service, generated
//! from `proto/infermesh/mesh/v1/*.proto` at build time. The encoded file
//! descriptors are here too, for gRPC server reflection.

#![forbid(unsafe_code)]

/// Package `infermesh.mesh.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("infermesh.mesh.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file, for server
/// reflection (`grpcurl list`, `describe`).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

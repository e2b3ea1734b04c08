//! The infermesh control plane.
//!
//! - [`ca_files`]: the certificate authority on disk, `ca init` and
//!   `ca issue`;
//! - [`credential`]: what a proxy proves its workload with, and the
//!   `Authenticator` that checks it;
//! - [`join_tokens`]: the local credential, join tokens (`token create`),
//!   and their authenticator;
//! - [`certify`]: the certificate service's decision, a CSR signed for the
//!   identity a credential proves, never the one the CSR names;
//! - [`grpc`]: the gRPC services over the types of `infermesh-proto`;
//! - [`client`]: a client of the gRPC port, and its SPIFFE ID;
//! - [`server`]: `serve`, the TLS gRPC port and the admin port;
//! - [`source`]: where the mesh's config comes from, as whole validated
//!   snapshots: a watched directory of the YAML documents the gateway
//!   also reads (or the Kubernetes API, [`kubernetes`]);
//! - [`resolve`]: the DNS names of endpoints, resolved by the control
//!   plane and pushed as addresses;
//! - [`scope`]: what each proxy is told, chosen from a snapshot prepared
//!   once for all of them;
//! - [`push`]: the config stream of each proxy, incremental and
//!   acknowledged, and the register of the proxies and where they stand;
//! - [`status`]: `status`, every replica's proxies in one table;
//! - [`inject`]: the sidecar injector, a mutating admission webhook that
//!   adds the init container and the native sidecar to pods;
//! - [`kubernetes`]: the Kubernetes API server as config source (CRDs,
//!   Services, EndpointSlices, Pods, HTTPRoutes), as the judge of
//!   ServiceAccount tokens (TokenReview), and the webhook's `caBundle`.
//!
//! The signing itself lives in `infermesh-certs`.

#![forbid(unsafe_code)]

pub mod accept;
pub mod ca_files;
pub mod certify;
pub mod client;
pub mod credential;
pub mod grpc;
pub mod inject;
pub mod join_tokens;
pub mod kubernetes;
pub mod push;
pub mod resolve;
pub mod scope;
pub mod server;
pub mod source;
pub mod status;

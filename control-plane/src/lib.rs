//! The infermesh control plane.
//!
//! Today it holds the certificate authority's file handling ([`ca_files`]):
//! creating a root (and optionally an intermediate) CA on disk and issuing
//! workload credentials from it, which the `infermesh-control-plane ca init`
//! and `ca issue` commands run; join tokens, the local credential a proxy
//! proves its workload with ([`join_tokens`], `token create`); and the
//! certificate service's decision ([`certify`]): a CSR signed for the
//! identity a credential proves, never the one the CSR names, served over
//! gRPC by [`grpc`]. The signing itself lives in `infermesh-certs`.
//!
//! Still to come (issue 14): the gRPC API that serves the certificate
//! service and the push of routes and endpoints to proxies, the config
//! source (a watched directory of the same YAML documents the gateway
//! reads), and the proxy's side of both.

#![forbid(unsafe_code)]

pub mod ca_files;
pub mod certify;
pub mod grpc;
pub mod join_tokens;
pub mod server;

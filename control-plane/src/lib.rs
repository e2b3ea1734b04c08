//! The infermesh control plane.
//!
//! Today it holds the certificate authority's file handling ([`ca_files`]):
//! creating a root (and optionally an intermediate) CA on disk and issuing
//! workload credentials from it, which the `infermesh-control-plane ca init`
//! and `ca issue` commands run. The signing itself lives in
//! `infermesh-certs`.
//!
//! Still to come: the config source (a watched directory of the same YAML
//! documents the gateway reads), the versioned push of routes and endpoints
//! to proxies over a long-lived HTTP/2 stream with ACK/NACK, the `/v1/certify`
//! endpoint that signs proxies' CSRs for the identity their credential
//! proves, and the Kubernetes sidecar-injection webhook.

#![forbid(unsafe_code)]

pub mod ca_files;

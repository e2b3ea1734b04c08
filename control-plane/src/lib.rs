//! The infermesh control plane (not built yet).
//!
//! This crate will own the config source (a watched directory of the same
//! YAML documents the gateway reads), the versioned push of routes and
//! endpoints to proxies over a long-lived HTTP/2 stream with ACK/NACK, the
//! certificate authority endpoint that signs proxies' CSRs, and the
//! Kubernetes sidecar-injection webhook. It is filled in by the control-plane
//! issue; until then it holds no code and builds no binary.

#![forbid(unsafe_code)]

//! Workload identity for infermesh (not built yet).
//!
//! This crate will own the certificate authority (root and intermediate
//! creation, signing CSRs with SPIFFE URI SANs such as
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), the workload side (in-memory
//! keys, CSRs, renewal at about half of a certificate's life), the rustls
//! server and client configurations that check SPIFFE identities, and a
//! hot-swappable certificate store. It is filled in by the identity and mTLS
//! issue; until then it holds no code.

#![forbid(unsafe_code)]

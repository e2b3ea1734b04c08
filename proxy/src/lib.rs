//! The infermesh data plane: a streaming HTTP/1.1 and HTTP/2 proxy for
//! model serving, run as a standalone gateway from one YAML file (and, in
//! later work, as a mesh sidecar).
//!
//! A request goes through named phases ([`proxy`]): it is routed
//! ([`router`]), forwarded through the rule's service stack ([`forward`]:
//! [`timeout`] → [`headers`] → [`upgrade`] → backend split → [`balance`] →
//! [`pool`]), answered, and observed ([`access_log`], [`metrics`]). The
//! configuration is one immutable [`snapshot::Snapshot`] swapped atomically
//! on reload; bodies are streamed frame by frame and never collected.
//! [`intercept`] installs the iptables rules that send a pod's traffic
//! through its sidecar proxy (`infermesh-proxy init`).

#![forbid(unsafe_code)]

pub mod access_log;
pub mod authorize;
pub mod backend;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod capture;
pub mod config_file;
pub mod error;
pub mod fanout;
pub mod forward;
pub mod gateway;
pub mod headers;
pub mod hedge;
pub mod identity;
pub mod intercept;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod ops;
pub mod outlier;
pub mod pool;
pub mod proxy;
pub mod rate_limit;
pub mod replay;
pub mod retry;
pub mod router;
pub mod sidecar;
pub mod snapshot;
pub mod timeout;
pub mod tls;
pub mod upgrade;

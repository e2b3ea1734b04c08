//! The server layer: the proxy's edge towards clients. Binding and
//! reloading listeners ([`listener`]), each accepted connection's phases
//! ([`connection`]: original destination, protocol detection, TLS, HTTP),
//! the HTTP/1 or HTTP/2 server a connection gets ([`protocol`]),
//! how long a connection and its streams may live ([`lifetime`]), each
//! request's phases ([`request`]: authorize, route, forward, respond,
//! observe), turning the proxy's errors into responses ([`respond`]),
//! forwarding a capture listener's unrouted requests to their original
//! destination ([`original`]) and the access log ([`access_log`]), with
//! what its line says and where it goes ([`access_entry`]), the filters
//! that decide which requests it writes ([`access_filter`]) and the reading of token counts and events in model answers ([`usage`]).

pub(crate) mod access_entry;
pub(crate) mod access_filter;
pub(crate) mod access_log;
pub(crate) mod connection;
pub(crate) mod lifetime;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod original;
pub(crate) mod protocol;
pub(crate) mod request;
pub(crate) mod respond;
pub(crate) mod shared;
pub(crate) mod usage;

pub(crate) use metrics::Metrics;

//! The transport layer: bytes and connections, below HTTP. Mutual TLS at
//! both ends ([`tls`]), opening connections to endpoints ([`connect`], the
//! seam the pool connects through), a redirected connection's original
//! destination ([`original_dst`]), telling HTTP from other protocols by
//! the first bytes ([`detect`]) and the TCP passthrough ([`tunnel`]).

pub(crate) mod connect;
pub(crate) mod detect;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod original_dst;
pub(crate) mod tls;
pub(crate) mod tunnel;

pub(crate) use tls::Metrics;

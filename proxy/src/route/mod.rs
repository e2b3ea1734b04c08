//! The route layer: what a matched request goes through, as one tower
//! stack per rule ([`stack`]): its rate limit ([`rate_limit`]), time limits
//! ([`timeout`]), protocol upgrades ([`upgrade`]), mirroring ([`mirror`]),
//! retries ([`retry`], replaying the body with [`replay`]) and hedging
//! ([`hedge`]), the weighted backend split ([`split`]), or instead a
//! fan-out to several models ([`fanout`]). Below it, each attempt goes to
//! the backend layer's balancer.

#[cfg(test)]
mod cancellations;
pub(crate) mod fanout;
pub(crate) mod hedge;
pub(crate) mod metrics;
pub(crate) mod mirror;
pub(crate) mod rate_limit;
pub(crate) mod replay;
pub(crate) mod retry;
pub(crate) mod split;
pub(crate) mod stack;
#[cfg(test)]
mod tests;
pub(crate) mod timeout;
pub(crate) mod upgrade;

pub(crate) use metrics::Metrics;

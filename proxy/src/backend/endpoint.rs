//! The endpoints of a backend: one address each, with its counters, its
//! connections, its latency estimate and its health; and the set of them
//! a backend holds at one moment, an immutable value swapped atomically
//! when DNS changes it, read by the balancer without a lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::backend::ewma::PeakEwma;
use crate::backend::outlier::Health;
use crate::backend::pool::Connections;

/// One address requests can be sent to.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of the backend's traffic.
    pub weight: u32,
    /// The DNS name this address was resolved from, if any.
    pub hostname: Option<Arc<str>>,
    /// Requests sent, failed, and in flight.
    pub stats: EndpointStats,
    /// Open and idle connections.
    pub connections: Arc<Connections>,
    /// Response-time estimate, for the balancer.
    pub latency: PeakEwma,
    /// Ejection, health-check and `Retry-After` state.
    pub health: Health,
}

impl Endpoint {
    /// A new endpoint, with fresh counters, estimate and health.
    pub fn new(addr: SocketAddr, weight: u32, hostname: Option<Arc<str>>) -> Self {
        Endpoint {
            addr,
            weight,
            hostname,
            stats: EndpointStats::default(),
            connections: Arc::default(),
            latency: PeakEwma::default(),
            health: Health::default(),
        }
    }
}

/// Counters of one endpoint, shown on the admin `/endpoints` page.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests sent to the endpoint.
    pub requests: AtomicU64,
    /// Requests that failed before a response (connect or reset).
    pub failures: AtomicU64,
    /// Requests whose response has not finished yet.
    pub in_flight: AtomicU64,
}

/// The endpoints of a backend at one moment.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// The endpoints, in config order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Sum of the endpoints' weights.
    pub total_weight: u64,
    /// `cumulative_weight[i]`: the weights of endpoints `0..=i` added up,
    /// to find an endpoint by weight in logarithmic time.
    pub cumulative_weight: Vec<u64>,
}

impl EndpointSet {
    /// The set of `endpoints`.
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let cumulative_weight: Vec<u64> = endpoints
            .iter()
            .scan(0, |sum, e| {
                *sum += u64::from(e.weight);
                Some(*sum)
            })
            .collect();
        EndpointSet {
            total_weight: cumulative_weight.last().copied().unwrap_or(0),
            cumulative_weight,
            endpoints,
        }
    }
}

//! Choosing an endpoint for an attempt, by the backend's policy: power of
//! two choices over peak-EWMA latency × load (the default, as in
//! Linkerd), power of two choices over requests in flight (Envoy's least
//! request), or weighted round robin. Endpoints that are not available
//! (ejected, unhealthy, paused by `Retry-After`) or that the request
//! already tried are passed over while others remain.
//!
//! When no endpoint is available, the request goes to one anyway, chosen
//! among all of them, as Envoy does below its panic threshold: a backend
//! whose every endpoint looks bad is more likely mis-judged than down, and
//! failing every request would be worse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use infermesh_api::BalancePolicy;
use rand::RngExt;
use tokio::time::Instant;

use crate::backend::endpoint::{Endpoint, EndpointSet};

/// Picks one of `items` with probability proportional to its weight;
/// `total` is the sum of the weights. `None` when there is nothing to pick.
pub(crate) fn pick_weighted<T>(items: &[T], total: u64, weight: impl Fn(&T) -> u32) -> Option<&T> {
    if total == 0 {
        return None;
    }
    let mut ticket = rand::rng().random_range(0..total);
    for item in items {
        let w = u64::from(weight(item));
        if ticket < w {
            return Some(item);
        }
        ticket -= w;
    }
    None
}

/// Picks endpoints for one backend by its policy.
#[derive(Debug)]
pub struct Balancer {
    policy: BalancePolicy,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer using `policy`.
    pub fn new(policy: BalancePolicy) -> Self {
        Balancer {
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint of `set` at `now`, preferring, in turn: available
    /// endpoints not in `avoid`; available ones; ones not in `avoid`; any.
    pub fn pick<'a>(
        &self,
        set: &'a EndpointSet,
        avoid: &[SocketAddr],
        now: Instant,
    ) -> Option<&'a Arc<Endpoint>> {
        let fresh = |e: &Endpoint| !avoid.contains(&e.addr);
        let available = |e: &Endpoint| e.health.is_available(now);
        // Usually every endpoint qualifies: then the set's own weights serve.
        if set.endpoints.iter().all(|e| available(e) && fresh(e)) {
            return self.pick_any(set, now);
        }
        self.pick_among(set, now, |e| available(e) && fresh(e))
            .or_else(|| self.pick_among(set, now, available))
            .or_else(|| self.pick_among(set, now, fresh))
            .or_else(|| self.pick_any(set, now))
    }

    /// Picks among every endpoint of `set`, finding weights by binary
    /// search.
    fn pick_any<'a>(&self, set: &'a EndpointSet, now: Instant) -> Option<&'a Arc<Endpoint>> {
        let weights = &set.cumulative_weight;
        let nth = |mut ticket: u64, skip: Option<usize>| {
            if let Some(s) = skip {
                let weight = u64::from(set.endpoints[s].weight);
                if ticket >= weights[s] - weight {
                    ticket += weight;
                }
            }
            let i = weights.partition_point(|&sum| sum <= ticket);
            set.endpoints.get(i).map(|e| (i, e))
        };
        self.choose(set.total_weight, nth, now)
    }

    /// Picks among the endpoints of `set` that are `eligible`.
    fn pick_among<'a>(
        &self,
        set: &'a EndpointSet,
        now: Instant,
        eligible: impl Fn(&Endpoint) -> bool,
    ) -> Option<&'a Arc<Endpoint>> {
        let total: u64 = set
            .endpoints
            .iter()
            .filter(|e| eligible(e))
            .map(|e| u64::from(e.weight))
            .sum();
        let nth = |mut ticket: u64, skip: Option<usize>| {
            set.endpoints
                .iter()
                .enumerate()
                .filter(|(i, e)| Some(*i) != skip && eligible(e))
                .find(|(_, e)| {
                    let w = u64::from(e.weight);
                    if ticket < w {
                        return true;
                    }
                    ticket -= w;
                    false
                })
        };
        self.choose(total, nth, now)
    }

    /// Applies the policy to candidates of weights adding up to `total`;
    /// `nth(ticket, skip)` finds the candidate whose weight range holds
    /// `ticket`, leaving out candidate `skip`.
    fn choose<'a>(
        &self,
        total: u64,
        nth: impl Fn(u64, Option<usize>) -> Option<(usize, &'a Arc<Endpoint>)>,
        now: Instant,
    ) -> Option<&'a Arc<Endpoint>> {
        if total == 0 {
            return None;
        }
        match self.policy {
            BalancePolicy::RoundRobin => {
                let ticket = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
                nth(ticket, None).map(|(_, e)| e)
            }
            BalancePolicy::PeakEwma | BalancePolicy::LeastRequest => {
                let mut rng = rand::rng();
                let (i, first) = nth(rng.random_range(0..total), None)?;
                let rest = total - u64::from(first.weight);
                if rest == 0 {
                    return Some(first);
                }
                let (_, second) = nth(rng.random_range(0..rest), Some(i))?;
                Some(if self.cost(second, now) < self.cost(first, now) {
                    second
                } else {
                    first
                })
            }
        }
    }

    /// The load of `endpoint` as the policy weighs it, per unit of weight.
    fn cost(&self, endpoint: &Endpoint, now: Instant) -> f64 {
        let pending = endpoint.stats.in_flight.load(Ordering::Relaxed) as f64 + 1.0;
        let load = match self.policy {
            BalancePolicy::PeakEwma => endpoint.latency.get(now).as_nanos() as f64 * pending,
            _ => pending,
        };
        load / f64::from(endpoint.weight)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn picks_in_proportion_to_weight() {
        let items = [("a", 1u32), ("b", 3), ("c", 0)];
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            let (name, _) = pick_weighted(&items, 4, |i| i.1).unwrap();
            counts[items.iter().position(|i| i.0 == *name).unwrap()] += 1;
        }
        // Expected 10 000 and 30 000; 5 standard deviations is about ±430.
        assert!((9_500..=10_500).contains(&counts[0]), "{counts:?}");
        assert!((29_500..=30_500).contains(&counts[1]), "{counts:?}");
        assert_eq!(counts[2], 0, "weight 0 is never picked");
        assert!(pick_weighted(&items, 0, |i| i.1).is_none());
    }

    fn endpoints(weights: &[u32]) -> EndpointSet {
        EndpointSet::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
                    Arc::new(Endpoint::new(addr, *w, None))
                })
                .collect(),
        )
    }

    fn share(balancer: &Balancer, set: &EndpointSet, avoid: &[SocketAddr], n: usize) -> Vec<usize> {
        let mut counts = vec![0; set.endpoints.len()];
        for _ in 0..n {
            let picked = balancer.pick(set, avoid, Instant::now()).unwrap();
            counts[set
                .endpoints
                .iter()
                .position(|e| e.addr == picked.addr)
                .unwrap()] += 1;
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_prefers_the_fast_endpoint() {
        let set = endpoints(&[1, 1]);
        let now = Instant::now();
        set.endpoints[0]
            .latency
            .observe(now, Duration::from_millis(20));
        set.endpoints[1]
            .latency
            .observe(now, Duration::from_millis(400));
        let counts = share(&Balancer::new(BalancePolicy::PeakEwma), &set, &[], 1000);
        // The slow one wins only when both choices fall on it: 1 in 4.
        assert!(counts[0] > 700, "{counts:?}");

        // Twenty seconds without samples: both estimates decay towards
        // zero, and the slow one is worth trying again.
        tokio::time::advance(Duration::from_secs(20)).await;
        let later = Instant::now();
        assert!(set.endpoints[1].latency.get(later) < Duration::from_millis(60));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_counts_requests_in_flight() {
        let set = endpoints(&[1, 1]);
        let now = Instant::now();
        for e in &set.endpoints {
            e.latency.observe(now, Duration::from_millis(100));
        }
        set.endpoints[0].stats.in_flight.store(9, Ordering::Relaxed);
        let counts = share(&Balancer::new(BalancePolicy::PeakEwma), &set, &[], 1000);
        assert!(counts[1] > 700, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_two_choices_are_always_two_different_endpoints() {
        // With two endpoints, both are always compared: the idle one wins
        // every time, whatever their weights.
        for weights in [[1, 1], [5, 1], [1, 5]] {
            let set = endpoints(&weights);
            set.endpoints[0]
                .stats
                .in_flight
                .store(50, Ordering::Relaxed);
            let counts = share(&Balancer::new(BalancePolicy::LeastRequest), &set, &[], 1000);
            assert_eq!(counts, [0, 1000], "weights {weights:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn equal_endpoints_share_the_load() {
        for policy in [
            BalancePolicy::PeakEwma,
            BalancePolicy::LeastRequest,
            BalancePolicy::RoundRobin,
        ] {
            let set = endpoints(&[1, 1, 1]);
            let counts = share(&Balancer::new(policy), &set, &[], 3000);
            // Expected 1000 each; 5 standard deviations is about ±130.
            for c in &counts {
                assert!((870..=1130).contains(c), "{policy:?}: {counts:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn weights_shape_the_share() {
        for policy in [BalancePolicy::RoundRobin, BalancePolicy::LeastRequest] {
            let set = endpoints(&[1, 3]);
            let counts = share(&Balancer::new(policy), &set, &[], 4000);
            assert!(counts[1] > 2 * counts[0], "{policy:?}: {counts:?}");
        }
        let set = endpoints(&[1, 3]);
        let counts = share(&Balancer::new(BalancePolicy::RoundRobin), &set, &[], 4000);
        assert_eq!(counts, [1000, 3000], "round robin is exact");
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_and_avoided_endpoints_are_skipped_until_nothing_else_is_left() {
        let set = endpoints(&[1, 1, 1]);
        let balancer = Balancer::new(BalancePolicy::LeastRequest);
        set.endpoints[0]
            .health
            .pause(Instant::now(), Duration::from_secs(5));
        let avoid = [set.endpoints[1].addr];
        assert_eq!(share(&balancer, &set, &avoid, 100), [0, 0, 100]);

        // Only avoided or paused endpoints left: an available one that
        // failed before beats a paused one.
        let avoid = [set.endpoints[1].addr, set.endpoints[2].addr];
        let counts = share(&balancer, &set, &avoid, 100);
        assert_eq!(counts[0], 0, "{counts:?}");

        // Nothing available at all: panic routing over every endpoint.
        for e in &set.endpoints {
            e.health.pause(Instant::now(), Duration::from_secs(5));
        }
        let counts = share(&balancer, &set, &[], 300);
        assert!(counts.iter().all(|c| *c > 50), "{counts:?}");
    }
}

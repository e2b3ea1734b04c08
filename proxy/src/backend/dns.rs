//! Turning a backend's configured endpoints into addresses: socket
//! addresses as they are, DNS names resolved (and resolved again by the
//! backend's upkeep). A name whose lookup fails keeps the addresses it had,
//! and an endpoint that survives a refresh keeps its connections and
//! counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use infermesh_api::EndpointTarget;

use crate::backend::endpoint::{Endpoint, EndpointSet};
use crate::core::body::BoxFuture;

/// An endpoint as configured: where it is and its weight.
#[derive(Clone, Debug)]
pub(crate) struct ConfiguredEndpoint {
    /// A socket address or a DNS name and port.
    pub target: EndpointTarget,
    /// Its relative share of the backend's traffic.
    pub weight: u32,
}

/// One address a target resolved to.
pub(crate) struct Resolved {
    addr: SocketAddr,
    weight: u32,
    hostname: Option<Arc<str>>,
}

/// Resolves a host name and port to addresses.
type Resolver = fn(String, u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>>;

/// The system's resolver (`/etc/hosts`, then the name servers of
/// `/etc/resolv.conf`), without libc: see `infermesh_dns`.
pub(crate) fn system_resolver(
    host: String,
    port: u16,
) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
    Box::pin(async move { infermesh_dns::system().lookup(&host, port).await })
}

/// Looks every target up. A DNS name whose lookup fails keeps the addresses
/// it had in `known`, as Envoy does, so a DNS outage does not empty a
/// backend.
pub(crate) async fn lookup(
    backend: &str,
    targets: &[ConfiguredEndpoint],
    known: &EndpointSet,
    resolve: Resolver,
) -> Vec<Resolved> {
    let mut resolved: Vec<Resolved> = Vec::new();
    for t in targets {
        let (addrs, hostname): (Vec<SocketAddr>, Option<Arc<str>>) = match &t.target {
            EndpointTarget::Socket(addr) => (vec![*addr], None),
            EndpointTarget::Dns { host, port } => {
                let addrs = match resolve(host.clone(), *port).await {
                    Ok(addrs) => addrs,
                    Err(e) => {
                        tracing::warn!(backend, host = %host, error = %e, "DNS resolution failed; keeping the last known addresses");
                        known
                            .endpoints
                            .iter()
                            .filter(|ep| ep.hostname.as_deref() == Some(host.as_str()))
                            .map(|ep| ep.addr)
                            .collect()
                    }
                };
                (addrs, Some(Arc::from(host.as_str())))
            }
        };
        for addr in addrs {
            if !resolved.iter().any(|r| r.addr == addr) {
                resolved.push(Resolved {
                    addr,
                    weight: t.weight,
                    hostname: hostname.clone(),
                });
            }
        }
    }
    resolved
}

/// The endpoint set of `resolved`, reusing the endpoints of `current` with
/// the same address and weight, so they keep their connections and
/// counters.
pub(crate) fn assemble(resolved: Vec<Resolved>, current: &EndpointSet) -> EndpointSet {
    let existing: HashMap<SocketAddr, &Arc<Endpoint>> =
        current.endpoints.iter().map(|e| (e.addr, e)).collect();
    let endpoints = resolved
        .into_iter()
        .map(|r| match existing.get(&r.addr) {
            Some(e) if e.weight == r.weight => Arc::clone(e),
            _ => Arc::new(Endpoint::new(r.addr, r.weight, r.hostname)),
        })
        .collect();
    EndpointSet::new(endpoints)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn target(text: &str, weight: u32) -> ConfiguredEndpoint {
        ConfiguredEndpoint {
            target: EndpointTarget::parse(text).unwrap(),
            weight,
        }
    }

    /// Resolves `model.test` to two addresses and fails for every other
    /// name, without asking the network.
    fn fake_dns(host: String, port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            match host.as_str() {
                "model.test" => Ok(vec![
                    ([10, 0, 0, 1], port).into(),
                    ([10, 0, 0, 2], port).into(),
                ]),
                _ => Err(std::io::Error::other("no such host")),
            }
        })
    }

    async fn refresh(targets: &[ConfiguredEndpoint], current: &EndpointSet) -> EndpointSet {
        assemble(lookup("b", targets, current, fake_dns).await, current)
    }

    #[tokio::test]
    async fn a_refresh_keeps_endpoints_that_are_still_listed() {
        let first = refresh(
            &[target("127.0.0.1:1001", 1), target("127.0.0.1:1002", 1)],
            &EndpointSet::default(),
        )
        .await;
        first.endpoints[0]
            .stats
            .requests
            .fetch_add(7, Ordering::Relaxed);

        let targets = [
            target("127.0.0.1:1001", 1),
            target("127.0.0.1:1002", 5),
            target("model.test:1003", 1),
        ];
        let second = refresh(&targets, &first).await;
        assert!(
            Arc::ptr_eq(&first.endpoints[0], &second.endpoints[0]),
            "unchanged endpoint kept"
        );
        assert_eq!(
            second.endpoints[0].stats.requests.load(Ordering::Relaxed),
            7
        );
        assert!(
            !Arc::ptr_eq(&first.endpoints[1], &second.endpoints[1]),
            "a new weight is a new endpoint"
        );
        assert_eq!(second.endpoints[1].weight, 5);
        let from_dns: Vec<String> = second.endpoints[2..]
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(from_dns, ["10.0.0.1:1003", "10.0.0.2:1003"]);
        assert!(
            second.endpoints[2..]
                .iter()
                .all(|e| e.hostname.as_deref() == Some("model.test"))
        );
        assert_eq!(second.total_weight, 1 + 5 + 2);
    }

    #[tokio::test]
    async fn a_name_dns_cannot_resolve_keeps_its_known_addresses() {
        let known = EndpointSet::new(vec![Arc::new(Endpoint::new(
            "10.0.0.9:8000".parse().unwrap(),
            1,
            Some(Arc::from("model.invalid")),
        ))]);
        let resolved = lookup("b", &[target("model.invalid:8000", 1)], &known, fake_dns).await;
        let addrs: Vec<SocketAddr> = resolved.iter().map(|r| r.addr).collect();
        assert_eq!(addrs, ["10.0.0.9:8000".parse::<SocketAddr>().unwrap()]);
    }
}

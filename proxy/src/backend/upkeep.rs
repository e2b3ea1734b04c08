//! A backend's upkeep task: re-resolving its DNS names, closing idle
//! connections that expired, and running its active health checks. It
//! holds only weak references, and ends when the backend is dropped.

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Request;
use http_body_util::BodyExt;
use infermesh_api::{EndpointTarget, HealthCheck};

use crate::backend::dns::{ConfiguredEndpoint, assemble, lookup, system_resolver};
use crate::backend::endpoint::{Endpoint, EndpointSet};
use crate::backend::pool::{self, PoolSettings};
use crate::core::body::empty;

/// Re-resolves DNS names every `refresh`, closes expired idle connections
/// and runs the active health checks. Ends when the backend is dropped.
pub(crate) async fn upkeep(
    name: Arc<str>,
    targets: Vec<ConfiguredEndpoint>,
    endpoints: Weak<ArcSwap<EndpointSet>>,
    refresh: Duration,
    pool: Weak<PoolSettings>,
    health_check: Option<HealthCheck>,
) {
    let Some(idle_timeout) = pool.upgrade().map(|p| p.idle_timeout) else {
        return;
    };
    let has_dns = targets
        .iter()
        .any(|t| matches!(t.target, EndpointTarget::Dns { .. }));
    let mut dns = tokio::time::interval(refresh);
    dns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    dns.tick().await;
    let mut sweep = tokio::time::interval((idle_timeout / 2).max(Duration::from_millis(100)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let check_every = health_check
        .as_ref()
        .map_or(Duration::from_secs(3600), |c| c.interval.get());
    let mut check = tokio::time::interval(check_every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = dns.tick(), if has_dns => {
                let Some(endpoints) = endpoints.upgrade() else { return };
                let current = endpoints.load_full();
                let next = assemble(lookup(&name, &targets, &current, system_resolver).await, &current);
                let changed = next.endpoints.len() != current.endpoints.len()
                    || next.endpoints.iter().zip(&current.endpoints).any(|(a, b)| !Arc::ptr_eq(a, b));
                if changed {
                    let addrs: Vec<String> = next.endpoints.iter().map(|e| e.addr.to_string()).collect();
                    tracing::info!(backend = %name, endpoints = ?addrs, "backend endpoints changed");
                    endpoints.store(Arc::new(next));
                }
            }
            _ = sweep.tick() => {
                let Some(endpoints) = endpoints.upgrade() else { return };
                for endpoint in &endpoints.load().endpoints {
                    endpoint.connections.close_expired(idle_timeout);
                }
            }
            _ = check.tick(), if health_check.is_some() => {
                let (Some(endpoints), Some(pool), Some(settings)) =
                    (endpoints.upgrade(), pool.upgrade(), health_check.as_ref())
                else {
                    return;
                };
                for endpoint in &endpoints.load().endpoints {
                    tokio::spawn(check_endpoint(endpoint.clone(), pool.clone(), settings.clone()));
                }
            }
        }
    }
}

/// Runs one active health check of `endpoint`: a `GET` of the check's
/// path on a connection of its own (so a check never waits behind traffic
/// for a connection slot); a 2xx within the timeout passes.
async fn check_endpoint(endpoint: Arc<Endpoint>, pool: Arc<PoolSettings>, settings: HealthCheck) {
    let request = Request::get(settings.path.as_str())
        .header(http::header::USER_AGENT, "infermesh-health-check")
        .body(empty())
        .expect("a validated path makes a request");
    let exchange = async {
        let response = pool::send_alone(endpoint.addr, &pool, request).await.ok()?;
        let status = response.status();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    let status = tokio::time::timeout(settings.timeout.get(), exchange)
        .await
        .ok()
        .flatten();
    let passed = status.is_some_and(|s| s.is_success());
    let changed = endpoint.health.checked(
        passed,
        settings.healthy_threshold,
        settings.unhealthy_threshold,
    );
    match (changed, passed) {
        (true, true) => {
            tracing::info!(endpoint = %endpoint.addr, "endpoint passes its health checks again")
        }
        (true, false) => {
            tracing::warn!(endpoint = %endpoint.addr, status = ?status, path = %settings.path, "endpoint fails its health checks; taken out of the rotation")
        }
        (false, _) => {}
    }
}

//! `Backend`: a named set of model-server endpoints, how to reach them, and
//! how to keep their connections.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::check::Checker;
use crate::duration::Duration;
use crate::path::FieldPath;
use crate::resilience::{CircuitBreaker, HealthCheck, LoadBalancer, OutlierDetection};

/// The spec of a `Backend` resource.
///
/// ```yaml
/// kind: Backend
/// metadata: { name: llama }
/// spec:
///   protocol: http1
///   endpoints:
///     - address: 10.0.0.7:8000
///     - address: llama-1.models.svc:8000
///       weight: 2
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct BackendSpec {
    /// The servers requests are balanced over. May be empty (every request
    /// then fails with 503 `no_endpoint`), e.g. while a model is scaled to zero.
    pub endpoints: Vec<EndpointSpec>,
    /// Addresses (`ip:port`) that stand for the whole backend, like a
    /// Kubernetes Service's cluster IP: a sidecar's outbound capture
    /// listener sends HTTP requests whose original destination is one of
    /// them, and that no route matched, to this backend.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::socket_addresses")]
    pub addresses: Vec<std::net::SocketAddr>,
    /// The HTTP version spoken to the endpoints.
    pub protocol: UpstreamProtocol,
    /// How long a TCP connect to one endpoint may take.
    pub connect_timeout: Duration,
    /// How often DNS names in `endpoints` are resolved again.
    pub dns_refresh_interval: Duration,
    /// Keep-alive connection pooling.
    pub pool: PoolSpec,
    /// How an endpoint is picked for each request.
    pub load_balancer: LoadBalancer,
    /// Limits past which requests are refused with 503 `overloaded`.
    pub circuit_breaker: CircuitBreaker,
    /// Ejecting endpoints that keep failing.
    pub outlier_detection: OutlierDetection,
    /// Checking each endpoint's health actively; off unless given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Mutual TLS to the endpoints; plaintext unless given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTls>,
}

/// Mutual TLS to a backend's endpoints with SPIFFE identities: the proxy
/// presents its own certificate (`infermesh-proxy gateway --identity-cert`)
/// and accepts an endpoint only if its certificate chains to the trust
/// bundle and carries the endpoint's identity: its own
/// (`endpoints[].identity`), else `identity`. Host names play no part.
///
/// ```yaml
/// tls: { identity: spiffe://cluster.local/ns/models/sa/llama }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendTls {
    /// The SPIFFE ID an endpoint must present unless it names its own.
    /// Without it, every endpoint names its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl BackendSpec {
    /// Default for [`BackendSpec::connect_timeout`]: Envoy's default.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default for [`BackendSpec::dns_refresh_interval`]: Envoy's default.
    pub const DEFAULT_DNS_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
}

impl Default for BackendSpec {
    fn default() -> Self {
        BackendSpec {
            endpoints: Vec::new(),
            addresses: Vec::new(),
            protocol: UpstreamProtocol::default(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            dns_refresh_interval: Self::DEFAULT_DNS_REFRESH_INTERVAL,
            pool: PoolSpec::default(),
            load_balancer: LoadBalancer::default(),
            circuit_breaker: CircuitBreaker::default(),
            outlier_detection: OutlierDetection::default(),
            health_check: None,
            tls: None,
        }
    }
}

/// One endpoint of a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// `ip:port`, `[ipv6]:port`, or `dns-name:port`. A DNS name stands for
    /// every address it resolves to, and is resolved again periodically.
    #[schemars(schema_with = "crate::schema::endpoint_address")]
    pub address: String,
    /// Relative share of traffic, 1 or more.
    #[serde(default = "one")]
    pub weight: u32,
    /// The SPIFFE ID this endpoint must present, when the backend has
    /// `tls` and its endpoints are different workloads (as Linkerd's
    /// destination service gives each endpoint its identity). Only for an
    /// `ip:port` address: a DNS name stands for addresses that change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn one() -> u32 {
    1
}

impl EndpointSpec {
    /// The parsed address: a socket address, or a DNS name and port.
    pub fn target(&self) -> Result<EndpointTarget, String> {
        EndpointTarget::parse(&self.address)
    }
}

/// Where an endpoint is: a fixed socket address, or a DNS name to resolve.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EndpointTarget {
    /// An IP address and port.
    Socket(SocketAddr),
    /// A DNS name and port.
    Dns {
        /// The name to resolve.
        host: String,
        /// The port to connect to on every resolved address.
        port: u16,
    },
}

impl EndpointTarget {
    /// Parses `ip:port`, `[ipv6]:port` or `dns-name:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!(
                    "{text:?} has port 0; give the port the model server listens on"
                ));
            }
            return Ok(EndpointTarget::Socket(addr));
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!(
                "{text:?} has no port; write it as host:port, e.g. {text}:8000"
            ));
        };
        let port: u16 = match port.parse() {
            Ok(0) | Err(_) => {
                return Err(format!("{text:?} has an invalid port {port:?} (1-65535)"));
            }
            Ok(p) => p,
        };
        if host.contains(':') || host.starts_with('[') {
            return Err(format!(
                "{text:?} is not a valid address; write IPv6 as [addr]:port"
            ));
        }
        if !is_dns_name(host) {
            return Err(format!("{host:?} is not a valid IP address or DNS name"));
        }
        Ok(EndpointTarget::Dns {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and hyphens.
pub(crate) fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The HTTP version the proxy speaks to a backend's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive connections, one request at a time each.
    #[default]
    Http1,
    /// HTTP/2 over cleartext (h2c, prior knowledge), many requests per
    /// connection. Needed for gRPC.
    Http2,
}

/// How upstream connections are kept for reuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolSpec {
    /// An idle HTTP/1.1 connection is closed after this long. Keep it below
    /// the model server's own keep-alive timeout (uvicorn, which vLLM and
    /// many Python servers use, closes idle connections after 5 s), so the
    /// proxy never reuses a connection the server is closing.
    pub idle_timeout: Duration,
    /// At most this many idle HTTP/1.1 connections are kept per endpoint.
    pub max_idle_per_endpoint: usize,
}

impl PoolSpec {
    /// Default for [`PoolSpec::idle_timeout`].
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
    /// Default for [`PoolSpec::max_idle_per_endpoint`].
    pub const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 64;
}

impl Default for PoolSpec {
    fn default() -> Self {
        PoolSpec {
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            max_idle_per_endpoint: Self::DEFAULT_MAX_IDLE_PER_ENDPOINT,
        }
    }
}

impl crate::Spec for BackendSpec {
    fn check(&self, checker: &mut Checker<'_>) {
        let spec = FieldPath::root().key("spec");
        let endpoints = spec.key("endpoints");
        let mut seen = std::collections::HashMap::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let at = endpoints.index(i);
            if let Err(e) = endpoint.target() {
                checker.error(at.key("address"), e);
            }
            if endpoint.weight == 0 {
                checker.error(
                    at.key("weight"),
                    "weight must be at least 1; remove the endpoint to send it no traffic",
                );
            }
            if let Some(first) = seen.insert(endpoint.address.as_str(), i) {
                checker.error(
                    at.key("address"),
                    format!(
                        "endpoint {:?} is already listed at endpoints[{first}]",
                        endpoint.address
                    ),
                );
            }
        }
        checker.duration_within(
            spec.key("connectTimeout"),
            self.connect_timeout,
            Duration::from_millis(1),
            Duration::from_secs(300),
        );
        checker.duration_within(
            spec.key("dnsRefreshInterval"),
            self.dns_refresh_interval,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        );
        checker.duration_within(
            spec.key("pool").key("idleTimeout"),
            self.pool.idle_timeout,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        );
        self.circuit_breaker
            .check(&spec.key("circuitBreaker"), checker);
        self.outlier_detection
            .check(&spec.key("outlierDetection"), checker);
        if let Some(health_check) = &self.health_check {
            health_check.check(&spec.key("healthCheck"), checker);
        }
        if let Some(identity) = self.tls.as_ref().and_then(|t| t.identity.as_ref())
            && let Err(e) = infermesh_certs::SpiffeId::parse(identity)
        {
            checker.error(spec.key("tls").key("identity"), e.to_string());
        }
        let default_identity = self.tls.as_ref().is_some_and(|t| t.identity.is_some());
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let at = endpoints.index(i);
            match (&endpoint.identity, &self.tls) {
                (Some(_), None) => checker.error(
                    at.key("identity"),
                    "an endpoint's identity is checked by mutual TLS: give the backend `tls: {}`",
                ),
                (Some(identity), Some(_)) => {
                    if let Err(e) = infermesh_certs::SpiffeId::parse(identity) {
                        checker.error(at.key("identity"), e.to_string());
                    } else if matches!(endpoint.target(), Ok(EndpointTarget::Dns { .. })) {
                        checker.error(
                            at.key("identity"),
                            "an endpoint's own identity needs an ip:port address (a DNS name stands for addresses that change); give the backend's tls.identity instead",
                        );
                    }
                }
                (None, Some(_)) if !default_identity => checker.error(
                    at.key("identity"),
                    "this endpoint has no identity to check: give it one, or give the backend tls.identity",
                ),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_targets() {
        assert_eq!(
            EndpointTarget::parse("10.0.0.1:8000"),
            Ok(EndpointTarget::Socket("10.0.0.1:8000".parse().unwrap()))
        );
        assert_eq!(
            EndpointTarget::parse("[::1]:9000"),
            Ok(EndpointTarget::Socket("[::1]:9000".parse().unwrap()))
        );
        assert_eq!(
            EndpointTarget::parse("Llama.models.svc:8000"),
            Ok(EndpointTarget::Dns {
                host: "llama.models.svc".into(),
                port: 8000
            })
        );
        for bad in [
            "llama",
            "llama:0",
            "llama:http",
            "::1:80",
            "bad_name:80",
            "10.0.0.1:0",
        ] {
            assert!(
                EndpointTarget::parse(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }
}

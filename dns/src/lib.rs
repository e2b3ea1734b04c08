//! Name resolution for infermesh's binaries, without libc.
//!
//! The images ship statically linked binaries on an empty base, and a
//! static glibc cannot load the NSS modules `getaddrinfo` needs: it would
//! fail to resolve any name there. This crate resolves with hickory's stub
//! resolver instead, configured as libc would be (`/etc/resolv.conf`:
//! name servers, search domains, `ndots`; `/etc/hosts` first), and it keeps
//! answers for their DNS TTL, so a name asked again within its TTL costs no
//! query — the caller decides how often to ask, the cache how often the
//! network is asked.
//!
//! One resolver serves the whole process ([`system`]): its cache and its
//! connections to the name servers are shared.

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::LookupIpStrategy;

/// A resolver configured from the system's files.
pub struct Resolver {
    /// The resolver, or why the system's configuration could not be read
    /// (then only IP literals resolve, and every lookup says why).
    inner: Result<TokioResolver, String>,
}

impl Resolver {
    /// A resolver from `/etc/resolv.conf` and `/etc/hosts`.
    pub fn from_system_config() -> Self {
        let inner = TokioResolver::builder_tokio()
            .and_then(|mut builder| {
                // IPv4 addresses when a name has any, else IPv6 (Envoy's
                // V4_PREFERRED, Istio's default): a dual-stack name whose
                // IPv6 route is missing must not get half the traffic.
                builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
                builder.build()
            })
            .map_err(|e| format!("cannot read the DNS configuration (/etc/resolv.conf): {e}"));
        Resolver { inner }
    }

    /// The addresses of `host` (a name, or an IP literal, bracketed or
    /// not), each with `port`: its IPv4 addresses, or its IPv6 ones when
    /// it has no IPv4 address.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let resolver = self
            .inner
            .as_ref()
            .map_err(|why| io::Error::other(why.clone()))?;
        let answer = resolver
            .lookup_ip(host)
            .await
            .map_err(|e| io::Error::other(format!("cannot resolve {host}: {e}")))?;
        let addresses: Vec<SocketAddr> =
            answer.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ));
        }
        Ok(addresses)
    }

    /// The addresses of `host:port` (`name:port`, `ip:port` or
    /// `[ipv6]:port`).
    pub async fn lookup_address(&self, address: &str) -> io::Result<Vec<SocketAddr>> {
        let (host, port) = split_host_port(address)?;
        self.lookup(host, port).await
    }
}

/// The process's resolver, made on first use.
pub fn system() -> &'static Resolver {
    static SYSTEM: OnceLock<Resolver> = OnceLock::new();
    SYSTEM.get_or_init(Resolver::from_system_config)
}

/// Splits `host:port`; the host of `[ipv6]:port` keeps its brackets off.
pub fn split_host_port(address: &str) -> io::Result<(&str, u16)> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address}: {why}; write host:port"),
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    let port = port
        .parse()
        .map_err(|_| invalid("the port is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    Ok((host, port))
}

/// Connects to the first address of `address` (`host:port`) that accepts,
/// trying each in the order the resolver gave them.
pub async fn connect(address: &str) -> io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for addr in system().lookup_address(address).await? {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other(format!("{address} has no address"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literals_need_no_name_server() {
        let resolver = Resolver {
            inner: Err("no configuration".into()),
        };
        assert_eq!(
            resolver.lookup_address("127.0.0.1:80").await.unwrap(),
            ["127.0.0.1:80".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolver.lookup_address("[::1]:443").await.unwrap(),
            ["[::1]:443".parse::<SocketAddr>().unwrap()]
        );
        let e = resolver.lookup("model.internal", 80).await.unwrap_err();
        assert!(e.to_string().contains("no configuration"), "{e}");
    }

    #[tokio::test]
    async fn localhost_comes_from_the_hosts_file() {
        // Every Linux /etc/hosts names localhost; the lookup must not need
        // a name server to answer it.
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if !hosts.lines().any(|l| {
            l.split_whitespace().skip(1).any(|n| n == "localhost") && !l.trim().starts_with('#')
        }) {
            eprintln!("skipped: /etc/hosts does not name localhost");
            return;
        }
        let addresses = system().lookup("localhost", 8080).await.unwrap();
        assert_eq!(
            addresses,
            ["127.0.0.1:8080".parse::<SocketAddr>().unwrap()],
            "IPv4 first, and only IPv4 when there is some"
        );
    }

    #[test]
    fn host_and_port_are_split_or_refused() {
        assert_eq!(
            split_host_port("cp.infermesh:15012").unwrap(),
            ("cp.infermesh", 15012)
        );
        assert_eq!(split_host_port("[::1]:1").unwrap(), ("::1", 1));
        for bad in ["cp", "cp:http", ":80"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }
}

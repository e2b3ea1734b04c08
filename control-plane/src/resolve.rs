//! DNS names in endpoints, resolved by the control plane: proxies are sent
//! the addresses, and a change of what a name resolves to is pushed like
//! any other change (to the proxies that hold its backend). Each name is
//! resolved again on its backend's `dnsRefreshInterval`; a lookup that
//! fails keeps the addresses last resolved (as Envoy's strict DNS does),
//! and a name never resolved has none.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use infermesh_api::{Config, EndpointTarget};

/// A DNS name and port, as an endpoint writes it.
pub type Name = (String, u16);

/// What each name resolved to last.
pub type Resolved = HashMap<Name, BTreeSet<SocketAddr>>;

/// Looks a name up: the system resolver in production, a table in tests.
pub type Lookup = Arc<
    dyn Fn(Name) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system's resolver (`/etc/hosts`, then the name servers of
/// `/etc/resolv.conf`), without libc: see `infermesh_dns`.
pub fn system() -> Lookup {
    Arc::new(|(host, port): Name| {
        Box::pin(async move { infermesh_dns::system().lookup(&host, port).await })
    })
}

/// The names of `config`'s endpoints, each with how often to resolve it
/// (the shortest `dnsRefreshInterval` of the backends that name it).
pub fn names(config: &Config) -> HashMap<Name, Duration> {
    let mut names: HashMap<Name, Duration> = HashMap::new();
    for backend in &config.backends {
        let every = backend.spec.dns_refresh_interval.get();
        for endpoint in &backend.spec.endpoints {
            if let Ok(EndpointTarget::Dns { host, port }) = endpoint.target() {
                names
                    .entry((host, port))
                    .and_modify(|d| *d = (*d).min(every))
                    .or_insert(every);
            }
        }
    }
    names
}

/// Resolves every name of `names` into `resolved`; whether anything
/// changed. A failed lookup keeps what the name had.
pub async fn refresh(
    lookup: &Lookup,
    names: impl IntoIterator<Item = Name>,
    resolved: &mut Resolved,
) -> bool {
    let mut changed = false;
    for name in names {
        match lookup(name.clone()).await {
            Ok(addresses) => {
                let addresses: BTreeSet<SocketAddr> = addresses.into_iter().collect();
                if resolved.get(&name) != Some(&addresses) {
                    resolved.insert(name, addresses);
                    changed = true;
                }
            }
            Err(e) => {
                eprintln!(
                    "infermesh-control-plane: cannot resolve {}:{} ({e}); its endpoints stay as last resolved",
                    name.0, name.1
                );
                if let std::collections::hash_map::Entry::Vacant(never) = resolved.entry(name) {
                    never.insert(BTreeSet::new());
                    changed = true;
                }
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn a_change_is_seen_and_a_failure_keeps_what_was_resolved() {
        let table: Arc<Mutex<Option<Vec<SocketAddr>>>> =
            Arc::new(Mutex::new(Some(vec!["10.0.0.1:80".parse().unwrap()])));
        let answers = table.clone();
        let lookup: Lookup = Arc::new(move |_| {
            let answer = answers.lock().unwrap().clone();
            Box::pin(async move { answer.ok_or_else(|| std::io::Error::other("SERVFAIL")) })
        });
        let name = ("llama.models.svc".to_owned(), 80);
        let mut resolved = Resolved::new();
        assert!(refresh(&lookup, [name.clone()], &mut resolved).await);
        assert!(!refresh(&lookup, [name.clone()], &mut resolved).await);
        *table.lock().unwrap() = Some(vec![
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        ]);
        assert!(refresh(&lookup, [name.clone()], &mut resolved).await);
        *table.lock().unwrap() = None;
        assert!(!refresh(&lookup, [name.clone()], &mut resolved).await);
        assert_eq!(resolved[&name].len(), 2);
    }
}

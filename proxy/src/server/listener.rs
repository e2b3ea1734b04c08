//! Listeners: binding sockets, accepting connections, and keeping the set
//! of bound sockets in line with the config across reloads. A listener
//! whose address did not change keeps its socket, so a reload never
//! refuses a connection. Each accepted connection is served on its own
//! task ([`crate::server::connection`]), on the workers in turn: this
//! runtime's accept loop hands every other connection (with two workers)
//! to another worker, where it stays.
//!
//! One accept loop handing connections over rather than a socket per
//! worker (`SO_REUSEPORT`): the kernel would spread connections by a hash
//! of their addresses, unevenly for the few long-lived connections a
//! sidecar takes, and a second process could bind the same port without
//! an error; a descriptor of one socket in every worker's reactor wakes
//! them all, and the first awake takes every waiting connection. The
//! hand-over costs a wake-up per connection, not per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use infermesh_api::Config;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::context::ListenerId;
use crate::server::connection::{self, Accepted};
use crate::server::shared::Shared;

/// A listener socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {address} for listener {name:?}: {source}{}",
    hint(holder)
)]
pub(crate) struct BindError {
    name: String,
    address: SocketAddr,
    /// A running listener of ours on the same port, if any.
    holder: Option<String>,
    #[source]
    source: std::io::Error,
}

fn hint(holder: &Option<String>) -> String {
    match holder {
        Some(h) => format!(
            " (listener {h:?} still holds this port: give the listener another port, or restart to move it between a wildcard and a specific address)"
        ),
        None => String::new(),
    }
}

struct Running {
    id: ListenerId,
    name: String,
    configured: SocketAddr,
    local: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The changes a config makes to the bound listeners, prepared (sockets
/// already bound) but not yet applied.
pub(crate) struct ListenerPlan {
    /// The socket each listener name will use.
    pub ids: HashMap<String, ListenerId>,
    /// Listeners that the config drops, or dropped earlier, whose
    /// connections are still finishing: the new snapshot keeps serving
    /// them as before until they close.
    pub draining: Vec<ListenerId>,
    bind: Vec<(ListenerId, String, SocketAddr, TcpListener)>,
    renamed: Vec<(ListenerId, String)>,
    remove: Vec<ListenerId>,
}

/// The bound listeners and their accept loops.
pub(crate) struct Listeners {
    running: Vec<Running>,
    /// Listeners no longer configured whose connections are finishing.
    draining: Vec<Running>,
    next_id: ListenerId,
    /// The runtimes of the workers other than this one, which serve their
    /// share of every listener's connections.
    workers: Vec<Handle>,
}

impl Listeners {
    /// No listeners yet. Their connections will be served on this runtime
    /// and on `workers`, in turn.
    pub(crate) fn new(workers: Vec<Handle>) -> Self {
        Listeners {
            running: Vec::new(),
            draining: Vec::new(),
            next_id: 1,
            workers,
        }
    }

    /// Works out which sockets `config` needs, binding the new ones. On a
    /// bind failure nothing changes (the new sockets are closed again).
    pub(crate) async fn prepare(&mut self, config: &Config) -> Result<ListenerPlan, BindError> {
        let mut claimed: Vec<ListenerId> = Vec::new();
        self.draining.retain(|r| !r.task.is_finished());
        let mut plan = ListenerPlan {
            ids: HashMap::new(),
            draining: Vec::new(),
            bind: Vec::new(),
            renamed: Vec::new(),
            remove: Vec::new(),
        };
        for listener in &config.listeners {
            let address = listener.spec.address;
            let same_name = self.running.iter().find(|r| {
                r.name == listener.name && r.configured == address && !claimed.contains(&r.id)
            });
            let same_address = || {
                self.running.iter().find(|r| {
                    address.port() != 0 && r.configured == address && !claimed.contains(&r.id)
                })
            };
            if let Some(running) = same_name.or_else(same_address) {
                claimed.push(running.id);
                plan.ids.insert(listener.name.clone(), running.id);
                if running.name != listener.name {
                    plan.renamed.push((running.id, listener.name.clone()));
                }
                continue;
            }
            let socket = TcpListener::bind(address).await.map_err(|source| {
                // Say which listener of ours holds the port, if one does.
                let holder = self
                    .running
                    .iter()
                    .find(|r| r.local.port() == address.port() && !claimed.contains(&r.id))
                    .map(|r| r.name.clone());
                BindError {
                    name: listener.name.clone(),
                    address,
                    holder,
                    source,
                }
            })?;
            let id = self.next_id;
            self.next_id += 1;
            plan.ids.insert(listener.name.clone(), id);
            plan.bind.push((id, listener.name.clone(), address, socket));
        }
        plan.remove = self
            .running
            .iter()
            .map(|r| r.id)
            .filter(|id| !claimed.contains(id))
            .collect();
        plan.draining = plan
            .remove
            .iter()
            .copied()
            .chain(self.draining.iter().map(|r| r.id))
            .collect();
        Ok(plan)
    }

    /// Applies `plan` once the snapshot that uses it is serving: starts
    /// accepting on new sockets and drains the ones no longer configured.
    pub(crate) fn commit(&mut self, plan: ListenerPlan, shared: &Arc<Shared>) {
        for (id, name) in plan.renamed {
            if let Some(r) = self.running.iter_mut().find(|r| r.id == id) {
                r.name = name;
            }
        }
        for (id, name, configured, socket) in plan.bind {
            let local = socket.local_addr().unwrap_or(configured);
            tracing::info!(listener = %name, address = %local, "listening");
            let (stop, stopped) = watch::channel(false);
            let workers = self.workers.clone();
            let task = tokio::spawn(accept_loop(id, socket, shared.clone(), stopped, workers));
            self.running.push(Running {
                id,
                name,
                configured,
                local,
                stop,
                task,
            });
        }
        for id in plan.remove {
            if let Some(pos) = self.running.iter().position(|r| r.id == id) {
                let removed = self.running.remove(pos);
                tracing::info!(listener = %removed.name, address = %removed.local, "listener removed; draining its connections");
                let _ = removed.stop.send(true);
                self.draining.push(removed);
            }
        }
    }

    /// Stops accepting on every listener and lets open connections finish
    /// (HTTP/2 clients get GOAWAY, idle keep-alive connections close).
    /// Resolves when every connection has closed.
    pub(crate) async fn drain(&mut self) {
        for r in &self.running {
            let _ = r.stop.send(true);
        }
        self.draining.append(&mut self.running);
        for r in &mut self.draining {
            let _ = (&mut r.task).await;
        }
        self.draining.clear();
    }
}

/// Accepts on `socket` until `stop`, serving the connections on this
/// runtime and on `workers` in turn, then waits for them all to close.
async fn accept_loop(
    id: ListenerId,
    socket: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    workers: Vec<Handle>,
) {
    let (drain, drained) = watch::channel(());
    let mut accepted = Accepted::new(drained);
    // This runtime's turn is 0, worker k's is k.
    let mut turn: usize = 0;
    // A descriptor held in reserve: when the process runs out, it is
    // given back for a moment to accept one waiting connection and close
    // it, so that clients are refused at once instead of waiting in the
    // backlog (libuv's and nginx's answer to EMFILE).
    let mut reserve = open_reserve();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            result = socket.accept() => match result {
                Ok((stream, client)) => {
                    let on = turn.checked_sub(1).and_then(|k| workers.get(k));
                    turn = (turn + 1) % (workers.len() + 1);
                    connection::spawn(stream, client, id, &shared, &mut accepted, on);
                }
                Err(e) if is_out_of_descriptors(&e) => {
                    shared.ran_out_of_descriptors();
                    let listener = shared.snapshot.load().listener_entry(id).map(|l| l.name.clone());
                    let name = listener.as_deref().unwrap_or("");
                    tracing::warn!(listener = name, error = %e, "out of file descriptors: refusing new connections");
                    if reserve.take().is_some() && let Ok((refused, _)) = socket.accept().await {
                        drop(refused);
                        shared
                            .metrics
                            .connections_refused
                            .with_label_values(&[name, "out_of_descriptors"])
                            .inc();
                    }
                    reserve = open_reserve();
                    // Don't spin while nothing can be accepted.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(socket);
    // Every connection closes gracefully; each holds a receiver of the
    // drain signal until it is gone.
    let _ = drain.send(());
    drop(accepted);
    drain.closed().await;
}

/// The descriptor kept in reserve for when the process runs out.
fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Whether `error` says the process or the system has no file descriptor
/// left (EMFILE, ENFILE).
fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

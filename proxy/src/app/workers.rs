//! The proxy's workers: threads that each run a single-threaded tokio
//! runtime of their own and serve the connections they accept (thread per
//! core). The first worker is the thread that runs the proxy, which also
//! runs everything else (config, control plane, admin); this module
//! starts the others and stops them at exit.
//!
//! Why not tokio's work-stealing runtime: with it, a request's tasks (the
//! client connection, the upstream connection, the timers) wake each other
//! across threads, and the bookkeeping of stealing is paid on every wake-
//! up; measured, two workers spent 23 % more CPU per request at saturation
//! than one, and 58 % more at a steady 2,000 requests per second, where
//! HAProxy and nginx spent the same. A connection here stays on the worker
//! that accepted it, with its upstream connections
//! ([`crate::backend::pool`]), as in Envoy and Pingora.

use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::core::worker;

/// The running workers other than the first.
pub(crate) struct Workers {
    others: Vec<Other>,
}

/// A worker other than the first: its thread, its runtime, and what tells
/// it to stop.
struct Other {
    thread: JoinHandle<()>,
    runtime: Handle,
    stop: oneshot::Sender<()>,
}

impl Workers {
    /// Starts workers 1 to `count` − 1 (worker 0 is the calling thread) and
    /// records the count for what is kept per worker.
    pub(crate) fn start(count: usize) -> std::io::Result<Workers> {
        let count = count.max(1);
        worker::set_count(count);
        worker::enter(0);
        let mut others = Vec::with_capacity(count - 1);
        for index in 1..count {
            let (started, runtime) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("infermesh-worker-{index}"))
                .spawn(move || {
                    let built = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let runtime = match built {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    worker::enter(index);
                    let _ = started.send(Ok(runtime.handle().clone()));
                    // Serves what is spawned on it until told to stop;
                    // whatever still runs then is dropped with the runtime.
                    let _ = runtime.block_on(stopped);
                })?;
            let runtime = runtime
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread ended as it started"))??;
            others.push(Other {
                thread,
                runtime,
                stop,
            });
        }
        Ok(Workers { others })
    }

    /// The runtimes of workers 1 and up, to start accept loops on.
    pub(crate) fn runtimes(&self) -> Vec<Handle> {
        self.others.iter().map(|o| o.runtime.clone()).collect()
    }

    /// Stops the other workers, dropping what still runs on them, and
    /// waits for their threads.
    pub(crate) fn stop(self) {
        for other in self.others {
            let _ = other.stop.send(());
            let _ = other.thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_what_is_spawned_on_it_on_its_own_thread() {
        let workers = Workers::start(3).unwrap();
        let runtimes = workers.runtimes();
        assert_eq!(runtimes.len(), 2);
        let ran: Vec<(usize, String)> = runtimes
            .iter()
            .map(|runtime| {
                let (tx, rx) = std::sync::mpsc::channel();
                runtime.spawn(async move {
                    let name = std::thread::current().name().unwrap_or("").to_owned();
                    tx.send((worker::current(), name)).unwrap();
                });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(
            ran,
            [
                (1, "infermesh-worker-1".to_owned()),
                (2, "infermesh-worker-2".to_owned())
            ]
        );
        // A task still running when the workers stop is dropped, not
        // waited for.
        runtimes[0].spawn(std::future::pending::<()>());
        workers.stop();
        worker::set_count(1);
    }
}

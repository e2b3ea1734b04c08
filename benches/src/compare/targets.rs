//! How each target of a comparison is started: the direct connection
//! needs nothing, the infermesh targets are set up by `infermesh`, HAProxy
//! and nginx by `peers`, each on the proxies' CPUs with the workers the
//! file asks for (`Placement`). A started target is `Ready` to take load.

use std::net::SocketAddr;
use std::path::Path;

use super::spec::{InfermeshSpec, TargetKind};
use super::supervise::{self, Placement, Started};
use super::{infermesh, peers};
use crate::process::Usage;

/// A target ready to take load.
pub(super) struct Ready {
    /// Which target this is.
    pub(super) kind: TargetKind,
    /// Where to send the load: scheme, address and port, no path.
    pub(super) url: String,
    /// The proxy processes, whose CPU and memory are measured.
    processes: Vec<Started>,
}

impl Ready {
    /// CPU seconds and peak memory of every proxy process (and its
    /// children), added up; `None` without any.
    pub(super) fn usage(&self) -> Option<Usage> {
        supervise::usage(&self.processes)
    }

    /// A reader of what `usage` reads, which owns what it needs, so that
    /// the load generator can call it at the start and the end of its
    /// measured window, from a task of its own.
    pub(super) fn usage_reader(&self) -> impl Fn() -> Option<Usage> + Send + Sync + 'static {
        let pids = supervise::pids(&self.processes);
        move || supervise::usage_of(&pids)
    }
}

/// Starts target `kind` in front of the backends at `backends`, placed as
/// `placement` says, with its configs and logs in `work`.
pub(super) fn start_target(
    kind: TargetKind,
    backends: &[SocketAddr],
    infermesh: &InfermeshSpec,
    placement: &Placement,
    work: &Path,
) -> anyhow::Result<Ready> {
    let proxies = match kind {
        TargetKind::Direct => return Ok(direct(backends)),
        TargetKind::Infermesh
        | TargetKind::InfermeshBaseline
        | TargetKind::InfermeshBare
        | TargetKind::InfermeshHedged
        | TargetKind::InfermeshFanout
        | TargetKind::InfermeshTraced
        | TargetKind::InfermeshTracedSampled
        | TargetKind::InfermeshJsonLog
        | TargetKind::InfermeshEcs => {
            infermesh::start_one(kind, backends, infermesh, placement, work)?
        }
        TargetKind::InfermeshPair | TargetKind::InfermeshMtlsPair => {
            infermesh::start_pair(kind, backends, infermesh, placement, work)?
        }
        TargetKind::Haproxy => peers::start_haproxy(backends, placement, work)?,
        TargetKind::Nginx => peers::start_nginx(backends, placement, work)?,
    };
    Ok(Ready {
        kind,
        url: format!("http://127.0.0.1:{}", proxies.port),
        processes: proxies.processes,
    })
}

/// The direct target: the first backend itself, no process of its own.
fn direct(backends: &[SocketAddr]) -> Ready {
    Ready {
        kind: TargetKind::Direct,
        url: format!("http://{}", backends[0]),
        processes: Vec::new(),
    }
}

//! How each target of a comparison is started: the direct connection
//! needs nothing, the infermesh targets are set up by `infermesh`, HAProxy
//! and nginx by `peers`. A started target is `Ready` to take load.

use std::net::SocketAddr;
use std::path::Path;

use super::spec::{InfermeshSpec, TargetKind};
use super::supervise::{self, Started};
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
}

/// Starts target `kind` in front of the mock servers at `backends`, with
/// its configs and logs in `work`.
pub(super) fn start_target(
    kind: TargetKind,
    backends: &[SocketAddr],
    infermesh: &InfermeshSpec,
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
        | TargetKind::InfermeshEcs => infermesh::start_one(kind, backends, infermesh, work)?,
        TargetKind::InfermeshPair | TargetKind::InfermeshMtlsPair => {
            infermesh::start_pair(kind, backends, infermesh, work)?
        }
        TargetKind::Haproxy => peers::start_haproxy(backends, work)?,
        TargetKind::Nginx => peers::start_nginx(backends, work)?,
    };
    Ok(Ready {
        kind,
        url: format!("http://127.0.0.1:{}", proxies.port),
        processes: proxies.processes,
    })
}

/// The direct target: the first mock server itself, no process of its own.
fn direct(backends: &[SocketAddr]) -> Ready {
    Ready {
        kind: TargetKind::Direct,
        url: format!("http://{}", backends[0]),
        processes: Vec::new(),
    }
}

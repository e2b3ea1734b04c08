//! What each target of a comparison is, and how one is started: the direct
//! connection needs nothing, the infermesh targets are set up by
//! `infermesh`, HAProxy and nginx by `peers`. A started target is `Ready`
//! to take load.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::spec::InfermeshSpec;
use super::supervise::{self, Started};
use super::{infermesh, peers};
use crate::process::Usage;

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// Straight to the first mock server: the baseline.
    Direct,
    /// infermesh-proxy in gateway mode.
    Infermesh,
    /// The `infermesh` target (same config, same settings) run with another
    /// build of infermesh-proxy, `infermesh.baselineBinary`: two builds
    /// measured side by side.
    InfermeshBaseline,
    /// infermesh-proxy without retries, outlier detection or a
    /// load-aware balancer.
    InfermeshBare,
    /// infermesh-proxy with hedged requests (`infermesh.hedge`).
    InfermeshHedged,
    /// infermesh-proxy fanning each request out (`infermesh.fanout`).
    InfermeshFanout,
    /// Two infermesh-proxy processes in a row, plaintext between them.
    InfermeshPair,
    /// Two infermesh-proxy processes in a row, mutual TLS between them.
    InfermeshMtlsPair,
    /// HAProxy in HTTP mode with keep-alive to the backends.
    Haproxy,
    /// nginx as a reverse proxy with upstream keep-alive.
    Nginx,
}

impl TargetKind {
    /// The target's name, as comparison files and reports write it.
    pub(super) fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Infermesh => "infermesh",
            TargetKind::InfermeshBaseline => "infermesh-baseline",
            TargetKind::InfermeshBare => "infermesh-bare",
            TargetKind::InfermeshHedged => "infermesh-hedged",
            TargetKind::InfermeshFanout => "infermesh-fanout",
            TargetKind::InfermeshPair => "infermesh-pair",
            TargetKind::InfermeshMtlsPair => "infermesh-mtls-pair",
            TargetKind::Haproxy => "haproxy",
            TargetKind::Nginx => "nginx",
        }
    }
}

/// The running proxy processes of a target and the loopback port where it
/// takes load.
pub(super) struct Proxies {
    /// Every proxy process of the target, the one that takes the load
    /// first (so it is stopped first).
    pub(super) processes: Vec<Started>,
    /// The port on 127.0.0.1 the target listens on.
    pub(super) port: u16,
}

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
        | TargetKind::InfermeshFanout => infermesh::start_one(kind, backends, infermesh, work)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_named_as_files_write_it() {
        for kind in [
            TargetKind::Direct,
            TargetKind::Infermesh,
            TargetKind::InfermeshBaseline,
            TargetKind::InfermeshBare,
            TargetKind::InfermeshHedged,
            TargetKind::InfermeshFanout,
            TargetKind::InfermeshPair,
            TargetKind::InfermeshMtlsPair,
            TargetKind::Haproxy,
            TargetKind::Nginx,
        ] {
            let parsed: TargetKind = serde_saphyr::from_str(kind.name()).unwrap();
            assert_eq!(parsed, kind);
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.name())
            );
        }
    }
}

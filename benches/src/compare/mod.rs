//! `infermesh-bench compare`: from one YAML file, start mock model servers,
//! put each target in front of them (a direct connection, infermesh-proxy
//! as a gateway, HAProxy and nginx when installed), and run the same load
//! against every target in turn, A B C A B C, round after round, so drift
//! of the machine hits all of them alike. Reports medians and ratios to the
//! direct connection as Markdown, JSON and an SVG chart.
//!
//! ```yaml
//! rounds: 3
//! targets: [direct, infermesh, haproxy, nginx]
//! backends:                      # a mock scenario (see `serve --scenario`)
//!   servers:
//!     - listen: 127.0.0.1:0
//!       models: [{ name: mock-llm }]
//! load:
//!   path: /v1/models             # or: template: openai-chat, model: mock-llm
//!   rate: 2000                   # open-loop phase, for latency
//!   maxThroughput: true          # closed-loop phase, for max req/s
//!   connections: 32
//!   duration: 10s
//!   warmup: 2s
//! infermesh:
//!   accessLog: false
//!   backend: { circuitBreaker: { maxRequests: 512 } }   # more Backend spec
//!   rule: { retry: { nonIdempotent: true } }            # more rule spec
//! ```
//!
//! Instead of `backends`, `staticBackend` puts nginx behind every target,
//! answering every request at once with 200 and a body of `bodyBytes`
//! bytes (4000 at most), from one worker: a backend that costs as little
//! as it can, so the proxies' own cost shows (give one of the two fields,
//! not both). It keeps every connection for a million requests. Its
//! request counts are not read, so `backend req/req` is left out.
//!
//! `workers` gives every proxy that many workers: infermesh-proxy's
//! `--concurrency`, HAProxy's `nbthread`, nginx's `worker_processes`.
//! Without it, infermesh-proxy keeps its default (a thread per CPU it may
//! run on) and HAProxy and nginx get a worker per core (per CPU of
//! `pinning.proxy` when pinned).
//!
//! `pinning` keeps the two sides of the machine apart, by CPU number:
//! every target process (and its children: nginx's workers) starts under
//! `taskset -c` with the `proxy` CPUs; the `infermesh-bench` process
//! itself, whose threads generate the load, is pinned to the `load` CPUs
//! when the run starts, and the backend (mock servers or static nginx)
//! starts on them too. A CPU the machine does not have is an error naming
//! the list. The run prints where each process landed.
//!
//! ```yaml
//! # one core for the proxy, one for the generator and the backend
//! targets: [direct, infermesh, haproxy, nginx]
//! staticBackend: { bodyBytes: 100 }
//! pinning: { proxy: [0], load: [1] }
//! workers: 1
//! load: { path: /, rate: 2000, connections: 32 }
//! ```
//!
//! The target `infermesh-bare` is infermesh-proxy with its resilience
//! stack turned down as far as it goes (round robin, no outlier detection,
//! no retries), to measure what the stack costs.
//!
//! The target `infermesh-baseline` is the `infermesh` target (the same
//! config, the same `infermesh` settings) run with another build of
//! infermesh-proxy, the one `infermesh.baselineBinary` names (a relative
//! path is taken from the current directory). Listed next to `infermesh`,
//! it measures two builds side by side in the same run, round-robin like
//! every target: say the proxy from before a change against the current
//! one. Loading the file fails, naming the field, when the target is
//! listed and the field is missing or names no file.
//!
//! ```yaml
//! targets: [direct, infermesh, infermesh-baseline]
//! infermesh:
//!   baselineBinary: target/baseline/infermesh-proxy
//! ```
//!
//! The target `infermesh-hedged` is the `infermesh` target with the
//! route rule's `hedge` block from `infermesh.hedge`, to measure what
//! hedging does to the tail against the same proxy without it.
//!
//! The target `infermesh-fanout` is infermesh-proxy whose route rule fans
//! out as `infermesh.fanout` says (its branches name the backend `mock`,
//! every mock server), to measure what a fan-out adds to its slowest
//! branch: compare it with `direct` sending the load's `model`, the
//! slowest branch's.
//!
//! The targets `infermesh-traced` and `infermesh-traced-sampled` are the
//! `infermesh` target with OpenTelemetry tracing on, exporting over
//! OTLP/HTTP to the first mock server's `/v1/traces` (the mock is a
//! minimal collector): every trace recorded, or the share
//! `infermesh.traceSampling` says (default 0.01, 1 %). The load sends no
//! `traceparent`, so every request starts a trace and the ratio decides.
//! The `infermesh` target itself never traces (an OTLP endpoint in the
//! environment is not passed on). Side by side they measure what tracing
//! costs: CPU per request and added p99.
//!
//! The targets `infermesh-json-log` and `infermesh-ecs` are the `infermesh`
//! target with the access log on (written to its log file, as
//! `accessLog: true` does), whatever `infermesh.accessLog` says: as JSON,
//! and in Elastic Common Schema (`--log-format ecs`). With `accessLog:
//! false`, `infermesh` is the access log off, so one run compares off,
//! JSON and ECS.
//!
//! ```yaml
//! targets: [direct, infermesh, infermesh-traced-sampled, infermesh-traced, infermesh-json-log, infermesh-ecs]
//! infermesh:
//!   accessLog: false
//!   traceSampling: 0.01
//! ```
//!
//! The targets `infermesh-pair` and `infermesh-mtls-pair` are two
//! infermesh-proxy processes in a row, the hops a caller's and a model's
//! sidecars make (without the iptables redirection of real interception):
//! the caller's proxy forwards over HTTP/2 to the model's, in plaintext or
//! over mutual TLS with SPIFFE identities (a CA and certificates made with
//! `infermesh-control-plane ca`). CPU and memory are those of both proxies
//! together.
//!
//! # How a run goes
//!
//! [`run`] goes through these phases, a function each:
//!
//! 1. `placements`: where the proxies and the load side run, and with how
//!    many workers; with `pinning`, this process is pinned to the load
//!    CPUs;
//! 2. `start_backend`: start the mock servers, in a process of their own,
//!    or the static backend's nginx;
//! 3. `LoadPlan::new`: resolve the load (template, path, protocol);
//! 4. `start_targets`: start every target; one that cannot start (say,
//!    nginx is not installed) is skipped, with the reason in the report;
//!    then each target's idle memory is read (`idle_memory`);
//! 5. `measure_rounds`: round after round, visit each target in turn with
//!    a closed-loop phase (highest throughput, proxy CPU at saturation)
//!    then an open-loop phase at the fixed rate (latency, proxy CPU,
//!    requests the mock servers received);
//! 6. `summarize`: each target's medians, and its proxies' memory now and
//!    at the peak while they still run; then every process is stopped;
//! 7. `describe_setup`: what was run, in words, for the report.
//!
//! # Modules
//!
//! - `spec`: the YAML file's types (the targets among them,
//!   [`TargetKind`]), defaults and [`Comparison::load`];
//! - `targets`: starting each target;
//! - `infermesh`: the infermesh targets' configs, binaries and processes;
//! - `peers`: HAProxy's and nginx's configs and processes, and the static
//!   backend's nginx;
//! - `supervise`: processes: starting, on pinned CPUs or not
//!   (`Placement`), waiting for their port, CPU and memory, and stopping
//!   them (children too) when dropped; a target's processes and port
//!   (`Proxies`); pinning this process's threads;
//! - `measure`: one visit of one target;
//! - `report`: medians, and the report as Markdown, JSON and a chart.

mod infermesh;
mod measure;
mod peers;
mod report;
mod spec;
mod supervise;
mod targets;

use std::net::SocketAddr;
use std::path::Path;

pub use report::{ComparisonReport, Measurement, Summary};
pub use spec::{Comparison, InfermeshSpec, LoadSpec, Pinning, StaticBackend, TargetKind};

use crate::process::Usage;
use measure::LoadPlan;
use report::Memory;
use spec::Backend;
use supervise::{Placement, Started};
use targets::Ready;

/// Runs `comparison`, printing progress on standard error. `work` is a
/// directory for generated configs and logs. With `pinning`, this process
/// stays pinned to the load CPUs after it returns.
pub async fn run(comparison: &Comparison, work: &Path) -> anyhow::Result<ComparisonReport> {
    let (proxies, load_side) = placements(comparison);
    if let Some(pinning) = &comparison.pinning {
        pin_generator(pinning)?;
    }
    let backend = start_backend(comparison, &load_side, work)?;
    let plan = LoadPlan::new(&comparison.load)?;
    let (targets, skipped) = start_targets(comparison, &backend.addresses, &proxies, work)?;
    let idle = idle_memory(&targets);
    let rounds = measure_rounds(comparison, &plan, &targets, backend.mocks()).await?;
    let summary = summarize(&targets, &idle, &rounds, comparison.load.connections);
    drop(targets);
    drop(backend);
    Ok(ComparisonReport {
        rounds,
        summary,
        skipped,
        setup: describe_setup(comparison, &plan),
    })
}

/// Where the two sides of `comparison` run: the proxies (on
/// `pinning.proxy`, with `workers` workers, by default a worker per CPU
/// they may use) and the load side, the generator and the backend (on
/// `pinning.load`). Read before this process is pinned, since that
/// changes how many CPUs it sees.
fn placements(comparison: &Comparison) -> (Placement, Placement) {
    let cores = crate::process::cores();
    let pinning = comparison.pinning.as_ref();
    let proxies = Placement {
        cpus: pinning.map(|p| p.proxy.clone()),
        workers: comparison.workers,
        default_workers: pinning.map_or(cores, |p| p.proxy.len()),
        connections: comparison.load.connections,
    };
    let load_side = Placement {
        cpus: pinning.map(|p| p.load.clone()),
        workers: None,
        default_workers: pinning.map_or(cores, |p| p.load.len()),
        connections: comparison.load.connections,
    };
    (proxies, load_side)
}

/// Pins this process, whose threads generate the load, to the load CPUs
/// of `pinning`, and says where it now runs.
fn pin_generator(pinning: &Pinning) -> anyhow::Result<()> {
    anyhow::ensure!(
        supervise::installed("taskset"),
        "pinning: taskset is not installed (apt install util-linux)"
    );
    supervise::pin_this_process(&pinning.load)?;
    let pid = std::process::id();
    eprintln!(
        "load generator: pid {pid} on CPUs {}",
        supervise::allowed_cpus(pid).unwrap_or_else(|| "?".to_owned())
    );
    Ok(())
}

/// The backend behind every target, running.
struct RunningBackend {
    /// Its process, stopped when this is dropped.
    _process: Started,
    /// Where it listens; the first is the direct target's.
    addresses: Vec<SocketAddr>,
    /// Whether it is the mock servers, whose request counts can be read.
    mock: bool,
}

impl RunningBackend {
    /// The mock servers whose request counts are read; `None` for the
    /// static backend.
    fn mocks(&self) -> Option<&[SocketAddr]> {
        self.mock.then_some(self.addresses.as_slice())
    }
}

/// Starts the backend of `comparison` placed as `load_side` says: the mock
/// servers, or the static backend's nginx.
fn start_backend(
    comparison: &Comparison,
    load_side: &Placement,
    work: &Path,
) -> anyhow::Result<RunningBackend> {
    Ok(match comparison.backend()? {
        Backend::Mock(scenario) => {
            let (process, addresses) = supervise::start_mock(scenario, load_side, work)?;
            RunningBackend {
                _process: process,
                addresses,
                mock: true,
            }
        }
        Backend::Static(answer) => {
            let (process, address) = peers::start_static_backend(answer, load_side, work)?;
            RunningBackend {
                _process: process,
                addresses: vec![address],
                mock: false,
            }
        }
    })
}

/// Targets skipped, each with the reason.
type Skipped = Vec<(TargetKind, String)>;

/// Starts every target of `comparison` in front of the backends at
/// `backends`, in the file's order, placed as `proxies` says; a target
/// that cannot start is skipped with a message. An error when none
/// started.
fn start_targets(
    comparison: &Comparison,
    backends: &[SocketAddr],
    proxies: &Placement,
    work: &Path,
) -> anyhow::Result<(Vec<Ready>, Skipped)> {
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for kind in &comparison.targets {
        match targets::start_target(*kind, backends, &comparison.infermesh, proxies, work) {
            Ok(ready) => targets.push(ready),
            Err(why) => {
                eprintln!("skipping {}: {why:#}", kind.name());
                skipped.push((*kind, format!("{why:#}")));
            }
        }
    }
    anyhow::ensure!(!targets.is_empty(), "no target could be started");
    Ok((targets, skipped))
}

/// Each target's usage (its memory) once every target has started and
/// before any load, in `targets`' order.
fn idle_memory(targets: &[Ready]) -> Vec<Option<Usage>> {
    targets.iter().map(Ready::usage).collect()
}

/// Visits every target in turn, round after round, printing a progress
/// line per visit; returns each target's measurements, in `targets`' order.
/// `mocks` are the mock servers whose request counts are read, if any.
async fn measure_rounds(
    comparison: &Comparison,
    plan: &LoadPlan<'_>,
    targets: &[Ready],
    mocks: Option<&[SocketAddr]>,
) -> anyhow::Result<Vec<(TargetKind, Vec<Measurement>)>> {
    let mut rounds: Vec<(TargetKind, Vec<Measurement>)> =
        targets.iter().map(|t| (t.kind, Vec::new())).collect();
    for round in 1..=comparison.rounds {
        for (target, (_, measured)) in targets.iter().zip(&mut rounds) {
            let measurement = measure::visit(target, plan, mocks).await?;
            eprintln!(
                "{}",
                measure::progress_line(
                    round,
                    comparison.rounds,
                    target,
                    comparison.load.rate,
                    &measurement
                )
            );
            measured.push(measurement);
        }
    }
    Ok(rounds)
}

/// Each target's medians over `rounds`, with its memory when idle
/// (`idle`, in `targets`' order), now after the load, and at its peak (so
/// the targets must still run); the closed loop ran over `connections`.
fn summarize(
    targets: &[Ready],
    idle: &[Option<Usage>],
    rounds: &[(TargetKind, Vec<Measurement>)],
    connections: usize,
) -> Vec<Summary> {
    targets
        .iter()
        .zip(idle)
        .zip(rounds)
        .map(|((target, idle), (_, measured))| {
            let now = target.usage();
            let memory = Memory {
                idle: idle.map(|u| u.rss_bytes),
                idle_anon: idle.map(|u| u.anon_bytes),
                after_load: now.map(|u| u.rss_bytes),
                peak: now.map(|u| u.peak_rss_bytes),
            };
            report::summarize(target.kind, memory, measured, connections)
        })
        .collect()
}

/// What was run, in words: the report's first line.
fn describe_setup(comparison: &Comparison, plan: &LoadPlan<'_>) -> String {
    let load = &comparison.load;
    let (to, backend) = match comparison.backend() {
        Ok(Backend::Static(answer)) => (
            format!(
                " to a static nginx backend answering {} bytes",
                answer.body_bytes
            ),
            "backend",
        ),
        _ => (String::new(), "mock"),
    };
    let workers = comparison.workers.map_or(String::new(), |n| {
        format!(
            "; {n} worker{} per proxy (infermesh-proxy --concurrency {n}, HAProxy nbthread {n}, nginx worker_processes {n})",
            if n == 1 { "" } else { "s" }
        )
    });
    let cpus = |list: &[usize]| {
        format!(
            "CPU{} {}",
            if list.len() == 1 { "" } else { "s" },
            supervise::cpu_list(list)
        )
    };
    let machine = match &comparison.pinning {
        Some(pinning) => format!(
            "proxies pinned to {}, generator and {backend} to {}",
            cpus(&pinning.proxy),
            cpus(&pinning.load)
        ),
        None => format!(
            "{} cores shared by generator, {backend} and proxy",
            crate::process::cores()
        ),
    };
    format!(
        "{} rounds, targets in turn; {} {}{to}; {} connections, {}; closed loop {} then open loop at {}/s for {} each after {} warm-up{workers}; {machine}",
        comparison.rounds,
        plan.request.method,
        plan.path,
        load.connections,
        load.protocol,
        if load.max_throughput {
            "(max throughput)"
        } else {
            "skipped"
        },
        load.rate,
        load.duration,
        load.warmup,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's setup: one core each, one worker each, a static body.
    const PINNED: &str = "targets: [direct, infermesh, haproxy, nginx]\nstaticBackend: { bodyBytes: 100 }\npinning: { proxy: [0], load: [1] }\nworkers: 1\nload: { path: /, rate: 2000 }\n";

    /// `text` parsed as a comparison file, whatever this machine's CPUs
    /// (the CPU numbers are checked in `spec`'s tests).
    fn parsed(text: &str) -> Comparison {
        serde_saphyr::from_str(text).unwrap()
    }

    #[test]
    fn pinning_and_workers_place_both_sides() {
        let (proxies, load_side) = placements(&parsed(PINNED));
        assert_eq!(proxies.cpus, Some(vec![0]));
        assert_eq!(proxies.workers, Some(1));
        assert_eq!(proxies.peer_workers(), 1);
        assert_eq!(load_side.cpus, Some(vec![1]));
        let program = |p: &Placement| {
            let command = p.command("nginx");
            let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
            (command.get_program().to_owned(), args)
        };
        assert_eq!(
            program(&load_side),
            (
                "taskset".into(),
                vec!["-c".into(), "1".into(), "nginx".into()]
            )
        );

        let without = parsed(
            &PINNED
                .replace("workers: 1\n", "")
                .replace("pinning: { proxy: [0], load: [1] }\n", ""),
        );
        let (proxies, load_side) = placements(&without);
        let cores = crate::process::cores();
        assert_eq!((&proxies.cpus, proxies.workers), (&None, None));
        assert_eq!(
            proxies.peer_workers(),
            cores,
            "a worker per core, as before"
        );
        assert_eq!(program(&load_side), ("nginx".into(), Vec::new()));

        let pinned_only = parsed(
            &PINNED
                .replace("workers: 1\n", "")
                .replace("proxy: [0]", "proxy: [0, 1]"),
        );
        assert_eq!(
            placements(&pinned_only).0.peer_workers(),
            2,
            "a worker per proxy CPU"
        );
    }

    #[test]
    fn the_setup_says_where_everything_ran() {
        let comparison = parsed(PINNED);
        let plan = LoadPlan::new(&comparison.load).unwrap();
        let setup = describe_setup(&comparison, &plan);
        assert!(
            setup.contains("GET / to a static nginx backend answering 100 bytes;"),
            "{setup}"
        );
        assert!(
            setup.ends_with("; 1 worker per proxy (infermesh-proxy --concurrency 1, HAProxy nbthread 1, nginx worker_processes 1); proxies pinned to CPU 0, generator and backend to CPU 1"),
            "{setup}"
        );

        let comparison = parsed(
            "backends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{ name: mock-llm }]\nload:\n  rate: 100\n",
        );
        let plan = LoadPlan::new(&comparison.load).unwrap();
        let setup = describe_setup(&comparison, &plan);
        assert!(
            setup.ends_with(" cores shared by generator, mock and proxy"),
            "{setup}"
        );
        assert!(!setup.contains("worker"), "{setup}");
    }
}

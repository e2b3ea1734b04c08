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
//! 1. start the mock servers, in a process of their own;
//! 2. `LoadPlan::new`: resolve the load (template, path, protocol);
//! 3. `start_targets`: start every target; one that cannot start (say,
//!    nginx is not installed) is skipped, with the reason in the report;
//! 4. `measure_rounds`: round after round, visit each target in turn with
//!    a closed-loop phase (highest throughput) then an open-loop phase at
//!    the fixed rate (latency, proxy CPU, requests the backends received);
//! 5. `summarize`: each target's medians, and its proxies' peak memory
//!    while they still run; then every process is stopped;
//! 6. `describe_setup`: what was run, in words, for the report.
//!
//! # Modules
//!
//! - `spec`: the YAML file's types (the targets among them,
//!   [`TargetKind`]), defaults and [`Comparison::load`];
//! - `targets`: starting each target;
//! - `infermesh`: the infermesh targets' configs, binaries and processes;
//! - `peers`: HAProxy's and nginx's configs and processes;
//! - `supervise`: processes: starting, waiting for their port, CPU and
//!   memory, and stopping them (children too) when dropped; a target's
//!   processes and port (`Proxies`);
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
pub use spec::{Comparison, InfermeshSpec, LoadSpec, TargetKind};

use measure::LoadPlan;
use targets::Ready;

/// Runs `comparison`, printing progress on standard error. `work` is a
/// directory for generated configs and logs.
pub async fn run(comparison: &Comparison, work: &Path) -> anyhow::Result<ComparisonReport> {
    let (mock, backends) = supervise::start_mock(&comparison.backends, work)?;
    let plan = LoadPlan::new(&comparison.load)?;
    let (targets, skipped) = start_targets(comparison, &backends, work)?;
    let rounds = measure_rounds(comparison, &plan, &targets, &backends).await?;
    let summary = summarize(&targets, &rounds);
    drop(targets);
    drop(mock);
    Ok(ComparisonReport {
        rounds,
        summary,
        skipped,
        setup: describe_setup(comparison, &plan),
    })
}

/// Targets skipped, each with the reason.
type Skipped = Vec<(TargetKind, String)>;

/// Starts every target of `comparison` in front of the mock servers at
/// `backends`, in the file's order; a target that cannot start is skipped
/// with a message. An error when none started.
fn start_targets(
    comparison: &Comparison,
    backends: &[SocketAddr],
    work: &Path,
) -> anyhow::Result<(Vec<Ready>, Skipped)> {
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for kind in &comparison.targets {
        match targets::start_target(*kind, backends, &comparison.infermesh, work) {
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

/// Visits every target in turn, round after round, printing a progress
/// line per visit; returns each target's measurements, in `targets`' order.
async fn measure_rounds(
    comparison: &Comparison,
    plan: &LoadPlan<'_>,
    targets: &[Ready],
    backends: &[SocketAddr],
) -> anyhow::Result<Vec<(TargetKind, Vec<Measurement>)>> {
    let mut rounds: Vec<(TargetKind, Vec<Measurement>)> =
        targets.iter().map(|t| (t.kind, Vec::new())).collect();
    for round in 1..=comparison.rounds {
        for (target, (_, measured)) in targets.iter().zip(&mut rounds) {
            let measurement = measure::visit(target, plan, backends).await?;
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

/// Each target's medians over `rounds`, with its peak memory (so the
/// targets must still run).
fn summarize(targets: &[Ready], rounds: &[(TargetKind, Vec<Measurement>)]) -> Vec<Summary> {
    targets
        .iter()
        .zip(rounds)
        .map(|(target, (_, measured))| {
            report::summarize(
                target.kind,
                target.usage().map(|u| u.peak_rss_bytes),
                measured,
            )
        })
        .collect()
}

/// What was run, in words: the report's first line.
fn describe_setup(comparison: &Comparison, plan: &LoadPlan<'_>) -> String {
    let load = &comparison.load;
    format!(
        "{} rounds, targets in turn; {} {}; {} connections, {}; closed loop {} then open loop at {}/s for {} each after {} warm-up; {} cores shared by generator, mock and proxy",
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
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )
}

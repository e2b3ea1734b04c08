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
//! The targets `infermesh-pair` and `infermesh-mtls-pair` are two
//! infermesh-proxy processes in a row, the hops a caller's and a model's
//! sidecars make (without the iptables redirection of real interception):
//! the caller's proxy forwards over HTTP/2 to the model's, in plaintext or
//! over mutual TLS with SPIFFE identities (a CA and certificates made with
//! `infermesh-control-plane ca`). CPU and memory are those of both proxies
//! together.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::load::{self, LoadOptions, LoadReport, Protocol, RequestTemplate, Template};
use crate::mock::Scenario;
use crate::process;

/// A comparison, as written in its YAML file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Comparison {
    /// Rounds over all targets; medians are reported.
    #[serde(default = "three")]
    pub rounds: usize,
    /// The targets, in the order each round visits them.
    #[serde(default = "all_targets")]
    pub targets: Vec<TargetKind>,
    /// The mock model servers to put behind every target.
    pub backends: Scenario,
    /// The load each target gets.
    pub load: LoadSpec,
    /// How infermesh-proxy is run.
    #[serde(default)]
    pub infermesh: InfermeshSpec,
}

fn three() -> usize {
    3
}

fn all_targets() -> Vec<TargetKind> {
    vec![
        TargetKind::Direct,
        TargetKind::Infermesh,
        TargetKind::Haproxy,
        TargetKind::Nginx,
    ]
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// Straight to the first mock server: the baseline.
    Direct,
    /// infermesh-proxy in gateway mode.
    Infermesh,
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
    fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Infermesh => "infermesh",
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

/// The load of a comparison.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadSpec {
    /// Request path (ignored when a template gives one).
    #[serde(default = "root")]
    pub path: String,
    /// A built-in request (`openai-chat`, `kserve-v2`, ...).
    #[serde(default)]
    pub template: Option<String>,
    /// The model the template names.
    #[serde(default = "default_model")]
    pub model: String,
    /// Requests per second of the open-loop phase.
    pub rate: f64,
    /// Also run a closed-loop phase to find the highest throughput.
    #[serde(default = "yes")]
    pub max_throughput: bool,
    /// Connections.
    #[serde(default = "thirty_two")]
    pub connections: usize,
    /// Length of each measured phase.
    #[serde(default = "ten_seconds")]
    pub duration: infermesh_api::Duration,
    /// Warm-up before each phase.
    #[serde(default = "two_seconds")]
    pub warmup: infermesh_api::Duration,
    /// `http1` or `http2`.
    #[serde(default = "http1")]
    pub protocol: String,
}

fn root() -> String {
    "/".into()
}
fn default_model() -> String {
    "mock-llm".into()
}
fn yes() -> bool {
    true
}
fn thirty_two() -> usize {
    32
}
fn ten_seconds() -> infermesh_api::Duration {
    infermesh_api::Duration::from_secs(10)
}
fn two_seconds() -> infermesh_api::Duration {
    infermesh_api::Duration::from_secs(2)
}
fn http1() -> String {
    "http1".into()
}

/// How infermesh-proxy runs in a comparison.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InfermeshSpec {
    /// Write the access log (to a file) as a production gateway would.
    #[serde(default)]
    pub access_log: bool,
    /// The binary; default: `infermesh-proxy` next to `infermesh-bench`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// More fields of the `Backend` spec (not for `infermesh-bare`).
    #[serde(default)]
    pub backend: serde_json::Map<String, serde_json::Value>,
    /// More fields of the route rule (not for `infermesh-bare`).
    #[serde(default)]
    pub rule: serde_json::Map<String, serde_json::Value>,
    /// The rule's `hedge` block for the `infermesh-hedged` target.
    #[serde(default)]
    pub hedge: Option<serde_json::Map<String, serde_json::Value>>,
    /// The rule's `fanout` block for the `infermesh-fanout` target, which
    /// replaces the rule's backends (and `rule`).
    #[serde(default)]
    pub fanout: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One target's figures from one round.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// Requests per second in the closed-loop phase.
    pub max_rps: Option<f64>,
    /// The open-loop phase.
    pub fixed_rate: LoadReport,
    /// The proxy's CPU seconds per request during the open-loop phase.
    pub cpu_seconds_per_request: Option<f64>,
    /// Requests the mock servers received per request sent during the
    /// open-loop phase: above 1 by the retries, hedges or mirrored copies.
    pub upstream_requests_per_request: Option<f64>,
}

/// One target's medians over the rounds.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The target.
    pub target: TargetKind,
    /// Median closed-loop requests per second.
    pub max_rps: Option<f64>,
    /// Median latency percentiles at the fixed rate, in seconds.
    pub p50: f64,
    /// p99.
    pub p99: f64,
    /// p99.9.
    pub p999: f64,
    /// Median proxy CPU microseconds per request.
    pub cpu_micros_per_request: Option<f64>,
    /// Median requests the backends received per request.
    pub upstream_requests_per_request: Option<f64>,
    /// Peak resident memory of the proxy, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Failed requests over all rounds.
    pub failed: u64,
}

/// Everything a comparison measured.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComparisonReport {
    /// Per target, every round.
    pub rounds: Vec<(TargetKind, Vec<Measurement>)>,
    /// Per target, the medians.
    pub summary: Vec<Summary>,
    /// Targets skipped, and why.
    pub skipped: Vec<(TargetKind, String)>,
    /// What was run, in words.
    pub setup: String,
}

impl Comparison {
    /// Reads a comparison file.
    pub fn load(path: &Path) -> anyhow::Result<Comparison> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let comparison: Comparison = serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        comparison
            .backends
            .check()
            .map_err(|e| anyhow::anyhow!("{}: backends.{e}", path.display()))?;
        anyhow::ensure!(
            comparison.rounds > 0,
            "{}: rounds must be at least 1",
            path.display()
        );
        anyhow::ensure!(
            !comparison.targets.is_empty(),
            "{}: give at least one target",
            path.display()
        );
        Ok(comparison)
    }
}

/// A process this comparison started; killed when dropped.
struct Started {
    child: Child,
    name: &'static str,
}

impl Drop for Started {
    /// Asks the process to stop (SIGTERM: nginx's master then stops its
    /// workers), then kills whatever of its tree is left, so no worker
    /// outlives the comparison.
    fn drop(&mut self) {
        let pid = self.child.id();
        let tree = process::descendants(pid);
        let _ = signal(pid, Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_)))
                && tree.iter().all(|p| !process::alive(*p))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in tree {
            let _ = signal(p, Signal::SIGKILL);
        }
    }
}

fn signal(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
}

/// A target ready to take load.
struct Ready {
    kind: TargetKind,
    url: String,
    /// The proxy processes, whose CPU and memory are measured.
    processes: Vec<Started>,
}

impl Ready {
    /// CPU seconds and peak memory of every proxy process (and its
    /// children), added up; `None` without any.
    fn usage(&self) -> Option<process::Usage> {
        let mut total: Option<process::Usage> = None;
        for started in &self.processes {
            let usage = process::tree(started.child.id()).ok()?;
            total = Some(match total {
                None => usage,
                Some(t) => process::Usage {
                    cpu_seconds: t.cpu_seconds + usage.cpu_seconds,
                    rss_bytes: t.rss_bytes + usage.rss_bytes,
                    peak_rss_bytes: t.peak_rss_bytes + usage.peak_rss_bytes,
                },
            });
        }
        total
    }
}

/// Runs `comparison`, printing progress on standard error. `work` is a
/// directory for generated configs and logs.
pub async fn run(comparison: &Comparison, work: &Path) -> anyhow::Result<ComparisonReport> {
    let (mock, backends) = start_mock(&comparison.backends, work)?;
    let load = &comparison.load;
    let template = match &load.template {
        None => None,
        Some(name) => Some(
            <Template as clap::ValueEnum>::from_str(name, true)
                .map_err(|_| anyhow::anyhow!("load.template: unknown template {name:?}"))?,
        ),
    };
    let path = template.map_or_else(|| load.path.clone(), |t| t.path(&load.model));
    let request = template.map_or_else(RequestTemplate::default, |t| t.request(&load.model));
    let protocol = match load.protocol.as_str() {
        "http1" => Protocol::Http1,
        "http2" => Protocol::Http2,
        other => anyhow::bail!("load.protocol: {other:?} is neither http1 nor http2"),
    };

    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for kind in &comparison.targets {
        match start_target(*kind, &backends, &comparison.infermesh, work) {
            Ok(ready) => targets.push(ready),
            Err(why) => {
                eprintln!("skipping {}: {why:#}", kind.name());
                skipped.push((*kind, format!("{why:#}")));
            }
        }
    }
    anyhow::ensure!(!targets.is_empty(), "no target could be started");

    let options = |url: String, rate: Option<f64>, label: &str| {
        let mut o = LoadOptions::new(&url);
        o.rate = rate;
        o.connections = load.connections;
        o.duration = load.duration.get();
        o.warmup = load.warmup.get();
        o.protocol = protocol;
        o.request = request.clone();
        o.label = Some(label.to_owned());
        o
    };
    let mut rounds: Vec<(TargetKind, Vec<Measurement>)> =
        targets.iter().map(|t| (t.kind, Vec::new())).collect();
    for round in 1..=comparison.rounds {
        for (i, target) in targets.iter().enumerate() {
            let url = format!("{}{path}", target.url);
            let max_rps = if load.max_throughput {
                let report = load::run(options(url.clone(), None, target.kind.name())).await?;
                Some(report.achieved_rate)
            } else {
                None
            };
            let before = target.usage();
            let sent_before = mock_requests(&backends).await;
            let fixed = load::run(options(url, Some(load.rate), target.kind.name())).await?;
            let after = target.usage();
            let sent_after = mock_requests(&backends).await;
            // The open loop sends its warm-up on the same schedule (request
            // n due at n / rate), and the backends see those too.
            let sent = fixed.requests as f64 + (load.rate * fixed.warmup_seconds).floor();
            let upstream_per_request = match (sent_before, sent_after) {
                (Some(b), Some(a)) if sent > 0.0 => Some((a - b) / sent),
                _ => None,
            };
            let cpu = match (before, after) {
                (Some(b), Some(a)) if fixed.requests > 0 => {
                    Some((a.cpu_seconds - b.cpu_seconds) / fixed.requests as f64)
                }
                _ => None,
            };
            eprintln!(
                "round {round}/{} {:>10}: {} max; at {}/s p50 {} p99 {} ({} failed){}",
                comparison.rounds,
                target.kind.name(),
                max_rps.map_or("-".into(), |r| format!("{r:.0} req/s")),
                load.rate,
                load::ms(fixed.latency.p50),
                load::ms(fixed.latency.p99),
                fixed.errors.total(),
                cpu.map_or(String::new(), |c| format!(
                    "; proxy CPU {:.1} µs/req",
                    c * 1e6
                )),
            );
            rounds[i].1.push(Measurement {
                max_rps,
                fixed_rate: fixed,
                cpu_seconds_per_request: cpu,
                upstream_requests_per_request: upstream_per_request,
            });
        }
    }
    let summary = targets
        .iter()
        .zip(&rounds)
        .map(|(target, (_, measured))| summarize(target, measured))
        .collect();
    drop(targets);
    drop(mock);
    let setup = format!(
        "{} rounds, targets in turn; {} {path}; {} connections, {}; closed loop {} then open loop at {}/s for {} each after {} warm-up; {} cores shared by generator, mock and proxy",
        comparison.rounds,
        request.method,
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
    );
    Ok(ComparisonReport {
        rounds,
        summary,
        skipped,
        setup,
    })
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn summarize(target: &Ready, measured: &[Measurement]) -> Summary {
    let of =
        |f: &dyn Fn(&Measurement) -> Option<f64>| median(measured.iter().filter_map(f).collect());
    Summary {
        target: target.kind,
        max_rps: of(&|m| m.max_rps),
        p50: of(&|m| Some(m.fixed_rate.latency.p50)).unwrap_or_default(),
        p99: of(&|m| Some(m.fixed_rate.latency.p99)).unwrap_or_default(),
        p999: of(&|m| Some(m.fixed_rate.latency.p999)).unwrap_or_default(),
        cpu_micros_per_request: of(&|m| m.cpu_seconds_per_request.map(|c| c * 1e6)),
        upstream_requests_per_request: of(&|m| m.upstream_requests_per_request),
        peak_rss_bytes: target.usage().map(|u| u.peak_rss_bytes),
        failed: measured.iter().map(|m| m.fixed_rate.errors.total()).sum(),
    }
}

impl ComparisonReport {
    /// The medians as a Markdown table, with ratios to the direct target.
    pub fn markdown(&self) -> String {
        let direct = self.summary.iter().find(|s| s.target == TargetKind::Direct);
        let mut out = format!("{}.\n\n", self.setup);
        out.push_str("| target | max req/s | vs direct | p50 ms | added p50 ms | p99 ms | added p99 ms | p99.9 ms | added p99.9 ms | proxy CPU µs/req | proxy peak RSS MiB | backend req/req | failed |\n");
        out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        let f =
            |v: Option<f64>, digits: usize| v.map_or("—".to_owned(), |v| format!("{v:.digits$}"));
        for s in &self.summary {
            let ratio = match (s.max_rps, direct.and_then(|d| d.max_rps)) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let added =
                |mine: f64, theirs: fn(&Summary) -> f64| direct.map(|d| (mine - theirs(d)) * 1e3);
            out.push_str(&format!(
                "| {} | {} | {} | {:.3} | {} | {:.3} | {} | {:.3} | {} | {} | {} | {} | {} |\n",
                s.target.name(),
                f(s.max_rps, 0),
                f(ratio, 2),
                s.p50 * 1e3,
                f(added(s.p50, |d| d.p50), 3),
                s.p99 * 1e3,
                f(added(s.p99, |d| d.p99), 3),
                s.p999 * 1e3,
                f(added(s.p999, |d| d.p999), 3),
                f(s.cpu_micros_per_request, 1),
                f(s.peak_rss_bytes.map(|b| b as f64 / 1_048_576.0), 1),
                f(s.upstream_requests_per_request, 4),
                s.failed,
            ));
        }
        for (kind, why) in &self.skipped {
            out.push_str(&format!("\n{} skipped: {why}\n", kind.name()));
        }
        out
    }

    /// The fixed-rate latency curve of each target (its median round by
    /// p99) on one chart.
    pub fn chart(&self, path: &Path) -> anyhow::Result<()> {
        let picked: Vec<&LoadReport> = self
            .rounds
            .iter()
            .filter_map(|(_, measured)| {
                let mut by_p99: Vec<&LoadReport> = measured.iter().map(|m| &m.fixed_rate).collect();
                by_p99.sort_by(|a, b| a.latency.p99.total_cmp(&b.latency.p99));
                by_p99.get(by_p99.len() / 2).copied()
            })
            .collect();
        let series: Vec<crate::plot::Series<'_>> = picked
            .iter()
            .map(|r| crate::plot::Series {
                label: &r.label,
                points: &r.spectrum,
            })
            .collect();
        crate::plot::percentile_chart(
            path,
            "latency at a fixed rate (corrected for coordinated omission)",
            &series,
        )
    }
}

/// Requests the mock servers at `backends` received so far, from their
/// `/metrics` pages (`infermesh_mock_requests_total`); `None` when a page
/// cannot be read.
async fn mock_requests(backends: &[SocketAddr]) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut total = 0.0;
    for backend in backends {
        let mut stream = tokio::net::TcpStream::connect(backend).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .ok()?;
        let mut page = String::new();
        stream.read_to_string(&mut page).await.ok()?;
        total += page
            .lines()
            .filter(|l| l.starts_with("infermesh_mock_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Some(total)
}

/// Starts the mock servers as their own process, so that they do not share
/// the generator's threads, and returns their addresses.
fn start_mock(scenario: &Scenario, work: &Path) -> anyhow::Result<(Started, Vec<SocketAddr>)> {
    let file = work.join("backends.yaml");
    std::fs::write(
        &file,
        serde_saphyr::to_string(scenario).context("cannot write the mock scenario")?,
    )?;
    let exe = std::env::current_exe().context("cannot find infermesh-bench itself")?;
    let mut child = Command::new(exe)
        .args(["serve", "--scenario"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the mock model servers")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let started = Started {
        child,
        name: "mock",
    };
    let mut addrs = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("mock model server listening on ") {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            addrs.push(
                addr.parse()
                    .with_context(|| format!("unexpected line from the mock: {line}"))?,
            );
            if addrs.len() == scenario.servers.len() {
                break;
            }
        }
    }
    anyhow::ensure!(
        addrs.len() == scenario.servers.len(),
        "the {} exited before listening",
        started.name
    );
    Ok((started, addrs))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "{what} exited ({status}) before listening; see its log in the work directory"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("{what} did not listen on 127.0.0.1:{port} within 10 s")
}

fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn log_file(work: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(work.join(format!("{name}.log")))
        .with_context(|| format!("cannot create the {name} log"))
}

/// How one infermesh-proxy process of a target is set up.
struct Hop<'a> {
    /// Where it forwards.
    upstream: &'a [SocketAddr],
    /// Its listener requires mutual TLS.
    tls_listener: bool,
    /// It speaks HTTP/2 with mutual TLS to the upstream, which must
    /// present this SPIFFE ID.
    upstream_identity: Option<&'a str>,
    /// It speaks HTTP/2 to the upstream (another proxy).
    upstream_http2: bool,
}

impl<'a> Hop<'a> {
    /// A proxy in front of `upstream`, the mock servers.
    fn to(upstream: &'a [SocketAddr]) -> Self {
        Hop {
            upstream,
            tls_listener: false,
            upstream_identity: None,
            upstream_http2: false,
        }
    }
}

/// The config of one infermesh-proxy process of a target, as JSON
/// documents (which are YAML too).
fn infermesh_config(
    kind: TargetKind,
    port: u16,
    hop: &Hop<'_>,
    infermesh: &InfermeshSpec,
) -> String {
    use serde_json::{Value, json};
    let endpoints: Vec<Value> = hop
        .upstream
        .iter()
        .map(|b| json!({ "address": b.to_string() }))
        .collect();
    let mut backend = json!({ "endpoints": endpoints });
    if hop.upstream_http2 {
        backend["protocol"] = json!("http2");
    }
    if let Some(identity) = hop.upstream_identity {
        backend["tls"] = json!({ "identity": identity });
    }
    let mut rule = json!({ "backends": [{ "name": "mock" }] });
    let (more_backend, more_rule) = match kind {
        TargetKind::InfermeshBare => (
            json!({
                "loadBalancer": { "policy": "roundRobin" },
                "outlierDetection": { "consecutiveFailures": 0 },
            }),
            json!({ "retry": { "maxRetries": 0 } }),
        ),
        TargetKind::InfermeshHedged => {
            let mut rule = infermesh.rule.clone();
            rule.insert(
                "hedge".to_owned(),
                Value::Object(infermesh.hedge.clone().unwrap_or_default()),
            );
            (
                Value::Object(infermesh.backend.clone()),
                Value::Object(rule),
            )
        }
        TargetKind::InfermeshFanout => {
            rule = json!({ "fanout": infermesh.fanout.clone().unwrap_or_default() });
            (Value::Object(infermesh.backend.clone()), json!({}))
        }
        _ => (
            Value::Object(infermesh.backend.clone()),
            Value::Object(infermesh.rule.clone()),
        ),
    };
    for (target, more) in [(&mut backend, more_backend), (&mut rule, more_rule)] {
        if let (Value::Object(target), Value::Object(more)) = (target, more) {
            target.extend(more);
        }
    }
    let mut listener = json!({ "address": format!("127.0.0.1:{port}") });
    if hop.tls_listener {
        listener["tls"] = json!({ "mode": "strict" });
    }
    let documents = [
        json!({ "kind": "Listener", "metadata": { "name": "bench" }, "spec": listener }),
        json!({ "kind": "Backend", "metadata": { "name": "mock" }, "spec": backend }),
        json!({ "kind": "Route", "metadata": { "name": "all" }, "spec": { "rules": [rule] } }),
    ];
    documents
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d["apiVersion"] = json!(infermesh_api::API_VERSION);
            format!("---\n{d}\n")
        })
        .collect()
}

/// A workspace binary next to `infermesh-bench` (or `configured`).
fn sibling_binary(name: &str, configured: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let binary = match configured {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name(name),
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} not found (build it with cargo build --release, or set infermesh.binary)",
        binary.display()
    );
    Ok(binary)
}

/// The SPIFFE IDs of the mTLS pair.
const CALLER_IDENTITY: &str = "spiffe://bench.local/ns/bench/sa/caller";
const MODEL_IDENTITY: &str = "spiffe://bench.local/ns/bench/sa/model";

/// A CA and the certificates of both proxies of the mTLS pair, made with
/// `infermesh-control-plane ca`; returns the identity flags of each.
fn pair_identities(work: &Path) -> anyhow::Result<[Vec<String>; 2]> {
    let control_plane = sibling_binary("infermesh-control-plane", None)?;
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new(&control_plane).args(args).output()?;
        anyhow::ensure!(
            output.status.success(),
            "infermesh-control-plane {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    let dir = work.join("identities");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    run(&[
        "ca",
        "init",
        "--trust-domain",
        "bench.local",
        "--out",
        &path("ca"),
        "--force",
    ])?;
    let mut flags = Vec::new();
    for (identity, name) in [(CALLER_IDENTITY, "caller"), (MODEL_IDENTITY, "model")] {
        run(&[
            "ca",
            "issue",
            "--ca",
            &path("ca"),
            "--identity",
            identity,
            "--out",
            &path(name),
            "--force",
        ])?;
        let file = |f: &str| dir.join(name).join(f).to_string_lossy().into_owned();
        flags.push(vec![
            "--identity-cert".to_owned(),
            file("cert.pem"),
            "--identity-key".to_owned(),
            file("key.pem"),
            "--trust-bundle".to_owned(),
            file("bundle.pem"),
        ]);
    }
    let [caller, model]: [Vec<String>; 2] = flags.try_into().expect("two identities");
    Ok([caller, model])
}

/// Starts one infermesh-proxy process of target `kind` as `hop`, named
/// `name` (its config and log files), with more `args`.
fn start_infermesh(
    kind: TargetKind,
    name: &'static str,
    hop: &Hop<'_>,
    args: &[String],
    infermesh: &InfermeshSpec,
    work: &Path,
) -> anyhow::Result<(Started, u16)> {
    let binary = sibling_binary("infermesh-proxy", infermesh.binary.as_ref())?;
    let port = free_port()?;
    let file = work.join(format!("{name}.yaml"));
    std::fs::write(&file, infermesh_config(kind, port, hop, infermesh))?;
    let filter = if infermesh.access_log {
        "info"
    } else {
        "info,infermesh::access=off"
    };
    let mut command = Command::new(&binary);
    command
        .args([
            "--log-format",
            "json",
            "--log-level",
            filter,
            "gateway",
            "--config",
        ])
        .arg(&file)
        .args([
            "--admin-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ])
        .args(args);
    Ok((spawn(name, "infermesh-proxy", port, command, work)?, port))
}

/// Starts `command` (the `program` listening on `port`), logging to the
/// file `name`, and waits until it listens.
fn spawn(
    name: &str,
    program: &'static str,
    port: u16,
    mut command: Command,
    work: &Path,
) -> anyhow::Result<Started> {
    let log = log_file(work, name)?;
    let mut child = command
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    wait_for_port(port, program, &mut child)?;
    Ok(Started {
        child,
        name: program,
    })
}

fn start_target(
    kind: TargetKind,
    backends: &[SocketAddr],
    infermesh: &InfermeshSpec,
    work: &Path,
) -> anyhow::Result<Ready> {
    let ready = |port: u16, processes: Vec<Started>| Ready {
        kind,
        url: format!("http://127.0.0.1:{port}"),
        processes,
    };
    match kind {
        TargetKind::Direct => Ok(Ready {
            kind,
            url: format!("http://{}", backends[0]),
            processes: Vec::new(),
        }),
        TargetKind::InfermeshHedged if infermesh.hedge.is_none() => {
            anyhow::bail!("give the hedge settings in infermesh.hedge, e.g. {{ percentile: 95 }}")
        }
        TargetKind::InfermeshFanout if infermesh.fanout.is_none() => {
            anyhow::bail!(
                "give the fan-out in infermesh.fanout, e.g. {{ strategy: all, branches: [...] }}"
            )
        }
        TargetKind::Infermesh
        | TargetKind::InfermeshBare
        | TargetKind::InfermeshHedged
        | TargetKind::InfermeshFanout => {
            let hop = Hop::to(backends);
            let (started, port) = start_infermesh(kind, kind.name(), &hop, &[], infermesh, work)?;
            Ok(ready(port, vec![started]))
        }
        TargetKind::InfermeshPair | TargetKind::InfermeshMtlsPair => {
            let mtls = kind == TargetKind::InfermeshMtlsPair;
            let [caller_flags, model_flags] = if mtls {
                pair_identities(work)?
            } else {
                [Vec::new(), Vec::new()]
            };
            let model_hop = Hop {
                tls_listener: mtls,
                ..Hop::to(backends)
            };
            let (model, model_port) = start_infermesh(
                kind,
                "pair-model",
                &model_hop,
                &model_flags,
                infermesh,
                work,
            )?;
            let model_address = [SocketAddr::from(([127, 0, 0, 1], model_port))];
            let caller_hop = Hop {
                upstream: &model_address,
                tls_listener: false,
                upstream_identity: mtls.then_some(MODEL_IDENTITY),
                upstream_http2: true,
            };
            let (caller, port) = start_infermesh(
                kind,
                "pair-caller",
                &caller_hop,
                &caller_flags,
                infermesh,
                work,
            )?;
            Ok(ready(port, vec![caller, model]))
        }
        TargetKind::Haproxy => {
            anyhow::ensure!(
                installed("haproxy"),
                "haproxy is not installed (apt install haproxy)"
            );
            let port = free_port()?;
            let servers: String = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("    server mock{i} {b}\n"))
                .collect();
            let config = format!(
                "global\n    maxconn 4096\n    nbthread {}\ndefaults\n    mode http\n    option http-keep-alive\n    timeout connect 5s\n    timeout client 300s\n    timeout server 300s\nfrontend bench\n    bind 127.0.0.1:{port}\n    default_backend mock\nbackend mock\n    balance roundrobin\n{servers}",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
            let file = work.join("haproxy.cfg");
            std::fs::write(&file, config)?;
            let mut command = Command::new("haproxy");
            command.args(["-db", "-f"]).arg(&file);
            Ok(ready(
                port,
                vec![spawn(kind.name(), "haproxy", port, command, work)?],
            ))
        }
        TargetKind::Nginx => {
            anyhow::ensure!(
                installed("nginx"),
                "nginx is not installed (apt install nginx-light)"
            );
            let port = free_port()?;
            let servers: String = backends
                .iter()
                .map(|b| format!("        server {b};\n"))
                .collect();
            let config = format!(
                "daemon off;\nworker_processes {};\npid {}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {work}/body;\n    proxy_temp_path {work}/proxy;\n    upstream mock {{\n{servers}        keepalive 64;\n    }}\n    server {{\n        listen 127.0.0.1:{port};\n        location / {{\n            proxy_pass http://mock;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_buffering off;\n        }}\n    }}\n}}\n",
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                work.display(),
                work = work.display(),
            );
            let file = work.join("nginx.conf");
            std::fs::write(&file, config)?;
            let mut command = Command::new("nginx");
            command.arg("-c").arg(&file).arg("-p").arg(work);
            Ok(ready(
                port,
                vec![spawn(kind.name(), "nginx", port, command, work)?],
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn infermesh_targets_get_a_valid_config_with_their_settings() {
        let spec: InfermeshSpec = serde_saphyr::from_str(
            "backend: { circuitBreaker: { maxRequests: 7 } }\nrule: { retry: { nonIdempotent: true } }\nfanout: { strategy: all, branches: [{ name: a, backend: mock, model: m-5 }, { name: b, backend: mock, model: m-20 }] }",
        )
        .unwrap();
        let backends = ["127.0.0.1:9000".parse().unwrap()];
        let load = |kind| {
            let text = infermesh_config(kind, 8080, &Hop::to(&backends), &spec);
            infermesh_api::Config::load(&[infermesh_api::Source {
                name: "bench.yaml",
                text: &text,
            }])
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
        };
        let full = load(TargetKind::Infermesh);
        let backend = &full.backend("mock").unwrap().spec;
        assert_eq!(backend.circuit_breaker.max_requests, 7);
        assert!(
            full.route("all").unwrap().spec.rules[0]
                .retry
                .non_idempotent
        );

        let bare = load(TargetKind::InfermeshBare);
        let backend = &bare.backend("mock").unwrap().spec;
        assert_eq!(
            backend.circuit_breaker.max_requests, 1024,
            "settings are not for bare"
        );
        assert_eq!(backend.outlier_detection.consecutive_failures, 0);
        assert_eq!(
            bare.route("all").unwrap().spec.rules[0].retry.max_retries,
            0
        );

        let fanout = load(TargetKind::InfermeshFanout);
        let rule = &fanout.route("all").unwrap().spec.rules[0];
        assert!(rule.backends.is_empty());
        let branches = &rule.fanout.as_ref().unwrap().branches;
        assert_eq!(branches[1].model.as_deref(), Some("m-20"));
    }

    /// The validated config of one proxy of the mTLS pair.
    fn pair_config(hop: &Hop<'_>) -> infermesh_api::Config {
        let text = infermesh_config(
            TargetKind::InfermeshMtlsPair,
            8080,
            hop,
            &InfermeshSpec::default(),
        );
        infermesh_api::Config::load(&[infermesh_api::Source {
            name: "bench.yaml",
            text: &text,
        }])
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_caller_of_an_mtls_pair_expects_the_models_identity_over_http2() {
        let model = ["127.0.0.1:9001".parse().unwrap()];
        let hop = Hop {
            upstream: &model,
            tls_listener: false,
            upstream_identity: Some(MODEL_IDENTITY),
            upstream_http2: true,
        };
        let config = pair_config(&hop);
        let backend = &config.backend("mock").unwrap().spec;
        assert_eq!(backend.tls.as_ref().unwrap().identity, MODEL_IDENTITY);
        assert_eq!(backend.protocol, infermesh_api::UpstreamProtocol::Http2);

        let model_side = Hop {
            tls_listener: true,
            ..Hop::to(&model)
        };
        let config = pair_config(&model_side);
        assert_eq!(
            config
                .listener("bench")
                .unwrap()
                .spec
                .tls
                .as_ref()
                .unwrap()
                .mode,
            infermesh_api::TlsMode::Strict
        );
    }

    #[test]
    fn the_documented_file_parses() {
        let text = r#"
rounds: 3
targets: [direct, infermesh, haproxy, nginx]
backends:
  servers:
    - listen: 127.0.0.1:0
      models: [{ name: mock-llm }]
load:
  path: /v1/models
  rate: 2000
  maxThroughput: true
  connections: 32
  duration: 10s
  warmup: 2s
infermesh:
  accessLog: false
"#;
        let c: Comparison = serde_saphyr::from_str(text).unwrap();
        assert_eq!(c.targets.len(), 4);
        assert_eq!(c.load.duration, infermesh_api::Duration::from_secs(10));
        assert_eq!(c.load.protocol, "http1");
    }
}

//! The YAML file of a comparison: its types, the defaults of the fields
//! left out, and `Comparison::load`, which reads a file and checks it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::mock::Scenario;

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
    /// The mock model servers to put behind every target; give this or
    /// `static_backend`, not both.
    #[serde(default)]
    pub backends: Option<Scenario>,
    /// nginx answering every request with the same body, behind every
    /// target instead of the mock servers: a backend that costs as little
    /// as it can, so that what is measured is the proxies' own cost.
    #[serde(default)]
    pub static_backend: Option<StaticBackend>,
    /// The load each target gets.
    pub load: LoadSpec,
    /// How infermesh-proxy is run.
    #[serde(default)]
    pub infermesh: InfermeshSpec,
    /// Worker threads or processes of every proxy (infermesh-proxy's
    /// `--concurrency`, HAProxy's `nbthread`, nginx's `worker_processes`),
    /// so that proxies built differently are compared at the same width;
    /// default: each proxy's own (HAProxy and nginx a worker per core the
    /// proxies may use).
    #[serde(default)]
    pub workers: Option<usize>,
    /// The CPUs the proxies run on and those the load generator and the
    /// backends run on, kept apart so that neither side takes the other's
    /// cores; default: unpinned, everything shares the machine.
    #[serde(default)]
    pub pinning: Option<Pinning>,
}

/// The backend of a comparison, as checked by `Comparison::backend`: one of
/// `backends` and `staticBackend`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Backend<'a> {
    /// The mock model servers of `backends`.
    Mock(&'a Scenario),
    /// nginx with a fixed answer, `staticBackend`.
    Static(&'a StaticBackend),
}

/// A backend of nginx answering every request at once with status 200 and
/// the same body, so that a comparison measures the proxies and not a
/// backend's work.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticBackend {
    /// The size of every answer's body, in bytes.
    pub body_bytes: usize,
}

/// The longest body a static backend answers with: nginx refuses a config
/// string (its `return` text) above 4094 bytes, and 4000 is a round figure
/// below that.
pub(super) const MAX_STATIC_BODY_BYTES: usize = 4000;

/// Which CPUs the two sides of a comparison run on, by CPU number (as
/// `taskset -c` and `/proc/cpuinfo` count them).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pinning {
    /// The CPUs every target process runs on (and its children, such as
    /// nginx's workers).
    pub proxy: Vec<usize>,
    /// The CPUs the load generator (the `infermesh-bench` process itself)
    /// and the backends run on.
    pub load: Vec<usize>,
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
    /// Another build of infermesh-proxy, which the `infermesh-baseline`
    /// target runs with the `infermesh` target's config, to measure two
    /// builds side by side. A relative path is taken from the current
    /// directory; `Comparison::load` makes it absolute.
    #[serde(default)]
    pub baseline_binary: Option<PathBuf>,
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
    /// The share of new traces the `infermesh-traced-sampled` target
    /// records, 0 to 1; default 0.01 (1 %).
    #[serde(default)]
    pub trace_sampling: Option<f64>,
}

/// The `infermesh-traced-sampled` target's sampling ratio when
/// `infermesh.traceSampling` is not given: 1 % of the traces.
pub(super) const DEFAULT_TRACE_SAMPLING: f64 = 0.01;

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
    /// The `infermesh` target tracing every request, exporting over
    /// OTLP/HTTP to the first mock server's `/v1/traces`.
    InfermeshTraced,
    /// The `infermesh-traced` target recording only a share of the
    /// traces, `infermesh.traceSampling` (default 1 %).
    InfermeshTracedSampled,
    /// The `infermesh` target with the access log on, in the JSON format.
    InfermeshJsonLog,
    /// The `infermesh` target with the access log on, in Elastic Common
    /// Schema JSON.
    InfermeshEcs,
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
            TargetKind::InfermeshTraced => "infermesh-traced",
            TargetKind::InfermeshTracedSampled => "infermesh-traced-sampled",
            TargetKind::InfermeshJsonLog => "infermesh-json-log",
            TargetKind::InfermeshEcs => "infermesh-ecs",
            TargetKind::InfermeshPair => "infermesh-pair",
            TargetKind::InfermeshMtlsPair => "infermesh-mtls-pair",
            TargetKind::Haproxy => "haproxy",
            TargetKind::Nginx => "nginx",
        }
    }
}

impl Comparison {
    /// Reads a comparison file and checks it: at least one round and one
    /// target, exactly one backend (mock servers that can run, or a static
    /// answer nginx can hold), at least one worker, CPUs that exist, and,
    /// when the target
    /// `infermesh-baseline` is listed, an `infermesh.baselineBinary` that
    /// is a file (its path made absolute against the current directory).
    pub fn load(path: &Path) -> anyhow::Result<Comparison> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let in_file = |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}", path.display());
        let mut comparison = Comparison::parse(&text).map_err(in_file)?;
        if let Some(pinning) = &comparison.pinning {
            pinning.check_cpus(&allowed_cpus()).map_err(in_file)?;
        }
        comparison.resolve_baseline_binary().map_err(in_file)?;
        Ok(comparison)
    }

    /// Parses the text of a comparison file and checks what can be checked
    /// without looking at other files or at this machine (its CPUs).
    fn parse(text: &str) -> anyhow::Result<Comparison> {
        let comparison: Comparison =
            serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        match comparison.backend()? {
            Backend::Mock(scenario) => scenario
                .check()
                .map_err(|e| anyhow::anyhow!("backends.{e}"))?,
            Backend::Static(answer) => anyhow::ensure!(
                answer.body_bytes <= MAX_STATIC_BODY_BYTES,
                "staticBackend.bodyBytes: {} is above {MAX_STATIC_BODY_BYTES}, the longest body nginx's config can hold",
                answer.body_bytes
            ),
        }
        anyhow::ensure!(comparison.rounds > 0, "rounds must be at least 1");
        anyhow::ensure!(comparison.workers != Some(0), "workers must be at least 1");
        if let Some(pinning) = &comparison.pinning {
            pinning.check_lists()?;
        }
        anyhow::ensure!(!comparison.targets.is_empty(), "give at least one target");
        if let Some(ratio) = comparison.infermesh.trace_sampling {
            anyhow::ensure!(
                (0.0..=1.0).contains(&ratio),
                "infermesh.traceSampling: {ratio} is not a ratio between 0 and 1"
            );
        }
        Ok(comparison)
    }

    /// The backend behind every target: the mock servers of `backends` or
    /// the nginx of `staticBackend`; an error naming both fields unless
    /// exactly one is given.
    pub(super) fn backend(&self) -> anyhow::Result<Backend<'_>> {
        match (&self.backends, &self.static_backend) {
            (Some(scenario), None) => Ok(Backend::Mock(scenario)),
            (None, Some(answer)) => Ok(Backend::Static(answer)),
            (Some(_), Some(_)) => anyhow::bail!(
                "give backends or staticBackend, not both: one backend stands behind every target"
            ),
            (None, None) => anyhow::bail!(
                "give backends (mock model servers) or staticBackend (nginx with a fixed answer)"
            ),
        }
    }

    /// When the target `infermesh-baseline` is listed, checks its binary
    /// and makes its path absolute, so the run does not depend on where it
    /// is started from.
    fn resolve_baseline_binary(&mut self) -> anyhow::Result<()> {
        if self.targets.contains(&TargetKind::InfermeshBaseline) {
            self.infermesh.baseline_binary = Some(self.infermesh.baseline_binary()?);
        }
        Ok(())
    }
}

/// The CPUs this process may run on, by number: the set `taskset` and
/// `sched_setaffinity` accept (a container may be given CPUs 4-7, or a
/// quota without fewer CPU numbers). Empty when it cannot be read.
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

impl Pinning {
    /// That both lists name at least one CPU; an error names the list.
    fn check_lists(&self) -> anyhow::Result<()> {
        for (field, list) in self.lists() {
            anyhow::ensure!(!list.is_empty(), "pinning.{field}: give at least one CPU");
        }
        Ok(())
    }

    /// That every CPU of both lists is one of `allowed`, the CPUs this
    /// process may run on; an error names the list and the CPU.
    fn check_cpus(&self, allowed: &[usize]) -> anyhow::Result<()> {
        for (field, list) in self.lists() {
            if let Some(cpu) = list.iter().find(|cpu| !allowed.contains(cpu)) {
                anyhow::bail!(
                    "pinning.{field}: CPU {cpu} is not one this process may run on (allowed: {})",
                    crate::compare::supervise::cpu_list(allowed)
                );
            }
        }
        Ok(())
    }

    /// Both lists, each with its field's name.
    fn lists(&self) -> [(&'static str, &[usize]); 2] {
        [("proxy", &self.proxy), ("load", &self.load)]
    }
}

impl InfermeshSpec {
    /// The `infermesh-traced-sampled` target's sampling ratio.
    pub(super) fn trace_sampling(&self) -> f64 {
        self.trace_sampling.unwrap_or(DEFAULT_TRACE_SAMPLING)
    }

    /// The binary of the `infermesh-baseline` target, absolute (a relative
    /// `infermesh.baselineBinary` is taken from the current directory); an
    /// error naming that field when it is not given or is not a file.
    pub(super) fn baseline_binary(&self) -> anyhow::Result<PathBuf> {
        let given = self.baseline_binary.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "infermesh.baselineBinary is missing: the target infermesh-baseline runs the infermesh-proxy build it names, e.g. baselineBinary: target/baseline/infermesh-proxy"
            )
        })?;
        let binary = std::path::absolute(given).with_context(|| {
            format!(
                "infermesh.baselineBinary: cannot make {} absolute",
                given.display()
            )
        })?;
        anyhow::ensure!(
            binary.exists(),
            "infermesh.baselineBinary: {} does not exist",
            binary.display()
        );
        anyhow::ensure!(
            binary.is_file(),
            "infermesh.baselineBinary: {} is not a file",
            binary.display()
        );
        Ok(binary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn every_scenario_in_the_repository_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut read = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                Comparison::parse(&text).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                read += 1;
            }
        }
        assert!(read > 0, "no scenario in {}", dir.display());
    }

    /// A comparison of `targets` whose `infermesh` block is `infermesh`.
    fn comparison(targets: &str, infermesh: &str) -> Comparison {
        Comparison::parse(&format!(
            "targets: {targets}\nbackends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{{ name: mock-llm }}]\nload:\n  rate: 100\ninfermesh: {infermesh}\n"
        ))
        .unwrap()
    }

    #[test]
    fn the_baseline_binary_is_checked_only_when_its_target_is_listed() {
        let mut c = comparison("[direct, infermesh]", "{}");
        c.resolve_baseline_binary().unwrap();
        assert_eq!(c.infermesh.baseline_binary, None);

        let mut c = comparison("[infermesh, infermesh-baseline]", "{}");
        let error = format!("{:#}", c.resolve_baseline_binary().unwrap_err());
        assert!(
            error.contains("infermesh.baselineBinary is missing"),
            "{error}"
        );

        let mut c = comparison(
            "[infermesh, infermesh-baseline]",
            "{ baselineBinary: no/such/infermesh-proxy }",
        );
        let error = format!("{:#}", c.resolve_baseline_binary().unwrap_err());
        let expected = std::env::current_dir()
            .unwrap()
            .join("no/such/infermesh-proxy");
        assert_eq!(
            error,
            format!(
                "infermesh.baselineBinary: {} does not exist",
                expected.display()
            )
        );

        let dir = tempfile::tempdir().unwrap();
        let mut c = comparison(
            "[infermesh, infermesh-baseline]",
            &format!("{{ baselineBinary: {} }}", dir.path().display()),
        );
        let error = format!("{:#}", c.resolve_baseline_binary().unwrap_err());
        assert!(
            error.starts_with("infermesh.baselineBinary:") && error.ends_with("is not a file"),
            "{error}"
        );
    }

    #[test]
    fn the_trace_sampling_defaults_to_one_percent_and_is_a_ratio() {
        let c = comparison(
            "[direct, infermesh, infermesh-traced-sampled, infermesh-traced, infermesh-json-log, infermesh-ecs]",
            "{}",
        );
        assert_eq!(c.targets[2], TargetKind::InfermeshTracedSampled);
        assert_eq!(c.targets[5], TargetKind::InfermeshEcs);
        assert_eq!(c.infermesh.trace_sampling(), 0.01);
        let c = comparison("[infermesh-traced-sampled]", "{ traceSampling: 0.1 }");
        assert_eq!(c.infermesh.trace_sampling(), 0.1);
        let c: Comparison = serde_saphyr::from_str(
            "backends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{ name: mock-llm }]\nload:\n  rate: 100\n",
        )
        .unwrap();
        assert_eq!(
            c.infermesh.trace_sampling(),
            DEFAULT_TRACE_SAMPLING,
            "without an infermesh block too"
        );
        let error = Comparison::parse(
            "targets: [infermesh-traced-sampled]\nbackends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{ name: mock-llm }]\nload:\n  rate: 100\ninfermesh: { traceSampling: 2 }\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "infermesh.traceSampling: 2 is not a ratio between 0 and 1"
        );
    }

    #[test]
    fn a_relative_baseline_binary_is_taken_from_the_current_directory() {
        // `cargo test` runs unit tests in the package's directory, which
        // holds Cargo.toml: a file, which is all the check asks of it.
        let mut c = comparison(
            "[infermesh, infermesh-baseline]",
            "{ baselineBinary: Cargo.toml }",
        );
        c.resolve_baseline_binary().unwrap();
        assert_eq!(
            c.infermesh.baseline_binary,
            Some(std::env::current_dir().unwrap().join("Cargo.toml"))
        );
    }

    #[test]
    fn loading_a_file_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ab.yaml");
        std::fs::write(
            &file,
            "targets: [infermesh-baseline]\nbackends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{ name: mock-llm }]\nload:\n  rate: 100\n",
        )
        .unwrap();
        let error = format!("{:#}", Comparison::load(&file).unwrap_err());
        assert!(
            error.starts_with(&format!("{}: infermesh.baselineBinary", file.display())),
            "{error}"
        );
    }

    /// The text of a comparison file with `backend` (one backend field,
    /// both, or none) and `more` fields.
    fn with(backend: &str, more: &str) -> String {
        format!("targets: [direct, infermesh]\n{backend}load:\n  rate: 100\n{more}")
    }

    /// The mock servers' field.
    const MOCK: &str =
        "backends:\n  servers:\n    - listen: 127.0.0.1:0\n      models: [{ name: mock-llm }]\n";
    /// The static backend's field.
    const STATIC: &str = "staticBackend: { bodyBytes: 100 }\n";

    #[test]
    fn exactly_one_backend_is_given() {
        let mock = Comparison::parse(&with(MOCK, "")).unwrap();
        assert!(matches!(mock.backend().unwrap(), Backend::Mock(_)));
        let answer = Comparison::parse(&with(STATIC, "")).unwrap();
        match answer.backend().unwrap() {
            Backend::Static(answer) => assert_eq!(answer.body_bytes, 100),
            other => panic!("{other:?}"),
        }

        let both = Comparison::parse(&with(&format!("{MOCK}{STATIC}"), ""))
            .unwrap_err()
            .to_string();
        assert_eq!(
            both,
            "give backends or staticBackend, not both: one backend stands behind every target"
        );
        let neither = Comparison::parse(&with("", "")).unwrap_err().to_string();
        assert_eq!(
            neither,
            "give backends (mock model servers) or staticBackend (nginx with a fixed answer)"
        );

        let too_long = Comparison::parse(&with("staticBackend: { bodyBytes: 5000 }\n", ""))
            .unwrap_err()
            .to_string();
        assert!(
            too_long.starts_with("staticBackend.bodyBytes: 5000 is above 4000"),
            "{too_long}"
        );
        assert!(Comparison::parse(&with("staticBackend: { bodyBytes: 0 }\n", "")).is_ok());
        let unknown = Comparison::parse(&with("staticBackend: { bytes: 100 }\n", ""))
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("bytes"), "{unknown}");
    }

    #[test]
    fn pinned_cpus_must_exist_and_workers_be_one_at_least() {
        let pinned = Comparison::parse(&with(
            STATIC,
            "pinning: { proxy: [0], load: [1, 3] }\nworkers: 1\n",
        ))
        .unwrap();
        assert_eq!(pinned.workers, Some(1));
        let pinning = pinned.pinning.unwrap();
        assert_eq!(
            (&pinning.proxy[..], &pinning.load[..]),
            (&[0][..], &[1, 3][..])
        );
        pinning.check_cpus(&[0, 1, 2, 3]).unwrap();
        assert_eq!(
            pinning.check_cpus(&[0, 1]).unwrap_err().to_string(),
            "pinning.load: CPU 3 is not one this process may run on (allowed: 0,1)"
        );
        // A container given CPUs 4-7: CPU 0 is refused though it exists.
        let proxy = Pinning {
            proxy: vec![0],
            load: vec![5],
        };
        assert_eq!(
            proxy.check_cpus(&[4, 5, 6, 7]).unwrap_err().to_string(),
            "pinning.proxy: CPU 0 is not one this process may run on (allowed: 4,5,6,7)"
        );

        let empty = Comparison::parse(&with(STATIC, "pinning: { proxy: [], load: [1] }\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(empty, "pinning.proxy: give at least one CPU");
        let missing = Comparison::parse(&with(STATIC, "pinning: { proxy: [0] }\n"));
        assert!(missing.is_err(), "both lists are required");
        let zero = Comparison::parse(&with(STATIC, "workers: 0\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(zero, "workers must be at least 1");
        let unpinned = Comparison::parse(&with(MOCK, "")).unwrap();
        assert!(unpinned.pinning.is_none() && unpinned.workers.is_none());
    }

    #[test]
    fn loading_a_file_checks_its_cpus_against_those_this_process_may_use() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pinned.yaml");
        std::fs::write(
            &file,
            with(STATIC, "pinning: { proxy: [0], load: [4096] }\n"),
        )
        .unwrap();
        let error = format!("{:#}", Comparison::load(&file).unwrap_err());
        let allowed = allowed_cpus();
        assert_eq!(
            error,
            format!(
                "{}: pinning.load: CPU 4096 is not one this process may run on (allowed: {})",
                file.display(),
                crate::compare::supervise::cpu_list(&allowed)
            )
        );
        let cpu = allowed[0];
        std::fs::write(
            &file,
            with(
                STATIC,
                &format!("pinning: {{ proxy: [{cpu}], load: [{cpu}] }}\n"),
            ),
        )
        .unwrap();
        Comparison::load(&file).unwrap();
    }

    #[test]
    fn every_target_is_named_as_files_write_it() {
        for kind in [
            TargetKind::Direct,
            TargetKind::Infermesh,
            TargetKind::InfermeshBaseline,
            TargetKind::InfermeshBare,
            TargetKind::InfermeshHedged,
            TargetKind::InfermeshFanout,
            TargetKind::InfermeshTraced,
            TargetKind::InfermeshTracedSampled,
            TargetKind::InfermeshJsonLog,
            TargetKind::InfermeshEcs,
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

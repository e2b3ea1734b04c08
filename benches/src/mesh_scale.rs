//! `infermesh-bench mesh-scale`: the control plane under a mesh of
//! simulated proxies. The real `infermesh-control-plane serve` runs as a
//! child process; the proxies are the proxy's own control-plane client
//! (`infermesh_proxy::control_plane_client`), thousands of them in this
//! process, each with its key, its join token, its certificate and its
//! mutual-TLS config stream. They check that every document they receive
//! is JSON and acknowledge it; no traffic is sent anywhere.
//!
//! The mesh: `services` backends with a route each, spread over
//! `namespaces` namespaces, plus one shared service every sidecar calls;
//! `proxies` sidecars spread over the services. Unless `full_mesh`, a
//! `Sidecar` resource per namespace narrows each sidecar to its own
//! namespace and the shared one (common practice, and what makes an
//! endpoint change cheap); with `full_mesh` every sidecar holds every
//! service, as in a mesh without `Sidecar` resources.
//!
//! Measured, in order: the bootstrap of every proxy (key, CSR,
//! certificate, first config); a change every proxy sees (the shared
//! route); a change to one backend's endpoints; a restart of the control
//! plane. For each: the time from the change (the file written, the
//! process started) to each proxy's acknowledgement, the proxies that
//! received it, the bytes pushed, and the control plane's CPU and memory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use infermesh_control_plane::credential::Workload;
use infermesh_control_plane::join_tokens::JoinTokens;
use infermesh_proxy::ControlPlaneOptions;
use infermesh_proxy::control_plane_client::start_detached;
use serde::Serialize;
use tokio::sync::mpsc;

/// How the mesh is laid out and run.
#[derive(Clone, Debug)]
pub struct ScaleOptions {
    /// The `infermesh-control-plane` binary.
    pub control_plane: PathBuf,
    /// Simulated sidecars.
    pub proxies: usize,
    /// Services (a backend and a route each).
    pub services: usize,
    /// Namespaces the services are spread over.
    pub namespaces: usize,
    /// Every sidecar holds every service (no `Sidecar` resources).
    pub full_mesh: bool,
    /// How long any one phase may take.
    pub phase_timeout: Duration,
    /// How long the control plane is left idle after the changes before
    /// its settled memory is read.
    pub settle: Duration,
}

/// One phase's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// What happened.
    pub name: String,
    /// Proxies that acknowledged an update.
    pub proxies_updated: usize,
    /// From the change to each acknowledgement: median, in seconds.
    pub p50_seconds: f64,
    /// 99th percentile, in seconds.
    pub p99_seconds: f64,
    /// The last acknowledgement, in seconds.
    pub last_seconds: f64,
    /// Bytes of updates the control plane sent in the phase.
    pub bytes_pushed: u64,
    /// Updates the control plane sent in the phase.
    pub pushes: u64,
    /// The control plane's CPU time in the phase, seconds.
    pub control_plane_cpu_seconds: f64,
    /// Its resident memory at the end of the phase, bytes.
    pub control_plane_rss_bytes: u64,
    /// Acknowledgements per second after the change (how the load
    /// spreads: a thundering herd would put them all in the first one).
    pub acks_per_second: Vec<usize>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleReport {
    /// Simulated sidecars.
    pub proxies: usize,
    /// Services.
    pub services: usize,
    /// Namespaces.
    pub namespaces: usize,
    /// Whether every sidecar held every service.
    pub full_mesh: bool,
    /// Resources one sidecar held after bootstrap (the first one's).
    pub resources_per_proxy: usize,
    /// The phases, in order.
    pub phases: Vec<Phase>,
    /// The first control plane's resident memory after the changes and
    /// `settle` idle, with every proxy connected, bytes.
    pub control_plane_settled_rss_bytes: u64,
    /// Of that, what its allocator counts as allocated and in use, bytes.
    pub control_plane_settled_allocated_bytes: u64,
    /// The restarted control plane's highest resident memory, bytes.
    pub control_plane_peak_rss_bytes: u64,
}

impl std::fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} proxies, {} services in {} namespaces ({}), {} resources per proxy",
            self.proxies,
            self.services,
            self.namespaces,
            if self.full_mesh {
                "full mesh"
            } else {
                "Sidecar-scoped"
            },
            self.resources_per_proxy
        )?;
        writeln!(
            f,
            "{:<34} {:>8} {:>8} {:>8} {:>8} {:>12} {:>9} {:>8} {:>9}",
            "phase", "updated", "p50", "p99", "last", "bytes/push", "pushes", "CP CPU", "CP RSS"
        )?;
        for p in &self.phases {
            let per_push = p.bytes_pushed.checked_div(p.pushes).unwrap_or(0);
            writeln!(
                f,
                "{:<34} {:>8} {:>7.0}ms {:>7.0}ms {:>7.0}ms {:>12} {:>9} {:>7.2}s {:>7.1}MB",
                p.name,
                p.proxies_updated,
                p.p50_seconds * 1e3,
                p.p99_seconds * 1e3,
                p.last_seconds * 1e3,
                per_push,
                p.pushes,
                p.control_plane_cpu_seconds,
                p.control_plane_rss_bytes as f64 / 1e6
            )?;
        }
        for p in &self.phases {
            writeln!(f, "acks per second, {}: {:?}", p.name, p.acks_per_second)?;
        }
        write!(
            f,
            "control plane RSS settled (idle after the changes): {:.1} MB, of which allocated: {:.1} MB; restarted, peak: {:.1} MB",
            self.control_plane_settled_rss_bytes as f64 / 1e6,
            self.control_plane_settled_allocated_bytes as f64 / 1e6,
            self.control_plane_peak_rss_bytes as f64 / 1e6
        )
    }
}

/// A simulated proxy's acknowledgement: which, when, and how many
/// resources it held.
struct Applied {
    proxy: usize,
    at: Instant,
    resources: usize,
}

/// Runs the benchmark.
pub async fn run(options: ScaleOptions) -> anyhow::Result<ScaleReport> {
    if options.namespaces == 0 || options.services == 0 || options.proxies == 0 {
        bail!("--proxies, --services and --namespaces must be at least 1");
    }
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let mesh = Layout::write(dir.path(), &options)?;
    let mut control_plane = ControlPlane::start(&options.control_plane, dir.path(), None)?;
    let grpc = control_plane.grpc;

    let (applied, mut acks) = mpsc::unbounded_channel::<Applied>();
    let started = Instant::now();
    let mut resources_per_proxy = 0;
    for (index, proxy) in mesh.proxies.iter().enumerate() {
        let client = start_detached(
            ControlPlaneOptions {
                addresses: vec![grpc.to_string()],
                credential: proxy.credential.clone(),
                trust_bundle: dir.path().join("ca").join("root-cert.pem").into(),
                trust_domain: "cluster.local".into(),
                control_plane_identity: None,
                node: proxy.node.clone(),
                labels: BTreeMap::new(),
            },
            "sidecar",
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", proxy.node))?;
        let applied = applied.clone();
        let mut updates = client.updates;
        tokio::spawn(async move {
            let _store = client.store;
            while let Some(update) = updates.recv().await {
                let valid = update
                    .documents
                    .iter()
                    .all(|(_, text)| serde_json::from_str::<serde_json::Value>(text).is_ok());
                let resources = update.documents.len();
                let _ = update.applied.send(if valid {
                    Ok(())
                } else {
                    Err("a document is not JSON".into())
                });
                let _ = applied.send(Applied {
                    proxy: index,
                    at: Instant::now(),
                    resources,
                });
            }
        });
    }

    let mut phases = Vec::new();
    let everyone: Vec<usize> = (0..mesh.proxies.len()).collect();
    let mut usage = control_plane.usage();
    let mut counters = control_plane.push_counters().await?;
    let first = collect(&mut acks, started, &everyone, options.phase_timeout).await?;
    resources_per_proxy = first.resources.max(resources_per_proxy);
    phases.push(
        first
            .phase(
                "bootstrap (CSR + first config)",
                &mut control_plane,
                &mut usage,
                &mut counters,
            )
            .await?,
    );

    // A change every sidecar sees: the shared route.
    let written = Instant::now();
    mesh.write_shared(dir.path(), "30s")?;
    let all = collect(&mut acks, written, &everyone, options.phase_timeout).await?;
    phases.push(
        all.phase(
            "route change seen by all",
            &mut control_plane,
            &mut usage,
            &mut counters,
        )
        .await?,
    );

    // One backend's endpoints: only the proxies that hold it.
    let holders = mesh.holders_of(7 % options.services, options.full_mesh);
    let written = Instant::now();
    mesh.write_service(dir.path(), 7 % options.services, 3)?;
    let mut one = collect(&mut acks, written, &holders, options.phase_timeout).await?;
    // Any proxy outside the expected set that is updated shows here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(extra) = acks.try_recv() {
        one.updated.push(extra.at.duration_since(written));
    }
    phases.push(
        one.phase(
            "one backend's endpoints changed",
            &mut control_plane,
            &mut usage,
            &mut counters,
        )
        .await?,
    );

    // Memory once the changes are behind it: freed memory goes back to
    // the system within about ten seconds (jemalloc's decay).
    tokio::time::sleep(options.settle).await;
    let settled_rss = control_plane.usage().rss_bytes;
    let settled_allocated = control_plane
        .metric("infermesh_control_plane_memory_allocated_bytes")
        .await?;

    // A restart on the same address: every proxy reconnects and
    // acknowledges its config again.
    control_plane.kill();
    let restarted = Instant::now();
    control_plane = ControlPlane::start(&options.control_plane, dir.path(), Some(grpc))?;
    usage = crate::process::Usage::default();
    counters = (0, 0);
    let back = collect(&mut acks, restarted, &everyone, options.phase_timeout).await?;
    phases.push(
        back.phase(
            "control plane restart: reconverged",
            &mut control_plane,
            &mut usage,
            &mut counters,
        )
        .await?,
    );
    let peak = control_plane.usage().peak_rss_bytes;
    control_plane.kill();
    Ok(ScaleReport {
        proxies: options.proxies,
        services: options.services,
        namespaces: options.namespaces,
        full_mesh: options.full_mesh,
        resources_per_proxy,
        phases,
        control_plane_settled_rss_bytes: settled_rss,
        control_plane_settled_allocated_bytes: settled_allocated,
        control_plane_peak_rss_bytes: peak,
    })
}

/// What one phase collected.
struct Collected {
    updated: Vec<Duration>,
    resources: usize,
}

/// Waits until every proxy of `expected` acknowledged an update made after
/// `since`.
async fn collect(
    acks: &mut mpsc::UnboundedReceiver<Applied>,
    since: Instant,
    expected: &[usize],
    timeout: Duration,
) -> anyhow::Result<Collected> {
    let mut waiting: std::collections::HashSet<usize> = expected.iter().copied().collect();
    let mut updated = Vec::new();
    let mut resources = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    while !waiting.is_empty() {
        let Ok(Some(ack)) = tokio::time::timeout_at(deadline, acks.recv()).await else {
            bail!(
                "{} of {} proxies did not acknowledge within {timeout:?}",
                waiting.len(),
                expected.len()
            );
        };
        if ack.at < since {
            continue;
        }
        if ack.proxy == 0 {
            resources = ack.resources;
        }
        waiting.remove(&ack.proxy);
        updated.push(ack.at.duration_since(since));
    }
    Ok(Collected { updated, resources })
}

impl Collected {
    async fn phase(
        mut self,
        name: &str,
        control_plane: &mut ControlPlane,
        usage: &mut crate::process::Usage,
        counters: &mut (u64, u64),
    ) -> anyhow::Result<Phase> {
        self.updated.sort();
        let at = |q: f64| {
            let i = ((self.updated.len() as f64 * q).ceil() as usize).saturating_sub(1);
            self.updated.get(i).map_or(0.0, Duration::as_secs_f64)
        };
        // The control plane counts an update when its acknowledgement
        // arrives, a moment after the proxy applied it.
        let mut pushed = control_plane.push_counters().await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while pushed.1 < counters.1 + self.updated.len() as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            pushed = control_plane.push_counters().await?;
        }
        let now = control_plane.usage();
        let last = self.updated.last().map_or(0.0, Duration::as_secs_f64);
        let mut acks_per_second = vec![0; last.floor() as usize + 1];
        for d in &self.updated {
            acks_per_second[d.as_secs() as usize] += 1;
        }
        let phase = Phase {
            name: name.to_owned(),
            proxies_updated: self.updated.len(),
            p50_seconds: at(0.5),
            p99_seconds: at(0.99),
            last_seconds: last,
            bytes_pushed: pushed.0.saturating_sub(counters.0),
            pushes: pushed.1.saturating_sub(counters.1),
            control_plane_cpu_seconds: now.cpu_seconds - usage.cpu_seconds,
            control_plane_rss_bytes: now.rss_bytes,
            acks_per_second,
        };
        *usage = now;
        *counters = pushed;
        Ok(phase)
    }
}

/// One simulated proxy.
struct Proxy {
    node: String,
    credential: PathBuf,
}

/// The mesh's files.
struct Layout {
    proxies: Vec<Proxy>,
    namespaces: usize,
    proxy_service: Vec<usize>,
}

impl Layout {
    /// Writes the CA, the tokens and credentials, and the config
    /// directory into `dir`.
    fn write(dir: &Path, options: &ScaleOptions) -> anyhow::Result<Layout> {
        let status = Command::new(&options.control_plane)
            .args(["ca", "init", "--trust-domain", "cluster.local", "--out"])
            .arg(dir.join("ca"))
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("run {}", options.control_plane.display()))?;
        if !status.success() {
            bail!("ca init failed");
        }
        std::fs::create_dir(dir.join("config"))?;
        std::fs::create_dir(dir.join("credentials"))?;
        let layout = Layout {
            proxies: Vec::new(),
            namespaces: options.namespaces,
            proxy_service: (0..options.proxies).map(|p| p % options.services).collect(),
        };
        let mut tokens = JoinTokens::default();
        let mut credentials = Vec::new();
        let now = SystemTime::now();
        for service in 0..options.services {
            let token = tokens.create(
                &Workload {
                    namespace: layout.namespace(service),
                    service_account: format!("svc-{service}"),
                },
                Duration::from_secs(24 * 3600),
                now,
            );
            let path = dir.join("credentials").join(format!("svc-{service}.token"));
            std::fs::write(&path, format!("{token}\n"))?;
            credentials.push(path);
        }
        tokens.save(&dir.join("tokens.yaml"))?;
        let proxies = (0..options.proxies)
            .map(|p| {
                let service = layout.proxy_service[p];
                Proxy {
                    node: format!("svc-{service}-{}", p / options.services),
                    credential: credentials[service].clone(),
                }
            })
            .collect();
        let layout = Layout { proxies, ..layout };
        for service in 0..options.services {
            layout.write_service(dir, service, 2)?;
        }
        layout.write_shared(dir, "60s")?;
        if !options.full_mesh {
            for n in 0..options.namespaces {
                write(
                    dir,
                    &format!("sidecar-ns-{n}.yaml"),
                    &format!(
                        "apiVersion: infermesh.io/v1alpha1\nkind: Sidecar\nmetadata: {{ name: default, namespace: ns-{n} }}\nspec: {{ egress: [\"*.ns-{n}\", \"*.shared\"] }}\n"
                    ),
                )?;
            }
        }
        Ok(layout)
    }

    fn namespace(&self, service: usize) -> String {
        format!("ns-{}", service % self.namespaces)
    }

    /// The proxies whose view holds `service`'s backend.
    fn holders_of(&self, service: usize, full_mesh: bool) -> Vec<usize> {
        (0..self.proxies.len())
            .filter(|p| {
                full_mesh || self.proxy_service[*p] % self.namespaces == service % self.namespaces
            })
            .collect()
    }

    /// `service`'s backend (with `endpoints` loopback addresses it is
    /// never sent to) and route.
    fn write_service(&self, dir: &Path, service: usize, endpoints: usize) -> anyhow::Result<()> {
        let namespace = self.namespace(service);
        let endpoints: Vec<String> = (0..endpoints)
            .map(|e| {
                format!(
                    "{{ address: \"127.{}.{}.{}:8000\" }}",
                    1 + service / 62_500,
                    (service / 250) % 250,
                    1 + e + (service % 250) / 2
                )
            })
            .collect();
        write(
            dir,
            &format!("svc-{service}.yaml"),
            &format!(
                "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: svc-{service}, namespace: {namespace} }}
spec: {{ endpoints: [{}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: svc-{service}, namespace: {namespace} }}
spec:
  hostnames: [svc-{service}.{namespace}]
  rules: [{{ backends: [{{ name: svc-{service} }}], timeouts: {{ responseHeaders: 120s }} }}]
",
                endpoints.join(", ")
            ),
        )
    }

    /// The shared service every sidecar calls, with its route's timeout.
    fn write_shared(&self, dir: &Path, timeout: &str) -> anyhow::Result<()> {
        write(
            dir,
            "shared.yaml",
            &format!(
                "apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: {{ name: api, namespace: shared }}
spec: {{ endpoints: [{{ address: \"127.0.0.1:8000\" }}] }}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: {{ name: api, namespace: shared }}
spec:
  hostnames: [api.shared]
  rules: [{{ backends: [{{ name: api }}], timeouts: {{ responseHeaders: {timeout} }} }}]
"
            ),
        )
    }
}

/// Replaces a file of the config directory by a rename.
fn write(dir: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("config").join(file))?;
    Ok(())
}

/// The control plane's process.
struct ControlPlane {
    child: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl ControlPlane {
    fn start(binary: &Path, dir: &Path, listen: Option<SocketAddr>) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let listen = listen.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("control-plane.log"))?;
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--ca")
            .arg(dir.join("ca"))
            .arg("--tokens")
            .arg(dir.join("tokens.yaml"))
            .arg("--config-dir")
            .arg(dir.join("config"))
            .args(["--listen", &listen, "--admin", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut address = |kind: &str| -> anyhow::Result<SocketAddr> {
            let line = lines.next().context("the control plane did not start")??;
            line.strip_prefix("infermesh-control-plane listening on ")
                .and_then(|rest| rest.strip_suffix(&format!(" ({kind})")))
                .with_context(|| format!("unexpected line: {line}"))?
                .parse()
                .context("an address")
        };
        let grpc = address("grpc")?;
        let admin = address("admin")?;
        Ok(ControlPlane { child, grpc, admin })
    }

    fn usage(&self) -> crate::process::Usage {
        crate::process::tree(self.child.id()).unwrap_or_default()
    }

    /// One series of its metrics (0 when absent).
    async fn metric(&self, series: &str) -> anyhow::Result<u64> {
        let text = admin_get(self.admin, "/metrics").await?;
        Ok(series_value(&text, series))
    }

    /// `(bytes pushed, pushes)` so far.
    async fn push_counters(&self) -> anyhow::Result<(u64, u64)> {
        let text = admin_get(self.admin, "/metrics").await?;
        let value = |series: &str| series_value(&text, series);
        let pushes = value("infermesh_control_plane_pushes_total{result=\"ack\"}")
            + value("infermesh_control_plane_pushes_total{result=\"nack\"}")
            + value("infermesh_control_plane_pushes_total{result=\"none\"}");
        Ok((value("infermesh_control_plane_pushed_bytes_total"), pushes))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of `series` on a metrics page (0 when absent).
fn series_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// The body of `GET path` on the admin port.
async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    infermesh_control_plane::status::get(&admin.to_string(), path).await
}

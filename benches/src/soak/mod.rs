//! A bounded soak of the real `infermesh-proxy`: steady well-behaved load
//! (HTTP/1.1 and HTTP/2) while the config is rewritten every few seconds,
//! the proxy's certificate is replaced, the model servers are killed and
//! restarted one at a time, and hostile clients (slowloris, silent
//! connections, HTTP/2 delayed resets, HTTP/2 non-readers) run beside it
//! for the middle of the run. It passes when no well-behaved request
//! failed, every event took, the proxy cut the hostile clients, its memory
//! came back down after them, and it shut down cleanly.
//!
//! The timeline, as shares of `--duration` (D):
//!
//! | when | what |
//! | --- | --- |
//! | 0 – D | the well-behaved load; a config rewrite every D/15 (1–3 s) |
//! | 0.25 D – 0.70 D | the hostile clients |
//! | 0.30 D, 0.50 D, 0.80 D | a new proxy certificate |
//! | 0.35 D, 0.55 D | a model server killed, restarted D/12 (1–5 s) later |
//! | 0.10 D – 0.25 D | memory "before" (the highest sample) |
//! | 0.70 D + D/10 – D | memory "after" (the median) |

pub mod backends;
pub mod hostile;
pub mod identity;
pub mod proxy;
pub mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::time::Instant;

pub use hostile::{Crowd, HostileReport, HostileReports};
pub use report::{
    Check, ClientReport, Events, LoggedFailures, Memory, ProxyCounts, Restart, SoakReport,
    TimelineEntry, WellBehaved,
};

use crate::load::{self, LoadOptions, LoadReport, Protocol, Template};
use crate::mock::{ModelSpec, ServerSpec, TlsSpec};
use backends::Backend;
use hostile::Hostiles;
use identity::Identities;
use proxy::Proxy;

/// The model the mock servers serve and the clients ask for.
const MODEL: &str = "mock-llm";

/// How to run a soak.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    /// The whole run.
    pub duration: Duration,
    /// Requests per second of each well-behaved client (HTTP/1.1 and
    /// HTTP/2).
    pub rate: f64,
    /// The `infermesh-proxy` binary; default: next to this program.
    pub proxy: Option<PathBuf>,
    /// Keep the config, certificates and log here; default: a temporary
    /// directory, removed after a run that passed.
    pub work: Option<PathBuf>,
    /// The hostile clients.
    pub crowd: Crowd,
    /// Print events on standard error as they happen.
    pub progress: bool,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            duration: Duration::from_secs(60),
            rate: 200.0,
            proxy: None,
            work: None,
            crowd: Crowd::default(),
            progress: true,
        }
    }
}

/// When things happen, from the run's length.
#[derive(Clone, Copy, Debug)]
struct Plan {
    duration: Duration,
    hostile_from: Duration,
    hostile_to: Duration,
    reload_every: Duration,
    down_for: Duration,
}

impl Plan {
    fn new(duration: Duration) -> Plan {
        let share = |f: f64| duration.mul_f64(f);
        Plan {
            duration,
            hostile_from: share(0.25),
            hostile_to: share(0.70),
            reload_every: (duration / 15).clamp(Duration::from_secs(1), Duration::from_secs(3)),
            down_for: (duration / 12).clamp(Duration::from_secs(1), Duration::from_secs(5)),
        }
    }

    fn share(&self, f: f64) -> Duration {
        self.duration.mul_f64(f)
    }

    /// The scheduled events, in order.
    fn actions(&self) -> Vec<(Duration, Action)> {
        let mut actions = Vec::new();
        let mut at = self.reload_every;
        let mut n = 1;
        while at + self.reload_every / 2 < self.duration {
            actions.push((at, Action::Reload(n)));
            at += self.reload_every;
            n += 1;
        }
        for f in [0.30, 0.50, 0.80] {
            actions.push((self.share(f), Action::Rotate));
        }
        for (i, f) in [0.35, 0.55].into_iter().enumerate() {
            actions.push((self.share(f), Action::Kill(i)));
            actions.push((self.share(f) + self.down_for, Action::Restart(i)));
        }
        actions.sort_by_key(|(at, _)| *at);
        actions
    }

    /// How often the proxy's memory is read.
    fn sample_every(&self) -> Duration {
        (self.duration / 40).clamp(Duration::from_millis(200), Duration::from_secs(1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Reload(u32),
    Rotate,
    Kill(usize),
    Restart(usize),
}

/// Prints events as they happen, and keeps them for the report.
struct Timeline {
    start: Instant,
    progress: bool,
    entries: Mutex<Vec<TimelineEntry>>,
}

impl Timeline {
    fn note(&self, event: String) {
        let at = self.start.elapsed().as_secs_f64();
        if self.progress {
            eprintln!("[{at:>6.1}s] {event}");
        }
        self.entries
            .lock()
            .expect("timeline lock")
            .push(TimelineEntry { at, event });
    }

    fn entries(&self) -> Vec<TimelineEntry> {
        self.entries.lock().expect("timeline lock").clone()
    }
}

/// Runs a soak and reports what it measured; the report says whether it
/// passed.
pub async fn run(options: SoakOptions) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(
        options.duration >= Duration::from_secs(4),
        "--duration must be at least 4s"
    );
    anyhow::ensure!(
        options.rate.is_finite() && options.rate > 0.0,
        "--rate must be above 0"
    );
    let binary = proxy::binary(options.proxy.as_deref())?;
    let (work, temporary) = match &options.work {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("infermesh-soak-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let report = soak(&options, &binary, &work).await?;
    if temporary && report.passed {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(report)
}

async fn soak(options: &SoakOptions, binary: &Path, work: &Path) -> anyhow::Result<SoakReport> {
    let plan = Plan::new(options.duration);
    let mut ids = Identities::create(&work.join("identity"))?;
    let model = ModelSpec::simple(
        MODEL,
        Duration::from_millis(10).into(),
        Duration::from_millis(10).into(),
        1000,
    );
    let spec = ServerSpec {
        listen: "127.0.0.1:0".parse().expect("address"),
        tls: Some(TlsSpec {
            cert: ids.model.cert.clone(),
            key: ids.model.key.clone(),
            client_ca: Some(ids.bundle.clone()),
        }),
        models: vec![model],
    };
    let mut backends = vec![
        Backend::start("a", spec.clone()).await?,
        Backend::start("b", spec).await?,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let mut proxy = Proxy::start(binary, work, &proxy::config(0, &addrs), &ids).await?;
    wait_ready(&proxy).await?;
    let metrics_before = proxy.metrics().await?;
    let expiry_before = metrics_before.sum("infermesh_identity_cert_expiry_timestamp_seconds", &[]);

    let start = Instant::now();
    let timeline = Arc::new(Timeline {
        start,
        progress: options.progress,
        entries: Mutex::new(Vec::new()),
    });
    timeline.note(format!(
        "soak started: proxy pid {}, listener {}, backends {} and {}",
        proxy.pid(),
        proxy.listener,
        addrs[0],
        addrs[1]
    ));

    // The well-behaved clients.
    let url = format!(
        "http://{}{}",
        proxy.listener,
        Template::OpenaiChat.path(MODEL)
    );
    let http1_connections = ((options.rate / 8.0).ceil() as usize).clamp(4, 32);
    let mut http1 = LoadOptions::new(&url);
    http1.rate = Some(options.rate);
    http1.connections = http1_connections;
    http1.duration = options.duration;
    http1.warmup = Duration::ZERO;
    http1.timeout = Duration::from_secs(10);
    http1.request = Template::OpenaiChat.request(MODEL);
    http1.label = Some("HTTP/1.1".into());
    let mut http2 = http1.clone();
    http2.protocol = Protocol::Http2;
    http2.connections = 2;
    http2.concurrency = Some(http1_connections);
    http2.label = Some("HTTP/2".into());
    let loads = [
        tokio::spawn(load::run(http1)),
        tokio::spawn(load::run(http2)),
    ];

    // The proxy's memory, sampled.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let samples = samples.clone();
        let pid = proxy.pid();
        let every = plan.sample_every();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Ok(usage) = crate::process::tree(pid) {
                    samples
                        .lock()
                        .expect("samples lock")
                        .push([start.elapsed().as_secs_f64(), usage.rss_bytes as f64]);
                }
            }
        })
    };

    // The hostile clients.
    let hostiles = Arc::new(Hostiles::default());
    let hostile_task = {
        let hostiles = hostiles.clone();
        let listener = proxy.listener;
        let crowd = options.crowd;
        let timeline = timeline.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + plan.hostile_from).await;
            timeline.note("hostile clients start".into());
            hostiles.run(listener, crowd, start + plan.hostile_to).await;
            timeline.note("hostile clients stopped".into());
        })
    };

    // The events.
    let mut restarts: Vec<Restart> = Vec::new();
    let mut rewrites = 0;
    let mut served_at_restart = [0u64; 2];
    for (at, action) in plan.actions() {
        tokio::time::sleep_until(start + at).await;
        match action {
            Action::Reload(n) => {
                proxy.write_config(&proxy::config(n, &addrs))?;
                rewrites += 1;
                timeline.note(format!("config rewritten (version {n})"));
            }
            Action::Rotate => {
                ids.rotate_proxy()?;
                timeline.note(format!(
                    "proxy certificate replaced (number {}, expires {})",
                    ids.rotations(),
                    ids.proxy_expiry()
                ));
            }
            Action::Kill(i) => {
                // One at a time: a model server is killed only once the
                // other serves again (restarted and no longer ejected),
                // or a short run would kill both at once.
                let waited = Instant::now();
                while waited.elapsed() < Duration::from_secs(10) {
                    let endpoints = proxy.endpoints().await.unwrap_or(Value::Null);
                    let others_healthy = (0..addrs.len()).filter(|j| *j != i).all(|j| {
                        endpoint(&endpoints, addrs[j]).is_some_and(|(_, state)| state == "healthy")
                    });
                    if others_healthy {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                backends[i].kill();
                restarts.push(Restart {
                    backend: addrs[i].to_string(),
                    killed_at: start.elapsed().as_secs_f64(),
                    ..Restart::default()
                });
                timeline.note(format!("backend {} killed", addrs[i]));
            }
            Action::Restart(i) => {
                backends[i].restart().await?;
                served_at_restart[i] = served(&proxy, addrs[i]).await.unwrap_or(0);
                if let Some(r) = restarts
                    .iter_mut()
                    .rev()
                    .find(|r| r.backend == addrs[i].to_string())
                {
                    r.restarted_at = start.elapsed().as_secs_f64();
                }
                timeline.note(format!("backend {} restarted", addrs[i]));
            }
        }
    }

    let mut load_reports = Vec::new();
    for task in loads {
        load_reports.push(task.await.context("a load client panicked")??);
    }
    timeline.note("well-behaved load finished".into());
    hostile_task.await.context("the hostile clients panicked")?;

    // Every client has gone: the proxy should hold no client connection
    // (a closing HTTP/1 connection may linger up to 5 s)...
    let metrics = proxy.metrics().await?;
    let mut open_after = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let m = proxy.metrics().await?;
        open_after = m.sum("infermesh_downstream_connections", &[]);
        if open_after == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nor, once the pool's idle timeout (4 s) has passed, a backend
    // connection: what is open then was leaked.
    let mut upstream_after = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let m = proxy.metrics().await?;
        upstream_after = m.sum("infermesh_upstream_connections", &[]);
        if upstream_after == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics_idle = proxy.metrics().await?;
    let idle_bytes = crate::process::tree(proxy.pid()).map_or(0, |u| u.rss_bytes);
    sampler.abort();
    let endpoints = proxy.endpoints().await.unwrap_or(Value::Null);
    for (i, addr) in addrs.iter().enumerate() {
        let now = endpoint(&endpoints, *addr);
        if let Some(r) = restarts.iter_mut().find(|r| r.backend == addr.to_string()) {
            r.served_after_restart = now
                .as_ref()
                .map_or(0, |(served, _)| served.saturating_sub(served_at_restart[i]));
            r.state_at_end = now.map_or_else(|| "missing".into(), |(_, state)| state);
        }
    }
    drop(backends);
    let exit = match proxy.stop(Duration::from_secs(10)).await? {
        Some(status) if status.success() => "exited 0 after SIGTERM".to_owned(),
        Some(status) => format!("exited with {status} after SIGTERM"),
        None => "still running 10 s after SIGTERM".to_owned(),
    };
    timeline.note(format!("proxy stopped: {exit}"));

    let samples = samples.lock().expect("samples lock").clone();
    let memory = memory(&plan, &samples, idle_bytes);
    let events = Events {
        config_rewrites: rewrites,
        reloads_applied: metrics.sum("infermesh_config_reloads_total", &[("result", "success")])
            as u64,
        reloads_refused: metrics.sum("infermesh_config_reloads_total", &[("result", "failure")])
            as u64,
        certificate_rotations: ids.rotations(),
        identity_reloads_applied: metrics
            .sum("infermesh_identity_reloads_total", &[("result", "success")])
            as u64,
        identity_reloads_refused: metrics
            .sum("infermesh_identity_reloads_total", &[("result", "failure")])
            as u64,
        certificate_expiry_before: expiry_before as u64,
        certificate_expiry_after: metrics
            .sum("infermesh_identity_cert_expiry_timestamp_seconds", &[])
            as u64,
        certificate_expiry_expected: ids.proxy_expiry(),
        restarts,
    };
    let proxy_counts = ProxyCounts {
        connections_closed: metrics.by("infermesh_downstream_connections_closed_total", "reason"),
        connections_refused: metrics.by("infermesh_downstream_connections_refused_total", "reason"),
        retries: metrics.by("infermesh_retries_total", "reason"),
        retry_budget_exhausted: metrics.sum("infermesh_retry_budget_exhausted_total", &[]),
        upstream_attempts: metrics.by("infermesh_upstream_attempts_total", "outcome"),
        ejections: metrics.sum("infermesh_endpoint_ejections_total", &[]),
        overloaded: metrics.by("infermesh_overloaded_total", "limit"),
        outbound_tls_failures: metrics.sum(
            "infermesh_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "failure")],
        ),
        requests_by_code: metrics.by("infermesh_requests_total", "code"),
        open_connections_after: open_after,
        open_upstream_connections_after: upstream_after,
        open_fds: [
            metrics_before.sum("process_open_fds", &[]),
            metrics_idle.sum("process_open_fds", &[]),
        ],
        exit: exit.clone(),
    };
    let well_behaved = well_behaved(&load_reports);
    let proxy_logged_failures = logged_failures(&proxy.log)?;
    let hostile = hostiles.report();
    let checks = checks(&well_behaved, &events, &hostile, &proxy_counts, &memory);
    let passed = checks.iter().all(|c| c.ok);
    Ok(SoakReport {
        duration_seconds: options.duration.as_secs_f64(),
        rate: options.rate,
        proxy: binary.display().to_string(),
        work: work.display().to_string(),
        hostile_window: [
            plan.hostile_from.as_secs_f64(),
            plan.hostile_to.as_secs_f64(),
        ],
        well_behaved,
        events,
        hostile,
        proxy_counts,
        memory,
        proxy_logged_failures,
        timeline: timeline.entries(),
        checks,
        passed,
    })
}

/// Waits until the proxy's `/ready` answers 200.
async fn wait_ready(proxy: &Proxy) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = proxy.health_get("/ready").await {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the proxy was not ready within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests the proxy sent endpoint `addr` that did not fail, so far.
async fn served(proxy: &Proxy, addr: SocketAddr) -> anyhow::Result<u64> {
    let endpoints = proxy.endpoints().await?;
    Ok(endpoint(&endpoints, addr).map_or(0, |(served, _)| served))
}

/// The requests that did not fail, and the state, of endpoint `addr` on
/// `/endpoints`.
fn endpoint(endpoints: &Value, addr: SocketAddr) -> Option<(u64, String)> {
    let address = addr.to_string();
    endpoints["backends"]
        .as_array()?
        .iter()
        .flat_map(|b| b["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"].as_str() == Some(address.as_str()))
        .map(|e| {
            let requests = e["requests"].as_u64().unwrap_or(0);
            let failures = e["failures"].as_u64().unwrap_or(0);
            (
                requests.saturating_sub(failures),
                e["state"].as_str().unwrap_or("unknown").to_owned(),
            )
        })
}

fn well_behaved(reports: &[LoadReport]) -> WellBehaved {
    let clients: Vec<ClientReport> = reports
        .iter()
        .map(|r| ClientReport {
            protocol: r.label.clone(),
            connections: r.connections,
            sent: r.requests,
            ok: r.ok,
            failed: r.errors.total(),
            errors: r.errors,
            achieved_rate: r.achieved_rate,
            latency: r.latency,
        })
        .collect();
    WellBehaved {
        sent: clients.iter().map(|c| c.sent).sum(),
        failed: clients.iter().map(|c| c.failed).sum(),
        clients,
    }
}

/// The memory figures from the samples.
fn memory(plan: &Plan, samples: &[[f64; 2]], idle_bytes: u64) -> Memory {
    let within = |from: Duration, to: Duration| -> Vec<u64> {
        samples
            .iter()
            .filter(|[t, _]| *t >= from.as_secs_f64() && *t < to.as_secs_f64())
            .map(|[_, b]| *b as u64)
            .collect()
    };
    let before = within(plan.share(0.10), plan.hostile_from)
        .into_iter()
        .max()
        .unwrap_or(0);
    let peak = within(plan.hostile_from, plan.hostile_to + proxy::LIMIT)
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut after = within(
        plan.hostile_to + plan.share(0.10),
        plan.duration + plan.share(1.0),
    );
    after.sort_unstable();
    let after = after.get(after.len() / 2).copied().unwrap_or(0);
    let growth = after as i64 - before as i64;
    let tolerance = (before / 10).max(8 * 1024 * 1024) as i64;
    Memory {
        before_bytes: before,
        peak_bytes: peak,
        after_bytes: after,
        idle_bytes,
        growth_bytes: growth,
        flat: before > 0 && after > 0 && growth <= tolerance,
        samples: samples.to_vec(),
    }
}

/// Well-behaved requests (those without `?soak=` in their path) that the
/// proxy's access log shows as failed.
fn logged_failures(log: &Path) -> anyhow::Result<LoggedFailures> {
    let mut failures = LoggedFailures::default();
    proxy::LogReader::new(log).read_new(|line| {
        let is_access = line["target"] == "infermesh::access";
        let hostile = line["path"].as_str().is_some_and(|p| p.contains("soak="));
        let failed =
            line["status"].as_u64().is_some_and(|s| s >= 400) || line.get("error").is_some();
        if is_access && !hostile && failed {
            failures.count += 1;
            if failures.first.len() < 10 {
                failures.first.push(line);
            }
        }
    })?;
    Ok(failures)
}

fn check(name: &str, ok: bool, detail: String) -> Check {
    Check {
        name: name.to_owned(),
        ok,
        detail,
    }
}

fn checks(
    well: &WellBehaved,
    events: &Events,
    hostile: &HostileReports,
    counts: &ProxyCounts,
    memory: &Memory,
) -> Vec<Check> {
    let closed = |reason: &str| {
        counts
            .connections_closed
            .get(reason)
            .copied()
            .unwrap_or(0.0)
    };
    let kinds = [
        ("slowloris", &hostile.slowloris),
        ("silent", &hostile.silent),
        ("delayed resets", &hostile.delayed_resets),
        ("non-readers", &hostile.non_readers),
    ];
    let restarts_served = events
        .restarts
        .iter()
        .all(|r| r.served_after_restart > 0 && r.restarted_at > 0.0);
    vec![
        check(
            "no well-behaved request failed",
            well.sent > 0 && well.failed == 0,
            format!("{} sent, {} failed", well.sent, well.failed),
        ),
        check(
            "every config rewrite was applied",
            events.config_rewrites > 0
                && events.reloads_applied == u64::from(events.config_rewrites)
                && events.reloads_refused == 0,
            format!(
                "{} rewrites, {} applied, {} refused",
                events.config_rewrites, events.reloads_applied, events.reloads_refused
            ),
        ),
        check(
            "the proxy took its new certificate",
            events.certificate_rotations > 0
                && events.identity_reloads_applied > 0
                && events
                    .certificate_expiry_after
                    .abs_diff(events.certificate_expiry_expected)
                    <= 2,
            format!(
                "{} rotations, {} reloads applied; expiry {} at the end, {} written last",
                events.certificate_rotations,
                events.identity_reloads_applied,
                events.certificate_expiry_after,
                events.certificate_expiry_expected
            ),
        ),
        check(
            "each killed backend served again after its restart",
            !events.restarts.is_empty() && restarts_served,
            events
                .restarts
                .iter()
                .map(|r| format!("{}: {} requests", r.backend, r.served_after_restart))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        check(
            "the proxy closed every kind of hostile client",
            kinds.iter().all(|(_, h)| h.closed_by_proxy > 0)
                && closed("first_byte_timeout") > 0.0
                && closed("premature_resets") > 0.0
                && closed("stream_idle_timeout") > 0.0,
            kinds
                .iter()
                .map(|(name, h)| format!("{name} {}/{}", h.closed_by_proxy, h.connections))
                .chain([format!(
                    "metrics: first_byte_timeout {}, premature_resets {}, stream_idle_timeout {}",
                    closed("first_byte_timeout"),
                    closed("premature_resets"),
                    closed("stream_idle_timeout")
                )])
                .collect::<Vec<_>>()
                .join(", "),
        ),
        check(
            "memory flat after the hostile clients",
            memory.flat,
            format!(
                "{} before, {} peak, {} after ({:+.1} MiB)",
                memory.before_bytes,
                memory.peak_bytes,
                memory.after_bytes,
                memory.growth_bytes as f64 / (1024.0 * 1024.0)
            ),
        ),
        check(
            "no connection left open once the clients left",
            counts.open_connections_after == 0.0
                && counts.open_upstream_connections_after == 0.0
                && counts.open_fds[1] <= counts.open_fds[0] + 4.0,
            format!(
                "{} client and {} backend connections open; {} file descriptors before the load, {} after",
                counts.open_connections_after,
                counts.open_upstream_connections_after,
                counts.open_fds[0],
                counts.open_fds[1]
            ),
        ),
        check(
            "the proxy shut down cleanly",
            counts.exit == "exited 0 after SIGTERM",
            counts.exit.clone(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_falls_inside_the_run() {
        for secs in [8, 60, 600] {
            let plan = Plan::new(Duration::from_secs(secs));
            let actions = plan.actions();
            assert!(actions.iter().all(|(at, _)| *at < plan.duration));
            let count = |f: fn(&Action) -> bool| actions.iter().filter(|(_, a)| f(a)).count();
            assert!(count(|a| matches!(a, Action::Reload(_))) >= 4, "{secs}s");
            assert_eq!(count(|a| matches!(a, Action::Rotate)), 3);
            assert_eq!(count(|a| matches!(a, Action::Restart(_))), 2);
            // Each restart follows its kill.
            for i in 0..2 {
                let kill = actions.iter().position(|(_, a)| *a == Action::Kill(i));
                let restart = actions.iter().position(|(_, a)| *a == Action::Restart(i));
                assert!(kill < restart);
            }
        }
    }

    #[test]
    fn memory_is_flat_within_its_tolerance() {
        let plan = Plan::new(Duration::from_secs(10));
        let mib = |m: f64| m * 1024.0 * 1024.0;
        let samples = [
            [1.5, mib(20.0)],
            [2.0, mib(21.0)],
            [4.0, mib(60.0)],
            [8.5, mib(22.0)],
            [9.0, mib(23.0)],
            [9.5, mib(22.5)],
        ];
        let m = memory(&plan, &samples, 0);
        assert_eq!(m.before_bytes, mib(21.0) as u64);
        assert_eq!(m.peak_bytes, mib(60.0) as u64);
        assert_eq!(m.after_bytes, mib(22.5) as u64);
        assert!(m.flat);
        let grown = [[1.5, mib(20.0)], [9.0, mib(40.0)]];
        assert!(!memory(&plan, &grown, 0).flat);
    }
}

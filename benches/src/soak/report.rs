//! What a soak measured: for people (a short table) and for machines
//! (`--json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::hostile::{HostileReport, HostileReports};
use crate::load::{Errors, Percentiles, ms};

/// Everything a soak measured and the verdict.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SoakReport {
    /// The run's length.
    pub duration_seconds: f64,
    /// Requests per second of each well-behaved client.
    pub rate: f64,
    /// The `infermesh-proxy` binary soaked.
    pub proxy: String,
    /// Where the config, certificates and the proxy's log are.
    pub work: String,
    /// When the hostile clients ran, in seconds from the start.
    pub hostile_window: [f64; 2],
    /// The well-behaved clients.
    pub well_behaved: WellBehaved,
    /// What the soak did to the proxy, and whether it took.
    pub events: Events,
    /// What the proxy did to the hostile clients, as they saw it.
    pub hostile: HostileReports,
    /// What the proxy counted.
    pub proxy_counts: ProxyCounts,
    /// The proxy's resident memory.
    pub memory: Memory,
    /// Well-behaved requests the proxy logged as failed (at most 10) and
    /// how many there were.
    pub proxy_logged_failures: LoggedFailures,
    /// Every scheduled event, in order.
    pub timeline: Vec<TimelineEntry>,
    /// The verdicts.
    pub checks: Vec<Check>,
    /// Whether every check passed.
    pub passed: bool,
}

/// The well-behaved clients together and each.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WellBehaved {
    /// Requests sent by all of them.
    pub sent: u64,
    /// Requests that failed (no response, or a 4xx or 5xx status).
    pub failed: u64,
    /// Each client.
    pub clients: Vec<ClientReport>,
}

/// One well-behaved client.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientReport {
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    /// Connections it used.
    pub connections: usize,
    /// Requests finished.
    pub sent: u64,
    /// Answered with a 1xx-3xx status.
    pub ok: u64,
    /// Not.
    pub failed: u64,
    /// The failures by kind.
    pub errors: Errors,
    /// Requests per second it managed to send.
    pub achieved_rate: f64,
    /// Latency from each request's intended send time, in seconds.
    pub latency: Percentiles,
}

/// What the soak did and what the proxy made of it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Events {
    /// Config rewrites (each changing the config's meaning).
    pub config_rewrites: u32,
    /// `infermesh_config_reloads_total{result="success"}`.
    pub reloads_applied: u64,
    /// `infermesh_config_reloads_total{result="failure"}`.
    pub reloads_refused: u64,
    /// New proxy certificates written.
    pub certificate_rotations: u32,
    /// `infermesh_identity_reloads_total{result="success"}`.
    pub identity_reloads_applied: u64,
    /// `infermesh_identity_reloads_total{result="failure"}` (a read between
    /// the key's and the certificate's renames is refused, then the next
    /// applies).
    pub identity_reloads_refused: u64,
    /// The proxy's certificate expiry before the first rotation, Unix
    /// seconds.
    pub certificate_expiry_before: u64,
    /// The same at the end.
    pub certificate_expiry_after: u64,
    /// The expiry of the last certificate written.
    pub certificate_expiry_expected: u64,
    /// Each backend killed and restarted.
    pub restarts: Vec<Restart>,
}

/// A backend killed and started again.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Restart {
    /// Its address.
    pub backend: String,
    /// Seconds from the start.
    pub killed_at: f64,
    /// Seconds from the start.
    pub restarted_at: f64,
    /// Requests the proxy sent it after the restart, failed ones excluded
    /// (from `/endpoints`).
    pub served_after_restart: u64,
    /// Its state on `/endpoints` at the end.
    pub state_at_end: String,
}

/// What the proxy's `/metrics` said at the end.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCounts {
    /// `infermesh_downstream_connections_closed_total` by reason.
    pub connections_closed: BTreeMap<String, f64>,
    /// `infermesh_downstream_connections_refused_total` by reason.
    pub connections_refused: BTreeMap<String, f64>,
    /// `infermesh_retries_total` by reason.
    pub retries: BTreeMap<String, f64>,
    /// `infermesh_retry_budget_exhausted_total`.
    pub retry_budget_exhausted: f64,
    /// `infermesh_upstream_attempts_total` by outcome.
    pub upstream_attempts: BTreeMap<String, f64>,
    /// `infermesh_endpoint_ejections_total`.
    pub ejections: f64,
    /// `infermesh_overloaded_total` by limit.
    pub overloaded: BTreeMap<String, f64>,
    /// Failed TLS handshakes with the backends.
    pub outbound_tls_failures: f64,
    /// `infermesh_requests_total` by status code.
    pub requests_by_code: BTreeMap<String, f64>,
    /// `infermesh_downstream_connections` once every client had left.
    pub open_connections_after: f64,
    /// `infermesh_upstream_connections` once every client had left and
    /// the backend pool's idle timeout had passed.
    pub open_upstream_connections_after: f64,
    /// `process_open_fds` before the load, and once every client had left
    /// and the backend connections had closed.
    pub open_fds: [f64; 2],
    /// How the proxy exited after SIGTERM.
    pub exit: String,
}

/// The proxy's resident memory (its process tree's RSS).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// The highest sample under the well-behaved load alone, before the
    /// hostile clients.
    pub before_bytes: u64,
    /// The highest sample while they ran.
    pub peak_bytes: u64,
    /// The median of the samples after they stopped and a settling time,
    /// under the well-behaved load alone again.
    pub after_bytes: u64,
    /// Once every client had left.
    pub idle_bytes: u64,
    /// `after` minus `before`.
    pub growth_bytes: i64,
    /// Growth within the tolerance: 10 % of `before`, or 8 MiB.
    pub flat: bool,
    /// `[seconds from the start, bytes]`, every sample.
    pub samples: Vec<[f64; 2]>,
}

/// Failed well-behaved requests in the proxy's access log.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggedFailures {
    /// How many.
    pub count: u64,
    /// The first ones, as logged.
    pub first: Vec<serde_json::Value>,
}

/// One scheduled event.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    /// Seconds from the start.
    pub at: f64,
    /// What happened.
    pub event: String,
}

/// One verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// The figures behind it.
    pub detail: String,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn counts(map: &BTreeMap<String, f64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SoakReport {
    /// The report as a short table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "soak of {}: {:.0}s, {} req/s over HTTP/1.1 and {} req/s over HTTP/2; hostile clients from {:.1}s to {:.1}s",
            self.proxy,
            self.duration_seconds,
            self.rate,
            self.rate,
            self.hostile_window[0],
            self.hostile_window[1]
        );
        let _ = writeln!(
            t,
            "\nwell-behaved     sent    failed   p50        p99        max"
        );
        for c in &self.well_behaved.clients {
            let _ = writeln!(
                t,
                "  {:<12} {:>7} {:>8}   {:<10} {:<10} {}",
                c.protocol,
                c.sent,
                c.failed,
                ms(c.latency.p50),
                ms(c.latency.p99),
                ms(c.latency.max)
            );
        }
        let e = &self.events;
        let _ = writeln!(t, "\nevents");
        let _ = writeln!(
            t,
            "  config         {} rewrites; {} applied, {} refused",
            e.config_rewrites, e.reloads_applied, e.reloads_refused
        );
        let _ = writeln!(
            t,
            "  certificate    {} rotations; {} reloads applied, {} refused; expiry {} -> {} (last written {})",
            e.certificate_rotations,
            e.identity_reloads_applied,
            e.identity_reloads_refused,
            e.certificate_expiry_before,
            e.certificate_expiry_after,
            e.certificate_expiry_expected
        );
        for r in &e.restarts {
            let _ = writeln!(
                t,
                "  backend        {} killed at {:.1}s, restarted at {:.1}s, then served {} requests ({} at the end)",
                r.backend, r.killed_at, r.restarted_at, r.served_after_restart, r.state_at_end
            );
        }
        let _ = writeln!(
            t,
            "\nhostile clients             connections  closed by proxy  streams  lifetime mean / longest"
        );
        let row = |t: &mut String, name: &str, h: &HostileReport| {
            let _ = writeln!(
                t,
                "  {name:<26} {:>11} {:>16} {:>8}  {:.2}s / {:.2}s",
                h.connections, h.closed_by_proxy, h.streams, h.mean_seconds, h.longest_seconds
            );
        };
        row(&mut t, "slowloris", &self.hostile.slowloris);
        row(&mut t, "silent", &self.hostile.silent);
        row(
            &mut t,
            "delayed resets (HTTP/2)",
            &self.hostile.delayed_resets,
        );
        row(&mut t, "non-readers (HTTP/2)", &self.hostile.non_readers);
        let p = &self.proxy_counts;
        let _ = writeln!(t, "\nproxy");
        let _ = writeln!(
            t,
            "  connections closed   {}",
            counts(&p.connections_closed)
        );
        let _ = writeln!(
            t,
            "  connections refused  {}",
            counts(&p.connections_refused)
        );
        let _ = writeln!(t, "  retries              {}", counts(&p.retries));
        let _ = writeln!(t, "  upstream attempts    {}", counts(&p.upstream_attempts));
        let _ = writeln!(
            t,
            "  ejections {}   retry budget exhausted {}   overloaded {}   outbound TLS failures {}",
            p.ejections,
            p.retry_budget_exhausted,
            counts(&p.overloaded),
            p.outbound_tls_failures
        );
        let _ = writeln!(
            t,
            "  after the clients left: {} client and {} backend connections open, open fds {} before / {} after; {}",
            p.open_connections_after,
            p.open_upstream_connections_after,
            p.open_fds[0],
            p.open_fds[1],
            p.exit
        );
        let m = &self.memory;
        let _ = writeln!(
            t,
            "\nmemory (proxy RSS)  before hostiles {}   peak during {}   after {} ({}{}, {})   idle {}",
            mib(m.before_bytes),
            mib(m.peak_bytes),
            mib(m.after_bytes),
            if m.growth_bytes >= 0 { "+" } else { "-" },
            mib(m.growth_bytes.unsigned_abs()),
            if m.flat { "flat" } else { "grew" },
            mib(m.idle_bytes)
        );
        if self.proxy_logged_failures.count > 0 {
            let _ = writeln!(
                t,
                "\nthe proxy logged {} well-behaved requests as failed; the first:",
                self.proxy_logged_failures.count
            );
            for l in &self.proxy_logged_failures.first {
                let _ = writeln!(t, "  {l}");
            }
        }
        let _ = writeln!(t, "\nchecks");
        for c in &self.checks {
            let _ = writeln!(
                t,
                "  {:<4}  {}: {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        let _ = writeln!(
            t,
            "\n{}",
            if self.passed {
                "soak passed"
            } else {
                "soak FAILED"
            }
        );
        t
    }
}

//! What a comparison reports: each round's figures per target, their
//! medians, and the renderings: a Markdown table with what each proxy adds
//! to the direct connection, JSON (through `Serialize`) and an SVG chart of
//! the latency curves.

use std::path::Path;

use serde::Serialize;

use super::spec::TargetKind;
use crate::load::LoadReport;

/// One target's figures from one round.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// Requests per second in the closed-loop phase.
    pub max_rps: Option<f64>,
    /// The open-loop phase.
    pub fixed_rate: LoadReport,
    /// The proxy's CPU seconds per request over the closed-loop phase's
    /// measured window: the cost of a request when the proxy is saturated.
    pub saturated_cpu_seconds_per_request: Option<f64>,
    /// Of those, the system CPU seconds: the kernel's share (sockets,
    /// wake-ups), which a proxy's own code can shrink only by making fewer
    /// system calls.
    pub saturated_system_seconds_per_request: Option<f64>,
    /// The proxy's CPU seconds per request over the open-loop phase's
    /// measured window.
    pub cpu_seconds_per_request: Option<f64>,
    /// The proxy's resident memory at the end of the closed-loop phase's
    /// measured window, with every connection of the load busy: with
    /// long streamed answers, the memory of that many open streams.
    pub saturated_rss_bytes: Option<u64>,
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
    /// Median proxy CPU microseconds per request in the closed-loop phase,
    /// saturated.
    pub saturated_cpu_micros_per_request: Option<f64>,
    /// Median system (kernel) CPU microseconds per request of those.
    pub saturated_system_micros_per_request: Option<f64>,
    /// Median proxy CPU microseconds per request at the fixed rate.
    pub cpu_micros_per_request: Option<f64>,
    /// Median requests the backends received per request.
    pub upstream_requests_per_request: Option<f64>,
    /// Resident memory of the proxy once started, before any load, in
    /// bytes.
    pub idle_rss_bytes: Option<u64>,
    /// Of that, the anonymous memory (heap, stacks, data): the proxy's
    /// own, where the rest is its program file's pages, which the page
    /// cache shares between every process running the same binary.
    pub idle_anon_bytes: Option<u64>,
    /// Resident memory of the proxy after every round, in bytes: what it
    /// keeps after load (caches, pools) against what it started with.
    pub rss_after_load_bytes: Option<u64>,
    /// Peak resident memory of the proxy, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Median resident memory of the proxy at the end of the closed-loop
    /// window, every connection busy, in bytes.
    pub saturated_rss_bytes: Option<u64>,
    /// What each busy connection of the closed loop added to the proxy's
    /// memory: the saturated memory less the idle one, divided by the
    /// connections, in bytes (the memory of one open stream when the
    /// answers are long streams).
    pub rss_per_connection_bytes: Option<f64>,
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

/// The median of `values`; `None` when there are none.
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

/// The memory of a target's proxies, added up, in bytes: when they had
/// started (`idle`), after the rounds (`after_load`) and at the highest
/// (`peak`); `None` where there is no process or it could not be read.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Memory {
    /// Once started, before any load.
    pub(super) idle: Option<u64>,
    /// Of `idle`, the anonymous memory: the proxies' own, not the pages
    /// of their program files that every process of the same binary
    /// shares ([`crate::process::Usage::anon_bytes`]).
    pub(super) idle_anon: Option<u64>,
    /// Now, after every round.
    pub(super) after_load: Option<u64>,
    /// The highest so far.
    pub(super) peak: Option<u64>,
}

/// The medians of `target`'s rounds, `measured`, with its proxies'
/// `memory`; the closed loop ran over `connections`.
pub(super) fn summarize(
    target: TargetKind,
    memory: Memory,
    measured: &[Measurement],
    connections: usize,
) -> Summary {
    let of =
        |f: &dyn Fn(&Measurement) -> Option<f64>| median(measured.iter().filter_map(f).collect());
    let saturated_rss = of(&|m| m.saturated_rss_bytes.map(|b| b as f64));
    let rss_per_connection = match (saturated_rss, memory.idle) {
        (Some(busy), Some(idle)) if connections > 0 => {
            Some((busy - idle as f64) / connections as f64)
        }
        _ => None,
    };
    Summary {
        target,
        max_rps: of(&|m| m.max_rps),
        p50: of(&|m| Some(m.fixed_rate.latency.p50)).unwrap_or_default(),
        p99: of(&|m| Some(m.fixed_rate.latency.p99)).unwrap_or_default(),
        p999: of(&|m| Some(m.fixed_rate.latency.p999)).unwrap_or_default(),
        saturated_cpu_micros_per_request: of(&|m| {
            m.saturated_cpu_seconds_per_request.map(|c| c * 1e6)
        }),
        saturated_system_micros_per_request: of(&|m| {
            m.saturated_system_seconds_per_request.map(|c| c * 1e6)
        }),
        cpu_micros_per_request: of(&|m| m.cpu_seconds_per_request.map(|c| c * 1e6)),
        upstream_requests_per_request: of(&|m| m.upstream_requests_per_request),
        idle_rss_bytes: memory.idle,
        idle_anon_bytes: memory.idle_anon,
        rss_after_load_bytes: memory.after_load,
        peak_rss_bytes: memory.peak,
        saturated_rss_bytes: saturated_rss.map(|b| b as u64),
        rss_per_connection_bytes: rss_per_connection,
        failed: measured.iter().map(|m| m.fixed_rate.errors.total()).sum(),
    }
}

impl ComparisonReport {
    /// The medians as a Markdown table, with ratios to the direct target.
    pub fn markdown(&self) -> String {
        let direct = self.summary.iter().find(|s| s.target == TargetKind::Direct);
        let mut out = format!("{}.\n\n", self.setup);
        out.push_str("| target | max req/s | vs direct | p50 ms | added p50 ms | p99 ms | added p99 ms | p99.9 ms | added p99.9 ms | proxy CPU µs/req saturated | of which kernel µs/req | proxy CPU µs/req at rate | proxy RSS idle MiB | of which anonymous MiB | proxy RSS after load MiB | proxy peak RSS MiB | proxy RSS saturated MiB | proxy KiB per connection saturated | backend req/req | failed |\n");
        out.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for s in &self.summary {
            out.push_str(&markdown_row(s, direct));
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

/// The Markdown row of `s`, compared with `direct` when it was measured.
fn markdown_row(s: &Summary, direct: Option<&Summary>) -> String {
    let f = |v: Option<f64>, digits: usize| v.map_or("—".to_owned(), |v| format!("{v:.digits$}"));
    let ratio = match (s.max_rps, direct.and_then(|d| d.max_rps)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let added = |mine: f64, theirs: fn(&Summary) -> f64| direct.map(|d| (mine - theirs(d)) * 1e3);
    let mib = |bytes: Option<u64>| f(bytes.map(|b| b as f64 / 1_048_576.0), 1);
    format!(
        "| {} | {} | {} | {:.3} | {} | {:.3} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        s.target.name(),
        f(s.max_rps, 0),
        f(ratio, 2),
        s.p50 * 1e3,
        f(added(s.p50, |d| d.p50), 3),
        s.p99 * 1e3,
        f(added(s.p99, |d| d.p99), 3),
        s.p999 * 1e3,
        f(added(s.p999, |d| d.p999), 3),
        f(s.saturated_cpu_micros_per_request, 1),
        f(s.saturated_system_micros_per_request, 1),
        f(s.cpu_micros_per_request, 1),
        mib(s.idle_rss_bytes),
        mib(s.idle_anon_bytes),
        mib(s.rss_after_load_bytes),
        mib(s.peak_rss_bytes),
        mib(s.saturated_rss_bytes),
        f(s.rss_per_connection_bytes.map(|b| b / 1024.0), 1),
        f(s.upstream_requests_per_request, 4),
        s.failed,
    )
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

    fn summary(target: TargetKind, max_rps: f64, p50: f64) -> Summary {
        Summary {
            target,
            max_rps: Some(max_rps),
            p50,
            p99: 2.0 * p50,
            p999: 3.0 * p50,
            saturated_cpu_micros_per_request: Some(31.3),
            saturated_system_micros_per_request: Some(20.1),
            cpu_micros_per_request: None,
            upstream_requests_per_request: Some(1.0),
            idle_rss_bytes: Some(1_048_576),
            idle_anon_bytes: Some(1_048_576 / 2),
            rss_after_load_bytes: Some(3 * 1_048_576 / 2),
            peak_rss_bytes: Some(2 * 1_048_576),
            saturated_rss_bytes: Some(3 * 1_048_576),
            rss_per_connection_bytes: Some(2.0 * 1_048_576.0 / 64.0),
            failed: 0,
        }
    }

    #[test]
    fn memory_per_connection_is_the_saturated_growth_over_idle() {
        let round = |rss: u64| Measurement {
            max_rps: Some(10.0),
            fixed_rate: LoadReport::default(),
            saturated_cpu_seconds_per_request: None,
            saturated_system_seconds_per_request: None,
            cpu_seconds_per_request: None,
            saturated_rss_bytes: Some(rss),
            upstream_requests_per_request: None,
        };
        let idle = 10 * 1_048_576;
        let memory = Memory {
            idle: Some(idle),
            idle_anon: None,
            after_load: None,
            peak: None,
        };
        // Medians: 1,000 connections holding 30 MiB more than idle.
        let rounds = [
            round(idle + 20 * 1_048_576),
            round(idle + 30 * 1_048_576),
            round(idle + 90 * 1_048_576),
        ];
        let summary = summarize(TargetKind::Infermesh, memory, &rounds, 1000);
        assert_eq!(summary.saturated_rss_bytes, Some(idle + 30 * 1_048_576));
        let per_connection = summary.rss_per_connection_bytes.unwrap();
        assert!(
            (per_connection - 30.0 * 1_048_576.0 / 1000.0).abs() < 1e-6,
            "{per_connection}"
        );
        // Without the idle reading there is nothing to subtract from.
        let unknown = summarize(TargetKind::Infermesh, Memory::default(), &rounds, 1000);
        assert_eq!(unknown.rss_per_connection_bytes, None);
    }

    #[test]
    fn the_table_has_a_row_per_target_against_direct() {
        let report = ComparisonReport {
            rounds: Vec::new(),
            summary: vec![
                summary(TargetKind::Direct, 1000.0, 0.001),
                summary(TargetKind::Infermesh, 800.0, 0.0015),
                summary(TargetKind::InfermeshBaseline, 500.0, 0.002),
            ],
            skipped: vec![(TargetKind::Nginx, "nginx is not installed".into())],
            setup: "1 rounds".into(),
        };
        let table = report.markdown();
        assert!(table.starts_with("1 rounds.\n\n| target |"), "{table}");
        assert!(
            table.contains(
                "| infermesh | 800 | 0.80 | 1.500 | 0.500 | 3.000 | 1.000 | 4.500 | 1.500 | 31.3 | 20.1 | — | 1.0 | 0.5 | 1.5 | 2.0 | 3.0 | 32.0 | 1.0000 | 0 |\n"
            ),
            "{table}"
        );
        assert!(
            table.contains("| infermesh-baseline | 500 | 0.50 | 2.000 | 1.000 |"),
            "{table}"
        );
        assert!(
            table.ends_with("\nnginx skipped: nginx is not installed\n"),
            "{table}"
        );
    }
}

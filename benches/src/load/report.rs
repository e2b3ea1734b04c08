//! The result of a load run: numbers for people (a table) and for machines
//! (JSON, which `infermesh-bench plot` and `compare` read back).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::stats::{Errors, Recorder};

/// Latency percentiles, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p999: f64,
    /// 99.99th percentile.
    #[serde(rename = "p99.99")]
    pub p9999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let s = |micros: u64| micros as f64 / 1e6;
        Percentiles {
            min: s(h.min()),
            mean: h.mean() / 1e6,
            p50: s(h.value_at_quantile(0.50)),
            p90: s(h.value_at_quantile(0.90)),
            p99: s(h.value_at_quantile(0.99)),
            p999: s(h.value_at_quantile(0.999)),
            p9999: s(h.value_at_quantile(0.9999)),
            max: s(h.max()),
        }
    }
}

/// Streamed (server-sent events) responses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamReport {
    /// Streamed responses.
    pub streams: u64,
    /// Events received.
    pub events: u64,
    /// Events per second over the measured window.
    pub events_per_second: f64,
    /// From each request's start to its first event.
    pub time_to_first_event: Percentiles,
    /// Between consecutive events of a stream.
    pub inter_event_gap: Percentiles,
}

/// CPU the generator itself used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorCpu {
    /// CPU seconds used during the measured window.
    pub seconds: f64,
    /// That, divided by the window: cores kept busy.
    pub cores: f64,
    /// Cores the machine has.
    pub available_cores: usize,
}

/// Everything a load run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    /// A name for charts and tables (default: the URL).
    pub label: String,
    /// The target URL.
    pub url: String,
    /// `http1` or `http2`.
    pub protocol: String,
    /// Requests per second asked for; none in closed-loop mode.
    pub requested_rate: Option<f64>,
    /// Connections opened.
    pub connections: usize,
    /// Requests in flight at most (workers).
    pub concurrency: usize,
    /// Length of the measured window.
    pub duration_seconds: f64,
    /// Warm-up before it, not measured.
    pub warmup_seconds: f64,
    /// Requests finished in the window (succeeded or failed).
    pub requests: u64,
    /// Responses with a 1xx-3xx status.
    pub ok: u64,
    /// Failures by kind.
    pub errors: Errors,
    /// Failures divided by requests.
    pub error_rate: f64,
    /// Requests sent per second during the window.
    pub achieved_rate: f64,
    /// Whether the generator sent noticeably fewer requests than asked.
    pub behind_schedule: bool,
    /// Response body bytes per second.
    pub bytes_per_second: f64,
    /// Latency from each request's intended send time (corrected for
    /// coordinated omission) to its last response byte.
    pub latency: Percentiles,
    /// Latency from the actual send time: what the server alone took.
    pub service_time: Percentiles,
    /// How late requests went out after their intended time.
    pub send_lag: Percentiles,
    /// Server-sent-event timings, when responses streamed.
    pub stream: Option<StreamReport>,
    /// The generator's own CPU use.
    pub generator_cpu: GeneratorCpu,
    /// The latency distribution as `[percentile, seconds]` points, for
    /// percentile plots.
    pub spectrum: Vec<[f64; 2]>,
}

/// The share of the requested rate below which the generator is reported as
/// having fallen behind.
pub(crate) const BEHIND_SCHEDULE: f64 = 0.95;

impl LoadReport {
    /// Assembles a report from the merged records.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        label: String,
        url: String,
        protocol: String,
        requested_rate: Option<f64>,
        connections: usize,
        concurrency: usize,
        duration: std::time::Duration,
        warmup: std::time::Duration,
        records: &Recorder,
        generator_cpu: GeneratorCpu,
    ) -> Self {
        let seconds = duration.as_secs_f64().max(f64::MIN_POSITIVE);
        let requests = records.finished();
        let achieved_rate = records.sent as f64 / seconds;
        let stream = (records.streams > 0).then(|| StreamReport {
            streams: records.streams,
            events: records.events,
            events_per_second: records.events as f64 / seconds,
            time_to_first_event: Percentiles::of(&records.first_event),
            inter_event_gap: Percentiles::of(&records.event_gaps),
        });
        LoadReport {
            label,
            url,
            protocol,
            requested_rate,
            connections,
            concurrency,
            duration_seconds: duration.as_secs_f64(),
            warmup_seconds: warmup.as_secs_f64(),
            requests,
            ok: records.ok,
            errors: records.errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                records.errors.total() as f64 / requests as f64
            },
            achieved_rate,
            behind_schedule: requested_rate.is_some_and(|r| achieved_rate < r * BEHIND_SCHEDULE),
            bytes_per_second: records.bytes as f64 / seconds,
            latency: Percentiles::of(&records.latency),
            service_time: Percentiles::of(&records.service),
            send_lag: Percentiles::of(&records.send_lag),
            stream,
            generator_cpu,
            spectrum: spectrum(&records.latency),
        }
    }

    /// Warnings a person must not miss.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.behind_schedule {
            let requested = self.requested_rate.unwrap_or_default();
            out.push(format!(
                "WARNING: the generator fell behind its schedule: {:.1} req/s sent of {requested:.1} requested (requests went out up to {} late, p99 {}). Latencies are still measured from the intended send times, but the server saw less load than asked; add --connections (or use HTTP/2) if responses are slow, or a bigger machine if the generator is busy.",
                self.achieved_rate,
                ms(self.send_lag.max),
                ms(self.send_lag.p99),
            ));
        }
        let busy = self.generator_cpu.cores / self.generator_cpu.available_cores.max(1) as f64;
        if busy > 0.9 {
            out.push(format!(
                "WARNING: the generator kept {:.2} of {} cores busy: it may be the bottleneck, not the server.",
                self.generator_cpu.cores, self.generator_cpu.available_cores
            ));
        }
        if self.requests == 0 {
            out.push("WARNING: no request finished in the measured window.".into());
        }
        out
    }

    /// The report as a readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mode = match self.requested_rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop (as fast as responses allow)".into(),
        };
        let _ = writeln!(
            t,
            "{}: {mode}, {} connections, {} in flight at most, {}, {:.1}s measured after {:.1}s warm-up",
            self.label,
            self.connections,
            self.concurrency,
            self.protocol,
            self.duration_seconds,
            self.warmup_seconds
        );
        let _ = writeln!(t, "  {}", self.url);
        let _ = writeln!(
            t,
            "\n  requests   {:>10}   ok {}   errors {} ({:.2}%)",
            self.requests,
            self.ok,
            self.errors.total(),
            self.error_rate * 100.0
        );
        match self.requested_rate {
            Some(r) => {
                let _ = writeln!(
                    t,
                    "  rate       {:>10.1} req/s sent, {r} requested",
                    self.achieved_rate
                );
            }
            None => {
                let _ = writeln!(t, "  rate       {:>10.1} req/s", self.achieved_rate);
            }
        }
        let _ = writeln!(t, "  transfer   {:>10.2} MB/s", self.bytes_per_second / 1e6);
        let heading = if self.requested_rate.is_some() {
            "latency, from intended send time (corrected for coordinated omission)"
        } else {
            "latency"
        };
        let _ = writeln!(t, "\n  {heading}");
        row(&mut t, &self.latency);
        if self.requested_rate.is_some() {
            let _ = writeln!(t, "  service time, from actual send time");
            row(&mut t, &self.service_time);
        }
        if let Some(s) = &self.stream {
            let _ = writeln!(
                t,
                "\n  streams    {:>10}   events {} ({:.1}/s)",
                s.streams, s.events, s.events_per_second
            );
            let _ = writeln!(t, "  time to first event");
            row(&mut t, &s.time_to_first_event);
            let _ = writeln!(t, "  gap between events");
            row(&mut t, &s.inter_event_gap);
        }
        let e = &self.errors;
        let _ = writeln!(
            t,
            "\n  errors     connect {}  timeout {}  io {}  4xx {}  5xx {}",
            e.connect, e.timeout, e.io, e.status_4xx, e.status_5xx
        );
        let _ = writeln!(
            t,
            "  generator  {:.2} CPU cores busy of {}",
            self.generator_cpu.cores, self.generator_cpu.available_cores
        );
        for w in self.warnings() {
            let _ = writeln!(t, "\n{w}");
        }
        t
    }
}

fn row(t: &mut String, p: &Percentiles) {
    let _ = writeln!(
        t,
        "    p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.p9999),
        ms(p.max)
    );
}

/// Seconds as milliseconds, with three decimals.
pub fn ms(seconds: f64) -> String {
    format!("{:.3}ms", seconds * 1e3)
}

/// `[percentile, seconds]` points of a latency histogram, denser towards
/// the tail (HdrHistogram's percentile spectrum).
fn spectrum(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<[f64; 2]> = h
        .iter_quantiles(5)
        .map(|v| {
            [
                v.quantile_iterated_to() * 100.0,
                v.value_iterated_to() as f64 / 1e6,
            ]
        })
        .collect();
    points.dedup_by(|a, b| a[0] == b[0]);
    points
}

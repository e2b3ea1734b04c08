//! One visit of one target: the load as the file asks for it (`LoadPlan`),
//! a closed-loop phase for the highest throughput, then an open-loop phase
//! at the fixed rate for latency. The proxy's CPU time is read at the start
//! and the end of each phase's measured window (so CPU per request at
//! saturation and at the rate), and the requests the mock servers received
//! around the open-loop phase.

use std::net::SocketAddr;

use super::report::Measurement;
use super::spec::LoadSpec;
use super::targets::Ready;
use crate::load::{self, LoadOptions, LoadReport, Protocol, RequestTemplate, Template};
use crate::process::Usage;

/// The load of a comparison, resolved: what every visit sends, and how.
pub(super) struct LoadPlan<'a> {
    /// The load as the file gives it.
    pub(super) spec: &'a LoadSpec,
    /// The request path (the template's, if there is one).
    pub(super) path: String,
    /// What each request sends.
    pub(super) request: RequestTemplate,
    /// The HTTP version.
    protocol: Protocol,
}

impl<'a> LoadPlan<'a> {
    /// Resolves `spec`: its template (by name) and protocol; an error names
    /// the field that is wrong.
    pub(super) fn new(spec: &'a LoadSpec) -> anyhow::Result<Self> {
        let template = match &spec.template {
            None => None,
            Some(name) => Some(
                <Template as clap::ValueEnum>::from_str(name, true)
                    .map_err(|_| anyhow::anyhow!("load.template: unknown template {name:?}"))?,
            ),
        };
        let path = template.map_or_else(|| spec.path.clone(), |t| t.path(&spec.model));
        let request = template.map_or_else(RequestTemplate::default, |t| t.request(&spec.model));
        let protocol = match spec.protocol.as_str() {
            "http1" => Protocol::Http1,
            "http2" => Protocol::Http2,
            other => anyhow::bail!("load.protocol: {other:?} is neither http1 nor http2"),
        };
        Ok(LoadPlan {
            spec,
            path,
            request,
            protocol,
        })
    }

    /// The options of one phase against `url`: open loop at `rate`, or
    /// closed loop without one; `label` names the run in the chart.
    fn options(&self, url: &str, rate: Option<f64>, label: &str) -> LoadOptions {
        let mut o = LoadOptions::new(url);
        o.rate = rate;
        o.connections = self.spec.connections;
        o.duration = self.spec.duration.get();
        o.warmup = self.spec.warmup.get();
        o.protocol = self.protocol;
        o.request = self.request.clone();
        o.label = Some(label.to_owned());
        o
    }
}

/// Loads `target` once as `plan` says (the closed-loop phase when asked
/// for, then the open-loop phase). `mocks` are the mock servers whose
/// request counts are read; `None` with a static backend, which counts
/// nothing.
pub(super) async fn visit(
    target: &Ready,
    plan: &LoadPlan<'_>,
    mocks: Option<&[SocketAddr]>,
) -> anyhow::Result<Measurement> {
    let url = format!("{}{}", target.url, plan.path);
    let saturated = if plan.spec.max_throughput {
        Some(closed_loop(target, plan, &url).await?)
    } else {
        None
    };
    let fixed = open_loop(target, plan, &url, mocks).await?;
    Ok(Measurement {
        max_rps: saturated.as_ref().map(|s| s.rps),
        fixed_rate: fixed.report,
        saturated_cpu_seconds_per_request: saturated
            .as_ref()
            .and_then(|s| s.cpu_seconds_per_request),
        saturated_system_seconds_per_request: saturated
            .as_ref()
            .and_then(|s| s.system_seconds_per_request),
        saturated_rss_bytes: saturated.and_then(|s| s.rss_bytes),
        cpu_seconds_per_request: fixed.cpu_seconds_per_request,
        upstream_requests_per_request: fixed.upstream_requests_per_request,
    })
}

/// What the closed-loop phase measured.
struct Saturated {
    /// Requests per second.
    rps: f64,
    /// The proxy's CPU seconds per request over the measured window.
    cpu_seconds_per_request: Option<f64>,
    /// Of which system (kernel) CPU seconds.
    system_seconds_per_request: Option<f64>,
    /// The proxy's resident memory at the end of the measured window,
    /// every connection still busy.
    rss_bytes: Option<u64>,
}

/// The closed-loop phase: requests per second, as fast as the target
/// answers over the connections, and what each cost the proxy then.
async fn closed_loop(target: &Ready, plan: &LoadPlan<'_>, url: &str) -> anyhow::Result<Saturated> {
    let (report, window) = load::run_observed(
        plan.options(url, None, target.kind.name()),
        target.usage_reader(),
    )
    .await?;
    let rss_bytes = window
        .as_ref()
        .and_then(|[_, end]| end.as_ref())
        .map(|u| u.rss_bytes);
    Ok(Saturated {
        rps: report.achieved_rate,
        cpu_seconds_per_request: window_cpu_per_request(window, report.requests, Cpu::All),
        system_seconds_per_request: window_cpu_per_request(window, report.requests, Cpu::System),
        rss_bytes,
    })
}

/// What the open-loop phase measured.
struct FixedRate {
    /// The load generator's report.
    report: LoadReport,
    /// The proxy's CPU seconds per request over the measured window.
    cpu_seconds_per_request: Option<f64>,
    /// Requests the mock servers received per request sent.
    upstream_requests_per_request: Option<f64>,
}

/// The open-loop phase at the file's rate, with the target's CPU time read
/// at the start and the end of the measured window, and the requests of
/// the mock servers `mocks` (if any) counted before and after the phase.
async fn open_loop(
    target: &Ready,
    plan: &LoadPlan<'_>,
    url: &str,
    mocks: Option<&[SocketAddr]>,
) -> anyhow::Result<FixedRate> {
    let rate = plan.spec.rate;
    let sent_before = mock_requests(mocks).await;
    let (report, window) = load::run_observed(
        plan.options(url, Some(rate), target.kind.name()),
        target.usage_reader(),
    )
    .await?;
    let sent_after = mock_requests(mocks).await;
    // The open loop sends its warm-up on the same schedule (request n due
    // at n / rate), and the backends see those too.
    let sent = report.requests as f64 + (rate * report.warmup_seconds).floor();
    let upstream_requests_per_request = match (sent_before, sent_after) {
        (Some(b), Some(a)) if sent > 0.0 => Some((a - b) / sent),
        _ => None,
    };
    let cpu_seconds_per_request = window_cpu_per_request(window, report.requests, Cpu::All);
    Ok(FixedRate {
        report,
        cpu_seconds_per_request,
        upstream_requests_per_request,
    })
}

/// Which CPU time is counted.
#[derive(Clone, Copy)]
enum Cpu {
    /// User and system.
    All,
    /// System only: the kernel's work for the process.
    System,
}

impl Cpu {
    fn seconds(self, usage: &Usage) -> f64 {
        match self {
            Cpu::All => usage.cpu_seconds,
            Cpu::System => usage.system_seconds,
        }
    }
}

/// `cpu` seconds spent over a measured window, read at its start and end
/// (`window`), per request of the `requests` it counted; `None` without
/// readings, processes or requests.
fn window_cpu_per_request(
    window: Option<[Option<Usage>; 2]>,
    requests: u64,
    cpu: Cpu,
) -> Option<f64> {
    let [before, after] = window?;
    cpu_per_request(before, after, requests, cpu)
}

/// `cpu` seconds spent between `before` and `after` per request of
/// `requests`; `None` without processes or requests.
fn cpu_per_request(
    before: Option<Usage>,
    after: Option<Usage>,
    requests: u64,
    cpu: Cpu,
) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if requests > 0 => {
            Some((cpu.seconds(&a) - cpu.seconds(&b)) / requests as f64)
        }
        _ => None,
    }
}

/// The progress line of one visit: round `round` of `rounds`, `target`'s
/// `measured` figures at the open-loop `rate`.
pub(super) fn progress_line(
    round: usize,
    rounds: usize,
    target: &Ready,
    rate: f64,
    measured: &Measurement,
) -> String {
    let fixed = &measured.fixed_rate;
    format!(
        "round {round}/{rounds} {:>10}: {} max{}; at {rate}/s p50 {} p99 {} ({} failed){}",
        target.kind.name(),
        measured
            .max_rps
            .map_or("-".into(), |r| format!("{r:.0} req/s")),
        measured
            .saturated_cpu_seconds_per_request
            .map_or(String::new(), |c| format!(
                " (proxy CPU {:.1} µs/req)",
                c * 1e6
            )),
        load::ms(fixed.latency.p50),
        load::ms(fixed.latency.p99),
        fixed.errors.total(),
        measured
            .cpu_seconds_per_request
            .map_or(String::new(), |c| format!(
                "; proxy CPU {:.1} µs/req",
                c * 1e6
            )),
    )
}

/// Requests the mock servers at `mocks` received so far, from their
/// `/metrics` pages (`infermesh_mock_requests_total`); `None` without mock
/// servers (a static backend) or when a page cannot be read.
async fn mock_requests(mocks: Option<&[SocketAddr]>) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut total = 0.0;
    for backend in mocks? {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(template: Option<&str>, protocol: &str) -> LoadSpec {
        LoadSpec {
            path: "/v1/models".into(),
            template: template.map(str::to_owned),
            model: "m".into(),
            rate: 100.0,
            max_throughput: true,
            connections: 4,
            duration: infermesh_api::Duration::from_secs(1),
            warmup: infermesh_api::Duration::from_secs(1),
            protocol: protocol.into(),
        }
    }

    #[test]
    fn a_template_gives_the_path_and_the_request() {
        let s = spec(Some("openai-chat"), "http2");
        let plan = LoadPlan::new(&s).unwrap();
        assert_eq!(plan.path, "/v1/chat/completions");
        assert_eq!(plan.request.method, http::Method::POST);
        let o = plan.options("http://127.0.0.1:1/x", Some(50.0), "infermesh");
        assert_eq!(o.protocol, Protocol::Http2);
        assert_eq!((o.rate, o.connections), (Some(50.0), 4));
        assert_eq!(o.label.as_deref(), Some("infermesh"));

        let s = spec(None, "http1");
        let plan = LoadPlan::new(&s).unwrap();
        assert_eq!(plan.path, "/v1/models");
        assert_eq!(plan.request.method, http::Method::GET);
    }

    #[test]
    fn the_load_carries_no_trace_context() {
        // So that a traced proxy starts a trace for every request and its
        // sampling ratio alone decides which are recorded.
        use clap::ValueEnum as _;
        let mut templates: Vec<Option<String>> = Template::value_variants()
            .iter()
            .map(|t| Some(t.to_possible_value().unwrap().get_name().to_owned()))
            .collect();
        templates.push(None);
        for template in templates {
            let s = spec(template.as_deref(), "http1");
            let plan = LoadPlan::new(&s).unwrap();
            for name in ["traceparent", "tracestate", "b3", "x-b3-traceid"] {
                assert!(
                    !plan.request.headers.contains_key(name),
                    "{template:?} sends {name}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_load_names_its_field() {
        let s = spec(Some("no-such"), "http1");
        let error = LoadPlan::new(&s).err().unwrap().to_string();
        assert!(error.starts_with("load.template:"), "{error}");
        let s = spec(None, "http3");
        let error = LoadPlan::new(&s).err().unwrap().to_string();
        assert!(error.starts_with("load.protocol:"), "{error}");
    }

    #[test]
    fn cpu_per_request_needs_both_readings_and_requests() {
        let at = |cpu_seconds| {
            Some(Usage {
                cpu_seconds,
                system_seconds: cpu_seconds / 4.0,
                ..Usage::default()
            })
        };
        assert_eq!(cpu_per_request(at(1.0), at(3.0), 4, Cpu::All), Some(0.5));
        assert_eq!(
            cpu_per_request(at(1.0), at(3.0), 4, Cpu::System),
            Some(0.125)
        );
        assert_eq!(cpu_per_request(at(1.0), at(3.0), 0, Cpu::All), None);
        assert_eq!(cpu_per_request(None, at(3.0), 4, Cpu::All), None);
        assert_eq!(
            window_cpu_per_request(Some([at(1.0), at(3.0)]), 4, Cpu::All),
            Some(0.5)
        );
        assert_eq!(window_cpu_per_request(None, 4, Cpu::System), None);
    }

    #[tokio::test]
    async fn a_static_backend_counts_no_requests() {
        assert_eq!(mock_requests(None).await, None);
        assert_eq!(mock_requests(Some(&[])).await, Some(0.0));
    }
}

//! One visit of one target: the load as the file asks for it (`LoadPlan`),
//! a closed-loop phase for the highest throughput, then an open-loop phase
//! at the fixed rate for latency, around which the proxy's CPU time and
//! the requests the mock servers received are read.

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
/// for, then the open-loop phase), with the mock servers at `backends`.
pub(super) async fn visit(
    target: &Ready,
    plan: &LoadPlan<'_>,
    backends: &[SocketAddr],
) -> anyhow::Result<Measurement> {
    let url = format!("{}{}", target.url, plan.path);
    let max_rps = if plan.spec.max_throughput {
        Some(closed_loop(target, plan, &url).await?)
    } else {
        None
    };
    let fixed = open_loop(target, plan, &url, backends).await?;
    Ok(Measurement {
        max_rps,
        fixed_rate: fixed.report,
        cpu_seconds_per_request: fixed.cpu_seconds_per_request,
        upstream_requests_per_request: fixed.upstream_requests_per_request,
    })
}

/// The closed-loop phase: requests per second, as fast as the target
/// answers over the connections.
async fn closed_loop(target: &Ready, plan: &LoadPlan<'_>, url: &str) -> anyhow::Result<f64> {
    let report = load::run(plan.options(url, None, target.kind.name())).await?;
    Ok(report.achieved_rate)
}

/// What the open-loop phase measured.
struct FixedRate {
    /// The load generator's report.
    report: LoadReport,
    /// The proxy's CPU seconds per measured request.
    cpu_seconds_per_request: Option<f64>,
    /// Requests the mock servers received per request sent.
    upstream_requests_per_request: Option<f64>,
}

/// The open-loop phase at the file's rate, with the target's CPU time and
/// the mock servers' request counts read before and after.
async fn open_loop(
    target: &Ready,
    plan: &LoadPlan<'_>,
    url: &str,
    backends: &[SocketAddr],
) -> anyhow::Result<FixedRate> {
    let rate = plan.spec.rate;
    let before = target.usage();
    let sent_before = mock_requests(backends).await;
    let report = load::run(plan.options(url, Some(rate), target.kind.name())).await?;
    let after = target.usage();
    let sent_after = mock_requests(backends).await;
    // The open loop sends its warm-up on the same schedule (request n due
    // at n / rate), and the backends see those too.
    let sent = report.requests as f64 + (rate * report.warmup_seconds).floor();
    let upstream_requests_per_request = match (sent_before, sent_after) {
        (Some(b), Some(a)) if sent > 0.0 => Some((a - b) / sent),
        _ => None,
    };
    let cpu_seconds_per_request = cpu_per_request(before, after, report.requests);
    Ok(FixedRate {
        report,
        cpu_seconds_per_request,
        upstream_requests_per_request,
    })
}

/// CPU seconds spent between `before` and `after` per request of
/// `requests`; `None` without processes or requests.
fn cpu_per_request(before: Option<Usage>, after: Option<Usage>, requests: u64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if requests > 0 => {
            Some((a.cpu_seconds - b.cpu_seconds) / requests as f64)
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
        "round {round}/{rounds} {:>10}: {} max; at {rate}/s p50 {} p99 {} ({} failed){}",
        target.kind.name(),
        measured
            .max_rps
            .map_or("-".into(), |r| format!("{r:.0} req/s")),
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
                ..Usage::default()
            })
        };
        assert_eq!(cpu_per_request(at(1.0), at(3.0), 4), Some(0.5));
        assert_eq!(cpu_per_request(at(1.0), at(3.0), 0), None);
        assert_eq!(cpu_per_request(None, at(3.0), 4), None);
    }
}

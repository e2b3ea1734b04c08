//! infermesh's trace export, shared by the proxy and the control plane:
//! the OTLP exporter (gRPC or HTTP/protobuf, the official
//! `opentelemetry-otlp`), the parent-based ratio sampler, the bounded
//! queue between the code that ends spans and the exporter, and the
//! command-line flags that configure them ([`TraceArgs`]).
//!
//! The queue is infermesh's own rather than the SDK's batch processor for
//! two reasons: a span that does not fit is dropped *and counted*
//! (`infermesh_trace_spans_dropped_total`; the SDK's processor only logs
//! it), and the export runs as a task on the process's runtime instead of
//! a thread of its own. Ending a span is a `try_send` on a bounded
//! channel: it never waits.
//!
//! The standard OpenTelemetry environment variables apply:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`),
//! `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, and the batch settings
//! `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY` and
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
pub use opentelemetry_sdk::trace::SdkTracer;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::sync::{mpsc, oneshot};

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (a collector's port 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318, `/v1/traces`):
    /// the OpenTelemetry default.
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// The tracing flags, the same for every infermesh binary.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Tracing")]
pub struct TraceArgs {
    /// Export traces over OTLP to this collector (`http://HOST:4318` for
    /// HTTP/protobuf, `/v1/traces` added when the URL has no path;
    /// `http://HOST:4317` for gRPC). Without it, tracing is on only when
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is
    /// set; off, it costs nothing and trace headers pass through untouched.
    #[arg(long, value_name = "URL", global = true)]
    pub trace_otlp_endpoint: Option<String>,
    /// The OTLP transport (OpenTelemetry's default is http/protobuf).
    #[arg(long, value_enum, value_name = "PROTOCOL", default_value_t = OtlpProtocol::HttpProtobuf, env = "OTEL_EXPORTER_OTLP_PROTOCOL", global = true)]
    pub trace_otlp_protocol: OtlpProtocol,
    /// The share of new traces recorded, from 0 to 1 (parent-based: a
    /// request whose caller sampled its trace is recorded, one whose
    /// caller did not is not, whatever this says).
    #[arg(long, value_name = "RATIO", default_value_t = 1.0, value_parser = parse_sampling, env = "INFERMESH_TRACE_SAMPLING", global = true)]
    pub trace_sampling: f64,
    /// The `service.name` of the spans (default: the binary's name).
    #[arg(long, value_name = "NAME", env = "OTEL_SERVICE_NAME", global = true)]
    pub trace_service_name: Option<String>,
}

impl TraceArgs {
    /// The options, when tracing is on; spans named for `service` unless
    /// a name was given.
    pub fn options(&self, service: &str) -> Option<TraceOptions> {
        TraceOptions::enabled(self.trace_otlp_endpoint.as_deref()).then(|| TraceOptions {
            endpoint: self.trace_otlp_endpoint.clone(),
            protocol: self.trace_otlp_protocol,
            sampling: self.trace_sampling,
            service_name: self
                .trace_service_name
                .clone()
                .unwrap_or_else(|| service.to_owned()),
        })
    }
}

/// How a process traces, when it does.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    /// The collector: `http://HOST:PORT`; for HTTP/protobuf, a URL with
    /// no path gets `/v1/traces`. `None`: the exporter reads
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
    /// The transport.
    pub protocol: OtlpProtocol,
    /// The share of new traces (requests that come with no sampled parent)
    /// that are recorded, 0.0 to 1.0; a request whose parent was sampled
    /// is recorded, one whose parent was not is not (parent-based).
    pub sampling: f64,
    /// `service.name` of the proxy's spans.
    pub service_name: String,
}

impl TraceOptions {
    /// Whether tracing is on: an endpoint given by flag or by the
    /// OpenTelemetry environment.
    pub fn enabled(endpoint: Option<&str>) -> bool {
        endpoint.is_some()
            || [
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ]
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
    }
}

/// Parses a sampling ratio, refusing what is not within 0.0..=1.0.
pub fn parse_sampling(text: &str) -> Result<f64, String> {
    let ratio: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(format!("{ratio} is not a ratio between 0.0 and 1.0"))
    }
}

/// The running exporter: the tracer spans are made with, and the handle
/// that flushes it at shutdown.
pub struct Traces {
    /// What spans are made with.
    pub tracer: SdkTracer,
    provider: SdkTracerProvider,
    flush: mpsc::Sender<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

/// The exporter's counters.
#[derive(Clone, Debug)]
struct ExportMetrics {
    /// `infermesh_trace_spans_dropped_total`.
    dropped: IntCounter,
    /// `infermesh_trace_spans_exported_total{result}`.
    exported: IntCounterVec,
}

/// The batch settings, from the OpenTelemetry environment variables or
/// their specified defaults.
#[derive(Clone, Copy, Debug)]
struct Batching {
    queue: usize,
    delay: Duration,
    batch: usize,
}

impl Batching {
    fn from_env() -> Self {
        let read = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        let queue = read("OTEL_BSP_MAX_QUEUE_SIZE", 2048) as usize;
        Batching {
            queue,
            delay: Duration::from_millis(read("OTEL_BSP_SCHEDULE_DELAY", 5000)),
            batch: (read("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512) as usize).min(queue),
        }
    }
}

/// Starts exporting as `options` say; the exporter's metrics are handed
/// to `register`. Must run on the process's runtime (the export is a
/// task on it).
pub fn start(
    options: &TraceOptions,
    mut register: impl FnMut(Box<dyn Collector>),
) -> anyhow::Result<Traces> {
    let endpoint = options.endpoint.as_deref().map(|e| match options.protocol {
        OtlpProtocol::HttpProtobuf => with_traces_path(e),
        OtlpProtocol::Grpc => e.to_owned(),
    });
    let mut exporter = match options.protocol {
        OtlpProtocol::Grpc => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc);
            match endpoint {
                Some(e) => builder.with_endpoint(e).build(),
                None => builder.build(),
            }
        }
        OtlpProtocol::HttpProtobuf => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            match endpoint {
                Some(e) => builder.with_endpoint(e).build(),
                None => builder.build(),
            }
        }
    }
    .map_err(|e| anyhow::anyhow!("cannot export traces: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(options.service_name.clone())
        .build();
    exporter.set_resource(&resource);

    let dropped = IntCounter::new(
        "infermesh_trace_spans_dropped_total",
        "Finished spans dropped because the export queue was full (the collector slow or away).",
    )
    .expect("a valid counter");
    let exported = IntCounterVec::new(
        Opts::new(
            "infermesh_trace_spans_exported_total",
            "Spans handed to the OTLP exporter, by result (ok, failed).",
        ),
        &["result"],
    )
    .expect("a valid counter");
    // Both results from the start, at 0: an alert on `increase()` sees
    // the first failure.
    for result in ["ok", "failed"] {
        exported.with_label_values(&[result]);
    }
    register(Box::new(dropped.clone()));
    register(Box::new(exported.clone()));
    let metrics = ExportMetrics { dropped, exported };
    let batching = Batching::from_env();
    let (spans, queue) = mpsc::channel(batching.queue);
    let (flush, flushes) = mpsc::channel(1);
    tokio::spawn(export(exporter, queue, flushes, batching, metrics.clone()));
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            options.sampling,
        ))))
        .with_resource(resource)
        .with_span_processor(Queue {
            spans,
            dropped: metrics.dropped,
            closed: Arc::new(AtomicBool::new(false)),
        })
        .build();
    let tracer = provider.tracer("infermesh");
    Ok(Traces {
        tracer,
        provider,
        flush,
    })
}

impl Traces {
    /// Exports what is queued, waiting at most `limit`; then no span is
    /// taken any more.
    pub async fn shutdown(self, limit: Duration) {
        let (done, flushed) = oneshot::channel();
        if self.flush.send(done).await.is_ok()
            && tokio::time::timeout(limit, flushed).await.is_err()
        {
            tracing::warn!(?limit, "the trace exporter did not flush in time");
        }
        // Only marks the queue closed: the export task has already ended.
        let _ = self.provider.shutdown();
    }
}

/// `endpoint` with `/v1/traces` when it has no path (the OTLP/HTTP
/// signal path, which the exporter takes as given when set in code).
fn with_traces_path(endpoint: &str) -> String {
    match endpoint.parse::<http::Uri>() {
        Ok(uri) if uri.path() == "/" || uri.path().is_empty() => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_owned(),
    }
}

/// The span processor: hands finished, sampled spans to the export task
/// through a bounded queue, dropping (and counting) what does not fit.
#[derive(Debug)]
struct Queue {
    spans: mpsc::Sender<SpanData>,
    dropped: IntCounter,
    closed: Arc<AtomicBool>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() || self.closed.load(Ordering::Relaxed) {
            return;
        }
        if self.spans.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // The export task flushes on its timer and at shutdown; a
        // synchronous flush would block a runtime thread.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        if self.closed.swap(true, Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        Ok(())
    }
}

/// The export task: a batch goes out when it is full or when the delay
/// since the last export has passed, and what is queued goes out when a
/// flush is asked for.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queue: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    batching: Batching,
    metrics: ExportMetrics,
) {
    let mut batch = Vec::with_capacity(batching.batch);
    let mut timer = tokio::time::interval(batching.delay);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = queue.recv() => match received {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= batching.batch {
                        send(&exporter, &mut batch, &metrics).await;
                    }
                }
                None => break,
            },
            _ = timer.tick() => {
                if !batch.is_empty() {
                    send(&exporter, &mut batch, &metrics).await;
                }
            }
            flush = flushes.recv() => {
                while let Ok(span) = queue.try_recv() {
                    batch.push(span);
                    if batch.len() >= batching.batch {
                        send(&exporter, &mut batch, &metrics).await;
                    }
                }
                if !batch.is_empty() {
                    send(&exporter, &mut batch, &metrics).await;
                }
                if let Some(done) = flush {
                    let _ = done.send(());
                }
                break;
            }
        }
    }
}

async fn send(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    metrics: &ExportMetrics,
) {
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    match exporter.export(spans).await {
        Ok(()) => metrics.exported.with_label_values(&["ok"]).inc_by(count),
        Err(e) => {
            metrics
                .exported
                .with_label_values(&["failed"])
                .inc_by(count);
            tracing::warn!(error = %e, spans = count, "exporting spans failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_to_a_bare_collector_address() {
        assert_eq!(
            with_traces_path("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            with_traces_path("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            with_traces_path("http://collector:4318/custom/traces"),
            "http://collector:4318/custom/traces"
        );
    }

    #[test]
    fn sampling_ratios_outside_zero_to_one_are_refused() {
        assert_eq!(parse_sampling("0.01"), Ok(0.01));
        assert_eq!(parse_sampling("1"), Ok(1.0));
        assert!(
            parse_sampling("1.5")
                .unwrap_err()
                .contains("between 0.0 and 1.0")
        );
        assert!(parse_sampling("all").unwrap_err().contains("not a number"));
    }
}

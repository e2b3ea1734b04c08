//! Distributed tracing on the request path: the trace context a request
//! carries through the layers, and the spans it makes — one server span
//! per request (the server layer starts and ends it) and one client span
//! per upstream attempt (the balancer's), so that retries, hedges and
//! fan-out branches each appear as a child of the request's span.
//!
//! Propagation follows W3C Trace Context (`traceparent`, `tracestate`);
//! B3 (`b3`, `X-B3-*`, Zipkin's) is accepted from clients too, and W3C is
//! what goes upstream. Spans are named and attributed by the OpenTelemetry
//! HTTP semantic conventions, plus infermesh's own attributes under
//! `infermesh.`.
//!
//! The same context also carries a control plane's push into the proxy's
//! span applying it ([`Tracing::continue_remote`]).
//!
//! Tracing off (no exporter configured) means no [`Tracing`] exists: the
//! server makes no span and puts nothing in the request, the balancer
//! finds nothing to do, and the trace headers pass through untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::core::context::ConnectionInfo;

/// The tracer requests are traced with, and how their context is read
/// from and written into headers. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Tracing {
    tracer: SdkTracer,
    w3c: Arc<TraceContextPropagator>,
}

impl Tracing {
    /// Traces with `tracer` (whose provider samples and exports).
    pub(crate) fn new(tracer: SdkTracer) -> Self {
        Tracing {
            tracer,
            w3c: Arc::new(TraceContextPropagator::new()),
        }
    }

    /// Starts the server span of `request`, which arrived at `started` on
    /// `connection`, known by `request_id`.
    pub(crate) fn request_span<B>(
        &self,
        request: &http::Request<B>,
        started: std::time::Instant,
        connection: &ConnectionInfo,
        request_id: &http::HeaderValue,
    ) -> OpenSpan {
        let start = SystemTime::now()
            .checked_sub(started.elapsed())
            .unwrap_or_else(SystemTime::now);
        let mut open = self.server_span(
            request.headers(),
            start,
            Vec::new(),
            span_name(request.method()),
        );
        // Attributes are made only for a span that keeps them: an
        // unsampled request (most, at a low ratio) allocates none.
        if !open.span.is_recording() {
            return open;
        }
        let uri = request.uri();
        let mut attributes = Vec::with_capacity(12);
        attributes.push(KeyValue::new(
            "http.request.method",
            request.method().as_str().to_owned(),
        ));
        attributes.push(KeyValue::new("url.path", uri.path().to_owned()));
        if let Some(query) = uri.query() {
            attributes.push(KeyValue::new("url.query", query.to_owned()));
        }
        attributes.push(KeyValue::new("url.scheme", connection.scheme));
        let host = uri.authority().map(|a| a.as_str()).or_else(|| {
            request
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        if let Some(host) = host {
            attributes.push(KeyValue::new("server.address", host.to_owned()));
        }
        attributes.push(KeyValue::new(
            "client.address",
            connection.client.ip().to_string(),
        ));
        attributes.push(KeyValue::new(
            "client.port",
            i64::from(connection.client.port()),
        ));
        attributes.push(KeyValue::new(
            "network.protocol.version",
            match request.version() {
                http::Version::HTTP_2 => "2",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ));
        if let Some(agent) = request
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
        }
        if let Ok(id) = request_id.to_str() {
            attributes.push(KeyValue::new("infermesh.request_id", id.to_owned()));
        }
        if let Some(peer) = &connection.peer_identity {
            attributes.push(KeyValue::new("infermesh.peer_identity", peer.to_string()));
        }
        open.span.set_attributes(attributes);
        open
    }

    /// Starts a span continuing the trace of a W3C `traceparent` sent some
    /// other way than in HTTP headers (the control plane's push says it in
    /// its update); `None` when there is none, or it does not parse.
    pub(crate) fn continue_remote(
        &self,
        traceparent: &str,
        name: &'static str,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Option<OpenSpan> {
        if traceparent.is_empty() {
            return None;
        }
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_str(traceparent).ok()?,
        );
        let parent = self.w3c.extract(&HeaderExtractor(&headers));
        if !parent.span().span_context().is_valid() {
            return None;
        }
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        Some(OpenSpan {
            context: RequestTrace {
                tracing: self.clone(),
                parent: span.span_context().clone(),
                branch: None,
            },
            span,
        })
    }

    /// Starts the server span of a request with these `headers`, continuing
    /// the trace they carry (if any), begun at `start`.
    pub(crate) fn server_span(
        &self,
        headers: &http::HeaderMap,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        name: &'static str,
    ) -> OpenSpan {
        // A request with both is continued from its `traceparent`.
        let parent = match b3_parent(headers) {
            Some(b3) if !headers.contains_key("traceparent") => {
                Context::new().with_remote_span_context(b3)
            }
            _ => self.w3c.extract(&HeaderExtractor(headers)),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        OpenSpan {
            context: RequestTrace {
                tracing: self.clone(),
                parent: span.span_context().clone(),
                branch: None,
            },
            span,
        }
    }
}

/// The trace a request's B3 headers continue (Zipkin's propagation): the
/// single `b3: {trace}-{span}[-{sampling}[-{parent}]]` header or the
/// `X-B3-TraceId` / `X-B3-SpanId` / `X-B3-Sampled` / `X-B3-Flags` set. A
/// 64-bit trace id is widened to 128 bits with zeros; a debug flag means
/// sampled; no sampling state (B3's "deferred") is taken as sampled, as
/// the caller sent ids to be continued. Only extracted: W3C is what goes
/// upstream (written by hand because the B3 propagator of
/// opentelemetry-rust lives in the deprecated Zipkin exporter crate).
fn b3_parent(headers: &http::HeaderMap) -> Option<SpanContext> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (trace, span, sampling) = match text("b3") {
        Some(single) => {
            let mut parts = single.split('-');
            (parts.next()?, parts.next()?, parts.next())
        }
        None => {
            let sampling = match text("x-b3-flags") {
                Some("1") => Some("d"),
                _ => text("x-b3-sampled"),
            };
            (text("x-b3-traceid")?, text("x-b3-spanid")?, sampling)
        }
    };
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let trace = match trace.len() {
        16 if hex(trace, 16) => TraceId::from_hex(&format!("{:0>32}", trace)).ok()?,
        32 if hex(trace, 32) => TraceId::from_hex(trace).ok()?,
        _ => return None,
    };
    if !hex(span, 16) {
        return None;
    }
    let span = SpanId::from_hex(span).ok()?;
    let flags = match sampling {
        Some("0") | Some("false") => TraceFlags::default(),
        Some("1") | Some("true") | Some("d") | None => TraceFlags::SAMPLED,
        Some(_) => return None,
    };
    let context = SpanContext::new(trace, span, flags, true, TraceState::default());
    context.is_valid().then_some(context)
}

/// The name of a span for `method` until its route is known: the method,
/// or `HTTP` for one outside the standard set (the conventions' rule, which
/// keeps span names few).
fn span_name(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "HTTP",
    }
}

/// A span that is still open: a request's server span, or the span of
/// applying a pushed config. It ends with [`OpenSpan::end`] (or
/// [`OpenSpan::end_failed`]), or, unended, when dropped.
#[derive(Debug)]
pub(crate) struct OpenSpan {
    span: Span,
    context: RequestTrace,
}

impl OpenSpan {
    /// What the request carries in its extensions so that its attempts
    /// become children of this span.
    pub(crate) fn request_trace(&self) -> RequestTrace {
        self.context.clone()
    }

    /// The trace and span ids, for the access log, when sampled.
    pub(crate) fn ids(&self) -> Option<(String, String)> {
        let context = self.span.span_context();
        context.is_sampled().then(|| {
            (
                context.trace_id().to_string(),
                context.span_id().to_string(),
            )
        })
    }

    /// Whether attributes set on it are kept (it is sampled).
    pub(crate) fn is_recording(&self) -> bool {
        self.span.is_recording()
    }

    /// Names the span (`{method} {route}` once the route is known).
    pub(crate) fn rename(&mut self, name: String) {
        self.span.update_name(name);
    }

    /// Ends the span with `attributes`, marked an error of type
    /// `error_type` with `description`.
    pub(crate) fn end_failed(
        mut self,
        attributes: Vec<KeyValue>,
        error_type: &'static str,
        description: String,
    ) {
        self.span.set_attributes(attributes);
        self.span
            .set_attribute(KeyValue::new("error.type", error_type));
        self.span.set_status(Status::error(description));
        self.span.end();
    }

    /// Ends the span with `attributes`, marked an error if `error` says why.
    pub(crate) fn end(mut self, attributes: Vec<KeyValue>, error: Option<&str>) {
        self.span.set_attributes(attributes);
        if let Some(reason) = error {
            self.span
                .set_attribute(KeyValue::new("error.type", reason.to_owned()));
            self.span.set_status(Status::error(reason.to_owned()));
        }
        self.span.end();
    }
}

/// The trace context of a request, in its extensions: the server span
/// its attempts are children of. Copies of the request (retries, hedges,
/// fan-out branches) carry it too.
#[derive(Clone, Debug)]
pub(crate) struct RequestTrace {
    tracing: Tracing,
    parent: SpanContext,
    /// The fan-out branch this copy of the request is.
    branch: Option<Arc<str>>,
}

/// What a client span knows of its attempt when it starts.
pub(crate) struct AttemptInfo<'a> {
    /// The backend's name.
    pub backend: &'a str,
    /// The endpoint the attempt goes to.
    pub endpoint: SocketAddr,
    /// 0 for the first attempt, 1, 2... for retries.
    pub retry: u32,
    /// Whether it is a hedge.
    pub hedge: bool,
}

impl RequestTrace {
    /// This context for fan-out branch `name`'s copy of the request.
    pub(crate) fn in_branch(&self, name: Arc<str>) -> RequestTrace {
        RequestTrace {
            branch: Some(name),
            ..self.clone()
        }
    }

    /// Starts the client span of one attempt of `request` and writes its
    /// context into the request's `traceparent` (so the model server's
    /// spans are its children). An unsampled request gets no span; its
    /// unsampled context still goes upstream.
    pub(crate) fn attempt<B>(
        &self,
        request: &mut http::Request<B>,
        attempt: AttemptInfo<'_>,
    ) -> Option<ClientSpan> {
        let parent = Context::new().with_remote_span_context(self.parent.clone());
        if !self.parent.is_sampled() {
            self.tracing
                .w3c
                .inject_context(&parent, &mut HeaderInjector(request.headers_mut()));
            return None;
        }
        let mut attributes = Vec::with_capacity(10);
        attributes.push(KeyValue::new(
            "http.request.method",
            request.method().as_str().to_owned(),
        ));
        attributes.push(KeyValue::new(
            "server.address",
            attempt.endpoint.ip().to_string(),
        ));
        attributes.push(KeyValue::new(
            "server.port",
            i64::from(attempt.endpoint.port()),
        ));
        attributes.push(KeyValue::new("url.path", request.uri().path().to_owned()));
        attributes.push(KeyValue::new(
            "infermesh.backend",
            attempt.backend.to_owned(),
        ));
        if attempt.retry > 0 {
            // The semantic conventions' count of resends of one request.
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(attempt.retry),
            ));
        }
        if attempt.hedge {
            attributes.push(KeyValue::new("infermesh.hedge", true));
        }
        if let Some(branch) = &self.branch {
            attributes.push(KeyValue::new("infermesh.fanout.branch", branch.to_string()));
        }
        let tracer = &self.tracing.tracer;
        let span = tracer
            .span_builder(request.method().as_str().to_owned())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        let child = parent.with_remote_span_context(span.span_context().clone());
        self.tracing
            .w3c
            .inject_context(&child, &mut HeaderInjector(request.headers_mut()));
        Some(ClientSpan {
            span,
            answered: false,
        })
    }
}

/// The span of one upstream attempt. Dropped before [`ClientSpan::answered`]
/// or [`ClientSpan::failed`] — the attempt's future was dropped: a hedge
/// that lost, a branch a fan-out no longer needed, a request whose client
/// left — it ends marked `infermesh.outcome = cancelled`.
#[derive(Debug)]
pub(crate) struct ClientSpan {
    span: Span,
    answered: bool,
}

impl ClientSpan {
    /// The attempt got response headers with `status`. The span ends when
    /// the value is dropped (with the response body, so it covers the
    /// whole exchange).
    pub(crate) fn answered(&mut self, status: http::StatusCode) {
        self.answered = true;
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        self.span
            .set_attribute(KeyValue::new("infermesh.outcome", "response"));
        // A client span is an error for any 4xx or 5xx (the conventions).
        if status.is_client_error() || status.is_server_error() {
            self.span
                .set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
            self.span
                .set_status(Status::error(status.as_str().to_owned()));
        }
    }

    /// The attempt failed for `reason` (a proxy error reason).
    pub(crate) fn failed(mut self, reason: &'static str) {
        self.answered = true;
        self.span
            .set_attribute(KeyValue::new("infermesh.outcome", "failed"));
        self.span.set_attribute(KeyValue::new("error.type", reason));
        self.span.set_status(Status::error(reason));
    }
}

impl Drop for ClientSpan {
    fn drop(&mut self) {
        if !self.answered {
            self.span
                .set_attribute(KeyValue::new("infermesh.outcome", "cancelled"));
        }
        self.span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

    /// Keeps the spans exported.
    #[derive(Clone, Debug, Default)]
    struct Collected(Arc<Mutex<Vec<SpanData>>>);

    impl Collected {
        fn get_finished_spans(&self) -> Result<Vec<SpanData>, ()> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    impl SpanExporter for Collected {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn tracing() -> (Tracing, Collected, SdkTracerProvider) {
        let exporter = Collected::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        (Tracing::new(provider.tracer("test")), exporter, provider)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        headers
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn a_w3c_parent_is_continued_and_the_attempt_is_its_grandchild() {
        let (tracing, exporter, _provider) = tracing();
        let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
        let server = tracing.server_span(
            &headers(&[("traceparent", &parent)]),
            SystemTime::now(),
            Vec::new(),
            "POST",
        );
        let mut request = http::Request::post("/v1/chat/completions")
            .body(())
            .unwrap();
        let attempt = server.request_trace().attempt(
            &mut request,
            AttemptInfo {
                backend: "m",
                endpoint: "127.0.0.1:9".parse().unwrap(),
                retry: 1,
                hedge: false,
            },
        );
        let mut attempt = attempt.expect("a sampled parent traces its attempts");
        attempt.answered(http::StatusCode::OK);
        drop(attempt);
        server.end(Vec::new(), None);
        let spans = exporter.get_finished_spans().unwrap();
        let [client, server] = &spans[..] else {
            panic!("two spans: {spans:?}")
        };
        assert_eq!(server.span_context.trace_id().to_string(), TRACE);
        assert_eq!(server.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(client.parent_span_id, server.span_context.span_id());
        let sent = request.headers()["traceparent"].to_str().unwrap();
        assert_eq!(
            sent,
            format!("00-{TRACE}-{}-01", client.span_context.span_id())
        );
        assert!(
            client
                .attributes
                .contains(&KeyValue::new("http.request.resend_count", 1))
        );
    }

    #[test]
    fn b3_is_accepted_and_w3c_wins_when_both_come() {
        let (tracing, exporter, _provider) = tracing();
        let b3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1";
        tracing
            .server_span(
                &headers(&[("b3", b3)]),
                SystemTime::now(),
                Vec::new(),
                "GET",
            )
            .end(Vec::new(), None);
        let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
        tracing
            .server_span(
                &headers(&[("b3", b3), ("traceparent", &parent)]),
                SystemTime::now(),
                Vec::new(),
                "GET",
            )
            .end(Vec::new(), None);
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(
            spans[0].span_context.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(spans[1].span_context.trace_id().to_string(), TRACE);
    }

    #[test]
    fn b3_comes_in_one_header_or_several_and_64_bit_ids_are_widened() {
        let single = headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-0")]);
        let context = b3_parent(&single).unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(!context.is_sampled());
        let multi = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-flags", "1"),
        ]);
        let context = b3_parent(&multi).unwrap();
        assert_eq!(context.trace_id().to_string(), TRACE);
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        for bad in [
            "1",
            "zz-00f067aa0ba902b7-1",
            "a3ce929d0e0e4736-short-1",
            "a3ce929d0e0e4736-00f067aa0ba902b7-x",
        ] {
            assert!(b3_parent(&headers(&[("b3", bad)])).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_dropped_attempt_is_marked_cancelled_and_an_unsampled_one_makes_no_span() {
        let (tracing, exporter, _provider) = tracing();
        let server = tracing.server_span(
            &http::HeaderMap::new(),
            SystemTime::now(),
            Vec::new(),
            "GET",
        );
        let mut request = http::Request::get("/").body(()).unwrap();
        let info = || AttemptInfo {
            backend: "m",
            endpoint: "127.0.0.1:9".parse().unwrap(),
            retry: 0,
            hedge: true,
        };
        drop(server.request_trace().attempt(&mut request, info()));
        server.end(Vec::new(), Some("response_headers_timeout"));
        let spans = exporter.get_finished_spans().unwrap();
        assert!(
            spans[0]
                .attributes
                .contains(&KeyValue::new("infermesh.outcome", "cancelled"))
        );
        assert!(
            spans[0]
                .attributes
                .contains(&KeyValue::new("infermesh.hedge", true))
        );
        assert_eq!(spans[1].status, Status::error("response_headers_timeout"));

        let unsampled = format!("00-{TRACE}-00f067aa0ba902b7-00");
        let server = tracing.server_span(
            &headers(&[("traceparent", &unsampled)]),
            SystemTime::now(),
            Vec::new(),
            "GET",
        );
        let mut request = http::Request::get("/").body(()).unwrap();
        assert!(
            server
                .request_trace()
                .attempt(&mut request, info())
                .is_none()
        );
        assert!(
            request.headers()["traceparent"]
                .to_str()
                .unwrap()
                .starts_with(&format!("00-{TRACE}-"))
        );
        server.end(Vec::new(), None);
        assert_eq!(exporter.get_finished_spans().unwrap().len(), 2);
    }
}

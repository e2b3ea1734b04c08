//! Observing each request once its response has ended: one access-log line
//! ([`crate::server::access_entry`], handed to the proxy's access-log
//! writer), unless the access log's filters leave it out
//! ([`crate::server::access_filter`]), and the request metrics, which
//! count every request: status, duration, body sizes, and the route's
//! requests in flight (raised when the route is known, lowered once when
//! the record is written).
//!
//! The response body is wrapped so that the record is written when the last
//! frame goes out, when the body fails (a timeout or a backend reset
//! mid-stream), or when the client goes away first. A request the client
//! gives up on before the response headers (an SDK's timeout on a slow
//! model) is written when its handling is dropped, with status 499 (nginx's
//! "client closed request"; Envoy logs 0 with its DC flag) and the backend
//! and endpoint it was waiting on.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};

use crate::core::body::{BoxError, ProxyBody, boxed};
use crate::core::context::{RequestContext, Upstream};
use crate::core::error::{ErrorKind, ProxyError};
use crate::core::headers::{FANOUT_HEADER, GRPC_STATUS, is_grpc};
use crate::core::trace::OpenSpan;
use crate::server::access_entry::{AccessEntry, access_lines_enabled, millis, version_name};
use crate::server::access_filter::is_error;
use crate::server::lifetime::{StreamGuard, Watched};
use crate::server::metrics::PairSeries;
use crate::server::respond::{Dialect, body_failure};
use crate::server::shared::Shared;
use crate::server::usage::{Dispatched, Scanner, Usage};
use opentelemetry::KeyValue;

/// What is known about one request, filled in as it goes through the
/// phases and written out when its response ends.
pub(crate) struct RequestRecord {
    started: Instant,
    method: Method,
    uri: http::Uri,
    host: Option<http::HeaderValue>,
    version: Version,
    listener: Option<Arc<str>>,
    /// `x-request-id`, the client's or the proxy's.
    request_id: http::HeaderValue,
    route: Option<Arc<str>>,
    backend: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    retries: u32,
    first_byte: Option<Duration>,
    /// Whether the response is a stream of server-sent events.
    streamed: bool,
    first_event: Option<Duration>,
    /// The `model` label: the route match's model, or the request's when
    /// the config names it (bounded by the config).
    model: Option<Arc<str>>,
    /// The token counts the answer reported (OpenAI's `usage`).
    usage: Option<Usage>,
    /// The stream's `infermesh_time_between_events_seconds`, once it has
    /// had an event.
    between_events: Option<prometheus::Histogram>,
    /// A fan-out's report of its branches (`x-infermesh-fanout`).
    fanout: Option<http::HeaderValue>,
    /// The route's `infermesh_requests_in_flight`, raised when the route
    /// is known and lowered when the record is written.
    in_flight: Option<prometheus::IntGauge>,
    status: StatusCode,
    /// The gRPC status of a gRPC response (trailers, or trailers-only
    /// headers), which an HTTP 200 does not tell.
    grpc_status: Option<u16>,
    error: Option<&'static str>,
    detail: Option<String>,
    /// The request's context: its connection, where its latest attempt
    /// went (for a request that ends with no response from upstream) and
    /// the body bytes read from the client.
    context: RequestContext,
    /// The request's server span, when it is traced: it ends with the
    /// record.
    /// Boxed: a span is 400 bytes, which every record of a request not
    /// traced (most, and every one without tracing) would carry, and an
    /// open stream keeps its record to the end.
    span: Option<Box<OpenSpan>>,
    /// The series of the route and backend, once a response came.
    pair: Option<Arc<PairSeries>>,
    /// The record was written: it is written once.
    written: bool,
    shared: Arc<Shared>,
}

/// The status logged and counted for a request whose client went away
/// before the response headers (nginx's 499, "client closed request").
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl RequestRecord {
    /// Starts the record of `request`, which arrived at `started` at
    /// `listener`, known by `request_id`; `context` is the request's (in
    /// its extensions), which says the connection it came on (its client,
    /// and its SPIFFE ID over mutual TLS).
    pub(crate) fn start<B>(
        request: &Request<B>,
        started: Instant,
        listener: Option<Arc<str>>,
        request_id: http::HeaderValue,
        context: RequestContext,
        shared: Arc<Shared>,
    ) -> Self {
        RequestRecord {
            started,
            method: request.method().clone(),
            // Cheap copies (reference counts): nothing is formatted unless
            // the line is written.
            uri: request.uri().clone(),
            host: request.headers().get(http::header::HOST).cloned(),
            version: request.version(),
            listener,
            request_id,
            route: None,
            backend: None,
            endpoint: None,
            retries: 0,
            first_byte: None,
            streamed: false,
            first_event: None,
            model: None,
            usage: None,
            between_events: None,
            fanout: None,
            in_flight: None,
            status: StatusCode::OK,
            grpc_status: None,
            error: None,
            detail: None,
            context,
            span: None,
            pair: None,
            written: false,
            shared,
        }
    }

    /// Ends `span` with the record, attributed with what the record knows.
    pub(crate) fn traced(&mut self, span: OpenSpan) {
        self.span = Some(Box::new(span));
    }

    /// Notes the route that matched, and counts the request in its
    /// `in_flight` gauge until the record is written.
    pub(crate) fn set_route(&mut self, route: Arc<str>, in_flight: prometheus::IntGauge) {
        if let Some(span) = &mut self.span
            && span.is_recording()
        {
            span.rename(format!("{} {route}", self.method));
        }
        in_flight.inc();
        if let Some(previous) = self.in_flight.replace(in_flight) {
            previous.dec();
        }
        self.route = Some(route);
    }

    /// Notes the `model` label of the request
    /// ([`crate::snapshot::Snapshot::model_label`]).
    pub(crate) fn set_model(&mut self, model: Option<Arc<str>>) {
        self.model = model;
    }

    /// Notes a response that came from a backend.
    pub(crate) fn responded(&mut self, response: &Response<ProxyBody>) {
        let first_byte = self.started.elapsed();
        self.first_byte = Some(first_byte);
        if let Some(upstream) = response.extensions().get::<Upstream>() {
            self.backend = Some(upstream.backend.clone());
            self.endpoint = Some(upstream.endpoint);
            self.retries = upstream.retries;
        }
        let series = self
            .shared
            .metrics
            .pair(self.route_label(), self.backend_label());
        series.first_byte.observe(first_byte.as_secs_f64());
        // The route and backend are known for good: kept for the end.
        self.pair = Some(series);
    }

    /// Copies the request's URI, `Host` and id out of the bytes they were
    /// parsed from. hyper parses an HTTP/1 head in place: what the record
    /// keeps of it points into the client connection's first read buffer
    /// (8 KiB). The connection reads into a new buffer while the request
    /// is in flight, and a stream's record alone would keep the first one
    /// for as long as the stream lasts. Done for streams only: a short
    /// answer lets the buffer go soon anyway, and copying costs.
    fn own_request_bytes(&mut self) {
        if let Ok(uri) = http::Uri::try_from(self.uri.to_string()) {
            self.uri = uri;
        }
        let copy = |value: &http::HeaderValue| {
            let mut copy =
                http::HeaderValue::from_maybe_shared(Bytes::copy_from_slice(value.as_bytes()))
                    .expect("the bytes of a header value");
            copy.set_sensitive(value.is_sensitive());
            copy
        };
        self.host = self.host.as_ref().map(copy);
        self.request_id = copy(&self.request_id);
    }

    /// Notes a failure the proxy answers itself.
    pub(crate) fn failed(&mut self, error: &ProxyError) {
        self.backend = error.backend().cloned();
        self.endpoint = error.endpoint();
        self.retries = error.retries();
        self.error = Some(error.kind().reason());
        self.detail = Some(error.to_string());
    }

    /// Wraps the response body so the record is written when it ends, and
    /// so that `stream` watches it (its connection's stream limits).
    ///
    /// A body that fails mid-stream ends as `dialect` says it can (an SSE
    /// error event, gRPC trailers), or is reset.
    pub(crate) fn observe(
        mut self,
        response: Response<ProxyBody>,
        stream: StreamGuard,
        dialect: Dialect,
    ) -> Response<ProxyBody> {
        self.status = response.status();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map_or(&b""[..], |v| v.as_bytes());
        // A trailers-only gRPC response has its status in the headers.
        if is_grpc(content_type) {
            self.grpc_status = grpc_status(response.headers());
        }
        self.fanout = response.headers().get(&FANOUT_HEADER).cloned();
        self.streamed = content_type.starts_with(b"text/event-stream");
        if self.streamed {
            self.own_request_bytes();
        }
        // None (nothing allocated, nothing done per frame) unless the
        // answer is an event stream or JSON that may carry token counts.
        // A fan-out's combined JSON holds several models' answers, whose
        // usages are not one answer's: it is not read (a `first` stream
        // is the winner's, and is).
        let combined = self.fanout.is_some() && !self.streamed;
        let scanner = (!combined)
            .then(|| Scanner::for_response(response.status(), response.headers(), self.uri.path()))
            .flatten();
        response.map(|inner| {
            boxed(ObservedBody {
                inner: stream.watch(inner),
                record: Some(self),
                bytes: 0,
                dialect,
                failed: false,
                scanner,
            })
        })
    }

    fn route_label(&self) -> &str {
        self.route.as_deref().unwrap_or("")
    }

    fn backend_label(&self) -> &str {
        self.backend.as_deref().unwrap_or("")
    }

    fn model_label(&self) -> &str {
        self.model.as_deref().unwrap_or("")
    }

    /// Notes server-sent events a frame completed: the stream's first
    /// event is its time to first token, and each later one the gap since
    /// the event before (events that came in one frame, 0).
    fn events(&mut self, events: Dispatched) {
        if self.between_events.is_none() {
            // The stream's first events: the label values are looked up
            // once.
            let labels = [self.route_label(), self.backend_label(), self.model_label()];
            let metrics = &self.shared.metrics;
            if events.gap.is_none() {
                let first = events.at.saturating_duration_since(self.started);
                metrics
                    .time_to_first_token
                    .with_label_values(&labels)
                    .observe(first.as_secs_f64());
            }
            let between = metrics.time_between_events.with_label_values(&labels);
            self.between_events = Some(between);
        }
        let Some(between) = &self.between_events else {
            return;
        };
        if let Some(gap) = events.gap {
            between.observe(gap.as_secs_f64());
        }
        // The others came in the same frame as the event before them.
        for _ in 1..events.count {
            between.observe(0.0);
        }
    }

    /// Notes the first response body bytes: for a stream, the time to its
    /// first event.
    fn first_data(&mut self) {
        if self.streamed {
            let first_event = self.started.elapsed();
            self.first_event = Some(first_event);
            self.shared
                .metrics
                .stream_first_event
                .with_label_values(&[self.route_label(), self.backend_label()])
                .observe(first_event.as_secs_f64());
        }
    }

    /// Notes the trailers of the response: a gRPC status.
    fn trailers(&mut self, trailers: &http::HeaderMap) {
        if let Some(status) = grpc_status(trailers) {
            self.grpc_status = Some(status);
        }
    }

    fn finish(&mut self, bytes: u64, body_error: Option<&'static str>) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        if self.error.is_none() {
            self.error = body_error;
        }
        if self.backend.is_none()
            && let Some(last) = self.context.last_attempt()
        {
            // No response came from upstream (a route timeout, the
            // client gone): the attempt it was waiting on.
            self.backend = Some(last.backend);
            self.endpoint = Some(last.endpoint);
            self.retries = last.retries;
        }
        let duration = self.started.elapsed();
        let trace_ids = self.span.as_deref().and_then(OpenSpan::ids);
        self.end_span(bytes);
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.dec();
        }
        let request_bytes = self.context.request_bytes();
        let pair = self.pair.take();
        let route = self.route_label();
        let backend = self.backend_label();
        let series = pair.unwrap_or_else(|| self.shared.metrics.pair(route, backend));
        if self.status == StatusCode::OK && self.grpc_status.is_none() {
            series.ok.inc();
        } else {
            let grpc_code = self.grpc_status.map(|s| s.to_string());
            let grpc_label = grpc_code.as_deref().unwrap_or("");
            self.shared
                .metrics
                .requests
                .with_label_values(&[route, backend, self.status.as_str(), grpc_label])
                .inc();
        }
        if let Some(reason) = self.error {
            self.shared
                .metrics
                .request_errors
                .with_label_values(&[route, backend, reason])
                .inc();
        }
        series.duration.observe(duration.as_secs_f64());
        series.request_size.observe(request_bytes as f64);
        series.response_size.observe(bytes as f64);
        if let Some(usage) = self.usage {
            let tokens = series.tokens(self.model_label());
            for (series, count) in [(tokens.input, usage.input), (tokens.output, usage.output)] {
                if let Some(count) = count {
                    series.inc_by(count);
                }
            }
        }
        // Decided before the line is made: a line left out costs nothing
        // more (the metrics above count every request).
        if !access_lines_enabled() {
            return;
        }
        let error = is_error(self.status.as_u16(), self.error, self.grpc_status);
        if !self.shared.access_log.keeps(error, duration) {
            return;
        }
        let entry = AccessEntry {
            start: std::time::SystemTime::now()
                .checked_sub(duration)
                .unwrap_or(std::time::UNIX_EPOCH),
            method: self.method.as_str(),
            path: self.uri.path_and_query().map_or("/", |p| p.as_str()),
            authority: self
                .uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
                .unwrap_or(""),
            protocol: version_name(self.version),
            status: self.status.as_u16(),
            grpc_status: self.grpc_status,
            duration,
            first_byte: self.first_byte,
            first_event: self.first_event,
            model: self.model.as_deref(),
            input_tokens: self.usage.and_then(|u| u.input),
            output_tokens: self.usage.and_then(|u| u.output),
            request_bytes,
            response_bytes: bytes,
            route,
            backend,
            endpoint: self.endpoint,
            retries: self.retries,
            error: self.error,
            detail: self.detail.as_deref(),
            client: self.context.connection().client,
            client_address: &self.context.connection().client_address,
            peer_identity: self.context.connection().peer_identity.as_deref(),
            listener: self.listener.as_deref().unwrap_or(""),
            request_id: self.request_id.to_str().unwrap_or(""),
            fanout: self.fanout.as_ref().and_then(|f| f.to_str().ok()),
            trace_id: trace_ids.as_ref().map(|(trace, _)| trace.as_str()),
            span_id: trace_ids.as_ref().map(|(_, span)| span.as_str()),
        };
        self.shared.access_writer.write(&entry);
    }

    /// Ends the request's server span (if traced) with the attributes of
    /// the OpenTelemetry HTTP conventions and infermesh's own.
    fn end_span(&mut self, response_bytes: u64) {
        let Some(span) = self.span.take() else {
            return;
        };
        if !span.is_recording() {
            return span.end(Vec::new(), None);
        }
        let mut attributes = Vec::with_capacity(12);
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(self.status.as_u16()),
        ));
        attributes.push(KeyValue::new(
            "http.response.body.size",
            i64::try_from(response_bytes).unwrap_or(i64::MAX),
        ));
        if let Some(route) = &self.route {
            attributes.push(KeyValue::new("infermesh.route", route.to_string()));
        }
        if let Some(backend) = &self.backend {
            attributes.push(KeyValue::new("infermesh.backend", backend.to_string()));
        }
        if let Some(endpoint) = self.endpoint {
            attributes.push(KeyValue::new("infermesh.endpoint", endpoint.to_string()));
        }
        if self.retries > 0 {
            attributes.push(KeyValue::new("infermesh.retries", i64::from(self.retries)));
        }
        if let Some(status) = self.grpc_status {
            attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(status)));
        }
        if let Some(first_event) = self.first_event {
            attributes.push(KeyValue::new(
                "infermesh.time_to_first_token_ms",
                millis(first_event),
            ));
        }
        if let Some(fanout) = self.fanout.as_ref().and_then(|f| f.to_str().ok()) {
            attributes.push(KeyValue::new("infermesh.fanout", fanout.to_owned()));
        }
        // The GenAI conventions, where the proxy knows them: the model
        // (the model label), and the tokens the answer reported.
        if let Some(model) = &self.model {
            attributes.push(KeyValue::new("gen_ai.request.model", model.to_string()));
        }
        if let Some(usage) = self.usage {
            if let Some(input) = usage.input {
                attributes.push(KeyValue::new(
                    "gen_ai.usage.input_tokens",
                    i64::try_from(input).unwrap_or(i64::MAX),
                ));
            }
            if let Some(output) = usage.output {
                attributes.push(KeyValue::new(
                    "gen_ai.usage.output_tokens",
                    i64::try_from(output).unwrap_or(i64::MAX),
                ));
            }
        }
        // A server span is an error for a 5xx (a 4xx is the client's), or
        // for the proxy's own failure (499 included).
        let error = self
            .error
            .or_else(|| self.status.is_server_error().then(|| self.status.as_str()));
        span.end(attributes, error);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.written {
            // Dropped before a response was observed: the client went
            // away (its connection closed, or its HTTP/2 stream was reset)
            // while the proxy waited for response headers.
            self.status = StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("a valid status");
            self.error = Some("client_disconnected");
            self.detail =
                Some("the client went away before the response headers were sent".to_owned());
            self.finish(0, None);
        }
    }
}

/// The `grpc-status` of gRPC trailers (or of trailers-only headers).
fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A response body that writes its request's record when it ends.
struct ObservedBody {
    inner: Watched,
    record: Option<RequestRecord>,
    bytes: u64,
    dialect: Dialect,
    /// The body failed and told its client so: it has ended.
    failed: bool,
    /// Reads the events and token counts of a model's answer as it
    /// passes ([`crate::server::usage`]); none for other bodies.
    scanner: Option<Scanner>,
}

impl ObservedBody {
    fn finish(&mut self, error: Option<&'static str>) {
        if let Some(mut record) = self.record.take() {
            if let Some(scanner) = &mut self.scanner {
                record.usage = scanner.finish();
            }
            record.finish(self.bytes, error);
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if self.bytes == 0
                        && !data.is_empty()
                        && let Some(record) = &mut self.record
                    {
                        record.first_data();
                    }
                    self.bytes += data.len() as u64;
                    // Read as the frame goes on: nothing waits for it.
                    let this = &mut *self;
                    if let Some(scanner) = &mut this.scanner
                        && let Some(events) = scanner.feed(data, Instant::now)
                        && let Some(record) = &mut this.record
                    {
                        record.events(events);
                    }
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(record) = &mut self.record
                {
                    record.trailers(trailers);
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = ErrorKind::reason_of_body_error(e.as_ref());
                let streamed = self.record.as_ref().is_some_and(|r| r.streamed);
                let told = body_failure(self.dialect, streamed, e.as_ref());
                if let Some(trailers) = told.as_ref().and_then(Frame::trailers_ref)
                    && let Some(record) = &mut self.record
                {
                    record.trailers(trailers);
                }
                self.finish(Some(reason));
                if let Some(frame) = told {
                    // The response then ends: trailers end a gRPC response
                    // properly, and an event stream ends after its error
                    // event (without OpenAI's `[DONE]`). Failing the stream
                    // after the event instead would let HTTP/1 close the
                    // connection before the event is flushed, and SDKs
                    // would report a connection error, not the proxy's.
                    self.failed = true;
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        let error = if self.inner.was_cut() {
            Some("stream_idle_timeout")
        } else {
            (!self.inner.is_end_stream()).then_some("client_disconnected")
        };
        self.finish(error);
    }
}

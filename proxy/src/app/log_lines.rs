//! How a JSON log line is laid out: this module owns the two JSON shapes
//! of `--log-format` — infermesh's own (`json`: the event's fields at the
//! top level beside `timestamp`, `level` and `target`) and the Elastic
//! Common Schema (`ecs`) — for the proxy's log events and for its access
//! log.
//!
//! Access lines do not go through `tracing`'s formatter: [`JsonAccessLog`]
//! writes each from the typed fields of its
//! [`AccessEntry`](crate::server::access_entry::AccessEntry) and queues it
//! with the writer thread, after asking the log filter as a `tracing`
//! event would. An access line is stamped with the time its request
//! *started*, as Envoy's and ECS's are, not the time its response ended;
//! in the `json` shape its fields keep their names, in the `ecs` shape
//! they go to their ECS fields or, when ECS has none, under `infermesh.`.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::app::log_writer::BatchWriter;
use crate::server::access_entry::{
    ACCESS_TARGET, AccessEntry, AccessLogWriter, AddressText, micros,
};

/// A member's name as written, `"name":`: made at compile time, one copy
/// when written.
macro_rules! key {
    ($name:literal) => {
        concat!("\"", $name, "\":")
    };
}

/// The same for a string member, its value's opening quote included.
macro_rules! string_key {
    ($name:literal) => {
        concat!("\"", $name, "\":\"")
    };
}

/// [`ECS_VERSION`], for the constant members written with `concat!`.
macro_rules! ecs_version {
    () => {
        "8.11.0"
    };
}

/// The version of the Elastic Common Schema the `ecs` lines follow.
const ECS_VERSION: &str = ecs_version!();

/// The JSON shapes of `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JsonShape {
    /// infermesh's own: fields at the top level.
    Infermesh,
    /// The Elastic Common Schema.
    Ecs,
}

/// Lays out each event as one JSON line in `shape`.
pub(crate) struct JsonLines {
    shape: JsonShape,
    /// tracing's own JSON layout, for the `json` shape's other events.
    plain: Format<Json>,
}

impl JsonLines {
    /// Lines in `shape`.
    pub(crate) fn new(shape: JsonShape) -> Self {
        JsonLines {
            shape,
            plain: tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.shape == JsonShape::Infermesh {
            return self.plain.format_event(ctx, writer, event);
        }
        let level = event.metadata().level().as_str();
        let target = event.metadata().target();
        let line = ecs_line(field_values(event), level, target);
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// The inside of `value` as a JSON string (without its quotes), escaped
/// as serde_json escapes it.
fn write_json_str_contents(out: &mut String, value: &str) {
    // Nearly every value (paths, names, ids) needs no escape: one fast
    // pass to know, then one copy.
    if !needs_escape(value.as_bytes()) {
        out.push_str(value);
        return;
    }
    let mut start = 0;
    for (i, byte) in value.bytes().enumerate() {
        let escaped = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&value[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&value[start..]);
}

/// Whether `bytes` hold a byte JSON must escape (a control character, `"`
/// or `\`). Eight bytes at a time: every access line's strings pass
/// through here, and a byte at a time was a sixth of writing the line.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    /// Whether a byte of `word` is below `n` (n <= 0x80): the classic
    /// "has less" test, exact for every byte.
    fn has_below(word: u64, n: u8) -> bool {
        word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS != 0
    }
    fn has_byte(word: u64, byte: u8) -> bool {
        has_below(word ^ (ONES * u64::from(byte)), 1)
    }
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        if has_below(word, 0x20) || has_byte(word, b'"') || has_byte(word, b'\\') {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Gathers an event's fields as JSON values, a `Debug` one as its text.
struct ValuesOf<'m>(&'m mut Map<String, Value>);

impl Visit for ValuesOf<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

/// An ECS line of an event other than an access line: its fields under
/// `infermesh.`.
fn ecs_line(mut fields: Map<String, Value>, level: &str, target: &str) -> Value {
    let mut line = ecs_head(now(), level, fields.remove("message").unwrap_or_default());
    line.insert("log.logger".into(), target.into());
    if !fields.is_empty() {
        line.insert("infermesh".into(), Value::Object(fields));
    }
    Value::Object(line)
}

/// The fields every ECS line begins with (the ecs-logging spec's order).
fn ecs_head(timestamp: Value, level: &str, message: Value) -> Map<String, Value> {
    let mut line = Map::new();
    line.insert("@timestamp".into(), timestamp);
    line.insert("log.level".into(), level.to_ascii_lowercase().into());
    line.insert("message".into(), message);
    line.insert("ecs.version".into(), ECS_VERSION.into());
    line
}

/// Now, as tracing stamps its lines, as a JSON value.
fn now() -> Value {
    humantime::format_rfc3339_micros(std::time::SystemTime::now())
        .to_string()
        .into()
}

/// An event's fields, as JSON values.
fn field_values(event: &Event<'_>) -> Map<String, Value> {
    let mut fields = Map::new();
    event.record(&mut ValuesOf(&mut fields));
    fields
}

/// Writes access lines in a JSON shape straight from their entries and
/// queues them with the log's writer thread, in its next batch.
pub(crate) struct JsonAccessLog {
    shape: JsonShape,
    writer: BatchWriter,
}

impl JsonAccessLog {
    /// Lines in `shape`, written by `writer`.
    pub(crate) fn new(shape: JsonShape, writer: BatchWriter) -> Self {
        JsonAccessLog { shape, writer }
    }
}

impl AccessLogWriter for JsonAccessLog {
    fn write(&self, entry: &AccessEntry<'_>) {
        // The log filter has decided already: the record asks
        // `access_lines_enabled` before it makes the entry.
        thread_local! {
            // Where lines are written, kept from line to line.
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            write_access_line(self.shape, entry, line);
            self.writer.append(line.as_bytes());
        });
    }
}

/// Writes the line of `entry` in `shape`, newline included.
fn write_access_line(shape: JsonShape, entry: &AccessEntry<'_>, out: &mut String) {
    match shape {
        JsonShape::Infermesh => write_infermesh_access(entry, out),
        JsonShape::Ecs => write_ecs_access(entry, out),
    }
    out.push('\n');
}

/// The `json` shape: tracing's JSON layout (`timestamp`, `level`, the
/// message, the fields in the order the human format has them, `target`),
/// stamped with the request's start.
fn write_infermesh_access(entry: &AccessEntry<'_>, out: &mut String) {
    let mut line = Members::open(out);
    line.start_time(key!("timestamp"), entry);
    line.constant(r#""level":"INFO","message":"request""#);
    line.text(string_key!("method"), entry.method);
    line.str(string_key!("path"), entry.path);
    line.str(string_key!("authority"), entry.authority);
    line.text(string_key!("protocol"), entry.protocol);
    line.u64(key!("status"), entry.status);
    line.opt_u64(key!("grpc_status"), entry.grpc_status);
    line.ms(key!("duration_ms"), entry.duration);
    line.opt_ms(key!("first_byte_ms"), entry.first_byte);
    line.opt_ms(key!("first_event_ms"), entry.first_event);
    line.opt_str(string_key!("model"), entry.model);
    line.opt_u64(key!("input_tokens"), entry.input_tokens);
    line.opt_u64(key!("output_tokens"), entry.output_tokens);
    line.u64(key!("request_bytes"), entry.request_bytes);
    line.u64(key!("response_bytes"), entry.response_bytes);
    line.str(string_key!("route"), entry.route);
    line.str(string_key!("backend"), entry.backend);
    if let Some(endpoint) = entry.endpoint {
        line.text(string_key!("endpoint"), AddressText::new(endpoint).as_str());
    }
    line.u64(key!("retries"), entry.retries);
    line.opt_str(string_key!("error"), entry.error);
    line.opt_str(string_key!("detail"), entry.detail);
    line.text(string_key!("client"), entry.client_address);
    line.opt_str(string_key!("peer_identity"), entry.peer_identity);
    line.str(string_key!("listener"), entry.listener);
    line.str(string_key!("request_id"), entry.request_id);
    line.opt_str(string_key!("fanout"), entry.fanout);
    line.opt_str(string_key!("trace_id"), entry.trace_id);
    line.opt_str(string_key!("span_id"), entry.span_id);
    line.text(string_key!("target"), ACCESS_TARGET);
    line.close();
}

/// The `ecs` shape: the ecs-logging head, then ECS's fields (objects in
/// name order), then what ECS has no field for under `infermesh`.
fn write_ecs_access(entry: &AccessEntry<'_>, out: &mut String) {
    let mut line = Members::open(out);
    line.start_time(key!("@timestamp"), entry);
    line.constant(concat!(
        r#""log.level":"info","message":"request","ecs.version":""#,
        ecs_version!(),
        r#"","log.logger":"infermesh::access""#
    ));
    if let Some(endpoint) = entry.endpoint {
        line.object(key!("destination"), |destination| {
            destination.text(string_key!("address"), AddressText::new(endpoint).as_str());
        });
    }
    line.object(key!("event"), |event| {
        event.constant(r#""category":["web"],"dataset":"infermesh.access","kind":"event""#);
        // Nanoseconds, to the microsecond the line's times have.
        event.u64(key!("duration"), micros(entry.duration) * 1000);
        let failed = entry.error.is_some() || entry.status >= 500;
        event.raw(
            key!("outcome"),
            if failed { "\"failure\"" } else { "\"success\"" },
        );
    });
    // The model and token counts go to ECS's `gen_ai` field set (beta),
    // which carries OpenTelemetry's GenAI attribute names: the fields
    // Elastic's LLM integrations and OTel-fed dashboards query, and the
    // names the request's span uses, so logs and traces agree.
    let tokens = entry.input_tokens.is_some() || entry.output_tokens.is_some();
    if entry.model.is_some() || tokens {
        line.object(key!("gen_ai"), |gen_ai| {
            if let Some(model) = entry.model {
                gen_ai.object(key!("request"), |request| {
                    request.str(string_key!("model"), model)
                });
            }
            if tokens {
                gen_ai.object(key!("usage"), |usage| {
                    usage.opt_u64(key!("input_tokens"), entry.input_tokens);
                    usage.opt_u64(key!("output_tokens"), entry.output_tokens);
                });
            }
        });
    }
    line.object(key!("http"), |http| {
        http.object(key!("request"), |request| {
            request.object(key!("body"), |body| {
                body.u64(key!("bytes"), entry.request_bytes)
            });
            request.str(string_key!("id"), entry.request_id);
            request.text(string_key!("method"), entry.method);
        });
        http.object(key!("response"), |response| {
            response.object(key!("body"), |body| {
                body.u64(key!("bytes"), entry.response_bytes)
            });
            response.u64(key!("status_code"), entry.status);
        });
        // `HTTP/1.1` -> `1.1`, `HTTP/2.0` -> `2`, as ECS writes versions.
        let version = entry.protocol.trim_start_matches("HTTP/");
        http.text(
            string_key!("version"),
            version.strip_suffix(".0").unwrap_or(version),
        );
    });
    line.object(key!("source"), |source| {
        source.text(string_key!("address"), entry.client_address);
        source.text(string_key!("ip"), ip_of(entry.client_address));
        source.u64(key!("port"), entry.client.port());
    });
    if let Some(span_id) = entry.span_id {
        line.object(key!("span"), |span| span.str(string_key!("id"), span_id));
    }
    if let Some(trace_id) = entry.trace_id {
        line.object(key!("trace"), |trace| {
            trace.str(string_key!("id"), trace_id)
        });
    }
    line.object(key!("url"), |url| {
        let (path, query) = entry.path.split_once('?').unwrap_or((entry.path, ""));
        url.str(string_key!("domain"), entry.authority);
        url.str(string_key!("original"), entry.path);
        url.str(string_key!("path"), path);
        if !query.is_empty() {
            url.str(string_key!("query"), query);
        }
    });
    line.object(key!("infermesh"), |own| {
        own.opt_u64(key!("grpc_status"), entry.grpc_status);
        own.opt_ms(key!("first_byte_ms"), entry.first_byte);
        own.opt_ms(key!("first_event_ms"), entry.first_event);
        own.str(string_key!("route"), entry.route);
        own.str(string_key!("backend"), entry.backend);
        own.u64(key!("retries"), entry.retries);
        own.opt_str(string_key!("error"), entry.error);
        own.opt_str(string_key!("detail"), entry.detail);
        own.opt_str(string_key!("peer_identity"), entry.peer_identity);
        own.str(string_key!("listener"), entry.listener);
        own.opt_str(string_key!("fanout"), entry.fanout);
    });
    line.close();
}

/// Writes the members of one JSON object, comma-separated, as serde_json
/// writes them. Each name comes as [`key!`] makes it.
struct Members<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Members<'a> {
    /// Opens an object at the end of `out`.
    fn open(out: &'a mut String) -> Self {
        out.push('{');
        Members { out, first: true }
    }

    /// Closes the object.
    fn close(self) {
        self.out.push('}');
    }

    /// Starts a member: its comma when it is not the first, and `key`.
    fn key(&mut self, key: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
        self.out.push_str(key);
    }

    /// A member whose value is already JSON.
    fn raw(&mut self, key: &str, json: &str) {
        self.key(key);
        self.out.push_str(json);
    }

    /// Members written whole, `"a":1,"b":"c"`: the ones whose values never
    /// change, in one copy.
    fn constant(&mut self, members: &str) {
        self.key(members);
    }

    /// A string, escaped; `key` as [`string_key!`] makes it.
    fn str(&mut self, key: &str, value: &str) {
        debug_assert!(key.ends_with(":\""), "{key}");
        self.key(key);
        write_json_str_contents(self.out, value);
        self.out.push('"');
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    /// A string that needs no escape: the proxy's own text, a method (an
    /// HTTP token), an address, a time; `key` as [`string_key!`] makes it.
    fn text(&mut self, key: &str, value: &str) {
        debug_assert!(key.ends_with(":\"") && !needs_escape(value.as_bytes()));
        self.key(key);
        self.out.push_str(value);
        self.out.push('"');
    }

    /// An integer, without the formatting machinery (a line has a dozen).
    fn u64(&mut self, key: &str, value: impl Into<u64>) {
        self.key(key);
        self.out.push_str(itoa::Buffer::new().format(value.into()));
    }

    fn opt_u64(&mut self, key: &str, value: Option<impl Into<u64>>) {
        if let Some(value) = value {
            self.u64(key, value);
        }
    }

    /// A duration in milliseconds, to the microsecond (`41.207`, `1.0`).
    fn ms(&mut self, key: &str, duration: Duration) {
        self.key(key);
        write_millis(self.out, duration);
    }

    fn opt_ms(&mut self, key: &str, duration: Option<Duration>) {
        if let Some(duration) = duration {
            self.ms(key, duration);
        }
    }

    /// The request's start, RFC 3339 to the microsecond.
    fn start_time(&mut self, key: &str, entry: &AccessEntry<'_>) {
        self.key(key);
        self.out.push('"');
        write_timestamp(self.out, entry.start);
        self.out.push('"');
    }

    /// A member that is an object, its members written by `members`.
    fn object(&mut self, key: &str, members: impl FnOnce(&mut Members<'_>)) {
        self.key(key);
        let mut inner = Members::open(self.out);
        members(&mut inner);
        inner.close();
    }
}

/// The IP of a socket address's text (`10.0.0.12:52114`: `10.0.0.12`;
/// `[fe80::1%2]:80`: `fe80::1`), as `IpAddr` writes it.
fn ip_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.split_once('%').map_or(host, |(ip, _)| ip)
}

/// Writes `at` in RFC 3339 to the microsecond
/// (`2026-12-05T09:14:07.512731Z`), as `humantime::format_rfc3339_micros`
/// does, making the date and time of day only when the second changes
/// (each thread keeps its last): the lines of one second share them, and
/// making them was the dearest part of a line.
fn write_timestamp(out: &mut String, at: SystemTime) {
    thread_local! {
        /// A second since the epoch, and its text up to the fraction.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    // A clock set before 1970 writes the epoch (humantime would panic).
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != second || text.is_empty() {
            text.clear();
            let whole = UNIX_EPOCH + Duration::from_secs(second);
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            // Without its `Z`: the fraction comes first.
            text.pop();
            *cached = second;
        }
        out.push_str(text);
    });
    let micros = since_epoch.subsec_micros();
    let digits = itoa::Buffer::new().format(micros).len();
    out.push('.');
    for _ in digits..6 {
        out.push('0');
    }
    out.push_str(itoa::Buffer::new().format(micros));
    out.push('Z');
}

/// Writes `duration` in milliseconds to the microsecond, as serde_json
/// writes that number (`millis` as an `f64`: `41.207`, `52.0`, `0.002`),
/// from the integer microseconds: three floats a line through the float
/// formatter cost more than the rest of the numbers.
fn write_millis(out: &mut String, duration: Duration) {
    let micros = micros(duration);
    let (whole, fraction) = (micros / 1000, (micros % 1000) as u16);
    out.push_str(itoa::Buffer::new().format(whole));
    out.push('.');
    if fraction == 0 {
        out.push('0');
        return;
    }
    let digits = [
        (fraction / 100) as u8,
        (fraction / 10 % 10) as u8,
        (fraction % 10) as u8,
    ];
    let used = if digits[2] != 0 {
        3
    } else if digits[1] != 0 {
        2
    } else {
        1
    };
    for digit in &digits[..used] {
        out.push(char::from(b'0' + digit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::log_writer;
    use crate::server::access_entry::tests::{bare_entry, full_entry};
    use crate::server::access_entry::{TracingAccessLog, access_lines_enabled, millis};
    use serde_json::json;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// The fields of the `tracing` event [`TracingAccessLog`] makes of
    /// `entry`: what the human format writes.
    fn event_fields(entry: &AccessEntry<'_>) -> Map<String, Value> {
        /// Keeps the fields of the events it sees.
        struct Fields(std::sync::Arc<std::sync::Mutex<Vec<Map<String, Value>>>>);

        impl<S: Subscriber> tracing_subscriber::Layer<S> for Fields {
            fn on_event(&self, event: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                assert_eq!(event.metadata().target(), ACCESS_TARGET);
                assert_eq!(*event.metadata().level(), tracing::Level::INFO);
                self.0.lock().unwrap().push(field_values(event));
            }
        }

        let events = std::sync::Arc::default();
        let subscriber =
            tracing_subscriber::registry().with(Fields(std::sync::Arc::clone(&events)));
        tracing::subscriber::with_default(subscriber, || TracingAccessLog.write(entry));
        let mut events = std::mem::take(&mut *events.lock().unwrap());
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    /// The line of `entry` in `shape`, as written and as parsed.
    fn access_line(shape: JsonShape, entry: &AccessEntry<'_>) -> (String, Value) {
        let mut written = String::new();
        write_access_line(shape, entry, &mut written);
        assert!(written.ends_with("}\n") && written.matches('\n').count() == 1);
        let parsed =
            serde_json::from_str(&written).unwrap_or_else(|e| panic!("not JSON ({e}): {written}"));
        (written, parsed)
    }

    #[test]
    fn the_json_access_line_says_what_the_tracing_event_says() {
        for entry in [full_entry(), bare_entry()] {
            let (written, line) = access_line(JsonShape::Infermesh, &entry);
            let Value::Object(mut line) = line else {
                panic!("{written}")
            };
            let mut fields = event_fields(&entry);
            // Stamped with the request's start, tracing's layout around
            // the fields.
            assert_eq!(
                line.shift_remove("timestamp"),
                fields.shift_remove("start_time")
            );
            assert_eq!(line.shift_remove("level"), Some("INFO".into()));
            assert_eq!(line.shift_remove("target"), Some(ACCESS_TARGET.into()));
            // Every other field, its value and its place.
            assert_eq!(
                line.iter().collect::<Vec<_>>(),
                fields.iter().collect::<Vec<_>>()
            );
        }
        let (written, line) = access_line(JsonShape::Infermesh, &full_entry());
        assert!(written.starts_with(
            "{\"timestamp\":\"2026-12-05T09:14:07.512731Z\",\"level\":\"INFO\",\"message\":\"request\",\"method\":\"POST\""
        ), "{written}");
        assert!(written.ends_with(",\"target\":\"infermesh::access\"}\n"));
        assert_eq!(line["detail"], "line one\nline \"two\"\tand ünïcödé \u{1}");
        assert_eq!(line["duration_ms"], 5312.407);
        assert_eq!(line["first_event_ms"], 52.0);
        assert_eq!(line["endpoint"], "10.0.3.7:8000");
        assert_eq!(line["client"], "10.0.0.12:52114");
        let (_, bare) = access_line(JsonShape::Infermesh, &bare_entry());
        for absent in ["grpc_status", "model", "endpoint", "error", "trace_id"] {
            assert!(
                bare.get(absent).is_none(),
                "{absent}: a field without a value is left out"
            );
        }
        assert_eq!(bare["client"], "[::1]:40000");
    }

    #[test]
    fn the_ecs_access_line_puts_every_field_in_its_place() {
        let entry = full_entry();
        let mut fields = event_fields(&entry);
        let (written, line) = access_line(JsonShape::Ecs, &entry);
        assert_eq!(line["@timestamp"], "2026-12-05T09:14:07.512731Z");
        assert_eq!(line["log.level"], "info");
        assert_eq!(line["log.logger"], ACCESS_TARGET);
        assert_eq!(line["ecs.version"], ECS_VERSION);
        assert_eq!(line["message"], "request");
        assert!(
            written.starts_with("{\"@timestamp\":"),
            "ecs-logging's order"
        );
        // The fields ECS has a field for, moved there.
        for (field, path) in [
            ("method", "/http/request/method"),
            ("status", "/http/response/status_code"),
            ("request_bytes", "/http/request/body/bytes"),
            ("response_bytes", "/http/response/body/bytes"),
            ("request_id", "/http/request/id"),
            ("authority", "/url/domain"),
            ("endpoint", "/destination/address"),
            ("trace_id", "/trace/id"),
            ("span_id", "/span/id"),
            ("model", "/gen_ai/request/model"),
            ("input_tokens", "/gen_ai/usage/input_tokens"),
            ("output_tokens", "/gen_ai/usage/output_tokens"),
        ] {
            let value = fields.shift_remove(field).expect(field);
            assert_eq!(line.pointer(path), Some(&value), "{field} at {path}");
        }
        // The fields converted to ECS's.
        for converted in [
            "start_time",
            "message",
            "duration_ms",
            "path",
            "protocol",
            "client",
        ] {
            fields.shift_remove(converted).expect(converted);
        }
        assert_eq!(line["event"]["duration"], 5_312_407_000_u64);
        assert_eq!(line["url"]["path"], "/v1/chat/completions");
        assert_eq!(line["url"]["query"], "stream=true");
        assert_eq!(line["url"]["original"], "/v1/chat/completions?stream=true");
        assert_eq!(line["http"]["version"], "2");
        assert_eq!(line["source"]["ip"], "10.0.0.12");
        assert_eq!(line["source"]["port"], 52114);
        assert_eq!(line["source"]["address"], "10.0.0.12:52114");
        assert_eq!(line["event"]["kind"], "event");
        assert_eq!(line["event"]["category"], json!(["web"]));
        assert_eq!(line["event"]["dataset"], "infermesh.access");
        assert_eq!(line["event"]["outcome"], "failure", "the proxy's error");
        // What ECS has no field for: all of it, under one prefix, and
        // nothing else there.
        assert_eq!(line["infermesh"], Value::Object(fields));
    }

    #[test]
    fn the_ecs_access_line_leaves_out_what_the_request_did_not_have() {
        let (_, line) = access_line(JsonShape::Ecs, &bare_entry());
        for absent in ["destination", "trace", "span", "gen_ai"] {
            assert!(line.get(absent).is_none(), "{absent}");
        }
        assert!(line["url"].get("query").is_none());
        assert_eq!(line["url"]["domain"], "");
        assert_eq!(line["http"]["version"], "1.1");
        assert_eq!(line["source"]["ip"], "::1");
        assert_eq!(line["source"]["port"], 40000);
        assert_eq!(line["event"]["outcome"], "success", "a 404 is the client's");
        assert_eq!(
            line["infermesh"],
            json!({"route": "", "backend": "", "retries": 0, "listener": "public"})
        );
        let mut failed = bare_entry();
        failed.status = 504;
        assert_eq!(line_of_ecs(&failed)["event"]["outcome"], "failure");
        let mut tokens_only = bare_entry();
        tokens_only.output_tokens = Some(3);
        let gen_ai = &line_of_ecs(&tokens_only)["gen_ai"];
        assert_eq!(*gen_ai, json!({"usage": {"output_tokens": 3}}));
    }

    fn line_of_ecs(entry: &AccessEntry<'_>) -> Value {
        access_line(JsonShape::Ecs, entry).1
    }

    /// An output the writer thread writes into, read once it stopped.
    #[derive(Clone, Default)]
    struct Output(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Output {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_log_filter_decides_which_access_lines_are_written() {
        let output = Output::default();
        let (writer, guard) = log_writer::start(output.clone(), Duration::from_secs(60));
        let access = JsonAccessLog::new(JsonShape::Infermesh, writer);
        for (filter, entry) in [
            ("info,infermesh::access=off", bare_entry()),
            ("info", full_entry()),
            ("warn", bare_entry()),
        ] {
            let subscriber =
                tracing_subscriber::registry().with(tracing_subscriber::EnvFilter::new(filter));
            // As the request's record does: the filter first, then the line.
            tracing::subscriber::with_default(subscriber, || {
                if access_lines_enabled() {
                    access.write(&entry);
                }
            });
        }
        // Stopping the writer writes what waits.
        drop(guard);
        let written = String::from_utf8(output.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written, access_line(JsonShape::Infermesh, &full_entry()).0);
    }

    #[test]
    fn the_ip_of_an_address_is_written_as_display_writes_it() {
        for address in [
            "0.0.0.0:0",
            "10.0.3.7:8000",
            "[::1]:8000",
            "[fe80::1%2]:80",
            "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535",
        ] {
            let parsed: std::net::SocketAddr = address.parse().unwrap();
            let text = AddressText::new(parsed);
            assert_eq!(ip_of(text.as_str()), parsed.ip().to_string());
        }
    }

    #[test]
    fn timestamps_are_written_as_humantime_writes_them() {
        let second = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let mut times = vec![
            UNIX_EPOCH,
            second(1_796_462_047) + Duration::from_nanos(512_731_999),
            // The last microsecond of a year, then the next second.
            second(1_798_761_599) + Duration::from_micros(999_999),
            second(1_798_761_600),
            second(1_798_761_600) + Duration::from_nanos(999),
            second(1_798_761_600) + Duration::from_micros(10),
        ];
        // The same second again after another one: the kept text is
        // that second's.
        times.push(times[1]);
        for at in times {
            let mut written = String::new();
            write_timestamp(&mut written, at);
            assert_eq!(
                written,
                humantime::format_rfc3339_micros(at).to_string(),
                "{at:?}"
            );
        }
        let mut before_1970 = String::new();
        write_timestamp(&mut before_1970, UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(before_1970, "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn milliseconds_are_written_as_serde_json_writes_the_number() {
        let every_microsecond = (0..=100_000).map(|us| us * 1000);
        let every_half = (0..=100_000).map(|us| us * 1000 + 500);
        let rounding = [499, 500, 999_499, 999_500, 1_000_499_999];
        let long = [
            3_600_000_000_000,
            86_400_123_456_789,
            u64::from(u32::MAX) * 1000,
        ];
        for nanos in every_microsecond
            .chain(every_half)
            .chain(rounding)
            .chain(long)
        {
            let duration = Duration::from_nanos(nanos);
            let mut written = String::new();
            write_millis(&mut written, duration);
            let number = serde_json::Number::from_f64(millis(duration)).unwrap();
            assert_eq!(written, number.to_string(), "{nanos} ns");
        }
    }

    #[test]
    fn a_string_is_escaped_as_serde_json_escapes_it() {
        // Every byte JSON must escape, at every place of an eight-byte
        // word and in the tail after the last whole word.
        for byte in 0..=0x7f_u8 {
            for at in 0..17 {
                let mut text = vec![b'a'; 17];
                text[at] = byte;
                let text = String::from_utf8(text).unwrap();
                let must = byte < 0x20 || byte == b'"' || byte == b'\\';
                assert_eq!(needs_escape(text.as_bytes()), must, "{byte:#x} at {at}");
                let mut written = String::new();
                write_json_str_contents(&mut written, &text);
                assert_eq!(
                    format!("\"{written}\""),
                    serde_json::to_string(&text).unwrap()
                );
            }
        }
        for text in ["", "ünïcödé and 日本語", "tab\there", "\u{7f}\u{1f}\u{0}"] {
            let mut written = String::new();
            write_json_str_contents(&mut written, text);
            assert_eq!(
                format!("\"{written}\""),
                serde_json::to_string(text).unwrap()
            );
        }
    }

    #[test]
    fn other_ecs_lines_keep_their_fields_under_the_prefix() {
        let Value::Object(fields) = json!({"message": "listening", "listener": "web"}) else {
            unreachable!()
        };
        let line = ecs_line(fields, "WARN", "infermesh_proxy::server::listener");
        assert_eq!(line["log.level"], "warn");
        assert_eq!(line["message"], "listening");
        assert_eq!(line["log.logger"], "infermesh_proxy::server::listener");
        assert_eq!(line["infermesh"]["listener"], "web");
    }
}

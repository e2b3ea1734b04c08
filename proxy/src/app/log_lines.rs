//! How a JSON log line is laid out: this module owns the two JSON shapes
//! of `--log-format` — infermesh's own (`json`: the event's fields at the
//! top level beside `timestamp`, `level` and `target`) and the Elastic
//! Common Schema (`ecs`) — and the rule that an access-log line is stamped
//! with the time its request *started*, as Envoy's and ECS's are, not the
//! time its response ended.
//!
//! The access log's record (`server::access_log`) gives that time as its
//! `start_time` field (RFC 3339); every other field keeps its name in the
//! `json` shape, and in the `ecs` shape is moved to its ECS field (the
//! mapping is [`ECS_ACCESS_FIELDS`]) or, when ECS has none, under
//! `infermesh.`.

use std::cell::RefCell;
use std::fmt;
use std::thread::LocalKey;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of access-log events.
const ACCESS_TARGET: &str = "infermesh::access";

/// The access record's field holding when its request started.
const START_TIME: &str = "start_time";

/// The version of the Elastic Common Schema the `ecs` lines follow.
const ECS_VERSION: &str = "8.11.0";

/// Access-log fields that have an ECS field, and its dotted path.
/// (`duration_ms`, `client`, `path` and `protocol` are converted rather
/// than renamed; see `EcsFields::take`.)
pub(crate) const ECS_ACCESS_FIELDS: &[(&str, &str)] = &[
    ("method", "http.request.method"),
    ("status", "http.response.status_code"),
    ("request_bytes", "http.request.body.bytes"),
    ("response_bytes", "http.response.body.bytes"),
    ("request_id", "http.request.id"),
    ("authority", "url.domain"),
    ("endpoint", "destination.address"),
    // The request's span, when it is traced and sampled: ECS's tracing
    // fields, which Kibana links to the APM trace.
    ("trace_id", "trace.id"),
    ("span_id", "span.id"),
    // Token counts and the model go to ECS's `gen_ai` field set (beta),
    // which carries OpenTelemetry's GenAI attribute names: the fields
    // Elastic's LLM integrations and OTel-fed dashboards already query,
    // and the names OpenTelemetry's GenAI spans use, so logs and traces
    // agree. (The `model` is the model label: the route match's,
    // or the request's when the config names it.)
    ("input_tokens", "gen_ai.usage.input_tokens"),
    ("output_tokens", "gen_ai.usage.output_tokens"),
    ("model", "gen_ai.request.model"),
];

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
        let access = event.metadata().target() == ACCESS_TARGET;
        if self.shape == JsonShape::Infermesh {
            if !access {
                return self.plain.format_event(ctx, writer, event);
            }
            return write_access_line(&mut writer, event);
        }
        if access {
            return write_ecs_access_line(&mut writer, event);
        }
        let level = event.metadata().level().as_str();
        let target = event.metadata().target();
        let line = ecs_line(field_values(event), level, target);
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Writes the `json` shape of an access line: tracing's layout (`timestamp`,
/// `level`, the fields in their order, `target`), stamped with the
/// request's start. Written straight from the event's fields, without an
/// object of JSON values in between: an access line is written per
/// request, and building one cost more than the rest of the line's way
/// to standard output. The tests hold it to `infermesh_access_line`, the
/// same layout built as a value.
fn write_access_line(writer: &mut Writer<'_>, event: &Event<'_>) -> fmt::Result {
    thread_local! {
        static FIELDS: RefCell<StreamedFields> = Default::default();
    }
    with_collected(&FIELDS, event, |fields| {
        writer.write_str("{\"timestamp\":")?;
        fields.write_start(writer)?;
        writer.write_str(",\"level\":")?;
        write_json_str(writer, event.metadata().level().as_str())?;
        if fields.has_message {
            writer.write_str(",\"message\":")?;
            write_json_str(writer, &fields.message)?;
        }
        writer.write_str(&fields.rest)?;
        writer.write_str(",\"target\":")?;
        write_json_str(writer, event.metadata().target())?;
        writer.write_str("}\n")
    })
}

/// Writes the `ecs` shape of an access line straight from the event's
/// fields, as [`write_access_line`] writes the `json` one: the fields with
/// an ECS field nested at their ECS paths, the others under `infermesh.`.
/// The tests hold it to `ecs_access_line`, the same line built as a value
/// (member order aside: JSON objects have none).
fn write_ecs_access_line(writer: &mut Writer<'_>, event: &Event<'_>) -> fmt::Result {
    thread_local! {
        static FIELDS: RefCell<EcsFields> = Default::default();
    }
    with_collected(&FIELDS, event, |fields| {
        fields.write(writer, event.metadata().level())
    })
}

/// The fields of an access event gathered into buffers that are kept from
/// line to line (a thread's own, see [`with_collected`]).
trait Collected: Default {
    /// Empties the buffers, keeping their capacity.
    fn clear(&mut self);
    /// Takes the field `name`.
    fn take(&mut self, name: &str, value: Visited<'_>);
}

/// Calls `write` with `event`'s fields collected into this thread's
/// buffers of `fields`: no allocation per line once they have grown.
fn with_collected<T: Collected + 'static>(
    fields: &'static LocalKey<RefCell<T>>,
    event: &Event<'_>,
    write: impl FnOnce(&T) -> fmt::Result,
) -> fmt::Result {
    fields.with(|fields| {
        let mut fields = fields.borrow_mut();
        let fields = &mut *fields;
        fields.clear();
        visit_fields(event, |name, value| fields.take(name, value));
        write(fields)
    })
}

/// An access event's fields as the `ecs` shape needs them.
#[derive(Default)]
struct EcsFields {
    /// The start, the message, and the fields ECS has no field for
    /// (written as `,"name":value`, for `infermesh.`).
    plain: StreamedFields,
    /// The JSON of each field of [`ECS_ACCESS_FIELDS`] the event has, by
    /// its place in that table (empty when it has not).
    mapped: Vec<String>,
    /// The numeric status, for the outcome.
    status: Option<u64>,
    /// Whether the event has an `error`.
    error: bool,
    /// The JSON of the fields converted from `duration_ms` (to
    /// nanoseconds), `path`, `protocol` and `client` (empty when absent).
    event_duration: String,
    url_path: String,
    url_query: String,
    url_original: String,
    http_version: String,
    source_ip: String,
    source_port: String,
    source_address: String,
}

impl Collected for EcsFields {
    fn clear(&mut self) {
        self.plain.clear();
        self.mapped
            .resize_with(ECS_ACCESS_FIELDS.len(), String::new);
        self.mapped.iter_mut().for_each(String::clear);
        self.status = None;
        self.error = false;
        for converted in [
            &mut self.event_duration,
            &mut self.url_path,
            &mut self.url_query,
            &mut self.url_original,
            &mut self.http_version,
            &mut self.source_ip,
            &mut self.source_port,
            &mut self.source_address,
        ] {
            converted.clear();
        }
    }

    /// Takes the field `name`, to its ECS field, converted, or aside for
    /// `infermesh.`.
    fn take(&mut self, name: &str, value: Visited<'_>) {
        if let Some(at) = ECS_ACCESS_FIELDS.iter().position(|(from, _)| *from == name) {
            if name == "status" {
                self.status = match value {
                    Visited::U64(n) => Some(n),
                    Visited::I64(n) => u64::try_from(n).ok(),
                    _ => None,
                };
            }
            value.write_json(&mut self.mapped[at]);
            return;
        }
        match (name, value) {
            ("duration_ms", value) => {
                let ms = match value {
                    Visited::F64(ms) if ms.is_finite() => Some(ms),
                    Visited::U64(ms) => Some(ms as f64),
                    Visited::I64(ms) => Some(ms as f64),
                    _ => None,
                };
                if let Some(ms) = ms {
                    Visited::U64((ms * 1e6).round() as u64).write_json(&mut self.event_duration);
                }
            }
            ("path", value) => {
                if let Visited::Str(target) = value {
                    let (path, query) = target.split_once('?').unwrap_or((target, ""));
                    Visited::Str(path).write_json(&mut self.url_path);
                    if !query.is_empty() {
                        Visited::Str(query).write_json(&mut self.url_query);
                    }
                    Visited::Str(target).write_json(&mut self.url_original);
                }
            }
            ("protocol", value) => {
                if let Visited::Str(protocol) = value {
                    // `HTTP/1.1` -> `1.1`, `HTTP/2.0` -> `2`, as ECS
                    // writes versions.
                    let version = protocol.trim_start_matches("HTTP/");
                    let version = version.strip_suffix(".0").unwrap_or(version);
                    Visited::Str(version).write_json(&mut self.http_version);
                }
            }
            ("client", value) => {
                if let Visited::Str(client) = value {
                    if let Ok(address) = client.parse::<std::net::SocketAddr>() {
                        use fmt::Write as _;
                        let _ = write!(self.source_ip, "\"{}\"", address.ip());
                        Visited::U64(address.port().into()).write_json(&mut self.source_port);
                    }
                    Visited::Str(client).write_json(&mut self.source_address);
                }
            }
            (name, value) => {
                if name == "error" {
                    self.error = true;
                }
                self.plain.take(name, value);
            }
        }
    }
}

impl EcsFields {
    /// Writes the line.
    fn write(&self, writer: &mut impl fmt::Write, level: &tracing::Level) -> fmt::Result {
        writer.write_str("{\"@timestamp\":")?;
        self.plain.write_start(writer)?;
        writer.write_str(",\"log.level\":")?;
        writer.write_str(match *level {
            tracing::Level::ERROR => "\"error\"",
            tracing::Level::WARN => "\"warn\"",
            tracing::Level::INFO => "\"info\"",
            tracing::Level::DEBUG => "\"debug\"",
            tracing::Level::TRACE => "\"trace\"",
        })?;
        writer.write_str(",\"message\":")?;
        if self.plain.has_message {
            write_json_str(writer, &self.plain.message)?;
        } else {
            writer.write_str("null")?;
        }
        write!(
            writer,
            ",\"ecs.version\":\"{ECS_VERSION}\",\"log.logger\":\"{ACCESS_TARGET}\""
        )?;
        let failed = self.error || self.status.is_some_and(|s| s >= 500);
        let mut nested: Vec<(&str, &str)> = Vec::with_capacity(32);
        nested.extend([
            ("event.kind", "\"event\""),
            ("event.category", "[\"web\"]"),
            ("event.dataset", "\"infermesh.access\""),
            (
                "event.outcome",
                if failed { "\"failure\"" } else { "\"success\"" },
            ),
        ]);
        for ((_, to), value) in ECS_ACCESS_FIELDS.iter().zip(&self.mapped) {
            if !value.is_empty() {
                nested.push((to, value));
            }
        }
        for (to, value) in [
            ("event.duration", &self.event_duration),
            ("url.path", &self.url_path),
            ("url.query", &self.url_query),
            ("url.original", &self.url_original),
            ("http.version", &self.http_version),
            ("source.ip", &self.source_ip),
            ("source.port", &self.source_port),
            ("source.address", &self.source_address),
        ] {
            if !value.is_empty() {
                nested.push((to, value));
            }
        }
        // Members of one object must be written together: sorted by path,
        // they are next to each other.
        nested.sort_unstable_by(|a, b| a.0.cmp(b.0));
        writer.write_char(',')?;
        write_nested(writer, &nested, 0)?;
        if let Some(rest) = self.plain.rest.strip_prefix(',') {
            writer.write_str(",\"infermesh\":{")?;
            writer.write_str(rest)?;
            writer.write_char('}')?;
        }
        writer.write_str("}\n")
    }
}

/// Writes `"a":{"b":value}` for each `("a.b", value)` of `members`
/// (values already JSON), comma-separated, nesting at the dots, the first
/// `skip` bytes of every path left out (the objects already open).
/// Members of one object must be next to each other (sorted by path).
fn write_nested(
    writer: &mut impl fmt::Write,
    members: &[(&str, &str)],
    skip: usize,
) -> fmt::Result {
    let mut at = 0;
    while at < members.len() {
        if at > 0 {
            writer.write_char(',')?;
        }
        let path = &members[at].0[skip..];
        writer.write_char('"')?;
        match path.split_once('.') {
            None => {
                writer.write_str(path)?;
                writer.write_str("\":")?;
                writer.write_str(members[at].1)?;
                at += 1;
            }
            Some((object, _)) => {
                let inside = members[at..]
                    .iter()
                    .take_while(|(path, _)| {
                        path[skip..]
                            .split_once('.')
                            .is_some_and(|(head, _)| head == object)
                    })
                    .count();
                writer.write_str(object)?;
                writer.write_str("\":{")?;
                write_nested(writer, &members[at..at + inside], skip + object.len() + 1)?;
                writer.write_char('}')?;
                at += inside;
            }
        }
    }
    Ok(())
}

/// `value` as a JSON string, escaped as serde_json escapes it.
fn write_json_str(writer: &mut impl fmt::Write, value: &str) -> fmt::Result {
    writer.write_char('"')?;
    // Nearly every value (paths, names, addresses, ids) needs no escape:
    // one tight pass to know, then one copy.
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        writer.write_str(value)?;
        return writer.write_char('"');
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
        writer.write_str(&value[start..i])?;
        if escaped.is_empty() {
            write!(writer, "\\u{byte:04x}")?;
        } else {
            writer.write_str(escaped)?;
        }
        start = i + 1;
    }
    writer.write_str(&value[start..])?;
    writer.write_char('"')
}

/// An access event's fields as the `json` shape writes them: the start
/// and the message kept apart (they lead the line), every other field
/// already written as `,"name":value`.
#[derive(Default)]
struct StreamedFields {
    start_time: String,
    /// The message, when the event has one (`has_message`); its buffer
    /// is kept from line to line.
    message: String,
    has_message: bool,
    rest: String,
}

impl StreamedFields {
    /// Writes the line's time as a JSON string: the request's start, or
    /// now for an event without one.
    fn write_start(&self, writer: &mut impl fmt::Write) -> fmt::Result {
        match self.start_time.is_empty() {
            true => write_json_str(writer, &now_rfc3339()),
            false => write_json_str(writer, &self.start_time),
        }
    }
}

impl Collected for StreamedFields {
    fn clear(&mut self) {
        self.start_time.clear();
        self.message.clear();
        self.has_message = false;
        self.rest.clear();
    }

    /// Takes the field `name`: the start and the message apart, any other
    /// written as `,"name":value`.
    fn take(&mut self, name: &str, value: Visited<'_>) {
        match (name, value) {
            (START_TIME, Visited::Str(start)) => start.clone_into(&mut self.start_time),
            ("message", Visited::Str(message)) => {
                message.clone_into(&mut self.message);
                self.has_message = true;
            }
            (name, value) => {
                self.rest.push_str(",\"");
                self.rest.push_str(name);
                self.rest.push_str("\":");
                value.write_json(&mut self.rest);
            }
        }
    }
}

/// One field's value, as a visitor of an event's fields is given it.
#[derive(Clone, Copy)]
enum Visited<'a> {
    Str(&'a str),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
}

impl Visited<'_> {
    /// Writes the value as JSON, as serde_json writes it: a number as
    /// `1.0`, not `1`; `null` for a number JSON cannot hold (a NaN).
    /// Integers without the formatting machinery (a line has a dozen).
    fn write_json(self, out: &mut String) {
        use fmt::Write as _;
        match self {
            Visited::Str(value) => {
                let _ = write_json_str(out, value);
            }
            Visited::U64(n) => out.push_str(itoa::Buffer::new().format(n)),
            Visited::I64(n) => out.push_str(itoa::Buffer::new().format(n)),
            Visited::F64(n) => match serde_json::Number::from_f64(n) {
                Some(number) => {
                    let _ = write!(out, "{number}");
                }
                None => out.push_str("null"),
            },
            Visited::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        }
    }
}

/// Hands every field of an event to `take` as a [`Visited`] value, a
/// `Debug` one formatted first (into `scratch`).
struct VisitWith<'s, F> {
    take: F,
    scratch: &'s mut String,
}

impl<F: FnMut(&str, Visited<'_>)> Visit for VisitWith<'_, F> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        (self.take)(field.name(), Visited::F64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        (self.take)(field.name(), Visited::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        (self.take)(field.name(), Visited::U64(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        (self.take)(field.name(), Visited::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        (self.take)(field.name(), Visited::Str(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        use fmt::Write as _;
        self.scratch.clear();
        let _ = write!(self.scratch, "{value:?}");
        (self.take)(field.name(), Visited::Str(self.scratch));
    }
}

/// Hands every field of `event` to `take`.
fn visit_fields(event: &Event<'_>, take: impl FnMut(&str, Visited<'_>)) {
    thread_local! {
        // Where `Debug` values are formatted, kept from event to event.
        static SCRATCH: std::cell::RefCell<String> = Default::default();
    }
    SCRATCH.with_borrow_mut(|scratch| event.record(&mut VisitWith { take, scratch }));
}

impl Visited<'_> {
    /// The value as a JSON value.
    fn to_value(self) -> Value {
        match self {
            Visited::Str(value) => value.into(),
            Visited::U64(n) => n.into(),
            Visited::I64(n) => n.into(),
            Visited::F64(n) => n.into(),
            Visited::Bool(b) => b.into(),
        }
    }
}

/// Now, as tracing stamps its lines.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// The `json` shape of an access line: tracing's layout, stamped with the
/// request's start, as a value (the layout [`write_access_line`] writes).
#[cfg(test)]
fn infermesh_access_line(mut fields: Map<String, Value>, level: &str, target: &str) -> Value {
    let mut line = Map::new();
    line.insert(
        "timestamp".into(),
        fields.shift_remove(START_TIME).unwrap_or_else(now),
    );
    line.insert("level".into(), level.into());
    line.append(&mut fields);
    line.insert("target".into(), target.into());
    Value::Object(line)
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

/// The ECS line of an access-log record, as a value (the line
/// [`write_ecs_access_line`] writes).
#[cfg(test)]
fn ecs_access_line(mut fields: Map<String, Value>, level: &str) -> Value {
    let start = fields.remove(START_TIME).unwrap_or_else(now);
    let mut line = ecs_head(start, level, fields.remove("message").unwrap_or_default());
    line.insert("log.logger".into(), ACCESS_TARGET.into());
    insert(&mut line, "event.kind", "event".into());
    insert(&mut line, "event.category", Value::from(vec!["web"]));
    insert(&mut line, "event.dataset", "infermesh.access".into());
    for (from, to) in ECS_ACCESS_FIELDS {
        if let Some(value) = fields.remove(*from) {
            insert(&mut line, to, value);
        }
    }
    if let Some(ms) = fields.remove("duration_ms").and_then(|v| v.as_f64()) {
        insert(
            &mut line,
            "event.duration",
            ((ms * 1e6).round() as u64).into(),
        );
    }
    let failed = fields.contains_key("error")
        || line
            .get("http")
            .and_then(|h| h.pointer("/response/status_code"))
            .and_then(Value::as_u64)
            .is_some_and(|s| s >= 500);
    insert(
        &mut line,
        "event.outcome",
        if failed { "failure" } else { "success" }.into(),
    );
    if let Some(Value::String(target)) = fields.remove("path") {
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        insert(&mut line, "url.path", path.into());
        if !query.is_empty() {
            insert(&mut line, "url.query", query.into());
        }
        insert(&mut line, "url.original", target.as_str().into());
    }
    if let Some(Value::String(protocol)) = fields.remove("protocol") {
        // `HTTP/1.1` -> `1.1`, `HTTP/2.0` -> `2`, as ECS writes versions.
        let version = protocol.trim_start_matches("HTTP/");
        let version = version.strip_suffix(".0").unwrap_or(version);
        insert(&mut line, "http.version", version.into());
    }
    if let Some(Value::String(client)) = fields.remove("client") {
        if let Ok(address) = client.parse::<std::net::SocketAddr>() {
            insert(&mut line, "source.ip", address.ip().to_string().into());
            insert(&mut line, "source.port", address.port().into());
        }
        insert(&mut line, "source.address", client.into());
    }
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

/// Sets the field at a dotted ECS path in nested objects (`http.version`
/// is `{"http": {"version": ...}}`); the `log.*` and `ecs.version` keys
/// stay flat, as the ecs-logging libraries write them. (For the reference
/// line the tests build.)
#[cfg(test)]
fn insert(line: &mut Map<String, Value>, path: &str, value: Value) {
    let mut parts = path.split('.').peekable();
    let mut object = line;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            object.insert(part.to_owned(), value);
            return;
        }
        let child = object
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !child.is_object() {
            *child = Value::Object(Map::new());
        }
        object = child.as_object_mut().expect("made an object above");
    }
}

/// Now, as tracing stamps its lines, as a JSON value.
fn now() -> Value {
    now_rfc3339().into()
}

/// An event's fields, as JSON values.
fn field_values(event: &Event<'_>) -> Map<String, Value> {
    let mut fields = Map::new();
    visit_fields(event, |name, value| {
        fields.insert(name.to_owned(), value.to_value());
    });
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn access_fields() -> Map<String, Value> {
        let Value::Object(fields) = json!({
            "message": "request",
            "start_time": "2026-12-05T09:14:07.512731Z",
            "method": "POST",
            "path": "/v1/chat/completions?stream=true",
            "authority": "llm.example.com",
            "protocol": "HTTP/2.0",
            "status": 200,
            "duration_ms": 5312.407,
            "first_byte_ms": 41.207,
            "request_bytes": 731,
            "response_bytes": 18422,
            "route": "chat",
            "backend": "llama",
            "endpoint": "10.0.3.7:8000",
            "retries": 0,
            "client": "10.0.0.12:52114",
            "listener": "public",
            "request_id": "9f1c2b7e-3d4a-4c1e-8b0f-6a2d5e7c9b13",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "span_id": "00f067aa0ba902b7",
        }) else {
            unreachable!()
        };
        fields
    }

    /// What `format` makes of each event `emit` sends, in order.
    fn formatted<T: Send + 'static>(format: fn(&Event<'_>) -> T, emit: impl FnOnce()) -> Vec<T> {
        use tracing_subscriber::layer::SubscriberExt as _;

        /// Keeps what `format` makes of each event it sees.
        struct Formatted<T> {
            lines: std::sync::Arc<std::sync::Mutex<Vec<T>>>,
            format: fn(&Event<'_>) -> T,
        }

        impl<S: Subscriber, T: Send + 'static> tracing_subscriber::Layer<S> for Formatted<T> {
            fn on_event(&self, event: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                self.lines.lock().unwrap().push((self.format)(event));
            }
        }

        let lines = std::sync::Arc::default();
        let layer = Formatted {
            lines: std::sync::Arc::clone(&lines),
            format,
        };
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), emit);
        std::mem::take(&mut *lines.lock().unwrap())
    }

    /// An event's `json` access line written straight and built as a
    /// value.
    fn json_both_ways(event: &Event<'_>) -> (String, String) {
        let mut written = String::new();
        write_access_line(&mut Writer::new(&mut written), event).unwrap();
        let built = infermesh_access_line(
            field_values(event),
            event.metadata().level().as_str(),
            event.metadata().target(),
        );
        (
            written,
            format!("{}\n", serde_json::to_string(&built).unwrap()),
        )
    }

    #[test]
    fn the_json_access_line_written_straight_is_the_line_built_as_a_value() {
        let lines = formatted(json_both_ways, || {
            let none: Option<&str> = None;
            tracing::info!(
                target: "infermesh::access",
                start_time = %"2026-12-05T09:14:07.512731Z",
                method = %http::Method::POST,
                path = "/v1/chat?q=\"quoted\"\\ and \u{1}",
                protocol = ?http::Version::HTTP_2,
                status = 200u16,
                grpc_status = Some(14u16),
                duration_ms = 5312.407,
                first_byte_ms = 1.0,
                first_event_ms = f64::NAN,
                model = none,
                retries = 0u32,
                error = Some("upstream_reset"),
                detail = "line one\nline two\tand ünïcödé",
                signed = -3i64,
                smallest = i64::MIN,
                largest = u64::MAX,
                cached = true,
                "request"
            );
        });
        assert_eq!(lines.len(), 1);
        let (written, built) = &lines[0];
        assert_eq!(written, built);
        assert!(written.starts_with(
            "{\"timestamp\":\"2026-12-05T09:14:07.512731Z\",\"level\":\"INFO\",\"message\":\"request\",\"method\":\"POST\""
        ));
        assert!(
            !written.contains("\"model\""),
            "a field without a value is left out"
        );
        // Each kind of value, as a log reader gets it (the reference line
        // above is fed by the same visitor, so it is checked here apart).
        let line: Value = serde_json::from_str(written).unwrap();
        assert_eq!(line["path"], "/v1/chat?q=\"quoted\"\\ and \u{1}");
        assert_eq!(line["protocol"], "HTTP/2.0");
        assert_eq!(line["status"], 200);
        assert_eq!(line["grpc_status"], 14);
        assert_eq!(line["duration_ms"], 5312.407);
        assert_eq!(line["first_event_ms"], Value::Null);
        assert_eq!(line["signed"], -3);
        assert_eq!(line["smallest"], i64::MIN);
        assert_eq!(line["largest"], u64::MAX);
        assert_eq!(line["cached"], true);
        assert_eq!(line["detail"], "line one\nline two\tand ünïcödé");
    }

    /// An event's `ecs` access line written straight and built as a
    /// value, both parsed.
    fn ecs_both_ways(event: &Event<'_>) -> (Value, Value) {
        let mut written = String::new();
        write_ecs_access_line(&mut Writer::new(&mut written), event).unwrap();
        assert!(written.ends_with("}\n"), "{written}");
        let written: Value =
            serde_json::from_str(&written).unwrap_or_else(|e| panic!("not JSON ({e}): {written}"));
        let built = ecs_access_line(field_values(event), event.metadata().level().as_str());
        (written, built)
    }

    #[test]
    fn the_ecs_access_line_written_straight_is_the_line_built_as_a_value() {
        let lines = formatted(ecs_both_ways, || {
            let none: Option<&str> = None;
            tracing::info!(
                target: "infermesh::access",
                start_time = %"2026-12-05T09:14:07.512731Z",
                method = %http::Method::POST,
                path = "/v1/chat/completions?stream=true",
                authority = "llm.example.com",
                protocol = ?http::Version::HTTP_2,
                status = 200u16,
                duration_ms = 5312.407,
                first_byte_ms = 41.207,
                model = "llama-3-8b",
                input_tokens = 17u64,
                output_tokens = 250u64,
                request_bytes = 731u64,
                response_bytes = 18422u64,
                route = "chat",
                backend = "llama",
                endpoint = "10.0.3.7:8000",
                retries = 0u32,
                error = none,
                client = "10.0.0.12:52114",
                listener = "public",
                request_id = "9f1c2b7e",
                trace_id = "4bf92f3577b34da6a3ce929d0e0e4736",
                span_id = "00f067aa0ba902b7",
                "request"
            );
            tracing::info!(
                target: "infermesh::access",
                start_time = %"2026-12-05T09:14:08.000001Z",
                method = %http::Method::GET,
                path = "/v1/models",
                protocol = ?http::Version::HTTP_11,
                status = 504u16,
                duration_ms = f64::NAN,
                route = "",
                backend = "",
                error = "response_headers_timeout",
                detail = "a \"quoted\"\nline",
                client = "[::1]:40000",
                "request"
            );
            tracing::info!(
                target: "infermesh::access",
                status = 502u16,
                client = "not an address",
                "request"
            );
        });
        assert_eq!(lines.len(), 3);
        for (written, built) in lines.iter().take(2) {
            assert_eq!(written, built);
        }
        // Without a start the line is stamped with now: all else equal.
        let (mut written, mut built) = lines[2].clone();
        written.as_object_mut().unwrap().remove("@timestamp");
        built.as_object_mut().unwrap().remove("@timestamp");
        assert_eq!(written, built);
        let first = &lines[0].0;
        assert_eq!(first["event"]["duration"], 5_312_407_000_u64);
        assert_eq!(first["event"]["outcome"], "success");
        assert_eq!(first["http"]["version"], "2");
        assert_eq!(first["http"]["response"]["status_code"], 200);
        assert_eq!(first["url"]["query"], "stream=true");
        assert_eq!(first["source"]["port"], 52114);
        assert_eq!(first["gen_ai"]["usage"]["output_tokens"], 250);
        assert_eq!(first["infermesh"]["route"], "chat");
        assert_eq!(lines[1].0["event"]["outcome"], "failure");
        assert_eq!(lines[1].0["source"]["ip"], "::1");
        assert!(lines[1].0["url"].get("query").is_none());
        assert!(lines[1].0["event"].get("duration").is_none());
    }

    #[test]
    fn the_json_access_line_is_stamped_with_the_start() {
        let line = infermesh_access_line(access_fields(), "INFO", ACCESS_TARGET);
        assert_eq!(line["timestamp"], "2026-12-05T09:14:07.512731Z");
        assert!(line.get("start_time").is_none());
        assert_eq!(line["status"], 200);
        assert_eq!(line["target"], ACCESS_TARGET);
        let keys: Vec<&String> = line.as_object().unwrap().keys().collect();
        assert_eq!(keys[..2], ["timestamp", "level"]);
    }

    #[test]
    fn the_ecs_access_line_uses_ecs_fields() {
        let line = ecs_access_line(access_fields(), "INFO");
        assert_eq!(line["@timestamp"], "2026-12-05T09:14:07.512731Z");
        assert_eq!(line["log.level"], "info");
        assert_eq!(line["ecs.version"], ECS_VERSION);
        assert_eq!(line["message"], "request");
        assert_eq!(line["http"]["request"]["method"], "POST");
        assert_eq!(
            line["http"]["request"]["id"],
            "9f1c2b7e-3d4a-4c1e-8b0f-6a2d5e7c9b13"
        );
        assert_eq!(line["http"]["response"]["status_code"], 200);
        assert_eq!(line["http"]["request"]["body"]["bytes"], 731);
        assert_eq!(line["http"]["response"]["body"]["bytes"], 18422);
        assert_eq!(line["http"]["version"], "2");
        assert_eq!(line["url"]["path"], "/v1/chat/completions");
        assert_eq!(line["url"]["query"], "stream=true");
        assert_eq!(line["url"]["domain"], "llm.example.com");
        assert_eq!(line["event"]["duration"], 5_312_407_000_u64);
        assert_eq!(line["event"]["outcome"], "success");
        assert_eq!(line["source"]["ip"], "10.0.0.12");
        assert_eq!(line["source"]["port"], 52114);
        assert_eq!(line["destination"]["address"], "10.0.3.7:8000");
        assert_eq!(line["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span"]["id"], "00f067aa0ba902b7");
        // What ECS has no field for stays, under one prefix.
        assert_eq!(line["infermesh"]["route"], "chat");
        assert_eq!(line["infermesh"]["backend"], "llama");
        assert_eq!(line["infermesh"]["first_byte_ms"], 41.207);
        assert!(
            line["infermesh"].get("method").is_none(),
            "moved, not copied"
        );
    }

    #[test]
    fn the_ecs_access_line_has_token_counts_in_gen_ai() {
        let mut fields = access_fields();
        fields.insert("model".into(), "llama-3-8b".into());
        fields.insert("input_tokens".into(), 17.into());
        fields.insert("output_tokens".into(), 250.into());
        let line = ecs_access_line(fields, "INFO");
        assert_eq!(line["gen_ai"]["request"]["model"], "llama-3-8b");
        assert_eq!(line["gen_ai"]["usage"]["input_tokens"], 17);
        assert_eq!(line["gen_ai"]["usage"]["output_tokens"], 250);
        let infermesh = line["infermesh"].as_object().unwrap();
        for moved in ["model", "input_tokens", "output_tokens"] {
            assert!(!infermesh.contains_key(moved), "{moved}");
        }
    }

    #[test]
    fn a_failed_request_is_an_ecs_failure() {
        let mut fields = access_fields();
        fields.insert("status".into(), 504.into());
        fields.insert("error".into(), "response_headers_timeout".into());
        let line = ecs_access_line(fields, "INFO");
        assert_eq!(line["event"]["outcome"], "failure");
        assert_eq!(line["infermesh"]["error"], "response_headers_timeout");
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

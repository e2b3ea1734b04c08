//! What one access-log line says, as data: this module owns the line's
//! fields ([`AccessEntry`], typed, borrowed from the request's record),
//! the seam through which a line is written ([`AccessLogWriter`]), and the
//! writer a proxy has unless the application installs another
//! ([`TracingAccessLog`]: a `tracing` event with target
//! `infermesh::access`, one field per entry field, which the human log
//! format, and any subscriber, reads).
//!
//! The JSON shapes of the log (`app::log_lines`) write an entry straight
//! from its fields instead: handing two dozen fields one by one through
//! tracing's visitor to a formatter cost more than writing the line.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// The target of access-log lines: `--log-level info,infermesh::access=off`
/// silences them, whatever the format.
pub(crate) const ACCESS_TARGET: &str = "infermesh::access";

/// Whether the log filter lets access lines through
/// (`--log-level info,infermesh::access=off` does not): asked as for a
/// `tracing` event of [`ACCESS_TARGET`] at INFO, whatever writes the line.
pub(crate) fn access_lines_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

/// One access-log line: what the proxy knows of a request once its
/// response has ended. Field names are the line's (docs/operations.md, "The
/// access log"); `None` is a field the line leaves out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AccessEntry<'a> {
    /// When the request arrived: the line's timestamp (as Envoy's and
    /// ECS's are), not when it is written.
    pub start: SystemTime,
    pub method: &'a str,
    /// The path and query.
    pub path: &'a str,
    /// The URI's authority, or the `Host` header ("" when neither).
    pub authority: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0`: as `http::Version`'s `Debug` writes it.
    pub protocol: &'static str,
    pub status: u16,
    pub grpc_status: Option<u16>,
    pub duration: Duration,
    pub first_byte: Option<Duration>,
    pub first_event: Option<Duration>,
    pub model: Option<&'a str>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The route's name ("" when none matched).
    pub route: &'a str,
    /// The backend's name ("" when none was chosen).
    pub backend: &'a str,
    pub endpoint: Option<SocketAddr>,
    pub retries: u32,
    /// The reason of the proxy's own failure (`x-infermesh-error`).
    pub error: Option<&'a str>,
    pub detail: Option<&'a str>,
    pub client: SocketAddr,
    /// `client` as text ([`AddressText`]), made once per connection.
    pub client_address: &'a str,
    /// The client's SPIFFE ID, over mutual TLS.
    pub peer_identity: Option<&'a str>,
    pub listener: &'a str,
    pub request_id: &'a str,
    /// A fan-out's report of its branches (`x-infermesh-fanout`).
    pub fanout: Option<&'a str>,
    pub trace_id: Option<&'a str>,
    pub span_id: Option<&'a str>,
}

/// Writes access-log lines. Called on the request's thread as its response
/// ends, once the access log's filters kept the line: it must not block.
pub(crate) trait AccessLogWriter: Send + Sync {
    /// Writes the line of `entry`. Called only when the log filter lets
    /// access lines through ([`access_lines_enabled`]: the record asks
    /// before it makes the entry).
    fn write(&self, entry: &AccessEntry<'_>);
}

/// Writes each line as a `tracing` event (target [`ACCESS_TARGET`],
/// level INFO, message `request`), for the log's subscriber to format.
pub(crate) struct TracingAccessLog;

impl AccessLogWriter for TracingAccessLog {
    fn write(&self, entry: &AccessEntry<'_>) {
        let endpoint = entry.endpoint.map(AddressText::new);
        tracing::info!(
            target: ACCESS_TARGET,
            // The log formatters take it as the line's timestamp.
            start_time = %humantime::format_rfc3339_micros(entry.start),
            method = entry.method,
            path = entry.path,
            authority = entry.authority,
            protocol = entry.protocol,
            status = entry.status,
            grpc_status = entry.grpc_status,
            duration_ms = millis(entry.duration),
            first_byte_ms = entry.first_byte.map(millis),
            first_event_ms = entry.first_event.map(millis),
            model = entry.model,
            input_tokens = entry.input_tokens,
            output_tokens = entry.output_tokens,
            request_bytes = entry.request_bytes,
            response_bytes = entry.response_bytes,
            route = entry.route,
            backend = entry.backend,
            endpoint = endpoint.as_ref().map(AddressText::as_str),
            retries = entry.retries,
            error = entry.error,
            detail = entry.detail,
            client = entry.client_address,
            peer_identity = entry.peer_identity,
            listener = entry.listener,
            request_id = entry.request_id,
            fanout = entry.fanout,
            trace_id = entry.trace_id,
            span_id = entry.span_id,
            "request"
        );
    }
}

/// A duration in milliseconds, to the microsecond: the unit of the
/// line's `*_ms` fields.
pub(crate) fn millis(d: Duration) -> f64 {
    micros(d) as f64 / 1000.0
}

/// A duration in whole microseconds, half a microsecond rounded up: what
/// every format of the line writes (the JSON shapes from this integer).
pub(crate) fn micros(d: Duration) -> u64 {
    // In 64 bits: 128-bit division is a call and dozens of instructions.
    let rounded = (u64::from(d.subsec_nanos()) + 500) / 1000;
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(rounded)
}

/// A socket address as text (`10.0.3.7:8000`,
/// `[::1]:8000`), written without the formatting machinery or an
/// allocation: an access line writes two of them, and `Display` made them
/// a fifth of its cost.
pub(crate) struct AddressText {
    text: [u8; 64],
    len: usize,
}

impl AddressText {
    /// `address` as `Display` writes it.
    pub(crate) fn new(address: SocketAddr) -> Self {
        let mut out = AddressText::empty();
        match address {
            SocketAddr::V4(v4) => {
                out.ipv4(*v4.ip());
                out.push(b":");
                out.number(address.port());
            }
            SocketAddr::V6(v6) => {
                // IPv6's compressed form (and scope) is not worth writing
                // again: `Display` it is.
                use std::fmt::Write as _;
                let _ = write!(out, "{v6}");
            }
        }
        out
    }

    fn empty() -> Self {
        AddressText {
            text: [0; 64],
            len: 0,
        }
    }

    fn ipv4(&mut self, ip: std::net::Ipv4Addr) {
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.byte(b'.');
            }
            self.number(u16::from(octet));
        }
    }

    fn byte(&mut self, byte: u8) {
        self.text[self.len] = byte;
        self.len += 1;
    }

    fn push(&mut self, bytes: &[u8]) {
        self.text[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Writes `n` in decimal, a byte at a time: five numbers an address,
    /// each too short to be worth a copy.
    fn number(&mut self, n: u16) {
        let mut power = 1;
        while power <= n / 10 {
            power *= 10;
        }
        while power > 0 {
            self.byte(b'0' + (n / power % 10) as u8);
            power /= 10;
        }
    }

    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..self.len]).expect("an address is ASCII")
    }
}

impl std::fmt::Write for AddressText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // The longest socket address text, `[` 45 bytes of IPv6 `%` a
        // 10-digit scope `]:` a 5-digit port, is 64 bytes.
        if self.len + s.len() > self.text.len() {
            return Err(std::fmt::Error);
        }
        self.push(s.as_bytes());
        Ok(())
    }
}

/// The name of an HTTP version as `Debug` writes it (`HTTP/1.1`), without
/// the formatting machinery: an access line is written per request.
pub(crate) fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An entry with every field set, as a streamed chat completion over
    /// HTTP/2 through a traced gateway would have it.
    pub(crate) fn full_entry() -> AccessEntry<'static> {
        AccessEntry {
            // 2026-12-05T09:14:07.512731Z
            start: SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_462_047_512_731),
            method: "POST",
            path: "/v1/chat/completions?stream=true",
            authority: "llm.example.com",
            protocol: "HTTP/2.0",
            status: 200,
            grpc_status: Some(0),
            duration: Duration::from_micros(5_312_407),
            first_byte: Some(Duration::from_micros(41_207)),
            first_event: Some(Duration::from_micros(52_000)),
            model: Some("llama-3-8b"),
            input_tokens: Some(17),
            output_tokens: Some(250),
            request_bytes: 731,
            response_bytes: 18422,
            route: "chat",
            backend: "llama",
            endpoint: Some("10.0.3.7:8000".parse().unwrap()),
            retries: 1,
            error: Some("upstream_reset"),
            detail: Some("line one\nline \"two\"\tand ünïcödé \u{1}"),
            client: "10.0.0.12:52114".parse().unwrap(),
            client_address: "10.0.0.12:52114",
            peer_identity: Some("spiffe://mesh.local/ns/default/sa/web"),
            listener: "public",
            request_id: "9f1c2b7e-3d4a-4c1e-8b0f-6a2d5e7c9b13",
            fanout: Some("a:200,b:200"),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            span_id: Some("00f067aa0ba902b7"),
        }
    }

    /// An entry with only what every line has: a request the proxy
    /// refused before any route, from an IPv6 client.
    pub(crate) fn bare_entry() -> AccessEntry<'static> {
        AccessEntry {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_462_048),
            method: "GET",
            path: "/v1/models",
            authority: "",
            protocol: "HTTP/1.1",
            status: 404,
            grpc_status: None,
            duration: Duration::from_micros(120),
            first_byte: None,
            first_event: None,
            model: None,
            input_tokens: None,
            output_tokens: None,
            request_bytes: 0,
            response_bytes: 0,
            route: "",
            backend: "",
            endpoint: None,
            retries: 0,
            error: None,
            detail: None,
            client: "[::1]:40000".parse().unwrap(),
            client_address: "[::1]:40000",
            peer_identity: None,
            listener: "public",
            request_id: "r-1",
            fanout: None,
            trace_id: None,
            span_id: None,
        }
    }

    #[test]
    fn a_version_is_named_as_debug_names_it() {
        for version in [
            http::Version::HTTP_09,
            http::Version::HTTP_10,
            http::Version::HTTP_11,
            http::Version::HTTP_2,
            http::Version::HTTP_3,
        ] {
            assert_eq!(version_name(version), format!("{version:?}"));
        }
    }

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        for address in [
            "0.0.0.0:0",
            "10.0.3.7:8000",
            "255.255.255.255:65535",
            "127.0.0.1:9",
            "[::1]:8000",
            "[fe80::1%2]:80",
            "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535",
        ] {
            let parsed: SocketAddr = address.parse().unwrap();
            assert_eq!(AddressText::new(parsed).as_str(), parsed.to_string());
        }
        let longest = SocketAddr::V6(std::net::SocketAddrV6::new(
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
                .parse()
                .unwrap(),
            65535,
            0,
            u32::MAX,
        ));
        assert_eq!(AddressText::new(longest).as_str(), longest.to_string());
    }

    #[test]
    fn milliseconds_are_kept_to_the_microsecond() {
        assert_eq!(millis(Duration::from_nanos(5_312_407_499)), 5312.407);
        assert_eq!(millis(Duration::from_nanos(1_500)), 0.002);
        assert_eq!(millis(Duration::from_nanos(124_500)), 0.125);
        assert_eq!(micros(Duration::new(3, 999_999_500)), 4_000_000);
        assert_eq!(millis(Duration::ZERO), 0.0);
    }
}

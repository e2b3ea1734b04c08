//! `hot_path::check_host` (proxy/src/core/authority.rs) on a request built
//! from text: the first line is the HTTP version (`2`, `1.0`, anything
//! else is 1.1), the second the request target (empty for `/`; a target
//! the `http` crate refuses is replaced by `/`), each further line one
//! `Host` header (any bytes but a newline; values `http` refuses are left
//! out).
//!
//! Asserted:
//! - two `Host` lines are always `Duplicate`, and `Duplicate` means two;
//! - `Missing` only for an HTTP/1.1 request without `Host`; `Userinfo`
//!   only for an authority with `@`; `Mismatch` only for HTTP/2 with a
//!   `Host` that differs from `:authority` (ignoring case);
//! - `Invalid(text)` names the authority or the `Host` given, and it is
//!   not `host[:port]` by the grammar below;
//! - whatever is accepted (the authority, a non-empty `Host`) is
//!   `host[:port]` as the function's docs give it (RFC 9110 §7.2): a
//!   name of unreserved and sub-delim characters (no `%`: no hop reads
//!   percent-encoded names alike) or a bracketed IPv6 address, then an
//!   optional port of at most five digits; so it never holds `@`, `/`,
//!   `\`, `?`, `#`, `%`, whitespace, control or non-ASCII bytes, nor a
//!   second `:` outside brackets;
//! - the accepted verdict is the grammar's: a lone `Host` the grammar
//!   accepts passes on HTTP/1.1;
//! - an accepted non-empty `Host` parses as an `http` `Authority` of the
//!   same text, so that `adapt_request` keeps it for an HTTP/2 upstream
//!   instead of falling back to the endpoint's address;
//! - HTTP/1.1 requests that pass have a `Host`, HTTP/2 ones that have
//!   both agree with their `:authority`.

#![no_main]

use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Uri, Version};
use infermesh_proxy::hot_path::{HostError, check_host};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let version = match lines.next().unwrap_or_default() {
        b"2" => Version::HTTP_2,
        b"1.0" => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let uri = lines
        .next()
        .filter(|t| !t.is_empty())
        .and_then(|t| Uri::try_from(t).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let hosts: Vec<HeaderValue> = lines
        .filter_map(|h| HeaderValue::from_bytes(h).ok())
        .collect();
    let mut builder = Request::builder().version(version).uri(uri);
    for host in &hosts {
        builder = builder.header(HOST, host.clone());
    }
    let request = builder.body(()).expect("a request of parsed parts");
    let result = check_host(&request);

    let authority = request.uri().authority().map(Authority::as_str);
    let host = hosts.first().map(HeaderValue::as_bytes);
    let text = format!("{version:?} {:?} {hosts:?}: {result:?}", request.uri());

    if hosts.len() > 1 {
        assert_eq!(result, Err(HostError::Duplicate), "{text}");
    }
    match &result {
        Ok(()) => {
            assert!(hosts.len() <= 1, "{text}");
            if let Some(authority) = authority {
                assert!(host_port(authority.as_bytes()), "{text}: the authority");
            }
            if let Some(host) = host.filter(|h| !h.is_empty()) {
                assert!(host_port(host), "{text}: the host");
                let parsed = Authority::try_from(host)
                    .unwrap_or_else(|e| panic!("{text}: not an http Authority: {e}"));
                assert_eq!(parsed.as_str().as_bytes(), host, "{text}");
            }
            if version == Version::HTTP_11 {
                assert!(host.is_some(), "{text}: no Host");
            }
            if let (Version::HTTP_2, Some(a), Some(h)) = (version, authority, host) {
                assert!(a.as_bytes().eq_ignore_ascii_case(h), "{text}");
            }
        }
        Err(HostError::Duplicate) => assert!(hosts.len() > 1, "{text}"),
        Err(HostError::Missing) => {
            assert!(version == Version::HTTP_11 && host.is_none(), "{text}")
        }
        Err(HostError::Userinfo) => {
            assert!(authority.is_some_and(|a| a.contains('@')), "{text}")
        }
        Err(HostError::Invalid(named)) => {
            let from_host = host.map(|h| String::from_utf8_lossy(h).into_owned());
            assert!(
                authority == Some(named.as_str()) || from_host.as_ref() == Some(named),
                "{text}: names neither"
            );
            let bytes = authority
                .filter(|a| *a == named)
                .map(str::as_bytes)
                .or(host)
                .unwrap();
            assert!(!host_port(bytes), "{text}: {named:?} is host[:port]");
        }
        Err(HostError::Mismatch {
            host: named_host,
            authority: named_authority,
        }) => {
            assert_eq!(version, Version::HTTP_2, "{text}");
            assert_eq!(Some(named_authority.as_str()), authority, "{text}");
            assert!(
                !named_host
                    .as_bytes()
                    .eq_ignore_ascii_case(named_authority.as_bytes()),
                "{text}"
            );
        }
    }
    // The grammar decides a lone Host on an origin-form HTTP/1.1 request.
    if version == Version::HTTP_11 && authority.is_none() && hosts.len() == 1 {
        let host = host.unwrap();
        assert_eq!(
            result.is_ok(),
            host.is_empty() || host_port(host),
            "{text}: the verdict is not the grammar's"
        );
    }
});

/// `uri-host [ ":" port ]` as the function's docs give it, written
/// independently: a name, or a bracketed literal, then a port.
fn host_port(value: &[u8]) -> bool {
    if value
        .iter()
        .any(|b| !b.is_ascii_graphic() || b"@/\\?#".contains(b))
    {
        return false;
    }
    let (host, rest) = match value.strip_prefix(b"[") {
        Some(literal) => {
            let Some(end) = literal.iter().position(|b| *b == b']') else {
                return false;
            };
            let inner = std::str::from_utf8(&literal[..end]).ok();
            if inner
                .and_then(|i| i.parse::<std::net::Ipv6Addr>().ok())
                .is_none()
            {
                return false;
            }
            (None, &literal[end + 1..])
        }
        None => {
            let end = value.iter().position(|b| *b == b':').unwrap_or(value.len());
            (Some(&value[..end]), &value[end..])
        }
    };
    if let Some(name) = host {
        let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(b);
        if name.is_empty() || !name.iter().all(allowed) {
            return false;
        }
    }
    match rest {
        [] => true,
        [b':', port @ ..] => port.len() <= 5 && port.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

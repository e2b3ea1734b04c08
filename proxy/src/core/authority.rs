//! The host a request names, checked before anything routes on it: one
//! unambiguous authority, or a 400, as RFC 9112 §3.2 and RFC 9113 §8.3.1
//! require. A request with two `Host` lines, an HTTP/1.1 request without
//! one, userinfo in its authority, a `Host` that is not `host[:port]`, or
//! an HTTP/2 request whose `Host` names another host than `:authority`
//! could be routed by one reading and served by another.

use http::header::HOST;
use http::{Request, Version};

/// Why a request's authority is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// An HTTP/1.1 request without `Host`.
    #[error("an HTTP/1.1 request must have a Host header")]
    Missing,
    /// More than one `Host` line.
    #[error("the request has more than one Host header")]
    Duplicate,
    /// A `Host` (or authority) that is not `host[:port]`.
    #[error("the Host header or authority {0:?} is not host[:port]")]
    Invalid(String),
    /// Userinfo (`user@`) in the request's authority, which is never
    /// forwarded.
    #[error("the request's authority must not carry userinfo (user@host)")]
    Userinfo,
    /// An HTTP/2 request whose `Host` names another host than its
    /// `:authority`.
    #[error("the Host header {host:?} names another host than the :authority {authority:?}")]
    Mismatch {
        /// The `Host` header.
        host: String,
        /// The `:authority`.
        authority: String,
    },
}

/// Checks the authority of `request`: its URI's (HTTP/2 `:authority`, or
/// an absolute-form HTTP/1.1 target) and its `Host` header.
pub fn check<B>(request: &Request<B>) -> Result<(), HostError> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Duplicate);
    }
    let authority = request.uri().authority().map(|a| a.as_str());
    if let Some(authority) = authority {
        if authority.contains('@') {
            return Err(HostError::Userinfo);
        }
        if !is_host_port(authority.as_bytes()) {
            return Err(HostError::Invalid(authority.to_owned()));
        }
    }
    match host {
        None if request.version() == Version::HTTP_11 => Err(HostError::Missing),
        None => Ok(()),
        Some(value) => {
            let bytes = value.as_bytes();
            // An empty Host is what a client sends for a target without
            // an authority (RFC 9112 §3.2).
            if !bytes.is_empty() && !is_host_port(bytes) {
                return Err(HostError::Invalid(
                    String::from_utf8_lossy(bytes).into_owned(),
                ));
            }
            match authority {
                Some(authority)
                    if request.version() == Version::HTTP_2
                        && !authority.as_bytes().eq_ignore_ascii_case(bytes) =>
                {
                    Err(HostError::Mismatch {
                        host: String::from_utf8_lossy(bytes).into_owned(),
                        authority: authority.to_owned(),
                    })
                }
                _ => Ok(()),
            }
        }
    }
}

/// Whether `value` is `uri-host [ ":" port ]` (RFC 9110 §7.2): a name of
/// unreserved and sub-delim characters, an IPv4 address, or an IPv6
/// address in brackets; the port, if any, digits. Percent-encoded names,
/// which RFC 3986 allows but no HTTP stack we forward to reads alike
/// (`http`'s `Authority` refuses them), are refused too: every hop must
/// read the host the same way.
fn is_host_port(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(end) = value.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = std::str::from_utf8(&value[1..end]).ok();
        if literal
            .and_then(|l| l.parse::<std::net::Ipv6Addr>().ok())
            .is_none()
        {
            return false;
        }
        match &value[end + 1..] {
            [] => (&value[..0], None),
            [b':', port @ ..] => (&value[..0], Some(port)),
            _ => return false,
        }
    } else {
        match value.iter().rposition(|b| *b == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        }
    };
    let host_ok = host.iter().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    });
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    host_ok && port_ok && !(value.first() != Some(&b'[') && host.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().version(version).uri(uri);
        for host in hosts {
            builder = builder.header(HOST, *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn one_plain_host_passes() {
        for (version, uri, hosts) in [
            (Version::HTTP_11, "/v1/models", &["models.example.com"][..]),
            (Version::HTTP_11, "/", &["10.0.0.1:8080"]),
            (Version::HTTP_11, "/", &["[::1]:8080"]),
            (Version::HTTP_11, "/", &["[fe80::1]"]),
            (
                Version::HTTP_11,
                "http://models.example.com/v1",
                &["models.example.com"],
            ),
            (Version::HTTP_11, "/", &[""]),
            (Version::HTTP_10, "/", &[]),
            (Version::HTTP_2, "http://models.example.com/v1", &[]),
            (
                Version::HTTP_2,
                "http://models.example.com/v1",
                &["MODELS.example.com"],
            ),
        ] {
            assert_eq!(
                check(&request(version, uri, hosts)),
                Ok(()),
                "{uri} {hosts:?}"
            );
        }
    }

    #[test]
    fn ambiguous_hosts_are_refused() {
        let cases: [(Version, &str, &[&str], HostError); 8] = [
            (Version::HTTP_11, "/", &[], HostError::Missing),
            (
                Version::HTTP_11,
                "/",
                &["a.example", "b.example"],
                HostError::Duplicate,
            ),
            (
                Version::HTTP_11,
                "http://user@a.example/",
                &["a.example"],
                HostError::Userinfo,
            ),
            (
                Version::HTTP_2,
                "http://user:pw@a.example/",
                &[],
                HostError::Userinfo,
            ),
            (
                Version::HTTP_11,
                "/",
                &["a.example/admin"],
                HostError::Invalid("a.example/admin".into()),
            ),
            (
                Version::HTTP_11,
                "/",
                &["user@a.example"],
                HostError::Invalid("user@a.example".into()),
            ),
            (
                Version::HTTP_11,
                "/",
                &["a.example:80x"],
                HostError::Invalid("a.example:80x".into()),
            ),
            (
                Version::HTTP_2,
                "http://a.example/",
                &["b.example"],
                HostError::Mismatch {
                    host: "b.example".into(),
                    authority: "a.example".into(),
                },
            ),
        ];
        for (version, uri, hosts, expected) in cases {
            assert_eq!(
                check(&request(version, uri, hosts)),
                Err(expected),
                "{uri} {hosts:?}"
            );
        }
    }

    #[test]
    fn host_grammar() {
        for good in ["a", "a.b-c_d~", "1.2.3.4:65535", "[::]", "[::1]:80", "h:"] {
            assert!(is_host_port(good.as_bytes()), "{good}");
        }
        for bad in [
            ":80",
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "a%20b",
            "[::1",
            "[::1]x",
            "[zz]",
            "[1:2:3:4:5:6:7:8:9:a]",
            "a:123456",
            "a:-1",
            "a@b",
        ] {
            assert!(!is_host_port(bad.as_bytes()), "{bad}");
        }
    }
}

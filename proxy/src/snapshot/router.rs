//! Route matching: for one listener, find the rule that serves a request
//! from its host, path, model, method and headers.
//!
//! Rules are sorted once, when a config is applied, by Gateway API
//! precedence (most specific host, exact path, longest prefix, regex path,
//! any path, then model, method, most header matches, and the rule written
//! first), so matching is a single pass that stops at the first hit.

use std::cmp::Reverse;
use std::sync::Arc;

use http::header::{HOST, HeaderName, HeaderValue};
use http::{Method, Request};
use infermesh_api::{HeaderMatch, PathMatch, RouteMatch, full_match_regex};
use regex::Regex;

/// The rules of one listener, in precedence order, each leading to a `T`.
#[derive(Debug)]
pub struct Router<T> {
    entries: Vec<Entry<T>>,
}

#[derive(Debug)]
struct Entry<T> {
    host: HostMatch,
    path: PathMatcher,
    model: Option<Arc<str>>,
    method: Option<Method>,
    headers: Vec<HeaderMatcher>,
    target: T,
}

#[derive(Debug)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` is stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Segment-wise prefix, without a trailing `/` (empty for `/`).
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum HeaderMatcher {
    Exact(HeaderName, HeaderValue),
    Regex(HeaderName, Regex),
    Present(HeaderName, bool),
}

/// How specific an entry is; larger wins.
type Rank = ((u8, usize), (u8, usize), bool, bool, usize);

/// Collects rules, then sorts them into a [`Router`].
pub struct RouterBuilder<T> {
    entries: Vec<(Rank, Entry<T>)>,
}

/// A rule could not be compiled. Validated configs never produce one; it
/// guards configs built by hand.
#[derive(Debug, thiserror::Error)]
#[error("invalid route match: {0}")]
pub struct InvalidMatch(String);

impl<T: Clone> RouterBuilder<T> {
    /// Adds a rule of a route that serves `hostnames` (empty: any host),
    /// matching any of `matches` (empty: every request), leading to `target`.
    pub fn add(
        &mut self,
        hostnames: &[String],
        matches: &[RouteMatch],
        target: T,
    ) -> Result<(), InvalidMatch> {
        let any_host = [None];
        let hosts: Vec<Option<&String>> = if hostnames.is_empty() {
            any_host.to_vec()
        } else {
            hostnames.iter().map(Some).collect()
        };
        let every_request = [RouteMatch::default()];
        let matches = if matches.is_empty() {
            &every_request[..]
        } else {
            matches
        };
        for host in hosts {
            for m in matches {
                let (host, host_rank) = match host.map(|h| h.trim_end_matches('.')) {
                    None => (HostMatch::Any, (0, 0)),
                    Some(h) => match h.strip_prefix('*') {
                        Some(suffix) => (HostMatch::Suffix(suffix.to_owned()), (1, suffix.len())),
                        None => (HostMatch::Exact(h.to_owned()), (2, h.len())),
                    },
                };
                // Exact paths, then longer prefixes, then regexes, then
                // rules that match every path.
                let (path, path_rank) = match &m.path {
                    None => (PathMatcher::Prefix(String::new()), (1, 0)),
                    Some(PathMatch::Exact(p)) => (PathMatcher::Exact(p.clone()), (4, p.len())),
                    Some(PathMatch::Prefix(p)) => {
                        let trimmed = p.trim_end_matches('/');
                        let rank = if trimmed.is_empty() {
                            (1, 0)
                        } else {
                            (3, trimmed.len())
                        };
                        (PathMatcher::Prefix(trimmed.to_owned()), rank)
                    }
                    Some(PathMatch::Regex(r)) => {
                        let regex = full_match_regex(r).map_err(|e| InvalidMatch(e.to_string()))?;
                        (PathMatcher::Regex(regex), (2, r.len()))
                    }
                };
                let method = m
                    .method
                    .as_deref()
                    .map(|s| {
                        Method::from_bytes(s.as_bytes()).map_err(|e| InvalidMatch(e.to_string()))
                    })
                    .transpose()?;
                let headers = m
                    .headers
                    .iter()
                    .map(header_matcher)
                    .collect::<Result<Vec<_>, _>>()?;
                let rank = (
                    host_rank,
                    path_rank,
                    m.model.is_some(),
                    method.is_some(),
                    headers.len(),
                );
                self.entries.push((
                    rank,
                    Entry {
                        host,
                        path,
                        model: m.model.as_deref().map(Arc::from),
                        method,
                        headers,
                        target: target.clone(),
                    },
                ));
            }
        }
        Ok(())
    }

    /// Sorts the rules by precedence; among equals, the one added first wins.
    pub fn build(mut self) -> Router<T> {
        self.entries.sort_by_key(|(rank, _)| Reverse(*rank));
        Router {
            entries: self.entries.into_iter().map(|(_, e)| e).collect(),
        }
    }
}

fn header_matcher(h: &HeaderMatch) -> Result<HeaderMatcher, InvalidMatch> {
    let name =
        HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| InvalidMatch(e.to_string()))?;
    Ok(match (&h.exact, &h.regex, h.present) {
        (Some(v), None, None) => HeaderMatcher::Exact(
            name,
            HeaderValue::from_str(v).map_err(|e| InvalidMatch(e.to_string()))?,
        ),
        (None, Some(r), None) => HeaderMatcher::Regex(
            name,
            full_match_regex(r).map_err(|e| InvalidMatch(e.to_string()))?,
        ),
        (None, None, Some(p)) => HeaderMatcher::Present(name, p),
        _ => {
            return Err(InvalidMatch(format!(
                "header {}: give one of exact, regex, present",
                h.name
            )));
        }
    })
}

impl<T> Router<T> {
    /// A router to fill with [`RouterBuilder::add`].
    pub fn builder() -> RouterBuilder<T> {
        RouterBuilder {
            entries: Vec::new(),
        }
    }

    /// Whether a rule matches on the model a request names: its body may
    /// have to be read before routing.
    pub fn matches_models(&self) -> bool {
        self.entries.iter().any(|e| e.model.is_some())
    }

    /// The target of the most specific rule matching `request`.
    pub fn route<B>(&self, request: &Request<B>) -> Option<&T> {
        self.route_with_model(request).map(|(target, _)| target)
    }

    /// The target of the most specific rule matching `request`, and the
    /// model of the match that matched, if it names one.
    pub(crate) fn route_with_model<B>(
        &self,
        request: &Request<B>,
    ) -> Option<(&T, Option<&Arc<str>>)> {
        let host = request_host(request);
        let path = request.uri().path();
        self.entries
            .iter()
            .find(|e| e.matches(host, path, request))
            .map(|e| (&e.target, e.model.as_ref()))
    }
}

impl<T> Entry<T> {
    fn matches<B>(&self, host: Option<&str>, path: &str, request: &Request<B>) -> bool {
        let host_ok = match (&self.host, host) {
            (HostMatch::Any, _) => true,
            (HostMatch::Exact(want), Some(h)) => want.eq_ignore_ascii_case(h),
            (HostMatch::Suffix(suffix), Some(h)) => {
                h.len() > suffix.len()
                    && h.is_char_boundary(h.len() - suffix.len())
                    && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            (_, None) => false,
        };
        host_ok
            && self.path.matches(path)
            && self
                .model
                .as_deref()
                .is_none_or(|m| crate::core::model::of(request) == Some(m))
            && self.method.as_ref().is_none_or(|m| m == request.method())
            && self.headers.iter().all(|h| h.matches(request.headers()))
    }
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(p) => p == path,
            PathMatcher::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatcher::Regex(r) => r.is_match(path),
        }
    }
}

impl HeaderMatcher {
    fn matches(&self, headers: &http::HeaderMap) -> bool {
        match self {
            HeaderMatcher::Exact(name, want) => headers.get_all(name).iter().any(|v| v == want),
            HeaderMatcher::Regex(name, regex) => headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| regex.is_match(v))),
            HeaderMatcher::Present(name, present) => headers.contains_key(name) == *present,
        }
    }
}

/// The host a request is for, from `:authority` (HTTP/2) or `Host`
/// (HTTP/1.1), without port or trailing dot.
pub(crate) fn request_host<B>(request: &Request<B>) -> Option<&str> {
    let raw = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => request.headers().get(HOST)?.to_str().ok()?,
    };
    let raw = raw.rsplit_once('@').map_or(raw, |(_, host)| host);
    let host = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |end| &raw[..=end])
    } else {
        raw.split(':').next().unwrap_or(raw)
    };
    Some(host.strip_suffix('.').unwrap_or(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: Option<PathMatch>, method: Option<&str>, headers: Vec<HeaderMatch>) -> RouteMatch {
        RouteMatch {
            path,
            method: method.map(str::to_owned),
            headers,
            model: None,
        }
    }

    fn req(method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn router() -> Router<&'static str> {
        let mut b = Router::builder();
        b.add(&[], &[], "fallback").unwrap();
        b.add(
            &[],
            &[m(Some(PathMatch::Prefix("/v1/".into())), None, vec![])],
            "v1",
        )
        .unwrap();
        b.add(
            &[],
            &[m(Some(PathMatch::Prefix("/v1/chat".into())), None, vec![])],
            "chat",
        )
        .unwrap();
        b.add(
            &[],
            &[m(
                Some(PathMatch::Exact("/v1/chat/completions".into())),
                None,
                vec![],
            )],
            "exact",
        )
        .unwrap();
        b.add(
            &[],
            &[m(
                Some(PathMatch::Prefix("/v1/chat".into())),
                Some("POST"),
                vec![],
            )],
            "chat-post",
        )
        .unwrap();
        b.add(
            &[],
            &[m(
                Some(PathMatch::Prefix("/v1/chat".into())),
                Some("POST"),
                vec![HeaderMatch {
                    name: "x-tenant".into(),
                    exact: Some("blue".into()),
                    regex: None,
                    present: None,
                }],
            )],
            "chat-post-blue",
        )
        .unwrap();
        b.add(&["*.example.com".into()], &[], "wild").unwrap();
        b.add(&["api.example.com".into()], &[], "api").unwrap();
        b.add(
            &[],
            &[m(
                Some(PathMatch::Regex("/v2/models/[^/]+/infer".into())),
                None,
                vec![],
            )],
            "kserve",
        )
        .unwrap();
        b.build()
    }

    #[test]
    fn gateway_api_precedence() {
        let r = router();
        let route = |method, host, path, headers: &[(&str, &str)]| {
            *r.route(&req(method, host, path, headers)).unwrap()
        };
        assert_eq!(route("GET", "x", "/", &[]), "fallback");
        assert_eq!(
            route("GET", "x", "/v1", &[]),
            "v1",
            "prefix /v1/ matches /v1 (trailing slash ignored)"
        );
        assert_eq!(
            route("GET", "x", "/v10", &[]),
            "fallback",
            "prefixes match whole segments"
        );
        assert_eq!(route("GET", "x", "/v1/models", &[]), "v1");
        assert_eq!(
            route("GET", "x", "/v1/chat/x", &[]),
            "chat",
            "longest prefix wins"
        );
        assert_eq!(
            route("POST", "x", "/v1/chat/x", &[]),
            "chat-post",
            "method match beats none"
        );
        assert_eq!(
            route("POST", "x", "/v1/chat/x", &[("x-tenant", "blue")]),
            "chat-post-blue"
        );
        assert_eq!(
            route("POST", "x", "/v1/chat/x", &[("x-tenant", "red")]),
            "chat-post"
        );
        assert_eq!(
            route("POST", "x", "/v1/chat/completions", &[]),
            "exact",
            "exact path beats prefix"
        );
        assert_eq!(route("GET", "x", "/v2/models/llama/infer", &[]), "kserve");
        assert_eq!(
            route("GET", "x", "/v2/models/llama/infer/x", &[]),
            "fallback",
            "regex matches the whole path"
        );
    }

    #[test]
    fn hosts_outrank_paths() {
        let r = router();
        let route = |host, path| *r.route(&req("GET", host, path, &[])).unwrap();
        assert_eq!(
            route("api.example.com", "/v1/chat"),
            "api",
            "exact host wins first"
        );
        assert_eq!(
            route("API.Example.com:8443", "/"),
            "api",
            "case and port are ignored"
        );
        assert_eq!(route("a.b.example.com", "/v1/chat"), "wild");
        assert_eq!(
            route("example.com", "/"),
            "fallback",
            "a wildcard needs a sub-domain"
        );
        assert_eq!(
            route("api.example.com.", "/"),
            "api",
            "a fully qualified host matches"
        );
        let mut dotted = Router::builder();
        dotted
            .add(&["api.example.com.".into()], &[], "dotted")
            .unwrap();
        let dotted = dotted.build();
        let plain = req("GET", "api.example.com", "/", &[]);
        assert_eq!(
            dotted.route(&plain),
            Some(&"dotted"),
            "so does a configured one"
        );
    }

    #[test]
    fn host_from_authority_or_header() {
        let h2 = Request::builder()
            .uri("http://Models.local:8080/x")
            .body(())
            .unwrap();
        assert_eq!(request_host(&h2), Some("Models.local"));
        let v6 = req("GET", "[::1]:80", "/", &[]);
        assert_eq!(request_host(&v6), Some("[::1]"));
        let none = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(request_host(&none), None);
    }

    #[test]
    fn header_presence_and_regex() {
        let mut b = Router::builder();
        let present = |name: &str, p| HeaderMatch {
            name: name.into(),
            exact: None,
            regex: None,
            present: Some(p),
        };
        b.add(
            &[],
            &[m(None, None, vec![present("x-debug", true)])],
            "debug",
        )
        .unwrap();
        b.add(
            &[],
            &[m(
                None,
                None,
                vec![HeaderMatch {
                    name: "x-model".into(),
                    exact: None,
                    regex: Some("llama-.*".into()),
                    present: None,
                }],
            )],
            "llama",
        )
        .unwrap();
        let r = b.build();
        assert_eq!(
            r.route(&req("GET", "h", "/", &[("x-debug", "")])),
            Some(&"debug")
        );
        assert_eq!(
            r.route(&req("GET", "h", "/", &[("x-model", "llama-3")])),
            Some(&"llama")
        );
        assert_eq!(
            r.route(&req("GET", "h", "/", &[("x-model", "my-llama-3")])),
            None
        );
        assert_eq!(r.route(&req("GET", "h", "/", &[])), None);
    }

    #[test]
    fn the_model_of_the_match_that_matched_is_told() {
        let mut b = Router::builder();
        let model = |name: &str| RouteMatch {
            model: Some(name.into()),
            ..RouteMatch::default()
        };
        b.add(&[], &[model("llama"), model("mistral")], "models")
            .unwrap();
        b.add(&[], &[], "any").unwrap();
        let r = b.build();
        let kserve = |name: &str| req("POST", "h", &format!("/v2/models/{name}/infer"), &[]);
        let (target, matched) = r.route_with_model(&kserve("mistral")).unwrap();
        assert_eq!(
            (*target, matched.map(|m| &**m)),
            ("models", Some("mistral"))
        );
        let (target, matched) = r.route_with_model(&kserve("qwen")).unwrap();
        assert_eq!((*target, matched), ("any", None));
    }
}

//! `Route`: which requests go where. A route attaches to listeners, may be
//! limited to host names, and holds rules; each rule matches requests and
//! forwards them to weighted backends within its timeouts.
//!
//! Precedence follows the Kubernetes Gateway API, so a request's route does
//! not depend on the order of files or documents: see [`RouteMatch`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::check::Checker;
use crate::duration::Duration;
use crate::fanout::Fanout;
use crate::path::FieldPath;
use crate::resilience::{HedgePolicy, Mirror, RateLimit, RetryPolicy};

/// The spec of a `Route` resource.
///
/// ```yaml
/// kind: Route
/// metadata: { name: chat }
/// spec:
///   hostnames: [models.example.com]
///   rules:
///     - matches:
///         - path: { prefix: /v1/chat }
///           method: POST
///       backends:
///         - { name: llama, weight: 90 }
///         - { name: mistral, weight: 10 }
///       timeouts: { responseHeaders: 120s }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Names of the listeners this route serves. Empty: every listener.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// In a mesh (the control plane's config): what the route attaches to,
    /// as the Gateway API's `parentRefs`. A `Backend` parent is GAMMA's
    /// service: the route applies to every caller's requests for that
    /// backend (by its names, `NAME.NAMESPACE` and
    /// `NAME.NAMESPACE.svc.cluster.local`); a `Listener` parent is the
    /// same as naming it in `listeners`. A proxy's own file uses
    /// `listeners` and `hostnames` instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentRef>,
    /// Host names (from `Host` or `:authority`, port ignored) this route
    /// serves: exact (`api.example.com`) or a leading wildcard
    /// (`*.example.com`, which matches any sub-domain but not
    /// `example.com` itself). Empty: any host.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The rules, at least one.
    pub rules: Vec<RouteRule>,
}

/// One rule of a route: the requests it matches and what happens to them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// A request matches the rule when it matches any of these. Empty:
    /// every request (the same as one match on path prefix `/`).
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Backends to forward to, one picked per request by weight. A rule
    /// has either `backends` or a `fanout`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendRef>,
    /// Send each request to several backends at once and combine their
    /// answers, instead of forwarding it to one of `backends`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<Fanout>,
    /// Time limits for requests on this rule.
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// When failed requests are tried again.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// A copy of some requests to a shadow backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// A local limit on the rule's request rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Hedged requests against slow endpoints; off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgePolicy>,
}

/// Conditions on a request; all given conditions must hold.
///
/// When several rules match a request, the most specific wins, as in the
/// Gateway API: the most specific host name (exact, then the longest
/// wildcard, then any host), then an exact path, then the longest path
/// prefix, then a regex path, then rules for every path (prefix `/` or no
/// path), then a model match, then a method match, then the most header
/// matches. A remaining tie goes to the rule written first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// The request path (without the query) must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The request method must be this one (case-sensitive, e.g. `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Every header condition must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// The model the request names must be this one: the `{name}` of a
    /// KServe v2 / Open Inference Protocol path (`/v2/models/{name}/...`),
    /// else the `model` field of a JSON body (OpenAI-compatible APIs),
    /// read from at most the body's first 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// How a request path is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    /// The path equals this.
    Exact(String),
    /// The path starts with these whole segments: `/v1` matches `/v1` and
    /// `/v1/models` but not `/v10` (a trailing `/` is ignored).
    Prefix(String),
    /// The whole path matches this regular expression (Rust `regex` syntax).
    Regex(String),
}

/// A condition on one request header. Exactly one of `exact`, `regex` and
/// `present` is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub name: String,
    /// The header's value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The header's whole value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true`: the header is present; `false`: it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A weighted reference to a `Backend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    /// The backend's `metadata.name`.
    pub name: String,
    /// Relative share of the rule's requests. 0 sends none, which lets a
    /// canary be switched off without removing it.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// What a route attaches to.
///
/// ```yaml
/// parentRefs: [{ kind: Backend, name: llama }]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// `Backend` (a service: the route applies to its callers) or
    /// `Listener`.
    pub kind: ParentKind,
    /// Its name, searched in the route's namespace first.
    pub name: String,
}

/// The kinds a route may attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ParentKind {
    /// A backend: GAMMA's service.
    Backend,
    /// A listener: a gateway's, or one a sidecar runs.
    Listener,
}

impl RouteSpec {
    /// The host names the route serves for the `Backend` parent `backend`
    /// (a qualified name): the name callers use, and for a namespaced
    /// backend its Kubernetes Service names.
    pub fn service_hostnames(backend: &str, namespace: Option<&str>) -> Vec<String> {
        match namespace {
            Some(_) => vec![
                backend.to_owned(),
                format!("{backend}.svc"),
                format!("{backend}.svc.cluster.local"),
            ],
            None => vec![backend.to_owned()],
        }
    }
}

/// Time limits for a request. `0s` disables a limit.
///
/// The defaults never cut off a long generation: a model may think for
/// minutes before its first byte, and a streamed answer may run for as long
/// as tokens keep coming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteTimeouts {
    /// From forwarding the request until the backend's response headers
    /// arrive (time to first byte). Past it: 504 `response_headers_timeout`.
    /// On a fan-out rule it is the default deadline of the fan-out instead
    /// ([`RouteRule::fanout_deadline`]).
    pub response_headers: Duration,
    /// From forwarding the request until the response body's first bytes:
    /// the time to first token of a streamed generation, for servers that
    /// send their headers at once. While it runs the response headers are
    /// held back, so that past it the client gets a clean 504
    /// `first_event_timeout`. Off by default. On a fan-out rule it is the
    /// deadline when shorter ([`RouteRule::fanout_deadline`]).
    pub first_event: Duration,
    /// Longest quiet time between two body frames, in either direction. Past
    /// it the stream is cut (504 `idle_timeout` if no response was sent yet).
    pub idle: Duration,
    /// The whole exchange, from the request's arrival to the response's
    /// last byte. Off by default; past it: 504 `request_timeout`, or the
    /// stream is cut.
    pub total: Duration,
}

impl RouteTimeouts {
    /// Default for [`RouteTimeouts::response_headers`].
    pub const DEFAULT_RESPONSE_HEADERS: Duration = Duration::from_secs(300);
    /// Default for [`RouteTimeouts::idle`]: Envoy's stream idle timeout.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
    /// Default for [`RouteTimeouts::total`]: off.
    pub const DEFAULT_TOTAL: Duration = Duration::ZERO;
}

impl Default for RouteTimeouts {
    fn default() -> Self {
        RouteTimeouts {
            response_headers: Self::DEFAULT_RESPONSE_HEADERS,
            first_event: Duration::ZERO,
            idle: Self::DEFAULT_IDLE,
            total: Self::DEFAULT_TOTAL,
        }
    }
}

impl crate::Spec for RouteSpec {
    fn check(&self, checker: &mut Checker<'_>) {
        let spec = FieldPath::root().key("spec");
        for (i, host) in self.hostnames.iter().enumerate() {
            if let Err(e) = check_hostname(host) {
                checker.error(spec.key("hostnames").index(i), e);
            }
        }
        if self.rules.is_empty() {
            checker.error(spec.key("rules"), "a route needs at least one rule");
        }
        if !self.parent_refs.is_empty() && !self.listeners.is_empty() {
            checker.error(
                spec.key("parentRefs"),
                "a route attaches by parentRefs or by listeners, not both: name its listeners as parentRefs of kind Listener",
            );
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.check(&spec.key("rules").index(i), checker);
        }
    }
}

impl RouteRule {
    fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        for (i, m) in self.matches.iter().enumerate() {
            m.check(&at.key("matches").index(i), checker);
        }
        let backends = at.key("backends");
        if let Some(fanout) = &self.fanout {
            self.check_fanout(fanout, at, checker);
        } else if self.backends.is_empty() {
            checker.error(
                backends.clone(),
                "a rule needs at least one backend (or a fanout)",
            );
        } else if self.backends.iter().all(|b| b.weight == 0) {
            checker.error(
                backends.clone(),
                "every backend has weight 0, so the rule could serve nothing; give one a weight",
            );
        }
        for (i, b) in self.backends.iter().enumerate() {
            if self.backends[..i]
                .iter()
                .any(|earlier| earlier.name == b.name)
            {
                checker.error(
                    backends.index(i).key("name"),
                    format!("backend {:?} is listed twice in this rule", b.name),
                );
            }
        }
        let timeouts = at.key("timeouts");
        let day = Duration::from_secs(86_400);
        for (field, value) in [
            ("responseHeaders", self.timeouts.response_headers),
            ("firstEvent", self.timeouts.first_event),
            ("idle", self.timeouts.idle),
            ("total", self.timeouts.total),
        ] {
            checker.duration_within(timeouts.key(field), value, Duration::ZERO, day);
        }
        self.retry.check(&at.key("retry"), checker);
        if let Some(mirror) = &self.mirror {
            mirror.check(&at.key("mirror"), checker);
        }
        if let Some(rate_limit) = &self.rate_limit {
            rate_limit.check(&at.key("rateLimit"), checker);
        }
        if let Some(hedge) = &self.hedge {
            hedge.check(&at.key("hedge"), checker);
        }
    }

    /// A fan-out replaces the rule's backends, and its branches are single
    /// attempts raced against a deadline: the settings that pick one
    /// backend or try it again do not apply.
    fn check_fanout(&self, fanout: &Fanout, at: &FieldPath, checker: &mut Checker<'_>) {
        fanout.check(&at.key("fanout"), checker);
        // The fan-out answers with what has arrived at its deadline; the
        // total limit must not cut it off first.
        if let (Some(deadline), Some(total)) =
            (self.fanout_deadline(), self.timeouts.total.non_zero())
            && deadline >= total
        {
            checker.error(
                at.key("fanout").key("deadline"),
                format!(
                    "the fan-out's deadline ({}: fanout.deadline or timeouts.firstEvent, whichever is shorter, else timeouts.responseHeaders) must end before timeouts.total ({}), which would cut it off without the answers that arrived",
                    Duration::from(deadline),
                    self.timeouts.total
                ),
            );
        }
        if !self.backends.is_empty() {
            checker.error(
                at.key("backends"),
                "a rule has either backends or a fanout, not both",
            );
        }
        let unsupported = [
            ("retry", self.retry != RetryPolicy::default()),
            ("mirror", self.mirror.is_some()),
            ("hedge", self.hedge.is_some()),
        ];
        for (field, given) in unsupported {
            if given {
                checker.error(
                    at.key(field),
                    format!("{field} does not apply to a fanout rule: each branch is sent once, within the fan-out's deadline; remove it"),
                );
            }
        }
    }

    /// The deadline of the rule's fan-out, if it has one: `fanout.deadline`
    /// or `timeouts.firstEvent` (for a race, the time to first event is
    /// the time to the decision), whichever is shorter, else
    /// `timeouts.responseHeaders`. On a fan-out rule these two timeouts
    /// apply only through this deadline, so that the fan-out can answer
    /// with what has arrived instead of being cut off.
    pub fn fanout_deadline(&self) -> Option<std::time::Duration> {
        let fanout = self.fanout.as_ref()?;
        [fanout.deadline, self.timeouts.first_event]
            .into_iter()
            .filter_map(Duration::non_zero)
            .min()
            .or(self.timeouts.response_headers.non_zero())
    }

    /// The name of every backend the rule sends to (forwards, mirrors,
    /// fan-out branches).
    pub fn backend_names(&self) -> Vec<&str> {
        self.backend_references(&FieldPath::root())
            .into_iter()
            .map(|(_, name)| name)
            .collect()
    }

    /// Every backend name the rule holds, to be resolved in place.
    pub(crate) fn backend_names_mut(&mut self) -> Vec<&mut String> {
        let mut names: Vec<&mut String> = self.backends.iter_mut().map(|b| &mut b.name).collect();
        if let Some(mirror) = &mut self.mirror {
            names.push(&mut mirror.backend);
        }
        if let Some(fanout) = &mut self.fanout {
            names.extend(fanout.branches.iter_mut().map(|b| &mut b.backend));
        }
        names
    }

    /// Every backend the rule names, each with where it is named.
    pub(crate) fn backend_references(&self, at: &FieldPath) -> Vec<(FieldPath, &str)> {
        let mut references: Vec<(FieldPath, &str)> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (at.key("backends").index(i).key("name"), b.name.as_str()))
            .collect();
        if let Some(mirror) = &self.mirror {
            references.push((at.key("mirror").key("backend"), mirror.backend.as_str()));
        }
        if let Some(fanout) = &self.fanout {
            for (i, branch) in fanout.branches.iter().enumerate() {
                references.push((
                    at.key("fanout").key("branches").index(i).key("backend"),
                    branch.backend.as_str(),
                ));
            }
        }
        references
    }
}

impl RouteMatch {
    fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        match &self.path {
            Some(PathMatch::Exact(p)) | Some(PathMatch::Prefix(p)) if !p.starts_with('/') => {
                let kind = if matches!(self.path, Some(PathMatch::Exact(_))) {
                    "exact"
                } else {
                    "prefix"
                };
                checker.error(
                    at.key("path").key(kind),
                    format!("path {p:?} must start with '/'"),
                );
            }
            Some(PathMatch::Regex(r)) => {
                if let Err(e) = full_match_regex(r) {
                    checker.error(at.key("path").key("regex"), regex_error(&e));
                }
            }
            _ => {}
        }
        if self.model.as_ref().is_some_and(|m| m.trim().is_empty()) {
            checker.error(at.key("model"), "give the model's name, e.g. llama-3-8b");
        }
        if let Some(method) = &self.method
            && (method.is_empty() || http::Method::from_bytes(method.as_bytes()).is_err())
        {
            checker.error(
                at.key("method"),
                format!("{method:?} is not a valid HTTP method"),
            );
        }
        for (i, h) in self.headers.iter().enumerate() {
            let at = at.key("headers").index(i);
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                checker.error(
                    at.key("name"),
                    format!("{:?} is not a valid header name", h.name),
                );
            }
            let given = [h.exact.is_some(), h.regex.is_some(), h.present.is_some()];
            if given.iter().filter(|g| **g).count() != 1 {
                checker.error(at.clone(), "give exactly one of exact, regex or present");
            }
            if let Some(r) = &h.regex
                && let Err(e) = full_match_regex(r)
            {
                checker.error(at.key("regex"), regex_error(&e));
            }
            if let Some(v) = &h.exact
                && http::HeaderValue::from_str(v).is_err()
            {
                checker.error(at.key("exact"), format!("{v:?} cannot be a header value"));
            }
        }
    }
}

/// Compiles a path or header regex the way matching uses it: it must match
/// the whole value. Validation and the router both compile through here,
/// so a pattern that passes `check` always compiles when applied.
pub fn full_match_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

/// The regex crate explains syntax errors over several lines, drawing a
/// caret under the pattern; a diagnostic is one line, so keep the reason.
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    let reason = text.lines().last().unwrap_or_default();
    format!("invalid regex: {}", reason.trim_start_matches("error: "))
}

fn check_hostname(host: &str) -> Result<(), String> {
    if host.contains(':') {
        return Err(format!("{host:?}: write host names without a port"));
    }
    if host.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("{host:?}: write host names in lower case"));
    }
    let bare = host.strip_prefix("*.").unwrap_or(host);
    if bare.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard is only allowed as a leading `*.`"
        ));
    }
    if !crate::backend::is_dns_name(bare) {
        return Err(format!("{host:?} is not a valid host name"));
    }
    Ok(())
}

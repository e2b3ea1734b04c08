//! SPIFFE IDs and trust domains: parsing, validation and the
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` workload form.
//!
//! Validation follows the SPIFFE ID specification: the scheme is exactly
//! `spiffe://`; the trust domain is 1–255 characters of lower-case letters,
//! digits, `.`, `-` and `_`; the path is empty or a sequence of `/segment`s,
//! each non-empty, not `.` or `..`, and made of letters, digits, `.`, `-` and
//! `_` (so no percent-encoding, query, fragment, port or user info); the whole
//! ID is at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

/// The scheme every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";
/// Longest SPIFFE ID the specification allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name the specification allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("the SPIFFE ID is empty; write it as `spiffe://<trust-domain>/<path>`")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error(
        "`{0}` is not a SPIFFE ID: it must start with `spiffe://` (lower case), as in `spiffe://cluster.local/ns/default/sa/web`"
    )]
    WrongScheme(String),
    /// Nothing between `spiffe://` and the path.
    #[error("`{0}` has no trust domain; write `spiffe://<trust-domain>/...`")]
    MissingTrustDomain(String),
    /// The trust domain holds a character outside `[a-z0-9._-]`.
    #[error(
        "the trust domain of `{id}` contains {ch:?}; trust domains may only use lower-case letters, digits, `.`, `-` and `_`"
    )]
    TrustDomainChar {
        /// The rejected input.
        id: String,
        /// The first offending character.
        ch: char,
    },
    /// The trust domain is longer than 255 bytes.
    #[error(
        "the trust domain of `{0}` is longer than {MAX_TRUST_DOMAIN_LEN} bytes; use a shorter name"
    )]
    TrustDomainTooLong(String),
    /// The authority holds `user@`.
    #[error("`{0}` carries user info (`@`); a SPIFFE ID has only a trust domain before the path")]
    UserInfo(String),
    /// The authority holds `:port`.
    #[error("`{0}` carries a port (`:`); a SPIFFE ID has only a trust domain before the path")]
    Port(String),
    /// The input holds `?query`.
    #[error("`{0}` carries a query (`?`); remove it, SPIFFE IDs have none")]
    Query(String),
    /// The input holds `#fragment`.
    #[error("`{0}` carries a fragment (`#`); remove it, SPIFFE IDs have none")]
    Fragment(String),
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("`{0}` has an empty path segment (`//` or a trailing `/`); remove the extra `/`")]
    EmptySegment(String),
    /// A path segment is `.` or `..`.
    #[error("`{0}` has a `.` or `..` path segment; write the path without relative segments")]
    DotSegment(String),
    /// A path segment holds a character outside `[A-Za-z0-9._-]`.
    #[error(
        "the path of `{id}` contains {ch:?}; path segments may only use letters, digits, `.`, `-` and `_` (no percent-encoding)"
    )]
    PathChar {
        /// The rejected input (or the segment, for [`SpiffeId::workload`]).
        id: String,
        /// The first offending character.
        ch: char,
    },
    /// The whole ID is longer than 2048 bytes.
    #[error(
        "the SPIFFE ID is {0} bytes long; the limit is {MAX_SPIFFE_ID_LEN}, use a shorter path"
    )]
    TooLong(usize),
}

/// A SPIFFE trust domain, such as `cluster.local`: the scope of one
/// certificate authority and its trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates `name` (without `spiffe://`) as a trust domain.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name, name)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name, such as `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<name>`, no path),
    /// which CA certificates carry as their URI SAN.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: String::new(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for TrustDomain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A validated SPIFFE ID: a trust domain and a path (possibly empty).
///
/// Workload identities in infermesh use the
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` form, built
/// with [`SpiffeId::workload`] and read with [`SpiffeId::namespace`] and
/// [`SpiffeId::service_account`]; other paths parse too and are kept as-is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID such as
    /// `spiffe://cluster.local/ns/default/sa/web`.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(id.len()));
        }
        let Some(rest) = id.strip_prefix(SCHEME) else {
            return Err(SpiffeIdError::WrongScheme(id.to_owned()));
        };
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment(id.to_owned()));
        }
        if rest.contains('?') {
            return Err(SpiffeIdError::Query(id.to_owned()));
        }
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain(id.to_owned()));
        }
        if authority.contains('@') {
            return Err(SpiffeIdError::UserInfo(id.to_owned()));
        }
        if authority.contains(':') {
            return Err(SpiffeIdError::Port(id.to_owned()));
        }
        validate_trust_domain(authority, id)?;
        if !path.is_empty() {
            // `path` starts with '/': skip the empty piece before it.
            for segment in path.split('/').skip(1) {
                validate_segment(segment, id)?;
            }
        }
        Ok(Self {
            trust_domain: TrustDomain(authority.to_owned()),
            path: path.to_owned(),
        })
    }

    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`,
    /// validating each part (a part may not contain `/`).
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let trust_domain = TrustDomain::new(trust_domain)?;
        Self::from_segments(trust_domain, &["ns", namespace, "sa", service_account])
    }

    /// Builds a SPIFFE ID from a trust domain and path segments (each without
    /// `/`), validating every segment.
    pub fn from_segments(
        trust_domain: TrustDomain,
        segments: &[&str],
    ) -> Result<Self, SpiffeIdError> {
        let mut path = String::new();
        for segment in segments {
            validate_segment(segment, segment)?;
            path.push('/');
            path.push_str(segment);
        }
        let len = SCHEME.len() + trust_domain.0.len() + path.len();
        if len > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(len));
        }
        Ok(Self { trust_domain, path })
    }

    /// The trust domain, such as `cluster.local`.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path: empty, or `/` followed by segments (`/ns/default/sa/web`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The namespace, when the path has the `/ns/<ns>/sa/<sa>` form.
    pub fn namespace(&self) -> Option<&str> {
        self.workload_parts().map(|(ns, _)| ns)
    }

    /// The service account, when the path has the `/ns/<ns>/sa/<sa>` form.
    pub fn service_account(&self) -> Option<&str> {
        self.workload_parts().map(|(_, sa)| sa)
    }

    /// Whether this ID belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        &self.trust_domain == trust_domain
    }

    fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path.strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

/// `context` is what error messages quote (the whole ID being parsed).
fn validate_trust_domain(name: &str, context: &str) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain(context.to_owned()));
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(context.to_owned()));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::TrustDomainChar {
            id: context.to_owned(),
            ch,
        });
    }
    Ok(())
}

fn validate_segment(segment: &str, context: &str) -> Result<(), SpiffeIdError> {
    if segment.is_empty() {
        return Err(SpiffeIdError::EmptySegment(context.to_owned()));
    }
    if segment == "." || segment == ".." {
        return Err(SpiffeIdError::DotSegment(context.to_owned()));
    }
    if let Some(ch) = segment
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::PathChar {
            id: context.to_owned(),
            ch,
        });
    }
    Ok(())
}

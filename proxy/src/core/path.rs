//! Request paths as routing, authorization and the backend all see them:
//! normalised once, before any of them looks, so that no spelling of a
//! path can mean one thing to a policy and another to the model server
//! behind it (`/v1/../admin`, `//admin`, `/%61dmin` and `/admin` are one
//! path). As RFC 3986 §6.2.2 says, and as Envoy's `normalize_path` with
//! `merge_slashes` and Istio's `DECODE_AND_MERGE_SLASHES` do:
//!
//! 1. percent-encodings are checked: `%` must be followed by two hex
//!    digits; unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded,
//!    other encodings are kept, in upper case;
//! 2. escaped slashes (`%2F`, `%5C`) are unescaped to `/`, refused, or kept,
//!    as the listener says ([`EscapedSlashes`]);
//! 3. runs of slashes are merged into one;
//! 4. dot segments (`.`, `..`) are removed, `..` never climbing above the
//!    root.
//!
//! The query is left as it is, and so is case: `/Admin` is another path
//! than `/admin`, as it is to almost every model server.

use std::borrow::Cow;

use infermesh_api::EscapedSlashes;

/// Why a path cannot be normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the request path must start with /")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("the request path has a % that is not followed by two hex digits")]
    BadEncoding,
    /// An escaped slash, on a listener that refuses them.
    #[error(
        "the request path has an escaped slash (%2F or %5C), which this listener refuses (escapedSlashes: reject)"
    )]
    EscapedSlash,
}

/// `path` normalised; borrowed when it already was (the common case costs
/// one scan and no allocation).
pub fn normalize(path: &str, escaped_slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, escaped_slashes)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Whether `path` has nothing to normalise: no `%`, no empty segment, no
/// segment that starts with a dot (a dot segment, or a name like
/// `.well-known`, which the slow path keeps as it is).
fn is_normal(path: &[u8]) -> bool {
    // Found with memchr: a path has a few slashes among many letters.
    memchr::memchr(b'%', path).is_none()
        && memchr::memchr_iter(b'/', path).all(|at| !matches!(path.get(at + 1), Some(b'/' | b'.')))
}

/// Step 1 and 2: percent-encodings checked, unreserved ones decoded,
/// escaped slashes handled.
fn decode(path: &str, escaped_slashes: EscapedSlashes) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        // Text up to the next escape is copied whole: byte by byte would
        // split the UTF-8 of non-ASCII characters.
        let run = path[i..].find('%').unwrap_or(path.len() - i);
        if run > 0 {
            out.push_str(&path[i..i + run]);
            i += run;
            continue;
        }
        let (Some(high), Some(low)) = (
            bytes.get(i + 1).and_then(|h| hex(*h)),
            bytes.get(i + 2).and_then(|l| hex(*l)),
        ) else {
            return Err(PathError::BadEncoding);
        };
        let decoded = high << 4 | low;
        match decoded {
            b'/' | b'\\' => match escaped_slashes {
                EscapedSlashes::Unescape => out.push('/'),
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                EscapedSlashes::Keep => push_encoded(&mut out, decoded),
            },
            b if is_unreserved(b) => out.push(char::from(b)),
            b => push_encoded(&mut out, b),
        }
        i += 3;
    }
    Ok(out)
}

/// Step 3 and 4: slashes merged, dot segments removed. `path` starts with
/// `/`; so does the result.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    // Whether the path ends in a directory: a trailing slash, or a final
    // dot segment (`/a/.` is `/a/`, `/a/b/..` is `/a/`).
    let mut directory = false;
    for segment in path.split('/').skip(1) {
        directory = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            name => {
                segments.push(name);
                directory = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if directory || segments.is_empty() {
        out.push('/');
    }
    out
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3: characters whose encoding means the same as themselves.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn push_encoded(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> String {
        normalize(path, EscapedSlashes::Unescape)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_owned()
    }

    #[test]
    fn every_spelling_of_a_path_becomes_the_path() {
        for spelling in [
            "/admin",
            "/./admin",
            "//admin",
            "/%61dmin",
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/..%2fadmin",
            "/v1/..%5Cadmin",
            "/v1//../admin",
            "/../../admin",
            "///admin",
            "/admin/.",
        ] {
            let expected = if spelling.ends_with('.') {
                "/admin/"
            } else {
                "/admin"
            };
            assert_eq!(normal(spelling), expected, "{spelling}");
        }
        assert_eq!(normal("/admin%2fsecret"), "/admin/secret");
    }

    #[test]
    fn characters_beyond_ascii_survive_normalisation() {
        // Found by the path_normalize fuzz target: copied byte by byte,
        // UTF-8 became Latin-1 mojibake, again at every hop.
        assert_eq!(normal("/café/%41"), "/café/A");
        assert_eq!(normal("/模型//x"), "/模型/x");
        assert_eq!(normal(&normal("/café/%41")), "/café/A");
    }

    #[test]
    fn a_normal_path_is_borrowed_as_it_is() {
        for path in [
            "/",
            "/v1/chat/completions",
            "/v2/models/resnet-50/infer",
            "/a.b/c..d/e.",
            "/Admin",
        ] {
            assert!(
                matches!(normalize(path, EscapedSlashes::Unescape), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn dot_segments_and_slashes_follow_rfc_3986() {
        for (path, expected) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/..", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/a//b//", "/a/b/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/.b/..c/...", "/a/.b/..c/..."),
        ] {
            assert_eq!(normal(path), expected, "{path}");
        }
    }

    #[test]
    fn encodings_are_checked_and_only_unreserved_ones_decoded() {
        assert_eq!(normal("/%7euser/%41%2d%5f"), "/~user/A-_");
        assert_eq!(normal("/a%20b/%3f%e2%82%ac"), "/a%20b/%3F%E2%82%AC");
        for bad in ["/a%", "/a%2", "/a%zz", "/%g0"] {
            assert_eq!(
                normalize(bad, EscapedSlashes::Unescape),
                Err(PathError::BadEncoding),
                "{bad}"
            );
        }
        assert_eq!(
            normalize("v1/x", EscapedSlashes::Unescape),
            Err(PathError::NotAbsolute)
        );
    }

    #[test]
    fn escaped_slashes_are_unescaped_refused_or_kept_as_the_listener_says() {
        let path = "/models/org%2fname/../infer";
        assert_eq!(normal(path), "/models/org/infer");
        assert_eq!(
            normalize(path, EscapedSlashes::Reject),
            Err(PathError::EscapedSlash)
        );
        assert_eq!(
            normalize(path, EscapedSlashes::Keep).unwrap(),
            "/models/infer",
            "org%2Fname is one segment, which .. removes"
        );
        assert_eq!(
            normalize("/models/org%2fname/infer", EscapedSlashes::Keep).unwrap(),
            "/models/org%2Fname/infer"
        );
    }

    /// Every path made of up to five segments from a set of tricky ones:
    /// normalising twice changes nothing, and the result has no empty or
    /// dot segment and no escaped slash left.
    #[test]
    fn the_result_is_normal_and_stays_so() {
        const PARTS: [&str; 10] = [
            "", ".", "..", "%2e", "%2E%2e", "a", "%2f", "..%2f", "%5c.", "b%2Fc",
        ];
        let mut paths = vec![String::new()];
        for _ in 0..5 {
            paths = paths
                .iter()
                .flat_map(|p| PARTS.iter().map(move |part| format!("{p}/{part}")))
                .collect();
            for path in &paths {
                let once = normal(path);
                assert!(once.starts_with('/'), "{path} -> {once}");
                assert_eq!(normal(&once), once, "{path} -> {once} is not stable");
                assert!(
                    is_normal(once.trim_end_matches('/').as_bytes()) || once == "/",
                    "{path} -> {once}"
                );
                assert!(
                    !once.to_ascii_lowercase().contains("%2f"),
                    "{path} -> {once}"
                );
                assert!(
                    !once.to_ascii_lowercase().contains("%5c"),
                    "{path} -> {once}"
                );
            }
        }
    }
}

//! `hot_path::normalize_path` (proxy/src/core/path.rs) on any path, in
//! each of the three `escapedSlashes` modes. The input is the path (bytes
//! that are not UTF-8 become U+FFFD).
//!
//! Asserted, for every mode:
//! - an error is the right one: `NotAbsolute` exactly when the path does
//!   not start with `/`; `BadEncoding` only for a `%` not followed by two
//!   hex digits, and some error whenever there is one; `EscapedSlash` only
//!   in `reject` mode, for a path with `%2F` or `%5C`;
//! - a result is in normal form: it starts with `/`, has no `//`, no `.`
//!   or `..` segment, and every `%` starts an upper-case escape of a byte
//!   that is not unreserved (nor, unless the mode keeps them, `/` or `\`);
//! - normalising is idempotent: a result normalises to itself;
//! - a path already in normal form is its own result (so the normal form
//!   above is exactly the set of fixed points);
//! - nothing but escapes, slashes and dot segments changes: the non-ASCII
//!   characters of the result are, in order, a subsequence of the path's
//!   (no byte is re-encoded as another character);
//! - the modes agree where they should: a path `reject` accepts has the
//!   same result in every mode.

#![no_main]

use std::borrow::Cow;

use infermesh_api::EscapedSlashes;
use infermesh_proxy::hot_path::{PathError, normalize_path};
use libfuzzer_sys::fuzz_target;

const MODES: [EscapedSlashes; 3] = [
    EscapedSlashes::Unescape,
    EscapedSlashes::Reject,
    EscapedSlashes::Keep,
];

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    let results = MODES.map(|mode| normalize_path(&path, mode));
    for (mode, result) in MODES.into_iter().zip(&results) {
        check(&path, mode, result);
    }
    if let Ok(rejecting) = &results[1] {
        for result in &results {
            assert_eq!(
                result.as_deref(),
                Ok(rejecting.as_ref()),
                "{path:?}: the modes differ on a path without escaped slashes"
            );
        }
    }
});

fn check(path: &str, mode: EscapedSlashes, result: &Result<Cow<'_, str>, PathError>) {
    let bytes = path.as_bytes();
    match result {
        Err(PathError::NotAbsolute) => assert!(!path.starts_with('/'), "{path:?} is absolute"),
        Err(PathError::BadEncoding) => {
            assert!(path.starts_with('/'));
            assert!(bad_escape(bytes), "{path:?} ({mode:?}): no bad % in it");
        }
        Err(PathError::EscapedSlash) => {
            assert!(path.starts_with('/'));
            assert_eq!(mode, EscapedSlashes::Reject, "{path:?}");
            assert!(has_escaped_slash(bytes), "{path:?}: no escaped slash in it");
        }
        Ok(out) => {
            assert!(path.starts_with('/'), "{path:?} is not absolute");
            assert!(!bad_escape(bytes), "{path:?} ({mode:?}): a bad % passed");
            if mode == EscapedSlashes::Reject {
                assert!(
                    !has_escaped_slash(bytes),
                    "{path:?}: an escaped slash passed"
                );
            }
            if let Err(why) = normal_form(out, mode) {
                panic!("{path:?} ({mode:?}) -> {out:?}: {why}");
            }
            assert_eq!(
                normalize_path(out, mode).as_deref(),
                Ok(out.as_ref()),
                "{path:?} ({mode:?}) -> {out:?} is not stable"
            );
            if normal_form(path, mode).is_ok() {
                assert_eq!(out, path, "{path:?} ({mode:?}) was normal already");
            }
            let mut given = path.chars().filter(|c| !c.is_ascii());
            for c in out.chars().filter(|c| !c.is_ascii()) {
                assert!(
                    given.any(|g| g == c),
                    "{path:?} ({mode:?}) -> {out:?}: {c:?} is not the path's"
                );
            }
        }
    }
}

/// Why `path` is not in normal form.
fn normal_form(path: &str, mode: EscapedSlashes) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("does not start with /".into());
    }
    if path.contains("//") {
        return Err("has //".into());
    }
    if let Some(dot) = path.split('/').find(|s| *s == "." || *s == "..") {
        return Err(format!("has a {dot:?} segment"));
    }
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let escape = bytes.get(i + 1..i + 3).unwrap_or_default();
        let upper = |b: &u8| b.is_ascii_digit() || (b'A'..=b'F').contains(b);
        if escape.len() != 2 || !escape.iter().all(upper) {
            return Err(format!("% at {i} is not an upper-case escape"));
        }
        let byte = u8::from_str_radix(std::str::from_utf8(escape).unwrap(), 16).unwrap();
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            return Err(format!("% at {i} escapes an unreserved character"));
        }
        if mode != EscapedSlashes::Keep && (byte == b'/' || byte == b'\\') {
            return Err(format!("% at {i} escapes a slash"));
        }
    }
    Ok(())
}

/// Whether some `%` is not followed by two hex digits.
fn bad_escape(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

fn has_escaped_slash(bytes: &[u8]) -> bool {
    bytes.windows(3).any(|w| {
        w[0] == b'%' && (w[1..].eq_ignore_ascii_case(b"2f") || w[1..].eq_ignore_ascii_case(b"5c"))
    })
}

//! Located config errors: what is wrong, in which file, at which line,
//! column and field.

use std::fmt;

/// One problem found in the config, pointing at where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in, as the caller named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The resource the problem is in, as `Kind/name`, when it is known.
    pub resource: Option<String>,
    /// The field path inside the document, e.g. `spec.rules[0].backends[1].name`.
    pub field: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(resource) = &self.resource {
            write!(f, "{resource}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a config, in file order. Returned instead of a
/// config when at least one problem was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// The problems, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    /// How many problems were found.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no problem was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "config has {n} error{}:", if n == 1 { "" } else { "s" })?;
        for d in &self.0 {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}

/// The name among `known` that `typed` was probably meant to be: the same
/// but for case, `-` and `_` (`connect_timeout` for `connectTimeout`), or
/// within one typing slip (a letter added, dropped, changed or two swapped)
/// per three letters. The closest wins; `None` when none is that close.
pub(crate) fn closest<'a>(
    typed: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    fn plain(name: &str) -> String {
        name.chars()
            .filter(|c| !matches!(c, '-' | '_'))
            .flat_map(char::to_lowercase)
            .collect()
    }
    let typed = plain(typed);
    let limit = (typed.chars().count() / 3).max(1);
    known
        .into_iter()
        .map(|name| (strsim::damerau_levenshtein(&typed, &plain(name)), name))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name)
}

/// `` `a` `` or `` one of `a`, `b`, `c` ``.
pub(crate) fn one_of<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    match names.as_slice() {
        [one] => one.clone(),
        _ => format!("one of {}", names.join(", ")),
    }
}

/// The message for a field that `known` (the fields its mapping may hold)
/// does not list: the field meant, when one is close, else the fields
/// there are.
pub(crate) fn unknown_field(field: &str, known: &[&str]) -> String {
    let mut message = format!("unknown field `{field}`");
    if let Some(meant) = closest(field, known.iter().copied()) {
        message.push_str(&format!("; did you mean `{meant}`?"));
    } else if !known.is_empty() {
        message.push_str(&format!("; expected {}", one_of(known.iter().copied())));
    }
    message
}

/// The message for a name that is not one of `known` (the variants of an
/// enum), in serde's words, with the name meant when one is close.
pub(crate) fn unknown_variant(variant: &str, known: &[&str]) -> String {
    let mut message = format!(
        "unknown variant `{variant}`, expected {}",
        one_of(known.iter().copied())
    );
    if let Some(meant) = closest(variant, known.iter().copied()) {
        message.push_str(&format!("; did you mean `{meant}`?"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_meant_is_found_when_close() {
        let fields = ["address", "protocol", "timeouts", "weight"];
        for (typed, meant) in [
            ("adress", Some("address")),
            ("protocl", Some("protocol")),
            ("wieght", Some("weight")),
            ("timeout", Some("timeouts")),
            ("PROTOCOL", Some("protocol")),
            ("pro_to-col", Some("protocol")),
            ("port", None),
            ("x", None),
            ("", None),
        ] {
            assert_eq!(closest(typed, fields), meant, "{typed:?}");
        }
        // The closest wins, the first of equals.
        assert_eq!(closest("ab", ["ax", "ab_", "ay"]), Some("ab_"));
        assert_eq!(closest("ab", ["ax", "ay"]), Some("ax"));
    }

    #[test]
    fn messages() {
        assert_eq!(
            unknown_field("wieght", &["address", "weight"]),
            "unknown field `wieght`; did you mean `weight`?"
        );
        assert_eq!(
            unknown_field("labels", &["name"]),
            "unknown field `labels`; expected `name`"
        );
        assert_eq!(unknown_field("x", &[]), "unknown field `x`");
        assert_eq!(
            unknown_variant("htp2", &["http1", "http2"]),
            "unknown variant `htp2`, expected one of `http1`, `http2`; did you mean `http2`?"
        );
    }
}

//! Field paths inside a document, written the way `kubectl` prints them:
//! `spec.rules[0].backends[1].name`.

use std::fmt;

/// The path to one field of a config document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(String);

impl FieldPath {
    /// The document itself.
    pub fn root() -> Self {
        FieldPath(String::new())
    }

    /// The child field `key` of this path.
    pub fn key(&self, key: &str) -> Self {
        if self.0.is_empty() {
            FieldPath(key.to_owned())
        } else {
            FieldPath(format!("{}.{key}", self.0))
        }
    }

    /// The `index`th item of the sequence at this path.
    pub fn index(&self, index: usize) -> Self {
        FieldPath(format!("{}[{index}]", self.0))
    }

    /// The enclosing path, or `None` for the root.
    pub fn parent(&self) -> Option<Self> {
        if self.0.is_empty() {
            return None;
        }
        let cut = self.0.rfind(['.', '[']).unwrap_or(0);
        Some(FieldPath(self.0[..cut].to_owned()))
    }

    /// The path as text; empty for the root.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Builds the path of a serde_path_to_error error inside the document
    /// at `base`.
    pub(crate) fn from_serde(base: &FieldPath, path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment;
        let mut out = base.clone();
        for segment in path {
            out = match segment {
                Segment::Seq { index } => out.index(*index),
                Segment::Map { key } => out.key(key),
                Segment::Enum { variant } => out.key(variant),
                Segment::Unknown => out,
            };
        }
        out
    }

    /// Builds the path of a field that serde_ignored reported as unknown.
    pub(crate) fn from_ignored(base: &FieldPath, path: &serde_ignored::Path<'_>) -> Self {
        use serde_ignored::Path;
        match path {
            Path::Root => base.clone(),
            Path::Seq { parent, index } => Self::from_ignored(base, parent).index(*index),
            Path::Map { parent, key } => Self::from_ignored(base, parent).key(key),
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => Self::from_ignored(base, parent),
        }
    }

    #[cfg(test)]
    pub(crate) fn parse(text: &str) -> Self {
        FieldPath(text.to_owned())
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(document)")
        } else {
            f.write_str(&self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_walks_up() {
        let p = FieldPath::root()
            .key("spec")
            .key("rules")
            .index(2)
            .key("name");
        assert_eq!(p.as_str(), "spec.rules[2].name");
        let up: Vec<String> = std::iter::successors(Some(p), |p| p.parent())
            .map(|p| p.as_str().to_owned())
            .collect();
        assert_eq!(
            up,
            [
                "spec.rules[2].name",
                "spec.rules[2]",
                "spec.rules",
                "spec",
                ""
            ]
        );
    }
}

//! Reading YAML text into plain values plus a map from each field path to the
//! line and column it was written at, so that every later error (type,
//! unknown field, dangling reference) can point at the source.

use std::collections::HashMap;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde_json::{Map, Number, Value};

use crate::path::FieldPath;

/// A 1-based line and column in a source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Line, starting at 1.
    pub line: usize,
    /// Column, starting at 1, counted in characters.
    pub column: usize,
}

impl Position {
    fn of(marker: &saphyr::Marker) -> Self {
        Position {
            line: marker.line(),
            column: marker.col() + 1,
        }
    }
}

/// Where each field of one document was written.
#[derive(Clone, Debug, Default)]
pub(crate) struct Locations {
    by_path: HashMap<String, Position>,
    document: Position,
}

impl Locations {
    /// The position of `path`, or of its nearest ancestor that was written
    /// (a missing field is reported where its parent is).
    pub(crate) fn find(&self, path: &FieldPath) -> Position {
        let mut candidate = path.clone();
        loop {
            if let Some(pos) = self.by_path.get(candidate.as_str()) {
                return *pos;
            }
            match candidate.parent() {
                Some(parent) => candidate = parent,
                None => return self.document,
            }
        }
    }

    /// Where the document starts.
    pub(crate) fn document(&self) -> Position {
        self.document
    }
}

/// One YAML document as a plain value with the positions of its fields.
pub(crate) struct Document {
    pub(crate) value: Value,
    pub(crate) locations: Locations,
    /// Constructs the config format does not accept (each read as null);
    /// a document with any is not validated further.
    pub(crate) problems: Vec<SyntaxError>,
}

/// A YAML syntax problem, or a construct the config format does not accept.
pub(crate) struct SyntaxError {
    pub(crate) position: Position,
    pub(crate) path: FieldPath,
    pub(crate) message: String,
}

/// Splits `text` into its documents. Empty documents (a stray `---`) are
/// dropped. A syntax error fails the whole text (the parser cannot go on
/// past it); a construct the format does not accept is a problem of its
/// document only.
pub(crate) fn documents(text: &str) -> Result<Vec<Document>, SyntaxError> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| SyntaxError {
        position: Position::of(e.marker()),
        path: FieldPath::root(),
        message: format!("invalid YAML: {}", e.info()),
    })?;
    let mut out = Vec::with_capacity(docs.len());
    for doc in &docs {
        if matches!(doc.data, YamlData::Value(Scalar::Null)) {
            continue;
        }
        let mut locations = Locations {
            by_path: HashMap::new(),
            document: Position::of(&doc.span.start),
        };
        let mut problems = Vec::new();
        let value = convert(doc, &FieldPath::root(), &mut locations, &mut problems);
        out.push(Document {
            value,
            locations,
            problems,
        });
    }
    Ok(out)
}

/// The value of `node`; a construct the format does not accept is added to
/// `problems` and read as null.
fn convert(
    node: &MarkedYaml<'_>,
    path: &FieldPath,
    locations: &mut Locations,
    problems: &mut Vec<SyntaxError>,
) -> Value {
    let refuse = |problems: &mut Vec<SyntaxError>, message: String| {
        problems.push(SyntaxError {
            position: Position::of(&node.span.start),
            path: path.clone(),
            message,
        });
        Value::Null
    };
    let unsupported = |what: &str| format!("{what} are not supported in infermesh config");
    match &node.data {
        YamlData::Value(scalar) => scalar_value(scalar),
        YamlData::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let item_path = path.index(index);
                locations.by_path.insert(
                    item_path.as_str().to_owned(),
                    Position::of(&item.span.start),
                );
                out.push(convert(item, &item_path, locations, problems));
            }
            Value::Array(out)
        }
        YamlData::Mapping(entries) => {
            let mut out = Map::with_capacity(entries.len());
            for (key, value) in entries {
                let key_text = match &key.data {
                    YamlData::Value(Scalar::String(s)) => s.to_string(),
                    YamlData::Value(scalar) => match scalar_value(scalar) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    },
                    _ => {
                        problems.push(SyntaxError {
                            position: Position::of(&key.span.start),
                            path: path.clone(),
                            message: "mapping keys must be plain strings".into(),
                        });
                        continue;
                    }
                };
                let field_path = path.key(&key_text);
                locations.by_path.insert(
                    field_path.as_str().to_owned(),
                    Position::of(&key.span.start),
                );
                let converted = convert(value, &field_path, locations, problems);
                out.insert(key_text, converted);
            }
            Value::Object(out)
        }
        YamlData::Tagged(..) => refuse(problems, unsupported("YAML tags")),
        YamlData::Alias(_) => refuse(problems, unsupported("unresolved YAML aliases")),
        YamlData::Representation(text, ..) => Value::String(text.to_string()),
        YamlData::BadValue => refuse(problems, "value does not match its YAML tag".into()),
    }
}

fn scalar_value(scalar: &Scalar<'_>) -> Value {
    match scalar {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::Number((*i).into()),
        Scalar::FloatingPoint(f) => Number::from_f64(f.into_inner())
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        Scalar::String(s) => Value::String(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_positions_of_keys_and_items() {
        let text = "a: 1\nb:\n  - x: 2\n  - y: 3\n---\nc: true\n";
        let docs = documents(text).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(docs.len(), 2);
        let first = &docs[0];
        assert_eq!(first.value["b"][1]["y"], Value::from(3));
        let at = |p: &str| {
            let path = FieldPath::parse(p);
            let pos = first.locations.find(&path);
            (pos.line, pos.column)
        };
        assert_eq!(at("a"), (1, 1));
        assert_eq!(at("b[1].y"), (4, 5));
        // A field that is not written resolves to its nearest written parent.
        assert_eq!(at("b[0].missing"), (3, 5));
        assert_eq!(docs[1].locations.document().line, 6);
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_are_located() {
        let err = documents("a: 1\na: 2\n").err().expect("duplicate key");
        // Points at the second, duplicate key.
        assert_eq!(err.position.line, 2);
        assert!(err.message.contains("duplicated key"), "{}", err.message);

        let err = documents("a: [1, 2\nb: 3\n").err().expect("unclosed flow");
        assert!(err.message.starts_with("invalid YAML"), "{}", err.message);
    }

    #[test]
    fn aliases_resolve_and_tags_are_refused() {
        let docs = documents("a: &x {k: 1}\nb: *x\n").unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(docs[0].value["b"]["k"], Value::from(1));
        assert!(docs[0].problems.is_empty());
    }

    #[test]
    fn every_construct_refused_is_a_problem_of_its_own_document() {
        let text = "a: !custom {k: 1}\nb: !other 2\n---\nc: 3\n";
        let docs = documents(text).unwrap_or_else(|e| panic!("{}", e.message));
        let problems: Vec<(&str, usize)> = docs[0]
            .problems
            .iter()
            .map(|p| (p.path.as_str(), p.position.line))
            .collect();
        assert_eq!(problems, [("a", 1), ("b", 2)]);
        assert_eq!(docs[0].value["a"], Value::Null);
        assert!(docs[1].problems.is_empty());
        assert_eq!(docs[1].value["c"], Value::from(3));
    }
}

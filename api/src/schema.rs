//! JSON Schemas of the kinds' specs ([`crate::Kind::spec_schema`]), the
//! schemas of fields whose text has a form that the derived schema (a plain
//! string) does not tell, and the validation of a spec against its kind's
//! schema ([`validate`]), which finds every wrong value of a document in
//! one pass where deserializing stops at the first.

use std::net::SocketAddr;

use schemars::generate::SchemaSettings;
use schemars::transform::RecursiveTransform;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{DeserializeOwned, Unexpected};
use serde_json::{Map, Value};

use crate::diagnostic::{one_of, unknown_field, unknown_variant};
use crate::duration::Duration;
use crate::path::FieldPath;

/// `ip:port` or `[ipv6]:port` (with an optional numeric scope), the text
/// `std::net::SocketAddr` parses. Looser than the parser (it does not check
/// that octets and ports are in range), never stricter.
const SOCKET_ADDRESS: &str =
    r"^(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]+(?:%[0-9]+)?\]):[0-9]{1,5}$";

/// A socket address, or `dns-name:port` (a name of letters, digits, `-`
/// and `.`), the text [`crate::EndpointTarget::parse`] takes. Looser than
/// the parser, never stricter.
const ENDPOINT_ADDRESS: &str =
    r"^(?:\[[0-9A-Fa-f:.]+(?:%[0-9]+)?\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9.])?):[0-9]{1,5}$";

/// The schema of a socket address field (`Listener` `spec.address`).
pub(crate) fn socket_address(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": SOCKET_ADDRESS,
        "examples": ["0.0.0.0:8080", "[::]:8080", "127.0.0.1:0"],
    })
}

/// The schema of a list of socket addresses (`Backend` `spec.addresses`).
pub(crate) fn socket_addresses(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": socket_address(generator),
    })
}

/// The schema of an endpoint's address (`Backend` `spec.endpoints[].address`).
pub(crate) fn endpoint_address(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": ENDPOINT_ADDRESS,
        "examples": ["10.0.0.7:8000", "[fd00::7]:8000", "llama-1.models.svc:8000"],
    })
}

/// The root schema of a spec type, draft 2020-12, every subschema inline.
pub(crate) fn spec_schema<T: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .with_transform(RecursiveTransform(deny_unknown_fields))
        .into_generator()
        .into_root_schema_for::<T>()
}

/// The loader reports every field it does not know as an error, so every
/// object of a spec is closed.
fn deny_unknown_fields(schema: &mut Schema) {
    if schema.get("properties").is_some() && schema.get("additionalProperties").is_none() {
        schema.insert("additionalProperties".into(), false.into());
    }
}

/// What [`validate`] found in one spec.
#[derive(Debug, Default)]
pub(crate) struct Validation {
    /// Every wrong value, unknown field and missing field, with its path.
    pub(crate) problems: Vec<(FieldPath, String)>,
    /// The fields taken out of the value because they were wrong, so that
    /// their defaults stand in while the rest is deserialized and checked.
    pub(crate) removed: Vec<FieldPath>,
    /// Whether what is left of the value can be deserialized: every wrong
    /// value was in a field that has a default (or in one of its parts).
    pub(crate) usable: bool,
}

impl Validation {
    /// Whether a problem that the checks made on the deserialized value
    /// report at `field` may only follow from a field taken out (it is at
    /// or inside one, or at the mapping that held one), and so is not
    /// reported: a header match whose `present` was taken out is not also
    /// told to give one of exact, regex or present.
    pub(crate) fn hides(&self, field: &str) -> bool {
        self.removed.iter().any(|removed| {
            let inside = field
                .strip_prefix(removed.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']));
            inside
                || removed
                    .parent()
                    .is_some_and(|parent| parent.as_str() == field)
        })
    }
}

/// Checks `value` (found at `at` in its document) against `schema`, a
/// kind's spec schema, reporting every mismatch at its own path: a value of
/// the wrong type or out of its type's range, a name that is not one of an
/// enum's (with the name meant, when one is close), an unknown field (the
/// same), a missing required field. A wrong value is taken out of `value`
/// at the nearest field that has a default, so that the rest can still be
/// deserialized and checked.
///
/// The schema is read for what the derived schemas use: `type`,
/// `properties`, `required`, `additionalProperties: false`, `items`,
/// `oneOf` and `anyOf`, `const`, `enum`, `minimum`, `maximum` and the
/// integer formats. Where the schema tells less than the type's parser
/// (format `duration`, socket addresses), the value is given to that
/// parser, so its message is the one a deserializer would give. The value
/// is deserialized afterwards all the same: the schema never lets through
/// what the types refuse.
pub(crate) fn validate(schema: &Value, value: &mut Value, at: &FieldPath) -> Validation {
    let mut walker = Walker::default();
    let usable = walker.walk(schema, value, at);
    Validation {
        problems: walker.problems,
        removed: walker.removed,
        usable,
    }
}

#[derive(Default)]
struct Walker {
    problems: Vec<(FieldPath, String)>,
    removed: Vec<FieldPath>,
}

impl Walker {
    fn problem(&mut self, path: &FieldPath, message: String) {
        self.problems.push((path.clone(), message));
    }

    /// Checks `value` at `path` against `schema`. Returns whether it is
    /// valid once its wrong optional fields are taken out; when not, the
    /// problems are recorded and the caller must take out `value` itself
    /// (or give up on the document).
    fn walk(&mut self, schema: &Value, value: &mut Value, path: &FieldPath) -> bool {
        let Value::Object(schema) = schema else {
            // `true` takes anything; `false` takes nothing (not derived).
            return schema != &Value::Bool(false);
        };
        if schema.contains_key("oneOf") || schema.contains_key("anyOf") {
            return self.alternatives(schema, value, path);
        }
        if schema.get("format").and_then(Value::as_str) == Some("duration") {
            let optional =
                value.is_null() && schema.get("type").is_some_and(|t| has_type(t, value));
            return optional || self.parses::<Duration>(value, path);
        }
        if let Some(types) = schema.get("type")
            && !has_type(types, value)
        {
            self.invalid_type(value, &expected(schema), path);
            return false;
        }
        if let Some(constant) = schema.get("const")
            && constant != value
        {
            return self.not_a_variant(value, &[constant], path);
        }
        if let Some(Value::Array(variants)) = schema.get("enum")
            && !variants.contains(value)
        {
            let variants: Vec<&Value> = variants.iter().collect();
            return self.not_a_variant(value, &variants, path);
        }
        match value {
            Value::Number(number) => {
                let (min, max) = bounds(schema);
                let n = number.as_f64().unwrap_or(f64::NAN);
                if min.is_some_and(|min| n < min) || max.is_some_and(|max| n > max) {
                    self.problem(
                        path,
                        format!(
                            "invalid value: {}, expected {}",
                            unexpected(value),
                            expected(schema)
                        ),
                    );
                    return false;
                }
                true
            }
            Value::String(_)
                if schema.get("pattern").and_then(Value::as_str) == Some(SOCKET_ADDRESS) =>
            {
                self.parses::<SocketAddr>(value, path)
            }
            Value::Array(items) => {
                let Some(item_schema) = schema.get("items") else {
                    return true;
                };
                let mut valid = true;
                for (i, item) in items.iter_mut().enumerate() {
                    // An item cannot be taken out alone: the paths of the
                    // items after it would change.
                    valid &= self.walk(item_schema, item, &path.index(i));
                }
                valid
            }
            Value::Object(fields) => self.object(schema, fields, path),
            _ => true,
        }
    }

    /// The fields of a mapping: each known one checked (and taken out when
    /// wrong and optional), each unknown one reported and taken out, each
    /// required one that is missing reported.
    fn object(
        &mut self,
        schema: &Map<String, Value>,
        fields: &mut Map<String, Value>,
        path: &FieldPath,
    ) -> bool {
        let empty = Map::new();
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|names| names.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let additional = schema.get("additionalProperties");
        let mut valid = true;
        let names: Vec<String> = fields.keys().cloned().collect();
        for name in names {
            let field = path.key(&name);
            let Some(value) = fields.get_mut(&name) else {
                continue;
            };
            let field_valid = match (properties.get(&name), additional) {
                (Some(field_schema), _) => self.walk(field_schema, value, &field),
                (None, Some(Value::Bool(false))) => {
                    let known: Vec<&str> = properties.keys().map(String::as_str).collect();
                    self.problem(&field, unknown_field(&name, &known));
                    // Ignored, as serde ignores it: not a removed value.
                    fields.shift_remove(&name);
                    continue;
                }
                (None, Some(additional)) => self.walk(additional, value, &field),
                (None, None) => true,
            };
            if !field_valid {
                if required.contains(&name.as_str()) {
                    valid = false;
                } else {
                    fields.shift_remove(&name);
                    self.removed.push(field);
                }
            }
        }
        for name in required {
            if !fields.contains_key(name) {
                self.problem(path, format!("missing field `{name}`"));
                valid = false;
            }
        }
        valid
    }

    /// A value that must match one of several schemas (an enum's variants,
    /// an `Option`'s value or null): when none takes it, the problem is
    /// told in the terms of the variants the value comes closest to.
    fn alternatives(
        &mut self,
        schema: &Map<String, Value>,
        value: &mut Value,
        path: &FieldPath,
    ) -> bool {
        let mut options = Vec::new();
        flatten(schema, &mut options);
        if options.iter().any(|option| takes(option, value)) {
            return true;
        }
        let variants: Vec<&Value> = options
            .iter()
            .filter_map(|option| option.get("const"))
            .chain(
                options
                    .iter()
                    .filter_map(|option| option.get("enum").and_then(Value::as_array))
                    .flatten(),
            )
            .collect();
        // Enums with data are single-field mappings, `{ prefix: /v1 }`.
        let tagged: Vec<(&str, &Value)> = options
            .iter()
            .filter_map(|option| single_required_field(option).map(|name| (name, *option)))
            .collect();
        match value {
            Value::String(_) if !variants.is_empty() => self.not_a_variant(value, &variants, path),
            Value::Object(fields) if !tagged.is_empty() => {
                let tags: Vec<&str> = tagged.iter().map(|(tag, _)| *tag).collect();
                if fields.len() != 1 {
                    self.problem(path, format!("give exactly {}", one_of(tags)));
                    return false;
                }
                let tag = fields.keys().next().cloned().unwrap_or_default();
                match tagged.iter().find(|(name, _)| *name == tag) {
                    Some((_, option)) => self.walk(option, value, path),
                    None => {
                        self.problem(&path.key(&tag), unknown_field(&tag, &tags));
                        false
                    }
                }
            }
            _ => {
                // One variant of the value's type: its problems are the
                // precise ones.
                let mut typed = options.iter().filter(|option| {
                    option.get("const").is_none()
                        && option
                            .get("type")
                            .is_some_and(|types| has_type(types, value))
                });
                if let (Some(option), None) = (typed.next(), typed.next()) {
                    return self.walk(option, value, path);
                }
                let tags = tagged.iter().map(|(tag, _)| *tag);
                let names = variants.iter().filter_map(|v| v.as_str());
                let expected: Vec<String> = (!variants.is_empty())
                    .then(|| one_of(names))
                    .into_iter()
                    .chain((!tagged.is_empty()).then(|| format!("a mapping with {}", one_of(tags))))
                    .chain(
                        options
                            .iter()
                            .filter(|option| {
                                option.get("const").is_none()
                                    && option.get("enum").is_none()
                                    && single_required_field(option).is_none()
                                    && option.get("type") != Some(&Value::from("null"))
                            })
                            .filter_map(|option| option.as_object().map(expected)),
                    )
                    .collect();
                self.invalid_type(value, &expected.join(" or "), path);
                false
            }
        }
    }

    fn not_a_variant(&mut self, value: &Value, variants: &[&Value], path: &FieldPath) -> bool {
        let names: Vec<&str> = variants.iter().filter_map(|v| v.as_str()).collect();
        match value {
            Value::String(name) => self.problem(path, unknown_variant(name, &names)),
            _ => self.invalid_type(value, &one_of(names), path),
        }
        false
    }

    fn invalid_type(&mut self, value: &Value, expected: &str, path: &FieldPath) {
        self.problem(
            path,
            format!("invalid type: {}, expected {expected}", unexpected(value)),
        );
    }

    /// Whether `T`'s deserializer takes `value`; when not, its message is
    /// the problem.
    fn parses<T: DeserializeOwned>(&mut self, value: &Value, path: &FieldPath) -> bool {
        match serde_json::from_value::<T>(value.clone()) {
            Ok(_) => true,
            Err(e) => {
                self.problem(path, e.to_string());
                false
            }
        }
    }
}

/// The schemas an `anyOf` / `oneOf` chooses among, nested ones included.
fn flatten<'a>(schema: &'a Map<String, Value>, out: &mut Vec<&'a Value>) {
    for key in ["oneOf", "anyOf"] {
        for option in schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match option.as_object() {
                Some(inner) if inner.contains_key("oneOf") || inner.contains_key("anyOf") => {
                    flatten(inner, out)
                }
                _ => out.push(option),
            }
        }
    }
}

/// Whether `schema` takes `value` as it is.
fn takes(schema: &Value, value: &Value) -> bool {
    let mut trial = Walker::default();
    trial.walk(schema, &mut value.clone(), &FieldPath::root()) && trial.problems.is_empty()
}

/// The one field of a mapping schema that has one field, required (an
/// enum variant with data).
fn single_required_field(schema: &Value) -> Option<&str> {
    let properties = schema.get("properties")?.as_object()?;
    let required = schema.get("required")?.as_array()?;
    match (
        properties.keys().next(),
        properties.len(),
        required.as_slice(),
    ) {
        (Some(name), 1, [only]) if only == name => Some(name),
        _ => None,
    }
}

/// Whether `value` is of the JSON Schema type (or one of the types) `types`.
fn has_type(types: &Value, value: &Value) -> bool {
    let is = |name: &str| match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    };
    match types {
        Value::String(name) => is(name),
        Value::Array(names) => names.iter().filter_map(Value::as_str).any(is),
        _ => true,
    }
}

/// The smallest and largest number a schema takes: its `minimum` and
/// `maximum`, else those of its integer format (`uint32` has no `maximum`).
fn bounds(schema: &Map<String, Value>) -> (Option<f64>, Option<f64>) {
    let (format_min, format_max) = match schema.get("format").and_then(Value::as_str) {
        Some("uint8") => (0.0, f64::from(u8::MAX)),
        Some("uint16") => (0.0, f64::from(u16::MAX)),
        Some("uint32") => (0.0, f64::from(u32::MAX)),
        Some("int8") => (f64::from(i8::MIN), f64::from(i8::MAX)),
        Some("int16") => (f64::from(i16::MIN), f64::from(i16::MAX)),
        Some("int32") => (f64::from(i32::MIN), f64::from(i32::MAX)),
        // Wider than any YAML integer read (an i64), and not exact as f64.
        Some("uint64" | "uint") => (0.0, f64::INFINITY),
        _ => (f64::NEG_INFINITY, f64::INFINITY),
    };
    let get = |key| schema.get(key).and_then(Value::as_f64);
    let min = get("minimum").unwrap_or(format_min);
    let max = get("maximum").unwrap_or(format_max);
    (
        min.is_finite().then_some(min),
        max.is_finite().then_some(max),
    )
}

/// What a schema takes, in words: `an integer from 0 to 65535`.
fn expected(schema: &Map<String, Value>) -> String {
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(name)) => vec![name.as_str()],
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let words: Vec<String> = types
        .into_iter()
        .filter(|name| *name != "null")
        .map(|name| match name {
            "integer" | "number" => {
                let noun = if name == "integer" {
                    "an integer"
                } else {
                    "a number"
                };
                match bounds(schema) {
                    (Some(min), Some(max)) => format!("{noun} from {min} to {max}"),
                    (Some(min), None) => format!("{noun} of at least {min}"),
                    (None, Some(max)) => format!("{noun} of at most {max}"),
                    (None, None) => noun.to_owned(),
                }
            }
            "boolean" => "a boolean".to_owned(),
            "string" => "a string".to_owned(),
            "array" => "a list".to_owned(),
            "object" => "a mapping".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    if words.is_empty() {
        "a value".to_owned()
    } else {
        words.join(" or ")
    }
}

/// A value as serde's messages name it: `string "x"`, ``integer `5` ``.
pub(crate) fn unexpected(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => Unexpected::Bool(*b).to_string(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u).to_string(),
            (None, Some(i)) => Unexpected::Signed(i).to_string(),
            (None, None) => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)).to_string(),
        },
        Value::String(s) => Unexpected::Str(s).to_string(),
        Value::Array(_) => Unexpected::Seq.to_string(),
        Value::Object(_) => Unexpected::Map.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EndpointTarget;
    use crate::Kind;

    fn matches(pattern: &str, text: &str) -> bool {
        regex::Regex::new(pattern)
            .expect("pattern compiles")
            .is_match(text)
    }

    /// The patterns are guards for editors and the API server: every text
    /// the parsers take must pass them.
    #[test]
    fn patterns_take_what_the_parsers_take() {
        for text in [
            "0.0.0.0:8080",
            "127.0.0.1:0",
            "[::]:8080",
            "[fe80::1%2]:80",
            "[::ffff:10.0.0.1]:443",
        ] {
            assert!(text.parse::<std::net::SocketAddr>().is_ok(), "{text}");
            assert!(matches(SOCKET_ADDRESS, text), "{text}");
            assert!(matches(ENDPOINT_ADDRESS, text), "{text}");
        }
        for text in [
            "llama-1.models.svc:8000",
            "Llama:80",
            "models.svc.:8000",
            "10.0.0.7:8000",
        ] {
            assert!(EndpointTarget::parse(text).is_ok(), "{text}");
            assert!(matches(ENDPOINT_ADDRESS, text), "{text}");
        }
        for text in [
            "llama",
            "llama:http",
            "::1:80",
            "bad_name:80",
            "host:port:80",
        ] {
            assert!(!matches(ENDPOINT_ADDRESS, text), "{text}");
        }
        assert!(!matches(SOCKET_ADDRESS, "llama:8000"));
    }

    /// Whether serde takes `spec` as a `kind`'s spec, unknown fields
    /// counted as refused.
    fn serde_takes(kind: Kind, spec: &Value) -> bool {
        fn takes<T: DeserializeOwned>(spec: &Value) -> bool {
            let mut unknown = false;
            let mut record = |_: serde_ignored::Path<'_>| unknown = true;
            let ignored = serde_ignored::Deserializer::new(spec.clone(), &mut record);
            T::deserialize(ignored).is_ok() && !unknown
        }
        match kind {
            Kind::Listener => takes::<crate::ListenerSpec>(spec),
            Kind::Backend => takes::<crate::BackendSpec>(spec),
            Kind::Route => takes::<crate::RouteSpec>(spec),
            Kind::AuthorizationPolicy => takes::<crate::AuthorizationPolicySpec>(spec),
            Kind::Sidecar => takes::<crate::SidecarSpec>(spec),
        }
    }

    /// Every node of `value` (pointers), the root included.
    fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match value {
            Value::Object(fields) => {
                for (key, v) in fields {
                    pointers(v, format!("{at}/{key}"), out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    pointers(v, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    /// The schema is a judge of the types, not a second opinion: on the
    /// example configs, and on every way of spoiling one of their values
    /// (a value of each other type, out of range, an unknown field, a field
    /// left out), it finds a problem exactly when serde refuses the spec.
    #[test]
    fn the_schema_takes_what_the_types_take_and_nothing_else() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
        // The examples, and those of their folders (the mesh's).
        let mut files = Vec::new();
        let mut folders = vec![std::path::PathBuf::from(dir)];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(folder).expect("examples") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    folders.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        let mut specs = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(file).expect("read");
            for document in
                crate::yaml::documents(&text).unwrap_or_else(|e| panic!("{}", e.message))
            {
                let kind = document.value["kind"]
                    .as_str()
                    .and_then(Kind::parse)
                    .expect("kind");
                specs.push((kind, document.value["spec"].clone()));
            }
        }
        assert!(specs.len() >= 10, "{}", specs.len());
        let replacements = [
            Value::Null,
            Value::from(true),
            Value::from(0),
            Value::from(7),
            Value::from(-1),
            Value::from(70_000),
            Value::from(5_000_000_000_i64),
            Value::from(1.5),
            Value::from(""),
            Value::from("x"),
            Value::from("5s"),
            Value::from("127.0.0.1:80"),
            Value::from("leastRequest"),
            Value::from("reset"),
            serde_json::json!([]),
            serde_json::json!(["x"]),
            serde_json::json!({}),
            serde_json::json!({ "prefix": "/v1" }),
            serde_json::json!({ "name": "x" }),
        ];
        let mut cases = 0;
        for (kind, spec) in &specs {
            let schema = kind.spec_schema().to_value();
            let mut at = Vec::new();
            pointers(spec, String::new(), &mut at);
            let mut variants = vec![spec.clone()];
            for pointer in &at {
                for replacement in &replacements {
                    let mut spoiled = spec.clone();
                    *spoiled.pointer_mut(pointer).expect("node") = replacement.clone();
                    variants.push(spoiled);
                }
                let Some(Value::Object(fields)) = spec.pointer(pointer) else {
                    continue;
                };
                let mut spoiled = spec.clone();
                if let Some(Value::Object(spoiled_fields)) = spoiled.pointer_mut(pointer) {
                    spoiled_fields.insert("bogus".into(), Value::from(1));
                }
                variants.push(spoiled);
                for key in fields.keys() {
                    let mut without = spec.clone();
                    if let Some(Value::Object(fields)) = without.pointer_mut(pointer) {
                        fields.shift_remove(key);
                    }
                    variants.push(without);
                }
            }
            for variant in variants {
                let mut value = variant.clone();
                let validation = validate(&schema, &mut value, &FieldPath::root().key("spec"));
                let schema_takes = validation.problems.is_empty();
                // serde also takes a struct written as a list of its field
                // values in order; the format has no such thing.
                let struct_as_list = !schema_takes
                    && validation
                        .problems
                        .iter()
                        .all(|(_, m)| m == "invalid type: sequence, expected a mapping");
                assert_eq!(
                    schema_takes || (struct_as_list && serde_takes(*kind, &variant)),
                    serde_takes(*kind, &variant),
                    "{kind}: {variant}\\nproblems: {:?}",
                    validation.problems
                );
                // What is left once the wrong values are taken out is a
                // spec serde takes.
                if validation.usable {
                    assert!(
                        serde_takes(*kind, &value),
                        "{kind}: {variant}\\nleft: {value}"
                    );
                }
                cases += 1;
            }
        }
        assert!(cases > 1000, "{cases}");
    }
}

//! The Kubernetes CustomResourceDefinitions of the config kinds: one
//! `apiextensions.k8s.io/v1` CRD per [`Kind`], in the group and version of
//! [`API_VERSION`], so that the documents of a config directory apply to a
//! cluster unchanged. Each CRD's schema is the kind's
//! [`Kind::spec_schema`], turned into the *structural* schema Kubernetes
//! requires (every node typed, no references, no `additionalProperties`
//! beside `properties`, unions told as Kubernetes tells them).
//!
//! `deploy/kubernetes/base/crds.yaml` is these definitions, written by
//! `INFERMESH_UPDATE_CRDS=1 cargo test -p infermesh-api --test crds`.

use serde_json::{Map, Value, json};

use crate::{API_VERSION, Kind};

/// The API group of every kind (`infermesh.io`, the part of
/// [`API_VERSION`] before the `/`).
pub const GROUP: &str = "infermesh.io";

/// The version of every kind (`v1alpha1`, the part of [`API_VERSION`]
/// after the `/`).
pub const VERSION: &str = "v1alpha1";

/// The category every kind is in: `kubectl get infermesh` lists them all.
pub const CATEGORY: &str = "infermesh";

/// A duration as [`crate::Duration`] parses it (humantime's units, and a
/// bare `0`), for the API server, which knows only Go's durations under
/// `format: duration` (it would refuse `2days` and take `-5s`). Looser
/// than the parser (it does not check for overflow), never stricter, but
/// for whitespace other than ASCII's, which Go's `\s` does not match.
pub const DURATION_PATTERN: &str = r"^\s*(0|([0-9][0-9\s]*(\.[0-9\s]*)?(nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|months|month|M|years|year|yrs|yr|y)\s*)+)\s*$";

/// How a kind is named in the Kubernetes API, and what `kubectl get`
/// shows of it.
struct Names {
    plural: &'static str,
    short: &'static [&'static str],
    description: &'static str,
    /// `(name, JSONPath, description)`; every column is a string but Age.
    columns: &'static [(&'static str, &'static str, &'static str)],
}

fn names(kind: Kind) -> Names {
    match kind {
        Kind::Listener => Names {
            plural: "listeners",
            short: &["iml"],
            description: "An address the proxies accept client connections on, the HTTP versions they speak there, mutual TLS with their clients and, for a sidecar, which side of the pod's traffic it captures.",
            columns: &[
                ("Address", ".spec.address", "The socket the proxy binds."),
                (
                    "Capture",
                    ".spec.capture",
                    "The side of a pod's traffic a sidecar captures here (inbound or outbound); empty for an ordinary listener.",
                ),
            ],
        },
        Kind::Backend => Names {
            plural: "backends",
            short: &["imb"],
            description: "A set of model-server endpoints, how the proxies connect to them (protocol, mutual TLS, pool), and how they spread and protect the load (balancing, circuit breaker, outlier detection, health checks).",
            columns: &[(
                "Protocol",
                ".spec.protocol",
                "HTTP version to the endpoints; empty means http1.",
            )],
        },
        Kind::Route => Names {
            plural: "routes",
            short: &["imr"],
            description: "Which requests go to which backends, and the rules of their journey: timeouts, retries, hedging, mirroring, rate limits and fan-out to several models.",
            columns: &[
                (
                    "Hostnames",
                    ".spec.hostnames",
                    "The hosts it matches; empty: every host.",
                ),
                (
                    "Listeners",
                    ".spec.listeners",
                    "The listeners it is attached to.",
                ),
            ],
        },
        Kind::AuthorizationPolicy => Names {
            plural: "authorizationpolicies",
            short: &["imap"],
            description: "Who may call what: requests allowed or denied by the caller's SPIFFE identity or namespace and by the request's path, method and port.",
            columns: &[
                (
                    "Action",
                    ".spec.action",
                    "allow or deny; empty means allow.",
                ),
                (
                    "Listeners",
                    ".spec.listeners",
                    "The listeners it applies to.",
                ),
            ],
        },
        Kind::Sidecar => Names {
            plural: "sidecars",
            short: &["imsc"],
            description: "Which backends the sidecars of some workloads are told about (their egress), as Istio's Sidecar resource narrows a sidecar's config.",
            columns: &[(
                "Egress",
                ".spec.egress",
                "The backends the selected sidecars are told about.",
            )],
        },
    }
}

/// The CustomResourceDefinition of every kind, in the order of
/// [`Kind::ALL`].
///
/// # Panics
///
/// When a kind's schema uses a JSON Schema keyword or shape that the
/// conversion to a structural schema does not know ([`structural_schema`]).
pub fn custom_resource_definitions() -> Vec<Value> {
    Kind::ALL
        .into_iter()
        .map(custom_resource_definition)
        .collect()
}

/// The `apiextensions.k8s.io/v1` CustomResourceDefinition of `kind`:
/// namespaced, in [`GROUP`] at [`VERSION`] (served and stored), with no
/// subresources. Its schema requires `spec`, whose schema is
/// [`structural_schema`] of the kind's [`Kind::spec_schema`].
///
/// # Panics
///
/// As [`custom_resource_definitions`].
pub fn custom_resource_definition(kind: Kind) -> Value {
    let names = names(kind);
    let spec = structural_schema(&kind.spec_schema().to_value());
    let mut columns: Vec<Value> = names
        .columns
        .iter()
        .map(|(name, path, description)| {
            json!({
                "name": name,
                "type": "string",
                "jsonPath": path,
                "description": description,
            })
        })
        .collect();
    columns.push(json!({
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }));
    let singular = kind.as_str().to_ascii_lowercase();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{GROUP}", names.plural),
            "labels": {
                "app.kubernetes.io/name": "infermesh",
                "app.kubernetes.io/part-of": "infermesh",
            },
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.as_str(),
                "listKind": format!("{}List", kind.as_str()),
                "plural": names.plural,
                "singular": singular,
                "shortNames": names.short,
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "additionalPrinterColumns": columns,
                "schema": {
                    "openAPIV3Schema": {
                        "description": names.description,
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "apiVersion": {
                                "description": format!("The versioned schema of this representation of an object: {API_VERSION}."),
                                "type": "string",
                            },
                            "kind": {
                                "description": format!("The kind of resource: {}.", kind.as_str()),
                                "type": "string",
                            },
                            "metadata": { "type": "object" },
                            "spec": spec,
                        },
                    },
                },
            }],
        },
    })
}

/// `schema`, a JSON Schema derived by schemars (draft 2020-12), as a
/// Kubernetes structural schema that takes the same documents:
///
/// - `$ref`s are replaced by what they point to (`$defs` go);
/// - every node has a `type`; `type: [T, "null"]` and an `anyOf` with a
///   `null` branch (an `Option<T>`) become `type: T` with
///   `nullable: true`;
/// - `oneOf` / `anyOf` of `const` strings (an enum) become `enum`, each
///   value's description listed in the node's; for an optional enum
///   `nullable` is left out, because the API server checks a null against
///   the `enum` and would refuse it, while it drops a null of a field
///   that is not nullable, which is what leaving the field out means;
/// - a `oneOf` of mappings of one required field each (an enum with
///   data: `{ prefix: /v1 }`) becomes one mapping with all those fields
///   and a `oneOf` that requires exactly one of them;
/// - a `oneOf` / `anyOf` of other shapes becomes
///   `x-kubernetes-int-or-string` when its branches are an integer and a
///   string, and `x-kubernetes-preserve-unknown-fields` otherwise (the
///   loader still checks the value);
/// - `additionalProperties: false` goes (the API server prunes unknown
///   fields, and `kubectl apply` refuses them); a map keeps its
///   `additionalProperties` schema;
/// - integer formats (`uint32`...) become `minimum`/`maximum`, format
///   `duration` becomes [`DURATION_PATTERN`], and other formats go (the
///   API server does not know them);
/// - `default` goes, told in the description instead (`Defaults to
///   5s.`): the binaries apply defaults, so that a default changed in a
///   release reaches the resources stored before it;
/// - `examples` becomes `example` (its first); `title`, `$schema` and
///   `const` go.
///
/// # Panics
///
/// On a keyword or a shape it does not know, or a recursive `$ref`: the
/// conversion must be taught what Kubernetes makes of it, rather than
/// write a schema the API server refuses.
pub fn structural_schema(schema: &Value) -> Value {
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let converter = Converter { defs };
    Value::Object(converter.node(&object(schema, "(root)"), "(root)", 0))
}

/// The keywords copied as they are, in the order they are written.
const COPIED: [&str; 9] = [
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
];

/// How deep `$ref`s may nest before the schema is taken for recursive.
const MAX_DEPTH: usize = 64;

/// Turns schemars' nodes into structural ones, `$ref`s resolved against
/// the root schema's `$defs`.
struct Converter {
    defs: Map<String, Value>,
}

fn object(value: &Value, at: &str) -> Map<String, Value> {
    match value {
        Value::Object(fields) => fields.clone(),
        Value::Bool(true) => Map::new(),
        other => panic!(
            "{at}: a schema that is not an object ({other}); api/src/crd.rs cannot turn it into a structural schema"
        ),
    }
}

impl Converter {
    /// `schema` with its `$ref` replaced by the definition (the keywords
    /// beside the `$ref`, a description, winning).
    fn resolved(&self, schema: &Map<String, Value>, at: &str, depth: usize) -> Map<String, Value> {
        let Some(reference) = schema.get("$ref") else {
            return schema.clone();
        };
        assert!(
            depth < MAX_DEPTH,
            "{at}: a recursive type; a structural schema cannot describe it"
        );
        let name = reference
            .as_str()
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .unwrap_or_else(|| panic!("{at}: a $ref outside #/$defs: {reference}"));
        let target = self
            .defs
            .get(name)
            .unwrap_or_else(|| panic!("{at}: $ref to an unknown definition {name}"));
        let mut merged = self.resolved(&object(target, at), at, depth + 1);
        for (key, value) in schema {
            if key != "$ref" {
                merged.insert(key.clone(), value.clone());
            }
        }
        merged
    }

    /// The structural form of `schema`, found at `at` (for messages),
    /// below `depth` `$ref`s.
    fn node(&self, schema: &Map<String, Value>, at: &str, depth: usize) -> Map<String, Value> {
        // Every `$ref` on the way down counts, so that a recursive type
        // ends here rather than in a stack overflow.
        let depth = depth + usize::from(schema.contains_key("$ref"));
        let schema = self.resolved(schema, at, depth);
        if schema.contains_key("oneOf") || schema.contains_key("anyOf") {
            return self.alternatives(&schema, at, depth);
        }
        let mut out = Map::new();
        let mut nullable = false;
        let ty = match schema.get("type") {
            Some(Value::String(ty)) => ty.clone(),
            Some(Value::Array(types)) => {
                let named: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
                nullable = named.contains(&"null");
                match named.iter().filter(|t| **t != "null").collect::<Vec<_>>()[..] {
                    [one] => (*one).to_owned(),
                    _ => panic!(
                        "{at}: a node of several types {named:?}; teach api/src/crd.rs its structural form"
                    ),
                }
            }
            None if schema.contains_key("properties") => "object".to_owned(),
            _ => panic!("{at}: a node without a type; teach api/src/crd.rs its structural form"),
        };
        let mut enum_values = None;
        if let Some(constant) = schema.get("const") {
            enum_values = Some(vec![constant.clone()]);
        }
        if let Some(Value::Array(values)) = schema.get("enum") {
            // A null among the values is the node's nullability, which an
            // enum cannot have (see `structural_schema`).
            enum_values = Some(values.iter().filter(|v| !v.is_null()).cloned().collect());
        }
        if enum_values.is_some() {
            nullable = false;
        }
        out.insert(
            "description".into(),
            Value::Null, // placeholder, keeps the description first
        );
        out.insert("type".into(), Value::String(ty.clone()));
        if nullable {
            out.insert("nullable".into(), true.into());
        }
        if let Some(values) = enum_values {
            out.insert("enum".into(), Value::Array(values));
        }
        for key in COPIED {
            if let Some(value) = schema.get(key) {
                out.insert(key.into(), value.clone());
            }
        }
        match schema.get("format").and_then(Value::as_str) {
            None => {}
            Some("duration") => {
                out.insert("pattern".into(), DURATION_PATTERN.into());
            }
            Some(format) => {
                if let Some((min, max)) = integer_bounds(format) {
                    out.entry("minimum").or_insert(min.into());
                    if let Some(max) = max {
                        out.entry("maximum").or_insert(max.into());
                    }
                }
                // Other formats (`double`, `float`) say nothing the type
                // does not.
            }
        }
        if let Some(required) = schema.get("required") {
            out.insert("required".into(), required.clone());
        }
        if let Some(Value::Object(properties)) = schema.get("properties") {
            let converted: Map<String, Value> = properties
                .iter()
                .map(|(name, property)| {
                    let here = format!("{at}.{name}");
                    let node = self.node(&object(property, &here), &here, depth);
                    (name.clone(), Value::Object(node))
                })
                .collect();
            out.insert("properties".into(), Value::Object(converted));
        }
        match schema.get("additionalProperties") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => {
                out.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
            }
            Some(additional) => {
                assert!(
                    !schema.contains_key("properties"),
                    "{at}: properties and an additionalProperties schema together are not structural"
                );
                let here = format!("{at}.*");
                let node = self.node(&object(additional, &here), &here, depth);
                out.insert("additionalProperties".into(), Value::Object(node));
            }
        }
        if let Some(items) = schema.get("items") {
            let here = format!("{at}[]");
            let node = self.node(&object(items, &here), &here, depth);
            out.insert("items".into(), Value::Object(node));
        } else if ty == "array" {
            panic!("{at}: an array without `items` is not structural");
        }
        if let Some(example) = schema
            .get("examples")
            .and_then(Value::as_array)
            .and_then(|examples| examples.first())
        {
            out.insert("example".into(), example.clone());
        }
        for key in schema.keys() {
            let known = matches!(
                key.as_str(),
                "$schema"
                    | "$defs"
                    | "title"
                    | "description"
                    | "default"
                    | "examples"
                    | "type"
                    | "const"
                    | "enum"
                    | "format"
                    | "required"
                    | "properties"
                    | "additionalProperties"
                    | "items"
            ) || COPIED.contains(&key.as_str());
            assert!(
                known,
                "{at}: the keyword `{key}` is not known to api/src/crd.rs; teach it what Kubernetes makes of it"
            );
        }
        set_description(&mut out, describe(&schema, None, &[]));
        out
    }

    /// A `oneOf` / `anyOf` (see [`structural_schema`]).
    fn alternatives(
        &self,
        schema: &Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Map<String, Value> {
        for key in schema.keys() {
            assert!(
                matches!(
                    key.as_str(),
                    "oneOf" | "anyOf" | "description" | "default" | "$schema" | "title"
                ),
                "{at}: `{key}` beside a oneOf/anyOf is not known to api/src/crd.rs"
            );
        }
        let mut options = Vec::new();
        let mut inner_description = None;
        self.flatten(schema, at, depth, &mut options, &mut inner_description);
        let null = options
            .iter()
            .any(|o| o.get("type") == Some(&Value::from("null")));
        options.retain(|o| o.get("type") != Some(&Value::from("null")));
        let description = schema
            .get("description")
            .and_then(Value::as_str)
            .or(inner_description.as_deref());
        let mut described = Map::new();
        if let Some(description) = description {
            described.insert("description".into(), description.into());
        }
        if let Some(default) = schema.get("default") {
            described.insert("default".into(), default.clone());
        }

        let constants: Option<Vec<(Value, Option<String>)>> = options
            .iter()
            .map(|o| {
                let text = o
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                match (o.get("const"), o.get("enum")) {
                    (Some(c @ Value::String(_)), None) => Some(vec![(c.clone(), text)]),
                    (None, Some(Value::Array(values))) if values.iter().all(Value::is_string) => {
                        Some(values.iter().map(|v| (v.clone(), text.clone())).collect())
                    }
                    _ => None,
                }
            })
            .collect::<Option<Vec<_>>>()
            .map(|lists| lists.into_iter().flatten().collect());
        if let Some(constants) = constants {
            let mut out = Map::new();
            out.insert("description".into(), Value::Null);
            out.insert("type".into(), "string".into());
            out.insert(
                "enum".into(),
                constants.iter().map(|(v, _)| v.clone()).collect(),
            );
            set_description(&mut out, describe(&described, None, &constants));
            return out;
        }

        let tagged: Option<Vec<(String, Map<String, Value>)>> = options
            .iter()
            .map(|o| single_field(o).map(|name| (name, o.clone())))
            .collect();
        if let Some(tagged) = tagged.filter(|t| !t.is_empty()) {
            let mut properties = Map::new();
            let mut branches = Vec::new();
            for (name, option) in &tagged {
                let here = format!("{at}.{name}");
                let field = object(&option["properties"][name], &here);
                let mut node = self.node(&field, &here, depth);
                // The variant's description tells what the field means.
                let variant = option.get("description").and_then(Value::as_str);
                let own = node.get("description").and_then(Value::as_str);
                let text = match (variant, own) {
                    (Some(v), Some(o)) => Some(format!("{v}\n\n{o}")),
                    (v, o) => v.or(o).map(str::to_owned),
                };
                node.remove("description");
                let mut described = Map::new();
                if let Some(text) = text {
                    described.insert("description".into(), text.into());
                }
                described.extend(node);
                properties.insert(name.clone(), Value::Object(described));
                branches.push(json!({ "required": [name] }));
            }
            let names: Vec<String> = tagged.iter().map(|(n, _)| format!("`{n}`")).collect();
            let mut out = Map::new();
            out.insert("description".into(), Value::Null);
            out.insert("type".into(), "object".into());
            if null {
                out.insert("nullable".into(), true.into());
            }
            out.insert("properties".into(), Value::Object(properties));
            out.insert("oneOf".into(), Value::Array(branches));
            let exactly = format!("Exactly one of {}.", names.join(", "));
            set_description(&mut out, describe(&described, Some(&exactly), &[]));
            return out;
        }

        if let [only] = &options[..] {
            let mut merged = only.clone();
            merged.extend(described);
            let mut out = self.node(&merged, at, depth);
            if null && !out.contains_key("enum") {
                out.insert("nullable".into(), true.into());
            }
            return out;
        }

        let types: Vec<&str> = options
            .iter()
            .filter_map(|o| o.get("type").and_then(Value::as_str))
            .collect();
        let mut out = Map::new();
        out.insert("description".into(), Value::Null);
        if types.len() == options.len()
            && types.iter().all(|t| matches!(*t, "integer" | "string"))
            && types.contains(&"integer")
            && types.contains(&"string")
        {
            out.insert("x-kubernetes-int-or-string".into(), true.into());
        } else {
            out.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
        }
        if null {
            out.insert("nullable".into(), true.into());
        }
        set_description(&mut out, describe(&described, None, &[]));
        out
    }

    /// The branches of nested `oneOf` / `anyOf`, `$ref`s resolved; the
    /// first description of a nested one (the type's, where the outer one
    /// is the field's) in `description`.
    fn flatten(
        &self,
        schema: &Map<String, Value>,
        at: &str,
        depth: usize,
        out: &mut Vec<Map<String, Value>>,
        description: &mut Option<String>,
    ) {
        for key in ["oneOf", "anyOf"] {
            for option in schema
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let option = self.resolved(&object(option, at), at, depth);
                if option.contains_key("oneOf") || option.contains_key("anyOf") {
                    if description.is_none() {
                        *description = option
                            .get("description")
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                    }
                    self.flatten(&option, at, depth, out, description);
                } else {
                    out.push(option);
                }
            }
        }
    }
}

/// The one field of a mapping of one required field (an enum variant with
/// data).
fn single_field(schema: &Map<String, Value>) -> Option<String> {
    let properties = schema.get("properties")?.as_object()?;
    let required = schema.get("required")?.as_array()?;
    match (
        properties.keys().next(),
        properties.len(),
        required.as_slice(),
    ) {
        (Some(name), 1, [only]) if only == name => Some(name.clone()),
        _ => None,
    }
}

/// The smallest and largest value of an integer format, when it has them.
fn integer_bounds(format: &str) -> Option<(i64, Option<i64>)> {
    Some(match format {
        "uint8" => (0, Some(u8::MAX.into())),
        "uint16" => (0, Some(u16::MAX.into())),
        "uint32" => (0, Some(u32::MAX.into())),
        "uint64" | "uint" => (0, None),
        "int8" => (i8::MIN.into(), Some(i8::MAX.into())),
        "int16" => (i16::MIN.into(), Some(i16::MAX.into())),
        "int32" => (i32::MIN.into(), Some(i32::MAX.into())),
        _ => return None,
    })
}

/// The description of a node: its own, a line more, the values of an
/// enum with theirs, and its default.
fn describe(
    schema: &Map<String, Value>,
    more: Option<&str>,
    values: &[(Value, Option<String>)],
) -> Option<String> {
    let mut paragraphs: Vec<String> = Vec::new();
    if let Some(text) = schema.get("description").and_then(Value::as_str) {
        paragraphs.push(text.trim().to_owned());
    }
    if let Some(more) = more {
        paragraphs.push(more.to_owned());
    }
    if values.iter().any(|(_, text)| text.is_some()) {
        let list: Vec<String> = values
            .iter()
            .map(|(value, text)| {
                let name = value.as_str().unwrap_or_default();
                match text {
                    Some(text) => format!("- `{name}`: {}", text.trim().replace('\n', "\n  ")),
                    None => format!("- `{name}`"),
                }
            })
            .collect();
        paragraphs.push(list.join("\n"));
    }
    if let Some(default) = schema.get("default").and_then(default_text) {
        paragraphs.push(format!("Defaults to `{default}`."));
    }
    (!paragraphs.is_empty()).then(|| paragraphs.join("\n\n"))
}

/// A default as YAML users write it; `None` for the ones that say nothing
/// a field's description does not (an empty list or map, an object whose
/// fields tell their own).
fn default_text(default: &Value) -> Option<String> {
    match default {
        Value::String(text) => Some(text.clone()),
        Value::Bool(_) | Value::Number(_) => Some(default.to_string()),
        Value::Array(items) if !items.is_empty() => {
            let items: Option<Vec<String>> = items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Some(text.clone()),
                    Value::Bool(_) | Value::Number(_) => Some(item.to_string()),
                    _ => None,
                })
                .collect();
            items.map(|items| format!("[{}]", items.join(", ")))
        }
        _ => None,
    }
}

/// Fills the description placeholder of `out`, or takes it out.
fn set_description(out: &mut Map<String, Value>, description: Option<String>) {
    match description {
        Some(text) => {
            out.insert("description".into(), text.into());
        }
        None => {
            out.shift_remove("description");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every problem that makes `schema` (at `at`) other than a
    /// structural schema Kubernetes takes: a node without a type, a
    /// keyword Kubernetes refuses or does not know, `properties` beside
    /// `additionalProperties`, an array without `items`, a junctor
    /// (`oneOf`...) that sets a type, a description, a default or a field
    /// the node does not specify, an enum value of another type, a
    /// pattern that does not compile.
    fn problems(schema: &Value, at: &str, out: &mut Vec<String>) {
        let Some(node) = schema.as_object() else {
            out.push(format!("{at}: not an object"));
            return;
        };
        const ALLOWED: [&str; 20] = [
            "description",
            "type",
            "nullable",
            "enum",
            "pattern",
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "minItems",
            "maxItems",
            "minProperties",
            "maxProperties",
            "required",
            "properties",
            "additionalProperties",
            "items",
            "oneOf",
            "example",
            "x-kubernetes-int-or-string",
        ];
        for key in node.keys() {
            if !ALLOWED.contains(&key.as_str()) && key != "x-kubernetes-preserve-unknown-fields" {
                out.push(format!("{at}: keyword `{key}`"));
            }
        }
        let ty = node.get("type").and_then(Value::as_str);
        let open = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
            || node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        match ty {
            Some("object" | "array" | "string" | "integer" | "number" | "boolean") => {}
            None if open => {}
            other => out.push(format!("{at}: type {other:?}")),
        }
        if node.contains_key("properties") && node.contains_key("additionalProperties") {
            out.push(format!("{at}: properties beside additionalProperties"));
        }
        if ty == Some("array") && !node.contains_key("items") {
            out.push(format!("{at}: an array without items"));
        }
        for value in node
            .get("enum")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let fits = match ty {
                Some("string") => value.is_string(),
                Some("integer") => value.is_i64() || value.is_u64(),
                Some("number") => value.is_number(),
                Some("boolean") => value.is_boolean(),
                _ => false,
            };
            if !fits {
                out.push(format!("{at}: enum value {value} is not a {ty:?}"));
            }
        }
        if let Some(pattern) = node.get("pattern") {
            let compiles = pattern
                .as_str()
                .is_some_and(|p| regex::Regex::new(p).is_ok());
            if !compiles {
                out.push(format!("{at}: pattern {pattern} does not compile"));
            }
        }
        let properties = node.get("properties").and_then(Value::as_object);
        for branch in node
            .get("oneOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(branch) = branch.as_object() else {
                out.push(format!("{at}: a oneOf branch that is not an object"));
                continue;
            };
            for (key, value) in branch {
                match key.as_str() {
                    "required" => {
                        for name in value.as_array().into_iter().flatten() {
                            let specified = name
                                .as_str()
                                .is_some_and(|n| properties.is_some_and(|p| p.contains_key(n)));
                            if !specified {
                                out.push(format!("{at}: a oneOf branch requires {name}, which the node does not specify"));
                            }
                        }
                    }
                    other => out.push(format!("{at}: `{other}` in a oneOf branch")),
                }
            }
        }
        for (name, property) in properties.into_iter().flatten() {
            problems(property, &format!("{at}.{name}"), out);
        }
        if let Some(additional) = node.get("additionalProperties") {
            problems(additional, &format!("{at}.*"), out);
        }
        if let Some(items) = node.get("items") {
            problems(items, &format!("{at}[]"), out);
        }
    }

    fn schema_of(crd: &Value) -> &Value {
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    }

    /// The checker finds what is wrong with a schema as schemars derives
    /// it, so that its silence on the CRDs means something.
    #[test]
    fn the_checker_refuses_the_derived_schemas() {
        for kind in Kind::ALL {
            let mut found = Vec::new();
            problems(&kind.spec_schema().to_value(), "spec", &mut found);
            assert!(
                found
                    .iter()
                    .any(|p| p.contains("keyword `additionalProperties`")
                        || p.contains("properties beside")),
                "{kind}: {found:?}"
            );
        }
        let mut found = Vec::new();
        problems(&Kind::Route.spec_schema().to_value(), "spec", &mut found);
        for expected in [
            "`const` in a oneOf branch",
            "keyword `default`",
            "keyword `format`",
            "type None",
        ] {
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "{expected}: {found:?}"
            );
        }
    }

    #[test]
    fn every_crd_has_a_structural_schema() {
        for crd in custom_resource_definitions() {
            let schema = schema_of(&crd);
            let mut found = Vec::new();
            problems(schema, "", &mut found);
            assert!(found.is_empty(), "{}: {found:#?}", crd["metadata"]["name"]);
            assert_eq!(
                schema["properties"]["metadata"],
                json!({ "type": "object" })
            );
            assert_eq!(schema["required"], json!(["spec"]));
        }
    }

    #[test]
    fn the_crds_name_the_kinds_as_the_config_does() {
        assert_eq!(format!("{GROUP}/{VERSION}"), API_VERSION);
        let crds = custom_resource_definitions();
        let plurals: Vec<&str> = crds
            .iter()
            .map(|crd| crd["spec"]["names"]["plural"].as_str().unwrap())
            .collect();
        assert_eq!(
            plurals,
            [
                "listeners",
                "backends",
                "routes",
                "authorizationpolicies",
                "sidecars"
            ]
        );
        for (crd, kind) in crds.iter().zip(Kind::ALL) {
            let names = &crd["spec"]["names"];
            assert_eq!(names["kind"], kind.as_str());
            assert_eq!(names["singular"], kind.as_str().to_ascii_lowercase());
            assert_eq!(
                crd["metadata"]["name"],
                format!("{}.{GROUP}", names["plural"].as_str().unwrap())
            );
            assert_eq!(crd["spec"]["scope"], "Namespaced");
            let version = &crd["spec"]["versions"][0];
            assert_eq!(version["name"], VERSION);
            assert!(version.get("subresources").is_none());
        }
        let short: Vec<&Value> = crds
            .iter()
            .flat_map(|crd| crd["spec"]["names"]["shortNames"].as_array().unwrap())
            .collect();
        let mut unique = short.clone();
        unique.sort_by_key(|v| v.to_string());
        unique.dedup();
        assert_eq!(unique.len(), short.len(), "{short:?}");
    }

    #[test]
    fn enums_options_and_tagged_unions_become_their_kubernetes_forms() {
        let listener = custom_resource_definition(Kind::Listener);
        let spec = &schema_of(&listener)["properties"]["spec"];
        let protocol = &spec["properties"]["protocol"];
        assert_eq!(protocol["type"], "string");
        assert_eq!(protocol["enum"], json!(["http", "http1", "http2"]));
        let text = protocol["description"].as_str().unwrap();
        assert!(text.contains("- `http1`: HTTP/1.x only."), "{text}");
        assert!(text.ends_with("Defaults to `http`."), "{text}");
        // An optional enum: a null is dropped by the API server, as the
        // loader reads it (absent).
        let capture = &spec["properties"]["capture"];
        assert_eq!(capture["enum"], json!(["inbound", "outbound"]));
        assert!(capture.get("nullable").is_none());
        // An optional object.
        let tls = &spec["properties"]["tls"];
        assert_eq!(tls["type"], "object");
        assert_eq!(tls["nullable"], true);
        let port = &tls["properties"]["ports"]["items"]["properties"]["port"];
        assert_eq!(
            (port["minimum"].as_i64(), port["maximum"].as_i64()),
            (Some(0), Some(65535))
        );
        assert_eq!(spec["properties"]["address"]["example"], "0.0.0.0:8080");
        let timeout = &spec["properties"]["limits"]["properties"]["idleTimeout"];
        assert_eq!(timeout["pattern"], DURATION_PATTERN);

        let route = custom_resource_definition(Kind::Route);
        let rule = &schema_of(&route)["properties"]["spec"]["properties"]["rules"]["items"];
        let path = &rule["properties"]["matches"]["items"]["properties"]["path"];
        assert_eq!(path["type"], "object");
        assert_eq!(path["nullable"], true);
        assert_eq!(
            path["oneOf"],
            json!([{ "required": ["exact"] }, { "required": ["prefix"] }, { "required": ["regex"] }])
        );
        assert_eq!(path["properties"]["prefix"]["type"], "string");
        assert!(
            path["properties"]["prefix"]["description"]
                .as_str()
                .unwrap()
                .starts_with("The path starts with"),
            "{path}"
        );
        let on = &rule["properties"]["retry"]["properties"]["on"];
        assert!(
            on["description"]
                .as_str()
                .unwrap()
                .contains("Defaults to `[connect-failure, refused-stream, reset, gateway-error]`.")
        );
    }

    #[test]
    fn untagged_unions_are_left_open_as_precisely_as_kubernetes_allows() {
        let int_or_string = structural_schema(&json!({
            "description": "A port by number or name.",
            "anyOf": [{ "type": "integer" }, { "type": "string" }],
        }));
        assert_eq!(
            int_or_string,
            json!({ "description": "A port by number or name.", "x-kubernetes-int-or-string": true })
        );
        let anything = structural_schema(&json!({
            "anyOf": [{ "type": "string" }, { "type": "object", "properties": { "a": { "type": "string" } } }, { "type": "null" }],
        }));
        assert_eq!(
            anything,
            json!({ "x-kubernetes-preserve-unknown-fields": true, "nullable": true })
        );
        let referenced = structural_schema(&json!({
            "type": "object",
            "properties": { "a": { "$ref": "#/$defs/A", "description": "The a." } },
            "$defs": { "A": { "type": ["integer", "null"], "format": "uint8" } },
        }));
        assert_eq!(
            referenced,
            json!({ "type": "object", "properties": { "a": {
                "description": "The a.", "type": "integer", "nullable": true, "minimum": 0, "maximum": 255,
            } } })
        );
    }

    #[test]
    #[should_panic(expected = "recursive type")]
    fn a_recursive_type_is_refused() {
        structural_schema(&json!({
            "$ref": "#/$defs/Tree",
            "$defs": { "Tree": { "type": "object", "properties": { "children": { "type": "array", "items": { "$ref": "#/$defs/Tree" } } } } },
        }));
    }

    #[test]
    #[should_panic(expected = "keyword `patternProperties`")]
    fn an_unknown_keyword_is_refused() {
        structural_schema(
            &json!({ "type": "object", "patternProperties": { "^a": { "type": "string" } } }),
        );
    }

    /// The pattern takes every duration the parser takes, and refuses
    /// what it refuses that a pattern can tell.
    #[test]
    fn the_duration_pattern_takes_what_the_parser_takes() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        let units = [
            "nanos", "nsec", "ns", "usec", "us", "µs", "millis", "msec", "ms", "seconds", "second",
            "secs", "sec", "s", "minutes", "minute", "mins", "min", "m", "hours", "hour", "hrs",
            "hr", "h", "days", "day", "d", "weeks", "week", "wks", "wk", "w", "months", "month",
            "M", "years", "year", "yrs", "yr", "y",
        ];
        let mut taken = vec![
            "0".to_owned(),
            " 0 ".to_owned(),
            "1h30m".to_owned(),
            "1h 30m".to_owned(),
            "1.5h".to_owned(),
            "2 days".to_owned(),
            "1s500ms".to_owned(),
        ];
        for unit in units {
            taken.push(format!("3{unit}"));
            taken.push(format!("10 {unit} 5s"));
        }
        for text in &taken {
            assert!(
                text.parse::<crate::Duration>().is_ok(),
                "the parser refuses {text:?}"
            );
            assert!(pattern.is_match(text), "the pattern refuses {text:?}");
        }
        for text in [
            "", "5", "-5s", "thirty", "5 sex", "s", "5s-", "1,5h", "0x10s", "∞",
        ] {
            assert!(
                text.parse::<crate::Duration>().is_err(),
                "the parser takes {text:?}"
            );
            assert!(!pattern.is_match(text), "the pattern takes {text:?}");
        }
    }
}

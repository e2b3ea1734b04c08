//! `docs/configuration.md` kept true against the types: every field of every
//! kind's spec is documented there, the page documents no field the types do
//! not have, and every default the page gives is the default the types give.
//!
//! The fields come from each kind's JSON Schema ([`Kind::spec_schema`]),
//! which schemars derives from the serde types themselves (their camelCase
//! renames, their `default` attributes and `Default` impls), so a field
//! added, renamed or removed, or a default changed, fails this test until
//! the page says so too.
//!
//! How the page is read:
//!
//! - A *field table* is a Markdown table whose header's first cell is
//!   `field` and which has a column headed `default`. Other tables (and all
//!   prose) are not read.
//! - Each row of a field table documents one field. Its first cell is the
//!   field's path in backticks and nothing else: the kind, `.spec`, then the
//!   camelCase field names joined by `.`, with `[]` after a list whose items
//!   are objects: `` `Route.spec.rules[].retry.backoff.base` ``.
//! - The default cell is `required` for a field that must be written (within
//!   its parent, when the parent is given). Otherwise, when it starts with a
//!   code span, that span is the default, written as YAML (`` `5s` ``,
//!   `` `[]` ``, `` `[reset, gateway-error]` ``); anything may follow it. A
//!   cell that starts with anything else (`none`, `off`, `—`) gives no
//!   default value.
//! - Cells are separated by `|`; a `|` inside a cell is written `\|`.
//!
//! The checks, each failure naming the field:
//!
//! - every field of the schema has a row, and every row is a field of the
//!   schema, listed once;
//! - where the schema knows a default, the page gives one and it is equal
//!   (durations compare by length, so `300s` equals `5m`; numbers by value).
//!   An object's default (`retry`, `pool`) is compared member by member
//!   against its members' rows;
//! - a field is `required` on the page exactly when the schema requires it.
//!
//! The page may give a default the schema cannot know (a behaviour when an
//! optional field is left out, e.g. `outsideMesh`); that is not compared.

use std::collections::{BTreeMap, BTreeSet};

use infermesh_api::{Duration, Kind};
use serde_json::Value;

const PAGE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");

fn page() -> String {
    std::fs::read_to_string(PAGE_PATH).unwrap_or_else(|e| panic!("reading {PAGE_PATH}: {e}"))
}

/// One field of a kind's spec, as the schema describes it.
#[derive(Debug)]
struct Field {
    default: Option<Value>,
    required: bool,
    duration: bool,
}

/// Every field of every kind, by path.
fn schema_fields() -> BTreeMap<String, Field> {
    let mut fields = BTreeMap::new();
    for kind in Kind::ALL {
        let schema = kind.spec_schema();
        walk(schema.as_value(), &format!("{kind}.spec"), &mut fields);
    }
    fields
}

/// Records the properties of `schema` (found at `path`) and of everything
/// below it: list items, and the alternatives of `anyOf` / `oneOf` (an
/// `Option` is `anyOf` a type and null; an enum with data is `oneOf` its
/// variants).
fn walk(schema: &Value, path: &str, out: &mut BTreeMap<String, Field>) {
    for (object, alternative) in shapes(schema, false) {
        let required: Vec<&str> = object
            .get("required")
            .and_then(Value::as_array)
            .map(|names| names.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(properties) = object.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                let at = format!("{path}.{name}");
                out.entry(at.clone()).or_insert(Field {
                    default: property.get("default").cloned(),
                    // Of several alternatives (`exact`, `prefix`, `regex`),
                    // each requires its own key, and none is required.
                    required: !alternative && required.contains(&name.as_str()),
                    duration: is_duration(property),
                });
                walk(property, &at, out);
            }
        }
        if let Some(items) = object.get("items") {
            walk(items, &format!("{path}[]"), out);
        }
    }
}

/// `schema` and, recursively, the members of its `anyOf`, `oneOf` and
/// `allOf`, each with whether it is one of several alternatives (members of
/// an `anyOf` or `oneOf` that has more than one non-null member).
fn shapes(schema: &Value, alternative: bool) -> Vec<(&Value, bool)> {
    let mut out = vec![(schema, alternative)];
    for key in ["anyOf", "oneOf", "allOf"] {
        let Some(members) = schema.get(key).and_then(Value::as_array) else {
            continue;
        };
        let non_null = members.iter().filter(|m| !is_null(m)).count();
        let several = key != "allOf" && non_null > 1;
        for member in members.iter().filter(|m| !is_null(m)) {
            out.extend(shapes(member, alternative || several));
        }
    }
    out
}

fn is_null(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("null")
}

fn is_duration(schema: &Value) -> bool {
    shapes(schema, false)
        .iter()
        .any(|(s, _)| s.get("format").and_then(Value::as_str) == Some("duration"))
}

/// What a row's default cell says.
#[derive(Debug)]
enum Documented {
    Required,
    /// The YAML text of the default.
    Value(String),
    /// No default value (`none`, `off`, ...).
    Nothing,
}

#[derive(Debug)]
struct Row {
    line: usize,
    documented: Documented,
}

/// A table being read: whether it is a field table, and its default column.
struct Table {
    field: bool,
    default: Option<usize>,
}

/// The rows of the page's field tables by path, and the problems found in
/// reading them.
fn page_rows(page: &str) -> (BTreeMap<String, Row>, Vec<String>) {
    let mut rows = BTreeMap::new();
    let mut problems = Vec::new();
    let mut table: Option<Table> = None;
    for (i, text) in page.lines().enumerate() {
        let line = i + 1;
        let text = text.trim();
        if !text.starts_with('|') {
            table = None;
            continue;
        }
        let cells = cells(text);
        let Some(current) = &table else {
            // The first line of a table is its header.
            let field = cells[0].eq_ignore_ascii_case("field");
            let default = cells.iter().position(|c| c.eq_ignore_ascii_case("default"));
            if field && default.is_none() {
                problems.push(format!(
                    "line {line}: a field table needs a column headed `default`"
                ));
            }
            table = Some(Table { field, default });
            continue;
        };
        let delimiter = cells.iter().all(|c| c.chars().all(|ch| "-: ".contains(ch)));
        let (true, Some(column), false) = (current.field, current.default, delimiter) else {
            continue;
        };
        let Some((path, "")) = code_span(&cells[0]) else {
            problems.push(format!(
                "line {line}: a field table's row starts with the field's path in backticks, found {:?}",
                cells[0]
            ));
            continue;
        };
        let path = path.to_owned();
        let Some(cell) = cells.get(column) else {
            problems.push(format!("line {line}: `{path}` has no default cell"));
            continue;
        };
        let documented = if cell == "required" {
            Documented::Required
        } else if let Some((value, _)) = code_span(cell) {
            Documented::Value(value.to_owned())
        } else {
            Documented::Nothing
        };
        if let Some(first) = rows.insert(path.clone(), Row { line, documented }) {
            problems.push(format!(
                "line {line}: `{path}` is documented twice (also at line {})",
                first.line
            ));
        }
    }
    (rows, problems)
}

/// The cells of a table row, trimmed, split at `|` but not at `\|`.
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                cells.last_mut().expect("one cell").push('|');
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().expect("one cell").push(c),
        }
    }
    cells.iter().map(|c| c.trim().to_owned()).collect()
}

/// The code span that `text` starts with, and what follows it.
fn code_span(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix('`')?;
    let end = rest.find('`')?;
    Some((&rest[..end], rest[end + 1..].trim()))
}

/// Everything wrong with `page` against the fields of the schema.
fn problems(page: &str, fields: &BTreeMap<String, Field>) -> Vec<String> {
    let (rows, mut problems) = page_rows(page);

    for (path, field) in fields {
        let Some(row) = rows.get(path) else {
            problems.push(format!(
                "`{path}` is a field of the types, and docs/configuration.md has no row for it"
            ));
            continue;
        };
        let at = format!("line {}: `{path}`", row.line);
        match (&row.documented, field.required) {
            (Documented::Required, false) => problems.push(format!(
                "{at} is documented as required, and the types do not require it"
            )),
            (Documented::Value(_) | Documented::Nothing, true) => problems.push(format!(
                "{at} is required by the types; its default cell must say `required`"
            )),
            _ => {}
        }
        if let Some(default) = &field.default {
            check_default(path, default, field.duration, fields, &rows, &mut problems);
        }
    }

    let known: BTreeSet<&str> = fields.keys().map(String::as_str).collect();
    for (path, row) in &rows {
        if !known.contains(path.as_str()) {
            problems.push(format!(
                "line {}: `{path}` is documented, and the types have no such field",
                row.line
            ));
        }
    }
    // A member of an object default is compared both on its own and as part
    // of its parent's default: report each problem once.
    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    problems
}

/// Compares the default the types give the field at `path` with the one its
/// row gives; an object is compared member by member with their rows.
fn check_default(
    path: &str,
    expected: &Value,
    duration: bool,
    fields: &BTreeMap<String, Field>,
    rows: &BTreeMap<String, Row>,
    problems: &mut Vec<String>,
) {
    if let Value::Object(members) = expected {
        for (name, value) in members {
            let member = format!("{path}.{name}");
            let duration = fields.get(&member).is_some_and(|f| f.duration);
            check_default(&member, value, duration, fields, rows, problems);
        }
        return;
    }
    let Some(row) = rows.get(path) else {
        return; // reported as a missing row
    };
    let at = format!("line {}: `{path}`", row.line);
    let Documented::Value(text) = &row.documented else {
        problems.push(format!(
            "{at} has the default `{}` in the types; its default cell must start with it in backticks",
            flow(expected)
        ));
        return;
    };
    match yaml_value(text) {
        Ok(documented) if same(&documented, expected, duration) => {}
        Ok(_) => problems.push(format!(
            "{at}: the page gives the default `{text}`, the types `{}`",
            flow(expected)
        )),
        Err(e) => problems.push(format!("{at}: the default `{text}` is not YAML: {e}")),
    }
}

/// Whether the page's value equals the schema's: numbers by value, and
/// durations by length when the field is a duration.
fn same(documented: &Value, expected: &Value, duration: bool) -> bool {
    match (documented, expected) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(a), Value::String(b)) if duration => {
            match (a.parse::<Duration>(), b.parse::<Duration>()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
        }
        (Value::Number(a), Value::String(b)) if duration => {
            // A bare `0` is a duration of zero.
            a.as_u64() == Some(0) && b.parse::<Duration>() == Ok(Duration::ZERO)
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b, duration))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same(v, w, duration)))
        }
        (a, b) => a == b,
    }
}

/// A value as YAML flow text, the way the page writes defaults.
fn flow(value: &Value) -> String {
    match value {
        Value::String(s) if s.is_empty() => "\"\"".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(flow).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(members) => {
            let members: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{k}: {}", flow(v)))
                .collect();
            format!("{{ {} }}", members.join(", "))
        }
        other => other.to_string(),
    }
}

/// Parses a default as written on the page.
fn yaml_value(text: &str) -> Result<Value, String> {
    use saphyr::{LoadableYamlNode, Yaml};
    let mut docs = Yaml::load_from_str(text).map_err(|e| e.to_string())?;
    if docs.len() != 1 {
        return Err(format!("{} YAML documents", docs.len()));
    }
    to_json(&docs.remove(0))
}

fn to_json(yaml: &saphyr::Yaml<'_>) -> Result<Value, String> {
    use saphyr::{Scalar, Yaml};
    Ok(match yaml {
        Yaml::Value(Scalar::Null) => Value::Null,
        Yaml::Value(Scalar::Boolean(b)) => Value::Bool(*b),
        Yaml::Value(Scalar::Integer(i)) => Value::from(*i),
        Yaml::Value(Scalar::FloatingPoint(f)) => Value::from(f.into_inner()),
        Yaml::Value(Scalar::String(s)) => Value::String(s.to_string()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Mapping(entries) => {
            let mut out = serde_json::Map::new();
            for (k, v) in entries {
                let Yaml::Value(Scalar::String(key)) = k else {
                    return Err("mapping keys must be strings".into());
                };
                out.insert(key.to_string(), to_json(v)?);
            }
            Value::Object(out)
        }
        other => return Err(format!("unsupported YAML {other:?}")),
    })
}

#[test]
fn the_page_documents_every_field_with_its_default() {
    let problems = problems(&page(), &schema_fields());
    assert!(
        problems.is_empty(),
        "docs/configuration.md disagrees with the config types ({} problems):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// The walk finds the fields it must (a guard against a schema shape the
/// walk would silently skip, which would make the page check vacuous).
#[test]
fn the_schema_walk_reaches_nested_and_optional_fields() {
    let fields = schema_fields();
    for path in [
        "Listener.spec.address",
        "Listener.spec.tls.ports[].mode",
        "Backend.spec.endpoints[].weight",
        "Backend.spec.circuitBreaker.maxRequests",
        "Backend.spec.healthCheck.path",
        "Route.spec.rules[].matches[].path.prefix",
        "Route.spec.rules[].retry.budget.minRetryConcurrency",
        "Route.spec.rules[].fanout.branches[].weight",
        "AuthorizationPolicy.spec.rules[].to[].methods",
    ] {
        assert!(fields.contains_key(path), "{path} not found in the schema");
    }
    let connect = &fields["Backend.spec.connectTimeout"];
    assert!(connect.duration);
    assert_eq!(connect.default, Some(Value::from("5s")));
    assert!(fields["Backend.spec.healthCheck.path"].required);
    assert!(fields["Route.spec.rules"].required);
    assert!(!fields["Route.spec.rules[].matches[].path.exact"].required);
    assert!(!fields["Backend.spec.healthCheck"].required);
}

/// The checks fail, naming the field, when the page drifts: these edit a
/// copy of the real page the way drift would.
#[test]
fn drift_is_reported_by_field() {
    let page = page();
    let fields = schema_fields();
    let row = |path: &str| {
        page.lines()
            .find(|l| l.starts_with(&format!("| `{path}` |")))
            .unwrap_or_else(|| panic!("no row for {path}"))
            .to_owned()
    };
    let expect = |page: &str, needle: &str| {
        let problems = problems(page, &fields);
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "expected a problem naming {needle}, got {problems:#?}"
        );
    };

    // (a) a field of the types without a row.
    let path = "Backend.spec.circuitBreaker.maxRequests";
    let removed = page.replace(&format!("{}\n", row(path)), "");
    expect(&removed, &format!("`{path}` is a field of the types"));

    // (b) a row for a field the types do not have.
    let extra = page.replace(
        &row(path),
        &format!(
            "{}\n| `Backend.spec.circuitBreaker.maxQueue` | integer | `5` | — | made up |",
            row(path)
        ),
    );
    expect(
        &extra,
        "`Backend.spec.circuitBreaker.maxQueue` is documented, and the types have no such field",
    );

    // (c) a default that differs from the types'.
    let path = "Backend.spec.connectTimeout";
    let wrong = page.replace(&row(path), &row(path).replacen("`5s`", "`10s`", 1));
    expect(
        &wrong,
        &format!("`{path}`: the page gives the default `10s`, the types `5s`"),
    );

    // A list default, inside an object default (retry's).
    let path = "Route.spec.rules[].retry.on";
    let wrong = page.replace(&row(path), &row(path).replacen("reset, ", "", 1));
    expect(&wrong, &format!("`{path}`: the page gives the default"));

    // A required field documented with a default.
    let path = "Route.spec.rules";
    let wrong = page.replace(
        &row(path),
        &row(path).replacen("| required |", "| `[]` |", 1),
    );
    expect(&wrong, &format!("`{path}` is required by the types"));
}

#[test]
fn cells_split_at_unescaped_bars() {
    assert_eq!(
        cells(r"| `a.spec.b` | `x` \| `y` | `1` |"),
        ["`a.spec.b`", "`x` | `y`", "`1`"]
    );
    assert_eq!(code_span("`5s` (Envoy's)"), Some(("5s", "(Envoy's)")));
    assert_eq!(code_span("none"), None);
}

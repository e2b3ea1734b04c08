//! The layer rule of the proxy crate: each folder of `proxy/src` is a
//! layer, and a layer uses only the layers below it. This test reads the
//! sources and fails, naming file and line, on any path that reaches a
//! layer above (`use crate::server::...` in `route/`, or a `super::super`
//! that climbs out of its layer into another), and on a file or folder
//! that belongs to no layer, so that new code lands in a room of the
//! house. Within a layer, no module may use one that uses it back: the
//! crate reads bottom-up, module by module. The other crates of the
//! workspace are held to that last rule too, here, where the reading of
//! paths is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first: a layer may use itself and those before it.
const LAYERS: [&str; 7] = [
    "core",
    "transport",
    "backend",
    "route",
    "snapshot",
    "server",
    "app",
];

/// The crate root's own files, above every layer.
const ROOT_FILES: [&str; 2] = ["lib.rs", "main.rs"];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

/// A reference from one layer to another, at a line of a file.
#[derive(Debug)]
struct Reference {
    line: usize,
    text: String,
    to: String,
}

/// The first segment of each path of a `use` group that starts right
/// after its `{`: `core::body, server::{a, b}}` gives `core`, `server`.
fn group_heads(group: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                heads.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    heads
        .into_iter()
        .map(|path| first_name(path.trim()))
        .filter(|name| !name.is_empty())
        .collect()
}

/// The name at the start of `text`.
fn first_name(text: &str) -> &str {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or_default()
}

/// Whether `text` ends inside a name (so what follows continues it).
fn ends_in_name(text: &str) -> bool {
    text.ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
}

/// The top-level modules `source` (the text of a file whose module path
/// is `module`, e.g. `["route", "fanout", "branch"]`) refers to: through
/// `crate::` paths, including `use` groups, and through `super` chains
/// that climb to the crate root. Comments are skipped; `$crate` is a
/// macro's own crate.
fn references(module: &[String], source: &str) -> Vec<Reference> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let mut names: Vec<&str> = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            if ends_in_name(&code[..at]) {
                continue;
            }
            let tail = &code[at + "crate::".len()..];
            match tail.strip_prefix('{') {
                Some(group) => names.extend(group_heads(group)),
                None => names.push(first_name(tail)),
            }
        }
        for (at, _) in code.match_indices("super::") {
            let before = &code[..at];
            if ends_in_name(before) || before.ends_with("super::") {
                continue; // Not a name of its own, or inside a chain seen already.
            }
            let mut chain = &code[at..];
            let mut ups = 0;
            while let Some(rest) = chain.strip_prefix("super::") {
                ups += 1;
                chain = rest;
            }
            // `super` of `route::fanout::branch` is `route::fanout`: a
            // chain as long as the module path reaches the crate root.
            if ups >= module.len() {
                names.push(first_name(chain));
            }
        }
        for name in names.into_iter().filter(|name| !name.is_empty()) {
            found.push(Reference {
                line: n + 1,
                text: line.trim().to_owned(),
                to: name.to_owned(),
            });
        }
    }
    found
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("proxy/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of `file` relative to `src`: `route/fanout/mod.rs` is
/// `["route", "fanout"]`, `route/retry.rs` is `["route", "retry"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    if last != "mod.rs" {
        parts.push(last.trim_end_matches(".rs").to_owned());
    }
    parts
}

/// The violations of the rule in the crate at `src`, one line each.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let shown = file.strip_prefix(src).unwrap().display().to_string();
        let module = module_of(src, file);
        let source = std::fs::read_to_string(file).expect("a readable source");
        let relative: Vec<_> = file.strip_prefix(src).unwrap().iter().collect();
        if relative.len() == 1 {
            if !ROOT_FILES.iter().any(|f| relative[0] == *f) {
                problems.push(format!(
                    "{shown}: belongs to no layer; put it in one of {LAYERS:?} (or add a layer to this test, in its place)"
                ));
            }
            continue; // lib.rs and main.rs stand above every layer.
        }
        let layer = relative[0].to_string_lossy().into_owned();
        let Some(own) = rank(&layer) else {
            problems.push(format!(
                "{shown}: the folder {layer:?} is no layer; put the file in one of {LAYERS:?} (or add a layer to this test, in its place)"
            ));
            continue;
        };
        for reference in references(&module, &source) {
            match rank(&reference.to) {
                Some(to) if to > own => problems.push(format!(
                    "{shown}:{}: layer {layer} uses layer {}, which is above it: `{}`",
                    reference.line, reference.to, reference.text
                )),
                Some(_) => {}
                None => problems.push(format!(
                    "{shown}:{}: `{}` reaches `{}`, which is no layer",
                    reference.line, reference.text, reference.to
                )),
            }
        }
    }
    problems
}

/// The paths a `crate::` occurrence names: one, or each of a `use` group
/// (`crate::core::{body, error::ProxyError}`), as `::`-joined names.
fn named_paths(tail: &str) -> Vec<String> {
    let end = tail
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(tail.len());
    let prefix = tail[..end].trim_end_matches(':');
    let Some(group) = tail[end..].strip_prefix('{') else {
        return vec![prefix.to_owned()];
    };
    let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .flat_map(|item| named_paths(item.trim()))
        .map(|path| match (prefix.is_empty(), path.is_empty()) {
            (true, _) => path,
            (false, true) => prefix.to_owned(),
            (false, false) => format!("{prefix}::{path}"),
        })
        .collect()
}

/// The circles of modules of the crate at `src` that use each other: a
/// module uses another when it names it in a `crate::` path anywhere, its
/// documentation included (a doc link is a reference a reader follows).
/// Each circle is its modules, sorted.
fn circles(src: &Path) -> Vec<Vec<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .into_iter()
        .map(|file| (module_of(src, &file).join("::"), file))
        .filter(|(module, _)| !matches!(module.as_str(), "lib" | "main"))
        .collect();
    let mut uses: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (module, file) in &modules {
        let source = std::fs::read_to_string(file).expect("a readable source");
        for (at, _) in source.match_indices("crate::") {
            if ends_in_name(&source[..at]) {
                continue;
            }
            for path in named_paths(&source[at + "crate::".len()..]) {
                // The longest prefix of the path that is a module.
                let segments: Vec<&str> = path.split("::").collect();
                let used = (1..=segments.len())
                    .rev()
                    .map(|n| segments[..n].join("::"))
                    .find_map(|prefix| modules.get_key_value(&prefix).map(|(k, _)| k.as_str()));
                if let Some(used) = used.filter(|used| used != module) {
                    uses.entry(module).or_default().insert(used);
                }
            }
        }
    }
    strongly_connected(&uses)
}

/// Tarjan's strongly connected components of `edges` with more than one
/// node.
fn strongly_connected(edges: &BTreeMap<&str, BTreeSet<&str>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, (usize, usize)>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, (n, n));
            self.stack.push(node);
            for &next in self.edges.get(node).into_iter().flatten() {
                let low = match self.index.get(next) {
                    None => {
                        self.visit(next);
                        self.index[next].1
                    }
                    Some(&(index, _)) if self.stack.contains(&next) => index,
                    Some(_) => continue,
                };
                let entry = self.index.get_mut(node).expect("visited");
                entry.1 = entry.1.min(low);
            }
            let (index, low) = self.index[node];
            if index == low {
                let at = self
                    .stack
                    .iter()
                    .rposition(|m| *m == node)
                    .expect("on the stack");
                let mut circle: Vec<String> = self
                    .stack
                    .split_off(at)
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                if circle.len() > 1 {
                    circle.sort();
                    self.found.push(circle);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for &node in edges.keys() {
        if !walk.index.contains_key(node) {
            walk.visit(node);
        }
    }
    walk.found
}

#[test]
fn no_module_uses_one_that_uses_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = circles(&src);
    assert!(
        found.is_empty(),
        "modules that use each other (through `crate::` paths, doc links included): {found:?}"
    );
}

#[test]
fn no_module_of_another_crate_uses_one_that_uses_it_back() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in [
        "api",
        "certs",
        "control-plane",
        "init",
        "proto",
        "benches",
        "tests",
    ] {
        let src = workspace.join(krate).join("src");
        let found = circles(&src);
        assert!(
            found.is_empty(),
            "{krate}: modules that use each other (through `crate::` paths, doc links included): {found:?}"
        );
    }
}

#[test]
fn circles_are_seen_through_code_and_doc_links() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let file = src.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    };
    write("lib.rs", "mod route;\n");
    write(
        "route/mod.rs",
        "pub(crate) mod hedge;\npub(crate) mod retry;\n",
    );
    write(
        "route/retry.rs",
        "use crate::route::{hedge::Hedging, mod_item};\n",
    );
    write(
        "route/hedge.rs",
        "//! Run by the retry layer ([`crate::route::retry`]).\n",
    );
    write("route/split.rs", "use crate::route::retry::Retries;\n");
    assert_eq!(circles(src), [["route::hedge", "route::retry"]]);
    write("route/hedge.rs", "//! Run by the retry layer.\n");
    assert!(circles(src).is_empty());
}

#[test]
fn every_layer_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(
        problems.is_empty(),
        "the layer rule (bottom first: {LAYERS:?}) is broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_rule_is_seen_in_each_form_of_path() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let file = src.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    };
    write("lib.rs", "mod core;\nmod route;\nmod server;\n");
    write(
        "core/mod.rs",
        "// crate::server in a comment is fine\nuse crate::core::body;\n",
    );
    write("route/mod.rs", "mod retry;\nmod fanout;\n");
    write(
        "route/retry.rs",
        "use crate::{core::body, server::Shared};\n",
    );
    write("route/fanout/mod.rs", "use super::super::retry::Retries;\n");
    write(
        "route/fanout/branch.rs",
        "fn f() { let x = crate::server::respond(); }\n",
    );
    write("server/mod.rs", "use super::route::stack;\n");
    write("server/request.rs", "use super::super::app::Admin;\n");
    write("helpers.rs", "");
    let found = violations(src);
    let expected = [
        "helpers.rs: belongs to no layer",
        "route/fanout/branch.rs:1: layer route uses layer server",
        "route/fanout/mod.rs:1: `use super::super::retry::Retries;` reaches `retry`, which is no layer",
        "route/retry.rs:1: layer route uses layer server",
        "server/request.rs:1: layer server uses layer app",
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for (found, expected) in found.iter().zip(expected) {
        assert!(
            found.starts_with(expected),
            "{found} does not start with {expected}"
        );
    }
}

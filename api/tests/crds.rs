//! `deploy/kubernetes/base/crds.yaml` is the CustomResourceDefinitions of
//! `infermesh_api::crd`, as the types of this crate make them today: a
//! field added, renamed or documented anew fails this test until the file
//! is regenerated with
//!
//! ```sh
//! INFERMESH_UPDATE_CRDS=1 cargo test -p infermesh-api --test crds
//! ```

use std::path::PathBuf;

use infermesh_api::crd::custom_resource_definitions;
use serde_json::Value;

/// The command that rewrites the file.
const UPDATE: &str = "INFERMESH_UPDATE_CRDS=1 cargo test -p infermesh-api --test crds";

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base/crds.yaml")
}

/// The file's text: a header, then one YAML document per CRD.
fn render(crds: &[Value]) -> String {
    let header = format!(
        "# The CustomResourceDefinitions of infermesh's config kinds (Listener,\n\
         # Backend, Route, AuthorizationPolicy, Sidecar), generated from the\n\
         # types of api/ (infermesh_api::crd). Do not edit: regenerate with\n\
         #\n\
         #   {UPDATE}\n\
         #\n\
         # from the repository root, and commit the result.\n\
         ---\n"
    );
    let documents = serde_saphyr::to_string_multiple(crds).expect("the CRDs serialize to YAML");
    format!("{header}{documents}")
}

#[test]
fn the_committed_crds_are_generated_from_the_types() {
    let expected = render(&custom_resource_definitions());
    let path = committed_path();
    if std::env::var_os("INFERMESH_UPDATE_CRDS").is_some_and(|v| v == "1") {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        std::fs::write(&path, &expected)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != expected {
        let line = committed
            .lines()
            .zip(expected.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(expected.lines().count()));
        panic!(
            "deploy/kubernetes/base/crds.yaml is not what the api types make (first \
             difference at line {}: committed {:?}, generated {:?}).\n\
             Regenerate it from the repository root with\n\n    {UPDATE}\n\nand commit it.",
            line + 1,
            committed.lines().nth(line).unwrap_or("(end of file)"),
            expected.lines().nth(line).unwrap_or("(end of file)"),
        );
    }
}

/// What the file says is what the CRDs are: the YAML reads back as the
/// same values (long descriptions are folded, so this is not a given).
#[test]
fn the_yaml_reads_back_as_the_crds() {
    let crds = custom_resource_definitions();
    let text = render(&crds);
    let read: Vec<Value> = serde_saphyr::from_multiple(&text).expect("the generated YAML parses");
    assert_eq!(read.len(), crds.len());
    for (read, crd) in read.iter().zip(&crds) {
        assert_eq!(read, crd, "{}", crd["metadata"]["name"]);
    }
}

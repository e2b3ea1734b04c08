//! `infermesh_api::Config::load` (api/src/lib.rs) on any bytes as one
//! YAML config file (bytes that are not UTF-8 become U+FFFD, as a file
//! read lossily would).
//!
//! Asserted:
//! - loading never panics: every input is a config or diagnostics;
//! - diagnostics are never empty and each names the file;
//! - a config loads back from its own dump to the same config: its
//!   serialized documents (defaults filled in), written as one YAML file
//!   of JSON documents, load without a diagnostic, serialize to the same
//!   JSON and have the same `version()` (what the admin `/config` dump
//!   and config reloads rely on).

#![no_main]

use infermesh_api::{Config, Source};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const FILE: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let config = match Config::load(&[Source {
        name: FILE,
        text: &text,
    }]) {
        Ok(config) => config,
        Err(diagnostics) => {
            assert!(!diagnostics.0.is_empty(), "an error without a diagnostic");
            for d in &diagnostics.0 {
                assert_eq!(d.file, FILE, "{d:?}");
            }
            return;
        }
    };
    let dump = serde_json::to_value(&config).expect("a config serializes");
    let Value::Array(documents) = &dump else {
        panic!("a config dump is a list of documents: {dump}");
    };
    let again_text: String = documents.iter().map(|d| format!("---\n{d}\n")).collect();
    let again = Config::load(&[Source {
        name: "dump.yaml",
        text: &again_text,
    }])
    .unwrap_or_else(|e| panic!("the dump does not load: {e:?}\n{again_text}\nfrom:\n{text}"));
    let again_dump = serde_json::to_value(&again).expect("a config serializes");
    assert_eq!(
        dump, again_dump,
        "the dump loads to another config\nfrom:\n{text}"
    );
    assert_eq!(config.version(), again.version());
});

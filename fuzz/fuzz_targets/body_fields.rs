//! `hot_path::BodyFields::of` (proxy/src/core/model.rs), the reader of a
//! JSON request body's `model` and `stream` that model routing and the
//! fan-out branches use, on any bytes as a body, checked against
//! `serde_json`'s own reading of the same bytes.
//!
//! Asserted:
//! - a body that is not a JSON object (but is JSON) names no model and
//!   asks for no stream, as the reader's docs say;
//! - for a JSON object whose `model` and `stream` keys each appear at
//!   most once, the reader agrees with `serde_json::Value`: the model is
//!   the `model` member when it is a string, else none, and `stream` is
//!   true exactly when the member is `true`;
//! - for an object with a key written twice (which RFC 8259 leaves
//!   undefined) the reader names no model but one written in the body:
//!   it never invents one.
//!
//! Bodies `serde_json` does not parse as a whole are only read, for
//! panics: the reader may still find a model in them (it skips what it
//! does not look at).

#![no_main]

use std::fmt;

use infermesh_proxy::hot_path::BodyFields;
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let fields = BodyFields::of(body);
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let text = String::from_utf8_lossy(body);
    if !value.is_object() {
        assert_eq!(fields.model, None, "{text}");
        assert!(!fields.stream, "{text}");
        return;
    }
    let Members(members) =
        serde_json::from_slice(body).expect("an object serde_json parsed, read member by member");
    let of = |key: &str| -> Vec<&Value> {
        members
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect()
    };
    let (models, streams) = (of("model"), of("stream"));
    if models.len() <= 1 && streams.len() <= 1 {
        let model = models.first().and_then(|m| m.as_str());
        assert_eq!(fields.model.as_deref(), model, "{text}");
        assert_eq!(
            fields.stream,
            streams.first() == Some(&&Value::Bool(true)),
            "{text}"
        );
    } else if let Some(model) = &fields.model {
        assert!(
            models.iter().any(|m| m.as_str() == Some(model)),
            "{text}: the model {model:?} is not in the body"
        );
    }
});

/// A JSON object's members in order, a key written twice kept twice.
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> Visitor<'de> for Each {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Each)
    }
}

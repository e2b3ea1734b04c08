//! JSON Schemas of the kinds' specs ([`crate::Kind::spec_schema`]), and the
//! schemas of fields whose text has a form that the derived schema (a plain
//! string) does not tell.

use schemars::generate::SchemaSettings;
use schemars::transform::RecursiveTransform;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EndpointTarget;

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
}

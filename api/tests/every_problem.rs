//! One load reports every problem of every document: type errors (several
//! in one document), unknown fields, kinds and values with the name that
//! was probably meant, missing fields, and the checks made on the values
//! (run on the rest of a document even when some of its fields are
//! wrong).

use infermesh_api::{Config, Source};

fn load(text: &str) -> Result<Config, Vec<String>> {
    Config::load(&[Source {
        name: "gw.yaml",
        text,
    }])
    .map_err(|d| d.iter().map(|d| d.to_string()).collect())
}

/// Eight problems in three documents; fixing them one load at a time took
/// four rounds.
const EIGHT_PROBLEMS: &str = include_str!("fixtures/eight-problems.yaml");

#[test]
fn one_load_reports_every_problem_with_its_place_and_the_name_meant() {
    assert_eq!(
        load(EIGHT_PROBLEMS).unwrap_err(),
        [
            "gw.yaml:6:3: Listener/public: spec.protocl: unknown field `protocl`; did you mean `protocol`?",
            "gw.yaml:7:3: Listener/public: spec.outsideMesh: outsideMesh applies only to a listener with `capture: outbound`",
            "gw.yaml:13:3: Backend/llama: spec.connectTimeout: invalid type: sequence, expected a duration such as 250ms, 30s, 5m or 1h30m",
            "gw.yaml:14:3: Backend/llama: spec.dnsRefreshInterval: 10ms is too short; the minimum is 1s",
            "gw.yaml:17:7: Backend/llama: spec.endpoints[0].weight: invalid type: string \"heavy\", expected an integer from 0 to 4294967295",
            "gw.yaml:18:7: Backend/llama: spec.endpoints[1]: missing field `address`",
            "gw.yaml:19:19: Backend/llama: spec.loadBalancer.policy: unknown variant `leastRequests`, expected one of `peakEwma`, `leastRequest`, `roundRobin`; did you mean `leastRequest`?",
            "gw.yaml:22:1: kind: unknown kind \"Rout\"; did you mean `Route`?",
        ]
    );
}

#[test]
fn every_problem_of_the_envelope_is_reported_with_the_spec_s() {
    let text = r#"apiversion: infermesh.io/v1alpha1
kind: Backend
metadata: { nmae: m, labels: { app: x } }
specs: {}
---
apiVersion: 1
kind: [Route]
metadata: x
spec: []
"#;
    assert_eq!(
        load(text).unwrap_err(),
        [
            "gw.yaml:1:1: apiversion: unknown field `apiversion`; did you mean `apiVersion`?",
            "gw.yaml:1:1: missing field `apiVersion`",
            "gw.yaml:1:1: missing field `spec`",
            "gw.yaml:3:1: metadata: missing field `name`",
            "gw.yaml:3:13: metadata.nmae: unknown field `nmae`; did you mean `name`?",
            "gw.yaml:3:22: metadata.labels: unknown field `labels`; expected one of `name`, `namespace`",
            "gw.yaml:4:1: specs: unknown field `specs`; did you mean `spec`?",
            "gw.yaml:6:1: apiVersion: invalid type: integer `1`, expected a string",
            "gw.yaml:7:1: kind: invalid type: sequence, expected one of Listener, Backend, Route, AuthorizationPolicy, Sidecar",
            "gw.yaml:8:1: metadata: invalid type: string \"x\", expected a mapping",
        ]
    );
}

#[test]
fn errors_in_lists_and_alternatives_are_each_reported() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: m }
spec:
  addresses: ["10.96.0.1:80", "10.96.0.2", "10.96.0.3:http"]
  endpoints:
    - { address: 8000 }
    - { adress: 127.0.0.1:8000 }
  protocol: HTTP2
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: r }
spec:
  rules:
    - backends: [{ name: m }]
      matches:
        - path: { prefx: /v1 }
        - path: { prefix: /v1, exact: /v2 }
        - path: { regex: 5 }
      retry:
        on: [reset, gateway_error, 5xx]
        grpcStatuses: [unavailabel]
        perTryTimeout: 5
      timeout: 5s
"#;
    assert_eq!(
        load(text).unwrap_err(),
        [
            "gw.yaml:5:31: Backend/m: spec.addresses[1]: invalid socket address syntax",
            "gw.yaml:5:44: Backend/m: spec.addresses[2]: invalid socket address syntax",
            "gw.yaml:7:9: Backend/m: spec.endpoints[0].address: invalid type: integer `8000`, expected a string",
            "gw.yaml:8:7: Backend/m: spec.endpoints[1]: missing field `address`",
            "gw.yaml:8:9: Backend/m: spec.endpoints[1].adress: unknown field `adress`; did you mean `address`?",
            "gw.yaml:9:3: Backend/m: spec.protocol: unknown variant `HTTP2`, expected one of `http1`, `http2`; did you mean `http2`?",
            "gw.yaml:18:19: Route/r: spec.rules[0].matches[0].path.prefx: unknown field `prefx`; did you mean `prefix`?",
            "gw.yaml:19:11: Route/r: spec.rules[0].matches[1].path: give exactly one of `exact`, `prefix`, `regex`",
            "gw.yaml:20:19: Route/r: spec.rules[0].matches[2].path.regex: invalid type: integer `5`, expected a string",
            "gw.yaml:22:21: Route/r: spec.rules[0].retry.on[1]: unknown variant `gateway_error`, expected one of `connect-failure`, `refused-stream`, `reset`, `gateway-error`, `rate-limited`; did you mean `gateway-error`?",
            "gw.yaml:22:36: Route/r: spec.rules[0].retry.on[2]: unknown variant `5xx`, expected one of `connect-failure`, `refused-stream`, `reset`, `gateway-error`, `rate-limited`",
            "gw.yaml:23:24: Route/r: spec.rules[0].retry.grpcStatuses[0]: unknown variant `unavailabel`, expected one of `cancelled`, `unknown`, `invalid-argument`, `deadline-exceeded`, `not-found`, `already-exists`, `permission-denied`, `resource-exhausted`, `failed-precondition`, `aborted`, `out-of-range`, `unimplemented`, `internal`, `unavailable`, `data-loss`, `unauthenticated`; did you mean `unavailable`?",
            "gw.yaml:24:9: Route/r: spec.rules[0].retry.perTryTimeout: a bare number (5) is ambiguous; add a unit, e.g. 5s or 5ms",
            "gw.yaml:25:7: Route/r: spec.rules[0].timeout: unknown field `timeout`; did you mean `timeouts`?",
        ]
    );
}

#[test]
fn a_value_out_of_its_type_s_range_is_reported_where_written() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: inbound }
spec:
  address: 0.0.0.0:15006
  capture: inbound
  tls:
    ports:
      - { port: 70000, mode: strict }
      - { port: -1, mode: strict }
      - { port: 1.5, mode: strict }
"#;
    assert_eq!(
        load(text).unwrap_err(),
        [
            "gw.yaml:9:11: Listener/inbound: spec.tls.ports[0].port: invalid value: integer `70000`, expected an integer from 0 to 65535",
            "gw.yaml:10:11: Listener/inbound: spec.tls.ports[1].port: invalid value: integer `-1`, expected an integer from 0 to 65535",
            "gw.yaml:11:11: Listener/inbound: spec.tls.ports[2].port: invalid type: floating point `1.5`, expected an integer from 0 to 65535",
        ]
    );
}

/// A check that would only repeat a field's own error is left out: a
/// header match whose `present` is not a boolean is not also told to give
/// one of exact, regex or present.
#[test]
fn a_wrong_field_is_not_reported_twice() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: m }
spec: {}
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: r }
spec:
  rules:
    - backends: { name: m }
      matches:
        - headers: [{ name: x-tenant, present: yes please }]
"#;
    assert_eq!(
        load(text).unwrap_err(),
        [
            "gw.yaml:11:7: Route/r: spec.rules[0].backends: invalid type: map, expected a list",
            "gw.yaml:13:39: Route/r: spec.rules[0].matches[0].headers[0].present: invalid type: string \"yes please\", expected a boolean",
        ]
    );
}

#[test]
fn a_value_of_the_wrong_type_is_told_what_is_expected() {
    let text = r#"apiVersion: infermesh.io/v1alpha1
kind: Listener
metadata: { name: l }
spec: { address: 127.0.0.1:8080, capture: 5, protocol: [http] }
---
apiVersion: infermesh.io/v1alpha1
kind: Route
metadata: { name: r }
spec:
  rules:
    - backends: [{ name: l }]
      matches: [{ path: /v1 }]
      hedge: yes
---
apiVersion: infermesh.io/v1alpha1
kind: Backend
metadata: { name: l }
spec: {}
"#;
    assert_eq!(
        load(text).unwrap_err(),
        [
            "gw.yaml:4:34: Listener/l: spec.capture: invalid type: integer `5`, expected one of `inbound`, `outbound`",
            "gw.yaml:4:46: Listener/l: spec.protocol: invalid type: sequence, expected one of `http`, `http1`, `http2`",
            "gw.yaml:12:19: Route/r: spec.rules[0].matches[0].path: invalid type: string \"/v1\", expected a mapping with one of `exact`, `prefix`, `regex`",
            "gw.yaml:13:7: Route/r: spec.rules[0].hedge: invalid type: string \"yes\", expected a mapping",
        ]
    );
}

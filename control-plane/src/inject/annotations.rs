//! The pod's `infermesh.io/` annotations the injector reads: opting out,
//! the interception flags of `infermesh-proxy init`, the sidecar's
//! resources and the probe rewrite. Each is checked here, so that a bad
//! value refuses the injection with the annotation named rather than
//! making a pod whose init container or sidecar fails at start.

use std::collections::BTreeMap;
use std::fmt;

use infermesh_init::{CidrList, Ipv4Cidr, PortList, Selection};

/// The label or annotation that opts a pod out (`disabled` or `false`).
pub const INJECT: &str = "infermesh.io/inject";
/// Inbound ports `init` leaves alone (`--exclude-inbound-ports`).
pub const EXCLUDE_INBOUND_PORTS: &str = "infermesh.io/exclude-inbound-ports";
/// Outbound ports `init` leaves alone (`--exclude-outbound-ports`).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "infermesh.io/exclude-outbound-ports";
/// Outbound CIDRs `init` leaves alone (`--exclude-outbound-cidrs`).
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "infermesh.io/exclude-outbound-cidrs";
/// The only inbound ports `init` redirects (`--include-inbound-ports`).
pub const INCLUDE_INBOUND_PORTS: &str = "infermesh.io/include-inbound-ports";
/// The only outbound CIDRs `init` redirects (`--include-outbound-cidrs`).
pub const INCLUDE_OUTBOUND_CIDRS: &str = "infermesh.io/include-outbound-cidrs";
/// The sidecar's CPU request.
pub const PROXY_CPU_REQUEST: &str = "infermesh.io/proxy-cpu-request";
/// The sidecar's memory request.
pub const PROXY_MEMORY_REQUEST: &str = "infermesh.io/proxy-memory-request";
/// The sidecar's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "infermesh.io/proxy-memory-limit";
/// `false` keeps the app's HTTP probes as they are (Istio's
/// `sidecar.istio.io/rewriteAppHTTPProbers`).
pub const REWRITE_APP_PROBES: &str = "infermesh.io/rewrite-app-probes";

/// Every annotation the injector reads; another `infermesh.io/` one is
/// likely a typo, and is answered with a warning.
pub const KNOWN: [&str; 10] = [
    INJECT,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_CIDRS,
    PROXY_CPU_REQUEST,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    REWRITE_APP_PROBES,
];

/// The sidecar's CPU request unless annotated.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
/// The sidecar's memory request unless annotated.
pub const DEFAULT_MEMORY_REQUEST: &str = "64Mi";
/// The sidecar's memory limit unless annotated.
pub const DEFAULT_MEMORY_LIMIT: &str = "256Mi";

/// A label or annotation map of a pod's metadata, string values only.
pub type StringMap<'a> = BTreeMap<&'a str, &'a str>;

/// An annotation whose value cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the annotation {annotation}: {value:?} is not valid: {why}")]
pub struct AnnotationError {
    /// The annotation (or label).
    pub annotation: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

/// What the annotations ask of the injection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The flags for `infermesh-proxy init`, checked and written as
    /// `--flag=value`.
    pub init_args: Vec<String>,
    /// The sidecar's resources.
    pub resources: ProxyResources,
    /// Whether the app's HTTP probes move to the sidecar.
    pub rewrite_app_probes: bool,
    /// Things worth telling whoever creates the pod (unknown
    /// `infermesh.io/` annotations).
    pub warnings: Vec<String>,
}

/// The sidecar's resource requests and limit, as Kubernetes quantities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyResources {
    /// `requests.cpu`.
    pub cpu_request: String,
    /// `requests.memory`.
    pub memory_request: String,
    /// `limits.memory`.
    pub memory_limit: String,
}

/// Whether the pod opts out, and why: by the annotation or the label
/// [`INJECT`] set to `disabled` or `false`. `enabled`, `true` or nothing
/// leaves the decision to the webhook's selectors; any other value is
/// refused, so that a typo does not inject a pod meant to be left alone.
pub fn opted_out(
    annotations: &StringMap<'_>,
    labels: &StringMap<'_>,
) -> Result<Option<String>, AnnotationError> {
    for (what, map) in [("annotation", annotations), ("label", labels)] {
        match map.get(INJECT).copied() {
            None | Some("enabled" | "true") => {}
            Some(value @ ("disabled" | "false")) => {
                return Ok(Some(format!(
                    "opted out by the {what} {INJECT}: \"{value}\""
                )));
            }
            Some(value) => {
                return Err(AnnotationError {
                    annotation: INJECT,
                    value: value.to_owned(),
                    why: "write enabled or disabled (true or false)".into(),
                });
            }
        }
    }
    Ok(None)
}

impl Settings {
    /// Reads and checks the annotations.
    pub fn read(annotations: &StringMap<'_>) -> Result<Settings, AnnotationError> {
        let mut init_args = Vec::new();
        let mut flag = |annotation: &'static str,
                        name: &str,
                        render: fn(&str) -> Result<String, String>|
         -> Result<(), AnnotationError> {
            if let Some(value) = annotations.get(annotation) {
                let rendered = render(value).map_err(|why| AnnotationError {
                    annotation,
                    value: (*value).to_owned(),
                    why,
                })?;
                init_args.push(format!("--{name}={rendered}"));
            }
            Ok(())
        };
        flag(EXCLUDE_INBOUND_PORTS, "exclude-inbound-ports", ports)?;
        flag(EXCLUDE_OUTBOUND_PORTS, "exclude-outbound-ports", ports)?;
        flag(EXCLUDE_OUTBOUND_CIDRS, "exclude-outbound-cidrs", cidrs)?;
        flag(
            INCLUDE_INBOUND_PORTS,
            "include-inbound-ports",
            port_selection,
        )?;
        flag(
            INCLUDE_OUTBOUND_CIDRS,
            "include-outbound-cidrs",
            cidr_selection,
        )?;

        let resource = |annotation: &'static str, default: &str| {
            let value = annotations.get(annotation).copied().unwrap_or(default);
            quantity(value)
                .map(|amount| (value.to_owned(), amount))
                .map_err(|why| AnnotationError {
                    annotation,
                    value: value.to_owned(),
                    why,
                })
        };
        let (cpu_request, _) = resource(PROXY_CPU_REQUEST, DEFAULT_CPU_REQUEST)?;
        let (memory_request, request) = resource(PROXY_MEMORY_REQUEST, DEFAULT_MEMORY_REQUEST)?;
        let (memory_limit, limit) = resource(PROXY_MEMORY_LIMIT, DEFAULT_MEMORY_LIMIT)?;
        if request > limit {
            // Kubernetes refuses a request above its limit.
            let annotation = if annotations.contains_key(PROXY_MEMORY_REQUEST) {
                PROXY_MEMORY_REQUEST
            } else {
                PROXY_MEMORY_LIMIT
            };
            return Err(AnnotationError {
                annotation,
                value: annotations
                    .get(annotation)
                    .copied()
                    .unwrap_or_default()
                    .to_owned(),
                why: format!(
                    "the sidecar's memory request ({memory_request}) would be above its limit ({memory_limit}); set {PROXY_MEMORY_REQUEST} and {PROXY_MEMORY_LIMIT} together"
                ),
            });
        }

        let rewrite_app_probes = match annotations.get(REWRITE_APP_PROBES).copied() {
            None | Some("true") => true,
            Some("false") => false,
            Some(value) => {
                return Err(AnnotationError {
                    annotation: REWRITE_APP_PROBES,
                    value: value.to_owned(),
                    why: "write true or false".into(),
                });
            }
        };

        let warnings = annotations
            .keys()
            .filter(|key| key.starts_with("infermesh.io/") && !KNOWN.contains(key))
            .map(|key| {
                format!(
                    "the annotation {key} means nothing to the infermesh injector; it reads {}",
                    KNOWN.join(", ")
                )
            })
            .collect();
        Ok(Settings {
            init_args,
            resources: ProxyResources {
                cpu_request,
                memory_request,
                memory_limit,
            },
            rewrite_app_probes,
            warnings,
        })
    }
}

fn ports(value: &str) -> Result<String, String> {
    let PortList(ports) = value.parse().map_err(|e| format!("{e}"))?;
    Ok(joined(&ports))
}

fn cidrs(value: &str) -> Result<String, String> {
    let CidrList(cidrs) = value.parse().map_err(|e| format!("{e}"))?;
    Ok(joined(&cidrs))
}

fn port_selection(value: &str) -> Result<String, String> {
    match value
        .parse::<Selection<u16>>()
        .map_err(|e| format!("{e}"))?
    {
        Selection::All => Ok("*".into()),
        Selection::Only(ports) => Ok(joined(&ports)),
    }
}

fn cidr_selection(value: &str) -> Result<String, String> {
    match value
        .parse::<Selection<Ipv4Cidr>>()
        .map_err(|e| format!("{e}"))?
    {
        Selection::All => Ok("*".into()),
        Selection::Only(cidrs) => Ok(joined(&cidrs)),
    }
}

fn joined<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The amount a Kubernetes quantity (`100m`, `64Mi`, `1.5G`, `1e3`)
/// stands for, in base units; negative quantities are refused, as
/// resources cannot be.
pub fn quantity(text: &str) -> Result<f64, String> {
    let invalid = || format!("`{text}` is not a Kubernetes quantity (such as 100m, 64Mi or 1Gi)");
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    let end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(end);
    let digits = number.bytes().filter(u8::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 {
        return Err(invalid());
    }
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let power = exponent
                .strip_prefix(['e', 'E'])
                .filter(|p| !p.is_empty())
                .and_then(|p| p.parse::<i32>().ok())
                .ok_or_else(invalid)?;
            10f64.powi(power)
        }
    };
    Ok(number * multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map<'a>(pairs: &[(&'a str, &'a str)]) -> StringMap<'a> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn interception_annotations_become_init_flags_in_canonical_form() {
        let settings = Settings::read(&map(&[
            (EXCLUDE_INBOUND_PORTS, "22, 9090,22"),
            (EXCLUDE_OUTBOUND_PORTS, "5432"),
            (EXCLUDE_OUTBOUND_CIDRS, "169.254.169.254,10.96.0.0/12"),
            (INCLUDE_INBOUND_PORTS, "*"),
            (INCLUDE_OUTBOUND_CIDRS, ""),
        ]))
        .unwrap();
        assert_eq!(
            settings.init_args,
            [
                "--exclude-inbound-ports=22,9090",
                "--exclude-outbound-ports=5432",
                "--exclude-outbound-cidrs=169.254.169.254/32,10.96.0.0/12",
                "--include-inbound-ports=*",
                "--include-outbound-cidrs=",
            ]
        );
        assert_eq!(
            settings.resources,
            ProxyResources {
                cpu_request: "100m".into(),
                memory_request: "64Mi".into(),
                memory_limit: "256Mi".into(),
            }
        );
        assert!(settings.rewrite_app_probes);
        assert!(settings.warnings.is_empty());
    }

    #[test]
    fn a_bad_annotation_is_refused_with_its_name() {
        let cases = [
            (EXCLUDE_INBOUND_PORTS, "22,ssh", "`ssh` is not a port"),
            (EXCLUDE_OUTBOUND_PORTS, "0", "`0` is not a port"),
            (
                EXCLUDE_OUTBOUND_CIDRS,
                "10.0.0.1/8",
                "did you mean 10.0.0.0/8",
            ),
            (INCLUDE_INBOUND_PORTS, "80,,81", "empty item"),
            (INCLUDE_OUTBOUND_CIDRS, "fd00::/8", "not an IPv4 CIDR"),
            (PROXY_CPU_REQUEST, "lots", "not a Kubernetes quantity"),
            (PROXY_MEMORY_LIMIT, "-1Gi", "not a Kubernetes quantity"),
            (PROXY_MEMORY_REQUEST, "1Gi", "above its limit (256Mi)"),
            (REWRITE_APP_PROBES, "no", "true or false"),
        ];
        for (annotation, value, says) in cases {
            let error = Settings::read(&map(&[(annotation, value)])).unwrap_err();
            assert_eq!(error.annotation, annotation);
            let text = error.to_string();
            assert!(
                text.contains(annotation) && text.contains(says),
                "{annotation}={value}: {text}"
            );
        }
    }

    #[test]
    fn resources_are_overridden_and_unknown_annotations_warned_of() {
        let settings = Settings::read(&map(&[
            (PROXY_CPU_REQUEST, "250m"),
            (PROXY_MEMORY_REQUEST, "512Mi"),
            (PROXY_MEMORY_LIMIT, "1Gi"),
            ("infermesh.io/exclude-inbound-port", "22"),
            ("example.com/other", "x"),
        ]))
        .unwrap();
        assert_eq!(settings.resources.cpu_request, "250m");
        assert_eq!(settings.resources.memory_limit, "1Gi");
        assert_eq!(settings.warnings.len(), 1);
        assert!(settings.warnings[0].contains("infermesh.io/exclude-inbound-port means nothing"));
    }

    #[test]
    fn opting_out_by_annotation_or_label() {
        let none = map(&[]);
        assert_eq!(opted_out(&none, &none), Ok(None));
        assert_eq!(opted_out(&map(&[(INJECT, "enabled")]), &none), Ok(None));
        let by_annotation = opted_out(&map(&[(INJECT, "disabled")]), &none).unwrap();
        assert!(by_annotation.unwrap().contains("annotation"));
        let by_label = opted_out(&none, &map(&[(INJECT, "false")])).unwrap();
        assert!(by_label.unwrap().contains("label"));
        let typo = opted_out(&map(&[(INJECT, "disable")]), &none).unwrap_err();
        assert_eq!(typo.annotation, INJECT);
    }

    #[test]
    fn quantities() {
        for (text, amount) in [
            ("100m", 0.1),
            ("1", 1.0),
            ("1.5", 1.5),
            (".5", 0.5),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("1E", 1e18),
            ("2e3", 2000.0),
            ("+1k", 1000.0),
        ] {
            assert_eq!(quantity(text), Ok(amount), "{text}");
        }
        for bad in ["", "m", "1.2.3", "1 Gi", "1gi", "-1", "1e", "1Mb", "0x10"] {
            assert!(quantity(bad).is_err(), "{bad}");
        }
    }
}

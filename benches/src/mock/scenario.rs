//! The mock's scenario file: which servers to run, which models each
//! serves, and how each model behaves (latency, stragglers, streaming pace,
//! injected faults, concurrency), reproducibly from one seed.
//!
//! ```yaml
//! seed: 42
//! servers:
//!   - listen: 127.0.0.1:9000
//!     models:
//!       - name: llama
//!         latency: { lognormal: { median: 40ms, sigma: 0.5 } }
//!         stragglers: { fraction: 0.01, delay: 2s }
//!         timeToFirstToken: { fixed: 150ms }
//!         interTokenDelay: 20ms
//!         tokens: 64
//!         maxConcurrency: 8
//!         errors:
//!           - { percent: 5, fault: { status: 503 } }
//!           - { percent: 1, fault: reset }
//!           - { percent: 1, fault: hang }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use infermesh_api::Duration;
use serde::{Deserialize, Serialize};

/// A whole scenario: one or more mock servers.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Scenario {
    /// Seed of every random choice (latencies, faults); the same seed and
    /// the same request order give the same behaviour.
    #[serde(default)]
    pub seed: u64,
    /// The servers to run.
    pub servers: Vec<ServerSpec>,
}

/// One mock server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerSpec {
    /// Address to listen on (port 0: an ephemeral port, printed at start).
    pub listen: SocketAddr,
    /// Serve TLS (HTTP/1.1 and HTTP/2 by ALPN) instead of cleartext.
    #[serde(default)]
    pub tls: Option<TlsSpec>,
    /// The models it serves, at least one.
    pub models: Vec<ModelSpec>,
}

/// TLS for a mock server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsSpec {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle: when given, clients must present a certificate it
    /// signed (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// How one model behaves.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelSpec {
    /// The model's name, as requests give it (OpenAI `model`, KServe path).
    pub name: String,
    /// Time to a whole answer (non-streaming), or to the first token when
    /// `timeToFirstToken` is not given.
    #[serde(default)]
    pub latency: Latency,
    /// A fraction of requests that are much slower.
    #[serde(default)]
    pub stragglers: Option<Stragglers>,
    /// Time to the first streamed token; defaults to `latency`.
    #[serde(default)]
    pub time_to_first_token: Option<Latency>,
    /// Time between streamed tokens.
    #[serde(default = "default_inter_token_delay")]
    pub inter_token_delay: Duration,
    /// Tokens per answer (a request's `max_tokens` can ask for fewer).
    #[serde(default = "default_tokens")]
    pub tokens: usize,
    /// Requests served at once; more wait in a queue (vLLM's
    /// `max_num_seqs`). Unlimited when not given.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// Faults injected into a share of requests.
    #[serde(default)]
    pub errors: Vec<ErrorRule>,
    /// Length of the vectors `/v1/embeddings` returns.
    #[serde(default = "default_dimensions")]
    pub embedding_dimensions: usize,
    /// The text of every completion, streamed a word at a time (a
    /// request's `max_tokens` can ask for fewer words). Default: `tokens`
    /// words `token0 token1 ...`.
    #[serde(default)]
    pub reply: Option<String>,
    /// KServe v2 answers hold each number of the inputs times this (1, the
    /// default: an identity model), so that models can differ.
    #[serde(default = "default_scale")]
    pub scale: f64,
}

fn default_inter_token_delay() -> Duration {
    Duration::from_millis(20)
}

fn default_tokens() -> usize {
    16
}

fn default_dimensions() -> usize {
    8
}

fn default_scale() -> f64 {
    1.0
}

impl ModelSpec {
    /// A model that answers after `latency`, streaming `tokens` tokens
    /// `inter_token_delay` apart.
    pub fn simple(
        name: &str,
        latency: Duration,
        inter_token_delay: Duration,
        tokens: usize,
    ) -> Self {
        ModelSpec {
            name: name.to_owned(),
            latency: Latency::Fixed(latency),
            stragglers: None,
            time_to_first_token: None,
            inter_token_delay,
            tokens,
            max_concurrency: None,
            errors: Vec::new(),
            embedding_dimensions: default_dimensions(),
            reply: None,
            scale: default_scale(),
        }
    }
}

/// A latency distribution.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum Latency {
    /// Always the same.
    Fixed(Duration),
    /// Uniform between two bounds.
    Uniform {
        /// Lower bound.
        min: Duration,
        /// Upper bound.
        max: Duration,
    },
    /// Log-normal with the given median; `sigma` is the standard deviation
    /// of the underlying normal (0.5 gives a p99 about 3.2 times the median).
    #[serde(rename = "lognormal")]
    LogNormal {
        /// The median latency.
        median: Duration,
        /// Spread.
        sigma: f64,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed(Duration::ZERO)
    }
}

/// Requests that take much longer than the rest.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Stragglers {
    /// Share of requests, 0 to 1.
    pub fraction: f64,
    /// Extra time they take.
    pub delay: Duration,
}

/// A fault injected into a percentage of a model's requests.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ErrorRule {
    /// Share of requests, in percent.
    pub percent: f64,
    /// What happens to them.
    pub fault: Fault,
}

/// What an injected fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum Fault {
    /// Answer at once with this status and a JSON error body.
    Status(u16),
    /// Abort the connection (HTTP/2: the stream) without an answer.
    Reset,
    /// Never answer, until the client goes away.
    Hang,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read scenario {}: {e}", path.display()))?;
        let scenario: Scenario = serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        scenario
            .check()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(scenario)
    }

    /// Checks what the types cannot: non-empty lists, shares in range,
    /// statuses that are statuses.
    pub fn check(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("servers: give at least one server".into());
        }
        for (s, server) in self.servers.iter().enumerate() {
            if server.models.is_empty() {
                return Err(format!("servers[{s}].models: give at least one model"));
            }
            for (m, model) in server.models.iter().enumerate() {
                let at = format!("servers[{s}].models[{m}]");
                if server.models[..m]
                    .iter()
                    .any(|other| other.name == model.name)
                {
                    return Err(format!("{at}.name: model {:?} is listed twice", model.name));
                }
                let total: f64 = model.errors.iter().map(|e| e.percent).sum();
                if model
                    .errors
                    .iter()
                    .any(|e| !(0.0..=100.0).contains(&e.percent))
                    || total > 100.0
                {
                    return Err(format!(
                        "{at}.errors: percentages must be 0-100 and add up to at most 100"
                    ));
                }
                for (e, rule) in model.errors.iter().enumerate() {
                    if let Fault::Status(code) = rule.fault
                        && !(100..=599).contains(&code)
                    {
                        return Err(format!(
                            "{at}.errors[{e}].fault.status: {code} is not an HTTP status"
                        ));
                    }
                }
                if let Some(s) = &model.stragglers
                    && !(0.0..=1.0).contains(&s.fraction)
                {
                    return Err(format!("{at}.stragglers.fraction: must be between 0 and 1"));
                }
                for (field, latency) in [
                    ("latency", Some(&model.latency)),
                    ("timeToFirstToken", model.time_to_first_token.as_ref()),
                ] {
                    match latency {
                        Some(Latency::Uniform { min, max }) if min > max => {
                            return Err(format!("{at}.{field}.uniform: min is above max"));
                        }
                        Some(Latency::LogNormal { sigma, .. })
                            if !(sigma.is_finite() && *sigma >= 0.0) =>
                        {
                            return Err(format!("{at}.{field}.lognormal.sigma: must be 0 or more"));
                        }
                        _ => {}
                    }
                }
                if !model.scale.is_finite() {
                    return Err(format!("{at}.scale: must be a finite number"));
                }
                if model.max_concurrency == Some(0) {
                    return Err(format!("{at}.maxConcurrency: must be at least 1"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
seed: 42
servers:
  - listen: 127.0.0.1:9000
    models:
      - name: llama
        latency: { lognormal: { median: 40ms, sigma: 0.5 } }
        stragglers: { fraction: 0.01, delay: 2s }
        timeToFirstToken: { fixed: 150ms }
        interTokenDelay: 20ms
        tokens: 64
        maxConcurrency: 8
        errors:
          - { percent: 5, fault: { status: 503 } }
          - { percent: 1, fault: reset }
          - { percent: 1, fault: hang }
      - name: bert
        latency: { uniform: { min: 1ms, max: 5ms } }
"#;
        let scenario: Scenario = serde_saphyr::from_str(text).unwrap();
        scenario.check().unwrap();
        let llama = &scenario.servers[0].models[0];
        assert_eq!(llama.errors[1].fault, Fault::Reset);
        assert_eq!(llama.errors[0].fault, Fault::Status(503));
        assert!(matches!(llama.latency, Latency::LogNormal { sigma, .. } if sigma == 0.5));
        assert_eq!(scenario.servers[0].models[1].tokens, 16);
    }

    #[test]
    fn mistakes_are_named() {
        let bad = |text: &str| {
            let parsed: Result<Scenario, _> = serde_saphyr::from_str(text);
            match parsed {
                Err(e) => e.to_string(),
                Ok(s) => s.check().unwrap_err(),
            }
        };
        assert!(
            bad(
                "servers: [{ listen: 127.0.0.1:1, models: [{ name: m, latncy: { fixed: 1ms } }] }]"
            )
            .contains("latncy")
        );
        assert!(
            bad("servers: [{ listen: 127.0.0.1:1, models: [{ name: m, errors: [{ percent: 60, fault: hang }, { percent: 50, fault: reset }] }] }]")
                .contains("add up to at most 100")
        );
        assert!(bad("servers: [{ listen: 127.0.0.1:1, models: [{ name: m, errors: [{ percent: 1, fault: { status: 42 } }] }] }]").contains("not an HTTP status"));
    }
}

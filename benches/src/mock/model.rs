//! A model at run time: it draws each request's fate from the scenario's
//! distributions with a seeded generator, queues requests past its
//! concurrency limit, and counts what happened, including requests whose
//! client went away before the answer was complete.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::scenario::{Fault, Latency, ModelSpec};

/// What happens to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// An injected fault, if any.
    pub fault: Option<Fault>,
    /// Time to the whole answer.
    pub latency: Duration,
    /// Time to the first streamed token.
    pub first_token: Duration,
}

/// The mock's metrics, per server.
pub struct MockMetrics {
    registry: Registry,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    requests: IntCounterVec,
    cancellations: IntCounterVec,
    /// OTLP trace exports received (`POST /v1/traces`).
    pub(super) otlp_exports: IntCounter,
    /// Their bodies' bytes, as sent (compressed or not).
    pub(super) otlp_bytes: IntCounter,
}

impl MockMetrics {
    /// Registers the metric families (gauges in vLLM's names, so that
    /// queue-aware balancing can be tried against the mock).
    pub fn new() -> Self {
        let label = &["model_name"];
        let running = IntGaugeVec::new(
            Opts::new("vllm:num_requests_running", "Requests being answered."),
            label,
        )
        .expect("valid gauge");
        let waiting = IntGaugeVec::new(
            Opts::new(
                "vllm:num_requests_waiting",
                "Requests queued past the model's concurrency.",
            ),
            label,
        )
        .expect("valid gauge");
        let requests = IntCounterVec::new(
            Opts::new(
                "infermesh_mock_requests_total",
                "Requests by the fate drawn for them.",
            ),
            &["model_name", "outcome"],
        )
        .expect("valid counter");
        let cancellations = IntCounterVec::new(
            Opts::new(
                "infermesh_mock_cancellations_total",
                "Requests whose client went away before the answer was complete.",
            ),
            label,
        )
        .expect("valid counter");
        let otlp_exports = IntCounter::new(
            "infermesh_mock_otlp_exports_total",
            "OTLP/HTTP trace exports received on /v1/traces.",
        )
        .expect("valid counter");
        let otlp_bytes = IntCounter::new(
            "infermesh_mock_otlp_bytes_total",
            "Bytes of the OTLP/HTTP trace exports received, as sent.",
        )
        .expect("valid counter");
        let registry = Registry::new();
        for c in [
            Box::new(running.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(waiting.clone()),
            Box::new(requests.clone()),
            Box::new(cancellations.clone()),
            Box::new(otlp_exports.clone()),
            Box::new(otlp_bytes.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        MockMetrics {
            registry,
            running,
            waiting,
            requests,
            cancellations,
            otlp_exports,
            otlp_bytes,
        }
    }

    /// The Prometheus text page.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut out,
        )
        .expect("text encoding into a Vec");
        out
    }
}

impl Default for MockMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One served model.
pub struct Model {
    /// Its scenario entry.
    pub spec: ModelSpec,
    rng: Mutex<StdRng>,
    queue: Option<Arc<Semaphore>>,
    running: IntGauge,
    waiting: IntGauge,
    requests: IntCounterVec,
    cancellations: IntCounter,
}

impl Model {
    /// The model of `spec`, drawing from a generator seeded with `seed`
    /// and the model's name.
    pub fn new(spec: ModelSpec, seed: u64, metrics: &MockMetrics) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        spec.name.hash(&mut hasher);
        let name = [spec.name.as_str()];
        Model {
            rng: Mutex::new(StdRng::seed_from_u64(seed ^ hasher.finish())),
            queue: spec.max_concurrency.map(|n| Arc::new(Semaphore::new(n))),
            running: metrics.running.with_label_values(&name),
            waiting: metrics.waiting.with_label_values(&name),
            requests: metrics.requests.clone(),
            cancellations: metrics.cancellations.with_label_values(&name),
            spec,
        }
    }

    /// Draws the fate of the next request.
    pub fn plan(&self) -> Plan {
        let mut rng = self.rng.lock().expect("model rng lock");
        let mut roll = rng.random_range(0.0..100.0);
        let mut fault = None;
        for rule in &self.spec.errors {
            if roll < rule.percent {
                fault = Some(rule.fault);
                break;
            }
            roll -= rule.percent;
        }
        let mut latency = draw(&self.spec.latency, &mut rng);
        let mut first_token = self
            .spec
            .time_to_first_token
            .as_ref()
            .map_or(latency, |l| draw(l, &mut rng));
        if let Some(s) = &self.spec.stragglers
            && rng.random_range(0.0..1.0) < s.fraction
        {
            latency += s.delay.get();
            first_token += s.delay.get();
        }
        let outcome = match fault {
            None => "ok",
            Some(Fault::Status(_)) => "error",
            Some(Fault::Reset) => "reset",
            Some(Fault::Hang) => "hang",
        };
        self.requests
            .with_label_values(&[self.spec.name.as_str(), outcome])
            .inc();
        Plan {
            fault,
            latency,
            first_token,
        }
    }

    /// Waits for a place to run (counted as waiting meanwhile), then counts
    /// the request as running until the returned guard is dropped. A guard
    /// dropped before [`Running::complete`] counts a cancellation.
    pub async fn admit(self: &Arc<Self>) -> Running {
        let permit = match &self.queue {
            None => None,
            Some(queue) => {
                self.waiting.inc();
                let permit = queue
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the queue is never closed");
                self.waiting.dec();
                Some(permit)
            }
        };
        self.running.inc();
        Running {
            model: self.clone(),
            _permit: permit,
            complete: false,
        }
    }
}

fn draw(latency: &Latency, rng: &mut StdRng) -> Duration {
    match *latency {
        Latency::Fixed(d) => d.get(),
        Latency::Uniform { min, max } => {
            if min == max {
                min.get()
            } else {
                Duration::from_secs_f64(
                    rng.random_range(min.get().as_secs_f64()..=max.get().as_secs_f64()),
                )
            }
        }
        Latency::LogNormal { median, sigma } => {
            let median = median.get().as_secs_f64().max(1e-9);
            let distribution = LogNormal::new(median.ln(), sigma)
                .expect("sigma checked to be finite and not negative");
            Duration::from_secs_f64(distribution.sample(rng).min(86_400.0))
        }
    }
}

/// A request being answered; see [`Model::admit`].
pub struct Running {
    model: Arc<Model>,
    _permit: Option<OwnedSemaphorePermit>,
    complete: bool,
}

impl Running {
    /// The answer went out whole.
    pub fn complete(mut self) {
        self.complete = true;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.model.running.dec();
        if !self.complete {
            self.model.cancellations.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::scenario::{ErrorRule, Stragglers};

    fn model(spec: ModelSpec, seed: u64) -> Model {
        Model::new(spec, seed, &MockMetrics::new())
    }

    #[test]
    fn the_same_seed_draws_the_same_fates() {
        let mut spec = ModelSpec::simple(
            "m",
            infermesh_api::Duration::from_millis(10),
            infermesh_api::Duration::ZERO,
            4,
        );
        spec.latency = Latency::LogNormal {
            median: infermesh_api::Duration::from_millis(40),
            sigma: 0.5,
        };
        spec.errors = vec![ErrorRule {
            percent: 10.0,
            fault: Fault::Status(500),
        }];
        let a: Vec<Plan> = (0..100)
            .map({
                let m = model(spec.clone(), 7);
                move |_| m.plan()
            })
            .collect();
        let b: Vec<Plan> = (0..100)
            .map({
                let m = model(spec.clone(), 7);
                move |_| m.plan()
            })
            .collect();
        let c: Vec<Plan> = (0..100)
            .map({
                let m = model(spec.clone(), 8);
                move |_| m.plan()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn shares_follow_the_scenario() {
        let mut spec = ModelSpec::simple(
            "m",
            infermesh_api::Duration::from_millis(10),
            infermesh_api::Duration::ZERO,
            4,
        );
        spec.errors = vec![
            ErrorRule {
                percent: 10.0,
                fault: Fault::Status(503),
            },
            ErrorRule {
                percent: 5.0,
                fault: Fault::Reset,
            },
        ];
        spec.stragglers = Some(Stragglers {
            fraction: 0.02,
            delay: infermesh_api::Duration::from_secs(1),
        });
        let m = model(spec, 1);
        let plans: Vec<Plan> = (0..20_000).map(|_| m.plan()).collect();
        let share = |f: &dyn Fn(&Plan) -> bool| {
            plans.iter().filter(|p| f(p)).count() as f64 / plans.len() as f64
        };
        // Standard deviations: 0.21%, 0.15%, 0.10%; allow five.
        assert!((share(&|p| p.fault == Some(Fault::Status(503))) - 0.10).abs() < 0.011);
        assert!((share(&|p| p.fault == Some(Fault::Reset)) - 0.05).abs() < 0.008);
        assert!((share(&|p| p.latency >= Duration::from_secs(1)) - 0.02).abs() < 0.005);
    }

    #[test]
    fn lognormal_has_the_given_median() {
        let mut spec = ModelSpec::simple(
            "m",
            infermesh_api::Duration::ZERO,
            infermesh_api::Duration::ZERO,
            1,
        );
        spec.latency = Latency::LogNormal {
            median: infermesh_api::Duration::from_millis(40),
            sigma: 0.5,
        };
        let m = model(spec, 3);
        let mut latencies: Vec<Duration> = (0..10_001).map(|_| m.plan().latency).collect();
        latencies.sort();
        let median = latencies[5_000].as_secs_f64();
        assert!((0.037..0.043).contains(&median), "median {median}");
    }

    #[tokio::test]
    async fn running_waiting_and_cancellations_are_counted() {
        let metrics = MockMetrics::new();
        let mut spec = ModelSpec::simple(
            "m",
            infermesh_api::Duration::ZERO,
            infermesh_api::Duration::ZERO,
            1,
        );
        spec.max_concurrency = Some(1);
        let m = Arc::new(Model::new(spec, 0, &metrics));
        let first = m.admit().await;
        let waiting = tokio::spawn({
            let m = m.clone();
            async move { m.admit().await }
        });
        tokio::task::yield_now().await;
        let page = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            page.contains("vllm:num_requests_running{model_name=\"m\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("vllm:num_requests_waiting{model_name=\"m\"} 1"),
            "{page}"
        );
        first.complete();
        let second = waiting.await.unwrap();
        drop(second);
        let page = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            page.contains("vllm:num_requests_running{model_name=\"m\"} 0"),
            "{page}"
        );
        assert!(
            page.contains("infermesh_mock_cancellations_total{model_name=\"m\"} 1"),
            "{page}"
        );
    }
}

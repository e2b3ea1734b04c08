//! Hedged requests ("The Tail at Scale", Dean and Barroso): when an
//! attempt has no response headers after a delay, another attempt of the
//! same request goes to another endpoint, and the first answer is used.
//!
//! This module owns when a hedge is due (a fixed delay, or a percentile of
//! the rule's recent times to response headers), the budget that caps the
//! extra requests, and the race between attempts: the losers' futures are
//! dropped, which resets their HTTP/2 stream or closes their HTTP/1.1
//! connection, so the slow server stops working for nobody. The retry
//! layer runs the race for each of its attempts: hedging sits inside
//! retrying, never the other way round.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{Request, Response};
use infermesh_api::HedgePolicy;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::core::body::{BoxFuture, ProxyBody};
use crate::core::error::{Origin, ProxyError};
use crate::route::metrics::Metrics;

/// Responses seen before the observed percentile replaces the fixed delay.
const MIN_SAMPLES: usize = 100;

/// Recent samples the percentile is taken over.
const WINDOW: usize = 1024;

/// The percentile is computed again after this many new samples.
const RECOMPUTE_EVERY: usize = 64;

/// Hedges that may be sent at once beyond the steady share, in tokens.
const BURST: i64 = 10;

/// One token, in the thousandths the budget counts in.
const TOKEN: i64 = 1000;

/// The hedging of one route rule.
#[derive(Debug)]
pub(crate) struct Hedging {
    policy: HedgePolicy,
    state: Arc<HedgeState>,
    deposit: i64,
    sent: IntCounter,
    won: IntCounter,
    refused: IntCounter,
    budget_exhausted: IntCounter,
    not_replayable: IntCounter,
}

/// What a rule's hedging has spent and learned: its budget and the
/// latencies it observed. A config change builds every rule's stack
/// again; the new stack of the same rule takes this over
/// ([`Hedging::continue_from`]), so that a change (any, most of them to
/// other routes) neither refills the budget to a full burst nor forgets
/// the delay it had learned.
#[derive(Debug)]
pub(crate) struct HedgeState {
    /// Thousandths of a hedge that may be sent; each request adds
    /// `budgetPercent` × 10, each hedge takes 1000.
    tokens: AtomicI64,
    observed: Option<Observed>,
}

impl HedgeState {
    /// A full burst, nothing observed yet.
    fn new(percentile: Option<f64>) -> Self {
        HedgeState {
            tokens: AtomicI64::new(BURST * TOKEN),
            observed: percentile.map(Observed::new),
        }
    }
}

impl Hedging {
    /// Hedging by `policy` on route `route`.
    pub(crate) fn new(policy: &HedgePolicy, route: &str, metrics: &Metrics) -> Self {
        let outcome = |o: &str| metrics.hedges.with_label_values(&[route, o]);
        Hedging {
            state: Arc::new(HedgeState::new(policy.percentile)),
            deposit: (policy.budget_percent * TOKEN as f64 / 100.0).round() as i64,
            policy: policy.clone(),
            sent: outcome("sent"),
            won: outcome("won"),
            refused: outcome("refused"),
            budget_exhausted: outcome("budget_exhausted"),
            not_replayable: outcome("not_replayable"),
        }
    }

    /// What this rule's hedging has spent and learned so far.
    pub(crate) fn state(&self) -> &Arc<HedgeState> {
        &self.state
    }

    /// Goes on from `previous`, the state of the same rule under the
    /// config before: its budget always, its observed latencies too when
    /// the percentile they were kept for is still the one asked for.
    pub(crate) fn continue_from(&mut self, previous: &Arc<HedgeState>) {
        let percentile = self.state.observed.as_ref().map(|o| o.percentile);
        self.state = if previous.observed.as_ref().map(|o| o.percentile) == percentile {
            previous.clone()
        } else {
            Arc::new(HedgeState {
                tokens: AtomicI64::new(previous.tokens.load(Ordering::Relaxed)),
                observed: percentile.map(Observed::new),
            })
        };
    }

    /// How long an attempt waits for response headers before a hedge.
    pub(crate) fn delay(&self) -> Duration {
        self.state
            .observed
            .as_ref()
            .and_then(Observed::percentile)
            .unwrap_or(self.policy.delay.get())
    }

    /// Takes one hedge from the budget, if it holds one.
    fn take(&self) -> bool {
        self.state
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= TOKEN).then_some(t - TOKEN)
            })
            .is_ok()
    }

    /// Counts a request: it adds its share to the budget.
    pub(crate) fn request(&self) {
        self.credit(self.deposit);
    }

    /// Adds `amount` to the budget, up to the burst.
    fn credit(&self, amount: i64) {
        let _ = self
            .state
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + amount).min(BURST * TOKEN))
            });
    }

    /// Sends `first`, then, each time the delay passes without a usable
    /// answer, a hedge made by `next` (`None` when the request cannot be
    /// sent again yet: its body is still arriving, or too large), while the
    /// budget allows. Returns the first usable answer: a response that is
    /// not a server error (5xx). When every attempt failed, returns the
    /// first failed response, else the first error, for the retry policy
    /// to judge. Every other attempt is cancelled by dropping it, and the
    /// time it ran counts as a sample of the latency at least.
    pub(crate) async fn race(
        &self,
        first: Request<ProxyBody>,
        mut next: impl FnMut() -> Option<Request<ProxyBody>>,
        send: impl Fn(Request<ProxyBody>) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let timed = |index: usize, request| {
            let exchange = send(request);
            async move {
                let result = exchange.await;
                (index, result)
            }
        };
        let mut started = vec![Instant::now()];
        let mut finished = Vec::new();
        let mut attempts = FuturesUnordered::new();
        attempts.push(timed(0, first));
        let mut can_hedge = true;
        let mut unreplayable_seen = false;
        let mut kept: Option<Result<Response<ProxyBody>, ProxyError>> = None;
        let delay = self.delay();
        let mut hedge_at = started[0] + delay;
        // At the top of each turn at least one attempt is in flight.
        let (winner, result) = loop {
            let hedge_due = can_hedge && started.len() <= self.policy.max_hedges as usize;
            tokio::select! {
                biased;
                Some((index, result)) = attempts.next() => {
                    finished.push(index);
                    let usable = match &result {
                        Ok(response) if !response.status().is_server_error() => {
                            if let Some(observed) = &self.state.observed {
                                observed.add(started[index].elapsed());
                            }
                            true
                        }
                        Ok(_) => false,
                        Err(error) => {
                            if index > 0 && error.kind().origin() == Origin::Proxy {
                                // Not sent after all: the proxy refused it
                                // (no other endpoint, or the backend's
                                // limits).
                                self.refused.inc();
                                self.credit(TOKEN);
                            }
                            false
                        }
                    };
                    if usable {
                        break (Some(index), result);
                    }
                    // Keep the first failed response, else the first error.
                    kept = match kept {
                        None => Some(result),
                        Some(Err(_)) if result.is_ok() => Some(result),
                        keep => keep,
                    };
                    if attempts.is_empty() {
                        break (None, kept.take().expect("kept just above"));
                    }
                }
                () = tokio::time::sleep_until(hedge_at), if hedge_due => {
                    hedge_at += delay;
                    if !self.take() {
                        self.budget_exhausted.inc();
                        can_hedge = false;
                        continue;
                    }
                    let Some(request) = next() else {
                        // Nothing was sent: the token goes back, and the
                        // next delay looks again (the body may have
                        // arrived whole by then).
                        self.credit(TOKEN);
                        if !std::mem::replace(&mut unreplayable_seen, true) {
                            self.not_replayable.inc();
                        }
                        continue;
                    };
                    self.sent.inc();
                    started.push(Instant::now());
                    attempts.push(timed(started.len() - 1, request));
                }
            }
        };
        if winner.is_some_and(|index| index > 0) {
            self.won.inc();
        }
        // The attempts still running are cancelled as they drop; they took
        // this long at least.
        if let Some(observed) = &self.state.observed {
            drop(attempts);
            for (index, sent) in started.iter().enumerate() {
                if !finished.contains(&index) {
                    observed.add(sent.elapsed());
                }
            }
        }
        result
    }
}

/// Recent times to response headers and the percentile of them that
/// hedges wait for, recomputed every [`RECOMPUTE_EVERY`] samples.
#[derive(Debug)]
struct Observed {
    percentile: f64,
    samples: Mutex<Samples>,
    /// The percentile in nanoseconds; 0 until [`MIN_SAMPLES`] were seen.
    cached: AtomicU64,
}

#[derive(Debug, Default)]
struct Samples {
    ring: Vec<Duration>,
    next: usize,
    since_recompute: usize,
}

impl Observed {
    fn new(percentile: f64) -> Self {
        Observed {
            percentile,
            samples: Mutex::new(Samples::default()),
            cached: AtomicU64::new(0),
        }
    }

    fn add(&self, latency: Duration) {
        // A sample lost to a busy lock changes nothing that matters; a
        // wait on the request path would.
        let Ok(mut samples) = self.samples.try_lock() else {
            return;
        };
        if samples.ring.len() < WINDOW {
            samples.ring.push(latency);
        } else {
            let at = samples.next;
            samples.ring[at] = latency;
        }
        samples.next = (samples.next + 1) % WINDOW;
        samples.since_recompute += 1;
        if samples.ring.len() >= MIN_SAMPLES && samples.since_recompute >= RECOMPUTE_EVERY {
            samples.since_recompute = 0;
            let mut sorted = samples.ring.clone();
            drop(samples);
            let rank = ((self.percentile / 100.0) * (sorted.len() - 1) as f64).round() as usize;
            let (_, value, _) = sorted.select_nth_unstable(rank);
            // Never below the shortest delay the config allows.
            let nanos = u64::try_from(value.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1_000_000);
            self.cached.store(nanos, Ordering::Relaxed);
        }
    }

    fn percentile(&self) -> Option<Duration> {
        match self.cached.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use http::StatusCode;

    use super::*;
    use crate::core::body::empty;
    use crate::core::metrics::Registry;

    /// What the fake upstream did.
    #[derive(Default)]
    struct Upstream {
        sent: AtomicUsize,
        cancelled: AtomicUsize,
    }

    /// Counts an attempt cancelled (dropped) before it answered.
    struct Cancelled(Arc<Upstream>, bool);

    impl Drop for Cancelled {
        fn drop(&mut self) {
            if !self.1 {
                self.0.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Attempt `n` (in the order sent) answers `answers[n]` after its delay
    /// (status 0: fails with no endpoint, as a hedge with nowhere to go).
    fn upstream(
        upstream: &Arc<Upstream>,
        answers: Vec<(u64, u16)>,
    ) -> impl Fn(Request<ProxyBody>) -> BoxFuture<Result<Response<ProxyBody>, ProxyError>> {
        let upstream = upstream.clone();
        move |request| {
            let n = upstream.sent.fetch_add(1, Ordering::Relaxed);
            let (millis, status) = answers[n.min(answers.len() - 1)];
            let upstream = upstream.clone();
            Box::pin(async move {
                let mut guard = Cancelled(upstream, false);
                tokio::time::sleep(Duration::from_millis(millis)).await;
                guard.1 = true;
                drop(request);
                if status == 0 {
                    return Err(ProxyError::new(crate::core::error::ErrorKind::NoEndpoint));
                }
                let mut response = Response::new(empty());
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                response.headers_mut().insert("x-attempt", n.into());
                Ok(response)
            })
        }
    }

    fn policy(delay_ms: u64) -> HedgePolicy {
        HedgePolicy {
            delay: infermesh_api::Duration::from_millis(delay_ms),
            ..HedgePolicy::default()
        }
    }

    fn request() -> Request<ProxyBody> {
        Request::new(empty())
    }

    /// Races a request that can always be sent again against `answers`.
    async fn race(
        hedging: &Hedging,
        answers: Vec<(u64, u16)>,
    ) -> (Response<ProxyBody>, Arc<Upstream>) {
        hedging.request();
        let seen = Arc::new(Upstream::default());
        let response = hedging
            .race(request(), || Some(request()), upstream(&seen, answers))
            .await
            .unwrap();
        (response, seen)
    }

    fn count(metrics: &Metrics, outcome: &str) -> u64 {
        metrics.hedges.with_label_values(&["r", outcome]).get()
    }

    #[test]
    fn the_next_config_of_a_rule_goes_on_with_its_budget() {
        let metrics = Metrics::register(&Registry::new());
        let spent = Hedging::new(&policy(50), "r", &metrics);
        while spent.take() {}
        // A rebuilt rule holds no fresh burst.
        let mut next = Hedging::new(&policy(50), "r", &metrics);
        next.continue_from(spent.state());
        assert!(!next.take(), "the config change refilled the budget");
        next.request();
        assert!(!next.take(), "a tenth of a hedge per request");
        // A new percentile: the latencies start afresh, the budget goes on.
        let observing = HedgePolicy {
            percentile: Some(99.0),
            ..policy(50)
        };
        let mut watching = Hedging::new(&observing, "r", &metrics);
        watching.continue_from(next.state());
        assert!(!Arc::ptr_eq(watching.state(), next.state()));
        assert!(!watching.take(), "the budget went on");
        assert!(watching.state().observed.is_some());
        // Without a previous state a rule starts with a full burst.
        let fresh = Hedging::new(&policy(50), "r", &metrics);
        assert!((0..BURST).all(|_| fresh.take()));
        assert!(!fresh.take());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_hedged_after_the_delay_and_the_loser_is_cancelled() {
        let metrics = Metrics::register(&Registry::new());
        let hedging = Hedging::new(&policy(50), "r", &metrics);
        let started = Instant::now();
        let (response, seen) = race(&hedging, vec![(1000, 200), (10, 200)]).await;
        assert_eq!(response.headers()["x-attempt"], "1", "the hedge's answer");
        assert_eq!(started.elapsed(), Duration::from_millis(60));
        assert_eq!(seen.sent.load(Ordering::Relaxed), 2);
        assert_eq!(
            seen.cancelled.load(Ordering::Relaxed),
            1,
            "the slow attempt was dropped"
        );
        assert_eq!((count(&metrics, "sent"), count(&metrics, "won")), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_within_the_delay_sends_no_hedge() {
        let metrics = Metrics::register(&Registry::new());
        let hedging = Hedging::new(&policy(50), "r", &metrics);
        let (response, seen) = race(&hedging, vec![(49, 200)]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(seen.sent.load(Ordering::Relaxed), 1);
        assert_eq!(count(&metrics, "sent"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_attempt_can_still_win_after_a_hedge_was_sent() {
        let metrics = Metrics::register(&Registry::new());
        let hedging = Hedging::new(&policy(50), "r", &metrics);
        let (response, seen) = race(&hedging, vec![(70, 200), (100, 200)]).await;
        assert_eq!(response.headers()["x-attempt"], "0");
        assert_eq!(
            seen.cancelled.load(Ordering::Relaxed),
            1,
            "the hedge was dropped"
        );
        assert_eq!((count(&metrics, "sent"), count(&metrics, "won")), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_error_waits_for_the_hedge_in_flight() {
        let metrics = Metrics::register(&Registry::new());
        let hedging = Hedging::new(&policy(50), "r", &metrics);
        let (response, _) = race(&hedging, vec![(100, 503), (100, 200)]).await;
        assert_eq!(response.status(), 200);
        // With nothing else in flight, the failure is the retry policy's.
        let (response, seen) = race(&hedging, vec![(10, 503)]).await;
        assert_eq!(response.status(), 503);
        assert_eq!(seen.sent.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_be_sent_again_is_not_hedged() {
        let metrics = Metrics::register(&Registry::new());
        let hedging = Hedging::new(&policy(50), "r", &metrics);
        let seen = Arc::new(Upstream::default());
        let response = hedging
            .race(request(), || None, upstream(&seen, vec![(300, 200)]))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(seen.sent.load(Ordering::Relaxed), 1);
        assert_eq!(count(&metrics, "not_replayable"), 1);
        assert_eq!(
            hedging.state.tokens.load(Ordering::Relaxed),
            BURST * TOKEN,
            "the token went back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn up_to_max_hedges_are_sent_one_delay_apart() {
        let metrics = Metrics::register(&Registry::new());
        let policy = HedgePolicy {
            max_hedges: 2,
            ..policy(50)
        };
        let hedging = Hedging::new(&policy, "r", &metrics);
        let started = Instant::now();
        let (response, seen) = race(&hedging, vec![(1000, 200), (1000, 200), (10, 200)]).await;
        assert_eq!(response.headers()["x-attempt"], "2");
        assert_eq!(started.elapsed(), Duration::from_millis(110));
        assert_eq!(seen.cancelled.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_hedges_at_its_share_of_requests() {
        let metrics = Metrics::register(&Registry::new());
        let hedging = Hedging::new(&policy(50), "r", &metrics);
        // Every first attempt is slow: each request would hedge.
        for _ in 0..1000 {
            race(&hedging, vec![(60, 200), (5, 200)]).await;
        }
        let sent = count(&metrics, "sent");
        // 5 % of 1000 requests, plus the burst of 10.
        assert!((50..=60).contains(&sent), "{sent} hedges");
        assert_eq!(sent + count(&metrics, "budget_exhausted"), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_with_nowhere_to_go_gives_its_token_back() {
        let metrics = Metrics::register(&Registry::new());
        let hedging = Hedging::new(&policy(50), "r", &metrics);
        let (response, _) = race(&hedging, vec![(200, 200), (0, 0)]).await;
        assert_eq!(response.headers()["x-attempt"], "0");
        assert_eq!(
            (count(&metrics, "sent"), count(&metrics, "refused")),
            (1, 1)
        );
        assert_eq!(hedging.state.tokens.load(Ordering::Relaxed), BURST * TOKEN);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_attempt_counts_as_a_sample_of_at_least_its_time() {
        let metrics = Metrics::register(&Registry::new());
        let policy = HedgePolicy {
            percentile: Some(99.0),
            ..policy(50)
        };
        let hedging = Hedging::new(&policy, "r", &metrics);
        race(&hedging, vec![(1000, 200), (10, 200)]).await;
        let samples = hedging
            .state
            .observed
            .as_ref()
            .unwrap()
            .samples
            .lock()
            .unwrap();
        assert_eq!(
            samples.ring,
            [Duration::from_millis(10), Duration::from_millis(60)],
            "the hedge's answer, then the stalled attempt's time until it was dropped"
        );
    }

    #[test]
    fn the_delay_follows_the_observed_percentile_once_enough_answers_were_seen() {
        let metrics = Metrics::register(&Registry::new());
        let policy = HedgePolicy {
            percentile: Some(95.0),
            ..policy(200)
        };
        let hedging = Hedging::new(&policy, "r", &metrics);
        let observed = hedging.state.observed.as_ref().unwrap();
        for ms in 1..=99 {
            observed.add(Duration::from_millis(ms));
        }
        assert_eq!(
            hedging.delay(),
            Duration::from_millis(200),
            "too few answers yet"
        );
        observed.add(Duration::from_millis(100));
        assert_eq!(
            hedging.delay(),
            Duration::from_millis(95),
            "p95 of 1..=100 ms"
        );
        // Recomputed every 64 answers: at the 164th, p95 of 1..=164 ms.
        for ms in 101..=163 {
            observed.add(Duration::from_millis(ms));
        }
        assert_eq!(hedging.delay(), Duration::from_millis(95));
        observed.add(Duration::from_millis(164));
        assert_eq!(hedging.delay(), Duration::from_millis(156));
    }
}

//! Whether an endpoint should get requests: outlier ejection after
//! consecutive failures (with one probe request when the ejection ends),
//! the verdict of active health checks, and the pause a `Retry-After` on a
//! 429 or 503 asks for.
//!
//! The balancer reads this state on every request with a few atomic loads;
//! the rarer transitions (an ejection, a probe's result) take a small
//! per-endpoint lock so that concurrent responses cannot eject twice.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infermesh_api::OutlierDetection;
use prometheus::IntCounter;
use tokio::time::Instant;

/// What an endpoint is doing, as shown on `/endpoints` and in
/// `infermesh_endpoints{state}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointState {
    /// Gets its share of requests.
    Healthy,
    /// Ejected after consecutive failures, until its ejection ends.
    Ejected,
    /// Its ejection ended: the next request is a probe that decides.
    Probing,
    /// Failing its active health checks.
    Unhealthy,
    /// Asked for a pause with `Retry-After`.
    Busy,
}

impl EndpointState {
    /// Every state, in the order metrics list them.
    pub const ALL: [EndpointState; 5] = [
        EndpointState::Healthy,
        EndpointState::Ejected,
        EndpointState::Probing,
        EndpointState::Unhealthy,
        EndpointState::Busy,
    ];

    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Healthy => "healthy",
            EndpointState::Ejected => "ejected",
            EndpointState::Probing => "probing",
            EndpointState::Unhealthy => "unhealthy",
            EndpointState::Busy => "busy",
        }
    }
}

/// A backend's outlier-detection settings, and the lock under which an
/// ejection is decided against the `maxEjectionPercent` cap.
#[derive(Debug)]
pub struct Ejections {
    settings: OutlierDetection,
    deciding: Mutex<()>,
    counter: IntCounter,
}

impl Ejections {
    /// `counter` is `infermesh_endpoint_ejections_total{backend}`.
    pub fn new(settings: OutlierDetection, counter: IntCounter) -> Self {
        Ejections {
            settings,
            deciding: Mutex::new(()),
            counter,
        }
    }

    /// How many of `endpoints` may be ejected at once: the configured share,
    /// rounded up (so always at least one).
    fn cap(&self, endpoints: usize) -> usize {
        (endpoints * self.settings.max_ejection_percent as usize)
            .div_ceil(100)
            .max(1)
    }
}

/// The health of one endpoint. Times are kept as microseconds since the
/// endpoint was created, on tokio's clock.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Ejected or probing (counted in [`Ejections`]).
    ejected: AtomicBool,
    ejected_until: AtomicU64,
    probe_in_flight: Arc<AtomicBool>,
    busy_until: AtomicU64,
    unhealthy: AtomicBool,
    /// Active checks in a row that passed (> 0) or failed (< 0).
    check_streak: AtomicI32,
    transitions: Mutex<History>,
}

/// What decides the next ejection's length.
#[derive(Debug, Default)]
struct History {
    /// Ejections so far, less one per base ejection time spent healthy.
    ejections: u32,
    /// When the endpoint last became healthy (µs since epoch).
    healthy_since: u64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            ejected_until: AtomicU64::new(0),
            probe_in_flight: Arc::default(),
            busy_until: AtomicU64::new(0),
            unhealthy: AtomicBool::new(false),
            check_streak: AtomicI32::new(0),
            transitions: Mutex::new(History::default()),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Health {
    fn at(&self, now: Instant) -> u64 {
        micros(now.saturating_duration_since(self.epoch))
    }

    /// The endpoint's state at `now`.
    pub fn state(&self, now: Instant) -> EndpointState {
        if self.unhealthy.load(Ordering::Acquire) {
            return EndpointState::Unhealthy;
        }
        let t = self.at(now);
        if self.ejected.load(Ordering::Acquire) {
            return if t < self.ejected_until.load(Ordering::Acquire) {
                EndpointState::Ejected
            } else {
                EndpointState::Probing
            };
        }
        let busy_until = self.busy_until.load(Ordering::Acquire);
        if busy_until != 0 {
            if t < busy_until {
                return EndpointState::Busy;
            }
            // The pause is over: forget it, so the next check is cheap.
            let _ = self.busy_until.compare_exchange(
                busy_until,
                0,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        EndpointState::Healthy
    }

    /// Whether the balancer may send a request here at `now`. A probing
    /// endpoint takes one request at a time.
    pub fn is_available(&self, now: Instant) -> bool {
        // The common case, without reading the clock.
        if !self.unhealthy.load(Ordering::Acquire)
            && !self.ejected.load(Ordering::Acquire)
            && self.busy_until.load(Ordering::Acquire) == 0
        {
            return true;
        }
        match self.state(now) {
            EndpointState::Healthy => true,
            EndpointState::Probing => !self.probe_in_flight.load(Ordering::Acquire),
            EndpointState::Ejected | EndpointState::Unhealthy | EndpointState::Busy => false,
        }
    }

    /// Called when a request is sent here: if the endpoint is probing and
    /// no other request is its probe, this one is. The probe's outcome goes
    /// to [`Health::succeeded`] or [`Health::failed`]; a probe dropped
    /// without one (the client went away) lets the next request probe.
    pub fn on_send(&self, now: Instant) -> Option<Probe> {
        (self.state(now) == EndpointState::Probing
            && self
                .probe_in_flight
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok())
        .then(|| Probe(self.probe_in_flight.clone()))
    }

    /// How long the endpoint is still ejected, if it is.
    pub fn ejected_for(&self, now: Instant) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Acquire);
        let t = self.at(now);
        (self.ejected.load(Ordering::Acquire) && t < until)
            .then(|| Duration::from_micros(until - t))
    }

    /// Whether the endpoint is ejected or waiting for its probe.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    /// Failures in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Keeps requests away for `pause`, as a `Retry-After` asked.
    pub fn pause(&self, now: Instant, pause: Duration) {
        self.busy_until
            .fetch_max(self.at(now).saturating_add(micros(pause)), Ordering::AcqRel);
    }

    /// Records one active health check: `unhealthy` checks failed in a
    /// row take the endpoint out of the rotation, `healthy` passed in a row
    /// bring it back. Returns whether the verdict changed.
    pub fn checked(&self, passed: bool, healthy: u32, unhealthy: u32) -> bool {
        let next = |s: i32| match (passed, s) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        let previous = self
            .check_streak
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(next(s)))
            .expect("the update always succeeds");
        let streak = next(previous);
        let threshold = if passed { healthy } else { unhealthy };
        streak.unsigned_abs() >= threshold
            && self.unhealthy.swap(!passed, Ordering::AcqRel) == passed
    }

    /// Records a successful exchange: the failure streak ends, and the
    /// probe (or any request that reached the endpoint after its ejection
    /// ended) restores an ejected endpoint.
    pub fn succeeded(&self, now: Instant, probe: Option<Probe>) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if !self.ejected.load(Ordering::Acquire) {
            return;
        }
        let mut history = self.transitions.lock().expect("health lock");
        let ended = self.at(now) >= self.ejected_until.load(Ordering::Acquire);
        if (probe.is_some() || ended) && self.ejected.swap(false, Ordering::AcqRel) {
            history.healthy_since = self.at(now);
        }
    }

    /// Records a failed exchange: the endpoint is ejected when it reaches
    /// the backend's consecutive-failure threshold (and the backend's cap
    /// allows), or again when it was the probe that failed. `endpoints` is
    /// the backend's endpoint count and `ejected` counts those ejected now.
    /// Returns the ejection's length when it ejected the endpoint.
    pub fn failed(
        &self,
        now: Instant,
        probe: Option<Probe>,
        ejections: &Ejections,
        endpoints: usize,
        ejected: impl Fn() -> usize,
    ) -> Option<Duration> {
        let settings = &ejections.settings;
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if settings.consecutive_failures == 0 {
            return None;
        }
        if probe.is_none() && failures < settings.consecutive_failures {
            return None;
        }
        let mut history = self.transitions.lock().expect("health lock");
        let t = self.at(now);
        let base = micros(settings.base_ejection_time.get());
        if probe.is_some() {
            if !self.ejected.load(Ordering::Acquire) {
                return None; // Another request restored it meanwhile.
            }
        } else {
            if self.ejected.load(Ordering::Acquire) {
                return None;
            }
            // One ejection decided at a time per backend, so two endpoints
            // failing at once cannot both take the last place under the cap.
            let _deciding = ejections.deciding.lock().expect("ejection lock");
            if ejected() >= ejections.cap(endpoints) {
                return None; // Enough of the backend is ejected already.
            }
            // Time spent healthy forgets earlier ejections.
            let healthy_for = t.saturating_sub(history.healthy_since);
            let forgotten = u32::try_from(healthy_for / base.max(1)).unwrap_or(u32::MAX);
            history.ejections = history.ejections.saturating_sub(forgotten);
        }
        let length = base
            .saturating_mul(1u64 << history.ejections.min(32))
            .min(micros(settings.max_ejection_time.get()));
        history.ejections = history.ejections.saturating_add(1);
        // The new end first: no reader may see the endpoint ejected with
        // the old end, which would make it probing at once.
        self.ejected_until.store(t + length, Ordering::Release);
        self.ejected.store(true, Ordering::Release);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        ejections.counter.inc();
        drop(probe);
        Some(Duration::from_micros(length))
    }
}

/// The one probe request of an endpoint whose ejection ended. Dropping it
/// frees the endpoint for the next probe.
#[derive(Debug)]
pub struct Probe(Arc<AtomicBool>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_api::Duration as ConfigDuration;

    fn ejections(percent: u32) -> Ejections {
        Ejections::new(
            OutlierDetection {
                consecutive_failures: 5,
                base_ejection_time: ConfigDuration::from_secs(30),
                max_ejection_time: ConfigDuration::from_secs(300),
                max_ejection_percent: percent,
            },
            IntCounter::new("t", "t").unwrap(),
        )
    }

    /// Fails `health` `times` times; `all` are the backend's endpoints.
    fn fail(health: &Health, ejections: &Ejections, times: u32, all: &[&Health]) {
        for _ in 0..times {
            let probe = health.on_send(Instant::now());
            health.failed(Instant::now(), probe, ejections, 3, || {
                all.iter().filter(|h| h.is_ejected()).count()
            });
        }
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_eject_then_a_probe_restores() {
        let e = ejections(50);
        let h = Health::default();
        fail(&h, &e, 4, &[&h]);
        assert_eq!(h.state(Instant::now()), EndpointState::Healthy);
        fail(&h, &e, 1, &[&h]);
        assert_eq!(h.state(Instant::now()), EndpointState::Ejected);
        assert!(!h.is_available(Instant::now()));
        assert!(h.is_ejected());
        assert_eq!(e.counter.get(), 1);

        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(h.state(Instant::now()), EndpointState::Ejected);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.state(Instant::now()), EndpointState::Probing);
        assert!(h.is_available(Instant::now()));
        let probe = h.on_send(Instant::now());
        assert!(probe.is_some());
        assert!(
            !h.is_available(Instant::now()),
            "one probe at a time while probing"
        );
        assert!(h.on_send(Instant::now()).is_none(), "and only one");
        h.succeeded(Instant::now(), probe);
        assert_eq!(h.state(Instant::now()), EndpointState::Healthy);
        assert!(h.is_available(Instant::now()));
        assert!(!h.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_without_an_answer_lets_the_next_request_probe() {
        let e = ejections(50);
        let h = Health::default();
        fail(&h, &e, 5, &[&h]);
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = h.on_send(Instant::now());
        assert!(probe.is_some() && !h.is_available(Instant::now()));
        drop(probe); // the client went away
        assert!(h.is_available(Instant::now()));
        let probe = h.on_send(Instant::now());
        h.succeeded(Instant::now(), probe);
        assert_eq!(h.state(Instant::now()), EndpointState::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_grow_exponentially_up_to_the_max() {
        let e = ejections(50);
        let h = Health::default();
        fail(&h, &e, 5, &[&h]);
        let mut lengths = Vec::new();
        for _ in 0..5 {
            let length = h.ejected_for(Instant::now()).unwrap();
            lengths.push(length.as_secs());
            tokio::time::advance(length).await;
            fail(&h, &e, 1, &[&h]); // the probe fails
        }
        assert_eq!(lengths, [30, 60, 120, 240, 300]);
        assert_eq!(e.counter.get(), 6);
        assert!(h.is_ejected(), "still ejected");
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_healthy_shortens_the_next_ejection() {
        let e = ejections(50);
        let h = Health::default();
        fail(&h, &e, 5, &[&h]);
        tokio::time::advance(Duration::from_secs(30)).await;
        fail(&h, &e, 1, &[&h]);
        assert_eq!(h.ejected_for(Instant::now()), Some(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(60)).await;
        let probe = h.on_send(Instant::now());
        h.succeeded(Instant::now(), probe);
        // Two ejections so far; a minute healthy forgets both.
        tokio::time::advance(Duration::from_secs(60)).await;
        fail(&h, &e, 5, &[&h]);
        assert_eq!(h.ejected_for(Instant::now()), Some(Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_keeps_part_of_the_backend_serving() {
        let e = ejections(50);
        let [a, b, c] = [(); 3].map(|_| Health::default());
        for h in [&a, &b, &c] {
            fail(h, &e, 5, &[&a, &b, &c]);
        }
        assert_eq!(a.state(Instant::now()), EndpointState::Ejected);
        assert_eq!(b.state(Instant::now()), EndpointState::Ejected);
        assert_eq!(
            c.state(Instant::now()),
            EndpointState::Healthy,
            "50% of 3 endpoints, rounded up, is 2"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_the_endpoint() {
        let h = Health::default();
        h.pause(Instant::now(), Duration::from_secs(2));
        assert_eq!(h.state(Instant::now()), EndpointState::Busy);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(h.state(Instant::now()), EndpointState::Healthy);
    }

    #[test]
    fn active_checks_flip_the_state_after_their_thresholds() {
        let h = Health::default();
        let now = Instant::now();
        for _ in 0..2 {
            h.checked(false, 2, 3);
            assert_eq!(h.state(now), EndpointState::Healthy);
        }
        h.checked(false, 2, 3);
        assert_eq!(h.state(now), EndpointState::Unhealthy);
        h.checked(true, 2, 3);
        assert_eq!(h.state(now), EndpointState::Unhealthy);
        h.checked(true, 2, 3);
        assert_eq!(h.state(now), EndpointState::Healthy);
    }
}

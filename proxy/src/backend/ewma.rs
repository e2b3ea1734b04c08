//! An endpoint's latency estimate for the balancer: a peak-sensitive
//! exponentially weighted moving average, kept on tokio's clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The latency estimate of an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How fast the latency estimate forgets: older samples weigh e^(-age/τ).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// A peak-sensitive moving average of an endpoint's response time (to
/// response headers: for a streamed generation, the time to first
/// token). A slower sample replaces the estimate at once; faster ones pull
/// it down gradually; with no samples it decays towards zero, so an
/// endpoint judged slow is tried again after a while.
#[derive(Debug)]
pub struct PeakEwma(Mutex<Estimate>);

#[derive(Debug)]
struct Estimate {
    nanos: f64,
    at: Instant,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma(Mutex::new(Estimate {
            nanos: DEFAULT_RTT.as_nanos() as f64,
            at: Instant::now(),
        }))
    }
}

impl PeakEwma {
    /// The weight the estimate made at `estimate.at` keeps at `now`.
    fn kept(estimate: &Estimate, now: Instant) -> f64 {
        let age = now.saturating_duration_since(estimate.at).as_secs_f64();
        (-age / EWMA_DECAY.as_secs_f64()).exp()
    }

    fn decayed(estimate: &Estimate, now: Instant) -> f64 {
        estimate.nanos * Self::kept(estimate, now)
    }

    /// Adds a sample taken at `now`. (The decay is worked out once: it is
    /// both the estimate now and the weight of the old one.)
    pub fn observe(&self, now: Instant, rtt: Duration) {
        let mut estimate = self.0.lock().expect("ewma lock");
        let rtt = rtt.as_nanos() as f64;
        let keep = Self::kept(&estimate, now);
        let current = estimate.nanos * keep;
        estimate.nanos = if rtt > current {
            rtt
        } else {
            current + rtt * (1.0 - keep)
        };
        estimate.at = now;
    }

    /// The estimate at `now`.
    pub fn get(&self, now: Instant) -> Duration {
        let estimate = self.0.lock().expect("ewma lock");
        Duration::from_nanos(Self::decayed(&estimate, now) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slower_sample_takes_over_at_once_and_faster_ones_slowly() {
        let ewma = PeakEwma::default();
        let now = Instant::now();
        ewma.observe(now, Duration::from_millis(500));
        assert_eq!(ewma.get(now), Duration::from_millis(500));
        tokio::time::advance(Duration::from_secs(1)).await;
        ewma.observe(Instant::now(), Duration::from_millis(10));
        let after = ewma.get(Instant::now());
        assert!(
            after > Duration::from_millis(400) && after < Duration::from_millis(500),
            "{after:?}"
        );
    }
}

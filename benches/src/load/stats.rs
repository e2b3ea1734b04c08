//! What each worker records: latency histograms (HdrHistogram, in
//! microseconds), error counts by kind, and server-sent-event timings.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest value a histogram tracks: one hour, in microseconds.
const HIGHEST: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST, 3).expect("valid histogram bounds")
}

/// Failed requests, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Errors {
    /// The connection (TCP, TLS or HTTP/2 handshake) could not be made.
    pub connect: u64,
    /// No whole response within `--timeout`.
    pub timeout: u64,
    /// The connection failed or was reset mid-exchange.
    pub io: u64,
    /// Responses with a 4xx status.
    pub status_4xx: u64,
    /// Responses with a 5xx status.
    pub status_5xx: u64,
}

impl Errors {
    /// All failures.
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.io + self.status_4xx + self.status_5xx
    }

    fn add(&mut self, other: &Errors) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.io += other.io;
        self.status_4xx += other.status_4xx;
        self.status_5xx += other.status_5xx;
    }
}

/// One worker's records, merged into the run's at the end.
#[derive(Clone, Debug)]
pub struct Recorder {
    /// Latency from the intended send time (corrected for coordinated
    /// omission) to the response's last byte, of completed responses.
    pub latency: Histogram<u64>,
    /// Latency from the actual send time (what a closed-loop tool reports).
    pub service: Histogram<u64>,
    /// How late requests were sent after their intended time.
    pub send_lag: Histogram<u64>,
    /// Streams: from the request's start to its first event.
    pub first_event: Histogram<u64>,
    /// Streams: time between consecutive events.
    pub event_gaps: Histogram<u64>,
    /// Requests sent during the measured window.
    pub sent: u64,
    /// Responses with a 1xx-3xx status.
    pub ok: u64,
    /// Failures by kind.
    pub errors: Errors,
    /// Response body bytes.
    pub bytes: u64,
    /// Streamed responses (server-sent events).
    pub streams: u64,
    /// Events received in them.
    pub events: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: histogram(),
            service: histogram(),
            send_lag: histogram(),
            first_event: histogram(),
            event_gaps: histogram(),
            sent: 0,
            ok: 0,
            errors: Errors::default(),
            bytes: 0,
            streams: 0,
            events: 0,
        }
    }
}

/// Records a duration in microseconds, clamped into the histogram's range.
pub(crate) fn record(histogram: &mut Histogram<u64>, d: Duration) {
    histogram.saturating_record((d.as_micros() as u64).clamp(1, HIGHEST));
}

impl Recorder {
    /// Adds `other`'s records to these.
    pub fn merge(&mut self, other: &Recorder) {
        for (mine, theirs) in [
            (&mut self.latency, &other.latency),
            (&mut self.service, &other.service),
            (&mut self.send_lag, &other.send_lag),
            (&mut self.first_event, &other.first_event),
            (&mut self.event_gaps, &other.event_gaps),
        ] {
            mine.add(theirs).expect("histograms share their bounds");
        }
        self.sent += other.sent;
        self.ok += other.ok;
        self.errors.add(&other.errors);
        self.bytes += other.bytes;
        self.streams += other.streams;
        self.events += other.events;
    }

    /// Requests that got a response or failed.
    pub fn finished(&self) -> u64 {
        self.ok + self.errors.total()
    }
}

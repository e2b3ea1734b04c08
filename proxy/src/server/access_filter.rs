//! Which requests get an access-log line: the proxy's flags
//! `--access-log-errors-only`, `--access-log-slower-than` and
//! `--access-log-sample`, after Envoy's access-log filters
//! (`status_code_filter` with `response_flag_filter`, `duration_filter`,
//! `runtime_filter`). The decision is made before the line is formatted,
//! so a line left out costs nothing but the decision; the metrics count
//! every request whatever it is.
//!
//! **What is an error**: a request the proxy failed or cut short (any
//! `error` reason: its own answers such as `no_route`, `rate_limited` or
//! `unauthorized`, a timeout, a reset, and the client going away: 499),
//! a response with a status of 500 or more, or a gRPC response whose
//! status is one of a server's failure (UNKNOWN, DEADLINE_EXCEEDED,
//! UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), which gRPC carries in
//! an HTTP 200. That is Envoy's common "status >= 500, or any response
//! flag" filter, and what the ECS line calls `event.outcome: failure`
//! (which does not read gRPC statuses). A model server's own 4xx is not
//! an error: it is the client's.
//!
//! **How the flags combine**: the selecting flags, `--access-log-errors-only`
//! and `--access-log-slower-than`, each select requests worth a line; with
//! both, a request either selects gets one (errors, and slow requests
//! whether they failed or not), since "the failed and the slow" is what
//! both together are wanted for. Without either, every request is
//! selected. Then `--access-log-sample` keeps that share of the selected
//! lines, at random, except that an error's line is always kept: sampling
//! thins out the successes, never the failures one would look for.

use std::time::Duration;

/// gRPC statuses that say the server failed (as HTTP's 5xx do):
/// UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
/// DATA_LOSS.
const GRPC_SERVER_FAILURES: [u16; 6] = [2, 4, 12, 13, 14, 15];

/// Which requests the access log writes a line for (the flags
/// `--access-log-errors-only`, `--access-log-slower-than` and
/// `--access-log-sample`). The default writes every request's line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessLogFilter {
    /// Select the requests that failed: the proxy's own errors (499
    /// included), statuses of 500 and more, and gRPC statuses of a
    /// server's failure.
    pub errors_only: bool,
    /// Select the requests that took at least this long, from arrival to
    /// the response's end.
    pub slower_than: Option<Duration>,
    /// The share of the selected lines written, from 0 to 1, picked at
    /// random; an error's line is always written.
    pub sample: f64,
}

impl Default for AccessLogFilter {
    fn default() -> Self {
        AccessLogFilter {
            errors_only: false,
            slower_than: None,
            sample: 1.0,
        }
    }
}

impl AccessLogFilter {
    /// Reads a sampling ratio, a number from 0 to 1 (`0.01` writes about
    /// one line in a hundred).
    pub fn parse_sample(text: &str) -> Result<f64, String> {
        let ratio: f64 = text.trim().parse().map_err(|_| {
            format!("{text:?} is not a number: give the share of lines to write, from 0 to 1 (e.g. 0.01)")
        })?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(format!(
                "{text} is not between 0 and 1: give the share of lines to write (e.g. 0.01 for one in a hundred)"
            ));
        }
        Ok(ratio)
    }

    /// Whether a request that took `duration`, and is an `error` (see
    /// [`is_error`]), gets its line.
    pub(crate) fn keeps(&self, error: bool, duration: Duration) -> bool {
        if self.errors_only || self.slower_than.is_some() {
            let selected = (self.errors_only && error)
                || self.slower_than.is_some_and(|least| duration >= least);
            if !selected {
                return false;
            }
        }
        error || sampled(self.sample)
    }
}

/// Whether a line with sampling ratio `ratio` is kept: drawn from the
/// thread's own generator (no lock, no system call) only when the ratio
/// is strictly between 0 and 1.
fn sampled(ratio: f64) -> bool {
    if ratio >= 1.0 {
        true
    } else if ratio <= 0.0 {
        false
    } else {
        rand::random_bool(ratio)
    }
}

/// Whether a request is an error for the access log's filters: the proxy
/// failed it or cut it short (`error`), its `status` is 500 or more, or
/// its `grpc_status` is one of a server's failure.
pub(crate) fn is_error(status: u16, error: Option<&str>, grpc_status: Option<u16>) -> bool {
    error.is_some()
        || status >= 500
        || grpc_status.is_some_and(|s| GRPC_SERVER_FAILURES.contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(3);
    const SLOW: Duration = Duration::from_secs(2);

    fn filter(errors_only: bool, slower_than: Option<Duration>, sample: f64) -> AccessLogFilter {
        AccessLogFilter {
            errors_only,
            slower_than,
            sample,
        }
    }

    #[test]
    fn by_default_every_line_is_written() {
        let all = AccessLogFilter::default();
        for error in [false, true] {
            for duration in [Duration::ZERO, FAST, SLOW] {
                assert!(all.keeps(error, duration));
            }
        }
    }

    #[test]
    fn errors_are_the_proxys_failures_5xx_and_a_servers_grpc_failures() {
        assert!(!is_error(200, None, None));
        assert!(!is_error(404, None, None), "a model's own 404");
        assert!(!is_error(429, None, None), "a model's own 429");
        assert!(is_error(404, Some("no_route"), None));
        assert!(is_error(429, Some("rate_limited"), None));
        assert!(is_error(499, Some("client_disconnected"), None));
        assert!(
            is_error(200, Some("stream_idle_timeout"), None),
            "a cut stream"
        );
        assert!(is_error(500, None, None));
        assert!(is_error(502, Some("connect_failed"), None));
        assert!(is_error(503, None, None));
        assert!(!is_error(200, None, Some(0)));
        assert!(!is_error(200, None, Some(5)), "NOT_FOUND is the client's");
        assert!(!is_error(200, None, Some(3)), "INVALID_ARGUMENT");
        for failure in [2, 4, 12, 13, 14, 15] {
            assert!(is_error(200, None, Some(failure)), "{failure}");
        }
    }

    #[test]
    fn errors_only_keeps_errors() {
        let errors = filter(true, None, 1.0);
        assert!(errors.keeps(true, FAST));
        assert!(errors.keeps(true, SLOW));
        assert!(!errors.keeps(false, FAST));
        assert!(!errors.keeps(false, SLOW));
    }

    #[test]
    fn slower_than_keeps_requests_that_took_at_least_as_long() {
        let slow = filter(false, Some(Duration::from_millis(500)), 1.0);
        assert!(!slow.keeps(false, FAST));
        assert!(!slow.keeps(true, FAST), "a fast error is not slow");
        assert!(slow.keeps(false, Duration::from_millis(500)), "at least");
        assert!(slow.keeps(false, SLOW));
    }

    #[test]
    fn with_both_a_request_either_selects_is_written() {
        let both = filter(true, Some(Duration::from_secs(1)), 1.0);
        assert!(both.keeps(true, FAST), "a fast error");
        assert!(both.keeps(false, SLOW), "a slow success");
        assert!(both.keeps(true, SLOW));
        assert!(!both.keeps(false, FAST), "a fast success");
    }

    #[test]
    fn sampling_zero_writes_only_errors() {
        let none = filter(false, None, 0.0);
        assert!(!none.keeps(false, FAST));
        assert!(!none.keeps(false, SLOW));
        assert!(none.keeps(true, FAST), "errors are never sampled out");
        // After the selection: slow successes are sampled, errors kept.
        let slow = filter(false, Some(Duration::from_secs(1)), 0.0);
        assert!(!slow.keeps(false, SLOW));
        assert!(slow.keeps(true, SLOW));
        assert!(!slow.keeps(true, FAST), "selection comes first");
    }

    #[test]
    fn sampling_keeps_about_the_ratio_of_successes() {
        let tenth = filter(false, None, 0.1);
        let kept = (0..100_000).filter(|_| tenth.keeps(false, FAST)).count();
        // 10,000 expected, standard deviation ~95.
        assert!((9_000..=11_000).contains(&kept), "{kept}");
        assert!((0..1000).all(|_| tenth.keeps(true, FAST)));
    }

    #[test]
    fn the_sampling_ratio_is_a_number_from_0_to_1() {
        assert_eq!(AccessLogFilter::parse_sample("0"), Ok(0.0));
        assert_eq!(AccessLogFilter::parse_sample("1"), Ok(1.0));
        assert_eq!(AccessLogFilter::parse_sample("0.01"), Ok(0.01));
        assert_eq!(AccessLogFilter::parse_sample(" 0.5 "), Ok(0.5));
        let above = AccessLogFilter::parse_sample("1.5").unwrap_err();
        assert!(above.contains("not between 0 and 1"), "{above}");
        let negative = AccessLogFilter::parse_sample("-0.1").unwrap_err();
        assert!(negative.contains("not between 0 and 1"), "{negative}");
        let percent = AccessLogFilter::parse_sample("10%").unwrap_err();
        assert!(percent.contains("not a number"), "{percent}");
        let nan = AccessLogFilter::parse_sample("NaN").unwrap_err();
        assert!(nan.contains("not between 0 and 1"), "{nan}");
    }
}

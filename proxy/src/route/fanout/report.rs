//! What a fan-out tells about itself: each branch's outcome, status and
//! latency, in the `x-infermesh-fanout` header, the metadata field of a
//! combined JSON answer, and the fan-out metrics.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use serde_json::{Map, Value, json};

/// What became of one branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// It answered, and its answer is in the response.
    Used,
    /// It answered, and its answer is not in the response (outvoted, or
    /// another branch won the race).
    Unused,
    /// It failed: an error status, a failed exchange, or an answer the
    /// strategy cannot use.
    Failed,
    /// Its own timeout ran out.
    Timeout,
    /// It was still running when the answer was decided without it, and
    /// was cancelled.
    Cancelled,
    /// It was still running at the fan-out's deadline, and was cancelled.
    Deadline,
}

impl Outcome {
    /// The outcome's name in the header, the metadata and the metrics.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Outcome::Used => "used",
            Outcome::Unused => "unused",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Deadline => "deadline",
        }
    }
}

/// How the answer (or the failure) was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Once every branch had finished.
    All,
    /// Once enough branches had answered, before the others finished: a
    /// quorum, a majority vote, or the first success.
    Quorum,
    /// At the deadline, with what had arrived.
    Deadline,
    /// No answer: the request failed.
    Failed,
}

impl Decision {
    /// The decision's name in the metadata and the metrics.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Decision::All => "all",
            Decision::Quorum => "quorum",
            Decision::Deadline => "deadline",
            Decision::Failed => "failed",
        }
    }
}

/// One branch's line in the report.
#[derive(Clone, Debug)]
pub(super) struct BranchReport {
    /// The branch's name.
    pub(super) name: Arc<str>,
    /// What became of it.
    pub(super) outcome: Outcome,
    /// The status it answered with, if it answered.
    pub(super) status: Option<StatusCode>,
    /// From sending it to its answer, its failure or its cancellation.
    pub(super) latency: Duration,
    /// Why it failed, when it did.
    pub(super) error: Option<String>,
    /// Its vote, under `strategy: vote`.
    pub(super) vote: Option<Value>,
}

/// The report of one fan-out.
#[derive(Clone, Debug)]
pub(super) struct Report {
    /// The strategy's name.
    pub(super) strategy: &'static str,
    /// How it was decided.
    pub(super) decision: Decision,
    /// Every branch, in configured order.
    pub(super) branches: Vec<BranchReport>,
}

impl Report {
    /// The value of the report header,
    /// [`crate::core::headers::FANOUT_HEADER`].
    pub(super) fn header_value(&self) -> HeaderValue {
        let mut text = String::new();
        for (i, b) in self.branches.iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            // Branch names are validated tokens, so they need no quoting.
            let _ = write!(text, "{};outcome={}", b.name, b.outcome.as_str());
            if let Some(status) = b.status {
                let _ = write!(text, ";status={}", status.as_u16());
            }
            let _ = write!(text, ";ms={:.1}", b.latency.as_secs_f64() * 1000.0);
        }
        HeaderValue::from_str(&text).expect("branch names are header-safe tokens")
    }

    /// The metadata a combined JSON answer carries.
    pub(super) fn metadata(&self) -> Value {
        let mut branches = Map::new();
        for b in &self.branches {
            let mut entry = Map::new();
            entry.insert("outcome".into(), b.outcome.as_str().into());
            if let Some(status) = b.status {
                entry.insert("status".into(), status.as_u16().into());
            }
            entry.insert(
                "latency_ms".into(),
                json!((b.latency.as_secs_f64() * 1e4).round() / 10.0),
            );
            if let Some(error) = &b.error {
                entry.insert("error".into(), error.clone().into());
            }
            if let Some(vote) = &b.vote {
                entry.insert("vote".into(), vote.clone());
            }
            branches.insert(b.name.to_string(), Value::Object(entry));
        }
        json!({
            "strategy": self.strategy,
            "decision": self.decision.as_str(),
            "branches": branches,
        })
    }

    /// A sentence naming the branches that failed and why, for errors.
    pub(super) fn failures(&self) -> String {
        let failed: Vec<String> = self
            .branches
            .iter()
            .filter(|b| !matches!(b.outcome, Outcome::Used | Outcome::Unused))
            .map(|b| match &b.error {
                Some(error) => format!("{}: {error}", b.name),
                None => format!("{}: {}", b.name, b.outcome.as_str()),
            })
            .collect();
        failed.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(name: &str, outcome: Outcome, status: Option<u16>, ms: u64) -> BranchReport {
        BranchReport {
            name: Arc::from(name),
            outcome,
            status: status.map(|s| StatusCode::from_u16(s).unwrap()),
            latency: Duration::from_millis(ms),
            error: None,
            vote: None,
        }
    }

    #[test]
    fn the_header_is_a_structured_list_in_branch_order() {
        let report = Report {
            strategy: "all",
            decision: Decision::Deadline,
            branches: vec![
                branch("llama", Outcome::Used, Some(200), 41),
                branch("qwen-2", Outcome::Deadline, None, 2000),
            ],
        };
        assert_eq!(
            report.header_value(),
            "llama;outcome=used;status=200;ms=41.0, qwen-2;outcome=deadline;ms=2000.0"
        );
        let metadata = report.metadata();
        assert_eq!(metadata["decision"], "deadline");
        assert_eq!(metadata["branches"]["llama"]["status"], 200);
        assert_eq!(metadata["branches"]["qwen-2"]["outcome"], "deadline");
        assert_eq!(metadata["branches"]["qwen-2"]["latency_ms"], 2000.0);
        assert_eq!(report.failures(), "qwen-2: deadline");
    }
}

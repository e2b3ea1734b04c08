//! The `fanout` action of a route rule: one request sent to several named
//! branches at once, each a backend (with its own model name or path if
//! asked), and their answers combined by a strategy, within deadlines.
//!
//! ```yaml
//! fanout:
//!   strategy: vote
//!   vote: { pointer: /choices/0/message/content }
//!   deadline: 2s
//!   branches:
//!     - { name: llama, backend: llama, model: llama-3-8b, required: true }
//!     - { name: mistral, backend: mistral, model: mistral-7b }
//!     - { name: qwen, backend: qwen, model: qwen-2-7b, timeout: 1500ms }
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::check::Checker;
use crate::duration::Duration;
use crate::path::FieldPath;

/// A rule's fan-out: where one request goes and how the answers combine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fanout {
    /// How the branches' answers become one.
    pub strategy: FanoutStrategy,
    /// The branches, at least two, each sent the request in parallel.
    pub branches: Vec<FanoutBranch>,
    /// For `strategy: quorum`: answer once this many branches succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
    /// For `strategy: vote`: which value the branches vote with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<Vote>,
    /// For `strategy: mean`: where the numbers to average are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Mean>,
    /// From the request's arrival to the answer. At the deadline the proxy
    /// answers with what has arrived if the strategy's requirement is met,
    /// else 504 `fanout_deadline`; the branches still running are
    /// cancelled. `0s` (the default): the rule's
    /// `timeouts.responseHeaders`, which on a fan-out rule is this deadline
    /// rather than a limit of its own.
    #[serde(default)]
    pub deadline: Duration,
    /// The request body is read whole, once, and shared by the branches; a
    /// larger one is refused with 413. Each branch's answer is held up to
    /// this size too (for the strategies that combine whole answers).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// The field added to combined JSON answers to say what each branch
    /// did. Empty: none added (the `x-infermesh-fanout` header still is).
    #[serde(default = "default_metadata_field")]
    pub metadata_field: String,
}

// Validation refuses NaN weights, the one value whose equality is not
// reflexive.
impl Eq for Fanout {}

/// How a fan-out combines its branches' answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FanoutStrategy {
    /// Every branch's answer, as one JSON object keyed by branch name (the
    /// shape of a KServe InferenceGraph `Ensemble`). Answers when every
    /// branch has finished, or at the deadline.
    All,
    /// The first branch to succeed, streamed as it comes (the only strategy
    /// for streaming requests: it races the branches on time to first
    /// event). The others are cancelled.
    First,
    /// Like `all`, but answers as soon as `quorum` branches succeeded and
    /// cancels the rest.
    Quorum,
    /// The answer of the majority on the value at `vote.pointer`; ties go
    /// to the value of the branch earliest in `vote.tieOrder`. Answers as
    /// soon as a value has more than half of all branches.
    Vote,
    /// The element-wise (optionally weighted) mean of numeric tensors: a
    /// KServe v2 answer's `outputs[].data`, or the array at `mean.pointer`.
    Mean,
}

impl FanoutStrategy {
    /// The strategy's name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            FanoutStrategy::All => "all",
            FanoutStrategy::First => "first",
            FanoutStrategy::Quorum => "quorum",
            FanoutStrategy::Vote => "vote",
            FanoutStrategy::Mean => "mean",
        }
    }
}

/// One branch of a fan-out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FanoutBranch {
    /// The branch's name: in the combined answer, the header and metrics.
    pub name: String,
    /// The `metadata.name` of the backend it goes to.
    pub backend: String,
    /// The model name this branch asks for instead of the request's: the
    /// `{name}` of a KServe v2 path (`/v2/models/{name}/...`), or the
    /// `model` field of a JSON body (OpenAI-compatible APIs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The path this branch sends the request to (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// From sending to the branch's whole answer (for `first`: its first
    /// body bytes). `0s` (the default): only the deadline applies.
    #[serde(default)]
    pub timeout: Duration,
    /// A required branch must succeed: when it fails, the request fails
    /// with 502 `fanout_branch_failed`, and the answer waits for it until
    /// the deadline. Optional branches (the default) are used when they
    /// answer in time.
    #[serde(default)]
    pub required: bool,
    /// The branch's weight in `strategy: mean`.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

/// What `strategy: vote` votes on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Vote {
    /// A JSON pointer (RFC 6901) into each answer, e.g.
    /// `/choices/0/message/content`; answers without it do not vote.
    pub pointer: String,
    /// Branch names, most trusted first: among tied values, the one a
    /// branch earlier here answered wins. Branches not listed follow in
    /// their listed order. Default: the order of `branches`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tie_order: Vec<String>,
}

/// Where `strategy: mean` finds its numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mean {
    /// A JSON pointer to a (possibly nested) array of numbers, e.g.
    /// `/data/0/embedding`. Default: each of a KServe v2 answer's
    /// `outputs[].data`, matched by output name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
}

impl Fanout {
    /// Default for [`Fanout::max_body_bytes`]: 8 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
    /// Default for [`Fanout::metadata_field`].
    pub const DEFAULT_METADATA_FIELD: &'static str = "infermesh_fanout";
    /// Largest [`Fanout::max_body_bytes`] accepted.
    const MAX_BODY_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
    /// Most branches a fan-out may have.
    const MAX_BRANCHES: usize = 32;

    pub(crate) fn check(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        let branches = at.key("branches");
        if self.branches.len() < 2 {
            checker.error(
                branches.clone(),
                "a fan-out needs at least two branches; with one, use `backends`",
            );
        } else if self.branches.len() > Self::MAX_BRANCHES {
            checker.error(
                branches.clone(),
                format!("at most {} branches", Self::MAX_BRANCHES),
            );
        }
        for (i, branch) in self.branches.iter().enumerate() {
            let at = branches.index(i);
            if self.branches[..i].iter().any(|b| b.name == branch.name) {
                checker.error(
                    at.key("name"),
                    format!("branch {:?} is named twice", branch.name),
                );
            }
            branch.check(&at, self.strategy, checker);
            if branch.name == self.metadata_field
                && matches!(self.strategy, FanoutStrategy::All | FanoutStrategy::Quorum)
            {
                checker.error(
                    at.key("name"),
                    format!(
                        "{:?} is the metadataField, where the answer reports on its branches; rename the branch or set another metadataField",
                        branch.name
                    ),
                );
            }
        }
        self.check_strategy(at, checker);
        let day = Duration::from_secs(86_400);
        checker.duration_within(at.key("deadline"), self.deadline, Duration::ZERO, day);
        if self.max_body_bytes == 0 || self.max_body_bytes > Self::MAX_BODY_BYTES_LIMIT {
            checker.error(
                at.key("maxBodyBytes"),
                format!(
                    "must be between 1 and {} (64 MiB)",
                    Self::MAX_BODY_BYTES_LIMIT
                ),
            );
        }
    }

    /// The settings that belong to one strategy each.
    fn check_strategy(&self, at: &FieldPath, checker: &mut Checker<'_>) {
        let strategy = self.strategy;
        let misplaced = |field: &str, owner: &str| {
            format!(
                "`{field}` belongs to strategy {owner}, and this fan-out's strategy is {}",
                strategy.as_str()
            )
        };
        match (strategy, self.quorum) {
            (FanoutStrategy::Quorum, None) => checker.error(
                at.key("quorum"),
                "strategy quorum needs `quorum`: how many branches must succeed",
            ),
            (FanoutStrategy::Quorum, Some(k)) => {
                if k == 0 || k as usize > self.branches.len() {
                    checker.error(
                        at.key("quorum"),
                        format!(
                            "must be between 1 and the number of branches ({})",
                            self.branches.len()
                        ),
                    );
                }
            }
            (_, Some(_)) => checker.error(at.key("quorum"), misplaced("quorum", "quorum")),
            (_, None) => {}
        }
        match (strategy, &self.vote) {
            (FanoutStrategy::Vote, None) => checker.error(
                at.key("vote"),
                "strategy vote needs `vote: { pointer }`: the value the branches vote with",
            ),
            (FanoutStrategy::Vote, Some(vote)) => {
                let at = at.key("vote");
                if let Err(e) = check_pointer(&vote.pointer) {
                    checker.error(at.key("pointer"), e);
                }
                for (i, name) in vote.tie_order.iter().enumerate() {
                    if !self.branches.iter().any(|b| &b.name == name) {
                        checker.error(
                            at.key("tieOrder").index(i),
                            format!("{name:?} is not a branch of this fan-out"),
                        );
                    } else if vote.tie_order[..i].contains(name) {
                        checker.error(
                            at.key("tieOrder").index(i),
                            format!("{name:?} is listed twice"),
                        );
                    }
                }
            }
            (_, Some(_)) => checker.error(at.key("vote"), misplaced("vote", "vote")),
            (_, None) => {}
        }
        match (strategy, &self.mean) {
            (FanoutStrategy::Mean, Some(mean)) => {
                if let Some(Err(e)) = mean.pointer.as_deref().map(check_pointer) {
                    checker.error(at.key("mean").key("pointer"), e);
                }
            }
            (_, None) => {}
            (_, Some(_)) => checker.error(at.key("mean"), misplaced("mean", "mean")),
        }
    }
}

impl FanoutBranch {
    fn check(&self, at: &FieldPath, strategy: FanoutStrategy, checker: &mut Checker<'_>) {
        if !is_branch_name(&self.name) {
            checker.error(
                at.key("name"),
                format!(
                    "{:?}: a branch name starts with a lower-case letter and has only lower-case letters, digits, `-` and `_`",
                    self.name
                ),
            );
        }
        if let Some(model) = &self.model {
            if model.trim().is_empty() {
                checker.error(at.key("model"), "give the model's name, e.g. llama-3-8b");
            } else if !model.chars().all(is_path_segment_char) {
                checker.error(
                    at.key("model"),
                    format!(
                        "{model:?} cannot stand in a KServe path: use letters, digits and -._~!$&'()*+,;=:@"
                    ),
                );
            }
        }
        if let Some(path) = &self.path
            && (!path.starts_with('/') || http::uri::PathAndQuery::try_from(path.as_str()).is_err())
        {
            checker.error(
                at.key("path"),
                format!("{path:?} is not a path starting with '/'"),
            );
        }
        checker.duration_within(
            at.key("timeout"),
            self.timeout,
            Duration::ZERO,
            Duration::from_secs(86_400),
        );
        if self.required && strategy == FanoutStrategy::First {
            checker.error(
                at.key("required"),
                "strategy first answers with whichever branch succeeds first, so no branch can be required",
            );
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            checker.error(at.key("weight"), "must be a number above 0");
        } else if self.weight != 1.0 && strategy != FanoutStrategy::Mean {
            checker.error(
                at.key("weight"),
                "weights apply to strategy mean only; remove it",
            );
        }
    }
}

/// Branch names go into a structured header and metric labels, so they are
/// kept to tokens: `[a-z][a-z0-9_-]*`.
fn is_branch_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// A character a URI path segment holds as it is (RFC 3986 `pchar`
/// without percent-encoding).
fn is_path_segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c)
}

/// A JSON pointer is empty (the whole value) or starts with `/`; `~` must
/// be followed by `0` or `1`.
fn check_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!(
            "{pointer:?} is not a JSON pointer: it must start with '/', e.g. /choices/0/message/content"
        ));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "{pointer:?}: in a JSON pointer `~` must be followed by 0 or 1 (`~0` is `~`, `~1` is `/`)"
            ));
        }
    }
    Ok(())
}

fn default_max_body_bytes() -> u64 {
    Fanout::DEFAULT_MAX_BODY_BYTES
}

fn default_metadata_field() -> String {
    Fanout::DEFAULT_METADATA_FIELD.to_owned()
}

fn default_weight() -> f64 {
    1.0
}

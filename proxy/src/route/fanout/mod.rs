//! The `fanout` action of a route rule: scatter one request to several
//! named branches, gather their answers within deadlines, and answer with
//! their combination. [`Plan::run`] goes through named phases, each a
//! function:
//!
//! 1. **read**: the request body, whole and once, up to `maxBodyBytes`
//!    (413 past it); a streaming request is refused (400) unless the
//!    strategy is `first`;
//! 2. **scatter**: every branch gets its copy (the same bytes, or its own
//!    model name: [`branch`]) and is sent at once;
//! 3. **gather**: as answers and failures arrive, the strategy decides
//!    whether it can answer yet ([`Plan::verdict`]): a required branch
//!    failed, a quorum or majority is reached, every branch finished, or
//!    the deadline came;
//! 4. **cancel**: the branches still running are dropped, which resets
//!    their HTTP/2 stream or closes their HTTP/1.1 connection, so a model
//!    stops working on an answer nobody will read;
//! 5. **combine**: the strategy's answer ([`combine`]), or the models'
//!    refusal of the request, or the failure;
//! 6. **report**: every branch's outcome in `x-infermesh-fanout` and, for
//!    JSON answers, in the metadata field ([`report`]); the fan-out
//!    metrics.

mod branch;
pub(crate) mod combine;
mod report;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use infermesh_api::FanoutStrategy;
use prometheus::{HistogramVec, IntCounter, IntCounterVec};
use serde_json::Value;
use tokio::time::Instant;
use tower::Service;

use crate::core::body::{BodyTooLarge, BoxError, BoxFuture, ProxyBody, collect_limited, full};
use crate::core::context::Upstream;
use crate::core::error::{
    ErrorKind, FanoutCause, FanoutFailed, ProxyError, TimeoutError, find_source,
};
use crate::core::headers::FANOUT_HEADER;
use crate::route::metrics::Metrics;
pub(crate) use branch::Branch;
use branch::{Answer, Failure, Original, Wanted};
use report::{BranchReport, Decision, Outcome, Report};

/// The fan-out service of a rule.
#[derive(Clone)]
pub(crate) struct Fanout {
    plan: Arc<Plan>,
}

/// A rule's fan-out, compiled from its config.
struct Plan {
    route: Arc<str>,
    /// The strategy's name as configured.
    strategy_name: &'static str,
    strategy: Strategy,
    branches: Vec<Branch>,
    deadline: Option<Duration>,
    max_body_bytes: usize,
    metadata_field: Option<String>,
    metrics: FanoutMetrics,
}

/// A strategy with what it needs at run time.
enum Strategy {
    All,
    First,
    Quorum(usize),
    /// Each branch's tie-break rank, by branch index.
    Vote {
        pointer: String,
        ranks: Vec<usize>,
    },
    Mean {
        pointer: Option<String>,
    },
}

impl Strategy {
    /// Successes needed for an answer.
    fn needed(&self) -> usize {
        match self {
            Strategy::Quorum(k) => *k,
            _ => 1,
        }
    }
}

#[derive(Clone)]
struct FanoutMetrics {
    branches: IntCounterVec,
    duration: HistogramVec,
    answers: IntCounterVec,
}

/// Where a branch stands.
enum State {
    Running,
    Answered(Answer),
    Failed(Failure),
}

/// How far the gathering got.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Gathering,
    AllFinished,
    Deadline,
}

/// A strategy's answer, before the report is added.
enum Combined {
    /// A response passed on as it is: the winner of a race, streaming, or
    /// the models' refusal of the request.
    AsIs(Response<ProxyBody>),
    /// A JSON answer, and the branch endpoint it is from, if one.
    Json(Value, Option<Upstream>),
}

/// What the strategy makes of the branches so far.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Wait,
    Answer(Decision),
    Fail(FanoutCause),
}

/// The branches in flight: each yields its index, its outcome and when it
/// finished.
type Running = FuturesUnordered<BoxFuture<(usize, Result<Answer, Failure>, Instant)>>;

/// Where every branch stood when the strategy decided.
struct Gathered {
    states: Vec<State>,
    finished_at: Vec<Option<Instant>>,
    votes: Vec<Option<Value>>,
    verdict: Verdict,
    stage: Stage,
}

impl Fanout {
    /// The fan-out of a rule of `route`, sending to `branches`, deciding
    /// at the latest at `deadline` after a request's arrival.
    pub(crate) fn new(
        config: &infermesh_api::Fanout,
        deadline: Option<Duration>,
        branches: Vec<Branch>,
        route: &Arc<str>,
        metrics: &Metrics,
    ) -> Self {
        let strategy = match config.strategy {
            FanoutStrategy::All => Strategy::All,
            FanoutStrategy::First => Strategy::First,
            FanoutStrategy::Quorum => Strategy::Quorum(config.quorum.unwrap_or(1) as usize),
            FanoutStrategy::Vote => {
                let vote = config.vote.clone().unwrap_or_else(|| infermesh_api::Vote {
                    pointer: String::new(),
                    tie_order: Vec::new(),
                });
                let ranks = config
                    .branches
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        // Listed names first, in their order; the rest after,
                        // in branch order.
                        vote.tie_order
                            .iter()
                            .position(|n| *n == b.name)
                            .unwrap_or(vote.tie_order.len() + i)
                    })
                    .collect();
                Strategy::Vote {
                    pointer: vote.pointer,
                    ranks,
                }
            }
            FanoutStrategy::Mean => Strategy::Mean {
                pointer: config.mean.as_ref().and_then(|m| m.pointer.clone()),
            },
        };
        Fanout {
            plan: Arc::new(Plan {
                route: route.clone(),
                strategy_name: config.strategy.as_str(),
                strategy,
                branches,
                deadline,
                max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
                metadata_field: Some(config.metadata_field.clone()).filter(|f| !f.is_empty()),
                metrics: FanoutMetrics {
                    branches: metrics.fanout_branches.clone(),
                    duration: metrics.fanout_duration.clone(),
                    answers: metrics.fanout_answers.clone(),
                },
            }),
        }
    }
}

impl Service<Request<ProxyBody>> for Fanout {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<ProxyBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        Box::pin(self.plan.clone().run(request))
    }
}

impl Plan {
    /// Answers `request` by the phases of the module docs.
    async fn run(
        self: Arc<Self>,
        request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let started = Instant::now();
        let deadline = self.deadline.map(|d| (started + d, d));
        let undecided = Undecided(Some(
            self.metrics
                .answers
                .with_label_values(&[&*self.route, "abandoned"]),
        ));
        let original = match self.read(request, deadline).await {
            Ok(original) => original,
            Err(refused) => {
                undecided.settle();
                self.metrics
                    .answers
                    .with_label_values(&[&*self.route, Decision::Failed.as_str()])
                    .inc();
                return Err(refused.into());
            }
        };
        let sent_at = Instant::now();
        let mut running = self.scatter(original);
        let gathered = self.gather(&mut running, deadline).await;
        let decided_at = cancel(running);
        undecided.settle();
        let mut reports = self.branch_reports(&gathered, sent_at, decided_at);
        let combined = self.combine(gathered, &mut reports);
        self.report(combined, reports, started)
    }

    /// Phase scatter: every branch's copy of `original`, sent at once.
    fn scatter(&self, original: Original) -> Running {
        let wanted = match self.strategy {
            Strategy::First => Wanted::FirstBytes,
            _ => Wanted::Json(self.max_body_bytes),
        };
        self.branches
            .iter()
            .enumerate()
            .map(|(i, branch)| {
                let exchange = branch.exchange(&original, wanted);
                Box::pin(async move { (i, exchange.await, Instant::now()) })
                    as BoxFuture<(usize, Result<Answer, Failure>, Instant)>
            })
            .collect()
    }

    /// Phase gather: takes each branch's outcome as it arrives until the
    /// strategy can decide, or the deadline comes.
    async fn gather(
        &self,
        running: &mut Running,
        deadline: Option<(Instant, Duration)>,
    ) -> Gathered {
        let n = self.branches.len();
        let mut gathered = Gathered {
            states: (0..n).map(|_| State::Running).collect(),
            finished_at: vec![None; n],
            votes: vec![None; n],
            verdict: Verdict::Wait,
            stage: Stage::Gathering,
        };
        let mut timer = std::pin::pin!(async move {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        });
        let (verdict, stage) = loop {
            tokio::select! {
                biased;
                done = running.next() => {
                    let Some((i, result, at)) = done else {
                        let stage = Stage::AllFinished;
                        break (self.verdict(&gathered.states, &gathered.votes, stage), stage);
                    };
                    gathered.finished_at[i] = Some(at);
                    gathered.states[i] = match result {
                        Ok(answer) => match self.ballot(&answer) {
                            Ok(vote) => {
                                gathered.votes[i] = vote;
                                State::Answered(answer)
                            }
                            Err(failure) => State::Failed(failure),
                        },
                        Err(failure) => State::Failed(failure),
                    };
                    match self.verdict(&gathered.states, &gathered.votes, Stage::Gathering) {
                        Verdict::Wait => {}
                        verdict => break (verdict, Stage::Gathering),
                    }
                }
                () = &mut timer => {
                    let stage = Stage::Deadline;
                    break (self.verdict(&gathered.states, &gathered.votes, stage), stage);
                }
            }
        };
        gathered.verdict = verdict;
        gathered.stage = stage;
        gathered
    }

    /// Each branch's line of the report, as the branches stood when the
    /// strategy decided (at `decided_at`, `sent_at` being when they were
    /// sent).
    fn branch_reports(
        &self,
        gathered: &Gathered,
        sent_at: Instant,
        decided_at: Instant,
    ) -> Vec<BranchReport> {
        self.branches
            .iter()
            .zip(&gathered.states)
            .zip(&gathered.finished_at)
            .zip(&gathered.votes)
            .map(|(((branch, state), at), vote)| {
                let latency = at.unwrap_or(decided_at).saturating_duration_since(sent_at);
                let (outcome, status, error) = match state {
                    State::Running if gathered.stage == Stage::Deadline => {
                        (Outcome::Deadline, None, None)
                    }
                    State::Running => (Outcome::Cancelled, None, None),
                    State::Failed(f) => (
                        if f.timed_out {
                            Outcome::Timeout
                        } else {
                            Outcome::Failed
                        },
                        f.status,
                        Some(f.reason.clone()),
                    ),
                    State::Answered(answer) => (Outcome::Used, Some(answer.status()), None),
                };
                BranchReport {
                    name: branch.name.clone(),
                    outcome,
                    status,
                    latency,
                    error,
                    vote: vote.clone(),
                }
            })
            .collect()
    }

    /// Phase combine: the strategy's answer from the branches that
    /// answered; or, when the fan-out failed only because models refused
    /// the request itself (4xx), the first-listed refusal, so the client
    /// hears it rather than a gateway error; or why it failed.
    fn combine(
        &self,
        gathered: Gathered,
        reports: &mut [BranchReport],
    ) -> Result<(Combined, Decision), FanoutCause> {
        let Gathered {
            states,
            votes,
            verdict,
            stage,
            ..
        } = gathered;
        match verdict {
            Verdict::Answer(decision) => {
                self.combine_answers(states, votes, reports, decision, stage)
            }
            Verdict::Fail(cause @ (FanoutCause::BranchFailed | FanoutCause::Insufficient)) => {
                match first_refusal(&states).and_then(|i| states.into_iter().nth(i)) {
                    Some(State::Failed(Failure {
                        status: Some(status),
                        refusal: Some(refusal),
                        ..
                    })) => {
                        let mut response = Response::new(full(refusal.body));
                        *response.status_mut() = status;
                        *response.headers_mut() = refusal.headers;
                        Ok((Combined::AsIs(response), Decision::Failed))
                    }
                    _ => Err(cause),
                }
            }
            Verdict::Fail(cause) => Err(cause),
            Verdict::Wait => unreachable!("gathering stops only on a decision"),
        }
    }

    /// Phase report: the report of every branch, counted in the metrics
    /// and attached to the answer (or the failure).
    fn report(
        &self,
        combined: Result<(Combined, Decision), FanoutCause>,
        branches: Vec<BranchReport>,
        started: Instant,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let report = Report {
            strategy: self.strategy_name,
            decision: match &combined {
                Ok((_, decision)) => *decision,
                Err(_) => Decision::Failed,
            },
            branches,
        };
        self.count(&report, started);
        match combined {
            Ok((combined, _)) => Ok(self.respond(combined, &report)),
            Err(cause) => Err(self.failure(cause, &report).into()),
        }
    }

    /// For `vote`, the value an answer votes for; an answer without one
    /// cannot take part.
    fn ballot(&self, answer: &Answer) -> Result<Option<Value>, Failure> {
        let (Strategy::Vote { pointer, .. }, Answer::Json { status, value, .. }) =
            (&self.strategy, answer)
        else {
            return Ok(None);
        };
        match value.pointer(pointer) {
            Some(vote) => Ok(Some(vote.clone())),
            None => Err(Failure::unusable(
                *status,
                format!("the answer has no value at {pointer} to vote with"),
            )),
        }
    }

    /// Whether the strategy can answer (or must fail) with the branches as
    /// they stand at `stage`.
    fn verdict(&self, states: &[State], votes: &[Option<Value>], stage: Stage) -> Verdict {
        let required_failed = self
            .branches
            .iter()
            .zip(states)
            .any(|(b, s)| b.required && matches!(s, State::Failed(_)));
        if required_failed {
            return Verdict::Fail(FanoutCause::BranchFailed);
        }
        let succeeded = states
            .iter()
            .filter(|s| matches!(s, State::Answered(_)))
            .count();
        let running = states
            .iter()
            .filter(|s| matches!(s, State::Running))
            .count();
        let required_answered = self
            .branches
            .iter()
            .zip(states)
            .all(|(b, s)| !b.required || matches!(s, State::Answered(_)));
        let needed = self.strategy.needed();
        if succeeded + running < needed {
            return Verdict::Fail(FanoutCause::Insufficient);
        }
        let stage = if running == 0 {
            Stage::AllFinished
        } else {
            stage
        };
        let enough = required_answered && succeeded >= needed;
        match stage {
            Stage::Gathering => {
                let early = match &self.strategy {
                    Strategy::First => succeeded >= 1,
                    Strategy::Quorum(k) => succeeded >= *k,
                    Strategy::Vote { ranks, .. } => {
                        let ballots = votes
                            .iter()
                            .enumerate()
                            .filter_map(|(i, v)| Some((ranks[i], v.as_ref()?)));
                        combine::leader(ballots).is_some_and(|t| t.votes * 2 > states.len())
                    }
                    Strategy::All | Strategy::Mean { .. } => false,
                };
                if early && enough {
                    Verdict::Answer(Decision::Quorum)
                } else {
                    Verdict::Wait
                }
            }
            Stage::AllFinished if enough => Verdict::Answer(Decision::All),
            Stage::AllFinished => Verdict::Fail(FanoutCause::Insufficient),
            Stage::Deadline if enough => Verdict::Answer(Decision::Deadline),
            Stage::Deadline => Verdict::Fail(FanoutCause::Deadline),
        }
    }

    /// The answer of the strategy from the branches that answered, noting
    /// in `reports` which of them it used. A mean leaves out answers it
    /// cannot average (they count as failed), which may leave too few.
    fn combine_answers(
        &self,
        mut states: Vec<State>,
        votes: Vec<Option<Value>>,
        reports: &mut [BranchReport],
        decision: Decision,
        stage: Stage,
    ) -> Result<(Combined, Decision), FanoutCause> {
        let (value, upstream) = match &self.strategy {
            Strategy::First => {
                let winner = states
                    .iter()
                    .position(|s| matches!(s, State::Answered(_)))
                    .expect("first answers on a success");
                for (i, report) in reports.iter_mut().enumerate() {
                    if i != winner && report.outcome == Outcome::Used {
                        report.outcome = Outcome::Unused;
                    }
                }
                let State::Answered(Answer::Stream(response)) = states.swap_remove(winner) else {
                    unreachable!("first waits for streams")
                };
                return Ok((Combined::AsIs(response), decision));
            }
            Strategy::All | Strategy::Quorum(_) => {
                let answers = Self::json_answers(&states);
                let keyed = combine::keyed(
                    answers
                        .into_iter()
                        .map(|(i, v)| (&*self.branches[i].name, v.clone())),
                );
                (Value::Object(keyed), None)
            }
            Strategy::Vote { ranks, .. } => {
                let ballots = votes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| Some((ranks[i], v.as_ref()?)));
                let winner = combine::leader(ballots)
                    .expect("a vote answers with at least one ballot")
                    .value
                    .clone();
                let mut chosen: Option<usize> = None;
                for (i, vote) in votes.iter().enumerate() {
                    if vote.as_ref() == Some(&winner) {
                        if chosen.is_none_or(|c| ranks[i] < ranks[c]) {
                            chosen = Some(i);
                        }
                    } else if vote.is_some() {
                        reports[i].outcome = Outcome::Unused;
                    }
                }
                let chosen = chosen.expect("the winner has a voter");
                let State::Answered(Answer::Json {
                    value, upstream, ..
                }) = &states[chosen]
                else {
                    unreachable!("voters answered JSON")
                };
                (value.clone(), upstream.clone())
            }
            Strategy::Mean { pointer } => {
                let answers = Self::json_answers(&states);
                let weighted: Vec<(&Value, f64)> = answers
                    .iter()
                    .map(|(i, v)| (*v, self.branches[*i].weight))
                    .collect();
                let averaged = combine::mean(&weighted, pointer.as_deref());
                let left_out: Vec<(usize, String)> = averaged
                    .left_out
                    .into_iter()
                    .map(|l| (answers[l.index].0, l.reason))
                    .collect();
                // Answers left out count as failed, which may leave too few.
                for (i, reason) in &left_out {
                    let status = reports[*i].status.unwrap_or(StatusCode::OK);
                    reports[*i].outcome = Outcome::Failed;
                    reports[*i].error = Some(reason.clone());
                    states[*i] = State::Failed(Failure::unusable(status, reason.clone()));
                }
                if let Verdict::Fail(cause) = self.verdict(&states, &votes, stage) {
                    return Err(cause);
                }
                let value = averaged
                    .value
                    .expect("a mean that leaves too few answers fails the verdict");
                (value, None)
            }
        };
        Ok((Combined::Json(value, upstream), decision))
    }

    /// The JSON answers among `states`, with their branch index.
    fn json_answers(states: &[State]) -> Vec<(usize, &Value)> {
        states
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                State::Answered(Answer::Json { value, .. }) => Some((i, value)),
                _ => None,
            })
            .collect()
    }

    /// The response of a combined answer: a JSON answer gets the report
    /// in its metadata field, every answer gets it in the header.
    fn respond(&self, combined: Combined, report: &Report) -> Response<ProxyBody> {
        let mut response = match combined {
            Combined::AsIs(response) => response,
            Combined::Json(mut value, upstream) => {
                // Never in place of a field of the model's answer.
                if let (Some(field), Value::Object(object)) = (&self.metadata_field, &mut value)
                    && !object.contains_key(field)
                {
                    object.insert(field.clone(), report.metadata());
                }
                let mut bytes = serde_json::to_vec(&value).expect("a JSON value serializes");
                bytes.push(b'\n');
                let mut response = Response::new(full(bytes));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                if let Some(upstream) = upstream {
                    response.extensions_mut().insert(upstream);
                }
                response
            }
        };
        response
            .headers_mut()
            .insert(&FANOUT_HEADER, report.header_value());
        response
    }

    fn failure(&self, cause: FanoutCause, report: &Report) -> ErrorKind {
        let n = self.branches.len();
        let answered = report
            .branches
            .iter()
            .filter(|b| matches!(b.outcome, Outcome::Used | Outcome::Unused))
            .count();
        let message = match cause {
            FanoutCause::BranchFailed => {
                let failed = self
                    .branches
                    .iter()
                    .zip(&report.branches)
                    .find(|(b, r)| {
                        b.required && matches!(r.outcome, Outcome::Failed | Outcome::Timeout)
                    })
                    .map(|(_, r)| r);
                match failed {
                    Some(r) => format!(
                        "required branch {} failed: {}",
                        r.name,
                        r.error.as_deref().unwrap_or(r.outcome.as_str())
                    ),
                    None => "a required branch failed".to_owned(),
                }
            }
            FanoutCause::Insufficient | FanoutCause::Deadline => {
                let when = match cause {
                    FanoutCause::Deadline => format!(
                        "the fan-out deadline of {:?} came with ",
                        self.deadline.unwrap_or_default()
                    ),
                    _ => String::new(),
                };
                let required = if self.branches.iter().any(|b| b.required) {
                    " and every required branch"
                } else {
                    ""
                };
                format!(
                    "{when}{answered} of {n} branches answered, and strategy {} needs {}{required} ({})",
                    self.strategy_name,
                    self.strategy.needed(),
                    report.failures()
                )
            }
        };
        ErrorKind::Fanout(Box::new(FanoutFailed {
            cause,
            message,
            report: Some(report.header_value()),
        }))
    }

    /// Phase read: the whole request body, once, before the deadline; a
    /// streaming request only for a race.
    async fn read(
        &self,
        request: Request<ProxyBody>,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Original, ErrorKind> {
        let (head, body) = request.into_parts();
        let body = read_body(body, self.max_body_bytes);
        let body = match deadline {
            None => body.await?,
            Some((at, after)) => match tokio::time::timeout_at(at, body).await {
                Ok(body) => body?,
                Err(_) => {
                    return Err(ErrorKind::Fanout(Box::new(FanoutFailed {
                        cause: FanoutCause::Deadline,
                        message: format!(
                            "the request body was still arriving at the fan-out deadline of {after:?}; no branch was sent"
                        ),
                        report: None,
                    })));
                }
            },
        };
        let original = Original::new(head, body);
        if original.is_streaming() && !matches!(self.strategy, Strategy::First) {
            return Err(ErrorKind::FanoutStreaming(self.strategy_name));
        }
        Ok(original)
    }

    fn count(&self, report: &Report, started: Instant) {
        let metrics = &self.metrics;
        for b in &report.branches {
            metrics
                .branches
                .with_label_values(&[&*self.route, &*b.name, b.outcome.as_str()])
                .inc();
        }
        metrics
            .duration
            .with_label_values(&[&*self.route, report.strategy])
            .observe(started.elapsed().as_secs_f64());
        metrics
            .answers
            .with_label_values(&[&*self.route, report.decision.as_str()])
            .inc();
    }
}

/// Phase cancel: drops the branches still running, which resets their
/// HTTP/2 stream or closes their HTTP/1.1 connection, so their models stop
/// working on answers nobody will read. Returns when the fan-out decided.
fn cancel(running: Running) -> Instant {
    drop(running);
    Instant::now()
}

/// Counts a fan-out dropped before its decision (the client went away, or
/// the rule's total limit cut it) as `abandoned`.
struct Undecided(Option<IntCounter>);

impl Undecided {
    /// The fan-out came to a decision (or refused the request): it was not
    /// abandoned.
    fn settle(mut self) {
        self.0 = None;
    }
}

impl Drop for Undecided {
    fn drop(&mut self) {
        if let Some(counter) = self.0.take() {
            counter.inc();
        }
    }
}

/// The first branch that refused the request (a 4xx), when every branch
/// that failed did so.
fn first_refusal(states: &[State]) -> Option<usize> {
    let failed: Vec<(usize, &Failure)> = states
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            State::Failed(f) => Some((i, f)),
            _ => None,
        })
        .collect();
    let refusal = |f: &Failure| f.status.is_some() && f.refusal.is_some();
    if failed.iter().all(|(_, f)| refusal(f)) {
        failed.first().map(|(i, _)| *i)
    } else {
        None
    }
}

/// The whole request body, up to `limit` bytes.
async fn read_body(body: ProxyBody, limit: usize) -> Result<Bytes, ErrorKind> {
    collect_limited(body, limit)
        .await
        .map_err(|error| body_error(error, limit))
}

fn body_error(error: BoxError, limit: usize) -> ErrorKind {
    if error.downcast_ref::<BodyTooLarge>().is_some() {
        return ErrorKind::RequestBodyTooLarge(limit as u64);
    }
    match find_source::<TimeoutError>(&*error) {
        Some(timeout) => timeout.into(),
        None => ErrorKind::RequestBody(error),
    }
}

#[cfg(test)]
mod tests {

    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use serde_json::json;
    use tower::ServiceExt;
    use tower::util::BoxCloneSyncService;

    use super::branch::BranchService;
    use super::*;
    use crate::core::body::boxed;
    use crate::core::metrics::Registry;
    use crate::route::cancellations::Cancellations;

    /// A backend answering `status` with `body` after `ms` milliseconds.
    fn answering(ms: u64, status: u16, body: Value, seen: &Cancellations) -> BranchService {
        let seen = seen.clone();
        BoxCloneSyncService::new(tower::service_fn(move |_: Request<ProxyBody>| {
            let running = seen.start();
            let body = body.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                running.answered();
                let mut response = Response::new(full(body.to_string()));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                Ok::<_, ProxyError>(response)
            }
        }))
    }

    /// A backend sending its headers after `headers_ms`, then one event
    /// every `every_ms` (the first `first_ms` after the headers).
    fn streaming(
        headers_ms: u64,
        first_ms: u64,
        events: &'static [&'static str],
        seen: &Cancellations,
    ) -> BranchService {
        let seen = seen.clone();
        BoxCloneSyncService::new(tower::service_fn(move |_: Request<ProxyBody>| {
            let running = seen.start();
            async move {
                tokio::time::sleep(Duration::from_millis(headers_ms)).await;
                let frames = futures_util::stream::unfold(
                    (0usize, Some(running)),
                    move |(i, mut running)| async move {
                        if i == events.len() {
                            if let Some(running) = running.take() {
                                running.answered();
                            }
                            return None;
                        }
                        let wait = if i == 0 { first_ms } else { 10 };
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        let frame: Result<Frame<Bytes>, BoxError> =
                            Ok(Frame::data(Bytes::from_static(events[i].as_bytes())));
                        Some((frame, (i + 1, running)))
                    },
                );
                let mut response = Response::new(boxed(StreamBody::new(frames)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                Ok::<_, ProxyError>(response)
            }
        }))
    }

    fn branch(name: &str, service: BranchService) -> Branch {
        Branch {
            name: Arc::from(name),
            service,
            model: None,
            path: None,
            timeout: None,
            required: false,
            weight: 1.0,
        }
    }

    fn fanout(config: Value, branches: Vec<Branch>, metrics: &Metrics) -> Fanout {
        let mut config = config;
        config["branches"] = branches
            .iter()
            .map(|b| json!({ "name": &*b.name, "backend": "b" }))
            .collect();
        let config: infermesh_api::Fanout = serde_json::from_value(config).unwrap();
        let deadline = config.deadline.non_zero();
        Fanout::new(&config, deadline, branches, &Arc::from("ensemble"), metrics)
    }

    fn post(body: &str) -> Request<ProxyBody> {
        Request::post("/v2/models/ensemble/infer")
            .body(full(body.to_owned()))
            .unwrap()
    }

    async fn json_of(response: Response<ProxyBody>) -> Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The branch report a failed fan-out carries for its response's
    /// header.
    fn report_of(error: &ProxyError) -> Option<&HeaderValue> {
        match error.kind() {
            ErrorKind::Fanout(failed) => failed.report.as_ref(),
            other => panic!("not a fan-out failure: {other}"),
        }
    }

    fn counted(metrics: &Metrics, branch: &str, outcome: &str) -> u64 {
        metrics
            .fanout_branches
            .with_label_values(&["ensemble", branch, outcome])
            .get()
    }

    fn decided(metrics: &Metrics, decision: &str) -> u64 {
        metrics
            .fanout_answers
            .with_label_values(&["ensemble", decision])
            .get()
    }

    #[tokio::test(start_paused = true)]
    async fn all_keys_every_answer_by_branch_and_reports_each() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let service = fanout(
            json!({ "strategy": "all" }),
            vec![
                branch("a", answering(10, 200, json!({ "outputs": [1] }), &seen)),
                branch("b", answering(30, 200, json!({ "outputs": [2] }), &seen)),
                branch("c", answering(20, 200, json!({ "outputs": [3] }), &seen)),
            ],
            &metrics,
        );
        let started = Instant::now();
        let response = service.oneshot(post("{}")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[&FANOUT_HEADER],
            "a;outcome=used;status=200;ms=10.0, b;outcome=used;status=200;ms=30.0, c;outcome=used;status=200;ms=20.0"
        );
        let body = json_of(response).await;
        assert_eq!(body["a"], json!({ "outputs": [1] }));
        assert_eq!(body["b"], json!({ "outputs": [2] }));
        assert_eq!(body["c"], json!({ "outputs": [3] }));
        assert_eq!(body["infermesh_fanout"]["decision"], "all");
        assert_eq!(
            body["infermesh_fanout"]["branches"]["b"]["latency_ms"],
            30.0
        );
        assert_eq!(counted(&metrics, "b", "used"), 1);
        assert_eq!(decided(&metrics, "all"), 1);
        assert_eq!(seen.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn quorum_answers_with_the_first_k_and_cancels_the_rest() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let service = fanout(
            json!({ "strategy": "quorum", "quorum": 2, "metadataField": "" }),
            vec![
                branch("a", answering(10, 200, json!("a"), &seen)),
                branch("slow", answering(10_000, 200, json!("slow"), &seen)),
                branch("c", answering(40, 200, json!("c"), &seen)),
            ],
            &metrics,
        );
        let started = Instant::now();
        let response = service.oneshot(post("{}")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        assert!(
            response.headers()[&FANOUT_HEADER]
                .to_str()
                .unwrap()
                .contains("slow;outcome=cancelled;ms=40.0")
        );
        assert_eq!(json_of(response).await, json!({ "a": "a", "c": "c" }));
        assert_eq!(seen.count(), 1, "the slow branch's request was cancelled");
        assert_eq!(counted(&metrics, "slow", "cancelled"), 1);
        assert_eq!(decided(&metrics, "quorum"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_deadline_a_slow_optional_branch_is_cut_and_the_answer_says_so() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let service = fanout(
            json!({ "strategy": "all", "deadline": "100ms" }),
            vec![
                branch("a", answering(10, 200, json!(1), &seen)),
                branch("b", answering(5_000, 200, json!(2), &seen)),
            ],
            &metrics,
        );
        let started = Instant::now();
        let response = service.oneshot(post("{}")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        let body = json_of(response).await;
        assert_eq!(body["a"], 1);
        assert!(body.get("b").is_none());
        assert_eq!(body["infermesh_fanout"]["decision"], "deadline");
        assert_eq!(
            body["infermesh_fanout"]["branches"]["b"]["outcome"],
            "deadline"
        );
        assert_eq!(seen.count(), 1);
        assert_eq!(decided(&metrics, "deadline"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_required_branch_fails_the_request_at_once_naming_it() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let mut required = branch("judge", answering(20, 500, json!({}), &seen));
        required.required = true;
        let service = fanout(
            json!({ "strategy": "all" }),
            vec![
                branch("a", answering(10, 200, json!(1), &seen)),
                required,
                branch("slow", answering(5_000, 200, json!(2), &seen)),
            ],
            &metrics,
        );
        let started = Instant::now();
        let error = service.oneshot(post("{}")).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        assert_eq!(error.kind().reason(), "fanout_branch_failed");
        assert_eq!(
            error.to_string(),
            "required branch judge failed: answered 500 Internal Server Error"
        );
        assert_eq!(error.kind().status(), StatusCode::BAD_GATEWAY);
        assert!(
            report_of(&error)
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("a;outcome=used;status=200;ms=10.0, judge;outcome=failed;status=500;ms=20.0, slow;outcome=cancelled")
        );
        assert_eq!(seen.count(), 1);
        assert_eq!(decided(&metrics, "failed"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_required_branch_missing_at_the_deadline_is_a_504() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let mut required = branch("judge", answering(1_000, 200, json!({}), &seen));
        required.required = true;
        let service = fanout(
            json!({ "strategy": "all", "deadline": "50ms" }),
            vec![branch("a", answering(10, 200, json!(1), &seen)), required],
            &metrics,
        );
        let started = Instant::now();
        let error = service.oneshot(post("{}")).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert_eq!(seen.count(), 1, "the required branch was cancelled");
        assert_eq!(error.kind().reason(), "fanout_deadline");
        assert_eq!(error.kind().status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(error.to_string().contains("judge: deadline"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_branch_timeout_is_its_own_and_too_few_answers_fail() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let mut timed = branch("timed", answering(1_000, 200, json!(1), &seen));
        timed.timeout = Some(Duration::from_millis(30));
        let service = fanout(
            json!({ "strategy": "quorum", "quorum": 2 }),
            vec![
                branch("a", answering(10, 200, json!(1), &seen)),
                timed,
                branch("down", answering(5, 503, json!({}), &seen)),
            ],
            &metrics,
        );
        let started = Instant::now();
        let error = service.oneshot(post("{}")).await.unwrap_err();
        // Decided when the quorum became impossible, not later.
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        assert_eq!(error.kind().reason(), "fanout_insufficient_answers");
        assert_eq!(error.kind().status(), StatusCode::BAD_GATEWAY);
        assert_eq!(counted(&metrics, "timed", "timeout"), 1);
        assert_eq!(counted(&metrics, "down", "failed"), 1);
        assert_eq!(seen.count(), 1, "the timed-out request was cancelled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_vote_answers_once_a_majority_agrees_with_the_best_ranked_voters_answer() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let chat = |id: &str, text: &str| json!({ "id": id, "choices": [{ "message": { "content": text } }] });
        let service = fanout(
            json!({ "strategy": "vote", "vote": { "pointer": "/choices/0/message/content", "tieOrder": ["c"] } }),
            vec![
                branch("a", answering(30, 200, chat("a", "Paris"), &seen)),
                branch("b", answering(10, 200, chat("b", "Lyon"), &seen)),
                branch("c", answering(20, 200, chat("c", "Paris"), &seen)),
                branch("d", answering(5_000, 200, chat("d", "Lyon"), &seen)),
                branch("e", answering(40, 200, chat("e", "Paris"), &seen)),
            ],
            &metrics,
        );
        let started = Instant::now();
        let response = service.oneshot(post("{}")).await.unwrap();
        // Paris has 3 of 5 votes at 40 ms; d is not waited for.
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        let body = json_of(response).await;
        assert_eq!(body["id"], "c", "c ranks first in tieOrder");
        assert_eq!(
            body["infermesh_fanout"]["branches"]["b"]["outcome"],
            "unused"
        );
        assert_eq!(body["infermesh_fanout"]["branches"]["b"]["vote"], "Lyon");
        assert_eq!(
            body["infermesh_fanout"]["branches"]["d"]["outcome"],
            "cancelled"
        );
        assert_eq!(body["infermesh_fanout"]["decision"], "quorum");
        assert_eq!(seen.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tied_vote_goes_to_the_order_and_answers_without_a_vote_do_not_count() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let service = fanout(
            json!({ "strategy": "vote", "vote": { "pointer": "/label", "tieOrder": ["b", "a"] } }),
            vec![
                branch("a", answering(10, 200, json!({ "label": "cat" }), &seen)),
                branch("b", answering(20, 200, json!({ "label": "dog" }), &seen)),
                branch("c", answering(5, 200, json!({ "other": 1 }), &seen)),
            ],
            &metrics,
        );
        let body = json_of(service.oneshot(post("{}")).await.unwrap()).await;
        assert_eq!(body["label"], "dog");
        let c = &body["infermesh_fanout"]["branches"]["c"];
        assert_eq!(c["outcome"], "failed");
        assert_eq!(c["error"], "the answer has no value at /label to vote with");
    }

    #[tokio::test(start_paused = true)]
    async fn mean_averages_kserve_outputs_with_weights_and_leaves_out_misfits() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let output = |data: Value| json!({ "model_name": "m", "outputs": [{ "name": "p", "datatype": "FP32", "shape": [2], "data": data }] });
        let mut heavy = branch(
            "heavy",
            answering(10, 200, output(json!([4.0, 8.0])), &seen),
        );
        heavy.weight = 3.0;
        let service = fanout(
            json!({ "strategy": "mean" }),
            vec![
                // Listed first, the odd one out still does not set the shape.
                branch("odd", answering(5, 200, output(json!([1.0])), &seen)),
                branch(
                    "light",
                    answering(20, 200, output(json!([0.0, 4.0])), &seen),
                ),
                heavy,
            ],
            &metrics,
        );
        let body = json_of(service.oneshot(post("{}")).await.unwrap()).await;
        assert_eq!(body["outputs"][0]["data"], json!([3.0, 7.0]));
        let odd = &body["infermesh_fanout"]["branches"]["odd"];
        assert_eq!(odd["outcome"], "failed");
        assert_eq!(
            odd["error"],
            "its tensors differ in name or shape from those of the most answers"
        );
        assert_eq!(body["model_name"], "m");
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_model_refuses_the_request_the_client_gets_their_answer() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let refusal = json!({ "error": "inputs[0] needs name, shape, datatype and data" });
        let service = fanout(
            json!({ "strategy": "all" }),
            vec![
                branch("a", answering(10, 400, refusal.clone(), &seen)),
                branch("b", answering(20, 422, json!({ "error": "other" }), &seen)),
            ],
            &metrics,
        );
        let response = service.oneshot(post("{}")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[&FANOUT_HEADER],
            "a;outcome=failed;status=400;ms=10.0, b;outcome=failed;status=422;ms=20.0"
        );
        assert_eq!(json_of(response).await, refusal);
        assert_eq!(decided(&metrics, "failed"), 1);

        // A required branch's refusal, at once, with the others still
        // running; and a quorum that can no longer be met.
        let mut judge = branch("judge", answering(10, 400, refusal.clone(), &seen));
        judge.required = true;
        let required = fanout(
            json!({ "strategy": "all" }),
            vec![branch("a", answering(1_000, 200, json!(1), &seen)), judge],
            &metrics,
        );
        let response = required.oneshot(post("{}")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json_of(response).await, refusal);
        let quorum = fanout(
            json!({ "strategy": "quorum", "quorum": 2 }),
            vec![
                branch("a", answering(10, 400, refusal.clone(), &seen)),
                branch("b", answering(20, 400, json!({}), &seen)),
                branch("c", answering(1_000, 200, json!(1), &seen)),
            ],
            &metrics,
        );
        let started = Instant::now();
        let response = quorum.oneshot(post("{}")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json_of(response).await, refusal);

        // A failure of another kind makes it the proxy's error again.
        let mixed = fanout(
            json!({ "strategy": "all" }),
            vec![
                branch("a", answering(10, 400, refusal.clone(), &seen)),
                branch("b", answering(20, 503, json!({}), &seen)),
            ],
            &metrics,
        );
        let error = mixed.oneshot(post("{}")).await.unwrap_err();
        assert_eq!(error.kind().reason(), "fanout_insufficient_answers");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_still_arriving_at_the_deadline_sends_no_branch() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let service = fanout(
            json!({ "strategy": "all", "deadline": "100ms" }),
            vec![
                branch("a", answering(10, 200, json!(1), &seen)),
                branch("b", answering(10, 200, json!(2), &seen)),
            ],
            &metrics,
        );
        // A body whose one frame comes after 1 s.
        let slow = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"{}")))
        });
        let request = Request::post("/v1/chat/completions")
            .body(boxed(StreamBody::new(slow)))
            .unwrap();
        let started = Instant::now();
        let error = service.oneshot(request).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(error.kind().reason(), "fanout_deadline");
        assert!(error.to_string().contains("no branch was sent"), "{error}");
        assert!(report_of(&error).is_none(), "no branch, no report");
        assert_eq!(decided(&metrics, "failed"), 1);
        assert_eq!(decided(&metrics, "abandoned"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fanout_dropped_before_its_decision_cancels_its_branches_and_counts() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let service = fanout(
            json!({ "strategy": "all" }),
            vec![
                branch("a", answering(10_000, 200, json!(1), &seen)),
                branch("b", answering(10_000, 200, json!(2), &seen)),
            ],
            &metrics,
        );
        let cut = tokio::time::timeout(Duration::from_millis(5), service.oneshot(post("{}"))).await;
        assert!(cut.is_err());
        assert_eq!(seen.count(), 2);
        assert_eq!(decided(&metrics, "abandoned"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn first_races_on_the_first_event_and_streams_the_winner() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        // "early" sends headers first, but its first event comes last.
        let service = fanout(
            json!({ "strategy": "first" }),
            vec![
                branch("early", streaming(5, 200, &["data: early\n\n"], &seen)),
                branch(
                    "fast",
                    streaming(
                        20,
                        10,
                        &["data: 1\n\n", "data: 2\n\n", "data: [DONE]\n\n"],
                        &seen,
                    ),
                ),
            ],
            &metrics,
        );
        let started = Instant::now();
        let request = Request::post("/v1/chat/completions")
            .body(full(r#"{"model":"m","stream":true}"#))
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
        assert!(
            response.headers()[&FANOUT_HEADER]
                .to_str()
                .unwrap()
                .starts_with(
                    "early;outcome=cancelled;ms=30.0, fast;outcome=used;status=200;ms=30.0"
                )
        );
        assert_eq!(seen.count(), 1, "the loser was cancelled");
        // The events come one by one, 10 ms apart.
        let mut body = response.into_body();
        let mut events = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            events.push((String::from_utf8(data.to_vec()).unwrap(), started.elapsed()));
        }
        let ms = Duration::from_millis;
        assert_eq!(
            events,
            [
                ("data: 1\n\n".to_owned(), ms(30)),
                ("data: 2\n\n".to_owned(), ms(40)),
                ("data: [DONE]\n\n".to_owned(), ms(50)),
            ]
        );
        assert_eq!(seen.count(), 1, "the winner finished");
    }

    #[tokio::test(start_paused = true)]
    async fn streaming_requests_need_first_and_large_bodies_are_refused() {
        let metrics = Metrics::register(&Registry::new());
        let seen = Cancellations::default();
        let branches = || {
            vec![
                branch("a", answering(10, 200, json!(1), &seen)),
                branch("b", answering(10, 200, json!(2), &seen)),
            ]
        };
        let all = fanout(json!({ "strategy": "all" }), branches(), &metrics);
        let error = all
            .clone()
            .oneshot(post(r#"{"model":"m","stream":true}"#))
            .await
            .unwrap_err();
        assert_eq!(error.kind().status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.kind().reason(), "fanout_streaming_unsupported");
        let small = fanout(
            json!({ "strategy": "all", "maxBodyBytes": 8 }),
            branches(),
            &metrics,
        );
        let error = small.oneshot(post("0123456789")).await.unwrap_err();
        assert_eq!(error.kind().status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error.kind().reason(), "request_body_too_large");
    }
}

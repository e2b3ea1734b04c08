//! The load generator: open-loop at a constant rate (the default) or
//! closed-loop as fast as responses allow, over HTTP/1.1 or HTTP/2,
//! cleartext or TLS.
//!
//! Open loop follows wrk2: request *n* of the run is due at `n / rate`
//! seconds, spread over the workers. A worker that is still waiting for an
//! earlier response sends late, and that request's latency counts from when
//! it was due, so a server stall shows in the latencies instead of being
//! hidden by the generator slowing down (coordinated omission). A request
//! that goes out late only because the generator's timer woke late (its
//! worker was idle) counts from when it was sent: the server is not blamed
//! for the generator's jitter.

mod report;
mod request;
mod stats;
mod target;

use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use tokio::time::Instant;

pub use report::{GeneratorCpu, LoadReport, Percentiles, StreamReport, ms};
pub use request::{RequestTemplate, Template};
pub use stats::Errors;
pub use target::{Connection, Connector, Protocol, Target};

use stats::{Recorder, record};

use crate::tls::ClientTls;

/// How to run a load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The target URL (`http://` or `https://`).
    pub url: String,
    /// Requests per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Connections to open.
    pub connections: usize,
    /// Requests in flight at most (workers). HTTP/1.1 needs one connection
    /// per worker; HTTP/2 workers share the connections. Defaults to
    /// `connections`.
    pub concurrency: Option<usize>,
    /// The measured window.
    pub duration: Duration,
    /// Load before the window that is not measured.
    pub warmup: Duration,
    /// Longest wait for one whole response.
    pub timeout: Duration,
    /// HTTP version.
    pub protocol: Protocol,
    /// TLS settings for `https` URLs.
    pub tls: ClientTls,
    /// What to send.
    pub request: RequestTemplate,
    /// A name for the run in tables and charts (default: the URL).
    pub label: Option<String>,
    /// Print a progress line every second on standard error.
    pub progress: bool,
}

impl LoadOptions {
    /// Options for a closed-loop GET of `url` (callers adjust the rest).
    pub fn new(url: &str) -> Self {
        LoadOptions {
            url: url.to_owned(),
            rate: None,
            connections: 16,
            concurrency: None,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            protocol: Protocol::Http1,
            tls: ClientTls::default(),
            request: RequestTemplate::default(),
            label: None,
            progress: false,
        }
    }
}

/// Live counters for the progress line.
#[derive(Default)]
struct Progress {
    finished: AtomicU64,
    errors: AtomicU64,
}

/// What every worker shares.
struct Run {
    connector: Connector,
    request: RequestTemplate,
    timeout: Duration,
    rate: Option<f64>,
    workers: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    progress: Progress,
}

/// Runs a load and reports what it measured.
pub async fn run(options: LoadOptions) -> anyhow::Result<LoadReport> {
    run_observed(options, || ()).await.map(|(report, _)| report)
}

/// Runs a load like [`run`], and calls `observe` when the measured window
/// starts and when it ends (warm-up excluded), returning what it returned
/// each time (`None` if it panicked): so that a caller reads something
/// else (the CPU time of the server under load, say) over exactly the
/// window the report's requests were counted in.
pub async fn run_observed<T: Send + 'static>(
    options: LoadOptions,
    observe: impl Fn() -> T + Send + Sync + 'static,
) -> anyhow::Result<(LoadReport, Option<[T; 2]>)> {
    anyhow::ensure!(options.connections > 0, "--connections must be at least 1");
    if let Some(rate) = options.rate {
        anyhow::ensure!(rate.is_finite() && rate > 0.0, "--rate must be above 0");
    }
    let workers = options.concurrency.unwrap_or(options.connections);
    anyhow::ensure!(workers > 0, "--concurrency must be at least 1");
    if options.protocol == Protocol::Http1 && workers != options.connections {
        anyhow::bail!(
            "HTTP/1.1 sends one request at a time per connection: --concurrency must equal --connections (or use --http2)"
        );
    }
    let target = Arc::new(Target::resolve(&options.url).await?);
    let connector = Connector::new(target.clone(), options.protocol, &options.tls)?;

    // Connect before the clock starts, so the first requests do not pay for it.
    let mut opened = Vec::with_capacity(options.connections);
    let attempts =
        futures_util::future::join_all((0..options.connections).map(|_| connector.connect())).await;
    let mut first_error = None;
    for attempt in attempts {
        match attempt {
            Ok(c) => opened.push(Some(c)),
            Err(e) => {
                first_error.get_or_insert(e);
                opened.push(None);
            }
        }
    }
    if opened.iter().all(Option::is_none) {
        let e = first_error.expect("at least one attempt");
        anyhow::bail!("cannot connect to {}: {e}", options.url);
    }

    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;
    let run = Arc::new(Run {
        connector,
        request: options.request.clone(),
        timeout: options.timeout,
        rate: options.rate,
        workers,
        start,
        measure_from,
        end,
        progress: Progress::default(),
    });

    let lanes: Vec<Lane> = match options.protocol {
        Protocol::Http1 => opened
            .into_iter()
            .map(|c| match c {
                Some(Connection::Http1(s)) => Lane::Own(Some(s)),
                _ => Lane::Own(None),
            })
            .collect(),
        Protocol::Http2 => {
            let shared: Vec<Arc<Shared>> = opened
                .into_iter()
                .map(|c| {
                    let sender = match c {
                        Some(Connection::Http2(s)) => Some(s),
                        _ => None,
                    };
                    Arc::new(Shared(tokio::sync::Mutex::new(sender)))
                })
                .collect();
            (0..workers)
                .map(|i| Lane::Shared(shared[i % shared.len()].clone()))
                .collect()
        }
    };

    let cpu = tokio::spawn(measure_cpu(measure_from, end));
    let observed = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from).await;
        let first = observe();
        tokio::time::sleep_until(end).await;
        [first, observe()]
    });
    let progress = options
        .progress
        .then(|| tokio::spawn(report_progress(run.clone())));
    let tasks: Vec<_> = lanes
        .into_iter()
        .enumerate()
        .map(|(index, lane)| tokio::spawn(worker(run.clone(), index, lane)))
        .collect();
    let mut records = Recorder::default();
    for task in tasks {
        records.merge(&task.await.context("a load worker panicked")?);
    }
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let generator_cpu = cpu.await.unwrap_or_default();
    let observed = observed.await.ok();
    let protocol = match options.protocol {
        Protocol::Http1 => "HTTP/1.1",
        Protocol::Http2 => "HTTP/2",
    };
    let report = LoadReport::new(
        options.label.clone().unwrap_or_else(|| options.url.clone()),
        options.url.clone(),
        format!("{protocol}{}", if target.tls { " over TLS" } else { "" }),
        options.rate,
        options.connections,
        workers,
        options.duration,
        options.warmup,
        &records,
        generator_cpu,
    );
    Ok((report, observed))
}

async fn measure_cpu(from: Instant, to: Instant) -> GeneratorCpu {
    tokio::time::sleep_until(from).await;
    let before = crate::process::own().map(|u| u.cpu_seconds).unwrap_or(0.0);
    tokio::time::sleep_until(to).await;
    let after = crate::process::own().map(|u| u.cpu_seconds).unwrap_or(0.0);
    let seconds = (after - before).max(0.0);
    GeneratorCpu {
        seconds,
        cores: seconds / to.duration_since(from).as_secs_f64().max(f64::MIN_POSITIVE),
        available_cores: crate::process::cores(),
    }
}

async fn report_progress(run: Arc<Run>) {
    let terminal = std::io::stderr().is_terminal();
    let mut tick =
        tokio::time::interval_at(run.start + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = 0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let finished = run.progress.finished.load(Ordering::Relaxed);
        let errors = run.progress.errors.load(Ordering::Relaxed);
        let phase = if now < run.measure_from {
            "warm-up"
        } else {
            "measuring"
        };
        let line = format!(
            "[{:>6.1}s {phase}] {finished} requests, {errors} errors, {} req/s",
            now.duration_since(run.start).as_secs_f64(),
            finished - last
        );
        last = finished;
        if terminal {
            eprint!("\r{line:<72}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// How a worker reaches the server.
enum Lane {
    /// Its own HTTP/1.1 connection (reopened when it breaks).
    Own(Option<http1::SendRequest<Full<Bytes>>>),
    /// An HTTP/2 connection shared with other workers.
    Shared(Arc<Shared>),
}

/// An HTTP/2 connection some workers share; the first to find it broken
/// opens a new one.
struct Shared(tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>);

/// How one exchange ended.
enum Exchange {
    Response {
        status: StatusCode,
        bytes: u64,
        streamed: bool,
        events: u64,
        first_event: Option<Instant>,
    },
    ConnectFailed,
    TimedOut,
    Failed,
}

async fn worker(run: Arc<Run>, index: usize, mut lane: Lane) -> Recorder {
    let mut records = Recorder::default();
    let mut busy_until = run.start;
    for n in 0u64.. {
        let intended = match run.rate {
            Some(rate) => {
                let due = (n as f64 * run.workers as f64 + index as f64) / rate;
                let at = run.start + Duration::from_secs_f64(due);
                if at >= run.end {
                    break;
                }
                // A due time already past (the worker is catching up) must
                // not wait for the timer's next tick.
                if at > Instant::now() {
                    tokio::time::sleep_until(at).await;
                }
                at
            }
            None => {
                if Instant::now() < run.start {
                    tokio::time::sleep_until(run.start).await;
                }
                let now = Instant::now();
                if now >= run.end {
                    break;
                }
                now
            }
        };
        let sent = Instant::now();
        // Blame the server for lateness only when this worker was waiting
        // on it; a late timer is the generator's own jitter.
        let started = if busy_until > intended {
            intended
        } else {
            sent
        };
        let measured = intended >= run.measure_from;
        let gaps = if measured {
            Some(&mut records.event_gaps)
        } else {
            None
        };
        let exchange = lane.exchange(&run, gaps).await;
        let done = Instant::now();
        busy_until = done;
        run.progress.finished.fetch_add(1, Ordering::Relaxed);
        if !matches!(exchange, Exchange::Response { status, .. } if status.as_u16() < 400) {
            run.progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        if measured {
            if sent < run.end {
                records.sent += 1;
            }
            record_exchange(&mut records, &exchange, started, sent, intended, done);
        }
        if matches!(exchange, Exchange::ConnectFailed) && run.rate.is_none() {
            // Closed loop: do not spin on a server that refuses connections.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    records
}

fn record_exchange(
    records: &mut Recorder,
    exchange: &Exchange,
    started: Instant,
    sent: Instant,
    intended: Instant,
    done: Instant,
) {
    record(
        &mut records.send_lag,
        sent.saturating_duration_since(intended),
    );
    match exchange {
        Exchange::Response {
            status,
            bytes,
            streamed,
            events,
            first_event,
        } => {
            record(&mut records.latency, done.duration_since(started));
            record(&mut records.service, done.duration_since(sent));
            records.bytes += bytes;
            match status.as_u16() {
                500.. => records.errors.status_5xx += 1,
                400..=499 => records.errors.status_4xx += 1,
                _ => records.ok += 1,
            }
            if *streamed {
                records.streams += 1;
                records.events += events;
                if let Some(first) = first_event {
                    record(&mut records.first_event, first.duration_since(started));
                }
            }
        }
        Exchange::ConnectFailed => records.errors.connect += 1,
        Exchange::TimedOut => records.errors.timeout += 1,
        Exchange::Failed => records.errors.io += 1,
    }
}

impl Lane {
    /// Sends the run's request and reads the whole response.
    async fn exchange(&mut self, run: &Run, gaps: Option<&mut Histogram<u64>>) -> Exchange {
        let deadline = Instant::now() + run.timeout;
        let request = run
            .connector
            .target()
            .request(&run.request, run.connector.protocol());
        match self {
            Lane::Own(slot) => {
                if let Some(sender) = slot
                    && sender.ready().await.is_err()
                {
                    *slot = None;
                }
                if slot.is_none() {
                    match tokio::time::timeout_at(deadline, run.connector.connect()).await {
                        Ok(Ok(Connection::Http1(s))) => *slot = Some(s),
                        Ok(_) => return Exchange::ConnectFailed,
                        Err(_) => return Exchange::TimedOut,
                    }
                }
                let sender = slot.as_mut().expect("connected above");
                let exchange = within(deadline, sender.send_request(request), gaps).await;
                if matches!(exchange, Exchange::Failed | Exchange::TimedOut) {
                    // Broken, or mid-exchange: the connection cannot be reused.
                    *slot = None;
                }
                exchange
            }
            Lane::Shared(shared) => {
                let mut sender = {
                    let mut current = shared.0.lock().await;
                    match current.as_ref() {
                        Some(s) if !s.is_closed() => s.clone(),
                        _ => match tokio::time::timeout_at(deadline, run.connector.connect()).await
                        {
                            Ok(Ok(Connection::Http2(s))) => {
                                *current = Some(s.clone());
                                s
                            }
                            Ok(_) => return Exchange::ConnectFailed,
                            Err(_) => return Exchange::TimedOut,
                        },
                    }
                };
                // A stream that fails leaves the shared connection to the
                // next worker, which reopens it if it closed.
                within(deadline, sender.send_request(request), gaps).await
            }
        }
    }
}

/// Waits for `response` and reads it to its end, all before `deadline`.
async fn within(
    deadline: Instant,
    response: impl Future<Output = Result<http::Response<Incoming>, hyper::Error>>,
    gaps: Option<&mut Histogram<u64>>,
) -> Exchange {
    let outcome =
        tokio::time::timeout_at(deadline, async { read(response.await?, gaps).await }).await;
    match outcome {
        Ok(Ok(exchange)) => exchange,
        Ok(Err(_)) => Exchange::Failed,
        Err(_) => Exchange::TimedOut,
    }
}

/// Reads a response to its end, timing server-sent events as they arrive.
async fn read(
    response: http::Response<Incoming>,
    mut gaps: Option<&mut Histogram<u64>>,
) -> Result<Exchange, hyper::Error> {
    let status = response.status();
    let streamed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = response.into_body();
    let mut bytes = 0u64;
    let mut events = 0u64;
    let mut first_event = None;
    let mut last_event: Option<Instant> = None;
    let mut ended_with_newline = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        bytes += data.len() as u64;
        if !streamed || data.is_empty() {
            continue;
        }
        // An event ends at a blank line: "\n\n", possibly split across frames.
        let mut ends = data.windows(2).filter(|w| w == b"\n\n").count() as u64;
        if ended_with_newline && data[0] == b'\n' {
            ends += 1;
        }
        ended_with_newline = data.ends_with(b"\n");
        if ends == 0 {
            continue;
        }
        let now = Instant::now();
        events += ends;
        match last_event {
            None => first_event = Some(now),
            Some(last) => {
                if let Some(g) = gaps.as_deref_mut() {
                    record(g, now.duration_since(last));
                }
            }
        }
        // Several events in one frame arrived together: no gap between them.
        for _ in 1..ends {
            if let Some(g) = gaps.as_deref_mut() {
                record(g, Duration::ZERO);
            }
        }
        last_event = Some(now);
    }
    Ok(Exchange::Response {
        status,
        bytes,
        streamed,
        events,
        first_event,
    })
}

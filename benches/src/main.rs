//! `infermesh-bench`: infermesh's load harness.
//!
//! - `load`: drive load at a URL and report latency honestly;
//! - `serve`: run mock model servers;
//! - `compare`: the same load against a direct connection, infermesh and
//!   its peers, side by side;
//! - `plot`: draw the latency curves of saved `load --json` reports;
//! - `soak`: steady load on the real proxy through reloads, certificate
//!   rotation, backend restarts and hostile clients.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use infermesh_bench::compare::{self, Comparison};
use infermesh_bench::load::{self, LoadOptions, LoadReport, Protocol, RequestTemplate, Template};
use infermesh_bench::mock::{self, ModelSpec, Scenario, ServerSpec, TlsSpec};
use infermesh_bench::plot;
use infermesh_bench::soak;
use infermesh_bench::tls::ClientTls;

/// infermesh's load harness.
#[derive(Parser, Debug)]
#[command(name = "infermesh-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Drive load at a URL: open loop at --rate (corrected for coordinated
    /// omission), or closed loop over --connections when no rate is given.
    Load(LoadArgs),
    /// Run mock model servers speaking OpenAI-compatible and KServe v2 APIs.
    Serve(ServeArgs),
    /// Run the same load against direct, infermesh, HAProxy and nginx.
    Compare(CompareArgs),
    /// Draw the latency curves of saved `load --json` reports on one chart.
    Plot(PlotArgs),
    /// Soak infermesh-proxy: steady load while its config reloads, its
    /// certificate rotates, a backend is killed and restarted, and hostile
    /// clients run beside it. Exits 1 unless every check passes.
    Soak(SoakArgs),
    /// The control plane under a mesh of simulated proxies (the proxy's
    /// own control-plane client, thousands in this process): bootstrap,
    /// a change all see, an endpoint change, a restart; time to the last
    /// acknowledgement, bytes pushed, the control plane's CPU and memory.
    MeshScale(MeshScaleArgs),
}

#[derive(Args, Debug)]
struct MeshScaleArgs {
    /// Simulated sidecars.
    #[arg(long, default_value_t = 2000)]
    proxies: usize,
    /// Services (a backend and a route each).
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Namespaces the services are spread over.
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    /// Every sidecar holds every service (no `Sidecar` resources).
    #[arg(long)]
    full_mesh: bool,
    /// The infermesh-control-plane binary [default: beside this one].
    #[arg(long)]
    control_plane: Option<std::path::PathBuf>,
    /// How long any one phase may take.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    phase_timeout: std::time::Duration,
    /// How long the control plane is left idle after the changes before
    /// its settled memory is read.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    settle: std::time::Duration,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Target URL, http:// or https://. With --template, a URL without a
    /// path gets the template's.
    url: String,
    /// Requests per second, sent on schedule whatever the responses do
    /// (open loop). Without it and with --connections: closed loop.
    #[arg(short = 'r', long)]
    rate: Option<f64>,
    /// Connections [default: 16].
    #[arg(short = 'c', long)]
    connections: Option<usize>,
    /// Requests in flight at most; HTTP/2 only (HTTP/1.1 uses one per
    /// connection) [default: the connections].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Measured time.
    #[arg(short = 'z', long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before the measured time, not measured.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Longest wait for one whole response.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Speak HTTP/2 (h2c with prior knowledge, or ALPN h2 over TLS).
    #[arg(long)]
    http2: bool,
    /// CA bundle (PEM) that https servers must chain to.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Accept any server certificate.
    #[arg(long)]
    insecure: bool,
    /// Request method [default: GET, or POST with a body].
    #[arg(short = 'm', long)]
    method: Option<String>,
    /// A request header, `name: value`; repeat for more.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body.
    #[arg(short = 'd', long, conflicts_with_all = ["body_file", "request", "template"])]
    body: Option<String>,
    /// Request body from a file.
    #[arg(long, conflicts_with_all = ["request", "template"])]
    body_file: Option<PathBuf>,
    /// Method, headers and body from a YAML or JSON file.
    #[arg(long, conflicts_with = "template")]
    request: Option<PathBuf>,
    /// A built-in request for a model API.
    #[arg(long, value_enum)]
    template: Option<Template>,
    /// The model a template names.
    #[arg(long, default_value = "mock-llm")]
    model: String,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw the latency percentile curve as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Name of this run in tables and charts.
    #[arg(long)]
    label: Option<String>,
    /// No progress line.
    #[arg(short = 'q', long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Servers, models and behaviour from a scenario file.
    #[arg(long, conflicts_with_all = ["listen", "models", "tls_cert"])]
    scenario: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A model to serve; repeat for several [default: mock-llm].
    #[arg(long = "model")]
    models: Vec<String>,
    /// Tokens per answer.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Time to a whole answer, or to the first streamed token.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Time between streamed tokens.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    token_interval: Duration,
    /// Serve TLS with this certificate (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// The comparison file.
    file: PathBuf,
    /// Also write every round as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw the targets' latency curves as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Keep generated configs and logs here [default: a temporary directory].
    #[arg(long)]
    work: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// Reports written by `load --json`.
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "latency by percentile")]
    title: String,
}

#[derive(Args, Debug)]
struct SoakArgs {
    /// The whole run (at least 4s).
    #[arg(short = 'z', long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Requests per second of each well-behaved client (one over HTTP/1.1,
    /// one over HTTP/2).
    #[arg(short = 'r', long, default_value_t = 200.0)]
    rate: f64,
    /// The infermesh-proxy binary [default: the one next to infermesh-bench].
    #[arg(long)]
    proxy: Option<PathBuf>,
    /// Keep the config, certificates and the proxy's log here [default: a
    /// temporary directory, removed when the soak passes].
    #[arg(long)]
    work: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No event lines on standard error.
    #[arg(short = 'q', long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Load(args) => load_command(args).await,
        Command::Serve(args) => serve_command(args).await,
        Command::Compare(args) => compare_command(args).await,
        Command::Plot(args) => plot_command(args),
        Command::Soak(args) => soak_command(args).await,
        Command::MeshScale(args) => mesh_scale_command(args).await,
    }
}

async fn mesh_scale_command(args: MeshScaleArgs) -> anyhow::Result<()> {
    let control_plane = match args.control_plane {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("infermesh-control-plane"))
            .ok_or_else(|| anyhow::anyhow!("cannot tell where this binary is"))?,
    };
    let report = infermesh_bench::mesh_scale::run(infermesh_bench::mesh_scale::ScaleOptions {
        control_plane,
        proxies: args.proxies,
        services: args.services,
        namespaces: args.namespaces,
        full_mesh: args.full_mesh,
        phase_timeout: args.phase_timeout,
        settle: args.settle,
    })
    .await?;
    println!("{report}");
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

async fn load_command(args: LoadArgs) -> anyhow::Result<()> {
    let mut request = match (&args.request, args.template) {
        (Some(file), _) => RequestTemplate::from_file(file)?,
        (None, Some(template)) => template.request(&args.model),
        (None, None) => RequestTemplate::default(),
    };
    if let Some(body) = &args.body {
        request.body = body.clone().into();
    }
    if let Some(file) = &args.body_file {
        request.body = std::fs::read(file)
            .with_context(|| format!("cannot read {}", file.display()))?
            .into();
    }
    if !request.body.is_empty()
        && args.request.is_none()
        && args.template.is_none()
        && args.method.is_none()
    {
        request.method = http::Method::POST;
    }
    if let Some(m) = &args.method {
        request.method = http::Method::from_bytes(m.as_bytes())
            .with_context(|| format!("invalid method {m:?}"))?;
    }
    for h in &args.headers {
        request.add_header(h)?;
    }
    let mut url = args.url.clone();
    if let Some(template) = args.template {
        let bare = url.trim_end_matches('/');
        if bare.matches('/').count() == 2 {
            url = format!("{bare}{}", template.path(&args.model));
        }
    }
    let mut options = LoadOptions::new(&url);
    options.rate = match (args.rate, args.connections) {
        (Some(rate), _) => Some(rate),
        (None, Some(_)) => None,
        (None, None) => Some(100.0),
    };
    options.connections = args.connections.unwrap_or(16);
    options.concurrency = args.concurrency;
    options.duration = args.duration;
    options.warmup = args.warmup;
    options.timeout = args.timeout;
    options.protocol = if args.http2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    options.tls = ClientTls {
        ca: args.cacert.clone(),
        identity: args.cert.clone().zip(args.key.clone()),
        insecure: args.insecure,
    };
    options.request = request;
    options.label = args.label.clone();
    options.progress = !args.quiet;
    let report = load::run(options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        for w in report.warnings() {
            eprintln!("{w}");
        }
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.plot {
        plot::percentile_chart(
            path,
            &format!("latency of {}", report.label),
            &[plot::Series {
                label: &report.label,
                points: &report.spectrum,
            }],
        )?;
    }
    Ok(())
}

async fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
    let scenario = match &args.scenario {
        Some(file) => Scenario::load(file)?,
        None => {
            let models = if args.models.is_empty() {
                vec!["mock-llm".to_owned()]
            } else {
                args.models.clone()
            };
            let spec = |name: &String| {
                ModelSpec::simple(
                    name,
                    args.latency.into(),
                    args.token_interval.into(),
                    args.tokens,
                )
            };
            Scenario {
                seed: 0,
                servers: vec![ServerSpec {
                    listen: args
                        .listen
                        .unwrap_or_else(|| "127.0.0.1:9000".parse().expect("address")),
                    tls: args
                        .tls_cert
                        .clone()
                        .zip(args.tls_key.clone())
                        .map(|(cert, key)| TlsSpec {
                            cert,
                            key,
                            client_ca: args.client_ca.clone(),
                        }),
                    models: models.iter().map(spec).collect(),
                }],
            }
        }
    };
    let servers = mock::bind_all(&scenario).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for server in servers {
        println!(
            "mock model server listening on {} (models: {})",
            server.local_addr(),
            server.model_names().join(", ")
        );
        tasks.spawn(server.serve());
    }
    tokio::select! {
        _ = tasks.join_next() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

async fn compare_command(args: CompareArgs) -> anyhow::Result<()> {
    let comparison = Comparison::load(&args.file)?;
    let temporary;
    let work = match &args.work {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temporary =
                std::env::temp_dir().join(format!("infermesh-compare-{}", std::process::id()));
            std::fs::create_dir_all(&temporary)?;
            temporary
        }
    };
    let report = compare::run(&comparison, &work).await?;
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(path) = &args.svg {
        report.chart(path)?;
    }
    Ok(())
}

async fn soak_command(args: SoakArgs) -> anyhow::Result<()> {
    let options = soak::SoakOptions {
        duration: args.duration,
        rate: args.rate,
        proxy: args.proxy,
        work: args.work,
        progress: !args.quiet,
        ..soak::SoakOptions::default()
    };
    let report = soak::run(options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.passed {
        eprintln!(
            "soak failed: {}; the proxy's log is in {}",
            report
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            report.work
        );
        std::process::exit(1);
    }
    Ok(())
}

fn plot_command(args: PlotArgs) -> anyhow::Result<()> {
    let reports: Vec<LoadReport> = args
        .reports
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a `load --json` report", p.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let series: Vec<plot::Series<'_>> = reports
        .iter()
        .map(|r| plot::Series {
            label: &r.label,
            points: &r.spectrum,
        })
        .collect();
    plot::percentile_chart(&args.out, &args.title, &series)
}

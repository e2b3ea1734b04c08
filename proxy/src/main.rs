//! `infermesh-proxy`: the infermesh data plane binary.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use infermesh_api::app_probes::{self, AppProbes};
use infermesh_init::{
    self as intercept, CidrList, InterceptConfig, Iptables, Ipv4Cidr, PortList, Selection,
};
use infermesh_proxy::{
    AccessLogFilter, CaptureAddresses, ConfigFileError, ConfigFrom, ControlPlaneOptions,
    IdentityFiles, LogFormat, Mode, RunOptions, TraceArgs, TrustBundle,
};

/// jemalloc rather than the system allocator: a request allocates a few
/// dozen small blocks on one thread and frees them soon after, which
/// jemalloc's thread caches do in fewer instructions (5 % fewer per
/// request, by callgrind), and it keeps an idle proxy's anonymous memory
/// lower than glibc's per-thread arenas do (1.7 MB against 5.5 MB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The background threads jemalloc may start to give freed memory back to
/// the system. The workspace builds it with them on (the control plane
/// wants them), and by default it starts one per arena in use, three in
/// an idle proxy; one is enough for a sidecar's few arenas, and every
/// thread is a stack more in every pod.
const ALLOCATOR_BACKGROUND_THREADS: usize = 1;

/// infermesh's proxy for model-serving traffic.
#[derive(Parser, Debug)]
#[command(name = "infermesh-proxy", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "INFERMESH_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    /// Workers serving traffic (default: one per CPU the process may run
    /// on), like Envoy's `--concurrency`: each a thread with its own event
    /// loop, accepting on every listener and keeping the connections it
    /// accepted and its own upstream connections.
    #[arg(long, env = "INFERMESH_CONCURRENCY", global = true)]
    concurrency: Option<usize>,
    /// Log filter, in RUST_LOG syntax (e.g. `info`, `debug,hyper=info`,
    /// `info,infermesh::access=off` to silence the access log).
    #[arg(long, default_value = "info", env = "INFERMESH_LOG", global = true)]
    log_level: String,
    /// Write access-log lines only for errors: requests the proxy failed
    /// or cut short (499 included), statuses of 500 and more, and gRPC
    /// statuses of a server's failure. With --access-log-slower-than, a
    /// request either selects is written.
    #[arg(long, env = "INFERMESH_ACCESS_LOG_ERRORS_ONLY", global = true)]
    access_log_errors_only: bool,
    /// Write access-log lines only for requests that took at least this
    /// long (e.g. `500ms`, `2s`). With --access-log-errors-only, a request
    /// either selects is written.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, env = "INFERMESH_ACCESS_LOG_SLOWER_THAN", global = true)]
    access_log_slower_than: Option<std::time::Duration>,
    /// The share of access-log lines written, from 0 to 1, picked at
    /// random among those --access-log-errors-only and
    /// --access-log-slower-than select; errors' lines are always written.
    #[arg(long, value_name = "RATIO", default_value_t = 1.0, value_parser = AccessLogFilter::parse_sample, env = "INFERMESH_ACCESS_LOG_SAMPLE", global = true)]
    access_log_sample: f64,
    #[command(flatten)]
    tracing: TraceArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a gateway in front of model servers, from one YAML file
    /// (--config), or with the listeners the control plane selects for it
    /// (--control-plane, with --label).
    Gateway(GatewayArgs),
    /// Run as a pod's sidecar: the capture listeners `inbound`
    /// (0.0.0.0:15006) and `outbound` (127.0.0.1:15001), plus the
    /// backends, routes and policies of the control plane
    /// (--control-plane, which also signs its certificate) or of a file
    /// (--config, with --identity-cert...), which may redefine either
    /// listener.
    Sidecar(SidecarArgs),
    /// Validate a config file without starting; prints every problem with
    /// its file, line, column and field.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Check it as a sidecar's (with the built-in capture listeners).
        #[arg(long)]
        sidecar: bool,
    },
    /// Install the iptables rules (nat table, IPv4) that send the pod's TCP
    /// traffic through its sidecar proxy; run once per pod, as root with
    /// NET_ADMIN and NET_RAW (a Kubernetes init container). Running it
    /// again leaves the same rules.
    Init(InitArgs),
}

/// `infermesh-proxy init`'s options.
#[derive(Args, Debug)]
#[command(next_help_heading = "Interception")]
struct InitArgs {
    /// The proxy's inbound port: inbound TCP is redirected there.
    #[arg(long, default_value_t = intercept::DEFAULT_INBOUND_PORT, value_parser = intercept::parse_port)]
    inbound_port: u16,
    /// The proxy's outbound port: outbound TCP is redirected there.
    #[arg(long, default_value_t = intercept::DEFAULT_OUTBOUND_PORT, value_parser = intercept::parse_port)]
    outbound_port: u16,
    /// The proxy's health port, never redirected, so kubelet probes reach
    /// the proxy.
    #[arg(long, default_value_t = intercept::DEFAULT_HEALTH_PORT, value_parser = intercept::parse_port)]
    health_port: u16,
    /// The UID the proxy runs as; its traffic is never redirected.
    #[arg(long, default_value_t = intercept::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// The GID whose traffic is never redirected [default: --proxy-uid].
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// Inbound ports never redirected, comma-separated (e.g. 22,9090).
    #[arg(long, value_name = "PORTS")]
    exclude_inbound_ports: Option<PortList>,
    /// Inbound ports redirected: `*` for all, or a comma-separated list.
    #[arg(long, value_name = "PORTS", default_value = "*")]
    include_inbound_ports: Selection<u16>,
    /// Outbound destination ports never redirected, comma-separated.
    #[arg(long, value_name = "PORTS")]
    exclude_outbound_ports: Option<PortList>,
    /// Outbound destinations never redirected: IPv4 CIDRs, comma-separated
    /// (e.g. 10.96.0.0/12,169.254.169.254/32).
    #[arg(long, value_name = "CIDRS")]
    exclude_outbound_cidrs: Option<CidrList>,
    /// Outbound destinations redirected: `*` for all, or comma-separated
    /// IPv4 CIDRs.
    #[arg(long, value_name = "CIDRS", default_value = "*")]
    include_outbound_cidrs: Selection<Ipv4Cidr>,
    /// The iptables to use (e.g. iptables-legacy); `-save` and `-restore`
    /// are looked for beside it.
    #[arg(long, default_value = "iptables")]
    iptables: PathBuf,
    /// Remove the rules instead (every INFERMESH_ chain and the jumps to
    /// them); succeeds when none are installed.
    #[arg(long)]
    cleanup: bool,
    /// Print the iptables-restore input instead of applying it; needs
    /// neither root nor iptables.
    #[arg(long)]
    dry_run: bool,
}

impl InitArgs {
    fn config(&self) -> InterceptConfig {
        InterceptConfig {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            health_port: self.health_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid.unwrap_or(self.proxy_uid),
            exclude_inbound_ports: self.exclude_inbound_ports.clone().unwrap_or_default().0,
            include_inbound_ports: self.include_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone().unwrap_or_default().0,
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone().unwrap_or_default().0,
            include_outbound_cidrs: self.include_outbound_cidrs.clone(),
        }
    }
}

/// How a gateway or a sidecar is started.
#[derive(Args, Debug)]
struct RunArgs {
    /// The config file (Listener, Backend, Route and AuthorizationPolicy
    /// documents).
    #[arg(long, short, env = "INFERMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Admin server address: /config, /endpoints, /drain, /log-level.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: SocketAddr,
    /// Health and metrics server address: /live, /ready, /metrics.
    #[arg(long, default_value = "0.0.0.0:15020")]
    health_address: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace_period: std::time::Duration,
    /// How long after SIGTERM listeners keep accepting while /ready
    /// already answers 503 (for Kubernetes, a few seconds lets endpoint
    /// removal reach the load balancers first).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    drain_delay: std::time::Duration,
    /// The proxy's SPIFFE certificate chain (PEM), for mutual TLS;
    /// watched and reloaded when it changes.
    #[arg(long, requires_all = ["identity_key", "trust_bundle"], env = "INFERMESH_IDENTITY_CERT")]
    identity_cert: Option<PathBuf>,
    /// The private key of --identity-cert (PEM).
    #[arg(long, requires = "identity_cert", env = "INFERMESH_IDENTITY_KEY")]
    identity_key: Option<PathBuf>,
    /// The trusted root certificates (PEM).
    #[arg(long, env = "INFERMESH_TRUST_BUNDLE")]
    trust_bundle: Option<PathBuf>,
    /// The trusted root certificates as PEM text rather than a file, for a
    /// proxy fed by the control plane that has no file to read (the
    /// injector sets it in injected sidecars).
    #[arg(
        long,
        env = "INFERMESH_TRUST_BUNDLE_PEM",
        value_name = "PEM",
        hide_env_values = true,
        conflicts_with = "trust_bundle"
    )]
    trust_bundle_pem: Option<String>,
    /// The app's HTTP probes the health server answers under
    /// /app-health/, as JSON (the injector sets it when it moves the app's
    /// probes to the sidecar).
    #[arg(
        long,
        env = "INFERMESH_APP_PROBES",
        value_name = "JSON",
        hide_env_values = true
    )]
    app_probes: Option<String>,
}

/// `infermesh-proxy gateway`'s options.
#[derive(Args, Debug)]
struct GatewayArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    mesh: ControlPlaneArgs,
}

/// `infermesh-proxy sidecar`'s options.
#[derive(Args, Debug)]
struct SidecarArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    capture: CaptureArgs,
    #[command(flatten)]
    mesh: ControlPlaneArgs,
}

/// Where the sidecar's capture listeners bind.
#[derive(Args, Debug)]
#[command(next_help_heading = "Capture")]
struct CaptureArgs {
    /// The `inbound` capture listener's address (where `init`'s iptables
    /// rules send incoming connections).
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_address: SocketAddr,
    /// The `outbound` capture listener's address (where `init`'s iptables
    /// rules send the app's own calls).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_address: SocketAddr,
}

/// How a sidecar reaches its control plane.
#[derive(Args, Debug)]
#[command(next_help_heading = "Control plane")]
struct ControlPlaneArgs {
    /// Control plane addresses (host:port), comma-separated: the sidecar
    /// gets its certificate and config from any of them (instead of
    /// --config and --identity-cert), and fails over between them.
    #[arg(long, value_delimiter = ',', env = "INFERMESH_CONTROL_PLANE", conflicts_with_all = ["config", "identity_cert"], requires = "credential")]
    control_plane: Vec<String>,
    /// The file with the workload's credential: a join token
    /// (`infermesh-control-plane token create`) or a projected
    /// ServiceAccount token; read again for every certificate request (kubelet
    /// rewrites a projected token before it expires). Content that is a JWT
    /// (three base64url segments, the first a JSON header naming its `alg`)
    /// is sent as a Kubernetes token, which the control plane checks with a
    /// TokenReview; anything else as a join token.
    #[arg(long, env = "INFERMESH_CREDENTIAL")]
    credential: Option<PathBuf>,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local", env = "INFERMESH_TRUST_DOMAIN")]
    trust_domain: String,
    /// The control plane's SPIFFE ID [default:
    /// spiffe://<trust domain>/ns/infermesh-system/sa/control-plane].
    #[arg(long)]
    control_plane_identity: Option<String>,
    /// The proxy's name in the mesh, as `status` shows it [default: the
    /// host name, which is the pod name in Kubernetes].
    #[arg(long, env = "INFERMESH_NODE")]
    node: Option<String>,
    /// The workload's labels (key=value, comma-separated), which `Sidecar`
    /// resources and policy selectors match.
    #[arg(long = "label", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

impl ControlPlaneArgs {
    /// The control plane to get the config from, if one is given.
    fn into_config(self, run: &RunArgs) -> Result<Option<ConfigFrom>, String> {
        if self.control_plane.is_empty() {
            if !self.labels.is_empty() || self.credential.is_some() {
                return Err("--label and --credential go with --control-plane".into());
            }
            return Ok(None);
        }
        let trust_bundle = match (&run.trust_bundle, &run.trust_bundle_pem) {
            (Some(path), _) => TrustBundle::File(path.clone()),
            (None, Some(pem)) => TrustBundle::Pem(pem.clone()),
            (None, None) => {
                return Err(
                    "--control-plane needs the roots to check it by: --trust-bundle FILE, or the PEM text in INFERMESH_TRUST_BUNDLE_PEM".into(),
                );
            }
        };
        let node = self.node.or_else(host_name).unwrap_or_default();
        if node.is_empty() {
            return Err("name the proxy with --node (the host name is unknown)".into());
        }
        Ok(Some(ConfigFrom::ControlPlane(ControlPlaneOptions {
            addresses: self.control_plane,
            credential: self.credential.expect("clap requires it"),
            trust_bundle,
            trust_domain: self.trust_domain,
            control_plane_identity: self.control_plane_identity,
            node,
            labels: self.labels.into_iter().collect(),
        })))
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not key=value")),
    }
}

impl RunArgs {
    /// The app probes of `--app-probes` (`INFERMESH_APP_PROBES`), checked.
    fn app_probes(&self) -> Result<AppProbes, String> {
        match &self.app_probes {
            None => Ok(AppProbes::new()),
            Some(text) => app_probes::parse(text)
                .map_err(|e| format!("{e} (given with --app-probes or INFERMESH_APP_PROBES)")),
        }
    }

    fn into_options(
        self,
        mode: Mode,
        config: ConfigFrom,
        capture: CaptureAddresses,
        app_probes: AppProbes,
    ) -> RunOptions {
        RunOptions {
            mode,
            config,
            capture,
            admin_address: self.admin_address,
            health_address: self.health_address,
            shutdown_grace_period: self.shutdown_grace_period,
            drain_delay: self.drain_delay,
            identity: self
                .identity_cert
                .zip(self.identity_key)
                .zip(self.trust_bundle)
                .map(|((cert, key), bundle)| IdentityFiles { cert, key, bundle }),
            app_probes,
            access_log: AccessLogFilter::default(),
            tracing: None,
            workers: 1,
        }
    }
}

fn main() -> ExitCode {
    // Before any thread allocates: no more purging threads are started
    // than asked. A jemalloc without the control leaves its default, which
    // costs memory, not correctness.
    let _ = tikv_jemalloc_ctl::max_background_threads::write(ALLOCATOR_BACKGROUND_THREADS);
    let cli = Cli::parse();
    let sidecar = matches!(cli.command, Command::Sidecar(_));
    let access_log = AccessLogFilter {
        errors_only: cli.access_log_errors_only,
        slower_than: cli.access_log_slower_than,
        sample: cli.access_log_sample,
    };
    let options = match cli.command {
        Command::Check { config, sidecar } => {
            return check(
                &config,
                if sidecar {
                    Mode::Sidecar
                } else {
                    Mode::Gateway
                },
            );
        }
        Command::Init(args) => return init(&args),
        Command::Gateway(GatewayArgs { run, mesh }) => {
            let config = match mesh.into_config(&run) {
                Ok(Some(control_plane)) => control_plane,
                Ok(None) => {
                    let Some(config) = run.config.clone() else {
                        eprintln!(
                            "infermesh-proxy: a gateway runs from its config file (--config) or from the control plane (--control-plane)"
                        );
                        return ExitCode::from(2);
                    };
                    if run.trust_bundle.is_some() && run.identity_cert.is_none() {
                        eprintln!(
                            "infermesh-proxy: --trust-bundle goes with --identity-cert and --identity-key"
                        );
                        return ExitCode::from(2);
                    }
                    if run.trust_bundle_pem.is_some() {
                        eprintln!(
                            "infermesh-proxy: INFERMESH_TRUST_BUNDLE_PEM goes with --control-plane; with --config give --trust-bundle"
                        );
                        return ExitCode::from(2);
                    }
                    ConfigFrom::File(config)
                }
                Err(e) => {
                    eprintln!("infermesh-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            let app_probes = match run.app_probes() {
                Ok(probes) => probes,
                Err(e) => {
                    eprintln!("infermesh-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            run.into_options(
                Mode::Gateway,
                config,
                CaptureAddresses::default(),
                app_probes,
            )
        }
        Command::Sidecar(SidecarArgs { run, capture, mesh }) => {
            let config = match mesh.into_config(&run) {
                Ok(Some(control_plane)) => control_plane,
                Ok(None) => {
                    if run.trust_bundle_pem.is_some() {
                        eprintln!(
                            "infermesh-proxy: INFERMESH_TRUST_BUNDLE_PEM goes with --control-plane; with --config give --trust-bundle"
                        );
                        return ExitCode::from(2);
                    }
                    let (Some(config), Some(_)) = (run.config.clone(), &run.identity_cert) else {
                        eprintln!(
                            "infermesh-proxy: a sidecar needs its config and its identity for mutual TLS: give --control-plane (with --credential and --trust-bundle), or --config with --identity-cert, --identity-key and --trust-bundle (see `infermesh-control-plane ca issue`)"
                        );
                        return ExitCode::from(2);
                    };
                    ConfigFrom::File(config)
                }
                Err(e) => {
                    eprintln!("infermesh-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            let capture = CaptureAddresses {
                inbound: capture.inbound_address,
                outbound: capture.outbound_address,
            };
            let app_probes = match run.app_probes() {
                Ok(probes) => probes,
                Err(e) => {
                    eprintln!("infermesh-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            run.into_options(Mode::Sidecar, config, capture, app_probes)
        }
    };
    let tracing = cli.tracing.options("infermesh-proxy");
    let options = RunOptions {
        access_log,
        tracing,
        ..options
    };
    let log = match infermesh_proxy::init_logging(cli.log_format, &cli.log_level) {
        Ok(log) => Arc::new(log),
        Err(e) => {
            eprintln!("infermesh-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if sidecar {
        infermesh_proxy::log_sidecar_user();
    }
    // Thread per core: this thread is the first worker, on tokio's
    // single-threaded runtime (no work-stealing bookkeeping, no wake-ups
    // across threads); `run` starts the others.
    let options = RunOptions {
        workers: cli
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1),
        ..options
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(infermesh_proxy::run(options, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("infermesh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The machine's host name (a pod's name in Kubernetes).
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME").ok().or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
    })
}

/// `init`: a one-shot that runs the iptables programs; it needs neither
/// the tokio runtime nor logging.
fn init(args: &InitArgs) -> ExitCode {
    let config = args.config();
    if args.dry_run {
        if args.cleanup {
            print!("{}", intercept::cleanup_dry_run());
        } else {
            print!("{}", intercept::dry_run(&config));
        }
        return ExitCode::SUCCESS;
    }
    let iptables = Iptables::new(&args.iptables);
    if args.cleanup {
        return match intercept::cleanup(&iptables) {
            Ok(plan) if plan.is_noop() => {
                println!(
                    "infermesh-proxy init --cleanup: nothing to remove, no INFERMESH_ chain or jump is installed"
                );
                ExitCode::SUCCESS
            }
            Ok(plan) => {
                println!(
                    "infermesh-proxy init --cleanup: removed with {}\n  jumps: {}\n  chains: {}",
                    iptables.restore_program().display(),
                    listed(&plan.jumps_removed),
                    listed(&plan.chains_removed)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("infermesh-proxy init --cleanup: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match intercept::install(&iptables, &config) {
        Ok(plan) => {
            let jumps = if plan.jumps_added.is_empty() {
                "already in place".to_owned()
            } else {
                format!("added {}", listed(&plan.jumps_added))
            };
            println!(
                "infermesh-proxy init: nat rules installed with {}\n  {}\n  chains: {}\n  jumps: {jumps}",
                iptables.restore_program().display(),
                config.to_string().replace('\n', "\n  "),
                listed(&plan.chains_written)
            );
            if !plan.jumps_removed.is_empty() || !plan.chains_removed.is_empty() {
                println!(
                    "  removed: jumps {}; chains {}",
                    listed(&plan.jumps_removed),
                    listed(&plan.chains_removed)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("infermesh-proxy init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Chains or rules for a summary line: rules without their `-A `/`-D `,
/// comma-separated; `none` when there is none.
fn listed(items: &[String]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(|i| i.trim_start_matches("-A ").trim_start_matches("-D "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check(path: &std::path::Path, mode: Mode) -> ExitCode {
    let built_in = match mode {
        Mode::Gateway => Vec::new(),
        Mode::Sidecar => vec![CaptureAddresses::default().built_in_documents()],
    };
    let sources: Vec<infermesh_api::Source<'_>> = built_in
        .iter()
        .map(|text| infermesh_api::Source {
            name: infermesh_proxy::BUILT_IN_NAME,
            text,
        })
        .collect();
    match infermesh_proxy::load_config_file(path, &sources) {
        Ok((config, _)) => {
            println!(
                "{}: ok ({} listeners, {} backends, {} routes; version {})",
                path.display(),
                config.listeners.len(),
                config.backends.len(),
                config.routes.len(),
                config.version()
            );
            ExitCode::SUCCESS
        }
        Err(ConfigFileError::Invalid(diagnostics)) => {
            eprint!("{diagnostics}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

//! `infermesh-proxy`: the infermesh data plane binary.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use infermesh_api::Source;
use infermesh_proxy::config_file::{self, ConfigFileError};
use infermesh_proxy::gateway::{self, GatewayOptions};
use infermesh_proxy::identity::IdentityFiles;
use infermesh_proxy::logging::{self, LogFormat};
use infermesh_proxy::sidecar;

/// infermesh's proxy for model-serving traffic.
#[derive(Parser, Debug)]
#[command(name = "infermesh-proxy", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "INFERMESH_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    /// Worker threads serving traffic (default: one per CPU), like Envoy's
    /// `--concurrency`.
    #[arg(long, env = "INFERMESH_CONCURRENCY", global = true)]
    concurrency: Option<usize>,
    /// Log filter, in RUST_LOG syntax (e.g. `info`, `debug,hyper=info`,
    /// `info,infermesh::access=off` to silence the access log).
    #[arg(long, default_value = "info", env = "INFERMESH_LOG", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a gateway in front of model servers, from one YAML file.
    Gateway(RunArgs),
    /// Run as a pod's sidecar: the file's listeners, backends, routes and
    /// policies, plus the capture listeners `inbound` (0.0.0.0:15006) and
    /// `outbound` (127.0.0.1:15001) unless the file defines listeners of
    /// those names. Needs an identity (--identity-cert...).
    Sidecar(RunArgs),
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
}

/// How a gateway or a sidecar is started.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The config file (Listener, Backend, Route and AuthorizationPolicy
    /// documents).
    #[arg(long, short, env = "INFERMESH_CONFIG")]
    config: PathBuf,
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
    #[arg(long, requires = "identity_cert", env = "INFERMESH_TRUST_BUNDLE")]
    trust_bundle: Option<PathBuf>,
}

impl RunArgs {
    fn into_options(self, built_in: &'static [Source<'static>]) -> GatewayOptions {
        GatewayOptions {
            config: self.config,
            admin_address: self.admin_address,
            health_address: self.health_address,
            shutdown_grace_period: self.shutdown_grace_period,
            drain_delay: self.drain_delay,
            identity: self
                .identity_cert
                .zip(self.identity_key)
                .zip(self.trust_bundle)
                .map(|((cert, key), bundle)| IdentityFiles { cert, key, bundle }),
            built_in,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = match cli.command {
        Command::Check { config, sidecar } => {
            return check(&config, if sidecar { sidecar::BUILT_IN } else { &[] });
        }
        Command::Gateway(args) => args.into_options(&[]),
        Command::Sidecar(args) => {
            if args.identity_cert.is_none() {
                eprintln!(
                    "infermesh-proxy: a sidecar needs its identity for mutual TLS: give --identity-cert, --identity-key and --trust-bundle (see `infermesh-control-plane ca issue`)"
                );
                return ExitCode::from(2);
            }
            args.into_options(sidecar::BUILT_IN)
        }
    };
    let log = match logging::init(cli.log_format, &cli.log_level) {
        Ok(log) => Arc::new(log),
        Err(e) => {
            eprintln!("infermesh-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.concurrency {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(gateway::run(options, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("infermesh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path, built_in: &[Source<'_>]) -> ExitCode {
    match config_file::load(path, built_in) {
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

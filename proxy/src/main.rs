//! `infermesh-proxy`: the infermesh data plane binary.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use infermesh_proxy::config_file::{self, ConfigFileError};
use infermesh_proxy::gateway::{self, GatewayOptions};
use infermesh_proxy::identity::IdentityFiles;
use infermesh_proxy::logging::{self, LogFormat};

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
    Gateway {
        /// The config file (Listener, Backend and Route documents).
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
        /// The proxy's SPIFFE certificate chain (PEM), for backends with
        /// mutual TLS; watched and reloaded when it changes.
        #[arg(long, requires_all = ["identity_key", "trust_bundle"], env = "INFERMESH_IDENTITY_CERT")]
        identity_cert: Option<PathBuf>,
        /// The private key of --identity-cert (PEM).
        #[arg(long, requires = "identity_cert", env = "INFERMESH_IDENTITY_KEY")]
        identity_key: Option<PathBuf>,
        /// The trusted root certificates (PEM).
        #[arg(long, requires = "identity_cert", env = "INFERMESH_TRUST_BUNDLE")]
        trust_bundle: Option<PathBuf>,
    },
    /// Validate a config file without starting; prints every problem with
    /// its file, line, column and field.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Gateway {
            config,
            admin_address,
            health_address,
            shutdown_grace_period,
            drain_delay,
            identity_cert,
            identity_key,
            trust_bundle,
        } => {
            let log = match logging::init(cli.log_format, &cli.log_level) {
                Ok(log) => Arc::new(log),
                Err(e) => {
                    eprintln!("infermesh-proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            let options = GatewayOptions {
                config,
                admin_address,
                health_address,
                shutdown_grace_period,
                drain_delay,
                identity: identity_cert
                    .zip(identity_key)
                    .zip(trust_bundle)
                    .map(|((cert, key), bundle)| IdentityFiles { cert, key, bundle }),
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
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config_file::load(path) {
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

//! `infermesh-control-plane`: `serve` (the gRPC certificate service and
//! the admin port), the certificate authority commands `ca init` and
//! `ca issue`, and `token create` for the join tokens proxies prove their
//! workload with.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use infermesh_certs::{SpiffeId, TrustDomain};
use infermesh_control_plane::ca_files::{
    self, InitRequest, Initialized, IssueRequest, WrittenFile,
};
use infermesh_control_plane::credential::Workload;
use infermesh_control_plane::join_tokens::JoinTokens;
use infermesh_control_plane::server::{self, ServeOptions, parse_duration};
use infermesh_control_plane::status;

/// jemalloc rather than the system allocator: each config change builds a
/// snapshot of every resource beside the serving one, and the system
/// allocator keeps what it frees in per-thread arenas (tens of MB in a
/// 2,000-service mesh) where jemalloc gives it back to the system.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The infermesh control plane.
#[derive(Debug, Parser)]
#[command(name = "infermesh-control-plane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API (TLS, port 15012: the certificate service, the
    /// config push with --config-dir, server reflection), the admin
    /// port (15014: /metrics, /ready, /debug/proxies, /debug/config) and,
    /// with --injector-listen, the sidecar injection webhook (HTTPS, 15017).
    Serve(Box<ServeOptions>),
    /// Validate a config directory as `serve --config-dir` reads it,
    /// without starting; prints every problem with its file, line, column
    /// and field.
    Check {
        /// The directory of YAML documents.
        #[arg(long)]
        config_dir: PathBuf,
    },
    /// Show every proxy streaming config from the given replicas: its
    /// identity, since when, the version it holds, and whether it is in
    /// sync, stale, or refused the latest (with the error).
    Status {
        /// The admin addresses of the replicas (host:port), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:15014")]
        admin: Vec<String>,
        /// Print the JSON the replicas gave instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Certificate authority: create one, issue workload certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Join tokens: the credentials proxies prove their workload with.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token for one namespace and service account: its
    /// digest is added to the tokens file, the token itself written to the
    /// workload's credential file (mode 0600) and nowhere else.
    Create {
        /// The control plane's tokens file (created when missing).
        #[arg(long)]
        tokens: PathBuf,
        /// The workload's namespace.
        #[arg(long)]
        namespace: String,
        /// The workload's service account.
        #[arg(long)]
        service_account: String,
        /// How long the token is accepted, e.g. `24h`.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// The credential file to write, for the workload's proxy.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the credential file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root CA (and optionally an intermediate) for a trust domain.
    Init {
        /// Trust domain the CA signs for, e.g. `cluster.local`.
        #[arg(long)]
        trust_domain: TrustDomain,
        /// Directory to write root-cert.pem and root-key.pem (and the
        /// intermediate's files) into.
        #[arg(long)]
        out: PathBuf,
        /// How long the CA is valid, e.g. `365d`.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        validity: Duration,
        /// Also create an intermediate CA that signs workload certificates.
        #[arg(long)]
        intermediate: bool,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// When --out already holds a CA of this trust domain, keep it and
        /// succeed (a start script can run it every time).
        #[arg(long, conflicts_with = "force")]
        keep_existing: bool,
    },
    /// Write a CA's trust bundle (its root certificate), the file proxies
    /// are given as --trust-bundle.
    Bundle {
        /// A directory created by `ca init`.
        #[arg(long)]
        ca: PathBuf,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the file.
        #[arg(long)]
        force: bool,
    },
    /// Generate a key and a certificate for a workload identity.
    Issue {
        /// A directory created by `ca init`.
        #[arg(long)]
        ca: PathBuf,
        /// SPIFFE ID to certify, e.g. `spiffe://cluster.local/ns/default/sa/web`.
        #[arg(long)]
        identity: SpiffeId,
        /// Directory to write cert.pem, key.pem and bundle.pem into.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime, e.g. `24h`.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infermesh-control-plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let written = match cli.command {
        Command::Serve(options) => {
            let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
            return runtime.block_on(server::serve(
                *options,
                |bound| {
                    // One write: a reader that stops after the lines it
                    // wants leaves none of them unwritten.
                    let mut lines = format!(
                        "infermesh-control-plane listening on {} (grpc)\ninfermesh-control-plane listening on {} (admin)\n",
                        bound.grpc, bound.admin
                    );
                    if let Some(injector) = bound.injector {
                        lines.push_str(&format!(
                            "infermesh-control-plane listening on {injector} (injector)\n"
                        ));
                    }
                    print!("{lines}");
                    use std::io::Write as _;
                    let _ = std::io::stdout().flush();
                },
                shutdown_signal(),
            ));
        }
        Command::Check { config_dir } => {
            let snapshot = infermesh_control_plane::source::read(&config_dir)?;
            let config = &snapshot.config;
            println!(
                "{}: ok ({} listeners, {} backends, {} routes, {} policies, {} sidecars; version {})",
                config_dir.display(),
                config.listeners.len(),
                config.backends.len(),
                config.routes.len(),
                config.policies.len(),
                config.sidecars.len(),
                snapshot.version
            );
            return Ok(());
        }
        Command::Status { admin, json } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            return runtime.block_on(status::print(&admin, json));
        }
        Command::Token(TokenCommand::Create {
            tokens,
            namespace,
            service_account,
            ttl,
            out,
            force,
        }) => create_token(&tokens, namespace, service_account, ttl, &out, force)
            .context("token create failed")?,
        Command::Ca(CaCommand::Init {
            trust_domain,
            out,
            validity,
            intermediate,
            force,
            keep_existing,
        }) => match ca_files::init(&InitRequest {
            trust_domain,
            out: out.clone(),
            validity,
            intermediate,
            force,
            keep_existing,
        })
        .context("ca init failed")?
        {
            Initialized::Created(written) => written,
            Initialized::Kept { not_after } => {
                println!(
                    "kept the CA in {} (valid until {})",
                    out.display(),
                    humantime::format_rfc3339_seconds(not_after)
                );
                Vec::new()
            }
        },
        Command::Ca(CaCommand::Bundle { ca, out, force }) => {
            ca_files::bundle(&ca, &out, force).context("ca bundle failed")?
        }
        Command::Ca(CaCommand::Issue {
            ca,
            identity,
            out,
            ttl,
            force,
        }) => ca_files::issue(&IssueRequest {
            ca_dir: ca,
            identity,
            out,
            ttl,
            force,
        })
        .context("ca issue failed")?,
    };
    report(&written);
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Adds a token's digest to `tokens` and writes the token to `out`.
fn create_token(
    tokens: &Path,
    namespace: String,
    service_account: String,
    ttl: Duration,
    out: &Path,
    force: bool,
) -> anyhow::Result<Vec<WrittenFile>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    // Checked before anything is written: the SPIFFE ID the token will
    // grant must be valid.
    SpiffeId::workload("example.org", &namespace, &service_account)
        .context("the namespace and service account must make a SPIFFE ID")?;
    let mut file = std::fs::OpenOptions::new();
    file.write(true).mode(0o600);
    if force {
        file.create(true).truncate(true);
    } else {
        file.create_new(true);
    }
    let mut credential = file.open(out).with_context(|| {
        format!(
            "cannot write {} (pass --force to replace it)",
            out.display()
        )
    })?;
    let mut set = JoinTokens::load(tokens)?;
    let workload = Workload {
        namespace,
        service_account,
    };
    let token = set.create(&workload, ttl, SystemTime::now());
    credential
        .write_all(format!("{token}\n").as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    set.save(tokens)?;
    Ok(vec![
        WrittenFile {
            path: tokens.to_path_buf(),
            description: "the tokens file, with the new token's digest".into(),
        },
        WrittenFile {
            path: out.to_path_buf(),
            description: "the credential, for the workload's proxy only".into(),
        },
    ])
}

fn report(written: &[WrittenFile]) {
    for file in written {
        println!("wrote {} ({})", file.path.display(), file.description);
    }
}

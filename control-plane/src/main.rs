//! `infermesh-control-plane`: today, the certificate authority commands
//! `ca init` and `ca issue`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use infermesh_certs::{SpiffeId, TrustDomain};
use infermesh_control_plane::ca_files::{self, InitRequest, IssueRequest, WrittenFile};

/// The infermesh control plane.
#[derive(Debug, Parser)]
#[command(name = "infermesh-control-plane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificate authority: create one, issue workload certificates.
    #[command(subcommand)]
    Ca(CaCommand),
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

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 30m, 24h or 365d"))
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
        Command::Ca(CaCommand::Init {
            trust_domain,
            out,
            validity,
            intermediate,
            force,
        }) => ca_files::init(&InitRequest {
            trust_domain,
            out,
            validity,
            intermediate,
            force,
        })
        .context("ca init failed")?,
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

fn report(written: &[WrittenFile]) {
    for file in written {
        println!("wrote {} ({})", file.path.display(), file.description);
    }
}

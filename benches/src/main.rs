//! `infermesh-bench`: infermesh's load harness. Today: `serve`, the mock
//! model server.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use infermesh_bench::mock::{self, MockOptions};

/// infermesh's load harness.
#[derive(Parser, Debug)]
#[command(name = "infermesh-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a mock model server speaking OpenAI-compatible and KServe v2 APIs.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// A model name to serve; repeat for several.
        #[arg(long = "model", default_value = "mock-llm")]
        models: Vec<String>,
        /// Words per generated answer.
        #[arg(long, default_value_t = 16)]
        tokens: usize,
        /// Time before the first token, or added to a whole answer.
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Time between tokens.
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        token_interval: Duration,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            models,
            tokens,
            latency,
            token_interval,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            println!(
                "mock model server listening on {} (models: {})",
                listener.local_addr()?,
                models.join(", ")
            );
            let options = MockOptions {
                models,
                tokens,
                latency,
                token_interval,
            };
            tokio::select! {
                () = mock::serve(listener, options) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }
    }
}

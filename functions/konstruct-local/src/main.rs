//! `konstruct-local`: the chat on a laptop, on the very handlers the Lambdas run.

mod bridge;
mod cli;
mod gateway;
mod management;
mod metrics;
mod page;
mod sockets;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::Cli::parse().run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("konstruct-local: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

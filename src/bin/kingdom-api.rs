//! `kingdom-api`: the stateless API sidecar.

use std::process::ExitCode;

use clap::Parser;
use kingdom_edge::config::units::parse_size;
use kingdom_edge::sidecar::{self, api, SidecarArgs};

#[derive(Parser)]
#[command(name = "kingdom-api", version, about = "Kingdom Studios API service")]
struct Cli {
    #[command(flatten)]
    common: SidecarArgs,
    /// Environment variable holding the token-signing secret (at least 16 bytes).
    #[arg(long, default_value = "KINGDOM_API_SECRET")]
    secret_env: String,
    /// Largest accepted request body.
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    max_body: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    sidecar::init_tracing(cli.common.exit_on_stdin_eof);
    let secret = std::env::var(&cli.secret_env).unwrap_or_default();
    let service = match api::ApiService::new(secret.as_bytes()) {
        Ok(service) => service,
        Err(e) => {
            eprintln!("kingdom-api: ${}: {e}", cli.secret_env);
            return ExitCode::FAILURE;
        }
    };
    sidecar::run(
        "kingdom-api",
        &cli.common,
        api::routes(service),
        cli.max_body,
    )
    .await
}

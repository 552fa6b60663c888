//! `kingdom-content`: the content-generation sidecar.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kingdom_edge::config::units::{parse_duration, parse_size};
use kingdom_edge::sidecar::{self, content, SidecarArgs};

#[derive(Parser)]
#[command(
    name = "kingdom-content",
    version,
    about = "Kingdom Studios content-generation service"
)]
struct Cli {
    #[command(flatten)]
    common: SidecarArgs,
    /// Simulated model time of one generation.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    generate_latency: Duration,
    /// Largest accepted request body.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    max_body: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    sidecar::init_tracing(cli.common.exit_on_stdin_eof);
    let routes = content::routes(content::ContentService::new(cli.generate_latency));
    sidecar::run("kingdom-content", &cli.common, routes, cli.max_body).await
}

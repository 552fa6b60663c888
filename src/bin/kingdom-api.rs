//! `kingdom-api`: the stateless API sidecar.

use std::process::ExitCode;

use clap::Parser;
use kingdom_edge::sidecar::api;

#[derive(Parser)]
#[command(name = "kingdom-api", version, about = "Kingdom Studios API service")]
struct Cli {
    #[command(flatten)]
    args: api::Args,
}

#[tokio::main]
async fn main() -> ExitCode {
    api::main(Cli::parse().args).await
}

//! `kingdom-content`: the content-generation sidecar.

use std::process::ExitCode;

use clap::Parser;
use kingdom_edge::sidecar::content;

#[derive(Parser)]
#[command(
    name = "kingdom-content",
    version,
    about = "Kingdom Studios content-generation service"
)]
struct Cli {
    #[command(flatten)]
    args: content::Args,
}

#[tokio::main]
async fn main() -> ExitCode {
    content::main(Cli::parse().args).await
}

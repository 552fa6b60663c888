//! `kingdom-edge`: run the proxy, or check a config file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kingdom_edge::config::ConfigError;
use kingdom_edge::runtime::{self, RunOptions, StartError};
use kingdom_edge::sidecar::{api, content};

/// mimalloc rather than glibc's malloc: after a burst of requests it gives the freed pages
/// back, so idle connections cost what they hold (README, Performance), and it is no slower.
/// Built without transparent huge pages (`no_thp`), which cost about 10 MiB at rest.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kingdom-edge",
    version,
    about = "Kingdom Studios edge proxy and load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file.
    #[arg(short, long, global = true, default_value = "conf/edge.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(Run),
    /// Validate the config file: print a summary and exit 0, or every error and exit 1.
    Check,
    /// Run the content service (the same as the `kingdom-content` binary).
    Content(content::Args),
    /// Run the API service (the same as the `kingdom-api` binary).
    Api(api::Args),
}

/// `run`'s options.
#[derive(clap::Args, Default)]
struct Run {
    /// Take the listening sockets and the sidecars over from the running kingdom-edge, which
    /// then drains and exits (a zero-downtime upgrade; `SIGUSR2` to the running process does
    /// this with its own binary path).
    #[arg(short, long)]
    upgrade: bool,
    /// With --upgrade: the pid of the process to take over from (default: the pid in
    /// `server.pid_file`).
    #[arg(long, requires = "upgrade")]
    from: Option<i32>,
    /// With --upgrade: the unix socket the running process sends its sockets to (default:
    /// `server.upgrade_socket`; SIGUSR2 passes the one the running process uses).
    #[arg(long, requires = "upgrade")]
    upgrade_socket: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run(Run::default())) {
        Command::Check => check(&cli.config),
        Command::Content(args) => block_on(content::main(args)),
        Command::Api(args) => block_on(api::main(args)),
        Command::Run(run) => {
            init_tracing();
            let options = RunOptions {
                upgrade: run.upgrade,
                from: run.from,
                upgrade_socket: run.upgrade_socket,
            };
            match runtime::run(&cli.config, options) {
                Ok(never) => match never {},
                Err(StartError::Config(errors)) => {
                    print_errors(&cli.config, &errors);
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("kingdom-edge: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn block_on(service: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(service),
        Err(e) => {
            eprintln!("kingdom-edge: cannot start a runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match runtime::check(path) {
        Ok(s) => {
            use std::fmt::Write as _;
            let backends: usize = s.pools.iter().map(|p| p.backends.len()).sum();
            let processes: usize = s.sidecars.iter().map(|s| s.addresses.len()).sum();
            let mut out = format!("{}: ok (digest {})\n", path.display(), s.digest);
            for l in &s.listeners {
                let kind = match &l.tls {
                    Some(t) if t.http2 => "https, h2",
                    Some(_) => "https",
                    None => "http",
                };
                let _ = writeln!(out, "  listener {} on {} ({kind})", l.name, l.address);
            }
            match &s.admin {
                Some(a) => _ = writeln!(out, "  admin on {}", a.address),
                None => out.push_str("  no admin listener\n"),
            }
            let _ = writeln!(
                out,
                "  {} pools, {backends} backends; {} routes; {} sidecars, {processes} processes",
                s.pools.len(),
                s.router.routes().len(),
                s.sidecars.len(),
            );
            // A reader that stops early (`| head -1`) is no error of the config's.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
            for pool in s.pools.iter().filter(|p| !s.is_routed(p)) {
                eprintln!(
                    "{}: warning: pools.{}: no route uses this pool (it does not count for /ready)",
                    path.display(),
                    pool.name
                );
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_errors(path, &errors);
            ExitCode::FAILURE
        }
    }
}

fn print_errors(path: &Path, errors: &[ConfigError]) {
    for e in errors {
        let at = e.line.map(|l| format!(":{l}")).unwrap_or_default();
        let yaml_path = if e.path.is_empty() {
            String::new()
        } else {
            format!(" {}:", e.path)
        };
        eprintln!("{}{at}:{yaml_path} {}", path.display(), e.message);
    }
    eprintln!("{}: {} error(s)", path.display(), errors.len());
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

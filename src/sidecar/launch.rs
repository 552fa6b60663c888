//! How the proxy launches a sidecar: what `sidecars:` says of one ([`Sidecar`]), and where
//! its program is ([`resolve`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A supervised upstream process, started once per address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// `sidecars[].name`, used in logs.
    pub name: String,
    /// Binary name or path.
    pub command: String,
    /// One process per address, each given `--listen ADDR`.
    pub addresses: Vec<SocketAddr>,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

impl Sidecar {
    /// Whether a process started for `self` is one `other` would start too: the same
    /// name, command, arguments and environment (the address is the process's own).
    pub fn same_process(&self, other: &Sidecar) -> bool {
        self.name == other.name
            && self.command == other.command
            && self.args == other.args
            && self.env == other.env
    }

    /// A digest of what [`Self::same_process`] compares, to recognize a process started
    /// by another proxy process (an upgrade hands its sidecars over).
    pub fn fingerprint(&self) -> String {
        let what = format!("{:?}", (&self.name, &self.command, &self.args, &self.env));
        let sum = ring::digest::digest(&ring::digest::SHA256, what.as_bytes());
        sum.as_ref()
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// How to start a sidecar.
#[derive(Debug, PartialEq, Eq)]
pub struct Program {
    /// The executable.
    pub path: PathBuf,
    /// For a service built into `kingdom-edge` itself, the subcommand that runs it.
    pub builtin: Option<&'static str>,
}

/// Finds a sidecar: a path as given; else a binary of that name next to our own executable,
/// else on PATH; else, for `kingdom-content` and `kingdom-api`, the copy of the service built
/// into this binary (so `cargo run` works before the sidecar binaries are built).
pub fn resolve(command: &str) -> Option<Program> {
    if command.contains('/') {
        return Some(Program {
            path: PathBuf::from(command),
            builtin: None,
        });
    }
    let exe = std::env::current_exe().ok();
    let beside = exe
        .as_ref()
        .and_then(|exe| exe.parent().map(|dir| dir.join(command)));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(command));
    if let Some(path) = beside.into_iter().chain(on_path).find(|p| is_executable(p)) {
        return Some(Program {
            path,
            builtin: None,
        });
    }
    let builtin = match command {
        "kingdom-content" => "content",
        "kingdom-api" => "api",
        _ => return None,
    };
    exe.map(|path| Program {
        path,
        builtin: Some(builtin),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths_and_path_lookups() {
        let found = |command| resolve(command).map(|p| (p.path, p.builtin));
        assert_eq!(found("/bin/true"), Some((PathBuf::from("/bin/true"), None)));
        assert!(found("sh").is_some_and(|(p, b)| p.ends_with("sh") && b.is_none()));
        assert_eq!(found("no-such-binary-kingdom"), None);
        // Built into kingdom-edge, when no binary of that name is installed.
        assert!(found("kingdom-api").is_some());
    }
}

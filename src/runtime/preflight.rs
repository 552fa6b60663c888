//! What a config needs from the machine, verified before anything starts: every certificate
//! it names can be loaded, the access-log file can be written, every sidecar command exists,
//! and every secret a sidecar needs is in its environment. `kingdom-edge check` and start-up
//! both run it, so a config that `check` passes can start cleanly. It reads the filesystem
//! and the environment and changes nothing.

use std::path::Path;

use crate::config::raw::{RawConfig, RawSidecar};
use crate::config::ConfigError;
use crate::sidecar::api::MIN_SECRET;
use crate::sidecar::launch;
use crate::tls::{self, CertificateFiles};

/// The environment variable the API sidecar reads its token secret from, unless its
/// `--secret-env` says otherwise.
const API_SECRET_ENV: &str = "KINGDOM_API_SECRET";

/// Every problem found, each naming its YAML path.
pub fn verify(raw: &RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut push = |path: String, message: String| {
        errors.push(ConfigError {
            path,
            line: None,
            message,
        })
    };
    for (i, listener) in raw.listeners.iter().enumerate() {
        let Some(t) = &listener.tls else { continue };
        for (j, c) in t.certificates.iter().enumerate() {
            let files = CertificateFiles {
                cert: c.cert.clone(),
                key: c.key.clone(),
                yaml_path: format!("listeners[{i}].tls.certificates[{j}]"),
            };
            if let Err(message) = tls::check_certificate(&files) {
                push(files.yaml_path, message);
            }
        }
    }
    if let Some(output) = raw.access_log.output.as_deref() {
        if !matches!(output, "stdout" | "off") {
            if let Err(message) = writable(Path::new(output)) {
                push("access_log.output".into(), message);
            }
        }
    }
    for (i, sidecar) in raw.sidecars.iter().enumerate() {
        let at = format!("sidecars[{i}]");
        match launch::resolve(&sidecar.command) {
            None => push(
                format!("{at}.command"),
                format!(
                    "`{}` is neither next to the kingdom-edge binary nor on PATH",
                    sidecar.command
                ),
            ),
            Some(program) if program.builtin.is_none() && !executable(&program.path) => push(
                format!("{at}.command"),
                format!("`{}` is not an executable file", program.path.display()),
            ),
            Some(_) => {}
        }
        if let Some(message) = missing_secret(sidecar, env) {
            push(format!("{at}.env"), message);
        }
    }
    errors
}

/// What is wrong with the secret the sidecar needs, if it needs one.
fn missing_secret(sidecar: &RawSidecar, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let program = Path::new(&sidecar.command).file_name()?.to_str()?;
    if program != "kingdom-api" {
        return None;
    }
    let args = &sidecar.args;
    let name = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--secret-env") {
            Some("") => args.get(i + 1).map(String::as_str),
            Some(rest) => rest.strip_prefix('='),
            None => None,
        })
        .unwrap_or(API_SECRET_ENV);
    let value = sidecar.env.get(name).cloned().or_else(|| env(name));
    match value {
        None => Some(format!(
            "kingdom-api signs tokens with ${name}: set it in this sidecar's `env:` or in the proxy's environment"
        )),
        Some(v) if v.len() < MIN_SECRET => Some(format!(
            "${name} must be at least {MIN_SECRET} bytes (got {})",
            v.len()
        )),
        Some(_) => None,
    }
}

/// Whether the file can be appended to: it exists and is writable, or its directory is.
fn writable(path: &Path) -> Result<(), String> {
    use nix::unistd::{access, AccessFlags};
    if path.exists() {
        if path.is_dir() {
            return Err(format!("{} is a directory", path.display()));
        }
        return access(path, AccessFlags::W_OK)
            .map_err(|e| format!("cannot write {}: {e}", path.display()));
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "cannot create {}: directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        format!(
            "cannot create {}: directory {} is not writable: {e}",
            path.display(),
            dir.display()
        )
    })
}

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn messages(yaml: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        verify(&raw(yaml), env)
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect()
    }

    const BASE: &str = "pools: {}\nroutes: []\n";

    #[test]
    fn reports_every_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let yaml = format!(
            "{BASE}listeners:
  - name: tls
    address: 127.0.0.1:2
    tls: {{ certificates: [{{ cert: {d}/missing.crt, key: {d}/missing.key }}] }}
access_log: {{ output: {d}/no/such/dir/access.log }}
sidecars:
  - {{ name: api, command: kingdom-apii, addresses: [127.0.0.1:3] }}
  - {{ name: api2, command: kingdom-api, addresses: [127.0.0.1:4] }}
  - {{ name: api3, command: kingdom-api, addresses: [127.0.0.1:5], env: {{ KINGDOM_API_SECRET: short }} }}
  - {{ name: api4, command: kingdom-api, addresses: [127.0.0.1:6], args: [--secret-env, OTHER] }}
  - {{ name: api5, command: kingdom-api, addresses: [127.0.0.1:7], args: [--secret-env=THIRD] }}
"
        );
        let none = |_: &str| None;
        let found = messages(&yaml, &none);
        let expect = [
            "listeners[0].tls.certificates[0]: cannot read",
            "access_log.output: cannot create",
            "sidecars[0].command: `kingdom-apii` is neither next to the kingdom-edge binary nor on PATH",
            "sidecars[1].env: kingdom-api signs tokens with $KINGDOM_API_SECRET",
            "sidecars[2].env: $KINGDOM_API_SECRET must be at least 16 bytes (got 5)",
            "sidecars[3].env: kingdom-api signs tokens with $OTHER",
            "sidecars[4].env: kingdom-api signs tokens with $THIRD",
        ];
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        for (found, expect) in found.iter().zip(expect) {
            assert!(found.starts_with(expect), "{found} / {expect}");
        }
        // The secret from the proxy's environment is inherited by the sidecar.
        let env = |name: &str| (name == "OTHER").then(|| "x".repeat(16));
        assert!(!messages(&yaml, &env)
            .iter()
            .any(|m| m.starts_with("sidecars[3]")));
    }

    #[test]
    fn an_access_log_in_a_writable_directory_passes() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "{BASE}listeners: [{{ name: a, address: 127.0.0.1:1 }}]\naccess_log: {{ output: {}/access.log }}\n",
            dir.path().display()
        );
        assert!(messages(&yaml, &|_| None).is_empty());
        assert!(
            !dir.path().join("access.log").exists(),
            "check creates nothing"
        );
    }
}

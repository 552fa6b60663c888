//! Packaging that cannot be built here: the container image's build context is assembled
//! exactly as the Dockerfile's `COPY` lines do, and the build must resolve inside it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The sources the build stage copies: `COPY <src...> <dest>` lines before the second `FROM`.
fn build_stage_copies(dockerfile: &str) -> Vec<PathBuf> {
    dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("FROM "))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "))
        .filter_map(|l| l.strip_prefix("COPY "))
        .flat_map(|args| {
            let words: Vec<&str> = args.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(PathBuf::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn the_container_build_context_resolves_offline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copies = build_stage_copies(&dockerfile);
    assert!(
        copies.iter().any(|c| c == Path::new("Cargo.toml")),
        "{copies:?}"
    );
    let context = tempfile::tempdir().unwrap();
    for source in &copies {
        copy_tree(&root.join(source), &context.path().join(source));
    }
    // The image builds for this machine's platform; other platforms' crates are not cached.
    let rustc = Command::new("rustc").arg("-vV").output().unwrap();
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version=1"])
        .args(["--filter-platform", &host, "--manifest-path"])
        .arg(context.path().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the image's build context does not resolve: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

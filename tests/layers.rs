//! The crate's modules form layers (see `src/lib.rs`): each imports only layers above it, so
//! the import graph has no cycle. This reads every source file and checks both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer, top first; a module may import its own layer's modules too,
/// as long as that makes no cycle.
const LAYERS: &[&[&str]] = &[
    &["config"],
    &["metrics"],
    &[
        "balance",
        "slow_start",
        "health",
        "outlier",
        "retry",
        "sticky",
        "request",
        "forwarded",
        "request_id",
        "errors",
        "access_log",
        "tls",
        "token",
        "ratelimit",
        "shed",
        "validation",
        "security",
        "cache",
    ],
    &["sidecar"],
    &["live"],
    &["upstream"],
    &["route"],
    &["snapshot"],
    &["proxy"],
    &["admin"],
    &["runtime"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<module>` a file names.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            !rest.starts_with('{'),
            "write `use crate::module::…` one module at a time, so this test can read it"
        );
        found.insert(name);
    }
    found
}

#[test]
fn every_module_imports_only_the_layers_above_it_and_the_graph_has_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "bin" {
            continue;
        }
        let Some(own) = layer(&module) else {
            panic!("src/{module} is in no layer: add it to LAYERS here and to src/lib.rs");
        };
        let text = std::fs::read_to_string(file).unwrap();
        for imported in imports(&text) {
            if imported == module {
                continue;
            }
            match layer(&imported) {
                Some(theirs) if theirs <= own => {}
                _ => wrong.push(format!(
                    "{} (layer {own}) imports crate::{imported} (layer {:?})",
                    relative.display(),
                    layer(&imported)
                )),
            }
            graph
                .entry(module.clone())
                .or_default()
                .insert(imported.clone());
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );

    // Within a layer, no cycle either: depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(start) = path.iter().position(|n| n == node) {
            panic!("import cycle: {} -> {node}", path[start..].join(" -> "));
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
    assert!(graph.contains_key("runtime"), "the test read the sources");
}

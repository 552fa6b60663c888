//! The YAML config: its serde mirror (`raw`), units, the line of a YAML path (`lines`), and
//! the error type every compile step reports with. Imports nothing else of the crate: the
//! policies compile their own sections, and `snapshot::compile` puts them together.
//!
//! Errors name the YAML path and, where known, the line:
//! `pools.content.timeouts.connect: must be > 0 (got 0s)`.

pub mod lines;
pub mod raw;
mod shape;
pub mod units;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use lines::LineIndex;
use raw::RawConfig;

/// Looks up an environment variable: the one input besides the file that compiling reads
/// (for secrets named by `*_env` keys), passed in so compiling stays pure and testable.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads the process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub struct ConfigError {
    /// YAML path such as `routes[2].pool`; empty for whole-file problems.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong, with the offending value.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Collects every error of a compile pass, so `check` can show them all at once.
#[derive(Debug, Default)]
pub struct Errors(Vec<ConfigError>);

impl Errors {
    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            line: None,
            message: message.into(),
        });
    }

    /// How many errors so far; compare before and after a step to see if it failed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Each error as `check` prints it (without the line), for tests.
    #[cfg(test)]
    pub fn rendered(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// True when nothing went wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses `ip:port`, recording an error at `path` if it is not one.
    pub fn address(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.push(
                    path,
                    format!("`{text}` is not an address like 127.0.0.1:8080 or [::1]:8080"),
                );
                None
            }
        }
    }

    /// The errors, each with its line where the YAML path can be found in `index`.
    pub fn into_located(self, index: &LineIndex) -> Vec<ConfigError> {
        self.0
            .into_iter()
            .map(|mut e| {
                e.line = e.line.or_else(|| index.line(&e.path));
                e
            })
            .collect()
    }
}

/// Reads a config file's text.
pub fn read(path: &Path) -> Result<String, Vec<ConfigError>> {
    std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        }]
    })
}

/// Parses config text into its serde mirror: duplicate keys, then YAML syntax and shape
/// (unknown keys, wrong types), every error with its path and line.
pub fn parse(text: &str, index: &LineIndex) -> Result<RawConfig, Vec<ConfigError>> {
    let duplicates = index.duplicates();
    if !duplicates.is_empty() {
        return Err(duplicates
            .iter()
            .map(|(path, line, first)| ConfigError {
                path: path.clone(),
                line: Some(*line),
                message: format!("duplicate key (first given at line {first})"),
            })
            .collect());
    }
    serde_yaml::from_str(text)
        .map_err(|e| Errors(shape::errors(text, &e, index)).into_located(index))
}

/// Fills in the line of errors found after compiling (TLS files, for instance) by indexing
/// the text. Errors that already have a line keep it.
pub fn locate_in(text: &str, errors: Vec<ConfigError>) -> Vec<ConfigError> {
    Errors(errors).into_located(&LineIndex::new(text))
}

/// serde_yaml puts the path first and the position last: `a.b: message at line 3 column 5`.
fn from_serde(e: &serde_yaml::Error) -> ConfigError {
    let text = e.to_string();
    let text = match text.rfind(" at line ") {
        Some(cut) if e.location().is_some() => &text[..cut],
        _ => &text,
    };
    let (path, message) = match text.split_once(": ") {
        Some((path, message)) if !path.contains(' ') => (path.to_string(), message.to_string()),
        _ => (String::new(), text.to_string()),
    };
    ConfigError {
        path,
        line: e.location().map(|l| l.line()),
        message,
    }
}

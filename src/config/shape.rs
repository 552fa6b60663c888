//! Every shape error of a file, not just the first. serde stops at the first key it cannot
//! take; when it does, each top-level section, and each item of a list or map section, is
//! deserialized on its own, so a file with four mistakes in four places gets four errors.

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::lines::LineIndex;
use super::raw::{
    RawAccessLog, RawAdmin, RawCache, RawListener, RawPool, RawRateLimit, RawRoute, RawServer,
    RawSidecar, RawSlowDown, RawTokens,
};
use super::{from_serde, ConfigError};

/// The sections of the file and how each is checked.
const SECTIONS: &[&str] = &[
    "server",
    "listeners",
    "admin",
    "sidecars",
    "pools",
    "routes",
    "access_log",
    "tokens",
    "rate_limits",
    "slow_down",
    "cache",
];

/// The shape errors in `text`, given that deserializing the whole file failed with `first`.
/// Paths are full YAML paths; an unknown key's line is the key's own, other lines are left
/// for the caller's line `index`.
pub fn errors(text: &str, first: &serde_yaml::Error, index: &LineIndex) -> Vec<ConfigError> {
    let Ok(Value::Mapping(top)) = serde_yaml::from_str::<Value>(text) else {
        return vec![from_serde(first)];
    };
    let mut errors = Vec::new();
    for (key, value) in &top {
        let Some(name) = key.as_str() else { continue };
        match name {
            "server" => check::<RawServer>(name, value, &mut errors),
            "admin" => check::<Option<RawAdmin>>(name, value, &mut errors),
            "access_log" => check::<RawAccessLog>(name, value, &mut errors),
            "listeners" => each::<RawListener>(name, value, &mut errors),
            "sidecars" => each::<RawSidecar>(name, value, &mut errors),
            "routes" => each::<RawRoute>(name, value, &mut errors),
            "tokens" => check::<Option<RawTokens>>(name, value, &mut errors),
            "cache" => check::<Option<RawCache>>(name, value, &mut errors),
            "pools" => named::<RawPool>(name, value, &mut errors),
            "rate_limits" => named::<RawRateLimit>(name, value, &mut errors),
            "slow_down" => named::<RawSlowDown>(name, value, &mut errors),
            other => errors.push(ConfigError {
                path: String::new(),
                line: None,
                message: format!("unknown field `{other}`, expected one of {}", expected()),
            }),
        }
    }
    for required in ["listeners", "pools", "routes"] {
        if !top.contains_key(required) {
            errors.push(ConfigError {
                path: String::new(),
                line: None,
                message: format!("missing field `{required}`"),
            });
        }
    }
    if errors.is_empty() {
        // Something the sections cannot see on their own.
        errors.push(from_serde(first));
    }
    for error in &mut errors {
        let unknown = error
            .message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field.to_string());
        if let (None, Some(field)) = (error.line, unknown) {
            let key = match error.path.as_str() {
                "" => field,
                path => format!("{path}.{field}"),
            };
            error.line = index.line(&key);
        }
    }
    errors
}

fn expected() -> String {
    SECTIONS
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a list section item by item (or as a whole when it is not a list).
fn each<T: DeserializeOwned>(name: &str, value: &Value, errors: &mut Vec<ConfigError>) {
    match value {
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                check::<T>(&format!("{name}[{i}]"), item, errors);
            }
        }
        _ => check::<Vec<T>>(name, value, errors),
    }
}

/// Checks a map section entry by entry (or as a whole when it is not a map).
fn named<T: DeserializeOwned>(name: &str, value: &Value, errors: &mut Vec<ConfigError>) {
    match value {
        Value::Mapping(entries) => {
            for (key, body) in entries {
                let path = format!("{name}.{}", key.as_str().unwrap_or("?"));
                check::<T>(&path, body, errors);
            }
        }
        _ => check::<std::collections::BTreeMap<String, T>>(name, value, errors),
    }
}

/// Deserializes `value` as a `T` at `path`. The value is written back to YAML text and read
/// again, so serde_yaml reports the path inside it.
fn check<T: DeserializeOwned>(path: &str, value: &Value, errors: &mut Vec<ConfigError>) {
    let Ok(text) = serde_yaml::to_string(value) else {
        return;
    };
    if let Err(e) = serde_yaml::from_str::<T>(&text) {
        let mut error = from_serde(&e);
        error.line = None;
        error.path = match (error.path.as_str(), error.path.starts_with('[')) {
            ("", _) => path.to_string(),
            (inner, true) => format!("{path}{inner}"),
            (inner, false) => format!("{path}.{inner}"),
        };
        errors.push(error);
    }
}

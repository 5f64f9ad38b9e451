//! A plugin's own config section: YAML text in, its typed struct out, errors with key paths.
//!
//! The host sends each stage its `config:` mapping as YAML text; the plugin reads it with
//! [`parse_section`] into a `#[serde(deny_unknown_fields)]` struct. A [`SectionError`]
//! crosses back as JSON and the host places it in the recipe with
//! `plumb_host::recipe::LoadedRecipe::section_error`.
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::explain::{explain, yaml_message};
use super::path::KeyPath;

/// What is wrong in a config section, and where inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionError {
    /// Key path inside the section (`optimizer.lr`, `layers[2]`); "" for the section itself.
    pub path: String,
    /// What is wrong: what was expected, what was found, a suggestion for a typo.
    pub message: String,
}

impl std::fmt::Display for SectionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for SectionError {}

/// Reads a config section. Empty text or `null` reads as `{}`, so a struct whose fields
/// all have defaults needs no section at all.
pub fn parse_section<T: DeserializeOwned>(yaml: &str) -> Result<T, SectionError> {
    let value: Value = serde_yaml::from_str(yaml)
        .map_err(|e| SectionError { path: String::new(), message: format!("invalid YAML: {}", yaml_message(&e)) })?;
    let value = if value.is_null() { Value::Mapping(Mapping::new()) } else { value };
    parse_value(value).map_err(|(path, message)| SectionError { path, message: explain(&message) })
}

/// Starts and ends the key path that a message raised inside a nested deserialization
/// (see [`located_message`]) carries in front of it.
const PATH_MARK: char = '\u{1f}';

/// A serde message that carries the key path, relative to the value being deserialized,
/// where it arose; [`parse_value`] puts the path back where it belongs. For
/// `Deserialize` impls that deserialize parts of their input separately
/// ([`TrainSection`](crate::train::TrainSection)).
pub(crate) fn located_message(path: &str, message: &str) -> String {
    format!("{PATH_MARK}{path}{PATH_MARK}{message}")
}

/// Deserializes `value`; an error is its key path and serde's own message.
pub(crate) fn parse_value<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let outer = KeyPath::from_serde(e.path()).to_string();
        let message = e.inner().to_string();
        let located = message.strip_prefix(PATH_MARK).and_then(|rest| rest.split_once(PATH_MARK));
        match located {
            Some((inner, message)) if outer.is_empty() => (inner.to_owned(), message.to_owned()),
            Some(("", message)) => (outer, message.to_owned()),
            Some((inner, message)) => (format!("{outer}.{inner}"), message.to_owned()),
            None => (outer, message),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Optimizer {
        lr: f64,
        #[serde(default)]
        warmup_steps: u64,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[serde(default)]
        max_steps: u64,
        optimizer: Option<Optimizer>,
        #[serde(default)]
        layers: Vec<u32>,
    }

    fn error(yaml: &str) -> (String, String) {
        let e = parse_section::<Config>(yaml).unwrap_err();
        (e.path, e.message)
    }

    #[test]
    fn parses() {
        let config: Config = parse_section("max_steps: 3\noptimizer: {lr: 0.1}\n").unwrap();
        assert_eq!(config.optimizer, Some(Optimizer { lr: 0.1, warmup_steps: 0 }));
        let config: Config = parse_section("").unwrap();
        assert_eq!(config.max_steps, 0);
    }

    #[test]
    fn errors_name_paths() {
        assert_eq!(
            error("optimizer: {lr: 1, warmup_step: 2}"),
            (
                "optimizer.warmup_step".into(),
                "unknown key; expected one of `lr`, `warmup_steps`; did you mean `warmup_steps`?".into()
            )
        );
        assert_eq!(
            error("max_steps: ten"),
            ("max_steps".into(), "expected an unsigned integer, found a string \"ten\"".into())
        );
        assert_eq!(error("optimizer: {}"), ("optimizer".into(), "missing required key `lr`".into()));
        assert_eq!(
            error("layers: [1, x]"),
            ("layers[1]".into(), "expected an unsigned integer, found a string \"x\"".into())
        );
        assert_eq!(error("[1]").0, "");
        assert!(error("a: [").1.starts_with("invalid YAML: "));
    }

    #[test]
    fn round_trips_through_json() {
        let e = SectionError { path: "a.b".into(), message: "bad".into() };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"path":"a.b","message":"bad"}"#);
        assert_eq!(serde_json::from_str::<SectionError>(&json).unwrap(), e);
        assert_eq!(e.to_string(), "a.b: bad");
    }
}

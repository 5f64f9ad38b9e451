//! What a plugin provides: stages, evaluators and rewards. Each is a plain Rust type
//! with a configuration struct; `export_plugin!` turns it into C entries.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::context::RunContext;
use crate::error::Result;
use crate::reward::RewardModel;

/// Checks a component can make of its configuration before any compute starts.
pub struct ValidateContext {
    _private: (),
}

impl ValidateContext {
    pub(crate) fn new() -> Self {
        Self { _private: () }
    }

    /// An error at `key` unless `path` is an existing file.
    pub fn existing_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        if path.is_file() {
            Ok(())
        } else if path.exists() {
            Err(crate::Error::config(key, format!("expected a file, found a directory `{}`", path.display())))
        } else {
            Err(crate::Error::config(key, format!("file not found: `{}`", path.display())))
        }
    }

    /// An error at `key` unless `path` is an existing directory.
    pub fn existing_dir(&self, key: &str, path: &std::path::Path) -> Result<()> {
        if path.is_dir() {
            Ok(())
        } else {
            Err(crate::Error::config(key, format!("directory not found: `{}`", path.display())))
        }
    }
}

/// A training step of the pipeline (pretraining, SFT, reward modelling, PPO, ...).
///
/// It reads its own `config` section, trains against the [`RunContext`] (device, seed,
/// directories, logging, cancellation) and returns the model it produced as a
/// checkpoint directory in HF layout, which the next stage receives as its input.
pub trait Stage: Sized + 'static {
    /// The name recipes use after the plugin's: `uses: <plugin>.<NAME>`.
    const NAME: &'static str;
    /// One line for `plumb plugins`.
    const DESCRIPTION: &'static str;
    /// The stage's recipe section; use `#[serde(deny_unknown_fields)]`.
    type Config: DeserializeOwned;

    /// Checks beyond the types (files exist, options combine) without doing any work.
    fn validate(_config: &Self::Config, _ctx: &ValidateContext) -> Result<()> {
        Ok(())
    }

    fn run(config: Self::Config, ctx: &mut RunContext) -> Result<StageOutput>;
}

/// An evaluation (e.g. chain-of-thought accuracy): like a stage, but it reports metrics
/// and does not produce a model.
pub trait Evaluator: Sized + 'static {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    type Config: DeserializeOwned;

    fn validate(_config: &Self::Config, _ctx: &ValidateContext) -> Result<()> {
        Ok(())
    }

    fn evaluate(config: Self::Config, ctx: &mut RunContext) -> Result<Metrics>;
}

/// A text-level reward any stage can call through the host by the name the recipe
/// gives it (exact-answer match, format checks, a learned reward model, a remote
/// endpoint). Scoring is by batch so slow or remote scorers can overlap inside one call.
pub trait Reward: RewardModel + Sized + 'static {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    type Config: DeserializeOwned;

    fn validate(_config: &Self::Config, _ctx: &ValidateContext) -> Result<()> {
        Ok(())
    }

    fn new(config: Self::Config) -> Result<Self>;
}

/// Named scalar results, e.g. `{"eval/loss": 2.31}`.
pub type Metrics = BTreeMap<String, f64>;

/// What a stage hands back to the host (as JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageOutput {
    /// The model this stage produced, a checkpoint directory in HF layout.
    pub model: Option<PathBuf>,
    /// Final figures, shown to the user and written to the run directory.
    pub metrics: Metrics,
}

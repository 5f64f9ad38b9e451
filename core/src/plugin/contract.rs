//! What a plugin provides: stages, evaluators and rewards. Each is a plain Rust type
//! with a configuration struct; `export_plugin!` turns it into C entries.
use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::context::RunContext;
use crate::error::Result;
use crate::reward::RewardModel;

/// Checks a component can make of its configuration before any compute starts.
pub struct ValidateContext {
    /// The names of the recipe's `rewards:`, in recipe order.
    rewards: Vec<String>,
    /// Whether the stage will have an input model.
    input_model: bool,
    /// The run's output directory, when the host says.
    run_dir: Option<PathBuf>,
}

impl ValidateContext {
    /// A context for a recipe that defines the rewards `rewards` (their names, not their
    /// `uses`). The host builds it from the validate request; tests build their own.
    pub fn new(rewards: Vec<String>) -> Self {
        Self { rewards, input_model: true, run_dir: None }
    }

    /// The same context for a run whose output directory is `run_dir`.
    pub fn with_run_dir(self, run_dir: PathBuf) -> Self {
        Self { run_dir: Some(run_dir), ..self }
    }

    /// The run's output directory (`run.output_dir`), where earlier stages write what
    /// they make: a path under it may not exist yet at validation. None when the host
    /// did not say (then such paths cannot be judged before the run).
    pub fn run_dir(&self) -> Option<&std::path::Path> {
        self.run_dir.as_deref()
    }

    /// The same context for a stage that will (or will not) have an input model.
    pub fn with_input_model(self, input_model: bool) -> Self {
        Self { input_model, ..self }
    }

    /// Whether the stage will have an input model: its own `model:` in the recipe or
    /// the output of an earlier stage.
    pub fn has_input_model(&self) -> bool {
        self.input_model
    }

    /// An error unless the stage will have an input model, saying what it needs it for
    /// (`what`, e.g. "SFT starts from a model"): a recipe that leaves it out fails on
    /// `plumb validate`, not after the stages before it have run.
    pub fn require_input_model(&self, what: &str) -> Result<()> {
        if self.input_model {
            return Ok(());
        }
        Err(crate::Error::Other(format!(
            "{what}, and this stage has none: give it a `model:` (a directory in HF layout, or a hub name in the local cache) or put it after a stage that makes one"
        )))
    }

    /// The names of the recipe's `rewards:`, in recipe order.
    pub fn reward_names(&self) -> &[String] {
        &self.rewards
    }

    /// An error at `key` unless the recipe's `rewards:` defines a reward named `name`.
    /// A stage that scores with a reward checks its name here, so a typo fails on
    /// `plumb validate` rather than at the first rollout.
    pub fn require_reward(&self, key: &str, name: &str) -> Result<()> {
        if self.rewards.iter().any(|r| r == name) {
            return Ok(());
        }
        let defined =
            if self.rewards.is_empty() { "none; add one under `rewards:`".to_owned() } else { self.rewards.join(", ") };
        let hint = crate::recipe::suggest::did_you_mean(name, self.rewards.iter().map(String::as_str));
        Err(crate::Error::config(
            key,
            format!("reward `{name}` is not defined in the recipe's `rewards:` (defined: {defined}){hint}"),
        ))
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
    /// The stage's recipe section; use `#[serde(deny_unknown_fields)]`, derive
    /// [`JsonSchema`] and give every field a doc comment (`plumb explain` shows them).
    type Config: DeserializeOwned + JsonSchema;

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
    /// The evaluator's recipe section, as for [`Stage::Config`].
    type Config: DeserializeOwned + JsonSchema;

    fn validate(_config: &Self::Config, _ctx: &ValidateContext) -> Result<()> {
        Ok(())
    }

    fn evaluate(config: Self::Config, ctx: &mut RunContext) -> Result<Metrics>;
}

/// A text-level reward any stage can call through the host by the name the recipe
/// gives it (exact-answer match, format checks, a learned reward model, a remote
/// endpoint). Scoring is by batch so slow or remote scorers can overlap inside one call.
///
/// `Send`: the host may score one instance from another thread than the one that made
/// it (never from two at once), and different rewards concurrently (see
/// [`RewardSet`](crate::reward::RewardSet)). A reward that needs async I/O keeps its own
/// runtime, made in [`new`](Reward::new): the host's is not shared across the boundary.
///
/// Errors from [`RewardModel::score`] need not name the reward: whoever calls it through
/// the host gets them prefixed with "reward `<name>`: ".
pub trait Reward: RewardModel + Send + Sized + 'static {
    /// The name recipes use after the plugin's: `uses: <plugin>.<NAME>`.
    const NAME: &'static str;
    /// One line for `plumb plugins`.
    const DESCRIPTION: &'static str;
    /// The reward's recipe section (`rewards[i].config`); use `#[serde(deny_unknown_fields)]`
    /// and derive [`JsonSchema`], as for [`Stage::Config`].
    type Config: DeserializeOwned + JsonSchema;

    /// Checks beyond the types (patterns compile, files exist) without doing any work.
    fn validate(_config: &Self::Config, _ctx: &ValidateContext) -> Result<()> {
        Ok(())
    }

    /// Builds the reward once per run, before the first stage: load a model on
    /// `ctx.device()`, start a runtime, open a connection pool.
    fn new(config: Self::Config, ctx: &RewardContext) -> Result<Self>;
}

/// What a reward learns of its run when it is made (crosses as JSON in the create
/// request, [`CreateRequest`]).
#[derive(Debug, Clone)]
pub struct RewardContext {
    name: String,
    device: tch::Device,
    seed: u64,
    run_dir: PathBuf,
}

impl RewardContext {
    /// `name` is the reward's name in the recipe's `rewards:` (not its `uses`).
    pub fn new(name: impl Into<String>, device: tch::Device, seed: u64, run_dir: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), device, seed, run_dir: run_dir.into() }
    }

    /// The reward's name in the recipe, for its log lines.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The run's device, resolved by the host as for stages (`auto` is CUDA when present).
    pub fn device(&self) -> tch::Device {
        self.device
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// The run's output directory.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.run_dir
    }
}

/// What the host sends to make a reward (JSON): its section and its run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRequest {
    pub config_yaml: String,
    /// The reward's name in the recipe.
    pub name: String,
    /// `cpu` or `cuda:N`, already resolved from `auto`.
    pub device: String,
    pub seed: u64,
    pub run_dir: PathBuf,
    /// The names of the recipe's `rewards:` (see [`ValidateContext::require_reward`]).
    #[serde(default)]
    pub rewards: Vec<String>,
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

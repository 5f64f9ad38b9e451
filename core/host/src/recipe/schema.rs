//! The recipe as typed data, and its defaults (all of them are in this file).
//!
//! ```yaml
//! run:
//!   name: quickstart            # default: the recipe file's stem
//!   output_dir: runs/quickstart # required; relative to the current directory
//!   seed: 1234                  # default 0
//!   device: auto                # auto | cpu | cuda | cuda:N ; default auto
//! plugins:                      # at least one
//!   - name: pretrain
//!     path: target/release/libplumb_pretrain.so   # optional
//!     sha256: "<64 hex digits>"                   # optional pin
//! rewards:                      # optional
//!   - name: exact_match
//!     uses: cot.exact_match     # <plugin>.<reward>
//!     config: {}                # default {}
//! stages:                       # at least one; run in order
//!   - name: pretrain            # unique; [A-Za-z0-9_-]+
//!     uses: pretrain.causal_lm  # <plugin>.<stage> or <plugin>.<evaluator>
//!     model: runs/x/final       # default: the previous stage's output; or an earlier
//!                               #   stage's: `model: {stage: sft}`
//!     config: {max_steps: 300}  # the stage's own section, checked by its plugin; default {}
//!   - name: ppl                 # an evaluator: runs on the current model (the previous
//!     uses: pretrain.perplexity #   stage's output, or its own `model:`), trains nothing,
//!     config: {data: x.txt}     #   writes ppl/results.json and a scalar per metric in tb/ppl/
//! ```
//!
//! A `stages:` entry whose `uses` names an evaluator evaluates the model the pipeline has
//! at that point and passes the same model on; so a recipe may hold only evaluators, each
//! with a `model:` (see `recipes/perplexity.yaml`).
use std::path::PathBuf;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml::{Mapping, Value};

use plumb_core::recipe::explain::describe;

/// A whole recipe: what to run, with which plugins, in which order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub run: RunSpec,
    pub plugins: Vec<PluginSpec>,
    /// Text-level scorers other stages can call by name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub rewards: Vec<RewardSpec>,
    pub stages: Vec<StageSpec>,
    /// One stage run over a grid of settings (see [`super::sweep`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<super::sweep::SweepSpec>,
}

/// `run:` — settings of the run as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The run's name in logs; default: the recipe file's stem.
    #[serde(default)]
    pub name: String,
    /// Where checkpoints, logs and the resolved recipe go; a relative path is relative to
    /// the current directory.
    pub output_dir: PathBuf,
    /// Seeds every random choice of the run (weights, shuffles, sampling); a seeded CPU run
    /// repeats exactly.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `auto` (`cuda:0` when libtorch sees a GPU, else `cpu`), `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: Device,
}

fn default_seed() -> u64 {
    0
}

/// `plugins:` — a shared library to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The plugin's name, the part before the dot in `uses`.
    pub name: String,
    /// Its file; without it, plumb searches `PLUMB_PLUGIN_PATH`, then next to the executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The file's expected SHA-256 (64 hex digits); loading refuses any other file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `rewards:` — a named scorer, provided by a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// The name stages use to call it.
    pub name: String,
    /// `<plugin>.<reward>`.
    pub uses: String,
    /// The reward's own section, a mapping checked by its plugin.
    #[serde(default = "empty_mapping", deserialize_with = "mapping")]
    pub config: Value,
}

/// `stages:` — one step of the pipeline, run in order: a stage (it trains and hands its
/// model on) or an evaluator (it scores the current model and hands that on unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Unique among stages; names the stage's directory under `output_dir`.
    pub name: String,
    /// `<plugin>.<stage>` or `<plugin>.<evaluator>`.
    pub uses: String,
    /// The input model directory (the model an evaluator scores); without it, the
    /// previous stage's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSource>,
    /// The stage's own section, a mapping checked by its plugin.
    #[serde(default = "empty_mapping", deserialize_with = "mapping")]
    pub config: Value,
    /// The metrics this stage shows in the run's summary table (`eval/format_compliance`
    /// shows beside it `eval/initial_format_compliance` when the stage reports it).
    /// Default: every `eval/X` that has an `eval/initial_X`; for an evaluator, its accuracies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub summary: Vec<String>,
}

impl RewardSpec {
    /// `uses` split into plugin and reward name (validated on load to have both).
    pub fn uses_parts(&self) -> (&str, &str) {
        split_uses(&self.uses)
    }
}

/// Where a stage's input model comes from: a directory (or a hub name in the local
/// cache), or the output of an earlier stage of the same run, found when it has run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ModelSource {
    /// `model: {stage: sft}`: the model the stage named `sft` (earlier in `stages:`) made.
    Stage { stage: String },
    /// `model: path/to/dir` or `model: ORG/NAME`.
    Path(PathBuf),
}

impl<'de> Deserialize<'de> for ModelSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        if let Value::String(path) = &value {
            return Ok(ModelSource::Path(PathBuf::from(path)));
        }
        if let Value::Mapping(map) = &value {
            if let (1, Some(Value::String(stage))) = (map.len(), map.get("stage")) {
                return Ok(ModelSource::Stage { stage: stage.clone() });
            }
        }
        Err(D::Error::custom(format!(
            "expected a model directory (or a hub name `ORG/NAME`), or `{{stage: <an earlier stage's name>}}`, found {}",
            describe(&value)
        )))
    }
}

impl StageSpec {
    /// `uses` split into plugin and stage name (validated on load to have both).
    pub fn uses_parts(&self) -> (&str, &str) {
        split_uses(&self.uses)
    }
}

fn split_uses(uses: &str) -> (&str, &str) {
    uses.split_once('.').unwrap_or((uses, ""))
}

fn empty_mapping() -> Value {
    Value::Mapping(Mapping::new())
}

/// A config section: any mapping; an empty value (`config:`) counts as `{}`.
fn mapping<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(empty_mapping()),
        value @ Value::Mapping(_) => Ok(value),
        other => Err(D::Error::custom(format!("expected a mapping, found {}", describe(&other)))),
    }
}

/// An optional list; an empty value (`rewards:`) counts as absent.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(deserializer: D) -> Result<T, D::Error> {
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// Where tensors live: `auto` (CUDA when present, else CPU), `cpu`, `cuda` (= `cuda:0`),
/// `cuda:N`; one parser for recipes, the command line and the host.
pub use plumb_core::device::DeviceSpec as Device;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in() {
        let recipe: Recipe = serde_yaml::from_str(
            "run: {output_dir: out}\nplugins: [{name: p}]\nrewards:\nstages:\n  - name: s\n    uses: p.s\n    config:\n",
        )
        .unwrap();
        assert_eq!(recipe.run.seed, 0);
        assert_eq!(recipe.run.device, Device::Auto);
        assert!(recipe.rewards.is_empty());
        assert_eq!(recipe.stages[0].config, empty_mapping());
        assert_eq!(recipe.stages[0].uses_parts(), ("p", "s"));
    }

    #[test]
    fn config_must_be_a_mapping() {
        let err = serde_yaml::from_str::<StageSpec>("{name: s, uses: p.s, config: [1]}").unwrap_err();
        assert!(err.to_string().contains("expected a mapping, found a sequence"), "{err}");
    }
}

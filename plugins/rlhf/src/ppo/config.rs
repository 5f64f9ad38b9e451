//! The `rlhf.ppo` recipe section: its own keys beside the training keys every stage has.
//! Defaults are TRL's `PPOConfig`'s where TRL has the setting.
use std::path::PathBuf;

use plumb_core::plugin::ValidateContext;
use plumb_core::reward::RewardWeights;
use plumb_core::rollout::{KlController, KlEstimator};
use plumb_core::train::{require, Length, TrainSection};
use plumb_core::{Error, Result};
use serde::Deserialize;

use crate::prompts::{read_prompts, LongPrompts, PromptData, StopToken};

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PpoConfig {
    /// The prompts.
    pub data: PromptData,
    /// The rewards (names in the recipe's `rewards:`), one or a weighted list.
    pub reward: RewardWeights,
    /// Where the value model starts.
    #[serde(default)]
    pub value_model: ValueModelConfig,
    /// The longest prompt in tokens (after the chat template).
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: usize,
    /// What a longer prompt does: `error` (the default) or `drop` (counted and logged).
    /// A prompt is never cut.
    #[serde(default)]
    pub long_prompts: LongPrompts,
    /// Response tokens at most (TRL's `response_length`).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature; training and reference log-probs are taken at it too.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// `eos`: a response ends at the tokenizer's end-of-sequence token(s), which are kept
    /// as its last token; `none`: every response runs to max_new_tokens.
    #[serde(default)]
    pub stop_token: StopToken,
    /// Subtracted from the score of a response that did not end with a stop token.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// β of the per-token KL penalty (the initial β when adaptive).
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// `k1` or `k3`.
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    /// Adapt β towards this KL per sequence (Ziegler et al.); fixed β when absent.
    #[serde(default)]
    pub kl_target: Option<f64>,
    /// Episodes over which an adaptive β moves by e^±0.2 at most.
    #[serde(default = "default_kl_horizon")]
    pub kl_horizon: f64,
    /// ε of the policy ratio's clip (TRL's `cliprange`).
    #[serde(default = "default_clip")]
    pub cliprange: f64,
    /// ε of the value clip (TRL's `cliprange_value`).
    #[serde(default = "default_clip")]
    pub cliprange_value: f64,
    /// Discount of future rewards in GAE (TRL's `gamma`).
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// λ of GAE (TRL's `lam`).
    #[serde(default = "default_lam")]
    pub lam: f64,
    /// Weight of the value loss beside the policy loss (TRL's `vf_coef`).
    #[serde(default = "default_vf_coef")]
    pub vf_coef: f64,
    /// Passes over each batch of episodes (TRL's `num_ppo_epochs`).
    #[serde(default = "default_ppo_epochs")]
    pub ppo_epochs: usize,
    /// Minibatches per pass, each one update (TRL's `num_mini_batches`); a minibatch of
    /// more episodes than `micro_batch_size` accumulates gradients.
    #[serde(default = "default_num_minibatches")]
    pub num_minibatches: usize,
    /// Whiten the per-token rewards before GAE (mean kept).
    #[serde(default)]
    pub whiten_rewards: bool,
    /// (prompt, response, score) samples written to TensorBoard at each log.
    #[serde(default = "default_samples")]
    pub samples: usize,
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueModelConfig {
    /// `policy`: the policy's transformer with a fresh scalar head; `reward_model`: the
    /// scalar-head model at `path` (a trained reward model).
    #[serde(default)]
    pub init: ValueInit,
    /// The scalar-head model directory, for `init: reward_model`.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ValueInit {
    #[default]
    Policy,
    RewardModel,
}

fn default_max_prompt_length() -> usize {
    512
}
fn default_max_new_tokens() -> usize {
    53
}
fn default_temperature() -> f64 {
    0.7
}
fn default_kl_coef() -> f64 {
    0.05
}
fn default_kl_horizon() -> f64 {
    10_000.0
}
fn default_clip() -> f64 {
    0.2
}
fn default_gamma() -> f64 {
    1.0
}
fn default_lam() -> f64 {
    0.95
}
fn default_vf_coef() -> f64 {
    0.1
}
fn default_ppo_epochs() -> usize {
    4
}
fn default_num_minibatches() -> usize {
    1
}
fn default_samples() -> usize {
    4
}

/// Episodes a minibatch holds: `batch_size / num_minibatches`.
pub fn minibatch(section: &TrainSection<PpoConfig>) -> usize {
    section.train.batch_size / section.stage.num_minibatches.max(1)
}

/// Episodes a forward and backward holds: `micro_batch_size`, by default the minibatch.
pub fn micro_batch(section: &TrainSection<PpoConfig>) -> usize {
    section.train.micro_batch_size.unwrap_or_else(|| minibatch(section))
}

impl PpoConfig {
    /// The KL controller a fresh run starts with.
    pub fn kl_controller(&self) -> KlController {
        match self.kl_target {
            Some(target) => KlController::adaptive(self.kl_coef, target, self.kl_horizon),
            None => KlController::fixed(self.kl_coef),
        }
    }
}

/// Every check that needs no model: values, files, the prompt file's lines.
pub fn validate(section: &TrainSection<PpoConfig>, ctx: &ValidateContext) -> Result<()> {
    let TrainSection { train: training, stage: c } = section;
    training.validate(Length::StepsOrEpochs)?;
    if training.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
        return Err(Error::config(
            "lora.dropout",
            "PPO takes its rollout log-probs without dropout, so the ratio of its first update must be 1: set 0",
        ));
    }
    ctx.existing_file("data.train", &c.data.train)?;
    read_prompts(&c.data.train, &c.data.fields)?;
    c.reward.validate("reward", ctx)?;
    match (c.value_model.init, &c.value_model.path) {
        (ValueInit::Policy, Some(_)) => {
            return Err(Error::config(
                "value_model.path",
                "only with init: reward_model (init: policy starts from the policy's own transformer)",
            ))
        }
        (ValueInit::RewardModel, None) => {
            return Err(Error::config("value_model.path", "init: reward_model needs the reward model's directory"))
        }
        (ValueInit::RewardModel, Some(path)) => {
            ctx.existing_dir("value_model.path", path)?;
            ctx.existing_file("value_model.path", &path.join("config.json"))?;
        }
        (ValueInit::Policy, None) => {}
    }
    let positive = |ok: bool, key: &str| require(ok, key, "expected a number above 0");
    positive(c.max_prompt_length > 0, "max_prompt_length")?;
    positive(c.max_new_tokens > 0, "max_new_tokens")?;
    require(
        c.temperature.is_finite() && c.temperature > 0.0,
        "temperature",
        "expected a number above 0 (PPO learns from sampled responses; greedy decoding has no distribution)",
    )?;
    if let Some(penalty) = c.missing_eos_penalty {
        require(penalty.is_finite() && penalty >= 0.0, "missing_eos_penalty", "expected a number >= 0")?;
    }
    require(c.kl_coef.is_finite() && c.kl_coef >= 0.0, "kl_coef", "expected a number >= 0")?;
    if let Some(target) = c.kl_target {
        positive(target.is_finite() && target > 0.0, "kl_target")?;
    }
    positive(c.kl_horizon.is_finite() && c.kl_horizon > 0.0, "kl_horizon")?;
    positive(c.cliprange.is_finite() && c.cliprange > 0.0, "cliprange")?;
    positive(c.cliprange_value.is_finite() && c.cliprange_value > 0.0, "cliprange_value")?;
    require((0.0..=1.0).contains(&c.gamma), "gamma", "expected a number in [0, 1]")?;
    require((0.0..=1.0).contains(&c.lam), "lam", "expected a number in [0, 1]")?;
    require(c.vf_coef.is_finite() && c.vf_coef >= 0.0, "vf_coef", "expected a number >= 0")?;
    positive(c.ppo_epochs > 0, "ppo_epochs")?;
    positive(c.num_minibatches > 0, "num_minibatches")?;
    let batch = training.batch_size;
    if batch % c.num_minibatches != 0 {
        return Err(Error::config(
            "num_minibatches",
            format!("batch_size {batch} does not split into {} equal minibatches", c.num_minibatches),
        ));
    }
    let minibatch = batch / c.num_minibatches;
    let micro = micro_batch(section);
    if minibatch % micro != 0 {
        return Err(Error::config(
            "micro_batch_size",
            format!("a minibatch of {minibatch} episodes does not split into micro-batches of {micro}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use plumb_core::recipe::parse_section;

    use super::*;

    fn section(yaml: &str) -> TrainSection<PpoConfig> {
        parse_section(yaml).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn error(section: &TrainSection<PpoConfig>) -> String {
        validate(section, &ValidateContext::new(vec!["exact".into()])).unwrap_err().to_string()
    }

    /// A prompt file of two lines.
    fn prompts() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"prompt\": \"1+1=\", \"answer\": 2}\n{\"prompt\": \"2+2=\", \"answer\": 4}\n")
            .unwrap();
        let text = path.display().to_string();
        (dir, text)
    }

    #[test]
    fn defaults_are_trls() {
        let (_dir, path) = prompts();
        let s = section(&format!("data: {{train: {path}}}\nreward: exact\nmax_steps: 2\n"));
        let c = &s.stage;
        assert_eq!(
            (c.kl_coef, c.cliprange, c.cliprange_value, c.gamma, c.lam, c.vf_coef),
            (0.05, 0.2, 0.2, 1.0, 0.95, 0.1)
        );
        assert_eq!((c.ppo_epochs, c.num_minibatches, c.temperature, c.max_new_tokens), (4, 1, 0.7, 53));
        assert_eq!(
            (c.kl_estimator, c.stop_token, c.long_prompts),
            (KlEstimator::K1, StopToken::Eos, LongPrompts::Error)
        );
        assert_eq!(c.kl_controller(), KlController::fixed(0.05));
        validate(&s, &ValidateContext::new(vec!["exact".into()])).unwrap();
    }

    #[test]
    fn every_value_is_checked_with_its_key() {
        let (_dir, path) = prompts();
        let base = format!("data: {{train: {path}}}\nreward: exact\nmax_steps: 2\nbatch_size: 4\n");
        for (extra, expected) in [
            ("temperature: 0", "temperature: expected a number above 0"),
            ("gamma: 1.5", "gamma: expected a number in [0, 1]"),
            ("lam: -0.1", "lam: expected a number in [0, 1]"),
            ("cliprange: 0", "cliprange: expected a number above 0"),
            ("kl_coef: -1", "kl_coef: expected a number >= 0"),
            ("kl_target: 0", "kl_target: expected a number above 0"),
            ("ppo_epochs: 0", "ppo_epochs: expected a number above 0"),
            ("num_minibatches: 3", "num_minibatches: batch_size 4 does not split into 3 equal minibatches"),
            ("num_minibatches: 2\nmicro_batch_size: 4", "micro_batch_size: a minibatch of 2 episodes"),
            ("missing_eos_penalty: -1", "missing_eos_penalty: expected a number >= 0"),
            ("value_model: {init: reward_model}", "value_model.path: init: reward_model needs"),
            ("value_model: {path: /x}", "value_model.path: only with init: reward_model"),
            ("reward: nope", "reward: reward `nope` is not defined"),
        ] {
            let yaml = format!("{base}{extra}\n")
                .replace("reward: exact\n", if extra.starts_with("reward") { "" } else { "reward: exact\n" });
            let got = error(&section(&yaml));
            assert!(got.contains(expected), "{extra}: {got}");
        }
        let typo: std::result::Result<TrainSection<PpoConfig>, _> = parse_section(&format!("{base}kl_coeff: 0.1\n"));
        let typo = typo.unwrap_err();
        assert!(format!("{typo:?}").contains("kl_coeff"), "{typo:?}");
    }

    #[test]
    fn the_shipped_recipe_parses_and_validates() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let recipe: serde_json::Value =
            parse_section(&std::fs::read_to_string(root.join("recipes/ppo.yaml")).unwrap()).unwrap();
        let stage = recipe["stages"].as_array().unwrap().iter().find(|s| s["uses"] == "rlhf.ppo").unwrap();
        let mut s = section(&stage["config"].to_string()); // JSON is YAML
        s.stage.data.train = root.join(&s.stage.data.train);
        validate(&s, &ValidateContext::new(vec!["twelve_words".into(), "full_stop".into()])).unwrap();
    }
}

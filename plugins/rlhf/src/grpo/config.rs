//! The `rlhf.grpo` recipe section: its own keys beside the training keys every stage has.
//! Defaults are TRL's `GRPOConfig`'s where TRL has the setting.
use plumb_core::plugin::ValidateContext;
use plumb_core::reward::RewardWeights;
use plumb_core::rollout::{LossAggregation, ScaleRewards};
use plumb_core::train::{require, Length, TrainSection};
use plumb_core::{Error, Result};
use serde::Deserialize;

use crate::prompts::{read_prompts, LongPrompts, PromptData, StopToken};

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    /// The prompts (plain or chat), with reference answers for verifiable rewards.
    pub data: PromptData,
    /// The rewards (names in the recipe's `rewards:`), one or a weighted list.
    pub reward: RewardWeights,
    /// G: completions sampled for each prompt; `batch_size` counts completions, a multiple of G.
    #[serde(default = "default_num_generations")]
    pub num_generations: usize,
    /// What the centred rewards are divided by: `group` (its std), `batch` (the batch's std) or `none`.
    #[serde(default)]
    pub scale_rewards: ScaleRewards,
    /// How the per-token loss becomes one number: `grpo`, `bnpo`, `dr_grpo` or `dapo`.
    #[serde(default)]
    pub loss_type: LossAggregation,
    /// ε_low: the ratio π/π_old is clipped below at 1 − epsilon.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// ε_high: the ratio is clipped above at 1 + epsilon_high (clip-higher; DAPO uses 0.28); `epsilon` when absent.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// β of the k3 KL to the reference in the loss; 0 (the default) loads no reference model.
    #[serde(default)]
    pub beta: f64,
    /// μ: passes over each batch of completions (TRL's `num_iterations`).
    #[serde(default = "one")]
    pub num_iterations: usize,
    /// Updates per pass over the batch, each on a shuffled minibatch of completions.
    #[serde(default = "one")]
    pub num_minibatches: usize,
    /// The longest prompt in tokens (after the chat template).
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: usize,
    /// What a longer prompt does: `error` (the default) or `drop` (counted and logged).
    #[serde(default)]
    pub long_prompts: LongPrompts,
    /// Completion tokens at most.
    #[serde(default = "default_max_completion_length")]
    pub max_completion_length: usize,
    /// Sampling temperature; training log-probs are taken at it too.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// `eos`: a completion ends at the tokenizer's end-of-sequence token(s); `none`: at max_completion_length.
    #[serde(default)]
    pub stop_token: StopToken,
    /// Leave completions cut at max_completion_length (no stop token) out of the loss (DAPO's overlong filter).
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// DAPO's soft overlong punishment added to the reward; none when absent.
    #[serde(default)]
    pub overlong_penalty: Option<OverlongPenalty>,
    /// DAPO's dynamic sampling: drop groups whose rewards are all equal and sample more; off when absent.
    #[serde(default)]
    pub dynamic_sampling: Option<DynamicSampling>,
    /// (prompt, completion, reward) samples written to TensorBoard at each log.
    #[serde(default = "default_samples")]
    pub samples: usize,
}

/// DAPO's soft overlong punishment (<https://arxiv.org/abs/2503.14476>, TRL's
/// `get_soft_overlong_punishment`): 0 up to `max_completion_length − cache` tokens, then
/// falling linearly to −`weight` at `max_completion_length`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OverlongPenalty {
    /// The tokens before max_completion_length over which the penalty grows.
    pub cache: usize,
    /// The penalty at max_completion_length.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

impl OverlongPenalty {
    /// The penalty (≤ 0) of a completion of `length` tokens.
    pub fn of(&self, length: usize, max_completion_length: usize) -> f64 {
        let free = max_completion_length.saturating_sub(self.cache);
        if length <= free {
            0.0
        } else if length <= max_completion_length {
            self.weight * (free as f64 - length as f64) / self.cache as f64
        } else {
            -self.weight
        }
    }
}

/// DAPO's dynamic sampling.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DynamicSampling {
    /// Rounds of sampling a step may take to fill its batch with groups whose rewards differ;
    /// after the last, the step trains on the groups it has.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: usize,
}

fn default_num_generations() -> usize {
    8
}
fn default_epsilon() -> f64 {
    0.2
}
fn one() -> usize {
    1
}
fn default_max_prompt_length() -> usize {
    512
}
fn default_max_completion_length() -> usize {
    256
}
fn default_temperature() -> f64 {
    1.0
}
fn default_samples() -> usize {
    4
}
fn default_weight() -> f64 {
    1.0
}
fn default_max_rounds() -> usize {
    4
}

impl GrpoConfig {
    /// ε_high: `epsilon_high`, or `epsilon` when unset.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

/// Completions a minibatch holds: `batch_size / num_minibatches`.
pub fn minibatch(section: &TrainSection<GrpoConfig>) -> usize {
    section.train.batch_size / section.stage.num_minibatches.max(1)
}

/// Completions a forward and backward holds: `micro_batch_size`, by default the minibatch.
pub fn micro_batch(section: &TrainSection<GrpoConfig>) -> usize {
    section.train.micro_batch_size.unwrap_or_else(|| minibatch(section))
}

/// Every check that needs no model: values, files, the prompt file's lines, the rewards.
pub fn validate(section: &TrainSection<GrpoConfig>, ctx: &ValidateContext) -> Result<()> {
    let TrainSection { train: training, stage: c } = section;
    training.validate(Length::StepsOrEpochs)?;
    if training.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
        return Err(Error::config(
            "lora.dropout",
            "GRPO takes its sampling log-probs without dropout, so the ratio of its first update must be 1: set 0",
        ));
    }
    ctx.existing_file("data.train", &c.data.train)?;
    read_prompts(&c.data.train, &c.data.fields)?;
    c.reward.validate("reward", ctx)?;
    let positive = |ok: bool, key: &str| require(ok, key, "expected a number above 0");
    require(
        c.num_generations >= 2,
        "num_generations",
        "expected at least 2 (advantages are relative to the other completions of a prompt)",
    )?;
    let batch = training.batch_size;
    if batch % c.num_generations != 0 {
        return Err(Error::config(
            "batch_size",
            format!(
                "{batch} completions do not make whole groups of num_generations {}; expected a multiple of it",
                c.num_generations
            ),
        ));
    }
    require(c.epsilon.is_finite() && c.epsilon > 0.0 && c.epsilon < 1.0, "epsilon", "expected a number in (0, 1)")?;
    if let Some(high) = c.epsilon_high {
        positive(high.is_finite() && high > 0.0, "epsilon_high")?;
    }
    require(c.beta.is_finite() && c.beta >= 0.0, "beta", "expected a number >= 0")?;
    positive(c.num_iterations > 0, "num_iterations")?;
    positive(c.num_minibatches > 0, "num_minibatches")?;
    positive(c.max_prompt_length > 0, "max_prompt_length")?;
    positive(c.max_completion_length > 0, "max_completion_length")?;
    require(
        c.temperature.is_finite() && c.temperature > 0.0,
        "temperature",
        "expected a number above 0 (GRPO learns from sampled completions; greedy decoding has no distribution)",
    )?;
    if let Some(penalty) = &c.overlong_penalty {
        if penalty.cache == 0 || penalty.cache > c.max_completion_length {
            return Err(Error::config(
                "overlong_penalty.cache",
                format!("expected 1 to max_completion_length ({}) tokens", c.max_completion_length),
            ));
        }
        require(
            penalty.weight.is_finite() && penalty.weight >= 0.0,
            "overlong_penalty.weight",
            "expected a number >= 0",
        )?;
    }
    if let Some(dynamic) = &c.dynamic_sampling {
        positive(dynamic.max_rounds > 0, "dynamic_sampling.max_rounds")?;
    }
    if batch % c.num_minibatches != 0 {
        return Err(Error::config(
            "num_minibatches",
            format!("batch_size {batch} does not split into {} equal minibatches", c.num_minibatches),
        ));
    }
    let minibatch = batch / c.num_minibatches;
    let micro = micro_batch(section);
    if micro == 0 || minibatch % micro != 0 {
        return Err(Error::config(
            "micro_batch_size",
            format!("a minibatch of {minibatch} completions does not split into micro-batches of {micro}"),
        ));
    }
    ctx.require_input_model("GRPO starts from a policy (the SFT model)")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use plumb_core::recipe::parse_section;

    use super::*;

    fn section(yaml: &str) -> TrainSection<GrpoConfig> {
        parse_section(yaml).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn context() -> ValidateContext {
        ValidateContext::new(vec!["exact".into()]).with_input_model(true)
    }

    fn prompts() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"prompt\": \"1+1=\", \"answer\": 2}\n").unwrap();
        let text = path.display().to_string();
        (dir, text)
    }

    #[test]
    fn defaults_are_trls() {
        let (_dir, path) = prompts();
        let s = section(&format!("data: {{train: {path}}}\nreward: exact\nmax_steps: 2\nbatch_size: 16\n"));
        let c = &s.stage;
        assert_eq!((c.num_generations, c.epsilon, c.epsilon_high(), c.beta), (8, 0.2, 0.2, 0.0));
        assert_eq!((c.num_iterations, c.temperature, c.max_completion_length), (1, 1.0, 256));
        assert_eq!((c.scale_rewards, c.loss_type), (ScaleRewards::Group, LossAggregation::Dapo));
        assert!(!c.mask_truncated_completions && c.overlong_penalty.is_none() && c.dynamic_sampling.is_none());
        validate(&s, &context()).unwrap();
    }

    #[test]
    fn every_value_is_checked_with_its_key() {
        let (_dir, path) = prompts();
        let base = format!("data: {{train: {path}}}\nreward: exact\nmax_steps: 2\nbatch_size: 8\nnum_generations: 4\n");
        // `base` with the keys `extra` sets replaced by its lines.
        let with = |extra: &str| -> String {
            let key = |line: &str| line.split(':').next().unwrap_or_default().to_owned();
            let set: Vec<String> = extra.lines().map(key).collect();
            let kept: String = base.lines().filter(|l| !set.contains(&key(l))).map(|l| format!("{l}\n")).collect();
            format!("{kept}{extra}\n")
        };
        for (extra, expected) in [
            ("num_generations: 1", "num_generations: expected at least 2"),
            ("num_generations: 3", "batch_size: 8 completions do not make whole groups of num_generations 3"),
            ("epsilon: 0", "epsilon: expected a number in (0, 1)"),
            ("epsilon_high: -0.1", "epsilon_high: expected a number above 0"),
            ("beta: -1", "beta: expected a number >= 0"),
            ("temperature: 0", "temperature: expected a number above 0"),
            ("num_iterations: 0", "num_iterations: expected a number above 0"),
            ("num_minibatches: 3", "num_minibatches: batch_size 8 does not split into 3 equal minibatches"),
            ("num_minibatches: 4\nmicro_batch_size: 4", "micro_batch_size: a minibatch of 2 completions"),
            ("overlong_penalty: {cache: 0}", "overlong_penalty.cache: expected 1 to max_completion_length"),
            ("dynamic_sampling: {max_rounds: 0}", "dynamic_sampling.max_rounds: expected a number above 0"),
            ("reward: nope", "reward: reward `nope` is not defined"),
        ] {
            let got = validate(&section(&with(extra)), &context()).unwrap_err().to_string();
            assert!(got.contains(expected), "{extra}: {got}");
        }
        let no_model = validate(&section(&base), &context().with_input_model(false));
        assert!(no_model.unwrap_err().to_string().contains("GRPO starts from a policy"));
        let typo: std::result::Result<TrainSection<GrpoConfig>, _> = parse_section(&format!("{base}epsilon_hi: 0.3\n"));
        assert!(format!("{:?}", typo.unwrap_err()).contains("epsilon_hi"));
    }

    #[test]
    fn the_overlong_penalty_by_hand() {
        let penalty = OverlongPenalty { cache: 4, weight: 2.0 };
        // max 10: free up to 6; 8 tokens → 2·(6 − 8)/4 = −1; 10 → −2.
        assert_eq!([5, 6, 8, 10].map(|l| penalty.of(l, 10)), [0.0, 0.0, -1.0, -2.0]);
    }

    #[test]
    fn the_shipped_recipe_parses_and_validates() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let recipe: serde_json::Value =
            parse_section(&std::fs::read_to_string(root.join("recipes/grpo.yaml")).unwrap()).unwrap();
        let stage = recipe["stages"].as_array().unwrap().iter().find(|s| s["uses"] == "rlhf.grpo").unwrap();
        let mut s = section(&stage["config"].to_string()); // JSON is YAML
        s.stage.data.train = root.join(&s.stage.data.train);
        let names = recipe["rewards"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned());
        validate(&s, &ValidateContext::new(names.collect()).with_input_model(true)).unwrap();
    }
}

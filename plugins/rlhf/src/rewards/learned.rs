//! `rlhf.learned`: a trained reward model (a transformer with a scalar head, as the
//! `rlhf.reward_model` stage or transformers' `*ForSequenceClassification` with one label
//! saves it) as a reward any stage can call.
//!
//! The model brings its own tokenizer (`tokenizer.json` beside its weights): each
//! (prompt, response) is re-tokenized with it, so the reward model need not share the
//! policy's vocabulary. The text scored is what the reward-model stage trained on: prompt
//! and response concatenated, or with `chat_template: true` one user and one assistant
//! turn rendered with the reward model's chat template. Scoring runs in batches of
//! `batch_size`, without gradients, on the run's device.
//!
//! The model may be made by an earlier stage of the same run (… → reward_model → ppo), so
//! a `model` directory that does not exist yet is accepted when the recipe is validated
//! and when the reward is created; it is loaded on the first `score` call, and if it is
//! still missing then, that call fails naming `model` and the directory. A directory that
//! exists is checked at validation (a `config.json` and a `tokenizer.json`).
use std::path::PathBuf;

use plumb_core::plugin::ValidateContext;
use plumb_core::reward::ScorePair;
use plumb_core::tch::Device;
use plumb_core::train::require;
use plumb_core::{Error, Result, Reward, RewardModel};
use serde::Deserialize;

use crate::reward_model::preference::Sequence;
use crate::reward_model::scoring::TextScorer;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedConfig {
    /// A saved scalar-head model directory with its `tokenizer.json`.
    pub model: PathBuf,
    /// (prompt, response) pairs scored per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Tokens scored per pair; longer ones keep their end (where the score is read).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Score one user turn and one assistant turn through the reward model's chat
    /// template, instead of the prompt and response concatenated.
    #[serde(default)]
    pub chat_template: bool,
}

fn default_batch_size() -> usize {
    16
}
fn default_max_length() -> usize {
    512
}

pub struct LearnedReward {
    config: LearnedConfig,
    device: Device,
    /// Loaded on creation when the model exists, else on the first `score`.
    scorer: Option<TextScorer>,
}

impl LearnedReward {
    /// The reward on `device`, loading the model now if it exists.
    pub fn on_device(config: LearnedConfig, device: Device) -> Result<Self> {
        let mut reward = Self { config, device, scorer: None };
        if reward.config.model.exists() {
            reward.load()?;
        } else {
            tracing::info!(
                "rlhf.learned: {} does not exist yet (an earlier stage may make it); loading it on first use",
                reward.config.model.display()
            );
        }
        Ok(reward)
    }

    fn load(&mut self) -> Result<&TextScorer> {
        if self.scorer.is_none() {
            let dir = &self.config.model;
            if !dir.is_dir() {
                return Err(Error::config(
                    "model",
                    format!(
                        "the reward model directory `{}` does not exist (no earlier stage made it); expected a saved reward model",
                        dir.display()
                    ),
                ));
            }
            let scorer = TextScorer::load(dir, self.device)?;
            if self.config.chat_template && scorer.tokenizer.chat_template().is_none() {
                return Err(Error::config(
                    "chat_template",
                    format!("the reward model in {} has no chat template to render with", dir.display()),
                ));
            }
            self.scorer = Some(scorer);
        }
        Ok(self.scorer.as_ref().expect("loaded above"))
    }
}

impl RewardModel for LearnedReward {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        let (chat, batch_size, max_length) = (self.config.chat_template, self.config.batch_size, self.config.max_length);
        let scorer = self.load()?;
        let sequences: Vec<Sequence> =
            pairs.iter().map(|p| Sequence::of_exchange(&p.prompt, &p.response, chat)).collect();
        scorer.score(&sequences, batch_size, max_length)
    }
}

impl Reward for LearnedReward {
    const NAME: &'static str = "learned";
    const DESCRIPTION: &'static str =
        "A trained reward model (scalar head, its own tokenizer) scoring prompt + response";
    type Config = LearnedConfig;

    fn validate(config: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        require(config.batch_size >= 1, "batch_size", "expected at least 1")?;
        require(config.max_length >= 2, "max_length", "expected at least 2")?;
        if config.model.exists() {
            ctx.existing_dir("model", &config.model)?;
            for file in ["config.json", "tokenizer.json"] {
                ctx.existing_file("model", &config.model.join(file))?;
            }
        }
        Ok(())
    }

    fn new(config: Self::Config) -> Result<Self> {
        // The contract gives a reward no device yet: the first CUDA device when there is one.
        Self::on_device(config, Device::cuda_if_available())
    }
}

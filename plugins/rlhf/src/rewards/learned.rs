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
//! The model may be made by an earlier stage of the same run (… → reward_model → ppo):
//! - validation checks a `model` directory that exists (a `config.json` and a
//!   `tokenizer.json`); one that does not is an error naming `model` unless it lies under
//!   the run's output directory, where an earlier stage may make it (`plumb validate`
//!   refuses what `plumb run` would);
//! - creation, before the first stage, loads a model that exists, and checks one that
//!   does not as validation does;
//! - such a model is loaded on the first `score` call, which fails naming `model` and the
//!   directory if it is still missing then.
use std::path::{Path, PathBuf};

use plumb_core::plugin::ValidateContext;
use plumb_core::reward::ScorePair;
use plumb_core::tch::Device;
use plumb_core::train::require;
use plumb_core::{Error, Result, Reward, RewardContext, RewardModel};
use serde::Deserialize;

use crate::preference::Sequence;
use crate::reward_model::scoring::TextScorer;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
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
    /// The reward on `device`, loading the model now if it exists. One that does not must
    /// lie under `run_dir`, where an earlier stage of the run may make it.
    pub fn create(config: LearnedConfig, device: Device, run_dir: &Path) -> Result<Self> {
        let mut reward = Self { config, device, scorer: None };
        if reward.config.model.exists() {
            reward.load()?;
        } else {
            made_by_the_run(&reward.config.model, run_dir)?;
            tracing::info!(
                "rlhf.learned: {} does not exist yet (an earlier stage of this run may make it); loading it on first use",
                reward.config.model.display()
            );
        }
        Ok(reward)
    }

    /// The scorer, loaded now if it was not yet.
    fn load(&mut self) -> Result<&TextScorer> {
        let scorer = match self.scorer.take() {
            Some(scorer) => scorer,
            None => Self::open(&self.config, self.device)?,
        };
        Ok(self.scorer.insert(scorer))
    }

    fn open(config: &LearnedConfig, device: Device) -> Result<TextScorer> {
        let dir = &config.model;
        if !dir.is_dir() {
            return Err(Error::config(
                "model",
                format!(
                    "the reward model directory `{}` does not exist (no earlier stage made it); expected a saved reward model",
                    dir.display()
                ),
            ));
        }
        let scorer = TextScorer::load(dir, device)?;
        if config.chat_template && scorer.tokenizer.chat_template().is_none() {
            return Err(Error::config(
                "chat_template",
                format!("the reward model in {} has no chat template to render with", dir.display()),
            ));
        }
        Ok(scorer)
    }
}

impl RewardModel for LearnedReward {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        let (chat, batch_size, max_length) =
            (self.config.chat_template, self.config.batch_size, self.config.max_length);
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
        } else if let Some(run_dir) = ctx.run_dir() {
            made_by_the_run(&config.model, run_dir)?;
        }
        Ok(())
    }

    fn new(config: Self::Config, ctx: &RewardContext) -> Result<Self> {
        Self::create(config, ctx.device(), ctx.run_dir())
    }
}

/// Ok when `model`, which does not exist, lies under the run's output directory `run_dir`,
/// where an earlier stage of the run may make it; else an error naming `model`.
fn made_by_the_run(model: &Path, run_dir: &Path) -> Result<()> {
    if absolute(model)?.starts_with(absolute(run_dir)?) {
        return Ok(());
    }
    Err(Error::config(
        "model",
        format!(
            "directory not found: `{}` (a reward model that a stage of this run makes lies under its output directory `{}`)",
            model.display(),
            run_dir.display()
        ),
    ))
}

/// `path` made absolute against the current directory, `.` and `..` resolved lexically
/// (it may not exist yet, so it cannot be canonicalized).
fn absolute(path: &Path) -> Result<PathBuf> {
    let joined = std::path::absolute(path).map_err(|e| Error::file(path, e.to_string()))?;
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use plumb_core::model::llama::LlamaForCausalLm;
    use plumb_core::model::scalar_head::ScalarHeadModel;
    use plumb_core::tch::{Kind, Tensor};
    use plumb_core::tokenizer::Tokenizer;

    use super::*;

    const CORPUS: [&str; 3] = [
        "One day, Lily went to the park with her friend Tom. The sky was sunny.",
        "Last summer, Ben went to the beach with his friend Mia. Ben was happy.",
        "A fox ran away with the red ball, and they looked for it at the river.",
    ];

    /// A tokenizer of `vocab` tokens trained on the corpus.
    fn tokenizer(vocab: usize) -> Tokenizer {
        Tokenizer::train_bpe(CORPUS.iter().copied(), vocab, 1).unwrap()
    }

    /// A tiny Llama with a fresh score head and `tokenizer`, saved as a reward model in `dir`.
    fn reward_model(dir: &Path, tokenizer: &Tokenizer, seed: i64) {
        plumb_core::tch::manual_seed(seed);
        let lm = dir.with_extension("lm");
        std::fs::create_dir_all(&lm).unwrap();
        let config = serde_json::json!({
            "vocab_size": tokenizer.vocab_size(), "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128
        });
        LlamaForCausalLm::new(serde_json::from_value(config).unwrap(), Device::Cpu).unwrap().save(&lm).unwrap();
        let model = ScalarHeadModel::from_causal_lm(&lm, Device::Cpu, Kind::Float).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        model.save(dir, tokenizer.pad_id().unwrap()).unwrap();
        tokenizer.save(dir, 128).unwrap();
    }

    fn config(dir: &Path, batch_size: usize) -> LearnedConfig {
        LearnedConfig { model: dir.to_path_buf(), batch_size, max_length: 128, chat_template: false }
    }

    fn pairs() -> Vec<ScorePair> {
        let pair = ScorePair::new;
        vec![
            pair("One day, Lily went to the park", " with her friend Tom."),
            pair("Last summer,", " Ben was happy."),
            pair("A fox ran away", " with the red ball, and they looked for it at the river."),
        ]
    }

    /// The model in `dir` scoring `prompt + response` alone (no padding, its own tokenizer).
    fn one_by_one(dir: &Path) -> Vec<f64> {
        let model = ScalarHeadModel::from_dir(dir, Device::Cpu, Kind::Float).unwrap();
        let tokenizer = Tokenizer::from_dir(dir).unwrap();
        pairs()
            .iter()
            .map(|p| {
                let ids = tokenizer.encode_prompt(&format!("{}{}", p.prompt, p.response)).unwrap();
                let ids = Tensor::from_slice(&ids).unsqueeze(0);
                model.scores(&ids, &ids.ones_like()).unwrap().double_value(&[0])
            })
            .collect()
    }

    #[test]
    fn the_reward_scores_as_the_model_does_on_the_same_text_in_padded_batches() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("rm");
        reward_model(&dir, &tokenizer(280), 3);
        let expected = one_by_one(&dir);
        // Batches of 2: the first padded, the second a single pair.
        let scores = LearnedReward::create(config(&dir, 2), Device::Cpu, root.path()).unwrap().score(&pairs()).unwrap();
        assert_eq!(scores.len(), 3);
        for (a, b) in scores.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "reward {scores:?} vs model {expected:?}");
        }
        assert!(expected.windows(2).all(|w| w[0] != w[1]), "distinct texts score differently: {expected:?}");
    }

    #[test]
    fn a_reward_model_with_another_tokenizer_than_the_policy_scores_the_text() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("rm");
        let (policy_tokenizer, reward_tokenizer) = (tokenizer(420), tokenizer(262));
        reward_model(&dir, &reward_tokenizer, 4);
        // The policy's ids of the response do not even fit the reward model's embedding…
        let text = format!("{}{}", pairs()[2].prompt, pairs()[2].response);
        let policy_ids = policy_tokenizer.encode(&text).unwrap();
        assert!(policy_ids.iter().any(|&id| id >= reward_tokenizer.vocab_size() as i64), "{policy_ids:?}");
        // …but the reward re-tokenizes the text with its own tokenizer.
        let scores = LearnedReward::create(config(&dir, 8), Device::Cpu, root.path()).unwrap().score(&pairs()).unwrap();
        let expected = one_by_one(&dir);
        for (a, b) in scores.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "reward {scores:?} vs model {expected:?}");
        }
    }

    /// Validation refuses a missing model outside the run's directory, as creation does,
    /// and accepts one under it (an earlier stage may make it).
    #[test]
    fn validation_refuses_a_missing_model_that_no_stage_can_make() {
        let root = tempfile::tempdir().unwrap();
        let ctx = ValidateContext::new(Vec::new()).with_run_dir(root.path().join("run"));
        let elsewhere = root.path().join("elsewhere/rm");
        let message = LearnedReward::validate(&config(&elsewhere, 4), &ctx).unwrap_err().to_string();
        assert!(
            message.contains("model")
                && message.contains("directory not found")
                && message.contains("elsewhere/rm")
                && message.contains("lies under its output directory"),
            "{message}"
        );
        LearnedReward::validate(&config(&root.path().join("run/reward_model/final"), 4), &ctx).unwrap();
    }

    #[test]
    fn a_model_an_earlier_stage_makes_is_loaded_on_first_use_or_named_when_missing() {
        let root = tempfile::tempdir().unwrap();
        // Missing and outside the run's directory: nothing can make it, refused on creation.
        let elsewhere = root.path().join("elsewhere/rm");
        let message = LearnedReward::create(config(&elsewhere, 4), Device::Cpu, &root.path().join("run/./x/.."))
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("model") && message.contains("directory not found"), "{message}");
        let dir = root.path().join("run/reward_model/final");
        // Not there yet, but under the run's directory: an earlier stage may make it.
        let mut reward = LearnedReward::create(config(&dir, 4), Device::Cpu, &root.path().join("run")).unwrap();
        let message = reward.score(&pairs()).unwrap_err().to_string();
        assert!(
            message.contains("model")
                && message.contains("run/reward_model/final")
                && message.contains("does not exist"),
            "{message}"
        );
        reward_model(&dir, &tokenizer(280), 5);
        let (scores, expected) = (reward.score(&pairs()).unwrap(), one_by_one(&dir));
        assert!(scores.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-5), "{scores:?} vs {expected:?}");
    }
}

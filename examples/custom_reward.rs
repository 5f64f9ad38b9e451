//! A user's own reward, written the way you would write it in your own crate:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//! [dependencies]
//! plumb-core = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! It provides `lexicon.sentiment`: a sentiment-lexicon reward, the count of positive
//! words in the response minus the count of negative ones (optionally per word of the
//! response). Build it with `cargo build --example custom_reward`, list the library
//! under `plugins:` and give the reward a name under `rewards:`; any stage that scores
//! with rewards (PPO's `reward:`) then reaches it by that name (see
//! `recipes/custom_reward.yaml`).
//!
//! A reward is three things: a config struct (`deny_unknown_fields`, so a typo is an
//! error), [`RewardModel::score`] over a batch of pairs, and [`Reward`]'s `validate`
//! (checks before any compute) and `new` (made once per run, with the run's device and
//! seed in the [`RewardContext`]).
use std::collections::HashSet;

use plumb_core::plugin::{RewardContext, ValidateContext};
use plumb_core::reward::{RewardModel, ScorePair};
use plumb_core::{Error, Result, Reward};
use serde::Deserialize;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SentimentConfig {
    /// Words that count +1 each (compared in lower case, punctuation stripped).
    #[serde(default = "default_positive")]
    positive: Vec<String>,
    /// Words that count −1 each.
    #[serde(default = "default_negative")]
    negative: Vec<String>,
    /// Divide by the response's number of words, so a long response is not favoured.
    #[serde(default)]
    per_word: bool,
}

fn words(list: &str) -> Vec<String> {
    list.split_whitespace().map(str::to_owned).collect()
}

fn default_positive() -> Vec<String> {
    words("happy glad fun smiled smile laughed love loved kind friend friends good great nice proud")
}

fn default_negative() -> Vec<String> {
    words("sad angry cried cry scared afraid bad mad lost broke hurt lonely")
}

pub struct Sentiment {
    positive: HashSet<String>,
    negative: HashSet<String>,
    per_word: bool,
}

impl Sentiment {
    fn score_one(&self, text: &str) -> f64 {
        let tokens: Vec<String> = text
            .split_whitespace()
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase())
            .filter(|w| !w.is_empty())
            .collect();
        let count = |set: &HashSet<String>| tokens.iter().filter(|w| set.contains(*w)).count() as f64;
        let raw = count(&self.positive) - count(&self.negative);
        if self.per_word {
            raw / tokens.len().max(1) as f64
        } else {
            raw
        }
    }
}

impl RewardModel for Sentiment {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        Ok(pairs.iter().map(|p| self.score_one(&p.response)).collect())
    }
}

impl Reward for Sentiment {
    const NAME: &'static str = "sentiment";
    const DESCRIPTION: &'static str = "Positive minus negative words of a lexicon in the response";
    type Config = SentimentConfig;

    fn validate(c: &SentimentConfig, _: &ValidateContext) -> Result<()> {
        for (key, list) in [("positive", &c.positive), ("negative", &c.negative)] {
            if let Some((i, w)) =
                list.iter().enumerate().find(|(_, w)| w.trim().is_empty() || w.contains(char::is_whitespace))
            {
                return Err(Error::config(format!("{key}[{i}]"), format!("expected one word, found `{w}`")));
            }
        }
        if let Some(both) = c.positive.iter().find(|w| c.negative.iter().any(|n| n.eq_ignore_ascii_case(w))) {
            return Err(Error::config("negative", format!("`{both}` is in both lists")));
        }
        Ok(())
    }

    /// A lexicon needs nothing of the run; a learned reward would load its model on
    /// `ctx.device()` here, and a remote one would start its runtime.
    fn new(c: SentimentConfig, _ctx: &RewardContext) -> Result<Self> {
        let set = |list: Vec<String>| list.into_iter().map(|w| w.to_lowercase()).collect();
        Ok(Self { positive: set(c.positive), negative: set(c.negative), per_word: c.per_word })
    }
}

plumb_core::export_plugin! {
    name: "lexicon",
    version: "0.1.0",
    description: "Example out-of-tree reward: a sentiment lexicon",
    stages: [],
    evaluators: [],
    rewards: [Sentiment],
}

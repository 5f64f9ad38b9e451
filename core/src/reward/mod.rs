//! Rewards: anything that scores finished (prompt, response) pairs.
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | the pair and the [`RewardModel`] trait |
//! | `set.rs` | a weighted set of the recipe's rewards a stage scores with ([`RewardSet`]) |
//! | `answer.rs` | final answers read out of text, numbers in one canonical form |
//!
//! A reward a plugin provides implements [`crate::plugin::Reward`] on top of
//! [`RewardModel`]; a stage reaches it by the name the recipe gives it, through the host
//! ([`RunContext::reward`](crate::context::RunContext::reward), or several weighted with
//! [`RewardSet`]).
use serde::{Deserialize, Serialize};

use crate::error::Result;

pub mod answer;
pub mod set;

pub use set::{RewardSet, RewardWeights, Scored, WeightedReward};

/// One finished exchange to score.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScorePair {
    pub prompt: String,
    pub response: String,
    /// The reference answer the prompt carries (e.g. a math problem's final answer), for
    /// verifiable rewards; rollouts fill it from the prompt file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

impl ScorePair {
    /// A pair without a reference answer.
    pub fn new(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        Self { prompt: prompt.into(), response: response.into(), reference: None }
    }

    /// The same pair, carrying `reference` (e.g. the expected final answer).
    pub fn with_reference(mut self, reference: impl Into<String>) -> Self {
        self.reference = Some(reference.into());
        self
    }
}

/// Scores finished (prompt, response) pairs, one number each, higher is better.
///
/// Learned reward models (a transformer with a scalar head), rule-based or verifiable
/// rewards (exact answer, format checks) and remote scorers implement the same trait;
/// a reward provided by another plugin is reached through
/// [`RunContext::reward`](crate::context::RunContext::reward), which implements it too.
/// The batch is the unit of work, so a slow or remote scorer overlaps its requests
/// inside one call.
pub trait RewardModel {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>>;
}

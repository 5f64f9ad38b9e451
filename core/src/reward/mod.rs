//! Rewards: anything that scores finished (prompt, response) pairs.
pub mod answer;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One finished exchange to score.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScorePair {
    pub prompt: String,
    pub response: String,
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

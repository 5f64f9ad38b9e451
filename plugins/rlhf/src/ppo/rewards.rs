//! The rewards a PPO run scores its episodes with: one name from the recipe's `rewards:`,
//! or a weighted list of them, reached through the host whichever plugin provides them.
use plumb_core::reward::{RewardModel, ScorePair};
use plumb_core::{Error, Result, RunContext};
use serde::Deserialize;

/// `reward: exact` or `reward: [{name: rm, weight: 1.0}, {name: format, weight: 0.5}]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RewardWeights {
    One(String),
    Weighted(Vec<WeightedReward>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedReward {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Each episode's weighted total, and each reward's own scores (logged apart).
pub struct Scored {
    pub total: Vec<f64>,
    pub parts: Vec<(String, Vec<f64>)>,
}

impl RewardWeights {
    pub fn parts(&self) -> Vec<WeightedReward> {
        match self {
            Self::One(name) => vec![WeightedReward { name: name.clone(), weight: 1.0 }],
            Self::Weighted(parts) => parts.clone(),
        }
    }

    /// At least one reward, each named once, with a finite weight.
    pub fn validate(&self, key: &str) -> Result<()> {
        let parts = self.parts();
        if parts.is_empty() {
            return Err(Error::config(key, "expected a reward name or a list of {name, weight}; found an empty list"));
        }
        for (i, part) in parts.iter().enumerate() {
            if part.name.trim().is_empty() {
                return Err(Error::config(&format!("{key}[{i}].name"), "expected the name of a reward in `rewards:`"));
            }
            if !part.weight.is_finite() {
                return Err(Error::config(&format!("{key}[{i}].weight"), "expected a finite number"));
            }
            if parts[..i].iter().any(|p| p.name == part.name) {
                return Err(Error::config(&format!("{key}[{i}].name"), format!("`{}` is listed twice", part.name)));
            }
        }
        Ok(())
    }

    /// Asks the host for each reward with an empty batch, so a name the recipe does not
    /// define is an error before any model is loaded.
    pub fn check_defined(&self, ctx: &RunContext, key: &str) -> Result<()> {
        for part in self.parts() {
            ctx.reward(&part.name).score(&[]).map_err(|e| Error::config(key, e.to_string()))?;
        }
        Ok(())
    }

    /// Scores `pairs` with every reward; an error names the reward that failed.
    pub fn score(&self, ctx: &RunContext, pairs: &[ScorePair]) -> Result<Scored> {
        let mut total = vec![0.0; pairs.len()];
        let mut parts = Vec::new();
        for part in self.parts() {
            let scores = ctx.reward(&part.name).score(pairs)?;
            if scores.len() != pairs.len() {
                return Err(Error::Other(format!(
                    "reward `{}` returned {} scores for {} episodes",
                    part.name,
                    scores.len(),
                    pairs.len()
                )));
            }
            if let Some(bad) = scores.iter().find(|s| !s.is_finite()) {
                return Err(Error::Other(format!("reward `{}` returned a non-finite score {bad}", part.name)));
            }
            for (t, s) in total.iter_mut().zip(&scores) {
                *t += part.weight * s;
            }
            parts.push((part.name, scores));
        }
        Ok(Scored { total, parts })
    }
}

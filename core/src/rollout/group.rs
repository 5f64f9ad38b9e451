//! Group-relative advantages (GRPO, Shao et al. 2024, <https://arxiv.org/abs/2402.03300>;
//! TRL's `GRPOTrainer`): each prompt is answered G times, and each completion's advantage
//! is its reward against the others of its group, A = (r − mean_group) / (std + 1e-4), with
//! the standard deviation of the group, of the whole batch, or none (Dr. GRPO,
//! <https://arxiv.org/abs/2503.20783>, drops it as a bias towards easy and hard prompts).
use serde::{Deserialize, Serialize};

/// What the centred rewards are divided by (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// The standard deviation of the completion's own group (+ 1e-4).
    #[default]
    Group,
    /// The standard deviation of every reward of the batch (+ 1e-4).
    Batch,
    /// Nothing: A = r − mean_group.
    None,
}

/// Advantages of a batch of groups and what they say about the rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    /// One per completion, in the rewards' order.
    pub advantages: Vec<f64>,
    /// Each group's mean reward.
    pub means: Vec<f64>,
    /// Each group's standard deviation (with Bessel's correction, as `torch.std`).
    pub stds: Vec<f64>,
}

impl GroupAdvantages {
    /// Groups whose rewards are all equal (std 0): they teach nothing, every advantage 0.
    pub fn zero_std(&self) -> Vec<bool> {
        self.stds.iter().map(|s| s.abs() < 1e-8).collect()
    }

    /// The share of groups whose rewards are all equal (TRL's `frac_reward_zero_std`).
    pub fn frac_zero_std(&self) -> f64 {
        let zero = self.zero_std();
        zero.iter().filter(|z| **z).count() as f64 / zero.len().max(1) as f64
    }
}

/// The advantages of `rewards`, consecutive groups of `group_size` completions of one
/// prompt each (`rewards.len()` a multiple of `group_size`, at least 2: a stage's
/// validation sees to it; a last partial group would be a group of its own).
pub fn group_advantages(rewards: &[f64], group_size: usize, scale: ScaleRewards) -> GroupAdvantages {
    debug_assert!(group_size >= 2 && rewards.len().is_multiple_of(group_size), "whole groups of at least two");
    let (means, stds): (Vec<f64>, Vec<f64>) = rewards.chunks(group_size).map(mean_std).unzip();
    let batch_std = mean_std(rewards).1;
    let advantages = rewards
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (g, centred) = (i / group_size, r - means[i / group_size]);
            match scale {
                ScaleRewards::Group => centred / (stds[g] + 1e-4),
                ScaleRewards::Batch => centred / (batch_std + 1e-4),
                ScaleRewards::None => centred,
            }
        })
        .collect();
    GroupAdvantages { advantages, means, stds }
}

/// Mean and standard deviation with Bessel's correction (0 for one value).
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let squares = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
    (mean, if values.len() > 1 { (squares / (n - 1.0)).sqrt() } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f64], expected: &[f64]) {
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-9, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn advantages_by_hand_for_each_scaling() {
        // Two groups of 3: [1, 0, 0] (mean 1/3, std √(1/3)) and [2, 2, 2] (std 0).
        let rewards = [1.0, 0.0, 0.0, 2.0, 2.0, 2.0];
        let group = group_advantages(&rewards, 3, ScaleRewards::Group);
        let s = (1.0f64 / 3.0).sqrt() + 1e-4;
        close(&group.advantages, &[(2.0 / 3.0) / s, (-1.0 / 3.0) / s, (-1.0 / 3.0) / s, 0.0, 0.0, 0.0]);
        close(&group.means, &[1.0 / 3.0, 2.0]);
        close(&group.stds, &[(1.0f64 / 3.0).sqrt(), 0.0]);
        assert_eq!(group.zero_std(), [false, true]);
        assert_eq!(group.frac_zero_std(), 0.5);
        // The batch's std: mean 7/6, Σ(r − 7/6)² = 1/36 + 3·49/36 + … = 4.8333.., /5.
        let batch_std = ((1.0f64 / 36.0 + 2.0 * 49.0 / 36.0 + 3.0 * 25.0 / 36.0) / 5.0).sqrt();
        let batch = group_advantages(&rewards, 3, ScaleRewards::Batch);
        close(
            &batch.advantages,
            &[
                (2.0 / 3.0) / (batch_std + 1e-4),
                (-1.0 / 3.0) / (batch_std + 1e-4),
                (-1.0 / 3.0) / (batch_std + 1e-4),
                0.0,
                0.0,
                0.0,
            ],
        );
        let none = group_advantages(&rewards, 3, ScaleRewards::None);
        close(&none.advantages, &[2.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0, 0.0]);
    }
}

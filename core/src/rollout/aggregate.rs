//! How a per-token loss (B, R) becomes the scalar of one update, as TRL's `GRPOTrainer`
//! aggregates it (`loss_type`). An update may be computed over several micro-batches
//! whose gradients accumulate: [`aggregate`] returns one micro-batch's share, so the
//! shares of an update's micro-batches add up to its loss.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The aggregation (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Each sequence's mean over its tokens, then the mean over sequences (GRPO's paper):
    /// a token of a short completion weighs more than one of a long one.
    Grpo,
    /// The mean over the tokens of each micro-batch, then over the micro-batches.
    Bnpo,
    /// The sum over tokens / (sequences · max_completion_length) (Dr. GRPO): no length bias.
    DrGrpo,
    /// The mean over every token of the update (DAPO's token-level loss).
    #[default]
    Dapo,
}

/// The size of one update: what the aggregations normalise by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateSize {
    /// Sequences in the update (all its micro-batches).
    pub sequences: usize,
    /// Real tokens in the update (all its micro-batches).
    pub tokens: f64,
    /// The longest completion allowed (Dr. GRPO's constant).
    pub max_completion_length: usize,
}

/// One micro-batch's share of the update's loss: `per_token` (B, R) over the real tokens
/// (`mask` 1), aggregated as `how` says, for an update of `update` size.
pub fn aggregate(per_token: &Tensor, mask: &Tensor, how: LossAggregation, update: UpdateSize) -> Tensor {
    let masked = per_token * mask; // (B, R)
    let sequences = update.sequences as f64;
    match how {
        LossAggregation::Grpo => {
            let lengths = mask.sum_dim_intlist([1].as_slice(), false, Kind::Float).clamp_min(1.0); // (B)
            (masked.sum_dim_intlist([1].as_slice(), false, Kind::Float) / lengths).sum(Kind::Float) / sequences
        }
        LossAggregation::Bnpo => {
            let share = per_token.size()[0] as f64 / sequences;
            masked.sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0) * share
        }
        LossAggregation::DrGrpo => masked.sum(Kind::Float) / (sequences * update.max_completion_length as f64),
        LossAggregation::Dapo => masked.sum(Kind::Float) / update.tokens.max(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(t: &Tensor) -> f64 {
        f64::try_from(t).unwrap()
    }

    #[test]
    fn every_aggregation_by_hand_and_micro_batches_add_up() {
        // Row 0: tokens 1, 2, 3 (mean 2); row 1: token 4 (mean 4); 9.0 is past the end.
        let loss = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 9.0, 9.0]).view([2, 3]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0, 0.0, 0.0]).view([2, 3]);
        let size = UpdateSize { sequences: 2, tokens: 4.0, max_completion_length: 5 };
        let got = |how| value(&aggregate(&loss, &mask, how, size));
        assert!((got(LossAggregation::Grpo) - 3.0).abs() < 1e-6); // (2 + 4) / 2
        assert!((got(LossAggregation::Bnpo) - 2.5).abs() < 1e-6); // 10 / 4
        assert!((got(LossAggregation::DrGrpo) - 1.0).abs() < 1e-6); // 10 / (2 · 5)
        assert!((got(LossAggregation::Dapo) - 2.5).abs() < 1e-6); // 10 / 4

        // The same update in two micro-batches of one row each.
        let parts = |how| -> f64 {
            (0..2).map(|i| value(&aggregate(&loss.narrow(0, i, 1), &mask.narrow(0, i, 1), how, size))).sum()
        };
        assert!((parts(LossAggregation::Grpo) - 3.0).abs() < 1e-6);
        assert!((parts(LossAggregation::DrGrpo) - 1.0).abs() < 1e-6);
        assert!((parts(LossAggregation::Dapo) - 2.5).abs() < 1e-6);
        // BNPO: each micro-batch's token mean, averaged: (2 + 4) / 2.
        assert!((parts(LossAggregation::Bnpo) - 3.0).abs() < 1e-6);
    }
}

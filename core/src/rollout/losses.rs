//! PPO's clipped surrogate losses (Schulman et al. 2017, <https://arxiv.org/abs/1707.06347>)
//! over response tokens, with the statistics TRL reports for them.
use tch::{Kind, Tensor};

use super::masked::masked_mean;

/// The clipped policy loss of a minibatch and what it says about the update.
pub struct PolicyLoss {
    /// mean over real tokens of max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = π/π_old.
    pub loss: Tensor,
    /// Share of real tokens where the clipped term was the larger.
    pub clipfrac: Tensor,
    /// ½·mean((log π − log π_old)²) over real tokens.
    pub approx_kl: Tensor,
    /// Mean ρ over real tokens (1 at the first minibatch of the first epoch).
    pub ratio: Tensor,
}

/// See [`PolicyLoss`]; every tensor is (B, R), `mask` 1 on real tokens.
pub fn policy_loss(
    log_probs: &Tensor,
    old_log_probs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> PolicyLoss {
    let surrogate = clipped_surrogate(log_probs, old_log_probs, advantages, clip, clip);
    let loss = masked_mean(&surrogate.per_token, mask);
    let _no_grad = tch::no_grad_guard();
    PolicyLoss {
        loss,
        clipfrac: masked_mean(&surrogate.region_clipped(), mask),
        approx_kl: approx_kl(log_probs, old_log_probs, mask),
        ratio: masked_mean(&surrogate.ratio, mask),
    }
}

/// The clipped surrogate of each token, before any mean, and where its clip binds.
pub struct ClippedSurrogate {
    /// (B, R): −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), ρ = π/π_old.
    pub per_token: Tensor,
    /// (B, R): ρ (detached).
    pub ratio: Tensor,
    /// (B, R) 1.0 where ρ < 1 − ε_low and A < 0: the clip holds the ratio up.
    pub low_clipped: Tensor,
    /// (B, R) 1.0 where ρ > 1 + ε_high and A > 0: the clip holds the ratio down.
    pub high_clipped: Tensor,
}

impl ClippedSurrogate {
    /// 1.0 where either clip binds (no gradient flows through those tokens).
    pub fn region_clipped(&self) -> Tensor {
        (&self.low_clipped + &self.high_clipped).clamp_max(1.0)
    }
}

/// PPO's clipped surrogate per token with separate lower and upper clip ranges (DAPO's
/// clip-higher, <https://arxiv.org/abs/2503.14476>: ε_high > ε_low leaves unlikely tokens
/// room to grow). `advantages` is (B, R), or (B, 1) for one advantage per sequence.
pub fn clipped_surrogate(
    log_probs: &Tensor,
    old_log_probs: &Tensor,
    advantages: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> ClippedSurrogate {
    let ratio = (log_probs - old_log_probs).exp();
    let unclipped = advantages * &ratio;
    let clipped = advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high);
    let per_token = -unclipped.min_other(&clipped);
    let _no_grad = tch::no_grad_guard();
    let ratio = ratio.detach();
    let float = |t: Tensor| t.to_kind(Kind::Float);
    let low_clipped = float(ratio.lt(1.0 - eps_low).logical_and(&advantages.lt(0.0)));
    let high_clipped = float(ratio.gt(1.0 + eps_high).logical_and(&advantages.gt(0.0)));
    ClippedSurrogate { per_token, ratio, low_clipped, high_clipped }
}

/// ½·mean((log π − log π_old)²) over real tokens: TRL's `policy/approxkl`.
pub fn approx_kl(log_probs: &Tensor, old_log_probs: &Tensor, mask: &Tensor) -> Tensor {
    masked_mean(&(log_probs - old_log_probs).square(), mask) * 0.5
}

/// The clipped value loss of a minibatch.
pub struct ValueLoss {
    /// ½·mean over real tokens of max((V − R)², (clip(V, V_old ± ε) − R)²).
    pub loss: Tensor,
    /// Share of real tokens where the clipped term was the larger.
    pub clipfrac: Tensor,
}

/// See [`ValueLoss`]; every tensor is (B, R), `mask` 1 on real tokens.
pub fn value_loss(values: &Tensor, old_values: &Tensor, returns: &Tensor, mask: &Tensor, clip: f64) -> ValueLoss {
    let clipped_values = values.clamp_tensor(Some(old_values - clip), Some(old_values + clip));
    let unclipped = (values - returns).square();
    let clipped = (clipped_values - returns).square();
    let loss = masked_mean(&unclipped.max_other(&clipped), mask) * 0.5;
    let _no_grad = tch::no_grad_guard();
    ValueLoss { loss, clipfrac: masked_mean(&clipped.gt_tensor(&unclipped).to_kind(Kind::Float), mask) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).view([1, values.len() as i64])
    }

    fn value(t: &Tensor) -> f64 {
        f64::try_from(t).unwrap()
    }

    #[test]
    fn clipped_policy_loss_by_hand() {
        // The third token is past the end: its huge advantage and ratio count for nothing.
        let log_probs = row(&[-1.0, -0.5, -2.0]);
        let old = row(&[-1.2, -0.5, -0.1]);
        let advantages = row(&[1.0, -2.0, 5.0]);
        let mask = row(&[1.0, 1.0, 0.0]);
        let out = policy_loss(&log_probs, &old, &advantages, &mask, 0.2);
        // ρ = [e^0.2 = 1.2214028, 1]; −Aρ = [−1.2214028, 2]; −A·clip(ρ) = [−1.2, 2];
        // max = [−1.2, 2] → loss 0.4; clipped larger on the first token only → 0.5.
        assert!((value(&out.loss) - 0.4).abs() < 1e-6);
        assert!((value(&out.clipfrac) - 0.5).abs() < 1e-7);
        assert!((value(&out.approx_kl) - 0.01).abs() < 1e-6); // ½·(0.04 + 0)/2
        assert!((value(&out.ratio) - (0.2f64.exp() + 1.0) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn clip_higher_by_hand() {
        // ρ = e^0.2 = 1.221 with A > 0: above 1 + 0.2 but below 1 + 0.28, so clip-higher
        // lets it through; ρ = e^-0.3 = 0.741 with A < 0 is held at 1 − 0.2 = 0.8.
        let log_probs = row(&[-0.8, -1.3, -1.0]);
        let old = row(&[-1.0, -1.0, -1.0]);
        let advantages = row(&[2.0, -1.0, 0.5]);
        let s = clipped_surrogate(&log_probs, &old, &advantages, 0.2, 0.28);
        let got = Vec::<f64>::try_from(s.per_token.view([-1]).to_kind(Kind::Double)).unwrap();
        // −min(ρA, clip(ρ)A): [−2·e^0.2, −min(−0.741, −0.8) = 0.8, −0.5]
        let expected = [-2.0 * 0.2f64.exp(), 0.8, -0.5];
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
        assert_eq!(Vec::<f32>::try_from(s.low_clipped.view([-1])).unwrap(), [0.0, 1.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(s.high_clipped.view([-1])).unwrap(), [0.0, 0.0, 0.0]);
        // Symmetric ε = 0.2 clips the first token too: −2·1.2.
        let s = clipped_surrogate(&log_probs, &old, &advantages, 0.2, 0.2);
        assert!((Vec::<f64>::try_from(s.per_token.view([-1]).to_kind(Kind::Double)).unwrap()[0] + 2.4).abs() < 1e-5);
        assert_eq!(Vec::<f32>::try_from(s.high_clipped.view([-1])).unwrap(), [1.0, 0.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(s.region_clipped().view([-1])).unwrap(), [1.0, 1.0, 0.0]);
        // One advantage per sequence broadcasts over its tokens.
        let one = Tensor::from_slice(&[1.0f32]).view([1, 1]);
        assert_eq!(clipped_surrogate(&log_probs, &old, &one, 0.2, 0.28).per_token.size(), [1, 3]);
    }

    #[test]
    fn clipped_value_loss_by_hand() {
        let values = row(&[0.5, 1.0, 7.0]);
        let old = row(&[0.2, 0.9, 0.0]);
        let returns = row(&[1.0, 0.0, 0.0]);
        let mask = row(&[1.0, 1.0, 0.0]);
        let out = value_loss(&values, &old, &returns, &mask, 0.2);
        // clip(V) = [0.4, 1.0]; (V−R)² = [0.25, 1]; (clip(V)−R)² = [0.36, 1]; max = [0.36, 1]
        // → ½·0.68 = 0.34; clipped larger on the first token only → 0.5.
        assert!((value(&out.loss) - 0.34).abs() < 1e-6);
        assert!((value(&out.clipfrac) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn gradients_flow_only_through_the_unclipped_real_tokens() {
        let log_probs = row(&[-1.0, -0.5, -2.0]).set_requires_grad(true);
        let out =
            policy_loss(&log_probs, &row(&[-1.2, -0.5, -0.1]), &row(&[1.0, -2.0, 5.0]), &row(&[1.0, 1.0, 0.0]), 0.2);
        out.loss.backward();
        // Token 0 is clipped (no gradient), token 2 is past the end; token 1: d/dlogπ (−Aρ)/2 = 2·1/2 = 1.
        assert_eq!(Vec::<f32>::try_from(log_probs.grad().view([-1])).unwrap(), [0.0, 1.0, 0.0]);
    }
}

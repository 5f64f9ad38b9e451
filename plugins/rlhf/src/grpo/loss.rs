//! GRPO's loss on one micro-batch of completions (TRL's `GRPOTrainer._compute_loss`):
//! per token, the clipped surrogate with clip-higher, plus β times the k3 estimate of
//! KL(π ‖ π_ref) when β > 0, aggregated over tokens and sequences as `loss_type` says.
//! The policy's log-probs come through core's chunked head
//! ([`plumb_core::rollout::policy_response_scores`]): the (B, R, V) logits never exist whole.
use plumb_core::model::Policy;
use plumb_core::rollout::{
    aggregate, clipped_surrogate, kl_penalty, masked_mean, policy_response_scores, Experience, KlEstimator,
    LossAggregation, UpdateSize,
};
use plumb_core::tch::{self, Kind, Tensor};
use plumb_core::Result;

/// The settings of the loss (TRL's names).
#[derive(Debug, Clone, Copy)]
pub struct GrpoLossSettings {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    pub loss_type: LossAggregation,
    pub temperature: f64,
}

/// What one micro-batch's loss says, as numbers (masked means over its real tokens).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpoLossStats {
    pub loss: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    pub kl: f64,
    pub entropy: f64,
}

/// The per-token loss (B, R) from the current log-probs, the sampling ones (`old`), the
/// reference's and the advantages ((B, R) or (B, 1)), with TRL's clip ratios and the KL
/// (masked means over `mask`). No aggregation yet.
pub fn per_token_loss(
    log_probs: &Tensor,
    old_log_probs: &Tensor,
    ref_log_probs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    settings: &GrpoLossSettings,
) -> (Tensor, [Tensor; 4]) {
    let surrogate =
        clipped_surrogate(log_probs, old_log_probs, advantages, settings.epsilon_low, settings.epsilon_high);
    let kl = kl_penalty(log_probs, ref_log_probs, mask, KlEstimator::K3); // (B, R), 0 past the end
    let per_token = if settings.beta > 0.0 {
        &surrogate.per_token + &kl * settings.beta
    } else {
        surrogate.per_token.shallow_clone()
    };
    let _no_grad = tch::no_grad_guard();
    let clips = [
        masked_mean(&surrogate.low_clipped, mask),
        masked_mean(&surrogate.high_clipped, mask),
        masked_mean(&surrogate.region_clipped(), mask),
        masked_mean(&kl.detach(), mask),
    ];
    (per_token, clips)
}

/// The loss of `part` (a micro-batch of the update `update`) under the current `policy`:
/// its share of the update's loss (see [`aggregate`]), and its statistics.
pub fn micro_batch_loss(
    policy: &dyn Policy,
    part: &Experience,
    settings: &GrpoLossSettings,
    update: UpdateSize,
) -> Result<(Tensor, GrpoLossStats)> {
    let mask = &part.response_mask;
    let (sequences, attention) = (&part.sequences, &part.attention_mask);
    let scores = policy_response_scores(policy, sequences, attention, part.prompt_len, settings.temperature, true)?;
    let log_probs = scores.log_probs; // (B, R)
    let entropy = scores.entropy.unwrap_or_else(|| log_probs.zeros_like()); // (B, R), no gradient
    let (per_token, [low, high, region, kl]) =
        per_token_loss(&log_probs, &part.log_probs, &part.ref_log_probs, &part.advantages, mask, settings);
    let loss = aggregate(&per_token, mask, settings.loss_type, update);
    let _no_grad = tch::no_grad_guard();
    let scalars = Tensor::stack(&[loss.detach(), low, high, region, kl, masked_mean(&entropy.detach(), mask)], 0);
    let v = Vec::<f64>::try_from(scalars.to_kind(Kind::Double).to_device(tch::Device::Cpu))?; // one copy to the host
    let nan_free = |x: f64| if x.is_nan() { 0.0 } else { x }; // a micro-batch with every token masked
    let stats = GrpoLossStats {
        loss: v[0],
        clip_low: nan_free(v[1]),
        clip_high: nan_free(v[2]),
        clip_region: nan_free(v[3]),
        kl: nan_free(v[4]),
        entropy: nan_free(v[5]),
    };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).view([1, values.len() as i64])
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.view([-1]).to_kind(Kind::Double)).unwrap()
    }

    #[test]
    fn the_per_token_loss_with_clip_higher_and_the_k3_kl_by_hand() {
        // Three tokens, the third past the end. ρ = [e^0.2, e^-0.3, 1]; A = 1 for the sequence.
        let log_probs = row(&[-0.8, -1.3, -1.0]);
        let old = row(&[-1.0, -1.0, -1.0]);
        let reference = row(&[-1.0, -1.0, -5.0]);
        let advantages = Tensor::from_slice(&[1.0f32]).view([1, 1]);
        let mask = row(&[1.0, 1.0, 0.0]);
        let settings = GrpoLossSettings {
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            beta: 0.04,
            loss_type: LossAggregation::Grpo,
            temperature: 1.0,
        };
        let (per_token, [low, high, region, kl]) =
            per_token_loss(&log_probs, &old, &reference, &advantages, &mask, &settings);
        // Surrogate: −min(ρA, clip(ρ)A) = [−e^0.2 (inside 1.28), −e^-0.3 (A > 0: unclipped below)].
        // k3 with x = ref − logp: e^x − x − 1: x = −0.2 → 0.0187308; x = 0.3 → 0.0498588.
        let k3 = |x: f64| x.exp() - x - 1.0;
        let expected = [-(0.2f64.exp()) + 0.04 * k3(-0.2), -((-0.3f64).exp()) + 0.04 * k3(0.3)];
        let got = values(&per_token);
        assert!((got[0] - expected[0]).abs() < 1e-6 && (got[1] - expected[1]).abs() < 1e-6, "{got:?} vs {expected:?}");
        assert!((values(&kl)[0] - (k3(-0.2) + k3(0.3)) / 2.0).abs() < 1e-6);
        assert_eq!((values(&low)[0], values(&high)[0], values(&region)[0]), (0.0, 0.0, 0.0));
        // GRPO's aggregation: the row's mean over its two tokens.
        let size = UpdateSize { sequences: 1, tokens: 2.0, max_completion_length: 3 };
        let loss = aggregate(&per_token, &mask, LossAggregation::Grpo, size);
        assert!((f64::try_from(&loss).unwrap() - (expected[0] + expected[1]) / 2.0).abs() < 1e-6);
        // Dr. GRPO divides the sum by one sequence of max_completion_length 3 instead.
        let loss = aggregate(&per_token, &mask, LossAggregation::DrGrpo, size);
        assert!((f64::try_from(&loss).unwrap() - (expected[0] + expected[1]) / 3.0).abs() < 1e-6);

        // With ε_high = 0.2 the first token is clipped above (A > 0): −1.2, and counted.
        let symmetric = GrpoLossSettings { epsilon_high: 0.2, beta: 0.0, ..settings };
        let (per_token, [_, high, region, _]) =
            per_token_loss(&log_probs, &old, &reference, &advantages, &mask, &symmetric);
        assert!((values(&per_token)[0] + 1.2).abs() < 1e-6);
        assert_eq!((values(&high)[0], values(&region)[0]), (0.5, 0.5));
    }
}

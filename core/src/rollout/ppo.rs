//! The PPO parts that are more than one formula: rewards shaped by the KL penalty with
//! the score at each response's last token, and the loss of one minibatch with the
//! statistics TRL reports for it. A stage's loop calls them in order; the `plumb bench
//! ppo` loop calls the same ones.
use tch::{Kind, Tensor};

use super::experience::Experience;
use super::kl::{kl_penalty, KlEstimator};
use super::losses::{policy_loss, value_loss};
use super::masked::masked_mean;
use super::sample::{policy_response_scores, response_values};
use crate::error::Result;
use crate::model::scalar_head::ScalarHeadModel;
use crate::model::Policy;

/// Per-token rewards (B, R) of `experience`: −β·KL at every response token, and each
/// episode's score added at its last response token. Returns (rewards, kl (B, R)).
pub fn shaped_rewards(experience: &Experience, kl_coef: f64, estimator: KlEstimator) -> (Tensor, Tensor) {
    let _no_grad = tch::no_grad_guard();
    let mask = &experience.response_mask;
    let kl = kl_penalty(&experience.log_probs, &experience.ref_log_probs, mask, estimator);
    let last = (mask.sum_dim_intlist([1].as_slice(), false, Kind::Int64) - 1).clamp_min(0).unsqueeze(1); // (B, 1)
    let score_at_end = mask.zeros_like().scatter(1, &last, &experience.scores.to_kind(Kind::Float).unsqueeze(1));
    (-(&kl * kl_coef) + score_at_end, kl)
}

/// The settings of a PPO update (TRL's names in brackets).
#[derive(Debug, Clone, Copy)]
pub struct PpoLossSettings {
    /// ε of the policy ratio's clip (`cliprange`).
    pub clip: f64,
    /// ε of the value clip around the rollout's values (`cliprange_value`).
    pub clip_value: f64,
    /// Weight of the value loss in the total (`vf_coef`).
    pub vf_coef: f64,
    /// The sampling temperature; training log-probs are taken at it too.
    pub temperature: f64,
}

/// What one minibatch's update says, as numbers (read after its backward).
#[derive(Debug, Clone, Copy, Default)]
pub struct MinibatchStats {
    pub loss: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub approx_kl: f64,
    pub clipfrac: f64,
    pub value_clipfrac: f64,
    pub entropy: f64,
    pub ratio: f64,
}

/// The PPO loss of `minibatch` (clipped policy loss + vf_coef · clipped value loss) under
/// the current `policy` and `value_model`, with its statistics. Backward it (scaled for
/// accumulation) before reading the next.
pub fn minibatch_loss(
    policy: &dyn Policy,
    value_model: &ScalarHeadModel,
    minibatch: &Experience,
    settings: &PpoLossSettings,
) -> Result<(Tensor, MinibatchStats)> {
    let mask = &minibatch.response_mask;
    let (sequences, attention) = (&minibatch.sequences, &minibatch.attention_mask);
    let scores =
        policy_response_scores(policy, sequences, attention, minibatch.prompt_len, settings.temperature, true)?;
    let log_probs = scores.log_probs; // (B, R)
    let entropy = scores.entropy.unwrap_or_else(|| log_probs.zeros_like());
    let values = response_values(value_model, &minibatch.sequences, &minibatch.attention_mask, minibatch.prompt_len)?;
    let policy_part = policy_loss(&log_probs, &minibatch.log_probs, &minibatch.advantages, mask, settings.clip);
    let value_part = value_loss(&values, &minibatch.values, &minibatch.returns, mask, settings.clip_value);
    let loss = &policy_part.loss + &value_part.loss * settings.vf_coef;
    let stats = {
        let _no_grad = tch::no_grad_guard();
        let scalars = Tensor::stack(
            &[
                loss.detach(),
                policy_part.loss.detach(),
                value_part.loss.detach(),
                policy_part.approx_kl,
                policy_part.clipfrac,
                value_part.clipfrac,
                masked_mean(&entropy, mask),
                policy_part.ratio,
            ],
            0,
        );
        // One device-to-host copy for all eight.
        let v = Vec::<f64>::try_from(scalars.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
        MinibatchStats {
            loss: v[0],
            policy_loss: v[1],
            value_loss: v[2],
            approx_kl: v[3],
            clipfrac: v[4],
            value_clipfrac: v[5],
            entropy: v[6],
            ratio: v[7],
        }
    };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_lands_on_the_last_response_token_beside_the_kl_penalty() {
        // Two episodes, R = 3; the second ends after one token.
        let row = |v: &[f32]| Tensor::from_slice(v).view([2, 3]);
        let experience = Experience {
            sequences: Tensor::zeros([2, 4], (Kind::Int64, tch::Device::Cpu)),
            attention_mask: Tensor::ones([2, 4], (Kind::Int64, tch::Device::Cpu)),
            prompt_len: 1,
            response_mask: row(&[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
            log_probs: row(&[-1.0, -1.0, -1.0, -2.0, -7.0, -7.0]),
            ref_log_probs: row(&[-1.5, -1.0, -0.5, -1.0, -1.0, -1.0]),
            values: row(&[0.0; 6]),
            scores: Tensor::from_slice(&[2.0f32, -3.0]),
            rewards: row(&[0.0; 6]),
            advantages: row(&[0.0; 6]),
            returns: row(&[0.0; 6]),
        };
        let (rewards, kl) = shaped_rewards(&experience, 0.1, KlEstimator::K1);
        assert_eq!(Vec::<f32>::try_from(kl.view([-1])).unwrap(), [0.5, 0.0, -0.5, -1.0, 0.0, 0.0]);
        // −0.1·kl, then +2 at the first row's third token, −3 at the second row's first.
        let expected = [-0.05f32, 0.0, 2.05, -2.9, 0.0, 0.0];
        for (got, want) in Vec::<f32>::try_from(rewards.view([-1])).unwrap().iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{rewards}");
        }
    }
}

//! The PPO parts that are more than one formula: rewards shaped by the KL penalty with
//! the score at each response's last token, and the loss of one minibatch with the
//! statistics TRL reports for it (whole, or with the two models side by side). A stage's
//! loop calls them in order; the `plumb bench ppo` loop calls the same ones.
use tch::{Kind, Tensor};

use super::experience::Experience;
use super::kl::{kl_penalty, KlEstimator};
use super::losses::{policy_loss, value_loss, PolicyLoss, ValueLoss};
use super::masked::masked_mean;
use super::sample::{policy_response_scores, response_values, Sampled};
use crate::error::Result;
use crate::model::scalar_head::ScalarHeadModel;
use crate::model::Policy;
use crate::train::{side_by_side, Precision};

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

/// The reference's log-probs and the value model's values (each (B, R), 0 past each
/// response's end) of `sampled`'s response tokens at `temperature`, without autograd. With
/// `side_by_side` (a single-process run on a CPU), the value model's forward runs on a
/// second thread meanwhile, each with one intra-op thread.
pub fn reference_and_values(
    reference: &dyn Policy,
    value_model: &ScalarHeadModel,
    sampled: &Sampled,
    temperature: f64,
    side_by_side: bool,
) -> Result<(Tensor, Tensor)> {
    let (sequences, attention, prompt_len) = (&sampled.sequences, &sampled.attention_mask, sampled.prompt_len);
    let mask = &sampled.response_mask;
    let reference_log_probs = || -> Result<Tensor> {
        let _no_grad = tch::no_grad_guard();
        Ok(policy_response_scores(reference, sequences, attention, prompt_len, temperature, false)?.log_probs * mask)
    };
    let values = |value_model: &ScalarHeadModel, sequences: &Tensor, attention: &Tensor, mask: &Tensor| {
        let _no_grad = tch::no_grad_guard();
        Ok::<_, crate::error::Error>(response_values(value_model, sequences, attention, prompt_len)? * mask)
    };
    if !side_by_side {
        let log_probs = reference_log_probs()?;
        return Ok((log_probs, values(value_model, sequences, attention, mask)?));
    }
    let lent = LentValueModel(value_model);
    let (sequences, attention, mask) = (sequences.shallow_clone(), attention.shallow_clone(), mask.shallow_clone());
    let (log_probs, values) = self::side_by_side(reference_log_probs, move || {
        let lent = lent;
        values(lent.0, &sequences, &attention, &mask)
    });
    Ok((log_probs?, values?))
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
    let policy_part = policy_half(policy, minibatch, settings)?;
    let value_part = value_half(value_model, minibatch, settings)?;
    let loss = &policy_part.loss.loss + &value_part.loss * settings.vf_coef;
    let stats = statistics(&policy_part, &value_part, &minibatch.response_mask, settings)?;
    Ok((loss, stats))
}

/// [`minibatch_loss`]'s forward and backward, its loss scaled by `scale` (a micro-batch's
/// share of an update), with the two models [`side_by_side`]: the value model's half on a
/// second thread. The same gradients and statistics. For a backward that nothing else
/// watches (see [`crate::train::Trainer::halves_side_by_side`]); each half's forward runs
/// in `precision`.
pub fn minibatch_backward_side_by_side(
    policy: &dyn Policy,
    value_model: &ScalarHeadModel,
    minibatch: &Experience,
    settings: &PpoLossSettings,
    precision: Precision,
    scale: f64,
) -> Result<MinibatchStats> {
    let device = minibatch.sequences.device();
    let (lent, episodes) = (LentValueModel(value_model), minibatch.shallow_clone());
    let settings = *settings;
    let (policy_part, value_part) = side_by_side(
        || -> Result<PolicyHalf> {
            let part = precision.forward(device, || policy_half(policy, minibatch, &settings))??;
            (&part.loss.loss * scale).f_backward()?;
            Ok(part)
        },
        move || -> Result<ValueLoss> {
            let lent = lent;
            let part = precision.forward(device, || value_half(lent.0, &episodes, &settings))??;
            (&part.loss * (settings.vf_coef * scale)).f_backward()?;
            Ok(part)
        },
    );
    statistics(&policy_part?, &value_part?, &minibatch.response_mask, &settings)
}

/// The value model, lent to the thread that runs its half of a minibatch (or its forward).
struct LentValueModel<'a>(&'a ScalarHeadModel);

// SAFETY: libtorch's tensors may be used from any thread. While the value half (or forward)
// runs, only its thread touches the value model (its weights, their gradients, its blocks'
// shared handles); the other thread touches the policy (or the reference), and both only
// read the minibatch (or the sampled tokens).
unsafe impl Send for LentValueModel<'_> {}

/// The policy's half of a minibatch: its clipped loss and the entropy at each token.
struct PolicyHalf {
    loss: PolicyLoss,
    entropy: Tensor,
}

fn policy_half(policy: &dyn Policy, minibatch: &Experience, settings: &PpoLossSettings) -> Result<PolicyHalf> {
    let (sequences, attention) = (&minibatch.sequences, &minibatch.attention_mask);
    let scores =
        policy_response_scores(policy, sequences, attention, minibatch.prompt_len, settings.temperature, true)?;
    let log_probs = scores.log_probs; // (B, R)
    let entropy = scores.entropy.unwrap_or_else(|| log_probs.zeros_like());
    let loss =
        policy_loss(&log_probs, &minibatch.log_probs, &minibatch.advantages, &minibatch.response_mask, settings.clip);
    Ok(PolicyHalf { loss, entropy })
}

fn value_half(value_model: &ScalarHeadModel, minibatch: &Experience, settings: &PpoLossSettings) -> Result<ValueLoss> {
    let values = response_values(value_model, &minibatch.sequences, &minibatch.attention_mask, minibatch.prompt_len)?;
    Ok(value_loss(&values, &minibatch.values, &minibatch.returns, &minibatch.response_mask, settings.clip_value))
}

/// The numbers of a minibatch's update, in one device-to-host copy.
fn statistics(
    policy_part: &PolicyHalf,
    value_part: &ValueLoss,
    mask: &Tensor,
    settings: &PpoLossSettings,
) -> Result<MinibatchStats> {
    let _no_grad = tch::no_grad_guard();
    let (policy_loss, value_loss) = (policy_part.loss.loss.detach(), value_part.loss.detach());
    let scalars = Tensor::stack(
        &[
            &policy_loss + &value_loss * settings.vf_coef,
            policy_loss,
            value_loss,
            policy_part.loss.approx_kl.shallow_clone(),
            policy_part.loss.clipfrac.shallow_clone(),
            value_part.clipfrac.shallow_clone(),
            masked_mean(&policy_part.entropy, mask),
            policy_part.loss.ratio.shallow_clone(),
        ],
        0,
    );
    let v = Vec::<f64>::try_from(scalars.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
    Ok(MinibatchStats {
        loss: v[0],
        policy_loss: v[1],
        value_loss: v[2],
        approx_kl: v[3],
        clipfrac: v[4],
        value_clipfrac: v[5],
        entropy: v[6],
        ratio: v[7],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::LlamaForCausalLm;
    use tch::nn;

    /// A minibatch of 3 episodes (prompt 2, response 4, the last one ending early) whose
    /// advantages and old log-probs move the ratio off 1, so that both losses clip. Both
    /// whatever the models' weights: tests running beside these draw from the same global
    /// generator, so a seed does not fix them. The third episode's first value (old 1.5,
    /// return 0) clips for any new value below 1.3, and a fresh head's are near 0.
    fn minibatch(policy: &dyn Policy) -> Experience {
        let sequences = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]).view([3, 6]);
        let attention_mask = sequences.ones_like();
        let response_mask = Tensor::from_slice(&[1f32, 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.]).view([3, 4]);
        let log_probs = {
            let _no_grad = tch::no_grad_guard();
            let scores = policy_response_scores(policy, &sequences, &attention_mask, 2, 1.0, false).unwrap();
            scores.log_probs + Tensor::from_slice(&[0.3f32, -0.3, 0.0, 0.1]).view([1, 4])
        };
        let row = |v: &[f32]| Tensor::from_slice(v).view([3, 4]);
        Experience {
            sequences,
            attention_mask,
            prompt_len: 2,
            response_mask: response_mask.shallow_clone(),
            log_probs: &log_probs * &response_mask,
            ref_log_probs: log_probs.zeros_like(),
            values: row(&[0.5, -0.5, 0.2, 0.0, 1.0, 0.3, -0.2, 0.1, 1.5, 0.4, 0.0, 0.0]),
            scores: Tensor::from_slice(&[1f32, 0.0, -1.0]),
            rewards: log_probs.zeros_like(),
            advantages: row(&[1.0, -1.0, 0.5, 2.0, -0.5, 0.3, 1.2, -2.0, 0.7, -0.1, 0.0, 0.0]),
            returns: row(&[2.0, -1.0, 0.6, 0.1, 0.9, 0.3, 0.8, -1.5, 0.0, 0.4, 0.0, 0.0]),
        }
    }

    /// A tiny policy and a value model on its transformer (a fresh head), from `seed`.
    fn policy_and_value_model(seed: i64) -> (LlamaForCausalLm, ScalarHeadModel) {
        tch::manual_seed(seed);
        let config = serde_json::from_value(serde_json::json!({
            "vocab_size": 12, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let policy = LlamaForCausalLm::new(config, tch::Device::Cpu).unwrap();
        policy.save(dir.path()).unwrap();
        let value_model = ScalarHeadModel::from_causal_lm(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
        (policy, value_model)
    }

    fn gradients(models: &[&nn::VarStore]) -> Vec<(String, Tensor)> {
        let mut all = Vec::new();
        for (i, vs) in models.iter().enumerate() {
            for (name, t) in vs.variables() {
                all.push((format!("{i}.{name}"), t.grad().copy()));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn side_by_side_halves_give_the_gradients_and_statistics_of_the_whole_loss() {
        let (policy, value_model) = policy_and_value_model(0);
        let settings = PpoLossSettings { clip: 0.2, clip_value: 0.2, vf_coef: 0.1, temperature: 1.0 };
        let episodes = minibatch(&policy);
        let models = [policy.var_store(), value_model.var_store()];
        let zero = || {
            models.iter().flat_map(|vs| vs.trainable_variables()).for_each(|t| {
                let _ = t.grad().zero_();
            })
        };

        let (loss, whole) = minibatch_loss(&policy, &value_model, &episodes, &settings).unwrap();
        (loss * 0.5).backward();
        let expected = gradients(&models);
        zero();
        let halves =
            minibatch_backward_side_by_side(&policy, &value_model, &episodes, &settings, Precision::Fp32, 0.5).unwrap();
        let got = gradients(&models);

        assert!(whole.clipfrac > 0.0 && whole.value_clipfrac > 0.0, "{whole:?}");
        let pairs = [
            (whole.loss, halves.loss),
            (whole.policy_loss, halves.policy_loss),
            (whole.value_loss, halves.value_loss),
            (whole.approx_kl, halves.approx_kl),
            (whole.clipfrac, halves.clipfrac),
            (whole.value_clipfrac, halves.value_clipfrac),
            (whole.entropy, halves.entropy),
            (whole.ratio, halves.ratio),
        ];
        for (a, b) in pairs {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{whole:?}\n{halves:?}");
        }
        assert_eq!(expected.len(), got.len());
        for ((name, want), (_, have)) in expected.iter().zip(&got) {
            let scale = want.abs().max().double_value(&[]).max(1e-6);
            let diff = (want - have).abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * scale, "{name}: gradients differ by {diff} (largest {scale})");
            assert!(scale > 1e-6, "{name} has no gradient");
        }
    }

    #[test]
    fn reference_and_values_side_by_side_are_those_of_one_thread() {
        let (policy, value_model) = policy_and_value_model(4);
        // Prompts of two lengths (left padding); a stop token may end a response early.
        let settings = crate::model::GenerationSettings {
            max_new_tokens: 6,
            temperature: 1.0,
            seed: Some(7),
            stop_tokens: vec![3],
            ..Default::default()
        };
        let sampled = super::super::sample(&policy, &[vec![1, 2, 5], vec![4, 6]], &settings, 0).unwrap();
        let (log_probs, values) = reference_and_values(&policy, &value_model, &sampled, 0.8, false).unwrap();
        let (side_log_probs, side_values) = reference_and_values(&policy, &value_model, &sampled, 0.8, true).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&log_probs, &side_log_probs) < 1e-6 && diff(&values, &side_values) < 1e-6);
        let past_the_end = sampled.response_mask.eq(0.0);
        assert_eq!(log_probs.masked_select(&past_the_end).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(values.masked_select(&past_the_end).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let tokens = sampled.response_mask.eq(1.0);
        assert!(values.abs().max().double_value(&[]) > 0.0);
        assert!(log_probs.masked_select(&tokens).max().double_value(&[]) < 0.0);
    }

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

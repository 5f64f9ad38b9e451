//! Sampling a batch of responses with the policy and laying them out as tensors: the
//! first half of a rollout (the models' forwards and the rewards complete it).
use tch::{Kind, Tensor};

use super::log_probs::response_logits;
use crate::error::{Error, Result};
use crate::model::generate::{generate, Finish, GenerationSettings};
use crate::model::scalar_head::ScalarHeadModel;
use crate::model::{HeadChunks, Policy, ScoreOptions, TokenScores};

/// Responses sampled for a batch of prompts, as [`super::Experience`] lays them out:
/// prompts left-padded to P positions, responses right-padded to R.
pub struct Sampled {
    /// (B, P + R)
    pub sequences: Tensor,
    /// (B, P + R): 1 on prompt and response tokens.
    pub attention_mask: Tensor,
    pub prompt_len: i64,
    /// (B, R) float: 1.0 on response tokens (a stop token included).
    pub response_mask: Tensor,
    /// (B, R): each token's log-prob under the distribution it was drawn from (the
    /// logits / temperature), 0 past the end.
    pub log_probs: Tensor,
    /// Each response's tokens (the stop token included) and why it ended.
    pub responses: Vec<Vec<i64>>,
    pub finishes: Vec<Finish>,
}

/// Samples one response per prompt with `settings` (its temperature must be above 0:
/// greedy decoding has no sampling distribution to learn from) and lays the batch out;
/// `pad` fills padding.
pub fn sample(policy: &dyn Policy, prompts: &[Vec<i64>], settings: &GenerationSettings, pad: i64) -> Result<Sampled> {
    if settings.temperature <= 0.0 {
        return Err(Error::Other("sampling a rollout needs a temperature above 0".into()));
    }
    let generated = generate(policy, prompts, settings, None)?;
    let device = policy.var_store().device();
    let prompt_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let response_len = generated.iter().map(|g| g.tokens.len()).max().unwrap_or(0).max(1);
    let (mut ids, mut mask, mut response_mask, mut log_probs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (prompt, out) in prompts.iter().zip(&generated) {
        let (left, right) = (prompt_len - prompt.len(), response_len - out.tokens.len());
        ids.extend(std::iter::repeat_n(pad, left).chain(prompt.iter().copied()));
        ids.extend(out.tokens.iter().copied().chain(std::iter::repeat_n(pad, right)));
        mask.extend(std::iter::repeat_n(0i64, left).chain(std::iter::repeat_n(1, prompt.len() + out.tokens.len())));
        mask.extend(std::iter::repeat_n(0i64, right));
        response_mask.extend(std::iter::repeat_n(1f32, out.tokens.len()).chain(std::iter::repeat_n(0.0, right)));
        log_probs.extend(out.log_probs.iter().map(|&l| l as f32).chain(std::iter::repeat_n(0.0, right)));
    }
    let (b, p, r) = (prompts.len() as i64, prompt_len as i64, response_len as i64);
    Ok(Sampled {
        sequences: Tensor::from_slice(&ids).view([b, p + r]).to_device(device),
        attention_mask: Tensor::from_slice(&mask).view([b, p + r]).to_device(device),
        prompt_len: p,
        response_mask: Tensor::from_slice(&response_mask).view([b, r]).to_device(device),
        log_probs: Tensor::from_slice(&log_probs).view([b, r]).to_device(device),
        responses: generated.iter().map(|g| g.tokens.clone()).collect(),
        finishes: generated.iter().map(|g| g.finish).collect(),
    })
}

/// The logits (B, R, V) at `temperature` with which `policy` predicts the response
/// tokens of `sequences` (B, P + R) (see [`response_logits`]).
pub fn policy_response_logits(
    policy: &dyn Policy,
    sequences: &Tensor,
    attention_mask: &Tensor,
    prompt_len: i64,
    temperature: f64,
) -> Result<Tensor> {
    let logits = policy.logits(sequences, Some(attention_mask))?; // (B, P + R, V)
    let response_len = sequences.size()[1] - prompt_len;
    Ok(response_logits(&logits, prompt_len, response_len, temperature))
}

/// The scores at `temperature` — log-probs (B, R) and, on request, entropies — of the
/// response tokens of `sequences` (B, P + R) under `policy`, through its head a chunk of
/// positions at a time ([`crate::model::head`]): the (B, R, V) logits never exist whole.
/// The same numbers as [`policy_response_logits`] then [`super::response_log_probs`] and
/// [`super::entropy`], to fp32 rounding.
pub fn policy_response_scores(
    policy: &dyn Policy,
    sequences: &Tensor,
    attention_mask: &Tensor,
    prompt_len: i64,
    temperature: f64,
    entropy: bool,
) -> Result<TokenScores> {
    let responses = sequences.narrow(1, prompt_len, sequences.size()[1] - prompt_len);
    let options = ScoreOptions { temperature, entropy, chunks: HeadChunks::Auto };
    policy.token_scores(sequences, None, Some(attention_mask), &responses, prompt_len - 1, &options)
}

/// The value model's estimate (B, R) before each response token: its output at the
/// position that predicts the token, as the policy's logits there.
pub fn response_values(
    value_model: &ScalarHeadModel,
    sequences: &Tensor,
    attention_mask: &Tensor,
    prompt_len: i64,
) -> Result<Tensor> {
    let values = value_model.values_from(sequences, attention_mask, prompt_len - 1)?; // (B, R + 1)
    let response_len = sequences.size()[1] - prompt_len;
    Ok(values.narrow(1, 0, response_len).to_kind(Kind::Float))
}

/// The seed of step `step`'s sampling and shuffles: a function of the run's seed and the
/// step only (SplitMix64's finaliser), so a resumed step draws what it drew before.
pub fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed rank `rank` of a data-parallel run samples its share of a step with, from the
/// step's seed: rank 0 (and so a single-process run) keeps the step's own seed, the others
/// each draw from a stream of their own.
pub fn rank_seed(step_seed: u64, rank: usize) -> u64 {
    match rank {
        0 => step_seed,
        rank => self::step_seed(step_seed, (1 << 32) | rank as u64),
    }
}

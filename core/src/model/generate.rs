//! Batched generation with a KV cache: prompts of different lengths are left-padded,
//! positions count tokens only, each sequence finishes on its own (a stop token or a
//! stop check), and the log-prob of every sampled token comes back with it.
//!
//! Sampling follows `transformers`' logits processors, in their order: repetition
//! penalty, temperature, top-k, top-p. Sampling draws from libtorch's generator;
//! `seed` makes it reproducible.
use tch::{Kind, Tensor};

use super::Policy;
use crate::error::{Error, Result};

/// Sampling settings for [`Policy::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: i64,
    /// Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p; 1 keeps all.
    pub top_p: f64,
    /// > 1 discourages tokens already in the sequence (CTRL's penalty, as transformers applies it).
    pub repetition_penalty: f64,
    /// Token ids that end a sequence; the stop token is kept in the output.
    pub stop_tokens: Vec<i64>,
    /// Seeds libtorch's generator before sampling, for reproducible samples.
    pub seed: Option<u64>,
    /// The id written into padding positions (masked out; any valid id works).
    pub pad_token: i64,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            stop_tokens: Vec::new(),
            seed: None,
            pad_token: 0,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It produced a stop token (the last token).
    StopToken,
    /// The stop check matched (e.g. a stop string).
    StopCheck,
    /// It reached `max_new_tokens`.
    Length,
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens only.
    pub tokens: Vec<i64>,
    /// Log-probability of each new token under the distribution it was drawn from
    /// (after repetition penalty and temperature, before top-k/top-p truncation).
    pub log_probs: Vec<f64>,
    pub finish: Finish,
}

/// A check on a sequence's new tokens after each step (e.g. "has it produced a stop
/// string?"); true ends that sequence.
pub type StopCheck<'a> = &'a dyn Fn(&[i64]) -> bool;

/// Generates continuations of `prompts` in one batch. See the module docs.
pub fn generate<P: Policy + ?Sized>(
    policy: &P,
    prompts: &[Vec<i64>],
    settings: &GenerationSettings,
    stop_check: Option<StopCheck>,
) -> Result<Vec<Generated>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Other(format!("prompt {i} is empty; generation needs at least one token")));
    }
    let vocab = policy.vocab_size();
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id < 0 || id >= vocab) {
        return Err(Error::Other(format!("token id {bad} is outside the model's vocabulary of {vocab}")));
    }
    let _no_grad = tch::no_grad_guard();
    if let Some(seed) = settings.seed {
        tch::manual_seed(seed as i64);
    }
    let device = policy.var_store().device();
    let batch = prompts.len() as i64;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let new_tokens = settings.max_new_tokens as i64;

    // Left-pad the prompts: (B, P) ids and mask.
    let mut ids = Vec::with_capacity(prompts.len() * longest);
    let mut mask = Vec::with_capacity(prompts.len() * longest);
    for prompt in prompts {
        let pad = longest - prompt.len();
        ids.extend(std::iter::repeat_n(settings.pad_token, pad).chain(prompt.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, prompt.len())));
    }
    let shape = [batch, longest as i64];
    let mut input = Tensor::from_slice(&ids).view(shape).to_device(device);
    let mut attention = Tensor::from_slice(&mask).view(shape).to_device(device);
    // Every token seen so far, for the repetition penalty (padding included, as transformers does).
    let mut seen = input.shallow_clone();
    let mut positions = super::cache::positions_from_mask(&attention);
    let mut cache = policy.new_cache(batch, longest as i64 + new_tokens);

    let mut outputs: Vec<Generated> = prompts
        .iter()
        .map(|_| Generated { tokens: Vec::new(), log_probs: Vec::new(), finish: Finish::Length })
        .collect();
    let mut running = vec![true; prompts.len()];
    for _ in 0..new_tokens {
        let logits = policy.forward(&input, &positions, Some(&attention), Some(&mut cache))?;
        let last = logits.select(1, -1).to_kind(Kind::Float); // (B, V)
        let (next, log_probs) = sample(&last, &seen, settings)?;
        let next_ids = Vec::<i64>::try_from(&next)?;
        let next_log_probs = Vec::<f64>::try_from(&log_probs.to_kind(Kind::Double))?;
        for (row, out) in outputs.iter_mut().enumerate() {
            if !running[row] {
                continue;
            }
            out.tokens.push(next_ids[row]);
            out.log_probs.push(next_log_probs[row]);
            if settings.stop_tokens.contains(&next_ids[row]) {
                (running[row], out.finish) = (false, Finish::StopToken);
            } else if stop_check.is_some_and(|check| check(&out.tokens)) {
                (running[row], out.finish) = (false, Finish::StopCheck);
            }
        }
        if !running.iter().any(|&r| r) {
            break;
        }
        // Finished rows keep decoding padding; their output is frozen above.
        let fed: Vec<i64> =
            next_ids.iter().zip(&running).map(|(&id, &r)| if r { id } else { settings.pad_token }).collect();
        input = Tensor::from_slice(&fed).view([batch, 1]).to_device(device);
        seen = Tensor::cat(&[&seen, &input], 1);
        positions = positions.select(1, -1).unsqueeze(1) + 1;
        attention = Tensor::cat(&[&attention, &attention.ones_like().narrow(1, 0, 1)], 1);
    }
    Ok(outputs)
}

/// Picks the next token of each row of `logits` (B, V); returns (ids (B), log-probs (B)).
pub fn sample(logits: &Tensor, seen: &Tensor, settings: &GenerationSettings) -> Result<(Tensor, Tensor)> {
    let mut logits = logits.shallow_clone();
    if settings.repetition_penalty != 1.0 {
        let p = settings.repetition_penalty;
        let score = logits.gather(1, seen, false);
        let penalised = (&score * p).where_self(&score.lt(0.0), &(&score / p));
        logits = logits.scatter(1, seen, &penalised);
    }
    if settings.temperature <= 0.0 {
        let next = logits.argmax(-1, false);
        let log_probs = logits.log_softmax(-1, Kind::Float).gather(1, &next.unsqueeze(1), false).squeeze_dim(1);
        return Ok((next, log_probs));
    }
    let logits = logits / settings.temperature;
    let log_probs_all = logits.log_softmax(-1, Kind::Float);
    let mut filtered = logits.shallow_clone();
    let vocab = logits.size()[1];
    if settings.top_k > 0 && settings.top_k < vocab {
        let (top, _) = filtered.topk(settings.top_k, -1, true, true);
        let threshold = top.narrow(1, settings.top_k - 1, 1);
        filtered = filtered.masked_fill(&filtered.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if settings.top_p < 1.0 {
        let (sorted, order) = filtered.sort(-1, false); // ascending, as transformers does
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let drop_sorted = cumulative.le(1.0 - settings.top_p);
        let _ = drop_sorted.narrow(1, vocab - 1, 1).fill_(0); // always keep the most likely
        let drop = drop_sorted.scatter(1, &order, &drop_sorted);
        filtered = filtered.masked_fill(&drop, f64::NEG_INFINITY);
    }
    let next = filtered.softmax(-1, Kind::Float).f_multinomial(1, false)?.squeeze_dim(1);
    let log_probs = log_probs_all.gather(1, &next.unsqueeze(1), false).squeeze_dim(1);
    Ok((next, log_probs))
}

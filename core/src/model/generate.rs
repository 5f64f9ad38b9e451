//! Batched generation with a KV cache: prompts of different lengths are left-padded,
//! positions count tokens only, each sequence finishes on its own (a stop token or a
//! stop check), and the log-prob of every sampled token comes back with it.
//!
//! Generation stays inside the model's context ([`Policy::context_length`], or the
//! settings' `context`): a prompt that leaves no room for a new token is an error, and
//! `max_new_tokens` beyond the room the longest prompt leaves is cut to it, with a
//! warning (those sequences finish with [`Finish::Length`]).
//!
//! Finished sequences leave the batch: once at least a quarter of the rows still in the
//! batch have finished, those rows are dropped from the inputs, the masks and the KV
//! cache ([`KvCache::keep_rows`](super::cache::KvCache::keep_rows)), so a long chain does
//! not keep paying for the short ones beside it. Outputs do not change: each sequence
//! still draws the same uniform number each step (one is drawn for every sequence of the
//! original batch, finished or not, as before compaction), so greedy and seeded sampled
//! generations give the same tokens with and without compaction (up to the last bits of
//! floating-point sums that a smaller batch may order differently; see the tests).
//!
//! Sampling follows `transformers`' logits processors, in their order: repetition
//! penalty, temperature, top-k, top-p. Draws come from a generator owned by the call
//! (seeded by `seed`, or from libtorch's global generator when there is none), so a
//! seeded generation is the same whatever else runs in the process.
use rand::Rng;
use tch::{Kind, Tensor};

use super::Policy;
use crate::data::{seeded_rng, SeededRng};
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
    /// Seeds this call's generator; None draws a seed from libtorch's global one.
    pub seed: Option<u64>,
    /// The id written into padding positions (masked out; any valid id works).
    pub pad_token: i64,
    /// The most positions a sequence (prompt and new tokens) may reach; None: the
    /// model's [`Policy::context_length`]. A stage that trained the model on longer
    /// sequences than its config declares (RoPE extrapolates) sets its own.
    pub context: Option<usize>,
    /// Drop finished sequences from the batch (and the KV cache) as they accumulate; off
    /// only to measure what it saves (`plumb bench generate --no-compact`).
    pub compact: bool,
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
            context: None,
            compact: true,
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
    /// It reached `max_new_tokens`, or the end of the model's context.
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

/// Called with (row, token) for every new token as it is drawn, in row order within a
/// step (e.g. to stream a continuation while it is generated).
pub type OnToken<'a> = &'a mut dyn FnMut(usize, i64);

/// Generates continuations of `prompts` in one batch. See the module docs.
pub fn generate<P: Policy + ?Sized>(
    policy: &P,
    prompts: &[Vec<i64>],
    settings: &GenerationSettings,
    stop_check: Option<StopCheck>,
) -> Result<Vec<Generated>> {
    generate_with(policy, prompts, settings, stop_check, None)
}

/// The number of new tokens [`generate`] draws at most: `max_new_tokens`, cut to the room
/// the longest prompt (`longest` tokens) leaves in a context of `context` positions. An
/// error when a prompt leaves no room at all.
pub fn new_token_budget(longest: usize, max_new_tokens: usize, context: Option<usize>) -> Result<usize> {
    let Some(context) = context else {
        return Ok(max_new_tokens);
    };
    if longest >= context {
        return Err(Error::Other(format!(
            "a prompt of {longest} tokens leaves no room for new tokens in a context of {context} positions; shorten it to at most {} tokens",
            context.saturating_sub(1)
        )));
    }
    let room = context - longest;
    if max_new_tokens > room {
        tracing::warn!(
            "max_new_tokens {max_new_tokens} is more than the {room} positions a prompt of {longest} tokens leaves in a context of {context}: generating at most {room} tokens"
        );
    }
    Ok(max_new_tokens.min(room))
}

/// [`generate`], calling `on_token` with each new token as it is drawn.
pub fn generate_with<P: Policy + ?Sized>(
    policy: &P,
    prompts: &[Vec<i64>],
    settings: &GenerationSettings,
    stop_check: Option<StopCheck>,
    mut on_token: Option<OnToken>,
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
    let seed = settings
        .seed
        .unwrap_or_else(|| Tensor::randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]) as u64);
    let mut rng = seeded_rng(seed);
    let device = policy.var_store().device();
    let batch = prompts.len() as i64;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let padded = prompts.iter().any(|p| p.len() != longest);
    let context = settings.context.or(policy.context_length().map(|c| c.max(0) as usize));
    let new_tokens = new_token_budget(longest, settings.max_new_tokens, context)? as i64;

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
    // Batch row i generates sequence `rows[i]`; rows leave as their sequences finish.
    let mut rows: Vec<usize> = (0..prompts.len()).collect();
    for _ in 0..new_tokens {
        // Without padding the mask is all ones: leave it out, so the prefill takes
        // attention's plain causal path.
        let mask = padded.then_some(&attention);
        let logits = policy.forward(&input, &positions, mask, Some(&mut cache))?;
        let last = logits.select(1, -1).to_kind(Kind::Float); // (b, V)
                                                              // One uniform per sequence of the whole batch, finished or not: a sequence's
                                                              // draws do not depend on which others are still in the batch.
        let draws: Vec<f64> = (0..batch).map(|_| rng.random::<f64>()).collect();
        let row_draws: Vec<f64> = rows.iter().map(|&seq| draws[seq]).collect();
        let (next, log_probs) = sample_with_draws(&last, &seen, settings, &row_draws)?;
        let next_ids = Vec::<i64>::try_from(&next)?;
        let next_log_probs = Vec::<f64>::try_from(&log_probs.to_kind(Kind::Double))?;
        for (row, &seq) in rows.iter().enumerate() {
            if !running[seq] {
                continue;
            }
            let out = &mut outputs[seq];
            out.tokens.push(next_ids[row]);
            out.log_probs.push(next_log_probs[row]);
            if let Some(on_token) = on_token.as_mut() {
                on_token(seq, next_ids[row]);
            }
            if settings.stop_tokens.contains(&next_ids[row]) {
                (running[seq], out.finish) = (false, Finish::StopToken);
            } else if stop_check.is_some_and(|check| check(&out.tokens)) {
                (running[seq], out.finish) = (false, Finish::StopCheck);
            }
        }
        if !running.iter().any(|&r| r) {
            break;
        }
        let finished = rows.iter().filter(|&&seq| !running[seq]).count();
        let mut next_ids = next_ids;
        if settings.compact && finished > 0 && finished * 4 >= rows.len() {
            let keep: Vec<i64> = (0..rows.len()).filter(|&i| running[rows[i]]).map(|i| i as i64).collect();
            let index = Tensor::from_slice(&keep).to_device(device);
            cache.keep_rows(&index);
            seen = seen.index_select(0, &index);
            positions = positions.index_select(0, &index);
            attention = attention.index_select(0, &index);
            next_ids = keep.iter().map(|&i| next_ids[i as usize]).collect();
            rows = keep.iter().map(|&i| rows[i as usize]).collect();
        }
        // Finished rows still in the batch decode padding; their output is frozen above.
        let fed: Vec<i64> =
            next_ids.iter().zip(&rows).map(|(&id, &seq)| if running[seq] { id } else { settings.pad_token }).collect();
        input = Tensor::from_slice(&fed).view([rows.len() as i64, 1]).to_device(device);
        seen = Tensor::cat(&[&seen, &input], 1);
        positions = positions.select(1, -1).unsqueeze(1) + 1;
        attention = Tensor::cat(&[&attention, &attention.ones_like().narrow(1, 0, 1)], 1);
    }
    Ok(outputs)
}

/// Picks the next token of each row of `logits` (B, V) given the tokens `seen` so far
/// (B, L); returns (ids (B), log-probs (B)). Draws by inverse CDF with one uniform
/// number a row from `rng`.
pub fn sample(
    logits: &Tensor,
    seen: &Tensor,
    settings: &GenerationSettings,
    rng: &mut SeededRng,
) -> Result<(Tensor, Tensor)> {
    let rows = if settings.temperature <= 0.0 { 0 } else { logits.size()[0] }; // greedy draws nothing
    let draws: Vec<f64> = (0..rows).map(|_| rng.random::<f64>()).collect();
    sample_with_draws(logits, seen, settings, &draws)
}

/// [`sample`] with the uniform numbers in [0, 1) given, one per row (unused when greedy).
pub fn sample_with_draws(
    logits: &Tensor,
    seen: &Tensor,
    settings: &GenerationSettings,
    draws: &[f64],
) -> Result<(Tensor, Tensor)> {
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
    let cdf = filtered.softmax(-1, Kind::Double).cumsum(-1, Kind::Double); // (B, V)
                                                                           // A uniform in [0, 1) per row, scaled by each row's total mass.
    let u = Tensor::from_slice(draws).to_device(cdf.device()).unsqueeze(1) * cdf.narrow(1, vocab - 1, 1);
    let next = u.searchsorted(&cdf, false, true, "right", None::<Tensor>).clamp_max(vocab - 1).squeeze_dim(1);
    let log_probs = log_probs_all.gather(1, &next.unsqueeze(1), false).squeeze_dim(1);
    Ok((next, log_probs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(logits: &[f32], settings: &GenerationSettings, draws: usize) -> Vec<f64> {
        let row = Tensor::from_slice(logits).unsqueeze(0);
        let logits = row.repeat([draws as i64, 1]);
        let seen = Tensor::zeros([draws as i64, 1], (Kind::Int64, tch::Device::Cpu));
        let (next, log_probs) = sample(&logits, &seen, settings, &mut seeded_rng(3)).unwrap();
        assert!(log_probs.le(0.0).all().int64_value(&[]) == 1);
        let next = Vec::<i64>::try_from(next).unwrap();
        (0..logits.size()[1]).map(|t| next.iter().filter(|&&n| n == t).count() as f64 / draws as f64).collect()
    }

    #[test]
    fn sampling_follows_the_softmax_distribution() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let total: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let freq = counts(&logits, &GenerationSettings::default(), 40_000);
        for (f, l) in freq.iter().zip(logits) {
            let p = (l as f64).exp() / total;
            assert!((f - p).abs() < 0.01, "frequency {f} vs probability {p}");
        }
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_head() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let top2 = counts(&logits, &GenerationSettings { top_k: 2, ..Default::default() }, 5_000);
        assert_eq!((top2[2], top2[3]), (0.0, 0.0));
        // p = [0.64, 0.24, 0.09, 0.03]: top_p 0.7 needs the first two.
        let nucleus = counts(&logits, &GenerationSettings { top_p: 0.7, ..Default::default() }, 5_000);
        assert!(nucleus[1] > 0.2 && nucleus[2] == 0.0 && nucleus[3] == 0.0, "{nucleus:?}");
        let greedy = counts(&logits, &GenerationSettings { temperature: 0.0, ..Default::default() }, 10);
        assert_eq!(greedy[0], 1.0);
    }

    #[test]
    fn generation_stays_inside_the_models_context() {
        tch::manual_seed(0);
        let config = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16
        }))
        .unwrap();
        let model = crate::model::llama::LlamaForCausalLm::new(config, tch::Device::Cpu).unwrap();
        let settings = GenerationSettings { max_new_tokens: 1_000_000, temperature: 0.0, ..Default::default() };
        // Far more new tokens than fit: cut to the 16 - 5 positions the longest prompt leaves.
        let mut streamed = Vec::new();
        let mut on_token = |row: usize, token: i64| streamed.push((row, token));
        let out =
            generate_with(&model, &[vec![1, 2, 3, 4, 5], vec![6, 7]], &settings, None, Some(&mut on_token)).unwrap();
        assert_eq!(out.iter().map(|g| g.tokens.len()).collect::<Vec<_>>(), [11, 11]);
        assert!(out.iter().all(|g| g.finish == Finish::Length));
        // Every token reached the observer as it was drawn, rows in order within a step.
        let first: Vec<i64> = streamed.iter().filter(|(row, _)| *row == 0).map(|(_, t)| *t).collect();
        assert_eq!((first, streamed[0].0, streamed[1].0), (out[0].tokens.clone(), 0, 1));
        // A caller that trained on longer sequences sets its own bound.
        let longer = GenerationSettings { context: Some(24), ..settings.clone() };
        assert_eq!(generate(&model, &[vec![1, 2, 3, 4]], &longer, None).unwrap()[0].tokens.len(), 20);
        // A prompt that fills the context leaves no room: an error that says so.
        let err = generate(&model, &[vec![1; 16]], &settings, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "a prompt of 16 tokens leaves no room for new tokens in a context of 16 positions; shorten it to at most 15 tokens"
        );
    }

    /// Sequences finish at different steps (a stop check on their own tokens); with
    /// compaction the finished ones leave the batch, and every sequence's tokens are the
    /// same as without it, greedy and sampled.
    #[test]
    fn finished_rows_leave_the_batch_without_changing_outputs() {
        tch::manual_seed(1);
        let config = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64
        }))
        .unwrap();
        let model = crate::model::llama::LlamaForCausalLm::new(config, tch::Device::Cpu).unwrap();
        let prompts: Vec<Vec<i64>> =
            (0..8).map(|i| (0..(2 + i % 5)).map(|j| (3 * i + 7 * j + 1) % 40).collect()).collect();
        // A sequence stops after 1 to 12 tokens, by its first token.
        let check = |tokens: &[i64]| tokens.len() >= 1 + (tokens[0] % 12) as usize;
        for temperature in [0.0, 1.0] {
            let settings = GenerationSettings { max_new_tokens: 12, temperature, seed: Some(5), ..Default::default() };
            let compacted = generate(&model, &prompts, &settings, Some(&check)).unwrap();
            let plain =
                generate(&model, &prompts, &GenerationSettings { compact: false, ..settings.clone() }, Some(&check))
                    .unwrap();
            let lengths: Vec<usize> = compacted.iter().map(|g| g.tokens.len()).collect();
            assert!(lengths.iter().filter(|&&l| l < 6).count() >= 2 && lengths.iter().any(|&l| l >= 6), "{lengths:?}");
            for (a, b) in compacted.iter().zip(&plain) {
                assert_eq!((&a.tokens, a.finish), (&b.tokens, b.finish), "temperature {temperature}");
                for (x, y) in a.log_probs.iter().zip(&b.log_probs) {
                    assert!((x - y).abs() < 1e-4, "{x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let logits = Tensor::from_slice(&[2.0f32, -2.0, 1.0]).unsqueeze(0);
        let seen = Tensor::from_slice(&[0i64, 1]).unsqueeze(0);
        let settings = GenerationSettings { temperature: 0.0, repetition_penalty: 4.0, ..Default::default() };
        // Penalised: [0.5, -8, 1] -> token 2 wins.
        let (next, _) = sample(&logits, &seen, &settings, &mut seeded_rng(0)).unwrap();
        assert_eq!(next.int64_value(&[0]), 2);
    }
}

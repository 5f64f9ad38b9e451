//! Batched generation with a KV cache: prompts of different lengths are left-padded,
//! positions count tokens only, each sequence finishes on its own (a stop token or a
//! stop check), and the log-prob of every sampled token comes back with it.
//!
//! Generation stays inside the model's context ([`Policy::context_length`], or the
//! settings' `context`): a prompt that leaves no room for a new token is an error, and
//! `max_new_tokens` beyond the room the longest prompt leaves is cut to it, with a
//! warning (those sequences finish with [`Finish::Length`]).
//!
//! The loop never waits for the host between tokens. Everything a step needs is on the
//! device and allocated once for the batch: the KV cache, every position's ids and key
//! mask (prompt and new tokens), and the drawn tokens and their log-probs. Sampling runs
//! there too, with uniform numbers from a generator of the call's own on the device
//! ([`DeviceGenerator`], seeded by `seed`), and a stop token ends its row there (the row
//! decodes padding from then on). The host reads the drawn tokens once every
//! `check_every` steps (one device-to-host copy), runs the stop check, calls `on_token`,
//! and decides whether to stop or to compact. A sequence that the stop check ends keeps
//! decoding until that read; what it drew after its end is dropped, so outputs do not
//! depend on `check_every`.
//!
//! Finished sequences leave the batch: at a read, once at least a quarter of the rows
//! still in the batch have finished, those rows are dropped from the inputs, the masks
//! and the KV cache ([`KvCache::keep_rows`](super::cache::KvCache::keep_rows)), so a long
//! chain does not keep paying for the short ones beside it. Outputs do not change: each
//! sequence still draws the same uniform number each step (one is drawn for every
//! sequence of the original batch, finished or not), so greedy and seeded sampled
//! generations give the same tokens with and without compaction (up to the last bits of
//! floating-point sums that a smaller batch may order differently; see the tests).
//!
//! Sampling follows `transformers`' logits processors, in their order: repetition
//! penalty, temperature, top-k, top-p.
use std::cell::Cell;

use tch::{Device, Kind, Tensor};

use super::cache::KvCache;
use super::generator::DeviceGenerator;
use super::Policy;
use crate::cuda::CudaGraph;
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
    /// The host reads the drawn tokens (runs the stop check, streams them to `on_token`,
    /// sees whether all have finished) every this many steps: one device-to-host copy
    /// each time. 1 streams every token as it comes; larger values waste at most
    /// `check_every - 1` steps after the last sequence ends.
    pub check_every: usize,
    /// How decoding steps run after the prompt's; see [`StepMode`].
    pub steps: StepMode,
}

/// How the decoding steps after the prompt's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepMode {
    /// On a CUDA device, with a model that can ([`KvCache::offers_fixed_shape`](super::cache::KvCache::offers_fixed_shape))
    /// and a build with CUDA's headers: fixed-shape steps, captured once as a CUDA graph
    /// and replayed (one launch a step instead of hundreds). Elsewhere, [`StepMode::Growing`].
    #[default]
    Auto,
    /// Attention over the positions filled so far, the shapes growing each step.
    Growing,
    /// Fixed-shape steps run eagerly: what a graph replays, on any device (to compare).
    FixedShape,
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
            check_every: 8,
            steps: StepMode::Auto,
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

/// A check on a sequence's new tokens (e.g. "has it produced a stop string?"), called
/// after each token once the host has read it; true ends that sequence there.
pub type StopCheck<'a> = &'a dyn Fn(&[i64]) -> bool;

/// Called with (row, token) for every new token once the host has read it (every
/// `check_every` steps), in step order and row order within a step (e.g. to stream a
/// continuation while it is generated).
pub type OnToken<'a> = &'a mut dyn FnMut(usize, i64);

thread_local! {
    /// Device-to-host reads made by generation on this thread (see [`host_reads`]).
    static HOST_READS: Cell<usize> = const { Cell::new(0) };
    /// Decoding steps replayed as a CUDA graph on this thread (see [`graph_replays`]).
    static GRAPH_REPLAYS: Cell<usize> = const { Cell::new(0) };
}

/// How many decoding steps generation on this thread has run as a CUDA graph replay.
pub fn graph_replays() -> usize {
    GRAPH_REPLAYS.with(Cell::get)
}

/// How many times generation on this thread has read from the device so far: each is a
/// synchronisation point on CUDA. Every such read in this module goes through
/// [`read_to_host`]; the model's own forward makes none.
pub fn host_reads() -> usize {
    HOST_READS.with(Cell::get)
}

/// `t` as f64 on the host: a device-to-host copy (the only kind this module makes).
fn read_to_host(t: &Tensor) -> Result<Vec<f64>> {
    HOST_READS.with(|n| n.set(n.get() + 1));
    Ok(Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu).reshape([-1]))?)
}

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

/// [`generate`], calling `on_token` with each new token once the host has read it.
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
    // Nothing here is trained through, and only host values leave.
    let _inference = crate::shim::InferenceMode::enter();
    let seed = settings
        .seed
        .unwrap_or_else(|| Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64);
    let device = policy.var_store().device();
    let mut generator = DeviceGenerator::new(device, seed)?;
    let batch = prompts.len() as i64;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let padded = prompts.iter().any(|p| p.len() != longest);
    let context = settings.context.or(policy.context_length().map(|c| c.max(0) as usize));
    let new_tokens = new_token_budget(longest, settings.max_new_tokens, context)?;
    let (prompt_width, width) = (longest as i64, (longest + new_tokens) as i64);
    let pad = settings.pad_token;
    let check_every = settings.check_every.max(1);

    // Every position of every row, allocated once: the left-padded prompts, then the new
    // tokens as they are drawn. (B, P + N) ids and key mask (1 on every new position).
    let mut ids = Vec::with_capacity(prompts.len() * width as usize);
    let mut mask = Vec::with_capacity(prompts.len() * width as usize);
    for prompt in prompts {
        let left = longest - prompt.len();
        ids.extend(
            std::iter::repeat_n(pad, left).chain(prompt.iter().copied()).chain(std::iter::repeat_n(pad, new_tokens)),
        );
        mask.extend(std::iter::repeat_n(0i64, left).chain(std::iter::repeat_n(1, prompt.len() + new_tokens)));
    }
    let mut sequence = Tensor::from_slice(&ids).view([batch, width]).to_device(device);
    let mut key_mask = Tensor::from_slice(&mask).view([batch, width]).to_device(device);
    // What each sequence of the original batch drew at each step, read by the host every
    // `check_every` steps: (B, N) ids and log-probs.
    let drawn = Tensor::full([batch, new_tokens as i64], pad, (Kind::Int64, device));
    let drawn_log_probs = Tensor::zeros([batch, new_tokens as i64], (Kind::Float, device));
    let stop_tokens =
        (!settings.stop_tokens.is_empty()).then(|| Tensor::from_slice(&settings.stop_tokens).to_device(device));

    let mut input = sequence.narrow(1, 0, prompt_width);
    let mut positions = super::cache::positions_from_mask(&key_mask.narrow(1, 0, prompt_width));
    let mut cache = policy.new_cache(batch, width);
    // Batch row i generates sequence `rows[i]` (`row_index` on the device); rows leave as
    // their sequences finish. `ended` (b) marks rows that decode padding: a stop token
    // ended them on the device, or the host's stop check did.
    let mut rows: Vec<usize> = (0..prompts.len()).collect();
    let mut row_index = Tensor::arange(batch, (Kind::Int64, device));
    let mut ended = Tensor::zeros([batch], (Kind::Bool, device));

    let mut outputs: Vec<Generated> = prompts
        .iter()
        .map(|_| Generated { tokens: Vec::new(), log_probs: Vec::new(), finish: Finish::Length })
        .collect();
    let mut running = vec![true; prompts.len()];
    let mut read = 0; // steps the host has read
    let graphs = settings.steps == StepMode::Auto && device.is_cuda() && crate::cuda::built();
    let fixed_shape = cache.offers_fixed_shape() && (graphs || settings.steps == StepMode::FixedShape);
    let mut fixed: Option<FixedSteps> = None;
    for step in 0..new_tokens {
        let len = prompt_width + step as i64;
        let logits = match fixed.as_mut() {
            Some(fixed) => fixed.step(policy, &input, &positions, len, &mut cache)?,
            None => {
                // Without padding the mask is all ones: leave it out, so the prefill takes
                // attention's plain causal path.
                let mask = padded.then(|| key_mask.narrow(1, 0, len));
                let logits = policy.last_logits(&input, &positions, mask.as_ref(), Some(&mut cache))?; // (b, V)
                if fixed_shape {
                    fixed = Some(FixedSteps::after_prompt(&mut cache, &key_mask, len, graphs));
                }
                logits
            }
        };
        // One uniform per sequence of the whole batch, finished or not: a sequence's
        // draws do not depend on which others are still in the batch.
        let draws = generator.uniform(batch, Kind::Double)?.index_select(0, &row_index);
        let (next, log_probs) =
            sample_with_draws(&logits.to_kind(Kind::Float), &sequence.narrow(1, 0, len), settings, &draws)?;
        let next = next.masked_fill(&ended, pad); // (b)
        let _ = drawn.narrow(1, step as i64, 1).index_copy_(0, &row_index, &next.unsqueeze(1));
        let _ = drawn_log_probs.narrow(1, step as i64, 1).index_copy_(0, &row_index, &log_probs.unsqueeze(1));
        if let Some(stop) = &stop_tokens {
            ended = ended.logical_or(&Tensor::isin(&next, stop, false, false));
        }
        input = next.unsqueeze(1); // (b, 1)
        sequence.narrow(1, len, 1).copy_(&input);
        positions = positions.narrow(1, positions.size()[1] - 1, 1) + 1;

        if (step + 1) % check_every != 0 && step + 1 != new_tokens {
            continue;
        }
        // The host's look: one copy of the steps since the last one, ids and log-probs.
        let steps = (step + 1 - read) as i64;
        let block = Tensor::stack(
            &[
                drawn.narrow(1, read as i64, steps).to_kind(Kind::Double),
                drawn_log_probs.narrow(1, read as i64, steps).to_kind(Kind::Double),
            ],
            0,
        ); // (2, B, steps)
        let values = read_to_host(&block)?;
        let at = |part: usize, seq: usize, t: usize| values[(part * prompts.len() + seq) * steps as usize + t];
        for t in 0..steps as usize {
            for &seq in &rows {
                if !running[seq] {
                    continue;
                }
                let (token, log_prob) = (at(0, seq, t) as i64, at(1, seq, t));
                let out = &mut outputs[seq];
                out.tokens.push(token);
                out.log_probs.push(log_prob);
                if let Some(on_token) = on_token.as_mut() {
                    on_token(seq, token);
                }
                if settings.stop_tokens.contains(&token) {
                    (running[seq], out.finish) = (false, Finish::StopToken);
                } else if stop_check.is_some_and(|check| check(&out.tokens)) {
                    (running[seq], out.finish) = (false, Finish::StopCheck);
                }
            }
        }
        read = step + 1;
        if !running.iter().any(|&r| r) {
            break;
        }
        // What the host ended (stop checks) the device ends too.
        let host_ended: Vec<bool> = rows.iter().map(|&seq| !running[seq]).collect();
        let finished = host_ended.iter().filter(|&&e| e).count();
        if stop_check.is_some() && finished > 0 {
            ended = Tensor::from_slice(&host_ended).to_device(device);
        }
        if settings.compact && finished > 0 && finished * 4 >= rows.len() {
            let keep: Vec<i64> = (0..rows.len()).filter(|&i| running[rows[i]]).map(|i| i as i64).collect();
            let index = Tensor::from_slice(&keep).to_device(device);
            cache.keep_rows(&index);
            for t in [&mut sequence, &mut key_mask, &mut positions, &mut input, &mut row_index, &mut ended] {
                *t = t.index_select(0, &index);
            }
            if let Some(fixed) = fixed.as_mut() {
                fixed.rebatch(keep.len() as i64);
            }
            rows = keep.iter().map(|&i| rows[i as usize]).collect();
        }
    }
    Ok(outputs)
}

/// Decoding steps in fixed shape ([`KvCache::fix_shape`]): the step's inputs are copied
/// into buffers of their own, and the position written is opened in the cache's mask,
/// before each step. With `graphs`, the first step runs eagerly and is then captured as a
/// CUDA graph, which the later steps replay; a batch that shrinks is captured again. A
/// capture that fails (some op that cannot be captured) leaves the steps eager, with a
/// warning: outputs are the same either way.
struct FixedSteps {
    input: Tensor,     // (b, 1) ids
    positions: Tensor, // (b, 1)
    write_at: Tensor,  // (1): the cache position the step writes (the cache reads the same tensor)
    graphs: bool,
    /// The captured step and the logits (b, V) each replay overwrites.
    graph: Option<(CudaGraph, Tensor)>,
}

impl FixedSteps {
    /// Switches `cache` to fixed shape after a prefill of `len` positions whose key mask
    /// (b, ≥ len) is `key_mask`: the prompt's tokens are visible, padding and every later
    /// position hidden until a step opens it.
    fn after_prompt(cache: &mut KvCache, key_mask: &Tensor, len: i64, graphs: bool) -> Self {
        let (b, width) = (key_mask.size()[0], cache.capacity());
        let device = key_mask.device();
        let kind = cache.kind();
        let visible = key_mask.narrow(1, 0, len).ne(0);
        let mask = Tensor::full([b, width], f64::NEG_INFINITY, (kind, device));
        let _ = mask.narrow(1, 0, len).masked_fill_(&visible, 0.0);
        let write_at = Tensor::zeros([1], (Kind::Int64, device));
        cache.fix_shape(write_at.shallow_clone(), mask.view([b, 1, 1, width]));
        let mut steps = Self {
            input: Tensor::empty([0], (Kind::Int64, device)),
            positions: Tensor::empty([0], (Kind::Int64, device)),
            write_at,
            graphs,
            graph: None,
        };
        steps.rebatch(b);
        steps
    }

    /// New input buffers for a batch of `b` rows (the cache has kept its rows already);
    /// a captured graph read the old ones, so it goes.
    fn rebatch(&mut self, b: i64) {
        let device = self.write_at.device();
        self.input = Tensor::zeros([b, 1], (Kind::Int64, device));
        self.positions = Tensor::zeros([b, 1], (Kind::Int64, device));
        self.graph = None;
    }

    /// The logits (b, V) of the step that writes position `len - 1`.
    fn step<P: Policy + ?Sized>(
        &mut self,
        policy: &P,
        input: &Tensor,
        positions: &Tensor,
        len: i64,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.input.copy_(input);
        self.positions.copy_(positions);
        let _ = self.write_at.fill_(len - 1);
        let mask = cache.fixed_mask().expect("the cache decodes in fixed shape").shallow_clone();
        let _ = mask.narrow(3, len - 1, 1).fill_(0.0);
        if let Some((graph, logits)) = &self.graph {
            graph.replay()?;
            GRAPH_REPLAYS.with(|n| n.set(n.get() + 1));
            return Ok(logits.shallow_clone());
        }
        let logits = policy.last_logits(&self.input, &self.positions, None, Some(cache))?;
        if self.graphs {
            let device = self.input.device();
            match CudaGraph::capture(device, || policy.last_logits(&self.input, &self.positions, None, Some(cache))) {
                Ok(captured) => self.graph = Some(captured),
                Err(e) => {
                    tracing::warn!("decoding steps run without a CUDA graph: {e}");
                    self.graphs = false;
                }
            }
        }
        Ok(logits)
    }
}

/// Picks the next token of each row of `logits` (B, V) given the tokens `seen` so far
/// (B, L); returns (ids (B), log-probs (B)). Draws by inverse CDF with one uniform
/// number a row from `generator` (none when greedy).
pub fn sample(
    logits: &Tensor,
    seen: &Tensor,
    settings: &GenerationSettings,
    generator: &mut DeviceGenerator,
) -> Result<(Tensor, Tensor)> {
    let rows = if settings.temperature <= 0.0 { 0 } else { logits.size()[0] }; // greedy draws nothing
    let draws = generator.uniform(rows, Kind::Double)?;
    sample_with_draws(logits, seen, settings, &draws)
}

/// [`sample`] with the uniform numbers in [0, 1) given, one per row (B) (unused when
/// greedy), on the logits' device.
pub fn sample_with_draws(
    logits: &Tensor,
    seen: &Tensor,
    settings: &GenerationSettings,
    draws: &Tensor,
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
    let logits = if settings.temperature == 1.0 { logits } else { logits / settings.temperature };
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
    // The cumulative distribution (B, V), and a uniform in [0, 1) per row scaled by each
    // row's total mass.
    let cdf = filtered.softmax(-1, Kind::Double).cumsum(-1, Kind::Double);
    let u = draws.to_kind(Kind::Double).unsqueeze(1) * cdf.narrow(1, vocab - 1, 1);
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
        let (next, log_probs) =
            sample(&logits, &seen, settings, &mut DeviceGenerator::new(tch::Device::Cpu, 3).unwrap()).unwrap();
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

    /// A two-layer Llama with grouped-query attention and a 40-token vocabulary, on `device`.
    fn tiny_llama(device: tch::Device) -> crate::model::llama::LlamaForCausalLm {
        let config = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64
        }))
        .unwrap();
        crate::model::llama::LlamaForCausalLm::new(config, device).unwrap()
    }

    /// The same tokens and finish for every sequence, and log-probs within `tolerance`.
    fn assert_same_outputs(a: &[Generated], b: &[Generated], tolerance: f64, what: &str) {
        for (a, b) in a.iter().zip(b) {
            assert_eq!((&a.tokens, a.finish), (&b.tokens, b.finish), "{what}");
            for (x, y) in a.log_probs.iter().zip(&b.log_probs) {
                assert!((x - y).abs() < tolerance, "{what}: {x} vs {y}");
            }
        }
    }

    /// Sequences finish at different steps (a stop check on their own tokens); with
    /// compaction the finished ones leave the batch, and every sequence's tokens are the
    /// same as without it, greedy and sampled.
    #[test]
    fn finished_rows_leave_the_batch_without_changing_outputs() {
        tch::manual_seed(1);
        let model = tiny_llama(tch::Device::Cpu);
        let prompts: Vec<Vec<i64>> =
            (0..8).map(|i| (0..(2 + i % 5)).map(|j| (3 * i + 7 * j + 1) % 40).collect()).collect();
        // A sequence stops after 1 to 12 tokens, by its first token.
        let check = |tokens: &[i64]| tokens.len() > (tokens[0] % 12) as usize;
        for temperature in [0.0, 1.0] {
            let settings = GenerationSettings { max_new_tokens: 12, temperature, seed: Some(5), ..Default::default() };
            let compacted = generate(&model, &prompts, &settings, Some(&check)).unwrap();
            let plain =
                generate(&model, &prompts, &GenerationSettings { compact: false, ..settings.clone() }, Some(&check))
                    .unwrap();
            // The host reads every token or every 5 (so rows leave the batch at other
            // steps): the same outputs.
            let every = |n| GenerationSettings { check_every: n, ..settings.clone() };
            let every_token = generate(&model, &prompts, &every(1), Some(&check)).unwrap();
            let every_five = generate(&model, &prompts, &every(5), Some(&check)).unwrap();
            let lengths: Vec<usize> = compacted.iter().map(|g| g.tokens.len()).collect();
            assert!(lengths.iter().filter(|&&l| l < 6).count() >= 2 && lengths.iter().any(|&l| l >= 6), "{lengths:?}");
            for other in [&plain, &every_token, &every_five] {
                assert_same_outputs(&compacted, other, 1e-4, &format!("temperature {temperature}"));
            }
        }
    }

    /// Fixed-shape steps (what a CUDA graph replays) give the tokens and log-probs of
    /// steps over the growing cache: left-padded prompts, rows leaving the batch, a stop
    /// token, greedy and sampled.
    #[test]
    fn fixed_shape_steps_give_what_growing_steps_give() {
        let model = tiny_llama(tch::Device::Cpu);
        // Weights of its own: the rows' lengths below depend on them.
        crate::model::generator::redraw_matrices(model.var_store(), 3);
        assert!(model.new_cache(1, 4).offers_fixed_shape());
        let prompts: Vec<Vec<i64>> =
            (0..6).map(|i| (0..(1 + i % 4)).map(|j| (5 * i + 3 * j + 2) % 40).collect()).collect();
        let check = |tokens: &[i64]| tokens.len() >= 2 + (tokens[0] % 9) as usize;
        for temperature in [0.0, 1.0] {
            for stop_tokens in [vec![], vec![7, 11]] {
                let growing = GenerationSettings {
                    max_new_tokens: 14,
                    temperature,
                    seed: Some(9),
                    stop_tokens,
                    steps: StepMode::Growing,
                    ..Default::default()
                };
                let fixed = GenerationSettings { steps: StepMode::FixedShape, ..growing.clone() };
                let a = generate(&model, &prompts, &growing, Some(&check)).unwrap();
                let b = generate(&model, &prompts, &fixed, Some(&check)).unwrap();
                let lengths: Vec<usize> = a.iter().map(|g| g.tokens.len()).collect();
                assert!(lengths.iter().any(|&l| l < 6) && lengths.iter().any(|&l| l >= 8), "{lengths:?}");
                assert_same_outputs(&a, &b, 1e-5, &format!("temperature {temperature}"));
            }
        }
    }

    /// On CUDA, steps replayed as a graph give the eager growing steps' outputs: the same
    /// tokens, greedy and sampled, and log-probs to fp32 rounding.
    #[test]
    fn cuda_graph_steps_give_what_growing_steps_give() {
        let Some(device) = crate::cuda::device_for_test() else { return };
        tch::manual_seed(3);
        let config = serde_json::from_value(serde_json::json!({
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128
        }))
        .unwrap();
        let model = crate::model::llama::LlamaForCausalLm::new(config, device).unwrap();
        let prompts: Vec<Vec<i64>> =
            (0..16).map(|i| (0..(3 + i % 9)).map(|j| (5 * i + 3 * j + 2) % 64).collect()).collect();
        let check = |tokens: &[i64]| tokens.len() >= 4 + (tokens[0] % 40) as usize;
        for temperature in [0.0, 1.0] {
            let growing = GenerationSettings {
                max_new_tokens: 48,
                temperature,
                seed: Some(9),
                steps: StepMode::Growing,
                ..Default::default()
            };
            let replays = graph_replays();
            let a = generate(&model, &prompts, &growing, Some(&check)).unwrap();
            assert_eq!(graph_replays(), replays, "growing steps replay no graph");
            let b = generate(&model, &prompts, &GenerationSettings { steps: StepMode::Auto, ..growing }, Some(&check))
                .unwrap();
            assert!(graph_replays() - replays > 30, "replays: {}", graph_replays() - replays);
            let differ: usize =
                a.iter().zip(&b).map(|(a, b)| a.tokens.iter().zip(&b.tokens).filter(|(x, y)| x != y).count()).sum();
            let tokens: usize = a.iter().map(|g| g.tokens.len()).sum();
            eprintln!("temperature {temperature}: {differ} of {tokens} tokens differ");
            assert_same_outputs(&a, &b, 1e-4, &format!("temperature {temperature}"));
        }
    }

    /// The host reads the device once every `check_every` tokens, not once a token: 64 new
    /// tokens for 6 sequences read it 8 times at 8, and 64 times at 1. A stop token ends
    /// a row on the device; the host sees it at its next read, and generation ends at the
    /// read after the last row has stopped.
    #[test]
    fn the_host_reads_the_device_once_every_check_every_tokens() {
        tch::manual_seed(2);
        let config = serde_json::from_value(serde_json::json!({
            "vocab_size": 30, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 128
        }))
        .unwrap();
        let model = crate::model::llama::LlamaForCausalLm::new(config, tch::Device::Cpu).unwrap();
        let prompts: Vec<Vec<i64>> = (0..6).map(|i| (0..(3 + i)).map(|j| (5 * i + j) % 30).collect()).collect();
        let reads = |settings: &GenerationSettings| {
            let before = host_reads();
            let out = generate(&model, &prompts, settings, None).unwrap();
            (host_reads() - before, out)
        };
        let settings = GenerationSettings { max_new_tokens: 64, seed: Some(1), ..Default::default() };
        let (batched, out) = reads(&settings);
        assert_eq!(batched, 64 / 8, "one read per 8 tokens");
        assert!(out.iter().all(|g| g.tokens.len() == 64 && g.log_probs.iter().all(|&l| l <= 0.0)));
        let (every, same) = reads(&GenerationSettings { check_every: 1, ..settings.clone() });
        assert_eq!((every, &same), (64, &out), "one read per token, the same tokens");
        // With a stop token that every sequence soon draws, generation ends early, and the
        // reads are still one per 8 steps taken.
        let stop = GenerationSettings { stop_tokens: (0..20).collect(), ..settings };
        let (stopped_reads, stopped) = reads(&stop);
        let longest = stopped.iter().map(|g| g.tokens.len()).max().unwrap();
        assert!(stopped.iter().all(|g| g.finish == Finish::StopToken && (0..20).contains(g.tokens.last().unwrap())));
        assert_eq!(
            stopped_reads,
            longest.div_ceil(8),
            "lengths {:?}",
            stopped.iter().map(|g| g.tokens.len()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let logits = Tensor::from_slice(&[2.0f32, -2.0, 1.0]).unsqueeze(0);
        let seen = Tensor::from_slice(&[0i64, 1]).unsqueeze(0);
        let settings = GenerationSettings { temperature: 0.0, repetition_penalty: 4.0, ..Default::default() };
        // Penalised: [0.5, -8, 1] -> token 2 wins.
        let (next, _) =
            sample(&logits, &seen, &settings, &mut DeviceGenerator::new(tch::Device::Cpu, 0).unwrap()).unwrap();
        assert_eq!(next.int64_value(&[0]), 2);
    }
}

//! The scores of given tokens under a causal LM's head — the log-prob of each target and,
//! on request, the entropy of each position's distribution — without the whole logits.
//!
//! Over a large vocabulary the logits dominate a training step's memory: at 4 × 512
//! positions and 32 000 tokens they are 262 MB in fp32, and the plain way keeps them (or
//! their log-softmax) for backward and allocates as much again for their gradient. Here the
//! head and the cross-entropy run together, [`HeadChunks`] rows at a time, in one autograd
//! node of plumb's C++ shim (`LinearCrossEntropy` in `core/csrc/shim.cpp`; `tch` has no
//! custom autograd functions): backward keeps the hidden states and one logsumexp per row,
//! and recomputes each chunk's logits (one more matmul of the head) to turn them straight
//! into gradients; logits that are one small chunk (at most 2^20 numbers) are kept
//! instead, as their softmax. Liger-Kernel's fused linear cross-entropy and Apple's "Cut Your Losses
//! in Large-Vocabulary Language Models" (Wijmans et al. 2024) do the same on GPUs.
use tch::{Kind, Tensor};

use crate::data::objectives::IGNORE_INDEX;
use crate::error::Result;
use crate::shim::{self, raw};

/// The most logits (rows × vocabulary) a chunk holds by default: 2^24 fp32 numbers,
/// 64 MiB (524 rows of a 32 000-token vocabulary; a small vocabulary is one chunk).
pub const CHUNK_LOGITS: i64 = 1 << 24;

/// How many positions' logits exist at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadChunks {
    /// At most [`CHUNK_LOGITS`] logits at a time.
    #[default]
    Auto,
    /// This many rows (positions) at a time.
    Rows(i64),
    /// Every position's logits at once, kept for backward as a plain head and
    /// `log_softmax` keep them: the reference, and the "before" of `plumb bench train`.
    Whole,
}

impl HeadChunks {
    /// Rows per chunk for a vocabulary of `vocab`; None for [`HeadChunks::Whole`].
    pub fn rows(self, vocab: i64) -> Option<i64> {
        match self {
            HeadChunks::Auto => Some((CHUNK_LOGITS / vocab.max(1)).max(1)),
            HeadChunks::Rows(n) => Some(n.max(1)),
            HeadChunks::Whole => None,
        }
    }
}

/// What [`token_scores`] computes besides the log-probs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreOptions {
    /// The logits are divided by it (a sampling temperature; 1 for training losses).
    pub temperature: f64,
    /// Also each position's entropy (no gradient: a statistic).
    pub entropy: bool,
    pub chunks: HeadChunks,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self { temperature: 1.0, entropy: false, chunks: HeadChunks::Auto }
    }
}

/// Per-position scores of given tokens.
pub struct TokenScores {
    /// log p(target) at each position (..), 0 where the target is [`IGNORE_INDEX`]; fp32,
    /// differentiable in the hidden states and the head.
    pub log_probs: Tensor,
    /// The entropy of each position's distribution (..), when asked for.
    pub entropy: Option<Tensor>,
}

/// The scores of `targets` (..) under logits = `hidden` (.., C) · `weight` (V, C)ᵀ /
/// temperature, computed as `options.chunks` says; the matmul runs in the hidden states'
/// dtype (or autocast's), the softmax in fp32. Targets equal to [`IGNORE_INDEX`] score 0.
pub fn token_scores(hidden: &Tensor, weight: &Tensor, targets: &Tensor, options: &ScoreOptions) -> Result<TokenScores> {
    let shape = targets.size();
    let channels = hidden.size()[hidden.dim() - 1];
    let (vocab, _) = weight.size2()?;
    let rows = match options.chunks.rows(vocab) {
        Some(rows) => rows,
        None => {
            let logits = hidden.matmul(&weight.tr());
            return Ok(scores_from_logits(&logits, targets, options));
        }
    };
    let (hidden, targets) = (hidden.reshape([-1, channels]), targets.reshape([-1]).to_kind(Kind::Int64));
    let (mut nll, mut entropy) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the three tensors are alive for the call; the shim hands back two new
    // at::Tensor objects that the Tensors below own (and free).
    let code = unsafe {
        shim::plumb_linear_cross_entropy(
            raw(&hidden),
            raw(weight),
            raw(&targets),
            rows,
            1.0 / options.temperature,
            IGNORE_INDEX,
            options.entropy,
            &mut nll,
            &mut entropy,
        )
    };
    shim::check(code, "chunked LM head")?;
    // SAFETY: both pointers were just allocated by the shim for us.
    let (nll, entropy) = unsafe { (Tensor::from_ptr(nll as _), Tensor::from_ptr(entropy as _)) };
    Ok(TokenScores {
        log_probs: -nll.view(shape.as_slice()),
        entropy: options.entropy.then(|| entropy.view(shape.as_slice())),
    })
}

/// The same scores from whole logits (.., V): log-softmax in fp32, gathered.
pub fn scores_from_logits(logits: &Tensor, targets: &Tensor, options: &ScoreOptions) -> TokenScores {
    let logits = logits.to_kind(Kind::Float) / options.temperature;
    let valid = targets.ne(IGNORE_INDEX);
    let safe = targets.to_kind(Kind::Int64).masked_fill(&valid.logical_not(), 0).unsqueeze(-1);
    let log_probs = logits.log_softmax(-1, Kind::Float).gather(-1, &safe, false).squeeze_dim(-1) * valid;
    let entropy = options.entropy.then(|| {
        let _no_grad = tch::no_grad_guard();
        let probs = logits.softmax(-1, Kind::Float);
        logits.logsumexp([-1].as_slice(), false)
            - (probs * &logits).sum_dim_intlist([-1].as_slice(), false, Kind::Float)
    });
    TokenScores { log_probs, entropy }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn grads(of: &Tensor, wrt: &[&Tensor]) -> Vec<Tensor> {
        Tensor::run_backward(&[of], wrt, false, false)
    }

    /// Chunked and whole give the same log-probs, entropies and gradients (hidden and
    /// head), with ignored targets, a temperature and a last chunk shorter than the rest.
    #[test]
    fn chunks_match_the_whole_logits_and_their_gradients() {
        tch::manual_seed(3);
        let hidden = Tensor::randn([3, 7, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let weight = (Tensor::randn([50, 16], (Kind::Float, Device::Cpu)) * 0.3).set_requires_grad(true);
        let targets = Tensor::randint(50, [3, 7], (Kind::Int64, Device::Cpu));
        let _ = targets.narrow(1, 0, 2).fill_(IGNORE_INDEX);
        // A weighted sum, so every position's gradient is scaled differently.
        let weights = Tensor::rand([3, 7], (Kind::Float, Device::Cpu));
        let run = |chunks| {
            let options = ScoreOptions { temperature: 0.7, entropy: true, chunks };
            let scores = token_scores(&hidden, &weight, &targets, &options).unwrap();
            let loss = (&scores.log_probs * &weights).sum(Kind::Float);
            let g = grads(&loss, &[&hidden, &weight]);
            (scores.log_probs.detach(), scores.entropy.unwrap(), g)
        };
        let (whole, whole_entropy, whole_grads) = run(HeadChunks::Whole);
        assert_eq!(whole.narrow(1, 0, 2).abs().max().double_value(&[]), 0.0, "ignored targets score 0");
        for rows in [1, 4, 21, 100] {
            let (chunked, entropy, chunked_grads) = run(HeadChunks::Rows(rows));
            let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            assert!(diff(&chunked, &whole) < 1e-5, "rows {rows}: log-probs differ by {}", diff(&chunked, &whole));
            assert!(diff(&entropy, &whole_entropy) < 1e-5, "rows {rows}: entropy");
            for (a, b) in chunked_grads.iter().zip(&whole_grads) {
                assert!(diff(a, b) < 1e-5, "rows {rows}: gradient differs by {}", diff(a, b));
            }
            assert_eq!(chunked_grads[0].select(1, 0).abs().max().double_value(&[]), 0.0, "no gradient from ignored");
        }
    }

    #[test]
    fn auto_chunks_hold_at_most_the_budget() {
        assert_eq!(HeadChunks::Auto.rows(32_000), Some(524));
        assert_eq!(HeadChunks::Auto.rows(1 << 30), Some(1));
        assert_eq!(HeadChunks::Whole.rows(10), None);
    }
}

//! Models: the `Policy` contract and one file per model family.
pub mod llama;

use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::error::Result;

/// Sampling settings for [`Policy::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: i64,
    /// Nucleus sampling; 1.0 keeps all.
    pub top_p: f64,
    /// Token ids that end a sequence (not included in the output).
    pub stop_tokens: Vec<i64>,
    /// Seeds libtorch's generator before sampling, for reproducible samples.
    pub seed: Option<u64>,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 1.0, top_k: 0, top_p: 1.0, stop_tokens: Vec::new(), seed: None }
    }
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens only.
    pub tokens: Vec<i64>,
    /// Log-probability of each new token under the (unmodified) model distribution.
    pub log_probs: Vec<f64>,
    /// True when a stop token ended it.
    pub stopped: bool,
}

/// A causal language model that plugins train and sample from.
pub trait Policy {
    /// input_ids: (B, T) int64; attention_mask: (B, T) 1 = token, 0 = padding.
    /// Returns logits (B, T, vocab).
    fn logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor>;

    /// Log-probability of each next token: (B, T-1), entry t scores input_ids[:, t+1].
    fn log_probs(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let logits = self.logits(input_ids, attention_mask)?;
        let t = logits.size()[1];
        let log_probs = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
        let targets = input_ids.narrow(1, 1, t - 1).unsqueeze(-1);
        Ok(log_probs.gather(-1, &targets, false).squeeze_dim(-1))
    }

    /// Continues each prompt (token ids). This default recomputes the whole sequence
    /// for every new token, one prompt at a time; families override it with a KV cache.
    fn generate(&self, prompts: &[Vec<i64>], settings: &GenerationSettings) -> Result<Vec<Generated>> {
        let _no_grad = tch::no_grad_guard();
        if let Some(seed) = settings.seed {
            tch::manual_seed(seed as i64);
        }
        let device = self.var_store().device();
        prompts
            .iter()
            .map(|prompt| {
                let mut tokens = prompt.clone();
                let mut out = Generated { tokens: Vec::new(), log_probs: Vec::new(), stopped: false };
                for _ in 0..settings.max_new_tokens {
                    let input = Tensor::from_slice(&tokens).to_device(device).unsqueeze(0);
                    let logits = self.logits(&input, None)?.select(1, -1).squeeze_dim(0); // (V)
                    let next = sample(&logits, settings)?;
                    let log_prob = logits.log_softmax(-1, Kind::Float).double_value(&[next]);
                    if settings.stop_tokens.contains(&next) {
                        out.stopped = true;
                        break;
                    }
                    tokens.push(next);
                    out.tokens.push(next);
                    out.log_probs.push(log_prob);
                }
                Ok(out)
            })
            .collect()
    }

    /// The trainable variables (and the device they live on).
    fn var_store(&self) -> &nn::VarStore;

    /// Writes the weights and `config.json` in HF layout into `dir` (which exists).
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Picks the next token from logits (V) under the settings: greedy, or temperature,
/// top-k and top-p sampling with libtorch's generator.
pub fn sample(logits: &Tensor, settings: &GenerationSettings) -> Result<i64> {
    if settings.temperature <= 0.0 {
        return Ok(logits.argmax(-1, false).int64_value(&[]));
    }
    let mut logits = logits.to_kind(Kind::Float) / settings.temperature;
    let vocab = logits.size()[0];
    if settings.top_k > 0 && settings.top_k < vocab {
        let (top, _) = logits.topk(settings.top_k, -1, true, true);
        let threshold = top.select(0, settings.top_k - 1);
        logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if settings.top_p < 1.0 {
        let (sorted, order) = logits.sort(-1, true);
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        // Drop a token when the mass before it already reaches top_p (the first always stays).
        let before = &cumulative - sorted.softmax(-1, Kind::Float);
        let drop_sorted = before.ge(settings.top_p);
        let drop = drop_sorted.scatter(-1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    let probs = logits.softmax(-1, Kind::Float);
    Ok(probs.f_multinomial(1, false)?.int64_value(&[0]))
}

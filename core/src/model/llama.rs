//! The Llama family as published on the HF hub: Llama 2/3/3.1/3.2, Qwen2/Qwen2.5,
//! Mistral, SmolLM. A decoder-only transformer with RMSNorm, rotary position
//! embeddings (with `linear`, `dynamic` and `llama3` scaling), SwiGLU, grouped-query
//! attention through `scaled_dot_product_attention`, optional attention biases (Qwen2's
//! q/k/v biases), sliding-window layers (Mistral, Qwen2), tied or untied embeddings.
//!
//! Paper: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models".
//! Reference: transformers/models/{llama,qwen2,mistral}/modeling_*.py. Variable paths
//! equal the HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`), so a
//! checkpoint loads by a key-by-key copy.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::cache::{attention_mask, KvCache};
use super::family::{Architecture, CausalLm, Pretrained};
use super::lora::Linear;
use super::recompute::{self, Shared};
use super::rope::{self, Rope, RopeScaling};
use super::vars::{Embedding, Vars};
use crate::error::{Error, Result};

/// `config.json` as HF writes it for `LlamaForCausalLM`, `Qwen2ForCausalLM` and
/// `MistralForCausalLM` (HF's field names; fields we do not use are ignored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Older configs; transformers 5 puts it inside `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5: `{"rope_type": ..., "rope_theta": ..., ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: biases on q/k/v/o. (Qwen2 always has q/k/v biases and no o bias.)
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: sliding windows only when this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_initializer_range() -> f64 {
    0.02
}

/// The model types this family covers.
pub const MODEL_TYPES: [&str; 3] = ["llama", "qwen2", "mistral"];

/// The resolved configuration: no options left.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub max_positions: i64,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per layer: the attention window, or None for full attention.
    pub windows: Vec<Option<i64>>,
    pub initializer_range: f64,
}

impl LlamaConfig {
    /// Checks and resolves; every unsupported option is an error naming its field.
    pub fn resolve(&self) -> Result<Config> {
        let field = |name: &str, message: String| Error::config(name, message);
        if !MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(field(
                "model_type",
                format!("unsupported model_type `{}`; this family covers {}", self.model_type, MODEL_TYPES.join(", ")),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(field("hidden_act", format!("unsupported activation `{}`; expected `silu`", self.hidden_act)));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(field(name, "expected a positive integer, found 0".into()));
            }
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(field(
                "num_key_value_heads",
                format!("expected a positive divisor of num_attention_heads ({heads}), found {kv_heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(heads) => self.hidden_size / heads,
            None => {
                return Err(field(
                    "num_attention_heads",
                    format!("hidden_size ({}) is not divisible by num_attention_heads ({heads})", self.hidden_size),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(field("head_dim", format!("rotary embeddings need an even head_dim, found {head_dim}")));
        }
        let max_positions = self.max_position_embeddings as i64;
        let params = self.rope_parameters.as_ref().and_then(Value::as_object);
        let theta = self
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10_000.0);
        let scaling = match (&self.rope_scaling, &self.rope_parameters) {
            (Some(s), _) if !s.is_null() => RopeScaling::from_hf(Some(s), "rope_scaling", max_positions)?,
            (_, Some(p)) => RopeScaling::from_hf(Some(p), "rope_parameters", max_positions)?,
            _ => RopeScaling::None,
        };
        let qwen2 = self.model_type == "qwen2";
        Ok(Config {
            model_type: self.model_type.clone(),
            vocab_size: self.vocab_size as i64,
            hidden_size: self.hidden_size as i64,
            intermediate_size: self.intermediate_size as i64,
            num_layers: self.num_hidden_layers,
            num_heads: heads as i64,
            num_kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
            max_positions,
            rms_norm_eps: self.rms_norm_eps,
            rope: Rope { theta, head_dim: head_dim as i64, scaling },
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: qwen2 || self.attention_bias,
            o_bias: !qwen2 && self.attention_bias,
            mlp_bias: self.mlp_bias,
            windows: self.windows()?,
            initializer_range: self.initializer_range,
        })
    }

    /// The attention window of each layer, from `layer_types` (transformers 5) or the
    /// older per-family fields.
    fn windows(&self) -> Result<Vec<Option<i64>>> {
        let layers = self.num_hidden_layers;
        let window = self.sliding_window.map(|w| w as i64);
        let need_window = || {
            window.ok_or_else(|| {
                Error::config("sliding_window", "sliding-window layers need `sliding_window`".to_string())
            })
        };
        if let Some(types) = &self.layer_types {
            if types.len() != layers {
                return Err(Error::config(
                    "layer_types",
                    format!("expected {layers} entries (num_hidden_layers), found {}", types.len()),
                ));
            }
            return types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => need_window().map(Some),
                    other => Err(Error::config(
                        format!("layer_types[{i}]"),
                        format!("unsupported layer type `{other}`; expected full_attention or sliding_attention"),
                    )),
                })
                .collect();
        }
        Ok(match self.model_type.as_str() {
            "mistral" => vec![window; layers],
            "qwen2" if self.use_sliding_window == Some(true) => {
                let first = self.max_window_layers.unwrap_or(layers);
                let w = need_window()?;
                (0..layers).map(|i| (i >= first).then_some(w)).collect()
            }
            _ => vec![None; layers],
        })
    }

    /// `config.json` for saving, with the fields `transformers` expects.
    pub fn to_hf_json(&self) -> Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            let architecture = match self.model_type.as_str() {
                "qwen2" => "Qwen2ForCausalLM",
                "mistral" => "MistralForCausalLM",
                _ => "LlamaForCausalLM",
            };
            map.insert("architectures".into(), serde_json::json!([architecture]));
            map.insert("torch_dtype".into(), serde_json::json!("float32"));
            map.retain(|_, v| !v.is_null());
        }
        json
    }
}

fn linear(vars: Vars, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    vars.adaptable_linear(in_dim, out_dim, config)
}

/// Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vars: Vars, dim: i64, eps: f64) -> Self {
        Self { weight: vars.var("weight", &[dim], nn::Init::Const(1.0)), eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        if let Some(y) = super::fused::rms_norm(x, &self.weight, self.eps) {
            return y; // one kernel each way on a CPU
        }
        let kind = x.kind();
        if kind == Kind::Float && self.weight.kind() == Kind::Float {
            // One kernel instead of six (a decoding step is launch-bound); the same bits,
            // and the same gradients, as the formula below.
            let dim = x.size().last().copied().unwrap_or(0);
            return x.internal_fused_rms_norm([dim], Some(&self.weight), self.eps).0;
        }
        // As transformers: normalise in fp32, cast back, then scale.
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.square().mean_dim(-1, true, Kind::Float);
        &self.weight * (&x32 * (variance + self.eps).rsqrt()).to_kind(kind)
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    window: Option<i64>,
}

impl Attention {
    fn new(vars: Vars, c: &Config, window: Option<i64>) -> Self {
        let std = c.initializer_range;
        let (h, hd) = (c.hidden_size, c.head_dim);
        Self {
            q_proj: linear(&vars / "q_proj", h, c.num_heads * hd, c.qkv_bias, std),
            k_proj: linear(&vars / "k_proj", h, c.num_kv_heads * hd, c.qkv_bias, std),
            v_proj: linear(&vars / "v_proj", h, c.num_kv_heads * hd, c.qkv_bias, std),
            o_proj: linear(&vars / "o_proj", c.num_heads * hd, h, c.o_bias, std),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
            window,
        }
    }

    /// x: (B, T, C); cos/sin: (B, 1, T, hd) ([`Rope::cos_sin`]); `masks` gives the additive mask of this layer's
    /// kind, or None for plain causal attention. The output (B, T − from, C) is that of the
    /// queries at positions `from..` (the mask's rows for them, when `from` > 0).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        from: i64,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap_or((0, 0, 0));
        let heads = |x: &Tensor, proj: &Linear, n: i64| {
            let t = x.size()[1];
            proj.forward(x).view([b, t, n, self.head_dim]).transpose(1, 2)
        };
        let q = match from {
            0 => rope::apply(&heads(x, &self.q_proj, self.num_heads), cos, sin), // (B, nh, T, hd)
            _ => {
                let n = t - from;
                let q = heads(&x.narrow(1, from, n), &self.q_proj, self.num_heads); // (B, nh, T − from, hd)
                rope::apply(&q, &cos.narrow(2, from, n), &sin.narrow(2, from, n))
            }
        };
        let mask = mask.map(|m| if from > 0 { m.narrow(2, from, t - from) } else { m.shallow_clone() });
        let (mask, t) = (mask.as_ref(), t - from);
        let k = rope::apply(&heads(x, &self.k_proj, self.num_kv_heads), cos, sin); // (B, nkv, T, hd)
        let v = heads(x, &self.v_proj, self.num_kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v), // (B, nkv, past + T, hd)
            None => (k, v),
        };
        let gqa = self.num_kv_heads != self.num_heads;
        // Without a mask: causal over the new positions, or, for one new position after
        // the cache (a decoding step without padding), every key.
        let causal = mask.is_none() && t > 1;
        let y = super::attention::scaled_dot_product_attention(&q, &k, &v, mask, causal, None, gqa); // (B, nh, T, hd)
        let y = y.transpose(1, 2).contiguous().view([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(&y)
    }
}

/// SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)).
#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(vars: Vars, c: &Config) -> Self {
        let (std, bias) = (c.initializer_range, c.mlp_bias);
        Self {
            gate_proj: linear(&vars / "gate_proj", c.hidden_size, c.intermediate_size, bias, std),
            up_proj: linear(&vars / "up_proj", c.hidden_size, c.intermediate_size, bias, std),
            down_proj: linear(&vars / "down_proj", c.intermediate_size, c.hidden_size, bias, std),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (gate, up) = (self.gate_proj.forward(x), self.up_proj.forward(x));
        let hidden = super::fused::swiglu(&gate, &up).unwrap_or_else(|| gate.silu() * up);
        self.down_proj.forward(&hidden)
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(vars: Vars, c: &Config, window: Option<i64>) -> Self {
        Self {
            input_layernorm: RmsNorm::new(&vars / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            self_attn: Attention::new(&vars / "self_attn", c, window),
            post_attention_layernorm: RmsNorm::new(&vars / "post_attention_layernorm", c.hidden_size, c.rms_norm_eps),
            mlp: Mlp::new(&vars / "mlp", c),
        }
    }

    /// The block's output (B, T − from, C) at positions `from..` ([`Attention::forward`]).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        from: i64,
    ) -> Tensor {
        let attention = self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask, cache, from);
        let x = match from {
            0 => x + attention,
            _ => x.narrow(1, from, x.size()[1] - from) + attention,
        };
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}

/// The decoder stack with its LM head: `*ForCausalLM`.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    /// Shared with the closures of checkpointed blocks ([`recompute`]).
    layers: Vec<Shared<Block>>,
    norm: RmsNorm,
    /// None when tied to `embed_tokens`.
    lm_head: Option<Linear>,
    /// The rotary inverse frequencies, when they do not depend on the positions.
    inv_freq: Option<Tensor>,
    config: Config,
}

impl Llama {
    /// The model's variables under `root` (`model.*`, and `lm_head.*` when
    /// `with_lm_head` and untied), fresh or for a checkpoint to fill (see [`Vars`]).
    fn build(root: &Vars, config: &Config, with_lm_head: bool) -> Self {
        let model = root / "model";
        let embed_config = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: config.initializer_range },
            ..Default::default()
        };
        let embed_tokens = (&model / "embed_tokens").embedding(config.vocab_size, config.hidden_size, embed_config);
        let layers = config
            .windows
            .iter()
            .enumerate()
            .map(|(i, &w)| Shared::new(Block::new(&model / "layers" / i, config, w)))
            .collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (with_lm_head && !config.tie_word_embeddings)
            .then(|| linear(root / "lm_head", config.hidden_size, config.vocab_size, false, config.initializer_range));
        let inv_freq = config.rope.fixed_inv_freq(embed_tokens.ws.device());
        Self { embed_tokens, layers, norm, lm_head, inv_freq, config: config.clone() }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The final hidden states (B, T, C) of `input_ids` (B, T) at `positions` (B, T).
    /// `attention_mask` (B, past + T) marks tokens with 1 and padding with 0; with a
    /// cache, the new keys and values are appended to it.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.hidden_states_of(input_ids, positions, attention_mask, cache, 0)
    }

    /// [`Self::hidden_states`] of positions `from..` (B, T − from, C) (0 with a cache): the
    /// last block computes queries, attention output and MLP for these positions only.
    fn hidden_states_of(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        from: i64,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.size2()?;
        if let Some(mask) = cache.as_ref().and_then(|c| c.fixed_mask()).map(Tensor::shallow_clone) {
            // A fixed-shape decoding step (KvCache::fix_shape): every layer attends under
            // the cache's mask; nothing here depends on how far the cache is filled.
            let (cos, sin) = self.config.rope.cos_sin(positions, self.embed_tokens.ws.kind(), self.inv_freq.as_ref());
            let mut x = self.embed_tokens.forward(input_ids);
            for (i, layer) in self.layers.iter().enumerate() {
                x = layer.forward(&x, &cos, &sin, Some(&mask), cache.as_deref_mut().map(|c| (c, i)), 0);
            }
            return Ok(self.norm.forward(&x));
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(cache) = &cache {
            if past + t > cache.capacity() {
                return Err(Error::Other(format!(
                    "the KV cache holds {} positions; {} are needed",
                    cache.capacity(),
                    past + t
                )));
            }
        }
        let (cos, sin) = self.config.rope.cos_sin(positions, self.embed_tokens.ws.kind(), self.inv_freq.as_ref());
        // One mask per window size; None = plain causal (the fast path of SDPA), which is
        // also all a decoding step without padding needs (one query sees every key).
        // A causal mask for the queries `from..` alone is not SDPA's is_causal (which aligns
        // the first query with the first key): it is the full mask's last rows.
        let from = if cache.is_some() { 0 } else { from.clamp(0, t) };
        let needs_mask = attention_mask.is_some()
            || from > 0
            || (past > 0 && t > 1)
            || self.config.windows.iter().any(|w| w.is_some_and(|w| w < past + t));
        let key_mask = match attention_mask {
            Some(m) => m.shallow_clone(),
            None => Tensor::ones([b, past + t], (Kind::Int64, input_ids.device())),
        };
        let full_mask = needs_mask.then(|| attention_mask_in(&key_mask, past, t, None, self.embed_tokens.ws.kind()));
        let mut window_masks: Vec<(i64, Tensor)> = Vec::new();
        let mut x = self.embed_tokens.forward(input_ids); // (B, T, C)
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            // Only the last block's outputs are read at `from..` alone; earlier ones are
            // every later position's keys and values.
            let from = if i == last { from } else { 0 };
            let mask = match layer.self_attn.window {
                Some(w) if needs_mask => {
                    if !window_masks.iter().any(|(size, _)| *size == w) {
                        window_masks.push((w, attention_mask_in(&key_mask, past, t, Some(w), x.kind())));
                    }
                    window_masks.iter().find(|(size, _)| *size == w).map(|(_, m)| m)
                }
                _ => full_mask.as_ref(),
            };
            x = if recompute::wanted() && cache.is_none() {
                // Keep only x; the block's activations are recomputed in backward.
                let (layer, cos, sin) = (layer.clone(), cos.shallow_clone(), sin.shallow_clone());
                let mask = mask.map(Tensor::shallow_clone);
                recompute::checkpoint(&[&x], move |x| Ok(layer.forward(&x[0], &cos, &sin, mask.as_ref(), None, from)))?
            } else {
                layer.forward(&x, &cos, &sin, mask, cache.as_deref_mut().map(|c| (c, i)), from)
            };
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        Ok(self.norm.forward(&x))
    }

    /// Logits (B, T, vocab) from hidden states.
    pub fn lm_head(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => super::lora::linear(hidden, &self.embed_tokens.ws, None),
        }
    }

    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let c = &self.config;
        let ws = &self.embed_tokens.ws;
        let cache = KvCache::new(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim, ws.kind(), ws.device());
        // Fixed-shape steps need rotary frequencies that do not depend on the positions
        // (all scalings but dynamic) and one mask for every layer (no sliding windows).
        if self.inv_freq.is_some() && c.windows.iter().all(Option::is_none) {
            cache.offering_fixed_shape()
        } else {
            cache
        }
    }
}

/// The additive mask in the dtype of the activations.
fn attention_mask_in(key_mask: &Tensor, past: i64, t: i64, window: Option<i64>, kind: Kind) -> Tensor {
    attention_mask(key_mask, past, t, window).to_kind(kind)
}

impl Architecture for Llama {
    type HfConfig = LlamaConfig;
    type Config = Config;

    fn resolve(hf: LlamaConfig) -> Result<(LlamaConfig, Config)> {
        let config = hf.resolve()?;
        Ok((hf, config))
    }

    fn build(vars: &Vars, config: &Config) -> Self {
        Self::build(vars, config, true)
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn hf_json(hf: &LlamaConfig) -> Value {
        hf.to_hf_json()
    }

    fn generation_ids(hf: &LlamaConfig) -> Option<[(&'static str, Option<Value>); 3]> {
        Some([
            ("bos_token_id", hf.bos_token_id.clone()),
            ("eos_token_id", hf.eos_token_id.clone()),
            ("pad_token_id", hf.pad_token_id.clone()),
        ])
    }
}

impl CausalLm for Llama {
    fn build_backbone(vars: &Vars, config: &Config) -> Self {
        Self::build(vars, config, false)
    }

    fn hidden_states(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Llama::hidden_states(self, input_ids, positions, attention_mask, cache)
    }

    fn hidden_states_from(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        from: i64,
    ) -> Result<Tensor> {
        self.hidden_states_of(input_ids, positions, attention_mask, None, from)
    }

    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        Llama::lm_head(self, hidden)
    }

    fn lm_head_weight(&self) -> Option<&Tensor> {
        Some(self.lm_head.as_ref().map_or(&self.embed_tokens.ws, |head| &head.ws))
    }

    fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        Llama::new_cache(self, batch, capacity)
    }

    fn context_length(&self) -> Option<i64> {
        match self.config.rope.scaling {
            RopeScaling::Dynamic { .. } => None, // made to run past max_position_embeddings
            _ => Some(self.config.max_positions),
        }
    }

    fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    fn initializer_range(&self) -> f64 {
        self.config.initializer_range
    }

    fn sequence_classification(hf: &LlamaConfig) -> &'static str {
        match hf.model_type.as_str() {
            "qwen2" => "Qwen2ForSequenceClassification",
            "mistral" => "MistralForSequenceClassification",
            _ => "LlamaForSequenceClassification",
        }
    }
}

/// A Llama-family model with its variables and HF config: the [`super::Policy`] plugins train.
pub type LlamaForCausalLm = Pretrained<Llama>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Policy;

    fn tiny(tie: bool, kv_heads: usize) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": kv_heads, "max_position_embeddings": 32,
            "tie_word_embeddings": tie
        }))
        .unwrap()
    }

    fn model(tie: bool, kv_heads: usize) -> LlamaForCausalLm {
        tch::manual_seed(0);
        LlamaForCausalLm::new(tiny(tie, kv_heads), tch::Device::Cpu).unwrap()
    }

    fn ids(v: &[i64]) -> Tensor {
        Tensor::from_slice(v).view([1, -1])
    }

    #[test]
    fn a_token_never_sees_the_future() {
        let m = model(false, 2);
        let a = m.logits(&ids(&[1, 2, 3, 4, 5]), None).unwrap();
        let b = m.logits(&ids(&[1, 2, 3, 9, 9]), None).unwrap();
        let diff = (a.narrow(1, 0, 3) - b.narrow(1, 0, 3)).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        let later = (a.narrow(1, 3, 2) - b.narrow(1, 3, 2)).abs().max().double_value(&[]);
        assert!(later > 1e-4, "changed tokens change later logits");
    }

    #[test]
    fn hidden_states_from_a_position_are_the_whole_ones_narrowed_with_the_same_gradients() {
        // Grouped heads; the second config's last layer attends within a window of 3.
        let windowed: LlamaConfig = serde_json::from_value(serde_json::json!({
            "model_type": "mistral", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32, "sliding_window": 3
        }))
        .unwrap();
        tch::manual_seed(3);
        let models = [model(false, 2), LlamaForCausalLm::new(windowed, tch::Device::Cpu).unwrap()];
        let input = Tensor::from_slice(&[0i64, 0, 5, 6, 7, 8, 9, 3, 1, 2, 3, 4, 5, 6, 7, 8]).view([2, 8]);
        let padding = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 8]);
        let upstream = Tensor::randn([2, 3, 16], (Kind::Float, tch::Device::Cpu));
        for m in &models {
            for (mask, checkpointed) in [(None, false), (Some(&padding), false), (Some(&padding), true)] {
                let _recompute = recompute::enable(checkpointed);
                let positions = crate::model::default_positions(&input, mask).unwrap();
                let gradients = |hidden: Tensor| {
                    let variables = m.var_store().trainable_variables();
                    variables.iter().filter(|v| v.grad().defined()).for_each(|v| {
                        let _ = v.grad().zero_();
                    });
                    (&hidden * &upstream).sum(Kind::Float).backward();
                    let grads: Vec<Tensor> = variables
                        .iter()
                        .map(|v| if v.grad().defined() { v.grad().copy() } else { v.zeros_like() })
                        .collect();
                    (hidden, grads)
                };
                let (whole, expected) =
                    gradients(m.model().hidden_states(&input, &positions, mask, None).unwrap().narrow(1, 5, 3));
                let (tail, got) = gradients(m.model().hidden_states_from(&input, &positions, mask, 5).unwrap());
                let diff = (&whole - &tail).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "mask {}: {diff}", mask.is_some());
                for (want, have) in expected.iter().zip(&got) {
                    let scale = want.abs().max().double_value(&[]).max(1.0);
                    let diff = (want - have).abs().max().double_value(&[]) / scale;
                    assert!(
                        diff < 1e-6,
                        "mask {}, checkpointed {checkpointed}: gradients differ by {diff}",
                        mask.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn padded_keys_are_hidden_by_the_mask() {
        let m = model(true, 4);
        let plain = m.logits(&ids(&[5, 6, 7]), None).unwrap();
        let right = m.logits(&ids(&[5, 6, 7, 0, 0]), Some(&ids(&[1, 1, 1, 0, 0]))).unwrap();
        let diff = (plain - right.narrow(1, 0, 3)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        // A row of padding queries would be all -inf; it attends to itself instead.
        let left = m.logits(&ids(&[0, 0, 5, 6, 7]), Some(&ids(&[0, 0, 1, 1, 1]))).unwrap();
        assert_eq!(left.isfinite().all().int64_value(&[]), 1);
    }

    #[test]
    fn a_saved_model_loads_back_with_the_same_logits() {
        let m = model(false, 2);
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let loaded = LlamaForCausalLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
        let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6]);
        let diff = (m.logits(&x, None).unwrap() - loaded.logits(&x, None).unwrap()).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0);
        assert_eq!(loaded.hf_config(), m.hf_config());
    }

    #[test]
    fn a_checkpoint_with_a_wrong_shape_or_missing_tensor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        model(false, 2).save(dir.path()).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
        config["intermediate_size"] = serde_json::json!(25);
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let message = LlamaForCausalLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(
            message.ends_with("model.safetensors: tensor `model.layers.0.mlp.down_proj.weight` has shape [16, 24], the model expects [16, 25]"),
            "{message}"
        );

        config["intermediate_size"] = serde_json::json!(24);
        config["tie_word_embeddings"] = serde_json::json!(false);
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let tied = tempfile::tempdir().unwrap();
        model(true, 2).save(tied.path()).unwrap();
        std::fs::copy(tied.path().join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        let message = LlamaForCausalLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(message.ends_with("model.safetensors: tensor `lm_head.weight` is missing"), "{message}");
    }

    #[test]
    fn unsupported_options_name_their_field() {
        let mut c = tiny(false, 3);
        assert_eq!(
            c.resolve().err().unwrap().to_string(),
            "num_key_value_heads: expected a positive divisor of num_attention_heads (4), found 3"
        );
        c = tiny(false, 2);
        c.rope_scaling = Some(serde_json::json!({"rope_type": "yarn"}));
        assert_eq!(
            c.resolve().err().unwrap().to_string(),
            "rope_scaling.rope_type: unsupported rope type `yarn`; supported: default, linear, dynamic, llama3"
        );
        c = tiny(false, 2);
        c.model_type = "gpt2".into();
        assert_eq!(
            c.resolve().err().unwrap().to_string(),
            "model_type: unsupported model_type `gpt2`; this family covers llama, qwen2, mistral"
        );
    }

    #[test]
    fn greedy_generation_is_deterministic_and_stops_on_a_stop_token() {
        let m = model(true, 4);
        let settings = crate::model::GenerationSettings { max_new_tokens: 6, temperature: 0.0, ..Default::default() };
        let a = m.generate(&[vec![1, 2, 3]], &settings).unwrap();
        let b = m.generate(&[vec![1, 2, 3]], &settings).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].tokens.len(), 6);
        let first = a[0].tokens[0];
        let stopping = crate::model::GenerationSettings { stop_tokens: vec![first], ..settings };
        let c = m.generate(&[vec![1, 2, 3]], &stopping).unwrap();
        assert_eq!(c[0].finish, crate::model::generate::Finish::StopToken);
        assert_eq!(c[0].tokens, vec![first]);
    }
}

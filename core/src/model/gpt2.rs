//! GPT-2 as published on the HF hub (`gpt2`, `gpt2-medium/large/xl`, distilgpt2 and
//! fine-tunes of them): a decoder-only transformer with learned position embeddings,
//! pre-LayerNorm blocks (with biases), fused q/k/v projections stored as HF `Conv1D`s,
//! a GELU MLP and an LM head tied to the token embedding.
//!
//! Paper: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
//! Reference: transformers/models/gpt2/modeling_gpt2.py (`GPT2LMHeadModel`). Variable
//! paths equal the checkpoint keys transformers writes (`transformer.h.0.attn.c_attn.weight`),
//! so a checkpoint loads by a key-by-key copy; the original OpenAI conversions on the hub
//! name the same tensors without the `transformer.` prefix, and load through a view of
//! the variables under those names (see [`KeyLayout`]).
//!
//! Dropout (`*_pdrop`) is not applied: plumb's models have none, in training or not.
use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::cache::{self as kv_cache, KvCache};
use super::family::{Architecture, CausalLm, Pretrained};
use super::recompute::{self, Shared};
use super::vars::{Embedding, Vars};
use crate::checkpoint;
use crate::error::{Error, Result};

/// The model type of this family in `config.json`.
pub const MODEL_TYPE: &str = "gpt2";

/// `config.json` as HF writes it for `GPT2LMHeadModel` (HF's field names and defaults,
/// from `GPT2Config`; fields we do not use, such as dropouts and `summary_*`, are ignored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gpt2Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_n_positions", alias = "max_position_embeddings")]
    pub n_positions: usize,
    #[serde(default = "default_n_embd", alias = "hidden_size")]
    pub n_embd: usize,
    #[serde(default = "default_n_layer", alias = "num_hidden_layers")]
    pub n_layer: usize,
    #[serde(default = "default_n_head", alias = "num_attention_heads")]
    pub n_head: usize,
    /// The MLP's hidden size; None means 4 * n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation_function")]
    pub activation_function: String,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// Scale attention scores by 1/sqrt(head_dim); false leaves them unscaled.
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Also divide the scores of layer i by i + 1 (Mistral's GPT-2 runs).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Compute attention scores and softmax in fp32 whatever the weights' dtype.
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    /// Encoder-decoder use; not supported.
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// An id, a list of ids or null; GPT2Config's default is 50256 (`<|endoftext|>`).
    #[serde(default = "default_special_token")]
    pub bos_token_id: Value,
    #[serde(default = "default_special_token")]
    pub eos_token_id: Value,
    #[serde(default)]
    pub pad_token_id: Value,
}

fn default_model_type() -> String {
    MODEL_TYPE.into()
}
fn default_vocab_size() -> usize {
    50257
}
fn default_n_positions() -> usize {
    1024
}
fn default_n_embd() -> usize {
    768
}
fn default_n_layer() -> usize {
    12
}
fn default_n_head() -> usize {
    12
}
fn default_activation_function() -> String {
    "gelu_new".into()
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_true() -> bool {
    true
}
fn default_special_token() -> Value {
    Value::from(50256)
}

/// The MLP's nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the tanh approximation (Hendrycks & Gimpel 2016), GPT-2's own:
    /// `gelu_new`, `gelu_pytorch_tanh` and `gelu_fast` are all this function.
    GeluTanh,
    /// Exact GELU, x * Phi(x): `gelu`.
    Gelu,
}

impl Activation {
    fn from_hf(name: &str) -> Result<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            other => Err(Error::config(
                "activation_function",
                format!("unsupported activation `{other}`; supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu"),
            )),
        }
    }

    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::GeluTanh => x.gelu("tanh"),
            Self::Gelu => x.gelu("none"),
        }
    }
}

/// The resolved configuration: no options left.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub inner_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub head_dim: i64,
    /// Rows of the position embedding: the longest sequence the model can read.
    pub max_positions: i64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// Per layer: the factor attention scores are multiplied by.
    pub attention_scales: Vec<f64>,
    /// Attention in fp32 (`reorder_and_upcast_attn`).
    pub upcast_attention: bool,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
}

impl Gpt2Config {
    /// Checks and resolves; every unsupported option is an error naming its field.
    pub fn resolve(&self) -> Result<Config> {
        let field = |name: &str, message: String| Error::config(name, message);
        if self.model_type != MODEL_TYPE {
            return Err(field(
                "model_type",
                format!("unsupported model_type `{}`; this family covers {MODEL_TYPE}", self.model_type),
            ));
        }
        if self.add_cross_attention {
            return Err(field("add_cross_attention", "cross-attention (encoder-decoder use) is not supported".into()));
        }
        let activation = Activation::from_hf(&self.activation_function)?;
        let inner = self.n_inner.unwrap_or(4 * self.n_embd);
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", inner),
        ] {
            if value == 0 {
                return Err(field(name, "expected a positive integer, found 0".into()));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(field(
                "n_head",
                format!("n_embd ({}) is not divisible by n_head ({})", self.n_embd, self.n_head),
            ));
        }
        let head_dim = self.n_embd / self.n_head;
        let base_scale = if self.scale_attn_weights { (head_dim as f64).powf(-0.5) } else { 1.0 };
        let attention_scales = (0..self.n_layer)
            .map(|i| if self.scale_attn_by_inverse_layer_idx { base_scale / (i + 1) as f64 } else { base_scale })
            .collect();
        Ok(Config {
            vocab_size: self.vocab_size as i64,
            hidden_size: self.n_embd as i64,
            inner_size: inner as i64,
            num_layers: self.n_layer,
            num_heads: self.n_head as i64,
            head_dim: head_dim as i64,
            max_positions: self.n_positions as i64,
            layer_norm_eps: self.layer_norm_epsilon,
            activation,
            attention_scales,
            upcast_attention: self.reorder_and_upcast_attn,
            tie_word_embeddings: self.tie_word_embeddings,
            initializer_range: self.initializer_range,
        })
    }

    /// `config.json` for saving, with the fields `transformers` expects.
    pub fn to_hf_json(&self) -> Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            map.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
            map.insert("torch_dtype".into(), serde_json::json!("float32"));
        }
        json
    }
}

/// How a checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// As `transformers` saves `GPT2LMHeadModel`: `transformer.wte.weight`, `transformer.h.0.*`.
    Transformers,
    /// As the original OpenAI conversions on the hub (`gpt2`, `gpt2-medium`, ...): the
    /// same names without `transformer.` (`wte.weight`, `h.0.*`), next to `attn.bias`
    /// and `attn.masked_bias` buffers that are ignored.
    Original,
}

impl KeyLayout {
    /// The layout of the checkpoint in `dir`, from its tensor names.
    pub fn detect(dir: &Path) -> Result<Self> {
        Ok(Self::of(&checkpoint::tensor_names(dir)?))
    }

    /// The layout of a checkpoint holding tensors `names`.
    pub fn of(names: &HashSet<String>) -> Self {
        if names.contains("wte.weight") && !names.contains("transformer.wte.weight") {
            Self::Original
        } else {
            Self::Transformers
        }
    }

    /// The checkpoint key of variable `name` (a name in the `Transformers` layout).
    pub fn key(self, name: &str) -> &str {
        match self {
            Self::Transformers => name,
            Self::Original => name.strip_prefix("transformer.").unwrap_or(name),
        }
    }
}

/// The tensor names of the checkpoint in `dir`, sorted (see [`checkpoint::tensor_names`]).
pub fn tensor_names(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = checkpoint::tensor_names(dir)?.into_iter().collect();
    names.sort();
    Ok(names)
}

/// HF's `Conv1D`: a linear layer that stores its weight as (in, out), y = x @ W + b.
/// (The name is historical: OpenAI's TensorFlow code used a width-1 convolution.)
#[derive(Debug)]
struct Conv1d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1d {
    fn new(vars: Vars, in_dim: i64, out_dim: i64, std: f64) -> Self {
        Self {
            weight: vars.var("weight", &[in_dim, out_dim], nn::Init::Randn { mean: 0.0, stdev: std }),
            bias: vars.var("bias", &[out_dim], nn::Init::Const(0.0)),
        }
    }

    /// (..., in) -> (..., out)
    fn forward(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.weight) + &self.bias
    }
}

fn layer_norm(vars: Vars, dim: i64, eps: f64) -> nn::LayerNorm {
    vars.layer_norm(dim, nn::LayerNormConfig { eps, ..Default::default() })
}

#[derive(Debug)]
struct Attention {
    /// q, k and v packed along the output: (C, 3C).
    c_attn: Conv1d,
    c_proj: Conv1d,
    num_heads: i64,
    head_dim: i64,
    scale: f64,
    upcast: bool,
}

impl Attention {
    fn new(vars: Vars, c: &Config, layer: usize) -> Self {
        let h = c.hidden_size;
        // GPT-2's init: residual projections scaled by 1/sqrt(2 * n_layer), as HF does.
        let proj_std = c.initializer_range / (2.0 * c.num_layers as f64).sqrt();
        Self {
            c_attn: Conv1d::new(&vars / "c_attn", h, 3 * h, c.initializer_range),
            c_proj: Conv1d::new(&vars / "c_proj", h, h, proj_std),
            num_heads: c.num_heads,
            head_dim: c.head_dim,
            scale: c.attention_scales.get(layer).copied().unwrap_or(1.0),
            upcast: c.upcast_attention,
        }
    }

    /// x: (B, T, C); `mask` is the additive mask (B, 1, T, past + T) in the attention's
    /// dtype, or None for plain causal attention.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, cache: Option<(&mut KvCache, usize)>) -> Result<Tensor> {
        let (b, t, c) = x.size3()?;
        let qkv = self.c_attn.forward(x); // (B, T, 3C)
        let head = |i: i64| qkv.narrow(2, i * c, c).view([b, t, self.num_heads, self.head_dim]).transpose(1, 2);
        let (q, k, v) = (head(0), head(1), head(2)); // each (B, nh, T, hd)
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v), // (B, nh, past + T, hd)
            None => (k, v),
        };
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| {
            super::attention::scaled_dot_product_attention(q, k, v, mask, mask.is_none(), Some(self.scale), false)
        };
        let y = if self.upcast {
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            attend(&f(&q), &f(&k), &f(&v)).to_kind(x.kind())
        } else {
            attend(&q, &k, &v)
        }; // (B, nh, T, hd)
        let y = y.transpose(1, 2).contiguous().view([b, t, c]);
        Ok(self.c_proj.forward(&y))
    }
}

/// The feed-forward: c_proj(act(c_fc(x))).
#[derive(Debug)]
struct Mlp {
    c_fc: Conv1d,
    c_proj: Conv1d,
    activation: Activation,
}

impl Mlp {
    fn new(vars: Vars, c: &Config) -> Self {
        let proj_std = c.initializer_range / (2.0 * c.num_layers as f64).sqrt();
        Self {
            c_fc: Conv1d::new(&vars / "c_fc", c.hidden_size, c.inner_size, c.initializer_range),
            c_proj: Conv1d::new(&vars / "c_proj", c.inner_size, c.hidden_size, proj_std),
            activation: c.activation,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.c_proj.forward(&self.activation.apply(&self.c_fc.forward(x)))
    }
}

#[derive(Debug)]
struct Block {
    ln_1: nn::LayerNorm,
    attn: Attention,
    ln_2: nn::LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(vars: Vars, c: &Config, layer: usize) -> Self {
        Self {
            ln_1: layer_norm(&vars / "ln_1", c.hidden_size, c.layer_norm_eps),
            attn: Attention::new(&vars / "attn", c, layer),
            ln_2: layer_norm(&vars / "ln_2", c.hidden_size, c.layer_norm_eps),
            mlp: Mlp::new(&vars / "mlp", c),
        }
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, cache: Option<(&mut KvCache, usize)>) -> Result<Tensor> {
        let x = x + self.attn.forward(&self.ln_1.forward(x), mask, cache)?;
        Ok(&x + self.mlp.forward(&self.ln_2.forward(&x)))
    }
}

/// The transformer with its LM head: `GPT2LMHeadModel`.
#[derive(Debug)]
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    /// Shared with the closures of checkpointed blocks ([`recompute`]).
    h: Vec<Shared<Block>>,
    ln_f: nn::LayerNorm,
    /// None when tied to `wte` (GPT-2's default).
    lm_head: Option<nn::Linear>,
    config: Config,
}

impl Gpt2 {
    /// The model's variables under `root` (`transformer.*`, and `lm_head.*` when
    /// untied), initialised as HF initialises them or for a checkpoint to fill (see [`Vars`]).
    fn build(root: &Vars, config: &Config) -> Self {
        let transformer = root / "transformer";
        let embedding = |name: &str, rows: i64| {
            let init = nn::Init::Randn { mean: 0.0, stdev: config.initializer_range };
            let embed_config = nn::EmbeddingConfig { ws_init: init, ..Default::default() };
            (&transformer / name).embedding(rows, config.hidden_size, embed_config)
        };
        let wte = embedding("wte", config.vocab_size);
        let wpe = embedding("wpe", config.max_positions);
        let h = (0..config.num_layers).map(|i| Shared::new(Block::new(&transformer / "h" / i, config, i))).collect();
        let ln_f = layer_norm(&transformer / "ln_f", config.hidden_size, config.layer_norm_eps);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            let init = nn::Init::Randn { mean: 0.0, stdev: config.initializer_range };
            let linear_config = nn::LinearConfig { ws_init: init, bs_init: None, bias: false };
            (root / "lm_head").linear(config.hidden_size, config.vocab_size, linear_config)
        });
        Self { wte, wpe, h, ln_f, lm_head, config: config.clone() }
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
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.size2()?;
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
        // Learned positions end at n_positions; checked here, as an index past the end of
        // `wpe` would abort in libtorch (or trip a device assert on a GPU).
        if past + t > self.config.max_positions {
            return Err(Error::Other(format!(
                "{} positions exceed the model's context of {} (n_positions)",
                past + t,
                self.config.max_positions
            )));
        }
        // None = plain causal attention, the fast path of SDPA.
        let mask = (attention_mask.is_some() || past > 0).then(|| {
            let key_mask = match attention_mask {
                Some(m) => m.shallow_clone(),
                None => Tensor::ones([b, past + t], (Kind::Int64, input_ids.device())),
            };
            let kind = if self.config.upcast_attention { Kind::Float } else { self.wte.ws.kind() };
            kv_cache::attention_mask(&key_mask, past, t, None).to_kind(kind) // (B, 1, T, past + T)
        });
        let mut x = self.wte.forward(input_ids) + self.wpe.forward(positions); // (B, T, C)
        for (i, block) in self.h.iter().enumerate() {
            x = if recompute::wanted() && cache.is_none() {
                // Keep only x; the block's activations are recomputed in backward.
                let (block, mask) = (block.clone(), mask.as_ref().map(Tensor::shallow_clone));
                recompute::checkpoint(&[&x], move |x| block.forward(&x[0], mask.as_ref(), None))?
            } else {
                block.forward(&x, mask.as_ref(), cache.as_deref_mut().map(|c| (c, i)))?
            };
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        Ok(self.ln_f.forward(&x))
    }

    /// Logits (B, T, vocab) from hidden states.
    pub fn lm_head(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(&self.wte.ws.tr()),
        }
    }

    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let c = &self.config;
        let ws = &self.wte.ws;
        KvCache::new(c.num_layers, batch, c.num_heads, capacity, c.head_dim, ws.kind(), ws.device())
    }
}

impl Architecture for Gpt2 {
    type HfConfig = Gpt2Config;
    type Config = Config;

    fn resolve(hf: Gpt2Config) -> Result<(Gpt2Config, Config)> {
        let config = hf.resolve()?;
        Ok((hf, config))
    }

    fn build(vars: &Vars, config: &Config) -> Self {
        Gpt2::build(vars, config)
    }

    /// Either [`KeyLayout`]; saved always in the `Transformers` layout.
    fn checkpoint_key(name: &str, names: &HashSet<String>) -> String {
        KeyLayout::of(names).key(name).to_string()
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn hf_json(hf: &Gpt2Config) -> Value {
        hf.to_hf_json()
    }

    fn generation_ids(hf: &Gpt2Config) -> Option<[(&'static str, Option<Value>); 3]> {
        Some([
            ("bos_token_id", Some(hf.bos_token_id.clone())),
            ("eos_token_id", Some(hf.eos_token_id.clone())),
            ("pad_token_id", Some(hf.pad_token_id.clone())),
        ])
    }
}

impl CausalLm for Gpt2 {
    /// No LM head: the embeddings count as tied.
    fn build_backbone(vars: &Vars, config: &Config) -> Self {
        Gpt2::build(vars, &Config { tie_word_embeddings: true, ..config.clone() })
    }

    fn hidden_states(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Gpt2::hidden_states(self, input_ids, positions, attention_mask, cache)
    }

    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        Gpt2::lm_head(self, hidden)
    }

    fn lm_head_weight(&self) -> Option<&Tensor> {
        Some(self.lm_head.as_ref().map_or(&self.wte.ws, |head| &head.ws))
    }

    fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        Gpt2::new_cache(self, batch, capacity)
    }

    fn context_length(&self) -> Option<i64> {
        Some(self.config.max_positions)
    }

    fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    fn initializer_range(&self) -> f64 {
        self.config.initializer_range
    }

    fn sequence_classification(_hf: &Gpt2Config) -> &'static str {
        "GPT2ForSequenceClassification"
    }
}

/// A GPT-2 model with its variables and HF config: the [`super::Policy`] plugins train.
/// Loads checkpoints in either [`KeyLayout`]; saves in the `Transformers` layout.
pub type Gpt2ForCausalLm = Pretrained<Gpt2>;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Policy;

    fn tiny() -> Gpt2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 32
        }))
        .unwrap()
    }

    fn model(hf: Gpt2Config) -> Gpt2ForCausalLm {
        tch::manual_seed(0);
        Gpt2ForCausalLm::new(hf, tch::Device::Cpu).unwrap()
    }

    fn ids(v: &[i64]) -> Tensor {
        Tensor::from_slice(v).view([1, -1])
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn conv1d_weights_are_in_by_out_and_c_attn_packs_qkv_along_out() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let layer = Conv1d::new(Vars::fresh(vs.root() / "c"), 2, 3, 0.02);
        tch::no_grad(|| {
            layer.weight.shallow_clone().copy_(&Tensor::from_slice(&[1.0f32, 2., 3., 4., 5., 6.]).view([2, 3]));
            layer.bias.shallow_clone().copy_(&Tensor::from_slice(&[0.5f32, 0., 0.]));
        });
        // [1, 10] @ [[1, 2, 3], [4, 5, 6]] + [0.5, 0, 0]
        let y = layer.forward(&Tensor::from_slice(&[1.0f32, 10.]).view([1, 1, 2]));
        assert_eq!(Vec::<f32>::try_from(y.view([-1])).unwrap(), vec![41.5, 52.0, 63.0]);

        let m = model(tiny());
        let shapes: BTreeMap<String, Vec<i64>> =
            m.var_store().variables().into_iter().map(|(name, t)| (name, t.size())).collect();
        assert_eq!(shapes["transformer.h.0.attn.c_attn.weight"], vec![16, 48]);
        assert_eq!(shapes["transformer.h.0.attn.c_attn.bias"], vec![48]);
        assert_eq!(shapes["transformer.h.1.mlp.c_fc.weight"], vec![16, 64]);
        assert_eq!(shapes["transformer.h.1.mlp.c_proj.weight"], vec![64, 16]);
        assert_eq!(shapes["transformer.wpe.weight"], vec![32, 16]);
        assert!(!shapes.contains_key("lm_head.weight"), "tied to wte");
    }

    #[test]
    fn a_token_never_sees_the_future() {
        let m = model(tiny());
        let a = m.logits(&ids(&[1, 2, 3, 4, 5]), None).unwrap();
        let b = m.logits(&ids(&[1, 2, 3, 9, 9]), None).unwrap();
        let diff = max_abs(&a.narrow(1, 0, 3), &b.narrow(1, 0, 3));
        assert!(diff < 1e-6, "{diff}");
        let later = max_abs(&a.narrow(1, 3, 2), &b.narrow(1, 3, 2));
        assert!(later > 1e-4, "changed tokens change later logits");
    }

    #[test]
    fn left_padding_keeps_positions_and_the_cache_matches_a_full_forward() {
        let m = model(tiny());
        let plain = m.logits(&ids(&[5, 6, 7, 8]), None).unwrap();
        let left = m.logits(&ids(&[0, 0, 5, 6, 7, 8]), Some(&ids(&[0, 0, 1, 1, 1, 1]))).unwrap();
        let diff = max_abs(&plain, &left.narrow(1, 2, 4));
        assert!(diff < 1e-5, "{diff}");

        let mut cache = m.new_cache(1, 8);
        let first = m.forward(&ids(&[5, 6, 7]), &ids(&[0, 1, 2]), Some(&ids(&[1, 1, 1])), Some(&mut cache)).unwrap();
        let next = m.forward(&ids(&[8]), &ids(&[3]), Some(&ids(&[1, 1, 1, 1])), Some(&mut cache)).unwrap();
        let diff = max_abs(&Tensor::cat(&[first, next], 1), &plain);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn a_sequence_longer_than_n_positions_is_an_error() {
        let m = model(tiny());
        let long: Vec<i64> = (0..33).map(|i| i % 50).collect();
        let message = m.logits(&ids(&long), None).err().unwrap().to_string();
        assert_eq!(message, "33 positions exceed the model's context of 32 (n_positions)");
    }

    #[test]
    fn a_saved_model_loads_back_with_the_same_logits_in_fp32_and_bf16() {
        let mut hf = tiny();
        hf.tie_word_embeddings = false;
        hf.activation_function = "gelu".into();
        let m = model(hf);
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        assert_eq!(KeyLayout::detect(dir.path()).unwrap(), KeyLayout::Transformers);
        let loaded = Gpt2ForCausalLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
        let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6]);
        let reference = m.logits(&x, None).unwrap();
        assert_eq!(max_abs(&reference, &loaded.logits(&x, None).unwrap()), 0.0);
        assert_eq!(loaded.hf_config(), m.hf_config());

        let bf16 = Gpt2ForCausalLm::from_dir(dir.path(), tch::Device::Cpu, Kind::BFloat16).unwrap();
        let logits = bf16.logits(&x, None).unwrap();
        assert_eq!(logits.kind(), Kind::BFloat16);
        let diff = max_abs(&logits.to_kind(Kind::Float), &reference);
        assert!(diff < 0.1, "{diff}");
    }

    #[test]
    fn the_original_unprefixed_layout_loads_and_saves_as_transformers_does() {
        let m = model(tiny());
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        // Rename `transformer.*` to `*` and add the causal-mask buffers old checkpoints carry.
        let mut tensors: Vec<(String, Tensor)> = m
            .var_store()
            .variables()
            .into_iter()
            .map(|(name, t)| (name.trim_start_matches("transformer.").to_string(), t))
            .collect();
        for i in 0..2 {
            tensors.push((format!("h.{i}.attn.bias"), Tensor::ones([1, 1, 32, 32], (Kind::Float, tch::Device::Cpu))));
            tensors.push((format!("h.{i}.attn.masked_bias"), Tensor::from_slice(&[-1e4f32])));
        }
        checkpoint::save_safetensors(&dir.path().join(checkpoint::SINGLE_FILE), &tensors).unwrap();
        assert!(tensor_names(dir.path()).unwrap().contains(&"h.0.attn.c_attn.weight".to_string()));
        assert_eq!(KeyLayout::detect(dir.path()).unwrap(), KeyLayout::Original);

        let loaded = Gpt2ForCausalLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
        let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6]);
        assert_eq!(max_abs(&m.logits(&x, None).unwrap(), &loaded.logits(&x, None).unwrap()), 0.0);
        let mut names: Vec<String> = loaded.var_store().variables().into_keys().collect();
        names.sort();
        assert!(names.iter().all(|n| n.starts_with("transformer.")), "{names:?}");

        let resaved = tempfile::tempdir().unwrap();
        loaded.save(resaved.path()).unwrap();
        let mut saved = tensor_names(resaved.path()).unwrap();
        saved.sort();
        assert_eq!(saved, names);

        // A tensor missing from an original-layout checkpoint is named by its key there.
        tensors.retain(|(name, _)| name != "h.1.ln_2.bias");
        checkpoint::save_safetensors(&dir.path().join(checkpoint::SINGLE_FILE), &tensors).unwrap();
        let message = Gpt2ForCausalLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(message.ends_with("model.safetensors: tensor `h.1.ln_2.bias` is missing"), "{message}");
    }

    #[test]
    fn unsupported_options_name_their_field() {
        let error = |edit: &dyn Fn(&mut Gpt2Config)| {
            let mut c = tiny();
            edit(&mut c);
            c.resolve().err().unwrap().to_string()
        };
        assert_eq!(
            error(&|c| c.activation_function = "relu".into()),
            "activation_function: unsupported activation `relu`; supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu"
        );
        assert_eq!(error(&|c| c.n_head = 3), "n_head: n_embd (16) is not divisible by n_head (3)");
        assert_eq!(
            error(&|c| c.add_cross_attention = true),
            "add_cross_attention: cross-attention (encoder-decoder use) is not supported"
        );
        assert_eq!(error(&|c| c.n_inner = Some(0)), "n_inner: expected a positive integer, found 0");
        assert_eq!(
            error(&|c| c.model_type = "llama".into()),
            "model_type: unsupported model_type `llama`; this family covers gpt2"
        );
    }

    #[test]
    fn attention_scales_follow_the_config() {
        let mut hf = tiny();
        assert_eq!(hf.resolve().unwrap().attention_scales, vec![0.5, 0.5]); // head_dim 4
        hf.scale_attn_by_inverse_layer_idx = true;
        assert_eq!(hf.resolve().unwrap().attention_scales, vec![0.5, 0.25]);
        hf.scale_attn_weights = false;
        assert_eq!(hf.resolve().unwrap().attention_scales, vec![1.0, 0.5]);
    }

    #[test]
    fn a_minimal_config_gets_gpt2s_defaults() {
        let hf: Gpt2Config = serde_json::from_str(r#"{"model_type": "gpt2"}"#).unwrap();
        let c = hf.resolve().unwrap();
        assert_eq!((c.vocab_size, c.hidden_size, c.inner_size, c.num_layers), (50257, 768, 3072, 12));
        assert_eq!((c.num_heads, c.max_positions, c.activation), (12, 1024, Activation::GeluTanh));
        assert!(c.tie_word_embeddings);
        assert_eq!(hf.eos_token_id, Value::from(50256));
    }
}

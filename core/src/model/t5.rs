//! T5 for span-corruption pretraining, as `transformers`' `T5ForConditionalGeneration`
//! builds and saves it: an encoder-decoder of pre-norm blocks with T5's RMS LayerNorm (no
//! bias, no mean subtraction), a learned relative position bias shared by the layers of
//! each stack (bucketed both ways in the encoder, backwards only in the decoder), no
//! 1/sqrt(d) attention scaling (T5 folds it into the init), cross-attention in the
//! decoder, a ReLU (T5) or gated-GELU (T5 v1.1, flan-T5) feed-forward, one embedding
//! shared by both stacks, and an LM head tied to it or separate.
//!
//! Paper: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
//! Text-to-Text Transformer". Reference: transformers/models/t5/modeling_t5.py. Variable
//! paths equal the checkpoint keys (`encoder.block.0.layer.0.SelfAttention.q.weight`).
//!
//! Tied or not: the original T5 ties the LM head to `shared` and scales the decoder
//! output by d_model^-0.5; T5 v1.1 has its own `lm_head.weight` and no scaling. HF
//! writes this as `tie_word_embeddings`; transformers 5 also writes
//! `scale_decoder_outputs` (and always `tie_word_embeddings: true`, leaving the head
//! untied when the checkpoint holds a different `lm_head.weight`). plumb reads both: the
//! head is separate when `tie_word_embeddings` is false or the checkpoint has
//! `lm_head.weight`; the output is scaled as `scale_decoder_outputs` says, else when
//! `tie_word_embeddings` is not false.
//!
//! Dropout is not applied: plumb's models have none, in training or not.
use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::bert::Activation;
use super::family::{Architecture, Pretrained};
use super::recompute::{self, Shared};
use super::vars::{Embedding, Vars};
use super::{additive_mask, embedding_lookup, key_or_alias, key_padding_mask};
use crate::error::{Error, Result};

/// The model type of this family in `config.json`.
pub const MODEL_TYPE: &str = "t5";

/// `config.json` as HF writes it for `T5ForConditionalGeneration` (HF's field names and
/// the defaults of `T5Config`; fields we do not use are ignored when reading).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct T5Config {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    /// The size of each attention head.
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    /// Encoder blocks (and decoder blocks unless `num_decoder_layers` says otherwise).
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_decoder_layers: Option<usize>,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Not applied by plumb; kept so a saved config trains the same in `transformers`.
    #[serde(default = "default_dropout_rate")]
    pub dropout_rate: f64,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Scales every init std (HF's testing knob); 1.0 in every published model.
    #[serde(default = "default_initializer_factor")]
    pub initializer_factor: f64,
    /// `relu` (T5), `gated-gelu` (T5 v1.1: gelu_new), or `[gated-]ACT` for another
    /// activation.
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
    /// None reads as true (T5's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// transformers 5; None follows `tie_word_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<i64>,
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: Option<Value>,
    /// None means `pad_token_id`, as in every T5 checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_start_token_id: Option<i64>,
    #[serde(default = "default_true")]
    pub is_encoder_decoder: bool,
}

fn default_model_type() -> String {
    MODEL_TYPE.into()
}
fn default_vocab_size() -> usize {
    32128
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    2048
}
fn default_num_layers() -> usize {
    6
}
fn default_num_heads() -> usize {
    8
}
fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_dropout_rate() -> f64 {
    0.1
}
fn default_layer_norm_epsilon() -> f64 {
    1e-6
}
fn default_initializer_factor() -> f64 {
    1.0
}
fn default_feed_forward_proj() -> String {
    "relu".into()
}
fn default_pad_token_id() -> Option<i64> {
    Some(0)
}
fn default_eos_token_id() -> Option<Value> {
    Some(Value::from(1))
}
fn default_true() -> bool {
    true
}

/// The resolved configuration: no options left.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_heads: i64,
    pub num_encoder_layers: usize,
    pub num_decoder_layers: usize,
    pub num_buckets: i64,
    pub max_distance: i64,
    pub layer_norm_eps: f64,
    pub initializer_factor: f64,
    /// `wi_0`/`wi_1` (act(wi_0 x) * wi_1 x) rather than one `wi`.
    pub gated: bool,
    pub activation: Activation,
    /// The LM head is `shared` (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Multiply the decoder output by d_model^-0.5 before the LM head.
    pub scale_decoder_outputs: bool,
    pub pad_token_id: Option<i64>,
    pub decoder_start_token_id: Option<i64>,
}

impl T5Config {
    /// Checks and resolves; every unsupported option is an error naming its field.
    pub fn resolve(&self) -> Result<Config> {
        let field = |name: &str, message: String| Error::config(name, message);
        if self.model_type != MODEL_TYPE {
            return Err(field(
                "model_type",
                format!("unsupported model_type `{}`; this family covers {MODEL_TYPE}", self.model_type),
            ));
        }
        if !self.is_encoder_decoder {
            return Err(field("is_encoder_decoder", "T5ForConditionalGeneration is an encoder-decoder".into()));
        }
        let (gated, activation) = match self.feed_forward_proj.split('-').collect::<Vec<_>>()[..] {
            // transformers' name for T5 v1.1's feed-forward: gelu_new, not exact gelu.
            ["gated", "gelu"] => (true, Activation::GeluTanh),
            ["gated", act] => (true, Activation::from_hf(act, "feed_forward_proj")?),
            [act] => (false, Activation::from_hf(act, "feed_forward_proj")?),
            _ => {
                return Err(field(
                    "feed_forward_proj",
                    format!(
                        "`{}` is neither `ACT` nor `gated-ACT` (for example `relu` or `gated-gelu`)",
                        self.feed_forward_proj
                    ),
                ))
            }
        };
        let decoder_layers = self.num_decoder_layers.unwrap_or(self.num_layers);
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", decoder_layers),
            ("num_heads", self.num_heads),
            ("relative_attention_max_distance", self.relative_attention_max_distance),
        ] {
            if value == 0 {
                return Err(field(name, "expected a positive integer, found 0".into()));
            }
        }
        // The encoder halves the buckets (one half a direction), and half of those are exact.
        if self.relative_attention_num_buckets < 4 {
            return Err(field(
                "relative_attention_num_buckets",
                format!("expected at least 4, found {}", self.relative_attention_num_buckets),
            ));
        }
        for (name, id) in [("pad_token_id", self.pad_token_id), ("decoder_start_token_id", self.decoder_start_token_id)]
        {
            if let Some(id) = id.filter(|&id| id < 0 || id >= self.vocab_size as i64) {
                return Err(field(name, format!("{id} is not a token id (vocab_size is {})", self.vocab_size)));
            }
        }
        let tie = self.tie_word_embeddings != Some(false);
        Ok(Config {
            vocab_size: self.vocab_size as i64,
            d_model: self.d_model as i64,
            d_kv: self.d_kv as i64,
            d_ff: self.d_ff as i64,
            num_heads: self.num_heads as i64,
            num_encoder_layers: self.num_layers,
            num_decoder_layers: decoder_layers,
            num_buckets: self.relative_attention_num_buckets as i64,
            max_distance: self.relative_attention_max_distance as i64,
            layer_norm_eps: self.layer_norm_epsilon,
            initializer_factor: self.initializer_factor,
            gated,
            activation,
            tie_word_embeddings: tie,
            scale_decoder_outputs: self.scale_decoder_outputs.unwrap_or(tie),
            pad_token_id: self.pad_token_id,
            decoder_start_token_id: self.decoder_start_token_id.or(self.pad_token_id),
        })
    }

    /// `config.json` for saving, with the fields `transformers` expects.
    pub fn to_hf_json(&self) -> Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            map.insert("architectures".into(), serde_json::json!(["T5ForConditionalGeneration"]));
        }
        json
    }
}

/// A stack's `embed_tokens` is `shared`; some checkpoints hold it under those names too
/// (or only).
fn checkpoint_aliases(name: &str) -> Vec<String> {
    match name {
        "shared.weight" => vec!["encoder.embed_tokens.weight".into(), "decoder.embed_tokens.weight".into()],
        _ => Vec::new(),
    }
}

fn linear(vars: Vars, in_dim: i64, out_dim: i64, std: f64) -> nn::Linear {
    let config = nn::LinearConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: std }, bs_init: None, bias: false };
    vars.linear(in_dim, out_dim, config)
}

/// T5's LayerNorm: RMS normalisation with a scale and no bias or mean subtraction
/// (Zhang & Sennrich 2019), the statistics in fp32.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(vars: Vars, dim: i64, c: &Config) -> Self {
        Self { weight: vars.var("weight", &[dim], nn::Init::Const(c.initializer_factor)), eps: c.layer_norm_eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let variance = x.to_kind(Kind::Float).pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x.to_kind(Kind::Float) * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(self.weight.kind())
    }
}

/// The bucket (0..num_buckets) of each relative position (key - query), as Mesh
/// TensorFlow's T5 computes it: half the buckets are exact distances, the other half
/// grow logarithmically up to `max_distance`, beyond which all share the last bucket.
/// Bidirectional (the encoder) gives each direction half the buckets; otherwise (the
/// decoder) only keys before the query count and later ones share bucket 0.
pub fn relative_position_bucket(relative: &Tensor, bidirectional: bool, num_buckets: i64, max_distance: i64) -> Tensor {
    let (num_buckets, offset, distance) = if bidirectional {
        let half = num_buckets / 2;
        (half, relative.gt(0).to_kind(Kind::Int64) * half, relative.abs())
    } else {
        (num_buckets, relative.zeros_like(), (-relative).clamp_min(0))
    };
    let max_exact = num_buckets / 2;
    let is_small = distance.lt(max_exact);
    // In fp32, in HF's order of operations, so the bucket edges fall where HF's do.
    let log_ratio = (max_distance as f64 / max_exact as f64).ln();
    let large = ((distance.to_kind(Kind::Float) / max_exact as f64).log() / log_ratio
        * (num_buckets - max_exact) as f64)
        .to_kind(Kind::Int64);
    let large = (large + max_exact).clamp_max(num_buckets - 1);
    offset + distance.where_self(&is_small, &large)
}

#[derive(Debug)]
struct Attention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    /// In the first block of each stack only: (num_buckets, nh).
    relative_attention_bias: Option<Embedding>,
    num_heads: i64,
    d_kv: i64,
}

impl Attention {
    fn new(vars: Vars, c: &Config, has_relative_bias: bool) -> Self {
        let (d, inner, f) = (c.d_model, c.num_heads * c.d_kv, c.initializer_factor);
        let df = d as f64;
        let relative_attention_bias = has_relative_bias.then(|| {
            let config = nn::EmbeddingConfig {
                ws_init: nn::Init::Randn { mean: 0.0, stdev: f * df.powf(-0.5) },
                ..Default::default()
            };
            (&vars / "relative_attention_bias").embedding(c.num_buckets, c.num_heads, config)
        });
        // HF's init: the query's std also carries the 1/sqrt(d_kv) that T5's attention omits.
        Self {
            q: linear(&vars / "q", d, inner, f * (df * c.d_kv as f64).powf(-0.5)),
            k: linear(&vars / "k", d, inner, f * df.powf(-0.5)),
            v: linear(&vars / "v", d, inner, f * df.powf(-0.5)),
            o: linear(&vars / "o", inner, d, f * (inner as f64).powf(-0.5)),
            relative_attention_bias,
            num_heads: c.num_heads,
            d_kv: c.d_kv,
        }
    }

    /// The position bias (1, nh, Tq, Tk) of `tq` queries over `tk` keys.
    fn position_bias(&self, table: &Embedding, tq: i64, tk: i64, bidirectional: bool, c: &Config) -> Tensor {
        let device = table.ws.device();
        let query = Tensor::arange(tq, (Kind::Int64, device)).view([tq, 1]);
        let key = Tensor::arange(tk, (Kind::Int64, device)).view([1, tk]);
        let buckets = relative_position_bucket(&(key - query), bidirectional, c.num_buckets, c.max_distance); // (Tq, Tk)
        table.forward(&buckets).permute([2, 0, 1]).unsqueeze(0)
    }

    /// x: (B, Tq, C) attends to `kv` (B, Tk, C), itself when None. `bias` is added to the
    /// (unscaled) scores: position bias and masks, broadcastable to (B, nh, Tq, Tk).
    fn forward(&self, x: &Tensor, kv: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, tq, _) = x.size3()?;
        let source = kv.unwrap_or(x);
        let tk = source.size()[1];
        let heads = |proj: &nn::Linear, input: &Tensor, t: i64| {
            proj.forward(input).view([b, t, self.num_heads, self.d_kv]).transpose(1, 2)
        };
        let q = heads(&self.q, x, tq); // (B, nh, Tq, hd)
        let (k, v) = (heads(&self.k, source, tk), heads(&self.v, source, tk)); // (B, nh, Tk, hd)
        let y = Tensor::f_scaled_dot_product_attention(&q, &k, &v, bias, 0.0, false, 1.0, false)?; // (B, nh, Tq, hd)
        let y = y.transpose(1, 2).contiguous().view([b, tq, self.num_heads * self.d_kv]);
        Ok(self.o.forward(&y))
    }
}

/// `DenseReluDense`: wo(act(wi x)), or gated wo(act(wi_0 x) * wi_1 x).
#[derive(Debug)]
struct FeedForward {
    wi: Vec<nn::Linear>,
    wo: nn::Linear,
    activation: Activation,
}

impl FeedForward {
    fn new(vars: Vars, c: &Config) -> Self {
        let f = c.initializer_factor;
        let std_in = f * (c.d_model as f64).powf(-0.5);
        let wi = if c.gated {
            vec![linear(&vars / "wi_0", c.d_model, c.d_ff, std_in), linear(&vars / "wi_1", c.d_model, c.d_ff, std_in)]
        } else {
            vec![linear(&vars / "wi", c.d_model, c.d_ff, std_in)]
        };
        let wo = linear(&vars / "wo", c.d_ff, c.d_model, f * (c.d_ff as f64).powf(-0.5));
        Self { wi, wo, activation: c.activation }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let activated = self.activation.apply(&self.wi[0].forward(x)); // (B, T, d_ff)
        let hidden = match self.wi.get(1) {
            Some(gate) => activated * gate.forward(x),
            None => activated,
        };
        self.wo.forward(&hidden)
    }
}

/// A pre-norm block: self-attention, cross-attention (decoder), feed-forward, each
/// x + sublayer(layer_norm(x)). Its sublayers are `layer.0`, `layer.1` (and `layer.2`).
#[derive(Debug)]
struct Block {
    self_attention: Attention,
    self_attention_norm: LayerNorm,
    /// The decoder's: `EncDecAttention` and its norm.
    cross_attention: Option<(Attention, LayerNorm)>,
    feed_forward: FeedForward,
    feed_forward_norm: LayerNorm,
}

impl Block {
    fn new(vars: Vars, c: &Config, first: bool, decoder: bool) -> Self {
        let layer = |i: usize| &vars / "layer" / i;
        let cross_attention = decoder.then(|| {
            (
                Attention::new(layer(1) / "EncDecAttention", c, false),
                LayerNorm::new(layer(1) / "layer_norm", c.d_model, c),
            )
        });
        let ff = if decoder { 2 } else { 1 };
        Self {
            self_attention: Attention::new(layer(0) / "SelfAttention", c, first),
            self_attention_norm: LayerNorm::new(layer(0) / "layer_norm", c.d_model, c),
            cross_attention,
            feed_forward: FeedForward::new(layer(ff) / "DenseReluDense", c),
            feed_forward_norm: LayerNorm::new(layer(ff) / "layer_norm", c.d_model, c),
        }
    }

    /// `self_bias`: position bias plus self-attention mask; `encoder`: the encoder's
    /// output and the additive mask of its padding (decoder blocks).
    fn forward(&self, x: &Tensor, self_bias: &Tensor, encoder: Option<(&Tensor, Option<&Tensor>)>) -> Result<Tensor> {
        let mut x = x + self.self_attention.forward(&self.self_attention_norm.forward(x), None, Some(self_bias))?;
        if let (Some((attention, norm)), Some((memory, mask))) = (&self.cross_attention, encoder) {
            x = &x + attention.forward(&norm.forward(&x), Some(memory), mask)?;
        }
        Ok(&x + self.feed_forward.forward(&self.feed_forward_norm.forward(&x)))
    }
}

/// The encoder or the decoder: blocks, then the final norm.
#[derive(Debug)]
struct Stack {
    /// Shared with the closures of checkpointed blocks ([`recompute`]).
    blocks: Vec<Shared<Block>>,
    final_layer_norm: LayerNorm,
    decoder: bool,
}

impl Stack {
    fn new(vars: Vars, c: &Config, decoder: bool) -> Self {
        let layers = if decoder { c.num_decoder_layers } else { c.num_encoder_layers };
        let blocks = (0..layers).map(|i| Shared::new(Block::new(&vars / "block" / i, c, i == 0, decoder))).collect();
        Self { blocks, final_layer_norm: LayerNorm::new(&vars / "final_layer_norm", c.d_model, c), decoder }
    }

    /// x: embedded tokens (B, T, C); `allowed` (B, 1, T, T), bool: which keys each query
    /// may see.
    fn forward(
        &self,
        x: &Tensor,
        allowed: &Tensor,
        encoder: Option<(&Tensor, Option<&Tensor>)>,
        c: &Config,
    ) -> Result<Tensor> {
        let t = x.size()[1];
        // The first block's table gives the bias of every block of the stack.
        let first = self.blocks.first().map(|b| &b.self_attention);
        let table = first.and_then(|a| a.relative_attention_bias.as_ref().map(|table| (a, table)));
        let mask = additive_mask(allowed, x.kind()); // (B, 1, T, T)
        let bias = match table {
            Some((attention, table)) => mask + attention.position_bias(table, t, t, !self.decoder, c), // (B, nh, T, T)
            None => mask,
        };
        let mut x = x.shallow_clone();
        for block in &self.blocks {
            x = if recompute::wanted() {
                // Keep only the inputs; the block's activations are recomputed in backward.
                let mut inputs = vec![&x, &bias];
                inputs.extend(encoder.map(|(memory, _)| memory));
                let (block, mask) = (block.clone(), encoder.and_then(|(_, mask)| mask).map(Tensor::shallow_clone));
                recompute::checkpoint(&inputs, move |t| {
                    block.forward(&t[0], &t[1], t.get(2).map(|m| (m, mask.as_ref())))
                })?
            } else {
                block.forward(&x, &bias, encoder)?
            };
        }
        Ok(self.final_layer_norm.forward(&x))
    }
}

/// The encoder-decoder with its LM head: `T5ForConditionalGeneration`.
#[derive(Debug)]
pub struct T5 {
    shared: Embedding,
    encoder: Stack,
    decoder: Stack,
    /// None when tied to `shared`.
    lm_head: Option<nn::Linear>,
    config: Config,
}

impl T5 {
    /// Builds the model's variables under `root` (`shared`, `encoder.*`, `decoder.*`,
    /// `lm_head` when untied), freshly initialised as HF does; load a checkpoint into the
    /// same VarStore to restore weights.
    fn build(root: &Vars, config: &Config) -> Self {
        let std = config.initializer_factor;
        let embed_config =
            nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: std }, ..Default::default() };
        let lm_head = (!config.tie_word_embeddings)
            .then(|| linear(root / "lm_head", config.d_model, config.vocab_size, config.initializer_factor));
        Self {
            shared: (root / "shared").embedding(config.vocab_size, config.d_model, embed_config),
            encoder: Stack::new(root / "encoder", config, false),
            decoder: Stack::new(root / "decoder", config, true),
            lm_head,
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The encoder's output (B, S, C) for `input_ids` (B, S); `attention_mask` (B, S) is 1
    /// for tokens and 0 for padding.
    pub fn encode(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s) = input_ids.size2()?;
        check_mask("attention_mask", attention_mask, b, s)?;
        let x = embedding_lookup(&self.shared.ws, None, input_ids, "input_ids")?;
        let allowed = match attention_mask {
            Some(mask) => mask.ne(0).view([b, 1, 1, s]),
            None => Tensor::ones([1, 1, 1, s], (Kind::Bool, x.device())),
        };
        self.encoder.forward(&x, &allowed, None, &self.config)
    }

    /// The decoder's output (B, T, C) for `decoder_input_ids` (B, T), causal and hiding the
    /// padding of `decoder_attention_mask` (B, T), attending to `encoder_output` (B, S, C)
    /// except where `attention_mask` (B, S) marks padding.
    pub fn decode(
        &self,
        decoder_input_ids: &Tensor,
        decoder_attention_mask: Option<&Tensor>,
        encoder_output: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = decoder_input_ids.size2()?;
        check_mask("decoder_attention_mask", decoder_attention_mask, b, t)?;
        let (eb, s, _) = encoder_output.size3()?;
        if eb != b {
            return Err(Error::Other(format!("the encoder output has {eb} rows, decoder_input_ids {b}")));
        }
        check_mask("attention_mask", attention_mask, b, s)?;
        let x = embedding_lookup(&self.shared.ws, None, decoder_input_ids, "decoder_input_ids")?;
        let device = x.device();
        let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0).view([1, 1, t, t]);
        let allowed = match decoder_attention_mask {
            Some(mask) => causal.logical_and(&mask.ne(0).view([b, 1, 1, t])), // (B, 1, T, T)
            None => causal,
        };
        let memory_mask = attention_mask.map(|m| key_padding_mask(m, x.kind())); // (B, 1, 1, S)
        self.decoder.forward(&x, &allowed, Some((encoder_output, memory_mask.as_ref())), &self.config)
    }

    /// Logits (B, T, vocab) from the decoder's output.
    pub fn lm_head(&self, hidden: &Tensor) -> Tensor {
        // The original T5 (tied head) scales by d_model^-0.5; v1.1 does not. transformers
        // follows `scale_decoder_outputs` whether tied or not, and so does plumb.
        let hidden = if self.config.scale_decoder_outputs {
            hidden * (self.config.d_model as f64).powf(-0.5)
        } else {
            hidden.shallow_clone()
        };
        match &self.lm_head {
            Some(head) => head.forward(&hidden),
            None => hidden.matmul(&self.shared.ws.tr()),
        }
    }
}

fn check_mask(name: &str, mask: Option<&Tensor>, b: i64, t: i64) -> Result<()> {
    match mask {
        Some(mask) if mask.size() != [b, t] => {
            Err(Error::Other(format!("{name} has shape {:?}; its input ids have [{b}, {t}]", mask.size())))
        }
        _ => Ok(()),
    }
}

/// Decoder inputs from labels (B, T), as HF's `_shift_right`: `decoder_start_token_id`,
/// then the labels but the last, with -100 (ignored positions) replaced by `pad_token_id`.
pub fn shift_right(labels: &Tensor, decoder_start_token_id: i64, pad_token_id: i64) -> Tensor {
    let t = labels.size().last().copied().unwrap_or(0);
    if t == 0 {
        return labels.copy();
    }
    let start = labels.narrow(-1, 0, 1).full_like(decoder_start_token_id);
    let shifted = Tensor::cat(&[start, labels.narrow(-1, 0, t - 1)], -1);
    shifted.masked_fill(&shifted.eq(-100), pad_token_id)
}

impl Architecture for T5 {
    type HfConfig = T5Config;
    type Config = Config;

    fn resolve(hf: T5Config) -> Result<(T5Config, Config)> {
        let config = hf.resolve()?;
        Ok((explicit(hf, &config), config))
    }

    /// The LM head is separate when the config unties it or the checkpoint has
    /// `lm_head.weight` (as transformers 5 saves an untied T5).
    fn fit_checkpoint(hf: &mut T5Config, config: &mut Config, names: &HashSet<String>) {
        if names.contains("lm_head.weight") {
            config.tie_word_embeddings = false;
            *hf = explicit(hf.clone(), config);
        }
    }

    fn build(vars: &Vars, config: &Config) -> Self {
        T5::build(vars, config)
    }

    fn checkpoint_key(name: &str, names: &HashSet<String>) -> String {
        key_or_alias(name, names, checkpoint_aliases(name))
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn hf_json(hf: &T5Config) -> Value {
        hf.to_hf_json()
    }

    fn generation_ids(hf: &T5Config) -> Option<[(&'static str, Option<Value>); 3]> {
        Some([
            ("decoder_start_token_id", hf.decoder_start_token_id.map(Value::from)),
            ("eos_token_id", hf.eos_token_id.clone()),
            ("pad_token_id", hf.pad_token_id.map(Value::from)),
        ])
    }
}

/// A T5 model with its variables and HF config.
pub type T5ForConditionalGeneration = Pretrained<T5>;

impl Pretrained<T5> {
    /// Logits (B, T, vocab) of the decoder reading `decoder_input_ids` (B, T) over the
    /// encoding of `input_ids` (B, S). The masks are 1 for tokens and 0 for padding.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        decoder_input_ids: &Tensor,
        decoder_attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let model = self.model();
        let encoded = model.encode(input_ids, attention_mask)?;
        let hidden = model.decode(decoder_input_ids, decoder_attention_mask, &encoded, attention_mask)?;
        Ok(model.lm_head(&hidden))
    }

    /// Decoder inputs for `labels` (B, T), with this model's start and pad tokens.
    pub fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        let c = self.config();
        match (c.decoder_start_token_id, c.pad_token_id) {
            (Some(start), Some(pad)) => Ok(shift_right(labels, start, pad)),
            _ => Err(Error::config("pad_token_id", "shifting labels right needs a pad token; config.json has none")),
        }
    }
}

/// `hf` with the head's tying, the output scaling and the decoder's start token written
/// out, as resolved, so a saved config means the same to every `transformers` version.
fn explicit(mut hf: T5Config, config: &Config) -> T5Config {
    hf.tie_word_embeddings = Some(config.tie_word_embeddings);
    hf.scale_decoder_outputs = Some(config.scale_decoder_outputs);
    hf.decoder_start_token_id = config.decoder_start_token_id;
    hf
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint;

    fn tiny(feed_forward: &str, tie: bool) -> T5Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_decoder_layers": 3,
            "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
            "feed_forward_proj": feed_forward, "tie_word_embeddings": tie
        }))
        .unwrap()
    }

    fn model(feed_forward: &str, tie: bool) -> T5ForConditionalGeneration {
        tch::manual_seed(0);
        T5ForConditionalGeneration::new(tiny(feed_forward, tie), tch::Device::Cpu).unwrap()
    }

    fn ids(v: &[i64]) -> Tensor {
        Tensor::from_slice(v).view([1, -1])
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn buckets_match_mesh_tensorflow() {
        // Expected values from transformers' T5Attention._relative_position_bucket.
        let relative = Tensor::from_slice(&[-200i64, -40, -17, -16, -9, -8, -7, -1, 0, 1, 7, 8, 9, 16, 17, 40, 200]);
        let buckets = |bidirectional, n, d| {
            Vec::<i64>::try_from(relative_position_bucket(&relative, bidirectional, n, d)).unwrap()
        };
        assert_eq!(buckets(true, 32, 128), [15, 12, 10, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 26, 28, 31]);
        assert_eq!(buckets(false, 32, 128), [31, 23, 16, 16, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(buckets(true, 8, 16), [3, 3, 3, 3, 3, 3, 3, 1, 0, 5, 7, 7, 7, 7, 7, 7, 7]);
    }

    #[test]
    fn variables_are_named_as_hf_saves_them() {
        let vars: BTreeMap<String, Vec<i64>> =
            model("gated-gelu", false).var_store().variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        assert_eq!(vars["shared.weight"], [50, 16]);
        assert_eq!(vars["lm_head.weight"], [50, 16]);
        assert_eq!(vars["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], [8, 4]);
        assert_eq!(vars["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], [8, 4]);
        assert!(!vars.contains_key("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"));
        assert_eq!(vars["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"], [24, 16]);
        assert_eq!(vars["decoder.block.2.layer.1.EncDecAttention.q.weight"], [16, 16]);
        assert_eq!(vars["decoder.block.2.layer.2.DenseReluDense.wo.weight"], [16, 24]);
        assert_eq!(vars["decoder.final_layer_norm.weight"], [16]);
        // shared, lm_head, 2 final norms; encoder blocks 9 (+1 bias), decoder blocks 14 (+1).
        assert_eq!(vars.len(), 4 + 2 * 9 + 1 + 3 * 14 + 1);
        let relu = model("relu", true);
        let names: Vec<String> = relu.var_store().variables().into_keys().collect();
        assert!(names.contains(&"encoder.block.0.layer.1.DenseReluDense.wi.weight".to_string()));
        assert!(!names.contains(&"lm_head.weight".to_string()), "tied to shared");
    }

    #[test]
    fn the_decoder_is_causal_and_padding_is_hidden() {
        let m = model("relu", true);
        let source = ids(&[5, 6, 7, 8]);
        let a = m.forward(&source, None, &ids(&[0, 2, 3, 4, 5]), None).unwrap();
        let b = m.forward(&source, None, &ids(&[0, 2, 3, 9, 9]), None).unwrap();
        assert!(max_abs(&a.narrow(1, 0, 3), &b.narrow(1, 0, 3)) < 1e-6, "no position sees later ones");
        assert!(max_abs(&a.narrow(1, 3, 2), &b.narrow(1, 3, 2)) > 1e-4);

        let padded = m
            .forward(&ids(&[5, 6, 7, 8, 0, 0]), Some(&ids(&[1, 1, 1, 1, 0, 0])), &ids(&[0, 2, 3, 4, 5]), None)
            .unwrap();
        let diff = max_abs(&a, &padded);
        assert!(diff < 1e-5, "padded encoder positions are invisible to the decoder: {diff}");
        let right = m.forward(&source, None, &ids(&[0, 2, 3, 4, 5, 0, 0]), Some(&ids(&[1, 1, 1, 1, 1, 0, 0]))).unwrap();
        let diff = max_abs(&a, &right.narrow(1, 0, 5));
        assert!(diff < 1e-5, "{diff}");
        let empty = m.forward(&ids(&[0, 0]), Some(&ids(&[0, 0])), &ids(&[0, 0]), Some(&ids(&[0, 0]))).unwrap();
        assert_eq!(empty.isfinite().all().int64_value(&[]), 1, "all-padding rows stay finite");
    }

    #[test]
    fn the_relative_position_bias_is_trained() {
        let m = model("gated-gelu", false);
        let logits = m.forward(&ids(&[5, 6, 7, 8]), None, &ids(&[0, 2, 3]), None).unwrap();
        logits.log_softmax(-1, Kind::Float).narrow(2, 7, 1).sum(Kind::Float).backward();
        for stack in ["encoder", "decoder"] {
            let name = format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
            let grad = m.var_store().variables()[&name].grad();
            assert!(grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name}");
        }
    }

    #[test]
    fn a_saved_model_loads_back_with_the_same_logits() {
        for (feed_forward, tie) in [("relu", true), ("gated-gelu", false)] {
            let m = model(feed_forward, tie);
            let dir = tempfile::tempdir().unwrap();
            m.save(dir.path()).unwrap();
            let config: Value = checkpoint::read_json(&dir.path().join("config.json")).unwrap();
            assert_eq!(config["architectures"], serde_json::json!(["T5ForConditionalGeneration"]));
            assert_eq!(config["scale_decoder_outputs"], serde_json::json!(tie));
            assert_eq!(config["decoder_start_token_id"], serde_json::json!(0));
            let loaded = T5ForConditionalGeneration::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
            let (x, y) = (ids(&[3, 1, 4, 1, 5, 9]), ids(&[0, 2, 6]));
            let diff = max_abs(&m.forward(&x, None, &y, None).unwrap(), &loaded.forward(&x, None, &y, None).unwrap());
            assert_eq!(diff, 0.0);
            assert_eq!(loaded.hf_config(), m.hf_config());
            assert_eq!(loaded.num_parameters(), m.num_parameters());
        }
    }

    #[test]
    fn embed_tokens_aliases_load_and_a_missing_tensor_is_named() {
        let m = model("relu", true);
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let mut tensors: Vec<(String, Tensor)> = m
            .var_store()
            .variables()
            .into_iter()
            .map(|(name, t)| (if name == "shared.weight" { "encoder.embed_tokens.weight".into() } else { name }, t))
            .collect();
        checkpoint::save_safetensors(&dir.path().join(checkpoint::SINGLE_FILE), &tensors).unwrap();
        let loaded = T5ForConditionalGeneration::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
        let (x, y) = (ids(&[3, 1, 4]), ids(&[0, 2]));
        assert_eq!(max_abs(&m.forward(&x, None, &y, None).unwrap(), &loaded.forward(&x, None, &y, None).unwrap()), 0.0);

        tensors.retain(|(name, _)| name != "decoder.block.1.layer.1.EncDecAttention.k.weight");
        checkpoint::save_safetensors(&dir.path().join(checkpoint::SINGLE_FILE), &tensors).unwrap();
        let message =
            T5ForConditionalGeneration::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(
            message
                .ends_with("model.safetensors: tensor `decoder.block.1.layer.1.EncDecAttention.k.weight` is missing"),
            "{message}"
        );
    }

    #[test]
    fn shift_right_starts_with_the_start_token_and_pads_ignored_labels() {
        let labels = Tensor::from_slice(&[7i64, 8, 1, -100, 4, 1, -100, -100]).view([2, 4]);
        let shifted = Vec::<i64>::try_from(shift_right(&labels, 5, 0).view([-1])).unwrap();
        assert_eq!(shifted, [5, 7, 8, 1, 5, 4, 1, 0]);
    }

    #[test]
    fn unsupported_options_name_their_field_and_the_file() {
        let error = |edit: &dyn Fn(&mut T5Config)| {
            let mut c = tiny("relu", true);
            edit(&mut c);
            c.resolve().err().unwrap().to_string()
        };
        assert_eq!(
            error(&|c| c.feed_forward_proj = "gated-mish".into()),
            "feed_forward_proj: unsupported activation `mish`; supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu"
        );
        assert_eq!(
            error(&|c| c.feed_forward_proj = "gated-gelu-x".into()),
            "feed_forward_proj: `gated-gelu-x` is neither `ACT` nor `gated-ACT` (for example `relu` or `gated-gelu`)"
        );
        assert_eq!(
            error(&|c| c.relative_attention_num_buckets = 2),
            "relative_attention_num_buckets: expected at least 4, found 2"
        );
        assert_eq!(
            error(&|c| c.num_decoder_layers = Some(0)),
            "num_decoder_layers: expected a positive integer, found 0"
        );
        assert_eq!(error(&|c| c.pad_token_id = Some(-1)), "pad_token_id: -1 is not a token id (vocab_size is 50)");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "t5", "d_kv": 0}"#).unwrap();
        let message =
            T5ForConditionalGeneration::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(message.ends_with("config.json: d_kv: expected a positive integer, found 0"), "{message}");
    }

    #[test]
    fn a_minimal_config_gets_t5s_defaults_and_v1_1_unties_and_unscales() {
        let hf: T5Config = serde_json::from_str(r#"{"model_type": "t5"}"#).unwrap();
        let c = hf.resolve().unwrap();
        assert_eq!((c.vocab_size, c.d_model, c.d_kv, c.d_ff, c.num_heads), (32128, 512, 64, 2048, 8));
        assert_eq!((c.num_encoder_layers, c.num_decoder_layers, c.num_buckets, c.max_distance), (6, 6, 32, 128));
        assert_eq!((c.gated, c.activation), (false, Activation::Relu));
        assert!(c.tie_word_embeddings && c.scale_decoder_outputs);
        assert_eq!((c.pad_token_id, c.decoder_start_token_id), (Some(0), Some(0)));

        let v1_1: T5Config =
            serde_json::from_str(r#"{"feed_forward_proj": "gated-gelu", "tie_word_embeddings": false}"#).unwrap();
        let c = v1_1.resolve().unwrap();
        assert_eq!((c.gated, c.activation), (true, Activation::GeluTanh));
        assert!(!c.tie_word_embeddings && !c.scale_decoder_outputs);
        // As transformers 5 writes it: tied by name, unscaled; the head comes from the checkpoint.
        let v5: T5Config =
            serde_json::from_str(r#"{"tie_word_embeddings": true, "scale_decoder_outputs": false}"#).unwrap();
        let c = v5.resolve().unwrap();
        assert!(c.tie_word_embeddings && !c.scale_decoder_outputs);
    }
}

//! BERT for masked-LM pretraining, as `transformers`' `BertForMaskedLM` builds and saves
//! it: a bidirectional encoder of post-LayerNorm blocks (attention, then a GELU
//! feed-forward, each followed by residual + LayerNorm) over the sum of word, learned
//! position and token-type embeddings, and an MLM head (dense, activation, LayerNorm,
//! then the word embedding transposed plus a per-token bias).
//!
//! Paper: Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
//! Language Understanding". Reference: transformers/models/bert/modeling_bert.py.
//! Variable paths equal the checkpoint keys (`bert.encoder.layer.0.attention.self.query.weight`);
//! older checkpoints that name LayerNorm parameters `gamma`/`beta`, or the MLM bias
//! `cls.predictions.decoder.bias`, load too (see [`checkpoint_aliases`]).
//!
//! Dropout is not applied: plumb's models have none, in training or not.
use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::family::{Architecture, Pretrained};
use super::recompute::{self, Shared};
use super::vars::{Embedding, Vars};
use super::{embedding_lookup as lookup, key_or_alias, key_padding_mask};
use crate::error::{Error, Result};

/// The model type of this family in `config.json`.
pub const MODEL_TYPE: &str = "bert";

/// `config.json` as HF writes it for `BertForMaskedLM` (HF's field names and the defaults
/// of `BertConfig`; fields we do not use are ignored when reading).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_num_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Not applied by plumb; kept so a saved config trains the same in `transformers`.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// The padding token: its embedding row starts at zero and gets no gradient from
    /// the lookup, as with `nn.Embedding(padding_idx=...)`. null for none.
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<i64>,
    /// Older configs; transformers 5 only has absolute positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// A causal BERT (`BertLMHeadModel`); not supported.
    #[serde(default)]
    pub is_decoder: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    /// The MLM decoder is the word embedding; untied heads are not supported.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<Value>,
}

fn default_model_type() -> String {
    MODEL_TYPE.into()
}
fn default_vocab_size() -> usize {
    30522
}
fn default_hidden_size() -> usize {
    768
}
fn default_num_layers() -> usize {
    12
}
fn default_num_heads() -> usize {
    12
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_positions() -> usize {
    512
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_pad_token_id() -> Option<i64> {
    Some(0)
}
fn default_true() -> bool {
    true
}

/// The feed-forward's (and MLM transform's) nonlinearity, by its HF name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, x * Phi(x): `gelu`.
    Gelu,
    /// GELU with the tanh approximation: `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`.
    GeluTanh,
    Relu,
    /// x * sigmoid(x): `silu`, `swish`.
    Silu,
}

impl Activation {
    /// `key` is the config field the name came from, for the error.
    pub fn from_hf(name: &str, key: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(Error::config(
                key,
                format!(
                    "unsupported activation `{other}`; supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu"
                ),
            )),
        }
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// The resolved configuration: no options left.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub head_dim: i64,
    /// Rows of the position embedding: the longest sequence the model can read.
    pub max_positions: i64,
    pub type_vocab_size: i64,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub initializer_range: f64,
    pub pad_token_id: Option<i64>,
}

impl BertConfig {
    /// Checks and resolves; every unsupported option is an error naming its field.
    pub fn resolve(&self) -> Result<Config> {
        let field = |name: &str, message: String| Error::config(name, message);
        if self.model_type != MODEL_TYPE {
            return Err(field(
                "model_type",
                format!("unsupported model_type `{}`; this family covers {MODEL_TYPE}", self.model_type),
            ));
        }
        if self.is_decoder || self.add_cross_attention {
            let key = if self.is_decoder { "is_decoder" } else { "add_cross_attention" };
            return Err(field(
                key,
                "a causal or cross-attending BERT is not supported; BertForMaskedLM is neither".into(),
            ));
        }
        if !self.tie_word_embeddings {
            return Err(field(
                "tie_word_embeddings",
                "an MLM decoder untied from the word embedding is not supported".into(),
            ));
        }
        if let Some(kind) = self.position_embedding_type.as_deref().filter(|&k| k != "absolute") {
            return Err(field(
                "position_embedding_type",
                format!("unsupported position embedding type `{kind}`; supported: absolute"),
            ));
        }
        let activation = Activation::from_hf(&self.hidden_act, "hidden_act")?;
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if value == 0 {
                return Err(field(name, "expected a positive integer, found 0".into()));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(field(
                "num_attention_heads",
                format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if let Some(pad) = self.pad_token_id.filter(|&p| p < 0 || p >= self.vocab_size as i64) {
            return Err(field("pad_token_id", format!("{pad} is not a token id (vocab_size is {})", self.vocab_size)));
        }
        Ok(Config {
            vocab_size: self.vocab_size as i64,
            hidden_size: self.hidden_size as i64,
            intermediate_size: self.intermediate_size as i64,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads as i64,
            head_dim: (self.hidden_size / self.num_attention_heads) as i64,
            max_positions: self.max_position_embeddings as i64,
            type_vocab_size: self.type_vocab_size as i64,
            activation,
            layer_norm_eps: self.layer_norm_eps,
            initializer_range: self.initializer_range,
            pad_token_id: self.pad_token_id,
        })
    }

    /// `config.json` for saving, with the fields `transformers` expects.
    pub fn to_hf_json(&self) -> Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            map.insert("architectures".into(), serde_json::json!(["BertForMaskedLM"]));
        }
        json
    }
}

/// Other names older checkpoints give a variable: TF-era `LayerNorm.gamma`/`beta`, and
/// `cls.predictions.decoder.bias` for the MLM bias (tied to `cls.predictions.bias`).
pub fn checkpoint_aliases(name: &str) -> Vec<String> {
    let mut aliases = Vec::new();
    if let Some(prefix) = name.strip_suffix("LayerNorm.weight") {
        aliases.push(format!("{prefix}LayerNorm.gamma"));
    }
    if let Some(prefix) = name.strip_suffix("LayerNorm.bias") {
        aliases.push(format!("{prefix}LayerNorm.beta"));
    }
    if name == "cls.predictions.bias" {
        aliases.push("cls.predictions.decoder.bias".into());
    }
    aliases
}

fn linear(vars: Vars, in_dim: i64, out_dim: i64, std: f64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    vars.linear(in_dim, out_dim, config)
}

fn layer_norm(vars: Vars, dim: i64, eps: f64) -> nn::LayerNorm {
    vars.layer_norm(dim, nn::LayerNormConfig { eps, ..Default::default() })
}

fn embedding(vars: Vars, rows: i64, dim: i64, std: f64, padding_idx: Option<i64>) -> Embedding {
    let config = nn::EmbeddingConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        padding_idx: padding_idx.unwrap_or(-1),
        ..Default::default()
    };
    let embedding = vars.embedding(rows, dim, config);
    if let Some(pad) = padding_idx.filter(|_| vars.is_fresh()) {
        // HF zeroes the padding row at init.
        let _ = tch::no_grad(|| embedding.ws.get(pad).zero_());
    }
    embedding
}

#[derive(Debug)]
struct Embeddings {
    word_embeddings: Embedding,
    pad_token_id: Option<i64>,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: nn::LayerNorm,
}

impl Embeddings {
    fn new(vars: Vars, c: &Config) -> Self {
        let (h, std) = (c.hidden_size, c.initializer_range);
        Self {
            word_embeddings: embedding(&vars / "word_embeddings", c.vocab_size, h, std, c.pad_token_id),
            pad_token_id: c.pad_token_id,
            position_embeddings: embedding(&vars / "position_embeddings", c.max_positions, h, std, None),
            token_type_embeddings: embedding(&vars / "token_type_embeddings", c.type_vocab_size, h, std, None),
            layer_norm: layer_norm(&vars / "LayerNorm", h, c.layer_norm_eps),
        }
    }

    /// input_ids, token_type_ids: (B, T) -> (B, T, C)
    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0); // (1, T)
        let x = lookup(&self.word_embeddings.ws, self.pad_token_id, input_ids, "input_ids")?
            + lookup(&self.token_type_embeddings.ws, None, token_type_ids, "token_type_ids")?
            + self.position_embeddings.forward(&positions);
        Ok(self.layer_norm.forward(&x))
    }
}

#[derive(Debug)]
struct SelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    num_heads: i64,
    head_dim: i64,
}

impl SelfAttention {
    fn new(vars: Vars, c: &Config) -> Self {
        let (h, std) = (c.hidden_size, c.initializer_range);
        Self {
            query: linear(&vars / "query", h, h, std),
            key: linear(&vars / "key", h, h, std),
            value: linear(&vars / "value", h, h, std),
            num_heads: c.num_heads,
            head_dim: c.head_dim,
        }
    }

    /// x: (B, T, C); `mask`: additive (B, 1, 1, T) hiding padded keys, or None.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, c) = x.size3()?;
        let heads = |proj: &nn::Linear| proj.forward(x).view([b, t, self.num_heads, self.head_dim]).transpose(1, 2);
        // Each (B, nh, T, hd). Bidirectional: no causal mask; the default scale 1/sqrt(hd).
        let (q, k, v) = (heads(&self.query), heads(&self.key), heads(&self.value));
        let y = Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false)?; // (B, nh, T, hd)
        Ok(y.transpose(1, 2).contiguous().view([b, t, c]))
    }
}

/// A post-LayerNorm encoder block: x = LN(x + attn(x)); x = LN(x + ffn(x)).
#[derive(Debug)]
struct Layer {
    attention: SelfAttention,
    attention_dense: nn::Linear,
    attention_layer_norm: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_layer_norm: nn::LayerNorm,
    activation: Activation,
}

impl Layer {
    fn new(vars: Vars, c: &Config) -> Self {
        let (h, i, std, eps) = (c.hidden_size, c.intermediate_size, c.initializer_range, c.layer_norm_eps);
        let attention = &vars / "attention";
        Self {
            attention: SelfAttention::new(&attention / "self", c),
            attention_dense: linear(&attention / "output" / "dense", h, h, std),
            attention_layer_norm: layer_norm(&attention / "output" / "LayerNorm", h, eps),
            intermediate: linear(&vars / "intermediate" / "dense", h, i, std),
            output: linear(&vars / "output" / "dense", i, h, std),
            output_layer_norm: layer_norm(&vars / "output" / "LayerNorm", h, eps),
            activation: c.activation,
        }
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let attended = self.attention_dense.forward(&self.attention.forward(x, mask)?);
        let x = self.attention_layer_norm.forward(&(x + attended));
        let hidden = self.activation.apply(&self.intermediate.forward(&x)); // (B, T, I)
        Ok(self.output_layer_norm.forward(&(&x + self.output.forward(&hidden))))
    }
}

/// The encoder and its MLM head: `BertForMaskedLM`.
#[derive(Debug)]
pub struct Bert {
    embeddings: Embeddings,
    /// Shared with the closures of checkpointed layers ([`recompute`]).
    layers: Vec<Shared<Layer>>,
    transform_dense: nn::Linear,
    transform_layer_norm: nn::LayerNorm,
    /// The MLM head's per-token output bias (vocab,).
    bias: Tensor,
    config: Config,
}

impl Bert {
    /// The model's variables under `root` (`bert.*`, `cls.*`), initialised as HF does or
    /// for a checkpoint to fill (see [`Vars`]).
    fn build(root: &Vars, config: &Config) -> Self {
        let bert = root / "bert";
        let layers =
            (0..config.num_layers).map(|i| Shared::new(Layer::new(&bert / "encoder" / "layer" / i, config))).collect();
        let predictions = root / "cls" / "predictions";
        let (h, std) = (config.hidden_size, config.initializer_range);
        Self {
            embeddings: Embeddings::new(&bert / "embeddings", config),
            layers,
            transform_dense: linear(&predictions / "transform" / "dense", h, h, std),
            transform_layer_norm: layer_norm(&predictions / "transform" / "LayerNorm", h, config.layer_norm_eps),
            bias: predictions.var("bias", &[config.vocab_size], nn::Init::Const(0.0)),
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The encoder's last hidden states (B, T, C) of `input_ids` (B, T).
    /// `token_type_ids` (B, T) defaults to all zeros (segment A); `attention_mask` (B, T)
    /// is 1 for tokens and 0 for padding, which no token attends to.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.size2()?;
        if t > self.config.max_positions {
            return Err(Error::Other(format!(
                "{t} positions exceed the model's context of {} (max_position_embeddings)",
                self.config.max_positions
            )));
        }
        for (name, tensor) in [("token_type_ids", token_type_ids), ("attention_mask", attention_mask)] {
            if let Some(tensor) = tensor.filter(|m| m.size() != [b, t]) {
                return Err(Error::Other(format!("{name} has shape {:?}; input_ids has [{b}, {t}]", tensor.size())));
            }
        }
        let zeros;
        let token_type_ids = match token_type_ids {
            Some(ids) => ids,
            None => {
                zeros = input_ids.zeros_like();
                &zeros
            }
        };
        let mut x = self.embeddings.forward(input_ids, token_type_ids)?; // (B, T, C)
        let mask = attention_mask.map(|m| key_padding_mask(m, x.kind())); // (B, 1, 1, T)
        for layer in &self.layers {
            x = if recompute::wanted() {
                // Keep only x; the layer's activations are recomputed in backward.
                let (layer, mask) = (layer.clone(), mask.as_ref().map(Tensor::shallow_clone));
                recompute::checkpoint(&[&x], move |x| layer.forward(&x[0], mask.as_ref()))?
            } else {
                layer.forward(&x, mask.as_ref())?
            };
        }
        Ok(x)
    }

    /// MLM logits (B, T, vocab) from hidden states: the transform, then the word
    /// embedding transposed (tied) plus the bias.
    pub fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        let x = self.config.activation.apply(&self.transform_dense.forward(hidden));
        let x = self.transform_layer_norm.forward(&x);
        x.matmul(&self.embeddings.word_embeddings.ws.tr()) + &self.bias
    }
}

impl Architecture for Bert {
    type HfConfig = BertConfig;
    type Config = Config;

    fn resolve(hf: BertConfig) -> Result<(BertConfig, Config)> {
        let config = hf.resolve()?;
        Ok((hf, config))
    }

    fn build(vars: &Vars, config: &Config) -> Self {
        Bert::build(vars, config)
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

    fn hf_json(hf: &BertConfig) -> Value {
        hf.to_hf_json()
    }

    /// None: `save_pretrained` writes no generation config for an encoder.
    fn generation_ids(_hf: &BertConfig) -> Option<[(&'static str, Option<Value>); 3]> {
        None
    }
}

/// A BERT masked LM with its variables and HF config.
pub type BertForMaskedLm = Pretrained<Bert>;

impl Pretrained<Bert> {
    /// MLM logits (B, T, vocab) of `input_ids` (B, T), all of segment A; `attention_mask`
    /// (B, T) is 1 for tokens and 0 for padding.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_token_types(input_ids, None, attention_mask)
    }

    /// As [`BertForMaskedLm::forward`], with segment ids (B, T) for sentence pairs.
    pub fn forward_with_token_types(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self.model().hidden_states(input_ids, token_type_ids, attention_mask)?;
        Ok(self.model().mlm_head(&hidden))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint;

    fn tiny() -> BertConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 24, "max_position_embeddings": 32
        }))
        .unwrap()
    }

    fn model() -> BertForMaskedLm {
        tch::manual_seed(0);
        BertForMaskedLm::new(tiny(), tch::Device::Cpu).unwrap()
    }

    fn ids(v: &[i64]) -> Tensor {
        Tensor::from_slice(v).view([1, -1])
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn variables_are_named_and_initialised_as_hf_does() {
        let m = model();
        let vars: BTreeMap<String, Tensor> = m.var_store().variables().into_iter().collect();
        assert_eq!(vars["bert.encoder.layer.1.attention.self.query.weight"].size(), [16, 16]);
        assert_eq!(vars["bert.encoder.layer.0.intermediate.dense.weight"].size(), [24, 16]);
        assert_eq!(vars["bert.encoder.layer.0.output.dense.weight"].size(), [16, 24]);
        assert_eq!(vars["bert.embeddings.position_embeddings.weight"].size(), [32, 16]);
        assert_eq!(vars["bert.embeddings.token_type_embeddings.weight"].size(), [2, 16]);
        assert_eq!(vars["cls.predictions.bias"].size(), [50]);
        assert!(!vars.keys().any(|k| k.contains("decoder")), "the decoder is the word embedding");
        assert_eq!(vars.len(), 5 + 2 * 16 + 5);
        // Zero biases, LayerNorm ones, the padding row zero, weights N(0, 0.02).
        assert_eq!(
            vars["bert.encoder.layer.0.attention.output.dense.bias"].abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
        assert_eq!(vars["bert.embeddings.LayerNorm.weight"].mean(Kind::Float).double_value(&[]), 1.0);
        let words = &vars["bert.embeddings.word_embeddings.weight"];
        assert_eq!(words.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let std = words.narrow(0, 1, 49).std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.003, "{std}");
    }

    #[test]
    fn attention_is_bidirectional_and_padding_is_hidden() {
        let m = model();
        // Read on the encoder's hidden states, not the logits: through the tied head of
        // N(0, 0.02) weights the first token's logits move by as little as 8.5e-5 for some
        // initialisations (the least over 300 seeds), and tests running beside this one draw
        // from the same global generator, so the weights are not always seed 0's. The hidden
        // states moved by at least 1.1e-3 over those seeds; a causal model's do not move.
        let hidden = |x: &[i64]| m.model().hidden_states(&ids(x), None, None).unwrap();
        let (a, b) = (hidden(&[1, 2, 3, 4, 5]), hidden(&[1, 2, 3, 4, 9]));
        let moved = max_abs(&a.narrow(1, 0, 1), &b.narrow(1, 0, 1));
        assert!(moved > 1e-4, "the first token sees the last: {moved}");

        let plain = m.forward(&ids(&[5, 6, 7]), None).unwrap();
        let padded = m.forward(&ids(&[5, 6, 7, 0, 0]), Some(&ids(&[1, 1, 1, 0, 0]))).unwrap();
        let diff = max_abs(&plain, &padded.narrow(1, 0, 3));
        assert!(diff < 1e-5, "{diff}");
        let empty = m.forward(&ids(&[0, 0]), Some(&ids(&[0, 0]))).unwrap();
        assert_eq!(empty.isfinite().all().int64_value(&[]), 1, "an all-padding row stays finite");
    }

    #[test]
    fn a_saved_model_loads_back_with_the_same_logits() {
        let m = model();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let config: Value = checkpoint::read_json(&dir.path().join("config.json")).unwrap();
        assert_eq!(config["architectures"], serde_json::json!(["BertForMaskedLM"]));
        let loaded = BertForMaskedLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
        let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6]);
        assert_eq!(max_abs(&m.forward(&x, None).unwrap(), &loaded.forward(&x, None).unwrap()), 0.0);
        assert_eq!(loaded.hf_config(), m.hf_config());
        assert_eq!(loaded.num_parameters(), m.num_parameters());
    }

    #[test]
    fn tf_era_names_load_and_a_missing_tensor_is_named() {
        let m = model();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let mut tensors: Vec<(String, Tensor)> = m
            .var_store()
            .variables()
            .into_iter()
            .map(|(name, t)| {
                let name =
                    name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta");
                (name.replace("cls.predictions.bias", "cls.predictions.decoder.bias"), t)
            })
            .collect();
        checkpoint::save_safetensors(&dir.path().join(checkpoint::SINGLE_FILE), &tensors).unwrap();
        let loaded = BertForMaskedLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
        let x = ids(&[3, 1, 4, 1, 5]);
        assert_eq!(max_abs(&m.forward(&x, None).unwrap(), &loaded.forward(&x, None).unwrap()), 0.0);

        tensors.retain(|(name, _)| name != "bert.encoder.layer.1.output.dense.bias");
        checkpoint::save_safetensors(&dir.path().join(checkpoint::SINGLE_FILE), &tensors).unwrap();
        let message = BertForMaskedLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(
            message.ends_with("model.safetensors: tensor `bert.encoder.layer.1.output.dense.bias` is missing"),
            "{message}"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = model();
        let message = m.forward(&ids(&[1, 50]), None).err().unwrap().to_string();
        assert_eq!(message, "input_ids: ids must lie in [0, 50), found ids from 1 to 50");
        let long: Vec<i64> = (0..33).map(|i| i % 50).collect();
        let message = m.forward(&ids(&long), None).err().unwrap().to_string();
        assert_eq!(message, "33 positions exceed the model's context of 32 (max_position_embeddings)");
        let message = m.forward(&ids(&[1, 2]), Some(&ids(&[1, 1, 1]))).err().unwrap().to_string();
        assert_eq!(message, "attention_mask has shape [1, 3]; input_ids has [1, 2]");
    }

    #[test]
    fn unsupported_options_name_their_field_and_the_file() {
        let error = |edit: &dyn Fn(&mut BertConfig)| {
            let mut c = tiny();
            edit(&mut c);
            c.resolve().err().unwrap().to_string()
        };
        assert_eq!(
            error(&|c| c.hidden_act = "mish".into()),
            "hidden_act: unsupported activation `mish`; supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu"
        );
        assert_eq!(
            error(&|c| c.num_attention_heads = 3),
            "num_attention_heads: hidden_size (16) is not divisible by num_attention_heads (3)"
        );
        assert_eq!(
            error(&|c| c.position_embedding_type = Some("relative_key".into())),
            "position_embedding_type: unsupported position embedding type `relative_key`; supported: absolute"
        );
        assert_eq!(error(&|c| c.type_vocab_size = 0), "type_vocab_size: expected a positive integer, found 0");
        assert_eq!(error(&|c| c.pad_token_id = Some(50)), "pad_token_id: 50 is not a token id (vocab_size is 50)");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "bert", "hidden_act": "tanh"}"#).unwrap();
        let message = BertForMaskedLm::from_dir(dir.path(), tch::Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(message.ends_with("config.json: hidden_act: unsupported activation `tanh`; supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu"), "{message}");
    }

    #[test]
    fn a_minimal_config_gets_berts_defaults() {
        let hf: BertConfig = serde_json::from_str(r#"{"model_type": "bert"}"#).unwrap();
        let c = hf.resolve().unwrap();
        assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers), (30522, 768, 3072, 12));
        assert_eq!((c.num_heads, c.max_positions, c.type_vocab_size), (12, 512, 2));
        assert_eq!((c.activation, c.layer_norm_eps, c.pad_token_id), (Activation::Gelu, 1e-12, Some(0)));
    }
}

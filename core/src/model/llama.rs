//! Llama-style decoder-only transformer: RMSNorm, rotary position embeddings (RoPE),
//! SwiGLU feed-forward, causal attention through `scaled_dot_product_attention`, with
//! grouped-query attention and tied or untied embeddings.
//!
//! Paper: Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models".
//! Reference: transformers/models/llama/modeling_llama.py. Variable paths equal the HF
//! checkpoint keys (`model.layers.0.self_attn.q_proj.weight`), so a checkpoint loads by
//! a key-by-key copy.
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use std::path::Path;

use crate::checkpoint::{load_safetensors_into, save_safetensors, write_file_atomically};
use crate::error::{Error, IoResultExt, Result};
use crate::model::Policy;

/// `config.json` as HF writes it for `LlamaForCausalLM` (HF's field names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
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
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_initializer_range() -> f64 {
    0.02
}

/// The resolved configuration: no options left.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: usize,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub max_positions: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub initializer_range: f64,
}

impl LlamaConfig {
    /// Checks and resolves; every unsupported option is an error naming its field.
    pub fn resolve(&self) -> Result<Config> {
        let field = |name: &str, message: String| Error::config(name, message);
        if self.model_type != "llama" {
            return Err(field(
                "model_type",
                format!("unsupported model_type `{}`; this family is `llama`", self.model_type),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(field("hidden_act", format!("unsupported activation `{}`; expected `silu`", self.hidden_act)));
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(field("rope_scaling", format!("rope scaling {scaling} is not supported yet")));
            }
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
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(field(
                "num_key_value_heads",
                format!("expected a positive divisor of num_attention_heads ({heads}), found {kv_heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size % heads == 0 => self.hidden_size / heads,
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
        Ok(Config {
            vocab_size: self.vocab_size as i64,
            hidden_size: self.hidden_size as i64,
            intermediate_size: self.intermediate_size as i64,
            num_layers: self.num_hidden_layers,
            num_heads: heads as i64,
            num_kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
            max_positions: self.max_position_embeddings as i64,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            initializer_range: self.initializer_range,
        })
    }

    /// `config.json` for saving, with the fields `transformers` expects.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut json = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            map.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
            map.insert("torch_dtype".into(), serde_json::json!("float32"));
            map.retain(|_, v| !v.is_null());
        }
        json
    }
}

fn linear(path: nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(path, in_dim, out_dim, config)
}

/// Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(path: nn::Path, dim: i64, eps: f64) -> Self {
        Self { weight: path.ones("weight", &[dim]), eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = &x * (variance + self.eps).rsqrt();
        normed.to_kind(kind) * &self.weight
    }
}

/// cos/sin tables for rotary embeddings, HF's "rotate half" layout: (max_positions, head_dim).
fn rope_tables(config: &Config, device: tch::Device) -> (Tensor, Tensor) {
    // inv_freq = 1 / theta^(2i / head_dim), as HF computes it.
    let exponents = Tensor::arange_start_step(0, config.head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float)
        / config.head_dim as f64;
    let inv_freq = Tensor::pow_scalar(config.rope_theta, &exponents).reciprocal(); // (hd/2)
    let positions = Tensor::arange(config.max_positions, (Kind::Float, device));
    let freqs = positions.outer(&inv_freq); // (P, hd/2)
    let emb = Tensor::cat(&[&freqs, &freqs], -1); // (P, hd)
    (emb.cos(), emb.sin())
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(path: nn::Path, c: &Config) -> Self {
        let std = c.initializer_range;
        let (h, hd) = (c.hidden_size, c.head_dim);
        Self {
            q_proj: linear(&path / "q_proj", h, c.num_heads * hd, c.attention_bias, std),
            k_proj: linear(&path / "k_proj", h, c.num_kv_heads * hd, c.attention_bias, std),
            v_proj: linear(&path / "v_proj", h, c.num_kv_heads * hd, c.attention_bias, std),
            o_proj: linear(&path / "o_proj", c.num_heads * hd, h, false, std),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
        }
    }

    /// x: (B, T, C); cos/sin: (T, hd); mask: additive (B, 1, T, T) or None for plain causal.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, t, _) = x.size3().unwrap_or((0, 0, 0));
        let heads = |proj: &nn::Linear, n: i64| proj.forward(x).view([b, t, n, self.head_dim]).transpose(1, 2);
        let q = heads(&self.q_proj, self.num_heads); // (B, nh, T, hd)
        let k = heads(&self.k_proj, self.num_kv_heads); // (B, nkv, T, hd)
        let v = heads(&self.v_proj, self.num_kv_heads);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let gqa = self.num_kv_heads != self.num_heads;
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none(), None, gqa); // (B, nh, T, hd)
        let y = y.transpose(1, 2).contiguous().view([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(&y)
    }
}

/// SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)).
#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(path: nn::Path, c: &Config) -> Self {
        let std = c.initializer_range;
        Self {
            gate_proj: linear(&path / "gate_proj", c.hidden_size, c.intermediate_size, false, std),
            up_proj: linear(&path / "up_proj", c.hidden_size, c.intermediate_size, false, std),
            down_proj: linear(&path / "down_proj", c.intermediate_size, c.hidden_size, false, std),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
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
    fn new(path: nn::Path, c: &Config) -> Self {
        Self {
            input_layernorm: RmsNorm::new(&path / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            self_attn: Attention::new(&path / "self_attn", c),
            post_attention_layernorm: RmsNorm::new(&path / "post_attention_layernorm", c.hidden_size, c.rms_norm_eps),
            mlp: Mlp::new(&path / "mlp", c),
        }
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let x = x + self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask);
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}

/// `LlamaForCausalLM`.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: nn::Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// None when tied to `embed_tokens`.
    lm_head: Option<nn::Linear>,
    cos: Tensor,
    sin: Tensor,
    config: Config,
}

impl Llama {
    /// Builds the model's variables under `root` (`model.*`, `lm_head.*`), freshly
    /// initialised; load a checkpoint into the same VarStore to restore weights.
    pub fn new(root: &nn::Path, config: &Config) -> Self {
        let model = root / "model";
        let embed_config = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: config.initializer_range },
            ..Default::default()
        };
        let embed_tokens = nn::embedding(&model / "embed_tokens", config.vocab_size, config.hidden_size, embed_config);
        let layers = (0..config.num_layers).map(|i| Block::new(&model / "layers" / i, config)).collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| linear(root / "lm_head", config.hidden_size, config.vocab_size, false, config.initializer_range));
        let (cos, sin) = rope_tables(config, root.device());
        Self { embed_tokens, layers, norm, lm_head, cos, sin, config: config.clone() }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// input_ids: (B, T) int64; attention_mask: (B, T) of 1 (token) and 0 (padding), or
    /// None when every position is a token. Returns logits (B, T, vocab).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = input_ids.size2()?;
        if t > self.config.max_positions {
            return Err(Error::Other(format!(
                "sequence of {t} tokens is longer than max_position_embeddings ({})",
                self.config.max_positions
            )));
        }
        let cos = self.cos.narrow(0, 0, t);
        let sin = self.sin.narrow(0, 0, t);
        let mask = attention_mask.map(|m| additive_mask(m, b, t));
        let mut x = self.embed_tokens.forward(input_ids); // (B, T, C)
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, mask.as_ref());
        }
        let x = self.norm.forward(&x);
        Ok(match &self.lm_head {
            Some(head) => head.forward(&x),
            None => x.matmul(&self.embed_tokens.ws.tr()),
        })
    }
}

/// Causal mask combined with a padding mask, additive: (B, 1, T, T).
fn additive_mask(padding: &Tensor, b: i64, t: i64) -> Tensor {
    let device = padding.device();
    let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0); // (T, T)
    let keys = padding.to_kind(Kind::Bool).view([b, 1, 1, t]);
    let allowed = causal.view([1, 1, t, t]).logical_and(&keys);
    // A fully masked row (a padding query) would give NaN; let it see itself.
    let eye = Tensor::eye(t, (Kind::Bool, device)).view([1, 1, t, t]);
    let allowed = allowed.logical_or(&eye);
    Tensor::zeros([b, 1, t, t], (Kind::Float, device)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
}

/// A Llama model with its variables and HF config: the [`Policy`] plugins train.
pub struct LlamaForCausalLm {
    vs: nn::VarStore,
    model: Llama,
    hf: LlamaConfig,
}

impl LlamaForCausalLm {
    /// A freshly initialised model (seed libtorch first for a reproducible init).
    pub fn new(hf: LlamaConfig, device: tch::Device) -> Result<Self> {
        let config = hf.resolve()?;
        let vs = nn::VarStore::new(device);
        let model = Llama::new(&vs.root(), &config);
        Ok(Self { vs, model, hf })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn from_dir(dir: &Path, device: tch::Device) -> Result<Self> {
        let config_file = dir.join("config.json");
        let text = std::fs::read_to_string(&config_file).at(&config_file)?;
        let hf: LlamaConfig =
            serde_json::from_str(&text).map_err(|e| Error::file(&config_file, format!("not a Llama config: {e}")))?;
        let config = hf.resolve().map_err(|e| Error::file(&config_file, e.to_string()))?;
        let mut vs = nn::VarStore::new(device);
        let model = Llama::new(&vs.root(), &config);
        load_safetensors_into(&mut vs, &dir.join("model.safetensors"))?;
        Ok(Self { vs, model, hf })
    }

    pub fn hf_config(&self) -> &LlamaConfig {
        &self.hf
    }

    pub fn config(&self) -> &Config {
        self.model.config()
    }

    pub fn num_parameters(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }
}

impl Policy for LlamaForCausalLm {
    fn logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.model.forward(input_ids, attention_mask)
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        save_safetensors(&dir.join("model.safetensors"), &tensors)?;
        let json = |value: &serde_json::Value, file: &str| -> Result<()> {
            let path = dir.join(file);
            let text = serde_json::to_string_pretty(value).map_err(|e| Error::file(&path, e.to_string()))?;
            write_file_atomically(&path, text.as_bytes())
        };
        json(&self.hf.to_hf_json(), "config.json")?;
        let mut generation = serde_json::json!({ "_from_model_config": true });
        for (key, id) in [
            ("bos_token_id", self.hf.bos_token_id),
            ("eos_token_id", self.hf.eos_token_id),
            ("pad_token_id", self.hf.pad_token_id),
        ] {
            if let Some(id) = id {
                generation[key] = serde_json::json!(id);
            }
        }
        json(&generation, "generation_config.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let loaded = LlamaForCausalLm::from_dir(dir.path(), tch::Device::Cpu).unwrap();
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
        let message = LlamaForCausalLm::from_dir(dir.path(), tch::Device::Cpu).err().unwrap().to_string();
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
        let message = LlamaForCausalLm::from_dir(dir.path(), tch::Device::Cpu).err().unwrap().to_string();
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
        assert!(c.resolve().err().unwrap().to_string().starts_with("rope_scaling: "));
        c = tiny(false, 2);
        c.model_type = "gpt2".into();
        assert_eq!(
            c.resolve().err().unwrap().to_string(),
            "model_type: unsupported model_type `gpt2`; this family is `llama`"
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
        assert!(c[0].stopped && c[0].tokens.is_empty());
    }
}

//! `pretrain.causal_lm`: next-token prediction with a Llama-style decoder
//! (`LlamaForCausalLM` in HF layout), from scratch or from an input model of the Llama
//! family. Rows of `seq_len + 1` tokens hold the inputs and, shifted by one, the targets;
//! at each evaluation the `eval.sample_prompts` are continued greedily.
use std::path::Path;

use plumb_core::data::SeededRng;
use plumb_core::model::llama::{LlamaConfig, LlamaForCausalLm};
use plumb_core::model::{GenerationSettings, HeadChunks, Policy};
use plumb_core::tch::{nn, Device, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{nested, summed_token_loss};
use plumb_core::{Error, Result};
use serde::Deserialize;

use crate::corpus::eos_of;
use crate::stage::{Objective, Pretraining, SpecialTokens};

/// The stage.
pub type CausalLm = Pretraining<CausalLmObjective>;

/// A Llama-style architecture; the vocabulary size comes from the tokenizer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads per attention layer.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); default: num_attention_heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Base of the rotary position embedding's frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Added to the mean square in RMSNorm, for numerical stability.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Share the input embedding with the output projection.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Default: the sequence length.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

/// Causal LM has no settings of its own (`objective:` stays empty).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NextToken {}

pub struct CausalLmObjective {
    eos: i64,
}

impl Objective for CausalLmObjective {
    const NAME: &'static str = "causal_lm";
    const DESCRIPTION: &'static str = "Causal language modelling (next-token prediction) on a text corpus";
    type Model = LlamaForCausalLm;
    type Architecture = ModelConfig;
    type Settings = NextToken;

    fn validate(_: &NextToken, model: Option<&ModelConfig>, seq_len: usize) -> Result<()> {
        if let Some(m) = model {
            let positions = m.max_position_embeddings.unwrap_or(seq_len);
            if positions < seq_len {
                return Err(Error::config("model.max_position_embeddings", "expected at least data.seq_len"));
            }
            llama_config(m, 0, seq_len).resolve().map_err(|e| nested("model", e))?;
        }
        Ok(())
    }

    fn special_tokens(_: &NextToken, _: usize) -> Result<SpecialTokens> {
        Ok((Vec::new(), Vec::new()))
    }

    fn row_length(_: &NextToken, seq_len: usize) -> Result<usize> {
        Ok(seq_len + 1)
    }

    fn new_model(m: &ModelConfig, tokenizer: &Tokenizer, seq_len: usize, device: Device) -> Result<LlamaForCausalLm> {
        let mut hf = llama_config(m, tokenizer.vocab_size(), seq_len);
        hf.eos_token_id = tokenizer.eos_id().map(Into::into);
        hf.bos_token_id = tokenizer.eos_id().map(Into::into);
        LlamaForCausalLm::new(hf, device)
    }

    fn load_model(dir: &Path, device: Device) -> Result<LlamaForCausalLm> {
        LlamaForCausalLm::from_dir(dir, device, Kind::Float)
    }

    fn var_store(model: &LlamaForCausalLm) -> &nn::VarStore {
        model.var_store()
    }

    fn new(_: &NextToken, tokenizer: &Tokenizer, _: &LlamaForCausalLm) -> Result<Self> {
        Ok(Self { eos: eos_of(tokenizer)? })
    }

    fn loss(
        &self,
        model: &LlamaForCausalLm,
        rows: &[Vec<i64>],
        _: &mut SeededRng,
        device: Device,
    ) -> Result<(Tensor, usize)> {
        let width = rows[0].len() as i64;
        let data = Tensor::from_slice(&rows.concat()).view([-1, width]).to_device(device);
        let (inputs, targets) = (data.narrow(1, 0, width - 1), data.narrow(1, 1, width - 1));
        // The LM head and its cross-entropy run a chunk of positions at a time.
        let sum = summed_token_loss(model, &inputs, None, None, &targets, HeadChunks::Auto)?;
        Ok((sum, targets.numel()))
    }

    fn samples(
        &self,
        model: &LlamaForCausalLm,
        tokenizer: &Tokenizer,
        prompts: &[String],
        tokens: usize,
    ) -> Result<Option<String>> {
        // A prompt keeps its end, with room for at least one new token in the context.
        let keep = model.context_length().map_or(usize::MAX, |c| (c.max(2) - 1) as usize);
        let mut ids = prompts.iter().map(|p| tokenizer.encode(p)).collect::<Result<Vec<_>>>()?;
        for prompt in &mut ids {
            prompt.drain(..prompt.len().saturating_sub(keep));
        }
        let settings = GenerationSettings {
            max_new_tokens: tokens,
            temperature: 0.0,
            stop_tokens: vec![self.eos],
            ..Default::default()
        };
        let generated = model.generate(&ids, &settings)?;
        let mut text = String::new();
        for (prompt, out) in prompts.iter().zip(generated) {
            text.push_str(&format!("**{prompt}**{}\n\n", tokenizer.decode(&out.tokens)?));
        }
        Ok(Some(text))
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// The HF config of a fresh model.
fn llama_config(m: &ModelConfig, vocab_size: usize, seq_len: usize) -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        vocab_size: vocab_size.max(1),
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        num_key_value_heads: m.num_key_value_heads,
        head_dim: None,
        max_position_embeddings: m.max_position_embeddings.unwrap_or(seq_len),
        rms_norm_eps: m.rms_norm_eps,
        rope_theta: Some(m.rope_theta),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: m.tie_word_embeddings,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        sliding_window: None,
        use_sliding_window: None,
        max_window_layers: None,
        layer_types: None,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

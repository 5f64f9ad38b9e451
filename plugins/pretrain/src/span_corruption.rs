//! `pretrain.span_corruption`: T5's objective on an encoder-decoder
//! (`T5ForConditionalGeneration` in HF layout). Of each raw row, 15% of the tokens, in spans
//! of 3 on average, are replaced in the encoder's input by sentinels (`<extra_id_0>`, ...);
//! the decoder learns to write each sentinel followed by the tokens it replaced.
use std::path::Path;

use plumb_core::data::objectives::{corrupt_spans, raw_length_for_inputs, Sentinels, SpanConfig};
use plumb_core::data::SeededRng;
use plumb_core::model::t5::{T5Config, T5ForConditionalGeneration};
use plumb_core::tch::{nn, Device, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{nested, summed_cross_entropy};
use plumb_core::{Error, Result};
use serde::Deserialize;

use crate::stage::{Objective, Pretraining, SpecialTokens};

/// The stage.
pub type SpanCorruption = Pretraining<SpanCorruptionObjective>;

/// A T5 encoder-decoder; the vocabulary comes from the tokenizer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct T5Architecture {
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads per layer.
    pub num_heads: usize,
    /// Default: d_model / num_heads.
    #[serde(default)]
    pub d_kv: Option<usize>,
    /// Default: num_layers.
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    /// `relu` (T5) or `gated-gelu` (T5 v1.1).
    #[serde(default = "default_feed_forward_proj")]
    pub feed_forward_proj: String,
}

fn default_feed_forward_proj() -> String {
    "gated-gelu".into()
}

impl T5Architecture {
    fn hf(&self, vocab_size: usize, pad: i64, eos: Option<i64>) -> Result<T5Config> {
        serde_json::from_value(serde_json::json!({
            "model_type": "t5", "vocab_size": vocab_size.max(1), "d_model": self.d_model,
            "d_kv": self.d_kv.unwrap_or(self.d_model / self.num_heads.max(1)), "d_ff": self.d_ff,
            "num_layers": self.num_layers, "num_decoder_layers": self.num_decoder_layers.unwrap_or(self.num_layers),
            "num_heads": self.num_heads, "feed_forward_proj": self.feed_forward_proj,
            "tie_word_embeddings": false, "pad_token_id": pad, "decoder_start_token_id": pad, "eos_token_id": eos,
        }))
        .map_err(|e| Error::config("model", e.to_string()))
    }
}

pub struct SpanCorruptionObjective {
    settings: SpanConfig,
    sentinels: Sentinels,
}

const PAD: &str = "<pad>";

fn sentinel(i: usize) -> String {
    format!("<extra_id_{i}>")
}

/// Sentinels a fresh tokenizer gets: as many as a row can have spans, and T5's 100 at least.
fn sentinel_count(settings: &SpanConfig, seq_len: usize) -> Result<usize> {
    Ok(raw_length_for_inputs(seq_len, settings, true)?.noise_spans.max(100))
}

impl Objective for SpanCorruptionObjective {
    const NAME: &'static str = "span_corruption";
    const DESCRIPTION: &'static str =
        "T5 span corruption (15% noise in spans of mean length 3, sentinel tokens) on an encoder-decoder";
    type Model = T5ForConditionalGeneration;
    type Architecture = T5Architecture;
    type Settings = SpanConfig;

    fn validate(settings: &SpanConfig, model: Option<&T5Architecture>, seq_len: usize) -> Result<()> {
        settings.validate().map_err(|e| nested("objective", e))?;
        raw_length_for_inputs(seq_len, settings, true).map_err(|e| Error::config("data.seq_len", e.to_string()))?;
        if let Some(m) = model {
            m.hf(300, 0, Some(1))?.resolve().map_err(|e| nested("model", e))?;
        }
        Ok(())
    }

    fn special_tokens(settings: &SpanConfig, seq_len: usize) -> Result<SpecialTokens> {
        let count = sentinel_count(settings, seq_len)?;
        Ok((vec![("pad_token", PAD.into())], (0..count).map(sentinel).collect()))
    }

    fn row_length(settings: &SpanConfig, seq_len: usize) -> Result<usize> {
        Ok(raw_length_for_inputs(seq_len, settings, true)?.raw)
    }

    fn new_model(
        m: &T5Architecture,
        tokenizer: &Tokenizer,
        _: usize,
        device: Device,
    ) -> Result<T5ForConditionalGeneration> {
        let pad = tokenizer.token_id(PAD).ok_or_else(|| Error::Other(format!("the tokenizer has no {PAD}")))?;
        T5ForConditionalGeneration::new(m.hf(tokenizer.vocab_size(), pad, tokenizer.eos_id())?, device)
    }

    fn load_model(dir: &Path, device: Device) -> Result<T5ForConditionalGeneration> {
        T5ForConditionalGeneration::from_dir(dir, device, Kind::Float)
    }

    fn var_store(model: &T5ForConditionalGeneration) -> &nn::VarStore {
        model.var_store()
    }

    fn new(settings: &SpanConfig, tokenizer: &Tokenizer, _: &T5ForConditionalGeneration) -> Result<Self> {
        let ids: Vec<i64> = (0..).map_while(|i| tokenizer.token_id(&sentinel(i))).collect();
        if ids.is_empty() {
            return Err(Error::Other(
                "span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the tokenizer".into(),
            ));
        }
        Ok(Self { settings: settings.clone(), sentinels: Sentinels { ids, eos: tokenizer.eos_id() } })
    }

    fn loss(
        &self,
        model: &T5ForConditionalGeneration,
        rows: &[Vec<i64>],
        rng: &mut SeededRng,
        device: Device,
    ) -> Result<(Tensor, usize)> {
        let examples = rows
            .iter()
            .map(|row| corrupt_spans(row, &self.settings, &self.sentinels, rng))
            .collect::<Result<Vec<_>>>()?;
        // Rows of one raw length corrupt to inputs and targets of one length each.
        let stack = |part: fn(&plumb_core::data::objectives::SpanExample) -> &Vec<i64>| {
            let width = part(&examples[0]).len() as i64;
            Tensor::from_slice(&examples.iter().flat_map(|e| part(e).iter().copied()).collect::<Vec<_>>())
                .view([-1, width])
                .to_device(device)
        };
        let inputs = stack(|e| &e.inputs);
        let targets = stack(|e| &e.targets);
        let logits = model.forward(&inputs, None, &model.shift_right(&targets)?, None)?;
        let sum = summed_cross_entropy(&logits, &targets);
        Ok((sum, targets.numel()))
    }
}

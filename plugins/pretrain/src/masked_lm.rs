//! `pretrain.masked_lm`: BERT's masked language modelling on a bidirectional encoder
//! (`BertForMaskedLM` in HF layout). Of each row, 15% of the tokens are selected (EOS, PAD
//! and MASK never are); 80% of those become `[MASK]`, 10% a random token, 10% stay; the loss
//! is the cross-entropy of the selected tokens' originals.
use std::path::Path;

use plumb_core::data::objectives::{mlm_batch, MlmConfig, SpecialIds, IGNORE_INDEX};
use plumb_core::data::SeededRng;
use plumb_core::model::bert::{BertConfig, BertForMaskedLm};
use plumb_core::tch::{nn, Device, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{nested, summed_cross_entropy};
use plumb_core::{Error, Result};
use serde::Deserialize;

use crate::stage::{Objective, Pretraining, SpecialTokens};

/// The stage.
pub type MaskedLm = Pretraining<MaskedLmObjective>;

/// A BERT encoder; the vocabulary comes from the tokenizer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BertArchitecture {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Default: the sequence length.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

impl BertArchitecture {
    fn hf(&self, vocab_size: usize, seq_len: usize, pad: Option<i64>) -> Result<BertConfig> {
        serde_json::from_value(serde_json::json!({
            "model_type": "bert", "vocab_size": vocab_size.max(1), "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings.unwrap_or(seq_len), "pad_token_id": pad,
        }))
        .map_err(|e| Error::config("model", e.to_string()))
    }
}

pub struct MaskedLmObjective {
    settings: MlmConfig,
    special: SpecialIds,
}

const MASK: &str = "[MASK]";
const PAD: &str = "[PAD]";

impl Objective for MaskedLmObjective {
    const NAME: &'static str = "masked_lm";
    const DESCRIPTION: &'static str =
        "Masked language modelling (BERT: 15% selected; 80% masked, 10% random, 10% kept) on a bidirectional encoder";
    type Model = BertForMaskedLm;
    type Architecture = BertArchitecture;
    type Settings = MlmConfig;

    fn validate(settings: &MlmConfig, model: Option<&BertArchitecture>, seq_len: usize) -> Result<()> {
        settings.validate().map_err(|e| nested("objective", e))?;
        if let Some(m) = model {
            if m.max_position_embeddings.is_some_and(|p| p < seq_len) {
                return Err(Error::config("model.max_position_embeddings", "expected at least data.seq_len"));
            }
            m.hf(300, seq_len, Some(0))?.resolve().map_err(|e| nested("model", e))?;
        }
        Ok(())
    }

    fn special_tokens(_: &MlmConfig, _: usize) -> Result<SpecialTokens> {
        Ok((vec![("mask_token", MASK.into()), ("pad_token", PAD.into())], Vec::new()))
    }

    fn row_length(_: &MlmConfig, seq_len: usize) -> Result<usize> {
        Ok(seq_len)
    }

    fn new_model(
        m: &BertArchitecture,
        tokenizer: &Tokenizer,
        seq_len: usize,
        device: Device,
    ) -> Result<BertForMaskedLm> {
        BertForMaskedLm::new(m.hf(tokenizer.vocab_size(), seq_len, tokenizer.token_id(PAD))?, device)
    }

    fn load_model(dir: &Path, device: Device) -> Result<BertForMaskedLm> {
        BertForMaskedLm::from_dir(dir, device, Kind::Float)
    }

    fn var_store(model: &BertForMaskedLm) -> &nn::VarStore {
        model.var_store()
    }

    fn new(settings: &MlmConfig, tokenizer: &Tokenizer, model: &BertForMaskedLm) -> Result<Self> {
        let mask = tokenizer.special_token("mask_token").and_then(|t| tokenizer.token_id(t)).ok_or_else(|| {
            Error::Other("masked LM needs a mask token (`mask_token` in tokenizer_config.json)".into())
        })?;
        let never_mask: Vec<i64> =
            [tokenizer.eos_id(), tokenizer.pad_id(), Some(mask), tokenizer.bos_id()].into_iter().flatten().collect();
        let special = SpecialIds { mask_id: mask, vocab_size: model.vocab_size() as usize, never_mask };
        Ok(Self { settings: settings.clone(), special })
    }

    fn loss(
        &self,
        model: &BertForMaskedLm,
        rows: &[Vec<i64>],
        rng: &mut SeededRng,
        device: Device,
    ) -> Result<(Tensor, usize)> {
        let (inputs, labels) = mlm_batch(rows, &self.settings, &self.special, rng, device)?;
        let selected = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]) as usize;
        let logits = model.forward(&inputs, None)?;
        let sum = summed_cross_entropy(&logits, &labels);
        Ok((sum, selected))
    }
}

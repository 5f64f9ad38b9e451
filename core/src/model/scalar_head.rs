//! A transformer with a scalar head: the reward model of RLHF and the value model of
//! PPO, on the backbone of any causal-LM family of [`super::FAMILIES`]. Saved as `transformers` saves
//! `*ForSequenceClassification` with `num_labels = 1` (the backbone's weights plus
//! `score.weight`, no bias), so `AutoModelForSequenceClassification` loads it; like there,
//! a sequence's score is the head's output at its last token.
use std::path::Path;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::cache::positions_from_mask;
use super::family::var_store;
use super::{Backbone, SaveHf};
use crate::checkpoint;
use crate::error::{Error, Result};

/// A transformer of any family in [`super::FAMILIES`] with a `backbone` entry (the
/// causal LMs), and a linear head to one value per position.
pub struct ScalarHeadModel {
    vs: nn::VarStore,
    backbone: Box<dyn Backbone>,
    score: nn::Linear,
    /// Rows of the token embedding (`vocab_size` of `config.json`), to check a tokenizer against.
    vocab_size: usize,
}

/// `vocab_size` of `dir/config.json`, which every family names so.
fn vocab_size(dir: &Path) -> Result<usize> {
    let file = super::lora::chain(dir)?.0.join("config.json");
    let json: serde_json::Value = checkpoint::read_json(&file)?;
    json.get("vocab_size")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| Error::file(&file, "vocab_size: expected a positive integer"))
}

/// The backbone of the model in `dir` for its `model_type`, built uninitialised in `vs`.
fn backbone(dir: &Path, vs: &nn::VarStore) -> Result<Box<dyn Backbone>> {
    let build = super::dispatch(dir, "scalar head", |f| f.backbone)?;
    build(dir, vs)
}

/// The score head, `score.weight` (1, hidden), no bias; normal with std `std` when fresh.
fn head(vs: &nn::VarStore, hidden: i64, std: f64, fresh: bool) -> nn::Linear {
    let init = nn::Init::Randn { mean: 0.0, stdev: std };
    let config = nn::LinearConfig { ws_init: init, bs_init: None, bias: false };
    let vars = if fresh { super::vars::Vars::fresh(vs.root()) } else { super::vars::Vars::uninit(vs.root()) };
    (&vars / "score").linear(hidden, 1, config)
}

impl ScalarHeadModel {
    /// The transformer of the causal LM in `dir` with a fresh head (normal, std
    /// `initializer_range`, drawn in `kind`), as reward-model training starts; seed
    /// libtorch first.
    pub fn from_causal_lm(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let vs = var_store(device, kind);
        let backbone = backbone(dir, &vs)?;
        backbone.load(&vs)?;
        let score = head(&vs, backbone.hidden_size(), backbone.initializer_range(), true);
        Ok(Self { vs, backbone, score, vocab_size: vocab_size(dir)? })
    }

    /// A saved scalar-head model (this type's own `save`, or transformers').
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config_file = dir.join("config.json");
        let json: serde_json::Value = checkpoint::read_json(&config_file)?;
        match json
            .get("num_labels")
            .and_then(|v| v.as_u64())
            .or_else(|| json.get("id2label").and_then(|m| m.as_object()).map(|m| m.len() as u64))
        {
            Some(1) => {}
            other => {
                return Err(Error::file(
                    &config_file,
                    format!(
                        "num_labels: a scalar head needs exactly 1 label, found {}",
                        other.map_or("none".into(), |n| n.to_string())
                    ),
                ))
            }
        }
        let vs = var_store(device, kind);
        let backbone = backbone(dir, &vs)?;
        let score = head(&vs, backbone.hidden_size(), backbone.initializer_range(), false);
        backbone.load(&vs)?;
        Ok(Self { vs, backbone, score, vocab_size: vocab_size(dir)? })
    }

    /// Rows of the token embedding: token ids must stay below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The head's output at every position: (B, T). `attention_mask` (B, T): 1 token, 0 padding.
    pub fn values(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let positions = positions_from_mask(attention_mask);
        let hidden = self.backbone.hidden_states(input_ids, &positions, attention_mask)?; // (B, T, C)
        Ok(self.score.forward(&hidden).squeeze_dim(-1).to_kind(Kind::Float))
    }

    /// One score per sequence: the head's output at its last token (B).
    pub fn scores(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let values = self.values(input_ids, attention_mask)?;
        let t = values.size()[1];
        let index = Tensor::arange(t, (Kind::Int64, values.device())).unsqueeze(0);
        let last = (index * attention_mask.to_kind(Kind::Int64)).argmax(-1, true); // (B, 1)
        Ok(values.gather(1, &last, false).squeeze_dim(1))
    }

    /// True when `dir/config.json` is a sequence-classification model's (its
    /// `architectures` end in `ForSequenceClassification`): a saved scalar-head model to
    /// continue, rather than a causal LM to put a fresh head on.
    pub fn is_saved_in(dir: &Path) -> Result<bool> {
        if super::lora::is_adapter(dir) {
            return Ok(false); // an adapter of a causal LM (PEFT layout)
        }
        let json: serde_json::Value = checkpoint::read_json(&dir.join("config.json"))?;
        let architectures = json.get("architectures").and_then(|a| a.as_array());
        Ok(architectures
            .is_some_and(|a| a.iter().any(|n| n.as_str().is_some_and(|n| n.ends_with("ForSequenceClassification")))))
    }

    /// The `pad_token_id` of a saved model's `config.json`, the id transformers finds each
    /// sequence's end by.
    pub fn pad_token_id_in(dir: &Path) -> Result<Option<i64>> {
        let json: serde_json::Value = checkpoint::read_json(&dir.join("config.json"))?;
        Ok(json.get("pad_token_id").and_then(|v| v.as_i64()))
    }

    /// This model as [`SaveHf`], saved with `pad_token_id` (see [`Self::save`]), for the
    /// trainer's checkpoints and final save.
    pub fn with_pad(&self, pad_token_id: i64) -> WithPad<'_> {
        WithPad { model: self, pad_token_id }
    }

    /// Writes weights and a `config.json` that transformers reads as
    /// `*ForSequenceClassification` with one label. `pad_token_id` lets transformers
    /// find each sequence's last token in a padded batch.
    pub fn save(&self, dir: &Path, pad_token_id: i64) -> Result<()> {
        checkpoint::save_weights(&self.vs, dir, checkpoint::DEFAULT_SHARD_BYTES)?;
        let pad = serde_json::json!(pad_token_id);
        let (mut config, ids) = self.backbone.sequence_classification_config();
        let id = |key: &str| ids.iter().find(|(k, _)| *k == key).and_then(|(_, id)| id.clone());
        let (bos, eos) = (id("bos_token_id"), id("eos_token_id"));
        config["num_labels"] = serde_json::json!(1);
        config["id2label"] = serde_json::json!({"0": "LABEL_0"});
        config["label2id"] = serde_json::json!({"LABEL_0": 0});
        config["pad_token_id"] = pad.clone();
        let ids = [("bos_token_id", bos.as_ref()), ("eos_token_id", eos.as_ref()), ("pad_token_id", Some(&pad))];
        checkpoint::write_model_configs(dir, config, self.vs.kind(), ids)
    }
}

/// A [`ScalarHeadModel`] and the pad id its saved config names (see [`ScalarHeadModel::with_pad`]).
pub struct WithPad<'a> {
    pub model: &'a ScalarHeadModel,
    pub pad_token_id: i64,
}

impl SaveHf for WithPad<'_> {
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, self.pad_token_id)
    }
}

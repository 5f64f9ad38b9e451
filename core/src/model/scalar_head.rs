//! A transformer with a scalar head: the reward model of RLHF and the value model of
//! PPO. Saved as `transformers` saves `*ForSequenceClassification` with `num_labels = 1`
//! (`model.*` plus `score.weight`, no bias), so `AutoModelForSequenceClassification`
//! loads it; like there, a sequence's score is the head's output at its last token.
use std::path::Path;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::cache::positions_from_mask;
use super::llama::{Llama, LlamaConfig};
use crate::checkpoint;
use crate::error::{Error, Result};

pub struct ScalarHeadModel {
    vs: nn::VarStore,
    model: Llama,
    score: nn::Linear,
    hf: LlamaConfig,
}

impl ScalarHeadModel {
    /// The decoder of the causal LM in `dir` with a fresh head (normal, std
    /// `initializer_range`), as reward-model training starts; seed libtorch first.
    pub fn from_causal_lm(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (mut vs, model, hf) = Self::backbone(dir, device)?;
        vs.set_kind(kind);
        checkpoint::load_weights(&mut vs, dir)?;
        let std = model.config().initializer_range;
        let score = Self::head(&vs, model.config().hidden_size, std);
        vs.set_kind(kind);
        Ok(Self { vs, model, score, hf })
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
        let (mut vs, model, hf) = Self::backbone(dir, device)?;
        let score = Self::head(&vs, model.config().hidden_size, model.config().initializer_range);
        vs.set_kind(kind);
        checkpoint::load_weights(&mut vs, dir)?;
        Ok(Self { vs, model, score, hf })
    }

    fn backbone(dir: &Path, device: Device) -> Result<(nn::VarStore, Llama, LlamaConfig)> {
        let config_file = dir.join("config.json");
        let hf: LlamaConfig = checkpoint::read_json(&config_file)?;
        let config = hf.resolve().map_err(|e| Error::file(&config_file, e.to_string()))?;
        let vs = nn::VarStore::new(device);
        let model = Llama::backbone(&vs.root(), &config);
        Ok((vs, model, hf))
    }

    fn head(vs: &nn::VarStore, hidden: i64, std: f64) -> nn::Linear {
        let config =
            nn::LinearConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: std }, bs_init: None, bias: false };
        nn::linear(vs.root() / "score", hidden, 1, config)
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The head's output at every position: (B, T). `attention_mask` (B, T): 1 token, 0 padding.
    pub fn values(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let positions = positions_from_mask(attention_mask);
        let hidden = self.model.hidden_states(input_ids, &positions, Some(attention_mask), None)?;
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

    /// Writes weights and a `config.json` that transformers reads as
    /// `*ForSequenceClassification` with one label. `pad_token_id` lets transformers
    /// find each sequence's last token in a padded batch.
    pub fn save(&self, dir: &Path, pad_token_id: i64) -> Result<()> {
        checkpoint::save_weights(&self.vs, dir, checkpoint::DEFAULT_SHARD_BYTES)?;
        let mut config = self.hf.to_hf_json();
        let architecture = match self.hf.model_type.as_str() {
            "qwen2" => "Qwen2ForSequenceClassification",
            "mistral" => "MistralForSequenceClassification",
            _ => "LlamaForSequenceClassification",
        };
        config["architectures"] = serde_json::json!([architecture]);
        config["num_labels"] = serde_json::json!(1);
        config["id2label"] = serde_json::json!({"0": "LABEL_0"});
        config["label2id"] = serde_json::json!({"LABEL_0": 0});
        config["pad_token_id"] = serde_json::json!(pad_token_id);
        let pad = serde_json::json!(pad_token_id);
        let ids = [
            ("bos_token_id", self.hf.bos_token_id.as_ref()),
            ("eos_token_id", self.hf.eos_token_id.as_ref()),
            ("pad_token_id", Some(&pad)),
        ];
        checkpoint::write_model_configs(dir, config, self.vs.kind(), ids)
    }
}

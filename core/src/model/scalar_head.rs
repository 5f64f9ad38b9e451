//! A transformer with a scalar head: the reward model of RLHF and the value model of
//! PPO, on a Llama-family or GPT-2 backbone. Saved as `transformers` saves
//! `*ForSequenceClassification` with `num_labels = 1` (the backbone's weights plus
//! `score.weight`, no bias), so `AutoModelForSequenceClassification` loads it; like there,
//! a sequence's score is the head's output at its last token.
use std::path::Path;

use serde_json::Value;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::cache::positions_from_mask;
use super::gpt2::{self, Gpt2, Gpt2Config, KeyLayout};
use super::llama::{self, Llama, LlamaConfig};
use crate::checkpoint;
use crate::error::{Error, Result};

/// The transformer under the head, with its HF config.
enum Backbone {
    Llama(Llama, LlamaConfig),
    Gpt2(Gpt2, Gpt2Config),
}

impl Backbone {
    /// The backbone of the model in `dir` (its `config.json`), without an LM head, and
    /// the hidden size and init std of a head on it; weights are loaded by the caller.
    fn build(dir: &Path, device: Device) -> Result<(nn::VarStore, Self, (i64, f64))> {
        let config_file = dir.join("config.json");
        let json: Value = checkpoint::read_json(&config_file)?;
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let vs = nn::VarStore::new(device);
        let at = |e: Error| Error::file(&config_file, e.to_string());
        let parse = |e: serde_json::Error| Error::file(&config_file, e.to_string());
        let (backbone, hidden, std) = if llama::MODEL_TYPES.contains(&model_type) {
            let hf: LlamaConfig = serde_json::from_value(json).map_err(parse)?;
            let config = hf.resolve().map_err(at)?;
            (Self::Llama(Llama::backbone(&vs.root(), &config), hf), config.hidden_size, config.initializer_range)
        } else if model_type == gpt2::MODEL_TYPE {
            let hf: Gpt2Config = serde_json::from_value(json).map_err(parse)?;
            let mut config = hf.resolve().map_err(at)?;
            config.tie_word_embeddings = true; // no LM head under a score head
            (Self::Gpt2(Gpt2::new(&vs.root(), &config), hf), config.hidden_size, config.initializer_range)
        } else {
            return Err(Error::file(
                &config_file,
                format!(
                    "model_type: a scalar head goes on {} or {}, not `{model_type}`",
                    llama::MODEL_TYPES.join(", "),
                    gpt2::MODEL_TYPE
                ),
            ));
        };
        Ok((vs, backbone, (hidden, std)))
    }

    /// The score head, `score.weight` (1, hidden), normal with std `std`.
    fn head(vs: &nn::VarStore, (hidden, std): (i64, f64)) -> nn::Linear {
        let init = nn::Init::Randn { mean: 0.0, stdev: std };
        nn::linear(vs.root() / "score", hidden, 1, nn::LinearConfig { ws_init: init, bs_init: None, bias: false })
    }

    fn load(&self, vs: &mut nn::VarStore, dir: &Path) -> Result<()> {
        match self {
            Self::Llama(..) => checkpoint::load_weights(vs, dir),
            Self::Gpt2(..) => gpt2::load_weights(vs, dir, KeyLayout::detect(dir)?),
        }
    }

    fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(model, _) => model.hidden_states(input_ids, positions, Some(mask), None),
            Self::Gpt2(model, _) => model.hidden_states(input_ids, positions, Some(mask), None),
        }
    }
}

pub struct ScalarHeadModel {
    vs: nn::VarStore,
    backbone: Backbone,
    score: nn::Linear,
}

impl ScalarHeadModel {
    /// The transformer of the causal LM in `dir` with a fresh head (normal, std
    /// `initializer_range`), as reward-model training starts; seed libtorch first.
    pub fn from_causal_lm(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (mut vs, backbone, head) = Backbone::build(dir, device)?;
        vs.set_kind(kind);
        backbone.load(&mut vs, dir)?;
        let score = Backbone::head(&vs, head);
        vs.set_kind(kind);
        Ok(Self { vs, backbone, score })
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
        let (mut vs, backbone, head) = Backbone::build(dir, device)?;
        let score = Backbone::head(&vs, head);
        vs.set_kind(kind);
        backbone.load(&mut vs, dir)?;
        Ok(Self { vs, backbone, score })
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The head's output at every position: (B, T). `attention_mask` (B, T): 1 token, 0 padding.
    pub fn values(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let positions = positions_from_mask(attention_mask);
        let hidden = self.backbone.hidden_states(input_ids, &positions, attention_mask)?;
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
        let pad = serde_json::json!(pad_token_id);
        let (mut config, architecture, bos, eos) = match &self.backbone {
            Backbone::Llama(_, hf) => {
                let architecture = match hf.model_type.as_str() {
                    "qwen2" => "Qwen2ForSequenceClassification",
                    "mistral" => "MistralForSequenceClassification",
                    _ => "LlamaForSequenceClassification",
                };
                (hf.to_hf_json(), architecture, hf.bos_token_id.clone(), hf.eos_token_id.clone())
            }
            Backbone::Gpt2(_, hf) => (
                hf.to_hf_json(),
                "GPT2ForSequenceClassification",
                Some(hf.bos_token_id.clone()),
                Some(hf.eos_token_id.clone()),
            ),
        };
        config["architectures"] = serde_json::json!([architecture]);
        config["num_labels"] = serde_json::json!(1);
        config["id2label"] = serde_json::json!({"0": "LABEL_0"});
        config["label2id"] = serde_json::json!({"LABEL_0": 0});
        config["pad_token_id"] = pad.clone();
        let ids = [("bos_token_id", bos.as_ref()), ("eos_token_id", eos.as_ref()), ("pad_token_id", Some(&pad))];
        checkpoint::write_model_configs(dir, config, self.vs.kind(), ids)
    }
}

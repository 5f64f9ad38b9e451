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
use super::lora::{Adapters, Builder, LoraConfig, Request};
use super::{Backbone, SaveHf};
use crate::checkpoint;
use crate::error::{Error, Result};

/// A transformer of any family in [`super::FAMILIES`] with a `backbone` entry (the
/// causal LMs), and a linear head to one value per position.
pub struct ScalarHeadModel {
    vs: nn::VarStore,
    backbone: Box<dyn Backbone>,
    score: nn::Linear,
    /// LoRA adapters on the backbone, with the head (trained whole); `vs` is then frozen.
    lora: Option<Adapters>,
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
fn backbone(dir: &Path, vs: &nn::VarStore, lora: Option<&Builder>) -> Result<Box<dyn Backbone>> {
    let build = super::dispatch(dir, "scalar head", |f| f.backbone)?;
    build(dir, vs, lora)
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
        let backbone = backbone(dir, &vs, None)?;
        backbone.load(&vs)?;
        let score = head(&vs, backbone.hidden_size(), backbone.initializer_range(), true);
        Ok(Self { vs, backbone, score, lora: None, vocab_size: vocab_size(dir)? })
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
        let backbone = backbone(dir, &vs, None)?;
        let score = head(&vs, backbone.hidden_size(), backbone.initializer_range(), false);
        backbone.load(&vs)?;
        Ok(Self { vs, backbone, score, lora: None, vocab_size: vocab_size(dir)? })
    }

    /// The model a reward-model stage trains: from the input model `input` (a causal LM
    /// gets a fresh head; a saved reward model keeps its own), or from the checkpoint
    /// `resume`. With a `lora` block, the backbone is frozen and gets LoRA adapters, and
    /// the head trains whole beside them (PEFT's `modules_to_save`): fresh adapters, or
    /// the adapters and head the checkpoint holds. Seed libtorch first.
    pub fn for_training(
        input: &Path,
        resume: Option<&Path>,
        device: Device,
        kind: Kind,
        lora: Option<&LoraConfig>,
        seed: u64,
    ) -> Result<Self> {
        let Some(config) = lora else {
            return match resume {
                Some(dir) => Self::from_dir(dir, device, kind),
                None if Self::is_saved_in(input)? => Self::from_dir(input, device, kind),
                None => Self::from_causal_lm(input, device, kind),
            };
        };
        let request = match resume {
            Some(dir) => Request::Saved { dir, trainable: true },
            None => Request::New { config, seed },
        };
        let builder = Builder::new(&request, device)?;
        let mut vs = var_store(device, kind);
        let backbone = backbone(input, &vs, Some(&builder))?;
        backbone.load(&vs)?;
        let (hidden, std) = (backbone.hidden_size(), backbone.initializer_range());
        let init = nn::Init::Randn { mean: 0.0, stdev: std };
        let config = nn::LinearConfig { ws_init: init, bs_init: None, bias: false };
        let score = builder.whole_module_linear("score", hidden, 1, config);
        if resume.is_none() && Self::is_saved_in(input)? {
            // A saved reward model keeps its head.
            let saved = Self::from_dir(input, Device::Cpu, Kind::Float)?;
            let _no_grad = tch::no_grad_guard();
            let mut head = score.ws.shallow_clone();
            head.f_copy_(&saved.score.ws)?;
        }
        vs.freeze();
        let adapters = builder.finish(&request, input, "backbone")?;
        Ok(Self { vs, backbone, score, lora: Some(adapters), vocab_size: vocab_size(input)? })
    }

    /// The LoRA adapters, when the model was built with them.
    pub fn lora(&self) -> Option<&Adapters> {
        self.lora.as_ref()
    }

    /// The variables a stage trains: the adapters and the head with LoRA, else all.
    pub fn trainable(&self) -> &nn::VarStore {
        self.lora.as_ref().map_or(&self.vs, |l| l.var_store())
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
        self.values_from(input_ids, attention_mask, 0)
    }

    /// The head's output at positions `from..`: (B, T − from), as [`Self::values`]
    /// narrowed, without the work only earlier positions' outputs need.
    pub fn values_from(&self, input_ids: &Tensor, attention_mask: &Tensor, from: i64) -> Result<Tensor> {
        let positions = positions_from_mask(attention_mask);
        let hidden = self.backbone.hidden_states(input_ids, &positions, attention_mask, from)?; // (B, T − from, C)
        let hidden = hidden.to_kind(self.score.ws.kind()); // a LoRA model's head is fp32
        Ok(self.score.forward(&hidden).squeeze_dim(-1).to_kind(Kind::Float))
    }

    /// One score per sequence: the head's output at its last token (B).
    pub fn scores(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let t = input_ids.size()[1];
        let index = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0);
        // Each row's last token (B, 1); only positions from the earliest of them on are read.
        let last = (index * attention_mask.to_kind(Kind::Int64)).argmax(-1, true);
        let from = if t == 0 { 0 } else { last.min().int64_value(&[]) };
        let values = self.values_from(input_ids, attention_mask, from)?;
        Ok(values.gather(1, &(last - from), false).squeeze_dim(1))
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
    /// With LoRA adapters, the adapter (and head) in PEFT's layout instead, as
    /// `task_type: SEQ_CLS` with `modules_to_save: [score]` (see [`Self::save_merged`]).
    pub fn save(&self, dir: &Path, pad_token_id: i64) -> Result<()> {
        match &self.lora {
            Some(lora) => lora.save(dir, "SEQ_CLS"),
            None => self.save_merged(dir, pad_token_id),
        }
    }

    /// [`Self::save`] as a plain checkpoint, any adapters merged into the weights and the
    /// head among them: what `AutoModelForSequenceClassification` loads.
    pub fn save_merged(&self, dir: &Path, pad_token_id: i64) -> Result<()> {
        match &self.lora {
            None => checkpoint::save_weights(&self.vs, dir, checkpoint::DEFAULT_SHARD_BYTES)?,
            Some(lora) => {
                let merged = var_store(self.vs.device(), self.vs.kind());
                {
                    let _no_grad = tch::no_grad_guard();
                    for (name, tensor) in self.vs.variables() {
                        super::vars::add_copy(&merged, &name, &tensor);
                    }
                    super::vars::add_copy(&merged, "score.weight", &self.score.ws.to_kind(self.vs.kind()));
                }
                lora.merge_into(&merged)?;
                checkpoint::save_weights(&merged, dir, checkpoint::DEFAULT_SHARD_BYTES)?;
            }
        }
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

/// A [`ScalarHeadModel`] saved as a plain checkpoint, any adapters merged in (see
/// [`ScalarHeadModel::save_merged`]): a LoRA reward model's final save.
pub struct Merged<'a>(pub WithPad<'a>);

impl SaveHf for Merged<'_> {
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.0.model.save_merged(dir, self.0.pad_token_id)
    }
}

//! What a model family provides ([`Architecture`], and [`CausalLm`] for decoders), and
//! the glue written once on top of it: [`Pretrained`], a family's model with its
//! variables and HF config, which builds fresh, loads from and saves to HF layout, and
//! is a [`Policy`] when the family is a causal LM; and the backbone under a scalar head.
//! The table of families that dispatches on `model_type` is [`super::FAMILIES`].
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

use super::vars::Vars;
use super::{KvCache, Policy};
use crate::checkpoint;
use crate::error::{Error, Result};

/// A model family: how its HF config resolves, how its variables are built under their
/// checkpoint keys, and how its config is saved. One file per family implements it.
pub trait Architecture: Sized {
    /// `config.json` with HF's field names, defaults and options.
    type HfConfig: Serialize + DeserializeOwned + Clone;
    /// The resolved configuration: no options left.
    type Config: Clone;

    /// Checks and resolves `hf`, every unsupported option an error naming its field;
    /// returns the HF config to keep (and save) with the resolved one.
    fn resolve(hf: Self::HfConfig) -> Result<(Self::HfConfig, Self::Config)>;

    /// Fits the configuration to the checkpoint about to be loaded, from the tensor names
    /// it holds (T5: a separate LM head when it has `lm_head.weight`). By default, nothing.
    fn fit_checkpoint(_hf: &mut Self::HfConfig, _config: &mut Self::Config, _names: &HashSet<String>) {}

    /// The model (with its head) built under `vars`, the checkpoint's top level.
    fn build(vars: &Vars, config: &Self::Config) -> Self;

    /// The checkpoint key of variable `name`, given the tensor names the checkpoint holds
    /// (older checkpoints name some tensors otherwise). By default, the name itself.
    fn checkpoint_key(name: &str, _names: &HashSet<String>) -> String {
        name.to_string()
    }

    fn config(&self) -> &Self::Config;

    /// Rows of the token embedding.
    fn vocab_size(&self) -> i64;

    /// `config.json` to save, with `architectures`; `torch_dtype` is set on saving.
    fn hf_json(hf: &Self::HfConfig) -> Value;

    /// The token ids `generation_config.json` carries (bos/eos/pad, or the decoder's
    /// start), or None for a family saved without one.
    fn generation_ids(hf: &Self::HfConfig) -> Option<[(&'static str, Option<Value>); 3]>;
}

/// A decoder-only family: a [`Policy`] when built with its LM head, and the backbone of
/// a scalar (reward/value) head when built without.
pub trait CausalLm: Architecture + 'static {
    /// The decoder without an LM head (`*Model` in transformers), for another head.
    fn build_backbone(vars: &Vars, config: &Self::Config) -> Self;

    /// The final hidden states (B, T, C) of `input_ids` (B, T) at `positions` (B, T);
    /// `attention_mask` (B, past + T) is 1 for tokens and 0 for padding; with a cache,
    /// the new keys and values are appended to it.
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// Logits (B, T, vocab) from hidden states (B, T, C).
    fn lm_head(&self, hidden: &Tensor) -> Tensor;

    fn new_cache(&self, batch: i64, capacity: i64) -> KvCache;

    /// C, the width of the hidden states.
    fn hidden_size(&self) -> i64;

    /// The std of the family's normal init, which a fresh scalar head uses too.
    fn initializer_range(&self) -> f64;

    /// The `architectures` entry of the model with a scalar head, as transformers names
    /// it (`LlamaForSequenceClassification`).
    fn sequence_classification(hf: &Self::HfConfig) -> &'static str;
}

/// A VarStore whose new variables are of `kind` on `device`.
pub(crate) fn var_store(device: Device, kind: Kind) -> nn::VarStore {
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind); // no variables yet: sets the kind of the ones to come
    vs
}

/// The HF config of the checkpoint in a directory, resolved and fitted to its tensors.
pub(crate) struct Checkpoint<A: Architecture> {
    pub hf: A::HfConfig,
    pub config: A::Config,
    dir: PathBuf,
    names: HashSet<String>,
}

impl<A: Architecture> Checkpoint<A> {
    /// Reads `dir/config.json` and the tensor names; configuration errors name the file.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_file = dir.join("config.json");
        let hf: A::HfConfig = checkpoint::read_json(&config_file)?;
        let (mut hf, mut config) = A::resolve(hf).map_err(|e| Error::file(&config_file, e.to_string()))?;
        let names = checkpoint::tensor_names(dir)?;
        A::fit_checkpoint(&mut hf, &mut config, &names);
        Ok(Self { hf, config, dir: dir.to_path_buf(), names })
    }

    /// Copies the checkpoint into every variable of `vs`, each from its checkpoint key.
    pub fn fill(&self, vs: &nn::VarStore) -> Result<()> {
        checkpoint::load_weights_keyed(vs, &self.dir, |name| A::checkpoint_key(name, &self.names))
    }
}

/// Writes `config.json` (with `torch_dtype` set to `kind`) and, for families that have
/// one, `generation_config.json`.
fn write_configs<A: Architecture>(dir: &Path, hf: &A::HfConfig, kind: Kind) -> Result<()> {
    let json = A::hf_json(hf);
    match A::generation_ids(hf) {
        Some(ids) => {
            let ids = ids.each_ref().map(|(key, id)| (*key, id.as_ref()));
            checkpoint::write_model_configs(dir, json, kind, ids)
        }
        None => {
            let mut json = json;
            json["torch_dtype"] = serde_json::json!(checkpoint::hf_dtype_name(kind));
            checkpoint::write_json(&dir.join("config.json"), &json)
        }
    }
}

/// A model of family `A` with its variables and HF config: `LlamaForCausalLm`,
/// `Gpt2ForCausalLm`, `BertForMaskedLm` and `T5ForConditionalGeneration` are this type.
pub struct Pretrained<A: Architecture> {
    vs: nn::VarStore,
    model: A,
    hf: A::HfConfig,
}

impl<A: Architecture> Pretrained<A> {
    /// A freshly initialised fp32 model (seed libtorch first for a reproducible init).
    pub fn new(hf: A::HfConfig, device: Device) -> Result<Self> {
        let (hf, config) = A::resolve(hf)?;
        let vs = nn::VarStore::new(device);
        let model = A::build(&Vars::fresh(vs.root()), &config);
        Ok(Self { vs, model, hf })
    }

    /// Loads `dir/config.json` and the weights (single or sharded safetensors) straight
    /// into variables of `kind` on `device`: no other copy of the model is made.
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let checkpoint = Checkpoint::<A>::open(dir)?;
        let vs = var_store(device, kind);
        let model = A::build(&Vars::uninit(vs.root()), &checkpoint.config);
        checkpoint.fill(&vs)?;
        Ok(Self { vs, model, hf: checkpoint.hf })
    }

    /// Writes the weights (`model.safetensors`, sharded when large) and `config.json`
    /// (and `generation_config.json`) in HF layout into `dir`, which exists.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_weights(&self.vs, dir, checkpoint::DEFAULT_SHARD_BYTES)?;
        write_configs::<A>(dir, &self.hf, self.vs.kind())
    }

    /// The trainable variables (and the device and dtype they live in).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Casts every weight (and so the activations and any KV cache) to `kind`.
    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
    }

    /// Trainable parameters.
    pub fn num_parameters(&self) -> i64 {
        super::num_parameters(&self.vs)
    }

    /// Rows of the token embedding.
    pub fn vocab_size(&self) -> i64 {
        self.model.vocab_size()
    }

    pub fn hf_config(&self) -> &A::HfConfig {
        &self.hf
    }

    pub fn config(&self) -> &A::Config {
        self.model.config()
    }

    pub fn model(&self) -> &A {
        &self.model
    }
}

impl<A: CausalLm> Policy for Pretrained<A> {
    fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.model.hidden_states(input_ids, positions, attention_mask, cache)?;
        Ok(self.model.lm_head(&hidden))
    }

    fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        self.model.new_cache(batch, capacity)
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn vocab_size(&self) -> i64 {
        self.model.vocab_size()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        Pretrained::save(self, dir)
    }
}

/// Loads family `A`'s causal LM: the `causal_lm` entry of its row in [`super::FAMILIES`].
pub fn load_causal_lm<A: CausalLm>(dir: &Path, device: Device, kind: Kind) -> Result<Box<dyn Policy>> {
    Ok(Box::new(Pretrained::<A>::from_dir(dir, device, kind)?))
}

/// The transformer under a scalar head, of whichever family.
pub trait Backbone {
    /// Hidden states (B, T, C) of `input_ids` (B, T) at `positions` (B, T); `mask`
    /// (B, T) is 1 for tokens and 0 for padding.
    fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: &Tensor) -> Result<Tensor>;

    /// C, the input width of the head.
    fn hidden_size(&self) -> i64;

    /// The std of a fresh head's normal init.
    fn initializer_range(&self) -> f64;

    /// Copies the checkpoint the backbone was read from into the variables of `vs`.
    fn load(&self, vs: &nn::VarStore) -> Result<()>;

    /// `config.json` of the model with a scalar head (`architectures` set to the
    /// family's `*ForSequenceClassification`) and the generation ids the family keeps.
    fn sequence_classification_config(&self) -> (Value, [(&'static str, Option<Value>); 3]);
}

struct BackboneOf<A: CausalLm> {
    model: A,
    checkpoint: Checkpoint<A>,
}

impl<A: CausalLm> Backbone for BackboneOf<A> {
    fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.model.hidden_states(input_ids, positions, Some(mask), None)
    }

    fn hidden_size(&self) -> i64 {
        self.model.hidden_size()
    }

    fn initializer_range(&self) -> f64 {
        self.model.initializer_range()
    }

    fn load(&self, vs: &nn::VarStore) -> Result<()> {
        self.checkpoint.fill(vs)
    }

    fn sequence_classification_config(&self) -> (Value, [(&'static str, Option<Value>); 3]) {
        let hf = &self.checkpoint.hf;
        let mut json = A::hf_json(hf);
        json["architectures"] = serde_json::json!([A::sequence_classification(hf)]);
        let ids =
            A::generation_ids(hf).unwrap_or([("bos_token_id", None), ("eos_token_id", None), ("pad_token_id", None)]);
        (json, ids)
    }
}

/// Builds family `A`'s backbone for the checkpoint in `dir`, uninitialised, under the
/// root of `vs`: the `backbone` entry of its row in [`super::FAMILIES`].
pub fn build_backbone<A: CausalLm>(dir: &Path, vs: &nn::VarStore) -> Result<Box<dyn Backbone>> {
    let checkpoint = Checkpoint::<A>::open(dir)?;
    let model = A::build_backbone(&Vars::uninit(vs.root()), &checkpoint.config);
    Ok(Box::new(BackboneOf { model, checkpoint }))
}

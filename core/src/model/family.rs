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

use super::head::{self, ScoreOptions, TokenScores};
use super::lora::{self, Adapters};
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

    /// The final hidden states of positions `from..` only, (B, T − from, C), for a caller
    /// that reads no earlier one (the scores of a response, a sequence's last value): the
    /// same numbers as [`Self::hidden_states`] narrowed, without a cache. A family may
    /// leave out the work that only earlier positions' outputs need (Llama's last block
    /// computes queries, attention output and MLP for these positions alone).
    fn hidden_states_from(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        from: i64,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, positions, attention_mask, None)?;
        let t = hidden.size()[1];
        Ok(hidden.narrow(1, from, t - from))
    }

    /// Logits (B, T, vocab) from hidden states (B, T, C).
    fn lm_head(&self, hidden: &Tensor) -> Tensor;

    /// The LM head's weight (vocab, C) when the head is `hidden · weightᵀ` and nothing
    /// else (tied or not), so the loss can run it chunk by chunk ([`super::head`]); None
    /// for a head that is more than that.
    fn lm_head_weight(&self) -> Option<&Tensor>;

    fn new_cache(&self, batch: i64, capacity: i64) -> KvCache;

    /// The most positions the model attends over (its `max_position_embeddings`), or
    /// None where it sets no bound (dynamic NTK RoPE scaling grows with the sequence).
    fn context_length(&self) -> Option<i64>;

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
    /// LoRA adapters on some linear layers; the base variables `vs` are then frozen.
    lora: Option<Adapters>,
}

impl<A: Architecture> Pretrained<A> {
    /// A freshly initialised fp32 model (seed libtorch first for a reproducible init).
    pub fn new(hf: A::HfConfig, device: Device) -> Result<Self> {
        let (hf, config) = A::resolve(hf)?;
        let vs = nn::VarStore::new(device);
        let model = A::build(&Vars::fresh(vs.root()), &config);
        Ok(Self { vs, model, hf, lora: None })
    }

    /// Loads `dir/config.json` and the weights (single or sharded safetensors) straight
    /// into variables of `kind` on `device`: no other copy of the model is made.
    pub fn from_dir(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::from_dir_with(dir, device, kind, None)
    }

    /// [`Pretrained::from_dir`] where `dir` may also be a LoRA adapter (PEFT layout), or
    /// a chain of them: each is merged into its base's weights as it loads (see
    /// [`lora::chain`]). With `lora`, the model then gets adapters (fresh or saved ones)
    /// on the linear layers they name, and its own variables are frozen.
    pub fn from_dir_with(dir: &Path, device: Device, kind: Kind, lora: Option<&lora::Request>) -> Result<Self> {
        let (base, merged) = lora::chain(dir)?;
        let checkpoint = Checkpoint::<A>::open(&base)?;
        let mut vs = var_store(device, kind);
        let builder = lora.map(|request| lora::Builder::new(request, device)).transpose()?;
        let model = A::build(&Vars::uninit(vs.root()).with_lora(builder.as_ref()), &checkpoint.config);
        checkpoint.fill(&vs)?;
        for adapter in &merged {
            lora::merge_saved(&vs, adapter)?;
        }
        let adapters = match (builder, lora) {
            (Some(builder), Some(request)) => {
                vs.freeze();
                let family = std::any::type_name::<A>().rsplit("::").next().unwrap_or("this");
                Some(builder.finish(request, dir, family)?)
            }
            _ => None,
        };
        Ok(Self { vs, model, hf: checkpoint.hf, lora: adapters })
    }

    /// Writes the model in HF layout into `dir`, which exists: the weights
    /// (`model.safetensors`, sharded when large) and `config.json` (and
    /// `generation_config.json`); for a model with LoRA adapters, the adapter only, in
    /// PEFT's layout (see [`lora::Adapters::save`]): its base stays where it was loaded from.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if let Some(lora) = &self.lora {
            return lora.save(dir, "CAUSAL_LM");
        }
        self.save_merged(dir)
    }

    /// Writes the model in HF layout into `dir`, which exists, with any LoRA adapters
    /// merged into the weights (W + (α/r)·B·A): a plain checkpoint `transformers` loads.
    pub fn save_merged(&self, dir: &Path) -> Result<()> {
        match &self.lora {
            None => checkpoint::save_weights(&self.vs, dir, checkpoint::DEFAULT_SHARD_BYTES)?,
            Some(lora) => {
                // A merged copy of each adapted weight; the others are saved as they are.
                let merged = var_store(self.vs.device(), self.vs.kind());
                {
                    let _no_grad = tch::no_grad_guard();
                    for (name, tensor) in self.vs.variables() {
                        super::vars::add_copy(&merged, &name, &tensor);
                    }
                }
                lora.merge_into(&merged)?;
                checkpoint::save_weights(&merged, dir, checkpoint::DEFAULT_SHARD_BYTES)?;
            }
        }
        write_configs::<A>(dir, &self.hf, self.vs.kind())
    }

    /// The LoRA adapters, when the model was loaded with them.
    pub fn lora(&self) -> Option<&Adapters> {
        self.lora.as_ref()
    }

    /// The trainable variables (and the device and dtype they live in).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Casts every weight (and so the activations and any KV cache) to `kind`.
    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
    }

    /// Trainable parameters: the adapters' when there are adapters.
    pub fn num_parameters(&self) -> i64 {
        super::num_parameters(self.lora.as_ref().map_or(&self.vs, |l| l.var_store()))
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

    fn last_logits(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.model.hidden_states(input_ids, positions, attention_mask, cache)?;
        Ok(self.model.lm_head(&hidden.select(1, -1)))
    }

    fn token_scores(
        &self,
        input_ids: &Tensor,
        positions: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        targets: &Tensor,
        start: i64,
        options: &ScoreOptions,
    ) -> Result<TokenScores> {
        let positions = match positions {
            Some(p) => p.shallow_clone(),
            None => super::default_positions(input_ids, attention_mask)?,
        };
        let hidden = self.model.hidden_states_from(input_ids, &positions, attention_mask, start)?;
        let hidden = hidden.narrow(1, 0, targets.size()[1]); // (B, S, C)
        match self.model.lm_head_weight() {
            Some(weight) => head::token_scores(&hidden, weight, targets, options),
            None => Ok(head::scores_from_logits(&self.model.lm_head(&hidden), targets, options)),
        }
    }

    fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        self.model.new_cache(batch, capacity)
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn lora(&self) -> Option<&Adapters> {
        self.lora.as_ref()
    }

    fn save_merged(&self, dir: &Path) -> Result<()> {
        Pretrained::save_merged(self, dir)
    }

    fn vocab_size(&self) -> i64 {
        self.model.vocab_size()
    }

    fn context_length(&self) -> Option<i64> {
        self.model.context_length()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        Pretrained::save(self, dir)
    }
}

/// Loads family `A`'s causal LM: the `causal_lm` entry of its row in [`super::FAMILIES`].
/// `dir` may be a LoRA adapter (merged as it loads); with `lora`, the model gets adapters.
pub fn load_causal_lm<A: CausalLm>(
    dir: &Path,
    device: Device,
    kind: Kind,
    lora: Option<&lora::Request>,
) -> Result<Box<dyn Policy>> {
    Ok(Box::new(Pretrained::<A>::from_dir_with(dir, device, kind, lora)?))
}

/// The transformer under a scalar head, of whichever family. `Send`, so a reward holding
/// one may be scored from the host's threads.
pub trait Backbone: Send {
    /// Hidden states (B, T − from, C) of positions `from..` of `input_ids` (B, T) at
    /// `positions` (B, T) ([`CausalLm::hidden_states_from`]); `mask` (B, T) is 1 for tokens
    /// and 0 for padding.
    fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: &Tensor, from: i64) -> Result<Tensor>;

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

pub struct BackboneOf<A: CausalLm> {
    model: A,
    checkpoint: Checkpoint<A>,
    /// LoRA adapters merged into the weights as they load (see [`lora::chain`]).
    merged: Vec<PathBuf>,
}

impl<A: CausalLm> Backbone for BackboneOf<A>
where
    Self: Send,
{
    fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: &Tensor, from: i64) -> Result<Tensor> {
        self.model.hidden_states_from(input_ids, positions, Some(mask), from)
    }

    fn hidden_size(&self) -> i64 {
        self.model.hidden_size()
    }

    fn initializer_range(&self) -> f64 {
        self.model.initializer_range()
    }

    fn load(&self, vs: &nn::VarStore) -> Result<()> {
        self.checkpoint.fill(vs)?;
        self.merged.iter().try_for_each(|adapter| lora::merge_saved(vs, adapter))
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
pub fn build_backbone<A: CausalLm>(
    dir: &Path,
    vs: &nn::VarStore,
    lora: Option<&lora::Builder>,
) -> Result<Box<dyn Backbone>>
where
    BackboneOf<A>: Send,
{
    let (base, merged) = lora::chain(dir)?;
    let checkpoint = Checkpoint::<A>::open(&base)?;
    let model = A::build_backbone(&Vars::uninit(vs.root()).with_lora(lora), &checkpoint.config);
    Ok(Box::new(BackboneOf { model, checkpoint, merged }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt2::Gpt2ForCausalLm;
    use crate::model::llama::LlamaForCausalLm;
    use crate::model::scalar_head::ScalarHeadModel;
    use crate::model::{self, FAMILIES};

    /// A tiny causal LM of `model_type`, freshly initialised, saved into `dir`. Every
    /// model type of a causal-LM row in the table needs a case here.
    fn save_tiny_causal_lm(model_type: &str, dir: &Path) {
        tch::manual_seed(0);
        let llama = |extra: Value| {
            let mut config = serde_json::json!({
                "model_type": model_type, "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 32, "bos_token_id": 1, "eos_token_id": 2
            });
            if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
                config.extend(extra.clone());
            }
            LlamaForCausalLm::new(serde_json::from_value(config).unwrap(), Device::Cpu).unwrap().save(dir).unwrap()
        };
        match model_type {
            "llama" => llama(serde_json::json!({})),
            "qwen2" => llama(serde_json::json!({"tie_word_embeddings": true})),
            "mistral" => llama(serde_json::json!({"sliding_window": 4})),
            "gpt2" => {
                let config =
                    serde_json::json!({"vocab_size": 40, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 32});
                Gpt2ForCausalLm::new(serde_json::from_value(config).unwrap(), Device::Cpu).unwrap().save(dir).unwrap()
            }
            other => panic!("no tiny config for model_type `{other}`: add one to save_tiny_causal_lm"),
        }
    }

    fn ids() -> (Tensor, Tensor) {
        let ids = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10, 3, 4, 0, 0, 0, 0]).view([2, 6]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        (ids, mask)
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
    }

    fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        variables
    }

    #[test]
    fn a_bf16_checkpoint_loads_with_every_variable_bf16_and_equal_values() {
        for model_type in ["llama", "gpt2"] {
            let fp32 = tempfile::tempdir().unwrap();
            save_tiny_causal_lm(model_type, fp32.path());
            // Saved in bf16, then loaded in bf16: a byte-for-byte copy.
            let bf16 = tempfile::tempdir().unwrap();
            let saved = model::load(fp32.path(), Device::Cpu, Kind::BFloat16).unwrap();
            saved.save(bf16.path()).unwrap();
            let config: Value = checkpoint::read_json(&bf16.path().join("config.json")).unwrap();
            assert_eq!(config["torch_dtype"], "bfloat16", "{model_type}");
            let loaded = model::load(bf16.path(), Device::Cpu, Kind::BFloat16).unwrap();
            let (ours, theirs) = (sorted_variables(loaded.var_store()), sorted_variables(saved.var_store()));
            assert_eq!(ours.len(), theirs.len());
            for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
                assert_eq!(a.kind(), Kind::BFloat16, "{model_type}: {name}");
                assert!(a.requires_grad(), "{model_type}: {name} is trainable");
                assert_eq!(max_abs(a, b), 0.0, "{model_type}: {name}");
            }
            // A bf16 checkpoint loaded in fp32 holds exactly the bf16 values.
            let model = model::load(bf16.path(), Device::Cpu, Kind::Float).unwrap();
            for ((name, a), (_, b)) in sorted_variables(model.var_store()).iter().zip(&theirs) {
                assert_eq!(a.kind(), Kind::Float, "{model_type}: {name}");
                assert_eq!(max_abs(a, b), 0.0, "{model_type}: {name}");
            }
        }
    }

    #[test]
    fn unknown_model_types_are_errors_listing_the_families_of_the_table() {
        let causal: Vec<&str> =
            FAMILIES.iter().filter(|f| f.causal_lm.is_some()).flat_map(|f| f.model_types.iter().copied()).collect();
        assert_eq!(model::model_types(|f| f.causal_lm.is_some()), causal.join(", "));
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        let error = |text: &str| {
            std::fs::write(&config, text).unwrap();
            model::load(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string()
        };
        let message = error(r#"{"model_type": "mamba"}"#);
        assert!(
            message.ends_with(&format!("unsupported model type `mamba`; supported: {}", causal.join(", "))),
            "{message}"
        );
        let message = error(r#"{"vocab_size": 10}"#);
        assert!(message.ends_with(&format!("model_type: missing; expected one of {}", causal.join(", "))), "{message}");
        // Every family of the table is known; those without a causal LM say so.
        for family in FAMILIES.iter().filter(|f| f.causal_lm.is_none()) {
            let model_type = family.model_types[0];
            let message = error(&format!(r#"{{"model_type": "{model_type}"}}"#));
            assert!(message.contains(&format!("a causal LM is not built on `{model_type}`")), "{message}");
            let message =
                ScalarHeadModel::from_causal_lm(dir.path(), Device::Cpu, Kind::Float).err().unwrap().to_string();
            assert!(message.contains(&format!("a scalar head is not built on `{model_type}`")), "{message}");
        }
        let names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        assert_eq!(names, ["llama", "gpt2", "bert", "t5"]);
    }

    #[test]
    fn a_scalar_head_goes_on_every_causal_lm_family_of_the_table() {
        let (ids, mask) = ids();
        for family in FAMILIES.iter().filter(|f| f.backbone.is_some()) {
            for &model_type in family.model_types {
                let lm = tempfile::tempdir().unwrap();
                save_tiny_causal_lm(model_type, lm.path());
                tch::manual_seed(1);
                let model = ScalarHeadModel::from_causal_lm(lm.path(), Device::Cpu, Kind::Float).unwrap();
                let scores = model.scores(&ids, &mask).unwrap();
                assert_eq!(scores.size(), [2], "{model_type}");
                // The backbone holds the causal LM's weights, the head is new.
                let causal = model::load(lm.path(), Device::Cpu, Kind::Float).unwrap();
                let causal_vars = causal.var_store().variables();
                for (name, var) in model.var_store().variables() {
                    match causal_vars.get(&name) {
                        Some(original) => assert_eq!(max_abs(&var, original), 0.0, "{model_type}: {name}"),
                        None => assert_eq!(name, "score.weight", "{model_type}"),
                    }
                }

                let out = tempfile::tempdir().unwrap();
                model.save(out.path(), 0).unwrap();
                let config: Value = checkpoint::read_json(&out.path().join("config.json")).unwrap();
                assert_eq!(config["model_type"], model_type);
                assert!(config["architectures"][0].as_str().unwrap().ends_with("ForSequenceClassification"));
                let again = ScalarHeadModel::from_dir(out.path(), Device::Cpu, Kind::Float).unwrap();
                assert_eq!(max_abs(&again.scores(&ids, &mask).unwrap(), &scores), 0.0, "{model_type}");
                let bf16 = ScalarHeadModel::from_dir(out.path(), Device::Cpu, Kind::BFloat16).unwrap();
                assert!(bf16.var_store().variables().values().all(|v| v.kind() == Kind::BFloat16), "{model_type}");
                assert!(max_abs(&bf16.scores(&ids, &mask).unwrap(), &scores) < 0.1, "{model_type}");
            }
        }
    }
}

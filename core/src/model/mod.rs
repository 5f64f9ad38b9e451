//! Models: the `Policy` contract, the table of model families ([`FAMILIES`]), one file
//! per family, the glue written once for all of them ([`family`], [`vars`]) and the
//! parts they share (rotary embeddings, the KV cache, generation).
pub mod attention;
pub mod bert;
pub mod cache;
pub mod family;
pub mod fused;
pub mod generate;
pub mod generator;
pub mod gpt2;
pub mod head;
pub mod llama;
pub mod lora;
pub mod recompute;
pub mod rope;
pub mod scalar_head;
pub mod t5;
pub mod vars;

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

pub use cache::KvCache;
pub use family::{Architecture, Backbone, CausalLm, Pretrained};
pub use generate::{Generated, GenerationSettings, StepMode};
pub use head::{HeadChunks, ScoreOptions, TokenScores};

use crate::checkpoint;
use crate::error::{Error, Result};

/// Loads a family's causal LM from a checkpoint directory (or a LoRA adapter on one), in
/// a dtype on a device, with LoRA adapters when asked.
pub type LoadCausalLm = fn(&Path, Device, Kind, Option<&lora::Request>) -> Result<Box<dyn Policy>>;

/// Builds a family's backbone for the checkpoint in a directory, uninitialised, in a
/// VarStore, with LoRA adapters from the builder when there is one.
pub type BuildBackbone = fn(&Path, &nn::VarStore, Option<&lora::Builder>) -> Result<Box<dyn Backbone>>;

/// One row of [`FAMILIES`]: a model family, the `model_type`s of `config.json` it reads,
/// and what can be built from a checkpoint of it.
pub struct Family {
    /// The family, as its file in `core/src/model/` is named.
    pub name: &'static str,
    /// The `model_type` values it reads.
    pub model_types: &'static [&'static str],
    /// Loads its causal LM ([`family::load_causal_lm`]); None for encoder families.
    pub causal_lm: Option<LoadCausalLm>,
    /// Builds its backbone under a scalar head ([`family::build_backbone`]); None where
    /// no scalar head goes.
    pub backbone: Option<BuildBackbone>,
}

/// Every model family plumb reads and writes: the one place that dispatches on
/// `model_type`. Adding a family is its file and a row here (see the README).
pub const FAMILIES: &[Family] = &[
    Family {
        name: "llama",
        model_types: &llama::MODEL_TYPES,
        causal_lm: Some(family::load_causal_lm::<llama::Llama>),
        backbone: Some(family::build_backbone::<llama::Llama>),
    },
    Family {
        name: "gpt2",
        model_types: &[gpt2::MODEL_TYPE],
        causal_lm: Some(family::load_causal_lm::<gpt2::Gpt2>),
        backbone: Some(family::build_backbone::<gpt2::Gpt2>),
    },
    Family { name: "bert", model_types: &[bert::MODEL_TYPE], causal_lm: None, backbone: None },
    Family { name: "t5", model_types: &[t5::MODEL_TYPE], causal_lm: None, backbone: None },
];

/// The `model_type`s of the families `has` accepts, comma-separated, in table order.
pub fn model_types(has: impl Fn(&Family) -> bool) -> String {
    FAMILIES.iter().filter(|f| has(f)).flat_map(|f| f.model_types.iter().copied()).collect::<Vec<_>>().join(", ")
}

/// The entry (picked by `entry`) of the family of the `model_type` in `dir/config.json`;
/// where the type is missing or unknown, or its family lacks the entry, an error naming
/// the file and listing the model types whose families have it (`what` names the entry:
/// "causal LM", "scalar head").
/// A LoRA adapter directory is read as the model under it ([`lora::chain`]).
pub(crate) fn dispatch<T: Copy>(dir: &Path, what: &str, entry: impl Fn(&Family) -> Option<T>) -> Result<T> {
    let (dir, _) = lora::chain(dir)?;
    let config_file: PathBuf = dir.join("config.json");
    let config: Value = checkpoint::read_json(&config_file)?;
    let supported = model_types(|f| entry(f).is_some());
    let model_type = match config.get("model_type").and_then(Value::as_str) {
        Some(t) => t,
        None => return Err(Error::file(&config_file, format!("model_type: missing; expected one of {supported}"))),
    };
    match FAMILIES.iter().find(|f| f.model_types.contains(&model_type)) {
        Some(family) => entry(family).ok_or_else(|| {
            Error::file(
                &config_file,
                format!(
                    "model_type: a {what} is not built on `{model_type}` ({} family); supported: {supported}",
                    family.name
                ),
            )
        }),
        None => Err(Error::file(
            &config_file,
            format!("model_type: unsupported model type `{model_type}`; supported: {supported}"),
        )),
    }
}

/// Loads the causal LM in `dir` (HF layout) in `kind` on `device`, choosing the family
/// from `config.json`'s `model_type` in [`FAMILIES`]. `dir` may hold a LoRA adapter (PEFT
/// layout) instead: the model it adapts is loaded with the adapter merged in.
pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Box<dyn Policy>> {
    load_with(dir, device, kind, None)
}

/// [`load`], then LoRA adapters on the layers `lora` names: fresh ones or those saved in
/// a directory. The model's own variables are frozen; [`Policy::trainable`] is the adapters.
pub fn load_with(dir: &Path, device: Device, kind: Kind, lora: Option<&lora::Request>) -> Result<Box<dyn Policy>> {
    let load = dispatch(dir, "causal LM", |f| f.causal_lm)?;
    load(dir, device, kind, lora)
}

/// The causal LM a training stage trains: the input model `input`, or the model of the
/// checkpoint `resume` it continues from. With a `lora` block, the input model with fresh
/// adapters (drawn from libtorch's generator; `seed` seeds their dropout), or with the
/// adapter the checkpoint holds; without one, the whole model.
pub fn load_for_training(
    input: &Path,
    resume: Option<&Path>,
    device: Device,
    kind: Kind,
    lora: Option<&lora::LoraConfig>,
    seed: u64,
) -> Result<Box<dyn Policy>> {
    let policy = match (lora, resume) {
        (None, resume) => load(resume.unwrap_or(input), device, kind)?,
        (Some(config), None) => load_with(input, device, kind, Some(&lora::Request::New { config, seed }))?,
        (Some(_), Some(dir)) => load_with(input, device, kind, Some(&lora::Request::Saved { dir, trainable: true }))?,
    };
    log_trainable(policy.as_ref());
    Ok(policy)
}

/// Logs what a model with LoRA adapters trains: the adapters' parameters and AdamW state as a
/// share of full fine-tuning's (two fp32 moments per trained parameter).
pub fn log_trainable(policy: &dyn Policy) {
    if let Some(lora) = policy.lora() {
        let all: i64 = policy.var_store().variables().values().map(|t| t.numel() as i64).sum();
        let trained = lora.num_parameters();
        tracing::info!(
            "LoRA r={} alpha={} on {} layers: {trained} trainable parameters of {all} ({:.3}%), AdamW state {:.2} MB instead of {:.2} MB",
            lora.config().rank,
            lora.config().alpha,
            lora.modules().len(),
            100.0 * trained as f64 / all as f64,
            (2 * 4 * trained) as f64 / 1e6,
            (2 * 4 * all) as f64 / 1e6,
        );
    }
}

/// Trainable parameters of a model's variables.
pub fn num_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
}

/// Trainable parameters outside the embeddings: N of the scaling laws (Kaplan et al. 2020
/// count non-embedding parameters). Leaves out token and position embeddings and an LM
/// head (tied to the token embedding or not), by the names HF checkpoints give them
/// (`*embed*`, `*.wte.*`, `*.wpe.*`, `lm_head.*`, T5's `shared.*`).
pub fn non_embedding_parameters(vs: &nn::VarStore) -> i64 {
    let embedding = |name: &str| {
        name.contains("embed")
            || name.contains("wte.")
            || name.contains("wpe.")
            || name.starts_with("lm_head.")
            || name.starts_with("shared.")
    };
    vs.variables().iter().filter(|(name, t)| t.requires_grad() && !embedding(name)).map(|(_, t)| t.numel() as i64).sum()
}

/// A model that can be written in HF layout: what a checkpoint needs of it. Every
/// [`Policy`] is one; so are the encoder families ([`bert`], [`t5`]).
pub trait SaveHf {
    /// Writes the weights and `config.json` into `dir`, which exists.
    fn save_hf(&self, dir: &Path) -> Result<()>;
}

impl<P: Policy + ?Sized> SaveHf for P {
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save(dir)
    }
}

impl SaveHf for bert::BertForMaskedLm {
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save(dir)
    }
}

impl SaveHf for t5::T5ForConditionalGeneration {
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save(dir)
    }
}

/// A causal language model that plugins train, score with and sample from.
///
/// Families implement [`Policy::forward`] (with or without a KV cache), and get
/// logits, per-token log-probs and batched generation from it.
pub trait Policy: SaveHf {
    /// Logits (B, T, vocab) for `input_ids` (B, T) at `positions` (B, T).
    /// `attention_mask` (B, past + T) is 1 for tokens and 0 for padding (or, for packed
    /// examples, a segment id per token: see [`cache::attention_mask`]); with a cache,
    /// `past` positions are already in it and the new ones are appended.
    fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// An empty cache for `batch` sequences of up to `capacity` positions, allocated once.
    fn new_cache(&self, batch: i64, capacity: i64) -> KvCache;

    /// Logits (B, T, vocab) of a whole batch. Positions count tokens only, so a
    /// left-padded row gets the same positions as it would alone.
    fn logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let positions = default_positions(input_ids, attention_mask)?;
        self.forward(input_ids, &positions, attention_mask, None)
    }

    /// The logits (B, vocab) of the last position of each row only: what a generation
    /// step needs (a prefill's other positions never go through the LM head).
    fn last_logits(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Ok(self.forward(input_ids, positions, attention_mask, cache)?.select(1, -1))
    }

    /// The scores of `targets` (B, S): `targets[:, i]` is predicted at position `start + i`
    /// of `input_ids` (B, T) (for next-token targets, `input_ids[:, start + i + 1]`).
    /// `positions` default to the mask's, as [`Policy::logits`] counts them. Families with a
    /// plain LM head compute them chunk by chunk ([`head`]); this default goes through the
    /// whole logits.
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
            None => default_positions(input_ids, attention_mask)?,
        };
        let logits = self.forward(input_ids, &positions, attention_mask, None)?;
        let logits = logits.narrow(1, start, targets.size()[1]);
        Ok(head::scores_from_logits(&logits, targets, options))
    }

    /// Log-probability of each next token: (B, T-1), entry t scores input_ids[:, t+1].
    fn log_probs(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let logits = self.logits(input_ids, attention_mask)?;
        let t = logits.size()[1];
        let log_probs = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
        let targets = input_ids.narrow(1, 1, t - 1).unsqueeze(-1);
        Ok(log_probs.gather(-1, &targets, false).squeeze_dim(-1))
    }

    /// Continues each prompt (token ids), batched, with a KV cache.
    fn generate(&self, prompts: &[Vec<i64>], settings: &GenerationSettings) -> Result<Vec<Generated>> {
        generate::generate(self, prompts, settings, None)
    }

    /// The model's variables (and the device and dtype they live in); frozen when the
    /// model has LoRA adapters.
    fn var_store(&self) -> &nn::VarStore;

    /// The LoRA adapters, when the model was loaded with them: switch them off with
    /// [`lora::Adapters::disabled`] for the base model's outputs.
    fn lora(&self) -> Option<&lora::Adapters> {
        None
    }

    /// The variables a stage trains (hand these to its optimizer): the adapters' when the
    /// model has LoRA adapters, else all of the model's.
    fn trainable(&self) -> &nn::VarStore {
        self.lora().map_or(self.var_store(), |l| l.var_store())
    }

    /// Writes a plain HF checkpoint into `dir` (which exists), any adapters merged in.
    fn save_merged(&self, dir: &Path) -> Result<()> {
        self.save(dir)
    }

    /// Trainable parameters: the adapters' when the model has LoRA adapters.
    fn num_parameters(&self) -> i64 {
        num_parameters(self.trainable())
    }

    /// Rows of the token embedding.
    fn vocab_size(&self) -> i64;

    /// The most positions the model attends over (`max_position_embeddings`,
    /// `n_positions`), which bounds generation; None where the model sets no bound
    /// (dynamic NTK RoPE scaling, made to run past `max_position_embeddings`).
    fn context_length(&self) -> Option<i64> {
        None
    }

    /// Writes the weights and `config.json` (and `generation_config.json`) in HF layout
    /// into `dir`, which exists.
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Position ids (B, T) of `input_ids` (B, T): counting tokens only under a padding mask,
/// 0..T without one.
pub fn default_positions(input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match attention_mask {
        Some(mask) => cache::positions_from_mask(mask),
        None => {
            let (b, t) = input_ids.size2()?;
            Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0).expand([b, t], false)
        }
    })
}

/// Additive attention mask in `kind` from `allowed` (bool, broadcastable to (B, H, Tq, Tk)):
/// 0 where a query may attend, the dtype's lowest finite value where not, as HF's eager
/// attention does, so a row with nothing to attend to stays finite (uniform) instead of NaN.
pub(crate) fn additive_mask(allowed: &Tensor, kind: Kind) -> Tensor {
    let lowest = match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    };
    Tensor::zeros(allowed.size(), (kind, allowed.device())).masked_fill(&allowed.logical_not(), lowest)
}

/// The additive mask (B, 1, 1, T) that hides the padded keys of `mask` (B, T): 1 (or any
/// nonzero) for tokens, 0 for padding.
pub(crate) fn key_padding_mask(mask: &Tensor, kind: Kind) -> Tensor {
    let (b, t) = (mask.size()[0], mask.size()[1]);
    additive_mask(&mask.ne(0).view([b, 1, 1, t]), kind)
}

/// The checkpoint key of variable `name`: the name itself when the checkpoint (whose
/// tensor names are `names`) holds it, else the first of `aliases` it holds, else the
/// name (so a tensor missing under every name is reported by its own name).
pub(crate) fn key_or_alias(name: &str, names: &std::collections::HashSet<String>, aliases: Vec<String>) -> String {
    if names.contains(name) {
        return name.to_string();
    }
    aliases.into_iter().find(|a| names.contains(a)).unwrap_or_else(|| name.to_string())
}

/// The rows of `table` (rows, C) for `ids`, or an error naming `name` (not a panic) for
/// an id outside the table; the row `padding_idx` gets no gradient from the lookup. The
/// range check is a CPU-GPU sync point.
pub(crate) fn embedding_lookup(table: &Tensor, padding_idx: Option<i64>, ids: &Tensor, name: &str) -> Result<Tensor> {
    if ids.numel() > 0 {
        let rows = table.size()[0];
        let (min, max) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if min < 0 || max >= rows {
            return Err(Error::Other(format!("{name}: ids must lie in [0, {rows}), found ids from {min} to {max}")));
        }
    }
    Ok(Tensor::f_embedding(table, ids, padding_idx.unwrap_or(-1), false, false)?)
}

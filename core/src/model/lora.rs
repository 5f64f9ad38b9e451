//! LoRA: low-rank adapters on a model's linear layers (Hu et al. 2021, "LoRA: Low-Rank
//! Adaptation of Large Language Models", arXiv:2106.09685), as PEFT implements them
//! (`peft/tuners/lora/layer.py`), saved in PEFT's layout so `peft` loads what plumb trains.
//!
//! A layer W (out, in) named by the recipe's `target_modules` gets two matrices, A (r, in)
//! and B (out, r), and computes y = x·Wᵀ + b + (α/r)·dropout(x)·Aᵀ·Bᵀ. A starts as PEFT
//! draws it (kaiming-uniform, a = √5: uniform in ±1/√in), B at zero, so a fresh adapter
//! leaves the model's outputs unchanged. Only A and B train: the base model's variables
//! are frozen (no gradients, no optimizer state), and the adapters live in a VarStore of
//! their own ([`Adapters::var_store`]), which is what a stage hands its optimizer.
//!
//! How a stage uses it (all of it through [`crate::model`]):
//!
//! ```ignore
//! let policy = model::load_for_training(&input_dir, trainer.resume_dir(), device, kind, train.lora.as_ref(), seed)?;
//! let mut optimizer = train.optimizer.adamw(policy.trainable());   // the adapters only
//! let reference = {
//!     let _off = policy.lora().map(|l| l.disabled());             // the base model's logits
//!     policy.log_probs(&ids, Some(&mask))?
//! };
//! trainer.save_final(policy.as_ref(), ...)?;                       // the adapter, PEFT layout
//! ```
//!
//! On disk an adapter is `adapter_config.json` and `adapter_model.safetensors` with PEFT's
//! key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), and
//! `base_model_name_or_path` pointing at the model it adapts (which may itself be an
//! adapter: a chain, resolved by [`chain`]). [`crate::model::load`] loads such a
//! directory with each adapter merged into the weights (W + (α/r)·B·A), so `plumb generate`,
//! `plumb eval` and a next stage take it like any checkpoint; `plumb lora merge` saves the
//! merged model as a plain HF checkpoint.
//!
//! Dropout draws its masks from a counter-based hash of (seed, draw number) rather than
//! libtorch's global generator, so a run is reproducible and a resumed one continues the
//! same masks (the draw count is saved beside the adapter, in [`STATE_FILE`]). It applies
//! only in passes that record gradients for the adapters (training), never under
//! `no_grad` (evaluation, rollouts, generation). Under activation checkpointing a block's
//! forward pass (run without gradients) counts as training, and its recomputation gets the
//! same masks back ([`super::recompute::draw`]).
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::recompute;
use crate::checkpoint::{self, read_json, save_safetensors, write_json};
use crate::error::{Error, Result};
use crate::shim;

/// PEFT's adapter configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// plumb's own state of an adapter (dropout seed and draws), beside PEFT's files.
pub const STATE_FILE: &str = "plumb_lora_state.json";
/// The prefix PEFT gives every key of a `PeftModel`'s state dict.
const PEFT_PREFIX: &str = "base_model.model.";

/// The recipe's `lora:` block, shared by every training stage (see
/// [`crate::train::TrainingConfig`]). Field names and defaults are PEFT's `LoraConfig`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of each adapter: A is (r, in), B is (out, r).
    #[serde(default = "default_rank")]
    pub rank: i64,
    /// Scale of the update: it is multiplied by alpha / rank.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapters' input while training, in [0, 1).
    #[serde(default)]
    pub dropout: f64,
    /// Layers that get adapters: names as PEFT matches them (a layer whose path is or ends in `.name`), or `all-linear` (every linear layer but the LM head).
    #[serde(default)]
    pub target_modules: TargetModules,
}

fn default_rank() -> i64 {
    8
}
fn default_alpha() -> f64 {
    8.0
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: default_rank(), alpha: default_alpha(), dropout: 0.0, target_modules: TargetModules::default() }
    }
}

/// `target_modules:` — a list of module names, or the keyword `all-linear`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names, e.g. `[q_proj, v_proj]`.
    Names(Vec<String>),
    /// `all-linear`.
    Keyword(String),
}

impl Default for TargetModules {
    /// PEFT's default for the Llama family: the query and value projections.
    fn default() -> Self {
        Self::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

/// The keyword for every linear layer but the output layer.
pub const ALL_LINEAR: &str = "all-linear";

impl TargetModules {
    /// As a recipe writes it: `[q_proj, v_proj]` or `all-linear`.
    pub fn describe(&self) -> String {
        match self {
            Self::Names(names) => format!("[{}]", names.join(", ")),
            Self::Keyword(k) => k.clone(),
        }
    }

    /// Whether the layer at `path` (`model.layers.0.self_attn.q_proj`) gets an adapter.
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Names(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Self::Keyword(_) => path != "lm_head" && !path.ends_with(".lm_head"),
        }
    }
}

impl LoraConfig {
    /// Every check, at its key under `lora.`.
    pub fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("lora.{k}");
        if self.rank < 1 {
            return Err(Error::config(key("rank"), format!("expected a positive rank, found {}", self.rank)));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(Error::config(key("alpha"), format!("expected a positive number, found {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(key("dropout"), format!("expected a value in [0, 1), found {}", self.dropout)));
        }
        match &self.target_modules {
            TargetModules::Names(names) if names.is_empty() => Err(Error::config(
                key("target_modules"),
                format!("expected at least one module name (e.g. [q_proj, v_proj]) or `{ALL_LINEAR}`"),
            )),
            TargetModules::Names(names) => match names.iter().find(|n| n.is_empty() || n.contains(char::is_whitespace))
            {
                Some(bad) => Err(Error::config(key("target_modules"), format!("`{bad}` is not a module name"))),
                None => Ok(()),
            },
            TargetModules::Keyword(k) if k == ALL_LINEAR => Ok(()),
            TargetModules::Keyword(k) => Err(Error::config(
                key("target_modules"),
                format!("expected a list of module names or `{ALL_LINEAR}`, found `{k}`"),
            )),
        }
    }

    /// The factor of the update B·A: alpha / rank.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// What every adapter of one model shares: whether adapters are on, and the dropout
/// generator's seed and draw counter.
#[derive(Debug)]
struct Shared {
    enabled: AtomicBool,
    seed: u64,
    draws: AtomicU64,
}

/// The adapter of one linear layer.
#[derive(Debug)]
struct Adapter {
    /// (r, in)
    a: Tensor,
    /// (out, r)
    b: Tensor,
    scaling: f64,
    dropout: f64,
    shared: Arc<Shared>,
}

impl Adapter {
    /// (α/r)·dropout(x)·Aᵀ·Bᵀ, in the adapters' dtype, cast to `kind`.
    fn delta(&self, x: &Tensor, kind: Kind) -> Tensor {
        let x = x.to_kind(self.a.kind());
        let x = if self.dropout > 0.0 && self.a.requires_grad() && recompute::records_gradients() {
            // Recorded for (and replayed by) the recomputation of a checkpointed block.
            let draw = recompute::draw(|| self.shared.draws.fetch_add(1, Ordering::Relaxed));
            let keep = keep_mask(&x.size(), self.dropout, self.shared.seed, draw, x.device());
            let keep = keep.to_kind(x.kind());
            x * keep / (1.0 - self.dropout)
        } else {
            x
        };
        (x.matmul(&self.a.tr()).matmul(&self.b.tr()) * self.scaling).to_kind(kind)
        // (..., in) -> (..., r) -> (..., out)
    }
}

/// A linear layer, y = x·Wᵀ + b, that may carry a LoRA adapter. Without one (or with the
/// model's adapters switched off) it computes what `nn::Linear` computes ([`linear`]).
#[derive(Debug)]
pub struct Linear {
    /// (out, in)
    pub ws: Tensor,
    /// (out)
    pub bs: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl Linear {
    /// A plain linear layer from its weight and bias.
    pub fn plain(linear: nn::Linear) -> Self {
        Self { ws: linear.ws, bs: linear.bs, adapter: None }
    }
}

impl Module for Linear {
    /// (..., in) -> (..., out)
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = linear(x, &self.ws, self.bs.as_ref());
        match &self.adapter {
            Some(adapter) if adapter.shared.enabled.load(Ordering::Relaxed) => {
                let delta = adapter.delta(x, y.kind());
                y + delta
            }
            _ => y,
        }
    }
}

/// y = x·Wᵀ + b for `x` (..., in), `weight` (out, in), `bias` (out), as `Tensor::linear`
/// computes it. A decoding step's few rows (at most 4) in fp32 on a CPU, when no gradient
/// is wanted, take the shim's row-dot-product kernel instead (`core/csrc/rows.cpp`): MKL's
/// matrix-vector product there is several times slower. Its sums run in another order, so
/// the results agree with `Tensor::linear` to fp32 rounding, not bit for bit.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    rows_linear(x, weight, bias).unwrap_or_else(|| x.linear(weight, bias))
}

/// The shim's few-rows product, or `None` where it does not take the case (see [`linear`]).
fn rows_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    if x.device() != Device::Cpu || x.kind() != Kind::Float {
        return None;
    }
    let bias = bias.map_or(std::ptr::null_mut(), shim::raw);
    // SAFETY: the tensors are alive for the call; see `shim::taken`.
    shim::taken(|out| unsafe { shim::plumb_rows_linear(shim::raw(x), shim::raw(weight), bias, out) })
}

/// Uniform keep mask of `shape` (true with probability 1 - p) from a counter-based hash of
/// (seed, draw, element index): splitmix64's finalizer on int64 tensors (logical shifts
/// as arithmetic shifts masked to the bits they keep), the top 24 bits as a uniform.
fn keep_mask(shape: &[i64], p: f64, seed: u64, draw: u64, device: Device) -> Tensor {
    let numel: i64 = shape.iter().product();
    let key = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(draw.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let shr = |x: &Tensor, s: i64| x.bitwise_right_shift_tensor_scalar(s).bitwise_and((1i64 << (64 - s)) - 1);
    let mut x = Tensor::arange(numel, (Kind::Int64, device)) * (0x9E37_79B9_7F4A_7C15u64 as i64) + (key as i64);
    x = x.bitwise_xor_tensor(&shr(&x, 30)) * (0xBF58_476D_1CE4_E5B9u64 as i64);
    x = x.bitwise_xor_tensor(&shr(&x, 27)) * (0x94D0_49BB_1331_11EBu64 as i64);
    x = x.bitwise_xor_tensor(&shr(&x, 31));
    let uniform = shr(&x, 40).to_kind(Kind::Float) / (1u64 << 24) as f64;
    uniform.ge(p).view(shape)
}

/// How a model being loaded gets its adapters.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// Fresh adapters as the recipe's block says, drawn from libtorch's generator (seed
    /// it first); `seed` seeds their dropout.
    New { config: &'a LoraConfig, seed: u64 },
    /// The adapter saved in a directory (PEFT layout), trainable (to continue training
    /// it) or frozen.
    Saved { dir: &'a Path, trainable: bool },
}

/// Collects the adapters while a model is built: [`super::vars::Vars::adaptable_linear`]
/// asks it for an adapter for each linear layer, by path.
#[derive(Debug)]
pub struct Builder {
    config: LoraConfig,
    fresh: bool,
    store: nn::VarStore,
    shared: Arc<Shared>,
    modules: RefCell<Vec<String>>,
    /// Modules trained whole beside the adapters (PEFT's `modules_to_save`).
    whole: RefCell<Vec<String>>,
}

impl Builder {
    /// A builder for `request`, whose adapters live (in fp32) on `device`. A saved
    /// adapter's configuration is read and checked here.
    pub fn new(request: &Request, device: Device) -> Result<Self> {
        let (config, fresh, seed, draws) = match *request {
            Request::New { config, seed } => {
                config.validate()?;
                (config.clone(), true, seed, 0)
            }
            Request::Saved { dir, .. } => {
                let config = read_config(dir)?;
                let state: Option<Value> =
                    dir.join(STATE_FILE).is_file().then(|| read_json(&dir.join(STATE_FILE))).transpose()?;
                let number = |key: &str| state.as_ref().and_then(|s| s.get(key)).and_then(Value::as_u64).unwrap_or(0);
                (config, false, number("seed"), number("dropout_draws"))
            }
        };
        let store = nn::VarStore::new(device);
        let shared = Arc::new(Shared { enabled: AtomicBool::new(true), seed, draws: AtomicU64::new(draws) });
        Ok(Self { config, fresh, store, shared, modules: RefCell::new(Vec::new()), whole: RefCell::new(Vec::new()) })
    }

    /// A linear layer trained whole beside the adapters (see [`Builder::whole_module`]).
    pub fn whole_module_linear(&self, name: &str, in_dim: i64, out_dim: i64, config: nn::LinearConfig) -> nn::Linear {
        self.whole_module(name).linear(in_dim, out_dim, config)
    }

    /// Variables for a module trained whole beside the adapters (PEFT's `modules_to_save`,
    /// e.g. a reward model's fresh `score` head): they live with the adapters, train with
    /// them and are saved with them (PEFT's key: `base_model.model.score.weight`). Fresh
    /// for new adapters, else left for the saved adapter to fill.
    pub fn whole_module(&self, name: &str) -> super::vars::Vars<'_> {
        self.whole.borrow_mut().push(name.to_string());
        let path = self.store.root() / name;
        match self.fresh {
            true => super::vars::Vars::fresh(path),
            false => super::vars::Vars::uninit(path),
        }
    }

    /// The adapter of the linear layer at `path` (in → out), or None when the recipe
    /// does not name it.
    pub(crate) fn linear(&self, path: &[&str], base: nn::Linear, in_dim: i64, out_dim: i64) -> Linear {
        let name = path.join(".");
        if !self.config.target_modules.matches(&name) {
            return Linear::plain(base);
        }
        let r = self.config.rank;
        let vars = path.iter().fold(self.store.root(), |p, c| p.sub(*c));
        let (a, b) = if self.fresh {
            let bound = 1.0 / (in_dim as f64).sqrt(); // kaiming_uniform(a=√5)
            (
                (&vars / "lora_A").var("weight", &[r, in_dim], nn::Init::Uniform { lo: -bound, up: bound }),
                (&vars / "lora_B").var("weight", &[out_dim, r], nn::Init::Const(0.0)),
            )
        } else {
            let empty = |dims: &[i64]| Tensor::zeros(dims, (Kind::Float, self.store.device()));
            (
                (&vars / "lora_A").add("weight", empty(&[r, in_dim]), true),
                (&vars / "lora_B").add("weight", empty(&[out_dim, r]), true),
            )
        };
        self.modules.borrow_mut().push(name);
        let adapter =
            Adapter { a, b, scaling: self.config.scaling(), dropout: self.config.dropout, shared: self.shared.clone() };
        Linear { ws: base.ws, bs: base.bs, adapter: Some(adapter) }
    }

    /// The adapters of the model just built on `base` (the directory it was loaded
    /// from), with the saved weights read in when the request was for a saved adapter.
    /// An error when the recipe's `target_modules` matched no layer.
    pub fn finish(self, request: &Request, base: &Path, family: &str) -> Result<Adapters> {
        let modules = self.modules.into_inner();
        let whole = self.whole.into_inner();
        if modules.is_empty() {
            return Err(Error::config(
                "lora.target_modules",
                format!(
                    "{} matched no linear layer of the {family} model in {} (LoRA adapts the Llama family's \
                     q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj and lm_head)",
                    self.config.target_modules.describe(),
                    base.display()
                ),
            ));
        }
        let mut store = self.store;
        if let Request::Saved { dir, trainable } = *request {
            load_adapter_weights(&store, dir)?;
            if !trainable {
                store.freeze();
            }
        }
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        Ok(Adapters { store, shared: self.shared, config: self.config, modules, whole, base })
    }
}

/// The adapters of a model: their variables (what a stage trains), their configuration,
/// the layers they adapt, and the switch that turns them off.
pub struct Adapters {
    store: nn::VarStore,
    shared: Arc<Shared>,
    config: LoraConfig,
    modules: Vec<String>,
    /// Modules trained whole (PEFT's `modules_to_save`).
    whole: Vec<String>,
    base: PathBuf,
}

/// Adapters switched off while this lives (see [`Adapters::disabled`]).
#[must_use = "the adapters are on again when this is dropped"]
pub struct Disabled<'a> {
    shared: &'a Shared,
    was: bool,
}

impl Drop for Disabled<'_> {
    fn drop(&mut self) {
        self.shared.enabled.store(self.was, Ordering::Relaxed);
    }
}

impl Adapters {
    /// The adapters' variables (A and B of each adapted layer, fp32): hand these to the
    /// optimizer.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.store
    }

    /// Switches every adapter off until the guard is dropped: the model then computes
    /// exactly the base model's outputs (the reference of PPO, DPO and GRPO, with no
    /// second copy of the model).
    pub fn disabled(&self) -> Disabled<'_> {
        Disabled { shared: &self.shared, was: self.shared.enabled.swap(false, Ordering::Relaxed) }
    }

    /// Whether the adapters are on.
    pub fn enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapted layers' paths, in build order (`model.layers.0.self_attn.q_proj`).
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// The model the adapters were built on (absolute).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Trainable parameters of the adapters.
    pub fn num_parameters(&self) -> i64 {
        self.store.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// Writes the adapter in PEFT's layout into `dir` (which exists): `adapter_config.json`
    /// (`task_type` as given: `CAUSAL_LM`, `SEQ_CLS`) and `adapter_model.safetensors`, and
    /// plumb's dropout state.
    pub fn save(&self, dir: &Path, task_type: &str) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> =
            self.store.variables().into_iter().map(|(name, t)| (format!("{PEFT_PREFIX}{name}"), t)).collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        save_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
        // The names PEFT matches: each adapted layer's last path component.
        let names: BTreeSet<&str> = self.modules.iter().filter_map(|m| m.rsplit('.').next()).collect();
        let config = json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": self.base.display().to_string(),
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": names,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": if self.whole.is_empty() { Value::Null } else { json!(self.whole) },
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_rslora": false,
            "use_dora": false,
            "revision": null,
        });
        write_json(&dir.join(CONFIG_FILE), &config)?;
        let state = json!({ "seed": self.shared.seed, "dropout_draws": self.shared.draws.load(Ordering::Relaxed) });
        write_json(&dir.join(STATE_FILE), &state)
    }

    /// Adds each adapter's update into its layer's weight (W += (α/r)·B·A) in the base
    /// model's variables `base`, so the model computes the same without adapters.
    pub fn merge_into(&self, base: &nn::VarStore) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.store.variables().into_iter().collect();
        merge_tensors(base, &tensors, self.config.scaling(), &self.base)
    }
}

/// Whether `dir` holds an adapter (PEFT layout) rather than a model.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() && !dir.join("config.json").is_file()
}

/// The model directory under `dir` and the adapters on it, base-most first: `dir`
/// itself and no adapters for a model; for an adapter, its `base_model_name_or_path`
/// followed (relative paths from the working directory, else from the adapter's own
/// directory) until a model is reached.
pub fn chain(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let mut adapters = Vec::new();
    let mut current = dir.to_path_buf();
    while is_adapter(&current) {
        if adapters.len() >= 16 {
            return Err(Error::file(
                current.join(CONFIG_FILE),
                "base_model_name_or_path: a chain of more than 16 adapters (a loop?)",
            ));
        }
        let file = current.join(CONFIG_FILE);
        let config: Value = read_json(&file)?;
        let base = config.get("base_model_name_or_path").and_then(Value::as_str).ok_or_else(|| {
            Error::file(&file, "base_model_name_or_path: expected the directory of the model the adapter is for")
        })?;
        let base = PathBuf::from(base);
        let base = if base.is_dir() || base.is_absolute() { base } else { current.join(base) };
        if !base.is_dir() {
            return Err(Error::file(
                &file,
                format!(
                    "base_model_name_or_path: `{}` is not a directory (plumb loads base models from disk)",
                    base.display()
                ),
            ));
        }
        adapters.push(current);
        current = base;
    }
    adapters.reverse();
    Ok((current, adapters))
}

/// The LoRA configuration of the adapter saved in `dir`, checked: plumb reads plain LoRA
/// (no DoRA, no per-layer rank or alpha patterns, no layer subsets, no trained biases).
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let file = dir.join(CONFIG_FILE);
    let json: Value = read_json(&file)?;
    let bad = |key: &str, message: &str| Error::file(&file, format!("{key}: {message}"));
    let get = |key: &str| json.get(key).filter(|v| !v.is_null());
    if let Some(kind) = get("peft_type").and_then(Value::as_str) {
        if kind != "LORA" {
            return Err(bad("peft_type", &format!("expected LORA, found {kind}")));
        }
    }
    for (key, plain) in [("use_dora", json!(false)), ("bias", json!("none"))] {
        if get(key).is_some_and(|v| *v != plain) {
            return Err(bad(key, &format!("plumb reads adapters with {key} = {plain}")));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if get(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(bad(key, "per-layer ranks or alphas are not supported"));
        }
    }
    if get("layers_to_transform").is_some() {
        return Err(bad("layers_to_transform", "not supported; expected null"));
    }
    let rank = get("r").and_then(Value::as_i64).ok_or_else(|| bad("r", "expected a positive integer"))?;
    let alpha = get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| bad("lora_alpha", "expected a number"))?;
    let alpha = match get("use_rslora").and_then(Value::as_bool) {
        // rsLoRA scales by alpha/√r: the same as alpha' = alpha·√r over r.
        Some(true) => alpha * (rank as f64).sqrt(),
        _ => alpha,
    };
    let target_modules = match get("target_modules") {
        Some(Value::String(s)) if s == ALL_LINEAR => TargetModules::Keyword(s.clone()),
        Some(Value::Array(names)) => TargetModules::Names(
            names
                .iter()
                .map(|n| n.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("target_modules", "expected module names"))?,
        ),
        _ => {
            return Err(bad(
                "target_modules",
                "expected a list of module names or `all-linear` (regexes are not supported)",
            ))
        }
    };
    let config =
        LoraConfig { rank, alpha, dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0), target_modules };
    config.validate().map_err(|e| Error::file(&file, e.to_string()))?;
    Ok(config)
}

/// The tensors of `dir`'s adapter file, by their names in the model (PEFT's prefix off).
fn read_adapter_tensors(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = dir.join(WEIGHTS_FILE);
    checkpoint::training::load_tensors(&file)?
        .into_iter()
        .map(|(key, tensor)| match key.strip_prefix(PEFT_PREFIX) {
            Some(name) => Ok((name.to_string(), tensor)),
            None => Err(Error::file(&file, format!("tensor `{key}`: expected a name starting `{PEFT_PREFIX}`"))),
        })
        .collect()
}

/// Copies the adapter saved in `dir` into the adapter variables of `store`: every
/// variable must be in the file with its shape, and every tensor of the file must be one.
fn load_adapter_weights(store: &nn::VarStore, dir: &Path) -> Result<()> {
    let file = dir.join(WEIGHTS_FILE);
    let mut saved: HashMap<String, Tensor> = read_adapter_tensors(dir)?.into_iter().collect();
    let _no_grad = tch::no_grad_guard();
    let mut variables: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in variables {
        let tensor = saved
            .remove(&name)
            .ok_or_else(|| Error::file(&file, format!("tensor `{PEFT_PREFIX}{name}` is missing")))?;
        if tensor.size() != var.size() {
            return Err(Error::file(
                &file,
                format!(
                    "tensor `{PEFT_PREFIX}{name}` has shape {:?}, the model expects {:?}",
                    tensor.size(),
                    var.size()
                ),
            ));
        }
        var.f_copy_(&tensor)?;
    }
    let mut extra: Vec<String> = saved.into_keys().collect();
    extra.sort();
    match extra.first() {
        Some(name) => Err(Error::file(
            &file,
            format!("tensor `{PEFT_PREFIX}{name}` adapts no layer of the model (target_modules differ?)"),
        )),
        None => Ok(()),
    }
}

/// Merges the adapter saved in `dir` into the model variables `base`.
pub fn merge_saved(base: &nn::VarStore, dir: &Path) -> Result<()> {
    let config = read_config(dir)?;
    merge_tensors(base, &read_adapter_tensors(dir)?, config.scaling(), &dir.join(WEIGHTS_FILE))
}

/// W += scaling·B·A for each `<layer>.lora_A.weight` / `<layer>.lora_B.weight` pair of
/// `tensors`, into `<layer>.weight` of `base`; `source` names where they came from.
fn merge_tensors(base: &nn::VarStore, tensors: &[(String, Tensor)], scaling: f64, source: &Path) -> Result<()> {
    let variables = base.variables();
    let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let _no_grad = tch::no_grad_guard();
    for (name, a) in tensors {
        let Some(layer) = name.strip_suffix(".lora_A.weight") else {
            if name.ends_with(".lora_B.weight") {
                continue; // merged with its lora_A
            }
            // A module trained whole (modules_to_save): its weights replace the model's.
            let mut var = variables.get(name).map(Tensor::shallow_clone).ok_or_else(|| {
                Error::file(source, format!("tensor `{name}`: the model has no variable of that name"))
            })?;
            if var.size() != a.size() {
                return Err(Error::file(
                    source,
                    format!("tensor `{name}` has shape {:?}, the model {:?}", a.size(), var.size()),
                ));
            }
            var.f_copy_(a)?;
            continue;
        };
        let b = find(&format!("{layer}.lora_B.weight"))
            .ok_or_else(|| Error::file(source, format!("`{layer}.lora_B.weight` is missing beside its lora_A")))?;
        let mut weight = variables.get(&format!("{layer}.weight")).map(Tensor::shallow_clone).ok_or_else(|| {
            Error::file(source, format!("`{layer}`: the model has no layer of that name to merge into"))
        })?;
        let delta = b
            .to_device(weight.device())
            .to_kind(Kind::Float)
            .matmul(&a.to_device(weight.device()).to_kind(Kind::Float))
            * scaling; // (out, in)
        if delta.size() != weight.size() {
            return Err(Error::file(
                source,
                format!("`{layer}`: the adapter's update has shape {:?}, the weight {:?}", delta.size(), weight.size()),
            ));
        }
        let merged = weight.to_kind(Kind::Float) + delta;
        weight.f_copy_(&merged.to_kind(weight.kind()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_rows_agree_with_tensor_linear_and_the_rest_is_left_to_it() {
        let simd = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        tch::manual_seed(0);
        let _no_grad = tch::no_grad_guard();
        // 637 weight rows (not a multiple of the kernel's block of 4), 130 inputs (not a
        // multiple of 8), one to four rows, with and without a bias, 2-D and 3-D.
        let weight = Tensor::randn([637, 130], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([637], (Kind::Float, Device::Cpu));
        for shape in [vec![1, 130], vec![3, 130], vec![4, 1, 130], vec![2, 2, 130]] {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            for b in [None, Some(&bias)] {
                let got = rows_linear(&x, &weight, b);
                assert_eq!(got.is_some(), simd, "{shape:?}: taken where the CPU has AVX2 and FMA");
                let Some(got) = got else { continue };
                let want = x.linear(&weight, b);
                assert_eq!(got.size(), want.size());
                let diff = (&got - &want).abs().max().double_value(&[]);
                assert!(diff <= 1e-4, "{shape:?}: differs from Tensor::linear by {diff}");
            }
        }
        // Five rows, a non-contiguous input, and fp64 are left to Tensor::linear.
        let five = Tensor::randn([5, 130], (Kind::Float, Device::Cpu));
        assert!(rows_linear(&five, &weight, None).is_none());
        let strided = Tensor::randn([130, 2], (Kind::Float, Device::Cpu)).tr();
        assert!(rows_linear(&strided, &weight, None).is_none());
        let double = Tensor::randn([1, 130], (Kind::Double, Device::Cpu));
        assert!(rows_linear(&double, &weight.to_kind(Kind::Double), None).is_none());
    }

    #[test]
    fn the_shims_parallel_loops_run_on_libtorchs_threads() {
        // Built without libtorch's OpenMP, ATen's parallel_for (a header template) runs
        // every range on the calling thread: the few-rows kernel lost its second core so.
        let before = tch::get_num_threads();
        tch::set_num_threads(2);
        // SAFETY: no pointers cross; the shim only runs a parallel loop.
        let seen = unsafe { shim::plumb_shim_parallel_threads(64) };
        tch::set_num_threads(before);
        assert_eq!(seen, 2, "the shim's parallel_for ran on {seen} of 2 intra-op threads");
    }

    #[test]
    fn few_rows_that_want_gradients_get_them_from_tensor_linear() {
        let weight = Tensor::randn([8, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([1, 16], (Kind::Float, Device::Cpu));
        assert!(rows_linear(&x, &weight, None).is_none());
        linear(&x, &weight, None).sum(Kind::Float).backward();
        let expected = x.expand([8, 16], false);
        assert!(weight.grad().allclose(&expected, 1e-6, 1e-6, false));
    }

    #[test]
    fn targets_match_as_peft_matches_them() {
        let names = TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]);
        assert!(names.matches("model.layers.0.self_attn.q_proj"));
        assert!(!names.matches("model.layers.0.self_attn.k_proj"));
        assert!(!names.matches("model.layers.0.self_attn.xq_proj"));
        let all = TargetModules::Keyword(ALL_LINEAR.into());
        assert!(all.matches("model.layers.1.mlp.down_proj"));
        assert!(!all.matches("lm_head"));
    }

    #[test]
    fn bad_blocks_are_named_at_their_key() {
        let parse =
            |yaml: &str| serde_yaml::from_str::<LoraConfig>(yaml).unwrap().validate().err().unwrap().to_string();
        assert_eq!(parse("rank: 0"), "lora.rank: expected a positive rank, found 0");
        assert_eq!(parse("dropout: 1.0"), "lora.dropout: expected a value in [0, 1), found 1");
        assert_eq!(
            parse("target_modules: all_linear"),
            "lora.target_modules: expected a list of module names or `all-linear`, found `all_linear`"
        );
        assert!(parse("target_modules: []").starts_with("lora.target_modules: expected at least one"));
        let ok: LoraConfig = serde_yaml::from_str("{rank: 4, alpha: 16, target_modules: all-linear}").unwrap();
        assert!(ok.validate().is_ok());
        assert_eq!(ok.scaling(), 4.0);
        assert!(serde_yaml::from_str::<LoraConfig>("ranks: 4").is_err());
    }

    use crate::model::llama::LlamaForCausalLm;
    use crate::model::{self, Policy};
    use crate::optim::{AdamW, AdamWConfig, Optimizer};

    /// A tiny Llama saved in a temporary directory.
    fn tiny_llama() -> tempfile::TempDir {
        tch::manual_seed(0);
        let config = serde_json::from_value(json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        LlamaForCausalLm::new(config, Device::Cpu).unwrap().save(dir.path()).unwrap();
        dir
    }

    fn ids() -> Tensor {
        Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]).view([2, 6])
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Random B matrices (a fresh adapter's B is zero, which would hide every mistake).
    fn perturb(policy: &dyn Policy) {
        let _no_grad = tch::no_grad_guard();
        for (name, mut var) in policy.trainable().variables() {
            if name.ends_with("lora_B.weight") {
                var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.5));
            }
        }
    }

    #[test]
    fn adapters_train_alone_and_switched_off_give_the_base_models_logits() {
        let dir = tiny_llama();
        let base = model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
        let config =
            LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, target_modules: TargetModules::Keyword(ALL_LINEAR.into()) };
        tch::manual_seed(1);
        let policy =
            model::load_with(dir.path(), Device::Cpu, Kind::Float, Some(&Request::New { config: &config, seed: 7 }))
                .unwrap();
        let lora = policy.lora().unwrap();
        // 2 layers × 7 linear layers; lm_head left alone.
        assert_eq!(lora.modules().len(), 14);
        assert!(lora.modules().iter().all(|m| m != "lm_head"));
        // Fresh adapters change nothing (B = 0).
        let expected = base.logits(&ids(), None).unwrap();
        assert_eq!(max_abs(&policy.logits(&ids(), None).unwrap(), &expected), 0.0);
        perturb(policy.as_ref());
        let adapted = policy.logits(&ids(), None).unwrap();
        assert!(max_abs(&adapted, &expected) > 1e-3);
        {
            let _off = lora.disabled();
            assert!(!lora.enabled());
            assert_eq!(max_abs(&policy.logits(&ids(), None).unwrap(), &expected), 0.0, "adapters off = the base model");
        }
        assert!(lora.enabled());

        // Only A and B get gradients and optimizer state.
        let mut optimizer = AdamW::new(policy.trainable(), AdamWConfig::default());
        let trained: i64 = optimizer.parameters().iter().map(|t| t.numel() as i64).sum();
        assert_eq!(trained, policy.num_parameters());
        // Per layer r·(in + out): q (16→16), k and v (16→8), o (16→16), gate and up (16→24), down (24→16).
        let per_layer = 4 * ((16 + 16) + 2 * (16 + 8) + (16 + 16) + 2 * (16 + 24) + (24 + 16));
        assert_eq!(trained, 2 * per_layer);
        let loss = policy.logits(&ids(), None).unwrap().logsumexp([-1], false).mean(Kind::Float);
        loss.backward();
        for (name, var) in policy.var_store().variables() {
            assert!(!var.requires_grad() && !var.grad().defined(), "{name}: the base is frozen");
        }
        assert!(optimizer.parameters().iter().all(|p| p.grad().defined()));
        optimizer.step().unwrap();
        assert_eq!(optimizer.state().len(), 1 + 2 * 2 * 14, "step + two moments per A and B");

        // Dropout applies only while recording gradients: evaluations are deterministic.
        let a = tch::no_grad(|| policy.logits(&ids(), None).unwrap());
        let b = tch::no_grad(|| policy.logits(&ids(), None).unwrap());
        assert_eq!(max_abs(&a, &b), 0.0);
        let c = policy.logits(&ids(), None).unwrap().detach();
        assert!(max_abs(&a, &c) > 0.0, "dropout changes a training pass");
    }

    #[test]
    fn a_saved_adapter_loads_back_and_merges_into_the_same_logits() {
        let dir = tiny_llama();
        let config = LoraConfig { rank: 2, alpha: 6.0, dropout: 0.0, target_modules: TargetModules::default() };
        let request = Request::New { config: &config, seed: 0 };
        let policy = model::load_with(dir.path(), Device::Cpu, Kind::Float, Some(&request)).unwrap();
        perturb(policy.as_ref());
        let expected = policy.logits(&ids(), None).unwrap();
        let saved = tempfile::tempdir().unwrap();
        policy.save(saved.path()).unwrap();
        assert!(is_adapter(saved.path()));
        let tensors = checkpoint::training::load_tensors(&saved.path().join(WEIGHTS_FILE)).unwrap();
        let names: Vec<String> = tensors.into_iter().map(|(n, _)| n).collect();
        assert!(
            names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()),
            "{names:?}"
        );
        assert_eq!(names.len(), 2 * 2 * 2);
        let peft: Value = read_json(&saved.path().join(CONFIG_FILE)).unwrap();
        assert_eq!(peft["target_modules"], json!(["q_proj", "v_proj"]));
        assert_eq!((peft["r"].as_i64(), peft["lora_alpha"].as_f64()), (Some(2), Some(6.0)));

        // Back as adapters (to resume), frozen or not.
        let request = Request::Saved { dir: saved.path(), trainable: false };
        let again = model::load_with(dir.path(), Device::Cpu, Kind::Float, Some(&request)).unwrap();
        assert_eq!(max_abs(&again.logits(&ids(), None).unwrap(), &expected), 0.0);
        assert_eq!(AdamW::new(again.trainable(), AdamWConfig::default()).parameters().len(), 0);
        // Merged, by loading the adapter directory as a model.
        let merged = model::load(saved.path(), Device::Cpu, Kind::Float).unwrap();
        assert!(merged.lora().is_none());
        assert!(max_abs(&merged.logits(&ids(), None).unwrap(), &expected) < 1e-5);
        // And saved merged: a plain checkpoint.
        let plain = tempfile::tempdir().unwrap();
        policy.save_merged(plain.path()).unwrap();
        let reloaded = model::load(plain.path(), Device::Cpu, Kind::Float).unwrap();
        assert!(max_abs(&reloaded.logits(&ids(), None).unwrap(), &expected) < 1e-5);
        // An adapter whose layers the model lacks is refused, naming the tensor.
        let request = Request::Saved { dir: saved.path(), trainable: true };
        let mut json = peft.clone();
        json["target_modules"] = json!(["k_proj"]);
        write_json(&saved.path().join(CONFIG_FILE), &json).unwrap();
        let message = model::load_with(dir.path(), Device::Cpu, Kind::Float, Some(&request)).err().unwrap().to_string();
        assert!(
            message.contains("tensor `base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight` is missing"),
            "{message}"
        );
        // Targets that match nothing are named.
        let none = LoraConfig { target_modules: TargetModules::Names(vec!["c_attn".into()]), ..config };
        let request = Request::New { config: &none, seed: 0 };
        let message = model::load_with(dir.path(), Device::Cpu, Kind::Float, Some(&request)).err().unwrap().to_string();
        assert!(
            message.starts_with("lora.target_modules: [c_attn] matched no linear layer of the Llama model"),
            "{message}"
        );
    }

    #[test]
    fn a_scalar_head_model_trains_adapters_and_its_head_and_resumes_or_merges_to_the_same_scores() {
        use crate::model::scalar_head::ScalarHeadModel;
        let dir = tiny_llama();
        let config = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.0, target_modules: TargetModules::default() };
        tch::manual_seed(2);
        let model =
            ScalarHeadModel::for_training(dir.path(), None, Device::Cpu, Kind::Float, Some(&config), 0).unwrap();
        let trainable: Vec<String> = {
            let mut names: Vec<String> = model.trainable().variables().into_keys().collect();
            names.sort();
            names
        };
        assert_eq!(trainable.len(), 2 * 2 * 2 + 1, "{trainable:?}");
        assert!(trainable.contains(&"score.weight".to_string()));
        assert!(model.var_store().variables().values().all(|v| !v.requires_grad()), "the backbone is frozen");
        {
            let _no_grad = tch::no_grad_guard();
            for (name, mut var) in model.trainable().variables() {
                if name.ends_with("lora_B.weight") {
                    var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.5));
                }
            }
        }
        let mask = ids().ones_like();
        let scores = model.scores(&ids(), &mask).unwrap();

        let saved = tempfile::tempdir().unwrap();
        model.save(saved.path(), 0).unwrap();
        let peft: Value = read_json(&saved.path().join(CONFIG_FILE)).unwrap();
        assert_eq!((&peft["task_type"], &peft["modules_to_save"]), (&json!("SEQ_CLS"), &json!(["score"])));
        let resumed =
            ScalarHeadModel::for_training(dir.path(), Some(saved.path()), Device::Cpu, Kind::Float, Some(&config), 0)
                .unwrap();
        assert_eq!(max_abs(&resumed.scores(&ids(), &mask).unwrap(), &scores), 0.0);
        let merged = tempfile::tempdir().unwrap();
        model.save_merged(merged.path(), 0).unwrap();
        let plain = ScalarHeadModel::from_dir(merged.path(), Device::Cpu, Kind::Float).unwrap();
        assert!(plain.lora().is_none());
        assert!(max_abs(&plain.scores(&ids(), &mask).unwrap(), &scores) < 1e-5);
    }

    #[test]
    fn dropout_masks_are_a_function_of_seed_and_draw() {
        let mask = |seed, draw| keep_mask(&[64, 64], 0.25, seed, draw, Device::Cpu);
        assert!(mask(1, 0).equal(&mask(1, 0)));
        assert!(!mask(1, 0).equal(&mask(1, 1)));
        assert!(!mask(1, 0).equal(&mask(2, 0)));
        let kept = mask(3, 5).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((kept - 0.75).abs() < 0.03, "{kept}");
    }
}

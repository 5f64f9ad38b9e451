//! What every training stage shares, so each stage's file holds only its own loop: the
//! `optimizer`, `schedule`, `checkpoint` and `on_nonfinite` sections of a recipe, the
//! non-finite guard, the `train/*` scalars, resumable checkpoints and the final save.
pub mod precision;

/// Defaults of the fields every training stage's section has, for `#[serde(default = ...)]`.
pub mod defaults {
    pub fn batch_size() -> usize {
        16
    }
    pub fn grad_clip() -> f64 {
        1.0
    }
    pub fn log_every() -> u64 {
        10
    }
    pub fn eval_every() -> u64 {
        100
    }
}

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::training::{load_tensors, Checkpoints};
use crate::checkpoint::{read_json, save_safetensors, write_dir_atomically, write_json};
use crate::data::stream::StreamState;
use crate::data::{self, BatchOrder};
use crate::error::{Error, Result};
use crate::model::SaveHf;
use crate::optim::schedule::Decay;
use crate::optim::{AdamW, AdamWConfig, Optimizer, Schedule};
use crate::tokenizer::Tokenizer;
use crate::{Policy, RunContext};
pub use precision::Precision;

/// An error at `key` unless `ok`: the shape of every check in a stage's `validate`.
pub fn require(ok: bool, key: &str, message: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::config(key, message))
    }
}

/// Moves a config error of a nested section under `prefix` (`model` + `hidden_size`
/// → `model.hidden_size`), so the recipe error points at the right line.
pub fn nested(prefix: &str, error: Error) -> Error {
    match error {
        Error::Config(mut section) => {
            section.path = format!("{prefix}.{}", section.path);
            Error::Config(section)
        }
        other => other,
    }
}

/// The `optimizer:` section: AdamW with decoupled weight decay on matrices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay on matrices (not on norms, biases or embeddings).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self { lr: default_lr(), betas: default_betas(), eps: default_eps(), weight_decay: default_weight_decay() }
    }
}

impl OptimizerConfig {
    /// Checks under `optimizer.`.
    pub fn validate(&self) -> Result<()> {
        require(self.lr > 0.0 && self.lr.is_finite(), "optimizer.lr", "expected a positive learning rate")?;
        require(self.betas.iter().all(|b| (0.0..1.0).contains(b)), "optimizer.betas", "expected two values in [0, 1)")?;
        require(self.eps > 0.0, "optimizer.eps", "expected a positive value")?;
        require(self.weight_decay >= 0.0, "optimizer.weight_decay", "expected a non-negative value")
    }

    pub fn adamw(&self, vs: &nn::VarStore) -> AdamW {
        AdamW::new(
            vs,
            AdamWConfig {
                lr: self.lr,
                betas: (self.betas[0], self.betas[1]),
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
        )
    }
}

/// The `schedule:` section: linear warmup, then a decay to a floor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_decay")]
    pub decay: Decay,
    /// The floor of the decay, as a fraction of the peak learning rate.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { warmup_steps: 0, decay: default_decay(), min_lr_ratio: default_min_lr_ratio() }
    }
}

impl ScheduleConfig {
    /// Checks under `schedule.` for a run of `max_steps`.
    pub fn validate(&self, max_steps: u64) -> Result<()> {
        require((0.0..=1.0).contains(&self.min_lr_ratio), "schedule.min_lr_ratio", "expected a value in [0, 1]")?;
        require(self.warmup_steps <= max_steps, "schedule.warmup_steps", "expected at most max_steps")
    }

    pub fn schedule(&self, peak_lr: f64, total_steps: u64) -> Schedule {
        Schedule {
            peak_lr,
            warmup_steps: self.warmup_steps,
            total_steps,
            decay: self.decay,
            min_lr_ratio: self.min_lr_ratio,
        }
    }
}

/// The `checkpoint:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save a resumable checkpoint every this many steps (and on Ctrl-C); 0 = never.
    #[serde(default = "default_checkpoint_every")]
    pub every: u64,
    /// Keep this many of the newest checkpoints.
    #[serde(default = "default_checkpoint_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: default_checkpoint_every(), keep: default_checkpoint_keep() }
    }
}

/// `batch_size_warmup:`: the batch grows linearly from `start` sequences to the full
/// batch size over the first `steps` optimizer steps, in whole micro-batches, as large
/// LLM runs ramp their batch while the loss falls fastest.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSizeWarmup {
    pub start: usize,
    pub steps: u64,
}

impl BatchSizeWarmup {
    /// Checks under `batch_size_warmup.` against the full `batch_size` and `micro` batch.
    pub fn validate(&self, batch_size: usize, micro: usize) -> Result<()> {
        require(
            self.start >= 1 && self.start <= batch_size,
            "batch_size_warmup.start",
            "expected a value from 1 to batch_size",
        )?;
        require(self.start % micro == 0, "batch_size_warmup.start", "expected a multiple of micro_batch_size")?;
        require(self.steps > 0, "batch_size_warmup.steps", "expected at least 1")
    }

    /// Sequences in optimizer step `step` (0-based): `start + (full - start) * step / steps`,
    /// rounded down to a multiple of `micro`, reaching `full` at `steps`.
    pub fn batch_size(&self, step: u64, full: usize, micro: usize) -> usize {
        if step >= self.steps {
            return full;
        }
        let grown = self.start + ((full - self.start) as u128 * step as u128 / self.steps as u128) as usize;
        (grown / micro * micro).clamp(self.start, full)
    }
}

/// What a non-finite loss or gradient does (`on_nonfinite:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop the run with an error naming the step.
    #[default]
    Stop,
    /// Skip the step (no update), count it, and go on.
    Skip,
}

impl OnNonFinite {
    /// After step `step` (1-based) computed `loss` and `grad_norm`: `Ok(true)` to apply
    /// the update, `Ok(false)` to skip it (counted in `state.skipped`), or the error that
    /// stops the run.
    pub fn check(self, ctx: &RunContext, state: &mut TrainerState, loss: f64, grad_norm: f64) -> Result<bool> {
        if loss.is_finite() && grad_norm.is_finite() {
            return Ok(true);
        }
        let what = format!("step {}: the loss is {loss} and the gradient norm {grad_norm}", state.step);
        match self {
            OnNonFinite::Stop => {
                Err(Error::Other(format!("{what}; stopping (set on_nonfinite: skip to skip such steps)")))
            }
            OnNonFinite::Skip => {
                state.skipped += 1;
                tracing::warn!("{what}; skipping the update ({} skipped so far)", state.skipped);
                ctx.scalar("train/skipped_steps", state.step as i64, state.skipped as f64);
                Ok(false)
            }
        }
    }
}

/// Named statistics of one training step.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    /// Sequences in the step.
    pub batch_size: usize,
}

impl StepStats {
    /// The one place training statistics become TensorBoard tags.
    pub fn log(&self, ctx: &RunContext, step: u64) {
        let step = step as i64;
        ctx.scalar("train/loss", step, self.loss);
        ctx.scalar("train/perplexity", step, self.loss.exp());
        ctx.scalar("train/learning_rate", step, self.learning_rate);
        ctx.scalar("train/grad_norm", step, self.grad_norm);
        ctx.scalar("train/tokens_per_second", step, self.tokens_per_second);
        ctx.scalar("train/batch_size", step, self.batch_size as f64);
    }
}

/// How far training is: steps, skipped steps and tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken (skipped ones included).
    pub step: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped: u64,
    /// Tokens trained on so far (skipped steps included).
    #[serde(default)]
    pub tokens: u64,
}

/// Where the data is, at the next batch: an order over a fixed set of batches or rows,
/// or a position in a stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataPosition {
    Batches(BatchOrder),
    Stream(Box<StreamState>),
}

/// `trainer_state.json`: the trainer state and the data position, enough (beside the
/// model and optimizer) to continue exactly.
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(flatten)]
    state: TrainerState,
    data: DataPosition,
}

const TRAINER_STATE: &str = "trainer_state.json";
const OPTIMIZER_STATE: &str = "optimizer.safetensors";

/// A resumable checkpoint of step `state.step`: the model and tokenizer in HF layout,
/// the optimizer's state, the trainer state and the data position, written atomically.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint(
    checkpoints: &Checkpoints,
    state: &TrainerState,
    data: DataPosition,
    model: &(impl SaveHf + ?Sized),
    tokenizer: &Tokenizer,
    optimizer: &AdamW,
    max_length: usize,
) -> Result<PathBuf> {
    checkpoints.save(state.step, |dir| {
        write_model(dir, model, tokenizer, max_length)?;
        save_safetensors(&dir.join(OPTIMIZER_STATE), &optimizer.state())?;
        let json =
            serde_json::to_value(Saved { state: state.clone(), data }).map_err(|e| Error::Other(e.to_string()))?;
        write_json(&dir.join(TRAINER_STATE), &json)
    })
}

/// Restores the optimizer from checkpoint `dir` and returns its trainer state and data position.
pub fn load_checkpoint(dir: &Path, optimizer: &mut AdamW) -> Result<(TrainerState, DataPosition)> {
    optimizer.load_state(&load_tensors(&dir.join(OPTIMIZER_STATE))?)?;
    let saved: Saved = read_json(&dir.join(TRAINER_STATE))?;
    Ok((saved.state, saved.data))
}

/// Where a stage starts: its latest checkpoint when resuming, else nothing (a fresh
/// run removes the checkpoints of an earlier one, so they cannot be mistaken for its own).
pub fn resume_point(ctx: &RunContext, checkpoints: &Checkpoints) -> Result<Option<(u64, PathBuf)>> {
    if ctx.resume() {
        let latest = checkpoints.latest()?;
        if let Some((step, dir)) = &latest {
            tracing::info!("resuming from step {step}: {}", dir.display());
        }
        return Ok(latest);
    }
    if checkpoints.latest()?.is_some() {
        tracing::warn!("starting over: removing the checkpoints of an earlier run (use --resume to continue one)");
        checkpoints.clear()?;
    }
    Ok(None)
}

/// The model and its tokenizer in HF layout, written atomically to `dir`.
pub fn save_model(dir: &Path, model: &(impl SaveHf + ?Sized), tokenizer: &Tokenizer, max_length: usize) -> Result<()> {
    write_dir_atomically(dir, |staging| write_model(staging, model, tokenizer, max_length))
}

/// The model and its tokenizer in HF layout, into an existing directory.
pub fn write_model(dir: &Path, model: &(impl SaveHf + ?Sized), tokenizer: &Tokenizer, max_length: usize) -> Result<()> {
    model.save_hf(dir)?;
    tokenizer.save(dir, max_length)
}

/// Runs forward (in `precision`) and backward over `rows` in micro-batches of `micro`,
/// accumulating the gradients of the mean loss over all rows; returns that mean loss.
pub fn accumulate_gradients(
    policy: &(impl Policy + ?Sized),
    data: &Tensor,
    rows: &[i64],
    micro: usize,
    device: Device,
    precision: Precision,
) -> Result<f64> {
    let mut loss_sum = 0.0;
    for chunk in rows.chunks(micro.max(1)) {
        let (inputs, targets) = data::causal_batch(data, chunk, device);
        let loss = precision.forward(device, || next_token_loss(policy, &inputs, &targets))??;
        (&loss * (chunk.len() as f64 / rows.len() as f64)).backward();
        loss_sum += loss.double_value(&[]) * chunk.len() as f64;
    }
    Ok(loss_sum / rows.len() as f64)
}

/// Mean cross-entropy of predicting `targets` (B, T) from `inputs` (B, T).
pub fn next_token_loss(policy: &(impl Policy + ?Sized), inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = policy.logits(inputs, None)?; // (B, T, V)
    let vocab = logits.size()[2];
    Ok(logits.view([-1, vocab]).to_kind(Kind::Float).cross_entropy_for_logits(&targets.reshape([-1])))
}

fn default_lr() -> f64 {
    1e-3
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_decay() -> Decay {
    Decay::Cosine
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_checkpoint_keep() -> usize {
    2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{LlamaConfig, LlamaForCausalLm};

    #[test]
    fn the_batch_grows_linearly_in_whole_micro_batches() {
        let warmup = BatchSizeWarmup { start: 4, steps: 10 };
        let sizes: Vec<usize> = (0..12).map(|s| warmup.batch_size(s, 32, 4)).collect();
        // 4 + 28 * s / 10, rounded down to a multiple of 4.
        assert_eq!(sizes, [4, 4, 8, 12, 12, 16, 20, 20, 24, 28, 32, 32]);
        assert!(warmup.validate(32, 4).is_ok());
        assert!(BatchSizeWarmup { start: 6, steps: 10 }.validate(32, 4).is_err());
        assert!(BatchSizeWarmup { start: 64, steps: 10 }.validate(32, 4).is_err());
    }

    fn grads(micro: usize) -> (f64, Vec<Tensor>) {
        tch::manual_seed(0);
        let hf: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16
        }))
        .unwrap();
        let policy = LlamaForCausalLm::new(hf, Device::Cpu).unwrap();
        let data = Tensor::arange(8 * 9, (Kind::Int64, Device::Cpu)).remainder(40).view([8, 9]);
        let mut optimizer = AdamW::new(policy.var_store(), AdamWConfig::default());
        optimizer.zero_grad();
        let rows = [0, 1, 2, 3, 4, 5, 6, 7];
        let loss = accumulate_gradients(&policy, &data, &rows, micro, Device::Cpu, Precision::Fp32).unwrap();
        (loss, optimizer.parameters().iter().map(|p| p.grad().copy()).collect())
    }

    #[test]
    fn accumulating_micro_batches_equals_one_large_batch() {
        let (loss, whole) = grads(8);
        for micro in [1, 2, 4] {
            let (accumulated_loss, accumulated) = grads(micro);
            assert!((loss - accumulated_loss).abs() < 1e-6, "micro {micro}: loss {loss} vs {accumulated_loss}");
            for (a, b) in whole.iter().zip(&accumulated) {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "micro {micro}: gradient differs by {diff}");
            }
        }
    }
}

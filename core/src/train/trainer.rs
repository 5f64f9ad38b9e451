//! [`Trainer`]: the parts of a training loop every stage has, as plain calls a stage's
//! own loop makes in order — not a framework that calls the stage.
//!
//! ```ignore
//! let mut trainer = Trainer::new(ctx, &train, max_steps)?;
//! let model = load(trainer.resume_dir().unwrap_or(&input_dir))?;
//! let mut optimizer = train.optimizer.adamw(model.var_store());
//! let data = trainer.restore(&mut [&mut optimizer])?;        // step, optimizer, data position
//! while trainer.running() {
//!     if trainer.stop_requested() {
//!         return Err(trainer.stop(trainer.save_checkpoint(&parts, &tokenizer, max_len, data)?));
//!     }
//!     trainer.start_step(&mut [&mut optimizer]);               // learning rate, zero_grad
//!     for (i, micro_batch) in micro_batches.iter().enumerate() {
//!         trainer.backward(&micro_loss(micro_batch), i + 1 == micro_batches.len())?;
//!     }
//!     if !trainer.finish_step(&mut [&mut optimizer], loss, tokens, batch_size)? {
//!         continue;                                            // skipped: non-finite
//!     }
//!     if trainer.eval_due() { trainer.untimed(|| evaluate())?; }
//!     if trainer.checkpoint_due() { trainer.save_checkpoint(...)?; }
//! }
//! trainer.save_final(&model, &tokenizer, max_len)?;
//! ```
//!
//! In a distributed run (`plumb run --nproc N`, torchrun) the same loop is data-parallel:
//! [`Trainer::restore`] gives every rank rank 0's parameters, each rank computes the
//! gradients of its share of the global batch ([`Trainer::shard`]), the gradients are averaged
//! over the ranks in buckets before clipping (so every rank takes the same step), each
//! bucket's all-reduce starting during the backward [`Trainer::backward`] marks the last and
//! ending in [`Trainer::finish_step`] or [`Trainer::update`], which also report the global
//! loss, tokens and batch; the ranks agree on stopping, and rank 0 alone writes checkpoints
//! and the final model (the host makes the ranks meet at the end of the stage, and only
//! rank 0 logs).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::config::{OnNonFinite, TrainingConfig};
use crate::checkpoint::training::{load_tensors, remove_leftovers_of, Checkpoints};
use crate::checkpoint::{read_json, save_safetensors, write_dir_atomically, write_json};
use crate::data::stream::StreamState;
use crate::data::BatchOrder;
use crate::dist::{data_parallel, GradientSync, ProcessGroup};
use crate::error::{Error, Result};
use crate::model::{recompute, SaveHf};
use crate::optim::{clip_grad_norm, AdamW, Optimizer, Schedule};
use crate::plugin::Metrics;
use crate::tokenizer::Tokenizer;
use crate::RunContext;

/// Test-only fault injection: the loss of this step (1-based) reads as NaN, to exercise
/// the non-finite guard end to end. Not part of any recipe.
pub const FAULT_NONFINITE_AT_STEP: &str = "PLUMB_FAULT_NONFINITE_AT_STEP";

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
    /// The loss of the latest applied step.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Figures of the run's start (e.g. `eval/initial_loss`), kept so that a resumed run
    /// reports the run's own and not their values at the resume point; see
    /// [`Trainer::at_start`].
    #[serde(default)]
    pub at_start: std::collections::BTreeMap<String, f64>,
}

/// Where the data is, at the next batch: an order over a fixed set of batches or rows,
/// or a position in a stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // one a run, held beside the trainer: its size costs nothing
pub enum DataPosition {
    Batches(BatchOrder),
    Stream(Box<StreamState>),
}

/// One model a checkpoint holds, with its optimizer. The first of a checkpoint's models
/// lies at the top of the checkpoint directory (HF layout, so the checkpoint loads as a
/// model); each further one in a folder of its `name` (a PPO value model beside the
/// policy, say).
pub struct Trained<'a> {
    pub name: &'a str,
    pub model: &'a dyn SaveHf,
    pub optimizer: &'a AdamW,
}

/// `trainer_state.json`: the trainer state and the data position, enough (beside the
/// models and optimizers) to continue exactly, and the recipe they were made under.
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(flatten)]
    state: TrainerState,
    data: DataPosition,
    /// Absent in checkpoints older than the record.
    #[serde(default)]
    recipe: Option<RecipeRecord>,
    /// What else a stage needs to continue exactly (a KL controller, a generator's
    /// state), as the stage serialised it; absent when it keeps nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stage_state: Option<serde_json::Value>,
}

/// The resolved recipe a checkpoint was made under: the stage's own section, the run's
/// seed and the stage's input model. A resume compares it with its own (see
/// [`recipe_changes`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecipeRecord {
    /// The stage's section, as YAML.
    config: String,
    seed: u64,
    /// The stage's `model:` or the previous stage's output (a stage may read its tokenizer
    /// or template there even when it resumes).
    #[serde(default)]
    input_model: Option<PathBuf>,
}

/// Keys of a training stage's section that a resumed run may change without leaving the
/// trajectory of the run it continues: its length, how often it logs, evaluates and
/// checkpoints, what its evaluations show, and what a non-finite step does from now on.
/// Every other key (model, data, sequence length, objective, optimizer, schedule, batch,
/// precision, ...) and the seed must match the checkpoint's.
const SAFE_TO_CHANGE: [&str; 9] = [
    "max_steps",
    "epochs",
    "log_every",
    "eval",
    "checkpoint.every",
    "checkpoint.keep",
    "on_nonfinite",
    "activation_checkpointing",
    // A sharded run saves the whole optimizer state, and takes the same steps.
    "optimizer.zero_stage",
];

const TRAINER_STATE: &str = "trainer_state.json";
const OPTIMIZER_STATE: &str = "optimizer.safetensors";

/// The shared parts of one stage's training loop; see the module docs for the shape of
/// a loop that uses it.
pub struct Trainer<'a, 'h> {
    ctx: &'a RunContext<'h>,
    config: &'a TrainingConfig,
    checkpoints: Checkpoints,
    schedule: Schedule,
    resume_dir: Option<PathBuf>,
    /// What the checkpoint of `resume_dir` holds beside models and optimizers, until
    /// [`Trainer::restore`] takes it.
    resumed: Option<Saved>,
    /// This run's recipe, recorded in each checkpoint.
    recipe: RecipeRecord,
    max_steps: u64,
    started: Instant,
    /// Throughput since the last `train/*` log, evaluations excluded.
    window: (Instant, u64),
    fault_nonfinite_at: Option<u64>,
    /// The stage's own state from the checkpoint resumed, once [`Trainer::restore`] read it.
    stage_state: Option<serde_json::Value>,
    pub state: TrainerState,
    /// The latest applied step's statistics.
    pub last: StepStats,
    /// The recipe's `activation_checkpointing`, on for this thread while the stage trains.
    _activation_checkpointing: recompute::Enabled,
    /// [`recompute::recomputed_blocks`] when the stage began.
    recomputed_before: u64,
    /// The stage's process group in a distributed run.
    group: Option<ProcessGroup>,
    /// Bytes of optimizer state this rank holds, once [`Trainer::restore`] saw the optimizers.
    optimizer_state_bytes: Option<usize>,
    /// The error of the ranks' stop agreement when a peer failed: the run stops (saving
    /// its checkpoint) and [`Trainer::stop`] returns it instead of a stop on request.
    peer_failure: std::cell::RefCell<Option<crate::dist::DistError>>,
    /// In a distributed run, once [`Trainer::restore`] saw the optimizers: the gradients'
    /// all-reduce, overlapped with the backward that [`Trainer::backward`] marks the last.
    gradient_sync: Option<GradientSync>,
}

impl<'a, 'h> Trainer<'a, 'h> {
    /// A trainer for `max_steps` steps. When the run resumes, it picks the stage's newest
    /// intact checkpoint (warning of any newer damaged one), and refuses it when this run's
    /// recipe would leave its trajectory (see [`SAFE_TO_CHANGE`]) or when `max_steps` is
    /// below its step; a fresh run removes the checkpoints of an earlier one, so they
    /// cannot be mistaken for its own. Either way, what a save killed midway left behind
    /// is removed.
    pub fn new(ctx: &'a RunContext<'h>, config: &'a TrainingConfig, max_steps: u64) -> Result<Self> {
        let checkpoints = Checkpoints::new(ctx.stage_dir(), config.checkpoint.keep);
        // Rank 0 alone changes the stage's directory.
        if ctx.is_main() {
            let final_leftovers = remove_leftovers_of(ctx.stage_dir(), "final")?;
            for leftover in checkpoints.remove_leftovers()?.into_iter().chain(final_leftovers) {
                tracing::warn!("removed {}, left by a save that did not finish", leftover.display());
            }
        }
        let group = ctx.process_group()?;
        let recipe = RecipeRecord {
            config: ctx.config_yaml().to_owned(),
            seed: ctx.seed(),
            input_model: ctx.input_model().map(Path::to_path_buf),
        };
        let (resume_dir, resumed) = if ctx.resume() {
            match newest_intact(&checkpoints)? {
                Some((step, dir, saved)) => {
                    check_resumable(&dir, &saved, &recipe, config, max_steps)?;
                    tracing::info!("resuming from step {step}: {}", dir.display());
                    (Some(dir), Some(saved))
                }
                None => (None, None),
            }
        } else {
            if ctx.is_main() && !checkpoints.steps()?.is_empty() {
                tracing::warn!(
                    "starting over: removing the checkpoints of an earlier run (use --resume to continue one)"
                );
                checkpoints.clear()?;
            }
            (None, None)
        };
        let fault_nonfinite_at = std::env::var(FAULT_NONFINITE_AT_STEP).ok().and_then(|s| s.parse().ok());
        if config.activation_checkpointing {
            tracing::info!("activation checkpointing: each transformer block's activations are recomputed in backward");
        }
        Ok(Self {
            ctx,
            config,
            checkpoints,
            schedule: config.schedule.schedule(config.optimizer.lr, max_steps),
            resume_dir,
            resumed,
            recipe,
            max_steps,
            started: Instant::now(),
            window: (Instant::now(), 0),
            fault_nonfinite_at,
            stage_state: None,
            state: TrainerState::default(),
            last: StepStats::default(),
            _activation_checkpointing: recompute::enable(config.activation_checkpointing),
            recomputed_before: recompute::recomputed_blocks(),
            group,
            optimizer_state_bytes: None,
            peer_failure: Default::default(),
            gradient_sync: None,
        })
    }

    /// This rank's share of a global batch of `len` items, in a distributed run (all of it
    /// otherwise): every rank draws the same global batch and keeps its slice.
    pub fn shard(&self, len: usize) -> std::ops::Range<usize> {
        data_parallel::shard_range(len, self.ctx.rank(), self.ctx.world_size())
    }

    /// The stage's process group in a distributed run (None in a single-process run): for
    /// the figures and statistics a stage combines over the global batch.
    pub fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    /// Whether two halves of a step that share no parameter may each run forward and
    /// backward on a thread of their own ([`side_by_side`](super::side_by_side)): on a
    /// CPU, in a single-process run (a distributed run's overlapped all-reduce hooks one
    /// backward at a time).
    pub fn halves_side_by_side(&self) -> bool {
        self.ctx.device() == tch::Device::Cpu && self.group.is_none()
    }

    /// Gives every rank rank 0's parameters, and hooks the gradients' all-reduce onto them.
    fn sync_parameters(&mut self, optimizers: &[&AdamW]) -> Result<()> {
        let Some(group) = &self.group else { return Ok(()) };
        let parameters: Vec<&tch::Tensor> = optimizers.iter().flat_map(|o| o.parameters()).collect();
        data_parallel::broadcast_parameters(group, &parameters)?;
        let trained: Vec<&tch::Tensor> = parameters.into_iter().filter(|p| p.requires_grad()).collect();
        self.gradient_sync = None; // its hooks first, before new ones
        self.gradient_sync = Some(group.gradient_sync(&trained, data_parallel::BUCKET_BYTES)?);
        Ok(())
    }

    /// Back-propagates `loss`, accumulating into the gradients. `last`: no backward follows
    /// before the gradients are used (by [`Trainer::finish_step`] or [`Trainer::update`]); in
    /// a distributed run its gradients then start their all-reduce as backward reaches them,
    /// overlapping communication with the rest of backward. (A plain `loss.backward()` is
    /// correct too; its gradients are reduced after backward.)
    pub fn backward(&mut self, loss: &tch::Tensor, last: bool) -> Result<()> {
        if let Some(sync) = self.gradient_sync.as_mut().filter(|_| last) {
            sync.arm()?;
        }
        Ok(loss.f_backward()?)
    }

    /// Shards `optimizers` when the recipe asks for ZeRO-1 and the run is distributed, and
    /// logs the optimizer state each rank holds.
    fn shard_optimizers(&mut self, optimizers: &mut [(&str, &mut AdamW)]) {
        let zero = self.config.optimizer.zero_stage == 1;
        match &self.group {
            Some(group) if zero => {
                for (_, optimizer) in optimizers.iter_mut() {
                    optimizer.shard(group.rank(), group.world_size());
                }
            }
            None if zero => tracing::warn!("optimizer.zero_stage: 1 has no effect in a single-process run"),
            _ => {}
        }
        let held: usize = optimizers.iter().map(|(_, o)| o.state_bytes()).sum();
        let full: usize = optimizers.iter().map(|(_, o)| o.full_state_bytes()).sum();
        tracing::info!("optimizer state on this rank: {held} bytes (unsharded: {full})");
        self.optimizer_state_bytes = Some(held);
    }

    /// Steps `optimizers`; sharded ones then share the parameters their ranks updated.
    fn step_optimizers(&self, optimizers: &mut [&mut AdamW]) -> Result<()> {
        for optimizer in optimizers.iter_mut() {
            optimizer.step()?;
            if let Some(group) = &self.group {
                optimizer.broadcast_updated(group)?;
            }
        }
        Ok(())
    }

    /// Averages the gradients of `optimizers`' parameters over the ranks, and the step's
    /// `loss`; sums `tokens` and `batch_size`. Unchanged when not distributed.
    fn reduce_step(
        &mut self,
        optimizers: &[&mut AdamW],
        loss: f64,
        tokens: u64,
        batch_size: usize,
    ) -> Result<(f64, u64, usize)> {
        let Some(group) = &self.group else { return Ok((loss, tokens, batch_size)) };
        match &mut self.gradient_sync {
            Some(sync) => {
                sync.finish(group)?;
            }
            None => {
                let parameters: Vec<&tch::Tensor> = optimizers.iter().flat_map(|o| o.parameters()).collect();
                data_parallel::average_gradients(group, &parameters)?;
            }
        }
        let world = group.world_size() as f64;
        let mean = data_parallel::average_values(group, &[loss, tokens as f64, batch_size as f64])?;
        Ok((mean[0], (mean[1] * world).round() as u64, (mean[2] * world).round() as usize))
    }

    /// The checkpoint this run continues from, if it resumes: load the models from here.
    pub fn resume_dir(&self) -> Option<&Path> {
        self.resume_dir.as_deref()
    }

    /// Where the checkpoint this run resumes from keeps model `name` (see [`Trained`]):
    /// the first model at its top, the others in their folders.
    pub fn resume_dir_of(&self, index: usize, name: &str) -> Option<PathBuf> {
        self.resume_dir.as_ref().map(|dir| part_dir(dir, index, name))
    }

    /// Steps of the whole run.
    pub fn max_steps(&self) -> u64 {
        self.max_steps
    }

    /// When resuming: restores the optimizers (in the order they were saved) and the
    /// trainer state, tells TensorBoard where the run continues, and returns the data
    /// position to continue from. `None` for a fresh run.
    /// With `optimizer.zero_stage: 1` in a distributed run, it first shards the optimizers
    /// (each rank keeps its share of the state; see [`AdamW::shard`]).
    pub fn restore(&mut self, optimizers: &mut [(&str, &mut AdamW)]) -> Result<Option<DataPosition>> {
        self.sync_parameters(&optimizers.iter().map(|(_, o)| &**o).collect::<Vec<_>>())?;
        self.shard_optimizers(optimizers);
        let (Some(dir), Some(saved)) = (self.resume_dir.clone(), self.resumed.take()) else {
            return Ok(None);
        };
        for (index, (name, optimizer)) in optimizers.iter_mut().enumerate() {
            optimizer.load_state(&load_tensors(&part_dir(&dir, index, name).join(OPTIMIZER_STATE))?)?;
        }
        self.state = saved.state;
        self.stage_state = saved.stage_state;
        self.last.loss = self.state.loss.unwrap_or(f64::NAN);
        self.ctx.restart_at(self.state.step as i64 + 1);
        Ok(Some(saved.data))
    }

    /// The figure `name` of the run's start: computed by `compute` (off the throughput
    /// clock) on a fresh run and kept in the checkpoints, read back from them when the run
    /// resumes. Call after [`Trainer::restore`].
    pub fn at_start(&mut self, name: &str, compute: impl FnOnce() -> Result<f64>) -> Result<f64> {
        if let Some(&value) = self.state.at_start.get(name) {
            return Ok(value);
        }
        let value = self.untimed(compute)?;
        self.state.at_start.insert(name.to_owned(), value);
        Ok(value)
    }

    /// The stage's own state saved with the checkpoint this run resumed from
    /// ([`Trainer::save_checkpoint_with`]), after [`Trainer::restore`]; None for a fresh
    /// run or a checkpoint saved without one. An error names the file when it does not
    /// read as `T`.
    pub fn stage_state<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        let Some(value) = &self.stage_state else { return Ok(None) };
        let file = self.resume_dir.as_deref().unwrap_or(Path::new(".")).join(TRAINER_STATE);
        serde_json::from_value(value.clone()).map(Some).map_err(|e| Error::file(&file, format!("stage_state: {e}")))
    }

    /// True while steps remain.
    pub fn running(&self) -> bool {
        self.state.step < self.max_steps
    }

    /// True once the user asked the run to stop (Ctrl-C): save a checkpoint and return
    /// [`Trainer::stop`]'s error.
    /// In a distributed run the ranks agree: true on all when asked on any.
    pub fn stop_requested(&self) -> bool {
        let asked = self.ctx.should_stop();
        match &self.group {
            None => asked,
            Some(group) => data_parallel::any(group, asked).unwrap_or_else(|e| {
                // A peer is gone: stop here, and let `stop` report why.
                *self.peer_failure.borrow_mut() = Some(e);
                true
            }),
        }
    }

    /// The error that ends a run stopped on request (or by a failed peer), after its
    /// checkpoint in `saved`.
    pub fn stop(&self, saved: PathBuf) -> Error {
        let resume = format!("resume from {} with --resume", saved.display());
        if let Some(failure) = self.peer_failure.borrow_mut().take() {
            tracing::warn!("stopped at step {} as a peer failed; {resume}", self.state.step);
            return Error::Dist(failure);
        }
        tracing::warn!("stopped at step {} on request; {resume}", self.state.step);
        Error::Cancelled
    }

    /// Starts step `state.step + 1`: sets its learning rate on every optimizer and clears
    /// their gradients. Returns the learning rate.
    pub fn start_step(&mut self, optimizers: &mut [&mut AdamW]) -> f64 {
        let lr = self.schedule.lr(self.state.step);
        for optimizer in optimizers.iter_mut() {
            optimizer.set_learning_rate(lr);
            optimizer.zero_grad();
        }
        lr
    }

    /// Ends a step whose gradients have been accumulated, with its mean `loss`, its
    /// `tokens` and `batch_size` sequences: clips each optimizer's gradients, applies the
    /// non-finite guard, steps the optimizers, and writes the `train/*` scalars when due
    /// and the progress. `Ok(false)`: the step was skipped (non-finite), with no update.
    pub fn finish_step(
        &mut self,
        optimizers: &mut [&mut AdamW],
        mut loss: f64,
        tokens: u64,
        batch_size: usize,
    ) -> Result<bool> {
        let learning_rate = self.schedule.lr(self.state.step);
        if self.fault_nonfinite_at == Some(self.state.step + 1) {
            loss = f64::NAN;
        }
        let (loss, tokens, batch_size) = self.reduce_step(optimizers, loss, tokens, batch_size)?;
        let mut squares = 0.0;
        for optimizer in optimizers.iter() {
            let norm = clip_grad_norm(&optimizer.parameters(), self.config.grad_clip)?;
            squares += norm * norm;
        }
        let grad_norm = squares.sqrt();
        self.state.step += 1;
        self.state.tokens += tokens;
        self.window.1 += tokens;
        if !self.guard(loss, grad_norm)? {
            return Ok(false);
        }
        self.step_optimizers(optimizers)?;
        self.record(StepStats { loss, grad_norm, learning_rate, tokens_per_second: 0.0, batch_size });
        Ok(true)
    }

    /// One update inside a step, for stages that update several times a step (PPO's
    /// epochs × minibatches): clips the gradients of all `optimizers` together by their
    /// global norm (as one optimizer over all their models would), applies the non-finite
    /// guard to `loss` and the norm, and steps them. Returns the norm before clipping, or
    /// None when the update was skipped. End the step with [`Trainer::end_step`].
    pub fn update(&mut self, optimizers: &mut [&mut AdamW], mut loss: f64) -> Result<Option<f64>> {
        if self.fault_nonfinite_at == Some(self.state.step + 1) {
            loss = f64::NAN;
        }
        let (loss, _, _) = self.reduce_step(optimizers, loss, 0, 0)?;
        let parameters: Vec<&tch::Tensor> = optimizers.iter().flat_map(|o| o.parameters()).collect();
        let grad_norm = clip_grad_norm(&parameters, self.config.grad_clip)?;
        if !self.guard(loss, grad_norm)? {
            return Ok(None);
        }
        self.step_optimizers(optimizers)?;
        Ok(Some(grad_norm))
    }

    /// Ends a step whose updates were made with [`Trainer::update`]: counts it and its
    /// `tokens`, and writes the `train/*` scalars when due and the progress.
    pub fn end_step(&mut self, loss: f64, grad_norm: f64, tokens: u64, batch_size: usize) {
        let learning_rate = self.schedule.lr(self.state.step);
        self.state.step += 1;
        self.state.tokens += tokens;
        self.window.1 += tokens;
        self.record(StepStats { loss, grad_norm, learning_rate, tokens_per_second: 0.0, batch_size });
    }

    /// Keeps the statistics of the step just counted; logs them when due.
    fn record(&mut self, stats: StepStats) {
        let loss = stats.loss;
        self.last = stats;
        self.state.loss = Some(loss);
        let step = self.state.step;
        if step.is_multiple_of(self.config.log_every) || step == self.max_steps {
            self.last.tokens_per_second = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64();
            self.window = (Instant::now(), 0);
            self.last.log(self.ctx, step);
        }
        let speed = (self.last.tokens_per_second > 0.0).then_some(self.last.tokens_per_second);
        self.ctx.progress(step, self.max_steps, Some(self.last.loss), speed, Some(self.state.tokens));
    }

    /// The non-finite guard: `Ok(true)` to apply the update, `Ok(false)` to skip it
    /// (counted in `state.skipped`), or the error that stops the run.
    fn guard(&mut self, loss: f64, grad_norm: f64) -> Result<bool> {
        if loss.is_finite() && grad_norm.is_finite() {
            return Ok(true);
        }
        let what = format!("step {}: the loss is {loss} and the gradient norm {grad_norm}", self.state.step);
        match self.config.on_nonfinite {
            OnNonFinite::Stop => {
                Err(Error::Other(format!("{what}; stopping (set on_nonfinite: skip to skip such steps)")))
            }
            OnNonFinite::Skip => {
                self.state.skipped += 1;
                tracing::warn!("{what}; skipping the update ({} skipped so far)", self.state.skipped);
                self.ctx.scalar("train/skipped_steps", self.state.step as i64, self.state.skipped as f64);
                Ok(false)
            }
        }
    }

    /// True after the last step and every `eval.every` steps.
    pub fn eval_due(&self) -> bool {
        let step = self.state.step;
        step.is_multiple_of(self.config.eval.every) || step == self.max_steps
    }

    /// True every `checkpoint.every` steps, except at the end (the final save follows).
    pub fn checkpoint_due(&self) -> bool {
        let (step, every) = (self.state.step, self.config.checkpoint.every);
        every > 0 && step % every == 0 && step < self.max_steps
    }

    /// Runs `work` (an evaluation, samples) off the throughput clock.
    pub fn untimed<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let out = work();
        self.window = (Instant::now(), 0);
        out
    }

    /// A resumable checkpoint of this step, written atomically: each model in HF layout
    /// with `tokenizer` (see [`Trained`]), its optimizer's state, the trainer state and
    /// the data position; the oldest beyond `checkpoint.keep` are removed.
    pub fn save_checkpoint(
        &self,
        models: &[Trained<'_>],
        tokenizer: &Tokenizer,
        max_length: usize,
        data: DataPosition,
    ) -> Result<PathBuf> {
        self.save_checkpoint_with(models, tokenizer, max_length, data, None)
    }

    /// [`Trainer::save_checkpoint`] with the stage's own state beside the trainer's (read
    /// back with [`Trainer::stage_state`] after [`Trainer::restore`]).
    pub fn save_checkpoint_with(
        &self,
        models: &[Trained<'_>],
        tokenizer: &Tokenizer,
        max_length: usize,
        data: DataPosition,
        stage_state: Option<serde_json::Value>,
    ) -> Result<PathBuf> {
        // Sharded optimizers gather their whole state (every rank takes part), so the
        // checkpoint resumes on any number of ranks, sharded or not.
        let optimizer_states =
            models.iter().map(|part| part.optimizer.gather_state(self.group.as_ref())).collect::<Result<Vec<_>>>()?;
        if !self.ctx.is_main() {
            return Ok(self.checkpoints.dir_of(self.state.step));
        }
        self.checkpoints.save(self.state.step, |dir| {
            for (index, part) in models.iter().enumerate() {
                let part_dir = part_dir(dir, index, part.name);
                std::fs::create_dir_all(&part_dir).map_err(|e| Error::file(&part_dir, e.to_string()))?;
                write_model(&part_dir, part.model, tokenizer, max_length)?;
                save_safetensors(&part_dir.join(OPTIMIZER_STATE), &optimizer_states[index])?;
            }
            let saved = Saved { state: self.state.clone(), data, recipe: Some(self.recipe.clone()), stage_state };
            let json = serde_json::to_value(saved).map_err(|e| Error::Other(e.to_string()))?;
            write_json(&dir.join(TRAINER_STATE), &json)
        })
    }

    /// The trained model in HF layout at `<stage_dir>/final/`, written atomically.
    pub fn save_final(&self, model: &dyn SaveHf, tokenizer: &Tokenizer, max_length: usize) -> Result<PathBuf> {
        let dir = self.ctx.stage_dir().join("final");
        if !self.ctx.is_main() {
            return Ok(dir);
        }
        save_model(&dir, model, tokenizer, max_length)?;
        tracing::info!("saved {}", dir.display());
        Ok(dir)
    }

    /// The figures every training stage reports: the last loss, steps, tokens, seconds;
    /// with activation checkpointing, the blocks recomputed (`train/recomputed_blocks`).
    pub fn metrics(&self) -> Metrics {
        let mut metrics = Metrics::from([
            ("train/loss".to_string(), self.last.loss),
            ("train/steps".to_string(), self.state.step as f64),
            ("train/tokens".to_string(), self.state.tokens as f64),
            ("time/seconds".to_string(), self.started.elapsed().as_secs_f64()),
        ]);
        if let Some(bytes) = self.optimizer_state_bytes {
            metrics.insert("train/optimizer_state_bytes".to_string(), bytes as f64);
        }
        if self.config.activation_checkpointing {
            let recomputed = recompute::recomputed_blocks() - self.recomputed_before;
            metrics.insert("train/recomputed_blocks".to_string(), recomputed as f64);
        }
        metrics
    }
}

/// The newest checkpoint that passes its manifest and whose trainer state reads, with
/// that state; each newer one that does not is reported and skipped. `None` when there
/// are no checkpoints; an error when none of them is intact.
fn newest_intact(checkpoints: &Checkpoints) -> Result<Option<(u64, PathBuf, Saved)>> {
    let steps = checkpoints.steps()?;
    let mut damaged = Vec::new();
    for &step in steps.iter().rev() {
        let dir = checkpoints.dir_of(step);
        let saved = Checkpoints::verify(&dir)
            .and_then(|()| read_json::<Saved>(&dir.join(TRAINER_STATE)).map_err(|e| e.to_string()));
        match saved {
            Ok(saved) => return Ok(Some((step, dir, saved))),
            Err(problem) => {
                tracing::warn!(
                    "checkpoint {} is damaged and cannot be resumed from: {problem}; trying an older one",
                    dir.display()
                );
                damaged.push(format!("{}: {problem}", dir.display()));
            }
        }
    }
    match damaged.is_empty() {
        true => Ok(None),
        false => Err(Error::Other(format!(
            "no intact checkpoint to resume from ({}); start over with --overwrite",
            damaged.join("; ")
        ))),
    }
}

/// Refuses to resume from checkpoint `dir` when this run's recipe changes what it was
/// made under (beyond [`SAFE_TO_CHANGE`], which is logged) or asks for fewer steps than
/// it has taken.
fn check_resumable(
    dir: &Path,
    saved: &Saved,
    recipe: &RecipeRecord,
    config: &TrainingConfig,
    max_steps: u64,
) -> Result<()> {
    if let Some(made_under) = &saved.recipe {
        let (safe, unsafe_): (Vec<Change>, Vec<Change>) =
            recipe_changes(made_under, recipe)?.into_iter().partition(|change| change.safe);
        if !unsafe_.is_empty() {
            let listed: Vec<String> = unsafe_.iter().map(Change::to_string).collect();
            return Err(Error::Other(format!(
                "cannot resume from {}: the recipe differs from the one it was made under in {}. These change \
                 the training trajectory, so the run would not continue the same one: restore them, or start \
                 over with --overwrite (or another run.output_dir)",
                dir.display(),
                listed.join(", ")
            )));
        }
        for change in safe {
            tracing::info!("resuming with a changed setting: {change}");
        }
    } else {
        tracing::warn!("checkpoint {} records no recipe (an older plumb made it); not compared", dir.display());
    }
    let step = saved.state.step;
    if max_steps < step {
        let key = if config.max_steps.is_some() { "max_steps" } else { "epochs" };
        return Err(Error::config(
            key,
            format!(
                "the run would be {max_steps} steps long, but the checkpoint it resumes ({}) is at step {step}: \
                 ask for at least {step} steps",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// A key whose value differs between two recipes.
#[derive(Debug, PartialEq)]
struct Change {
    key: String,
    before: String,
    now: String,
    safe: bool,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` ({} in the checkpoint, {} now)", self.key, self.before, self.now)
    }
}

/// The keys whose values differ between the recipe a checkpoint was `made_under` and
/// `now`'s (the seed as `run.seed`), in key order.
fn recipe_changes(made_under: &RecipeRecord, now: &RecipeRecord) -> Result<Vec<Change>> {
    let leaves = |yaml: &str| -> Result<BTreeMap<String, serde_yaml::Value>> {
        let value: serde_yaml::Value =
            serde_yaml::from_str(yaml).map_err(|e| Error::Other(format!("a recorded recipe does not parse: {e}")))?;
        let mut leaves = BTreeMap::new();
        flatten("", &value, &mut leaves);
        Ok(leaves)
    };
    let (before, after) = (leaves(&made_under.config)?, leaves(&now.config)?);
    let show = |value: Option<&serde_yaml::Value>| match value {
        None => "not set".to_string(),
        Some(value) => serde_yaml::to_string(value).map(|s| s.trim().replace('\n', " ")).unwrap_or_default(),
    };
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut changes: Vec<Change> = keys
        .into_iter()
        .filter(|key| before.get(*key) != after.get(*key))
        .map(|key| Change {
            key: key.clone(),
            before: show(before.get(key)),
            now: show(after.get(key)),
            safe: SAFE_TO_CHANGE.iter().any(|safe| key == safe || key.starts_with(&format!("{safe}."))),
        })
        .collect();
    if made_under.seed != now.seed {
        let (before, now) = (made_under.seed.to_string(), now.seed.to_string());
        changes.push(Change { key: "run.seed".into(), before, now, safe: false });
    }
    if made_under.input_model != now.input_model {
        let show = |model: &Option<PathBuf>| model.as_ref().map_or("none".into(), |m| m.display().to_string());
        let (before, now) = (show(&made_under.input_model), show(&now.input_model));
        changes.push(Change { key: "the input model".into(), before, now, safe: false });
    }
    Ok(changes)
}

/// The leaves of a mapping by dotted key path (`model.hidden_size`); sequences and
/// scalars are leaves, empty mappings none.
fn flatten(prefix: &str, value: &serde_yaml::Value, out: &mut BTreeMap<String, serde_yaml::Value>) {
    match value {
        serde_yaml::Value::Mapping(mapping) => {
            for (key, value) in mapping {
                let key = match key {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).map(|s| s.trim().to_string()).unwrap_or_default(),
                };
                let path = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                flatten(&path, value, out);
            }
        }
        serde_yaml::Value::Null if prefix.is_empty() => {}
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The folder of the `index`-th model of checkpoint `dir` (see [`Trained`]).
fn part_dir(dir: &Path, index: usize, name: &str) -> PathBuf {
    if index == 0 {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The model and its tokenizer in HF layout, written atomically to `dir`.
pub fn save_model(dir: &Path, model: &dyn SaveHf, tokenizer: &Tokenizer, max_length: usize) -> Result<()> {
    write_dir_atomically(dir, |staging| write_model(staging, model, tokenizer, max_length))
}

/// The model and its tokenizer in HF layout, into an existing directory.
pub fn write_model(dir: &Path, model: &dyn SaveHf, tokenizer: &Tokenizer, max_length: usize) -> Result<()> {
    model.save_hf(dir)?;
    tokenizer.save(dir, max_length)
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::context::RunRequest;
    use crate::model::llama::{LlamaConfig, LlamaForCausalLm};
    use crate::plugin::abi::{ByteSink, HostApi, ProgressUpdate, StrRef, ABI_VERSION};
    use crate::recipe::parse_section;
    use crate::train::{next_token_loss, TrainSection};

    extern "C" fn scalar(_: *mut c_void, _: StrRef, _: i64, _: f64) {}
    extern "C" fn text(_: *mut c_void, _: StrRef, _: i64, _: StrRef) {}
    extern "C" fn hparams(_: *mut c_void, _: StrRef) {}
    extern "C" fn progress(_: *mut c_void, _: *const ProgressUpdate) {}
    extern "C" fn log(_: *mut c_void, _: u32, _: StrRef) {}
    extern "C" fn should_stop(_: *mut c_void) -> u8 {
        0
    }
    extern "C" fn score(_: *mut c_void, _: StrRef, _: StrRef, _: ByteSink) -> i32 {
        1
    }
    extern "C" fn restart_at(_: *mut c_void, _: i64) {}

    /// A host that takes every call and keeps nothing.
    fn quiet_host() -> HostApi {
        HostApi {
            abi_version: ABI_VERSION,
            state: std::ptr::null_mut(),
            log_scalar: scalar,
            log_text: text,
            log_hparams: hparams,
            progress,
            log,
            should_stop,
            score,
            restart_at,
        }
    }

    fn context<'h>(host: &'h HostApi, stage_dir: &Path, resume: bool) -> RunContext<'h> {
        let request = RunRequest {
            stage: "ppo".into(),
            config_yaml: String::new(),
            run_dir: stage_dir.parent().unwrap().to_path_buf(),
            stage_dir: stage_dir.to_path_buf(),
            input_model: None,
            device: "cpu".into(),
            seed: 0,
            resume,
            rewards: Vec::new(),
            dist: None,
        };
        // SAFETY: the host's functions ignore their state and outlive the context.
        unsafe { RunContext::new(host, request) }.unwrap()
    }

    fn tiny(seed: i64) -> LlamaForCausalLm {
        tch::manual_seed(seed);
        let hf: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16
        }))
        .unwrap();
        LlamaForCausalLm::new(hf, Device::Cpu).unwrap()
    }

    fn same(a: &AdamW, b: &AdamW) -> bool {
        a.state().iter().zip(b.state()).all(|((na, ta), (nb, tb))| *na == nb && ta.equal(&tb))
    }

    #[test]
    fn recipe_changes_name_their_keys_and_only_cadence_and_length_are_safe() {
        let before = RecipeRecord {
            config: "model: {hidden_size: 32, num_hidden_layers: 2}\nmax_steps: 8\neval: {every: 4}\n".into(),
            seed: 1,
            input_model: None,
        };
        let now = RecipeRecord {
            config:
                "model: {hidden_size: 48, num_hidden_layers: 2}\nmax_steps: 16\nlog_every: 1\ncheckpoint: {keep: 5}\n"
                    .into(),
            seed: 2,
            input_model: Some("base".into()),
        };
        let changes = recipe_changes(&before, &now).unwrap();
        let described: Vec<(String, bool)> = changes.iter().map(|c| (c.to_string(), c.safe)).collect();
        assert_eq!(
            described,
            [
                ("`checkpoint.keep` (not set in the checkpoint, 5 now)".to_string(), true),
                ("`eval.every` (4 in the checkpoint, not set now)".to_string(), true),
                ("`log_every` (not set in the checkpoint, 1 now)".to_string(), true),
                ("`max_steps` (8 in the checkpoint, 16 now)".to_string(), true),
                ("`model.hidden_size` (32 in the checkpoint, 48 now)".to_string(), false),
                ("`run.seed` (1 in the checkpoint, 2 now)".to_string(), false),
                ("`the input model` (none in the checkpoint, base now)".to_string(), false),
            ]
        );
        assert!(recipe_changes(&before, &before).unwrap().is_empty());
    }

    #[test]
    fn a_checkpoint_holds_every_model_with_its_optimizer_and_resumes_them() {
        let root = tempfile::tempdir().unwrap();
        let stage_dir = root.path().join("ppo");
        let host = quiet_host();
        let section: TrainSection<serde_yaml::Value> =
            parse_section("max_steps: 4\ncheckpoint: {every: 2}\nlog_every: 1\n").unwrap();
        let tokenizer = Tokenizer::train_bpe(["one two three four"].into_iter(), 300, 1).unwrap();
        let data = Tensor::arange(2 * 9, (Kind::Int64, Device::Cpu)).remainder(200).view([2, 9]);
        let (inputs, targets) = (data.narrow(1, 0, 8), data.narrow(1, 1, 8));

        // Two models (a policy and a value model, say), each with its optimizer, two steps.
        let ctx = context(&host, &stage_dir, false);
        let mut trainer = Trainer::new(&ctx, &section.train, 4).unwrap();
        let (policy, value) = (tiny(1), tiny(2));
        let mut policy_adamw = section.train.optimizer.adamw(policy.var_store());
        let mut value_adamw = section.train.optimizer.adamw(value.var_store());
        let mut saved = None;
        while trainer.running() && saved.is_none() {
            trainer.start_step(&mut [&mut policy_adamw, &mut value_adamw]);
            let loss = next_token_loss(&policy, &inputs, &targets).unwrap()
                + next_token_loss(&value, &inputs, &targets).unwrap();
            loss.backward();
            let applied =
                trainer.finish_step(&mut [&mut policy_adamw, &mut value_adamw], loss.double_value(&[]), 16, 2).unwrap();
            assert!(applied);
            if trainer.checkpoint_due() {
                let models = [
                    Trained { name: "policy", model: &policy, optimizer: &policy_adamw },
                    Trained { name: "value", model: &value, optimizer: &value_adamw },
                ];
                let order = BatchOrder::new(3, 0);
                let kl = serde_json::json!({"coef": 0.07});
                let data = DataPosition::Batches(order);
                saved = Some(trainer.save_checkpoint_with(&models, &tokenizer, 16, data, Some(kl)).unwrap());
            }
        }
        let dir = saved.expect("a checkpoint at step 2");
        assert!(dir.ends_with("checkpoints/step-00000002"), "{}", dir.display());
        for file in
            ["config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"]
        {
            assert!(dir.join(file).is_file(), "{file} at the top");
        }
        for file in ["config.json", "model.safetensors", "optimizer.safetensors"] {
            assert!(dir.join("value").join(file).is_file(), "value/{file}");
        }

        // Resuming restores both optimizers, the step and the data position.
        let ctx = context(&host, &stage_dir, true);
        let mut resumed = Trainer::new(&ctx, &section.train, 4).unwrap();
        assert_eq!(resumed.resume_dir(), Some(dir.as_path()));
        let value_dir = resumed.resume_dir_of(1, "value").unwrap();
        let (policy2, value2) = (
            LlamaForCausalLm::from_dir(&resumed.resume_dir_of(0, "policy").unwrap(), Device::Cpu, Kind::Float).unwrap(),
            LlamaForCausalLm::from_dir(&value_dir, Device::Cpu, Kind::Float).unwrap(),
        );
        let mut policy_adamw2 = section.train.optimizer.adamw(policy2.var_store());
        let mut value_adamw2 = section.train.optimizer.adamw(value2.var_store());
        assert!(!same(&value_adamw, &value_adamw2), "a fresh optimizer differs");
        let data = resumed.restore(&mut [("policy", &mut policy_adamw2), ("value", &mut value_adamw2)]).unwrap();
        assert!(matches!(data, Some(DataPosition::Batches(_))));
        assert_eq!(resumed.state.step, 2);
        let kl: serde_json::Value = resumed.stage_state().unwrap().expect("the stage's state comes back");
        assert_eq!(kl["coef"], 0.07);
        assert!(same(&policy_adamw, &policy_adamw2) && same(&value_adamw, &value_adamw2));
        let weight = |m: &LlamaForCausalLm| m.var_store().variables()["model.embed_tokens.weight"].copy();
        assert!(weight(&value).equal(&weight(&value2)) && !weight(&value).equal(&weight(&policy2)));

        // A fresh run (no --resume) removes the earlier run's checkpoints.
        let ctx = context(&host, &stage_dir, false);
        let fresh = Trainer::new(&ctx, &section.train, 4).unwrap();
        assert!(fresh.resume_dir().is_none() && !dir.exists());
    }
}

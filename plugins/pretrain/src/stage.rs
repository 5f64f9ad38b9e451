//! The training loop every pretraining objective shares — causal LM on a decoder, masked
//! LM on a bidirectional encoder, span corruption on an encoder-decoder — which differ only
//! in the model and in how a row of tokens becomes a loss. Each objective implements
//! [`Objective`]; the stage ([`Pretraining`]) does the rest: a streamed corpus, a tokenizer
//! trained from scratch with the objective's special tokens (or an input model), batch-size
//! warmup, accumulation, clipping, the non-finite guard, checkpoints and resume, evaluation
//! on the held-out rows (corrupted the same way at every evaluation, with greedy samples
//! where the model generates), and an HF-layout save.
//!
//! The loop in [`Pretraining::run`] is the whole algorithm, top to bottom.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::path::Path;
use std::time::Instant;

use plumb_core::checkpoint::training::Checkpoints;
use plumb_core::data::stream::TokenStream;
use plumb_core::data::SplitMix64;
use plumb_core::model::SaveHf;
use plumb_core::optim::{clip_grad_norm, AdamW, Optimizer};
use plumb_core::plugin::{Metrics, ValidateContext};
use plumb_core::tch::{self, nn, Device, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{
    require, resume_point, save_checkpoint, save_model, BatchSizeWarmup, CheckpointConfig, OnNonFinite,
    OptimizerConfig, Precision, ScheduleConfig, StepStats, TrainerState,
};
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::corpus::{eos_of, position, start_or_resume, Corpus, DataConfig, TokenizerConfig};

/// One pretraining objective: its model family, its settings, and its loss.
pub trait Objective: Sized + 'static {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    /// The model trained.
    type Model: SaveHf;
    /// `model:`, the architecture of a fresh model (the vocabulary comes from the tokenizer).
    type Architecture: DeserializeOwned + Debug + Clone;
    /// `objective:`, the corruption's settings.
    type Settings: DeserializeOwned + Debug + Clone + Default;

    /// Checks of `objective:` and `model:` (at those keys) for rows of `seq_len` tokens.
    fn validate(settings: &Self::Settings, model: Option<&Self::Architecture>, seq_len: usize) -> Result<()>;
    /// Special tokens a fresh tokenizer needs besides EOS: named ones and additional ones.
    fn special_tokens(settings: &Self::Settings, seq_len: usize) -> Result<(Vec<(&'static str, String)>, Vec<String>)>;
    /// Tokens of a raw (uncorrupted) training row for inputs of `seq_len` tokens.
    fn row_length(settings: &Self::Settings, seq_len: usize) -> Result<usize>;

    fn new_model(
        architecture: &Self::Architecture,
        tokenizer: &Tokenizer,
        seq_len: usize,
        device: Device,
    ) -> Result<Self::Model>;
    fn load_model(dir: &Path, device: Device) -> Result<Self::Model>;
    fn var_store(model: &Self::Model) -> &nn::VarStore;

    /// The objective, its token ids looked up in `tokenizer`, for `model`.
    fn new(settings: &Self::Settings, tokenizer: &Tokenizer, model: &Self::Model) -> Result<Self>;
    /// Corrupts `rows` with `rng` (if the objective corrupts) and returns the summed loss
    /// over their prediction targets and how many there were.
    fn loss(
        &self,
        model: &Self::Model,
        rows: &[Vec<i64>],
        rng: &mut SplitMix64,
        device: Device,
    ) -> Result<(Tensor, usize)>;

    /// Greedy continuations of `prompts`, as Markdown, where the model generates.
    fn samples(
        &self,
        _model: &Self::Model,
        _tokenizer: &Tokenizer,
        _prompts: &[String],
        _tokens: usize,
    ) -> Result<Option<String>> {
        Ok(None)
    }
}

/// The stage's recipe section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig<A, S> {
    pub data: DataConfig,
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    /// The architecture, when the stage starts from scratch (no input model).
    #[serde(default = "Option::default")]
    pub model: Option<A>,
    #[serde(default)]
    pub objective: S,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Sequences per optimizer step.
    #[serde(default = "plumb_core::train::defaults::batch_size")]
    pub batch_size: usize,
    /// Sequences per forward/backward pass; gradients of `batch_size / micro_batch_size`
    /// micro-batches are accumulated into one step. Default: `batch_size`.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Grow the batch from `start` sequences to `batch_size` over the first `steps` steps.
    #[serde(default)]
    pub batch_size_warmup: Option<BatchSizeWarmup>,
    pub max_steps: u64,
    #[serde(default = "plumb_core::train::defaults::grad_clip")]
    pub grad_clip: f64,
    /// `fp32`, or `bf16`: the forward pass under bf16 autocast, fp32 master weights.
    #[serde(default)]
    pub precision: Precision,
    /// What a non-finite loss or gradient does: `stop` the run naming the step, or
    /// `skip` the step (no update) and go on.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    /// Fault injection for testing the non-finite guard: the loss of this step is NaN.
    #[serde(default)]
    pub inject_nonfinite_at_step: Option<u64>,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default = "plumb_core::train::defaults::log_every")]
    pub log_every: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many steps (and before the first and after the last).
    #[serde(default = "plumb_core::train::defaults::eval_every")]
    pub every: u64,
    /// At most this many validation batches per evaluation; 0 = all.
    #[serde(default)]
    pub max_batches: usize,
    /// Prompts continued greedily at each evaluation and written to TensorBoard as text
    /// (for objectives whose model generates: causal LM).
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    #[serde(default = "default_sample_tokens")]
    pub sample_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: plumb_core::train::defaults::eval_every(),
            max_batches: 0,
            sample_prompts: Vec::new(),
            sample_tokens: default_sample_tokens(),
        }
    }
}

fn default_sample_tokens() -> usize {
    48
}

/// A pretraining objective as a stage.
pub struct Pretraining<O>(PhantomData<O>);

impl<O: Objective> Stage for Pretraining<O> {
    const NAME: &'static str = O::NAME;
    const DESCRIPTION: &'static str = O::DESCRIPTION;
    type Config = PretrainConfig<O::Architecture, O::Settings>;

    fn validate(c: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        c.data.validate(ctx)?;
        let (named, additional) = O::special_tokens(&c.objective, c.data.seq_len)?;
        c.tokenizer.validate(named.len() + additional.len())?;
        O::validate(&c.objective, c.model.as_ref(), c.data.seq_len)?;
        require(c.batch_size > 0, "batch_size", "expected at least 1")?;
        if let Some(micro) = c.micro_batch_size {
            require(
                micro > 0 && c.batch_size % micro == 0,
                "micro_batch_size",
                "expected a positive divisor of batch_size",
            )?;
        }
        if let Some(warmup) = &c.batch_size_warmup {
            warmup.validate(c.batch_size, c.micro_batch_size.unwrap_or(c.batch_size))?;
        }
        require(c.max_steps > 0, "max_steps", "expected at least 1")?;
        c.optimizer.validate()?;
        c.schedule.validate(c.max_steps)?;
        require(c.grad_clip >= 0.0, "grad_clip", "expected a non-negative value (0 turns clipping off)")?;
        require(c.checkpoint.keep > 0, "checkpoint.keep", "expected at least 1")?;
        require(c.eval.every > 0, "eval.every", "expected at least 1")?;
        require(c.log_every > 0, "log_every", "expected at least 1")
    }

    fn run(c: Self::Config, ctx: &mut RunContext) -> Result<StageOutput> {
        let started = Instant::now();
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let seq_len = c.data.seq_len;
        let row_len = O::row_length(&c.objective, seq_len)?;

        // Data, tokenizer and model: from the latest checkpoint, an input model, or scratch.
        let corpus = Corpus::open(&c.data, ctx)?;
        let checkpoints = Checkpoints::new(ctx.stage_dir(), c.checkpoint.keep);
        let resume_from = resume_point(ctx, &checkpoints)?;
        let (model, tokenizer) = match (&resume_from, ctx.input_model(), &c.model) {
            (Some((_, dir)), _, _) => (O::load_model(dir, device)?, Tokenizer::from_dir(dir)?),
            (None, Some(dir), None) => (O::load_model(dir, device)?, Tokenizer::from_dir(dir)?),
            (None, None, Some(architecture)) => {
                let (named, additional) = O::special_tokens(&c.objective, seq_len)?;
                let named: Vec<(&str, &str)> = named.iter().map(|(k, t)| (*k, t.as_str())).collect();
                let tokenizer = c.tokenizer.train(&corpus, &named, &additional)?;
                (O::new_model(architecture, &tokenizer, seq_len, device)?, tokenizer)
            }
            (None, Some(dir), Some(_)) => {
                return Err(Error::config(
                    "model",
                    format!("the stage starts from the model in {}; drop `model:` or the input model", dir.display()),
                ))
            }
            (None, None, None) => {
                return Err(Error::config(
                    "model",
                    "expected an architecture (`model:`) or an input model (the stage's `model:` path in the recipe)",
                ))
            }
        };
        let vs = O::var_store(&model);
        let parameters = plumb_core::model::num_parameters(vs);
        let objective = O::new(&c.objective, &tokenizer, &model)?;
        let eos = eos_of(&tokenizer)?;
        let (validation, unigram_entropy) = corpus.validation_rows(&tokenizer, row_len)?;
        tracing::info!("model: {parameters} parameters on {device:?}; rows of {row_len} raw tokens");

        let mut optimizer = c.optimizer.adamw(vs);
        let schedule = c.schedule.schedule(c.optimizer.lr, c.max_steps);
        let resume_dir = resume_from.as_ref().map(|(_, dir)| dir.as_path());
        let (mut state, mut stream) =
            start_or_resume(&corpus, resume_dir, &mut optimizer, ctx, (row_len, eos, c.data.shuffle_buffer))?;
        let checkpoint = |state: &TrainerState, stream: &TokenStream, optimizer: &AdamW| {
            save_checkpoint(&checkpoints, state, position(stream), &model, &tokenizer, optimizer, seq_len)
        };
        let evaluate = || -> Result<f64> {
            let _no_grad = tch::no_grad_guard();
            let mut rng = SplitMix64::new(ctx.seed() ^ 0xE7A1); // the same corruption every time
            let limit = if c.eval.max_batches > 0 { c.eval.max_batches } else { usize::MAX };
            let (mut total, mut count) = (0.0, 0);
            for rows in validation.chunks(c.batch_size).take(limit) {
                let (sum, n) = c.precision.forward(device, || objective.loss(&model, rows, &mut rng, device))??;
                total += sum.double_value(&[]);
                count += n;
            }
            Ok(total / count.max(1) as f64)
        };
        let initial_eval = evaluate()?;
        if resume_from.is_none() {
            tracing::info!("step 0: eval/loss {initial_eval:.4}");
            ctx.scalar("eval/loss", 0, initial_eval);
        }

        // Train: each step takes batch_size fresh rows (fewer while the batch size warms
        // up), corrupts them (drawn from the seed and the step alone) and accumulates the
        // gradients of micro-batches.
        let micro = c.micro_batch_size.unwrap_or(c.batch_size);
        let mut last = StepStats::default();
        let mut eval_loss = initial_eval;
        let (mut window, mut window_tokens) = (Instant::now(), 0u64);
        while state.step < c.max_steps {
            if ctx.should_stop() {
                let dir = checkpoint(&state, &stream, &optimizer)?;
                tracing::warn!(
                    "stopped at step {} on request; resume from {} with --resume",
                    state.step,
                    dir.display()
                );
                return Err(Error::Cancelled);
            }
            let lr = schedule.lr(state.step);
            optimizer.set_learning_rate(lr);
            optimizer.zero_grad();
            let batch_size = match &c.batch_size_warmup {
                Some(warmup) => warmup.batch_size(state.step, c.batch_size, micro),
                None => c.batch_size,
            };
            let rows = stream.next_rows(&tokenizer, batch_size)?;
            let mut rng = SplitMix64::new(ctx.seed() ^ (state.step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut sums = Vec::new();
            let mut targets = 0;
            for chunk in rows.chunks(micro) {
                let (sum, n) = c.precision.forward(device, || objective.loss(&model, chunk, &mut rng, device))??;
                sums.push(sum);
                targets += n;
            }
            let mut loss = 0.0;
            for sum in sums {
                (&sum / targets as f64).backward();
                loss += sum.double_value(&[]) / targets as f64;
            }
            if c.inject_nonfinite_at_step == Some(state.step + 1) {
                loss = f64::NAN; // fault injection, to test the guard
            }
            let grad_norm = clip_grad_norm(&optimizer.parameters(), c.grad_clip)?;
            state.step += 1;
            let step_tokens = (batch_size * seq_len) as u64; // model input tokens, as hf_baseline.py counts them
            state.tokens += step_tokens;
            window_tokens += step_tokens;
            if !c.on_nonfinite.check(ctx, &mut state, loss, grad_norm)? {
                continue;
            }
            optimizer.step()?;
            last = StepStats { loss, grad_norm, learning_rate: lr, tokens_per_second: 0.0, batch_size };
            let step = state.step;
            if step % c.log_every == 0 || step == c.max_steps {
                last.tokens_per_second = window_tokens as f64 / window.elapsed().as_secs_f64();
                (window, window_tokens) = (Instant::now(), 0);
                last.log(ctx, step);
            }
            let speed = (last.tokens_per_second > 0.0).then_some(last.tokens_per_second);
            ctx.progress(step, c.max_steps, Some(last.loss), speed, Some(state.tokens));
            if step % c.eval.every == 0 || step == c.max_steps {
                eval_loss = evaluate()?;
                ctx.scalar("eval/loss", step as i64, eval_loss);
                ctx.scalar("eval/perplexity", step as i64, eval_loss.exp());
                tracing::info!("step {step}: train/loss {:.4} eval/loss {eval_loss:.4}", last.loss);
                let (prompts, tokens) = (&c.eval.sample_prompts, c.eval.sample_tokens);
                if let Some(text) =
                    objective.samples(&model, &tokenizer, prompts, tokens)?.filter(|_| !prompts.is_empty())
                {
                    ctx.text("samples/greedy", step as i64, &text);
                }
                (window, window_tokens) = (Instant::now(), 0);
            }
            if c.checkpoint.every > 0 && step % c.checkpoint.every == 0 && step < c.max_steps {
                checkpoint(&state, &stream, &optimizer)?;
            }
        }

        let final_dir = ctx.stage_dir().join("final");
        save_model(&final_dir, &model, &tokenizer, seq_len)?;
        tracing::info!("saved {}", final_dir.display());
        let metrics = Metrics::from([
            ("train/loss".to_string(), last.loss),
            ("eval/loss".to_string(), eval_loss),
            ("eval/initial_loss".to_string(), initial_eval),
            ("data/unigram_entropy".to_string(), unigram_entropy),
            ("train/steps".to_string(), state.step as f64),
            ("train/tokens".to_string(), state.tokens as f64),
            ("time/seconds".to_string(), started.elapsed().as_secs_f64()),
            ("model/parameters".to_string(), parameters as f64),
        ]);
        let hparams = serde_json::json!({
            "objective": O::NAME, "lr": c.optimizer.lr, "batch_size": c.batch_size, "seq_len": seq_len,
            "max_steps": c.max_steps, "weight_decay": c.optimizer.weight_decay,
            "vocab_size": tokenizer.vocab_size(), "parameters": parameters,
        });
        if let serde_json::Value::Object(map) = hparams {
            ctx.hparams(&map, &["eval/loss", "train/loss"]);
        }
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}

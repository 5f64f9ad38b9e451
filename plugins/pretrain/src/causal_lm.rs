//! `pretrain.causal_lm`: next-token prediction on a text corpus.
//!
//! From scratch, it trains a byte-level BPE tokenizer on the training split and
//! initialises a Llama-style decoder from `model:`; given an input model (HF layout) it
//! continues training that model with its own tokenizer. Documents are packed into
//! fixed-length sequences with EOS between them; a held-out split of documents gives
//! `eval/loss`. The model is saved in HF layout under `<output_dir>/<stage>/final/`.
//!
//! The loop below is the whole algorithm, top to bottom.
use std::time::Instant;

use plumb_core::checkpoint::training::Checkpoints;
use plumb_core::data;
use plumb_core::data::stream::TokenStream;
use plumb_core::model::llama::{LlamaConfig, LlamaForCausalLm};
use plumb_core::model::{GenerationSettings, Policy};
use plumb_core::optim::{clip_grad_norm, AdamW, Optimizer};
use plumb_core::plugin::ValidateContext;
use plumb_core::tch::{self, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{
    accumulate_gradients, nested, next_token_loss, require, resume_point, save_checkpoint, save_model, BatchSizeWarmup,
    CheckpointConfig, OnNonFinite, OptimizerConfig, Precision, ScheduleConfig, StepStats, TrainerState,
};
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use serde::Deserialize;

use crate::corpus::{eos_of, position, start_or_resume, Corpus, DataConfig, TokenizerConfig};

/// The stage's recipe section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CausalLmConfig {
    pub data: DataConfig,
    /// Tokenizer training, used when the stage starts from scratch.
    #[serde(default)]
    pub tokenizer: TokenizerConfig,
    /// The architecture, when the stage starts from scratch (no input model).
    #[serde(default)]
    pub model: Option<ModelConfig>,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Sequences per optimizer step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Sequences per forward/backward pass; gradients of `batch_size / micro_batch_size`
    /// micro-batches are accumulated into one step. Default: `batch_size`.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Grow the batch from `start` sequences to `batch_size` over the first `steps` steps.
    #[serde(default)]
    pub batch_size_warmup: Option<BatchSizeWarmup>,
    /// What a non-finite loss or gradient does: `stop` the run naming the step, or
    /// `skip` the step (no update) and go on.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Fault injection for testing the non-finite guard: the loss of this step is NaN.
    #[serde(default)]
    pub inject_nonfinite_at_step: Option<u64>,
    pub max_steps: u64,
    /// Global-norm gradient clipping; 0 turns it off.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// `fp32`, or `bf16`: the forward pass under bf16 autocast, fp32 master weights.
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub eval: EvalConfig,
    /// Log training scalars every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

/// A Llama-style architecture; the vocabulary size comes from the tokenizer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Default: the sequence length.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many steps (and after the last).
    #[serde(default = "default_eval_every")]
    pub every: u64,
    /// At most this many validation batches per evaluation; 0 = all.
    #[serde(default)]
    pub max_batches: usize,
    /// Prompts continued at each evaluation and written to TensorBoard as text.
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    #[serde(default = "default_sample_tokens")]
    pub sample_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: default_eval_every(),
            max_batches: 0,
            sample_prompts: Vec::new(),
            sample_tokens: default_sample_tokens(),
        }
    }
}

fn default_batch_size() -> usize {
    16
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_log_every() -> u64 {
    10
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_eval_every() -> u64 {
    100
}
fn default_sample_tokens() -> usize {
    48
}

pub struct CausalLm;

impl Stage for CausalLm {
    const NAME: &'static str = "causal_lm";
    const DESCRIPTION: &'static str = "Causal language modelling (next-token prediction) on a text corpus";
    type Config = CausalLmConfig;

    fn validate(c: &CausalLmConfig, ctx: &ValidateContext) -> Result<()> {
        c.data.validate(ctx)?;
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
        require(c.checkpoint.keep > 0, "checkpoint.keep", "expected at least 1")?;
        require(c.max_steps > 0, "max_steps", "expected at least 1")?;
        require(c.eval.every > 0, "eval.every", "expected at least 1")?;
        require(c.log_every > 0, "log_every", "expected at least 1")?;
        c.optimizer.validate()?;
        c.schedule.validate(c.max_steps)?;
        require(c.grad_clip >= 0.0, "grad_clip", "expected a non-negative value (0 turns clipping off)")?;
        c.tokenizer.validate(0)?;
        if let Some(m) = &c.model {
            let positions = m.max_position_embeddings.unwrap_or(c.data.seq_len);
            require(positions >= c.data.seq_len, "model.max_position_embeddings", "expected at least data.seq_len")?;
            llama_config(m, 0, c.data.seq_len).resolve().map_err(|e| nested("model", e))?;
        }
        Ok(())
    }

    fn run(c: CausalLmConfig, ctx: &mut RunContext) -> Result<StageOutput> {
        let started = Instant::now();
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);

        let corpus = Corpus::open(&c.data, ctx)?;
        let checkpoints = Checkpoints::new(ctx.stage_dir(), c.checkpoint.keep);
        let resume_from = resume_point(ctx, &checkpoints)?;
        let (policy, tokenizer) = match (&resume_from, ctx.input_model(), &c.model) {
            (Some((_, dir)), _, _) => {
                (LlamaForCausalLm::from_dir(dir, device, Kind::Float)?, Tokenizer::from_dir(dir)?)
            }
            (None, Some(dir), None) => {
                let tokenizer = Tokenizer::from_dir(dir)?;
                (LlamaForCausalLm::from_dir(dir, device, Kind::Float)?, tokenizer)
            }
            (None, None, Some(m)) => {
                let tokenizer = c.tokenizer.train(&corpus, &[], &[])?;
                let mut hf = llama_config(m, tokenizer.vocab_size(), c.data.seq_len);
                hf.eos_token_id = tokenizer.eos_id().map(Into::into);
                hf.bos_token_id = tokenizer.eos_id().map(Into::into);
                (LlamaForCausalLm::new(hf, device)?, tokenizer)
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
        let eos = eos_of(&tokenizer)?;
        let (validation, unigram_entropy) = corpus.validation_rows(&tokenizer, c.data.seq_len + 1)?;
        let validation = Tensor::from_slice(&validation.concat()).view([-1, c.data.seq_len as i64 + 1]);
        tracing::info!("model: {} parameters on {device:?}", policy.num_parameters());

        // Optimizer and schedule.
        let mut optimizer = c.optimizer.adamw(policy.var_store());
        let schedule = c.schedule.schedule(c.optimizer.lr, c.max_steps);
        let resume_dir = resume_from.as_ref().map(|(_, dir)| dir.as_path());
        let (mut state, mut stream) = start_or_resume(
            &corpus,
            resume_dir,
            &mut optimizer,
            ctx,
            (c.data.seq_len + 1, eos, c.data.shuffle_buffer),
        )?;
        let checkpoint = |state: &TrainerState, stream: &TokenStream, optimizer: &AdamW| {
            save_checkpoint(&checkpoints, state, position(stream), &policy, &tokenizer, optimizer, c.data.seq_len)
        };
        let micro = c.micro_batch_size.unwrap_or(c.batch_size);
        let initial_eval = evaluate(&policy, &validation, &c, device)?;
        if resume_from.is_none() {
            tracing::info!("step 0: eval/loss {initial_eval:.4}");
            ctx.scalar("eval/loss", 0, initial_eval);
        }

        // Train: each step accumulates the gradients of batch_size / micro micro-batches
        // (fewer while the batch size warms up).
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
            let all: Vec<i64> = (0..batch_size as i64).collect();
            let mut loss = accumulate_gradients(&policy, &rows, &all, micro, device, c.precision)?;
            if c.inject_nonfinite_at_step == Some(state.step + 1) {
                loss = f64::NAN; // fault injection, to test the guard
            }
            let grad_norm = clip_grad_norm(&optimizer.parameters(), c.grad_clip)?;
            state.step += 1;
            let step_tokens = (batch_size * c.data.seq_len) as u64;
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
            ctx.progress(
                step,
                c.max_steps,
                Some(last.loss),
                (last.tokens_per_second > 0.0).then_some(last.tokens_per_second),
                Some(state.tokens),
            );

            if step % c.eval.every == 0 || step == c.max_steps {
                eval_loss = evaluate(&policy, &validation, &c, device)?;
                ctx.scalar("eval/loss", step as i64, eval_loss);
                ctx.scalar("eval/perplexity", step as i64, eval_loss.exp());
                tracing::info!("step {step}: train/loss {:.4} eval/loss {eval_loss:.4}", last.loss);
                log_samples(ctx, &policy, &tokenizer, &c.eval, step, eos)?;
                (window, window_tokens) = (Instant::now(), 0);
            }
            if c.checkpoint.every > 0 && step % c.checkpoint.every == 0 && step < c.max_steps {
                checkpoint(&state, &stream, &optimizer)?;
            }
        }
        let step = state.step;

        // Save in HF layout, atomically.
        let final_dir = ctx.stage_dir().join("final");
        save_model(&final_dir, &policy, &tokenizer, c.data.seq_len)?;
        tracing::info!("saved {}", final_dir.display());

        let metrics = plumb_core::plugin::Metrics::from([
            ("train/loss".to_string(), last.loss),
            ("eval/loss".to_string(), eval_loss),
            ("eval/initial_loss".to_string(), initial_eval),
            ("data/unigram_entropy".to_string(), unigram_entropy),
            ("train/steps".to_string(), step as f64),
            ("train/tokens".to_string(), state.tokens as f64),
            ("time/seconds".to_string(), started.elapsed().as_secs_f64()),
            ("model/parameters".to_string(), policy.num_parameters() as f64),
        ]);
        let hparams = serde_json::json!({
            "lr": c.optimizer.lr, "batch_size": c.batch_size, "seq_len": c.data.seq_len,
            "max_steps": c.max_steps, "weight_decay": c.optimizer.weight_decay,
            "vocab_size": tokenizer.vocab_size(), "parameters": policy.num_parameters(),
        });
        if let serde_json::Value::Object(map) = hparams {
            ctx.hparams(&map, &["eval/loss", "train/loss"]);
        }
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}

/// Mean loss over the validation sequences (at most `eval.max_batches` batches).
fn evaluate(policy: &impl Policy, validation: &Tensor, c: &CausalLmConfig, device: tch::Device) -> Result<f64> {
    let _no_grad = tch::no_grad_guard();
    let rows = validation.size()[0];
    let batch = c.batch_size as i64;
    let batches = (rows + batch - 1) / batch;
    let batches = if c.eval.max_batches > 0 { batches.min(c.eval.max_batches as i64) } else { batches };
    let (mut total, mut count) = (0.0, 0i64);
    for b in 0..batches {
        let size = batch.min(rows - b * batch);
        let indices: Vec<i64> = (b * batch..b * batch + size).collect();
        let (inputs, targets) = data::causal_batch(validation, &indices, device);
        let loss = c.precision.forward(device, || next_token_loss(policy, &inputs, &targets))??;
        total += loss.double_value(&[]) * size as f64;
        count += size;
    }
    Ok(total / count as f64)
}

/// Continues each sample prompt greedily and writes prompt and continuation as text.
fn log_samples(
    ctx: &RunContext,
    policy: &impl Policy,
    tokenizer: &Tokenizer,
    eval: &EvalConfig,
    step: u64,
    eos: i64,
) -> Result<()> {
    if eval.sample_prompts.is_empty() {
        return Ok(());
    }
    let prompts = eval.sample_prompts.iter().map(|p| tokenizer.encode(p)).collect::<Result<Vec<_>>>()?;
    let settings = GenerationSettings {
        max_new_tokens: eval.sample_tokens,
        temperature: 0.0,
        stop_tokens: vec![eos],
        ..Default::default()
    };
    let generated = policy.generate(&prompts, &settings)?;
    let mut text = String::new();
    for (prompt, out) in eval.sample_prompts.iter().zip(generated) {
        text.push_str(&format!("**{prompt}**{}\n\n", tokenizer.decode(&out.tokens)?));
    }
    ctx.text("samples/greedy", step as i64, &text);
    Ok(())
}

/// The HF config of a fresh model.
fn llama_config(m: &ModelConfig, vocab_size: usize, seq_len: usize) -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        vocab_size: vocab_size.max(1),
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_hidden_layers: m.num_hidden_layers,
        num_attention_heads: m.num_attention_heads,
        num_key_value_heads: m.num_key_value_heads,
        head_dim: None,
        max_position_embeddings: m.max_position_embeddings.unwrap_or(seq_len),
        rms_norm_eps: m.rms_norm_eps,
        rope_theta: Some(m.rope_theta),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: m.tie_word_embeddings,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        sliding_window: None,
        use_sliding_window: None,
        max_window_layers: None,
        layer_types: None,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

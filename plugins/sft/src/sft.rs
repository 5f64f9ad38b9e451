//! `sft.sft`: supervised fine-tuning of a causal LM on instruction or chat data.
//!
//! Reads JSONL examples (alpaca, prompt/completion or messages), formats them with the
//! model's chat template (or one the recipe names), and trains on the assistant turns
//! only (or on every token). Examples longer than `max_length` lose the beginning of their
//! prompt; batches are bucketed by length or packed. Each evaluation reports the held-out
//! loss, and, on held-out prompts answered greedily, how many answers match
//! `eval.response_pattern`; the answers go to TensorBoard as text. The model is saved in
//! HF layout, with the template it was tuned on, under `<output_dir>/<stage>/final/`.
//!
//! The loop below is the whole algorithm, top to bottom.
use std::path::PathBuf;
use std::time::Instant;

use plumb_core::checkpoint::training::Checkpoints;
use plumb_core::data::{split_documents, BatchOrder};
use plumb_core::model::{self, GenerationSettings, Policy};
use plumb_core::optim::{clip_grad_norm, AdamW, Optimizer};
use plumb_core::plugin::{Metrics, ValidateContext};
use plumb_core::tch::{self, Kind, Reduction, Tensor};
use plumb_core::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use plumb_core::train::{
    load_checkpoint, require, resume_point, save_checkpoint, save_model, CheckpointConfig, DataPosition, OnNonFinite,
    OptimizerConfig, Precision, ScheduleConfig, StepStats, TrainerState,
};
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use regex::Regex;
use serde::Deserialize;

use crate::batching::{collate, count_targets, Batch, Batching, Plan, IGNORE};
use crate::formats::{read_jsonl, Conversation, Fields, Format, OnMalformed};
use crate::template::{
    prompt_of, render_with_spans, stop_tokens, tokenize, truncate, use_template, Example, TemplateChoice, TrainOn,
};

/// The stage's recipe section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    pub data: DataConfig,
    /// `auto` (the model's template, else `default`), `model`, `default`, `chatml`, or a
    /// path to a Jinja file.
    #[serde(default)]
    pub template: TemplateChoice,
    /// Extra template variables, as keyword arguments to transformers'
    /// `apply_chat_template` (e.g. `date_string` for Llama 3.x's "Today Date").
    #[serde(default)]
    pub template_variables: serde_json::Map<String, serde_json::Value>,
    /// `responses` (every assistant turn) or `all` tokens.
    #[serde(default)]
    pub train_on: TrainOn,
    /// Tokens per example (longer ones lose the beginning of their prompt) or per packed row.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// `bucket` (examples of similar length together) or `pack`.
    #[serde(default)]
    pub batching: Batching,
    /// Examples (bucket) or rows (pack) per optimizer step.
    #[serde(default = "plumb_core::train::defaults::batch_size")]
    pub batch_size: usize,
    /// Examples or rows per forward/backward pass; gradients accumulate over the step.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Training length: `max_steps`, or `epochs` over the training examples.
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default)]
    pub epochs: Option<f64>,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default = "plumb_core::train::defaults::grad_clip")]
    pub grad_clip: f64,
    /// `fp32`, or `bf16`: the forward pass under bf16 autocast, fp32 master weights.
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default = "plumb_core::train::defaults::log_every")]
    pub log_every: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A JSONL file, one example per line.
    pub train: PathBuf,
    /// A held-out JSONL file; without it, `validation_fraction` of `train` is held out.
    #[serde(default)]
    pub validation: Option<PathBuf>,
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    pub format: Format,
    #[serde(default)]
    pub fields: Fields,
    /// `stop` at the first malformed line, or `skip` (and count) them.
    #[serde(default)]
    pub on_malformed: OnMalformed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many steps (and before the first and after the last).
    #[serde(default = "plumb_core::train::defaults::eval_every")]
    pub every: u64,
    /// At most this many validation batches for the loss; 0 = all.
    #[serde(default)]
    pub max_batches: usize,
    /// Held-out prompts answered greedily at each evaluation.
    #[serde(default = "default_num_prompts")]
    pub num_prompts: usize,
    /// Fixed prompts (user turns) also answered at each evaluation.
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// A regular expression an answer to a held-out prompt must match (anchor it with
    /// `^…$` to require the whole answer); the share that do is `eval/format_compliance`.
    #[serde(default)]
    pub response_pattern: Option<String>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every: plumb_core::train::defaults::eval_every(),
            max_batches: 0,
            num_prompts: default_num_prompts(),
            sample_prompts: Vec::new(),
            max_new_tokens: default_max_new_tokens(),
            response_pattern: None,
        }
    }
}

fn default_max_length() -> usize {
    512
}
fn default_validation_fraction() -> f64 {
    0.05
}
fn default_num_prompts() -> usize {
    8
}
fn default_max_new_tokens() -> usize {
    128
}

pub struct Sft;

impl Stage for Sft {
    const NAME: &'static str = "sft";
    const DESCRIPTION: &'static str =
        "Supervised fine-tuning on instruction or chat data (JSONL), with the loss on responses only";
    type Config = SftConfig;

    fn validate(c: &SftConfig, ctx: &ValidateContext) -> Result<()> {
        ctx.existing_file("data.train", &c.data.train)?;
        if let Some(validation) = &c.data.validation {
            ctx.existing_file("data.validation", validation)?;
        } else {
            require(
                c.data.validation_fraction > 0.0 && c.data.validation_fraction < 1.0,
                "data.validation_fraction",
                "expected a fraction strictly between 0 and 1",
            )?;
        }
        // Malformed lines are found before any stage computes anything.
        for path in std::iter::once(&c.data.train).chain(&c.data.validation) {
            read_jsonl(path, c.data.format, &c.data.fields, c.data.on_malformed)?;
        }
        if let TemplateChoice::File(path) = &c.template {
            ctx.existing_file("template", path).map_err(|_| {
                Error::config(
                    "template",
                    format!(
                        "expected auto, model, default, chatml or an existing .jinja file; `{}` is none of them",
                        path.display()
                    ),
                )
            })?;
        }
        require(c.max_length >= 2, "max_length", "expected at least 2")?;
        require(c.batch_size > 0, "batch_size", "expected at least 1")?;
        if let Some(micro) = c.micro_batch_size {
            require(
                micro > 0 && c.batch_size % micro == 0,
                "micro_batch_size",
                "expected a positive divisor of batch_size",
            )?;
        }
        match (c.max_steps, c.epochs) {
            (Some(steps), None) => require(steps > 0, "max_steps", "expected at least 1")?,
            (None, Some(epochs)) => {
                require(epochs > 0.0 && epochs.is_finite(), "epochs", "expected a positive number")?
            }
            _ => return Err(Error::config("max_steps", "expected exactly one of max_steps and epochs")),
        }
        c.optimizer.validate()?;
        if let Some(steps) = c.max_steps {
            c.schedule.validate(steps)?;
        }
        require(c.grad_clip >= 0.0, "grad_clip", "expected a non-negative value (0 turns clipping off)")?;
        require(c.checkpoint.keep > 0, "checkpoint.keep", "expected at least 1")?;
        require(c.eval.every > 0, "eval.every", "expected at least 1")?;
        require(c.log_every > 0, "log_every", "expected at least 1")?;
        if let Some(pattern) = &c.eval.response_pattern {
            Regex::new(pattern).map_err(|e| Error::config("eval.response_pattern", e.to_string()))?;
        }
        Ok(())
    }

    fn run(c: SftConfig, ctx: &mut RunContext) -> Result<StageOutput> {
        let started = Instant::now();
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let Some(model_dir) = ctx.input_model().map(PathBuf::from) else {
            return Err(Error::config(
                "model",
                "SFT starts from a model: give the stage a `model:` directory (HF layout) or put it after a stage that makes one",
            ));
        };

        // Data: conversations, a held-out split, the template, tokens with their label mask.
        let read = |path: &PathBuf| {
            let (conversations, skipped) = read_jsonl(path, c.data.format, &c.data.fields, c.data.on_malformed)?;
            if !skipped.lines.is_empty() {
                tracing::warn!("{skipped}");
                ctx.scalar("data/malformed_lines", 0, skipped.lines.len() as f64);
            }
            Ok::<_, Error>(conversations)
        };
        let (train_conversations, val_conversations) = match &c.data.validation {
            Some(path) => (read(&c.data.train)?, read(path)?),
            None => split_documents(read(&c.data.train)?, c.data.validation_fraction, ctx.seed())?,
        };
        let mut tokenizer = Tokenizer::from_dir(&model_dir)?;
        use_template(&c.template, &mut tokenizer, &model_dir)?;
        let template = tokenizer.chat_template().expect("use_template sets one");
        let to_examples = |conversations: &[Conversation], name: &str| -> Result<Vec<Example>> {
            let (mut examples, mut truncated, mut dropped) = (Vec::new(), 0, 0);
            for conversation in conversations {
                let mut example = format_example(template, &tokenizer, conversation, &c)?;
                truncated += usize::from(truncate(&mut example, c.max_length));
                if example.targets() == 0 {
                    dropped += 1; // truncation left nothing to learn from
                } else {
                    examples.push(example);
                }
            }
            if truncated > 0 {
                tracing::warn!(
                    "{name}: {truncated} of {} examples were longer than max_length {} and were truncated ({dropped} left with no response tokens, dropped)",
                    conversations.len(),
                    c.max_length
                );
            }
            ctx.scalar(&format!("data/{name}_truncated"), 0, truncated as f64);
            if examples.is_empty() {
                return Err(Error::Other(format!("{name}: no examples left with response tokens")));
            }
            Ok(examples)
        };
        let train = to_examples(&train_conversations, "train")?;
        let validation = to_examples(&val_conversations, "validation")?;
        let stops = stop_tokens(&tokenizer)?;
        let plan = Plan::new(&train, c.batching, c.batch_size, c.max_length, ctx.seed());
        let max_steps = match (c.max_steps, c.epochs) {
            (Some(steps), _) => steps,
            (None, Some(epochs)) => (epochs * plan.batches.len() as f64).ceil().max(1.0) as u64,
            (None, None) => unreachable!("validate requires one"),
        };
        tracing::info!(
            "data: {} train / {} validation examples ({} targets), {} batches per epoch, {:.0}% of batch tokens are real; {max_steps} steps",
            train.len(),
            validation.len(),
            train.iter().map(Example::targets).sum::<usize>(),
            plan.batches.len(),
            100.0 * plan.efficiency(&train)
        );

        // Model, optimizer, schedule; or all of them from the latest checkpoint.
        let checkpoints = Checkpoints::new(ctx.stage_dir(), c.checkpoint.keep);
        let resume_from = resume_point(ctx, &checkpoints)?;
        let load_from = resume_from.as_ref().map(|(_, dir)| dir.as_path()).unwrap_or(&model_dir);
        let policy = model::load(load_from, device, Kind::Float)?;
        tokenizer.check_fits_embedding(policy.vocab_size() as usize, load_from)?;
        tracing::info!("model: {} parameters on {device:?}, from {}", policy.num_parameters(), load_from.display());
        let mut optimizer = c.optimizer.adamw(policy.var_store());
        let schedule = c.schedule.schedule(c.optimizer.lr, max_steps);
        let mut state = TrainerState::default();
        let mut order = BatchOrder::new(plan.batches.len(), ctx.seed());
        if let Some((_, dir)) = &resume_from {
            let (saved, data) = load_checkpoint(dir, &mut optimizer)?;
            let DataPosition::Batches(saved_order) = data else {
                return Err(Error::file(dir.join("trainer_state.json"), "data: expected a batch order"));
            };
            (state, order) = (saved, saved_order);
            ctx.restart_at(state.step as i64 + 1);
        }
        let checkpoint = |state: &TrainerState, order: &BatchOrder, optimizer: &AdamW| {
            let position = DataPosition::Batches(order.clone());
            save_checkpoint(&checkpoints, state, position, policy.as_ref(), &tokenizer, optimizer, c.max_length)
        };
        let tokens_of = |rows: &[&[usize]]| rows.iter().flat_map(|r| r.iter()).map(|&i| train[i].len()).sum::<usize>();
        let held_out: Vec<&Conversation> = val_conversations.iter().take(c.eval.num_prompts).collect();
        let pattern =
            c.eval.response_pattern.as_deref().map(Regex::new).transpose().map_err(|e| Error::Other(e.to_string()))?;
        let evaluate = |step: u64| -> Result<Evaluation> {
            let loss = validation_loss(policy.as_ref(), &validation, &c, device)?;
            let answers = answer(policy.as_ref(), &tokenizer, template, &held_out, &c, &stops)?;
            let compliance = pattern
                .as_ref()
                .map(|p| answers.iter().filter(|a| p.is_match(&a.answer)).count() as f64 / answers.len().max(1) as f64);
            log_evaluation(ctx, step, loss, compliance, &answers);
            Ok(Evaluation { loss, compliance })
        };
        let initial = if resume_from.is_none() { Some(evaluate(0)?) } else { None };

        // Train: each step is one planned batch, its micro-batches' gradients accumulated,
        // the loss a mean over the step's target tokens.
        let micro = c.micro_batch_size.unwrap_or(c.batch_size);
        let mut last = StepStats::default();
        let mut latest = initial.clone();
        let (mut window, mut window_tokens) = (Instant::now(), 0usize);
        while state.step < max_steps {
            if ctx.should_stop() {
                let dir = checkpoint(&state, &order, &optimizer)?;
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
            let batch = &plan.batches[order.next_batch(1)[0] as usize];
            let rows: Vec<&[usize]> = batch.iter().map(|&r| plan.rows[r].as_slice()).collect();
            let targets = count_targets(&train, &rows);
            let mut loss = 0.0;
            for chunk in rows.chunks(micro) {
                let batch = collate(&train, chunk, device);
                let sum = c.precision.forward(device, || target_loss_sum(policy.as_ref(), &batch))??;
                (&sum / targets as f64).backward();
                loss += sum.double_value(&[]) / targets as f64;
            }
            let grad_norm = clip_grad_norm(&optimizer.parameters(), c.grad_clip)?;
            state.step += 1;
            let step_tokens = tokens_of(&rows);
            window_tokens += step_tokens;
            state.tokens += step_tokens as u64;
            if !c.on_nonfinite.check(ctx, &mut state, loss, grad_norm)? {
                continue;
            }
            optimizer.step()?;
            let step = state.step;
            last = StepStats { loss, grad_norm, learning_rate: lr, tokens_per_second: 0.0, batch_size: rows.len() };
            if step % c.log_every == 0 || step == max_steps {
                last.tokens_per_second = window_tokens as f64 / window.elapsed().as_secs_f64();
                (window, window_tokens) = (Instant::now(), 0);
                last.log(ctx, step);
                ctx.scalar("train/epoch", step as i64, step as f64 / plan.batches.len() as f64);
            }
            ctx.progress(
                step,
                max_steps,
                Some(last.loss),
                (last.tokens_per_second > 0.0).then_some(last.tokens_per_second),
                Some(state.tokens),
            );
            if step % c.eval.every == 0 || step == max_steps {
                let evaluation = evaluate(step)?;
                tracing::info!("step {step}: train/loss {:.4} {evaluation}", last.loss);
                latest = Some(evaluation);
                (window, window_tokens) = (Instant::now(), 0);
            }
            if c.checkpoint.every > 0 && step % c.checkpoint.every == 0 && step < max_steps {
                checkpoint(&state, &order, &optimizer)?;
            }
        }

        let final_dir = ctx.stage_dir().join("final");
        save_model(&final_dir, policy.as_ref(), &tokenizer, c.max_length)?;
        tracing::info!("saved {}", final_dir.display());
        let mut metrics = Metrics::from([
            ("train/loss".to_string(), last.loss),
            ("train/steps".to_string(), state.step as f64),
            ("train/tokens".to_string(), state.tokens as f64),
            ("time/seconds".to_string(), started.elapsed().as_secs_f64()),
            ("data/train_examples".to_string(), train.len() as f64),
        ]);
        for (prefix, evaluation) in [("eval/", &latest), ("eval/initial_", &initial)] {
            if let Some(e) = evaluation {
                metrics.insert(format!("{prefix}loss"), e.loss);
                if let Some(compliance) = e.compliance {
                    metrics.insert(format!("{prefix}format_compliance"), compliance);
                }
            }
        }
        let hparams = serde_json::json!({
            "lr": c.optimizer.lr, "batch_size": c.batch_size, "max_length": c.max_length, "max_steps": max_steps,
            "weight_decay": c.optimizer.weight_decay, "train_on": format!("{:?}", c.train_on).to_lowercase(),
            "batching": format!("{:?}", c.batching).to_lowercase(), "parameters": policy.num_parameters(),
        });
        if let serde_json::Value::Object(map) = hparams {
            ctx.hparams(&map, &["eval/loss", "eval/format_compliance"]);
        }
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}

/// One example: the conversation rendered, tokenized, its responses marked.
pub fn format_example(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    conversation: &Conversation,
    c: &SftConfig,
) -> Result<Example> {
    let in_line = |e: Error| Error::file(&c.data.train, format!("line {}: {e}", conversation.line));
    let (text, spans) = render_with_spans(template, &conversation.messages, &c.template_variables).map_err(in_line)?;
    tokenize(tokenizer, &text, &spans, c.train_on)
}

/// Summed cross-entropy over the batch's targets (a sum, so micro-batches add up).
fn target_loss_sum(policy: &dyn Policy, batch: &Batch) -> Result<Tensor> {
    let logits = policy.forward(&batch.input_ids, &batch.positions, batch.attention_mask.as_ref(), None)?;
    let vocab = logits.size()[2];
    Ok(logits.view([-1, vocab]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        &batch.targets.view([-1]),
        None,
        Reduction::Sum,
        IGNORE,
        0.0,
    ))
}

/// Mean loss per target token over the validation examples.
fn validation_loss(policy: &dyn Policy, validation: &[Example], c: &SftConfig, device: tch::Device) -> Result<f64> {
    let _no_grad = tch::no_grad_guard();
    let mut order: Vec<usize> = (0..validation.len()).collect();
    order.sort_by_key(|&i| validation[i].len());
    let rows: Vec<&[usize]> = order.chunks(1).collect();
    let batches = rows.chunks(c.micro_batch_size.unwrap_or(c.batch_size));
    let limit = if c.eval.max_batches > 0 { c.eval.max_batches } else { usize::MAX };
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in batches.take(limit) {
        let batch = collate(validation, chunk, device);
        total += c.precision.forward(device, || target_loss_sum(policy, &batch))??.double_value(&[]);
        count += batch.target_count;
    }
    Ok(total / count.max(1) as f64)
}

/// A prompt and the model's greedy answer (and the reference one, when held out).
struct Answer {
    prompt: String,
    answer: String,
    reference: Option<String>,
}

/// Greedy answers to the held-out prompts and the fixed sample prompts, in one batch.
fn answer(
    policy: &dyn Policy,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    held_out: &[&Conversation],
    c: &SftConfig,
    stops: &[i64],
) -> Result<Vec<Answer>> {
    let mut asks: Vec<(Vec<ChatMessage>, Option<String>)> = held_out
        .iter()
        .map(|conv| {
            let prompt = prompt_of(&conv.messages);
            (prompt.to_vec(), conv.messages.get(prompt.len()).map(|m| m.content.clone()))
        })
        .collect();
    asks.extend(c.eval.sample_prompts.iter().map(|p| (vec![ChatMessage::new("user", p.clone())], None)));
    if asks.is_empty() {
        return Ok(Vec::new());
    }
    let prompts = asks
        .iter()
        .map(|(messages, _)| {
            let text = template.render_with(messages, true, &c.template_variables)?;
            let mut ids = tokenizer.encode(&text)?;
            let keep = c.max_length.saturating_sub(c.eval.max_new_tokens).max(1);
            if ids.len() > keep {
                ids.drain(..ids.len() - keep); // the prompt's end, as in training
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let settings = GenerationSettings {
        max_new_tokens: c.eval.max_new_tokens,
        temperature: 0.0,
        stop_tokens: stops.to_vec(),
        ..Default::default()
    };
    let generated = policy.generate(&prompts, &settings)?;
    asks.into_iter()
        .zip(generated)
        .map(|((messages, reference), out)| {
            Ok(Answer {
                prompt: messages.last().map(|m| m.content.clone()).unwrap_or_default(),
                answer: tokenizer.decode(&out.tokens)?.trim_end().to_string(),
                reference,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Evaluation {
    loss: f64,
    compliance: Option<f64>,
}

impl std::fmt::Display for Evaluation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "eval/loss {:.4}", self.loss)?;
        if let Some(c) = self.compliance {
            write!(f, " eval/format_compliance {c:.3}")?;
        }
        Ok(())
    }
}

fn log_evaluation(ctx: &RunContext, step: u64, loss: f64, compliance: Option<f64>, answers: &[Answer]) {
    let step = step as i64;
    ctx.scalar("eval/loss", step, loss);
    ctx.scalar("eval/perplexity", step, loss.exp());
    if let Some(c) = compliance {
        ctx.scalar("eval/format_compliance", step, c);
    }
    if !answers.is_empty() {
        let mut text = String::new();
        for a in answers {
            text.push_str(&format!("**Prompt:** {}\n\n**Answer:** {}\n\n", a.prompt, a.answer));
            if let Some(reference) = &a.reference {
                text.push_str(&format!("**Reference:** {reference}\n\n"));
            }
            text.push_str("---\n\n");
        }
        ctx.text("samples/responses", step, &text);
    }
}

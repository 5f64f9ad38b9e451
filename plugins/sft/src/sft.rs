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

use plumb_core::data::BatchOrder;
use plumb_core::device::device_name;
use plumb_core::dist::{data_parallel, ProcessGroup, ReduceOp};
use plumb_core::model::{self, GenerationSettings, HeadChunks, Policy};
use plumb_core::optim::AdamW;
use plumb_core::plugin::ValidateContext;
use plumb_core::tch::{self, Kind, Tensor};
use plumb_core::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use plumb_core::train::{
    check_train_and_validation, note_data, read_train_and_validation, require, summed_token_loss, DataPosition,
    EvalConfig, Length, TrainSection, Trained, Trainer, TrainingConfig,
};
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use regex::Regex;
use serde::Deserialize;

use crate::batching::{collate, count_targets, Batch, Batching, Plan};
use crate::formats::{read_jsonl_with_limit, Conversation, Fields, Format, OnMalformed, DEFAULT_MAX_LINE_BYTES};
use crate::template::{
    prompt_of, render_with_spans, stop_tokens, tokenize, truncate, use_template, Example, TemplateChoice, TrainOn,
};

/// The stage's own recipe section, beside the training fields every stage shares
/// ([`TrainingConfig`]: optimizer, schedule, batch, steps or epochs, checkpoint, eval, ...).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// The examples to train on and hold out.
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
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A JSONL file, one example per line.
    pub train: PathBuf,
    /// A held-out JSONL file; without it, `validation_fraction` of `train` is held out.
    #[serde(default)]
    pub validation: Option<PathBuf>,
    /// Fraction of `train` held out when there is no `validation` file.
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// `alpaca` (instruction, input, output), `prompt_completion` or `messages` (chat turns).
    pub format: Format,
    /// The names of the fields each format reads.
    #[serde(default)]
    pub fields: Fields,
    /// `stop` at the first malformed line, or `skip` (and count) them.
    #[serde(default)]
    pub on_malformed: OnMalformed,
    /// The longest line (one example) read, in bytes (default 1 MiB); a longer line is
    /// malformed, refused before it is parsed.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
}

impl DataConfig {
    /// The examples of `path` and the lines left out.
    pub fn read(&self, path: &std::path::Path) -> Result<(Vec<Conversation>, crate::formats::Skipped)> {
        read_jsonl_with_limit(path, self.format, &self.fields, self.on_malformed, self.max_line_bytes)
    }
}

fn default_max_line_bytes() -> usize {
    DEFAULT_MAX_LINE_BYTES
}

fn default_max_length() -> usize {
    512
}
fn default_validation_fraction() -> f64 {
    0.05
}

pub struct Sft;

impl Stage for Sft {
    const NAME: &'static str = "sft";
    const DESCRIPTION: &'static str =
        "Supervised fine-tuning on instruction or chat data (JSONL), with the loss on responses only";
    type Config = TrainSection<SftConfig>;

    fn validate(config: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        let TrainSection { train: training, stage: c } = config;
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
        require(c.data.max_line_bytes > 0, "data.max_line_bytes", "expected at least 1")?;
        check_train_and_validation(&c.data.train, c.data.validation.as_deref(), "example", |p| c.data.read(p))?;
        c.template.validate()?;
        require(c.max_length >= 2, "max_length", "expected at least 2")?;
        training.validate(Length::StepsOrEpochs)?;
        if let Some(pattern) = &training.eval.response_pattern {
            Regex::new(pattern).map_err(|e| Error::config("eval.response_pattern", e.to_string()))?;
        }
        ctx.require_input_model("SFT starts from a model")?;
        Ok(())
    }

    fn run(config: Self::Config, ctx: &mut RunContext) -> Result<StageOutput> {
        let TrainSection { train: training, stage: c } = config;
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let Some(model_dir) = ctx.input_model().map(PathBuf::from) else {
            return Err(Error::config(
                "model",
                "SFT starts from a model: give the stage a `model:` directory (HF layout) or put it after a stage that makes one",
            ));
        };

        // Data: conversations, a held-out split, the template, tokens with their label mask.
        // A stop asked for meanwhile (Ctrl-C, SIGTERM) is honoured within 50 ms while the
        // files are read, and between examples while they are tokenized.
        let data = c.data.clone();
        let (train_conversations, val_conversations) = read_train_and_validation(
            ctx,
            "reading the SFT data",
            &c.data.train,
            c.data.validation.as_deref(),
            c.data.validation_fraction,
            move |path| data.read(path),
        )?;
        let mut tokenizer = Tokenizer::from_dir(&model_dir)?;
        use_template(&c.template, &mut tokenizer, &model_dir)?;
        let template = tokenizer.chat_template().expect("use_template sets one");
        let to_examples = |conversations: &[Conversation], name: &str| -> Result<Vec<Example>> {
            let (mut examples, mut truncated, mut dropped) = (Vec::new(), 0, 0);
            for conversation in conversations {
                if ctx.should_stop() {
                    tracing::warn!("stopped on request while tokenizing the {name} examples");
                    return Err(Error::Cancelled);
                }
                let mut example = format_example(template, &tokenizer, conversation, &c)?;
                truncated += usize::from(truncate(&mut example, c.max_length));
                if example.targets() == 0 {
                    dropped += 1; // truncation left nothing to learn from
                } else {
                    examples.push(example);
                }
            }
            if truncated > 0 {
                let message = format!(
                    "{name}: {truncated} of {} examples were longer than max_length {} and were truncated ({dropped} left with no response tokens, dropped)",
                    conversations.len(),
                    c.max_length
                );
                note_data(ctx, &format!("data/{name}_truncated"), &message);
            }
            if examples.is_empty() {
                return Err(Error::Other(format!("{name}: no examples left with response tokens")));
            }
            Ok(examples)
        };
        let train = to_examples(&train_conversations, "train")?;
        let validation = to_examples(&val_conversations, "validation")?;
        let stops = stop_tokens(&tokenizer)?;
        let plan = Plan::new(&train, c.batching, training.batch_size, c.max_length, ctx.seed());
        let max_steps = training.total_steps(plan.batches.len());
        tracing::info!(
            "data: {} train / {} validation examples ({} targets), {} batches per epoch, {:.0}% of batch tokens are real; {max_steps} steps",
            train.len(),
            validation.len(),
            train.iter().map(Example::targets).sum::<usize>(),
            plan.batches.len(),
            100.0 * plan.efficiency(&train)
        );

        // Model, optimizer and data order; or all of them from the latest checkpoint.
        let mut trainer = Trainer::new(ctx, &training, max_steps)?;
        // In a distributed run, the group the held-out figures are summed over.
        let group = ctx.process_group()?;
        let load_from = trainer.resume_dir().unwrap_or(&model_dir).to_path_buf();
        let lora = training.lora.as_ref();
        let policy = model::load_for_training(&model_dir, trainer.resume_dir(), device, Kind::Float, lora, ctx.seed())?;
        tokenizer.check_fits_embedding(policy.vocab_size() as usize, &load_from)?;
        tracing::info!(
            "model: {} parameters on {}, from {}",
            policy.num_parameters(),
            device_name(device),
            load_from.display()
        );
        let mut optimizer = training.optimizer.adamw(policy.trainable());
        let mut order = match trainer.restore(&mut [("model", &mut optimizer)])? {
            None => BatchOrder::new(plan.batches.len(), ctx.seed()),
            Some(DataPosition::Batches(order)) => order,
            Some(DataPosition::Stream(_)) => {
                return Err(Error::file(load_from.join("trainer_state.json"), "data: expected a batch order"))
            }
        };
        let is_resumed = trainer.resume_dir().is_some();
        let checkpoint = |trainer: &Trainer, order: &BatchOrder, optimizer: &AdamW| {
            let models = [Trained { name: "model", model: policy.as_ref(), optimizer }];
            trainer.save_checkpoint(&models, &tokenizer, c.max_length, DataPosition::Batches(order.clone()))
        };
        let tokens_of = |rows: &[&[usize]]| rows.iter().flat_map(|r| r.iter()).map(|&i| train[i].len()).sum::<usize>();
        let held_out: Vec<&Conversation> = val_conversations.iter().take(training.eval.num_prompts).collect();
        let pattern = training
            .eval
            .response_pattern
            .as_deref()
            .map(Regex::new)
            .transpose()
            .map_err(|e| Error::Other(e.to_string()))?;
        let evaluate = |step: u64| -> Result<Evaluation> {
            let loss = validation_loss(policy.as_ref(), &validation, &training, device, group.as_ref())?;
            // Rank 0 alone answers: it alone logs and reports.
            if !ctx.is_main() {
                return Ok(Evaluation { loss, compliance: None });
            }
            let answers = answer(policy.as_ref(), &tokenizer, template, &held_out, &training.eval, &c, &stops)?;
            let compliance = pattern
                .as_ref()
                .map(|p| answers.iter().filter(|a| p.is_match(&a.answer)).count() as f64 / answers.len().max(1) as f64);
            log_evaluation(ctx, step, loss, compliance, &answers);
            Ok(Evaluation { loss, compliance })
        };
        let initial = if is_resumed { None } else { Some(trainer.untimed(|| evaluate(0))?) };

        // Train: each step is one planned batch, its micro-batches' gradients accumulated,
        // the loss a mean over the step's target tokens. In a distributed run each rank
        // takes its share of the batch's rows and divides its summed loss by the batch's
        // targets over the world size: the trainer's average over the ranks is then the
        // mean over the whole batch, as in one process.
        let micro = training.micro_batch_size();
        let mut latest = initial;
        while trainer.running() {
            if trainer.stop_requested() {
                return Err(trainer.stop(checkpoint(&trainer, &order, &optimizer)?));
            }
            trainer.start_step(&mut [&mut optimizer]);
            let batch = &plan.batches[order.next_batch(1)[0] as usize];
            let rows: Vec<&[usize]> = batch.iter().map(|&r| plan.rows[r].as_slice()).collect();
            let per_rank_targets = count_targets(&train, &rows) as f64 / ctx.world_size() as f64;
            let rows = &rows[trainer.shard(rows.len())];
            let mut loss = 0.0;
            let chunks = rows.len().div_ceil(micro);
            for (i, chunk) in rows.chunks(micro).enumerate() {
                let batch = collate(&train, chunk, device);
                let sum = training.precision.forward(device, || target_loss_sum(policy.as_ref(), &batch))??;
                trainer.backward(&(&sum / per_rank_targets), i + 1 == chunks)?;
                loss += sum.double_value(&[]) / per_rank_targets;
            }
            if !trainer.finish_step(&mut [&mut optimizer], loss, tokens_of(rows) as u64, rows.len())? {
                continue;
            }
            let step = trainer.state.step;
            if step % training.log_every == 0 || step == max_steps {
                ctx.scalar("train/epoch", step as i64, step as f64 / plan.batches.len() as f64);
            }
            if trainer.eval_due() {
                let evaluation = trainer.untimed(|| evaluate(step))?;
                tracing::info!("step {step}: train/loss {:.4} {evaluation}", trainer.last.loss);
                latest = Some(evaluation);
            }
            if trainer.checkpoint_due() {
                checkpoint(&trainer, &order, &optimizer)?;
            }
        }

        let final_dir = trainer.save_final(policy.as_ref(), &tokenizer, c.max_length)?;
        let mut metrics = trainer.metrics();
        metrics.insert("data/train_examples".to_string(), train.len() as f64);
        for (prefix, evaluation) in [("eval/", &latest), ("eval/initial_", &initial)] {
            if let Some(e) = evaluation {
                metrics.insert(format!("{prefix}loss"), e.loss);
                if let Some(compliance) = e.compliance {
                    metrics.insert(format!("{prefix}format_compliance"), compliance);
                }
            }
        }
        let mut hparams = training.hparams(max_steps);
        hparams.extend([
            ("max_length".to_string(), c.max_length.into()),
            ("train_on".to_string(), format!("{:?}", c.train_on).to_lowercase().into()),
            ("batching".to_string(), format!("{:?}", c.batching).to_lowercase().into()),
            ("parameters".to_string(), policy.num_parameters().into()),
        ]);
        ctx.hparams(&hparams, &["eval/loss", "eval/format_compliance"]);
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
    // The LM head and its cross-entropy run a chunk of positions at a time.
    let (inputs, positions, mask) = (&batch.input_ids, Some(&batch.positions), batch.attention_mask.as_ref());
    summed_token_loss(policy, inputs, positions, mask, &batch.targets, HeadChunks::Auto)
}

/// Mean loss per target token over the validation examples (shortest first, at most
/// `eval.max_batches` micro-batches of them). In a distributed run each rank scores its
/// share of them and the sums are added over the ranks.
fn validation_loss(
    policy: &dyn Policy,
    validation: &[Example],
    training: &TrainingConfig,
    device: tch::Device,
    group: Option<&ProcessGroup>,
) -> Result<f64> {
    let _no_grad = tch::no_grad_guard();
    let micro = training.micro_batch_size();
    let mut order: Vec<usize> = (0..validation.len()).collect();
    order.sort_by_key(|&i| validation[i].len());
    order.truncate(training.eval.batch_limit().saturating_mul(micro));
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
    let mine = &order[data_parallel::shard_range(order.len(), rank, world)];
    let rows: Vec<&[usize]> = mine.chunks(1).collect();
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in rows.chunks(micro) {
        let batch = collate(validation, chunk, device);
        total += training.precision.forward(device, || target_loss_sum(policy, &batch))??.double_value(&[]);
        count += batch.target_count;
    }
    let sums = data_parallel::reduce_values(group, &[total, count as f64], ReduceOp::Sum)?;
    Ok(sums[0] / sums[1].max(1.0))
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
    eval: &EvalConfig,
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
    asks.extend(eval.sample_prompts.iter().map(|p| (vec![ChatMessage::new("user", p.clone())], None)));
    if asks.is_empty() {
        return Ok(Vec::new());
    }
    // Prompts keep their end, leaving max_new_tokens of max_length; answers stop at the
    // model's context, or at max_length where the model was trained on longer sequences
    // than its config declares (with a warning where max_new_tokens leaves no room).
    let context = policy.context_length().map_or(c.max_length, |context| c.max_length.max(context.max(0) as usize));
    let prompts = asks
        .iter()
        .map(|(messages, _)| {
            let text = template.render_with(messages, true, &c.template_variables)?;
            let mut ids = tokenizer.encode(&text)?;
            let keep = c.max_length.saturating_sub(eval.max_new_tokens).max(1);
            if ids.len() > keep {
                ids.drain(..ids.len() - keep); // the prompt's end, as in training
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let settings = GenerationSettings {
        max_new_tokens: eval.max_new_tokens,
        temperature: 0.0,
        stop_tokens: stops.to_vec(),
        context: Some(context),
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

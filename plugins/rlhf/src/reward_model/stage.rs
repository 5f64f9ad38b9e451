//! `rlhf.reward_model`: a transformer with a scalar head trained on preference pairs.
//!
//! Starts from the previous stage's causal LM (a fresh `score` head on its transformer)
//! or from a saved scalar-head model to continue. Reads pairs (see [`crate::preference`]),
//! scores both sides of each, and minimises −log σ(r_c − r_r − margin) (+ the optional
//! centering term, see [`super::loss`]). Each log step writes `train/accuracy`,
//! `train/margin`, `train/mean_reward`, `train/min_reward`, `train/max_reward` over the
//! pairs since the last log; each evaluation the same under `eval/` (and `eval/loss`) on
//! the held-out pairs. The model is saved as transformers' `*ForSequenceClassification`
//! with one label, with its tokenizer, under `<output_dir>/<stage>/final/`.
//!
//! Sequences longer than `max_length` keep their last `max_length` tokens — the score is
//! read at the last token, and the end of the response is what the preference is about
//! (TRL truncates or filters; we truncate): the number truncated is logged as a warning
//! and as `data/{train,validation}_truncated`, never silent.
//!
//! The loop below is the whole algorithm, top to bottom.
use std::path::PathBuf;

use plumb_core::data::template::{use_template, TemplateChoice};
use plumb_core::data::{seeded_rng, BatchOrder};
use plumb_core::device::device_name;
use plumb_core::dist::{data_parallel, ProcessGroup};
use plumb_core::model::scalar_head::{Merged, ScalarHeadModel};
use plumb_core::optim::AdamW;
use plumb_core::plugin::ValidateContext;
use plumb_core::rand::seq::SliceRandom;
use plumb_core::tch::{self, Device, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{note_data, require, DataPosition, Length, TrainSection, Trained, Trainer, TrainingConfig};
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use serde::Deserialize;

use super::loss::{pairwise_loss_sum, RewardStats};
use super::scoring::{collate, keep_end, pad_id};
use crate::preference::{Pair, PreferenceData};

/// The stage's own recipe section, beside the training fields every stage shares
/// ([`TrainingConfig`]).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardModelConfig {
    /// The preference pairs.
    pub data: PreferenceData,
    /// Tokens per sequence (prompt and response); longer ones keep their end.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// TRL's `center_rewards_coefficient`: adds coef · mean((r_c + r_r)²) to the loss.
    #[serde(default)]
    pub center_rewards_coef: Option<f64>,
    /// The chat template for conversational pairs: `auto`, `model`, `default`, `chatml`
    /// or a `.jinja` file (as SFT's `template`).
    #[serde(default)]
    pub template: TemplateChoice,
}

fn default_max_length() -> usize {
    512
}

/// A pair as token ids.
struct TokenPair {
    chosen: Vec<i64>,
    rejected: Vec<i64>,
    margin: f64,
}

impl TokenPair {
    fn tokens(&self) -> usize {
        self.chosen.len() + self.rejected.len()
    }
}

pub struct RewardModelStage;

impl Stage for RewardModelStage {
    const NAME: &'static str = "reward_model";
    const DESCRIPTION: &'static str =
        "Reward-model training on preference pairs (JSONL chosen/rejected), saved as a sequence classifier";
    type Config = TrainSection<RewardModelConfig>;

    fn validate(config: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        let TrainSection { train: training, stage: c } = config;
        require(c.max_length >= 2, "max_length", "expected at least 2")?;
        if let Some(coef) = c.center_rewards_coef {
            require(coef.is_finite() && coef >= 0.0, "center_rewards_coef", "expected a number >= 0")?;
        }
        c.template.validate()?;
        training.validate(Length::StepsOrEpochs)?;
        c.data.validate(ctx)?;
        ctx.require_input_model("a reward model starts from a model (a causal LM, or a saved reward model)")?;
        Ok(())
    }

    fn run(config: Self::Config, ctx: &mut RunContext) -> Result<StageOutput> {
        let TrainSection { train: training, stage: c } = config;
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let Some(model_dir) = ctx.input_model().map(PathBuf::from) else {
            return Err(Error::config(
                "model",
                "a reward model starts from a model: give the stage a `model:` directory (a causal LM or a saved reward model, HF layout) or put it after a stage that makes one",
            ));
        };

        // Data: pairs, a held-out split, tokens (the template renders conversations).
        let (train_pairs, val_pairs) = c.data.read_split(ctx)?;
        let mut tokenizer = Tokenizer::from_dir(&model_dir)?;
        use_template(&c.template, &mut tokenizer, &model_dir)?;
        let pad = pad_id(&model_dir, &tokenizer)?;
        let to_tokens = |pairs: &[Pair], name: &str, file: &PathBuf| -> Result<Vec<TokenPair>> {
            let mut truncated = 0;
            let mut out = Vec::with_capacity(pairs.len());
            for pair in pairs {
                if ctx.should_stop() {
                    tracing::warn!("stopped on request while tokenizing the {name} pairs");
                    return Err(Error::Cancelled);
                }
                let in_line = |e: Error| Error::file(file, format!("line {}: {e}", pair.line));
                let template = tokenizer.chat_template();
                let mut chosen = pair.whole(&pair.chosen).tokenize(&tokenizer, template, pad).map_err(in_line)?;
                let mut rejected = pair.whole(&pair.rejected).tokenize(&tokenizer, template, pad).map_err(in_line)?;
                let cut = keep_end(&mut chosen, c.max_length) | keep_end(&mut rejected, c.max_length);
                truncated += usize::from(cut);
                out.push(TokenPair { chosen, rejected, margin: pair.margin });
            }
            if truncated > 0 {
                let message = format!(
                    "{name}: {truncated} of {} pairs had a side longer than max_length {}; it kept its last {} tokens",
                    pairs.len(),
                    c.max_length,
                    c.max_length
                );
                note_data(ctx, &format!("data/{name}_truncated"), &message);
            }
            Ok(out)
        };
        let validation_file = c.data.validation.as_ref().unwrap_or(&c.data.train);
        let train = to_tokens(&train_pairs, "train", &c.data.train)?;
        let validation = to_tokens(&val_pairs, "validation", validation_file)?;
        // Batches of `batch_size` pairs, fixed once from the seed; their order is shuffled every epoch.
        let mut shuffled: Vec<usize> = (0..train.len()).collect();
        shuffled.shuffle(&mut seeded_rng(ctx.seed()));
        let batches: Vec<&[usize]> = shuffled.chunks(training.batch_size.max(1)).collect();
        let max_steps = training.total_steps(batches.len());
        tracing::info!(
            "data: {} train / {} validation pairs, {} batches per epoch; {max_steps} steps",
            train.len(),
            validation.len(),
            batches.len()
        );

        // Model, optimizer and data order; or all of them from the latest checkpoint.
        let mut trainer = Trainer::new(ctx, &training, max_steps)?;
        // In a distributed run, the group the train and held-out figures are combined over.
        let group = ctx.process_group()?;
        let lora = training.lora.as_ref();
        let model =
            ScalarHeadModel::for_training(&model_dir, trainer.resume_dir(), device, Kind::Float, lora, ctx.seed())?;
        tokenizer.check_fits_embedding(model.vocab_size(), &model_dir)?;
        let count =
            |vs: &plumb_core::tch::nn::VarStore| vs.variables().values().map(Tensor::numel).sum::<usize>() as i64;
        let parameters = count(model.trainable());
        tracing::info!(
            "model: {parameters} trainable parameters on {}, from {}",
            device_name(device),
            model_dir.display()
        );
        if let Some(adapters) = model.lora() {
            let all = count(model.var_store()) + count(model.trainable());
            tracing::info!(
                "LoRA r={} alpha={} on {} layers (the head trained whole): {parameters} trainable parameters of {all} ({:.3}%), AdamW state {:.2} MB instead of {:.2} MB",
                adapters.config().rank,
                adapters.config().alpha,
                adapters.modules().len(),
                100.0 * parameters as f64 / all as f64,
                (8 * parameters) as f64 / 1e6,
                (8 * all) as f64 / 1e6
            );
        }
        let mut optimizer = training.optimizer.adamw(model.trainable());
        let mut order = match trainer.restore(&mut [("model", &mut optimizer)])? {
            None => BatchOrder::new(batches.len(), ctx.seed()),
            Some(DataPosition::Batches(order)) => order,
            Some(DataPosition::Stream(_)) => {
                return Err(Error::Other("the checkpoint's trainer_state.json: data: expected a batch order".into()))
            }
        };
        let is_resumed = trainer.resume_dir().is_some();
        let checkpoint = |trainer: &Trainer, order: &BatchOrder, optimizer: &AdamW| {
            let saving = model.with_pad(pad);
            let models = [Trained { name: "model", model: &saving, optimizer }];
            trainer.save_checkpoint(&models, &tokenizer, c.max_length, DataPosition::Batches(order.clone()))
        };
        let evaluate = |step: u64| -> Result<RewardStats> {
            let stats = held_out(&model, &validation, &training, pad, device, c.center_rewards_coef, group.as_ref())?;
            stats.log(ctx, "eval/", step);
            Ok(stats)
        };
        let initial = if is_resumed { None } else { Some(trainer.untimed(|| evaluate(0))?) };

        // Train: each step is one batch of pairs, its micro-batches' gradients accumulated,
        // the loss a mean over the step's pairs. In a distributed run each rank takes its
        // share of the batch's pairs and divides its summed loss by the batch's pairs over
        // the world size: the trainer's average over the ranks is then the mean over the
        // whole batch, as in one process.
        let micro = training.micro_batch_size();
        let mut window = RewardStats::default();
        let mut latest = initial;
        while trainer.running() {
            if trainer.stop_requested() {
                return Err(trainer.stop(checkpoint(&trainer, &order, &optimizer)?));
            }
            trainer.start_step(&mut [&mut optimizer]);
            let batch = batches[order.next_batch(1)[0] as usize];
            let per_rank_pairs = batch.len() as f64 / ctx.world_size() as f64;
            let batch = &batch[trainer.shard(batch.len())];
            let (mut loss, mut tokens) = (0.0, 0);
            let mut step_stats = RewardStats::default();
            let chunks = batch.len().div_ceil(micro);
            for (n, chunk) in batch.chunks(micro).enumerate() {
                let pairs: Vec<&TokenPair> = chunk.iter().map(|&i| &train[i]).collect();
                let (sum, chosen, rejected) = training.precision.forward(device, || {
                    let (chosen, rejected, margin) = score_pairs(&model, &pairs, pad, device)?;
                    let sum = pairwise_loss_sum(&chosen, &rejected, &margin, c.center_rewards_coef);
                    Ok::<_, Error>((sum, chosen, rejected))
                })??;
                trainer.backward(&(&sum / per_rank_pairs), n + 1 == chunks)?;
                let sum = sum.double_value(&[]);
                loss += sum / per_rank_pairs;
                step_stats.add(&to_vec(&chosen)?, &to_vec(&rejected)?, sum);
                tokens += pairs.iter().map(|p| p.tokens()).sum::<usize>();
            }
            if !trainer.finish_step(&mut [&mut optimizer], loss, tokens as u64, batch.len())? {
                continue;
            }
            window.merge(&step_stats);
            let step = trainer.state.step;
            if step % training.log_every == 0 || step == max_steps {
                window.over_ranks(group.as_ref())?.log(ctx, "train/", step);
                ctx.scalar("train/epoch", step as i64, step as f64 / batches.len() as f64);
                window = RewardStats::default();
            }
            if trainer.eval_due() {
                let stats = trainer.untimed(|| evaluate(step))?;
                tracing::info!(
                    "step {step}: train/loss {:.4} eval/loss {:.4} eval/accuracy {:.3} eval/margin {:.3}",
                    trainer.last.loss,
                    stats.loss(),
                    stats.accuracy(),
                    stats.margin()
                );
                latest = Some(stats);
            }
            if trainer.checkpoint_due() {
                checkpoint(&trainer, &order, &optimizer)?;
            }
        }

        // With LoRA, the final model is merged: a plain reward model for `rlhf.learned`,
        // PPO's value model and transformers (the checkpoints keep the adapter, to resume).
        let final_dir = match model.lora() {
            Some(_) => trainer.save_final(&Merged(model.with_pad(pad)), &tokenizer, c.max_length)?,
            None => trainer.save_final(&model.with_pad(pad), &tokenizer, c.max_length)?,
        };
        let mut metrics = trainer.metrics();
        metrics.insert("data/train_pairs".to_string(), train.len() as f64);
        metrics.insert("data/validation_pairs".to_string(), validation.len() as f64);
        for (prefix, stats) in [("eval/", &latest), ("eval/initial_", &initial)] {
            if let Some(stats) = stats {
                metrics.extend(stats.named(prefix));
            }
        }
        let mut hparams = training.hparams(max_steps);
        hparams.extend([
            ("max_length".to_string(), c.max_length.into()),
            ("center_rewards_coef".to_string(), c.center_rewards_coef.unwrap_or(0.0).into()),
            ("parameters".to_string(), parameters.into()),
        ]);
        ctx.hparams(&hparams, &["eval/accuracy", "eval/loss"]);
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}

/// Scores of both sides of `pairs` in one forward pass: chosen (N,), rejected (N,) and
/// the pairs' margins (N,).
fn score_pairs(
    model: &ScalarHeadModel,
    pairs: &[&TokenPair],
    pad: i64,
    device: Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rows: Vec<&[i64]> =
        pairs.iter().map(|p| p.chosen.as_slice()).chain(pairs.iter().map(|p| p.rejected.as_slice())).collect();
    let (ids, mask) = collate(&rows, pad, device); // (2N, T)
    let scores = model.scores(&ids, &mask)?; // (2N,)
    let n = pairs.len() as i64;
    let margins: Vec<f32> = pairs.iter().map(|p| p.margin as f32).collect();
    Ok((scores.narrow(0, 0, n), scores.narrow(0, n, n), Tensor::from_slice(&margins).to_device(device)))
}

/// Figures over the held-out pairs (at most `eval.max_batches` micro-batches of them). In
/// a distributed run each rank scores its share of them and the figures are combined.
fn held_out(
    model: &ScalarHeadModel,
    validation: &[TokenPair],
    training: &TrainingConfig,
    pad: i64,
    device: Device,
    center: Option<f64>,
    group: Option<&ProcessGroup>,
) -> Result<RewardStats> {
    let _no_grad = tch::no_grad_guard();
    let micro = training.micro_batch_size();
    let mut stats = RewardStats::default();
    let mut all: Vec<&TokenPair> = validation.iter().collect();
    all.truncate(training.eval.batch_limit().saturating_mul(micro));
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world_size()));
    let mine = &all[data_parallel::shard_range(all.len(), rank, world)];
    for chunk in mine.chunks(micro) {
        let (chosen, rejected, margin) =
            training.precision.forward(device, || score_pairs(model, chunk, pad, device))??;
        let sum = pairwise_loss_sum(&chosen, &rejected, &margin, center).double_value(&[]);
        stats.add(&to_vec(&chosen)?, &to_vec(&rejected)?, sum);
    }
    Ok(stats.over_ranks(group)?)
}

fn to_vec(scores: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(scores.detach().to_kind(Kind::Double).to_device(Device::Cpu))?)
}

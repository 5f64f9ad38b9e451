//! `rlhf.dpo`: direct preference optimisation of a causal LM on preference pairs
//! (Rafailov et al. 2023, <https://arxiv.org/abs/2305.18290>), with TRL's `DPOTrainer`
//! semantics and defaults (β 0.1, the sigmoid loss), so its curves compare with TRL's.
//!
//! The policy starts as the stage's input model, which is also the frozen reference. Each
//! step reads top to bottom below: a batch of pairs → for each micro-batch, the summed
//! log-probs of both completions under the policy (one forward over 2N sequences) and
//! under the reference (computed here, or once for every pair before training with
//! `precompute_ref_log_probs`, after which the reference model is freed) → the loss of
//! [`super::loss`], its gradient accumulated → one update. Every log step writes TRL's
//! figures over the pairs since the last log (`rewards/chosen`, `rewards/rejected`,
//! `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`); each
//! evaluation (the first at step 0, where the policy is the reference: every implicit
//! reward 0, the loss log 2) the same and `eval/loss` under `eval/` on the held-out pairs. The policy is saved in HF layout with its tokenizer (and chat template).
//!
//! With a `lora:` block the policy trains adapters only, and the reference is the policy
//! with its adapters switched off: no second copy of the model is loaded. The final model
//! and the checkpoints' policy are then the adapter in PEFT's layout.
//!
//! Data-parallel (`plumb run --nproc N`, torchrun): each rank takes its share of every
//! batch of pairs and of the held-out pairs; gradients are averaged over the ranks and
//! every figure is of the whole batch, so the run follows the single-process one.
//!
//! Resuming: a checkpoint holds the policy, its optimizer and the batch order; the
//! reference's log-probs are recomputed from the input model, the same numbers as before.
use std::path::PathBuf;

use plumb_core::data::template::{use_template, TemplateChoice};
use plumb_core::device::device_name;
use plumb_core::dist::data_parallel;
use plumb_core::model::{self, Policy};
use plumb_core::optim::AdamW;
use plumb_core::plugin::ValidateContext;
use plumb_core::tch::{self, Device, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{note_data, require, DataPosition, Length, TrainSection, Trained, Trainer};
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use serde::Deserialize;

use super::loss::{dpo_loss, DpoLossSettings, DpoLossType, DpoStats};
use super::tokens::{batches, completion_log_probs, tokenize, TokenPair};
use crate::preference::{Pair, PreferenceData};

/// The stage's own recipe section, beside the training fields every stage shares
/// (`plumb_core::train::TrainingConfig`). Defaults are TRL's `DPOConfig`'s.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// The preference pairs (TRL's formats: prompt/chosen/rejected, plain or chat).
    pub data: PreferenceData,
    /// β: how strongly the policy is held to the reference (higher: closer).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `sigmoid` (DPO) or `ipo`.
    #[serde(default)]
    pub loss_type: DpoLossType,
    /// Conservative DPO's ε in [0, 0.5): the share of pairs taken to be mislabelled (sigmoid only).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Compute the reference's log-probs of every pair once before training, then free the reference model.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    /// The longest prompt in tokens; a longer one keeps its end.
    #[serde(default = "default_max_prompt_length")]
    pub max_prompt_length: usize,
    /// The longest prompt and completion in tokens; a longer completion loses its end.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// The chat template for conversational pairs: `auto`, `model`, `default`, `chatml` or a `.jinja` file.
    #[serde(default)]
    pub template: TemplateChoice,
}

fn default_beta() -> f64 {
    0.1
}
fn default_max_prompt_length() -> usize {
    512
}
fn default_max_length() -> usize {
    1024
}

impl DpoConfig {
    fn loss_settings(&self) -> DpoLossSettings {
        DpoLossSettings { beta: self.beta, loss_type: self.loss_type, label_smoothing: self.label_smoothing }
    }
}

/// Every check that needs no model.
pub fn validate(section: &TrainSection<DpoConfig>, ctx: &ValidateContext) -> Result<()> {
    let TrainSection { train: training, stage: c } = section;
    require(c.beta.is_finite() && c.beta > 0.0, "beta", "expected a number above 0")?;
    require(
        (0.0..0.5).contains(&c.label_smoothing),
        "label_smoothing",
        "expected a number in [0, 0.5) (the share of pairs taken to be mislabelled)",
    )?;
    if c.loss_type == DpoLossType::Ipo && c.label_smoothing > 0.0 {
        return Err(Error::config("label_smoothing", "only with loss_type: sigmoid (IPO has no label smoothing)"));
    }
    require(c.max_prompt_length > 0, "max_prompt_length", "expected a number above 0")?;
    if c.max_length <= c.max_prompt_length {
        return Err(Error::config(
            "max_length",
            format!("expected more than max_prompt_length {} (room for the completions)", c.max_prompt_length),
        ));
    }
    c.template.validate()?;
    training.validate(Length::StepsOrEpochs)?;
    c.data.validate(ctx)?;
    ctx.require_input_model("DPO starts from a policy (the SFT model), which is also its reference")
}

pub struct Dpo;

impl Stage for Dpo {
    const NAME: &'static str = "dpo";
    const DESCRIPTION: &'static str =
        "Direct preference optimisation on preference pairs (sigmoid, IPO, label smoothing) against a frozen reference";
    type Config = TrainSection<DpoConfig>;

    fn validate(config: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        validate(config, ctx)
    }

    fn run(config: Self::Config, ctx: &mut RunContext) -> Result<StageOutput> {
        let TrainSection { train: training, stage: c } = config;
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let Some(model_dir) = ctx.input_model().map(PathBuf::from) else {
            return Err(Error::config(
                "model",
                "DPO starts from a policy: give the stage a `model:` directory (HF layout) or put it after a stage that makes one",
            ));
        };
        let settings = c.loss_settings();
        let average = c.loss_type == DpoLossType::Ipo;

        // Data: pairs, a held-out split, tokens (the template renders conversations).
        let (train_pairs, val_pairs) = c.data.read_split(ctx)?;
        let mut tokenizer = Tokenizer::from_dir(&model_dir)?;
        use_template(&c.template, &mut tokenizer, &model_dir)?;
        let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
        let to_tokens = |pairs: &[Pair], name: &str, file: &PathBuf| -> Result<Vec<TokenPair>> {
            let mut truncated = 0;
            let mut out = Vec::with_capacity(pairs.len());
            for pair in pairs {
                if ctx.should_stop() {
                    return Err(Error::Cancelled);
                }
                let in_line = |e: Error| Error::file(file, format!("line {}: {e}", pair.line));
                let mut tokens = tokenize(pair, &tokenizer, tokenizer.chat_template()).map_err(in_line)?;
                truncated += usize::from(tokens.truncate(c.max_prompt_length, c.max_length));
                out.push(tokens);
            }
            if truncated > 0 {
                let message = format!(
                    "{name}: {truncated} of {} pairs were longer than max_prompt_length {} or max_length {}: prompts kept their end, completions their start",
                    pairs.len(),
                    c.max_prompt_length,
                    c.max_length
                );
                note_data(ctx, &format!("data/{name}_truncated"), &message);
            }
            Ok(out)
        };
        let validation_file = c.data.validation.as_ref().unwrap_or(&c.data.train);
        let train = to_tokens(&train_pairs, "train", &c.data.train)?;
        let validation = to_tokens(&val_pairs, "validation", validation_file)?;
        let (batches, fresh_order) = batches(train.len(), training.batch_size, ctx.seed());
        let max_steps = training.total_steps(batches.len());
        tracing::info!(
            "data: {} train / {} validation pairs, {} batches per epoch; {max_steps} steps",
            train.len(),
            validation.len(),
            batches.len()
        );

        // The policy (with LoRA: the input model and its adapters) and its optimizer, or both
        // from a checkpoint; the frozen reference (with LoRA: the policy with its adapters
        // off), or its log-probs of every pair (then a reference copy is dropped).
        let mut trainer = Trainer::new(ctx, &training, max_steps)?;
        // In a distributed run, the group the train and held-out figures are combined over.
        let group = ctx.process_group()?;
        let lora = training.lora.as_ref();
        let policy = model::load_for_training(&model_dir, trainer.resume_dir(), device, Kind::Float, lora, ctx.seed())?;
        tokenizer.check_fits_embedding(policy.vocab_size() as usize, &model_dir)?;
        tracing::info!(
            "policy: {} trainable parameters on {}, from {}",
            policy.num_parameters(),
            device_name(device),
            model_dir.display()
        );
        let mut reference = match policy.lora() {
            Some(_) => {
                tracing::info!("reference: the policy with its LoRA adapters off (no copy of the model loaded)");
                Some(Reference::AdaptersOff)
            }
            None => Some(Reference::Copy(model::load(&model_dir, device, Kind::Float)?)),
        };
        let micro = training.micro_batch_size();
        let reference_of = |reference: &dyn Policy, pairs: &[TokenPair]| -> Result<Vec<(f64, f64)>> {
            let _no_grad = tch::no_grad_guard();
            let _adapters_off = policy.lora().map(|l| l.disabled());
            let mut out = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(micro) {
                let chunk: Vec<&TokenPair> = chunk.iter().collect();
                let (chosen, rejected) = training
                    .precision
                    .forward(device, || completion_log_probs(reference, &chunk, pad, device, average))??;
                out.extend(to_vec(&chosen)?.into_iter().zip(to_vec(&rejected)?));
            }
            Ok(out)
        };
        let precomputed = match c.precompute_ref_log_probs.then(|| reference.take()).flatten() {
            Some(reference) => {
                let model = reference.policy(policy.as_ref());
                let train_ref = trainer.untimed(|| reference_of(model, &train))?;
                let val_ref = trainer.untimed(|| reference_of(model, &validation))?;
                let pairs = train_ref.len() + val_ref.len();
                match reference {
                    Reference::Copy(_) => {
                        tracing::info!("reference log-probs of {pairs} pairs computed; the reference model is freed")
                    }
                    Reference::AdaptersOff => tracing::info!("reference log-probs of {pairs} pairs computed"),
                }
                Some((train_ref, val_ref))
            }
            None => None,
        };
        let mut optimizer = training.optimizer.adamw(policy.trainable());
        let mut order = match trainer.restore(&mut [("policy", &mut optimizer)])? {
            None => fresh_order,
            Some(DataPosition::Batches(order)) => order,
            Some(DataPosition::Stream(_)) => {
                return Err(Error::Other("the checkpoint's trainer_state.json: data: expected a batch order".into()))
            }
        };
        let length = c.max_length;
        let checkpoint = |trainer: &Trainer, order: &plumb_core::data::BatchOrder, optimizer: &AdamW| {
            let models = [Trained { name: "policy", model: policy.as_ref(), optimizer }];
            trainer.save_checkpoint(&models, &tokenizer, length, DataPosition::Batches(order.clone()))
        };
        // The loss of some pairs (`indices` into `pairs`) and their figures: the reference's
        // log-probs precomputed (`known`) or computed here.
        let pairs_loss =
            |pairs: &[TokenPair], indices: &[usize], known: Option<&[(f64, f64)]>| -> Result<(Tensor, DpoStats)> {
                let chunk: Vec<&TokenPair> = indices.iter().map(|&i| &pairs[i]).collect();
                let (policy_chosen, policy_rejected) = training
                    .precision
                    .forward(device, || completion_log_probs(policy.as_ref(), &chunk, pad, device, average))??;
                let (ref_chosen, ref_rejected) = match (known, &reference) {
                    (Some(known), _) => {
                        let (c, r): (Vec<f64>, Vec<f64>) = indices.iter().map(|&i| known[i]).unzip();
                        let tensor = |v: Vec<f64>| Tensor::from_slice(&v).to_kind(Kind::Float).to_device(device);
                        (tensor(c), tensor(r))
                    }
                    (None, Some(model)) => {
                        let _no_grad = tch::no_grad_guard();
                        let _adapters_off = policy.lora().map(|l| l.disabled());
                        let model = model.policy(policy.as_ref());
                        training
                            .precision
                            .forward(device, || completion_log_probs(model, &chunk, pad, device, average))??
                    }
                    (None, None) => return Err(Error::Other("no reference log-probs and no reference model".into())),
                };
                let out = dpo_loss(&policy_chosen, &policy_rejected, &ref_chosen, &ref_rejected, &settings);
                let mut stats = DpoStats::default();
                stats.add(
                    &to_vec(&out.losses)?,
                    &to_vec(&out.chosen_rewards)?,
                    &to_vec(&out.rejected_rewards)?,
                    &to_vec(&policy_chosen)?,
                    &to_vec(&policy_rejected)?,
                );
                Ok((out.losses.sum(Kind::Float), stats))
            };
        let held_out_ref = precomputed.as_ref().map(|(_, v)| v.as_slice());
        // The held-out figures: each rank scores its share of the pairs evaluated.
        let evaluate = |step: u64| -> Result<DpoStats> {
            let _no_grad = tch::no_grad_guard();
            let mut stats = DpoStats::default();
            let evaluated = validation.len().min(training.eval.batch_limit().saturating_mul(micro));
            let (rank, world) = (ctx.rank(), ctx.world_size());
            let mine: Vec<usize> = data_parallel::shard_range(evaluated, rank, world).collect();
            for chunk in mine.chunks(micro) {
                stats.merge(&pairs_loss(&validation, chunk, held_out_ref)?.1);
            }
            let stats = stats.over_ranks(group.as_ref())?;
            stats.log(ctx, "eval/", step);
            Ok(stats)
        };
        if trainer.resume_dir().is_none() {
            trainer.untimed(|| evaluate(0))?;
        }

        // Train: each step one batch of pairs, its micro-batches' gradients accumulated, the
        // loss a mean over the step's pairs. In a distributed run each rank takes its share
        // of the pairs and divides its summed loss by the batch's pairs over the world size:
        // the trainer's average over the ranks is then the mean over the whole batch.
        let train_ref = precomputed.as_ref().map(|(t, _)| t.as_slice());
        let mut window = DpoStats::default();
        let mut latest = None;
        while trainer.running() {
            if trainer.stop_requested() {
                return Err(trainer.stop(checkpoint(&trainer, &order, &optimizer)?));
            }
            trainer.start_step(&mut [&mut optimizer]);
            let batch = &batches[order.next_batch(1)[0] as usize];
            let per_rank_pairs = batch.len() as f64 / ctx.world_size() as f64;
            let batch = &batch[trainer.shard(batch.len())];
            let (mut loss, mut tokens) = (0.0, 0);
            let mut step_stats = DpoStats::default();
            let chunks = batch.len().div_ceil(micro);
            for (i, chunk) in batch.chunks(micro).enumerate() {
                let (sum, stats) = pairs_loss(&train, chunk, train_ref)?;
                trainer.backward(&(&sum / per_rank_pairs), i + 1 == chunks)?;
                loss += stats.loss_sum / per_rank_pairs;
                step_stats.merge(&stats);
                tokens += chunk.iter().map(|&i| train[i].tokens()).sum::<usize>();
            }
            if !trainer.finish_step(&mut [&mut optimizer], loss, tokens as u64, batch.len())? {
                continue;
            }
            window.merge(&step_stats);
            let step = trainer.state.step;
            if step % training.log_every == 0 || step == max_steps {
                window.over_ranks(group.as_ref())?.log(ctx, "", step);
                ctx.scalar("train/epoch", step as i64, step as f64 / batches.len() as f64);
                window = DpoStats::default();
            }
            if trainer.eval_due() {
                let stats = trainer.untimed(|| evaluate(step))?;
                tracing::info!(
                    "step {step}: train/loss {:.4} eval/loss {:.4} eval/rewards/accuracies {:.3} eval/rewards/margins {:.3}",
                    trainer.last.loss,
                    stats.value("loss"),
                    stats.value("rewards/accuracies"),
                    stats.value("rewards/margins"),
                );
                latest = Some(stats);
            }
            if trainer.checkpoint_due() {
                checkpoint(&trainer, &order, &optimizer)?;
            }
        }

        let final_dir = trainer.save_final(policy.as_ref(), &tokenizer, c.max_length)?;
        let mut metrics = trainer.metrics();
        metrics.insert("data/train_pairs".to_string(), train.len() as f64);
        metrics.insert("data/validation_pairs".to_string(), validation.len() as f64);
        if let Some(stats) = &latest {
            metrics.extend(stats.named("eval/"));
        }
        let mut hparams = training.hparams(max_steps);
        hparams.extend([
            ("beta".to_string(), c.beta.into()),
            ("label_smoothing".to_string(), c.label_smoothing.into()),
            ("max_length".to_string(), c.max_length.into()),
        ]);
        ctx.hparams(&hparams, &["eval/rewards/accuracies", "eval/loss"]);
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}

/// The frozen reference: the policy with its LoRA adapters off, or a copy of the input model.
enum Reference {
    AdaptersOff,
    Copy(Box<dyn Policy>),
}

impl Reference {
    /// The model whose log-probs are the reference's, given the `policy` (its adapters
    /// switched off by the caller, for [`Reference::AdaptersOff`]).
    fn policy<'a>(&'a self, policy: &'a dyn Policy) -> &'a dyn Policy {
        match self {
            Reference::AdaptersOff => policy,
            Reference::Copy(copy) => copy.as_ref(),
        }
    }
}

fn to_vec(values: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(values.detach().to_kind(Kind::Double).to_device(Device::Cpu))?)
}

//! `rlhf.grpo`: group relative policy optimisation (Shao et al. 2024,
//! <https://arxiv.org/abs/2402.03300>) with TRL's `GRPOTrainer` semantics, defaults and
//! metric names, and DAPO's options (<https://arxiv.org/abs/2503.14476>): clip-higher, the
//! token-level loss, the overlong filter and penalty, dynamic sampling.
//!
//! Each step reads top to bottom below: draw `batch_size / G` prompts and sample G
//! completions of each → score them with the recipe's rewards (weighted; the overlong
//! penalty added) → with dynamic sampling, drop the groups whose rewards are all equal and
//! draw more prompts, up to `max_rounds` rounds → each completion's advantage against its
//! group, A = (r − mean) / (std + 1e-4) (or the batch's std, or none) → the reference's
//! log-probs when β > 0 (with β = 0 no reference model is loaded) → `num_iterations`
//! passes over the completions in shuffled minibatches, each one update on the clipped
//! surrogate (+ β·k3 KL), aggregated as `loss_type` says → TensorBoard → a checkpoint
//! when due. There is no value model: the group is the baseline.
//!
//! The sampling log-probs are the "old" ones of the ratio (the policy that sampled is the
//! one trained, so the ratio starts at 1); they are taken, as in training, at the sampling
//! temperature. Every log-prob (the policy's and the reference's) comes through core's
//! chunked head: no (B, R, V) logits are kept.
//!
//! With a `lora:` block the policy trains adapters only, and the reference (β > 0) is the
//! policy with its adapters switched off: no second copy of the model is loaded. The final
//! model and the checkpoints' policy are then the adapter in PEFT's layout.
//!
//! Data-parallel (`plumb run --nproc N`, torchrun): every rank draws the same prompts and
//! samples the groups of its share of them (from a stream of its own); the ranks agree on
//! how many groups were kept (dynamic sampling's rounds), and the advantages, each
//! update's minibatch and its loss normaliser (sequences, tokens) and every figure are of
//! the global batch: a rank trains on its own rows of each global minibatch, and the
//! gradients are averaged over the ranks.
//!
//! Resuming: a checkpoint holds the policy, its optimizer and the prompt order; each
//! step's sampling and shuffles are seeded from the run's seed and the step number, so a
//! resumed run repeats the uninterrupted one.
pub mod config;
pub mod loss;
pub mod stats;

use std::path::PathBuf;
use std::time::Instant;

use plumb_core::data::{seeded_rng, BatchOrder};
use plumb_core::dist::{data_parallel, ProcessGroup, ReduceOp};
use plumb_core::model;
use plumb_core::model::generate::{Finish, GenerationSettings};
use plumb_core::plugin::ValidateContext;
use plumb_core::rand::seq::SliceRandom;
use plumb_core::reward::{RewardSet, ScorePair};
use plumb_core::rollout::{
    group_advantages, policy_response_scores, rank_seed, sample, step_seed, Experience, UpdateSize,
};
use plumb_core::tch::{self, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{DataPosition, TrainSection, Trained, Trainer};
use plumb_core::Optimizer;
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use serde::{Deserialize, Serialize};

use crate::prompts::{encode_prompts, log_samples, score_pairs, Prompt, StopToken};
use config::{micro_batch, minibatch, GrpoConfig};
use loss::{micro_batch_loss, GrpoLossSettings};
use stats::{mean_std, GrpoStats};

pub struct Grpo;

/// What a GRPO checkpoint holds beyond the policy, its optimizer and the prompt order.
#[derive(Serialize, Deserialize)]
struct GrpoState {
    dropped_prompts: usize,
}

impl Stage for Grpo {
    const NAME: &'static str = "grpo";
    const DESCRIPTION: &'static str =
        "GRPO against the recipe's rewards: G completions per prompt, group-relative advantages, clipped ratio (clip-higher), optional k3 KL";
    type Config = TrainSection<GrpoConfig>;

    fn validate(config: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        config::validate(config, ctx)
    }

    fn run(section: Self::Config, ctx: &mut RunContext) -> Result<StageOutput> {
        let (minibatch_size, micro) = (minibatch(&section), micro_batch(&section));
        let TrainSection { train: training, stage: c } = section;
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let Some(model_dir) = ctx.input_model().map(PathBuf::from) else {
            return Err(Error::config(
                "model",
                "GRPO starts from a policy: give the stage a `model:` directory (HF layout) or put it after a stage that makes one",
            ));
        };
        let group = c.num_generations;
        let prompts_per_step = training.batch_size / group;
        let world = ctx.world_size();
        if prompts_per_step < world {
            return Err(Error::config(
                "batch_size",
                format!(
                    "{} completions are {prompts_per_step} prompts × {group}: fewer prompts than the {world} ranks (each rank samples at least one group)",
                    training.batch_size
                ),
            ));
        }

        // Prompts that fit, as tokens; the stop tokens; the step count.
        let tokenizer = Tokenizer::from_dir(&model_dir)?;
        let (prompts, encoded, dropped_prompts) =
            encode_prompts(&c.data, &tokenizer, c.max_prompt_length, c.long_prompts)?;
        let stops = match c.stop_token {
            StopToken::Eos => tokenizer.eos_ids(),
            StopToken::None => Vec::new(),
        };
        let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
        let max_steps = training.total_steps((encoded.len() / prompts_per_step).max(1));
        tracing::info!(
            "grpo: {} prompts ({dropped_prompts} dropped as longer than max_prompt_length {}), {prompts_per_step} prompts × {group} completions a step; {max_steps} steps",
            encoded.len(),
            c.max_prompt_length
        );

        // The policy (with LoRA: the input model and its adapters) and its optimizer, or
        // both and the prompt order from a checkpoint. The reference only when the KL enters
        // the loss: with LoRA the policy itself with its adapters off, else a frozen copy.
        let mut trainer = Trainer::new(ctx, &training, max_steps)?;
        // In a distributed run, the ranks the rollout's counts and figures are combined over.
        let ranks = ctx.process_group()?;
        let ranks = ranks.as_ref();
        let lora = training.lora.as_ref();
        let policy = model::load_for_training(&model_dir, trainer.resume_dir(), device, Kind::Float, lora, ctx.seed())?;
        tokenizer.check_fits_embedding(policy.vocab_size() as usize, &model_dir)?;
        let reference = match (c.beta > 0.0, policy.lora()) {
            (false, _) => Reference::None,
            (true, Some(_)) => {
                tracing::info!("reference: the policy with its LoRA adapters off (no copy of the model loaded)");
                Reference::AdaptersOff
            }
            (true, None) => Reference::Copy(model::load(&model_dir, device, Kind::Float)?),
        };
        let mut adamw = training.optimizer.adamw(policy.trainable());
        let mut order = match trainer.restore(&mut [("policy", &mut adamw)])? {
            None => BatchOrder::new(encoded.len(), ctx.seed()),
            Some(DataPosition::Batches(order)) => order,
            Some(DataPosition::Stream(_)) => return Err(Error::Other("a GRPO checkpoint holds a prompt order".into())),
        };
        let length = c.max_prompt_length + c.max_completion_length;
        let checkpoint = |trainer: &Trainer, order: &BatchOrder, adamw: &_| {
            let models = [Trained { name: "policy", model: policy.as_ref(), optimizer: adamw }];
            let state = serde_json::to_value(GrpoState { dropped_prompts }).map_err(|e| Error::Other(e.to_string()))?;
            trainer.save_checkpoint_with(&models, &tokenizer, length, DataPosition::Batches(order.clone()), Some(state))
        };
        let settings = GrpoLossSettings {
            epsilon_low: c.epsilon,
            epsilon_high: c.epsilon_high(),
            beta: c.beta,
            loss_type: c.loss_type,
            temperature: c.temperature,
        };
        let max_rounds = c.dynamic_sampling.map_or(1, |d| d.max_rounds);
        let mut reward_set = RewardSet::new(ctx, &c.reward);
        let mut last_stats = GrpoStats::default();

        while trainer.running() {
            if trainer.stop_requested() {
                return Err(trainer.stop(checkpoint(&trainer, &order, &adamw)?));
            }
            trainer.start_step(&mut [&mut adamw]);
            let step = trainer.state.step + 1;
            let seed = step_seed(ctx.seed(), step);
            let rollout_started = Instant::now();

            // 1. Sample G completions of each prompt (this rank's share of them) and score
            //    them; with dynamic sampling, keep only groups whose rewards differ, drawing
            //    more prompts until the global batch is full or the rounds are spent.
            let mut rollout = Rollout::default();
            let (mut rounds, mut kept_groups) = (0, 0);
            while kept_groups < prompts_per_step && rounds < max_rounds {
                let rows = order.next_batch(prompts_per_step - kept_groups);
                let rows = &rows[trainer.shard(rows.len())];
                if !rows.is_empty() {
                    let batch: Vec<&Prompt> =
                        rows.iter().flat_map(|&i| std::iter::repeat_n(&prompts[i as usize], group)).collect();
                    let tokens: Vec<Vec<i64>> =
                        rows.iter().flat_map(|&i| std::iter::repeat_n(encoded[i as usize].clone(), group)).collect();
                    let generation = GenerationSettings {
                        max_new_tokens: c.max_completion_length,
                        temperature: c.temperature,
                        stop_tokens: stops.clone(),
                        seed: Some(rank_seed(step_seed(seed, rounds as u64), ctx.rank())),
                        pad_token: pad,
                        context: Some(length),
                        ..Default::default()
                    };
                    let sampled = sample(policy.as_ref(), &tokens, &generation, pad)?;
                    let pairs = score_pairs(&batch, &sampled, &tokenizer)?;
                    let scored = reward_set.score(&pairs)?;
                    let lengths: Vec<usize> = sampled.responses.iter().map(Vec::len).collect();
                    let mut rewards = scored.total.clone();
                    if let Some(penalty) = &c.overlong_penalty {
                        for (reward, &length) in rewards.iter_mut().zip(&lengths) {
                            *reward += penalty.of(length, c.max_completion_length);
                        }
                    }
                    let keep: Vec<bool> =
                        rewards.chunks(group).map(|g| c.dynamic_sampling.is_none() || mean_std(g).1 > 1e-8).collect();
                    rollout.add(&sampled, &pairs, &scored.parts, &rewards, &keep, group)?;
                }
                rounds += 1;
                kept_groups = data_parallel::reduce_values(ranks, &[rollout.groups as f64], ReduceOp::Sum)?[0] as usize;
            }
            let rollout_seconds = rollout_started.elapsed().as_secs_f64();

            // 2. Group-relative advantages of the kept completions (of every rank's: this
            //    rank's rows are `mine` of the global batch), the reference's log-probs, the
            //    overlong filter.
            let kept = data_parallel::gather_values(ranks, &rollout.kept_rewards)?;
            let offset: usize = kept[..ctx.rank()].iter().map(Vec::len).sum();
            let mine = offset..offset + rollout.kept_rewards.len();
            let kept: Vec<f64> = kept.concat();
            let mut experience = rollout.experience()?;
            if let Some(experience) = &mut experience {
                let advantages = group_advantages(&kept, group, c.scale_rewards).advantages;
                let advantages: Vec<f32> = advantages[mine.clone()].iter().map(|&a| a as f32).collect();
                let advantages = Tensor::from_slice(&advantages).to_device(device).unsqueeze(1); // (B, 1)
                experience.advantages = &experience.response_mask * advantages; // (B, R)
                if c.mask_truncated_completions {
                    let finished: Vec<f32> = rollout.kept_finished.iter().map(|&f| f32::from(u8::from(f))).collect();
                    let finished = Tensor::from_slice(&finished).to_device(device).unsqueeze(1);
                    experience.response_mask = &experience.response_mask * finished;
                }
                let reference_model = match &reference {
                    Reference::None => None,
                    Reference::AdaptersOff => Some(policy.as_ref()),
                    Reference::Copy(copy) => Some(copy.as_ref()),
                };
                if let Some(reference_model) = reference_model {
                    let _no_grad = tch::no_grad_guard();
                    let _adapters_off = policy.lora().map(|l| l.disabled());
                    let scores = policy_response_scores(
                        reference_model,
                        &experience.sequences,
                        &experience.attention_mask,
                        experience.prompt_len,
                        c.temperature,
                        false,
                    )?;
                    experience.ref_log_probs = scores.log_probs * &experience.response_mask;
                    // (B, R)
                }
            }
            // Each kept completion's real tokens, of the global batch (the loss normaliser).
            let row_tokens = match &experience {
                Some(e) => Vec::<f64>::try_from(
                    e.response_mask.sum_dim_intlist([1].as_slice(), false, Kind::Double).to_device(tch::Device::Cpu),
                )?,
                None => Vec::new(),
            };
            let row_tokens: Vec<f64> = data_parallel::gather_values(ranks, &row_tokens)?.concat();

            // 3. μ passes over the global batch in shuffled minibatches, each one update: a
            //    rank computes the loss of its rows of the minibatch, normalised by the whole
            //    minibatch's size, × the world size (the trainer averages over the ranks).
            let mut grad_norms = Vec::new();
            let mut updates = Vec::new();
            let (mut step_loss, mut update_count) = (0.0, 0);
            let world = world as f64;
            if kept.is_empty() {
                tracing::warn!(
                    "step {step}: every group of {rounds} sampling round(s) had equal rewards; no update this step"
                );
            }
            let passes = if kept.is_empty() { 0 } else { c.num_iterations };
            let mut shuffle = seeded_rng(seed ^ 0x5eed);
            for _pass in 0..passes {
                let mut permutation: Vec<i64> = (0..kept.len() as i64).collect();
                permutation.shuffle(&mut shuffle);
                for indices in permutation.chunks(minibatch_size) {
                    let update = UpdateSize {
                        sequences: indices.len(),
                        tokens: indices.iter().map(|&i| row_tokens[i as usize]).sum(),
                        max_completion_length: c.max_completion_length,
                    };
                    let rows: Vec<i64> =
                        indices.iter().filter(|&&i| mine.contains(&(i as usize))).map(|&i| i - offset as i64).collect();
                    adamw.zero_grad();
                    let mut loss = 0.0;
                    if let Some(experience) = experience.as_ref().filter(|_| !rows.is_empty()) {
                        let minibatch = experience.index_select(&Tensor::from_slice(&rows));
                        let parts = minibatch.split(micro as i64);
                        let last = parts.len().saturating_sub(1);
                        for (i, part) in parts.into_iter().enumerate() {
                            let (part_loss, part_stats) = training
                                .precision
                                .forward(device, || micro_batch_loss(policy.as_ref(), &part, &settings, update))??;
                            trainer.backward(&(part_loss * world), i == last)?;
                            loss += part_stats.loss * world;
                            updates.push(part_stats);
                        }
                    }
                    step_loss += loss;
                    update_count += 1;
                    if let Some(norm) = trainer.update(&mut [&mut adamw], loss)? {
                        grad_norms.push(norm);
                    }
                }
            }
            step_loss = data_parallel::reduce_values(ranks, &[step_loss], ReduceOp::Sum)?[0]
                / world
                / f64::from(update_count.max(1));

            // 4. Statistics of the global batch, the trainer's step.
            let with_kl = !matches!(reference, Reference::None);
            let stats = rollout.stats(group, rounds, kept_groups, &updates, with_kl, rollout_seconds, ranks)?;
            let grad_norm = grad_norms.iter().sum::<f64>() / grad_norms.len().max(1) as f64;
            trainer.end_step(step_loss, grad_norm, stats.tokens as u64, kept.len());
            if step % training.log_every == 0 || step == max_steps {
                stats.log(ctx, step);
                log_samples(ctx, step, &rollout.pairs, &rollout.rewards, c.samples);
            }
            last_stats = stats;
            if trainer.checkpoint_due() {
                checkpoint(&trainer, &order, &adamw)?;
            }
        }

        let final_dir = trainer.save_final(policy.as_ref(), &tokenizer, length)?;
        let mut metrics = trainer.metrics();
        metrics.extend([
            ("reward".to_string(), last_stats.reward),
            ("frac_reward_zero_std".to_string(), last_stats.frac_reward_zero_std),
            ("completions/mean_length".to_string(), last_stats.mean_length),
            ("data/dropped_prompts".to_string(), dropped_prompts as f64),
        ]);
        for (name, mean, _) in &last_stats.reward_parts {
            metrics.insert(format!("rewards/{name}/mean"), *mean);
        }
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}

/// Where the reference's log-probs come from (β > 0 only).
enum Reference {
    /// β = 0: no reference, no model loaded.
    None,
    /// LoRA: the policy with its adapters switched off.
    AdaptersOff,
    /// A frozen copy of the input model.
    Copy(Box<dyn model::Policy>),
}

/// The completions of one step: every one sampled (for the figures) and the kept groups
/// (for the update), in sampling order.
#[derive(Default)]
struct Rollout {
    /// Every completion: its pair, total reward, each reward's unweighted score, length, and
    /// whether it ended with a stop token.
    pairs: Vec<ScorePair>,
    rewards: Vec<f64>,
    parts: Vec<(String, Vec<f64>)>,
    lengths: Vec<usize>,
    finished: Vec<bool>,
    /// Groups kept, their completions' rewards and stop flags, and the kept rows of each
    /// round as experience.
    groups: usize,
    kept_rewards: Vec<f64>,
    kept_finished: Vec<bool>,
    kept: Vec<Experience>,
}

impl Rollout {
    /// Adds a round: `sampled` completions (consecutive groups of `group`), their pairs,
    /// the rewards' scores, the total rewards, and which groups to keep.
    fn add(
        &mut self,
        sampled: &plumb_core::rollout::Sampled,
        pairs: &[ScorePair],
        parts: &[(String, Vec<f64>)],
        rewards: &[f64],
        keep: &[bool],
        group: usize,
    ) -> Result<()> {
        let finished: Vec<bool> = sampled.finishes.iter().map(|f| *f == Finish::StopToken).collect();
        self.pairs.extend_from_slice(pairs);
        self.rewards.extend_from_slice(rewards);
        self.lengths.extend(sampled.responses.iter().map(Vec::len));
        self.finished.extend_from_slice(&finished);
        for (name, scores) in parts {
            match self.parts.iter_mut().find(|(n, _)| n == name) {
                Some((_, all)) => all.extend_from_slice(scores),
                None => self.parts.push((name.clone(), scores.clone())),
            }
        }
        let rows: Vec<i64> = (0..rewards.len()).filter(|&i| keep[i / group]).map(|i| i as i64).collect();
        if rows.is_empty() {
            return Ok(());
        }
        self.groups += rows.len() / group;
        self.kept_rewards.extend(rows.iter().map(|&i| rewards[i as usize]));
        self.kept_finished.extend(rows.iter().map(|&i| finished[i as usize]));
        let mask = sampled.response_mask.shallow_clone();
        let device = mask.device();
        let scores: Vec<f32> = rewards.iter().map(|&r| r as f32).collect();
        let all = Experience {
            sequences: sampled.sequences.shallow_clone(),
            attention_mask: sampled.attention_mask.shallow_clone(),
            prompt_len: sampled.prompt_len,
            response_mask: mask.shallow_clone(),
            log_probs: sampled.log_probs.shallow_clone(),
            ref_log_probs: mask.zeros_like(),
            values: mask.zeros_like(),
            scores: Tensor::from_slice(&scores).to_device(device),
            rewards: mask.zeros_like(),
            advantages: mask.zeros_like(),
            returns: mask.zeros_like(),
        };
        self.kept.push(all.index_select(&Tensor::from_slice(&rows)));
        Ok(())
    }

    /// The kept completions as one batch, or None when no group was kept.
    fn experience(&self) -> Result<Option<Experience>> {
        if self.kept.is_empty() {
            return Ok(None);
        }
        Experience::cat(&self.kept).map(Some)
    }

    /// The step's figures over every completion sampled, by every rank (each rank's lists
    /// gathered in rank order: its groups stay whole), with `kept_groups` groups trained on.
    #[allow(clippy::too_many_arguments)]
    fn stats(
        &self,
        group: usize,
        rounds: usize,
        kept_groups: usize,
        updates: &[loss::GrpoLossStats],
        with_kl: bool,
        rollout_seconds: f64,
        ranks: Option<&ProcessGroup>,
    ) -> Result<GrpoStats> {
        let gather = |values: &[f64]| -> Result<Vec<f64>> { Ok(data_parallel::gather_values(ranks, values)?.concat()) };
        let rewards = gather(&self.rewards)?;
        let lengths = gather(&self.lengths.iter().map(|&l| l as f64).collect::<Vec<_>>())?;
        let unfinished = gather(&self.finished.iter().map(|&f| f64::from(u8::from(!f))).collect::<Vec<_>>())?;
        let mut parts = Vec::with_capacity(self.parts.len());
        for (name, scores) in &self.parts {
            let (mean, std) = mean_std(&gather(scores)?);
            parts.push((name.clone(), mean, std));
        }
        let stds: Vec<f64> = rewards.chunks(group).map(|g| mean_std(g).1).collect();
        let n = lengths.len().max(1) as f64;
        let tokens = lengths.iter().sum::<f64>();
        let (updates, clip_low_min, clip_high_max) = stats::over_ranks(updates, ranks)?;
        Ok(GrpoStats {
            reward: mean_std(&rewards).0,
            reward_std: stds.iter().sum::<f64>() / stds.len().max(1) as f64,
            reward_parts: parts,
            frac_reward_zero_std: stds.iter().filter(|s| **s <= 1e-8).count() as f64 / stds.len().max(1) as f64,
            mean_length: tokens / n,
            min_length: lengths.iter().copied().reduce(f64::min).unwrap_or(0.0),
            max_length: lengths.iter().copied().reduce(f64::max).unwrap_or(0.0),
            clipped_ratio: unfinished.iter().sum::<f64>() / n,
            clip_low_min,
            clip_high_max,
            updates,
            groups: kept_groups,
            rounds,
            with_kl,
            tokens: tokens as usize,
            rollout_tokens_per_s: tokens / rollout_seconds,
        })
    }
}

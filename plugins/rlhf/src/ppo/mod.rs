//! `rlhf.ppo`: PPO from a reward (Ouyang et al. 2022, <https://arxiv.org/abs/2203.02155>),
//! with TRL's `PPOTrainer` semantics and defaults, so its curves compare with TRL's.
//!
//! Each step (one iteration) reads top to bottom below: sample a response to each of a
//! batch of prompts → score them with the recipe's rewards → the frozen reference's
//! log-probs and the value model's values → per-token rewards (−β·KL, the score at each
//! response's last token) → GAE(γ, λ) and whitened advantages → `ppo_epochs` passes over
//! the batch in shuffled minibatches (gradients accumulated over micro-batches), each an
//! update of the policy and the value model together (one global-norm clip, two AdamW
//! optimizers: TRL's one optimizer over its policy-and-value wrapper) → the KL
//! controller → TensorBoard → a checkpoint when due.
//!
//! Where plumb differs from TRL, on purpose: the score is added at each response's last
//! token (TRL adds it one position later, past the end, when the response is shorter
//! than `response_length`), and means over tokens (approx-KL, entropy, losses) count
//! only real tokens. Log-probs come from the sampling distribution (logits / T), in
//! rollout, reference and training alike. The model families here have no dropout (and
//! LoRA dropout is refused here), so nothing has to be switched off for the ratio at the
//! first minibatch to be 1.
//!
//! With a `lora:` block the policy trains adapters only, and the reference is the policy
//! with its adapters switched off: no second copy of the model is loaded. The value model
//! is trained whole either way. The final model and the checkpoints' policy are then the
//! adapter in PEFT's layout (a next stage, `plumb generate` or `plumb eval` load it merged).
//!
//! Data-parallel (`plumb run --nproc N`, torchrun): every rank draws the same global batch
//! of prompts and rolls out its own share of it (sampling from a stream of its own); the
//! advantages are whitened with the global batch's mean and variance, each update's
//! gradients are averaged over the ranks, and every figure is of the global batch. The
//! batch must split into equal minibatches on every rank (`batch_size` a multiple of
//! ranks × `num_minibatches`).
//!
//! Resuming: a checkpoint holds the policy (at its top, HF layout), the value model (in
//! `value/`), both optimizers, the prompt order (a seeded permutation and its cursor)
//! and the KL controller; each step's sampling and minibatch shuffles are seeded from
//! the run's seed and the step number, so a resumed run repeats the uninterrupted one.
pub mod config;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::Instant;

use plumb_core::data::{seeded_rng, BatchOrder};
use plumb_core::dist::{data_parallel, ReduceOp};
use plumb_core::model::generate::{Finish, GenerationSettings};
use plumb_core::model::scalar_head::ScalarHeadModel;
use plumb_core::model::{self, SaveHf};
use plumb_core::plugin::ValidateContext;
use plumb_core::rand::seq::SliceRandom;
use plumb_core::reward::RewardSet;
use plumb_core::rollout::{
    gae, minibatch_backward_side_by_side, minibatch_loss, rank_seed, reference_and_values, sample, shaped_rewards,
    step_seed, whiten_over_ranks, Experience, KlController, PpoLossSettings,
};
use plumb_core::tch::{self, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;
use plumb_core::train::{DataPosition, OneIntraOpThread, TrainSection, Trained, Trainer};
use plumb_core::Optimizer;
use plumb_core::{checkpoint, Error, Result, RunContext, Stage, StageOutput};
use serde::{Deserialize, Serialize};

use crate::prompts::{encode_prompts, log_samples, score_pairs, Prompt, StopToken};
use config::{micro_batch, minibatch, PpoConfig, ValueInit};
use stats::PpoStats;

pub struct Ppo;

/// What a PPO checkpoint holds beyond models, optimizers and the prompt order.
#[derive(Serialize, Deserialize)]
struct PpoState {
    kl: KlController,
    dropped_prompts: usize,
}

impl Stage for Ppo {
    const NAME: &'static str = "ppo";
    const DESCRIPTION: &'static str =
        "PPO against the recipe's rewards: rollouts, KL to a frozen reference, GAE, clipped policy and value losses";
    type Config = TrainSection<PpoConfig>;

    fn validate(config: &Self::Config, ctx: &ValidateContext) -> Result<()> {
        config::validate(config, ctx)?;
        ctx.require_input_model("PPO starts from a policy (the SFT model)")
    }

    fn run(section: Self::Config, ctx: &mut RunContext) -> Result<StageOutput> {
        let (minibatch_size, micro) = (minibatch(&section), micro_batch(&section));
        let TrainSection { train: training, stage: c } = section;
        let device = ctx.device();
        tch::manual_seed(ctx.seed() as i64);
        let Some(model_dir) = ctx.input_model().map(PathBuf::from) else {
            return Err(Error::config(
                "model",
                "PPO starts from a policy: give the stage a `model:` directory (HF layout) or put it after a stage that makes one",
            ));
        };

        // Before any model is loaded: the prompts fit, the value model reads the policy's
        // tokens. (The reward names were checked against the recipe by `validate`.)
        let tokenizer = Tokenizer::from_dir(&model_dir)?;
        let (prompts, encoded, dropped_prompts) =
            encode_prompts(&c.data, &tokenizer, c.max_prompt_length, c.long_prompts)?;
        let policy_vocab = vocab_size(&model_dir)?;
        if let (ValueInit::RewardModel, Some(path)) = (c.value_model.init, &c.value_model.path) {
            let value_vocab = vocab_size(path)?;
            if value_vocab != policy_vocab {
                return Err(Error::config(
                    "value_model.path",
                    format!(
                        "the value model `{}` has a vocabulary of {value_vocab} tokens but the policy `{}` has {policy_vocab}: it cannot read the policy's tokens",
                        path.display(),
                        model_dir.display()
                    ),
                ));
            }
        }
        let stops = match c.stop_token {
            StopToken::Eos => tokenizer.eos_ids(),
            StopToken::None => Vec::new(),
        };
        let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
        let batch_size = training.batch_size;
        let world = ctx.world_size();
        if batch_size % (world * c.num_minibatches) != 0 {
            return Err(Error::config(
                "batch_size",
                format!(
                    "{batch_size} episodes do not split into {world} ranks × {} minibatches of equal size: use a multiple of {}",
                    c.num_minibatches,
                    world * c.num_minibatches
                ),
            ));
        }
        let max_steps = training.total_steps((encoded.len() / batch_size).max(1));
        tracing::info!(
            "ppo: {} prompts ({dropped_prompts} dropped as longer than max_prompt_length {}), {batch_size} episodes a step in {} minibatches × {} epochs; {max_steps} steps",
            encoded.len(),
            c.max_prompt_length,
            c.num_minibatches,
            c.ppo_epochs
        );

        // Models and optimizers, or all of them and the prompt order from a checkpoint.
        let mut trainer = Trainer::new(ctx, &training, max_steps)?;
        let resume_policy = trainer.resume_dir_of(0, "policy");
        let lora = training.lora.as_ref();
        let policy =
            model::load_for_training(&model_dir, resume_policy.as_deref(), device, Kind::Float, lora, ctx.seed())?;
        tokenizer.check_fits_embedding(policy.vocab_size() as usize, &model_dir)?;
        // The reference: with LoRA, the policy itself with its adapters off (no second copy
        // of the model in memory); else a frozen copy of the input model.
        let reference_copy = match policy.lora() {
            Some(_) => {
                tracing::info!("reference: the policy with its LoRA adapters off (no copy of the model loaded)");
                None
            }
            None => Some(model::load(&model_dir, device, Kind::Float)?),
        };
        let value_model = match (trainer.resume_dir_of(1, "value"), c.value_model.init, &c.value_model.path) {
            (Some(dir), _, _) => ScalarHeadModel::from_dir(&dir, device, Kind::Float)?,
            (None, ValueInit::Policy, _) => ScalarHeadModel::from_causal_lm(&model_dir, device, Kind::Float)?,
            (None, ValueInit::RewardModel, Some(path)) => ScalarHeadModel::from_dir(path, device, Kind::Float)?,
            (None, ValueInit::RewardModel, None) => {
                return Err(Error::config("value_model.path", "init: reward_model needs the reward model's directory"))
            }
        };
        let mut policy_adamw = training.optimizer.adamw(policy.trainable());
        let mut value_adamw = training.optimizer.adamw(value_model.var_store());
        let restored = trainer.restore(&mut [("policy", &mut policy_adamw), ("value", &mut value_adamw)])?;
        let (mut order, mut kl) = match restored {
            None => (BatchOrder::new(encoded.len(), ctx.seed()), c.kl_controller()),
            Some(DataPosition::Batches(order)) => {
                let state: PpoState = trainer.stage_state()?.ok_or_else(|| {
                    Error::file(
                        trainer.resume_dir().unwrap_or(Path::new(".")),
                        "no PPO state (KL controller) in trainer_state.json",
                    )
                })?;
                (order, state.kl)
            }
            Some(DataPosition::Stream(_)) => return Err(Error::Other("a PPO checkpoint holds a prompt order".into())),
        };
        let value_saved = ValueModelSave { model: &value_model, pad };
        let checkpoint = |trainer: &Trainer, order: &BatchOrder, kl: &KlController, p: &_, v: &_| {
            let models = [
                Trained { name: "policy", model: policy.as_ref(), optimizer: p },
                Trained { name: "value", model: &value_saved, optimizer: v },
            ];
            let state = PpoState { kl: kl.clone(), dropped_prompts };
            let state = serde_json::to_value(state).map_err(|e| Error::Other(e.to_string()))?;
            let length = c.max_prompt_length + c.max_new_tokens;
            trainer.save_checkpoint_with(&models, &tokenizer, length, DataPosition::Batches(order.clone()), Some(state))
        };
        let settings = PpoLossSettings {
            clip: c.cliprange,
            clip_value: c.cliprange_value,
            vf_coef: c.vf_coef,
            temperature: c.temperature,
        };
        let mut last_stats = PpoStats::default();
        // The mean score of this run's first batch (none when it resumed past it).
        let mut first_scores: Option<f64> = None;
        let mut reward_set = RewardSet::new(ctx, &c.reward);

        while trainer.running() {
            if trainer.stop_requested() {
                return Err(trainer.stop(checkpoint(&trainer, &order, &kl, &policy_adamw, &value_adamw)?));
            }
            trainer.start_step(&mut [&mut policy_adamw, &mut value_adamw]);
            let step = trainer.state.step + 1;
            let step_seed = step_seed(ctx.seed(), step);
            let rollout_started = Instant::now();

            // 1. Rollout: one sampled response per prompt of this rank's share of the batch.
            let rows = order.next_batch(batch_size);
            let rows = &rows[trainer.shard(rows.len())];
            let batch: Vec<&Prompt> = rows.iter().map(|&i| &prompts[i as usize]).collect();
            let batch_tokens: Vec<Vec<i64>> = rows.iter().map(|&i| encoded[i as usize].clone()).collect();
            let generation = GenerationSettings {
                max_new_tokens: c.max_new_tokens,
                temperature: c.temperature,
                stop_tokens: stops.clone(),
                seed: Some(rank_seed(step_seed, ctx.rank())),
                pad_token: pad,
                context: Some(c.max_prompt_length + c.max_new_tokens),
                ..Default::default()
            };
            let sampled = sample(policy.as_ref(), &batch_tokens, &generation, pad)?;

            // 2. Score the finished (prompt, response) pairs; the stop token is not text.
            let pairs = score_pairs(&batch, &sampled, &tokenizer)?;
            let scored = reward_set.score(&pairs)?;
            let mut scores = scored.total.clone();
            if let Some(penalty) = c.missing_eos_penalty {
                for (score, finish) in scores.iter_mut().zip(&sampled.finishes) {
                    if *finish != Finish::StopToken {
                        *score -= penalty;
                    }
                }
            }

            // 3. The reference's log-probs and the value model's values of the same tokens.
            let (ref_log_probs, values) = {
                let (reference, _adapters_off) = match &reference_copy {
                    Some(copy) => (copy.as_ref(), None),
                    None => (policy.as_ref(), policy.lora().map(|l| l.disabled())),
                };
                let side_by_side = trainer.halves_side_by_side();
                reference_and_values(reference, &value_model, &sampled, c.temperature, side_by_side)?
            };
            let mask = sampled.response_mask.shallow_clone();
            let mut experience = Experience {
                sequences: sampled.sequences.shallow_clone(),
                attention_mask: sampled.attention_mask.shallow_clone(),
                prompt_len: sampled.prompt_len,
                response_mask: mask.shallow_clone(),
                log_probs: sampled.log_probs.shallow_clone(),
                ref_log_probs,
                values,
                scores: Tensor::from_slice(&scores).to_kind(Kind::Float).to_device(device),
                rewards: mask.zeros_like(),
                advantages: mask.zeros_like(),
                returns: mask.zeros_like(),
            };

            // 4. Per-token rewards, GAE, advantages whitened over the global batch.
            let (mut rewards, token_kl) = shaped_rewards(&experience, kl.coef, c.kl_estimator);
            if c.whiten_rewards {
                rewards = whiten_over_ranks(&rewards, &mask, false, trainer.group())?;
            }
            let (advantages, returns) = gae(&rewards, &experience.values, &mask, c.gamma, c.lam);
            experience.advantages = whiten_over_ranks(&advantages, &mask, true, trainer.group())?;
            experience.returns = returns;
            experience.rewards = rewards;
            let rollout_seconds = rollout_started.elapsed().as_secs_f64();

            // 5. PPO epochs over shuffled minibatches, each one update of both models (on
            //    each rank its share of the minibatch).
            let train_started = Instant::now();
            // On a CPU the two models' halves of each minibatch run side by side, and the
            // updates between them on one thread (see `OneIntraOpThread`).
            let side_by_side = trainer.halves_side_by_side();
            let one_thread = side_by_side.then(OneIntraOpThread::enter);
            let mut shuffle = seeded_rng(step_seed ^ 0x5eed);
            let (mut updates, mut grad_norms) = (Vec::new(), Vec::new());
            for _epoch in 0..c.ppo_epochs {
                let mut permutation: Vec<i64> = (0..rows.len() as i64).collect();
                permutation.shuffle(&mut shuffle);
                for indices in permutation.chunks(minibatch_size / world) {
                    let minibatch = experience.index_select(&Tensor::from_slice(indices));
                    policy_adamw.zero_grad();
                    value_adamw.zero_grad();
                    let mut loss = 0.0;
                    let parts = minibatch.split(micro as i64);
                    let last = parts.len().saturating_sub(1);
                    for (i, part) in parts.into_iter().enumerate() {
                        let share = part.len() as f64 / minibatch.len() as f64;
                        let part_stats = if side_by_side {
                            minibatch_backward_side_by_side(
                                policy.as_ref(),
                                &value_model,
                                &part,
                                &settings,
                                training.precision,
                                share,
                            )?
                        } else {
                            let (part_loss, part_stats) = training.precision.forward(device, || {
                                minibatch_loss(policy.as_ref(), &value_model, &part, &settings)
                            })??;
                            trainer.backward(&(part_loss * share), i == last)?;
                            part_stats
                        };
                        loss += part_stats.loss * share;
                        updates.push(part_stats);
                    }
                    if let Some(norm) = trainer.update(&mut [&mut policy_adamw, &mut value_adamw], loss)? {
                        grad_norms.push(norm);
                    }
                }
            }
            drop(one_thread);
            let train_seconds = train_started.elapsed().as_secs_f64();

            // 6. Statistics of the global batch (each rank's sums, added over the ranks), the
            //    KL controller, the trainer's step.
            let episodes = batch_size as f64;
            let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
            let mut sums = vec![
                sum(&token_kl),
                sum(&(-&experience.log_probs * &mask)),
                scores.iter().sum::<f64>(),
                sampled.finishes.iter().filter(|f| **f == Finish::StopToken).count() as f64,
                experience.response_tokens() as f64,
                experience.attention_mask.sum(Kind::Int64).int64_value(&[]) as f64,
            ];
            sums.extend(scored.parts.iter().map(|(_, s)| s.iter().sum::<f64>()));
            let sums = data_parallel::reduce_values(trainer.group(), &sums, ReduceOp::Sum)?;
            let (mean_kl, tokens, sequence_tokens) = (sums[0] / episodes, sums[4], sums[5]);
            let stats = PpoStats {
                kl: mean_kl,
                entropy: sums[1] / episodes,
                non_score_reward: -kl.coef * mean_kl,
                scores: sums[2] / episodes,
                score_parts: scored
                    .parts
                    .iter()
                    .zip(&sums[6..])
                    .map(|((name, _), s)| (name.clone(), s / episodes))
                    .collect(),
                num_eos_tokens: sums[3] as usize,
                response_length: tokens / episodes,
                kl_coef: kl.coef,
                updates: stats::mean_over_ranks(&updates, trainer.group())?,
                first: stats::mean_over_ranks(&updates[..updates.len().min(1)], trainer.group())?,
                rollout_tokens_per_s: tokens / rollout_seconds,
                train_tokens_per_s: sequence_tokens * c.ppo_epochs as f64 / train_seconds,
                dropped_prompts,
            };
            kl.update(mean_kl, batch_size);
            let grad_norm = grad_norms.iter().sum::<f64>() / grad_norms.len().max(1) as f64;
            trainer.end_step(stats.updates.loss, grad_norm, tokens as u64, batch_size);
            if step % training.log_every == 0 || step == max_steps {
                stats.log(ctx, step);
                log_samples(ctx, step, &pairs, &scores, c.samples);
            }
            if step == 1 {
                first_scores = Some(stats.scores);
            }
            last_stats = stats;
            if trainer.checkpoint_due() {
                checkpoint(&trainer, &order, &kl, &policy_adamw, &value_adamw)?;
            }
        }

        let final_dir = trainer.save_final(policy.as_ref(), &tokenizer, c.max_prompt_length + c.max_new_tokens)?;
        let mut metrics = trainer.metrics();
        metrics.extend([
            ("objective/scores".to_string(), last_stats.scores),
            ("objective/kl".to_string(), last_stats.kl),
            ("data/dropped_prompts".to_string(), dropped_prompts as f64),
        ]);
        if let Some(first) = first_scores {
            metrics.insert("objective/initial_scores".to_string(), first);
        }
        Ok(StageOutput { model: Some(final_dir), metrics })
    }
}

/// `vocab_size` of `dir/config.json` (for a LoRA adapter, of the model under it).
fn vocab_size(dir: &Path) -> Result<u64> {
    let file = model::lora::chain(dir)?.0.join("config.json");
    let json: serde_json::Value = checkpoint::read_json(&file)?;
    json.get("vocab_size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Error::file(&file, "vocab_size: missing; expected the vocabulary size"))
}

/// The value model as a checkpoint part: saved as transformers'
/// `*ForSequenceClassification` with the policy's pad token.
struct ValueModelSave<'a> {
    model: &'a ScalarHeadModel,
    pad: i64,
}

impl SaveHf for ValueModelSave<'_> {
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, self.pad)
    }
}

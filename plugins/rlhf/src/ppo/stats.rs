//! What one PPO iteration reports, and the one place it becomes TensorBoard tags —
//! TRL's names, so a plumb run and a TRL run can be compared tag for tag.
use plumb_core::dist::{data_parallel, DistError, ProcessGroup};
use plumb_core::rollout::MinibatchStats;
use plumb_core::RunContext;

/// The figures of one iteration (rollout and updates).
#[derive(Debug, Clone, Default)]
pub struct PpoStats {
    /// Mean over episodes of the summed per-token KL (TRL's `objective/kl`).
    pub kl: f64,
    /// Mean over episodes of the summed −log π of the sampled tokens.
    pub entropy: f64,
    /// Mean over episodes of the summed −β·KL.
    pub non_score_reward: f64,
    /// Mean score (after any missing-EOS penalty).
    pub scores: f64,
    /// Each reward's mean, by name.
    pub score_parts: Vec<(String, f64)>,
    /// Responses that ended with a stop token.
    pub num_eos_tokens: usize,
    /// Mean response length in tokens.
    pub response_length: f64,
    /// β used for this batch.
    pub kl_coef: f64,
    /// Means over every minibatch (and micro-batch) of every epoch.
    pub updates: MinibatchStats,
    /// The first minibatch of the first epoch, before any update: its ratio is 1 when
    /// rollout and training log-probs agree.
    pub first: MinibatchStats,
    pub rollout_tokens_per_s: f64,
    pub train_tokens_per_s: f64,
    /// Prompts dropped for their length so far.
    pub dropped_prompts: usize,
}

impl PpoStats {
    pub fn log(&self, ctx: &RunContext, step: u64) {
        let step = step as i64;
        let u = &self.updates;
        let scalars = [
            ("objective/kl", self.kl),
            ("objective/entropy", self.entropy),
            ("objective/non_score_reward", self.non_score_reward),
            ("objective/rlhf_reward", self.non_score_reward + self.scores),
            ("objective/scores", self.scores),
            ("objective/kl_coef", self.kl_coef),
            ("policy/approxkl_avg", u.approx_kl),
            ("policy/clipfrac_avg", u.clipfrac),
            ("policy/entropy_avg", u.entropy),
            ("loss/policy_avg", u.policy_loss),
            ("loss/value_avg", u.value_loss),
            ("val/clipfrac_avg", u.value_clipfrac),
            ("val/ratio", u.ratio),
            ("val/ratio_first_minibatch", self.first.ratio),
            ("val/num_eos_tokens", self.num_eos_tokens as f64),
            ("val/response_length", self.response_length),
            ("time/rollout_tokens_per_s", self.rollout_tokens_per_s),
            ("time/train_tokens_per_s", self.train_tokens_per_s),
        ];
        for (tag, value) in scalars {
            ctx.scalar(tag, step, value);
        }
        for (name, mean) in &self.score_parts {
            ctx.scalar(&format!("objective/scores/{name}"), step, *mean);
        }
    }
}

/// The mean of each field over `all`.
pub fn mean(all: &[MinibatchStats]) -> MinibatchStats {
    let n = all.len().max(1) as f64;
    let sum = |f: fn(&MinibatchStats) -> f64| all.iter().map(f).sum::<f64>() / n;
    MinibatchStats {
        loss: sum(|s| s.loss),
        policy_loss: sum(|s| s.policy_loss),
        value_loss: sum(|s| s.value_loss),
        approx_kl: sum(|s| s.approx_kl),
        clipfrac: sum(|s| s.clipfrac),
        value_clipfrac: sum(|s| s.value_clipfrac),
        entropy: sum(|s| s.entropy),
        ratio: sum(|s| s.ratio),
    }
}

/// [`mean`] of this rank's `all`, then averaged over the ranks of `group` (every rank
/// makes as many updates of equal minibatches, so this is the mean over the global batch).
pub fn mean_over_ranks(all: &[MinibatchStats], group: Option<&ProcessGroup>) -> Result<MinibatchStats, DistError> {
    let m = mean(all);
    let fields = [m.loss, m.policy_loss, m.value_loss, m.approx_kl, m.clipfrac, m.value_clipfrac, m.entropy, m.ratio];
    let Some(group) = group else { return Ok(m) };
    let [loss, policy_loss, value_loss, approx_kl, clipfrac, value_clipfrac, entropy, ratio] =
        <[f64; 8]>::try_from(data_parallel::average_values(group, &fields)?)
            .map_err(|v| DistError::Invalid(format!("{} statistics came back of 8 averaged", v.len())))?;
    Ok(MinibatchStats { loss, policy_loss, value_loss, approx_kl, clipfrac, value_clipfrac, entropy, ratio })
}

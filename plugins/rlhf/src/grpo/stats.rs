//! What one GRPO step reports, and the one place it becomes TensorBoard tags — TRL's
//! names (`reward`, `reward_std`, `rewards/<name>/mean`, `frac_reward_zero_std`,
//! `completions/*`, `clip_ratio/*`, `entropy`, `kl`), so a plumb run and a TRL run
//! compare tag for tag.
use plumb_core::dist::{data_parallel, DistError, ProcessGroup, ReduceOp};
use plumb_core::RunContext;

use super::loss::GrpoLossStats;

/// The figures of one step: its completions (every group sampled, dynamic sampling's
/// dropped ones included) and its updates.
#[derive(Debug, Clone, Default)]
pub struct GrpoStats {
    /// Mean total reward (weighted sum, overlong penalty included).
    pub reward: f64,
    /// Mean over groups of the std of their rewards.
    pub reward_std: f64,
    /// Each reward's (name, mean, std), unweighted.
    pub reward_parts: Vec<(String, f64, f64)>,
    /// Share of groups whose rewards are all equal.
    pub frac_reward_zero_std: f64,
    pub mean_length: f64,
    pub min_length: f64,
    pub max_length: f64,
    /// Share of completions cut at max_completion_length (no stop token).
    pub clipped_ratio: f64,
    /// Means over every micro-batch of every update.
    pub updates: GrpoLossStats,
    /// The least `clip_ratio/low` and the most `clip_ratio/high` of a micro-batch.
    pub clip_low_min: f64,
    pub clip_high_max: f64,
    /// Groups trained on, and sampling rounds taken (1 without dynamic sampling).
    pub groups: usize,
    pub rounds: usize,
    /// Whether the KL enters the loss (β > 0): `kl` is logged only then, as TRL does.
    pub with_kl: bool,
    /// Completion tokens sampled (every rank's).
    pub tokens: usize,
    pub rollout_tokens_per_s: f64,
}

impl GrpoStats {
    pub fn log(&self, ctx: &RunContext, step: u64) {
        let step = step as i64;
        let u = &self.updates;
        let mut scalars = vec![
            ("reward", self.reward),
            ("reward_std", self.reward_std),
            ("frac_reward_zero_std", self.frac_reward_zero_std),
            ("completions/mean_length", self.mean_length),
            ("completions/min_length", self.min_length),
            ("completions/max_length", self.max_length),
            ("completions/clipped_ratio", self.clipped_ratio),
            ("clip_ratio/low_mean", u.clip_low),
            ("clip_ratio/low_min", self.clip_low_min),
            ("clip_ratio/high_mean", u.clip_high),
            ("clip_ratio/high_max", self.clip_high_max),
            ("clip_ratio/region_mean", u.clip_region),
            ("entropy", u.entropy),
            ("sampling/groups", self.groups as f64),
            ("sampling/rounds", self.rounds as f64),
            ("time/rollout_tokens_per_s", self.rollout_tokens_per_s),
        ];
        if self.with_kl {
            scalars.push(("kl", u.kl));
        }
        for (tag, value) in scalars {
            ctx.scalar(tag, step, value);
        }
        for (name, mean, std) in &self.reward_parts {
            ctx.scalar(&format!("rewards/{name}/mean"), step, *mean);
            ctx.scalar(&format!("rewards/{name}/std"), step, *std);
        }
    }
}

/// The mean of each field over every micro-batch of every rank (`all`: this rank's), and
/// the least `clip_low` and the most `clip_high` of any (0 when there were none).
pub fn over_ranks(all: &[GrpoLossStats], ranks: Option<&ProcessGroup>) -> Result<(GrpoLossStats, f64, f64), DistError> {
    let sum = |f: fn(&GrpoLossStats) -> f64| all.iter().map(f).sum::<f64>();
    let sums = [
        all.len() as f64,
        sum(|s| s.loss),
        sum(|s| s.clip_low),
        sum(|s| s.clip_high),
        sum(|s| s.clip_region),
        sum(|s| s.kl),
        sum(|s| s.entropy),
    ];
    let sums = data_parallel::reduce_values(ranks, &sums, ReduceOp::Sum)?;
    let n = sums[0].max(1.0);
    let mean = GrpoLossStats {
        loss: sums[1] / n,
        clip_low: sums[2] / n,
        clip_high: sums[3] / n,
        clip_region: sums[4] / n,
        kl: sums[5] / n,
        entropy: sums[6] / n,
    };
    // The extremes as maxima: −least clip_low, most clip_high (−∞ for a rank with none).
    let low = all.iter().map(|u| u.clip_low).reduce(f64::min).map_or(f64::NEG_INFINITY, |l| -l);
    let high = all.iter().map(|u| u.clip_high).reduce(f64::max).unwrap_or(f64::NEG_INFINITY);
    let extremes = data_parallel::reduce_values(ranks, &[low, high], ReduceOp::Max)?;
    let finite_or_zero = |v: f64| if v.is_finite() { v } else { 0.0 };
    Ok((mean, finite_or_zero(-extremes[0]), finite_or_zero(extremes[1])))
}

/// Mean and standard deviation (with Bessel's correction, as `torch.std`).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let squares = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
    (mean, if values.len() > 1 { (squares / (n - 1.0)).sqrt() } else { 0.0 })
}

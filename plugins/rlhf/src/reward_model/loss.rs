//! The pairwise loss of reward modelling and the figures that say how well a reward
//! model separates preferences.
//!
//! Loss per pair (Bradley–Terry, with Llama 2's margin): −log σ(r_c − r_r − margin), plus,
//! when `center_rewards_coef` is set, coef · (r_c + r_r)² (TRL's centering term, averaged
//! over the pairs like the loss; it keeps rewards near zero, as PPO prefers).
use plumb_core::dist::{data_parallel, DistError, ProcessGroup, ReduceOp};
use plumb_core::tch::{Kind, Tensor};
use plumb_core::RunContext;

/// Summed loss over the pairs of `chosen`, `rejected` and `margin` (each (N,)): a sum, so
/// micro-batches add up and the caller divides by the step's pair count.
pub fn pairwise_loss_sum(chosen: &Tensor, rejected: &Tensor, margin: &Tensor, center_coef: Option<f64>) -> Tensor {
    let delta = chosen - rejected - margin; // (N,)
    let loss = -delta.log_sigmoid().sum(Kind::Float);
    match center_coef {
        Some(coef) => loss + (chosen + rejected).square().sum(Kind::Float) * coef,
        None => loss,
    }
}

/// Running figures over a set of pairs (a log window, a held-out pass).
#[derive(Debug, Clone, Copy)]
pub struct RewardStats {
    pub pairs: usize,
    /// Pairs whose chosen side scored strictly higher.
    pub correct: usize,
    pub margin_sum: f64,
    pub reward_sum: f64,
    pub min_reward: f64,
    pub max_reward: f64,
    pub loss_sum: f64,
}

impl Default for RewardStats {
    fn default() -> Self {
        Self {
            pairs: 0,
            correct: 0,
            margin_sum: 0.0,
            reward_sum: 0.0,
            min_reward: f64::INFINITY,
            max_reward: f64::NEG_INFINITY,
            loss_sum: 0.0,
        }
    }
}

impl RewardStats {
    /// Adds pairs scored `chosen[i]` against `rejected[i]`, whose summed loss is `loss_sum`.
    pub fn add(&mut self, chosen: &[f64], rejected: &[f64], loss_sum: f64) {
        for (&c, &r) in chosen.iter().zip(rejected) {
            self.pairs += 1;
            self.correct += usize::from(c > r);
            self.margin_sum += c - r;
            self.reward_sum += c + r;
            self.min_reward = self.min_reward.min(c.min(r));
            self.max_reward = self.max_reward.max(c.max(r));
        }
        self.loss_sum += loss_sum;
    }

    /// Adds another set's figures to these.
    pub fn merge(&mut self, other: &RewardStats) {
        self.pairs += other.pairs;
        self.correct += other.correct;
        self.margin_sum += other.margin_sum;
        self.reward_sum += other.reward_sum;
        self.min_reward = self.min_reward.min(other.min_reward);
        self.max_reward = self.max_reward.max(other.max_reward);
        self.loss_sum += other.loss_sum;
    }

    /// These figures over every rank's pairs (counts and sums added, the extremes of all):
    /// one rank's share of a batch made whole. As they are without a group.
    pub fn over_ranks(&self, group: Option<&ProcessGroup>) -> Result<Self, DistError> {
        let counts = [self.pairs as f64, self.correct as f64, self.margin_sum, self.reward_sum, self.loss_sum];
        let sums = data_parallel::reduce_values(group, &counts, ReduceOp::Sum)?;
        let extremes = data_parallel::reduce_values(group, &[-self.min_reward, self.max_reward], ReduceOp::Max)?;
        Ok(Self {
            pairs: sums[0] as usize,
            correct: sums[1] as usize,
            margin_sum: sums[2],
            reward_sum: sums[3],
            loss_sum: sums[4],
            min_reward: -extremes[0],
            max_reward: extremes[1],
        })
    }

    /// Share of pairs ranked right.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.pairs.max(1) as f64
    }

    /// Mean r_c − r_r.
    pub fn margin(&self) -> f64 {
        self.margin_sum / self.pairs.max(1) as f64
    }

    /// Mean reward over both sides of every pair.
    pub fn mean_reward(&self) -> f64 {
        self.reward_sum / (2 * self.pairs).max(1) as f64
    }

    /// Mean loss per pair.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.pairs.max(1) as f64
    }

    /// Named figures under `prefix` (`train/`, `eval/`), as TensorBoard and the report show them.
    pub fn named(&self, prefix: &str) -> Vec<(String, f64)> {
        [
            ("accuracy", self.accuracy()),
            ("margin", self.margin()),
            ("mean_reward", self.mean_reward()),
            ("min_reward", self.min_reward),
            ("max_reward", self.max_reward),
            ("loss", self.loss()),
        ]
        .into_iter()
        .map(|(name, value)| (format!("{prefix}{name}"), value))
        .collect()
    }

    /// The one place these figures become TensorBoard scalars. `train/loss` is the
    /// trainer's to log; the rest go under `prefix`.
    pub fn log(&self, ctx: &RunContext, prefix: &str, step: u64) {
        for (tag, value) in self.named(prefix) {
            if tag != "train/loss" {
                ctx.scalar(&tag, step as i64, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).to_kind(Kind::Float)
    }

    #[test]
    fn the_loss_is_minus_log_sigmoid_of_the_margin_adjusted_difference() {
        let (c, r, m) = (t(&[2.0, 0.0]), t(&[1.0, 1.0]), t(&[0.0, 0.5]));
        let loss = pairwise_loss_sum(&c, &r, &m, None).double_value(&[]);
        // Pair 1: Δ = 1 → ln(1 + e^-1) = 0.3132617; pair 2: Δ = -1.5 → ln(1 + e^1.5) = 1.7014132.
        let expected = (1.0 + (-1.0f64).exp()).ln() + (1.0 + 1.5f64.exp()).ln();
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        assert!((expected - 2.0146749).abs() < 1e-6);
    }

    #[test]
    fn centering_adds_coef_times_the_squared_sum_of_each_pair() {
        let (c, r, m) = (t(&[2.0, 0.0]), t(&[1.0, 1.0]), t(&[0.0, 0.0]));
        let plain = pairwise_loss_sum(&c, &r, &m, None).double_value(&[]);
        let centered = pairwise_loss_sum(&c, &r, &m, Some(0.01)).double_value(&[]);
        // (2 + 1)² + (0 + 1)² = 10, times 0.01.
        assert!((centered - plain - 0.1).abs() < 1e-6, "{centered} - {plain}");
    }

    #[test]
    fn the_gradient_pushes_chosen_up_and_rejected_down() {
        let c = t(&[0.0]).set_requires_grad(true);
        let r = t(&[0.0]).set_requires_grad(true);
        pairwise_loss_sum(&c, &r, &t(&[0.0]), None).backward();
        // d/dr_c of -log σ(r_c - r_r) at 0 is -σ(0) = -0.5.
        assert!((c.grad().double_value(&[0]) + 0.5).abs() < 1e-6);
        assert!((r.grad().double_value(&[0]) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn stats_count_ranked_pairs_and_summarize_the_rewards() {
        let mut stats = RewardStats::default();
        stats.add(&[2.0, 0.0], &[1.0, 1.0], 2.0);
        stats.add(&[3.0], &[-1.0], 1.0);
        assert_eq!((stats.pairs, stats.correct), (3, 2));
        assert!((stats.accuracy() - 2.0 / 3.0).abs() < 1e-12);
        assert!((stats.margin() - (1.0 - 1.0 + 4.0) / 3.0).abs() < 1e-12);
        assert!((stats.mean_reward() - 6.0 / 6.0).abs() < 1e-12);
        assert_eq!((stats.min_reward, stats.max_reward), (-1.0, 3.0));
        assert!((stats.loss() - 1.0).abs() < 1e-12);
        let named = stats.named("eval/");
        assert_eq!(named[0], ("eval/accuracy".to_string(), stats.accuracy()));
        // A tie is not a win.
        let mut tie = RewardStats::default();
        tie.add(&[1.0], &[1.0], 0.0);
        assert_eq!(tie.accuracy(), 0.0);
    }
}

//! The DPO losses (Rafailov et al. 2023, <https://arxiv.org/abs/2305.18290>) on summed
//! completion log-probs, as TRL's `DPOTrainer` computes them, and the figures it reports.
//!
//! With h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r)):
//! - `sigmoid`: −(1 − ε)·log σ(β·h) − ε·log σ(−β·h), ε the label smoothing (conservative
//!   DPO: the share of pairs taken to be mislabelled; 0 is plain DPO);
//! - `ipo` (Azar et al. 2023, <https://arxiv.org/abs/2310.12036>): (h − 1/(2β))², on
//!   log-probs averaged over each completion's tokens (as TRL does for IPO).
//!
//! The implicit rewards are β·(log π − log π_ref) of each side.
use plumb_core::dist::{data_parallel, DistError, ProcessGroup, ReduceOp};
use plumb_core::tch::Tensor;
use plumb_core::RunContext;
use serde::Deserialize;

/// Which DPO loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// DPO's −log σ(β·h), with optional label smoothing.
    #[default]
    Sigmoid,
    /// IPO's squared loss (h − 1/(2β))² on length-averaged log-probs.
    Ipo,
}

/// The settings of the loss.
#[derive(Debug, Clone, Copy)]
pub struct DpoLossSettings {
    pub beta: f64,
    pub loss_type: DpoLossType,
    pub label_smoothing: f64,
}

/// The loss of each pair and the implicit rewards of its sides, each (N,).
pub struct DpoLoss {
    pub losses: Tensor,
    /// β·(log π(y_c) − log π_ref(y_c)), detached.
    pub chosen_rewards: Tensor,
    /// β·(log π(y_r) − log π_ref(y_r)), detached.
    pub rejected_rewards: Tensor,
}

/// The loss of N pairs from the log-probs (N,) of their chosen and rejected completions
/// under the policy and the reference (for IPO, averaged over the completion's tokens).
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    settings: &DpoLossSettings,
) -> DpoLoss {
    let beta = settings.beta;
    let h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected); // (N,)
    let losses = match settings.loss_type {
        DpoLossType::Sigmoid => {
            let ls = settings.label_smoothing;
            -(&h * beta).log_sigmoid() * (1.0 - ls) - (&h * -beta).log_sigmoid() * ls
        }
        DpoLossType::Ipo => (&h - 1.0 / (2.0 * beta)).square(),
    };
    let _no_grad = plumb_core::tch::no_grad_guard();
    DpoLoss {
        losses,
        chosen_rewards: (policy_chosen - ref_chosen).detach() * beta,
        rejected_rewards: (policy_rejected - ref_rejected).detach() * beta,
    }
}

/// Running sums of TRL's DPO figures over a set of pairs (a log window, a held-out pass).
#[derive(Debug, Clone, Copy, Default)]
pub struct DpoStats {
    pub pairs: usize,
    pub loss_sum: f64,
    pub chosen_reward_sum: f64,
    pub rejected_reward_sum: f64,
    /// Pairs whose chosen side has the strictly higher implicit reward.
    pub correct: usize,
    pub chosen_logp_sum: f64,
    pub rejected_logp_sum: f64,
}

impl DpoStats {
    /// Adds pairs: their losses, implicit rewards and policy log-probs (each per pair).
    pub fn add(
        &mut self,
        losses: &[f64],
        chosen: &[f64],
        rejected: &[f64],
        logp_chosen: &[f64],
        logp_rejected: &[f64],
    ) {
        self.pairs += losses.len();
        self.loss_sum += losses.iter().sum::<f64>();
        self.chosen_reward_sum += chosen.iter().sum::<f64>();
        self.rejected_reward_sum += rejected.iter().sum::<f64>();
        self.correct += chosen.iter().zip(rejected).filter(|(c, r)| c > r).count();
        self.chosen_logp_sum += logp_chosen.iter().sum::<f64>();
        self.rejected_logp_sum += logp_rejected.iter().sum::<f64>();
    }

    /// Adds another set's sums to these.
    pub fn merge(&mut self, other: &DpoStats) {
        self.pairs += other.pairs;
        self.loss_sum += other.loss_sum;
        self.chosen_reward_sum += other.chosen_reward_sum;
        self.rejected_reward_sum += other.rejected_reward_sum;
        self.correct += other.correct;
        self.chosen_logp_sum += other.chosen_logp_sum;
        self.rejected_logp_sum += other.rejected_logp_sum;
    }

    /// These figures over every rank's pairs (the sums added): one rank's share of a batch
    /// made whole. As they are without a group.
    pub fn over_ranks(&self, group: Option<&ProcessGroup>) -> Result<Self, DistError> {
        let sums = [
            self.pairs as f64,
            self.loss_sum,
            self.chosen_reward_sum,
            self.rejected_reward_sum,
            self.correct as f64,
            self.chosen_logp_sum,
            self.rejected_logp_sum,
        ];
        let sums = data_parallel::reduce_values(group, &sums, ReduceOp::Sum)?;
        Ok(Self {
            pairs: sums[0] as usize,
            loss_sum: sums[1],
            chosen_reward_sum: sums[2],
            rejected_reward_sum: sums[3],
            correct: sums[4] as usize,
            chosen_logp_sum: sums[5],
            rejected_logp_sum: sums[6],
        })
    }

    /// One figure by its name without a prefix (`loss`, `rewards/accuracies`, ...).
    pub fn value(&self, name: &str) -> f64 {
        self.named("").into_iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| v)
    }

    /// The figures by TRL's names (`rewards/accuracies`, ...), and `loss`, under `prefix`.
    pub fn named(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.pairs.max(1) as f64;
        [
            ("loss", self.loss_sum / n),
            ("rewards/chosen", self.chosen_reward_sum / n),
            ("rewards/rejected", self.rejected_reward_sum / n),
            ("rewards/accuracies", self.correct as f64 / n),
            ("rewards/margins", (self.chosen_reward_sum - self.rejected_reward_sum) / n),
            ("logps/chosen", self.chosen_logp_sum / n),
            ("logps/rejected", self.rejected_logp_sum / n),
        ]
        .into_iter()
        .map(|(name, value)| (format!("{prefix}{name}"), value))
        .collect()
    }

    /// The one place these figures become TensorBoard scalars; `loss` without a prefix is
    /// the trainer's `train/loss`, so it is left out.
    pub fn log(&self, ctx: &RunContext, prefix: &str, step: u64) {
        for (tag, value) in self.named(prefix) {
            if tag != "loss" {
                ctx.scalar(&tag, step as i64, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use plumb_core::tch::Kind;

    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v).to_kind(Kind::Float)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap()
    }

    fn log_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    /// Two pairs: h = (−10 + 12) − (−11 + 11) = 2 and h = (−5 + 4) − (−5 + 5) = −1.
    fn pairs() -> [Tensor; 4] {
        [t(&[-10.0, -5.0]), t(&[-12.0, -4.0]), t(&[-11.0, -5.0]), t(&[-11.0, -5.0])]
    }

    #[test]
    fn sigmoid_loss_and_rewards_by_hand() {
        let [pc, pr, rc, rr] = pairs();
        let settings = DpoLossSettings { beta: 0.1, loss_type: DpoLossType::Sigmoid, label_smoothing: 0.0 };
        let out = dpo_loss(&pc, &pr, &rc, &rr, &settings);
        let expected = [-log_sigmoid(0.2), -log_sigmoid(-0.1)]; // 0.598139, 0.744397
        for (g, e) in values(&out.losses).iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
        assert!((expected[0] - 0.5981389).abs() < 1e-6 && (expected[1] - 0.7443967).abs() < 1e-6);
        // Implicit rewards: β·(π − ref): chosen [0.1, 0], rejected [−0.1, 0.1].
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&values(&out.chosen_rewards), &[0.1, 0.0]));
        assert!(close(&values(&out.rejected_rewards), &[-0.1, 0.1]));
    }

    #[test]
    fn label_smoothing_and_ipo_by_hand() {
        let [pc, pr, rc, rr] = pairs();
        let smoothed = DpoLossSettings { beta: 0.5, loss_type: DpoLossType::Sigmoid, label_smoothing: 0.2 };
        let out = values(&dpo_loss(&pc, &pr, &rc, &rr, &smoothed).losses);
        // −0.8·log σ(βh) − 0.2·log σ(−βh), βh = 1 and −0.5.
        let expected =
            [-0.8 * log_sigmoid(1.0) - 0.2 * log_sigmoid(-1.0), -0.8 * log_sigmoid(-0.5) - 0.2 * log_sigmoid(0.5)];
        assert!((out[0] - expected[0]).abs() < 1e-6 && (out[1] - expected[1]).abs() < 1e-6, "{out:?}");
        assert!((expected[0] - 0.5132617).abs() < 1e-6, "{expected:?}");

        let ipo = DpoLossSettings { beta: 0.5, loss_type: DpoLossType::Ipo, label_smoothing: 0.0 };
        let out = values(&dpo_loss(&pc, &pr, &rc, &rr, &ipo).losses);
        // (h − 1/(2·0.5))² = (2 − 1)² = 1 and (−1 − 1)² = 4.
        assert!((out[0] - 1.0).abs() < 1e-6 && (out[1] - 4.0).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn the_gradient_raises_the_chosen_and_lowers_the_rejected() {
        let pc = t(&[-3.0]).set_requires_grad(true);
        let pr = t(&[-3.0]).set_requires_grad(true);
        let settings = DpoLossSettings { beta: 0.1, loss_type: DpoLossType::Sigmoid, label_smoothing: 0.0 };
        dpo_loss(&pc, &pr, &t(&[-3.0]), &t(&[-3.0]), &settings).losses.sum(Kind::Float).backward();
        // d/dπ_c of −log σ(β·h) at h = 0 is −β·σ(0) = −0.05.
        assert!((pc.grad().double_value(&[0]) + 0.05).abs() < 1e-7);
        assert!((pr.grad().double_value(&[0]) - 0.05).abs() < 1e-7);
    }

    #[test]
    fn stats_by_trls_names() {
        let mut stats = DpoStats::default();
        stats.add(&[0.5, 0.7], &[0.1, 0.0], &[-0.1, 0.1], &[-10.0, -5.0], &[-12.0, -4.0]);
        let named: std::collections::HashMap<String, f64> = stats.named("eval/").into_iter().collect();
        assert!((named["eval/loss"] - 0.6).abs() < 1e-12);
        assert!((named["eval/rewards/chosen"] - 0.05).abs() < 1e-12);
        assert!((named["eval/rewards/rejected"] - 0.0).abs() < 1e-12);
        assert!((named["eval/rewards/margins"] - 0.05).abs() < 1e-12);
        assert_eq!(named["eval/rewards/accuracies"], 0.5);
        assert_eq!((named["eval/logps/chosen"], named["eval/logps/rejected"]), (-7.5, -8.0));
    }
}

//! The parts of on-policy RL from a model's own samples (PPO and GRPO; RLOO could reuse
//! them): a batch of [`Experience`] that splits into shuffled minibatches, log-probs of
//! response tokens at a sampling temperature, KL estimators and the KL coefficient's
//! controller, GAE and whitening, group-relative advantages, the clipped PPO losses
//! (with clip-higher) and their statistics, and the ways a per-token loss is aggregated.
//!
//! Every per-token tensor here is (B, R): one row per episode, one column per response
//! token, with a `mask` (B, R) of 1.0 on real response tokens and 0.0 past each
//! response's end, so tokens past the end contribute nothing to any mean, sum or loss.
mod advantage;
mod aggregate;
mod experience;
mod group;
mod kl;
mod log_probs;
mod losses;
mod masked;
mod ppo;
mod sample;

pub use advantage::{gae, whiten, whiten_over_ranks};
pub use aggregate::{aggregate, LossAggregation, UpdateSize};
pub use experience::Experience;
pub use group::{group_advantages, GroupAdvantages, ScaleRewards};
pub use kl::{kl_penalty, KlController, KlEstimator};
pub use log_probs::{entropy, response_log_probs, response_logits};
pub use losses::{approx_kl, clipped_surrogate, policy_loss, value_loss, ClippedSurrogate, PolicyLoss, ValueLoss};
pub use masked::{masked_mean, masked_sum, masked_var};
pub use ppo::{
    minibatch_backward_side_by_side, minibatch_loss, reference_and_values, shaped_rewards, MinibatchStats,
    PpoLossSettings,
};
pub use sample::{
    policy_response_logits, policy_response_scores, rank_seed, response_values, sample, step_seed, Sampled,
};

//! Rollouts: turning a batch of prompts into experience for on-policy training (PPO).
use tch::Tensor;

use crate::context::RunContext;
use crate::error::Result;
use crate::model::Policy;

/// One batch of experience, all tensors (B, T) over the response tokens unless noted.
#[derive(Debug)]
pub struct Experience {
    /// Prompt and response tokens, left-padded prompts: (B, P + T).
    pub sequences: Tensor,
    /// 1 where `sequences` holds a token, 0 for padding: (B, P + T).
    pub attention_mask: Tensor,
    /// 1 on response tokens that count for the loss.
    pub response_mask: Tensor,
    /// Log-probabilities of the response tokens under the policy that sampled them.
    pub log_probs: Tensor,
    /// ... and under the frozen reference policy (for the KL penalty).
    pub ref_log_probs: Tensor,
    /// Value estimates per response token.
    pub values: Tensor,
    /// One scalar reward per sequence: (B).
    pub rewards: Tensor,
}

/// Turns prompts into [`Experience`]: samples responses from the policy, scores them
/// with the reference model, the value model and the rewards.
pub trait Rollout {
    fn collect(&mut self, policy: &dyn Policy, prompts: &[String], ctx: &RunContext) -> Result<Experience>;
}

//! RLHF as plumb stages and rewards.
//!
//! - `rlhf.reward_model`: a scalar-head transformer trained on preference pairs.
//! - `rlhf.ppo`: PPO against rewards named in the recipe.
//! - `rlhf.dpo`: direct preference optimisation on preference pairs.
//! - `rlhf.grpo`: group-relative policy optimisation against rewards named in the recipe.
//! - rewards: learned, verifiable (exact answer, regex/format, length), remote (HTTP),
//!   and a weighted sum of others.
pub mod dpo;
pub mod grpo;
pub mod ppo;
pub mod preference;
pub mod prompts;
pub mod reward_model;
pub mod rewards;

pub use reward_model::RewardModelStage;
pub use rewards::LearnedReward;

plumb_core::export_plugin! {
    name: "rlhf",
    version: env!("CARGO_PKG_VERSION"),
    description: "Reward modelling, PPO, DPO, GRPO, and rewards any stage can call",
    stages: [RewardModelStage, ppo::Ppo, dpo::Dpo, grpo::Grpo],
    evaluators: [],
    rewards: [LearnedReward, rewards::ExactAnswer, rewards::Regex, rewards::Length, rewards::Remote],
}

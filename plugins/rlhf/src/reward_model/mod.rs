//! Reward modelling: preference pairs, the pairwise loss and its figures, scoring with a
//! scalar-head model, and the `rlhf.reward_model` stage.
pub mod loss;
pub mod scoring;
pub mod stage;

pub use stage::RewardModelStage;

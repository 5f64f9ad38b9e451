//! Rewards this plugin provides, each a [`plumb_core::Reward`].
pub mod learned;

pub use learned::LearnedReward;

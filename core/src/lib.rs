//! plumb-core: the contracts plugins are written against, and the parts they are built
//! from (models, data, optimizers, logging, the plugin ABI).
//!
//! A plugin is a `cdylib` that depends on this crate and calls [`export_plugin!`]; its
//! stages implement [`plugin::Stage`] and run against a [`RunContext`]. This crate is the
//! plugin SDK: what only the host needs (recipe loading, plugin loading, TensorBoard
//! files, progress bars) is in `plumb-host`, which plugins do not link.
pub mod checkpoint;
pub mod context;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod model;
pub mod optim;
pub mod plugin;
pub mod recipe;
pub mod reward;
pub mod rollout;
mod shim;
pub mod tokenizer;
pub mod train;

pub use context::RunContext;
pub use error::{Error, Result};
pub use model::Policy;
pub use optim::Optimizer;
pub use plugin::{Evaluator, Reward, RewardContext, Stage, StageOutput};
pub use reward::{RewardModel, RewardSet, RewardWeights, ScorePair};
pub use rollout::Experience;

/// Re-exported so plugins draw from the same generator family as core ([`data::SeededRng`]).
pub use rand;
/// Re-exported: every stage's, evaluator's and reward's config derives
/// `schemars::JsonSchema` (a plugin depends on `schemars = "1"` for the derive macro).
pub use schemars;
/// Re-exported so plugins use the same `tch` as core.
pub use tch;

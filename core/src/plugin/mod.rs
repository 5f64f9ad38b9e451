//! Plugins: the C-only boundary ([`abi`]), the plugin side ([`export`], the
//! [`contract`] traits). The host side (loading, the registry, the host services table)
//! is in the `plumb-host` crate, which plugins do not link.
pub mod abi;
pub mod contract;
pub mod export;

pub use contract::{CreateRequest, Evaluator, Metrics, Reward, RewardContext, Stage, StageOutput, ValidateContext};
pub use export::ValidateRequest;

//! Plugins: the C-only boundary ([`abi`]), the plugin side ([`export`], the
//! [`contract`] traits) and the host side ([`loader`], [`registry`], [`host`]).
pub mod abi;
pub mod contract;
pub mod export;
pub mod host;
pub mod loader;
pub mod registry;

pub use contract::{Evaluator, Metrics, Reward, Stage, StageOutput, ValidateContext};
pub use export::ValidateRequest;
pub use loader::{LoadError, Plugin};
pub use registry::{CallError, Component, Kind, Registry};

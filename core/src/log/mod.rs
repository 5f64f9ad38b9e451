//! Logging: TensorBoard event files and progress.
pub mod tensorboard;

pub use tensorboard::{HParamValue, TbError, TbWriter};
pub mod progress;

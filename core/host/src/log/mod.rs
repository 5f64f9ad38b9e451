//! The host's logging: TensorBoard event files and progress.
pub mod progress;
pub mod tensorboard;

pub use tensorboard::{HParamValue, TbError, TbWriter};

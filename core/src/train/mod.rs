//! What every training stage shares, so each stage's file holds only its own loop:
//! the recipe fields every training stage has ([`TrainingConfig`], read beside the
//! stage's own by [`TrainSection`]), the parts of a loop ([`Trainer`]: learning rate,
//! clipping, the non-finite guard, `train/*` scalars, cadences, resumable checkpoints of
//! one or more models, Ctrl-C, the final save), the losses, and mixed precision.
mod config;
mod loss;
pub mod precision;
mod trainer;

pub use config::{
    BatchSizeWarmup, CheckpointConfig, EvalConfig, Length, OnNonFinite, OptimizerConfig, ScheduleConfig, TrainSection,
    TrainingConfig,
};
pub use loss::{accumulate_gradients, next_token_loss, summed_cross_entropy};
pub use precision::Precision;
pub use trainer::{
    save_model, write_model, DataPosition, StepStats, Trained, Trainer, TrainerState, FAULT_NONFINITE_AT_STEP,
};

use crate::error::{Error, Result};

/// Something found in a stage's data that the user should see (lines skipped, examples
/// truncated): a warning in the log, and TensorBoard text under `tag` (a one-off figure,
/// not a chart of one point).
pub fn note_data(ctx: &crate::RunContext, tag: &str, message: &str) {
    tracing::warn!("{message}");
    ctx.text(tag, 0, message);
}

/// An error at `key` unless `ok`: the shape of every check in a stage's `validate`.
pub fn require(ok: bool, key: &str, message: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::config(key, message))
    }
}

/// Moves a config error of a nested section under `prefix` (`model` + `hidden_size`
/// → `model.hidden_size`), so the recipe error points at the right line.
pub fn nested(prefix: &str, error: Error) -> Error {
    match error {
        Error::Config(mut section) => {
            section.path = format!("{prefix}.{}", section.path);
            Error::Config(section)
        }
        other => other,
    }
}

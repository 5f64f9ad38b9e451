//! What every training stage shares, so each stage's file holds only its own loop:
//! the recipe fields every training stage has ([`TrainingConfig`], read beside the
//! stage's own by [`TrainSection`]), the parts of a loop ([`Trainer`]: learning rate,
//! clipping, the non-finite guard, `train/*` scalars, cadences, resumable checkpoints of
//! one or more models, Ctrl-C, the final save), the losses, and mixed precision.
mod config;
mod loss;
pub mod precision;
mod side_by_side;
mod trainer;

pub use config::{
    BatchSizeWarmup, CheckpointConfig, EvalConfig, Length, OnNonFinite, OptimizerConfig, ScheduleConfig, TrainSection,
    TrainingConfig,
};
pub use loss::{accumulate_gradients, next_token_loss, summed_cross_entropy, summed_token_loss};
pub use precision::Precision;
pub use side_by_side::{side_by_side, OneIntraOpThread};
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

/// A line-oriented data set read from `path`: its items and the lines skipped.
pub type ReadData<T> = Result<(Vec<T>, crate::data::jsonl::Skipped)>;

/// The `validate`-time check of a stage's training file and optional held-out file: each
/// reads (so malformed lines are found before any stage computes anything) and, when the
/// held-out set is cut from the training file, there are at least 2 usable `item`s to
/// split ("example", "pair").
pub fn check_train_and_validation<T>(
    train: &std::path::Path,
    validation: Option<&std::path::Path>,
    item: &str,
    read: impl Fn(&std::path::Path) -> ReadData<T>,
) -> Result<()> {
    for path in std::iter::once(train).chain(validation) {
        let (items, _) = read(path)?;
        if validation.is_none() && items.len() < 2 {
            return Err(Error::file(
                path,
                format!(
                    "{} usable {item}(s); holding out data.validation_fraction for validation needs at least 2 (add {item}s or give data.validation)",
                    items.len()
                ),
            ));
        }
    }
    Ok(())
}

/// A stage's training and held-out data at run time: each file is read by `read` on a
/// thread of its own (`what` names the work; a stop asked for is honoured within 50 ms,
/// see [`RunContext::unless_stopped`](crate::RunContext::unless_stopped)), skipped lines
/// are noted ([`note_data`]), and without a held-out file `fraction` of the training
/// items are held out, drawn with the run's seed.
pub fn read_train_and_validation<T: Send + 'static>(
    ctx: &crate::RunContext,
    what: &str,
    train: &std::path::Path,
    validation: Option<&std::path::Path>,
    fraction: f64,
    read: impl Fn(&std::path::Path) -> ReadData<T> + Clone + Send + 'static,
) -> Result<(Vec<T>, Vec<T>)> {
    let read_one = |path: &std::path::Path| {
        let (path, read) = (path.to_path_buf(), read.clone());
        let (items, skipped) = ctx.unless_stopped(what, move || read(&path))?;
        if !skipped.lines.is_empty() {
            note_data(ctx, "data/malformed_lines", &skipped.to_string());
        }
        Ok::<_, Error>(items)
    };
    match validation {
        Some(path) => Ok((read_one(train)?, read_one(path)?)),
        None => crate::data::split_documents(read_one(train)?, fraction, ctx.seed()),
    }
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

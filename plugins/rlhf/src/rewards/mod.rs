//! Rewards any stage can call by the name the recipe gives them (`rewards:`), one file
//! each:
//!
//! | file | reward | scores |
//! |---|---|---|
//! | `learned.rs` | `rlhf.learned` | a trained reward model (its own tokenizer) |
//! | `exact_answer.rs` | `rlhf.exact_answer` | the response's final answer against the reference the prompt carries |
//! | `regex.rs` | `rlhf.regex` | whether the response matches a pattern (a format check) |
//! | `length.rs` | `rlhf.length` | a penalty per character or word beyond (or below) a target |
//! | `remote.rs` | `rlhf.remote` | whatever an HTTP endpoint answers (JSON in and out) |
//!
//! Several at once, weighted, is a stage's [`plumb_core::reward::RewardSet`].
use plumb_core::{Error, Result};

pub mod exact_answer;
pub mod learned;
pub mod length;
pub mod regex;
pub mod remote;

pub use exact_answer::ExactAnswer;
pub use learned::LearnedReward;
pub use length::Length;
pub use regex::Regex;
pub use remote::Remote;

/// An error at `key` unless `value` is a finite number (a score or a penalty).
fn finite(key: &str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::config(key, format!("expected a finite number, found {value}")))
    }
}

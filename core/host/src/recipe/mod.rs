//! Recipes: YAML schema, overrides, located errors.
//!
//! [`Recipe::load`] reads a recipe file, applies `key.path=value` overrides from the command
//! line, and checks everything serde and the schema can check before any work starts.
//! Every error names the place: `recipes/x.yaml:12:7: stages[0].config.lerning_rate:
//! unknown key; expected one of ...; did you mean `learning_rate`?`, or `command line
//! override `...`: ...` for a value an override set. Checks made later — a plugin
//! rejecting its section, a missing data file — are placed the same way with
//! [`LoadedRecipe::error_at`] and [`LoadedRecipe::section_error`].
//!
//! Anchors, aliases and tags are refused: every value has one place in the file.
//!
//! | file | concern |
//! |---|---|
//! | `schema.rs` | the typed recipe and its defaults |
//! | `load.rs` | reading, parsing, overriding, typing, validating |
//! | `overrides.rs` | `key.path=value` |
//! | `validate.rs` | names, uniqueness, `uses`, pins |
//! | `source.rs` | line and column of every key |
//! | `error.rs` | [`RecipeError`] |
//! | `sweep.rs` | `sweep:`, one stage over a grid of settings |
//! | `options.rs` | a section's options from its JSON Schema: listed, defaults filled in |
//!
//! Shared with plugins, in `plumb_core::recipe`: key paths (`path.rs`), serde messages in
//! YAML words (`explain.rs`), "did you mean" (`suggest.rs`) and plugin config sections
//! (`section.rs`, [`parse_section`], [`SectionError`]).
mod error;
mod load;
pub mod options;
mod overrides;
mod schema;
mod source;
pub mod sweep;
mod validate;

pub use error::{Location, RecipeError};
pub use load::LoadedRecipe;
pub use plumb_core::recipe::{parse_section, suggest, SectionError};
pub use schema::{Device, ModelSource, PluginSpec, Recipe, RewardSpec, RunSpec, StageSpec};

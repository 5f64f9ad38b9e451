//! What a plugin needs to read its own recipe section: [`parse_section`] into a
//! `#[serde(deny_unknown_fields)]` struct, with a [`SectionError`] (key path and message)
//! when it does not fit.
//!
//! Loading whole recipes (schema, overrides, positions, checks) is the host's concern and
//! lives in the `plumb-host` crate; it shares the modules below so a plugin's section
//! errors and the recipe's own read the same.
//!
//! | file | concern |
//! |---|---|
//! | `section.rs` | plugin config sections |
//! | `path.rs` | key paths `stages[0].config.lr` |
//! | `explain.rs` | serde messages in YAML words |
//! | `suggest.rs` | "did you mean" |
pub mod explain;
pub mod path;
mod section;
pub mod suggest;

pub(crate) use section::{located_message, parse_value};
pub use section::{parse_section, SectionError};
pub use suggest::suggest;

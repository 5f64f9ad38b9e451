//! plumb-host: what only the host (the `plumb` binary, and tests that drive it) needs.
//!
//! - [`recipe`]: loading recipes — schema and defaults, `key.path=value` overrides, line and
//!   column of every key, checks before any compute;
//! - [`plugin`]: finding, checking and loading plugin libraries (libloading, sha256 pins),
//!   the [`Registry`](plugin::Registry) of their components, and the host services table
//!   ([`HostServices`](plugin::host::HostServices)) a running plugin calls back into;
//! - [`log`]: TensorBoard event files and the terminal progress display.
//!
//! Plugins link `plumb-core` only (the SDK: contracts, `RunContext`, models, data,
//! optimizers, the C ABI); nothing here crosses the plugin boundary.
pub mod log;
pub mod plugin;
pub mod recipe;
pub mod scaling;

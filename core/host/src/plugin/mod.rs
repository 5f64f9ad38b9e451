//! The host side of the plugin boundary: [`loader`] finds, checks and loads a plugin's
//! library, [`registry`] looks its components up by recipe name and calls them, [`host`]
//! is the table of services a running plugin calls back into.
pub mod host;
pub mod loader;
pub mod registry;

pub use loader::{LoadError, Plugin};
pub use registry::{CallError, Component, Kind, Registry};

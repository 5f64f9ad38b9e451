//! The error type of plumb-core and of plugins written against it.
use std::path::{Path, PathBuf};

use crate::recipe::SectionError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A configuration section is invalid; `path` is the key path inside the section.
    #[error("{0}")]
    Config(SectionError),

    /// Bad content in an input file: data, checkpoint, tokenizer.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },

    #[error("libtorch: {}", without_backtrace(&.0.to_string()))]
    Torch(#[from] tch::TchError),

    /// A distributed launch or collective failed (names the rank and the address).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),

    #[error("plugin `{plugin}`: {message}")]
    Plugin { plugin: String, message: String },

    /// The user asked the run to stop (SIGINT) and the work stopped cleanly.
    #[error("stopped on request")]
    Cancelled,

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn file(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::File { path: path.as_ref().to_path_buf(), message: message.into() }
    }

    /// An invalid value at `key` (a key path inside the component's config section).
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config(SectionError { path: key.into(), message: message.into() })
    }
}

/// Adds the path to an I/O result: `fs::read(p).at(p)?`.
pub trait IoResultExt<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoResultExt<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

/// libtorch's messages end with a C++ backtrace ("Exception raised from ..."): useful
/// to its developers, noise to ours. Keeps what comes before it.
pub fn without_backtrace(message: &str) -> &str {
    message.split("\nException raised from").next().unwrap_or(message).trim_end()
}

//! The recipe error: where (file:line:col or a command-line override), which key, what.
use std::fmt;
use std::path::PathBuf;

/// Where a recipe error is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A position in the recipe file; line and column are 1-based, columns count characters.
    File { file: PathBuf, line: usize, column: usize },
    /// A `key.path=value` override given on the command line, as written.
    Override(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { file, line, column } => {
                write!(f, "{}:{line}:{column}", file.display())
            }
            Location::Override(text) => write!(f, "command line override `{text}`"),
        }
    }
}

/// Why a recipe could not be loaded, or a later finding located in it
/// ([`LoadedRecipe::error_at`](super::LoadedRecipe::error_at)).
///
/// Reads like `recipes/x.yaml:12:7: stages[0].config.lerning_rate: unknown key; expected
/// one of `learning_rate`, `warmup_steps`; did you mean `learning_rate`?`.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file could not be read at all.
    #[error("cannot read recipe `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something is wrong at a place in the recipe or in an override.
    #[error("{location}: {}{message}", path_prefix(key_path))]
    At {
        location: Location,
        /// Canonical key path (`stages[0].config.lr`); empty for the whole recipe.
        key_path: String,
        /// What is wrong, with what was expected and a suggestion where there is one.
        message: String,
    },
}

fn path_prefix(key_path: &str) -> String {
    if key_path.is_empty() {
        String::new()
    } else {
        format!("{key_path}: ")
    }
}

impl RecipeError {
    pub(crate) fn at(location: Location, key_path: impl ToString, message: impl Into<String>) -> Self {
        RecipeError::At { location, key_path: key_path.to_string(), message: message.into() }
    }

    /// Where the error is; `None` when the file could not be read.
    pub fn location(&self) -> Option<&Location> {
        match self {
            RecipeError::Read { .. } => None,
            RecipeError::At { location, .. } => Some(location),
        }
    }

    /// The canonical key path of the error ("" for the whole recipe or an unreadable file).
    pub fn key_path(&self) -> &str {
        match self {
            RecipeError::Read { .. } => "",
            RecipeError::At { key_path, .. } => key_path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let file = Location::File { file: "r.yaml".into(), line: 3, column: 5 };
        assert_eq!(RecipeError::at(file.clone(), "run.seed", "bad").to_string(), "r.yaml:3:5: run.seed: bad");
        assert_eq!(RecipeError::at(file, "", "empty").to_string(), "r.yaml:3:5: empty");
        let cli = Location::Override("a.b=1".into());
        assert_eq!(RecipeError::at(cli, "a.b", "bad").to_string(), "command line override `a.b=1`: a.b: bad");
    }
}

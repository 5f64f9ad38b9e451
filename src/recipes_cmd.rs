//! `plumb recipes` lists the recipes shipped with plumb (built into the binary) and
//! `plumb init RECIPE [DEST]` copies one to start from, as torchtune's `tune ls` and
//! `tune cp` do.
use std::path::{Path, PathBuf};

use crate::Failure;

mod shipped {
    include!(concat!(env!("OUT_DIR"), "/recipes.rs"));
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// A shipped recipe's name, as `plumb recipes` lists them (e.g. `quickstart`).
    pub recipe: String,
    /// Where to write it: a file, or a directory to write `RECIPE.yaml` into. Default:
    /// `RECIPE.yaml` in the current directory. An existing file is never overwritten.
    pub dest: Option<PathBuf>,
}

/// The recipe's summary: its leading comment up to the first full stop, on one line.
fn summary(text: &str) -> String {
    let comment: Vec<&str> = text
        .lines()
        .map_while(|line| line.strip_prefix('#'))
        .map(str::trim)
        .take_while(|line| !line.is_empty())
        .collect();
    let joined = comment.join(" ");
    match joined.find(". ") {
        Some(end) => joined[..=end].to_owned(),
        None => joined,
    }
}

pub fn list() -> Result<(), Failure> {
    let width = shipped::SHIPPED.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, text) in shipped::SHIPPED {
        println!("{name:width$}  {}", summary(text));
    }
    println!("\nCopy one to start from: plumb init RECIPE [DEST]");
    Ok(())
}

pub fn init(args: &InitArgs) -> Result<(), Failure> {
    let name = args.recipe.trim_end_matches(".yaml");
    let Some((_, text)) = shipped::SHIPPED.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = shipped::SHIPPED.iter().map(|(n, _)| *n).collect();
        let hint = plumb_core::recipe::suggest::did_you_mean(name, names.iter().copied());
        return Err(Failure::User(format!(
            "no shipped recipe `{name}`{hint}; `plumb recipes` lists them: {}",
            names.join(", ")
        )));
    };
    let file = format!("{name}.yaml");
    let dest = match &args.dest {
        Some(dest) if dest.is_dir() => dest.join(&file),
        Some(dest) => dest.clone(),
        None => PathBuf::from(&file),
    };
    write_new(&dest, text)?;
    println!("wrote {}; run it with: plumb run {}", dest.display(), dest.display());
    Ok(())
}

/// Writes `text` to `path`, which must not exist yet.
fn write_new(path: &Path, text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| {
        Failure::User(match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!("{} already exists; not overwriting it", path.display()),
            _ => format!("{}: {e}", path.display()),
        })
    })?;
    file.write_all(text.as_bytes()).map_err(|e| Failure::User(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_is_the_leading_comment_up_to_its_first_full_stop() {
        let text = "# Pretrain a small model from scratch on the shipped corpus, on a CPU.\n#\n#   ./dev quickstart\nrun: {}\n";
        assert_eq!(summary(text), "Pretrain a small model from scratch on the shipped corpus, on a CPU.");
        let wrapped = "# Masked language modelling on the shipped corpus, with a small\n# encoder. More.\n\nrun:";
        assert_eq!(summary(wrapped), "Masked language modelling on the shipped corpus, with a small encoder.");
        assert!(shipped::SHIPPED.iter().any(|(name, _)| *name == "quickstart"));
    }
}

//! One run owns its output directory.
//!
//! A run takes an exclusive OS lock (`flock`) on `<output_dir>/.lock` before it writes
//! anything there and holds it until the process ends; the kernel releases it when the
//! process dies, however it dies, so a killed run never leaves a stale lock behind. A
//! second run into a directory in use is refused, and so is a later run into a directory
//! that holds an earlier run's files, unless it continues that run (`--resume`) or clears
//! it first (`--overwrite`): two runs must never mix their files, and starting over must
//! never delete an earlier run's checkpoints unasked.
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::Failure;

/// The lock file; its presence alone does not make a directory an earlier run's.
pub const LOCK_FILE: &str = ".lock";
/// What every run writes first, beginning with [`RESOLVED_MARK`]: the mark of a plumb
/// run directory (a user's own `recipe.yaml` does not carry it).
const RECIPE_FILE: &str = "recipe.yaml";
const RESOLVED_MARK: &str = "# Resolved by plumb from ";

/// What a run does with an earlier run's files in its output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earlier {
    /// Refuse to run: the directory must be new or empty.
    Refuse,
    /// Keep them: the run continues the earlier one.
    Continue,
    /// Delete them, then run.
    Clear,
}

/// An output directory this process holds the lock of, until it is dropped (or the
/// process ends).
pub struct OwnedDir {
    _lock: File,
}

/// Creates `dir` if needed, locks it for this process and applies `earlier` to the files
/// of an earlier run. `choices` finishes the refusal of an earlier run's directory with
/// the ways on, in the words of the command (`pass --resume to ...`).
pub fn claim(dir: &Path, earlier: Earlier, choices: &str) -> Result<OwnedDir, Failure> {
    let user = |message: String| Failure::User(format!("{}: {message}", dir.display()));
    fs::create_dir_all(dir).map_err(|e| user(format!("cannot create the output directory: {e}")))?;
    let path = dir.join(LOCK_FILE);
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Failure::User(format!("{}: cannot open the lock file: {e}", path.display())))?;
    // SAFETY: flock on a file descriptor we own, open for the duration of the call.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Failure::User(format!("{}: cannot lock the output directory: {error}", path.display())));
        }
        let mut holder = String::new();
        let _ = lock.read_to_string(&mut holder);
        let holder = holder.trim().parse::<u32>().map(|pid| format!(" (pid {pid})")).unwrap_or_default();
        return Err(user(format!(
            "another plumb run{holder} is writing to this output directory; wait for it to end (then \
             --resume or --overwrite it), or set another run.output_dir"
        )));
    }
    // Who holds it, for the message of a run refused meanwhile.
    let _ = lock.set_len(0).and_then(|_| lock.rewind()).and_then(|_| write!(lock, "{}", std::process::id()));

    let entries = earlier_files(dir).map_err(|e| user(format!("cannot read the output directory: {e}")))?;
    match (earlier, entries.is_empty()) {
        (_, true) | (Earlier::Continue, false) => {}
        (Earlier::Refuse, false) => {
            return Err(user(format!("holds the files of an earlier run; {choices}")));
        }
        (Earlier::Clear, false) => {
            let recipe = fs::read_to_string(dir.join(RECIPE_FILE)).unwrap_or_default();
            if !recipe.starts_with(RESOLVED_MARK) {
                return Err(user(format!(
                    "is not the output directory of a plumb run (it has no {RECIPE_FILE} written by plumb); \
                     not deleting its files: choose another output directory"
                )));
            }
            for entry in &entries {
                let removed = if entry.is_dir() && !entry.is_symlink() {
                    fs::remove_dir_all(entry)
                } else {
                    fs::remove_file(entry)
                };
                removed.map_err(|e| Failure::User(format!("{}: cannot remove it: {e}", entry.display())))?;
            }
            tracing::warn!("--overwrite: removed the files of the earlier run in {}", dir.display());
        }
    }
    Ok(OwnedDir { _lock: lock })
}

/// Everything in `dir` but the lock file.
fn earlier_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() != LOCK_FILE {
            entries.push(entry.path());
        }
    }
    entries.sort();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<OwnedDir, Failure>) -> String {
        match result {
            Err(Failure::User(m)) => m,
            Err(other) => panic!("not a user error: {other:?}"),
            Ok(_) => panic!("claimed"),
        }
    }

    #[test]
    fn a_directory_in_use_or_holding_an_earlier_run_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let held = claim(&dir, Earlier::Refuse, "choices").unwrap();
        // flock locks belong to the open file, so a second open in this process conflicts too.
        let busy = message(claim(&dir, Earlier::Continue, "choices"));
        assert!(busy.contains(&format!("another plumb run (pid {}) is writing to", std::process::id())), "{busy}");
        assert!(busy.starts_with(&dir.display().to_string()), "{busy}");
        fs::write(dir.join(RECIPE_FILE), format!("{RESOLVED_MARK}r.yaml\nrun: {{}}\n")).unwrap();
        fs::create_dir(dir.join("stage")).unwrap();
        drop(held);

        let refused = message(claim(&dir, Earlier::Refuse, "pass --resume or --overwrite"));
        assert_eq!(
            refused,
            format!("{}: holds the files of an earlier run; pass --resume or --overwrite", dir.display())
        );
        drop(claim(&dir, Earlier::Continue, "").unwrap());
        assert!(dir.join("stage").is_dir(), "resuming keeps the files");
        drop(claim(&dir, Earlier::Clear, "").unwrap());
        assert_eq!(earlier_files(&dir).unwrap(), Vec::<PathBuf>::new(), "overwriting clears them");
        drop(claim(&dir, Earlier::Refuse, "").unwrap());

        // A directory plumb did not make is never cleared, even if it holds a recipe.
        fs::write(dir.join("notes.txt"), "mine").unwrap();
        let foreign = message(claim(&dir, Earlier::Clear, ""));
        assert!(foreign.contains("is not the output directory of a plumb run"), "{foreign}");
        fs::write(dir.join(RECIPE_FILE), "run: {}\n").unwrap();
        let foreign = message(claim(&dir, Earlier::Clear, ""));
        assert!(foreign.contains("is not the output directory of a plumb run"), "{foreign}");
        assert!(dir.join("notes.txt").is_file());
    }
}

//! Models named the Hugging Face way (`ORG/NAME`), found in the local Hugging Face cache.
//!
//! plumb does not download: a hub name resolves to the snapshot the cache's `main` ref
//! points to (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`,
//! laid out as `models--ORG--NAME/{refs/main, snapshots/<commit>/}`), which
//! `huggingface-cli download ORG/NAME` (or `hf download`) fills.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The model directory `model` names: itself when it is a directory (or looks like a
/// path), else the cached snapshot of the hub model `ORG/NAME`; an error that says how to
/// fetch it when the cache does not hold it.
pub fn resolve_model(model: &Path) -> Result<PathBuf> {
    resolve_in(model, &hub_cache())
}

fn resolve_in(model: &Path, cache: &Path) -> Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let Some(id) = hub_id(model) else {
        return Ok(model.to_path_buf()); // a path; its loader says what is missing
    };
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let snapshot = std::fs::read_to_string(repo.join("refs/main"))
        .ok()
        .map(|commit| repo.join("snapshots").join(commit.trim()))
        .filter(|dir| dir.join("config.json").is_file());
    snapshot.ok_or_else(|| {
        Error::Other(format!(
            "`{id}` is neither a directory nor a model in the Hugging Face cache ({}); plumb does not download \
             models: fetch it with `huggingface-cli download {id}` (or `hf download {id}`), or give the path of \
             a directory in HF layout",
            cache.display()
        ))
    })
}

/// `ORG/NAME` when `model` reads as a hub id: two non-empty parts of the characters the hub
/// allows, and not a path written as one (`./x`, `/x`, `x/`).
fn hub_id(model: &Path) -> Option<String> {
    let text = model.to_str()?;
    let (org, name) = text.split_once('/')?;
    let part = |p: &str| {
        !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (part(org) && part(name)).then(|| text.to_owned())
}

/// The hub cache directory, as `huggingface_hub` finds it.
fn hub_cache() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|home| home.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|cache| cache.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|home| home.join(".cache/huggingface/hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert_eq!(hub_id(Path::new("HuggingFaceTB/SmolLM2-135M")).as_deref(), Some("HuggingFaceTB/SmolLM2-135M"));
        for path in ["runs/x/final", "./org/name", "/abs", "org/", "name", "../x"] {
            assert_eq!(hub_id(Path::new(path)), None, "{path}");
        }
    }

    #[test]
    fn a_hub_id_resolves_to_the_snapshot_main_points_to() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        for commit in ["aaa111", "bbb222"] {
            std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
            std::fs::write(repo.join("snapshots").join(commit).join("config.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "bbb222").unwrap();
        let found = resolve_in(Path::new("org/tiny"), cache.path()).unwrap();
        assert_eq!(found, repo.join("snapshots/bbb222"));

        let missing = resolve_in(Path::new("org/other"), cache.path()).unwrap_err().to_string();
        assert!(
            missing.contains("`org/other` is neither a directory nor a model in the Hugging Face cache"),
            "{missing}"
        );
        assert!(missing.contains("plumb does not download models: fetch it with `huggingface-cli download org/other`"));
        // A directory of that name wins over the cache.
        let local = tempfile::tempdir().unwrap();
        assert_eq!(resolve_in(local.path(), cache.path()).unwrap(), local.path());
    }
}

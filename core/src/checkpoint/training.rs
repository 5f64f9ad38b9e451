//! Training checkpoints: everything needed to continue a run exactly where it stopped
//! (model in HF layout, optimizer state, trainer state with the data position), one
//! directory per step, written atomically, the last K kept.
//!
//! Each checkpoint ends with `manifest.json`, written last: every file it holds with its
//! size. A checkpoint whose files do not match its manifest (a truncated weight file, a
//! file missing, no manifest at all) was damaged after its save, and [`Checkpoints::verify`]
//! says how, so a resume can fall back to an older one.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{read_json, write_dir_atomically, write_json, WeightFile};
use crate::error::{Error, IoResultExt, Result};

const PREFIX: &str = "step-";
/// The list of a checkpoint's files and sizes, written last.
pub const MANIFEST: &str = "manifest.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    /// Size in bytes of each file, by its path relative to the checkpoint.
    files: BTreeMap<String, u64>,
}

/// The checkpoints of one stage, in `<stage_dir>/checkpoints/step-<N>/`.
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    pub fn new(stage_dir: &Path, keep: usize) -> Self {
        Self { dir: stage_dir.join("checkpoints"), keep: keep.max(1) }
    }

    pub fn dir_of(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{step:08}"))
    }

    /// Writes checkpoint `step` with `fill` and its manifest (into a staging directory
    /// that is renamed into place once complete), then deletes all but the newest `keep`.
    pub fn save(&self, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let dest = self.dir_of(step);
        write_dir_atomically(&dest, |dir| {
            fill(dir)?;
            write_manifest(dir)
        })?;
        let steps = self.steps()?;
        for old in steps.iter().rev().skip(self.keep) {
            let dir = self.dir_of(*old);
            fs::remove_dir_all(&dir).at(&dir)?;
        }
        Ok(dest)
    }

    /// Completed checkpoints, oldest first. Staging directories of an interrupted save
    /// are not checkpoints.
    pub fn steps(&self) -> Result<Vec<u64>> {
        if !self.dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut steps: Vec<u64> = fs::read_dir(&self.dir)
            .at(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|n| n.parse().ok()))
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    /// Removes every checkpoint of this stage.
    pub fn clear(&self) -> Result<()> {
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir).at(&self.dir)?;
        }
        Ok(())
    }

    /// The newest completed checkpoint.
    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.steps()?.last().map(|&step| (step, self.dir_of(step))))
    }

    /// Removes what saves killed midway left behind (`.step-….partial-…` staging
    /// directories, `.step-….old-…` replaced ones) and returns them. Only the run that
    /// owns the output directory may call it.
    pub fn remove_leftovers(&self) -> Result<Vec<PathBuf>> {
        remove_leftovers_of(&self.dir, PREFIX)
    }

    /// Checks checkpoint `dir` against its manifest: `Err` says what is wrong.
    pub fn verify(dir: &Path) -> std::result::Result<(), String> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Err(format!(
                "it has no {MANIFEST}: its save did not finish (or a plumb older than manifests made it)"
            ));
        }
        let manifest: Manifest = read_json(&path).map_err(|e| format!("its manifest is unreadable: {e}"))?;
        for (file, size) in &manifest.files {
            match fs::metadata(dir.join(file)) {
                Ok(meta) if meta.len() == *size => {}
                Ok(meta) => return Err(format!("{file} is {} bytes, its manifest says {size}", meta.len())),
                Err(e) => return Err(format!("{file}: {e}")),
            }
        }
        Ok(())
    }
}

/// Removes from `dir` what [`write_dir_atomically`] left there when killed midway while
/// writing a directory whose name starts with `name` (its `.<name>….partial-<pid>`
/// staging directory, or the `.<name>….old-<pid>` one it was replacing), and returns
/// them. Only the run that owns the output directory may call it.
pub fn remove_leftovers_of(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let leftover = file_name.starts_with(&format!(".{name}"))
            && (file_name.contains(".partial-") || file_name.contains(".old-"));
        if leftover {
            let path = entry.path();
            if path.is_dir() {
                fs::remove_dir_all(&path).at(&path)?;
            } else {
                fs::remove_file(&path).at(&path)?;
            }
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Writes `dir`'s manifest: every file below it with its size.
fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in fs::read_dir(&folder).at(&folder)? {
            let path = entry.at(&folder)?.path();
            let meta = fs::metadata(&path).at(&path)?;
            if meta.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                let name = relative.to_string_lossy().into_owned();
                if name != MANIFEST {
                    files.insert(name, meta.len());
                }
            }
        }
    }
    let json = serde_json::to_value(Manifest { files }).map_err(|e| Error::Other(e.to_string()))?;
    write_json(&dir.join(MANIFEST), &json)
}

/// Reads every tensor of a safetensors file, sorted by name; the counterpart of
/// [`super::save_safetensors`]. Each tensor is read straight into its own memory, so
/// nothing of the file stays resident besides the tensors.
pub fn load_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    WeightFile::open(path)?.read_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn only_the_newest_checkpoints_are_kept_and_partial_ones_ignored() {
        let root = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints::new(root.path(), 2);
        for step in [10, 20, 30] {
            checkpoints
                .save(step, |dir| {
                    fs::write(dir.join("x"), step.to_string()).unwrap();
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(checkpoints.steps().unwrap(), vec![20, 30]);
        // A save that died midway leaves a staging directory, which is not a checkpoint.
        fs::create_dir_all(root.path().join("checkpoints/.step-00000040.partial-1")).unwrap();
        let failed = checkpoints.save(40, |_| Err(Error::Other("killed".into())));
        assert!(failed.is_err());
        assert_eq!(checkpoints.latest().unwrap().map(|(s, _)| s), Some(30));
        // The next start removes what the killed save left.
        let removed = checkpoints.remove_leftovers().unwrap();
        assert_eq!(removed, vec![root.path().join("checkpoints/.step-00000040.partial-1")]);
        assert_eq!(checkpoints.steps().unwrap(), vec![20, 30]);
    }

    #[test]
    fn a_damaged_checkpoint_fails_its_manifest() {
        let root = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints::new(root.path(), 2);
        let dir = checkpoints
            .save(1, |dir| {
                fs::create_dir(dir.join("value")).unwrap();
                fs::write(dir.join("value/model.safetensors"), [7u8; 100]).unwrap();
                fs::write(dir.join("trainer_state.json"), "{}").unwrap();
                Ok(())
            })
            .unwrap();
        assert_eq!(Checkpoints::verify(&dir), Ok(()));
        fs::write(dir.join("value/model.safetensors"), [7u8; 60]).unwrap();
        assert_eq!(
            Checkpoints::verify(&dir),
            Err("value/model.safetensors is 60 bytes, its manifest says 100".to_string())
        );
        fs::remove_file(dir.join("trainer_state.json")).unwrap();
        assert!(Checkpoints::verify(&dir).unwrap_err().starts_with("trainer_state.json: "));
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert_eq!(
            Checkpoints::verify(&dir),
            Err("it has no manifest.json: its save did not finish (or a plumb older than manifests made it)"
                .to_string())
        );
    }

    #[test]
    fn tensors_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("state.safetensors");
        let a = Tensor::from_slice(&[1.5f32, -2.0]);
        crate::checkpoint::save_safetensors(
            &path,
            &[("m".into(), a.shallow_clone()), ("step".into(), Tensor::from(7i64))],
        )
        .unwrap();
        let back = load_tensors(&path).unwrap();
        assert_eq!(back[0].0, "m");
        assert_eq!(Vec::<f32>::try_from(&back[0].1).unwrap(), vec![1.5, -2.0]);
        assert_eq!(back[1].1.int64_value(&[]), 7);
    }
}

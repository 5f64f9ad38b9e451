//! Training checkpoints: everything needed to continue a run exactly where it stopped
//! (model in HF layout, optimizer state, trainer state with the data position), one
//! directory per step, written atomically, the last K kept.
use std::fs;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{write_dir_atomically, WeightFile};
use crate::error::{IoResultExt, Result};

const PREFIX: &str = "step-";

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

    /// Writes checkpoint `step` with `fill` (into a staging directory that is renamed
    /// into place once complete), then deletes all but the newest `keep`.
    pub fn save(&self, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let dest = self.dir_of(step);
        write_dir_atomically(&dest, fill)?;
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

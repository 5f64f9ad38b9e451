//! Checkpoints in HF layout, written atomically: a directory is filled beside its
//! destination and renamed into place, so a crash mid-save leaves the previous one.
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use tch::{nn, Kind, Tensor};

use crate::error::{Error, IoResultExt, Result};

/// Fills a fresh directory with `fill` and renames it to `dest`, replacing any
/// previous `dest` only once the new one is complete.
pub fn write_dir_atomically(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).at(parent)?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).at(&staging)?;
    }
    fs::create_dir(&staging).at(&staging)?;
    if let Err(e) = fill(&staging) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    sync_dir(&staging)?;
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dest.exists() {
        fs::rename(dest, &old).at(dest)?;
    }
    fs::rename(&staging, dest).at(dest)?;
    sync_dir(parent)?;
    if old.exists() {
        fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(())
}

/// Flushes every file in `dir` and the directory itself to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if path.is_file() {
            fs::File::open(&path).and_then(|f| f.sync_all()).at(&path)?;
        }
    }
    fs::File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_file_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension(format!("partial-{}", std::process::id()));
    fs::write(&tmp, contents).at(&tmp)?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
    fs::rename(&tmp, path).at(path)
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Saves named tensors as one safetensors file with `{"format": "pt"}` metadata, as
/// `transformers` writes them.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let dtype = dtype_of(tensor.kind())
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` has unsupported dtype {:?}", tensor.kind())))?;
        let cpu = tensor.to_device(tch::Device::Cpu).contiguous();
        let mut bytes = vec![0u8; cpu.numel() * tensor.kind().elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut bytes, cpu.numel())?;
        let shape: Vec<usize> = cpu.size().iter().map(|&d| d as usize).collect();
        host.push((name.clone(), dtype, shape, bytes));
    }
    let views = host
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| Error::file(path, e.to_string()))
}

/// Copies every variable of `vs` from the safetensors file at `path` (memory-mapped),
/// checking that each exists with the variable's shape.
pub fn load_safetensors_into(vs: &mut nn::VarStore, path: &Path) -> Result<()> {
    let file = fs::File::open(path).at(path)?;
    // SAFETY: the file is only read; a concurrent writer would corrupt the values, not memory safety of Rust data.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let _no_grad = tch::no_grad_guard();
    // In name order, so the first problem reported is the same on every run.
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in variables {
        let view = st.tensor(&name).map_err(|_| Error::file(path, format!("tensor `{name}` is missing")))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != var.size() {
            return Err(Error::file(
                path,
                format!("tensor `{name}` has shape {shape:?}, the model expects {:?}", var.size()),
            ));
        }
        let kind = kind_of(view.dtype())
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` has unsupported dtype {:?}", view.dtype())))?;
        let source = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        var.f_copy_(&source.to_kind(var.kind()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_previous_directory_intact() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("final");
        write_dir_atomically(&dest, |dir| Ok(fs::write(dir.join("a.txt"), "first").unwrap())).unwrap();
        let failed = write_dir_atomically(&dest, |dir| {
            fs::write(dir.join("a.txt"), "second, half written").unwrap();
            Err(Error::Other("disk full".into()))
        });
        assert_eq!(failed.unwrap_err().to_string(), "disk full");
        assert_eq!(fs::read_to_string(dest.join("a.txt")).unwrap(), "first");
        let leftovers: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("final")], "no staging directory is left behind");
        write_dir_atomically(&dest, |dir| Ok(fs::write(dir.join("b.txt"), "second").unwrap())).unwrap();
        assert!(!dest.join("a.txt").exists() && dest.join("b.txt").is_file());
    }

    #[test]
    fn a_truncated_safetensors_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save_safetensors(&path, &[("w".to_string(), Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu)))]).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        let _w = vs.root().zeros("w", &[4, 4]);
        let message = load_safetensors_into(&mut vs, &path).unwrap_err().to_string();
        assert!(message.contains("model.safetensors: not a valid safetensors file"), "{message}");
    }

    #[test]
    fn safetensors_carry_the_format_metadata_transformers_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save_safetensors(&path, &[("x".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))]).unwrap();
        let bytes = fs::read(&path).unwrap();
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(metadata.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    }
}

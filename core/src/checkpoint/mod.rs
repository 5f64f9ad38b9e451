//! Checkpoints in HF layout, written atomically: a directory is filled beside its
//! destination and renamed into place, so a crash mid-save leaves the previous one.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use tch::{nn, Kind, Tensor};

use crate::error::{Error, IoResultExt, Result};

pub mod hub;
pub mod training;

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
/// `transformers` writes them (tensors ordered as the `safetensors` crate orders them:
/// by dtype alignment, then name). The header is written from shapes and dtypes alone,
/// then each tensor's bytes, copied to the host one tensor at a time: saving needs one
/// tensor's memory beyond the model's. Written to a temporary file renamed into place.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut order = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let dtype = dtype_of(tensor.kind())
            .ok_or_else(|| Error::file(path, format!("tensor `{name}` has unsupported dtype {:?}", tensor.kind())))?;
        order.push((name, tensor, dtype));
    }
    order.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for (name, tensor, dtype) in &order {
        let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        infos.push((name.to_string(), TensorInfo { dtype: *dtype, shape, data_offsets: (offset, offset + len) }));
        offset += len;
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let header = Metadata::new(metadata, infos).map_err(|e| Error::file(path, e.to_string()))?;
    let mut header = serde_json::to_vec(&header).map_err(|e| Error::file(path, e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' '); // tensor data 8-byte aligned

    let tmp: PathBuf = path.with_extension(format!("partial-{}", std::process::id()));
    let write = || -> Result<()> {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp).at(&tmp)?);
        out.write_all(&(header.len() as u64).to_le_bytes()).at(&tmp)?;
        out.write_all(&header).at(&tmp)?;
        for (_, tensor, _) in &order {
            let cpu = tensor.to_device(tch::Device::Cpu).contiguous();
            let mut bytes = vec![0u8; cpu.numel() * cpu.kind().elt_size_in_bytes()];
            cpu.f_copy_data_u8(&mut bytes, cpu.numel())?;
            out.write_all(&bytes).at(&tmp)?;
        }
        out.flush().at(&tmp)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).at(path)
}

/// Reads and parses a JSON file, naming it in errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("line {}, column {}: {e}", e.line(), e.column())))
}

/// Writes pretty JSON atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::file(path, e.to_string()))?;
    write_file_atomically(path, text.as_bytes())
}

/// HF's name for a dtype in `config.json` (`torch_dtype`): plumb's one spelling,
/// [`crate::device::dtype_name`].
pub fn hf_dtype_name(kind: Kind) -> &'static str {
    crate::device::dtype_name(kind)
}

/// Writes `config.json` (with `torch_dtype` set to `kind`) and `generation_config.json`
/// (the BOS/EOS/PAD ids that are set), as `transformers`' `save_pretrained` does.
pub fn write_model_configs(
    dir: &Path,
    mut config: serde_json::Value,
    kind: Kind,
    token_ids: [(&str, Option<&serde_json::Value>); 3],
) -> Result<()> {
    config["torch_dtype"] = serde_json::json!(hf_dtype_name(kind));
    write_json(&dir.join("config.json"), &config)?;
    let mut generation = serde_json::json!({ "_from_model_config": true });
    for (key, id) in token_ids {
        if let Some(id) = id.filter(|id| !id.is_null()) {
            generation[key] = id.clone();
        }
    }
    write_json(&dir.join("generation_config.json"), &generation)
}

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Shards are cut past this size, as `transformers` does by default (5 GB).
pub const DEFAULT_SHARD_BYTES: usize = 5_000_000_000;

/// The weight files of a checkpoint directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` maps each tensor to. Returns (tensor name -> file),
/// empty for a single file.
fn weight_map(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index = read_json(&index)?;
        return parsed
            .weight_map
            .into_iter()
            .map(|(name, file)| {
                let shard = dir.join(&file);
                if shard.is_file() {
                    Ok((name, shard))
                } else {
                    Err(Error::file(&index, format!("tensor `{name}` is in shard `{file}`, which does not exist")))
                }
            })
            .collect();
    }
    let single = dir.join(SINGLE_FILE);
    if !single.is_file() {
        return Err(Error::file(dir, format!("no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint directory")));
    }
    Ok(BTreeMap::new()) // every tensor is in the single file
}

/// safetensors headers are JSON of at most 100 MB (the format's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// An open safetensors file and its parsed header; tensors are read from it one at a
/// time with positioned reads, so nothing of the file stays in this process's memory
/// (the kernel's page cache is not resident memory of the process; a memory map's
/// touched pages would be).
struct WeightFile {
    path: PathBuf,
    file: fs::File,
    /// Where the tensor data starts: after the header's length and the header.
    data_start: u64,
    header: Metadata,
}

impl WeightFile {
    fn open(path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::file(path, format!("not a valid safetensors file: {message}"));
        let file = fs::File::open(path).at(path)?;
        let file_len = file.metadata().at(path)?.len();
        // The file starts with the header's length (u64, little endian), then the header.
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).map_err(|_| invalid(format!("{file_len} bytes, too short for a header")))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER_BYTES || 8 + len > file_len {
            return Err(invalid(format!("a header of {len} bytes in a file of {file_len}")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact_at(&mut header, 8).at(path)?;
        let header: Metadata = serde_json::from_slice(&header).map_err(|e| invalid(format!("header: {e}")))?;
        let data_start = 8 + len;
        let expected = data_start + header.data_len() as u64;
        if expected != file_len {
            return Err(invalid(format!("the header describes {expected} bytes, the file holds {file_len}")));
        }
        Ok(Self { path: path.to_path_buf(), file, data_start, header })
    }

    fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.header.offset_keys().into_iter()
    }

    /// Every tensor of the file, in its own dtype on the CPU, sorted by name.
    fn read_all(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for name in self.names() {
            let Some(info) = self.header.info(&name) else { continue };
            let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
            let kind = kind_of(info.dtype).ok_or_else(|| {
                Error::file(&self.path, format!("tensor `{name}` has unsupported dtype {:?}", info.dtype))
            })?;
            let mut tensor = Tensor::f_empty(&shape, (kind, tch::Device::Cpu))?;
            self.read_into(&name, &mut tensor)?;
            out.push((name, tensor));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Copies tensor `key` into `var`, converting to the variable's dtype and device. A
    /// contiguous CPU variable of the file's dtype is read into directly; otherwise the
    /// tensor goes through one CPU buffer of its own size.
    fn read_into(&self, key: &str, var: &mut Tensor) -> Result<()> {
        let path = &self.path;
        let info = self.header.info(key).ok_or_else(|| Error::file(path, format!("tensor `{key}` is missing")))?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if shape != var.size() {
            return Err(Error::file(
                path,
                format!("tensor `{key}` has shape {shape:?}, the model expects {:?}", var.size()),
            ));
        }
        let kind = kind_of(info.dtype)
            .ok_or_else(|| Error::file(path, format!("tensor `{key}` has unsupported dtype {:?}", info.dtype)))?;
        let (start, end) = info.data_offsets;
        let offset = self.data_start + start as u64;
        let direct = var.device() == tch::Device::Cpu && var.kind() == kind && var.is_contiguous();
        let _no_grad = tch::no_grad_guard();
        if direct {
            return self.read_bytes(var, offset, end - start, key);
        }
        let mut buffer = Tensor::f_empty(&shape, (kind, tch::Device::Cpu))?;
        self.read_bytes(&mut buffer, offset, end - start, key)?;
        var.f_copy_(&buffer)?;
        Ok(())
    }

    /// Reads `len` bytes at `offset` of the file into the memory of `tensor`, a
    /// contiguous CPU tensor of exactly `len` bytes.
    fn read_bytes(&self, tensor: &mut Tensor, offset: u64, len: usize, key: &str) -> Result<()> {
        let size = tensor.numel() * tensor.kind().elt_size_in_bytes();
        if size != len || tensor.device() != tch::Device::Cpu || !tensor.is_contiguous() {
            return Err(Error::file(&self.path, format!("tensor `{key}`: {len} bytes do not fit the variable")));
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `tensor` is a contiguous CPU tensor of `len` bytes (checked above) that
        // we hold mutably; libtorch does not touch its memory while the bytes are read,
        // and any byte pattern is a valid value of the dtypes read here.
        let bytes = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, len) };
        self.file.read_exact_at(bytes, offset).map_err(|e| Error::file(&self.path, format!("tensor `{key}`: {e}")))
    }
}

/// The tensor names of the checkpoint in `dir`: the keys of
/// `model.safetensors.index.json`'s weight map, or of `model.safetensors`'s header
/// (read without the tensors).
pub fn tensor_names(dir: &Path) -> Result<HashSet<String>> {
    let map = weight_map(dir)?;
    if !map.is_empty() {
        return Ok(map.into_keys().collect());
    }
    Ok(WeightFile::open(&dir.join(SINGLE_FILE))?.names().collect())
}

/// Copies every variable of `vs` from the checkpoint in `dir` (single-file or sharded
/// safetensors), converting to each variable's dtype and device and checking that each
/// tensor exists with the variable's shape. Errors name the file and the tensor.
pub fn load_weights(vs: &mut nn::VarStore, dir: &Path) -> Result<()> {
    load_weights_keyed(vs, dir, |name| name.to_string())
}

/// As [`load_weights`], reading variable `name` from the checkpoint's tensor `key(name)`
/// (for checkpoints that name some tensors otherwise; errors name the key).
///
/// Tensors are read one at a time straight into the variables' memory, so loading
/// needs no memory beyond the model's own (plus one tensor when the dtype or the device
/// differs): create the variables uninitialised, in the dtype and on the device wanted
/// (see [`crate::model::vars::Vars`]).
pub fn load_weights_keyed(vs: &nn::VarStore, dir: &Path, key: impl Fn(&str) -> String) -> Result<()> {
    let map = weight_map(dir)?;
    // Open every file first, so a broken one is reported before any copy.
    let mut paths: Vec<&PathBuf> = map.values().collect();
    paths.sort();
    paths.dedup();
    let single = dir.join(SINGLE_FILE);
    if map.is_empty() {
        paths.push(&single);
    }
    let files = paths.into_iter().map(|p| WeightFile::open(p)).collect::<Result<Vec<_>>>()?;
    let index = dir.join(INDEX_FILE);
    // In name order, so the first problem reported is the same on every run.
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in variables {
        let key = key(&name);
        let file = match map.get(&key) {
            _ if map.is_empty() => &files[0],
            Some(path) => files.iter().find(|f| &f.path == path).unwrap_or(&files[0]),
            None => return Err(Error::file(&index, format!("tensor `{key}` is missing"))),
        };
        file.read_into(&key, &mut var)?;
    }
    Ok(())
}

/// Saves the variables of `vs` into `dir` as `model.safetensors`, or as shards of at
/// most `max_shard_bytes` each with `model.safetensors.index.json` when larger, named
/// as `transformers` names them (`model-00001-of-00003.safetensors`).
pub fn save_weights(vs: &nn::VarStore, dir: &Path, max_shard_bytes: usize) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let total: usize = tensors.iter().map(|(_, t)| bytes(t)).sum();
    if total <= max_shard_bytes {
        return save_safetensors(&dir.join(SINGLE_FILE), &tensors);
    }
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, tensor) in tensors {
        let n = bytes(&tensor);
        if size + n > max_shard_bytes && shards.last().is_some_and(|s| !s.is_empty()) {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        if let Some(last) = shards.last_mut() {
            last.push((name, tensor));
        }
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        save_safetensors(&dir.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_json(&dir.join(INDEX_FILE), &index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_previous_directory_intact() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("final");
        write_dir_atomically(&dest, |dir| {
            fs::write(dir.join("a.txt"), "first").unwrap();
            Ok(())
        })
        .unwrap();
        let failed = write_dir_atomically(&dest, |dir| {
            fs::write(dir.join("a.txt"), "second, half written").unwrap();
            Err(Error::Other("disk full".into()))
        });
        assert_eq!(failed.unwrap_err().to_string(), "disk full");
        assert_eq!(fs::read_to_string(dest.join("a.txt")).unwrap(), "first");
        let leftovers: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("final")], "no staging directory is left behind");
        write_dir_atomically(&dest, |dir| {
            fs::write(dir.join("b.txt"), "second").unwrap();
            Ok(())
        })
        .unwrap();
        assert!(!dest.join("a.txt").exists() && dest.join("b.txt").is_file());
    }

    #[test]
    fn a_truncated_safetensors_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        save_safetensors(&path, &[("w".to_string(), Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu)))]).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        let _w = vs.root().zeros("w", &[4, 4]);
        let message = load_weights(&mut vs, dir.path()).unwrap_err().to_string();
        assert!(message.contains("model.safetensors: not a valid safetensors file"), "{message}");
    }

    fn store(names: &[&str]) -> nn::VarStore {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        for (i, name) in names.iter().enumerate() {
            let _ = vs.root().var_copy(name, &(Tensor::ones([10, 10], (Kind::Float, tch::Device::Cpu)) * i as f64));
        }
        vs
    }

    #[test]
    fn large_checkpoints_are_sharded_with_an_index_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["a", "b", "c", "d", "e"];
        save_weights(&store(&names), dir.path(), 850).unwrap(); // 400 bytes a tensor: two a shard
        let index: serde_json::Value = read_json(&dir.path().join(INDEX_FILE)).unwrap();
        assert_eq!(index["weight_map"]["a"], "model-00001-of-00003.safetensors");
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00003.safetensors");
        assert_eq!(index["weight_map"]["e"], "model-00003-of-00003.safetensors");
        assert_eq!(index["metadata"]["total_size"], 2000);
        assert!(!dir.path().join(SINGLE_FILE).exists());
        let mut loaded = store(&names);
        tch::no_grad(|| {
            for (_, mut t) in loaded.variables() {
                let _ = t.zero_();
            }
        });
        load_weights(&mut loaded, dir.path()).unwrap();
        assert_eq!(loaded.variables()["d"].double_value(&[3, 3]), 3.0);

        // An index naming a missing shard is an error naming the index and the tensor.
        fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
        let message = load_weights(&mut loaded, dir.path()).unwrap_err().to_string();
        assert!(
            message.ends_with("model.safetensors.index.json: tensor `c` is in shard `model-00002-of-00003.safetensors`, which does not exist"),
            "{message}"
        );
    }

    #[test]
    fn weights_convert_to_the_variables_dtype() {
        let dir = tempfile::tempdir().unwrap();
        save_weights(&store(&["w"]), dir.path(), DEFAULT_SHARD_BYTES).unwrap();
        let mut half = store(&["w"]);
        half.set_kind(Kind::BFloat16);
        load_weights(&mut half, dir.path()).unwrap();
        assert_eq!(half.variables()["w"].kind(), Kind::BFloat16);
    }

    #[test]
    fn values_convert_exactly_as_to_kind_does_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let values = Tensor::randn([7, 5], (Kind::Float, tch::Device::Cpu));
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _ = vs.root().var_copy("w", &values);
        save_weights(&vs, dir.path(), DEFAULT_SHARD_BYTES).unwrap();
        // fp32 file, bf16 variable: through a buffer and copy_.
        let mut bf16 = nn::VarStore::new(tch::Device::Cpu);
        bf16.set_kind(Kind::BFloat16);
        let _ = bf16.root().var("w", &[7, 5], nn::Init::Const(0.0));
        load_weights(&mut bf16, dir.path()).unwrap();
        let rounded = values.to_kind(Kind::BFloat16);
        assert_eq!(bf16.variables()["w"].eq_tensor(&rounded).all().int64_value(&[]), 1);
        // bf16 file, bf16 variable: read straight into the variable.
        save_weights(&bf16, dir.path(), DEFAULT_SHARD_BYTES).unwrap();
        let mut direct = nn::VarStore::new(tch::Device::Cpu);
        direct.set_kind(Kind::BFloat16);
        let _ = direct.root().var("w", &[7, 5], nn::Init::Const(0.0));
        load_weights(&mut direct, dir.path()).unwrap();
        assert_eq!(direct.variables()["w"].eq_tensor(&rounded).all().int64_value(&[]), 1);
        // bf16 file, fp32 variable.
        let mut fp32 = nn::VarStore::new(tch::Device::Cpu);
        let _ = fp32.root().var("w", &[7, 5], nn::Init::Const(0.0));
        load_weights(&mut fp32, dir.path()).unwrap();
        assert_eq!(fp32.variables()["w"].eq_tensor(&rounded.to_kind(Kind::Float)).all().int64_value(&[]), 1);
    }

    #[test]
    fn a_tensor_the_index_lacks_names_the_index_and_keys_map_names() {
        let dir = tempfile::tempdir().unwrap();
        save_weights(&store(&["a", "b", "c"]), dir.path(), 450).unwrap();
        let mut loaded = store(&["a", "b", "c", "d"]);
        let message = load_weights(&mut loaded, dir.path()).unwrap_err().to_string();
        assert!(message.ends_with("model.safetensors.index.json: tensor `d` is missing"), "{message}");
        // Variable `old_c` read from the checkpoint's `c`.
        let renamed = store(&["old_c"]);
        load_weights_keyed(&renamed, dir.path(), |name| name.trim_start_matches("old_").to_string()).unwrap();
        assert_eq!(renamed.variables()["old_c"].double_value(&[0, 0]), 2.0);
        let names = tensor_names(dir.path()).unwrap();
        assert_eq!(names, ["a", "b", "c"].iter().map(|s| s.to_string()).collect());
    }

    #[test]
    fn saved_files_are_byte_for_byte_what_the_safetensors_crate_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let cpu = tch::Device::Cpu;
        let tensors = vec![
            ("z.weight".to_string(), Tensor::randn([3, 5], (Kind::Float, cpu))),
            ("a.bias".to_string(), Tensor::randn([7], (Kind::BFloat16, cpu))),
            ("step".to_string(), Tensor::from(7i64)),
            ("m.half".to_string(), Tensor::randn([2, 3, 3], (Kind::Half, cpu))),
            ("flags".to_string(), Tensor::from_slice(&[true, false, true])),
            // Not contiguous: saved as its values.
            ("t".to_string(), Tensor::randn([4, 2], (Kind::Float, cpu)).tr()),
        ];
        save_safetensors(&path, &tensors).unwrap();
        let host: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, t)| {
                let t = t.contiguous();
                let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
                t.copy_data_u8(&mut bytes, t.numel());
                (name.clone(), dtype_of(t.kind()).unwrap(), t.size().iter().map(|&d| d as usize).collect(), bytes)
            })
            .collect();
        let views = host.iter().map(|(name, dtype, shape, bytes)| {
            (name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        });
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let expected = safetensors::serialize(views, metadata).unwrap();
        assert_eq!(fs::read(&path).unwrap(), expected);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("m.safetensors")]);
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

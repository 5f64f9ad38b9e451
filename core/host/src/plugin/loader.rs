//! The host side of the boundary: find a plugin's shared library, check it, load it,
//! and read its declaration.
//!
//! Loading a shared library runs its code. A recipe can pin a plugin's sha256, which is
//! checked before the library is opened.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use plumb_core::plugin::abi::{self, ComponentEntry, PluginDeclaration, RewardEntry, StrRef};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin `{name}` not found; looked in {tried}. Give its `path:` in the recipe, add its directory to PLUMB_PLUGIN_PATH, or build it (`./dev build`)")]
    NotFound { name: String, tried: String },

    #[error("{}: plugin file not found", path.display())]
    MissingFile { path: PathBuf },

    #[error("{}: is a directory, not a plugin file (a shared library such as `libplumb_<name>{}`)", path.display(), std::env::consts::DLL_SUFFIX)]
    NotAFile { path: PathBuf },

    #[error("{}: cannot read plugin file: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },

    #[error("{}: sha256 mismatch: the recipe pins {expected} but the file has {found}; refusing to load it", path.display())]
    Sha256Mismatch { path: PathBuf, expected: String, found: String },

    #[error("{}: cannot load shared library: {message}", path.display())]
    Open { path: PathBuf, message: String },

    #[error("{}: not a plumb plugin: it exports no `{symbols}` symbol (a plugin built with `plumb_core::export_plugin!` exports `plumb_plugin_<its name>`; is `{}` the name in its `export_plugin!`?)", path.display(), names.join("` or `"))]
    NotAPlugin { path: PathBuf, names: Vec<String>, symbols: String },

    #[error("{}: not a plumb plugin: its declaration has magic {found:?}, expected {:?}", path.display(), abi::PLUGIN_MAGIC)]
    BadMagic { path: PathBuf, found: [u8; 8] },

    #[error("{}: plugin ABI version mismatch: this plumb expects ABI version {expected}, the plugin was built for version {found}. Rebuild the plugin against this plumb-core (`cargo build --release` in the plugin's crate, or `./dev build` for plumb's own plugins)", path.display())]
    AbiMismatch { path: PathBuf, expected: u32, found: u32 },

    #[error("{}: malformed plugin declaration: {message}", path.display())]
    Malformed { path: PathBuf, message: String },

    #[error("{}: plugin `{plugin}` declares two {kind}s named `{name}`; each stage, evaluator and reward of a plugin needs a name of its own", path.display())]
    DuplicateComponent { path: PathBuf, plugin: String, kind: &'static str, name: String },
}

/// What `plumb plugins` shows of a stage, evaluator or reward.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentInfo {
    pub name: String,
    pub description: String,
}

/// A loaded, checked plugin. Its library stays loaded for the life of the process:
/// unloading libtorch users crashes at exit (pytorch#46171).
pub struct Plugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    pub core_version: String,
    pub stages: Vec<ComponentInfo>,
    pub evaluators: Vec<ComponentInfo>,
    pub rewards: Vec<ComponentInfo>,
    declaration: &'static PluginDeclaration,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("path", &self.path).finish_non_exhaustive()
    }
}

/// File names tried for a plugin called `name`, in order.
pub fn library_names(name: &str) -> Vec<String> {
    let stem = name.replace('-', "_");
    let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    vec![format!("{prefix}plumb_{stem}{suffix}"), format!("{prefix}{stem}{suffix}")]
}

/// Directories searched for plugins, in order: each of `PLUMB_PLUGIN_PATH`, then the
/// directory of the running executable.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PLUMB_PLUGIN_PATH")
        .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    if let Some(dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        dirs.push(dir);
    }
    dirs
}

/// Finds plugin `name`: the explicit path if given, else in each directory of
/// `PLUMB_PLUGIN_PATH`, then the directory of the running executable, the first library
/// there that [`plumb plugins`](libraries_in) would list as `name`: one whose file name
/// suggests that name ([`names_from_file`]; `libplumb_<name>.so` and `lib<name>.so`
/// first). So a plugin is found by the name `plumb plugins` shows, whatever its file is
/// called (`libcustom_plugin.so` declaring `custom`).
pub fn locate(name: &str, explicit: Option<&Path>) -> Result<PathBuf, LoadError> {
    if let Some(path) = explicit {
        return check_file(path).map(|_| path.to_path_buf());
    }
    let dirs = search_dirs();
    for dir in &dirs {
        let conventional = library_names(name).into_iter().map(|file| dir.join(file));
        let others = libraries_in(dir).into_iter().filter(|path| names_from_file(path).iter().any(|n| n == name));
        if let Some(found) = conventional.filter(|p| p.is_file()).chain(others).next() {
            return Ok(found);
        }
    }
    let mut found = Vec::new();
    for dir in &dirs {
        for path in libraries_in(dir) {
            if let Ok(plugin) = load_by_file_name(&path) {
                found.push(format!("`{}` ({})", plugin.name, path.display()));
            }
        }
    }
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let found = if found.is_empty() { "no plugins".to_owned() } else { format!("only {}", found.join(", ")) };
    Err(LoadError::NotFound { name: name.into(), tried: format!("{}; found {found}", dirs.join(", ")) })
}

/// The shared libraries in `dir` that may be plugins, in the order plugins are looked up
/// and listed: plain names before cargo's hashed copies (`libx-0123abcd.so`), then by name.
pub fn libraries_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            p.is_file()
                && name.starts_with(std::env::consts::DLL_PREFIX)
                && name.ends_with(std::env::consts::DLL_SUFFIX)
        })
        .collect();
    files.sort_by_key(|p| {
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        (stem.contains('-'), stem)
    });
    files
}

/// An error unless `path` is a file: missing, a directory, or unreadable, each said so.
fn check_file(path: &Path) -> Result<(), LoadError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(LoadError::NotAFile { path: path.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LoadError::MissingFile { path: path.into() }),
        Err(source) => Err(LoadError::Read { path: path.into(), source }),
    }
}

/// Hex sha256 of a file.
pub fn sha256_of(path: &Path) -> Result<String, LoadError> {
    let file = std::fs::File::open(path).map_err(|source| LoadError::Read { path: path.into(), source })?;
    sha256_of_open(path, &file)
}

/// Hex sha256 of the file open as `file` (named `path` in errors), read through that
/// descriptor from its start.
fn sha256_of_open(path: &Path, mut file: &std::fs::File) -> Result<String, LoadError> {
    use std::io::{Read, Seek, SeekFrom};
    let read = |source| LoadError::Read { path: path.into(), source };
    file.seek(SeekFrom::Start(0)).map_err(read)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks `path` against the pin, loads it and reads and checks the declaration of the
/// plugin called `name` (its symbol `plumb_plugin_<name>`).
pub fn load(path: &Path, name: &str, sha256: Option<&str>) -> Result<Plugin, LoadError> {
    let library = open(path, sha256)?;
    read(path, library, &[name.to_owned()])
}

/// Loads the plugin in `path` under the name its file gives (`libplumb_<name>.so` or
/// `lib<name>.so`, or a leading part of that name up to a `_`): what `plumb plugins`
/// lists, where no recipe names the plugin.
pub fn load_by_file_name(path: &Path) -> Result<Plugin, LoadError> {
    let library = open(path, None)?;
    read(path, library, &names_from_file(path))
}

/// The plugin names a library's file name suggests, most specific first:
/// `libplumb_my_tool.so` → `my_tool`, `my`, `plumb_my_tool`, `plumb_my`, `plumb`.
/// A cargo copy's hash (`libx-0123abcd.so`) is dropped.
pub fn names_from_file(path: &Path) -> Vec<String> {
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = file.strip_prefix(std::env::consts::DLL_PREFIX).unwrap_or(&file);
    let stem = stem.strip_suffix(std::env::consts::DLL_SUFFIX).unwrap_or(stem);
    let stem = stem.split('-').next().unwrap_or(stem);
    let mut names = Vec::new();
    for full in [stem.strip_prefix("plumb_"), Some(stem)].into_iter().flatten() {
        // Every leading part up to an `_`, longest first.
        let mut ends: Vec<usize> = full.match_indices('_').map(|(i, _)| i).collect();
        ends.push(full.len());
        for end in ends.into_iter().rev() {
            let name = full[..end].to_owned();
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// Checks the pin and opens the library, which stays loaded for the life of the process.
///
/// The file is opened once; the pin is checked on what that descriptor reads, and the
/// library is loaded through the same descriptor (`/proc/self/fd/N` on Linux), so a file
/// swapped in under the path between the check and the load is never what runs.
fn open(path: &Path, sha256: Option<&str>) -> Result<&'static libloading::Library, LoadError> {
    check_file(path)?;
    let file = std::fs::File::open(path).map_err(|source| LoadError::Read { path: path.into(), source })?;
    if let Some(expected) = sha256 {
        let found = sha256_of_open(path, &file)?;
        if !found.eq_ignore_ascii_case(expected) {
            return Err(LoadError::Sha256Mismatch { path: path.into(), expected: expected.into(), found });
        }
    }
    let load_path = descriptor_path(path, &file);
    // SAFETY: loading a library runs its initialisers; that is what loading a plugin
    // means, and the user chose this file (optionally pinned by hash).
    let library = unsafe { libloading::Library::new(&load_path) }.map_err(|e| {
        // dlerror's own reason (libloading keeps it as the error's source), with the
        // descriptor's path put back to the file's.
        let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), |why| why.to_string());
        let message = reason.replace(&load_path.display().to_string(), &path.display().to_string());
        LoadError::Open { path: path.into(), message }
    })?;
    // The descriptor stays open, like the library, for the life of the process: a closed
    // descriptor's number is handed out again, and the dynamic loader would take a later
    // `/proc/self/fd/N` for the library already loaded under that name.
    let _kept_open = std::os::fd::IntoRawFd::into_raw_fd(file);
    // Never unloaded: see `Plugin`.
    Ok(Box::leak(Box::new(library)))
}

/// The path that opens the very file `file` is: its descriptor's, where the platform has
/// one (`/proc/self/fd/N`), else `path` itself.
fn descriptor_path(path: &Path, file: &std::fs::File) -> PathBuf {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let by_descriptor = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if by_descriptor.exists() {
            return by_descriptor;
        }
    }
    let _ = file;
    path.to_path_buf()
}

type DeclareFn = extern "C" fn() -> *const PluginDeclaration;

/// The declaration function of the first of `names` the library exports.
fn declaration_fn(library: &'static libloading::Library, names: &[String]) -> Option<DeclareFn> {
    names.iter().find_map(|name| {
        // SAFETY: the symbol's type is fixed by the ABI; a library that exports this name
        // with another type is not a plumb plugin, which the magic check catches in practice.
        unsafe { library.get::<DeclareFn>(abi::declaration_symbol(name).as_bytes()) }.ok().map(|f| *f)
    })
}

/// Reads and checks the declaration of the first of `names` that `library` exports.
fn read(path: &Path, library: &'static libloading::Library, names: &[String]) -> Result<Plugin, LoadError> {
    let declare = match declaration_fn(library, names) {
        Some(declare) => declare,
        None => {
            // A plugin built before ABI 4 exports one fixed symbol: say it needs a rebuild.
            // SAFETY: as in `declaration_fn`.
            let legacy = unsafe { library.get::<DeclareFn>(abi::LEGACY_DECLARATION_SYMBOL.as_bytes()) };
            match legacy {
                Ok(declare) => *declare,
                Err(_) => {
                    let symbols: Vec<String> = names.iter().map(|n| abi::declaration_symbol(n)).collect();
                    return Err(LoadError::NotAPlugin {
                        path: path.into(),
                        names: names.to_vec(),
                        symbols: symbols.join("` or `"),
                    });
                }
            }
        }
    };
    let pointer = declare();
    if pointer.is_null() {
        return Err(LoadError::Malformed { path: path.into(), message: "the declaration is null".into() });
    }
    // Read only the two fixed header fields before trusting the rest of the layout.
    // SAFETY: every declaration starts with `magic` and `abi_version` at these offsets.
    let (magic, abi_version) = unsafe { (std::ptr::read_unaligned(pointer as *const [u8; 8]), (*pointer).abi_version) };
    if magic != abi::PLUGIN_MAGIC {
        return Err(LoadError::BadMagic { path: path.into(), found: magic });
    }
    if abi_version != abi::ABI_VERSION {
        return Err(LoadError::AbiMismatch { path: path.into(), expected: abi::ABI_VERSION, found: abi_version });
    }
    // SAFETY: magic and version match, so the layout is ours; it lives as long as the
    // library, which is never unloaded.
    let declaration: &'static PluginDeclaration = unsafe { &*pointer };
    let text = |s: StrRef, what: &str| -> Result<String, LoadError> {
        // SAFETY: strings in a declaration are 'static in the plugin.
        String::from_utf8(unsafe { s.as_bytes() }.to_vec())
            .map_err(|_| LoadError::Malformed { path: path.into(), message: format!("{what} is not UTF-8") })
    };
    let components = |entries: &[ComponentEntry], what: &str| -> Result<Vec<ComponentInfo>, LoadError> {
        entries
            .iter()
            .map(|e| Ok(ComponentInfo { name: text(e.name, what)?, description: text(e.description, what)? }))
            .collect()
    };
    let rewards: Vec<ComponentInfo> = reward_entries(declaration)
        .iter()
        .map(|e| {
            Ok(ComponentInfo {
                name: text(e.name, "a reward name")?,
                description: text(e.description, "a reward description")?,
            })
        })
        .collect::<Result<_, LoadError>>()?;
    let plugin = Plugin {
        path: path.into(),
        name: text(declaration.name, "the plugin name")?,
        version: text(declaration.version, "the plugin version")?,
        description: text(declaration.description, "the description")?,
        core_version: text(declaration.core_version, "the plumb-core version")?,
        stages: components(stage_entries(declaration), "a stage name")?,
        evaluators: components(evaluator_entries(declaration), "an evaluator name")?,
        rewards,
        declaration,
    };
    for (kind, list) in [("stage", &plugin.stages), ("evaluator", &plugin.evaluators), ("reward", &plugin.rewards)] {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = list.iter().find(|c| !seen.insert(c.name.as_str())) {
            return Err(LoadError::DuplicateComponent {
                path: path.into(),
                plugin: plugin.name.clone(),
                kind,
                name: twice.name.clone(),
            });
        }
    }
    Ok(plugin)
}

fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: a checked declaration points at `len` entries that live as long as the library.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

fn stage_entries(d: &'static PluginDeclaration) -> &'static [ComponentEntry] {
    slice(d.stages, d.stage_count)
}
fn evaluator_entries(d: &'static PluginDeclaration) -> &'static [ComponentEntry] {
    slice(d.evaluators, d.evaluator_count)
}
fn reward_entries(d: &'static PluginDeclaration) -> &'static [RewardEntry] {
    slice(d.rewards, d.reward_count)
}

impl Plugin {
    pub(crate) fn stage_entry(&self, name: &str) -> Option<&'static ComponentEntry> {
        stage_entries(self.declaration).iter().zip(&self.stages).find(|(_, info)| info.name == name).map(|(e, _)| e)
    }
    pub(crate) fn evaluator_entry(&self, name: &str) -> Option<&'static ComponentEntry> {
        evaluator_entries(self.declaration)
            .iter()
            .zip(&self.evaluators)
            .find(|(_, info)| info.name == name)
            .map(|(e, _)| e)
    }
    pub(crate) fn reward_entry(&self, name: &str) -> Option<&'static RewardEntry> {
        reward_entries(self.declaration).iter().zip(&self.rewards).find(|(_, info)| info.name == name).map(|(e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_file_name_most_specific_first() {
        let names = |file: &str| names_from_file(Path::new(file));
        assert_eq!(names("target/libplumb_pretrain.so"), ["pretrain", "plumb_pretrain", "plumb"]);
        assert_eq!(names("libcustom_plugin.so"), ["custom_plugin", "custom"]);
        assert_eq!(names("deps/libplumb_sft-0123abcd.so"), ["sft", "plumb_sft", "plumb"]);
        assert_eq!(names("libplumb_my_tool.so"), ["my_tool", "my", "plumb_my_tool", "plumb_my", "plumb"]);
    }
}

//! The C boundary between the host (`plumb`) and a plugin (a `cdylib`).
//!
//! Rust has no stable ABI, so only C crosses: UTF-8 strings and bytes as (pointer,
//! length), plain numbers, opaque handles and `extern "C"` function pointers.
//! Configuration crosses as YAML text, requests and reports as JSON, models as
//! checkpoint directories. Bytes that one side hands to the other are copied out
//! during the call through a [`ByteSink`] that the receiver owns, so no allocation
//! ever changes hands.
//!
//! Layout rule: [`PluginDeclaration`] starts with `magic` and `abi_version`, and those
//! two fields never move. The host reads them before anything else and refuses a
//! mismatch; any other change to a type in this file bumps [`ABI_VERSION`].
use std::ffi::c_void;

/// First eight bytes of every plugin declaration.
pub const PLUGIN_MAGIC: [u8; 8] = *b"PLUMBPLG";
/// Version of the layout of every type in this file, of the JSON requests that cross it,
/// and of how a plugin is found in its library. 4: the declaration symbol is named after
/// the plugin ([`declaration_symbol`]). 5: a reward's `create` takes a
/// [`crate::plugin::CreateRequest`] (its name, the run's device, seed and directory);
/// validate and run requests carry the recipe's reward names; pairs carry an optional
/// reference answer; [`HostApi::score`] may be called from several threads at once.
/// 6: every stage, evaluator and reward describes its configuration section
/// ([`ComponentEntry::schema`], [`RewardEntry::schema`]).
pub const ABI_VERSION: u32 = 6;
/// What a plugin's declaration symbol is named: this, then the plugin's name.
pub const DECLARATION_SYMBOL_PREFIX: &str = "plumb_plugin_";
/// The one symbol plugins built for ABI versions up to 3 exported; the host looks for it
/// only to tell such a plugin's author to rebuild it.
pub const LEGACY_DECLARATION_SYMBOL: &str = "plumb_plugin_declaration";

/// The symbol plugin `name` exports, `extern "C" fn() -> *const PluginDeclaration`:
/// `plumb_plugin_<name>`. One symbol per plugin, so a plugin crate can link another as a
/// library (its rlib) and both declarations live side by side in one shared library.
pub fn declaration_symbol(name: &str) -> String {
    format!("{DECLARATION_SYMBOL_PREFIX}{name}")
}

/// Whether `name` can name a plugin: non-empty, ASCII letters, digits and `_` (it is part
/// of a C symbol). `export_plugin!` checks this at compile time.
pub const fn is_valid_plugin_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !(b.is_ascii_alphanumeric() || b == b'_') {
            return false;
        }
        i += 1;
    }
    true
}

/// A borrowed UTF-8 string or byte slice, valid for the duration of the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StrRef {
    pub ptr: *const u8,
    pub len: usize,
}

impl StrRef {
    pub fn new(s: &str) -> Self {
        Self { ptr: s.as_ptr(), len: s.len() }
    }

    pub const fn from_static(s: &'static str) -> Self {
        Self { ptr: s.as_ptr(), len: s.len() }
    }

    /// # Safety
    /// `ptr` must point at `len` readable bytes that live as long as `'a`.
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The text, with invalid UTF-8 replaced (a message is still worth showing).
    ///
    /// # Safety
    /// As for [`StrRef::as_bytes`].
    pub unsafe fn to_string_lossy(self) -> String {
        // SAFETY: forwarded to the caller.
        String::from_utf8_lossy(unsafe { self.as_bytes() }).into_owned()
    }
}

/// Where the callee writes bytes for the caller: `write` may be called several times;
/// the caller concatenates.
#[repr(C)]
pub struct ByteSink {
    pub state: *mut c_void,
    pub write: extern "C" fn(state: *mut c_void, bytes: StrRef),
}

/// Outcome of a call across the boundary. Anything but `Ok` leaves a message (or a JSON
/// `SectionError` for `InvalidConfig`) in the call's sink.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// The configuration section is invalid; the sink holds a JSON `SectionError`.
    InvalidConfig = 1,
    /// The call failed; the sink holds the error message.
    Failed = 2,
    /// The plugin panicked; the sink holds the panic message.
    Panicked = 3,
    /// The user asked the run to stop and the stage stopped cleanly (after saving).
    Cancelled = 4,
}

impl Status {
    pub fn from_raw(raw: i32) -> Option<Self> {
        [Self::Ok, Self::InvalidConfig, Self::Failed, Self::Panicked, Self::Cancelled]
            .into_iter()
            .find(|s| *s as i32 == raw)
    }
}

/// Checks a configuration section without doing any work.
/// `request` is JSON: [`crate::plugin::ValidateRequest`].
pub type ValidateFn = extern "C" fn(request: StrRef, out: ByteSink) -> i32;
/// Runs a stage or an evaluator. `request` is JSON: [`crate::plugin::RunRequest`];
/// on success the sink holds a JSON [`crate::plugin::StageOutput`].
pub type RunFn = extern "C" fn(host: *const HostApi, request: StrRef, out: ByteSink) -> i32;
/// Describes the configuration section: on success the sink holds its JSON Schema
/// (draft 2020-12, as `schemars` writes it: each key's doc comment as its `description`,
/// its serde default as its `default`). What `plumb explain` shows and `plumb validate`
/// fills in.
pub type SchemaFn = extern "C" fn(out: ByteSink) -> i32;

/// A stage or evaluator a plugin provides.
#[repr(C)]
pub struct ComponentEntry {
    pub name: StrRef,
    pub description: StrRef,
    pub validate: ValidateFn,
    pub run: RunFn,
    pub schema: SchemaFn,
}

/// A text-level reward a plugin provides: created once from its config, then asked to
/// score batches of (prompt, response) pairs.
#[repr(C)]
pub struct RewardEntry {
    pub name: StrRef,
    pub description: StrRef,
    pub validate: ValidateFn,
    /// `request` is JSON: [`crate::plugin::CreateRequest`]. Returns an opaque handle, or
    /// null with the error in `out`.
    pub create: extern "C" fn(request: StrRef, out: ByteSink) -> *mut c_void,
    /// `request` is a JSON list of `ScorePair`; on success `out` holds a JSON list of numbers.
    /// Called for one handle at a time, but not always from the thread that created it.
    pub score: extern "C" fn(handle: *mut c_void, request: StrRef, out: ByteSink) -> i32,
    pub destroy: extern "C" fn(handle: *mut c_void),
    pub schema: SchemaFn,
}

/// What a plugin's [`declaration_symbol`] returns. Lives for the life of the process.
#[repr(C)]
pub struct PluginDeclaration {
    pub magic: [u8; 8],
    pub abi_version: u32,
    pub core_version: StrRef,
    pub name: StrRef,
    pub version: StrRef,
    pub description: StrRef,
    pub stages: *const ComponentEntry,
    pub stage_count: usize,
    pub evaluators: *const ComponentEntry,
    pub evaluator_count: usize,
    pub rewards: *const RewardEntry,
    pub reward_count: usize,
}

// SAFETY: a declaration is immutable after construction and points only at data that
// lives as long as the library (statics or leaked boxes).
unsafe impl Sync for PluginDeclaration {}
unsafe impl Send for PluginDeclaration {}

/// One progress report from a running stage.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProgressUpdate {
    /// Steps done so far.
    pub position: u64,
    /// Steps in all; 0 when unknown.
    pub total: u64,
    /// Latest training loss; NaN when none.
    pub loss: f64,
    /// Throughput; NaN when none.
    pub tokens_per_second: f64,
    /// Tokens trained on so far; NaN when not counted.
    pub tokens_seen: f64,
}

/// Log levels of [`HostApi::log`].
pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;
pub const LOG_DEBUG: u32 = 4;

/// Services the host offers a running plugin; core wraps it into `RunContext`.
/// `state` is the host's and is passed back on every call.
#[repr(C)]
pub struct HostApi {
    pub abi_version: u32,
    pub state: *mut c_void,
    pub log_scalar: extern "C" fn(state: *mut c_void, tag: StrRef, step: i64, value: f64),
    pub log_text: extern "C" fn(state: *mut c_void, tag: StrRef, step: i64, text: StrRef),
    /// `json`: `{"hparams": {name: value}, "metrics": [tag]}`.
    pub log_hparams: extern "C" fn(state: *mut c_void, json: StrRef),
    pub progress: extern "C" fn(state: *mut c_void, update: *const ProgressUpdate),
    pub log: extern "C" fn(state: *mut c_void, level: u32, message: StrRef),
    /// Non-zero once the user asked the run to stop (SIGINT).
    pub should_stop: extern "C" fn(state: *mut c_void) -> u8,
    /// Scores a JSON list of `ScorePair` with the reward named `reward` in the recipe;
    /// on success `out` holds a JSON list of numbers. Safe to call from any thread during
    /// a run call, and from several at once: the host serialises the calls to one reward
    /// but scores different rewards concurrently.
    pub score: extern "C" fn(state: *mut c_void, reward: StrRef, request: StrRef, out: ByteSink) -> i32,
    /// The stage resumes at `step`: TensorBoard drops this stage's earlier events from
    /// `step` on (they are written again).
    pub restart_at: extern "C" fn(state: *mut c_void, step: i64),
}

/// A sink that appends to a `Vec<u8>`; the common receiver on both sides.
pub extern "C" fn write_to_vec(state: *mut c_void, bytes: StrRef) {
    if state.is_null() {
        return;
    }
    // SAFETY: `vec_sink` hands out a pointer to a live `Vec<u8>` for the duration of one
    // call, and `bytes` is valid for that call.
    unsafe { (*(state as *mut Vec<u8>)).extend_from_slice(bytes.as_bytes()) };
}

/// A [`ByteSink`] writing into `buf`, valid while `buf` is borrowed.
pub fn vec_sink(buf: &mut Vec<u8>) -> ByteSink {
    ByteSink { state: buf as *mut Vec<u8> as *mut c_void, write: write_to_vec }
}

impl ByteSink {
    /// Writes `bytes` to the receiver.
    pub fn send(&self, bytes: &[u8]) {
        (self.write)(self.state, StrRef { ptr: bytes.as_ptr(), len: bytes.len() });
    }
}

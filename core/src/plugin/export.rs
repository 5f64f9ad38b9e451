//! The plugin side of the boundary: `export_plugin!` and the `extern "C"` shims it
//! points at. Every shim catches panics inside the plugin and turns them, like every
//! error, into a status and a message; nothing unwinds into the host.
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::abi::{self, ByteSink, ComponentEntry, HostApi, PluginDeclaration, RewardEntry, Status, StrRef};
use super::contract::{CreateRequest, Evaluator, Reward, RewardContext, Stage, StageOutput, ValidateContext};
use crate::context::{RunContext, RunRequest};
use crate::error::Error;
use crate::recipe::{parse_section, SectionError};
use crate::reward::ScorePair;

/// What the host sends to check a section (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidateRequest {
    pub config_yaml: String,
    /// The names of the recipe's `rewards:`, so a stage can check the ones it names
    /// ([`ValidateContext::require_reward`]).
    #[serde(default)]
    pub rewards: Vec<String>,
    /// Whether the stage will have an input model (its own `model:` or an earlier
    /// stage's), so one that needs it can say so before any compute
    /// ([`ValidateContext::require_input_model`]).
    #[serde(default = "assumed")]
    pub has_input_model: bool,
    /// The run's output directory (`run.output_dir`), where files that earlier stages
    /// make will be ([`ValidateContext::run_dir`]); None from a host that does not say.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
}

/// A host that does not say is assumed to give the stage a model.
fn assumed() -> bool {
    true
}

/// The declaration a plugin exports, with the tables it points into.
pub struct Declaration {
    c: PluginDeclaration,
    _stages: Vec<ComponentEntry>,
    _evaluators: Vec<ComponentEntry>,
    _rewards: Vec<RewardEntry>,
}

// SAFETY: immutable after construction; it points only at 'static strings and at the
// vectors it owns, whose buffers never move.
unsafe impl Sync for Declaration {}
unsafe impl Send for Declaration {}

impl Declaration {
    pub fn new(
        name: &'static str,
        version: &'static str,
        description: &'static str,
        stages: Vec<ComponentEntry>,
        evaluators: Vec<ComponentEntry>,
        rewards: Vec<RewardEntry>,
    ) -> Self {
        let c = PluginDeclaration {
            magic: abi::PLUGIN_MAGIC,
            abi_version: abi::ABI_VERSION,
            core_version: StrRef::from_static(env!("CARGO_PKG_VERSION")),
            name: StrRef::from_static(name),
            version: StrRef::from_static(version),
            description: StrRef::from_static(description),
            stages: stages.as_ptr(),
            stage_count: stages.len(),
            evaluators: evaluators.as_ptr(),
            evaluator_count: evaluators.len(),
            rewards: rewards.as_ptr(),
            reward_count: rewards.len(),
        };
        Self { c, _stages: stages, _evaluators: evaluators, _rewards: rewards }
    }

    pub fn as_ptr(&self) -> *const PluginDeclaration {
        &self.c
    }
}

/// Exports a plugin: one C symbol, `plumb_plugin_<name>`, returning its declaration.
///
/// `name` is a string literal of ASCII letters, digits and `_` (checked at compile time);
/// it is the name recipes give the plugin and the part before the dot in `uses`. Because
/// the symbol is named after the plugin, one plugin crate can depend on another as a
/// library (its `rlib`) and both load in one run.
///
/// ```ignore
/// plumb_core::export_plugin! {
///     name: "pretrain",
///     version: env!("CARGO_PKG_VERSION"),
///     description: "Pretraining objectives",
///     stages: [CausalLm],
///     evaluators: [Perplexity],
///     rewards: [],
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:literal,
        version: $version:expr,
        description: $description:expr,
        stages: [$($stage:ty),* $(,)?],
        evaluators: [$($evaluator:ty),* $(,)?],
        rewards: [$($reward:ty),* $(,)?] $(,)?
    ) => {
        const _: () = ::std::assert!(
            $crate::plugin::abi::is_valid_plugin_name($name),
            ::std::concat!("export_plugin!: the plugin name `", $name, "` must be ASCII letters, digits and `_`")
        );

        /// The plugin's declaration, read by the plumb host as `plumb_plugin_<name>`.
        #[export_name = ::std::concat!("plumb_plugin_", $name)]
        pub extern "C" fn plumb_plugin_declaration() -> *const $crate::plugin::abi::PluginDeclaration {
            static DECLARATION: ::std::sync::OnceLock<$crate::plugin::export::Declaration> =
                ::std::sync::OnceLock::new();
            DECLARATION
                .get_or_init(|| {
                    $crate::plugin::export::Declaration::new(
                        $name,
                        $version,
                        $description,
                        vec![$($crate::plugin::export::stage_entry::<$stage>()),*],
                        vec![$($crate::plugin::export::evaluator_entry::<$evaluator>()),*],
                        vec![$($crate::plugin::export::reward_entry::<$reward>()),*],
                    )
                })
                .as_ptr()
        }
    };
}

pub fn stage_entry<S: Stage>() -> ComponentEntry {
    ComponentEntry {
        name: StrRef::from_static(S::NAME),
        description: StrRef::from_static(S::DESCRIPTION),
        validate: validate_stage::<S>,
        run: run_stage::<S>,
        schema: config_schema::<S::Config>,
    }
}

pub fn evaluator_entry<E: Evaluator>() -> ComponentEntry {
    ComponentEntry {
        name: StrRef::from_static(E::NAME),
        description: StrRef::from_static(E::DESCRIPTION),
        validate: validate_evaluator::<E>,
        run: run_evaluator::<E>,
        schema: config_schema::<E::Config>,
    }
}

pub fn reward_entry<R: Reward>() -> RewardEntry {
    RewardEntry {
        name: StrRef::from_static(R::NAME),
        description: StrRef::from_static(R::DESCRIPTION),
        validate: validate_reward::<R>,
        create: create_reward::<R>,
        score: score_reward::<R>,
        destroy: destroy_reward::<R>,
        schema: config_schema::<R::Config>,
    }
}

/// A failed call: its status and what goes into the sink.
struct Failure(Status, String);

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        match error {
            Error::Config(section) => Failure(Status::InvalidConfig, section_json(&section)),
            Error::Cancelled => Failure(Status::Cancelled, "stopped on request".into()),
            other => Failure(Status::Failed, other.to_string()),
        }
    }
}

impl From<SectionError> for Failure {
    fn from(error: SectionError) -> Self {
        Failure(Status::InvalidConfig, section_json(&error))
    }
}

fn section_json(error: &SectionError) -> String {
    serde_json::to_string(error).unwrap_or_else(|_| error.message.clone())
}

thread_local! {
    /// Where the last panic on this thread happened, recorded by our panic hook.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether this thread is inside [`guarded`], whose caller reports its panics.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `body`, turning errors and panics into a status and a message in `out`.
fn guarded(out: &ByteSink, body: impl FnOnce() -> Result<Vec<u8>, Failure>) -> i32 {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // This plugin's copy of std has its own hook. Inside `guarded` it records where,
        // and the host reports; any other panic (a thread the plugin spawned, or, where
        // this runs in the host's process, the host's own) goes to the hook it replaced.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let at = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
                PANIC_LOCATION.with(|p| *p.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(body));
    GUARDED.with(|g| g.set(outer));
    match result {
        Ok(Ok(bytes)) => {
            out.send(&bytes);
            Status::Ok as i32
        }
        Ok(Err(Failure(status, message))) => {
            out.send(message.as_bytes());
            status as i32
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text panic payload".into());
            // The host prefixes "panicked": the message is "at <file:line:col>: <what>".
            let at = PANIC_LOCATION.with(|p| p.borrow_mut().take()).map(|l| format!("at {l}: ")).unwrap_or_default();
            out.send(format!("{at}{}", crate::error::without_backtrace(&what)).as_bytes());
            Status::Panicked as i32
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(request: StrRef) -> Result<T, Failure> {
    // SAFETY: the host passes a valid (pointer, length) for the duration of the call.
    let bytes = unsafe { request.as_bytes() };
    serde_json::from_slice(bytes).map_err(|e| Failure(Status::Failed, format!("malformed request from the host: {e}")))
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(value).map_err(|e| Failure(Status::Failed, format!("could not encode the result: {e}")))
}

/// Parses the section and runs the component's own checks.
fn checked<C: serde::de::DeserializeOwned>(
    yaml: &str,
    rewards: &[String],
    has_input_model: bool,
    run_dir: Option<&Path>,
    validate: impl FnOnce(&C, &ValidateContext) -> crate::Result<()>,
) -> Result<C, Failure> {
    let config: C = parse_section(yaml)?;
    let mut ctx = ValidateContext::new(rewards.to_vec()).with_input_model(has_input_model);
    if let Some(dir) = run_dir {
        ctx = ctx.with_run_dir(dir.to_path_buf());
    }
    validate(&config, &ctx)?;
    Ok(config)
}

/// [`checked`] with what a validate request says (the host asks a reward's with
/// `has_input_model` true, as a request without the field is taken to say).
fn checked_request<C: serde::de::DeserializeOwned>(
    request: StrRef,
    validate: impl FnOnce(&C, &ValidateContext) -> crate::Result<()>,
) -> Result<Vec<u8>, Failure> {
    let request: ValidateRequest = read_json(request)?;
    let run_dir = request.run_dir.as_deref();
    checked::<C>(&request.config_yaml, &request.rewards, request.has_input_model, run_dir, validate)?;
    Ok(Vec::new())
}

/// The JSON Schema of a configuration section, from its `JsonSchema` derive.
extern "C" fn config_schema<C: schemars::JsonSchema>(out: ByteSink) -> i32 {
    guarded(&out, || to_json(&schemars::schema_for!(C)))
}

extern "C" fn validate_stage<S: Stage>(request: StrRef, out: ByteSink) -> i32 {
    guarded(&out, || checked_request::<S::Config>(request, S::validate))
}

extern "C" fn validate_evaluator<E: Evaluator>(request: StrRef, out: ByteSink) -> i32 {
    guarded(&out, || checked_request::<E::Config>(request, E::validate))
}

extern "C" fn validate_reward<R: Reward>(request: StrRef, out: ByteSink) -> i32 {
    guarded(&out, || checked_request::<R::Config>(request, R::validate))
}

/// Parses the request, builds the `RunContext` and runs `body` with the plugin's
/// `tracing` events forwarded to the host.
fn with_context<C: serde::de::DeserializeOwned>(
    host: *const HostApi,
    request: StrRef,
    validate: impl FnOnce(&C, &ValidateContext) -> crate::Result<()>,
    body: impl FnOnce(C, &mut RunContext) -> crate::Result<Vec<u8>>,
) -> Result<Vec<u8>, Failure> {
    let request: RunRequest = read_json(request)?;
    // SAFETY: the host's table outlives this call.
    let host = unsafe { host.as_ref() }.ok_or_else(|| Failure(Status::Failed, "null host table".into()))?;
    if host.abi_version != abi::ABI_VERSION {
        return Err(Failure(
            Status::Failed,
            format!("host ABI version {} differs from the plugin's {}", host.abi_version, abi::ABI_VERSION),
        ));
    }
    let config = checked::<C>(
        &request.config_yaml,
        &request.rewards,
        request.input_model.is_some(),
        Some(&request.run_dir),
        validate,
    )?;
    // SAFETY: as above.
    let mut ctx = unsafe { RunContext::new(host, request) }?;
    let subscriber = tracing_subscriber::fmt()
        .with_writer(HostLog(host))
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    Ok(tracing::subscriber::with_default(subscriber, || body(config, &mut ctx))?)
}

extern "C" fn run_stage<S: Stage>(host: *const HostApi, request: StrRef, out: ByteSink) -> i32 {
    guarded(&out, || {
        with_context::<S::Config>(host, request, S::validate, |config, ctx| {
            let output: StageOutput = S::run(config, ctx)?;
            serde_json::to_vec(&output).map_err(|e| Error::Other(e.to_string()))
        })
    })
}

extern "C" fn run_evaluator<E: Evaluator>(host: *const HostApi, request: StrRef, out: ByteSink) -> i32 {
    guarded(&out, || {
        with_context::<E::Config>(host, request, E::validate, |config, ctx| {
            let output = StageOutput { model: None, metrics: E::evaluate(config, ctx)? };
            serde_json::to_vec(&output).map_err(|e| Error::Other(e.to_string()))
        })
    })
}

extern "C" fn create_reward<R: Reward>(request: StrRef, out: ByteSink) -> *mut c_void {
    let mut handle: *mut c_void = std::ptr::null_mut();
    guarded(&out, || {
        let request: CreateRequest = read_json(request)?;
        let config =
            checked::<R::Config>(&request.config_yaml, &request.rewards, true, Some(&request.run_dir), R::validate)?;
        let device = crate::context::parse_device(&request.device)?;
        let ctx = RewardContext::new(request.name, device, request.seed, request.run_dir);
        handle = Box::into_raw(Box::new(R::new(config, &ctx)?)) as *mut c_void;
        Ok(Vec::new())
    });
    handle
}

extern "C" fn score_reward<R: Reward>(handle: *mut c_void, request: StrRef, out: ByteSink) -> i32 {
    guarded(&out, || {
        // SAFETY: `handle` came from `create_reward::<R>`; the host calls one instance at a
        // time (from any thread: `R: Send`).
        let reward = unsafe { (handle as *mut R).as_mut() }
            .ok_or_else(|| Failure(Status::Failed, "null reward handle".into()))?;
        let pairs: Vec<ScorePair> = read_json(request)?;
        let scores = reward.score(&pairs)?;
        if scores.len() != pairs.len() {
            return Err(Failure(
                Status::Failed,
                format!("`{}` returned {} scores for {} pairs", R::NAME, scores.len(), pairs.len()),
            ));
        }
        // JSON has no NaN: it would arrive as `null` and read as malformed. Say what it was.
        if let Some((i, bad)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(Failure(
                Status::Failed,
                format!("`{}` returned the non-finite score {bad} for pair {i}", R::NAME),
            ));
        }
        to_json(&scores)
    })
}

extern "C" fn destroy_reward<R: Reward>(handle: *mut c_void) {
    if !handle.is_null() {
        // A panicking Drop must not cross the boundary either.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `handle` came from `Box::into_raw` in `create_reward::<R>`.
            drop(unsafe { Box::from_raw(handle as *mut R) });
        }));
    }
}

/// Forwards the plugin's `tracing` output to the host's log, one event per call.
/// A subscriber must be `'static + Send + Sync`; this one is only installed for the
/// duration of a run call, during which the host's table stays valid.
#[derive(Clone, Copy)]
struct HostLog(*const HostApi);

// SAFETY: the host's log service may be called from any thread during a run call.
unsafe impl Send for HostLog {}
unsafe impl Sync for HostLog {}

struct HostLogLine {
    host: *const HostApi,
    level: u32,
    line: Vec<u8>,
}

impl Write for HostLogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for HostLogLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end();
        // SAFETY: see `HostLog`.
        if let (false, Some(host)) = (text.is_empty(), unsafe { self.host.as_ref() }) {
            (host.log)(host.state, self.level, StrRef::new(text));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for HostLog {
    type Writer = HostLogLine;

    fn make_writer(&'a self) -> Self::Writer {
        HostLogLine { host: self.0, level: abi::LOG_INFO, line: Vec::new() }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let level = match *meta.level() {
            tracing::Level::ERROR => abi::LOG_ERROR,
            tracing::Level::WARN => abi::LOG_WARN,
            tracing::Level::INFO => abi::LOG_INFO,
            _ => abi::LOG_DEBUG,
        };
        HostLogLine { host: self.0, level, line: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::RewardModel;

    /// Scores each pair with the number its response spells (`nan` and `inf` too).
    struct Parse;

    impl RewardModel for Parse {
        fn score(&mut self, pairs: &[ScorePair]) -> crate::Result<Vec<f64>> {
            Ok(pairs.iter().map(|p| p.response.parse().unwrap_or(0.0)).collect())
        }
    }

    #[derive(Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Empty {}

    impl Reward for Parse {
        const NAME: &'static str = "parse";
        const DESCRIPTION: &'static str = "the number in the response";
        type Config = Empty;
        fn new(_: Empty, ctx: &RewardContext) -> crate::Result<Self> {
            assert_eq!((ctx.name(), ctx.seed(), ctx.device()), ("p", 7, tch::Device::Cpu));
            Ok(Parse)
        }
    }

    fn call(text: &str) -> (i32, String) {
        let create =
            serde_json::json!({"config_yaml": "{}", "name": "p", "device": "cpu", "seed": 7, "run_dir": "/tmp"});
        let create = create.to_string();
        let mut out = Vec::new();
        let handle = create_reward::<Parse>(StrRef::new(&create), abi::vec_sink(&mut out));
        assert!(!handle.is_null(), "{}", String::from_utf8_lossy(&out));
        let pairs = serde_json::to_string(&[ScorePair::new("q", "1.5"), ScorePair::new("q", text)]).unwrap();
        let mut out = Vec::new();
        let status = score_reward::<Parse>(handle, StrRef::new(&pairs), abi::vec_sink(&mut out));
        destroy_reward::<Parse>(handle);
        (status, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_reward_is_made_with_its_run_and_scores_across_the_boundary() {
        assert_eq!(call("-2"), (Status::Ok as i32, "[1.5,-2.0]".to_string()));
    }

    #[test]
    fn a_guarded_panic_comes_back_with_its_place_and_leaves_later_panics_to_the_previous_hook() {
        let mut out = Vec::new();
        let status = guarded(&abi::vec_sink(&mut out), || panic!("exploded"));
        let message = String::from_utf8(out).unwrap();
        assert_eq!(status, Status::Panicked as i32);
        assert!(message.starts_with("at core/src/plugin/export.rs:") && message.ends_with(": exploded"), "{message}");
        // Outside `guarded` again: a panic here (a failing test's, in this binary) is
        // reported by the hook that was there before, not swallowed.
        assert!(!GUARDED.with(Cell::get));
    }

    #[test]
    fn a_non_finite_score_is_refused_by_name() {
        assert_eq!(call("nan"), (Status::Failed as i32, "`parse` returned the non-finite score NaN for pair 1".into()));
        assert_eq!(
            call("-inf"),
            (Status::Failed as i32, "`parse` returned the non-finite score -inf for pair 1".into())
        );
    }
}

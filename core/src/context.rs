//! `RunContext`: everything a running stage needs from the host, behind a safe API.
//!
//! It wraps the C table of host services ([`HostApi`]) handed across the plugin
//! boundary: TensorBoard, progress, log messages, cancellation and scoring with a
//! reward the recipe names, plus the run's device, seed and directories.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dist::{ProcessGroup, Rendezvous, Store};
use crate::error::{Error, Result};
use crate::plugin::abi::{self, HostApi, ProgressUpdate, Status, StrRef};
use crate::reward::{RewardModel, ScorePair};

/// What the host tells a stage about its run (crosses as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    /// The stage's name in the recipe; its directories are named after it.
    pub stage: String,
    /// The stage's own recipe section.
    pub config_yaml: String,
    pub run_dir: PathBuf,
    /// `<run_dir>/<stage>/`: checkpoints and the final model go here.
    pub stage_dir: PathBuf,
    /// The model this stage starts from (HF layout), if any.
    pub input_model: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`, already resolved from `auto`.
    pub device: String,
    pub seed: u64,
    /// Continue from the stage's latest checkpoint, if it has one.
    #[serde(default)]
    pub resume: bool,
    /// The names of the recipe's `rewards:`, in recipe order.
    #[serde(default)]
    pub rewards: Vec<String>,
    /// This process's place in a distributed run (torchrun's variables or `plumb run
    /// --nproc N`); `None` for a single-process run.
    #[serde(default)]
    pub dist: Option<Rendezvous>,
}

/// The safe face of the host for one stage or evaluator run.
pub struct RunContext<'h> {
    host: &'h HostApi,
    request: RunRequest,
    device: tch::Device,
    /// Process groups made so far by this stage: each gets a store prefix of its own.
    groups_made: std::cell::Cell<usize>,
}

impl<'h> RunContext<'h> {
    /// # Safety
    /// `host` must be a valid table whose functions accept its `state` for the whole
    /// lifetime `'h` (the host guarantees this for the duration of a run call).
    pub(crate) unsafe fn new(host: &'h HostApi, request: RunRequest) -> Result<Self> {
        let device = parse_device(&request.device)?;
        Ok(Self { host, request, device, groups_made: std::cell::Cell::new(0) })
    }

    pub fn stage_name(&self) -> &str {
        &self.request.stage
    }
    pub fn device(&self) -> tch::Device {
        self.device
    }
    pub fn seed(&self) -> u64 {
        self.request.seed
    }
    pub fn run_dir(&self) -> &Path {
        &self.request.run_dir
    }
    pub fn stage_dir(&self) -> &Path {
        &self.request.stage_dir
    }
    /// The stage's own recipe section, as YAML (what its config was read from).
    pub fn config_yaml(&self) -> &str {
        &self.request.config_yaml
    }
    /// This process's rank in a distributed run (0 in a single-process run).
    pub fn rank(&self) -> usize {
        self.request.dist.as_ref().map_or(0, |d| d.rank)
    }
    /// The number of processes of the run (1 in a single-process run).
    pub fn world_size(&self) -> usize {
        self.request.dist.as_ref().map_or(1, |d| d.world_size)
    }
    /// True on the rank that logs and writes checkpoints (rank 0; the only one when not
    /// distributed).
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }
    /// Where and as whom this process meets the others, in a distributed run.
    pub fn rendezvous(&self) -> Option<&Rendezvous> {
        self.request.dist.as_ref()
    }

    /// A process group of the run's ranks, for this stage; `None` in a single-process run.
    /// It meets through the store the host's rank 0 serves for the whole run, under a prefix
    /// of this stage's own (every rank must make its groups in the same order). On Gloo, with
    /// NCCL attached for the stage's device when that is a GPU: collectives on CUDA tensors
    /// go through NCCL, those on CPU tensors through Gloo.
    pub fn process_group(&self) -> Result<Option<ProcessGroup>> {
        let Some(rendezvous) = &self.request.dist else { return Ok(None) };
        let n = self.groups_made.get();
        self.groups_made.set(n + 1);
        let store = Store::connect(rendezvous)?;
        let name = format!("stage/{}/{n}", self.request.stage);
        let mut group = ProcessGroup::gloo(&store, &name, rendezvous)?;
        if let tch::Device::Cuda(_) = self.device {
            group.attach_nccl(self.device)?;
            tracing::info!(
                "rank {} of {}: NCCL attached on {} for group {name}",
                group.rank(),
                group.world_size(),
                crate::device::device_name(self.device)
            );
        }
        Ok(Some(group))
    }

    /// True when the user asked to continue from the stage's latest checkpoint.
    pub fn resume(&self) -> bool {
        self.request.resume
    }

    /// The model this stage starts from: the previous stage's output or the recipe's `model`.
    pub fn input_model(&self) -> Option<&Path> {
        self.request.input_model.as_deref()
    }

    /// The tokenizer of the input model (`tokenizer.json`), if there is an input model.
    pub fn tokenizer(&self) -> Result<Option<crate::tokenizer::Tokenizer>> {
        match self.input_model() {
            Some(dir) => crate::tokenizer::Tokenizer::from_dir(dir).map(Some),
            None => Ok(None),
        }
    }

    /// A TensorBoard scalar under `<output_dir>/tb/<stage>/`. Never blocks.
    pub fn scalar(&self, tag: &str, step: i64, value: f64) {
        (self.host.log_scalar)(self.host.state, StrRef::new(tag), step, value);
    }

    /// Tells TensorBoard the stage resumed at `step`: its earlier events from `step` on
    /// are dropped, since the resumed run writes them again.
    pub fn restart_at(&self, step: i64) {
        (self.host.restart_at)(self.host.state, step);
    }

    /// A TensorBoard text summary (e.g. sampled completions). Never blocks.
    pub fn text(&self, tag: &str, step: i64, text: &str) {
        (self.host.log_text)(self.host.state, StrRef::new(tag), step, StrRef::new(text));
    }

    /// The run's hyper-parameters, shown beside `metric_tags` in TensorBoard's HParams tab.
    pub fn hparams(&self, hparams: &serde_json::Map<String, serde_json::Value>, metric_tags: &[&str]) {
        let json = serde_json::json!({ "hparams": hparams, "metrics": metric_tags }).to_string();
        (self.host.log_hparams)(self.host.state, StrRef::new(&json));
    }

    /// Moves the progress bar: `position` of `total` steps, with the latest loss and throughput.
    pub fn progress(
        &self,
        position: u64,
        total: u64,
        loss: Option<f64>,
        tokens_per_second: Option<f64>,
        tokens_seen: Option<u64>,
    ) {
        let update = ProgressUpdate {
            position,
            total,
            loss: loss.unwrap_or(f64::NAN),
            tokens_per_second: tokens_per_second.unwrap_or(f64::NAN),
            tokens_seen: tokens_seen.map_or(f64::NAN, |t| t as f64),
        };
        (self.host.progress)(self.host.state, &update);
    }

    /// A line in the host's log. (The plugin's own `tracing` events reach the host too.)
    pub fn info(&self, message: &str) {
        (self.host.log)(self.host.state, abi::LOG_INFO, StrRef::new(message));
    }

    pub fn warn(&self, message: &str) {
        (self.host.log)(self.host.state, abi::LOG_WARN, StrRef::new(message));
    }

    /// True once the user asked the run to stop (Ctrl-C): finish the step, save, return.
    pub fn should_stop(&self) -> bool {
        (self.host.should_stop)(self.host.state) != 0
    }

    /// Runs `work` on a thread of its own and waits for it, checking every 50 ms whether
    /// the user asked the run to stop: then it returns [`Error::Cancelled`] at once and
    /// leaves `work` to end with the process (a stopped stage ends the run). For long
    /// preparation steps that cannot check [`should_stop`](Self::should_stop) themselves,
    /// such as a library's tokenizer training or a pass over a corpus. `what` names the
    /// work in errors.
    pub fn unless_stopped<T: Send + 'static>(
        &self,
        what: &str,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(what.chars().take(15).collect())
            .spawn(move || {
                let _ = sender.send(work());
            })
            .map_err(|e| Error::Other(format!("{what}: cannot start a thread: {e}")))?;
        loop {
            match receiver.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(result) => return result,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if self.should_stop() => {
                    tracing::warn!("stopped on request during {what}");
                    return Err(Error::Cancelled);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Other(format!("{what} panicked")));
                }
            }
        }
    }

    /// The reward named `name` in the recipe's `rewards:` list, whichever plugin provides it.
    /// Several at once, weighted: [`RewardSet`](crate::reward::RewardSet).
    pub fn reward(&self, name: &str) -> HostReward<'_, 'h> {
        HostReward { ctx: self, name: name.to_owned() }
    }

    /// The names of the recipe's `rewards:`, in recipe order.
    pub fn reward_names(&self) -> &[String] {
        &self.request.rewards
    }

    /// The host's scoring service, detached so several threads can use it at once.
    pub(crate) fn score_service(&self) -> ScoreService {
        ScoreService { score: self.host.score, state: self.host.state }
    }
}

/// A reward reached through the host; see [`RunContext::reward`].
pub struct HostReward<'c, 'h> {
    ctx: &'c RunContext<'h>,
    name: String,
}

impl RewardModel for HostReward<'_, '_> {
    fn score(&mut self, pairs: &[ScorePair]) -> Result<Vec<f64>> {
        let request = serde_json::to_string(pairs).map_err(|e| Error::Other(e.to_string()))?;
        self.ctx.score_service().score_json(&self.name, &request, pairs.len())
    }
}

/// The host's `score` service without the rest of its table: what a thread needs to
/// score with a reward.
#[derive(Clone, Copy)]
pub(crate) struct ScoreService {
    score: extern "C" fn(state: *mut std::ffi::c_void, reward: StrRef, request: StrRef, out: abi::ByteSink) -> i32,
    state: *mut std::ffi::c_void,
}

// SAFETY: the ABI (`HostApi::score`) lets a plugin call `score` with the host's `state`
// from any thread during a run call, several at once; a `ScoreService` is only made from
// a live `RunContext` and used while it is borrowed.
unsafe impl Send for ScoreService {}
unsafe impl Sync for ScoreService {}

impl ScoreService {
    /// Scores `request`, a JSON list of `count` pairs, with the recipe's reward `name`.
    /// Every error starts "reward `<name>`: ".
    pub(crate) fn score_json(&self, name: &str, request: &str, count: usize) -> Result<Vec<f64>> {
        let mut out = Vec::new();
        let raw = (self.score)(self.state, StrRef::new(name), StrRef::new(request), abi::vec_sink(&mut out));
        let text = String::from_utf8_lossy(&out);
        let scores: Vec<f64> = match Status::from_raw(raw) {
            Some(Status::Ok) => serde_json::from_str(&text)
                .map_err(|e| Error::Other(format!("reward `{name}` returned invalid scores: {e}")))?,
            _ => return Err(Error::Other(format!("reward `{name}`: {text}"))),
        };
        if scores.len() != count {
            return Err(Error::Other(format!("reward `{name}` returned {} scores for {count} pairs", scores.len())));
        }
        Ok(scores)
    }
}

/// The device of a run request (`cpu` or `cuda:N`, already resolved by the host).
pub fn parse_device(text: &str) -> Result<tch::Device> {
    text.parse::<crate::device::DeviceSpec>().and_then(|spec| spec.resolve()).map_err(Error::Other)
}

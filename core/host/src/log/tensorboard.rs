//! TensorBoard event files: scalars, text and hparams, written on a background thread.
//!
//! `tensorboard-rs` frames records (`RecordWriter`, masked CRC32C) and builds scalar
//! summaries; it leaves text and hparams `unimplemented!()` and its `EventFileWriter`
//! panics on I/O errors. So this module opens the file itself, frames records with
//! `RecordWriter` (which returns `io::Result`), and encodes the other messages with
//! `protobuf::CodedOutputStream` (their generated types live in `tensorboard-proto`,
//! which is not our dependency), field numbers taken from the protos TensorBoard
//! reads them with:
//!
//! - `tensorboard/compat/proto/{event,summary,tensor,tensor_shape}.proto`
//! - `tensorboard/plugins/hparams/{plugin_data,api}.proto`, laid out as
//!   `torch.utils.tensorboard.summary.hparams` does (`_hparams_/experiment`,
//!   `_hparams_/session_start_info`, `_hparams_/session_end_info`, plugin data
//!   version 0).
//! - text as `tf.summary.text` writes it: plugin `text`, a `DT_STRING` tensor of shape
//!   `[]` holding the UTF-8 bytes (a scalar, so the dashboard renders it as markdown
//!   rather than as a one-cell table).
//!
//! Every call enqueues a message and returns at once; the thread owns the file. The
//! first write error stops the writer (a half-written record would corrupt what
//! follows): later events are dropped and counted, and every later `flush`/`close`
//! returns that error.

use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::SystemTime;

use crossbeam_channel::{Receiver, Sender};
use protobuf::{CodedOutputStream, Message, ProtobufResult};
use tensorboard_rs::record_writer::RecordWriter;

#[derive(Debug, thiserror::Error)]
pub enum TbError {
    #[error("cannot create TensorBoard log directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot create TensorBoard event file {path}: {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("cannot start the TensorBoard writer thread for {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    /// The first write error; `dropped` events queued after it were not written.
    #[error("writing TensorBoard event file {path} failed: {source} ({dropped} later events dropped)")]
    Write { path: PathBuf, source: io::Error, dropped: u64 },
    #[error("the TensorBoard writer thread for {path} has stopped (it panicked)")]
    ThreadGone { path: PathBuf },
}

/// One hyperparameter value, as the hparams plugin types them (`DATA_TYPE_FLOAT64`,
/// `DATA_TYPE_STRING`, `DATA_TYPE_BOOL`).
#[derive(Debug, Clone, PartialEq)]
pub enum HParamValue {
    Number(f64),
    Text(String),
    Bool(bool),
}

impl From<f64> for HParamValue {
    fn from(v: f64) -> Self {
        HParamValue::Number(v)
    }
}
impl From<i64> for HParamValue {
    fn from(v: i64) -> Self {
        HParamValue::Number(v as f64)
    }
}
impl From<bool> for HParamValue {
    fn from(v: bool) -> Self {
        HParamValue::Bool(v)
    }
}
impl From<&str> for HParamValue {
    fn from(v: &str) -> Self {
        HParamValue::Text(v.to_string())
    }
}
impl From<String> for HParamValue {
    fn from(v: String) -> Self {
        HParamValue::Text(v)
    }
}

/// Writes one TensorBoard event file. `Send + Sync`: share it by reference or `Arc`.
///
/// Dropping it without [`TbWriter::close`] still writes everything queued and joins the
/// thread; a write error is then only logged. If the drop happens while panicking, the
/// hparams session (if any) is ended with `STATUS_FAILURE` instead of `STATUS_SUCCESS`.
pub struct TbWriter {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<Result<(), TbError>>>,
    path: PathBuf,
}

enum Msg {
    Scalar { tag: String, step: i64, value: f64, wall_time: f64 },
    Text { tag: String, step: i64, text: String, wall_time: f64 },
    Image { tag: String, step: i64, png: Vec<u8>, height: u32, width: u32, wall_time: f64 },
    HParams { hparams: Vec<(String, HParamValue)>, metric_tags: Vec<String>, wall_time: f64 },
    Restart { step: i64, wall_time: f64 },
    Flush(Sender<Result<(), TbError>>),
    End { status: SessionStatus, wall_time: f64 },
}

/// `tensorboard.hparams.Status`.
#[derive(Debug, Clone, Copy)]
enum SessionStatus {
    Success = 1,
    Failure = 2,
}

/// Makes event file names unique within a process (TF and torch do the same).
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TbWriter {
    /// Creates `dir` (and parents) and an event file in it. Errors name the directory.
    pub fn create(dir: &Path) -> Result<Self, TbError> {
        fs::create_dir_all(dir).map_err(|source| TbError::CreateDir { path: dir.to_path_buf(), source })?;
        let wall_time = now();
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            wall_time as u64,
            hostname(),
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        // create_new: never append to (and so corrupt) someone else's file.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| TbError::CreateFile { path: path.clone(), source })?;
        Self::spawn(path, BufWriter::new(file), wall_time)
    }

    /// Writes the `brain.Event:2` header synchronously (so a broken sink fails here, not
    /// later) and starts the thread that owns `sink`.
    fn spawn<W: Write + Send + 'static>(path: PathBuf, sink: W, wall_time: f64) -> Result<Self, TbError> {
        let mut worker = Worker {
            path: path.clone(),
            records: RecordWriter::new(sink),
            failure: None,
            dropped: 0,
            session_started: false,
        };
        worker.write_event(header_event(wall_time));
        worker.flush_sink();
        worker.result()?;

        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("tensorboard-writer".into())
            .spawn(move || worker.run(rx))
            .map_err(|source| TbError::Spawn { path: path.clone(), source })?;
        tracing::debug!(path = %path.display(), "TensorBoard event file created");
        Ok(TbWriter { tx, thread: Some(thread), path })
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs `value` as a `simple_value` scalar (an f32, like every TensorBoard scalar).
    pub fn scalar(&self, tag: &str, step: i64, value: f64) {
        self.send(Msg::Scalar { tag: tag.to_string(), step, value, wall_time: now() });
    }

    /// Logs `text` (markdown) for the Text dashboard.
    pub fn text(&self, tag: &str, step: i64, text: &str) {
        self.send(Msg::Text { tag: tag.to_string(), step, text: text.to_string(), wall_time: now() });
    }

    /// An image (PNG bytes of `width` × `height` pixels, RGB) under `tag`.
    pub fn image(&self, tag: &str, step: i64, png: Vec<u8>, height: u32, width: u32) {
        self.send(Msg::Image { tag: tag.to_string(), step, png, height, width, wall_time: now() });
    }

    /// Starts this run's hparams session (call once per writer; later calls are ignored
    /// with a warning, as TensorBoard keeps only the first). `metric_tags` are the scalar
    /// tags TensorBoard's HParams dashboard shows beside them. Duplicate names keep the
    /// first value. The session is ended with `STATUS_SUCCESS` by `close` or drop.
    pub fn hparams(&self, hparams: &[(String, HParamValue)], metric_tags: &[String]) {
        self.send(Msg::HParams { hparams: hparams.to_vec(), metric_tags: metric_tags.to_vec(), wall_time: now() });
    }

    /// Marks a restart at `step` (a resumed run): TensorBoard drops the events of earlier
    /// runs at this step and later, which the resumed run writes again. (A `SessionLog`
    /// START event, as torch's `SummaryWriter(purge_step=...)` writes.)
    pub fn restart_at(&self, step: i64) {
        self.send(Msg::Restart { step, wall_time: now() });
    }

    /// Writes everything queued so far to disk and waits until it is written.
    pub fn flush(&self) -> Result<(), TbError> {
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(reply_tx)).is_err() {
            return Err(self.gone());
        }
        reply_rx.recv().unwrap_or_else(|_| Err(self.gone()))
    }

    /// Flushes, stops the thread, and reports any write error that happened in the background.
    pub fn close(mut self) -> Result<(), TbError> {
        self.finish(SessionStatus::Success)
    }

    fn send(&self, msg: Msg) {
        // Fails only if the thread died; `flush`/`close` report that.
        let _ = self.tx.send(msg);
    }

    fn gone(&self) -> TbError {
        TbError::ThreadGone { path: self.path.clone() }
    }

    fn finish(&mut self, status: SessionStatus) -> Result<(), TbError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.send(Msg::End { status, wall_time: now() });
        thread.join().unwrap_or_else(|_| Err(self.gone()))
    }
}

impl Drop for TbWriter {
    fn drop(&mut self) {
        let status = if std::thread::panicking() { SessionStatus::Failure } else { SessionStatus::Success };
        if let Err(e) = self.finish(status) {
            tracing::error!("{e}");
        }
    }
}

/// The background thread's state. Owns the sink.
struct Worker<W: Write> {
    path: PathBuf,
    records: RecordWriter<W>,
    /// The first write error (kind, message). Once set, nothing more is written.
    failure: Option<(io::ErrorKind, String)>,
    dropped: u64,
    session_started: bool,
}

impl<W: Write> Worker<W> {
    fn run(mut self, rx: Receiver<Msg>) -> Result<(), TbError> {
        loop {
            // Disconnected cannot happen before End (the TbWriter sends End before it
            // drops its Sender), but treat it as End rather than spin.
            let msg = rx.recv().unwrap_or(Msg::End { status: SessionStatus::Success, wall_time: now() });
            match msg {
                Msg::Scalar { tag, step, value, wall_time } => {
                    // tensorboard-rs builds the Summary; we wrap the Event around it.
                    let summary = tensorboard_rs::summary::scalar(&tag, value as f32).write_to_bytes();
                    self.write_summary(wall_time, step, summary);
                }
                Msg::Text { tag, step, text, wall_time } => {
                    self.write_summary(wall_time, step, text_summary(&tag, &text));
                }
                Msg::Image { tag, step, png, height, width, wall_time } => {
                    self.write_summary(wall_time, step, image_summary(&tag, &png, height, width));
                }
                Msg::HParams { hparams, metric_tags, wall_time } => {
                    if self.session_started {
                        tracing::warn!(path = %self.path.display(), "hparams already written for this run; ignoring a second call");
                    } else {
                        self.session_started = true;
                        let hparams = dedup_hparams(&hparams);
                        // Experiment first, as torch writes it; step 0, torch's default.
                        let experiment = experiment_summary(&hparams, &metric_tags, wall_time);
                        self.write_summary(wall_time, 0, experiment);
                        let session_start = session_start_summary(&hparams, wall_time);
                        self.write_summary(wall_time, 0, session_start);
                    }
                }
                Msg::Restart { step, wall_time } => self.write_event(restart_event(wall_time, step)),
                Msg::Flush(reply) => {
                    self.flush_sink();
                    let _ = reply.send(self.result());
                }
                Msg::End { status, wall_time } => {
                    if self.session_started {
                        self.write_summary(wall_time, 0, session_end_summary(status, wall_time));
                    }
                    self.flush_sink();
                    return self.result();
                }
            }
            // Hand data to the OS whenever the queue runs dry, so a live TensorBoard sees
            // it soon; under load, records batch up in the BufWriter.
            if rx.is_empty() {
                self.flush_sink();
            }
        }
    }

    fn write_summary(&mut self, wall_time: f64, step: i64, summary: ProtobufResult<Vec<u8>>) {
        self.write_event(summary.and_then(|summary| summary_event(wall_time, step, &summary)));
    }

    fn write_event(&mut self, event: ProtobufResult<Vec<u8>>) {
        if self.failure.is_some() {
            self.dropped += 1;
            return;
        }
        let written = event
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            .and_then(|bytes| self.records.write(&bytes));
        if let Err(e) = written {
            self.record_failure(e);
        }
    }

    fn flush_sink(&mut self) {
        if self.failure.is_none() {
            if let Err(e) = self.records.flush() {
                self.record_failure(e);
            }
        }
    }

    fn record_failure(&mut self, e: io::Error) {
        tracing::error!(path = %self.path.display(), "writing TensorBoard event file failed: {e}; dropping later events");
        self.failure = Some((e.kind(), e.to_string()));
    }

    fn result(&self) -> Result<(), TbError> {
        match &self.failure {
            None => Ok(()),
            Some((kind, message)) => Err(TbError::Write {
                path: self.path.clone(),
                source: io::Error::new(*kind, message.clone()),
                dropped: self.dropped,
            }),
        }
    }
}

// Tags from tensorboard/plugins/hparams/metadata.py.
const EXPERIMENT_TAG: &str = "_hparams_/experiment";
const SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";
const SESSION_END_INFO_TAG: &str = "_hparams_/session_end_info";

/// `Event { wall_time = 1, file_version = 3 }`, the first record of every event file.
fn header_event(wall_time: f64) -> ProtobufResult<Vec<u8>> {
    encode(|os| {
        os.write_double(1, wall_time)?;
        os.write_string(3, "brain.Event:2")
    })
}

/// `Event { wall_time = 1, step = 2, session_log = 7: SessionLog { status = 1: START (1) } }`.
fn restart_event(wall_time: f64, step: i64) -> ProtobufResult<Vec<u8>> {
    let session_log = encode(|os| os.write_enum(1, 1))?;
    encode(|os| {
        os.write_double(1, wall_time)?;
        os.write_int64(2, step)?;
        os.write_bytes(7, &session_log)
    })
}

/// `Event { wall_time = 1, step = 2, summary = 5 }`.
fn summary_event(wall_time: f64, step: i64, summary: &[u8]) -> ProtobufResult<Vec<u8>> {
    encode(|os| {
        os.write_double(1, wall_time)?;
        os.write_int64(2, step)?;
        os.write_bytes(5, summary)
    })
}

/// `Summary { value = 1: Value { tag = 1, tensor = 8, metadata = 9 } }`, the tensor being
/// `TensorProto { dtype = 1 (DT_STRING = 7), tensor_shape = 2 (no dims: a scalar),
/// string_val = 8 }`, the metadata naming plugin `text`.
fn text_summary(tag: &str, text: &str) -> ProtobufResult<Vec<u8>> {
    let tensor = encode(|os| {
        os.write_enum(1, 7)?;
        os.write_bytes(2, &[])?;
        os.write_bytes(8, text.as_bytes())
    })?;
    // TextPluginData { version = 0 } serializes to nothing: content stays empty.
    let metadata = summary_metadata("text", &[])?;
    let value = encode(|os| {
        os.write_string(1, tag)?;
        os.write_bytes(8, &tensor)?;
        os.write_bytes(9, &metadata)
    })?;
    encode(|os| os.write_bytes(1, &value))
}

/// A `Summary` holding one PNG image (`Summary.Value.image`, RGB).
fn image_summary(tag: &str, png: &[u8], height: u32, width: u32) -> ProtobufResult<Vec<u8>> {
    let image = encode(|os| {
        os.write_int32(1, height as i32)?;
        os.write_int32(2, width as i32)?;
        os.write_int32(3, 3)?; // colorspace: RGB
        os.write_bytes(4, png)
    })?;
    let value = encode(|os| {
        os.write_string(1, tag)?;
        os.write_bytes(4, &image)
    })?;
    encode(|os| os.write_bytes(1, &value))
}

/// Drops repeated hparam names, keeping the first (the hparams map holds one value each).
fn dedup_hparams(hparams: &[(String, HParamValue)]) -> Vec<&(String, HParamValue)> {
    let mut seen = std::collections::HashSet::new();
    hparams
        .iter()
        .filter(|(name, _)| {
            let first = seen.insert(name.as_str());
            if !first {
                tracing::warn!(name = %name, "duplicate hparam name; keeping the first value");
            }
            first
        })
        .collect()
}

/// Experiment { time_created_secs = 3, hparam_infos = 4, metric_infos = 5 }, with
/// HParamInfo { name = 1, type = 4 } and MetricInfo { name = 1: MetricName { tag = 2 } }.
fn experiment_summary(
    hparams: &[&(String, HParamValue)],
    metric_tags: &[String],
    wall_time: f64,
) -> ProtobufResult<Vec<u8>> {
    let experiment = encode(|os| {
        os.write_double(3, wall_time)?;
        for (name, value) in hparams.iter().copied() {
            let data_type = match value {
                HParamValue::Text(_) => 1,   // DATA_TYPE_STRING
                HParamValue::Bool(_) => 2,   // DATA_TYPE_BOOL
                HParamValue::Number(_) => 3, // DATA_TYPE_FLOAT64
            };
            let info = encode(|os| {
                os.write_string(1, name)?;
                os.write_enum(4, data_type)
            })?;
            os.write_bytes(4, &info)?;
        }
        for tag in metric_tags {
            let metric_name = encode(|os| os.write_string(2, tag))?;
            let info = encode(|os| os.write_bytes(1, &metric_name))?;
            os.write_bytes(5, &info)?;
        }
        Ok(())
    })?;
    hparams_summary(EXPERIMENT_TAG, 2, &experiment)
}

/// SessionStartInfo { hparams = 1: map<string, google.protobuf.Value>, start_time_secs = 5 }.
/// A map entry is { key = 1, value = 2 }; Value is a oneof { number_value = 2,
/// string_value = 3, bool_value = 4 }, so its field is written even when it is 0.
fn session_start_summary(hparams: &[&(String, HParamValue)], wall_time: f64) -> ProtobufResult<Vec<u8>> {
    let session_start = encode(|os| {
        for (name, value) in hparams.iter().copied() {
            let value = encode(|os| match value {
                HParamValue::Number(v) => os.write_double(2, *v),
                HParamValue::Text(v) => os.write_string(3, v),
                HParamValue::Bool(v) => os.write_bool(4, *v),
            })?;
            let entry = encode(|os| {
                os.write_string(1, name)?;
                os.write_bytes(2, &value)
            })?;
            os.write_bytes(1, &entry)?;
        }
        os.write_double(5, wall_time)
    })?;
    hparams_summary(SESSION_START_INFO_TAG, 3, &session_start)
}

/// SessionEndInfo { status = 1, end_time_secs = 2 }
fn session_end_summary(status: SessionStatus, wall_time: f64) -> ProtobufResult<Vec<u8>> {
    let session_end = encode(|os| {
        os.write_enum(1, status as i32)?;
        os.write_double(2, wall_time)
    })?;
    hparams_summary(SESSION_END_INFO_TAG, 4, &session_end)
}

/// A `Summary` with one value that has only a tag and hparams plugin metadata, whose
/// content is `HParamsPluginData { version = 1 (0: omitted), <oneof field> = data }`
/// (experiment = 2, session_start_info = 3, session_end_info = 4).
fn hparams_summary(tag: &str, field: u32, data: &[u8]) -> ProtobufResult<Vec<u8>> {
    let content = encode(|os| os.write_bytes(field, data))?;
    let metadata = summary_metadata("hparams", &content)?;
    let value = encode(|os| {
        os.write_string(1, tag)?;
        os.write_bytes(9, &metadata)
    })?;
    encode(|os| os.write_bytes(1, &value))
}

/// `SummaryMetadata { plugin_data = 1: PluginData { plugin_name = 1, content = 2 } }`.
fn summary_metadata(plugin_name: &str, content: &[u8]) -> ProtobufResult<Vec<u8>> {
    let plugin_data = encode(|os| {
        os.write_string(1, plugin_name)?;
        if !content.is_empty() {
            os.write_bytes(2, content)?;
        }
        Ok(())
    })?;
    encode(|os| os.write_bytes(1, &plugin_data))
}

/// Encodes one message's fields.
fn encode(fields: impl FnOnce(&mut CodedOutputStream) -> ProtobufResult<()>) -> ProtobufResult<Vec<u8>> {
    let mut buf = Vec::new();
    let mut os = CodedOutputStream::vec(&mut buf);
    fields(&mut os)?;
    os.flush()?;
    drop(os);
    Ok(buf)
}

/// Seconds since the Unix epoch, as TensorBoard's `wall_time`.
fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['/', '\\'], "_"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorboard_rs::masked_crc32c::masked_crc32c;

    /// A sink that accepts `left` bytes, then fails like a full disk.
    struct FailAfter {
        left: usize,
    }
    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::other("no space left on device (test)"));
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Splits an event file into record payloads, checking lengths and both CRCs.
    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            assert!(rest.len() >= 12, "truncated record header");
            let len_bytes = &rest[..8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(rest[8..12].try_into().unwrap()), masked_crc32c(len_bytes));
            let data = &rest[12..12 + len];
            let crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            out.push(data.to_vec());
            rest = &rest[16 + len..];
        }
        out
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[test]
    fn writer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TbWriter>();
    }

    #[test]
    fn write_error_is_reported_by_flush_and_close_not_a_panic() {
        let path = PathBuf::from("/runs/x/events.out.tfevents.test");
        // 60 bytes: the 40-byte header record fits, the first scalar does not.
        let writer = TbWriter::spawn(path.clone(), FailAfter { left: 60 }, 0.0).unwrap();
        for step in 0..5 {
            writer.scalar("train/loss", step, 1.0);
        }
        let err = writer.flush().unwrap_err();
        assert!(matches!(err, TbError::Write { dropped: 4, .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("/runs/x/events.out.tfevents.test"), "{message}");
        assert!(message.contains("no space left on device (test)"), "{message}");
        // Sticky: close reports it too, counting what was dropped since.
        writer.text("samples", 5, "lost");
        let err = writer.close().unwrap_err();
        assert!(matches!(err, TbError::Write { dropped: 5, .. }), "{err:?}");
    }

    #[test]
    fn a_sink_that_fails_at_once_fails_create() {
        let err =
            TbWriter::spawn(PathBuf::from("/runs/y/ev"), FailAfter { left: 0 }, 0.0).err().expect("spawn should fail");
        assert!(matches!(err, TbError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("/runs/y/ev"), "{err}");
    }

    #[test]
    fn create_error_names_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("not_a_dir");
        fs::write(&blocker, b"").unwrap();
        let dir = blocker.join("run");
        let err = TbWriter::create(&dir).err().expect("create should fail");
        assert!(matches!(err, TbError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains(&dir.display().to_string()), "{err}");
    }

    #[test]
    fn flush_writes_and_drop_without_close_writes_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let writer = TbWriter::create(&dir).unwrap();
        let path = writer.path().to_path_buf();
        assert_eq!(path.parent(), Some(dir.as_path()));
        assert!(path.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));

        writer.scalar("train/loss", 0, 2.5);
        writer.flush().unwrap();
        assert_eq!(records(&fs::read(&path).unwrap()).len(), 2); // header + scalar

        writer.hparams(&[("lr".to_string(), 1e-3.into())], &["eval/loss".to_string()]);
        for step in 1..=100 {
            writer.scalar("train/loss", step, 1.0 / step as f64);
        }
        writer.hparams(&[("lr".to_string(), 1.0.into())], &[]); // ignored: one session per run
        drop(writer);

        let records = records(&fs::read(&path).unwrap());
        // header, scalar, experiment, session start, 100 scalars, session end
        assert_eq!(records.len(), 1 + 1 + 2 + 100 + 1);
        assert!(contains(&records[0], "brain.Event:2"));
        assert!(contains(&records[2], EXPERIMENT_TAG));
        assert!(contains(&records[3], SESSION_START_INFO_TAG));
        assert!(contains(&records[104], SESSION_END_INFO_TAG));
    }

    #[test]
    fn header_event_bytes() {
        // Event { wall_time: 1.5, file_version: "brain.Event:2" }, as protoc encodes it.
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        expected.extend_from_slice(&[0x1a, 13]);
        expected.extend_from_slice(b"brain.Event:2");
        assert_eq!(header_event(1.5).unwrap(), expected);
    }
}

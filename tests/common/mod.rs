//! Shared helpers of the end-to-end tests: run the `plumb` binary on recipes written to
//! a temporary directory, with the workspace's freshly built plugins.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `plumb` binary: cargo's, or `$PLUMB_BIN` (a copy of a test binary run where cargo's
/// paths do not exist, as on a GPU machine without Rust: `devrun/nccl.sh`).
pub fn plumb_bin() -> PathBuf {
    std::env::var_os("PLUMB_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_plumb")))
}

/// The directory holding `plumb` and the workspace's plugin libraries.
pub fn target_dir() -> PathBuf {
    plumb_bin().parent().expect("plumb has a directory").to_path_buf()
}

/// A plugin library built by the workspace (`./dev test` builds them all first).
pub fn library(file: &str) -> PathBuf {
    let path = target_dir().join(file);
    assert!(path.is_file(), "{} is missing: build the workspace first (`./dev test` does)", path.display());
    path
}

/// The example plugin, built by `cargo build --example custom_plugin` (`./dev test` does).
pub fn example_plugin() -> PathBuf {
    library("examples/libcustom_plugin.so")
}

/// The repository (its `data/`, `recipes/`): cargo's, or `$PLUMB_REPO_ROOT` as [`plumb_bin`].
pub fn repo_root() -> PathBuf {
    std::env::var_os("PLUMB_REPO_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Runs `plumb ARGS` in `dir`, finding plugins next to the binary only.
pub fn plumb(dir: &Path, args: &[&str]) -> Output {
    plumb_with_env(dir, args, &[])
}

/// `plumb` with extra environment variables (e.g. the test-only fault injections).
pub fn plumb_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(plumb_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("PLUMB_PLUGIN_PATH")
        .env("PLUMB_LOG", "info")
        .envs(env.iter().copied())
        .output()
        .expect("plumb runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it differs.
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o));
}

/// The first `documents` stories of the shipped corpus, written to `dir/corpus.txt`.
pub fn small_corpus(dir: &Path, documents: usize) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/tiny_tales.txt")).expect("the shipped corpus");
    let docs: Vec<&str> = text.split("\n\n").take(documents).collect();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, docs.join("\n\n")).expect("write corpus");
    path
}

/// A pretraining stage small enough to run in seconds in a debug build.
pub fn tiny_pretrain_stage(name: &str, corpus: &Path, steps: u32) -> String {
    format!(
        r#"  - name: {name}
    uses: pretrain.causal_lm
    config:
      data:
        train: {corpus}
        seq_len: 32
      tokenizer:
        vocab_size: 300
      model:
        hidden_size: 32
        intermediate_size: 64
        num_hidden_layers: 2
        num_attention_heads: 2
      optimizer:
        lr: 1.0e-2
      schedule:
        warmup_steps: 2
      batch_size: 8
      max_steps: {steps}
      log_every: 2
      eval:
        every: 4
        max_batches: 4
        sample_prompts: ["One day, Lily"]
        max_new_tokens: 8
"#,
        corpus = corpus.display()
    )
}

/// The JSON file at `path`; a test failure naming it when it cannot be read or parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `report.json` that stage `stage` wrote in the run directory `run`.
pub fn stage_report(run: &Path, stage: &str) -> serde_json::Value {
    read_json(&run.join(stage).join("report.json"))
}

/// The Python with `tensorboard` installed by `./dev test`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PLUMB_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(venv.is_file(), "no Python with tensorboard: run the tests with `./dev test`, which installs it");
    venv
}

/// Reads every event of a TensorBoard run folder with the official reader.
pub fn read_tensorboard(tb_dir: &Path) -> serde_json::Value {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2
acc = ea.EventAccumulator(sys.argv[1], size_guidance={k: 0 for k in [ea.SCALARS, ea.TENSORS, ea.HISTOGRAMS, ea.IMAGES, ea.AUDIO, ea.COMPRESSED_HISTOGRAMS]})
acc.Reload()
tags = acc.Tags()
out = {"scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}, "text": {}, "hparams": {}}
for t in tags["tensors"]:
    for e in acc.Tensors(t):
        if e.tensor_proto.string_val:
            out["text"].setdefault(t, []).append([e.step, e.tensor_proto.string_val[0].decode("utf-8")])
try:
    content = acc.PluginTagToContent("hparams")
except KeyError:  # the stage logged no hparams
    content = {}
for tag, raw in content.items():
    data = plugin_data_pb2.HParamsPluginData.FromString(raw)
    if data.HasField("session_start_info"):
        out["hparams"] = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in data.session_start_info.hparams.items()}
    if data.HasField("experiment"):
        out["metrics"] = [m.name.tag for m in data.experiment.metric_infos]
print(json.dumps(out))
"#;
    let output = std::process::Command::new(python()).args(["-c", script]).arg(tb_dir).output().expect("python runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// train/loss by step as TensorBoard reads it from a stage's folder (a resumed run's
/// events replace the stopped run's from the step it resumed at).
pub fn train_losses(tb_dir: &Path) -> Vec<(i64, f64)> {
    let events = read_tensorboard(tb_dir);
    events["scalars"]["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap()))
        .collect()
}

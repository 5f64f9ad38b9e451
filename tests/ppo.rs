//! PPO end to end through the binary, on a tiny policy pretrained in the test: the first
//! minibatch's ratio is 1 (rollout and training log-probs agree), the reward rises with a
//! bounded KL, a run killed with SIGKILL resumes to the uninterrupted run's metrics step
//! for step, and bad input is refused before any compute.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A tiny causal LM (pretrained a few steps on the shipped stories) in `dir/base/pretrain/final`.
fn tiny_policy(dir: &Path) -> PathBuf {
    let corpus = small_corpus(dir, 200);
    let recipe = dir.join("base.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: {}\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{}",
            dir.join("base").display(),
            tiny_pretrain_stage("pretrain", &corpus, 24)
        ),
    )
    .unwrap();
    let out = plumb(dir, &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    dir.join("base/pretrain/final")
}

/// Story openings as plain prompts, one a line.
fn prompt_file(dir: &Path) -> PathBuf {
    let starts =
        ["One day, Lily", "Tom and his dog", "The sun was", "Once upon a time", "Mia found a", "The little bird"];
    let lines: Vec<String> = starts
        .iter()
        .cycle()
        .take(16)
        .enumerate()
        .map(|(i, s)| format!("{{\"prompt\": \"{s}\", \"reference\": \"{i}\"}}"))
        .collect();
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A PPO recipe on `model` with the example plugin's word-count reward: −|words − 10|, so
/// more words (more spaces in the tiny model's text) score higher.
fn ppo_recipe(dir: &Path, model: &Path, prompts: &Path, steps: u64, extra: &str) -> PathBuf {
    let recipe = dir.join("ppo.yaml");
    std::fs::write(
        &recipe,
        format!(
            r#"run:
  output_dir: {out}
  seed: 11
  device: cpu
plugins:
  - name: rlhf
  - name: custom
    path: {custom}
rewards:
  - name: ten_words
    uses: custom.word_count
    config: {{target_words: 10}}
stages:
  - name: ppo
    uses: rlhf.ppo
    model: {model}
    config:
      data: {{train: {prompts}}}
      reward: ten_words
      max_prompt_length: 16
      max_new_tokens: 12
      temperature: 1.0
      batch_size: 8
      num_minibatches: 2
      micro_batch_size: 2
      ppo_epochs: 2
      kl_coef: 0.05
      optimizer: {{lr: 3.0e-3}}
      schedule: {{warmup_steps: 0}}
      max_steps: {steps}
      log_every: 1
      checkpoint: {{every: 2, keep: 10}}
{extra}"#,
            out = dir.join("run").display(),
            custom = example_plugin().display(),
            model = model.display(),
            prompts = prompts.display(),
        ),
    )
    .unwrap();
    recipe
}

fn scalars(tb: &Path, tag: &str) -> Vec<(i64, f64)> {
    let events = read_tensorboard(tb);
    let series = events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag} in {events}"));
    series.iter().map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap())).collect()
}

#[test]
fn ppo_raises_the_reward_with_a_bounded_kl_and_the_first_ratio_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_policy(dir.path());
    let prompts = prompt_file(dir.path());
    let recipe = ppo_recipe(dir.path(), &policy, &prompts, 16, "");
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let tb = dir.path().join("run/tb/ppo");
    let events = read_tensorboard(&tb);
    for tag in [
        "objective/kl",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/scores/ten_words",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "policy/entropy_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "val/num_eos_tokens",
        "time/rollout_tokens_per_s",
        "time/train_tokens_per_s",
    ] {
        assert_eq!(events["scalars"][tag].as_array().map(Vec::len), Some(16), "{tag}");
    }
    // (prompt, response, score) samples as text at every logged step.
    let texts = events["text"].as_object().unwrap();
    let samples = texts.iter().find(|(tag, _)| tag.starts_with("samples/episodes")).map(|(_, s)| s.as_array().unwrap());
    let samples = samples.unwrap_or_else(|| panic!("no samples in {texts:?}"));
    assert_eq!(samples.len(), 16);
    let first = samples[0][1].as_str().unwrap();
    assert!(first.starts_with("| prompt | response | score |"), "{first}");
    assert_eq!(first.lines().count(), 2 + 4, "a header and four samples: {first}");

    // Rollout and training log-probs agree: before the first update of each step, the
    // ratio π/π_old is 1 (fp32, CPU).
    for (step, ratio) in scalars(&tb, "val/ratio_first_minibatch") {
        assert!((ratio - 1.0).abs() < 1e-5, "step {step}: ratio {ratio}");
    }
    // The reward rises over the starting policy's while the KL to it stays bounded.
    let scores: Vec<f64> = scalars(&tb, "objective/scores").iter().map(|s| s.1).collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&scores[..3]), mean(&scores[13..]));
    assert!(last > first + 0.5, "scores did not rise: {scores:?}");
    let kl: Vec<f64> = scalars(&tb, "objective/kl").iter().map(|s| s.1).collect();
    assert!(kl.iter().all(|k| k.is_finite() && k.abs() < 20.0), "KL unbounded: {kl:?}");
    println!("objective/scores {scores:?}\nobjective/kl {kl:?}");
    let report = stage_report(&dir.path().join("run"), "ppo");
    assert!(report.to_string().contains("objective/scores"), "{report}");
    assert!(dir.path().join("run/ppo/final/model.safetensors").is_file());
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_uninterrupted_runs_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_policy(dir.path());
    let prompts = prompt_file(dir.path());
    let recipe = ppo_recipe(dir.path(), &policy, &prompts, 6, "      kl_target: 0.5\n");
    let whole = dir.path().join("whole");
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), &format!("run.output_dir={}", whole.display())]);
    assert_exit(&out, 0);

    let mut child = Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["run", recipe.to_str().unwrap()])
        .current_dir(dir.path())
        .env_remove("PLUMB_PLUGIN_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed as soon as step 2's checkpoint is there (saved atomically: whole or absent).
    let checkpoint = dir.path().join("run/ppo/checkpoints/step-00000002");
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(started.elapsed() < Duration::from_secs(600), "no checkpoint at step 2");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its checkpoint at step 2");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let stopped = dir.path().join("run");
    assert!(!stopped.join("ppo/final").exists(), "killed before the end");
    assert!(stopped.join("ppo/checkpoints/step-00000002/value/model.safetensors").is_file());

    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step "), "{}", stderr(&out));
    let (expected, resumed) = (read_tensorboard(&whole.join("tb/ppo")), read_tensorboard(&stopped.join("tb/ppo")));
    let tags = expected["scalars"].as_object().unwrap();
    assert!(tags.contains_key("objective/kl_coef"));
    for (tag, series) in tags {
        if tag.starts_with("time/") || tag == "train/tokens_per_second" {
            continue; // wall-clock figures
        }
        let (a, b) = (series.as_array().unwrap(), resumed["scalars"][tag].as_array().unwrap());
        assert_eq!(a.len(), 6, "{tag}");
        assert_eq!(a.len(), b.len(), "{tag}");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x[0], y[0], "{tag}");
            let (x, y) = (x[1].as_f64().unwrap(), y[1].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{tag}: {x} uninterrupted, {y} resumed");
        }
    }
}

#[test]
fn bad_input_is_refused_before_compute_with_the_file_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_policy(dir.path());
    let prompts = prompt_file(dir.path());

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let recipe = ppo_recipe(dir.path(), &policy, &empty, 2, "");
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("empty.jsonl: no prompts"), "{}", stderr(&out));
    assert!(!dir.path().join("run/ppo").exists(), "refused before the stage started");

    let recipe = ppo_recipe(dir.path(), &policy, &prompts, 2, "");
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "stages.ppo.config.reward=nope", "--overwrite"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("config.reward: reward `nope` is not defined in the recipe's `rewards:` (defined: ten_words)"),
        "{err}"
    );
    assert!(!dir.path().join("run/ppo/checkpoints").exists());

    // A value model whose vocabulary differs from the policy's cannot read its tokens.
    let value = dir.path().join("value");
    std::fs::create_dir_all(&value).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(policy.join("config.json")).unwrap()).unwrap();
    let policy_vocab = config["vocab_size"].as_u64().unwrap();
    config["vocab_size"] = serde_json::json!(policy_vocab + 20);
    std::fs::write(value.join("config.json"), config.to_string()).unwrap();
    let extra = format!("      value_model: {{init: reward_model, path: {}}}\n", value.display());
    let recipe = ppo_recipe(dir.path(), &policy, &prompts, 2, &extra);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--overwrite"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let expected = format!("has a vocabulary of {} tokens but the policy", policy_vocab + 20);
    assert!(
        err.contains("value_model.path") && err.contains(&expected) && err.contains(&format!("has {policy_vocab}")),
        "{err}"
    );

    // A prompt longer than max_prompt_length is an error naming its line, never cut.
    let recipe = ppo_recipe(dir.path(), &policy, &prompts, 2, "");
    let out =
        plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--overwrite", "stages.ppo.config.max_prompt_length=2"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("prompts.jsonl")
            && err.contains("line 1: the prompt has")
            && err.contains("more than max_prompt_length 2"),
        "{err}"
    );
}

#[test]
fn a_reward_that_fails_mid_run_stops_it_with_its_error_and_the_last_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_policy(dir.path());
    let prompts = prompt_file(dir.path());
    let recipe = ppo_recipe(dir.path(), &policy, &prompts, 6, "");
    // The probe plugin's reward scores three batches, then fails: step 4's scoring.
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "rewards:\n",
        &format!(
            "  - name: probe\n    path: {}\nrewards:\n  - name: dying\n    uses: probe.fails_after\n    config: {{batches: 3}}\n",
            library("libplumb_probe.so").display()
        ),
    );
    std::fs::write(&recipe, text.replace("reward: ten_words", "reward: dying")).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("reward `dying`") && err.contains("the probe reward is out of service"), "{err}");
    // Step 2's checkpoint is intact: a resume (with a reward that works) takes it up.
    let checkpoints = dir.path().join("run/ppo/checkpoints");
    let saved: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(saved, ["step-00000002"]);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume", "rewards.0.config.batches=100"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 2"), "{}", stderr(&out));
    assert_eq!(scalars(&dir.path().join("run/tb/ppo"), "objective/scores").len(), 6);
}

/// A scoring server: the first `good` POSTs get `{"scores": [words per response]}`, later
/// ones fail as `mode` says (500, malformed JSON, or no answer in time). Prints its port.
const FLAKY_SERVER: &str = r#"
import json, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
mode, good = sys.argv[1], int(sys.argv[2])
seen = [0]
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seen[0] += 1
        if seen[0] <= good:
            out, status = json.dumps({"scores": [float(len(p["response"].split())) for p in body["pairs"]]}), 200
        elif mode == "500":
            out, status = "the judge fell over", 500
        elif mode == "json":
            out, status = "{\"scores\": [1.0,", 200
        else:
            time.sleep(5); out, status = "{}", 200
        data = out.encode()
        try:
            self.send_response(status); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:
            pass
server = HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

#[test]
fn a_remote_reward_that_fails_after_its_retries_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_policy(dir.path());
    let prompts = prompt_file(dir.path());
    for (mode, expected) in [("500", "HTTP 500"), ("json", "scores"), ("timeout", "timed out after 1 s")] {
        let mut server =
            Command::new(python()).args(["-c", FLAKY_SERVER, mode, "3"]).stdout(Stdio::piped()).spawn().unwrap();
        let mut port = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut port).unwrap();
        let recipe = ppo_recipe(dir.path(), &policy, &prompts, 6, "");
        let remote = format!(
            "rewards:\n  - name: judge\n    uses: rlhf.remote\n    config: {{url: 'http://127.0.0.1:{}/score', timeout_s: 1.0, retries: 1, backoff_s: 0.05}}\n",
            port.trim()
        );
        let text = std::fs::read_to_string(&recipe).unwrap();
        let (head, rest) = text.split_once("rewards:\n").unwrap();
        let stages = &rest[rest.find("stages:").unwrap()..];
        std::fs::write(&recipe, format!("{head}{remote}{}", stages.replace("reward: ten_words", "reward: judge")))
            .unwrap();
        let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--overwrite"]);
        server.kill().unwrap();
        let _ = server.wait();
        assert!(!out.status.success(), "{mode}");
        let err = stderr(&out);
        assert!(
            err.contains("reward `judge`") && err.contains("2 attempts") && err.contains(expected),
            "{mode}: {err}"
        );
        let saved = dir.path().join("run/ppo/checkpoints/step-00000002");
        assert!(
            saved.join("model.safetensors").is_file() && saved.join("value/optimizer.safetensors").is_file(),
            "{mode}"
        );
        assert!(!dir.path().join("run/ppo/checkpoints/step-00000004").exists(), "{mode}");
    }
}

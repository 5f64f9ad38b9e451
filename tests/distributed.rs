//! Distributed runs through the `plumb` binary: `plumb run --nproc N` launches the ranks,
//! rank and world size reach stages, rank 0 alone reports, and a failing rank ends the run.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn recipe(dir: &std::path::Path, stages: &str) -> std::path::PathBuf {
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 5\n  device: cpu\nplugins:\n  - name: probe\n    path: {probe}\nstages:\n{stages}",
        out = dir.join("run").display(),
        probe = library("libplumb_probe.so").display(),
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `dir/recipe.yaml`: a tiny pretraining stage of `steps` steps on a corpus of `documents`
/// documents, seed 5, on `device`, into `dir/run`.
fn pretrain_recipe(dir: &std::path::Path, documents: usize, steps: u32, device: &str) -> std::path::PathBuf {
    let corpus = small_corpus(dir, documents);
    let stages = tiny_pretrain_stage("pretrain", &corpus, steps);
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 5\n  device: {device}\nplugins:\n  - name: pretrain\nstages:\n{stages}",
        out = dir.join("run").display()
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn report(dir: &std::path::Path, stage: &str) -> serde_json::Value {
    stage_report(&dir.join("run"), stage)
}

#[test]
fn nproc_runs_every_rank_and_rank_0_alone_reports() {
    let dir = tempfile::tempdir().unwrap();
    let stages = "  - name: first\n    uses: probe.collective\n  - name: second\n    uses: probe.collective\n";
    let path = recipe(dir.path(), stages);
    let out =
        plumb_with_env(dir.path(), &["run", path.to_str().unwrap(), "--nproc", "3"], &[("PLUMB_DIST_TIMEOUT", "30")]);
    assert_exit(&out, 0);
    // Each stage made its own group of all 3 ranks: 1 + 2 + 3.
    for stage in ["first", "second"] {
        assert_eq!(
            report(dir.path(), stage)["metrics"],
            serde_json::json!({"rank": 0.0, "world_size": 3.0, "sum": 6.0})
        );
        assert_eq!(stdout(&out).matches(&format!("stage {stage} finished")).count(), 1, "{}", stdout(&out));
        // One TensorBoard file, rank 0's.
        let events = std::fs::read_dir(dir.path().join("run/tb").join(stage)).unwrap().count();
        assert_eq!(events, 1, "tb/{stage}");
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_the_run_exits_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let stages = "  - name: first\n    uses: probe.collective\n    config:\n      fail_on_rank: 1\n";
    let path = recipe(dir.path(), stages);
    let start = Instant::now();
    let out =
        plumb_with_env(dir.path(), &["run", path.to_str().unwrap(), "--nproc", "3"], &[("PLUMB_DIST_TIMEOUT", "20")]);
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("rank 1 fails on purpose"), "{}", stderr(&out));
    // The others' next collective fails as rank 1 leaves; whichever exit the launcher sees
    // first stops the rest.
    let stopping = stderr(&out).lines().filter(|l| l.starts_with("plumb run --nproc: rank ")).count();
    assert_eq!(stopping, 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("exited with code 1; stopping the other ranks"), "{}", stderr(&out));
}

#[test]
fn bad_launch_variables_are_an_error_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = recipe(dir.path(), "  - name: first\n    uses: probe.collective\n");
    let env = [("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29400")];
    let out = plumb_with_env(dir.path(), &["run", path.to_str().unwrap()], &env);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("RANK=\"2\": expected a rank below WORLD_SIZE=2"), "{}", stderr(&out));

    // --nproc launches the ranks itself.
    let out = plumb_with_env(dir.path(), &["run", path.to_str().unwrap(), "--nproc", "2"], &env);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("--nproc starts the ranks itself, but RANK is already set"), "{}", stderr(&out));
}

/// Data-parallel pretraining: 2 ranks, each on half of every global batch of 8 rows, follow
/// the 1-rank run's losses step by step (to fp32 tolerance), and rank 0 alone writes the
/// final model.
#[test]
fn two_ranks_train_as_one_on_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = pretrain_recipe(dir.path(), 200, 6, "cpu");
    let run = |nproc: &str, out: &str| {
        let args =
            ["run", path.to_str().unwrap(), &format!("run.output_dir={out}"), "stages.pretrain.config.log_every=1"];
        let mut args: Vec<&str> = args.to_vec();
        if nproc != "1" {
            args.extend(["--nproc", nproc]);
        }
        let output = plumb_with_env(dir.path(), &args, &[("PLUMB_DIST_TIMEOUT", "60")]);
        assert_exit(&output, 0);
        train_losses(&dir.path().join(out).join("tb/pretrain"))
    };
    let single = run("1", "one");
    let double = run("2", "two");
    assert_eq!(single.len(), 6, "{single:?}");
    assert_eq!(single.iter().map(|s| s.0).collect::<Vec<_>>(), double.iter().map(|s| s.0).collect::<Vec<_>>());
    for ((step, a), (_, b)) in single.iter().zip(&double) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "step {step}: 1 rank {a}, 2 ranks {b}");
    }
    assert!(dir.path().join("two/pretrain/final/model.safetensors").is_file());
}

/// Data-parallel pretraining on a GPU under the launcher, at world size 1 (NCCL refuses two
/// ranks on one GPU, so one rank is what a one-GPU machine can run): the stage's group has
/// NCCL attached on cuda:0, the gradients go through it, and the model learns
/// and is saved. Skipped where libtorch sees no GPU. Runs from a copy of this test binary
/// with `PLUMB_BIN` and `PLUMB_REPO_ROOT` set where cargo's paths do not exist (`devrun/nccl.sh`).
#[test]
fn one_rank_pretrains_on_cuda_with_nccl_attached() {
    if plumb_core::tch::Cuda::device_count() == 0 {
        eprintln!(
            "one_rank_pretrains_on_cuda_with_nccl_attached: skipped: libtorch sees no CUDA device (NCCL needs one)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = pretrain_recipe(dir.path(), 300, 8, "cuda");
    let out =
        plumb_with_env(dir.path(), &["run", path.to_str().unwrap(), "--nproc", "1"], &[("PLUMB_DIST_TIMEOUT", "60")]);
    assert_exit(&out, 0);
    let log = stderr(&out);
    // The stage's group (its gradients and statistics).
    assert!(log.contains("rank 0 of 1: NCCL attached on cuda:0 for group stage/pretrain/0"), "{log}");
    assert!(log.contains("on cuda:0 into"), "the run's device: {log}");
    let report = stage_report(&dir.path().join("run"), "pretrain");
    let (initial, last) =
        (report["metrics"]["eval/initial_loss"].as_f64().unwrap(), report["metrics"]["eval/loss"].as_f64().unwrap());
    assert!(last < initial - 0.5, "eval/loss {initial} -> {last}");
    assert!(dir.path().join("run/pretrain/final/model.safetensors").is_file());
}

/// ZeRO-1 end to end: 2 ranks with `optimizer.zero_stage: 1` follow the plain 2-rank run's
/// losses, each holding less optimizer state, and their checkpoint holds the whole state:
/// one plain process resumes it at step 3 and follows the plain run's losses to the end.
#[test]
fn two_ranks_with_sharded_optimizer_state_train_as_without() {
    let dir = tempfile::tempdir().unwrap();
    let path = pretrain_recipe(dir.path(), 200, 6, "cpu");
    let run = |nproc: &str, out: &str, zero: &str, resume: bool| {
        let output_dir = format!("run.output_dir={out}");
        let zero = format!("stages.pretrain.config.optimizer.zero_stage={zero}");
        let mut args = vec![
            "run",
            path.to_str().unwrap(),
            &output_dir,
            &zero,
            "stages.pretrain.config.log_every=1",
            "stages.pretrain.config.checkpoint.every=3",
        ];
        if nproc != "1" {
            args.extend(["--nproc", nproc]);
        }
        if resume {
            args.push("--resume");
        }
        let output = plumb_with_env(dir.path(), &args, &[("PLUMB_DIST_TIMEOUT", "60")]);
        assert_exit(&output, 0);
        if resume {
            assert!(stderr(&output).contains("resuming from step 3"), "{}", stderr(&output));
        }
        let run = dir.path().join(out);
        let report = stage_report(&run, "pretrain");
        Ranked { events: read_tensorboard(&run.join("tb/pretrain")), metrics: report["metrics"].clone() }
    };
    let plain = run("2", "plain", "0", false);
    let sharded = run("2", "sharded", "1", false);
    assert_same_curve(&plain, &sharded, "train/loss", 1e-5);
    assert_same_metric(&plain, &sharded, "train/loss", 1e-5);
    let bytes = |r: &Ranked| r.metrics["train/optimizer_state_bytes"].as_f64().expect("optimizer state bytes");
    let (full, shard) = (bytes(&plain), bytes(&sharded));
    eprintln!("optimizer state per rank: {full} bytes plain, {shard} bytes ZeRO-1 (2 ranks)");
    assert!(shard < 0.6 * full && shard > 0.4 * full, "{shard} of {full}");

    // Resume the sharded run's step-3 checkpoint in one process, unsharded (TensorBoard
    // drops the first run's points past step 3, where the resumed run restarts).
    let step_6 = dir.path().join("sharded/pretrain/checkpoints/step-00000006");
    assert!(!step_6.exists(), "only step 3 is checkpointed");
    assert!(dir.path().join("sharded/pretrain/checkpoints/step-00000003/optimizer.safetensors").is_file());
    // (Without its report, the stage counts as unfinished and --resume runs it again.)
    std::fs::remove_file(dir.path().join("sharded/pretrain/report.json")).unwrap();
    let resumed = run("1", "sharded", "0", true);
    let tail = |r: &Ranked| r.scalars("train/loss").into_iter().filter(|p| p.0 > 3).collect::<Vec<_>>();
    let (a, b) = (tail(&plain), tail(&resumed));
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), b.iter().map(|p| p.0).collect::<Vec<_>>());
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "step {step}: plain {x}, resumed from ZeRO-1 {y}");
    }
}

/// A model pretrained in `dir/base` (one process, 2 steps), for the fine-tuning stages to start from.
fn pretrained_base(dir: &std::path::Path) -> std::path::PathBuf {
    let corpus = small_corpus(dir, 100);
    let recipe = dir.join("base.yaml");
    let stages = tiny_pretrain_stage("pretrain", &corpus, 2);
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{stages}",
        out = dir.join("base").display(),
    );
    std::fs::write(&recipe, text).unwrap();
    assert_exit(&plumb(dir, &["run", recipe.to_str().unwrap()]), 0);
    dir.join("base/pretrain/final")
}

/// The first `n` lines of a shipped JSONL file, written into `dir`.
fn shipped_lines(dir: &std::path::Path, file: &str, n: usize) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data").join(file)).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    path
}

/// `plumb run` of `recipe` into `dir/out` on `nproc` ranks, with `extra` arguments; its output.
fn run_in(
    dir: &std::path::Path,
    recipe: &std::path::Path,
    out: &str,
    nproc: usize,
    extra: &[&str],
) -> std::process::Output {
    let output_dir = format!("run.output_dir={out}");
    let nproc = nproc.to_string();
    let mut args = vec!["run", recipe.to_str().unwrap(), &output_dir];
    if nproc != "1" {
        args.extend(["--nproc", &nproc]);
    }
    args.extend(extra);
    plumb_with_env(dir, &args, &[("PLUMB_DIST_TIMEOUT", "60")])
}

/// What one run of stage `stage` of `recipe` on `nproc` ranks into `dir/out` leaves:
/// TensorBoard's events and the report's metrics.
fn run_ranks(dir: &std::path::Path, recipe: &std::path::Path, stage: &str, nproc: usize, out: &str) -> Ranked {
    assert_exit(&run_in(dir, recipe, out, nproc, &[]), 0);
    let run = dir.join(out);
    let report = stage_report(&run, stage);
    Ranked { events: read_tensorboard(&run.join("tb").join(stage)), metrics: report["metrics"].clone() }
}

struct Ranked {
    events: serde_json::Value,
    metrics: serde_json::Value,
}

impl Ranked {
    /// The (step, value) points of scalar `tag`.
    fn scalars(&self, tag: &str) -> Vec<(i64, f64)> {
        let points = self.events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag}"));
        points.iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap())).collect()
    }
}

/// `tag`'s points of the two runs are at the same steps and equal to `tolerance` (relative).
fn assert_same_curve(one: &Ranked, two: &Ranked, tag: &str, tolerance: f64) {
    let (a, b) = (one.scalars(tag), two.scalars(tag));
    assert_eq!(a.iter().map(|p| p.0).collect::<Vec<_>>(), b.iter().map(|p| p.0).collect::<Vec<_>>(), "{tag}");
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= tolerance * x.abs().max(1e-3), "{tag} at step {step}: 1 rank {x}, 2 ranks {y}");
    }
}

/// Report metric `key` of the two runs, equal to `tolerance` (relative).
fn assert_same_metric(one: &Ranked, two: &Ranked, key: &str, tolerance: f64) {
    let value = |r: &Ranked| r.metrics[key].as_f64().unwrap_or_else(|| panic!("no {key}: {}", r.metrics));
    let (x, y) = (value(one), value(two));
    assert!((x - y).abs() <= tolerance * x.abs().max(1e-3), "{key}: 1 rank {x}, 2 ranks {y}");
}

/// Data-parallel SFT: from one pretrained model, 2 ranks, each on its share of every global
/// batch of 5 examples (3 and 2, so their target counts differ), follow the 1-rank run's
/// losses step by step (to fp32 tolerance), count the same tokens and batch, and report
/// the same held-out losses (each rank scores its share of the held-out examples).
#[test]
fn two_ranks_fine_tune_as_one_on_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = pretrained_base(dir.path());
    let data = shipped_lines(dir.path(), "tiny_tales_sft.jsonl", 60);
    let recipe = dir.path().join("sft.yaml");
    let text = format!(
        "run:\n  output_dir: one\n  seed: 5\n  device: cpu\nplugins:\n  - name: sft\nstages:\n  - name: sft\n    uses: sft.sft\n    model: {model}\n    config:\n      data: {{train: {data}, format: alpaca, validation_fraction: 0.2}}\n      max_length: 64\n      batch_size: 5\n      max_steps: 5\n      log_every: 1\n      optimizer: {{lr: 1.0e-3}}\n      eval: {{every: 5, num_prompts: 0, max_batches: 3}}\n",
        model = model.display(),
        data = data.display(),
    );
    std::fs::write(&recipe, text).unwrap();
    let one = run_ranks(dir.path(), &recipe, "sft", 1, "one");
    let two = run_ranks(dir.path(), &recipe, "sft", 2, "two");
    assert_eq!(one.scalars("train/loss").len(), 5);
    assert_same_curve(&one, &two, "train/loss", 1e-4);
    // The global batch and its tokens, summed over the ranks.
    assert_eq!(two.scalars("train/batch_size"), one.scalars("train/batch_size"));
    assert_eq!(two.scalars("train/batch_size")[0].1, 5.0);
    assert_eq!(two.metrics["train/tokens"], one.metrics["train/tokens"]);
    for key in ["eval/initial_loss", "eval/loss"] {
        assert_same_metric(&one, &two, key, 1e-5);
    }
    assert!(dir.path().join("two/sft/final/model.safetensors").is_file());
}

/// A recipe (`dir/{stage}.yaml`, writing to `dir/one`) of the one `rlhf` stage `stage`
/// (`uses`) from `model`, trained on 40 shipped preference pairs (a quarter held out), with
/// the further `config` lines.
fn pairs_recipe(
    dir: &std::path::Path,
    model: &std::path::Path,
    stage: &str,
    uses: &str,
    config: &str,
) -> std::path::PathBuf {
    let data = shipped_lines(dir, "tiny_tales_prefs.jsonl", 40);
    let recipe = dir.join(format!("{stage}.yaml"));
    let text = format!(
        "run:\n  output_dir: one\n  seed: 5\n  device: cpu\nplugins:\n  - name: rlhf\nstages:\n  - name: {stage}\n    uses: {uses}\n    model: {model}\n    config:\n      data: {{train: {data}, validation_fraction: 0.25}}\n{config}",
        model = model.display(),
        data = data.display(),
    );
    std::fs::write(&recipe, text).unwrap();
    recipe
}

/// Data-parallel reward modelling: 2 ranks, each on its share of every global batch of 5
/// pairs, follow the 1-rank run's loss and train figures (accuracy, margin, rewards: over
/// the global batch), and report the same held-out figures.
#[test]
fn two_ranks_train_a_reward_model_as_one_on_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = pretrained_base(dir.path());
    let config = "      max_length: 48\n      batch_size: 5\n      max_steps: 4\n      log_every: 1\n      optimizer: {lr: 1.0e-3}\n      eval: {every: 4}\n";
    let recipe = pairs_recipe(dir.path(), &model, "reward_model", "rlhf.reward_model", config);
    let one = run_ranks(dir.path(), &recipe, "reward_model", 1, "one");
    let two = run_ranks(dir.path(), &recipe, "reward_model", 2, "two");
    assert_eq!(one.scalars("train/loss").len(), 4);
    for tag in ["train/loss", "train/margin", "train/mean_reward", "train/min_reward", "train/max_reward"] {
        assert_same_curve(&one, &two, tag, 1e-4);
    }
    assert_eq!(two.scalars("train/accuracy"), one.scalars("train/accuracy"));
    assert_eq!(two.metrics["train/tokens"], one.metrics["train/tokens"]);
    for key in ["eval/initial_loss", "eval/loss", "eval/margin", "eval/min_reward", "eval/max_reward"] {
        assert_same_metric(&one, &two, key, 1e-5);
    }
    assert_eq!(two.metrics["eval/accuracy"], one.metrics["eval/accuracy"]);
}

/// Data-parallel DPO: 2 ranks, each on its share of every global batch of 5 pairs, follow
/// the 1-rank run's loss and figures (implicit rewards, log-probs, accuracy: over the
/// global batch), and report the same held-out figures.
#[test]
fn two_ranks_run_dpo_as_one_on_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = pretrained_base(dir.path());
    let config = "      max_prompt_length: 24\n      max_length: 48\n      batch_size: 5\n      max_steps: 3\n      log_every: 1\n      optimizer: {lr: 1.0e-3}\n      eval: {every: 3}\n";
    let recipe = pairs_recipe(dir.path(), &model, "dpo", "rlhf.dpo", config);
    let one = run_ranks(dir.path(), &recipe, "dpo", 1, "one");
    let two = run_ranks(dir.path(), &recipe, "dpo", 2, "two");
    assert_eq!(one.scalars("train/loss").len(), 3);
    for tag in ["train/loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"] {
        assert_same_curve(&one, &two, tag, 1e-4);
    }
    assert_eq!(two.scalars("rewards/accuracies"), one.scalars("rewards/accuracies"));
    assert_eq!(two.metrics["train/tokens"], one.metrics["train/tokens"]);
    for key in ["eval/loss", "eval/rewards/margins", "eval/logps/chosen"] {
        assert_same_metric(&one, &two, key, 1e-4);
    }
    assert_eq!(two.metrics["eval/rewards/accuracies"], one.metrics["eval/rewards/accuracies"]);
}

/// Story openings as PPO and GRPO prompts, one a line.
fn story_prompts(dir: &std::path::Path) -> std::path::PathBuf {
    let starts = ["One day, Lily", "Tom and his dog", "The sun was", "Once upon a time", "Mia found a", "The bird"];
    let lines: Vec<String> = starts.iter().cycle().take(24).map(|s| format!("{{\"prompt\": \"{s}\"}}")).collect();
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A recipe of one RL stage `stage` (`uses` and its config lines) from `model`, rewarded
/// for responses of five characters (0.1 off for each one more).
fn rl_recipe(
    dir: &std::path::Path,
    model: &std::path::Path,
    stage: &str,
    uses: &str,
    config: &str,
) -> std::path::PathBuf {
    let text = format!(
        "run:\n  output_dir: run\n  seed: 3\n  device: cpu\nplugins:\n  - name: rlhf\nrewards:\n  - name: short\n    uses: rlhf.length\n    config: {{unit: chars, target: 5, over: 0.1}}\nstages:\n  - name: {stage}\n    uses: {uses}\n    model: {model}\n    config:\n      data: {{train: {prompts}}}\n      reward: short\n      max_prompt_length: 16\n      temperature: 1.0\n      log_every: 1\n      optimizer: {{lr: 1.0e-3}}\n{config}",
        model = model.display(),
        prompts = story_prompts(dir).display(),
    );
    let path = dir.join(format!("{stage}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Data-parallel PPO: 2 ranks each roll out half of every global batch of 6 episodes; the
/// figures are of the global batch (its size, the first minibatch's ratio 1: every rank's
/// rollout log-probs agree with training's), rank 0 alone writes, and the 2-rank step-2
/// checkpoint resumes on 1 rank and on 3. A batch that does not split over the ranks is
/// refused naming the key.
#[test]
fn ppo_runs_data_parallel_and_its_checkpoint_resumes_on_other_world_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let model = pretrained_base(dir.path());
    let config = "      max_new_tokens: 8\n      batch_size: 6\n      num_minibatches: 1\n      ppo_epochs: 2\n      max_steps: 3\n      checkpoint: {every: 2, keep: 5}\n";
    let recipe = rl_recipe(dir.path(), &model, "ppo", "rlhf.ppo", config);
    let out = run_in(dir.path(), &recipe, "two", 2, &[]);
    assert_exit(&out, 0);
    let run = dir.path().join("two");
    let two = Ranked { events: read_tensorboard(&run.join("tb/ppo")), metrics: serde_json::Value::Null };
    assert_eq!(two.scalars("train/batch_size").iter().map(|p| p.1).collect::<Vec<_>>(), [6.0; 3]);
    for (step, ratio) in two.scalars("val/ratio_first_minibatch") {
        assert!((ratio - 1.0).abs() < 1e-4, "step {step}: first minibatch's ratio {ratio}");
    }
    assert_eq!(two.scalars("objective/scores").len(), 3);
    assert!(run.join("ppo/checkpoints/step-00000002/value/model.safetensors").is_file());
    assert!(run.join("ppo/final/model.safetensors").is_file());

    // The step-2 checkpoint, resumed on 1 rank and on 3 (2 episodes each).
    for (nproc, copy) in [(1, "on1"), (3, "on3")] {
        let status = std::process::Command::new("cp").arg("-r").arg(&run).arg(dir.path().join(copy)).status().unwrap();
        assert!(status.success());
        std::fs::remove_file(dir.path().join(copy).join("ppo/report.json")).unwrap();
        let out = run_in(dir.path(), &recipe, copy, nproc, &["--resume"]);
        assert_exit(&out, 0);
        assert!(stderr(&out).contains("resuming from step 2"), "{}", stderr(&out));
        let events = read_tensorboard(&dir.path().join(copy).join("tb/ppo"));
        let steps: Vec<i64> =
            events["scalars"]["train/batch_size"].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3], "{nproc} rank(s)");
    }

    let out = run_in(dir.path(), &recipe, "four", 4, &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("batch_size: 6 episodes do not split into 4 ranks × 1 minibatches of equal size"),
        "{}",
        stderr(&out)
    );
}

/// Data-parallel GRPO on 3 ranks with dynamic sampling: the 4 prompts of a step are shared
/// 2, 1, 1; the ranks agree on the groups kept (the batch trained on is every rank's kept
/// completions: `train/batch_size` is 2 × `sampling/groups`), and the run ends with one
/// final model.
#[test]
fn grpo_runs_data_parallel_over_unequal_shares() {
    let dir = tempfile::tempdir().unwrap();
    let model = pretrained_base(dir.path());
    let config = "      num_generations: 2\n      max_completion_length: 8\n      batch_size: 8\n      num_minibatches: 2\n      dynamic_sampling: {max_rounds: 3}\n      max_steps: 3\n";
    let recipe = rl_recipe(dir.path(), &model, "grpo", "rlhf.grpo", config);
    let out = run_in(dir.path(), &recipe, "three", 3, &[]);
    assert_exit(&out, 0);
    let run = dir.path().join("three");
    let events = Ranked { events: read_tensorboard(&run.join("tb/grpo")), metrics: serde_json::Value::Null };
    let groups = events.scalars("sampling/groups");
    let batch = events.scalars("train/batch_size");
    assert_eq!(groups.len(), 3);
    for ((step, g), (_, b)) in groups.iter().zip(&batch) {
        assert!(*g >= 1.0 && *g <= 4.0, "step {step}: {g} groups");
        assert_eq!(*b, 2.0 * g, "step {step}");
    }
    assert!(events.scalars("completions/mean_length").iter().all(|p| p.1 > 0.0));
    assert!(run.join("grpo/final/model.safetensors").is_file());
}

/// The pid of the rank `rank` that the launcher `launcher` started (its child with that
/// `RANK` in its environment), once it runs.
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    let wanted = format!("RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid ...: the fields after the command's closing parenthesis.
        let parent = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1));
        if parent != Some(&launcher.to_string()) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ.split(|&b| b == 0).any(|var| var == wanted.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// A rank killed (SIGKILL) in the middle of data-parallel training: the others do not hang;
/// the run ends well within the timeout, with the killed rank's code (128 + 9), and the
/// launcher names the rank that died.
#[test]
fn a_killed_rank_ends_the_run_within_the_timeout_naming_the_rank() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = endless_pretraining(dir.path());
    let log = dir.path().join("stderr.txt");
    let mut launcher = std::process::Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["run", recipe.to_str().unwrap(), "--nproc", "3"])
        .current_dir(dir.path())
        .env_remove("PLUMB_PLUGIN_PATH")
        .env("PLUMB_LOG", "info")
        .env("PLUMB_DIST_TIMEOUT", "20")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_training(dir.path(), &mut [&mut launcher], &log);
    let victim = rank_pid(launcher.id(), 2).expect("rank 2 runs");
    let killed = std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    assert!(killed.success());
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status;
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let _ = launcher.kill();
            panic!("the run hangs 60 s after rank 2 was killed:\n{}", read(&log));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = killed_at.elapsed();
    let text = read(&log);
    // The timeout (20 s) bounds the others' wait; the launcher's grace (10 s) its stop.
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{text}");
    assert_eq!(status.code(), Some(137), "{text}");
    assert!(text.contains("plumb run --nproc: rank 2 exited with code 137; stopping the other ranks"), "{text}");
}

/// A data-parallel pretraining recipe (in `dir`, writing to `dir/run`) that trains far
/// longer than a test waits.
fn endless_pretraining(dir: &std::path::Path) -> std::path::PathBuf {
    let corpus = small_corpus(dir, 200);
    let stages = tiny_pretrain_stage("pretrain", &corpus, 100_000);
    let recipe = dir.join("recipe.yaml");
    let text =
        format!("run:\n  output_dir: run\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{stages}");
    std::fs::write(&recipe, text).unwrap();
    recipe
}

/// Returns 2 s after the run in `dir` started training (rank 0 wrote its first events);
/// kills `processes` and panics with `log` when it does not within 60 s or one ends first.
fn wait_for_training(dir: &std::path::Path, processes: &mut [&mut std::process::Child], log: &std::path::Path) {
    let started = Instant::now();
    let events = dir.join("run/tb/pretrain");
    while !std::fs::read_dir(&events).is_ok_and(|mut d| d.next().is_some())
        || started.elapsed() < Duration::from_secs(3)
    {
        if started.elapsed() > Duration::from_secs(60) || processes.iter_mut().any(|p| p.try_wait().unwrap().is_some())
        {
            processes.iter_mut().for_each(|p| drop(p.kill()));
            panic!("training did not start, or a process ended early:\n{}", read(log));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Ranks started by hand with torchrun's variables (as on several nodes, no launcher to
/// watch them): when rank 2 is killed in the middle of training, the others end within the
/// timeout, each with an error that names rank 2 (its heartbeat stopped).
#[test]
fn ranks_without_a_launcher_name_the_rank_that_was_killed() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = endless_pretraining(dir.path());
    let port = free_port().to_string();
    let logs: Vec<_> = (0..3).map(|rank| dir.path().join(format!("rank{rank}.txt"))).collect();
    let mut ranks: Vec<std::process::Child> = (0..3)
        .map(|rank| {
            std::process::Command::new(env!("CARGO_BIN_EXE_plumb"))
                .args(["run", recipe.to_str().unwrap()])
                .current_dir(dir.path())
                .env_remove("PLUMB_PLUGIN_PATH")
                .envs([("RANK", rank.to_string()), ("LOCAL_RANK", rank.to_string())])
                .envs([("WORLD_SIZE", "3"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
                .env("PLUMB_DIST_TIMEOUT", "20")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&logs[rank]).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_for_training(dir.path(), &mut ranks.iter_mut().collect::<Vec<_>>(), &logs[0]);
    ranks[2].kill().unwrap();
    let killed_at = Instant::now();
    for rank in 0..2 {
        let status = loop {
            if let Some(status) = ranks[rank].try_wait().unwrap() {
                break status;
            }
            if killed_at.elapsed() > Duration::from_secs(60) {
                ranks.iter_mut().for_each(|r| drop(r.kill()));
                panic!("rank {rank} hangs 60 s after rank 2 was killed:\n{}", read(&logs[rank]));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = read(&logs[rank]);
        assert!(killed_at.elapsed() < Duration::from_secs(30), "took {:?}:\n{text}", killed_at.elapsed());
        assert_eq!(status.code(), Some(1), "{text}");
        assert!(text.contains("failed: ") && text.contains("rank 2 stopped answering (no heartbeat for "), "{text}");
    }
    let _ = ranks[2].wait();
}

/// Under torchrun (the real one, from the test Python's torch) the ranks use the store
/// torchrun's agent serves: rank 0 does not try to serve one of its own on MASTER_PORT, and
/// the stages' groups form and reduce.
#[test]
fn runs_under_torchrun_with_its_agent_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = recipe(dir.path(), "  - name: first\n    uses: probe.collective\n");
    let out = std::process::Command::new(python())
        .args(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python"])
        .args(["--master-addr", "127.0.0.1", "--master-port", &free_port().to_string()])
        .args([env!("CARGO_BIN_EXE_plumb"), "run", path.to_str().unwrap()])
        .current_dir(dir.path())
        .env_remove("PLUMB_PLUGIN_PATH")
        .env("PLUMB_DIST_TIMEOUT", "30")
        .output()
        .unwrap();
    assert_exit(&out, 0);
    assert_eq!(report(dir.path(), "first")["metrics"], serde_json::json!({"rank": 0.0, "world_size": 2.0, "sum": 3.0}));
    assert!(!stderr(&out).contains("failed to bind"), "rank 0 tried to serve a store:\n{}", stderr(&out));
}

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

fn report(dir: &std::path::Path, stage: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("run").join(stage).join("report.json")).unwrap()).unwrap()
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
    let corpus = small_corpus(dir.path(), 200);
    let stages = tiny_pretrain_stage("pretrain", &corpus, 6);
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{stages}",
        out = dir.path().join("run").display()
    );
    let path = dir.path().join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
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

/// Data-parallel SFT: from one pretrained model, 2 ranks, each on its share of every global
/// batch of 5 examples (3 and 2, so their target counts differ), follow the 1-rank run's
/// losses step by step (to fp32 tolerance), count the same tokens and batch, and report
/// the same held-out losses (each rank scores its share of the held-out examples).
#[test]
fn two_ranks_fine_tune_as_one_on_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let corpus = small_corpus(dir.path(), 100);
    let base = write(
        "base.yaml",
        format!(
            "run:\n  output_dir: {out}\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{stages}",
            out = dir.path().join("base").display(),
            stages = tiny_pretrain_stage("pretrain", &corpus, 2),
        ),
    );
    assert_exit(&plumb(dir.path(), &["run", base.to_str().unwrap()]), 0);
    let shipped = std::fs::read_to_string(repo_root().join("data/tiny_tales_sft.jsonl")).unwrap();
    let data = write("instructions.jsonl", shipped.lines().take(60).collect::<Vec<_>>().join("\n") + "\n");
    let recipe = write(
        "sft.yaml",
        format!(
            "run:\n  output_dir: one\n  seed: 5\n  device: cpu\nplugins:\n  - name: sft\nstages:\n  - name: sft\n    uses: sft.sft\n    model: {model}\n    config:\n      data: {{train: {data}, format: alpaca, validation_fraction: 0.2}}\n      max_length: 64\n      batch_size: 5\n      max_steps: 5\n      log_every: 1\n      optimizer: {{lr: 1.0e-3}}\n      eval: {{every: 5, num_prompts: 0, max_batches: 3}}\n",
            model = dir.path().join("base/pretrain/final").display(),
            data = data.display(),
        ),
    );
    let run = |nproc: &str, out: &str| {
        let output_dir = format!("run.output_dir={out}");
        let mut args = vec!["run", recipe.to_str().unwrap(), &output_dir];
        if nproc != "1" {
            args.extend(["--nproc", nproc]);
        }
        let output = plumb_with_env(dir.path(), &args, &[("PLUMB_DIST_TIMEOUT", "60")]);
        assert_exit(&output, 0);
        let run = dir.path().join(out);
        let events = read_tensorboard(&run.join("tb/sft"));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("sft/report.json")).unwrap()).unwrap();
        (train_losses(&run.join("tb/sft")), events, report["metrics"].clone())
    };
    let (single, single_events, single_metrics) = run("1", "one");
    let (double, double_events, double_metrics) = run("2", "two");
    assert_eq!(single.len(), 5, "{single:?}");
    assert_eq!(single.iter().map(|s| s.0).collect::<Vec<_>>(), double.iter().map(|s| s.0).collect::<Vec<_>>());
    for ((step, a), (_, b)) in single.iter().zip(&double) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "step {step}: 1 rank {a}, 2 ranks {b}");
    }
    // The global batch and its tokens, summed over the ranks.
    assert_eq!(double_events["scalars"]["train/batch_size"], single_events["scalars"]["train/batch_size"]);
    assert_eq!(double_events["scalars"]["train/batch_size"][0][1], 5.0);
    assert_eq!(double_metrics["train/tokens"], single_metrics["train/tokens"]);
    for key in ["eval/initial_loss", "eval/loss"] {
        let (a, b) = (single_metrics[key].as_f64().unwrap(), double_metrics[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{key}: 1 rank {a}, 2 ranks {b}");
    }
    assert!(dir.path().join("two/sft/final/model.safetensors").is_file());
}

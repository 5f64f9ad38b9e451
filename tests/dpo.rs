//! DPO end to end through the binary, on a tiny model pretrained in the test and the
//! shipped rule-following preference pairs (the chosen continuation finishes its
//! sentence): the implicit reward ranks held-out pairs far above chance (it ranks none at
//! the start, where the policy is the reference) and the held-out loss falls; precomputed and
//! on-the-fly reference log-probs give the same losses; a run resumed from a checkpoint
//! continues the same trajectory; `plumb validate` refuses bad settings with their key.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A tiny causal LM (pretrained a few steps on the shipped stories) in `dir/base/pretrain/final`.
fn tiny_policy(dir: &Path) -> PathBuf {
    let corpus = small_corpus(dir, 300);
    let recipe = dir.join("base.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: {}\n  seed: 5\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{}",
            dir.join("base").display(),
            tiny_pretrain_stage("pretrain", &corpus, 16)
        ),
    )
    .unwrap();
    assert_exit(&plumb(dir, &["run", recipe.to_str().unwrap()]), 0);
    dir.join("base/pretrain/final")
}

/// The shipped pairs split into `train` and `validation` files in `dir`.
fn split_prefs(dir: &Path, train: usize, validation: usize) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(repo_root().join("data/tiny_tales_prefs.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let write = |name: &str, lines: &[&str]| {
        let path = dir.join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    };
    (write("train.jsonl", &lines[..train]), write("validation.jsonl", &lines[train..train + validation]))
}

/// A DPO recipe on `model` writing to `dir/<out>`, with `config` lines (indented) added.
fn dpo_recipe(dir: &Path, out: &str, model: &Path, data: (&Path, &Path), config: &str) -> PathBuf {
    let recipe = dir.join(format!("{out}.yaml"));
    std::fs::write(
        &recipe,
        format!(
            r#"run:
  output_dir: {out}
  seed: 3
  device: cpu
plugins:
  - name: rlhf
stages:
  - name: dpo
    uses: rlhf.dpo
    model: {model}
    config:
      data: {{train: {train}, validation: {validation}}}
      max_prompt_length: 48
      max_length: 96
      micro_batch_size: 8
      optimizer: {{lr: 3.0e-3, weight_decay: 0.0}}
{config}"#,
            out = dir.join(out).display(),
            model = model.display(),
            train = data.0.display(),
            validation = data.1.display(),
        ),
    )
    .unwrap();
    recipe
}

fn report(run: &Path) -> serde_json::Value {
    stage_report(run, "dpo")
}

fn series(events: &serde_json::Value, tag: &str) -> Vec<(i64, f64)> {
    let values = events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag}"));
    values.iter().map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap())).collect()
}

#[test]
fn dpo_learns_the_preference_rule_and_ranks_held_out_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_policy(dir.path());
    let (train, validation) = split_prefs(dir.path(), 320, 80);
    let config = "      beta: 0.1\n      precompute_ref_log_probs: true\n      batch_size: 16\n      max_steps: 40\n      log_every: 10\n      eval: {every: 20}\n";
    let recipe = dpo_recipe(dir.path(), "run", &model, (&train, &validation), config);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("the reference model is freed"), "{}", stderr(&out));
    let run = dir.path().join("run");
    let metrics = &report(&run)["metrics"];
    println!("{metrics}");

    // Held out: the implicit reward ranks most pairs right (it ranks none at the start,
    // where policy and reference are one), and the loss fell below log 2.
    let accuracy = metrics["eval/rewards/accuracies"].as_f64().unwrap();
    assert!(accuracy >= 0.75, "eval/rewards/accuracies {accuracy}: {metrics}");
    assert!(metrics["eval/rewards/margins"].as_f64().unwrap() > 0.0, "{metrics}");
    assert!(metrics["eval/loss"].as_f64().unwrap() < 0.6, "{metrics}");
    assert_eq!(metrics["data/validation_pairs"], 80.0);

    // TensorBoard: TRL's figures at each log step, the held-out ones at each evaluation.
    let events = read_tensorboard(&run.join("tb/dpo"));
    for name in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        let steps: Vec<i64> = series(&events, name).iter().map(|s| s.0).collect();
        assert_eq!(steps, [10, 20, 30, 40], "{name}");
        let steps: Vec<i64> = series(&events, &format!("eval/{name}")).iter().map(|s| s.0).collect();
        assert_eq!(steps, [0, 20, 40], "eval/{name}");
    }
    // At step 0 the policy is the reference: every implicit reward is 0, the loss log 2.
    assert_eq!(series(&events, "eval/rewards/margins")[0].1, 0.0);
    assert!((series(&events, "eval/loss")[0].1 - 2f64.ln()).abs() < 1e-6);
    // Training pairs: accuracy and margin rise.
    let train_accuracy = series(&events, "rewards/accuracies");
    assert!(train_accuracy[3].1 > train_accuracy[0].1, "{train_accuracy:?}");
    let margins = series(&events, "rewards/margins");
    assert!(margins[3].1 > margins[0].1 && margins[3].1 > 0.0, "{margins:?}");
    assert!(run.join("dpo/final/model.safetensors").is_file());
}

#[test]
fn precomputed_reference_log_probs_equal_the_reference_models_and_a_resumed_run_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_policy(dir.path());
    let (train, validation) = split_prefs(dir.path(), 64, 16);
    let config = "      batch_size: 8\n      max_steps: 8\n      log_every: 1\n      checkpoint: {every: 4}\n      eval: {every: 8}\n";
    let live = dpo_recipe(dir.path(), "live", &model, (&train, &validation), config);
    assert_exit(&plumb(dir.path(), &["run", live.to_str().unwrap()]), 0);
    let precomputed = format!("{config}      precompute_ref_log_probs: true\n");
    let pre = dpo_recipe(dir.path(), "pre", &model, (&train, &validation), &precomputed);
    assert_exit(&plumb(dir.path(), &["run", pre.to_str().unwrap()]), 0);
    let (a, b) = (train_losses(&dir.path().join("live/tb/dpo")), train_losses(&dir.path().join("pre/tb/dpo")));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 1e-4, "live {a:?} vs precomputed {b:?}");
    }

    // As if the run had died after the step-4 checkpoint: no final model, no report.
    let run = dir.path().join("live");
    assert!(run.join("dpo/checkpoints/step-00000004/trainer_state.json").is_file());
    let expected = report(&run)["metrics"]["eval/rewards/accuracies"].as_f64().unwrap();
    std::fs::remove_dir_all(run.join("dpo/final")).unwrap();
    std::fs::remove_file(run.join("dpo/report.json")).unwrap();
    let out = plumb(dir.path(), &["run", live.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 4"), "{}", stderr(&out));
    assert_eq!(train_losses(&run.join("tb/dpo")), a, "steps 5-8 after resuming differ from the uninterrupted run");
    assert_eq!(report(&run)["metrics"]["eval/rewards/accuracies"].as_f64().unwrap(), expected);
}

#[test]
fn ipo_and_label_smoothing_train_and_validate_refuses_bad_settings_with_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_policy(dir.path());
    let (train, validation) = split_prefs(dir.path(), 32, 8);
    let base = "      batch_size: 8\n      max_steps: 2\n      log_every: 1\n";
    for (name, extra) in
        [("ipo", "      loss_type: ipo\n      beta: 0.5\n"), ("smooth", "      label_smoothing: 0.1\n")]
    {
        let recipe = dpo_recipe(dir.path(), name, &model, (&train, &validation), &format!("{base}{extra}"));
        assert_exit(&plumb(dir.path(), &["run", recipe.to_str().unwrap()]), 0);
        let loss = train_losses(&dir.path().join(name).join("tb/dpo"));
        assert!(loss.iter().all(|l| l.1.is_finite()), "{name}: {loss:?}");
    }
    // IPO at the start: (0 − 1/(2β))² = 1 with β 0.5, whatever the pairs.
    let ipo = train_losses(&dir.path().join("ipo/tb/dpo"));
    assert!((ipo[0].1 - 1.0).abs() < 1e-6, "{ipo:?}");

    for (extra, expected) in [
        ("      beta: 0\n", "beta: expected a number above 0"),
        ("      loss_type: ipo\n      label_smoothing: 0.1\n", "label_smoothing: only with loss_type: sigmoid"),
        ("      label_smoothing: 0.5\n", "label_smoothing: expected a number in [0, 0.5)"),
        ("      max_length: 48\n", "max_length: expected more than max_prompt_length 48"),
        ("      loss_type: hinge\n", "loss_type"),
    ] {
        let recipe = dpo_recipe(dir.path(), "bad", &model, (&train, &validation), &format!("{base}{extra}"));
        let text = std::fs::read_to_string(&recipe).unwrap();
        // A later key replaces an earlier one of the same name.
        let text = if extra.contains("max_length") { text.replace("      max_length: 96\n", "") } else { text };
        std::fs::write(&recipe, text).unwrap();
        let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
        assert_exit(&out, 1);
        assert!(stderr(&out).contains(expected), "{extra}: {}", stderr(&out));
    }
}

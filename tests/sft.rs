//! Supervised fine-tuning end to end: from the pretrain stage's output and from an
//! HF-layout checkpoint made by transformers, through the shipped recipes; the saved
//! model loads in transformers with the template it was tuned on.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The first `n` lines of the shipped instruction data.
fn small_instructions(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/tiny_tales_sft.jsonl")).unwrap();
    let path = dir.join("instructions.jsonl");
    std::fs::write(&path, text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    path
}

/// Runs `script` with the test Python, `args` after it; its stdout.
fn python_out(script: &str, args: &[&Path]) -> String {
    let out = std::process::Command::new(python()).arg("-c").arg(script).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// transformers loads `model` and answers `prompt` through the saved chat template.
const ANSWER_WITH_TRANSFORMERS: &str = r#"
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
text = tok.apply_chat_template([{"role": "user", "content": "Write a short story about Mia and Leo at the beach."}],
                               tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
out = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=4, do_sample=False)
print(json.dumps({"prompt": text, "new_tokens": out.shape[1] - ids.shape[1]}))
"#;

#[test]
fn sft_after_pretraining_learns_the_answer_format_and_saves_a_model_transformers_loads() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 300);
    let instructions = small_instructions(dir.path(), 240);
    let recipe = dir.path().join("recipe.yaml");
    let sft = format!(
        r#"  - name: sft
    uses: sft.sft
    config:
      data:
        train: {instructions}
        format: alpaca
        validation_fraction: 0.1
      max_length: 96
      batching: pack
      batch_size: 4
      micro_batch_size: 2
      max_steps: 80
      optimizer:
        lr: 1.0e-2
      schedule:
        warmup_steps: 2
      log_every: 20
      eval:
        every: 40
        num_prompts: 4
        max_new_tokens: 24
        response_pattern: '^Title: '
        sample_prompts: ["Write a short story about Mia and Leo at the beach."]
"#,
        instructions = instructions.display()
    );
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: {out}\n  seed: 3\n  device: cpu\nplugins:\n  - name: pretrain\n  - name: sft\nstages:\n{pretrain}{sft}",
            out = dir.path().join("run").display(),
            pretrain = tiny_pretrain_stage("pretrain", &corpus, 16),
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let run = dir.path().join("run");

    // Held-out loss fell from where the pretrained model started, and the answers took the format.
    let metrics = &stage_report(&run, "sft")["metrics"];
    let (before, after) = (metrics["eval/initial_loss"].as_f64().unwrap(), metrics["eval/loss"].as_f64().unwrap());
    assert!(after < before - 0.5, "eval/loss {before} -> {after}");
    assert_eq!(metrics["eval/initial_format_compliance"], 0.0, "the pretrained model never writes titles");
    assert!(metrics["eval/format_compliance"].as_f64().unwrap() > 0.0, "{metrics}");

    // TensorBoard: losses, compliance and the answers as text at every evaluation.
    let events = read_tensorboard(&run.join("tb/sft"));
    let steps = |tag: &str| -> Vec<i64> {
        events["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("{tag} missing"))
            .iter()
            .map(|e| e[0].as_i64().unwrap())
            .collect()
    };
    assert_eq!(steps("eval/loss"), [0, 40, 80]);
    assert_eq!(steps("eval/format_compliance"), [0, 40, 80]);
    assert_eq!(steps("train/loss"), [20, 40, 60, 80]);
    assert_eq!(events["scalars"]["train/batch_size"][0][1], 4.0);
    assert_eq!(events["hparams"]["batching"], "pack");
    // Every scalar is a curve: one-off figures of the data are not flat charts at step 0.
    for (tag, points) in events["scalars"].as_object().unwrap() {
        assert!(points.as_array().unwrap().len() > 1, "{tag} is a single point");
    }
    let answers = events["text"]["samples/responses"].as_array().unwrap();
    assert_eq!(answers.len(), 3);
    let last = answers[2][1].as_str().unwrap();
    assert_eq!(last.matches("**Prompt:**").count(), 5, "4 held-out prompts and 1 fixed one: {last}");
    assert!(last.contains("**Prompt:** Write a short story about Mia and Leo at the beach."), "{last}");

    // The pretrained tokenizer had no template; the tuned model carries the default one.
    let model = run.join("sft/final");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(config["chat_template"].as_str().unwrap().contains("### Response:"), "{config}");
    let answered: serde_json::Value = serde_json::from_str(&python_out(ANSWER_WITH_TRANSFORMERS, &[&model])).unwrap();
    assert_eq!(
        answered["prompt"],
        "### Instruction:\nWrite a short story about Mia and Leo at the beach.\n\n### Response:\n"
    );
    assert!(answered["new_tokens"].as_i64().unwrap() > 0);
}

/// A tiny random Qwen2 model with the Qwen2.5 fixture tokenizer (real template and special
/// tokens), saved by transformers.
const MAKE_QWEN2: &str = r#"
import sys, torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
Qwen2ForCausalLM(config).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
"#;

#[test]
fn the_hf_recipe_fine_tunes_a_transformers_checkpoint_with_its_own_template() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("qwen2-tiny");
    let fixture = repo_root().join("core/tests/fixtures/tokenizers/qwen2.5");
    python_out(MAKE_QWEN2, &[&fixture, &hf]);
    let instructions = small_instructions(dir.path(), 60);
    let run = dir.path().join("run");
    let overrides = [
        format!("run.output_dir={}", run.display()),
        "run.device=cpu".into(),
        format!("stages.sft.model={}", hf.display()),
        format!("stages.sft.config.data.train={}", instructions.display()),
        "stages.sft.config.max_steps=4".into(),
        "stages.sft.config.schedule.warmup_steps=1".into(),
        "stages.sft.config.checkpoint.every=2".into(),
        "stages.sft.config.eval.every=2".into(),
        "stages.sft.config.eval.max_new_tokens=4".into(),
        "stages.sft.config.eval.num_prompts=2".into(),
    ];
    let recipe = repo_root().join("recipes/sft_from_hf.yaml");
    let mut args = vec!["run", recipe.to_str().unwrap()];
    args.extend(overrides.iter().map(String::as_str));
    let out = plumb(dir.path(), &args);
    assert_exit(&out, 0);
    // The fixture tokenizer spells the stories out nearly byte by byte: many are truncated, and said so.
    assert!(stderr(&out).contains("were longer than max_length 256 and were truncated"), "{}", stderr(&out));
    let metrics = &stage_report(&run, "sft")["metrics"];
    assert!(metrics["eval/loss"].as_f64().unwrap() < metrics["eval/initial_loss"].as_f64().unwrap(), "{metrics}");

    // The model's own ChatML template, kept in the saved model, which transformers loads.
    let model = run.join("sft/final");
    let answered: serde_json::Value = serde_json::from_str(&python_out(ANSWER_WITH_TRANSFORMERS, &[&model])).unwrap();
    assert!(answered["prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"), "{answered}");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2");
}

#[test]
fn a_malformed_line_stops_the_run_with_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_instructions(dir.path(), 5);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"instruction\": \"no output\"}\n");
    std::fs::write(&data, text).unwrap();
    let corpus = small_corpus(dir.path(), 50);
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: out\n  device: cpu\nplugins:\n  - name: pretrain\n  - name: sft\nstages:\n{}  - name: sft\n    uses: sft.sft\n    config:\n      data: {{train: {}, format: alpaca}}\n      max_steps: 1\n",
            tiny_pretrain_stage("pretrain", &corpus, 2),
            data.display()
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("instructions.jsonl: line 6: missing field `output`"), "{err}");
}

#[test]
fn a_resumed_sft_run_continues_the_same_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 100);
    let instructions = small_instructions(dir.path(), 80);
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: run\n  seed: 9\n  device: cpu\nplugins:\n  - name: pretrain\n  - name: sft\nstages:\n{}  - name: sft\n    uses: sft.sft\n    config:\n      data: {{train: {}, format: alpaca}}\n      max_length: 64\n      batch_size: 4\n      max_steps: 8\n      log_every: 1\n      checkpoint: {{every: 4}}\n      eval: {{every: 8, num_prompts: 0}}\n",
            tiny_pretrain_stage("pretrain", &corpus, 4),
            instructions.display()
        ),
    )
    .unwrap();
    let losses = |run: &Path| train_losses(&run.join("tb/sft"));
    assert_exit(&plumb(dir.path(), &["run", recipe.to_str().unwrap()]), 0);
    let run = dir.path().join("run");
    let expected = losses(&run);
    assert_eq!(expected.len(), 8);
    let expected_eval = stage_report(&run, "sft")["metrics"]["eval/loss"].as_f64().unwrap();

    // As if the run had died after the step-4 checkpoint: no final model, no report.
    std::fs::remove_dir_all(run.join("sft/final")).unwrap();
    std::fs::remove_file(run.join("sft/report.json")).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 4"), "{}", stderr(&out));
    assert_eq!(losses(&run), expected, "steps 5-8 after resuming differ from the uninterrupted run");
    assert_eq!(stage_report(&run, "sft")["metrics"]["eval/loss"].as_f64().unwrap(), expected_eval);
}

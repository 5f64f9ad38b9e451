//! Evaluators end to end: `pretrain.perplexity` run from a recipe after a pretraining
//! stage, from a recipe holding only the evaluator and a checkpoint, and from `plumb
//! eval`; results read back from JSON and, with official TensorBoard, from the event files,
//! and the loss checked against transformers scoring the same windows.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// transformers' loss on the documents of argv[2] (text: blank-line separated; `.jsonl`:
/// field argv[5]), the first argv[4] of them, each cut into disjoint windows of argv[3]
/// predicted tokens fed with the token before the window (BOS, or EOS, before the first):
/// lm-evaluation-harness's rolling log-likelihood, written out independently of plumb.
const REFERENCE: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data, seq_len, max_docs, field = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if data.endswith(".jsonl"):
    docs = [json.loads(l)[field] for l in open(data, encoding="utf-8") if l.strip()]
else:
    docs, cur = [], []
    for line in open(data, encoding="utf-8").read().splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur)); cur = []
    if cur:
        docs.append("\n".join(cur))
docs = docs[:max_docs]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
nll, n = 0.0, 0
with torch.no_grad():
    for d in docs:
        ids = tok(d, add_special_tokens=False).input_ids
        for s in range(0, len(ids), seq_len):
            target = ids[s:s + seq_len]
            inputs = [prefix if s == 0 else ids[s - 1]] + target[:-1]
            logits = model(torch.tensor([inputs])).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
            n += len(target)
print(json.dumps({"loss": nll / n, "tokens": n}))
"#;

/// (loss, tokens) as transformers computes them.
fn reference(model: &Path, data: &Path, seq_len: usize, max_docs: usize, field: &str) -> (f64, f64) {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(REFERENCE)
        .arg(model)
        .arg(data)
        .arg(seq_len.to_string())
        .arg(max_docs.to_string())
        .arg(field)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["loss"].as_f64().unwrap(), v["tokens"].as_f64().unwrap())
}

fn write_recipe(dir: &Path, name: &str, plugins: &str, stages: &str) -> PathBuf {
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 5\n  device: cpu\nplugins:\n{plugins}stages:\n{stages}",
        out = dir.join(name).display()
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A tiny causal LM pretrained on `corpus` for a few steps: its `final/` directory.
fn pretrained(dir: &Path, corpus: &Path) -> PathBuf {
    let recipe = write_recipe(dir, "pretrained", "  - name: pretrain\n", &tiny_pretrain_stage("pretrain", corpus, 4));
    assert_exit(&plumb(dir, &["run", recipe.to_str().unwrap()]), 0);
    dir.join("pretrained/pretrain/final")
}

/// The metrics a results file holds, checked against what TensorBoard reads for them: one
/// scalar per metric at step 0.
fn check_results_against_tensorboard(results: &serde_json::Value, tb_dir: &Path) {
    let events = read_tensorboard(tb_dir);
    let metrics = results["metrics"].as_object().unwrap();
    for tag in ["eval/loss", "eval/perplexity", "eval/tokens"] {
        let value = metrics[tag].as_f64().unwrap();
        let logged = &events["scalars"][tag];
        assert_eq!(logged.as_array().map(Vec::len), Some(1), "{tag}: {events}");
        assert_eq!(logged[0][0].as_i64(), Some(0), "{tag}: {events}");
        let read = logged[0][1].as_f64().unwrap();
        // TensorBoard stores scalars as f32.
        assert!((read - value).abs() <= 1e-6 * value.abs().max(1.0), "{tag}: {read} vs {value}");
    }
    assert_eq!(events["scalars"].as_object().unwrap().len(), metrics.len(), "{events}");
}

fn check_against_reference(metrics: &serde_json::Value, expected: (f64, f64)) {
    let loss = metrics["eval/loss"].as_f64().unwrap();
    assert!((loss - expected.0).abs() < 1e-4 * expected.0, "plumb {loss} vs transformers {}", expected.0);
    assert_eq!(metrics["eval/tokens"].as_f64().unwrap(), expected.1);
    let perplexity = metrics["eval/perplexity"].as_f64().unwrap();
    assert!((perplexity - loss.exp()).abs() < 1e-9 * perplexity, "{metrics}");
}

#[test]
fn an_evaluator_runs_on_the_model_the_previous_stage_produced() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 200);
    let stages = format!(
        "{}  - name: ppl\n    uses: pretrain.perplexity\n    config:\n      data: {}\n      seq_len: 16\n      batch_size: 4\n      max_documents: 12\n",
        tiny_pretrain_stage("pretrain", &corpus, 4),
        corpus.display()
    );
    let recipe = write_recipe(dir.path(), "run", "  - name: pretrain\n", &stages);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);

    let run = dir.path().join("run");
    let model = run.join("pretrain/final");
    let results = read_json(&run.join("ppl/results.json"));
    assert_eq!(results["evaluator"], "pretrain.perplexity");
    assert_eq!(results["name"], "ppl");
    assert_eq!(results["model"].as_str(), Some(model.to_str().unwrap()));
    assert_eq!(results["config"]["seq_len"], 16);
    assert_eq!(results["metrics"]["eval/documents"], 12.0);
    check_against_reference(&results["metrics"], reference(&model, &corpus, 16, 12, "text"));
    let report = read_json(&run.join("ppl/report.json"));
    assert_eq!(report["kind"], "evaluator");
    assert_eq!(report["metrics"], results["metrics"]);
    check_results_against_tensorboard(&results, &run.join("tb/ppl"));

    let printed = stdout(&out);
    assert!(
        printed.contains(&format!("evaluator ppl (pretrain.perplexity) on {} finished in ", model.display())),
        "{printed}"
    );
    let loss = results["metrics"]["eval/loss"].as_f64().unwrap();
    assert!(
        printed.lines().any(|l| l.trim_start().starts_with("eval/loss ") && l.ends_with(&format!(" {loss:.4}"))),
        "{printed}"
    );
}

#[test]
fn a_recipe_of_only_an_evaluator_runs_it_on_a_given_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 200);
    let model = pretrained(dir.path(), &corpus);
    // The same stories as JSONL, the text under `story`.
    let text = std::fs::read_to_string(&corpus).unwrap();
    let lines: Vec<String> =
        text.split("\n\n").take(10).map(|d| serde_json::json!({ "id": 1, "story": d }).to_string()).collect();
    let data = dir.path().join("stories.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();

    let stages = format!(
        "  - name: held_out\n    uses: pretrain.perplexity\n    model: {}\n    config:\n      data: {}\n      field: story\n      seq_len: 24\n",
        model.display(),
        data.display()
    );
    let recipe = write_recipe(dir.path(), "eval_only", "  - name: pretrain\n", &stages);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);

    let run = dir.path().join("eval_only");
    let results = read_json(&run.join("held_out/results.json"));
    assert_eq!(results["model"].as_str(), Some(model.to_str().unwrap()));
    assert_eq!(results["metrics"]["eval/documents"], 10.0);
    check_against_reference(&results["metrics"], reference(&model, &data, 24, 10, "story"));
    check_results_against_tensorboard(&results, &run.join("tb/held_out"));
    // Nothing was trained: the run directory holds the evaluator's folder only.
    assert!(!run.join("pretrain").exists());
}

#[test]
fn plumb_eval_runs_an_evaluator_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 200);
    let model = pretrained(dir.path(), &corpus);
    let out = plumb(
        dir.path(),
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--evaluator",
            "pretrain.perplexity",
            &format!("data={}", corpus.display()),
            "seq_len=16",
            "batch_size=3",
            "max_documents=10",
            "--output-dir",
            "scores",
            "--device",
            "cpu",
        ],
    );
    assert_exit(&out, 0);
    let scores = dir.path().join("scores");
    let results = read_json(&scores.join("perplexity/results.json"));
    assert_eq!(results["evaluator"], "pretrain.perplexity");
    assert_eq!(
        results["config"],
        serde_json::json!({"data": corpus, "seq_len": 16, "batch_size": 3, "max_documents": 10})
    );
    check_against_reference(&results["metrics"], reference(&model, &corpus, 16, 10, "text"));
    check_results_against_tensorboard(&results, &scores.join("tb/perplexity"));
    // The recipe it ran is kept like any run's.
    let recipe = std::fs::read_to_string(scores.join("recipe.yaml")).unwrap();
    assert!(recipe.contains("# override: stages.0.config.seq_len=16"), "{recipe}");
    assert!(stdout(&out).contains("evaluator perplexity results: scores/perplexity/results.json"), "{}", stdout(&out));
}

#[test]
fn plumb_eval_errors_name_the_argument_or_option_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 20);
    let model = dir.path().join("no_model");
    std::fs::create_dir_all(&model).unwrap();
    let eval = |args: &[&str]| {
        let mut all = vec!["eval", "--model", model.to_str().unwrap(), "--device", "cpu"];
        all.extend_from_slice(args);
        let out = plumb(dir.path(), &all);
        assert_exit(&out, 1);
        stderr(&out)
    };
    let data = format!("data={}", corpus.display());

    let err = eval(&["--evaluator", "pretrain.perplexity", &data, "seq_len=ten"]);
    assert!(
        err.contains("error: `seq_len=ten`: seq_len: expected an unsigned integer, found a string \"ten\""),
        "{err}"
    );
    let err = eval(&["--evaluator", "pretrain.perplexity", &data, "seq_lenn=8"]);
    assert!(err.contains("error: `seq_lenn=8`: seq_lenn: unknown key; expected one of "), "{err}");
    assert!(err.contains("did you mean `seq_len`?"), "{err}");
    let err = eval(&["--evaluator", "pretrain.perplexity"]);
    assert!(err.contains("error: evaluator `pretrain.perplexity`: missing required key `data`"), "{err}");
    let err = eval(&["--evaluator", "pretrain.perplexity", "data=missing.txt"]);
    assert!(err.contains("error: `data=missing.txt`: data: file not found: `missing.txt`"), "{err}");
    let err = eval(&["--evaluator", "pretrain.perplexty", &data]);
    assert!(
        err.contains("error: --evaluator: plugin `pretrain` has no stage or evaluator `perplexty`; did you mean `pretrain.perplexity`?"),
        "{err}"
    );
    let err = eval(&["--evaluator", "perplexity", &data]);
    assert!(err.contains("error: --evaluator: expected `<plugin>.<evaluator>`"), "{err}");
    let err = eval(&["--evaluator", "pretrain.perplexity", &data, "seq_len"]);
    assert!(err.contains("error: `seq_len`: expected `key=value`"), "{err}");
    let err = eval(&["--evaluator", "pretrain.perplexity", &data]);
    assert!(
        err.contains("error: --model: expected a model directory in HF layout (with config.json), found "),
        "{err}"
    );
}

//! `cot.gsm8k` end to end through the binary: GSM8K's own reference solutions fed back
//! as generations score 100%; the report's shape and its maj@k/pass@k against hand
//! counts; malformed predictions are clear errors; a tiny model evaluated in every mode
//! writes the report, TensorBoard scalars and text, and counts generations that hit the
//! token limit.
mod common;

use std::path::{Path, PathBuf};

use common::*;

fn gsm8k_test() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo_root().join("data/gsm8k/test.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Writes `lines` (one predictions object each) to `dir/name`.
fn write_lines(dir: &Path, name: &str, lines: &[serde_json::Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn eval_predictions(dir: &Path, predictions: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let report = dir.join(format!("{out}.json"));
    let out_dir = dir.join(out);
    let mut args = vec![
        "eval",
        "--evaluator",
        "cot.gsm8k",
        "--predictions",
        predictions.to_str().unwrap(),
        "--output",
        report.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    plumb(dir, &args)
}

#[test]
fn gsm8k_reference_solutions_score_100_percent_strict_and_flexible() {
    let dir = tempfile::tempdir().unwrap();
    let problems = gsm8k_test();
    let lines: Vec<serde_json::Value> =
        problems.iter().map(|p| serde_json::json!({"question": p["question"], "generations": [p["answer"]]})).collect();
    let predictions = write_lines(dir.path(), "refs.jsonl", &lines);
    let out = eval_predictions(dir.path(), &predictions, "refs", &[]);
    assert_exit(&out, 0);
    let report = read_json(&dir.path().join("refs.json"));
    assert_eq!(report, read_json(&dir.path().join("refs/gsm8k/cot_report.json")));
    let n = problems.len();
    assert_eq!(n, 1319);
    for rule in ["strict", "flexible"] {
        assert_eq!(report[rule]["accuracy"], 1.0, "{rule}");
        assert_eq!(report[rule]["n"], n, "{rule}");
        // Wilson's lower bound at 1319/1319: n / (n + z²).
        let z2 = 1.959_963_984_540_054_f64.powi(2);
        let low = report[rule]["ci95"][0].as_f64().unwrap();
        assert!((low - n as f64 / (n as f64 + z2)).abs() < 1e-12, "{low}");
        assert_eq!(report[rule]["ci95"][1], 1.0);
        assert!(report[rule].get("maj@k").is_none(), "one generation per question: no maj@k");
    }
    // The targets are GSM8K's final numbers as written after `####` (commas dropped),
    // read here independently of plumb.
    for (p, q) in problems.iter().zip(report["questions"].as_array().unwrap()) {
        let written = p["answer"].as_str().unwrap().rsplit("####").next().unwrap().trim().replace(',', "");
        assert_eq!(q["target"].as_str().unwrap(), written);
        assert_eq!(q["strict"]["answer"], q["target"]);
    }
    let results = read_json(&dir.path().join("refs/gsm8k/results.json"));
    assert_eq!(results["metrics"]["strict/accuracy"], 1.0);
    let events = read_tensorboard(&dir.path().join("refs/tb/gsm8k"));
    assert_eq!(events["scalars"]["flexible/accuracy"][0][1], 1.0, "{events}");
    assert!(stdout(&out).contains("predictions         1319  100.0% [ 99.7, 100.0]"), "{}", stdout(&out));
}

#[test]
fn several_generations_vote_and_report_maj_and_pass_at_k() {
    let dir = tempfile::tempdir().unwrap();
    let problems = gsm8k_test();
    // Targets: 18, 3, 70000 (GSM8K test lines 1-3).
    let gens = [
        // strict: 18, 17, none, none → a tie, which the smaller (17) wins; flexible: 18, 17, none, 18.
        serde_json::json!(["#### 18", "The answer is 17.", "no idea", "So she makes $18."]),
        serde_json::json!(["The answer is 3", "The answer is 3.", "#### 3", "The answer is 3"]),
        // `$70,000` and `70000.00` vote together.
        serde_json::json!(["The answer is $70,000.", "#### 70000.00", "The answer is 5", "nothing"]),
    ];
    let lines: Vec<serde_json::Value> = problems
        .iter()
        .zip(&gens)
        .map(|(p, g)| serde_json::json!({"question": p["question"], "generations": g}))
        .collect();
    let predictions = write_lines(dir.path(), "p.jsonl", &lines);
    let out = eval_predictions(dir.path(), &predictions, "votes", &["max_questions=3"]);
    assert_exit(&out, 0);
    let r = read_json(&dir.path().join("votes.json"));
    let close = |v: &serde_json::Value, want: f64| {
        let got = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    };
    close(&r["strict"]["accuracy"], 2.0 / 3.0);
    close(&r["flexible"]["accuracy"], 1.0);
    assert_eq!(r["strict"]["n"], 3);
    let q0 = &r["questions"][0];
    assert_eq!(q0["strict"]["extracted"], serde_json::json!(["18", "17", null, null]));
    assert_eq!(q0["strict"]["votes"], serde_json::json!({"17": 1, "18": 1}));
    assert_eq!(q0["strict"]["answer"], "17");
    assert_eq!(r["questions"][2]["strict"]["votes"], serde_json::json!({"5": 1, "70000": 2}));
    // pass@k = 1 − C(n−c, k)/C(n, k), n = 4; strict c = 1, 4, 2.
    close(&r["strict"]["pass@k"]["1"], (0.25 + 1.0 + 0.5) / 3.0);
    close(&r["strict"]["pass@k"]["2"], ((1.0 - 3.0 / 6.0) + 1.0 + (1.0 - 1.0 / 6.0)) / 3.0);
    close(&r["strict"]["pass@k"]["3"], (0.75 + 1.0 + 1.0) / 3.0);
    close(&r["strict"]["pass@k"]["4"], 1.0);
    // maj@1 is the fraction of correct chains; maj@4 (every chain) is the accuracy.
    close(&r["strict"]["maj@k"]["1"], (0.25 + 1.0 + 0.5) / 3.0);
    close(&r["strict"]["maj@k"]["4"], 2.0 / 3.0);
    // maj@2 of question 3 over its 6 pairs: {70000,70000} and {70000,none}×2 win; {70000,5}×2 tie → 5: 3/6.
    // Question 1: {18,17} tie → 17; {18,none}×2 win: 2/6. Question 2: always.
    close(&r["strict"]["maj@k"]["2"], (2.0 / 6.0 + 1.0 + 3.0 / 6.0) / 3.0);
    let results = read_json(&dir.path().join("votes/gsm8k/results.json"));
    close(&results["metrics"]["strict/maj@2"], (2.0 / 6.0 + 1.0 + 3.0 / 6.0) / 3.0);
}

#[test]
fn malformed_predictions_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let problems = gsm8k_test();
    let line = |i: usize| serde_json::json!({"question": problems[i]["question"], "generations": ["#### 1"]});
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, format!("{}\n{{\"question\": \"x\", \"generations\": \"18\"}}\n", line(0))).unwrap();
    let out = eval_predictions(dir.path(), &path, "a", &["max_questions=2"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: line 2: expected {{\"question\": string, \"generations\": [string, ...]}}",
            path.display()
        )),
        "{err}"
    );
    // One line short of the data file.
    let short = write_lines(dir.path(), "short.jsonl", &[line(0)]);
    let out = eval_predictions(dir.path(), &short, "b", &["max_questions=2"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!(
            "{}: 1 predictions for the 2 problems of the data file; expected one line per problem",
            short.display()
        )),
        "{}",
        stderr(&out)
    );
    // Lines out of order are scored against no one's answers: refused.
    let swapped = write_lines(dir.path(), "swapped.jsonl", &[line(1), line(0)]);
    let out = eval_predictions(dir.path(), &swapped, "c", &["max_questions=2"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("line 1: the question is not problem 1's of the data file"), "{}", stderr(&out));
    // A missing file is named by its option, before anything runs.
    let out = eval_predictions(dir.path(), &dir.path().join("nope.jsonl"), "d", &[]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("--predictions: file not found"), "{}", stderr(&out));
    // Neither a model nor predictions.
    let out = plumb(dir.path(), &["eval", "--evaluator", "cot.gsm8k"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("--model: expected the model directory to evaluate"), "{}", stderr(&out));
}

/// A tiny model (a few steps of pretraining on the arithmetic corpus, with room for
/// few-shot prompts in its context) evaluated in every mode.
#[test]
fn a_tiny_model_is_evaluated_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_text = std::fs::read_to_string(repo_root().join("data/arith_cot_corpus.txt")).unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, corpus_text.split("\n\n").take(300).collect::<Vec<_>>().join("\n\n")).unwrap();
    let test = repo_root().join("data/arith_cot_test.jsonl");
    let train = repo_root().join("data/arith_cot_train.jsonl");
    let recipe = format!(
        r#"run:
  output_dir: {out}
  seed: 3
  device: cpu
plugins:
  - name: pretrain
  - name: cot
stages:
  - name: pretrain
    uses: pretrain.causal_lm
    config:
      data:
        train: {corpus}
        seq_len: 64
      tokenizer:
        vocab_size: 300
      model:
        hidden_size: 32
        intermediate_size: 64
        num_hidden_layers: 2
        num_attention_heads: 2
        max_position_embeddings: 512
      optimizer:
        lr: 1.0e-2
      batch_size: 8
      max_steps: 6
      log_every: 2
  - name: cot
    uses: cot.gsm8k
    config:
      data: {test}
      max_questions: 5
      modes: [direct, few_shot_direct, zero_shot_cot, few_shot_cot, self_consistency]
      answer_pass: true
      few_shot: {{source: {train}, k: 1, seed: 2}}
      max_new_tokens: 10
      samples: 3
      batch_size: 4
      text_samples: 2
"#,
        out = dir.path().join("run").display(),
        corpus = corpus.display(),
        test = test.display(),
        train = train.display()
    );
    let path = dir.path().join("recipe.yaml");
    std::fs::write(&path, &recipe).unwrap();
    let out = plumb(dir.path(), &["run", path.to_str().unwrap()]);
    assert_exit(&out, 0);
    let report = read_json(&dir.path().join("run/cot/cot_report.json"));
    let modes = report["modes"].as_object().unwrap();
    assert_eq!(modes.len(), 5);
    let mut limited = 0;
    for (name, m) in modes {
        let samples = if name == "self_consistency" { 3 } else { 1 };
        assert_eq!(m["strict"]["n"], 5, "{name}");
        assert_eq!(m["generations"], 5 * samples, "{name}");
        let questions = m["questions"].as_array().unwrap();
        let flagged: usize = questions
            .iter()
            .map(|q| q["hit_token_limit"].as_array().unwrap().iter().filter(|h| h.as_bool().unwrap()).count())
            .sum();
        assert_eq!(m["hit_token_limit"], flagged, "{name}");
        limited += flagged;
        for q in questions {
            assert_eq!(q["generations"].as_array().unwrap().len(), samples, "{name}");
            assert!(q["prompt"].as_str().unwrap().contains(q["question"].as_str().unwrap()));
        }
        if name == "self_consistency" {
            assert!(m["strict"]["maj@k"]["3"].is_number() && m["flexible"]["pass@k"]["2"].is_number(), "{m}");
        }
    }
    // Ten new tokens cannot finish a worked solution: some generations hit the limit,
    // and the run says so.
    assert!(limited > 0);
    assert!(stderr(&out).contains("generations stopped at max_new_tokens = 10"), "{}", stderr(&out));
    let few_shot_prompt = modes["few_shot_cot"]["questions"][0]["prompt"].as_str().unwrap();
    assert_eq!(few_shot_prompt.matches("Q: ").count(), 2, "{few_shot_prompt}");
    assert!(modes["direct"]["questions"][0]["prompt"].as_str().unwrap().ends_with("\nA: The answer is"));

    let events = read_tensorboard(&dir.path().join("run/tb/cot"));
    let results = read_json(&dir.path().join("run/cot/results.json"));
    for tag in [
        "direct/strict/accuracy",
        "self_consistency/flexible/maj@3",
        "zero_shot_cot/hit_token_limit",
        "time/tokens_per_s",
    ] {
        let logged = events["scalars"][tag][0][1].as_f64().unwrap_or_else(|| panic!("{tag}: {events}"));
        let value = results["metrics"][tag].as_f64().unwrap();
        assert!((logged - value).abs() <= 1e-6 * value.abs().max(1.0), "{tag}: {logged} vs {value}");
    }
    assert!(results["metrics"]["time/tokens_per_s"].as_f64().unwrap() > 0.0);
    let texts = events["text"]["few_shot_cot/rationale"].as_array();
    assert_eq!(texts.map(Vec::len), Some(2), "{}", events["text"]);
    assert!(stdout(&out).contains("self_consistency"), "the table: {}", stdout(&out));

    // The same seed gives the same sampled chains.
    let again =
        recipe.replace(&dir.path().join("run").display().to_string(), &dir.path().join("again").display().to_string());
    std::fs::write(&path, again).unwrap();
    assert_exit(&plumb(dir.path(), &["run", path.to_str().unwrap()]), 0);
    let second = read_json(&dir.path().join("again/cot/cot_report.json"));
    assert_eq!(second["modes"]["self_consistency"]["questions"], modes["self_consistency"]["questions"]);
}

//! Data that is big, empty or oddly encoded: a long document is packed in linear time,
//! an oversized SFT line is refused before it is parsed, and every data message names
//! the file and says what is wrong.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A recipe running one SFT stage on `data` (`extra` more lines under `data:`); only
/// validated here, so the model is never read.
fn sft_recipe(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), "{}").unwrap();
    let recipe = dir.join("sft.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: out\n  device: cpu\nplugins:\n  - name: sft\nstages:\n  - name: sft\n    uses: sft.sft\n    model: {model}\n    config:\n      data:\n        train: {data}\n        format: alpaca\n{extra}      max_steps: 1\n",
            model = model.display(),
            data = data.display(),
        ),
    )
    .unwrap();
    recipe
}

fn validate(dir: &Path, recipe: &Path) -> std::process::Output {
    plumb(dir, &["validate", recipe.to_str().unwrap()])
}

/// A recipe pretraining a tiny model for `steps` steps on `sources` (YAML list items).
fn pretrain_recipe(dir: &Path, sources: &str, steps: u32) -> PathBuf {
    let recipe = dir.join("pretrain.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: {out}\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n  - name: pretrain\n    uses: pretrain.causal_lm\n    config:\n      data:\n        sources: {sources}\n        seq_len: 16\n      tokenizer: {{vocab_size: 300}}\n      model: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}\n      batch_size: 2\n      max_steps: {steps}\n      eval: {{max_batches: 1}}\n",
            out = dir.join("run").display(),
        ),
    )
    .unwrap();
    recipe
}

#[test]
fn a_long_document_is_packed_in_linear_time() {
    // The stream's start-up on a corpus whose first document is 1 MB, then 8 MB, with no
    // blank line: reading, tokenizing and cutting it into rows. Short rows (seq_len 16)
    // make many cuts, where cutting one row at a time from the front was quadratic
    // (some 100x for 8x the size).
    let out = plumb(&repo_root(), &["bench", "pack", "--json", "--mb", "1,8", "--seq-len", "16", "--repeats", "2"]);
    assert_exit(&out, 0);
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seconds: Vec<f64> = lines.iter().map(|l| l["first_rows_s"].as_f64().unwrap()).collect();
    println!("first rows of a 1 MB document: {:.3} s; of an 8 MB one: {:.3} s", seconds[0], seconds[1]);
    for line in &lines {
        println!("{line}");
    }
    assert!(lines[1]["rows"].as_u64().unwrap() > 100_000, "{}", lines[1]);
    let ratio = seconds[1] / seconds[0];
    assert!(ratio < 16.0, "8x the document took {ratio:.1}x the time: far from linear");
}

#[test]
fn an_sft_line_over_the_limit_is_refused_before_it_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("big.jsonl");
    let huge = "word ".repeat(600_000); // 3 MB of output on line 2
    let line = format!("{{\"instruction\": \"Repeat\", \"output\": \"{huge}\"}}");
    std::fs::write(
        &data,
        format!(
            "{{\"instruction\": \"a\", \"output\": \"b\"}}\n{line}\n{{\"instruction\": \"c\", \"output\": \"d\"}}\n"
        ),
    )
    .unwrap();
    let out = validate(dir.path(), &sft_recipe(dir.path(), &data, ""));
    assert_exit(&out, 1);
    let err = stderr(&out);
    let expected = format!(
        "big.jsonl: line 2: {} bytes, more than data.max_line_bytes (1048576); shorten the example or raise the limit",
        line.len()
    );
    assert!(err.contains(&expected), "{err}");

    // Skipped like any malformed line, when asked; read whole under a higher limit.
    let skip = sft_recipe(dir.path(), &data, "        on_malformed: skip\n");
    assert_exit(&validate(dir.path(), &skip), 0);
    let raised = sft_recipe(dir.path(), &data, "        max_line_bytes: 4000000\n");
    assert_exit(&validate(dir.path(), &raised), 0);
}

#[test]
fn an_empty_or_blank_pretraining_corpus_says_so() {
    for (name, text) in [("empty.txt", ""), ("blank.txt", "  \n\n \t\n\n")] {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join(name);
        std::fs::write(&corpus, text).unwrap();
        let recipe = pretrain_recipe(dir.path(), &format!("[{{path: {}}}]", corpus.display()), 1);
        let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{}: the corpus has no documents: it is empty or only whitespace", corpus.display())),
            "{err}"
        );
    }
}

#[test]
fn a_byte_order_mark_at_the_start_of_a_jsonl_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // SFT: the first line is read as JSON, not as "not JSON".
    let data = dir.path().join("bom.jsonl");
    let examples: String = (0..4).map(|i| format!("{{\"instruction\": \"Say {i}\", \"output\": \"{i}\"}}\n")).collect();
    std::fs::write(&data, format!("\u{FEFF}{examples}")).unwrap();
    let out = validate(dir.path(), &sft_recipe(dir.path(), &data, ""));
    assert_exit(&out, 0);

    // Pretraining's JSONL sources: the run reads the first document and trains.
    let corpus = dir.path().join("corpus.jsonl");
    let tales = std::fs::read_to_string(repo_root().join("data/tiny_tales.txt")).unwrap();
    let documents: String =
        tales.split("\n\n").take(80).map(|d| serde_json::json!({ "text": d }).to_string() + "\n").collect();
    std::fs::write(&corpus, format!("\u{FEFF}{documents}")).unwrap();
    let recipe = pretrain_recipe(dir.path(), &format!("[{{path: {}}}]", corpus.display()), 1);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
}

#[test]
fn a_one_line_file_is_named_in_its_error() {
    let dir = tempfile::tempdir().unwrap();
    // Pretraining: a single document cannot be split into training and validation.
    let corpus = dir.path().join("one.txt");
    std::fs::write(&corpus, "Once upon a time there was a single line and nothing else.\n").unwrap();
    let recipe = pretrain_recipe(dir.path(), &format!("[{{path: {}}}]", corpus.display()), 1);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: the corpus holds a single document (documents are separated by blank lines)",
            corpus.display()
        )),
        "{err}"
    );

    // SFT: one example, and a validation split to hold out of it.
    let data = dir.path().join("one.jsonl");
    std::fs::write(&data, "{\"instruction\": \"a\", \"output\": \"b\"}\n").unwrap();
    let out = validate(dir.path(), &sft_recipe(dir.path(), &data, ""));
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}: 1 usable example(s); holding out data.validation_fraction", data.display())),
        "{err}"
    );
}

#[test]
fn a_data_set_whose_answers_are_all_empty_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("empty_answers.jsonl");
    let examples: String =
        (0..5).map(|i| format!("{{\"instruction\": \"Question {i}\", \"output\": \"  \"}}\n")).collect();
    std::fs::write(&data, examples).unwrap();
    let out = validate(dir.path(), &sft_recipe(dir.path(), &data, ""));
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: every answer is empty (the `output` of all 5 examples): there is nothing to learn",
            data.display()
        )),
        "{err}"
    );
}

/// The quickstart's arithmetic task: the shipped files are what the generator writes, and
/// no held-out problem appears, under any name or object, in a file used for training.
#[test]
fn the_arithmetic_task_is_regenerated_byte_for_byte_and_its_held_out_problems_are_unseen() {
    let dir = tempfile::tempdir().unwrap();
    let script = repo_root().join("data/make_arith.py");
    let out = dir.path().join("arith");
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(python())
            .arg(&script)
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    run(&[]);
    for file in ["corpus.txt", "sft.jsonl", "prefs.jsonl", "prompts.jsonl", "train.jsonl", "test.jsonl"] {
        let shipped = std::fs::read(repo_root().join("data/arith").join(file)).unwrap();
        assert!(
            shipped == std::fs::read(out.join(file)).unwrap(),
            "data/arith/{file} differs from what make_arith.py writes"
        );
    }
    assert!(run(&["--check"]).contains("disjoint"));

    // The check fails when a held-out problem leaks into training data.
    let test_line = std::fs::read_to_string(out.join("test.jsonl")).unwrap().lines().next().unwrap().to_owned();
    let question =
        serde_json::from_str::<serde_json::Value>(&test_line).unwrap()["question"].as_str().unwrap().to_owned();
    let leaked = serde_json::json!({"question": question.replacen(question.split_whitespace().next().unwrap(), "Zed", 1), "answer": "#### 0"});
    std::fs::write(out.join("train.jsonl"), format!("{leaked}\n")).unwrap();
    let o = std::process::Command::new(python())
        .arg(&script)
        .args(["--out", out.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("repeat a held-out problem"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

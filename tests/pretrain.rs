//! The first slice end to end: a recipe trains a tokenizer and a small model through
//! the `pretrain` plugin, saves it in HF layout and logs to TensorBoard.
mod common;

use std::path::Path;

use common::*;

fn write_recipe(dir: &Path, seed: u64, steps: u32) -> std::path::PathBuf {
    let corpus = small_corpus(dir, 300);
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: {seed}\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{stage}",
        out = dir.join(format!("run-{seed}")).display(),
        stage = tiny_pretrain_stage("pretrain", &corpus, steps)
    );
    let path = dir.join(format!("recipe-{seed}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn report(run: &Path) -> serde_json::Value {
    stage_report(run, "pretrain")
}

#[test]
fn pretraining_learns_saves_hf_layout_and_logs_what_tensorboard_reads() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 11, 8);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let run = dir.path().join("run-11");

    // The model, in HF layout, and the resolved recipe beside it.
    for file in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    {
        assert!(run.join("pretrain/final").join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("pretrain/final/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(config["hidden_size"], 32);
    let resolved = run.join("recipe.yaml");
    assert_exit(&plumb(dir.path(), &["validate", resolved.to_str().unwrap()]), 0);

    // It learned: the loss fell well below its starting point.
    let report = report(&run);
    let (initial, last) =
        (report["metrics"]["eval/initial_loss"].as_f64().unwrap(), report["metrics"]["eval/loss"].as_f64().unwrap());
    assert!(last < initial - 1.0, "eval/loss {initial} -> {last}");

    // TensorBoard reads back every tag, at the right steps, with the logged values.
    let events = read_tensorboard(&run.join("tb/pretrain"));
    let scalars = &events["scalars"];
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/perplexity",
        "train/batch_size",
    ] {
        let steps: Vec<i64> = scalars[tag].as_array().unwrap().iter().map(|e| e[0].as_i64().unwrap()).collect();
        assert_eq!(steps, vec![2, 4, 6, 8], "{tag}");
    }
    let eval_steps: Vec<i64> =
        scalars["eval/loss"].as_array().unwrap().iter().map(|e| e[0].as_i64().unwrap()).collect();
    assert_eq!(eval_steps, vec![0, 4, 8]);
    let eval_last = scalars["eval/loss"][2][1].as_f64().unwrap();
    assert!((eval_last - last).abs() < 1e-5 * last.abs(), "{eval_last} vs report {last}");
    // warmup 2 then cosine to 10% over 8 steps: the value logged at step 2 is the lr of step index 1.
    let lr_at_2 = scalars["train/learning_rate"][0][1].as_f64().unwrap();
    assert!((lr_at_2 - 1.0e-2).abs() < 1e-9, "{lr_at_2}");
    let text = events["text"]["samples/greedy"].as_array().unwrap();
    assert_eq!(text.len(), 2, "samples at steps 4 and 8");
    assert!(text[0][1].as_str().unwrap().starts_with("**One day, Lily**"), "{text:?}");
    assert_eq!(events["hparams"]["max_steps"], 8.0);
    assert_eq!(events["hparams"]["batch_size"], 8.0);
    assert_eq!(events["metrics"], serde_json::json!(["eval/loss", "train/loss"]));

    // The saved model generates from the command line: greedy is deterministic, and a
    // seed makes sampling so too.
    let model = run.join("pretrain/final");
    let generate = |extra: &[&str]| {
        let mut args =
            vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "One day,", "--max-new-tokens", "6"];
        args.extend_from_slice(extra);
        let out = plumb(dir.path(), &args);
        assert_exit(&out, 0);
        stdout(&out)
    };
    assert_eq!(generate(&[]), generate(&[]));
    assert_eq!(generate(&["--temperature", "1.0", "--seed", "5"]), generate(&["--temperature", "1.0", "--seed", "5"]));
    let bad = plumb(dir.path(), &["generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--top-p", "0"]);
    assert_exit(&bad, 1);
    assert!(stderr(&bad).contains("--top-p: expected a value in (0, 1]"), "{}", stderr(&bad));
    let missing = plumb(dir.path(), &["generate", "--model", "nowhere", "--prompt", "x"]);
    assert_exit(&missing, 1);
    assert!(stderr(&missing).contains("nowhere/tokenizer.json"), "{}", stderr(&missing));
}

#[test]
fn a_seeded_run_is_reproducible_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<serde_json::Value> = [21, 21, 22]
        .iter()
        .enumerate()
        .map(|(i, &seed)| {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).unwrap();
            let recipe = write_recipe(&sub, seed, 4);
            assert_exit(&plumb(&sub, &["run", recipe.to_str().unwrap()]), 0);
            let events = read_tensorboard(&sub.join(format!("run-{seed}/tb/pretrain")));
            events["scalars"]["train/loss"].clone()
        })
        .collect();
    assert_eq!(runs[0], runs[1], "same seed, same losses");
    assert_ne!(runs[0], runs[2], "another seed, other losses");
}

#[test]
fn a_corpus_that_is_not_utf8_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 3, 2);
    let corpus = dir.path().join("corpus.txt");
    let mut bytes = b"A fine first line.\n\nAnd a second document.\n".to_vec();
    bytes.extend_from_slice(b"bad \xff byte\n");
    std::fs::write(&corpus, bytes).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains(&format!("{}: line 4: not valid UTF-8 text", corpus.display())), "{}", stderr(&out));
}

#[test]
fn ctrl_c_finishes_the_step_checkpoints_and_exits_130() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 4, 100_000);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["run", recipe.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Plain progress lines (stdout is a pipe): the first comes after the first step.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("[pretrain] step 1/100000"), "{first}");
    let killed = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "stdout: {rest:?}\nstderr: {err}");
    assert!(err.contains("stage `pretrain` (pretrain.causal_lm, plugin pretrain 0.1.0) stopped on request"), "{err}");
    assert!(err.contains("on request; resume from "), "{err}");
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("run-4/pretrain/checkpoints")).unwrap().collect();
    assert_eq!(checkpoints.len(), 1);
    let saved = checkpoints[0].as_ref().unwrap().path();
    for file in ["config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"] {
        assert!(saved.join(file).is_file(), "{file}");
    }
    assert!(!dir.path().join("run-4/pretrain/final").exists());
}

fn losses(run: &Path) -> Vec<(i64, f64)> {
    train_losses(&run.join("tb/pretrain"))
}

#[test]
fn a_run_killed_mid_training_resumes_with_the_same_losses_step_for_step() {
    let dir = tempfile::tempdir().unwrap();
    let settings = ["stages.pretrain.config.log_every=1", "stages.pretrain.config.checkpoint.every=4"];
    let recipe = write_recipe(dir.path(), 9, 16);
    let args = |extra: &[&str]| {
        let mut a = vec!["run", recipe.to_str().unwrap()];
        a.extend_from_slice(&settings);
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    // Uninterrupted.
    let whole = dir.path().join("whole");
    let out = plumb(
        dir.path(),
        &args(&[&format!("run.output_dir={}", whole.display())]).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_exit(&out, 0);
    let expected = losses(&whole);
    assert_eq!(expected.len(), 16);

    // Killed with SIGKILL as soon as the step-8 checkpoint is being written (or is
    // written, if the write was too quick to catch), then resumed.
    let killed = dir.path().join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(args(&[&format!("run.output_dir={}", killed.display())]))
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = killed.join("pretrain/checkpoints");
    let started = std::time::Instant::now();
    loop {
        let names: Vec<String> = std::fs::read_dir(&checkpoints)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if names.iter().any(|n| n.contains("step-00000008")) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(started.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("pretrain/final").exists());

    let out = plumb(
        dir.path(),
        &args(&[&format!("run.output_dir={}", killed.display()), "--resume"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step "), "{}", stderr(&out));
    assert_eq!(losses(&killed), expected, "losses after resuming differ from the uninterrupted run");
    // The report tells the run's story: the loss before any training, not at the resume point.
    let initial = |run: &Path| report(run)["metrics"]["eval/initial_loss"].as_f64().unwrap();
    assert_eq!(initial(&killed), initial(&whole));

    // Running again with --resume finds the stage finished.
    let again = plumb(
        dir.path(),
        &args(&[&format!("run.output_dir={}", killed.display()), "--resume"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_exit(&again, 0);
    assert!(
        stdout(&again).contains("stage pretrain finished in an earlier run; not running it again"),
        "{}",
        stdout(&again)
    );
}

#[test]
fn a_non_finite_loss_stops_or_is_skipped_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 6, 6);
    // The fault injection is a test-only switch, outside the recipe schema.
    let fault = [(plumb_core::train::FAULT_NONFINITE_AT_STEP, "3")];
    let out =
        plumb(dir.path(), &["run", recipe.to_str().unwrap(), "stages.pretrain.config.inject_nonfinite_at_step=3"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("inject_nonfinite_at_step: unknown key"), "{}", stderr(&out));
    let out = plumb_with_env(dir.path(), &["run", recipe.to_str().unwrap()], &fault);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("step 3: the loss is NaN and the gradient norm "), "{}", stderr(&out));
    assert!(stderr(&out).contains("stopping (set on_nonfinite: skip to skip such steps)"), "{}", stderr(&out));

    let out = plumb_with_env(
        dir.path(),
        &[
            "run",
            recipe.to_str().unwrap(),
            "--overwrite", // the stopped run's directory
            "stages.pretrain.config.on_nonfinite=skip",
            "stages.pretrain.config.log_every=1",
        ],
        &fault,
    );
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("skipping the update (1 skipped so far)"), "{}", stderr(&out));
    let steps: Vec<i64> = losses(&dir.path().join("run-6")).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![1, 2, 4, 5, 6], "step 3 was skipped");
}

#[test]
fn the_batch_size_warms_up_in_whole_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 8, 6);
    let out = plumb(
        dir.path(),
        &[
            "run",
            recipe.to_str().unwrap(),
            "stages.pretrain.config.micro_batch_size=2",
            "stages.pretrain.config.batch_size_warmup.start=2",
            "stages.pretrain.config.batch_size_warmup.steps=4",
            "stages.pretrain.config.log_every=1",
        ],
    );
    assert_exit(&out, 0);
    let run = dir.path().join("run-8");
    let events = read_tensorboard(&run.join("tb/pretrain"));
    let sizes: Vec<f64> =
        events["scalars"]["train/batch_size"].as_array().unwrap().iter().map(|e| e[1].as_f64().unwrap()).collect();
    assert_eq!(sizes, [2.0, 2.0, 4.0, 6.0, 8.0, 8.0]);
    // Tokens count what was trained on: (2 + 2 + 4 + 6 + 8 + 8) sequences of 32 tokens.
    assert_eq!(report(&run)["metrics"]["train/tokens"], 30.0 * 32.0);

    let bad = plumb(
        dir.path(),
        &[
            "run",
            recipe.to_str().unwrap(),
            "stages.pretrain.config.micro_batch_size=2",
            "stages.pretrain.config.batch_size_warmup.start=3",
            "stages.pretrain.config.batch_size_warmup.steps=4",
        ],
    );
    assert_exit(&bad, 1);
    assert!(
        stderr(&bad).contains("batch_size_warmup.start: expected a multiple of micro_batch_size"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn a_mixture_of_text_and_jsonl_files_streams_by_weight_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 300);
    let text = std::fs::read_to_string(&corpus).unwrap();
    let jsonl: String =
        text.split("\n\n").map(|d| serde_json::json!({"id": 1, "story": d}).to_string() + "\n").collect();
    std::fs::write(dir.path().join("stories.jsonl"), jsonl).unwrap();
    let stage = tiny_pretrain_stage("pretrain", &corpus, 12).replace(
        &format!("        train: {}\n", corpus.display()),
        &format!(
            "        sources:\n          - {{path: {}, weight: 1}}\n          - {{path: {}, weight: 3, field: story}}\n        shuffle_buffer: 64\n",
            corpus.display(),
            dir.path().join("stories.jsonl").display()
        ),
    );
    assert!(stage.contains("sources:"), "{stage}");
    let recipe = dir.path().join("mixture.yaml");
    let run = dir.path().join("run");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: {}\n  seed: 2\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{stage}",
            run.display()
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("data: 2 source(s)"), "{}", stderr(&out));
    let metrics = &report(&run)["metrics"];
    assert!(metrics["eval/loss"].as_f64().unwrap() < metrics["eval/initial_loss"].as_f64().unwrap() - 1.0, "{metrics}");

    // A line without the field stops the run, naming the file and line.
    let mut broken = std::fs::read_to_string(dir.path().join("stories.jsonl")).unwrap();
    broken.insert_str(0, "{\"id\": 0, \"text\": \"no story field\"}\n");
    std::fs::write(dir.path().join("stories.jsonl"), broken).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--overwrite"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("stories.jsonl: line 1: missing field `story`"), "{}", stderr(&out));
}

/// A stage of `uses` with `model` and `objective` sections, on the small corpus.
fn denoising_recipe(dir: &Path, uses: &str, model: &str, objective: &str, steps: u32) -> std::path::PathBuf {
    let corpus = small_corpus(dir, 300);
    let name = uses.split('.').nth(1).unwrap();
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 4\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n  - name: {name}\n    uses: {uses}\n    config:\n      data: {{train: {corpus}, seq_len: 32}}\n      tokenizer: {{vocab_size: 400}}\n      model: {model}\n      objective: {objective}\n      optimizer: {{lr: 1.0e-2}}\n      schedule: {{warmup_steps: 2}}\n      batch_size: 8\n      micro_batch_size: 4\n      max_steps: {steps}\n      eval: {{every: {steps}, max_batches: 4}}\n      checkpoint: {{every: 10}}\n",
        out = dir.join("run").display(),
        corpus = corpus.display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// transformers loads `dir` with `class` (no missing or unexpected weights) and its tokenizer.
fn loads_in_transformers(dir: &Path, class: &str) -> serde_json::Value {
    let script = format!(
        r#"
import json, sys, transformers
model, info = transformers.{class}.from_pretrained(sys.argv[1], output_loading_info=True)
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({{"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "mask": tok.mask_token, "pad": tok.pad_token,
                  "extra": sum(t.startswith("<extra_id_") for t in tok.all_special_tokens)}}))
"#
    );
    let out = std::process::Command::new(python()).args(["-c", &script]).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn masked_lm_trains_a_bert_encoder_that_transformers_loads() {
    let dir = tempfile::tempdir().unwrap();
    let model = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2}";
    let recipe = denoising_recipe(dir.path(), "pretrain.masked_lm", model, "{probability: 0.15}", 30);
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let report = stage_report(&dir.path().join("run"), "masked_lm");
    let metrics = &report["metrics"];
    let (initial, last) = (metrics["eval/initial_loss"].as_f64().unwrap(), metrics["eval/loss"].as_f64().unwrap());
    assert!(last < initial - 1.0, "eval/loss {initial} -> {last}");
    let loaded = loads_in_transformers(&dir.path().join("run/masked_lm/final"), "BertForMaskedLM");
    assert_eq!(loaded["missing"], serde_json::json!([]), "{loaded}");
    assert_eq!(loaded["unexpected"], serde_json::json!([]), "{loaded}");
    assert_eq!(loaded["mask"], "[MASK]");
    assert_eq!(loaded["pad"], "[PAD]");
}

#[test]
fn span_corruption_trains_a_t5_encoder_decoder_that_transformers_loads_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = "{d_model: 32, d_ff: 64, num_layers: 2, num_heads: 2}";
    let recipe = denoising_recipe(
        dir.path(),
        "pretrain.span_corruption",
        model,
        "{noise_density: 0.15, mean_span_length: 3}",
        30,
    );
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 0);
    let run = dir.path().join("run");
    let report = |run: &Path| stage_report(run, "span_corruption");
    let metrics = report(&run)["metrics"].clone();
    let (initial, last) = (metrics["eval/initial_loss"].as_f64().unwrap(), metrics["eval/loss"].as_f64().unwrap());
    assert!(last < initial - 1.0, "eval/loss {initial} -> {last}");
    let loaded = loads_in_transformers(&run.join("span_corruption/final"), "T5ForConditionalGeneration");
    assert_eq!(loaded["missing"], serde_json::json!([]), "{loaded}");
    assert_eq!(loaded["pad"], "<pad>");
    assert_eq!(loaded["extra"], 100, "T5's 100 sentinels");

    // As if it had died after the step-20 checkpoint: resuming ends where the whole run did.
    let losses = |run: &Path| train_losses(&run.join("tb/span_corruption"));
    let expected = losses(&run);
    std::fs::remove_dir_all(run.join("span_corruption/final")).unwrap();
    std::fs::remove_file(run.join("span_corruption/report.json")).unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap(), "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step 20"), "{}", stderr(&out));
    assert_eq!(losses(&run), expected);
    assert_eq!(report(&run)["metrics"]["eval/loss"], metrics["eval/loss"]);
}

#[test]
fn bf16_autocast_trains_like_fp32_and_keeps_fp32_master_weights() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 12, 12);
    assert_exit(&plumb(dir.path(), &["run", recipe.to_str().unwrap()]), 0);
    let fp32 = report(&dir.path().join("run-12"))["metrics"]["eval/loss"].as_f64().unwrap();
    let bf16_run = dir.path().join("bf16");
    let out = plumb(
        dir.path(),
        &[
            "run",
            recipe.to_str().unwrap(),
            "stages.pretrain.config.precision=bf16",
            &format!("run.output_dir={}", bf16_run.display()),
        ],
    );
    assert_exit(&out, 0);
    let metrics = &report(&bf16_run)["metrics"];
    let bf16 = metrics["eval/loss"].as_f64().unwrap();
    assert!(bf16 < metrics["eval/initial_loss"].as_f64().unwrap() - 1.0, "{metrics}");
    assert!((bf16 - fp32).abs() < 0.1 && bf16 != fp32, "bf16 {bf16} vs fp32 {fp32}: close, not identical");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bf16_run.join("pretrain/final/config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32", "master weights stay fp32");
}

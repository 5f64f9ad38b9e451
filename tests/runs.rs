//! Runs you can trust: an output directory belongs to one run, a resume continues the
//! run it claims to or refuses, a damaged checkpoint is passed over, and SIGTERM stops a
//! run as cleanly as Ctrl-C.
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// A pretraining recipe of `steps` steps into `<dir>/run`, with `extra` lines appended
/// to the stage's config.
fn write_recipe(dir: &Path, steps: u32, extra: &str) -> PathBuf {
    let corpus = small_corpus(dir, 300);
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 7\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{stage}{extra}",
        out = dir.join("run").display(),
        stage = tiny_pretrain_stage("pretrain", &corpus, steps)
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(dir: &Path, recipe: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run", recipe.to_str().unwrap()];
    args.extend_from_slice(extra);
    plumb(dir, &args)
}

fn spawn(dir: &Path, recipe: &Path, stdout: Stdio) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["run", recipe.to_str().unwrap()])
        .current_dir(dir)
        .env_remove("PLUMB_PLUGIN_PATH")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn losses(run: &Path) -> Vec<(i64, f64)> {
    train_losses(&run.join("tb/pretrain"))
}

/// As if the run had died after its last checkpoint: no final model, no report.
fn unfinish(run: &Path) {
    std::fs::remove_dir_all(run.join("pretrain/final")).unwrap();
    std::fs::remove_file(run.join("pretrain/report.json")).unwrap();
}

#[test]
fn a_second_run_into_a_directory_in_use_is_refused_and_the_first_stays_intact() {
    let dir = tempfile::tempdir().unwrap();
    // Far more steps than the refusals below take on any machine; it is stopped after them.
    // No periodic checkpoints: the only one is written when the first run is stopped.
    let recipe = write_recipe(dir.path(), 100_000, "      checkpoint: {every: 0}\n");
    let out_dir = dir.path().join("run");
    let mut first = spawn(dir.path(), &recipe, Stdio::piped());
    // Plain progress lines (stdout is a pipe): the first comes after the first step.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(first.stdout.take().unwrap()));
    let line = lines.next().unwrap().unwrap();
    assert!(line.starts_with("[pretrain] step 1/100000"), "{line}");
    let resolved = std::fs::read(out_dir.join("recipe.yaml")).unwrap();
    for flags in [&[][..], &["--overwrite"], &["--resume"]] {
        let mut args = vec!["run.seed=8"];
        args.extend_from_slice(flags);
        let second = run(dir.path(), &recipe, &args);
        assert_exit(&second, 1);
        let err = stderr(&second);
        let expected = format!(
            "error: {}: another plumb run (pid {}) is writing to this output directory; wait for it to end (then \
             --resume or --overwrite it), or set another run.output_dir",
            out_dir.display(),
            first.id()
        );
        assert!(err.contains(&expected), "{flags:?}: {err}");
    }
    assert!(first.try_wait().unwrap().is_none(), "the first run was still running while the others were refused");
    let stopped = Command::new("kill").args(["-INT", &first.id().to_string()]).status().unwrap();
    assert!(stopped.success());
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect(); // drain stdout to the end
    let output = first.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}\n{}", rest.join("\n"), String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read(out_dir.join("recipe.yaml")).unwrap(), resolved, "the first run's recipe is intact");
    let checkpoints: Vec<_> = std::fs::read_dir(out_dir.join("pretrain/checkpoints")).unwrap().collect();
    assert_eq!(checkpoints.len(), 1, "the first run's own checkpoint, written when it was stopped");
    let steps: Vec<i64> = losses(&out_dir).iter().map(|(s, _)| *s).collect();
    assert!(steps.windows(2).all(|w| w[1] == w[0] + 2), "one run's steps 2, 4, ...: {steps:?}");
}

#[test]
fn a_later_run_into_an_earlier_runs_directory_needs_resume_or_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 4, "      checkpoint: {every: 2}\n");
    let out_dir = dir.path().join("run");
    assert_exit(&run(dir.path(), &recipe, &[]), 0);
    let checkpoint = out_dir.join("pretrain/checkpoints/step-00000002");
    assert!(checkpoint.is_dir());

    let again = run(dir.path(), &recipe, &["run.seed=8"]);
    assert_exit(&again, 1);
    let expected = format!(
        "error: {}: holds the files of an earlier run; pass --resume to continue it, --overwrite to delete its \
         files and start over, or set another run.output_dir",
        out_dir.display()
    );
    assert!(stderr(&again).contains(&expected), "{}", stderr(&again));
    assert!(checkpoint.is_dir(), "the earlier run's checkpoints are kept");
    assert!(!std::fs::read_to_string(out_dir.join("recipe.yaml")).unwrap().contains("run.seed=8"));

    // A file only the earlier run had is gone after --overwrite.
    std::fs::write(out_dir.join("pretrain/notes.txt"), "earlier").unwrap();
    let overwritten = run(dir.path(), &recipe, &["run.seed=8", "--overwrite"]);
    assert_exit(&overwritten, 0);
    assert!(
        stderr(&overwritten).contains("--overwrite: removed the files of the earlier run in"),
        "{}",
        stderr(&overwritten)
    );
    assert!(!out_dir.join("pretrain/notes.txt").exists());
    assert!(std::fs::read_to_string(out_dir.join("recipe.yaml")).unwrap().contains("run.seed=8"));
    assert!(out_dir.join("pretrain/final/model.safetensors").is_file());

    // --resume and --overwrite exclude each other.
    assert_exit(&run(dir.path(), &recipe, &["--resume", "--overwrite"]), 2);
}

#[test]
fn plumb_eval_refuses_to_write_over_earlier_results_unless_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 2, "");
    assert_exit(&run(dir.path(), &recipe, &[]), 0);
    let model = dir.path().join("run/pretrain/final");
    let corpus = dir.path().join("corpus.txt");
    let eval = |extra: &[&str]| {
        let data = format!("data={}", corpus.display());
        let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--evaluator", "pretrain.perplexity"];
        args.extend_from_slice(&[&data, "max_documents=4", "--output-dir", "scores", "--device", "cpu"]);
        args.extend_from_slice(extra);
        plumb(dir.path(), &args)
    };
    assert_exit(&eval(&[]), 0);
    let again = eval(&[]);
    assert_exit(&again, 1);
    assert!(
        stderr(&again).contains(
            "error: scores: holds the files of an earlier run; pass --overwrite to delete them and evaluate again, \
             or choose another --output-dir"
        ),
        "{}",
        stderr(&again)
    );
    assert_exit(&eval(&["--overwrite"]), 0);
    assert!(dir.path().join("scores/perplexity/results.json").is_file());
}

#[test]
fn a_resume_refuses_a_recipe_that_changes_the_trajectory_and_takes_more_steps() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 8, "      checkpoint: {every: 4}\n");
    let out_dir = dir.path().join("run");
    assert_exit(&run(dir.path(), &recipe, &[]), 0);
    unfinish(&out_dir);

    let wider = run(dir.path(), &recipe, &["--resume", "stages.pretrain.config.model.hidden_size=48"]);
    assert_exit(&wider, 1);
    let err = stderr(&wider);
    assert!(err.contains("checkpoints/step-00000004: the recipe differs from the one it was made under in `model.hidden_size` (32 in the checkpoint, 48 now)"), "{err}");
    assert!(err.contains("start over with --overwrite"), "{err}");
    let resolved = std::fs::read_to_string(out_dir.join("recipe.yaml")).unwrap();
    assert!(!resolved.contains("hidden_size=48"), "the refused recipe is not kept as the run's: {resolved}");
    let reseeded = run(dir.path(), &recipe, &["--resume", "run.seed=3", "stages.pretrain.config.optimizer.lr=0.5"]);
    assert_exit(&reseeded, 1);
    let err = stderr(&reseeded);
    assert!(
        err.contains("`optimizer.lr` (0.01 in the checkpoint, 0.5 now), `run.seed` (7 in the checkpoint, 3 now)"),
        "{err}"
    );

    let shorter = run(dir.path(), &recipe, &["--resume", "stages.pretrain.config.max_steps=2"]);
    assert_exit(&shorter, 1);
    let err = stderr(&shorter);
    assert!(err.contains("max_steps: the run would be 2 steps long, but the checkpoint it resumes ("), "{err}");
    assert!(err.contains("step-00000004) is at step 4: ask for at least 4 steps"), "{err}");
    assert!(!out_dir.join("pretrain/report.json").exists(), "no report of a run that did not happen");

    let longer = run(dir.path(), &recipe, &["--resume", "stages.pretrain.config.max_steps=12"]);
    assert_exit(&longer, 0);
    let err = stderr(&longer);
    assert!(err.contains("resuming with a changed setting: `max_steps` (8 in the checkpoint, 12 now)"), "{err}");
    assert!(err.contains("resuming from step 4"), "{err}");
    let report = stage_report(&out_dir, "pretrain");
    assert_eq!(report["metrics"]["train/steps"], 12.0);
    let steps: Vec<i64> = losses(&out_dir).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [2, 4, 6, 8, 10, 12]);
}

#[test]
fn a_damaged_latest_checkpoint_is_reported_and_the_run_resumes_from_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 16, "      checkpoint: {every: 4, keep: 3}\n");
    let out_dir = dir.path().join("run");
    assert_exit(&run(dir.path(), &recipe, &["stages.pretrain.config.log_every=1"]), 0);
    let expected = losses(&out_dir);
    assert_eq!(expected.len(), 16);
    unfinish(&out_dir);

    // Step 12's weights lost their end; a save killed midway left a staging directory.
    let checkpoints = out_dir.join("pretrain/checkpoints");
    let weights = checkpoints.join("step-00000012/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let staging = checkpoints.join(".step-00000016.partial-4242");
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("model.safetensors"), b"half").unwrap();
    let final_staging = out_dir.join("pretrain/.final.partial-4242");
    std::fs::create_dir(&final_staging).unwrap();

    let out = run(dir.path(), &recipe, &["stages.pretrain.config.log_every=1", "--resume"]);
    assert_exit(&out, 0);
    let err = stderr(&out);
    let damaged = format!(
        "checkpoint {} is damaged and cannot be resumed from: model.safetensors is {} bytes, its manifest says {}",
        checkpoints.join("step-00000012").display(),
        bytes.len() / 2,
        bytes.len()
    );
    assert!(err.contains(&damaged), "{err}");
    assert!(err.contains("resuming from step 8"), "{err}");
    assert!(err.contains(&format!("removed {}, left by a save that did not finish", staging.display())), "{err}");
    assert!(!staging.exists() && !final_staging.exists());
    assert_eq!(losses(&out_dir), expected, "losses after falling back differ from the uninterrupted run");

    // With no intact checkpoint at all, the resume is refused, naming each.
    unfinish(&out_dir);
    for entry in std::fs::read_dir(&checkpoints).unwrap() {
        std::fs::remove_file(entry.unwrap().path().join("trainer_state.json")).unwrap();
    }
    let out = run(dir.path(), &recipe, &["stages.pretrain.config.log_every=1", "--resume"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("no intact checkpoint to resume from ("), "{err}");
    assert!(err.contains("step-00000008: trainer_state.json: "), "{err}");
    assert!(err.contains("start over with --overwrite"), "{err}");
}

#[test]
fn sigterm_checkpoints_exits_143_and_the_run_resumes_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 24, "");
    let settings = ["stages.pretrain.config.log_every=1"];
    let whole = dir.path().join("whole");
    let out = run(dir.path(), &recipe, &[settings[0], &format!("run.output_dir={}", whole.display())]);
    assert_exit(&out, 0);
    let expected = losses(&whole);
    assert_eq!(expected.len(), 24);

    let stopped = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["run", recipe.to_str().unwrap(), settings[0]])
        .current_dir(dir.path())
        .env_remove("PLUMB_PLUGIN_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Plain progress lines (stdout is a pipe): the first comes after the first step.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("[pretrain] step 1/24"), "{first}");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "stdout: {rest:?}\nstderr: {err}");
    assert!(err.contains("stage `pretrain` (pretrain.causal_lm, plugin pretrain 0.1.0) stopped on request"), "{err}");
    assert!(err.contains("on request; resume from "), "{err}");
    assert!(!stopped.join("pretrain/final").exists());
    let saved: Vec<_> = std::fs::read_dir(stopped.join("pretrain/checkpoints")).unwrap().collect();
    assert_eq!(saved.len(), 1);

    let out = run(dir.path(), &recipe, &[settings[0], "--resume"]);
    assert_exit(&out, 0);
    assert!(stderr(&out).contains("resuming from step "), "{}", stderr(&out));
    assert_eq!(losses(&stopped), expected, "losses after resuming differ from the uninterrupted run");
}

#[test]
fn sigterm_during_tokenizer_training_ends_the_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 4, "");
    // A corpus whose tokenizer takes a while to train: the stories eight times over, each
    // copy with words of its own.
    let text = std::fs::read_to_string(repo_root().join("data/tiny_tales.txt")).unwrap();
    let copies: Vec<String> =
        (0..8).map(|i| text.replace("e ", &format!("e{i} ")).replace("a ", &format!("a{i} "))).collect();
    std::fs::write(dir.path().join("corpus.txt"), copies.join("\n\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_plumb"))
        .args(["run", recipe.to_str().unwrap(), "stages.pretrain.config.tokenizer.vocab_size=8000"])
        .current_dir(dir.path())
        .env_remove("PLUMB_PLUGIN_PATH")
        .env("PLUMB_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("training a tokenizer of 8000 tokens") {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "the run ended before training its tokenizer: {seen}");
        seen.push_str(&line);
    }
    let signalled = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(143), "{seen}{rest}");
    assert!(took.as_secs_f64() < 2.0, "the stop took {took:?}");
    assert!(rest.contains("stopped on request during tokenizer training"), "{rest}");
    assert!(!dir.path().join("run/pretrain/checkpoints").exists(), "nothing to resume from yet");
}

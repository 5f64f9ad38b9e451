//! `plumb validate` and `plumb run` on bad recipes: every error names the file, line,
//! column and key path, and nothing is computed.
mod common;

use common::*;

const QUICKSTART: &str = "recipes/quickstart.yaml";

fn validate(args: &[&str]) -> std::process::Output {
    let mut all = vec!["validate"];
    all.extend_from_slice(args);
    plumb(&repo_root(), &all)
}

#[test]
fn the_quickstart_recipe_validates_and_prints_resolved() {
    let out = validate(&[
        QUICKSTART,
        "stages.pretrain.config.max_steps=50",
        "stages.pretrain.config.schedule.warmup_steps=5",
    ]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("max_steps: 50"), "{text}");
    assert!(text.contains("seed: 1234"), "{text}");
}

#[test]
fn a_typo_in_a_stage_key_names_the_place_and_the_nearest_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_root().join(QUICKSTART)).unwrap().replacen("max_steps:", "max_step:", 1);
    let path = dir.path().join("typo.yaml");
    std::fs::write(&path, &text).unwrap();
    let line = text.lines().position(|l| l.contains("max_step:")).unwrap() + 1;
    let out = plumb(&repo_root(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:{line}:7: stages[0].config.max_step: unknown key", path.display())), "{err}");
    assert!(err.contains("did you mean `max_steps`?"), "{err}");
}

#[test]
fn a_wrong_type_names_what_was_expected() {
    let out = validate(&[QUICKSTART, "stages.pretrain.config.batch_size=many"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(
            "command line override `stages.pretrain.config.batch_size=many`: stages[0].config.batch_size: expected"
        ),
        "{err}"
    );
    assert!(err.contains("\"many\""), "{err}");
}

#[test]
fn a_missing_data_file_is_named_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_root().join(QUICKSTART))
        .unwrap()
        .replace("data/arith/corpus.txt", "data/nowhere.txt");
    let path = dir.path().join("missing.yaml");
    std::fs::write(&path, &text).unwrap();
    let line = text.lines().position(|l| l.contains("nowhere.txt")).unwrap() + 1;
    let out = plumb(&repo_root(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!(
            "{}:{line}:9: stages[0].config.data.train: file not found: `data/nowhere.txt`",
            path.display()
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unknown_stage_name_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = plumb(
        &repo_root(),
        &[
            "run",
            QUICKSTART,
            "stages.pretrain.uses=pretrain.casual_lm",
            &format!("run.output_dir={}", out_dir.display()),
            &format!("rewards.judge.config.model={}", out_dir.join("reward_model/final").display()),
        ],
    );
    assert_exit(&out, 1);
    assert!(
        stderr(&out)
            .contains("stages[0].uses: plugin `pretrain` has no stage or evaluator `casual_lm`; did you mean `pretrain.causal_lm`?"),
        "{}",
        stderr(&out)
    );
    assert!(!out_dir.exists(), "nothing is written before validation passes");
}

#[test]
fn a_plugin_checks_its_own_options_before_compute() {
    let out = validate(&[QUICKSTART, "stages.pretrain.config.data.validation_fraction=1.5"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out)
            .contains("stages[0].config.data.validation_fraction: expected a fraction strictly between 0 and 1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_missing_recipe_is_a_user_error() {
    let out = validate(&["recipes/none.yaml"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("cannot read recipe `recipes/none.yaml`"), "{}", stderr(&out));
}

#[test]
fn data_filter_removes_duplicates_and_low_quality_documents_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let story = |name: &str| {
        format!(
            "{name} went to the park with a friend and they played with a red ball for the whole afternoon. \
             It was a sunny day and the children were happy. They ran on the grass and found a small frog near \
             the pond, and then they walked home together and told their families about the frog and the ball."
        )
    };
    let near = story("Lily").replace("afternoon", "morning");
    let other = "The old fisherman mended his nets every evening while the gulls circled above the harbour. \
                 His grandson watched from the pier and asked about storms, whales and the lighthouse keeper, and the \
                 old man answered each question slowly, as if the sea itself were listening to the story he told."
        .to_string();
    let corpus = [story("Lily"), story("LILY"), near, "too short".to_string(), other.clone()];
    let input = dir.path().join("in.txt");
    std::fs::write(&input, corpus.join("\n\n")).unwrap();
    let output = dir.path().join("out.txt");
    let report = dir.path().join("report.json");
    let out = plumb(
        dir.path(),
        &[
            "data",
            "filter",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_exit(&out, 0);
    let kept = std::fs::read_to_string(&output).unwrap();
    let kept: Vec<&str> = kept.trim_end().split("\n\n").collect();
    assert_eq!(kept, vec![story("Lily").as_str(), other.as_str()]);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let removed: Vec<(String, u64)> = report["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["filter"].as_str().unwrap().to_string(), f["removed"]["documents"].as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        removed,
        vec![("quality.min_words".into(), 1), ("exact_dedup".into(), 1), ("near_dedup".into(), 1)],
        "{report}"
    );
    assert_eq!(report["kept"]["documents"], 2);
    assert!(stdout(&out).contains("wrote 2 documents to"), "{}", stdout(&out));
}

#[test]
fn curation_options_of_the_pretrain_stage_are_checked_before_compute() {
    let out = validate(&[
        QUICKSTART,
        "stages.pretrain.config.data.curation={near_dedup: {num_perm: 128, bands: 20, rows: 5}}",
    ]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(
            "stages[0].config.data.curation.near_dedup.bands: bands × rows must equal num_perm (128), found 20 × 5"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_data_error_of_a_later_stage_is_reported_before_the_first_stage_trains() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 60);
    let broken = dir.path().join("broken.txt");
    std::fs::write(&broken, b"A fine first document.\n\nA second one, with a bad \xff byte.\n").unwrap();
    let second = tiny_pretrain_stage("again", &broken, 2).replace("      model:\n        hidden_size: 32\n        intermediate_size: 64\n        num_hidden_layers: 2\n        num_attention_heads: 2\n", "");
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: run\n  device: cpu\nplugins:\n  - name: pretrain\nstages:\n{}{second}",
            tiny_pretrain_stage("first", &corpus, 4)
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains(&format!("{}: line 3: not valid UTF-8 text", broken.display())), "{err}");
    assert!(err.contains("stages[1].config"), "the error points at the second stage: {err}");
    assert!(!dir.path().join("run/first").exists(), "the first stage did not start");
}

#[test]
fn a_stage_may_not_take_the_name_of_the_run_directorys_tensorboard_folder() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 20);
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run:\n  output_dir: run\nplugins:\n  - name: pretrain\nstages:\n{}",
            tiny_pretrain_stage("tb", &corpus, 2)
        ),
    )
    .unwrap();
    let out = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("stages[0].name: stage name `tb` is taken"), "{}", stderr(&out));
}

/// Logs written to a file or a pipe are plain text: no colour escape codes, whatever
/// NO_COLOR says, and the help names the variables that shape them.
#[test]
fn logs_into_a_pipe_have_no_escape_codes_and_help_names_the_log_variables() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 40);
    let recipe = dir.path().join("r.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run: {{output_dir: {}, device: cpu}}\nplugins: [{{name: pretrain}}]\nstages:\n{}",
            dir.path().join("out").display(),
            tiny_pretrain_stage("pretrain", &corpus, 2)
        ),
    )
    .unwrap();
    let o = plumb(dir.path(), &["run", recipe.to_str().unwrap()]);
    assert_exit(&o, 0);
    let log = stderr(&o);
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in a piped log:\n{log:?}");
    let help = stdout(&plumb(dir.path(), &["--help"]));
    for variable in ["PLUMB_LOG", "NO_COLOR", "PLUMB_PLUGIN_PATH"] {
        assert!(help.contains(variable), "{help}");
    }
}

/// `run.device: cuda` on a machine without a GPU is refused by `validate`, at its key.
/// A learned reward whose model does not exist and lies outside the run's output
/// directory (where no stage of the run can make it): `validate` refuses it, at its key,
/// as `run` would.
#[test]
fn validate_refuses_a_reward_model_that_no_stage_can_make() {
    let missing = tempfile::tempdir().unwrap().path().join("no_reward_model");
    let o = validate(&[QUICKSTART, &format!("rewards.judge.config.model={}", missing.display())]);
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("rewards[1].config")
            && err.contains("model")
            && err.contains(&format!("directory not found: `{}`", missing.display()))
            && err.contains("runs/quickstart"),
        "{err}"
    );
}

#[test]
fn validate_refuses_a_cuda_device_on_a_machine_without_one() {
    if plumb_core::tch::Cuda::device_count() > 0 {
        return; // this machine has the device; nothing to refuse
    }
    let o = validate(&["recipes/quickstart.yaml", "run.device=cuda"]);
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("run.device") && err.contains("cuda:0 asked for, but libtorch sees 0 CUDA device(s)"),
        "{err}"
    );
}

/// `plumb recipes` lists every shipped recipe with its summary; `plumb init` copies one,
/// byte for byte, and never overwrites a file.
#[test]
fn shipped_recipes_are_listed_and_copied_to_start_from() {
    let dir = tempfile::tempdir().unwrap();
    let listed = stdout(&plumb(dir.path(), &["recipes"]));
    for entry in std::fs::read_dir(repo_root().join("recipes")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().trim_end_matches(".yaml").to_owned();
        assert!(listed.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing from:\n{listed}");
    }
    assert!(listed.contains("The whole alignment pipeline on a laptop CPU"), "{listed}");

    let o = plumb(dir.path(), &["init", "sft"]);
    assert_exit(&o, 0);
    let copied = std::fs::read(dir.path().join("sft.yaml")).unwrap();
    assert_eq!(copied, std::fs::read(repo_root().join("recipes/sft.yaml")).unwrap());
    let again = plumb(dir.path(), &["init", "sft"]);
    assert_exit(&again, 1);
    assert!(stderr(&again).contains("sft.yaml already exists; not overwriting it"), "{}", stderr(&again));
    let o = plumb(dir.path(), &["init", "quickstart", "mine.yaml"]);
    assert_exit(&o, 0);
    assert!(dir.path().join("mine.yaml").is_file());
    let unknown = plumb(dir.path(), &["init", "quikstart"]);
    assert_exit(&unknown, 1);
    assert!(
        stderr(&unknown).contains("no shipped recipe `quikstart`; did you mean `quickstart`?"),
        "{}",
        stderr(&unknown)
    );
}

/// A filter that removes most of a corpus is named in a warning; one that leaves nothing
/// is an error, and no output is written.
#[test]
fn data_filter_warns_when_most_is_removed_and_fails_when_nothing_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let long = "The old fisherman mended his nets every evening while the gulls circled above the harbour. \
                His grandson watched from the pier and asked about storms, whales and the lighthouse keeper, and the \
                old man answered each question slowly, as if the sea itself were listening to the story he told.";
    let input = dir.path().join("in.txt");
    std::fs::write(&input, ["one two", "three four five", "six", long].join("\n\n")).unwrap();
    let output = dir.path().join("out.txt");
    let filter = |input: &std::path::Path| {
        plumb(dir.path(), &["data", "filter", input.to_str().unwrap(), "-o", output.to_str().unwrap()])
    };
    let o = filter(&input);
    assert_exit(&o, 0);
    assert!(stderr(&o).contains("filter quality.min_words removed 3 of 4 documents (75%)"), "{}", stderr(&o));

    let all_short = dir.path().join("short.txt");
    std::fs::write(&all_short, "one two\n\nthree four").unwrap();
    std::fs::remove_file(&output).unwrap();
    let o = filter(&all_short);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("every one of the 2 documents was removed (quality.min_words 2); nothing written"),
        "{}",
        stderr(&o)
    );
    assert!(!output.exists());
}

/// A stage that starts from a model, with none to start from, is refused by `validate`
/// before any compute; given one (or an earlier stage's), it passes.
#[test]
fn validate_refuses_a_stage_with_no_model_to_start_from() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sft.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Hi\", \"completion\": \"Hello\"}\n{\"prompt\": \"Yo\", \"completion\": \"Hey\"}\n",
    )
    .unwrap();
    let recipe = dir.path().join("r.yaml");
    std::fs::write(
        &recipe,
        format!(
            "run: {{output_dir: {}, device: cpu}}\nplugins: [{{name: sft}}]\nstages:\n  - name: sft\n    uses: sft.sft\n    config:\n      data: {{train: {}, format: prompt_completion}}\n      max_steps: 1\n",
            dir.path().join("out").display(),
            data.display()
        ),
    )
    .unwrap();
    let o = plumb(dir.path(), &["validate", recipe.to_str().unwrap()]);
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("stages[0].config: SFT starts from a model, and this stage has none: give it a `model:`"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists(), "nothing is run");
}

/// `model: {stage: NAME}` starts a stage from the model an earlier stage made, not the
/// previous one's; a name that is not an earlier stage is refused by `validate`.
#[test]
fn a_stage_starts_from_an_earlier_stages_model_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 40);
    let write = |evaluated: &str| {
        let recipe = dir.path().join("r.yaml");
        std::fs::write(
            &recipe,
            format!(
                "run: {{output_dir: {out}, device: cpu}}\nplugins: [{{name: pretrain}}]\nstages:\n{a}{b}  - name: ppl\n    uses: pretrain.perplexity\n    model: {evaluated}\n    config: {{data: {corpus}, seq_len: 16, max_documents: 5}}\n",
                out = dir.path().join("out").display(),
                a = tiny_pretrain_stage("first", &corpus, 2),
                // The second continues from the first (no architecture of its own).
                b = tiny_pretrain_stage("second", &corpus, 2).replace(
                    "      model:\n        hidden_size: 32\n        intermediate_size: 64\n        num_hidden_layers: 2\n        num_attention_heads: 2\n",
                    ""
                ),
                corpus = corpus.display(),
            ),
        )
        .unwrap();
        recipe
    };
    let bad = plumb(dir.path(), &["validate", write("{stage: frist}").to_str().unwrap()]);
    assert_exit(&bad, 1);
    let err = stderr(&bad);
    assert!(
        err.contains("stages[2].model.stage: no earlier stage named `frist` (earlier stages: first, second); did you mean `first`?"),
        "{err}"
    );
    let wrong_type = plumb(dir.path(), &["validate", write("[1]").to_str().unwrap()]);
    assert_exit(&wrong_type, 1);
    assert!(stderr(&wrong_type).contains("or `{stage: <an earlier stage's name>}`"), "{}", stderr(&wrong_type));

    let o = plumb(dir.path(), &["run", write("{stage: first}").to_str().unwrap()]);
    assert_exit(&o, 0);
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/ppl/results.json")).unwrap()).unwrap();
    let scored = std::path::PathBuf::from(results["model"].as_str().unwrap());
    assert_eq!(scored, dir.path().join("out/first/final"));
}

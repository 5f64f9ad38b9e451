//! Plugin loading and the C boundary, through the `plumb` binary.
mod common;

use common::*;

fn recipe(dir: &std::path::Path, plugins: &str, rewards: &str, stages: &str) -> std::path::PathBuf {
    let text = format!(
        "run:\n  output_dir: {out}\n  seed: 5\n  device: cpu\nplugins:\n{plugins}{rewards}stages:\n{stages}",
        out = dir.join("run").display()
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn plugin_entry(name: &str, path: &std::path::Path) -> String {
    format!("  - name: {name}\n    path: {}\n", path.display())
}

#[test]
fn a_custom_plugin_built_out_of_tree_runs_after_a_pretrain_stage() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 200);
    let stages = format!(
        "{}  - name: measure\n    uses: custom.perplexity\n    config:\n      text: {}\n      seq_len: 16\n",
        tiny_pretrain_stage("pretrain", &corpus, 4),
        corpus.display()
    );
    let plugins = format!("  - name: pretrain\n{}", plugin_entry("custom", &example_plugin()));
    let path = recipe(dir.path(), &plugins, "", &stages);
    let out = plumb(dir.path(), &["run", path.to_str().unwrap()]);
    assert_exit(&out, 0);
    // The custom stage got the pretrain stage's model and measured it.
    let report = stage_report(&dir.path().join("run"), "measure");
    let loss = report["metrics"]["eval/loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{report}");
    assert_eq!(report["model"].as_str().unwrap(), dir.path().join("run/pretrain/final").to_str().unwrap());
    assert!((report["metrics"]["eval/perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    // Its tracing line reached the host's log.
    assert!(stderr(&out).contains("perplexity of"), "{}", stderr(&out));
}

#[test]
fn a_stage_scores_with_a_reward_from_another_plugin_through_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = format!(
        "{}{}",
        plugin_entry("probe", &library("libplumb_probe.so")),
        plugin_entry("custom", &example_plugin())
    );
    let rewards = "rewards:\n  - name: short\n    uses: custom.word_count\n    config:\n      target_words: 3\n";
    let stages = "  - name: score\n    uses: probe.score\n    config:\n      reward: short\n      responses: [\"one two three\", \"one\", \"a b c d e f\"]\n";
    let path = recipe(dir.path(), &plugins, rewards, stages);
    let out = plumb(dir.path(), &["run", path.to_str().unwrap()]);
    assert_exit(&out, 0);
    let report = stage_report(&dir.path().join("run"), "score");
    assert_eq!(report["metrics"], serde_json::json!({"score/0": 0.0, "score/1": -2.0, "score/2": -3.0}));
}

#[test]
fn a_reward_config_error_is_located_in_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = format!(
        "{}{}",
        plugin_entry("probe", &library("libplumb_probe.so")),
        plugin_entry("custom", &example_plugin())
    );
    let rewards = "rewards:\n  - name: short\n    uses: custom.word_count\n    config:\n      target_word: 3\n";
    let stages = "  - name: score\n    uses: probe.score\n    config:\n      reward: short\n      responses: []\n";
    let path = recipe(dir.path(), &plugins, rewards, stages);
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!("{}:14:7: rewards[0].config.target_word: unknown key", path.display())),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("did you mean `target_words`?"), "{}", stderr(&out));
}

#[test]
fn a_panicking_stage_is_reported_and_the_host_survives() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_entry("probe", &library("libplumb_probe.so"));
    let path = recipe(dir.path(), &plugins, "", "  - name: boom\n    uses: probe.panic\n");
    let out = plumb(dir.path(), &["run", path.to_str().unwrap()]);
    // Exit code 2 (internal error) from a live process, not an abort (134) or a signal.
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("error: stage `boom` (probe.panic, plugin probe 0.1.0) panicked at "), "{err}");
    assert!(err.contains("probe stage exploded (0 values)"), "{err}");
    assert!(err.contains("tests/fixtures/probe/src/lib.rs:"), "the panic location is reported: {err}");
}

#[test]
fn a_failing_stage_is_a_user_error_naming_plugin_and_stage() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_entry("probe", &library("libplumb_probe.so"));
    let path = recipe(dir.path(), &plugins, "", "  - name: oops\n    uses: probe.fail\n");
    let out = plumb(dir.path(), &["run", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out)
            .contains("error: stage `oops` (probe.fail, plugin probe 0.1.0) failed: the probe failed on purpose"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_plugin_built_for_another_abi_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library("libplumb_abi_mismatch.so");
    let path = recipe(dir.path(), &plugin_entry("abi_mismatch", &lib), "", "  - name: x\n    uses: abi_mismatch.x\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:6:5: plugins[0]: ", path.display())), "{err}");
    assert!(
        err.contains(&format!(
            "{}: plugin ABI version mismatch: this plumb expects ABI version {}, the plugin was built for version {}. Rebuild the plugin against this plumb-core",
            lib.display(),
            plumb_core::plugin::abi::ABI_VERSION,
            plumb_core::plugin::abi::ABI_VERSION + 1
        )),
        "{err}"
    );
}

#[test]
fn a_plugin_built_before_per_plugin_symbols_is_told_to_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library("libplumb_abi_mismatch.so");
    // No `plumb_plugin_legacy` in it: only the old fixed `plumb_plugin_declaration` (ABI 3).
    let path = recipe(dir.path(), &plugin_entry("legacy", &lib), "", "  - name: x\n    uses: legacy.x\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!(
            "{}: plugin ABI version mismatch: this plumb expects ABI version {}, the plugin was built for version 3. \
             Rebuild the plugin",
            lib.display(),
            plumb_core::plugin::abi::ABI_VERSION
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_shared_library_that_is_not_a_plugin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library("libplumb_not_a_plugin.so");
    let path = recipe(dir.path(), &plugin_entry("not_a_plugin", &lib), "", "  - name: x\n    uses: not_a_plugin.x\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!(
            "{}: not a plumb plugin: it exports no `plumb_plugin_not_a_plugin` symbol (a plugin built with \
             `plumb_core::export_plugin!` exports `plumb_plugin_<its name>`; is `not_a_plugin` the name in its \
             `export_plugin!`?)",
            lib.display()
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_file_that_is_not_a_shared_library_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, "not an ELF file").unwrap();
    let path = recipe(dir.path(), &plugin_entry("fake", &fake), "", "  - name: x\n    uses: fake.x\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains(&format!("{}: cannot load shared library: ", fake.display())), "{}", stderr(&out));
}

#[test]
fn a_missing_plugin_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("libgone.so");
    let path = recipe(dir.path(), &plugin_entry("gone", &missing), "", "  - name: x\n    uses: gone.x\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!(
            "{}:7:5: plugins[0].path: {}: plugin file not found",
            path.display(),
            missing.display()
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_plugin_not_found_by_name_lists_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let path = recipe(dir.path(), "  - name: nowhere\n", "", "  - name: x\n    uses: nowhere.x\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("plugins[0].name: plugin `nowhere` not found; looked in "), "{err}");
    assert!(err.contains(&target_dir().display().to_string()), "{err}");
    // What was found instead, and where.
    let pretrain = target_dir().join("libplumb_pretrain.so");
    assert!(err.contains(&format!("`pretrain` ({})", pretrain.display())), "{err}");
}

/// A plugin is found by the name `plumb plugins` lists, whatever its file is called: the
/// example's `libcustom_plugin.so` declares `custom`, and a recipe names it so.
#[test]
fn a_plugin_listed_by_plumb_plugins_loads_by_that_name() {
    let dir = tempfile::tempdir().unwrap();
    let examples = example_plugin().parent().unwrap().to_str().unwrap().to_owned();
    let env = [("PLUMB_PLUGIN_PATH", examples.as_str())];
    let listed = stdout(&plumb_with_env(dir.path(), &["plugins"], &env));
    assert!(listed.contains(&format!("custom 0.1.0  {}", example_plugin().display())), "{listed}");
    let corpus = small_corpus(dir.path(), 20);
    let path = recipe(
        dir.path(),
        "  - name: pretrain\n  - name: custom\n",
        "",
        &format!(
            "{}  - name: ppl\n    uses: custom.perplexity\n    config: {{text: {}}}\n",
            tiny_pretrain_stage("pretrain", &corpus, 2),
            corpus.display()
        ),
    );
    let out = plumb_with_env(dir.path(), &["validate", path.to_str().unwrap()], &env);
    assert_exit(&out, 0);
}

#[test]
fn a_sha256_pin_is_checked_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library("libplumb_probe.so");
    let wrong = "0".repeat(64);
    let plugins = format!("  - name: probe\n    path: {}\n    sha256: \"{wrong}\"\n", lib.display());
    let path = recipe(dir.path(), &plugins, "", "  - name: x\n    uses: probe.fail\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:8:5: plugins[0].sha256: ", path.display())), "{err}");
    assert!(err.contains(&format!("sha256 mismatch: the recipe pins {wrong} but the file has ")), "{err}");
    assert!(err.contains("refusing to load it"), "{err}");

    // The right hash loads.
    let right = plumb_host::plugin::loader::sha256_of(&lib).unwrap();
    let plugins = format!("  - name: probe\n    path: {}\n    sha256: \"{right}\"\n", lib.display());
    let path = recipe(dir.path(), &plugins, "", "  - name: x\n    uses: probe.fail\n");
    assert_exit(&plumb(dir.path(), &["validate", path.to_str().unwrap()]), 0);
}

#[test]
fn an_unknown_stage_suggests_the_nearest_name() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_entry("probe", &library("libplumb_probe.so"));
    let path = recipe(dir.path(), &plugins, "", "  - name: x\n    uses: probe.scores\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!(
            "{}:10:5: stages[0].uses: plugin `probe` has no stage or evaluator `scores`; did you mean `probe.score`?",
            path.display()
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn plugins_lists_what_each_plugin_provides() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plumb"))
        .arg("plugins")
        .env("PLUMB_PLUGIN_PATH", target_dir().join("examples"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains(&format!("pretrain 0.1.0  {}", target_dir().join("libplumb_pretrain.so").display())),
        "{text}"
    );
    assert!(text.contains("    stage     pretrain.causal_lm  Causal language modelling"), "{text}");
    assert!(text.contains("custom 0.1.0  "), "{text}");
    assert!(
        text.contains("    reward    custom.word_count  Prefers responses with a target number of words"),
        "{text}"
    );
    assert!(text.contains("    evaluator pretrain.perplexity  Perplexity and mean token loss"), "{text}");
    // A plugin linking another as a library is listed under its own name.
    assert!(text.contains("sft_counter 0.1.0  "), "{text}");
    assert!(text.contains("    evaluator sft_counter.examples  "), "{text}");
    // Broken plugins next to the others are reported, not fatal.
    assert!(text.contains("plugin ABI version mismatch"), "{text}");
    assert!(text.contains("plugin `twins` declares two stages named `same`"), "{text}");
}

#[test]
fn a_plugin_with_two_components_of_one_name_is_refused_when_it_loads() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library("libplumb_twins.so");
    let path = recipe(dir.path(), &plugin_entry("twins", &lib), "", "  - name: x\n    uses: twins.same\n");
    let out = plumb(dir.path(), &["validate", path.to_str().unwrap()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&format!(
            "{}:6:5: plugins[0]: {}: plugin `twins` declares two stages named `same`; each stage, evaluator and reward \
             of a plugin needs a name of its own",
            path.display(),
            lib.display()
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_plugin_linking_the_sft_plugin_as_a_library_runs_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 200);
    let text = std::fs::read_to_string(repo_root().join("data/tiny_tales_sft.jsonl")).unwrap();
    let instructions = dir.path().join("instructions.jsonl");
    std::fs::write(&instructions, text.lines().take(20).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    // Both libraries define the `sft` plugin's declaration symbol (the fixture links
    // plumb-sft); each plugin is read from its own library.
    let plugins = format!(
        "  - name: pretrain\n  - name: sft\n{}",
        plugin_entry("sft_counter", &library("libplumb_sft_counter.so"))
    );
    let stages = format!(
        "{pretrain}  - name: sft\n    uses: sft.sft\n    config:\n      data:\n        train: {data}\n        format: alpaca\n      \
         max_length: 64\n      batch_size: 2\n      max_steps: 2\n      eval:\n        num_prompts: 1\n        max_new_tokens: 4\n\
         \x20 - name: count\n    uses: sft_counter.examples\n    config:\n      data: {data}\n      format: alpaca\n",
        pretrain = tiny_pretrain_stage("pretrain", &corpus, 4),
        data = instructions.display()
    );
    let path = recipe(dir.path(), &plugins, "", &stages);
    let out = plumb(dir.path(), &["run", path.to_str().unwrap()]);
    assert_exit(&out, 0);
    let run = dir.path().join("run");
    let sft = stage_report(&run, "sft");
    assert_eq!(sft["model"].as_str(), Some(run.join("sft/final").to_str().unwrap()), "{sft}");
    assert_eq!(sft["metrics"]["train/steps"], 2.0, "{sft}");
    let count: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("count/results.json")).unwrap()).unwrap();
    assert_eq!(
        count["metrics"],
        serde_json::json!({"data/examples": 20.0, "data/skipped": 0.0, "data/turns": 40.0}),
        "{count}"
    );
    assert_eq!(count["model"].as_str(), Some(run.join("sft/final").to_str().unwrap()));
    let events = read_tensorboard(&run.join("tb/count"));
    assert_eq!(events["scalars"]["data/examples"], serde_json::json!([[0, 20.0]]), "{events}");
}

/// A normal build (`cargo build`, `./dev build`) builds the workspace's default members:
/// every plugin under plugins/, and no test fixture, so `plumb plugins` never lists one.
#[test]
fn a_normal_build_builds_every_plugin_and_no_test_fixture() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let defaults: Vec<&str> =
        metadata["workspace_default_members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    let manifest_of = |id: &str| {
        metadata["packages"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap()["manifest_path"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let built: Vec<String> = defaults.iter().map(|id| manifest_of(id)).collect();
    assert!(built.iter().all(|m| !m.contains("tests/fixtures")), "{built:?}");
    for plugin in std::fs::read_dir(repo_root().join("plugins")).unwrap() {
        let manifest = plugin.unwrap().path().join("Cargo.toml");
        assert!(built.contains(&manifest.display().to_string()), "{} is not built by default", manifest.display());
    }
}

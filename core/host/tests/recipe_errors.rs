//! Recipe errors as the user sees them: exact messages with file, line and column.
use std::path::{Path, PathBuf};

use plumb_host::recipe::{parse_section, Device, LoadedRecipe, Recipe, RecipeError};
use serde::Deserialize;

/// Line numbers in the tests below refer to this text.
const RECIPE: &str = "\
# plumb run recipe.yaml
run:
  output_dir: runs/test
  seed: 1234
plugins:
  - name: pretrain
  - name: sft
stages:
  - name: pretrain
    uses: pretrain.causal_lm
    config:
      max_steps: 300
      optimizer:
        lr: 0.001
  - name: sft
    uses: sft.chat
    config:
      data: data/chat.jsonl
";

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// Writes `text` as `recipe.yaml` in a fresh temporary directory.
fn fixture(text: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    Fixture { _dir: dir, path }
}

fn load(f: &Fixture, overrides: &[&str]) -> Result<LoadedRecipe, RecipeError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Recipe::load(&f.path, &overrides)
}

/// The error for `text` (edited from RECIPE) with `overrides`, and the file's path.
fn error(text: &str, overrides: &[&str]) -> (String, PathBuf) {
    let f = fixture(text);
    let message = load(&f, overrides).unwrap_err().to_string();
    (message, f.path.clone())
}

fn at(path: &Path, line: usize, column: usize, rest: &str) -> String {
    format!("{}:{line}:{column}: {rest}", path.display())
}

#[test]
fn the_fixture_loads() {
    let f = fixture(RECIPE);
    let loaded = load(&f, &[]).unwrap();
    let recipe = loaded.recipe();
    assert_eq!(recipe.run.name, "recipe");
    assert_eq!(recipe.run.seed, 1234);
    assert_eq!(recipe.run.device, Device::Auto);
    assert_eq!(recipe.stages[1].uses_parts(), ("sft", "chat"));
    assert_eq!(loaded.path(), f.path.as_path());
    assert_eq!(loaded.stage_config_yaml(1), "data: data/chat.jsonl\n");
}

#[test]
fn typo_in_a_key_suggests_the_right_one() {
    let (message, path) = error(&RECIPE.replace("  seed: 1234", "  sed: 1234"), &[]);
    assert_eq!(
        message,
        at(
            &path,
            4,
            3,
            "run.sed: unknown key; expected one of `name`, `output_dir`, `seed`, `device`; did you mean `seed`?"
        )
    );
    let (message, path) = error(&RECIPE.replace("    uses: sft.chat", "    uses: sft.chat\n    modle: runs/x"), &[]);
    assert_eq!(
        message,
        at(
            &path,
            17,
            5,
            "stages[1].modle: unknown key; expected one of `name`, `uses`, `model`, `config`, `summary`; did you mean `model`?"
        )
    );
}

#[test]
fn wrong_type() {
    let (message, path) = error(&RECIPE.replace("seed: 1234", "seed: abc"), &[]);
    assert_eq!(message, at(&path, 4, 3, "run.seed: expected an unsigned integer, found a string \"abc\""));
    let (message, path) = error(&RECIPE.replace("  - name: sft\n    uses", "  - name: [sft]\n    uses"), &[]);
    assert_eq!(message, at(&path, 15, 5, "stages[1].name: expected a string, found a sequence"));
    let (message, path) = error(&RECIPE.replace("      data: data/chat.jsonl\n", "      - data\n"), &[]);
    assert_eq!(message, at(&path, 17, 5, "stages[1].config: expected a mapping, found a sequence"));
}

#[test]
fn missing_required_key_points_at_the_parent() {
    let (message, path) = error(&RECIPE.replace("  output_dir: runs/test\n", ""), &[]);
    assert_eq!(message, at(&path, 2, 1, "run: missing required key `output_dir`"));
    let (message, path) = error(&RECIPE.replace("    uses: sft.chat\n", ""), &[]);
    assert_eq!(message, at(&path, 15, 5, "stages[1]: missing required key `uses`"));
}

#[test]
fn unknown_device() {
    let (message, path) = error(&RECIPE.replace("  seed: 1234", "  device: gpu"), &[]);
    assert_eq!(
        message,
        at(&path, 4, 3, "run.device: unknown device `gpu`; expected `auto`, `cpu`, `cuda` or `cuda:N`")
    );
    let (message, path) = error(&RECIPE.replace("  seed: 1234", "  device: cdua"), &[]);
    assert_eq!(
        message,
        at(
            &path,
            4,
            3,
            "run.device: unknown device `cdua`; expected `auto`, `cpu`, `cuda` or `cuda:N`; did you mean `cuda`?"
        )
    );
    let f = fixture(&RECIPE.replace("  seed: 1234", "  device: cuda:1"));
    assert_eq!(load(&f, &[]).unwrap().recipe().run.device, Device::Cuda(1));
}

#[test]
fn duplicate_stage_names() {
    let (message, path) = error(&RECIPE.replace("  - name: sft\n    uses", "  - name: pretrain\n    uses"), &[]);
    assert_eq!(message, at(&path, 15, 5, "stages[1].name: duplicate stage name `pretrain`; stages[0] has it already"));
}

#[test]
fn other_structural_errors() {
    let (message, path) = error(&RECIPE.replace("uses: sft.chat", "uses: chat"), &[]);
    assert_eq!(
        message,
        at(&path, 16, 5, "stages[1].uses: expected `<plugin>.<stage>`, e.g. `pretrain.causal_lm`, found `chat`")
    );
    let (message, path) = error(&RECIPE.replace("uses: sft.chat", "uses: stf.chat"), &[]);
    assert_eq!(
        message,
        at(&path, 16, 5, "stages[1].uses: plugin `stf` is not listed under `plugins` (listed: `pretrain`, `sft`); did you mean `sft`?")
    );
    let (message, path) = error(&RECIPE.replace("  - name: sft\n    uses", "  - name: s/ft\n    uses"), &[]);
    assert_eq!(
        message,
        at(&path, 15, 5, "stages[1].name: bad stage name: `s/ft` contains '/'; use only letters, digits, `_` and `-`")
    );
    let (message, path) =
        error(&RECIPE.replace("  - name: sft\nstages:", "  - name: sft\n    sha256: beef\nstages:"), &[]);
    assert_eq!(
        message,
        at(&path, 8, 5, "plugins[1].sha256: expected 64 hexadecimal digits (a SHA-256 digest), found 4 characters")
    );
    let (message, path) = error("run: {output_dir: o}\nplugins: [{name: p}]\nstages: []\n", &[]);
    assert_eq!(message, at(&path, 3, 1, "stages: expected at least one stage"));
}

#[test]
fn yaml_syntax_errors() {
    let (message, path) = error(&RECIPE.replace("  seed: 1234", "  seed: [1234"), &[]);
    assert_eq!(
        message,
        at(&path, 5, 8, "YAML syntax error: did not find expected ',' or ']', while parsing a flow sequence")
    );
    let (message, path) = error(&RECIPE.replace("  seed: 1234", "\tseed: 1234"), &[]);
    assert_eq!(
        message,
        at(
            &path,
            4,
            1,
            "YAML syntax error: found a tab character that violates indentation, while scanning a plain scalar"
        )
    );
    let (message, path) = error(&RECIPE.replace("  seed: 1234", "  seed: 1234\n  seed: 5"), &[]);
    assert_eq!(message, at(&path, 5, 3, "run: duplicate key `seed` (first at line 4, column 3)"));
    let (message, path) = error(&RECIPE.replace("  seed: 1234", "  seed: &s 1234"), &[]);
    assert_eq!(message, at(&path, 4, 12, "YAML anchors and aliases (`&name`, `*name`) are not supported in recipes"));
}

#[test]
fn broken_files() {
    let (message, path) = error("", &[]);
    assert_eq!(message, at(&path, 1, 1, "the recipe is empty; expected a mapping with `run`, `plugins` and `stages`"));
    let (message, path) = error("- run\n- stages\n", &[]);
    assert_eq!(message, at(&path, 1, 1, "expected a mapping with `run`, `plugins` and `stages`, found a sequence"));
    let f = fixture("");
    std::fs::write(&f.path, b"run:\n  name: ab\xff\n").unwrap();
    assert_eq!(load(&f, &[]).unwrap_err().to_string(), at(&f.path, 2, 11, "the file is not UTF-8 text"));
    let missing = f.path.with_file_name("nope.yaml");
    let e = Recipe::load(&missing, &[]).unwrap_err();
    assert!(matches!(e, RecipeError::Read { .. }));
    assert!(e.to_string().starts_with(&format!("cannot read recipe `{}`: ", missing.display())), "{e}");
}

#[test]
fn override_sets_a_nested_key() {
    let f = fixture(RECIPE);
    let loaded =
        load(&f, &["run.seed=7", "stages.0.config.optimizer.lr=3e-4", "stages[0].config.optimizer.betas=[0.9, 0.95]"])
            .unwrap();
    assert_eq!(loaded.recipe().run.seed, 7);
    assert_eq!(loaded.stage_config_yaml(0), "max_steps: 300\noptimizer:\n  lr: 0.0003\n  betas:\n  - 0.9\n  - 0.95\n");
    assert_eq!(loaded.overrides().len(), 3);
}

#[test]
fn override_selects_a_stage_by_name() {
    let f = fixture(RECIPE);
    let loaded = load(&f, &["stages.sft.config.max_steps=10", "stages.pretrain.uses=sft.chat"]).unwrap();
    assert_eq!(loaded.stage_config_yaml(1), "data: data/chat.jsonl\nmax_steps: 10\n");
    assert_eq!(loaded.recipe().stages[0].uses, "sft.chat");
    let (message, _) = error(RECIPE, &["stages.stf.config.max_steps=10"]);
    assert_eq!(
        message,
        "command line override `stages.stf.config.max_steps=10`: `stages` has no entry named `stf`; expected one of `pretrain`, `sft`; did you mean `sft`?"
    );
}

#[test]
fn override_with_a_bad_value_points_at_the_override() {
    let (message, _) = error(RECIPE, &["run.seed=abc"]);
    assert_eq!(
        message,
        "command line override `run.seed=abc`: run.seed: expected an unsigned integer, found a string \"abc\""
    );
    let (message, _) = error(RECIPE, &["run.sed=1"]);
    assert_eq!(
        message,
        "command line override `run.sed=1`: run.sed: unknown key; expected one of `name`, `output_dir`, `seed`, `device`; did you mean `seed`?"
    );
    let (message, _) = error(RECIPE, &["run.seed.x=1"]);
    assert_eq!(message, "command line override `run.seed.x=1`: cannot go inside `run.seed`: it is the integer 1234, not a mapping or a sequence");
    let (message, _) = error(RECIPE, &["run.seed"]);
    assert_eq!(
        message,
        "command line override `run.seed`: expected `key.path=value`, e.g. `stages.pretrain.config.max_steps=10`"
    );
    let (message, _) = error(RECIPE, &["stages.5.config.x=1"]);
    assert_eq!(message, "command line override `stages.5.config.x=1`: index 5 is out of range: `stages` has 2 entries");
}

#[test]
fn error_at_a_nested_config_path() {
    let f = fixture(RECIPE);
    let loaded = load(&f, &[]).unwrap();
    let e = loaded.error_at("stages[0].config.optimizer.lr", "must be positive");
    assert_eq!(e.to_string(), at(&f.path, 14, 9, "stages[0].config.optimizer.lr: must be positive"));
    assert_eq!(e.key_path(), "stages[0].config.optimizer.lr");
    let e = loaded.error_at("stages.sft.config.data", "no such file: data/chat.jsonl");
    assert_eq!(e.to_string(), at(&f.path, 18, 7, "stages[1].config.data: no such file: data/chat.jsonl"));
}

#[test]
fn error_at_a_missing_path_points_at_its_parent() {
    let f = fixture(RECIPE);
    let loaded = load(&f, &[]).unwrap();
    let e = loaded.error_at("stages[0].config.optimizer.betas", "missing required key `betas`");
    assert_eq!(e.to_string(), at(&f.path, 13, 7, "stages[0].config.optimizer.betas: missing required key `betas`"));
    let e = loaded.error_at("stages[1].config.tokenizer.path", "required");
    assert_eq!(e.to_string(), at(&f.path, 17, 5, "stages[1].config.tokenizer.path: required"));
}

#[test]
fn error_at_a_value_set_by_an_override() {
    let f = fixture(RECIPE);
    let loaded = load(&f, &["stages.pretrain.config.optimizer={lr: -1}"]).unwrap();
    let e = loaded.error_at("stages[0].config.optimizer.lr", "must be positive");
    assert_eq!(e.to_string(), "command line override `stages.pretrain.config.optimizer={lr: -1}`: stages[0].config.optimizer.lr: must be positive");
    let e = loaded.error_at("stages[0].config.max_steps", "too many");
    assert_eq!(e.to_string(), at(&f.path, 12, 7, "stages[0].config.max_steps: too many"));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Optimizer {
    learning_rate: f64,
    #[serde(default)]
    warmup_steps: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PretrainConfig {
    max_steps: u64,
    optimizer: Optimizer,
}

#[test]
fn parse_section_errors_have_paths_and_place_in_the_recipe() {
    let f = fixture(&RECIPE.replace("        lr: 0.001", "        lerning_rate: 0.001"));
    // The plugin's struct has `learning_rate` and `warmup_steps`.
    let loaded = load(&f, &[]).unwrap();
    let e = parse_section::<PretrainConfig>(&loaded.stage_config_yaml(0)).unwrap_err();
    assert_eq!(e.path, "optimizer.lerning_rate");
    assert_eq!(
        e.message,
        "unknown key; expected one of `learning_rate`, `warmup_steps`; did you mean `learning_rate`?"
    );
    // It crosses from the plugin to the host as JSON.
    let e: plumb_host::recipe::SectionError = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
    assert_eq!(
        loaded.section_error("stages[0].config", &e).to_string(),
        at(&f.path, 14, 9, "stages[0].config.optimizer.lerning_rate: unknown key; expected one of `learning_rate`, `warmup_steps`; did you mean `learning_rate`?")
    );
    assert_eq!(
        loaded.error_at(&format!("stages[0].config.{}", e.path), e.message.clone()).to_string(),
        loaded.section_error("stages[0].config", &e).to_string()
    );

    let f = fixture(&RECIPE.replace("max_steps: 300", "max_steps: lots").replace("lr: 0.001", "learning_rate: 0.001"));
    let loaded = load(&f, &[]).unwrap();
    let e = parse_section::<PretrainConfig>(&loaded.stage_config_yaml(0)).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("max_steps", "expected an unsigned integer, found a string \"lots\"")
    );
    assert_eq!(
        loaded.section_error("stages[0].config", &e).to_string(),
        at(&f.path, 12, 7, "stages[0].config.max_steps: expected an unsigned integer, found a string \"lots\"")
    );

    let e = parse_section::<PretrainConfig>("max_steps: 1\n").unwrap_err();
    assert_eq!((e.path.as_str(), e.message.as_str()), ("", "missing required key `optimizer`"));
    assert_eq!(
        loaded.section_error("stages[0].config", &e).to_string(),
        at(&f.path, 11, 5, "stages[0].config: missing required key `optimizer`")
    );
}

#[test]
fn resolved_yaml_reloads_to_the_same_recipe() {
    let f = fixture(RECIPE);
    let loaded = load(&f, &["stages.sft.config.max_steps=10"]).unwrap();
    let again = fixture(&loaded.resolved_yaml());
    let reloaded = load(&again, &[]).unwrap();
    assert_eq!(reloaded.recipe(), loaded.recipe());
    assert!(loaded.resolved_yaml().contains("# override: stages.sft.config.max_steps=10\n"));
}

/// Every shipped recipe parses and validates (plugins are not loaded).
#[test]
fn every_shipped_recipe_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut loaded = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            if let Err(e) = Recipe::load(&path, &[]) {
                panic!("{e}");
            }
            loaded += 1;
        }
    }
    assert!(loaded >= 6, "only {loaded} recipes in {}", dir.display());
}

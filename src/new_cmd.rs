//! `plumb new plugin NAME [--path DIR]`: a plugin crate that builds and loads as written.
//!
//! plumb-core is not on crates.io (the name there belongs to another project), so the
//! crate depends on this checkout's `core/` and `core/link/` by path. It gets this
//! checkout's `Cargo.lock` (the versions plumb is tested with) and its build profiles
//! (tch glue is slow unoptimised), so with `CARGO_TARGET_DIR` pointing at the checkout's
//! `target/` it reuses plumb's compiled dependencies instead of building libtorch's
//! bindings again.
use std::path::{Path, PathBuf};

use crate::Failure;

#[derive(clap::Subcommand)]
pub enum New {
    /// A plugin crate: manifest, build script, a stage with its config struct, a recipe
    /// that runs it, a test, and a README saying how to build it.
    Plugin(NewPluginArgs),
}

#[derive(clap::Args)]
pub struct NewPluginArgs {
    /// The plugin's name, as recipes write it before the dot (`NAME.samples`):
    /// lowercase letters, digits and `_`, starting with a letter.
    pub name: String,
    /// The directory to create; default `plumb-NAME` in the current directory. It must
    /// not exist yet.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// The plumb checkout whose `core/` the plugin builds against; default the one this
    /// `plumb` was built from.
    #[arg(long)]
    pub plumb_dir: Option<PathBuf>,
}

pub fn run(new: &New) -> Result<(), Failure> {
    match new {
        New::Plugin(args) => plugin(args),
    }
}

fn plugin(args: &NewPluginArgs) -> Result<(), Failure> {
    let name = &args.name;
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(Failure::User(format!(
            "plugin name `{name}`: expected lowercase letters, digits and `_`, starting with a letter (e.g. `my_eval`)"
        )));
    }
    let checkout = args.plumb_dir.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let checkout =
        checkout.canonicalize().map_err(|e| Failure::User(format!("--plumb-dir {}: {e}", checkout.display())))?;
    if !checkout.join("core/Cargo.toml").is_file() || !checkout.join("core/link/Cargo.toml").is_file() {
        return Err(Failure::User(format!(
            "{}: not a plumb checkout (no core/Cargo.toml); pass --plumb-dir with the checkout to build against",
            checkout.display()
        )));
    }
    let dir = args.path.clone().unwrap_or_else(|| PathBuf::from(format!("plumb-{name}")));
    if dir.exists() {
        return Err(Failure::User(format!("{} already exists; choose another --path", dir.display())));
    }
    let plumb = std::env::current_exe().map_err(|e| Failure::Internal(format!("the path of plumb: {e}")))?;
    let profiles = profiles(&checkout.join("Cargo.toml"))?;
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{checkout}}", &checkout.display().to_string())
            .replace("{{plumb}}", &plumb.display().to_string())
            .replace("{{profiles}}", &profiles)
    };
    let files = [
        ("Cargo.toml", fill(MANIFEST)),
        ("build.rs", fill(BUILD_SCRIPT)),
        ("src/lib.rs", fill(LIB)),
        ("recipe.yaml", fill(RECIPE)),
        ("tests/recipe.rs", fill(TEST)),
        ("README.md", fill(README)),
        (".gitignore", "/target\n/runs\n".to_owned()),
    ];
    for (file, text) in &files {
        write(&dir.join(file), text)?;
    }
    // The versions plumb is built and tested with.
    if let Ok(lock) = std::fs::read(checkout.join("Cargo.lock")) {
        write(&dir.join("Cargo.lock"), &String::from_utf8_lossy(&lock))?;
    }
    println!("created plugin `{name}` in {}", dir.display());
    println!("build it:  cd {} && LIBTORCH={} cargo build", dir.display(), libtorch_hint());
    println!("run it:    {} run recipe.yaml", plumb.display());
    println!("(README.md there says more; `cargo test` runs its recipe.)");
    Ok(())
}

/// The `[profile.*]` sections of plumb's manifest, verbatim.
fn profiles(manifest: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(manifest).map_err(|e| Failure::User(format!("{}: {e}", manifest.display())))?;
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with('[') {
            inside = line.starts_with("[profile.");
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Where this plumb's libtorch is, for the build hint.
fn libtorch_hint() -> String {
    std::env::var("LIBTORCH").unwrap_or_else(|_| "$(./dev env | sed s/LIBTORCH=//)".into())
}

fn write(path: &Path, text: &str) -> Result<(), Failure> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Failure::User(format!("{}: {e}", parent.display())))?;
    }
    std::fs::write(path, text).map_err(|e| Failure::User(format!("{}: {e}", path.display())))
}

const MANIFEST: &str = r#"[package]
name = "plumb-{{name}}"
description = "A plumb plugin"
version = "0.1.0"
edition = "2021"

# Standalone, even when created inside another workspace.
[workspace]

[lib]
# cdylib: what plumb loads; rlib: so tests and other crates can use the stage's types.
crate-type = ["cdylib", "rlib"]

[dependencies]
# plumb-core is not on crates.io: build against a plumb checkout.
plumb-core = { path = "{{checkout}}/core" }
serde = { version = "1", features = ["derive"] }
serde_json = "1"
# Each config derives `schemars::JsonSchema`: `plumb explain` shows its options.
schemars = "1"
tracing = "0.1"

[build-dependencies]
# Links libtorch_cuda and sets an rpath to libtorch, so the plugin loads without LD_LIBRARY_PATH.
plumb-link = { path = "{{checkout}}/core/link" }

# plumb's own build profiles: tensor glue is slow unoptimised, and equal settings let
# CARGO_TARGET_DIR={{checkout}}/target reuse plumb's compiled dependencies.
{{profiles}}"#;

const BUILD_SCRIPT: &str = r#"fn main() {
    plumb_link::libtorch();
}
"#;

const LIB: &str = r#"//! The plumb plugin `{{name}}`.
//!
//! - `{{name}}.samples`: greedy continuations of a few prompts by the pipeline's current
//!   model, written to `samples.jsonl` in the stage's directory and to TensorBoard as
//!   text; the model is handed on unchanged.
//!
//! Add stages, evaluators and rewards to `export_plugin!` below; `plumb plugins` lists
//! what a built plugin provides.
use plumb_core::model::generate::GenerationSettings;
use plumb_core::plugin::ValidateContext;
use plumb_core::tch::Kind;
use plumb_core::tokenizer::Tokenizer;
use plumb_core::{Error, Result, RunContext, Stage, StageOutput};
use serde::Deserialize;

/// The stage's recipe section (`config:`); unknown keys are errors. `plumb explain
/// {{name}}.samples` lists its keys with their doc comments and defaults.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SamplesConfig {
    /// Texts to continue.
    pub prompts: Vec<String>,
    /// New tokens per prompt, at most.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
}

fn default_max_new_tokens() -> usize {
    32
}

pub struct Samples;

impl Stage for Samples {
    const NAME: &'static str = "samples";
    const DESCRIPTION: &'static str = "Greedy continuations of a few prompts by the current model";
    type Config = SamplesConfig;

    fn validate(c: &SamplesConfig, ctx: &ValidateContext) -> Result<()> {
        if c.prompts.is_empty() || c.prompts.iter().any(|p| p.trim().is_empty()) {
            return Err(Error::config("prompts", "expected a list of non-empty texts"));
        }
        if !(1..=4096).contains(&c.max_new_tokens) {
            return Err(Error::config("max_new_tokens", "expected a number from 1 to 4096"));
        }
        ctx.require_input_model("samples continues prompts with a model")
    }

    fn run(c: SamplesConfig, ctx: &mut RunContext) -> Result<StageOutput> {
        let dir = ctx
            .input_model()
            .ok_or_else(|| Error::config("model", "this stage needs an input model: an earlier stage's, or `model:`"))?
            .to_path_buf();
        let model = plumb_core::model::load(&dir, ctx.device(), Kind::Float)?;
        let tokenizer = Tokenizer::from_dir(&dir)?;
        let settings = GenerationSettings {
            max_new_tokens: c.max_new_tokens,
            temperature: 0.0,
            stop_tokens: tokenizer.eos_ids(),
            pad_token: tokenizer.pad_id().unwrap_or(0),
            ..Default::default()
        };
        let mut lines = String::new();
        let mut text = String::new();
        for prompt in &c.prompts {
            let ids = tokenizer.encode_prompt(prompt)?;
            let out = model.generate(&[ids], &settings)?;
            let continuation = tokenizer.decode(&out[0].tokens)?;
            lines.push_str(&serde_json::json!({"prompt": prompt, "continuation": continuation}).to_string());
            lines.push('\n');
            text.push_str(&format!("**{prompt}** {continuation}\n\n"));
        }
        std::fs::write(ctx.stage_dir().join("samples.jsonl"), lines)
            .map_err(|e| Error::Other(format!("{}: {e}", ctx.stage_dir().display())))?;
        ctx.text("samples", 0, &text);
        tracing::info!("wrote {} samples", c.prompts.len());
        Ok(StageOutput { model: Some(dir), ..Default::default() })
    }
}

plumb_core::export_plugin! {
    name: "{{name}}",
    version: env!("CARGO_PKG_VERSION"),
    description: "A plumb plugin",
    stages: [Samples],
    evaluators: [],
    rewards: [],
}
"#;

const RECIPE: &str = r#"# Pretrain a tiny model on plumb's shipped corpus, then run `{{name}}.samples` on it.
#
#   cargo build && plumb run recipe.yaml
run:
  name: {{name}}
  output_dir: runs/{{name}}
  seed: 1
  device: auto

plugins:
  - name: pretrain            # plumb's own, found next to the plumb executable
  - name: {{name}}
    path: target/debug/libplumb_{{name}}.so

stages:
  - name: pretrain
    uses: pretrain.causal_lm
    config:
      data:
        train: {{checkout}}/data/tiny_tales.txt
        seq_len: 32
      tokenizer:
        vocab_size: 300
      model:
        hidden_size: 32
        intermediate_size: 64
        num_hidden_layers: 2
        num_attention_heads: 2
      optimizer:
        lr: 1.0e-2
      batch_size: 8
      max_steps: 20
      eval:
        every: 20
        max_batches: 2

  - name: samples
    uses: {{name}}.samples
    config:
      prompts: ["One day, Lily", "The little fox"]
      max_new_tokens: 16
"#;

const TEST: &str = r#"//! Runs recipe.yaml with plumb (`PLUMB` names the executable; default the one that
//! created this crate) and reads back what the stage wrote.
use std::path::PathBuf;

#[test]
fn the_recipe_runs_and_writes_samples() {
    let plumb = std::env::var_os("PLUMB").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("{{plumb}}"));
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let plugin = std::env::var_os("PLUGIN").map(PathBuf::from).unwrap_or_else(|| crate_dir.join("target/debug/libplumb_{{name}}.so"));
    let out = tempfile_dir();
    let output = std::process::Command::new(&plumb)
        .current_dir(&crate_dir)
        .args(["run", "recipe.yaml", "--overwrite"])
        .arg(format!("run.output_dir={}", out.display()))
        .arg(format!("plugins.1.path={}", plugin.display()))
        .arg("run.device=cpu")
        .output()
        .expect("plumb runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let samples = std::fs::read_to_string(out.join("samples/samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 2, "{samples}");
    for line in samples.lines() {
        let sample: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(sample["prompt"].as_str().is_some() && sample["continuation"].as_str().is_some());
    }
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plumb-{{name}}-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
"#;

const README: &str = r#"# plumb-{{name}}

A plumb plugin, created by `plumb new plugin {{name}}`.

## Build

plumb-core links libtorch through `tch`: point `LIBTORCH` at the libtorch plumb uses
(`./dev env` in the plumb checkout prints it), then build:

```sh
export LIBTORCH=...                              # from `./dev env` in {{checkout}}
CARGO_TARGET_DIR={{checkout}}/target cargo build # reuses plumb's compiled dependencies
# or just `cargo build` (a first build compiles tch and libtorch's bindings: minutes)
```

The build script (`build.rs`, `plumb-link`) gives the library an rpath to libtorch and
links `libtorch_cuda`, so plumb loads it without `LD_LIBRARY_PATH` and sees CUDA.

## Run

```sh
plumb run recipe.yaml        # pretrains a tiny model, then runs {{name}}.samples on it
plumb plugins                # with PLUMB_PLUGIN_PATH=target/debug: what the plugin provides
cargo test                   # runs the recipe and checks what the stage wrote
```

With `CARGO_TARGET_DIR` set, the library is in `$CARGO_TARGET_DIR/debug/`: give that
path in the recipe's `plugins:` entry, or set `PLUGIN` for `cargo test`.

## Next

- `src/lib.rs`: a stage is a type with a config struct (`#[serde(deny_unknown_fields)]`),
  `validate` (checks before any compute) and `run` (the work, against `RunContext`);
  evaluators and rewards follow the same shape (see plumb's `examples/`).
- plumb's own plugins (`{{checkout}}/plugins/`) are written the same way.
"#;

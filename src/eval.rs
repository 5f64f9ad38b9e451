//! `plumb eval`: runs one evaluator on a checkpoint (or, with `--predictions`, on
//! generations made elsewhere), without writing a recipe.
//!
//! It builds the one-entry recipe the user would have written —
//!
//! ```yaml
//! run: {name: eval, output_dir: OUTPUT_DIR, device: DEVICE, seed: SEED}
//! plugins: [{name: PLUGIN}]
//! stages: [{name: NAME, uses: PLUGIN.NAME, model: MODEL}]
//! ```
//!
//! — sets the evaluator's config with its `key=value` arguments (as overrides of
//! `stages.0.config.key`) and runs it like `plumb run`: results in
//! `OUTPUT_DIR/NAME/results.json` and `report.json`, TensorBoard scalars in
//! `OUTPUT_DIR/tb/NAME/`, a table on stdout. Errors name the option or argument at fault,
//! not the recipe it built.
use std::path::PathBuf;

use plumb_host::recipe::{Location, Recipe, RecipeError};
use serde_yaml::{Mapping, Value};

use crate::run::{run_loaded, Mode};
use crate::Failure;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The model to evaluate: a checkpoint directory in HF layout. Not needed with
    /// `--predictions`, which scores generations made elsewhere.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The evaluator, `<plugin>.<evaluator>`, e.g. `pretrain.perplexity`.
    #[arg(long)]
    pub evaluator: String,
    /// The evaluator's settings, `key=value` (nested keys with dots; values are YAML),
    /// e.g. `data=corpus.txt seq_len=256`.
    pub settings: Vec<String>,
    /// Score generations made elsewhere (vLLM, an API, an earlier run) instead of a
    /// model's: a JSONL file the evaluator reads (for `cot.gsm8k`: one line per problem,
    /// `{"question": …, "generations": [...]}`). Passed as the evaluator's `predictions`.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Also write the evaluator's report to this file (its `output` setting).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Where the results go: `<DIR>/<evaluator>/results.json` and `<DIR>/tb/<evaluator>/`.
    #[arg(long, default_value = "runs/eval")]
    pub output_dir: PathBuf,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The run's seed, for evaluators that sample or subsample.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Delete the results of an earlier evaluation in the output directory first. Without
    /// it, an evaluation into a directory that holds earlier results is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// The plugin's library; by default found like a recipe's plugins (PLUMB_PLUGIN_PATH,
    /// then next to `plumb`).
    #[arg(long)]
    pub plugin_path: Option<PathBuf>,
}

/// What the built recipe is called in messages that cannot be put in the user's words.
const SOURCE: &str = "plumb eval";

pub fn run(args: &EvalArgs) -> Result<(), Failure> {
    let (plugin, name) =
        args.evaluator.split_once('.').filter(|(p, n)| !p.is_empty() && !n.is_empty()).ok_or_else(|| {
            Failure::User(format!(
                "--evaluator: expected `<plugin>.<evaluator>`, e.g. `pretrain.perplexity`, found `{}`",
                args.evaluator
            ))
        })?;
    if args.model.is_none() && args.predictions.is_none() {
        return Err(Failure::User(
            "--model: expected the model directory to evaluate (only --predictions, which scores generations made elsewhere, needs none)".into(),
        ));
    }
    let mut overrides = Vec::with_capacity(args.settings.len());
    for setting in &args.settings {
        if !setting.contains('=') || setting.starts_with('=') {
            return Err(Failure::User(format!(
                "`{setting}`: expected `key=value` setting a key of the evaluator's config, e.g. `seq_len=256`"
            )));
        }
        overrides.push(format!("stages.0.config.{setting}"));
    }

    let mut plugin_spec = Mapping::new();
    plugin_spec.insert("name".into(), plugin.into());
    if let Some(path) = &args.plugin_path {
        plugin_spec.insert("path".into(), path_value(path));
    }
    let mut run_spec = Mapping::new();
    run_spec.insert("name".into(), "eval".into());
    run_spec.insert("output_dir".into(), path_value(&args.output_dir));
    run_spec.insert("seed".into(), args.seed.into());
    run_spec.insert("device".into(), args.device.clone().into());
    let mut stage = Mapping::new();
    stage.insert("name".into(), name.into());
    stage.insert("uses".into(), args.evaluator.clone().into());
    if let Some(model) = &args.model {
        stage.insert("model".into(), path_value(model));
    }
    // Paths go into the config as YAML strings (not through `key=value`, which would
    // read a path such as `1e5` or `yes` as a number or a boolean).
    let mut config = Mapping::new();
    if let Some(predictions) = &args.predictions {
        config.insert("predictions".into(), path_value(predictions));
    }
    if let Some(output) = &args.output {
        config.insert("output".into(), path_value(output));
    }
    if !config.is_empty() {
        stage.insert("config".into(), Value::Mapping(config));
    }
    let mut recipe = Mapping::new();
    recipe.insert("run".into(), Value::Mapping(run_spec));
    recipe.insert("plugins".into(), Value::Sequence(vec![Value::Mapping(plugin_spec)]));
    recipe.insert("stages".into(), Value::Sequence(vec![Value::Mapping(stage)]));
    let text = serde_yaml::to_string(&Value::Mapping(recipe))
        .map_err(|e| Failure::Internal(format!("cannot write the evaluation recipe: {e}")))?;

    let loaded = Recipe::load_str(&text, SOURCE, &overrides).map_err(|e| Failure::User(render(e, &args.evaluator)))?;
    let mode = if args.overwrite { Mode::Overwrite } else { Mode::Run };
    let choices = "pass --overwrite to delete them and evaluate again, or choose another --output-dir";
    run_loaded(&loaded, mode, &|e| render(e, &args.evaluator), choices)
}

fn path_value(path: &std::path::Path) -> Value {
    Value::String(path.to_string_lossy().into_owned())
}

/// A recipe error in the words of `plumb eval`'s command line: an override of
/// `stages.0.config.seq_len` is the argument `seq_len=…`, `stages[0].model` is `--model`.
fn render(error: RecipeError, evaluator: &str) -> String {
    let RecipeError::At { location, key_path, message } = error else {
        return error.to_string();
    };
    for (key, option) in [("stages[0].config.predictions", "--predictions"), ("stages[0].config.output", "--output")] {
        if key_path == key && matches!(location, Location::File { .. }) {
            return format!("{option}: {message}");
        }
    }
    let config_key =
        key_path.strip_prefix("stages[0].config").map(|rest| rest.strip_prefix('.').unwrap_or(rest).to_owned());
    if let Some(key) = config_key {
        let key = if key.is_empty() { String::new() } else { format!("{key}: ") };
        return match location {
            Location::Override(text) => {
                let setting = text.strip_prefix("stages.0.config.").unwrap_or(&text);
                format!("`{setting}`: {key}{message}")
            }
            Location::File { .. } => format!("evaluator `{evaluator}`: {key}{message}"),
        };
    }
    let option = [
        ("stages[0].model", "--model"),
        ("stages[0].uses", "--evaluator"),
        ("stages[0].name", "--evaluator"),
        ("plugins[0].path", "--plugin-path"),
        ("plugins[0]", "--evaluator"),
        ("run.output_dir", "--output-dir"),
        ("run.device", "--device"),
        ("run.seed", "--seed"),
    ]
    .into_iter()
    .find(|(prefix, _)| key_path.starts_with(prefix))
    .map(|(_, option)| option);
    match option {
        Some(option) => format!("{option}: {message}"),
        None => RecipeError::At { location, key_path, message }.to_string().replacen(SOURCE, "plumb eval's recipe", 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(location: Location, key_path: &str, message: &str) -> RecipeError {
        RecipeError::At { location, key_path: key_path.into(), message: message.into() }
    }

    #[test]
    fn errors_name_the_argument_or_option() {
        let file = Location::File { file: SOURCE.into(), line: 3, column: 5 };
        let set = Location::Override("stages.0.config.seq_len=ten".into());
        assert_eq!(
            render(at(set, "stages[0].config.seq_len", "expected an unsigned integer"), "pretrain.perplexity"),
            "`seq_len=ten`: seq_len: expected an unsigned integer"
        );
        assert_eq!(
            render(at(file.clone(), "stages[0].config", "missing required key `data`"), "pretrain.perplexity"),
            "evaluator `pretrain.perplexity`: missing required key `data`"
        );
        assert_eq!(render(at(file.clone(), "stages[0].model", "no model"), "p.e"), "--model: no model");
        assert_eq!(
            render(at(file, "plugins[0].name", "plugin `p` not found"), "p.e"),
            "--evaluator: plugin `p` not found"
        );
    }
}

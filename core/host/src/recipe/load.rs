//! Loading: read, parse, index positions, override, type, validate — all before any work.
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::error::{Location, RecipeError};
use super::overrides::Overrides;
use super::schema::Recipe;
use super::source::{duplicate_key, pos_of_byte, second_document, Pos, SpanIndex};
use super::validate::validate;
use plumb_core::recipe::explain::{byte_position, describe, explain, yaml_message};
use plumb_core::recipe::path::{parse_steps, resolve, KeyPath};
use plumb_core::recipe::SectionError;

/// A validated recipe together with what is needed to point at places in it.
#[derive(Debug)]
pub struct LoadedRecipe {
    recipe: Recipe,
    /// The YAML after overrides, before typing: resolves `stages.<name>` in key paths.
    value: Value,
    locator: Locator,
    resolved: String,
    /// The recipe as written, overrides applied, before a sweep is expanded: what
    /// [`LoadedRecipe::resolved_yaml`] writes out.
    written: Recipe,
    stage_configs: Vec<String>,
    /// The points of a `sweep:`, each now a stage of its own.
    sweep_points: Vec<super::sweep::SweepPoint>,
    /// For each stage, the index of the stage it came from in the recipe as written (a
    /// sweep's points all come from the swept one).
    stage_origin: Vec<usize>,
}

impl Recipe {
    /// Reads, overrides (`key.path=value` each) and validates the recipe at `path`.
    pub fn load(path: impl AsRef<Path>, overrides: &[String]) -> Result<LoadedRecipe, RecipeError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| RecipeError::Read { path: path.to_path_buf(), source })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let pos = pos_of_byte(e.as_bytes(), e.utf8_error().valid_up_to());
            at_pos(path, pos, "", "the file is not UTF-8 text")
        })?;
        Recipe::load_str(&text, path, overrides)
    }

    /// Like [`Recipe::load`] for recipe text already in memory; `path` names it in errors
    /// and gives the default run name (its file stem).
    pub fn load_str(text: &str, path: impl AsRef<Path>, overrides: &[String]) -> Result<LoadedRecipe, RecipeError> {
        let path = path.as_ref();
        let mut value: Value = serde_yaml::from_str(text).map_err(|e| syntax_error(path, text, &e))?;
        match &value {
            Value::Mapping(_) => {}
            Value::Null => {
                return Err(at_pos(
                    path,
                    Pos::START,
                    "",
                    "the recipe is empty; expected a mapping with `run`, `plugins` and `stages`",
                ))
            }
            other => {
                let message =
                    format!("expected a mapping with `run`, `plugins` and `stages`, found {}", describe(other));
                return Err(at_pos(path, Pos::START, "", message));
            }
        }
        let spans = SpanIndex::build(text).map_err(|(pos, message)| at_pos(path, pos, "", message))?;
        let overrides = Overrides::apply(&mut value, overrides)
            .map_err(|(text, message)| RecipeError::at(Location::Override(text), "", message))?;
        default_run_name(&mut value, path);
        let locator = Locator { file: path.to_path_buf(), spans, overrides };

        let mut recipe: Recipe = serde_path_to_error::deserialize(value.clone())
            .map_err(|e| locator.error(&KeyPath::from_serde(e.path()), explain(&e.inner().to_string())))?;
        validate(&recipe).map_err(|(at, message)| locator.error(&at, message))?;

        let to_yaml = |what: &str, v: Result<String, serde_yaml::Error>| {
            v.map_err(|e| locator.error(&KeyPath::default(), format!("cannot write {what} as YAML: {e}")))
        };
        let resolved =
            header(path, locator.overrides.texts()) + &to_yaml("the resolved recipe", serde_yaml::to_string(&recipe))?;
        let written = recipe.clone();
        let (sweep_points, stage_origin) =
            super::sweep::expand(&mut recipe).map_err(|(at, message)| locator.error(&at, message))?;
        // The points' names must not clash with the other stages'.
        validate(&recipe).map_err(|(at, message)| locator.error(&at, message))?;
        let stage_configs = recipe
            .stages
            .iter()
            .map(|stage| to_yaml("a stage's config", serde_yaml::to_string(&stage.config)))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::debug!(path = %path.display(), overrides = ?locator.overrides.texts(), "recipe loaded");
        Ok(LoadedRecipe { recipe, value, locator, resolved, written, stage_configs, sweep_points, stage_origin })
    }
}

impl LoadedRecipe {
    /// The typed, validated recipe (defaults filled in, overrides applied).
    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    pub fn into_recipe(self) -> Recipe {
        self.recipe
    }

    /// The recipe file as given to [`Recipe::load`].
    pub fn path(&self) -> &Path {
        &self.locator.file
    }

    /// The command-line overrides, in the order they were applied.
    pub fn overrides(&self) -> &[String] {
        self.locator.overrides.texts()
    }

    /// The whole recipe as the run sees it, as YAML: defaults filled in, overrides applied,
    /// with a comment header naming the file and the overrides. Loads back to the same recipe.
    pub fn resolved_yaml(&self) -> String {
        self.resolved.clone()
    }

    /// [`LoadedRecipe::resolved_yaml`] with each section a plugin owns passed through
    /// `fill` first: `fill(at, uses, config)` gets where the section is
    /// (`stages[0].config`, `rewards[1].config`), the `uses` it belongs to and the section
    /// (`plumb validate` fills in the defaults the plugin declares).
    pub fn resolved_yaml_filled(
        &self,
        mut fill: impl FnMut(&str, &str, &mut Value) -> Result<(), RecipeError>,
    ) -> Result<String, RecipeError> {
        let mut recipe = self.written.clone();
        for (i, reward) in recipe.rewards.iter_mut().enumerate() {
            fill(&format!("rewards[{i}].config"), &reward.uses, &mut reward.config)?;
        }
        for (i, stage) in recipe.stages.iter_mut().enumerate() {
            fill(&format!("stages[{i}].config"), &stage.uses, &mut stage.config)?;
        }
        let text = serde_yaml::to_string(&recipe).map_err(|e| {
            self.locator.error(&KeyPath::default(), format!("cannot write the resolved recipe as YAML: {e}"))
        })?;
        Ok(header(&self.locator.file, self.locator.overrides.texts()) + &text)
    }

    /// Stage `index`'s `config` section as YAML text, what its plugin receives; `{}` for an
    /// index past the last stage.
    pub fn stage_config_yaml(&self, index: usize) -> String {
        self.stage_configs.get(index).cloned().unwrap_or_else(|| "{}\n".into())
    }

    /// An error about `key_path` (`stages[0].config.data.path`; `stages.0…` and
    /// `stages.<name>…` work too), placed at the deepest part of the path that exists —
    /// at its parent for a missing key — or at the override that set it.
    pub fn error_at(&self, key_path: &str, message: impl Into<String>) -> RecipeError {
        let key_path = self.as_written(key_path);
        let key_path = key_path.as_str();
        match parse_steps(key_path) {
            Ok(steps) => self.locator.error(&resolve(&self.value, &steps), message),
            Err(_) => {
                let pos = self.locator.spans.find(&KeyPath::default());
                at_pos(&self.locator.file, pos, key_path, message)
            }
        }
    }

    /// The points of the recipe's `sweep:` (empty without one), in the order they run.
    pub fn sweep_points(&self) -> &[super::sweep::SweepPoint] {
        &self.sweep_points
    }

    /// `key_path` with a stage index of the run (`stages[3]…`) turned into the index of
    /// the stage it came from in the recipe as written.
    fn as_written(&self, key_path: &str) -> String {
        let Some(rest) = key_path.strip_prefix("stages[") else { return key_path.to_owned() };
        let Some((index, tail)) = rest.split_once(']') else { return key_path.to_owned() };
        match index.parse::<usize>().ok().and_then(|i| self.stage_origin.get(i)) {
            Some(origin) => format!("stages[{origin}]{tail}"),
            None => key_path.to_owned(),
        }
    }

    /// A plugin's [`SectionError`] placed in the recipe; `section` is where the section is,
    /// e.g. `stages[0].config` or `rewards[1].config`.
    pub fn section_error(&self, section: &str, error: &SectionError) -> RecipeError {
        let path = match error.path.as_str() {
            "" => section.to_owned(),
            inner if inner.starts_with('[') => format!("{section}{inner}"),
            inner => format!("{section}.{inner}"),
        };
        self.error_at(&path, error.message.clone())
    }
}

/// Turns key paths into locations: the override that set the path, else the file position.
#[derive(Debug)]
struct Locator {
    file: PathBuf,
    spans: SpanIndex,
    overrides: Overrides,
}

impl Locator {
    fn error(&self, path: &KeyPath, message: impl Into<String>) -> RecipeError {
        match self.overrides.owner(path) {
            Some(text) => RecipeError::at(Location::Override(text.to_owned()), path, message),
            None => at_pos(&self.file, self.spans.find(path), path, message),
        }
    }
}

fn at_pos(file: &Path, pos: Pos, key_path: impl ToString, message: impl Into<String>) -> RecipeError {
    let location = Location::File { file: file.to_path_buf(), line: pos.line, column: pos.column };
    RecipeError::at(location, key_path, message)
}

/// `run.name` defaults to the file stem; filled in here so the resolved recipe shows it.
fn default_run_name(root: &mut Value, path: &Path) {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    if let Some(Value::Mapping(run)) = root.get_mut("run") {
        if run.get("name").is_none_or(Value::is_null) {
            run.insert("name".into(), stem.into());
        }
    }
}

/// A serde_yaml parse failure as a located error.
fn syntax_error(file: &Path, text: &str, error: &serde_yaml::Error) -> RecipeError {
    let message = yaml_message(error);
    // Reader errors (bad bytes) carry only a byte offset, and a zero mark.
    let pos = match (byte_position(&error.to_string()), error.location()) {
        (Some(offset), _) => pos_of_byte(text.as_bytes(), offset),
        (None, Some(l)) => Pos { line: l.line(), column: l.column() },
        (None, None) => Pos::START,
    };
    // serde_yaml puts the key path of the mapping in front: `run: duplicate entry …`.
    let (key_path, detail) = match message.split_once(": ") {
        Some((path, rest)) if !path.is_empty() && !path.contains(' ') => (path, rest),
        _ => ("", message.as_str()),
    };
    if detail.contains("duplicate entry with key") {
        if let Some((pos, message)) = duplicate_key(text) {
            return at_pos(file, pos, key_path, message);
        }
        return at_pos(file, pos, key_path, detail.replace("duplicate entry with key", "duplicate key"));
    }
    if detail.contains("more than one document") {
        let pos = second_document(text).unwrap_or(Pos::START);
        return at_pos(file, pos, "", "a recipe is one YAML document; found a second one (`---`)");
    }
    if detail.contains(" as u128, expected any YAML value") || detail.contains(" as i128, expected any YAML value") {
        return at_pos(file, pos, key_path, "the number is too large (integers must fit in 64 bits)");
    }
    if detail.starts_with("recursion limit exceeded") {
        return at_pos(file, pos, key_path, "the YAML is nested too deeply");
    }
    at_pos(file, pos, key_path, format!("YAML syntax error: {detail}"))
}

fn header(path: &Path, overrides: &[String]) -> String {
    let one_line = |s: &str| s.replace(['\n', '\r'], " ");
    let mut out = format!("# Resolved by plumb from {}\n", one_line(&path.display().to_string()));
    for o in overrides {
        out += &format!("# override: {}\n", one_line(o));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
run:
  output_dir: runs/q
plugins:
  - name: pretrain
stages:
  - name: pretrain
    uses: pretrain.causal_lm
    config:
      max_steps: 300
";

    fn load(text: &str, overrides: &[&str]) -> Result<LoadedRecipe, String> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Recipe::load_str(text, "r.yaml", &overrides).map_err(|e| e.to_string())
    }

    #[test]
    fn loads_and_fills_defaults() {
        let loaded = load(GOOD, &[]).unwrap();
        assert_eq!(loaded.recipe().run.name, "r");
        assert_eq!(loaded.stage_config_yaml(0), "max_steps: 300\n");
        assert_eq!(loaded.stage_config_yaml(9), "{}\n");
    }

    #[test]
    fn resolved_yaml_loads_back_the_same() {
        let loaded = load(GOOD, &["run.seed=5", "stages.pretrain.config.lr=3e-4"]).unwrap();
        let resolved = loaded.resolved_yaml();
        assert!(resolved.starts_with("# Resolved by plumb from r.yaml\n# override: run.seed=5\n"), "{resolved}");
        let again = load(&resolved, &[]).unwrap();
        assert_eq!(again.recipe(), loaded.recipe());
    }

    #[test]
    fn broken_input_is_an_error_not_a_panic() {
        let inputs = [
            "",
            "   \n",
            "# only a comment\n",
            "[1, 2]",
            "42",
            "\"text\"",
            "\t- a\n",
            "a:\n\tb: 1\n",
            "{",
            "}",
            "a: [",
            "a: {b: c",
            ":::",
            "- - -",
            "---\n---\n",
            "a: 1\n---\nb: 2\n",
            "\0\u{1}\u{2}",
            "a: &x 1\nb: *x\n",
            "a: *nope\n",
            "!!binary x",
            "? [a]\n: b\n",
            "run: 99999999999999999999999999\n",
            "run:\n  seed: -99999999999999999999999\n",
            "a: 1\na: 2\n",
            "%YAML 1.2\n---\na: 1\n",
            "...\n",
            "a: !!str\n",
            "'unterminated",
            "\u{feff}a: 1\n",
            "a: b: c\n",
            "- [[[[[[[[[[\n",
            "a: 'x'#c\n",
        ];
        for input in inputs {
            assert!(load(input, &[]).is_err(), "{input:?} should fail");
        }
        let deep = format!("a: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
        assert!(load(&deep, &[]).is_err());
        let deep_dup = format!("a: 1\na: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
        assert!(load(&deep_dup, &[]).is_err());
    }

    #[test]
    fn errors_without_a_line_are_placed() {
        assert_eq!(
            load("a: 1\nb: 2\u{1}\n", &[]).unwrap_err(),
            "r.yaml:2:5: YAML syntax error: control characters are not allowed"
        );
        assert_eq!(
            load("a: 1\n---\nb: 2\n", &[]).unwrap_err(),
            "r.yaml:2:1: a recipe is one YAML document; found a second one (`---`)"
        );
        // serde_yaml takes this, marked-yaml (which finds the positions) does not.
        assert_eq!(
            load("a: 'x'#c\n", &[]).unwrap_err(),
            "r.yaml:1:7: YAML syntax error: comments must be separated from other tokens by whitespace"
        );
    }

    #[test]
    fn bad_overrides_on_good_input() {
        for o in [
            "",
            "=",
            "x",
            "run=",
            "run.output_dir.x=1",
            "stages.nope.x=1",
            "stages.9.x=1",
            "a[0]=1",
            "run.seed=[",
            "stages=5",
        ] {
            assert!(load(GOOD, &[o]).is_err(), "{o:?} should fail");
        }
    }
}

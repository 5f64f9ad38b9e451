//! `sweep:` — one stage run over a grid of settings, each combination a stage of its own.
//!
//! ```yaml
//! sweep:
//!   stage: pretrain             # the stage to repeat (by name)
//!   grid:                       # a key of its config (dotted for nested keys) → values to try
//!     model:                    # a mapping value merges into the config's mapping
//!       - {hidden_size: 32, intermediate_size: 88, num_hidden_layers: 2, num_attention_heads: 2}
//!       - {hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 2}
//!     max_steps: [40, 80, 160]
//! ```
//!
//! Every combination runs, in order (the last key varies fastest), as a stage named
//! `<stage>-<k>` (`pretrain-00`, `pretrain-01`, …) with its own directory and TensorBoard
//! folder, so `--resume` skips the points already finished. The run directory then holds
//! `sweep.csv` and `sweep.json`: per point its settings, N (non-embedding parameters), D
//! (training tokens), C = 6ND and the final validation loss — what `plumb scaling fit`
//! reads.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::schema::{Recipe, StageSpec};
use plumb_core::recipe::path::KeyPath;

/// The `sweep:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// The name of the stage to repeat.
    pub stage: String,
    /// A key of the stage's config (dotted for nested keys) → the list of values it takes,
    /// in the order written.
    pub grid: Mapping,
}

/// One point of the grid, as run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    /// Its stage's name, `<stage>-<k>`.
    pub stage: String,
    /// The grid's values at this point.
    pub settings: BTreeMap<String, Value>,
}

/// Replaces the swept stage of `recipe` by one stage per point of the grid. Returns the
/// points and, for each stage of the new list, the index of the stage it came from (for
/// placing errors in the recipe as written).
pub(crate) fn expand(recipe: &mut Recipe) -> Result<(Vec<SweepPoint>, Vec<usize>), (KeyPath, String)> {
    let Some(sweep) = recipe.sweep.clone() else {
        return Ok((Vec::new(), (0..recipe.stages.len()).collect()));
    };
    let at = KeyPath::default().key("sweep");
    let Some(index) = recipe.stages.iter().position(|s| s.name == sweep.stage) else {
        let names: Vec<&str> = recipe.stages.iter().map(|s| s.name.as_str()).collect();
        return Err((
            at.key("stage"),
            format!("no stage named `{}`; the stages are {}", sweep.stage, names.join(", ")),
        ));
    };
    if sweep.grid.is_empty() {
        return Err((at.key("grid"), "expected at least one key with a list of values".into()));
    }
    let mut grid: Vec<(String, Vec<Value>)> = Vec::new();
    for (key, values) in &sweep.grid {
        let key = match key.as_str() {
            Some(k) if !k.is_empty() && !k.split('.').any(str::is_empty) => k.to_owned(),
            _ => {
                let message = "expected keys of the stage's config, e.g. `max_steps` or `model.hidden_size`";
                return Err((at.key("grid"), message.into()));
            }
        };
        match values {
            Value::Sequence(list) if !list.is_empty() => grid.push((key, list.clone())),
            _ => return Err((at.key("grid").key(&key), "expected a non-empty list of values".into())),
        }
    }
    // Every combination, the last key varying fastest.
    let mut combinations: Vec<BTreeMap<String, Value>> = vec![BTreeMap::new()];
    for (key, values) in &grid {
        combinations = combinations
            .into_iter()
            .flat_map(|partial| {
                values.iter().map(move |v| {
                    let mut next = partial.clone();
                    next.insert(key.clone(), v.clone());
                    next
                })
            })
            .collect();
    }
    let width = (combinations.len() - 1).to_string().len().max(2);
    let template = recipe.stages[index].clone();
    let mut points = Vec::with_capacity(combinations.len());
    let mut swept: Vec<StageSpec> = Vec::with_capacity(combinations.len());
    for (k, settings) in combinations.into_iter().enumerate() {
        let mut stage = template.clone();
        stage.name = format!("{}-{k:0width$}", template.name);
        for (key, value) in &settings {
            set(&mut stage.config, key, value.clone());
        }
        points.push(SweepPoint { stage: stage.name.clone(), settings });
        swept.push(stage);
    }
    let count = swept.len();
    let mut origin: Vec<usize> = (0..index).collect();
    origin.extend(std::iter::repeat_n(index, count));
    origin.extend(index + 1..recipe.stages.len());
    recipe.stages.splice(index..=index, swept);
    Ok((points, origin))
}

/// Sets the dotted `key` of the mapping `config` to `value`; a mapping merges into a
/// mapping already there, key by key.
fn set(config: &mut Value, key: &str, value: Value) {
    let mut node = config;
    let parts: Vec<&str> = key.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        let map = node.as_mapping_mut().expect("a mapping");
        node = map.entry(Value::from(*part)).or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    if !node.is_mapping() {
        *node = Value::Mapping(Mapping::new());
    }
    let map = node.as_mapping_mut().expect("a mapping");
    let last = Value::from(parts[parts.len() - 1]);
    match (map.get_mut(&last), value) {
        (Some(Value::Mapping(existing)), Value::Mapping(new)) => {
            for (k, v) in new {
                existing.insert(k, v);
            }
        }
        (_, value) => {
            map.insert(last, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(sweep: &str) -> Recipe {
        serde_yaml::from_str(&format!(
            "run: {{output_dir: out}}\nplugins: [{{name: p}}]\nstages:\n  - {{name: pre, uses: p.s, config: {{model: {{hidden_size: 8, layers: 2}}, max_steps: 1}}}}\n  - {{name: ev, uses: p.e}}\n{sweep}"
        ))
        .unwrap()
    }

    #[test]
    fn every_combination_becomes_a_stage_of_its_own() {
        let mut r = recipe(
            "sweep: {stage: pre, grid: {model: [{hidden_size: 16}, {hidden_size: 32}], max_steps: [10, 20, 40]}}",
        );
        let (points, origin) = expand(&mut r).unwrap();
        let names: Vec<&str> = r.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["pre-00", "pre-01", "pre-02", "pre-03", "pre-04", "pre-05", "ev"]);
        assert_eq!(origin, [0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(points.len(), 6);
        // The last key varies fastest; a mapping merges into the stage's own.
        let config: serde_yaml::Value =
            serde_yaml::from_str("{model: {hidden_size: 16, layers: 2}, max_steps: 20}").unwrap();
        assert_eq!(r.stages[1].config, config);
        assert_eq!(points[1].settings["max_steps"], Value::from(20));
    }

    #[test]
    fn a_sweep_of_a_missing_stage_or_an_empty_grid_is_refused() {
        let (at, message) = expand(&mut recipe("sweep: {stage: nope, grid: {max_steps: [1]}}")).unwrap_err();
        assert_eq!(at.to_string(), "sweep.stage");
        assert!(message.contains("no stage named `nope`; the stages are pre, ev"), "{message}");
        let (at, _) = expand(&mut recipe("sweep: {stage: pre, grid: {max_steps: []}}")).unwrap_err();
        assert_eq!(at.to_string(), "sweep.grid.max_steps");
    }
}

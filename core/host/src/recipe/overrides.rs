//! Command-line overrides: `key.path=value`, applied to the parsed YAML before it is typed.
//!
//! The value is read as YAML (`3e-4`, `true`, `foo`, `[1, 2]`, `{a: 1}`). In the key path a
//! number indexes a sequence (`stages.0`, or `stages[0]`), and on a sequence of mappings a
//! name picks the element with that `name` (`stages.pretrain.config.max_steps=10`). Missing
//! mapping keys are created; anything the path would have to go inside of that is not a
//! mapping or a sequence is an error.
use serde_yaml::{Mapping, Value};

use plumb_core::recipe::explain::{describe, yaml_message};
use plumb_core::recipe::path::{find_key, parse_steps, pick, KeyPath, Pick, Seg, Step};
use plumb_core::recipe::suggest::{did_you_mean, one_of};

/// The overrides of one load, kept so that errors in what they set point at them.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    texts: Vec<String>,
    /// Paths an override set or created, with the override's index; a later override
    /// that replaces a path drops what earlier ones owned under it.
    owned: Vec<(KeyPath, usize)>,
}

impl Overrides {
    /// Applies `texts` in order to `root`; on failure, the override and what is wrong.
    pub(crate) fn apply(root: &mut Value, texts: &[String]) -> Result<Overrides, (String, String)> {
        let mut overrides = Overrides::default();
        for (i, text) in texts.iter().enumerate() {
            let (set, created) = apply_one(root, text).map_err(|message| (text.clone(), message))?;
            overrides.owned.retain(|(path, _)| !path.starts_with(&set));
            overrides.owned.push((set, i));
            overrides.owned.extend(created.into_iter().map(|path| (path, i)));
            overrides.texts.push(text.clone());
        }
        Ok(overrides)
    }

    /// The override that set `path` or one of its parents, if any.
    pub(crate) fn owner(&self, path: &KeyPath) -> Option<&str> {
        self.owned
            .iter()
            .filter(|(owned, _)| path.starts_with(owned))
            .max_by_key(|(owned, _)| owned.0.len())
            .and_then(|(_, i)| self.texts.get(*i))
            .map(String::as_str)
    }

    pub(crate) fn texts(&self) -> &[String] {
        &self.texts
    }
}

/// Sets one override; returns the path it set and the mappings it had to create.
fn apply_one(root: &mut Value, text: &str) -> Result<(KeyPath, Vec<KeyPath>), String> {
    let Some((lhs, rhs)) = text.split_once('=') else {
        return Err("expected `key.path=value`, e.g. `stages.pretrain.config.max_steps=10`".into());
    };
    let steps = parse_steps(lhs.trim())?;
    let value: Value =
        serde_yaml::from_str(rhs).map_err(|e| format!("cannot read `{rhs}` as a YAML value: {}", yaml_message(&e)))?;
    let Some((last, parents)) = steps.split_last() else {
        return Err("the key path is empty".into());
    };
    let mut path = KeyPath::default();
    let mut created = Vec::new();
    let mut here = root;
    for step in parents {
        let (seg, next, made) = child(here, step, &path)?;
        path = path.child(seg);
        if made {
            created.push(path.clone());
        }
        here = next;
    }
    let seg = set(here, last, &path, value)?;
    Ok((path.child(seg), created))
}

/// The child of `here` that `step` names, creating a missing mapping key as `{}`.
fn child<'v>(here: &'v mut Value, step: &Step, at: &KeyPath) -> Result<(Seg, &'v mut Value, bool), String> {
    if here.is_null() {
        *here = Value::Mapping(Mapping::new());
    }
    match here {
        Value::Mapping(map) => {
            let name = key_name(step, at)?;
            let key = find_key(map, name).unwrap_or_else(|| Value::String(name.to_owned()));
            let made = !map.contains_key(&key);
            if made {
                map.insert(key.clone(), Value::Mapping(Mapping::new()));
            }
            let next = map.get_mut(&key).ok_or_else(|| format!("cannot create `{}`", at.key(name)))?;
            Ok((Seg::Key(name.to_owned()), next, made))
        }
        Value::Sequence(items) => {
            let i = element(items, step, at)?;
            let len = items.len();
            let next = items.get_mut(i).ok_or_else(|| out_of_range(at, i, len))?;
            Ok((Seg::Index(i), next, false))
        }
        other => Err(not_a_container(at, other)),
    }
}

/// Puts `value` at the child of `here` that `step` names.
fn set(here: &mut Value, step: &Step, at: &KeyPath, value: Value) -> Result<Seg, String> {
    if here.is_null() {
        *here = Value::Mapping(Mapping::new());
    }
    match here {
        Value::Mapping(map) => {
            let name = key_name(step, at)?;
            let key = find_key(map, name).unwrap_or_else(|| Value::String(name.to_owned()));
            map.insert(key, value);
            Ok(Seg::Key(name.to_owned()))
        }
        Value::Sequence(items) => {
            let i = element(items, step, at)?;
            let len = items.len();
            let slot = items.get_mut(i).ok_or_else(|| out_of_range(at, i, len))?;
            *slot = value;
            Ok(Seg::Index(i))
        }
        other => Err(not_a_container(at, other)),
    }
}

fn key_name<'s>(step: &'s Step, at: &KeyPath) -> Result<&'s str, String> {
    match step {
        Step::Name(name) => Ok(name),
        Step::Index(i) => Err(format!("{} is a mapping; `[{i}]` indexes a sequence", quoted(at))),
    }
}

/// The index of the element `step` names: a number, or an element's `name`.
fn element(items: &[Value], step: &Step, at: &KeyPath) -> Result<usize, String> {
    let name = match step {
        Step::Name(name) => name.as_str(),
        Step::Index(i) => return Ok(*i),
    };
    match pick(items, step) {
        Pick::At(i) => Ok(i),
        Pick::NoSuchName(names) => {
            let hint = did_you_mean(name, names.iter().map(String::as_str));
            Err(format!("{} has no entry named `{name}`; expected {}{hint}", quoted(at), one_of(&names, "")))
        }
        Pick::NotAnIndex => Err(format!("{} is a sequence; expected an index, found `{name}`", quoted(at))),
    }
}

fn out_of_range(at: &KeyPath, index: usize, len: usize) -> String {
    format!("index {index} is out of range: {} has {len} entries", quoted(at))
}

fn not_a_container(at: &KeyPath, value: &Value) -> String {
    format!("cannot go inside {}: it is {}, not a mapping or a sequence", quoted(at), describe(value))
}

fn quoted(path: &KeyPath) -> String {
    if path.0.is_empty() {
        "the recipe".into()
    } else {
        format!("`{path}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "run: {seed: 1}\nstages:\n  - name: pretrain\n    config: {max_steps: 300}\n  - name: sft\n    config:\n";

    fn applied(overrides: &[&str]) -> Result<(Value, Overrides), (String, String)> {
        let mut root: Value = serde_yaml::from_str(BASE).unwrap();
        let texts: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Overrides::apply(&mut root, &texts).map(|o| (root, o))
    }

    fn get<'v>(root: &'v Value, path: &str) -> &'v Value {
        let mut here = root;
        for part in path.split('.') {
            here = match part.parse::<usize>() {
                Ok(i) => &here[i],
                Err(_) => &here[part],
            };
        }
        here
    }

    #[test]
    fn sets_scalars_lists_and_new_keys() {
        let (root, _) =
            applied(&["run.seed=7", "stages.0.config.lr=3e-4", "stages.sft.config.tags=[a, b]", "run.flag=true"])
                .unwrap();
        assert_eq!(get(&root, "run.seed"), &Value::from(7));
        assert_eq!(get(&root, "stages.0.config.lr"), &Value::from(3e-4));
        assert_eq!(get(&root, "stages.1.config.tags"), &serde_yaml::from_str::<Value>("[a, b]").unwrap());
        assert_eq!(get(&root, "run.flag"), &Value::Bool(true));
        assert_eq!(get(&root, "stages.0.config.max_steps"), &Value::from(300));
    }

    #[test]
    fn picks_elements_by_name_and_brackets() {
        let (root, _) = applied(&["stages.pretrain.config.max_steps=10", "stages[1].name=chat"]).unwrap();
        assert_eq!(get(&root, "stages.0.config.max_steps"), &Value::from(10));
        assert_eq!(get(&root, "stages.1.name"), &Value::from("chat"));
    }

    #[test]
    fn creates_nested_mappings() {
        let (root, overrides) = applied(&["stages.pretrain.config.optimizer.lr=0.1"]).unwrap();
        assert_eq!(get(&root, "stages.0.config.optimizer.lr"), &Value::from(0.1));
        let at = |p: &str| overrides.owner(&plumb_core::recipe::path::resolve(&root, &parse_steps(p).unwrap()));
        assert_eq!(at("stages[0].config.optimizer"), Some("stages.pretrain.config.optimizer.lr=0.1"));
        assert_eq!(at("stages[0].config.optimizer.lr"), Some("stages.pretrain.config.optimizer.lr=0.1"));
        assert_eq!(at("stages[0].config"), None);
    }

    #[test]
    fn later_overrides_take_ownership() {
        let (root, overrides) = applied(&["run.x.y=1", "run.x={y: 2}"]).unwrap();
        let path = plumb_core::recipe::path::resolve(&root, &parse_steps("run.x.y").unwrap());
        assert_eq!(overrides.owner(&path), Some("run.x={y: 2}"));
    }

    #[test]
    fn reports_malformed_overrides() {
        let message = |o: &str| applied(&[o]).unwrap_err().1;
        assert_eq!(message("run.seed"), "expected `key.path=value`, e.g. `stages.pretrain.config.max_steps=10`");
        assert_eq!(message("=3"), "the key path is empty");
        assert_eq!(message("run..seed=3"), "empty key in `run..seed`");
        assert_eq!(
            message("run.seed.x=3"),
            "cannot go inside `run.seed`: it is the integer 1, not a mapping or a sequence"
        );
        assert_eq!(message("stages.5.name=x"), "index 5 is out of range: `stages` has 2 entries");
        assert_eq!(
            message("stages.pretrian.config.x=1"),
            "`stages` has no entry named `pretrian`; expected one of `pretrain`, `sft`; did you mean `pretrain`?"
        );
        assert!(message("run.seed=[1, 2").starts_with("cannot read `[1, 2` as a YAML value: "));
        assert_eq!(message("run[0]=1"), "`run` is a mapping; `[0]` indexes a sequence");
    }
}

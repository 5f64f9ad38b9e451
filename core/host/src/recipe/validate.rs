//! Checks serde cannot express: names, uniqueness, `uses` form, pins, non-empty lists.
//! Whether plugins, stages and files exist is checked later, by the host.
use std::collections::HashMap;

use super::schema::Recipe;
use plumb_core::recipe::path::KeyPath;
use plumb_core::recipe::suggest::did_you_mean;

/// The first problem found, in document order: where and what.
pub(crate) fn validate(recipe: &Recipe) -> Result<(), (KeyPath, String)> {
    let root = KeyPath::default();
    let run = root.key("run");
    if recipe.run.name.is_empty() {
        return Err((run.key("name"), "expected a non-empty name".into()));
    }
    if recipe.run.output_dir.as_os_str().is_empty() {
        return Err((run.key("output_dir"), "expected a directory path, found an empty string".into()));
    }

    if recipe.plugins.is_empty() {
        return Err((root.key("plugins"), "expected at least one plugin".into()));
    }
    let mut plugins = Names::new("plugin", root.key("plugins"));
    for (i, plugin) in recipe.plugins.iter().enumerate() {
        plugins.add(i, &plugin.name)?;
        if let Some(pin) = &plugin.sha256 {
            check_sha256(pin).map_err(|m| (root.key("plugins").index(i).key("sha256"), m))?;
        }
    }
    let plugin_names: Vec<&str> = recipe.plugins.iter().map(|p| p.name.as_str()).collect();

    let mut rewards = Names::new("reward", root.key("rewards"));
    for (i, reward) in recipe.rewards.iter().enumerate() {
        rewards.add(i, &reward.name)?;
        let at = root.key("rewards").index(i).key("uses");
        check_uses(&reward.uses, "reward", &plugin_names).map_err(|m| (at, m))?;
    }

    if recipe.stages.is_empty() {
        return Err((root.key("stages"), "expected at least one stage".into()));
    }
    let mut stages = Names::new("stage", root.key("stages"));
    for (i, stage) in recipe.stages.iter().enumerate() {
        stages.add(i, &stage.name)?;
        if RUN_DIR_NAMES.contains(&stage.name.as_str()) {
            let message = format!(
                "stage name `{}` is taken: the run directory keeps its own `{}` folder there; choose another name",
                stage.name, stage.name
            );
            return Err((root.key("stages").index(i).key("name"), message));
        }
        let at = root.key("stages").index(i).key("uses");
        check_uses(&stage.uses, "stage", &plugin_names).map_err(|m| (at, m))?;
        if let Some(super::schema::ModelSource::Stage { stage: named }) = &stage.model {
            let earlier: Vec<&str> = recipe.stages[..i].iter().map(|s| s.name.as_str()).collect();
            if !earlier.contains(&named.as_str()) {
                let hint = did_you_mean(named, earlier.iter().copied());
                let listed = if earlier.is_empty() { "none".to_owned() } else { earlier.join(", ") };
                let message = format!("no earlier stage named `{named}` (earlier stages: {listed}){hint}");
                return Err((root.key("stages").index(i).key("model").key("stage"), message));
            }
        }
    }
    Ok(())
}

/// What the run directory holds besides one folder per stage (named after the stage),
/// so no stage may take these names.
pub const RUN_DIR_NAMES: &[&str] = &["tb"];

/// Names in one list: well formed (they become directory names and `uses` prefixes) and unique.
struct Names {
    what: &'static str,
    list: KeyPath,
    seen: HashMap<String, usize>,
}

impl Names {
    fn new(what: &'static str, list: KeyPath) -> Self {
        Names { what, list, seen: HashMap::new() }
    }

    fn add(&mut self, index: usize, name: &str) -> Result<(), (KeyPath, String)> {
        let at = self.list.index(index).key("name");
        if let Err(message) = check_name(name) {
            return Err((at, format!("bad {} name: {message}", self.what)));
        }
        if let Some(first) = self.seen.get(name) {
            let message = format!("duplicate {} name `{name}`; {}[{first}] has it already", self.what, self.list);
            return Err((at, message));
        }
        self.seen.insert(name.to_owned(), index);
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("expected a name, found an empty string".into());
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        Some(c) => Err(format!("`{name}` contains {c:?}; use only letters, digits, `_` and `-`")),
        None => Ok(()),
    }
}

/// `<plugin>.<name>`, with the plugin listed under `plugins`.
fn check_uses(uses: &str, what: &str, plugins: &[&str]) -> Result<(), String> {
    let example = if what == "reward" { "cot.exact_match" } else { "pretrain.causal_lm" };
    let Some((plugin, _)) = uses.split_once('.').filter(|(p, n)| !p.is_empty() && !n.is_empty()) else {
        return Err(format!("expected `<plugin>.<{what}>`, e.g. `{example}`, found `{uses}`"));
    };
    if !plugins.contains(&plugin) {
        let listed = plugins.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ");
        let hint = did_you_mean(plugin, plugins.iter().copied());
        return Err(format!("plugin `{plugin}` is not listed under `plugins` (listed: {listed}){hint}"));
    }
    Ok(())
}

fn check_sha256(pin: &str) -> Result<(), String> {
    if let Some(c) = pin.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("expected 64 hexadecimal digits (a SHA-256 digest), found the character {c:?}"));
    }
    if pin.len() != 64 {
        return Err(format!(
            "expected 64 hexadecimal digits (a SHA-256 digest), found {} characters",
            pin.chars().count()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<(), (String, String)> {
        let recipe: Recipe = serde_yaml::from_str(yaml).unwrap();
        validate(&recipe).map_err(|(path, message)| (path.to_string(), message))
    }

    const BASE: &str = "run: {name: r, output_dir: out}\nplugins: [{name: p}]\n";

    #[test]
    fn accepts_a_good_recipe() {
        assert_eq!(check(&format!("{BASE}stages: [{{name: a, uses: p.x}}, {{name: b-2_c, uses: p.y}}]")), Ok(()));
    }

    #[test]
    fn rejects_bad_names_and_duplicates() {
        let (path, message) =
            check(&format!("{BASE}stages: [{{name: a, uses: p.x}}, {{name: a, uses: p.y}}]")).unwrap_err();
        assert_eq!(path, "stages[1].name");
        assert_eq!(message, "duplicate stage name `a`; stages[0] has it already");
        let (path, message) = check(&format!("{BASE}stages: [{{name: 'a/b', uses: p.x}}]")).unwrap_err();
        assert_eq!(path, "stages[0].name");
        assert_eq!(message, "bad stage name: `a/b` contains '/'; use only letters, digits, `_` and `-`");
        let (path, _) =
            check("run: {name: r, output_dir: o}\nplugins: [{name: p}, {name: p}]\nstages: [{name: a, uses: p.x}]")
                .unwrap_err();
        assert_eq!(path, "plugins[1].name");
    }

    #[test]
    fn a_stage_may_not_take_the_name_of_a_run_directory_folder() {
        let (path, message) =
            check(&format!("{BASE}stages: [{{name: a, uses: p.x}}, {{name: tb, uses: p.y}}]")).unwrap_err();
        assert_eq!(path, "stages[1].name");
        assert_eq!(
            message,
            "stage name `tb` is taken: the run directory keeps its own `tb` folder there; choose another name"
        );
    }

    #[test]
    fn rejects_bad_uses() {
        let (path, message) = check(&format!("{BASE}stages: [{{name: a, uses: causal_lm}}]")).unwrap_err();
        assert_eq!(path, "stages[0].uses");
        assert_eq!(message, "expected `<plugin>.<stage>`, e.g. `pretrain.causal_lm`, found `causal_lm`");
        let (_, message) = check(&format!("{BASE}stages: [{{name: a, uses: q.x}}]")).unwrap_err();
        assert_eq!(message, "plugin `q` is not listed under `plugins` (listed: `p`)");
        let (path, _) =
            check(&format!("{BASE}rewards: [{{name: r, uses: 'p.'}}]\nstages: [{{name: a, uses: p.x}}]")).unwrap_err();
        assert_eq!(path, "rewards[0].uses");
    }

    #[test]
    fn rejects_empty_lists_and_bad_pins() {
        let (path, message) = check(&format!("{BASE}stages: []")).unwrap_err();
        assert_eq!((path.as_str(), message.as_str()), ("stages", "expected at least one stage"));
        let (path, _) = check("run: {name: r, output_dir: o}\nplugins: []\nstages: []").unwrap_err();
        assert_eq!(path, "plugins");
        let (path, message) =
            check("run: {name: r, output_dir: o}\nplugins: [{name: p, sha256: abc}]\nstages: [{name: a, uses: p.x}]")
                .unwrap_err();
        assert_eq!(path, "plugins[0].sha256");
        assert_eq!(message, "expected 64 hexadecimal digits (a SHA-256 digest), found 3 characters");
        let good = "a".repeat(64);
        assert_eq!(
            check(&format!("run: {{name: r, output_dir: o}}\nplugins: [{{name: p, sha256: '{good}'}}]\nstages: [{{name: a, uses: p.x}}]")),
            Ok(())
        );
    }
}

//! `plumb plugins`: what is installed where.
use plumb_host::plugin::{loader, Plugin, Registry};

use crate::Failure;

/// Every plugin in the search directories, in search order, an earlier directory's
/// winning over a later one of the same name; a broken one as its error. Shared
/// libraries that are not plugins are passed over.
fn found() -> Vec<Result<Plugin, loader::LoadError>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut found = Vec::new();
    for dir in loader::search_dirs() {
        for path in loader::libraries_in(&dir) {
            match loader::load_by_file_name(&path) {
                Err(loader::LoadError::NotAPlugin { .. }) => {}
                Ok(plugin) if !seen.insert(plugin.name.clone()) => {} // an earlier directory wins, as in the search
                other => found.push(other),
            }
        }
    }
    found
}

/// The installed plugins that load, as one registry (what `plumb explain` looks in).
pub fn installed() -> Registry {
    let mut registry = Registry::default();
    for plugin in found().into_iter().flatten() {
        let _ = registry.add(plugin); // names are unique: `found` keeps the first of each
    }
    registry
}

pub fn list() -> Result<(), Failure> {
    let mut count = 0;
    for plugin in found() {
        let plugin = match plugin {
            Ok(plugin) => plugin,
            // Other shared libraries may sit beside plugins; only name ours when broken.
            Err(e) => {
                println!("! {e}\n");
                continue;
            }
        };
        count += 1;
        println!("{} {}  {}", plugin.name, plugin.version, plugin.path.display());
        println!("    {}", plugin.description);
        for (kind, list) in [("stage", &plugin.stages), ("evaluator", &plugin.evaluators), ("reward", &plugin.rewards)]
        {
            for c in list {
                println!("    {kind:<9} {}.{}  {}", plugin.name, c.name, c.description);
            }
        }
        println!();
    }
    if count == 0 {
        let dirs: Vec<String> = loader::search_dirs().iter().map(|d| d.display().to_string()).collect();
        println!("no plugins found in {}", dirs.join(", "));
    } else {
        println!("`plumb explain <plugin>.<name>` lists the options of a stage, evaluator or reward.");
    }
    Ok(())
}

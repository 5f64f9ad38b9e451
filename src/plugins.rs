//! `plumb plugins`: what is installed where.
use plumb_host::plugin::loader;

use crate::Failure;

pub fn list() -> Result<(), Failure> {
    let mut seen = std::collections::BTreeSet::new();
    let mut found = 0;
    for dir in loader::search_dirs() {
        for path in loader::libraries_in(&dir) {
            let plugin = match loader::load_by_file_name(&path) {
                Ok(plugin) => plugin,
                // Other shared libraries may sit beside plugins; only name ours when broken.
                Err(loader::LoadError::NotAPlugin { .. }) => continue,
                Err(e) => {
                    println!("! {e}\n");
                    continue;
                }
            };
            if !seen.insert(plugin.name.clone()) {
                continue; // an earlier directory wins, as in the search
            }
            found += 1;
            println!("{} {}  {}", plugin.name, plugin.version, plugin.path.display());
            println!("    {}", plugin.description);
            for (kind, list) in
                [("stage", &plugin.stages), ("evaluator", &plugin.evaluators), ("reward", &plugin.rewards)]
            {
                for c in list {
                    println!("    {kind:<9} {}.{}  {}", plugin.name, c.name, c.description);
                }
            }
            println!();
        }
    }
    if found == 0 {
        let dirs: Vec<String> = loader::search_dirs().iter().map(|d| d.display().to_string()).collect();
        println!("no plugins found in {}", dirs.join(", "));
    }
    Ok(())
}

//! `plumb new plugin`: the crate it writes builds out of tree, loads, and runs its recipe
//! and its own test, as its README says.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Removes the scaffolded plugin's library from the shared target directory, so that it
/// does not show up beside the workspace's plugins after the test (pass or fail).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn cargo(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(dir).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("cargo runs")
}

#[test]
fn a_scaffolded_plugin_builds_out_of_tree_loads_and_runs_its_recipe_and_test() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = dir.path().join("plumb-scaffolded");
    let o = plumb(
        dir.path(),
        &[
            "new",
            "plugin",
            "scaffolded",
            "--path",
            crate_dir.to_str().unwrap(),
            "--plumb-dir",
            repo_root().to_str().unwrap(),
        ],
    );
    assert_exit(&o, 0);
    for file in ["Cargo.toml", "build.rs", "src/lib.rs", "recipe.yaml", "tests/recipe.rs", "README.md", "Cargo.lock"] {
        assert!(crate_dir.join(file).is_file(), "{file} missing");
    }

    // Built with the workspace's target directory: plumb's dependencies are reused.
    let target = target_dir().parent().unwrap().to_path_buf();
    let library = target.join("debug/libplumb_scaffolded.so");
    let _cleanup = RemoveOnDrop(library.clone());
    let built = cargo(&crate_dir, &["build"], &[("CARGO_TARGET_DIR", &target)]);
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    assert!(library.is_file());

    // plumb loads it by the name it declares, and runs the recipe as written.
    let listed =
        plumb_with_env(dir.path(), &["plugins"], &[("PLUMB_PLUGIN_PATH", library.parent().unwrap().to_str().unwrap())]);
    assert!(stdout(&listed).contains("stage     scaffolded.samples"), "{}", stdout(&listed));
    let out_dir = dir.path().join("run");
    let ran = plumb(
        &crate_dir,
        &[
            "run",
            "recipe.yaml",
            &format!("run.output_dir={}", out_dir.display()),
            &format!("plugins.1.path={}", library.display()),
            "run.device=cpu",
        ],
    );
    assert_exit(&ran, 0);
    let samples = std::fs::read_to_string(out_dir.join("samples/samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 2, "{samples}");

    // Its own test passes too.
    let plumb_bin = Path::new(env!("CARGO_BIN_EXE_plumb"));
    let tested =
        cargo(&crate_dir, &["test"], &[("CARGO_TARGET_DIR", &target), ("PLUMB", plumb_bin), ("PLUGIN", &library)]);
    assert!(tested.status.success(), "{}", String::from_utf8_lossy(&tested.stderr));
}

#[test]
fn bad_plugin_names_and_existing_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = plumb(dir.path(), &["new", "plugin", "My-Plugin"]);
    assert_exit(&o, 1);
    assert!(
        stderr(&o).contains("plugin name `My-Plugin`: expected lowercase letters, digits and `_`"),
        "{}",
        stderr(&o)
    );
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    let o = plumb(dir.path(), &["new", "plugin", "ok", "--path", "taken"]);
    assert_exit(&o, 1);
    assert!(stderr(&o).contains("taken already exists"), "{}", stderr(&o));
}

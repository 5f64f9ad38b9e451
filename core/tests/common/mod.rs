//! What core's integration tests share: the Python with `transformers` and `tensorboard`
//! that `./dev test` installs, and running the reference scripts beside the tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `PLUMB_TEST_PYTHON`, else the workspace's `.venv/bin/python`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PLUMB_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.is_file(),
        "no Python with transformers and tensorboard: set PLUMB_TEST_PYTHON or run the tests with `./dev test`, \
         which installs them into .venv/"
    );
    venv
}

/// Runs `core/tests/hf/<script>` with `args`; its stdout, or a panic with its stderr.
pub fn run_script(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf").join(script);
    let out = Command::new(python()).arg(path).args(args).output().expect("python runs");
    assert!(out.status.success(), "{script} {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

//! What the host crate's integration tests share: the Python with `tensorboard` that
//! `./dev test` installs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `PLUMB_TEST_PYTHON`, else the workspace's `.venv/bin/python`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PLUMB_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.is_file(),
        "no Python with tensorboard: set PLUMB_TEST_PYTHON or run the tests with `./dev test`, which installs it into .venv/"
    );
    venv
}

//! The sha256 pin pins what is loaded: the file is hashed and loaded through one open
//! descriptor, so a file swapped in under the pinned path by a racing rename never runs.
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use plumb_host::plugin::loader::{self, LoadError};

/// A small shared library of the workspace (built by `cargo build --workspace`), beside
/// this test's executable.
fn small_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(format!("{}plumb_not_a_plugin{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace` first", path.display());
    path
}

/// Inodes of every file this process has mapped.
fn mapped_inodes() -> HashSet<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().filter_map(|line| line.split_whitespace().nth(4)?.parse().ok()).collect()
}

#[test]
fn a_file_swapped_under_a_racing_rename_never_loads_against_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read(small_library()).unwrap();
    let pin = loader::sha256_of(&small_library()).unwrap();
    let mut swapped = original.clone();
    swapped.extend_from_slice(b"another library: trailing bytes change its hash, not its code");
    let (mut loaded, mut refused) = (0, 0);
    for round in 0..40 {
        // Two files that a racer renames in turn to the pinned path: the pinned one and
        // another, each keeping its inode.
        let (pinned, other) = (dir.path().join(format!("a{round}.so")), dir.path().join(format!("b{round}.so")));
        std::fs::write(&pinned, &original).unwrap();
        std::fs::write(&other, &swapped).unwrap();
        let (pinned_inode, other_inode) =
            (std::fs::metadata(&pinned).unwrap().ino(), std::fs::metadata(&other).unwrap().ino());
        let target = dir.path().join(format!("libplumb_raced{round}.so"));
        std::fs::hard_link(&pinned, &target).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let racer = {
            let (stop, target, staging) = (Arc::clone(&stop), target.clone(), dir.path().join(format!("s{round}")));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for source in [&other, &pinned] {
                        std::fs::hard_link(source, &staging).unwrap();
                        std::fs::rename(&staging, &target).unwrap();
                    }
                }
            })
        };
        let outcome = loader::load(&target, "raced", Some(&pin));
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        match outcome {
            // The pinned bytes were hashed and loaded (not a plugin, so it stops there).
            Err(LoadError::NotAPlugin { .. }) => {
                assert!(mapped_inodes().contains(&pinned_inode), "round {round}: this round's file is what was loaded");
                loaded += 1
            }
            Err(LoadError::Sha256Mismatch { .. }) => refused += 1,
            other => panic!("round {round}: unexpected outcome {:?}", other.map(|p| p.name)),
        }
        assert!(
            !mapped_inodes().contains(&other_inode),
            "round {round}: the swapped library was loaded although the pin refers to another file"
        );
    }
    println!("40 racing loads: {loaded} loaded the pinned file, {refused} refused a swapped one");
    assert_eq!(loaded + refused, 40);
}

#[test]
fn a_directory_or_a_missing_file_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let message = loader::load(dir.path(), "x", None).err().unwrap().to_string();
    assert!(message.contains("is a directory, not a plugin file"), "{message}");
    let message = loader::load(&dir.path().join("nope.so"), "x", None).err().unwrap().to_string();
    assert!(message.ends_with("nope.so: plugin file not found"), "{message}");
}

#[test]
fn a_failed_load_carries_the_dynamic_loaders_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libplumb_text.so");
    std::fs::write(&path, "not a shared library\n").unwrap();
    let message = loader::load(&path, "text", None).err().unwrap().to_string();
    // dlerror's words, about the file by its own path.
    assert!(message.starts_with(&format!("{}: cannot load shared library: ", path.display())), "{message}");
    assert!(message.contains("invalid ELF header") || message.contains("file too short"), "{message}");
    assert!(message.contains(&path.display().to_string()) && !message.contains("/proc/self/fd"), "{message}");
}

//! Called from the build script of every crate that produces a binary, a test or a
//! plugin (`cdylib`) linking `plumb-core`.
//!
//! tch's own linker flags are not inherited by dependents (tch-rs #907, #980), so each
//! final artifact needs:
//! - an rpath to libtorch's `lib/`, so it runs without `LD_LIBRARY_PATH`;
//! - `libtorch_cuda.so` linked with `--no-as-needed`: nothing references its symbols
//!   directly, so the linker would drop it and CUDA would never be seen at run time;
//! - rpaths to the CUDA runtime and NCCL of the torch wheel, which core's shim links.
//!
//! plumb-core's build script re-exports torch-sys's library directory as
//! `DEP_PLUMB_LIBTORCH_LIB` to its direct dependents.

/// Emits the link arguments; call it from `build.rs`.
pub fn libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_PLUMB_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_PLUMB_LIBTORCH_LIB") else {
        println!("cargo:warning=plumb-link: DEP_PLUMB_LIBTORCH_LIB is not set; does this crate depend on plumb-core?");
        return;
    };
    libtorch_at(&lib);
}

/// Emits the link arguments for the libtorch library directory `lib`.
pub fn libtorch_at(lib: &str) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let cuda = std::path::Path::new(&lib).join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,{},--as-needed", cuda.display());
        // The CUDA runtime and NCCL that core's shim links, where the torch wheel puts them.
        let nvidia = std::path::Path::new(&lib).join("../../nvidia");
        for dir in ["cu13/lib", "nccl/lib"] {
            let dir = nvidia.join(dir);
            if dir.exists() {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            }
        }
    }
}

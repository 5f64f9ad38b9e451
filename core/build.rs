fn main() {
    // torch-sys (links = "tch") hands its libtorch directory to us; pass it on to crates
    // that depend on plumb-core (DEP_PLUMB_LIBTORCH_LIB), and link core's own test binaries.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys sets DEP_TCH_LIBTORCH_LIB");
    println!("cargo:libtorch_lib={lib}");
    plumb_link::libtorch_at(&lib);

    // The C++ shim (csrc/), against the same libtorch headers, in libtorch's C++ ABI.
    let root = std::path::Path::new(&lib).parent().expect("libtorch's lib/ has a parent").to_path_buf();
    let sources = [
        "csrc/shim.cpp",
        "csrc/checkpoint.cpp",
        "csrc/dist.cpp",
        "csrc/rows.cpp",
        "csrc/attention.cpp",
        "csrc/fused.cpp",
    ];
    for source in sources.iter().chain(&["csrc/kernels.h"]) {
        println!("cargo:rerun-if-changed={source}");
    }
    let mut build = cc::Build::new();
    if let Some(gloo) = gloo_include() {
        build.include(gloo);
    }
    // The CUDA half (CUDA graphs, memory statistics, NCCL): compiled wherever CUDA's headers
    // are, GPU or not, and used where libtorch sees a device.
    if let Some(cuda) = cuda_headers(&root) {
        for dir in &cuda.include {
            build.include(dir);
        }
        build.define("PLUMB_CUDA", None).define("USE_CUDA", None).define("USE_C10D_NCCL", None);
        println!("cargo:rustc-link-search=native={lib}");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-search=native={}", cuda.cudart.display());
        println!("cargo:rustc-link-lib=dylib=cudart");
    }
    // ATen's parallel_for is a header template: compiled without OpenMP it runs every
    // range on the calling thread. The CPU kernels' loops (rows.cpp, attention.cpp) go to
    // libtorch's own OpenMP runtime.
    if let Some(gomp) = libtorch_openmp(&lib) {
        build.flag("-fopenmp");
        println!("cargo:rustc-link-search=native={}", gomp.display());
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
    build
        .cpp(true)
        .files(sources)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        // The hand-written kernels' loops are vectorised by the compiler, in tests too.
        .opt_level(3)
        // c10d's headers declare ProcessGroupGloo only under this switch (libtorch was built with it).
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("plumb_shim");
}

/// CUDA's headers as the torch wheel's `nvidia/` packages lay them out beside `torch/`
/// (`nvidia/cu13/include` with `crt/` from nvidia-cuda-crt and `cccl/` from nvidia-cuda-cccl,
/// `nvidia/nccl/include`), and the directory of `libcudart.so`. `None` for a CPU-only
/// libtorch (no `libtorch_cuda.so`). A CUDA libtorch without the headers is a missing install
/// step: an error in CI (`CI=true`), a warning elsewhere (the CUDA half is left out).
struct CudaHeaders {
    include: Vec<std::path::PathBuf>,
    cudart: std::path::PathBuf,
}

fn cuda_headers(torch: &std::path::Path) -> Option<CudaHeaders> {
    println!("cargo:rerun-if-env-changed=CI");
    if !torch.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = torch.parent().map(|p| p.join("nvidia")).unwrap_or_default();
    let cu13 = nvidia.join("cu13");
    let include = vec![cu13.join("include"), cu13.join("include/cccl"), nvidia.join("nccl/include")];
    let needed = [
        cu13.join("include/cuda_runtime_api.h"),
        cu13.join("include/crt/host_config.h"),
        cu13.join("include/cccl/cuda/std/version"),
        nvidia.join("nccl/include/nccl.h"),
        cu13.join("lib/libcudart.so.13"),
    ];
    if let Some(missing) = needed.iter().find(|p| !p.exists()) {
        let message = format!(
            "plumb-core: libtorch has CUDA but {} is missing, so CUDA graphs, CUDA memory statistics and NCCL are left out. \
             `./dev` installs CUDA's headers (pip: nvidia-cuda-crt==13.0.* nvidia-cuda-cccl==13.0.*) beside torch",
            missing.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message}");
        }
        println!("cargo:warning={message}");
        return None;
    }
    // The wheel ships only libcudart.so.13.
    Some(CudaHeaders { include, cudart: unversioned_link("libcudart.so", &cu13.join("lib/libcudart.so.13")) })
}

/// A directory holding `libgomp.so`, linked to the OpenMP runtime libtorch ships and runs
/// its intra-op threads on (the wheel's `libgomp.so.1`, the libtorch zip's
/// `libgomp-<hash>.so.1`), so that the shim's parallel regions share libtorch's threads and
/// thread count. `None`, with a warning, when libtorch ships none (the shim's loops then
/// run on one thread).
fn libtorch_openmp(lib: &str) -> Option<std::path::PathBuf> {
    let runtime = std::fs::read_dir(lib).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libgomp") && n.contains(".so"))
    });
    let Some(runtime) = runtime else {
        println!("cargo:warning=plumb-core: no libgomp in {lib}; the shim's CPU kernels run on one thread");
        return None;
    };
    Some(unversioned_link("libgomp.so", &runtime))
}

/// OUT_DIR, where `name` now links to `library`: the linker needs a library's unversioned
/// name, and libtorch and the CUDA wheels ship only versioned ones.
fn unversioned_link(name: &str, library: &std::path::Path) -> std::path::PathBuf {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let link = out.join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(library, &link).unwrap_or_else(|e| panic!("linking {name} in OUT_DIR: {e}"));
    out
}

/// Where gloo's headers are: `$GLOO_INCLUDE_DIR`, else the system's (Debian's `libgloo-dev`).
/// The torch wheel ships c10d's headers but not gloo's, which ProcessGroupGloo.hpp includes;
/// only pointers to gloo types cross, the code is libtorch's own.
/// `None` when they are on the compiler's default search path (passing `-I/usr/include` would
/// reorder it and break libstdc++'s `#include_next`).
fn gloo_include() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    let given = std::env::var_os("GLOO_INCLUDE_DIR").map(std::path::PathBuf::from);
    let dir = given.clone().unwrap_or_else(|| "/usr/include".into());
    if !dir.join("gloo/algorithm.h").exists() {
        panic!(
            "plumb-core: gloo's headers are missing ({} has no gloo/algorithm.h). `./dev` installs them \
             (Debian/Ubuntu: `apt-get install libgloo-dev`); or point GLOO_INCLUDE_DIR at a directory holding gloo/",
            dir.display()
        );
    }
    given
}

fn main() {
    // torch-sys (links = "tch") hands its libtorch directory to us; pass it on to crates
    // that depend on plumb-core (DEP_PLUMB_LIBTORCH_LIB), and link core's own test binaries.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys sets DEP_TCH_LIBTORCH_LIB");
    println!("cargo:libtorch_lib={lib}");
    plumb_link::libtorch_at(&lib);

    // The C++ shim (csrc/), against the same libtorch headers, in libtorch's C++ ABI.
    let root = std::path::Path::new(&lib).parent().expect("libtorch's lib/ has a parent").to_path_buf();
    let sources = ["csrc/shim.cpp", "csrc/checkpoint.cpp", "csrc/dist.cpp", "csrc/rows.cpp"];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    let mut build = cc::Build::new();
    if let Some(gloo) = gloo_include() {
        build.include(gloo);
    }
    build
        .cpp(true)
        .files(sources)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        // c10d's headers declare ProcessGroupGloo only under this switch (libtorch was built with it).
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("plumb_shim");
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

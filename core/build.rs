fn main() {
    // torch-sys (links = "tch") hands its libtorch directory to us; pass it on to crates
    // that depend on plumb-core (DEP_PLUMB_LIBTORCH_LIB), and link core's own test binaries.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys sets DEP_TCH_LIBTORCH_LIB");
    println!("cargo:libtorch_lib={lib}");
    plumb_link::libtorch_at(&lib);

    // The C++ shim (csrc/), against the same libtorch headers, in libtorch's C++ ABI.
    let root = std::path::Path::new(&lib).parent().expect("libtorch's lib/ has a parent").to_path_buf();
    let sources = ["csrc/shim.cpp", "csrc/checkpoint.cpp"];
    for source in sources {
        println!("cargo:rerun-if-changed={source}");
    }
    cc::Build::new()
        .cpp(true)
        .files(sources)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("plumb_shim");
}

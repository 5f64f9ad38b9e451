fn main() {
    // torch-sys (links = "tch") hands its libtorch directory to us; pass it on to crates
    // that depend on plumb-core (DEP_PLUMB_LIBTORCH_LIB), and link core's own test binaries.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:libtorch_lib={lib}");
        plumb_link::libtorch_at(&lib);
    }
}

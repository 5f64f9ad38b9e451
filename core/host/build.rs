fn main() {
    // The test binaries link libtorch through plumb-core.
    plumb_link::libtorch();
}

fn main() {
    plumb_link::libtorch();
}

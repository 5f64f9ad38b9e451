use std::fmt::Write;

fn main() {
    plumb_link::libtorch();
    shipped_recipes();
}

/// Embeds `recipes/*.yaml` in the binary (`plumb recipes`, `plumb init`), as a list of
/// (name, text) in `$OUT_DIR/recipes.rs`.
fn shipped_recipes() {
    println!("cargo:rerun-if-changed=recipes");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("recipes/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    let mut out = String::from("pub const SHIPPED: &[(&str, &str)] = &[\n");
    for name in names {
        let path = dir.join(&name);
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(out, "    ({:?}, include_str!({:?})),", name.trim_end_matches(".yaml"), path.display().to_string())
            .unwrap();
    }
    out.push_str("];\n");
    std::fs::write(std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("recipes.rs"), out).unwrap();
}

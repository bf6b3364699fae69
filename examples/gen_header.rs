//! Writes include/kvcompress.h from src/ffi with the pinned cbindgen (`make header`).
fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("header generation")
        .write_to_file(root.join("include/kvcompress.h"));
}

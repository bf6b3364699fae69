//! Writes eval/policies.json, the policy table (`kvcompress::policy::PRESETS`) for the Python
//! evaluation: names, budget kind (off / fixed / adaptive), parameters with defaults, ranges and
//! help. tests/policies.rs fails when the committed file is stale.
fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::write(
        root.join("eval/policies.json"),
        kvcompress::policy::table_json(),
    )
    .expect("write eval/policies.json");
}

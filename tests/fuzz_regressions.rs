//! Replays every input kept under `fuzz/regressions/c_api/` (crashes the fuzzer found, each
//! fixed in `src/`) and the committed seeds `fuzz/seeds/c_api/` through the fuzz driver
//! (`fuzz/driver.rs`), without libFuzzer: the same C-API calls, the same checks, so a fixed
//! crash stays fixed in a plain `cargo test`. `scripts/fuzz.sh replay` runs the same files under
//! AddressSanitizer.

#[path = "../fuzz/driver.rs"]
mod driver;

use std::path::{Path, PathBuf};

fn inputs(dir: &str) -> Vec<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            p.is_file() && !name.starts_with('.') && !name.ends_with(".md")
        })
        .collect();
    v.sort();
    v
}

fn replay(files: &[PathBuf]) {
    for f in files {
        let data = std::fs::read(f).expect("read input");
        let r = std::panic::catch_unwind(|| driver::run(&data));
        assert!(r.is_ok(), "{} fails (see the panic above)", f.display());
    }
}

#[test]
fn fuzz_regressions_replay() {
    replay(&inputs("fuzz/regressions/c_api"));
}

#[test]
fn fuzz_seeds_replay() {
    let seeds = inputs("fuzz/seeds/c_api");
    assert!(seeds.len() >= 11, "one seed per policy at least");
    replay(&seeds);
}

/// Degenerate inputs: nothing (only the calls without a handle), all zeros, all ones.
#[test]
fn driver_runs_empty_and_short_inputs() {
    driver::run(&[]);
    driver::run(&[0; 64]);
    driver::run(&[0xff; 64]);
}

/// The driver's parameter lists cover the policy table: every parameter of every preset is a
/// key the driver writes and has values in VALID, and each of those values is one the table's
/// range accepts for at least one preset (policy names come from the table itself).
#[test]
fn driver_covers_the_policy_table() {
    use kvcompress::policy::{BudgetKind, PRESETS};
    for preset in &PRESETS {
        for param in preset.params() {
            assert!(
                driver::KEYS.contains(&param.key),
                "fuzz/driver.rs KEYS lacks `{}` ({})",
                param.key,
                preset.name
            );
            assert!(
                driver::VALID.iter().any(|(k, _)| *k == param.key),
                "fuzz/driver.rs VALID lacks `{}` ({})",
                param.key,
                preset.name
            );
        }
    }
    for (key, values) in driver::VALID {
        for v in *values {
            let kv = format!("{key}={v}");
            let ok = PRESETS
                .iter()
                .filter(|p| p.budget != BudgetKind::Off)
                .filter(|p| p.params().iter().any(|x| x.key == *key))
                .any(|p| kvcompress::Policy::parse(p.name, &[&kv]).is_ok());
            assert!(ok, "fuzz/driver.rs VALID: no preset accepts {kv}");
        }
    }
}

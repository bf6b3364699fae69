//! The committed header is what the pinned cbindgen makes of src/ffi today, and the version
//! macros it publishes (the parts and the composite `KVC_VERSION_NUMBER`) match Cargo.toml.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn committed_header() -> String {
    std::fs::read_to_string(root().join("include/kvcompress.h")).expect("include/kvcompress.h")
}

/// The header as `make header` (examples/gen_header.rs) would write it, generated in memory.
fn generated_header() -> String {
    let config =
        cbindgen::Config::from_file(root().join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(root())
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("generated header is UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let want = generated_header();
    let have = committed_header();
    if want != have {
        let first = want
            .lines()
            .zip(have.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| want.lines().count().min(have.lines().count()));
        panic!(
            "include/kvcompress.h is stale: it differs from what cbindgen generates from \
             src/ffi/mod.rs (first difference at line {}:\n  generated: {:?}\n  committed: {:?}).\n\
             Run `make header` and commit include/kvcompress.h.",
            first + 1,
            want.lines().nth(first).unwrap_or("<end of file>"),
            have.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

/// `#define NAME <integer>` in the header.
fn define_u32(header: &str, name: &str) -> u32 {
    let prefix = format!("#define {name} ");
    let line = header
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("include/kvcompress.h has no `{prefix}...`"));
    line[prefix.len()..]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("`{line}`: expected an integer"))
}

fn cargo_version() -> (u32, u32, u32) {
    let p = |s: &str| s.parse::<u32>().expect("numeric version part");
    (
        p(env!("CARGO_PKG_VERSION_MAJOR")),
        p(env!("CARGO_PKG_VERSION_MINOR")),
        p(env!("CARGO_PKG_VERSION_PATCH")),
    )
}

#[test]
fn version_macros_match_cargo_toml() {
    let h = committed_header();
    let (major, minor, patch) = cargo_version();
    let parts = (
        define_u32(&h, "KVC_VERSION_MAJOR"),
        define_u32(&h, "KVC_VERSION_MINOR"),
        define_u32(&h, "KVC_VERSION_PATCH"),
    );
    assert_eq!(
        parts,
        (major, minor, patch),
        "KVC_VERSION_MAJOR/MINOR/PATCH in include/kvcompress.h (from cbindgen.toml \
         after_includes) must match Cargo.toml's version {}: update cbindgen.toml, then `make header`",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        define_u32(&h, "KVC_ABI_VERSION"),
        kvcompress::ffi::KVC_ABI_VERSION,
        "KVC_ABI_VERSION in the header differs from src/ffi/mod.rs: run `make header`"
    );
}

/// Evaluate the composite macro with a real C compiler: every published macro is tested, derived
/// ones included (rustls-ffi once shipped a composite that shifted MINOR twice).
#[test]
fn composite_version_number_evaluates_correctly() {
    let (major, minor, patch) = cargo_version();
    let want = (major << 16) | (minor << 8) | patch;
    let dir = scratch_dir("header-version");
    let src = dir.join("version.c");
    let exe = dir.join("version");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include \"kvcompress.h\"\n\
         int main(void) {\n\
           printf(\"%ld %d %d %d %d\\n\", (long)KVC_VERSION_NUMBER, KVC_VERSION_MAJOR,\n\
                  KVC_VERSION_MINOR, KVC_VERSION_PATCH, KVC_ABI_VERSION);\n\
           return 0;\n}\n",
    )
    .unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(root().join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(st.success(), "compiling {} failed", src.display());
    let out = Command::new(&exe).output().expect("run version probe");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let got: Vec<i64> = text
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(
        got[0],
        want as i64,
        "KVC_VERSION_NUMBER evaluates to {:#x}, expected (MAJOR << 16) | (MINOR << 8) | PATCH \
         = {want:#x} for {}",
        got[0],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        &got[1..4],
        &[major as i64, minor as i64, patch as i64],
        "version parts as seen by C"
    );
    assert_eq!(got[4], kvcompress::ffi::KVC_ABI_VERSION as i64);
}

/// A per-test scratch directory next to the test executable (inside the cargo target dir).
fn scratch_dir(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .expect("test executable has a parent")
        .join(format!("kvc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Everything the header declares is in the library's namespace (`kvc_` / `KVC_`): a C program
/// includes it next to its own names, so an internal constant cbindgen picked up (the header once
/// defined `BALLOT_COST` and `Rope_NORM_CODE`) would collide with them.
#[test]
fn every_public_name_is_prefixed() {
    let h = committed_header();
    let (mut bad, mut seen) = (Vec::new(), 0);
    // declarations only: the doc comments (`/* ... */` blocks) are prose
    let mut in_comment = false;
    let code: Vec<&str> = h
        .lines()
        .filter(|l| {
            let was = in_comment || l.trim_start().starts_with("/*");
            in_comment = was && !l.contains("*/");
            !was
        })
        .collect();
    for &line in &code {
        let words: Vec<&str> = line.split_whitespace().collect();
        let name = match words.as_slice() {
            ["#define", name, ..] => *name,
            // `typedef struct kvc_x {`, `typedef enum kvc_x {`
            ["typedef", "struct" | "enum", name, "{"] => name,
            // `typedef uint32_t kvc_x;`, `} kvc_x;`
            ["typedef", .., last] | ["}", last] if last.ends_with(';') && !line.contains('(') => {
                last.trim_end_matches(';')
            }
            // enumerators: `  KVC_STATUS_OK = 0,`
            [name, "=", ..] => name,
            _ => continue,
        };
        let name = name.split('(').next().unwrap_or(name);
        seen += 1;
        if !(name.starts_with("kvc_") || name.starts_with("KVC_") || name == "KVCOMPRESS_H") {
            bad.push(line.to_string());
        }
    }
    // function declarations: `kvc_status kvc_x(...)` and the like
    for line in code
        .iter()
        .filter(|l| l.contains('(') && l.trim_end().ends_with(");"))
    {
        if let Some(name) = line
            .split('(')
            .next()
            .and_then(|s| s.split_whitespace().last())
        {
            let name = name.trim_start_matches('*');
            seen += 1;
            if !name.starts_with("kvc_") {
                bad.push(line.to_string());
            }
        }
    }
    // the parse found the header's declarations (macros, types, enumerators, functions)
    assert!(
        seen >= 50,
        "only {seen} declarations parsed from include/kvcompress.h"
    );
    assert!(
        bad.is_empty(),
        "include/kvcompress.h declares names outside kvc_/KVC_:\n  {}",
        bad.join("\n  ")
    );
}

//! Builds the C and C++ programs in tests/c/ against include/kvcompress.h and the static library
//! cargo just built for this profile, then runs them as black boxes.
//!
//! - `tests/c/abi_test.c`: the whole C API, every error path; `-std=c11 -Wall -Wextra -Werror
//!   -pedantic`, with AddressSanitizer + UBSan when the compiler and the machine support them;
//! - `tests/c/header_cpp.cpp`: the header compiles as C++17 with the same warnings, links, runs.
//!
//! Compilers: `$CC` / `$CXX`, else `cc` / `c++`. `make valgrind` runs the C program under
//! valgrind instead of the sanitizers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const C_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"];
const CXX_FLAGS: &[&str] = &[
    "-std=c++17",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-g",
];
const LIBS: &[&str] = &["-lpthread", "-ldl", "-lm"];
const SANITIZE: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `<target>/<profile>`: this test runs from `<target>/<profile>/deps/c_abi-<hash>`.
fn profile_dir() -> PathBuf {
    deps_dir().parent().expect("profile dir").to_path_buf()
}

fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().expect("deps dir").to_path_buf()
}

/// The static library cargo built for this test run. Built as a dependency of the tests it stays
/// in `deps/` (only `cargo build` copies it up to `<profile>/`), so `deps/` is looked at first;
/// of the two, the newer wins.
fn static_lib() -> PathBuf {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let candidates = [
        deps_dir().join("libkvcompress.a"),
        profile_dir().join("libkvcompress.a"),
    ];
    candidates
        .iter()
        .filter(|p| p.exists())
        .max_by_key(|p| mtime(p))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libkvcompress.a is in neither {} nor {}: `cargo test` builds it (crate-type \
                 includes staticlib); run `cargo build` with the same profile first",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

fn work_dir() -> PathBuf {
    let d = profile_dir().join(format!("kvc-c-abi-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create work dir");
    d
}

fn tool(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default.into())
}

fn show(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `cc -fsanitize=address,undefined` compiles, links and runs a trivial program here
/// (some containers forbid what ASan needs at run time).
fn sanitizers_work() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("KVC_NO_SANITIZE").is_some() {
            eprintln!("c_abi: sanitizers disabled by KVC_NO_SANITIZE");
            return false;
        }
        let dir = work_dir();
        let src = dir.join("probe.c");
        let exe = dir.join("probe");
        std::fs::write(
            &src,
            "#include <stdlib.h>\nint main(void) { char *p = malloc(4); p[0] = 0; free(p); return 0; }\n",
        )
        .unwrap();
        let built = Command::new(tool("CC", "cc"))
            .args(SANITIZE)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .is_ok_and(|o| o.status.success());
        let ok = built && Command::new(&exe).output().is_ok_and(|o| o.status.success());
        eprintln!(
            "c_abi: AddressSanitizer + UBSan {}",
            if ok { "on" } else { "unavailable: building without them" }
        );
        ok
    })
}

/// Compile `src` with `compiler` and link it with the static library; returns the executable.
fn build(compiler: &str, flags: &[&str], src: &str, name: &str) -> PathBuf {
    let exe = work_dir().join(name);
    let mut cmd = Command::new(compiler);
    cmd.args(flags);
    if sanitizers_work() {
        cmd.args(SANITIZE);
    }
    cmd.arg("-I")
        .arg(root().join("include"))
        .arg(root().join(src))
        .arg(static_lib())
        .args(LIBS)
        .arg("-o")
        .arg(&exe);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{compiler}`: {e}"));
    assert!(
        out.status.success(),
        "compiling {src} failed ({cmd:?})\n{}",
        show(&out)
    );
    exe
}

fn run(exe: &Path) -> Output {
    Command::new(exe)
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:abort_on_error=0:exitcode=23",
        )
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        // the C program pins its own thread counts; keep the library from overriding them
        .env_remove("KVC_THREADS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
}

#[test]
fn c_program_drives_the_whole_api() {
    let exe = build(&tool("CC", "cc"), C_FLAGS, "tests/c/abi_test.c", "abi_test");
    let out = run(&exe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", stdout.trim_end());
    for l in String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("KNOWN ISSUE") || l.starts_with("NOTE"))
    {
        eprintln!("{l}");
    }
    assert!(
        out.status.success(),
        "tests/c/abi_test.c failed\n{}",
        show(&out)
    );
    let last = stdout.lines().last().unwrap_or("");
    assert!(
        last.starts_with("C ABI: ") && last.ends_with(" passed, 0 failed"),
        "unexpected summary line {last:?}\n{}",
        show(&out)
    );
    let passed: usize = last["C ABI: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("pass count");
    assert!(passed > 500, "only {passed} checks ran");
}

#[test]
fn header_compiles_and_links_as_cpp() {
    let exe = build(
        &tool("CXX", "c++"),
        CXX_FLAGS,
        "tests/c/header_cpp.cpp",
        "header_cpp",
    );
    let out = run(&exe);
    assert!(
        out.status.success(),
        "tests/c/header_cpp.cpp failed\n{}",
        show(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("C++ header: ok"));
}

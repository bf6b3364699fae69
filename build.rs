//! Publishes the header directory to dependent build scripts (`DEP_KVCOMPRESS_INCLUDE`) and, with
//! the `cuda` feature, compiles `cuda/*.cu` with nvcc into `OUT_DIR`: PTX for `compute_80` plus
//! cubins for sm_80 and sm_90, embedded by `src/backend/cuda.rs` through a generated
//! `kernels.rs`. Without nvcc the crate still builds (with a `cargo:warning`) and every device
//! call reports `CudaUnavailable`.
//!
//! nvcc is looked up in `KVC_NVCC`, `NVCC`, `PATH`, `$CUDA_HOME/bin` and `/usr/local/cuda/bin`.
//! `KVC_CUDA_REQUIRE=1` turns a missing nvcc or a failed compile into a build error (used by
//! `scripts/cuda-check.sh`). Extra flags come from `KVC_NVCC_FLAGS` (split on whitespace).
//!
//! Version choice: the PTX ISA a driver accepts is capped by its CUDA version, so
//! `scripts/cuda-check.sh` pins nvcc 13.0 (PTX ISA 9.0, accepted by driver 580 = CUDA 13.0 and
//! newer); the cubins do not depend on the driver's PTX ISA at all and are preferred at load time.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Cubin targets shipped next to the PTX; keep in sync with the loader in src/backend/cuda.rs.
const CUBIN_ARCHS: &[u32] = &[80, 90];

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    println!("cargo:include={}", dir.display());
    println!("cargo:rerun-if-changed=build.rs");
    soname();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda();
    }
}

/// The shared library's soname carries the ABI version (`libkvcompress.so.<KVC_ABI_VERSION>`), so a
/// program linked against one ABI never loads a library of another; `make install` names the file
/// after it and checks it with readelf.
fn soname() {
    let ffi = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi/mod.rs");
    println!("cargo:rerun-if-changed={}", ffi.display());
    let text = std::fs::read_to_string(&ffi).expect("build.rs: cannot read src/ffi/mod.rs");
    let abi: u32 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("pub const KVC_ABI_VERSION: u32 = "))
        .and_then(|v| v.trim_end_matches(';').trim().parse().ok())
        .expect("build.rs: no `pub const KVC_ABI_VERSION: u32 = N;` in src/ffi/mod.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libkvcompress.so.{abi}");
    }
}

fn find_nvcc() -> Option<PathBuf> {
    for var in ["KVC_NVCC", "NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
    }
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/bin"));
    dirs.into_iter()
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

fn cuda() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("cuda");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=KVC_CUDA_REQUIRE");
    println!("cargo:rerun-if-env-changed=KVC_NVCC_FLAGS");
    let require = std::env::var("KVC_CUDA_REQUIRE").is_ok_and(|v| v == "1");
    let mut units: Vec<PathBuf> = std::fs::read_dir(&src)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    units.sort();
    for p in &units {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    units.retain(|p| p.extension().is_some_and(|e| e == "cu"));

    let fail = |why: String| {
        if require {
            panic!("kvcompress: {why}");
        }
        println!("cargo:warning=kvcompress: {why}; the CUDA backend will report CudaUnavailable");
        write_kernels(&out, &[], &why);
    };
    let Some(nvcc) = find_nvcc() else {
        return fail(
            "nvcc not found (set KVC_NVCC, or run scripts/cuda-check.sh to install it from PyPI)"
                .into(),
        );
    };
    let extra: Vec<String> = std::env::var("KVC_NVCC_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut built = Vec::new();
    for cu in &units {
        let stem = cu.file_stem().unwrap().to_string_lossy().to_string();
        let mut jobs: Vec<(Vec<String>, PathBuf)> = vec![(
            vec!["-ptx".into(), "-arch=compute_80".into()],
            out.join(format!("{stem}.ptx")),
        )];
        for a in CUBIN_ARCHS {
            jobs.push((
                vec!["-cubin".into(), format!("-arch=sm_{a}")],
                out.join(format!("{stem}.sm_{a}.cubin")),
            ));
        }
        for (args, dst) in &jobs {
            let res = Command::new(&nvcc)
                .args(args)
                .args(["-O3", "-std=c++17", "-I"])
                .arg(&src)
                .args(&extra)
                .arg("-o")
                .arg(dst)
                .arg(cu)
                .output();
            match res {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return fail(format!(
                        "nvcc {} failed on {}: {}",
                        args.join(" "),
                        cu.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
                Err(e) => return fail(format!("cannot run {}: {e}", nvcc.display())),
            }
        }
        built.push(stem);
    }
    write_kernels(&out, &built, "");
}

/// `kernels.rs`: one `Module` per compiled `.cu` with its PTX and cubins.
fn write_kernels(out: &Path, stems: &[String], why: &str) {
    let mut s = String::from("// generated by build.rs\n");
    s.push_str(&format!(
        "/// Why no kernels were built (empty when they were).\npub const NOT_BUILT: &str = {why:?};\n"
    ));
    s.push_str("/// The compiled `.cu` files.\npub const MODULES: &[Module] = &[\n");
    for stem in stems {
        s.push_str(&format!(
            "    Module {{ name: {stem:?}, ptx: include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\")), cubins: &["
        ));
        for a in CUBIN_ARCHS {
            s.push_str(&format!(
                "({a}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.sm_{a}.cubin\"))), "
            ));
        }
        s.push_str("] },\n");
    }
    s.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), s).expect("write kernels.rs");
}

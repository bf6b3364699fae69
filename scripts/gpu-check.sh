#!/usr/bin/env bash
# The GPU kit: everything the CUDA path needs checked on a GPU, in one command on a bare GPU machine
# (nvcc 13.0, CMake, ninja, 16 cores, python3; no Rust, no network) from artefacts prepared here.
#
#   make gpu-kit                    here: build the artefacts into build/gpu-kit (below), check their size
#   bash scripts/gpu-check.sh       there: run the checks (here: checks the kit, then SKIPPED: no GPU)
#
# The one command for the device tool (the working tree travels, build/gpu-kit is carried):
#   run(command="bash scripts/gpu-check.sh", carry=["build/gpu-kit"], timeout_s=540)
#
# build/gpu-kit (made by `bash scripts/gpu-check.sh prepare`, at most 64 MiB with the working tree):
#   lib/libkvcompress.so      the library with the `cuda` feature (kernels: sm_80/sm_90 cubins + PTX ISA 9.0,
#                             loadable by driver 580 / CUDA 13.0 and newer; see scripts/cuda-check.sh)
#   bin/test-cuda             tests/cuda.rs (CUDA against the CPU per policy and dtype), run with KVC_REQUIRE_GPU=1
#   bin/bench-plan            benches/plan.rs, run with BENCH_BACKEND=cuda: plan time for SmolLM2-135M at 8K and
#                             an 8B shape (32 layers, 32/8 heads, d=128) at 32K with K in device memory; `knorm`'s
#                             K bytes / time is the scoring kernels' read bandwidth
#   llama-src.tar.xz          the patched llama.cpp (series 0001-0009) without the backends it does not build
#   model.gguf                SmolLM2-135M-Instruct Q4_1 cut to its first 4 layers (real weights; the whole model,
#                             98 MB, and gemma3-270m, 253 MB, do not fit in 64 MiB): it does not find passkeys, so
#                             the end-to-end step checks parity (backend=cuda and backend=cpu plan the same cells
#                             and give the same answer), not retrieval
#   passkey.txt               a passkey prompt of ~3K tokens
#   MANIFEST                  what was built from which commit
#
# Steps on the GPU machine (results in $OUT when set, else build/gpu-check): the llama.cpp CUDA build (sm_90,
# -j16) runs in the background while the Rust binaries run; then the end-to-end step: kvc-run -ngl 99 -c 8192
# on the prompt for dbudget and gvote with backend=cuda and backend=cpu, and none; the run fails if cuda and
# cpu disagree on the answer or on the cells evicted, or if a policy evicted nothing.
#
# Without a GPU (the rehearsal on the build machine) the llama.cpp subset is only configured with CUDA, then
# the script stops with "SKIPPED: no GPU" (exit 0); GPU_CHECK_BUILD=full builds it there too (about an hour
# on 2 cores). GPU_CHECK_BUILD=0 skips the llama.cpp build and the end-to-end step; GPU_CHECK_JOBS (default
# nproc) sets the build's parallelism.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KIT=$ROOT/build/gpu-kit
OUTD=${OUT:-$ROOT/build/gpu-check}
start=$(date +%s)
step() { echo "== gpu-check [$(($(date +%s) - start))s]: $*"; }
die() { echo "gpu-check: FAILED: $*" >&2; exit 1; }

prepare() {
    set -e
    local cache=${KVC_CACHE:-$HOME/.cache/kvcompress}
    local nv nvcc tgt=$ROOT/target/gpu-kit
    nv=$(echo "$cache"/cuda-venv/lib/python3*/site-packages/nvidia/cu13)
    nvcc=$nv/bin/nvcc
    [ -x "$nvcc" ] || die "no PyPI nvcc in $cache/cuda-venv: run 'make cuda-check' first"
    rm -rf "$KIT"
    mkdir -p "$KIT/lib" "$KIT/bin"
    step "cargo build/test/bench --features cuda (nvcc $nvcc, kernels required)"
    export CARGO_TARGET_DIR=$tgt KVC_NVCC=$nvcc KVC_CUDA_REQUIRE=1
    cargo build --release --features cuda
    local json
    json=$(mktemp)
    cargo test --release --features cuda --test cuda --no-run --message-format=json >"$json"
    cargo bench --features cuda --bench plan --no-run --message-format=json >>"$json"
    python3 - "$json" "$KIT/bin" <<'EOF'
import json, shutil, sys
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe, t = m.get("executable"), m.get("target", {})
    if m.get("reason") == "compiler-artifact" and exe and t.get("name") in ("cuda", "plan"):
        found[t["name"]] = exe
for name, dst in (("cuda", "test-cuda"), ("plan", "bench-plan")):
    if name not in found:
        sys.exit("gpu-kit: cargo built no %s binary" % name)
    shutil.copy(found[name], "%s/%s" % (sys.argv[2], dst))
EOF
    rm -f "$json"
    cp "$tgt/release/libkvcompress.so" "$KIT/lib/"
    # debug info is most of their size and the kit has 64 MiB
    strip --strip-debug "$KIT/lib/libkvcompress.so" "$KIT/bin/test-cuda" "$KIT/bin/bench-plan"

    step "llama.cpp source subset (patched tree at $(git -C build/llama-src rev-parse --short HEAD))"
    [ -z "$(git -C build/llama-src status --porcelain --untracked-files=no)" ] ||
        die "build/llama-src has uncommitted edits"
    local want have
    want=$(bash scripts/llama.sh hash)
    have=$(cat build/llama-src/.git/kvc-stamp 2>/dev/null || true)
    [ "$want" = "$have" ] || die "build/llama-src is not patches/*.patch (run scripts/llama.sh apply or export)"
    local skip=(ggml-vulkan ggml-opencl ggml-sycl ggml-hexagon ggml-openvino ggml-et ggml-webgpu ggml-metal
                ggml-virtgpu ggml-zdnn ggml-cann ggml-musa ggml-zendnn ggml-hip)
    local excl=()
    for b in "${skip[@]}"; do excl+=(":(exclude)ggml/src/$b"); done
    git -C build/llama-src archive --format=tar HEAD CMakeLists.txt cmake ggml src include common tools vendor app \
        licenses "${excl[@]}" | xz -T2 -6 >"$KIT/llama-src.tar.xz"

    step "model and prompt"
    python3 tests/llama/make_tiny_models.py --truncate "$(bash scripts/llama.sh model)" "$KIT/model.gguf" 4
    python3 - "$KIT/passkey.txt" <<'EOF'
import sys
sys.path.insert(0, "tests/llama")
import kvc_common as k
open(sys.argv[1], "w").write(k.passkey_prompt(42817, 240, 60))
EOF
    {
        echo "kvcompress $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted edits)')"
        echo "llama.cpp $(git -C build/llama-src rev-parse HEAD) (pin + patches $want)"
        echo "nvcc $("$nvcc" --version | tail -1)"
        (cd "$KIT" && find . -type f ! -name MANIFEST | sort | xargs sha256sum)
    } >"$KIT/MANIFEST"
    local kit tree
    kit=$(du -sb "$KIT" | cut -f1)
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo "gpu-kit: $((kit / 1048576)) MiB in build/gpu-kit + $((tree / 1048576)) MiB working tree"
    [ $((kit + tree)) -le $((64 * 1048576)) ] || die "kit + working tree exceed 64 MiB"
    ls -la "$KIT" "$KIT/bin" "$KIT/lib"
    step "done: run(command=\"bash scripts/gpu-check.sh\", carry=[\"build/gpu-kit\"], timeout_s=540)"
}

if [ "${1:-}" = "prepare" ]; then
    prepare
    exit
fi

mkdir -p "$OUTD"
exec > >(tee "$OUTD/gpu-check.log") 2>&1

step "the kit"
missing=0
for f in lib/libkvcompress.so bin/test-cuda bin/bench-plan llama-src.tar.xz model.gguf passkey.txt MANIFEST; do
    [ -s "$KIT/$f" ] || { echo "missing build/gpu-kit/$f"; missing=1; }
done
[ "$missing" = 0 ] || die "the kit is incomplete: run 'make gpu-kit' on the build machine and carry build/gpu-kit"
(cd "$KIT" && grep -v '^kvcompress \|^llama.cpp \|^nvcc ' MANIFEST | sha256sum -c --quiet) || die "build/gpu-kit does not match its MANIFEST"
head -3 "$KIT/MANIFEST"
cp "$KIT/MANIFEST" "$OUTD/MANIFEST"

have_gpu=0
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep GPU >/dev/null && have_gpu=1

# the llama.cpp CUDA build, in the background while the Rust binaries run
LBUILD=/tmp/gpu-kit-llama
BUILD_MODE=${GPU_CHECK_BUILD:-1}
build_pid=""
NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
# the rehearsal here: the toolkit scripts/llama.sh assembles from PyPI wheels for KVC_CUDA=1
PYPI_ROOT=${KVC_CACHE:-$HOME/.cache/kvcompress}/cuda-root-13.0
[ -z "$NVCC" ] && [ -x "$PYPI_ROOT/bin/nvcc" ] && NVCC=$PYPI_ROOT/bin/nvcc
if [ "$BUILD_MODE" != 0 ]; then
    [ -n "$NVCC" ] || die "no nvcc (PATH, /usr/local/cuda) to build llama.cpp with CUDA; GPU_CHECK_BUILD=0 skips it"
    step "llama.cpp CUDA build ($NVCC: $("$NVCC" --version | tail -1)) in $LBUILD"
    rm -rf "$LBUILD"
    mkdir -p "$LBUILD/src"
    tar -xJf "$KIT/llama-src.tar.xz" -C "$LBUILD/src"
    cflags=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
            -DGGML_CUDA_FA=OFF -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF "-DCMAKE_CUDA_COMPILER=$NVCC"
            "-DCUDAToolkit_ROOT=$(dirname "$NVCC")/.."
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_KVCOMPRESS=ON
            "-DKVCOMPRESS_INCLUDE_DIR=$ROOT/include" "-DKVCOMPRESS_LIBRARY=$KIT/lib/libkvcompress.so"
            -DKVC_RUN_PATCHED=ON "-DCMAKE_PROJECT_llama.cpp_INCLUDE=$ROOT/tests/llama/kvc-run.cmake")
    # a toolkit without cuBLAS (the GPU image may have it only as PyTorch's pip wheel): use the wheel's
    tk=$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)
    if ! compgen -G "$tk/lib*/libcublas.so*" >/dev/null && ! compgen -G "$tk/targets/*/lib/libcublas.so*" >/dev/null; then
        whl=$(python3 -c 'import nvidia, os; print(next(os.path.join(p, "cu13") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13"))))' 2>/dev/null || true)
        if [ -n "$whl" ] && compgen -G "$whl/lib/libcublas.so*" >/dev/null; then
            echo "cuBLAS not in $tk: using $whl"
            mkdir -p "$LBUILD/cublas"
            for l in cublas cublasLt; do ln -sf "$(ls "$whl"/lib/lib$l.so.* | head -1)" "$LBUILD/cublas/lib$l.so"; done
            cflags+=("-DCUDA_cublas_LIBRARY=$LBUILD/cublas/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$LBUILD/cublas/libcublasLt.so"
                     "-DCMAKE_CUDA_FLAGS=-I$whl/include" "-DCMAKE_CXX_FLAGS=-I$whl/include"
                     "-DCMAKE_BUILD_RPATH=$whl/lib" "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$whl/lib")
        fi
    fi
    cmake -S "$LBUILD/src" -B "$LBUILD/build" "${cflags[@]}" >"$OUTD/llama-configure.log" 2>&1 ||
        { tail -30 "$OUTD/llama-configure.log"; die "cmake configure of the llama.cpp subset failed"; }
    grep -q "CUDA Toolkit found" "$OUTD/llama-configure.log" || die "configure did not find the CUDA toolkit"
    echo "configured ($(grep -m1 'CMAKE_CUDA_ARCHITECTURES=' "$OUTD/llama-configure.log" | sed 's/^-- //'))"
    jobs_n=${GPU_CHECK_JOBS:-$(nproc)}
    if [ "$have_gpu" = 1 ]; then
        (cmake --build "$LBUILD/build" -j "$jobs_n" --target kvc-run >"$OUTD/llama-build.log" 2>&1) &
        build_pid=$!
    elif [ "$BUILD_MODE" = full ]; then
        nice -n 19 cmake --build "$LBUILD/build" -j "$jobs_n" --target kvc-run >"$OUTD/llama-build.log" 2>&1 ||
            { tail -30 "$OUTD/llama-build.log"; die "the llama.cpp CUDA build failed (log: llama-build.log)"; }
        echo "llama.cpp CUDA build of the subset: kvc-run built"
    fi
fi

step "GPU"
if [ "$have_gpu" = 0 ]; then
    echo "gpu-check: SKIPPED: no GPU on this machine (nvidia-smi lists none). The kit is complete$([ "$BUILD_MODE" != 0 ] && echo ' and the llama.cpp subset configures with CUDA'); run it on a GPU machine:"
    echo "  run(command=\"bash scripts/gpu-check.sh\", carry=[\"build/gpu-kit\"], timeout_s=540)"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTD/gpu.txt"
fail=0

step "parity: tests/cuda.rs with KVC_REQUIRE_GPU=1"
KVC_REQUIRE_GPU=1 "$KIT/bin/test-cuda" --test-threads=1 2>&1 | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: parity tests FAILED"; fail=1; }

step "plan time and kernel bandwidth, K in device memory (BENCH_BACKEND=cuda)"
# 3 runs per shape and policy (medians); gvote has no device kernel: its K is gathered on the device and
# scored on the CPU, so it is the slowest row
BENCH_BACKEND=cuda BENCH_RUNS=3 BENCH_OUT=$OUTD/bench-plan-cuda.json BENCH_POLICIES=knorm,snapkv,dbudget,gvote,h2o \
    "$KIT/bin/bench-plan" --bench >/dev/null || { echo "gpu-check: bench FAILED"; fail=1; }

if [ -n "$build_pid" ]; then
    step "waiting for the llama.cpp build"
    if ! wait "$build_pid"; then
        tail -30 "$OUTD/llama-build.log"
        die "the llama.cpp CUDA build failed (log: llama-build.log)"
    fi
    step "end to end: kvc-run -ngl 99, backend=cuda vs backend=cpu"
    export LLAMA_KVCOMPRESS_LIB=$KIT/lib/libkvcompress.so
    python3 - "$LBUILD/build/bin/kvc-run" "$KIT/model.gguf" "$KIT/passkey.txt" "$OUTD/e2e.json" <<'EOF' || fail=1
import json, subprocess, sys
exe, model, prompt, out = sys.argv[1:]
def run(policy, *params):
    args = [exe, "-m", model, "-f", prompt, "-c", "8192", "-n", "12", "-ngl", "99", "--no-warmup", "--kv-policy", policy]
    for p in params:
        args += ["--kv-policy-param", p]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("{")), None)
    if p.returncode != 0 or line is None:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit("kvc-run %s %s failed (rc %d)" % (policy, params, p.returncode))
    return json.loads(line)
res, ok = {"none": run("none")}, True
for pol in ("dbudget", "gvote"):
    c, h = run(pol, "backend=cuda"), run(pol, "backend=cpu")
    res[pol] = {"cuda": c, "cpu": h}
    same = c["answer"] == h["answer"] and c["cells_evicted"] == h["cells_evicted"]
    print("%-8s cuda: evicted %5d held %5d answer %r | cpu: evicted %5d held %5d answer %r -> %s" % (
        pol, c["cells_evicted"], c["cells_held"], c["answer"], h["cells_evicted"], h["cells_held"], h["answer"],
        "same" if same else "DIFFERENT"))
    ok = ok and same and c["cells_evicted"] > 0
print("none     answer %r, %d cells" % (res["none"]["answer"], res["none"]["cells_held"]))
json.dump(res, open(out, "w"), indent=1)
sys.exit(0 if ok else 1)
EOF
fi

step "done"
[ "$fail" = 0 ] && echo "gpu-check: PASSED" || { echo "gpu-check: FAILED"; exit 1; }

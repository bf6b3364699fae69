#!/usr/bin/env bash
# Compile-time check of the CUDA backend, for CI and for machines without a GPU:
#
#   1. installs nvcc from PyPI into a venv under ~/.cache/kvcompress (once; the pip cache lives
#      there too), pinned to CUDA 13.0 so the PTX (ISA 9.0) loads on driver 580 (CUDA 13.0) and
#      newer; the pip resolver must not pull the 13.5 cicc (nvidia-nvvm), which writes PTX 9.5;
#   2. builds with `--features cuda` and KVC_CUDA_REQUIRE=1 (a failed nvcc fails the build);
#   3. asserts the PTX and the sm_80 / sm_90 cubins were produced, that the PTX ISA is at most
#      9.0, that ptxas (same wheel) accepts the PTX for sm_80 and sm_90, that the cubins are CUDA
#      ELF for the right architecture, and that cuobjdump reads them when one is installed;
#   4. checks that `--features cuda` still builds when nvcc is missing;
#   5. runs `cargo test --release --features cuda`: device tests pass when no GPU opens, and
#      this script prints one "SKIPPED" line per such test (from the markers they leave in
#      KVC_SKIP_DIR); when nvidia-smi lists a GPU it sets KVC_REQUIRE_GPU=1, so a device that
#      fails to open fails the tests instead of skipping them.
#
# Environment: KVC_CACHE (default ~/.cache/kvcompress), CARGO_TARGET_DIR (default target).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { echo "== cuda-check [$(($(date +%s) - start))s]: $*"; }

CACHE=${KVC_CACHE:-$HOME/.cache/kvcompress}
VENV=$CACHE/cuda-venv
export PIP_CACHE_DIR=$CACHE/pip
# keep these together: nvcc, cicc (nvvm), crt headers and the runtime headers of one release
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
NV=$VENV/lib/python3*/site-packages/nvidia/cu13

have_pins() {
    [ -x "$VENV/bin/python" ] || return 1
    local frozen
    frozen=$("$VENV/bin/python" -m pip freeze 2>/dev/null) || return 1
    for p in "${PINS[@]}"; do grep -qx "$p" <<<"$frozen" || return 1; done
}

step "nvcc from PyPI (${PINS[*]})"
if ! have_pins; then
    mkdir -p "$CACHE"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
fi
# shellcheck disable=SC2086
NV=$(echo $NV)
NVCC=$NV/bin/nvcc
PTXAS=$NV/bin/ptxas
"$NVCC" --version | tail -1

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

step "cargo build --release --features cuda (nvcc required)"
json=$(mktemp)
trap 'rm -f "$json"' EXIT
KVC_NVCC=$NVCC KVC_CUDA_REQUIRE=1 cargo build --release --features cuda --message-format=json \
    >"$json"
OUT=$(python3 - "$json" <<'EOF'
import json, sys
out = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    pid = m.get("package_id", "")
    if m.get("reason") == "build-script-executed" and (
        "#kvcompress@" in pid or pid.startswith("kvcompress ")
    ):
        out = m["out_dir"]
print(out or "")
EOF
)
[ -n "$OUT" ] && [ -d "$OUT" ] || { echo "no OUT_DIR for kvcompress in cargo's output"; exit 1; }
echo "OUT_DIR=$OUT"

step "PTX and cubins"
fail=0
for cu in cuda/*.cu; do
    stem=$(basename "$cu" .cu)
    ptx=$OUT/$stem.ptx
    [ -s "$ptx" ] || { echo "missing $ptx"; fail=1; continue; }
    ver=$(awk '/^\.version/ {print $2; exit}' "$ptx")
    python3 -c "import sys; sys.exit(0 if tuple(map(int, '$ver'.split('.'))) <= (9, 0) else 1)" ||
        { echo "$stem.ptx: PTX ISA $ver is newer than driver 580 (CUDA 13.0) accepts"; fail=1; }
    for sm in 80 90; do
        "$PTXAS" -arch=sm_$sm -o /dev/null "$ptx" || { echo "ptxas sm_$sm rejects $ptx"; fail=1; }
        cubin=$OUT/$stem.sm_$sm.cubin
        [ -s "$cubin" ] || { echo "missing $cubin"; fail=1; continue; }
        python3 - "$cubin" "$sm" <<'EOF' || fail=1
import struct, sys
path, sm = sys.argv[1], int(sys.argv[2])
b = open(path, "rb").read(64)
machine = struct.unpack_from("<H", b, 18)[0]
flags = struct.unpack_from("<I", b, 48)[0]
# EF_CUDA_SM: bits 8..15 in the current ELF ABI, bits 0..7 in the older one
ok = b[:4] == b"\x7fELF" and machine == 190 and sm in ((flags >> 8) & 0xFF, flags & 0xFF)
print(f"{path.rsplit('/', 1)[-1]}: EM_CUDA={machine == 190} flags={flags:#x} -> {'ok' if ok else 'BAD'}")
sys.exit(0 if ok else 1)
EOF
        if command -v cuobjdump >/dev/null; then
            cuobjdump -elf "$cubin" >/dev/null || { echo "cuobjdump rejects $cubin"; fail=1; }
        fi
    done
    echo "$stem: PTX ISA $ver, ptxas ok for sm_80 and sm_90"
done
command -v cuobjdump >/dev/null || echo "(no cuobjdump installed: cubins checked by ELF header)"
[ "$fail" = 0 ] || { echo "cuda-check: kernel artifacts FAILED"; exit 1; }

step "cargo check --features cuda without nvcc (must build, with a warning)"
log=$(KVC_NVCC=/nonexistent/nvcc cargo check --features cuda --lib 2>&1) ||
    { echo "$log"; echo "cuda-check: --features cuda does not build without nvcc"; exit 1; }
grep -q "will report CudaUnavailable" <<<"$log" ||
    { echo "$log"; echo "cuda-check: expected the no-nvcc warning"; exit 1; }
grep "warning: kvcompress" <<<"$log"

step "cargo test --release --features cuda"
skips=$(mktemp -d)
trap 'rm -f "$json"; rm -rf "$skips"' EXIT
if [ -z "${KVC_REQUIRE_GPU:-}" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep GPU >/dev/null; then
    export KVC_REQUIRE_GPU=1
    echo "nvidia-smi lists a GPU: KVC_REQUIRE_GPU=1 (a device test that cannot open it fails)"
fi
KVC_SKIP_DIR=$skips KVC_NVCC=$NVCC KVC_CUDA_REQUIRE=1 cargo test --release --features cuda
n_skip=0
for f in "$skips"/*; do
    [ -e "$f" ] || continue
    echo "cuda-check: SKIPPED tests/cuda.rs $(basename "$f"): $(cat "$f")"
    n_skip=$((n_skip + 1))
done
[ "$n_skip" = 0 ] || echo "cuda-check: $n_skip device tests SKIPPED (no GPU: only compiled and run to the device check)"

step "done"

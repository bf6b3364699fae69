#!/usr/bin/env bash
# libFuzzer over the whole C API (fuzz/, issue 7), on the stable toolchain: no nightly, no
# cargo-fuzz. The target is instrumented the way cargo-fuzz does it (SanitizerCoverage through
# -Cpasses=sancov-module, --cfg fuzzing, debug assertions and overflow checks on), libFuzzer
# itself comes from the pinned libfuzzer-sys crate (compiled once, cached), and
# AddressSanitizer is switched on with RUSTC_BOOTSTRAP=1 -Zsanitizer=address (the runtime ships
# with every x86_64 Linux toolchain).
#
#   scripts/fuzz.sh build            build the target
#   scripts/fuzz.sh replay [FILES]   run every input in fuzz/regressions/ (or FILES) once
#   scripts/fuzz.sh quick            replay, then fuzz for FUZZ_QUICK_SECONDS (default 100) from
#                                    the committed seeds; fails on any crash (`make fuzz-quick`)
#   scripts/fuzz.sh long             fuzz for FUZZ_SECONDS (default 1800) with the corpus kept
#                                    under the cache; log in fuzz/logs/ (`make fuzz`)
#
# Environment: KVC_CACHE (default ~/.cache/kvcompress), FUZZ_TARGET_DIR (default
# $KVC_CACHE/fuzz/target-<libfuzzer-sys>-<rustc>), FUZZ_SANITIZER (address, the default, or
# none), FUZZ_ARGS (extra libFuzzer flags). A crash leaves its input in fuzz/artifacts/c_api/
# and prints it as hex, so a CI log is enough to reproduce it:
#   xxd -r -p > crash.bin  &&  scripts/fuzz.sh replay crash.bin
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TARGET=c_api
LIBFUZZER_SYS=0.4.13 # keep in step with fuzz/Cargo.toml
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
RUSTC_VER=$(rustc -vV | sed -n 's/^release: //p')
CACHE=${KVC_CACHE:-$HOME/.cache/kvcompress}
SAN=${FUZZ_SANITIZER:-address}
TDIR=${FUZZ_TARGET_DIR:-$CACHE/fuzz/target-libfuzzer-sys-$LIBFUZZER_SYS-rustc-$RUSTC_VER}
BIN=$TDIR/$TRIPLE/release/$TARGET
SEEDS=$ROOT/fuzz/seeds/$TARGET
REGR=$ROOT/fuzz/regressions/$TARGET
ARTIFACTS=$ROOT/fuzz/artifacts/$TARGET
# bounded inputs and memory; a slow input is a bug as well (-timeout)
LF_FLAGS=(-max_len=4096 -timeout=20 -rss_limit_mb=3072 -print_final_stats=1)

start=$(date +%s)
step() { echo "== fuzz [$(($(date +%s) - start))s]: $*"; }

build() {
    grep -q "^libfuzzer-sys = \"=$LIBFUZZER_SYS\"" fuzz/Cargo.toml ||
        { echo "fuzz.sh: LIBFUZZER_SYS=$LIBFUZZER_SYS does not match fuzz/Cargo.toml" >&2; exit 1; }
    local flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
    flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
    flags+=" -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares"
    flags+=" --cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers=yes"
    case $SAN in
        address) flags+=" -Zsanitizer=address"; export RUSTC_BOOTSTRAP=1 ;;
        none) ;;
        *) echo "fuzz.sh: FUZZ_SANITIZER must be address or none" >&2; exit 1 ;;
    esac
    step "build $TARGET (rustc $RUSTC_VER, libfuzzer-sys $LIBFUZZER_SYS, sanitizer $SAN) in $TDIR"
    # --target keeps the instrumentation off build scripts and proc macros; the sanitizer is
    # part of the target dir key so address and none builds never mix
    RUSTFLAGS="$flags" cargo build --release --locked --quiet \
        --manifest-path fuzz/Cargo.toml --target "$TRIPLE" --target-dir "$TDIR-$SAN" --bin "$TARGET"
    BIN=$TDIR-$SAN/$TRIPLE/release/$TARGET
}

# run libFuzzer; on a crash print the input as hex and fail
fuzz_run() {
    mkdir -p "$ARTIFACTS"
    local rc=0
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1} \
        "$BIN" "${LF_FLAGS[@]}" -artifact_prefix="$ARTIFACTS/" ${FUZZ_ARGS:-} "$@" || rc=$?
    if [ $rc -ne 0 ]; then
        echo "!!! fuzz: libFuzzer exited $rc" >&2
        for f in "$ARTIFACTS"/*; do
            [ -f "$f" ] || continue
            echo "--- $f (hex; xxd -r -p to rebuild):" >&2
            xxd -p "$f" >&2 || od -An -tx1 "$f" >&2
        done
        exit $rc
    fi
}

replay() {
    local files=("$@")
    if [ ${#files[@]} -eq 0 ]; then
        shopt -s nullglob
        files=("$REGR"/* "$SEEDS"/*)
        shopt -u nullglob
    fi
    step "replay ${#files[@]} inputs"
    [ ${#files[@]} -eq 0 ] || fuzz_run -runs=1 "${files[@]}"
}

mode=${1:-quick}
[ $# -gt 0 ] && shift
case $mode in
    build) build ;;
    replay) build; replay "$@" ;;
    quick)
        build
        replay
        secs=${FUZZ_QUICK_SECONDS:-100}
        corpus=$(mktemp -d)
        trap 'rm -rf "$corpus"' EXIT
        step "fuzz ${secs}s from the committed seeds"
        fuzz_run -max_total_time="$secs" "$corpus" "$SEEDS" "$REGR"
        step "fuzz-quick passed"
        ;;
    long)
        build
        replay
        secs=${FUZZ_SECONDS:-1800}
        corpus=$CACHE/fuzz/corpus/$TARGET
        mkdir -p "$corpus" fuzz/logs
        log=fuzz/logs/$TARGET-$(date -u +%Y%m%dT%H%M%SZ).log
        # fork mode (one worker: CI machines have 2 cores) goes on past a crash, so one long
        # run collects every distinct crash in fuzz/artifacts/; the run fails at the end if any
        before=$(ls "$ARTIFACTS" 2>/dev/null | wc -l)
        step "fuzz ${secs}s, corpus $corpus, log $log"
        FUZZ_ARGS="-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 ${FUZZ_ARGS:-}" \
            fuzz_run -max_total_time="$secs" "$corpus" "$SEEDS" "$REGR" 2>&1 | tee "$log"
        step "long run done: $(grep -E '^#[0-9]+' "$log" | tail -n1)"
        after=$(ls "$ARTIFACTS" 2>/dev/null | wc -l)
        if [ "$after" -gt "$before" ]; then
            echo "!!! fuzz: $((after - before)) new crash inputs in $ARTIFACTS" >&2
            exit 1
        fi
        ;;
    *) echo "usage: scripts/fuzz.sh build|replay [FILES]|quick|long" >&2; exit 2 ;;
esac

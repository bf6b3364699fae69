#!/usr/bin/env bash
# The patch series applies to the pinned llama.cpp with zero fuzz, and `llama.sh apply` is idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PIN="$(tr -d ' \n' < "$ROOT/patches/LLAMA_CPP_COMMIT")"
PRISTINE="${LLAMA_CPP_DIR:-$HOME/.cache/kvcompress/src/llama.cpp-${PIN:0:9}}"
fail() { echo "FAIL test_patch: $*"; exit 1; }

"$ROOT/scripts/llama.sh" src >/dev/null 2>&1 || fail "scripts/llama.sh src failed"
[[ -d "$PRISTINE/.git" ]] || fail "no pristine tree at $PRISTINE"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git clone -q "$PRISTINE" "$tmp/llama.cpp"
n=0
for p in "$ROOT"/patches/*.patch; do
    # git apply refuses any context mismatch (no fuzz); --check first, then apply for the next patch
    git -C "$tmp/llama.cpp" apply --check "$p" 2>"$tmp/err" || { cat "$tmp/err"; fail "$(basename "$p") does not apply with zero fuzz"; }
    git -C "$tmp/llama.cpp" apply "$p"
    echo "  ok  : $(basename "$p") applies with zero fuzz"
    n=$((n + 1))
done
[[ $n -gt 0 ]] || fail "no patches in patches/"
# GNU patch with --fuzz=0 agrees (what LocalAI checks)
if command -v patch >/dev/null; then
    git clone -q "$PRISTINE" "$tmp/llama.cpp-p"
    for p in "$ROOT"/patches/*.patch; do
        patch -d "$tmp/llama.cpp-p" -p1 --fuzz=0 --quiet < "$p" || fail "$(basename "$p"): patch --fuzz=0 failed"
    done
    echo "  ok  : patch -p1 --fuzz=0 agrees"
fi
# a second apply of an up-to-date tree does nothing
out="$("$ROOT/scripts/llama.sh" apply 2>&1)" || fail "llama.sh apply failed: $out"
echo "$out" | grep "already applied" >/dev/null || echo "  note: llama.sh apply re-applied the series"
echo "PASS test_patch"

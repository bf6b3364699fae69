#!/usr/bin/env bash
# The main job, end to end: build the library and the patched llama.cpp, fetch SmolLM2-135M, and
# run a ~4K-token passkey retrieval with the full cache and with adaptive policies. Prints what
# each run kept and whether the answer is the full cache's.
#
#   bash scripts/demo.sh            (make demo)
#   DEMO_TOKENS=2048 DEMO_THREADS=1 bash scripts/demo.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOKENS="${DEMO_TOKENS:-4096}"
THREADS="${DEMO_THREADS:-2}"
DEPTH="${DEMO_DEPTH:-0.5}"
OUT="${DEMO_OUT:-$ROOT/build/demo}"
mkdir -p "$OUT"

cargo build --release --quiet
bash scripts/llama.sh all >&2
MODEL="$(bash scripts/llama.sh model)"
RUN="$ROOT/build/llama/bin/kvc-run"

python3 eval/tasks.py passkey --tokens "$TOKENS" --depth "$DEPTH" --seed 7 --prompt-out "$OUT/prompt.txt" > "$OUT/task.json"
EXPECTED="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["answer"])' "$OUT/task.json")"

run() { # label ctx policy [params...]
    local label="$1" ctx="$2" policy="$3"; shift 3
    local extra=()
    for p in "$@"; do extra+=(--kv-policy-param "$p"); done
    "$RUN" -m "$MODEL" -f "$OUT/prompt.txt" -n 8 -t "$THREADS" -c "$ctx" --kv-policy "$policy" "${extra[@]}" \
        2> "$OUT/$label.log" | tail -n 1 > "$OUT/$label.json" || { echo "demo: run '$label' failed, see $OUT/$label.log" >&2; exit 1; }
}

echo "demo: passkey at depth $DEPTH in ~$TOKENS tokens of filler; expected answer $EXPECTED" >&2
run full      8192 none
HALF=$(python3 -c 'import json,sys; print(max(512, json.load(open(sys.argv[1]))["n_prompt"] // 2))' "$OUT/full.json")
run dbudget-half "$HALF" dbudget
run gvote-half   "$HALF" gvote
run dbudget      8192 dbudget
run gvote        8192 gvote

python3 - "$OUT" "$EXPECTED" "$HALF" <<'PY'
import json, sys
out, expected, half = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [("full", "full cache, -c 8192"), ("dbudget-half", f"dbudget, -c {half}"), ("gvote-half", f"gvote, -c {half}"),
        ("dbudget", "dbudget, -c 8192 (budget emerges)"), ("gvote", "gvote, -c 8192 (budget emerges)")]
res = {k: json.load(open(f"{out}/{k}.json")) for k, _ in rows}
full = res["full"]
first = lambda a: a.strip().split()[0].strip(".,") if a.strip() else ""
print(f"\nSmolLM2-135M-Instruct Q4_1, prompt {full['n_prompt']} tokens, expected pass key {expected}\n")
print(f"| run | answer | correct | same as full | cells held | KV held | prefill |")
print(f"|---|---|---|---|---|---|---|")
for k, label in rows:
    r = res[k]
    ans = r["answer"].strip().replace("\n", " ")[:24]
    ok = "yes" if expected in r["answer"] else "no"
    same = "yes" if first(r["answer"]) == first(full["answer"]) else "no"
    held = r["cells_held"]
    print(f"| {label} | {ans} | {ok} | {same} | {held} ({100*held/max(1,full['cells_held']):.0f}%) "
          f"| {r['kv_bytes_held']/2**20:.1f} MiB | {r['prefill_ms']/1000:.1f} s |")
PY

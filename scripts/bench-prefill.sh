#!/usr/bin/env bash
# Prefill and decode time of the patched llama.cpp with each policy against `none`, on the same
# prompt, runs interleaved (none, p1, p2, none, p1, p2, ...) so machine drift hits every policy
# alike. Writes results/bench-prefill.json; ratios are policy / none of the medians, per length.
#
#   bash scripts/bench-prefill.sh                         # 2K, 4K, 8K tokens, every policy below, 3 reps
#   TOKENS="4096" REPS=5 POLICIES="snapkv dbudget:ranker=context,threshold=0.02" THREADS=2 bash scripts/bench-prefill.sh
# A policy is NAME or NAME:k=v,k=v (its --kv-policy-param values; the pair is its label in the JSON).
# BENCH_OUT=path writes the JSON there instead of results/bench-prefill.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOKENS="${TOKENS:-2048 4096 8192}"
REPS="${REPS:-3}"
THREADS="${THREADS:-2}"
# the question-agnostic rankers' prefill cost is the point (issue 16): ranker=context reads every
# query row of the prompt; ranker=recon runs a reconstruction pass after it (all of the context, or
# the quarter recon=0.25 reconstructs)
POLICIES="${POLICIES:-dbudget gvote dbudget:ranker=context dbudget:ranker=recon dbudget:ranker=recon,recon=0.25}"
BENCH_OUT="${BENCH_OUT:-results/bench-prefill.json}"
OUT="$ROOT/build/bench"
mkdir -p "$OUT" results
MODEL="$(bash scripts/llama.sh model)"
RUN="${KVC_LLAMA_BIN:-$ROOT/build/llama/bin}/kvc-run"
[ -x "$RUN" ] || { echo "bench-prefill: $RUN missing: run 'make llama' first" >&2; exit 1; }
: > "$OUT/runs.jsonl"
for n in $TOKENS; do
    python3 eval/tasks.py passkey --tokens "$n" --depth 0.5 --seed 3 --prompt-out "$OUT/prompt-$n.txt" > /dev/null
    CTX=$(( n * 5 / 4 + 512 ))
    for rep in $(seq 1 "$REPS"); do
        for pol in none $POLICIES; do
            name="${pol%%:*}"
            args=(--kv-policy "$name")
            if [ "$name" != "$pol" ]; then
                IFS=, read -ra kvs <<< "${pol#*:}"
                for kv in "${kvs[@]}"; do args+=(--kv-policy-param "$kv"); done
            fi
            # -b 512 as in eval/run.py: the hook leaves room for a batch like the last one under the cap
            "$RUN" -m "$MODEL" -f "$OUT/prompt-$n.txt" -n 32 -t "$THREADS" -c "$CTX" -b 512 -ub 512 "${args[@]}" \
                2> "$OUT/$name.log" | tail -n 1 | python3 -c 'import json,sys; d=json.load(sys.stdin); d["rep"]=int(sys.argv[1]); d["tokens"]=int(sys.argv[2]); d["policy"]=sys.argv[3]; print(json.dumps(d))' "$rep" "$n" "$pol" >> "$OUT/runs.jsonl"
            echo "bench-prefill: $n tokens, rep $rep, $pol done" >&2
        done
    done
done
python3 - "$OUT/runs.jsonl" "$THREADS" "$BENCH_OUT" <<'PY'
import json, statistics, sys, platform, os
runs = [json.loads(l) for l in open(sys.argv[1])]
med = lambda rs, k: statistics.median(x[k] for x in rs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out = {"model": "SmolLM2-135M-Instruct Q4_1", "llama_cpp": "0c1e57098", "cache_type": "f16",
       "threads": int(sys.argv[2]), "machine": f"{os.cpu_count()} x {cpu}", "load_avg_end": os.getloadavg(),
       "note": "runs interleaved none/policy per rep; ratios = median(policy) / median(none) at the same length",
       "lengths": {}}
for n in sorted({r["tokens"] for r in runs}):
    by = {}
    for r in runs:
        if r["tokens"] == n:
            by.setdefault(r["policy"], []).append(r)
    base = by["none"]
    entry = {"n_prompt": base[0]["n_prompt"], "reps": len(base), "policies": {}}
    for pol, rs in by.items():
        decode_tok_s = statistics.median(x["n_decoded"] / (x["decode_ms"] / 1e3) for x in rs if x["decode_ms"] > 0)
        entry["policies"][pol] = {
            "prefill_ms_median": med(rs, "prefill_ms"), "decode_ms_median": med(rs, "decode_ms"),
            "decode_tok_s_median": decode_tok_s,
            "prefill_ratio_vs_none": med(rs, "prefill_ms") / med(base, "prefill_ms"),
            "decode_ratio_vs_none": med(rs, "decode_ms") / med(base, "decode_ms"),
            "cells_held": rs[-1]["cells_held"], "answer": rs[-1]["answer"],
        }
    out["lengths"][str(n)] = entry
json.dump(out, open(sys.argv[3], "w"), indent=1)
print(json.dumps(out, indent=1))
PY

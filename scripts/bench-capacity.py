#!/usr/bin/env python3
"""What a bounded cache holds with each policy (issue 4 benchmarks), through kvc-run on SmolLM2.

1. longest passkey prompt that still retrieves the key with `-c 2048` (the prompt only fits because
   the policy evicts after every -b chunk): lengths 2K, 4K, 8K tokens (SmolLM2's trained
   context is 8K), passkey at depth 0.5; a policy's ladder stops at its first miss. The full cache
   (`none`, -c sized to the prompt) is run at every length as the reference: a length where the
   full cache itself misses is reported, not counted against a policy.
2. decode tokens/s at depth with a cache sized to the budget: a 4K passkey prompt; `none` with a
   cache that holds it, each policy with `-c` = the cells it held after the same prompt with a
   large cache (its emergent budget) + 256; 128 decoded tokens, ratio to `none`.

Writes results/bench-capacity.json. Timings are single runs (the decode ratio is the number to
read; the bench-prefill.sh medians are the overhead figures).

DECODE=1: only the decode-speed measure, done properly (issue 17): a passkey prompt of DEPTH_TOKENS
(8192 target) tokens, the tools' default -b/-ub; each policy (POLICIES entries are NAME or
NAME:k=v,k=v) is first probed once with a cache that holds the whole prompt to learn its emergent
budget, then REPS (3) repetitions, each running `none` (a cache that holds everything) and every
policy (`-c` = its probed cells + 256) one after the other, so slow and quiet moments hit all of them
alike; per-run decode tok/s, answers and the load average before each run are kept. Reported: median
tok/s per setting, the ratio of medians and the median of per-repetition ratios against `none`,
whether every answer equals `none`'s. MODEL_NAME=gemma3 runs gemma-3-270m. Writes
results/bench-decode[-gemma3].json.

  python3 scripts/bench-capacity.py                       # dbudget gvote snapkv streaming, -t 1
  POLICIES="dbudget" LENGTHS="2048 4096" python3 scripts/bench-capacity.py
  DECODE=1 POLICIES="dbudget dbudget:ranker=context" python3 scripts/bench-capacity.py
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "eval"))
import tasks  # noqa: E402

BIN = os.environ.get("KVC_LLAMA_BIN", os.path.join(ROOT, "build", "llama", "bin"))
THREADS = os.environ.get("THREADS", "1")
POLICIES = os.environ.get("POLICIES", "dbudget gvote snapkv streaming").split()
LENGTHS = [int(x) for x in os.environ.get("LENGTHS", "2048 4096 8192").split()]
BOUNDED_CTX = int(os.environ.get("BOUNDED_CTX", "2048"))
OUT = os.path.join(ROOT, "build", "bench")


MODEL_NAME = os.environ.get("MODEL_NAME", "smollm2")
if MODEL_NAME not in ("smollm2", "gemma3"):
    sys.exit(f"bench-capacity: MODEL_NAME={MODEL_NAME}: smollm2 or gemma3")


def model():
    which = [] if MODEL_NAME == "smollm2" else [MODEL_NAME]
    return subprocess.run(["bash", os.path.join(ROOT, "scripts/llama.sh"), "model"] + which, capture_output=True,
                          text=True, check=True).stdout.strip()


def prompt_file(n, seed=3):
    inst = tasks.make("passkey", n, 0.5, seed)
    path = os.path.join(OUT, f"capacity-{n}.txt")
    with open(path, "w") as f:
        f.write(inst["context"] + inst["question"])
    return path, inst["answer"]


def kvc_run(path, ctx, policy, n_predict, batch=256):
    """policy: NAME or NAME:k=v,k=v; batch None: the tool's default -b/-ub"""
    name, _, params = policy.partition(":")
    cmd = [os.path.join(BIN, "kvc-run"), "-m", MODEL, "-f", path, "-t", THREADS, "--no-warmup", "-c", str(ctx),
           "-n", str(n_predict), "--kv-policy", name]
    if batch is not None:
        cmd += ["-b", str(batch)]
    for kv in filter(None, params.split(",")):
        cmd += ["--kv-policy-param", kv]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["rc %d" % p.returncode])[-1]}
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def longest_passkey():
    out = {"ctx": BOUNDED_CTX, "lengths": LENGTHS, "reference": {}, "policies": {}}
    refs = {}
    for n in LENGTHS:
        path, answer = prompt_file(n)
        r = kvc_run(path, n * 5 // 4 + 512, "none", 10, batch=512)
        refs[n] = (path, answer, tasks.correct(r.get("answer", ""), answer))
        out["reference"][n] = {"n_prompt": r.get("n_prompt"), "answer": r.get("answer"), "correct": refs[n][2]}
        print(f"capacity: full cache at {n}: {r.get('answer')!r} (correct {refs[n][2]})", flush=True)
    for pol in POLICIES:
        rows, longest = [], 0
        for n in LENGTHS:
            path, answer, ref_ok = refs[n]
            r = kvc_run(path, BOUNDED_CTX, pol, 10)
            ok = "error" not in r and tasks.correct(r["answer"], answer)
            rows.append({"tokens": n, "n_prompt": r.get("n_prompt"), "answer": r.get("answer"), "correct": ok,
                         "error": r.get("error"), "cells_held": r.get("cells_held"),
                         "cells_evicted": r.get("cells_evicted"), "reference_correct": ref_ok})
            print(f"capacity: {pol} -c {BOUNDED_CTX} at {n}: {r.get('answer', r.get('error'))!r} ok={ok}", flush=True)
            if not ok:
                break
            longest = r["n_prompt"]
        out["policies"][pol] = {"longest_prompt_with_passkey": longest, "runs": rows}
    return out


def decode_at_depth(n=4096, n_predict=128):
    path, answer = prompt_file(n)
    big = n * 5 // 4 + 512
    base = kvc_run(path, big, "none", n_predict, batch=512)
    out = {"tokens": n, "n_predict": n_predict, "none": {"ctx": big, **pick(base)}, "policies": {}}
    for pol in POLICIES:
        if pol in ("streaming", "snapkv", "h2o", "tova", "knorm", "pyramidkv", "dynamickv", "adakv"):
            continue  # fixed ratio: its budget is not emergent
        probe = kvc_run(path, big, pol, 1, batch=512)
        if "error" in probe:
            out["policies"][pol] = {"error": probe["error"]}
            continue
        ctx = probe["cells_held"] + 256
        r = kvc_run(path, ctx, pol, n_predict)
        row = {"emergent_cells": probe["cells_held"], "ctx": ctx, **pick(r)}
        if "error" not in r and "error" not in base:
            row["decode_tok_s_ratio_vs_none"] = row["decode_tok_s"] / out["none"]["decode_tok_s"]
            row["same_answer_as_none"] = r["answer"] == base["answer"]
        out["policies"][pol] = row
        print(f"capacity: decode {pol} -c {ctx}: {row.get('decode_tok_s', 0):.1f} tok/s", flush=True)
    return out


def pick(r):
    if "error" in r:
        return {"error": r["error"]}
    return {"answer": r["answer"], "cells_held": r["cells_held"], "decode_ms": r["decode_ms"],
            "decode_tok_s": r["n_decoded"] / (r["decode_ms"] / 1e3) if r["decode_ms"] > 0 else None,
            "kv_bytes_held": r["kv_bytes_held"]}


def median(xs):
    """statistics.median of the runs that gave a number (a failed run gives None)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def decode_interleaved(n, reps, n_predict=128):
    path, key = prompt_file(n)
    big = n * 5 // 4 + 512
    settings = {"none": big}
    probes = {}
    for pol in POLICIES:
        probe = kvc_run(path, big, pol, 1, batch=None)
        probes[pol] = {k: probe.get(k) for k in ("cells_held", "cells_evicted", "n_prompt", "error")}
        print(f"decode: probe {pol}: {probes[pol]}", flush=True)
        if "error" not in probe:
            settings[pol] = probe["cells_held"] + 256
    runs = []
    for rep in range(reps):
        for pol, ctx in settings.items():
            load = os.getloadavg()[0]
            r = kvc_run(path, ctx, pol, n_predict, batch=None)
            row = {"rep": rep, "policy": pol, "ctx": ctx, "load_avg_1m_before": load, **pick(r)}
            runs.append(row)
            print(f"decode: rep {rep} {pol} -c {ctx}: {row.get('decode_tok_s') or row.get('error')} tok/s "
                  f"(load {load:.1f})", flush=True)
    base = [r for r in runs if r["policy"] == "none"]
    summary = {}
    for pol in settings:
        mine = [r for r in runs if r["policy"] == pol]
        per_rep = [m["decode_tok_s"] / b["decode_tok_s"] for m, b in zip(mine, base)
                   if m.get("decode_tok_s") and b.get("decode_tok_s")]
        med = median([r.get("decode_tok_s") for r in mine])
        summary[pol] = {"ctx": settings[pol], "cells_held": median([r.get("cells_held") for r in mine]),
                        "decode_tok_s_median": med,
                        "ratio_of_medians_vs_none": med / summary["none"]["decode_tok_s_median"]
                        if pol != "none" and med and summary["none"]["decode_tok_s_median"] else None,
                        "median_per_rep_ratio_vs_none": median(per_rep) if pol != "none" else None,
                        "answers_equal_none": all(r.get("answer") == b.get("answer") for r, b in zip(mine, base)),
                        "answer_has_key": all(str(key) in (r.get("answer") or "") for r in mine)}
    return {"tokens_target": n, "n_predict": n_predict, "reps": reps, "key": key, "probes": probes,
            "summary": summary, "runs": runs}


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    MODEL = model()
    t0 = time.time()
    res = {"model": "SmolLM2-135M-Instruct Q4_1" if MODEL_NAME == "smollm2" else "gemma-3-270m Q4_K_M",
           "llama_cpp": "0c1e57098", "cache_type": "f16",
           "threads": int(THREADS), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if os.environ.get("DECODE", "0") not in ("", "0"):
        res["command"] = " ".join(f"{k}={os.environ[k]}" for k in ("DECODE", "POLICIES", "DEPTH_TOKENS", "REPS",
                                                                  "MODEL_NAME", "THREADS") if k in os.environ) \
            + " python3 scripts/bench-capacity.py"
        res["load_avg_start"] = os.getloadavg()
        res["decode_at_depth"] = decode_interleaved(int(os.environ.get("DEPTH_TOKENS", "8192")),
                                                    int(os.environ.get("REPS", "3")))
        res["wall_s"] = round(time.time() - t0)
        res["load_avg_end"] = os.getloadavg()
        name = "bench-decode.json" if MODEL_NAME == "smollm2" else f"bench-decode-{MODEL_NAME}.json"
        with open(os.environ.get("OUT_JSON") or os.path.join(ROOT, "results", name), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res["decode_at_depth"]["summary"], indent=1))
        sys.exit(0)
    res["longest_passkey"] = longest_passkey()
    res["decode_at_depth"] = decode_at_depth()
    res["wall_s"] = round(time.time() - t0)
    res["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "bench-capacity.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))

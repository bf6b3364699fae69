#!/usr/bin/env python3
"""How many parallel passkey requests fit in one `-c 8192` cache with retrieval intact, per policy
(issue 4 benchmarks), through llama-server on SmolLM2.

What is measured, for each policy and N on a ladder (since issue 17: a mixed set of passkeys and needles
in prose at 2K and 4K tokens (MIX), the server's default -b/-ub, every answer compared with a fresh
full-cache server's on the same prompt, and policies with parameters such as dbudget:evict=pressure;
the paragraphs below describe the earlier passkey-only setup, MIX="passkey:2048" BATCH=512 UBATCH=512):

- one llama-server with ONE unified KV cache of CTX (8192) cells shared by all slots
  (`-c 8192 -kvu -np N`, `--kv-policy POLICY` at its defaults, `-b 512 -ub 512`, `--cache-ram 0`,
  `-t THREADS` = 1: on the shared 2-core machine -t 2 stalled), started fresh for every (policy, N);
- N passkey prompts from eval/tasks.py (TOKENS = 2048 target: 2012 tokens, 2011 without the last
  word; depth 0.5; seeds 1..N, so N different keys, the filler is the same), greedy.
- MODE=resident (the default): are N compressed sequences resident in the cache together, each
  still answering? Phase 1: N /completion requests sent at the same moment (threads behind a
  barrier), request i pinned to slot i (`id_slot`), prompt = context + question without its last
  word (" is"), `n_predict: 0`, `cache_prompt: true`: every prompt is prefilled, compressed by the
  policy at its end, and stays in the cache (idle slot). Phase 2, once all of phase 1 returned:
  the N full prompts at once, same slots; each slot reuses its resident compressed prefix
  (`timings.cache_n` must equal the phase-1 prompt: a re-processed prefix is a failure), decodes
  the last word and generates ANSWER_TOKENS (10) tokens. So the answer of every request is
  produced while all N sequences hold their cells in the shared cache.
- MODE=concurrent: the whole prompts at once, each generating n_predict = ceil(N * TOKENS / -b) +
  ANSWER_TOKENS tokens (`ignore_eos`), so that no slot is idle before every prompt is prefilled;
  the passkey must be in the first ANSWER_TOKENS generated tokens (`return_tokens` +
  /detokenize). Here a request usually answers before the later prompts arrive, and the cells
  of the requests still generating are what the hook takes for the later prompts (see below).
- How the server schedules it: it takes the first request as it arrives and the others after its
  first decode call (~1-4 s later); it fills each -b batch slot by slot (decode tokens of the slots
  already generating first, then prompt tokens in slot order), so prompts are prefilled
  interleaved at batch granularity, not token by token. The policy hook runs after every decode
  call for the sequences in that call: at each prompt's end, and whenever a sequence holds more
  cells than the free cells of the shared cache leave it after reserving room for a batch like
  the last one (then it evicts down to that cap, whatever its budget; a sequence not in the call
  is never touched). With `none` a full cache makes llama_decode fail; the server halves the
  batch down to 1, then fails every running request with "Context size has been exceeded."
  (abort_all_slots; the server itself keeps serving).
- ok: for every request HTTP 200 and the passkey in the answer; and the server log shows no
  "Context size has been exceeded", no slot purge (the server frees an idle slot's cells when
  the cache is full: a purged sequence was not resident) and no kv-policy failure. Ladder NS,
  stopping at the first failing N; with BISECT=1 the N between the last pass and the first failure
  are then searched (binary search). A policy stops starting new N after POLICY_BUDGET_S.
- cells held per sequence: `timings.kv_policy.cells_held` of each response (resident mode: after
  its own prefill in phase 1, and at its answer in phase 2 = the prefix + 1 + 10 tokens, all N
  resident; their sum is what the N sequences hold together); /metrics gives the evicted total.

Writes results/bench-parallel.json (BENCH_QUICK=1: a smoke run, 512-token prompts in a
-c 2048 cache, none + snapkv, N = 2 4 6, written to build/bench/bench-parallel-quick.json;
MODE=concurrent writes results/bench-parallel-concurrent.json).
Server logs: build/bench/parallel-POLICY-N.log. Single runs; the wall time of each N is there
to size the benchmark, not a speed figure (the machine is shared).

  python3 scripts/bench-parallel.py                       # none dbudget gvote snapkv streaming
  POLICIES="dbudget" NS="4 6 8" BISECT=0 python3 scripts/bench-parallel.py
  POLICIES="snapkv" NS="16" OUT_JSON=build/bench/probe.json python3 scripts/bench-parallel.py  # one N, elsewhere
  KVC_LLAMA_BIN=/path/bin LLAMA_KVCOMPRESS_LIB=/path/libkvcompress.so python3 scripts/bench-parallel.py
  BENCH_QUICK=1 python3 scripts/bench-parallel.py         # smoke run, ~1-2 min

Other knobs: THREADS (1), CTX (8192), TOKENS (2048), DEPTH (0.5), BATCH/UBATCH (512), ANSWER_TOKENS (10),
POLICY_BUDGET_S (720: no new N for a policy after this long), REQUEST_TIMEOUT (1200 s), MODE (resident),
REUSE_REFERENCES (0; 1: the full-cache answers of an earlier run on the same prompts).
The full default run took 29 min here (none, dbudget, gvote, snapkv, streaming; 28 servers).
"""
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
import urllib.error

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "eval"))
sys.path.insert(0, os.path.join(ROOT, "tests", "llama"))
import kvc_common as k  # noqa: E402
import tasks  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")
BIN = os.environ.get("KVC_LLAMA_BIN", os.path.join(ROOT, "build", "llama", "bin"))
# -t 1: on this shared 2-core machine -t 2 stalled (ggml's spinning threadpool against the other jobs:
# 3.2 s per decode step at N=4 of the concurrent smoke run, which took 50 s against 14 s with -t 1)
THREADS = os.environ.get("THREADS", "1")
# a policy is NAME or NAME:k=v,k=v (--kv-policy-param), e.g. dbudget:evict=pressure
POLICIES = os.environ.get("POLICIES", "none snapkv" if QUICK else
                          "none dbudget dbudget:evict=pressure gvote snapkv streaming").split()
NS = [int(x) for x in os.environ.get("NS", "2 4 6" if QUICK else "1 2 3 4 6 8 10 12 16").split()]
CTX = int(os.environ.get("CTX", "2048" if QUICK else "8192"))
TOKENS = int(os.environ.get("TOKENS", "512" if QUICK else "2048"))
# the instances, cycled over the seeds: TASK:TOKENS items (eval/tasks.py names). The default mixes passkeys and
# needles in prose at 2K and 4K; MIX="passkey:2048" is the passkey-only set of the earlier results
MIX = [(t.split(":")[0], int(t.split(":")[1]) if ":" in t else TOKENS) for t in os.environ.get(
    "MIX", "passkey:%d needle-single:%d" % (TOKENS, TOKENS) if QUICK else
    "passkey:2048 needle-single:2048 passkey:4096 needle-single:4096").split()]
DEPTH = float(os.environ.get("DEPTH", "0.5"))
# empty (the default): the server's own -b/-ub (a smaller -b hides how a default batch meets long prompts)
BATCH = os.environ.get("BATCH", "")
UBATCH = os.environ.get("UBATCH", "")
ANSWER_TOKENS = int(os.environ.get("ANSWER_TOKENS", "10"))
BISECT = os.environ.get("BISECT", "1") not in ("", "0")
MODE = os.environ.get("MODE", "resident")
if MODE not in ("resident", "concurrent"):
    sys.exit(f"bench-parallel: MODE={MODE}: resident or concurrent")
TIMEOUT = int(os.environ.get("REQUEST_TIMEOUT", "1200"))
# a policy whose runs have taken this long starts no further N (recorded as stopped_by_time_budget)
POLICY_BUDGET_S = float(os.environ.get("POLICY_BUDGET_S", "720"))
# REUSE_REFERENCES=1: take the full-cache answers from build/bench/parallel-references.json (written by every run)
# when it holds every prompt of this run
REUSE_REFERENCES = os.environ.get("REUSE_REFERENCES", "0") not in ("", "0")
OUT = os.path.join(ROOT, "build", "bench")
RESULT = os.environ.get("OUT_JSON") or (os.path.join(OUT, "bench-parallel-quick.json") if QUICK else os.path.join(
    ROOT, "results", "bench-parallel.json" if MODE == "resident" else "bench-parallel-concurrent.json"))

# server log lines that mean a run did not fit or failed
LOG_FAILURES = {
    "context_exceeded": re.compile(r"Context size has been exceeded"),
    "slot_purged": re.compile(r"purging slot \d+"),
    "kv_policy_failed": re.compile(r"kv-policy: seq \d+: policy .* failed|the policy failed for seq_id"),
    "compute_error": re.compile(r"Compute error|Invalid input batch"),
}
RETRY = re.compile(r"failed to find free space in the KV cache")


def model():
    return subprocess.run(["bash", os.path.join(ROOT, "scripts/llama.sh"), "model"], capture_output=True,
                          text=True, check=True).stdout.strip()


def http(url, body=None, timeout=TIMEOUT):
    try:
        return k.http_json(url, body, timeout)
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        return None, str(e)


def instances(n):
    out = []
    for seed in range(1, n + 1):
        task, tokens = MIX[(seed - 1) % len(MIX)]
        inst = tasks.make(task, tokens, DEPTH, seed)
        prompt = inst["context"] + inst["question"]
        assert prompt.endswith(" is"), "the resident mode splits off the question's last word"
        out.append({"seed": seed, "task": task, "tokens": tokens, "prompt": prompt, "head": prompt[:-len(" is")],
                    "answer": inst["answer"]})
    return out


def policy_args(policy):
    name, _, params = policy.partition(":")
    return ["--kv-policy", name] + (["--kv-policy-param", params] if params else [])


def batch_args():
    return (["-b", BATCH] if BATCH else []) + (["-ub", UBATCH] if UBATCH else [])


def reference_answers(insts):
    """Each instance alone on a fresh full-cache server (no policy, one slot, a cache that holds it): the answer
    every policy's answer is compared with."""
    saved = os.path.join(OUT, "parallel-references.json")
    if REUSE_REFERENCES and os.path.exists(saved):
        # the answers of an earlier run on the same prompts (checked by hash), so a re-run of a few policies does
        # not prefill every instance again; the JSON records that they were reused
        by_hash = {r["prompt_sha256"]: r["answer"] for r in json.load(open(saved))}
        if all(sha256(x["prompt"]) in by_hash for x in insts):
            for x in insts:
                x["full_cache_answer"] = by_hash[sha256(x["prompt"])]
            print(f"parallel: full-cache answers reused from {os.path.relpath(saved, ROOT)}", flush=True)
            return True
    ctx = max(x["tokens"] for x in insts) * 2 + 512
    log_path = os.path.join(OUT, "parallel-reference.log")
    srv, log, url, _ = start_server("none", 1, log_path, ctx=ctx, kvu=False)
    try:
        for x in insts:
            st, resp = http(url + "/completion", {"prompt": x["prompt"], "n_predict": ANSWER_TOKENS, "temperature": 0,
                                                  "cache_prompt": False})
            x["full_cache_answer"] = resp.get("content") if st == 200 and isinstance(resp, dict) else None
            print(f"parallel: full cache, seed {x['seed']} ({x['task']} {x['tokens']}): {x['full_cache_answer']!r}", flush=True)
    finally:
        stop_server(srv, log)
    with open(saved, "w") as f:
        json.dump([{"prompt_sha256": sha256(x["prompt"]), "seed": x["seed"], "answer": x["full_cache_answer"]}
                   for x in insts if x["full_cache_answer"] is not None], f, indent=1)
    return False


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def start_server(policy, n, log_path, ctx=CTX, kvu=True):
    port = k.free_port()
    cmd = ([os.path.join(BIN, "llama-server"), "-m", MODEL, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(ctx)] + (["-kvu"] if kvu else []) + ["-np", str(n), "-t", THREADS] + batch_args()
           + ["--cache-ram", "0", "--metrics", "--no-warmup"] + policy_args(policy))
    log = open(log_path, "w")
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 180:
        st, _ = http(url + "/health", timeout=5)
        if st == 200:
            return srv, log, url, cmd
        if srv.poll() is not None:
            break
        time.sleep(0.5)
    stop_server(srv, log)
    raise RuntimeError(f"llama-server did not start ({' '.join(cmd)}); log: {log_path}")


def stop_server(srv, log):
    k.stop_process(srv, timeout=30)
    log.close()


def concurrent(url, bodies):
    """POST every body to /completion at the same moment (threads behind a barrier): [(status, json, s)]."""
    results = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def worker(i):
        barrier.wait()
        t = time.time()
        st, resp = http(url + "/completion", bodies[i])
        results[i] = (st, resp, time.time() - t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def error_of(st, resp):
    if st == 200 and isinstance(resp, dict):
        return None
    msg = resp.get("error", {}).get("message") if isinstance(resp, dict) else resp
    return f"HTTP {st}: {str(msg)[:300]}"


def run_n(policy, n, insts, n_prompt_est):
    """One server, n concurrent requests (MODE); returns the row for this N."""
    log_path = os.path.join(OUT, f"parallel-{policy.replace(':', '-').replace(',', '-')}-{n}.log")
    srv, log, url, cmd = start_server(policy, n, log_path)
    reqs = [{"seed": x["seed"], "task": x["task"], "tokens": x["tokens"], "key": x["answer"],
             "full_cache_answer": x.get("full_cache_answer"), "slot": i} for i, x in enumerate(insts[:n])]
    t0 = time.time()
    try:
        if MODE == "resident":
            n_predict = ANSWER_TOKENS
            # phase 1: every context + question up to its last word, prefilled at once, nothing generated
            res1 = concurrent(url, [{"prompt": x["head"], "n_predict": 0, "temperature": 0, "cache_prompt": True,
                                     "id_slot": i} for i, x in enumerate(insts[:n])])
            for r, (st, resp, dt) in zip(reqs, res1):
                kv = resp.get("timings", {}).get("kv_policy", {}) if isinstance(resp, dict) else {}
                r.update(prefill_error=error_of(st, resp), prefill_wall_s=round(dt, 1),
                         n_prompt=resp.get("timings", {}).get("prompt_n") if isinstance(resp, dict) else None,
                         cells_held_after_prefill=kv.get("cells_held"),
                         cells_evicted_in_prefill=kv.get("cells_evicted"))
            # phase 2: the last word of every prompt, at once; each slot reuses its resident compressed prefix
            res2 = concurrent(url, [{"prompt": x["prompt"], "n_predict": ANSWER_TOKENS, "temperature": 0,
                                     "cache_prompt": True, "id_slot": i} for i, x in enumerate(insts[:n])])
            for r, (st, resp, dt) in zip(reqs, res2):
                err = r["prefill_error"] or error_of(st, resp)
                if err:
                    r.update(ok=False, error=err)
                    continue
                tim = resp.get("timings", {})
                kv = tim.get("kv_policy") or {}
                reused = tim.get("cache_n")
                r.update(answer=resp.get("content", ""), answer_wall_s=round(dt, 1), prefix_reused=reused,
                         n_prompt_answer=tim.get("prompt_n"), n_predicted=tim.get("predicted_n"),
                         cells_held=kv.get("cells_held"), cells_evicted_in_answer=kv.get("cells_evicted"),
                         kv_policy=kv.get("name"))
                r["correct"] = tasks.correct(r["answer"], r["key"])
                r["same_as_full_cache"] = r["answer"] == r["full_cache_answer"]
                r["ok"] = r["same_as_full_cache"] and reused == r["n_prompt"]
                if reused != r["n_prompt"]:
                    r["error"] = f"prefix not resident: {reused} of {r['n_prompt']} tokens reused"
        else:
            # concurrent: whole prompts at once, each generating until every prompt is prefilled
            n_predict = math.ceil(n * n_prompt_est / int(BATCH or 2048)) + ANSWER_TOKENS  # 2048: the server's -b
            res = concurrent(url, [{"prompt": x["prompt"], "n_predict": n_predict, "temperature": 0,
                                    "cache_prompt": False, "ignore_eos": True, "return_tokens": True}
                                   for x in insts[:n]])
            for r, (st, resp, dt) in zip(reqs, res):
                err = error_of(st, resp)
                if err:
                    r.update(ok=False, error=err)
                    continue
                dst, det = http(url + "/detokenize", {"tokens": (resp.get("tokens") or [])[:ANSWER_TOKENS]}, timeout=60)
                tim = resp.get("timings", {})
                kv = tim.get("kv_policy") or {}
                r.update(answer=det.get("content", "") if dst == 200 and isinstance(det, dict) else "",
                         wall_s=round(dt, 1), n_prompt=tim.get("prompt_n"), n_predicted=tim.get("predicted_n"),
                         cells_held=kv.get("cells_held"), cells_evicted=kv.get("cells_evicted"),
                         kv_policy=kv.get("name"))
                r["correct"] = tasks.correct(r["answer"], r["key"])
                r["ok"] = r["correct"]
        wall = time.time() - t0
        st, metrics = http(url + "/metrics", timeout=30)
        evicted_total = None
        if st == 200:
            for ln in str(metrics).splitlines():
                if ln.startswith("llamacpp:kv_policy_evicted_cells_total"):
                    evicted_total = float(ln.split()[-1])
    finally:
        stop_server(srv, log)
    text = open(log_path, errors="replace").read()
    log_failures = {name: len(p.findall(text)) for name, p in LOG_FAILURES.items()}
    held = [r.get("cells_held") for r in reqs if r.get("cells_held") is not None]
    ok = all(r["ok"] for r in reqs) and not any(log_failures.values())
    return {"n": n, "ok": ok, "n_ok": sum(r["ok"] for r in reqs), "n_predict": n_predict,
            "wall_s": round(wall, 1), "cells_held_total": sum(held) if held else None,
            "cells_held_per_seq_mean": round(sum(held) / len(held)) if held else None,
            "cells_held_per_seq_min": min(held) if held else None, "cells_held_per_seq_max": max(held) if held else None,
            "kv_policy_evicted_cells_total": evicted_total, "kv_full_retries": len(RETRY.findall(text)),
            "log_failures": log_failures, "log": os.path.relpath(log_path, ROOT), "requests": reqs,
            "server_cmd": "llama-server -m MODEL " + " ".join(cmd[7:])}


def describe(row):
    bad = [f"{name}={v}" for name, v in row["log_failures"].items() if v]
    miss = [f"seed {r['seed']}: {r.get('error') or repr(r.get('answer', ''))[:40]}" for r in row["requests"] if not r["ok"]]
    held = [r["cells_held"] for r in row["requests"] if r.get("cells_held") is not None]
    pre = [r["cells_held_after_prefill"] for r in row["requests"] if r.get("cells_held_after_prefill") is not None]
    return (f"{row['n_ok']}/{row['n']} ok, held/seq {row['cells_held_per_seq_mean']} "
            f"({min(held) if held else '-'}..{max(held) if held else '-'}, total {row['cells_held_total']})"
            + (f", after own prefill {min(pre)}..{max(pre)}" if pre else "") + f", {row['wall_s']} s"
            + (f", log: {', '.join(bad)}" if bad else "") + (f", misses: {'; '.join(miss[:3])}" if miss else ""))


def bench_policy(policy, n_prompt_est):
    runs = {}
    insts = INSTANCES

    t_start = time.time()
    stopped = []

    def attempt(n):
        if time.time() - t_start > POLICY_BUDGET_S:
            stopped.append(n)
            raise TimeoutError
        if n not in runs:
            runs[n] = run_n(policy, n, insts, n_prompt_est)
            print(f"parallel: {policy} N={n}: {describe(runs[n])}", flush=True)
        return runs[n]["ok"]

    last_ok, first_fail = 0, None
    try:
        for n in NS:
            if attempt(n):
                last_ok = n
            else:
                first_fail = n
                break
        if BISECT and first_fail is not None:
            lo, hi = last_ok, first_fail
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if attempt(mid):
                    lo = mid
                else:
                    hi = mid
            last_ok, first_fail = lo, hi
    except TimeoutError:
        print(f"parallel: {policy}: time budget ({POLICY_BUDGET_S:.0f} s) spent, N={stopped[0]} not run", flush=True)
    rows = [runs[n] for n in sorted(runs)]
    best = runs.get(last_ok)
    return {"max_n_all_passkeys": last_ok, "first_failing_n": first_fail,
            "ladder_exhausted": first_fail is None and not stopped,
            "stopped_by_time_budget_before_n": stopped[0] if stopped else None,
            "cells_held_per_seq_at_max_n": best["cells_held_per_seq_mean"] if best else None,
            "runs": rows}


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    if not os.access(os.path.join(BIN, "llama-server"), os.X_OK):
        sys.exit(f"bench-parallel: {BIN}/llama-server missing: run 'make llama' first (or set KVC_LLAMA_BIN)")
    MODEL = model()
    n_prompt_est = max(t for _, t in MIX)  # n_predict uses the target length (an upper bound)
    t0 = time.time()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    res = {"model": "SmolLM2-135M-Instruct Q4_1", "llama_cpp": "0c1e57098", "cache_type": "f16",
           "machine": f"{platform.machine()}, {os.cpu_count()} x {cpu}", "threads": int(THREADS),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": QUICK,
           "setup": {"ctx": CTX, "kv_unified": True, "batch": BATCH or "server default", "ubatch": UBATCH or "server default",
                     "mix": [f"{t}:{n}" for t, n in MIX],
                     "depth": DEPTH, "answer_tokens": ANSWER_TOKENS, "ladder": NS, "bisect": BISECT,
                     "policy_budget_s": POLICY_BUDGET_S,
                     "mode": MODE,
                     "submission": (
                         "phase 1: N requests at once (threads behind a barrier), request i on slot i (id_slot), "
                         "prompt without its last word, n_predict 0, cache_prompt; phase 2 after all returned: the "
                         "N full prompts at once on the same slots, answer_tokens generated" if MODE == "resident" else
                         "N full prompts at once (threads behind a barrier), one slot each, n_predict = "
                         "ceil(N * prompt_tokens_target / batch) + answer_tokens, ignore_eos"),
                     "ok": ("HTTP 200 and, for every request, the answer of a fresh full-cache server (one slot, "
                            "no policy) on the same prompt" if MODE == "resident" else
                            "HTTP 200 and the passkey in the answer for every request")
                           + (" (phase 2 reusing the whole phase-1 prefix)" if MODE == "resident" else
                              " (first answer_tokens generated tokens)")
                           + ", and no context-exceeded, slot purge or kv-policy failure in the server log",
                     "cells_held": "timings.kv_policy.cells_held of each response"
                                   + (" (phase 2: at its answer, all N resident; phase 1: after its own prefill)"
                                      if MODE == "resident" else " (end of its generation)"),
                     "flags": f"llama-server -c {CTX} -kvu -np N -t {THREADS} {' '.join(batch_args())} "
                              f"--cache-ram 0 --metrics --no-warmup --kv-policy NAME [--kv-policy-param PARAMS]"},
           "policies": {}}
    INSTANCES = instances(max(NS))
    if MODE == "resident":
        res["setup"]["full_cache_answers_reused"] = reference_answers(INSTANCES)
    res["full_cache_answers"] = [{"seed": x["seed"], "task": x["task"], "tokens": x["tokens"], "key": x["answer"],
                                  "answer": x.get("full_cache_answer")} for x in INSTANCES]
    for pol in POLICIES:
        res["policies"][pol] = bench_policy(pol, n_prompt_est)
        r = res["policies"][pol]
        print(f"parallel: {pol}: max N = {r['max_n_all_passkeys']}"
              + (" (ladder exhausted)" if r["ladder_exhausted"] else
               f", first failure at {r['first_failing_n']}" if r["first_failing_n"] else " (time budget)"), flush=True)
    res["wall_s"] = round(time.time() - t0)
    res["load_avg_end"] = os.getloadavg()
    res["command"] = " ".join(f"{v}={os.environ[v]}" for v in ("POLICIES", "NS", "BISECT", "MIX", "CTX", "BATCH", "UBATCH", "MODE",
                                                           "REUSE_REFERENCES")
                              if v in os.environ) + " python3 scripts/bench-parallel.py"
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    with open(RESULT, "w") as f:
        json.dump(res, f, indent=1)
    print(f"parallel: wrote {os.path.relpath(RESULT, ROOT)} in {res['wall_s']} s")

#!/usr/bin/env python3
"""Prompts longer than -c through llama-server at its default -b/-ub (issue: "llama-server cuts a long
prompt to almost nothing"). 12 instances at ~2K tokens (passkey and single needle in prose, depths
0.1-0.95, eval/tasks.py), asked of:

- a full-cache server (-c 4500, no policy): the reference;
- a dbudget server and a gvote server with -c 1000 (less than half of each prompt), default -b/-ub.

Per request: the answer, whether it is right (eval/tasks.py's rule) and the full cache's, cells held and
evicted, and the log's "is cut to ... to make room" lines. Writes results/long-prompt-server.json.

  python3 scripts/bench-long-prompt.py                 (about 8 min on 2 cores)
  python3 scripts/bench-long-prompt.py --summary-only  (recompute the summary of results/long-prompt-server.json)
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "llama"))
sys.path.insert(0, os.path.join(ROOT, "eval"))
import kvc_common as k  # noqa: E402
import tasks  # noqa: E402

THREADS = os.environ.get("KVC_THREADS", "2")
OUT = os.environ.get("KVC_OUT", os.path.join(ROOT, "results", "long-prompt-server.json"))
TOKENS = 2048
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9, 0.95]
CONFIGS = [
    ("full", ["-c", "4500"]),
    ("dbudget", ["-c", "1000", "--kv-policy", "dbudget"]),
    ("gvote", ["-c", "1000", "--kv-policy", "gvote"]),
]

instances = []
for task in ("passkey", "needle-single"):
    for i, depth in enumerate(DEPTHS):
        instances.append(tasks.make(task, TOKENS, depth, 100 + i))

def first_word(a):
    w = (a or "").strip().split()
    return w[0].strip(".,") if w else ""


def summarize(rows):
    """Per config: right answers, the full cache's 16 tokens exactly, and its first word (the key or the number)."""
    out = {}
    inst_rows = [v for kk, v in rows.items() if not kk.startswith("_")]
    for name, _ in CONFIGS:
        out[name] = {
            "n": len(inst_rows),
            "correct": sum(1 for v in inst_rows if v[name]["correct"]),
            "full_right": sum(1 for v in inst_rows if v["full"]["correct"]),
            "same_first_word_where_full_right": sum(1 for v in inst_rows if v["full"]["correct"] and
                                                    first_word(v[name]["answer"]) == first_word(v["full"]["answer"])),
            "same_16_tokens": sum(1 for v in inst_rows if v[name]["answer"] == v["full"]["answer"]),
            "cut_lines": rows["_log"][name]["cut_lines"],
        }
    return out


if len(sys.argv) > 1 and sys.argv[1] == "--summary-only":
    # recompute the summary of a committed run (no server is started)
    res = json.load(open(OUT))
    res["summary"] = summarize(res["instances"])
    with open(OUT, "w") as f:
        json.dump(res, f, indent=1)
    for name, s in res["summary"].items():
        print(name, s)
    sys.exit(0)

os.environ["KVC_THREADS"] = THREADS
k.THREADS = THREADS
rows = {}
for name, args in CONFIGS:
    srv = k.Server("long-prompt-" + name, args + ["-np", "1"])
    try:
        if not srv.wait_up():
            sys.exit("server %s did not start" % name)
        for inst in instances:
            body = {"prompt": inst["context"] + inst["question"], "n_predict": 16, "temperature": 0, "cache_prompt": False}
            st, r = srv.req("/completion", body)
            tm = r.get("timings", {}) if isinstance(r, dict) else {}
            kv = tm.get("kv_policy", {})
            rows.setdefault(inst["id"], {"task": inst["task"], "depth": inst["depth"], "expected": inst["answer"]})[name] = {
                "status": st,
                "answer": r.get("content") if st == 200 else str(r)[:200],
                "correct": st == 200 and tasks.correct(r.get("content", ""), inst["answer"]),
                "prompt_n": tm.get("prompt_n"),
                "cells_held": kv.get("cells_held"),
                "cells_evicted": kv.get("cells_evicted"),
            }
            print("%-8s %-28s %s" % (name, inst["id"], rows[inst["id"]][name]["answer"]), flush=True)
    finally:
        log = srv.stop()
    cuts = [l for l in log.splitlines() if "is cut to" in l]
    rows.setdefault("_log", {})[name] = {"cut_lines": len(cuts), "first": cuts[:1]}

res = {
    "command": "python3 scripts/bench-long-prompt.py",
    "threads": THREADS,
    "loadavg": os.getloadavg(),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "configs": {n: a for n, a in CONFIGS},
    "summary": summarize(rows),
    "instances": rows,
}
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(OUT, "w") as f:
    json.dump(res, f, indent=1)
for name, s in res["summary"].items():
    print("%-8s right %d/%d (full cache %d/%d); where the full cache is right, same first word %d/%d; same 16 tokens %d/%d; "
          "'is cut to' lines %d" % (name, s["correct"], s["n"], s["full_right"], s["n"], s["same_first_word_where_full_right"],
                                   s["full_right"], s["same_16_tokens"], s["n"], s["cut_lines"]))
print("wrote", OUT)

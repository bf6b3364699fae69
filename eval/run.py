#!/usr/bin/env python3
"""Fidelity and retrieval evaluation of the KV policies against the full cache (policy none).

Runs build/llama/bin/kvc-eval (one model load per group of jobs; --workers processes, -t 1 each)
over task instances from eval/tasks.py in question-aware and question-agnostic mode, plus
teacher-forced fidelity runs, writes results/raw/<preset>.jsonl (one line per job, kept for
--resume) and results/summary.json, then checks the assertions of the preset.

Every score is relative to the full cache (policy none) on the same input:
  accuracy   tasks.correct(answer, expected)
  agreement  the answer (first sentence of the greedy output) is the full cache's answer;
             exact_agreement: all n_predict tokens identical
  same_score correct() gives the same verdict as for the full cache
  kept       cells held after the prompt / prompt tokens (fidelity: after the context)
  KL, top1   teacher-forced KL(p_full || p_policy) and top-1 agreement over the continuation

  python3 eval/run.py --preset quick            # CI: ~3 min on 2 cores, exits 1 on a failed check
  python3 eval/run.py --preset full --resume    # README numbers (~75 min on 2 cores); --max-minutes to cut
  python3 eval/run.py --preset reduced --resume # 1K tokens, fewer instances (what fits in ~45 min)
  python3 eval/run.py --preset long --resume    # 8K prompts, defaults + main fixed points (~75 min)
  python3 eval/run.py --preset granularity      # per-layer/per-head sets vs token (issue 6, ~25 min)
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "eval"))
import tasks  # noqa: E402

# the policy table (src/policy.rs PRESETS), written by `cargo run --release --example gen_policies`
POLICIES = json.loads((ROOT / "eval" / "policies.json").read_text())
FIXED = [p["name"] for p in POLICIES if p["budget"] == "fixed"]         # user-set ratio/tokens
ADAPTIVE = [p["name"] for p in POLICIES if p["budget"] == "adaptive"]   # the budget emerges
BUDGET_FREE = {p["name"] for p in POLICIES if p["budget"] != "fixed"}   # adaptive, and none
RATIOS = [0.25, 0.5, 0.75, 0.9]
DBUDGET_T = [0.005, 0.01, 0.02, 0.05]
GVOTE_Q = [0.25, 0.5, 0.75]
GVOTE_P = [0.9, 0.95]
N_PREDICT = {"passkey": 10, "needle-single": 12, "needle-multikey": 12, "needle-multivalue": 24,
             "needle-multiquery": 24, "vartrack": 8}


def setting(policy, **params):
    ps = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()]
    label = " ".join([policy] + ps)
    return {"label": label, "policy": policy, "params": ps,
            "budget_free": policy in BUDGET_FREE}


def all_settings(core_only=False):
    """Every sweep; core_only: h2o, tova, knorm and pyramidkv at ratio 0.5 and 0.9 only."""
    s = [setting("none")]
    for pol in FIXED:
        rs = RATIOS if not core_only or pol in ("streaming", "snapkv", "adakv", "dynamickv") else [0.5, 0.9]
        s += [setting(pol, ratio=r) for r in rs]
    s += [setting("dbudget", threshold=t) for t in DBUDGET_T]
    s += [setting("gvote", quorum=q) for q in GVOTE_Q]
    s += [setting("gvote", p=p) for p in GVOTE_P if p != 0.95]  # p=0.95 is the default (with quorum 0.35)
    return s


def pick(labels):
    by = {s["label"]: s for s in all_settings()}
    out = []
    for lab in labels:
        if lab in by:
            out.append(by[lab])
        else:
            pol, *ps = lab.split()
            out.append({"label": lab, "policy": pol, "params": ps, "budget_free": pol in BUDGET_FREE})
    return out


DEFAULT_BF = ADAPTIVE  # default settings of the budget-free policies
CONTROL = "streaming ratio=0"       # evicts nothing: the hook alone must not change a logit

GRANULARITY = pick(["none", "dbudget", "dbudget granularity=layer", "gvote quorum=0.75",
                    "gvote quorum=0.75 granularity=layer"] +
                   [f"{p} ratio={r} granularity={g}" for p in ("snapkv", "pyramidkv", "dynamickv", "adakv")
                    for r in (0.25, 0.5) for g in ("token", "layer")] +
                   [f"adakv ratio={r} granularity=head" for r in (0.25, 0.5)])

LONG = pick(["none", "streaming ratio=0.9", "snapkv ratio=0.25", "snapkv ratio=0.5",
             "dynamickv ratio=0.5", "adakv ratio=0.5"] + DEFAULT_BF +
            ["dbudget threshold=0.02", "dbudget threshold=0.05", "gvote quorum=0.5"])

# the adaptive settings CI's quick grid holds to the targets below, at their defaults. gvote's default
# keeps every cell it would with the paper's union of sampled nuclei (a 1K prompt: all of it); its
# samples now vote by majority (support=0.5) and are drawn at the next position (issue 16), so it
# evicts here; a check of a policy that evicted nothing fails ("evicts on every instance")
QUICK_CHECKED = ["dbudget", "gvote"]

PRESETS = {
    "quick": dict(
        lengths=[1024], depths=[0.25, 0.5], seeds=[1], tasks=["passkey", "needle-single"],
        modes=["aware", "agnostic"],
        settings=pick(["none", "streaming ratio=0.9", "snapkv ratio=0.5"] + QUICK_CHECKED),
        agnostic_settings=None,  # same as settings
        fidelity=dict(contexts=[1024], cont=128, seeds=[1],
                      settings=pick([CONTROL, "snapkv ratio=0.5"] + QUICK_CHECKED)),
        checked=QUICK_CHECKED,
    ),
    "reduced": dict(
        lengths=[1024], depths=[0.25, 0.75], seeds=[1],
        tasks=["passkey", "needle-single", "needle-multikey", "vartrack"],
        modes=["aware", "agnostic"],
        settings=all_settings(core_only=True) + pick(DEFAULT_BF),
        agnostic_settings=pick(["none", "streaming ratio=0.5", "h2o ratio=0.5", "snapkv ratio=0.5",
                                "adakv ratio=0.5", "dynamickv ratio=0.5"] + DEFAULT_BF +
                               ["dbudget threshold=0.05", "gvote quorum=0.25"]),
        fidelity=dict(contexts=[1024], cont=128, seeds=[1],
                      settings=pick([CONTROL]) + all_settings(core_only=True) + pick(DEFAULT_BF)),
    ),
    # issue 6: per-layer / per-head sets (re-packed) against the same policies at token granularity
    "granularity": dict(
        lengths=[1024], depths=[0.25, 0.75], seeds=[1], tasks=["passkey", "needle-multikey"],
        modes=["aware"], settings=GRANULARITY, agnostic_settings=None,
        fidelity=dict(contexts=[1024], cont=128, seeds=[1], settings=GRANULARITY),
    ),
    # 8K prompts (SmolLM2's trained context), apart from "full" so that its averages stay comparable
    # to earlier runs: 18 instances x 2 modes, the defaults and the main fixed points (~75 min)
    "long": dict(
        lengths=[8192], depths=[0.1, 0.5, 0.9], seeds=[1],
        tasks=list(tasks.GENERATORS), modes=["aware", "agnostic"],
        settings=LONG, agnostic_settings=None,
        fidelity=dict(contexts=[8192], cont=256, seeds=[1], settings=pick([CONTROL]) + LONG),
    ),
    # issue 16: the question-agnostic flow (context compressed before the question arrives, then
    # the question as a second prompt end) on the needle tasks where the full preset misses, at 2K:
    # the context ranker (dbudget ranker=context) against the defaults; fits ~15 min per model
    "agnostic": dict(
        lengths=[2048], depths=[0.1, 0.5, 0.9], seeds=[1],
        tasks=["passkey", "needle-single", "needle-multikey"], modes=["agnostic"],
        settings=pick(["none"] + DEFAULT_BF + ["dbudget ranker=context", "dbudget ranker=context threshold=0.02"]),
        agnostic_settings=None,
        fidelity=dict(contexts=[], cont=256, seeds=[1], settings=[]),
    ),
    # the gvote default (issue 16): question-aware 2K, 6 instances, plus fidelity on 2K of prose (64
    # tokens); sweep with --settings on both models (--model smollm2, --model gemma3)
    "tune2k": dict(
        lengths=[2048], depths=[0.25, 0.75], seeds=[1],
        tasks=["passkey", "needle-single", "needle-multikey"], modes=["aware"],
        settings=pick(["none"] + DEFAULT_BF), agnostic_settings=None,
        fidelity=dict(contexts=[2048], cont=64, seeds=[1], settings=pick(DEFAULT_BF)),
    ),
    # the README numbers: 54 instances (6 tasks x 1K/2K/4K x depth 0.1/0.5/0.9) in both modes under every
    # setting of the reduced grid, and fidelity on 1K/2K/4K tokens of prose (~80 min with 2 workers)
    "full": dict(
        lengths=[1024, 2048, 4096], depths=[0.1, 0.5, 0.9], seeds=[1],
        tasks=list(tasks.GENERATORS), modes=["aware", "agnostic"],
        settings=all_settings(core_only=True) + pick(DEFAULT_BF), agnostic_settings=None,
        fidelity=dict(contexts=[1024, 2048, 4096], cont=256, seeds=[1],
                      settings=pick([CONTROL]) + all_settings(core_only=True) + pick(DEFAULT_BF)),
    ),
}


def dedup(settings):
    seen, out = set(), []
    for s in settings:
        if s["label"] not in seen:
            seen.add(s["label"])
            out.append(s)
    return out


def fidelity_text(tokens, cont, seed):
    import random
    rng = random.Random(1000 + seed)
    cpt = tasks.CHARS_PER_TOKEN["prose"]
    text = tasks.prose(int((tokens + cont) * cpt), rng)
    cut = text.rfind(" ", 0, int(tokens * cpt))
    return text[:cut], text[cut:]


def shares_prefix(s):
    """kvc-eval prefills a prompt's head once per instance and restores it for every setting (the
    same cells and tail queries, tested bitwise in tests/llama/test_eval.py); h2o's query ring and
    dbudget ranker=context's query sample span prefill calls, so they prefill their own head; so does
    ranker=recon, whose reconstruction pass teacher-forces the tokens the hook saw decoded (a restored
    head's are unknown to it)."""
    return s["policy"] != "h2o" and "ranker=context" not in s["params"] and "ranker=recon" not in s["params"]


def build_groups(cfg):
    """Groups of jobs, one kvc-eval process each, in priority order (fidelity, aware, agnostic)."""
    groups = []
    fid = cfg["fidelity"]
    for n in fid["contexts"]:
        for seed in fid["seeds"]:
            ctx, cont = fidelity_text(n, fid["cont"], seed)
            iid = f"fid-{n}-{fid['cont']}-{seed}"
            jobs = [dict(id=f"fidelity|{iid}|{s['label']}", mode="fidelity", policy=s["policy"], params=s["params"],
                         context=ctx, continuation=cont, share_prefix=shares_prefix(s),
                         tag=dict(instance=iid, label=s["label"], target_tokens=n))
                    for s in dedup(fid["settings"]) if s["policy"] != "none"]
            groups.append((f"fidelity {iid}", n + fid["cont"], jobs))
    # instance-major (every mode and setting of an instance together), so that a run cut by
    # --max-minutes still compares every setting on the same instances
    for seed in cfg["seeds"]:
        for n in cfg["lengths"]:
            for d in cfg["depths"]:
                for task in cfg["tasks"]:
                    inst = tasks.make(task, n, d, seed)
                    for mode in cfg["modes"]:
                        settings = dedup(cfg["settings"] if mode == "aware" or not cfg.get("agnostic_settings")
                                         else cfg["agnostic_settings"])
                        jobs = [dict(id=f"{mode}|{inst['id']}|{s['label']}", mode=mode, policy=s["policy"],
                                     params=s["params"], context=inst["context"], question=inst["question"],
                                     n_predict=N_PREDICT.get(task, 12), share_prefix=shares_prefix(s),
                                     tag=dict(instance=inst["id"], task=task, depth=d, target_tokens=n,
                                              expected=inst["answer"], label=s["label"]))
                                for s in settings]
                        groups.append((f"{mode} {inst['id']}", n, jobs))
    return groups


def read_raw(path):
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "error" not in r:
                rows[r["id"]] = r
    return rows


def run_group(binary, model, jobs, n_tokens, out_path, threads, tmpdir):
    n_ctx = int(n_tokens * 1.3) + 512
    n_ctx = (n_ctx + 255) // 256 * 256
    jobs_path = tmpdir / f"jobs-{out_path.stem}.jsonl"
    jobs_path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    cmd = [str(binary), "-m", model, "-t", str(threads), "-c", str(n_ctx), "-b", "512",
           "--eval-jobs", str(jobs_path), "--eval-out", str(out_path)]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-8:])
        print(f"eval: kvc-eval exited {p.returncode}:\n{tail}", file=sys.stderr)
    return p.returncode


def run_groups(todo, a, model, raw_path, tmpdir, t0):
    """Run the groups on a.workers kvc-eval processes (-t a.threads each). Each writes its own file,
    appended to raw_path when it ends, so lines never interleave and --resume sees whole groups.
    Returns False if --max-minutes stopped it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    lock = threading.Lock()
    cut = threading.Event()

    def one(i, name, n_tokens, jobs):
        if a.max_minutes and time.time() - t0 > a.max_minutes * 60:
            cut.set()
            return
        out = tmpdir / f"out-{i}.jsonl"
        out.unlink(missing_ok=True)
        tg = time.time()
        run_group(a.bin, model, jobs, n_tokens, out, a.threads, tmpdir)
        lines = out.read_text() if out.exists() else ""
        with lock:
            with open(raw_path, "a") as f:
                f.write(lines)
            print(f"eval: {name}: {len(jobs)} jobs in {time.time() - tg:.0f} s ({time.time() - t0:.0f} s total)", flush=True)
        out.unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=max(1, a.workers)) as pool:
        for f in [pool.submit(one, i, *g) for i, g in enumerate(todo)]:
            f.result()
    if cut.is_set():
        print(f"eval: --max-minutes {a.max_minutes:g} reached; the rest is left for --resume", flush=True)
    return not cut.is_set()


def answer_part(text):
    """The answer proper: first line, up to the end of the first sentence (what follows is free text
    that differs with tokenization boundaries even between two full-cache runs)."""
    t = text.strip().split("\n")[0].strip()
    cut = t.find(". ")
    t = t[:cut] if cut != -1 else t
    return t.rstrip(". ")


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows, cfg, meta):
    tasks_rows = [r for r in rows.values() if r["mode"] in ("aware", "agnostic")]
    # a cut run (--max-minutes, or killed): keep only the instances every setting of the mode ran on,
    # so that all settings are compared on the same inputs
    n_settings = {m: len(dedup(cfg["settings"] if m == "aware" or not cfg.get("agnostic_settings")
                               else cfg["agnostic_settings"])) for m in ("aware", "agnostic")}
    count = {}
    for r in tasks_rows:
        count[(r["mode"], r["tag"]["instance"])] = count.get((r["mode"], r["tag"]["instance"]), 0) + 1
    tasks_rows = [r for r in tasks_rows if count[(r["mode"], r["tag"]["instance"])] == n_settings[r["mode"]]]
    meta["instances"] = {m: sorted({r["tag"]["instance"] for r in tasks_rows if r["mode"] == m}) for m in ("aware", "agnostic")}
    ref = {(r["mode"], r["tag"]["instance"]): r for r in tasks_rows if r["policy"] == "none"}
    out = {"meta": meta, "tasks": [], "fidelity": [], "layer_kept": {}}
    groups = {}
    for r in tasks_rows:
        groups.setdefault((r["mode"], r["tag"]["label"]), []).append(r)
    order = {s["label"]: i for i, s in enumerate(dedup(cfg["settings"] + (cfg.get("agnostic_settings") or [])))}
    for (mode, label), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 999))):
        per = []
        for r in rs:
            t = r["tag"]
            ok = tasks.correct(r["answer"], t["expected"])
            f = ref.get((mode, t["instance"]))
            agree = f is not None and answer_part(r["answer"]) == answer_part(f["answer"])
            exact = f is not None and r["answer"].strip() == f["answer"].strip()
            same = f is not None and ok == tasks.correct(f["answer"], t["expected"])
            kept = r["cells_held_prompt"] / r["n_prompt"] if r["n_prompt"] else None
            kept_end = r["cells_held"] / (r["n_prompt"] + r["n_decoded"] + 1)
            per.append(dict(instance=t["instance"], task=t["task"], depth=t["depth"], tokens=t["target_tokens"], correct=ok, agree=agree, exact=exact,
                            same_score=same, kept=kept, kept_end=kept_end, prefill_ms=r["prefill_ms"],
                            ref_prefill_ms=f["prefill_ms"] if f else None))
        by_task = {}
        for p in per:
            by_task.setdefault(p["task"], []).append(p["correct"])
        s0 = rs[0]
        out["tasks"].append(dict(
            mode=mode, label=label, policy=s0["policy"], params=s0["params"],
            budget_free=s0["policy"] in BUDGET_FREE, n=len(per),
            accuracy=mean([p["correct"] for p in per]), agreement=mean([p["agree"] for p in per]),
            exact_agreement=mean([p["exact"] for p in per]),
            same_score=mean([p["same_score"] for p in per]),
            kept_fraction=mean([p["kept"] for p in per]), kept_end_fraction=mean([p["kept_end"] for p in per]),
            prefill_ms=mean([p["prefill_ms"] for p in per]),
            prefill_ratio=mean([p["prefill_ms"] / p["ref_prefill_ms"] for p in per if p["ref_prefill_ms"]]),
            accuracy_by_task={k: mean(v) for k, v in sorted(by_task.items())},
            instances=per))
        lk = [r["layer_kept"] for r in rs if r.get("layer_kept")]
        if lk and mode == "aware":
            n_layer = len(lk[0])
            out["layer_kept"][label] = [mean([x[i] / r["n_prompt"] for x, r in zip(lk, rs) if len(x) == n_layer])
                                        for i in range(n_layer)]
    fgroups = {}
    for r in rows.values():
        if r["mode"] == "fidelity":
            fgroups.setdefault(r["tag"]["label"], []).append(r)
    for label in sorted(fgroups, key=lambda l: order.get(l, 999)):
        rs = fgroups[label]
        out["fidelity"].append(dict(
            label=label, policy=rs[0]["policy"], params=rs[0]["params"],
            budget_free=rs[0]["policy"] in ADAPTIVE, n_runs=len(rs),
            n_positions=sum(r["n_positions"] for r in rs),
            # the policy runs again every `interval` tokens of the continuation: kept_fraction is
            # the mean over the positions (kvc-eval kept_mean), kept_prefill right after the context
            kept_fraction=mean([r.get("kept_mean", r["cells_held_prefill"] / r["n_context"]) for r in rs]),
            kept_prefill=mean([r["cells_held_prefill"] / r["n_context"] for r in rs]),
            kept_end=mean([r["cells_held"] / (r["n_context"] + r["n_positions"]) for r in rs]),
            policy_runs=mean([r["policy_runs"] for r in rs]),
            kl_mean=mean([r["kl_mean"] for r in rs]), kl_median=mean([r["kl_median"] for r in rs]),
            kl_p99=max(r["kl_p99"] for r in rs), kl_max=max(r["kl_max"] for r in rs),
            top1=mean([r["top1"] for r in rs]), dp_mean=mean([r["dp_mean"] for r in rs]),
            **confident(rs),
            nll_delta=mean([r["nll_policy"] - r["nll_full"] for r in rs]),
            contexts=sorted({r["n_context"] for r in rs})))
    return out


def confident(rs):
    """Top-1 agreement on the positions where the full cache is sure (p1 - p2 >= 0.1), pooled over
    the runs, and the full cache's median margin where top-1 flips (kvc-eval); {} for older raw files."""
    if not all("n_confident" in r for r in rs):
        return {}
    n = sum(r["n_confident"] for r in rs)
    return dict(top1_confident=sum(r["top1_confident"] * r["n_confident"] for r in rs) / n if n else 1.0,
                confident_share=n / sum(r["n_positions"] for r in rs),
                flip_margin_median=mean([r["flip_margin_median"] for r in rs]))


# teacher-forced KL(full || policy) mean over the continuation that a setting of the quick preset must
# stay under on SmolLM2 (measured 1K prose, 128 tokens: snapkv ratio=0.5 0.028, dbudget 0.0072); the
# adaptive defaults are held to the question-aware target (KL <= 0.03)
MAX_KL = {"snapkv ratio=0.5": 0.05}
MAX_KL_ADAPTIVE = 0.03
MIN_TOP1 = 0.85
# question-agnostic answers of an adaptive setting that evicts: gvote loses 1K needles when the
# context is compressed before the question (its default since issue 16: both single needles, 2 of
# 4, keeping 0.84; quorum 0.75 of the old default: 2 of 4). Scored by the context's own last
# queries, a fact nobody asked about looks unimportant (issue 16). A bound that fails on a third
# miss; `dbudget ranker=recon` is the question-agnostic setting.
MIN_AGREE_AGNOSTIC = {"gvote": 0.5, "gvote quorum=0.75": 0.5}


def checks(summary, cfg):
    """(name, ok, detail) for every assertion of the preset. A setting the preset asks for but the
    summary lacks is a failure, never a silently skipped check."""
    res = []
    t = {(s["mode"], s["label"]): s for s in summary["tasks"]}
    for mode in cfg["modes"]:
        wanted = dedup(cfg["settings"] if mode == "aware" or not cfg.get("agnostic_settings")
                       else cfg["agnostic_settings"])
        missing = [s["label"] for s in wanted if (mode, s["label"]) not in t]
        res.append((f"{mode}: every setting has results", not missing,
                    f"missing {', '.join(missing)}" if missing else f"{len(wanted)} settings"))
        full = t.get((mode, "none"))
        if not full:
            continue
        pk = [p for p in full["instances"] if p["task"] == "passkey"]
        if "passkey" in cfg["tasks"]:
            ok = bool(pk) and all(p["correct"] for p in pk)
            res.append((f"{mode}: full cache retrieves every passkey (sanity)", ok,
                        f"{sum(p['correct'] for p in pk)}/{len(pk)}"))
        st = t.get((mode, "streaming ratio=0.9"))
        if st:
            mid = lambda rows: [p for p in rows if 0.2 <= p["depth"] <= 0.8 and p["task"].startswith(("needle", "passkey"))]  # noqa: E731
            fa, sa = mean([p["correct"] for p in mid(full["instances"])]), mean([p["correct"] for p in mid(st["instances"])])
            res.append((f"{mode}: streaming ratio=0.9 scores below the full cache on mid-depth needles (known bad)",
                        fa is not None and sa < fa, f"streaming {sa} vs full {fa}"))
        for lab in cfg.get("checked", DEFAULT_BF):
            s = t.get((mode, lab))
            if not s:
                continue
            bad = [p["instance"] for p in s["instances"] if not p["agree"]]
            need = 1.0 if mode == "aware" else MIN_AGREE_AGNOSTIC.get(lab, 1.0)
            what = "on every instance" if need == 1.0 else f"on >= {need:.0%} of the instances (known agnostic loss)"
            res.append((f"{mode}: {lab} gives the full cache's answer {what}",
                        s["agreement"] is not None and s["agreement"] >= need - 1e-9,
                        f"agreement {s['agreement']:.2f}, kept {s['kept_fraction']:.2f}" +
                        (f"; differs on {', '.join(bad)}" if bad else "")))
            # an answer kept by a policy that evicted nothing proves nothing
            idle = [p["instance"] for p in s["instances"] if p["kept"] is None or p["kept"] > 0.99]
            res.append((f"{mode}: {lab} evicts on every instance", not idle,
                        f"kept {s['kept_fraction']:.3f}" + (f"; kept > 0.99 on {', '.join(idle)}" if idle else "")))
    fid = {f["label"]: f for f in summary["fidelity"]}
    for s in dedup(cfg["fidelity"]["settings"]):
        lab = s["label"]
        if s["policy"] == "none":
            continue
        f = fid.get(lab)
        if not f or not f["n_positions"]:
            res.append((f"fidelity: {lab} has results", False, "missing"))
            continue
        if lab == CONTROL:
            res.append((f"fidelity: {CONTROL} (evicts nothing) gives the full cache's logits: the hook changes nothing",
                        f["kl_max"] < 1e-6 and f["top1"] == 1.0 and f["kept_fraction"] > 0.999,
                        f"KL max {f['kl_max']:.2e}, top-1 {f['top1']:.3f}, kept {f['kept_fraction']:.3f}"))
            continue
        max_kl = MAX_KL.get(lab, MAX_KL_ADAPTIVE if s["policy"] in ADAPTIVE else None)
        if max_kl is None:
            continue
        ok = (all(math.isfinite(f[k]) for k in ("kl_mean", "kl_max", "top1")) and f["kl_mean"] <= max_kl
              and f["top1"] >= MIN_TOP1 and f["kept_prefill"] < 0.99)
        res.append((f"fidelity: {lab} evicts (kept < 0.99) with KL mean <= {max_kl:g} and top-1 >= {MIN_TOP1:g}", ok,
                    f"KL {f['kl_mean']:.4f}, top-1 {f['top1']:.3f}, kept {f['kept_prefill']:.2f} after the context"))
    for s in summary["tasks"]:
        if s["policy"] in ("streaming", "snapkv") and s["mode"] == "aware":
            expect = 1.0 - float(s["params"][0].split("=")[1])
            ok = s["kept_fraction"] is not None and abs(s["kept_fraction"] - expect) < 0.02
            res.append((f"aware: {s['label']} keeps {expect:.2f} of the prompt", ok, f"kept {s['kept_fraction']:.3f}"))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--resume", action="store_true", help="keep results/raw/<preset>.jsonl and skip jobs already there")
    ap.add_argument("--max-minutes", type=float, default=0, help="start no new group after this (0 = no limit)")
    ap.add_argument("--summarize-only", action="store_true", help="no model runs; summarize the raw file")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the groups whose name contains TEXT (repeatable), e.g. 'fidelity', 'aware passkey'")
    ap.add_argument("--flow", choices=["jobs", "chat"], default="jobs",
                    help="chat: two turns through llama-server reusing the compressed prefix (results/chat*.json)")
    ap.add_argument("--settings", action="append", default=[], metavar="LABEL",
                    help="sweep: run these settings (e.g. 'gvote quorum=0.5 pool=1') instead of the preset's; "
                         "writes raw/<preset>-sweep*.jsonl and summary-<preset>-sweep*.json")
    ap.add_argument("--threads", "-t", type=int, default=1, help="threads per kvc-eval process")
    ap.add_argument("--workers", "-j", type=int, default=min(2, os.cpu_count() or 1),
                    help="kvc-eval processes at once (default: 2, or 1 on a 1-core machine)")
    ap.add_argument("--bin", default=str(ROOT / "build/llama/bin/kvc-eval"))
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 | gemma3 (fetched by scripts/llama.sh model NAME) or a GGUF path")
    ap.add_argument("--out", default=None,
                    help="where the summary and raw/ go (default: results/; --preset quick: build/eval, "
                         "so that CI leaves the committed results alone)")
    ap.add_argument("--record", action="store_true",
                    help="--preset quick: write into results/ (the committed record) instead of build/eval")
    a = ap.parse_args()

    cfg = dict(PRESETS[a.preset])
    if a.settings:
        # a sweep: these settings instead of the preset's (the full cache always runs, as reference)
        cfg["settings"] = pick(["none"] + a.settings)
        cfg["agnostic_settings"] = None
        cfg["fidelity"] = dict(cfg["fidelity"], settings=pick(a.settings))
    # CI runs the quick preset on every `make test`: its output is scratch (build/ is ignored), the
    # committed results/summary-quick.json changes only when someone records it on purpose
    scratch = a.preset == "quick" and a.flow == "jobs" and not a.record
    out_dir = Path(a.out or (ROOT / ("build/eval" if scratch else "results")))
    raw_dir = out_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    model, tag = model_path(a.model)
    if a.flow == "chat":
        res = run_chat(a, model, out_dir / f"chat{tag}.json")
        for n, ok, d in res:
            print(f"{'PASS' if ok else 'FAIL'}: {n} ({d})")
        sys.exit(1 if any(not ok for _, ok, _ in res) else 0)
    if a.settings:
        tag = "-sweep" + tag
    raw_path = raw_dir / f"{a.preset}{tag}.jsonl"

    groups = build_groups(cfg)
    # the summary records this library's md5, so kvc-eval must load this one: its dlopen honours
    # LLAMA_KVCOMPRESS_LIB before the path configured at build time (KVC_LIB alone used to be
    # recorded while the configured library ran)
    lib = Path(os.environ.get("LLAMA_KVCOMPRESS_LIB") or os.environ.get("KVC_LIB")
               or ROOT / "target/release/libkvcompress.so")
    os.environ["LLAMA_KVCOMPRESS_LIB"] = str(lib)
    lib_md5 = md5(lib)
    n_jobs = sum(len(g[2]) for g in groups)
    complete = True
    t0 = time.time()
    if not a.summarize_only:
        if not Path(a.bin).exists():
            sys.exit(f"eval: {a.bin} not found; run `bash scripts/llama.sh build` (or `all`)")
        if not Path(model).exists():
            sys.exit(f"eval: model {model} not found; run `bash scripts/llama.sh fetch`")
        if not a.resume and raw_path.exists():
            raw_path.unlink()
        tmpdir = raw_dir / f".{a.preset}{tag}.tmp"
        tmpdir.mkdir(exist_ok=True)
        done = read_raw(raw_path)
        print(f"eval: preset {a.preset}: {n_jobs} jobs in {len(groups)} groups, {len(done)} already done; "
              f"{a.workers} worker(s) x -t {a.threads}", flush=True)
        todo = [(name, n_tokens, [j for j in jobs if j["id"] not in done]) for name, n_tokens, jobs in groups
                if not a.only or any(o in name for o in a.only)]
        complete = run_groups([g for g in todo if g[2]], a, model, raw_path, tmpdir, t0)

    rows = read_raw(raw_path)
    wanted = {j["id"] for g in groups for j in g[2]}
    rows = {k: v for k, v in rows.items() if k in wanted}
    complete = complete and len(rows) == len(wanted)
    if md5(lib) != lib_md5:
        print(f"eval: WARNING: {lib} changed during the run; rows may mix library versions", file=sys.stderr)
    meta = dict(
        preset=a.preset, complete=complete, jobs_done=len(rows), jobs_total=len(wanted),
        model=Path(model).name, cache_type="f16",
        libkvcompress_md5=md5(lib), kvcompress_commit=git_head(),
        llama_cpp=(ROOT / "patches/LLAMA_CPP_COMMIT").read_text().strip(),
        machine=f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores", threads=a.threads, workers=a.workers,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        lengths=cfg["lengths"], depths=cfg["depths"], tasks=cfg["tasks"], seeds=cfg["seeds"],
        fidelity_contexts=cfg["fidelity"]["contexts"], fidelity_continuation=cfg["fidelity"]["cont"],
        wall_s=None if a.summarize_only else round(time.time() - t0),
        model_s=round(sum(r.get("prefill_ms", 0) + r.get("decode_ms", 0) + r.get("ref_prefill_ms", 0) +
                          r.get("ref_decode_ms", 0) for r in rows.values()) / 1000))
    summary = summarize(rows, cfg, meta)
    res = checks(summary, cfg)
    summary["checks"] = [dict(name=n, ok=ok, detail=d) for n, ok, d in res]
    name = ("summary" if a.preset in ("reduced", "full") else f"summary-{a.preset}") + f"{tag}.json"
    (out_dir / name).write_text(json.dumps(summary, indent=1) + "\n")

    for s in summary["tasks"]:
        print(f"  {s['mode']:8s} {s['label']:26s} n={s['n']:3d} kept={s['kept_fraction']:.3f} acc={s['accuracy']:.3f} "
              f"agree={s['agreement']:.3f}")
    for f in summary["fidelity"]:
        print(f"  fidelity {f['label']:26s} kept={f['kept_fraction']:.3f} KL={f['kl_mean']:.4f} p99={f['kl_p99']:.3f} "
              f"top1={f['top1']:.3f}")
    n_fail = 0
    for n, ok, d in res:
        print(f"{'PASS' if ok else 'FAIL'}: {n} ({d})")
        n_fail += not ok
    if not complete:
        print(f"eval: incomplete: {len(rows)}/{len(wanted)} jobs have results")
    print(f"eval: wrote {out_dir / name} in {time.time() - t0:.0f} s")
    print(f"eval: {len(res) - n_fail} passed, {n_fail} failed")
    sys.exit(1 if n_fail or (not complete and a.preset == "quick") else 0)


# --flow chat: 3 conversations at 1K per model (~4 min on 2 busy cores; each turn 1 is a fresh prefill)
CHAT = dict(lengths=[1024], depths=[0.25, 0.5, 0.75], seeds=[1], n_predict=12,
            settings=pick(["none"] + DEFAULT_BF))


def kv_policy_field(s):
    """A setting as llama-server's per-request "kv_policy" object."""
    params = dict(kv.split("=", 1) for kv in s["params"])
    return {"name": s["policy"], "params": params} if params else s["policy"]


def run_chat(a, model, out_path):
    """--flow chat: two turns through llama-server with the cached prefix reused (tasks.chat).

    Turn 1 sends context + question 1 fresh (cache_prompt false: the policy sees the whole prefill,
    as it would for a new conversation); turn 2 sends turn 1's tokens, its answer's tokens and
    question 2 (cache_prompt true), so the server extends the compressed cache: question 2 is
    answered from a context compressed before it existed, and the policy runs again at turn 2's end.
    The prompts are token arrays so that turn 2 extends turn 1 exactly (re-tokenized text can
    diverge inside the compressed prefix, which the server re-processes); timings.cache_n proves
    the reuse. The reference is the full cache (policy none) on the same turn-2 tokens, fresh."""
    sys.path.insert(0, str(ROOT / "tests" / "llama"))
    import kvc_common as k
    k.MODEL = model
    k.THREADS = str(a.threads * max(1, a.workers))
    # a seed per depth, so that the conversations differ in their numbers too
    insts = [tasks.chat(n, d, seed * 100 + j) for seed in CHAT["seeds"] for n in CHAT["lengths"]
             for j, d in enumerate(CHAT["depths"])]
    n_ctx = (int(max(CHAT["lengths"]) * 1.3) + 512 + 255) // 256 * 256
    srv = k.Server("chat-" + Path(model).stem, ["-c", str(n_ctx), "-np", "1"])
    rows = []
    t0 = time.time()
    try:
        if not srv.wait_up():
            sys.exit("eval: llama-server did not start (see %s)" % srv.log_path)

        def tok(text, special):
            st, r = srv.req("/tokenize", {"content": text, "add_special": special})
            assert st == 200, r
            return r["tokens"]

        def complete(prompt, policy, cache):
            body = {"prompt": prompt, "n_predict": CHAT["n_predict"], "temperature": 0, "cache_prompt": cache,
                    "id_slot": 0, "return_tokens": True, "kv_policy": policy}
            st, r = srv.req("/completion", body)
            if st != 200:
                raise RuntimeError("llama-server answered %d: %s" % (st, str(r)[:300]))
            return r

        for inst in insts:
            p1 = tok(inst["context"] + inst["question"], True)
            q2 = tok(inst["question2"], False)
            refs = {}
            for s in CHAT["settings"]:
                r1 = complete(p1, kv_policy_field(s), False)
                p2 = p1 + r1["tokens"] + q2
                r2 = complete(p2, kv_policy_field(s), True)
                key = tuple(p2)
                if key not in refs:
                    refs[key] = complete(p2, "none", False)
                ref = refs[key]
                kv1, kv2 = r1["timings"].get("kv_policy", {}), r2["timings"].get("kv_policy", {})
                rows.append(dict(
                    instance=inst["id"], depth=inst["depth"], tokens=inst["target_tokens"], label=s["label"],
                    policy=s["policy"], params=s["params"], answer1=r1["content"], answer2=r2["content"],
                    ref_answer2=ref["content"], expected1=inst["answer"], expected2=inst["answer2"],
                    n_prompt1=len(p1), n_prompt2=len(p2), cache_n=r2["timings"].get("cache_n"),
                    cells_held1=kv1.get("cells_held"), cells_evicted1=kv1.get("cells_evicted"),
                    cells_held2=kv2.get("cells_held"), cells_evicted2=kv2.get("cells_evicted")))
                r = rows[-1]
                print(f"chat: {inst['id']:18s} {s['label']:20s} turn 2 {answer_part(r['answer2'])!r:24s} "
                      f"(full {answer_part(r['ref_answer2'])!r}), cache_n {r['cache_n']}, held {r['cells_held2']}"
                      f"/{len(p2)}", flush=True)
    finally:
        srv.stop()
    out = dict(meta=dict(flow="chat", model=Path(model).name, command=" ".join(["python3", "eval/run.py"] + sys.argv[1:]),
                         kvcompress_commit=git_head(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         loadavg=os.getloadavg(), wall_s=round(time.time() - t0), threads=k.THREADS,
                         lengths=CHAT["lengths"], depths=CHAT["depths"], n_predict=CHAT["n_predict"]),
               settings=[], rows=rows)
    for s in CHAT["settings"]:
        rs = [r for r in rows if r["label"] == s["label"]]
        right = [r for r in rs if tasks.correct(r["ref_answer2"], r["expected2"])]
        out["settings"].append(dict(
            label=s["label"], n=len(rs),
            reused=sum(1 for r in rs if r["cache_n"] and r["cache_n"] >= r["n_prompt1"]),
            correct2=sum(tasks.correct(r["answer2"], r["expected2"]) for r in rs),
            full_right2=len(right),
            same2_where_right=sum(answer_part(r["answer2"]) == answer_part(r["ref_answer2"]) for r in right),
            same2=sum(answer_part(r["answer2"]) == answer_part(r["ref_answer2"]) for r in rs),
            correct1=sum(tasks.correct(r["answer1"], r["expected1"]) for r in rs),
            kept2=mean([r["cells_held2"] / r["n_prompt2"] for r in rs if r["cells_held2"] is not None])))
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    res = []
    for s in out["settings"]:
        print(f"  chat {s['label']:20s} n={s['n']} turn 2 same as full where full right {s['same2_where_right']}/"
              f"{s['full_right2']}, right {s['correct2']}/{s['n']}, kept {s['kept2']:.3f}, prefix reused {s['reused']}/{s['n']}")
        # the flow is only the server path if turn 2 really extended the cached (compressed) prefix
        res.append((f"chat: {s['label']} turn 2 reused the cached prefix", s["reused"] == s["n"],
                    f"{s['reused']}/{s['n']}"))
        if s["label"] == "none":
            res.append(("chat: the full cache's reused turn 2 equals a fresh prefill", s["same2"] == s["n"],
                        f"{s['same2']}/{s['n']}"))
    print(f"eval: wrote {out_path}")
    return res


MODELS = ("smollm2", "gemma3")


def model_path(arg):
    """(GGUF path, file-name tag): SmolLM2 writes summary.json etc. as before, another model
    summary-<name>.json (raw/<preset>-<name>.jsonl), so both models' results sit side by side."""
    if arg in MODELS:
        path = subprocess.run(["bash", str(ROOT / "scripts/llama.sh"), "model"] + ([arg] if arg != "smollm2" else []),
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        return path, "" if arg == "smollm2" else f"-{arg}"
    stem = Path(arg).stem.lower()
    return arg, "" if stem.startswith("smollm2") else "-" + ("gemma3" if "gemma-3" in stem or "gemma3" in stem else stem)


def md5(path):
    import hashlib
    try:
        return hashlib.md5(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def git_head():
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or None


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    main()

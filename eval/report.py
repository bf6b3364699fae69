#!/usr/bin/env python3
"""Markdown table and plots from results/summary.json (written by eval/run.py).

  python3 eval/report.py [--summary results/summary.json] [--out results]

Writes RESULTS.md (table for the README, project targets, checks) and PNG plots:
accuracy-vs-kept.png, kl-vs-kept.png and, when some policy keeps different counts per layer,
layer-kept.png; with results/summary-long.json present (--preset long, 8K prompts) an "8K prompts"
paragraph; with results/bench-*.json present (make bench) a "Benchmarks" section and overhead.png.
`--summary results/summary-long.json` writes LONG.md, `--summary results/summary-granularity.json`
GRANULARITY.md.
Needs matplotlib for the plots (`pip install matplotlib`); without it only the
markdown is written.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "eval"))
from run import ADAPTIVE, DEFAULT_BF, FIXED  # noqa: E402  (the policy table, eval/policies.json)

FIXED_STYLE = {"streaming": "tab:gray", "h2o": "tab:brown", "snapkv": "tab:blue", "tova": "tab:olive",
               "knorm": "tab:pink", "pyramidkv": "tab:cyan", "dynamickv": "tab:purple", "adakv": "tab:orange"}
BF_STYLE = {"dbudget": ("tab:green", "D"), "gvote": ("tab:red", "^")}
# a policy added to the table plots without a hand-picked style
FIXED_STYLE.update({p: "black" for p in FIXED if p not in FIXED_STYLE})
BF_STYLE.update({p: ("black", "s") for p in ADAPTIVE if p not in BF_STYLE})


def f(x, fmt="{:.3f}"):
    return "–" if x is None else fmt.format(x)


def frontier_best(points, kept, better):
    """Best value among fixed-budget points that keep no more than `kept` (+0.5 % slack)."""
    cand = [v for k, v in points if k is not None and v is not None and k <= kept + 0.005]
    return (max(cand) if better == "max" else min(cand)) if cand else None


def targets(s):
    """The project targets, judged on the data at hand: (target, verdict, evidence)."""
    tasks = {(t["mode"], t["label"]): t for t in s["tasks"]}
    fid = {x["label"]: x for x in s["fidelity"]}
    out = []

    def acc(mode, label):
        t = tasks.get((mode, label))
        return t["accuracy"] if t else None

    full_acc = {m: acc(m, "none") for m in ("aware", "agnostic")}

    # dbudget: frees >= 25 % with identical retrieval and top-1 >= 99 %
    rows = []
    for lab in sorted({t["label"] for t in s["tasks"] if t["policy"] == "dbudget"} | {x["label"] for x in s["fidelity"] if x["policy"] == "dbudget"}):
        aw, ag, fi = tasks.get(("aware", lab)), tasks.get(("agnostic", lab)), fid.get(lab)
        freed = 1 - aw["kept_fraction"] if aw else None
        same = aw is not None and aw["same_score"] == 1.0 and aw["agreement"] == 1.0
        top1 = fi["top1"] if fi else None
        ok = freed is not None and freed >= 0.25 and same and top1 is not None and top1 >= 0.99
        rows.append(ok)
        out.append((f"dbudget frees >= 25 % with identical retrieval and top-1 >= 99 % ({lab})", "HOLDS" if ok else "FAILS",
                    f"aware: freed {f(freed, '{:.0%}')}, same score {f(aw and aw['same_score'])}, agreement {f(aw and aw['agreement'])}; "
                    f"agnostic agreement {f(ag and ag['agreement'])}; teacher-forced top-1 {f(top1)} (kept {f(fi and fi['kept_fraction'])})"
                    + (f", {f(fi['top1_confident'])} where the full cache is sure (p1 - p2 >= 0.1)" if fi and "top1_confident" in fi else "")))
    # gvote: frees >= 50 % with <= 1 point accuracy loss
    for lab in sorted({t["label"] for t in s["tasks"] if t["policy"] == "gvote"}):
        for mode in ("aware", "agnostic"):
            t = tasks.get((mode, lab))
            if not t or full_acc[mode] is None:
                continue
            freed = 1 - t["kept_fraction"]
            loss = (full_acc[mode] - t["accuracy"]) * 100
            ok = freed >= 0.5 and loss <= 1.0
            out.append((f"gvote frees >= 50 % with <= 1 point accuracy loss ({lab}, {mode})", "HOLDS" if ok else "FAILS",
                        f"freed {freed:.0%}, accuracy {t['accuracy']:.3f} vs full {full_acc[mode]:.3f} ({loss:+.1f} points lost)"))
    # adakv / dynamickv >= snapkv at equal kept fraction
    for pol in ("adakv", "dynamickv"):
        ev = []
        ok = True
        for t in s["tasks"]:
            if t["policy"] != pol or t["mode"] != "aware":
                continue
            r = t["label"].split(" ", 1)[1]
            sn = tasks.get(("aware", "snapkv " + r))
            fp, fs = fid.get(t["label"]), fid.get("snapkv " + r)
            if not sn:
                continue
            a_ok = t["accuracy"] >= sn["accuracy"]
            k_ok = fp is None or fs is None or fp["kl_mean"] <= fs["kl_mean"] * 1.05
            ok = ok and a_ok and k_ok
            ev.append(f"{r}: acc {t['accuracy']:.3f} vs {sn['accuracy']:.3f}" +
                      (f", KL {fp['kl_mean']:.4f} vs {fs['kl_mean']:.4f}" if fp and fs else ""))
        if ev:
            out.append((f"{pol} >= snapkv at equal kept fraction (accuracy, and KL within 5 %)", "HOLDS" if ok else "FAILS", "; ".join(ev)))
    # budget-free on or above the fixed frontier
    for mode in ("aware",):
        fixed = [(t["kept_fraction"], t["accuracy"]) for t in s["tasks"] if t["mode"] == mode and not t["budget_free"]]
        # the noise-floor control (ratio=0) evicts nothing: it is no point of the frontier
        fixed_kl = [(x["kept_fraction"], x["kl_mean"]) for x in s["fidelity"]
                    if not x["budget_free"] and x["label"] != "streaming ratio=0"]
        for t in s["tasks"]:
            if t["mode"] != mode or t["policy"] not in ADAPTIVE:
                continue
            best = frontier_best(fixed, t["kept_fraction"], "max")
            fx = fid.get(t["label"])
            best_kl = frontier_best(fixed_kl, fx["kept_fraction"], "min") if fx else None
            a_ok = best is None or t["accuracy"] >= best
            k_ok = fx is None or best_kl is None or fx["kl_mean"] <= best_kl
            out.append((f"{t['label']} on or above the fixed frontier", "HOLDS" if a_ok and k_ok else "FAILS",
                        f"kept {t['kept_fraction']:.3f}: accuracy {t['accuracy']:.3f} vs best fixed at <= that kept {f(best)}; "
                        + (f"KL {fx['kl_mean']:.4f} (kept {fx['kept_fraction']:.3f}) vs best fixed {f(best_kl, '{:.4f}')}" if fx else "no KL run")))
    return out


def markdown(s, title="# kvcompress evaluation results", extras=True):
    """RESULTS.md; extras=False (the 8K run, LONG.md): no plots and no benchmark section."""
    m = s["meta"]
    lines = [title, "",
             f"Generated by `python3 eval/run.py --preset {m['preset']}` and `python3 eval/report.py` on {m['date']}.", "",
             f"- model: {m['model']}" + (" (30 layers, 9 heads, 3 KV heads)" if m["model"].startswith("SmolLM2") else "") +
             f", KV cache type {m['cache_type']}, "
             f"llama.cpp pin {m['llama_cpp']} + patches/",
             f"- machine: {m['machine']}, `-t {m['threads']}`, CPU backend",
             f"- tasks: {', '.join(m['tasks'])}; target lengths {', '.join(map(str, m['lengths']))} tokens; "
             f"depths {', '.join(f'{d:g}' for d in m['depths'])}; seeds {', '.join(map(str, m['seeds']))}",
             f"- teacher-forced fidelity: prose contexts of {', '.join(map(str, m['fidelity_contexts']))} tokens, "
             f"continuation {m['fidelity_continuation']} tokens fed one at a time through both caches",
             f"- jobs: {m['jobs_done']}/{m['jobs_total']}" + ("" if m["complete"] else " (**incomplete run**)") +
             f", {m.get('model_s', '?')} s of model time" + (f", {m['wall_s']} s wall" if m.get("wall_s") else ""), "",
             "Every score is relative to the full cache (`none`) on the same input. **kept** = cells held after the "
             "prompt / prompt tokens; **acc** = expected answer found (`tasks.correct`); **agree** = same answer "
             "(first sentence of the greedy output) as the full cache; aware = question inside the prompt when the "
             "policy runs, agnostic = context compressed first, question appended (the policy runs again at its end). "
             "TF = teacher-forced continuation: the policy runs after the context and again every `interval` (32) "
             "tokens, so **kept (TF)** is cells held / tokens seen averaged over the continuation and **kept (TF end)** "
             "the value after the last token. KL = mean KL(p_full ‖ p_policy) per token, p99/max over tokens, "
             "top-1 = argmax agreement; **top-1 (sure)** the same on the positions where the full cache's p1 − p2 ≥ 0.1 "
             "(the share of such positions is given below the table), **flip p1−p2** the full cache's median margin where "
             "top-1 differs (small = a flip between near-equal tokens); Δp = |p_full − p_policy| of the true next token. "
             "`streaming ratio=0` evicts nothing: it measures the noise floor of the hook (must be exactly 0).", "",
             "| policy | kept (aware) | acc | agree | kept (agn.) | acc | agree | kept (TF) | kept (TF end) | KL mean | KL p99 | KL max | top-1 | top-1 (sure) | flip p1−p2 | mean abs Δp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tasks = {(t["mode"], t["label"]): t for t in s["tasks"]}
    fid = {x["label"]: x for x in s["fidelity"]}
    labels = []
    for t in s["tasks"] + s["fidelity"]:
        if t["label"] not in labels:
            labels.append(t["label"])
    for lab in labels:
        aw, ag, fi = tasks.get(("aware", lab)), tasks.get(("agnostic", lab)), fid.get(lab)
        if lab == "none":
            fi = dict(kept_fraction=1.0, kept_end=1.0, kl_mean=0.0, kl_p99=0.0, kl_max=0.0, top1=1.0, top1_confident=1.0,
                      dp_mean=0.0)
        row = [f"`{lab}`"]
        for t in (aw, ag):
            row += [f(t and t["kept_fraction"]), f(t and t["accuracy"], "{:.2f}"), f(t and t["agreement"], "{:.2f}")]
        row += [f(fi and fi["kept_fraction"]), f(fi and fi.get("kept_end")), f(fi and fi["kl_mean"], "{:.4f}"), f(fi and fi["kl_p99"], "{:.3f}"),
                f(fi and fi["kl_max"], "{:.3f}"), f(fi and fi["top1"]), f(fi and fi.get("top1_confident")),
                f(fi.get("flip_margin_median") if fi and fi["top1"] < 1 else None, "{:.3f}"), f(fi and fi["dp_mean"], "{:.4f}")]
        lines.append("| " + " | ".join(row) + " |")
    shares = [x["confident_share"] for x in s["fidelity"] if "confident_share" in x]
    if shares:
        lines += ["", f"The full cache is sure of its next token (p1 − p2 ≥ 0.1) on {shares[0]:.0%} of the "
                  "teacher-forced positions; on the others two tokens are within 0.1 of each other and "
                  "a small change of the logits can swap the argmax."]
    n_inst = {t["mode"]: t["n"] for t in s["tasks"] if t["label"] == "none"}
    inst = m.get("instances", {})
    lines += ["", f"Instances per setting: aware {n_inst.get('aware', 0)}, agnostic {n_inst.get('agnostic', 0)}; "
              "with so few instances one miss moves accuracy by 1/n."]
    for mode in ("aware", "agnostic"):
        if inst.get(mode) and len(inst[mode]) <= 16:
            lines.append(f"{mode}: {', '.join('`' + i + '`' for i in inst[mode])}.")
    lines += right_answers(s)
    lines += breakdown(s)
    lines += ["", "## Project targets", "",
              "| target | verdict | evidence |", "|---|---|---|"]
    for name, verdict, ev in targets(s):
        lines.append(f"| {name} | **{verdict}** | {ev} |")
    if s.get("checks"):
        lines += ["", "## Checks of the run (eval/run.py)", ""]
        for c in s["checks"]:
            lines.append(f"- {'PASS' if c['ok'] else 'FAIL'}: {c['name']} ({c['detail']})")
    if not extras:
        return "\n".join(lines)
    long_md = long_summary(Path(ROOT / "results"))
    if long_md:
        lines += ["", "## 8K prompts", ""] + long_md
    two = models_md(Path(ROOT / "results"))
    if two:
        lines += ["", "## Two models: SmolLM2-135M and gemma3-270m", "",
                  "The table at the top is the full preset's 35 settings on SmolLM2 as last recorded (its `gvote` "
                  "row is the default of that run, see its commit). Below: the full preset's grid at today's "
                  "defaults on both models, then smaller runs, each with its own command and file (`make eval` "
                  "runs all 35 settings on both models: hours on 2 cores).", ""] + two
    lines += ["", "## Plots", "", "![accuracy vs kept fraction](accuracy-vs-kept.png)", "",
              "![KL vs kept fraction](kl-vs-kept.png)", ""]
    if layer_rows(s):
        lines += ["![kept fraction per layer](layer-kept.png)", ""]
    else:
        lines += ["No per-layer plot: with the default token granularity every layer keeps the same cells "
                  "(cells are shared across layers in llama.cpp), so the per-layer kept fraction is flat. The per-layer "
                  "and per-head sets (`granularity=layer|head`) are compared in [GRANULARITY.md](GRANULARITY.md), "
                  "with a per-layer heatmap.", ""]
    lines += benchmarks(Path(ROOT / "results"))
    return "\n".join(lines)


def right_counts(s, mode, label, tokens=None):
    """(same answer, instances) over the instances where the full cache's answer is correct: a wrong
    answer of the full cache is a weak reference (two wrong answers differ for any reason). With
    `tokens`, only the instances at those prompt lengths."""
    t = {(x["mode"], x["label"]): x for x in s["tasks"]}
    full, pol = t.get((mode, "none")), t.get((mode, label))
    if not full or not pol:
        return None
    right = {p["instance"] for p in subset(full, tokens) if p["correct"]}
    ps = [p for p in subset(pol, tokens) if p["instance"] in right]
    return sum(p["agree"] for p in ps), len(ps)


def subset(t, tokens=None):
    """A task row's instances at the given prompt lengths (None: all)."""
    return [p for p in t["instances"] if tokens is None or p["tokens"] in tokens]


def right_answers(s):
    labels = [x["label"] for x in s["tasks"] if x["mode"] == "aware" and x["label"] != "none"]
    rows = []
    for lab in labels:
        cells = []
        for mode in ("aware", "agnostic"):
            c = right_counts(s, mode, lab)
            cells.append(f"{c[0]}/{c[1]}" if c else "–")
        rows.append(f"| `{lab}` | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Where the full cache answers correctly (its wrong answers are a weak reference), answers "
            "identical to it:", "", "| setting | aware | agnostic |", "|---|---|---|"] + rows


MODEL_TAGS = (("SmolLM2-135M", ""), ("gemma3-270m", "-gemma3"))


FULL_DEFAULTS = "summary-full-defaults"


def freed_at(t, tokens):
    """1 - the mean kept fraction of a task row's instances at `tokens` (None when there are none)."""
    ks = [p["kept"] for p in subset(t, tokens)] if t else []
    return 1 - sum(ks) / len(ks) if ks else None


def issue16_targets(s):
    """Issue 16's targets on one model's full-preset run: (target, verdict, evidence). Each is judged
    on the instances of the lengths it names, against the full cache on the same instances."""
    out = []
    fid = {x["label"]: x for x in s["fidelity"]}
    t = {(x["mode"], x["label"]): x for x in s["tasks"]}
    labels = [x["label"] for x in s["tasks"] if x["mode"] == "aware" and x["budget_free"] and x["label"] != "none"]
    mid = (2048, 4096)
    for lab in labels:
        freed = freed_at(t.get(("agnostic", lab)), mid)
        same, n = right_counts(s, "agnostic", lab, mid) or (0, 0)
        ok = freed is not None and n > 0 and freed >= 0.35 and same >= 0.97 * n
        out.append((f"question-agnostic 2K-4K: >= 35 % freed, >= 97 % identical where the full cache is right (`{lab}`)",
                    "HOLDS" if ok else "FAILS", f"freed {f(freed, '{:.1%}')}, {same}/{n} identical"))
    # the target is the default's; a setting with overrides is judged the same way as a candidate default
    for lab in labels:
        freed = freed_at(t.get(("aware", lab)), mid)
        same, n = right_counts(s, "aware", lab, mid) or (0, 0)
        kl = fid[lab]["kl_mean"] if lab in fid else None
        ok = freed is not None and freed >= 0.40 and same == n and kl is not None and kl <= 0.03
        which = "the default" if " " not in lab else "a candidate default, not today's"
        out.append((f"question-aware 2K-4K at the default: >= 40 % freed, identical where right, KL <= 0.03 (`{lab}`: {which})",
                    "HOLDS" if ok else "FAILS", f"freed {f(freed, '{:.1%}')}, {same}/{n} identical, "
                    f"teacher-forced KL {f(kl, '{:.4f}')} (1K-4K contexts)"))
    if ("aware", "gvote") in t:
        freed = freed_at(t[("aware", "gvote")], (2048,))
        g, r = subset(t[("aware", "gvote")], (2048,)), {p["instance"]: p for p in subset(t[("aware", "none")], (2048,))}
        both = [p for p in g if p["instance"] in r]
        loss = 100 * (sum(r[p["instance"]]["correct"] for p in both) - sum(p["correct"] for p in both)) / len(both) if both else None
        ok = freed is not None and loss is not None and freed >= 0.30 and loss <= 1.0
        out.append(("`gvote` default at 2K question-aware: >= 30 % freed, <= 1 point accuracy loss", "HOLDS" if ok else "FAILS",
                    f"freed {f(freed, '{:.1%}')}, {f(loss, '{:+.1f}')} points lost over {len(both)} instances"))
    return out


def full_defaults_md(res):
    """The full preset at the defaults, both models side by side, and issue 16's targets on each."""
    sm = {name: load_json(res / f"{FULL_DEFAULTS}{tag}.json") for name, tag in MODEL_TAGS}
    if not any(sm.values()):
        return []
    lines = ["### The full preset at the defaults (`eval/run.py --preset full --settings dbudget --settings gvote "
             "--settings 'dbudget ranker=recon threshold=0.05' --settings 'snapkv ratio=0.5' --settings 'dbudget "
             "measure=mass threshold=0.07' --settings 'dbudget measure=mass threshold=0.2' ...`; SnapKV at half "
             "the cache is the fixed-ratio baseline, the `measure=mass` rows are candidates for dbudget's default)", ""]
    for name, tag in MODEL_TAGS:
        x = sm[name]
        lines.append(f"- {name}: " + (f"`results/{FULL_DEFAULTS}{tag}.json`, {x['meta']['model']}, {x['meta']['date']}, "
                                      f"{x['meta']['jobs_done']}/{x['meta']['jobs_total']} jobs; command and notes in its `meta`"
                                      if x else f"**not measured** (`results/{FULL_DEFAULTS}{tag}.json` missing)"))
    lines += ["", "Same answer as the full cache where the full cache is right (*same*), kept fraction (*kept*), over "
              "the 1K, 2K and 4K instances; teacher-forced KL and kept fraction over the 1K/2K/4K prose continuations.", "",
              "| setting | " + " | ".join(f"{n}: kept aware | same aware | kept agn. | same agn. | KL (TF) | kept (TF)"
                                         for n, _ in MODEL_TAGS) + " |",
              "|---|" + "---|---|---|---|---|---|" * len(MODEL_TAGS)]
    labels = []
    for x in sm.values():
        for t in (x or {}).get("tasks", []):
            if t["mode"] == "aware" and t["label"] not in labels:
                labels.append(t["label"])
    for lab in labels:
        row = [f"`{lab}`"]
        for name, _ in MODEL_TAGS:
            x = sm[name] or {"tasks": [], "fidelity": []}
            t = {(y["mode"], y["label"]): y for y in x["tasks"]}
            fi = {y["label"]: y for y in x["fidelity"]}.get(lab)
            for mode in ("aware", "agnostic"):
                rc = right_counts(x, mode, lab) if (mode, lab) in t else None
                row += [f(t.get((mode, lab)) and t[(mode, lab)]["kept_fraction"]), f"{rc[0]}/{rc[1]}" if rc else "–"]
            row += [f(fi and fi["kl_mean"], "{:.4f}") if lab != "none" else "0", f(fi and fi["kept_prefill"]) if lab != "none" else "1.000"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Issue 16's targets, judged on these runs:", "", "| model | target | verdict | evidence |", "|---|---|---|---|"]
    for name, _ in MODEL_TAGS:
        if sm[name]:
            for tgt, verdict, ev in issue16_targets(sm[name]):
                lines.append(f"| {name} | {tgt} | **{verdict}** | {ev} |")
    return lines + [""]


def models_md(res):
    """RESULTS.md's two-model section: each summary that exists for both models (or one of them)
    side by side, then the chat flow (eval/run.py --flow chat). Missing files are named, not hidden."""
    lines = full_defaults_md(res)
    for stem, what in (("summary-tune2k-gvote-support", "question-aware 2K, gvote's default since issue 16 and its knobs "
                        "(`eval/run.py --preset tune2k --settings gvote --settings 'gvote support=0' ...`)"),
                       ("summary-tune2k-sweep", "question-aware 2K after patch 0014 (`eval/run.py --preset tune2k --settings "
                        "dbudget --settings gvote ...`; its gvote rows are the old default)"),
                       ("summary-quick", "CI's quick grid at 1K (`eval/run.py --preset quick --record`)")):
        sm = {name: load_json(res / f"{stem}{tag}.json") for name, tag in MODEL_TAGS}
        if not any(sm.values()):
            continue
        lines += [f"### {what}", ""]
        for name, tag in MODEL_TAGS:
            x = sm[name]
            lines.append(f"- {name}: " + (f"`results/{stem}{tag}.json`, {x['meta']['model']}, {x['meta']['date']}, "
                                          f"{len(x['meta']['instances'].get('aware', []))} instances"
                                          if x else f"**not measured** (`results/{stem}{tag}.json` missing)"))
        labels = []
        for x in sm.values():
            for t in (x or {}).get("tasks", []):
                if t["mode"] == "aware" and t["label"] not in labels:
                    labels.append(t["label"])
        lines += ["", "| setting (aware) | " + " | ".join(f"{n}: kept | same where right | KL (TF) | kept (TF)" for n, _ in MODEL_TAGS) + " |",
                  "|---|" + "---|---|---|---|" * len(MODEL_TAGS)]
        for lab in labels:
            row = [f"`{lab}`"]
            for name, _ in MODEL_TAGS:
                x = sm[name]
                t = {(y["mode"], y["label"]): y for y in (x or {}).get("tasks", [])}.get(("aware", lab))
                fi = {y["label"]: y for y in (x or {}).get("fidelity", [])}.get(lab)
                rc = right_counts(x, "aware", lab) if t else None
                row += [f(t and t["kept_fraction"]), f"{rc[0]}/{rc[1]}" if rc else "–",
                        f(fi and fi["kl_mean"], "{:.4f}"), f(fi and fi["kept_prefill"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    chats = {name: load_json(res / f"chat{tag}.json") for name, tag in MODEL_TAGS}
    if any(chats.values()):
        lines += ["### Chat flow through llama-server (`eval/run.py --flow chat`)", "",
                  "Turn 1: context + a question about one special magic number (fresh prefill, the policy runs at its "
                  "end); turn 2: turn 1's tokens, its answer and a question about the pass key hidden in the same prose, sent with "
                  "`cache_prompt` so the server extends the compressed cache: the second question is answered from a "
                  "context compressed before it existed (and compressed again at turn 2's end). Reference: the full "
                  "cache on the same turn-2 tokens. *kept after turn 2*: cells held after turn 2's answer / turn-2 prompt "
                  "tokens (above 1 when nothing is evicted: the answer's cells). *reused*: turn 2's `cache_n` covered "
                  "turn 1's prompt.", ""]
        for name, tag in MODEL_TAGS:
            x = chats[name]
            lines.append(f"- {name}: " + (f"`results/chat{tag}.json`, {x['meta']['model']}, {x['meta']['date']}, "
                                          f"`{x['meta']['command']}`" if x else f"**not measured** (`results/chat{tag}.json` missing)"))
        lines += ["", "| setting | " + " | ".join(f"{n}: turn-2 same where right | right | kept after turn 2 | reused" for n, _ in MODEL_TAGS) + " |",
                  "|---|" + "---|---|---|---|" * len(MODEL_TAGS)]
        labels = []
        for x in chats.values():
            for st in (x or {}).get("settings", []):
                if st["label"] not in labels:
                    labels.append(st["label"])
        for lab in labels:
            row = [f"`{lab}`"]
            for name, _ in MODEL_TAGS:
                st = {y["label"]: y for y in (chats[name] or {}).get("settings", [])}.get(lab)
                row += ([f"{st['same2_where_right']}/{st['full_right2']}", f"{st['correct2']}/{st['n']}", f(st["kept2"]),
                         f"{st['reused']}/{st['n']}"] if st else ["–"] * 4)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def long_summary(res):
    """A paragraph on results/summary-long.json (eval/run.py --preset long) for RESULTS.md."""
    s = load_json(res / "summary-long.json")
    if not s:
        return []
    t = {(x["mode"], x["label"]): x for x in s["tasks"]}
    fid = {x["label"]: x for x in s["fidelity"]}
    parts = []
    for lab in DEFAULT_BF:
        aw, ag, fi = t.get(("aware", lab)), t.get(("agnostic", lab)), fid.get(lab)
        if aw and ag:
            ra, rg = right_counts(s, "aware", lab), right_counts(s, "agnostic", lab)
            parts.append(f"`{lab}` frees {1 - aw['kept_fraction']:.0%} of an 8K prompt with "
                         f"{round(aw['agreement'] * aw['n'])}/{aw['n']} answers identical (aware; {ra[0]}/{ra[1]} where "
                         f"the full cache is right), {round(ag['agreement'] * ag['n'])}/{ag['n']} agnostic "
                         f"({rg[0]}/{rg[1]}) at kept {ag['kept_fraction']:.2f}"
                         + (f", teacher-forced top-1 {fi['top1']:.3f} ({f(fi.get('top1_confident'))} where sure), "
                            f"KL {fi['kl_mean']:.4f}" if fi else ""))
    full = next((x for x in s["tasks"] if x["mode"] == "aware" and x["label"] == "none"), None)
    return [f"The same tasks at {', '.join(map(str, s['meta']['lengths']))} tokens, a smaller setting set "
            f"(the full cache answers {full['accuracy']:.0%} of them correctly there) "
            f"(`eval/run.py --preset long`): " + "; ".join(parts) + ". Full table, targets and checks: "
            "[LONG.md](LONG.md)."]


BREAKDOWN = ["none", "dbudget", "dbudget threshold=0.02", "dbudget threshold=0.05", "gvote", "gvote quorum=0.5",
             "gvote quorum=0.75", "snapkv ratio=0.5", "adakv ratio=0.5", "dynamickv ratio=0.5",
             "pyramidkv ratio=0.5", "h2o ratio=0.5", "streaming ratio=0.5"]


def breakdown(s):
    """Answers equal to the full cache's and kept fraction, by prompt length and by task, for the main
    settings (only when the run has more than one length or task)."""
    rows = [t for t in s["tasks"] if t["label"] in BREAKDOWN]
    if not rows or "tokens" not in rows[0]["instances"][0]:
        return []
    lengths = sorted({p["tokens"] for t in rows for p in t["instances"]})
    task_names = sorted({p["task"] for t in rows for p in t["instances"]})
    if len(lengths) < 2 and len(task_names) < 2:
        return []
    out = ["", "### By prompt length and task", "",
           "Answers equal to the full cache's (agree), as a fraction of the instances, and kept fraction, "
           "for the main settings; **aware / agnostic**.", ""]
    cols = [f"{n} tok" for n in lengths] + task_names
    out += ["| setting | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    by = {(t["mode"], t["label"]): t for t in rows}
    for lab in BREAKDOWN:
        cells = []
        for key, val in [("tokens", n) for n in lengths] + [("task", k) for k in task_names]:
            part = []
            for mode in ("aware", "agnostic"):
                t = by.get((mode, lab))
                ps = [p for p in t["instances"] if p[key] == val] if t else []
                if ps:
                    ag = sum(p["agree"] for p in ps) / len(ps)
                    kept = sum(p["kept"] for p in ps) / len(ps)
                    part.append(f"{ag:.2f} ({kept:.2f})")
                else:
                    part.append("–")
            cells.append(" / ".join(part))
        if any(c != "– / –" for c in cells):
            out.append(f"| `{lab}` | " + " | ".join(cells) + " |")
    out += ["", "Each cell: agree (kept), aware / agnostic.", ""]
    return out


def load_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def benchmarks(res):
    """Markdown for results/bench-{prefill,capacity,parallel,plan}.json (each optional)."""
    lines = []
    pre, cap, par, plan = (load_json(res / f"bench-{n}.json") for n in ("prefill", "capacity", "parallel", "plan"))
    if not (pre or cap or par or plan):
        return lines
    lines += ["## Benchmarks (`make bench`)", ""]
    if pre and "lengths" in pre:
        lines += [f"Prefill and decode of the patched llama.cpp against `none` on the same passkey prompt "
                  f"(`scripts/bench-prefill.sh`, `-t {pre['threads']}`, {pre['machine']}, runs interleaved, "
                  f"medians; load average at the end {', '.join(f'{x:.1f}' for x in pre['load_avg_end'])}). "
                  "The ratio is what to read: both sides ran under the same load.", "",
                  "| prompt tokens | policy | reps | prefill ms | prefill time / none | decode tok/s | decode time / none | cells held | answer |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, e in pre["lengths"].items():
            for pol, r in e["policies"].items():
                lines.append(f"| {e['n_prompt']} | `{pol}` | {e['reps']} | {r['prefill_ms_median']:.0f} | "
                             f"{r['prefill_ratio_vs_none']:.3f} | {r['decode_tok_s_median']:.1f} | "
                             f"{r['decode_ratio_vs_none']:.3f} | {r['cells_held']} | {r['answer'].strip()[:24]!r} |")
        lines += ["", "![prefill overhead](overhead.png)", ""]
    if cap:
        lp = cap["longest_passkey"]
        lines += [f"Longest passkey prompt (depth 0.5) still answered with `-c {lp['ctx']}` "
                  f"(`scripts/bench-capacity.py`, ladder {', '.join(map(str, lp['lengths']))} tokens, stops at the first miss; "
                  "the full cache with a cache that holds the prompt is the reference at each length):", "",
                  "| policy | longest prompt kept | runs (tokens: answer) |", "|---|---|---|"]
        ref = ", ".join(f"{n}: {'ok' if r['correct'] else 'miss'}" for n, r in lp["reference"].items())
        lines.append(f"| `none` (cache sized to the prompt) | reference | {ref} |")
        for pol, r in lp["policies"].items():
            runs = ", ".join(f"{x['tokens']}: {'ok' if x['correct'] else 'miss'}" + (f" ({x['error']})" if x.get("error") else "")
                             for x in r["runs"])
            lines.append(f"| `{pol}` | {r['longest_prompt_with_passkey']} | {runs} |")
        dd = cap["decode_at_depth"]
        lines += ["", f"Decode speed at depth with a cache sized to the emergent budget ({dd['tokens']}-token prompt, "
                  f"{dd['n_predict']} tokens decoded, single runs):", "",
                  "| policy | -c | cells held | decode tok/s | tok/s / none | same answer |", "|---|---|---|---|---|---|"]
        nb = dd["none"]
        lines.append(f"| `none` | {nb['ctx']} | {nb.get('cells_held')} | {nb.get('decode_tok_s') or 0:.1f} | 1.000 | – |")
        for pol, r in dd["policies"].items():
            if "error" in r:
                lines.append(f"| `{pol}` | – | – | error: {r['error']} | – | – |")
                continue
            lines.append(f"| `{pol}` | {r['ctx']} | {r['cells_held']} | {r['decode_tok_s'] or 0:.1f} | "
                         f"{r.get('decode_tok_s_ratio_vs_none', float('nan')):.3f} | {r.get('same_answer_as_none')} |")
        lines.append("")
    dec = load_json(res / "bench-decode.json")
    if dec and "decode_at_depth" in dec:
        dd = dec["decode_at_depth"]
        lines += [f"Decode speed at {dd['tokens_target']}-token depth with `-c` sized to each policy's emergent budget "
                  f"(`{dec.get('command', 'scripts/bench-capacity.py')}`: {dd['reps']} interleaved repetitions, "
                  f"{dd['n_predict']} tokens, `-t {dec['threads']}`, medians; load average "
                  f"{', '.join(f'{x:.1f}' for x in dec['load_avg_start'])} at the start, per run in the JSON):", "",
                  "| policy | -c | cells held | median tok/s | ratio of medians | median per-rep ratio | answers = none | key |",
                  "|---|---|---|---|---|---|---|---|"]
        for pol, r in dd["summary"].items():
            fmt = lambda x, f: f.format(x) if x is not None else "–"  # noqa: E731
            lines.append(f"| `{pol}` | {r['ctx']} | {r['cells_held']} | {fmt(r['decode_tok_s_median'], '{:.2f}')} | "
                         f"{fmt(r['ratio_of_medians_vs_none'], '{:.2f}')} | {fmt(r['median_per_rep_ratio_vs_none'], '{:.2f}')} | "
                         f"{r['answers_equal_none']} | {r['answer_has_key']} |")
        lines.append("")
    if par:
        lines += parallel_lines(par)
    if plan:
        lines += [f"Library plan time (`benches/plan.rs`, synthetic K/Q, {plan['threads']} threads, "
                  f"load average {plan['machine'].get('loadavg_before', '?')} before / {plan['machine'].get('loadavg_after', '?')} after):", "",
                  "| shape | policy | tokens | median ms |", "|---|---|---|---|"]
        for r in plan["results"]:
            lines.append(f"| {r['shape']['name']} | `{r['policy']}` | {r['shape']['n_tokens']} | {r['median_ms']:.1f} |")
        lines.append("")
    return lines


def parallel_lines(par):
    """Markdown for results/bench-parallel.json (scripts/bench-parallel.py)."""
    su = par["setup"]
    resident = su.get("mode") == "resident"
    how = ("phase 1 prefills the N prompts at once (each without its last word, nothing generated, one slot each); "
           "phase 2 sends the N full prompts at once and each slot answers from its resident compressed prefix, "
           "so every answer is produced while all N sequences share the cache" if resident else
           "the N prompts are sent at once and each generates until every prompt is prefilled")
    n_prompt = next((q["n_prompt"] for r in par["policies"].values() for x in r["runs"] for q in x["requests"]
                     if q.get("n_prompt")), f"~{su.get('prompt_tokens_target', '?')}")
    what = (f"N prompts cycling {', '.join(su['mix'])} (task:tokens)" if su.get("mix") else f"N prompts of {n_prompt} tokens")
    ok = ("every answer is identical to a fresh full-cache server's on the same prompt" if su.get("mix") else
          "every request answers its passkey")
    lines = [f"Parallel requests in one shared cache (`scripts/bench-parallel.py`: `{su['flags']}`, "
             f"{par['machine']}; {what}, depth {su['depth']:g}, "
             f"different keys; {how}). " + (f"{par['note']}. " if par.get("note") else "")
             + f"N passes when {ok} and the server logs no "
             "context-exceeded error, slot purge (an idle slot's cells dropped for room) or policy failure; "
             f"ladder {', '.join(map(str, su['ladder']))}, stops at the first failure"
             + (", then the N in between are searched" if su.get("bisect") else "") + ". Cells held are "
             "`timings.kv_policy.cells_held` of the responses"
             + (" (after each sequence's own prefill, and at its answer)" if resident else ", at the end of each generation")
             + ". A prompt that arrives when the cache is nearly full is evicted by the policy hook down to the "
             "free cells, whatever its budget (sequences not in the decode call are never touched), so the last "
             "sequences of a passing N hold fewer cells, and a failing N is one where such a sequence lost its key:", "",
             "| policy | max N, all answers | cells held / seq at max N"
             + (" after own prefill (min–max) | at answer, all N together |" if resident else " (min–max) | held together |")
             + " runs (N: answers identical) |", "|---|---|---|---|---|"]
    for pol, r in par["policies"].items():
        best = next((x for x in r["runs"] if x["n"] == r["max_n_all_passkeys"]), None)
        held, total = "–", "–"
        if best and best["cells_held_per_seq_mean"] is not None:
            if resident:
                pre = [q["cells_held_after_prefill"] for q in best["requests"] if q.get("cells_held_after_prefill") is not None]
                held = f"{round(sum(pre) / len(pre))} ({min(pre)}–{max(pre)})"
                total = f"{best['cells_held_per_seq_mean']} / seq, {best['cells_held_total']} in all"
            else:
                held = f"{best['cells_held_per_seq_mean']} ({best['cells_held_per_seq_min']}–{best['cells_held_per_seq_max']})"
                total = best["cells_held_total"]
        maxn = f"{r['max_n_all_passkeys']}" + (" (ladder end)" if r["ladder_exhausted"] else "")
        if r.get("stopped_by_time_budget_before_n"):
            maxn += f" (time budget: N={r['stopped_by_time_budget_before_n']} not run)"
        runs = []
        for x in r["runs"]:
            why = [k.replace("_", " ") for k, v in x["log_failures"].items() if v]
            pre = [q["cells_held_after_prefill"] for q in x["requests"] if q.get("cells_held_after_prefill") is not None]
            if resident and not x["ok"] and not why and pre:
                why = [f"fewest cells after a prefill: {min(pre)}"]
            keys = (f", key in {x['n_key_retrieved']}/{x['n']}" if "n_key_retrieved" in x and x["n_key_retrieved"] != x["n_ok"]
                    else "")
            runs.append(f"{x['n']}: {x['n_ok']}/{x['n']}{keys}" + (f" ({', '.join(why)})" if why else ""))
        lines.append(f"| `{pol}` | {maxn} | {held} | {total} | {', '.join(runs)} |")
    lines.append("")
    return lines


def overhead_plot(res, out, plt):
    pre = load_json(res / "bench-prefill.json")
    if not pre or "lengths" not in pre:
        return None
    lengths = list(pre["lengths"])
    pols = [p for p in pre["lengths"][lengths[0]]["policies"] if p != "none"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = 0.8 / max(1, len(pols))
    for i, pol in enumerate(pols):
        ys = [pre["lengths"][n]["policies"].get(pol, {}).get("prefill_ratio_vs_none", float("nan")) for n in lengths]
        ax.bar([j + i * w for j in range(len(lengths))], ys, w, label=pol,
               color=BF_STYLE.get(pol, (FIXED_STYLE.get(pol, "tab:gray"),))[0])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + w * (len(pols) - 1) / 2 for j in range(len(lengths))], [f"{n} tok" for n in lengths])
    ax.set_ylabel("prefill time / none (median)")
    ax.set_title("prefill overhead of the policy (llama.cpp, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=110)
    plt.close(fig)
    return "overhead.png"


def layer_rows(s):
    rows = {k: v for k, v in s.get("layer_kept", {}).items() if v and max(v) - min(v) > 1e-6}
    return rows


def layer_plot(s, out, plt):
    """layer-kept.png: kept fraction per layer (rows: settings whose layers differ), a heatmap."""
    lr = layer_rows(s)
    if not lr:
        return None
    labels = list(lr)
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.8))
    im = ax.imshow([lr[k] for k in labels], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(len(next(iter(lr.values())))))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"{s['meta']['model']}: kept fraction per layer (question-aware, mean over instances)",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="cells kept / prompt tokens")
    fig.tight_layout()
    fig.savefig(out / "layer-kept.png", dpi=110)
    plt.close(fig)
    return "layer-kept.png"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib missing (pip install matplotlib); no plots", file=sys.stderr)
        return None
    return plt


def plots(s, out):
    plt = pyplot()
    if plt is None:
        return []
    written = []

    def label_points(ax, pts):
        """Tag the budget-free points, skipping one that would sit on a tag already drawn (the default
        setting often equals a sweep point); call after the axis limits are final."""
        placed = []
        for x, y, tag, c in pts:
            px, py = ax.transData.transform((x, y))
            if any(abs(px - qx) < 40 and abs(py - qy) < 10 for qx, qy in placed):
                continue
            placed.append((px, py))
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)

    def curves(ax, rows, xkey, ykey, logy=False):
        tags = []
        by = {}
        for r in rows:
            by.setdefault(r["policy"], []).append(r)
        for pol, rs in by.items():
            rs = sorted((r for r in rs if r.get(xkey) is not None and r.get(ykey) is not None), key=lambda r: r[xkey])
            if not rs:
                continue
            xs, ys = [r[xkey] for r in rs], [r[ykey] for r in rs]
            if logy:
                ys = [max(y, 1e-5) for y in ys]
            if pol == "none":
                ax.scatter(xs, ys, marker="*", s=160, color="black", zorder=5, label="none (full cache)")
            elif pol in BF_STYLE:
                c, mk = BF_STYLE[pol]
                ax.plot(xs, ys, linestyle=":", marker=mk, markersize=8, color=c, label=f"{pol} (budget-free)", zorder=4)
                # the default first, so that it keeps its tag when a sweep point coincides with it
                tags += sorted(((x, y, " ".join(r["params"]) or "default", c) for r, x, y in zip(rs, xs, ys)),
                               key=lambda t: t[2] != "default")
            else:
                ax.plot(xs, ys, marker="o", markersize=4, color=FIXED_STYLE.get(pol), label=pol, alpha=0.85)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("kept fraction (cells held / tokens seen)")
        ax.set_xlim(0, 1.03)
        ax.grid(alpha=0.3)
        return tags

    modes = [m for m in ("aware", "agnostic") if any(t["mode"] == m for t in s["tasks"])]
    if modes:
        fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            rows = [t for t in s["tasks"] if t["mode"] == mode]
            tags = curves(ax, rows, "kept_fraction", "accuracy")
            ax.set_ylabel("retrieval accuracy")
            ax.set_ylim(-0.05, 1.08)
            label_points(ax, tags)
            ax.set_title(f"question-{mode} (n={rows[0]['n']} per point)")
        axes[0][0].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"{s['meta']['model']}: accuracy vs kept fraction", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / "accuracy-vs-kept.png", dpi=110)
        plt.close(fig)
        written.append("accuracy-vs-kept.png")
    if s["fidelity"]:
        rows = [dict(x) for x in s["fidelity"] if x["params"] != ["ratio=0"]]  # the noise-floor control
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        label_points(axes[0], curves(axes[0], rows, "kept_fraction", "kl_mean", logy=True))
        axes[0].set_ylabel("mean KL(p_full || p_policy) per token")
        axes[0].set_title("teacher-forced KL (lower is better)")
        tags = curves(axes[1], rows, "kept_fraction", "top1")
        axes[1].scatter([1.0], [1.0], marker="*", s=160, color="black", zorder=5, label="none (full cache)")
        axes[1].set_ylim(top=1.005)
        label_points(axes[1], tags)
        axes[1].axhline(0.99, color="black", linestyle="--", linewidth=0.8)
        axes[1].annotate("lossless gate 0.99", (0.02, 0.99), textcoords="offset points", xytext=(0, 4), fontsize=8)
        axes[1].set_ylabel("top-1 agreement with the full cache")
        axes[1].set_title("teacher-forced top-1 agreement")
        axes[1].legend(fontsize=8, loc="lower right")
        m = s["meta"]
        fig.suptitle(f"{m['model']}: fidelity vs kept fraction ({'/'.join(map(str, m['fidelity_contexts']))}-token "
                     f"contexts, {m['fidelity_continuation']}-token continuation)", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / "kl-vs-kept.png", dpi=110)
        plt.close(fig)
        written.append("kl-vs-kept.png")
    lp = layer_plot(s, out, plt)
    if lp:
        written.append(lp)
    o = overhead_plot(ROOT / "results", out, plt)
    if o:
        written.append(o)
    return written


def granularity_md(s, raw=None):
    """results/GRANULARITY.md from `eval/run.py --preset granularity`: each policy at token and at
    layer/head granularity (re-packed), at the cells they really hold."""
    m = s["meta"]
    fid = {f["label"]: f for f in s["fidelity"]}
    tk = {t["label"]: t for t in s["tasks"] if t["mode"] == "aware"}
    lines = [
        "# Per-layer / per-head keep sets against token granularity",
        "",
        f"`python3 eval/run.py --preset granularity && python3 eval/report.py --summary "
        f"results/summary-granularity.json`: {m['model']}, {m['cache_type']} cache, llama.cpp `{m['llama_cpp']}` + "
        f"patches (0004 re-packs), {m['machine']}, {m['date']}. Question-aware answers on "
        f"{len(m['instances']['aware'])} instances ({', '.join(m['tasks'])} at {m['lengths'][0]} tokens, depths "
        f"{'/'.join(map(str, m['depths']))}); teacher-forced KL and top-1 over a {m['fidelity_continuation']}-token "
        f"continuation of a {m['fidelity_contexts'][0]}-token prose context.",
        "",
        "*held*: cells the sequence holds after the prompt / prompt tokens (the memory really used). "
        "*asked*: the mean over layers of what each layer keeps (what the policy asked for: at token "
        "granularity every layer keeps the held set; re-packed, a sequence holds the largest layer's set). "
        "*same*: answers identical to the full cache's. *KV MiB*: K+V bytes the sequence holds at the end "
        "of its answer, mean over the instances (raw/granularity.jsonl); the full cache: "
        f"{f_(kv_mib(raw, 'none'), '{:.1f}')} MiB.",
        "",
        "| setting | held | asked | same | KV MiB | KL | top-1 | held (TF) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lab, t in tk.items():
        if lab == "none":
            continue
        f = fid.get(lab, {})
        lk = s.get("layer_kept", {}).get(lab) or []
        asked = sum(lk) / len(lk) if lk else None
        lines.append(f"| `{lab}` | {t['kept_fraction']:.3f} | {f_(asked)} | {round(t['agreement'] * t['n'])}/{t['n']} | "
                     f"{f_(kv_mib(raw, lab), '{:.1f}')} | "
                     f"{f_(f.get('kl_mean'), '{:.4f}')} | {f_(f.get('top1'))} | {f_(f.get('kept_fraction'))} |")
    return "\n".join(lines)


def kv_mib(raw, label):
    xs = [r["kv_bytes_held"] for r in raw or [] if r.get("mode") == "aware" and r["tag"]["label"] == label]
    return sum(xs) / len(xs) / 2**20 if xs else None


def f_(x, fmt="{:.3f}"):
    return "–" if x is None else fmt.format(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", default=str(ROOT / "results/summary.json"))
    ap.add_argument("--out", default=str(ROOT / "results"))
    a = ap.parse_args()
    p = Path(a.summary)
    if not p.exists():
        sys.exit(f"report: {p} not found; run `python3 eval/run.py` first")
    s = json.loads(p.read_text())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if s["meta"].get("preset") == "granularity":
        rp = p.parent / "raw" / "granularity.jsonl"
        raw = [json.loads(line) for line in rp.read_text().splitlines()] if rp.exists() else None
        md = granularity_md(s, raw)
        plt = pyplot()
        if plt and layer_plot(s, out, plt):
            md += "\n\n![kept fraction per layer](layer-kept.png)\n\nRows whose layers keep different counts; " \
                  "a re-packed sequence holds the largest layer's set, which is why per-layer " \
                  "pyramidkv/dynamickv hold (almost) every cell; with granularity=head a layer's count " \
                  "is the cells any of its KV heads keeps."
        (out / "GRANULARITY.md").write_text(md + "\n")
        print(f"report: wrote {out / 'GRANULARITY.md'}")
        return
    if s["meta"].get("preset") == "long":
        title = "# kvcompress at 8K prompts"
        (out / "LONG.md").write_text(markdown(s, title, extras=False) + "\n")
        print(f"report: wrote {out / 'LONG.md'}")
        return
    written = plots(s, out)
    (out / "RESULTS.md").write_text(markdown(s) + "\n")
    print(f"report: wrote {out / 'RESULTS.md'}" + (f", {', '.join(written)}" if written else ""))


if __name__ == "__main__":
    main()

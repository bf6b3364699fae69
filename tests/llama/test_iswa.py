#!/usr/bin/env python3
"""iSWA end to end: gemma-3-270m (Q4_K_M, `scripts/llama.sh model gemma3`), -t 1, the tools' default -b/-ub.

gemma3 interleaves sliding-window layers (window 512) with global ones: 3 of its 18 layers attend to
the whole sequence. llama.cpp gives it an iSWA cache (a base cache for the global layers, an SWA
cache that drops cells leaving the window on its own); the policy sees and evicts the base cache's
cells, so `cells held`, `evicted` and `kept per layer` (3 entries) are about the global layers.

A ~1.7K-token passkey prompt (the key at 57 % depth), where gemma3's full cache finds the key.
Answers are compared with the same tool's full cache (policy none, -c 4096):

1. llama-completion, -c 896 (about half the prompt), dbudget (adaptive) and snapkv ratio=0.5
   (fixed): exit 0, no "input too long", cells held + evicted == tokens decoded (stats line and
   perf lines), the policy sees 3 layers, the answer is the full cache's.
2. decode-time eviction: -c 4096, dbudget interval=16, -n 48: runs > 1 (prompt end, then every 16
   generated tokens), more cells evicted than at the prompt end alone (interval=0), cells held +
   evicted == tokens decoded, the key in the answer.
3. llama-server (-c 4096, one slot): per-request `kv_policy` as {name, params} (snapkv ratio=0.5
   granularity=layer, re-packed) and by name ("snapkv", on the server of 4.): the full cache's
   answer, cells held + evicted == tokens decoded.
4. state save/restore of a compressed (token-granularity) sequence: kvc-run --kvc-state-roundtrip
   (llama_state_seq_get/set_data, default layout): the continuation after the restore equals the one
   before; llama-server `/slots/0?action=save|restore`: continuing after the restore equals continuing
   without it, from the restored cells. That server runs with --swa-full: at the default layout the
   saved SWA state holds only the window's cells (llama_kv_cache::state_write skips SWA-masked
   cells) and the server re-processes a restored iSWA slot from scratch ("forcing full prompt
   re-processing due to lack of cache data", cache_n 0; the same with policy none, both code paths
   are upstream's), which would make the comparison empty.
5. control: streaming tokens=64 at -c 896 must lose the key (the answer checks can fail).
"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

t_start = time.time()
c = k.Checks("test_iswa")
k.MODEL = os.environ.get("KVC_GEMMA3_MODEL", os.path.expanduser("~/.cache/kvcompress/models/gemma-3-270m-q4_k_m.gguf"))
if not os.path.exists(k.MODEL):
    c.check(False, "gemma3 model at %s (scripts/llama.sh fetch)" % k.MODEL)
    c.done()

KEY = 71942
prompt_text = k.passkey_prompt(KEY, 70, 40)      # 1745 tokens with gemma3's tokenizer
prompt = k.write_prompt("iswa-prompt.txt", prompt_text)
PER_LAYER = re.compile(r"kv-policy: seq 0: kept per layer: ([\d ]+)")
N_GLOBAL = 3
SMALL_CTX = "896"
# the cells the global layers' cache has: llama.cpp pads -c to a multiple of 256 (since patch 0011 the prompt's end
# reserves one cell for the next token instead of a ubatch, so a sequence may grow into the padding)
CACHE_CELLS = -(-int(SMALL_CTX) // 256) * 256


def completion(ctx, n_predict, *extra):
    p = k.completion(prompt, ctx, n_predict, *extra)
    st, pl = k.policy_stats(p.stderr), PER_LAYER.search(p.stderr)
    return dict(st, rc=p.returncode, text=p.stdout.strip(), log=p.stdout + p.stderr,
                layers=pl.group(1).split() if pl else [],
                decoded=st["n_prompt"] + st["n_gen"] if st["n_prompt"] >= 0 and st["n_gen"] >= 0 else -1)


# the full cache, 48 tokens: its first 8 are the reference of the -n 8 runs
ref = completion("4096", 48)
c.check(ref["rc"] == 0 and str(KEY) in ref["text"][:40],
        "llama-completion, full cache (-c 4096, none): finds the key: %r" % ref["text"][:60])


def same_answer(r):
    return r["text"] != "" and ref["text"].startswith(r["text"]) and str(KEY) in r["text"]


for policy, params in (("dbudget", []), ("snapkv", ["--kv-policy-param", "ratio=0.5"])):
    r = completion(SMALL_CTX, 8, "--kv-policy", policy, "--kv-policy-stats", *params)
    c.check(r["rc"] == 0 and "input too long" not in r["log"] and "is cut to" not in r["log"],
            "llama-completion -c %s --kv-policy %s %s: rc %d, nothing skipped or cut" % (SMALL_CTX, policy, " ".join(params[1:]), r["rc"]))
    c.check(r["n_prompt"] > 1.9 * int(SMALL_CTX) and r["evicted"] > 0 and r["held"] <= CACHE_CELLS and
            r["held"] + r["evicted"] == r["decoded"],
            "  every token went through the global layers' cache: held %d + evicted %d == decoded %d (prompt %d), runs %d"
            % (r["held"], r["evicted"], r["decoded"], r["n_prompt"], r["runs"]))
    c.check(len(r["layers"]) in (0, N_GLOBAL),
            "  the policy sees the %d global layers (kept per layer: %s)" % (N_GLOBAL, " ".join(r["layers"]) or "not printed"))
    c.check(same_answer(r), "  answer %r == the full cache's" % r["text"])

# decode-time eviction: the prompt fits, the policy runs at its end and then every 16 generated tokens;
# what it evicts at the prompt end alone: the same prompt, interval=0, -n 2
r0 = completion("4096", 2, "--kv-policy", "dbudget", "--kv-policy-param", "interval=0", "--kv-policy-stats")
r = completion("4096", 48, "--kv-policy", "dbudget", "--kv-policy-param", "interval=16", "--kv-policy-stats")
c.check(r["rc"] == 0 and r0["rc"] == 0 and r0["runs"] == 1 and r["runs"] > 1 and r["evicted"] > r0["evicted"] > 0 and
        r["held"] + r["evicted"] == r["decoded"],
        "decode-time eviction (-c 4096 dbudget interval=16 -n 48): rc %d, runs %d, held %d + evicted %d == decoded %d; "
        "evicted at the prompt end alone (interval=0): %d in %d run"
        % (r["rc"], r["runs"], r["held"], r["evicted"], r["decoded"], r0["evicted"], r0["runs"]))
c.check(str(KEY) in r["text"][:40], "  the key in the answer: %r (full cache: %s)"
        % (r["text"][:60], "same 48 tokens" if r["text"] == ref["text"] else "%r" % ref["text"][:60]))

# control: streaming keeps the sinks and the newest 64 cells of the global layers: the key must go
r = completion(SMALL_CTX, 8, "--kv-policy", "streaming", "--kv-policy-param", "tokens=64", "--kv-policy-stats")
c.check(r["rc"] == 0 and r["evicted"] > 0 and str(KEY) not in r["text"],
        "control: streaming tokens=64 at -c %s loses the key (answer %r, evicted %d)" % (SMALL_CTX, r["text"], r["evicted"]))

# state round trip through llama_state_seq_get_data / set_data (kvc-run), default iSWA layout
out = k.kvc_run(prompt, "-c", "4096", "-n", "16", "--kv-policy", "snapkv", "--kv-policy-param", "interval=0",
                "--kvc-state-roundtrip", check=False)
rt = out.get("roundtrip") if isinstance(out, dict) else None
c.check(rt is not None and out["cells_evicted"] > 0 and rt["answer"] == out["answer"] and str(KEY) in out["answer"],
        "kvc-run state round trip of a compressed sequence: continuation before %r, after the restore %r (%s bytes)"
        % (rt and rt["answer"], rt and out["answer"], rt and rt["state_bytes"]))
if rt is not None:
    # reported, not checked: SmolLM2 gives equal counts (test_faults); on gemma3 the restored sequence holds one cell fewer
    print("  note: cells held after 15 decoded tokens: before the restore %d, after %d (evicted %d)"
          % (rt["cells_held"], out["cells_held"], out["cells_evicted"]))

# llama-server
srv = None


def ask(policy, text=prompt_text, n_predict=8, cache_prompt=False):
    body = {"prompt": text, "n_predict": n_predict, "temperature": 0, "cache_prompt": cache_prompt, "id_slot": 0}
    if policy is not None:
        body["kv_policy"] = policy
    st, b = srv.req("/completion", body)
    tm = b.get("timings", {}) if st == 200 and isinstance(b, dict) else {}
    kv = tm.get("kv_policy", {})
    return {"st": st, "text": b.get("content") if st == 200 else k.err_msg(b), "cache_n": tm.get("cache_n", -1),
            "decoded": tm.get("prompt_n", 0) + tm.get("predicted_n", 0) - 1,
            "held": kv.get("cells_held", -1), "evicted": kv.get("cells_evicted", -1)}


full = {}
srv = k.Server("iswa", ["-c", "4096", "-np", "1"])
try:
    up = srv.wait_up()
    c.check(up, "llama-server -c 4096 -np 1 starts")
    if up:
        full = ask("none")
        c.check(full["st"] == 200 and str(KEY) in full["text"], "server, full cache: %r" % full["text"])
        pol = {"name": "snapkv", "params": {"ratio": 0.5, "granularity": "layer"}}
        a = ask(pol)
        c.check(a["st"] == 200 and a["evicted"] > 0 and a["held"] + a["evicted"] == a["decoded"],
                "server, kv_policy %s: HTTP %d, held %d + evicted %d == decoded %d"
                % (pol, a["st"], a["held"], a["evicted"], a["decoded"]))
        c.check(a["text"] == full["text"], "  answer %r == the full cache's %r" % (a["text"], full["text"]))
finally:
    srv.stop()

slot_dir = os.path.join(k.TMP, "iswa-slots")
os.makedirs(slot_dir, exist_ok=True)
srv = k.Server("iswa-slots", ["-c", "4096", "-np", "1", "--swa-full", "--slot-save-path", slot_dir])
try:
    up = srv.wait_up()
    c.check(up, "llama-server -c 4096 -np 1 --swa-full --slot-save-path starts")
    if up:
        # /slots save/restore of a compressed (token-granularity) slot; kv_policy by name (snapkv's defaults:
        # ratio 0.5, token granularity)
        a = ask("snapkv")
        c.check(a["st"] == 200 and a["evicted"] > 0 and a["held"] + a["evicted"] == a["decoded"],
                "server, kv_policy \"snapkv\": HTTP %d, held %d + evicted %d == decoded %d"
                % (a["st"], a["held"], a["evicted"], a["decoded"]))
        c.check(a["text"] == full.get("text"), "  answer %r == the full cache's %r" % (a["text"], full.get("text")))
        st, sv = srv.req("/slots/0?action=save", {"filename": "iswa-slot0.bin"})
        c.check(st == 200 and sv.get("n_saved", 0) > 0, "slot 0 saved (%d): %s" % (st, sv))
        cont_text = prompt_text + (a["text"] or "")
        e1 = ask("none", cont_text, 16, cache_prompt=True)
        st, rs = srv.req("/slots/0?action=restore", {"filename": "iswa-slot0.bin"})
        c.check(st == 200 and rs.get("n_restored", 0) > 0, "slot 0 restored (%d): %s" % (st, rs))
        e2 = ask("none", cont_text, 16, cache_prompt=True)
        c.check(e1["st"] == 200 and e2["st"] == 200 and e1["text"] == e2["text"] and e1["cache_n"] > 0 and
                e2["cache_n"] == e1["cache_n"],
                "continuing the compressed slot: before the restore %r (cache_n %d), after %r (cache_n %d)"
                % (e1["text"], e1["cache_n"], e2["text"], e2["cache_n"]))
finally:
    log = srv.stop()
c.check("state restored, the policy starts fresh" in log, "server: the policy starts fresh for the restored slot (log line)")

print("  test_iswa ran in %.1f s" % (time.time() - t_start))
c.done()

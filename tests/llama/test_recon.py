#!/usr/bin/env python3
"""Patch 0012: the reconstruction pass of `dbudget ranker=recon` (KVzip), end to end, on SmolLM2-135M and
gemma-3-270m (iSWA), -t 1, the tools' default -b/-ub, answers against the same tool's full cache.

At a prompt's end the hook teacher-forces "Repeat the previous context exactly." and the context's own
tokens, in chunks, on the same sequence after its end (no outputs), hands their query rows to the policy
and removes those positions again. What must hold:

1. kvc-run, -c 4096, `dbudget ranker=recon sinks=1048576` (every cell protected: the pass runs, nothing is
   evicted): the logits of every generated step are bit-identical to `none` (-n 8). The pass must leave
   the real call's outputs (the prompt's logits) as they were, its scratch cells must be gone, and on
   gemma3 the sliding-window cells the next token sees must not have been reused for the pass's
   positions (a reused one changes the logits). cells held == tokens decoded.
2. llama-completion --kv-policy-stats, -c 4096, `dbudget ranker=recon`: the stats line says one
   reconstruction pass with query rows; evicted > 0; cells held + evicted == tokens decoded (the scratch
   cells are gone); the answer (-n 8) is the full cache's.
3. no room for the pass (SmolLM2, -c 1024 with a prompt that fills it: the policy makes room inside the
   decode call): the log says the pass failed and the policy fell back, the run still answers (exit 0).
4. llama-server (SmolLM2, -c 4096 -np 1, `--kv-policy dbudget --kv-policy-param ranker=recon`): the
   server log shows the pass, the answer equals a full-cache request's, held + evicted == decoded.
"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

t_start = time.time()
c = k.Checks("test_recon")

SMOL = k.MODEL
GEMMA = os.environ.get("KVC_GEMMA3_MODEL", os.path.expanduser("~/.cache/kvcompress/models/gemma-3-270m-q4_k_m.gguf"))
RECON_STATS = re.compile(r"kv-policy: seq 0: reconstruction passes (\d+), query rows (\d+)")
RECON_LOG = re.compile(r"reconstruction pass: (\d+) of (\d+) context tokens in (\d+) of (\d+) chunks, (\d+) query rows")
FALLBACK = "reconstruction pass failed"
RECON = ["--kv-policy", "dbudget", "--kv-policy-param", "ranker=recon"]

KEY = 48213
prompt_text = k.passkey_prompt(KEY, 40, 20)      # ~1K tokens with SmolLM2's tokenizer, ~0.75K with gemma3's
prompt = k.write_prompt("recon-prompt.txt", prompt_text)


def logits_of(tag, *extra):
    path = os.path.join(k.TMP, "recon-logits-%s.bin" % tag)
    if os.path.exists(path):
        os.remove(path)
    r = k.kvc_run(prompt, "-c", "4096", "-n", "8", "--kvc-logits", path, *extra, check=False)
    if not isinstance(r, dict):
        return None, None
    with open(path, "rb") as f:
        return r, f.read()


for name, model in (("smollm2", SMOL), ("gemma3", GEMMA)):
    if not os.path.exists(model):
        c.check(False, "%s model at %s (scripts/llama.sh fetch)" % (name, model))
        continue
    k.MODEL = model

    # 1. the pass changes no logit when nothing is evicted
    full, full_logits = logits_of(name + "-none")
    kept, kept_logits = logits_of(name + "-kept", *RECON, "--kv-policy-param", "sinks=1048576")
    c.check(full is not None and kept is not None and len(full_logits) > 0,
            "[%s] kvc-run none and dbudget ranker=recon sinks=1048576 run" % name)
    if full is not None and kept is not None:
        decoded = full["n_prompt"] + 8 - 1
        c.check(kept_logits == full_logits,
                "[%s] every cell kept: the logits of all 8 steps are bit-identical to none's (%d bytes)"
                % (name, len(full_logits)))
        c.check(kept["cells_evicted"] == 0 and kept["cells_held"] == full["cells_held"] == decoded,
                "[%s] cells held %d == none's %d == tokens decoded %d (the pass's cells are gone), evicted %d"
                % (name, kept["cells_held"], full["cells_held"], decoded, kept["cells_evicted"]))

    # 2. llama-completion: the pass ran, cells were freed, the full cache's answer
    ref = k.completion(prompt, "4096", 8)
    p = k.completion(prompt, "4096", 8, *RECON, "--kv-policy-stats")
    st, rs = k.policy_stats(p.stderr), RECON_STATS.search(p.stderr)
    c.check(ref.returncode == 0 and str(KEY) in ref.stdout, "[%s] llama-completion, full cache: %r" % (name, ref.stdout.strip()))
    c.check(p.returncode == 0 and rs is not None and int(rs.group(1)) >= 1 and int(rs.group(2)) > 0 and FALLBACK not in p.stderr,
            "[%s] llama-completion dbudget ranker=recon: %s" % (name, rs.group(0) if rs else "no reconstruction stats line"))
    c.check(st["evicted"] > 0 and st["held"] + st["evicted"] == st["n_prompt"] + st["n_gen"],
            "[%s]   evicted %d > 0, held %d + evicted == tokens decoded %d + %d"
            % (name, st["evicted"], st["held"], st["n_prompt"], st["n_gen"]))
    c.check(p.stdout.strip() == ref.stdout.strip(), "[%s]   answer %r == full cache's %r" % (name, p.stdout.strip(), ref.stdout.strip()))

k.MODEL = SMOL

# 3. no room for the pass: it falls back and says so
p = k.completion(prompt, "1024", 8, *RECON, "--kv-policy-stats")
st = k.policy_stats(p.stderr)
c.check(p.returncode == 0 and FALLBACK in p.stderr and "ranker=context" in p.stderr and st["evicted"] > 0,
        "[smollm2 -c 1024] no room for a chunk: the pass falls back (logged), exit %d, evicted %d, answer %r"
        % (p.returncode, st["evicted"], p.stdout.strip()))

# 4. llama-server
# -lv 4: libllama's info lines (the pass's summary) are trace level in the server's log
srv = k.Server("recon", ["-c", "4096", "-np", "1", "-lv", "4"] + RECON)
try:
    up = srv.wait_up()
    c.check(up, "llama-server -c 4096 -np 1 --kv-policy dbudget ranker=recon starts")
    if up:
        def ask(policy):
            body = {"prompt": prompt_text, "n_predict": 8, "temperature": 0, "cache_prompt": False, "id_slot": 0}
            if policy is not None:
                body["kv_policy"] = policy
            s, b = srv.req("/completion", body)
            tm = b.get("timings", {}) if s == 200 and isinstance(b, dict) else {}
            kv = tm.get("kv_policy", {})
            return {"st": s, "text": b.get("content") if s == 200 else k.err_msg(b),
                    "decoded": tm.get("prompt_n", 0) + tm.get("predicted_n", 0) - 1,
                    "held": kv.get("cells_held", -1), "evicted": kv.get("cells_evicted", -1)}
        full = ask("none")
        a = ask(None)  # the server's own: dbudget ranker=recon
        c.check(full["st"] == 200 and a["st"] == 200 and a["text"] == full["text"] and str(KEY) in a["text"],
                "server: answer %r == the full cache's %r" % (a["text"], full["text"]))
        c.check(a["evicted"] > 0 and a["held"] + a["evicted"] == a["decoded"],
                "server: evicted %d > 0, held %d + evicted == decoded %d" % (a["evicted"], a["held"], a["decoded"]))
finally:
    log = srv.stop()
# the pass over the request's prompt (the server's start-up probe decode is a 2-token prompt end of its own)
passes = [m for m in RECON_LOG.finditer(log) if int(m.group(2)) >= 1000]
c.check(len(passes) == 1 and int(passes[0].group(5)) > 0 and FALLBACK not in log,
        "server log: %s" % (passes[0].group(0) if passes else "no reconstruction pass over the prompt"))

print("  time: %.0f s" % (time.time() - t_start))
c.done()

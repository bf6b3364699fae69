#!/usr/bin/env python3
"""Prompts longer than -c at the default batch size (patch 0006), SmolLM2-135M, -t 1.

A ~2.1K-token passkey prompt, the key at 60 % depth (where llama-completion used to skip the tail of
its first 2048-token batch), run with the tools' default -b/-ub and -c at a half and a quarter of the
prompt. Before patch 0006 llama-completion printed "<<input too long: skipped N tokens>>" and
llama-server cut the sequence "to 24 of its 1000 cells to make room for the next batch".

1. llama-completion, dbudget and gvote, -c 1024 and -c 512: exit 0, nothing skipped, every prompt
   token went through the cache (cells held + evicted == prompt tokens + generated - 1, from
   --kv-policy-stats and the perf lines), the generated text equals the full cache's (-c 4096, none).
2. llama-server, -c 1024 (one slot), dbudget and gvote per request: HTTP 200, no sequence cut below
   half its cells, cells held + evicted == tokens decoded, the answer equals a full-cache server's.
3. the README's example as written: llama-server -c 8192 -np 4 --kv-policy gvote, a 2.8K-token
   passkey prompt: the full cache's answer, nothing cut.
4. control: streaming tokens=64 at -c 512 must lose the key (the answer checks can fail).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_long_prompt")
KEY = 71942
prompt_text = k.passkey_prompt(KEY, 84, 50)
prompt = k.write_prompt("long-prompt.txt", prompt_text)
N_PREDICT = 8


def completion(ctx, *extra):
    return k.completion(prompt, ctx, N_PREDICT, *extra)


def generated(p):
    return p.stdout.strip()


ref = completion("4096")
c.check(ref.returncode == 0 and str(KEY) in generated(ref),
        "llama-completion, full cache (-c 4096): finds the key: %r" % generated(ref)[-40:])

for ctx in ("1024", "512"):
    for policy in ("dbudget", "gvote"):
        p = completion(ctx, "--kv-policy", policy, "--kv-policy-stats")
        out = p.stdout + p.stderr
        st = k.policy_stats(p.stderr)
        held, evicted, n_prompt, n_gen = st["held"], st["evicted"], st["n_prompt"], st["n_gen"]
        c.check(p.returncode == 0 and "input too long" not in out and "is cut to" not in out,
                "llama-completion -c %s --kv-policy %s: rc %d, nothing skipped or cut" % (ctx, policy, p.returncode))
        c.check(st["policy"] == policy and n_gen >= 0 and n_prompt > 2 * int(ctx) and evicted > 0 and
                held + evicted == n_prompt + n_gen,
                "  every token went through the cache: held %d + evicted %d == prompt %d + decoded %d"
                % (held, evicted, n_prompt, n_gen))
        c.check(generated(p) == generated(ref), "  answer %r == full cache's %r" % (generated(p)[-30:], generated(ref)[-30:]))

p = completion("512", "--kv-policy", "streaming", "--kv-policy-param", "tokens=64", "--kv-policy-stats")
c.check(p.returncode == 0 and k.policy_stats(p.stderr)["evicted"] > 0 and str(KEY) not in generated(p),
        "control: streaming tokens=64 at -c 512 loses the key (answer %r)" % generated(p)[-30:])


def ask(srv, text, policy=None, n_predict=N_PREDICT):
    body = {"prompt": text, "n_predict": n_predict, "temperature": 0, "cache_prompt": False}
    if policy:
        body["kv_policy"] = policy
    return srv.req("/completion", body)


def server_answer(args, text, policies, label):
    """Answers of a server started with args, one request per policy; checks the accounting and the log."""
    srv = k.Server(label, args)
    answers = {}
    try:
        if not srv.wait_up():
            c.check(False, "%s: server starts" % label)
            return answers
        for policy in policies:
            st, body = ask(srv, text, policy)
            tm = body.get("timings", {}) if isinstance(body, dict) else {}
            kv = tm.get("kv_policy", {})
            answers[policy] = body.get("content") if st == 200 else None
            if policy == "none":
                c.check(st == 200, "%s: full cache answers %r" % (label, answers[policy]))
                continue
            decoded = tm.get("cache_n", 0) + tm.get("prompt_n", 0) + tm.get("predicted_n", 0) - 1
            held, evicted = kv.get("cells_held", -1), kv.get("cells_evicted", -1)
            c.check(st == 200 and evicted > 0 and held + evicted == decoded,
                    "%s, kv_policy %s: HTTP %d, held %d + evicted %d == tokens decoded %d"
                    % (label, policy, st, held, evicted, decoded))
    finally:
        log = srv.stop()
    cut = [l for l in log.splitlines() if "is cut to" in l]
    c.check(not cut, "%s: no sequence cut to make room (%s)" % (label, cut[:1]))
    return answers


full = server_answer(["-c", "4096", "-np", "1"], prompt_text, ["none"], "server -c 4096")
ans = server_answer(["-c", "1024", "-np", "1", "--kv-policy", "dbudget"], prompt_text, [None, "gvote"], "server -c 1024")
c.check(str(KEY) in (full.get("none") or ""), "server, full cache: finds the key (%r)" % full.get("none"))
for policy, a in ans.items():
    c.check(a == full.get("none"), "server -c 1024, %s: answer %r == full cache's %r" % (policy or "dbudget (--kv-policy)", a, full.get("none")))

# README: llama-server -m $M -c 8192 -np 4 --kv-policy gvote, a 2.8K-token prompt
long_text = k.passkey_prompt(KEY, 115, 40)
full = server_answer(["-c", "4096", "-np", "1"], long_text, ["none"], "server -c 4096 (2.8K)")
ans = server_answer(["-c", "8192", "-np", "4", "--kv-policy", "gvote"], long_text, [None, "dbudget"], "README server -c 8192 -np 4 gvote")
for policy, a in ans.items():
    c.check(a == full.get("none"), "README example, %s: answer %r == full cache's %r" % (policy or "gvote (--kv-policy)", a, full.get("none")))
c.done()

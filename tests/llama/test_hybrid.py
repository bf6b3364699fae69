#!/usr/bin/env python3
"""Recurrent and hybrid memory with --kv-policy, on tiny random-weight models, -t 1.

The models are made at test time by make_tiny_models.py (build/test-llama, ~5.5 MB each, the test
model's tokenizer): `tiny-mamba.gguf` (arch mamba: recurrent state only, no attention KV cache) and
`tiny-lfm2.gguf` (arch lfm2: llama_memory_hybrid, 2 short-conv layers in the recurrent part, 2
attention layers in the KV cache), and `tiny-lfm2-swa.gguf` (the same with sliding-window attention
layers). The weights are random: the checks are about the cache, not the
answers.

1. recurrent only: `--kv-policy dbudget` stops llama-completion and llama-server at startup (exit
   status != 0, before anything is generated) with a message naming `--kv-policy` and saying there
   is no full-attention KV cache; `--kv-policy none` runs (llama-completion exit 0, llama-server answers);
   a server started with `none` answers a per-request `kv_policy` with 400 and the same reason, and
   keeps serving. The same startup error for a hybrid model whose attention layers are all
   sliding-window (`tiny-lfm2-swa.gguf`: hybrid-iSWA with an empty full-attention base; it aborted in
   llama_kv_policy's constructor before patch 0008).
2. hybrid, a ~2.1K-token prompt with -c 512 (the attention cache) at the default -b: dbudget and
   snapkv ratio=0.5 in llama-completion: exit 0, nothing
   skipped, cells evicted > 0 and cells held + evicted == tokens decoded (--kv-policy-stats and the
   perf lines), cells held <= 512; per layer (pyramidkv granularity=layer, re-packed) too; at a
   roomy -c 4096, snapkv ratio=0.5 at prompt end holds about half the prompt. llama-server -c 512,
   per-request dbudget and `--kv-policy` gvote: HTTP 200, held + evicted == tokens decoded; a prompt
   that diverges at its last token from the compressed cached one is re-processed (patch 0008: the
   server compared the cells with the hybrid memory's position range, the recurrent part's).
3. control: the same -c 512 run without a policy cannot take the prompt (llama-completion fails,
   the server answers 400), so the runs of 2 are the policy's work.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k
import make_tiny_models

c = k.Checks("test_hybrid")
t0 = time.time()
models = make_tiny_models.main()
c.check(all(os.path.getsize(p) < 8 << 20 for p in models.values()),
        "tiny models made in %.1f s: %s" % (time.time() - t0, ", ".join("%s %.1f MB" % (os.path.basename(p), os.path.getsize(p) / 2**20)
                                                                    for p in models.values())))
MAMBA, LFM2, LFM2_SWA = models["mamba"], models["lfm2"], models["lfm2-swa"]

NO_KV = "no full-attention KV cache"
N_PREDICT = 8
prompt_text = k.passkey_prompt(71942, 84, 50)      # ~2.1K tokens
prompt = k.write_prompt("hybrid-prompt.txt", prompt_text)


def completion(model, ctx, *extra):
    return k.completion(prompt, ctx, N_PREDICT, *extra, model=model)


def no_kv_error(out):
    return [l for l in out.splitlines() if "--kv-policy" in l and NO_KV in l]


# ---- 1. recurrent only ----
p = completion(MAMBA, "512", "--kv-policy", "dbudget")
msg = no_kv_error(p.stderr)
c.check(p.returncode != 0 and msg and not k.PROMPT_EVAL.search(p.stderr),
        "mamba, llama-completion --kv-policy dbudget: stops at startup (rc %d): %s" % (p.returncode, msg[-1:]))
p = completion(LFM2_SWA, "4096", "--kv-policy", "dbudget")
msg = no_kv_error(p.stderr)
c.check(p.returncode == 1 and msg and not k.PROMPT_EVAL.search(p.stderr),
        "lfm2, all attention layers sliding-window, --kv-policy dbudget: stops at startup (rc %d, was an abort): %s"
        % (p.returncode, msg[-1:]))
p = completion(MAMBA, "4096", "--kv-policy", "none")
c.check(p.returncode == 0 and k.PROMPT_EVAL.search(p.stderr), "mamba, llama-completion --kv-policy none: runs (rc %d)" % p.returncode)


def start_server(name, model, args):
    """llama-server with `model` (k.Server uses k.MODEL: temporarily swapped)."""
    saved, k.MODEL = k.MODEL, model
    try:
        return k.Server(name, args)
    finally:
        k.MODEL = saved


srv = start_server("hybrid-mamba-dbudget", MAMBA, ["-c", "512", "--kv-policy", "dbudget"])
try:
    rc = srv.proc.wait(timeout=60)
except Exception:
    rc = None
log = srv.stop()
msg = no_kv_error(log)
c.check(rc is not None and rc != 0 and msg, "mamba, llama-server --kv-policy dbudget: exits at startup (rc %s): %s" % (rc, msg[-1:]))

srv = start_server("hybrid-mamba-none", MAMBA, ["-c", "512"])
try:
    up = srv.wait_up()
    st, body = srv.req("/completion", {"prompt": "The sky is", "n_predict": 4, "temperature": 0}) if up else (0, None)
    c.check(up and st == 200, "mamba, llama-server --kv-policy none: answers (HTTP %d)" % st)
    st, body = srv.req("/completion", {"prompt": "The sky is", "n_predict": 4, "kv_policy": "dbudget"}) if up else (0, None)
    c.check(st == 400 and NO_KV in k.err_msg(body), "  per-request kv_policy dbudget: HTTP %d %r" % (st, k.err_msg(body)))
    st, _ = srv.req("/completion", {"prompt": "The sky is", "n_predict": 4}) if up else (0, None)
    c.check(st == 200, "  and the server keeps serving (HTTP %d)" % st)
finally:
    srv.stop()

# ---- 2. hybrid: the attention part is compressed ----


def check_stats(label, p, max_held=None):
    out = p.stdout + p.stderr
    st = k.policy_stats(p.stderr)
    held, evicted, n_prompt, n_gen = st["held"], st["evicted"], st["n_prompt"], st["n_gen"]
    c.check(p.returncode == 0 and "input too long" not in out and "is cut to" not in out,
            "%s: rc %d, nothing skipped or cut" % (label, p.returncode))
    c.check(st["policy"] is not None and n_prompt >= 0 and n_gen >= 0 and evicted > 0 and held + evicted == n_prompt + n_gen
            and (max_held is None or held <= max_held),
            "  attention cache compressed: held %d + evicted %d == prompt %d + decoded %d%s"
            % (held, evicted, n_prompt, n_gen, "" if max_held is None else ", held <= %d" % max_held))
    return held, evicted, n_prompt


for policy, params in (("dbudget", None), ("snapkv", "ratio=0.5"), ("pyramidkv", "ratio=0.5,granularity=layer")):
    extra = ["--kv-policy", policy, "--kv-policy-stats"] + (["--kv-policy-param", params] if params else [])
    check_stats("lfm2, llama-completion -c 512 --kv-policy %s %s" % (policy, params or ""), completion(LFM2, "512", *extra), 512)

held, evicted, n_prompt = check_stats("lfm2, llama-completion -c 4096 --kv-policy snapkv ratio=0.5 (prompt end)",
                                      completion(LFM2, "4096", "--kv-policy", "snapkv", "--kv-policy-param", "ratio=0.5",
                                                 "--kv-policy-stats"))
c.check(n_prompt > 0 and abs(held - n_prompt / 2) < n_prompt / 8,
        "  snapkv ratio=0.5 holds about half of the %d-token prompt (%d)" % (n_prompt, held))


def ask(srv, policy=None):
    body = {"prompt": prompt_text, "n_predict": N_PREDICT, "temperature": 0, "cache_prompt": False}
    if policy:
        body["kv_policy"] = policy
    return srv.req("/completion", body)


srv = start_server("hybrid-lfm2", LFM2, ["-c", "512", "-np", "1", "--kv-policy", "gvote"])
try:
    up = srv.wait_up()
    c.check(up, "lfm2, llama-server -c 512 --kv-policy gvote: starts")
    for policy in (None, "dbudget"):
        st, body = ask(srv, policy) if up else (0, {})
        tm = body.get("timings", {}) if isinstance(body, dict) else {}
        kv = tm.get("kv_policy", {})
        decoded = tm.get("cache_n", 0) + tm.get("prompt_n", 0) + tm.get("predicted_n", 0) - 1
        held, evicted = kv.get("cells_held", -1), kv.get("cells_evicted", -1)
        c.check(st == 200 and kv.get("name") == (policy or "gvote") and evicted > 0 and held + evicted == decoded and held <= 512,
                "  kv_policy %s: HTTP %d, held %d + evicted %d == tokens decoded %d (%r)"
                % (policy or "gvote (--kv-policy)", st, held, evicted, decoded, k.err_msg(body) if st != 200 else ""))
    # prompt cache: a prompt that diverges at its last token from a compressed cached one. The server
    # keeps checkpoints of the recurrent state near the end of a prompt, so without the hybrid case of
    # the divergence rule it restored one and reused 2K positions of cells chosen for the other text
    # (the memory's position range is the recurrent part's: one position, never "compressed")
    if up:
        st1, _ = srv.req("/completion", {"prompt": prompt_text, "n_predict": 4, "temperature": 0, "cache_prompt": True})
        other = prompt_text[:-len(" is")] + " was"
        st2, body = srv.req("/completion", {"prompt": other, "n_predict": 4, "temperature": 0, "cache_prompt": True})
        tm = body.get("timings", {}) if isinstance(body, dict) else {}
        c.check(st1 == 200 and st2 == 200 and tm.get("cache_n", -1) == 0,
                "  a prompt diverging at its end from the compressed cached one is re-processed (HTTP %d, %d; cache_n %s)"
                % (st1, st2, tm.get("cache_n")))
finally:
    log = srv.stop()
cut = [l for l in log.splitlines() if "is cut to" in l]
c.check(not cut, "  no sequence cut to make room (%s)" % cut[:1])
c.check("the cached prompt was compressed" in log, "  the log says why it was re-processed")

# ---- 3. control: without a policy the prompt does not fit ----
p = completion(LFM2, "512", "--kv-policy", "none")
c.check(p.returncode != 0 or "input too long" in p.stdout + p.stderr,
        "control: lfm2 -c 512 without a policy cannot take the %d-token prompt (rc %d)" % (n_prompt, p.returncode))
srv = start_server("hybrid-lfm2-none", LFM2, ["-c", "512", "-np", "1"])
try:
    up = srv.wait_up()
    st, body = ask(srv) if up else (0, {})
    c.check(up and st == 400, "control: llama-server -c 512 without a policy refuses it (HTTP %d %r)" % (st, k.err_msg(body)[:80]))
finally:
    srv.stop()
print("  (%.0f s)" % (time.time() - t0))
c.done()

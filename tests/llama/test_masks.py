#!/usr/bin/env python3
"""Per-layer and per-head KV cache masks (patch 0003, granularity=layer|head), SmolLM2-135M, -t 1.

1. ops: tests/llama/test-kvp-mask.cpp, built against the tree's ggml: the bias added to the KQ
   mask (per layer, per query head) gives soft_max_ext / flash_attn_ext equal to a reference that
   attends only to the kept rows; without the bias the result is far from it.
2. masked == evicted: LLAMA_KV_POLICY_MASKS=evict (evict-head) hides the cells a snapkv plan frees
   in every layer (every KV head, per-head bias) instead of freeing them; the logits equal the evicting run up to rounding (the same
   tokens, KL < 1e-3: new tokens land in other cells, so sums run in another order, and this
   Q4_1 model turns rounding into logit differences of ~0.5).
3. a policy whose keep sets are the same in every layer (streaming): granularity=layer and =head
   give logits identical to granularity=token (masked cells contribute exactly 0).
4. differing per-layer sets (pyramidkv ratio 0.9, granularity=layer): the logits differ from the
   union-only run (LLAMA_KV_POLICY_MASKS=0), and cells held + cells the library freed = tokens.
5. per-head (adakv, granularity=head) on the CPU with FA off and on: the log says the masks are
   per head; FA on and off agree (same tokens, KL < a tenth of what the masks change); the masks
   change the logits with FA off and on.
6. the passkey survives granularity=layer for dynamickv and pyramidkv (ratio 0.5), as it does at
   token granularity.
The first sampled token comes from the prompt's logits, computed before the policy runs.
KVC_LLAMA_SRC: the llama.cpp tree whose ggml headers build the op test (default build/llama-src).
"""
import array
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_masks")
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("KVC_LLAMA_SRC", os.path.join(k.ROOT, "build", "llama-src"))
N_VOCAB = 49152

# 1. ops
os.makedirs(k.TMP, exist_ok=True)
exe = os.path.join(k.TMP, "test-kvp-mask")
cc = subprocess.run(["c++", "-O1", "-std=c++17", "-I" + os.path.join(SRC, "ggml", "include"),
                     os.path.join(HERE, "test-kvp-mask.cpp"), "-L" + k.BIN, "-lggml-cpu", "-lggml-base", "-lggml",
                     "-Wl,-rpath," + k.BIN, "-o", exe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
if cc.returncode != 0:
    c.check(False, "test-kvp-mask builds against %s:\n%s" % (SRC, cc.stdout[-2000:]))
else:
    p = subprocess.run([exe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(p.stdout)
    c.check(p.returncode == 0, "ops: masked soft_max_ext / flash_attn_ext == attention over the kept rows")

KEY = 48213
prompt = k.write_prompt("masks.txt", k.passkey_prompt(KEY, 16, 7))   # 448 tokens
N = 6
runs = {}


def run(tag, policy, params, fa="off", masks=None):
    logits = os.path.join(k.TMP, "masks-%s.bin" % tag)
    if os.path.exists(logits):
        os.remove(logits)
    args = ["-m", k.MODEL, "-f", prompt, "-t", k.THREADS, "--no-warmup", "-c", "2048", "-n", str(N), "-fa", fa, "-lv", "4",
            "--kvc-logits", logits, "--kv-policy", policy]
    if params:
        args += ["--kv-policy-param", ",".join(params)]
    env = {"LLAMA_KV_POLICY_MASKS": masks} if masks else None
    p = k.run(["kvc-run"] + args, env=env, check=False)
    if p.returncode != 0:
        c.check(False, "%s runs (rc %d): %s" % (tag, p.returncode, p.stderr.strip().splitlines()[-1:]))
        return None
    r = [__import__("json").loads(l) for l in p.stdout.splitlines() if l.startswith("{")][-1]
    a = array.array("f")
    with open(logits, "rb") as f:
        a.frombytes(f.read())
    r["logits"] = [a[i:i + N_VOCAB] for i in range(0, len(a), N_VOCAB)]
    r["log"] = p.stderr
    runs[tag] = r
    return r


def max_diff(a, b):
    return max(max(abs(x - y) for x, y in zip(s, t)) for s, t in zip(a["logits"], b["logits"]))


def kl(a, b, first=0):
    worst = 0.0
    for p, q in list(zip(a["logits"], b["logits"]))[first:]:
        mp, mq = max(p), max(q)
        zp = math.log(sum(math.exp(x - mp) for x in p))
        zq = math.log(sum(math.exp(x - mq) for x in q))
        worst = max(worst, sum(math.exp(x - mp - zp) * ((x - mp - zp) - (y - mq - zq)) for x, y in zip(p, q)))
    return worst


def tokens(r):
    return [max(range(N_VOCAB), key=s.__getitem__) for s in r["logits"]]


def conserved(r):
    return r["cells_held"] + r["cells_evicted"] == r["n_prompt"] + r["n_decoded"]


# 2. masked == evicted
for fa in ("off", "on"):
    ev = run("snap-ev-" + fa, "snapkv", ["ratio=0.6"], fa)
    for mode, what in (("evict", "layer"), ("evict-head", "head")):
        mk = run("snap-%s-%s" % (mode, fa), "snapkv", ["ratio=0.6"], fa, masks=mode)
        if ev and mk:
            d, dk = max_diff(ev, mk), kl(ev, mk)
            ok = tokens(ev) == tokens(mk) and dk < 1e-3 and ("masks: per " + what) in mk["log"]
            c.check(ok and ev["cells_evicted"] > 100 and mk["cells_evicted"] == 0,
                    "[fa %s] hiding the %d cells snapkv frees in every %s == freeing them: max |dlogit| %.2g, KL %.2g"
                    % (fa, ev["cells_evicted"], what, d, dk))

# 3. identical keep sets in every layer
tok = run("stream-token", "streaming", ["ratio=0.5", "granularity=token"])
for g in ("layer", "head"):
    r = run("stream-" + g, "streaming", ["ratio=0.5", "granularity=" + g])
    if tok and r:
        c.check(max_diff(tok, r) <= 1e-6 and r["cells_evicted"] == tok["cells_evicted"] > 0,
                "streaming granularity=%s == token: max |dlogit| %.2g, evicted %d == %d"
                % (g, max_diff(tok, r), r["cells_evicted"], tok["cells_evicted"]))

# 4. differing per-layer sets (ratio 0.9: the union of the layers' sets leaves cells to free)
lay = run("pyr9-layer", "pyramidkv", ["ratio=0.9", "granularity=layer"])
uni = run("pyr9-union", "pyramidkv", ["ratio=0.9", "granularity=layer"], masks="0")
if lay and uni:
    c.check("masks: per layer" in lay["log"] and max_diff(lay, uni) > 1e-3,
            "pyramidkv ratio 0.9 granularity=layer: the masks change the logits (max |dlogit| %.3g vs the union only)"
            % max_diff(lay, uni))
    c.check(conserved(lay) and lay["cells_evicted"] == uni["cells_evicted"] > 0,
            "pyramidkv ratio 0.9 granularity=layer: held %d + freed %d == %d tokens (union-only run freed %d)"
            % (lay["cells_held"], lay["cells_evicted"], lay["n_prompt"] + lay["n_decoded"], uni["cells_evicted"]))

# 5. per head on the CPU, FA off and on
hd = {fa: run("ada-head-" + fa, "adakv", ["ratio=0.5", "granularity=head"], fa) for fa in ("off", "on")}
uni = run("ada-union", "adakv", ["ratio=0.5", "granularity=head"], masks="0")
if hd["off"] and hd["on"] and uni:
    c.check(all("masks: per head" in hd[fa]["log"] for fa in hd), "adakv granularity=head: per-head masks (FA off and on)")
    # the first step's logits come from the prompt, before the policy ran: FA on/off noise alone
    k_fa, k_mask = kl(hd["off"], hd["on"], 1), kl(hd["off"], uni, 1)
    c.check(tokens(hd["off"]) == tokens(hd["on"]) and k_fa < 0.1 * k_mask,
            "per-head masks with FA on == FA off: same tokens, KL after the plan %.2g (before it, FA noise alone: %.2g)"
            % (k_fa, kl(hd["off"], hd["on"])))
    c.check(k_mask > 1e-3 and kl(hd["on"], uni, 1) > 1e-3 and conserved(hd["off"]),
            "per-head masks change the logits: KL %.3g (FA off), %.3g (FA on) against the union only"
            % (k_mask, kl(hd["on"], uni, 1)))

# 6. the passkey survives granularity=layer
for pol in ("dynamickv", "pyramidkv"):
    t = run(pol + "-token", pol, ["ratio=0.5", "granularity=token"])
    lay = run(pol + "-layer", pol, ["ratio=0.5", "granularity=layer"])
    if t and lay:
        c.check(str(KEY) in t["answer"] and str(KEY) in lay["answer"] and conserved(lay),
                "%s ratio 0.5: the passkey survives granularity=layer: %r (token: %r; freed %d vs %d)"
                % (pol, lay["answer"], t["answer"], lay["cells_evicted"], t["cells_evicted"]))
c.done()

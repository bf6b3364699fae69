#!/usr/bin/env python3
"""The attention the library computes equals the model's, on SmolLM2-135M and gemma3-270m (patch 0014).

kvc-run --kvc-attn-check prefills a ~1K-token passkey prompt (-fa off, the tools' default -b/-ub, snapkv
tokens=100000: it captures queries and keeps every cell), then for every layer the policy sees recomputes the
last token's attention the way the library does (softmax of the kq_scale the glue gives the library times
q.k, over the captured query and K read through llama_kv_policy_read_k) and compares it with the model's own
softmax (the graph's kq_soft_max of that layer).

Before 0014, gemma3's attention was scaled twice (it scales Q by query_pre_attn_scalar itself and passes
kq_scale 1, the glue told the library 1/sqrt(head_dim)): the library saw a near-uniform attention in the three
global layers (total variation ~0.5-0.9 from the model's) and the adaptive policies freed almost nothing.

Checks per model: the policy sees the expected layers (SmolLM2: 30, gemma3: the 3 global ones); every layer's
attention on the sequence's cells sums to 1 (cell j is position j); the recomputed attention is within total
variation 0.02 of the model's in every head (f16 K, the model's f16-rounded query: ~1e-3 expected).
Control (the check can fail): gemma3 with 1/sqrt(head_dim) applied to the captured query, the pre-0014 setting,
is far from the model's (mean total variation > 0.2).

The rotary embedding the library is told (patch 0015; gvote moves window queries to one position with it):
kvc-run --kvc-rope-check prefills a repeated sentence and, in every layer the policy sees, rotates K at a position
by the distance to a later position holding the same token with the told rotation, and compares it with K there
(cosine, mean over the pairs and KV heads). Checks per model: the told type, n_rot and base are the GGUF's
(SmolLM2: norm, 64, 1e5; gemma3's global layers: neox, 256, 1e6); the told rotation matches K better than no
rotation, than the other pair layout and than base/100 in every layer (the controls: a wrong layout or base fails
this), and exactly (cosine >= 0.999) in SmolLM2's layer 0, whose K depends on the token alone.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

t_start = time.time()
c = k.Checks("test_attention")
GEMMA3 = os.environ.get("KVC_GEMMA3_MODEL", os.path.expanduser("~/.cache/kvcompress/models/gemma-3-270m-q4_k_m.gguf"))
SMOLLM2 = k.MODEL
TV_MAX = 0.02
TV_OLD_MIN = 0.2

prompt = k.write_prompt("attention-prompt.txt", k.passkey_prompt(48213, 40, 20))
for name, model, n_layers in (("smollm2", SMOLLM2, 30), ("gemma3", GEMMA3, 3)):
    c.check(os.path.exists(model), "%s model at %s (scripts/llama.sh fetch)" % (name, model))
    if not os.path.exists(model):
        continue
    k.MODEL = model
    res = k.kvc_run(prompt, "-c", "4096", "-fa", "off", "--kv-policy", "snapkv", "--kv-policy-param", "tokens=100000",
                    "--kvc-attn-check", check=False)
    if not isinstance(res, dict):
        c.check(False, "%s: kvc-run --kvc-attn-check ran (rc %d): %s" % (name, res.returncode, res.stderr[-500:]))
        continue
    layers = res["attn_check"]
    c.check(len(layers) == n_layers, "%s: the policy sees %d layers (expected %d): %s"
            % (name, len(layers), n_layers, [l["il"] for l in layers]))
    for l in layers:
        print("  %s layer %2d: %d cells, kq_scale %g, tv mean %.5f max %.5f (1/sqrt(d) on the captured q: %.4f); "
              "80%% nucleus: model %.3f, library %.3f, 1/sqrt(d) %.3f of the cells"
              % (name, l["il"], l["n_cells"], l["kq_scale"], l["tv_mean"], l["tv_max"], l["tv_inv_sqrt_d"],
                 l["nucleus80_model"], l["nucleus80_lib"], l["nucleus80_inv_sqrt_d"]))
    c.check(all(abs(l["mass"] - 1.0) < 1e-3 for l in layers),
            "%s: the model's attention lies on the sequence's cells (min mass %.5f)" % (name, min(l["mass"] for l in layers)))
    worst = max(l["tv_max"] for l in layers)
    c.check(worst <= TV_MAX, "%s: the library's attention equals the model's in every layer and head "
            "(worst total variation %.5f <= %g)" % (name, worst, TV_MAX))
    if name == "gemma3":
        old = min(l["tv_inv_sqrt_d"] for l in layers)
        c.check(old > TV_OLD_MIN, "control, gemma3: 1/sqrt(head_dim) on the captured queries (pre-0014) is far from the "
                "model's attention (least mean total variation %.4f > %g)" % (old, TV_OLD_MIN))

ROPE = {"smollm2": (1, 64, 1e5), "gemma3": (2, 256, 1e6)}  # KVC_ROPE_NORM / _NEOX, n_rot, base (GGUF metadata)
rep = k.write_prompt("rope-prompt.txt", "The quick brown fox jumps over the lazy dog near the river bank. " * 50)
for name, model, n_layers in (("smollm2", SMOLLM2, 30), ("gemma3", GEMMA3, 3)):
    if not os.path.exists(model):
        continue
    k.MODEL = model
    res = k.kvc_run(rep, "-c", "4096", "--kv-policy", "snapkv", "--kv-policy-param", "tokens=100000",
                    "--kvc-rope-check", check=False)
    if not isinstance(res, dict):
        c.check(False, "%s: kvc-run --kvc-rope-check ran (rc %d): %s" % (name, res.returncode, res.stderr[-500:]))
        continue
    r = res["rope_check"]
    want = ROPE[name]
    c.check((r["type"], r["n_rot"]) == want[:2] and abs(r["freq_base"] - want[2]) < 1e-3 * want[2] and r["freq_scale"] == 1,
            "%s: the library is told the model's RoPE (type %d, n_rot %d, base %g, scale %g; expected %s)"
            % (name, r["type"], r["n_rot"], r["freq_base"], r["freq_scale"], want))
    ls = r["layers"]
    c.check(len(ls) == n_layers and all(l["pairs"] > 0 for l in ls),
            "%s: K compared in %d layers (expected %d), %d same-token pairs each" % (name, len(ls), n_layers, ls[0]["pairs"] if ls else 0))
    if not ls:
        continue
    for l in {l["l"]: l for l in ls[:3] + ls[-1:]}.values():
        print("  %s policy layer %2d: cos(K, told rotation) %.4f, unrotated %.4f, other layout %.4f, base/100 %.4f"
              % (name, l["l"], l["cos_rot"], l["cos_raw"], l["cos_other_layout"], l["cos_base_div100"]))
    worse = [l["l"] for l in ls if not (l["cos_rot"] > max(l["cos_raw"], l["cos_other_layout"], l["cos_base_div100"]))]
    c.check(not worse, "%s: the told rotation matches K better than none, the other layout and base/100 in every layer%s"
            % (name, "" if not worse else " (not in layers %s)" % worse))
    if name == "smollm2":
        # layer 0's K depends on the token alone (gemma3's first global layer, 5, also on the context)
        c.check(ls[0]["cos_rot"] >= 0.999, "%s: in layer 0 K rotated by the told RoPE is K at the later position "
                "(cosine %.5f >= 0.999)" % (name, ls[0]["cos_rot"]))

print("  (%.0f s)" % (time.time() - t_start))
c.done()

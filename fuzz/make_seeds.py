#!/usr/bin/env python3
"""Writes fuzz/seeds/c_api/: one valid prefix per policy (name, small shape, buffers), then
random op bytes, so every run starts inside each policy rather than at the parser. The byte
layout follows fuzz/driver.rs (`run`, `PolicyArgs::new`, `MsgBuf::new`, `params`); a change
there only makes the seeds less useful, never wrong. Deterministic: rerun after such a change."""
import os, random

NAMES = ["none", "streaming", "h2o", "snapkv", "tova", "knorm", "pyramidkv", "dynamickv",
         "adakv", "dbudget", "gvote"]
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "c_api")
os.makedirs(out, exist_ok=True)
VALID = ["sinks", "interval", "granularity", "ratio", "tokens", "window", "pool", "pooling", "gqa",
         "beta", "max_ratio", "alpha", "layers", "threshold", "ranker", "p", "samples",
         "quorum", "seed"]  # driver.rs VALID, in order
# variant 1 of each policy: overrides (key, index into the key's VALID values)
OVERRIDES = {
    "none": [],
    "streaming": [("tokens", 2), ("window", 1)],
    "h2o": [("tokens", 2), ("gqa", 1)],
    "snapkv": [("tokens", 3), ("granularity", 2), ("pooling", 1)],
    "tova": [("ratio", 3), ("granularity", 1)],
    "knorm": [("tokens", 1), ("interval", 1)],
    "pyramidkv": [("beta", 0), ("granularity", 2)],
    "dynamickv": [("max_ratio", 1), ("pooling", 1)],
    "adakv": [("alpha", 2), ("layers", 1)],
    "dbudget": [("ranker", 1), ("threshold", 2)],
    "gvote": [("quorum", 2), ("samples", 1), ("granularity", 1)],
}
rng = random.Random(7)
for i, name in enumerate(NAMES):
    for variant in range(2):
        b = bytearray([0, 0, 0, 0])              # kvc_status_str(0)
        b += bytes([3, i])                       # policy name NAMES[i]
        ov = OVERRIDES[name] if variant else []
        if ov:
            b += bytes([3, len(ov) - 1])         # 1 + below(3) overrides
            for key, vi in ov:
                b += bytes([10, VALID.index(key), vi])  # VALID[key][vi]
            b += bytes([0])                      # kv array not NULL
        else:
            b += bytes([0])                      # no overrides
        b += bytes([1, 3, 0])                    # err buffer: 64 bytes
        # n_layer=2, n_head_kv=2 (variant 1: 1), n_head = n_head_kv*2, head_dim=8
        b += bytes([3, 1, 3, variant ^ 1, 1, 1, 3, 7])
        b += bytes([1, 5, 5, 1])                 # kq_scale default, CPU, serial, right ABI
        b += bytes([1, 3, 0, 1, 1])              # init err buffer, params and out non-NULL
        b += bytes(rng.getrandbits(8) for _ in range(700))
        with open(os.path.join(out, f"{name}-{variant}"), "wb") as f:
            f.write(b)

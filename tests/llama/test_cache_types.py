#!/usr/bin/env python3
"""A policy keeps the passkey with a quantized cache (-ctk q8_0 -ctv q8_0 -fa on: K is dequantized
and Hadamard-rotated, the captured queries must be rotated the same way) and with -fa off
(transposed V), like with the f16 cache. dbudget with eviction at the end of the prompt."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_cache_types")
KEY = 27182
prompt = k.write_prompt("cache-types.txt", k.passkey_prompt(KEY, 60, 25))
policy = os.environ.get("KVC_CACHE_TYPES_POLICY", "dbudget").split()
common = ["-n", "6", "-b", "256", "-c", "2048"]

for label, extra in (("f16, fa on", ["-fa", "on"]),
                     ("q8_0, fa on", ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]),
                     ("f16, fa off", ["-fa", "off"]),
                     ("q4_0 K, fa on", ["-ctk", "q4_0", "-fa", "on"])):
    full = k.kvc_run(prompt, *common, *extra)
    r = k.kvc_run(prompt, *common, *extra, "--kv-policy", *policy[:1], *sum((["--kv-policy-param", p] for p in policy[1:]), []), check=False)
    if not isinstance(r, dict):
        c.check(False, "[%s] %s runs: %s" % (label, policy[0], r.stderr[-500:]))
        continue
    c.check(str(KEY) in full["answer"], "[%s] full cache finds the key (%r)" % (label, full["answer"]))
    c.check(r["cells_evicted"] > 0 and r["answer"] == full["answer"],
            "[%s] %s evicts %d of %d cells and answers %r == full"
            % (label, policy[0], r["cells_evicted"], r["cells_evicted"] + r["cells_held"], r["answer"]))
c.done()

#!/usr/bin/env python3
"""Two sequences in one cache with eviction: no corruption, each answer equals the answer of the
same sequence run alone with the same policy. Both with one stream per sequence (default) and with
a unified cache (-kvu), where the cells of the two sequences interleave and the second prompt
refills the holes the first one's eviction left."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_two_seqs")
p0 = k.write_prompt("seq0.txt", k.passkey_prompt(11111, 40, 10))
p1 = k.write_prompt("seq1.txt", k.passkey_prompt(72965, 55, 40))
policy = os.environ.get("KVC_TWO_SEQS_POLICY", "dbudget")
common = ["-n", "6", "-b", "256", "--kv-policy", policy]

single = []
for p in (p0, p1):
    r = k.kvc_run(p, "-c", "2048", *common)
    single.append(r)
    print("  single: n_prompt %d, answer %r, evicted %d" % (r["n_prompt"], r["answer"], r["cells_evicted"]))
c.check(all(s["cells_evicted"] > 0 for s in single), "%s evicts in both single runs" % policy)

for label, extra in (("2 streams", ["-c", "4096", "-np", "2"]), ("unified", ["-c", "4096", "-np", "2", "--kvc-unified"])):
    r = k.kvc_run(p0, "--kvc-prompt2", p1, *extra, *common, check=False)
    if not isinstance(r, dict):
        c.check(False, "[%s] runs: %s" % (label, r.stderr[-800:]))
        continue
    for i, s in enumerate(r["seqs"]):
        c.check(s["answer"] == single[i]["answer"] and s["cells_evicted"] > 0,
                "[%s] seq %d answer %r == single %r (held %d, evicted %d)"
                % (label, i, s["answer"], single[i]["answer"], s["cells_held"], s["cells_evicted"]))

# joint prefill into tight streams: one call holds 256 tokens of each sequence, each stream has 1024
# cells, the longer prompt only fits because of eviction; the room kept free for the next batch must
# be counted per stream (256), not per call (512), so each sequence behaves as when run alone
tight = ["--kv-policy", "streaming", "-n", "6"]  # its budget is the cap itself
alone = [k.kvc_run(p, "-c", "1024", "-b", "256", *tight) for p in (p0, p1)]
r = k.kvc_run(p0, "--kvc-prompt2", p1, "--kvc-joint", "-c", "2048", "-np", "2", "-b", "512", *tight, check=False)
if not isinstance(r, dict):
    c.check(False, "[joint, tight streams] runs: %s" % r.stderr[-800:])
else:
    for i, s in enumerate(r["seqs"]):
        c.check(s["answer"] == alone[i]["answer"] and s["cells_held"] == alone[i]["cells_held"],
                "[joint, tight streams] seq %d answer %r == alone %r, cells held %d == %d"
                % (i, s["answer"], alone[i]["answer"], s["cells_held"], alone[i]["cells_held"]))
c.done()

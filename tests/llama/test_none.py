#!/usr/bin/env python3
"""`--kv-policy none` changes nothing: the logits of every step are bit-identical to an unpatched
llama.cpp (build/base/llama, `scripts/llama.sh baseline`), for f16 and q8_0 caches, FA on and off."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_none")
if not os.path.exists(os.path.join(k.BASE_BIN, "kvc-run")):
    print("FAIL test_none: no unpatched build at %s (run scripts/llama.sh baseline)" % k.BASE_BIN)
    sys.exit(1)

prompt = k.write_prompt("none.txt", k.passkey_prompt(31337, 12, 5))
cases = [
    ["-c", "1024", "-b", "64"],
    ["-c", "1024", "-b", "64", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"],
    ["-c", "1024", "-b", "64", "-fa", "off"],
]
for extra in cases:
    tag = " ".join(extra)
    files = {}
    for name, bin_dir, pol in (("base", k.BASE_BIN, []), ("patched", k.BIN, ["--kv-policy", "none"]),
                               ("patched-default", k.BIN, [])):
        path = os.path.join(k.TMP, "logits-%s.bin" % name)
        if os.path.exists(path):
            os.remove(path)
        r = k.kvc_run(prompt, "-n", "8", "--kvc-logits", path, *extra, *pol, bin_dir=bin_dir)
        files[name] = (open(path, "rb").read(), r["answer"])
    base = files["base"][0]
    c.check(len(base) > 0, "[%s] unpatched build wrote %d bytes of logits" % (tag, len(base)))
    for name in ("patched", "patched-default"):
        c.check(files[name][0] == base, "[%s] %s logits bit-identical to unpatched (answer %r)" % (tag, name, files[name][1]))

# a query-capturing policy that keeps everything: the capture itself must not change the logits
extra = ["-c", "1024", "-b", "64"]
paths = []
for name, bin_dir, pol in (("base", k.BASE_BIN, []), ("keepall", k.BIN, ["--kv-policy", "snapkv", "--kv-policy-param", "tokens=100000"])):
    path = os.path.join(k.TMP, "logits-%s.bin" % name)
    if os.path.exists(path):
        os.remove(path)
    r = k.kvc_run(prompt, "-n", "8", "--kvc-logits", path, *extra, *pol, bin_dir=bin_dir)
    paths.append((open(path, "rb").read(), r))
c.check(paths[1][1]["cells_evicted"] == 0 and paths[1][0] == paths[0][0],
        "snapkv tokens=100000 (queries captured, nothing evicted: %d) bit-identical to unpatched" % paths[1][1]["cells_evicted"])
c.done()

#!/usr/bin/env python3
"""Faults: what the patched tools do when libkvcompress or the policy fails.

- libkvcompress missing (LLAMA_KVCOMPRESS_LIB points nowhere): --kv-policy none runs and gives the
  same logits as with the library; --kv-policy snapkv stops at startup with a message naming the
  flag, the path and dlerror (no crash); llama-server starts, answers a request without a policy
  and answers a per-request kv_policy with HTTP 400;
- wrong ABI (a stub .so whose kvc_abi_version() returns 999, built here with cc) and a stub with
  the right ABI but no other symbols: refused at startup with the reason;
- backend=cuda without a CUDA device (or without the library's cuda feature): startup error, and
  HTTP 400 per request; backend=tpu refused; backend=auto on host K plans like backend=cpu;
- a policy error mid-generation (KVC_FAILPOINT=plan:N, the library's test failpoint): kvc-run and
  llama-completion stop with the library's message; llama-server fails that request (HTTP 500 with
  the message), stays healthy, and the next request on the same slot gives the same answer as
  before the failure;
- state save/load of a compressed sequence: llama_state_seq_get_data/set_data round-trips
  (kvc-run --kvc-state-roundtrip: the continuation after the restore equals the one before, and
  the policy starts fresh for the restored sequence); the server's /slots save/restore of a
  compressed slot: continuing after the restore equals continuing before it.
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_faults")
t_start = time.time()
os.makedirs(k.TMP, exist_ok=True)

PROMPT = k.write_prompt("faults.txt", k.passkey_prompt(31337, 14, 6))
MISSING = os.path.join(k.TMP, "no-such-dir", "libkvcompress.so")


def kvc_run(*extra, env=None):
    """kvc-run on PROMPT; returns (rc, json or None, stderr)."""
    args = ["kvc-run", "-m", k.MODEL, "-f", PROMPT, "-t", k.THREADS, "--no-warmup", "-c", "1024"] + list(extra)
    p = k.run(args, check=False, env=env)
    out = None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            break
    return p.returncode, out, p.stderr


def last_error_line(err):
    lines = [l for l in err.splitlines() if "error" in l.lower() or "kv-policy" in l or "kv_policy" in l]
    return (lines[-1] if lines else err.strip().splitlines()[-1] if err.strip() else "")[:400]


def clean_exit(rc):
    """an error exit, not a signal (negative) or an abort (134 from a shell)"""
    return 0 < rc < 128


# ---------------------------------------------------------------------------------------------
# 1. the library missing or of the wrong ABI

logits_ref = os.path.join(k.TMP, "faults-none-ref.bin")
logits_missing = os.path.join(k.TMP, "faults-none-missing.bin")
for f in (logits_ref, logits_missing):
    if os.path.exists(f):
        os.remove(f)
rc0, ref, _ = kvc_run("-n", "4", "--kv-policy", "none", "--kvc-logits", logits_ref)
rc1, out, err = kvc_run("-n", "4", "--kv-policy", "none", "--kvc-logits", logits_missing, env={"LLAMA_KVCOMPRESS_LIB": MISSING})
same = rc0 == 0 and rc1 == 0 and open(logits_ref, "rb").read() == open(logits_missing, "rb").read()
c.check(same and out["answer"] == ref["answer"],
        "library missing: --kv-policy none runs (rc %d) with the same logits as with the library (%r)" % (rc1, out and out["answer"]))

rc, out, err = kvc_run("-n", "4", "--kv-policy", "snapkv", env={"LLAMA_KVCOMPRESS_LIB": MISSING})
msg = last_error_line(err)
c.check(clean_exit(rc) and "--kv-policy snapkv" in err and MISSING in err and "cannot open shared object file" in err,
        "library missing: --kv-policy snapkv refused at startup (rc %d): %s" % (rc, msg))

p = k.run(["llama-completion", "-m", k.MODEL, "-f", PROMPT, "-t", k.THREADS, "-n", "4", "--no-warmup", "-no-cnv",
           "--temp", "0"], check=False, env={"LLAMA_KVCOMPRESS_LIB": MISSING})
c.check(p.returncode == 0, "library missing: llama-completion (default policy none) runs (rc %d)" % p.returncode)

stub_dir = os.path.join(k.TMP, "stub")
os.makedirs(stub_dir, exist_ok=True)
stubs = {}
# the right ABI version is the header's (it is bumped whenever a struct or signature changes)
ABI = int(re.search(r"#define KVC_ABI_VERSION (\d+)", open(os.path.join(k.ROOT, "include", "kvcompress.h")).read()).group(1))
for name, abi in (("abi999", 999), ("abi-right-empty", ABI)):
    src = os.path.join(stub_dir, name + ".c")
    with open(src, "w") as f:
        f.write("#include <stdint.h>\nuint32_t kvc_abi_version(void) { return %d; }\n" % abi)
    so = os.path.join(stub_dir, "lib%s.so" % name)
    cc = subprocess.run(["cc", "-shared", "-fPIC", "-o", so, src], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    c.check(cc.returncode == 0, "stub %s built with cc %s" % (name, cc.stdout.strip()[:200]))
    stubs[name] = so

rc, out, err = kvc_run("-n", "4", "--kv-policy", "snapkv", env={"LLAMA_KVCOMPRESS_LIB": stubs["abi999"]})
c.check(clean_exit(rc) and "ABI version 999" in err and "this build expects" in err and stubs["abi999"] in err,
        "wrong ABI: refused at startup (rc %d): %s" % (rc, last_error_line(err)))
rc, out, err = kvc_run("-n", "4", "--kv-policy", "none", env={"LLAMA_KVCOMPRESS_LIB": stubs["abi999"]})
c.check(rc == 0 and out is not None, "wrong ABI: --kv-policy none still runs (rc %d)" % rc)
rc, out, err = kvc_run("-n", "4", "--kv-policy", "snapkv", env={"LLAMA_KVCOMPRESS_LIB": stubs["abi-right-empty"]})
c.check(clean_exit(rc) and "has no symbol kvc_" in err,
        "right ABI, missing symbols: refused at startup (rc %d): %s" % (rc, last_error_line(err)))

# ---------------------------------------------------------------------------------------------
# 2. CUDA requested without a device

rc, out, err = kvc_run("-n", "4", "--kv-policy", "snapkv", "--kv-policy-param", "backend=cuda")
c.check(clean_exit(rc) and "backend=cuda" in err and ("CUDA unavailable" in err or "host memory" in err),
        "backend=cuda: refused at startup (rc %d): %s" % (rc, last_error_line(err)))
rc, out, err = kvc_run("-n", "4", "--kv-policy", "snapkv", "--kv-policy-param", "backend=tpu")
c.check(clean_exit(rc) and "'backend'" in err, "backend=tpu: refused at startup (rc %d): %s" % (rc, last_error_line(err)))
rc, out, err = kvc_run("-n", "4", "--kv-policy", "snapkv", "--kv-policy-param", "backend=cpu")
c.check(rc == 0 and out is not None and out["cells_evicted"] > 0, "backend=cpu: runs and evicts (rc %d)" % rc)
# backend=auto (the default since C ABI 2): K in host memory is planned on the CPU, the same plan
rc2, out2, err2 = kvc_run("-n", "4", "--kv-policy", "snapkv", "--kv-policy-param", "backend=auto")
c.check(rc2 == 0 and out2 is not None and out is not None and out2["cells_evicted"] == out["cells_evicted"]
        and out2["answer"] == out["answer"],
        "backend=auto on host K: the CPU's plan (rc %d, evicted %s vs %s)"
        % (rc2, out2 and out2.get("cells_evicted"), out and out.get("cells_evicted")))

# ---------------------------------------------------------------------------------------------
# 3. the policy fails mid-generation (library failpoint: the 2nd plan call panics inside the library)

fp = {"KVC_FAILPOINT": "plan:2"}
rc, out, err = kvc_run("-n", "16", "--kv-policy", "snapkv", "--kv-policy-param", "interval=4", env=fp)
c.check(rc == 3 and "kvc failpoint" in err and "kvc_evictor_plan" in err and "decode step" in err and "--kv-policy snapkv" in err,
        "failpoint in kvc-run: stops mid-generation with the library's message (rc %d): %s" % (rc, last_error_line(err)))
p = k.run(["llama-completion", "-m", k.MODEL, "-f", PROMPT, "-t", k.THREADS, "-n", "16", "--no-warmup", "-no-cnv", "--temp", "0",
           "--kv-policy", "snapkv", "--kv-policy-param", "interval=4"], check=False, env=fp)
c.check(clean_exit(p.returncode) and "kvc failpoint" in p.stderr and "--kv-policy snapkv" in p.stderr,
        "failpoint in llama-completion: stops with the library's message (rc %d): %s" % (p.returncode, last_error_line(p.stderr)))

# ---------------------------------------------------------------------------------------------
# 4. state save/load of a compressed sequence (llama_state_seq_get_data / set_data)

rc, out, err = kvc_run("-n", "12", "--kv-policy", "snapkv", "--kv-policy-param", "interval=0", "--kvc-state-roundtrip")
rt = out.get("roundtrip") if out else None
c.check(rc == 0 and rt is not None and out["cells_evicted"] > 0 and rt["answer"] == out["answer"] and rt["cells_held"] == out["cells_held"],
        "state round trip of a compressed sequence: same continuation before/after the restore (%r / %r, cells %s / %s, %s bytes)"
        % (rt and rt["answer"], out and out["answer"], rt and rt["cells_held"], out and out["cells_held"], rt and rt["state_bytes"]))
c.check("state restored, the policy starts fresh" in err, "the policy starts fresh for the restored sequence (log line)")
rc, out, err = kvc_run("-n", "12", "--kv-policy", "snapkv", "--kv-policy-param", "interval=4", "--kvc-state-roundtrip")
c.check(rc == 0 and out is not None and out["cells_held"] < out["n_prompt"],
        "state round trip with decode-time eviction after the restore: runs and evicts (rc %d, %s cells for %s tokens, answers %r / %r)"
        % (rc, out and out["cells_held"], out and out["n_prompt"], out and out["roundtrip"]["answer"], out and out["answer"]))


# ---------------------------------------------------------------------------------------------
# servers

prompt_text = open(PROMPT).read()

# the library missing: the server still serves, a per-request policy gets 400; --kv-policy at startup is refused
p = k.run(["llama-server", "-m", k.MODEL, "--port", str(k.free_port()), "--kv-policy", "snapkv"], check=False,
          env={"LLAMA_KVCOMPRESS_LIB": MISSING})
c.check(clean_exit(p.returncode) and "--kv-policy snapkv" in p.stderr + p.stdout and MISSING in p.stderr + p.stdout,
        "library missing: llama-server --kv-policy snapkv refused at startup (rc %d)" % p.returncode)

srv = k.Server("nolib", ["-np", "1", "-c", "1024"], env={"LLAMA_KVCOMPRESS_LIB": MISSING})
try:
    up = srv.wait_up()
    c.check(up, "library missing: llama-server starts (pid %d)" % srv.proc.pid)
    if up:
        st, body = srv.req("/completion", {"prompt": prompt_text, "n_predict": 4, "temperature": 0})
        c.check(st == 200 and body.get("content", "").strip() != "", "library missing: a request without kv_policy answers (%d)" % st)
        st, body = srv.req("/completion", {"prompt": prompt_text, "n_predict": 4, "kv_policy": "snapkv"})
        c.check(st == 400 and "kv_policy" in k.err_msg(body) and "cannot load libkvcompress" in k.err_msg(body),
                "library missing: per-request kv_policy -> %d: %s" % (st, k.err_msg(body)[:200]))
        st, _ = srv.req("/health")
        c.check(st == 200, "library missing: /health ok")
finally:
    srv.stop()

# the failpoint server: the 3rd plan call fails; slot save/restore afterwards
slot_dir = os.path.join(k.TMP, "faults-slots")
os.makedirs(slot_dir, exist_ok=True)
srv = k.Server("failpoint", ["-np", "1", "-c", "2048", "--slot-save-path", slot_dir, "--kv-policy-allow-params", "all"],
               env={"KVC_FAILPOINT": "plan:3"})
try:
    up = srv.wait_up()
    c.check(up, "failpoint server starts (pid %d)" % srv.proc.pid)
    if not up:
        raise SystemExit(c.done())
    st, body = srv.req("/completion", {"prompt": prompt_text, "n_predict": 4,
                                       "kv_policy": {"name": "snapkv", "params": {"backend": "cuda"}}})
    c.check(st == 400 and "backend=cuda" in k.err_msg(body), "per-request backend=cuda -> %d: %s" % (st, k.err_msg(body)[:200]))
    pol0 = {"name": "snapkv", "params": {"interval": 0}}
    body_a = {"prompt": prompt_text, "n_predict": 8, "temperature": 0, "cache_prompt": False, "id_slot": 0, "kv_policy": pol0}
    st, a = srv.req("/completion", body_a)                                             # plan 1
    ok_a = st == 200 and a["timings"]["kv_policy"]["cells_evicted"] > 0
    c.check(ok_a, "request A (snapkv at the prompt end): %d %r %s" % (st, a.get("content") if st == 200 else k.err_msg(a),
                                                                      a.get("timings", {}).get("kv_policy") if st == 200 else ""))

    st, b = srv.req("/completion", {"prompt": prompt_text, "n_predict": 16, "temperature": 0, "cache_prompt": False, "id_slot": 0,
                                    "kv_policy": {"name": "snapkv", "params": {"interval": 4}}})  # plan 2 ok, plan 3 fails
    c.check(st == 500 and "kvc failpoint" in k.err_msg(b) and "kv_policy" in k.err_msg(b),
            "request B fails mid-generation with the library's message: %d %s" % (st, k.err_msg(b)[:240]))
    st, _ = srv.req("/health")
    c.check(st == 200, "/health ok after the failure")
    st, slots = srv.req("/slots")
    if st == 200 and isinstance(slots, list):
        c.check(not slots[0].get("is_processing", True), "slot 0 is idle after the failure")

    st, c2 = srv.req("/completion", dict(body_a, cache_prompt=True))                   # plan 4
    c.check(ok_a and st == 200 and c2["content"] == a["content"] and c2["timings"]["kv_policy"]["cells_evicted"] > 0,
            "request C on the same slot after the failure: same answer as A (%r), policy runs again (%s)"
            % (c2.get("content") if st == 200 else k.err_msg(c2), c2.get("timings", {}).get("kv_policy") if st == 200 else ""))

    # /slots save/restore of the compressed slot: continuing after the restore = continuing before it
    st, sv = srv.req("/slots/0?action=save", {"filename": "faults-slot0.bin"})
    c.check(st == 200 and sv.get("n_saved", 0) > 0, "slot 0 saved (%d): %s" % (st, sv))
    cont = {"prompt": prompt_text + c2.get("content", ""), "n_predict": 8, "temperature": 0, "cache_prompt": True, "id_slot": 0,
            "kv_policy": "none"}
    st1, e1 = srv.req("/completion", cont)
    st, rs = srv.req("/slots/0?action=restore", {"filename": "faults-slot0.bin"})
    c.check(st == 200 and rs.get("n_restored", 0) > 0, "slot 0 restored (%d): %s" % (st, rs))
    st2, e2 = srv.req("/completion", cont)
    n1 = e1.get("timings", {}).get("cache_n", -1) if st1 == 200 else -1
    n2 = e2.get("timings", {}).get("cache_n", -1) if st2 == 200 else -1
    c.check(st1 == 200 and st2 == 200 and e1["content"] == e2["content"] and n1 > 0 and n2 == n1,
            "continuing the compressed slot: before the restore %r (cache_n %d), after %r (cache_n %d)"
            % (e1.get("content"), n1, e2.get("content"), n2))
    st, _ = srv.req("/health")
    c.check(st == 200, "/health ok at the end")
finally:
    log = srv.stop()
c.check("state restored, the policy starts fresh" in log, "server: the policy starts fresh for the restored slot (log line)")

print("  test_faults ran in %.1f s" % (time.time() - t_start))
c.done()

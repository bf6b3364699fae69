#!/usr/bin/env python3
"""The KV-cache policy hook with remote layers: llama.cpp's RPC backend, SmolLM2-135M, -t 1.

Two ggml-rpc-server processes on 127.0.0.1 (`-t 1`, killed at the end, at most RPC_LIFETIME seconds),
the tools run with `--rpc 127.0.0.1:P1,127.0.0.1:P2 -ngl 99`, so every repeating layer and its KV
cache live in the servers' buffers (not host memory: the hook reads K with ggml_backend_tensor_get, one
round trip per call, and the RPC buffer has no 2-D get/set). A ~900-token passkey prompt, -fa off (the
transposed V, the re-pack's column copies).

1. the KV cache buffers land on both RPC devices (the load log), none in local host memory.
2. llama-completion, dbudget (token granularity, -c 512: evicts while the prompt goes in) and snapkv
   ratio=0.5 granularity=layer (-c 1024: masks + re-pack): the generated text, cells held and cells
   evicted equal the local run's (no --rpc), held + evicted == prompt + decoded, the key is found.
3. the hook's cache I/O per plan over RPC (LLAMA_KV_POLICY_IO_STATS=1, patch 0007): no per-row round
   trip: gets + sets per plan (the library's runs) <= 6 per layer (one read of K per layer and range of
   nearby cells; one get and one set of K and of V per layer in the re-pack). Before 0007
   (LLAMA_KV_POLICY_IO=rows) the re-pack paid ~1.3 M round trips per plan here (not run: ~4 min).
4. kvc-run, 16 steps: the logits over RPC are bit-identical to the local run's for snapkv
   granularity=layer and adakv granularity=head with -fa off, and to the per-row copies over RPC
   (LLAMA_KV_POLICY_IO=rows) for snapkv granularity=layer -fa on: the batched re-pack leaves the same
   bytes in the cache.
5. llama-server with --rpc (--kv-policy dbudget -c 512, and a per-request snapkv granularity=layer):
   the answers, cells held and evicted equal a local server's, held + evicted == tokens decoded.
"""
import array
import os
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_rpc")
KEY = 58213
prompt_text = k.passkey_prompt(KEY, 36, 22)
prompt = k.write_prompt("rpc-prompt.txt", prompt_text)
IO = re.compile(r"kv-policy io \(remote buffers: (\w+)\): on_seq calls (\d+), gets (\d+) \((\d+) bytes\), sets (\d+) \((\d+) bytes\), ([\d.]+) ms")
KV_BUF = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size")  # RPC: RPC0[host:port] (the endpoint tells them apart)
N_PREDICT = 8
N_LAYER = 30  # SmolLM2-135M
BOUND = 6     # transfers per layer and plan: K read (a range or two), re-pack get + set of K and of V
RPC_LIFETIME = 300

SNAP = ["--kv-policy", "snapkv", "--kv-policy-param", "ratio=0.5,granularity=layer"]
POLICIES = [  # (label, -c, args): -fa off by default (transposed V)
    ("dbudget", "512", ["--kv-policy", "dbudget"]),
    ("snapkv layer", "1024", SNAP),
]


def start_rpc(name):
    port = k.free_port()
    log = open(os.path.join(k.TMP, "rpc-%s.log" % name), "w")
    # bounded lifetime: `timeout` ends the server even if this script dies before its finally
    proc = subprocess.Popen(["timeout", str(RPC_LIFETIME), os.path.join(k.BIN, "ggml-rpc-server"),
                             "-H", "127.0.0.1", "-p", str(port), "-t", "1"], stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < 30 and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, log
        except OSError:
            time.sleep(0.2)
    return proc, None, log


def completion(ctx, extra, rpc=None, env=None):
    # -v: the KV buffer lines and the I/O line are info logs of libllama
    args = ["-fa", "off", "--kv-policy-stats", "-v"] + (["--rpc", rpc, "-ngl", "99"] if rpc else [])
    return k.completion(prompt, ctx, N_PREDICT, *(args + list(extra)), env=env)


def summary(p):
    return dict(k.policy_stats(p.stderr), rc=p.returncode, text=p.stdout.strip(),
                kv_bufs=KV_BUF.findall(p.stderr), io=IO.search(p.stderr))


def ask(srv, policy=None):
    body = {"prompt": prompt_text, "n_predict": N_PREDICT, "temperature": 0, "cache_prompt": False}
    if policy:
        body["kv_policy"] = policy
    st, b = srv.req("/completion", body)
    tm = b.get("timings", {}) if isinstance(b, dict) else {}
    kv = tm.get("kv_policy", {})
    return {"status": st, "content": b.get("content") if st == 200 else None,
            "held": kv.get("cells_held", -1), "evicted": kv.get("cells_evicted", -1),
            "decoded": tm.get("cache_n", 0) + tm.get("prompt_n", 0) + tm.get("predicted_n", 0) - 1}


SNAP_REQ = {"name": "snapkv", "params": {"ratio": 0.5, "granularity": "layer"}}


def server_run(label, rpc=None):
    args = ["-c", "512", "-np", "1", "-fa", "off", "--kv-policy", "dbudget", "-v"]
    if rpc:
        args += ["--rpc", rpc, "-ngl", "99"]
    srv = k.Server(label, args)
    out = {}
    try:
        if not srv.wait_up():
            c.check(False, "%s: server starts" % label)
            return out, ""
        out["dbudget"] = ask(srv)
        out["snapkv layer"] = ask(srv, SNAP_REQ)
    finally:
        log = srv.stop()
    return out, log


os.makedirs(k.TMP, exist_ok=True)
servers = []
try:
    for name in ("a", "b"):
        servers.append(start_rpc(name))
    ports = [s[1] for s in servers]
    c.check(all(ports), "two ggml-rpc-server on 127.0.0.1 listen (ports %s)" % ports)
    if not all(ports):
        c.done()
    rpc = ",".join("127.0.0.1:%d" % p for p in ports)

    for label, ctx, extra in POLICIES:
        loc = summary(completion(ctx, extra))
        rem = summary(completion(ctx, extra, rpc=rpc, env={"LLAMA_KV_POLICY_IO_STATS": "1"}))
        if label == "dbudget":
            devs = sorted(set(rem["kv_bufs"]))
            c.check(len(devs) == 2 and all(d.startswith("RPC") for d in devs),
                    "the KV cache buffers are on the two RPC devices: %s" % rem["kv_bufs"])
        for where, r in (("local", loc), ("rpc", rem)):
            c.check(r["rc"] == 0 and r["evicted"] > 0 and r["held"] + r["evicted"] == r["n_prompt"] + r["n_gen"],
                    "%s, %s: rc %d, held %d + evicted %d == prompt %d + decoded %d"
                    % (label, where, r["rc"], r["held"], r["evicted"], r["n_prompt"], r["n_gen"]))
        c.check(str(KEY) in loc["text"], "%s, local: finds the key (%r)" % (label, loc["text"]))
        c.check(rem["text"] == loc["text"] and (rem["held"], rem["evicted"]) == (loc["held"], loc["evicted"]),
                "%s over RPC == local: %r, held/evicted %d/%d (local %r, %d/%d)"
                % (label, rem["text"], rem["held"], rem["evicted"], loc["text"], loc["held"], loc["evicted"]))
        io = rem["io"]
        if io:
            gets, b_get, sets, b_set, ms = (int(io.group(3)), int(io.group(4)), int(io.group(5)), int(io.group(6)),
                                            float(io.group(7)))
            plans = max(1, rem["runs"])
            per = (gets + sets)/plans
            c.check(io.group(1) == "batched" and gets > 0 and per <= BOUND*N_LAYER,
                    "%s over RPC, the hook's cache I/O: %d plans, %.1f gets+sets per plan (bound %d per layer), "
                    "%.0f KiB per plan, %.1f ms per plan" % (label, plans, per, BOUND, (b_get + b_set)/1024/plans, ms/plans))
        else:
            c.check(False, "%s over RPC: LLAMA_KV_POLICY_IO_STATS=1 printed the I/O line" % label)

    # the re-packed cache holds the same bytes as the local one: kvc-run's logits of 16 steps are bit-identical,
    # per layer and per KV head (the head's slice of the K rows and of the transposed V's dimensions); with -fa on
    # (V rows) against the per-row copies over RPC (LLAMA_KV_POLICY_IO=rows; per-head masks with FA on are per
    # layer on a non-CPU device, patch 0003, so -fa on is not compared with the local run)
    ADA = ["--kv-policy", "adakv", "--kv-policy-param", "ratio=0.5,granularity=head"]
    for label, pargs, ref in (("snapkv layer -fa off", SNAP + ["-fa", "off"], "local"),
                              ("adakv head -fa off", ADA + ["-fa", "off"], "local"),
                              ("snapkv layer -fa on", SNAP + ["-fa", "on"], "rows")):
        lg = {}
        for where in (ref, "rpc"):
            extra = [] if where == "local" else ["--rpc", rpc, "-ngl", "99"]
            path = os.path.join(k.TMP, "rpc-logits-%s.bin" % where)
            if os.path.exists(path):
                os.remove(path)
            os.environ.pop("LLAMA_KV_POLICY_IO", None)
            if where == "rows":
                os.environ["LLAMA_KV_POLICY_IO"] = "rows"
            r = k.kvc_run(prompt, "-c", "1024", "-n", "16", "--kvc-logits", path, *(pargs + extra), check=False)
            os.environ.pop("LLAMA_KV_POLICY_IO", None)
            if isinstance(r, dict) and os.path.exists(path):
                a = array.array("f")
                with open(path, "rb") as f:
                    a.frombytes(f.read())
                lg[where] = (r, a)
        if len(lg) == 2:
            (rl, al), (rr, ar) = lg[ref], lg["rpc"]
            c.check(len(al) == len(ar) > 0 and al == ar and rl["cells_held"] == rr["cells_held"] and rr["cells_evicted"] > 0,
                    "kvc-run %s, 16 steps: logits over RPC bit-identical to %s (%d values, max |d| %g), held %d/%d"
                    % (label, "the local run" if ref == "local" else "the per-row copies over RPC", len(ar),
                       max((abs(x - y) for x, y in zip(al, ar)), default=-1), rr["cells_held"], rl["cells_held"]))
        else:
            c.check(False, "kvc-run %s: %s and over RPC with --kvc-logits: %s" % (label, ref, sorted(lg)))

    loc, _ = server_run("rpc-local")
    rem, log = server_run("rpc-remote", rpc=rpc)
    devs = sorted(set(KV_BUF.findall(log)))
    c.check(len(devs) == 2 and all(d.startswith("RPC") for d in devs), "llama-server: the KV cache is on the RPC devices: %s" % devs)
    for label in ("dbudget", "snapkv layer"):
        a, b = loc.get(label), rem.get(label)
        if not (a and b):
            c.check(False, "llama-server %s: both servers answered" % label)
            continue
        c.check(b["status"] == 200 and b["evicted"] > 0 and b["held"] + b["evicted"] == b["decoded"],
                "llama-server over RPC, %s: HTTP %d, held %d + evicted %d == tokens decoded %d"
                % (label, b["status"], b["held"], b["evicted"], b["decoded"]))
        c.check(a["status"] == 200 and (b["content"], b["held"], b["evicted"]) == (a["content"], a["held"], a["evicted"]),
                "llama-server %s over RPC == local: %r, held/evicted %d/%d (local %r, %d/%d)"
                % (label, b["content"], b["held"], b["evicted"], a["content"], a["held"], a["evicted"]))
finally:
    for proc, _, log in servers:
        k.stop_process(proc, timeout=5)
        log.close()
c.done()

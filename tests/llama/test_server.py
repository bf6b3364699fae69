#!/usr/bin/env python3
"""llama-server with --kv-policy and per-request kv_policy.

Server on 127.0.0.1 (ephemeral port), 4 slots, -t 1. Checks:
- 8 concurrent requests with mixed kv_policy (default, string, object with params; /completion and
  /v1/chat/completions) all answer, and report timings.kv_policy {name, cells_held, cells_evicted};
- the passkey survives the default policy;
- a malformed kv_policy (unknown name, bad value, wrong type) gets HTTP 400 with the reason, so does
  a body that is not JSON (upstream answers 500: patch 0005), and
  /health is still ok afterwards;
- a prompt longer than the slot context is accepted with a policy (cells held are what counts) and
  refused without one;
- a prompt that diverges inside a compressed prefix is re-processed (cache_n == 0);
- /metrics counts evicted cells.
The server is stopped by its PID.
"""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_server")


PORT = k.free_port()
URL = "http://127.0.0.1:%d" % PORT
N_CTX_SLOT = 1024
log_path = os.path.join(k.TMP, "server.log")
os.makedirs(k.TMP, exist_ok=True)
log = open(log_path, "w")
srv = subprocess.Popen([os.path.join(k.BIN, "llama-server"), "-m", k.MODEL, "--host", "127.0.0.1", "--port", str(PORT),
                        "-np", "4", "-c", str(4 * N_CTX_SLOT), "-t", "1", "-b", "256", "--metrics", "--no-warmup", "--cache-ram", "0",
                        "--kv-policy-allow-params", "all",  # a request sets window (within the default cost bound)
                        "--kv-policy", "dbudget"], stdout=log, stderr=subprocess.STDOUT)


def req(path, body=None, timeout=600):
    return k.http_json(URL + path, body, timeout)


try:
    t0 = time.time()
    while True:
        try:
            st, body = req("/health", timeout=5)
            if st == 200:
                break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if srv.poll() is not None or time.time() - t0 > 120:
            print(open(log_path).read()[-3000:])
            c.check(False, "server starts")
            c.done()
        time.sleep(0.5)
    c.check(True, "server up on 127.0.0.1:%d (pid %d)" % (PORT, srv.pid))

    keys = [10000 + 7919 * i for i in range(8)]
    prompts = [k.passkey_prompt(keys[i], 30, 5 + 3 * i) for i in range(8)]
    policies = [None, "snapkv", {"name": "streaming", "params": {"tokens": 128}}, {"name": "dbudget"},
                "none", {"name": "snapkv", "params": {"tokens": 256, "window": 16}}, "gvote", None]
    results = [None] * 8

    def worker(i):
        body = {"n_predict": 6, "temperature": 0, "cache_prompt": False}
        if policies[i] is not None:
            body["kv_policy"] = policies[i]
        if i % 2 == 0:
            body["prompt"] = prompts[i]
            results[i] = req("/completion", body)
        else:
            body["messages"] = [{"role": "user", "content": prompts[i]}]
            body["max_tokens"] = body.pop("n_predict")
            results[i] = req("/v1/chat/completions", body)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("  8 concurrent requests in %.1f s" % (time.time() - t0))
    for i, (st, body) in enumerate(results):
        pol = policies[i]
        name = "dbudget" if pol is None else (pol if isinstance(pol, str) else pol["name"])
        if st != 200:
            c.check(False, "request %d (%s) -> %d %s" % (i, name, st, str(body)[:300]))
            continue
        text = body["content"] if "content" in body else body["choices"][0]["message"]["content"]
        kv = body.get("timings", {}).get("kv_policy")
        ok = bool(text.strip()) and kv is not None and kv["name"] == name and kv["cells_held"] > 0
        if name not in ("none", "gvote", "dbudget"):
            ok = ok and kv["cells_evicted"] > 0
        c.check(ok, "request %d kv_policy=%s: %r, kv_policy stats %s" % (i, json.dumps(pol), text[:40], kv))
        if i == 0:
            c.check(str(keys[0]) in text, "default policy (dbudget) keeps the passkey %d: %r" % (keys[0], text))

    for bad, why in (({"name": "nope"}, "unknown"), ({"name": "snapkv", "params": {"tokens": "abc"}}, "bad value"),
                     (42, "wrong type"), ({"name": "snapkv", "params": {"no_such_param": 1}}, "unknown param")):
        st, body = req("/completion", {"prompt": "hello", "n_predict": 2, "kv_policy": bad})
        msg = body.get("error", {}).get("message", "") if isinstance(body, dict) else str(body)
        c.check(st == 400 and "kv_policy" in msg, "malformed kv_policy (%s) -> %d: %s" % (why, st, msg[:120]))
    # a body that is not JSON: the client's error (400), not the server's (upstream: 500)
    for raw, why in ((b'{"prompt": "hello", "n_predict": ', "truncated JSON"), (b"prompt=hello", "not JSON")):
        r = urllib.request.Request(URL + "/completion", data=raw, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(r, timeout=60) as resp:
                st, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            st, text = e.code, e.read().decode()
        c.check(st == 400 and "invalid JSON" in text, "malformed body (%s) -> %d: %s" % (why, st, text[:120]))
    st, body = req("/health")
    c.check(st == 200, "/health still ok after the bad requests")

    # a prompt longer than the slot context: accepted with a policy, refused without
    long_prompt = k.passkey_prompt(4242, 60, 30)
    st, body = req("/completion", {"prompt": long_prompt, "n_predict": 4, "kv_policy": {"name": "snapkv", "params": {"tokens": 384}}})
    kv = body.get("timings", {}).get("kv_policy") if st == 200 else None
    c.check(st == 200 and kv and kv["cells_held"] < N_CTX_SLOT,
            "prompt of %s tokens > slot context %d accepted with snapkv: %s"
            % (body.get("tokens_evaluated", "?") if isinstance(body, dict) else "?", N_CTX_SLOT, kv))
    st, body = req("/completion", {"prompt": long_prompt, "n_predict": 4, "kv_policy": "none"})
    c.check(st != 200, "the same prompt without a policy is refused (%d)" % st)

    # divergence inside a compressed prefix -> re-processed; an uncompressed prefix is reused
    # (--cache-ram 0: the RAM prompt cache could otherwise restore an uncompressed copy)
    base = k.passkey_prompt(777, 30, 10)
    parts = base.split("The sky is blue.")
    variant = "The sky is blue.".join(parts[:20]) + "The sky is grey." + "The sky is blue.".join(parts[20:])
    for pol, expect_reuse in (("none", True), ({"name": "snapkv", "params": {"tokens": 128}}, False)):
        st1, b1 = req("/completion", {"prompt": base, "n_predict": 2, "id_slot": 1, "cache_prompt": True, "kv_policy": pol})
        st2, b2 = req("/completion", {"prompt": variant, "n_predict": 2, "id_slot": 1, "cache_prompt": True, "kv_policy": pol})
        cache_n = b2.get("timings", {}).get("cache_n", -1) if st2 == 200 else -1
        ok = st1 == 200 and st2 == 200 and ((cache_n > 0) if expect_reuse else (cache_n == 0))
        c.check(ok, "kv_policy=%s: diverging prompt reuses %d cached tokens (%s)"
                % (json.dumps(pol), cache_n, "reuse expected" if expect_reuse else "compressed prefix: must re-process"))

    st, body = req("/metrics")
    line = [l for l in str(body).splitlines() if l.startswith("llamacpp:kv_policy_evicted_cells_total")]
    val = float(line[0].split()[-1]) if line else -1
    c.check(st == 200 and val > 0, "/metrics: %s" % (line[0] if line else "no kv_policy_evicted_cells_total"))
    st, body = req("/health")
    c.check(st == 200, "/health ok at the end")
finally:
    k.stop_process(srv)
    log.close()
c.done()

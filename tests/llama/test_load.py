#!/usr/bin/env python3
"""llama-server with eviction under load (issue 7, part 2).

One server on 127.0.0.1 (ephemeral port), 8 slots of 2048 cells, --kv-policy dbudget, -t KVC_THREADS,
--cache-ram 0. A bounded client (12 worker threads) sends KVC_LOAD_REQUESTS requests (default 240)
drawn from a fixed-seed mix: per-request policies (default, none, dbudget, gvote, snapkv/streaming/h2o
with params ...), short prompts and passkey prompts of ~300-1450 tokens, /completion and
/v1/chat/completions, SSE streaming and not, cancellations (the socket is closed after a couple of
events, or right after the request), and malformed bodies. Checks:
- the server is alive at the end and /health is ok;
- a malformed kv_policy gets HTTP 400 naming kv_policy; bad JSON gets an error answer (upstream
  llama.cpp answers a JSON parse error with 500 "server_error" at this pin, so 400 or 500 is
  accepted there) and the other requests keep going;
- every well-formed, non-cancelled response is valid: 200, JSON (every SSE event too), content a
  string, timings.kv_policy {name, cells_held, cells_evicted} with the policy the request asked for;
- cells held agree with the server's own token accounting: cells_held + cells_evicted == the tokens
  the slot decoded (cache_n + prompt_n + predicted_n - 1: the last sampled token is never decoded;
  on /completion also == tokens_cached), cells_held <= those tokens, none evicts nothing, and the
  fixed-ratio policies do evict;
- passkey prompts under none, dbudget and gvote give the key that a fresh server with the full
  cache (kv_policy none) gives for the same prompt;
- /metrics kv_policy_evicted_cells_total grows by at least the evictions the responses report
  (cancelled requests evict too, unreported), no request is processing or deferred, no slot is busy;
- the server's RSS (VmRSS) after the load and after a settle is back within a tolerance of its idle
  level after a warm-up (see RSS_TOL_MIB), and the second half of the load added at most LEAK_TOL_MIB;
- after the load, one request run alone on every slot (temperature 0, fixed seed, no prompt cache)
  gives exactly the text and the kv stats of the same request on a fresh server with the same flags,
  and for each of them the cells held equal /slots n_prompt_tokens minus the growth of
  /metrics kv_policy_evicted_cells_total (the cell count derived from two other endpoints: the
  server exposes no cell count of its own besides timings.kv_policy);
- two prompt-cache cases the load hits by chance, made deterministic: a cached prefix with one
  evicted cell and a prompt that diverges inside it (must be re-processed), and a compressed prompt
  sent again verbatim (what a client retrying after a cancellation does) while another slot works.
Prints a summary line (with the server's CPU seconds: at -t 1 about the wall time on an idle core).
Servers are stopped by their PIDs.
"""
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_load")

N_SLOTS = 8
N_CTX_SLOT = 2048           # room for the longest passkey prompt (~1450 tokens) even under `none`
N_REQUESTS = int(os.environ.get("KVC_LOAD_REQUESTS", "240"))
N_WORKERS = 12              # more clients than slots: some requests wait in the server's queue
SEED = 7
# RSS after the load may exceed the idle level by this much. The KV cache (8 x 2048 cells, f16) and
# the compute buffers are allocated at startup and the warm-up runs every request shape once, so a
# healthy server only keeps allocator slack (glibc arenas of the HTTP threads, per-policy scratch of
# the largest view seen). That slack comes in steps: one run had a single 14 MiB step after 225
# requests and ended +25.6 MiB, others end +15. The leak detector is the second check: the second
# half of the load may add at most LEAK_TOL_MIB (a leak of 100 KiB per request adds 12 MiB there).
RSS_TOL_MIB = float(os.environ.get("KVC_LOAD_RSS_TOL_MIB", "32"))
LEAK_TOL_MIB = 8.0


class Server:
    def __init__(self, tag):
        self.port = k.free_port()
        self.log_path = os.path.join(k.TMP, "load-%s.log" % tag)
        os.makedirs(k.TMP, exist_ok=True)
        self.log = open(self.log_path, "w")
        env = dict(os.environ)
        # the binaries carry a RUNPATH to the tree they were built in: prefer the libraries next to
        # them, so KVC_LLAMA_BIN pointing at a copy of the build runs that copy
        env["LD_LIBRARY_PATH"] = k.BIN + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        # glibc gives each new thread an arena of its own, and the HTTP server starts extra threads when
        # its fixed ones are busy (cancelled connections linger until noticed): arenas it never returns,
        # a step of tens of MiB in RSS at a random moment. Two arenas keep RSS about what is allocated,
        # which is what the leak check is about; both servers get the same setting.
        env["MALLOC_ARENA_MAX"] = "2"
        # glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so
        # later scoring buffers of a few MiB come from the heap and stay resident after free(): RSS
        # then keeps its peak although nothing leaks. A fixed threshold keeps large buffers mmapped
        # and returned on free, so what remains above idle after the load is what is still allocated.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        self.proc = subprocess.Popen(
            [os.path.join(k.BIN, "llama-server"), "-m", k.MODEL, "--host", "127.0.0.1", "--port", str(self.port),
             "-np", str(N_SLOTS), "-c", str(N_SLOTS * N_CTX_SLOT), "-t", k.THREADS, "-b", "256",
             "--metrics", "--slots", "--no-warmup",
             # no RAM prompt cache: a slot's state must come only from what it processed (see test_server)
             "--cache-ram", "0",
             # requests set window, samples and interval (within the default cost bound)
             "--kv-policy-allow-params", "all",
             "--kv-policy", "dbudget"], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while True:
            try:
                if self.get("/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() - t0 > 120:
                print(self.tail())
                raise RuntimeError("llama-server (%s) did not start" % tag)
            time.sleep(0.3)

    def tail(self, n=3000):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def alive(self):
        return self.proc.poll() is None

    def status(self, field):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return -1

    def rss_mib(self):
        return self.status("VmRSS") / 1024.0

    def cpu_s(self):
        """CPU seconds the server used (utime + stime): at -t 1 about its wall time on an idle core."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))

    def conn(self, timeout):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path, timeout=30):
        h = self.conn(timeout)
        try:
            h.request("GET", path)
            r = h.getresponse()
            return r.status, r.read().decode()
        finally:
            h.close()

    def post(self, path, body, timeout=600):
        """POST a dict (or raw bytes); returns (status, text of the body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h = self.conn(timeout)
        try:
            h.request("POST", path, data, {"Content-Type": "application/json"})
            r = h.getresponse()
            return r.status, r.read().decode()
        finally:
            h.close()

    def post_sse(self, path, body, cancel_after=None, timeout=600):
        """POST with "stream": true and read the SSE events.

        cancel_after=None: read to the end, returns (status, [event dicts or parse failures], done).
        cancel_after=n: close the socket after n data events (n=0: right after sending the request)."""
        h = self.conn(timeout)
        events = []
        try:
            h.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            if cancel_after == 0:
                h.sock.shutdown(socket.SHUT_RDWR)
                return None, events, False
            r = h.getresponse()
            if r.status != 200:
                return r.status, [r.read().decode()], False
            done = False
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    events.append(json.loads(payload))
                except ValueError:
                    events.append(ValueError(payload[:200]))
                if cancel_after is not None and len(events) >= cancel_after:
                    # the client goes away mid-generation: the server must notice and free the slot
                    h.sock.shutdown(socket.SHUT_RDWR)
                    return r.status, events, False
            return r.status, events, done
        finally:
            h.close()

    def metric(self, name):
        st, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith("llamacpp:" + name + " "):
                return float(line.split()[-1])
        return None

    def stop(self):
        k.stop_process(self.proc, timeout=30)
        self.log.close()


# ---------------------------------------------------------------- the request mix

# passkey prompts of 304, 688 and 1432 tokens (key, filler sentences, key position): the key in the first third
PASSKEYS = [(31337, 10, 3), (52917, 26, 8), (86042, 57, 18)]
PASSKEY_WEIGHTS = [0.5, 0.4, 0.1]  # the longest costs ~7 s of CPU: a few of them
PASSKEY_PROMPTS = [k.passkey_prompt(key, n_junk, pos) for key, n_junk, pos in PASSKEYS]
SHORT_PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three colors:",
    "Once upon a time, in a small village,",
    "Q: What is 12 plus 7?\nA:",
    "Translate to French: good morning.",
    "The quick brown fox",
    "Explain in one line why the sky is blue.",
]
# (policy given in the request, name the response must report); None = the server's --kv-policy
POLICIES = [
    (None, "dbudget"),
    ("none", "none"),
    ("dbudget", "dbudget"),
    ({"name": "dbudget", "params": {"threshold": 0.02}}, "dbudget"),
    ("gvote", "gvote"),
    ({"name": "gvote", "params": {"quorum": 0.25, "samples": 4}}, "gvote"),
    ({"name": "snapkv", "params": {"ratio": 0.5, "window": 16}}, "snapkv"),
    ({"name": "streaming", "params": {"ratio": 0.5}}, "streaming"),
    ({"name": "h2o", "params": {"tokens": 128, "interval": 16}}, "h2o"),
    ({"name": "tova", "params": {"ratio": 0.3}}, "tova"),
    ({"name": "adakv", "params": {"ratio": 0.4}}, "adakv"),
]
ADAPTIVE = ("none", "dbudget", "gvote")      # policies that must keep the passkey the full cache finds
FIXED_RATIO = ("snapkv", "streaming", "tova", "adakv")  # must evict something from a long enough input
MALFORMED = [
    ("/completion", b"{not json", "json"),
    ("/v1/chat/completions", b'{"messages": [}', "json"),
    ("/completion", json.dumps({"prompt": "hi", "n_predict": 2, "kv_policy": "nope"}).encode(), "kv"),
    ("/completion", json.dumps({"prompt": "hi", "n_predict": 2, "kv_policy": 42}).encode(), "kv"),
    ("/completion", json.dumps({"prompt": "hi", "n_predict": 2, "kv_policy": {"name": ""}}).encode(), "kv"),
    ("/completion", json.dumps({"prompt": "hi", "n_predict": 2,
                                "kv_policy": {"name": "snapkv", "params": {"ratio": "half"}}}).encode(), "kv"),
    ("/completion", json.dumps({"prompt": "hi", "n_predict": 2,
                                "kv_policy": {"name": "snapkv", "params": [0.5]}}).encode(), "kv"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                         "kv_policy": {"name": "gvote", "params": {"no_such_param": 1}}}).encode(), "kv"),
]


def make_job(rng, i):
    """One request of the mix, as a dict."""
    r = rng.random()
    if r < 0.05:
        path, raw, kind = MALFORMED[rng.randrange(len(MALFORMED))]
        return {"i": i, "kind": "bad", "path": path, "raw": raw, "bad": kind}
    job = {"i": i, "kind": "ok", "path": rng.choice(["/completion", "/v1/chat/completions"]),
           "stream": rng.random() < 0.4, "cache_prompt": rng.random() < 0.5}
    job["policy"], job["expect"] = POLICIES[rng.randrange(len(POLICIES))]
    if r < 0.13:
        # cancelled: a generation long enough to be still running when the client leaves
        job.update(kind="cancel", stream=True, cancel_after=rng.choice([0, 1, 2, 3]), n_predict=400,
                   prompt=rng.choice(SHORT_PROMPTS + PASSKEY_PROMPTS[:1]))
    elif r < 0.24:
        # the chat template is only referenced for the two shorter prompts; SmolLM2 writes a number
        # digit by digit, and in chat after "The pass key is"
        p = rng.choices(range(len(PASSKEYS)), PASSKEY_WEIGHTS)[0] if job["path"] == "/completion" else rng.randrange(2)
        job.update(passkey=p, prompt=PASSKEY_PROMPTS[p], n_predict=8 if job["path"] == "/completion" else 16)
    else:
        # mostly short answers; some long enough for a decode-time run (interval 32, h2o 16)
        job.update(prompt=rng.choice(SHORT_PROMPTS), n_predict=rng.choice([4, 8, 12, 16, 24, 48]))
    return job


def body_of(job, extra=None):
    b = {"temperature": 0, "seed": 42, "cache_prompt": job.get("cache_prompt", False)}
    if job["path"] == "/completion":
        b.update(prompt=job["prompt"], n_predict=job["n_predict"])
    else:
        b.update(messages=[{"role": "user", "content": job["prompt"]}], max_tokens=job["n_predict"])
    if job.get("policy") is not None:
        b["kv_policy"] = job["policy"]
    if job.get("stream"):
        b["stream"] = True
    b.update(extra or {})
    return b


def run_job(srv, job):
    """Send one job; returns a result dict (never raises for HTTP-level outcomes)."""
    res = {"job": job, "err": None}
    t0 = time.time()
    try:
        if job["kind"] == "bad":
            res["status"], res["text"] = srv.post(job["path"], job["raw"])
        elif job["kind"] == "cancel":
            res["status"], res["events"], _ = srv.post_sse(job["path"], body_of(job), cancel_after=job["cancel_after"])
        elif job.get("stream"):
            res["status"], events, done = srv.post_sse(job["path"], body_of(job))
            res.update(parse_stream(job, events, done))
        else:
            res["status"], text = srv.post(job["path"], body_of(job))
            res.update(parse_plain(job, text))
    except (OSError, http.client.HTTPException) as e:
        res["err"] = "%s: %s" % (type(e).__name__, e)
    res["secs"] = time.time() - t0
    return res


def parse_plain(job, text):
    try:
        j = json.loads(text)
    except ValueError:
        return {"err": "body is not JSON: %r" % text[:200]}
    if job["path"] == "/completion":
        content = j.get("content")
    else:
        content = (j.get("choices") or [{}])[0].get("message", {}).get("content")
    return {"body": j, "content": content, "timings": j.get("timings"), "tokens_cached": j.get("tokens_cached")}


def parse_stream(job, events, done):
    bad = [e for e in events if isinstance(e, Exception)]
    if bad:
        return {"err": "SSE event is not JSON: %s" % bad[0]}
    if not events:
        return {"err": "no SSE events"}
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        return {"err": "SSE error event: %s" % str(errors[0])[:200]}
    if job["path"] == "/completion":
        content = "".join(e.get("content", "") for e in events)
        final = events[-1]
        if not final.get("stop"):
            return {"err": "stream ended without a stop event"}
    else:
        content = "".join((e.get("choices") or [{}])[0].get("delta", {}).get("content") or "" for e in events)
        final = events[-1]
        if not done:
            return {"err": "chat stream ended without [DONE]"}
    return {"body": final, "content": content, "timings": final.get("timings"), "tokens_cached": final.get("tokens_cached")}


def key_of(text):
    """The answer a passkey prompt is judged by: its first number (or its first words if it has none)."""
    m = re.search(r"\d+", text or "")
    return m.group(0) if m else " ".join((text or "").split()[:3])


def validate(res, refs):
    """Problems of one well-formed, non-cancelled response (empty list = valid)."""
    job, probs = res["job"], []
    if res["err"]:
        return [res["err"]]
    if res["status"] != 200:
        return ["HTTP %s" % res["status"]]
    if not isinstance(res.get("content"), str):
        probs.append("content is %r" % type(res.get("content")).__name__)
    tm = res.get("timings") or {}
    kv = tm.get("kv_policy")
    if not isinstance(kv, dict):
        return probs + ["no timings.kv_policy in %s" % str(tm)[:200]]
    held, evicted = kv.get("cells_held"), kv.get("cells_evicted")
    if not (isinstance(held, int) and isinstance(evicted, int) and held >= 1 and evicted >= 0):
        return probs + ["bad kv_policy numbers %s" % kv]
    if kv.get("name") != job["expect"]:
        probs.append("kv_policy.name %r, asked for %r" % (kv.get("name"), job["expect"]))
    # the tokens the slot decoded: the reused prefix, the processed prompt, and every sampled token
    # but the last one (it is returned, never decoded)
    decoded = tm["cache_n"] + tm["prompt_n"] + tm["predicted_n"] - 1
    if held > decoded:
        probs.append("cells_held %d > tokens decoded %d" % (held, decoded))
    if held + evicted != decoded:
        probs.append("cells_held %d + cells_evicted %d != tokens decoded %d (cache_n %d prompt_n %d predicted_n %d)"
                     % (held, evicted, decoded, tm["cache_n"], tm["prompt_n"], tm["predicted_n"]))
    if res.get("tokens_cached") is not None and res["tokens_cached"] != decoded:
        probs.append("tokens_cached %d != tokens decoded %d" % (res["tokens_cached"], decoded))
    if job["expect"] == "none" and evicted != 0:
        probs.append("policy none evicted %d cells" % evicted)
    if job["expect"] in FIXED_RATIO and decoded >= 64 and evicted == 0:
        probs.append("%s evicted nothing from %d tokens" % (job["expect"], decoded))
    if "passkey" in job and job["expect"] in ADAPTIVE:
        want = key_of(refs[(job["path"], job["passkey"])])
        if key_of(res["content"]) != want:
            probs.append("passkey answer %r, the full cache answers %r" % (res["content"], want))
    return probs


# ---------------------------------------------------------------- the run

ALONE = {"path": "/completion", "prompt": PASSKEY_PROMPTS[0], "n_predict": 48, "cache_prompt": False}
t_start = time.time()
servers = []
try:
    # 1. fresh server: the references (the request run alone first, then the full-cache passkey answers)
    fresh = Server("fresh")
    servers.append(fresh)
    st, text = fresh.post("/completion", body_of(ALONE))
    alone_ref = json.loads(text) if st == 200 else {}
    c.check(st == 200, "fresh server (pid %d): the lone request -> %r, kv %s"
            % (fresh.proc.pid, alone_ref.get("content"), alone_ref.get("timings", {}).get("kv_policy")))
    refs = {}
    ref_jobs = [{"path": p, "prompt": PASSKEY_PROMPTS[i], "n_predict": n_pred, "policy": "none", "passkey": i}
                for p, n, n_pred in (("/completion", len(PASSKEYS), 8), ("/v1/chat/completions", 2, 16)) for i in range(n)]
    threads = []
    for j in ref_jobs:
        def ref(j=j):
            r = parse_plain(j, fresh.post(j["path"], body_of(j))[1])
            refs[(j["path"], j["passkey"])] = r.get("content")
        threads.append(threading.Thread(target=ref))
        threads[-1].start()
    for t in threads:
        t.join()
    c.check(all(isinstance(v, str) for v in refs.values()) and len(refs) == len(ref_jobs),
            "full-cache passkey answers: %s" % {"%s#%d" % (p[4:8], i): key_of(v) for (p, i), v in sorted(refs.items())})
    cpu_fresh = fresh.cpu_s()
    fresh.stop()
    servers.remove(fresh)
    t_refs = time.time() - t_start

    # 2. the load server; a warm-up runs every request shape once so that the idle RSS includes the
    #    one-time allocations (compute buffers for every batch size, policy scratch, HTTP threads)
    srv = Server("load")
    servers.append(srv)
    rng = random.Random(SEED)
    warm = []
    for n, (pol, name) in enumerate(POLICIES):   # every policy once, with as many clients as the load
        warm.append({"i": -1, "kind": "ok", "path": "/completion", "prompt": PASSKEY_PROMPTS[0], "n_predict": 40,
                     "policy": pol, "expect": name, "stream": n % 2 == 1, "cache_prompt": False})
    # the longest prompt (the largest view a policy scores) and the chat endpoint
    warm.append({"i": -1, "kind": "ok", "path": "/completion", "prompt": PASSKEY_PROMPTS[2], "n_predict": 8,
                 "policy": "gvote", "expect": "gvote", "stream": False, "cache_prompt": False})
    warm.append({"i": -1, "kind": "ok", "path": "/v1/chat/completions", "prompt": PASSKEY_PROMPTS[1], "n_predict": 16,
                 "policy": None, "expect": "dbudget", "stream": False, "cache_prompt": True})
    warm.append({"i": -1, "kind": "ok", "path": "/v1/chat/completions", "prompt": SHORT_PROMPTS[0], "n_predict": 8,
                 "policy": "gvote", "expect": "gvote", "stream": True, "cache_prompt": True})
    warm.append({"i": -1, "kind": "cancel", "path": "/completion", "prompt": SHORT_PROMPTS[1], "n_predict": 400,
                 "policy": None, "expect": "dbudget", "stream": True, "cancel_after": 2})

    def drain(jobs, results, n_workers):
        lock = threading.Lock()
        it = iter(jobs)

        def worker():
            while True:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                r = run_job(srv, job)
                with lock:
                    results.append(r)
        ts = [threading.Thread(target=worker) for _ in range(n_workers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    warm_res = []
    t0 = time.time()
    drain(warm, warm_res, N_WORKERS)
    warm_bad = [(r["job"]["expect"], validate(r, refs)) for r in warm_res if r["job"]["kind"] == "ok" and validate(r, refs)]
    c.check(not warm_bad, "warm-up: %d requests in %.1f s%s" % (len(warm), time.time() - t0,
                                                                   "" if not warm_bad else ", invalid: %s" % warm_bad[:3]))
    time.sleep(2)
    rss_idle = srv.rss_mib()
    threads_idle = srv.status("Threads")
    evicted0 = srv.metric("kv_policy_evicted_cells_total") or 0.0

    # 3. the load
    jobs = [make_job(rng, i) for i in range(N_REQUESTS)]
    results = []
    rss_peak = [rss_idle]
    rss_series = []             # (requests done, RSS): a leak grows with the requests, slack does not
    stop_sampler = threading.Event()

    def sampler():
        while not stop_sampler.wait(0.5):
            if srv.alive():
                rss = srv.rss_mib()
                rss_peak[0] = max(rss_peak[0], rss)
                rss_series.append((len(results), rss, srv.status("Threads")))
    smp = threading.Thread(target=sampler)
    smp.start()
    t0 = time.time()
    cpu0 = srv.cpu_s()
    drain(jobs, results, N_WORKERS)
    t_load = time.time() - t0
    cpu_load = srv.cpu_s() - cpu0
    stop_sampler.set()
    smp.join()

    alive = srv.alive()
    c.check(alive, "the server is alive after %d requests (%.0f s)" % (N_REQUESTS, t_load))
    if not alive:
        print(srv.tail())
        raise RuntimeError("server died")
    st, _ = srv.get("/health")
    c.check(st == 200, "/health ok after the load")

    n_ok = n_400 = n_cancel = 0
    failures = []
    reported_evicted = 0
    for r in sorted(results, key=lambda r: r["job"]["i"]):
        job = r["job"]
        if job["kind"] == "bad":
            msg = r.get("text", "")
            if job["bad"] == "kv":
                good = r["err"] is None and r["status"] == 400 and "kv_policy" in msg
            else:
                good = r["err"] is None and r["status"] in (400, 500) and '"error"' in msg
            if good:
                n_400 += r["status"] == 400
            else:
                failures.append("#%d malformed (%s) -> %s %s" % (job["i"], job["bad"], r.get("status"), r["err"] or msg[:160]))
        elif job["kind"] == "cancel":
            # a client that leaves may still see a complete short answer; any HTTP error is a failure
            if r["err"] is None and r["status"] not in (None, 200):
                failures.append("#%d cancelled request -> HTTP %s" % (job["i"], r["status"]))
            n_cancel += 1
        else:
            probs = validate(r, refs)
            if probs:
                failures.append("#%d %s%s %s policy=%s: %s" % (job["i"], job["path"], " stream" if job["stream"] else "",
                                                              "passkey%d" % job["passkey"] if "passkey" in job else "short",
                                                              json.dumps(job["policy"]), "; ".join(probs)))
            else:
                n_ok += 1
                reported_evicted += r["timings"]["kv_policy"]["cells_evicted"]
    n_bad_sent = sum(j["kind"] == "bad" for j in jobs)
    n_bad_json = sum(j["kind"] == "bad" and j["bad"] == "json" for j in jobs)
    for f in failures[:25]:
        print("    " + f)
    c.check(not failures, "%d well-formed requests valid, %d malformed answered (%d of them bad JSON: 400 or 500), "
            "%d cancelled; %d failures" % (n_ok, n_bad_sent, n_bad_json, n_cancel, len(failures)))
    by_policy = {}
    for r in results:
        if r["job"]["kind"] == "ok" and not r["err"] and r.get("timings"):
            kv = r["timings"].get("kv_policy") or {}
            s = by_policy.setdefault(r["job"]["expect"], [0, 0, 0])
            s[0] += 1
            s[1] += kv.get("cells_held", 0)
            s[2] += kv.get("cells_evicted", 0)
    print("  per policy (requests, cells held, cells evicted): %s" % by_policy)
    n_pk = sum(1 for r in results if "passkey" in r["job"] and r["job"]["kind"] == "ok" and r["job"]["expect"] in ADAPTIVE)
    print("  passkey answers checked against the full cache: %d" % n_pk)

    # 4. after the load: the server is idle and its memory back at the idle level
    deadline = time.time() + 30
    while time.time() < deadline and (srv.metric("requests_processing") or 0) > 0:
        time.sleep(0.5)  # a cancelled generation may need one more step to notice its client left
    rss_after = srv.rss_mib()
    processing, deferred = srv.metric("requests_processing"), srv.metric("requests_deferred")
    st, slots = srv.get("/slots")
    busy = [s["id"] for s in json.loads(slots) if s.get("is_processing")] if st == 200 else ["/slots %d" % st]
    c.check(processing == 0 and deferred == 0 and not busy,
            "idle after the load: requests_processing %s, requests_deferred %s, busy slots %s" % (processing, deferred, busy))
    evicted1 = srv.metric("kv_policy_evicted_cells_total") or 0.0
    c.check(evicted1 - evicted0 >= reported_evicted,
            "/metrics kv_policy_evicted_cells_total grew by %d >= %d reported by the valid responses (cancelled ones evict unreported)"
            % (evicted1 - evicted0, reported_evicted))
    time.sleep(5)
    rss_settle = srv.rss_mib()
    c.check(rss_after <= rss_idle + RSS_TOL_MIB and rss_settle <= rss_idle + RSS_TOL_MIB,
            "RSS idle %.1f MiB, peak %.1f, after the load %.1f, after 5 s %.1f (tolerance +%.0f MiB)"
            % (rss_idle, rss_peak[0], rss_after, rss_settle, RSS_TOL_MIB))
    marks = [next((rss for n, rss, _ in rss_series if n >= q * N_REQUESTS // 4), rss_after) for q in (1, 2, 3)]
    steps = [(b[1] - a[1], b[0]) for a, b in zip(rss_series, rss_series[1:])]
    step, at = max(steps) if steps else (0.0, 0)
    print("  largest RSS step %.1f MiB (after %d requests); server threads %d idle, up to %d under load"
          % (step, at, threads_idle, max((t for _, _, t in rss_series), default=-1)))
    # a leak grows with every request; allocator slack stops growing once every shape was seen
    c.check(rss_after - marks[1] <= LEAK_TOL_MIB,
            "RSS after 1/4, 1/2, 3/4 of the requests: %s MiB; the second half added %.1f MiB (tolerance %.0f)"
            % (", ".join("%.1f" % m for m in marks), rss_after - marks[1], LEAK_TOL_MIB))

    # 5. a request run alone on every slot gives what it gives on a fresh server, and its cells held
    #    equal /slots n_prompt_tokens minus what /metrics says was evicted meanwhile
    ref_kv = alone_ref.get("timings", {}).get("kv_policy")
    for slot in range(N_SLOTS):
        e0 = srv.metric("kv_policy_evicted_cells_total")
        st, text = srv.post("/completion", body_of(ALONE, {"id_slot": slot}))
        got = json.loads(text) if st == 200 else {}
        kv = got.get("timings", {}).get("kv_policy")
        d_ev = srv.metric("kv_policy_evicted_cells_total") - e0
        sst, slots = srv.get("/slots")
        s = [x for x in json.loads(slots) if x["id"] == slot][0] if sst == 200 else {}
        n_tok = s.get("n_prompt_tokens", -1)
        same = st == 200 and got.get("content") == alone_ref.get("content") and kv == ref_kv
        count = kv is not None and kv["cells_held"] == n_tok - d_ev and kv["cells_evicted"] == d_ev
        c.check(same and count, "slot %d alone after the load: %r %s (fresh: %r %s); /slots n_prompt_tokens %d - "
                "evicted per /metrics %d = %d cells" % (slot, got.get("content", text[:120]), kv, alone_ref.get("content"),
                                                        ref_kv, n_tok, d_ev, n_tok - d_ev))
    # 6. a cached prefix with a single evicted cell, then a prompt that diverges inside it: the prefix
    #    must be re-processed like any compressed one (a kept hole would make `none` hold fewer cells
    #    than it decoded). Deterministic: snapkv keeps all cells but one, on a slot nothing else uses now.
    base = (k.JUNK * 3).strip() + " What color is the %s?"
    first = {"prompt": base % "grass", "n_predict": 1, "temperature": 0, "id_slot": 0, "cache_prompt": False, "kv_policy": "none"}
    st, text = srv.post("/completion", first)
    n_tok = json.loads(text)["tokens_cached"] if st == 200 else 0
    for keep in (n_tok - 1, n_tok - 2):
        st1, t1 = srv.post("/completion", dict(first, kv_policy={"name": "snapkv", "params": {"tokens": keep}}))
        st2, t2 = srv.post("/completion", dict(first, prompt=base % "sky", cache_prompt=True, kv_policy="none"))
        kv1 = json.loads(t1)["timings"]["kv_policy"] if st1 == 200 else None
        tm2 = json.loads(t2)["timings"] if st2 == 200 else {}
        held2 = tm2.get("kv_policy", {}).get("cells_held", -1)
        decoded2 = tm2.get("cache_n", 0) + tm2.get("prompt_n", 0) + tm2.get("predicted_n", 0) - 1
        c.check(st1 == 200 and st2 == 200 and kv1["cells_evicted"] == n_tok - keep and held2 == decoded2,
                "prefix of %d tokens with %d evicted cell(s) (%s), then a diverging prompt under none: cache_n %s, "
                "cells_held %d for %d tokens decoded" % (n_tok, n_tok - keep, kv1, tm2.get("cache_n"), held2, decoded2))
    # 7. the same prompt sent again verbatim after a compressed run (what a client retrying after a
    #    cancellation does): the server re-evaluates the last prompt token on the cached prefix. With
    #    streaming tokens=5 the cells between the sinks and the newest are gone, so the cached prefix
    #    must not be reused as is. A request on another slot runs at the same time: it shares the batch.
    same = {"prompt": SHORT_PROMPTS[3] + " there lived an old baker", "n_predict": 1, "temperature": 0, "id_slot": 0,
            "cache_prompt": True, "kv_policy": {"name": "streaming", "params": {"tokens": 5}}}
    st1, t1 = srv.post("/completion", same)
    other = {}
    th = threading.Thread(target=lambda: other.update(r=srv.post("/completion", {"prompt": SHORT_PROMPTS[0], "n_predict": 48,
                                                                                   "temperature": 0, "id_slot": 1})))
    th.start()
    time.sleep(0.5)
    st2, t2 = srv.post("/completion", {key: v for key, v in same.items() if key != "kv_policy"})
    th.join()
    c.check(st1 == 200 and st2 == 200 and other["r"][0] == 200,
            "a compressed prompt (%s) sent again verbatim on its slot -> %d %s; a concurrent request on slot 1 -> %d %s"
            % (json.loads(t1)["timings"]["kv_policy"] if st1 == 200 else st1, st2, t2[:100], other["r"][0], other["r"][1][:100]))
    c.check(srv.alive() and srv.get("/health")[0] == 200, "server alive, /health ok at the end")
    crashes = 0 if srv.alive() else 1
    print("SUMMARY test_load: sent %d, ok %d, 400s %d, malformed %d, cancelled %d, failures %d, crashes %d, "
          "load %.0f s (server CPU %.0f s), total %.0f s (server CPU %.0f s), RSS idle %.1f peak %.1f after %.1f "
          "settled %.1f MiB"
          % (N_REQUESTS, n_ok, n_400, n_bad_sent, n_cancel, len(failures), crashes, t_load, cpu_load,
             time.time() - t_start, cpu_fresh + srv.cpu_s(), rss_idle, rss_peak[0], rss_after, rss_settle))
except Exception as e:  # a dead server or an unexpected answer: report it as a failure, with the log
    c.check(False, "%s: %s" % (type(e).__name__, e))
    for s in servers:
        print(s.tail())
finally:
    for s in servers:
        s.stop()
c.done()

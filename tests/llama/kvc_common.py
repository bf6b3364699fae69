"""Shared helpers for the llama.cpp end-to-end tests (python3 stdlib only)."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("KVC_LLAMA_BIN", os.path.join(ROOT, "build", "llama", "bin"))
BASE_BIN = os.environ.get("KVC_LLAMA_BASE_BIN", os.path.join(ROOT, "build", "base", "llama", "bin"))
MODEL = os.environ.get("KVC_MODEL", os.path.expanduser("~/.cache/kvcompress/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
TMP = os.environ.get("KVC_TMP", os.path.join(ROOT, "build", "test-llama"))
THREADS = os.environ.get("KVC_THREADS", "1")

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
          "I will quiz you about the important information there.")
JUNK = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SUFFIX = " What is the pass key? The pass key is"


# --kv-policy-stats' line for sequence 0, and the prompt / generation lines of common_perf_print
STATS = re.compile(r"kv-policy: seq 0: policy (\w+), cells held (\d+), evicted (\d+), runs (\d+)")
PROMPT_EVAL = re.compile(r"prompt eval time =.*?/\s*(\d+) tokens")
EVAL = re.compile(r"\beval time =.*?/\s*(\d+) runs")


def policy_stats(stderr):
    """What a tool run with --kv-policy-stats printed: sequence 0's policy, cells held, evicted and runs, and from
    the perf lines the prompt tokens and the decode calls after them (-1 / None for what is missing). Every token
    that went through the cache is held or evicted: held + evicted == n_prompt + n_gen."""
    m, pe, ev = STATS.search(stderr), PROMPT_EVAL.search(stderr), EVAL.search(stderr)
    return {
        "policy": m.group(1) if m else None,
        "held": int(m.group(2)) if m else -1,
        "evicted": int(m.group(3)) if m else -1,
        "runs": int(m.group(4)) if m else -1,
        "n_prompt": int(pe.group(1)) if pe else -1,
        "n_gen": int(ev.group(1)) if ev else -1,
    }


def passkey_prompt(key, n_junk, pos):
    """The prompt of llama.cpp's examples/passkey: n_junk filler sentences, the key before filler number pos."""
    s = PREFIX
    for i in range(n_junk):
        if i == pos:
            s += " The pass key is %d. Remember it. %d is the pass key." % (key, key)
        s += JUNK
    return s + SUFFIX


def write_prompt(name, text):
    os.makedirs(TMP, exist_ok=True)
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def run(args, bin_dir=None, check=True, env=None):
    """Run a binary from build/llama/bin; returns CompletedProcess."""
    exe = os.path.join(bin_dir or BIN, args[0])
    cmd = [exe] + [str(a) for a in args[1:]]
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    if check and p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise RuntimeError("%s failed (rc %d)" % (" ".join(cmd), p.returncode))
    return p


def completion(prompt_file, ctx, n_predict, *extra, model=None, env=None):
    """llama-completion, greedy, on the prompt file alone (no chat template, the prompt not echoed), at the tools'
    default -b/-ub; returns the CompletedProcess (not checked: the tests look at the exit status)."""
    args = ["llama-completion", "-m", model or MODEL, "-f", prompt_file, "-t", THREADS, "--no-warmup", "-c", ctx,
            "-n", n_predict, "--temp", "0", "-no-cnv", "--no-display-prompt"]
    return run(args + list(extra), check=False, env=env)


def kvc_run(prompt_file, *extra, bin_dir=None, check=True):
    """Run kvc-run and return its JSON line as a dict (or the CompletedProcess if check=False and it failed)."""
    args = ["kvc-run", "-m", MODEL, "-f", prompt_file, "-t", THREADS, "--no-warmup"] + list(extra)
    p = run(args, bin_dir=bin_dir, check=check)
    if p.returncode != 0:
        return p
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("kvc-run printed no JSON:\n" + p.stdout + p.stderr[-2000:])


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for a llama-server under test)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_json(url, body=None, timeout=300):
    """(HTTP status, parsed JSON or text) of a GET (body None) or a JSON POST; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    r = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            raw = resp.read().decode()
            return resp.status, (json.loads(raw) if raw[:1] in "{[" else raw)
    except urllib.error.HTTPError as e:
        raw = e.read().decode()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


def stop_process(proc, timeout=20):
    """Terminate a server started for a test, kill it if it has not exited after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """llama-server on a free port with the test model (no RAM prompt cache), its output in TMP/server-NAME.log."""

    def __init__(self, name, args, env=None):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = os.path.join(TMP, "server-%s.log" % name)
        os.makedirs(TMP, exist_ok=True)
        self.log = open(self.log_path, "w")
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen([os.path.join(BIN, "llama-server"), "-m", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                                      "-t", THREADS, "--no-warmup", "--cache-ram", "0"] + args,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=e)

    def req(self, path, body=None, timeout=300):
        return http_json(self.url + path, body, timeout)

    def wait_up(self):
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if self.req("/health", timeout=5)[0] == 200:
                    return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        print(open(self.log_path).read()[-2000:])
        return False

    def tokenize(self, text, special):
        """The server's tokens for `text` (`special`: with BOS), so a test can send exact token arrays."""
        st, body = self.req("/tokenize", {"content": text, "add_special": special})
        assert st == 200, body
        return body["tokens"]

    def stop(self):
        stop_process(self.proc)
        self.log.close()
        return open(self.log_path).read()


def err_msg(body):
    return body.get("error", {}).get("message", "") if isinstance(body, dict) else str(body)


class Checks:
    def __init__(self, name):
        self.name = name
        self.failed = []

    def check(self, ok, what):
        print("  %s: %s" % ("ok  " if ok else "FAIL", what), flush=True)
        if not ok:
            self.failed.append(what)

    def done(self):
        if self.failed:
            print("FAIL %s (%d failed)" % (self.name, len(self.failed)))
            sys.exit(1)
        print("PASS %s" % self.name)
        sys.exit(0)

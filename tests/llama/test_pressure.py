#!/usr/bin/env python3
"""Conversations in one llama-server cache, evicted where memory is needed (patch 0011), SmolLM2-135M, -t 1.

One llama-server, one unified cache (-c 2048 -kvu -np 3, the default -b/-ub), --kv-policy dbudget with
evict=pressure (nothing is evicted until a ubatch needs room). Three clients, each pinned to its slot,
hold growing conversations sent as token arrays (prompt + the tokens the server generated + the next
turn, so every turn extends the slot's cached tokens exactly):

  turn 1: a ~600-token passkey text (a different key per client) and its question; 3 x ~620 cells fit
  turn 2: ~400 tokens more filler and an unrelated question; the cache is now short of room while two of
          the three conversations are idle
  turn 3: back to the first turn: "What is the pass key?"

Checks: every response 200; turn 1 evicted nothing (evict=pressure: the full cache while it fits); every
later turn reused its slot's resident prefix (timings.cache_n: nothing re-processed); cells held +
evicted == tokens decoded; the server log shows room made across sequences with cells given by idle
ones (without that the test proves nothing: before patch 0011 only the sequences of the current batch
gave cells); nothing cut below half, no slot purged, no context-size failure; each turn-3 answer equals
a fresh full-cache server's (-c 8192, no policy) on the same tokens, and the full cache finds each key.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_pressure")
KEYS = [52718, 90346, 17593]
N_PREDICT = 8
TURN2 = " Thanks. Here is more to read." + k.JUNK * 16 + " What color is the sky? The sky is"
TURN3 = " Now back to the first text. What is the pass key? The pass key is"
MADE_ROOM = re.compile(r"made room in stream \d+ for -?\d+ cells: (\d+) given by the policies \((\d+) by idle sequences\), "
                       r"(\d+) squeezed \((\d+) from idle sequences\), (\d+) idle sequences of (\d+) resident")


def complete(srv, tokens, slot, **extra):
    body = {"prompt": tokens, "n_predict": N_PREDICT, "temperature": 0, "cache_prompt": True, "id_slot": slot,
            "return_tokens": True}
    body.update(extra)
    return srv.req("/completion", body)


srv = k.Server("pressure", ["-c", "2048", "-kvu", "-np", "3", "--kv-policy", "dbudget", "--kv-policy-param", "evict=pressure",
                                  "--metrics"])
history = [[] for _ in KEYS]
final = [None for _ in KEYS]
try:
    ok = srv.wait_up()
    c.check(ok, "llama-server -c 2048 -kvu -np 3 --kv-policy dbudget evict=pressure starts")
    if ok:
        for turn in (1, 2, 3):
            for i, key in enumerate(KEYS):
                if turn == 1:
                    new = srv.tokenize(k.passkey_prompt(key, 23, 6 + 7 * i), True)
                else:
                    new = srv.tokenize(TURN2 if turn == 2 else TURN3, False)
                prompt = history[i] + new
                st, body = complete(srv, prompt, i)
                tm = body.get("timings", {}) if isinstance(body, dict) else {}
                kv = tm.get("kv_policy", {})
                held, evicted = kv.get("cells_held", -1), kv.get("cells_evicted", -1)
                decoded = tm.get("cache_n", 0) + tm.get("prompt_n", 0) + tm.get("predicted_n", 0) - 1
                what = "turn %d, client %d (%d tokens)" % (turn, i, len(prompt))
                # a response counts what its own request evicted; cells an idle sequence gave while others ran show
                # only in the server's total (checked below)
                c.check(st == 200 and (held + evicted == decoded if turn == 1 else 0 < held + evicted <= decoded),
                        "%s: HTTP %d, held %d + evicted %d %s tokens decoded %d"
                        % (what, st, held, evicted, "==" if turn == 1 else "<=", decoded))
                if st != 200:
                    continue
                if turn == 1:
                    c.check(evicted == 0, "  evict=pressure: nothing evicted while the cache has room (evicted %d)" % evicted)
                else:
                    c.check(tm.get("cache_n", 0) >= len(history[i]) - 1,
                            "  the resident prefix was reused: cache_n %d of %d" % (tm.get("cache_n", 0), len(history[i])))
                history[i] = prompt + body.get("tokens", [])
                if turn == 3:
                    final[i] = (prompt, body.get("content"), held, decoded)
        st, metrics = srv.req("/metrics")
        total = [float(l.split()[-1]) for l in str(metrics).splitlines() if l.startswith("llamacpp:kv_policy_evicted_cells_total")]
        held_all = sum(f[2] for f in final if f)
        decoded_all = sum(f[3] for f in final if f)
        c.check(total and held_all + int(total[0]) == decoded_all,
                "every token of the 3 conversations is held or was evicted: held %d + evicted (/metrics) %s == decoded %d"
                % (held_all, int(total[0]) if total else None, decoded_all))
finally:
    log = srv.stop()

rooms = [tuple(int(x) for x in m.groups()) for m in MADE_ROOM.finditer(log)]
idle_cells = sum(r[1] + r[3] for r in rooms)
c.check(len(rooms) > 0 and idle_cells > 0 and max((r[5] for r in rooms), default=0) == 3,
        "room made %d times across 3 resident sequences, %d cells from idle ones (policies' own %d, squeezed %d)"
        % (len(rooms), idle_cells, sum(r[0] for r in rooms), sum(r[2] for r in rooms)))
bad = [l for l in log.splitlines() if "is cut to" in l or "purging slot" in l or "Context size has been exceeded" in l]
c.check(not bad, "nothing cut below half, no slot purged, no context-size failure (%s)" % bad[:1])

# the same final prompts on a fresh full-cache server
ref = k.Server("pressure-full", ["-c", "8192", "-np", "1"])
try:
    ok = ref.wait_up()
    c.check(ok, "full-cache llama-server -c 8192 starts")
    for i, key in enumerate(KEYS):
        if not ok or final[i] is None:
            c.check(False, "client %d: a turn-3 answer to compare" % i)
            continue
        prompt, answer = final[i][:2]
        st, body = complete(ref, prompt, 0, cache_prompt=False)
        full = body.get("content") if st == 200 else None
        c.check(full is not None and str(key) in full, "full cache, client %d: finds key %d (%r)" % (i, key, full))
        c.check(answer == full, "client %d: answer %r == the full cache's %r" % (i, answer, full))
finally:
    ref.stop()
c.done()

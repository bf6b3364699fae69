#!/usr/bin/env python3
"""Per-slot caches under pressure, and a squeezed sequence through /slots save/restore and the RAM prompt cache
(issue 17), SmolLM2-135M, -t 1.

One llama-server with per-slot caches (-c 2048 -np 2, no -kvu: each slot its own stream of 1024 cells, the
default -b/-ub), --kv-policy dbudget with evict=pressure, --slot-save-path and a RAM prompt cache (--cache-ram).
One client pinned to slot 0 holds a conversation sent as token arrays (prompt + the tokens the server generated +
the next turn):

  turn 1: a ~600-token passkey text and its question (fits the slot's 1024 cells: nothing evicted)
  turn 2: ~400 tokens more filler and an unrelated question: the conversation outgrows its stream, the slot's
          only sequence is squeezed in place (the log's "made room in stream 0") and keeps serving
  save:   /slots/0?action=save of the squeezed sequence
  turn 3: "What is the pass key?" (reuses the resident prefix) -> A3, equal to a fresh full-cache server's answer
  restore:/slots/0?action=restore: the slot holds the saved cells again (/slots n_cells as at the save);
          turn 3 again -> A3, the restored prefix reused (cache_n)
  RAM prompt cache: another prompt on slot 0 moves the conversation into the prompt cache; turn 4 (the conversation
          + one more question) loads it back, reuses it (cache_n) and answers as turn 4 on a slot restored from
          the save taken just before the other prompt.

Without the squeeze the test proves nothing: it checks that turn 2 evicted cells in slot 0's stream and that the
saved state holds fewer cells than the conversation's tokens.
"""
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_slots")
t_start = time.time()
KEY = 52718
N_PREDICT = 8
TURN2 = " Thanks. Here is more to read." + k.JUNK * 16 + " What color is the sky? The sky is"
TURN3 = " Now back to the first text. What is the pass key? The pass key is"
TURN4 = " Say it once more. The pass key is"
OTHER = k.passkey_prompt(70707, 4, 1)
MADE_ROOM = re.compile(r"made room in stream (\d+) for -?\d+ cells: (\d+) given by the policies \((\d+) by idle sequences\), "
                       r"(\d+) squeezed")


def complete(srv, tokens, slot=0, **extra):
    body = {"prompt": tokens, "n_predict": N_PREDICT, "temperature": 0, "cache_prompt": True, "id_slot": slot,
            "return_tokens": True}
    body.update(extra)
    st, r = srv.req("/completion", body)
    return st, (r if st == 200 and isinstance(r, dict) else {"error": r})


def n_cells(srv, slot=0):
    st, slots = srv.req("/slots")
    return slots[slot].get("n_cells", -1) if st == 200 and isinstance(slots, list) else -1


def kvp(r):
    return r.get("timings", {}).get("kv_policy", {})


slot_dir = os.path.join(k.TMP, "slots-saves")
os.makedirs(slot_dir, exist_ok=True)
srv = k.Server("slots", ["-c", "2048", "-np", "2", "--kv-policy", "dbudget", "--kv-policy-param", "evict=pressure",
                         "--slot-save-path", slot_dir, "--cache-ram", "256", "--metrics"])
final3 = None
try:
    up = srv.wait_up()
    c.check(up, "llama-server -c 2048 -np 2 (per-slot caches) --kv-policy dbudget evict=pressure starts")
    if not up:
        raise SystemExit(c.done())

    hist = srv.tokenize(k.passkey_prompt(KEY, 23, 6), True)
    st, r1 = complete(srv, hist)
    c.check(st == 200 and kvp(r1).get("cells_evicted", -1) == 0,
            "turn 1 (%d tokens): HTTP %d, nothing evicted while the slot's stream has room (%s)" % (len(hist), st, kvp(r1)))
    hist += r1.get("tokens", [])

    hist += srv.tokenize(TURN2, False)
    st, r2 = complete(srv, hist)
    ev2 = kvp(r2).get("cells_evicted", -1)
    c.check(st == 200 and ev2 > 0 and r2["timings"].get("cache_n", 0) >= len(hist) - len(srv.tokenize(TURN2, False)) - 1,
            "turn 2 (%d tokens > 1024 cells of the slot): HTTP %d, squeezed in place (evicted %d), the prefix reused "
            "(cache_n %d)" % (len(hist), st, ev2, r2.get("timings", {}).get("cache_n", -1)))
    hist += r2.get("tokens", [])
    held2 = n_cells(srv)
    c.check(0 < held2 <= 1024 and held2 < len(hist), "slot 0 holds %d cells for %d tokens" % (held2, len(hist)))

    st, sv = srv.req("/slots/0?action=save", {"filename": "slots-turn2.bin"})
    c.check(st == 200 and sv.get("n_saved", 0) == len(hist) - 1,
            "/slots save of the squeezed slot (%d): %s" % (st, sv if st != 200 else sv.get("n_saved")))

    q3 = hist + srv.tokenize(TURN3, False)
    st, r3 = complete(srv, q3)
    a3 = r3.get("content")
    c.check(st == 200 and r3["timings"].get("cache_n", 0) >= len(hist) - 1,
            "turn 3: HTTP %d, answer %r, resident prefix reused (cache_n %d of %d)"
            % (st, a3, r3.get("timings", {}).get("cache_n", -1), len(hist)))
    final3 = (q3, a3)

    st, rs = srv.req("/slots/0?action=restore", {"filename": "slots-turn2.bin"})
    held_r = n_cells(srv)
    c.check(st == 200 and rs.get("n_restored", 0) == len(hist) - 1 and held_r == held2,
            "/slots restore (%d, %s tokens): the slot holds %d cells, as at the save (%d)"
            % (st, rs.get("n_restored") if st == 200 else rs, held_r, held2))
    st, r3b = complete(srv, q3)
    c.check(st == 200 and r3b.get("content") == a3 and r3b["timings"].get("cache_n", 0) >= len(hist) - 1,
            "turn 3 after the restore: %r == %r before it, the restored prefix reused (cache_n %d)"
            % (r3b.get("content"), a3, r3b.get("timings", {}).get("cache_n", -1)))
    hist3 = q3 + r3b.get("tokens", [])

    # the RAM prompt cache: save the slot first (the reference), then another prompt moves it into the cache
    st, sv = srv.req("/slots/0?action=save", {"filename": "slots-turn3.bin"})
    held3 = n_cells(srv)
    c.check(st == 200 and sv.get("n_saved", 0) == len(hist3) - 1, "/slots save after turn 3 (%d): %s cells %d"
            % (st, sv.get("n_saved") if st == 200 else sv, held3))
    st, ro = complete(srv, srv.tokenize(OTHER, True))
    c.check(st == 200 and "70707" in ro.get("content", ""), "another prompt on slot 0: %r" % ro.get("content"))
    q4 = hist3 + srv.tokenize(TURN4, False)
    st, r4 = complete(srv, q4)
    c.check(st == 200 and r4["timings"].get("cache_n", 0) >= len(hist3) - 1,
            "turn 4: the conversation came back from the RAM prompt cache and was reused (cache_n %d of %d), answer %r"
            % (r4.get("timings", {}).get("cache_n", -1), len(hist3), r4.get("content")))

    st, rs = srv.req("/slots/0?action=restore", {"filename": "slots-turn3.bin"})
    c.check(st == 200 and n_cells(srv) == held3, "/slots restore of the turn-3 save: %d cells" % n_cells(srv))
    st, r4b = complete(srv, q4)
    c.check(st == 200 and r4b.get("content") == r4.get("content") and r4b["timings"].get("cache_n", 0) >= len(hist3) - 1,
            "turn 4 from the /slots restore: %r == %r from the RAM prompt cache" % (r4b.get("content"), r4.get("content")))
    c.check(srv.req("/health")[0] == 200, "/health ok at the end")
finally:
    log = srv.stop()

rooms = [tuple(int(x) for x in m.groups()) for m in MADE_ROOM.finditer(log)]
c.check(any(r[0] == 0 and r[1] + r[3] > 0 for r in rooms),
        "room made in slot 0's own stream (%s)" % rooms[:3])
n_fresh = log.count("seq 0: state restored, the policy starts fresh")
c.check(n_fresh == 3, "slot 0's state was restored 3 times (2 /slots restores, 1 RAM prompt cache load): %d" % n_fresh)
bad = [l for l in log.splitlines() if "is cut to" in l or "purging slot" in l or "Context size has been exceeded" in l
       or "failed to" in l or "cannot be saved" in l]
c.check(not bad, "nothing cut, no slot purged, no failed save/load in the log (%s)" % bad[:2])

# the turn-3 prompt on a fresh full-cache server
ref = k.Server("slots-full", ["-c", "8192", "-np", "1"])
try:
    ok = ref.wait_up()
    st, body = complete(ref, final3[0], cache_prompt=False) if ok and final3 else (0, {})
    full = body.get("content") if st == 200 else None
    c.check(full is not None and str(KEY) in full, "full cache finds key %d (%r)" % (KEY, full))
    c.check(final3 is not None and final3[1] == full, "turn 3 of the squeezed slot %r == the full cache's %r"
            % (final3 and final3[1], full))
finally:
    ref.stop()
print("  test_slots ran in %.1f s" % (time.time() - t_start))
c.done()

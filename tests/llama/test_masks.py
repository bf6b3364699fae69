#!/usr/bin/env python3
"""Per-layer and per-head KV cache masks (patch 0003, granularity=layer|head), SmolLM2-135M, -t 1.

1. ops: tests/llama/test-kvp-mask.cpp, built against the tree's ggml: the bias added to the KQ
   mask (per layer, per query head) gives soft_max_ext / flash_attn_ext equal to a reference that
   attends only to the kept rows; without the bias the result is far from it.
2. masked == evicted: LLAMA_KV_POLICY_MASKS=evict (evict-head) hides the cells a snapkv plan frees
   in every layer (every KV head, per-head bias) instead of freeing them; the logits equal the evicting run up to rounding (the same
   tokens, KL < 1e-3: new tokens land in other cells, so sums run in another order, and this
   Q4_1 model turns rounding into logit differences of ~0.5).
3. a policy whose keep sets are the same in every layer (streaming): granularity=layer and =head
   give logits identical to granularity=token (masked cells contribute exactly 0).
4. differing per-layer sets (pyramidkv ratio 0.9, granularity=layer, masks only: LLAMA_KV_POLICY_MASKS=nopack):
   the logits differ from the union-only run (LLAMA_KV_POLICY_MASKS=0), which frees the same cells.
5. per-head (adakv, granularity=head) on the CPU with FA off and on: the log says the masks are
   per head; FA on and off agree (same tokens, KL < a tenth of what the masks change); the masks
   change the logits with FA off and on.
6. the passkey survives granularity=layer (re-packed) for dynamickv and pyramidkv (ratio 0.5), as it does at
   token granularity.
7. re-pack (the default with granularity=layer|head): each layer's (head's) kept rows are copied into the
   sequence's lowest cells and the rest freed. Against the masks-only run with the same sets (nopack, the
   reference checked by 2-5): the same tokens and KL < 1e-2. The logits are not bit-identical: rows and new
   tokens sit in other cells, so SIMD sums round differently, and this Q4_1 model turns that into max |dlogit|
   ~0.5 and KL up to ~4e-3 (as in 2; FA on vs off alone: ~3e-3), while wrong rows give KL > 1. More cells are freed, and the cells held = the largest layer's kept count + the decoded tokens
   (per layer), fewer than masks only (per head), for pyramidkv, snapkv, adakv (per layer and per head).
8. a re-packed sequence (patch 0013): its state carries the policy's masks: llama_state_seq_get_data, clear,
   llama_state_seq_set_data (the cells land elsewhere), saved again gives the same bytes, and the decode after the
   restore equals the decode before it (snapkv per layer, adakv per head); the masks-only sequence round-trips too.
   llama_memory_seq_rm(seq, P, -1) through the re-packed cells hides the rows that hold removed tokens and removes
   the cells past P: the removed tokens fed again give the logits of the masks-only sequence truncated at P; a
   range after the re-packed cells is removed as before.
9. llama-server with a re-packing policy (pyramidkv granularity=layer) and a RAM prompt cache: the answer keeps
   the passkey; /slots save and restore of the re-packed slot (the same n_cells; continuing after the restore ==
   continuing before it); another prompt moves it into the RAM prompt cache and the next turn loads it back (the
   prefix reused, the answer of a /slots restore of the same state).
The first sampled token comes from the prompt's logits, computed before the policy runs.
KVC_LLAMA_SRC: the llama.cpp tree whose ggml headers build the op test (default build/llama-src).
"""
import array
import math
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import kvc_common as k

c = k.Checks("test_masks")
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("KVC_LLAMA_SRC", os.path.join(k.ROOT, "build", "llama-src"))
N_VOCAB = 49152

# 1. ops
os.makedirs(k.TMP, exist_ok=True)
exe = os.path.join(k.TMP, "test-kvp-mask")
cc = subprocess.run(["c++", "-O1", "-std=c++17", "-I" + os.path.join(SRC, "ggml", "include"),
                     os.path.join(HERE, "test-kvp-mask.cpp"), "-L" + k.BIN, "-lggml-cpu", "-lggml-base", "-lggml",
                     "-Wl,-rpath," + k.BIN, "-o", exe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
if cc.returncode != 0:
    c.check(False, "test-kvp-mask builds against %s:\n%s" % (SRC, cc.stdout[-2000:]))
else:
    p = subprocess.run([exe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(p.stdout)
    c.check(p.returncode == 0, "ops: masked soft_max_ext / flash_attn_ext == attention over the kept rows")

KEY = 48213
prompt = k.write_prompt("masks.txt", k.passkey_prompt(KEY, 16, 7))   # 448 tokens
N = 6
runs = {}


def run(tag, policy, params, fa="off", masks=None, extra=()):
    logits = os.path.join(k.TMP, "masks-%s.bin" % tag)
    if os.path.exists(logits):
        os.remove(logits)
    args = ["-m", k.MODEL, "-f", prompt, "-t", k.THREADS, "--no-warmup", "-c", "2048", "-n", str(N), "-fa", fa, "-lv", "4",
            "--kvc-logits", logits, "--kv-policy", policy] + list(extra)
    if params:
        args += ["--kv-policy-param", ",".join(params)]
    env = {"LLAMA_KV_POLICY_MASKS": masks} if masks else None
    p = k.run(["kvc-run"] + args, env=env, check=False)
    if p.returncode != 0:
        c.check(False, "%s runs (rc %d): %s" % (tag, p.returncode, p.stderr.strip().splitlines()[-1:]))
        return None
    r = [__import__("json").loads(l) for l in p.stdout.splitlines() if l.startswith("{")][-1]
    a = array.array("f")
    with open(logits, "rb") as f:
        a.frombytes(f.read())
    r["logits"] = [a[i:i + N_VOCAB] for i in range(0, len(a), N_VOCAB)]
    r["log"] = p.stderr
    runs[tag] = r
    return r


def max_diff(a, b):
    return max(max(abs(x - y) for x, y in zip(s, t)) for s, t in zip(a["logits"], b["logits"]))


def kl(a, b, first=0):
    worst = 0.0
    for p, q in list(zip(a["logits"], b["logits"]))[first:]:
        mp, mq = max(p), max(q)
        zp = math.log(sum(math.exp(x - mp) for x in p))
        zq = math.log(sum(math.exp(x - mq) for x in q))
        worst = max(worst, sum(math.exp(x - mp - zp) * ((x - mp - zp) - (y - mq - zq)) for x, y in zip(p, q)))
    return worst


def tokens(r):
    return [max(range(N_VOCAB), key=s.__getitem__) for s in r["logits"]]


def conserved(r):
    return r["cells_held"] + r["cells_evicted"] == r["n_prompt"] + r["n_decoded"]


# 2. masked == evicted
for fa in ("off", "on"):
    ev = run("snap-ev-" + fa, "snapkv", ["ratio=0.6"], fa)
    for mode, what in (("evict", "layer"), ("evict-head", "head")):
        mk = run("snap-%s-%s" % (mode, fa), "snapkv", ["ratio=0.6"], fa, masks=mode)
        if ev and mk:
            d, dk = max_diff(ev, mk), kl(ev, mk)
            ok = tokens(ev) == tokens(mk) and dk < 1e-3 and ("masks: per " + what) in mk["log"]
            c.check(ok and ev["cells_evicted"] > 100 and mk["cells_evicted"] == 0,
                    "[fa %s] hiding the %d cells snapkv frees in every %s == freeing them: max |dlogit| %.2g, KL %.2g"
                    % (fa, ev["cells_evicted"], what, d, dk))

# 3. identical keep sets in every layer
tok = run("stream-token", "streaming", ["ratio=0.5", "granularity=token"])
for g in ("layer", "head"):
    r = run("stream-" + g, "streaming", ["ratio=0.5", "granularity=" + g])
    if tok and r:
        c.check(max_diff(tok, r) <= 1e-6 and r["cells_evicted"] == tok["cells_evicted"] > 0,
                "streaming granularity=%s == token: max |dlogit| %.2g, evicted %d == %d"
                % (g, max_diff(tok, r), r["cells_evicted"], tok["cells_evicted"]))

# 4. differing per-layer sets (ratio 0.9: the union of the layers' sets leaves cells to free)
lay = run("pyr9-layer", "pyramidkv", ["ratio=0.9", "granularity=layer"], masks="nopack")
uni = run("pyr9-union", "pyramidkv", ["ratio=0.9", "granularity=layer"], masks="0")
if lay and uni:
    c.check("masks: per layer" in lay["log"] and max_diff(lay, uni) > 1e-3,
            "pyramidkv ratio 0.9 granularity=layer: the masks change the logits (max |dlogit| %.3g vs the union only)"
            % max_diff(lay, uni))
    c.check(conserved(lay) and lay["cells_evicted"] == uni["cells_evicted"] > 0,
            "pyramidkv ratio 0.9 granularity=layer: held %d + freed %d == %d tokens (union-only run freed %d)"
            % (lay["cells_held"], lay["cells_evicted"], lay["n_prompt"] + lay["n_decoded"], uni["cells_evicted"]))

# 5. per head on the CPU, FA off and on
hd = {fa: run("ada-head-" + fa, "adakv", ["ratio=0.5", "granularity=head"], fa, masks="nopack") for fa in ("off", "on")}
uni = run("ada-union", "adakv", ["ratio=0.5", "granularity=head"], masks="0")
if hd["off"] and hd["on"] and uni:
    c.check(all("masks: per head" in hd[fa]["log"] for fa in hd), "adakv granularity=head: per-head masks (FA off and on)")
    # the first step's logits come from the prompt, before the policy ran: FA on/off noise alone
    k_fa, k_mask = kl(hd["off"], hd["on"], 1), kl(hd["off"], uni, 1)
    c.check(tokens(hd["off"]) == tokens(hd["on"]) and k_fa < 0.1 * k_mask,
            "per-head masks with FA on == FA off: same tokens, KL after the plan %.2g (before it, FA noise alone: %.2g)"
            % (k_fa, kl(hd["off"], hd["on"])))
    c.check(k_mask > 1e-3 and kl(hd["on"], uni, 1) > 1e-3 and conserved(hd["off"]),
            "per-head masks change the logits: KL %.3g (FA off), %.3g (FA on) against the union only"
            % (k_mask, kl(hd["on"], uni, 1)))

# 6. the passkey survives granularity=layer
for pol in ("dynamickv", "pyramidkv"):
    t = run(pol + "-token", pol, ["ratio=0.5", "granularity=token"])
    lay = run(pol + "-layer", pol, ["ratio=0.5", "granularity=layer"])
    if t and lay:
        c.check(str(KEY) in t["answer"] and str(KEY) in lay["answer"] and conserved(lay),
                "%s ratio 0.5: the passkey survives granularity=layer: %r (token: %r; freed %d vs %d)"
                % (pol, lay["answer"], t["answer"], lay["cells_evicted"], t["cells_evicted"]))


# 7. re-pack == masks only, with the memory the per-layer sets allow
def held_bound(r):
    return r["seqs"][0]["layer_kept_max"] + r["n_decoded"]


for tag, pol, params, fa in (("pyr", "pyramidkv", ["ratio=0.5", "granularity=layer"], "off"),
                             ("snap", "snapkv", ["ratio=0.5", "granularity=layer"], "off"),
                             ("snap", "snapkv", ["ratio=0.5", "granularity=layer"], "on"),
                             ("ada", "adakv", ["ratio=0.5", "granularity=layer"], "off"),
                             ("adah", "adakv", ["ratio=0.5", "granularity=head"], "off"),
                             ("adah", "adakv", ["ratio=0.5", "granularity=head"], "on")):
    params = params + ["interval=0"]   # one plan, at the prompt's end: the bound below is about that plan
    rp = run("rp-%s-%s" % (tag, fa), pol, params, fa)
    mk = run("rp-%s-%s-nopack" % (tag, fa), pol, params, fa, masks="nopack")
    if not (rp and mk):
        continue
    dk, dl = kl(rp, mk), max_diff(rp, mk)
    same = tokens(rp) == tokens(mk) and dk < 1e-2
    head = "granularity=head" in params
    held_ok = rp["cells_held"] < mk["cells_held"] if head else rp["cells_held"] == held_bound(rp)
    c.check(same and conserved(rp) and held_ok and rp["cells_evicted"] > mk["cells_evicted"],
            "[fa %s] %s %s: re-packed == masks only (max |dlogit| %.2g, KL %.2g); holds %d cells (masks only: %d, "
            "largest layer kept + decoded: %d)"
            % (fa, pol, " ".join(params), dl, dk, rp["cells_held"], mk["cells_held"],
               held_bound(rp)))


# 8. what a re-packed sequence refuses
def kvc_run_json(*extra, masks=None):
    args = ["-m", k.MODEL, "-f", prompt, "-t", k.THREADS, "--no-warmup", "-c", "2048", "-n", "4", "-fa", "off",
            "--kv-policy", "snapkv", "--kv-policy-param", "ratio=0.5,granularity=layer,interval=0"] + list(extra)
    p = k.run(["kvc-run"] + args, env={"LLAMA_KV_POLICY_MASKS": masks} if masks else None, check=False)
    js = [__import__("json").loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    return p.returncode, (js[-1] if js else None), p.stderr


# a re-packed sequence's state carries the policy's masks (patch 0013): saved after the prefill, decoded, cleared,
# restored into other cells (the restore compacts them) and decoded again. the restored sequence saved again gives
# the same bytes (positions, rows, masks: without the masks a one-off build saved different bytes), and the second
# decode equals the first: the same tokens, KL < 1e-2 (the rounding of other cells, as in 7). the decode alone does not
# tell a lost mask: a stale row holds a token its layer evicted, and showing it again moved the KL by 3e-4 at most in
# the one-off build; the bytes do. per layer (snapkv) and per head (adakv)
for tag, pol, params in (("snap", "snapkv", ["ratio=0.5", "granularity=layer", "interval=0"]),
                         ("adah", "adakv", ["ratio=0.5", "granularity=head", "interval=0"])):
    rt = run("rt-" + tag, pol, params, extra=["--kvc-state-roundtrip"])
    st = rt and rt.get("roundtrip")
    if not st:
        c.check(False, "%s %s: the re-packed sequence's state round-trips (%s)" % (pol, " ".join(params), rt and rt.get("log", "")[-300:]))
        continue
    first = dict(logits=rt["logits"][:N])
    again = dict(logits=rt["logits"][:1] + rt["logits"][N:])
    dk = kl(first, again, 1)
    c.check(st["state_same"] and st["answer"] == rt["answer"] and tokens(first) == tokens(again) and dk < 1e-2
            and rt["cells_evicted"] > 0,
            "%s %s: the re-packed sequence's state (%d bytes) round-trips: saved again the same bytes (%s), decode after the "
            "restore == before it (%r / %r, KL %.2g)"
            % (pol, " ".join(params), st["state_bytes"], st["state_same"], rt["answer"], st["answer"], dk))
rc, out, err = kvc_run_json("--kvc-state-roundtrip", masks="nopack")
rt = out and out.get("roundtrip")
c.check(rc == 0 and rt and rt["answer"] == out["answer"] and rt["state_same"],
        "the same sequence masked but not re-packed round-trips (rc %d, %r / %r, saved again the same bytes: %s)"
        % (rc, rt and rt["answer"], out and out["answer"], rt and rt["state_same"]))
# truncating the end of a re-packed sequence through its re-packed cells (llama_memory_seq_rm(seq, P, -1), what
# llama-server does when a new prompt shares a prefix; patch 0013): the rows of the cells before P that hold a token
# at or past P are hidden for good (the log counts them), the cells past P go; the removed prompt tokens fed again
# give the logits of the masks-only sequence truncated the same way: at P, where a row still holding a removed token
# leaks the text after P, KL < 1e-4 (measured 0: the kept rows keep their order, so the sums are the same; with the
# rows left visible, a one-off build measured 0.66, 0.17 and 0.026 for the three cases), at the end KL < 1e-2 (new
# tokens sit in other cells: rounding, as in 7)
# ("restored": the same after a save, clear and restore, which must carry the rows' token positions and the span)
for tag, pol, params, cut_at, restored in (("snap", "snapkv", ["ratio=0.5", "granularity=layer", "interval=0"], 200, False),
                                           ("snap", "snapkv", ["ratio=0.5", "granularity=layer", "interval=0"], 250, False),
                                           ("snap", "snapkv", ["ratio=0.5", "granularity=layer", "interval=0"], 250, True),
                                           ("adah", "adakv", ["ratio=0.5", "granularity=head", "interval=0"], 300, False)):
    extra = ["--kvc-truncate", str(cut_at)]
    rp = run("cut-%s-%d%s" % (tag, cut_at, "-rt" if restored else ""), pol, params,
             extra=extra + (["--kvc-state-roundtrip"] if restored else []))
    mk = runs.get("cut-%s-%d-nopack" % (tag, cut_at)) or run("cut-%s-%d-nopack" % (tag, cut_at), pol, params, masks="nopack", extra=extra)
    if not (rp and mk):
        continue
    t = rp["truncate"]
    m = re.search(r"truncated at %d through cells re-packed by the KV cache policy \(positions (\d+)\.\.(\d+)\): (\d+) rows" % cut_at,
                  rp["log"])
    dk_p = kl(dict(logits=rp["logits"][1:2]), dict(logits=mk["logits"][1:2]))
    dk = kl(dict(logits=rp["logits"][2:]), dict(logits=mk["logits"][2:]))
    lost = re.search(r"truncating at %d removes (\d+) re-packed rows" % cut_at, rp["log"])
    c.check(t["ok"] and t["cells_after"] < t["cells_before"] and m and int(m.group(1)) < cut_at <= int(m.group(2))
            and int(m.group(3)) > 0 and len(rp["logits"]) == 3 and tokens(rp) == tokens(mk) and dk_p < 1e-4 and dk < 1e-2,
            "%s %s: %struncated at %d through the re-packed cells (%s): %d -> %d cells, %s rows hidden (%s lost); fed again "
            "== masks only truncated the same way (KL at P %.2g, at the end %.2g)"
            % (pol, " ".join(params), "restored, then " if restored else "", cut_at,
               m and "positions %s..%s" % m.groups()[:2], t["cells_before"], t["cells_after"],
               m and m.group(3), lost.group(1) if lost else 0, dk_p, dk))
rc, tail, err = kvc_run_json("--kvc-truncate", "440")
tail = tail and tail.get("truncate")
c.check(rc == 0 and tail and tail["ok"] is True and tail["cells_after"] == tail["cells_before"] - (tail["pos_end"] - 440),
        "llama_memory_seq_rm after the re-packed cells removes them: %s" % tail)

# 9. the server
slot_dir = os.path.join(k.TMP, "masks-slots")
os.makedirs(slot_dir, exist_ok=True)
srv = k.Server("masks", ["-np", "1", "-c", "2048", "--slot-save-path", slot_dir, "--cache-ram", "64",
                         "--kv-policy", "pyramidkv", "--kv-policy-param", "ratio=0.5,granularity=layer"])
try:
    up = srv.wait_up()
    c.check(up, "server with pyramidkv granularity=layer starts")
    if up:
        def tok(text, special=False):
            return srv.req("/tokenize", {"content": text, "add_special": special})[1]["tokens"]

        def cont(tokens):
            st, r = srv.req("/completion", {"prompt": tokens, "n_predict": 6, "temperature": 0, "id_slot": 0,
                                            "cache_prompt": True, "return_tokens": True})
            return (r, r["timings"].get("cache_n", -1)) if st == 200 else ({"content": None, "tokens": []}, -1)

        def n_cells():
            return srv.req("/slots")[1][0].get("n_cells", -1)

        hist = tok(open(prompt).read(), True)
        r0, _ = cont(hist)
        kvp = r0.get("timings", {}).get("kv_policy", {})
        c.check(str(KEY) in (r0["content"] or "") and kvp.get("cells_evicted", 0) > 0,
                "server: re-packed slot answers %r (kv_policy %s)" % (r0["content"], kvp))
        hist = hist + r0["tokens"]
        # /slots save/restore of the re-packed slot (patch 0013): continuing after the restore == continuing before it
        held = n_cells()
        st, sv = srv.req("/slots/0?action=save", {"filename": "masks-slot0.bin"})
        c.check(st == 200 and sv.get("n_saved", 0) == len(hist) - 1 and 0 < held < len(hist),
                "server: /slots save of the re-packed slot (%d: %s), %d cells for %d tokens" % (st, sv, held, len(hist)))
        q1 = hist + tok(" Once more, the pass key is")
        e1, n1 = cont(q1)
        st, rs = srv.req("/slots/0?action=restore", {"filename": "masks-slot0.bin"})
        c.check(st == 200 and n_cells() == held, "server: /slots restore (%d), %d cells as at the save" % (st, n_cells()))
        e2, n2 = cont(q1)
        c.check(e1["content"] is not None and e2["content"] == e1["content"] and n1 >= len(hist) - 1 and n2 == n1,
                "server: continuing the re-packed slot: before the restore %r (cache_n %d), after %r (cache_n %d)"
                % (e1["content"], n1, e2["content"], n2))
        # the RAM prompt cache: another prompt moves the re-packed conversation out, the next turn loads it back
        hist = q1 + e2["tokens"]
        st, sv = srv.req("/slots/0?action=save", {"filename": "masks-slot0b.bin"})
        other = k.passkey_prompt(70707, 12, 3)
        st, b = srv.req("/completion", {"prompt": other, "n_predict": 6, "temperature": 0, "id_slot": 0})
        c.check(st == 200 and "70707" in b.get("content", "") and srv.req("/health")[0] == 200,
                "server: the next prompt on the slot answers %r (%d), /health ok" % (b.get("content") if st == 200 else b, st))
        q2 = hist + tok(" And the pass key is")
        e3, n3 = cont(q2)
        srv.req("/slots/0?action=restore", {"filename": "masks-slot0b.bin"})
        e4, n4 = cont(q2)
        c.check(e3["content"] is not None and e3["content"] == e4["content"] and n3 >= len(hist) - 1 and n4 == n3,
                "server: the re-packed conversation came back from the RAM prompt cache (cache_n %d of %d): %r == %r from a "
                "/slots restore of the same state" % (n3, len(hist), e3["content"], e4["content"]))
finally:
    log = srv.stop()
c.check("Segmentation" not in log and "GGML_ASSERT" not in log and "cannot be saved" not in log, "server: no crash, no refused save in the log")
n_fresh = log.count("seq 0: state restored, the policy starts fresh")
c.check(n_fresh == 3, "server: slot 0's re-packed state was restored 3 times (2 /slots restores, 1 RAM prompt cache load): %d" % n_fresh)
c.done()

#!/usr/bin/env python3
"""Deterministic retrieval tasks for fidelity tests: passkey, needle (single, multi-key,
multi-value, multi-query) and variable tracking, generated from a seed.

Each task is one JSON object per line: {"task", "id", "seed", "depth", "target_tokens",
"context", "question", "answer"}. The prompt given to the model is context + question; in
question-agnostic mode the context is compressed before the question is appended.

Filler and prose need no download: the passkey filler is the classic repetitive text, and the
prose is the license texts every Debian system ships under /usr/share/common-licenses
(freely redistributable English).

  python3 eval/tasks.py passkey --tokens 2048 --depth 0.5 --seed 1            # one instance
  python3 eval/tasks.py suite --tokens 1024,2048 --depths 0,0.5,1 --seeds 1,2 # JSONL on stdout
"""
import argparse
import json
import random
import sys
from pathlib import Path

# chars per token of SmolLM2's tokenizer on these texts, measured with llama.cpp (n_prompt / len)
CHARS_PER_TOKEN = {"filler": 3.73, "prose": 5.1}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
PROSE_FILES = ["GPL-3", "Apache-2.0", "LGPL-2.1", "MPL-2.0", "GFDL-1.3", "Artistic", "GPL-2"]
LICENSES = Path("/usr/share/common-licenses")


def prose_words():
    words = []
    for name in PROSE_FILES:
        p = LICENSES / name
        if p.exists():
            words.extend(p.read_text(errors="replace").split())
    if len(words) < 5000:
        sys.exit(f"tasks.py: not enough prose under {LICENSES} (Debian package base-files)")
    return words


def prose(n_chars, rng):
    words = prose_words()
    start = rng.randrange(0, len(words) // 2)
    out, size, i = [], 0, start
    while size < n_chars:
        w = words[i % len(words)]
        out.append(w)
        size += len(w) + 1
        i += 1
    return " ".join(out)


def insert_at_depth(text, needle, depth):
    """Put needle at a sentence boundary near the relative depth (0 = start, 1 = end)."""
    cut = int(len(text) * depth)
    if 0 < cut < len(text):
        dot = text.find(". ", cut)
        cut = dot + 2 if dot != -1 else len(text)
    return text[:cut] + " " + needle + " " + text[cut:]


def passkey(tokens, depth, seed):
    rng = random.Random(seed)
    key = rng.randint(10000, 99999)
    n_rep = max(1, int((tokens * CHARS_PER_TOKEN["filler"] - len(INTRO) - 120) / len(FILLER)))
    pos = round(depth * n_rep)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    context = INTRO + FILLER * pos + needle + FILLER * (n_rep - pos)
    return dict(task="passkey", context=context, question="\nWhat is the pass key? The pass key is",
                answer=str(key))


def needle(tokens, depth, seed, kind="single"):
    """Needles in real prose: single, multikey (one asked, decoys present), multivalue, multiquery."""
    rng = random.Random(seed)
    names = ["copper", "violet", "harbor", "meadow", "lantern", "orchid", "falcon", "glacier"]
    keys = rng.sample(names, 4)
    vals = [str(rng.randint(100000, 999999)) for _ in keys]
    body = prose(int(tokens * CHARS_PER_TOKEN["prose"]) - 300, rng)
    if kind == "single":
        needles, ask = [(keys[0], vals[0])], keys[0]
        answer = vals[0]
    elif kind == "multikey":
        needles, ask = list(zip(keys, vals)), keys[0]
        answer = vals[0]
    elif kind == "multivalue":
        needles, ask = [(keys[0], vals[0]), (keys[0], vals[1])], keys[0]
        answer = vals[0] + "," + vals[1]
    else:  # multiquery: two keys asked, answered in order
        needles, ask = [(keys[0], vals[0]), (keys[1], vals[1])], keys[0] + " and " + keys[1]
        answer = vals[0] + "," + vals[1]
    for i, (k, v) in enumerate(needles):
        d = depth if len(needles) == 1 else min(1.0, max(0.0, depth + (i - len(needles) / 2) * 0.15))
        body = insert_at_depth(body, f"The special magic {k} number is {v}.", d)
    q = f"\nWhat is the special magic {ask} number mentioned in the text above? The special magic {ask} number is"
    return dict(task="needle-" + kind, context=body, question=q, answer=answer)


def vartrack(tokens, depth, seed):
    """Variable tracking: a chain X1 = N, X2 = X1, ... hidden in filler; ask which variables hold N."""
    rng = random.Random(seed)
    value = rng.randint(10000, 99999)
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
    n_rep = max(len(stmts), int(tokens * CHARS_PER_TOKEN["filler"] / len(FILLER)))
    parts = [FILLER] * n_rep
    first = int(depth * (n_rep - len(stmts)))
    for i, s in enumerate(stmts):
        parts.insert(first + i * 2, s + " ")
    q = f"\nQuestion: Which variable was assigned the value {value} first? Answer: VAR"
    return dict(task="vartrack", context="".join(parts), question=q, answer=names[0])


def chat(tokens, depth, seed):
    """Two turns over one context (eval/run.py --flow chat): a special magic number (needle-single)
    and a pass key in the same prose, at `depth` and at 1 - depth; turn 1 asks for the number,
    turn 2 for the pass key, which nobody had asked about when the context was compressed.
    (A second magic number among decoys was tried first: SmolLM2's full cache got it wrong after
    a first turn, so there was nothing to compare against.)"""
    inst = needle(tokens, depth, seed, "single")
    key = random.Random(seed + 7919).randint(10000, 99999)
    context = insert_at_depth(inst["context"], f"The pass key is {key}. Remember it. {key} is the pass key.",
                              1.0 - depth)
    return dict(task="chat", context=context, question=inst["question"], answer=inst["answer"],
                question2="\nWhat is the pass key? The pass key is", answer2=str(key),
                id=f"chat-{tokens}-{depth:g}-{seed}", depth=depth, target_tokens=tokens, seed=seed)


GENERATORS = {
    "passkey": passkey,
    "needle-single": lambda t, d, s: needle(t, d, s, "single"),
    "needle-multikey": lambda t, d, s: needle(t, d, s, "multikey"),
    "needle-multivalue": lambda t, d, s: needle(t, d, s, "multivalue"),
    "needle-multiquery": lambda t, d, s: needle(t, d, s, "multiquery"),
    "vartrack": vartrack,
}


def make(task, tokens, depth, seed):
    inst = GENERATORS[task](tokens, depth, seed)
    inst.update(id=f"{task}-{tokens}-{depth:g}-{seed}", seed=seed, depth=depth, target_tokens=tokens)
    return inst


def correct(answer, expected):
    """Every comma-separated expected item appears in the generated answer."""
    return all(e.strip() in answer for e in expected.split(","))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(GENERATORS) + ["suite"])
    ap.add_argument("--tokens", default="2048")
    ap.add_argument("--depth", "--depths", dest="depths", default="0.5")
    ap.add_argument("--seed", "--seeds", dest="seeds", default="1")
    ap.add_argument("--tasks", default=",".join(GENERATORS), help="with suite: which tasks")
    ap.add_argument("--prompt-out", help="write context+question of the (single) instance to this file")
    a = ap.parse_args()
    tasks = a.tasks.split(",") if a.task == "suite" else [a.task]
    for t in tasks:
        for n in map(int, a.tokens.split(",")):
            for d in map(float, a.depths.split(",")):
                for s in map(int, a.seeds.split(",")):
                    inst = make(t, n, d, s)
                    if a.prompt_out:
                        Path(a.prompt_out).write_text(inst["context"] + inst["question"])
                    print(json.dumps(inst))


if __name__ == "__main__":
    main()

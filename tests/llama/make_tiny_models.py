#!/usr/bin/env python3
"""Tiny GGUF models with random weights for the hybrid / recurrent memory tests (python3 stdlib only).

    tests/llama/make_tiny_models.py [OUT_DIR]     (default build/test-llama; prints the two paths)
    tests/llama/make_tiny_models.py --truncate SRC DST N   (DST = SRC's first N layers, real weights)

- `tiny-mamba.gguf`: arch `mamba` (recurrent only: llama.cpp gives it a llama_memory_recurrent and no
  attention KV cache), 2 layers.
- `tiny-lfm2.gguf`: arch `lfm2` (hybrid: short-conv layers in the recurrent part, attention layers in a
  llama_kv_cache; llama_memory_hybrid), 4 layers: conv, attention, conv, attention.
- `tiny-lfm2-swa.gguf`: the same with `lfm2.attention.sliding_window` = 128: every attention layer is
  sliding-window (llama_memory_hybrid_iswa whose full-attention base cache has no layers).

n_embd 64, random weights from a fixed seed (the same bytes on every run), the tokenizer of the test
model (SmolLM2: its `tokenizer.*` keys are copied), so the same prompt files tokenize the same way.
The answers are noise; the tests are about the cache. About 3.5 MB each: the token embedding
(49152 x 64, tied to the output) is Q8_0 with random int8 quants, everything else F32.

Key and tensor names come from the tree's gguf-py (`build/llama-src/gguf-py/gguf/constants.py`, loaded
alone: it needs no numpy); the GGUF file itself is read and written here with `struct`.
"""
import importlib.util
import os
import random
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SRC = os.environ.get("KVC_LLAMA_SRC", os.path.join(ROOT, "build", "llama-src"))
SEED = 20261207
N_EMBD = 64


def load_constants():
    path = os.path.join(SRC, "gguf-py", "gguf", "constants.py")
    spec = importlib.util.spec_from_file_location("gguf_constants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = load_constants()
VT = G.GGUFValueType
QT = G.GGMLQuantizationType
ALIGN = G.GGUF_DEFAULT_ALIGNMENT

SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
          VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


# ---- reading (only the KV section: the tokenizer of the test model) ----

class Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt):
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def string(self):
        return self.f.read(self.unpack("<Q")).decode("utf-8", errors="surrogateescape")

    def value(self, vt):
        if vt == VT.STRING:
            return self.string()
        if vt == VT.ARRAY:
            et = VT(self.unpack("<I"))
            n = self.unpack("<Q")
            if et in SCALAR:   # bulk read of a scalar array
                fmt = SCALAR[et]
                size = struct.calcsize(fmt)
                return (et, list(struct.unpack("<%d%s" % (n, fmt[1]), self.f.read(n * size))))
            return (et, [self.value(et) for _ in range(n)])
        return self.unpack(SCALAR[vt])


def read_kvs(path):
    """[(key, value type, value)] of a GGUF file (arrays: (element type, list))."""
    with open(path, "rb") as f:
        r = Reader(f)
        if f.read(4) != b"GGUF":
            raise ValueError("%s: not a GGUF file" % path)
        r.unpack("<I")           # version
        r.unpack("<Q")           # n_tensors
        n_kv = r.unpack("<Q")
        kvs = []
        for _ in range(n_kv):
            key = r.string()
            vt = VT(r.unpack("<I"))
            kvs.append((key, vt, r.value(vt)))
        return kvs


# ---- writing ----

def enc_string(s):
    b = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(b)) + b


def enc_value(vt, v):
    if vt == VT.STRING:
        return enc_string(v)
    if vt == VT.ARRAY:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        if et in SCALAR:
            return out + struct.pack("<%d%s" % (len(items), SCALAR[et][1]), *items)
        return out + b"".join(enc_value(et, x) for x in items)
    return struct.pack(SCALAR[vt], v)


def write_gguf(path, kvs, tensors):
    """kvs: [(key, type, value)]; tensors: [(name, dims (ggml order: ne0 first), ggml type, bytes)]."""
    out = bytearray(b"GGUF")
    out += struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, vt, v in kvs:
        out += enc_string(key) + struct.pack("<I", vt) + enc_value(vt, v)
    offset = 0
    for name, dims, qt, data in tensors:
        out += enc_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", qt, offset)
        offset += len(data) + (-len(data)) % ALIGN
    out += b"\0" * ((-len(out)) % ALIGN)
    for _, _, _, data in tensors:
        out += data + b"\0" * ((-len(data)) % ALIGN)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, path)


class Weights:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.tensors = []

    def f32(self, name, dims, std=None, const=None):
        n = 1
        for d in dims:
            n *= d
        if const is not None:
            vals = [const] * n
        else:
            std = std if std is not None else 1.0 / dims[0] ** 0.5
            vals = [self.rng.gauss(0.0, std) for _ in range(n)]
        self.tensors.append((name, list(dims), QT.F32, struct.pack("<%df" % n, *vals)))

    def f32_vals(self, name, dims, vals):
        self.tensors.append((name, list(dims), QT.F32, struct.pack("<%df" % len(vals), *vals)))

    def q8_0(self, name, dims):
        """Q8_0: per 32 values an f16 scale and 32 int8 quants; random quants, scale 1/(127*sqrt(ne0))."""
        assert dims[0] % 32 == 0
        n_blocks = dims[0] * dims[1] // 32
        scale = struct.pack("<e", 1.0 / (127.0 * dims[0] ** 0.5))
        q = self.rng.randbytes(32 * n_blocks)
        data = b"".join(scale + q[32 * i:32 * i + 32] for i in range(n_blocks))
        self.tensors.append((name, list(dims), QT.Q8_0, data))


def tensor_name(t, bid=None, suffix="weight"):
    name = G.TENSOR_NAMES[t].format(bid=bid)
    return name + "." + suffix if suffix else name


def tokenizer_kvs(model_path):
    kvs = [kv for kv in read_kvs(model_path) if kv[0].startswith("tokenizer.")]
    n_vocab = len(dict((k, v) for k, _, v in kvs)["tokenizer.ggml.tokens"][1])
    return kvs, n_vocab


def common_kvs(arch, n_layer, n_vocab, name):
    K = G.Keys
    return [
        (K.General.ARCHITECTURE, VT.STRING, arch),
        (K.General.NAME, VT.STRING, name),
        (K.LLM.CONTEXT_LENGTH.format(arch=arch), VT.UINT32, 8192),
        (K.LLM.EMBEDDING_LENGTH.format(arch=arch), VT.UINT32, N_EMBD),
        (K.LLM.BLOCK_COUNT.format(arch=arch), VT.UINT32, n_layer),
        (K.LLM.VOCAB_SIZE.format(arch=arch), VT.UINT32, n_vocab),
        (K.Attention.LAYERNORM_RMS_EPS.format(arch=arch), VT.FLOAT32, 1e-5),
    ]


def make_mamba(path, tok, n_vocab):
    """arch mamba (Mamba-1): 2 layers, d_inner = 2*n_embd (the only expansion llama.cpp supports)."""
    arch, T, K = "mamba", G.MODEL_TENSOR, G.Keys
    n_layer, d_inner, d_conv, d_state, dt_rank = 2, 2 * N_EMBD, 4, 16, 4
    kvs = common_kvs(arch, n_layer, n_vocab, "tiny-mamba (random weights)") + [
        (K.LLM.FEED_FORWARD_LENGTH.format(arch=arch), VT.UINT32, 0),
        (K.Attention.HEAD_COUNT.format(arch=arch), VT.UINT32, 0),
        (K.SSM.CONV_KERNEL.format(arch=arch), VT.UINT32, d_conv),
        (K.SSM.INNER_SIZE.format(arch=arch), VT.UINT32, d_inner),
        (K.SSM.STATE_SIZE.format(arch=arch), VT.UINT32, d_state),
        (K.SSM.TIME_STEP_RANK.format(arch=arch), VT.UINT32, dt_rank),
        (K.SSM.DT_B_C_RMS.format(arch=arch), VT.BOOL, False),
    ] + tok
    w = Weights(SEED)
    w.q8_0(tensor_name(T.TOKEN_EMBD), [N_EMBD, n_vocab])
    w.f32(tensor_name(T.OUTPUT_NORM), [N_EMBD], const=1.0)
    for i in range(n_layer):
        w.f32(tensor_name(T.ATTN_NORM, i), [N_EMBD], const=1.0)
        w.f32(tensor_name(T.SSM_IN, i), [N_EMBD, 2 * d_inner])
        w.f32(tensor_name(T.SSM_CONV1D, i), [d_conv, d_inner])
        w.f32(tensor_name(T.SSM_CONV1D, i, "bias"), [d_inner], std=0.02)
        w.f32(tensor_name(T.SSM_X, i), [d_inner, dt_rank + 2 * d_state])
        w.f32(tensor_name(T.SSM_DT, i), [dt_rank, d_inner])
        w.f32(tensor_name(T.SSM_DT, i, "bias"), [d_inner], std=0.1)
        # A = -exp(A_log), A_log = log(1..d_state) as in Mamba's initialisation: negative, so the state decays
        w.f32_vals(tensor_name(T.SSM_A, i, None), [d_state, d_inner],
                   [-float(s + 1) for _ in range(d_inner) for s in range(d_state)])
        w.f32(tensor_name(T.SSM_D, i, None), [d_inner], const=1.0)
        w.f32(tensor_name(T.SSM_OUT, i), [d_inner, N_EMBD])
    write_gguf(path, kvs, w.tensors)


def make_lfm2(path, tok, n_vocab, n_swa=0):
    """arch lfm2: 4 layers, conv / attention alternating (head_count_kv 0 marks a conv layer), 4 heads of 16, 2 KV heads;
    n_swa > 0: every attention layer is sliding-window (LFM2 makes all of them SWA when the key is set)."""
    arch, T, K = "lfm2", G.MODEL_TENSOR, G.Keys
    n_layer, n_head, n_head_kv, n_ff, l_cache = 4, 4, 2, 128, 3
    head_dim = N_EMBD // n_head
    attn_layers = [1, 3]
    kvs = common_kvs(arch, n_layer, n_vocab, "tiny-lfm2 (random weights)") + [
        (K.LLM.FEED_FORWARD_LENGTH.format(arch=arch), VT.UINT32, n_ff),
        (K.Attention.HEAD_COUNT.format(arch=arch), VT.UINT32, n_head),
        (K.Attention.HEAD_COUNT_KV.format(arch=arch), VT.ARRAY,
         (VT.UINT32, [n_head_kv if i in attn_layers else 0 for i in range(n_layer)])),
        (K.Rope.FREQ_BASE.format(arch=arch), VT.FLOAT32, 1000000.0),
        (K.ShortConv.L_CACHE.format(arch=arch), VT.UINT32, l_cache),
    ] + ([(K.Attention.SLIDING_WINDOW.format(arch=arch), VT.UINT32, n_swa)] if n_swa else []) + tok
    w = Weights(SEED + 1)
    w.q8_0(tensor_name(T.TOKEN_EMBD), [N_EMBD, n_vocab])
    w.f32(tensor_name(T.TOKEN_EMBD_NORM), [N_EMBD], const=1.0)   # LFM2's output norm has this name
    for i in range(n_layer):
        w.f32(tensor_name(T.ATTN_NORM, i), [N_EMBD], const=1.0)
        w.f32(tensor_name(T.FFN_NORM, i), [N_EMBD], const=1.0)
        w.f32(tensor_name(T.FFN_GATE, i), [N_EMBD, n_ff])
        w.f32(tensor_name(T.FFN_UP, i), [N_EMBD, n_ff])
        w.f32(tensor_name(T.FFN_DOWN, i), [n_ff, N_EMBD])
        if i in attn_layers:
            w.f32(tensor_name(T.ATTN_Q_NORM, i), [head_dim], const=1.0)
            w.f32(tensor_name(T.ATTN_K_NORM, i), [head_dim], const=1.0)
            w.f32(tensor_name(T.ATTN_Q, i), [N_EMBD, N_EMBD])
            w.f32(tensor_name(T.ATTN_K, i), [N_EMBD, head_dim * n_head_kv])
            w.f32(tensor_name(T.ATTN_V, i), [N_EMBD, head_dim * n_head_kv])
            w.f32(tensor_name(T.ATTN_OUT, i), [N_EMBD, N_EMBD])
        else:
            w.f32(tensor_name(T.SHORTCONV_CONV, i), [l_cache, N_EMBD])
            w.f32(tensor_name(T.SHORTCONV_INPROJ, i), [N_EMBD, 3 * N_EMBD])
            w.f32(tensor_name(T.SHORTCONV_OUTPROJ, i), [N_EMBD, N_EMBD])
    write_gguf(path, kvs, w.tensors)


def truncate_layers(src, dst, n_layer):
    """dst = src's first n_layer blocks with their real weights (the embedding, output and tokenizer kept):
    a model small enough for the GPU kit (scripts/gpu-check.sh carries at most 64 MiB) that still attends like
    the trained one in its first layers. Its answers are not the full model's."""
    with open(src, "rb") as f:
        r = Reader(f)
        if f.read(4) != b"GGUF":
            raise ValueError("%s: not a GGUF file" % src)
        r.unpack("<I")
        n_tensors = r.unpack("<Q")
        n_kv = r.unpack("<Q")
        kvs = []
        for _ in range(n_kv):
            key = r.string()
            vt = VT(r.unpack("<I"))
            kvs.append((key, vt, r.value(vt)))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            infos.append((name, dims, r.unpack("<I"), r.unpack("<Q")))
        align = next((v for k, _, v in kvs if k == "general.alignment"), ALIGN)
        base = f.tell() + (-f.tell()) % align
        size = os.fstat(f.fileno()).st_size - base
        ends = sorted(o for _, _, _, o in infos)[1:] + [size]
        end_of = dict(zip(sorted(o for _, _, _, o in infos), ends))
        arch = next(v for k, _, v in kvs if k == "general.architecture")
        kvs = [(k, vt, n_layer if k == "%s.block_count" % arch else v) for k, vt, v in kvs]
        tensors = []
        for name, dims, qt, off in infos:
            if name.startswith("blk.") and int(name.split(".")[1]) >= n_layer:
                continue
            f.seek(base + off)
            tensors.append((name, dims, qt, f.read(end_of[off] - off)))
    write_gguf(dst, kvs, tensors)


def main(out_dir=None):
    sys.path.insert(0, HERE)
    import kvc_common as k
    out_dir = out_dir or k.TMP
    os.makedirs(out_dir, exist_ok=True)
    tok, n_vocab = tokenizer_kvs(k.MODEL)
    paths = {name: os.path.join(out_dir, "tiny-%s.gguf" % name) for name in ("mamba", "lfm2", "lfm2-swa")}
    make_mamba(paths["mamba"], tok, n_vocab)
    make_lfm2(paths["lfm2"], tok, n_vocab)
    make_lfm2(paths["lfm2-swa"], tok, n_vocab, n_swa=128)
    return paths


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--truncate":
        truncate_layers(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    for p in main(sys.argv[1] if len(sys.argv) > 1 else None).values():
        print(p)

#!/usr/bin/env python3
"""Write a random-weight llama-architecture GGUF (Q4_0 or F16 weights, vocabulary type "none") for speed runs
and device checks.

Speed depends on shapes and types, not on the weights, so an 8B-shaped model can be written where it runs
(a GPU host without registry access) instead of carried there. Standard library only: the host may not have
numpy, which llama.cpp's gguf-py needs.

    GGUF v3: magic "GGUF", version 3, n_tensors, n_kv; the key/value pairs; the tensor infos (name, dims
    innermost first, ggml type, offset into the data); padding to general.alignment (32); the tensor data,
    each tensor at an aligned offset.
    Q4_0 (ggml type 2): blocks of 32 weights, 18 bytes: an f16 scale d, then 16 bytes of 4-bit quants q;
    w = d * (q - 8). d is fixed and small (--scale), the quants random.
    F16 (--type f16, ggml type 1): each weight an IEEE half, uniform in [-scale, scale] (--scale 0.02 suits).
    The random data is one chunk (1.1 MiB of Q4_0 blocks, 2 MiB of halves) repeated, and each tensor starts at
    its own random offset into it (--same-data: every tensor at offset 0, as the first version wrote), so no two
    tensors hold the same data and the layers differ. Norm weights are f32 ones. tokenizer.ggml.model = "none" and llama.vocab_size give llama.cpp dummy tokens;
    llama-compresskv-bench decodes random token ids and needs no vocabulary.

    python3 bench/random_gguf.py --shape 8b -o /tmp/llama8b-q4_0.gguf     # Llama-3-8B shape, ~4.3 GB
    python3 bench/random_gguf.py --shape tiny -o /tmp/tiny.gguf           # 2 layers, for tests (~1 MB)
    python3 bench/random_gguf.py --shape 1b --type f16 --scale 0.02 -o /tmp/llama1b-f16.gguf   # ~2.5 GB
"""
import argparse
import os
import random
import struct
import sys

SHAPES = {
    # Llama-3-8B: 32 layers, 4096 wide, 32 heads / 8 KV heads of 128, FFN 14336, vocabulary 128256
    "8b": dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx=131072,
               rope_base=500000.0),
    # Llama-3.2-1B: 16 layers, 2048 wide, 32 heads / 8 KV heads of 64, FFN 8192
    "1b": dict(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx=131072,
               rope_base=500000.0),
    "tiny": dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=1024, n_ctx=8192,
                 rope_base=10000.0),
}
ALIGN = 32
T_F32, T_F16, T_Q4_0 = 0, 1, 2
V_UINT32, V_FLOAT32, V_STRING = 4, 6, 8
CHUNK_BLOCKS = 1 << 16  # 1.1 MiB of random Q4_0 blocks, repeated through every tensor
CHUNK_HALVES = 1 << 20  # 2 MiB of random halves


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value):
    if vtype == V_STRING:
        payload = gguf_str(value)
    elif vtype == V_UINT32:
        payload = struct.pack("<I", value)
    elif vtype == V_FLOAT32:
        payload = struct.pack("<f", value)
    else:
        raise ValueError(vtype)
    return gguf_str(key) + struct.pack("<I", vtype) + payload


def tensors(s, w=T_Q4_0):
    """(name, dims innermost first, type) in llama.cpp's naming; matrices of type w."""
    e, f, v = s["n_embd"], s["n_ff"], s["n_vocab"]
    kvd = s["n_embd"] // s["n_head"] * s["n_head_kv"]
    out = [("token_embd.weight", [e, v], w)]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", [e], T_F32), (p + "attn_q.weight", [e, e], w),
                (p + "attn_k.weight", [e, kvd], w), (p + "attn_v.weight", [e, kvd], w),
                (p + "attn_output.weight", [e, e], w), (p + "ffn_norm.weight", [e], T_F32),
                (p + "ffn_gate.weight", [e, f], w), (p + "ffn_up.weight", [e, f], w),
                (p + "ffn_down.weight", [f, e], w)]
    out += [("output_norm.weight", [e], T_F32), ("output.weight", [e, v], w)]
    return out


def nbytes(dims, t):
    n = 1
    for d in dims:
        n *= d
    if t == T_F32:
        return 4 * n
    if t == T_F16:
        return 2 * n
    assert dims[0] % 32 == 0, dims
    return n // 32 * 18


def pad(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write(path, s, scale, seed, w=T_Q4_0, same_data=False):
    head_dim = s["n_embd"] // s["n_head"]
    meta = [kv("general.architecture", V_STRING, "llama"),
            kv("general.name", V_STRING, f"random-{s['n_layer']}x{s['n_embd']}"),
            kv("general.alignment", V_UINT32, ALIGN),
            kv("llama.context_length", V_UINT32, s["n_ctx"]),
            kv("llama.embedding_length", V_UINT32, s["n_embd"]),
            kv("llama.block_count", V_UINT32, s["n_layer"]),
            kv("llama.feed_forward_length", V_UINT32, s["n_ff"]),
            kv("llama.attention.head_count", V_UINT32, s["n_head"]),
            kv("llama.attention.head_count_kv", V_UINT32, s["n_head_kv"]),
            kv("llama.rope.dimension_count", V_UINT32, head_dim),
            kv("llama.rope.freq_base", V_FLOAT32, s["rope_base"]),
            kv("llama.attention.layer_norm_rms_epsilon", V_FLOAT32, 1e-5),
            kv("llama.vocab_size", V_UINT32, s["n_vocab"]),
            kv("tokenizer.ggml.model", V_STRING, "none")]
    ts = tensors(s, w)
    infos, off = [], 0
    for name, dims, t in ts:
        infos.append(gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) +
                     struct.pack("<IQ", t, off))
        off = pad(off + nbytes(dims, t))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(ts), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * (pad(len(head)) - len(head))

    rng = random.Random(seed)
    if w == T_F16:
        unit = 2
        chunk = struct.pack(f"<{CHUNK_HALVES}e", *(rng.uniform(-scale, scale) for _ in range(CHUNK_HALVES)))
    else:
        unit = 18
        d = struct.pack("<e", scale)
        qs = rng.randbytes(16 * CHUNK_BLOCKS)
        chunk = b"".join(d + qs[16 * i:16 * i + 16] for i in range(CHUNK_BLOCKS))
    ones = struct.pack("<f", 1.0)

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        pos = 0
        for _, dims, t in ts:
            n = nbytes(dims, t)
            if t == T_F32:
                f.write(ones * (n // 4))
            else:
                # this tensor's data: the chunk rotated to a random whole block (or half)
                start = 0 if same_data else unit * rng.randrange(len(chunk) // unit)
                rot = chunk[start:] + chunk[:start]
                for k in range(0, n, len(rot)):
                    f.write(rot[:min(len(rot), n - k)])
            pos = pad(pos + n)
            f.write(b"\0" * (pad(n) - n))
    os.replace(tmp, path)
    return len(head) + pos


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--type", choices=["q4_0", "f16"], default="q4_0", help="the matrices' type")
    ap.add_argument("--scale", type=float, default=0.002,
                    help="the Q4_0 blocks' scale d, or the F16 weights' range [-scale, scale]")
    ap.add_argument("--same-data", action="store_true", help="every tensor the same data (the first version)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    w = T_F16 if args.type == "f16" else T_Q4_0
    n = write(args.out, SHAPES[args.shape], args.scale, args.seed, w, args.same_data)
    print(f"{args.out}: {n} bytes, shape {args.shape} {SHAPES[args.shape]}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write a random-weight llama-architecture GGUF (Q4_0 weights, vocabulary type "none") for speed runs.

Speed depends on shapes and types, not on the weights, so an 8B-shaped model can be written where it runs
(a GPU host without registry access) instead of carried there. Standard library only: the host may not have
numpy, which llama.cpp's gguf-py needs.

    GGUF v3: magic "GGUF", version 3, n_tensors, n_kv; the key/value pairs; the tensor infos (name, dims
    innermost first, ggml type, offset into the data); padding to general.alignment (32); the tensor data,
    each tensor at an aligned offset.
    Q4_0 (ggml type 2): blocks of 32 weights, 18 bytes: an f16 scale d, then 16 bytes of 4-bit quants q;
    w = d * (q - 8). d is fixed and small (--scale), the quants random (one random chunk of blocks, repeated).
    Norm weights are f32 ones. tokenizer.ggml.model = "none" and llama.vocab_size give llama.cpp dummy tokens;
    llama-compresskv-bench decodes random token ids and needs no vocabulary.

    python3 bench/random_gguf.py --shape 8b -o /tmp/llama8b-q4_0.gguf     # Llama-3-8B shape, ~4.3 GB
    python3 bench/random_gguf.py --shape tiny -o /tmp/tiny.gguf           # 2 layers, for tests (~1 MB)
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
    "tiny": dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=1024, n_ctx=8192,
                 rope_base=10000.0),
}
ALIGN = 32
T_F32, T_Q4_0 = 0, 2
V_UINT32, V_FLOAT32, V_STRING = 4, 6, 8
CHUNK_BLOCKS = 1 << 16  # 1.1 MiB of random blocks, repeated through every tensor


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


def tensors(s):
    """(name, dims innermost first, type) in llama.cpp's naming."""
    e, f, v = s["n_embd"], s["n_ff"], s["n_vocab"]
    kvd = s["n_embd"] // s["n_head"] * s["n_head_kv"]
    out = [("token_embd.weight", [e, v], T_Q4_0)]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", [e], T_F32), (p + "attn_q.weight", [e, e], T_Q4_0),
                (p + "attn_k.weight", [e, kvd], T_Q4_0), (p + "attn_v.weight", [e, kvd], T_Q4_0),
                (p + "attn_output.weight", [e, e], T_Q4_0), (p + "ffn_norm.weight", [e], T_F32),
                (p + "ffn_gate.weight", [e, f], T_Q4_0), (p + "ffn_up.weight", [e, f], T_Q4_0),
                (p + "ffn_down.weight", [f, e], T_Q4_0)]
    out += [("output_norm.weight", [e], T_F32), ("output.weight", [e, v], T_Q4_0)]
    return out


def nbytes(dims, t):
    n = 1
    for d in dims:
        n *= d
    if t == T_F32:
        return 4 * n
    assert dims[0] % 32 == 0, dims
    return n // 32 * 18


def pad(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write(path, s, scale, seed):
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
    ts = tensors(s)
    infos, off = [], 0
    for name, dims, t in ts:
        infos.append(gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) +
                     struct.pack("<IQ", t, off))
        off = pad(off + nbytes(dims, t))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(ts), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * (pad(len(head)) - len(head))

    d = struct.pack("<e", scale)
    qs = random.Random(seed).randbytes(16 * CHUNK_BLOCKS)
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
                for k in range(0, n, len(chunk)):
                    f.write(chunk[:min(len(chunk), n - k)])
            pos = pad(pos + n)
            f.write(b"\0" * (pad(n) - n))
    os.replace(tmp, path)
    return len(head) + pos


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--scale", type=float, default=0.002, help="the Q4_0 blocks' scale d")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    n = write(args.out, SHAPES[args.shape], args.scale, args.seed)
    print(f"{args.out}: {n} bytes, shape {args.shape} {SHAPES[args.shape]}", file=sys.stderr)


if __name__ == "__main__":
    main()

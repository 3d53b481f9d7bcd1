#!/usr/bin/env python3
"""Key biases of a qwen2-architecture GGUF: per layer, the largest and median
|b| of `blk.L.attn_k.bias` and its largest channels with the period (in tokens)
of the RoPE pair each channel belongs to (NeoX pairing: channel d of a head
rotates with pair d mod head_dim/2 at frequency base^(-2p/head_dim)). A bias in
a pair whose period is far longer than the context stays nearly constant
after RoPE, so a per-stream mean (`--center-keys`) removes it.

Usage: python3 scripts/gguf_kbias.py PATH.gguf   (standard library only)
"""
import array
import math
import struct
import sys

SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def main(path):
    f = open(path, "rb")

    def rd(fmt):
        return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

    def string():
        return f.read(rd("Q")).decode("utf-8", "replace")

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = rd("I"), rd("Q")
            return [value(et) for _ in range(n)]
        return rd(SCALAR[t])

    if f.read(4) != b"GGUF":
        sys.exit(f"{path} is not a GGUF file")
    rd("I")
    n_tensors, n_kv = rd("Q"), rd("Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        v = value(rd("I"))
        meta[k] = v if not isinstance(v, list) or len(v) < 16 else None
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        sys.exit(f"{path}: architecture {arch!r}, not qwen2")
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = [rd("Q") for _ in range(rd("I"))]
        ty, off = rd("I"), rd("Q")
        tensors[name] = (dims, ty, off)
    align = meta.get("general.alignment", 32)
    base = (f.tell() + align - 1) // align * align
    heads, embed = meta["qwen2.attention.head_count"], meta["qwen2.embedding_length"]
    hd = embed // heads
    half, rope_base = hd // 2, meta.get("qwen2.rope.freq_base", 10000.0)
    for layer in range(meta["qwen2.block_count"]):
        dims, ty, off = tensors[f"blk.{layer}.attn_k.bias"]
        if ty != 0:
            sys.exit(f"blk.{layer}.attn_k.bias is not f32")
        f.seek(base + off)
        b = array.array("f")
        b.frombytes(f.read(4 * dims[0]))
        mags = sorted(abs(x) for x in b)
        top = sorted(range(len(b)), key=lambda i: -abs(b[i]))[:4]
        cols = []
        for i in top:
            h, d = divmod(i, hd)
            period = 2 * math.pi / rope_base ** (-2 * (d % half) / hd)
            cols.append(f"head {h} dim {d}: {b[i]:+.1f} (RoPE period {period:,.0f} tokens)")
        print(f"layer {layer:2}: max |b| {mags[-1]:6.1f}, median {mags[len(mags) // 2]:.2f}; " + "; ".join(cols))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

#!/usr/bin/env python3
"""Baseline for `tq bench cuda`: PyTorch SDPA decode attention in bf16.

One query token per sequence (or `--q-tokens N`: N query tokens attending to
the whole cache, no mask), K/V caches of `context` tokens, GQA through
`enable_gqa=True`, on the same card and in the same device call as the Rust
benchmark. Prints one JSON object per case (the keys `tq bench cuda --sdpa`
reads). Several copies of the cache are cycled when one copy is small, as the
Rust side does, so that neither measures the L2 cache. Timed with CUDA events,
median of 20 after 3 warm-ups.
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

GEOMETRIES = [("llama3-8b", 32, 8, 128), ("smollm2-135m", 9, 3, 64), ("qwen2.5-1.5b", 12, 2, 128)]


def time_case(b, t, hq, hkv, d, nq=1, warmup=3, iters=20):
    dev = "cuda"
    per = 2 * b * hkv * t * d * 2  # K and V bytes, bf16
    copies = max(1, min(16, math.ceil((1 << 28) / per)))
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, hq, nq, d, device=dev, dtype=torch.bfloat16, generator=g)
    ks = [torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    vs = [torch.randn(b, hkv, t, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    out = None
    for i in range(warmup):
        out = F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], enable_gqa=True)
    times = []
    for i in range(iters):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], enable_gqa=True)
        e.record()
        e.synchronize()
        times.append(a.elapsed_time(e))
    assert torch.isfinite(out).all()
    times.sort()
    ms = times[len(times) // 2]
    del ks, vs
    torch.cuda.empty_cache()
    return ms, per / (ms * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="B=8, T=32K only")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,8,32; --quick: 8)")
    ap.add_argument("--contexts", help="comma-separated cache lengths (default 8192,32768,131072; --quick: 32768)")
    ap.add_argument("--q-tokens", default="1", help="comma-separated query tokens per sequence (default 1)")
    ap.add_argument("--geometries", help="comma-separated geometry names (default: all)")
    ap.add_argument("--out", help="also write the JSON lines here")
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]
    batches, contexts = ([8], [32768]) if a.quick else ([1, 8, 32], [8192, 32768, 131072])
    batches = ints(a.batches) if a.batches else batches
    contexts = ints(a.contexts) if a.contexts else contexts
    geos = [g for g in GEOMETRIES if not a.geometries or g[0] in a.geometries.split(",")]
    card = torch.cuda.get_device_name()
    lines = []
    for geo, hq, hkv, d in geos:
        for b in batches:
            for t in contexts:
                for nq in ints(a.q_tokens):
                    ms, gbps = time_case(b, t, hq, hkv, d, nq)
                    row = {"card": card, "geometry": geo, "batch": b, "context": t, "q_tokens": nq, "q_heads": hq,
                           "kv_heads": hkv, "head_dim": d, "sdpa_bf16_ms": ms, "sdpa_gbps": gbps, "torch": torch.__version__}
                    print(json.dumps(row), flush=True)
                    lines.append(json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

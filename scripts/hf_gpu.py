#!/usr/bin/env python3
"""The transformers integration on a CUDA GPU, in one process: kernel checks
against the CPU, perplexity/KLD of the GPU cache beside the CPU cache, and
decode throughput against transformers' DynamicCache.

    scripts/hf_gpu.py check                      # CudaKv against the CPU codecs and KvCache
    scripts/hf_gpu.py eval --gguf M.gguf --text austen.txt --chunks 8 --kv tq-mse-4,k4v3 [--cpu]
    scripts/hf_gpu.py decode --gguf M.gguf --contexts 512,4096 --batches 1,8 --kv tq-mse-4
    scripts/hf_gpu.py decode --config llama3-8b --contexts 8192,32768 --batches 8 --kv tq-mse-4
    scripts/hf_gpu.py decode --config llama3-8b --contexts 32768 --capacity --kv tq-mse-4

``check`` needs no model: random normal keys/values/queries (a parity test:
the expected answer is the CPU's), every GPU precision at head_dim 64 and
128, GPU codes against ``turboquant.Codec`` byte for byte (norms rounded to
bf16 as the CPU cache stores them), GPU attention against ``KvCache`` (tensor
cores and the exact kernel), and the refusals. ``eval`` follows
``scripts/hf_eval.py`` (chunks of --ctx tokens, second halves scored, KLD
against the f32 DynamicCache of the same device); ``--cpu`` also runs the
CPU cache on a CPU copy of the model for the same chunks. ``decode`` times
greedy decode steps with CUDA events after a prompt of each context (bf16
weights; ``--config llama3-8b`` is a randomly initialised model of
Llama-3.1-8B's shape: speed does not depend on weight values).
Prints one JSON line per result; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import turboquant as tq
import turboquant.hf  # noqa: F401  (registers attn_implementation="turboquant")
from turboquant.hf import TurboQuantCache

GPU_PRECISIONS = ["tq-mse-4", "tq-mse-3", "tq-mse-2", "tq-mse-4-nc", "k4v3", "k4v2"]


def card() -> str:
    return torch.cuda.get_device_name(0)


def sides(precision: str) -> tuple[str, str]:
    if precision.startswith("tq-mse-"):
        return precision, precision
    nc = "-nc" if precision.endswith("-nc") else ""
    kb, vb = precision[1:].removesuffix("-nc").split("v")
    return f"tq-mse-{kb}{nc}", f"tq-mse-{vb}{nc}"


def bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


def check(a) -> int:
    failures = 0
    dev = torch.device("cuda")
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    g = torch.Generator().manual_seed(7)
    for hq, h, d in [] if a.layer_only else [(9, 3, 64), (12, 2, 128), (32, 8, 128)]:
        for p in GPU_PRECISIONS:
            for exact in (False, True):
                kv = tq.CudaKv(p, hq, h, d, seed=a.seed, exact=exact)
                b, n0, n1, cap = 2, 250, 3, 384
                x = torch.randn((b, h, n0 + n1, d), generator=g) * torch.rand((b, h, n0 + n1, 1), generator=g) * 4
                y = torch.randn((b, h, n0 + n1, d), generator=g)
                q = torch.randn((b, n0 + n1, hq, d), generator=g)
                planes = [torch.zeros((b, h, cap, kv.key_code_bytes), dtype=torch.uint8, device=dev), torch.zeros((b, h, cap), device=dev),
                          torch.zeros((b, h, cap, kv.value_code_bytes), dtype=torch.uint8, device=dev), torch.zeros((b, h, cap), device=dev)]
                lens = torch.zeros(b, dtype=torch.int32, device=dev)
                cpu = tq.KvCache(p, 1, hq, h, d, batch=b, seed=a.seed)
                outs = []
                for s, e in [(0, n0), (n0, n0 + n1)]:
                    lens += e - s
                    kv.encode("k", x[:, :, s:e].contiguous().to(dev), planes[0], planes[1], stream(), lens)
                    kv.encode("v", y[:, :, s:e].contiguous().to(dev), planes[2], planes[3], stream(), lens)
                    ref = cpu.update(0, x[:, :, s:e].transpose(1, 2).contiguous().numpy(), y[:, :, s:e].transpose(1, 2).contiguous().numpy(),
                                     q[:, s:e].contiguous().numpy())
                    if e - s <= 8:
                        out = torch.empty((b, e - s, hq, d), device=dev)
                        kv.attend(q[:, s:e].contiguous().to(dev), *planes, lens, out, stream())
                        outs.append((out.cpu().numpy(), ref))
                torch.cuda.synchronize()
                # codes: byte for byte against the CPU codecs (values seeded by kv_value_seed)
                kname, vname = sides(p)
                bad_codes = 0
                for (name, seed, data, cp, sp) in [(kname, a.seed, x, planes[0], planes[1]), (vname, tq.kv_value_seed(a.seed), y, planes[2], planes[3])]:
                    c = tq.Codec(name, d, seed, "hadamard")
                    ref = c.encode(data.reshape(-1, d).numpy().astype(np.float32)).reshape(b, h, n0 + n1, -1)
                    pb = cp.shape[-1]
                    got_c = cp[:, :, : n0 + n1].cpu().numpy()
                    got_s = sp[:, :, : n0 + n1].cpu().numpy()
                    ref_s = bf16(ref[..., pb : pb + 4].copy().view(np.float32)[..., 0])
                    bad_codes += int((got_c != ref[..., :pb]).any(-1).sum()) + int((got_s != ref_s).sum())
                    bad_codes += int(cp[:, :, n0 + n1 :].any()) + int(sp[:, :, n0 + n1 :].any())  # nothing written past the lengths
                err = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in outs)
                tol = 1e-5 if exact else 3e-3
                ok = bad_codes == 0 and err < tol
                failures += not ok
                print(json.dumps({"check": "cuda-kv", "card": card(), "precision": p, "geometry": [hq, h, d], "kernel": kv.kernel,
                                  "codes_differing": bad_codes, "codes": 2 * b * h * (n0 + n1), "attention_rel_err": err, "tol": tol, "ok": ok}), flush=True)
    # the transformers layer path (turboquant.hf): a 250-token prompt attended on
    # its codes 8 queries per launch, then a 3-token step, with and without key
    # centering, against the CPU cache on the same keys, values and queries
    from turboquant.hf import _GpuPlanes

    for hq, h, d in [(9, 3, 64), (12, 2, 128)]:
        for p in ["tq-mse-4", "k4v3"]:
            for center in (False, True):
                for exact in (False, True):
                    kv = tq.CudaKv(p, hq, h, d, seed=a.seed, exact=exact)
                    planes = _GpuPlanes(kv, None, "codes", dev, None, center_keys=center)
                    cpu = tq.KvCache(p, 1, hq, h, d, batch=2, seed=a.seed, center_keys=center)
                    x = torch.randn((2, h, 253, d), generator=g) + 3 * torch.randn((1, h, 1, d), generator=g)  # an offset per head
                    y = torch.randn((2, h, 253, d), generator=g)
                    q = torch.randn((2, hq, 253, d), generator=g)
                    errs = []
                    for s0, e0 in [(0, 250), (250, 253)]:
                        xs, ys, qs = x[:, :, s0:e0], y[:, :, s0:e0], q[:, :, s0:e0]
                        planes.append(xs.to(dev), ys.to(dev))
                        got = planes.attend(qs.to(dev), xs.to(dev), ys.to(dev)).cpu().numpy()
                        ref = cpu.update(0, xs.transpose(1, 2).contiguous().numpy(), ys.transpose(1, 2).contiguous().numpy(),
                                         qs.transpose(1, 2).contiguous().numpy())
                        errs.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
                    tol = 1e-5 if exact else 3e-3
                    ok = max(errs) < tol
                    failures += not ok
                    print(json.dumps({"check": "hf-layer", "card": card(), "precision": p, "geometry": [hq, h, d], "center_keys": center,
                                      "kernel": kv.kernel, "prompt_rel_err": errs[0], "step_rel_err": errs[1], "tol": tol, "ok": ok}), flush=True)
    # refusals: each must raise, naming the problem
    kv = tq.CudaKv("tq-mse-4", 9, 3, 64)
    good = dict(x=torch.zeros((1, 3, 4, 64), device=dev), codes=torch.zeros((1, 3, 128, 32), dtype=torch.uint8, device=dev),
                scales=torch.zeros((1, 3, 128), device=dev))
    cases = {
        "cpu tensor": dict(good, x=torch.zeros((1, 3, 4, 64))),
        "wrong dtype": dict(good, x=torch.zeros((1, 3, 4, 64), device=dev, dtype=torch.float16)),
        "wrong head_dim": dict(good, x=torch.zeros((1, 3, 4, 128), device=dev)),
        "non-contiguous": dict(good, x=torch.zeros((1, 4, 3, 64), device=dev).transpose(1, 2)),
        "planes too small": dict(good, scales=torch.zeros((1, 3, 64), device=dev)),
    }
    for what, args in cases.items():
        try:
            kv.encode("k", args["x"], args["codes"], args["scales"], stream())
            msg, ok = "no error", False
        except (ValueError, TypeError) as e:
            msg, ok = str(e), True
        failures += not ok
        print(json.dumps({"check": "refusal", "case": what, "error": msg, "ok": ok}), flush=True)
    return failures


def load(gguf: str, dtype, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation="turboquant", dtype=dtype)
    return tok, model.to(device).eval()


def text_chunks(tok, path: str, chars: int, ctx: int, n: int) -> tuple[int, list[torch.Tensor]]:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        text = f.read()[:chars]
    ids = tok(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    if len(ids) // ctx < n:
        sys.exit(f"{len(ids)} tokens hold {len(ids) // ctx} chunks of {ctx}, not {n}")
    return len(ids), [ids[i * ctx : (i + 1) * ctx] for i in range(n)]


@torch.no_grad()
def evaluate(a) -> None:
    from transformers import DynamicCache

    torch.backends.cuda.matmul.allow_tf32 = False
    tok, model = load(a.gguf, torch.float32, "cuda")
    n_tokens, parts = text_chunks(tok, a.text, a.chars, a.ctx, a.chunks)
    cpu_model = load(a.gguf, torch.float32, "cpu")[1] if a.cpu else None
    first = a.ctx // 2
    meta = {"card": card(), "model": os.path.basename(a.gguf), "tokens": n_tokens, "ctx": a.ctx, "chunks": a.chunks, "seed": a.seed,
            "torch": torch.__version__}

    def run(m, dev, cache_of):
        lps = []
        for c in parts:
            lg = m(c[None].to(dev), past_key_values=cache_of(m), use_cache=True).logits[0].float()
            lps.append(torch.log_softmax(lg[first:-1], -1).cpu())
        return lps

    runs = {"cuda": (model, "cuda")} | ({"cpu": (cpu_model, "cpu")} if cpu_model is not None else {})
    for where, (m, dev) in runs.items():
        ref = run(m, dev, lambda m: DynamicCache(config=m.config))
        targets = [c[first + 1 :] for c in parts]
        n = sum(len(t) for t in targets)
        ppl_ref = float(np.exp(sum(-lp.gather(1, t[:, None]).sum().item() for lp, t in zip(ref, targets)) / n))
        for p in a.kv.split(","):
            if where == "cpu" and p not in a.cpu_kv.split(","):
                continue
            for exact in ([False, True] if where == "cuda" and a.exact else [False]):
                t0 = time.perf_counter()
                caches = []

                def cache_of(m):
                    caches.append(TurboQuantCache(m.config, precision=p, seed=a.seed, exact_attention=exact))
                    return caches[-1]

                lq = run(m, dev, cache_of)
                nll = sum(-l.gather(1, t[:, None]).sum().item() for l, t in zip(lq, targets))
                kld = sum((r.exp() * (r - l)).sum().item() for r, l in zip(ref, lq))
                agree = sum((r.argmax(-1) == l.argmax(-1)).sum().item() for r, l in zip(ref, lq))
                row = {"device": where, "kv": p, "exact_attention": exact, "ppl": float(np.exp(nll / n)), "ppl_f32": ppl_ref,
                       "dppl_pct": 100 * (np.exp(nll / n) / ppl_ref - 1), "kld": kld / n, "top1_agree": agree / n, "scored_tokens": n,
                       "bits_per_value": caches[-1].bits_per_value, "seconds": time.perf_counter() - t0}
                print(json.dumps(meta | row), flush=True)


def random_config(name: str):
    """A model of a real geometry with random weights (speed does not depend on weight values)."""
    from transformers import LlamaConfig, Qwen2Config

    if name == "llama3-8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, head_dim=128)
    if name == "qwen2.5-1.5b":
        return Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                           vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def kv_bytes_of(cache) -> int:
    if isinstance(cache, TurboQuantCache):
        return cache.nbytes
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers)


def fill_random(model, cache, b: int, t: int) -> None:
    """Fills every layer with t random tokens per sequence (no prefill: a
    decode step's cost does not depend on what is cached)."""
    cfg = model.config
    h, d = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        if isinstance(cache, TurboQuantCache):
            layer = cache.layers[i]
            for s in range(0, t, 2048):
                n = min(2048, t - s)
                k = torch.randn((b, h, n, d), device="cuda", dtype=torch.bfloat16)
                if not layer.is_initialized:
                    layer.lazy_initialization(k, k)
                layer._gpu_planes().append(k, torch.randn_like(k))
                layer._length += n
        else:
            k = torch.randn((b, h, t, d), device="cuda", dtype=torch.bfloat16)
            cache.update(k, torch.randn_like(k), i)


def step_ms(model, cache, nxt, warmup: int, steps: int) -> tuple[float, torch.Tensor]:
    for _ in range(warmup):
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(steps):
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / steps, nxt


ATTENTION_KERNELS = ("tq_", "flash", "fmha", "attention", "softmax", "sdpa", "efficient")


def profile_steps(model, cache, nxt, steps: int) -> dict:
    """GPU time per decode step (CUDA kernels, by the torch profiler) and the
    share of it in attention kernels (ours: tq_*; SDPA's fused or unfused ones)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    attn = sum(e.self_device_time_total for e in kernels if any(k in e.key.lower() for k in ATTENTION_KERNELS)) / 1e3 / steps
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
    return {"gpu_ms_per_step": total, "attention_gpu_ms_per_step": attn,
            "top_kernels": [[e.key[:60], round(e.self_device_time_total / 1e3 / steps, 3)] for e in top]}


@torch.no_grad()
def decode(a) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    if a.config:
        cfg = random_config(a.config)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="turboquant").eval()
        label = f"{a.config} geometry, random weights"
    else:
        model = load(a.gguf, torch.bfloat16, "cuda")[1]
        label = os.path.basename(a.gguf)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    kinds = ["bf16 DynamicCache"] + a.kv.split(",")
    extra = a.warmup + a.steps + 1

    def make(p: str, t: int):
        if p.startswith("bf16"):
            return DynamicCache(config=model.config)
        return TurboQuantCache(model.config, precision=p, prefill="sdpa", max_length=t + extra)

    def per_sequence(p: str, t: int) -> int:
        cfg = model.config
        h = cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if p.startswith("bf16"):
            return 2 * cfg.num_hidden_layers * h * (t + extra) * d * 2
        kv = tq.CudaKv(p, cfg.num_attention_heads, h, d)
        cap = -(-(t + extra) // 128) * 128
        return cfg.num_hidden_layers * h * cap * (kv.key_code_bytes + kv.value_code_bytes + 8)

    for t in [int(x) for x in a.contexts.split(",")]:
        if a.capacity:
            batches = {}
            free = torch.cuda.mem_get_info()[0]
            for p in kinds:
                # the most sequences whose cache fits, leaving room for a step's activations
                batches[p] = max(1, int((free - a.reserve_gib * 2**30) // per_sequence(p, t)))
        for b in [None] if a.capacity else [int(x) for x in a.batches.split(",")]:
            prompt = None
            for p in kinds:
                bb = batches[p] if a.capacity else b
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                row = {"batch": bb, "context": t}
                try:
                    cache = make(p, t)
                    if a.capacity:
                        fill_random(model, cache, bb, t)
                        nxt = torch.randint(0, vocab, (bb, 1), generator=g).cuda()
                    else:
                        if prompt is None:
                            prompt = torch.randint(0, vocab, (bb, t), generator=g).cuda()
                        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                        del out
                    held = torch.cuda.memory_allocated() - base
                    ms, nxt = step_ms(model, cache, nxt, a.warmup, a.steps)
                    row |= {"ms_per_step": ms, "tokens_per_s": bb * 1e3 / ms, "kv_bytes": kv_bytes_of(cache), "held_after_fill": held,
                            "peak_above_start": torch.cuda.max_memory_allocated() - base}
                    if isinstance(cache, TurboQuantCache):
                        row["allocated_bytes"] = cache.allocated_bytes
                    if a.profile:
                        row |= profile_steps(model, cache, nxt, 3)
                except torch.cuda.OutOfMemoryError as e:
                    row |= {"error": f"out of memory: {str(e)[:160]}"}
                print(json.dumps({"card": card(), "model": label, "kv": p, "steps": a.steps, "mode": "capacity" if a.capacity else "prefill"} | row), flush=True)
                cache = None
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--layer-only", action="store_true", help="only the transformers layer checks and the refusals")
    e = sub.add_parser("eval")
    e.add_argument("--gguf", required=True)
    e.add_argument("--text", required=True)
    e.add_argument("--chars", type=int, default=200_000)
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--chunks", type=int, default=8)
    e.add_argument("--kv", default="tq-mse-4,tq-mse-4-nc,k4v3,tq-mse-3")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--exact", action="store_true", help="also run the exact (SIMT) attention kernel")
    e.add_argument("--cpu", action="store_true", help="also run the CPU cache on a CPU copy of the model")
    e.add_argument("--cpu-kv", default="tq-mse-4", help="precisions of the CPU runs")
    d = sub.add_parser("decode")
    d.add_argument("--gguf")
    d.add_argument("--config", choices=["llama3-8b", "qwen2.5-1.5b", "smollm2"])
    d.add_argument("--contexts", default="512,4096")
    d.add_argument("--batches", default="1,8")
    d.add_argument("--kv", default="tq-mse-4,k4v3")
    d.add_argument("--steps", type=int, default=32)
    d.add_argument("--warmup", type=int, default=4)
    d.add_argument("--profile", action="store_true", help="also profile 3 steps: GPU time per step and its attention share")
    d.add_argument("--capacity", action="store_true", help="per cache, the largest batch that fits at each context (filled with random tokens, no prefill)")
    d.add_argument("--reserve-gib", type=float, default=10.0, help="memory left free for a step's activations in --capacity")
    a = ap.parse_args()
    if a.cmd == "check":
        sys.exit(1 if check(a) else 0)
    if a.cmd == "eval":
        evaluate(a)
    else:
        if not (a.gguf or a.config):
            sys.exit("decode needs --gguf or --config")
        decode(a)


if __name__ == "__main__":
    main()

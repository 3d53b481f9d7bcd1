#!/usr/bin/env python3
"""Perplexity, KLD and decode speed of Hugging Face transformers with
turboquant's KV cache (``turboquant.hf.TurboQuantCache``), beside
transformers' own DynamicCache in the same process.

The protocol is the one of ``tq kv eval`` / ``tq kv sweep`` (llama.cpp's):
the first ``--chars`` characters of the text, chunks of ``--ctx`` tokens,
each chunk run from an empty cache, the second half of each chunk scored;
KLD against the f32 DynamicCache run of the same model. The model is read
from the GGUF file the Rust runtime uses (transformers dequantizes it to
f32), so the numbers sit beside ``tq kv sweep --json`` for the same text and
precisions.

    scripts/hf_eval.py --gguf ~/.cache/turboquant/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text ~/.cache/turboquant/austen.txt --chunks 2 --kv f32,tq-mse-4,k4v3

Needs torch, transformers (>= 5), gguf, accelerate and the turboquant wheel.
Prints one JSON line per precision (and per decode run with --decode N).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import transformers
import turboquant.hf  # noqa: F401  (registers attn_implementation="turboquant")
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from turboquant.hf import TurboQuantCache


def load(gguf: str, threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    folder, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation="turboquant", dtype=torch.float32)
    return tok, model.eval()


def chunks(tok, path: str, chars: int, ctx: int, n: int) -> tuple[int, list[torch.Tensor]]:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        text = f.read()[:chars]
    ids = tok(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    have = len(ids) // ctx
    if have < n:
        sys.exit(f"{len(ids)} tokens hold {have} chunks of {ctx}, not {n}")
    return len(ids), [ids[i * ctx : (i + 1) * ctx] for i in range(n)]


@torch.no_grad()
def logits(model, chunk: torch.Tensor, cache) -> torch.Tensor:
    return model(chunk[None], past_key_values=cache, use_cache=True).logits[0].float()


@torch.no_grad()
def evaluate(model, parts: list[torch.Tensor], precisions: list[str], seed: int, center_keys: bool) -> list[dict]:
    ctx = len(parts[0])
    first = ctx // 2
    ref = [torch.log_softmax(logits(model, c, DynamicCache(config=model.config))[first:-1], -1) for c in parts]
    rows = []
    for p in precisions:
        nll, kld, agree, n = 0.0, 0.0, 0, 0
        t0 = time.perf_counter()
        nbytes = 0
        for c, lp in zip(parts, ref):
            cache = TurboQuantCache(model.config, precision=p, seed=seed, center_keys=center_keys)
            lq = torch.log_softmax(logits(model, c, cache)[first:-1], -1)
            nbytes = cache.nbytes
            target = c[first + 1 :]
            nll -= lq.gather(1, target[:, None]).sum().item()
            kld += (lp.exp() * (lp - lq)).sum().item()
            agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
            n += len(target)
        ppl_ref = sum(-lp.gather(1, c[first + 1 :, None]).sum().item() for c, lp in zip(parts, ref)) / n
        rows.append(
            {
                "kv": p,
                "ppl": float(torch.tensor(nll / n).exp()),
                "ppl_f32": float(torch.tensor(ppl_ref).exp()),
                "kld": kld / n,
                "top1_agree": agree / n,
                "scored_tokens": n,
                "kv_bytes_per_token": nbytes / ctx,
                "bits_per_value": cache.bits_per_value,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


@torch.no_grad()
def decode(model, prompt: torch.Tensor, new: int, precision: str | None, seed: int) -> dict:
    cache = DynamicCache(config=model.config) if precision is None else TurboQuantCache(model.config, precision=precision, seed=seed)
    out = model(prompt[None], past_key_values=cache, use_cache=True)
    nxt = out.logits[0, -1].argmax()[None, None]
    t0 = time.perf_counter()
    toks = []
    for _ in range(new):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[0, -1].argmax()[None, None]
        toks.append(int(nxt))
    dt = time.perf_counter() - t0
    return {"kv": precision or "DynamicCache f32", "context": len(prompt), "new_tokens": new, "ms_per_token": 1e3 * dt / new, "generated": toks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="GGUF model file (the one `tq kv --model` reads)")
    ap.add_argument("--text", required=True, help="text file (e.g. the data cache's austen.txt)")
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--kv", default="f32,q8_0-rot,q4_0-rot,tq-mse-4,k4v3,tq-mse-3", help="comma-separated precisions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--center-keys", action="store_true")
    ap.add_argument("--decode", type=int, default=0, help="also time N greedy decode steps after a prompt of --ctx tokens")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    tok, model = load(a.gguf, a.threads)
    n_tokens, parts = chunks(tok, a.text, a.chars, a.ctx, a.chunks)
    meta = {"model": os.path.basename(a.gguf), "tokens": n_tokens, "ctx": a.ctx, "chunks": a.chunks, "seed": a.seed, "center_keys": a.center_keys}
    meta |= {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    for row in evaluate(model, parts, a.kv.split(","), a.seed, a.center_keys):
        print(json.dumps(meta | row), flush=True)
    if a.decode:
        for p in [None] + a.kv.split(","):
            print(json.dumps(meta | decode(model, parts[0], a.decode, p, a.seed)), flush=True)


if __name__ == "__main__":
    main()

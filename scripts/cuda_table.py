#!/usr/bin/env python3
"""Markdown table of `tq bench cuda` JSON lines (as in docs/cuda.md).

Usage: scripts/cuda_table.py RESULTS.jsonl [...] [--all-kernels]
One row per line; forced SIMT runs of TurboQuant caches are left out unless
--all-kernels is given. A `graph_ms` column appears when the lines have it.
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--all-kernels", action="store_true", help="also the forced SIMT runs of TurboQuant caches")
    a = ap.parse_args()
    rows = [json.loads(line) for f in a.files for line in open(f) if line.strip()]
    rows = [r for r in rows if a.all_kernels or not (r["kernel"] == "simt-f32" and r["codec"].startswith(("tq", "k")))]
    graph = any(r.get("graph_ms") is not None for r in rows)
    geos = len({r["geometry"] for r in rows}) > 1
    head = (["geometry"] if geos else []) + ["B", "T", "query tokens", "KV", "kernel", "ms"]
    head += (["graph ms"] if graph else []) + ["cache GB/s", "% of copy", "SDPA bf16 ms", "speedup"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        sd = r.get("sdpa_bf16_ms")
        cells = ([r["geometry"]] if geos else []) + [str(r["batch"]), f"{r['context'] // 1024}K", str(r.get("q_tokens", 1)),
                                                     r["codec"], r["kernel"], f"{r['kernel_ms']:.3f}"]
        if graph:
            cells.append(f"{r['graph_ms']:.3f}" if r.get("graph_ms") is not None else "-")
        cells += [f"{r['gbps']:.0f}", f"{100 * r['bandwidth_fraction']:.0f}%", f"{sd:.3f}" if sd else "-",
                  f"{r['speedup']:.2f}×" if r.get("speedup") else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

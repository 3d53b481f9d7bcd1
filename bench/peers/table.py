"""Markdown table of peers.py JSON lines (stdin): per data set and thread count,
µs per query, queries per second relative to turbovec at the same bit width,
recall 10@10, bits per dimension and build seconds."""

import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.startswith("{")]
groups = {}
for r in rows:
    groups.setdefault((r["data"], r["n"], r["dim"]), {}).setdefault(r["threads"], []).append(r)
for (data, n, dim), by_t in groups.items():
    print(f"\n### {data} ({n:,} × {dim}, unit norm, inner product)\n")
    print("| index | bits/dim | build s | threads | µs/query | qps vs turbovec 4-bit | qps vs turbovec 2-bit | recall 10@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for t, rs in sorted(by_t.items()):
        ref = {r["index"].split(" (")[0]: r["us_per_query"] for r in rs}
        for r in rs:
            q4 = ref.get("turbovec 4-bit")
            q2 = ref.get("turbovec 2-bit")
            f = lambda q: f"{q / r['us_per_query']:.2f}×" if q else "–"
            print(f"| {r['index']} | {r['bits_per_dim']:.2f} | {r['build_s']:.2f} | {t} | {r['us_per_query']:,.0f} | {f(q4)} | {f(q2)} | {r['recall_10_at_10']:.3f} |")

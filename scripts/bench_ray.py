#!/usr/bin/env python3
"""Benchmark of turboquant.ray against one turboquant.Index in one process.

Data: GloVe-50 (`tq data fetch glove50`; TQ_BIN names the `tq` binary, default
target/release/tq), unit-normalized; rows 0..queries-1 are the queries, the
next `--rows` rows the base (ids 0..rows-1). For each worker count W a local
Ray instance holds a ShardedIndex of W shards, one actor process per shard
with one engine thread each (RAYON_NUM_THREADS=1), on 127.0.0.1.

Measured, per configuration (wall clock, best of `--repeat` where repeated):
  build_s           one process: Index.add of every row; sharded: the rows
                    through Ray Data (dataset_from_numpy -> add_dataset,
                    map_batches with one loader per shard), and through
                    ShardedIndex.add from the driver in batches
  qps               queries/s of one search call with all queries (k = 10),
                    the default two-stage fast-scan search and exact=True
  latency_ms        median and p90 of single-query search calls
  same_ids          fraction of exact=True results equal to one Index's
  rss / file bytes  per shard (actor's resident memory, .tqi size); one
                    process: the memory a loaded index adds (Index.load in a
                    fresh process), and its load time
  merge_us          the driver's merge of S shards' top-k for S up to 1024
                    (synthetic scores: this times the merge, nothing else)

Needs the wheel and Ray in one environment (scripts/test.sh builds
target/pyenv):  target/pyenv/bin/python scripts/bench_ray.py [--json FILE]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_glove(rows, queries):
    import numpy as np

    tq_bin = os.environ.get("TQ_BIN", os.path.join(os.path.dirname(__file__), "..", "target", "release", "tq"))
    r = subprocess.run([tq_bin, "data", "fetch", "glove50"], check=True, capture_output=True, text=True)
    path = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("glove50: ")][-1].split(": ", 1)[1]
    x = np.load(path, mmap_mode="r")
    if queries + rows > len(x):
        raise SystemExit(f"--rows + --queries must be at most {len(x)}")
    q = np.array(x[:queries], dtype=np.float32, order="C")
    b = np.array(x[queries : queries + rows], dtype=np.float32, order="C")
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return b, np.arange(rows, dtype=np.uint64), q


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def best(f, repeat):
    ts = []
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def search_stats(search, q, k, repeat, exact_queries, latency_calls):
    t_fast, _ = best(lambda: search(q, k, False), repeat)
    qe = q[:exact_queries]
    t_exact, (_, ie) = best(lambda: search(qe, k, True), repeat)
    lat = []
    for i in range(latency_calls):
        t = time.perf_counter()
        search(q[i % len(q)][None], k, False)
        lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()
    return {
        "qps": len(q) / t_fast,
        "qps_exact": len(qe) / t_exact,
        "latency_ms_p50": statistics.median(lat),
        "latency_ms_p90": lat[int(0.9 * (len(lat) - 1))],
    }, ie


def single(args):
    """One Index in this process (RAYON_NUM_THREADS set by the caller)."""
    import numpy as np

    import turboquant as tq

    x, ids, q = load_glove(args.rows, args.queries)
    t, idx = best(lambda: _built(tq, args.codec, x, ids), 1)
    stats, ie = search_stats(lambda qq, k, exact: idx.search(qq, k, exact=exact), q, args.k, args.repeat, args.exact_queries, args.latency_calls)
    with tempfile.TemporaryDirectory() as d:
        idx.save(os.path.join(d, "one.tqi"))
        size = os.path.getsize(os.path.join(d, "one.tqi"))
        # what a restarted shard does, in a fresh process so that no memory freed
        # by the build above is reused: load time and the resident memory it adds
        r = subprocess.run([sys.executable, __file__, "--load-only", os.path.join(d, "one.tqi")], check=True, capture_output=True, text=True)
        t_load, index_bytes, n = json.loads(r.stdout.strip().splitlines()[-1])
        assert n == len(ids)
    out = {"mode": "single", "threads": os.environ.get("RAYON_NUM_THREADS", "all"), "build_s": t, "file_bytes": size,
           "load_s": t_load, "loaded_index_bytes_per_vector": index_bytes / len(ids), **stats}  # fmt: skip
    np.save(args.exact_out, ie)
    print(json.dumps(out))


def load_only(path):
    import turboquant as tq

    before = rss_bytes()
    t = time.perf_counter()
    idx = tq.Index.load(path)
    t = time.perf_counter() - t
    print(json.dumps([t, rss_bytes() - before, len(idx)]))


def _built(tq, codec, x, ids):
    idx = tq.Index(codec, x.shape[1])
    idx.add(x, ids)
    return idx


def sharded(args, x, ids, q, workers, exact_single):
    from turboquant.ray import ShardedIndex, dataset_from_numpy

    res = {"mode": "sharded", "workers": workers, "threads_per_shard": 1}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        si = ShardedIndex(os.path.join(d, "rd"), args.codec, x.shape[1], workers, threads=1)
        res["start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        n = si.add_dataset(dataset_from_numpy(x, ids, blocks=64), batch_size=args.batch, concurrency=workers)
        res["build_s"] = time.perf_counter() - t
        assert n == len(ids) == len(si)
        si.close()
        si2 = ShardedIndex(os.path.join(d, "drv"), args.codec, x.shape[1], workers, threads=1)
        t = time.perf_counter()
        for s in range(0, len(ids), args.batch):
            si2.add(x[s : s + args.batch], ids[s : s + args.batch])
        res["build_driver_add_s"] = time.perf_counter() - t
        stats, ie = search_stats(lambda qq, k, exact: si2.search(qq, k, exact=exact), q, args.k, args.repeat, args.exact_queries, args.latency_calls)
        res.update(stats)
        res["same_ids_exact"] = float((ie == exact_single).mean())
        info = si2.info()
        res["rss_bytes_per_shard"] = [i["rss_bytes"] for i in info]
        res["rows_per_shard"] = [i["len"] for i in info]
        res["file_bytes_per_shard"] = [os.path.getsize(p) for p in si2.shard_paths]
        si2.close()
    return res


def merge_cost(k, nq, repeat):
    import numpy as np
    from turboquant.ray import _top

    rng = np.random.default_rng(0)
    out = {}
    for s in (1, 4, 16, 64, 256, 1024):
        d = np.sort(rng.random((nq, s, k), dtype=np.float32), axis=2)[:, :, ::-1].reshape(nq, s * k)
        i = rng.integers(0, 1 << 40, (nq, s * k))
        t, _ = best(lambda: _top(d, i, k, False), repeat)
        out[str(s)] = t / nq * 1e6  # µs per query
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=399_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--exact-queries", type=int, default=100)
    ap.add_argument("--latency-calls", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--codec", default="tq-mse-4-nc")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--single-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--exact-out", help=argparse.SUPPRESS)
    ap.add_argument("--load-only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_only:
        return load_only(args.load_only)
    if args.single_only:
        return single(args)

    import numpy as np

    cores = os.cpu_count()
    results = {"cpu": cpu_name(), "cores": cores, "loadavg_at_start": os.getloadavg(), "rows": args.rows, "queries": args.queries, "k": args.k, "codec": args.codec, "runs": []}
    exact_single = None
    with tempfile.TemporaryDirectory() as d:
        for threads in ("1", str(cores)):
            eo = os.path.join(d, f"exact-{threads}.npy")
            opts = ["--rows", args.rows, "--queries", args.queries, "--exact-queries", args.exact_queries, "--latency-calls", args.latency_calls,
                    "--k", args.k, "--codec", args.codec, "--repeat", args.repeat]  # fmt: skip
            cmd = [sys.executable, __file__, "--single-only", "--exact-out", eo] + [str(o) for o in opts]
            r = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": threads})
            run = json.loads(r.stdout.strip().splitlines()[-1])
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            exact_single = np.load(eo)

    import ray

    ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    x, ids, q = load_glove(args.rows, args.queries)
    for w in [int(v) for v in args.workers.split(",")]:
        run = sharded(args, x, ids, q, w, exact_single)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    results["merge_us_per_query"] = merge_cost(args.k, args.queries, args.repeat)
    print(json.dumps({"merge_us_per_query": results["merge_us_per_query"]}), flush=True)
    ray.shutdown()
    results["loadavg_at_end"] = os.getloadavg()
    print(json.dumps({"loadavg": [results["loadavg_at_start"], results["loadavg_at_end"]]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

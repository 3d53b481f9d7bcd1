"""Search benchmark of the turboquant wheel beside turbovec, rabitqlib and FAISS.

One process per thread count (the thread count of rayon-based libraries is fixed
when their pool starts: the caller sets RAYON_NUM_THREADS and OMP_NUM_THREADS
before this process starts, see run.sh). Protocol: rows scaled to unit norm,
inner product, `--queries` held-out query rows (a seeded permutation), exact
top-10 by brute force in float32, one batch search call of all queries per
timing, best of `--reps` timings, the libraries interleaved within every
repetition (a busy machine slows them alike). Prints one JSON object per index.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np


def load(path, nq, seed):
    x = np.load(path).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    perm = np.random.default_rng(seed).permutation(len(x))
    return np.ascontiguousarray(x[perm[nq:]]), np.ascontiguousarray(x[perm[:nq]])


def exact_top(base, queries, k):
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 100):
        sc = queries[s : s + 100] @ base.T
        part = np.argpartition(-sc, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sc, part, axis=1), axis=1, kind="stable")
        out[s : s + 100] = np.take_along_axis(part, order, axis=1)
    return out


def pad(x, multiple):
    """Zero columns up to a multiple of `multiple` (for libraries that take
    only such dimensions): every inner product is kept; bits/dim are still
    reported per original dimension."""
    extra = -x.shape[1] % multiple
    return np.ascontiguousarray(np.pad(x, ((0, 0), (0, extra)))) if extra else x


def recall(ids, truth):
    return float(np.mean([len(set(a[:10].tolist()) & set(b[:10].tolist())) / 10 for a, b in zip(ids, truth)]))


class Ours:
    def __init__(self, codec, ivf=None, nprobe=None):
        self.codec, self.ivf, self.nprobe = codec, ivf, nprobe
        self.name = f"turboquant {codec}" + (f" IVF{ivf} nprobe {nprobe}" if ivf else "")

    def build(self, base, threads):
        import turboquant

        self.index = turboquant.Index(self.codec, base.shape[1], metric="ip", ivf_lists=self.ivf)
        self.index.add(base)
        self.bits = turboquant.Codec(self.codec, base.shape[1]).code_size * 8 / base.shape[1]

    def search(self, q, k, threads):
        return self.index.search(q, k, nprobe=self.nprobe)[1]


class Turbovec:
    def __init__(self, bits):
        self.bw, self.name = bits, f"turbovec {bits}-bit"

    def build(self, base, threads):
        import turbovec

        if base.shape[1] % 8:
            self.name += f" (zero-padded to {pad(base[:1], 8).shape[1]})"
        self.index = turbovec.TurboQuantIndex(dim=pad(base, 8).shape[1], bit_width=self.bw)
        self.index.add(pad(base, 8))
        self.index.prepare()
        self.bits = len(self.index.to_bytes()) * 8 / base.size

    def search(self, q, k, threads):
        return self.index.search(pad(q, 8), k)[1]


class Rabitq:
    """rabitqlib IvfIndex; one cluster (the mean) is its flat index."""

    def __init__(self, bits, nlist=1, nprobe=1):
        self.nbits, self.nlist, self.nprobe = bits, nlist, nprobe
        self.name = f"rabitqlib {bits}-bit " + ("flat" if nlist == 1 else f"IVF{nlist} nprobe {nprobe}")

    def build(self, base, threads):
        import rabitqlib

        if self.nlist == 1:
            cent, assign = base.mean(0, keepdims=True), np.zeros(len(base), dtype=np.uint32)
        else:
            import faiss

            km = faiss.Kmeans(base.shape[1], self.nlist, niter=10, seed=1)
            km.train(base)
            cent, assign = km.centroids, km.index.search(base, 1)[1][:, 0].astype(np.uint32)
        # its rotation takes multiples of 64 only
        if base.shape[1] % 64:
            self.name += f" (zero-padded to {pad(base[:1], 64).shape[1]})"
        self.index = rabitqlib.IvfIndex(pad(base, 64).shape[1], len(base), self.nlist, self.nbits, metric="ip")
        self.index.build(pad(base, 64), pad(cent, 64), assign, num_threads=threads)
        with tempfile.TemporaryDirectory() as d:
            self.index.save(os.path.join(d, "i"))
            self.bits = os.path.getsize(os.path.join(d, "i")) * 8 / base.size

    def search(self, q, k, threads):
        return self.index.search(pad(q, 64), k, self.nprobe, num_threads=threads)[0].astype(np.int64)


class Faiss:
    def __init__(self, key):
        self.key, self.name = key, f"FAISS {key}"

    def build(self, base, threads):
        import faiss

        self.index = faiss.index_factory(base.shape[1], self.key, faiss.METRIC_INNER_PRODUCT)
        self.index.train(base)
        self.index.add(base)
        self.bits = faiss.serialize_index(self.index).size * 8 / base.size

    def search(self, q, k, threads):
        return self.index.search(q, k)[1]


def indexes(dim, only):
    out = [Turbovec(4), Turbovec(2), Rabitq(4), Ours("tq-mse-4-nc"), Ours("tq-mse-2-nc")]
    if dim % 2 == 0:
        out.append(Faiss(f"PQ{dim // 2}x4fs"))
    if only:
        out = [i for i in out if any(o in i.name for o in only)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--ivf", action="store_true", help="also IVF: ours vs rabitqlib over the same list count")
    a = ap.parse_args()
    threads = int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count()))
    import faiss

    faiss.omp_set_num_threads(threads)
    base, queries = load(a.data, a.queries, 0)
    truth = exact_top(base, queries, 10)
    idx = indexes(base.shape[1], a.only)
    if a.ivf:
        nl = int(4 * np.sqrt(len(base)))
        idx += [Ours("tq-mse-4-nc", nl, p) for p in (8, 16, 32)] + [Rabitq(4, nl, p) for p in (8, 16, 32)]
    for i in idx:
        t = time.perf_counter()
        i.build(base, threads)
        i.build_s = time.perf_counter() - t
        i.best = float("inf")
    for _ in range(a.reps):
        for i in idx:
            t = time.perf_counter()
            ids = i.search(queries, 10, threads)
            i.best = min(i.best, time.perf_counter() - t)
            i.recall = recall(ids, truth)
    for i in idx:
        print(json.dumps({"data": os.path.basename(a.data), "n": len(base), "dim": base.shape[1], "threads": threads, "index": i.name,
                          "bits_per_dim": round(i.bits, 3), "build_s": round(i.build_s, 3), "us_per_query": round(i.best * 1e6 / len(queries), 1),
                          "recall_10_at_10": round(i.recall, 4)}), flush=True)


if __name__ == "__main__":
    main()

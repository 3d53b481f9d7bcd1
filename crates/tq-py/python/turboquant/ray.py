"""A sharded TurboQuant index on Ray: shards are Ray actors, each owning one
``turboquant.Index`` persisted to its own ``.tqi`` file.

Needs Ray (``pip install 'turboquant[ray]'``); ``import turboquant`` alone never
imports it. Start or join a cluster with ``ray.init(...)`` before creating a
``ShardedIndex``.

Directory layout::

    manifest.json        format, version, routing, num_shards, codec, dim,
                         metric, seed, raw, shard file names (written atomically)
    shard-00000.tqi ...  one .tqi file per shard (the `tq index` format), appended
                         by its actor; shard-NNNNN.tqi.lock is its write lock

**Routing.** Row ``id`` lives on shard ``shard_of(id, num_shards)`` =
``splitmix64(id) mod num_shards``, where ``splitmix64`` is the SplitMix64
finalizer (add 0x9E3779B97F4A7C15, then ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``, all mod 2**64). The rule
is recorded in the manifest (``"routing": "splitmix64-mod"``) and never changes
for that name; ``load`` checks that every id of a shard file routes to it.

**Durability.** ``add``/``remove`` return only after every touched shard has
appended its record to its file (fsync of the record, then of the commit slot).
A shard actor that dies is restarted by Ray (``max_restarts``) and reloads its
file, so it holds exactly what was committed. A call to a shard that died is
retried on the restarted actor until ``retry_timeout_s`` has passed, then
fails with :class:`ShardUnavailableError` naming the shard. Retried writes are
idempotent: rows (ids) the dead actor had already committed are not added
twice. Writes are atomic per shard, not across shards: if an ``add`` raises
``ShardUnavailableError``, the other shards may hold their rows of it; call
``add(..., skip_present=True)`` with the same rows to finish it. One
``ShardedIndex`` (one driver) writes a directory at a time.

**Search.** Every shard searches the same queries in parallel; the driver
merges the per-shard top-k exactly. Equal scores are ordered by the lower
id; one ``Index`` orders them by its slot (insertion order), which is the same
order when its ids were added in increasing order and none was removed. Each
shard returns its exact top-k under that order (it asks for more when a tie
straddles its k-th place). With exact scoring (codecs without fast-scan, or
``exact=True``) the merged result is therefore the same ids and scores as one
``Index`` over the same rows, codec and seed. With fast-scan codecs' default
two-stage search each shard re-scores its own ``rerank * k`` best
candidates, a superset of the candidates one ``Index`` would re-score, so the
merged k-th score is never below one ``Index``'s.

Codecs that learn from data (``Codec(...).wants_training``: PQ, RaBitQ's centre,
fractional rates) are refused: every shard would learn different parameters.
Flat shards only (no IVF lists).
"""

from __future__ import annotations

import json
import os
import time
from os import PathLike
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np

try:
    import ray
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "turboquant.ray needs Ray, which is not installed: pip install 'turboquant[ray]' (or pip install 'ray[data]')"
    ) from e

from ._turboquant import Codec, Index

__all__ = ["ShardedIndex", "ShardUnavailableError", "PartialSearch", "shard_of", "dataset_from_numpy", "MANIFEST", "ROUTING"]

MANIFEST = "manifest.json"
"""The manifest's file name inside a sharded index directory."""
FORMAT = "turboquant-sharded-index"
VERSION = 1
ROUTING = "splitmix64-mod"
"""The routing rule this version writes and reads (see the module docs)."""
MAX_SHARDS = 65536
"""The largest shard count a manifest may name."""
START_TIMEOUT_S = 120.0
"""How long creating or loading waits for every shard actor to start and load its file."""

def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _ids(ids: Any, what: str = "ids") -> np.ndarray:
    """ids as a 1-D uint64 array (non-negative integers), checked."""
    a = np.asarray(ids)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional; got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if a.dtype.kind == "u":
        return a.astype(np.uint64)
    if a.dtype.kind == "i":
        if (a < 0).any():
            raise ValueError(f"{what} must be non-negative, got {int(a[a < 0][0])}")
        return a.astype(np.uint64)
    if a.dtype == object:
        try:
            v = [int(i) for i in a]
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a sequence or numpy array of non-negative integers") from None
        if any(i < 0 or i > 0xFFFFFFFFFFFFFFFF for i in v):
            raise ValueError(f"{what} must be integers in [0, 2**64)")
        return np.array(v, dtype=np.uint64)
    raise TypeError(f"{what} must be a sequence or numpy array of non-negative integers; got dtype {a.dtype}")


def shard_of(ids: Any, num_shards: int) -> np.ndarray:
    """The shard (int64 array) of each id: ``splitmix64(id) mod num_shards``."""
    if not isinstance(num_shards, (int, np.integer)) or not 1 <= int(num_shards) <= MAX_SHARDS:
        raise ValueError(f"num_shards must be an integer in 1..{MAX_SHARDS}, got {num_shards!r}")
    return (_splitmix64(_ids(ids)) % np.uint64(int(num_shards))).astype(np.int64)


def _rows(x: Any, dim: int, what: str) -> np.ndarray:
    """A float32 (n, dim) C-contiguous copy-or-view of `x`, finite, checked as `Index` checks."""
    expect = f"{what} must be a float32 (or float64) numpy array of shape (n, {dim})"
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError(expect)
    if x.ndim == 1 and x.shape[0] == dim:
        x = x.reshape(1, dim)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{expect}; got shape {list(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        r = int(np.nonzero(bad.any(axis=1))[0][0])
        raise ValueError(f"{what} holds non-finite values (row {r})")
    return x


def _write_atomic(path: str, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename, fsync of the directory."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardUnavailableError(RuntimeError):
    """A shard did not answer within the retry time (or cannot start).

    ``shard`` is its number, ``path`` its file, ``op`` the call, ``waited_s`` how
    long it was retried, ``cause`` the last error Ray gave.
    """

    def __init__(self, shard: int, num_shards: int, path: str, op: str, waited_s: float, cause: str, others: Sequence[int] = ()):
        self.shard, self.num_shards, self.path, self.op, self.waited_s, self.cause = shard, num_shards, path, op, waited_s, cause
        self.others = list(others)
        also = f" (also unavailable: shards {', '.join(map(str, self.others))})" if self.others else ""
        first = cause.strip().splitlines()[0] if cause.strip() else "no answer"
        super().__init__(f"shard {shard} of {num_shards} ({path}) did not answer {op} within {waited_s:.1f} s{also}: {first}")


class PartialSearch(NamedTuple):
    """A search with ``allow_partial=True``: the merged result over the shards that answered."""

    D: np.ndarray
    """Scores float32[q, k]."""
    I: np.ndarray  # noqa: E741 (FAISS's name)
    """Ids int64[q, k], padded with -1."""
    answered: list
    """Shards whose results are merged in."""
    missing: list
    """Shards that did not answer within the retry time (their rows are absent from D, I)."""


def _manifest_shard_name(i: int) -> str:
    return f"shard-{i:05d}.tqi"


def _spec_of(m: dict) -> dict:
    return {"codec": m["codec"], "dim": m["dim"], "metric": m["metric"], "seed": m["seed"], "raw": m["raw"]}


def _check_manifest(m: Any, where: str) -> dict:
    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: {msg}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"not a sharded turboquant index manifest (format must be {FORMAT!r})")
    if m.get("version") != VERSION:
        raise bad(f"manifest version {m.get('version')!r} is not supported (this version reads {VERSION})")
    if m.get("routing") != ROUTING:
        raise bad(f"unknown routing {m.get('routing')!r} (this version knows {ROUTING!r})")
    n = m.get("num_shards")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SHARDS:
        raise bad(f"num_shards must be an integer in 1..{MAX_SHARDS}, got {n!r}")
    for key, typ in (("codec", str), ("dim", int), ("metric", str), ("seed", int), ("raw", str)):
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise bad(f"field {key!r} missing or not a {typ.__name__}")
    shards = m.get("shards")
    if not isinstance(shards, list) or len(shards) != n:
        raise bad(f"'shards' must list {n} file names")
    for s in shards:
        if not isinstance(s, str) or not s.endswith(".tqi") or os.path.basename(s) != s or s in (".", ".."):
            raise bad(f"shard file {s!r} must be a plain .tqi file name inside the directory")
    if len(set(shards)) != n:
        raise bad("shard file names repeat")
    return m


def _check_codec(codec: str, dim: int, seed: int) -> None:
    if Codec(codec, dim, seed=seed).wants_training:
        raise ValueError(
            f"codec {codec!r} learns parameters from data; a sharded index needs a codec without training "
            "(each shard would learn different parameters and their scores would not compare)"
        )


def _rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Shard:
    """One shard: a `turboquant.Index` and its file. Runs as a Ray actor; Ray
    calls `__init__` again after a restart, which reloads the file."""

    def __init__(self, shard: int, num_shards: int, path: str, spec: dict):
        self.shard, self.num_shards, self.path, self.spec = shard, num_shards, path, spec
        if os.path.exists(path):
            idx = Index.load(path)
            for key in ("codec", "dim", "metric"):
                if getattr(idx, key) != spec[key]:
                    raise ValueError(f"shard {shard} ({path}): {key} is {getattr(idx, key)!r}, the manifest says {spec[key]!r}")
            ids = idx.ids()
            wrong = shard_of(ids, num_shards) != shard
            if wrong.any():
                raise ValueError(f"shard {shard} ({path}): id {int(ids[wrong][0])} belongs to shard {int(shard_of(ids[wrong][:1], num_shards)[0])} (routing {ROUTING})")
            self.index, self.has_file = idx, True
        else:
            self.index, self.has_file = Index(**spec), False

    def info(self) -> dict:
        return {"shard": self.shard, "path": self.path, "len": len(self.index), "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "rss_bytes": _rss_bytes()}

    def pid(self) -> int:
        return os.getpid()

    def size(self) -> int:
        return len(self.index)

    def ids(self) -> np.ndarray:
        return self.index.ids()

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.index.contains(ids)

    def add(self, x: np.ndarray, ids: np.ndarray, skip_present: bool) -> int:
        """Adds and commits to the file; returns the rows added."""
        if skip_present and len(ids):
            keep = ~self.index.contains(ids)
            x, ids = x[keep], ids[keep]
        if len(ids) == 0:
            return 0
        if self.has_file:
            self.index.add(x, ids, durable=True)
        else:
            self.index.add(x, ids)
            try:
                self.index.save(self.path)
            except BaseException:
                self.index = Index(**self.spec)
                raise
            self.has_file = True
        return len(ids)

    def remove(self, ids: np.ndarray, skip_absent: bool) -> int:
        if skip_absent and len(ids):
            ids = ids[self.index.contains(ids)]
        if len(ids) == 0:
            return 0
        self.index.remove(ids, durable=True)
        return len(ids)

    def search(self, q: np.ndarray, k: int, allow: Optional[np.ndarray], exact: bool, rerank: int, raw_rerank: bool):
        """The exact top-k per query under (score, then lower id) order."""
        n = len(self.index)
        nq = q.shape[0]
        if n == 0 or k == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        l2 = self.index.metric == "l2"
        kk = min(k + 1, n)
        kw = {"filter": allow, "exact": exact, "rerank": rerank, "raw_rerank": raw_rerank}
        D, I = self.index.search(q, kk, **kw)
        rows = np.arange(nq)
        while kk < n and kk > k:
            # a tie straddles the k-th place when the next result scores the same
            tied = rows[(I[rows, kk - 1] >= 0) & (D[rows, kk - 1] == D[rows, k - 1])]
            if tied.size == 0:
                break
            kk = min(2 * kk, n)
            D2, I2 = self.index.search(q[tied], kk, **kw)
            D = np.concatenate([D, np.full((nq, kk - D.shape[1]), np.inf if l2 else -np.inf, np.float32)], axis=1)
            I = np.concatenate([I, np.full((nq, kk - I.shape[1]), -1, np.int64)], axis=1)
            D[tied], I[tied] = D2, I2
            rows = tied
        return _top(D, I, k, l2)

    def save_copy(self, dst: str) -> int:
        """Copies the committed file to `dst` atomically; returns the rows it holds."""
        if not self.has_file:
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        _write_atomic(dst, data)
        return len(self.index)


def _top(D: np.ndarray, I: np.ndarray, k: int, l2: bool):
    """The first k per row by score (best first), equal scores by the lower id, padding last.

    Wide rows (many shards) are cut to their 2k best by a partition first;
    rows where ties at the k-th place reach past those 2k are sorted whole."""
    nq, w = D.shape
    if k and w > 4 * k:
        key = D if l2 else -D
        part = np.argpartition(key, 2 * k - 1, axis=1)[:, : 2 * k]
        kth = np.sort(np.take_along_axis(key, part, axis=1), axis=1)[:, k - 1]
        whole = (key <= kth[:, None]).sum(axis=1) > 2 * k
        Dc, Ic = np.take_along_axis(D, part, axis=1), np.take_along_axis(I, part, axis=1)
        if whole.any():
            Dw, Iw = _sorted_top(D[whole], I[whole], k, l2)
            Dc, Ic = _sorted_top(Dc, Ic, k, l2)
            Dc[whole], Ic[whole] = Dw, Iw
            return Dc, Ic
        return _sorted_top(Dc, Ic, k, l2)
    return _sorted_top(D, I, k, l2)


def _sorted_top(D: np.ndarray, I: np.ndarray, k: int, l2: bool):
    nq = D.shape[0]
    if D.shape[1]:
        score_key = D if l2 else -D
        id_key = np.where(I < 0, np.iinfo(np.int64).max, I)
        order = np.lexsort((id_key, score_key), axis=1)[:, :k]
        D, I = np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.concatenate([D, np.full((nq, pad), np.inf if l2 else -np.inf, np.float32)], axis=1)
        I = np.concatenate([I, np.full((nq, pad), -1, np.int64)], axis=1)
    return np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64)


class _Shards:
    """The shard actors and every call to them, with bounded retry. Picklable,
    so Ray Data loaders carry one."""

    def __init__(self, handles: list, paths: list, spec: dict, retry_timeout_s: float):
        self.handles, self.paths, self.spec, self.retry_timeout_s = handles, paths, spec, float(retry_timeout_s)
        self.retries = 0

    @property
    def num_shards(self) -> int:
        return len(self.handles)

    def call(self, op: str, make: dict, timeout_s: Optional[float] = None, allow_partial: bool = False):
        """Runs `make[s](handle, retry)` on each shard s; retries shards whose actor
        died until the deadline. Returns ({shard: result}, {shard: cause})."""
        limit = self.retry_timeout_s if timeout_s is None else float(timeout_s)
        start = time.monotonic()
        deadline = start + limit
        pending: dict = {}
        retry_at: dict = {}
        attempts = {s: 0 for s in make}
        last: dict = {}
        results: dict = {}
        failed: dict = {}
        app_error: Optional[tuple] = None

        def submit(s: int) -> None:
            pending[make[s](self.handles[s], attempts[s] > 0)] = s
            attempts[s] += 1

        for s in make:
            submit(s)
        while pending or retry_at:
            now = time.monotonic()
            if now >= deadline and not pending:
                break
            for s in [s for s, t in retry_at.items() if t <= now]:
                del retry_at[s]
                submit(s)
            wake = min([deadline, *retry_at.values()])
            if not pending:
                time.sleep(max(0.0, wake - now))
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wake - now))
            if not ready:
                if time.monotonic() >= deadline:
                    break
                continue
            s = pending.pop(ready[0])
            try:
                results[s] = ray.get(ready[0])
            except RayActorError as e:
                last[s] = str(e)
                if e.actor_init_failed:
                    failed[s] = f"shard failed to start: {e}"
                    continue
                backoff = min(0.05 * 2 ** min(attempts[s] - 1, 4), 0.5)
                if time.monotonic() + backoff >= deadline:
                    failed[s] = str(e)
                else:
                    retry_at[s] = time.monotonic() + backoff
                    self.retries += 1
            except ObjectLostError as e:
                last[s] = str(e)
                retry_at[s] = time.monotonic() + 0.05
                self.retries += 1
            except RayTaskError as e:
                if app_error is None:
                    app_error = (s, e)
        for s in list(pending.values()) + list(retry_at):
            failed.setdefault(s, last.get(s, f"no answer within {limit:.1f} s"))
        if app_error is not None:
            s, e = app_error
            cause = getattr(e, "cause", None)
            if isinstance(cause, (ValueError, TypeError)):
                raise type(cause)(f"shard {s} ({self.paths[s]}): {cause}") from None
            raise e
        if failed and not allow_partial:
            first = min(failed)
            raise ShardUnavailableError(first, self.num_shards, self.paths[first], op, time.monotonic() - start, failed[first], sorted(set(failed) - {first}))
        return results, failed

    def route(self, ids: np.ndarray) -> dict:
        """{shard: positions of its ids}, in input order within a shard."""
        sh = shard_of(ids, self.num_shards)
        order = np.argsort(sh, kind="stable")
        bounds = np.searchsorted(sh[order], np.arange(self.num_shards + 1))
        return {s: order[bounds[s] : bounds[s + 1]] for s in range(self.num_shards) if bounds[s + 1] > bounds[s]}

    def add(self, x: Any, ids: Any, skip_present: bool = False, timeout_s: Optional[float] = None) -> int:
        x = _rows(x, self.spec["dim"], "x")
        ids = _ids(ids)
        if len(ids) != x.shape[0]:
            raise ValueError(f"{len(ids)} ids for {x.shape[0]} vectors")
        if len(ids) == 0:
            return 0
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"id {int(uniq[counts > 1][0])} appears twice in this add")
        parts = self.route(ids)
        if not skip_present:
            # all or nothing across shards: refuse ids already held before writing any
            held, _ = self.call("add", {s: (lambda h, retry, p=p: h.contains.remote(ids[p])) for s, p in parts.items()}, timeout_s)
            for s, p in parts.items():
                if held[s].any():
                    raise ValueError(f"id {int(ids[p][held[s]][0])} is already in the index (shard {s})")
        # a retry after the actor died skips rows the dead actor already committed
        done, _ = self.call("add", {s: (lambda h, retry, p=p: h.add.remote(x[p], ids[p], skip_present or retry)) for s, p in parts.items()}, timeout_s)
        return int(sum(done.values()))


class ShardedIndex:
    """A TurboQuant index split over Ray actors by a stable hash of the id
    (see the module docs for routing, durability, ties and retries).

    ``ShardedIndex(directory, codec, dim, num_shards, ...)`` creates a new index
    in ``directory`` (which must not hold one); ``ShardedIndex.load(directory)``
    opens an existing one. ``metric``, ``seed``, ``raw`` are those of
    ``turboquant.Index``. Actor options: ``num_cpus`` per shard (Ray's default
    when None), ``threads`` (the engine's threads per shard, RAYON_NUM_THREADS),
    ``max_restarts`` (Ray restarts a dead shard actor this often; -1: always),
    ``node_ids`` (pin shard i to node ``node_ids[i % len(node_ids)]``, for
    node-local directories: a restarted shard must find its file),
    ``retry_timeout_s`` (how long a call to a dead shard is retried).
    """

    def __init__(
        self,
        directory: Union[str, PathLike],
        codec: str,
        dim: int,
        num_shards: int,
        metric: str = "ip",
        seed: int = 0,
        raw: str = "none",
        *,
        num_cpus: Optional[float] = None,
        threads: Optional[int] = None,
        max_restarts: int = -1,
        node_ids: Optional[Sequence[str]] = None,
        retry_timeout_s: float = 30.0,
    ):
        directory = os.fspath(directory)
        _need_ray()
        shard_of(np.zeros(0, np.uint64), num_shards)  # checks num_shards
        Index(codec, dim, metric=metric, seed=seed, raw=raw)  # checks the spec
        _check_codec(codec, dim, seed)
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, MANIFEST)):
            raise ValueError(f"{directory} already holds a sharded index ({MANIFEST}): use ShardedIndex.load")
        names = [_manifest_shard_name(i) for i in range(num_shards)]
        stray = [n for n in names if os.path.exists(os.path.join(directory, n))]
        if stray:
            raise ValueError(f"{directory} holds shard files but no {MANIFEST} ({stray[0]}): refusing to adopt them")
        m = {"format": FORMAT, "version": VERSION, "routing": ROUTING, "num_shards": int(num_shards), "codec": codec, "dim": int(dim),
             "metric": metric, "seed": int(seed), "raw": raw, "shards": names}  # fmt: skip
        _write_atomic(os.path.join(directory, MANIFEST), (json.dumps(m, indent=1) + "\n").encode())
        self._start(directory, m, num_cpus, threads, max_restarts, node_ids, retry_timeout_s)

    @classmethod
    def load(
        cls,
        directory: Union[str, PathLike],
        *,
        num_cpus: Optional[float] = None,
        threads: Optional[int] = None,
        max_restarts: int = -1,
        node_ids: Optional[Sequence[str]] = None,
        retry_timeout_s: float = 30.0,
    ) -> "ShardedIndex":
        """Opens the sharded index in `directory` (a live one, or one written by `save`)."""
        directory = os.fspath(directory)
        mpath = os.path.join(directory, MANIFEST)
        try:
            with open(mpath, "rb") as f:
                raw = f.read(1 << 24)
        except FileNotFoundError:
            raise ValueError(f"{directory} holds no sharded index (no {MANIFEST})") from None
        try:
            m = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{mpath}: not valid JSON ({e})") from None
        m = _check_manifest(m, mpath)
        Index(m["codec"], m["dim"], metric=m["metric"], seed=m["seed"], raw=m["raw"])
        _check_codec(m["codec"], m["dim"], m["seed"])
        self = cls.__new__(cls)
        self._start(directory, m, num_cpus, threads, max_restarts, node_ids, retry_timeout_s)
        return self

    def _start(self, directory, m, num_cpus, threads, max_restarts, node_ids, retry_timeout_s) -> None:
        _need_ray()
        self.directory, self._manifest = directory, m
        spec = _spec_of(m)
        paths = [os.path.abspath(os.path.join(directory, name)) for name in m["shards"]]
        actor = ray.remote(_Shard)
        handles = []
        for i, p in enumerate(paths):
            opts: dict = {"max_restarts": max_restarts, "max_task_retries": 0}
            if num_cpus is not None:
                opts["num_cpus"] = num_cpus
            if threads is not None:
                opts["runtime_env"] = {"env_vars": {"RAYON_NUM_THREADS": str(int(threads))}}
            if node_ids:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_ids[i % len(node_ids)], soft=False)
            handles.append(actor.options(**opts).remote(i, len(paths), p, spec))
        self._shards = _Shards(handles, paths, spec, retry_timeout_s)
        try:
            # every shard started and loaded its file (starting processes may take longer than a retry)
            self.info(timeout_s=max(self._shards.retry_timeout_s, START_TIMEOUT_S))
        except ShardUnavailableError as e:
            self.close()
            if "failed to start" in e.cause:
                raise ValueError(f"shard {e.shard} ({e.path}) failed to load: {_last_error_line(e.cause)}") from None
            raise

    # -- properties ---------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self._shards.num_shards

    @property
    def codec(self) -> str:
        return self._manifest["codec"]

    @property
    def dim(self) -> int:
        return self._manifest["dim"]

    @property
    def metric(self) -> str:
        return self._manifest["metric"]

    @property
    def shard_paths(self) -> list:
        """The shard files, shard 0 first."""
        return list(self._shards.paths)

    @property
    def retries(self) -> int:
        """How many shard calls this driver retried after a shard actor died."""
        return self._shards.retries

    def info(self, timeout_s: Optional[float] = None) -> list:
        """Per shard: number, file, rows, actor pid, node id and resident memory."""
        res, _ = self._shards.call("info", {s: (lambda h, retry: h.info.remote()) for s in range(self.num_shards)}, timeout_s)
        return [res[s] for s in range(self.num_shards)]

    def __len__(self) -> int:
        res, _ = self._shards.call("len", {s: (lambda h, retry: h.size.remote()) for s in range(self.num_shards)})
        return int(sum(res.values()))

    def ids(self) -> np.ndarray:
        """Every id held (uint64), shard 0's first."""
        res, _ = self._shards.call("ids", {s: (lambda h, retry: h.ids.remote()) for s in range(self.num_shards)})
        return np.concatenate([res[s] for s in range(self.num_shards)]) if res else np.zeros(0, np.uint64)

    # -- writes ---------------------------------------------------------------

    def add(self, x: np.ndarray, ids: Any, *, skip_present: bool = False, timeout_s: Optional[float] = None) -> None:
        """Adds float32[n, dim] rows with their ids (required: the id picks the
        shard). Returns after every touched shard committed its rows to its
        file. An id already in the index (or repeated) raises ValueError
        before anything is written, unless `skip_present`: then rows whose id
        is held are skipped (finishing an add that raised ShardUnavailableError)."""
        self._shards.add(x, ids, skip_present=skip_present, timeout_s=timeout_s)

    def remove(self, ids: Any, *, timeout_s: Optional[float] = None) -> None:
        """Removes ids; an id not in the index raises ValueError before anything
        is removed. Returns after every touched shard committed the removal."""
        ids = _ids(ids)
        if len(ids) == 0:
            return
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"id {int(uniq[counts > 1][0])} appears twice in this remove")
        parts = self._shards.route(ids)
        held, _ = self._shards.call("remove", {s: (lambda h, retry, p=p: h.contains.remote(ids[p])) for s, p in parts.items()}, timeout_s)
        for s, p in parts.items():
            if not held[s].all():
                raise ValueError(f"id {int(ids[p][~held[s]][0])} is not in the index (shard {s})")
        self._shards.call("remove", {s: (lambda h, retry, p=p: h.remove.remote(ids[p], retry)) for s, p in parts.items()}, timeout_s)

    def add_dataset(
        self,
        ds: "ray.data.Dataset",
        *,
        id_column: str = "id",
        vector_column: str = "vector",
        batch_size: int = 4096,
        concurrency: Optional[int] = None,
        num_cpus: float = 0.25,
        skip_present: bool = False,
    ) -> int:
        """Adds every row of a Ray Dataset (e.g. ``ray.data.read_parquet`` or
        ``ray.data.from_numpy``) through ``map_batches``: a pool of
        `concurrency` loader actors (default: the number of shards) routes
        each batch and waits until its shards committed it, so at most
        `concurrency` batches are in flight and Ray Data's streaming executor
        holds reading back until they commit. Returns the rows added.
        `vector_column` holds float32/float64 vectors of length `dim` (a
        fixed-size list or list column, or Ray's tensor column);
        `id_column` non-negative integers. For numpy arrays in the driver,
        `dataset_from_numpy(x, ids)` makes such a dataset."""
        conc = concurrency or self.num_shards
        out = ds.map_batches(
            _Loader,
            fn_constructor_args=(self._shards, id_column, vector_column, skip_present),
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=conc,
            num_cpus=num_cpus,
        )
        total = 0
        for b in out.iter_batches(batch_size=None, batch_format="numpy"):
            total += int(np.sum(b["added"]))
        return total

    # -- search ---------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filter: Any = None,
        *,
        exact: bool = False,
        rerank: int = 10,
        raw_rerank: bool = False,
        allow_partial: bool = False,
        timeout_s: Optional[float] = None,
    ):
        """The k best rows per query over all shards: ``(D, I)`` as
        ``Index.search`` (scores float32[q, k], ids int64[q, k] padded with -1).
        `filter`: ids allowed in the results. A shard that does not answer
        within the retry time raises ShardUnavailableError, unless
        `allow_partial`: then a PartialSearch (D, I, answered, missing)."""
        q = _rows(queries, self.dim, "queries")
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        k = int(k)
        l2 = self.metric == "l2"
        shards = list(range(self.num_shards))
        allow: dict = {}
        if filter is not None:
            f = np.unique(_ids(filter, "filter"))
            parts = self._shards.route(f)
            shards = sorted(parts)
            allow = {s: f[p] for s, p in parts.items()}
        qref = ray.put(q)
        make = {
            s: (lambda h, retry, s=s: h.search.remote(qref, k, allow.get(s), exact, rerank, raw_rerank))
            for s in shards
        }  # fmt: skip
        res, failed = self._shards.call("search", make, timeout_s, allow_partial=allow_partial)
        parts_d = [res[s][0] for s in sorted(res)]
        parts_i = [res[s][1] for s in sorted(res)]
        D = np.concatenate(parts_d, axis=1) if parts_d else np.zeros((q.shape[0], 0), np.float32)
        I = np.concatenate(parts_i, axis=1) if parts_i else np.zeros((q.shape[0], 0), np.int64)
        D, I = _top(D, I, k, l2)
        if allow_partial:
            # shards the filter excluded answered trivially
            missing = sorted(failed)
            return PartialSearch(D, I, [s for s in range(self.num_shards) if s not in failed], missing)
        return D, I

    # -- files ------------------------------------------------------------------

    def save(self, directory: Union[str, PathLike]) -> None:
        """Writes a snapshot (a manifest plus a copy of every shard file) to a
        new or empty `directory`; ``ShardedIndex.load`` opens it. The live
        directory needs no save: every write is already committed there. Each
        shard file is copied atomically; the manifest is written last, so an
        interrupted save leaves no loadable half. Do not add concurrently."""
        directory = os.fspath(directory)
        if os.path.abspath(directory) == os.path.abspath(self.directory):
            raise ValueError(f"{directory} is this index's own directory: it is saved already (every write is committed there)")
        os.makedirs(directory, exist_ok=True)
        if os.listdir(directory):
            raise ValueError(f"{directory} is not empty: save writes a new directory")
        names = self._manifest["shards"]
        self._shards.call("save", {s: (lambda h, retry, s=s: h.save_copy.remote(os.path.abspath(os.path.join(directory, names[s])))) for s in range(self.num_shards)})
        _write_atomic(os.path.join(directory, MANIFEST), (json.dumps(self._manifest, indent=1) + "\n").encode())

    def close(self) -> None:
        """Stops the shard actors (the files stay)."""
        for h in self._shards.handles:
            ray.kill(h, no_restart=True)
        self._shards.handles = []

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedIndex({self.directory!r}, codec={self.codec!r}, dim={self.dim}, metric={self.metric!r}, num_shards={self.num_shards})"


def _need_ray() -> None:
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialized: call ray.init(...) (or connect to a cluster) first")


def _last_error_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("ValueError", "TypeError", "OSError", "RuntimeError")):
            return ln
    return lines[-1] if lines else msg


def _vectors_of(col: Any, dim: int, name: str) -> np.ndarray:
    """float32 (n, dim) from an Arrow column: fixed-size list, list, or Ray's tensor type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        raise ValueError(f"column {name!r} holds nulls")
    t = col.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if pa.types.is_fixed_size_list(t):
            width_ok = t.list_size == dim
        else:
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            width_ok = bool(np.all(lengths == dim))
        if not width_ok:
            raise ValueError(f"column {name!r} must hold vectors of length {dim}")
        v = col.flatten().to_numpy(zero_copy_only=False)
        return v.reshape(len(col), dim)
    v = col.to_numpy(zero_copy_only=False)  # Ray's tensor extension types give (n, dim)
    if v.dtype == object:
        v = np.stack([np.asarray(r) for r in v]) if len(v) else np.zeros((0, dim), np.float32)
    return v


class _Loader:
    """A Ray Data map_batches worker: routes a batch to its shards and waits for their commits."""

    def __init__(self, shards: _Shards, id_column: str, vector_column: str, skip_present: bool):
        self.shards, self.id_column, self.vector_column, self.skip_present = shards, id_column, vector_column, skip_present

    def __call__(self, batch: Any) -> dict:
        for c in (self.id_column, self.vector_column):
            if c not in batch.column_names:
                raise ValueError(f"the dataset has no column {c!r} (columns: {', '.join(batch.column_names)})")
        dim = self.shards.spec["dim"]
        v = _vectors_of(batch.column(self.vector_column), dim, self.vector_column)
        ids = batch.column(self.id_column).to_numpy()
        added = self.shards.add(v, ids, skip_present=self.skip_present)
        return {"added": np.array([added], dtype=np.int64)}


def dataset_from_numpy(x: np.ndarray, ids: Any, *, blocks: int = 16, id_column: str = "id", vector_column: str = "vector") -> "ray.data.Dataset":
    """A Ray Dataset of `blocks` blocks with an id column and a fixed-size-list vector column, for `ShardedIndex.add_dataset`."""
    import pyarrow as pa

    x = np.asarray(x)
    ids = _ids(ids)
    if x.ndim != 2 or len(ids) != x.shape[0]:
        raise ValueError(f"x must be (n, dim) with one id per row; got x {list(x.shape)} and {len(ids)} ids")
    tables = []
    for part in np.array_split(np.arange(len(ids)), max(1, min(blocks, len(ids)))):
        xs = np.ascontiguousarray(x[part])
        vec = pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1)), x.shape[1])
        tables.append(pa.table({id_column: pa.array(ids[part], pa.uint64()), vector_column: vec}))
    return ray.data.from_arrow(tables)

"""Tests of the Python bindings against the Rust engine and the `tq` CLI.

TQ_BIN names the `tq` binary built from the same tree (scripts/test.sh sets it).
"""

import json
import os
import subprocess
import threading

import numpy as np
import pytest

import turboquant as tq

TQ = os.environ.get("TQ_BIN", "tq")


def rng_data(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def npy(path, x):
    np.save(path, np.ascontiguousarray(x, dtype=np.float32))


def test_registry_lists_every_codec():
    cs = tq.codecs(128)
    names = {c["name"] for c in cs}
    assert {"tq-mse-4", "tq-prod-3", "rabitq-4", "pq-4", "q4_0-rot", "nvfp4"} <= names
    mse4 = next(c for c in cs if c["name"] == "tq-mse-4")
    assert mse4["code_size"] == 68 and mse4["bits_per_value"] == 4.25


@pytest.mark.parametrize("name", ["tq-mse-4", "tq-mse-2-nc", "tq-prod-3", "rabitq-4", "q8_0-rot", "mxfp4"])
def test_round_trip_shapes_dtypes_and_scores_on_codes(name):
    c = tq.Codec(name, 64, seed=3)
    x = rng_data(200, 64)
    codes = c.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (200, c.code_size)
    y = c.decode(codes)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.isfinite(y))
    ip = c.inner_product(x[:4], codes)
    assert ip.shape == (4, 200) and ip.dtype == np.float32
    # the estimator is the inner product with the decoded vector for these codecs
    np.testing.assert_allclose(ip, x[:4] @ y.T, rtol=1e-3, atol=1e-3 * np.abs(x[:4] @ y.T).max())
    # float64 input gives the same codes as float32
    np.testing.assert_array_equal(c.encode(x.astype(np.float64)), codes)
    # a single vector is one row
    np.testing.assert_array_equal(c.encode(x[0]), codes[:1])


def test_pq_needs_training():
    c = tq.Codec("pq-4", 16)
    assert c.wants_training
    with pytest.raises(ValueError, match="trained"):
        c.encode(rng_data(10, 16))
    c.train(rng_data(500, 16))
    assert c.encode(rng_data(10, 16)).shape == (10, 8)


def test_bad_input_raises_clear_errors():
    c = tq.Codec("tq-mse-4", 32)
    with pytest.raises(TypeError, match="float32"):
        c.encode(np.zeros((4, 32), dtype=np.int32))
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        c.encode(np.zeros((4, 31), dtype=np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        c.encode(np.zeros((32, 8), dtype=np.float32).T)
    x = rng_data(4, 32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        c.encode(x)
    with pytest.raises(ValueError, match="unknown codec"):
        tq.Codec("nope", 32)
    with pytest.raises(ValueError, match="unsupported bit width"):
        tq.Codec("tq-mse-9", 32)
    with pytest.raises(TypeError, match="uint8"):
        c.decode(np.zeros((2, 20), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        c.decode(np.zeros((2, 19), dtype=np.uint8))
    with pytest.raises(ValueError, match="metric"):
        tq.Index("tq-mse-4", 32, metric="hamming")


def test_bytes_equal_the_cli(tmp_path):
    x = rng_data(300, 48, seed=5)
    npy(tmp_path / "x.npy", x)
    for name in ["tq-mse-4", "tq-mse-3-nc", "rabitq-2", "q4_0-rot"]:
        out = tmp_path / f"{name}.tqc"
        subprocess.run([TQ, "encode", "--codec", name, "--seed", "9", "--input", str(tmp_path / "x.npy"), "--out", str(out)], check=True, capture_output=True)
        c = tq.Codec(name, 48, seed=9)
        if c.wants_training:  # the CLI trains on the first 4096 rows
            c.train(x)
        codes = c.encode(x)
        blob = out.read_bytes()
        assert blob[-4 - codes.size : -4] == codes.tobytes(), name  # payload precedes its CRC


def test_index_search_filter_remove_and_faiss_convention():
    x = rng_data(1000, 32, seed=1)
    for kwargs in [dict(), dict(ivf_lists=8), dict(raw="f16")]:
        idx = tq.Index("tq-mse-4-nc", 32, metric="cosine", **kwargs)
        idx.add(x)
        assert len(idx) == 1000
        D, I = idx.search(x[:5], 3, nprobe=8)
        assert D.shape == (5, 3) and D.dtype == np.float32 and I.dtype == np.int64
        assert list(I[:, 0]) == [0, 1, 2, 3, 4]
        D, I = idx.search(x[:5], 3, filter=[7, 8])
        assert set(I[I >= 0].tolist()) <= {7, 8} and np.all(I[:, 2] == -1) and np.all(np.isneginf(D[:, 2]))
        idx.remove([0, 1])
        D, I = idx.search(x[:2], 5)
        assert 0 not in I and 1 not in I
        with pytest.raises(ValueError, match="not in the index"):
            idx.remove([0])
        with pytest.raises(ValueError, match="already in the index"):
            idx.add(x[:1], ids=[5])
        assert len(idx) == 998
    empty = tq.Index("tq-mse-4", 32)
    D, I = empty.search(x[:2], 4)
    assert np.all(I == -1)


def test_index_files_move_between_python_and_the_cli(tmp_path):
    x = rng_data(400, 24, seed=2)
    q = x[:3]
    npy(tmp_path / "x.npy", x)
    npy(tmp_path / "q.npy", q)
    # Python -> CLI
    idx = tq.Index("tq-mse-4", 24, metric="cosine")
    idx.add(x)
    idx.save(tmp_path / "py.tqi")
    D, I = idx.search(q, 5)
    r = subprocess.run([TQ, "index", "search", "--index", str(tmp_path / "py.tqi"), "--queries", str(tmp_path / "q.npy"), "-k", "5", "--json"], check=True, capture_output=True, text=True)
    cli = json.loads(r.stdout)["results"]
    assert [row["ids"] for row in cli] == I.tolist()
    # CLI -> Python
    subprocess.run([TQ, "index", "build", "--codec", "tq-mse-4", "--metric", "cosine", "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "cli.tqi")], check=True, capture_output=True)
    loaded = tq.Index.load(tmp_path / "cli.tqi")
    assert len(loaded) == 400 and loaded.codec == "tq-mse-4" and loaded.metric == "cosine"
    D2, I2 = loaded.search(q, 5)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_allclose(D2, D, rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "e.tqi").write_bytes(b"")
        tq.Index.load(tmp_path / "e.tqi")


def test_calls_release_the_gil():
    # a Python thread keeps counting while a long encode runs in another thread
    c = tq.Codec("tq-mse-4", 256)
    x = rng_data(100_000, 256)
    ticks = [0]
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    t = threading.Thread(target=count)
    t.start()
    before = ticks[0]
    c.encode(x)
    during = ticks[0] - before
    done.set()
    t.join()
    assert during > 1000, f"the counter thread did not run during encode ({during} ticks)"


def test_kv_precisions_and_vram_planner():
    assert "k4v3" in tq.kv_precisions() or "kBvC" in tq.kv_precisions()
    f16 = tq.kv_bytes("f16", 3, 64)
    assert f16["bytes_per_token_per_layer"] * 30 == 23040  # SmolLM2: 22.5 KiB per token
    assert tq.kv_bytes("tq-mse-4", 8, 128)["bits_per_value"] == 4.125  # 64 B of indices + a bf16 norm per 128 values
    p = tq.vram("llama-3.1-8b", 100_000, "tq-mse-3.5")
    assert p["kv_gb"] < tq.vram("llama-3.1-8b", 100_000, "f16")["kv_gb"] / 3.5
    assert p["cards_24gb"] >= 1
    with pytest.raises(ValueError, match="unknown KV precision"):
        tq.kv_bytes("int3", 8, 128)
    with pytest.raises(ValueError, match="unknown model"):
        tq.vram("gpt-5", 1000, "f16")
    # the same numbers as the CLI
    r = subprocess.run([TQ, "vram", "--model", "llama-3.1-8b", "--context", "100000", "--kv", "tq-mse-3.5", "--json"], check=True, capture_output=True, text=True)
    cli = json.loads(r.stdout)
    assert abs(cli["kv_gb"] - p["kv_gb"]) < 1e-9 and cli["cards_24gb"] == p["cards_24gb"]


def test_verify_reports_a_corrupt_commit_slot_and_load_refuses(tmp_path):
    p = tmp_path / "v.tqi"
    idx = tq.Index("tq-mse-4-nc", 32, metric="ip")
    idx.add(rng_data(100, 32, seed=5))
    idx.save(p)
    r = tq.Index.verify(p)
    assert r["loads"] and r["count"] == 100
    b = bytearray(p.read_bytes())
    b[16] ^= 1  # commit slot A starts at byte 16
    p.write_bytes(bytes(b))
    r = tq.Index.verify(p)
    assert not r["loads"]
    with pytest.raises(ValueError, match="slot"):
        tq.Index.load(p)


def test_a_stale_save_is_refused_and_loses_nothing(tmp_path):
    p = tmp_path / "s.tqi"
    idx = tq.Index("tq-mse-4", 16)
    idx.add(rng_data(10, 16, seed=1))
    idx.save(p)
    a, b = tq.Index.load(p), tq.Index.load(p)
    a.add(rng_data(5, 16, seed=2), ids=np.arange(100, 105))
    a.save(p)
    b.add(rng_data(3, 16, seed=3), ids=np.arange(200, 203))
    with pytest.raises(ValueError, match="changed"):
        b.save(p)
    assert len(tq.Index.load(p)) == 15


def test_durable_add_and_remove_append_to_the_file(tmp_path):
    p = tmp_path / "d.tqi"
    x = rng_data(300, 16, seed=4)
    idx = tq.Index("tq-mse-4-nc", 16)
    with pytest.raises(ValueError, match="needs the index's file"):
        idx.add(x[:10], ids=np.arange(10), durable=True)
    assert len(idx) == 0
    idx.add(x[:100], ids=np.arange(100))
    idx.save(p)
    size = p.stat().st_size
    idx.add(x[100:150], ids=np.arange(100, 150), durable=True)
    v = tq.Index.verify(p)
    assert v["commit_seq"] == 2 and v["count"] == 150 and p.stat().st_size > size  # appended, not rewritten
    idx.remove(np.arange(10), durable=True)
    back = tq.Index.load(p)
    assert len(back) == 140 and not back.contains([0, 9]).any() and back.contains([10, 149]).all()
    np.testing.assert_array_equal(np.sort(back.ids()), np.arange(10, 150, dtype=np.uint64))
    D, I = idx.search(x[:20], 5)
    D2, I2 = back.search(x[:20], 5)
    np.testing.assert_array_equal(I, I2)
    np.testing.assert_array_equal(D, D2)
    # another writer commits: a durable add is refused and leaves memory as it was
    other = tq.Index.load(p)
    other.add(x[150:160], ids=np.arange(150, 160), durable=True)
    before_ids = idx.ids()
    with pytest.raises(ValueError, match="changed"):
        idx.add(x[160:170], ids=np.arange(160, 170), durable=True)
    np.testing.assert_array_equal(idx.ids(), before_ids)  # same rows, same slots
    np.testing.assert_array_equal(idx.search(x[:20], 5)[1], I)
    with pytest.raises(ValueError, match="changed"):
        idx.remove([10, 11], durable=True)
    assert len(idx) == 150 and idx.contains([10, 11, 150]).tolist() == [True, True, True]  # reloaded from the file
    assert len(tq.Index.load(p)) == 150
    with pytest.raises(TypeError, match="non-negative"):
        idx.contains([-1])


# --- KvCache: the Rust CPU KV caches, attention on the codes -----------------


@pytest.fixture(scope="module")
def kv_dump(tmp_path_factory):
    """Real keys, values and per-position queries of SmolLM2 (layers 0 and 5,
    64 tokens of Austen) from `tq kv dump`, as (k, v, q) of shapes
    (layers, tokens, kv_heads, d) and (layers, tokens, q_heads, d)."""
    out = tmp_path_factory.mktemp("dump")
    subprocess.run([TQ, "kv", "dump", "--tokens", "64", "--layers", "0,5", "--all-queries", "--out", str(out)], check=True, capture_output=True)
    meta = json.loads((out / "meta.json").read_text())
    L, H, Q, T, d = meta["layers"], meta["kv_heads"], meta["q_heads"], meta["tokens"], meta["head_dim"]
    k = np.load(out / "k.npy").reshape(L, H, T, d).transpose(0, 2, 1, 3)
    v = np.load(out / "v.npy").reshape(L, H, T, d).transpose(0, 2, 1, 3)
    q = np.load(out / "q.npy").reshape(L, T, Q, d)
    return np.ascontiguousarray(k), np.ascontiguousarray(v), np.ascontiguousarray(q)


def causal_attention(k, v, q):
    """Exact causal attention in float64: k, v (T, H, d), q (T, Q, d) -> (T, Q, d)."""
    T, H, d = k.shape
    g = q.shape[1] // H
    out = np.zeros(q.shape)
    for t in range(T):
        for h in range(q.shape[1]):
            s = k[: t + 1, h // g].astype(np.float64) @ q[t, h].astype(np.float64) / np.sqrt(d)
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ v[: t + 1, h // g]
    return out


def bf16_norms(codes, d, bits):
    """TurboQuant codes with their f32 norm rounded to bf16 (what a KV cache stores)."""
    c = codes.copy()
    at = d * bits // 8
    n = c[:, at : at + 4].copy().view(np.uint32)[:, 0]
    n = ((n + 0x7FFF + ((n >> 16) & 1)) >> 16) << 16
    c[:, at : at + 4] = n.astype(np.uint32)[:, None].view(np.uint8)
    return c


def test_kv_cache_f32_is_exact_attention_on_real_keys(kv_dump):
    k, v, q = kv_dump
    L, T, H, d = k.shape
    c = tq.KvCache("f32", L, q.shape[2], H, d)
    for layer in range(L):
        out = c.update(layer, k[layer][None], v[layer][None], q[layer][None])
        assert out.shape == (1, T, q.shape[2], d) and out.dtype == np.float32
        np.testing.assert_allclose(out[0], causal_attention(k[layer], v[layer], q[layer]), rtol=1e-4, atol=1e-5)
    assert c.seq_len(0) == T and c.nbytes == 2 * L * T * H * d * 4


@pytest.mark.parametrize("precision, kb, vb", [("tq-mse-4", 4, 4), ("k4v3", 4, 3)])
def test_kv_cache_attends_the_codes_of_the_codecs(kv_dump, precision, kb, vb):
    # the attention on codes equals exact attention over the keys and values
    # the codecs decode (their norms as stored: bf16), for a cache of seed 7
    k, v, q = kv_dump
    L, T, H, d = k.shape
    c = tq.KvCache(precision, L, q.shape[2], H, d, seed=7)
    kc, vc = tq.Codec(f"tq-mse-{kb}", d, seed=7), tq.Codec(f"tq-mse-{vb}", d, seed=tq.kv_value_seed(7))
    for layer in range(L):
        out = c.update(layer, k[layer][None], v[layer][None], q[layer][None])[0]
        dk = kc.decode(bf16_norms(kc.encode(k[layer].reshape(-1, d)), d, kb)).reshape(k[layer].shape)
        dv = vc.decode(bf16_norms(vc.encode(v[layer].reshape(-1, d)), d, vb)).reshape(v[layer].shape)
        np.testing.assert_allclose(out, causal_attention(dk, dv, q[layer]), rtol=2e-3, atol=2e-4)
        # and differs from exact attention over the real keys by the coding error only
        exact = causal_attention(k[layer], v[layer], q[layer])
        rel = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        assert 1e-3 < rel < 0.25, rel
    per_token = tq.kv_bytes(precision, H, d)["bytes_per_token_per_layer"]
    assert c.nbytes == round(per_token * T * L)
    assert c.bits_per_value == tq.kv_bytes(precision, H, d)["bits_per_value"]


def test_kv_cache_one_token_at_a_time_equals_one_batch_and_sequences_are_independent(kv_dump):
    k, v, q = kv_dump
    _, T, H, d = k.shape
    Q = q.shape[2]
    whole = tq.KvCache("tq-mse-3", 1, Q, H, d, seed=2).update(0, k[1][None], v[1][None], q[1][None])
    step = tq.KvCache("tq-mse-3", 1, Q, H, d, seed=2)
    rows = [step.update(0, k[1][None, t : t + 1], v[1][None, t : t + 1], q[1][None, t : t + 1]) for t in range(T)]
    np.testing.assert_array_equal(np.concatenate(rows, axis=1), whole)
    # two sequences in one batch: each as if alone (the second one is layer 0's)
    both = tq.KvCache("tq-mse-3", 1, Q, H, d, seed=2, batch=2)
    out = both.update(0, np.stack([k[1], k[0]]), np.stack([v[1], v[0]]), np.stack([q[1], q[0]]))
    np.testing.assert_array_equal(out[0], whole[0])
    alone = tq.KvCache("tq-mse-3", 1, Q, H, d, seed=2).update(0, k[0][None], v[0][None], q[0][None])
    np.testing.assert_array_equal(out[1], alone[0])
    # another seed codes differently
    other = tq.KvCache("tq-mse-3", 1, Q, H, d, seed=3).update(0, k[1][None], v[1][None], q[1][None])
    assert not np.array_equal(other, whole)
    both.reset(batch=1)
    assert both.batch == 1 and both.seq_len(0) == 0


def test_kv_cache_refuses_bad_input():
    k = rng_data(4 * 2 * 64, 1).reshape(1, 4, 2, 64)
    q = rng_data(4 * 6 * 64, 1).reshape(1, 4, 6, 64)
    c = tq.KvCache("tq-mse-4", 2, 6, 2, 64)
    with pytest.raises(ValueError, match="bit width 9"):
        tq.KvCache("tq-mse-9", 2, 6, 2, 64)
    with pytest.raises(ValueError, match="multiple"):
        tq.KvCache("tq-mse-4", 2, 5, 2, 64)
    with pytest.raises(ValueError, match="batch"):
        tq.KvCache("tq-mse-4", 2, 6, 2, 64, batch=0)
    with pytest.raises(ValueError, match="batch"):
        tq.KvCache("tq-mse-4", 2, 6, 2, 64, batch=10**9)
    with pytest.raises(ValueError, match="plan"):
        tq.KvCache("3.5", 2, 6, 2, 64)
    with pytest.raises(ValueError, match="GiB"):
        tq.KvCache("tq-mse-4", 32, 32, 8, 128, batch=4096, recent=100_000)
    with pytest.raises(ValueError, match="layer 2"):
        c.update(2, k, k, q)
    with pytest.raises(ValueError, match=r"keys must be .*kv_heads=2"):
        c.update(0, k.reshape(1, 2, 4, 64), k, q)
    with pytest.raises(ValueError, match="values"):
        c.update(0, k, k[:, :3], q)
    with pytest.raises(ValueError, match="queries"):
        c.update(0, k, k, q[:, :, :4])
    with pytest.raises(TypeError, match="float32"):
        c.update(0, k.astype(np.int32), k, q)
    with pytest.raises(ValueError, match="C-contiguous"):
        c.update(0, np.asfortranarray(k), k, q)
    bad = k.copy()
    bad[0, 1, 0, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        c.update(0, bad, k, q)
    with pytest.raises(ValueError, match="no token"):
        c.update(0, k[:, :0], k[:, :0], q[:, :0])
    # nothing was appended by the refused calls
    assert c.seq_len(0) == 0
    c.update(0, k, k, q)
    assert c.seq_len(0) == 4 and c.seq_len(1) == 0


def test_cuda_kv_refuses_clearly_without_a_gpu_or_for_what_it_cannot_code():
    # precision and geometry are refused before any driver call
    with pytest.raises(ValueError, match="TurboQuant sides only, not q4_0"):
        tq.CudaKv("q4_0", 9, 3, 64)
    with pytest.raises(ValueError, match="head_dim 96: the GPU kernels take 64 or 128"):
        tq.CudaKv("tq-mse-4", 9, 3, 96)
    with pytest.raises(ValueError, match="tq-mse-2/3/4"):
        tq.CudaKv("tq-mse-5", 9, 3, 64)
    with pytest.raises(ValueError, match="takes tq-mse-B"):
        tq.CudaKv("f16", 9, 3, 64)
    try:
        kv = tq.CudaKv("k4v3", 9, 3, 64)
    except ValueError as e:  # no NVIDIA driver (or no NVRTC, or no device) here
        assert "CUDA" in str(e) and "not found" in str(e) or "device" in str(e), str(e)
    else:  # a machine with a GPU
        assert kv.kernel == "mma-f16" and kv.key_code_bytes == 32 and kv.value_code_bytes == 24
        assert kv.bits_per_value == (32 + 4 + 24 + 4) * 8 / 128

"""Offline check of calibrated key transforms on SmolLM2's real keys and queries.

Simulates a 4-bit rotation codec (random orthogonal rotation, per-vector norm,
Lloyd-Max codebook of N(0, 1)) on the keys of every layer and KV head and
measures the mean KL divergence of each query's attention distribution
(causal, positions 64..) against exact attention, for:
  center -- keys minus the mean of the evaluated stream's tokens 1..32;
  cross  -- keys through T(k - mu), queries through T^-1 q, with mu, T from the
            *other* text (T^2 = Sk^-1 # Sq, covariances shrunk toward a scaled
            identity), as `tq kv calibrate` computes them.

Usage (dumps of every layer with every position's queries):
  tq kv dump --text austen --tokens 1024 --layers 0,1,...,29 --all-queries --out A
  tq kv dump --text shakespeare --tokens 1024 --layers 0,1,...,29 --all-queries --out S
  python3 scripts/kv_key_sim.py A S [bits] [shrink]
"""
import json
import math
import sys

import numpy as np


def lloyd_max(bits):
    """Lloyd-Max levels of N(0, 1)."""
    cdf = np.vectorize(lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2))) if np.isfinite(x) else float(x > 0))
    pdf = lambda x: np.where(np.isfinite(x), np.exp(-np.minimum(x * x, 1e300) / 2) / math.sqrt(2 * math.pi), 0.0)
    c = np.linspace(-2.5, 2.5, 2**bits)
    for _ in range(300):
        b = np.concatenate([[-np.inf], (c[1:] + c[:-1]) / 2, [np.inf]])
        c = (pdf(b[:-1]) - pdf(b[1:])) / (cdf(b[1:]) - cdf(b[:-1]))
    return c


def load(d):
    m = json.load(open(f"{d}/meta.json"))
    assert m.get("all_queries"), f"{d}: dump with --all-queries"
    L, H, T, D, Qh = m["layers"], m["kv_heads"], m["tokens"], m["head_dim"], m["q_heads"]
    k = np.load(f"{d}/k.npy").reshape(L, H, T, D)
    q = np.load(f"{d}/q.npy").reshape(L, T, Qh, D)
    return k, q, Qh // H


def psd_pow(s, p):
    w, u = np.linalg.eigh(s)
    return (u * np.maximum(w, 1e-12) ** p) @ u.T


def shrunk(s, a):
    return (1 - a) * s + a * np.trace(s) / len(s) * np.eye(len(s))


def main():
    a_dir, b_dir = sys.argv[1], sys.argv[2]
    bits = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    shrink = float(sys.argv[4]) if len(sys.argv) > 4 else 0.2
    K, Q, G = load(a_dir)
    K2, Q2, _ = load(b_dir)
    L, H, T, D = K.shape
    rot, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((D, D)))
    levels = lloyd_max(bits)

    def quant(x):
        y = x @ rot.T
        n = np.linalg.norm(y, axis=1, keepdims=True) + 1e-30
        z = levels[np.abs((y / n * math.sqrt(D))[..., None] - levels).argmin(-1)]
        return (z * n / math.sqrt(D)) @ rot

    mask = np.tril(np.ones((T, T), bool))

    def kl(q, kf, kq):
        s = np.where(mask, q @ kf.T / math.sqrt(D), -np.inf)
        sq = np.where(mask, q @ kq.T / math.sqrt(D), -np.inf)
        lp = s - s.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        lq = sq - sq.max(1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        with np.errstate(invalid="ignore"):  # -inf - -inf above the diagonal, masked out
            return np.where(mask, np.exp(lp) * (lp - lq), 0).sum(1)[64:].mean()

    tot = {"center": 0.0, "cross": 0.0}
    for l in range(L):
        for h in range(H):
            kf, qs = K[l, h], Q[l, :, h * G:(h + 1) * G]
            mu = kf[1:33].mean(0)
            kc2 = K2[l, h, 1:] - K2[l, h, 1:].mean(0)
            q2 = Q2[l, :, h * G:(h + 1) * G].reshape(-1, D)
            sk, sq = shrunk(kc2.T @ kc2 / len(kc2), shrink), shrunk(q2.T @ q2 / len(q2), shrink)
            kh, kih = psd_pow(sk, 0.5), psd_pow(sk, -0.5)
            t = psd_pow(kih @ psd_pow(kh @ sq @ kh, 0.5) @ kih, 0.5)
            mu2 = K2[l, h, 1:].mean(0)
            cand = {"center": quant(kf - mu) + mu, "cross": quant((kf - mu2) @ t.T) @ np.linalg.inv(t).T + mu2}
            for name, kq in cand.items():
                tot[name] += np.mean([kl(qs[:, g], kf, kq) for g in range(G)])
    n = L * H
    print(json.dumps({"bits": bits, "shrink": shrink, "attention_kl_center": tot["center"] / n, "attention_kl_calibrated": tot["cross"] / n}))


if __name__ == "__main__":
    main()

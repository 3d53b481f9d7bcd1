"""turboquant.hf (a transformers Cache on codes) on SmolLM2-135M's real
weights, read by transformers from the same GGUF file the Rust runtime uses,
against transformers' own cache and against the Rust runtime (`tq`).

TQ_BIN names the `tq` binary built from the same tree (scripts/test.sh sets it).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("TQ_HF_TESTS") == "1":  # scripts/test.sh: torch and transformers must be there
    import torch
else:
    torch = pytest.importorskip("torch", reason="turboquant.hf needs torch and transformers (scripts/test.sh installs them)")
    pytest.importorskip("transformers")

import turboquant as tq  # noqa: E402
import turboquant.hf  # noqa: E402,F401
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from turboquant.hf import TurboQuantCache  # noqa: E402

TQ = os.environ.get("TQ_BIN", "tq")


def fetch(name):
    """Path of a dataset in the data cache (`tq data fetch` reports `name: PATH`)."""
    r = subprocess.run([TQ, "data", "fetch", name], check=True, capture_output=True, text=True)
    line = next(x for x in (r.stdout + r.stderr).splitlines() if x.startswith(f"{name}: "))
    return line.split(" in ", 1)[1] if " in /" in line else line.split(": ", 1)[1]


@pytest.fixture(scope="module")
def smollm():
    gguf = fetch("smollm2")
    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, attn_implementation="turboquant", dtype=torch.float32).eval()
    with open(fetch("austen"), encoding="utf-8") as f:
        # the text `tq kv eval` reads: Austen's first 200,000 characters
        ids = tok(f.read()[:200_000], return_tensors="pt").input_ids
    return model, ids


@torch.no_grad()
def test_f32_codes_give_transformers_own_logits_and_tokens(smollm):
    model, ids = smollm
    x = ids[:, :160]
    ref = model(x, past_key_values=DynamicCache(config=model.config)).logits
    cache = TurboQuantCache(model.config, precision="f32")
    out = model(x, past_key_values=cache).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    assert cache.get_seq_length() == 160 and cache.nbytes == 160 * 30 * 2 * 3 * 64 * 4
    greedy = model.generate(x[:, :48], max_new_tokens=12, do_sample=False)
    ours = model.generate(x[:, :48], max_new_tokens=12, do_sample=False, past_key_values=TurboQuantCache(model.config, precision="f32"))
    assert torch.equal(ours, greedy)


@torch.no_grad()
def test_the_codes_see_the_keys_of_the_rust_runtime(smollm, tmp_path):
    # the keys a TurboQuantCache codes (in GGUF pair order) are the keys `tq kv
    # dump` records from the Rust runtime (both with the f32 cache), so both
    # code the same vectors: a tq-mse-4 codec gives them the same codes
    model, ids = smollm
    subprocess.run([TQ, "kv", "dump", "--tokens", "64", "--layers", "0,5", "--out", str(tmp_path)], check=True, capture_output=True)
    meta = json.loads((tmp_path / "meta.json").read_text())
    H, d = meta["kv_heads"], meta["head_dim"]
    k_rust = np.load(tmp_path / "k.npy").reshape(2, H, 64, d)
    cache = TurboQuantCache(model.config, precision="f32")
    seen = {}
    original = turboquant.hf.TurboQuantLayer.attend

    def spy(layer, query):
        seen[layer.layer_idx] = layer._pending[0].index_select(-1, cache._key_order)[0].numpy().copy()
        return original(layer, query)

    turboquant.hf.TurboQuantLayer.attend = spy
    try:
        model(ids[:, :64], past_key_values=cache)
    finally:
        turboquant.hf.TurboQuantLayer.attend = original
    codec = tq.Codec("tq-mse-4", d, seed=0)
    for i, layer in enumerate([0, 5]):
        np.testing.assert_allclose(seen[layer], k_rust[i], rtol=1e-4, atol=1e-4 * np.abs(k_rust[i]).max())
        a, b = codec.encode(seen[layer].reshape(-1, d)), codec.encode(k_rust[i].reshape(-1, d))
        same = (a[:, : d // 2] == b[:, : d // 2]).mean()
        assert same > 0.999, f"layer {layer}: {same:.5f} of the code bytes equal"
    # without the GGUF order the keys are a different permutation of coordinates
    plain = TurboQuantCache(model.config, precision="f32", gguf_key_order=False)
    assert plain._key_order is None and cache._key_order is not None


@torch.no_grad()
def test_perplexity_on_codes_matches_the_rust_runtime(smollm):
    # one chunk of 512 (second half scored), tq-mse-4 seed 0, against `tq kv eval`
    model, ids = smollm
    r = subprocess.run([TQ, "kv", "eval", "--chunks", "1", "--kv", "tq-mse-4", "--json"], check=True, capture_output=True, text=True)
    rust = json.loads(r.stdout.strip().splitlines()[-1])
    assert ids.shape[1] == rust["tokens"]  # the same tokenization
    chunk = ids[:, :512]
    lp = torch.log_softmax(model(chunk, past_key_values=DynamicCache(config=model.config)).logits[0, 256:-1], -1)
    lq = torch.log_softmax(model(chunk, past_key_values=TurboQuantCache(model.config, precision="tq-mse-4")).logits[0, 256:-1], -1)
    target = chunk[0, 257:]
    ppl_f32 = float((-lp.gather(1, target[:, None]).mean()).exp())
    ppl = float((-lq.gather(1, target[:, None]).mean()).exp())
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    # the f32 runs agree to float rounding. The coded runs share codebooks,
    # rotations and code layout but not the last bits of every key (torch and
    # the Rust runtime sum in different orders): the first layer's codes are
    # equal (test above), but a code that flips sends a coding-sized change
    # into every later layer, so over one chunk of 256 scored tokens the two
    # runs differ like two draws of the coding noise (2.3% in perplexity
    # measured on this chunk; 8 chunks average it out: docs/hf-transformers.md)
    assert abs(ppl_f32 / rust["ppl_f32"] - 1) < 1e-4, (ppl_f32, rust["ppl_f32"])
    assert abs(ppl / rust["ppl"] - 1) < 0.05, (ppl, rust["ppl"])
    assert 0.6 < kld / rust["kld"] < 1.6, (kld, rust["kld"])


@torch.no_grad()
def test_misuse_is_refused_clearly(smollm):
    model, ids = smollm
    with pytest.raises(ValueError, match="bit width"):
        TurboQuantCache(model.config, precision="tq-mse-9")

    class Sdpa:
        _attn_implementation = "sdpa"

    with pytest.raises(ValueError, match="attn_implementation='turboquant'"):
        TurboQuantCache(Sdpa())
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids[:, :16], max_new_tokens=2, num_beams=2, do_sample=False, past_key_values=TurboQuantCache(model.config, precision="k4v3"))
    padded = torch.ones(2, 16, dtype=torch.long)
    padded[0, :4] = 0
    refused = TurboQuantCache(model.config, precision="k4v3")
    with pytest.raises(ValueError, match="padded"):
        model(torch.cat([ids[:, :16], ids[:, 16:32]]), attention_mask=padded, past_key_values=refused)
    # the refused step left nothing behind: the cache still runs from empty
    assert refused.get_seq_length() == 0
    np.testing.assert_allclose(
        model(ids[:, :16], past_key_values=refused).logits,
        model(ids[:, :16], past_key_values=TurboQuantCache(model.config, precision="k4v3")).logits,
    )
    layer = TurboQuantCache(model.config).layers[0]
    with pytest.raises(ValueError, match="CPU or a CUDA device, not meta"):
        layer.update(torch.zeros(1, 3, 4, 64, device="meta"), torch.zeros(1, 3, 4, 64, device="meta"))
    with pytest.raises(ValueError, match="prefill='fast'"):
        TurboQuantCache(model.config, prefill="fast")
    with pytest.raises(ValueError, match="max_length=0"):
        TurboQuantCache(model.config, max_length=0)
    # the GPU path's option checks come before any CUDA call
    with pytest.raises(ValueError, match="no sink/recent windows"):
        TurboQuantCache(model.config, precision="k4v3", sink=1)._cuda_kernels(torch.device("cuda", 0))
    # generation with codes runs and holds what its precision accounts for
    cache = TurboQuantCache(model.config, precision="k4v3")
    out = model.generate(ids[:, :40], max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 48)
    per_token = tq.kv_bytes("k4v3", 3, 64)["bytes_per_token_per_layer"]
    assert cache.nbytes == round(per_token * 30 * cache.get_seq_length()) and cache.get_seq_length() == 47


def test_import_turboquant_does_not_import_torch():
    code = "import sys, turboquant; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""TurboQuant vector quantization and search over codes (Rust engine, numpy in and out).

The sharded index on Ray is `turboquant.ray` (pip install 'turboquant[ray]');
`import turboquant` never imports Ray.

Arrays: float32 C-contiguous inputs are used without copying; float64 inputs are
converted to float32 (a copy); other dtypes raise TypeError, non-contiguous arrays
or wrong shapes raise ValueError. Heavy calls release the GIL.
"""

from os import PathLike
from typing import Any, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

__version__: str

FloatArray = Union[npt.NDArray[np.float32], npt.NDArray[np.float64]]
IdArray = Union[npt.NDArray[np.uint64], npt.NDArray[np.int64], Sequence[int]]

def codecs(dim: int = 128) -> list[dict]:
    """The codec registry at `dim`: dicts with name, id, bits_per_value, code_size, description."""

def kv_value_seed(seed: int) -> int:
    """The codec seed of a KV cache's values when its keys use `seed`."""

def kv_precisions() -> str:
    """The KV-cache precision strings: f32, f16, q8_0, q4_0, -rot, kivi-B, mxfp4, nvfp4, tq-mse-B[-nc], tq-prod-B, tq-mse-2.5/3.5, kBvC."""

def kv_bytes(precision: str, kv_heads: int, head_dim: int) -> dict:
    """{"bytes_per_token_per_layer": float, "bits_per_value": float} of a KV precision."""

def vram(model: str, context: int, kv: str, weights: str = "bf16") -> dict:
    """Memory plan (GB = 1e9 bytes): model, kv, context, kv_bits_per_value, weights_gb, kv_gb, total_gb, cards_24gb.

    Models: llama-3.1-8b, llama-3.1-70b, qwen2.5-32b, glm-4-9b-chat, mixtral-8x22b, smollm2-135m.
    """

class Codec:
    """A registered codec, e.g. Codec("tq-mse-4", 128). Same name, dim and seed give the same bytes as `tq encode`."""

    def __init__(self, name: str, dim: int, seed: int = 0, rotation: str = "hadamard") -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def code_size(self) -> int:
        """Bytes per code."""
    @property
    def bits_per_value(self) -> float:
        """Storage bits per coordinate, every per-vector overhead included."""
    @property
    def wants_training(self) -> bool:
        """True for codecs that learn from data (PQ must, RaBitQ and fractional rates may)."""
    def train(self, x: FloatArray) -> None:
        """Fit data-dependent parameters on float32[n, dim]."""
    def encode(self, x: FloatArray) -> npt.NDArray[np.uint8]:
        """float32[n, dim] -> uint8[n, code_size]."""
    def decode(self, codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """uint8[n, code_size] -> float32[n, dim]."""
    def inner_product(self, queries: FloatArray, codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Inner-product estimates float32[q, n], computed on the codes (no decoding)."""

class Index:
    """Search over codes: flat (fast-scan where the codec allows) or IVF with `ivf_lists` lists.

    metric: "ip", "cosine" or "l2". raw: "none", "f16" or "f32" (keep full-precision
    copies for `search(..., raw_rerank=True)`). Codec parameters and IVF lists are
    trained on the first `add`. `save` writes the `tq index` file format (.tqi).
    """

    def __init__(
        self,
        codec: str,
        dim: int,
        metric: str = "ip",
        ivf_lists: Optional[int] = None,
        seed: int = 0,
        raw: str = "none",
    ) -> None: ...
    @staticmethod
    def load(path: Union[str, PathLike]) -> "Index": ...
    def save(self, path: Union[str, PathLike]) -> None:
        """Writes the index atomically under the file's write lock; refuses
        (ValueError) when another writer committed to the file since this
        index was loaded from or last saved to it."""
    @staticmethod
    def verify(path: Union[str, PathLike]) -> dict:
        """What a .tqi file holds and what is recoverable (see `tq index
        check`): commit slots, committed seq and end, records verified, bytes
        after the committed end, whether it loads, whether the previous commit
        is intact."""
    def __len__(self) -> int: ...
    @property
    def codec(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def metric(self) -> str: ...
    def add(self, x: FloatArray, ids: Optional[IdArray] = None, durable: bool = False) -> None:
        """Add vectors (ids default to after the largest id). All or nothing.

        durable=True: also append the ADD record to the index's file (the one
        it was loaded from or last saved to; fsync, then the commit slot, under
        the write lock) before returning. ValueError if the index has no file
        or another writer committed to it since; then nothing is added."""
    def remove(self, ids: IdArray, durable: bool = False) -> None:
        """Remove ids; an unknown id raises ValueError and removes none.

        durable=True: also append the REMOVE record to the index's file (as
        `add`); if that fails the index is loaded again from its file."""
    def ids(self) -> npt.NDArray[np.uint64]:
        """Every id held: the flat index's slot order, or IVF list after list."""
    def contains(self, ids: IdArray) -> npt.NDArray[np.bool_]:
        """Whether each id is in the index."""
    def search(
        self,
        queries: FloatArray,
        k: int,
        nprobe: Optional[int] = None,
        filter: Optional[IdArray] = None,
        exact: bool = False,
        rerank: int = 10,
        raw_rerank: bool = False,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(D, I) as in FAISS: scores float32[q, k] and ids int64[q, k], padded with -1."""

class CudaKv:
    """The CUDA kernels for one KV precision on GPU arrays of another framework
    (PyTorch CUDA tensors, through `__cuda_array_interface__`): encode into code
    and scale planes, attention on the codes; launches on the caller's stream,
    no copy through the host, no synchronisation. `turboquant.hf` uses it for
    CUDA models. Needs the NVIDIA driver and libnvrtc at run time."""

    def __init__(
        self,
        precision: str,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        seed: int = 0,
        device: int = 0,
        bf16_scales: bool = True,
        exact: bool = False,
    ) -> None: ...
    def encode(self, side: str, x: Any, codes: Any, scales: Any, stream: int, lens: Any = None) -> None:
        """Encode float32 x (batch, kv_heads, n, head_dim) into codes uint8 (batch, kv_heads, cap,
        code_bytes) and scales float32 (batch, kv_heads, cap): token t to slot lens[b] - n + t
        (lens int32 (batch,) counting the n new tokens) or slot t without lens."""
    def attend(self, q: Any, k_codes: Any, k_scales: Any, v_codes: Any, v_scales: Any, lens: Any, out: Any, stream: int) -> None:
        """Attention of q float32 (batch, q_tokens <= 8, q_heads, head_dim), the last q_tokens
        tokens of each sequence (causal), over the planes; writes out (like q)."""
    @property
    def precision(self) -> str: ...
    @property
    def device_name(self) -> str: ...
    @property
    def kernel(self) -> str: ...
    @property
    def key_code_bytes(self) -> int: ...
    @property
    def value_code_bytes(self) -> int: ...
    @property
    def bits_per_value(self) -> float: ...

class KvCache:
    """A compressed KV cache for a batch of sequences of one model: the Rust CPU
    caches of `tq kv` (same codecs, seeds and results), attention on the codes.
    The transformers integration (`turboquant.hf.TurboQuantCache`) is built on it."""

    def __init__(
        self,
        precision: str,
        layers: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        batch: int = 1,
        seed: int = 0,
        sink: int = 0,
        recent: int = 0,
        center_keys: bool = False,
        recent_q8: bool = False,
        delayed: bool = False,
    ) -> None: ...
    def update(self, layer: int, keys: FloatArray, values: FloatArray, queries: FloatArray) -> npt.NDArray[np.float32]:
        """Append n tokens to `layer` (keys, values: float32 (batch, n, kv_heads, head_dim)) and
        return the causal attention of their queries (batch, n, q_heads, head_dim, RoPE applied)
        over the codes, float32 (batch, n, q_heads, head_dim); scores scaled by 1/sqrt(head_dim)."""
    def seq_len(self, layer: int) -> int:
        """Tokens held by `layer`."""
    @property
    def nbytes(self) -> int:
        """Bytes held for keys and values (codes, scales, windows), all layers and sequences."""
    @property
    def bits_per_value(self) -> float: ...
    @property
    def batch(self) -> int: ...
    @property
    def precision(self) -> str: ...
    def reset(self, batch: Optional[int] = None) -> None:
        """Empty every layer and sequence; `batch` changes the number of sequences."""

"""A TurboQuant KV cache for Hugging Face transformers.

Keys and values are stored as codes (any precision of ``kv_precisions()``:
``tq-mse-4``, ``k4v3``, ``q4_0-rot``, ...), encoded when their tokens are
appended, and attention runs on the codes, in the same Rust caches as the
``tq kv`` runtime (same codebooks, rotations, seeds and results), for the
prompt and for every generated token::

    import turboquant.hf  # registers attn_implementation="turboquant"
    from turboquant.hf import TurboQuantCache

    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="turboquant")
    cache = TurboQuantCache(model.config, precision="k4v3")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

The attention implementation ``"turboquant"`` attends on the codes when the
layer's keys come from a :class:`TurboQuantCache` and is PyTorch's SDPA
otherwise (no cache, or another cache).

Where the codes live follows the model: for a model on the CPU they are in
host memory and attention runs in the Rust CPU caches; for a model on a CUDA
device they are in GPU memory (torch tensors: one code plane and one scale
plane per side and layer), encoded on append by the ``tq-cuda`` encode kernel
and attended by its fused decode-attention kernel on the codes, launched on
torch's current stream with no copy through the host and no synchronisation.
The GPU path takes ``tq-mse-B``, ``tq-mse-B-nc``, ``kBvC`` and ``kBvC-nc``
(B, C = 2..4) at head_dim 64 or 128, with key centering but without windows;
it stores each norm rounded to bf16 like the CPU cache (in an f32 plane). A step
of up to 8 new tokens attends in one launch; a longer prompt attends on the
codes 8 query tokens at a time (``prefill="codes"``, the default: the same
computation as the CPU cache) or, on an empty cache, with SDPA on the exact
keys and values before they are encoded (``prefill="sdpa"``: faster, the
prompt's own attention then sees no coding error).

Limits: causal decoder models with full attention (no sliding windows, no
logit soft-capping), scores scaled by 1/sqrt(head_dim), no padding inside a
batch (every sequence of a batch has the same length), greedy or sampled
decoding (no beam search, no cropping).

torch and transformers are imported by this module only: ``import
turboquant`` never imports them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ._turboquant import CudaKv, KvCache

ATTN_IMPLEMENTATION = "turboquant"

__all__ = ["ATTN_IMPLEMENTATION", "TurboQuantCache", "TurboQuantLayer", "turboquant_attention"]


def _geometry(config) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head_dim) of a transformers config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        layers = int(cfg.num_hidden_layers)
        q_heads = int(cfg.num_attention_heads)
    except AttributeError as e:
        raise ValueError(f"TurboQuantCache: the config has no {e.name}: not a decoder-only transformer") from None
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or q_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    for field in ("sliding_window", "attn_logit_softcapping"):
        value = getattr(cfg, field, None)
        if value and (field != "sliding_window" or getattr(cfg, "use_sliding_window", True)):
            raise ValueError(f"TurboQuantCache: the model uses {field}={value}, which the cache does not support")
    return layers, q_heads, kv_heads, int(head_dim)

_MAX_Q_TOKENS = 8  # query tokens one launch of the GPU attention takes
_CENTER_TOKENS = 32  # tokens a stream's key offset is learned from (tq_kv::TRAIN_TOKENS)
_TILE = 128  # the GPU planes hold a multiple of this many slots per sequence


class _GpuPlanes:
    """One layer's codes on a CUDA device: per side a code plane (uint8
    ``(batch, kv_heads, cap, code_bytes)``) and a scale plane (float32
    ``(batch, kv_heads, cap)``), and the sequence lengths (int32, on the
    device). Capacity grows by half (a device copy) when a step needs more."""

    def __init__(
        self, kernels: CudaKv, key_order: torch.Tensor | None, prefill: str, device: torch.device, max_length: int | None, center_keys: bool = False
    ):
        self.kernels, self.prefill, self.device, self.max_length = kernels, prefill, device, max_length
        self.center_keys = center_keys
        self.mu: torch.Tensor | None = None  # (batch, kv_heads, 1, head_dim) f32 key offsets
        self.order = key_order.to(device) if key_order is not None else None
        self.cap = 0
        self.length = 0
        self.batch: int | None = None
        self.planes: list[torch.Tensor] = []
        self.lens: torch.Tensor | None = None

    def _grow(self, batch: int, heads: int, need: int) -> None:
        if self.batch is not None and batch != self.batch:
            raise ValueError(f"a batch of {batch} sequences for a cache holding {self.batch}")
        if need <= self.cap:
            return
        # the first allocation holds max_length tokens if given; growth is by half
        want = max(need, self.max_length or 0) if self.cap == 0 else max(need, self.cap + self.cap // 2)
        cap = -(-want // _TILE) * _TILE
        kb, vb = self.kernels.key_code_bytes, self.kernels.value_code_bytes
        new = [
            torch.zeros((batch, heads, cap, kb), dtype=torch.uint8, device=self.device),
            torch.zeros((batch, heads, cap), dtype=torch.float32, device=self.device),
            torch.zeros((batch, heads, cap, vb), dtype=torch.uint8, device=self.device),
            torch.zeros((batch, heads, cap), dtype=torch.float32, device=self.device),
        ]
        for n, o in zip(new, self.planes):
            n[:, :, : self.cap] = o
        if self.lens is None:
            self.lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.planes, self.cap, self.batch = new, cap, batch

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        b, h, n, _ = k.shape
        self._grow(b, h, self.length + n)
        kx = (k.index_select(-1, self.order) if self.order is not None else k).to(torch.float32)
        if self.center_keys:
            if self.mu is None:
                # as the CPU cache: the mean of each head's tokens 1..31 (token 0 is
                # often an attention sink), in f64; scores then drop q·mu, a constant
                # per query, which softmax ignores
                if n < _CENTER_TOKENS:
                    raise ValueError(
                        f"center_keys on a GPU learns each head's key offset from the first {_CENTER_TOKENS} tokens: "
                        f"the first step holds {n}; give a longer prompt"
                    )
                self.mu = (kx[:, :, 1:_CENTER_TOKENS].double().sum(2, keepdim=True) / (_CENTER_TOKENS - 1)).float()
            kx = kx - self.mu
        kx = kx.contiguous()
        vx = v.to(torch.float32).contiguous()
        self.lens.add_(n)
        self.length += n
        kc, ks, vc, vs = self.planes
        stream = self._stream()
        try:
            self.kernels.encode("k", kx, kc, ks, stream, self.lens)
            self.kernels.encode("v", vx, vc, vs, stream, self.lens)
        except Exception:
            self.rollback(n)
            raise

    def rollback(self, n: int) -> None:
        self.length -= n
        self.lens.sub_(n)
        if self.length == 0:
            self.mu = None

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``query`` ``(batch, q_heads, n, head_dim)`` (the last n
        tokens) as ``(batch, n, q_heads, head_dim)`` in the query's dtype."""
        b, hq, n, d = query.shape
        if n > _MAX_Q_TOKENS and self.prefill == "sdpa" and self.length == n:
            # the prompt of an empty cache: exact keys and values (its codes are stored)
            o = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, enable_gqa=True)
            return o.transpose(1, 2)
        q = (query.index_select(-1, self.order) if self.order is not None else query).transpose(1, 2).to(torch.float32).contiguous()
        kc, ks, vc, vs = self.planes
        stream = self._stream()
        out = torch.empty_like(q)
        if n <= _MAX_Q_TOKENS:
            self.kernels.attend(q, kc, ks, vc, vs, self.lens, out, stream)
            return out.to(query.dtype)
        for s in range(0, n, _MAX_Q_TOKENS):
            e = min(n, s + _MAX_Q_TOKENS)
            part = torch.empty((b, e - s, hq, d), dtype=torch.float32, device=self.device)
            # query tokens s..e see the cache up to their own position
            self.kernels.attend(q[:, s:e].contiguous(), kc, ks, vc, vs, self.lens - (n - e), part, stream)
            out[:, s:e] = part
        if self.center_keys and self.length == n:
            # as the CPU cache, whose streams hold their first tokens in f32 until
            # the offset is learned: queries 0..30 of the first step attend exactly
            m = min(n, _CENTER_TOKENS - 1)
            f = torch.float32
            exact = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, :m].to(f), k[:, :, :m].to(f), v[:, :, :m].to(f), is_causal=True, enable_gqa=True
            )
            out[:, :m] = exact.transpose(1, 2)
        return out.to(query.dtype)

    def allocated(self) -> int:
        """Bytes of the planes and lengths allocated (the spare capacity too)."""
        return sum(t.numel() * t.element_size() for t in self.planes) + (4 * self.batch if self.batch else 0)

    def nbytes(self) -> int:
        """Bytes of the codes and scales of the cached tokens (not the spare capacity)."""
        if self.batch is None:
            return 0
        h = self.planes[0].shape[1]
        return self.length * self.batch * h * (self.kernels.key_code_bytes + self.kernels.value_code_bytes + 8)


class TurboQuantLayer(CacheLayerMixin):
    """One layer of a :class:`TurboQuantCache`: ``update`` hands the new keys
    and values to the attention, which appends them to the codes and attends
    its queries in one call (:meth:`attend`)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: TurboQuantCache, layer_idx: int):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self._length = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._gpu: _GpuPlanes | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._pending is not None:
            raise RuntimeError(
                f"TurboQuantCache layer {self.layer_idx}: the previous keys were never attended; load the model with "
                f"attn_implementation='{ATTN_IMPLEMENTATION}' (after `import turboquant.hf`)"
            )
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                f"keys and values must both be (batch, kv_heads, n, head_dim); got {tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.device != self.device or value_states.device != key_states.device:
            raise ValueError(f"TurboQuantCache layer {self.layer_idx} holds codes on {self.device}; the new keys are on {key_states.device}")
        if key_states.device.type == "cuda":
            self._gpu_planes().append(key_states, value_states)
        elif key_states.device.type != "cpu":
            raise ValueError(f"TurboQuantCache runs on the CPU or a CUDA device, not {key_states.device}")
        self._pending = (key_states, value_states)
        self._length += key_states.shape[2]
        # the attention finds this layer on the tensor it receives as keys
        key_states._turboquant_layer = self
        return key_states, value_states

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """Appends the pending keys and values and returns the attention of
        ``query`` ``(batch, q_heads, n, head_dim)`` over the codes, as
        ``(batch, n, q_heads, head_dim)`` in the query's dtype."""
        if self._pending is None:
            raise RuntimeError(f"TurboQuantCache layer {self.layer_idx}: attention without new keys")
        k, v = self._pending
        if query.shape[0] != k.shape[0] or query.shape[2] != k.shape[2]:
            raise ValueError(f"queries {tuple(query.shape)} do not match the new keys {tuple(k.shape)}")
        if self._gpu is not None:
            out = self._gpu.attend(query, k, v)
            self._pending = None
            return out
        codes = self._cache._codes_for(k.shape[0])
        order = self._cache._key_order
        if order is not None:
            # the same permutation of query and key coordinates: scores unchanged
            k, query_in = k.index_select(-1, order), query.index_select(-1, order)
        else:
            query_in = query
        host = lambda t: np.ascontiguousarray(t.detach().transpose(1, 2).to(torch.float32).numpy())  # noqa: E731
        out = codes.update(self.layer_idx, host(k), host(v), host(query_in))
        self._pending = None
        return torch.from_numpy(out).to(query.dtype)

    def _discard_pending(self) -> None:
        if self._pending is not None:
            n = self._pending[0].shape[2]
            self._length -= n
            if self._gpu is not None:
                self._gpu.rollback(n)
            self._pending = None

    def _gpu_planes(self) -> _GpuPlanes:
        if self._gpu is None:
            c = self._cache
            self._gpu = _GpuPlanes(c._cuda_kernels(self.device), c._key_order, c._prefill, self.device, c._max_length, c._options["center_keys"])
        return self._gpu

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._length + query_length, 0

    def get_seq_length(self) -> int:
        return self._length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._length = 0
        self._pending = None
        self._gpu = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("TurboQuantCache does not reorder sequences (beam search): use greedy or sampled decoding")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TurboQuantCache cannot drop tokens once they are coded")


class TurboQuantCache(Cache):
    """A transformers ``Cache`` whose keys and values are TurboQuant (or
    baseline) codes, attended on the codes by the ``"turboquant"`` attention.

    ``config``: the model's config (its layers, heads and head_dim);
    ``precision``: a KV precision string (``turboquant.kv_precisions()``);
    ``seed``: the codecs' rotation seed; ``sink``, ``recent``,
    ``center_keys``, ``recent_q8``, ``delayed``: the windows and key centering
    of ``tq kv`` (see its help). The model must run the ``"turboquant"``
    attention implementation.

    ``gguf_key_order``: llama-family checkpoints rotate query/key coordinate
    pairs ``(i, i + d/2)`` (transformers' ``rotate_half``), while GGUF files of
    the ``llama`` architecture store them permuted to adjacent pairs
    ``(2i, 2i + 1)`` — transformers undoes that permutation when it loads a
    GGUF. Attention does not depend on the order, but a rotation codec's codes
    do: with ``gguf_key_order`` (the default for ``model_type == "llama"``)
    keys and queries are coded in GGUF order, so the codes, perplexity and
    KLD equal those of the Rust runtime (``tq kv``) on the same GGUF file.
    Qwen2 GGUFs keep the checkpoint's order, so nothing is permuted for them.

    On a CUDA model (see the module docs): ``prefill``: ``"codes"`` (attend
    a prompt on its codes, 8 query tokens per launch, as the CPU cache does)
    or ``"sdpa"`` (the prompt of an empty cache attends its exact keys and
    values with SDPA, then they are encoded); ``exact_attention``: the fp32
    SIMT attention kernel instead of the tensor-core one; ``max_length``:
    tokens per sequence the GPU planes are first allocated for (they grow by
    half, with a device copy, when a step needs more).
    """

    def __init__(
        self,
        config,
        precision: str = "tq-mse-4",
        seed: int = 0,
        sink: int = 0,
        recent: int = 0,
        center_keys: bool = False,
        recent_q8: bool = False,
        delayed: bool = False,
        gguf_key_order: bool | None = None,
        prefill: str = "codes",
        exact_attention: bool = False,
        max_length: int | None = None,
    ):
        impl = getattr(config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"TurboQuantCache needs the model to attend through attn_implementation='{ATTN_IMPLEMENTATION}' "
                f"(after `import turboquant.hf`); this model uses {impl!r}"
            )
        self.geometry = _geometry(config)
        head_dim = self.geometry[3]
        if gguf_key_order is None:
            gguf_key_order = getattr(config, "model_type", None) == "llama"
        self._key_order = None
        if gguf_key_order:
            if head_dim % 2:
                raise ValueError(f"gguf_key_order needs an even head_dim, not {head_dim}")
            half = head_dim // 2
            # GGUF coordinate 2j is the checkpoint's j, 2j + 1 is its j + d/2
            self._key_order = torch.arange(head_dim).view(2, half).t().reshape(-1)
        if prefill not in ("codes", "sdpa"):
            raise ValueError(f"prefill={prefill!r}: 'codes' (attend on the codes) or 'sdpa' (exact attention of an empty cache's prompt)")
        self._prefill = prefill
        self._exact = exact_attention
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length}: a positive number of tokens")
        self._max_length = max_length
        self._kernels: dict[int, CudaKv] = {}
        self._options = dict(seed=seed, sink=sink, recent=recent, center_keys=center_keys, recent_q8=recent_q8, delayed=delayed)
        layers, q_heads, kv_heads, head_dim = self.geometry
        # built now so that a bad precision or option fails here, not mid-forward
        self._codes = KvCache(precision, layers, q_heads, kv_heads, head_dim, batch=1, **self._options)
        self._fresh = True
        super().__init__(layers=[TurboQuantLayer(self, i) for i in range(layers)])

    def _cuda_kernels(self, device: torch.device) -> CudaKv:
        """The GPU kernels of this cache's precision on ``device`` (made once)."""
        o = self._options
        if o["sink"] or o["recent"] or o["recent_q8"] or o["delayed"]:
            raise ValueError("the GPU cache takes no sink/recent windows or delayed coding (key centering it does)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._kernels:
            _, q_heads, kv_heads, head_dim = self.geometry
            self._kernels[index] = CudaKv(self.precision, q_heads, kv_heads, head_dim, seed=o["seed"], device=index, exact=self._exact)
        return self._kernels[index]

    def _gpu_layers(self) -> list[_GpuPlanes]:
        return [layer._gpu for layer in self.layers if layer._gpu is not None]

    def _codes_for(self, batch: int) -> KvCache:
        if self._fresh:
            if self._codes.batch != batch:
                self._codes.reset(batch)
            self._fresh = False
        elif self._codes.batch != batch:
            raise ValueError(f"a batch of {batch} sequences for a cache holding {self._codes.batch}")
        return self._codes

    @property
    def precision(self) -> str:
        """The precision string."""
        return self._codes.precision

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held (codes, scales and windows), all layers and sequences."""
        gpu = self._gpu_layers()
        return sum(g.nbytes() for g in gpu) if gpu else self._codes.nbytes

    @property
    def allocated_bytes(self) -> int:
        """GPU memory the cache's planes hold (capacity included); 0 on the CPU."""
        return sum(g.allocated() for g in self._gpu_layers())

    @property
    def bits_per_value(self) -> float:
        """Bits per cached value of the precision (on a GPU: with its f32 scale planes)."""
        if self._kernels:
            return next(iter(self._kernels.values())).bits_per_value
        return self._codes.bits_per_value

    def reset(self) -> None:
        super().reset()
        self._codes.reset()
        self._fresh = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("TurboQuantCache does not reorder sequences (beam search): use greedy or sampled decoding")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("TurboQuantCache cannot drop tokens once they are coded")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("TurboQuantCache does not expand batches (num_return_sequences > 1, beam search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("TurboQuantCache does not select sequences out of its batch")

    def __repr__(self) -> str:
        return f"TurboQuantCache({self._codes!r})"


def _check_causal(mask: torch.Tensor | None, n: int, past: int) -> None:
    """Refuses a mask that is not plain causal attention over the whole cache."""
    if mask is None:
        return
    if mask.dim() != 4 or mask.shape[-2] != n or mask.shape[-1] != past + n:
        raise ValueError(f"TurboQuantCache: an attention mask of shape {tuple(mask.shape)} for {n} queries over {past + n} tokens")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    causal = torch.arange(n)[:, None] + past >= torch.arange(past + n)[None, :]
    if not bool((allowed == causal.to(allowed.device)).all()):
        raise ValueError(
            "TurboQuantCache attends causally over every cached token: padded batches and custom masks are not supported "
            "(give every sequence of a batch the same length)"
        )


def turboquant_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The ``"turboquant"`` attention: on the codes of a :class:`TurboQuantCache`
    when ``key`` comes from one, PyTorch SDPA otherwise."""
    layer = getattr(key, "_turboquant_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    d = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, d**-0.5, rel_tol=1e-6):
        raise ValueError(f"TurboQuantCache scales scores by 1/sqrt({d}); this layer asks for {scaling}")
    if dropout:
        raise ValueError("TurboQuantCache attention has no dropout (evaluate or generate with model.eval())")
    for field in ("sliding_window", "softcap"):
        if kwargs.get(field):
            raise ValueError(f"TurboQuantCache does not support {field}={kwargs[field]}")
    n = query.shape[2]
    try:
        past = layer.get_seq_length() - n
        # on a GPU the mask's values are read (a host sync) only for a prompt
        # on an empty cache, where padding would show; later steps check its shape
        if layer.layer_idx == 0 and (query.device.type == "cpu" or past == 0):
            _check_causal(attention_mask, n, past)
        elif layer.layer_idx == 0 and attention_mask is not None and attention_mask.shape[-1] != past + n:
            raise ValueError(f"TurboQuantCache: an attention mask of shape {tuple(attention_mask.shape)} for {n} queries over {past + n} tokens")
        return layer.attend(query), None
    except Exception:
        layer._discard_pending()  # a refused step leaves the cache as it was
        raise


AttentionInterface.register(ATTN_IMPLEMENTATION, turboquant_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)

"""TurboQuant vector quantization and search over codes (Rust engine, numpy in and out).

The engine is the native module ``turboquant._turboquant``; this package
re-exports it. ``turboquant.ray`` (a sharded index on Ray, ``pip install
turboquant[ray]``) is imported only when asked for: ``import turboquant``
never imports Ray. ``turboquant.hf`` (a KV cache for Hugging Face
transformers, ``pip install turboquant[hf]``) is imported the same way: only
it imports torch and transformers.
"""

from ._turboquant import Codec, CudaKv, Index, KvCache, __version__, codecs, kv_bytes, kv_precisions, kv_value_seed, vram

__all__ = ["Codec", "CudaKv", "Index", "KvCache", "__version__", "codecs", "kv_bytes", "kv_precisions", "kv_value_seed", "vram"]

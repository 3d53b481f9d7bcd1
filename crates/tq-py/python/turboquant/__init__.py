"""TurboQuant vector quantization and search over codes (Rust engine, numpy in and out).

The engine is the native module ``turboquant._turboquant``; this package
re-exports it. ``turboquant.ray`` (a sharded index on Ray, ``pip install
turboquant[ray]``) is imported only when asked for: ``import turboquant``
never imports Ray.
"""

from ._turboquant import Codec, Index, __version__, codecs, kv_bytes, kv_precisions, vram

__all__ = ["Codec", "Index", "__version__", "codecs", "kv_bytes", "kv_precisions", "vram"]

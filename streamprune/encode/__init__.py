"""Vision encoding of streamed frames; `cacher` reuses encoder work between frames (STC-Cacher)."""

from streamprune.encode.cacher import CacherConfig, CacherStats, QwenSTCCacher, STCCacher, make_cacher

__all__ = ["CacherConfig", "CacherStats", "QwenSTCCacher", "STCCacher", "make_cacher"]

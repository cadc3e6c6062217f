"""Vision encoding of streamed frames; `cacher` reuses encoder work between frames (STC-Cacher)."""

from streamprune.encode.cacher import CacherConfig, CacherStats, STCCacher

__all__ = ["CacherConfig", "CacherStats", "STCCacher"]

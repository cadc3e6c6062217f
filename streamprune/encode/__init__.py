"""STC-Cacher: the vision encoder reuses work across temporally similar frames of a stream.

The rule is written once (cacher.py); each model family's adapter builds its cacher from its own
tower (`VideoLLMAdapter.build_cacher`), and `VideoLLMAdapter.encode_for` applies it for a recipe.
"""

from streamprune.encode.cacher import CacherConfig, CacherStats, QwenSTCCacher, STCCacher

__all__ = ["CacherConfig", "CacherStats", "QwenSTCCacher", "STCCacher"]

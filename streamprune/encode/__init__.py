"""STC-Cacher: the vision encoder reuses work across temporally similar frames of a stream.

The rule is written once (cacher.py), each tower's layer as a block in families.py; a model
family's adapter builds its cacher (`VideoLLMAdapter.build_cacher`) and `VideoLLMAdapter.encode_for`
applies it wherever a recipe names it.
"""

from streamprune.encode.cacher import CacherConfig, CacherStats
from streamprune.encode.families import QwenSTCCacher, STCCacher

__all__ = ["CacherConfig", "CacherStats", "QwenSTCCacher", "STCCacher"]

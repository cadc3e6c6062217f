"""Bounded memory of a live stream's visual tokens (see streaming.py for the rules)."""

from streamprune.memory.streaming import (
    MemoryConfig,
    MemoryListener,
    MemorySnapshot,
    MemoryUnit,
    StreamingMemory,
)

__all__ = ["MemoryConfig", "MemoryListener", "MemorySnapshot", "MemoryUnit", "StreamingMemory"]

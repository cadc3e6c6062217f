"""The memory stage of a stream: the bounded `StreamingMemory` (memory/streaming.py), its optional
`IncrementalKV` (memory/kv_cache.py) and the LLM answering questions from it."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from streamprune.config import DeviceConfig, MemoryConfig
from streamprune.errors import InputError
from streamprune.memory import MemoryUnit, StreamingMemory
from streamprune.memory.kv_cache import IncrementalKV, LastQueryAttention, kv_cache_bytes
from streamprune.types import VisualTokens


@dataclass
class EncodedChunk:
    """Per-unit pruned tokens of one batch of frames, plus the family's always-kept tokens."""

    units: list[MemoryUnit]
    newline: torch.Tensor
    encode_ms: float


@dataclass
class LiveAnswer:
    """An answer and the stretch of stream it is about (seconds of stream time)."""

    question: str
    text: str
    stream_time: float  # newest frame in the memory the answer was built from
    memory_start: float  # oldest frame still represented
    visual_tokens: int
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)


def process_rss() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def load_stage_model(model: str | None, threads: int, adapter: Any = None, placement: DeviceConfig | None = None) -> Any:
    from streamprune.models import load_model

    torch.set_num_threads(threads)
    return adapter if adapter is not None else load_model(model, placement)


class MemoryStage:
    """The bounded memory and the LLM answering from it. `add` and `ask` may run concurrently
    (the memory locks itself; an answer works on a snapshot).

    attention_layer: decoder layer whose last-query attention feeds A2SF (default: the middle one;
    A2SF scores every layer of its own cache, ours is one memory shared by all layers).
    incremental_kv: keep the LLM's KV cache of the memory between questions (`IncrementalKV`)
    instead of re-prefilling it for each question; the stream then waits while a question is
    answered, since both extend the same cache."""

    def __init__(self, model: str | None, memory: MemoryConfig, max_new_tokens: int = 16,
                 attention_layer: int | None = None, threads: int = 1, adapter: Any = None,
                 incremental_kv: bool = False, placement: DeviceConfig | None = None) -> None:
        from streamprune.pruning.recipe import build_recipe

        self.adapter = load_stage_model(model, threads, adapter, placement)
        self.none = build_recipe("none")
        self.max_new_tokens = max_new_tokens
        layers = len(self.adapter.language_model.layers)
        self.attention_layer = layers // 2 if attention_layer is None else min(attention_layer, layers - 1)
        self.kv = IncrementalKV(self.adapter) if incremental_kv else None
        self.memory = StreamingMemory(memory, self.adapter.language_model.config.hidden_size, listener=self.kv)
        self.fps = 1.0
        self.frames = 0
        self.stream_time = 0.0
        self._answer_lock = threading.Lock()

    def add(self, chunk: EncodedChunk, fps: float) -> dict[str, Any]:
        """Append a chunk's units; returns what the stats line needs (tokens, latency, RSS)."""
        if not self.memory.newline.numel() and chunk.newline.numel():
            self.memory.newline = chunk.newline.clone()
        self.fps = fps
        peak = 0
        for unit in chunk.units:
            self.memory.append(unit)
            peak = max(peak, len(self.memory))
            self.stream_time = unit.timestamp
        self.frames += len(chunk.units)
        return {"tokens": len(self.memory), "tokens_peak": peak, "rss_bytes": process_rss(),
                "stream_time": self.stream_time, "encode_ms": chunk.encode_ms,
                "kv_cache_bytes": self.kv_bytes(len(self.memory) + self.memory.newline.shape[0]),
                "merged": self.memory.merged, "evicted": self.memory.evicted}

    def kv_bytes(self, tokens: int) -> int:
        lm = self.adapter.language_model
        return kv_cache_bytes(lm.config, lm.dtype, tokens)

    @torch.inference_mode()
    def ask(self, question: str) -> LiveAnswer:
        """Answer from the memory as it is now; credits the question's attention back (A2SF)."""
        start = time.perf_counter()
        if self.kv is not None:
            with self.memory.lock:  # the stream waits: the question extends the shared cache
                snap = self.memory.snapshot()
                if not len(snap):
                    raise InputError("no frames in memory yet")
                text, attention = self.kv.answer(question, snap.newline, len(snap), self.max_new_tokens,
                                                 self.attention_layer)
            timings = {}
        else:
            snap = self.memory.snapshot()
            if not len(snap):
                raise InputError("no frames in memory yet")
            text, attention, timings = self._reprefill_answer(question, snap)
        if attention is not None:
            self.memory.credit_attention(snap.uid, attention.float().cpu())
        return LiveAnswer(question=question, text=text, stream_time=snap.stream_time,
                          memory_start=snap.start_time, visual_tokens=len(snap),
                          latency_ms=(time.perf_counter() - start) * 1000, timings_ms=timings)

    def _reprefill_answer(self, question: str, snap: Any) -> tuple[str, torch.Tensor | None, dict[str, float]]:
        from streamprune.models.base import EncodedVideo

        m = len(snap)
        # a flat token list: 1-D RoPE (LLaVA-OV) sees the tokens in time order, contiguously;
        # M-RoPE (Qwen2.5-VL) sees one row, so its (t, h, w) structure is not conveyed
        tokens = VisualTokens(features=snap.features, thw=VisualTokens.grid_positions(1, 1, m), grid=(1, 1, m))
        video = EncodedVideo(tokens=tokens, always_kept=snap.newline, fps=self.fps)
        slots = self.adapter.layout(video, self.adapter.prompt_ids(question)).visual_slots
        with self._answer_lock, LastQueryAttention(self.adapter, self.attention_layer, slots) as attention:
            answer = self.adapter.answer_encoded(video, question, self.none, max_new_tokens=self.max_new_tokens)
        return answer.text, attention.value, answer.timings_ms

    def tokens_per_frame(self) -> dict[int, int]:
        return self.memory.tokens_per_frame()

    def frames_covered(self) -> torch.Tensor:
        return self.memory.frames_covered()

    def pid(self) -> int:
        return os.getpid()

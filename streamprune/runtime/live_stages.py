"""The stages of a live stream, as objects a runner drives in-process or as Ray actors.

  encode   `EncodeStage`: batches of frames -> visual tokens (the recipe's STC-Cacher kept warm
           for the stream) -> per-unit pruning with the recipe's selectors (one unit = the
           adapter's `frames_per_unit` frames).
  memory   `MemoryStage`: the `StreamingMemory` (bounded visual tokens, memory/streaming.py), its
           optional `IncrementalKV` (memory/kv_cache.py) and the LLM answering from it.

`LocalStages` runs both in this process (threads, one copy of the model); `RayStages` runs them as
Ray actors: the encoder restarts when it dies (`max_restarts=-1`) and its in-flight call is retried
(`max_task_retries`), so the stream goes on. Backpressure is the runner's drop-oldest queue plus one
batch in flight per stage, which bounds each actor's mailbox without a queue actor.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from streamprune.config import DeviceConfig, LiveConfig, MemoryConfig
from streamprune.errors import ConfigError, InputError
from streamprune.memory import MemoryUnit, StreamingMemory
from streamprune.memory.kv_cache import IncrementalKV, LastQueryAttention, kv_cache_bytes
from streamprune.models import check_model
from streamprune.types import Frame, VisualTokens


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


class StageFailed(RuntimeError):
    """A stage call failed for a reason the stream survives (a dead actor being restarted)."""


def process_rss() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


def _load(model: str | None, threads: int, adapter: Any = None, placement: DeviceConfig | None = None) -> Any:
    from streamprune.models import load_model

    torch.set_num_threads(threads)
    return adapter if adapter is not None else load_model(model, placement)


def unit_recipe(method: str, retain: float | None, max_tokens: int | None,
                variants: dict[str, str] | None = None) -> Any:
    """The pruning recipe applied to each unit: its encoder stage (STC-Cacher, warm across the
    stream) and pre-LLM selectors; a stage inside the LLM has no prefill to act in here.
    `variants`: the model family's own versions of methods (`VideoLLMAdapter.method_variants`)."""
    from streamprune.pruning.recipe import build_recipe

    recipe = build_recipe(method, retain=retain, max_tokens=max_tokens, variants=variants)
    if recipe.inner_llm is not None:
        raise ConfigError(f"method {method!r} has a stage inside the LLM; live memory prunes each frame "
                          "before the LLM, so use a pre-LLM method (see `streamprune methods`)")
    return recipe


class EncodeStage:
    """Frames -> MemoryUnits: the adapter's vision encoder, then the configured method on each
    unit (the per-frame budget is `retain` of one unit's tokens)."""

    def __init__(self, model: str | None, method: str = "none", retain: float | None = None,
                 max_tokens: int | None = None, seed: int = 0, threads: int = 1, adapter: Any = None,
                 placement: DeviceConfig | None = None) -> None:
        from streamprune.pruning.base import PruneContext

        self.adapter = _load(model, threads, adapter, placement)
        self.recipe = unit_recipe(method, retain, max_tokens, self.adapter.method_variants)
        self.ctx = PruneContext(seed=seed)
        # the stream's STC-Cacher lives here: a restarted actor starts cold
        self.cacher = self.adapter.new_cacher(self.recipe)

    def unit_frames(self) -> int:
        """Frames per memory unit (the adapter's temporal unit, e.g. Qwen2.5-VL's 2-frame patch)."""
        return self.adapter.frames_per_unit

    @torch.inference_mode()
    def process(self, frames: list[Frame], fps: float) -> EncodedChunk:
        """`frames` (a multiple of `unit_frames()`, same size) -> one MemoryUnit per unit."""
        start = time.perf_counter()
        clip = np.stack([f.image for f in frames])
        video = self.adapter.encode_for(clip, self.recipe, fps=fps, cacher=self.cacher)
        tokens = video.tokens
        t, h, w = tokens.grid
        per_unit = h * w
        step = len(frames) // t
        units = []
        for u in range(t):
            rows = slice(u * per_unit, (u + 1) * per_unit)
            unit_tokens = VisualTokens(
                features=tokens.features[rows],
                thw=VisualTokens.grid_positions(1, h, w),
                grid=(1, h, w),
                signals={k: v[rows] for k, v in tokens.signals.items()},
                frame_signals={k: v[u : u + 1] for k, v in tokens.frame_signals.items()},
            )
            selection = self.recipe.select(unit_tokens, self.ctx)
            kept = selection.apply(unit_tokens)
            first = frames[u * step]
            # the memory lives in host RAM (it crosses actors); each answer moves it to the device
            units.append(MemoryUnit(features=kept.features.float().cpu().contiguous(), hw=kept.thw[:, 1:].cpu(),
                                    frame=first.index, timestamp=first.timestamp,
                                    tokens_before_pruning=per_unit))
        encode_ms = (time.perf_counter() - start) * 1000
        return EncodedChunk(units=units, newline=video.always_kept.float().cpu(), encode_ms=encode_ms)

    def pid(self) -> int:
        return os.getpid()


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

        self.adapter = _load(model, threads, adapter, placement)
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


class Stages(Protocol):
    """What the runner drives: encode+add a batch, answer a question."""

    unit_frames: int

    def encode_add(self, frames: list[Frame], fps: float) -> dict[str, Any]: ...

    def ask(self, question: str) -> LiveAnswer: ...

    def close(self) -> None: ...


class LocalStages:
    """Both stages in this process (`--no-ray`), sharing one copy of the model."""

    def __init__(self, config: LiveConfig) -> None:
        adapter = _load(config.model, config.threads, placement=config.placement) if config.incremental_kv else None
        self.encoder = EncodeStage(config.model, config.method, config.retain, config.max_tokens, config.seed,
                                   config.threads, adapter=adapter, placement=config.placement)
        self.memory = MemoryStage(config.model, config.memory, config.max_new_tokens, threads=config.threads,
                                  adapter=self.encoder.adapter, incremental_kv=config.incremental_kv)
        self.unit_frames = self.encoder.unit_frames()

    def encode_add(self, frames: list[Frame], fps: float) -> dict[str, Any]:
        return self.memory.add(self.encoder.process(frames, fps), fps)

    def ask(self, question: str) -> LiveAnswer:
        return self.memory.ask(question)

    def close(self) -> None:
        pass


class RayStages:
    """Encoder and memory as Ray actors. The encoder restarts after a crash and its pending call is
    retried there; a batch whose retries ran out is reported as dropped and the stream goes on."""

    def __init__(self, config: LiveConfig, task_retries: int = 3) -> None:
        import ray

        unit_recipe(config.method, config.retain, config.max_tokens)
        check_model(config.model)  # fail here, in one line, rather than inside an actor
        self._ray = ray
        # on CUDA the two stages share one GPU (each holds a copy of the model)
        gpus = 0.5 if config.placement.device.startswith("cuda") else 0
        encoder_cls = ray.remote(EncodeStage).options(max_restarts=-1, max_task_retries=task_retries, num_cpus=0,
                                                      num_gpus=gpus)
        memory_cls = ray.remote(MemoryStage).options(max_concurrency=2, num_cpus=0, num_gpus=gpus)
        self.encoder = encoder_cls.remote(config.model, config.method, config.retain, config.max_tokens,
                                          config.seed, config.threads, placement=config.placement)
        self.memory = memory_cls.remote(config.model, config.memory, config.max_new_tokens, None, config.threads,
                                        None, config.incremental_kv, placement=config.placement)
        self.unit_frames = ray.get(self.encoder.unit_frames.remote())

    def encode_add(self, frames: list[Frame], fps: float) -> dict[str, Any]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        chunk = self.encoder.process.remote(frames, fps)
        try:
            return self._ray.get(self.memory.add.remote(chunk, fps))
        except (ActorDiedError, ActorUnavailableError) as e:
            raise StageFailed(f"encoder unavailable: {type(e).__name__}") from None
        except RayTaskError as e:
            if isinstance(e.cause, (ActorDiedError, ActorUnavailableError)):
                raise StageFailed(f"encoder died: {type(e.cause).__name__}") from None
            raise e.cause if isinstance(e.cause, Exception) else e from None

    def ask(self, question: str) -> LiveAnswer:
        from ray.exceptions import RayTaskError

        try:
            return self._ray.get(self.memory.ask.remote(question))
        except RayTaskError as e:
            raise e.cause if isinstance(e.cause, Exception) else e from None

    def close(self) -> None:
        for actor in (self.encoder, self.memory):
            self._ray.kill(actor, no_restart=True)

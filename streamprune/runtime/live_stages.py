"""The stage graph of a live stream, as objects a runner drives in-process or as Ray actors:

  source -> decode/sample  the runner's reader thread (live_runner.py) and its drop-oldest queue;
  encode -> segment -> select   `EncodeStage`: vision tower with the recipe's STC-Cacher, the
           online temporal segmenter, the recipe's pre-LLM selectors on each closed segment;
  model    `MemoryStage` (memory_stage.py): the bounded `StreamingMemory`, its optional
           `IncrementalKV`, and the LLM answering from it (with the recipe's inner-LLM stage).

The robot loop is the same graph with env stages as the source and a VLA as the model stage
(robot_stages.py). `LocalStages` runs both stages in this process (threads, one copy of the
model); `RayStages` runs them as Ray actors: the encoder restarts when it dies (`max_restarts=-1`,
starting cold: a new cacher and an empty open segment) and its in-flight call is retried
(`max_task_retries`), so the stream goes on. Backpressure is the runner's drop-oldest queue plus
one batch in flight per stage, which bounds each actor's mailbox without a queue actor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from streamprune.config import DeviceConfig, LiveConfig
from streamprune.errors import ConfigError
from streamprune.memory import MemoryUnit
from streamprune.models import check_model
from streamprune.runtime.memory_stage import EncodedChunk, LiveAnswer, MemoryStage, load_stage_model
from streamprune.types import Frame, VisualTokens


class StageFailed(RuntimeError):
    """A stage call failed for a reason the stream survives (a dead actor being restarted)."""


def unit_recipe(method: str, retain: float | None, max_tokens: int | None,
                variants: dict[str, str] | None = None) -> Any:
    """The recipe the encoder side applies: its encoder stage (STC-Cacher, warm across the stream)
    and its pre-LLM selectors on each closed segment; an inner-LLM stage acts later, in each
    answer's prefill (`MemoryStage`). `variants`: the model family's own versions of methods
    (`VideoLLMAdapter.method_variants`)."""
    from streamprune.pruning.recipe import build_recipe

    recipe = build_recipe(method, retain=retain, max_tokens=max_tokens, variants=variants)
    robot_only = [m.name for m in recipe.methods if m.needs_action_feedback]
    if robot_only:
        raise ConfigError(f"method {method!r} learns from the action attention of control steps "
                          f"({', '.join(robot_only)}), which a question-answering stream has none of; "
                          "use it with `streamprune robot`")
    return recipe


@dataclass
class UnitMeta:
    """Where a unit sits in the stream: its first frame's counter and stream time (seconds)."""

    frame: int
    timestamp: float


class EncodeStage:
    """Frames -> MemoryUnits through three stages of the graph, kept in one actor so features
    never cross processes before they are pruned:

      encode   the adapter's vision tower with the recipe's STC-Cacher (per stream; a restarted
               actor starts cold), one unit = the adapter's `frames_per_unit` frames;
      segment  `OnlineSegmenter`: units join an open segment that closes where the recipe's
               temporal method cuts (FastVID's DySeg, HoliTom's windows) or at `max_segment_units`;
               a frame-level method closes a segment at every unit;
      select   the recipe's pre-LLM selectors on each closed segment as a whole (the budget is
               `retain` of the segment's tokens), split back into one MemoryUnit per unit, each
               tagged with its segment so the memory compresses along the same segments.

    Frames in the open segment reach the memory when it closes: `max_segment_units` bounds that
    delay (8 units = 4 s of stream at 2 fps)."""

    def __init__(self, model: str | None, method: str = "none", retain: float | None = None,
                 max_tokens: int | None = None, seed: int = 0, threads: int = 1, adapter: Any = None,
                 placement: DeviceConfig | None = None, max_segment_units: int = 8) -> None:
        from streamprune.pruning.base import PruneContext
        from streamprune.runtime.segmenter import OnlineSegmenter

        self.adapter = load_stage_model(model, threads, adapter, placement)
        self.recipe = unit_recipe(method, retain, max_tokens, self.adapter.method_variants)
        self.ctx = PruneContext(seed=seed)
        self.recipe.start_stream(self.ctx)
        self.cacher = self.adapter.new_cacher(self.recipe)
        self.segmenter = OnlineSegmenter(self.recipe, max_units=max_segment_units)
        self.segments_closed = 0

    def unit_frames(self) -> int:
        """Frames per memory unit (the adapter's temporal unit, e.g. Qwen2.5-VL's 2-frame patch)."""
        return self.adapter.frames_per_unit

    @torch.inference_mode()
    def process(self, frames: list[Frame], fps: float, flush: bool = False) -> EncodedChunk:
        """`frames` (a multiple of `unit_frames()`, same size) -> the MemoryUnits of every segment
        that closed meanwhile; `flush` closes the open segment too (end of stream)."""
        start = time.perf_counter()
        units: list[MemoryUnit] = []
        newline = torch.zeros(0)
        grid = None
        stats = None
        select_ms = 0.0
        if frames:
            clip = np.stack([f.image for f in frames])
            video = self.adapter.encode_for(clip, self.recipe, fps=fps, cacher=self.cacher)
            stats = video.cacher_stats
            newline = video.always_kept.float().cpu()
            tokens = video.tokens
            t, h, w = tokens.grid
            grid = (h, w)
            per_unit = h * w
            step = len(frames) // t
            encoded = time.perf_counter()
            for u in range(t):
                rows = slice(u * per_unit, (u + 1) * per_unit)
                unit_tokens = VisualTokens(
                    features=tokens.features[rows],
                    thw=VisualTokens.grid_positions(1, h, w),
                    grid=(1, h, w),
                    signals={k: v[rows] for k, v in tokens.signals.items()},
                    frame_signals={k: v[u : u + 1] for k, v in tokens.frame_signals.items()},
                )
                first = frames[u * step]
                for segment in self.segmenter.push(unit_tokens, UnitMeta(first.index, first.timestamp)):
                    units.extend(self._select(segment))
            select_ms = (time.perf_counter() - encoded) * 1000
        if flush:
            began = time.perf_counter()
            for segment in self.segmenter.flush():
                units.extend(self._select(segment))
            select_ms += (time.perf_counter() - began) * 1000
        total_ms = (time.perf_counter() - start) * 1000
        return EncodedChunk(units=units, newline=newline, encode_ms=total_ms - select_ms, select_ms=select_ms,
                            cacher=stats, segments_closed=self.segments_closed,
                            open_units=self.segmenter.open_units, grid=grid)

    def _select(self, segment: Any) -> list[MemoryUnit]:
        """One closed segment pruned as a whole, then one MemoryUnit per unit it spans."""
        self.segments_closed += 1
        # a temporal method's segments guide the memory's merging; per-unit segments would forbid it
        segment_id = self.segments_closed if self.segmenter.rule is not None else None
        tokens = segment.tokens
        _, h, w = tokens.grid
        kept = self.recipe.select(tokens, self.ctx).apply(tokens)
        unit_of = kept.thw[:, 0]
        out = []
        for j, meta in enumerate(segment.units):
            rows = unit_of == j
            # the memory lives in host RAM (it crosses actors); each answer moves it to the device
            out.append(MemoryUnit(features=kept.features[rows].float().cpu().contiguous(),
                                  hw=kept.thw[rows, 1:].cpu(), frame=meta.frame, timestamp=meta.timestamp,
                                  tokens_before_pruning=h * w, segment=segment_id))
        return out

    def pid(self) -> int:
        return os.getpid()


class Stages(Protocol):
    """What the runner drives: encode+add a batch, answer a question."""

    unit_frames: int

    def encode_add(self, frames: list[Frame], fps: float, flush: bool = False) -> dict[str, Any]: ...

    def ask(self, question: str, retain: float | None = None) -> LiveAnswer: ...

    def close(self) -> None: ...


class LocalStages:
    """Both stages in this process (`--no-ray`), sharing one copy of the model (`adapter`: one
    already loaded, e.g. the server's, shared with its other streams)."""

    def __init__(self, config: LiveConfig, adapter: Any = None) -> None:
        if adapter is None and config.incremental_kv:
            adapter = load_stage_model(config.model, config.threads, placement=config.placement)
        self.encoder = EncodeStage(config.model, config.method, config.retain, config.max_tokens, config.seed,
                                   config.threads, adapter=adapter, placement=config.placement,
                                   max_segment_units=config.max_segment_units)
        self.memory = MemoryStage(config.model, config.memory, config.max_new_tokens, threads=config.threads,
                                  adapter=self.encoder.adapter, incremental_kv=config.incremental_kv,
                                  method=config.method, retain=config.retain, max_tokens=config.max_tokens)
        self.unit_frames = self.encoder.unit_frames()

    def encode_add(self, frames: list[Frame], fps: float, flush: bool = False) -> dict[str, Any]:
        return self.memory.add(self.encoder.process(frames, fps, flush), fps)

    def ask(self, question: str, retain: float | None = None) -> LiveAnswer:
        return self.memory.ask(question, retain)

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
                                          config.seed, config.threads, placement=config.placement,
                                          max_segment_units=config.max_segment_units)
        self.memory = memory_cls.remote(config.model, config.memory, config.max_new_tokens, None, config.threads,
                                        None, config.incremental_kv, placement=config.placement,
                                        method=config.method, retain=config.retain, max_tokens=config.max_tokens)
        self.unit_frames = ray.get(self.encoder.unit_frames.remote())

    def encode_add(self, frames: list[Frame], fps: float, flush: bool = False) -> dict[str, Any]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        chunk = self.encoder.process.remote(frames, fps, flush)
        try:
            return self._ray.get(self.memory.add.remote(chunk, fps))
        except (ActorDiedError, ActorUnavailableError) as e:
            raise StageFailed(f"encoder unavailable: {type(e).__name__}") from None
        except RayTaskError as e:
            if isinstance(e.cause, (ActorDiedError, ActorUnavailableError)):
                raise StageFailed(f"encoder died: {type(e.cause).__name__}") from None
            raise e.cause if isinstance(e.cause, Exception) else e from None

    def ask(self, question: str, retain: float | None = None) -> LiveAnswer:
        from ray.exceptions import RayTaskError

        try:
            return self._ray.get(self.memory.ask.remote(question, retain))
        except RayTaskError as e:
            raise e.cause if isinstance(e.cause, Exception) else e from None

    def close(self) -> None:
        for actor in (self.encoder, self.memory):
            self._ray.kill(actor, no_restart=True)

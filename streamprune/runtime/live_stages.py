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
import time
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

        self.adapter = load_stage_model(model, threads, adapter, placement)
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


class Stages(Protocol):
    """What the runner drives: encode+add a batch, answer a question."""

    unit_frames: int

    def encode_add(self, frames: list[Frame], fps: float) -> dict[str, Any]: ...

    def ask(self, question: str) -> LiveAnswer: ...

    def close(self) -> None: ...


class LocalStages:
    """Both stages in this process (`--no-ray`), sharing one copy of the model."""

    def __init__(self, config: LiveConfig) -> None:
        adapter = load_stage_model(config.model, config.threads, placement=config.placement) if config.incremental_kv else None
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

"""Live stream question answering: source -> encode -> bounded memory + LLM.

Stages:
  source   a reader thread pulls frames from a FrameSource, samples them to `fps` and puts them
           in a bounded drop-oldest queue: when the model falls behind, the OLDEST waiting frames
           are dropped (and counted), so answers stay about the present.
  encode   `EncodeStage`: batches of frames -> visual tokens -> per-unit pruning with the
           configured method (one unit = 1 frame, or a Qwen2.5-VL temporal patch of 2 frames).
  memory   `MemoryStage`: the `StreamingMemory` (bounded visual tokens) and the LLM that answers
           questions from it, concurrently with the stream.

`LocalStages` runs both stage classes in this process (threads); `RayStages` runs them as Ray
actors: the encoder restarts when it dies (`max_restarts=-1`) and its in-flight call is retried
(`max_task_retries`), so the stream goes on. Backpressure is the driver's drop-oldest queue plus
one batch in flight per stage, which bounds each actor's mailbox without a queue actor (a
`ray.util.queue.Queue` cannot drop its oldest item atomically).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from streamprune.errors import InputError
from streamprune.memory import MemoryConfig, MemoryUnit, StreamingMemory
from streamprune.sources.base import FrameSource
from streamprune.types import Frame, VisualTokens

log = logging.getLogger(__name__)


@dataclass
class LiveConfig:
    """What `streamprune live` runs.

    model: model directory (None: the embedded default).  method/retain/max_tokens: the budget of
    each unit's pruning.
    fps: frames sampled per second of stream (None: every frame).  queue_frames: frames waiting
    for the encoder before the oldest is dropped.  batch_frames: frames encoded per call.
    drop_oldest: False makes the reader wait instead (offline replay, tests).
    incremental_kv: keep the memory's KV cache between questions (see `IncrementalKV`).
    """

    model: str | None = None
    method: str = "none"
    retain: float | None = None
    max_tokens: int | None = None
    fps: float | None = 2.0
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    queue_frames: int = 32
    batch_frames: int = 8
    drop_oldest: bool = True
    max_new_tokens: int = 16
    stats_interval: float = 1.0
    max_frames: int | None = None
    threads: int = 1
    seed: int = 0
    incremental_kv: bool = False


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


def kv_cache_bytes(lm_config: Any, dtype: torch.dtype, tokens: int) -> int:
    """Estimated KV cache size: tokens x layers x 2 (K, V) x kv_heads x head_dim x dtype size."""
    heads = lm_config.num_attention_heads
    kv_heads = getattr(lm_config, "num_key_value_heads", None) or heads
    head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // heads
    size = torch.tensor([], dtype=dtype).element_size()
    return tokens * lm_config.num_hidden_layers * 2 * kv_heads * head_dim * size


class DropOldestQueue:
    """A bounded FIFO. When full, `put` drops the oldest item (counted in `dropped`) or, with
    `drop=False`, waits for room. `close()` wakes everyone; `get_batch` then drains what is left."""

    def __init__(self, maxsize: int, drop: bool = True) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize, self.drop = maxsize, drop
        self._items: deque = deque()
        self._cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Queue `item`; False if the queue was closed."""
        with self._cond:
            while not self.drop and len(self._items) >= self.maxsize and not self.closed:
                self._cond.wait()
            if self.closed:
                return False
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get_batch(self, max_items: int, timeout: float) -> list:
        """Up to `max_items` oldest items; waits up to `timeout` s for the first one."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            if batch:
                self._cond.notify_all()
            return batch

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def take_dropped(self) -> int:
        """Drops since the last call (the caller moves them into its own counter)."""
        with self._cond:
            dropped, self.dropped = self.dropped, 0
            return dropped

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def _load(model: str | None, threads: int, adapter: Any = None, attn_implementation: str | None = None) -> Any:
    from streamprune.cli import load_model

    torch.set_num_threads(threads)
    return adapter if adapter is not None else load_model(model, attn_implementation)


def unit_recipe(method: str, retain: float | None, max_tokens: int | None) -> Any:
    """The pruning pipeline applied to each unit; only pre-LLM stages make sense there."""
    from streamprune.errors import ConfigError
    from streamprune.pruning.recipe import build_recipe

    recipe = build_recipe(method, retain=retain, max_tokens=max_tokens)
    if recipe.inner_llm is not None or recipe.encoder_options:
        raise ConfigError(f"method {method!r} has a stage inside the LLM or the vision encoder; live memory "
                          "prunes each frame before the LLM, so use a pre-LLM method (see `streamprune methods`)")
    return recipe


def check_model(model: str | None) -> None:
    """Fail here, with a one-line ModelError, rather than inside a Ray actor."""
    from streamprune.config import resolve_model
    from streamprune.errors import ModelError

    path = resolve_model(model).path
    if path is not None and not (Path(path) / "config.json").is_file():
        raise ModelError(f"model path {path!r} does not exist or has no config.json")


class EncodeStage:
    """Frames -> MemoryUnits: the adapter's vision encoder, then the configured method on each
    unit (the per-frame budget is `retain` of one unit's tokens)."""

    def __init__(self, model: str | None, method: str = "none", retain: float | None = None,
                 max_tokens: int | None = None, seed: int = 0, threads: int = 1, adapter: Any = None) -> None:
        from streamprune.pruning.base import PruneContext

        self.recipe = unit_recipe(method, retain, max_tokens)
        self.adapter = _load(model, threads, adapter)
        self.ctx = PruneContext(seed=seed)

    def unit_frames(self) -> int:
        """Frames per memory unit: Qwen2.5-VL encodes `temporal_patch_size` frames as one."""
        vision = self.adapter.model.config.vision_config
        return int(getattr(vision, "temporal_patch_size", 1)) if self.adapter.family == "qwen2_5_vl" else 1

    @torch.inference_mode()
    def process(self, frames: list[Frame], fps: float) -> EncodedChunk:
        """`frames` (a multiple of `unit_frames()`, same size) -> one MemoryUnit per unit."""
        start = time.perf_counter()
        clip = np.stack([f.image for f in frames])
        video = self.adapter.encode(clip, fps=fps, signals=self.recipe.requires)
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
            units.append(MemoryUnit(features=kept.features.float().contiguous(), hw=kept.thw[:, 1:].clone(),
                                    frame=first.index, timestamp=first.timestamp,
                                    tokens_before_pruning=per_unit))
        encode_ms = (time.perf_counter() - start) * 1000
        return EncodedChunk(units=units, newline=video.always_kept.float(), encode_ms=encode_ms)

    def pid(self) -> int:
        return os.getpid()


class _LastQueryAttention:
    """Captures, during one prefill, the head-averaged attention of the last prompt token to the
    visual tokens at one decoder layer (a side computation on the layer's input; the main pass
    keeps its attention kernel). With a `cache`, the layer's cached keys come first in the row
    (the question is prefilled on top of cached memory)."""

    def __init__(self, adapter: Any, layer: int, visual_slots: torch.Tensor, cache: Any = None) -> None:
        self.index = layer
        self.layer = adapter.language_model.layers[layer]
        self.slots = visual_slots
        self.cache = cache
        self.value: torch.Tensor | None = None

    def __enter__(self) -> _LastQueryAttention:
        self._handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.value is not None or hidden.shape[1] < 2:  # prefill only, not decode steps
            return
        attn = module.self_attn
        x = module.input_layernorm(hidden)[0]  # [L, C]
        length, heads = x.shape[0], attn.config.num_attention_heads
        cos, sin = (r[0] for r in kwargs["position_embeddings"])  # [L, d]
        q = _rotate(attn.q_proj(x[-1:]).view(1, heads, -1).transpose(0, 1), cos[-1:], sin[-1:])  # [H, 1, d]
        k = _rotate(attn.k_proj(x).view(length, -1, attn.head_dim).transpose(0, 1), cos, sin)  # [Hkv, L, d]
        if self.cache is not None and self.cache.get_seq_length():
            k = torch.cat([self.cache.layers[self.index].keys[0], k], dim=1)  # cached keys are rotated
        k = k.repeat_interleave(heads // k.shape[0], dim=0)
        probs = torch.softmax((q.float() @ k.float().transpose(1, 2)) * attn.scaling, dim=-1)  # [H, 1, S]
        self.value = probs.mean(dim=0)[0, self.slots]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class IncrementalKV:
    """The LLM's KV cache of [prompt prefix | memory tokens], kept in step with a StreamingMemory
    (it is the memory's `MemoryListener`), so a question only prefills its own tokens.

    Each arriving unit is prefilled on top of the cache (its tokens attend to the prompt prefix and
    to the memory before them, as in ReKV / StreamingVLM streaming prefill); evicted tokens are
    removed from every layer's K/V; a merge averages the members' K and V into the anchor's with
    the merge weights (an approximation: the true K/V of the averaged feature would need the
    prefix re-run). Positions are 1-D and keep counting up, so evicted tokens leave gaps and the
    distance to old tokens grows over a long stream. A question's tokens go on top, are answered
    greedily and are cropped off again.

    Only for 1-D RoPE families (LLaVA-OneVision) whose prompt prefix does not depend on the
    question.
    """

    def __init__(self, adapter: Any) -> None:
        from transformers import DynamicCache

        from streamprune.errors import ConfigError

        if adapter.family != "llava_onevision":
            raise ConfigError(f"incremental KV needs 1-D positions; {adapter.family} uses M-RoPE")
        self.adapter = adapter
        self.prefix = adapter.prompt_ids("").prefix
        if adapter.prompt_ids("?").prefix != self.prefix:
            raise ConfigError("incremental KV needs a prompt whose text before the video is fixed")
        self.cache = DynamicCache()
        self.next_position = 0
        if self.prefix:
            self._prefill(adapter._embed(self.prefix))
        self.prefix_len = len(self.prefix)

    def _prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.next_position, self.next_position + embeds.shape[0])[None]
        self.next_position += embeds.shape[0]
        return self.adapter.forward_layers(embeds, positions, self.cache)

    @torch.inference_mode()
    def appended(self, features: torch.Tensor) -> None:
        self._prefill(features)

    @torch.inference_mode()
    def merged(self, anchor: torch.Tensor, member: torch.Tensor, anchor_weight: torch.Tensor,
               member_weight: torch.Tensor) -> None:
        a, m = anchor + self.prefix_len, member + self.prefix_len
        total = torch.zeros(int(a.max()) + 1).index_add_(0, a, member_weight)[a] + anchor_weight  # per pair
        for layer in self.cache.layers:
            for cached in (layer.keys, layer.values):
                x = cached[0]  # [H, S, d]
                sums = x[:, a] * anchor_weight[None, :, None].to(x.dtype)
                x[:, a] = sums  # weighted sum of the anchor, then the members added below
                x.index_add_(1, a, x[:, m] * member_weight[None, :, None].to(x.dtype))
                x[:, a] = x[:, a] / total[None, :, None].to(x.dtype)

    @torch.inference_mode()
    def compacted(self, keep: torch.Tensor) -> None:
        rows = torch.cat([torch.arange(self.prefix_len), keep + self.prefix_len])
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, rows]
            layer.values = layer.values[:, :, rows]

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def answer(self, question: str, newline: torch.Tensor, tokens: int, max_new_tokens: int,
               attention_layer: int) -> tuple[str, torch.Tensor | None]:
        """Greedy answer on top of the cached memory of `tokens` visual tokens, plus the last
        question token's attention to them; the cache is left as it was."""
        prompt = self.adapter.prompt_ids(question)
        kept, position = self.length, self.next_position
        embeds = torch.cat([newline.to(self.adapter.language_model.dtype), self.adapter._embed(prompt.suffix)])
        slots = self.prefix_len + torch.arange(tokens)
        try:
            with _LastQueryAttention(self.adapter, attention_layer, slots, self.cache) as attention:
                hidden = self._prefill(embeds)
            out: list[int] = []
            next_id = int(self.adapter.logits(hidden[-1]).argmax())
            while next_id not in self.adapter.eos_ids and len(out) < max_new_tokens:
                out.append(next_id)
                if len(out) == max_new_tokens:
                    break
                hidden = self._prefill(self.adapter._embed([next_id]))
                next_id = int(self.adapter.logits(hidden[-1]).argmax())
        finally:
            for layer in self.cache.layers:  # drop the question and answer tokens again
                layer.keys, layer.values = layer.keys[:, :, :kept], layer.values[:, :, :kept]
            self.next_position = position
        text = self.adapter.tokenizer.decode(out, skip_special_tokens=True).strip()
        return text, attention.value


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
                 incremental_kv: bool = False) -> None:
        from streamprune.pruning.recipe import build_recipe

        self.adapter = _load(model, threads, adapter, None)
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
            self.memory.credit_attention(snap.uid, attention)
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
        with self._answer_lock, _LastQueryAttention(self.adapter, self.attention_layer, slots) as attention:
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
        adapter = _load(config.model, config.threads) if config.incremental_kv else None
        self.encoder = EncodeStage(config.model, config.method, config.retain, config.max_tokens, config.seed,
                                   config.threads, adapter=adapter)
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
        check_model(config.model)
        self._ray = ray
        encoder_cls = ray.remote(EncodeStage).options(max_restarts=-1, max_task_retries=task_retries, num_cpus=0)
        memory_cls = ray.remote(MemoryStage).options(max_concurrency=2, num_cpus=0)
        self.encoder = encoder_cls.remote(config.model, config.method, config.retain, config.max_tokens,
                                          config.seed, config.threads)
        self.memory = memory_cls.remote(config.model, config.memory, config.max_new_tokens, None, config.threads,
                                        None, config.incremental_kv)
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


@dataclass
class LiveStats:
    """Counters of one run (the JSON stats lines are snapshots of these)."""

    frames_in: int = 0  # frames read from the source
    frames_sampled: int = 0  # kept by fps sampling, queued for the encoder
    frames_processed: int = 0  # in the memory
    frames_dropped: int = 0  # dropped oldest-first when the model fell behind, or lost with a failed batch
    stage_failures: int = 0
    tokens: int = 0
    tokens_max: int = 0  # highest token count after any unit since the run started
    kv_cache_bytes: int = 0
    rss_bytes: int = 0  # process holding the memory
    driver_rss_bytes: int = 0
    stream_time: float = 0.0
    latency_ms_mean: float = 0.0  # frame queued -> in memory, over the last interval
    latency_ms_max: float = 0.0
    fps_processed: float = 0.0
    merged: int = 0
    evicted: int = 0
    source_dropped: int = 0
    source_malformed: int = 0


class LiveRunner:
    """Runs a stream through `stages` in background threads; `ask` answers at any time.

    The source thread samples frames to `config.fps` and queues them; the worker encodes batches
    and adds them to the memory; a JSON stats line goes to `stats_path` every `stats_interval` s.
    """

    def __init__(self, source: FrameSource, stages: Stages, config: LiveConfig,
                 stats_path: str | Path | None = None) -> None:
        self.source, self.stages, self.config = source, stages, config
        self.queue = DropOldestQueue(config.queue_frames, drop=config.drop_oldest)
        self.stats = LiveStats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._stats_file = open(stats_path, "a") if stats_path else None
        self._lat: list[float] = []
        self._last_sample = (time.monotonic(), 0)
        self._fps = config.fps or 30.0
        self._threads = [threading.Thread(target=self._guard(self._read), name="live-source", daemon=True),
                         threading.Thread(target=self._guard(self._work), name="live-encode", daemon=True)]
        self.source_done = threading.Event()
        self.worker_done = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LiveRunner:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop reading, drop what is queued, end the threads."""
        self._stop.set()
        self.source.close()
        self.queue.close()
        with self._progress:
            self._progress.notify_all()
        for t in self._threads:
            t.join(timeout=30)
        self._write_stats()
        if self._stats_file:
            self._stats_file.close()
            self._stats_file = None

    def wait_stream_end(self, timeout: float | None = None) -> bool:
        """Block until the source ended and every queued frame is in memory (or failed)."""
        return self.worker_done.wait(timeout)

    def wait_for(self, predicate: Callable[[LiveStats], bool], timeout: float) -> bool:
        """Wait until `predicate(stats)` holds, the run failed or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while not predicate(self.stats):
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None or self.worker_done.is_set() or self._stop.is_set():
                    return predicate(self.stats)
                self._progress.wait(min(left, 0.5))
        return True

    def _guard(self, target):
        def run() -> None:
            try:
                target()
            except BaseException as e:  # surfaced to the caller through self.error / ask
                log.error("%s failed: %s", threading.current_thread().name, e)
                self.error = e
                self._stop.set()
                self.queue.close()
                self.source.close()
            finally:
                with self._progress:
                    self._progress.notify_all()
        return run

    # -- stages ----------------------------------------------------------------------------------
    def _read(self) -> None:
        fps, due = self.config.fps, None
        limit = self.config.max_frames
        try:
            for frame in self.source:
                if limit is not None and self.stats.frames_in >= limit:
                    break
                self.stats.frames_in += 1
                if fps is not None:  # keep a frame per 1/fps of stream time; after a gap restart the grid
                    if due is not None and frame.timestamp + 1e-6 < due:
                        continue
                    due = (frame.timestamp if due is None else due) + 1.0 / fps
                    if due <= frame.timestamp:
                        due = frame.timestamp + 1.0 / fps
                self.stats.frames_sampled += 1
                if not self.queue.put((frame, time.monotonic())):
                    break
        finally:
            self.source_done.set()
            self.queue.close()

    def _work(self) -> None:
        carry: list[tuple[Frame, float]] = []
        unit = self.stages.unit_frames
        try:
            while not self._stop.is_set():
                batch = self.queue.get_batch(self.config.batch_frames, timeout=0.1)
                if not batch:
                    if self.queue.closed and not len(self.queue):
                        break
                    continue
                items = carry + batch
                usable = len(items) - len(items) % unit
                carry = items[usable:]
                if usable:
                    self._process(items[:usable])
                self._sample()
        finally:
            # a trailing half unit cannot be encoded; frames still queued at stop are never processed
            self.stats.frames_dropped += len(carry) + len(self.queue.get_batch(self.config.queue_frames, 0))
            self.stats.frames_dropped += self.queue.take_dropped()
            self.worker_done.set()

    def _process(self, items: list[tuple[Frame, float]]) -> None:
        frames = [f for f, _ in items]
        try:
            result = self.stages.encode_add(frames, self._fps)
        except StageFailed as e:
            self.stats.stage_failures += 1
            self.stats.frames_dropped += len(frames)
            log.warning("lost %d frames: %s", len(frames), e)
            return
        s = self.stats
        s.frames_processed += len(frames)
        s.tokens = result["tokens"]
        s.tokens_max = max(s.tokens_max, result["tokens_peak"])
        s.kv_cache_bytes = result["kv_cache_bytes"]
        s.rss_bytes = result["rss_bytes"]
        s.stream_time = result["stream_time"]
        s.merged, s.evicted = result["merged"], result["evicted"]
        done = time.monotonic()
        self._lat.extend((done - arrived) * 1000 for _, arrived in items)
        with self._progress:
            self._progress.notify_all()

    def _sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sample[0] < self.config.stats_interval:
            return
        self._write_stats(now)

    def _write_stats(self, now: float | None = None) -> None:
        now = now or time.monotonic()
        s = self.stats
        s.frames_dropped += self.queue.take_dropped()
        last_t, last_n = self._last_sample
        s.fps_processed = (s.frames_processed - last_n) / (now - last_t) if now > last_t else 0.0
        lat, self._lat = self._lat, []
        s.latency_ms_mean = float(np.mean(lat)) if lat else 0.0
        s.latency_ms_max = float(np.max(lat)) if lat else 0.0
        s.driver_rss_bytes = process_rss()
        s.source_dropped, s.source_malformed = self.source.stats.dropped, self.source.stats.malformed
        self._last_sample = (now, s.frames_processed)
        if self._stats_file:
            self._stats_file.write(json.dumps({"time": round(time.time(), 3), **asdict(s)}) + "\n")
            self._stats_file.flush()

    # -- questions -------------------------------------------------------------------------------
    def ask(self, question: str, at: float | None = None, timeout: float = 60.0) -> LiveAnswer:
        """Answer `question` from the memory now, or once the stream reached `at` seconds."""
        if not self.wait_for(lambda s: s.frames_processed > 0 and (at is None or s.stream_time >= at), timeout):
            if self.error is not None:
                raise self.error
            if not self.stats.frames_processed:
                raise InputError("no frames reached the memory; is the source producing frames?")
        if self.error is not None:
            raise self.error
        return self.stages.ask(question)

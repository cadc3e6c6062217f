"""The memory stage of a stream: the bounded `StreamingMemory` (memory/streaming.py), its optional
`IncrementalKV` (memory/kv_cache.py) and the LLM answering questions from it.

An answer re-prefills the LLM from a snapshot of the memory. The memory is not one clip (units
arrive at stream times and lose tokens as they age), so the family lays its tokens out itself
(`VideoLLMAdapter.memory_layout`: Qwen2.5-VL's M-RoPE gets each token's time and grid position,
LLaVA-OneVision's 1-D positions the tokens in time order). The method's inner-LLM stage, which has
no prefill to act in on the encoder side, runs in each answer's prefill."""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from transformers import DynamicCache

from streamprune.config import DeviceConfig, MemoryConfig
from streamprune.errors import ConfigError, InputError
from streamprune.memory import MemoryUnit, StreamingMemory
from streamprune.memory.kv_cache import IncrementalKV, kv_cache_bytes
from streamprune.memory.streaming import MemorySnapshot
from streamprune.models.attention import last_query_attention
from streamprune.models.base import EncodedVideo, Timer
from streamprune.models.generate import greedy_decode
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.primitives import topk_stable
from streamprune.pruning.recipe import PruningRecipe, build_recipe
from streamprune.types import Selection, VisualTokens


@dataclass
class EncodedChunk:
    """The MemoryUnits of the segments that closed during one encoder call, the family's
    always-kept tokens, and what the encoder side did (for the stream's stats)."""

    units: list[MemoryUnit]
    newline: torch.Tensor
    encode_ms: float
    select_ms: float = 0.0
    cacher: Any = None  # CacherStats of this call, when the recipe has an STC-Cacher
    segments_closed: int = 0  # since the stream started
    open_units: int = 0  # units waiting in the open segment
    grid: tuple[int, int] | None = None  # one unit's (h, w) token grid before pruning; None: the memory infers it


@dataclass
class LiveAnswer:
    """An answer and the stretch of stream it is about (seconds of stream time)."""

    question: str
    text: str
    stream_time: float  # newest frame in the memory the answer was built from
    memory_start: float  # oldest frame still represented
    visual_tokens: int  # memory tokens the answer was built from (fewer than held with retain < 1)
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens_after_inner: int | None = None  # visual tokens the inner-LLM stage left (None: no inner stage)
    retain: float = 1.0  # share of the memory's tokens the answer was asked to use
    memory_tokens: int = 0  # tokens the memory held when asked
    answer_tokens: int = 0  # tokens generated


def answer_recipe(recipe: PruningRecipe) -> PruningRecipe:
    """The part of the stream's `recipe` an answer runs: its inner-LLM stage alone, since the
    encoder stage already ran the encoder and pre-LLM stages on every segment. Where those pruned,
    the memory's tokens already carry the budget and the inner stage applies its own ratio to them,
    as `PruningRecipe.inner_budget` has it after pre-LLM pruning offline; otherwise the inner stage
    carries the recipe's budget, counted on the memory's tokens."""
    upstream_pruned = any(m.name != "none" for m in recipe.pre_llm)
    budget = Budget(retain=1.0) if upstream_pruned else recipe.budget
    return PruningRecipe(name=recipe.name, budget=budget, inner_llm=recipe.inner_llm)


def answer_share(retain: float | None) -> float:
    """An answer-time retain as the share of the memory used: None or >= 1 is all of it."""
    if retain is None:
        return 1.0
    if not retain > 0.0:  # also NaN
        raise ConfigError(f"answer retain must be > 0, got {retain}")
    return min(float(retain), 1.0)


def best_scored(snap: MemorySnapshot, scores: torch.Tensor, k: int) -> MemorySnapshot:
    """The `k` tokens of `snap` with the highest `scores [M]` (ties: the older), in time order."""
    keep = torch.sort(topk_stable(scores, k)).values
    per_token = {f.name: getattr(snap, f.name)[keep] for f in fields(snap) if f.name != "newline"}
    return replace(snap, **per_token)


class QuestionAttention:
    """The last prompt token's head-averaged attention to the memory's tokens at one decoder
    layer (A2SF's score, `attention.last_query_attention` on the layer's input), read beside the
    prefill through `forward_layers`' layer tap, so the main pass keeps its attention kernel.

    An inner stage may have merged or dropped tokens before that layer: a survivor's attention
    goes to the memory token it stands for (a merge's anchor), a token gone drew none. The
    survivors are read as the layer's attention starts, since a stage acting inside the layer
    (FrameFusion) changes them before the tap runs."""

    def __init__(self, adapter: Any, layer: int, visual_slots: torch.Tensor, inner: Any = None) -> None:
        self.index = layer
        self.layer = adapter.language_model.layers[layer]
        self.slots = visual_slots
        self.inner = inner
        self.value: torch.Tensor | None = None
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> QuestionAttention:
        self._handle = self.layer.self_attn.register_forward_pre_hook(self._survivors) if self.inner else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _survivors(self, module: torch.nn.Module, args: tuple) -> None:
        if self._seen is None:  # the prefill's call, not a decode step's
            self._seen = (self.inner.survivors.clone(), self.inner.survivor_slots.clone())

    def tap(self, index: int, layer: torch.nn.Module, hidden_in: torch.Tensor, rope: tuple, cache: Any) -> None:
        if index != self.index or self.value is not None:
            return
        row = last_query_attention(layer, hidden_in, rope)
        if self.inner is None:
            self.value = row[self.slots]
            return
        survivors, slots = self._seen
        self.value = row.new_zeros(self.slots.numel()).index_copy_(0, survivors, row[slots])


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
    answered, since both extend the same cache.
    method, retain, max_tokens: the stream's pruning recipe (as the encoder stage got it); only its
    inner-LLM stage runs here (`answer_recipe`), in each answer's prefill."""

    def __init__(self, model: str | None, memory: MemoryConfig, max_new_tokens: int = 16,
                 attention_layer: int | None = None, threads: int = 1, adapter: Any = None,
                 incremental_kv: bool = False, placement: DeviceConfig | None = None, *, method: str = "none",
                 retain: float | None = None, max_tokens: int | None = None) -> None:
        self.adapter = load_stage_model(model, threads, adapter, placement)
        recipe = build_recipe(method, retain=retain, max_tokens=max_tokens, variants=self.adapter.method_variants)
        self.recipe = answer_recipe(recipe)
        if incremental_kv and self.recipe.inner_llm is not None:
            raise ConfigError(f"method {method!r} prunes inside the LLM, which the incremental KV cache never "
                              "re-runs; drop --incremental-kv or use a pre-LLM method")
        self.max_new_tokens = max_new_tokens
        layers = len(self.adapter.language_model.layers)
        self.attention_layer = layers // 2 if attention_layer is None else min(attention_layer, layers - 1)
        self.kv = IncrementalKV(self.adapter) if incremental_kv else None
        self.memory = StreamingMemory(memory, self.adapter.language_model.config.hidden_size, listener=self.kv)
        self.fps = 1.0
        self.frames = 0
        self.stream_time = 0.0
        # the first unit's stream time: temporal positions count from it, so they stay put as old tokens leave
        self.origin: float | None = None
        self.grid: tuple[int, int] | None = None  # one unit's token grid before pruning
        self._answer_lock = threading.Lock()

    def add(self, chunk: EncodedChunk, fps: float) -> dict[str, Any]:
        """Append a chunk's units; returns what the stats line needs (tokens, latency, RSS)."""
        self._note_stream(chunk)
        if not self.memory.newline.numel() and chunk.newline.numel():
            self.memory.newline = chunk.newline.clone()
        self.fps = fps
        peak = 0
        for unit in chunk.units:
            self.memory.append(unit)
            peak = max(peak, len(self.memory))
            self.stream_time = unit.timestamp
        self.frames += len(chunk.units)
        cacher = chunk.cacher
        return {"tokens": len(self.memory), "tokens_peak": peak, "rss_bytes": process_rss(),
                "stream_time": self.stream_time, "encode_ms": chunk.encode_ms, "select_ms": chunk.select_ms,
                "units_added": len(chunk.units), "segments_closed": chunk.segments_closed,
                "open_units": chunk.open_units,
                "cacher_frames": cacher.frames if cacher else 0, "cacher_hits": cacher.cache_hits if cacher else 0,
                "cacher_scene_cuts": cacher.scene_cut_refreshes if cacher else 0,
                "flops_full": cacher.flops_full if cacher else 0.0,
                "flops_spent": cacher.flops_spent if cacher else 0.0,
                "kv_cache_bytes": self.kv_bytes(len(self.memory) + self.memory.newline.shape[0]),
                "merged": self.memory.merged, "evicted": self.memory.evicted}

    def _note_stream(self, chunk: EncodedChunk) -> None:
        """The stream's origin, and a unit's token grid before pruning (where M-RoPE text resumes
        after the video): the chunk's, else the extent of every unit seen, which reaches the grid
        as soon as some unit kept a token in its last row and one in its last column."""
        if self.origin is None and chunk.units:
            self.origin = chunk.units[0].timestamp
        if chunk.grid is not None:
            self.grid = chunk.grid
            return
        for unit in chunk.units:
            if unit.hw.numel():
                h, w = (int(x) + 1 for x in unit.hw.max(dim=0).values)
                self.grid = (h, w) if self.grid is None else (max(h, self.grid[0]), max(w, self.grid[1]))

    def kv_bytes(self, tokens: int) -> int:
        lm = self.adapter.language_model
        return kv_cache_bytes(lm.config, lm.dtype, tokens)

    @torch.inference_mode()
    def ask(self, question: str, retain: float | None = None) -> LiveAnswer:
        """Answer from the memory as it is now; credits the question's attention back (A2SF).

        `retain` < 1 answers from only the ceil(retain * M) tokens of highest A2SF score (in time
        order), the tokens past questions drew most attention to: the prefill grows with the
        memory, so this is the knob a latency target turns."""
        start = time.perf_counter()
        share = answer_share(retain)
        if self.kv is not None:
            if share < 1.0:
                raise ConfigError("an answer-time retain needs the re-prefill answer; the incremental KV cache "
                                  "holds the whole memory")
            with self.memory.lock:  # the stream waits: the question extends the shared cache
                snap = self.memory.snapshot()
                if not len(snap):
                    raise InputError("no frames in memory yet")
                text, attention = self.kv.answer(question, snap.newline, len(snap), self.max_new_tokens,
                                                 self.attention_layer)
            held, timings, after_inner = len(snap), {}, None
            generated = len(self.adapter.tokenizer(text, add_special_tokens=False).input_ids)
        else:
            with self.memory.lock:  # scores of exactly the snapshot's tokens
                snap = self.memory.snapshot()
                scores = self.memory.scores().clone()
            if not len(snap):
                raise InputError("no frames in memory yet")
            held = len(snap)
            if share < 1.0:
                snap = best_scored(snap, scores, math.ceil(share * held))
            text, generated, attention, timings, after_inner = self._reprefill_answer(question, snap)
        if attention is not None:
            self.memory.credit_attention(snap.uid, attention.float().cpu())
        return LiveAnswer(question=question, text=text, stream_time=snap.stream_time,
                          memory_start=snap.start_time, visual_tokens=len(snap),
                          latency_ms=(time.perf_counter() - start) * 1000, timings_ms=timings,
                          tokens_after_inner=after_inner, retain=share, memory_tokens=held, answer_tokens=generated)

    def _reprefill_answer(self, question: str, snap: MemorySnapshot
                          ) -> tuple[str, int, torch.Tensor | None, dict[str, float], int | None]:
        """Prefill [prompt | snapshot tokens | question] from scratch and decode greedily; ->
        (text, tokens generated, the question's attention `[M]` to the snapshot's tokens, timings, visual tokens the
        inner stage left or None)."""
        adapter = self.adapter
        layout = adapter.memory_layout(snap.features, snap.thw[:, 1:], snap.ts - self.origin, snap.newline,
                                       adapter.prompt_ids(question), grid=self.grid)
        inner = None
        if self.recipe.inner_llm is not None:
            video = EncodedVideo(tokens=self._tokens(snap), always_kept=snap.newline, fps=self.fps)
            every = Selection(indices=torch.arange(len(snap), device=adapter.device))
            inner = adapter.inner_stage(self.recipe, video, every, layout.visual_slots, layout.embeds, PruneContext())
        timer = Timer(adapter.device)
        cache = DynamicCache()
        probe = QuestionAttention(adapter, self.attention_layer, layout.visual_slots, inner)
        with self._answer_lock, probe:
            with timer("prefill"):
                hidden = adapter.forward_layers(layout.embeds, layout.positions, cache, inner, after_layer=probe.tap)
                first = adapter.logits(hidden[-1])
            with timer("decode"):
                step = adapter.decoder_step(cache, layout.positions.shape[0], layout.next_position)
                out = greedy_decode(first, step, self.max_new_tokens, adapter.eos_ids)
        text = adapter.tokenizer.decode(out, skip_special_tokens=True).strip()
        return text, len(out), probe.value, dict(timer.ms), inner.kept if inner is not None else None

    def _tokens(self, snap: MemorySnapshot) -> VisualTokens:
        """The snapshot as the inner stage sees it: t = the unit's rank in the snapshot, (h, w) on
        the unit grid (FrameFusion matches tokens of one patch across units)."""
        _, unit = torch.unique_consecutive(snap.thw[:, 0], return_inverse=True)
        thw = torch.cat([unit[:, None], snap.thw[:, 1:]], dim=1)
        h, w = self.grid or (int(thw[:, 1].max()) + 1, int(thw[:, 2].max()) + 1)
        return VisualTokens(features=snap.features, thw=thw, grid=(int(unit.max()) + 1, h, w))

    def tokens_per_frame(self) -> dict[int, int]:
        return self.memory.tokens_per_frame()

    def frames_covered(self) -> torch.Tensor:
        return self.memory.frames_covered()

    def pid(self) -> int:
        return os.getpid()

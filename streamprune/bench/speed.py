"""Speed at the shapes of public checkpoints: each method x retain timed phase by phase in one run.

The model is the real transformers class with a public checkpoint's exact config (configs/shapes),
randomly initialised on the device (`--layers` shortens the decoder on small machines), with the
checkpoint's processor settings and a locally built tokenizer; the clip is a synthetic moving-shapes
stream with one scene cut, written as H.264 and decoded with PyAV when PyAV is installed. Each
distinct encoder stage (plain, with a side signal, with an STC-Cacher) is timed once and shared by
its rows; per row, after a warm-up, the median of `repeats` runs of prune -> prefill -> first token
-> `decode_tokens` greedy tokens, each phase timed with CUDA events on a GPU. An inner-LLM stage's
own work (its attention row and choice) counts as prune, not prefill. Next to each prefill speed-up
stands the FLOPs ratio, so the reader sees how much of what pruning can give the runtime delivers.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

from streamprune.bench.accuracy import prefill_flops
from streamprune.pruning.recipe import encoder_key
from streamprune.models.base import EncodedVideo, VideoLLMAdapter
from streamprune.models.generate import greedy_decode
from streamprune.models.placement import Placement
from streamprune.outputs import output_file, write_text
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe

log = logging.getLogger(__name__)
QUESTION = "What happens in the video? Answer in one sentence."


@dataclass
class SpeedRow:
    method: str
    retain: float
    visual_tokens_in: int
    visual_tokens_kept: int
    encode_ms: float  # the recipe's encoder stage (STC-Cacher included when it has one)
    prune_ms: float  # selection before the LLM plus any inner-LLM stage's own work
    prefill_ms: float
    ttft_ms: float  # encode + prune + prefill + first token
    decode_ms_per_token: float
    kv_bytes: int  # bytes of the KV cache after the prefill
    peak_memory_bytes: int | None  # CUDA peak allocated during the row (None on CPU)
    prefill_flops_ratio: float
    prefill_speedup: float = 1.0
    ttft_speedup: float = 1.0
    share_of_flops_speedup: float = 1.0  # prefill speed-up / (1 / FLOPs ratio)
    prune_share_of_prefill: float = 0.0  # prune_ms / the unpruned prefill


class PhaseClock:
    """Milliseconds per phase of one run: CUDA events on a GPU (read after one synchronisation),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, Any]] = []

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
        else:
            start = time.perf_counter()
            out = fn()
            end = time.perf_counter()
        self.marks.append((name, start, end))
        return out

    def read(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        ms: dict[str, float] = {}
        for name, start, end in self.marks:
            took = start.elapsed_time(end) if self.cuda else (end - start) * 1000
            ms[name] = ms.get(name, 0.0) + took
        return ms


def synthetic_clip(frames: int, width: int = 640, height: int = 360) -> np.ndarray:
    """`[T, H, W, 3]` moving shapes with one scene cut half-way (static stretches and a cut, so
    temporal methods and the cacher see both)."""
    from streamprune.sources.synthetic import SyntheticConfig, SyntheticSource

    source = SyntheticSource(SyntheticConfig(width=width, height=height, scene_every=max(1, frames // 2)),
                             realtime=False)
    return np.stack([source.frame(i) for i in range(frames)])


def time_video_decode(clip: np.ndarray, repeats: int, workdir: Path) -> float | None:
    """Median ms to decode the clip back from H.264 with our decoder, or None without PyAV."""
    try:
        from streamprune.decode import decode_frames
        from streamprune.videofile import write_video
    except ImportError:
        log.info("PyAV is not installed: video decode is not timed")
        return None
    path = write_video(workdir / "speed.mp4", clip, fps=len(clip) / 8.0)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        decode_frames(path, max_frames=len(clip))
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


@torch.inference_mode()
def time_encode(adapter: VideoLLMAdapter, clip: np.ndarray, recipe: PruningRecipe, repeats: int, warmup: int = 1,
                fps: float = 1.0) -> tuple[EncodedVideo, float]:
    """The recipe's encoding of the clip (a fresh STC-Cacher per run) and its median ms after the warm-up."""
    times, video = [], None
    for _ in range(warmup + repeats):
        clock = PhaseClock(adapter.device)
        video = clock.phase("encode", lambda: adapter.encode_for(clip, recipe, fps=fps))
        times.append(clock.read()["encode"])
    return video, statistics.median(times[warmup:])


@torch.inference_mode()
def _one_run(adapter: VideoLLMAdapter, video: EncodedVideo, recipe: PruningRecipe,
             decode_tokens: int) -> tuple[dict[str, float], dict[str, Any]]:
    clock = PhaseClock(adapter.device)
    ctx = PruneContext(seed=0)
    selection = clock.phase("prune", lambda: recipe.select(video.tokens, ctx))
    layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
    embeds, positions, kept_slots = layout.keep(selection)
    inner = adapter.inner_stage(recipe, video, selection, kept_slots, embeds, ctx)
    if inner is not None:
        inner.timed = True
    cache = DynamicCache()
    first = clock.phase("prefill", lambda: adapter.logits(adapter.forward_layers(embeds, positions, cache, inner)[-1]))
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    clock.phase("decode", lambda: greedy_decode(
        first, adapter.decoder_step(cache, positions.shape[0], layout.next_position_for(selection)), decode_tokens))
    ms = clock.read()
    if inner is not None:  # the inner stage's own work ran inside the prefill
        ms["prune"] += inner.selection_ms
        ms["prefill"] -= inner.selection_ms
    kept = inner.kept if inner is not None else len(selection)
    counts = {"in": len(video.tokens), "kept": kept, "pre_llm": len(selection), "kv": kv,
              "text": embeds.shape[0] - len(selection), "per_layer": adapter.tokens_per_layer(inner, len(selection))}
    return ms, counts


def measure(adapter: VideoLLMAdapter, video: EncodedVideo, recipe: PruningRecipe, repeats: int,
            decode_tokens: int, warmup: int = 1) -> tuple[dict[str, float], dict[str, Any], int | None]:
    """Median phase times over `repeats` runs after `warmup` untimed ones, the token counts, and the CUDA peak."""
    cuda = adapter.device.type == "cuda"
    for _ in range(warmup):
        _one_run(adapter, video, recipe, decode_tokens)
    if cuda:
        torch.cuda.reset_peak_memory_stats(adapter.device)
    runs = [_one_run(adapter, video, recipe, decode_tokens) for _ in range(repeats)]
    peak = int(torch.cuda.max_memory_allocated(adapter.device)) if cuda else None
    medians = {name: statistics.median(r[0][name] for r in runs) for name in runs[0][0]}
    return medians, runs[0][1], peak


def run_speed_bench(adapter: VideoLLMAdapter, clip: np.ndarray, methods: list[str], retains: list[float],
                    repeats: int = 3, decode_tokens: int = 16, warmup: int = 1,
                    progress: bool = False) -> list[SpeedRow]:
    """`none` first, then every method x retain; speed-ups are against `none` in this run. Each
    distinct encoder stage (plain, with a side signal, with an STC-Cacher) is encoded and timed
    once; its rows share that encoding."""
    plan = [("none", 1.0)] + [(m, r) for m in methods if m != "none" for r in retains]
    encodings: dict[tuple[str, frozenset[str]], tuple[EncodedVideo, float]] = {}
    rows: list[SpeedRow] = []
    for method, retain in tqdm(plan, desc="bench speed", unit="row", disable=not progress):
        recipe = adapter.recipe(method, retain=retain)
        key = (encoder_key(recipe), recipe.requires)  # equal encoder stage and side signals: one timed encoding
        if key not in encodings:
            encodings[key] = time_encode(adapter, clip, recipe, repeats, warmup)
        video, encode_ms = encodings[key]
        ms, counts, peak = measure(adapter, video, recipe, repeats, decode_tokens, warmup)
        per_layer = counts["per_layer"]
        flops = prefill_flops(adapter, counts["text"], per_layer) / prefill_flops(
            adapter, counts["text"], [counts["in"]] * len(per_layer))
        rows.append(SpeedRow(method=method, retain=retain, visual_tokens_in=counts["in"],
                             visual_tokens_kept=counts["kept"], encode_ms=encode_ms, prune_ms=ms["prune"],
                             prefill_ms=ms["prefill"], ttft_ms=encode_ms + ms["prune"] + ms["prefill"],
                             decode_ms_per_token=ms["decode"] / max(1, decode_tokens - 1), kv_bytes=counts["kv"],
                             peak_memory_bytes=peak, prefill_flops_ratio=flops))
    base = rows[0]
    for row in rows:
        row.prefill_speedup = base.prefill_ms / row.prefill_ms
        row.ttft_speedup = base.ttft_ms / row.ttft_ms
        row.share_of_flops_speedup = row.prefill_speedup * row.prefill_flops_ratio
        row.prune_share_of_prefill = row.prune_ms / base.prefill_ms
    return rows


def format_speed_table(rows: list[SpeedRow]) -> str:
    head = ("| method | retain | tokens kept | encode ms | prune ms | prune / prefill | prefill ms | prefill x "
            "| FLOPs x | of FLOPs | TTFT ms | TTFT x | decode ms/tok | KV MiB | peak GiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        peak = f"{r.peak_memory_bytes / 2 ** 30:.2f}" if r.peak_memory_bytes is not None else "-"
        lines.append(f"| {r.method} | {r.retain:g} | {r.visual_tokens_kept}/{r.visual_tokens_in} | {r.encode_ms:.1f} "
                     f"| {r.prune_ms:.1f} | {r.prune_share_of_prefill:.1%} | {r.prefill_ms:.1f} "
                     f"| {r.prefill_speedup:.2f} | {1 / r.prefill_flops_ratio:.2f} | {r.share_of_flops_speedup:.2f} "
                     f"| {r.ttft_ms:.1f} | {r.ttft_speedup:.2f} | {r.decode_ms_per_token:.2f} "
                     f"| {r.kv_bytes / 2 ** 20:.1f} | {peak} |")
    return "\n".join(lines)


def write_speed_json(rows: list[SpeedRow], path: str | Path, meta: dict) -> None:
    write_text(path, json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1), "--json")


def plot_speed(rows: list[SpeedRow], path: str | Path, title: str) -> None:
    """Prefill and TTFT speed-up against tokens kept, one line per method, with the FLOPs bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.4))
    colours = plt.get_cmap("tab20").colors
    for i, method in enumerate(dict.fromkeys(r.method for r in rows[1:])):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.visual_tokens_kept)
        line, = left.plot([r.visual_tokens_kept for r in mine], [r.prefill_speedup for r in mine], marker="o",
                          label=method, color=colours[i % len(colours)])
        left.plot([r.visual_tokens_kept for r in mine], [1 / r.prefill_flops_ratio for r in mine], linestyle=":",
                  color=line.get_color(), linewidth=1)
        right.plot([r.visual_tokens_kept for r in mine], [r.ttft_speedup for r in mine], marker="o", label=method,
                   color=line.get_color())
    left.plot([], [], linestyle=":", color="gray", label="FLOPs ratio (dotted)")
    left.set_ylabel("prefill speed-up vs unpruned")
    right.set_ylabel("time-to-first-token speed-up")
    for axis in (left, right):
        axis.set_xlabel("visual tokens kept")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    with output_file(path, "--plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def build_shape_adapter(shape: str, layers: int | None, placement: Placement, workdir: Path,
                        frames: int) -> VideoLLMAdapter:
    """A randomly initialised model of `shape` made directly on the device in its dtype, with the
    checkpoint's processor files and a local tokenizer written into `workdir`; first a one-line
    error if it and `frames` frames cannot fit the device."""
    import importlib

    import transformers

    from streamprune.models import FAMILIES
    from streamprune.models.placement import check_fits, estimate_memory
    from streamprune.models.shapes import load_shape_config, write_checkpoint_dir

    config = load_shape_config(shape, layers)
    module_name, adapter_name, model_class = FAMILIES[config.model_type]
    adapter_cls = getattr(importlib.import_module(module_name), adapter_name)
    model_dir = write_checkpoint_dir(shape, workdir / shape, layers=layers, weights=False)
    cls = getattr(transformers, model_class)
    dtype = placement.dtype or torch.float32
    with torch.device("meta"):
        params = sum(p.numel() for p in cls._from_config(config).parameters())
    raw = json.loads((model_dir / "config.json").read_text())
    visual, patches = adapter_cls.visual_budget(model_dir, frames)
    estimate = estimate_memory(raw.get("text_config") or raw, raw.get("vision_config") or {},
                               params * dtype.itemsize, visual, patches, dtype.itemsize)
    check_fits(estimate, placement.device, f"{shape} ({params / 1e9:.2f}B parameters) with {frames} frames")
    with torch.device(placement.device):
        model = cls._from_config(config, dtype=dtype, attn_implementation=placement.attn)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    log.info("built %s (%.2fB parameters) on %s", shape, params / 1e9, placement.describe())
    return adapter_cls(model, tokenizer, model_dir)

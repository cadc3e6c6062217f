"""Accuracy against retention: every method at every budget, in one run, on held-out synthetic QA.

Each clip is encoded once per encoder stage: once plainly, with every side signal the recipes
without an encoder stage need, and once per distinct STC-Cacher configuration (a fresh cacher per
clip, through `VideoLLMAdapter.encode_for` as every other path); then each (method, retain) prunes,
prefills and decodes from its encoding, so differences between rows come from the recipe alone.
Times are medians over the items; speedups are ratios within this one run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from streamprune.data.synthetic_qa import make_items
from streamprune.models.base import VideoLLMAdapter
from streamprune.outputs import output_file, write_text
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe, encoder_groups, encoder_key

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    method: str
    retain: float
    n: int
    accuracy: float
    accuracy_retained: float = 0.0  # accuracy / unpruned accuracy
    visual_tokens_in: float = 0.0
    visual_tokens_kept: float = 0.0
    encode_ms: float = 0.0
    vision_flops_saved: float = 0.0  # share of vision-tower FLOPs the recipe's STC-Cacher saved
    prune_ms: float = 0.0
    prefill_ms: float = 0.0
    total_ms: float = 0.0
    prefill_speedup: float = 1.0
    total_speedup: float = 1.0
    prefill_flops_ratio: float = 1.0
    per_type: dict[str, float] = field(default_factory=dict)


def prefill_flops(adapter: VideoLLMAdapter, n_text: int, visual_per_layer: list[int]) -> float:
    """FastV's per-layer cost f(n) = 4nd^2 + 2n^2 d + 2ndm summed over the LM's layers, with
    `visual_per_layer[i]` visual tokens reaching layer i (inner-LLM stages shrink it)."""
    cfg = adapter.language_model.config
    d, m = cfg.hidden_size, cfg.intermediate_size
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in (n_text + v for v in visual_per_layer))


def run_accuracy_bench(adapter: VideoLLMAdapter, methods: list[str], retains: list[float], n: int,
                       seed: int = 0, max_new_tokens: int = 4, progress: bool = True,
                       data_version: str = "3") -> list[BenchRow]:
    """Rows for `none` at retain 1 and every method x retain, on the first `n` test questions."""
    items = make_items("test", num_clips=n, version=data_version)[:n]
    while len(items) < n:  # clips carry a variable number of questions
        items = make_items("test", num_clips=2 * n, version=data_version)[:n]
    recipes: list[tuple[str, float, PruningRecipe]] = [("none", 1.0, adapter.recipe("none", retain=1.0))]
    recipes += [(m, r, adapter.recipe(m, retain=r)) for m in methods if m != "none" for r in retains]
    groups = encoder_groups([p for _, _, p in recipes])
    stats = {(m, r): {"correct": [], "kept": [], "in": [], "prune": [], "prefill": [], "total": [], "flops": [],
                      "types": {}} for m, r, _ in recipes}
    encodes: dict[str, list[float]] = {key: [] for key in groups}
    saved: dict[str, list[float]] = {key: [] for key in groups}
    bar = tqdm(total=len(items) * len(recipes), desc="bench accuracy", unit="answer", disable=not progress)
    last_clip, videos = None, {}
    for item in items:
        if item.clip is not last_clip:  # questions of one clip share its frames: encode once per encoder
            for key, (recipe, signals) in groups.items():
                start = time.perf_counter()
                videos[key] = adapter.encode_for(item.clip, recipe, fps=8.0, extra_signals=signals)
                encodes[key].append((time.perf_counter() - start) * 1000)
                stats_now = videos[key].cacher_stats
                saved[key].append(stats_now.flops_saved_share if stats_now is not None else 0.0)
            last_clip = item.clip
        prompt = adapter.prompt_ids(item.question)
        for name, retain, recipe in recipes:
            video = videos[encoder_key(recipe)]
            text_len = len(prompt.prefix) + len(prompt.suffix) + video.always_kept.shape[0]
            answer = adapter.answer_encoded(video, item.question, recipe, PruneContext(seed=seed),
                                            max_new_tokens=max_new_tokens)
            s = stats[(name, retain)]
            ok = answer.text.strip() == item.answer
            s["correct"].append(ok)
            s["types"].setdefault(item.meta.get("type", "all"), []).append(ok)
            s["kept"].append(answer.visual_tokens_kept)
            s["in"].append(answer.visual_tokens_in)
            for phase in ("prune", "prefill"):
                s[phase].append(answer.timings_ms.get(phase, 0.0))
            s["total"].append(sum(answer.timings_ms.values()))
            depth = len(answer.tokens_per_layer)
            full = prefill_flops(adapter, text_len, [answer.visual_tokens_in] * depth)
            s["flops"].append(prefill_flops(adapter, text_len, answer.tokens_per_layer) / full)
            bar.update(1)
    bar.close()
    rows = []
    for name, retain, recipe in recipes:
        s = stats[(name, retain)]
        key = encoder_key(recipe)
        encode_ms = statistics.median(encodes[key]) if encodes[key] else 0.0
        rows.append(BenchRow(
            method=name, retain=retain, n=len(s["correct"]),
            accuracy=sum(s["correct"]) / len(s["correct"]),
            visual_tokens_in=statistics.mean(s["in"]), visual_tokens_kept=statistics.mean(s["kept"]),
            encode_ms=encode_ms, vision_flops_saved=statistics.mean(saved[key]) if saved[key] else 0.0,
            prune_ms=statistics.median(s["prune"]),
            prefill_ms=statistics.median(s["prefill"]), total_ms=encode_ms + statistics.median(s["total"]),
            prefill_flops_ratio=statistics.mean(s["flops"]),
            per_type={t: sum(v) / len(v) for t, v in sorted(s["types"].items())},
        ))
    base = rows[0]
    for row in rows:
        row.accuracy_retained = row.accuracy / base.accuracy if base.accuracy else 0.0
        row.prefill_speedup = base.prefill_ms / row.prefill_ms if row.prefill_ms else 0.0
        row.total_speedup = base.total_ms / row.total_ms if row.total_ms else 0.0
    return rows


def format_table(rows: list[BenchRow]) -> str:
    head = ("| method | retain | acc | acc kept | tokens kept | encode ms | vision FLOPs saved | prefill ms "
            "| prefill x | total ms | total x | prefill FLOPs |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.method} | {r.retain:g} | {r.accuracy:.3f} | {r.accuracy_retained:.3f} | "
                     f"{r.visual_tokens_kept:.0f}/{r.visual_tokens_in:.0f} | {r.encode_ms:.1f} | "
                     f"{r.vision_flops_saved:.3f} | {r.prefill_ms:.1f} | "
                     f"{r.prefill_speedup:.2f} | {r.total_ms:.1f} | {r.total_speedup:.2f} | "
                     f"{r.prefill_flops_ratio:.3f} |")
    return "\n".join(lines)


def write_json(rows: list[BenchRow], path: str | Path, meta: dict) -> None:
    write_text(path, json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1), "--json")


def plot(rows: list[BenchRow], path: str | Path) -> None:
    """Accuracy against tokens kept and against prefill time, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = rows[0]
    for method in dict.fromkeys(r.method for r in rows[1:]):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.visual_tokens_kept)
        left.plot([r.visual_tokens_kept for r in mine], [r.accuracy for r in mine], marker="o", label=method)
        right.plot([r.prefill_ms for r in mine], [r.accuracy for r in mine], marker="o", label=method)
    for axis in (left, right):
        axis.axhline(base.accuracy, color="black", linestyle="--", linewidth=1, label="unpruned")
        axis.set_ylabel("held-out accuracy")
        axis.grid(alpha=0.3)
    left.set_xlabel("visual tokens kept per clip")
    right.set_xlabel("prefill time (ms, median)")
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy vs retention (streamprune bench accuracy)")
    fig.tight_layout()
    with output_file(path, "--plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

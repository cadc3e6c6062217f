"""Accuracy rows of `streamprune eval` from its answer lines: overall, per task type and per
duration group, for each method x retain, with the tokens kept and the retain actually reached."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from streamprune.outputs import output_file, write_text

DURATION_BUCKETS = ((120.0, "short (<2 min)"), (900.0, "medium (2-15 min)"), (float("inf"), "long (>15 min)"))


def duration_group(value: str) -> str:
    """A named group as given; seconds bucketed as VideoMME's short / medium / long."""
    try:
        seconds = float(value)
    except ValueError:
        return value
    return next(name for limit, name in DURATION_BUCKETS if seconds < limit)


def _share(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _groups(records: list[dict[str, Any]], key) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r["correct"])
    return {name: round(_share(v), 4) for name, v in sorted(groups.items())}


def eval_rows(records: list[dict[str, Any]], recipes: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """One row per (method, retain) in `recipes` order, from the latest line of each answer."""
    rows = []
    for method, retain in recipes:
        mine = [r for r in records if r["method"] == method and r["retain"] == retain]
        ok = [r for r in mine if r["status"] == "ok"]
        kept = [r["visual_tokens_kept"] for r in ok]
        rows.append({
            "method": method, "retain": retain, "n": len(ok), "errors": len(mine) - len(ok),
            "accuracy": round(_share([r["correct"] for r in ok]), 4),
            "letter_accuracy": round(_share([r["correct_letter"] for r in ok]), 4),
            "text_accuracy": round(_share([r["correct_text"] for r in ok]), 4),
            "unparsed": round(_share([r["parsed"] is None for r in ok]), 4),
            "visual_tokens_in": round(statistics.fmean(r["visual_tokens_in"] for r in ok), 2) if ok else 0.0,
            "visual_tokens_kept": round(statistics.fmean(kept), 2) if ok else 0.0,
            "retain_reached": round(statistics.fmean(r["visual_tokens_kept"] / r["visual_tokens_in"] for r in ok), 4)
            if ok else 0.0,
            "frames_mean": round(statistics.fmean(r["frames"] for r in ok), 2) if ok else 0.0,
            "by_task_type": _groups(ok, lambda r: r["task_type"]),
            "by_duration": _groups(ok, lambda r: duration_group(str(r["duration"]))),
        })
    base = next((r for r in rows if r["method"] == "none"), None)
    for row in rows:
        row["accuracy_retained"] = round(row["accuracy"] / base["accuracy"], 4) if base and base["accuracy"] else None
    return rows


def format_eval_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | retain | n | acc | acc kept | letter acc | text acc | unparsed | tokens kept | retain reached |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["accuracy_retained"] is None else f"{r['accuracy_retained']:.3f}"
        lines.append(f"| {r['method']} | {r['retain']:g} | {r['n']} | {r['accuracy']:.3f} | {kept} | "
                     f"{r['letter_accuracy']:.3f} | {r['text_accuracy']:.3f} | {r['unparsed']:.3f} | "
                     f"{r['visual_tokens_kept']:.0f}/{r['visual_tokens_in']:.0f} | {r['retain_reached']:.3f} |")
    return "\n".join(lines)


def format_group_table(rows: list[dict[str, Any]], field: str) -> str:
    names = sorted({name for r in rows for name in r[field]})
    lines = ["| method | retain | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = " | ".join(f"{r[field][n]:.2f}" if n in r[field] else "-" for n in names)
        lines.append(f"| {r['method']} | {r['retain']:g} | {cells} |")
    return "\n".join(lines)


def write_eval_json(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=1), "--json")


def plot_eval(rows: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Accuracy against visual tokens kept, one line per method over its retains; unpruned as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.5, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    colours = plt.get_cmap("tab20")
    for k, method in enumerate(methods):  # 20 colours x 7 markers: no two methods drawn alike
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["visual_tokens_kept"])
        axis.plot([r["visual_tokens_kept"] for r in mine], [r["accuracy"] for r in mine], marker="os^vDPX"[k % 7],
                  color=colours(k % 20), label=method)
    for r in rows:
        if r["method"] == "none":
            axis.scatter([r["visual_tokens_kept"]], [r["accuracy"]], marker="*", s=200, color="black",
                         label="none (unpruned)", zorder=3)
    axis.set_xscale("log")
    axis.set_xlabel("visual tokens kept per question (mean, log scale)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    with output_file(path, "--plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

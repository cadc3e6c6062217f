"""`streamprune bench live`: one stream played in real time for a fixed span per method, in one run.

Per method, everything `streamprune live` builds, built afresh: the source (a file or synthetic
stream starts over, so every method sees the same frames; a camera or zmq stream is whatever comes
next), the stages (`LocalStages`, or `RayStages` with --ray) and a `LiveRunner`. Once the first
tokens reached the memory and the warm-up passed, a span of `seconds` is measured:

  fps            frames into the memory per second of the span (sustained, not the target)
  frames_dropped dropped oldest-first because the encoder fell behind (`LiveStats.frames_dropped`,
                 which the runner brings up to date every STATS_INTERVAL_S)
  answer_ms_*    wall-clock time of `runner.ask` as the asking thread sees it; a thread asks every
                 `question_every` s, one question at a time (a slow answer delays the next)
  tokens_*, kv_bytes_*  the memory sampled every TICK_S

Each row also carries the runner's whole `LiveStats` at the end of the run (`stats`, through
`dataclasses.asdict`, so a counter added there appears here unchanged). Ratios are within this one
run: each method's fps and answer p50 over none's, when none ran.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streamprune.config import LiveConfig
from streamprune.config.commands import BenchLiveConfig
from streamprune.errors import InputError, StreampruneError
from streamprune.outputs import output_file, write_text

log = logging.getLogger(__name__)

TICK_S = 0.25  # the memory is sampled, and the progress bar moves, this often
STATS_INTERVAL_S = 0.25  # the runner folds its queue's drop count into its stats this often
FIRST_FRAME_TIMEOUT_S = 300.0  # the first encoder call may include CUDA start-up
ANSWER_JOIN_S = 300.0  # how long the end of a span waits for the answer in flight


def loops(spec: str) -> bool:
    """Whether `spec` is a file or synthetic source (played again from the start when it ends)."""
    scheme, sep, _ = spec.partition(":")
    return not sep or len(scheme) == 1 or scheme.lower() in ("file", "synthetic")


def check_source(spec: str) -> None:
    """Open and close the source now, so a missing file or a bad spec is one line before any model loads."""
    from streamprune.sources import open_source

    open_source(spec, loop=loops(spec), realtime=True).close()


def live_config(config: BenchLiveConfig, method: str, ray: bool = False) -> LiveConfig:
    """The `streamprune live` config of one method (none always unpruned: it is the baseline)."""
    return LiveConfig(source=config.source, model=config.model, method=method,
                      retain=None if method == "none" else config.retain, fps=config.fps,
                      memory=dataclasses.replace(config.memory), placement=dataclasses.replace(config.placement),
                      no_ray=not ray, ray_address=config.ray_address, stats_interval=STATS_INTERVAL_S,
                      loop=loops(config.source), max_new_tokens=config.max_new_tokens, threads=config.threads,
                      seed=config.seed)


class _Questions:
    """Asks `question` every `every` seconds from a thread, one at a time; `records` holds
    (monotonic time asked, wall ms, LiveAnswer) of each answer."""

    def __init__(self, runner: Any, question: str, every: float) -> None:
        self.runner, self.question, self.every = runner, question, every
        self.records: list[tuple[float, float, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-live-ask", daemon=True)

    def start(self) -> _Questions:
        self._thread.start()
        return self

    def stop(self, timeout: float = ANSWER_JOIN_S) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if timeout and self._thread.is_alive():
            log.warning("an answer still running after %.0f s; the next method starts beside it", timeout)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            asked = time.monotonic()
            try:
                answer = self.runner.ask(self.question, None, FIRST_FRAME_TIMEOUT_S)
            except BaseException as err:  # re-raised by the bench, in the main thread
                self.error = err
                return
            self.records.append((asked, (time.monotonic() - asked) * 1000, answer))
            due = max(due + self.every, time.monotonic())


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _failed(runner: Any, questions: _Questions | None = None) -> BaseException | None:
    return runner.error or (questions.error if questions is not None else None)


def _raise(error: BaseException) -> None:
    if isinstance(error, StreampruneError):
        raise error
    raise RuntimeError(f"live stream failed: {error}") from error


def _wait(runner: Any, questions: _Questions, bar: tqdm, seconds: float,
          samples: list[tuple[int, int]] | None = None) -> None:
    """Let the stream run `seconds` (less if it failed or ended), appending (tokens, KV bytes) of
    the memory to `samples` every TICK_S."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and _failed(runner, questions) is None \
            and not runner.worker_done.is_set():
        before = time.monotonic()
        runner.wait_for(lambda s: False, min(TICK_S, left))  # returns early on a failure or the end
        if samples is not None:
            samples.append((runner.stats.tokens, runner.stats.kv_cache_bytes))
        bar.update(time.monotonic() - before)
        bar.set_postfix_str(f"{runner.stats.fps_processed:.1f} fps, {len(questions.records)} answers", refresh=False)


def run_method(config: BenchLiveConfig, method: str, ray: bool = False, progress: bool = False,
               label: str = "") -> dict[str, Any]:
    """One method: build the live graph, warm up, measure `config.seconds`, tear down; one row."""
    from streamprune.runtime.live_runner import LiveRunner
    from streamprune.runtime.live_stages import LocalStages, RayStages
    from streamprune.sources import open_source

    live = live_config(config, method, ray)
    stages = RayStages(live) if ray else LocalStages(live)
    runner = questions = None
    bar = tqdm(total=round(config.warmup + config.seconds, 2), desc=f"bench live {label}{method}", unit="s",
               disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}")
    try:
        runner = LiveRunner(open_source(live.source, loop=live.loop, realtime=True), stages, live).start()
        # tokens, not frames: a temporal method's frames reach the memory when their segment closes
        if not runner.wait_for(lambda s: s.tokens > 0, FIRST_FRAME_TIMEOUT_S):
            if runner.error is not None:
                _raise(runner.error)
            raise InputError(f"no frame reached the memory within {FIRST_FRAME_TIMEOUT_S:.0f} s; "
                             "is the source producing frames?")
        questions = _Questions(runner, config.question, config.question_every).start()
        _wait(runner, questions, bar, config.warmup)
        t0, s0 = time.monotonic(), dataclasses.asdict(runner.stats)
        samples: list[tuple[int, int]] = []
        _wait(runner, questions, bar, config.seconds, samples)
        t1, s1 = time.monotonic(), dataclasses.asdict(runner.stats)
        questions.stop()
        error = _failed(runner, questions)
        if error is not None:
            _raise(error)
    finally:
        bar.close()
        if questions is not None:
            questions.stop(0.0)  # at once: joined above unless the span failed
        if runner is not None:
            runner.stop()
        stages.close()
    final = dataclasses.asdict(runner.stats)
    answered = [r for r in questions.records if t0 <= r[0] < t1]
    del stages, runner, questions
    _release(config)
    return _row(config, method, live.retain, t1 - t0, s0, s1, samples, answered, final)


def _row(config: BenchLiveConfig, method: str, retain: float | None, span: float, s0: dict, s1: dict,
         samples: list[tuple[int, int]], answered: list[tuple[float, float, Any]], final: dict) -> dict[str, Any]:
    """The bench's own numbers over the span, then the runner's counters as they ended."""
    delta = {k: s1[k] - s0[k] for k in ("frames_sampled", "frames_processed", "frames_dropped")}
    wall = [ms for _, ms, _ in answered]
    stage = [a.latency_ms for _, _, a in answered]
    tokens = [t for t, _ in samples] or [s1["tokens"]]
    kv = [b for _, b in samples] or [s1["kv_cache_bytes"]]
    cached = bool(final.get("cacher_frames"))
    return {
        "method": method, "retain": retain, "seconds": span,
        "fps": delta["frames_processed"] / span if span > 0 else 0.0, "fps_target": config.fps,
        "frames_offered": delta["frames_sampled"], "frames_processed": delta["frames_processed"],
        "frames_dropped": delta["frames_dropped"],
        "drop_share": delta["frames_dropped"] / delta["frames_sampled"] if delta["frames_sampled"] else 0.0,
        "answers": len(answered), "answer_ms_p50": _percentile(wall, 50), "answer_ms_p99": _percentile(wall, 99),
        "answer_ms_max": max(wall) if wall else None,
        "answer_stage_ms_p50": _percentile(stage, 50), "answer_stage_ms_p99": _percentile(stage, 99),
        "answer_tokens_mean": statistics.mean(a.visual_tokens for _, _, a in answered) if answered else None,
        "tokens_mean": statistics.mean(tokens), "tokens_max": max(tokens),
        "kv_bytes_mean": statistics.mean(kv), "kv_bytes_max": max(kv),
        "cacher_hit_rate": final.get("cacher_hit_rate") if cached else None,
        "vision_flops_saved_share": final.get("vision_flops_saved_share") if cached else None,
        "fps_ratio": None, "answer_p50_ratio": None,
        "stats": final,
    }


def _release(config: BenchLiveConfig) -> None:
    """Give the method's model back before the next one loads (its copy would count against it)."""
    gc.collect()
    if config.placement.device != "cpu":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """fps_ratio (higher is better) and answer_p50_ratio (lower is better) against none, in place."""
    base = next((r for r in rows if r["method"] == "none"), None)
    if base is None:
        return
    for row in rows:
        if base["fps"]:
            row["fps_ratio"] = row["fps"] / base["fps"]
        if base["answer_ms_p50"] and row["answer_ms_p50"] is not None:
            row["answer_p50_ratio"] = row["answer_ms_p50"] / base["answer_ms_p50"]


def run_live_bench(config: BenchLiveConfig, methods: list[str], ray: bool = False,
                   progress: bool = False) -> list[dict[str, Any]]:
    """One row per method, one after another in this run, ratios against none added."""
    rows = []
    for i, method in enumerate(methods):
        rows.append(run_method(config, method, ray, progress, label=f"{i + 1}/{len(methods)} "))
        log.info("%s: %.2f fps, %d dropped, %d answers, p50 %s ms", method, rows[-1]["fps"],
                 rows[-1]["frames_dropped"], rows[-1]["answers"], _num(rows[-1]["answer_ms_p50"]))
    add_ratios(rows)
    return rows


def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_live_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | retain | fps | fps x | dropped | answers | answer p50 ms | p99 ms | p50 x | tokens mean/max "
             "| KV MiB max | STC hits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        retain = "1" if r["method"] == "none" else "own" if r["retain"] is None else f"{r['retain']:g}"
        lines.append(f"| {r['method']} | {retain} | "
                     f"{r['fps']:.2f} | {_num(r['fps_ratio'], '.2f')} | {r['frames_dropped']} | {r['answers']} | "
                     f"{_num(r['answer_ms_p50'])} | {_num(r['answer_ms_p99'])} | {_num(r['answer_p50_ratio'], '.2f')} | "
                     f"{r['tokens_mean']:.0f}/{r['tokens_max']} | {r['kv_bytes_max'] / 2**20:.2f} | "
                     f"{_num(r['cacher_hit_rate'], '.0%')} |")
    return "\n".join(lines)


def write_live_json(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    import json

    write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=1), "--json")


def plot_live(rows: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Four bar charts, one bar (group) per method: sustained fps (target dashed), answer p50/p99,
    frames dropped, tokens in memory (mean, max as a tick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(4 * (1.5 + 0.45 * len(rows)), 4))
    fps, latency, dropped, tokens = axes
    fps.bar(x, [r["fps"] for r in rows], color="tab:blue")
    fps.axhline(rows[0]["fps_target"], color="black", linestyle="--", linewidth=1, label="target")
    fps.set_ylabel("frames into memory / s")
    fps.legend(fontsize=8, loc="lower right")
    width = 0.38
    latency.bar(x - width / 2, [r["answer_ms_p50"] or 0.0 for r in rows], width, label="p50", color="tab:green")
    latency.bar(x + width / 2, [r["answer_ms_p99"] or 0.0 for r in rows], width, label="p99", color="tab:olive")
    latency.set_ylabel("answer latency, ms")
    latency.legend(fontsize=8)
    dropped.bar(x, [r["frames_dropped"] for r in rows], color="tab:red")
    dropped.set_ylim(0, 1.1 * max(1, *(r["frames_dropped"] for r in rows)))
    dropped.set_ylabel("frames dropped")
    tokens.bar(x, [r["tokens_mean"] for r in rows], color="tab:purple", label="mean")
    tokens.scatter(x, [r["tokens_max"] for r in rows], marker="_", s=300, color="black", label="max", zorder=3)
    tokens.set_ylabel("tokens in memory")
    tokens.legend(fontsize=8)
    for axis in axes:
        axis.set_xticks(x, names, rotation=30, ha="right")
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with output_file(path, "--plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

"""Answer one question about many video files: the batch job, its model worker and its bookkeeping.

Per input: plan (sha256 of the bytes + probe) -> decode its segments -> join their frames in time
order (`batch_inputs`) -> encode, prune, prefill and generate on a `ModelWorker` -> one JSON line
in the results file (`batch_results`). `run_job` runs this in-process (`use_ray=False`, one input
at a time) or hands it to the Ray executor (`batch_ray`, imported only then), which runs the same
functions and worker as Ray tasks and actors. Either way only this driver process writes the
results file, so every input gets exactly one line however often its work was retried.

Resume: on start the results file is compacted to the last line per input (a partial line left by
a crash is dropped); inputs whose line is `ok` with the same sha256 as the file now are skipped,
error lines of this run's inputs are retried, and an input whose content changed is redone and its
old line dropped when the run finishes. `overwrite` starts the file over.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamprune.config import DEFAULT_VIDEO_MODEL, DeviceConfig
from streamprune.errors import EXIT_PARTIAL, InputError
from streamprune.runtime.batch_inputs import Plan, SegmentMeta, decode_segment, first_line, join_segments, plan_input
from streamprune.runtime.batch_results import ResultsFile, latest_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a model worker needs; identical for every worker, so answers do not depend on
    which worker (or how many) processed an input."""

    question: str
    model: str = DEFAULT_VIDEO_MODEL  # a configs/models name (resolved on the worker's node) or an absolute dir
    method: str = "none"
    retain: float | None = None
    max_tokens: int | None = None
    fps: float = 1.0
    max_new_tokens: int = 16
    seed: int = 0
    placement: DeviceConfig = field(default_factory=DeviceConfig)  # resolved on the worker's own node
    torch_threads: int | None = None  # None: the process default (Ray sets 1 per actor)


class ModelWorker:
    """One loaded model and pruning recipe, answering the batch question for one clip per call."""

    def __init__(self, settings: WorkerSettings) -> None:
        import torch

        from streamprune.models import load_model

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.adapter = load_model(settings.model, settings.placement)
        self.recipe = self.adapter.recipe(settings.method, retain=settings.retain, max_tokens=settings.max_tokens)
        self.label = _worker_label()

    def ready(self) -> str:
        """Where this worker runs; returning means the model is loaded."""
        return self.label

    def answer(self, indices: list[list[int]], *segments: np.ndarray) -> dict[str, Any]:
        """Answer on the joined segments (`[T_i, H, W, 3]` each, in time order); a model failure on
        this clip is reported as an error result rather than raised, so one input cannot stop a batch."""
        from streamprune.pruning.base import PruneContext

        clip = join_segments(segments, indices)
        base = {"frames": len(clip), "worker": self.label}
        if not len(clip):
            return {**base, "status": "error", "error": "no frames decoded (clip shorter than one sample)"}
        s = self.settings
        try:
            result = self.adapter.answer(clip, s.question, self.recipe, PruneContext(seed=s.seed),
                                         fps=s.fps, max_new_tokens=s.max_new_tokens)
        except Exception as err:  # noqa: BLE001 - any model failure on one clip becomes that input's error line
            log.exception("model failed on a %d-frame clip", len(clip))
            return {**base, "status": "error", "error": f"model failed: {type(err).__name__}: {first_line(err)}"}
        return {**base, "status": "ok", "answer": result.text, "visual_tokens_in": result.visual_tokens_in,
                "visual_tokens_kept": result.visual_tokens_kept,
                "timings_ms": {f"{k}_ms": round(v, 3) for k, v in result.timings_ms.items()}}


def _worker_label() -> str:
    try:
        import ray

        if ray.is_initialized():
            return f"{ray.get_runtime_context().get_node_id()[:12]}/{os.getpid()}"
    except ImportError:
        pass
    return f"local/{os.getpid()}"


@dataclass
class BatchJob:
    """One batch run. `inputs` are absolute paths (see `find_inputs`)."""

    inputs: list[str]
    output: Path
    settings: WorkerSettings
    max_frames: int | None = 16
    segment_seconds: float = 60.0
    num_workers: int = 1
    use_ray: bool = True
    ray_address: str | None = None  # None: start a local Ray instance (or use the one already initialised)
    actor_options: dict[str, Any] = field(default_factory=dict)  # extra ray actor options: resources, num_gpus
    overwrite: bool = False
    max_attempts: int = 3  # model-worker deaths an input may see before it is reported as an error


@dataclass
class BatchReport:
    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    frames: int = 0
    wall_s: float = 0.0
    workers_lost: int = 0  # model actors that died (node lost, crash) during the run
    resubmitted: int = 0  # inputs redone after their actor (or their decoded frames) was lost

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.failed else 0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0


ResultCallback = Callable[[dict[str, Any] | None, BatchReport], None]


class RunState:
    """Bookkeeping shared by both executors: resume state, the results file, the report."""

    def __init__(self, job: BatchJob, on_result: ResultCallback | None) -> None:
        self.job, self.on_result = job, on_result
        self.results = ResultsFile(job.output)
        self.report = BatchReport(total=len(job.inputs))
        self.began = time.perf_counter()
        self.done = self._start_results()
        self.reprocessed: set[str] = set()

    def _start_results(self) -> dict[str, str]:
        """Compact the file to the last line per input, dropping this run's error lines (they are
        retried); return {input: sha256} of the inputs already ok."""
        self.results.check_writable()
        if self.job.overwrite:
            self.results.rewrite([])
            return {}
        records = self.results.read()
        this_run = set(self.job.inputs)
        keep = [r for r in latest_records(records).values() if r.get("status") == "ok" or r["input"] not in this_run]
        if len(keep) != len(records) or self.results.unreadable_lines:
            self.results.rewrite(keep)
        return {r["input"]: r.get("sha256") for r in keep if r.get("status") == "ok"}

    def already_done(self, plan: Plan) -> bool:
        return plan.input in self.done and self.done[plan.input] == plan.sha256

    def skip(self) -> None:
        self.report.skipped += 1
        self._tick(None)

    def emit(self, plan: Plan, began: float, metas: Sequence[SegmentMeta] = (),
             result: dict[str, Any] | None = None, error: str | None = None, attempts: int = 0) -> None:
        """Write the input's one results line and count it."""
        record = self.record(plan, began, metas, result, error, attempts)
        self.results.append(record)
        if plan.input in self.done:  # its content changed since its ok line, which is now superseded
            self.reprocessed.add(plan.input)
        if record["status"] == "ok":
            self.report.ok += 1
            self.report.frames += record["frames"]
        else:
            self.report.failed += 1
            log.info("%s: %s", plan.input, record["error"])
        self._tick(record)

    def record(self, plan: Plan, began: float, metas: Sequence[SegmentMeta], result: dict[str, Any] | None,
               error: str | None, attempts: int) -> dict[str, Any]:
        s = self.job.settings
        result = dict(result or {})
        error = error or plan.error or result.get("error")
        timings = dict(plan.timings_ms)
        if metas:
            timings["video_decode_ms"] = round(sum(m.decode_ms for m in metas), 3)
        timings.update(result.get("timings_ms", {}))
        timings["wall_ms"] = round((time.perf_counter() - began) * 1000, 3)  # includes queueing
        return {
            "input": plan.input, "sha256": plan.sha256, "status": "error" if error else "ok",
            "answer": None if error else result.get("answer"), "error": error,
            "question": s.question, "method": s.method, "retain": s.retain, "max_tokens": s.max_tokens,
            "frames": result.get("frames", sum(len(m.indices) for m in metas)),
            "segments": len(plan.segments), "duration_s": plan.duration_s,
            "visual_tokens_in": result.get("visual_tokens_in"), "visual_tokens_kept": result.get("visual_tokens_kept"),
            "worker": result.get("worker"), "attempts": attempts, "timings_ms": timings,
        }

    def _tick(self, record: dict[str, Any] | None) -> None:
        self.report.wall_s = time.perf_counter() - self.began
        if self.on_result is not None:
            self.on_result(record, self.report)

    def finish(self) -> BatchReport:
        self.report.wall_s = time.perf_counter() - self.began
        if self.reprocessed:  # drop the superseded lines of inputs whose content changed
            self.results.rewrite(list(latest_records(self.results.read()).values()))
        self.results.close()
        return self.report


def run_job(job: BatchJob, on_result: ResultCallback | None = None) -> BatchReport:
    """Process every input of `job`; `on_result(record_or_None_if_skipped, report)` after each.
    A bad model, method or output is a usage error here, before any worker starts."""
    from streamprune.models import check_model
    from streamprune.pruning.recipe import build_recipe

    if not job.inputs:
        raise InputError("no inputs to process")
    check_model(job.settings.model)
    build_recipe(job.settings.method, job.settings.retain, job.settings.max_tokens)
    run = RunState(job, on_result)
    try:
        if job.use_ray:
            from streamprune.runtime.batch_ray import RayExecutor

            RayExecutor(job, run).run()
        else:
            _run_in_process(job, run)
    finally:
        report = run.finish()
    return report


def _run_in_process(job: BatchJob, run: RunState) -> None:
    worker: ModelWorker | None = None
    for path in job.inputs:
        began = time.perf_counter()
        plan = plan_input(path, job.segment_seconds)
        if plan.error:
            run.emit(plan, began)
            continue
        if run.already_done(plan):
            run.skip()
            continue
        decoded = [decode_segment(path, job.settings.fps, job.max_frames, a, b) for a, b in plan.segments]
        metas = [meta for meta, _ in decoded]
        failed = next((m.error for m in metas if m.error), None)
        if failed:
            run.emit(plan, began, metas, error=failed)
            continue
        if worker is None:  # loaded on first need: a resumed batch with nothing left loads no model
            worker = ModelWorker(job.settings)
        run.emit(plan, began, metas, worker.answer([m.indices for m in metas], *(f for _, f in decoded)))

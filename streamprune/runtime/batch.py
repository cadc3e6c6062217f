"""Answer one question about many video files, in-process or spread over a Ray cluster.

Per input: plan (sha256 of the bytes + probe) -> decode its segments -> join their frames in time
order -> encode, prune, prefill and generate on a model worker -> one JSON line in the results file.

The same per-input functions (`plan_input`, `decode_segment`, `ModelWorker`) run in-process
(`use_ray=False`) or as Ray tasks and actors. On Ray, a video longer than `segment_seconds` is
decoded as several [start, end) segments in parallel CPU tasks (decode.py guarantees the segments'
frames concatenate to exactly the whole clip's, so temporal pruning methods still see the whole
clip); the model stays loaded in a pool of actors (one load per actor, not per file), each given a
clip only once its model is loaded; an actor that dies (its node lost) is replaced and its
in-flight input resubmitted to whichever actor is free. Only this driver writes the results file,
so every input gets exactly one line however often its work was retried.

Results file: JSON lines, one per input, appended (single write + fsync) as each input finishes.
On start, the last line per input wins, a partial line left by a crash is dropped, and inputs whose
line is `ok` with the same sha256 are skipped (resume); error lines are retried.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamprune.decode import decode_frames, probe
from streamprune.errors import EXIT_PARTIAL, ConfigError, InputError, ModelError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".ogv", ".3gp", ".h264", ".264", ".hevc", ".265", ".y4m",
})
HASH_CHUNK = 1 << 20
# While nothing finishes for this long, log what the batch is waiting for.
STALL_LOG_S = 30.0


# -- inputs ----------------------------------------------------------------------------------------
def find_inputs(specs: Sequence[str]) -> list[str]:
    """Absolute paths of the inputs, in the order given, each once.

    A file is taken as named (whatever its extension); a folder is searched recursively for files
    with a video extension; anything else is a glob (`**` recurses) whose matched files are taken
    as named and matched folders searched like folders."""
    found: dict[str, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file() or path.is_dir():
            matches = [path]
        elif any(ch in spec for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
        else:
            raise InputError(f"no such file or folder: {spec}")
        for match in matches:
            if match.is_dir():
                files = sorted(p for p in match.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            else:
                files = [match]
            for file in files:
                found.setdefault(str(file.resolve()), None)
    if not found:
        raise InputError(f"no video inputs matched: {' '.join(specs)}")
    return list(found)


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, read in 1 MiB chunks (videos can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_segments(duration: float, segment_seconds: float) -> list[tuple[float | None, float | None]]:
    """[start, end) windows (None = open) of `segment_seconds` covering a `duration`-long clip; one
    open window when the clip is no longer than a segment. The last window is open-ended so frames
    past a short declared duration still land in it."""
    count = max(1, math.ceil(duration / segment_seconds - 1e-9))
    return [(i * segment_seconds if i else None, (i + 1) * segment_seconds if i < count - 1 else None)
            for i in range(count)]


# -- per-input work (plain functions: run in-process or as Ray tasks) --------------------------------
@dataclass
class Plan:
    """What an input is before decoding: its content hash and how it is split into segments."""

    input: str
    sha256: str | None = None
    duration_s: float | None = None
    segments: list[tuple[float | None, float | None]] = field(default_factory=list)
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def plan_input(path: str, segment_seconds: float) -> Plan:
    """Hash and probe `path`. A file that cannot be read or is no video gives `Plan.error`."""
    plan = Plan(input=path)
    start = time.perf_counter()
    try:
        plan.sha256 = file_sha256(path)
    except OSError as err:
        plan.error = f"cannot read {path}: {err.strerror or err}"
        return plan
    hashed = time.perf_counter()
    plan.timings_ms["hash_ms"] = round((hashed - start) * 1000, 3)
    try:
        info = probe(path)
    except InputError as err:
        plan.error = str(err)
        return plan
    except Exception as err:  # noqa: BLE001 - a demuxer failure on one file becomes that input's error line
        log.exception("probing %s failed", path)
        plan.error = f"probing failed: {type(err).__name__}: {_first_line(err)}"
        return plan
    plan.timings_ms["probe_ms"] = round((time.perf_counter() - hashed) * 1000, 3)
    plan.duration_s = info.duration
    plan.segments = split_segments(info.duration, segment_seconds)
    return plan


@dataclass
class SegmentMeta:
    """The small half of a decoded segment (the frames travel separately): frame numbers in the
    stream, decode time, or why decoding failed."""

    indices: list[int]
    decode_ms: float
    error: str | None = None


def _no_frames() -> np.ndarray:
    return np.empty((0, 0, 0, 3), dtype=np.uint8)


def decode_segment(path: str, fps: float, max_frames: int | None, start: float | None,
                   end: float | None) -> tuple[SegmentMeta, np.ndarray]:
    """Decode the sampled frames of `path` in [start, end): (meta, frames `[T, H, W, 3]` uint8).
    T may be 0 (no sampled frame falls in the window). A truncated/corrupt file gives `meta.error`."""
    began = time.perf_counter()
    try:
        frames = decode_frames(path, fps=fps, max_frames=max_frames, start=start, end=end)
    except InputError as err:
        return SegmentMeta([], round((time.perf_counter() - began) * 1000, 3), str(err)), _no_frames()
    except Exception as err:  # noqa: BLE001 - a decoder failure on one file becomes that input's error line
        log.exception("decoding %s [%s, %s) failed", path, start, end)
        reason = f"decoding failed: {type(err).__name__}: {_first_line(err)}"
        return SegmentMeta([], round((time.perf_counter() - began) * 1000, 3), reason), _no_frames()
    images = np.stack([f.image for f in frames]) if frames else _no_frames()
    return SegmentMeta([f.index for f in frames], round((time.perf_counter() - began) * 1000, 3)), images


def join_segments(segments: Sequence[np.ndarray], indices: Sequence[Sequence[int]]) -> np.ndarray:
    """Frames of consecutive segments in time order, `[T, H, W, 3]`; a frame number that two
    segments both returned (a frame shown across a window boundary) is kept once, as a whole-clip
    decode would."""
    seen: set[int] = set()
    parts = []
    for images, numbers in zip(segments, indices):
        keep = [i for i, number in enumerate(numbers) if number not in seen]
        seen.update(numbers)
        if keep:
            parts.append(images[keep])
    return np.concatenate(parts) if parts else _no_frames()


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a model worker needs; identical for every worker, so answers do not depend on
    which worker (or how many) processed an input."""

    question: str
    model: str | None = None  # None: the embedded default model, resolved on the worker's node
    method: str = "none"
    retain: float | None = None
    max_tokens: int | None = None
    fps: float = 1.0
    max_new_tokens: int = 16
    seed: int = 0
    attn_implementation: str = "sdpa"
    torch_threads: int | None = None  # None: the process default (Ray sets 1 per actor)


class ModelWorker:
    """One loaded model and pruning pipeline, answering the batch question for one clip per call."""

    def __init__(self, settings: WorkerSettings) -> None:
        import torch

        from streamprune.models import load_adapter
        from streamprune.models.default import default_model_dir
        from streamprune.pruning.recipe import build_recipe

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.recipe = build_recipe(settings.method, retain=settings.retain, max_tokens=settings.max_tokens)
        model_dir = settings.model if settings.model is not None else default_model_dir()
        self.adapter = load_adapter(model_dir, settings.attn_implementation)
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
            return {**base, "status": "error", "error": f"model failed: {type(err).__name__}: {_first_line(err)}"}
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- results file ---------------------------------------------------------------------------------
class ResultsFile:
    """The JSON-lines output. Appends are one `write` of a whole line followed by fsync, so a crash
    leaves at most a partial last line, which `read` ignores."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.unreadable_lines = 0  # found by the last `read`
        self._fd: int | None = None

    def check_writable(self) -> None:
        if self.path.is_dir():
            raise ConfigError(f"output {self.path} is a folder; give a file path such as results.jsonl")
        if not self.path.parent.is_dir():
            raise ConfigError(f"output folder {self.path.parent} does not exist")
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as err:
            raise ConfigError(f"output {self.path} is not writable: {err.strerror or err}") from None

    def read(self) -> list[dict[str, Any]]:
        """Records in file order; other lines (a partial last line, blank lines, anything that is not
        a JSON object with an `input`) are skipped and counted in `unreadable_lines`."""
        self.unreadable_lines = 0
        if not self.path.is_file():
            return []
        records = []
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict) and isinstance(record.get("input"), str) and line.endswith("\n"):
                    records.append(record)
                else:
                    self.unreadable_lines += 1
                    log.warning("%s:%d: ignoring an unreadable line (partial write from an interrupted run?)",
                                self.path, number)
        return records

    def rewrite(self, records: Sequence[dict[str, Any]]) -> None:
        """Replace the file's content atomically (write a sibling, fsync, rename)."""
        self.close()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def append(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = (json.dumps(record) + "\n").encode()
        written = os.write(self._fd, data)
        while written < len(data):  # regular files take a whole write; loop in case one is short
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def latest_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each input, in order of first appearance."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["input"]] = record
    return latest


# -- the job ----------------------------------------------------------------------------------------
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


def check_model_dir(path: str | None) -> None:
    """Fail fast (before any worker starts) on a model path that cannot hold a supported model."""
    if path is None:
        return
    from streamprune.models import FAMILIES

    config = Path(path) / "config.json"
    if not config.is_file():
        raise ModelError(f"model path {path!r} does not exist or has no config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as err:
        raise ModelError(f"model config {config} is unreadable: {err}") from None
    if model_type not in FAMILIES:
        raise ModelError(f"model type {model_type!r} at {path} is not supported; supported: {', '.join(FAMILIES)}")


class _Run:
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
    """Process every input of `job`; `on_result(record_or_None_if_skipped, report)` after each."""
    if not job.inputs:
        raise InputError("no inputs to process")
    check_model_dir(job.settings.model)
    from streamprune.pruning.recipe import build_recipe

    build_recipe(job.settings.method, job.settings.retain, job.settings.max_tokens)  # bad method: usage error now
    run = _Run(job, on_result)
    try:
        if job.use_ray:
            _RayExecutor(job, run).run()
        else:
            _run_in_process(job, run)
    finally:
        report = run.finish()
    return report


def _run_in_process(job: BatchJob, run: _Run) -> None:
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


# -- Ray executor -------------------------------------------------------------------------------------
@dataclass(eq=False)
class _File:
    """An input between its plan and its result line."""

    plan: Plan
    began: float
    meta_refs: list[Any] = field(default_factory=list)
    frame_refs: list[Any] = field(default_factory=list)
    metas: list[SegmentMeta | None] = field(default_factory=list)
    attempts: int = 0


@dataclass(eq=False)
class _Slot:
    """One model actor of the pool. It takes a clip only when `ready` (model loaded) and idle."""

    actor: Any
    starting: Any  # the ready() ref until the model is loaded, then None
    label: str = ""
    busy: bool = False


class _RayExecutor:
    """Event loop of the driver: every outstanding Ray ref maps back to its input, so each input is
    written exactly once, and a lost actor's input goes back to the queue."""

    def __init__(self, job: BatchJob, run: _Run) -> None:
        import ray

        self.ray, self.job, self.run_state = ray, job, run
        self.plan_task = ray.remote(plan_input)
        self.decode_task = ray.remote(decode_segment).options(num_returns=2)
        # Own resubmission instead of Ray's restarts: a restarted actor may wait forever for a node
        # with its resources, holding the input hostage; a fresh actor is only used once ready.
        # No num_cpus by default: an actor then holds no CPU while it runs, so model actors never
        # starve the decode tasks of CPU slots (--actor-resource CPU=N changes that).
        self.worker_cls = ray.remote(ModelWorker).options(max_restarts=0, max_task_retries=0, **job.actor_options)
        self.queue: deque[str] = deque(job.inputs)
        self.plans: dict[Any, tuple[str, float]] = {}
        self.segments: dict[Any, tuple[_File, int]] = {}
        self.decoding: set[int] = set()
        self.waiting: deque[_File] = deque()  # decoded, waiting for a model actor
        self.answering: dict[Any, tuple[_Slot, _File]] = {}
        self.slots: list[_Slot] = []
        self.start_failures = 0
        self.any_ready = False
        self.window = max(4, 3 * job.num_workers)

    def run(self) -> None:
        started = _connect_ray(self.job)
        try:
            self._loop()
        finally:
            for slot in self.slots:
                self._kill(slot)
            if started:
                self.ray.shutdown()

    def _in_flight(self) -> int:
        return len(self.plans) + len(self.decoding) + len(self.waiting) + len(self.answering)

    def _loop(self) -> None:
        ray = self.ray
        while self.queue or self._in_flight():
            while self.queue and self._in_flight() < self.window:
                path = self.queue.popleft()
                self.plans[self.plan_task.remote(path, self.job.segment_seconds)] = (path, time.perf_counter())
            if self.waiting and not self.slots:  # the pool starts when the first clip needs it
                self.slots = [self._start_slot() for _ in range(self.job.num_workers)]
            self._dispatch()
            refs = [*self.plans, *self.segments, *self.answering, *(s.starting for s in self.slots if s.starting)]
            ready, _ = ray.wait(refs, num_returns=1, timeout=STALL_LOG_S)
            if not ready:
                self._log_stall()
                continue
            ref = ready[0]
            if ref in self.plans:
                self._on_plan(ref)
            elif ref in self.segments:
                self._on_segment(ref)
            elif ref in self.answering:
                self._on_answer(ref)
            else:
                self._on_started(next(s for s in self.slots if s.starting == ref))

    def _start_slot(self) -> _Slot:
        actor = self.worker_cls.remote(self.job.settings)
        return _Slot(actor=actor, starting=actor.ready.remote())

    def _kill(self, slot: _Slot) -> None:
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass

    def _replace(self, slot: _Slot) -> None:
        self._kill(slot)
        self.slots[self.slots.index(slot)] = self._start_slot()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not self.waiting:
                return
            if slot.starting is None and not slot.busy:
                file = self.waiting.popleft()
                indices = [m.indices for m in file.metas]
                self.answering[slot.actor.answer.remote(indices, *file.frame_refs)] = (slot, file)
                slot.busy = True

    def _on_plan(self, ref: Any) -> None:
        path, began = self.plans.pop(ref)
        try:
            plan = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            self.run_state.emit(Plan(input=path), began, error=f"planning failed: {_first_line(err)}")
            return
        if plan.error:
            self.run_state.emit(plan, began)
        elif self.run_state.already_done(plan):
            self.run_state.skip()
        else:
            self._decode(_File(plan=plan, began=began))

    def _decode(self, file: _File) -> None:
        """Submit one decode task per segment of the file (again, if its frames were lost)."""
        file.metas = [None] * len(file.plan.segments)
        file.meta_refs, file.frame_refs = [], []
        for i, (start, end) in enumerate(file.plan.segments):
            meta_ref, frames_ref = self.decode_task.remote(file.plan.input, self.job.settings.fps,
                                                           self.job.max_frames, start, end)
            file.meta_refs.append(meta_ref)
            file.frame_refs.append(frames_ref)
            self.segments[meta_ref] = (file, i)
        self.decoding.add(id(file))

    def _on_segment(self, ref: Any) -> None:
        file, i = self.segments.pop(ref)
        try:
            meta = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            meta = SegmentMeta([], 0.0, f"decoding failed: {_first_line(err)}")
        file.metas[i] = meta
        if meta.error:  # the file fails as a whole; forget its other segments
            for other in file.meta_refs:
                self.segments.pop(other, None)
            self.decoding.discard(id(file))
            self.run_state.emit(file.plan, file.began, [m for m in file.metas if m], error=meta.error)
        elif all(m is not None for m in file.metas):
            self.decoding.discard(id(file))
            self.waiting.append(file)

    def _on_answer(self, ref: Any) -> None:
        slot, file = self.answering.pop(ref)
        slot.busy = False
        try:
            result = self.ray.get(ref)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ObjectLostError) as err:
            # the actor died, or the node holding the decoded frames did and Ray could not rebuild them
            actor_lost = isinstance(err, self.ray.exceptions.RayActorError)
            file.attempts += 1
            log.warning("%s (%s); %s", f"model worker {slot.label} lost" if actor_lost else "decoded frames lost",
                        _first_line(err), "resubmitting" if file.attempts < self.job.max_attempts else "giving up")
            if actor_lost:
                self.run_state.report.workers_lost += 1
                self._replace(slot)
            if file.attempts >= self.job.max_attempts:
                self.run_state.emit(file.plan, file.began, file.metas,
                                    error=f"lost {file.attempts} times while being answered (last: {_first_line(err)})",
                                    attempts=file.attempts)
                return
            self.run_state.report.resubmitted += 1
            if actor_lost:
                self.waiting.appendleft(file)
            else:
                self._decode(file)
            return
        except self.ray.exceptions.RayError as err:
            result = {"status": "error", "error": f"model worker failed: {_first_line(err)}"}
        self.run_state.emit(file.plan, file.began, file.metas, result, attempts=file.attempts)

    def _on_started(self, slot: _Slot) -> None:
        try:
            slot.label = self.ray.get(slot.starting)
        except self.ray.exceptions.RayError as err:
            self.start_failures += 1
            if not self.any_ready and self.start_failures >= self.job.max_attempts * self.job.num_workers:
                raise ModelError(f"model workers failed to start: {_first_line(err)}") from None
            log.warning("a model worker failed to start (%s); starting another", _first_line(err))
            self._replace(slot)
            return
        slot.starting = None
        self.any_ready = True
        log.info("model worker ready on %s", slot.label)

    def _log_stall(self) -> None:
        if self.waiting and not any(s.starting is None for s in self.slots):
            log.warning("%d decoded inputs wait for a model worker; none is scheduled yet (actor options %s, "
                        "cluster resources %s)", len(self.waiting), self.job.actor_options,
                        self.ray.available_resources())
        else:
            log.info("waiting: %d planning, %d decoding, %d answering", len(self.plans), len(self.decoding),
                     len(self.answering))


def _connect_ray(job: BatchJob) -> bool:
    """Connect to `job.ray_address` or start a local instance; True if this call started Ray
    (and so should shut it down). An instance already initialised in this process is reused."""
    import ray

    if ray.is_initialized():
        log.info("using the Ray instance already initialised in this process")
        return False
    quiet = not log.isEnabledFor(logging.INFO)
    try:
        if job.ray_address:
            ray.init(address=job.ray_address, log_to_driver=not quiet)
        else:
            # "local": a fresh instance even when another Ray cluster runs on this machine
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=not quiet)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ConfigError(f"cannot start or reach Ray at {job.ray_address or 'a new local instance'}: "
                          f"{_first_line(err)}") from None
    return True


"""The batch job's Ray executor: the driver's event loop over Ray tasks and a pool of model actors.

`batch_job.run_job` hands a job here when `use_ray`; the per-input functions and `ModelWorker`
are the same ones the in-process executor runs. A video longer than `segment_seconds` is decoded
as several [start, end) segments in parallel CPU tasks (their frames concatenate to exactly the
whole clip's, so temporal pruning methods still see the whole clip); the model stays loaded in a
pool of actors (one load per actor, not per file), each given a clip only once its model is loaded;
an actor that dies (its node lost) is replaced and its in-flight input resubmitted to whichever
actor is free. Every outstanding ref maps back to its input and only the driver writes results
(`RunState.emit`), so each input gets exactly one line however often its work was retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from streamprune.errors import ModelError
from streamprune.runtime.batch_inputs import Plan, SegmentMeta, decode_segment, first_line, plan_input
from streamprune.runtime.batch_job import BatchJob, ModelWorker, RunState

log = logging.getLogger(__name__)

# While nothing finishes for this long, log what the batch is waiting for.
STALL_LOG_S = 30.0


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


class RayExecutor:
    """Event loop of the driver: every outstanding Ray ref maps back to its input, so each input is
    written exactly once, and a lost actor's input goes back to the queue."""

    def __init__(self, job: BatchJob, run: RunState) -> None:
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
            self.run_state.emit(Plan(input=path), began, error=f"planning failed: {first_line(err)}")
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
            meta = SegmentMeta([], 0.0, f"decoding failed: {first_line(err)}")
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
                        first_line(err), "resubmitting" if file.attempts < self.job.max_attempts else "giving up")
            if actor_lost:
                self.run_state.report.workers_lost += 1
                self._replace(slot)
            if file.attempts >= self.job.max_attempts:
                self.run_state.emit(file.plan, file.began, file.metas,
                                    error=f"lost {file.attempts} times while being answered (last: {first_line(err)})",
                                    attempts=file.attempts)
                return
            self.run_state.report.resubmitted += 1
            if actor_lost:
                self.waiting.appendleft(file)
            else:
                self._decode(file)
            return
        except self.ray.exceptions.RayError as err:
            result = {"status": "error", "error": f"model worker failed: {first_line(err)}"}
        self.run_state.emit(file.plan, file.began, file.metas, result, attempts=file.attempts)

    def _on_started(self, slot: _Slot) -> None:
        try:
            slot.label = self.ray.get(slot.starting)
        except self.ray.exceptions.RayError as err:
            self.start_failures += 1
            if not self.any_ready and self.start_failures >= self.job.max_attempts * self.job.num_workers:
                raise ModelError(f"model workers failed to start: {first_line(err)}") from None
            log.warning("a model worker failed to start (%s); starting another", first_line(err))
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
    """Connect to `job.ray_address` (probed first, so a dead address fails within seconds) or
    start a local instance; True if this call started Ray (and so should shut it down)."""
    from streamprune.runtime.ray_connect import init_ray

    quiet = not log.isEnabledFor(logging.INFO)
    if job.ray_address:
        return init_ray(job.ray_address, log_to_driver=not quiet)
    # "local": a fresh instance even when another Ray cluster runs on this machine
    return init_ray(None, num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=not quiet)

"""`streamprune eval`'s job: every question of a multiple-choice set, answered by every method x
retain in one run, written as it is answered.

Work goes video by video: a video is decoded once (PyAV, `--frames` evenly spaced or `--fps`),
encoded once per encoder stage (`encoder_groups`: the plain tower, or an STC-Cacher configuration),
then each of its questions is answered by each recipe from that encoding, as `bench accuracy` does.
Each answer is one JSON line (`input` = "ID|METHOD|RETAIN"), fsynced as written, so an interrupted
run resumes where it stopped; a video that cannot be read gives `error` lines for its questions and
the run goes on. With Ray, videos go to a pool of model actors and lines are written by the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamprune.data.mcq import MCQItem
from streamprune.data.mcq_scoring import MAX_NEW_TOKENS, letter_prompt, names_correct_text, parse_letter
from streamprune.errors import InputError, StreampruneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """What every video is run with: (method, retain) pairs, sampling and the prompt mode."""

    recipes: tuple[tuple[str, float], ...]
    frames: int
    fps: float | None
    letters: bool  # the benchmark's lettered prompt; else the question alone, scored on the option text
    seed: int = 0


def record_key(item_id: str, method: str, retain: float) -> str:
    return f"{item_id}|{method}|{retain:g}"


def spells_letters(tokenizer: Any) -> bool:
    """Whether the tokenizer can write the option letters (a word-level vocabulary may not)."""
    unknown = tokenizer.unk_token_id
    ids = tokenizer("A. B. C. D.", add_special_tokens=False).input_ids
    return unknown is None or unknown not in ids


def video_file(root: Path, item: MCQItem) -> Path:
    """The item's video under `root` (VideoMME's own layout keeps videos under data/)."""
    path = root / item.video
    if not path.is_file() and item.benchmark == "videomme" and (root / "data" / item.video).is_file():
        return root / "data" / item.video
    return path


def _sampled_fps(timestamps: list[float]) -> float:
    """Frames per second of stream the sampled frames stand for (Qwen2.5-VL's temporal positions)."""
    span = timestamps[-1] - timestamps[0] if len(timestamps) > 1 else 0.0
    return (len(timestamps) - 1) / span if span > 0 else 1.0


def answer_video(adapter: Any, path: Path, items: list[MCQItem], plan: EvalPlan,
                 skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """One line per (item, method, retain) of this video not in `skip`."""
    from streamprune.decode import decode_frames
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.recipe import encoder_groups, encoder_key

    todo = [(item, m, r) for item in items for m, r in plan.recipes if record_key(item.id, m, r) not in skip]
    if not todo:
        return []
    try:
        if not path.is_file():
            raise InputError(f"video not found: {path}")
        frames = decode_frames(path, fps=plan.fps, max_frames=plan.frames)
        if not frames:
            raise InputError(f"no frames decoded from {path}")
    except StreampruneError as err:
        return [{"input": record_key(i.id, m, r), "id": i.id, "method": m, "retain": r, "status": "error",
                 "error": str(err)} for i, m, r in todo]
    clip = np.stack([f.image for f in frames])
    fps = _sampled_fps([f.timestamp for f in frames])
    recipes = {(m, r): adapter.recipe(m, retain=r) for m, r in plan.recipes}
    videos = {key: adapter.encode_for(clip, recipe, fps=fps, extra_signals=signals)
              for key, (recipe, signals) in encoder_groups(list(recipes.values())).items()}
    records = []
    for item, method, retain in todo:
        recipe = recipes[(method, retain)]
        prompt = letter_prompt(item) if plan.letters else item.question
        answer = adapter.answer_encoded(videos[encoder_key(recipe)], prompt, recipe, PruneContext(seed=plan.seed),
                                        max_new_tokens=MAX_NEW_TOKENS)
        letter = parse_letter(answer.text, item)
        by_letter, by_text = letter == item.answer_letter, names_correct_text(answer.text, item)
        records.append({
            "input": record_key(item.id, method, retain), "id": item.id, "method": method, "retain": retain,
            "status": "ok", "answer": answer.text, "parsed": letter, "truth": item.answer_letter,
            "correct": by_letter if plan.letters else by_text, "correct_letter": by_letter, "correct_text": by_text,
            "task_type": item.task_type, "duration": item.duration, "frames": len(frames),
            "frame_times": [round(f.timestamp, 3) for f in frames], "visual_tokens_in": answer.visual_tokens_in,
            "visual_tokens_kept": answer.visual_tokens_kept})
    return records


def by_video(items: list[MCQItem], root: Path) -> dict[Path, list[MCQItem]]:
    groups: dict[Path, list[MCQItem]] = {}
    for item in items:
        groups.setdefault(video_file(root, item), []).append(item)
    return groups


def run_local(adapter: Any, groups: dict[Path, list[MCQItem]], plan: EvalPlan,
              skip: frozenset[str]) -> Iterator[list[dict[str, Any]]]:
    for path, items in groups.items():
        yield answer_video(adapter, path, items, plan, skip)


class EvalWorker:
    """A Ray actor holding one copy of the model."""

    def __init__(self, model: str, placement: Any) -> None:
        from streamprune.models import load_model

        self.adapter = load_model(model, placement)

    def run(self, path: str, items: list[MCQItem], plan: EvalPlan, skip: frozenset[str]) -> list[dict[str, Any]]:
        return answer_video(self.adapter, Path(path), items, plan, skip)


def run_ray(model: str, placement: Any, groups: dict[Path, list[MCQItem]], plan: EvalPlan, skip: frozenset[str],
            workers: int) -> Iterator[list[dict[str, Any]]]:
    """Videos over `workers` actors, results as each video finishes (any order)."""
    import ray

    actors = [ray.remote(EvalWorker).options(num_cpus=1).remote(model, placement) for _ in range(workers)]
    pending = {}
    queue = list(groups.items())
    for index, (path, items) in enumerate(queue[:workers]):
        pending[actors[index].run.remote(str(path), items, plan, skip)] = index
    next_video = workers
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(done[0])
        if next_video < len(queue):
            path, items = queue[next_video]
            pending[actors[actor].run.remote(str(path), items, plan, skip)] = actor
            next_video += 1
        yield ray.get(done[0])

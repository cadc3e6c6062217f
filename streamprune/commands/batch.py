"""`streamprune batch`: answer one question about many (long) video files, on Ray or in-process.

    streamprune batch INPUT... --question Q | --prompt-file F --output results.jsonl
                     [--model NAME|PATH] [--method NAME] [--retain R] [--fps F] [--max-frames N]
                     [--ray-address auto|HOST:PORT] [--num-workers N] [--segment-seconds S]
                     [--overwrite] [--no-ray]

The flags are `BatchConfig`'s fields (streamprune/config.py). Writes one JSON line per input as it
finishes and resumes where an interrupted run stopped (see streamprune.runtime.batch_job). Exit
code 0 if every input is ok, 3 if some failed (the rest were processed), 2 for usage errors. The
runtime is imported inside the functions, so importing this module loads no torch.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamprune.config import BatchConfig
from streamprune.config.fields import MAX_QUESTION_CHARS, question_text
from streamprune.errors import ConfigError

if TYPE_CHECKING:
    from streamprune.runtime.batch_job import BatchJob, BatchReport


def _actor_options(specs: list[str], device: str = "auto") -> dict[str, Any]:
    """NAME=AMOUNT flags -> Ray actor options (CPU/GPU go to num_cpus/num_gpus, others to resources).
    A CUDA `device` asks Ray for one GPU per model actor unless a GPU amount is given."""
    options: dict[str, Any] = {"num_gpus": 1.0} if device.startswith("cuda") else {}
    resources: dict[str, float] = {}
    for spec in specs:
        name, sep, amount = spec.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise ConfigError(f"--actor-resource expects NAME=AMOUNT with AMOUNT > 0, got {spec!r}")
        if name.upper() in ("CPU", "GPU"):
            options[f"num_{name.lower()}s"] = value
        else:
            resources[name] = value
    if resources:
        options["resources"] = resources
    return options


def _question(config: BatchConfig) -> str:
    if config.question is not None:
        return question_text(config.question, "--question")
    try:
        return question_text(_read_prompt_file(config.prompt_file))
    except ConfigError as err:
        raise ConfigError(f"--prompt-file {config.prompt_file}: {err}") from None


def _read_prompt_file(name: str) -> str:
    """The text of --prompt-file, read only if it is a regular file (a FIFO would block the open)
    of question size (a larger file would only make the prefill crawl)."""
    limit = MAX_QUESTION_CHARS * 4  # UTF-8 takes at most 4 bytes a character
    try:
        info = os.stat(name)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("not a regular file")
        if info.st_size > limit:
            raise ConfigError(f"{info.st_size} bytes; a question is at most {MAX_QUESTION_CHARS} characters")
        with open(name, "rb") as fh:
            return fh.read(limit + 1).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot be read: {err.strerror or err}") from None


def _model_spec(spec: str) -> str:
    """An existing path made absolute (Ray workers run elsewhere: another cwd, another node);
    a configs/models name as given, resolved where the model is loaded."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def build_job(config: BatchConfig) -> BatchJob:
    """The BatchJob the config describes (a usage error for flags that contradict each other)."""
    from streamprune.runtime.batch_inputs import find_inputs
    from streamprune.runtime.batch_job import BatchJob, WorkerSettings

    if config.no_ray and (config.ray_address or config.actor_resource):
        raise ConfigError("--no-ray runs in this process: drop --ray-address/--actor-resource")
    settings = WorkerSettings(
        question=_question(config), model=_model_spec(config.model), method=config.method,
        retain=config.retain, max_tokens=config.max_tokens, fps=config.fps,
        max_new_tokens=config.max_new_tokens, seed=config.seed, placement=config.placement,
    )
    return BatchJob(
        inputs=find_inputs(config.inputs), output=Path(config.output), settings=settings,
        max_frames=config.max_frames, segment_seconds=config.segment_seconds,
        num_workers=config.num_workers, use_ray=not config.no_ray, ray_address=config.ray_address,
        actor_options=_actor_options(config.actor_resource, config.placement.device), overwrite=config.overwrite,
    )


def run(config: BatchConfig) -> int:
    """Run the batch the config describes, with a progress bar on a terminal and a summary line on
    stderr; 0 if every input is ok, 3 if some failed."""
    from tqdm import tqdm

    from streamprune.runtime.batch_job import run_job

    job = build_job(config)
    bar = tqdm(total=len(job.inputs), unit="file", disable=not sys.stderr.isatty(), file=sys.stderr,
               dynamic_ncols=True)

    def on_result(record: dict[str, Any] | None, report: BatchReport) -> None:
        bar.update(1)
        bar.set_postfix({"ok": report.ok, "failed": report.failed, "skipped": report.skipped,
                         "frames/s": f"{report.frames_per_s:.1f}"}, refresh=False)

    try:
        report = run_job(job, on_result)
    finally:
        bar.close()
    processed = report.ok + report.failed
    sys.stderr.write(
        f"batch: {report.ok} ok, {report.failed} failed, {report.skipped} skipped of {report.total} inputs "
        f"in {report.wall_s:.1f} s ({processed / report.wall_s if report.wall_s else 0:.2f} files/s, "
        f"{report.frames_per_s:.1f} frames/s)"
        + (f"; {report.workers_lost} model workers lost, {report.resubmitted} inputs resubmitted"
           if report.workers_lost else "")
        + f"; results in {job.output}\n")
    return report.exit_code

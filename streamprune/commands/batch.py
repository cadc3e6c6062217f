"""`streamprune batch`: answer one question about many (long) video files, on Ray or in-process.

    streamprune batch INPUT... --question Q | --prompt-file F --output results.jsonl
                     [--model PATH] [--method NAME] [--retain R] [--fps F] [--max-frames N]
                     [--ray-address auto|HOST:PORT] [--num-workers N] [--segment-seconds S]
                     [--overwrite] [--no-ray]

Writes one JSON line per input as it finishes and resumes where an interrupted run stopped (see
streamprune.runtime.batch). Exit code 0 if every input is ok, 3 if some failed (the rest were
processed), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from streamprune.errors import ConfigError

DEFAULT_SEGMENT_S = 60.0


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The `batch` subcommand's flags (the --model/--method/--retain/--max-tokens group is shared
    with `ask`)."""
    from streamprune.cli import add_model_method_flags
    from streamprune.cliargs import positive

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="video files (taken whatever their extension), folders (searched recursively "
                             "for video extensions) or quoted globs such as 'clips/**/*.mp4'")
    question = parser.add_mutually_exclusive_group(required=True)
    question.add_argument("--question", "-q", help="the question asked about every input")
    question.add_argument("--prompt-file", metavar="F", help="read the question from text file F")
    parser.add_argument("--output", "-o", required=True, metavar="FILE",
                        help="results, one JSON line per input (appended; an existing file is resumed)")
    add_model_method_flags(parser)
    parser.add_argument("--fps", type=positive(float), default=None,
                        help="frames sampled per second (default 1)")
    parser.add_argument("--max-frames", type=positive(int), default=None, metavar="N",
                        help="at most N frames per input, evenly spaced over the whole clip (default 16)")
    parser.add_argument("--max-new-tokens", type=positive(int), default=None, metavar="K",
                        help="answer length cap")
    parser.add_argument("--seed", type=int, default=None, help="seed for randomised methods (same for every input)")
    parser.add_argument("--ray-address", metavar="auto|HOST:PORT", default=None,
                        help="Ray cluster to run on ('auto': the one this machine belongs to); "
                             "default: start a local Ray instance")
    parser.add_argument("--num-workers", type=positive(int), default=1, metavar="N",
                        help="model actors in the pool, each holding one copy of the model (default 1)")
    parser.add_argument("--actor-resource", action="append", default=[], metavar="NAME=AMOUNT",
                        help="Ray resource each model actor requires, e.g. GPU=1 or a custom node label "
                             "(repeatable); decoding runs as ordinary CPU tasks")
    parser.add_argument("--segment-seconds", type=positive(float), default=DEFAULT_SEGMENT_S, metavar="S",
                        help=f"videos longer than S seconds are decoded as S-second segments in parallel, "
                             f"then joined in time order (default {DEFAULT_SEGMENT_S:g})")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the output over instead of skipping inputs already answered in it")
    parser.add_argument("--no-ray", action="store_true",
                        help="run in this process, one input at a time (no Ray needed)")


def _actor_options(specs: list[str]) -> dict[str, Any]:
    """NAME=AMOUNT flags -> Ray actor options (CPU/GPU go to num_cpus/num_gpus, others to resources)."""
    options: dict[str, Any] = {}
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


def _question(args: argparse.Namespace) -> str:
    if args.question is not None:
        text = args.question
    else:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {getattr(err, 'strerror', None) or err}") from None
    text = text.strip()
    if not text:
        raise ConfigError("the question is empty")
    return text


def build_job(args: argparse.Namespace):
    """The BatchJob the flags describe (defaults from configs/pipelines/batch.yaml, else ask's)."""
    from streamprune.config import AskConfig, load_pipeline_defaults
    from streamprune.runtime.batch import BatchJob, WorkerSettings, find_inputs

    if args.no_ray and (args.ray_address or args.actor_resource):
        raise ConfigError("--no-ray runs in this process: drop --ray-address/--actor-resource")
    cfg = load_pipeline_defaults(AskConfig, "batch")
    settings = WorkerSettings(
        question=_question(args),
        model=str(Path(args.model).resolve()) if args.model else cfg.model.path,
        method=args.method or cfg.method,
        retain=args.retain if args.retain is not None else cfg.retain,
        max_tokens=args.max_tokens,
        fps=args.fps or cfg.decode.fps,
        max_new_tokens=args.max_new_tokens or cfg.max_new_tokens,
        seed=args.seed if args.seed is not None else cfg.seed,
        attn_implementation=cfg.model.attn_implementation,
    )
    return BatchJob(
        inputs=find_inputs(args.inputs), output=Path(args.output), settings=settings,
        max_frames=args.max_frames or cfg.decode.max_frames, segment_seconds=args.segment_seconds,
        num_workers=args.num_workers, use_ray=not args.no_ray, ray_address=args.ray_address,
        actor_options=_actor_options(args.actor_resource), overwrite=args.overwrite,
    )


def run_batch(args: argparse.Namespace) -> int:
    """Run the batch the flags describe; 0 if every input is ok, 3 if some failed."""
    from tqdm import tqdm

    from streamprune.runtime.batch import run_job

    job = build_job(args)
    bar = tqdm(total=len(job.inputs), unit="file", disable=not sys.stderr.isatty(), file=sys.stderr,
               dynamic_ncols=True)

    def on_result(record, report) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Run as `python -m streamprune.commands.batch ...` (same flags as `streamprune batch`)."""
    import logging

    from streamprune.cli import OneLineParser
    from streamprune.errors import StreampruneError

    parser = OneLineParser(prog="batch_video", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    add_batch_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    try:
        return run_batch(args)
    except StreampruneError as err:
        sys.stderr.write(f"batch_video: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"batch_video: interrupted after {time.perf_counter() - started:.0f} s; re-run to resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

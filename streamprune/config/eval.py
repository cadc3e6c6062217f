"""Config of `streamprune eval` (multiple-choice video benchmarks, scored as lmms-eval scores them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamprune.config.fields import (model_option, name_list, option, positive_float, positive_int, retain_list,
                                       seed_option)
from streamprune.config.schema import DeviceConfig

EXAMPLE_DATA = "example"  # the shipped set: streamprune/assets/eval_example/example.jsonl


@dataclass
class EvalConfig:
    """`streamprune eval`: answer every multiple-choice question of DATA with every method x retain
    in one run and score them as lmms-eval does (greedy, 16 new tokens, the benchmark's prompt and
    answer parsing); accuracy overall and per task type and duration; resumable with --output."""

    data: str = option(EXAMPLE_DATA, "questions as JSON or JSON lines: our MCQ shape, or VideoMME / MLVU / "
                                     "LongVideoBench annotations (default 'example': the shipped held-out set)",
                       positional=True, nargs="?", metavar="DATA")
    video_root: str | None = option(None, "folder the items' video paths are relative to (default: DATA's "
                                          "folder)", metavar="DIR")
    layout: str = option("auto", "annotation layout: auto (from the fields), mcq, videomme, mlvu, longvideobench",
                         metavar="NAME")
    model: str = model_option()
    methods: list[str] = option(("all",), "comma-separated names, or 'all' (default)", parse=name_list)
    retain: list[float] = option((1.0, 0.5, 0.25, 0.1), "comma-separated budgets (default 1,0.5,0.25,0.1)",
                                 parse=retain_list)
    frames: int = option(32, "frames per video, evenly spaced (default 32, lmms-eval's VideoMME default)",
                         parse=positive_int, metavar="N")
    fps: float | None = option(None, "sample at F frames per second instead (still at most --frames)",
                               parse=positive_float, metavar="F")
    prompt: str = option("auto", "letters: the benchmark's lmms-eval prompt with lettered options; question: "
                                 "the question alone, scored by the option's text (models without letters in "
                                 "their vocabulary); auto picks by the tokenizer (default)", metavar="MODE")
    limit: int | None = option(None, "only the first N questions", parse=positive_int, metavar="N")
    output: str | None = option(None, "answers, one JSON line per question x method x retain (appended; "
                                      "re-running skips what is in it)", flags=("--output", "-o"), metavar="FILE")
    ray: bool = option(False, "spread the videos over Ray actors (a local Ray instance unless --ray-address)")
    ray_address: str | None = option(None, "Ray cluster to run on (implies --ray)", metavar="auto|HOST:PORT")
    num_workers: int = option(2, "model actors under --ray (default 2)", parse=positive_int, metavar="N")
    seed: int = seed_option()
    placement: DeviceConfig = field(default_factory=DeviceConfig)
    json: str | None = option(None, "write the accuracy rows and the run's metadata as JSON", metavar="FILE")
    plot: str | None = option(None, "plot accuracy vs tokens kept per method", metavar="FILE.png")

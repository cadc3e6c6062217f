"""`streamprune eval`: multiple-choice video benchmarks, every method x retain in one run.

    streamprune eval                                   # the shipped example set, every method
    streamprune eval videomme.json --video-root ~/Video-MME --methods stc,fastvid --retain 0.25 -o answers.jsonl
"""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

from streamprune.config.eval import EXAMPLE_DATA, EvalConfig
from streamprune.errors import EXIT_PARTIAL, ConfigError, InputError
from streamprune.outputs import check_output

log = logging.getLogger("streamprune.eval")
EXAMPLE_FILE = Path(__file__).resolve().parent.parent / "assets" / "eval_example" / "example.jsonl"
PROMPTS = ("auto", "letters", "question")


def _versions() -> dict[str, str]:
    import av
    import torch
    import transformers

    import streamprune

    return {"streamprune": getattr(streamprune, "__version__", "0.1.0"), "torch": torch.__version__,
            "transformers": transformers.__version__, "av": av.__version__, "python": platform.python_version()}


def run(config: EvalConfig) -> int:
    from tqdm import tqdm

    from streamprune.bench.eval_report import eval_rows, format_eval_table, format_group_table, plot_eval, write_eval_json
    from streamprune.data.mcq import load_items
    from streamprune.data.mcq_scoring import MAX_NEW_TOKENS, PARSER_OF
    from streamprune.models import load_model, resolve_placement
    from streamprune.pruning.names import method_names
    from streamprune.pruning.recipe import build_recipe
    from streamprune.runtime.batch_results import ResultsFile, latest_records
    from streamprune.runtime.eval_job import EvalPlan, by_video, record_key, run_local, run_ray, spells_letters

    for flag in ("json", "plot", "output"):
        if getattr(config, flag):
            check_output(getattr(config, flag), f"--{flag}")
    if config.prompt not in PROMPTS:
        raise ConfigError(f"--prompt must be one of {', '.join(PROMPTS)}, got {config.prompt!r}")
    data = EXAMPLE_FILE if config.data == EXAMPLE_DATA else Path(config.data)
    items = load_items(data, config.layout)[:config.limit]
    root = Path(config.video_root) if config.video_root else data.parent
    if not root.is_dir():
        raise InputError(f"--video-root {root} is not a directory")
    methods = method_names(config.methods)
    recipes = [("none", 1.0)] + [(m, r) for m in methods if m != "none" for r in config.retain]
    for method, retain in recipes:
        build_recipe(method, retain=retain)  # an unknown name or a bad budget fails before any work
    ray = bool(config.ray or config.ray_address)
    adapter = load_model(config.model, config.placement)  # the driver's copy answers unless --ray
    letters = config.prompt == "letters" or (config.prompt == "auto" and spells_letters(adapter.tokenizer))
    plan = EvalPlan(tuple(recipes), config.frames, config.fps, letters, config.seed)
    results = ResultsFile(config.output) if config.output else None
    wanted = {record_key(i.id, m, r) for i in items for m, r in recipes}
    done = {}
    if results is not None:
        kept = latest_records(results.read())
        if results.unreadable_lines:  # a line cut short by an interrupted run: drop it before appending
            results.rewrite(list(kept.values()))
        done = {k: r for k, r in kept.items() if k in wanted}
    skip = frozenset(k for k, r in done.items() if r.get("status") == "ok")
    groups = by_video(items, root)
    if ray:
        from streamprune.runtime.ray_connect import init_ray

        del adapter
        init_ray(config.ray_address, include_dashboard=False, log_to_driver=False)
        batches = run_ray(config.model, config.placement, groups, plan, skip, config.num_workers)
    else:
        batches = run_local(adapter, groups, plan, skip)
    if skip:
        log.warning("resuming %s: %d of %d answers already there", config.output, len(skip), len(wanted))
    try:
        for batch in tqdm(batches, total=len(groups), desc="eval", unit="video", disable=not sys.stderr.isatty()):
            for record in batch:
                done[record["input"]] = record
                if results is not None:
                    results.append(record)
    finally:
        if results is not None:
            results.close()
    rows = eval_rows(list(done.values()), recipes)
    placement = resolve_placement(config.placement)
    print(f"{data.name}: {len(items)} questions on {len(groups)} videos; {'lettered lmms-eval prompt' if letters else 'question-only prompt, scored by option text'}; "
          f"at most {config.frames} frames{f' at {config.fps:g} fps' if config.fps else ''}; {placement.describe()}")
    print(format_eval_table(rows))
    print("\naccuracy by task type:\n" + format_group_table(rows, "by_task_type"))
    if any(len(r["by_duration"]) > 1 for r in rows):
        print("\naccuracy by duration:\n" + format_group_table(rows, "by_duration"))
    meta = {"data": str(data), "layout": config.layout, "questions": len(items), "videos": len(groups),
            "benchmarks": sorted({i.benchmark for i in items}),
            "parsers": {b: PARSER_OF[b] for b in sorted({i.benchmark for i in items})},
            "prompt": "letters" if letters else "question", "max_new_tokens": MAX_NEW_TOKENS, "greedy": True,
            "frames": config.frames, "fps": config.fps, "model": config.model, "device": str(placement.device),
            "ray": ray, "versions": _versions(), "machine": f"{platform.machine()} {platform.processor()}"}
    if config.json:
        write_eval_json(rows, config.json, meta)
    if config.plot:
        plot_eval(rows, config.plot, f"eval: {data.name}, {len(items)} questions, {placement.describe()}")
    failed = sum(r["errors"] for r in rows)
    if failed:
        sys.stderr.write(f"streamprune: {failed} answers failed (their videos could not be read); "
                         f"see {config.output or 'the log'}\n")
        return EXIT_PARTIAL
    return 0

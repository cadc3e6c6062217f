"""`streamprune`: one entry point, one subcommand per job.

Exit codes: 0 success; 2 bad input or usage (missing/invalid file, flag out of range, unknown
method or model); 3 a batch finished with some inputs failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from streamprune.cliargs import positive, retain_ratio
from streamprune.errors import EXIT_USAGE, ConfigError, InputError, StreampruneError

log = logging.getLogger("streamprune")

EPILOG = "exit codes: 0 ok, 2 bad input or usage, 3 batch finished with failures, 130 interrupted"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"streamprune: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def add_model_method_flags(p: argparse.ArgumentParser) -> None:
    """--model/--method/--retain/--max-tokens, shared by every command that runs a model."""
    p.add_argument("--model", metavar="PATH", help="model directory (save_pretrained layout) or a configs/models "
                                                   "name; default: the embedded model")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="pruning method or pipeline (see `streamprune methods`); default: none")
    p.add_argument("--retain", type=retain_ratio, default=None, metavar="R",
                   help="share of visual tokens kept, in (0, 1]; default: the method's own (1.0 for none)")
    p.add_argument("--max-tokens", type=positive(int), default=None, metavar="N",
                   help="absolute cap on kept visual tokens (with --retain the smaller wins)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="streamprune", description=__doc__.split("\n")[0], epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    ask = sub.add_parser("ask", help="answer a question about a video file", epilog=EPILOG,
                         description="Decode VIDEO with PyAV, encode the frames, prune the visual tokens "
                                     "to the budget, prefill and generate the answer.")
    ask.add_argument("video", metavar="VIDEO", help="video file (any container/codec FFmpeg reads)")
    ask.add_argument("--question", "-q", required=True, help="the question to answer")
    add_model_method_flags(ask)
    ask.add_argument("--fps", type=positive(float), default=None, help="frames sampled per second (default 1)")
    ask.add_argument("--max-frames", type=positive(int), default=None, metavar="N",
                     help="at most N frames, evenly spaced over the clip (default 16)")
    ask.add_argument("--max-new-tokens", type=positive(int), default=None, metavar="K", help="answer length cap")
    ask.add_argument("--seed", type=int, default=None, help="seed for randomised methods")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of the answer")

    sub.add_parser("methods", help="list pruning methods and pipelines with their defaults",
                   description="One line per registered method and per configs/methods pipeline.")

    demo = sub.add_parser("demo", help="answer a few held-out synthetic questions (start here)", epilog=EPILOG,
                          description="Answer held-out synthetic video questions with the default model; print "
                                      "each question, the answer, the truth and the tokens kept, then the accuracy.")
    add_model_method_flags(demo)
    demo.add_argument("--n", type=positive(int), default=8, help="number of questions (default 8)")

    bench = sub.add_parser("bench", help="benchmarks (accuracy vs retention, decoding)", epilog=EPILOG)
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=OneLineParser)
    acc = bench_sub.add_parser("accuracy", epilog=EPILOG,
                               help="every method at every budget, in one run, on the held-out set",
                               description="Accuracy, accuracy retained, tokens kept, encode/prefill/total time, "
                                           "speedups and prefill FLOPs for each method x retain on held-out "
                                           "synthetic QA, measured in one run.")
    acc.add_argument("--model", metavar="PATH", help="model directory; default: the embedded model")
    acc.add_argument("--methods", default="all", help="comma-separated names, or 'all' (default)")
    acc.add_argument("--retain", default="1,0.5,0.25,0.1", help="comma-separated budgets (default 1,0.5,0.25,0.1)")
    acc.add_argument("--n", type=positive(int), default=300, help="held-out questions (default 300)")
    acc.add_argument("--seed", type=int, default=0)
    acc.add_argument("--json", metavar="FILE", help="write rows and run metadata as JSON")
    acc.add_argument("--plot", metavar="FILE.png", help="plot accuracy vs tokens kept and vs prefill time")
    dec = bench_sub.add_parser("decode", epilog=EPILOG, help="our PyAV decoding vs `ffmpeg -i FILE -f null -`",
                               description="Decoding throughput of streamprune (dense: all frames; sparse: 1 fps, "
                                           "keyframe-aware) against the ffmpeg CLI on the same file, in one run.")
    dec.add_argument("file", nargs="?", help="video file (or --generate SECONDS)")
    dec.add_argument("--generate", type=positive(float), metavar="SECONDS",
                     help="bench a generated 640x360 H.264 clip this long")
    dec.add_argument("--repeats", type=positive(int), default=3, help="interleaved repeats, best kept (default 3)")
    dec.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    rob = bench_sub.add_parser("robot", epilog=EPILOG, help="success and control rate per method x budget",
                               description="Closed-loop success rate and control steps/s of the VLA with no "
                                           "pruning and each method at each budget, on the same held-out episodes.")
    rob.add_argument("--policy", metavar="PATH", help="VLA policy directory; default: the embedded policy")
    rob.add_argument("--env", default="streamprune/PickColor-v0", help="env id (default streamprune/PickColor-v0)")
    rob.add_argument("--methods", default="vla_pruner,fastv,uniform,random", help="comma-separated methods")
    rob.add_argument("--retain", default="0.5,0.25,0.1", help="comma-separated budgets (default 0.5,0.25,0.1)")
    rob.add_argument("--episodes", type=positive(int), default=100, help="episodes per row (default 100)")
    rob.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    rob.add_argument("--plot", metavar="FILE.png", help="plot success and control steps/s against retain")

    from pipelines.batch_video import add_batch_arguments
    from pipelines.live_qa import add_live_arguments, add_publish_arguments
    from pipelines.robot_loop import add_robot_arguments, add_serve_arguments
    from streamprune.viz import add_viz_arguments

    viz = sub.add_parser("viz", epilog=EPILOG, help="draw the tokens a method keeps on each frame",
                         description="Decode VIDEO, run the pruning method and write the clip (.mp4) or a contact "
                                     "sheet (.png) with kept tokens outlined and pruned ones dimmed.")
    add_viz_arguments(viz)
    batch = sub.add_parser("batch", epilog=EPILOG, help="answer questions over many videos on Ray (resumable)",
                           description="Decode, prune and answer for every input video, spread over Ray actors; "
                                       "one JSON line per input; re-running skips inputs already ok.")
    add_batch_arguments(batch)
    robot = sub.add_parser("robot", epilog=EPILOG, help="closed-loop episodes of a VLA policy in a gymnasium env",
                           description="Run closed-loop episodes and print success rate, mean episode length, "
                                       "policy latency (median, p95), control steps/s and visual tokens kept.")
    add_robot_arguments(robot)
    serve = sub.add_parser("serve-policy", epilog=EPILOG, help="serve a VLA policy to robot clients over zmq",
                           description="Answer observation -> action requests (msgpack header + raw image buffer) "
                                       "from robot clients in robots/.")
    add_serve_arguments(serve)
    live = sub.add_parser("live", epilog=EPILOG, help="answer questions about a live stream (stdin questions)",
                          description="Stream frames from a camera, URL, file or zmq publisher through the pruning "
                                      "pipeline into a bounded visual memory; answer each stdin line as a question "
                                      "about the recent stream.")
    add_live_arguments(live)
    publish = sub.add_parser("publish", epilog=EPILOG, help="publish a camera or file as a zmq frame stream",
                             description="Turn a source into a zmq publisher (msgpack header + raw RGB buffer) "
                                         "for a remote `streamprune live --source zmq://...`.")
    add_publish_arguments(publish)
    return parser


def cmd_ask(args: argparse.Namespace) -> int:
    from streamprune.config import AskConfig, load_pipeline_defaults
    from streamprune.decode import decode_frames
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.pipeline import build_pipeline

    cfg = load_pipeline_defaults(AskConfig, "ask")
    method = args.method or cfg.method
    pipeline = build_pipeline(method, retain=args.retain or cfg.retain, max_tokens=args.max_tokens)
    fps = args.fps or cfg.decode.fps
    max_frames = args.max_frames or cfg.decode.max_frames
    if not Path(args.video).is_file():
        raise InputError(f"video file not found: {args.video}")
    start = time.perf_counter()
    frames = decode_frames(args.video, fps=fps, max_frames=max_frames)
    if not frames:
        raise InputError(f"no frames decoded from {args.video}")
    decode_ms = (time.perf_counter() - start) * 1000
    loaded = time.perf_counter()
    adapter = load_model(args.model or cfg.model.path, cfg.model.attn_implementation)
    load_ms = (time.perf_counter() - loaded) * 1000
    import numpy as np

    clip = np.stack([f.image for f in frames])
    answer = adapter.answer(clip, args.question, pipeline, PruneContext(seed=args.seed or cfg.seed),
                            fps=fps, max_new_tokens=args.max_new_tokens or cfg.max_new_tokens)
    timings = {f"{k}_ms": round(v, 3) for k, v in answer.timings_ms.items()}
    total_ms = round((time.perf_counter() - start) * 1000 - load_ms, 3)  # excludes the one-off model load
    if args.json:
        print(json.dumps({
            "answer": answer.text, "video": str(args.video), "question": args.question,
            "frames": len(frames), "frame_timestamps": [round(f.timestamp, 3) for f in frames],
            "visual_tokens_in": answer.visual_tokens_in, "visual_tokens_kept": answer.visual_tokens_kept,
            "method": method, "retain": pipeline.budget.retain, "max_tokens": pipeline.budget.max_tokens,
            "model": str(adapter.model_dir), "family": adapter.family,
            # decode_ms is the LLM's token decoding; video_decode_ms is PyAV's frame decoding
            **{k: timings.get(k, 0.0) for k in ("encode_ms", "prune_ms", "prefill_ms", "decode_ms")},
            "video_decode_ms": round(decode_ms, 3), "model_load_ms": round(load_ms, 3), "total_ms": total_ms,
        }))
    else:
        print(answer.text)
        log.info("%d frames, %d/%d visual tokens kept, %.0f ms", len(frames), answer.visual_tokens_kept,
                 answer.visual_tokens_in, total_ms)
    return 0


def load_model(spec: str | None, attn_implementation: str | None = None):
    """The adapter for `spec` (a directory or a configs/models name), or the embedded default."""
    from streamprune.config import resolve_model
    from streamprune.models import load_adapter
    from streamprune.models.default import default_model_dir

    cfg = resolve_model(spec)
    return load_adapter(cfg.path if cfg.path is not None else default_model_dir(),
                        attn_implementation or cfg.attn_implementation)


def cmd_methods(args: argparse.Namespace) -> int:
    from streamprune.config import CONFIG_DIR, method_config
    from streamprune.pruning.registry import available, describe

    print("registered methods:")
    for name in available():
        print(f"  {describe(name)}")
    files = sorted((CONFIG_DIR / "methods").glob("*.yaml"))
    if files:
        print("pipelines (configs/methods):")
        for path in files:
            cfg = method_config(path.stem)
            stages = " -> ".join(s.method for s in cfg.stages)
            print(f"  {path.stem}: {cfg.description or stages} [stages: {stages}; retain={cfg.retain}]")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamprune.data.synthetic_qa import make_items
    from streamprune.models.default import TRAINED_DIR
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.pipeline import build_pipeline

    pipeline = build_pipeline(args.method or "none", retain=args.retain, max_tokens=args.max_tokens)
    adapter = load_model(args.model)
    if args.model is None and adapter.model_dir != TRAINED_DIR:
        print("note: the trained default model is not installed; using a tiny random model (answers are noise)")
    items = make_items("test", num_clips=args.n)[: args.n]
    correct = 0
    for i, item in enumerate(items, 1):
        answer = adapter.answer(item.clip, item.question, pipeline, PruneContext(), fps=8.0, max_new_tokens=4)
        ok = answer.text == item.answer
        correct += ok
        print(f"[{i}/{len(items)}] Q: {item.question}\n      A: {answer.text!r}  truth: {item.answer!r}  "
              f"{'ok' if ok else 'WRONG'}  tokens kept {answer.visual_tokens_kept}/{answer.visual_tokens_in}")
    print(f"accuracy: {correct}/{len(items)} = {correct / len(items):.1%} "
          f"(method {pipeline.name}, retain {pipeline.budget.retain}, model {adapter.model_dir})")
    return 0


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ConfigError(f"{flag} values must be in (0, 1], got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    return {"accuracy": bench_accuracy, "decode": bench_decode, "robot": bench_robot}[args.bench](args)


def bench_decode(args: argparse.Namespace) -> int:
    import tempfile

    from streamprune.bench.decode_bench import generate_clip, run_decode_bench

    if args.file is None and args.generate is None:
        raise ConfigError("bench decode needs a FILE or --generate SECONDS")
    if args.file is not None and not Path(args.file).is_file():
        raise InputError(f"video file not found: {args.file}")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or generate_clip(Path(tmp) / "bench.mp4", args.generate)
        result = run_decode_bench(path, args.repeats)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def bench_robot(args: argparse.Namespace) -> int:
    from pipelines.robot_loop import compare_methods, format_robot_table, load_policy, plot_robot

    retains = _float_list(args.retain, "--retain")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from streamprune.config import method_config

    for m in methods:
        method_config(m)
    policy = load_policy(args.policy)
    rows = compare_methods(policy, args.env, methods, retains, args.episodes, progress=sys.stderr.isatty())
    print(format_robot_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"policy": str(policy.adapter.model_dir), "env": args.env,
                                               "rows": rows}, indent=1))
    if args.plot:
        plot_robot(rows, args.plot)
    return 0


def bench_accuracy(args: argparse.Namespace) -> int:
    import platform

    from streamprune.bench.accuracy import format_table, plot, run_accuracy_bench, write_json
    from streamprune.config import CONFIG_DIR
    from streamprune.pruning.registry import available

    retains = _float_list(args.retain, "--retain")
    registered = available()
    if args.methods == "all":  # every registered method and every pipeline file of another name (e.g. stc)
        files = sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))
        methods = [m for m in registered if m != "none"] + [f for f in files if f not in registered]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        from streamprune.config import method_config

        for m in methods:
            method_config(m)  # raises a one-line error for unknown names
    adapter = load_model(args.model)
    rows = run_accuracy_bench(adapter, methods, retains, args.n, seed=args.seed, progress=sys.stderr.isatty())
    print(format_table(rows))
    meta = {"model": str(adapter.model_dir), "family": adapter.family, "n": args.n, "retains": retains,
            "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}",
            "torch_threads": __import__("torch").get_num_threads()}
    if args.json:
        write_json(rows, args.json, meta)
    if args.plot:
        plot(rows, args.plot)
    return 0


def _lazy(module: str, function: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)
    return run


COMMANDS = {
    "ask": cmd_ask, "methods": cmd_methods, "demo": cmd_demo, "bench": cmd_bench,
    "viz": _lazy("streamprune.viz", "run_viz"),
    "batch": _lazy("pipelines.batch_video", "run_batch"),
    "robot": _lazy("pipelines.robot_loop", "run_robot"),
    "serve-policy": _lazy("pipelines.robot_loop", "run_serve"),
    "live": _lazy("pipelines.live_qa", "run_live"),
    "publish": _lazy("pipelines.live_qa", "run_publish"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except StreampruneError as err:
        sys.stderr.write(f"streamprune: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("streamprune: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Live stream question answering (`streamprune live`) and frame publishing (`streamprune publish`).

    streamprune live --source synthetic:scene_every=90 --kv-budget 2048 --stats-json stats.jsonl
    what moves?
    @30 what colour is the square?      (waits until the stream reaches 30 s)

Questions are read from stdin, one per line, at any time while the stream runs; each answer is
printed as `[t=12.40s] answer` with the stream time of the newest frame it saw (and, with -v, the
span of stream the memory covered). The run ends at stdin EOF once every question is answered;
with --max-frames it first waits for the stream to reach that many frames (or to end).

    streamprune publish --source file:clip.mp4 --loop --bind tcp://127.0.0.1:5555
    streamprune live --source zmq://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from streamprune.errors import StreampruneError

log = logging.getLogger("streamprune.live")


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    """The `live` subcommand's flags."""
    from streamprune.cli import add_model_method_flags
    from streamprune.cliargs import positive

    parser.add_argument("--source", required=True, metavar="SOURCE",
                        help="file:PATH, camera:N, rtsp://..., http(s)://..., zmq://HOST:PORT or synthetic:[k=v,...]")
    add_model_method_flags(parser)
    parser.add_argument("--fps", type=positive(float), default=2.0,
                        help="frames per second of stream taken into memory (default 2)")
    parser.add_argument("--kv-budget", type=positive(int), default=2048, metavar="TOKENS",
                        help="most visual tokens the memory holds, hence the KV cache of each answer (default 2048)")
    parser.add_argument("--window", type=positive(int), default=8, metavar="FRAMES",
                        help="newest frames kept at full (per-frame pruned) detail (default 8)")
    parser.add_argument("--incremental-kv", action="store_true",
                        help="keep the memory's KV cache between questions (LLaVA-OneVision; eager attention) "
                             "instead of re-prefilling the memory for each question")
    parser.add_argument("--no-ray", action="store_true", help="run the stages as threads in this process")
    parser.add_argument("--ray-address", metavar="auto|HOST:PORT", default=None,
                        help="Ray cluster to run the stage actors on; default: start a local Ray instance")
    parser.add_argument("--stats-json", metavar="FILE", help="append a JSON stats line every --stats-interval s")
    parser.add_argument("--stats-interval", type=positive(float), default=1.0, metavar="S")
    parser.add_argument("--loop", action="store_true", help="repeat a file or synthetic source")
    parser.add_argument("--max-frames", type=positive(int), default=None, metavar="N",
                        help="stop reading the source after N frames")
    parser.add_argument("--queue", type=positive(int), default=32, metavar="FRAMES",
                        help="frames waiting for the encoder before the oldest is dropped (default 32)")
    parser.add_argument("--max-new-tokens", type=positive(int), default=16, metavar="K", help="answer length cap")
    parser.add_argument("--threads", type=positive(int), default=1, help="torch threads per stage (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for randomised methods")


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    """The `publish` subcommand's flags."""
    parser.add_argument("--source", required=True, metavar="SOURCE", help="any source `live` accepts except zmq")
    parser.add_argument("--bind", default="tcp://127.0.0.1:5555", metavar="ENDPOINT",
                        help="zmq endpoint to publish on (default tcp://127.0.0.1:5555; port * picks a free one)")
    parser.add_argument("--loop", action="store_true", help="repeat a file or synthetic source")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback bind (the wire has no authentication)")


def _parse_question(line: str) -> tuple[str, float | None]:
    """`@T question` asks once the stream reached T seconds; anything else asks now."""
    text = line.strip()
    if text.startswith("@"):
        head, _, rest = text[1:].partition(" ")
        try:
            return rest.strip(), float(head)
        except ValueError:
            pass
    return text, None


def run_live(args: argparse.Namespace) -> int:
    """`streamprune live`: answer stdin questions about a stream from bounded memory."""
    import torch

    from streamprune.memory import MemoryConfig
    from streamprune.runtime.live import LiveConfig, LiveRunner, LocalStages, RayStages
    from streamprune.sources import open_source

    torch.set_num_threads(args.threads)
    config = LiveConfig(
        model=args.model, method=args.method or "none", retain=args.retain, max_tokens=args.max_tokens,
        fps=args.fps, memory=MemoryConfig(kv_budget=args.kv_budget, recent_frames=args.window),
        queue_frames=args.queue, max_new_tokens=args.max_new_tokens, stats_interval=args.stats_interval,
        max_frames=args.max_frames, threads=args.threads, seed=args.seed, incremental_kv=args.incremental_kv,
    )
    source = open_source(args.source, loop=args.loop, realtime=True)
    if args.no_ray:
        stages = LocalStages(config)
    else:
        import ray

        if not ray.is_initialized():
            address = args.ray_address or "local"
            ray.init(address=address, include_dashboard=False, log_to_driver=getattr(args, "verbose", False))
        stages = RayStages(config)
    runner = LiveRunner(source, stages, config, args.stats_json).start()
    answers: list[Future] = []
    printing = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-answer")
    try:
        for line in sys.stdin:
            question, at = _parse_question(line)
            if not question:
                continue
            future = pool.submit(runner.ask, question, at, 3600.0)
            future.add_done_callback(lambda f, q=question: _print_answer(f, q, printing))
            answers.append(future)
        for future in answers:
            future.exception()
        if args.max_frames is not None:
            runner.wait_stream_end()
    finally:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        stages.close()
    if runner.error is not None:
        if isinstance(runner.error, StreampruneError):
            raise runner.error
        raise RuntimeError(f"live pipeline failed: {runner.error}") from runner.error
    s = runner.stats
    log.info("frames in %d, processed %d, dropped %d; memory %d tokens", s.frames_in, s.frames_processed,
             s.frames_dropped, s.tokens)
    errors = [f.exception() for f in answers if f.exception() is not None]
    for error in errors:
        if isinstance(error, StreampruneError):
            raise error
    return 1 if errors else 0


def _print_answer(future: Future, question: str, lock: threading.Lock) -> None:
    with lock:
        error = future.exception()
        if error is not None:
            sys.stderr.write(f"streamprune: error answering {question!r}: {error}\n")
            return
        answer = future.result()
        print(f"[t={answer.stream_time:.2f}s] {answer.text}", flush=True)
        log.info("%r: memory %.2f-%.2f s, %d tokens, %.0f ms", question, answer.memory_start, answer.stream_time,
                 answer.visual_tokens, answer.latency_ms)


def run_publish(args: argparse.Namespace) -> int:
    """`streamprune publish`: serve a source's frames on a zmq PUB socket until it ends or Ctrl-C."""
    from streamprune.errors import ConfigError
    from streamprune.sources import open_source
    from streamprune.transport import run_publisher

    if args.source.lower().startswith("zmq:"):
        raise ConfigError("publish reads a file, camera, URL or synthetic source, not zmq")
    source = open_source(args.source, loop=args.loop, realtime=True)
    stop = threading.Event()
    try:
        stats = run_publisher(source, args.bind, stop, allow_remote=args.allow_remote,
                              on_ready=lambda endpoint: sys.stderr.write(f"publishing on {endpoint}\n"))
    finally:
        stop.set()
    sys.stderr.write(f"published {stats.frames_sent} frames ({stats.fps:.1f} fps)\n")
    return 0

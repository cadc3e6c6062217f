"""`streamprune live` (question answering on a live stream) and `streamprune publish` (a source as a
zmq frame stream).

    streamprune live --source synthetic:scene_every=90 --kv-budget 2048 --stats-json stats.jsonl
    what moves?
    @30 what colour is the square?      (waits until the stream reaches 30 s)

Frames go through the stage graph (runtime/live_stages.py): the vision tower with the recipe's
STC-Cacher, online temporal segments (FastVID, HoliTom) pruned whole when they close, the memory,
and the LLM with the recipe's inner-LLM stage (FastV, HoliTom inner, FrameFusion) at answer time.
Questions are read from stdin, one per line, at any time while the stream runs; each answer is
printed as `[t=12.40s] answer` with the stream time of the newest frame it saw (and, with -v, the
span of stream the memory covered). The run ends at stdin EOF once every question is answered;
with --max-frames it first waits for the stream to reach that many frames (or to end).

    streamprune publish --source file:clip.mp4 --loop --bind tcp://127.0.0.1:5555
    streamprune live --source zmq://127.0.0.1:5555
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TextIO

from streamprune.config import LiveConfig, PublishConfig
from streamprune.config.fields import question_text
from streamprune.errors import EXIT_USAGE, ConfigError, StreampruneError
from streamprune.outputs import check_output

log = logging.getLogger("streamprune.live")


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


def _lines(stdin: TextIO) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each stdin line as it arrives; text None for a line that is not
    UTF-8 (read as bytes, so one bad line is reported and skipped, not a decoding crash)."""
    lines = getattr(stdin, "buffer", stdin)
    for number, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                line = None
        yield number, line


def run(config: LiveConfig) -> int:
    """`streamprune live`: answer stdin questions about a stream from bounded memory. A question
    that cannot be asked (not UTF-8, too long) and a question that fails each get one error line
    as they happen; the exit code is then 2 (1 if some failed for another reason)."""
    import torch

    from streamprune.runtime.live_runner import LiveRunner
    from streamprune.runtime.live_stages import LocalStages, RayStages
    from streamprune.sources import open_source

    torch.set_num_threads(config.threads)
    if config.target_latency_ms is not None and config.incremental_kv:
        raise ConfigError("--target-latency-ms chooses memory tokens per answer, which --incremental-kv's one "
                          "shared cache cannot; use one of them")
    if config.stats_json:
        check_output(config.stats_json, "--stats-json")
    source = open_source(config.source, loop=config.loop, realtime=True)
    if config.no_ray:
        stages = LocalStages(config)
    else:
        from streamprune.runtime.ray_connect import init_ray

        init_ray(config.ray_address, include_dashboard=False,
                 log_to_driver=logging.getLogger().isEnabledFor(logging.INFO))
        stages = RayStages(config)
    runner = LiveRunner(source, stages, config, config.stats_json).start()
    answers: list[Future] = []
    printing = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-answer")
    rejected = 0
    try:
        for number, line in _lines(sys.stdin):
            try:
                if line is None:
                    raise ConfigError(f"stdin line {number} is not valid UTF-8 text")
                question, at = _parse_question(line)
                if not question:
                    continue
                question = question_text(question, f"the question on stdin line {number}")
            except ConfigError as err:
                rejected += 1
                with printing:
                    sys.stderr.write(f"streamprune: error: {err}; skipped\n")
                continue
            future = pool.submit(runner.ask, question, at, 3600.0)
            future.add_done_callback(lambda f, q=question: _print_answer(f, q, printing))
            answers.append(future)
        for future in answers:
            future.exception()
        if config.max_frames is not None:
            runner.wait_stream_end()
    finally:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        stages.close()
    if runner.error is not None:
        if isinstance(runner.error, StreampruneError):
            raise runner.error
        raise RuntimeError(f"live stream failed: {runner.error}") from runner.error
    s = runner.stats
    log.info("frames in %d, processed %d, dropped %d; memory %d tokens; %d segments closed; STC-Cacher hits "
             "%d/%d (vision FLOPs saved %.0f%%)", s.frames_in, s.frames_processed, s.frames_dropped, s.tokens,
             s.segments_closed, s.cacher_hits, s.cacher_frames, 100 * s.vision_flops_saved_share)
    errors = [f.exception() for f in answers if f.exception() is not None]  # each reported as it happened
    if rejected or any(isinstance(e, StreampruneError) for e in errors):
        return EXIT_USAGE
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


def run_publish(config: PublishConfig) -> int:
    """`streamprune publish`: serve a source's frames on a zmq PUB socket until it ends or Ctrl-C."""
    from streamprune.errors import ConfigError
    from streamprune.sources import open_source
    from streamprune.transport import run_publisher

    if config.source.lower().startswith("zmq:"):
        raise ConfigError("publish reads a file, camera, URL or synthetic source, not zmq")
    source = open_source(config.source, loop=config.loop, realtime=True)
    stop = threading.Event()
    try:
        stats = run_publisher(source, config.bind, stop, allow_remote=config.allow_remote,
                              on_ready=lambda endpoint: sys.stderr.write(f"publishing on {endpoint}\n"))
    finally:
        stop.set()
    sys.stderr.write(f"published {stats.frames_sent} frames ({stats.fps:.1f} fps)\n")
    return 0

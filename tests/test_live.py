"""Live QA pipeline: bounded memory over a long stream, questions during the stream, scene cuts,
drop-oldest backpressure, a Ray encoder restart, a zmq source with hostile messages."""

from __future__ import annotations

import io
import json
import logging
import re
import threading

import msgpack
import numpy as np
import pytest
import torch
import zmq

from streamprune.memory import MemoryConfig
from streamprune.config import LiveConfig
from streamprune.runtime.live_runner import LiveRunner
from streamprune.runtime.live_stages import LocalStages
from streamprune.runtime.queues import DropOldestQueue
from streamprune.sources import open_source
from streamprune.transport.wire import encode

log = logging.getLogger(__name__)
TOKENS_PER_FRAME = 16  # tiny LLaVA-OV: 32 px, patch 4 -> 8x8 -> pooled 4x4



@pytest.fixture(scope="module")
def llava_stages(tiny_model_dirs):
    """In-process stages on the tiny LLaVA-OV (method none), memory reset per test by `fresh`."""
    config = LiveConfig(model=str(tiny_model_dirs["llava_onevision"]))
    return LocalStages(config)


def fresh(stages: LocalStages, memory: MemoryConfig) -> LocalStages:
    from streamprune.memory import StreamingMemory

    stages.memory.memory = StreamingMemory(memory, stages.memory.memory.dim)
    stages.memory.frames = 0
    return stages


def test_drop_oldest_queue_drops_the_oldest_and_counts():
    q = DropOldestQueue(3)
    for i in range(7):
        q.put(i)
    assert q.take_dropped() == 4 and q.take_dropped() == 0
    assert q.get_batch(10, timeout=0) == [4, 5, 6]
    q.close()
    assert not q.put(8) and q.get_batch(10, timeout=0) == []


def test_question_attention_credited_to_memory_is_the_eager_last_query_row(tiny_model_dirs):
    from streamprune.models import load_adapter
    from streamprune.models.base import EncodedVideo
    from streamprune.runtime.live_stages import EncodeStage
    from streamprune.runtime.memory_stage import MemoryStage
    from streamprune.types import Frame, VisualTokens
    from tests.tiny import random_clip

    adapter = load_adapter(tiny_model_dirs["llava_onevision"], "eager")
    encoder = EncodeStage(None, adapter=adapter)
    stage = MemoryStage(None, MemoryConfig(kv_budget=128, recent_frames=2), max_new_tokens=1, adapter=adapter)
    frames = [Frame(image=img, timestamp=i / 10, index=i) for i, img in enumerate(random_clip(4, 32, 32))]
    stage.add(encoder.process(frames, 10.0), 10.0)
    before = stage.memory.scores().clone()
    snap = stage.memory.snapshot()
    stage.ask("what moves ?")
    credited = stage.memory.scores() - before

    question = "what moves ?"
    m = len(snap)
    tokens = VisualTokens(snap.features, VisualTokens.grid_positions(1, 1, m), (1, 1, m))
    video = EncodedVideo(tokens, snap.newline, 10.0)
    layout = adapter.layout(video, adapter.prompt_ids(question))
    with torch.inference_mode():
        out = adapter.language_model(inputs_embeds=layout.embeds[None], position_ids=layout.positions,
                                     output_attentions=True)
    row = out.attentions[stage.attention_layer][0, :, -1, layout.visual_slots].mean(0).double()
    assert torch.allclose(credited, row / row.sum(), atol=1e-6)
    assert credited.std() > 0  # not a uniform credit


@pytest.fixture(scope="module")
def eager_llava(tiny_model_dirs):
    """Tiny LLaVA-OV with eager attention and a prompt with text before the video."""
    from streamprune.models import load_adapter

    adapter = load_adapter(tiny_model_dirs["llava_onevision"], "eager")
    adapter.template = "the <video> question : {question} answer :"
    return adapter


def test_question_before_the_video_fills_the_prefix_and_incremental_kv_refuses_it(tiny_model_dirs):
    from streamprune.errors import ConfigError
    from streamprune.models import load_adapter
    from streamprune.runtime.memory_stage import MemoryStage

    adapter = load_adapter(tiny_model_dirs["llava_onevision"])
    adapter.template = "question : {question} <video> answer :"
    red, blue = adapter.prompt_ids("red"), adapter.prompt_ids("blue")
    assert red.prefix != blue.prefix and red.suffix == blue.suffix
    assert red.prefix[:2] == blue.prefix[:2] and len(red.prefix) == 3
    with pytest.raises(ConfigError, match="text before the video is fixed"):
        MemoryStage(None, MemoryConfig(kv_budget=128), adapter=adapter, incremental_kv=True)


def _frames(n: int, start: int = 0, seed: int = 0):
    from streamprune.types import Frame
    from tests.tiny import random_clip

    return [Frame(image=img, timestamp=(start + i) / 10, index=start + i)
            for i, img in enumerate(random_clip(n, 32, 32, seed=seed))]


def test_incremental_kv_answers_and_credits_exactly_like_reprefill(eager_llava):
    from streamprune.runtime.live_stages import EncodeStage
    from streamprune.runtime.memory_stage import MemoryStage

    encoder = EncodeStage(None, adapter=eager_llava)
    chunk = encoder.process(_frames(6), 10.0)
    memory = MemoryConfig(kv_budget=128, recent_frames=2)
    reprefill = MemoryStage(None, memory, max_new_tokens=4, adapter=eager_llava)
    incremental = MemoryStage(None, memory, max_new_tokens=4, adapter=eager_llava, incremental_kv=True)
    for stage in (reprefill, incremental):
        stage.add(chunk, 10.0)
    assert incremental.kv.length == 1 + 6 * TOKENS_PER_FRAME  # "the" + the memory
    before = [stage.memory.scores().clone() for stage in (reprefill, incremental)]
    a, b = reprefill.ask("what moves ?"), incremental.ask("what moves ?")
    assert a.text == b.text and a.stream_time == b.stream_time
    credit_a = reprefill.memory.scores() - before[0]
    credit_b = incremental.memory.scores() - before[1]
    assert torch.allclose(credit_a, credit_b, atol=1e-6)
    assert incremental.kv.length == 1 + 6 * TOKENS_PER_FRAME  # the question was cropped off again


def test_incremental_kv_drops_evicted_rows_and_keeps_the_rest_unchanged(eager_llava):
    from streamprune.runtime.live_stages import EncodeStage
    from streamprune.runtime.memory_stage import MemoryStage

    encoder = EncodeStage(None, adapter=eager_llava)
    memory = MemoryConfig(kv_budget=96, recent_frames=2, static_tau=2.0)  # no merging: eviction only
    stage = MemoryStage(None, memory, max_new_tokens=2, adapter=eager_llava, incremental_kv=True)
    stage.add(encoder.process(_frames(6), 10.0), 10.0)
    keys = {int(u): stage.kv.cache.layers[1].keys[0, :, 1 + i].clone()
            for i, u in enumerate(stage.memory.snapshot().uid)}
    stage.add(encoder.process(_frames(4, start=6, seed=1), 10.0), 10.0)
    snap = stage.memory.snapshot()
    assert stage.memory.evicted == 4 * TOKENS_PER_FRAME and stage.kv.length == 1 + len(snap) == 97
    for i, u in enumerate(snap.uid.tolist()):
        if u in keys:
            assert torch.equal(stage.kv.cache.layers[1].keys[0, :, 1 + i], keys[u])
    assert stage.ask("what moves ?").visual_tokens == 96


def test_incremental_kv_merge_averages_keys_and_values_with_the_merge_weights(eager_llava):
    from streamprune.memory.kv_cache import IncrementalKV

    kv = IncrementalKV(eager_llava)
    kv.appended(torch.randn(4, eager_llava.language_model.config.hidden_size))
    layer = kv.cache.layers[0]
    k, v = layer.keys[0].clone(), layer.values[0].clone()  # [H, 1 + 4, d]
    kv.merged(torch.tensor([0, 0]), torch.tensor([2, 3]), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 3.0]))
    expected = (2 * k[:, 1] + k[:, 3] + 3 * k[:, 4]) / 6
    assert torch.allclose(layer.keys[0, :, 1], expected, atol=1e-6)
    assert torch.allclose(layer.values[0, :, 1], (2 * v[:, 1] + v[:, 3] + 3 * v[:, 4]) / 6, atol=1e-6)
    assert torch.equal(layer.keys[0, :, 2], k[:, 2])


def test_unknown_methods_and_missing_models_are_refused_before_any_actor_starts(tmp_path):
    from streamprune.errors import ConfigError, ModelError
    from streamprune.models import check_model
    from streamprune.runtime.live_stages import unit_recipe

    with pytest.raises(ConfigError):
        unit_recipe("no_such_method", 0.5, None)
    assert unit_recipe("visionzip", 0.5, None).pre_llm
    assert unit_recipe("fastv", 0.5, None).inner_llm is not None  # runs at answer time (MemoryStage)
    with pytest.raises(ModelError, match="no config.json"):
        check_model(str(tmp_path / "missing"))


def test_memory_stays_within_budget_and_rss_flat_over_10000_frames(llava_stages, tmp_path):
    budget = 256
    config = LiveConfig(fps=None, memory=MemoryConfig(kv_budget=budget, recent_frames=8), batch_frames=64,
                        queue_frames=128, drop_oldest=False, stats_interval=0.05, max_frames=10_000)
    stages = fresh(llava_stages, config.memory)
    stats_file = tmp_path / "stats.jsonl"
    source = open_source("synthetic:width=32,height=32,scene_every=250,seed=3", realtime=False)
    runner = LiveRunner(source, stages, config, stats_file).start()
    try:
        assert runner.wait_stream_end(timeout=120)
    finally:
        runner.stop()
    assert runner.error is None
    samples = [json.loads(line) for line in stats_file.read_text().splitlines()]
    assert len(samples) > 10
    assert all(s["tokens"] <= budget and s["tokens_max"] <= budget for s in samples)
    last = samples[-1]
    assert last["frames_processed"] == 10_000 and last["frames_dropped"] == 0
    assert last["kv_cache_bytes"] == (last["tokens"] + 1) * 3 * 2 * 2 * 16 * 4  # 3 layers, 2 kv heads, dim 16, fp32
    after_warmup = next(s for s in samples if s["frames_processed"] >= 1000)
    growth = last["rss_bytes"] / after_warmup["rss_bytes"] - 1
    elapsed = last["time"] - samples[0]["time"]
    log.warning("10k frames: %.0f frames/s, RSS %.1f MB -> %.1f MB (%+.2f%%), merged %d, evicted %d",
                10_000 / elapsed, after_warmup["rss_bytes"] / 2**20, last["rss_bytes"] / 2**20, 100 * growth,
                last["merged"], last["evicted"])
    assert growth < 0.05


def test_questions_are_answered_about_the_recent_stream_while_frames_arrive(llava_stages):
    window = 8
    config = LiveConfig(fps=None, memory=MemoryConfig(kv_budget=256, recent_frames=window), batch_frames=4,
                        max_new_tokens=2)
    stages = fresh(llava_stages, config.memory)
    source = open_source("synthetic:width=32,height=32,fps=40", realtime=True)
    runner = LiveRunner(source, stages, config).start()
    answers, errors = [], []

    def ask_questions() -> None:
        try:
            for i in range(3):
                runner.wait_for(lambda s, n=(i + 1) * 20: s.frames_processed >= n, timeout=30)
                asked_at = runner.stats.stream_time
                answers.append((asked_at, runner.ask("what moves ?"), runner.stats.stream_time))
        except Exception as e:  # surfaced below
            errors.append(e)

    asker = threading.Thread(target=ask_questions)
    asker.start()
    asker.join(timeout=90)
    runner.stop()
    assert not errors and len(answers) == 3
    frame_time = 1 / 40
    for asked_at, answer, after in answers:
        assert asked_at - window * frame_time <= answer.stream_time <= after
        assert answer.memory_start <= answer.stream_time and answer.visual_tokens > 0
    assert answers[0][1].stream_time < answers[1][1].stream_time < answers[2][1].stream_time


def test_after_a_scene_cut_the_new_scene_is_held_at_full_detail(llava_stages):
    cut, window = 60, 8
    config = LiveConfig(fps=None, memory=MemoryConfig(kv_budget=320, recent_frames=window), batch_frames=8,
                        drop_oldest=False, max_frames=cut + window)
    stages = fresh(llava_stages, config.memory)
    source = open_source(f"synthetic:width=32,height=32,scene_every={cut},seed=5", realtime=False)
    runner = LiveRunner(source, stages, config).start()
    try:
        assert runner.wait_stream_end(timeout=60)
    finally:
        runner.stop()
    per_frame = stages.memory.tokens_per_frame()
    assert all(per_frame[f] == TOKENS_PER_FRAME for f in range(cut, cut + window))
    old = sum(n for f, n in per_frame.items() if f < cut)
    assert old < cut * TOKENS_PER_FRAME and stages.memory.memory.merged > 0  # the old scene was compressed
    covered = stages.memory.frames_covered()
    assert not ((covered[:, 0] < cut) & (covered[:, 1] >= cut)).any()  # nothing merged across the cut


def test_oldest_frames_are_dropped_when_the_model_falls_behind(llava_stages):
    config = LiveConfig(fps=None, memory=MemoryConfig(kv_budget=256, recent_frames=8), batch_frames=2,
                        queue_frames=4, max_frames=400)
    stages = fresh(llava_stages, config.memory)
    source = open_source("synthetic:width=32,height=32", realtime=False)  # far faster than the encoder
    runner = LiveRunner(source, stages, config).start()
    try:
        assert runner.wait_stream_end(timeout=60)
    finally:
        runner.stop()
    s = runner.stats
    assert s.frames_dropped > 0
    assert s.frames_processed + s.frames_dropped == s.frames_sampled == 400
    assert s.stream_time == pytest.approx(399 / 30)  # the newest frame always survives
    log.warning("backpressure: %d frames offered, %d processed, %d dropped", s.frames_sampled, s.frames_processed,
                s.frames_dropped)


@pytest.mark.parametrize("family, flags", [("qwen2_5_vl", []), ("llava_onevision", ["--incremental-kv"])])
def test_live_job_prints_each_answer_with_its_stream_time(family, flags, tiny_model_dirs, monkeypatch, capsys,
                                                          tmp_path):
    from streamprune.cliargs import parse_config
    from streamprune.commands.live import run as run_live

    args = parse_config(LiveConfig(), ["--source", "synthetic:width=32,height=32,fps=30", "--no-ray", "--fps", "10",
                              "--model", str(tiny_model_dirs[family]), "--kv-budget", "160", "--window", "4",
                              "--max-frames", "45", "--max-new-tokens", "3",
                              "--stats-json", str(tmp_path / "s.jsonl"), *flags])
    monkeypatch.setattr("sys.stdin", io.StringIO("what moves ?\n@1.0 what colour is the object ?\n"))
    assert run_live(args) == 0
    lines = capsys.readouterr().out.splitlines()
    times = [float(re.match(r"\[t=([0-9.]+)s\] ", line).group(1)) for line in lines]
    assert len(times) == 2 and times[1] >= 1.0
    last = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[-1])
    assert last["frames_in"] == 45 and last["tokens"] <= 160


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_encoder_killed_mid_stream_restarts_and_keeps_answering(ray_cluster, tiny_model_dirs):
    from streamprune.runtime.live_stages import RayStages

    config = LiveConfig(model=str(tiny_model_dirs["llava_onevision"]), fps=None, batch_frames=4,
                        memory=MemoryConfig(kv_budget=256, recent_frames=8), max_new_tokens=2)
    stages = RayStages(config)
    source = open_source("synthetic:width=32,height=32,fps=30", realtime=True)
    runner = LiveRunner(source, stages, config).start()
    try:
        assert runner.wait_for(lambda s: s.frames_processed >= 20, timeout=120)
        first = runner.ask("what moves ?")
        pid = ray_cluster.get(stages.encoder.pid.remote())
        ray_cluster.kill(stages.encoder, no_restart=False)
        processed = runner.stats.frames_processed
        assert runner.wait_for(lambda s: s.frames_processed >= processed + 40, timeout=120)
        second = runner.ask("what moves ?")
        assert ray_cluster.get(stages.encoder.pid.remote()) != pid  # a new encoder process
    finally:
        runner.stop()
        stages.close()
    assert runner.error is None
    assert second.stream_time > first.stream_time + 1.0
    log.warning("ray restart: %d frames processed, %d dropped, %d failed batches", runner.stats.frames_processed,
                runner.stats.frames_dropped, runner.stats.stage_failures)


def test_zmq_source_feeds_the_runtime_and_hostile_messages_are_dropped(llava_stages, tmp_path):
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    huge = msgpack.packb({"v": 1, "kind": "frame", "shape": [100_000, 33_334, 3], "dtype": "uint8",
                          "ts": 0.0, "seq": 0})  # claims 10 GB
    sent = {"frames": 0, "bad": 0}

    def publish() -> None:
        rng = np.random.default_rng(0)
        seq = 0
        while not stop.is_set():
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pub.send_multipart(encode(image, ts=seq / 30, seq=seq))
            seq += 1
            sent["frames"] += 1
            pub.send_multipart([b"\xc1garbage", b"\x00" * 10])
            pub.send_multipart(encode(image.astype(np.float32), ts=seq / 30, seq=seq))
            pub.send_multipart([huge, b"\x00" * 16])
            sent["bad"] += 3
            stop.wait(1 / 30)  # pacing of a 30 fps camera

    sender = threading.Thread(target=publish, daemon=True)
    sender.start()
    config = LiveConfig(fps=None, memory=MemoryConfig(kv_budget=256, recent_frames=8), batch_frames=4,
                        max_new_tokens=2, stats_interval=0.1)
    stages = fresh(llava_stages, config.memory)
    source = open_source(f"zmq://127.0.0.1:{port}")
    runner = LiveRunner(source, stages, config, tmp_path / "stats.jsonl").start()
    try:
        assert runner.wait_for(lambda s: s.frames_processed >= 30 and source.stats.malformed >= 30, timeout=60)
        answer = runner.ask("what moves ?")
    finally:
        runner.stop()
        stop.set()
        sender.join(timeout=5)
        pub.close()
    assert runner.error is None and answer.visual_tokens > 0
    last = json.loads((tmp_path / "stats.jsonl").read_text().splitlines()[-1])
    assert last["source_malformed"] >= 30 and last["frames_processed"] >= 30
    log.warning("zmq: sent %d frames + %d bad messages; processed %d, malformed %d, seq gaps %d, queue drops %d",
                sent["frames"], sent["bad"], last["frames_processed"], last["source_malformed"],
                last["source_dropped"], last["frames_dropped"])


def test_publish_job_serves_a_source_that_a_zmq_subscriber_receives(capsys):
    import socket

    from streamprune.cliargs import parse_config
    from streamprune.commands.live import run_publish
    from streamprune.config import PublishConfig
    from streamprune.errors import ConfigError

    with socket.socket() as probe:  # a free loopback port for the publisher to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subscriber = open_source(f"zmq://127.0.0.1:{port}")
    received = []

    def receive() -> None:
        for frame in subscriber:
            received.append(frame)
            if len(received) == 5:
                subscriber.close()

    reader = threading.Thread(target=receive)
    reader.start()
    args = parse_config(PublishConfig(), ["--source", "synthetic:width=40,height=24,fps=30,frames=90",
                                          "--bind", f"tcp://127.0.0.1:{port}"])
    assert run_publish(args) == 0
    subscriber.close()
    reader.join(timeout=10)
    assert len(received) == 5 and all(f.image.shape == (24, 40, 3) for f in received)
    assert "published 90 frames" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        run_publish(parse_config(PublishConfig(), ["--source", f"zmq://127.0.0.1:{port}"]))

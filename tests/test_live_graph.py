"""The live stage graph on the default Video-LLM: STC-Cacher warm across a static-camera stream,
FastVID segmenting online and pruning each closed segment as a whole, the per-stream stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamprune.config import DeviceConfig, LiveConfig
from streamprune.memory import MemoryConfig
from streamprune.pruning.recipe import build_recipe
from streamprune.runtime.live_runner import LiveRunner
from streamprune.runtime.live_stages import LocalStages
from streamprune.sources import open_source

STATIC_INTERVAL = 10  # refresh every 10th frame: at most 90% hits (the authors' 2 allows 50%)


@pytest.fixture(scope="module")
def adapter():
    from streamprune.models import load_model

    return load_model(None, DeviceConfig())


def _stc_recipe(tmp_path) -> str:
    path = tmp_path / "stc_static.yaml"
    path.write_text("name: stc_static\nstages:\n  - method: stc_cacher\n"
                    f"    options: {{update_token_ratio: 0.25, cache_interval: {STATIC_INTERVAL}, "
                    "refresh_threshold: 0.85}\n")
    return str(path)


def _run(config: LiveConfig, source: str, adapter) -> tuple[LiveRunner, LocalStages]:
    stages = LocalStages(config)
    runner = LiveRunner(open_source(source, realtime=False), stages, config).start()
    assert runner.wait_stream_end(timeout=300)
    runner.stop()
    assert runner.error is None
    return runner, stages


def _tokens_by_frame(stages: LocalStages) -> dict[int, torch.Tensor]:
    snap = stages.memory.memory.snapshot()
    frames = snap.thw[:, 0]
    return {int(f): snap.features[frames == f] for f in torch.unique(frames)}


def _plain(adapter, image: np.ndarray) -> torch.Tensor:
    return adapter.encode_for(image[None], build_recipe("none")).tokens.features.float()


def test_stc_cacher_in_live_on_a_static_camera_hits_above_80_percent_within_cosine_099(adapter, tmp_path):
    source = "synthetic:width=96,height=96,frames=40,fps=10,shapes=0,noise=3"
    config = LiveConfig(source=source, method=_stc_recipe(tmp_path), fps=None, drop_oldest=False,
                        memory=MemoryConfig(kv_budget=8192))
    runner, stages = _run(config, source, adapter)
    stats = runner.stats
    assert stats.cacher_frames == 40 and stats.cacher_scene_cuts == 0
    assert stats.cacher_hit_rate == pytest.approx(36 / 40)
    assert stats.vision_flops_saved_share > 0.5
    frames = open_source(source, realtime=False)
    cosines = []
    for index, held in _tokens_by_frame(stages).items():
        cosines.append(F.cosine_similarity(held, _plain(adapter, frames.frame(index)), dim=-1))
    cosines = torch.stack(cosines)  # [frames, tokens]
    print(f"reused vs recomputed cosine: min {cosines.min():.4f}, mean {cosines.mean():.5f}")
    assert float(cosines.min()) >= 0.99


def test_stc_cacher_in_live_recomputes_the_frame_after_a_scene_cut(adapter, tmp_path):
    source = "synthetic:width=96,height=96,frames=30,fps=10,shapes=2,noise=3,scene_every=15"
    config = LiveConfig(source=source, method=_stc_recipe(tmp_path), fps=None, drop_oldest=False,
                        memory=MemoryConfig(kv_budget=8192))
    runner, stages = _run(config, source, adapter)
    assert runner.stats.cacher_scene_cuts == 1
    held = _tokens_by_frame(stages)
    frames = open_source(source, realtime=False)
    # frame 15 opens the new scene: computed in full, so exactly the plain tower's tokens
    assert torch.allclose(held[15], _plain(adapter, frames.frame(15)), atol=1e-5)
    assert not torch.allclose(held[16], _plain(adapter, frames.frame(16)), atol=1e-5)  # reused again


def test_fastvid_in_live_closes_one_segment_per_scene_and_prunes_each_as_offline(adapter):
    scenes, per_scene = 3, 6
    source = f"synthetic:width=96,height=96,frames={scenes * per_scene},fps=10,shapes=2,scene_every={per_scene}"
    config = LiveConfig(source=source, method="fastvid", retain=0.25, fps=None, drop_oldest=False,
                        memory=MemoryConfig(kv_budget=8192), max_segment_units=8)
    runner, stages = _run(config, source, adapter)
    assert runner.stats.segments_closed == scenes
    held = stages.memory.memory.snapshot()
    frames = open_source(source, realtime=False)
    recipe = build_recipe("fastvid", retain=0.25)
    for scene in range(scenes):
        indices = list(range(scene * per_scene, (scene + 1) * per_scene))
        clip = np.stack([frames.frame(i) for i in indices])
        video = adapter.encode_for(clip, recipe)
        kept = recipe.select(video.tokens).apply(video.tokens)
        rows = (held.thw[:, 0] >= indices[0]) & (held.thw[:, 0] <= indices[-1])
        live_thw = held.thw[rows].clone()
        live_thw[:, 0] -= indices[0]
        assert torch.equal(live_thw, kept.thw.cpu())
        assert torch.allclose(held.features[rows], kept.features.float(), atol=1e-4)


def test_frame_level_methods_close_a_segment_per_unit_and_stats_report_stages(adapter):
    source = "synthetic:width=96,height=96,frames=12,fps=10,shapes=2"
    config = LiveConfig(source=source, method="visionzip", retain=0.5, fps=None, drop_oldest=False,
                        memory=MemoryConfig(kv_budget=8192))
    runner, _ = _run(config, source, adapter)
    stats = runner.stats
    assert stats.segments_closed == 12 and stats.open_units == 0
    assert stats.cacher_frames == 0
    assert stats.encode_ms_p99 >= stats.encode_ms_p50 > 0


def test_answer_deadline_below_the_unpruned_answer_time_answers_from_fewer_memory_tokens(adapter):
    source = "synthetic:width=96,height=96,frames=48,fps=10,shapes=2"
    config = LiveConfig(source=source, fps=None, drop_oldest=False, memory=MemoryConfig(kv_budget=8192))
    runner, stages = _run(config, source, adapter)
    unpruned = min(stages.ask("what moves?").latency_ms for _ in range(3))
    deadline = LiveConfig(source=source, fps=None, drop_oldest=False, memory=MemoryConfig(kv_budget=8192),
                          target_latency_ms=unpruned * 0.5)
    runner = LiveRunner(open_source(source, realtime=False), stages, deadline).start()
    assert runner.wait_stream_end(timeout=300)
    answers = [runner.ask("what moves?") for _ in range(6)]
    runner.stop()
    assert answers[0].retain == 1.0  # the controller starts unpruned, then measures
    assert runner.stats.answer_retain < 1.0 and answers[-1].visual_tokens < answers[0].visual_tokens
    assert runner.stats.answers == 6 and runner.stats.answer_ms_p99 >= runner.stats.answer_ms_p50 > 0


def test_a_gym_env_camera_feeds_the_live_graph_with_stc(adapter):
    """`gym:ENV_ID`: PickColor's camera under its scripted expert, episode after episode, through
    the same graph (STC-Cacher warm across frames, then the memory and an answer)."""
    from streamprune.sources.gym_env import GymEnvSource

    source = GymEnvSource("streamprune/PickColor-v0", realtime=False, max_episodes=3)
    config = LiveConfig(source="gym:streamprune/PickColor-v0", method="stc", fps=None, drop_oldest=False,
                        memory=MemoryConfig(kv_budget=8192))
    stages = LocalStages(config)
    runner = LiveRunner(source, stages, config).start()
    assert runner.wait_stream_end(timeout=120)
    answer = runner.ask("what colour is the target?")
    runner.stop()
    assert runner.error is None and runner.stats.frames_processed >= 3
    assert runner.stats.cacher_hits > 0 and answer.text
    frames = [f.index for f in GymEnvSource("streamprune/PickColor-v0", realtime=False, max_episodes=3)]
    assert frames == list(range(len(frames)))  # one stream: frame counter and time run across episodes


def test_a_gym_source_with_an_unknown_env_is_one_line():
    from streamprune.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown env id"):
        open_source("gym:NoSuchEnv-v0")

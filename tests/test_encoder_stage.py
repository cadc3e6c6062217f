"""A recipe's encoder stage (STC-Cacher) runs on every path that encodes: ask, bench, the VLA and
live, through `VideoLLMAdapter.encode_for`; a recipe without one never builds a cacher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamprune.cli import main
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import build_recipe
from streamprune.videofile import write_video


def static_scene(frames: int = 8, size: int = 48, seed: int = 0) -> np.ndarray:
    """A fixed textured background with one small square drifting: mostly unchanged patches."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    clip = np.repeat(background[None], frames, axis=0)
    for t in range(frames):
        clip[t, 20:26, 4 + t:10 + t] = 255
    return clip


def ask_json(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_ask_json_reports_the_cacher_hits_and_vision_flops_saved(tmp_path, tiny_model_dirs, capsys):
    video = write_video(tmp_path / "static.mp4", static_scene(), fps=4.0)
    common = ["ask", str(video), "-q", "what moves ?", "--model", str(tiny_model_dirs["llava_onevision"]),
              "--fps", "4", "--max-frames", "8", "--json"]
    with_cacher = ask_json([*common, "--method", "stc"], capsys)
    assert with_cacher["frames"] == 8
    assert with_cacher["cacher"]["cacher_frames"] == 8
    assert with_cacher["cacher"]["cacher_hits"] >= 3  # every 2nd frame is served from the cache
    assert 0.0 < with_cacher["cacher"]["vision_flops_saved_share"] < 1.0
    without = ask_json([*common, "--method", "stc_pruner"], capsys)
    assert without["cacher"] is None
    assert without["visual_tokens_kept"] == with_cacher["visual_tokens_kept"]


def test_bench_accuracy_encodes_stc_through_its_cacher_and_stc_pruner_without(tiny_adapters):
    from streamprune.bench.accuracy import run_accuracy_bench

    rows = run_accuracy_bench(tiny_adapters["llava_onevision"], ["stc", "stc_pruner"], [0.5], n=4, progress=False)
    by_method = {r.method: r for r in rows}
    assert by_method["stc"].vision_flops_saved > 0.0
    assert by_method["stc_pruner"].vision_flops_saved == 0.0 == by_method["none"].vision_flops_saved
    # two different encodings were timed: the cacher's and the plain tower's
    assert by_method["stc"].encode_ms != by_method["stc_pruner"].encode_ms
    assert by_method["stc_pruner"].encode_ms == by_method["none"].encode_ms


def test_vla_keeps_one_cacher_per_episode_and_starts_it_cold(tmp_path):
    from streamprune.models.tiny import save_tiny_vla
    from streamprune.models.vla import ENCODER_KEY, VLAPolicy

    policy = VLAPolicy.load(save_tiny_vla(tmp_path / "vla"))
    recipe, ctx = build_recipe("stc"), PruneContext()
    frames = static_scene(frames=4, size=32)
    for image in frames:
        policy.act(image, "reach the red circle", recipe, ctx)
    cacher = ctx.state[ENCODER_KEY]
    assert cacher.stats.frames == 4 and cacher.stats.cache_hits >= 1
    policy.reset(recipe, ctx)
    policy.act(frames[0], "reach the red circle", recipe, ctx)
    assert ctx.state[ENCODER_KEY] is not cacher and ctx.state[ENCODER_KEY].stats.frames == 1
    plain = PruneContext()
    policy.act(frames[0], "reach the red circle", build_recipe("stc_pruner"), plain)
    assert plain.state[ENCODER_KEY] is None


def test_live_encoder_stage_keeps_its_stream_cacher_warm_across_batches(tiny_adapters):
    from streamprune.runtime.live_stages import EncodeStage
    from streamprune.types import Frame

    stage = EncodeStage(None, "stc", retain=0.5, adapter=tiny_adapters["llava_onevision"])
    clip = static_scene(frames=8)
    frames = [Frame(image=image, timestamp=i / 4, index=i) for i, image in enumerate(clip)]
    first = stage.process(frames[:4], 4.0)
    second = stage.process(frames[4:], 4.0)
    assert len(first.units) == len(second.units) == 4
    assert stage.cacher.stats.frames == 8  # one cacher saw both batches: the stream's, not a per-call one
    assert stage.cacher.stats.cache_hits >= 3


def test_live_refuses_a_method_that_needs_action_feedback():
    from streamprune.errors import ConfigError
    from streamprune.runtime.live_stages import unit_recipe

    assert unit_recipe("stc", None, None).encoder_options
    with pytest.raises(ConfigError, match="action attention"):
        unit_recipe("vla_pruner", 0.5, None)

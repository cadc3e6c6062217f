"""The online segmenter: where temporal methods cut a stream, and that a closed segment is the
clip the offline method would have pruned."""

from __future__ import annotations

import pytest
import torch

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.fastvid import dyseg
from streamprune.pruning.online import DySegThresholdCuts, HoliTomWindowCuts
from streamprune.pruning.recipe import build_recipe
from streamprune.pruning.registry import available, make_method
from streamprune.runtime.segmenter import ClosedSegment, OnlineSegmenter, join_units
from streamprune.types import VisualTokens

H, W, DIM = 3, 4, 32
TEMPORAL = {"fastvid", "fastvid_qwen", "holitom"}


def scene_stream(lengths: list[int], seed: int = 0, jitter: float = 0.01) -> torch.Tensor:
    """`[sum(lengths), H*W, DIM]` frames: each scene one random frame, slightly jittered per frame;
    scenes are independent, so consecutive-frame cosine is ~1 inside a scene and ~0 across."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(H * W, DIM, generator=g) + jitter * torch.randn(n, H * W, DIM, generator=g)
              for n in lengths]
    return torch.cat(frames)


def units_of(frames: torch.Tensor, seed: int = 1, frame_features: bool = True) -> list[VisualTokens]:
    """One VisualTokens of grid (1, H, W) per frame, as the live encoder hands them on."""
    g = torch.Generator().manual_seed(seed)
    units = []
    for f in frames:
        units.append(VisualTokens(
            features=f.clone(),
            thw=VisualTokens.grid_positions(1, H, W),
            grid=(1, H, W),
            signals={"vit_attention": torch.rand(H * W, generator=g)},
            frame_signals={"frame_features": f.mean(dim=0, keepdim=True) + 0.5} if frame_features else {},
        ))
    return units


def run(segmenter: OnlineSegmenter, units: list[VisualTokens]) -> list[ClosedSegment]:
    """The whole stream through `segmenter`, the unit's stream index as its metadata."""
    closed = []
    for i, unit in enumerate(units):
        closed += segmenter.push(unit, i)
    return closed + segmenter.flush()


def ranges(segments: list[ClosedSegment]) -> list[tuple[int, int]]:
    return [(s.units[0], s.units[-1] + 1) for s in segments]


LENGTHS = [3, 5, 1, 4, 2]
WANT = [(0, 3), (3, 8), (8, 9), (9, 13), (13, 15)]


@pytest.mark.parametrize("method", ["fastvid", "fastvid_qwen", "holitom"])
def test_k_scenes_close_as_exactly_k_segments_at_the_scene_changes(method):
    segments = run(OnlineSegmenter(build_recipe(method, retain=0.25)), units_of(scene_stream(LENGTHS)))
    assert ranges(segments) == WANT
    assert [s.reason for s in segments] == ["cut"] * 4 + ["flush"]
    assert [s.tokens.grid for s in segments] == [(n, H, W) for n in LENGTHS]


def test_fastvid_cuts_on_token_means_without_frame_features():
    segments = run(OnlineSegmenter(build_recipe("fastvid")), units_of(scene_stream(LENGTHS), frame_features=False))
    assert ranges(segments) == WANT


def test_a_segment_closes_as_soon_as_its_cut_is_known():
    segmenter = OnlineSegmenter(build_recipe("fastvid"))
    units = units_of(scene_stream([3, 2]))
    assert [segmenter.push(u, i) for i, u in enumerate(units[:3])] == [[], [], []]
    assert segmenter.open_units == 3
    closed = segmenter.push(units[3], 3)  # the first unit of the next scene closes the first scene
    assert ranges(closed) == [(0, 3)] and segmenter.open_units == 1 and segmenter.closed == 1


def test_fastvid_online_cuts_equal_offline_dyseg_with_c_1():
    # a random walk: similarities spread around tau, so cuts fall at irregular places
    g = torch.Generator().manual_seed(3)
    feats = torch.cumsum(torch.randn(40, DIM, generator=g), dim=0)
    units = [VisualTokens(features=torch.randn(H * W, DIM, generator=g), thw=VisualTokens.grid_positions(1, H, W),
                          grid=(1, H, W), frame_signals={"frame_features": f[None]}) for f in feats]
    tau = 0.9
    offline = dyseg(feats, c=1, tau=tau)
    assert 3 < len(offline) < 35  # the test means something
    recipe = build_recipe("fastvid")
    recipe.pre_llm[0].config.tau = tau
    segments = run(OnlineSegmenter(recipe, max_units=40), units)
    assert ranges(segments) == offline


@pytest.mark.parametrize("method", ["fastvid", "holitom"])
def test_a_static_stream_closes_in_segments_of_max_length(method):
    segments = run(OnlineSegmenter(build_recipe(method), max_units=4), units_of(scene_stream([10])))
    assert ranges(segments) == [(0, 4), (4, 8), (8, 10)]
    assert [s.reason for s in segments] == ["max_length", "max_length", "flush"]


@pytest.mark.parametrize("method", ["fastvid", "holitom"])
def test_max_length_splits_a_long_scene_but_not_the_cuts(method):
    segments = run(OnlineSegmenter(build_recipe(method), max_units=3), units_of(scene_stream([2, 7, 1])))
    assert ranges(segments) == [(0, 2), (2, 5), (5, 8), (8, 9), (9, 10)]
    assert [s.reason for s in segments] == ["cut", "max_length", "max_length", "cut", "flush"]


@pytest.mark.parametrize("method", ["none", "uniform", "visionzip", "divprune", "stc_pruner", "vla_pruner", "stc"])
def test_frame_level_methods_close_a_segment_at_every_unit(method):
    segmenter = OnlineSegmenter(build_recipe(method, retain=0.25))
    assert segmenter.rule is None
    units = units_of(scene_stream([4, 2]))
    for i, unit in enumerate(units):
        closed = segmenter.push(unit, i)
        assert ranges(closed) == [(i, i + 1)] and closed[0].reason == "unit"
        assert segmenter.open_units == 0
    assert segmenter.flush() == [] and segmenter.closed == len(units)


def test_only_temporal_methods_have_an_online_rule():
    rules = {name: cls().online_cuts() for name, cls in available().items()}
    assert {name for name, rule in rules.items() if rule is not None} == TEMPORAL


def test_rules_come_from_the_methods_own_config():
    assert OnlineSegmenter(build_recipe("fastvid")).rule == DySegThresholdCuts(tau=0.9)
    assert OnlineSegmenter(build_recipe("fastvid_qwen")).rule == DySegThresholdCuts(tau=0.84)
    # holitom.yaml: the pre-LLM stage's tau 0.65; its holitom_inner stage has no rule
    assert OnlineSegmenter(build_recipe("holitom")).rule == HoliTomWindowCuts(tau=0.65, max_window=1024)
    assert make_method("holitom", tau=0.7, max_window=5).online_cuts() == HoliTomWindowCuts(tau=0.7, max_window=5)


def test_holitom_window_cuts_respect_max_window():
    segments = run(OnlineSegmenter(build_recipe("holitom")), units_of(scene_stream([7])))
    assert ranges(segments) == [(0, 7)]
    rule = HoliTomWindowCuts(tau=0.8, max_window=3)
    assert rule.split(join_units(units_of(scene_stream([7])))) == [3, 3]


def test_closed_tokens_are_the_units_concatenated_in_order():
    units = units_of(scene_stream([2, 3]))
    segments = run(OnlineSegmenter(build_recipe("fastvid")), units)
    tokens = segments[1].tokens
    assert tokens.grid == (3, H, W) and segments[1].units == [2, 3, 4]
    torch.testing.assert_close(tokens.features, torch.cat([u.features for u in units[2:]]), rtol=0, atol=0)
    assert torch.equal(tokens.thw, VisualTokens.grid_positions(3, H, W))
    assert tokens.signals.keys() == {"vit_attention"} and tokens.frame_signals.keys() == {"frame_features"}
    assert torch.equal(tokens.signals["vit_attention"], torch.cat([u.signals["vit_attention"] for u in units[2:]]))
    assert torch.equal(tokens.frame_signals["frame_features"],
                       torch.cat([u.frame_signals["frame_features"] for u in units[2:]]))
    assert torch.equal(tokens.frames()[1], units[3].features)


def test_a_closed_segment_prunes_as_the_offline_method_prunes_its_frames():
    frames = scene_stream([4, 6, 3], seed=5, jitter=0.2)  # jitter: the merge has something to do
    units = units_of(frames)
    recipe = build_recipe("fastvid", retain=0.25)
    segment = run(OnlineSegmenter(recipe), units)[1]
    assert segment.units == list(range(4, 10))
    offline = VisualTokens(  # the same six frames as the offline path builds a clip
        features=frames[4:10].reshape(-1, DIM),
        thw=VisualTokens.grid_positions(6, H, W),
        grid=(6, H, W),
        signals={"vit_attention": torch.cat([u.signals["vit_attention"] for u in units[4:10]])},
        frame_signals={"frame_features": frames[4:10].mean(dim=1) + 0.5},
    )
    online = recipe.select(segment.tokens)
    want = build_recipe("fastvid", retain=0.25).select(offline)
    assert len(want) == 6 * H * W // 4
    assert torch.equal(online.indices, want.indices)
    torch.testing.assert_close(online.features, want.features, rtol=0, atol=0)
    torch.testing.assert_close(online.apply(segment.tokens).thw, want.apply(offline).thw, rtol=0, atol=0)


def test_a_unit_of_another_grid_closes_the_open_segment_first():
    segmenter = OnlineSegmenter(build_recipe("fastvid"))
    small = units_of(scene_stream([3]))
    big = VisualTokens(features=torch.randn(2 * 2, DIM), thw=VisualTokens.grid_positions(1, 2, 2), grid=(1, 2, 2),
                       signals={"vit_attention": torch.rand(4)},
                       frame_signals={"frame_features": torch.randn(1, DIM)})
    for i, unit in enumerate(small):
        assert segmenter.push(unit, i) == []
    closed = segmenter.push(big, 3)
    assert ranges(closed) == [(0, 3)] and closed[0].reason == "grid"
    assert segmenter.open_units == 1 and segmenter.flush()[0].tokens.grid == (1, 2, 2)


def test_bad_inputs_are_typed_errors():
    with pytest.raises(ConfigError):
        OnlineSegmenter(build_recipe("fastvid"), max_units=0)
    clip = join_units(units_of(scene_stream([2])))
    with pytest.raises(InputError):
        OnlineSegmenter(build_recipe("fastvid")).push(clip, 0)

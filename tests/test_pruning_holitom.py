"""HoliTom (outer DP merge) and holitom_inner (layer-K similarity merge)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.holitom import holitom_segments, sequential_pair_average, static_savings
from streamprune.pruning.registry import make_method
from streamprune.types import VisualTokens

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "holitom.yaml"


def tokens_from(frames: torch.Tensor, attention: torch.Tensor | None = None, seed: int = 0, **signals) -> VisualTokens:
    """VisualTokens for `[T, H, W, D]` frames with a random (or given) `vit_attention`."""
    t, h, w, d = frames.shape
    if attention is None:
        attention = torch.rand(t * h * w, generator=torch.Generator().manual_seed(seed))
    return VisualTokens(
        features=frames.reshape(-1, d),
        thw=VisualTokens.grid_positions(t, h, w),
        grid=(t, h, w),
        signals={"vit_attention": attention.reshape(-1), **signals},
    )


def random_frames(t: int, h: int, w: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, h, w, d, generator=torch.Generator().manual_seed(seed))


def noisy_copies(base: torch.Tensor, n: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return base.unsqueeze(0) + scale * torch.randn(n, *base.shape, generator=g)


def test_holitom_dp_puts_static_stretch_in_one_window_and_scene_cut_on_a_boundary() -> None:
    scene_a = noisy_copies(random_frames(1, 3, 3, seed=1)[0], 4, 0.01, seed=2)  # frames 0-3 static
    scene_b = noisy_copies(random_frames(1, 3, 3, seed=3)[0], 4, 0.01, seed=4)  # frames 4-7 static
    frames = torch.cat([scene_a, scene_b]).reshape(8, 9, -1)
    assert holitom_segments(frames, tau=0.8, max_window=1024) == [(0, 3), (4, 7)]


def test_holitom_dp_isolates_a_static_stretch_between_dynamic_frames() -> None:
    dynamic = random_frames(5, 2, 2, seed=5)
    static = noisy_copies(random_frames(1, 2, 2, seed=6)[0], 3, 0.01, seed=7)
    frames = torch.cat([dynamic[:2], static, dynamic[2:]]).reshape(8, 4, -1)  # static frames 2-4
    segments = holitom_segments(frames, tau=0.8, max_window=1024)
    assert (2, 4) in segments
    assert [s for s, _ in segments] == sorted(s for s, _ in segments)
    assert segments[0][0] == 0 and segments[-1][1] == 7


def test_holitom_dp_respects_max_window() -> None:
    frames = noisy_copies(random_frames(1, 2, 2, seed=8)[0], 6, 0.01, seed=9).reshape(6, 4, -1)
    segments = holitom_segments(frames, tau=0.8, max_window=2)
    assert all(end - start + 1 <= 2 for start, end in segments)
    assert sum(end - start + 1 for start, end in segments) == 6


def test_holitom_dp_is_optimal_against_brute_force_partitions() -> None:
    g = torch.Generator().manual_seed(10)
    t, n = 6, 5
    # positions drift slowly or jump, so static sets differ between windows
    frames = torch.randn(1, n, 16, generator=g).repeat(t, 1, 1)
    jumps = torch.rand(t, n, generator=g) < 0.3
    frames = frames + jumps[..., None] * torch.randn(t, n, 16, generator=g) * 3
    saved = static_savings(frames, tau=0.8)
    best = 0.0
    for cuts in itertools.product([False, True], repeat=t - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [t]
        best = max(best, sum(float(saved[a, b - 1]) for a, b in zip(bounds[:-1], bounds[1:])))
    segments = holitom_segments(frames, tau=0.8, max_window=1024)
    assert sum(float(saved[a, b]) for a, b in segments) == best


def test_holitom_static_tokens_are_averaged_at_first_frame_position() -> None:
    t, h, w = 4, 2, 2
    frames = random_frames(t, h, w, seed=11)
    static_base = random_frames(1, 1, 2, seed=12)[0, 0]  # positions 0 and 1 static
    frames[:, 0, :2] = noisy_copies(static_base, t, 0.01, seed=13)
    tokens = tokens_from(frames)
    method = make_method("holitom")
    selection = method(tokens, Budget(retain=1.0))
    # 2 static tokens (one per position) + 2 dynamic tokens in each of 4 frames
    assert len(selection) == 2 + 2 * t
    assert selection.indices[:2].tolist() == [0, 1]
    for frame in range(1, t):
        assert frame * h * w not in selection.indices.tolist()
        assert frame * h * w + 1 not in selection.indices.tolist()
    torch.testing.assert_close(selection.features[:2], frames[:, 0, :2].mean(dim=0))
    dynamic = [i for i in selection.indices.tolist() if i % (h * w) >= 2]
    assert len(dynamic) == 2 * t


def test_holitom_dynamic_tokens_are_vit_attention_top_k_per_frame() -> None:
    t, h, w = 3, 4, 4
    tokens = tokens_from(random_frames(t, h, w, seed=14), seed=15)
    selection = make_method("holitom")(tokens, Budget(max_tokens=12))
    attention = tokens.signals["vit_attention"].reshape(t, h * w)
    expected = torch.cat([f * h * w + attention[f].topk(4).indices for f in range(t)]).sort().values
    assert selection.indices.tolist() == expected.tolist()
    torch.testing.assert_close(selection.features, tokens.features[selection.indices])


def test_holitom_static_cluster_merge_keeps_exact_budget_and_centre_positions() -> None:
    t, h, w = 4, 3, 3
    frames = noisy_copies(random_frames(1, h, w, seed=16)[0], t, 0.01, seed=17)  # fully static clip
    tokens = tokens_from(frames)
    selection = make_method("holitom", tau=0.65)(tokens, Budget(max_tokens=4))
    assert len(selection) == 4
    assert all(i < h * w for i in selection.indices.tolist()), "static tokens sit in the window's first frame"
    # one cluster: centre c <- 0.6 * mean_t(x_c) + 0.4 * mean of the other static means
    single = make_method("holitom", tau=0.65)(tokens, Budget(max_tokens=1))
    means = frames.reshape(t, h * w, -1).mean(dim=0)
    c = int(single.indices[0])
    others = [i for i in range(h * w) if i != c]
    torch.testing.assert_close(single.features[0], 0.6 * means[c] + 0.4 * means[others].mean(dim=0))


def test_holitom_contextual_tokens_are_beta_merged_density_centres() -> None:
    t, h, w = 1, 4, 4
    tokens = tokens_from(random_frames(t, h, w, seed=18), seed=19)
    x, attention = tokens.features, tokens.signals["vit_attention"]
    selection = make_method("holitom", d=0.5)(tokens, Budget(max_tokens=2))  # 1 dominant + 1 contextual
    dominant = int(attention.argmax())
    kept = selection.indices.tolist()
    assert dominant in kept
    torch.testing.assert_close(selection.features[kept.index(dominant)], x[dominant])
    (centre,) = set(kept) - {dominant}
    members = [i for i in range(h * w) if i not in (dominant, centre)]
    torch.testing.assert_close(selection.features[kept.index(centre)], 0.6 * x[centre] + 0.4 * x[members].mean(dim=0))


@pytest.mark.parametrize("seed", range(12))
def test_holitom_exact_budget_over_random_shapes(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    t, h, w = (int(v) for v in torch.randint(1, 7, (3,), generator=g))
    frames = random_frames(t, h, w, d=8, seed=seed)
    if seed % 2:  # half the clips have a static region
        frames[:, : h // 2 + 1] = frames[:1, : h // 2 + 1] + 0.01 * torch.randn_like(frames[:, : h // 2 + 1])
    tokens = tokens_from(frames, seed=seed)
    n = len(tokens)
    retain = float(torch.empty(1).uniform_(0.02, 1.0, generator=g))
    segments = holitom_segments(tokens.frames(), 0.8, 1024)
    saved = static_savings(tokens.frames(), 0.8)
    remaining = n - int(sum(float(saved[a, b]) for a, b in segments))
    selection = make_method("holitom", d=0.3 if seed % 3 == 0 else 0.0)(tokens, Budget(retain=retain))
    k = Budget(retain=retain).count(n)
    assert len(selection) == min(k, remaining)
    assert selection.features.shape == (len(selection), 8)
    assert torch.all(selection.indices[1:] > selection.indices[:-1])


def test_holitom_is_deterministic() -> None:
    frames = random_frames(6, 3, 3, seed=20)
    frames[:, 0] = frames[:1, 0]
    tokens = tokens_from(frames)
    method = make_method("holitom", d=0.5)
    a = method(tokens, Budget(retain=0.3), PruneContext(seed=1))
    b = method(tokens, Budget(retain=0.3), PruneContext(seed=1))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.features, b.features)


def inner_tokens(features: torch.Tensor, attention: torch.Tensor) -> VisualTokens:
    n = features.shape[0]
    return VisualTokens(
        features=features,
        thw=VisualTokens.grid_positions(1, 1, n),
        grid=(1, 1, n),
        signals={"llm_attention_last": attention},
    )


def test_holitom_inner_merges_dropped_token_into_its_most_similar_kept_token() -> None:
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    near_b, near_a = torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0.8, 0.1, 0.3])
    features = torch.stack([a, near_b, b, near_a])
    attention = torch.tensor([0.9, 0.1, 0.8, 0.05])  # keep tokens 0 and 2
    method = make_method("holitom_inner")
    assert method.stage == "inner_llm"
    selection = method(inner_tokens(features, attention), Budget(retain=1.0))
    assert selection.indices.tolist() == [0, 2]
    torch.testing.assert_close(selection.features[0], (a + near_a) / 2)
    torch.testing.assert_close(selection.features[1], (b + near_b) / 2)


def test_holitom_inner_merges_sequentially_so_later_tokens_weigh_more() -> None:
    g = torch.Generator().manual_seed(21)
    anchors, members = torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g)
    target = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    expected = anchors.clone()
    for m, tgt in zip(members, target.tolist()):
        expected[tgt] = (expected[tgt] + m) / 2
    torch.testing.assert_close(sequential_pair_average(anchors, members, target), expected)


def test_holitom_inner_count_is_r_in_share_capped_by_budget() -> None:
    g = torch.Generator().manual_seed(22)
    tokens = inner_tokens(torch.randn(10, 4, generator=g), torch.rand(10, generator=g))
    assert len(make_method("holitom_inner")(tokens, Budget(retain=1.0))) == 5
    assert len(make_method("holitom_inner", r_in=0.2)(tokens, Budget(retain=1.0))) == 8
    assert len(make_method("holitom_inner")(tokens, Budget(max_tokens=3))) == 3
    kept = make_method("holitom_inner")(tokens, Budget(retain=1.0)).indices
    assert kept.tolist() == tokens.signals["llm_attention_last"].topk(5).indices.sort().values.tolist()


def test_holitom_bad_options_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        make_method("holitom", d=1.5)
    with pytest.raises(ConfigError):
        make_method("holitom_inner", r_in=1.0)


def test_holitom_yaml_pipeline_builds_both_stages() -> None:
    spec = yaml.safe_load(CONFIG.read_text())
    assert spec["name"] == "holitom"
    methods = [make_method(stage["method"], **stage.get("options", {})) for stage in spec["stages"]]
    assert [m.stage for m in methods] == ["pre_llm", "inner_llm"]
    assert methods[0].config.tau == 0.65 and methods[1].config.layer == 18

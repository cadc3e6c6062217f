"""FrameFusion (layer-0 form): same-patch temporal merge into the earliest token, then importance top-k."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.registry import make_method
from streamprune.types import VisualTokens

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "framefusion.yaml"


def clip_tokens(frames: torch.Tensor, seed: int = 0, signals: tuple[str, ...] = ("vit_attention",)) -> VisualTokens:
    """VisualTokens for `[T, H, W, D]` frames with random importance signals."""
    t, h, w, d = frames.shape
    g = torch.Generator().manual_seed(seed)
    return VisualTokens(
        features=frames.reshape(-1, d),
        thw=VisualTokens.grid_positions(t, h, w),
        grid=(t, h, w),
        signals={name: torch.rand(t * h * w, generator=g) for name in signals},
    )


def random_frames(t: int, h: int, w: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    # random directions in 64-d: consecutive cosines are far below S_th = 0.6
    return torch.randn(t, h, w, d, generator=torch.Generator().manual_seed(seed))


def test_framefusion_merges_a_static_patch_into_its_earliest_frame_token() -> None:
    t, h, w = 3, 2, 2
    frames = random_frames(t, h, w, seed=1)
    frames[:, 0, 0] = frames[0, 0, 0] + 0.05 * torch.randn(t, 64, generator=torch.Generator().manual_seed(2))
    # room for the 2 merges; the full budget (retain=1) would forbid any merge
    selection = make_method("framefusion")(clip_tokens(frames), Budget(max_tokens=10))
    kept = selection.indices.tolist()
    assert 0 in kept and 4 not in kept and 8 not in kept
    assert len(kept) == t * h * w - 2
    torch.testing.assert_close(selection.features[kept.index(0)], frames[:, 0, 0].mean(dim=0))
    others = [i for i in kept if i != 0]
    torch.testing.assert_close(selection.features[[kept.index(i) for i in others]], frames.reshape(-1, 64)[others])


def test_framefusion_a_change_starts_a_new_run() -> None:
    t, h, w = 4, 1, 2
    frames = random_frames(t, h, w, seed=3)
    frames[1, 0, 0] = frames[0, 0, 0]  # run {0, 1}
    frames[3, 0, 0] = frames[2, 0, 0]  # frame 2 differs from 1: new run {2, 3}
    selection = make_method("framefusion")(clip_tokens(frames), Budget(max_tokens=6))
    kept = selection.indices.tolist()
    assert [i for i in kept if i % 2 == 0] == [0, 4]
    torch.testing.assert_close(selection.features[kept.index(4)], frames[2, 0, 0])


def test_framefusion_full_budget_merges_nothing() -> None:
    frames = random_frames(1, 2, 2, seed=9).repeat(3, 1, 1, 1)
    selection = make_method("framefusion")(clip_tokens(frames), Budget(retain=1.0))
    assert selection.indices.tolist() == list(range(12))


def test_framefusion_merge_stops_at_the_budget_and_merges_the_most_similar() -> None:
    t, h, w = 2, 2, 2
    frames = random_frames(1, h, w, seed=4).repeat(t, 1, 1, 1)
    noise = torch.tensor([0.01, 0.2, 0.3, 0.4])  # patch 0 most static, then 1, ...
    frames[1] = frames[0] + noise.reshape(h, w, 1) * torch.randn(h, w, 64, generator=torch.Generator().manual_seed(5))
    selection = make_method("framefusion")(clip_tokens(frames), Budget(max_tokens=6))
    assert len(selection) == 6
    assert sorted(set(range(8)) - set(selection.indices.tolist())) == [4, 5]


def test_framefusion_prunes_by_llm_attention_when_present_else_vit_attention() -> None:
    frames = random_frames(2, 3, 3, seed=6)
    both = clip_tokens(frames, seed=7, signals=("vit_attention", "llm_attention_last"))
    kept = make_method("framefusion")(both, Budget(max_tokens=5)).indices
    assert kept.tolist() == both.signals["llm_attention_last"].topk(5).indices.sort().values.tolist()
    del both.signals["llm_attention_last"]
    kept = make_method("framefusion")(both, Budget(max_tokens=5)).indices
    assert kept.tolist() == both.signals["vit_attention"].topk(5).indices.sort().values.tolist()


def test_framefusion_without_vit_attention_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        make_method("framefusion")(clip_tokens(random_frames(2, 1, 2), signals=()), Budget(retain=0.5))


@pytest.mark.parametrize("seed", range(10))
def test_framefusion_exact_budget_over_random_shapes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t, h, w = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
    frames = random_frames(t, h, w, d=8, seed=seed)
    if seed % 2:  # static left half: many merges
        frames[:, :, : w // 2 + 1] = frames[:1, :, : w // 2 + 1]
    budget = Budget(retain=float(torch.empty(1).uniform_(0.01, 1.0, generator=g)))
    tokens = clip_tokens(frames, seed=seed)
    selection = make_method("framefusion")(tokens, budget, PruneContext(seed=seed))
    assert len(selection) == budget.count(len(tokens))  # merges are capped at n - k
    assert torch.all(selection.indices[1:] > selection.indices[:-1])


def test_framefusion_is_deterministic() -> None:
    frames = random_frames(4, 3, 3, d=8, seed=8)
    frames[:, 0] = frames[:1, 0]
    tokens = clip_tokens(frames)
    a = make_method("framefusion")(tokens, Budget(retain=0.4))
    b = make_method("framefusion")(tokens, Budget(retain=0.4))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.features, b.features)


def test_framefusion_yaml_builds() -> None:
    (stage,) = yaml.safe_load(CONFIG.read_text())["stages"]
    assert make_method(stage["method"], **stage["options"]).config.similarity_lower_bound == 0.6


def test_framefusion_llm_merges_static_patch_and_prunes_by_last_token_attention():
    """Inside the LLM: a patch static across frames (by its layer-0 input) becomes one token at its
    earliest frame holding the mean of the run's hidden states; survivors are ranked by the last
    token's attention."""
    from streamprune.pruning.framefusion import FrameFusionLLM

    t, h, w, d = 3, 2, 2, 8
    gen = torch.Generator().manual_seed(0)
    layer0 = torch.randn(t, h * w, d, generator=gen)
    layer0[1, 0] = layer0[0, 0]
    layer0[2, 0] = layer0[0, 0]  # patch 0 static over all frames
    hidden = torch.randn(t * h * w, d, generator=gen)
    attention = torch.linspace(0.1, 1.2, t * h * w)
    attention[0] = 5.0  # the static run's anchor is important
    tokens = VisualTokens(hidden, VisualTokens.grid_positions(t, h, w), (t, h, w),
                          signals={"input_embeds": layer0.reshape(-1, d), "llm_attention_last": attention})
    selection = FrameFusionLLM()(tokens, Budget(max_tokens=4))
    assert len(selection) == 4
    assert 0 in selection.indices.tolist() and 4 not in selection.indices.tolist() and 8 not in selection.indices.tolist()
    anchor = selection.indices.tolist().index(0)
    assert torch.allclose(selection.features[anchor], hidden[[0, 4, 8]].mean(0), atol=1e-6)
    # the other survivors are the top-attention tokens among the rest
    rest = sorted(set(range(12)) - {4, 8, 0}, key=lambda i: -float(attention[i]))[:3]
    assert sorted(selection.indices.tolist()) == sorted([0, *rest])

"""VisionZip (dominant + contextual tokens per frame) and FasterVLM (ViT-attention top-k per frame)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.registry import make_method
from streamprune.pruning.visionzip import frame_quotas
from streamprune.types import VisualTokens

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "visionzip.yaml"


def clip_tokens(t: int, h: int, w: int, d: int = 16, seed: int = 0) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    n = t * h * w
    return VisualTokens(
        features=torch.randn(n, d, generator=g),
        thw=VisualTokens.grid_positions(t, h, w),
        grid=(t, h, w),
        signals={"vit_attention": torch.rand(n, generator=g)},
    )


def assert_visionzip_frame(selection, x: torch.Tensor, attention: torch.Tensor, n_dominant: int, n_context: int) -> None:
    """The selection of one frame is n_dominant attention top tokens (features unchanged) plus
    n_context targets at stride n_rest // n_context, each = target + mean of its cosine members."""
    assert len(selection) == n_dominant + n_context
    dominant = attention.topk(n_dominant).indices.tolist()
    kept = selection.indices.tolist()
    for i in dominant:
        assert i in kept
        torch.testing.assert_close(selection.features[kept.index(i)], x[i], atol=1e-5, rtol=0)
    rest = [i for i in range(x.shape[0]) if i not in set(dominant)]
    targets = rest[:: len(rest) // n_context][:n_context]
    assert sorted(set(kept) - set(dominant)) == targets
    unit = torch.nn.functional.normalize(x, dim=-1)
    members = {tg: [] for tg in targets}
    for i in rest:
        if i not in targets:
            members[targets[int((unit[i] @ unit[targets].T).argmax())]].append(i)
    for tg in targets:
        expected = x[tg] + x[members[tg]].mean(dim=0) if members[tg] else x[tg]
        torch.testing.assert_close(selection.features[kept.index(tg)], expected, atol=1e-5, rtol=0)


def test_visionzip_splits_a_quota_with_int_as_the_holitom_port() -> None:
    # visionzip/llava_arch.py L65: dominant_num = int(16 * 54/64) = int(13.5) = 13, contextual 3
    tokens = clip_tokens(1, 8, 8, seed=1)
    method = make_method("visionzip")
    assert method.config.split_rounding == "floor"
    selection = method(tokens, Budget(max_tokens=16))
    assert_visionzip_frame(selection, tokens.features, tokens.signals["vit_attention"], 13, 3)


def test_visionzip_round_split_option_gives_the_rounded_split() -> None:
    tokens = clip_tokens(1, 8, 8, seed=1)
    selection = make_method("visionzip", split_rounding="round")(tokens, Budget(max_tokens=16))
    assert_visionzip_frame(selection, tokens.features, tokens.signals["vit_attention"], 14, 2)  # round(13.5)


def test_visionzip_one_token_quota_is_one_contextual_token_as_the_port() -> None:
    # int(1 * 54/64) = 0 dominant: the single token is the first token, merged with all the others
    tokens = clip_tokens(1, 3, 3, seed=5)
    x = tokens.features
    selection = make_method("visionzip")(tokens, Budget(max_tokens=1))
    assert selection.indices.tolist() == [0]
    torch.testing.assert_close(selection.features[0], x[0] + x[1:].mean(dim=0), atol=1e-5, rtol=0)
    rounded = make_method("visionzip", split_rounding="round")(tokens, Budget(max_tokens=1))
    assert rounded.indices.tolist() == [int(tokens.signals["vit_attention"].argmax())]


def test_visionzip_splits_the_budget_evenly_over_frames() -> None:
    assert frame_quotas(3, 7, 10) == [2, 3, 2]
    assert frame_quotas(4, 2, 10) == [0, 1, 0, 1]
    tokens = clip_tokens(3, 2, 5, seed=2)
    selection = make_method("visionzip")(tokens, Budget(max_tokens=7))
    per_frame = torch.bincount(tokens.thw[selection.indices, 0], minlength=3).tolist()
    assert per_frame == [2, 3, 2]


def test_fastervlm_keeps_exactly_the_top_attention_tokens_of_each_frame() -> None:
    tokens = clip_tokens(2, 3, 3, seed=3)
    selection = make_method("fastervlm")(tokens, Budget(max_tokens=6))
    attention = tokens.signals["vit_attention"].reshape(2, 9)
    expected = torch.cat([attention[0].topk(3).indices, 9 + attention[1].topk(3).indices]).sort().values
    assert selection.indices.tolist() == expected.tolist()
    assert selection.features is None


@pytest.mark.parametrize("name", ["visionzip", "fastervlm"])
@pytest.mark.parametrize("seed", range(8))
def test_visionzip_family_exact_budget_over_random_shapes(name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t, h, w = (int(v) for v in torch.randint(1, 7, (3,), generator=g))
    tokens = clip_tokens(t, h, w, d=8, seed=seed)
    budget = Budget(retain=float(torch.empty(1).uniform_(0.01, 1.0, generator=g)))
    selection = make_method(name)(tokens, budget, PruneContext(seed=seed))
    assert len(selection) == budget.count(len(tokens))
    assert torch.all(selection.indices[1:] > selection.indices[:-1])


def test_visionzip_is_deterministic() -> None:
    tokens = clip_tokens(3, 4, 4, seed=4)
    a = make_method("visionzip")(tokens, Budget(retain=0.3))
    b = make_method("visionzip")(tokens, Budget(retain=0.3))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.features, b.features)


def test_visionzip_bad_split_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        make_method("visionzip", dominant=0, contextual=0)
    with pytest.raises(ConfigError):
        make_method("visionzip", split_rounding="ceil")


def test_visionzip_yaml_builds() -> None:
    (stage,) = yaml.safe_load(CONFIG.read_text())["stages"]
    method = make_method(stage["method"], **stage["options"])
    assert (method.config.dominant, method.config.contextual, method.config.split_rounding) == (54, 10, "floor")

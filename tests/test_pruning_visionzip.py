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


def test_visionzip_keeps_top_attention_tokens_plus_contextual_merges() -> None:
    tokens = clip_tokens(1, 8, 8, seed=1)
    x, attention = tokens.features, tokens.signals["vit_attention"]
    selection = make_method("visionzip")(tokens, Budget(max_tokens=16))  # 14 dominant + 2 contextual (54:10)
    assert len(selection) == 16
    dominant = attention.topk(14).indices
    kept = selection.indices.tolist()
    for i in dominant.tolist():
        assert i in kept
        torch.testing.assert_close(selection.features[kept.index(i)], x[i])
    # contextual: the 50 others, targets at stride 50 // 2 = 25, the rest folded in by cosine
    rest = [i for i in range(64) if i not in set(dominant.tolist())]
    targets = [rest[0], rest[25]]
    assert sorted(set(kept) - set(dominant.tolist())) == targets
    unit = torch.nn.functional.normalize(x, dim=-1)
    members = {tg: [] for tg in targets}
    for i in rest:
        if i not in targets:
            members[targets[int((unit[i] @ unit[targets].T).argmax())]].append(i)
    for tg in targets:
        expected = x[tg] + x[members[tg]].mean(dim=0) if members[tg] else x[tg]
        torch.testing.assert_close(selection.features[kept.index(tg)], expected)


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


def test_visionzip_yaml_builds() -> None:
    (stage,) = yaml.safe_load(CONFIG.read_text())["stages"]
    method = make_method(stage["method"], **stage["options"])
    assert (method.config.dominant, method.config.contextual) == (54, 10)

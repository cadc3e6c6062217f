"""DivPrune: max-min diversity selection of visual tokens."""

import torch

from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.primitives import max_min_diversity
from streamprune.pruning.registry import make_method
from streamprune.types import VisualTokens


def _tokens(features: torch.Tensor, t: int, h: int, w: int) -> VisualTokens:
    return VisualTokens(features=features, thw=VisualTokens.grid_positions(t, h, w), grid=(t, h, w))


def _clustered(n_clusters: int, per_cluster: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around random directions, shuffled so cluster members are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    labels = labels[torch.randperm(len(labels), generator=g)]
    return centres[labels] + 0.01 * torch.randn(len(labels), dim, generator=g), labels


def test_divprune_covers_every_cluster_before_a_second_point_from_any():
    feats, labels = _clustered(n_clusters=6, per_cluster=8, dim=32, seed=0)  # 48 tokens = 3 x 4 x 4
    picks = max_min_diversity(feats, 10)
    assert sorted(labels[picks[:6]].tolist()) == list(range(6))  # first 6 picks: one per cluster
    sel = make_method("divprune")(_tokens(feats, 3, 4, 4), Budget(max_tokens=6))
    assert sorted(labels[sel.indices].tolist()) == list(range(6))


def test_divprune_never_keeps_a_planted_duplicate_twice():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(36, 16, generator=g)
    feats[29] = 2.5 * feats[7]  # same direction: cosine distance 0
    sel = make_method("divprune")(_tokens(feats, 1, 6, 6), Budget(max_tokens=35))  # drop exactly one
    kept = set(sel.indices.tolist())
    assert len(kept) == 35 and not {7, 29} <= kept


def test_divprune_budget_is_exact_across_shapes_and_ratios():
    g = torch.Generator().manual_seed(2)
    method = make_method("divprune")
    for _ in range(40):
        t, h, w = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
        n = t * h * w
        budget = Budget(retain=float(torch.rand(1, generator=g)) * 0.99 + 0.01)
        if n > 2 and bool(torch.rand(1, generator=g) < 0.3):
            budget = Budget(max_tokens=int(torch.randint(1, n, (1,), generator=g)))
        sel = method(_tokens(torch.randn(n, 8, generator=g), t, h, w), budget)
        assert len(sel) == budget.count(n)
        assert torch.equal(sel.indices, torch.sort(sel.indices).values)
        assert sel.indices.unique().numel() == len(sel) and sel.features is None


def test_divprune_is_deterministic():
    feats = torch.randn(4 * 25, 16, generator=torch.Generator().manual_seed(3))
    a = make_method("divprune")(_tokens(feats, 4, 5, 5), Budget(retain=0.098), PruneContext(seed=0))
    b = make_method("divprune")(_tokens(feats.clone(), 4, 5, 5), Budget(retain=0.098), PruneContext(seed=0))
    assert torch.equal(a.indices, b.indices)

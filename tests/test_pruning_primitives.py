"""Shared pruning maths: each test checks the property a method relies on."""

import math

import torch

from streamprune.pruning.primitives import (
    anchor_merge,
    assign_to_anchors,
    cosine_distance_matrix,
    dpc_knn_cluster,
    dpc_knn_score,
    gaussian_similarity,
    max_min_diversity,
    spread_budget,
    topk_stable,
)


def _clusters(n_clusters: int, per_cluster: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * 5
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return points, labels


def test_dpc_knn_peaks_are_one_per_dense_cluster():
    points, labels = _clusters(3, 12, 8, 0.05, seed=0)
    outliers = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) * 20
    x = torch.cat([points, outliers])
    top = topk_stable(dpc_knn_score(x, k=4), 3)
    assert sorted(labels[top].tolist()) == [0, 1, 2]


def test_dpc_knn_score_batches_are_independent():
    x = torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(2))
    batched = dpc_knn_score(x, k=4)
    single = torch.stack([dpc_knn_score(x[b], k=4) for b in range(3)])
    torch.testing.assert_close(batched, single)


def test_dpc_knn_cluster_assigns_each_cluster_to_its_own_centre():
    points, labels = _clusters(4, 10, 8, 0.05, seed=3)
    centres, assignment = dpc_knn_cluster(points, 4, k=7)
    assert sorted(labels[centres].tolist()) == [0, 1, 2, 3]
    assert torch.equal(assignment[centres], torch.arange(4))
    for c in range(4):  # every member of a cluster goes to the same centre
        assert assignment[labels == c].unique().numel() == 1


def test_max_min_diversity_first_pick_has_farthest_nearest_neighbour():
    # points on a line: 0, 1, 2, 10 -> 10 is the most isolated
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    dist = torch.cdist(x, x)
    picks = max_min_diversity(x, 2, dist=dist)
    assert picks[0].item() == 3
    assert picks[1].item() == 0  # farthest from 10


def test_max_min_diversity_never_repeats_even_with_duplicates():
    x = torch.ones(5, 4)  # all identical: every distance is zero
    picks = max_min_diversity(x, 5)
    assert sorted(picks.tolist()) == [0, 1, 2, 3, 4]


def test_cosine_distance_is_zero_for_parallel_vectors():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    d = cosine_distance_matrix(x)
    assert d[0, 1].item() == 0.0 and math.isclose(d[0, 2].item(), 1.0, abs_tol=1e-6)


def test_gaussian_similarity_matches_formula_and_decreases_with_distance():
    mu = torch.tensor([1.0, 0.0])
    assert math.isclose(gaussian_similarity(mu, mu).item(), 5.0, rel_tol=1e-6)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    sq = torch.tensor([0.0, 2.0, 4.0])
    want = sum(torch.exp(-sq / (2 * a)) for a in (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0))
    got = gaussian_similarity(z, mu)
    torch.testing.assert_close(got, want)
    assert got[0] > got[1] > got[2]


def test_assign_to_anchors_uses_cosine_not_magnitude():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    members = torch.tensor([[100.0, 1.0], [0.01, 0.5]])
    assert assign_to_anchors(members, anchors).tolist() == [0, 1]


def test_anchor_merge_weight_is_max_of_inverse_count_and_beta():
    anchors = torch.tensor([[0.0], [0.0], [5.0]])
    members = torch.tensor([[1.0], [2.0], [4.0]])
    assignment = torch.tensor([0, 1, 1])  # anchor 0: 1 member, anchor 1: 2 members, anchor 2: none
    merged = anchor_merge(anchors, members, assignment, beta=0.3, adaptive=True)
    # anchor 0: w = max(1/2, 0.3) = 0.5; anchor 1: w = max(1/3, 0.3) = 1/3, mean 3; anchor 2 unchanged
    torch.testing.assert_close(merged, torch.tensor([[0.5], [2.0], [5.0]]))
    fixed = anchor_merge(anchors, members, assignment, beta=0.6, adaptive=False)
    torch.testing.assert_close(fixed, torch.tensor([[0.4], [1.2], [5.0]]))


def test_spread_budget_is_exact_even_and_respects_caps():
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        bins = int(torch.randint(1, 12, (1,), generator=g))
        total = int(torch.randint(0, 60, (1,), generator=g))
        alloc = spread_budget(total, bins)
        assert int(alloc.sum()) == total and int(alloc.max() - alloc.min()) <= 1
        caps = torch.randint(0, 8, (bins,), generator=g)
        capped = spread_budget(total, bins, caps)
        assert int(capped.sum()) == min(total, int(caps.sum()))
        assert bool((capped <= caps).all())

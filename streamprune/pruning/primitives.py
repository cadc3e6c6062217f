"""Maths shared by several pruning methods, written once (see METHODS.md section 9).

- `dpc_knn_score` / `dpc_knn_cluster`: density-peak clustering with kNN density (DPC-kNN), as
  used by FastVID (k=4), HoliTom and PruneVid (k=7).
- `max_min_diversity`: greedy max-min diversity subset under cosine distance (DivPrune,
  VLA-Pruner's min-redundancy filter).
- `gaussian_similarity`: multi-bandwidth Gaussian kernel on unit vectors (STC-Pruner).
- `assign_to_anchors` + `anchor_merge`: fold member tokens into anchor tokens (FastVID, HoliTom).
- `spread_budget`: split an integer token budget over frames/bins exactly (so per-frame rules
  never exceed a global Budget).

All functions are pure and deterministic: ties are broken by the lower index instead of the
random noise some authors add, so a fixed input always gives the same output.
"""

from __future__ import annotations

import math

import torch

# STC-Pruner's bandwidths alpha in exp(-|z - mu|^2 / (2 alpha)) [code: stc/pruner/scoring.py]
GAUSSIAN_ALPHAS: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)


def topk_stable(score: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k largest (or smallest) entries of `[M]` score; equal scores -> lower index first."""
    order = torch.sort(score if largest else -score, descending=True, stable=True).indices
    return order[:k]


def scaled_distance(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distance divided by sqrt(D), the DPC-kNN metric. `[..., M, D]` -> `[..., M, M]`."""
    x = x.float()
    return torch.cdist(x, x) / math.sqrt(x.shape[-1])


def dpc_knn_score(x: torch.Tensor, k: int) -> torch.Tensor:
    """Density-peak score rho * delta of every point; high = a good cluster centre.

    x: `[..., M, D]` (leading dims are independent batches, e.g. frames). Returns `[..., M]`.
    Rule (DPC-kNN as in PruneVid/FastVID/HoliTom code): d_ij = |x_i - x_j| / sqrt(D);
    rho_i = exp(-mean of d_ij^2 over the k nearest j, self included); delta_i = distance to the
    nearest denser point, or the largest distance in the batch for the densest point.
    The authors break density ties with U(0, 1e-6) noise; here the lower index counts as denser.
    """
    dist = scaled_distance(x)
    m = dist.shape[-1]
    if m == 0:
        return dist.new_zeros(dist.shape[:-1])
    kk = max(1, min(k, m))
    nearest = torch.topk(dist, kk, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    # denser[..., i, j]: j is denser than i (ties: lower index wins)
    idx = torch.arange(m, device=x.device)
    rho_i = density.unsqueeze(-1)
    rho_j = density.unsqueeze(-2)
    denser = (rho_j > rho_i) | ((rho_j == rho_i) & (idx[None, :] < idx[:, None]))
    dist_max = dist.flatten(-2).max(dim=-1).values[..., None, None]
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    return density * delta


def dpc_knn_cluster(x: torch.Tensor, n_centers: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `n_centers` density peaks and assign every point to its nearest centre (Euclidean).

    x: `[M, D]`. Returns (centers `[C]` long, indices into x in descending score order;
    assignment `[M]` long in [0, C), each centre assigned to itself). C = min(n_centers, M).
    This is the PruneVid/HoliTom clustering; FastVID instead assigns by cosine (use
    `assign_to_anchors`).
    """
    m = x.shape[0]
    c = max(0, min(n_centers, m))
    if c == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(m, dtype=torch.long)
    score = dpc_knn_score(x, k)
    centers = topk_stable(score, c)
    dist = scaled_distance(x)
    assignment = dist[:, centers].argmin(dim=-1)
    assignment[centers] = torch.arange(c)
    return centers, assignment


def cosine_distance_matrix(x: torch.Tensor) -> torch.Tensor:
    """1 - cos(x_i, x_j) for `[N, D]` x -> `[N, N]`, clamped to >= 0 with an exact-zero diagonal."""
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    dist = (1.0 - z @ z.T).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def max_min_diversity(x: torch.Tensor, k: int, dist: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity subset (DivPrune's MMDP solver), in pick order.

    x: `[N, D]`; dist: optional precomputed `[N, N]` distance (default cosine distance).
    Rule: the first pick is the point whose nearest other point is farthest
    (argmax_j of the second-smallest entry of column j); then repeatedly
    s = argmax_j min_{i in S} d(i, j) over points not yet picked. Returns `[min(k, N)]` long.
    Unlike the authors' loop, picked points are masked out, so a point is never picked twice
    even when all the rest are exact duplicates of picked ones.
    """
    n = x.shape[0]
    k = max(0, min(k, n))
    picks = torch.empty(k, dtype=torch.long)
    if k == 0:
        return picks
    d = cosine_distance_matrix(x) if dist is None else dist.float()
    if n == 1:
        picks[0] = 0
        return picks
    # distance to nearest OTHER point = second smallest of each column (self is 0)
    nearest_other = torch.topk(d, 2, dim=0, largest=False).values[1]
    picks[0] = torch.argmax(nearest_other)
    min_to_set = d[picks[0]].clone()
    taken = torch.zeros(n, dtype=torch.bool)
    taken[picks[0]] = True
    for i in range(1, k):
        nxt = torch.argmax(min_to_set.masked_fill(taken, -1.0))
        picks[i] = nxt
        taken[nxt] = True
        min_to_set = torch.minimum(min_to_set, d[nxt])
    return picks


def gaussian_similarity(
    z: torch.Tensor, mu: torch.Tensor, alphas: tuple[float, ...] = GAUSSIAN_ALPHAS
) -> torch.Tensor:
    """Multi-bandwidth Gaussian kernel sum_alpha exp(-|z - mu|^2 / (2 alpha)) (STC-Pruner).

    z: `[..., D]`, mu broadcastable to z (both expected L2-normalised). Returns `[...]`;
    high = z is close to mu. Several bandwidths make the score sensitive at every scale.
    """
    sq = ((z.float() - mu.float()) ** 2).sum(dim=-1)
    return sum(torch.exp(-sq / (2.0 * a)) for a in alphas)


def assign_to_anchors(members: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar anchor for each member (FastVID's DTM assignment).

    members: `[M, D]`, anchors: `[A, D]` (A >= 1). Returns `[M]` long in [0, A); ties -> lower index.
    """
    zm = torch.nn.functional.normalize(members.float(), dim=-1)
    za = torch.nn.functional.normalize(anchors.float(), dim=-1)
    return (zm @ za.T).argmax(dim=-1)


def anchor_merge(
    anchors: torch.Tensor,
    members: torch.Tensor,
    assignment: torch.Tensor,
    beta: float,
    adaptive: bool = True,
) -> torch.Tensor:
    """Fold each member into its anchor: a <- w * a + (1 - w) * mean(members assigned to a).

    anchors: `[A, D]`, members: `[M, D]`, assignment: `[M]` long in [0, A).
    w = max(1 / (n_a + 1), beta) with n_a members (FastVID, `adaptive=True`), or w = beta
    (HoliTom, `adaptive=False`). Anchors with no member are returned unchanged.
    Returns `[A, D]` in the anchors' dtype.
    """
    a = anchors.shape[0]
    counts = torch.bincount(assignment, minlength=a).to(torch.float32)
    sums = torch.zeros(a, anchors.shape[1], dtype=torch.float32).index_add_(0, assignment, members.float())
    means = sums / counts.clamp(min=1.0)[:, None]
    w = torch.clamp(1.0 / (counts + 1.0), min=beta) if adaptive else torch.full_like(counts, beta)
    merged = w[:, None] * anchors.float() + (1.0 - w[:, None]) * means
    merged = torch.where(counts[:, None] > 0, merged, anchors.float())
    return merged.to(anchors.dtype)


def spread_budget(total: int, n_bins: int, caps: torch.Tensor | None = None) -> torch.Tensor:
    """Split `total` tokens over `n_bins` bins as evenly as possible: `[n_bins]` long.

    Each bin gets total // n_bins; the remainder goes one each to evenly spaced bins. With
    `caps` (`[n_bins]` long), no bin exceeds its cap and the overflow moves to bins with room.
    The result sums to exactly min(total, sum(caps)), which is what keeps per-frame rules
    (k tokens per frame) inside a global budget.
    """
    caps = torch.full((n_bins,), max(total, 0), dtype=torch.long) if caps is None else caps.long()
    alloc = torch.zeros(n_bins, dtype=torch.long)
    remaining = max(0, min(total, int(caps.sum())))
    while remaining > 0:
        open_bins = torch.nonzero(caps > alloc).squeeze(1)
        n_open = open_bins.numel()
        add = torch.full((n_open,), remaining // n_open, dtype=torch.long)
        extra = remaining % n_open
        if extra:
            add[_evenly(n_open, extra)] += 1
        room = caps[open_bins] - alloc[open_bins]
        alloc[open_bins] += torch.minimum(add, room)
        remaining = min(total, int(caps.sum())) - int(alloc.sum())
    return alloc


def _evenly(n: int, k: int) -> torch.Tensor:
    """k distinct indices spread evenly over range(n), for 0 < k <= n."""
    return torch.floor((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp_(max=n - 1)

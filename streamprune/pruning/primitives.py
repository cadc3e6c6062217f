"""Maths shared by several pruning methods, written once (see METHODS.md section 9).

- `dpc_knn_score` / `dpc_knn_cluster`: density-peak clustering with kNN density (DPC-kNN), as
  used by FastVID (k=4), HoliTom and PruneVid (k=7).
- `max_min_diversity`: greedy max-min diversity subset under cosine distance (DivPrune,
  VLA-Pruner's min-redundancy filter).
- `gaussian_similarity`: multi-bandwidth Gaussian kernel on unit vectors (STC-Pruner).
- `assign_to_anchors` + `anchor_merge`: fold member tokens into anchor tokens (FastVID, HoliTom).
- `spread_budget` / `spread_counts`: split an integer token budget over frames/bins exactly (so
  per-frame rules never exceed a global Budget).
- `true_indices` / `pack_true`: positions of a mask's True entries when the caller already knows
  how many (flat, or per row padded), without the host copy `nonzero` needs.

All functions are pure and deterministic: ties are broken by the lower index instead of the
random noise some authors add, so a fixed input always gives the same output. They run on their
inputs' device without host copies; the DPC-kNN and merge functions take a leading batch (frames,
windows) with a `valid` mask for padding, so methods need no per-frame Python loop.
"""

from __future__ import annotations

import math

import torch

# STC-Pruner's bandwidths alpha in exp(-|z - mu|^2 / (2 alpha)) [code: stc/pruner/scoring.py]
GAUSSIAN_ALPHAS: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)


def topk_stable(score: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k largest (or smallest) entries of `[..., M]` score along the last dim;
    equal scores -> lower index first."""
    order = torch.sort(score if largest else -score, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def scaled_distance(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distance divided by sqrt(D), the DPC-kNN metric. `[..., M, D]` -> `[..., M, M]`."""
    x = x.float()
    return torch.cdist(x, x) / math.sqrt(x.shape[-1])


def dpc_knn_score(x: torch.Tensor, k: int | torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Density-peak score rho * delta of every point; high = a good cluster centre.

    x: `[..., M, D]` (leading dims are independent batches, e.g. frames). Returns `[..., M]`.
    Rule (DPC-kNN as in PruneVid/FastVID/HoliTom code): d_ij = |x_i - x_j| / sqrt(D);
    rho_i = exp(-mean of d_ij^2 over the k nearest j, self included); delta_i = distance to the
    nearest denser point, or the largest distance in the batch for the densest point.
    The authors break density ties with U(0, 1e-6) noise; here the lower index counts as denser.
    k: an int, or `[...]` long per batch. valid: optional `[..., M]` bool marking the real points of
    a padded batch; padding takes no part and scores -inf.
    """
    return _dpc_score(scaled_distance(x), k, valid)


def _dpc_score(dist: torch.Tensor, k: int | torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """`dpc_knn_score` from the `[..., M, M]` distances."""
    m = dist.shape[-1]
    if m == 0:
        return dist.new_zeros(dist.shape[:-1])
    if valid is None:
        valid = torch.ones(dist.shape[:-1], dtype=torch.bool, device=dist.device)
    pair = valid[..., :, None] & valid[..., None, :]
    # neighbours per batch: k capped by the batch's point count, as the code's min(k, M)
    n_valid = valid.sum(dim=-1)
    kk = (n_valid.clamp(max=k) if isinstance(k, int) else torch.minimum(n_valid, k)).clamp_(min=1)
    width = min(k, m) if isinstance(k, int) else m
    nearest = torch.topk(dist.masked_fill(~pair, math.inf), width, dim=-1, largest=False).values
    used = torch.arange(width, device=dist.device) < kk[..., None, None]
    density = torch.exp(-(nearest**2).masked_fill(~used, 0.0).sum(dim=-1) / kk[..., None])
    # denser[..., i, j]: j is denser than i (ties: lower index wins)
    idx = torch.arange(m, device=dist.device)
    rho_i = density.unsqueeze(-1)
    rho_j = density.unsqueeze(-2)
    denser = ((rho_j > rho_i) | ((rho_j == rho_i) & (idx[None, :] < idx[:, None]))) & valid[..., None, :]
    dist_max = dist.masked_fill(~pair, 0.0).flatten(-2).max(dim=-1).values[..., None, None]
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    return (density * delta).masked_fill_(~valid, -math.inf)


def dpc_knn_cluster(
    x: torch.Tensor, n_centers: int | torch.Tensor, k: int | torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `n_centers` density peaks and assign every point to its nearest centre (Euclidean).

    x: `[..., M, D]`; k and valid as in `dpc_knn_score`. Returns (centers `[..., C]` long, indices
    into the M points in descending score order; assignment `[..., M]` long in [0, C), the rank of
    each point's nearest centre, each centre assigned to itself). With an int n_centers,
    C = min(n_centers, M); with `[...]` long counts per batch (each at most its valid points),
    C = M and only the first n_centers[b] ranks of batch b are centres.
    This is the PruneVid/HoliTom clustering; FastVID instead assigns by cosine (use
    `assign_to_anchors`).
    """
    m = x.shape[-2]
    c = max(0, min(n_centers, m)) if isinstance(n_centers, int) else m
    if c == 0:
        return x.new_zeros(x.shape[:-2] + (0,), dtype=torch.long), x.new_zeros(x.shape[:-1], dtype=torch.long)
    dist = scaled_distance(x)
    order = torch.sort(_dpc_score(dist, k, valid), dim=-1, descending=True, stable=True).indices
    centers = order[..., :c]
    ranks = torch.arange(m, device=x.device)
    rank = torch.empty_like(order).scatter_(-1, order, ranks.expand_as(order))
    count = c if isinstance(n_centers, int) else n_centers[..., None]
    to_centre = dist.gather(-1, centers.unsqueeze(-2).expand(*centers.shape[:-1], m, c))
    to_centre = to_centre.masked_fill_(~(ranks[:c] < count)[..., None, :], math.inf)
    return centers, torch.where(rank < count, rank, to_centre.argmin(dim=-1))


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
    picks = torch.zeros(k, dtype=torch.long, device=x.device)
    if k == 0 or n == 1:
        return picks
    d = cosine_distance_matrix(x) if dist is None else dist.float()
    # distance to nearest OTHER point = second smallest of each column (self is 0)
    nearest_other = torch.topk(d, 2, dim=0, largest=False).values[1]
    picks[0] = torch.argmax(nearest_other)
    min_to_set = d[picks[0]].clone()
    min_to_set[picks[0]] = -1.0  # picked: below every distance, so never the argmax again
    # greedy and sequential by nature (each pick depends on the last), but without host copies
    for i in range(1, k):
        nxt = torch.argmax(min_to_set)
        picks[i] = nxt
        min_to_set = torch.minimum(min_to_set, d[nxt])
        min_to_set[nxt] = -1.0
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

    members: `[..., M, D]`, anchors: `[..., A, D]` (A >= 1). Returns `[..., M]` long in [0, A);
    ties -> lower index.
    """
    zm = torch.nn.functional.normalize(members.float(), dim=-1)
    za = torch.nn.functional.normalize(anchors.float(), dim=-1)
    return (zm @ za.transpose(-1, -2)).argmax(dim=-1)


def anchor_merge(
    anchors: torch.Tensor,
    members: torch.Tensor,
    assignment: torch.Tensor,
    beta: float,
    adaptive: bool = True,
) -> torch.Tensor:
    """Fold each member into its anchor: a <- w * a + (1 - w) * mean(members assigned to a).

    anchors: `[..., A, D]`, members: `[..., M, D]`, assignment: `[..., M]` long in [0, A]; a member
    assigned A is left out (padding, or a point that is itself an anchor). Leading dims are
    independent batches; members are summed in their order.
    w = max(1 / (n_a + 1), beta) with n_a members (FastVID, `adaptive=True`), or w = beta
    (HoliTom, `adaptive=False`). Anchors with no member are returned unchanged.
    Returns `[..., A, D]` in the anchors' dtype.
    """
    a, d = anchors.shape[-2:]
    lead = assignment.shape[:-1]
    slots = assignment.unsqueeze(-1).expand(*assignment.shape, d)
    sums = members.new_zeros(*lead, a + 1, d, dtype=torch.float32).scatter_add_(-2, slots, members.float())
    ones = torch.ones(assignment.shape, dtype=torch.float32, device=assignment.device)
    counts = ones.new_zeros(*lead, a + 1).scatter_add_(-1, assignment, ones)[..., :a]
    means = sums[..., :a, :] / counts.clamp(min=1.0)[..., None]
    w = torch.clamp(1.0 / (counts + 1.0), min=beta) if adaptive else torch.full_like(counts, beta)
    merged = w[..., None] * anchors.float() + (1.0 - w[..., None]) * means
    merged = torch.where(counts[..., None] > 0, merged, anchors.float())
    return merged.to(anchors.dtype)


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices (ascending) of the True entries of `mask`, of which the caller knows there are
    `count`: unlike `nonzero`, this needs no device-to-host copy to size its output."""
    return torch.nonzero_static(mask.reshape(-1), size=count).squeeze(1)


def long_tensors(device: torch.device, *lists: list[int]) -> tuple[torch.Tensor, ...]:
    """Host bookkeeping lists as long tensors on `device`, in one copy: a blocking copy to a GPU
    waits for the work queued before it, so a method uploads its counts once."""
    flat = torch.tensor([v for values in lists for v in values], dtype=torch.long, device=device)
    return flat.split([len(values) for values in lists])


def pack_true(mask: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's True positions of `[G, N]` mask in index order, padded to `width` (the largest
    count): (index `[G, width]`, valid `[G, width]`). counts: `[G]` long, row g's number of True
    entries, from the caller's bookkeeping, so nothing is copied to the host."""
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return order, torch.arange(width, device=mask.device) < counts[:, None]


def spread_budget(
    total: int, n_bins: int, caps: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Split `total` tokens over `n_bins` bins as evenly as possible: `[n_bins]` long.

    Each bin gets total // n_bins; the remainder goes one each to evenly spaced bins. With
    `caps` (`[n_bins]` long), no bin exceeds its cap and the overflow moves to bins with room.
    The result sums to exactly min(total, sum(caps)), which is what keeps per-frame rules
    (k tokens per frame) inside a global budget. On `device` (default: the caps' device, else CPU).
    """
    if caps is not None and device is None:
        device = caps.device
    counts = spread_counts(total, n_bins, None if caps is None else caps.tolist())
    return torch.tensor(counts, dtype=torch.long, device=device)


def spread_counts(total: int, n_bins: int, caps: list[int] | None = None) -> list[int]:
    """`spread_budget` in plain ints: budget bookkeeping stays on the host, next to the loop that needs it."""
    caps = [max(total, 0)] * n_bins if caps is None else list(caps)
    alloc = [0] * n_bins
    target = max(0, min(total, sum(caps)))
    while sum(alloc) < target:
        open_bins = [b for b in range(n_bins) if caps[b] > alloc[b]]
        remaining = target - sum(alloc)
        add = [remaining // len(open_bins)] * len(open_bins)
        for i in _evenly(len(open_bins), remaining % len(open_bins)):
            add[i] += 1
        for i, b in enumerate(open_bins):
            alloc[b] += min(add[i], caps[b] - alloc[b])
    return alloc


def _evenly(n: int, k: int) -> list[int]:
    """k distinct indices spread evenly over range(n), for 0 <= k <= n."""
    return [min(n - 1, math.floor((i + 0.5) * n / k)) for i in range(k)]

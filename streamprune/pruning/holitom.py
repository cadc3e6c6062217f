"""HoliTom: holistic token merging before and inside the LLM.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models"
(NeurIPS 2025, arXiv 2505.21334), code `cokeshao/HoliTom` (`holitom/llava_arch.py`,
`holitom/modeling_qwen2.py`). Two registered methods:

`holitom` (before the LLM, on the projector outputs `[T, H*W, D]`):
1. Temporal segmentation by dynamic programming (`holitom_segments`): with
   s_{t,i} = cos(x_{t,i}, x_{t+1,i}), a window [a, b] has the static positions
   St(a,b) = {i : s_{t,i} > tau for all t in [a, b-1]} and saves |St(a,b)| * (b - a) tokens when
   each static position keeps one copy. best(b) = max(best(b-1), max_w best(b-w) + saved(b-w+1, b))
   over window lengths w = 2..max_window; ties keep the shorter window (the code's strict `>`).
2. Static tokens of a window are averaged over its frames (one token per static position);
   the budget ratio is rescaled to r' = r / ((T*N - saved) / (T*N)) for what is left.
3. Each frame's dynamic tokens keep their share: round(q*(1-D)) by ViT attention top-k
   ("dominant") plus the rest as DPC-kNN centres of the non-dominant tokens ("contextual",
   kNN k = min(K, centres), members -> nearest centre by Euclidean distance,
   centre <- beta*centre + (1-beta)*mean(members)). With the default D=0 all kept dynamic tokens
   are attention top-k. The window's static tokens are reduced by the same DPC-kNN beta-merge.
Defaults (code env knobs): tau=0.8 (paper scripts use 0.65 at r=0.10), beta=0.6, D=0, K=7,
max_window=1024. Needs `vit_attention` (mean attention each patch receives in the ViT).

Differences from the authors' code, all for the runtime's contract:
- Per-group counts: the code keeps ceil(n_dyn*r') per frame and round(n_static*r') per window,
  which can overshoot the budget; here the budget k is split over the groups in proportion to
  their sizes (largest remainder), so exactly k tokens are kept (fewer only when the static
  averaging alone leaves fewer than k tokens).
- Positions: the authors do NOT keep original positions for this part (tokens enter the LLM
  contiguously, static tokens laid out in the window's first frame). Our runtime keeps the
  representative position of each output token: a static token (or static cluster) takes the
  position of its static centre in the window's FIRST frame; a contextual token takes its
  centre's position.
- DPC-kNN ties are broken by index instead of U(0, 1e-6) noise (see `primitives`).

`holitom_inner` (inside the LLM, at decoder layer K=18): keep the round(n*(1-r_in)) visual tokens
(r_in=0.5) the LAST prompt token attends to most at layer K-1; every dropped token j is merged
into its most cosine-similar kept token k by h_k <- (h_k + h_j) / 2, applied one dropped token
at a time in index order (so later merges weigh more, as in the code). Kept tokens keep their
original positions (the code passes the kept indices as position_ids).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.primitives import anchor_merge, dpc_knn_cluster, topk_stable
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens

logger = logging.getLogger(__name__)


def static_savings(frames_features: torch.Tensor, tau: float) -> torch.Tensor:
    """saved[a, b] = |St(a, b)| * (b - a): tokens removed by keeping one copy per static position.

    frames_features: `[T, N, D]`. Returns `[T, T]` float (zero on and below the diagonal).
    """
    t = frames_features.shape[0]
    saved = torch.zeros(t, t)
    if t < 2:
        return saved
    static_step = _consecutive_similarity(frames_features) > tau  # [T-1, N]
    for a in range(t - 1):
        # still_static[j, i]: position i static over frames a..a+j+1
        still_static = torch.cumprod(static_step[a:].to(torch.int64), dim=0)
        lengths = torch.arange(1, t - a, dtype=torch.float32)
        saved[a, a + 1 :] = still_static.sum(dim=1).float() * lengths
    return saved


def holitom_segments(frames_features: torch.Tensor, tau: float, max_window: int) -> list[tuple[int, int]]:
    """HoliTom's global redundancy-aware temporal segmentation (dynamic programming).

    frames_features: `[T, N, D]` (per-frame token features). Returns inclusive (start, end) frame
    windows covering 0..T-1 in order that maximise the number of static tokens removed (see
    module doc); singleton windows are allowed. O(T^2 N) to build the savings, O(T * max_window)
    for the DP.
    """
    if frames_features.ndim != 3:
        raise InputError(f"holitom_segments needs [T, N, D] features, got shape {tuple(frames_features.shape)}")
    if max_window < 1:
        raise ConfigError(f"max_window must be >= 1, got {max_window}")
    t = frames_features.shape[0]
    saved = static_savings(frames_features, tau)
    best = [0.0] * t
    start_of = [0] * t
    for b in range(t):
        value, start = (best[b - 1] if b > 0 else 0.0), b  # frame b alone
        for w in range(2, min(b + 1, max_window) + 1):
            a = b - w + 1
            candidate = (best[a - 1] if a > 0 else 0.0) + float(saved[a, b])
            if candidate > value:  # strict: ties keep the shorter window, as the code does
                value, start = candidate, a
        best[b], start_of[b] = value, start
    segments = []
    b = t - 1
    while b >= 0:
        segments.append((start_of[b], b))
        b = start_of[b] - 1
    return segments[::-1]


@register
class HoliTom(PruningMethod):
    """HoliTom's outer-LLM merge: DP temporal windows, static averaging, attention + density merge."""

    name = "holitom"
    summary = "DP temporal windows; static tokens averaged; ViT-attention top-k + DPC-kNN merge (before the LLM)"
    requires = frozenset({"vit_attention"})

    @dataclass
    class Config:
        tau: float = 0.8  # static threshold T on consecutive-frame cosine (0.65 in the r=0.10 scripts)
        beta: float = 0.6  # weight of a cluster centre in the merge
        d: float = 0.0  # D: share of each frame's kept dynamic tokens given to DPC-kNN contextual tokens
        knn: int = 7  # K of DPC-kNN (capped at the number of centres, as in the code)
        max_window: int = 1024

        def __post_init__(self) -> None:
            if not 0.0 <= self.d <= 1.0:
                raise ConfigError(f"holitom d must be in [0, 1], got {self.d}")
            if not 0.0 <= self.beta <= 1.0:
                raise ConfigError(f"holitom beta must be in [0, 1], got {self.beta}")
            if self.knn < 1 or self.max_window < 1:
                raise ConfigError("holitom knn and max_window must be >= 1")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        cfg = self.config
        t, h, w = tokens.grid
        hw = h * w
        k = budget.count(len(tokens))
        frames = tokens.frames()  # [T, HW, D]
        attn = tokens.signals["vit_attention"].float().reshape(t, hw)
        segments = holitom_segments(frames, cfg.tau, cfg.max_window)
        sims = _consecutive_similarity(frames) if t > 1 else None

        # groups: (anchor indices [n], features [n, D], attention [n] or None for static groups)
        groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        for start, end in segments:
            static = torch.zeros(hw, dtype=torch.bool)
            if end > start:
                static = (sims[start:end] > cfg.tau).all(dim=0)
            positions = torch.arange(hw)
            if static.any():
                groups.append((start * hw + positions[static], frames[start : end + 1, static].mean(dim=0), None))
            for f in range(start, end + 1):
                groups.append((f * hw + positions[~static], frames[f, ~static], attn[f, ~static]))

        sizes = torch.tensor([g[0].numel() for g in groups])
        quotas = _apportion(sizes, k)
        logger.debug(
            "holitom: %d windows, %d tokens after static averaging, keep %d",
            len(segments), int(sizes.sum()), int(quotas.sum()),
        )
        keep, feats = [], []
        for (anchors, x, a), q in zip(groups, quotas.tolist()):
            if q == 0:
                continue
            if a is None:
                local, merged = self._density_merge(x, q)
            else:
                local, merged = self._attention_density_merge(x, a, q)
            keep.append(anchors[local])
            feats.append(merged)
        if not keep:
            return Selection(indices=torch.zeros(0, dtype=torch.long), features=tokens.features[:0])
        return sorted_selection(torch.cat(keep), torch.cat(feats).to(tokens.features.dtype))

    def _density_merge(self, x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q DPC-kNN centres of `[n, D]` x, each beta-merged with its members -> (local idx [q], feats [q, D])."""
        centers, assignment = dpc_knn_cluster(x, q, k=min(self.config.knn, q))
        is_member = torch.ones(x.shape[0], dtype=torch.bool)
        is_member[centers] = False
        merged = anchor_merge(x[centers], x[is_member], assignment[is_member], self.config.beta, adaptive=False)
        return centers, merged

    def _attention_density_merge(
        self, x: torch.Tensor, attn: torch.Tensor, q: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dominant tokens by attention, the rest of the quota as DPC-kNN contextual merges."""
        n_dominant = round(q * (1.0 - self.config.d))
        dominant = topk_stable(attn, n_dominant)
        if n_dominant == q:
            return dominant, x[dominant]
        rest = torch.ones(x.shape[0], dtype=torch.bool)
        rest[dominant] = False
        rest_idx = torch.nonzero(rest).squeeze(1)
        centers, merged = self._density_merge(x[rest_idx], q - n_dominant)
        return torch.cat([dominant, rest_idx[centers]]), torch.cat([x[dominant], merged])


@register
class HoliTomInner(PruningMethod):
    """HoliTom's inner-LLM merge: keep top last-token attention, fold each dropped token into its nearest kept one."""

    name = "holitom_inner"
    summary = "inside the LLM at layer K: keep top last-token attention, merge dropped tokens into most similar kept"
    requires = frozenset({"llm_attention_last"})
    stage = "inner_llm"

    @dataclass
    class Config:
        layer: int = 18  # K (the adapter clamps it to the model depth)
        r_in: float = 0.5  # share of the visual tokens merged away at layer K

        def __post_init__(self) -> None:
            if self.layer < 1:
                raise ConfigError(f"holitom_inner layer must be >= 1, got {self.layer}")
            if not 0.0 <= self.r_in < 1.0:
                raise ConfigError(f"holitom_inner r_in must be in [0, 1), got {self.r_in}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        """Keeps min(round(n * (1 - r_in)), budget) tokens: r_in sets the count, the budget caps it."""
        n = len(tokens)
        k = min(budget.count(n), max(1, round(n * (1.0 - self.config.r_in)))) if n else 0
        keep = topk_stable(tokens.signals["llm_attention_last"].float().reshape(-1), k)
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[keep] = False
        dropped_idx = torch.nonzero(dropped).squeeze(1)
        x = tokens.features
        if dropped_idx.numel() == 0 or k == 0:
            return sorted_selection(keep)
        sim = F.normalize(x[dropped_idx].float(), dim=-1) @ F.normalize(x[keep].float(), dim=-1).T
        target = sim.argmax(dim=1)  # [n_dropped] position in `keep`
        merged = sequential_pair_average(x[keep], x[dropped_idx], target)
        return sorted_selection(keep, merged)


def sequential_pair_average(anchors: torch.Tensor, members: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Result of applying a <- (a + m) / 2 for each member in order, in closed form.

    anchors `[A, D]`, members `[M, D]` (in merge order), target `[M]` long in [0, A). An anchor with
    members m_1..m_c ends as a / 2^c + sum_r m_r / 2^(c - r + 1) (r = 1..c): later members weigh more.
    Returns `[A, D]` in the anchors' dtype.
    """
    a = anchors.shape[0]
    counts = torch.bincount(target, minlength=a)
    # rank of each member within its anchor's sequence (1-based, in member order)
    order = torch.sort(target, stable=True).indices
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(target)
    rank[order] = torch.arange(target.numel()) - group_start[target[order]] + 1
    c = counts[target]
    member_w = torch.pow(2.0, -(c - rank + 1).double())
    out = anchors.double() * torch.pow(2.0, -counts.double())[:, None]
    out.index_add_(0, target, members.double() * member_w[:, None])
    return out.to(anchors.dtype)


def _consecutive_similarity(frames: torch.Tensor) -> torch.Tensor:
    """cos(x_{t,i}, x_{t+1,i}) for `[T, N, D]` frames -> `[T-1, N]`."""
    z = F.normalize(frames.float(), dim=-1)
    return (z[:-1] * z[1:]).sum(dim=-1)


def _apportion(sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Split k over groups in proportion to `[G]` sizes (largest remainder), each quota <= its size."""
    total = int(sizes.sum())
    if k >= total:
        return sizes.clone()
    exact = sizes.double() * k / total
    quotas = torch.floor(exact).long()
    short = k - int(quotas.sum())
    if short:
        remainder = (exact - quotas.double()).masked_fill(quotas >= sizes, -1.0)
        quotas[topk_stable(remainder, short)] += 1
    return quotas

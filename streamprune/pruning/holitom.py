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
  centre's position. `layout: static_first` gives the authors' sequence instead: the kept static
  tokens first, then the dynamic ones (each in index order), numbered 0..L'-1 (1-D positions only).
- DPC-kNN ties are broken by index instead of U(0, 1e-6) noise (see `primitives`).
- Execution, not results: every frame and window is handled in one batched pass on the tokens'
  device, with two host copies per call (the savings table for the sequential DP, and each
  window's static count, which sets the budget split).

`holitom_inner` (inside the LLM, at decoder layer K=18): keep the round(n*(1-r_in)) visual tokens
(r_in=0.5) the LAST prompt token attends to most at layer K-1; every dropped token j is merged
into its most cosine-similar kept token k by h_k <- (h_k + h_j) / 2, applied one dropped token
at a time in index order (so later merges weigh more, as in the code). Kept tokens keep their
original positions (the code passes the kept indices as position_ids).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.online import HoliTomWindowCuts
from streamprune.pruning.primitives import (
    anchor_merge,
    dpc_knn_cluster,
    long_tensors,
    pack_true,
    topk_stable,
    true_indices,
)
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens

logger = logging.getLogger(__name__)


def static_savings(frames_features: torch.Tensor, tau: float) -> torch.Tensor:
    """saved[a, b] = |St(a, b)| * (b - a): tokens removed by keeping one copy per static position.

    frames_features: `[T, N, D]`. Returns `[T, T]` float (zero on and below the diagonal).
    """
    return _savings(_moves(frames_features, tau))


def _moves(frames: torch.Tensor, tau: float) -> torch.Tensor:
    """moves[t, i]: how many of the steps before frame t position i is NOT static across
    (cos <= tau); i is static over frames a..b exactly when moves[a, i] == moves[b, i]. `[T, N]` long."""
    moves = torch.zeros(frames.shape[:2], dtype=torch.long, device=frames.device)
    if frames.shape[0] > 1:
        torch.cumsum(~(_consecutive_similarity(frames) > tau), dim=0, out=moves[1:])
    return moves


def _savings(moves: torch.Tensor) -> torch.Tensor:
    """`static_savings` from `_moves`, for all windows at once: `[T, N]` -> `[T, T]` float."""
    t = moves.shape[0]
    n_static = (moves[:, None, :] == moves[None, :, :]).sum(dim=-1)  # [a, b]
    frames = torch.arange(t, device=moves.device)
    return (n_static.float() * (frames[None, :] - frames[:, None]).float()).triu(1)


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
    return _best_windows(static_savings(frames_features, tau), max_window)


def _best_windows(saved: torch.Tensor, max_window: int) -> list[tuple[int, int]]:
    """The DP of `holitom_segments` on the `[T, T]` savings. It is sequential in frames, so it runs
    on the host after one copy of the table."""
    table = saved.tolist()
    t = len(table)
    best = [0.0] * t
    start_of = [0] * t
    for b in range(t):
        value, start = (best[b - 1] if b > 0 else 0.0), b  # frame b alone
        for w in range(2, min(b + 1, max_window) + 1):
            a = b - w + 1
            candidate = (best[a - 1] if a > 0 else 0.0) + table[a][b]
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
        layout: str = "original"  # or "static_first": the authors' sequence (static tokens, then dynamic)

        def __post_init__(self) -> None:
            if not 0.0 <= self.d <= 1.0:
                raise ConfigError(f"holitom d must be in [0, 1], got {self.d}")
            if not 0.0 <= self.beta <= 1.0:
                raise ConfigError(f"holitom beta must be in [0, 1], got {self.beta}")
            if self.knn < 1 or self.max_window < 1:
                raise ConfigError("holitom knn and max_window must be >= 1")
            if self.layout not in ("original", "static_first"):
                raise ConfigError(f"holitom layout must be original or static_first, got {self.layout!r}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        cfg = self.config
        t, h, w = tokens.grid
        hw = h * w
        device = tokens.features.device
        k = budget.count(len(tokens))
        frames = tokens.frames()  # [T, HW, D]
        attn = tokens.signals["vit_attention"].float().reshape(t, hw)
        moves = _moves(frames, cfg.tau)
        segments = _best_windows(_savings(moves), cfg.max_window)
        first, last = long_tensors(device, [a for a, _ in segments], [b for _, b in segments])
        static = (moves[first] == moves[last]) & (last > first)[:, None]  # [windows, HW]
        n_static = static.sum(dim=1).tolist()  # the second host copy: group sizes split the budget

        # groups in the code's order: a window's static group (if any), then each frame's dynamic group
        sizes, window_of = [], []
        for i, ((a, b), ns) in enumerate(zip(segments, n_static)):
            sizes += ([ns] if ns else []) + [hw - ns] * (b - a + 1)
            window_of += [i] * (b - a + 1)
        quotas = _apportion(sizes, k)
        logger.debug("holitom: %d windows, %d tokens after static averaging, keep %d",
                     len(segments), sum(sizes), sum(quotas))
        static_quota, frame_quota = [], []
        quota = iter(quotas)
        for (a, b), ns in zip(segments, n_static):
            static_quota.append(next(quota) if ns else 0)
            frame_quota += [next(quota) for _ in range(a, b + 1)]

        n_dynamic = [hw - n_static[i] for i in window_of]
        keep, feats = self._dynamic_tokens(frames, attn, static, window_of, n_dynamic, frame_quota)
        n_dynamic_kept = keep.numel()
        if any(static_quota):
            centres, merged = self._static_tokens(frames, static, segments, window_of, n_static, static_quota)
            keep, feats = torch.cat([keep, centres]), torch.cat([feats, merged])
        selection = sorted_selection(keep, feats.to(tokens.features.dtype))
        if self.config.layout == "static_first":
            # the authors' outer stage concatenates the static tokens, then the dynamic ones, each
            # in index order, and the LLM numbers that sequence 0..L'-1
            is_static = torch.arange(keep.numel(), device=keep.device) >= n_dynamic_kept
            static_sorted = is_static[torch.argsort(keep)]  # in the selection's (index) order
            selection.order = torch.argsort((~static_sorted).to(torch.int8), stable=True)
            selection.contiguous = True
        return selection

    def online_cuts(self) -> HoliTomWindowCuts:
        """The DP windows on a stream: run over the open buffer, all but its last window closed."""
        return HoliTomWindowCuts(tau=self.config.tau, max_window=self.config.max_window)

    def _dynamic_tokens(
        self, frames: torch.Tensor, attn: torch.Tensor, static: torch.Tensor, window_of: list[int],
        n_dynamic: list[int], quota: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every frame's dynamic tokens at once: the top round(q*(1-D)) by attention ("dominant"),
        and the rest of its quota q as DPC-kNN centres merged with its other dynamic tokens.
        static: `[W, HW]` bool per window. Returns (flat indices, features)."""
        t, hw, d = frames.shape
        n_dominant = [round(q * (1.0 - self.config.d)) for q in quota]
        chosen = [f for f in range(t) if quota[f] > n_dominant[f]]  # frames with contextual tokens
        m_rest = [n_dynamic[f] - n_dominant[f] for f in chosen]
        window, limit, rows, rest_count, n_centres = long_tensors(
            frames.device, window_of, n_dominant, chosen, m_rest, [quota[f] - n_dominant[f] for f in chosen])
        static = static[window]  # [T, HW]
        ranks = torch.arange(hw, device=frames.device)
        by_attention = topk_stable(attn.masked_fill(static, -math.inf), hw)  # static positions last
        dominant = torch.zeros_like(static).scatter_(1, by_attention, ranks < limit[:, None])
        keep = true_indices(dominant, sum(n_dominant))
        flat = frames.reshape(t * hw, d)
        if not chosen:
            return keep, flat[keep]
        # contextual: each chosen frame's other dynamic tokens, in index order, padded to the longest
        order, is_point = pack_true(~static[rows] & ~dominant[rows], rest_count, max(m_rest))
        centres, merged = self._density_merge(frames[rows[:, None], order], rows[:, None] * hw + order, is_point,
                                              n_centres, sum(quota) - sum(n_dominant))
        return torch.cat([keep, centres]), torch.cat([flat[keep], merged])

    def _static_tokens(
        self, frames: torch.Tensor, static: torch.Tensor, segments: list[tuple[int, int]], window_of: list[int],
        n_static: list[int], quota: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every window's static positions averaged over its frames, then DPC-kNN merged down to its
        quota; the tokens sit in the window's first frame. static: `[W, HW]` bool."""
        hw = frames.shape[1]
        windows = [i for i, q in enumerate(quota) if q]
        window, rows, first, length, count, n_centres = long_tensors(
            frames.device, window_of, windows, [segments[i][0] for i in windows],
            [segments[i][1] - segments[i][0] + 1 for i in windows], [n_static[i] for i in windows],
            [quota[i] for i in windows])
        sums = frames.new_zeros((len(quota),) + frames.shape[1:], dtype=torch.float32)
        sums.index_add_(0, window, frames.float())
        order, is_point = pack_true(static[rows], count, max(n_static[i] for i in windows))
        means = (sums[rows[:, None], order] / length[:, None, None]).to(frames.dtype)
        return self._density_merge(means, first[:, None] * hw + order, is_point, n_centres, sum(quota))

    def _density_merge(
        self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, n_centres: torch.Tensor, total: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n_centres[g] DPC-kNN centres of each padded group of `[G, M, D]` x (`total` in all), each
        beta-merged with the group's other points. positions: `[G, M]` flat token index of each point.
        Returns (positions of the centres `[total]`, merged features `[total, D]`)."""
        g, m, d = x.shape
        centres, assignment = dpc_knn_cluster(x, n_centres, n_centres.clamp(max=self.config.knn), valid)
        is_centre_rank = torch.arange(m, device=x.device) < n_centres[:, None]
        is_centre = torch.zeros_like(valid).scatter_(1, centres, is_centre_rank)
        members = torch.where(valid & ~is_centre, assignment, m)  # m: not merged
        anchors = x.gather(1, centres[..., None].expand(g, m, d))
        merged = anchor_merge(anchors, x, members, self.config.beta, adaptive=False)
        keep = true_indices(is_centre_rank, total)
        return positions.gather(1, centres).reshape(-1)[keep], merged.reshape(g * m, d)[keep]


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
        if k == n or k == 0:
            return sorted_selection(keep)
        dropped = torch.ones(n, dtype=torch.bool, device=keep.device).index_fill_(0, keep, False)
        dropped_idx = true_indices(dropped, n - k)
        x = tokens.features
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
    rank[order] = torch.arange(target.numel(), device=target.device) - group_start[target[order]] + 1
    c = counts[target]
    member_w = torch.pow(2.0, -(c - rank + 1).double())
    out = anchors.double() * torch.pow(2.0, -counts.double())[:, None]
    out.index_add_(0, target, members.double() * member_w[:, None])
    return out.to(anchors.dtype)


def _consecutive_similarity(frames: torch.Tensor) -> torch.Tensor:
    """cos(x_{t,i}, x_{t+1,i}) for `[T, N, D]` frames -> `[T-1, N]`."""
    z = F.normalize(frames.float(), dim=-1)
    return (z[:-1] * z[1:]).sum(dim=-1)


def _apportion(sizes: list[int], k: int) -> list[int]:
    """Split k over groups in proportion to their sizes (largest remainder, ties -> earlier group),
    each quota <= its size; plain ints, as this is host bookkeeping."""
    total = sum(sizes)
    if k >= total:
        return list(sizes)
    exact = [size * k / total for size in sizes]
    quotas = [math.floor(e) for e in exact]
    remainder = [-1.0 if q >= size else e - q for e, q, size in zip(exact, quotas, sizes)]
    for g in sorted(range(len(sizes)), key=lambda g: -remainder[g])[: k - sum(quotas)]:
        quotas[g] += 1
    return quotas

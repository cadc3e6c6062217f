"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language
Models", NeurIPS 2025, arXiv 2503.11187): DySeg temporal segments + density spatio-temporal pruning.

This module holds the LLaVA-OneVision algorithm (`FastVID`) and the parts the authors' Qwen2.5-VL
variant (`fastvid_qwen.FastVIDQwen`) shares with it: DySeg, the signal choice, DPC-kNN anchors and
the batched segment merge.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.online import DySegThresholdCuts
from streamprune.pruning.primitives import (
    anchor_merge,
    dpc_knn_score,
    long_tensors,
    pack_true,
    spread_counts,
    topk_stable,
    true_indices,
)
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens

# Signals FastVID prefers when the adapter provides them (see `ats_attention`, `global_features`).
OPTIONAL_SIGNALS = frozenset({"probe_attention", "frame_features"})


def frame_similarity(frame_features: torch.Tensor) -> torch.Tensor:
    """`[T, D]` -> `[T-1]`: cosine of each frame's global feature with the next one's."""
    z = F.normalize(frame_features.float(), dim=-1)
    return (z[:-1] * z[1:]).sum(dim=-1)


def dyseg_cuts(sim: torch.Tensor, c: int, tau: float) -> torch.Tensor:
    """`[T-1]` bool, on sim's device: cut after frame i (DySeg's rule, see `dyseg`)."""
    cut = sim < tau
    cut[topk_stable(sim, min(c - 1, sim.shape[0]), largest=False)] = True
    return cut


def segments_from_cuts(cuts: list[bool], start: int = 0) -> list[tuple[int, int]]:
    """Host cut flags after frames start, start+1, ... -> contiguous (start, end) ranges, end exclusive."""
    bounds = [start] + [start + i + 1 for i, is_cut in enumerate(cuts) if is_cut] + [start + len(cuts) + 1]
    return list(itertools.pairwise(bounds))


def dyseg(frame_features: torch.Tensor, c: int, tau: float) -> list[tuple[int, int]]:
    """FastVID's Dynamic Segmentation: split a clip into runs of similar frames.

    frame_features: `[T, D]` one global feature per frame. Returns contiguous (start, end)
    frame ranges, end exclusive, covering range(T).
    Rule: s_i = cos(f_i, f_{i+1}); cut after frame i if s_i is among the c-1 smallest
    similarities OR s_i < tau. As in the authors' code the c-1 forced cuts always apply, so a
    clip of T >= c frames has at least c segments even when it is static; c = 1 gives pure
    threshold segmentation. Paper defaults c = 8, tau = 0.9.
    """
    if c < 1:
        raise ConfigError(f"DySeg c must be >= 1, got {c}")
    t = frame_features.shape[0]
    if t <= 1:
        return [(0, t)] if t else []
    # one host copy of T-1 flags: the segments drive the budget bookkeeping, which stays on the host
    return segments_from_cuts(dyseg_cuts(frame_similarity(frame_features), c, tau).tolist())


def ats_attention(tokens: VisualTokens) -> torch.Tensor:
    """`[N]` ATS scores: `probe_attention` (one frame-level query's attention over the frame's
    tokens, as the authors' code uses: SigLIP's MAP-head probe, or Qwen2.5-VL's mean query in the
    last ViT block) where the adapter provides it, else `vit_attention` (attention received)."""
    return tokens.signals.get("probe_attention", tokens.signals["vit_attention"])


def global_features(tokens: VisualTokens, x: torch.Tensor) -> torch.Tensor:
    """`[T, D']` DySeg features: `frame_signals["frame_features"]` (the code: SigLIP's MAP-head
    output on LLaVA-OV) where provided, else the mean of each frame's tokens (x: `[T, N, D]`; this
    is exactly the code's feature on Qwen2.5-VL)."""
    feats = tokens.frame_signals.get("frame_features")
    if feats is None:
        return x.mean(dim=1)
    if feats.shape[0] != x.shape[0]:
        raise InputError(f"frame_features has {feats.shape[0]} rows for {x.shape[0]} frames")
    return feats


@register
class FastVID(PruningMethod):
    """FastVID, following the LLaVA-OneVision code path (`modeling_qwen2.py`, Qwen2Model.forward,
    L900-1075 at a40a109).

    1. DySeg (`dyseg`) on per-frame global features (`global_features`).
    2. Per-frame budget R, split into salient n_s = R - floor(R*d) and context n_c = floor(R*d).
    3. ATS: each frame keeps its n_s tokens of highest attention (`ats_attention`), unchanged.
    4. Density: DPC-kNN score rho*delta (k = `knn`) on each frame's remaining tokens.
    5. Anchor frames: in a segment of length l, frames l-1, l-1-p, l-1-2p, ... (counted back
       from the segment's last frame) share the segment's n_c*l context slots; on each, the
       top-score tokens become anchors.
    6. DTM: the anchors of an anchor frame gather the non-salient tokens of its pool, each to its
       most cosine-similar anchor (independently per anchor frame, as in the code), and
       anchor <- w*anchor + (1-w)*mean(assigned), w = max(1/(n+1), beta). The pool is the whole
       segment, except where the code (L1010, L1026) treats the anchor frames as single-frame
       segments: when each gets exactly one frame's n_c slots (l = 1, p = 1, or p = 2 with
       n_c = 1 and l odd), an anchor frame pools only its own non-salient tokens. Here: when
       (segment context) // (anchor frames) <= the largest n_c of the segment's frames.
    Merged tokens keep their anchor's position. Paper defaults (eval.sh): retain 0.10, c=8,
    tau=0.9, d=0.4, p=4, beta=0.6, k=4.

    Signals: the code runs DySeg on SigLIP's MAP-head output and ATS on the MAP probe's attention
    (siglip_encoder.py `SigLipVisionAbstract`, llava_arch.py `encode_images`/`get_attn_2dPool`).
    The HF LLaVA-OneVision tower has no head (`vision_use_head: false`, last layer dropped), so
    unless the adapter provides `frame_features` / `probe_attention` this falls back to the mean
    of each frame's tokens and to `vit_attention` (attention received, averaged over queries).

    Budget handling differs from the code, which uses R = floor(N*r) for every frame and drops
    the remainder of n_c*l // #anchors: here R_f = budget.count(T*N) // T with the remainder
    spread over evenly spaced frames, and a segment's context slots are spread over its anchor
    frames with the remainder kept (capped by each anchor frame's non-salient tokens), so the
    total reaches the budget but never exceeds it. Ties are broken by index, not random noise;
    the merge runs in float32. Unlike the code's per-frame loops, all frames run in one batched
    pass on the tokens' device; the only host copy is DySeg's cut flags.
    """

    name = "fastvid"
    summary = "DySeg segments + attention-salient and density-merged context tokens (FastVID)"
    requires = frozenset({"vit_attention"})
    optional = OPTIONAL_SIGNALS

    @dataclass
    class Config:
        c: int = 8  # DySeg: c - 1 forced cuts at the lowest frame similarities
        tau: float = 0.9  # DySeg: cut wherever consecutive-frame cosine < tau
        d: float = 0.4  # share of each frame's budget given to density-merged context tokens
        p: int = 4  # one anchor frame every p frames, counted back from a segment's last frame
        beta: float = 0.6  # lower bound of the anchor's weight in the merge
        knn: int = 4  # neighbours in the DPC-kNN density
        # paper default retention, for configs/methods/fastvid.yaml; the Budget passed to select wins
        retain: float = 0.10

        def __post_init__(self) -> None:
            if self.c < 1 or self.p < 1 or self.knn < 1:
                raise ConfigError(f"FastVID c, p, knn must be >= 1, got c={self.c} p={self.p} knn={self.knn}")
            if not 0.0 <= self.d <= 1.0 or not 0.0 <= self.beta <= 1.0:
                raise ConfigError(f"FastVID d and beta must be in [0, 1], got d={self.d} beta={self.beta}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        cfg = self.config
        t, n = tokens.grid[0], tokens.tokens_per_frame
        feats = tokens.frames()  # [T, N, D]
        x = feats.float()  # the merge maths runs in float32, whatever the tokens' dtype
        segments = dyseg(global_features(tokens, x), cfg.c, cfg.tau)  # the one host copy
        per_frame = spread_counts(budget.count(t * n), t)  # R_f, each <= N
        n_salient = [r - math.floor(r * cfg.d) for r in per_frame]
        groups = []
        for start, end in segments:
            frames = list(range(end - 1, start - 1, -cfg.p))
            n_context = [per_frame[f] - n_salient[f] for f in range(start, end)]
            slots = spread_counts(sum(n_context), len(frames), [n - n_salient[f] for f in frames])
            own_frame_only = sum(n_context) // len(frames) <= max(n_context)
            groups.append((frames, slots, own_frame_only))
        plan = AnchorPlan(segments, n, n_salient, groups)
        return prune(feats, x, ats_attention(tokens).reshape(t, n).float(), plan, cfg.knn, cfg.beta,
                     exclude_own_anchors=False, anchors_by_index=False)

    def online_cuts(self) -> DySegThresholdCuts:
        """DySeg's threshold cuts (cos < tau) on a stream; the c - 1 forced cuts need the whole clip."""
        return DySegThresholdCuts(tau=self.config.tau)


class AnchorPlan:
    """Host bookkeeping of a FastVID pass, all plain ints so no step of it waits on the device:
    the salient count of every frame, and per segment its anchor frames, their context slots and
    whether they pool only their own frame. Anchor cells live on a grid `[S, B]` (segment, anchor
    frame within it), padded with empty cells."""

    def __init__(self, segments: list[tuple[int, int]], n: int, n_salient: list[int],
                 groups: list[tuple[list[int], list[int], bool]]) -> None:
        self.segments = segments
        self.n_salient = n_salient
        self.b_max = max(1, max(len(frames) for frames, _, _ in groups))
        self.cell_frame, self.cell_slots, self.cell_own, self.segment_of_frame = [], [], [], []
        for i, ((start, end), (frames, slots, own)) in enumerate(zip(segments, groups, strict=True)):
            pad = self.b_max - len(frames)
            self.cell_frame += frames + [frames[0] if frames else start] * pad
            self.cell_slots += slots + [0] * pad
            self.cell_own += [int(own)] * self.b_max
            self.segment_of_frame += [i] * (end - start)
        self.active_cells = [c for c, m in enumerate(self.cell_slots) if m]
        self.active_frames = [self.cell_frame[c] for c in self.active_cells]
        self.active_slots = [self.cell_slots[c] for c in self.active_cells]
        self.m_rest = [n - n_salient[f] for f in self.active_frames]
        self.m_max = max(self.cell_slots, default=0)
        self.n_anchors = sum(self.cell_slots)

    def upload(self, device: torch.device) -> _Uploaded:
        """The lists as tensors in one copy (a blocking copy to a GPU waits for its queue, so once)."""
        return _Uploaded(*long_tensors(device, *(getattr(self, name) for name in _Uploaded._fields)))


class _Uploaded(NamedTuple):
    """`AnchorPlan`'s lists as long tensors on the tokens' device."""

    n_salient: torch.Tensor  # [T]
    active_frames: torch.Tensor  # [B_active] anchor frames that get context slots
    active_slots: torch.Tensor  # [B_active] their slot counts
    m_rest: torch.Tensor  # [B_active] their non-salient token counts
    active_cells: torch.Tensor  # [B_active] their cells in the flattened [S, B] grid
    cell_frame: torch.Tensor  # [S * B]
    cell_slots: torch.Tensor  # [S * B]
    cell_own: torch.Tensor  # [S * B] 1: the cell pools only its own frame's tokens
    segment_of_frame: torch.Tensor  # [T]


def prune(feats: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, plan: AnchorPlan, knn: int, beta: float,
          exclude_own_anchors: bool, anchors_by_index: bool) -> Selection:
    """ATS + DPC-kNN anchors + DTM for a host `plan`, every frame in one batched pass.

    feats: `[T, N, D]` tokens, x the same in float32, attn `[T, N]` ATS scores.
    exclude_own_anchors: an anchor frame's own anchors are left out of its pool (the Qwen2.5-VL
    code) rather than each gathering itself (the LLaVA-OV code). anchors_by_index: a frame's
    anchors are listed in index order (Qwen2.5-VL code) instead of by score, which decides
    ties in the nearest-anchor assignment.
    """
    t, n, _ = feats.shape
    device = feats.device
    on = plan.upload(device)
    ranks = torch.arange(n, device=device)
    salient = torch.zeros(t, n, dtype=torch.bool, device=device)
    salient.scatter_(1, topk_stable(attn, n), ranks < on.n_salient[:, None])
    salient_idx = true_indices(salient, sum(plan.n_salient))
    flat = feats.reshape(t * n, -1)
    if plan.m_max == 0:
        return sorted_selection(salient_idx, flat[salient_idx])
    # non-salient tokens of each anchor frame first, in index order (padded to the longest)
    rest, is_point = pack_true(~salient[on.active_frames], on.m_rest, max(plan.m_rest))
    score = dpc_knn_score(x[on.active_frames[:, None], rest], knn, is_point)
    best = rest.gather(1, topk_stable(score, plan.m_max))  # [B_active, m] frame-local anchors
    if anchors_by_index:
        used = ranks[: plan.m_max] < on.active_slots[:, None]
        best = torch.sort(best.masked_fill(~used, n), dim=1).values.clamp_(max=n - 1)
    context_idx, context_feat = merge_segments(feats, x, salient, best, plan, on, beta, exclude_own_anchors)
    return sorted_selection(torch.cat([salient_idx, context_idx]), torch.cat([flat[salient_idx], context_feat]))


def merge_segments(feats: torch.Tensor, x: torch.Tensor, salient: torch.Tensor, best: torch.Tensor,
                   plan: AnchorPlan, on: _Uploaded, beta: float, exclude_own_anchors: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """DTM over the `[S, B, m]` anchor grid (segment, anchor frame, slot): each frame is matched
    against its segment's grid row in one batched matmul. best: `[B_active, m]` anchors of the
    active cells. Returns (flat indices `[A]`, merged features `[A, D]`) of the A anchors."""
    t, n, d = feats.shape
    device = feats.device
    z = F.normalize(x, dim=-1)
    s, b, m = len(plan.segments), plan.b_max, plan.m_max
    slot = torch.zeros(s * b, m, dtype=torch.long, device=device).index_copy_(0, on.active_cells, best)
    slot = slot.view(s, b, m)
    frame = on.cell_frame.view(s, b, 1)
    n_slots = on.cell_slots.view(s, b)
    slot_ok = torch.arange(m, device=device) < n_slots[..., None]  # [S, B, m]
    segment = on.segment_of_frame  # [T]

    # each token -> most cosine-similar anchor of every anchor frame of its segment
    anchors_z = z[frame, slot][segment].reshape(t, b * m, d)
    sims = (z @ anchors_z.transpose(1, 2)).view(t, n, b, m)
    nearest = sims.masked_fill_(~slot_ok[segment][:, None], -math.inf).argmax(dim=-1)  # [T, N, B]
    own_frame = frame.view(s, b)[segment] == torch.arange(t, device=device)[:, None]  # [T, B]
    in_pool = (n_slots[segment] > 0) & (own_frame | (on.cell_own.view(s, b)[segment] == 0))  # [T, B]
    member = ~salient[..., None] & in_pool[:, None, :]  # [T, N, B]
    if exclude_own_anchors:
        is_anchor = torch.zeros(t * n, dtype=torch.long, device=device)
        anchor_at = (on.active_frames[:, None] * n + best).reshape(-1)
        used = (torch.arange(m, device=device) < on.active_slots[:, None]).reshape(-1).long()
        is_anchor = is_anchor.index_add_(0, anchor_at, used).view(t, n) > 0
        member &= ~(is_anchor[..., None] & own_frame[:, None, :])
    target = torch.where(member, segment[:, None, None] * m + nearest, s * m)  # s * m: not merged
    merged = anchor_merge(
        feats[frame, slot].transpose(0, 1).reshape(b, s * m, d),
        x.reshape(1, t * n, d).expand(b, t * n, d),
        target.reshape(t * n, b).T,
        beta,
        adaptive=True,
    )
    keep = true_indices(slot_ok.transpose(0, 1), plan.n_anchors)
    index = (frame * n + slot).transpose(0, 1).reshape(-1)[keep]
    return index, merged.reshape(b * s * m, d)[keep]

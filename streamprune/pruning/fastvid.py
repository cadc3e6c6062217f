"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language
Models", NeurIPS 2025, arXiv 2503.11187): DySeg temporal segments + density spatio-temporal pruning."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
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
    z = F.normalize(frame_features.float(), dim=-1)
    sim = (z[:-1] * z[1:]).sum(dim=-1)  # [T-1]
    cut = sim < tau
    cut[topk_stable(sim, min(c - 1, t - 1), largest=False)] = True
    # one host copy of T-1 flags: the segments drive the budget bookkeeping, which stays on the host
    cuts = [i for i, is_cut in enumerate(cut.tolist()) if is_cut]
    starts = [0] + [i + 1 for i in cuts]
    ends = [i + 1 for i in cuts] + [t]
    return list(zip(starts, ends))


@register
class FastVID(PruningMethod):
    """FastVID, following the LLaVA-OneVision code path (`modeling_qwen2.py`, Qwen2Model.forward).

    1. DySeg (`dyseg`) on per-frame global features (`frame_signals["frame_features"]`, or the
       mean of the frame's tokens when absent; the code uses SigLIP's MAP-head output).
    2. Per-frame budget R, split into salient n_s = R - floor(R*d) and context n_c = floor(R*d).
    3. ATS: each frame keeps its n_s tokens of highest `vit_attention`, unchanged.
    4. Density: DPC-kNN score rho*delta (k = `knn`) on each frame's remaining tokens.
    5. Anchor frames: in a segment of length l, frames l-1, l-1-p, l-1-2p, ... (counted back
       from the segment's last frame) share the segment's n_c*l context slots; on each, the
       top-score tokens become anchors.
    6. DTM: every non-salient token of the segment is assigned to the most cosine-similar anchor
       of each anchor frame (independently per anchor frame, as in the code), and
       anchor <- w*anchor + (1-w)*mean(assigned), w = max(1/(n+1), beta).
    Merged tokens keep their anchor's position. Paper defaults: retain 0.10, c=8, tau=0.9,
    d=0.4, p=4, beta=0.6, k=4.

    Budget handling differs from the code, which uses R = floor(N*r) for every frame and drops
    the remainder of n_c*l // #anchors: here R_f = budget.count(T*N) // T with the remainder
    spread over evenly spaced frames, and a segment's context slots are spread over its anchor
    frames with the remainder kept (capped by each anchor frame's non-salient tokens), so the
    total reaches the budget but never exceeds it. Ties are broken by index, not random noise.
    Unlike the code's per-frame loops, all frames run in one batched pass on the tokens' device;
    the only host copy is DySeg's cut flags, which the (host-side) budget bookkeeping needs.
    """

    name = "fastvid"
    summary = "DySeg segments + attention-salient and density-merged context tokens (FastVID)"
    requires = frozenset({"vit_attention"})

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
        device = tokens.features.device
        feats = tokens.frames()  # [T, N, D]
        x = feats.float()  # the merge maths runs in float32, whatever the tokens' dtype
        attn = tokens.signals["vit_attention"].reshape(t, n).float()
        frame_features = tokens.frame_signals.get("frame_features")
        if frame_features is None:
            frame_features = x.mean(dim=1)
        elif frame_features.shape[0] != t:
            raise InputError(f"frame_features has {frame_features.shape[0]} rows for {t} frames")

        per_frame = spread_counts(budget.count(t * n), t)  # R_f, each <= N
        plan = _DTMPlan(dyseg(frame_features, cfg.c, cfg.tau), per_frame, n, cfg)  # dyseg: the one host copy
        on = plan.upload(device)  # the host bookkeeping, in one copy; then every frame in one batched pass
        ranks = torch.arange(n, device=device)
        salient = torch.zeros(t, n, dtype=torch.bool, device=device)
        salient.scatter_(1, topk_stable(attn, n), ranks < on.n_salient[:, None])
        salient_idx = true_indices(salient, sum(plan.n_salient))
        flat = feats.reshape(t * n, -1)
        if plan.m_max == 0:
            return sorted_selection(salient_idx, flat[salient_idx])
        context_idx, context_feat = self._merge_context(feats, x, salient, plan, on)
        return sorted_selection(torch.cat([salient_idx, context_idx]), torch.cat([flat[salient_idx], context_feat]))

    def _merge_context(
        self, feats: torch.Tensor, x: torch.Tensor, salient: torch.Tensor, plan: _DTMPlan, on: _Uploaded
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DPC-kNN anchors on every anchor frame, then DTM over each segment's non-salient tokens.

        Anchors live on a grid `[S, B, m]`: segment, anchor frame within it (counted back from its
        end), slot (descending score). Each frame is matched against its segment's grid row in one
        batched matmul; feats `[T, N, D]`, x the same in float32. Returns (flat indices `[A]`, merged
        features `[A, D]`) of the A anchors.
        """
        t, n, d = feats.shape
        device = feats.device
        z = F.normalize(x, dim=-1)
        # non-salient tokens of each anchor frame first, in index order (padded to the longest)
        rest, is_point = pack_true(~salient[on.active_frames], on.m_rest, max(plan.m_rest))
        score = dpc_knn_score(x[on.active_frames[:, None], rest], self.config.knn, is_point)
        best = rest.gather(1, topk_stable(score, plan.m_max))  # [B_active, m] frame-local anchors

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
        member = ~salient[..., None] & (n_slots[segment] > 0)[:, None, :]
        target = torch.where(member, segment[:, None, None] * m + nearest, s * m)  # s * m: not merged
        merged = anchor_merge(
            feats[frame, slot].transpose(0, 1).reshape(b, s * m, d),
            x.reshape(1, t * n, d).expand(b, t * n, d),
            target.reshape(t * n, b).T,
            self.config.beta,
            adaptive=True,
        )
        keep = true_indices(slot_ok.transpose(0, 1), plan.n_anchors)
        index = (frame * n + slot).transpose(0, 1).reshape(-1)[keep]
        return index, merged.reshape(b * s * m, d)[keep]


class _Uploaded(NamedTuple):
    """`_DTMPlan`'s lists as long tensors on the tokens' device."""

    n_salient: torch.Tensor  # [T]
    active_frames: torch.Tensor  # [B_active] anchor frames that get context slots
    m_rest: torch.Tensor  # [B_active] their non-salient token counts
    active_cells: torch.Tensor  # [B_active] their cells in the flattened [S, B] grid
    cell_frame: torch.Tensor  # [S * B]
    cell_slots: torch.Tensor  # [S * B]
    segment_of_frame: torch.Tensor  # [T]


class _DTMPlan:
    """Host bookkeeping of FastVID: salient counts per frame, and the DTM anchor frames, counted
    back every p frames from each segment's end, with the context slots spread over them (capped
    by their non-salient tokens). All plain ints, so no step of it waits on the device."""

    def __init__(self, segments: list[tuple[int, int]], per_frame: list[int], n: int, cfg: FastVID.Config) -> None:
        self.segments = segments
        self.n_salient = [r - math.floor(r * cfg.d) for r in per_frame]
        self.b_max = max(len(range(end - 1, start - 1, -cfg.p)) for start, end in segments)
        self.cell_frame, self.cell_slots, self.segment_of_frame = [], [], []
        for i, (start, end) in enumerate(segments):
            frames = list(range(end - 1, start - 1, -cfg.p))
            context = sum(r - s for r, s in zip(per_frame[start:end], self.n_salient[start:end]))
            slots = spread_counts(context, len(frames), [n - self.n_salient[f] for f in frames])
            pad = self.b_max - len(frames)
            self.cell_frame += frames + [frames[0]] * pad
            self.cell_slots += slots + [0] * pad
            self.segment_of_frame += [i] * (end - start)
        self.active_cells = [c for c, m in enumerate(self.cell_slots) if m]
        self.active_frames = [self.cell_frame[c] for c in self.active_cells]
        self.m_rest = [n - self.n_salient[f] for f in self.active_frames]
        self.m_max = max(self.cell_slots, default=0)
        self.n_anchors = sum(self.cell_slots)

    def upload(self, device: torch.device) -> _Uploaded:
        """The lists as tensors in one copy (a blocking copy to a GPU waits for its queue, so once)."""
        return _Uploaded(*long_tensors(device, *(getattr(self, name) for name in _Uploaded._fields)))

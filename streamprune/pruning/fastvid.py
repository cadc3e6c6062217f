"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language
Models", NeurIPS 2025, arXiv 2503.11187): DySeg temporal segments + density spatio-temporal pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.primitives import (
    anchor_merge,
    assign_to_anchors,
    dpc_knn_score,
    spread_budget,
    topk_stable,
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
    forced = topk_stable(sim, min(c - 1, t - 1), largest=False)
    below = torch.nonzero(sim < tau).squeeze(1)
    cuts = sorted(set(forced.tolist()) | set(below.tolist()))
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
        feats = tokens.frames()  # [T, N, D]
        attn = tokens.signals["vit_attention"].reshape(t, n).float()
        frame_features = tokens.frame_signals.get("frame_features")
        if frame_features is None:
            frame_features = feats.float().mean(dim=1)
        elif frame_features.shape[0] != t:
            raise InputError(f"frame_features has {frame_features.shape[0]} rows for {t} frames")

        per_frame = spread_budget(budget.count(t * n), t)  # R_f, each <= N
        n_context = torch.floor(per_frame.double() * cfg.d).long()
        n_salient = per_frame - n_context

        kept_idx: list[torch.Tensor] = []
        kept_feat: list[torch.Tensor] = []
        rest: list[torch.Tensor] = []  # per frame: frame-local indices of non-salient tokens
        for f in range(t):
            salient = topk_stable(attn[f], int(n_salient[f]))
            kept_idx.append(f * n + salient)
            kept_feat.append(feats[f, salient])
            mask = torch.ones(n, dtype=torch.bool)
            mask[salient] = False
            rest.append(torch.nonzero(mask).squeeze(1))

        for start, end in dyseg(frame_features, cfg.c, cfg.tau):
            anchor_frames = list(range(end - 1, start - 1, -cfg.p))
            caps = torch.tensor([rest[f].numel() for f in anchor_frames], dtype=torch.long)
            slots = spread_budget(int(n_context[start:end].sum()), len(anchor_frames), caps)
            if int(slots.sum()) == 0:
                continue
            pool = torch.cat([feats[f, rest[f]] for f in range(start, end)])  # segment's non-salient tokens
            for f, m in zip(anchor_frames, slots.tolist()):
                if m == 0:
                    continue
                score = dpc_knn_score(feats[f, rest[f]], cfg.knn)
                anchors = rest[f][topk_stable(score, m)]
                assignment = assign_to_anchors(pool, feats[f, anchors])
                kept_idx.append(f * n + anchors)
                kept_feat.append(anchor_merge(feats[f, anchors], pool, assignment, cfg.beta, adaptive=True))

        return sorted_selection(torch.cat(kept_idx), torch.cat(kept_feat))

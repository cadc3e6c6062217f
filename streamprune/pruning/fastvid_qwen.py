"""FastVID's Qwen2.5-VL variant, as the authors ship it for that model (a separate code path,
not described in the paper): per-segment budgets, near-duplicate frames collapsed, capped context."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.fastvid import (
    OPTIONAL_SIGNALS,
    FastVID,
    AnchorPlan,
    ats_attention,
    dyseg_cuts,
    frame_similarity,
    global_features,
    prune,
    segments_from_cuts,
)
from streamprune.pruning.online import DySegThresholdCuts
from streamprune.pruning.primitives import spread_counts
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens


@register
class FastVIDQwen(PruningMethod):
    """FastVID as the authors run it on Qwen2.5-VL (Shen et al., NeurIPS 2025, arXiv 2503.11187;
    code `fastvid_qwen25vl/.../qwenvlutils/modeling_qwen2_5_vl.py`, L1888-2100 at a40a109).

    A "frame" is one temporal unit of the token grid (`tokens.grid[0]`): the code's frame_num is
    video_grid_thw's t, i.e. 2 video frames per unit on Qwen2.5-VL (L1890).

    1. DySeg as in `fastvid.dyseg` (c - 1 forced cuts + cuts where cos < tau) on each frame's
       global feature: the mean of its merged tokens, as the code (L1836), unless the adapter
       gives `frame_features`.
    2. Per segment of l frames: retain = R*l, context = max(floor(retain*d), 1), salient =
       retain - context (L1929-1931).
    3. l = 1: the frame keeps `salient` top-attention tokens and `context` density anchors.
       l > 1 (L1937-1989): the segment is split again wherever consecutive-frame cos < `ignore`;
       each run of near-duplicates (cos >= ignore) is collapsed onto its LAST frame, which alone
       gets tokens, the rest get none. Over the V runs: salient split evenly, remainder to the
       first runs; anchor runs are the last one and every p-th counting back; the context is
       split over the ceil(V/p) anchor runs, remainder to the later ones, each capped at
       floor(N/2) (what the cap cuts is dropped); an anchor run's salient count is capped at
       N - its context, any other run's at N.
    4. ATS: top-attention tokens per frame (`ats_attention`). Anchors: DPC-kNN rho*delta (k=4)
       on the frame's non-salient tokens, top-score ones, listed in index order (L2014-2035).
    5. DTM (L2050-2074): each anchor frame independently gathers every token of its segment that
       is neither salient nor one of its own anchors (collapsed frames and other anchor frames'
       anchors included) into its most cosine-similar anchor; anchor <- w*anchor + (1-w)*mean,
       w = max(1/(n+1), beta).
    Defaults (scripts/eval.sh): retain 0.27, c=8, tau=0.84, ignore=0.95, d=0.4, p=4, beta=0.6.
    The paper's own algorithm (what the LLaVA-OV code runs) stays available as `fastvid`.

    Deviations, all declared: R per frame is budget.count(T*N) spread over the frames (the code:
    floor(N*r) each, for r a ratio), so a Budget of max_tokens works too; ties are broken by index
    instead of U(0, 1e-6) noise; the merge runs in float32; the ATS signal is the adapter's
    `probe_attention` where given (the code's: the mean query of the frame's patches against
    keys averaged per 2x2 merge group, last ViT block, L193-203), else `vit_attention`
    (attention received, averaged over queries and the group's patches); all frames run in one
    batched pass with one host copy (the cut and collapse flags).
    """

    name = "fastvid_qwen"
    summary = "FastVID's Qwen2.5-VL variant: per-segment budgets, near-duplicate frames collapsed"
    requires = frozenset({"vit_attention"})
    optional = OPTIONAL_SIGNALS

    @dataclass
    class Config(FastVID.Config):
        """FastVID's options with the authors' Qwen2.5-VL defaults (scripts/eval.sh), plus `ignore`; here
        `d` is a share of each segment's budget and `p` counts runs of frames, not frames."""

        tau: float = 0.84
        retain: float = 0.27
        ignore: float = 0.95  # collapse runs of frames whose cosine to the next is >= ignore (> 1: never)

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        cfg = self.config
        t, n = tokens.grid[0], tokens.tokens_per_frame
        feats = tokens.frames()  # [T, N, D]
        x = feats.float()
        sim = frame_similarity(global_features(tokens, x))  # [T-1]
        # one host copy: DySeg's cuts and the collapse breaks, both from the same similarities
        cuts, breaks = torch.stack([dyseg_cuts(sim, cfg.c, cfg.tau), sim < cfg.ignore]).tolist()
        segments = segments_from_cuts(cuts)
        plan = qwen_plan(segments, breaks, spread_counts(budget.count(t * n), t), n, cfg)
        return prune(feats, x, ats_attention(tokens).reshape(t, n).float(), plan, cfg.knn, cfg.beta,
                     exclude_own_anchors=True, anchors_by_index=True)

    def online_cuts(self) -> DySegThresholdCuts:
        """DySeg's threshold cuts (cos < tau) on a stream, as `FastVID.online_cuts`; the
        near-duplicate collapse (`ignore`) acts inside each closed segment, in `select`."""
        return DySegThresholdCuts(tau=self.config.tau)


def qwen_plan(segments: list[tuple[int, int]], breaks: list[bool], per_frame: list[int], n: int,
              cfg: FastVIDQwen.Config) -> AnchorPlan:
    """Salient and context counts of every frame (the code's L1929-1989), as an `AnchorPlan`.
    breaks[i]: frames i and i+1 are not near-duplicates (cos < ignore)."""
    n_salient, n_context = [0] * len(per_frame), [0] * len(per_frame)
    for start, end in segments:
        retain = sum(per_frame[start:end])
        if retain == 0:
            continue
        context = max(math.floor(retain * cfg.d), 1)
        if end - start == 1:
            n_salient[start], n_context[start] = retain - context, context
            continue
        runs = segments_from_cuts(breaks[start:end - 1], start)
        last = [stop - 1 for _, stop in runs]  # the frame each run collapses onto
        salient = _front_loaded(retain - context, len(runs))
        shares = _front_loaded(context, -(-len(runs) // cfg.p))
        for j, run in enumerate(range(len(runs) - 1, -1, -cfg.p)):  # the j-th anchor run, from the end
            n_context[last[run]] = min(shares[j], n // 2)
        for run, f in enumerate(last):
            n_salient[f] = min(salient[run], n - n_context[f])
    groups = []
    for start, end in segments:
        frames = [f for f in range(start, end) if n_context[f] > 0]
        groups.append((frames, [n_context[f] for f in frames], False))
    return AnchorPlan(segments, n, n_salient, groups)


def _front_loaded(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal ints, the remainder one each to the first parts (the code's rule)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]

"""FrameFusion: merge tokens repeated across consecutive frames, then prune by importance.

Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large
Vision Language Models" (ICCV 2025), code `thu-nics/FrameFusion` (`framefusion/main.py`).
Defaults: similarity_lower_bound S_th=0.6 (example value; the paper tunes it per model),
cost=0.3, ratio_lower_bound=0.1.

Rule implemented here, in one pass on the LLM-input tokens:
1. Merge (faithful to the code's layer-0 step): sim_{t,i} = cos(x_{t,i}, x_{t-1,i}) for the same
   patch i in consecutive frames; every token with sim >= S_th joins the run of the token before
   it, and each maximal run is replaced by the plain mean of its tokens, placed at the run's first
   (earliest) token, whose position it keeps. When merging alone would go below the budget, only
   the (n - k) most similar tokens are merged and nothing is pruned, as the code does when the
   merge would exceed its cost-derived sparsity bound.
2. Prune: keep the k most important of the remaining tokens.

What is an approximation: the authors merge again after attention in each following layer while
at least ratio_lower_bound of the tokens still merge, and prune once, in the layer after merging
ends, by the LAST query's attention at that layer, with the ratio derived from `cost`. As a
pre-LLM method this module merges once (layer 0 only), takes its count from the budget instead of
`cost`, and ranks by `llm_attention_last` when the adapter provides it, otherwise by
`vit_attention` (the ViT's saliency, not the authors' signal). A merged token is ranked by its
first token's importance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.primitives import topk_stable
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens

logger = logging.getLogger(__name__)

def merge_static_runs(frames: torch.Tensor, threshold: float, max_merged: int,
                      values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FrameFusion's similarity merge of same-patch tokens in consecutive frames.

    frames: `[T, P, D]`, compared by cosine. Returns (survivor `[T*P]` bool mask in raster order,
    features `[T*P, D']` where each survivor holds the mean of its run of `values` `[T*P, D']`,
    by default the frames' own features). At most `max_merged` tokens are merged: the most
    similar ones (ties -> lower index).
    """
    t, p, d = frames.shape
    device = frames.device
    merged = torch.zeros(t, p, dtype=torch.bool, device=device)
    if t > 1 and max_merged > 0:
        z = F.normalize(frames.float(), dim=-1)
        sim = torch.full((t, p), -2.0, device=device)
        sim[1:] = (z[1:] * z[:-1]).sum(dim=-1)
        # the most similar max_merged tokens at or over the threshold (all of them if fewer), found
        # by rank rather than by counting them on the host
        rank = torch.empty(t * p, dtype=torch.long, device=device)
        rank[topk_stable(sim.reshape(-1), t * p)] = torch.arange(t * p, device=device)
        merged = ((sim.reshape(-1) >= threshold) & (rank < max_merged)).reshape(t, p)
    # anchor frame of each token: the latest frame at or before it that starts its run
    frame = torch.arange(t, device=device)[:, None].expand(t, p)
    anchor_frame = torch.cummax(frame.masked_fill(merged, 0), dim=0).values
    anchor = (anchor_frame * p + torch.arange(p, device=device)).reshape(-1)
    x = frames.reshape(t * p, d) if values is None else values
    sums = torch.zeros(t * p, x.shape[-1], dtype=torch.float32, device=device).index_add_(0, anchor, x.float())
    counts = torch.bincount(anchor, minlength=t * p).clamp(min=1)
    means = (sums / counts[:, None]).to(x.dtype)
    return ~merged.reshape(-1), means


@register
class FrameFusion(PruningMethod):
    """Layer-0 FrameFusion: same-patch temporal merge (cos >= S_th), then importance top-k."""

    name = "framefusion"
    summary = "merge same-patch tokens of consecutive frames (cos >= S_th) into the earliest, then keep top importance"
    # the pre-LLM fallback ranking; `llm_attention_last` is used instead whenever it is present
    requires = frozenset({"vit_attention"})

    @dataclass
    class Config:
        similarity_lower_bound: float = 0.6  # S_th

        def __post_init__(self) -> None:
            if not -1.0 <= self.similarity_lower_bound <= 1.0:
                raise ConfigError(
                    f"framefusion similarity_lower_bound must be in [-1, 1], got {self.similarity_lower_bound}"
                )

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        signal = "llm_attention_last" if "llm_attention_last" in tokens.signals else "vit_attention"
        n = len(tokens)
        k = budget.count(n)
        survivor, means = merge_static_runs(tokens.frames(), self.config.similarity_lower_bound, n - k)
        survivors = torch.nonzero(survivor).squeeze(1)
        logger.debug("framefusion: %d of %d tokens survive the merge; pruning by %s", survivors.numel(), n, signal)
        importance = tokens.signals[signal].float().reshape(-1)[survivors]
        keep = survivors[topk_stable(importance, k)]
        return sorted_selection(keep, means[keep])


@register
class FrameFusionLLM(PruningMethod):
    """FrameFusion inside the LLM, as the authors run it: at decoder layer K (default 1, the layer
    after the layer-0 merge) same-patch tokens of consecutive frames whose layer-0 inputs have
    cosine >= S_th are merged into their run's earliest token (plain mean of the run's hidden
    states there), then the survivors are pruned to the budget by the LAST prompt token's
    attention at layer K-1 (head-averaged), the authors' importance. Original positions are kept.
    Remaining difference from the code: one merge round (the code repeats it after each layer
    while at least ratio_lower_bound=0.1 of the tokens still merge) and the count comes from the
    budget rather than from `cost`. Needs the full token grid (no pre-LLM pruning before it)."""

    name = "framefusion_llm"
    summary = "inside the LLM at layer K: merge same-patch tokens of consecutive frames, prune by last-token attention"
    requires = frozenset({"llm_attention_last", "input_embeds"})
    stage = "inner_llm"

    @dataclass
    class Config:
        layer: int = 1
        similarity_lower_bound: float = 0.6  # S_th

        def __post_init__(self) -> None:
            if self.layer < 1:
                raise ConfigError(f"framefusion_llm layer must be >= 1, got {self.layer}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        t, h, w = tokens.grid
        n = len(tokens)
        if n != t * h * w:
            raise ConfigError("framefusion_llm needs every visual token of the grid (put no pre-LLM pruning before it)")
        k = budget.count(n)
        layer0 = tokens.signals["input_embeds"].reshape(t, h * w, -1)
        survivor, means = merge_static_runs(layer0, self.config.similarity_lower_bound, n - k, values=tokens.features)
        survivors = torch.nonzero(survivor).squeeze(1)
        importance = tokens.signals["llm_attention_last"].float().reshape(-1)[survivors]
        keep = survivors[topk_stable(importance, k)]
        return sorted_selection(keep, means[keep])

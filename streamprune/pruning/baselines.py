"""Reference selectors with no learned signal: keep everything, keep a regular lattice, keep at random."""

from __future__ import annotations

import math
import torch

from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens


@register
class KeepAll(PruningMethod):
    """No pruning: the reference every method is measured against (run it with retain=1).
    A smaller budget is still obeyed, by keeping the first tokens, so the contract holds."""

    name = "none"
    summary = "keep every visual token (the unpruned reference)"

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        return Selection(indices=torch.arange(budget.count(len(tokens))))


@register
class Uniform(PruningMethod):
    """Evenly spaced in space and time.

    Rule: keep every frame's share of the budget, k_t = floor(k/T) (+1 for the first k mod T
    frames, frames picked evenly), and within a frame the k_t tokens nearest a regular sub-lattice
    of the h x w grid (stride sqrt(hw/k_t) in both directions).
    """

    name = "uniform"
    summary = "evenly spaced tokens in space and time (lattice per frame)"

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        t, h, w = tokens.grid
        k = budget.count(len(tokens))
        per_frame = torch.full((t,), k // t, dtype=torch.long)
        extra = k - int(per_frame.sum())
        if extra:
            per_frame[_evenly(t, extra)] += 1
        keep = []
        for frame, k_t in enumerate(per_frame.tolist()):
            if k_t:
                keep.append(frame * h * w + _lattice(h, w, k_t))
        return Selection(indices=torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.long))


@register
class RandomSelect(PruningMethod):
    """Uniformly random subset of the budget's size (seeded by PruneContext.seed)."""

    name = "random"
    summary = "random subset, seeded"

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        k = budget.count(len(tokens))
        perm = torch.randperm(len(tokens), generator=ctx.generator())[:k]
        return Selection(indices=torch.sort(perm).values)


def _evenly(n: int, k: int) -> torch.Tensor:
    """k distinct indices spread evenly over range(n) (k <= n)."""
    return torch.floor((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp_(max=n - 1)


def _lattice(h: int, w: int, k: int) -> torch.Tensor:
    """k flat indices of an h x w grid on a near-square regular lattice."""
    if k >= h * w:
        return torch.arange(h * w)
    rows = max(1, min(h, round(math.sqrt(k * h / w))))
    cols = max(1, min(w, math.ceil(k / rows)))
    while rows * cols < k:  # grid too thin in one direction
        rows = min(h, rows + 1)
        cols = min(w, math.ceil(k / rows))
    r = _evenly(h, rows)
    c = _evenly(w, cols)
    lattice = (r[:, None] * w + c[None, :]).reshape(-1)
    return lattice[_evenly(lattice.numel(), k)]

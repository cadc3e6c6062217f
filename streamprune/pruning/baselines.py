"""Reference selectors with no learned signal: keep everything, keep a regular lattice, keep at random."""

from __future__ import annotations

import math

import torch

from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.primitives import true_indices
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens


@register
class KeepAll(PruningMethod):
    """No pruning: the reference every method is measured against (run it with retain=1).
    A smaller budget is still obeyed, by keeping the first tokens, so the contract holds."""

    name = "none"
    summary = "keep every visual token (the unpruned reference)"

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        return Selection(indices=torch.arange(budget.count(len(tokens)), device=tokens.features.device))


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
        device = tokens.features.device
        base, extra = divmod(k, t)
        more = torch.zeros(t, dtype=torch.bool, device=device)
        if extra:
            more[_evenly(t, extra, device)] = True
        # every frame keeps k // t or k // t + 1 tokens: one lattice per count, laid on all its frames
        keep = [torch.zeros(0, dtype=torch.long, device=device)]
        for frames, k_t in ((true_indices(~more, t - extra), base), (true_indices(more, extra), base + 1)):
            if k_t and frames.numel():
                keep.append((frames[:, None] * h * w + _lattice(h, w, k_t, device)).reshape(-1))
        return Selection(indices=torch.sort(torch.cat(keep)).values)


@register
class RandomSelect(PruningMethod):
    """Uniformly random subset of the budget's size (seeded by PruneContext.seed)."""

    name = "random"
    summary = "random subset, seeded"

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        k = budget.count(len(tokens))
        # drawn by the seeded CPU generator, so a seed keeps the same tokens on every device
        generator = ctx.generator()
        perm = torch.randperm(len(tokens), generator=generator, device=generator.device)[:k]
        perm = perm.to(tokens.features.device)
        return Selection(indices=torch.sort(perm).values)


def _evenly(n: int, k: int, device: torch.device) -> torch.Tensor:
    """k distinct indices spread evenly over range(n) (k <= n)."""
    steps = torch.arange(k, dtype=torch.float64, device=device)
    return torch.floor((steps + 0.5) * n / k).long().clamp_(max=n - 1)


def _lattice(h: int, w: int, k: int, device: torch.device) -> torch.Tensor:
    """k flat indices of an h x w grid on a near-square regular lattice."""
    if k >= h * w:
        return torch.arange(h * w, device=device)
    rows = max(1, min(h, round(math.sqrt(k * h / w))))
    cols = max(1, min(w, math.ceil(k / rows)))
    while rows * cols < k:  # grid too thin in one direction
        rows = min(h, rows + 1)
        cols = min(w, math.ceil(k / rows))
    r = _evenly(h, rows, device)
    c = _evenly(w, cols, device)
    lattice = (r[:, None] * w + c[None, :]).reshape(-1)
    return lattice[_evenly(lattice.numel(), k, device)]

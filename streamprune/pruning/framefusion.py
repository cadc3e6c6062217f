"""FrameFusion: merge tokens repeated across frames layer by layer inside the LLM, then prune once.

Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large
Vision Language Models" (ICCV 2025); code `thu-nics/FrameFusion` at fbec1d2: `framefusion/main.py`
(the rule, L40-140; merge L180-319; cost formula L321-343) and
`framefusion/models/qwen2/modeling_qwen2.py` (where it runs: L44-47 before layer 0's attention,
L66-68 after each layer's attention, before its MLP; the pruning layer's last-query row L166-178).
Defaults (the code's): cost from the budget (see below), similarity_lower_bound S_th = 0.6,
ratio_lower_bound = 0.1, num_layers = 28.

Schedule, following the code. Point 0 is before layer 0's attention; point i+1 is inside layer i,
after its attention residual and before its MLP. At each point while merging:
1. bound = pruning_ratio(sparsities so far): the sparsity the remaining layers would need so that
   the mean share of visual tokens over `num_layers` layers is `cost`.
2. Each visual token is compared (cosine of its hidden state at this point) with the previous
   surviving token of the same spatial patch; the first token of a patch never merges.
3. ratio = (tokens with cosine >= S_th) / (visual tokens now). If ratio < bound, all of them merge
   and ratio is recorded; merging ends when ratio < ratio_lower_bound. Otherwise only the
   floor(bound * n) most similar merge and the schedule ends with no pruning.
4. A merge: each run of consecutive merging tokens of a patch joins the token before it (its
   earliest, which keeps its position); that token becomes the plain mean of itself and the run.
Prune, at the first point after merging ends: keep round(n * (1 - pruning_ratio)) of the n merged
tokens, those the LAST prompt token attends to most in that layer (head-averaged softmax row over
the merged sequence, computed beside the SDPA pass).

Options: `num_layers=None` uses the model's depth (the paper's L; the code hard-codes 28, the
depth of Qwen2-7B, and a shallow model makes the formula's budget run out); `cost` sets the
paper's cost directly.

Deviations, all declared:
- `cost=None` (default) takes the recipe's budget ratio (budget count / visual tokens), so the
  stage spends the visual-token-layers of keeping that share in every layer; the code takes
  `cost` as an argument (0.3 in its examples).
- The budget is a hard cap: the prune keeps at most the budget's count (at least 1), and when the
  bound case leaves more than the budget a prune follows (only possible with an explicit `cost`).
- Merging stops at point depth-2 at the latest, so the prune lands inside layer depth-2 and the
  last layer caches only the survivors (the code merges until the model ends and may never prune).
- Where the code raises ValueError ("The cost is too small") or divides by zero (more merge steps
  than `num_layers`), this raises ConfigError.
- Cosines, means and the attention row in float32 (the code: the hidden dtype); ties -> lower index.
- Tokens are taken in VisualTokens order, which is sequence order in every adapter here.
- `select` (a plain call, no model) is the schedule on one point: one merge of `features`, then at
  once the prune by `llm_attention_last` read at the survivors. Inside the LLM `InnerStage` runs
  the full schedule through `schedule()`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.primitives import topk_stable
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens

logger = logging.getLogger(__name__)

FIRST_OF_PATCH = -2.0  # the similarity of a patch's first token: below every threshold


def pruning_ratio(sparsities: list[float], cost: float, num_layers: int) -> float:
    """The sparsity the layers after `len(sparsities)` merge steps need so that the mean share of
    visual tokens over `num_layers` layers is `cost` (main.py L321-343): with prefix shares
    p_i = prod_{l<=i} (1 - s_l), ratio = 1 - (L*cost - sum_i p_i) / ((L - j) * p_j), at least 0."""
    share, spent = 1.0, 0.0
    for s in sparsities:
        share *= 1.0 - s
        spent += share
    left, layers_left = num_layers * cost - spent, num_layers - len(sparsities)
    if left < 0 or layers_left <= 0:
        raise ConfigError(f"framefusion: cost {cost:.3g} is too small for {len(sparsities)} merge steps over "
                          f"{num_layers} layers; raise the budget (or cost) or num_layers")
    return max(0.0, 1.0 - left / (layers_left * share))


def patch_similarity(x: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [n, D]` tokens in sequence order with spatial `patch [n]` ids -> (`order [n]`: the tokens
    sorted by patch, sequence order within a patch; `sim [n]`: cosine of each token in that order
    with the one before it, FIRST_OF_PATCH where the patch changes)."""
    order = torch.sort(patch, stable=True).indices
    z = F.normalize(x[order].float(), dim=-1)
    sim = torch.full((x.shape[0],), FIRST_OF_PATCH, device=x.device)
    sim[1:] = torch.where(patch[order][1:] == patch[order][:-1], (z[1:] * z[:-1]).sum(-1), FIRST_OF_PATCH)
    return order, sim


def merge_runs(x: torch.Tensor, order: torch.Tensor, merged: torch.Tensor) -> Selection:
    """Each run of `merged [n]` tokens (in `order`) joins the token before it, which becomes the
    plain mean of itself and the run -> Selection of the survivors (ascending) with those means."""
    n = x.shape[0]
    position = torch.arange(n, device=x.device)
    anchor = order[torch.cummax(position.masked_fill(merged, 0), dim=0).values]  # in sequence order
    member = torch.empty_like(anchor).scatter_(0, order, anchor)  # member[i]: anchor of token i
    sums = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, member, x.float())
    counts = torch.bincount(member, minlength=n)
    keep = torch.nonzero(counts).squeeze(1)  # the anchors: every token not merged away
    return Selection(indices=keep, features=(sums[keep] / counts[keep, None]).to(x.dtype))


@dataclass
class FrameFusionSchedule:
    """One prefill's run of the schedule: what happens at each point, and the steps themselves.
    `patch [n]` holds the spatial patch of each current token; `limit` is the budget's count."""

    patch: torch.Tensor
    limit: int
    cost: float
    threshold: float
    ratio_lower_bound: float
    num_layers: int
    last_merge_point: int
    sparsities: list[float] = field(default_factory=list)
    merging: bool = True
    pruned: bool = False
    history: list[tuple[int, str, int, int]] = field(default_factory=list)  # (point, step, n before, after)

    @property
    def done(self) -> bool:
        return not self.merging and self.pruned

    def action(self, point: int) -> str | None:
        """"merge", "prune" (it needs the last query's attention of layer point-1) or None."""
        if self.merging:
            return "merge"
        return "prune" if not self.pruned and point > 0 else None

    def merge(self, point: int, x: torch.Tensor) -> Selection | None:
        """Merge step on the current visual hidden states `x [n, D]`; None if nothing merged."""
        n = x.shape[0]
        bound = pruning_ratio(self.sparsities, self.cost, self.num_layers)
        order, sim = patch_similarity(x, self.patch)
        above = sim >= self.threshold
        count = int(above.sum())  # one host sync per merge point
        if count / n < bound:
            merged = above
            self.sparsities.append(count / n)
            self.merging = count / n >= self.ratio_lower_bound and point < self.last_merge_point
        else:  # merging alone reaches the cost: merge the most similar (at least down to the budget)
            count = min(count, max(int(bound * n), n - self.limit))
            merged = torch.zeros(n, dtype=torch.bool, device=x.device).scatter_(0, topk_stable(sim, count), True)
            self.merging, self.pruned = False, n - count <= self.limit
        self.history.append((point, "merge", n, n - count))
        if count == 0 and not self.done:
            return None
        selection = merge_runs(x, order, merged)
        self.patch = self.patch[selection.indices]
        return selection

    def prune(self, point: int, attention: torch.Tensor) -> Selection:
        """Prune step by the last query's attention `[n]` to the current visual tokens."""
        n = attention.shape[0]
        ratio = pruning_ratio(self.sparsities, self.cost, self.num_layers)
        k = min(self.limit, max(1, round(n * (1.0 - ratio))))
        keep = torch.sort(topk_stable(attention.float(), k)).values
        self.pruned = True
        self.patch = self.patch[keep]
        self.history.append((point, "prune", n, k))
        return Selection(indices=keep)


@register
class FrameFusion(PruningMethod):
    """FrameFusion inside the LLM on the authors' schedule: same-patch merges before layer 0 and
    after each layer's attention while enough tokens merge, then one prune by last-query attention."""

    name = "framefusion"
    summary = ("inside the LLM: merge same-patch tokens of consecutive frames before layer 0 and after each "
               "attention while >= ratio_lower_bound merge, then prune by last-token attention to the cost")
    requires = frozenset({"llm_attention_last"})  # read by `select`; the stage computes its own row
    stage = "inner_llm"

    @dataclass
    class Config:
        cost: float | None = None  # None: the recipe's budget ratio
        similarity_lower_bound: float = 0.6  # S_th
        ratio_lower_bound: float = 0.1
        num_layers: int | None = 28  # the code's constant; None: the model's depth

        def __post_init__(self) -> None:
            if self.cost is not None and not 0.0 < self.cost <= 1.0:
                raise ConfigError(f"framefusion cost must be in (0, 1], got {self.cost}")
            if not -1.0 <= self.similarity_lower_bound <= 1.0:
                raise ConfigError(f"framefusion similarity_lower_bound must be in [-1, 1], got "
                                  f"{self.similarity_lower_bound}")
            if not 0.0 <= self.ratio_lower_bound <= 1.0:
                raise ConfigError(f"framefusion ratio_lower_bound must be in [0, 1], got {self.ratio_lower_bound}")
            if self.num_layers is not None and self.num_layers < 1:
                raise ConfigError(f"framefusion num_layers must be >= 1, got {self.num_layers}")

    def schedule(self, thw: torch.Tensor, grid: tuple[int, int, int], limit: int, depth: int) -> FrameFusionSchedule:
        """A fresh schedule for `thw [n, 3]` tokens of a `grid`, at most `limit` kept, in a
        `depth`-layer model."""
        n, c = thw.shape[0], self.config
        return FrameFusionSchedule(
            patch=thw[:, 1] * grid[2] + thw[:, 2], limit=limit, cost=c.cost if c.cost is not None else limit / n,
            threshold=c.similarity_lower_bound, ratio_lower_bound=c.ratio_lower_bound,
            num_layers=c.num_layers or depth, last_merge_point=max(0, depth - 2))

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        schedule = self.schedule(tokens.thw, tokens.grid, budget.count(len(tokens)), depth=1)
        merged = schedule.merge(0, tokens.features)
        if merged is None:
            merged = Selection(indices=torch.arange(len(tokens), device=tokens.features.device), features=tokens.features)
        if schedule.done:
            return merged
        attention = tokens.signals["llm_attention_last"].float().reshape(-1)[merged.indices]
        kept = schedule.prune(1, attention).indices
        logger.debug("framefusion: %s", schedule.history)
        return Selection(indices=merged.indices[kept], features=merged.features[kept])

"""DivPrune (Alvar et al., CVPR 2025): keep the most mutually diverse visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.primitives import max_min_diversity
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens


@register
class DivPrune(PruningMethod):
    """DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025).

    Rule: choose S with |S| = k maximising min_{i != j in S} d(v_i, v_j), d = 1 - cos, on the
    LLM-input visual tokens (all frames together), solved greedily: first the token whose
    nearest other token is farthest, then repeatedly the token farthest from the kept set
    (`primitives.max_min_diversity`). Query-agnostic, no attention needed.

    Positions: by default kept tokens keep their original positions (as FastVID and vLLM's EVS
    do). The authors' LLaVA-1.5 path (`LLaVA/llava/model/llava_arch.py`, `DivPrune`) builds the
    shorter sequence and passes `position_ids=None` to generate, so the survivors get contiguous
    positions: `layout: contiguous` reproduces that (1-D positions only).

    Paper/code default: keep 9.8% (`SUBSET_RATIO = 0.098`). The authors size the subset with
    round(ratio * n); here the Budget decides (floor), so the budget is never exceeded.
    Cost: an `[N, N]` distance matrix (N = all visual tokens of the clip) and k greedy steps.
    """

    name = "divprune"
    summary = "max-min diversity subset under cosine distance (DivPrune)"

    @dataclass
    class Config:
        # paper default retention, for configs/methods/divprune.yaml; the Budget passed to select wins
        retain: float = 0.098
        layout: str = "original"  # or "contiguous": the authors' renumbered positions

        def __post_init__(self) -> None:
            if self.layout not in ("original", "contiguous"):
                raise ConfigError(f"divprune layout must be original or contiguous, got {self.layout!r}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        picks = max_min_diversity(tokens.features, budget.count(len(tokens)))
        selection = sorted_selection(picks)
        selection.contiguous = self.config.layout == "contiguous"
        return selection

"""FastV: drop the visual tokens the last prompt token ignores, inside the LLM.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024), code
`pkunlp-icler/FastV` (`modeling_llama.py`). Rule: at decoder layer K, take layer K-1's
attention, averaged over heads, in the row of the LAST prompt token, restricted to the
visual tokens; keep the top-scoring tokens (count = the budget), dropping the rest from the
sequence and from the KV cache of layers >= K. Kept tokens keep their original positions.
Paper defaults: K=2 (K=3 in some tables), prune ratio R=50-75% (the budget here).
"""

from __future__ import annotations

from dataclasses import dataclass

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.primitives import topk_stable
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens


@register
class FastV(PruningMethod):
    """Top-k visual tokens by the last prompt token's attention at layer K-1 (see module doc)."""

    name = "fastv"
    summary = "inside the LLM at layer K: keep the visual tokens the last prompt token attends to most"
    requires = frozenset({"llm_attention_last"})
    stage = "inner_llm"

    @dataclass
    class Config:
        layer: int = 2  # K: first decoder layer that sees the pruned sequence

        def __post_init__(self) -> None:
            if self.layer < 1:
                raise ConfigError(f"fastv layer must be >= 1 (it reads layer K-1's attention), got {self.layer}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        k = budget.count(len(tokens))
        scores = tokens.signals["llm_attention_last"].float().reshape(-1)
        return sorted_selection(topk_stable(scores, k))

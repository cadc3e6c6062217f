"""VLA-Pruner: temporal-aware dual-level visual token pruning for VLA models.

Liu et al., "VLA-Pruner: Temporal-Aware Dual-Level Visual Token Pruning for Efficient
Vision-Language-Action Inference" (arXiv 2511.16449), code `MINT-SJTU/VLA-Pruner` (OpenVLA:
`modeling_llama.py::fastv_forward`, `_redundancy_minization`; `modeling_prismatic.py::predict_action`).

At decoder layer K=3 of the prefill (inner-LLM stage):
1. Semantic level: S_vl = layer K-1 attention to each visual token, head-averaged and averaged
   over ALL prompt query rows (`llm_attention_mean`; the code's `use_prefil_attention`, the
   paper's main setting). `semantic="llm_attention_last"` gives the code's FastV-row variant.
2. Action level: the action-to-vision attention of past control steps (the code: layer 15,
   mean over heads and the 7 action tokens), pushed after every step with
   `push_action_attention`, smoothed as S_act = sum_{i=1..w} gamma^(i-1) S^(t-i) (the most recent
   step weighs 1), normalised to sum 1. Defaults w=3, gamma=0.8. History is per episode: call
   `reset_action_history` (the code's `reset_av_history`) at each episode start.
3. C = topk(S_vl, k) U topk(S_act, k); if |C| > k, keep k of C by greedy max-min diversity
   (cosine distance) on the layer-0 input embeddings (`input_embeds`), as `_redundancy_minization`.
   Both top-k sets have k members, so |C| >= k always: the union is never under budget and the
   authors' code has no fill step (none is needed here either).
Kept tokens keep their original positions. Budgets in the scripts: keep 50/25/12.5%.

Deviation: during warm-up (fewer than w action vectors in the history) the authors run the step
UNPRUNED (fastv_r=0). The runtime must honour the budget, so warm-up steps select by the semantic
level alone (top-k of S_vl, i.e. FastV with the chosen attention row). A history whose length
does not match the current token count is dropped and the step is treated as warm-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.primitives import max_min_diversity, topk_stable
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens

logger = logging.getLogger(__name__)

HISTORY_KEY = "vla_pruner.action_attention"
DEFAULT_WINDOW = 3
DEFAULT_GAMMA = 0.8
_SEMANTIC_SIGNALS = ("llm_attention_mean", "llm_attention_last")


def push_action_attention(ctx: PruneContext, attention: torch.Tensor, window: int = DEFAULT_WINDOW) -> None:
    """Record one control step's action-to-vision attention `[N]`; keeps the last `window` steps.

    `attention` covers all N visual tokens of the unpruned image; tokens pruned at that step get 0
    (the authors scatter the kept tokens' attention back into the full 256 and leave the rest 0).

    A vector whose length differs from the stored ones (the visual token count changed) starts
    a new history.
    """
    vec = attention.detach().float().reshape(-1)  # kept on its device: no host copy per step
    history: list[torch.Tensor] = ctx.state.setdefault(HISTORY_KEY, [])
    if history and history[-1].numel() != vec.numel():
        logger.warning(
            "vla_pruner: action attention length %d != %d; history restarted", vec.numel(), history[-1].numel()
        )
        history.clear()
    history.append(vec)
    del history[: max(0, len(history) - window)]


def reset_action_history(ctx: PruneContext) -> None:
    """Forget the action-attention history (call at the start of every episode)."""
    ctx.state.pop(HISTORY_KEY, None)


def smoothed_action_attention(
    ctx: PruneContext, window: int = DEFAULT_WINDOW, gamma: float = DEFAULT_GAMMA
) -> torch.Tensor | None:
    """sum_{i=1..w} gamma^(i-1) S^(t-i), normalised to sum 1, `[N]`; None until w steps are recorded."""
    history: list[torch.Tensor] = ctx.state.get(HISTORY_KEY, [])
    if len(history) < window:
        return None
    recent = torch.stack(history[-window:][::-1])  # most recent first
    weights = gamma ** torch.arange(window, dtype=torch.float32, device=recent.device)
    smoothed = (weights[:, None] * recent).sum(dim=0)
    total = smoothed.sum()
    return torch.where(total > 0, smoothed / total, smoothed)  # on the device, no host check


@register
class VLAPruner(PruningMethod):
    """Dual-level (semantic U smoothed action) top-k, then max-min diversity down to the budget."""

    name = "vla_pruner"
    summary = "inside the LLM at layer K: semantic top-k U temporally smoothed action top-k, then max-min diversity"
    requires = frozenset({"llm_attention_mean", "input_embeds"})
    stage = "inner_llm"

    @dataclass
    class Config:
        layer: int = 3  # K (fastv_k)
        window: int = DEFAULT_WINDOW  # w (temporal_w)
        gamma: float = DEFAULT_GAMMA  # temporal_gamma
        semantic: str = "llm_attention_mean"  # or "llm_attention_last" (the code's non-prefill variant)

        def __post_init__(self) -> None:
            if self.layer < 1:
                raise ConfigError(f"vla_pruner layer must be >= 1, got {self.layer}")
            if self.window < 1:
                raise ConfigError(f"vla_pruner window must be >= 1, got {self.window}")
            if not 0.0 < self.gamma <= 1.0:
                raise ConfigError(f"vla_pruner gamma must be in (0, 1], got {self.gamma}")
            if self.semantic not in _SEMANTIC_SIGNALS:
                raise ConfigError(f"vla_pruner semantic must be one of {_SEMANTIC_SIGNALS}, got {self.semantic!r}")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.requires = frozenset({self.config.semantic, "input_embeds"})

    def start_stream(self, ctx: PruneContext) -> None:
        reset_action_history(ctx)

    def observe_action(self, ctx: PruneContext, action_attention: torch.Tensor) -> None:
        push_action_attention(ctx, action_attention, self.config.window)

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        n = len(tokens)
        k = budget.count(n)
        semantic = tokens.signals[self.config.semantic].float().reshape(-1)
        action = smoothed_action_attention(ctx, self.config.window, self.config.gamma)
        if action is not None and action.numel() != n:
            logger.warning(
                "vla_pruner: action history has %d entries for %d visual tokens; restarting it", action.numel(), n
            )
            reset_action_history(ctx)
            action = None
        if action is None:
            logger.debug("vla_pruner: warm-up (history < %d steps), semantic top-k only", self.config.window)
            return sorted_selection(topk_stable(semantic, k))
        action = action.to(semantic.device)
        candidates = torch.unique(torch.cat([topk_stable(semantic, k), topk_stable(action, k)]))  # ascending
        if candidates.numel() > k:
            embeds = tokens.signals["input_embeds"][candidates]
            candidates = candidates[max_min_diversity(embeds, k)]
        return sorted_selection(candidates)

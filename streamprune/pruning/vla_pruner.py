"""VLA-Pruner: temporal-aware dual-level visual token pruning for VLA models.

Liu et al., "VLA-Pruner: Temporal-Aware Dual-Level Visual Token Pruning for Efficient
Vision-Language-Action Inference" (arXiv 2511.16449), code `MINT-SJTU/VLA-Pruner` @ fa5bfed
(OpenVLA: `src/openvla/transformers/.../llama/modeling_llama.py::fastv_forward` ~L1100-1120 and
`_redundancy_minization` ~L950-971; `src/openvla/prismatic/extern/hf/modeling_prismatic.py::
predict_action` ~L558-618).

At decoder layer K=3 of the prefill (inner-LLM stage):
1. Semantic level: S_vl = layer K-1 attention to each visual token, head-averaged and averaged
   over ALL prompt query rows (`llm_attention_mean`; the code's `use_prefil_attention`, the
   paper's main setting). `semantic="llm_attention_last"` gives the code's FastV-row variant.
2. Action level: the action-to-vision attention of past control steps (the code: layer 15,
   mean over heads and the 7 action tokens), pushed after every step with
   `push_action_attention` (the `observe_action` hook), smoothed over the last w steps with
   weights gamma^i, normalised to sum 1. Defaults w=3, gamma=0.8. History is per episode:
   `start_stream` (the code's `reset_av_history`) clears it.
3. C = topk(S_vl, k) U topk(S_act, k); if |C| > k, keep k of C by greedy max-min diversity
   (cosine distance) on the layer-0 input embeddings (`input_embeds`), as `_redundancy_minization`.
   Both top-k sets have k members, so |C| >= k always: the union is never under budget and the
   authors' code has no fill step (none is needed here either).
Kept tokens keep their original positions. Budgets in the scripts: keep 50/25/12.5%.

Where code and paper differ (code by default, the paper as an option):
- Smoothing order (`smoothing_order`). The code (`predict_action` ~L573-576) builds
  weights gamma^(w-1), ..., gamma^0 and pairs weights[i] with history[-1-i], so the NEWEST step
  weighs gamma^(w-1) and the OLDEST weighs 1 (`"code"`, default). The paper writes
  sum_{i=1..w} gamma^(i-1) S^(t-i): the newest step weighs 1 (`"paper"`).
- Warm-up (`warmup`). The code (`predict_action` ~L568 and ~L593-603) runs every step whose
  history holds fewer than w vectors with fastv_r=0, i.e. UNPRUNED, and still records that step's
  action attention (~L612-618). `"unpruned"` (default) does the same: for the first w steps of an
  episode `__call__` lifts the budget to all N tokens (the one place this method exceeds the
  recipe's budget, by design), and `observe_action` records the step as usual. `"semantic"`
  prunes warm-up steps by S_vl alone (FastV with the chosen attention row) within budget.
Our own deviations:
- An episode is what `start_stream` begins (`VLAPolicy.reset` calls it). The unpruned warm-up
  applies only there: a context that never began an episode (video QA, a bare PruneContext) gets
  no action feedback to wait for, so it prunes by S_vl until a full history exists.
- The code casts the smoothed vector to bfloat16 before its top-k (~L578); we rank in float32.
  The code divides by the sum unguarded; an all-zero history stays zero here.
- A history whose length does not match the current token count is dropped and the step is
  treated as warm-up (the code has a fixed 256 tokens).
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
EPISODE_KEY = "vla_pruner.episode"  # set by start_stream: action feedback will follow each step
DEFAULT_WINDOW = 3
DEFAULT_GAMMA = 0.8
_SEMANTIC_SIGNALS = ("llm_attention_mean", "llm_attention_last")
_SMOOTHING_ORDERS = ("code", "paper")
_WARMUPS = ("unpruned", "semantic")


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
    ctx: PruneContext, window: int = DEFAULT_WINDOW, gamma: float = DEFAULT_GAMMA, order: str = "code"
) -> torch.Tensor | None:
    """The last `window` action vectors weighted by powers of gamma, normalised to sum 1, `[N]`;
    None until `window` steps are recorded. order "code": the oldest weighs 1, the newest
    gamma^(w-1) (`predict_action` ~L573-576); "paper": the newest weighs 1."""
    history: list[torch.Tensor] = ctx.state.get(HISTORY_KEY, [])
    if len(history) < window:
        return None
    recent = torch.stack(history[-window:])  # oldest first
    powers = torch.arange(window, dtype=torch.float32, device=recent.device)  # 0 for the oldest
    if order == "paper":
        powers = powers.flip(0)  # 0 for the newest
    smoothed = ((gamma**powers)[:, None] * recent).sum(dim=0)
    total = smoothed.sum()
    return torch.where(total > 0, smoothed / total, smoothed)  # on the device, no host check


@register
class VLAPruner(PruningMethod):
    """Dual-level (semantic U smoothed action) top-k, then max-min diversity down to the budget."""

    name = "vla_pruner"
    summary = "inside the LLM at layer K: semantic top-k U temporally smoothed action top-k, then max-min diversity"
    requires = frozenset({"llm_attention_mean", "input_embeds"})
    stage = "inner_llm"
    needs_action_feedback = True

    @dataclass
    class Config:
        layer: int = 3  # K (fastv_k)
        window: int = DEFAULT_WINDOW  # w (temporal_w)
        gamma: float = DEFAULT_GAMMA  # temporal_gamma
        semantic: str = "llm_attention_mean"  # or "llm_attention_last" (the code's non-prefill variant)
        smoothing_order: str = "code"  # "code": oldest step weighs 1; "paper": newest weighs 1
        warmup: str = "unpruned"  # first w steps of an episode: "unpruned" (code) or "semantic" top-k

        def __post_init__(self) -> None:
            if self.layer < 1:
                raise ConfigError(f"vla_pruner layer must be >= 1, got {self.layer}")
            if self.window < 1:
                raise ConfigError(f"vla_pruner window must be >= 1, got {self.window}")
            if not 0.0 < self.gamma <= 1.0:
                raise ConfigError(f"vla_pruner gamma must be in (0, 1], got {self.gamma}")
            if self.semantic not in _SEMANTIC_SIGNALS:
                raise ConfigError(f"vla_pruner semantic must be one of {_SEMANTIC_SIGNALS}, got {self.semantic!r}")
            if self.smoothing_order not in _SMOOTHING_ORDERS:
                raise ConfigError(f"vla_pruner smoothing_order must be one of {_SMOOTHING_ORDERS}, "
                                  f"got {self.smoothing_order!r}")
            if self.warmup not in _WARMUPS:
                raise ConfigError(f"vla_pruner warmup must be one of {_WARMUPS}, got {self.warmup!r}")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.requires = frozenset({self.config.semantic, "input_embeds"})

    def start_stream(self, ctx: PruneContext) -> None:
        reset_action_history(ctx)
        ctx.state[EPISODE_KEY] = True

    def observe_action(self, ctx: PruneContext, action_attention: torch.Tensor) -> None:
        push_action_attention(ctx, action_attention, self.config.window)

    def warming_up_unpruned(self, ctx: PruneContext, n_tokens: int) -> bool:
        """Whether this step runs unpruned: `warmup="unpruned"`, inside an episode, and fewer than
        w action vectors of this token count recorded (host-side bookkeeping only, no device sync)."""
        if self.config.warmup != "unpruned" or not ctx.state.get(EPISODE_KEY, False):
            return False
        history: list[torch.Tensor] = ctx.state.get(HISTORY_KEY, [])
        usable = len(history) if history and history[-1].numel() == n_tokens else 0
        return usable < self.config.window

    def __call__(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext | None = None) -> Selection:
        ctx = ctx if ctx is not None else PruneContext()
        if self.warming_up_unpruned(ctx, len(tokens)):
            # the authors' fastv_r=0 step: all N survive (top-N of S_vl, i.e. every token, in order)
            logger.debug("vla_pruner: warm-up step %d of %d runs unpruned", len(ctx.state.get(HISTORY_KEY, [])) + 1,
                         self.config.window)
            budget = Budget(max_tokens=max(1, len(tokens)))
        return super().__call__(tokens, budget, ctx)

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        n = len(tokens)
        k = budget.count(n)
        semantic = tokens.signals[self.config.semantic].float().reshape(-1)
        action = smoothed_action_attention(ctx, self.config.window, self.config.gamma, self.config.smoothing_order)
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

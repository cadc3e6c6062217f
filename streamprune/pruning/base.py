"""The one interface every token-pruning method implements, and the budget it must honour."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from streamprune.errors import ConfigError
from streamprune.pruning.online import OnlineCutRule
from streamprune.types import Selection, VisualTokens


@dataclass(frozen=True)
class Budget:
    """How many visual tokens may survive: a ratio `retain` in (0, 1], an absolute
    `max_tokens`, or both (the smaller wins). `count(n)` never exceeds either bound."""

    retain: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.retain is not None and not (0.0 < self.retain <= 1.0):
            raise ConfigError(f"retain must be in (0, 1], got {self.retain}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def count(self, n_tokens: int) -> int:
        k = n_tokens
        if self.retain is not None:
            # floor (with a tolerance for 0.1*n style float error) so the ratio is never exceeded
            k = min(k, max(1, math.floor(self.retain * n_tokens + 1e-9)))
        if self.max_tokens is not None:
            k = min(k, self.max_tokens)
        return max(0, k)


@dataclass
class PruneContext:
    """Per-call information beyond the tokens themselves.

    seed:  for methods with randomness (deterministic given the seed).
    state: per-stream state a method may keep between calls (e.g. VLA-Pruner's action-attention
           history, STC-Pruner's temporal memory); owned by the caller, reset per stream/episode.
    """

    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class PruningMethod(ABC):
    """A token selector acting on visual tokens before the LLM or inside it (see `stage`).

    Subclasses set `name`, a `Config` dataclass whose defaults are the paper's, and `requires`,
    the side signals (keys of `VisualTokens.signals` / `frame_signals`) they read.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    # side signals used when the adapter can provide them (a method must work without them)
    optional: ClassVar[frozenset[str]] = frozenset()
    # "pre_llm": acts on the LLM-input visual tokens; "inner_llm": on hidden states at Config.layer
    stage: ClassVar[str] = "pre_llm"
    # True for methods whose rule needs the action attention of control steps (`observe_action`)
    needs_action_feedback: ClassVar[bool] = False

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        """Choose (and possibly merge) at most `budget.count(len(tokens))` tokens."""

    def start_stream(self, ctx: PruneContext) -> None:
        """A new stream or episode begins: forget per-stream state kept in `ctx` (default: none kept)."""

    def observe_action(self, ctx: PruneContext, action_attention: torch.Tensor) -> None:
        """Feedback after a control step: the action tokens' attention `[N]` to the unpruned visual
        tokens (0 where pruned). Methods that rank by past actions (VLA-Pruner) record it."""

    def online_cuts(self) -> OnlineCutRule | None:
        """Where this method cuts a stream arriving one unit at a time (pruning/online.py), for the
        runtime's segmenter; None (the default): no temporal rule, every unit is its own segment."""
        return None

    def __call__(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext | None = None) -> Selection:
        missing = [k for k in self.requires if k not in tokens.signals and k not in tokens.frame_signals]
        if missing:
            raise ConfigError(f"method {self.name!r} needs signals {missing} that the encoder did not provide")
        selection = self.select(tokens, budget, ctx or PruneContext())
        limit = budget.count(len(tokens))
        if len(selection) > limit:
            raise AssertionError(f"{self.name} kept {len(selection)} tokens, budget {limit}")
        return selection


def sorted_selection(indices: torch.Tensor, features: torch.Tensor | None = None) -> Selection:
    """A Selection with indices in ascending order (features permuted alongside)."""
    order = torch.argsort(indices)
    return Selection(indices=indices[order], features=None if features is None else features[order])

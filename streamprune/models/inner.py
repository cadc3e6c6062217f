"""An inner-LLM pruning stage inside one prefill (FastV, VLA-Pruner, HoliTom's inner merge,
FrameFusion's LLM variant): read attention beside layer K-1, prune the visual hidden states at K.

Layers before K cache every token, later layers only the survivors; positions stay the originals.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from streamprune.models.attention import last_query_attention, mean_query_attention
from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.types import VisualTokens

if TYPE_CHECKING:
    from streamprune.models.base import VideoLLMAdapter


class InnerStage:
    """An inner-LLM pruning stage during one prefill: at layer `method.config.layer - 1` it
    computes, beside the normal attention, the attention the visual tokens receive from the last
    prompt token (and from all prompt tokens when the method asks for it); at `layer` it lets the
    method choose among the visual hidden states and slices the sequence."""

    def __init__(self, adapter: VideoLLMAdapter, method: PruningMethod, budget: Budget, ctx: PruneContext,
                 visual_slots: torch.Tensor, input_embeds: torch.Tensor, thw: torch.Tensor | None = None,
                 grid: tuple[int, int, int] | None = None) -> None:
        self.layer = inner_layer(adapter, method)
        self.method, self.budget, self.ctx = method, budget, ctx
        self.visual_slots = visual_slots
        self.input_embeds = input_embeds
        # grid positions of the tokens reaching the stage (methods that compare frames need them)
        n = len(visual_slots)
        device = input_embeds.device
        self.thw = (thw if thw is not None else torch.zeros(n, 3, dtype=torch.long)).to(device)
        self.grid = grid if grid is not None else (1, 1, n)
        self.attention: dict[str, torch.Tensor] = {}
        self.kept = len(visual_slots)
        # after pruning: which of the visual_slots survived, and their index in the new sequence
        self.survivors = torch.arange(len(visual_slots), device=device)
        self.survivor_slots = visual_slots
        # set by benchmarks: time observe + prune (synchronising on CUDA), the stage's own cost
        self.timed = False
        self.selection_ms = 0.0

    def _clock(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def observe(self, layer: torch.nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        start = self._clock(hidden.device) if self.timed else 0.0
        self._observe(layer, hidden, rope)
        if self.timed:
            self.selection_ms += (self._clock(hidden.device) - start) * 1000

    def prune(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._clock(hidden.device) if self.timed else 0.0
        out = self._prune(hidden, positions)
        if self.timed:
            self.selection_ms += (self._clock(hidden.device) - start) * 1000
        return out

    def _observe(self, layer: torch.nn.Module, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        # the last query row is O(L d); the all-query mean is O(L^2 d), so only when asked for
        self.attention = {"llm_attention_last": last_query_attention(layer, hidden, rope)[self.visual_slots]}
        if "llm_attention_mean" in self.method.requires:
            self.attention["llm_attention_mean"] = mean_query_attention(layer, hidden, rope)[self.visual_slots]

    def _prune(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_slots = self.visual_slots
        tokens = VisualTokens(
            features=hidden[0, t_slots],
            thw=self.thw,
            grid=self.grid,
            signals={**self.attention, "input_embeds": self.input_embeds},
        )
        selection = self.method(tokens, self.budget, self.ctx)
        keep = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        keep[t_slots] = False
        keep[t_slots[selection.indices]] = True
        if selection.features is not None:
            hidden = hidden.clone()
            hidden[0, t_slots[selection.indices]] = selection.features.to(hidden.dtype)
        self.kept = len(selection)
        self.survivors = selection.indices
        self.survivor_slots = (torch.cumsum(keep, 0) - 1)[t_slots[selection.indices]]
        return hidden[:, keep], positions[:, keep]


def inner_layer(adapter: Any, method: PruningMethod) -> int:
    """The decoder layer an inner stage prunes at: its configured layer, clamped to the model
    (tiny models have fewer layers than the papers' K)."""
    return max(1, min(int(method.config.layer), len(adapter.language_model.layers) - 1))

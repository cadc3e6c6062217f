"""An inner-LLM pruning stage inside one prefill.

Most stages act once (FastV, VLA-Pruner, HoliTom's inner merge): they read attention beside layer
K-1 and prune the visual hidden states before layer K. A method with a `schedule(thw, grid, limit,
depth)` (FrameFusion) acts at several points instead: point 0 before layer 0, point i+1 inside
layer i between its attention residual and its MLP, for as long as its schedule says.

Every action may shrink the sequence; positions stay the originals. A layer caches every token
that reached its attention: layers before an action (and the layer an action sits inside) cache
the tokens before it, later layers only the survivors.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from streamprune.models.attention import last_query_attention, mean_query_attention
from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.types import Selection, VisualTokens

if TYPE_CHECKING:
    from transformers import DynamicCache

    from streamprune.models.base import VideoLLMAdapter

Rope = tuple[torch.Tensor, torch.Tensor]


class InnerStage:
    """An inner-LLM pruning stage during one prefill, driven by `VideoLLMAdapter.forward_layers`
    through `before_layer`, `splits` and `within_layer`.

    Acting once at `layer` = `method.config.layer`: at layer-1 it computes, beside the normal
    attention, the attention the visual tokens receive from the last prompt token (and from all
    prompt tokens when the method asks for it); before `layer` it lets the method choose among the
    visual hidden states and slices the sequence. With a schedule, `layer` is the first layer whose
    KV cache holds the current survivors."""

    def __init__(self, adapter: VideoLLMAdapter, method: PruningMethod, budget: Budget, ctx: PruneContext,
                 visual_slots: torch.Tensor, input_embeds: torch.Tensor, thw: torch.Tensor | None = None,
                 grid: tuple[int, int, int] | None = None) -> None:
        self.method, self.budget, self.ctx = method, budget, ctx
        self.visual_slots = visual_slots
        self.input_embeds = input_embeds
        # grid positions of the tokens reaching the stage (methods that compare frames need them)
        n = len(visual_slots)
        device = input_embeds.device
        self.thw = (thw if thw is not None else torch.zeros(n, 3, dtype=torch.long)).to(device)
        self.grid = grid if grid is not None else (1, 1, n)
        depth = len(adapter.language_model.layers)
        make_schedule = getattr(method, "schedule", None)
        self.schedule = make_schedule(self.thw, self.grid, budget.count(n), depth) if make_schedule else None
        self.layer = inner_layer(adapter, method)
        self.attention: dict[str, torch.Tensor] = {}
        self.kept = n
        # which of the visual_slots survive so far, and their index in the current sequence
        self.survivors = torch.arange(n, device=device)
        self.survivor_slots = visual_slots
        self.reached: list[int] = []  # visual tokens that reached each layer's attention (FLOPs accounting)
        # set by benchmarks: time observe + prune (synchronising on CUDA), the stage's own cost
        self.timed = False
        self.selection_ms = 0.0

    @property
    def settled(self) -> bool:
        """No further action will change the sequence."""
        return self.schedule is None or self.schedule.done

    # -- what forward_layers calls -------------------------------------------------------------------
    def before_layer(self, index: int, layer: torch.nn.Module, hidden: torch.Tensor,
                     rope: Rope) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Before decoder layer `index` runs on `hidden [1, L, C]`: -> (hidden, rows of the
        sequence kept, or None if it is unchanged)."""
        out: tuple[torch.Tensor, torch.Tensor | None] = (hidden, None)
        if self.schedule is not None:
            if index == 0 and self.schedule.action(0) == "merge":
                out = self._timed(self._step, 0, hidden, None)
        elif index == self.layer:
            out = self._timed(self._prune, hidden)
        elif index == self.layer - 1:
            self._timed(self._observe, layer, hidden, rope)
        self.reached.append(self.kept)
        return out

    def splits(self, index: int) -> bool:
        """Whether the stage acts inside layer `index`, between its attention and its MLP."""
        return self.schedule is not None and self.schedule.action(index + 1) is not None

    def within_layer(self, index: int, layer: torch.nn.Module, hidden_in: torch.Tensor, rope_in: Rope,
                     hidden: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inside layer `index`: `hidden` is its input `hidden_in` plus its attention output, and
        its attention has cached its keys -> (hidden, rows kept or None)."""

        def attention() -> torch.Tensor:
            # the last query's row over the keys this layer just cached: no second key projection
            keys = cache.layers[index].keys[0]
            row = last_query_attention(layer, hidden_in, rope_in, keys, keys_cached=True)
            return row[keys.shape[1] - hidden_in.shape[1] + self.survivor_slots]

        return self._timed(self._step, index + 1, hidden, attention)

    # -- the steps -------------------------------------------------------------------------------------
    def _timed(self, step: Any, *args: Any) -> Any:
        start = self._clock() if self.timed else 0.0
        out = step(*args)
        if self.timed:
            self.selection_ms += (self._clock() - start) * 1000
        return out

    def _clock(self) -> float:
        if self.input_embeds.device.type == "cuda":
            torch.cuda.synchronize(self.input_embeds.device)
        return time.perf_counter()

    def _observe(self, layer: torch.nn.Module, hidden: torch.Tensor, rope: Rope) -> None:
        # the last query row is O(L d); the all-query mean is O(L^2 d), so only when asked for
        self.attention = {"llm_attention_last": last_query_attention(layer, hidden, rope)[self.visual_slots]}
        if "llm_attention_mean" in self.method.requires:
            self.attention["llm_attention_mean"] = mean_query_attention(layer, hidden, rope)[self.visual_slots]

    def _prune(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = VisualTokens(
            features=hidden[0, self.visual_slots],
            thw=self.thw,
            grid=self.grid,
            signals={**self.attention, "input_embeds": self.input_embeds},
        )
        return self._apply(hidden, self.method(tokens, self.budget, self.ctx))

    def _step(self, point: int, hidden: torch.Tensor, attention: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        schedule = self.schedule
        if schedule.action(point) == "merge":
            selection = schedule.merge(point, hidden[0, self.survivor_slots])
        else:
            self.attention = {"llm_attention_last": attention()}
            selection = schedule.prune(point, self.attention["llm_attention_last"])
        if selection is None:
            return hidden, None
        # a layer caches what reached its attention: inside layer i the survivors start at i + 1
        self.layer = point
        return self._apply(hidden, selection)

    def _apply(self, hidden: torch.Tensor, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep `selection` of the current visual tokens (writing merged features) -> (the shorter
        `hidden`, its rows as a `[L]` bool mask over the old sequence)."""
        slots = self.survivor_slots
        kept_slots = slots[selection.indices]
        keep = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        keep[slots] = False
        keep[kept_slots] = True
        if selection.features is not None:
            hidden = hidden.clone()
            hidden[0, kept_slots] = selection.features.to(hidden.dtype)
        self.kept = len(selection)
        self.survivors = self.survivors[selection.indices]
        self.survivor_slots = (torch.cumsum(keep, 0) - 1)[kept_slots]
        return hidden[:, keep], keep


def attention_half(layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, rope: Rope,
                   cache: DynamicCache) -> torch.Tensor:
    """A Qwen2 / Qwen2.5-VL decoder layer up to its attention residual: h + Attn(LN1(h)), caching K/V."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                             position_embeddings=rope, cache=cache, use_cache=True)
    return hidden + out


def mlp_half(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The rest of that layer: h + MLP(LN2(h)). Both halves together are the layer's forward."""
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def inner_layer(adapter: Any, method: PruningMethod) -> int:
    """The first decoder layer an inner stage changes: its configured layer, clamped to the model
    (tiny models have fewer layers than the papers' K); 0 for a schedule starting before layer 0."""
    if getattr(method, "schedule", None) is not None:
        return 0
    return max(1, min(int(method.config.layer), len(adapter.language_model.layers) - 1))

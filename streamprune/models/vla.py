"""A Vision-Language-Action policy on the LLaVA-OneVision backbone, OpenVLA style.

The camera image enters as a one-frame video; the instruction fills the prompt; the action is
decoded autoregressively as one token per action dimension, each dimension binned uniformly into
256 bins mapped onto the last 256 ids of the vocabulary (OpenVLA, Kim et al. 2024). Decoding is
constrained to those ids.

For VLA-Pruner the policy exposes both signals it needs: the prefill attention at layer K-1
(through the adapter's inner-LLM stage) and the action-decode attention to the visual tokens at
`action_layer`, read beside the SDPA pass from the query of every action-decoding step and the KV
cache; after each step it is pushed into the method's temporal history.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from streamprune.encode.cacher import CacherStats
from streamprune.errors import ModelError
from streamprune.models.attention import last_query_attention
from streamprune.models.base import EncodedVideo
from streamprune.models.generate import greedy_decode
from streamprune.models.inner import InnerStage
from streamprune.models.llava_onevision import LlavaOnevisionAdapter
from streamprune.models.placement import Placement
from streamprune.models.prompt import read_sidecar
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe
from streamprune.types import VisualTokens

ACTION_BINS = 256


@dataclass(frozen=True)
class ActionTokenizer:
    """Uniform bins over [low, high] per dimension, on ids [vocab_size - bins, vocab_size)."""

    vocab_size: int
    dims: int
    bins: int = ACTION_BINS
    low: float = -1.0
    high: float = 1.0

    @property
    def first_id(self) -> int:
        return self.vocab_size - self.bins

    def to_ids(self, action: np.ndarray) -> list[int]:
        scaled = (np.clip(np.asarray(action, dtype=np.float64), self.low, self.high) - self.low) / (self.high - self.low)
        bins = np.minimum((scaled * self.bins).astype(int), self.bins - 1)
        return [self.first_id + int(b) for b in bins]

    def to_action(self, ids: list[int]) -> np.ndarray:
        bins = np.asarray(ids) - self.first_id
        return (self.low + (bins + 0.5) * (self.high - self.low) / self.bins).astype(np.float32)


@dataclass
class PolicyStep:
    action: np.ndarray
    visual_tokens_in: int
    visual_tokens_kept: int
    latency_ms: float
    action_attention: torch.Tensor  # [N] over the unpruned visual tokens (0 where pruned)
    encode_ms: float = 0.0  # vision tower (this camera's share of a batched pass)
    cacher: CacherStats | None = None  # what the episode's STC-Cacher did on this frame


class ActionAttentionTap:
    """After `layer` runs, the attention of the newest query to the visual tokens in the cache,
    head-averaged and scattered back to the unpruned token indices; summed over calls."""

    def __init__(self, layer: int, n_visual: int, pre_indices: torch.Tensor, pre_slots: torch.Tensor,
                 inner: InnerStage | None) -> None:
        self.layer, self.n_visual = layer, n_visual
        self.pre_indices, self.pre_slots, self.inner = pre_indices, pre_slots, inner
        self.total = torch.zeros(n_visual, device=pre_indices.device)
        self.calls = 0

    def __call__(self, index: int, layer: torch.nn.Module, hidden_in: torch.Tensor,
                 rope: tuple[torch.Tensor, torch.Tensor], cache: DynamicCache) -> None:
        if index != self.layer:
            return
        # the layer has run: its cache holds every key so far, this call's included
        probs = last_query_attention(layer, hidden_in, rope, cache.layers[index].keys[0], keys_cached=True)
        if self.inner is not None and index >= self.inner.layer:
            original = self.pre_indices[self.inner.survivors]
            slots = self.inner.survivor_slots
        else:
            original, slots = self.pre_indices, self.pre_slots
        self.total[original] += probs[slots]
        self.calls += 1

    def mean(self) -> torch.Tensor:
        return self.total / max(1, self.calls)


ENCODER_KEY = "vla.stc_cacher"  # PruneContext.state: the episode's STC-Cacher


class VLAPolicy:
    """image + instruction -> action, with any pruning recipe; one object serves many episodes
    (per-episode state, the recipe's STC-Cacher included, lives in the PruneContext)."""

    def __init__(self, adapter: LlavaOnevisionAdapter, actions: ActionTokenizer, action_layer: int | None = None) -> None:
        self.adapter = adapter
        self.actions = actions
        depth = len(adapter.language_model.layers)
        # the authors read layer 15 (0-based) of OpenVLA's 32, past the pruning layer K=3;
        # shallow models keep it at or past K as well
        default = max(depth // 2 - 1, min(3, depth - 1))
        self.action_layer = default if action_layer is None else max(0, min(action_layer, depth - 1))

    @classmethod
    def load(cls, path: str | Path, placement: "Placement | str | None" = None) -> "VLAPolicy":
        """`placement`: a resolved Placement, or an attention implementation name (CPU)."""
        from streamprune.models import load_adapter

        adapter = load_adapter(path, placement, frames=1)
        spec = read_sidecar(path).get("vla")
        if not isinstance(adapter, LlavaOnevisionAdapter) or not spec:
            raise ModelError(f"{path} is not a streamprune VLA policy (needs a LLaVA-OneVision model and a "
                             "'vla' entry in streamprune.json)")
        actions = ActionTokenizer(vocab_size=adapter.model.config.text_config.vocab_size, dims=int(spec["action_dim"]),
                                  bins=int(spec.get("bins", ACTION_BINS)), low=float(spec.get("low", -1.0)),
                                  high=float(spec.get("high", 1.0)))
        return cls(adapter, actions, spec.get("action_layer"))

    @staticmethod
    def reset(recipe: PruningRecipe, ctx: PruneContext) -> None:
        """Start of an episode: the recipe's stages forget their history (VLA-Pruner's action
        attention) and the camera's STC-Cacher starts cold."""
        recipe.start_stream(ctx)
        ctx.state.pop(ENCODER_KEY, None)

    @staticmethod
    def batches_vision(recipe: PruningRecipe) -> bool:
        """Whether several cameras' images can share one vision-tower pass under `recipe`: not with
        an encoder stage (an STC-Cacher reference belongs to one camera) nor with side signals
        (some are computed over the whole clip)."""
        return not recipe.encoder_options and not (recipe.requires | recipe.optional)

    @torch.inference_mode()
    def encode_batch(self, images: np.ndarray, recipe: PruningRecipe) -> list[EncodedVideo]:
        """`[N, H, W, 3]` images of N cameras -> one one-frame EncodedVideo each, from ONE pass of
        the vision tower (the N images go through it as the frames of one clip; per-frame
        preprocessing, encoding and pooling make each frame's tokens its own)."""
        if not self.batches_vision(recipe):
            raise ValueError(f"recipe {recipe.name!r} encodes each camera on its own (see batches_vision)")
        video = self.adapter.encode_for(images, recipe, fps=1.0)
        _, h, w = video.tokens.grid
        per = h * w
        out = []
        for i in range(len(images)):
            tokens = VisualTokens(features=video.tokens.features[i * per:(i + 1) * per],
                                  thw=VisualTokens.grid_positions(1, h, w), grid=(1, h, w))
            out.append(EncodedVideo(tokens=tokens, always_kept=video.always_kept, fps=1.0))
        return out

    @torch.inference_mode()
    def act(self, image: np.ndarray, instruction: str, recipe: PruningRecipe, ctx: PruneContext,
            video: EncodedVideo | None = None, encode_ms: float = 0.0) -> PolicyStep:
        """One control step. `video`: the image already encoded (`encode_batch`, which took
        `encode_ms` for this camera's share), else encoded here with the episode's STC-Cacher when
        the recipe has one."""
        start = time.perf_counter()
        adapter = self.adapter
        if video is None:
            if ENCODER_KEY not in ctx.state:
                ctx.state[ENCODER_KEY] = adapter.new_cacher(recipe)
            video = adapter.encode_for(image[None], recipe, fps=1.0, cacher=ctx.state[ENCODER_KEY])
            encode_ms = (time.perf_counter() - start) * 1000
        selection = recipe.select(video.tokens, ctx)
        layout = adapter.layout(video, adapter.prompt_ids(instruction))
        embeds, positions, kept_slots = layout.keep(selection)
        inner = adapter.inner_stage(recipe, video, selection, kept_slots, embeds, ctx)
        tap = ActionAttentionTap(self.action_layer, len(video.tokens), selection.indices, kept_slots, inner)
        cache = DynamicCache()
        hidden = adapter.forward_layers(embeds, positions, cache, inner, tap)
        first = self.actions.first_id
        ids = greedy_decode(adapter.logits(hidden[-1]),
                            adapter.decoder_step(cache, positions.shape[0], layout.next_position_for(selection), tap),
                            self.actions.dims, allowed=slice(first, first + self.actions.bins))
        attention = tap.mean()
        recipe.observe_action(ctx, attention)
        kept = inner.kept if inner is not None else len(selection)
        return PolicyStep(action=self.actions.to_action(ids), visual_tokens_in=len(video.tokens),
                          visual_tokens_kept=kept, latency_ms=(time.perf_counter() - start) * 1000,
                          action_attention=attention, encode_ms=encode_ms, cacher=video.cacher_stats)


def action_bins_needed(vocab_words: int, bins: int = ACTION_BINS) -> int:
    """Vocabulary size for `vocab_words` ordinary tokens plus the action bins, rounded up to 64."""
    return int(math.ceil((vocab_words + bins) / 64) * 64)

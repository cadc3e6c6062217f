"""What every Video-LLM adapter does, family-independent: lay out the prompt, drop pruned visual
tokens while each survivor keeps its original position, prefill a KV cache, generate. A family
file only says how frames become visual tokens and what positions the prompt has.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import DynamicCache

from streamprune.encode.cacher import CacherConfig, CacherStats
from streamprune.errors import ConfigError
from streamprune.models.generate import NextLogits, greedy_decode
from streamprune.models.inner import InnerStage, attention_half, mlp_half
from streamprune.models.prompt import PromptIds, build_prompt_ids, resolve_template
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import PruningRecipe, build_recipe
from streamprune.types import Selection, VisualTokens


@dataclass
class EncodedVideo:
    """Visual tokens of a clip plus what the prompt layout needs to place them.

    tokens: the prunable visual tokens (features `[N, D]`, grid positions).
    always_kept: `[E, D]` visual-span tokens that are never pruned (LLaVA-OV's trailing newline).
    fps: sampling rate of the frames, for families whose temporal positions are in seconds.
    """

    tokens: VisualTokens
    always_kept: torch.Tensor
    fps: float
    cacher_stats: CacherStats | None = None


@dataclass
class PromptLayout:
    """The unpruned prompt as the LLM would see it.

    embeds:       `[L, D]` input embeddings with all visual tokens in place.
    positions:    `[P, L]` position ids (P=1 for 1-D RoPE, P=3 for M-RoPE).
    visual_slots: `[N]` sequence index of each prunable visual token (in VisualTokens order).
    next_position: position id of the first generated token.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    visual_slots: torch.Tensor
    next_position: int

    def keep(self, selection: Selection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequence with only the selected visual tokens: (embeds `[L', D]`, positions `[P, L']`,
        new sequence index of each kept visual token `[K]`, in selection order). Positions are
        the originals unless the selection asks for the authors' contiguous layout;
        `selection.order` puts the kept tokens into the kept slots in that order."""
        length, device = self.embeds.shape[0], self.embeds.device
        kept_slots = self.visual_slots[selection.indices.to(device)]
        keep_mask = torch.ones(length, dtype=torch.bool, device=device)
        keep_mask[self.visual_slots] = False
        keep_mask[kept_slots] = True
        embeds = self.embeds
        if selection.features is not None or selection.order is not None:
            embeds = embeds.clone()
            features = self.embeds[kept_slots] if selection.features is None else selection.features
            if selection.order is not None:
                features = features[selection.order.to(device)]
            embeds[kept_slots] = features.to(device, embeds.dtype)
        order = keep_mask.nonzero().squeeze(1)
        new_index = torch.full((length,), -1, dtype=torch.long, device=device)
        new_index[order] = torch.arange(order.numel(), device=device)
        slot_of_entry = kept_slots
        if selection.order is not None:  # entry order[j] sits in the j-th kept slot
            slot_of_entry = torch.empty_like(kept_slots)
            slot_of_entry[selection.order.to(device)] = kept_slots
        positions = self.positions[:, order]
        if selection.contiguous:
            if positions.shape[0] != 1:
                raise ConfigError("the contiguous position layout needs 1-D positions; this model uses M-RoPE")
            positions = torch.arange(order.numel(), device=device)[None]
        return embeds[order], positions, new_index[slot_of_entry]

    def next_position_for(self, selection: Selection) -> int:
        """Position of the first generated token after the prompt `keep(selection)` makes."""
        if selection.contiguous:
            return self.next_position - (self.visual_slots.numel() - len(selection))
        return self.next_position


@dataclass
class Answer:
    """One answered question with what it cost."""

    text: str
    token_ids: list[int]
    visual_tokens_in: int
    visual_tokens_kept: int
    visual_tokens_pre_llm: int = 0  # kept before the LLM (differs from kept with an inner-LLM stage)
    timings_ms: dict[str, float] = field(default_factory=dict)
    cacher: CacherStats | None = None  # what the recipe's STC-Cacher did for this clip (None: no cacher)
    tokens_per_layer: list[int] = field(default_factory=list)  # visual tokens reaching each decoder layer


class Timer:
    """Wall-clock milliseconds per named phase; on CUDA each phase ends with a synchronisation,
    so a phase's time is its kernels', not just their launch."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.ms: dict[str, float] = {}
        self.cuda = device is not None and device.type == "cuda"

    def __call__(self, name: str) -> "_Phase":
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.timer.cuda:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - self.start) * 1000.0
        self.timer.ms[self.name] = self.timer.ms.get(self.name, 0.0) + elapsed


class VideoLLMAdapter(ABC):
    """A transformers Video-LLM split into encode -> layout -> prune -> prefill -> decode."""

    family: str = ""
    default_template: str = ""
    # capabilities the runtime asks for instead of comparing family names:
    position_kind: str = "1d"  # "1d": one sequence index per token; "mrope": (t, h, w) rotary ids
    # the authors' own version of a method for this family, used in its place (see `recipe`)
    method_variants: dict[str, str] = {}

    @property
    def frames_per_unit(self) -> int:
        """Frames the vision tower folds into one temporal unit of tokens (Qwen2.5-VL: 2)."""
        return 1

    def __init__(self, model: torch.nn.Module, tokenizer: Any, model_dir: str | Path | None = None,
                 prompt_template: str | None = None, eos_token: str | None = None) -> None:
        """`prompt_template` (the sidecar's) wins over the checkpoint's chat template, which wins
        over the family's fixed format; see models.prompt."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir) if model_dir else None
        self.template = (resolve_template(tokenizer, model_dir, model.config.video_token_id, prompt_template)
                         or self.default_template)
        self.eos_ids = self._eos_ids(eos_token)

    # -- family specific -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, frames: np.ndarray, fps: float = 1.0, signals: frozenset[str] = frozenset(),
               cacher: Any = None) -> EncodedVideo:
        """`[T, H, W, 3]` uint8 frames -> visual tokens; computes the side `signals` asked for.
        With an STC `cacher` (one per stream, see streamprune.encode) the vision tower reuses
        work across frames of the stream."""

    @abstractmethod
    def build_cacher(self, config: CacherConfig) -> Any:
        """This family's STC-Cacher (streamprune.encode) over its own vision tower."""

    @classmethod
    @abstractmethod
    def visual_budget(cls, model_dir: Path, frames: int) -> tuple[int, int]:
        """(visual tokens the LLM sees, vision-tower patches encoded at once), at most, for `frames`
        frames of the checkpoint in `model_dir`, from its JSON files alone: what the memory check
        before loading counts."""

    @abstractmethod
    def layout(self, video: EncodedVideo, prompt: PromptIds) -> PromptLayout:
        """The unpruned prompt with its original positions."""

    def memory_layout(self, features: torch.Tensor, hw: torch.Tensor, seconds: torch.Tensor, newline: torch.Tensor,
                      prompt: PromptIds, grid: tuple[int, int] | None = None) -> PromptLayout:
        """The prompt around a live memory's tokens (not one clip: pruned, merged, evicted).
        features `[M, D]` in time order, hw `[M, 2]`, seconds `[M]` since the stream began, newline
        `[E, D]`, grid one unpruned unit's (h, w) (None: the extent of `hw`). This default is for
        1-D positions (contiguous in time order); families whose positions encode time override it."""
        m = features.shape[0]
        tokens = VisualTokens(features=features, thw=VisualTokens.grid_positions(1, 1, m), grid=(1, 1, m))
        return self.layout(EncodedVideo(tokens=tokens, always_kept=newline, fps=1.0), prompt)

    @abstractmethod
    def reference_inputs(self, frames: np.ndarray, question: str, fps: float = 1.0) -> dict[str, torch.Tensor]:
        """Keyword inputs for calling the unmodified transformers model the documented way
        (`model(**inputs)`), used to check the adapter against it."""

    # -- shared ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model's weights live; every tensor the adapter or a method makes goes here."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The language model's compute dtype (bfloat16 on a GPU as users run it)."""
        return self.language_model.dtype

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def recipe(self, name: str, retain: float | None = None, max_tokens: int | None = None) -> PruningRecipe:
        """The pruning recipe `name` as it runs on this family (its `method_variants` applied)."""
        return build_recipe(name, retain=retain, max_tokens=max_tokens, variants=self.method_variants)

    def prompt_ids(self, question: str) -> PromptIds:
        return build_prompt_ids(self.tokenizer, question, self.template)

    def _eos_ids(self, eos_token: str | None) -> set[int]:
        ids = set()
        if eos_token is not None:
            ids.add(self.tokenizer.convert_tokens_to_ids(eos_token))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for token in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return ids

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """Input embeddings `[len(ids), D]` of text token ids."""
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))

    # -- the encoder stage: the one place a recipe's STC-Cacher is applied --------------------------
    def new_cacher(self, recipe: PruningRecipe) -> Any:
        """A fresh per-stream STC-Cacher if the recipe has a `stc_cacher` stage, else None."""
        options = recipe.encoder_options.get("stc_cacher")
        if options is None:
            return None
        if recipe.requires & {"vit_attention"}:
            raise ConfigError(f"recipe {recipe.name!r}: stc_cacher cannot be combined with methods that read "
                              "vision-encoder attention")
        return self.build_cacher(CacherConfig(**options))

    def encode_for(self, frames: np.ndarray, recipe: PruningRecipe, fps: float = 1.0, cacher: Any = None,
                   extra_signals: frozenset[str] = frozenset()) -> EncodedVideo:
        """Encode as `recipe` asks: the side signals its selectors read (plus `extra_signals`, for
        one encoding shared by several recipes), and its STC-Cacher. A stream passes its own
        `cacher` (kept warm across calls, from `new_cacher`); otherwise a recipe that names one gets
        a fresh cacher for this clip. The video carries the cacher's counters for this call."""
        cacher = cacher if cacher is not None else self.new_cacher(recipe)
        before = dataclasses.replace(cacher.stats) if cacher is not None else None
        video = self.encode(frames, fps=fps, signals=recipe.requires | recipe.optional | extra_signals, cacher=cacher)
        if cacher is not None:
            video.cacher_stats = cacher.stats.since(before)
        return video

    def decoder_step(self, cache: DynamicCache, position_dims: int, next_position: int,
                     after_layer: "LayerTap | None" = None) -> NextLogits:
        """`feed(token) -> logits` for `greedy_decode`: one token on top of `cache` at the next position."""
        position = next_position

        def feed(token: int) -> torch.Tensor:
            nonlocal position
            pos = torch.full((position_dims, 1), position, dtype=torch.long, device=self.device)
            position += 1
            return self.logits(self.forward_layers(self.embed_ids([token]), pos, cache, after_layer=after_layer)[-1])

        return feed

    @torch.inference_mode()
    def forward_layers(self, embeds: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                       inner: InnerStage | None = None, after_layer: "LayerTap | None" = None) -> torch.Tensor:
        """Run the decoder stack on `[L, D]` embeds at `[P, L]` positions, appending to `cache`.
        Returns the final-norm hidden states `[L', D]` (L' < L if `inner` pruned).

        The mask is causal in sequence order, which is what a pruned sequence needs: kept tokens
        keep their order, only their positions have gaps. An inner stage acts before a layer or,
        when it `splits` one, between that layer's attention and its MLP; a layer caches every
        token that reached its attention, so layers after an action cache only the survivors.
        `after_layer(index, layer, hidden_in, rope, cache)` is called after each layer (e.g. to
        read attention) with the layer's input and the rotary embedding its attention used."""
        lm = self.language_model
        hidden = embeds[None].to(self.device, lm.dtype)
        positions = positions.to(self.device)
        past = cache.get_seq_length()
        rope = lm.rotary_emb(hidden, self._position_ids(positions))
        mask = self._causal_mask(hidden.shape[1], past, hidden.dtype)
        for index, layer in enumerate(lm.layers):
            if inner is not None:
                hidden, keep = inner.before_layer(index, layer, hidden, rope)
                if keep is not None:
                    positions, rope, mask = self._shrunk(keep, hidden, positions, rope, past, inner.settled)
            hidden_in, rope_in = hidden, rope
            if inner is not None and inner.splits(index):
                hidden = attention_half(layer, hidden, mask, rope, cache)
                hidden, keep = inner.within_layer(index, layer, hidden_in, rope_in, hidden, cache)
                if keep is not None:
                    positions, rope, mask = self._shrunk(keep, hidden, positions, rope, past, inner.settled)
                hidden = mlp_half(layer, hidden)
            else:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, cache=cache, use_cache=True)
            if after_layer is not None:
                after_layer(index, layer, hidden_in, rope_in, cache)
        return lm.norm(hidden)[0]

    def _shrunk(self, keep: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, rope: tuple, past: int,
                settled: bool) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
        """Positions, rotary embedding and mask for the sequence rows `keep` left by an inner
        stage. Rope rows are per token: between actions they are gathered (as FrameFusion's code
        does), once the stage is settled recomputed from the positions the decode continues from."""
        positions = positions[:, keep]
        if settled:
            rope = self.language_model.rotary_emb(hidden, self._position_ids(positions))
        else:
            rope = tuple(r[..., keep, :] for r in rope)
        return positions, rope, self._causal_mask(hidden.shape[1], past, hidden.dtype)

    @staticmethod
    def _position_ids(positions: torch.Tensor) -> torch.Tensor:
        """`[P, L]` -> what the LM's rotary embedding takes: `[1, L]` (1-D) or `[3, 1, L]` (M-RoPE)."""
        return positions if positions.shape[0] == 1 else positions[:, None, :]

    def _causal_mask(self, q_len: int, past: int, dtype: torch.dtype) -> torch.Tensor | None:
        """None where the kernel gets causality right by itself: one query, flash attention
        (bottom-right aligned), or SDPA on an empty cache (its is_causal is top-left aligned, so
        a chunk appended to a non-empty cache needs an explicit mask, as eager always does)."""
        implementation = self.language_model.config._attn_implementation
        if q_len == 1 or "flash" in implementation or (implementation == "sdpa" and past == 0):
            return None
        mask = torch.full((q_len, past + q_len), torch.finfo(dtype).min, dtype=dtype, device=self.device)
        mask = torch.triu(mask, diagonal=past + 1)
        return mask[None, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def inner_stage(self, recipe: PruningRecipe, video: EncodedVideo, selection: Selection,
                    kept_slots: torch.Tensor, embeds: torch.Tensor, ctx: PruneContext) -> InnerStage | None:
        """The recipe's inner-LLM stage for one prefill of the pre-LLM survivors, or None."""
        if recipe.inner_llm is None:
            return None
        budget = recipe.inner_budget(len(selection), len(video.tokens))
        return InnerStage(self, recipe.inner_llm, budget, ctx, kept_slots, embeds[kept_slots],
                          video.tokens.thw[selection.indices], video.tokens.grid)

    @torch.inference_mode()
    def prompt_logits(self, video: EncodedVideo, question: str, selection: Selection | None = None) -> torch.Tensor:
        """Logits `[L', V]` for every position of the (pruned) prompt; no generation."""
        layout = self.layout(video, self.prompt_ids(question))
        selection = selection or Selection(indices=torch.arange(len(video.tokens), device=self.device))
        embeds, positions, _ = layout.keep(selection)
        return self.logits(self.forward_layers(embeds, positions, DynamicCache()))

    @torch.inference_mode()
    def answer(self, frames: np.ndarray, question: str, recipe: PruningRecipe,
               ctx: PruneContext | None = None, fps: float = 1.0, max_new_tokens: int = 16, on_token=None) -> Answer:
        """Encode, prune, prefill and greedily decode an answer, timing each phase (`on_token`: see greedy_decode)."""
        timer = Timer(self.device)
        with timer("encode"):
            video = self.encode_for(frames, recipe, fps=fps)
        return self.answer_encoded(video, question, recipe, ctx, max_new_tokens, timer, on_token)

    @torch.inference_mode()
    def answer_encoded(self, video: EncodedVideo, question: str, recipe: PruningRecipe,
                       ctx: PruneContext | None = None, max_new_tokens: int = 16,
                       timer: Timer | None = None, on_token: Callable[[int], None] | None = None) -> Answer:
        timer = timer or Timer(self.device)
        ctx = ctx or PruneContext()
        with timer("prune"):
            selection = recipe.select(video.tokens, ctx)
        layout = self.layout(video, self.prompt_ids(question))
        embeds, positions, kept_slots = layout.keep(selection)
        inner = self.inner_stage(recipe, video, selection, kept_slots, embeds, ctx)
        cache = DynamicCache()
        with timer("prefill"):
            hidden = self.forward_layers(embeds, positions, cache, inner)
            first = self.logits(hidden[-1])
        with timer("decode"):
            out = greedy_decode(first, self.decoder_step(cache, positions.shape[0], layout.next_position_for(selection)),
                                max_new_tokens, self.eos_ids, on_token=on_token)
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        kept = inner.kept if inner is not None else len(selection)
        return Answer(text=text, token_ids=out, visual_tokens_in=len(video.tokens),
                      visual_tokens_kept=kept, visual_tokens_pre_llm=len(selection), timings_ms=dict(timer.ms),
                      cacher=video.cacher_stats, tokens_per_layer=self.tokens_per_layer(inner, len(selection)))

    def tokens_per_layer(self, inner: InnerStage | None, pre_llm: int) -> list[int]:
        """Visual tokens that reached each decoder layer's attention in the last prefill."""
        return list(inner.reached) if inner is not None else [pre_llm] * len(self.language_model.layers)


# after_layer(index, layer, hidden_in, rope, cache): called after each decoder layer (e.g. to read attention)
LayerTap = Callable[[int, torch.nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor], DynamicCache], None]

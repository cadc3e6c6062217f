"""The LLM's KV cache of a streaming memory, kept in step with it, and the probes that read it.

`IncrementalKV` is a `MemoryListener` of `StreamingMemory` (streaming.py): every unit the memory
appends is prefilled on top of the cache, every merge and eviction is mirrored in the cached K/V,
so a question only prefills its own tokens. `LastQueryAttention` reads the question's attention
to the memory's tokens (A2SF's score) beside the prefill. `kv_cache_bytes` sizes a cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from streamprune.errors import ConfigError
from streamprune.models.attention import last_query_attention
from streamprune.models.generate import greedy_decode


def kv_cache_bytes(lm_config: Any, dtype: torch.dtype, tokens: int) -> int:
    """Estimated KV cache size: tokens x layers x 2 (K, V) x kv_heads x head_dim x dtype size."""
    heads = lm_config.num_attention_heads
    kv_heads = getattr(lm_config, "num_key_value_heads", None) or heads
    head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // heads
    size = torch.tensor([], dtype=dtype).element_size()
    return tokens * lm_config.num_hidden_layers * 2 * kv_heads * head_dim * size



class LastQueryAttention:
    """Captures, during one prefill, the head-averaged attention of the last prompt token to the
    visual tokens at one decoder layer (`attention.last_query_attention` on the layer's input; the
    main pass keeps its attention kernel). With a `cache`, the layer's cached keys come first in the
    row (the question is prefilled on top of cached memory)."""

    def __init__(self, adapter: Any, layer: int, visual_slots: torch.Tensor, cache: DynamicCache | None = None) -> None:
        self.index = layer
        self.layer = adapter.language_model.layers[layer]
        self.slots = visual_slots
        self.cache = cache
        self.value: torch.Tensor | None = None

    def __enter__(self) -> LastQueryAttention:
        self._handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.value is not None or hidden.shape[1] < 2:  # prefill only, not decode steps
            return
        past = None
        if self.cache is not None and self.cache.get_seq_length():
            past = self.cache.layers[self.index].keys[0]  # cached keys are rotated
        self.value = last_query_attention(module, hidden, kwargs["position_embeddings"], past)[self.slots]


class IncrementalKV:
    """The LLM's KV cache of [prompt prefix | memory tokens], kept in step with a StreamingMemory
    (it is the memory's `MemoryListener`), so a question only prefills its own tokens.

    Each arriving unit is prefilled on top of the cache (its tokens attend to the prompt prefix and
    to the memory before them, as in ReKV / StreamingVLM streaming prefill); evicted tokens are
    removed from every layer's K/V; a merge averages the members' K and V into the anchor's with
    the merge weights (an approximation: the true K/V of the averaged feature would need the
    prefix re-run). Positions are 1-D and keep counting up, so evicted tokens leave gaps and the
    distance to old tokens grows over a long stream. A question's tokens go on top, are answered
    greedily and are cropped off again.

    Only for 1-D RoPE families (LLaVA-OneVision) whose prompt prefix does not depend on the
    question.
    """

    def __init__(self, adapter: Any) -> None:
        from transformers import DynamicCache

        if adapter.position_kind != "1d":
            raise ConfigError(f"incremental KV needs 1-D positions; {adapter.family} uses {adapter.position_kind}")
        self.adapter = adapter
        self.prefix = adapter.prompt_ids("").prefix
        if adapter.prompt_ids("?").prefix != self.prefix:
            raise ConfigError("incremental KV needs a prompt whose text before the video is fixed")
        self.cache = DynamicCache()
        self.next_position = 0
        if self.prefix:
            self._prefill(adapter.embed_ids(self.prefix))
        self.prefix_len = len(self.prefix)

    def _prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.next_position, self.next_position + embeds.shape[0],
                                 device=self.adapter.device)[None]
        self.next_position += embeds.shape[0]
        return self.adapter.forward_layers(embeds, positions, self.cache)

    @torch.inference_mode()
    def appended(self, features: torch.Tensor) -> None:
        self._prefill(features)

    @torch.inference_mode()
    def merged(self, anchor: torch.Tensor, member: torch.Tensor, anchor_weight: torch.Tensor,
               member_weight: torch.Tensor) -> None:
        a, m = anchor + self.prefix_len, member + self.prefix_len
        device = self.adapter.device
        a, m = a.to(device), m.to(device)
        anchor_weight, member_weight = anchor_weight.to(device), member_weight.to(device)
        total = torch.zeros(self.length, device=device).index_add_(0, a, member_weight)[a] + anchor_weight  # per pair
        for layer in self.cache.layers:
            for cached in (layer.keys, layer.values):
                x = cached[0]  # [H, S, d]
                sums = x[:, a] * anchor_weight[None, :, None].to(x.dtype)
                x[:, a] = sums  # weighted sum of the anchor, then the members added below
                x.index_add_(1, a, x[:, m] * member_weight[None, :, None].to(x.dtype))
                x[:, a] = x[:, a] / total[None, :, None].to(x.dtype)

    @torch.inference_mode()
    def compacted(self, keep: torch.Tensor) -> None:
        device = self.adapter.device
        rows = torch.cat([torch.arange(self.prefix_len, device=device), keep.to(device) + self.prefix_len])
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, rows]
            layer.values = layer.values[:, :, rows]

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def answer(self, question: str, newline: torch.Tensor, tokens: int, max_new_tokens: int,
               attention_layer: int) -> tuple[str, torch.Tensor | None]:
        """Greedy answer on top of the cached memory of `tokens` visual tokens, plus the last
        question token's attention to them; the cache is left as it was."""
        prompt = self.adapter.prompt_ids(question)
        kept, position = self.length, self.next_position
        embeds = torch.cat([newline.to(self.adapter.device, self.adapter.language_model.dtype),
                            self.adapter.embed_ids(prompt.suffix)])
        slots = self.prefix_len + torch.arange(tokens, device=self.adapter.device)
        try:
            with LastQueryAttention(self.adapter, attention_layer, slots, self.cache) as attention:
                hidden = self._prefill(embeds)
            out = greedy_decode(self.adapter.logits(hidden[-1]), self._feed, max_new_tokens, self.adapter.eos_ids)
        finally:
            for layer in self.cache.layers:  # drop the question and answer tokens again
                layer.keys, layer.values = layer.keys[:, :, :kept], layer.values[:, :, :kept]
            self.next_position = position
        text = self.adapter.tokenizer.decode(out, skip_special_tokens=True).strip()
        return text, attention.value

    def _feed(self, token: int) -> torch.Tensor:
        return self.adapter.logits(self._prefill(self.adapter.embed_ids([token]))[-1])

"""Attention probes computed beside the forward pass, and the one RoPE helper they share.

Pruning methods rank tokens by attention: FastVID, HoliTom, VisionZip and FasterVLM by what each
patch receives in the vision encoder; FastV, VLA-Pruner, HoliTom's inner merge and the live
memory's A2SF score by what the last prompt (or action) query gives each visual token in one
decoder layer. Asking a model for attention weights forces eager attention on every layer;
instead we take the input of the one layer we need and recompute softmax(QK^T) for the rows we
need, so the main pass keeps SDPA/flash and the no-pruning path pays nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class Captured:
    """Filled when the `with` block ends: `value` is `[N]` received attention, or None if unused."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.call: tuple[tuple, dict] | None = None


@contextmanager
def received_attention(adapter: Any, wanted: bool) -> Iterator[Captured]:
    """Hook `adapter.vision_attention_layer()` while the block runs; afterwards compute
    `adapter.attention_received(module, args, kwargs)` from the captured call."""
    captured = Captured()
    if not wanted:
        yield captured
        return
    module = adapter.vision_attention_layer()

    def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.call = (args, kwargs)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()
    if captured.call is not None:
        captured.value = adapter.attention_received(module, *captured.call)


def column_mean_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """`q, k: [H, S, d]` -> `[S]`: softmax(q k^T * scale) averaged over heads and query rows,
    i.e. how much attention each key position receives. One head at a time to bound memory."""
    received = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
    for head in range(q.shape[0]):
        probs = torch.softmax((q[head].float() @ k[head].float().T) * scale, dim=-1)
        received += probs.mean(dim=0)
    return received / q.shape[0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout of Qwen2 / Qwen2.5-VL (LM and ViT): `x [..., d]`
    with `cos, sin` broadcastable to it. The one copy every probe uses."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decoder_queries_keys(layer: torch.nn.Module, hidden_in: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                         query_rows: slice = slice(None), keys: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A decoder layer's rotated queries `[H, Q, d]` (rows `query_rows`) and, if `keys`, keys
    `[Hkv, L, d]` for its input `hidden_in [1, L, C]` at the rotary `rope` it was given (`[1, L, d]`)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in)[0]  # [L, C]
    cos, sin = (r[0] for r in rope)  # [L, d]
    heads = attn.config.num_attention_heads
    xq = x[query_rows]
    q = apply_rope(attn.q_proj(xq).view(xq.shape[0], heads, -1).transpose(0, 1), cos[query_rows], sin[query_rows])
    if not keys:
        return q, None
    k = attn.k_proj(x).view(x.shape[0], -1, attn.head_dim).transpose(0, 1)
    return q, apply_rope(k, cos, sin)


def last_query_attention(layer: torch.nn.Module, hidden_in: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                         past_keys: torch.Tensor | None = None, keys_cached: bool = False) -> torch.Tensor:
    """`[S]` head-averaged attention of the last input token over `past_keys` (`[Hkv, P, d]`, rotated,
    e.g. a KV cache layer's) followed by the input's own keys: one softmax row, O(S d). With
    `keys_cached` the layer has already run and `past_keys` holds the input's keys too, so only the
    query is computed (no second key projection on the prefill)."""
    q, k = decoder_queries_keys(layer, hidden_in, rope, slice(-1, None), keys=not keys_cached)
    if keys_cached:
        k = past_keys
    elif past_keys is not None and past_keys.shape[1]:
        k = torch.cat([past_keys.to(k.dtype), k], dim=1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    probs = torch.softmax((q.float() @ k.float().transpose(1, 2)) * layer.self_attn.scaling, dim=-1)  # [H, 1, S]
    return probs.mean(dim=0)[0]


def mean_query_attention(layer: torch.nn.Module, hidden_in: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`[L]` causal attention each input position receives, averaged over heads and all query
    rows: O(L^2 d), one head at a time to bound memory."""
    q, k = decoder_queries_keys(layer, hidden_in, rope)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    length = q.shape[1]
    # the causal mask is added inside the matmul (addmm), so each head costs one L x L pass less
    causal = torch.full((length, length), float("-inf"), device=q.device).triu_(1)
    received = torch.zeros(length, device=q.device)
    for head in range(q.shape[0]):
        scores = torch.addmm(causal, q[head].float(), k[head].float().T, alpha=layer.self_attn.scaling)
        received += torch.softmax(scores, dim=-1).sum(dim=0)
    return received / (q.shape[0] * length)

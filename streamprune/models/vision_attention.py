"""Attention received by each patch in the vision encoder, computed beside the forward pass.

Methods such as FastVID, HoliTom, VisionZip and FasterVLM rank tokens by vision-encoder attention.
Asking the tower for attention weights forces eager attention on every layer; instead we capture
the input of the one layer we need with a hook and recompute its softmax(QK^T) there, so the main
pass keeps SDPA/flash and the no-pruning path pays nothing.
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
    received = torch.zeros(k.shape[1], dtype=torch.float32)
    for head in range(q.shape[0]):
        probs = torch.softmax((q[head].float() @ k[head].float().T) * scale, dim=-1)
        received += probs.mean(dim=0)
    return received / q.shape[0]

"""Initialisation for the tiny SigLIP towers we train from scratch on flat synthetic images.

Both training scripts hit the same plateau with the stock init: on a dark, mostly empty image an
object moves a patch token by a fraction of its norm, and random learned position embeddings are
not linearly readable yet, so the decoder first learns the answer prior and stalls there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d(side: int, dim: int, base: float = 100.0) -> torch.Tensor:
    """MAE-style fixed 2-D sin-cos table `[side*side, dim]` in raster order (x features, then y)."""
    quarter = dim // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float32) / max(1, quarter - 1))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    x = xs.reshape(-1, 1) * omega
    y = ys.reshape(-1, 1) * omega
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def strengthen_vision_init(model, patch_gain: float) -> None:
    """Give a LLaVA-OneVision's SigLIP tower readable positions (sin-cos table as the learned
    position embeddings' start) and content as strong as position (patch embedding x `patch_gain`)."""
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    side = int(round(embeddings.position_embedding.weight.shape[0] ** 0.5))
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(sincos_2d(side, embeddings.position_embedding.weight.shape[1]))
        embeddings.patch_embedding.weight.mul_(patch_gain)

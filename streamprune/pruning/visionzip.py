"""VisionZip and FasterVLM: keep the tokens the vision encoder finds salient (per frame).

VisionZip: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(CVPR 2025), code `dvlab-research/VisionZip` (`visionzip/clip_encoder.py`). Per image:
- dominant tokens = top-k of the ViT attention ([CLS] attention for CLIP; for SigLIP, which has no
  [CLS], the mean attention each patch receives, as HoliTom's LLaVA-OV port does);
- contextual tokens: the remaining tokens are split into M targets sampled uniformly (stride
  n_rest // M) and the others; each other token is assigned to its most similar target and the
  contextual token is target + mean(assigned) (the code ADDS the mean to the target, it does not
  average them; a target with nothing assigned stays as it is).
Budget split dominant:contextual = 54:10 (LLaVA-1.5: 54+10 / 108+20 / 162+30 of 576). The
original fixes both counts; a frame's quota q is split as HoliTom's SigLIP port does
(`cokeshao/HoliTom` @ e9b2972, `visionzip/llava_arch.py` L63-66): n_dominant = int(q * share),
share = dominant / (dominant + contextual), the rest contextual (`split_rounding="floor"`, default;
e.g. q=16 -> 13 + 3). `split_rounding="round"` (our earlier rule) uses round(q * share) -> 14 + 2.
Approximation: the code measures similarity on the ViT layer -2 KEYS and merges ViT hidden states
before the projector; here both use the LLM-input features (keys are not exposed), so the added
contextual token lives in projector-output space.

FasterVLM: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning"
(code `Theia-4869/FasterVLM`): keep the top-k tokens by ViT [CLS] attention (layer -2), nothing
merged; here `vit_attention` stands in for the [CLS] row (SigLIP has none).

Both are image methods applied per frame, as the video models run them: the budget is split
evenly over frames (floor(k/T) each, the remainder spread evenly). Merged tokens take their
target's position; all others keep their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod, sorted_selection
from streamprune.pruning.primitives import assign_to_anchors, topk_stable, true_indices
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens


def frame_quotas(t: int, k: int, per_frame: int) -> list[int]:
    """k split over t frames of `per_frame` tokens: floor(k/t) each, one more for evenly spaced frames."""
    k = min(k, t * per_frame)
    quotas = [k // t] * t
    extra = k - sum(quotas)
    for i in range(extra):
        quotas[min(t - 1, int((i + 0.5) * t / extra))] += 1
    return quotas


def dominant_count(quota: int, dominant_share: float, rounding: str = "floor") -> int:
    """How many of a frame's `quota` tokens are dominant: int(quota * share) as HoliTom's port
    (`visionzip/llava_arch.py` L65), or round(...) with rounding="round"."""
    exact = quota * dominant_share
    return min(quota, int(exact) if rounding == "floor" else round(exact))


def visionzip_frame(
    x: torch.Tensor, attn: torch.Tensor, quota: int, dominant_share: float, rounding: str = "floor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one frame. x `[P, D]`, attn `[P]` -> (kept local indices `[quota]`, features `[quota, D]`)."""
    n_dominant = dominant_count(quota, dominant_share, rounding)
    n_context = quota - n_dominant
    dominant = topk_stable(attn, n_dominant)
    if n_context == 0:
        return dominant, x[dominant]
    # the counts are known, so positions come without nonzero's host copy
    n_rest = x.shape[0] - n_dominant
    rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device).index_fill_(0, dominant, False)
    rest_idx = true_indices(rest, n_rest)
    step = max(1, n_rest // n_context)
    targets = rest_idx[::step][:n_context]
    is_other = torch.ones(n_rest, dtype=torch.bool, device=x.device)
    is_other[::step][:n_context] = False
    others = rest_idx[true_indices(is_other, n_rest - targets.numel())]
    contextual = x[targets].float()
    if others.numel():
        assignment = assign_to_anchors(x[others], x[targets])
        counts = torch.bincount(assignment, minlength=targets.numel()).float()
        sums = torch.zeros_like(contextual).index_add_(0, assignment, x[others].float())
        contextual = contextual + sums / counts.clamp(min=1.0)[:, None]
    return torch.cat([dominant, targets]), torch.cat([x[dominant], contextual.to(x.dtype)])


@register
class VisionZip(PruningMethod):
    """Per frame: dominant tokens by ViT attention + contextual merges into uniformly strided targets."""

    name = "visionzip"
    summary = "per frame: ViT-attention top-k (dominant) + contextual tokens merged into strided targets (54:10)"
    requires = frozenset({"vit_attention"})

    @dataclass
    class Config:
        dominant: int = 54  # dominant : contextual split of the budget (paper 54+10 of 576)
        contextual: int = 10
        split_rounding: str = "floor"  # a frame's dominant count: int(q * share) (HoliTom port) or "round"

        def __post_init__(self) -> None:
            if self.dominant < 0 or self.contextual < 0 or self.dominant + self.contextual == 0:
                raise ConfigError("visionzip dominant and contextual must be >= 0 and not both 0")
            if self.split_rounding not in ("floor", "round"):
                raise ConfigError(f"visionzip split_rounding must be 'floor' or 'round', got {self.split_rounding!r}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        t, h, w = tokens.grid
        p = h * w
        share = self.config.dominant / (self.config.dominant + self.config.contextual)
        frames = tokens.frames()
        attn = tokens.signals["vit_attention"].float().reshape(t, p)
        keep, feats = [], []
        for f, q in enumerate(frame_quotas(t, budget.count(len(tokens)), p)):
            if q:
                local, x = visionzip_frame(frames[f], attn[f], q, share, self.config.split_rounding)
                keep.append(f * p + local)
                feats.append(x)
        return sorted_selection(torch.cat(keep), torch.cat(feats))


@register
class FasterVLM(PruningMethod):
    """Per frame: top-k tokens by ViT attention (the [CLS] row for CLIP), nothing merged."""

    name = "fastervlm"
    summary = "per frame: keep the top ViT-attention tokens"
    requires = frozenset({"vit_attention"})

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        t, h, w = tokens.grid
        p = h * w
        attn = tokens.signals["vit_attention"].float().reshape(t, p)
        quotas = frame_quotas(t, budget.count(len(tokens)), p)
        keep = [f * p + topk_stable(attn[f], q) for f, q in enumerate(quotas) if q]
        return sorted_selection(torch.cat(keep))

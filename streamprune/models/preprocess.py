"""Frames -> pixel tensors as each family's vision tower expects them.

We do this in torch instead of through the transformers processors: their video processors need
torchvision, which this CPU build of torch cannot import. The maths matches the processors:
resize, rescale to [0, 1], normalise; Qwen2.5-VL additionally cuts frames into merge-ordered patches.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dir(cls, model_dir: str | Path | None, default: "Normalisation") -> "Normalisation":
        """Read image_mean/image_std from the model's preprocessor_config.json if it has one."""
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            path = Path(model_dir) / name if model_dir else None
            if path is not None and path.is_file():
                cfg = json.loads(path.read_text())
                if "image_mean" in cfg and "image_std" in cfg:
                    return cls(tuple(cfg["image_mean"]), tuple(cfg["image_std"]))
        return default


SIGLIP_NORM = Normalisation(SIGLIP_MEAN, SIGLIP_STD)
CLIP_NORM = Normalisation(CLIP_MEAN, CLIP_STD)


def _to_float(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`[T, H, W, 3]` uint8 -> `[T, 3, H, W]` float in [0, 1]."""
    x = torch.tensor(frames) if isinstance(frames, np.ndarray) else torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def _normalise(x: torch.Tensor, norm: Normalisation) -> torch.Tensor:
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (x - mean) / std


def square_pixels(frames: np.ndarray | torch.Tensor, size: int, norm: Normalisation = SIGLIP_NORM) -> torch.Tensor:
    """LLaVA-OneVision video frames: `[T, H, W, 3]` uint8 -> `[T, 3, size, size]` normalised."""
    x = _to_float(frames)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return _normalise(x, norm)


def qwen_target_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart resize: multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_video_patches(
    frames: np.ndarray | torch.Tensor,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    norm: Normalisation = CLIP_NORM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL video input: `[T, H, W, 3]` uint8 -> (pixel_values_videos `[N, 3*tp*p*p]`,
    video_grid_thw `[1, 3]`). Frames are padded to a multiple of the temporal patch by repeating
    the last one; patches are laid out so each merge_size x merge_size group is contiguous."""
    x = _to_float(frames)
    t, _, height, width = x.shape
    h, w = qwen_target_size(height, width, patch_size * merge_size, min_pixels, max_pixels)
    if (height, width) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    x = _normalise(x, norm)
    if t % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(temporal_patch_size - t % temporal_patch_size, -1, -1, -1)])
    grid_t, grid_h, grid_w = x.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    x = x.reshape(
        grid_t, temporal_patch_size, 3,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size)
    return patches, torch.tensor([[grid_t, grid_h, grid_w]])

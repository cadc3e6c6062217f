"""Frames -> pixel tensors as each family's vision tower expects them, with the checkpoint's own
video-processor settings.

We do this in torch instead of through the transformers processors: their video processors need
torchvision, which this CPU build of torch cannot import. The maths follows theirs: resize with
antialiased bicubic on 0..255 values rounded back to whole levels (torchvision resizes uint8
frames), rescale to [0, 1], normalise; Qwen2.5-VL additionally cuts frames into merge-ordered patches.
Tensors are made on the CPU; the adapter moves them to the model's device.
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
# pixel limits for directories without processor files (our tiny and embedded models)
TINY_QWEN_PIXELS = (56 * 56, 224 * 224)


def video_processor_config(model_dir: str | Path | None) -> dict:
    """The video processor's settings the way transformers finds them: processor_config.json's
    nested "video_processor", else video_preprocessor_config.json, else preprocessor_config.json
    (the image processor's, which older checkpoints share with video); {} if there is none."""
    if model_dir is None:
        return {}
    root = Path(model_dir)
    nested = root / "processor_config.json"
    if nested.is_file():
        video = json.loads(nested.read_text()).get("video_processor")
        if isinstance(video, dict):
            return video
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (root / name).is_file():
            return json.loads((root / name).read_text())
    return {}


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dir(cls, model_dir: str | Path | None, default: "Normalisation") -> "Normalisation":
        """image_mean/image_std of the checkpoint's video processor, else `default`."""
        cfg = video_processor_config(model_dir)
        if "image_mean" in cfg and "image_std" in cfg:
            return cls(tuple(cfg["image_mean"]), tuple(cfg["image_std"]))
        return default


SIGLIP_NORM = Normalisation(SIGLIP_MEAN, SIGLIP_STD)
CLIP_NORM = Normalisation(CLIP_MEAN, CLIP_STD)


def square_size(model_dir: str | Path | None, default: int) -> int:
    """LLaVA-OneVision's frame side: the video processor's `size` (height/width or shortest_edge), else `default`."""
    size = video_processor_config(model_dir).get("size") or {}
    return int(size.get("height") or size.get("shortest_edge") or default)


def qwen_pixel_limits(model_dir: str | Path | None, default: tuple[int, int] = TINY_QWEN_PIXELS) -> tuple[int, int]:
    """(min_pixels, max_pixels) per frame as Qwen2-VL's video processor reads them: top-level
    min_pixels/max_pixels win over `size` (shortest_edge/longest_edge, or min/max_pixels in it)."""
    cfg = video_processor_config(model_dir)
    size = cfg.get("size") or {}
    low = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or default[0]
    high = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or default[1]
    return int(low), int(high)


def _levels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`[T, H, W, 3]` uint8 -> `[T, 3, H, W]` float32 in 0..255."""
    x = torch.tensor(frames) if isinstance(frames, np.ndarray) else torch.as_tensor(frames)  # copies read-only frames
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float()


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of 0..255 frames, rounded to whole levels as a uint8 resize is."""
    if x.shape[-2:] == (height, width):
        return x
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255)


def _normalise(x: torch.Tensor, norm: Normalisation) -> torch.Tensor:
    """0..255 levels -> (x / 255 - mean) / std."""
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def square_pixels(frames: np.ndarray | torch.Tensor, size: int, norm: Normalisation = SIGLIP_NORM) -> torch.Tensor:
    """LLaVA-OneVision video frames: `[T, H, W, 3]` uint8 -> `[T, 3, size, size]` normalised."""
    return _normalise(_resize(_levels(frames), size, size), norm)


def qwen_target_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart resize: multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frames of {height}x{width} are too elongated for Qwen2-VL (aspect ratio over 200)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
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
    min_pixels: int = TINY_QWEN_PIXELS[0],
    max_pixels: int = TINY_QWEN_PIXELS[1],
    norm: Normalisation = CLIP_NORM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL video input: `[T, H, W, 3]` uint8 -> (pixel_values_videos `[N, 3*tp*p*p]`,
    video_grid_thw `[1, 3]`). Frames are padded to a multiple of the temporal patch by repeating
    the last one; patches are laid out so each merge_size x merge_size group is contiguous."""
    x = _levels(frames)
    t, _, height, width = x.shape
    h, w = qwen_target_size(height, width, patch_size * merge_size, min_pixels, max_pixels)
    x = _normalise(_resize(x, h, w), norm)
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

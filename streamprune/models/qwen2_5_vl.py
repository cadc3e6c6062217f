"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): windowed ViT over 2-frame x 14px patches,
2x2 patch merger, and 3-D M-RoPE (temporal, row, column) positions in the LM.

Every visual token's three position ids come from the model's own `get_rope_index` on the
unpruned prompt; pruning only removes columns, so a kept token's (t, h, w) rotary angles are
exactly those it had unpruned, and generated text continues from the unpruned prompt's end.
A live memory is no clip get_rope_index could lay out (its units need not be evenly spaced), so
`memory_layout` rebuilds the same ids from each token's unit time and grid position.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.vision_utils import get_vision_window_index

from streamprune.encode.cacher import CacherConfig
from streamprune.encode.families import QwenSTCCacher
from streamprune.models.attention import apply_rope, received_attention
from streamprune.models.base import EncodedVideo, PromptLayout, VideoLLMAdapter
from streamprune.models.preprocess import CLIP_NORM, Normalisation, qwen_pixel_limits, qwen_video_patches
from streamprune.models.prompt import PromptIds
from streamprune.types import VisualTokens

QWEN_VL_CHAT_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><video><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)
VIDEO_TYPE = 2  # mm_token_type_ids value of video tokens


class Qwen25VLAdapter(VideoLLMAdapter):
    family = "qwen2_5_vl"
    default_template = QWEN_VL_CHAT_TEMPLATE
    position_kind = "mrope"
    # FastVID's authors ship a separate Qwen2.5-VL algorithm (fastvid_qwen25vl/...modeling_qwen2_5_vl.py)
    method_variants = {"fastvid": "fastvid_qwen"}

    @property
    def frames_per_unit(self) -> int:
        return int(self._vision.temporal_patch_size)

    @classmethod
    def visual_budget(cls, model_dir: Path, frames: int) -> tuple[int, int]:
        vision = json.loads((Path(model_dir) / "config.json").read_text()).get("vision_config") or {}
        patch = int(vision.get("patch_size", 14))
        merge, temporal = int(vision.get("spatial_merge_size", 2)), int(vision.get("temporal_patch_size", 2))
        _, max_pixels = qwen_pixel_limits(model_dir)
        patches = (-(-frames // temporal)) * (max_pixels // (patch * patch))
        return patches // (merge * merge), patches

    def build_cacher(self, config: CacherConfig) -> QwenSTCCacher:
        return QwenSTCCacher.from_qwen2_5_vl(self.model, config)

    @property
    def _vision(self):
        return self.model.config.vision_config

    def patches(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """`[T, H, W, 3]` uint8 -> (flattened patches `[S, 3*tp*p*p]` in the ViT's dtype, video_grid_thw
        `[1, 3]`), on the model's device; per-frame pixel limits and mean/std from the checkpoint's
        video processor (video_preprocessor_config.json, else preprocessor_config.json)."""
        min_pixels, max_pixels = qwen_pixel_limits(self.model_dir)
        patches, grid_thw = qwen_video_patches(
            frames,
            patch_size=self._vision.patch_size,
            merge_size=self._vision.spatial_merge_size,
            temporal_patch_size=self._vision.temporal_patch_size,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            norm=Normalisation.from_dir(self.model_dir, CLIP_NORM),
        )
        return patches.to(self.device, self.model.model.visual.dtype), grid_thw.to(self.device)

    def token_grid(self, grid_thw: torch.Tensor) -> tuple[int, int, int]:
        t, h, w = grid_thw[0].tolist()
        m = self._vision.spatial_merge_size
        return t, h // m, w // m

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, fps: float = 1.0, signals: frozenset[str] = frozenset(),
               cacher: Any = None) -> EncodedVideo:
        patches, grid_thw = self.patches(frames)
        self._grid_thw = grid_thw  # read by attention_received during this call
        with received_attention(self, wanted="vit_attention" in signals) as attention:
            if cacher is None:
                feats = self.model.model.get_video_features(patches, grid_thw, return_dict=True).pooler_output[0]
            else:
                feats = cacher.encode(patches, grid_thw)
        # feats: [t*h*w, D] in raster order of merged tokens
        grid = self.token_grid(grid_thw)
        tokens = VisualTokens(features=feats, thw=VisualTokens.grid_positions(*grid), grid=grid)
        if attention.value is not None:
            tokens.signals["vit_attention"] = attention.value
        return EncodedVideo(tokens=tokens, always_kept=feats[:0], fps=fps)

    def _ids(self, prompt: PromptIds, n_visual: int) -> tuple[list[int], torch.Tensor]:
        ids = prompt.prefix + [self.model.config.video_token_id] * n_visual + prompt.suffix
        types = torch.zeros(1, len(ids), dtype=torch.int, device=self.device)
        types[0, len(prompt.prefix):len(prompt.prefix) + n_visual] = VIDEO_TYPE
        return ids, types

    def _second_per_grid(self, fps: float) -> torch.Tensor:
        """Seconds one temporal patch spans: `temporal_patch_size / fps`, as the processor computes it."""
        return torch.tensor([self._vision.temporal_patch_size / fps], device=self.device)

    def layout(self, video: EncodedVideo, prompt: PromptIds) -> PromptLayout:
        n = len(video.tokens)
        ids, types = self._ids(prompt, n)
        t, h, w = video.tokens.grid
        m = self._vision.spatial_merge_size
        grid_thw = torch.tensor([[t, h * m, w * m]], device=self.device)
        positions, _ = self.model.model.get_rope_index(
            torch.tensor([ids], device=self.device), mm_token_type_ids=types, video_grid_thw=grid_thw,
            second_per_grid_ts=self._second_per_grid(video.fps),
        )
        embeds = self.embed_ids(ids)
        start = len(prompt.prefix)
        embeds[start:start + n] = video.tokens.features.to(embeds.device, embeds.dtype)
        positions = positions[:, 0, :]  # [3, L]
        slots = start + torch.arange(n, device=self.device)
        return PromptLayout(embeds=embeds, positions=positions, visual_slots=slots,
                            next_position=int(positions.max()) + 1)

    def memory_layout(self, features: torch.Tensor, hw: torch.Tensor, seconds: torch.Tensor, newline: torch.Tensor,
                      prompt: PromptIds, grid: tuple[int, int] | None = None) -> PromptLayout:
        """A live memory's tokens at the (t, h, w) ids `get_rope_index` gives a clip, so its M-RoPE
        sees time and space as it does offline: t = start + `.long()` of the unit's seconds times
        `tokens_per_second` (get_rope_index's patch index x seconds per patch x tokens_per_second,
        with the stream time standing in for the first two: units need not be evenly spaced), h and
        w = start + grid position; the text after the video resumes where get_rope_index resumes it
        for the unpruned clip reaching the memory's last unit (`_text_start`). Qwen2.5-VL has no
        always-kept visual tokens."""
        if newline.numel():
            raise ValueError("Qwen2.5-VL has no always-kept visual tokens")
        n = features.shape[0]
        ids, _ = self._ids(prompt, n)
        start = len(prompt.prefix)
        hw = hw.to(self.device)
        if grid is None:
            grid = tuple((hw.max(dim=0).values + 1).tolist()) if n else (1, 1)
        temporal = (seconds.double() * self._vision.tokens_per_second).long().to(self.device)
        visual = start + torch.stack([temporal, hw[:, 0], hw[:, 1]])
        resume = self._text_start(start, int(temporal.max()) if n else 0, *grid)
        positions = torch.cat([
            torch.arange(start, device=self.device).expand(3, -1),
            visual,
            resume + torch.arange(len(prompt.suffix), device=self.device).expand(3, -1),
        ], dim=1)
        embeds = self.embed_ids(ids)
        embeds[start:start + n] = features.to(embeds.device, embeds.dtype)
        return PromptLayout(embeds=embeds, positions=positions, visual_slots=start + torch.arange(n, device=self.device),
                            next_position=int(positions.max()) + 1)

    def _text_start(self, start: int, last_t: int, height: int, width: int) -> int:
        """Position of the first text token after a video whose ids start at `start`, with temporal
        ids up to start + `last_t` over a height x width token grid. Qwen's rule (transformers up to
        5.2) is 1 + the video's largest id, time included; transformers 5.3 resumes after the
        spatial extent alone. Which one the installed get_rope_index follows is asked of it once,
        so the live answer's text positions are the offline layout's under either."""
        spatial = start + max(height, width)
        return max(spatial, start + last_t + 1) if self._text_follows_time else spatial

    @functools.cached_property
    def _text_follows_time(self) -> bool:
        # two temporal patches of one token, 100 s apart: the text resumes at 1 (spatial) or later
        m = self._vision.spatial_merge_size
        ids, types = self._ids(PromptIds(prefix=[], suffix=[self.model.config.vision_end_token_id]), 2)
        positions, _ = self.model.model.get_rope_index(
            torch.tensor([ids], device=self.device), mm_token_type_ids=types,
            video_grid_thw=torch.tensor([[2, m, m]], device=self.device),
            second_per_grid_ts=torch.tensor([100.0], device=self.device),
        )
        return int(positions[0, 0, -1]) > 1

    def reference_inputs(self, frames: np.ndarray, question: str, fps: float = 1.0) -> dict[str, torch.Tensor]:
        patches, grid_thw = self.patches(frames)
        t, h, w = self.token_grid(grid_thw)
        ids, types = self._ids(self.prompt_ids(question), t * h * w)
        return {"input_ids": torch.tensor([ids], device=self.device), "pixel_values_videos": patches,
                "video_grid_thw": grid_thw, "mm_token_type_ids": types,
                "second_per_grid_ts": self._second_per_grid(fps)}

    def vision_attention_layer(self) -> torch.nn.Module:
        return self.model.model.visual.blocks[-1].attn

    def attention_received(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """`[N]` attention received by each merged token's patches in the last ViT block, within
        the block's own attention segments (full frame or window), averaged over its patches."""
        x = args[0] if args else kwargs["hidden_states"]  # [S, C], window order
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        cos, sin = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        seq = x.shape[0]
        q, k, _ = module.qkv(x).reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = apply_rope(q.float(), cos, sin)  # [S, H, d]
        k = apply_rope(k.float(), cos, sin)
        received = segment_received_attention(q, k, cu.to(x.device), module.scaling)
        unit = self._vision.spatial_merge_size ** 2
        window_index, _ = get_vision_window_index(
            self._grid_thw, self._vision.spatial_merge_size, self._vision.window_size, self._vision.patch_size
        )
        per_token = received.view(-1, unit).mean(dim=1)  # merge units in window order
        return per_token[torch.argsort(window_index).to(per_token.device)]


def segment_received_attention(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """`q, k: [S, H, d]` attending only within the segments `cu_seqlens` bounds (frames or windows)
    -> `[S]`: the attention each position receives, averaged over its segment's queries and the
    heads. All segments at once, padded to the longest (masked), one head at a time."""
    seq, heads = q.shape[:2]
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    width = int(lengths.max())
    offsets = torch.arange(width, device=q.device)
    valid = offsets < lengths[:, None]  # [G, W]
    index = (starts[:, None] + offsets).clamp(max=seq - 1)  # [G, W]
    qs, ks = q[index], k[index]  # [G, W, H, d]
    received = torch.zeros(index.shape, device=q.device)
    for head in range(heads):
        scores = (qs[:, :, head] @ ks[:, :, head].transpose(1, 2)) * scale  # [G, W, W]
        probs = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
        received += (probs * valid[:, :, None]).sum(dim=1)
    received = received / (lengths[:, None] * heads)
    out = torch.empty(seq, device=q.device)
    out[index[valid]] = received[valid]
    return out

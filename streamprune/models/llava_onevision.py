"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower -> projector -> 2x2
bilinear pooling -> one newline token after the video; 1-D RoPE positions in the Qwen2 LM.

A kept visual token keeps the sequence position it had in the unpruned prompt, so the LM sees
gaps where pruned tokens were (as FastVID, FastV, DivPrune and VLA-Pruner do).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamprune.encode.cacher import CacherConfig
from streamprune.encode.families import STCCacher
from streamprune.models.attention import received_attention
from streamprune.models.base import EncodedVideo, PromptLayout, VideoLLMAdapter
from streamprune.models.preprocess import SIGLIP_NORM, Normalisation, square_pixels, square_size
from streamprune.models.prompt import QWEN_CHAT_TEMPLATE, PromptIds
from streamprune.types import VisualTokens


class LlavaOnevisionAdapter(VideoLLMAdapter):
    family = "llava_onevision"
    default_template = QWEN_CHAT_TEMPLATE

    @property
    def _video_token_id(self) -> int:
        return self.model.config.video_token_id

    @classmethod
    def visual_budget(cls, model_dir: Path, frames: int) -> tuple[int, int]:
        vision = json.loads((Path(model_dir) / "config.json").read_text()).get("vision_config") or {}
        side = int(vision.get("image_size", 384)) // int(vision.get("patch_size", 14))
        pooled = math.ceil(side / 2)
        return frames * pooled * pooled + 1, frames * side * side

    def build_cacher(self, config: CacherConfig) -> STCCacher:
        return STCCacher.from_llava_onevision(self.model, config)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """`[T, H, W, 3]` uint8 -> `[T, 3, S, S]` on the model's device in the tower's dtype, with the
        checkpoint's video-processor size and mean/std (384 px, SigLIP's 0.5/0.5 for the public ones)."""
        size = square_size(self.model_dir, self.model.config.vision_config.image_size)
        norm = Normalisation.from_dir(self.model_dir, SIGLIP_NORM)
        return square_pixels(frames, size, norm).to(self.device, self.model.model.vision_tower.dtype)

    def token_grid(self, n_frames: int) -> tuple[int, int, int]:
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        pooled = math.ceil(side / 2)
        return n_frames, pooled, pooled

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, fps: float = 1.0, signals: frozenset[str] = frozenset(),
               cacher: Any = None) -> EncodedVideo:
        pixels = self.pixels(frames)
        with received_attention(self, wanted="vit_attention" in signals) as attention:
            if cacher is None:
                feats = self.model.model.get_video_features(pixel_values_videos=pixels[None], return_dict=True)
                feats = feats.pooler_output[0]  # [T*h*w + 1, D]: frame tokens then the newline
            else:
                feats = self._features_from_hidden(cacher.encode(pixels))
        grid = self.token_grid(pixels.shape[0])
        n = grid[0] * grid[1] * grid[2]
        tokens = VisualTokens(features=feats[:n], thw=VisualTokens.grid_positions(*grid), grid=grid)
        if attention.value is not None:
            tokens.signals["vit_attention"] = attention.value
        return EncodedVideo(tokens=tokens, always_kept=feats[n:], fps=fps)

    def _features_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vision hidden states `[T, P, Dv]` -> `[T*h*w + 1, D]` as `get_video_features` makes them:
        projector, 2x2 bilinear pooling, one newline token after the video."""
        inner = self.model.model
        pooled = inner.apply_pooling(inner.multi_modal_projector(hidden))
        return torch.cat([pooled.reshape(-1, pooled.shape[-1]), inner.image_newline[None].to(pooled.dtype)])

    def layout(self, video: EncodedVideo, prompt: PromptIds) -> PromptLayout:
        n_visual = len(video.tokens) + video.always_kept.shape[0]
        ids = prompt.prefix + [self._video_token_id] * n_visual + prompt.suffix
        embeds = self.embed_ids(ids)
        start = len(prompt.prefix)
        visual = torch.cat([video.tokens.features, video.always_kept]).to(embeds.device, embeds.dtype)
        embeds[start:start + n_visual] = visual
        return PromptLayout(
            embeds=embeds,
            positions=torch.arange(len(ids), device=self.device)[None],
            visual_slots=start + torch.arange(len(video.tokens), device=self.device),
            next_position=len(ids),
        )

    def reference_inputs(self, frames: np.ndarray, question: str, fps: float = 1.0) -> dict[str, torch.Tensor]:
        prompt = self.prompt_ids(question)
        t, h, w = self.token_grid(len(frames))
        ids = prompt.prefix + [self._video_token_id] * (t * h * w + 1) + prompt.suffix
        return {"input_ids": torch.tensor([ids], device=self.device), "pixel_values_videos": self.pixels(frames)[None]}

    def vision_attention_layer(self) -> torch.nn.Module:
        """The SigLIP attention module whose output feeds the projector (config.vision_feature_layer)."""
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        chosen = self.model.config.vision_feature_layer
        if not isinstance(chosen, int):
            chosen = chosen[-1]
        # hidden_states[i] is the input of layer i (hidden_states[0] = embeddings), so the state
        # selected by index i (or -k) is produced by layer i-1 (or len-k).
        index = chosen - 1 if chosen > 0 else len(layers) + chosen
        return layers[index].self_attn

    def attention_received(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """`[N]` attention each pooled token's patches received at the feature layer."""
        x = args[0] if args else kwargs["hidden_states"]  # [F, P, C]
        frames, patches, _ = x.shape
        heads = module.num_heads
        q = module.q_proj(x).view(frames, patches, heads, -1).transpose(1, 2).float()  # [F, H, P, d]
        k = module.k_proj(x).view(frames, patches, heads, -1).transpose(1, 2).float()
        received = torch.zeros(frames, patches, device=x.device)
        for head in range(heads):  # every frame at once, one head at a time to bound memory
            probs = torch.softmax((q[:, head] @ k[:, head].transpose(1, 2)) * module.scale, dim=-1)  # [F, P, P]
            received += probs.mean(dim=1)
        side = int(round(patches ** 0.5))
        grid = (received / heads).view(frames, 1, side, side)
        _, h, w = self.token_grid(frames)
        # pooled exactly like the features (LlavaOnevisionModel.apply_pooling)
        pooled = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear")
        return pooled.reshape(-1)

"""The family-specific half of STC-Cacher: each tower's layer as a `_Block` (four small methods:
norm + keys, attention on chosen rows, MLP, FLOPs) and the cacher that walks that tower. The
rule itself (which tokens to recompute, when to refresh) is written once, in cacher.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamprune.encode.cacher import CacherConfig, _Block, _StreamCacher
from streamprune.errors import ConfigError, InputError
from streamprune.models.attention import apply_rope


class _SiglipBlock(_Block):
    def __init__(self, layer: nn.Module, intermediate: int) -> None:
        attn = layer.self_attn
        super().__init__(layer, attn.num_heads, attn.scale, 4.0 * attn.embed_dim * intermediate)

    def norm_keys(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.layer.layer_norm1(h)
        return x, self.layer.self_attn.k_proj(x)

    def queries_values(self, x_rows: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.layer.self_attn
        return attn.q_proj(x_rows), attn.v_proj(x_rows)

    def out_proj(self, attn: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attn.out_proj(attn)

    def mlp(self, h_rows: torch.Tensor) -> torch.Tensor:
        return self.layer.mlp(self.layer.layer_norm2(h_rows))


class _QwenBlock(_Block):
    """Qwen2.5-VL block for one frame in window order: fused qkv, 2-D rotary on q and k, attention
    within `segments` (window ids, or None for the full-attention blocks)."""

    def __init__(self, layer: nn.Module, intermediate: int, rope: tuple[torch.Tensor, torch.Tensor],
                 segments: torch.Tensor | None) -> None:
        attn = layer.attn
        super().__init__(layer, attn.num_heads, attn.scaling, 6.0 * attn.dim * intermediate)
        self.cos, self.sin = rope
        self.segments = segments
        self.window_sizes = None if segments is None else torch.bincount(segments)
        self.dim = attn.dim

    def _rotate(self, t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        cos, sin = (self.cos, self.sin) if rows is None else (self.cos[rows], self.sin[rows])
        x = t.view(t.shape[0], self.heads, -1).float()
        return apply_rope(x, cos[:, None].float(), sin[:, None].float()).to(t.dtype).reshape(t.shape)

    def _proj(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """Rows `part*D:(part+1)*D` of the fused qkv projection (0 = q, 1 = k, 2 = v)."""
        qkv = self.layer.attn.qkv
        sl = slice(part * self.dim, (part + 1) * self.dim)
        return F.linear(x, qkv.weight[sl], None if qkv.bias is None else qkv.bias[sl])

    def norm_keys(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.layer.norm1(h)
        return x, self._rotate(self._proj(x, 1), None)

    def queries_values(self, x_rows: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotate(self._proj(x_rows, 0), rows), self._proj(x_rows, 2)

    def out_proj(self, attn: torch.Tensor) -> torch.Tensor:
        return self.layer.attn.proj(attn)

    def mlp(self, h_rows: torch.Tensor) -> torch.Tensor:
        return self.layer.mlp(self.layer.norm2(h_rows))

    def attention_mask(self, rows: torch.Tensor) -> torch.Tensor | None:
        if self.segments is None:
            return None
        return self.segments[rows][:, None] == self.segments[None, :]

    def keys_per_row(self, rows: torch.Tensor, n: int) -> int:
        if self.segments is None:
            return rows.numel() * n
        return int(self.window_sizes[self.segments[rows]].sum())


class STCCacher(_StreamCacher):
    """Streaming SigLIP encoder with STC-Cacher reuse; one object per stream.

    `feature_layer` indexes the tower's hidden states as LLaVA-OV does (`hidden_states[k]`:
    0 = patch embeddings, k = output of layer k, -1 = last layer before `post_layernorm`, which
    LLaVA-OV never applies); only the layers up to it are run. A list concatenates several layers
    on the channel axis, as LLaVA-OV does for a list-valued `vision_feature_layer`.
    """

    def __init__(self, vision_tower: nn.Module, config: CacherConfig | None = None,
                 feature_layer: int | list[int] = -1, select_strategy: str = "full") -> None:
        if type(vision_tower).__name__ != "SiglipVisionModel":
            raise ConfigError(f"STCCacher wraps a SigLIP vision tower (SiglipVisionModel), got "
                              f"{type(vision_tower).__name__}; Qwen2.5-VL's ViT takes QwenSTCCacher")
        if select_strategy not in ("full", "default"):
            raise ConfigError(f"select_strategy must be 'full' or 'default', got {select_strategy!r}")
        super().__init__(config)
        self.tower = vision_tower
        self.select_strategy = select_strategy
        n_layers = len(vision_tower.encoder.layers)
        wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        if not wanted or any(not -(n_layers + 1) <= k <= n_layers for k in wanted):
            raise ConfigError(f"feature_layer {feature_layer} out of range for a tower with {n_layers} layers")
        # hidden_states has n_layers + 1 entries; negative k counts from its end
        self._keep = [k % (n_layers + 1) for k in wanted]
        inner = vision_tower.config.intermediate_size
        self._blocks: list[_Block] = [_SiglipBlock(layer, inner)
                                      for layer in vision_tower.encoder.layers[:max(self._keep)]]

    @classmethod
    def from_llava_onevision(cls, model: nn.Module, config: CacherConfig | None = None) -> "STCCacher":
        """Cacher for a `LlavaOnevisionForConditionalGeneration` (or its inner `LlavaOnevisionModel`),
        returning the hidden states its `vision_feature_layer` / `_select_strategy` pick."""
        tower = getattr(getattr(model, "model", model), "vision_tower", None)
        if tower is None:
            raise ConfigError(f"{type(model).__name__} has no vision_tower")
        return cls(tower, config, feature_layer=model.config.vision_feature_layer,
                   select_strategy=model.config.vision_feature_select_strategy)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[F, 3, H, W]` preprocessed frames, in stream order -> `[F, P, Dv]` hidden states of the
        selected layer(s) (P = patches, minus the first with select_strategy 'default'), ready for
        LLaVA-OV's projector and pooling. Frames go one at a time so each can reuse the reference."""
        emb = self.tower.embeddings
        channels = emb.config.num_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise InputError(f"pixel_values must be [F, {channels}, H, W], got {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[2:]) != (emb.image_size, emb.image_size):
            raise InputError(f"frames must be {emb.image_size}x{emb.image_size} for this tower, "
                             f"got {tuple(pixel_values.shape[2:])}")
        n = emb.num_patches
        embed_flops = 2.0 * n * channels * emb.patch_size**2 * emb.embed_dim
        outputs = []
        for frame in pixel_values:
            hidden = self._run_frame(emb(frame[None])[0], self._blocks, (n,), self._keep, embed_flops)
            outputs.append(torch.cat(hidden, dim=-1))
        out = torch.stack(outputs)
        return out[:, 1:] if self.select_strategy == "default" else out


class QwenSTCCacher(_StreamCacher):
    """Streaming Qwen2.5-VL ViT (`Qwen2_5_VisionTransformerPretrainedModel`) with STC-Cacher
    reuse, one temporal patch at a time; one object per stream (see the module docstring)."""

    def __init__(self, visual: nn.Module, config: CacherConfig | None = None) -> None:
        if type(visual).__name__ != "Qwen2_5_VisionTransformerPretrainedModel":
            raise ConfigError(f"QwenSTCCacher wraps Qwen2.5-VL's vision transformer, got {type(visual).__name__}")
        super().__init__(config)
        self.visual = visual

    @classmethod
    def from_qwen2_5_vl(cls, model: nn.Module, config: CacherConfig | None = None) -> "QwenSTCCacher":
        """Cacher for a `Qwen2_5_VLForConditionalGeneration` (or its inner `Qwen2_5_VLModel`)."""
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is None:
            raise ConfigError(f"{type(model).__name__} has no visual tower")
        return cls(visual, config)

    def _geometry(self, h: int, w: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """For one `[1, h, w]` temporal patch: window order `[N/unit]`, rotary (cos, sin) `[N, hd]`
        in window order, and each token's window id `[N]`."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            get_vision_position_ids,
            get_vision_window_index,
        )

        v = self.visual
        grid = torch.tensor([[1, h, w]], device=v.device)
        window_index, cu_windows = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
        window_index = window_index.to(v.device)
        positions = get_vision_position_ids(grid, v.spatial_merge_size)
        n = h * w
        cos, sin = v.rotary_pos_emb(torch.empty(0, device=v.device), positions)
        cos, sin = (v.permute_input_for_window_attn(t, window_index, seq_len=n) for t in (cos, sin))
        windows = torch.bucketize(torch.arange(n, device=v.device), cu_windows[1:].long(), right=True)
        return window_index, (cos, sin), windows

    @torch.no_grad()
    def encode(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Flattened video patches `[T*h*w, 3*tp*p*p]` and `video_grid_thw` `[1, 3]` (one video, as
        from the Qwen2.5-VL processor) -> merged tokens `[T*h*w/unit, D_out]` in the model's own
        order, what `get_video_features` returns for the video. Temporal patches go one at a time."""
        v = self.visual
        if grid_thw.shape != (1, 3):
            raise InputError(f"grid_thw must be [1, 3] (one video), got {tuple(grid_thw.shape)}")
        t, h, w = (int(s) for s in grid_thw[0])
        n = h * w
        if patches.dim() != 2 or patches.shape[0] != t * n:
            raise InputError(f"patches must be [{t * n}, C] for grid {t}x{h}x{w}, got {tuple(patches.shape)}")
        window_index, rope, windows = self._geometry(h, w)
        inner = v.config.intermediate_size
        blocks: list[_Block] = [_QwenBlock(blk, inner, rope, None if i in v.fullatt_block_indexes else windows)
                                for i, blk in enumerate(v.blocks)]
        d, unit = v.config.hidden_size, v.spatial_merge_unit
        fixed = (2.0 * n * patches.shape[1] * d  # patch embedding
                 + 2.0 * (n / unit) * (d * unit) ** 2 + 2.0 * (n / unit) * d * unit * v.config.out_hidden_size)
        restore = torch.argsort(window_index)
        merged = []
        for frame in patches.type(v.dtype).view(t, n, -1):
            x = v.permute_input_for_window_attn(v.patch_embed(frame), window_index, seq_len=n)
            (hidden,) = self._run_frame(x, blocks, (h, w), [len(blocks)], fixed)
            merged.append(v.merger(hidden)[restore])
        return torch.cat(merged)

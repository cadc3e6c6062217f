"""STC-Cacher: reuse vision-encoder work between consecutive frames of a stream.

Paper: Wang et al., "Accelerating Streaming Video LLMs via Hierarchical Token Compression"
(STC, arXiv 2512.00891, CVPR 2026). We follow the authors' code (lern-to-write/STC,
`model/custom_siglip.py` and the refactor `stc/cacher/reference_forward.py`), not the README.

Rule, per encoder layer, for one frame at a time:
- Refresh frame: the ordinary pre-LN block. Its key projection K, value projection V, attention
  branch output A = out_proj(attn) and MLP branch output M are stored per layer as the reference.
- Other frames (the selective path): x = LN1(h); K = W_k x for every token; s_i = cos(K_i, K_ref_i)
  (same layer, same patch position); U = the m = max(1, floor(N * rho)) tokens with the lowest s.
  Only for U: Q_U = W_q x_U and V_U = W_v x_U; V = V_ref with rows U replaced by V_U;
  A_U = out_proj(SDPA(Q_U, K, V)); A = A_ref with rows U replaced; h = h + A;
  M = M_ref with rows U replaced by MLP(LN2(h)_U); h = h + M. The residual stream itself is
  always the current frame's; only branch outputs are reused. The reference is not updated.
- Defaults of the code: rho = `update_token_ratio` = 0.25, refresh every `cache_interval` = 2
  frames (frame c is a refresh iff c mod 2 == 0, i.e. every other frame).

Our addition (not in the authors' code): `refresh_threshold`. Their README speaks of caching
frames whose cosine similarity exceeds 0.85, but the code has no frame-level test, only the
fixed interval and the per-token ratio. We add a scene-cut check that costs nothing extra: the
mean over tokens of the layer-0 key cosine s_i (which the selective path computes anyway); if
it falls below `refresh_threshold` (default 0.85, the README's number, not validated on real
SigLIP weights) the frame is recomputed in full and becomes the new reference, and the interval
restarts from it. `refresh_threshold=None` gives the code's behaviour exactly.

Scope: the HF SigLIP tower (`SiglipVisionModel`, as `model.model.vision_tower` of
`LlavaOnevisionForConditionalGeneration`). Other towers (e.g. Qwen2.5-VL's windowed, rotary,
flattened-patch ViT) raise ConfigError: their selective path is not implemented here.
State is per cacher object (one per stream); the tower's weights are shared, never patched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from streamprune.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


@dataclass
class CacherConfig:
    """STC-Cacher options; defaults are the authors' code defaults except `refresh_threshold`."""

    update_token_ratio: float = 0.25  # rho: share of tokens recomputed on a selective frame
    cache_interval: int = 2  # a full refresh at least every this many frames (1 = never reuse)
    refresh_threshold: float | None = 0.85  # ours: mean layer-0 key cosine below this -> refresh

    def __post_init__(self) -> None:
        if not 0.0 < self.update_token_ratio <= 1.0:
            raise ConfigError(f"update_token_ratio must be in (0, 1], got {self.update_token_ratio}")
        if self.cache_interval < 1:
            raise ConfigError(f"cache_interval must be >= 1, got {self.cache_interval}")
        if self.refresh_threshold is not None and not -1.0 <= self.refresh_threshold <= 1.0:
            raise ConfigError(f"refresh_threshold must be a cosine in [-1, 1] or null, got {self.refresh_threshold}")


@dataclass
class CacherStats:
    """What the cacher did since the last reset. FLOPs count matrix products only (2 per
    multiply-add) of the patch embedding and the encoder layers actually run; norms, softmax,
    activations and the cosine test are O(N*D) and left out on both sides."""

    frames: int = 0
    cache_hits: int = 0  # frames served by the selective path
    full_refreshes: int = 0  # frames computed in full (first frame, interval, scene cut)
    scene_cut_refreshes: int = 0  # the subset of refreshes forced by refresh_threshold
    flops_full: float = 0.0  # what the plain tower would have spent on these frames
    flops_spent: float = 0.0

    @property
    def flops_saved_share(self) -> float:
        """1 - spent/full over the frames seen (0 before any frame)."""
        return 0.0 if self.flops_full == 0 else 1.0 - self.flops_spent / self.flops_full


@dataclass
class _LayerReference:
    """One layer's reference for the stream, each `[N, D]`."""

    key: torch.Tensor
    value: torch.Tensor
    attn_out: torch.Tensor
    mlp_out: torch.Tensor


@dataclass
class _StreamState:
    layers: list[_LayerReference] = field(default_factory=list)
    frames_since_refresh: int = 0


class STCCacher:
    """Streaming SigLIP encoder with STC-Cacher reuse; one object per stream.

    `feature_layer` indexes the tower's hidden states as LLaVA-OV does (`hidden_states[k]`:
    0 = patch embeddings, k = output of layer k, -1 = last layer before `post_layernorm`, which
    LLaVA-OV never applies); only the layers up to it are run. A list concatenates several layers
    on the channel axis, as LLaVA-OV does for a list-valued `vision_feature_layer`.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        config: CacherConfig | None = None,
        feature_layer: int | list[int] = -1,
        select_strategy: str = "full",
    ) -> None:
        if type(vision_tower).__name__ != "SiglipVisionModel":
            raise ConfigError(
                f"STC-Cacher supports the SigLIP vision tower (SiglipVisionModel) only, got {type(vision_tower).__name__}"
            )
        if select_strategy not in ("full", "default"):
            raise ConfigError(f"select_strategy must be 'full' or 'default', got {select_strategy!r}")
        self.tower = vision_tower
        self.config = config if config is not None else CacherConfig()
        self.select_strategy = select_strategy
        n_layers = len(vision_tower.encoder.layers)
        wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        if not wanted or any(not -(n_layers + 1) <= k <= n_layers for k in wanted):
            raise ConfigError(f"feature_layer {feature_layer} out of range for a tower with {n_layers} layers")
        # hidden_states has n_layers + 1 entries; negative k counts from its end
        self._feature_indices = [k % (n_layers + 1) for k in wanted]
        self.layers_run = max(self._feature_indices)
        self.stats = CacherStats()
        self._state = _StreamState()
        self._flops_full_frame, self._flops_selective_frame = self._frame_flops()

    @classmethod
    def from_llava_onevision(cls, model: nn.Module, config: CacherConfig | None = None) -> "STCCacher":
        """Cacher for a `LlavaOnevisionForConditionalGeneration` (or its inner `LlavaOnevisionModel`),
        returning the hidden states its `vision_feature_layer` / `_select_strategy` pick."""
        inner = getattr(model, "model", model)
        tower = getattr(inner, "vision_tower", None)
        if tower is None:
            raise ConfigError(f"{type(model).__name__} has no vision_tower")
        cfg = model.config
        return cls(tower, config, feature_layer=cfg.vision_feature_layer,
                   select_strategy=cfg.vision_feature_select_strategy)

    def reset(self) -> None:
        """Forget the reference and the stats (call at a new stream or episode)."""
        self._state = _StreamState()
        self.stats = CacherStats()

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[F, 3, H, W]` preprocessed frames, in stream order -> `[F, P, Dv]` hidden states of the
        selected layer(s) (P = patches, minus the first with select_strategy 'default').

        Frames are encoded one at a time so each can reuse the previous reference."""
        emb = self.tower.embeddings
        if pixel_values.dim() != 4 or pixel_values.shape[1] != emb.config.num_channels:
            raise InputError(f"pixel_values must be [F, {emb.config.num_channels}, H, W], got {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[2:]) != (emb.image_size, emb.image_size):
            raise InputError(
                f"frames must be {emb.image_size}x{emb.image_size} for this tower, got {tuple(pixel_values.shape[2:])}"
            )
        outputs = [self._encode_frame(emb(frame[None])) for frame in pixel_values]
        hidden = torch.cat(outputs, dim=0)
        return hidden[:, 1:] if self.select_strategy == "default" else hidden

    # -- one frame ---------------------------------------------------------------------------
    def _encode_frame(self, h: torch.Tensor) -> torch.Tensor:
        """`[1, N, D]` patch embeddings -> `[1, N, D']` selected hidden states."""
        state, cfg = self._state, self.config
        layers = self.tower.encoder.layers
        kept = {0: h} if 0 in self._feature_indices else {}
        full = not state.layers or state.frames_since_refresh + 1 >= cfg.cache_interval
        first: _Keys | None = None
        if not full and self.layers_run > 0:
            # layer-0 keys serve both the scene-cut test and layer 0's token selection
            first = _keys(layers[0], h, state.layers[0])
            if cfg.refresh_threshold is not None and float(first.sim.mean()) < cfg.refresh_threshold:
                full = True
                self.stats.scene_cut_refreshes += 1
                logger.debug("STC-Cacher scene cut: mean layer-0 key cosine %.3f", float(first.sim.mean()))

        if full:
            references = []
            for i in range(self.layers_run):
                h, ref = _full_layer(layers[i], h, first if i == 0 else None)
                references.append(ref)
                if i + 1 in self._feature_indices:
                    kept[i + 1] = h
            state.layers = references
            state.frames_since_refresh = 0
            self.stats.full_refreshes += 1
            self.stats.flops_spent += self._flops_full_frame
        else:
            m = self._update_count(h.shape[1])
            for i in range(self.layers_run):
                h = _selective_layer(layers[i], h, state.layers[i], m, first if i == 0 else None)
                if i + 1 in self._feature_indices:
                    kept[i + 1] = h
            state.frames_since_refresh += 1
            self.stats.cache_hits += 1
            self.stats.flops_spent += self._flops_selective_frame
        self.stats.frames += 1
        self.stats.flops_full += self._flops_full_frame
        return torch.cat([kept[k] for k in self._feature_indices], dim=-1)

    def _update_count(self, n_tokens: int) -> int:
        return max(1, min(n_tokens, int(n_tokens * self.config.update_token_ratio)))

    def _frame_flops(self) -> tuple[float, float]:
        """Analytic (full, selective) FLOPs of one frame: patch embedding + the layers run."""
        c = self.tower.config
        n = (c.image_size // c.patch_size) ** 2
        d, inner = c.hidden_size, c.intermediate_size
        m = self._update_count(n)
        embed = 2.0 * n * (c.num_channels * c.patch_size**2) * d

        def layer(rows: int, key_rows: int) -> float:
            # K for key_rows tokens, Q and V for `rows`, scores + weighted sum, out_proj, MLP
            return (2.0 * key_rows * d * d + 2.0 * rows * d * 2 * d + 2.0 * 2 * rows * n * d
                    + 2.0 * rows * d * d + 2.0 * 2 * rows * d * inner)

        return embed + self.layers_run * layer(n, n), embed + self.layers_run * layer(m, n)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[1, T, D]` -> `[1, heads, T, D/heads]`."""
    return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of queries `[1, T, D]` over keys/values `[1, N, D]` + out_proj."""
    out = F.scaled_dot_product_attention(
        _heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads), scale=attn.scale
    )
    return attn.out_proj(out.transpose(1, 2).reshape(q.shape))


@dataclass
class _Keys:
    """A layer's LN1 output x and keys `[1, N, D]`, and per-token cosine to the reference `[N]`."""

    x: torch.Tensor
    key: torch.Tensor
    sim: torch.Tensor


def _keys(layer: nn.Module, h: torch.Tensor, ref: _LayerReference) -> _Keys:
    x = layer.layer_norm1(h)
    key = layer.self_attn.k_proj(x)
    return _Keys(x, key, F.cosine_similarity(key[0], ref.key, dim=-1))


def _full_layer(layer: nn.Module, h: torch.Tensor, pre: _Keys | None) -> tuple[torch.Tensor, _LayerReference]:
    """The plain SigLIP block on `[1, N, D]`, also returning its reference tensors; `pre` reuses
    LN1 and keys already computed for this layer."""
    attn = layer.self_attn
    x = layer.layer_norm1(h) if pre is None else pre.x
    key = attn.k_proj(x) if pre is None else pre.key
    value = attn.v_proj(x)
    attn_out = _attend(attn, attn.q_proj(x), key, value)
    h = h + attn_out
    mlp_out = layer.mlp(layer.layer_norm2(h))
    h = h + mlp_out
    return h, _LayerReference(key=key[0], value=value[0], attn_out=attn_out[0], mlp_out=mlp_out[0])


def _selective_layer(
    layer: nn.Module,
    h: torch.Tensor,
    ref: _LayerReference,
    m: int,
    pre: _Keys | None,
) -> torch.Tensor:
    """The block on `[1, N, D]` recomputing only the m tokens whose keys moved most from `ref`."""
    attn = layer.self_attn
    keys = _keys(layer, h, ref) if pre is None else pre
    x, key = keys.x, keys.key
    rows = torch.topk(keys.sim, m, largest=False).indices
    x_rows = x[:, rows]
    value = ref.value.clone()
    value[rows] = attn.v_proj(x_rows)[0]
    attn_out = ref.attn_out.clone()
    attn_out[rows] = _attend(attn, attn.q_proj(x_rows), key, value[None])[0]
    h = h + attn_out
    mlp_out = ref.mlp_out.clone()
    mlp_out[rows] = layer.mlp(layer.layer_norm2(h)[:, rows])[0]
    return h + mlp_out

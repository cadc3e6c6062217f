"""STC-Cacher: reuse vision-encoder work between consecutive frames of a stream.

Paper: Wang et al., "Accelerating Streaming Video LLMs via Hierarchical Token Compression"
(STC, arXiv 2512.00891, CVPR 2026). We follow the authors' code (lern-to-write/STC,
`model/custom_siglip.py` and the refactor `stc/cacher/reference_forward.py`), not the README.

Rule, per encoder layer, for one frame at a time:
- Refresh frame: the ordinary pre-norm block. Its keys K, values V, attention branch output
  A = out_proj(attn) and MLP branch output M are stored per layer as the reference.
- Other frames (the selective path): x = norm1(h); K = W_k x for every token;
  s_i = cos(K_i, K_ref_i) (same layer, same patch position); U = the m = max(1, floor(N * rho))
  tokens with the lowest s. Only for U: Q_U = W_q x_U and V_U = W_v x_U; V = V_ref with rows U
  replaced by V_U; A_U = out_proj(attention(Q_U, K, V)); A = A_ref with rows U replaced;
  h = h + A; M = M_ref with rows U replaced by MLP(norm2(h)_U); h = h + M. The residual stream
  is always the current frame's; only branch outputs are reused. The reference is not updated.
- Code defaults: rho = `update_token_ratio` = 0.25 and a refresh every `cache_interval` = 2
  frames (frame c is a refresh iff c mod 2 == 0, i.e. every other frame).

Our addition (not in the authors' code): `refresh_threshold`. Their README speaks of caching
frames whose cosine similarity exceeds 0.85, but the code has no frame-level test, only the
fixed interval and the per-token ratio. We add a scene-cut check that costs nothing extra: the
mean over tokens of the layer-0 key cosine s_i (which the selective path computes anyway); if it
falls below `refresh_threshold` (default 0.85, the README's number, not validated on real
weights) the frame is recomputed in full, becomes the new reference, and the interval restarts
from it. `refresh_threshold=None` gives the code's behaviour.

Towers: `STCCacher` wraps HF SigLIP (`SiglipVisionModel`, LLaVA-OneVision's
`model.model.vision_tower`), which is what the authors patch. `QwenSTCCacher` applies the same
rule to the Qwen2.5-VL ViT (`model.model.visual`); that port is ours: keys and queries carry the
tower's 2-D rotary embedding (a per-position rotation, so the key cosine is unchanged by it), a
recomputed query attends only within its own window (or the whole frame in the full-attention
blocks), exactly as the plain block does, and the patch merger always runs in full. One Qwen
"frame" is a temporal patch (2 video frames). State is per cacher object, one per stream; the
tower's weights are shared and never patched. Like the authors' SDPA path, the cacher yields no
attention weights, and forward hooks on the attention modules do not fire.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from streamprune.errors import ConfigError

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
    multiply-add) of the patch embedding, the encoder layers run and (Qwen) the merger; norms,
    softmax, activations, rotary and the cosine test are O(N*D) and left out on both sides."""

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

    def since(self, before: "CacherStats") -> "CacherStats":
        """What happened after the snapshot `before` (a stream's cacher counts over all its calls)."""
        return CacherStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {"cacher_frames": self.frames, "cacher_hits": self.cache_hits,
                "cacher_full_refreshes": self.full_refreshes,
                "vision_flops_saved_share": round(self.flops_saved_share, 4)}


@dataclass
class _LayerReference:
    """One layer's reference for the stream, each `[N, D]`."""

    key: torch.Tensor
    value: torch.Tensor
    attn_out: torch.Tensor
    mlp_out: torch.Tensor


@dataclass
class _Keys:
    """A layer's norm1 output x and keys `[N, D]`, and per-token cosine to the reference `[N]`."""

    x: torch.Tensor
    key: torch.Tensor
    sim: torch.Tensor | None


class _Block(ABC):
    """How one tower's pre-norm block exposes the pieces the STC rule needs. Tensors are one
    frame's tokens, `[N, D]` (or `[R, D]` for the R rows being recomputed)."""

    def __init__(self, layer: nn.Module, heads: int, scale: float, mlp_flops_per_row: float) -> None:
        self.layer, self.heads, self.scale = layer, heads, scale
        self.mlp_flops_per_row = mlp_flops_per_row

    @abstractmethod
    def norm_keys(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm1(h), keys as attention uses them), both `[N, D]`."""

    @abstractmethod
    def queries_values(self, x_rows: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and values `[R, D]` of the normed rows `x_rows` at token positions `rows`."""

    @abstractmethod
    def out_proj(self, attn: torch.Tensor) -> torch.Tensor:
        """The attention output projection, `[R, D]` -> `[R, D]`."""

    @abstractmethod
    def mlp(self, h_rows: torch.Tensor) -> torch.Tensor:
        """Norm2 then MLP on some rows (norm2 is per token, so rows can be picked first)."""

    def attention_mask(self, rows: torch.Tensor) -> torch.Tensor | None:
        """`[R, N]` bool, True where a query may attend; None = every key."""
        return None

    def keys_per_row(self, rows: torch.Tensor, n: int) -> int:
        """Keys attended, summed over the query rows (for the FLOPs count)."""
        return rows.numel() * n

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of queries `[R, D]` over keys/values `[N, D]`, then out_proj."""
        heads = lambda t: t.view(t.shape[0], self.heads, -1).transpose(0, 1)[None]  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=self.attention_mask(rows),
                                             scale=self.scale)
        return self.out_proj(out[0].transpose(0, 1).reshape(q.shape))


def _layer_flops(block: _Block, n: int, d: int, rows: torch.Tensor) -> float:
    """K for all n tokens; Q, V, scores, weighted sum, out-proj and MLP for `rows`."""
    r = rows.numel()
    return (2.0 * n * d * d + 2.0 * r * d * 2 * d + 4.0 * d * block.keys_per_row(rows, n)
            + 2.0 * r * d * d + r * block.mlp_flops_per_row)


def _full_layer(block: _Block, h: torch.Tensor, pre: _Keys | None) -> tuple[torch.Tensor, _LayerReference, float]:
    """The plain block on `[N, D]`, with its reference and FLOPs; `pre` = norm1/keys done already."""
    x, key = block.norm_keys(h) if pre is None else (pre.x, pre.key)
    rows = torch.arange(h.shape[0], device=h.device)
    q, value = block.queries_values(x, rows)
    attn_out = block.attend(q, key, value, rows)
    h = h + attn_out
    mlp_out = block.mlp(h)
    return h + mlp_out, _LayerReference(key, value, attn_out, mlp_out), _layer_flops(block, h.shape[0], h.shape[1], rows)


def _selective_layer(block: _Block, h: torch.Tensor, ref: _LayerReference, m: int,
                     pre: _Keys | None) -> tuple[torch.Tensor, float]:
    """The block on `[N, D]` recomputing only the m tokens whose keys moved most from `ref`."""
    keys = _keys(block, h, ref) if pre is None else pre
    rows = torch.topk(keys.sim, m, largest=False).indices
    q_rows, v_rows = block.queries_values(keys.x[rows], rows)
    value = ref.value.clone()
    value[rows] = v_rows
    attn_out = ref.attn_out.clone()
    attn_out[rows] = block.attend(q_rows, keys.key, value, rows)
    h = h + attn_out
    mlp_out = ref.mlp_out.clone()
    mlp_out[rows] = block.mlp(h[rows])
    return h + mlp_out, _layer_flops(block, h.shape[0], h.shape[1], rows)


def _keys(block: _Block, h: torch.Tensor, ref: _LayerReference) -> _Keys:
    x, key = block.norm_keys(h)
    return _Keys(x, key, F.cosine_similarity(key, ref.key, dim=-1))


@dataclass
class _StreamState:
    layers: list[_LayerReference] = field(default_factory=list)
    frames_since_refresh: int = 0
    geometry: tuple = ()  # a reference is only reusable for frames of the same token layout


class _StreamCacher:
    """The per-stream STC decision and bookkeeping, shared by the towers."""

    def __init__(self, config: CacherConfig | None) -> None:
        self.config = config if config is not None else CacherConfig()
        self.stats = CacherStats()
        self._state = _StreamState()

    def reset(self) -> None:
        """Forget the reference and the stats (call at a new stream or episode)."""
        self._state = _StreamState()
        self.stats = CacherStats()

    def _update_count(self, n_tokens: int) -> int:
        return max(1, min(n_tokens, int(n_tokens * self.config.update_token_ratio)))

    def _run_frame(self, h: torch.Tensor, blocks: list[_Block], geometry: tuple,
                   keep: list[int], fixed_flops: float) -> list[torch.Tensor]:
        """`[N, D]` embedded tokens of one frame through `blocks`; returns the hidden states after
        each layer count in `keep` (0 = the input). `fixed_flops`: work done in full either way."""
        state, cfg = self._state, self.config
        kept = {0: h} if 0 in keep else {}
        full = (not state.layers or state.geometry != geometry
                or state.frames_since_refresh + 1 >= cfg.cache_interval)
        first: _Keys | None = None
        if not full and blocks:
            # layer-0 keys serve both the scene-cut test and layer 0's token selection
            first = _keys(blocks[0], h, state.layers[0])
            if cfg.refresh_threshold is not None and float(first.sim.mean()) < cfg.refresh_threshold:
                full = True
                self.stats.scene_cut_refreshes += 1
                logger.debug("STC-Cacher scene cut: mean layer-0 key cosine %.3f", float(first.sim.mean()))

        spent = baseline = fixed_flops
        all_rows = torch.arange(h.shape[0], device=h.device)
        references = []
        m = self._update_count(h.shape[0])
        for i, block in enumerate(blocks):
            pre = first if i == 0 else None
            baseline += _layer_flops(block, h.shape[0], h.shape[1], all_rows)
            if full:
                h, ref, flops = _full_layer(block, h, pre)
                references.append(ref)
            else:
                h, flops = _selective_layer(block, h, state.layers[i], m, pre)
            spent += flops
            if i + 1 in keep:
                kept[i + 1] = h
        if full:
            state.layers, state.geometry, state.frames_since_refresh = references, geometry, 0
            self.stats.full_refreshes += 1
        else:
            state.frames_since_refresh += 1
            self.stats.cache_hits += 1
        self.stats.frames += 1
        self.stats.flops_full += baseline
        self.stats.flops_spent += spent
        return [kept[k] for k in keep]

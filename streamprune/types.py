"""Core data types that flow through the pipeline: frames, visual tokens, selections."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Frame:
    """One decoded frame. `image` is RGB uint8 `[H, W, 3]`; `timestamp` in seconds of the stream."""

    image: np.ndarray
    timestamp: float
    index: int


@dataclass
class VisualTokens:
    """Visual tokens of one clip as the LLM receives them, with where each came from.

    features:  `[N, D]` LLM-input embeddings (after projector / merger).
    thw:       `[N, 3]` long, the token's grid position: temporal index t, row h, column w.
    grid:      (T, H, W) size of the token grid; N == T*H*W, tokens in raster order (t, h, w).
    signals:   optional per-token side signals `[N, ...]` that some methods read, e.g.
               "vit_attention" `[N]` (attention the token's patches received in the vision encoder).
    frame_signals: optional per-frame signals `[T, ...]`, e.g. "frame_features" `[T, D]`.
    """

    features: torch.Tensor
    thw: torch.Tensor
    grid: tuple[int, int, int]
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    frame_signals: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.thw.shape != (n, 3):
            raise ValueError(f"thw must be [{n}, 3], got {tuple(self.thw.shape)}")

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    def frames(self) -> torch.Tensor:
        """Features reshaped `[T, H*W, D]` (valid because tokens are stored in raster order)."""
        t, h, w = self.grid
        return self.features.reshape(t, h * w, -1)

    @staticmethod
    def grid_positions(t: int, h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`[t*h*w, 3]` raster-order (t, h, w) coordinates."""
        tt, hh, ww = torch.meshgrid(torch.arange(t, device=device), torch.arange(h, device=device),
                                    torch.arange(w, device=device), indexing="ij")
        return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


@dataclass
class Selection:
    """What a pruning method keeps.

    indices:  `[K]` long, ascending, indices into the input tokens. Output token k takes the
              original position of input token `indices[k]` (a merged token takes its anchor's).
    features: `[K, D]` replacement features for merged tokens, or None to keep the inputs' own.
    contiguous: the authors' layout of some methods (DivPrune's LLaVA-1.5 path, HoliTom's outer
              stage): the pruned sequence is renumbered 0..L'-1, as if the pruned tokens never
              existed (1-D positions only). Default: every survivor keeps its original position.
    order:    `[K]` order of the kept tokens inside the visual span (a permutation of range(K)),
              e.g. HoliTom's static tokens first; None: index order.
    """

    indices: torch.Tensor
    features: torch.Tensor | None = None
    contiguous: bool = False
    order: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.indices.numel())

    def apply(self, tokens: VisualTokens) -> VisualTokens:
        """The kept tokens as a new VisualTokens (positions carried along)."""
        feats = tokens.features[self.indices] if self.features is None else self.features
        signals = {k: v[self.indices] for k, v in tokens.signals.items()}
        return VisualTokens(
            features=feats,
            thw=tokens.thw[self.indices],
            grid=tokens.grid,
            signals=signals,
            frame_signals=dict(tokens.frame_signals),
        )

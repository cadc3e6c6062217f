"""The segment stage of a live stream: units join an open segment until the recipe's temporal
method cuts it, and each closed segment is pruned as one clip.

Temporal methods segment a clip in time before pruning it: FastVID's DySeg (Shen et al., NeurIPS
2025, arXiv 2503.11187) cuts where consecutive frames' global features have cosine < tau, HoliTom
(Shao et al., NeurIPS 2025, arXiv 2505.21334) picks windows by a DP that maximises the static
tokens saved. A stream has no clip, so `OnlineSegmenter` keeps an open segment and, after every
unit (1 frame on LLaVA-OneVision, a 2-frame temporal patch on Qwen2.5-VL), asks the method's
`OnlineCutRule` (`PruningMethod.online_cuts()`, pruning/online.py) which leading part of it is
complete. A segment closes
  "cut"         where the rule cuts: FastVID before a unit with cos < tau to the previous one
                (tau 0.9 for `fastvid`, 0.84 for `fastvid_qwen`); HoliTom when the DP over the open
                buffer yields >= 2 windows (all but the last close; tau 0.8, 0.65 in holitom.yaml);
  "max_length"  when it holds `max_units` units (default 16), which bounds how long a frame waits;
  "grid"        before a unit of another (h, w) grid or other signals, which cannot share a clip;
  "flush"       at the end of the stream;
  "unit"        at every unit, for a recipe without a temporal rule (frame-level methods: none,
                uniform, visionzip, divprune, stc_pruner, vla_pruner, ...).
The closed segment's tokens are the units concatenated in order, exactly the VisualTokens the
offline path builds for those frames, so `recipe.select(segment.tokens, ctx)` prunes it as the
offline method prunes a clip.

Deviations from the offline methods, declared (details on the rules in pruning/online.py):
- FastVID: DySeg's c - 1 forced cuts rank the similarities of a whole clip and cannot be taken
  online: online segmentation is the c = 1 threshold cuts plus the maximum length (the method's
  `select` still applies its forced cuts inside each closed segment).
- HoliTom: the DP runs over the open buffer, not the whole clip, and a closed window is final.
- Both: no segment is longer than `max_units`, where the offline methods have no bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.online import OnlineCutRule
from streamprune.types import VisualTokens


@dataclass
class ClosedSegment:
    """A complete segment of the stream.

    tokens: the units concatenated in order, grid (T, h, w) (features `[T*h*w, D]`, raster-order
            positions, signals along tokens, frame_signals `[T, ...]` along frames).
    units:  the caller's metadata of each unit, in order (`units[t]` goes with frame t of tokens).
    reason: why it closed: "cut" | "max_length" | "grid" | "flush" | "unit" (see module doc).
    """

    tokens: VisualTokens
    units: list[Any]
    reason: str


def join_units(units: list[VisualTokens]) -> VisualTokens:
    """Units of grid (1, h, w) -> one VisualTokens of grid (T, h, w), in order."""
    first = units[0]
    _, h, w = first.grid
    t = len(units)
    positions = VisualTokens.grid_positions(t, h, w, device=first.features.device)
    if t == 1:
        return VisualTokens(features=first.features, thw=positions, grid=(1, h, w),
                            signals=dict(first.signals), frame_signals=dict(first.frame_signals))
    return VisualTokens(
        features=torch.cat([u.features for u in units]),
        thw=positions,
        grid=(t, h, w),
        signals={k: torch.cat([u.signals[k] for u in units]) for k in first.signals},
        frame_signals={k: torch.cat([u.frame_signals[k] for u in units]) for k in first.frame_signals},
    )


def _layout(unit: VisualTokens) -> tuple:
    """What units must share to be joined: the (h, w) grid and the signals they carry."""
    return unit.grid[1:], sorted(unit.signals), sorted(unit.frame_signals)


class OnlineSegmenter:
    """Groups a stream's units into the segments a recipe prunes as clips (see module doc).

    recipe:    a `PruningRecipe`; the rule is the first of its pre-LLM methods' `online_cuts()`
               that is not None; without one every unit closes at once.
    max_units: the longest segment, in units (>= 1).
    """

    def __init__(self, recipe: Any, max_units: int = 16) -> None:
        if max_units < 1:
            raise ConfigError(f"max_units must be >= 1, got {max_units}")
        self.max_units = max_units
        rules = (m.online_cuts() for m in recipe.pre_llm)
        self.rule: OnlineCutRule | None = next((r for r in rules if r is not None), None)
        self.closed = 0  # segments closed so far
        self._units: list[VisualTokens] = []
        self._meta: list[Any] = []

    @property
    def open_units(self) -> int:
        """Units in the open segment (waiting for it to close)."""
        return len(self._units)

    def push(self, unit: VisualTokens, meta: Any) -> list[ClosedSegment]:
        """Add one unit (grid (1, h, w)) with the caller's `meta`; returns the segments that closed
        because of it, in stream order (often none, possibly several)."""
        if unit.grid[0] != 1:
            raise InputError(f"a stream unit has grid (1, h, w), got {unit.grid}")
        closed = []
        if self._units and _layout(unit) != _layout(self._units[0]):
            closed.append(self._close(len(self._units), "grid"))
        self._units.append(unit)
        self._meta.append(meta)
        if self.rule is None:
            closed.append(self._close(1, "unit"))
            return closed
        for length in self.rule.split(join_units(self._units)):
            closed.append(self._close(length, "cut"))
        if len(self._units) >= self.max_units:
            closed.append(self._close(len(self._units), "max_length"))
        return closed

    def flush(self) -> list[ClosedSegment]:
        """End of stream: the open segment (if any) closes."""
        return [self._close(len(self._units), "flush")] if self._units else []

    def _close(self, length: int, reason: str) -> ClosedSegment:
        """The first `length` open units as a closed segment."""
        if not 1 <= length <= len(self._units):
            raise AssertionError(f"cut of {length} units in an open segment of {len(self._units)}")
        segment = ClosedSegment(tokens=join_units(self._units[:length]), units=self._meta[:length], reason=reason)
        del self._units[:length], self._meta[:length]
        self.closed += 1
        return segment

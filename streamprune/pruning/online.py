"""Where a temporal method cuts a stream that arrives one unit at a time.

FastVID and HoliTom segment a clip in time before they prune it; in a live stream the clip is not
there yet. A method that has a temporal rule returns an `OnlineCutRule` from
`PruningMethod.online_cuts()`; the runtime's `OnlineSegmenter` (runtime/segmenter.py) keeps the
open segment, asks the rule after each unit which leading part of it is complete, and hands each
complete segment to the recipe as one clip. Frame-level methods have no rule (None): every unit
is its own segment.

The rules are pure functions of the open buffer (no state of their own): the segmenter drops the
units it closes, so asking again about the rest gives the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from streamprune.errors import ConfigError
from streamprune.types import VisualTokens


class OnlineCutRule(Protocol):
    """A method's temporal segmentation, asked after every unit."""

    def split(self, buffer: VisualTokens) -> list[int]:
        """buffer: the open segment, grid (L, h, w), one row of `frame_signals` per unit, the newest
        unit last. Returns the lengths (in units, in order) of the complete segments at its front;
        the `L - sum(lengths)` units after them stay open. `[]`: nothing is complete yet."""
        ...


@dataclass(frozen=True)
class DySegThresholdCuts:
    """FastVID's DySeg (Shen et al., NeurIPS 2025), online: a unit whose global feature has cosine
    < tau with the previous unit's closes the open segment before it.

    The features and the similarity are the offline DySeg's own (`fastvid.global_features`:
    `frame_features` where the adapter provides it, else the mean of the unit's tokens;
    `fastvid.frame_similarity`), so on any buffer this cuts where `dyseg(..., c=1, tau)` does.

    Deviation, declared: DySeg's c - 1 forced cuts rank the similarities of a whole clip, which a
    stream never has; online segmentation is the c = 1 threshold cuts plus the segmenter's maximum
    length. (The closed segment is then pruned by the method's own `select`, whose DySeg still
    applies its c - 1 forced cuts inside the segment.)
    """

    tau: float

    def split(self, buffer: VisualTokens) -> list[int]:
        # the method's module imports this one to build its rule, so its maths is imported here
        from streamprune.pruning.fastvid import (
            frame_similarity,
            global_features,
            segments_from_cuts,
        )

        if buffer.grid[0] < 2:
            return []
        sim = frame_similarity(global_features(buffer, buffer.frames().float()))  # [L-1]
        segments = segments_from_cuts((sim < self.tau).tolist())  # one host copy of L-1 flags
        return [end - start for start, end in segments[:-1]]


@dataclass(frozen=True)
class HoliTomWindowCuts:
    """HoliTom's DP temporal windows (Shao et al., NeurIPS 2025), online: after each unit the DP
    (`holitom.holitom_segments`, static threshold tau, windows of at most max_window units) runs
    on the open buffer; when it yields two or more windows, all but the last are complete (the
    last may still grow).

    Deviation, declared: the DP maximises the static tokens saved over the open buffer, not over
    the whole clip, and a window closed early is never revised by later units (the offline DP
    could still move its end). The segmenter's maximum length bounds every window as well.
    """

    tau: float
    max_window: int

    def __post_init__(self) -> None:
        if self.max_window < 1:
            raise ConfigError(f"max_window must be >= 1, got {self.max_window}")

    def split(self, buffer: VisualTokens) -> list[int]:
        # the method's module imports this one to build its rule, so its maths is imported here
        from streamprune.pruning.holitom import holitom_segments

        if buffer.grid[0] < 2:
            return []
        windows = holitom_segments(buffer.frames(), self.tau, self.max_window)  # inclusive (a, b)
        return [b - a + 1 for a, b in windows[:-1]]

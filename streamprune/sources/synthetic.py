"""A procedurally generated stream for soak tests and benchmarks: shapes sliding over a gradient.

Frame i is a pure function of (seed, i): shapes move at constant velocity and bounce off the
borders, and every `scene_every` frames the background, shapes and motions are redrawn (a scene
cut), so temporal-redundancy methods see both long static stretches and hard cuts. Rendering is
a few numpy slices per frame, far faster than real time at common sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np

from streamprune.errors import InputError
from streamprune.sources.base import FrameSource, Pacer
from streamprune.types import Frame


@dataclass
class SyntheticConfig:
    """`synthetic:` options, written `synthetic:width=320,height=240,scene_every=90`.

    frames: frames per pass (0 = endless). scene_every: frames per scene (0 = one scene).
    noise: amplitude of per-pixel uniform noise (0 = clean; >0 makes no two frames identical).
    """

    width: int = 320
    height: int = 240
    fps: float = 30.0
    frames: int = 0
    scene_every: int = 0
    shapes: int = 4
    seed: int = 0
    noise: int = 0

    @classmethod
    def parse(cls, options: str) -> SyntheticConfig:
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, int | float] = {}
        for item in filter(None, options.split(",")):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in kinds:
                raise InputError(f"synthetic option {item!r} is not one of {', '.join(f'{k}=' for k in kinds)}")
            try:
                values[key] = float(raw) if kinds[key] == "float" else int(raw)
            except ValueError:
                raise InputError(f"synthetic option {key} needs a number, got {raw!r}") from None
        cfg = cls(**values)
        if cfg.width < 8 or cfg.height < 8 or cfg.fps <= 0 or min(cfg.frames, cfg.scene_every, cfg.shapes, cfg.noise) < 0:
            raise InputError(f"synthetic options out of range: {cfg}")
        return cfg


class _Scene:
    """Background and shape trajectories of one scene, drawn from rng(seed, scene)."""

    def __init__(self, cfg: SyntheticConfig, scene: int) -> None:
        rng = np.random.default_rng([cfg.seed, scene])
        h, w = cfg.height, cfg.width
        top, bottom = rng.integers(0, 256, (2, 3))
        ramp = np.linspace(0.0, 1.0, h)[:, None]
        self.background = np.broadcast_to((top + (bottom - top) * ramp).astype(np.uint8)[:, None, :], (h, w, 3)).copy()
        self.shapes = []
        for _ in range(cfg.shapes):
            sh = int(rng.integers(max(2, h // 8), max(3, h // 3)))
            sw = int(rng.integers(max(2, w // 8), max(3, w // 3)))
            start = rng.uniform(0, 1, 2) * (h - sh, w - sw)
            speed = rng.uniform(-1, 1, 2) * 0.02 * (h, w)  # up to 2% of the frame per frame
            color = rng.integers(0, 256, 3).astype(np.uint8)
            round_ = bool(rng.integers(0, 2))
            mask = None
            if round_:
                yy, xx = np.ogrid[:sh, :sw]
                mask = ((yy - (sh - 1) / 2) / (sh / 2)) ** 2 + ((xx - (sw - 1) / 2) / (sw / 2)) ** 2 <= 1.0
            self.shapes.append((sh, sw, start, speed, color, mask))

    def render(self, local: int) -> np.ndarray:
        img = self.background.copy()
        h, w = img.shape[:2]
        for sh, sw, start, speed, color, mask in self.shapes:
            y, x = (_bounce(start[0] + speed[0] * local, h - sh), _bounce(start[1] + speed[1] * local, w - sw))
            patch = img[y : y + sh, x : x + sw]
            if mask is None:
                patch[:] = color
            else:
                patch[mask] = color
        return img


def _bounce(p: float, span: int) -> int:
    """Position p folded into [0, span] as if reflecting off both ends."""
    if span <= 0:
        return 0
    p = abs(p) % (2 * span)
    return int(2 * span - p if p > span else p)


class SyntheticSource(FrameSource):
    """Deterministic moving-shapes stream; `loop` repeats a finite one with rising timestamps."""

    def __init__(self, cfg: SyntheticConfig, *, loop: bool = False, realtime: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.loop = loop
        self.realtime = realtime
        self._scene: _Scene | None = None
        self._scene_id = -1

    def frame(self, i: int) -> np.ndarray:
        """Image `[H, W, 3]` uint8 of frame i of a pass."""
        cfg = self.cfg
        scene = i // cfg.scene_every if cfg.scene_every else 0
        if self._scene is None or self._scene_id != scene:
            self._scene, self._scene_id = _Scene(cfg, scene), scene
        img = self._scene.render(i - scene * cfg.scene_every if cfg.scene_every else i)
        if cfg.noise:
            rng = np.random.default_rng([cfg.seed, i, 1])
            img = np.clip(img.astype(np.int16) + rng.integers(-cfg.noise, cfg.noise + 1, img.shape), 0, 255).astype(np.uint8)
        return img

    def _frames(self) -> Iterator[Frame]:
        pacer = Pacer(self._stop) if self.realtime else None
        n, index = self.cfg.frames, 0
        while True:
            i = 0
            while not n or i < n:
                ts = index / self.cfg.fps
                image = self.frame(i)
                if pacer is not None and not pacer.wait(ts):
                    return
                yield Frame(image=image, timestamp=ts, index=index)
                i += 1
                index += 1
            if not self.loop:
                return

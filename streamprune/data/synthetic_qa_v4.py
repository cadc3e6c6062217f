"""Synthetic video QA, data version 4: the redundancy of real video around the same questions.

Version 3 (synthetic_qa.py) draws 8 frames of 64 px on black: 16 visual tokens a frame, nearly all
of them background that never changes, which no pruning method can tell from an object. Version 4
keeps its objects, rules and questions and puts them in footage shaped like video:

- 16 frames of 128 px: 64 tokens a frame for the default model (patch 8, 2x2 pooling);
- a static, textured background (value noise in three octaves, muted colours) that in half the
  clips pans slowly (0.3-1.5 px a frame) and in 25% cuts once to another texture;
- two to four small objects (16-28 px: one to four tokens) that appear one after another, move,
  may change colour once and may leave, exactly as in version 3 at twice the size and speed;
- in half the clips a grey textured distractor that drifts across (never an answer, never counted);
- sensor noise (sigma 2 grey levels, fresh each frame) on everything but the objects;
- in 40% of the clips one more object shown for only 2-3 frames, asked about by `brief_colour`:
  a short event in a long clip, which uniform frame or token dropping misses.

Backgrounds and distractors are kept below 200 in every channel and close to grey, so no pixel of
theirs equals a palette colour: every answer stays recomputable from the pixels (the tests do it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamprune.data import synthetic_qa as v3
from streamprune.data.synthetic_qa import COLOURS, PALETTE, SceneObject, SyntheticClip, Timing, shape_mask

DATA_VERSION = "4"
NUM_FRAMES = 16
SIZE = 128
SIDES = (16, 28)
MIN_TRAVEL = 40.0
SPEED_SCALE = 2.0  # version 3's speeds were set for 64 px
BRIEF_QUESTION = "what colour was the object seen only briefly ?"
QUESTION_TYPES = v3.QUESTION_TYPES + ("brief_colour",)
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(v3.VOCAB + tuple(BRIEF_QUESTION.split())))
ANSWERS = v3.ANSWERS


@dataclass
class Scene:
    """What a v4 clip shows besides its objects (ground truth of the background and the distractor)."""

    pan: tuple[float, float] = (0.0, 0.0)  # background pixels a frame
    cut: int | None = None  # first frame of the second background
    distractor: dict | None = None  # size, start (x, y), velocity, rgb
    brief: str | None = None  # colour of the object seen only briefly

    def as_dict(self) -> dict:
        return {"pan": list(self.pan), "cut": self.cut, "distractor": self.distractor, "brief": self.brief}


@dataclass
class ClipV4(SyntheticClip):
    scene: Scene = field(default_factory=Scene)


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """`[height, width, 3]` uint8: value noise in three octaves on a muted tint, every channel in
    [16, 190] and within 50 of the others (never a palette colour)."""
    out = np.zeros((height, width), np.float64)
    for cells, amplitude in ((4, 22.0), (12, 12.0), (40, 6.0)):
        grid = rng.uniform(-1, 1, size=(cells + 2, cells + 2))
        ys, xs = np.linspace(0, cells, height), np.linspace(0, cells, width)
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep between lattice points
        top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
        bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
        out += amplitude * (top * (1 - fy) + bottom * fy)
    base = rng.uniform(60, 130)
    tint = rng.uniform(-18, 18, size=3)
    rgb = base + tint[None, None, :] + out[:, :, None]
    return np.clip(rgb, 16, 190).round().astype(np.uint8)


def _backgrounds(rng: np.random.Generator, num_frames: int, size: int, scene: Scene) -> np.ndarray:
    """`[T, size, size, 3]`: a window onto one texture (or two, after the cut), moving by the pan."""
    extent = size + int(np.ceil(max(abs(scene.pan[0]), abs(scene.pan[1])) * num_frames)) + 2
    textures = [texture(rng, extent, extent), texture(rng, extent, extent)]
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    sx = 0.0 if scene.pan[0] >= 0 else extent - size - 1.0
    sy = 0.0 if scene.pan[1] >= 0 else extent - size - 1.0
    for t in range(num_frames):
        tex = textures[1 if scene.cut is not None and t >= scene.cut else 0]
        x, y = int(round(sx + scene.pan[0] * t)), int(round(sy + scene.pan[1] * t))
        frames[t] = tex[y:y + size, x:x + size]
    return frames


def _clear_of(box_at, objects: list[SceneObject], num_frames: int) -> bool:
    """`box_at(t)` (x0, y0, x1, y1) keeps a margin from every object in every frame it is drawn."""
    for obj in objects:
        for t in range(max(0, obj.appear - 2), min(num_frames, obj.disappear + 2)):
            ax0, ay0, ax1, ay1 = box_at(t)
            bx0, by0, bx1, by1 = obj.box(min(max(t, obj.appear), obj.disappear - 1))
            if ax0 <= bx1 + v3.MARGIN and bx0 <= ax1 + v3.MARGIN and ay0 <= by1 + v3.MARGIN and by0 <= ay1 + v3.MARGIN:
                return False
    return True


def _brief_object(rng: np.random.Generator, colour: str, objects: list[SceneObject], num_frames: int,
                  size: int) -> SceneObject | None:
    """An object shown for 2-3 frames, still, clear of the others, appearing at a frame no other
    object appears within 2 frames of (so first / last stay unambiguous)."""
    taken = {o.appear for o in objects}
    for _ in range(100):
        visible = int(rng.integers(2, 4))
        appear = int(rng.integers(1, num_frames - visible))
        if any(abs(appear - a) < 2 for a in taken):
            continue
        side = int(rng.integers(SIDES[0], SIDES[1] + 1))
        centre = tuple(float(rng.uniform(side / 2 + 1, size - side / 2 - 1)) for _ in range(2))
        shape = v3.SHAPES[int(rng.integers(len(v3.SHAPES)))]
        if sum(o.shape == shape for o in objects) >= len(v3.NUMBERS) - 1:
            continue  # "how many" answers stop at four
        obj = SceneObject(colour, shape, side, appear, appear + visible, centre, (0.0, 0.0), "none")
        if all(v3._boxes_clear(obj, other, 2) for other in objects):
            return obj
    return None


def _distractor(rng: np.random.Generator, objects: list[SceneObject], num_frames: int, size: int) -> dict | None:
    """A grey disc drifting across the whole clip, clear of every object."""
    for _ in range(100):
        side = int(rng.integers(24, 37))
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(1.0, 3.0)
        velocity = (speed * np.cos(angle), speed * np.sin(angle))
        start = tuple(float(rng.uniform(side / 2 + 1, size - side / 2 - 1)) for _ in range(2))

        def box(t: int, start=start, velocity=velocity, side=side) -> tuple[int, int, int, int]:
            cx, cy = start[0] + velocity[0] * t, start[1] + velocity[1] * t
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            return x0, y0, x0 + side - 1, y0 + side - 1

        inside = all(box(t)[0] >= 0 and box(t)[1] >= 0 and box(t)[2] < size and box(t)[3] < size
                     for t in range(num_frames))
        if inside and _clear_of(box, objects, num_frames):
            grey = float(rng.uniform(70, 170))
            rgb = [int(round(grey + d)) for d in rng.uniform(-12, 12, size=3)]
            return {"size": side, "start": list(start), "velocity": list(velocity), "rgb": rgb}
    return None


NOISE_SIGMA = 2.0  # sensor noise on the background and distractor, grey levels (objects stay exact colours)


def render(objects: list[SceneObject], scene: Scene, backgrounds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Background, then the distractor (dappled by the background's own texture), sensor noise,
    then the objects."""
    frames = backgrounds.copy()
    num_frames, size = frames.shape[0], frames.shape[1]
    if scene.distractor is not None:
        d = scene.distractor
        stamp = shape_mask("circle", d["size"])
        for t in range(num_frames):
            cx, cy = d["start"][0] + d["velocity"][0] * t, d["start"][1] + d["velocity"][1] * t
            x0, y0 = int(round(cx - d["size"] / 2)), int(round(cy - d["size"] / 2))
            region = frames[t, y0:y0 + d["size"], x0:x0 + d["size"]]
            shade = (region.astype(np.int16) - region.mean()) // 3  # texture shows through
            region[stamp] = np.clip(np.array(d["rgb"]) + shade[stamp], 16, 190).astype(np.uint8)
    noise = rng.normal(0.0, NOISE_SIGMA, size=frames.shape)
    frames = np.clip(frames + noise, 16, 190).round().astype(np.uint8)
    for obj in objects:
        stamp = shape_mask(obj.shape, obj.size)
        for t in range(obj.appear, min(obj.disappear, num_frames)):
            x0, y0, _, _ = obj.box(t)
            frames[t, y0:y0 + obj.size, x0:x0 + obj.size][stamp] = PALETTE[obj.colour_at(t)]
    return frames


def generate_clip(seed: int, num_frames: int = NUM_FRAMES, size: int = SIZE) -> ClipV4:
    """The v4 clip of `seed`: same seed, same bytes."""
    rng = np.random.default_rng([seed, 4])
    objects = v3._sample_scene(rng, num_frames, size, sides=SIDES, min_travel=MIN_TRAVEL, speed_scale=SPEED_SCALE)
    scene = Scene()
    used = {o.colour for o in objects} | {o.new_colour for o in objects if o.new_colour}
    if rng.random() < 0.4:
        free = [c for c in COLOURS if c not in used]
        brief = _brief_object(rng, free[int(rng.integers(len(free)))], objects, num_frames, size) if free else None
        if brief is not None:
            objects.append(brief)
            scene.brief = brief.colour
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.3, 1.5)
        scene.pan = (float(speed * np.cos(angle)), float(speed * np.sin(angle)))
    if rng.random() < 0.25:
        scene.cut = int(rng.integers(4, num_frames - 3))
    if rng.random() < 0.5:
        scene.distractor = _distractor(rng, objects, num_frames, size)
    frames = render(objects, scene, _backgrounds(rng, num_frames, size, scene), rng)
    questions = v3._questions(objects)  # the brief object counts among first / last / how many
    if scene.brief is not None:  # ... but it does not move, and is asked about by when it was seen
        questions = [q for q in questions if scene.brief not in q[1].split()]
        questions.append(("brief_colour", BRIEF_QUESTION, scene.brief))
    return ClipV4(seed, frames, objects, questions, scene)

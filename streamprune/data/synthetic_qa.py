"""Synthetic video question answering: moving coloured shapes, one-word answers that need where and when.

Each clip is `NUM_FRAMES` (8; any length >= 8) frames of `SIZE`x`SIZE` RGB on black. Two to four
objects (three at most at 8 frames; distinct colours, shape square/circle/triangle, side 16-20 px)
appear one after another (at least 2 frames apart at 8 frames, 3 at 16), move in a straight line
along one axis, may disappear before the end, and one of them may change colour once. Objects never touch, so every answer can be recomputed from the pixels.

Questions (one word answers, vocabulary in `VOCAB`); a clip supports 9-15 of them:
  last_colour  what colour is the object that appeared last ?          -> colour
  first_colour what colour is the object that appeared first ?         -> colour
  first_shape  which shape appeared first ?                              -> shape
  last_shape   which shape appeared last ?                               -> shape
  direction    which way did the {colour} {shape} move ?                 -> left/right/up/down
  shape_of     what shape is the {colour} object ?                       -> shape
  count        how many {shape} objects were seen ?                      -> zero..four
  change       what colour did the {colour} {shape} change to ?          -> colour

A clip is a pure function of its seed; the splits use disjoint seed ranges (`SPLITS`), so the
test clips are never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamprune.errors import ConfigError

DATA_VERSION = "3"  # 3: sides 16-20 px and >= 20 px of travel (2: 12-16 px, >= 12 px)
NUM_FRAMES = 8  # what the default model was trained on; 16 (the original design) also works
SIZE = 64
MARGIN = 2  # pixels kept free between any two objects
SIDES = (16, 20)  # inclusive range of an object's side in pixels: two to three 8 px patches
MIN_TRAVEL = 20.0  # pixels an object moves over its visible frames, more than a pooled token's shift

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 240),
    "yellow": (240, 220, 30),
    "white": (235, 235, 235),
    "purple": (170, 40, 200),
}
COLOURS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("last_colour", "first_colour", "first_shape", "last_shape", "direction", "shape_of", "count", "change")
_DIR_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows down

# Disjoint seed ranges; clip i of a split has seed start + i.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000),
    "val": (1_000_000, 1_100_000),
    "test": (2_000_000, 2_100_000),
}

_TEMPLATE_WORDS = (
    "what colour is the object that appeared last ? which shape first way did move "
    "how many objects were seen change to"
).split()
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(_TEMPLATE_WORDS + list(COLOURS + SHAPES + DIRECTIONS + NUMBERS)))
ANSWERS: tuple[str, ...] = COLOURS + SHAPES + DIRECTIONS + NUMBERS


@dataclass
class QAItem:
    """One question about one clip. `clip` is `[T, H, W, 3]` uint8; `answer` is a single word."""

    clip: np.ndarray
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass
class SceneObject:
    """Ground truth of one object: visible in frames [appear, disappear), centre moves linearly."""

    colour: str
    shape: str
    size: int
    appear: int
    disappear: int
    start: tuple[float, float]  # (x, y) centre at `appear`
    velocity: tuple[float, float]  # (dx, dy) pixels per frame
    direction: str
    change_frame: int | None = None  # first frame drawn in `new_colour`
    new_colour: str | None = None

    def centre(self, t: int) -> tuple[float, float]:
        k = t - self.appear
        return self.start[0] + k * self.velocity[0], self.start[1] + k * self.velocity[1]

    def colour_at(self, t: int) -> str:
        if self.change_frame is not None and t >= self.change_frame:
            return self.new_colour  # type: ignore[return-value]
        return self.colour

    def visible(self, t: int) -> bool:
        return self.appear <= t < self.disappear

    def box(self, t: int) -> tuple[int, int, int, int]:
        """Inclusive pixel bounds (x0, y0, x1, y1) of the drawn shape at frame t."""
        cx, cy = self.centre(t)
        x0, y0 = int(round(cx - self.size / 2)), int(round(cy - self.size / 2))
        return x0, y0, x0 + self.size - 1, y0 + self.size - 1

    def as_dict(self) -> dict:
        return {
            "colour": self.colour, "shape": self.shape, "size": self.size,
            "appear": self.appear, "disappear": self.disappear,
            "start": list(self.start), "velocity": list(self.velocity), "direction": self.direction,
            "change_frame": self.change_frame, "new_colour": self.new_colour,
        }


@dataclass
class SyntheticClip:
    """A rendered clip with its objects and every question it supports."""

    seed: int
    frames: np.ndarray  # [T, H, W, 3] uint8
    objects: list[SceneObject]
    questions: list[tuple[str, str, str]]  # (type, question, answer)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """`[size, size]` bool stamp: full square, inscribed disc, or upward triangle (apex on top)."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        half_width = (yy + 1) / size * (size / 2)  # grows from the apex row to the base row
        return np.abs(xx - c) <= half_width
    raise ConfigError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: list[SceneObject], num_frames: int = NUM_FRAMES, size: int = SIZE) -> np.ndarray:
    """Draw the objects: `[T, H, W, 3]` uint8, black background, no anti-aliasing."""
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    for obj in objects:
        stamp = shape_mask(obj.shape, obj.size)
        for t in range(obj.appear, min(obj.disappear, num_frames)):
            x0, y0, _, _ = obj.box(t)
            region = frames[t, y0:y0 + obj.size, x0:x0 + obj.size]
            region[stamp] = PALETTE[obj.colour_at(t)]
    return frames


@dataclass(frozen=True)
class Timing:
    """Event timing for a clip length, scaled from the 16-frame design (3, 7, 3 frames; 3 px/frame)."""

    min_gap: int  # frames between two appearances
    min_visible: int  # frames an object stays on screen
    handover: int  # frames before an appearance / after a disappearance that also keep the margin
    max_speed: float  # pixels per frame
    min_speed: float

    @classmethod
    def for_frames(cls, num_frames: int) -> "Timing":
        scale = num_frames / 16
        return cls(max(1, round(3 * scale)), max(4, round(7 * scale)), max(2, round(3 * scale)),
                   3.0 / scale, 1.5 / scale)

    def max_objects(self, num_frames: int) -> int:
        return min(4, 1 + (num_frames - self.min_visible) // self.min_gap)


def _boxes_clear(a: SceneObject, b: SceneObject, handover: int) -> bool:
    """No contact while both are visible, and none with where the other just was or soon will be
    (within `handover` frames), so an exit next to an entry never looks like one object changing."""
    for t in range(max(a.appear, b.appear) - handover, min(a.disappear, b.disappear) + handover):
        ax0, ay0, ax1, ay1 = a.box(min(max(t, a.appear), a.disappear - 1))
        bx0, by0, bx1, by1 = b.box(min(max(t, b.appear), b.disappear - 1))
        if ax0 <= bx1 + MARGIN and bx0 <= ax1 + MARGIN and ay0 <= by1 + MARGIN and by0 <= ay1 + MARGIN:
            return False
    return True


def _sample_object(rng: np.random.Generator, colour: str, appear: int, num_frames: int, size: int,
                   timing: Timing, sides: tuple[int, int] = SIDES, min_travel: float = MIN_TRAVEL,
                   speed_scale: float = 1.0) -> SceneObject:
    side = int(rng.integers(sides[0], sides[1] + 1))
    disappear = num_frames if rng.random() < 0.5 else int(rng.integers(appear + timing.min_visible, num_frames + 1))
    steps = disappear - 1 - appear
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    slowest = max(timing.min_speed * speed_scale, min_travel / steps)  # short visits move faster
    speed = float(rng.uniform(slowest, max(slowest, min(timing.max_speed * speed_scale, (size - side - 4) / steps))))
    dx, dy = _DIR_STEP[direction]
    lo, hi = side / 2 + 1, size - side / 2 - 1  # centre range that keeps the shape inside the frame
    travel = speed * steps
    def start_range(d: int) -> tuple[float, float]:
        return (lo, hi - travel) if d > 0 else (lo + travel, hi) if d < 0 else (lo, hi)
    sx, sy = (float(rng.uniform(*start_range(d))) for d in (dx, dy))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return SceneObject(colour, shape, side, appear, disappear, (sx, sy), (dx * speed, dy * speed), direction)


def _sample_scene(rng: np.random.Generator, num_frames: int, size: int, **sizes: float) -> list[SceneObject]:
    """Two to four objects (`sizes`: `_sample_object`'s sides / min_travel / speed_scale)."""
    timing = Timing.for_frames(num_frames)
    n = int(rng.integers(2, timing.max_objects(num_frames) + 1))
    colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))]
    latest = num_frames - timing.min_visible
    while True:
        appears = np.sort(rng.choice(latest + 1, size=n, replace=False))
        if np.all(np.diff(appears) >= timing.min_gap):
            break
    for _ in range(200):
        objects: list[SceneObject] = []
        for i, a in enumerate(appears):
            for _ in range(50):
                obj = _sample_object(rng, colours[i], int(a), num_frames, size, timing, **sizes)
                if all(_boxes_clear(obj, other, timing.handover) for other in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == n:
            break
    else:  # pragma: no cover - the frame always has room for four objects
        raise RuntimeError("could not place objects without overlap")
    # One object (never the last to appear, so "last colour" stays unambiguous) may change colour.
    if rng.random() < 0.5:
        candidates = [o for o in objects[:-1] if o.disappear - o.appear >= timing.min_visible]
        if candidates:
            obj = candidates[int(rng.integers(len(candidates)))]
            keep = max(2, (timing.min_visible - 1) // 2)  # frames shown in each colour, at least
            obj.change_frame = int(rng.integers(obj.appear + keep, obj.disappear - keep + 1))
            obj.new_colour = colours[n]  # a colour no other object ever has
    order = rng.permutation(n)  # list order carries no hint of appearance order
    return [objects[i] for i in order]


def _questions(objects: list[SceneObject]) -> list[tuple[str, str, str]]:
    """Every question the clip supports, in a fixed order; objects that change colour are only
    asked about by their first colour in `change` questions."""
    by_appear = sorted(objects, key=lambda o: o.appear)
    first, last = by_appear[0], by_appear[-1]
    steady = sorted((o for o in objects if o.change_frame is None), key=lambda o: COLOURS.index(o.colour))
    qs = [
        ("last_colour", "what colour is the object that appeared last ?", last.colour),
        ("first_shape", "which shape appeared first ?", first.shape),
        ("last_shape", "which shape appeared last ?", last.shape),
    ]
    if first.change_frame is None:
        qs.append(("first_colour", "what colour is the object that appeared first ?", first.colour))
    for o in steady:
        qs.append(("direction", f"which way did the {o.colour} {o.shape} move ?", o.direction))
        qs.append(("shape_of", f"what shape is the {o.colour} object ?", o.shape))
    for shape in SHAPES:
        qs.append(("count", f"how many {shape} objects were seen ?", NUMBERS[sum(o.shape == shape for o in objects)]))
    for o in objects:
        if o.change_frame is not None:
            qs.append(("change", f"what colour did the {o.colour} {o.shape} change to ?", o.new_colour))
    return qs


def generate_clip(seed: int, num_frames: int = NUM_FRAMES, size: int = SIZE) -> SyntheticClip:
    """The clip of `seed`: same seed, same bytes."""
    if num_frames < 8 or size < 48:
        raise ConfigError(f"clips need >= 8 frames and >= 48 px, got {num_frames} frames of {size} px")
    rng = np.random.default_rng(seed)
    objects = _sample_scene(rng, num_frames, size)
    return SyntheticClip(seed, render(objects, num_frames, size), objects, _questions(objects))


def clip_seed(split: str, index: int) -> int:
    """Seed of clip `index` of `split`."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    start, stop = SPLITS[split]
    if not 0 <= index < stop - start:
        raise ConfigError(f"clip index {index} outside split {split!r} (size {stop - start})")
    return start + index


def make_items(split: str, num_clips: int, start: int = 0, types: tuple[str, ...] | None = None,
               per_clip: int | None = None, num_frames: int | None = None, version: str = DATA_VERSION) -> list[QAItem]:
    """The questions (of `types`, default all of the version's) of clips start..start+num_clips-1
    of `split`, as QAItems: all of them, or `per_clip` drawn at random (seeded by the clip) for a
    compact evaluation set. `version` "3" (this module) or "4" (synthetic_qa_v4, the video-like one);
    `num_frames` defaults to the version's clip length.

    Items of one clip share its frame array. meta: split, seed, type, objects (ground truth).
    """
    data = data_version(version)
    types = data.QUESTION_TYPES if types is None else types
    unknown = set(types) - set(data.QUESTION_TYPES)
    if unknown:
        raise ConfigError(f"unknown question types {sorted(unknown)}; expected some of {data.QUESTION_TYPES}")
    items = []
    for i in range(start, start + num_clips):
        clip = data.generate_clip(clip_seed(split, i), num_frames or data.NUM_FRAMES)
        objs = [o.as_dict() for o in clip.objects]
        questions = [q for q in clip.questions if q[0] in types]
        if per_clip is not None and len(questions) > per_clip:
            pick = np.random.default_rng([clip.seed, 1]).choice(len(questions), per_clip, replace=False)
            questions = [questions[k] for k in sorted(pick)]
        for qtype, question, answer in questions:
                meta = {"split": split, "seed": clip.seed, "type": qtype, "objects": objs, "version": version}
                items.append(QAItem(clip.frames, question, answer, meta))
    return items


def data_version(version: str):
    """The generator module of a data version: "3" (64 px on black) or "4" (video-like)."""
    if version == DATA_VERSION:
        import streamprune.data.synthetic_qa as module
    elif version == "4":
        import streamprune.data.synthetic_qa_v4 as module
    else:
        raise ConfigError(f"unknown data version {version!r}; expected 3 or 4")
    return module

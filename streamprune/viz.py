"""`streamprune viz`: draw which visual tokens a pruning method keeps, frame by frame.

Each frame is covered by its token grid (h x w cells). Both families resize the whole frame
without cropping (LLaVA-OV to a square, Qwen2.5-VL to multiples of 28 px), so a token cell maps
back to the original frame proportionally. Pruned cells are darkened by 65%; kept cells are
outlined in green, merged ones (features replaced by a merge) in magenta. A Qwen2.5-VL token
spans `temporal_patch_size` (2) consecutive frames, so both frames show it.

For a recipe with an inner-LLM stage (FastV, VLA-Pruner, HoliTom's inner merge) the prompt is
prefilled once and the inner stage's choice is captured, so the picture shows what survives the
LLM's pruning layer; that choice depends on `--question`.

Output: FILE.mp4 (one annotated frame per sampled frame, with a caption strip) or FILE.png (a
contact sheet of all frames under a title). Frames are upscaled so the smaller side is at least
MIN_SIDE px and cells stay visible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from streamprune.errors import ModelError
from streamprune.pruning.base import PruneContext, PruningMethod
from streamprune.pruning.recipe import PruningRecipe
from streamprune.types import Frame, Selection, VisualTokens

log = logging.getLogger(__name__)

KEPT_COLOUR = (0, 255, 0)
MERGED_COLOUR = (255, 0, 255)
DIM = 0.35  # a pruned cell keeps 35% of its brightness
MIN_SIDE = 256  # upscale frames until the smaller side is at least this (nearest neighbour)
CAPTION_PX = 20  # caption strip above each MP4 frame
TITLE_PX = 28  # title strip of the contact sheet
LABEL_PX = 16  # label strip under each contact-sheet tile
GAP_PX = 4
SHEET_MIN_WIDTH = 480
BACKGROUND = 24
OUTPUTS = (".mp4", ".png")
DEFAULT_QUESTION = "Describe the video."


@dataclass
class Highlight:
    """What to draw: the tokens of a clip and which of them reach the LLM's later layers.

    indices: `[K]` kept token indices into `tokens` (after every stage that ran).
    merged:  `[K]` bool, True where the kept token's features were replaced by a merge.
    stage:   where the shown selection was taken ("pre-LLM" or "after LLM layer K").
    """

    tokens: VisualTokens
    indices: torch.Tensor
    merged: torch.Tensor
    stage: str


@dataclass
class TokenMaps:
    """Per-frame token-grid state: kept `[F, h, w]` bool and merged `[F, h, w]` bool."""

    kept: np.ndarray
    merged: np.ndarray


def merged_rows(tokens: VisualTokens, selection: Selection) -> torch.Tensor:
    """`[K]` bool: kept tokens whose features differ from their anchor's own (i.e. were merged).
    A merge of identical tokens leaves the features unchanged and is not flagged."""
    if selection.features is None:
        return torch.zeros(len(selection), dtype=torch.bool)
    own = tokens.features[selection.indices].float()
    return (selection.features.float() != own).any(dim=1)


def token_maps(highlight: Highlight, n_frames: int, per_step: int) -> TokenMaps:
    """Scatter the kept/merged tokens onto each frame's `[h, w]` grid."""
    t_steps, h, w = highlight.tokens.grid
    if math.ceil(n_frames / per_step) != t_steps:
        raise ModelError(f"token grid has {t_steps} time steps for {n_frames} frames "
                         f"({per_step} frame(s) per step)")
    kept = np.zeros((t_steps, h, w), dtype=bool)
    merged = np.zeros((t_steps, h, w), dtype=bool)
    thw = highlight.tokens.thw[highlight.indices].numpy()
    kept[thw[:, 0], thw[:, 1], thw[:, 2]] = True
    m = thw[highlight.merged.numpy()]
    merged[m[:, 0], m[:, 1], m[:, 2]] = True
    step = np.arange(n_frames) // per_step
    return TokenMaps(kept=kept[step], merged=merged[step])


def cell_edges(size: int, cells: int) -> np.ndarray:
    """`[cells + 1]` pixel boundaries splitting `size` pixels proportionally into `cells`."""
    return np.round(np.arange(cells + 1) * size / cells).astype(int)


def upscale_factor(height: int, width: int) -> int:
    return max(1, math.ceil(MIN_SIDE / min(height, width)))


def border_px(rows: np.ndarray, cols: np.ndarray) -> int:
    """Outline thickness: about 1/12 of the smallest cell side, 1 to 3 px."""
    smallest = int(min(np.diff(rows).min(), np.diff(cols).min()))
    return max(1, min(3, smallest // 12))


def annotate(image: np.ndarray, kept: np.ndarray, merged: np.ndarray, scale: int = 1) -> np.ndarray:
    """Draw one frame's token grid: `[H, W, 3]` uint8 -> `[H*scale, W*scale, 3]` uint8 with
    pruned cells dimmed and kept cells (`kept` `[h, w]`) outlined, merged ones in MERGED_COLOUR."""
    big = image.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width = big.shape[:2]
    gh, gw = kept.shape
    rows, cols = cell_edges(height, gh), cell_edges(width, gw)
    cell_row = np.repeat(np.arange(gh), np.diff(rows))  # [H'] cell row of each pixel row
    cell_col = np.repeat(np.arange(gw), np.diff(cols))
    pixel_kept = kept[cell_row][:, cell_col]  # [H', W']
    out = big.copy()
    out[~pixel_kept] = (big[~pixel_kept].astype(np.float32) * DIM).round().astype(np.uint8)
    th = border_px(rows, cols)
    for r, c in np.argwhere(kept):
        colour = MERGED_COLOUR if merged[r, c] else KEPT_COLOUR
        y0, y1, x0, x1 = rows[r], rows[r + 1], cols[c], cols[c + 1]
        out[y0:y0 + th, x0:x1] = colour
        out[y1 - th:y1, x0:x1] = colour
        out[y0:y1, x0:x0 + th] = colour
        out[y0:y1, x1 - th:x1] = colour
    return out


def text_strip(text: str, width: int, height: int, fontsize: float | None = None) -> np.ndarray:
    """`[height, width, 3]` uint8 strip with `text` in white on the background (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=(BACKGROUND / 255,) * 3)
    canvas = FigureCanvasAgg(fig)
    fig.text(4 / width, 0.5, text, color="white", va="center", ha="left", family="monospace",
             fontsize=fontsize if fontsize is not None else height * 0.45)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    strip = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    h, w = min(height, rgb.shape[0]), min(width, rgb.shape[1])
    strip[:h, :w] = rgb[:h, :w]
    return strip


def sheet_layout(n: int, tile_h: int, tile_w: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Contact-sheet geometry: ((sheet_h, sheet_w), top-left (y, x) of each of the `n` tiles).
    Tiles fill a near-square grid row by row under the title; each has a label strip below it."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pitch_y, pitch_x = tile_h + LABEL_PX + GAP_PX, tile_w + GAP_PX
    size = (TITLE_PX + rows * pitch_y, max(SHEET_MIN_WIDTH, GAP_PX + cols * pitch_x))
    origins = [(TITLE_PX + (i // cols) * pitch_y, GAP_PX + (i % cols) * pitch_x) for i in range(n)]
    return size, origins


def contact_sheet(tiles: list[np.ndarray], labels: list[str], title: str) -> np.ndarray:
    """Tiles `[h, w, 3]` (all one size) with their labels under a title -> `[H, W, 3]` uint8."""
    tile_h, tile_w = tiles[0].shape[:2]
    (height, width), origins = sheet_layout(len(tiles), tile_h, tile_w)
    sheet = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    sheet[:TITLE_PX] = text_strip(title, width, TITLE_PX)
    for tile, label, (y, x) in zip(tiles, labels, origins):
        sheet[y:y + tile_h, x:x + tile_w] = tile
        sheet[y + tile_h:y + tile_h + LABEL_PX, x:x + tile_w] = text_strip(label, tile_w, LABEL_PX)
    return sheet


class _RecordingMethod:
    """Stands in for an inner-LLM method inside InnerStage and keeps what it saw and chose."""

    def __init__(self, method: PruningMethod) -> None:
        self.method = method
        self.requires = method.requires
        self.tokens: VisualTokens | None = None
        self.selection: Selection | None = None

    def __call__(self, tokens: VisualTokens, budget, ctx: PruneContext | None = None) -> Selection:
        self.tokens, self.selection = tokens, self.method(tokens, budget, ctx)
        return self.selection


@torch.inference_mode()
def select_tokens(adapter, frames: np.ndarray, recipe: PruningRecipe, fps: float,
                  ctx: PruneContext, question: str = DEFAULT_QUESTION) -> Highlight:
    """Encode `[T, H, W, 3]` frames and run the recipe's selection as `adapter.answer` does.
    With an inner-LLM stage, prefill `question` and compose that stage's choice in."""
    from streamprune.models.base import DynamicCache

    video = adapter.encode_for(frames, recipe, fps=fps)
    selection = recipe.select(video.tokens, ctx)
    merged = merged_rows(video.tokens, selection)
    if recipe.inner_llm is None:
        return Highlight(video.tokens, selection.indices, merged, "pre-LLM")
    layout = adapter.layout(video, adapter.prompt_ids(question))
    embeds, positions, kept_slots = layout.keep(selection)
    stage = adapter.inner_stage(recipe, video, selection, kept_slots, embeds, ctx)
    if stage.schedule is not None:  # a multi-layer stage (FrameFusion): its survivors after the last action
        adapter.forward_layers(embeds, positions, DynamicCache(), stage)
        survivors = stage.survivors.to(selection.indices.device)
        return Highlight(video.tokens, selection.indices[survivors], merged[survivors], "inside the LLM")
    recorder = _RecordingMethod(recipe.inner_llm)
    stage.method = recorder
    adapter.forward_layers(embeds, positions, DynamicCache(), stage)
    inner = recorder.selection
    indices = selection.indices[inner.indices]
    merged = merged[inner.indices] | merged_rows(recorder.tokens, inner)
    return Highlight(video.tokens, indices, merged, f"after LLM layer {stage.layer}")


def render(frames: list[Frame], highlight: Highlight, per_step: int) -> tuple[list[np.ndarray], TokenMaps]:
    """Annotated, upscaled frames `[H', W', 3]` (no text) and the per-frame token maps."""
    maps = token_maps(highlight, len(frames), per_step)
    height, width = frames[0].image.shape[:2]
    scale = upscale_factor(height, width)
    images = [annotate(f.image, maps.kept[i], maps.merged[i], scale) for i, f in enumerate(frames)]
    return images, maps


def budget_text(recipe: PruningRecipe) -> str:
    b = recipe.budget
    parts = [f"retain {b.retain:g}"] if b.retain is not None else []
    parts += [f"max {b.max_tokens} tokens"] if b.max_tokens is not None else []
    return ", ".join(parts) or "retain 1"

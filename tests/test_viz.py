"""`streamprune viz` draws exactly the tokens the pipeline keeps, on real encoded in/out files."""

from __future__ import annotations

import av
import matplotlib.image
import numpy as np
import pytest
import torch

from streamprune import viz
from streamprune.cliargs import parse_config
from streamprune.commands.viz import run as run_viz
from streamprune.config import VizConfig
from streamprune.decode import decode_frames
from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import build_recipe
from streamprune.videofile import write_video

QUESTION = "what happens ?"



def viz_args(*argv: str) -> VizConfig:
    return parse_config(VizConfig(), list(argv))


def expected_grids(adapter, frames, method, retain, per_step):
    """Per-frame kept / merged `[F, h, w]` grids, computed straight from the pipeline's selection."""
    recipe = build_recipe(method, retain=retain)
    clip = np.stack([f.image for f in frames])
    video = adapter.encode(clip, fps=4.0, signals=recipe.requires)
    selection = recipe.select(video.tokens, PruneContext(seed=0))
    t, h, w = video.tokens.grid
    kept = np.zeros((len(frames), h, w), dtype=bool)
    merged = np.zeros_like(kept)
    for k, index in enumerate(selection.indices.tolist()):
        step, row, col = video.tokens.thw[index].tolist()
        changed = (selection.features is not None
                   and not torch.equal(selection.features[k], video.tokens.features[index]))
        for frame in range(step * per_step, min(len(frames), (step + 1) * per_step)):
            kept[frame, row, col] = True
            merged[frame, row, col] = changed
    return kept, merged, len(selection)


def ring_is(tile: np.ndarray, rows, cols, r: int, c: int, colour) -> bool:
    """Whether the 1-px outer ring of cell (r, c) is entirely `colour`."""
    y0, y1, x0, x1 = rows[r], rows[r + 1] - 1, cols[c], cols[c + 1] - 1
    ring = np.concatenate([tile[y0, x0:x1 + 1], tile[y1, x0:x1 + 1], tile[y0:y1 + 1, x0], tile[y0:y1 + 1, x1]])
    return bool((ring == np.array(colour, dtype=np.uint8)).all())


def outlined_cells(tile: np.ndarray, grid_hw: tuple[int, int], colour) -> np.ndarray:
    rows, cols = viz.cell_edges(tile.shape[0], grid_hw[0]), viz.cell_edges(tile.shape[1], grid_hw[1])
    return np.array([[ring_is(tile, rows, cols, r, c, colour) for c in range(grid_hw[1])]
                     for r in range(grid_hw[0])])


def read_png(path) -> np.ndarray:
    return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.uint8)


def png_tiles(path, frames) -> list[np.ndarray]:
    sheet = read_png(path)
    height, width = frames[0].image.shape[:2]
    scale = viz.upscale_factor(height, width)
    tile_h, tile_w = height * scale, width * scale
    size, origins = viz.sheet_layout(len(frames), tile_h, tile_w)
    assert sheet.shape[:2] == size
    return [sheet[y:y + tile_h, x:x + tile_w] for y, x in origins]


def test_viz_png_outlines_each_frames_kept_and_merged_tokens(h264_video, tiny_model_dirs, tiny_adapters, tmp_path):
    out = tmp_path / "sheet.png"
    code = run_viz(viz_args(str(h264_video), "--method", "fastvid", "--retain", "0.25", "--out", str(out),
                                "--model", str(tiny_model_dirs["llava_onevision"]), "--fps", "4", "--max-frames", "4"))
    assert code == 0
    frames = decode_frames(h264_video, fps=4.0, max_frames=4)
    kept, merged, n_kept = expected_grids(tiny_adapters["llava_onevision"], frames, "fastvid", 0.25, per_step=1)
    assert merged.any() and (kept & ~merged).any()  # FastVID both keeps and merges: both colours are checked
    tiles = png_tiles(out, frames)
    drawn_kept = [outlined_cells(tile, kept.shape[1:], viz.KEPT_COLOUR) for tile in tiles]
    drawn_merged = [outlined_cells(tile, kept.shape[1:], viz.MERGED_COLOUR) for tile in tiles]
    for i in range(len(frames)):
        assert np.array_equal(drawn_kept[i], kept[i] & ~merged[i]), f"frame {i}"
        assert np.array_equal(drawn_merged[i], merged[i]), f"frame {i}"
    assert sum(int(k.sum()) + int(m.sum()) for k, m in zip(drawn_kept, drawn_merged)) == n_kept


def bright_clip(path, frames: int = 5, height: int = 84, width: int = 112):
    """Smooth, bright frames (values 110..250): a darkened cell is clearly darker after H.264."""
    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for i in range(frames):
        img = np.empty((height, width, 3), np.uint8)
        img[..., 0] = 110 + (xx * 140 // width + i * 10) % 140
        img[..., 1] = 110 + (yy * 140 // height) % 140
        img[..., 2] = 180
        images.append(img)
    return write_video(path, images, fps=4.0)


def test_viz_mp4_dims_pruned_cells_and_spans_qwen_frame_pairs(tiny_model_dirs, tiny_adapters, tmp_path):
    video = bright_clip(tmp_path / "bright.mp4")
    out = tmp_path / "viz.mp4"
    code = run_viz(viz_args(str(video), "--method", "divprune", "--retain", "0.5", "--out", str(out),
                                "--model", str(tiny_model_dirs["qwen2_5_vl"]), "--fps", "4"))
    assert code == 0
    frames = decode_frames(video, fps=4.0)
    assert len(frames) == 5
    kept, _, _ = expected_grids(tiny_adapters["qwen2_5_vl"], frames, "divprune", 0.5, per_step=2)
    assert np.array_equal(kept[0], kept[1]) and np.array_equal(kept[2], kept[3])  # one token, two frames
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == len(frames)
    scale = viz.upscale_factor(*frames[0].image.shape[:2])
    for i, (frame, rendered) in enumerate(zip(frames, decoded)):
        picture = rendered[viz.CAPTION_PX:].astype(np.float32)
        original = frame.image.repeat(scale, 0).repeat(scale, 1).astype(np.float32)
        assert picture.shape == original.shape
        rows = viz.cell_edges(picture.shape[0], kept.shape[1])
        cols = viz.cell_edges(picture.shape[1], kept.shape[2])
        lit = np.zeros(kept.shape[1:], dtype=bool)
        for r in range(kept.shape[1]):
            for c in range(kept.shape[2]):
                inner = np.s_[rows[r] + 6:rows[r + 1] - 6, cols[c] + 6:cols[c + 1] - 6]
                lit[r, c] = picture[inner].mean() / original[inner].mean() > 0.67
        assert np.array_equal(lit, kept[i]), f"frame {i}"


def test_viz_inner_llm_method_shows_what_survives_its_layer(h264_video, tiny_model_dirs, tiny_adapters, tmp_path):
    out = tmp_path / "fastv.png"
    code = run_viz(viz_args(str(h264_video), "--method", "fastv", "--retain", "0.25", "--out", str(out),
                                "--model", str(tiny_model_dirs["llava_onevision"]), "--fps", "4", "--max-frames",
                                "3", "--question", QUESTION))
    assert code == 0
    frames = decode_frames(h264_video, fps=4.0, max_frames=3)
    adapter = tiny_adapters["llava_onevision"]
    answer = adapter.answer(np.stack([f.image for f in frames]), QUESTION, build_recipe("fastv", retain=0.25),
                            PruneContext(seed=0), fps=4.0, max_new_tokens=1)
    grid = adapter.token_grid(len(frames))[1:]
    drawn = sum(int(outlined_cells(tile, grid, viz.KEPT_COLOUR).sum()) for tile in png_tiles(out, frames))
    assert drawn == answer.visual_tokens_kept == answer.visual_tokens_in // 4


def test_viz_unknown_output_extension_is_a_config_error(h264_video, tmp_path):
    out = tmp_path / "viz.gif"
    with pytest.raises(ConfigError, match=r"\.mp4.*\.png"):
        run_viz(viz_args(str(h264_video), "--method", "uniform", "--out", str(out)))
    assert not out.exists()


def test_viz_missing_video_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        run_viz(viz_args(str(tmp_path / "none.mp4"), "--method", "uniform", "--out", str(tmp_path / "a.png")))

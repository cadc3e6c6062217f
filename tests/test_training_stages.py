"""The default Video-LLM's training stages (pipelines/train_video_qa.py, train_video_perception.py):
their dense targets say what they claim, and each stage trains exactly the parts it names, on a
tiny real LLaVA-OneVision over data version 4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines import train_video_perception, train_video_qa
from streamprune.data import synthetic_qa_v4 as v4
from streamprune.data.synthetic_qa import clip_seed

TINY = ["--image-size", "64", "--patch-size", "8", "--vision-hidden", "16", "--vision-heads", "2",
        "--text-hidden", "32", "--text-intermediate", "64", "--text-heads", "2", "--text-kv-heads", "1",
        "--max-positions", "512"]


def _vision(name: str) -> bool:
    return "vision_tower" in name or "multi_modal_projector" in name


def test_rank_target_orders_objects_by_appearance():
    clip = next(c for c in (v4.generate_clip(clip_seed("train", i)) for i in range(50)) if len(c.objects) >= 3)
    *_, rank = train_video_qa.dense_labels(clip.objects, 16, 16, 128)
    owner_order = sorted(range(len(clip.objects)), key=lambda k: clip.objects[k].appear)
    for t in range(16):
        visible = [k for k in owner_order if clip.objects[k].appear <= t < clip.objects[k].disappear]
        seen = set(rank[t][rank[t] >= 0].tolist())
        assert seen <= {owner_order.index(k) for k in visible}  # a cell's rank is a visible object's
    first = clip.objects[owner_order[0]]
    assert (rank[first.appear] == 0).any()  # the first object is rank 0 where it shows


def test_cell_classes_mark_the_object_cells_with_shape_and_colour():
    clip = v4.generate_clip(clip_seed("train", 3))
    shape, colour = train_video_perception.cell_classes(clip.objects, 16, 8, 128)
    assert shape.shape == colour.shape == (16, 8, 8)
    assert ((shape > 0) == (colour > 0)).all() and (shape > 0).any()
    assert (shape == 0).mean() > 0.8  # mostly background, as the frames are


@pytest.fixture(scope="module")
def qa_stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "qa"
    train_video_qa.main(["--out", str(out), "--data-version", "4", "--steps", "2", "--batch-size", "2",
                         "--eval-every", "2", "--val-clips", "2", "--test-clips", "2", *TINY])
    return out


def test_perception_stage_trains_the_tower_and_leaves_the_decoder(qa_stage, tmp_path):
    out = tmp_path / "perception"
    train_video_perception.main(["--init-from", str(qa_stage), "--out", str(out), "--steps", "2",
                                 "--clips-per-step", "1", "--val-clips", "2", "--eval-every", "2"])
    before, after = load_file(qa_stage / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not _vision(k))
    assert any(not torch.equal(before[k], after[k]) for k in before if _vision(k))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["stage"] == "perception" and metrics["previous_stage"]["data_version"] == "4"
    shape_acc = metrics["history"][-1]["val_object_cells"]["shape"]
    assert 0.0 <= shape_acc <= 1.0


def test_frozen_vision_qa_stage_trains_the_decoder_only(qa_stage, tmp_path):
    out = tmp_path / "qa2"
    train_video_qa.main(["--out", str(out), "--data-version", "4", "--init-from", str(qa_stage), "--freeze-vision",
                         "--start-clip", "100", "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                         "--val-clips", "2", "--test-clips", "2", *TINY])
    before, after = load_file(qa_stage / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if _vision(k))
    assert any(not torch.equal(before[k], after[k]) for k in before if not _vision(k))
    assert np.isfinite(json.loads((out / "train_metrics.json").read_text())["history"][-1]["train_loss"])

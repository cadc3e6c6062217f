"""A perception stage for the default Video-LLM: train its vision tower and projector alone, frame by
frame, so that every visual token the decoder reads says which shape and colour of object it shows.

    python -m pipelines.train_video_perception --init-from DIR --out DIR2 --data-version 4 --steps 1500
    python -m pipelines.train_video_qa --init-from DIR2 --freeze-vision ...   # then the QA stage

Why: on data version 4 (16 frames of 128 px, objects of 16-28 px over textured backgrounds) the
question-answering stages left the tokens without shape: a linear probe read an object's colour
from the pooled tokens at 99% but its shape at 50% (chance is about 40%), and every shape question
(first / last shape, shape of, how many) stayed near chance. Here the targets are on the tokens
the decoder actually receives: the projector's output after LLaVA-OneVision's own 2x2 bilinear
pooling (`apply_pooling`), one shape class and one colour class per pooled cell (0 where no object
covers a quarter of the cell), plus the same per patch before pooling. The decoder, embeddings and
LM head are left as they are; the linear heads are thrown away. Reported: pooled-cell shape and
colour accuracy on object cells of validation clips (the probe's statistic).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

from pipelines.train_video_qa import dense_labels, lr_at
from streamprune.data import synthetic_qa as qa
from streamprune.models.preprocess import square_pixels

log = logging.getLogger("train_video_perception")


def cell_classes(objects: list[qa.SceneObject], num_frames: int, grid: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """`[T, grid, grid]` shape and colour class (0 = background) of the object covering most of each
    cell, where it covers at least a quarter of it: the QA stage's per-patch targets on any grid."""
    shape, colour, *_ = dense_labels(objects, num_frames, grid, side)
    return shape, colour


class TokenHeads(torch.nn.Module):
    """Linear shape and colour classifiers, one pair for pooled tokens and one for patches."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({f"{level}_{kind}": torch.nn.Linear(width, 1 + len(classes))
                                          for level in ("pooled", "patch")
                                          for kind, classes in (("shape", qa.SHAPES), ("colour", qa.COLOURS))})

    def forward(self, name: str, features: torch.Tensor) -> torch.Tensor:
        return self.heads[name](features)


def token_features(model: LlavaOnevisionForConditionalGeneration, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """pixels `[N, 3, S, S]` -> (patch features `[N, P, W]`, pooled tokens `[N, P/4, W]`), computed as
    `LlavaOnevisionModel.get_video_features` does (last encoder layer, projector, `apply_pooling`)."""
    inner = model.model
    hidden = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    patches = inner.multi_modal_projector(hidden)
    return patches, inner.apply_pooling(patches)


def clip_batch(data, split: str, start: int, count: int, grid: int,
               side: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clips start..start+count-1 of `split`: all their frames and per-cell / per-patch targets."""
    pixels, targets = [], {k: [] for k in ("pooled_shape", "pooled_colour", "patch_shape", "patch_colour")}
    for index in range(start, start + count):
        clip = data.generate_clip(qa.clip_seed(split, index))
        t = clip.frames.shape[0]
        pixels.append(square_pixels(clip.frames, side))
        for level, g in (("pooled", grid // 2), ("patch", grid)):
            shape, colour = cell_classes(clip.objects, t, g, clip.frames.shape[1])  # in the clip's pixels
            targets[f"{level}_shape"].append(torch.from_numpy(shape).reshape(t, -1))
            targets[f"{level}_colour"].append(torch.from_numpy(colour).reshape(t, -1))
    return torch.cat(pixels), {k: torch.cat(v) for k, v in targets.items()}


def losses(model, heads: TokenHeads, pixels: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    patches, pooled = token_features(model, pixels)
    feats = {"pooled": pooled, "patch": patches}
    return {name: F.cross_entropy(heads(name, feats[name.split("_")[0]]).flatten(0, 1), target.reshape(-1))
            for name, target in targets.items()}


@torch.no_grad()
def object_cell_accuracy(model, heads: TokenHeads, batches: list) -> dict[str, float]:
    """Pooled-token shape / colour accuracy over the cells an object covers."""
    hits = {"shape": [], "colour": []}
    for pixels, targets in batches:
        _, pooled = token_features(model, pixels)
        mask = targets["pooled_shape"] > 0
        for kind in hits:
            pred = heads(f"pooled_{kind}", pooled).argmax(-1)
            hits[kind].append((pred == targets[f"pooled_{kind}"])[mask].float())
    return {kind: float(torch.cat(v).mean()) if torch.cat(v).numel() else None for kind, v in hits.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, help="checkpoint whose vision tower and projector to train")
    p.add_argument("--out", required=True, help="directory to write the whole model to (decoder unchanged)")
    p.add_argument("--data-version", default="4", choices=("3", "4"), help="synthetic QA version of the frames")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (cosine schedule over these)")
    p.add_argument("--clips-per-step", type=int, default=4, help="clips per step (all their frames)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--start-clip", type=int, default=300_000, help="first train clip index (past the QA stages')")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation measurements")
    p.add_argument("--val-clips", type=int, default=20, help="validation clips (all their frames)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this long (0 = no limit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = qa.data_version(args.data_version)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.init_from)
    vision = model.config.vision_config
    grid, side = vision.image_size // vision.patch_size, vision.image_size
    trained = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    for name, param in model.named_parameters():
        param.requires_grad_("vision_tower" in name or "multi_modal_projector" in name)
    heads = TokenHeads(model.config.text_config.hidden_size)
    opt = torch.optim.AdamW([{"params": trained, "weight_decay": 0.01},
                             {"params": list(heads.parameters()), "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    val = [clip_batch(data, "val", i, min(4, args.val_clips - i), grid, side) for i in range(0, args.val_clips, 4)]
    model.train()
    t0, history, step = time.perf_counter(), [], 0
    bar = tqdm(range(args.steps), desc="perception", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        start = args.start_clip + step * args.clips_per_step
        parts = losses(model, heads, *clip_batch(data, "train", start, args.clips_per_step, grid, side))
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step == args.steps - 1
        out_of_time = args.max_minutes and time.perf_counter() - t0 > args.max_minutes * 60
        if (step + 1) % args.eval_every == 0 or last or out_of_time:
            model.eval()
            acc = object_cell_accuracy(model, heads, val)
            model.train()
            history.append({"step": step + 1, "minutes": (time.perf_counter() - t0) / 60, "loss": loss.item(),
                            "val_object_cells": acc})
            log.info("step %d loss %.3f val object cells: shape %s colour %s", step + 1, loss.item(),
                     *(f"{acc[k]:.3f}" if acc[k] is not None else "-" for k in ("shape", "colour")))
        if out_of_time:
            log.info("time budget of %.1f min reached at step %d", args.max_minutes, step + 1)
            break
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    source = Path(args.init_from)
    PreTrainedTokenizerFast.from_pretrained(source).save_pretrained(out)
    for name in ("streamprune.json",):
        if (source / name).is_file():
            (out / name).write_text((source / name).read_text())
    metrics = {"stage": "perception", "data_version": data.DATA_VERSION, "args": vars(args), "steps": step + 1,
               "train_clips_seen": (step + 1) * args.clips_per_step,
               "train_minutes": round((time.perf_counter() - t0) / 60, 2), "torch": torch.__version__,
               "history": history}
    if (source / "train_metrics.json").is_file():
        metrics["previous_stage"] = json.loads((source / "train_metrics.json").read_text())
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()

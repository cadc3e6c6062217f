"""Train the default Video-LLM: a small LLaVA-OneVision, from scratch, on synthetic video QA.

    python -m pipelines.train_video_qa --out DIR --data-version 4 --max-minutes 110
    # later stages, from the previous one's weights, on later train clips (each under 2 hours):
    python -m pipelines.train_video_qa --out DIR2 --init-from DIR --start-clip 21000 --data-version 4 ...

The model is the real `transformers.LlavaOnevisionForConditionalGeneration` (SigLIP vision tower,
2-layer MLP projector, 2x2 bilinear pooling, Qwen2 decoder) at a tiny size, with a word-level
tokenizer. Inputs are laid out exactly as the streamprune LLaVA-OneVision adapter lays them out at
inference: the data version's T frames (3: 8 of 64 px, 16 tokens each; 4: 16 of 128 px, 64 tokens
each) through `square_pixels` (SigLIP normalisation), ids = prefix + <video> x (T*tokens+1) + suffix
(the +1 is the image_newline the model appends after a video's frame tokens), and the answer word +
<eos> as the only labelled tokens. Clips come from
`streamprune.data.synthetic_qa` (train seeds only); validation picks the checkpoint, the test split
is scored once at the end. Writes safetensors weights, tokenizer, streamprune.json and
train_metrics.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

from streamprune.data import synthetic_qa as qa
from streamprune.models.preprocess import square_pixels
from streamprune.models.prompt import SIDECAR, build_prompt_ids
from streamprune.models.tiny import TinyLlavaSize, add_size_flags, build_llava_onevision, size_from_args, word_tokenizer

log = logging.getLogger("train_video_qa")

SPECIALS = ["<pad>", "<unk>", "<eos>", "<video>", "<image>"]
PROMPT_WORDS = ["question", ":", "answer"]
PROMPT_TEMPLATE = "<video> question : {question} answer :"
IGNORE = -100
MAX_OBJECTS = 5  # objects in a clip: up to four, plus version 4's brief one


# 64 px frames in 8 px patches -> 8x8 -> pooled 4x4 = 16 tokens. init_std 0.12: at this width 0.02
# left attention near-uniform for thousands of steps (the model learned the answer prior and
# stalled); patch_gain 3: shape questions stalled near chance while colour ones were solved, i.e.
# the tower's content features were too weak (see streamprune.models.small_init)
SIZE = TinyLlavaSize(image_size=64, patch_size=8, vision_hidden=64, vision_mlp_ratio=4, vision_heads=4,
                     text_hidden=128, text_intermediate=384, max_positions=1024, init_std=0.12, patch_gain=3.0)


# data version 4: 128 px frames (16x16 patches -> pooled 8x8 = 64 tokens a frame), 16 frames + text
SIZE_V4 = dataclasses.replace(SIZE, image_size=128, max_positions=1280)


def build_tokenizer(vocab: tuple[str, ...] = qa.VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the synthetic task's vocabulary."""
    return word_tokenizer(PROMPT_WORDS + [w for w in vocab if w not in PROMPT_WORDS], SPECIALS)


def build_model(tokenizer: PreTrainedTokenizerFast, size: TinyLlavaSize,
                seed: int) -> LlavaOnevisionForConditionalGeneration:
    """`init_std` is also written at the config's top level (the weights are the same without it),
    as in the committed checkpoint's config."""
    return build_llava_onevision(tokenizer, size, seed, checkpoint=True, initializer_range=size.init_std)


def collate(clips: list[tuple[np.ndarray, list[tuple[str, str]]]], tokenizer: PreTrainedTokenizerFast,
            size: TinyLlavaSize) -> dict[str, torch.Tensor]:
    """(frames `[T, H, W, 3]`, [(question, answer), ...][, objects]) per row -> model inputs: pixel_values_videos
    `[B, T, 3, S, S]`, input_ids/attention_mask/labels `[B, L]` (right padded).

    A row is the prompt of the first question followed, in training, by the clip's other questions
    ("... answer : red <eos> question : ... answer :"), so one pass over the video supervises every
    question of the clip. Only answer words and their <eos> are labelled."""
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    rows, labels = [], []
    for frames, pairs, *_ in clips:
        ids, lab = [], []
        for k, (question, answer) in enumerate(pairs):
            prompt = build_prompt_ids(tokenizer, question, PROMPT_TEMPLATE)
            if k == 0:
                ids += prompt.prefix + [video_id] * (frames.shape[0] * size.tokens_per_frame + 1)
            target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids += prompt.suffix + target
            lab += [IGNORE] * (len(ids) - len(lab) - len(target)) + target
        rows.append(ids)
        labels.append(lab)
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "pixel_values_videos": torch.stack([square_pixels(frames, size.image_size) for frames, *_ in clips]),
        "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE] * (length - len(lab)) for lab in labels]),
    }


def object_maps(objects: list[qa.SceneObject], num_frames: int, side: int) -> np.ndarray:
    """`[T, side, side]` int8: index of the object drawn at each pixel, -1 for background."""
    maps = np.full((num_frames, side, side), -1, np.int8)
    for k, obj in enumerate(objects):
        stamp = qa.shape_mask(obj.shape, obj.size)
        for t in range(obj.appear, min(obj.disappear, num_frames)):
            x0, y0, _, _ = obj.box(t)
            maps[t, y0:y0 + obj.size, x0:x0 + obj.size][stamp] = k
    return maps


def dense_labels(objects: list[qa.SceneObject], num_frames: int, patches: int, side: int) -> tuple[np.ndarray, ...]:
    """Per-frame targets of the auxiliary losses. On the `patches`x`patches` patch grid: shape and
    colour class (0 = background) of the object covering most of a patch (at least a quarter of it).
    On the pooled grid (half as many rows and columns): the direction the object covering most of a
    cell has been moving (-100 where no object covers a quarter of the cell, or at its first frame),
    and that object's rank in order of appearance (0 = first to appear; -100 on background)."""
    maps = object_maps(objects, num_frames, side)
    out = []
    for grid in (patches, patches // 2):
        block = maps.shape[1] // grid
        counts = np.stack([(maps == k).reshape(num_frames, grid, block, grid, block).sum((2, 4))
                           for k in range(len(objects))], -1)  # [T, g, g, K]
        owner = np.where(counts.max(-1) * 4 >= block * block, counts.argmax(-1), -1)
        out.append(owner)
    patch_owner, cell_owner = out
    shape = np.zeros(patch_owner.shape, np.int64)
    colour = np.zeros(patch_owner.shape, np.int64)
    direction = np.full(cell_owner.shape, IGNORE, np.int64)
    rank = np.full(cell_owner.shape, IGNORE, np.int64)
    order = sorted(range(len(objects)), key=lambda k: objects[k].appear)
    for k, obj in enumerate(objects):
        rank[cell_owner == k] = order.index(k)
        for t in range(num_frames):
            shape[t][patch_owner[t] == k] = 1 + qa.SHAPES.index(obj.shape)
            colour[t][patch_owner[t] == k] = 1 + qa.COLOURS.index(obj.colour_at(t))
            if t > obj.appear and obj.direction in qa.DIRECTIONS:  # (v4's brief objects stand still)
                direction[t][cell_owner[t] == k] = qa.DIRECTIONS.index(obj.direction)
    return shape, colour, direction, rank


class DenseHeads(torch.nn.Module):
    """Auxiliary heads used only in training (not saved): per patch, from the projector's output,
    the shape and colour of the object there; per visual token, from the decoder's last hidden
    state, the way that object has been moving and its rank in order of appearance. The
    question-answer loss alone teaches shapes and motion slowly (they stalled near chance while
    colour questions were solved); these dense targets give every token a label. The rank target
    was added for data version 4: with 1024 visual tokens a linear probe read every object's colour
    from the projector at 99% while "first / last colour" questions stayed near 45%, i.e. ordering
    objects in time, not seeing them, was what the decoder had not learnt."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(width, 1 + len(qa.SHAPES))
        self.colour = torch.nn.Linear(width, 1 + len(qa.COLOURS))
        self.direction = torch.nn.Linear(width, len(qa.DIRECTIONS))
        self.rank = torch.nn.Linear(width, MAX_OBJECTS)

    def loss(self, patch_features: torch.Tensor, token_hidden: torch.Tensor, labels: list[tuple],
             patches: bool = True) -> torch.Tensor:
        """patch_features `[B*T, P, W]`, token_hidden `[B, T*C, W]`; labels per row from `dense_labels`;
        `patches=False` leaves out the per-patch terms (a frozen vision tower)."""
        shape, colour, direction, rank = (torch.from_numpy(np.stack([lab[i] for lab in labels])).reshape(-1)
                                          for i in range(4))
        tokens = token_hidden.reshape(-1, token_hidden.shape[-1])
        total = (F.cross_entropy(self.direction(tokens), direction, ignore_index=IGNORE)
                 + F.cross_entropy(self.rank(tokens), rank, ignore_index=IGNORE))
        if patches:
            flat = patch_features.reshape(-1, patch_features.shape[-1])
            total = total + F.cross_entropy(self.shape(flat), shape) + F.cross_entropy(self.colour(flat), colour)
        return total


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row greedy exact match `[B]` for one-question rows: every labelled token (answer word,
    <eos>) is the argmax of the logits before it. With teacher forcing this equals greedy decoding,
    since decoding only diverges after the first wrong token."""
    pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = target != IGNORE
    return ((pred == target) | ~mask).all(-1)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled tokens predicted right (training-time progress on packed rows)."""
    pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = target != IGNORE
    return ((pred == target) & mask).sum().item() / max(1, mask.sum().item())


@torch.no_grad()
def evaluate(model, items: list[qa.QAItem], tokenizer, size: TinyLlavaSize, batch_size: int) -> dict:
    """Exact-match accuracy, overall and per question type."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = collate([(it.clip, [(it.question, it.answer)]) for it in chunk], tokenizer, size)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for it, ok in zip(chunk, exact_match(logits, batch["labels"]).tolist()):
            hits[it.meta["type"]].append(ok)
    model.train()
    per_type = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    overall = float(np.mean([x for v in hits.values() for x in v]))
    return {"accuracy": overall, "per_type": per_type, "n": sum(map(len, hits.values()))}


def train_batches(batch_size: int, per_row: int, seed: int, num_frames: int, start_clip: int = 0,
                  types: tuple[str, ...] = qa.QUESTION_TYPES, data=qa):
    """Endless stream of (rows, clips used so far): consecutive train clips, each with up to
    `per_row` of its questions of `types` in a random order (clips with none are skipped)."""
    rng = np.random.default_rng(seed)
    index = start_clip
    while True:
        rows = []
        while len(rows) < batch_size:
            clip = data.generate_clip(qa.clip_seed("train", index), num_frames)
            index += 1
            questions = [q[1:] for q in clip.questions if q[0] in types]
            if questions:
                order = rng.permutation(len(questions))[:per_row]
                rows.append((clip.frames, [questions[i] for i in order], clip.objects))
        yield rows, index


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write the checkpoint, tokenizer and metrics to")
    p.add_argument("--seed", type=int, default=0, help="model init and question sampling seed")
    p.add_argument("--data-version", default=qa.DATA_VERSION, choices=("3", "4"),
                   help="synthetic QA version: 3 (8 frames of 64 px on black) or 4 (16 textured frames of 128 px)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per clip, the model's video length (default: the data version's)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (cosine schedule over these)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per step (each with all its questions)")
    p.add_argument("--questions-per-row", type=int, default=8,
                   help="questions packed after each training clip (one pass over the video supervises all)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation runs")
    p.add_argument("--val-clips", type=int, default=100, help="validation clips (2 random questions each)")
    p.add_argument("--test-clips", type=int, default=400, help="test clips (2 random questions each), scored at the end")
    p.add_argument("--init-from", default=None, help="start from this checkpoint's weights (a stage-2 run)")
    p.add_argument("--start-clip", type=int, default=0, help="first train clip index (stage 2: past stage 1's clips)")
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the dense auxiliary losses (shape/colour per patch, motion per token; "
                   "see DenseHeads); 0 = question answering only")
    p.add_argument("--freeze-vision", action="store_true",
                   help="train the decoder only, keeping the vision tower and projector as --init-from has them "
                   "(after pipelines/train_video_perception.py); the per-patch auxiliary losses are then off")
    p.add_argument("--types", default="",
                   help="comma-separated question types to train on (a focused stage); default all of the version's")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 wastes least on a shared, oversubscribed CPU)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (0 = no limit)")
    version = argparse.ArgumentParser(add_help=False)  # the size flags' defaults follow --data-version
    version.add_argument("--data-version", default=qa.DATA_VERSION)
    known, _ = version.parse_known_args(argv)
    add_size_flags(p, SIZE_V4 if known.data_version == "4" else SIZE)
    args = p.parse_args(argv)
    data = qa.data_version(args.data_version)
    args.num_frames = args.num_frames or data.NUM_FRAMES
    args.types = args.types or ",".join(data.QUESTION_TYPES)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = size_from_args(args)
    data = qa.data_version(args.data_version)
    tokenizer = build_tokenizer(data.VOCAB)
    model = build_model(tokenizer, size, args.seed)
    if args.init_from:  # continue a previous run (its sizes must match): weights only, fresh optimizer
        model.load_state_dict(LlavaOnevisionForConditionalGeneration.from_pretrained(args.init_from).state_dict())
        log.info("initialised from %s", args.init_from)
    if args.freeze_vision:
        for name, param in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                param.requires_grad_(False)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, vocab %d", n_params / 1e6, len(tokenizer))

    val = qa.make_items("val", args.val_clips, per_clip=2, num_frames=args.num_frames, version=args.data_version)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    history, best, best_state, clips_seen = [], -1.0, None, 0
    types = tuple(t for t in args.types.split(",") if t)
    stream = train_batches(args.batch_size, args.questions_per_row, args.seed, args.num_frames, args.start_clip, types,
                           data)
    heads = DenseHeads(size.text_hidden)
    if args.aux_weight > 0:
        opt.add_param_group({"params": list(heads.parameters()), "weight_decay": 0.0})
    captured: dict[str, torch.Tensor] = {}
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.__setitem__("patches", out))
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    patches = size.image_size // size.patch_size
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True)
    running_loss, running_acc, step = 0.0, 0.0, 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        rows, clips_seen = next(stream)
        batch = collate(rows, tokenizer, size)
        outputs = model(**batch, output_hidden_states=args.aux_weight > 0)
        loss = outputs.loss
        if args.aux_weight > 0:
            visual = args.num_frames * size.tokens_per_frame  # the video slots before the newline
            slots = (batch["input_ids"] == video_id).nonzero()[:, 1].reshape(len(rows), -1)[:, :visual]
            hidden = outputs.hidden_states[-1].gather(1, slots[..., None].expand(-1, -1, size.text_hidden))
            labels = [dense_labels(objects, args.num_frames, patches, frames.shape[1]) for frames, _, objects in rows]
            loss = loss + args.aux_weight * heads.loss(captured["patches"], hidden, labels, patches=not args.freeze_vision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        acc = token_accuracy(outputs.logits.detach(), batch["labels"])
        running_loss = 0.98 * running_loss + 0.02 * outputs.loss.item() if step else outputs.loss.item()  # QA only
        running_acc = 0.98 * running_acc + 0.02 * acc if step else acc
        bar.set_postfix(loss=f"{running_loss:.3f}", acc=f"{running_acc:.2f}")
        last = step == args.steps - 1
        out_of_time = args.max_minutes and time.perf_counter() - t0 > args.max_minutes * 60
        if (step + 1) % args.eval_every == 0 or last or out_of_time:
            res = evaluate(model, val, tokenizer, size, 2 * args.batch_size)
            history.append({"step": step + 1, "minutes": (time.perf_counter() - t0) / 60,
                            "train_loss": running_loss, "train_token_acc": running_acc, "val": res})
            log.info("step %d loss %.3f train %.3f val %.3f %s", step + 1, running_loss, running_acc,
                     res["accuracy"], {k: round(v, 3) for k, v in res["per_type"].items()})
            if res["accuracy"] > best:
                best = res["accuracy"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if out_of_time:
            log.info("time budget of %.1f min reached at step %d", args.max_minutes, step + 1)
            break
    train_minutes = (time.perf_counter() - t0) / 60
    model.load_state_dict(best_state)
    model.eval()
    val_res = evaluate(model, val, tokenizer, size, 2 * args.batch_size)
    held_out = {split: qa.make_items(split, n, per_clip=2, num_frames=args.num_frames, version=args.data_version)
                for split, n in (("test", args.test_clips), ("train", args.val_clips))}
    test_res = evaluate(model, held_out["test"], tokenizer, size, 2 * args.batch_size)
    train_res = evaluate(model, held_out["train"], tokenizer, size, 2 * args.batch_size)
    log.info("final: train %.3f val %.3f test %.3f %s", train_res["accuracy"], val_res["accuracy"],
             test_res["accuracy"], test_res["per_type"])

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / SIDECAR).write_text(json.dumps({"prompt_template": PROMPT_TEMPLATE, "eos_token": "<eos>",
                                           "num_frames": args.num_frames}, indent=2) + "\n")
    metrics = {
        "seed": args.seed, "data_version": data.DATA_VERSION, "data_splits": qa.SPLITS,
        "args": vars(args), "model_size": asdict(size), "parameters": n_params,
        "steps": step + 1, "train_clips_seen": clips_seen, "train_minutes": round(train_minutes, 2),
        "threads": args.threads, "torch": torch.__version__,
        "accuracy": {"train": train_res, "val": val_res, "test": test_res},
        "history": history,
    }
    previous = Path(args.init_from or "") / "train_metrics.json"
    if args.init_from and previous.is_file():  # keep the whole recipe in one file
        metrics["previous_stage"] = json.loads(previous.read_text())
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()

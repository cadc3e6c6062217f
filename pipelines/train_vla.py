"""Train the default VLA policy: a small LLaVA-OneVision, from scratch, by behaviour cloning on PickColor.

    python -m pipelines.train_vla --out streamprune/assets/default_vla --seed 0

Demonstrations come from PickColor's scripted expert on training seeds (< 100000; the closed-loop
evaluation in streamprune.runtime.robot uses seeds from 100000 up). The executed action is the expert's
plus Gaussian noise (DART, Laskey et al. 2017), so the data visits the off-course states a learned
policy drifts into, while every label stays the expert's action at the visited state.

The model is the real `transformers.LlavaOnevisionForConditionalGeneration` at a tiny size with a
word-level tokenizer, laid out exactly as `VLAPolicy` runs it: the camera image is a one-frame video
through `square_pixels` (SigLIP normalisation), ids = "task : {instruction}" + <video> x (h*w + 1) +
"action :", then one token per action dimension from the last 256 ids of the vocabulary (OpenVLA
binning). Only the action tokens are labelled; the loss is cross-entropy over the 256 bins (the
only ids decoding may choose) against a Gaussian-smoothed target over neighbouring bins, since
bins are ordered and a near miss is almost right. Closed-loop success on validation seeds (90000+,
still training seeds) picks the checkpoint; the held-out episodes are scored once at the end with
`VLAPolicy.load` and `run_episodes`.

What took three-object success from ~5% (image first, then the instruction) to the bar is the
instruction placed before the image (PROMPT_TEMPLATE), so that visual tokens can read it, helped by
the grounding auxiliary losses (`GroundingHeads`, `--aux-weight`: without them validation success
was 0.52 instead of 0.92 after 900 steps).
Writes safetensors weights, tokenizer, streamprune.json and train_metrics.json to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast

from envs import PICKCOLOR_ID, make_env
from envs.pickcolor import COLOURS, SHAPES
from streamprune.models.preprocess import square_pixels
from streamprune.models.prompt import SIDECAR, build_prompt_ids
from streamprune.models.tiny import TinyLlavaSize, add_size_flags, build_llava_onevision, size_from_args, word_tokenizer
from streamprune.models.vla import ACTION_BINS, ActionTokenizer, action_bins_needed

log = logging.getLogger("train_vla")

# the instruction comes before the image so that every visual token can attend to it and mark
# whether it shows the named object (with the image first, as in the first layout tried, only the
# tokens after the image could do that lookup, and three-object success stayed near chance)
PROMPT_TEMPLATE = "task : {question} <video> action :"
WORDS = ["task", ":", "action", "reach", "the", *COLOURS, *SHAPES]
ACTION_DIM = 2
VAL_SEED = 90_000  # closed-loop validation episodes: seeds from here, below the held-out 100000


# 64 px images in 4 px patches -> 16x16 -> pooled 8x8 = 64 tokens; 4 decoder layers so that FastV's
# K=2 and VLA-Pruner's K=3 prune at different layers. init_std 0.08 (~1/sqrt(width)): with the 0.02
# default every projector/decoder layer's output shrank ~4x, attention started uniform and BC sat on
# a plateau predicting the action marginal; patch_gain 3 likewise (see streamprune.models.small_init)
SIZE = TinyLlavaSize(image_size=64, patch_size=4, vision_hidden=64, vision_mlp_ratio=4, vision_heads=4,
                     text_hidden=128, text_intermediate=256, text_layers=4, max_positions=512,
                     init_std=0.08, patch_gain=3.0)


def build_model(tokenizer: PreTrainedTokenizerFast, size: TinyLlavaSize,
                seed: int) -> LlavaOnevisionForConditionalGeneration:
    """The 256 action bins take the last ids of the vocabulary (OpenVLA binning)."""
    return build_llava_onevision(tokenizer, size, seed, vocab_size=action_bins_needed(len(tokenizer)), checkpoint=True)


@dataclass
class Demos:
    """Visited states and expert labels: images `[S, H, W, 3]` uint8, the episode's instruction
    (index into `instructions`) `[S]`, the expert's action `[S, 2]`, the agent's position and the
    named object's centre `[S, 2]` each (unit arena)."""

    images: np.ndarray
    instruction: np.ndarray
    actions: np.ndarray
    instructions: list[str]
    episodes: int
    expert_success: float
    agent: np.ndarray
    centres: np.ndarray


def collect(episodes: int, first_seed: int, noise: float, image_size: int, seed: int) -> Demos:
    """Roll out the expert with DART noise: executed = clip(expert + N(0, sigma^2)), sigma drawn per
    episode from U(0, noise) so the data holds both clean and perturbed trajectories."""
    env = make_env(PICKCOLOR_ID, image_size=image_size)
    base = env.unwrapped
    rng = np.random.default_rng(seed)
    instructions = sorted(f"reach the {c} {s}" for c in COLOURS for s in SHAPES)
    index = {text: i for i, text in enumerate(instructions)}
    images, which, actions, agents, centres, successes = [], [], [], [], [], 0
    for episode in tqdm(range(episodes), desc="demos", unit="ep", dynamic_ncols=True):
        obs, _ = env.reset(seed=first_seed + episode)
        sigma = rng.uniform(0.0, noise)
        while True:
            expert = base.expert_action()
            images.append(obs["image"])
            which.append(index[obs["instruction"]])
            actions.append(expert)
            agents.append(base.agent.copy())
            centres.append(base.objects[base.target][2])
            executed = np.clip(expert + rng.normal(0.0, sigma, ACTION_DIM), -1.0, 1.0)
            obs, _, terminated, truncated, info = env.step(executed)
            if terminated or truncated:
                successes += bool(info["is_success"])
                break
    env.close()
    return Demos(np.stack(images), np.asarray(which), np.asarray(actions, dtype=np.float32), instructions,
                 episodes, successes / episodes, np.asarray(agents, np.float32), np.asarray(centres, np.float32))


def cell_of(points: np.ndarray, side: int) -> np.ndarray:
    """Index (row-major) of the cell of a `side`x`side` grid over the unit arena holding each (x, y)."""
    col = np.clip((points[..., 0] * side).astype(int), 0, side - 1)
    row = np.clip((points[..., 1] * side).astype(int), 0, side - 1)
    return row * side + col


def cell_colours(images: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of a `side`x`side` grid: the object colour covering most of it (0 = none, else
    1 + index in COLOURS; at least an eighth of the cell) and whether the agent's cross touches it."""
    b, size = images.shape[0], images.shape[1]
    block = size // side
    counts = []
    for rgb in COLOURS.values():
        hit = (images == np.asarray(rgb, np.uint8)).all(-1)
        counts.append(hit.reshape(b, side, block, side, block).sum((2, 4)))
    counts = np.stack(counts, -1)  # [B, side, side, C]
    colour = np.where(counts.max(-1) * 8 >= block * block, counts.argmax(-1) + 1, 0)
    agent = (images == 255).all(-1).reshape(b, side, block, side, block).any((2, 4))
    return colour.reshape(b, -1), agent.reshape(b, -1)


class GroundingHeads(torch.nn.Module):
    """Auxiliary heads used only in training (not saved). From the decoder's last hidden state at
    the last prompt token: the grid cell of the named object and of the agent; at each visual
    token: the object colour in its cell, whether the named object is there and whether the agent
    is. Without them behaviour cloning grounds the instruction more slowly (validation success 0.52
    instead of 0.98 after 900 steps)."""

    def __init__(self, width: int, cells: int) -> None:
        super().__init__()
        self.target = torch.nn.Linear(width, cells)
        self.agent = torch.nn.Linear(width, cells)
        self.colour = torch.nn.Linear(width, 1 + len(COLOURS))
        self.agent_here = torch.nn.Linear(width, 1)
        self.named_here = torch.nn.Linear(width, 1)

    def loss(self, last: torch.Tensor, visual: torch.Tensor, target_cell: np.ndarray, agent_cell: np.ndarray,
             colour: np.ndarray, agent_here: np.ndarray, named_here: np.ndarray) -> torch.Tensor:
        t = lambda a: torch.from_numpy(np.asarray(a)).reshape(-1)  # noqa: E731
        tokens = visual.reshape(-1, visual.shape[-1])
        return (F.cross_entropy(self.target(last), t(target_cell).long())
                + F.cross_entropy(self.agent(last), t(agent_cell).long())
                + F.cross_entropy(self.colour(tokens), t(colour).long())
                + F.binary_cross_entropy_with_logits(self.agent_here(tokens).squeeze(-1), t(agent_here).float())
                + F.binary_cross_entropy_with_logits(self.named_here(tokens).squeeze(-1), t(named_here).float()))


class Batcher:
    """Model inputs for (image, instruction[, first action token]) rows; every row has the same
    length (all instructions are four words), so no padding."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, size: TinyLlavaSize, instructions: list[str],
                 actions: ActionTokenizer) -> None:
        self.size, self.actions = size, actions
        video = [tokenizer.convert_tokens_to_ids("<video>")] * (size.tokens_per_frame + 1)  # +1: image_newline
        self.prompts = {}
        for text in instructions:
            ids = build_prompt_ids(tokenizer, text, PROMPT_TEMPLATE)
            self.prompts[text] = ids.prefix + video + ids.suffix

    def inputs(self, images: np.ndarray, texts: list[str], first: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images `[B, S, S, 3]` uint8; `first` `[B]` action-token ids appended after the prompt."""
        ids = torch.tensor([self.prompts[t] for t in texts])
        if first is not None:
            ids = torch.cat([ids, first[:, None]], dim=1)
        return {"input_ids": ids, "pixel_values_videos": square_pixels(images, self.size.image_size)[:, None]}


def action_logits(model, batch: dict[str, torch.Tensor], actions: ActionTokenizer, keep: int) -> torch.Tensor:
    """Logits over the action bins at the last `keep` positions: `[B, keep, bins]`."""
    logits = model(**batch, logits_to_keep=keep).logits
    return logits[..., actions.first_id:actions.first_id + actions.bins]


def smooth_targets(bins: torch.Tensor, n_bins: int, sigma: float) -> torch.Tensor:
    """`[B, D]` bin indices -> `[B, D, n_bins]` Gaussian over neighbouring bins (one-hot if sigma=0)."""
    if sigma <= 0:
        return F.one_hot(bins, n_bins).float()
    grid = torch.arange(n_bins, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((grid - bins[..., None].float()) / sigma) ** 2)
    return weights / weights.sum(-1, keepdim=True)


@torch.no_grad()
def closed_loop(model, batcher: Batcher, actions: ActionTokenizer, episodes: int, first_seed: int,
                image_size: int, parallel: int = 50) -> dict:
    """Greedy closed-loop success over `episodes` PickColor episodes, `parallel` envs stepped as one
    batch (two forward passes per control step: one per action dimension)."""
    model.eval()
    successes, lengths = [], []
    for start in range(0, episodes, parallel):
        envs = [make_env(PICKCOLOR_ID, image_size=image_size) for _ in range(min(parallel, episodes - start))]
        obs = [env.reset(seed=first_seed + start + i)[0] for i, env in enumerate(envs)]
        live = list(range(len(envs)))
        done = [None] * len(envs)
        steps = [0] * len(envs)
        while live:
            images = np.stack([obs[i]["image"] for i in live])
            texts = [obs[i]["instruction"] for i in live]
            first = action_logits(model, batcher.inputs(images, texts), actions, 1)[:, -1].argmax(-1)
            first_ids = first + actions.first_id
            second = action_logits(model, batcher.inputs(images, texts, first_ids), actions, 1)[:, -1].argmax(-1)
            for k, i in enumerate(list(live)):
                act = actions.to_action([int(first_ids[k]), int(second[k]) + actions.first_id])
                obs[i], _, terminated, truncated, info = envs[i].step(act)
                steps[i] += 1
                if terminated or truncated:
                    done[i] = bool(info["is_success"])
                    live.remove(i)
        successes += done
        lengths += steps
        for env in envs:
            env.close()
    model.train()
    return {"success_rate": float(np.mean(successes)), "mean_length": float(np.mean(lengths)), "episodes": episodes}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def heldout_success(out: Path, episodes: int) -> dict:
    """Success of the saved policy, loaded and run exactly as `streamprune robot` does."""
    from streamprune.models.vla import VLAPolicy
    from streamprune.pruning.recipe import build_recipe
    from streamprune.runtime.robot import run_episodes

    policy = VLAPolicy.load(out)
    return run_episodes(policy, PICKCOLOR_ID, build_recipe("none"), episodes, seed=0, progress=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write the checkpoint, tokenizer and metrics to")
    p.add_argument("--seed", type=int, default=0, help="model init, noise and batch-order seed")
    p.add_argument("--episodes", type=int, default=4000, help="expert demonstration episodes (seeds 0..N-1)")
    p.add_argument("--noise", type=float, default=0.4,
                   help="DART: per-episode action-noise std drawn from U(0, NOISE) (default 0.4)")
    p.add_argument("--steps", type=int, default=3500, help="optimizer steps (cosine schedule over these)")
    p.add_argument("--batch-size", type=int, default=64, help="states per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=150, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the grounding losses (GroundingHeads: where the named object and the "
                   "agent are, what each visual token shows); 0 = behaviour cloning only")
    p.add_argument("--label-sigma", type=float, default=2.0,
                   help="std (in bins) of the Gaussian target over neighbouring action bins; 0 = one-hot")
    p.add_argument("--eval-every", type=int, default=300, help="steps between closed-loop validation runs")
    p.add_argument("--val-episodes", type=int, default=50, help="closed-loop validation episodes (seeds 90000+)")
    p.add_argument("--heldout-episodes", type=int, default=100,
                   help="held-out episodes (seeds 100000+) scored once at the end through VLAPolicy (0 = skip)")
    p.add_argument("--init-from", metavar="DIR", help="start from the weights in DIR (a previous --out) instead of "
                   "a fresh init; its config replaces the model-size flags")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on the shared 2-core machine 2 threads measured slower per step)")
    p.add_argument("--max-minutes", type=float, default=50.0, help="stop training after this long (0 = no limit)")
    add_size_flags(p, SIZE)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = size_from_args(args)
    tokenizer = word_tokenizer(WORDS)
    if args.init_from:  # continue from an earlier run's checkpoint (its config overrides the size flags)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.init_from, local_files_only=True)
        vision = model.config.vision_config
        size = replace(size, image_size=vision.image_size, patch_size=vision.patch_size)
    else:
        model = build_model(tokenizer, size, args.seed)
    model.train()
    actions = ActionTokenizer(vocab_size=model.config.text_config.vocab_size, dims=ACTION_DIM)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, vocab %d, %d visual tokens", n_params / 1e6,
             model.config.text_config.vocab_size, size.tokens_per_frame)

    demos = collect(args.episodes, 0, args.noise, size.image_size, args.seed)
    log.info("demos: %d states from %d episodes (noisy expert success %.2f)", len(demos.actions), demos.episodes,
             demos.expert_success)
    batcher = Batcher(tokenizer, size, demos.instructions, actions)
    target_ids = torch.tensor([actions.to_ids(a) for a in demos.actions])  # [S, 2]

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    side = int(round(size.tokens_per_frame ** 0.5))
    heads = GroundingHeads(model.config.text_config.hidden_size, size.tokens_per_frame)
    if args.aux_weight > 0:
        opt.add_param_group({"params": list(heads.parameters()), "weight_decay": 0.0})
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    # colour class (1 + index in COLOURS) each instruction names: "reach the red circle" -> red
    named_colour = np.asarray([1 + list(COLOURS).index(text.split()[2]) for text in demos.instructions])
    rng = np.random.default_rng(args.seed)
    order, cursor = rng.permutation(len(demos.actions)), 0
    t0 = time.perf_counter()
    history, best, best_state, step = [], -1.0, None, 0
    running_loss = running_acc = running_err = 0.0
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(demos.actions)), 0
        rows = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        ids = target_ids[rows]  # [B, 2]
        texts = [demos.instructions[i] for i in demos.instruction[rows]]
        images = demos.images[rows]
        batch = batcher.inputs(images, texts, ids[:, 0])
        outputs = model(**batch, logits_to_keep=ACTION_DIM, output_hidden_states=args.aux_weight > 0)
        logits = outputs.logits[..., actions.first_id:actions.first_id + actions.bins]  # [B, 2, bins]
        bins = ids - actions.first_id
        target = smooth_targets(bins, actions.bins, args.label_sigma)
        loss = -(target * logits.float().log_softmax(-1)).sum(-1).mean()
        if args.aux_weight > 0:
            hidden = outputs.hidden_states[-1]
            slots = (batch["input_ids"][0] == video_id).nonzero()[:-1, 0]  # every row has the same layout
            colour, agent_here = cell_colours(images, side)
            named = named_colour[demos.instruction[rows]]
            loss = loss + args.aux_weight * heads.loss(
                hidden[:, -ACTION_DIM], hidden[:, slots],
                cell_of(demos.centres[rows], side), cell_of(demos.agent[rows], side), colour, agent_here,
                colour == named[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            pred = logits.argmax(-1)
            acc = (pred - bins).abs().le(2).float().mean().item()
            err = ((pred - bins).abs().float().mean() * 2 / actions.bins).item()  # in action units
        ema = lambda old, new: 0.98 * old + 0.02 * new if step else new  # noqa: E731
        running_loss, running_acc, running_err = ema(running_loss, loss.item()), ema(running_acc, acc), ema(running_err, err)
        bar.set_postfix(loss=f"{running_loss:.3f}", within2=f"{running_acc:.2f}", err=f"{running_err:.3f}")
        last = step == args.steps - 1
        out_of_time = bool(args.max_minutes) and time.perf_counter() - t0 > args.max_minutes * 60
        if (step + 1) % args.eval_every == 0 or last or out_of_time:
            res = closed_loop(model, batcher, actions, args.val_episodes, VAL_SEED, size.image_size)
            history.append({"step": step + 1, "minutes": round((time.perf_counter() - t0) / 60, 2),
                            "train_loss": running_loss, "train_within2_bins": running_acc,
                            "train_abs_error": running_err, "val": res})
            log.info("step %d loss %.3f within2 %.3f err %.3f | val success %.2f len %.1f", step + 1, running_loss,
                     running_acc, running_err, res["success_rate"], res["mean_length"])
            if res["success_rate"] >= best:
                best = res["success_rate"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if out_of_time:
            log.info("time budget of %.1f min reached at step %d", args.max_minutes, step + 1)
            break
    train_minutes = (time.perf_counter() - t0) / 60
    model.load_state_dict(best_state)
    model.eval()

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    sidecar = {"prompt_template": PROMPT_TEMPLATE, "eos_token": "<eos>",
               "vla": {"action_dim": ACTION_DIM, "bins": ACTION_BINS, "low": -1.0, "high": 1.0}}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    metrics = {
        "seed": args.seed, "env": PICKCOLOR_ID, "args": vars(args), "model_size": asdict(size),
        "init_from": args.init_from,
        "parameters": n_params, "visual_tokens": size.tokens_per_frame,
        "data": {"episodes": demos.episodes, "train_seeds": [0, demos.episodes - 1], "states": len(demos.actions),
                 "dart_noise_max": args.noise, "noisy_expert_success": demos.expert_success},
        "steps": step + 1, "train_minutes": round(train_minutes, 2), "threads": args.threads,
        "torch": torch.__version__, "best_val_success": best, "history": history,
    }
    if args.heldout_episodes:
        held = heldout_success(out, args.heldout_episodes)
        log.info("held-out success %.2f over %d episodes (VLAPolicy, no pruning)", held["success_rate"],
                 args.heldout_episodes)
        metrics["heldout"] = held
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()

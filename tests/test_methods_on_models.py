"""Every registered method and every configs/methods pipeline answers on both model families:
within budget, deterministically, and with kept tokens at their original positions."""

from __future__ import annotations

import pytest
import torch

from streamprune.config import CONFIG_DIR
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.recipe import PruningRecipe, build_recipe
from streamprune.pruning.registry import available, make_method
from tests.tiny import FAMILIES, random_clip

QUESTION = "what happens ?"
RETAINS = (0.5, 0.25)
FPS = 2.0

# "method:X" is registered method X alone (its paper defaults); "pipeline:X" is configs/methods/X.yaml.
CASES = [f"method:{name}" for name in available()] + \
        [f"pipeline:{path.stem}" for path in sorted((CONFIG_DIR / "methods").glob("*.yaml"))]



def make_pipeline(case: str, retain: float) -> PruningRecipe:
    kind, name = case.split(":")
    if kind == "pipeline":
        return build_recipe(name, retain=retain)
    method = make_method(name)
    recipe = PruningRecipe(name=name, budget=Budget(retain=retain))
    if method.stage == "inner_llm":
        recipe.inner_llm = method
    else:
        recipe.pre_llm.append(method)
    return recipe


def unpruned_positions(adapter, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `[P, L]` of the unpruned prompt as transformers computes them, and the sequence
    index `[N]` of each prunable visual token (LLaVA-OV's trailing newline is not prunable)."""
    inputs = adapter.reference_inputs(clip, QUESTION, fps=FPS)
    ids = inputs["input_ids"][0]
    if adapter.family == "qwen2_5_vl":
        full, _ = adapter.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"])
        full = full[:, 0]
    else:
        full = torch.arange(ids.numel())[None]
    video_slots = (ids == adapter.model.config.video_token_id).nonzero().squeeze(1)
    return full, video_slots


def answer_seeing_positions(adapter, clip, recipe):
    """Answer once, recording the position ids every rotary-embedding call receives (`[P, L]`)."""
    seen = []

    def record(_module, args):
        ids = args[1]
        seen.append((ids[:, 0] if ids.ndim == 3 else ids).clone())

    hook = adapter.language_model.rotary_emb.register_forward_pre_hook(record)
    try:
        answer = adapter.answer(clip, QUESTION, recipe, PruneContext(seed=0), fps=FPS, max_new_tokens=3)
    finally:
        hook.remove()
    return answer, seen


def is_ordered_subsequence(part: torch.Tensor, whole: torch.Tensor) -> bool:
    """Whether the columns of `part` `[P, M]` appear, in order, among the columns of `whole` `[P, L]`."""
    j = 0
    for column in part.T:
        while j < whole.shape[1] and not torch.equal(whole[:, j], column):
            j += 1
        if j == whole.shape[1]:
            return False
        j += 1
    return True


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
def test_method_answers_within_budget_deterministically_at_original_positions(tiny_adapters, family, case):
    adapter = tiny_adapters[family]
    clip = random_clip(frames=4, seed=3)
    full, video_slots = unpruned_positions(adapter, clip)
    for retain in RETAINS:
        recipe = make_pipeline(case, retain)
        answer, seen = answer_seeing_positions(adapter, clip, recipe)
        n = answer.visual_tokens_in
        assert 0 < answer.visual_tokens_kept <= recipe.budget.count(n), (retain, answer)
        again = adapter.answer(clip, QUESTION, make_pipeline(case, retain), PruneContext(seed=0), fps=FPS,
                               max_new_tokens=3)
        assert (again.token_ids, again.visual_tokens_kept) == (answer.token_ids, answer.visual_tokens_kept)

        # The prefill's first layer sees the pre-LLM survivors at exactly their unpruned positions.
        video = adapter.encode(clip, fps=FPS, signals=recipe.requires)
        selection = recipe.select(video.tokens, PruneContext(seed=0))
        assert len(selection) == answer.visual_tokens_pre_llm
        prunable = video_slots[:n]
        keep = torch.ones(full.shape[1], dtype=torch.bool)
        keep[prunable] = False
        keep[prunable[selection.indices]] = True
        assert torch.equal(seen[0], full[:, keep]), retain
        if recipe.inner_llm is not None:
            # after the inner stage's layer: a subset of those columns, every text token still there
            after = seen[1]
            assert after.shape[1] == seen[0].shape[1] - (answer.visual_tokens_pre_llm - answer.visual_tokens_kept)
            assert is_ordered_subsequence(after, seen[0])
            text = torch.ones(full.shape[1], dtype=torch.bool)
            text[prunable] = False
            assert is_ordered_subsequence(full[:, text], after)

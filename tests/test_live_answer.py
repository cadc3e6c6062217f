"""The live memory's answer path: Qwen2.5-VL's M-RoPE positions from the memory equal the offline
layout's, inner-LLM methods prune inside each answer's prefill, and an answer-time retain keeps
the memory's best-scored tokens."""

from __future__ import annotations

import math

import pytest
import torch

from streamprune.memory import MemoryConfig, MemoryUnit
from streamprune.types import Frame, VisualTokens
from tests.tiny import random_clip

QUESTION = "what moves ?"


def record_prefills(monkeypatch, adapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(embeds, positions) of every prefill `adapter.forward_layers` runs (decode steps left out)."""
    calls = []
    forward = adapter.forward_layers

    def recording(embeds, positions, cache, inner=None, after_layer=None):
        if embeds.shape[0] > 1:
            calls.append((embeds.detach().clone(), positions.detach().clone()))
        return forward(embeds, positions, cache, inner, after_layer=after_layer)

    monkeypatch.setattr(adapter, "forward_layers", recording)
    return calls


def memory_of(adapter, frames: int = 6, fps: float = 10.0, **stage_kwargs):
    """A MemoryStage filled by the live encoder (method none) from `frames` random frames."""
    from streamprune.runtime.live_stages import EncodeStage
    from streamprune.runtime.memory_stage import MemoryStage

    encoder = EncodeStage(None, adapter=adapter)
    stage = MemoryStage(None, MemoryConfig(kv_budget=256, recent_frames=2), max_new_tokens=3, adapter=adapter,
                        **stage_kwargs)
    clip = [Frame(image=img, timestamp=i / fps, index=i) for i, img in enumerate(random_clip(frames, 32, 32))]
    stage.add(encoder.process(clip, fps, flush=True), fps)
    return stage


# -- Qwen2.5-VL: the memory's M-RoPE positions are the offline layout's --------------------------------
def qwen_units(adapter, fps: float, recipe_name: str = "visionzip", retain: float | None = 0.5):
    """A clip encoded and pruned offline -> (video, selection, recipe, one MemoryUnit per temporal
    patch holding its kept tokens, timestamps = frame index / fps)."""
    clip = random_clip(8, 56, 84)
    recipe = adapter.recipe(recipe_name, retain=retain)
    video = adapter.encode_for(clip, recipe, fps=fps)
    selection = recipe.select(video.tokens)
    kept = selection.apply(video.tokens)
    step = adapter.frames_per_unit
    units = []
    for u in range(video.tokens.grid[0]):
        rows = kept.thw[:, 0] == u
        units.append(MemoryUnit(features=kept.features[rows].float().cpu(), hw=kept.thw[rows, 1:].cpu(),
                                frame=u * step, timestamp=u * step / fps))
    return video, selection, recipe, units


@pytest.mark.parametrize("grid_known", [True, False], ids=["chunk_grid", "inferred_grid"])
def test_qwen_memory_answer_prefills_the_offline_mrope_positions_of_the_same_kept_tokens(
        tiny_adapters, monkeypatch, grid_known):
    from streamprune.runtime.memory_stage import EncodedChunk, MemoryStage

    adapter = tiny_adapters["qwen2_5_vl"]
    fps = 2.0
    video, selection, recipe, units = qwen_units(adapter, fps)
    assert 0 < len(selection) < len(video.tokens) and video.tokens.grid[0] == 4
    prompt = adapter.prompt_ids(QUESTION)
    offline_embeds, offline_positions, _ = adapter.layout(video, prompt).keep(selection)
    # the clip outlasts its grid: the last patch's temporal id is past where the text after it
    # starts under transformers >= 5.3, so the two get_rope_index rules for that text differ here
    text_after = offline_positions[0, -len(prompt.suffix)]
    assert offline_positions.shape[0] == 3 and int(offline_positions[0, :-len(prompt.suffix)].max()) >= text_after

    _, h, w = video.tokens.grid
    stage = MemoryStage(None, MemoryConfig(kv_budget=4096, recent_frames=2), max_new_tokens=4, adapter=adapter)
    stage.add(EncodedChunk(units=units, newline=video.always_kept.float().cpu(), encode_ms=0.0,
                           grid=(h, w) if grid_known else None), fps)
    assert len(stage.memory) == len(selection) and stage.memory.merged == 0
    prefills = record_prefills(monkeypatch, adapter)
    live = stage.ask(QUESTION)
    offline = adapter.answer_encoded(video, QUESTION, recipe, max_new_tokens=4)

    (live_embeds, live_positions), (replayed_embeds, _) = prefills
    assert torch.equal(live_positions.cpu(), offline_positions.cpu())
    assert torch.equal(live_embeds, offline_embeds) and torch.equal(replayed_embeds, offline_embeds)
    assert live.text == offline.text and live.visual_tokens == len(selection)


def test_qwen_memory_positions_stay_put_as_old_tokens_leave(tiny_adapters, monkeypatch):
    from streamprune.runtime.memory_stage import EncodedChunk, MemoryStage

    adapter = tiny_adapters["qwen2_5_vl"]
    video, _, _, units = qwen_units(adapter, 2.0, recipe_name="none", retain=None)
    newline = video.always_kept.float().cpu()
    per_unit = units[0].features.shape[0]
    # no merging (static_tau > 1): only A2SF eviction shrinks the memory, by one unit's worth
    memory = MemoryConfig(kv_budget=3 * per_unit, recent_frames=2, static_tau=2.0)
    stage = MemoryStage(None, memory, max_new_tokens=1, adapter=adapter)
    prefills = record_prefills(monkeypatch, adapter)
    start = len(adapter.prompt_ids(QUESTION).prefix)

    def positions_by_uid() -> dict[int, list[int]]:
        uids = stage.memory.snapshot().uid.tolist()
        stage.ask(QUESTION)
        return dict(zip(uids, prefills[-1][1][:, start:start + len(uids)].T.tolist()))

    stage.add(EncodedChunk(units=units[:3], newline=newline, encode_ms=0.0), 2.0)
    before = positions_by_uid()
    stage.add(EncodedChunk(units=units[3:], newline=newline, encode_ms=0.0), 2.0)
    after = positions_by_uid()
    assert stage.memory.evicted == per_unit and stage.origin == 0.0
    survivors = set(before) & set(after)
    assert len(survivors) == 2 * per_unit
    assert all(before[u] == after[u] for u in survivors)
    assert max(p[0] for p in after.values()) == start + 6  # the last patch: 3 s after the origin x 2 ids/s


# -- inner-LLM methods in each answer's prefill ----------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "holitom", "framefusion"])
def test_inner_llm_method_prunes_inside_the_live_answer_prefill(tiny_adapters, method):
    stage = memory_of(tiny_adapters["llava_onevision"], method=method)
    assert stage.recipe.inner_llm is not None and not stage.recipe.pre_llm
    held = len(stage.memory)
    before = stage.memory.scores().clone()
    answer = stage.ask(QUESTION)
    assert answer.visual_tokens == answer.memory_tokens == held
    assert answer.tokens_after_inner is not None and 0 < answer.tokens_after_inner < held
    credited = stage.memory.scores() - before
    assert credited.sum().item() == pytest.approx(1.0) and (credited >= 0).all()


def test_fastv_live_answer_equals_the_offline_answer_on_the_memory_tokens(tiny_adapters):
    from streamprune.models.base import EncodedVideo

    adapter = tiny_adapters["llava_onevision"]
    stage = memory_of(adapter, method="fastv", retain=0.25)
    snap = stage.memory.snapshot()
    m = len(snap)
    video = EncodedVideo(VisualTokens(snap.features, VisualTokens.grid_positions(1, 1, m), (1, 1, m)),
                         snap.newline, stage.fps)
    offline = adapter.answer_encoded(video, QUESTION, stage.recipe, max_new_tokens=stage.max_new_tokens)
    live = stage.ask(QUESTION)
    assert live.tokens_after_inner == offline.visual_tokens_kept == math.floor(0.25 * m)
    assert live.text == offline.text


def test_incremental_kv_refuses_an_inner_llm_method(tiny_adapters):
    from streamprune.errors import ConfigError
    from streamprune.runtime.memory_stage import MemoryStage

    with pytest.raises(ConfigError, match="prunes inside the LLM"):
        MemoryStage(None, MemoryConfig(kv_budget=128), adapter=tiny_adapters["llava_onevision"],
                    incremental_kv=True, method="fastv")


# -- answer-time retain ------------------------------------------------------------------------------
def test_answer_retain_answers_from_the_best_scored_tokens_in_time_order(tiny_adapters, monkeypatch):
    from streamprune.errors import ConfigError

    adapter = tiny_adapters["llava_onevision"]
    stage = memory_of(adapter)
    stage.ask(QUESTION)  # credit some attention, so the scores differ
    snap = stage.memory.snapshot()
    scores = stage.memory.scores().clone()
    m = len(snap)
    k = math.ceil(0.3 * m)
    order = torch.argsort(scores, descending=True, stable=True)
    expected = torch.sort(order[:k]).values
    assert scores[order[k - 1]] > scores[order[k]]  # a strict cut: the k best are well defined
    prefills = record_prefills(monkeypatch, adapter)
    answer = stage.ask(QUESTION, retain=0.3)
    assert answer.visual_tokens == k and answer.memory_tokens == m and answer.retain == 0.3
    embeds, _ = prefills[0]
    start = len(adapter.prompt_ids(QUESTION).prefix)
    visual = embeds[start:start + k]
    assert torch.equal(visual, snap.features[expected].to(visual.dtype))
    credited = stage.memory.scores() - scores
    assert set(credited.nonzero().squeeze(1).tolist()) <= set(expected.tolist())
    assert stage.ask(QUESTION, retain=1.0).visual_tokens == m
    with pytest.raises(ConfigError, match="answer retain"):
        stage.ask(QUESTION, retain=0.0)

"""The adapters reproduce the unmodified transformers models and keep original positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamprune.models.base import DynamicCache
from streamprune.pruning.recipe import build_recipe
from streamprune.types import Selection
from tests.tiny import FAMILIES, random_clip

QUESTION = "what happens ?"


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_logits_equal_transformers_forward(tiny_adapters, family):
    adapter = tiny_adapters[family]
    clip = random_clip()
    with torch.inference_mode():
        reference = adapter.model(**adapter.reference_inputs(clip, QUESTION, fps=2.0)).logits[0]
    video = adapter.encode(clip, fps=2.0)
    ours = adapter.prompt_logits(video, QUESTION)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_method_none_answer_matches_transformers_generate(tiny_adapters, family):
    adapter = tiny_adapters[family]
    clip = random_clip(seed=1)
    inputs = adapter.reference_inputs(clip, QUESTION, fps=2.0)
    with torch.inference_mode():
        generated = adapter.model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = generated[0, inputs["input_ids"].shape[1]:].tolist()
    answer = adapter.answer(clip, QUESTION, build_recipe("none"), fps=2.0, max_new_tokens=6)
    stop = next((i for i, t in enumerate(expected) if t in adapter.eos_ids), len(expected))
    assert answer.token_ids == expected[:stop]


def _positions_reaching_model(adapter, embeds, positions):
    """Run the LM once and capture the position ids its rotary embedding receives."""
    seen = []
    hook = adapter.language_model.rotary_emb.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    try:
        adapter.forward_layers(embeds, positions, DynamicCache())
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_quarter_keeps_original_positions(tiny_adapters, family):
    adapter = tiny_adapters[family]
    clip = random_clip(frames=4)
    video = adapter.encode(clip, fps=2.0)
    recipe = build_recipe("uniform", retain=0.25)
    selection = recipe.select(video.tokens)
    assert len(selection) == len(video.tokens) // 4
    layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
    embeds, positions, kept_slots = layout.keep(selection)
    seen = _positions_reaching_model(adapter, embeds, positions)

    # The positions the unpruned model would use, computed by transformers itself.
    inputs = adapter.reference_inputs(clip, QUESTION, fps=2.0)
    if family == "qwen2_5_vl":
        full, _ = adapter.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"])
        full = full[:, 0]  # [3, L]
        seen = seen[:, 0]
    else:
        full = torch.arange(inputs["input_ids"].shape[1])[None]  # [1, L]
    original_slots = layout.visual_slots[selection.indices]
    assert torch.equal(seen[:, kept_slots], full[:, original_slots])
    # text tokens keep theirs too, and visual tokens are not renumbered contiguously
    assert seen.shape[1] == full.shape[1] - (len(video.tokens) - len(selection))
    assert not torch.equal(seen[:, kept_slots], full[:, layout.visual_slots[: len(selection)]])
    # what reaches the model at the kept slots is the kept tokens' own features
    assert torch.equal(embeds[kept_slots], video.tokens.features[selection.indices].to(embeds.dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_attention_signal_is_a_distribution_over_patches(tiny_adapters, family):
    adapter = tiny_adapters[family]
    video = adapter.encode(random_clip(), fps=2.0, signals=frozenset({"vit_attention"}))
    attention = video.tokens.signals["vit_attention"]
    assert attention.shape == (len(video.tokens),)
    assert (attention > 0).all()
    plain = adapter.encode(random_clip(), fps=2.0)
    assert torch.equal(plain.tokens.features, video.tokens.features)  # the side computation changes nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_inner_llm_attention_matches_eager_attention_weights(tiny_model_dirs, family):
    """The side-computed attention at layer K-1 equals what eager attention reports."""
    from streamprune.models import load_adapter
    from streamprune.models.inner import InnerStage
    from streamprune.pruning.base import Budget, PruneContext
    from streamprune.pruning.registry import make_method

    adapter = load_adapter(tiny_model_dirs[family], "eager")
    clip = random_clip()
    video = adapter.encode(clip, fps=2.0)
    layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
    embeds, positions, kept_slots = layout.keep(Selection(indices=torch.arange(len(video.tokens))))
    method = make_method("vla_pruner", layer=2)  # reads both the last-row and the all-query attention
    stage = InnerStage(adapter, method, Budget(retain=0.5), PruneContext(), kept_slots, embeds[kept_slots])
    adapter.forward_layers(embeds, positions, DynamicCache(), stage)
    with torch.inference_mode():
        out = adapter.model(**adapter.reference_inputs(clip, QUESTION, fps=2.0), output_attentions=True)
    weights = out.attentions[stage.layer - 1][0].mean(0)  # [L, L] head-averaged
    assert torch.allclose(stage.attention["llm_attention_last"], weights[-1, layout.visual_slots], atol=1e-5)
    assert torch.allclose(stage.attention["llm_attention_mean"], weights[:, layout.visual_slots].mean(0), atol=1e-5)
    assert stage.kept == len(video.tokens) // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_stc_cacher_with_full_recompute_matches_plain_encoding(tiny_adapters, family):
    """The cacher path through the adapter (projector, pooling, newline / merger) rebuilds exactly
    the features the model's own video path gives when every token is recomputed."""
    from streamprune.encode.cacher import CacherConfig

    adapter = tiny_adapters[family]
    clip = random_clip(frames=4)
    plain = adapter.encode(clip, fps=2.0)
    cacher = adapter.build_cacher(CacherConfig(update_token_ratio=1.0, cache_interval=4, refresh_threshold=None))
    cached = adapter.encode(clip, fps=2.0, cacher=cacher)
    assert torch.allclose(cached.tokens.features, plain.tokens.features, atol=1e-5)
    assert torch.allclose(cached.always_kept, plain.always_kept)
    assert cacher.stats.frames > 0


def test_stc_pipeline_answers_through_the_cacher(tiny_adapters):
    adapter = tiny_adapters["llava_onevision"]
    recipe = build_recipe("stc")
    assert adapter.new_cacher(recipe) is not None
    answer = adapter.answer(random_clip(frames=4), QUESTION, recipe, fps=2.0, max_new_tokens=2)
    assert answer.visual_tokens_kept <= recipe.budget.count(answer.visual_tokens_in)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_on_a_filled_cache_equals_one_prefill(tiny_adapters, family):
    """Appending a multi-token chunk to a non-empty KV cache gives the same hidden states as
    prefilling the whole sequence at once (the mask must be causal bottom-right)."""
    adapter = tiny_adapters[family]
    video = adapter.encode(random_clip(), fps=2.0)
    layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
    embeds, positions = layout.embeds, layout.positions
    whole = adapter.forward_layers(embeds, positions, DynamicCache())
    cache = DynamicCache()
    split = embeds.shape[0] // 2
    adapter.forward_layers(embeds[:split], positions[:, :split], cache)
    tail = adapter.forward_layers(embeds[split:], positions[:, split:], cache)
    assert torch.allclose(tail, whole[split:], atol=1e-5)


def test_fastvid_on_qwen2_5_vl_runs_the_authors_qwen_variant(tiny_adapters):
    """FastVID's authors ship a separate Qwen2.5-VL algorithm; `--method fastvid` uses it there
    (with its own defaults: retain 0.27) and the LLaVA-OneVision algorithm elsewhere."""
    qwen = tiny_adapters["qwen2_5_vl"].recipe("fastvid")
    llava = tiny_adapters["llava_onevision"].recipe("fastvid")
    assert qwen.name == "fastvid_qwen" and [type(m).__name__ for m in qwen.pre_llm] == ["FastVIDQwen"]
    assert qwen.budget.retain == 0.27
    assert llava.name == "fastvid" and [type(m).__name__ for m in llava.pre_llm] == ["FastVID"]
    answer = tiny_adapters["qwen2_5_vl"].answer(random_clip(frames=4), QUESTION, qwen, fps=2.0, max_new_tokens=2)
    assert answer.visual_tokens_kept <= round(0.27 * answer.visual_tokens_in) + 1


def test_authors_layouts_renumber_and_reorder_the_kept_tokens(tiny_adapters):
    """DivPrune's `layout: contiguous` and HoliTom's `layout: static_first` give the sequence the
    authors' code builds (positions 0..L'-1, static tokens first); the default keeps originals."""
    from streamprune.pruning.base import Budget, PruneContext
    from streamprune.pruning.registry import make_method

    adapter = tiny_adapters["llava_onevision"]
    clip = np.repeat(random_clip(frames=1), 4, axis=0)  # a static clip: every position is static
    clip[2:, :8] = 255 - clip[2:, :8]  # except a changing strip in the last two frames
    video = adapter.encode(clip, fps=2.0, signals=frozenset({"vit_attention"}))
    layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
    n = len(video.tokens)
    for method in ("divprune", "holitom"):
        original = make_method(method)(video.tokens, Budget(retain=0.25), PruneContext())
        authors = make_method(method, layout="static_first" if method == "holitom" else "contiguous")(
            video.tokens, Budget(retain=0.25), PruneContext())
        assert torch.equal(original.indices, authors.indices)
        _, positions, _ = layout.keep(original)
        assert positions.shape[1] == layout.embeds.shape[0] - n + len(original)
        assert not torch.equal(positions[0], torch.arange(positions.shape[1]))  # gaps where tokens were
        embeds, positions, slots = layout.keep(authors)
        assert torch.equal(positions[0], torch.arange(positions.shape[1]))
        assert layout.next_position_for(authors) == positions.shape[1]
        feats = authors.features if authors.features is not None else video.tokens.features[authors.indices]
        assert torch.allclose(embeds[slots], feats.to(embeds.dtype))  # each entry where keep() says it is
        if method == "holitom":
            order = authors.order
            assert order is not None and sorted(order.tolist()) == list(range(len(authors)))
            first_frame = authors.indices[order] < video.tokens.tokens_per_frame
            assert first_frame[0] and not torch.equal(order, torch.arange(len(authors)))  # static (frame 0) first


def test_contiguous_layout_on_mrope_is_a_one_line_error(tiny_adapters):
    from streamprune.errors import ConfigError
    from streamprune.pruning.base import Budget, PruneContext
    from streamprune.pruning.registry import make_method

    adapter = tiny_adapters["qwen2_5_vl"]
    video = adapter.encode(random_clip(frames=4), fps=2.0)
    selection = make_method("divprune", layout="contiguous")(video.tokens, Budget(retain=0.5), PruneContext())
    with pytest.raises(ConfigError, match="needs 1-D positions"):
        adapter.layout(video, adapter.prompt_ids(QUESTION)).keep(selection)

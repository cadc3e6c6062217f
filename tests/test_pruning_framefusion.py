"""FrameFusion on the authors' schedule: same-patch merges before layer 0 and after each layer's
attention while enough tokens merge, the kept count from the cost formula, one prune by the last
query's attention over the merged tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import DynamicCache

from streamprune.errors import ConfigError
from streamprune.models.attention import decoder_queries_keys
from streamprune.models.inner import InnerStage, attention_half, mlp_half
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.framefusion import pruning_ratio
from streamprune.pruning.recipe import build_recipe
from streamprune.pruning.registry import make_method
from streamprune.types import Selection, VisualTokens
from tests.tiny import FAMILIES, random_clip

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "framefusion.yaml"
QUESTION = "what happens ?"


# -- the merge rule and the cost formula on synthetic tokens -------------------------------------------

def chain_tokens() -> VisualTokens:
    """Nine tokens of a 5-frame, 1x2-patch clip whose token (t=1, patch 1) an earlier merge removed.

    Sequence order (t, patch): 0:(0,0) 1:(0,1) 2:(1,0) 3:(2,0) 4:(2,1) 5:(3,0) 6:(3,1) 7:(4,0) 8:(4,1).
    Patch 0: 2 ~ 0 and 3 ~ 2 but 3 is orthogonal to 0 (a drifting run), 5 starts anew, 7 ~ 5.
    Patch 1: 4 ~ 1 (its previous survivor, two frames back); 6 is close to 5 (same frame, other
    patch) but orthogonal to 4, so it must not merge; 8 is new."""
    e = torch.eye(8)
    x = torch.stack([e[0], e[4], e[0] + 0.8 * e[1], e[1], e[4] + 0.2 * e[5], e[2], e[2] + 0.05 * e[6],
                     e[2] + 0.1 * e[3], e[7]])
    thw = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 0, 0], [2, 0, 0], [2, 0, 1], [3, 0, 0], [3, 0, 1], [4, 0, 0],
                        [4, 0, 1]])
    return VisualTokens(features=x, thw=thw, grid=(5, 1, 2), signals={})


def test_pruning_ratio_is_the_codes_cost_formula() -> None:
    assert pruning_ratio([], 0.3, 28) == pytest.approx(0.7)
    assert pruning_ratio([0.2], 0.3, 28) == pytest.approx(1 - (8.4 - 0.8) / (27 * 0.8))
    assert pruning_ratio([0.2, 0.5], 0.3, 28) == pytest.approx(1 - (8.4 - 0.8 - 0.4) / (26 * 0.4))
    assert pruning_ratio([0.5], 0.9, 4) == 0.0  # the remaining layers may keep every token
    with pytest.raises(ConfigError, match="too small"):  # the code raises ValueError here
        pruning_ratio([0.0], 0.02, 28)


def test_merge_joins_each_run_of_a_patch_into_the_token_before_it_as_a_plain_mean() -> None:
    tokens = chain_tokens()
    x = tokens.features
    schedule = make_method("framefusion", cost=0.3).schedule(tokens.thw, tokens.grid, limit=9, depth=10)
    selection = schedule.merge(0, x)  # 4/9 merge, below the bound 1 - 0.3
    assert selection.indices.tolist() == [0, 1, 5, 6, 8]
    expected = torch.stack([x[[0, 2, 3]].mean(0), x[[1, 4]].mean(0), x[[5, 7]].mean(0), x[6], x[8]])
    torch.testing.assert_close(selection.features, expected, atol=1e-6, rtol=0)
    assert schedule.sparsities == [pytest.approx(4 / 9)]
    assert schedule.patch.tolist() == [0, 1, 0, 1, 1]


def test_merging_continues_while_the_ratio_reaches_ratio_lower_bound_then_one_prune() -> None:
    tokens = chain_tokens()
    # cost 0.3 with no budget cap (limit 9): the count is the formula's alone
    schedule = make_method("framefusion", cost=0.3).schedule(tokens.thw, tokens.grid, limit=9, depth=10)
    assert schedule.action(0) == "merge"
    merged = schedule.merge(0, tokens.features)  # 4/9 >= 0.1: merging goes on at the next point
    assert schedule.action(1) == "merge"
    assert schedule.merge(1, merged.features) is None  # nothing similar is left: 0 < 0.1
    assert schedule.action(2) == "prune" and schedule.sparsities == [pytest.approx(4 / 9), 0.0]
    attention = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    kept = schedule.prune(2, attention)
    k = round(5 * (1 - pruning_ratio([4 / 9, 0.0], 0.3, 28)))
    assert len(kept) == k == 3 and kept.indices.tolist() == [1, 3, 4]
    assert schedule.done and schedule.action(3) is None
    assert schedule.history == [(0, "merge", 9, 5), (1, "merge", 5, 5), (2, "prune", 5, 3)]


def test_merge_reaching_the_cost_merges_only_the_most_similar_and_ends_without_pruning() -> None:
    tokens = chain_tokens()
    # limit 6 of 9: cost 2/3, bound 1/3 <= 4/9 merging, so the 3 most similar merge (9 - 3 = 6)
    schedule = make_method("framefusion").schedule(tokens.thw, tokens.grid, limit=6, depth=10)
    selection = schedule.merge(0, tokens.features)
    x = tokens.features
    assert selection.indices.tolist() == [0, 1, 3, 5, 6, 8]  # 7 (0.995), 4 (0.98), 2 (0.78) merged; 3 stays
    torch.testing.assert_close(selection.features[0], x[[0, 2]].mean(0))
    assert schedule.done and schedule.sparsities == [] and schedule.action(1) is None


def test_prune_never_exceeds_the_budget() -> None:
    tokens = chain_tokens()
    schedule = make_method("framefusion", cost=1.0).schedule(tokens.thw, tokens.grid, limit=2, depth=1)
    merged = schedule.merge(0, tokens.features)  # cost 1: bound 0, the bound case merges down to the limit
    assert len(merged) == 5 and not schedule.done and schedule.action(1) == "prune"
    assert len(schedule.prune(1, torch.rand(5))) == 2


def test_select_is_the_schedule_on_one_point() -> None:
    tokens = chain_tokens()
    attention = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.0, 0.2, 0.8, 0.0, 0.5])
    tokens.signals["llm_attention_last"] = attention
    selection = make_method("framefusion")(tokens, Budget(max_tokens=3))
    # merge to [0, 1, 5, 6, 8]; k = round(5 * (1 - ratio)) with cost 3/9 and sparsity 4/9 -> 3
    assert selection.indices.tolist() == [1, 6, 8]
    torch.testing.assert_close(selection.features[0], tokens.features[[1, 4]].mean(0))


@pytest.mark.parametrize("options", [{"cost": 0.0}, {"cost": 1.5}, {"similarity_lower_bound": 2.0},
                                     {"ratio_lower_bound": -0.1}, {"num_layers": 0}])
def test_framefusion_bad_options_are_config_errors(options) -> None:
    with pytest.raises(ConfigError):
        make_method("framefusion", **options)


def test_framefusion_yaml_runs_the_schedule_inside_the_llm() -> None:
    (stage,) = yaml.safe_load(CONFIG.read_text())["stages"]
    assert stage["method"] == "framefusion"
    recipe = build_recipe("framefusion")
    assert recipe.inner_llm.name == "framefusion" and not recipe.pre_llm and recipe.budget.retain == 0.3


# -- on tiny real models ------------------------------------------------------------------------------------

def deepened(adapter, depth: int, seed: int = 0):
    """`adapter` with its decoder stack grown to `depth` layers (perturbed copies of its own), so the
    schedule has room to merge for several layers before it must prune."""
    layers = adapter.language_model.layers
    base, g = len(layers), torch.Generator().manual_seed(seed)
    while len(layers) < depth:
        layer = copy.deepcopy(layers[len(layers) % base])
        layer.self_attn.layer_idx = len(layers)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        layers.append(layer)
    return adapter


def reference(adapter, embeds, positions, slots, patch, limit, threshold, ratio_lower_bound=0.1, num_layers=28):
    """The authors' schedule written out plainly (loops over tokens; eager attention weights), run
    on an eager model: -> (final hidden `[L', C]`, events, surviving original indices, the prune
    step's attention row, each layer's rotated keys)."""
    lm = adapter.language_model
    depth, cost = len(lm.layers), limit / len(slots)
    h, pos = embeds[None].clone(), positions.clone()
    vis, origin, pat = slots.tolist(), list(range(len(slots))), patch.tolist()
    state = {"sparsities": [], "merging": True, "pruned": False, "row": None}
    events, keys = [], []

    def ratio_needed() -> float:
        share, spent = 1.0, 0.0
        for s in state["sparsities"]:
            share *= 1 - s
            spent += share
        return max(0.0, 1 - (num_layers * cost - spent) / ((num_layers - len(state["sparsities"])) * share))

    def keep_visual(keep: list[int], h: torch.Tensor) -> torch.Tensor:
        nonlocal pos, vis, origin, pat
        dropped = set(vis) - {vis[j] for j in keep}
        rows = [r for r in range(h.shape[1]) if r not in dropped]
        index = {r: i for i, r in enumerate(rows)}
        vis, origin, pat = [index[vis[j]] for j in keep], [origin[j] for j in keep], [pat[j] for j in keep]
        pos = pos[:, rows]
        return h[:, rows]

    def merge(point: int, h: torch.Tensor) -> torch.Tensor:
        n, bound = len(vis), ratio_needed()
        previous, sims = {}, {}
        for j in range(n):
            if pat[j] in previous:
                sims[j] = F.cosine_similarity(h[0, vis[previous[pat[j]]]], h[0, vis[j]], dim=0).item()
            previous[pat[j]] = j
        above = [j for j, s in sims.items() if s >= threshold]
        if len(above) / n < bound:
            merged = set(above)
            state["sparsities"].append(len(above) / n)
            state["merging"] = len(above) / n >= ratio_lower_bound and point < depth - 2
        else:
            count = min(len(above), max(int(bound * n), n - limit))
            merged = set(sorted(sims, key=lambda j: -sims[j])[:count])
            state["merging"], state["pruned"] = False, n - count <= limit
        events.append((point, "merge", n, n - len(merged)))
        groups, anchor = {}, {}
        for j in range(n):
            if j in merged:
                groups[anchor[pat[j]]].append(j)
            else:
                anchor[pat[j]], groups[j] = j, [j]
        out = h.clone()
        for a, members in groups.items():
            out[0, vis[a]] = torch.stack([h[0, vis[m]] for m in members]).mean(0)
        return keep_visual(sorted(groups), out)

    h = merge(0, h)
    for i, layer in enumerate(lm.layers):
        rope = lm.rotary_emb(h, adapter._position_ids(pos))
        keys.append(decoder_queries_keys(layer, h, rope)[1])
        out, weights = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope,
                                       attention_mask=adapter._causal_mask(h.shape[1], 0, h.dtype))
        h = h + out
        if state["merging"]:
            h = merge(i + 1, h)
        elif not state["pruned"]:
            row = weights[0, :, -1].mean(0)[vis]
            n = len(vis)
            k = min(limit, max(1, round(n * (1 - ratio_needed()))))
            keep = sorted(sorted(range(n), key=lambda j: -row[j].item())[:k])
            events.append((i + 1, "prune", n, k))
            state["pruned"], state["row"] = True, row
            h = keep_visual(keep, h)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return lm.norm(h)[0], events, origin, state["row"], keys


def prefill_inputs(adapter, clip):
    video = adapter.encode(clip, fps=2.0)
    layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
    embeds, positions, slots = layout.keep(Selection(indices=torch.arange(len(video.tokens))))
    return video, embeds, positions, slots


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layer_halves_are_the_layer(tiny_adapters, family) -> None:
    adapter = tiny_adapters[family]
    _, embeds, positions, _ = prefill_inputs(adapter, random_clip())
    lm = adapter.language_model
    hidden = embeds[None]
    rope = lm.rotary_emb(hidden, adapter._position_ids(positions))
    with torch.inference_mode():
        for layer in lm.layers:
            whole = layer(hidden, attention_mask=None, position_embeddings=rope, cache=DynamicCache(), use_cache=True)
            split = mlp_half(layer, attention_half(layer, hidden, None, rope, DynamicCache()))
            assert torch.equal(whole, split)
            hidden = whole


# (frames, seed, repeat every other frame, retain, S_th, the schedule's steps)
SCHEDULES = {
    "merges_for_four_points_then_prunes": (4, 0, True, 0.15, 0.9, [
        (0, "merge", 64, 32), (1, "merge", 32, 25), (2, "merge", 25, 16), (3, "merge", 16, 16),
        (4, "prune", 16, 7)]),
    "a_merge_reaching_the_cost_ends_it": (8, 1, False, 0.3, 0.6, [(0, "merge", 128, 81), (1, "merge", 81, 37)]),
}


@pytest.mark.parametrize("case", SCHEDULES)
def test_framefusion_runs_the_authors_schedule_on_a_tiny_model(tiny_model_dirs, case) -> None:
    """Against the schedule written out plainly on an eager model: the same steps at the same
    points (the first before layer 0, merges layer by layer while >= ratio_lower_bound merge, the
    prune in the next layer), the cost formula's count, the last query's attention over the merged
    tokens at the pruning layer, the same survivors, hidden states and per-layer KV cache."""
    from streamprune.models import load_adapter

    frames, seed, repeat, retain, threshold, steps = SCHEDULES[case]
    sdpa = deepened(load_adapter(tiny_model_dirs["llava_onevision"], "sdpa"), 6)
    eager = deepened(load_adapter(tiny_model_dirs["llava_onevision"], "eager"), 6)
    clip = random_clip(frames=frames, seed=seed)
    if repeat:
        clip[1::2] = clip[::2]
    video, embeds, positions, slots = prefill_inputs(sdpa, clip)
    n, budget = len(video.tokens), Budget(retain=retain)
    method = make_method("framefusion", similarity_lower_bound=threshold)
    stage = InnerStage(sdpa, method, budget, PruneContext(), slots, embeds[slots], video.tokens.thw, video.tokens.grid)
    cache = DynamicCache()
    hidden = sdpa.forward_layers(embeds, positions, cache, stage)
    assert sdpa.language_model.config._attn_implementation == "sdpa"

    assert stage.schedule.history == steps
    patch = video.tokens.thw[:, 1] * video.tokens.grid[2] + video.tokens.thw[:, 2]
    with torch.inference_mode():
        out, events, origin, row, keys = reference(eager, embeds, positions, slots, patch, budget.count(n), threshold)
    assert events == steps
    assert stage.survivors.tolist() == origin and stage.kept == len(origin) <= budget.count(n)
    torch.testing.assert_close(hidden, out, atol=1e-5, rtol=0)
    for i, k in enumerate(keys):  # each layer cached what reached its attention, at original positions
        torch.testing.assert_close(cache.layers[i].keys[0], k, atol=1e-5, rtol=0)
    text = embeds.shape[0] - n
    assert stage.reached == [k.shape[1] - text for k in keys]
    assert cache.layers[0].keys.shape[2] == text + steps[0][3] < text + n  # merged before layer 0
    if steps[-1][1] == "prune":
        merges = [s for s in steps if s[1] == "merge"]
        ratios = [1 - after / before for _, _, before, after in merges]
        assert [s[0] for s in merges] == list(range(len(merges)))
        assert all(r >= 0.1 for r in ratios[:-1]) and ratios[-1] < 0.1
        point, _, before, after = steps[-1]
        assert point == len(merges) and after == round(before * (1 - pruning_ratio(ratios, budget.count(n) / n, 28)))
        # the row of the pruning layer over the merged tokens, not layer 0's over all n
        assert stage.attention["llm_attention_last"].shape == (before,) and before < n
        torch.testing.assert_close(stage.attention["llm_attention_last"], row, atol=1e-5, rtol=0)
    else:
        assert stage.attention == {}


def test_framefusion_answers_on_one_frame_policies(tmp_path_factory) -> None:
    """A VLA sees one frame: nothing merges, the prune comes inside layer 0, and the action tap
    reads the survivors from layer 1 on."""
    from streamprune.models.tiny import save_tiny_vla
    from streamprune.models.vla import VLAPolicy

    policy = VLAPolicy.load(save_tiny_vla(tmp_path_factory.mktemp("vla") / "policy", action_dim=2))
    recipe = build_recipe("framefusion", retain=0.25)
    image = np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)
    a = policy.act(image, "reach the red circle", recipe, PruneContext())
    b = policy.act(image, "reach the red circle", recipe, PruneContext())
    assert np.array_equal(a.action, b.action)
    assert 0 < a.visual_tokens_kept <= recipe.budget.count(a.visual_tokens_in)
    assert int((a.action_attention > 0).sum()) == a.visual_tokens_kept

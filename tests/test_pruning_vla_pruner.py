"""VLA-Pruner: dual-level selection, temporal smoothing of action attention, per-episode history."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.registry import make_method
from streamprune.pruning.vla_pruner import (
    HISTORY_KEY,
    push_action_attention,
    reset_action_history,
    smoothed_action_attention,
)
from streamprune.types import VisualTokens

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "vla_pruner.yaml"


def vla_tokens(semantic: torch.Tensor, embeds: torch.Tensor, side: int | None = None) -> VisualTokens:
    """Visual tokens of one camera image (grid 1 x side x side, or 1 x 1 x N)."""
    n = semantic.numel()
    h, w = (side, n // side) if side else (1, n)
    return VisualTokens(
        features=embeds.clone(),
        thw=VisualTokens.grid_positions(1, h, w),
        grid=(1, h, w),
        signals={"llm_attention_mean": semantic, "llm_attention_last": semantic.flip(0), "input_embeds": embeds},
    )


def one_hot(n: int, hot: list[int], value: float = 1.0) -> torch.Tensor:
    v = torch.full((n,), 0.01)
    v[hot] = value
    return v


def warm(method, ctx: PruneContext, action: torch.Tensor) -> None:
    for _ in range(method.config.window):
        method.observe_action(ctx, action)


def test_vla_pruner_keeps_top_tokens_of_both_semantic_and_action_maps() -> None:
    n, k = 16, 4
    semantic = torch.linspace(1.0, 0.0, n)  # semantic top-4: 0..3
    action = torch.linspace(0.0, 1.0, n)  # action top-4: 12..15
    # each map's top tokens look alike (two views of one object each): the union has both objects
    g = torch.Generator().manual_seed(0)
    embeds = torch.eye(n) + 0.05 * torch.randn(n, n, generator=g)
    embeds[:4] += 3 * torch.eye(n)[5]
    embeds[12:] += 3 * torch.eye(n)[6]
    method = make_method("vla_pruner")
    ctx = PruneContext()
    warm(method, ctx, action)
    kept = set(method(vla_tokens(semantic, embeds), Budget(max_tokens=k), ctx).indices.tolist())
    assert len(kept) == k
    assert kept & {0, 1, 2, 3}, "a semantic-only top token must survive"
    assert kept & {12, 13, 14, 15}, "an action-only top token must survive"
    assert kept <= {0, 1, 2, 3, 12, 13, 14, 15}


def test_vla_pruner_filters_redundant_duplicates_by_max_min_diversity() -> None:
    n, k = 16, 4
    semantic = torch.linspace(1.0, 0.0, n)  # top-4: 0..3
    action = torch.linspace(0.0, 1.0, n)  # top-4: 12..15
    embeds = torch.eye(n)
    # candidates come in duplicate pairs: {0,1}, {2,3}, {12,13}, {14,15}
    for a, b in [(0, 1), (2, 3), (12, 13), (14, 15)]:
        embeds[b] = embeds[a]
    method = make_method("vla_pruner")
    ctx = PruneContext()
    warm(method, ctx, action)
    kept = method(vla_tokens(semantic, embeds), Budget(max_tokens=k), ctx).indices.tolist()
    pairs = [{0, 1}, {2, 3}, {12, 13}, {14, 15}]
    assert [len(set(kept) & p) for p in pairs] == [1, 1, 1, 1], kept


def test_vla_pruner_union_within_budget_is_kept_whole() -> None:
    n = 12
    semantic = one_hot(n, [1, 4, 7])
    action = one_hot(n, [7, 4, 1])
    method = make_method("vla_pruner")
    ctx = PruneContext()
    warm(method, ctx, action)
    g = torch.Generator().manual_seed(0)
    kept = method(vla_tokens(semantic, torch.randn(n, 8, generator=g)), Budget(max_tokens=3), ctx)
    assert kept.indices.tolist() == [1, 4, 7]


def test_vla_pruner_smoothing_weights_the_oldest_step_most_as_the_code_does() -> None:
    # predict_action ~L573-576: weights gamma^(w-1..0) paired with history[-1-i]: oldest weighs 1
    ctx = PruneContext()
    for step in range(3):  # step 0 oldest, step 2 most recent
        push_action_attention(ctx, one_hot(4, [step]))
    smoothed = smoothed_action_attention(ctx, window=3, gamma=0.8)
    raw = torch.stack([one_hot(4, [s]) for s in range(3)])
    expected = raw[0] + 0.8 * raw[1] + 0.8**2 * raw[2]
    torch.testing.assert_close(smoothed, expected / expected.sum(), atol=1e-5, rtol=0)
    assert smoothed[0] > smoothed[1] > smoothed[2]
    assert float(smoothed.sum()) == pytest.approx(1.0)


def test_vla_pruner_paper_smoothing_order_weights_the_newest_step_most() -> None:
    ctx = PruneContext()
    for step in range(3):
        push_action_attention(ctx, one_hot(4, [step]))
    smoothed = smoothed_action_attention(ctx, window=3, gamma=0.8, order="paper")
    raw = torch.stack([one_hot(4, [s]) for s in range(3)])
    expected = 0.8**2 * raw[0] + 0.8 * raw[1] + raw[2]
    torch.testing.assert_close(smoothed, expected / expected.sum(), atol=1e-5, rtol=0)
    assert smoothed[2] > smoothed[1] > smoothed[0]


def order_exposing_case() -> tuple[VisualTokens, list[torch.Tensor]]:
    """The oldest step points at tokens {2, 3}, the newest at {6, 7}; semantic top-2 is {2, 3}.
    Code order: action top-2 = {2, 3} = semantic top-2, the union is the budget, no filtering.
    Paper order: action top-2 = {6, 7}, the union of 4 goes through max-min diversity, where the
    duplicates 2 = 3 and 6 ~ 7 leave one of each pair."""
    n = 8
    history = [one_hot(n, [2, 3]), torch.full((n,), 0.01), one_hot(n, [6, 7])]  # oldest first
    embeds = torch.eye(n)
    embeds[3] = embeds[2]
    embeds[7] = embeds[6] + 0.05 * torch.eye(n)[0]
    return vla_tokens(one_hot(n, [2, 3]), embeds), history


def test_vla_pruner_default_smoothing_order_selects_by_the_oldest_step() -> None:
    tokens, history = order_exposing_case()
    method = make_method("vla_pruner")
    assert method.config.smoothing_order == "code"
    ctx = PruneContext()
    for vec in history:
        method.observe_action(ctx, vec)
    assert method(tokens, Budget(max_tokens=2), ctx).indices.tolist() == [2, 3]


def test_vla_pruner_paper_smoothing_order_selects_by_the_newest_step() -> None:
    tokens, history = order_exposing_case()
    method = make_method("vla_pruner", smoothing_order="paper")
    ctx = PruneContext()
    for vec in history:
        method.observe_action(ctx, vec)
    kept = method(tokens, Budget(max_tokens=2), ctx).indices.tolist()
    assert len(kept) == 2 and kept[0] in (2, 3) and kept[1] in (6, 7), kept


def test_vla_pruner_outside_an_episode_warm_up_selects_by_semantic_level_only() -> None:
    # no start_stream (video QA, a bare context): no action feedback to wait for, so prune by S_vl
    n = 10
    semantic = torch.rand(n, generator=torch.Generator().manual_seed(1))
    tokens = vla_tokens(semantic, torch.randn(n, 6, generator=torch.Generator().manual_seed(2)))
    method = make_method("vla_pruner")
    ctx = PruneContext()
    method.observe_action(ctx, one_hot(n, [0, 1, 2]))  # 1 of 3 steps: still warming up
    kept = method(tokens, Budget(max_tokens=3), ctx).indices
    assert kept.tolist() == semantic.topk(3).indices.sort().values.tolist()


def run_episode(method, tokens: VisualTokens, actions: list[torch.Tensor], k: int) -> tuple[list, PruneContext]:
    """One episode: start_stream, then per step select and feed back that step's action attention."""
    ctx = PruneContext()
    method.start_stream(ctx)
    kept = []
    for i, action in enumerate(actions):
        kept.append(method(tokens, Budget(max_tokens=k), ctx).indices.tolist())
        method.observe_action(ctx, action)
        assert len(ctx.state[HISTORY_KEY]) == min(i + 1, method.config.window)  # every step recorded
    return kept, ctx


def test_vla_pruner_first_window_steps_of_an_episode_run_unpruned_and_are_recorded() -> None:
    # predict_action ~L568/L593-603: fastv_r=0 until the history holds w vectors; ~L612-618 records them
    n, k = 10, 2
    semantic = torch.linspace(1.0, 0.0, n)  # semantic top-2: {0, 1}, duplicates, so the action gets a seat
    embeds = torch.eye(n)
    embeds[1] = embeds[0]
    method = make_method("vla_pruner")
    assert method.config.warmup == "unpruned"
    actions = [one_hot(n, [8, 9]) for _ in range(5)]
    kept, ctx = run_episode(method, vla_tokens(semantic, embeds), actions, k)
    assert kept[:3] == [list(range(n))] * 3
    assert all(len(step) == k and set(step) & {8, 9} and set(step) & {0, 1} for step in kept[3:]), kept
    # a new episode warms up again
    method.start_stream(ctx)
    assert HISTORY_KEY not in ctx.state
    assert method(vla_tokens(semantic, embeds), Budget(max_tokens=k), ctx).indices.tolist() == list(range(n))


def test_vla_pruner_semantic_warm_up_option_prunes_the_first_steps_by_semantic_level() -> None:
    n, k = 10, 2
    semantic = torch.linspace(1.0, 0.0, n)
    embeds = torch.eye(n)
    embeds[1] = embeds[0]
    method = make_method("vla_pruner", warmup="semantic")
    actions = [one_hot(n, [8, 9]) for _ in range(5)]
    kept, _ = run_episode(method, vla_tokens(semantic, embeds), actions, k)
    assert kept[:3] == [[0, 1]] * 3
    assert all(set(step) & {8, 9} for step in kept[3:]), kept


def test_vla_pruner_history_resets_per_episode() -> None:
    n = 10
    semantic = torch.linspace(1.0, 0.0, n)
    embeds = torch.eye(n)
    embeds[1] = embeds[0]  # semantic top-2 are duplicates, so the action level gets a seat
    tokens = vla_tokens(semantic, embeds)
    method = make_method("vla_pruner")
    ctx = PruneContext()
    warm(method, ctx, torch.linspace(0.0, 1.0, n))
    assert set(method(tokens, Budget(max_tokens=2), ctx).indices.tolist()) & {8, 9}  # action level active
    reset_action_history(ctx)  # new episode
    assert smoothed_action_attention(ctx) is None
    assert method(tokens, Budget(max_tokens=2), ctx).indices.tolist() == [0, 1]


def test_vla_pruner_history_of_another_token_count_is_dropped() -> None:
    n = 8
    method = make_method("vla_pruner")
    ctx = PruneContext()
    warm(method, ctx, torch.rand(n + 4))
    semantic = torch.linspace(1.0, 0.0, n)
    assert method(vla_tokens(semantic, torch.eye(n)), Budget(max_tokens=2), ctx).indices.tolist() == [0, 1]
    assert smoothed_action_attention(ctx) is None


def test_vla_pruner_last_token_semantic_variant_reads_that_signal() -> None:
    n = 8
    semantic = torch.linspace(1.0, 0.0, n)  # llm_attention_last is its flip: top is token 7
    method = make_method("vla_pruner", semantic="llm_attention_last")
    assert method(vla_tokens(semantic, torch.eye(n)), Budget(max_tokens=1), PruneContext()).indices.tolist() == [7]


@pytest.mark.parametrize("seed", range(10))
def test_vla_pruner_exact_budget_over_random_shapes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    side = int(torch.randint(1, 9, (1,), generator=g))
    n = side * side
    tokens = vla_tokens(torch.rand(n, generator=g), torch.randn(n, 8, generator=g), side=side)
    method = make_method("vla_pruner")
    ctx = PruneContext()
    for _ in range(int(torch.randint(0, 5, (1,), generator=g))):
        method.observe_action(ctx, torch.rand(n, generator=g))
    budget = Budget(retain=float(torch.empty(1).uniform_(0.01, 1.0, generator=g)))
    selection = method(tokens, budget, ctx)
    assert len(selection) == budget.count(n)
    assert torch.all(selection.indices[1:] > selection.indices[:-1])


def test_vla_pruner_is_deterministic() -> None:
    n = 36
    g = torch.Generator().manual_seed(3)
    tokens = vla_tokens(torch.rand(n, generator=g), torch.randn(n, 8, generator=g), side=6)
    action = torch.rand(n, generator=g)
    results = []
    for _ in range(2):
        method, ctx = make_method("vla_pruner"), PruneContext(seed=5)
        warm(method, ctx, action)
        results.append(method(tokens, Budget(retain=0.25), ctx).indices)
    assert torch.equal(results[0], results[1])


def test_vla_pruner_bad_options_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        make_method("vla_pruner", gamma=0.0)
    with pytest.raises(ConfigError):
        make_method("vla_pruner", semantic="vit_attention")
    with pytest.raises(ConfigError):
        make_method("vla_pruner", smoothing_order="newest")
    with pytest.raises(ConfigError):
        make_method("vla_pruner", warmup="none")


def test_vla_pruner_yaml_builds_inner_stage() -> None:
    spec = yaml.safe_load(CONFIG.read_text())
    (stage,) = spec["stages"]
    method = make_method(stage["method"], **stage["options"])
    assert method.stage == "inner_llm" and method.config.layer == 3
    assert (method.config.smoothing_order, method.config.warmup) == ("code", "unpruned")  # the code's defaults

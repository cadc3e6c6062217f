"""The VLA policy: action tokens, action-decode attention, VLA-Pruner wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamprune.models.vla import ActionTokenizer, VLAPolicy
from streamprune.pruning.base import PruneContext
from streamprune.pruning.recipe import build_recipe
from streamprune.pruning.vla_pruner import HISTORY_KEY


@pytest.fixture(scope="module")
def vla_dir(tmp_path_factory):
    from streamprune.models.tiny import save_tiny_vla

    return save_tiny_vla(tmp_path_factory.mktemp("vla") / "policy", action_dim=2)


def _image(seed=0):
    return np.random.RandomState(seed).randint(0, 255, (32, 32, 3), dtype=np.uint8)


def test_action_tokens_round_trip_within_one_bin():
    tok = ActionTokenizer(vocab_size=1000, dims=3)
    actions = np.random.RandomState(0).uniform(-1, 1, (100, 3))
    for a in actions:
        ids = tok.to_ids(a)
        assert all(tok.first_id <= i < 1000 for i in ids)
        assert np.abs(tok.to_action(ids) - a).max() <= 1.0 / tok.bins + 1e-6
    assert tok.to_ids(np.array([-5.0, 5.0, 1.0])) == [tok.first_id, 999, 999]


def test_policy_acts_deterministically_in_range(vla_dir):
    policy = VLAPolicy.load(vla_dir)
    recipe = build_recipe("none")
    a = policy.act(_image(), "reach the red circle", recipe, PruneContext())
    b = policy.act(_image(), "reach the red circle", recipe, PruneContext())
    assert a.action.shape == (2,) and np.all(np.abs(a.action) <= 1)
    assert np.array_equal(a.action, b.action)
    assert a.visual_tokens_kept == a.visual_tokens_in


def test_action_attention_matches_eager_weights(vla_dir):
    """The tap's attention equals the eager attention rows of the action-decoding queries."""
    from streamprune.models import load_adapter

    adapter = load_adapter(vla_dir, "eager")
    policy = VLAPolicy(adapter, VLAPolicy.load(vla_dir).actions)
    step = policy.act(_image(), "reach the red circle", build_recipe("none"), PruneContext())
    ids = policy.actions.to_ids(step.action)
    video = adapter.encode(_image()[None])
    inputs = adapter.reference_inputs(_image()[None], "reach the red circle")
    full = torch.cat([inputs["input_ids"], torch.tensor([ids[:-1]])], dim=1)
    with torch.inference_mode():
        out = adapter.model(input_ids=full, pixel_values_videos=inputs["pixel_values_videos"], output_attentions=True)
    weights = out.attentions[policy.action_layer][0].mean(0)  # [L, L]
    layout = adapter.layout(video, adapter.prompt_ids("reach the red circle"))
    n_prompt = inputs["input_ids"].shape[1]
    queries = torch.arange(n_prompt - 1, full.shape[1])  # last prompt token + decoded action tokens
    expected = weights[queries][:, layout.visual_slots].mean(0)
    assert torch.allclose(step.action_attention, expected, atol=1e-5)


def test_vla_pruner_uses_action_history_after_warmup(vla_dir):
    policy = VLAPolicy.load(vla_dir)
    recipe = build_recipe("vla_pruner", retain=0.25)
    ctx = PruneContext()
    steps = [policy.act(_image(i), "reach the red circle", recipe, ctx) for i in range(4)]
    budget = recipe.budget.count(steps[0].visual_tokens_in)
    assert all(s.visual_tokens_kept <= budget for s in steps)
    assert len(ctx.state[HISTORY_KEY]) == 3
    # pruned tokens get no action attention; kept ones share all of it
    last = steps[-1].action_attention
    assert int((last > 0).sum()) <= budget
    policy.reset(recipe, ctx)
    assert HISTORY_KEY not in ctx.state

"""pipelines.train_vla trains exactly the layout VLAPolicy runs: a short run's checkpoint, loaded
through VLAPolicy, picks the same action tokens as the trainer's own batched forward pass."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from envs import PICKCOLOR_ID, make_env


def test_trainer_and_policy_agree_on_layout_and_actions(tmp_path) -> None:
    from pipelines import train_vla
    from streamprune.models.vla import VLAPolicy
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.recipe import build_recipe

    out = tmp_path / "vla"
    metrics = train_vla.main(["--out", str(out), "--steps", "2", "--episodes", "6", "--eval-every", "2",
                              "--val-episodes", "2", "--heldout-episodes", "0", "--image-size", "32"])
    assert metrics["steps"] == 2 and metrics["data"]["episodes"] == 6
    policy = VLAPolicy.load(out)
    tokenizer = policy.adapter.tokenizer
    size = replace(train_vla.SIZE, image_size=32)
    batcher = train_vla.Batcher(tokenizer, size, ["reach the red circle", "reach the blue square"], policy.actions)
    env = make_env(PICKCOLOR_ID, image_size=32)
    obs, _ = env.reset(seed=5)
    model = policy.adapter.model
    for text in batcher.prompts:
        with torch.no_grad():
            batch = batcher.inputs(obs["image"][None], [text])
            first = train_vla.action_logits(model, batch, policy.actions, 1)[:, -1].argmax(-1) + policy.actions.first_id
            second = train_vla.action_logits(model, batcher.inputs(obs["image"][None], [text], first),
                                             policy.actions, 1)[:, -1].argmax(-1) + policy.actions.first_id
        expected = policy.actions.to_action([int(first[0]), int(second[0])])
        step = policy.act(obs["image"], text, build_recipe("none"), PruneContext(seed=0))
        np.testing.assert_array_equal(step.action, expected)
    env.close()

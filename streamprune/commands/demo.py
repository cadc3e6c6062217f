"""`streamprune demo`: the first thing to run; held-out synthetic questions on the default model."""

from __future__ import annotations

from streamprune.config import DemoConfig


def run(config: DemoConfig) -> int:
    from streamprune.data.synthetic_qa import make_items
    from streamprune.models import load_model
    from streamprune.models.default import TRAINED_DIR, trained_data_version
    from streamprune.pruning.base import PruneContext
    from streamprune.pruning.recipe import build_recipe

    build_recipe(config.method, retain=config.retain, max_tokens=config.max_tokens)  # a bad name fails before loading
    adapter = load_model(config.model, config.placement)
    recipe = adapter.recipe(config.method, retain=config.retain, max_tokens=config.max_tokens)
    if adapter.model_dir != TRAINED_DIR and config.model == "default":
        print("note: the trained default model is not installed; using a tiny random model (answers are noise)")
    items = make_items("test", num_clips=config.n, version=trained_data_version(adapter.model_dir))[: config.n]
    correct = 0
    for i, item in enumerate(items, 1):
        answer = adapter.answer(item.clip, item.question, recipe, PruneContext(), fps=8.0, max_new_tokens=4)
        ok = answer.text == item.answer
        correct += ok
        print(f"[{i}/{len(items)}] Q: {item.question}\n      A: {answer.text!r}  truth: {item.answer!r}  "
              f"{'ok' if ok else 'WRONG'}  tokens kept {answer.visual_tokens_kept}/{answer.visual_tokens_in}")
    print(f"accuracy: {correct}/{len(items)} = {correct / len(items):.1%} "
          f"(method {recipe.name}, retain {recipe.budget.retain}, model {adapter.model_dir})")
    return 0

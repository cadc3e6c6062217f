"""A pruning recipe: an encoder stage (STC-Cacher), pre-LLM selectors applied in order, then at
most one inner-LLM stage; read from configs/methods/NAME.yaml or a single registered method.

Each stage sees the previous stage's survivors; selections compose back to indices of the
original tokens, so positions stay the originals however many stages run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from streamprune.config import MethodConfig, StageConfig, from_dict, method_config, recipe_file
from streamprune.encode.cacher import CacherConfig
from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.registry import available, make_method
from streamprune.types import Selection, VisualTokens

# Stages that act in the vision encoder rather than on tokens (configured, not registered): their options.
ENCODER_STAGES = {"stc_cacher": CacherConfig}


@dataclass
class PruningRecipe:
    """What to do to a video's visual tokens; `encoder_options` configure encoder stages (applied by
    `VideoLLMAdapter.encode_for`), `pre_llm` run on the LLM-input tokens, `inner_llm` in the prefill."""

    name: str
    budget: Budget
    pre_llm: list[PruningMethod] = field(default_factory=list)
    inner_llm: PruningMethod | None = None
    encoder_options: dict[str, dict] = field(default_factory=dict)

    @property
    def requires(self) -> frozenset[str]:
        """Vision-side signals the pre-LLM stages read."""
        return frozenset().union(*(m.requires for m in self.pre_llm)) if self.pre_llm else frozenset()

    @property
    def optional(self) -> frozenset[str]:
        """Vision-side signals the pre-LLM stages use when the adapter can make them."""
        return frozenset().union(*(m.optional for m in self.pre_llm)) if self.pre_llm else frozenset()

    def select(self, tokens: VisualTokens, ctx: PruneContext | None = None) -> Selection:
        """Run the pre-LLM stages; the result never exceeds the budget counted on `tokens`."""
        ctx = ctx or PruneContext()
        limit = Budget(max_tokens=max(1, self.budget.count(len(tokens))))
        if not self.pre_llm or self.inner_llm is not None and not self._pre_llm_prunes():
            return Selection(indices=torch.arange(len(tokens), device=tokens.features.device))
        selection = None
        current = tokens
        for method in self.pre_llm:
            step = method(current, limit, ctx)
            selection = step if selection is None else compose(selection, step)
            current = step.apply(current)
        return selection

    def with_retain(self, retain: float) -> PruningRecipe:
        """This recipe keeping the share `retain` of the visual tokens (a latency controller's
        per-step choice). An absolute `max_tokens` cap stays, and the smaller bound wins. The copy
        shares the stage objects. Their per-stream state lives in the caller's PruneContext
        (VLA-Pruner's action history, the episode's STC-Cacher), so it carries over from step to
        step whatever retain each step uses, and `start_stream` on either recipe resets it. The
        budget is read only through `self.budget` (`select`, `inner_budget`), so both the
        pre-LLM and the inner-LLM stages get the new one."""
        return PruningRecipe(name=self.name, budget=Budget(retain=retain, max_tokens=self.budget.max_tokens),
                             pre_llm=list(self.pre_llm), inner_llm=self.inner_llm,
                             encoder_options=dict(self.encoder_options))

    @property
    def methods(self) -> list[PruningMethod]:
        return self.pre_llm + ([self.inner_llm] if self.inner_llm is not None else [])

    def start_stream(self, ctx: PruneContext) -> None:
        """A new stream or episode: every stage forgets its per-stream state in `ctx`."""
        for method in self.methods:
            method.start_stream(ctx)

    def observe_action(self, ctx: PruneContext, action_attention: torch.Tensor) -> None:
        """Action feedback after a control step, passed to every stage (see PruningMethod)."""
        for method in self.methods:
            method.observe_action(ctx, action_attention)

    def _pre_llm_prunes(self) -> bool:
        return any(m.name != "none" for m in self.pre_llm)

    def inner_budget(self, n_reaching: int, n_original: int) -> Budget:
        """An inner stage alone carries the recipe's budget; after pre-LLM pruning it applies
        its own ratio to what reaches it, never exceeding the budget."""
        if self._pre_llm_prunes():
            return Budget(max_tokens=max(1, min(n_reaching, self.budget.count(n_original))))
        return Budget(max_tokens=max(1, self.budget.count(n_original)))


def compose(first: Selection, second: Selection) -> Selection:
    """`second` selected among `first`'s survivors -> indices into the original tokens."""
    indices = first.indices[second.indices]
    if second.features is not None:
        features = second.features
    elif first.features is not None:
        features = first.features[second.indices]
    else:
        features = None
    return Selection(indices=indices, features=features, contiguous=first.contiguous or second.contiguous,
                     order=second.order)


def build_recipe(name: str, retain: float | None = None, max_tokens: int | None = None,
                 variants: Mapping[str, str] | None = None) -> PruningRecipe:
    """The recipe `name` (a configs/methods file or a registered method) with the given budget
    (flags win over the file's default retain). `variants` maps a method to the authors' own
    version of it for the model at hand (an adapter's `method_variants`: FastVID on Qwen2.5-VL),
    for the recipe's name and for each stage, whose options carry over."""
    variants = variants or {}
    name = variants.get(name, name)
    cfg: MethodConfig = method_config(name)
    budget = Budget(retain=retain if retain is not None else (cfg.retain if max_tokens is None else None),
                    max_tokens=max_tokens if max_tokens is not None else cfg.max_tokens)
    recipe = PruningRecipe(name=Path(name).stem if name.endswith((".yaml", ".yml")) else name, budget=budget)
    registered = available()
    source = str(recipe_file(name) or f"method {name!r}")
    for i, stage in enumerate(cfg.stages):
        stage = StageConfig(method=variants.get(stage.method, stage.method), options=stage.options)
        if stage.method in ENCODER_STAGES:
            recipe.encoder_options[stage.method] = checked_options(ENCODER_STAGES[stage.method], stage.options,
                                                                   source, f"stages[{i}].options")
            continue
        if stage.method not in registered:
            raise ConfigError(f"{source} names unknown stage {stage.method!r}; choose one of: "
                              f"{', '.join([*registered, *ENCODER_STAGES])}")
        options = checked_options(registered[stage.method].Config, stage.options, source, f"stages[{i}].options")
        method = make_method(stage.method, **options)
        if method.stage == "inner_llm":
            if recipe.inner_llm is not None:
                raise ConfigError(f"recipe {name!r} has more than one inner-LLM stage")
            recipe.inner_llm = method
        else:
            recipe.pre_llm.append(method)
    return recipe


def checked_options(config_cls: type, options: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """A stage's options checked against its Config dataclass (names, types, the dataclass's own
    range checks) by the same loader as every YAML file, so a bad option is one line naming the
    recipe file and the option."""
    checked = from_dict(config_cls, options, source, where)
    return {key: getattr(checked, key) for key in options}


def encoder_key(recipe: PruningRecipe) -> str:
    """Recipes with equal encoder stages share one encoding of a clip ("" = the plain tower)."""
    return json.dumps(recipe.encoder_options, sort_keys=True) if recipe.encoder_options else ""


def encoder_groups(recipes: list[PruningRecipe]) -> dict[str, tuple[PruningRecipe, frozenset[str]]]:
    """Per encoder key: a recipe that carries it and every side signal its group's selectors read."""
    groups: dict[str, tuple[PruningRecipe, frozenset[str]]] = {}
    for recipe in recipes:
        key = encoder_key(recipe)
        first, signals = groups.get(key, (recipe, frozenset()))
        groups[key] = (first, signals | recipe.requires)
    return groups

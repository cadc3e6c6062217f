"""FastV: top-k by the last prompt token's attention at layer K-1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.registry import make_method
from streamprune.types import VisualTokens

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "fastv.yaml"


def attention_tokens(attention: torch.Tensor, grid: tuple[int, int, int]) -> VisualTokens:
    n = attention.numel()
    return VisualTokens(
        features=torch.randn(n, 4, generator=torch.Generator().manual_seed(0)),
        thw=VisualTokens.grid_positions(*grid),
        grid=grid,
        signals={"llm_attention_last": attention},
    )


def test_fastv_keeps_exactly_the_top_attention_tokens() -> None:
    attention = torch.tensor([0.05, 0.30, 0.01, 0.20, 0.02, 0.25, 0.10, 0.07])
    method = make_method("fastv")
    assert method.stage == "inner_llm" and method.config.layer == 2
    selection = method(attention_tokens(attention, (2, 2, 2)), Budget(retain=0.5))
    assert selection.indices.tolist() == [1, 3, 5, 6]
    assert selection.features is None, "FastV drops tokens, it never changes the kept ones"


def test_fastv_breaks_attention_ties_by_lower_index() -> None:
    attention = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.1])
    assert make_method("fastv")(attention_tokens(attention, (1, 1, 5)), Budget(max_tokens=2)).indices.tolist() == [1, 2]


def test_fastv_needs_last_token_attention() -> None:
    tokens = attention_tokens(torch.rand(4), (1, 2, 2))
    tokens.signals.clear()
    with pytest.raises(ConfigError):
        make_method("fastv")(tokens, Budget(retain=0.5))


@pytest.mark.parametrize("seed", range(10))
def test_fastv_exact_budget_over_random_shapes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    grid = tuple(int(v) for v in torch.randint(1, 6, (3,), generator=g))
    n = grid[0] * grid[1] * grid[2]
    budget = Budget(retain=float(torch.empty(1).uniform_(0.01, 1.0, generator=g)))
    tokens = attention_tokens(torch.rand(n, generator=g), grid)
    selection = make_method("fastv")(tokens, budget, PruneContext(seed=seed))
    assert len(selection) == budget.count(n)
    assert torch.all(selection.indices[1:] > selection.indices[:-1])


def test_fastv_layer_below_one_is_rejected() -> None:
    with pytest.raises(ConfigError):
        make_method("fastv", layer=0)


def test_fastv_yaml_builds() -> None:
    (stage,) = yaml.safe_load(CONFIG.read_text())["stages"]
    assert make_method(stage["method"], **stage["options"]).config.layer == 2

"""Every pruning method is fit for a GPU hot path: its outputs live on the input tokens' device,
it makes no tensor without naming a device, and its host syncs do not grow with the frame count."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.recipe import PruningRecipe
from streamprune.pruning.registry import available, make_method
from streamprune.types import VisualTokens

H = W = 7
DIM = 32
BUDGET = Budget(retain=0.25)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# every registered method with its defaults, plus the branches the defaults skip
CASES = [(name, {}) for name in available()] + [("holitom", {"d": 0.3}), ("fastvid", {"c": 1, "p": 2})]

# calls that copy device memory to the host, or wait for the device to learn an output's size
SYNC_CALLS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
              "nonzero", "unique", "masked_select"}
FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
             torch.randperm, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}


class Watch(TorchFunctionMode):
    """Records host syncs and tensor factories called without `device=` while a method runs."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.unplaced: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS or name in ("__getitem__", "__setitem__") and _has_mask(args[1]):
            self.syncs.append(name)
        if func in FACTORIES and kwargs.get("device") is None:
            self.unplaced.append(name)
        return func(*args, **kwargs)


def _has_mask(index) -> bool:
    """A boolean-mask index, which needs the mask's True count on the host."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def clip(t: int, device: str, seed: int = 0) -> VisualTokens:
    """bf16 tokens of a t-frame clip whose left half is static and whose right half moves, with a
    scene cut in the middle, so segmentation, static averaging and merging all have work to do."""
    g = torch.Generator().manual_seed(seed)
    n = H * W
    x = torch.randn(1, n, DIM, generator=g).repeat(t, 1, 1) + 0.02 * torch.randn(t, n, DIM, generator=g)
    x[:, n // 2 :] = torch.randn(t, n - n // 2, DIM, generator=g)
    x[t // 2 :] += 3.0 * torch.randn(1, n, DIM, generator=g)
    x = x.reshape(t * n, DIM)
    signals = {key: torch.rand(t * n, generator=g) for key in ("vit_attention", "llm_attention_last",
                                                                "llm_attention_mean")}
    signals["input_embeds"] = x + 0.1 * torch.randn(t * n, DIM, generator=g)
    return VisualTokens(
        features=x.to(device, torch.bfloat16),
        thw=VisualTokens.grid_positions(t, H, W).to(device),
        grid=(t, H, W),
        signals={key: value.to(device, torch.bfloat16 if value.ndim == 2 else torch.float32)
                 for key, value in signals.items()},
    )


def prepared(name: str, options: dict, tokens: VisualTokens) -> tuple[PruningMethod, PruneContext]:
    """The method, and a context past VLA-Pruner's warm-up (three control steps of action feedback;
    methods that keep no action history ignore it)."""
    method, ctx = make_method(name, **options), PruneContext()
    method.start_stream(ctx)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        method.observe_action(ctx, torch.rand(len(tokens), generator=g).to(tokens.features.device))
    return method, ctx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}{o or ''}" for n, o in CASES])
def test_method_outputs_stay_on_the_input_device_with_bf16_features(name: str, options: dict, device: str) -> None:
    tokens = clip(8, device)
    method, ctx = prepared(name, options, tokens)
    with Watch() as watch:
        selection = method(tokens, BUDGET, ctx)
    indices = selection.indices
    assert indices.device == tokens.features.device and indices.dtype == torch.long
    assert 0 < len(selection) <= BUDGET.count(len(tokens))
    assert bool((indices[1:] > indices[:-1]).all()) and 0 <= int(indices[0]) and int(indices[-1]) < len(tokens)
    if selection.features is not None:
        assert selection.features.device == tokens.features.device
        assert selection.features.dtype == torch.bfloat16 and selection.features.shape == (len(selection), DIM)
        assert bool(selection.features.float().isfinite().all())
    assert watch.unplaced == [], f"{name} made tensors without naming a device: {watch.unplaced}"


@pytest.mark.parametrize("device", DEVICES)
def test_recipe_without_stages_keeps_everything_on_the_input_device(device: str) -> None:
    tokens = clip(2, device)
    with Watch() as watch:
        selection = PruningRecipe(name="empty", budget=BUDGET).select(tokens)
    assert selection.indices.device == tokens.features.device and len(selection) == len(tokens)
    assert watch.unplaced == []


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}{o or ''}" for n, o in CASES])
def test_host_syncs_do_not_grow_with_frames(name: str, options: dict) -> None:
    syncs = {}
    for t in (8, 32):
        tokens = clip(t, DEVICES[-1])
        method, ctx = prepared(name, options, tokens)
        with Watch() as watch:
            method(tokens, BUDGET, ctx)
        syncs[t] = watch.syncs
    assert len(syncs[32]) <= len(syncs[8]), f"{name}: syncs at 8 frames {Counter(syncs[8])}, at 32 {Counter(syncs[32])}"

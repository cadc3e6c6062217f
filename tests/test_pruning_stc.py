"""STC-Pruner: per-frame novelty against the frame mean and the stream's temporal memory."""

import pytest
import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.registry import make_method
from streamprune.types import VisualTokens

T, H, W, D = 4, 4, 4, 32


def _tokens(features: torch.Tensor, t: int = T, h: int = H, w: int = W) -> VisualTokens:
    return VisualTokens(features=features, thw=VisualTokens.grid_positions(t, h, w), grid=(t, h, w))


def _around(direction: torch.Tensor, n: int, g: torch.Generator, noise: float = 0.01) -> torch.Tensor:
    return direction + noise * torch.randn(n, direction.numel(), generator=g)


def test_stc_keeps_planted_novel_tokens():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(D, generator=g)
    planted_frame_pos = [(0, 3), (1, 10), (2, 0), (3, 15)]
    ctx = PruneContext()
    method = make_method("stc_pruner")
    # history: two chunks of the same scene
    for _ in range(2):
        method(_tokens(_around(base, T * H * W, g)), Budget(retain=0.25), ctx)
    feats = _around(base, T * H * W, g)
    planted = [f * H * W + p for f, p in planted_frame_pos]
    feats[planted] = -base + 0.01 * torch.randn(len(planted), D, generator=g)
    sel = method(_tokens(feats), Budget(max_tokens=T), ctx)  # one token per frame
    assert sel.indices.tolist() == planted


def test_stc_memory_carries_across_calls():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(D, generator=g)
    # the probe chunk: half the tokens of every frame look like a, half like -a, interleaved,
    # so the frame mean cannot tell them apart; only the stream memory can
    probe = torch.empty(T * H * W, D)
    probe[0::2] = _around(a, T * H * W // 2, g)
    probe[1::2] = _around(-a, T * H * W // 2, g)
    method = make_method("stc_pruner")

    def after_history(scene: torch.Tensor) -> torch.Tensor:
        ctx = PruneContext()
        for _ in range(3):
            method(_tokens(_around(scene, T * H * W, g)), Budget(retain=0.5), ctx)
        assert ctx.state["stc_pruner.memory"]["count"] == 3
        return method(_tokens(probe), Budget(retain=0.5), ctx).indices

    kept_after_a = after_history(a)
    kept_after_minus_a = after_history(-a)
    assert (kept_after_a % 2 == 1).all()  # memory of a: the -a tokens are the novel ones
    assert (kept_after_minus_a % 2 == 0).all()


def test_stc_memory_is_the_running_mean_of_each_chunks_selected_channel_means():
    # model/prune.py L103-113: each chunk stores the mean of its own lowest-variance half of the
    # channels, in ascending variance order; the memory averages those position by position
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(T * H * W, D, generator=g) * torch.rand(D, generator=g) + i for i in range(3)]
    ctx = PruneContext()
    for c in chunks:
        make_method("stc_pruner")(_tokens(c), Budget(retain=0.3), ctx)
    memory = ctx.state["stc_pruner.memory"]
    means = [c[:, c.var(dim=0, unbiased=False).sort().indices[: D // 2]].mean(dim=0) for c in chunks]
    torch.testing.assert_close(memory["sum"] / memory["count"], torch.stack(means).mean(dim=0), atol=1e-5, rtol=0)


def test_stc_aligned_memory_option_is_the_running_mean_of_full_width_chunk_means():
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(T * H * W, D, generator=g) + i for i in range(3)]
    ctx = PruneContext()
    for c in chunks:
        make_method("stc_pruner", memory="aligned")(_tokens(c), Budget(retain=0.3), ctx)
    memory = ctx.state["stc_pruner.memory"]
    want = torch.stack([c.mean(dim=0) for c in chunks]).mean(dim=0)
    torch.testing.assert_close(memory["sum"] / memory["count"], want, atol=1e-5, rtol=0)


# A stream of one-frame chunks (ReKV encodes one frame per chunk) whose lowest-variance channels
# are the same four in both chunks, but in reversed variance order: the code's memory then mixes
# channel 0's mean with channel 3's, and so on, while an aligned memory does not.
N_STREAM, D_STREAM, K_STREAM = 16, 8, 5


def _order_swapping_stream() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    means = [4.0, -4.0, 2.0, -2.0]
    chunks = []
    for stds in ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]):
        x = 3.0 * torch.randn(N_STREAM, D_STREAM, generator=g)  # channels 4..7: high variance
        for c, (std, mean) in enumerate(zip(stds, means)):
            x[:, c] = mean + std * torch.randn(N_STREAM, generator=g)
        chunks.append(x)
    return chunks


def _gauss(z: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    sq = ((z - mu) ** 2).sum(dim=-1)
    return sum(torch.exp(-sq / (2 * a)) for a in (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0))


def _reference_stream(chunks: list[torch.Tensor], memory: str) -> list[list[int]]:
    """The kept tokens of each one-frame chunk, written out from the authors' rule."""
    stored, kept = [], []
    for x in chunks:
        order = torch.topk(x.var(dim=0, unbiased=False), D_STREAM // 2, largest=False).indices
        stored.append(x[:, order].mean(dim=0) if memory == "code" else x.mean(dim=0))
        mu_t = torch.stack(stored).mean(dim=0)
        mu_t = F.normalize(mu_t if memory == "code" else mu_t[order], dim=-1)
        z = F.normalize(x[:, order], dim=-1)
        mu_s = z.mean(dim=0)

        kept.append(torch.topk(_gauss(z, mu_t) + _gauss(z, mu_s), K_STREAM, largest=False).indices.sort().values.tolist())
    return kept


def _run_stream(chunks: list[torch.Tensor], **options) -> list[list[int]]:
    method, ctx = make_method("stc_pruner", **options), PruneContext()
    return [method(_tokens(x, 1, 4, 4), Budget(max_tokens=K_STREAM), ctx).indices.tolist() for x in chunks]


def test_stc_default_memory_follows_the_code_when_the_variance_order_changes():
    chunks = _order_swapping_stream()
    code, aligned = _reference_stream(chunks, "code"), _reference_stream(chunks, "aligned")
    assert code[0] == aligned[0] and code[1] != aligned[1]  # the input exposes the difference
    assert make_method("stc_pruner").config.memory == "code"
    assert _run_stream(chunks) == code


def test_stc_aligned_memory_option_keeps_the_aligned_channel_means():
    chunks = _order_swapping_stream()
    assert _run_stream(chunks, memory="aligned") == _reference_stream(chunks, "aligned")


def test_stc_bad_memory_option_raises_config_error():
    with pytest.raises(ConfigError):
        make_method("stc_pruner", memory="bounded")


def test_stc_rejects_memory_of_another_feature_width():
    ctx = PruneContext()
    method = make_method("stc_pruner")
    method(_tokens(torch.randn(T * H * W, D)), Budget(retain=0.3), ctx)
    with pytest.raises(InputError):
        method(_tokens(torch.randn(T * H * W, D + 1)), Budget(retain=0.3), ctx)


def test_stc_budget_is_exact_across_shapes_and_ratios():
    g = torch.Generator().manual_seed(3)
    method = make_method("stc_pruner")
    for _ in range(60):
        t, h, w = (int(v) for v in torch.randint(1, 7, (3,), generator=g))
        n = t * h * w
        budget = Budget(retain=float(torch.rand(1, generator=g)) * 0.99 + 0.01)
        if n > 2 and bool(torch.rand(1, generator=g) < 0.3):
            budget = Budget(max_tokens=int(torch.randint(1, n, (1,), generator=g)))  # often < t
        sel = method(_tokens(torch.randn(n, 8, generator=g), t, h, w), budget, PruneContext())
        assert len(sel) == budget.count(n)
        assert torch.equal(sel.indices, torch.sort(sel.indices).values)
        assert sel.indices.unique().numel() == len(sel)
        per_frame = torch.bincount(sel.indices // (h * w), minlength=t)
        assert int(per_frame.max() - per_frame.min()) <= 1  # the budget is shared evenly by frames


def test_stc_is_deterministic():
    feats = torch.randn(T * H * W, D, generator=torch.Generator().manual_seed(4))
    a = make_method("stc_pruner")(_tokens(feats), Budget(retain=0.3), PruneContext(seed=0))
    b = make_method("stc_pruner")(_tokens(feats.clone()), Budget(retain=0.3), PruneContext(seed=0))
    assert torch.equal(a.indices, b.indices)

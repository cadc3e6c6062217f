"""FastVID's Qwen2.5-VL variant: near-duplicate frames collapsed, per-segment budgets, capped context."""

import torch

from streamprune.config import CONFIG_DIR
from streamprune.pruning.base import Budget
from streamprune.pruning.fastvid import dyseg, frame_similarity
from streamprune.pruning.recipe import build_recipe
from streamprune.pruning.registry import make_method
from streamprune.types import VisualTokens
from tests.test_pruning_fastvid import dtm_by_hand


def _tokens(frames: torch.Tensor, attention: torch.Tensor, h: int, w: int) -> VisualTokens:
    """frames: `[T, h*w, D]` tokens of T temporal units (the Qwen2.5-VL grid's t)."""
    t = frames.shape[0]
    return VisualTokens(frames.reshape(t * h * w, -1), VisualTokens.grid_positions(t, h, w), (t, h, w),
                        signals={"vit_attention": attention.reshape(-1)})


def _distinct_frames(t: int, n: int, dim: int, seed: int) -> torch.Tensor:
    """`[t, n, dim]` frames whose consecutive mean-feature cosines are all well below 0.95."""
    g = torch.Generator().manual_seed(seed)
    return torch.ones(dim) + 3.0 * torch.randn(t, n, dim, generator=g)


def test_fastvid_qwen_defaults_are_the_authors_qwen_script():
    cfg = make_method("fastvid_qwen").config
    assert (cfg.retain, cfg.c, cfg.tau, cfg.ignore, cfg.d, cfg.p, cfg.beta) == (0.27, 8, 0.84, 0.95, 0.4, 4, 0.6)
    recipe = build_recipe(str(CONFIG_DIR / "methods" / "fastvid_qwen.yaml"))
    assert recipe.budget.retain == 0.27 and [m.name for m in recipe.pre_llm] == ["fastvid_qwen"]


def test_fastvid_qwen_near_duplicate_run_collapses_onto_its_last_frame():
    # frames 0-2 near-identical (cos >= 0.95), frame 3 a different view of the same scene (cos
    # 0.78 >= tau): one DySeg segment, two runs [0, 3) and [3, 4); only frames 2 and 3 keep tokens
    g = torch.Generator().manual_seed(0)
    still = [torch.eye(4) + 0.01 * torch.randn(4, 4, generator=g) for _ in range(3)]
    centre, side = torch.tensor([0.2, 1.0, 0.5, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.3])
    moved = torch.stack([torch.tensor([1.0, 1.0, 0.0, 0.0]), centre, centre + side, centre - 1.2 * side])
    frames = torch.stack(still + [moved])  # [4, 4, 4]
    sim = frame_similarity(frames.mean(dim=1))
    assert bool((sim[:2] >= 0.95).all()) and 0.5 <= float(sim[2]) < 0.95
    assert dyseg(frames.mean(dim=1), c=1, tau=0.5) == [(0, 4)]
    attention = torch.tensor([[0.0, 0.0, 0.0, 0.0]] * 2 + [[0.9, 0.8, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]])
    sel = make_method("fastvid_qwen", c=1, tau=0.5)(_tokens(frames, attention, 2, 2), Budget(retain=0.25))
    # segment retain 4 = context max(floor(1.6), 1) = 1 + salient 3, split [2, 1] over the runs;
    # the last run (frame 3) is the anchor run: 1 salient + 1 anchor, its densest token (the centre)
    assert sel.indices.tolist() == [8, 9, 12, 13]
    torch.testing.assert_close(sel.features[:3], frames.reshape(16, 4)[[8, 9, 12]], atol=1e-5, rtol=0)
    # the pool: every token of the segment but the salient ones and the anchor itself (12 tokens,
    # the collapsed frames 0 and 1 included)
    pool = torch.cat([frames[0], frames[1], frames[2][2:], moved[2:]])
    torch.testing.assert_close(sel.features[3], dtm_by_hand(centre[None], pool)[0], atol=1e-5, rtol=0)
    # FastVID's LLaVA-OV path keeps tokens on every frame of the same input
    llava = make_method("fastvid", c=1, tau=0.5, d=0.5)(_tokens(frames, attention, 2, 2), Budget(retain=0.5))
    assert sorted({i // 4 for i in llava.indices.tolist()}) == [0, 1, 2, 3]


def test_fastvid_qwen_static_segment_context_is_capped_at_half_a_frame():
    # 8 near-identical frames: one run, so everything goes to the last frame; context
    # min(floor(32 * 0.4), 16 // 2) = 8, salient min(20, 16 - 8) = 8: the whole last frame, and
    # the other 16 of the budget's 32 tokens are dropped, as in the code
    t, h, w, dim = 8, 4, 4, 16
    g = torch.Generator().manual_seed(1)
    frame = torch.randn(h * w, dim, generator=g)
    frames = frame + 0.01 * torch.randn(t, h * w, dim, generator=g)
    attention = torch.rand(t, h * w, generator=g)
    sel = make_method("fastvid_qwen", c=1)(_tokens(frames, attention, h, w), Budget(retain=0.25))
    last = (t - 1) * h * w
    assert sel.indices.tolist() == list(range(last, last + h * w))
    salient = torch.topk(attention[-1], 8).indices
    anchors = torch.sort(torch.topk(-attention[-1], 8).indices).values  # the other 8, all anchors
    out = dict(zip(sel.indices.tolist(), sel.features))
    torch.testing.assert_close(torch.stack([out[last + int(i)] for i in salient]), frames[-1][salient])
    want = dtm_by_hand(frames[-1][anchors], frames[:-1].reshape(-1, dim))  # pool: the 7 collapsed frames
    torch.testing.assert_close(torch.stack([out[last + int(i)] for i in anchors]), want, atol=1e-5, rtol=0)


def test_fastvid_qwen_budget_split_front_loads_salient_and_back_loads_context():
    # 5 distinct frames (5 runs) in one segment, p = 4: anchor runs 4 and 0. retain 5 * 4 = 20,
    # context floor(20 * 0.45) = 9 split [5, 4] with the larger share on the LAST anchor run,
    # salient 11 split [3, 2, 2, 2, 2] with the remainder on the FIRST runs
    t, h, w, dim = 5, 4, 4, 8
    frames = _distinct_frames(t, h * w, dim, seed=2)
    sim = frame_similarity(frames.mean(dim=1))
    assert bool((sim < 0.95).all()) and bool((sim > 0.0).all())
    attention = torch.rand(t, h * w, generator=torch.Generator().manual_seed(3))
    sel = make_method("fastvid_qwen", c=1, tau=0.0, d=0.45)(_tokens(frames, attention, h, w), Budget(retain=0.25))
    per_frame = torch.bincount(sel.indices // (h * w), minlength=t).tolist()
    assert per_frame == [3 + 4, 2, 2, 2, 2 + 5]
    for f, k in enumerate([3, 2, 2, 2, 2]):  # the salient tokens are each frame's top attention
        top = set((f * h * w + torch.topk(attention[f], k).indices).tolist())
        assert top <= set(sel.indices.tolist())


def test_fastvid_qwen_single_frame_segment_gets_uncapped_context():
    # a segment of one frame keeps context max(floor(R * d), 1) with no N/2 cap: R = 12 of 16, d = 0.9
    t, h, w, dim = 2, 4, 4, 8
    frames = _distinct_frames(t, h * w, dim, seed=4)
    assert dyseg(frames.mean(dim=1), c=2, tau=0.84) == [(0, 1), (1, 2)]
    attention = torch.rand(t, h * w, generator=torch.Generator().manual_seed(5))
    sel = make_method("fastvid_qwen", c=2, d=0.9)(_tokens(frames, attention, h, w), Budget(retain=0.75))
    salient = [set((f * 16 + torch.topk(attention[f], 2).indices).tolist()) for f in range(t)]
    kept = sel.indices.tolist()
    assert len(kept) == 24 and all(s <= set(kept) for s in salient)
    assert [sum(1 for i in kept if i // 16 == f and i not in salient[f]) for f in range(t)] == [10, 10]


def test_fastvid_qwen_never_exceeds_the_budget():
    g = torch.Generator().manual_seed(6)
    for _ in range(40):
        t, h, w = (int(v) for v in torch.randint(1, 7, (3,), generator=g))
        n = t * h * w
        budget = Budget(retain=0.01 + 0.6 * float(torch.rand(1, generator=g)))
        if bool(torch.rand(1, generator=g) < 0.3):
            budget = Budget(max_tokens=int(torch.randint(1, n + 1, (1,), generator=g)))
        method = make_method("fastvid_qwen", c=int(torch.randint(1, 9, (1,), generator=g)),
                             p=int(torch.randint(1, 6, (1,), generator=g)),
                             ignore=float(torch.rand(1, generator=g)))
        frames = torch.randn(t, h * w, 8, generator=g)
        sel = method(_tokens(frames, torch.rand(t, h * w, generator=g), h, w), budget)
        assert len(sel) <= budget.count(n), (t, h, w, budget)
        assert torch.equal(sel.indices, torch.sort(sel.indices).values)
        assert sel.indices.unique().numel() == len(sel)
        assert sel.features is not None and sel.features.shape == (len(sel), 8)

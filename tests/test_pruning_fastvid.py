"""FastVID: DySeg segmentation, attention-salient tokens, density anchors and merging."""

import pytest
import torch

from streamprune.errors import ConfigError
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.fastvid import dyseg
from streamprune.pruning.registry import make_method
from streamprune.types import VisualTokens


def _tokens(features: torch.Tensor, attention: torch.Tensor, t: int, h: int, w: int) -> VisualTokens:
    return VisualTokens(
        features=features,
        thw=VisualTokens.grid_positions(t, h, w),
        grid=(t, h, w),
        signals={"vit_attention": attention},
    )


def _scenes(lengths: list[int], dim: int, seed: int) -> torch.Tensor:
    """`[sum(lengths), dim]` frame features: one random direction per scene, slightly jittered."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(dim, generator=g) + 0.01 * torch.randn(n, dim, generator=g) for n in lengths]
    return torch.cat(rows)


def test_dyseg_static_video_is_one_segment():
    static = torch.randn(1, 16).repeat(12, 1)
    assert dyseg(static, c=1, tau=0.9) == [(0, 12)]


def test_dyseg_forced_cuts_split_even_a_static_video():
    # as in the authors' code, the c-1 lowest similarities are always cut
    static = torch.randn(1, 16).repeat(16, 1)
    segments = dyseg(static, c=8, tau=0.9)
    assert len(segments) == 8
    assert segments[0][0] == 0 and segments[-1][1] == 16
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:]))


def test_dyseg_k_distinct_scenes_give_k_segments():
    feats = _scenes([3, 5, 2, 4], dim=32, seed=0)
    want = [(0, 3), (3, 8), (8, 10), (10, 14)]
    assert dyseg(feats, c=1, tau=0.9) == want
    assert dyseg(feats, c=4, tau=0.9) == want  # the 3 forced cuts fall on the scene changes
    assert dyseg(feats[:1], c=8, tau=0.9) == [(0, 1)]


def test_fastvid_duplicates_within_a_segment_collapse_into_one_anchor():
    t, h, w, dim = 3, 4, 4, 32
    g = torch.Generator().manual_seed(1)
    salient = torch.randn(4, dim, generator=g)
    repeated = torch.randn(3, dim, generator=g)
    frame = torch.cat([salient, repeated.repeat(4, 1)])  # positions 4..15 hold 3 vectors x 4 copies
    feats = frame.repeat(t, 1)  # a static clip: one segment
    attention = torch.tensor([1.0] * 4 + [0.0] * 12).repeat(t)
    method = make_method("fastvid", c=1, d=0.2, p=4)  # per frame R=5: 4 salient, 1 context slot
    sel = method(_tokens(feats, attention, t, h, w), Budget(max_tokens=t * 5))
    n = h * w
    is_salient = (sel.indices % n) < 4
    assert int(is_salient.sum()) == 4 * t
    context_idx = sel.indices[~is_salient]
    context_feat = sel.features[~is_salient]
    # 3 context tokens, one per repeated vector, all placed on the segment's last frame
    assert len(context_idx) == 3 and bool((context_idx // n == t - 1).all())
    match = torch.cdist(context_feat, repeated).argmin(dim=1)
    assert sorted(match.tolist()) == [0, 1, 2]
    torch.testing.assert_close(context_feat, repeated[match])  # merged feature equals the duplicate
    torch.testing.assert_close(context_feat, feats[context_idx])  # and sits at a copy's position


def test_fastvid_context_anchors_sit_on_frames_counted_back_from_segment_end():
    t, h, w, dim = 6, 6, 6, 16
    g = torch.Generator().manual_seed(2)
    frame = torch.randn(h * w, dim, generator=g)
    feats = (frame + 0.001 * torch.randn(t, h * w, dim, generator=g)).reshape(-1, dim)
    attention = torch.rand(t * h * w, generator=g)
    sel = make_method("fastvid", c=1, p=4)(_tokens(feats, attention, t, h, w), Budget(retain=0.25))
    n = h * w
    # R = 54 // 6 = 9 per frame: 6 salient, 3 context
    top_attention = [set((f * n + torch.topk(attention[f * n : (f + 1) * n], 6).indices).tolist()) for f in range(t)]
    context = [i for i in sel.indices.tolist() if i not in top_attention[i // n]]
    assert {i // n for i in context} == {5, 1}  # one segment of 6 frames, anchors every 4 from its end
    assert len(context) == 3 * t and len(sel) == Budget(retain=0.25).count(t * n)


def test_fastvid_salient_tokens_are_top_attention_and_unchanged():
    t, h, w, dim = 4, 8, 8, 16
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(t * h * w, dim, generator=g)
    attention = torch.rand(t * h * w, generator=g)
    sel = make_method("fastvid")(_tokens(feats, attention, t, h, w), Budget(retain=0.25))
    n = h * w
    # R = 16 per frame, context floor(16 * 0.4) = 6, salient 10
    position = {int(i): k for k, i in enumerate(sel.indices)}
    for f in range(t):
        for i in (f * n + torch.topk(attention[f * n : (f + 1) * n], 10).indices).tolist():
            assert i in position
            assert torch.equal(sel.features[position[i]], feats[i])


def test_fastvid_budget_is_exact_across_shapes_and_ratios():
    g = torch.Generator().manual_seed(4)
    for _ in range(40):
        t, h, w = (int(v) for v in torch.randint(1, 7, (3,), generator=g))
        n = t * h * w
        retain = float(torch.rand(1, generator=g))
        budget = Budget(retain=0.01 + 0.39 * retain)
        if n > 2 and bool(torch.rand(1, generator=g) < 0.3):
            budget = Budget(max_tokens=int(torch.randint(1, max(2, n // 3), (1,), generator=g)))  # often < t
        c = int(torch.randint(1, 9, (1,), generator=g))
        p = int(torch.randint(1, 6, (1,), generator=g))
        method = make_method("fastvid", c=c, p=p)
        tokens = _tokens(torch.randn(n, 8, generator=g), torch.rand(n, generator=g), t, h, w)
        sel = method(tokens, budget)
        # up to 40% context the anchor frames always have room: the budget is met exactly
        assert len(sel) == budget.count(n), (t, h, w, budget, c, p)
        assert torch.equal(sel.indices, torch.sort(sel.indices).values)
        assert sel.indices.unique().numel() == len(sel)
        assert sel.features is not None and sel.features.shape == (len(sel), 8)
        high = method(tokens, Budget(retain=0.4 + 0.6 * retain))  # may fall short, never over
        assert len(high) <= Budget(retain=0.4 + 0.6 * retain).count(n)


def test_fastvid_is_deterministic():
    g = torch.Generator().manual_seed(5)
    feats, attention = torch.randn(8 * 36, 16, generator=g), torch.rand(8 * 36, generator=g)
    method, budget = make_method("fastvid"), Budget(retain=0.1)
    a = method(_tokens(feats, attention, 8, 6, 6), budget, PruneContext(seed=0))
    b = method(_tokens(feats.clone(), attention.clone(), 8, 6, 6), budget, PruneContext(seed=0))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.features, b.features)


def test_fastvid_requires_vit_attention():
    tokens = VisualTokens(torch.randn(16, 4), VisualTokens.grid_positions(1, 4, 4), (1, 4, 4))
    with pytest.raises(ConfigError):
        make_method("fastvid")(tokens, Budget(retain=0.5))


def dtm_by_hand(anchors: torch.Tensor, members: torch.Tensor, beta: float = 0.6) -> torch.Tensor:
    """DTM by hand: each member joins its most cosine-similar anchor (ties: the first), then
    anchor <- w * anchor + (1 - w) * mean(members), w = max(1 / (n + 1), beta)."""
    za, zm = torch.nn.functional.normalize(anchors, dim=-1), torch.nn.functional.normalize(members, dim=-1)
    nearest = (zm @ za.T).argmax(dim=1)
    out = anchors.clone()
    for a in range(len(anchors)):
        group = members[nearest == a]
        if len(group):
            w = max(1.0 / (len(group) + 1), beta)
            out[a] = w * anchors[a] + (1 - w) * group.mean(dim=0)
    return out


def _centred_frame(salient: torch.Tensor, centre: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """`[4, D]`: a salient token, then a centre with two unequal sides on a line. Of the three
    non-salient tokens the centre is the densest and the DPC-kNN anchor."""
    return torch.stack([salient, centre, centre + side, centre - 1.2 * side])


def test_fastvid_anchor_frame_with_one_frame_share_pools_only_its_own_frame():
    # p = 1: every frame of the 2-frame segment is an anchor frame with exactly n_c slots; the
    # code (modeling_qwen2.py L1010, L1026) then merges each frame's own tokens only
    side = torch.tensor([0.0, 0.0, 0.0, 0.2])
    f0 = _centred_frame(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.2, 1.0, 0.5, 0.3]), side)
    f1 = _centred_frame(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.2, 0.3, 0.5]), side)
    feats = torch.cat([f0, f1])
    attention = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(2)
    assert dyseg(torch.stack([f0.mean(0), f1.mean(0)]), c=1, tau=0.0) == [(0, 2)]  # one segment
    method = make_method("fastvid", c=1, tau=0.0, d=0.5, p=1)  # R = 2: 1 salient, 1 context per frame
    sel = method(_tokens(feats, attention, 2, 2, 2), Budget(max_tokens=4))
    assert sel.indices.tolist() == [0, 1, 4, 5]
    torch.testing.assert_close(sel.features[[0, 2]], feats[[0, 4]], atol=1e-5, rtol=0)
    torch.testing.assert_close(sel.features[1], dtm_by_hand(f0[1:2], f0[1:])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sel.features[3], dtm_by_hand(f1[1:2], f1[1:])[0], atol=1e-5, rtol=0)
    # pooling the whole segment, as before, would have mixed the other frame in
    assert not torch.allclose(sel.features[1], dtm_by_hand(f0[1:2], torch.cat([f0[1:], f1[1:]]))[0], atol=1e-3)


def test_fastvid_p2_odd_segment_with_one_context_token_pools_per_frame():
    # p = 2, l = 3, n_c = 1: the code gives anchor frames 2 and 0 (3 * 1) // 2 = 1 = n_c slots, so
    # they too merge only their own frame; frame 1's non-salient tokens are merged nowhere.
    # (Here the third slot the code drops is kept, on frame 0: a declared budget deviation.)
    side = torch.tensor([0.0, 0.0, 0.0, 0.2])
    centres = torch.tensor([[0.2, 1.0, 0.5, 0.3], [1.0, 0.2, 0.3, 0.5], [0.4, 0.3, 1.0, 0.6]])
    frames = [_centred_frame(torch.tensor([1.0, 1.0, 1.0, 0.0]), c, side) for c in centres]
    feats = torch.cat(frames)
    attention = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(3)
    assert dyseg(torch.stack([f.mean(0) for f in frames]), c=1, tau=0.0) == [(0, 3)]
    sel = make_method("fastvid", c=1, tau=0.0, d=0.5, p=2)(_tokens(feats, attention, 3, 2, 2), Budget(max_tokens=6))
    # salient token 0 of every frame; anchors: frame 0's two best DPC-kNN scores (the centre and
    # the farther side), frame 2's centre; nothing on frame 1
    assert sel.indices.tolist() == [0, 1, 3, 4, 8, 9]
    torch.testing.assert_close(sel.features[[0, 3, 4]], feats[[0, 4, 8]], atol=1e-5, rtol=0)
    want0 = dtm_by_hand(feats[[1, 3]], frames[0][1:])  # frame 0's two anchors, frame 0's pool only
    torch.testing.assert_close(sel.features[1:3], want0, atol=1e-5, rtol=0)
    torch.testing.assert_close(sel.features[5], dtm_by_hand(frames[2][1:2], frames[2][1:])[0], atol=1e-5, rtol=0)


def test_fastvid_prefers_probe_attention_and_frame_features_when_given():
    # the code segments on SigLIP's MAP-head output and ranks salient tokens by the MAP probe's
    # attention; with those signals present they win over token means and vit_attention
    t, h, w, dim = 4, 2, 2, 8
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(h * w, dim, generator=g).repeat(t, 1)  # identical frames: one segment by token means
    vit = torch.arange(t * h * w, dtype=torch.float32) % 4  # would pick position 3 of each frame
    probe = 3.0 - vit  # picks position 0 instead
    scene = torch.randn(2, 16, generator=g)
    frame_features = scene[[0, 0, 1, 1]]  # a scene change after frame 1
    tokens = _tokens(feats, vit, t, h, w)
    tokens.signals["probe_attention"] = probe
    tokens.frame_signals["frame_features"] = frame_features
    method = make_method("fastvid", c=1, tau=0.9, d=0.5, p=4)  # R = 2: 1 salient, 1 context per frame
    sel = method(tokens, Budget(max_tokens=8))
    kept = sel.indices.tolist()
    assert [i for i in kept if i % 4 == 0] == [0, 4, 8, 12]  # salient by probe_attention
    # context anchors on the last frame of each DySeg segment [0, 2) and [2, 4)
    assert sorted({i // 4 for i in kept if i % 4}) == [1, 3]
    del tokens.frame_signals["frame_features"]  # fallback: token means, one segment [0, 4)
    assert sorted({i // 4 for i in method(tokens, Budget(max_tokens=8)).indices.tolist() if i % 4}) == [3]

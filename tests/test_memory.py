"""StreamingMemory: the budget bound, the recent window, segment-local static merging, A2SF eviction."""

from __future__ import annotations

import pytest
import torch

from streamprune.errors import ConfigError
from streamprune.memory import MemoryConfig, MemoryUnit, StreamingMemory

D = 16
HW = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij"), -1).reshape(-1, 2)  # [9, 2]



def scene(seed: int) -> torch.Tensor:
    return torch.randn(len(HW), D, generator=torch.Generator().manual_seed(seed))


def unit(features: torch.Tensor, frame: int) -> MemoryUnit:
    return MemoryUnit(features=features, hw=HW.clone(), frame=frame, timestamp=frame / 10)


def noisy(base: torch.Tensor, frame: int, amount: float = 0.02) -> torch.Tensor:
    return base + amount * torch.randn(base.shape, generator=torch.Generator().manual_seed(1000 + frame))


def test_memory_never_exceeds_budget_and_recent_window_stays_whole():
    mem = StreamingMemory(MemoryConfig(kv_budget=60, recent_frames=4), D)
    for f in range(400):
        base = scene(f // 50)
        mem.append(unit(noisy(base, f, 0.3 if f % 7 else 0.01), f))
        assert len(mem) <= 60
        per_frame = mem.tokens_per_frame()
        for recent in range(max(0, f - 3), f + 1):
            assert per_frame[recent] == len(HW)  # the window is never compressed or evicted
    assert mem.merged + mem.evicted == 400 * len(HW) - len(mem)


def test_static_tokens_merge_within_a_scene_but_never_across_a_cut():
    mem = StreamingMemory(MemoryConfig(kv_budget=45, recent_frames=3), D)
    cut = 20
    for f in range(cut + 10):
        mem.append(unit(noisy(scene(0 if f < cut else 1), f), f))
    covered = mem.frames_covered()
    assert mem.merged > 0 and mem.evicted == 0  # static scenes fit by merging alone
    assert not ((covered[:, 0] < cut) & (covered[:, 1] >= cut)).any()
    # each scene collapsed to about one frame's worth of tokens at its first frame
    per_frame = mem.tokens_per_frame()
    assert per_frame[0] == len(HW) and per_frame[cut] == len(HW)
    snap = mem.snapshot()
    assert torch.all(snap.ts[1:] >= snap.ts[:-1])  # time order
    old = snap.features[snap.thw[:, 0] == 0]
    assert torch.allclose(old, scene(0), atol=0.05)  # averages of the noisy copies


def test_merged_features_are_the_mean_of_what_they_absorbed():
    mem = StreamingMemory(MemoryConfig(kv_budget=18, recent_frames=1), D)
    frames = [noisy(scene(3), f, 0.05) for f in range(4)]
    for f, feats in enumerate(frames):
        mem.append(unit(feats, f))
    snap = mem.snapshot()
    merged = snap.features[snap.thw[:, 0] == 0]
    assert torch.allclose(merged, torch.stack(frames[:3]).mean(0), atol=1e-5)


def test_a2sf_evicts_unattended_tokens_and_keeps_attended_ones():
    mem = StreamingMemory(MemoryConfig(kv_budget=36, recent_frames=2), D)
    for f in range(4):
        mem.append(unit(scene(10 + f), f))  # four unrelated scenes: nothing merges
    snap = mem.snapshot()
    attended = snap.uid[snap.thw[:, 0] == 0][:3]  # 3 tokens of the oldest frame
    attention = torch.zeros(len(snap))
    attention[torch.isin(snap.uid, attended)] = 1.0
    assert mem.credit_attention(snap.uid, attention) == len(snap)
    for f in range(4, 8):
        mem.append(unit(scene(10 + f), f))
    held = mem.snapshot()
    assert torch.isin(attended, held.uid).all()  # oldest, but attended
    assert mem.evicted > 0 and len(mem) <= 36
    # among never-attended tokens the recency prior evicts the oldest first
    unattended = held.thw[~torch.isin(held.uid, attended), 0]
    assert unattended.min() >= 2


def test_a2sf_score_decays_by_alpha_per_unit():
    alpha = 0.9
    mem = StreamingMemory(MemoryConfig(kv_budget=1000, recent_frames=1, alpha=alpha), D)
    mem.append(unit(scene(0), 0))
    snap = mem.snapshot()
    attention = torch.zeros(len(snap))
    attention[0] = 1.0
    mem.credit_attention(snap.uid, attention)
    for f in range(1, 6):
        mem.append(unit(scene(f), f))
    prior = 1.0 / 1000
    assert mem.scores()[0].item() == pytest.approx((prior + 1.0) * alpha**5, rel=1e-9)
    assert mem.scores()[1].item() == pytest.approx(prior * alpha**5, rel=1e-9)
    assert mem.scores()[-1].item() == pytest.approx(prior, rel=1e-9)


def test_lazy_forgetting_survives_long_streams_without_underflow():
    mem = StreamingMemory(MemoryConfig(kv_budget=27, recent_frames=1, alpha=0.5), D)
    for f in range(3000):  # 0.5**3000 underflows float64 unless renormalised
        mem.append(unit(scene(f % 5 + 100), f))
    scores = mem.scores()
    assert torch.isfinite(scores).all() and (scores > 0).all()
    assert scores[-1] > scores[0]  # newest ranks above older never-attended tokens


def test_recent_window_larger_than_budget_is_a_config_error():
    mem = StreamingMemory(MemoryConfig(kv_budget=20, recent_frames=4), D)
    with pytest.raises(ConfigError, match="kv budget"):
        mem.append(unit(scene(0), 0))


def test_attention_credit_ignores_tokens_already_gone():
    mem = StreamingMemory(MemoryConfig(kv_budget=18, recent_frames=1), D)
    mem.append(unit(scene(0), 0))
    snap = mem.snapshot()
    for f in range(1, 4):
        mem.append(unit(scene(20 + f), f))  # evicts frame 0
    assert mem.credit_attention(snap.uid, torch.ones(len(snap))) == 0

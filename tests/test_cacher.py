"""STC-Cacher on tiny random SigLIP and Qwen2.5-VL vision towers (real transformers classes, seeded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from streamprune.encode import CacherConfig, QwenSTCCacher, STCCacher
from streamprune.errors import ConfigError, InputError
from streamprune.models.preprocess import qwen_video_patches

# A cache_interval this large means only the first frame is an interval refresh.
NO_INTERVAL = 10_000


@pytest.fixture(scope="module")
def tower() -> SiglipVisionModel:
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, image_size=64, patch_size=8)  # 64 patches
    return SiglipVisionModel(config).eval()


def _plain(tower: SiglipVisionModel, frames: torch.Tensor, layer: int = -1) -> torch.Tensor:
    with torch.no_grad():
        return tower(frames, output_hidden_states=True).hidden_states[layer]


def _frames(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _slow_pan(n: int) -> torch.Tensor:
    """A smooth random scene panned one pixel per frame: `[n, 3, 64, 64]`."""
    coarse = torch.randn(1, 3, 12, 24, generator=torch.Generator().manual_seed(3))
    scene = F.interpolate(coarse, size=(96, 192), mode="bicubic", align_corners=False)
    return torch.cat([scene[..., :64, s:s + 64] for s in range(n)])


@pytest.mark.parametrize("layer", [-1, -2])
def test_cacher_recomputing_every_token_equals_plain_tower(tower: SiglipVisionModel, layer: int) -> None:
    frames = _frames(6, seed=1)
    cacher = STCCacher(tower, CacherConfig(update_token_ratio=1.0, cache_interval=NO_INTERVAL,
                                           refresh_threshold=None), feature_layer=layer)
    out = cacher.encode(frames)
    assert cacher.stats.cache_hits == 5  # the selective path really ran
    torch.testing.assert_close(out, _plain(tower, frames, layer), atol=1e-5, rtol=0)


def test_cacher_static_clip_is_served_from_cache(tower: SiglipVisionModel) -> None:
    frame = _frames(1, seed=2)
    static = frame.expand(12, -1, -1, -1).contiguous()
    cacher = STCCacher(tower, CacherConfig(cache_interval=NO_INTERVAL))
    out = cacher.encode(static)
    assert (cacher.stats.cache_hits, cacher.stats.full_refreshes) == (11, 1)
    # an identical frame reuses exactly what a full pass would compute
    torch.testing.assert_close(out, _plain(tower, static), atol=1e-5, rtol=0)

    noisy = static + 0.05 * torch.randn(static.shape, generator=torch.Generator().manual_seed(4))
    cacher.reset()
    cacher.encode(noisy)
    assert (cacher.stats.cache_hits, cacher.stats.full_refreshes) == (11, 1)
    assert cacher.stats.scene_cut_refreshes == 0


def test_cacher_scene_cut_forces_refresh(tower: SiglipVisionModel) -> None:
    a, b = _frames(2, seed=5)
    cacher = STCCacher(tower, CacherConfig(cache_interval=NO_INTERVAL, refresh_threshold=0.85))
    cacher.encode(torch.stack([a, a, a]))
    assert (cacher.stats.cache_hits, cacher.stats.full_refreshes) == (2, 1)
    cut = cacher.encode(b[None])
    assert (cacher.stats.cache_hits, cacher.stats.full_refreshes, cacher.stats.scene_cut_refreshes) == (2, 2, 1)
    torch.testing.assert_close(cut, _plain(tower, b[None]), atol=1e-5, rtol=0)
    cacher.encode(b[None])  # the cut frame is the new reference
    assert cacher.stats.cache_hits == 3

    # without the threshold (the authors' code) the cut frame would have been a cache hit
    code_only = STCCacher(tower, CacherConfig(cache_interval=NO_INTERVAL, refresh_threshold=None))
    code_only.encode(torch.stack([a, a, a, b]))
    assert (code_only.stats.cache_hits, code_only.stats.full_refreshes) == (3, 1)


def test_cacher_reuse_stays_close_to_recompute_on_slow_pan(tower: SiglipVisionModel) -> None:
    # Measured on this tower with the code defaults (rho 0.25, interval 2): per-token cosine of
    # cached vs recomputed last-layer features min 0.933, mean 0.994; stated bound 0.9 / 0.98.
    clip = _slow_pan(16)
    cacher = STCCacher(tower, CacherConfig(refresh_threshold=None))
    out = cacher.encode(clip)
    plain = _plain(tower, clip)
    hits = torch.arange(1, 16, 2)  # interval 2: odd frames take the selective path
    assert cacher.stats.cache_hits == len(hits)
    cos = F.cosine_similarity(out[hits], plain[hits], dim=-1)
    assert cos.min() > 0.9 and cos.mean() > 0.98
    # recomputing the moving tokens matters: reusing the reference frame's output as is has about
    # twice the cosine error (measured 1 - mean cos: 0.0245 stale vs 0.0110 cached)
    stale = F.cosine_similarity(plain[hits - 1], plain[hits], dim=-1)
    assert (1 - cos.mean()) < 0.6 * (1 - stale.mean())


def test_cacher_flops_saved_follows_hit_count(tower: SiglipVisionModel) -> None:
    clip = _slow_pan(9)
    cacher = STCCacher(tower, CacherConfig(update_token_ratio=0.25, cache_interval=3, refresh_threshold=None))
    cacher.encode(clip)
    stats = cacher.stats
    assert (stats.frames, stats.cache_hits, stats.full_refreshes) == (9, 6, 3)
    # independent count for 4 layers, N=64 patches, m=16 recomputed, D=64, MLP 128, 8x8x3 patches
    n, m, d, inner, layers = 64, 16, 64, 128, 4
    embed = 2 * n * 192 * d
    full_layer = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * inner
    sel_layer = 2 * n * d * d + 2 * m * d * 2 * d + 4 * m * n * d + 2 * m * d * d + 4 * m * d * inner
    per_frame = embed + layers * full_layer
    expected = 6 * layers * (full_layer - sel_layer) / (9 * per_frame)
    assert stats.flops_saved_share > 0
    assert stats.flops_saved_share == pytest.approx(expected, rel=1e-9)

    never = STCCacher(tower, CacherConfig(cache_interval=1))
    never.encode(clip)
    assert never.stats.cache_hits == 0 and never.stats.flops_saved_share == 0


def test_cacher_streams_do_not_share_state(tower: SiglipVisionModel) -> None:
    pan, other = _slow_pan(6), _frames(6, seed=6)
    config = CacherConfig(refresh_threshold=None, cache_interval=NO_INTERVAL)
    alone = STCCacher(tower, config).encode(pan)
    s1, s2 = STCCacher(tower, config), STCCacher(tower, config)
    interleaved = []
    for i in range(6):
        interleaved.append(s1.encode(pan[i:i + 1]))
        s2.encode(other[i:i + 1])
    torch.testing.assert_close(torch.cat(interleaved), alone, atol=0, rtol=0)


def test_cacher_feeds_llava_onevision_like_its_own_vision_path() -> None:
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=200),
        vision_feature_layer=-2, image_token_id=150, video_token_id=151,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    video = torch.randn(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    cacher = STCCacher.from_llava_onevision(model, CacherConfig(update_token_ratio=1.0, refresh_threshold=None))
    with torch.no_grad():
        hidden = cacher.encode(video[0])
        ours = model.model.apply_pooling(model.model.multi_modal_projector(hidden)).reshape(1, -1, 32)
        theirs = model.model.get_video_features(video, vision_feature_layer=config.vision_feature_layer,
                                                vision_feature_select_strategy="full").pooler_output
    assert cacher.stats.cache_hits == 2  # interval 2 over 5 frames
    torch.testing.assert_close(ours, theirs[:, :-1], atol=1e-5, rtol=0)  # last = newline token


def test_cacher_rejects_wrong_towers_and_bad_input(tower: SiglipVisionModel, qwen_visual) -> None:
    with pytest.raises(ConfigError, match="SigLIP"):
        STCCacher(qwen_visual)
    with pytest.raises(ConfigError, match="Qwen2.5-VL"):
        QwenSTCCacher(tower)
    with pytest.raises(ConfigError):
        CacherConfig(update_token_ratio=0.0)
    with pytest.raises(ConfigError):
        CacherConfig(cache_interval=0)
    with pytest.raises(ConfigError):
        STCCacher(tower, feature_layer=9)
    with pytest.raises(InputError):
        STCCacher(tower).encode(torch.zeros(2, 3, 32, 32))


def test_stc_method_file_wires_cacher_then_pruner() -> None:
    from streamprune.pruning.recipe import build_recipe

    recipe = build_recipe("stc")
    assert [m.name for m in recipe.pre_llm] == ["stc_pruner"]
    assert recipe.budget.count(196) == 60
    assert CacherConfig(**recipe.encoder_options["stc_cacher"]) == CacherConfig()


# -- Qwen2.5-VL ViT (our port of the rule: rotary keys/queries, windowed attention) --------------


@pytest.fixture(scope="module")
def qwen_visual() -> Qwen2_5_VisionTransformerPretrainedModel:
    # initializer_range 0.3 (not 0.02) makes attention sharp enough that dropping the windows or
    # the rotary changes the output by >10 (checked), so the equality test below can fail
    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=24,
                                    patch_size=8, window_size=32, fullatt_block_indexes=[1, 3],
                                    initializer_range=0.3)
    return Qwen2_5_VisionTransformerPretrainedModel(config).eval()


def _qwen_input(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, 64, 96, 3]` uint8 -> patches on an 8x12 patch grid = 2x3 windows of 4x4 patches."""
    return qwen_video_patches(frames.numpy(), patch_size=8, merge_size=2, min_pixels=64 * 64, max_pixels=64 * 96)


def _qwen_pan(n: int) -> torch.Tensor:
    coarse = torch.rand(1, 3, 8, 16, generator=torch.Generator().manual_seed(3))
    scene = F.interpolate(coarse, size=(64, 160), mode="bicubic", align_corners=False).clamp(0, 1)
    return (torch.stack([scene[0, :, :, s:s + 96] for s in range(n)]).permute(0, 2, 3, 1) * 255).byte()


def _qwen_plain(visual: Qwen2_5_VisionTransformerPretrainedModel, patches: torch.Tensor,
                grid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return visual(patches, grid_thw=grid).pooler_output


def test_qwen_cacher_recomputing_every_token_equals_plain_tower(qwen_visual) -> None:
    frames = torch.randint(0, 256, (8, 64, 96, 3), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    patches, grid = _qwen_input(frames)
    cacher = QwenSTCCacher(qwen_visual, CacherConfig(update_token_ratio=1.0, cache_interval=NO_INTERVAL,
                                                     refresh_threshold=None))
    out = cacher.encode(patches, grid)
    assert (cacher.stats.frames, cacher.stats.cache_hits) == (4, 3)  # 8 frames = 4 temporal patches
    torch.testing.assert_close(out, _qwen_plain(qwen_visual, patches, grid), atol=1e-5, rtol=1e-5)
    assert cacher.stats.flops_saved_share == 0  # recomputing everything saves nothing


def test_qwen_cacher_static_hits_and_scene_cut_refreshes(qwen_visual) -> None:
    still = _qwen_pan(1).expand(8, -1, -1, -1)
    patches, grid = _qwen_input(still)
    cacher = QwenSTCCacher(qwen_visual, CacherConfig(cache_interval=NO_INTERVAL))
    out = cacher.encode(patches, grid)
    assert (cacher.stats.cache_hits, cacher.stats.full_refreshes) == (3, 1)
    torch.testing.assert_close(out, _qwen_plain(qwen_visual, patches, grid), atol=1e-5, rtol=1e-5)
    assert cacher.stats.flops_saved_share > 0.2

    other = torch.randint(0, 256, (2, 64, 96, 3), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    cut_patches, cut_grid = _qwen_input(other)
    cut = cacher.encode(cut_patches, cut_grid)
    assert (cacher.stats.full_refreshes, cacher.stats.scene_cut_refreshes) == (2, 1)
    torch.testing.assert_close(cut, _qwen_plain(qwen_visual, cut_patches, cut_grid), atol=1e-5, rtol=1e-5)


def test_qwen_cacher_reuse_beats_stale_features_on_slow_pan(qwen_visual) -> None:
    # Measured (rho 0.25, interval 2, 16 frames = 8 temporal patches, 2 px per patch): cached vs
    # recomputed merged tokens mean cosine 0.916, stale reuse of the reference's output 0.854.
    patches, grid = _qwen_input(_qwen_pan(16))
    cacher = QwenSTCCacher(qwen_visual, CacherConfig(refresh_threshold=None))
    out = cacher.encode(patches, grid).view(8, 24, -1)
    plain = _qwen_plain(qwen_visual, patches, grid).view(8, 24, -1)
    hits = torch.arange(1, 8, 2)
    assert cacher.stats.cache_hits == len(hits)
    cos = F.cosine_similarity(out[hits], plain[hits], dim=-1).mean()
    stale = F.cosine_similarity(plain[hits - 1], plain[hits], dim=-1).mean()
    assert cos > 0.88 and (1 - cos) < 0.75 * (1 - stale)


def test_each_family_adapter_builds_the_cacher_of_its_vision_path(tiny_adapters) -> None:
    assert isinstance(tiny_adapters["llava_onevision"].build_cacher(CacherConfig()), STCCacher)
    adapter = tiny_adapters["qwen2_5_vl"]
    model = adapter.model
    cacher = adapter.build_cacher(CacherConfig(update_token_ratio=1.0, refresh_threshold=None))
    assert isinstance(cacher, QwenSTCCacher)
    frames = torch.randint(0, 256, (4, 112, 168, 3), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    patches, grid = qwen_video_patches(frames.numpy(), min_pixels=112 * 168, max_pixels=112 * 168)
    with torch.no_grad():
        theirs = model.model.get_video_features(patches, grid).pooler_output[0]
    torch.testing.assert_close(cacher.encode(patches, grid), theirs, atol=1e-5, rtol=1e-5)
    assert cacher.stats.cache_hits == 1

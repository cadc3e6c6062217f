"""The CUDA subset (skipped without a GPU; `scripts/gpu_check.sh` runs it on one): the models and
every method on the device in bf16 with SDPA, exact against the unmodified model, no tensor left
on the host, and the memory check against the GPU's free memory."""

from __future__ import annotations

import pytest
import torch

from streamprune.config import DeviceConfig
from streamprune.errors import ConfigError
from streamprune.models import load_adapter, resolve_placement
from streamprune.models.base import DynamicCache
from streamprune.models.inner import InnerStage
from streamprune.pruning.base import Budget, PruneContext
from streamprune.pruning.recipe import build_recipe
from streamprune.pruning.registry import available, make_method
from streamprune.types import Selection
from tests.tiny import FAMILIES, random_clip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUESTION = "what happens ?"


def _on_cuda(path, dtype: str = "bfloat16", attn: str = "sdpa"):
    return load_adapter(path, resolve_placement(DeviceConfig(device="cuda", dtype=dtype, attn=attn)))


@pytest.mark.parametrize("family", FAMILIES)
def test_none_logits_on_cuda_bf16_equal_the_unmodified_model(tiny_model_dirs, family):
    adapter = _on_cuda(tiny_model_dirs[family])
    assert adapter.device.type == "cuda" and adapter.dtype == torch.bfloat16
    clip = random_clip()
    with torch.inference_mode():
        inputs = {k: v.to("cuda") for k, v in adapter.reference_inputs(clip, QUESTION, fps=2.0).items()}
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
        reference = adapter.model(**inputs).logits[0].float()
    ours = adapter.prompt_logits(adapter.encode(clip, fps=2.0), QUESTION).float()
    assert ours.device.type == "cuda"
    assert (ours - reference).abs().max() <= 0.02 * reference.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(set(available()) | {"stc"}))
def test_every_method_answers_on_cuda(tiny_model_dirs, family, method):
    adapter = _on_cuda(tiny_model_dirs[family])
    answer = adapter.answer(random_clip(frames=4), QUESTION, build_recipe(method, retain=0.25),
                            PruneContext(seed=0), fps=2.0, max_new_tokens=3)
    assert 0 < answer.visual_tokens_kept <= answer.visual_tokens_in


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_inner_stage_row_under_fused_kernels_equals_eager_on_cuda(tiny_model_dirs, family, attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    fused = _on_cuda(tiny_model_dirs[family], attn=attn)
    eager = _on_cuda(tiny_model_dirs[family], dtype="float32", attn="eager")
    clip = random_clip()
    rows = {}
    for name, adapter in (("fused", fused), ("eager", eager)):
        video = adapter.encode(clip, fps=2.0)
        layout = adapter.layout(video, adapter.prompt_ids(QUESTION))
        embeds, positions, kept_slots = layout.keep(Selection(indices=torch.arange(len(video.tokens), device="cuda")))
        stage = InnerStage(adapter, make_method("fastv", layer=2), Budget(retain=0.5), PruneContext(), kept_slots,
                           embeds[kept_slots])
        adapter.forward_layers(embeds, positions, DynamicCache(), stage)
        rows[name] = stage.attention["llm_attention_last"].float()
    # the fused model runs in bf16, the eager one in fp32: the rows agree to bf16 precision
    assert torch.allclose(rows["fused"], rows["eager"], atol=2e-2, rtol=5e-2)


def test_memory_check_uses_the_gpu_free_memory(tiny_model_dirs):
    from streamprune.models import load_model

    with pytest.raises(ConfigError, match="GiB on cuda"):
        load_model(str(tiny_model_dirs["llava_onevision"]), DeviceConfig(device="cuda"), frames=10 ** 9)

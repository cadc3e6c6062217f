"""A Hugging Face checkpoint directory of either family works with its own files.

The directories come from streamprune.models.shapes: the public config, processor files and chat
template of llava-onevision-qwen2-0.5b-ov-hf and Qwen2.5-VL-3B-Instruct (configs/shapes), one
decoder layer and narrow widths but the public token geometry (384 px / 14 px patches / 2x2 pooling;
14 px patches / 2x2 merge / 2-frame temporal patches / 112 px windows), random weights, and a local
byte-level tokenizer whose special tokens have the real ids. `load_adapter` reads them like a download.

Compared against transformers' own code:
- prompt ids: the real LlavaOnevisionProcessor / Qwen2_5_VLProcessor built from the directory
  (`get_processor_dict` finds the chat template, `apply_chat_template` renders it, `__call__`
  expands the video token and tokenizes; Qwen's also gives mm_token_type_ids and second_per_grid_ts);
- positions: Qwen2.5-VL's `get_rope_index` on the processor's inputs; LLaVA-OV's are 0..L-1;
- token counts: our encoder's output against the processor's expansion, and for Qwen against the
  PIL image processor's patch count (same smart resize and limits as its video processor);
- pixels: on smooth frames, within one uint8 level of the PIL image processors (LLaVA-OV's base
  patch is the plain 384x384 resize; a Qwen2-VL image is a 2-frame video of itself).
Not compared: the video processors. They need torchvision, which this CPU build of torch cannot
import, so the processor is handed our pixels by a stand-in video processor, and its class check of
that argument (a lookup in torchvision-gated registries) is patched out. PIL's bicubic clamps
between its two passes where torchvision's does not, so noisy frames differ by more than a level.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlavaOnevisionProcessor, Qwen2_5_VLProcessor
from transformers.image_processing_utils import BatchFeature
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import PushToHubMixin
from transformers.video_utils import VideoMetadata

from streamprune.models.prompt import SIDECAR, build_prompt_ids, resolve_template
from streamprune.models.shapes import SHAPES, load_shape_config, shape_tokenizer, write_checkpoint_dir
from streamprune.pruning.recipe import build_recipe
from tests.tiny import FAMILIES, random_clip

SHAPE_OF = {"llava_onevision": "llava-ov-0.5b", "qwen2_5_vl": "qwen2.5-vl-3b"}
PROCESSORS = {"llava_onevision": (LlavaOnevisionProcessor, LlavaOnevisionImageProcessorPil),
              "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil)}
QUESTION = "what happens in this clip?"
FPS = 4.0
MESSAGES = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_checkpoint_dir(name, root / name, layers=1, weights=True, narrow=True)
            for family, name in SHAPE_OF.items()}


@pytest.fixture(scope="module")
def adapters(checkpoints: dict[str, Path]) -> dict:
    from streamprune.models import load_adapter

    return {family: load_adapter(path) for family, path in checkpoints.items()}


def smooth_clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour waves in 38..218: resizing them never overshoots the uint8 range."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    waves = [[128 + 90 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
              for _ in range(3)] for _ in range(frames)]
    return np.round(np.stack(waves).transpose(0, 2, 3, 1)).astype(np.uint8)


class GivenVideo(PushToHubMixin):
    """Stands in for the family's video processor (torchvision-only): returns our pixels as its output."""

    def __init__(self, outputs: dict, **settings) -> None:
        self.outputs = outputs
        self.__dict__.update(settings)

    def __call__(self, videos, **kwargs) -> BatchFeature:
        return BatchFeature(self.outputs)

    def to_dict(self) -> dict:
        return {"video_processor_type": type(self).__name__}


def processor_inputs(family: str, adapter, path: Path, frames: np.ndarray) -> BatchFeature:
    """What the real processor of the checkpoint at `path` makes of `frames` and QUESTION."""
    processor_cls, image_cls = PROCESSORS[family]
    if family == "qwen2_5_vl":
        patches, grid = adapter.patches(frames)
        settings = json.loads((path / "preprocessor_config.json").read_text())
        video = GivenVideo({"pixel_values_videos": patches.cpu(), "video_grid_thw": grid.cpu(),
                            "video_metadata": [VideoMetadata(total_num_frames=len(frames), fps=FPS)]},
                           merge_size=settings["merge_size"], temporal_patch_size=settings["temporal_patch_size"])
    else:
        video = GivenVideo({"pixel_values_videos": adapter.pixels(frames)[None].cpu()})
    processor_dict, _ = processor_cls.get_processor_dict(str(path))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
        processor = processor_cls.from_args_and_dict(
            [image_cls.from_pretrained(path), AutoTokenizer.from_pretrained(path), video], processor_dict)
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return processor(text=text, videos=[frames], return_tensors="pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_equal_the_real_processors(adapters, checkpoints, family):
    adapter, frames = adapters[family], random_clip(frames=5, height=120, width=160)
    expected = processor_inputs(family, adapter, checkpoints[family], frames)
    ours = adapter.reference_inputs(frames, QUESTION, fps=FPS)
    assert torch.equal(ours["input_ids"].cpu(), expected["input_ids"])
    if family == "qwen2_5_vl":
        assert torch.equal(ours["mm_token_type_ids"].cpu(), expected["mm_token_type_ids"])
        assert torch.allclose(ours["second_per_grid_ts"].cpu().float(), expected["second_per_grid_ts"].float())


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_makes_as_many_video_tokens_as_the_processor_expands(adapters, checkpoints, family):
    adapter, frames = adapters[family], random_clip(frames=5, height=120, width=160)
    expected = processor_inputs(family, adapter, checkpoints[family], frames)
    slots = int((expected["input_ids"] == adapter.model.config.video_token_id).sum())
    video = adapter.encode(frames, fps=FPS)
    assert len(video.tokens) + video.always_kept.shape[0] == slots
    if family == "llava_onevision":
        assert slots == 5 * 14 * 14 + 1  # 27x27 SigLIP patches pooled to 14x14 per frame, one newline
    else:
        image_patches = Qwen2VLImageProcessorPil.from_pretrained(checkpoints[family]).get_number_of_image_patches(
            120, 160, {})
        assert slots == 3 * image_patches // 4  # 5 frames padded to 3 temporal patches, 2x2 merge
    answer = adapter.answer(frames, QUESTION, build_recipe("uniform", retain=0.25), fps=FPS, max_new_tokens=2)
    assert answer.visual_tokens_in == len(video.tokens) and answer.visual_tokens_kept == len(video.tokens) // 4


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_equal_transformers(adapters, checkpoints, family):
    adapter, frames = adapters[family], random_clip(frames=5, height=120, width=160)
    expected = processor_inputs(family, adapter, checkpoints[family], frames)
    layout = adapter.layout(adapter.encode(frames, fps=FPS), adapter.prompt_ids(QUESTION))
    ids = expected["input_ids"][0]
    video_slots = (ids == adapter.model.config.video_token_id).nonzero().squeeze(1)
    if family == "qwen2_5_vl":
        positions, _ = adapter.model.model.get_rope_index(
            expected["input_ids"], mm_token_type_ids=expected["mm_token_type_ids"],
            video_grid_thw=expected["video_grid_thw"], second_per_grid_ts=expected["second_per_grid_ts"])
        assert torch.equal(layout.positions.cpu(), positions[:, 0])
        assert torch.equal(layout.visual_slots.cpu(), video_slots)
    else:
        assert torch.equal(layout.positions.cpu(), torch.arange(len(ids))[None])
        assert torch.equal(layout.visual_slots.cpu(), video_slots[:-1])  # the trailing newline is never pruned


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(120, 160), (480, 640), (300, 500)])
def test_pixels_within_one_level_of_the_pil_image_processor(adapters, checkpoints, family, size):
    adapter, frames = adapters[family], smooth_clip(2, *size)
    image_processor = PROCESSORS[family][1].from_pretrained(checkpoints[family])
    if family == "qwen2_5_vl":
        ours, grid = adapter.patches(frames[[0, 0]])
        reference = image_processor([frames[0]], return_tensors="pt")
        assert torch.equal(grid.cpu(), reference["image_grid_thw"])
        std = torch.tensor(image_processor.image_std).repeat_interleave(2 * 14 * 14)  # patch rows: channel-major
        reference = reference["pixel_values"]
    else:
        ours = adapter.pixels(frames)
        assert ours.shape == (2, 3, 384, 384)
        reference = image_processor(list(frames), return_tensors="pt")["pixel_values"][:, 0]  # the base patch
        std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    levels = (ours.cpu() - reference).abs() * std * 255
    assert levels.max() <= 1.05 and levels.mean() <= 0.3


def test_qwen_prompt_carries_the_checkpoints_system_turn(adapters):
    """Qwen2.5-VL's template adds a default system turn; llava-onevision-*-ov-hf's has none."""
    qwen, llava = adapters["qwen2_5_vl"], adapters["llava_onevision"]
    system = qwen.tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")["input_ids"]
    qwen_prefix = qwen.prompt_ids(QUESTION).prefix
    assert qwen_prefix[:len(system)] == system
    assert qwen_prefix[len(system):] == qwen.tokenizer("<|im_start|>user\n<|vision_start|>")["input_ids"]
    assert llava.prompt_ids(QUESTION).prefix == llava.tokenizer("<|im_start|>user\n")["input_ids"]


def test_sidecar_template_overrides_the_chat_template(checkpoints, tmp_path):
    from streamprune.models import load_adapter

    path = shutil.copytree(checkpoints["llava_onevision"], tmp_path / "with_sidecar")
    template = "<video> question : {question} answer :"
    (path / SIDECAR).write_text(json.dumps({"prompt_template": template}))
    adapter = load_adapter(path)
    assert adapter.prompt_ids(QUESTION) == build_prompt_ids(adapter.tokenizer, QUESTION, template)


@pytest.mark.parametrize("where", ["processor_config.json", "chat_template.json", "chat_template.jinja",
                                   "tokenizer_config.json"])
def test_chat_template_is_found_where_the_processor_looks(tmp_path, where):
    path = write_checkpoint_dir("qwen2.5-vl-3b", tmp_path / "ckpt")
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    (path / "chat_template.json").unlink()
    if where == "chat_template.jinja":
        (path / where).write_text(template)
    else:  # tokenizer_config.json: the legacy key the tokenizer itself loads
        extra = json.loads((path / where).read_text()) if (path / where).is_file() else {}
        (path / where).write_text(json.dumps({**extra, "chat_template": template}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    found = resolve_template(tokenizer, path, video_id, None)
    assert found.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|vision_start|><video><|vision_end|>{question}<|im_end|>" in found


def test_no_usable_chat_template_falls_back_to_the_family_format(tmp_path):
    """None: the adapter keeps its family's fixed format (QWEN_CHAT_TEMPLATE for LLaVA-OV)."""
    path = write_checkpoint_dir("llava-ov-0.5b", tmp_path / "ckpt")
    (path / "chat_template.json").unlink()
    tokenizer = shape_tokenizer("llava-ov-0.5b")
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    assert resolve_template(tokenizer, path, video_id, None) is None
    # Qwen2's text-only template (message content must be a string) cannot hold a video
    tokenizer.chat_template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                               "message['content'] + '<|im_end|>\\n' }}{% endfor %}")
    assert resolve_template(tokenizer, path, video_id, None) is None


PUBLIC = {  # hidden, layers, heads, kv heads, intermediate, vocab, video token id
    "llava-ov-0.5b": (896, 24, 14, 2, 4864, 152000, 151647),
    "llava-ov-7b": (3584, 28, 28, 4, 18944, 152128, 151647),
    "qwen2.5-vl-3b": (2048, 36, 16, 2, 11008, 151936, 151656),
    "qwen2.5-vl-7b": (3584, 28, 28, 4, 18944, 152064, 151656),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_configs_have_the_public_sizes_and_shorten_consistently(name):
    config = load_shape_config(name)
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size, config.video_token_id) == PUBLIC[name]
    short = load_shape_config(name, layers=2, narrow=True)
    assert short.get_text_config().num_hidden_layers == 2 and len(short.get_text_config().layer_types) == 2
    geometry = ("patch_size", "image_size", "spatial_merge_size", "temporal_patch_size", "window_size",
                "tokens_per_second")
    assert [getattr(short.vision_config, key, None) for key in geometry] == \
           [getattr(config.vision_config, key, None) for key in geometry]
    assert short.get_text_config().vocab_size == text.vocab_size and short.video_token_id == config.video_token_id
    tokenizer = shape_tokenizer(name)
    added = json.loads((SHAPES[name] / "added_tokens.json").read_text())
    assert all(tokenizer.convert_tokens_to_ids(token) == index for token, index in added.items())
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644

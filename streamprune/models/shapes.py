"""Public checkpoints without their weights: configs/shapes/NAME holds the JSON files (model config,
processor configs, chat template, added_tokens.json) the Hugging Face repo ships, so a model of
the real size, or a shortened one with the real token geometry, can be built offline.

`load_shape_config` gives the transformers config (the bench builds random models of it);
`write_checkpoint_dir` writes a directory `load_adapter` reads like a downloaded checkpoint, with a
tokenizer built here whose special tokens carry the checkpoint's real ids. configs/shapes/README.md
says where each file's values come from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from streamprune.config import CONFIG_DIR
from streamprune.config.commands import speed_shapes
from streamprune.errors import ConfigError

SHAPES_DIR = CONFIG_DIR / "shapes"
SHAPES = {name: SHAPES_DIR / name for name in speed_shapes()}
# the files a processor reads, copied as the repo ships them
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json", "chat_template.jinja")

# `narrow`: widths a CPU test runs in seconds. Everything that decides how many tokens a video makes
# and where they sit (image size, patch, pooling, merge, window, temporal patch, tokens per second,
# vocabulary and token ids) keeps its public value; head_dim 16 needs Qwen's M-RoPE split of 8.
NARROW_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
NARROW_VISION = {
    "llava_onevision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
    "qwen2_5_vl": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "depth": 2,
                   "fullatt_block_indexes": [1], "out_hidden_size": NARROW_TEXT["hidden_size"]},
}
NARROW_MROPE_SECTION = [2, 3, 3]


def shape_dir(name: str) -> Path:
    """configs/shapes/NAME, or a one-line ConfigError naming the shapes there are."""
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; choose one of: {', '.join(SHAPES)}")
    return SHAPES[name]


def _text_fields(data: dict) -> dict:
    """The text model's fields: nested (LLaVA-OneVision) or at the top level (Qwen2.5-VL's hub layout)."""
    return data.get("text_config", data)


def _narrow(data: dict) -> None:
    """Shrink the widths of a config dict in place (NARROW_*), leaving the token geometry alone."""
    text = _text_fields(data)
    text.update(NARROW_TEXT)
    data["vision_config"].update(NARROW_VISION[data["model_type"]])
    if "rope_scaling" in text:
        text["rope_scaling"] = {**text["rope_scaling"], "mrope_section": NARROW_MROPE_SECTION}


def load_shape_config(name: str, layers: int | None = None, narrow: bool = False) -> Any:
    """The transformers config of public checkpoint `name`, its text model cut to the first `layers`
    decoder layers when given (`layer_types` cut with it); `narrow` shrinks widths only (NARROW_*)."""
    from transformers import CONFIG_MAPPING

    data = json.loads((shape_dir(name) / "config.json").read_text())
    if narrow:
        _narrow(data)
    config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
    text = config.get_text_config()
    if layers is not None:
        if not 1 <= layers <= text.num_hidden_layers:
            raise ConfigError(f"{name} has {text.num_hidden_layers} decoder layers; cannot keep {layers}")
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = text.layer_types[:layers]
    return config


def shape_tokenizer(name: str) -> Any:
    """A byte-level tokenizer with the checkpoint's added tokens at their real ids (added_tokens.json:
    `<|im_start|>` 151644, `<video>` 151647, `<|video_pad|>` 151656, ...) and ordinary text as one
    token per byte (ids 0-255): prompts tokenize with the real special ids, without the real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    added = json.loads((shape_dir(name) / "added_tokens.json").read_text())
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | added
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(added, key=added.get)})
    return tokenizer


def write_checkpoint_dir(name: str, out_dir: str | Path, layers: int | None = None, tokenizer: bool = True,
                         weights: bool = False, narrow: bool = False, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint directory of `name`: config.json (shortened / narrowed as in `load_shape_config`),
    the processor files and chat template as shipped, the tokenizer of `shape_tokenizer`, and with
    `weights` random weights (seeded) that `from_pretrained` loads. Every (sub)config says `dtype`
    (the public ones say bfloat16 for the LLM; float32 keeps CPU comparisons exact)."""
    import transformers

    from streamprune.models import FAMILIES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = load_shape_config(name, layers, narrow)
    for part in [config, *(getattr(config, key) for key in config.sub_configs)]:
        part.dtype = dtype
    if weights:
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(seed)
        getattr(transformers, FAMILIES[config.model_type][2])(config).to(dtype).save_pretrained(out)
    else:
        config.save_pretrained(out)
    for file in PROCESSOR_FILES:
        if (shape_dir(name) / file).is_file():
            shutil.copyfile(shape_dir(name) / file, out / file)
    if tokenizer:
        shape_tokenizer(name).save_pretrained(out)
    return out


__all__ = ["SHAPES", "load_shape_config", "shape_tokenizer", "write_checkpoint_dir"]

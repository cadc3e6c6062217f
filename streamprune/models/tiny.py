"""Small randomly initialised models of the real transformers classes, with a word-level tokenizer.

`build_llava_onevision` is the one LLaVA-OneVision builder: the tests and the run-time fallback
take its smallest size (`TinyLlavaSize()`: every code path stays real with several frames, a pooled
token grid, multi-head attention, more than one decoder layer), and both training scripts build the
model they train from scratch with it, so a committed checkpoint's config is a `TinyLlavaSize`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from streamprune.models.prompt import SIDECAR
from streamprune.models.small_init import strengthen_vision_init

if TYPE_CHECKING:
    from transformers import LlavaOnevisionForConditionalGeneration

SPECIALS = ["<pad>", "<unk>", "<eos>", "<video>", "<image>", "<|vision_start|>", "<|vision_end|>"]
WORDS = ["question", ":", "answer", "what", "happens", "?", "the", "a", "red", "green", "blue", "yellow",
         "left", "right", "up", "down", "square", "circle", "moves", "is", "colour", "of", "object", "yes", "no"]
TEMPLATES = {
    "llava_onevision": "<video> question : {question} answer :",
    "qwen2_5_vl": "<|vision_start|> <video> <|vision_end|> question : {question} answer :",
}


def word_tokenizer(words: list[str] = WORDS, specials: list[str] = SPECIALS) -> PreTrainedTokenizerFast:
    """Ids are `specials + words` in order; specials from index 3 on (the media markers) are matched
    before splitting."""
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": specials[3:]})
    return tok


@dataclass(frozen=True)
class TinyLlavaSize:
    """Sizes and init of a small LLaVA-OneVision (SigLIP tower, Qwen2 decoder); defaults: the tests' model.

    `vision_mlp_ratio`: SigLIP MLP width per hidden unit. `init_std`: std of the normal init of
    the decoder's and projector's Linear/Embedding weights (transformers' 0.02 suits ~1000-wide
    models; at width 128 attention starts near-uniform and training from scratch stalls on the
    answer prior, ~1/sqrt(width) keeps activations O(1); the SigLIP tower keeps its own init).
    `patch_gain`: None keeps the stock SigLIP init, a number applies `strengthen_vision_init`
    (sin-cos positions, patch embedding x gain) for towers trained from scratch on flat images."""

    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 32
    vision_mlp_ratio: int = 2
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 4096
    init_std: float = 0.02
    patch_gain: float | None = None

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame after LLaVA-OneVision's 2x2 pooling of the patch grid."""
        side = math.ceil(self.image_size // self.patch_size / 2)
        return side * side


def add_size_flags(parser: argparse.ArgumentParser, default: TinyLlavaSize) -> None:
    """One `--flag` per size field, so that a training run's command line is its whole model size."""
    for name, value in asdict(default).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"model size: {name} (see streamprune.models.tiny.TinyLlavaSize)")


def size_from_args(args: argparse.Namespace) -> TinyLlavaSize:
    """The size `add_size_flags`' flags parsed into."""
    return TinyLlavaSize(**{f.name: getattr(args, f.name) for f in fields(TinyLlavaSize)})


def build_llava_onevision(tokenizer: PreTrainedTokenizerFast, size: TinyLlavaSize = TinyLlavaSize(), seed: int = 0,
                          vocab_size: int | None = None, checkpoint: bool = False,
                          **config: Any) -> LlavaOnevisionForConditionalGeneration:
    """A random `LlavaOnevisionForConditionalGeneration` of `size` (in training mode), seeded by `seed`.

    `vocab_size` defaults to the tokenizer's. `checkpoint` writes what a model trained to be
    shipped needs: the tokenizer's eos/pad ids in the text config (generate() reads them; the pad
    embedding row starts at zero) and a single anyres pinpoint at `image_size`, so images are never
    tiled. `config`: further `LlavaOnevisionConfig` fields."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    text = {"model_type": "qwen2", "hidden_size": size.text_hidden, "intermediate_size": size.text_intermediate,
            "num_hidden_layers": size.text_layers, "num_attention_heads": size.text_heads,
            "num_key_value_heads": size.text_kv_heads, "vocab_size": vocab_size or len(tokenizer),
            "max_position_embeddings": size.max_positions, "initializer_range": size.init_std}
    if checkpoint:
        text |= {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        config["image_grid_pinpoints"] = [[size.image_size, size.image_size]]
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": size.vision_hidden,
                       "intermediate_size": size.vision_mlp_ratio * size.vision_hidden,
                       "num_hidden_layers": size.vision_layers, "num_attention_heads": size.vision_heads,
                       "image_size": size.image_size, "patch_size": size.patch_size},
        text_config=text,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        **config,
    ))
    if size.patch_gain is not None:
        strengthen_vision_init(model, size.patch_gain)
    return model


def tiny_llava_onevision(tokenizer: PreTrainedTokenizerFast, image_size: int = 32, seed: int = 0,
                         vocab_size: int | None = None) -> LlavaOnevisionForConditionalGeneration:
    """The tests' and the run-time fallback's model, ready for inference."""
    return build_llava_onevision(tokenizer, TinyLlavaSize(image_size=image_size), seed, vocab_size).eval()


def tiny_qwen2_5_vl(tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
                       "tokens_per_second": 2},
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 4096, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def save_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of `family` with tokenizer and prompt sidecar to `out_dir`."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = Path(out_dir)
    tokenizer = word_tokenizer()
    model = {"llava_onevision": tiny_llava_onevision, "qwen2_5_vl": tiny_qwen2_5_vl}[family](tokenizer, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SIDECAR).write_text(json.dumps({"prompt_template": TEMPLATES[family], "eos_token": "<eos>"}))
    return out


def save_tiny_vla(out_dir: str | Path, action_dim: int = 2, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random VLA (LLaVA-OneVision backbone + 256 action bins at the end of the vocabulary)."""
    import transformers

    from streamprune.models.vla import ACTION_BINS, action_bins_needed

    transformers.utils.logging.disable_progress_bar()
    out = Path(out_dir)
    tokenizer = word_tokenizer(WORDS + ["reach", "task", "action"])
    model = tiny_llava_onevision(tokenizer, image_size=image_size, seed=seed,
                                 vocab_size=action_bins_needed(len(tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    sidecar = {"prompt_template": "<video> task : {question} action :", "eos_token": "<eos>",
               "vla": {"action_dim": action_dim, "bins": ACTION_BINS, "low": -1.0, "high": 1.0}}
    (out / SIDECAR).write_text(json.dumps(sidecar))
    return out

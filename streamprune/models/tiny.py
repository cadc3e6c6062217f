"""Tiny randomly initialised models of the real transformers classes, with a word-level tokenizer.

Used by the tests (real architectures without a model hub) and as the run-time fallback when no
trained model is available. Sizes are the smallest that keep every code path real: several
frames, a pooled token grid, multi-head attention, more than one decoder layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from streamprune.models.prompt import SIDECAR

SPECIALS = ["<pad>", "<unk>", "<eos>", "<video>", "<image>", "<|vision_start|>", "<|vision_end|>"]
WORDS = ["question", ":", "answer", "what", "happens", "?", "the", "a", "red", "green", "blue", "yellow",
         "left", "right", "up", "down", "square", "circle", "moves", "is", "colour", "of", "object", "yes", "no"]
TEMPLATES = {
    "llava_onevision": "<video> question : {question} answer :",
    "qwen2_5_vl": "<|vision_start|> <video> <|vision_end|> question : {question} answer :",
}


def word_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    return tok


def tiny_llava_onevision(tokenizer: PreTrainedTokenizerFast, image_size: int = 32, seed: int = 0,
                         vocab_size: int | None = None):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": 4},
        text_config={"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "vocab_size": vocab_size or len(tokenizer), "max_position_embeddings": 4096},
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaOnevisionForConditionalGeneration(config).eval()


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

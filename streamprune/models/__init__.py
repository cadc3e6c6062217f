"""Video-LLM adapters, one per transformers family, loaded from a local directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from streamprune.errors import ModelError
from streamprune.models.base import Answer, EncodedVideo, PromptLayout, VideoLLMAdapter
from streamprune.models.prompt import read_sidecar

log = logging.getLogger(__name__)

FAMILIES = {
    "llava_onevision": ("streamprune.models.llava_onevision", "LlavaOnevisionAdapter",
                        "LlavaOnevisionForConditionalGeneration"),
    "qwen2_5_vl": ("streamprune.models.qwen2_5_vl", "Qwen25VLAdapter", "Qwen2_5_VLForConditionalGeneration"),
}


def load_adapter(path: str | Path, attn_implementation: str = "sdpa") -> VideoLLMAdapter:
    """Load a model directory written by `save_pretrained` (plus its tokenizer) offline."""
    import importlib

    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(path)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model path {str(path)!r} does not exist or has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ModelError(f"model config {config_file} is not valid JSON: {err}") from None
    if model_type not in FAMILIES:
        raise ModelError(f"model type {model_type!r} at {path} is not supported; supported: {', '.join(FAMILIES)}")
    module_name, adapter_name, model_class = FAMILIES[model_type]
    try:
        model = getattr(transformers, model_class).from_pretrained(
            model_dir, attn_implementation=attn_implementation, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from None
    sidecar = read_sidecar(model_dir)
    adapter_cls = getattr(importlib.import_module(module_name), adapter_name)
    log.info("loaded %s from %s", model_type, model_dir)
    return adapter_cls(model, tokenizer, model_dir, sidecar.get("prompt_template"), sidecar.get("eos_token"))


__all__ = ["Answer", "EncodedVideo", "PromptLayout", "VideoLLMAdapter", "load_adapter", "FAMILIES"]

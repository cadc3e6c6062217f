"""Video-LLM adapters, one file per transformers family, and loading them from a local directory.

A family is one adapter file in this package plus one line in `FAMILIES`; everything outside
`models/` asks the adapter for its capabilities (frames per token unit, position kind, its
STC-Cacher) instead of comparing family names.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

from streamprune.config.schema import DeviceConfig
from streamprune.errors import ModelError
from streamprune.models.placement import (Placement, check_fits, checkpoint_bytes, estimate_memory,
                                          resolve_placement)

log = logging.getLogger(__name__)

# model_type in config.json -> (adapter module, adapter class, transformers model class)
FAMILIES = {
    "llava_onevision": ("streamprune.models.llava_onevision", "LlavaOnevisionAdapter",
                        "LlavaOnevisionForConditionalGeneration"),
    "qwen2_5_vl": ("streamprune.models.qwen2_5_vl", "Qwen25VLAdapter", "Qwen2_5_VLForConditionalGeneration"),
}


def model_type_of(path: str | Path) -> str:
    """The supported `model_type` of a model directory, or a one-line ModelError saying why not
    (the one check of "is this a model dir", run before any worker or actor starts)."""
    from streamprune.models.checks import check_model_dir

    return check_model_dir(path)


def resolve_model_dir(spec: str | None) -> tuple[Path, str]:
    """`--model` (a configs/models name, a directory, or None for the default Video-LLM) ->
    (directory, the entry's attention implementation: what `--attn auto` means);
    embedded models are built on first use if absent."""
    from streamprune.config import resolve_model
    from streamprune.models.default import embedded_model_dir

    cfg = resolve_model(spec)
    if cfg.path is None:
        return embedded_model_dir(cfg.embedded or "videoqa"), cfg.attn_implementation
    return Path(cfg.path), cfg.attn_implementation


def check_model(spec: str | None) -> None:
    """Fail here, with a one-line ModelError, rather than inside a Ray actor or worker."""
    from streamprune.config import resolve_model

    cfg = resolve_model(spec)
    if cfg.path is not None:
        model_type_of(cfg.path)


def load_model(spec: str | None, placement: DeviceConfig | None = None, frames: int | None = None):
    """The adapter for `spec` (a configs/models name or a directory; None: the default Video-LLM)
    on the device, dtype and attention kernel `placement` asks for; with `frames`, first a
    one-line error if that many frames and the model cannot fit the device."""
    path, attn = resolve_model_dir(spec)
    return load_adapter(path, resolve_placement(placement, attn), frames=frames)


def load_adapter(path: str | Path, placement: Placement | str | None = None, frames: int | None = None):
    """Load a model directory written by `save_pretrained` (plus its tokenizer) offline.
    `placement` is a resolved Placement, or just an attention implementation name (CPU,
    checkpoint dtype), as tests use it."""
    import transformers

    from streamprune.models.prompt import read_sidecar

    if not isinstance(placement, Placement):
        placement = resolve_placement(DeviceConfig(device="cpu"), placement or "sdpa")
    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(path)
    model_type = model_type_of(model_dir)
    module_name, adapter_name, model_class = FAMILIES[model_type]
    adapter_cls = getattr(importlib.import_module(module_name), adapter_name)
    if frames is not None:
        check_model_fits(model_dir, adapter_cls, placement, frames)
    try:
        model = getattr(transformers, model_class).from_pretrained(
            model_dir, attn_implementation=placement.attn, dtype=placement.dtype or "auto", local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        raise ModelError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from None
    model = model.to(placement.device)
    sidecar = read_sidecar(model_dir)
    log.info("loaded %s from %s on %s", model_type, model_dir, placement.describe())
    return adapter_cls(model, tokenizer, model_dir, sidecar.get("prompt_template"), sidecar.get("eos_token"))


def check_model_fits(model_dir: Path, adapter_cls: type, placement: Placement, frames: int) -> None:
    """Weights + KV + activations of `frames` frames against the device's free memory, from the
    config and the weight headers alone (before any weight is read)."""
    config = json.loads((model_dir / "config.json").read_text())
    text, vision = config.get("text_config") or config, config.get("vision_config") or {}
    visual_tokens, vision_patches = adapter_cls.visual_budget(model_dir, frames)
    dtype = placement.dtype
    dtype_bytes = dtype.itemsize if dtype is not None else 4
    estimate = estimate_memory(text, vision, checkpoint_bytes(model_dir, dtype), visual_tokens, vision_patches,
                               dtype_bytes)
    check_fits(estimate, placement.device, f"{model_dir.name} with {frames} frames")


__all__ = ["FAMILIES", "Placement", "check_model", "check_model_fits", "load_adapter", "load_model", "model_type_of",
           "resolve_model_dir", "resolve_placement"]

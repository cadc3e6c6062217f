"""Where a model runs: `--device/--dtype/--attn` resolved against this machine, and a memory check
before loading so that a model and the frames asked for that cannot fit get one line, not an
out-of-memory traceback half-way through a run."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from streamprune.config.schema import DeviceConfig
from streamprune.errors import ConfigError
from streamprune.models.checks import DTYPE_BYTES, weight_tensors

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_GIB = 1024 ** 3


@dataclass(frozen=True)
class Placement:
    """A resolved DeviceConfig. `dtype` None keeps the checkpoint's own dtype."""

    device: torch.device
    dtype: torch.dtype | None
    attn: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.") if self.dtype is not None else "checkpoint dtype"
        return f"{self.device} {dtype} {self.attn}"


def resolve_placement(config: DeviceConfig | None = None, model_attn: str = "sdpa") -> Placement:
    """The flags as this machine can honour them, or a one-line ConfigError saying why not."""
    config = config or DeviceConfig()
    cuda = torch.cuda.is_available()
    if config.device == "auto":
        device = torch.device("cuda" if cuda else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda":
        if not cuda:
            raise ConfigError(f"--device {config.device}: this machine has no usable CUDA device "
                              f"(torch {torch.__version__}, cuda available: no)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {config.device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if config.dtype == "auto":
        dtype = None
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = _DTYPES[config.dtype]
    attn = model_attn if config.attn == "auto" else config.attn
    if attn == "flash_attention_2":
        if device.type != "cuda":
            raise ConfigError("--attn flash_attention_2 needs a CUDA device (use sdpa on CPU)")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("--attn flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                              "sdpa needs nothing extra")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError("--attn flash_attention_2 runs in bfloat16 or float16; pass --dtype bfloat16")
    return Placement(device=device, dtype=dtype, attn=attn)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on its device, by part."""

    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def checkpoint_bytes(model_dir: str | Path, dtype: torch.dtype | None) -> int:
    """Weight bytes of a safetensors checkpoint once loaded in `dtype` (None: as stored), from the
    file headers only (float tensors are cast, integer ones keep their width)."""
    total = 0
    for shape, stored in weight_tensors(Path(model_dir)).values():
        width = dtype.itemsize if dtype is not None and stored.startswith(("F", "BF")) else DTYPE_BYTES[stored]
        total += math.prod(shape) * width
    return total


def estimate_memory(text_config: dict, vision_config: dict, weights: int, visual_tokens: int,
                    vision_patches: int, dtype_bytes: int, text_tokens: int = 256) -> MemoryEstimate:
    """Weights + KV of one prefill of `visual_tokens + text_tokens` + the larger of the vision
    tower's and the decoder's activations at their widest point (its MLP), with the attention
    kernels' own memory taken as O(sequence) (SDPA/flash do not materialise L x L)."""
    layers = int(text_config.get("num_hidden_layers", 0))
    heads = int(text_config.get("num_attention_heads", 1))
    kv_heads = int(text_config.get("num_key_value_heads", heads))
    hidden = int(text_config.get("hidden_size", 0))
    head_dim = int(text_config.get("head_dim") or hidden // max(heads, 1))
    sequence = visual_tokens + text_tokens
    kv = 2 * layers * kv_heads * head_dim * sequence * dtype_bytes
    lm_width = max(int(text_config.get("intermediate_size", 4 * hidden)) * 2, hidden * 4)
    lm_activations = sequence * lm_width * dtype_bytes
    vision_hidden = int(vision_config.get("hidden_size", vision_config.get("embed_dim", 0)))
    vision_width = max(int(vision_config.get("intermediate_size", 4 * vision_hidden)) * 2, vision_hidden * 4)
    vision_activations = vision_patches * vision_width * dtype_bytes
    return MemoryEstimate(weights=weights, kv_cache=kv, activations=max(lm_activations, vision_activations))


def available_bytes(device: torch.device) -> int:
    """Free memory on `device` now: CUDA's free count, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(estimate: MemoryEstimate, device: torch.device, what: str, available: int | None = None) -> None:
    """A one-line ConfigError when `estimate` exceeds the free memory of `device`."""
    free = available_bytes(device) if available is None else available
    log.info("%s needs ~%.2f GiB on %s (%.2f GiB free)", what, estimate.total / _GIB, device, free / _GIB)
    if estimate.total > free:
        raise ConfigError(
            f"{what} needs ~{estimate.total / _GIB:.1f} GiB on {device} (weights {estimate.weights / _GIB:.1f} + "
            f"KV cache {estimate.kv_cache / _GIB:.1f} + activations {estimate.activations / _GIB:.1f}) but only "
            f"{free / _GIB:.1f} GiB is free; use fewer --max-frames, a smaller --dtype or a bigger device")

"""Configs of the shared parts: pruning recipes (configs/methods), models (configs/models) and the
live stream's bounded memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamprune.config.fields import attention_name, device_name, dtype_name, option, positive_int
from streamprune.errors import ConfigError


@dataclass
class StageConfig:
    """One stage of a pruning recipe: a registered method and its option overrides."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """A named pruning recipe. `retain`/`max_tokens` form the budget of the final selection."""

    name: str = "none"
    retain: float | None = 1.0
    max_tokens: int | None = None
    stages: list[StageConfig] = field(default_factory=list)
    description: str = ""


@dataclass
class ModelConfig:
    """A configs/models entry: a directory, or `embedded` (videoqa | vla) for a model shipped in
    streamprune/assets (a tiny random stand-in is built once if that checkpoint is absent)."""

    path: str | None = None
    embedded: str | None = None
    attn_implementation: str = "sdpa"  # what `--attn auto` means for this model


@dataclass
class DeviceConfig:
    """Where and how a command runs its model: the flags every model-loading command has.

    device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
    dtype:  auto (bfloat16 on CUDA, the checkpoint's own dtype on CPU) or an explicit one.
    attn:   the decoder's attention kernel; auto is the configs/models entry's (sdpa by default).
            Inner-LLM methods compute the one attention row they need beside the kernel, so
            sdpa and flash_attention_2 never fall back to eager.
    """

    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:N (default auto)",
                         parse=device_name, metavar="DEVICE")
    dtype: str = option("auto", "auto (bfloat16 on CUDA, the checkpoint's dtype on CPU), bfloat16, float16 "
                                "or float32 (default auto)", parse=dtype_name, metavar="DTYPE")
    attn: str = option("auto", "attention kernel: auto (the model entry's, sdpa by default), sdpa, eager or "
                               "flash_attention_2", parse=attention_name, metavar="KERNEL")


@dataclass
class MemoryConfig:
    """Bounds and rules of the streaming memory.

    kv_budget:     most visual tokens ever held.
    recent_frames: newest units kept as they arrived (never compressed or evicted).
    alpha:         A2SF forgetting factor per unit (paper default 0.95).
    segment_tau:   DySeg cut threshold on consecutive frame cosine (FastVID default 0.9).
    static_tau:    HoliTom static threshold for merging tokens at one position (default 0.8).
    """

    kv_budget: int = option(2048, "most visual tokens the memory holds, hence the KV cache of each answer "
                                  "(default 2048)", flags=("--kv-budget",), parse=positive_int, metavar="TOKENS")
    recent_frames: int = option(8, "newest frames kept at full (per-frame pruned) detail (default 8)",
                                flags=("--window",), parse=positive_int, metavar="FRAMES")
    alpha: float = 0.95
    segment_tau: float = 0.9
    static_tau: float = 0.8

    def __post_init__(self) -> None:
        if self.kv_budget < 1:
            raise ConfigError(f"kv budget must be >= 1 token, got {self.kv_budget}")
        if self.recent_frames < 1:
            raise ConfigError(f"recent window must be >= 1 frame, got {self.recent_frames}")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"A2SF alpha must be in (0, 1], got {self.alpha}")

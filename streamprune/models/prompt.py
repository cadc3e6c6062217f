"""Prompt layout shared by the Video-LLM adapters: text before the video, the video span, text after.

A model directory may hold `streamprune.json` with {"prompt_template": "...<video>...{question}...",
"answer_stop": ["..."]}; without it the family's chat format is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

VIDEO_PLACEHOLDER = "<video>"
SIDECAR = "streamprune.json"

# Chat format of the Qwen2 / Qwen2.5 tokenizers that both supported families ship with.
QWEN_CHAT_TEMPLATE = "<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptIds:
    """Token ids around the video span: `prefix + [video]*n + suffix`."""

    prefix: list[int]
    suffix: list[int]


def read_sidecar(model_dir: str | Path) -> dict:
    path = Path(model_dir) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else {}


def build_prompt_ids(tokenizer, question: str, template: str = QWEN_CHAT_TEMPLATE) -> PromptIds:
    """Split `template` at the video placeholder and tokenize both sides (no special tokens added);
    `{question}` may sit on either side (a VLA reads its instruction before the image)."""
    if VIDEO_PLACEHOLDER not in template:
        raise ValueError(f"prompt template must contain {VIDEO_PLACEHOLDER!r}")
    before, after = template.split(VIDEO_PLACEHOLDER, 1)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    return PromptIds(prefix=encode(before.format(question=question)), suffix=encode(after.format(question=question)))

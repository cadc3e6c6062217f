"""Prompt layout shared by the Video-LLM adapters: text before the video, the video span, text after.

Where the template comes from, first found wins:
1. `streamprune.json` in the model directory, {"prompt_template": "...<video>...{question}...",
   "answer_stop": ["..."]}: our embedded trained models are trained on their own format;
2. the checkpoint's chat template, looked up as transformers' processor does (processor_config.json
   "chat_template", chat_template.json, chat_template.jinja, then the tokenizer's own), rendered for
   one user turn holding a video and the question, with the generation prompt: whatever the
   template adds (Qwen2.5-VL's default system turn) is in the prompt, as it is for the processor;
3. the family's fixed format, for directories that ship no template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

log = logging.getLogger(__name__)

VIDEO_PLACEHOLDER = "<video>"
SIDECAR = "streamprune.json"
# stands in for the question while rendering: no whitespace or braces, so no template can split or escape it
_QUESTION_MARK = "\x00streamprune-question\x00"

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


def checkpoint_chat_template(model_dir: str | Path | None, tokenizer: Any) -> str | None:
    """The chat template the checkpoint's processor would use (see the module docstring), or None."""
    template = None
    if model_dir is not None:
        root = Path(model_dir)
        processor = root / "processor_config.json"
        if processor.is_file():
            template = json.loads(processor.read_text()).get("chat_template")
        if template is None and (root / "chat_template.json").is_file():
            template = json.loads((root / "chat_template.json").read_text()).get("chat_template")
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the processor uses "default"
        template = template.get("default")
    return template


def chat_prompt_template(tokenizer: Any, chat_template: str, video_token: str) -> str | None:
    """Render `chat_template` for one user turn (a video, then the question) plus the generation
    prompt, as a `{question}` format string with the video at VIDEO_PLACEHOLDER; None if the
    template cannot render that turn or leaves no single `video_token` in it."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": _QUESTION_MARK}]}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                             tokenize=False)
    except (TemplateError, TypeError, ValueError, KeyError) as err:  # e.g. a text-only template
        log.warning("chat template cannot render a video turn (%s); using the family's format", err)
        return None
    if text.count(video_token) != 1 or text.count(_QUESTION_MARK) != 1:
        log.warning("chat template renders %d video tokens %r for one video; using the family's format",
                    text.count(video_token), video_token)
        return None
    text = text.replace("{", "{{").replace("}", "}}")
    return text.replace(video_token, VIDEO_PLACEHOLDER).replace(_QUESTION_MARK, "{question}")


def resolve_template(tokenizer: Any, model_dir: str | Path | None, video_token_id: int,
                     sidecar_template: str | None) -> str | None:
    """The prompt template an adapter uses: the sidecar's, else the checkpoint's chat template,
    else None (the family's fixed format)."""
    if sidecar_template:
        return sidecar_template
    chat_template = checkpoint_chat_template(model_dir, tokenizer)
    if chat_template is None:
        return None
    return chat_prompt_template(tokenizer, chat_template, tokenizer.convert_ids_to_tokens(video_token_id))

"""The model side of `streamprune serve`: one loaded adapter, answered from one request at a time.

Requests share the model's weights; a forward pass holds `lock` because adapters keep per-call
state (Qwen2.5-VL's grid for its attention probe, the hooks of a received-attention probe), and
one device runs one prefill at a time anyway. Live sessions take the same lock for their encoder
and answers, so a stream and a request never interleave inside the model."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from streamprune.errors import ConfigError, StreampruneError
from streamprune.serve.protocol import ApiError


class ClientGone(Exception):
    """Raised inside the decode loop when the streaming client disconnected."""


@dataclass
class RequestAnswer:
    text: str
    completion_tokens: int
    prompt_tokens: int
    visual_tokens_in: int
    visual_tokens_kept: int
    finish_reason: str
    method: str
    retain: float | None
    max_visual_tokens: int | None
    frames: int
    timings_ms: dict[str, float]


class ChatEngine:
    """An adapter and its defaults; `answer` runs one request's frames through the recipe."""

    def __init__(self, adapter: Any, model_id: str, *, method: str, retain: float | None,
                 max_visual_tokens: int | None, seed: int) -> None:
        self.adapter, self.model_id = adapter, model_id
        self.method, self.retain, self.max_visual_tokens, self.seed = method, retain, max_visual_tokens, seed
        self.lock = threading.Lock()
        self.recipe(method, retain, max_visual_tokens)  # a bad server default fails at start

    def recipe(self, method: str | None, retain: float | None, max_visual_tokens: int | None):
        """The recipe a request names at its budget (the method's own default when it gives none);
        without a method, the server's recipe at the request's budget, else the server's."""
        if method is None:
            method = self.method
            retain = self.retain if retain is None else retain
            max_visual_tokens = self.max_visual_tokens if max_visual_tokens is None else max_visual_tokens
        try:
            return self.adapter.recipe(method, retain=retain, max_tokens=max_visual_tokens)
        except ConfigError as err:
            raise ApiError(400, str(err), "method") from None

    def text_of(self, token_ids: list[int]) -> str:
        return self.adapter.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def answer(self, frames: np.ndarray, question: str, *, fps: float, method: str | None, retain: float | None,
               max_visual_tokens: int | None, max_new_tokens: int, seed: int | None,
               on_token: Callable[[int], None] | None = None) -> RequestAnswer:
        """Encode `frames [T, H, W, 3]`, prune, prefill, decode greedily: what `streamprune ask`
        does with the same frames, method and retain."""
        from streamprune.pruning.base import PruneContext

        recipe = self.recipe(method, retain, max_visual_tokens)
        ctx = PruneContext(seed=self.seed if seed is None else seed)
        try:
            with self.lock:
                answer = self.adapter.answer(frames, question, recipe, ctx, fps=fps, max_new_tokens=max_new_tokens,
                                             on_token=on_token)
        except StreampruneError as err:
            raise ApiError(400, str(err)) from None
        prompt = self.adapter.prompt_ids(question)
        generated = len(answer.token_ids)
        return RequestAnswer(
            text=answer.text, completion_tokens=generated,
            prompt_tokens=len(prompt.prefix) + len(prompt.suffix) + answer.visual_tokens_kept,
            visual_tokens_in=answer.visual_tokens_in, visual_tokens_kept=answer.visual_tokens_kept,
            finish_reason="length" if generated >= max_new_tokens else "stop",
            method=method or self.method, retain=recipe.budget.retain, max_visual_tokens=recipe.budget.max_tokens,
            frames=len(frames), timings_ms={k: round(v, 3) for k, v in answer.timings_ms.items()})

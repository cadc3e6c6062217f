"""The one greedy decode loop, shared by the Video-LLM answer, the VLA's action tokens and the live
memory's incremental-KV answers: each caller supplies how one token is fed (its cache, positions
and taps), the loop decides what is emitted and when it stops."""

from __future__ import annotations

from typing import Callable

import torch

NextLogits = Callable[[int], torch.Tensor]


def greedy_decode(logits: torch.Tensor, feed: NextLogits, max_new_tokens: int,
                  stop_ids: frozenset[int] | set[int] = frozenset(), allowed: slice | None = None,
                  on_token: Callable[[int], None] | None = None) -> list[int]:
    """Argmax tokens from the prefill's last `logits [V]` on, at most `max_new_tokens`.

    `feed(token)` runs one token through the model and returns the next logits; it is not called
    after the last token (nothing would read its output). A token in `stop_ids` ends the answer
    and is not emitted. `allowed` restricts the argmax to a contiguous id range (a VLA's action bins).
    `on_token(token)` sees each emitted token as it is chosen (a server streams it; raising there
    ends the answer, as a client that went away should).
    """
    out: list[int] = []
    offset = 0 if allowed is None else allowed.start
    while len(out) < max_new_tokens:
        scores = logits if allowed is None else logits[allowed]
        token = offset + int(scores.argmax())
        if token in stop_ids:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
        if len(out) == max_new_tokens:
            break
        logits = feed(token)
    return out

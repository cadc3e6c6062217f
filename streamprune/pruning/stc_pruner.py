"""STC-Pruner (Wang et al., "Accelerating Streaming Video LLMs via Hierarchical Token
Compression", arXiv 2512.00891): per frame, keep the tokens least like the frame and the stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamprune.errors import ConfigError, InputError
from streamprune.pruning.base import Budget, PruneContext, PruningMethod
from streamprune.pruning.primitives import gaussian_similarity, spread_budget, topk_stable, true_indices
from streamprune.pruning.registry import register
from streamprune.types import Selection, VisualTokens

log = logging.getLogger(__name__)

_STATE_KEY = "stc_pruner.memory"
_MEMORIES = ("code", "aligned")


@register
class STCPruner(PruningMethod):
    """STC-Pruner, as released (`lern-to-write/STC` @ 9b13ce0, `model/prune.py::STC_Pruner.compress`
    L115-145, Gaussian scoring; memory `_update_memory` L103-107, channels
    `select_feature_channel` L109-113).

    Rule, on one chunk of T frames x N tokens (`[T*N, D]`):
      1. channels: keep the `channel_keep_ratio` fraction of channels with the LOWEST variance
         over the chunk, in ascending variance order (scoring only; kept tokens keep all channels);
      2. z = L2-normalised tokens on those channels;
      3. temporal anchor mu_T = mean of every chunk mean seen on this stream (current chunk
         included), normalised; spatial anchor mu_S(f) = mean of z over frame f;
      4. score_i = g(z_i, mu_T) + g(z_i, mu_S(f)), g = sum over alpha in {1/8,1/4,1/2,1,2} of
         exp(-|z - mu|^2 / (2 alpha)); keep the k lowest scores of each frame (the most novel).
    Paper default: 60 of 196 tokens per frame (LLaVA-OV), channel_keep_ratio 0.5.
    With a Budget, k_f = budget.count(T*N) // T, the remainder spread over evenly spaced frames.

    Streaming memory (`memory`) lives in `ctx.state` as a running sum and count, so consecutive
    calls on one stream share mu_T; reset the state per stream.
    - "code" (default): as L103-107, each chunk stores the mean of ITS selected channels, in its
      own variance order ([D'] vectors), and mu_T averages those vectors position by position; when
      chunks select different channels, or the same channels in another variance order, position j
      of mu_T mixes different channels.
    - "aligned" (ours): each chunk stores its full-width mean [D]; mu_T is the running mean
      restricted to the current chunk's channels in the current order. The two agree only while
      every chunk so far selected the same channels in the same order (so always on the first).
    Deviations: variance ties order channels by lower index first (torch.topk leaves tie order
    unspecified); at least one channel is kept. The paper's bounded history buffer is not used;
    the code's unbounded mean is.
    """

    name = "stc_pruner"
    summary = "per-frame novelty vs frame mean and stream memory (STC-Pruner)"

    @dataclass
    class Config:
        channel_keep_ratio: float = 0.5
        # paper default 60 of 196 tokens per frame, for configs/methods/stc_pruner.yaml;
        # the Budget passed to select wins
        retain: float = 60 / 196
        memory: str = "code"  # "code": average chunk means of their own selected channels; "aligned": ours

        def __post_init__(self) -> None:
            if not 0.0 < self.channel_keep_ratio <= 1.0:
                raise ConfigError(f"channel_keep_ratio must be in (0, 1], got {self.channel_keep_ratio}")
            if self.memory not in _MEMORIES:
                raise ConfigError(f"stc_pruner memory must be one of {_MEMORIES}, got {self.memory!r}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        t, n = tokens.grid[0], tokens.tokens_per_frame
        x = tokens.frames().float()  # [T, N, D]
        d = x.shape[-1]
        n_channels = max(1, int(d * self.config.channel_keep_ratio))
        channels = topk_stable(x.reshape(-1, d).var(dim=0, unbiased=False), n_channels, largest=False)
        xs = x[..., channels]  # [T, N, D'], channels in ascending variance
        if self.config.memory == "code":
            mu_t = self._update_memory(ctx, xs.mean(dim=(0, 1)), d)
        else:
            mu_t = self._update_memory(ctx, x.mean(dim=(0, 1)), d)[channels]
        z = F.normalize(xs, dim=-1)
        mu_t = F.normalize(mu_t, dim=-1)
        mu_s = z.mean(dim=1, keepdim=True)  # [T, 1, D'] (not re-normalised, as in the code)
        score = gaussian_similarity(z, mu_t) + gaussian_similarity(z, mu_s)  # [T, N]

        # all frames at once: frame f keeps the first k_f of its tokens ranked by ascending score
        per_frame = spread_budget(budget.count(t * n), t, device=x.device)
        ranked = topk_stable(score, n, largest=False)
        keep = torch.zeros(t, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, ranked, torch.arange(n, device=x.device) < per_frame[:, None])
        return Selection(indices=true_indices(keep, budget.count(t * n)))

    @staticmethod
    def _update_memory(ctx: PruneContext, chunk_mean: torch.Tensor, width: int) -> torch.Tensor:
        """Add this chunk's mean (`[D']` or `[D]`) of `width`-d tokens to the stream memory and
        return the running mean."""
        memory = ctx.state.get(_STATE_KEY)
        if memory is None:
            memory = ctx.state[_STATE_KEY] = {"sum": torch.zeros_like(chunk_mean), "count": 0, "width": width}
        elif memory["width"] != width or memory["sum"].shape != chunk_mean.shape:
            raise InputError(
                f"STC-Pruner memory holds {memory['width']}-d features but got {width}-d; "
                "reset the PruneContext state per stream"
            )
        memory["sum"] = memory["sum"] + chunk_mean
        memory["count"] += 1
        log.debug("STC-Pruner memory now averages %d chunk means", memory["count"])
        return memory["sum"] / memory["count"]

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


@register
class STCPruner(PruningMethod):
    """STC-Pruner, as released (`model/prune.py::STC_Pruner.compress`, Gaussian scoring).

    Rule, on one chunk of T frames x N tokens (`[T*N, D]`):
      1. channels: keep the `channel_keep_ratio` fraction of channels with the LOWEST variance
         over the chunk (scoring only; kept tokens keep all channels);
      2. z = L2-normalised tokens on those channels;
      3. temporal anchor mu_T = running mean of every chunk mean seen on this stream
         (current chunk included), normalised; spatial anchor mu_S(f) = mean of z over frame f;
      4. score_i = g(z_i, mu_T) + g(z_i, mu_S(f)), g = sum over alpha in {1/8,1/4,1/2,1,2} of
         exp(-|z - mu|^2 / (2 alpha)); keep the k lowest scores of each frame (the most novel).
    Paper default: 60 of 196 tokens per frame (LLaVA-OV), channel_keep_ratio 0.5.
    With a Budget, k_f = budget.count(T*N) // T, the remainder spread over evenly spaced frames.

    Streaming memory lives in `ctx.state` (a running sum and count of full-width chunk means),
    so consecutive calls on one stream share mu_T; reset the state per stream.
    Differs from the code: the code stores chunk means of that chunk's selected channels, so
    means over different channel subsets get averaged; we store full-width means and restrict
    mu_T to the current chunk's channels (identical when the channel set does not change).
    The paper's bounded history buffer is not used; the code's unbounded mean is.
    """

    name = "stc_pruner"
    summary = "per-frame novelty vs frame mean and stream memory (STC-Pruner)"

    @dataclass
    class Config:
        channel_keep_ratio: float = 0.5
        # paper default 60 of 196 tokens per frame, for configs/methods/stc_pruner.yaml;
        # the Budget passed to select wins
        retain: float = 60 / 196

        def __post_init__(self) -> None:
            if not 0.0 < self.channel_keep_ratio <= 1.0:
                raise ConfigError(f"channel_keep_ratio must be in (0, 1], got {self.channel_keep_ratio}")

    def select(self, tokens: VisualTokens, budget: Budget, ctx: PruneContext) -> Selection:
        t, n = tokens.grid[0], tokens.tokens_per_frame
        x = tokens.frames().float()  # [T, N, D]
        mu_t_full = self._update_memory(ctx, x.mean(dim=(0, 1)))

        d = x.shape[-1]
        n_channels = max(1, int(d * self.config.channel_keep_ratio))
        channels = topk_stable(x.reshape(-1, d).var(dim=0, unbiased=False), n_channels, largest=False)
        z = F.normalize(x[..., channels], dim=-1)
        mu_t = F.normalize(mu_t_full[channels], dim=-1)
        mu_s = z.mean(dim=1, keepdim=True)  # [T, 1, D'] (not re-normalised, as in the code)
        score = gaussian_similarity(z, mu_t) + gaussian_similarity(z, mu_s)  # [T, N]

        # all frames at once: frame f keeps the first k_f of its tokens ranked by ascending score
        per_frame = spread_budget(budget.count(t * n), t, device=x.device)
        ranked = topk_stable(score, n, largest=False)
        keep = torch.zeros(t, n, dtype=torch.bool, device=x.device)
        keep.scatter_(1, ranked, torch.arange(n, device=x.device) < per_frame[:, None])
        return Selection(indices=true_indices(keep, budget.count(t * n)))

    @staticmethod
    def _update_memory(ctx: PruneContext, chunk_mean: torch.Tensor) -> torch.Tensor:
        """Add this chunk's mean `[D]` to the stream memory and return the running mean `[D]`."""
        memory = ctx.state.get(_STATE_KEY)
        if memory is None:
            memory = ctx.state[_STATE_KEY] = {"sum": torch.zeros_like(chunk_mean), "count": 0}
        elif memory["sum"].shape != chunk_mean.shape:
            raise InputError(
                f"STC-Pruner memory holds {memory['sum'].shape[0]}-d features but got {chunk_mean.shape[0]}-d; "
                "reset the PruneContext state per stream"
            )
        memory["sum"] = memory["sum"] + chunk_mean
        memory["count"] += 1
        log.debug("STC-Pruner memory now averages %d chunk means", memory["count"])
        return memory["sum"] / memory["count"]

"""Bounded visual memory for question answering on an endless stream.

The memory holds the visual tokens of the stream so far, never more than `kv_budget` of them.
Each token has a feature `[D]`, a position (t, h, w) with t the stream's frame counter, the
stream times it covers, a merge weight and an eviction score. New frames arrive as small units
(one frame for LLaVA-OneVision, `temporal_patch_size` frames for Qwen2.5-VL) already pruned to
the per-frame budget by the configured method. When the store is over budget:

1. The last `recent_frames` units stay untouched, at the detail the per-frame method gave them.
2. Older units are compressed along temporal segments. Where the recipe has a temporal method,
   the segments are that method's own, closed online by the encoder stage (FastVID's DySeg or
   HoliTom's windows, `streamprune.runtime.segmenter`), so the memory never merges across a cut
   the method made. Otherwise FastVID's DySeg (`streamprune.pruning.fastvid.dyseg`, c=1, i.e.
   pure threshold cuts, tau 0.9) splits old units into runs of similar frames by the cosine of
   consecutive frame-mean features. Inside a segment, tokens at the same (h, w) whose cosine to the
   run's earliest token there exceeds HoliTom's tau (0.8) are averaged into it (HoliTom's static
   averaging, weighted by how many tokens each already holds; the merged score is the sum of
   theirs, the attention they drew). HoliTom calls a position static when every consecutive pair
   is similar; comparing each token with the anchor instead lets the merge go on incrementally
   as frames leave the recent window. A scene cut is a DySeg cut, so nothing merges across it.
3. If still over budget, A2SF's rule evicts (Jo & Shin, "A2SF: Accumulative Attention Scoring
   with Forgetting Factor for Token Pruning in Transformer Decoder", arXiv 2407.20485): a token's
   score is its attention accumulated with a forgetting factor alpha (README default 0.95),
   score <- alpha * score + new attention, and the lowest scores go first (ties: oldest first).
   A2SF sums every prefill query's attention per KV head and layer; here the attention is that
   of a question's LAST prompt token, head-averaged, at one decoder layer (the cheap SnapKV-style
   approximation), renormalised over the memory's visual tokens, since one memory serves all
   layers. A2SF forgets per query step; here one step is one arriving unit, and a token never
   attended holds a recency prior: it enters with 1/kv_budget (the share uniform attention would
   give it), which then decays like any score. A2SF's protected `recent_budget` (16 tokens) is
   the recent window here.

By default the "KV cache" is NOT kept incrementally: each question re-prefills the LLM from this
bounded visual memory (plus the prompt), so the bound on visual tokens is a bound on the KV cache
built for each answer, and the prefill cost per question is O(kv_budget). A `MemoryListener`
(`streamprune.memory.kv_cache.IncrementalKV`) can instead keep a KV cache in step with the store:
prefilled unit by unit, evicted and merged with it.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from streamprune.config import MemoryConfig
from streamprune.errors import ConfigError
from streamprune.pruning.fastvid import dyseg

_RENORMALISE_BELOW = 1e-150  # lazy-decay scale at which stored scores are folded back


@dataclass
class MemoryUnit:
    """One encoded unit (1 frame, or a Qwen2.5-VL temporal patch) after per-frame pruning.

    features `[n, D]`, hw `[n, 2]` long grid positions, frame = stream index of the unit's first
    frame, timestamp its stream time in seconds, arrived = monotonic time it entered the pipeline,
    segment = id of the encoder's temporal segment (None: the memory segments old frames itself).
    """

    features: torch.Tensor
    hw: torch.Tensor
    frame: int
    timestamp: float
    arrived: float = 0.0
    tokens_before_pruning: int = 0
    segment: int | None = None  # the encoder's closed segment (online FastVID/HoliTom) it belongs to


@dataclass
class MemorySnapshot:
    """The memory at one instant, in time order: what one answer is built from.

    features `[M, D]`, thw `[M, 3]` (t = frame counter), ts `[M]` / ts_end `[M]` stream seconds
    each token covers, uid `[M]` token ids (to credit attention back), newline `[E, D]`.
    """

    features: torch.Tensor
    thw: torch.Tensor
    ts: torch.Tensor
    ts_end: torch.Tensor
    uid: torch.Tensor
    newline: torch.Tensor

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def stream_time(self) -> float:
        """Stream time of the newest frame the snapshot holds."""
        return float(self.ts_end.max()) if len(self) else 0.0

    @property
    def start_time(self) -> float:
        return float(self.ts.min()) if len(self) else 0.0


class MemoryListener(Protocol):
    """Something kept in step with the memory's token order (e.g. an LLM KV cache of its tokens).
    Called under the memory's lock, in this order per unit: appended, then merged / compacted."""

    def appended(self, features: torch.Tensor) -> None:
        """`[k, D]` new tokens were added at the end."""

    def merged(self, anchor: torch.Tensor, member: torch.Tensor, anchor_weight: torch.Tensor,
               member_weight: torch.Tensor) -> None:
        """Each `member[i]` is being averaged into `anchor[i]` (weights before the merge)."""

    def compacted(self, keep: torch.Tensor) -> None:
        """Only tokens `keep` (ascending indices) remain, in that order."""


class StreamingMemory:
    """A fixed-capacity token store; see the module doc for the rules. Thread-safe (the lock is
    re-entrant, so a reader may hold it across several calls).

    Buffers are allocated once (capacity = budget + one unit's tokens, grown only if a larger
    unit arrives), so a long stream does not grow the process.
    """

    def __init__(self, config: MemoryConfig, dim: int, newline: torch.Tensor | None = None,
                 listener: MemoryListener | None = None) -> None:
        self.config = config
        self.dim = dim
        self.listener = listener
        self.lock = threading.RLock()
        self.newline = newline if newline is not None else torch.zeros(0, dim)
        self.n = 0
        self._capacity = 0
        self._next_uid = 0
        self._scale = 1.0  # alpha^steps: a stored score s is worth s * _scale now
        self._recent: deque[int] = deque(maxlen=config.recent_frames)
        self._unit_tokens = 0  # most tokens one unit brought (for the window check)
        self.evicted = 0
        self.merged = 0
        self.units = 0
        self._allocate(config.kv_budget + 1)

    # -- storage ---------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        n = self.n
        old = (self.features[:n], self.thw[:n], self.t_end[:n], self.ts[:n], self.ts_end[:n],
               self.weight[:n], self.score[:n], self.uid[:n], self.segment[:n]) if self._capacity else None
        self.features = torch.zeros(capacity, self.dim)
        self.thw = torch.zeros(capacity, 3, dtype=torch.long)
        self.t_end = torch.zeros(capacity, dtype=torch.long)
        self.ts = torch.zeros(capacity, dtype=torch.float64)
        self.ts_end = torch.zeros(capacity, dtype=torch.float64)
        self.weight = torch.zeros(capacity)
        self.score = torch.zeros(capacity, dtype=torch.float64)
        self.uid = torch.zeros(capacity, dtype=torch.long)
        self.segment = torch.full((capacity,), -1, dtype=torch.long)
        if old is not None:
            for dst, src in zip((self.features, self.thw, self.t_end, self.ts, self.ts_end,
                                 self.weight, self.score, self.uid, self.segment), old):
                dst[:n] = src
        self._capacity = capacity

    def __len__(self) -> int:
        return self.n

    def scores(self) -> torch.Tensor:
        """`[M]` current A2SF scores (stored scores times the pending decay)."""
        return self.score[: self.n] * self._scale

    def protected(self) -> torch.Tensor:
        """`[M]` bool: tokens of the recent window."""
        if not self._recent:
            return torch.zeros(self.n, dtype=torch.bool)
        return self.thw[: self.n, 0] >= self._recent[0]

    # -- updates ---------------------------------------------------------------------------------
    def append(self, unit: MemoryUnit) -> None:
        """Add one unit's tokens, then compress / evict down to the budget."""
        with self.lock:
            k = int(unit.features.shape[0])
            self._unit_tokens = max(self._unit_tokens, k)
            if self._unit_tokens * self.config.recent_frames > self.config.kv_budget:
                raise ConfigError(
                    f"kv budget {self.config.kv_budget} is smaller than the recent window "
                    f"({self.config.recent_frames} frames x {self._unit_tokens} tokens); raise --kv-budget"
                )
            self._step()
            if self.n + k > self._capacity:
                self._allocate(self.config.kv_budget + 2 * k)
            s = slice(self.n, self.n + k)
            self.features[s] = unit.features.float()
            self.thw[s, 0] = unit.frame
            self.thw[s, 1:] = unit.hw
            self.t_end[s] = unit.frame
            self.ts[s] = unit.timestamp
            self.ts_end[s] = unit.timestamp
            self.weight[s] = 1.0
            self.score[s] = (1.0 / self.config.kv_budget) / self._scale
            self.uid[s] = torch.arange(self._next_uid, self._next_uid + k)
            self.segment[s] = -1 if unit.segment is None else unit.segment
            self._next_uid += k
            self.n += k
            self.units += 1
            self._recent.append(unit.frame)
            if self.listener is not None:
                self.listener.appended(self.features[s])
            if self.n > self.config.kv_budget:
                self._compress()
            if self.n > self.config.kv_budget:
                self._evict(self.n - self.config.kv_budget)

    def _step(self) -> None:
        """A2SF forgetting for one unit: every score times alpha (applied lazily through _scale)."""
        self._scale *= self.config.alpha
        if self._scale < _RENORMALISE_BELOW:
            self.score[: self.n] *= self._scale
            self._scale = 1.0

    def credit_attention(self, uid: torch.Tensor, attention: torch.Tensor) -> int:
        """A2SF accumulation: add a question's attention `[K]` (over the snapshot tokens `uid`)
        to the tokens still held. Returns how many were found."""
        with self.lock:
            if not self.n or not uid.numel():
                return 0
            held = self.uid[: self.n]  # ascending: appends add rising ids, compaction keeps order
            where = torch.searchsorted(held, uid).clamp(max=self.n - 1)
            found = held[where] == uid
            total = attention.sum()
            share = attention.double() / total if total > 0 else attention.double()
            self.score.index_add_(0, where[found], share[found] / self._scale)
            return int(found.sum())

    def _compress(self) -> None:
        """DySeg runs of similar old frames; static tokens at one position averaged (see module doc)."""
        n = self.n
        old = ~self.protected()
        if int(old.sum()) < 2:
            return
        idx = old.nonzero().squeeze(1)  # time order
        feats = self.features[idx]
        frames = self.thw[idx, 0]
        frame_ids, frame_of = torch.unique_consecutive(frames, return_inverse=True)
        if frame_ids.numel() < 2:
            return
        given = self.segment[idx]
        if bool((given >= 0).all()):  # the encoder's temporal method segmented these frames
            seg = given
        else:
            sums = torch.zeros(frame_ids.numel(), self.dim).index_add_(0, frame_of, feats * self.weight[idx, None])
            segments = dyseg(sums, c=1, tau=self.config.segment_tau)
            seg_of_frame = torch.zeros(frame_ids.numel(), dtype=torch.long)
            for s, (a, b) in enumerate(segments):
                seg_of_frame[a:b] = s
            seg = seg_of_frame[frame_of]
        h, w = self.thw[idx, 1], self.thw[idx, 2]
        width = int(w.max()) + 1
        key = (seg * (int(h.max()) + 1) + h) * width + w
        order = torch.argsort(key, stable=True)  # stable: each group's earliest token first
        sorted_key = key[order]
        first = torch.ones_like(sorted_key, dtype=torch.bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        group_start = torch.cummax(torch.where(first, torch.arange(len(order)), 0), dim=0).values
        member, anchor = idx[order], idx[order[group_start]]
        unit = F.normalize(self.features[:n], dim=-1)
        cos = (unit[member] * unit[anchor]).sum(-1)
        merge = (~first) & (cos > self.config.static_tau)
        if not merge.any():
            return
        member, anchor = member[merge], anchor[merge]
        wm = self.weight[member]
        if self.listener is not None:
            self.listener.merged(anchor, member, self.weight[anchor].clone(), wm)
        self.features[anchor] *= self.weight[anchor, None]  # weighted mean: sum, then divide
        self.features.index_add_(0, anchor, self.features[member] * wm[:, None])
        self.weight.index_add_(0, anchor, wm)
        self.features[anchor] /= self.weight[anchor, None]
        self.score.index_add_(0, anchor, self.score[member])
        self.t_end.scatter_reduce_(0, anchor, self.t_end[member], reduce="amax")
        self.ts_end.scatter_reduce_(0, anchor, self.ts_end[member], reduce="amax")
        keep = torch.ones(n, dtype=torch.bool)
        keep[member] = False
        self.merged += int(merge.sum())
        self._compact(keep)

    def _evict(self, count: int) -> None:
        """Drop the `count` unprotected tokens of lowest A2SF score (ties: oldest first)."""
        n = self.n
        candidates = (~self.protected()).nonzero().squeeze(1)  # time order
        order = torch.argsort(self.score[candidates], stable=True)
        keep = torch.ones(n, dtype=torch.bool)
        keep[candidates[order[:count]]] = False
        self.evicted += min(count, candidates.numel())
        self._compact(keep)

    def _compact(self, keep: torch.Tensor) -> None:
        idx = keep.nonzero().squeeze(1)
        m = idx.numel()
        if self.listener is not None:
            self.listener.compacted(idx)
        for buf in (self.features, self.thw, self.t_end, self.ts, self.ts_end, self.weight, self.score, self.uid,
                    self.segment):
            buf[:m] = buf[idx]
        self.n = m

    # -- reading ---------------------------------------------------------------------------------
    def snapshot(self) -> MemorySnapshot:
        """A copy of the held tokens (time order), safe to use while the stream goes on."""
        with self.lock:
            n = self.n
            thw = self.thw[:n].clone()
            return MemorySnapshot(features=self.features[:n].clone(), thw=thw, ts=self.ts[:n].clone(),
                                  ts_end=self.ts_end[:n].clone(), uid=self.uid[:n].clone(),
                                  newline=self.newline.clone())

    def tokens_per_frame(self) -> dict[int, int]:
        """{frame counter: tokens held whose anchor is that frame} (for inspection and tests)."""
        with self.lock:
            frames, counts = torch.unique(self.thw[: self.n, 0], return_counts=True)
            return dict(zip(frames.tolist(), counts.tolist()))

    def frames_covered(self) -> torch.Tensor:
        """`[M, 2]` first and last frame counter each held token covers (merged tokens span > 1)."""
        with self.lock:
            return torch.stack([self.thw[: self.n, 0], self.t_end[: self.n]], dim=1).clone()

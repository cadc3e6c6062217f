"""Choosing the retain ratio per step so a step meets a latency target (`--target-latency-ms`).

A robot must hold its control rate, and a live answer has a deadline. Both are time budgets, not
token budgets. The controller turns the time budget into a retain ratio from the step times it
measures, so the same target holds on a fast GPU, a busy CPU or a machine that slows down mid-run.
This rule is ours (no paper we follow offers one).

The model: step_ms(retain) = fixed + slope * retain. `fixed` is what pruning cannot remove (image
preprocessing, the vision tower, Python overhead, decoding the action). `slope` is what grows with
the tokens kept (the LLM layers after the pruning point, the KV cache that decoding reads, a
selector whose cost grows with k). Both are fitted online from the measured (retain, ms) pairs,
and each step chooses

    retain = clamp((target - fixed) / slope, retain_min, retain_max).

The fit has to cope with a shared CPU, where one step in ten can take twice as long:
- slope: a weighted Theil-Sen estimate, the median of the slopes between pairs of recent steps
  whose retains differ by at least `min_gap`. Pairs of nearly equal retains would only measure
  noise, so they are left out. The slope is clamped to >= 0, because keeping more tokens never
  makes a step cheaper. Noise can make it look that way, and a negative slope would turn the rule
  around. When no such pair is left (a long run at one retain), the last slope found is kept.
- fixed: the weighted median of (ms - slope * retain) over the recent steps. It follows drift
  (a machine that slows down) within a few steps, and a single spike does not move it.
- forgetting: step i steps ago weighs `forget ** i` (default 0.9, about ten steps of memory). A
  pair weighs the product of its two weights. At most `window` steps are kept.
- probing: a slope needs two different retains. The first step runs at retain_max, which
  measures the unpruned time (pruning may not be needed at all). While no slope is known and a
  step is over the target, the next one probes a lower retain. It takes the proportional guess
  retain * target / ms, at least `min_gap` below the current retain. A step under the target
  below retain_max probes upwards the same way.

When even retain_min is predicted to miss the target, the controller sits at retain_min and
`stats()["target_reachable"]` is False. When retain_max already meets the target, it sits at
retain_max.

Defaults: retain in [0.02, 1.0], forget 0.9, window 32 steps, min_gap 0.1 (in retain).
"""

from __future__ import annotations

import math
from collections import deque

from streamprune.errors import ConfigError


class RetainController:
    """A per-step retain ratio that keeps the measured step time near `target_ms` (see the module
    docstring for the rule). Call `next_retain()` before a step and `observe(retain, ms)` after it.
    Pass the retain the step really used."""

    def __init__(self, target_ms: float, retain_max: float = 1.0, retain_min: float = 0.02,
                 forget: float = 0.9, window: int = 32, min_gap: float = 0.1) -> None:
        if not (math.isfinite(target_ms) and target_ms > 0):
            raise ConfigError(f"target latency must be a positive number of ms, got {target_ms}")
        if not 0.0 < retain_min <= retain_max <= 1.0:
            raise ConfigError(f"need 0 < retain_min <= retain_max <= 1, got {retain_min}, {retain_max}")
        if not 0.0 < forget <= 1.0:
            raise ConfigError(f"forget must be in (0, 1], got {forget}")
        if window < 2:
            raise ConfigError(f"window must be >= 2 steps, got {window}")
        if min_gap <= 0:
            raise ConfigError(f"min_gap must be > 0, got {min_gap}")
        self.target_ms = float(target_ms)
        self.retain_max, self.retain_min = float(retain_max), float(retain_min)
        self.forget = float(forget)
        # a narrow range would never hold a pair min_gap apart
        self.min_gap = min(float(min_gap), self.retain_max - self.retain_min) or float(min_gap)
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)  # (retain, ms), oldest first
        self._slope: float | None = None  # the last slope the samples identified
        self._steps = 0
        self._latency_sum = 0.0
        self._stage_sum: dict[str, float] = {}
        self._stage_count: dict[str, int] = {}

    def next_retain(self) -> float:
        """The retain ratio for the next step, in [retain_min, retain_max]."""
        return self._decide()[0]

    def observe(self, retain: float, latency_ms: float, stage_ms: dict[str, float] | None = None) -> None:
        """Record a finished step: the `retain` it ran with and its measured `latency_ms`. The
        optional `stage_ms` (encode, llm, ...) only go into `stats()`. The total alone drives the
        choice, and the per-stage means show which stage makes a target unreachable."""
        if not (math.isfinite(retain) and 0.0 < retain <= 1.0):
            raise ValueError(f"retain must be in (0, 1], got {retain}")
        if not (math.isfinite(latency_ms) and latency_ms >= 0.0):
            raise ValueError(f"latency must be a finite number of ms >= 0, got {latency_ms}")
        self._samples.append((float(retain), float(latency_ms)))
        self._steps += 1
        self._latency_sum += latency_ms
        for name, ms in (stage_ms or {}).items():
            self._stage_sum[name] = self._stage_sum.get(name, 0.0) + float(ms)
            self._stage_count[name] = self._stage_count.get(name, 0) + 1
        slope = self._fit_slope()
        if slope is not None:
            self._slope = slope

    def stats(self) -> dict:
        """What the controller knows now. `retain`: the ratio `next_retain()` would return.
        `fixed_ms` and `slope_ms`: the fitted model (ms at retain 0, extra ms per unit of retain;
        None until known). `target_reachable`: whether retain_min is predicted to meet the target
        (None until a slope is known, unless retain_max already meets it)."""
        retain, fixed, reachable = self._decide()
        return {
            "target_ms": self.target_ms,
            "retain": retain,
            "steps": self._steps,
            "latency_ms_last": self._samples[-1][1] if self._samples else None,
            "latency_ms_mean": self._latency_sum / self._steps if self._steps else None,
            "fixed_ms": fixed,
            "slope_ms": self._slope,
            "target_reachable": reachable,
            "stage_ms_mean": {name: self._stage_sum[name] / self._stage_count[name] for name in self._stage_sum},
        }

    def _weights(self) -> list[float]:
        n = len(self._samples)
        return [self.forget ** (n - 1 - i) for i in range(n)]  # the newest weighs 1

    def _fit_slope(self) -> float | None:
        """Weighted Theil-Sen: the median of the slopes between pairs at least `min_gap` apart (>= 0)."""
        samples, weights = list(self._samples), self._weights()
        slopes, pair_weights = [], []
        for i, (r_i, ms_i) in enumerate(samples):
            for j in range(i + 1, len(samples)):
                r_j, ms_j = samples[j]
                if abs(r_j - r_i) >= self.min_gap - 1e-12:
                    slopes.append((ms_j - ms_i) / (r_j - r_i))
                    pair_weights.append(weights[i] * weights[j])
        if not slopes:
            return None
        return max(0.0, weighted_median(slopes, pair_weights))

    def _decide(self) -> tuple[float, float | None, bool | None]:
        """(retain for the next step, fitted fixed ms or None, target reachable or None)."""
        if not self._samples:
            return self.retain_max, None, None
        last_retain, last_ms = self._samples[-1]
        if self._slope is None:
            guess = last_retain * self.target_ms / max(last_ms, 1e-9)  # as if the whole step scaled
            if last_ms <= self.target_ms:
                if last_retain >= self.retain_max:
                    return self.retain_max, None, True
                return self._clamp(max(guess, last_retain + self.min_gap)), None, True  # probe upwards
            if last_retain <= self.retain_min:
                # over the target at the floor: lower is not allowed, and more tokens never cost less
                return self.retain_min, None, False
            return self._clamp(min(guess, last_retain - self.min_gap)), None, None
        slope = self._slope
        fixed = weighted_median([ms - slope * r for r, ms in self._samples], self._weights())
        reachable = fixed + slope * self.retain_min <= self.target_ms
        if not reachable:
            return self.retain_min, fixed, False
        if slope <= 1e-9:  # the step time does not depend on retain: keep every token allowed
            return self.retain_max, fixed, True
        return self._clamp((self.target_ms - fixed) / slope), fixed, True

    def _clamp(self, retain: float) -> float:
        return min(self.retain_max, max(self.retain_min, retain))


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The smallest value at which the cumulative weight reaches half the total (values non-empty)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    half = sum(weights) / 2
    total = 0.0
    for i in order:
        total += weights[i]
        if total >= half:
            return values[i]
    return values[order[-1]]

"""The allocation policies operators use today, as real per-tick implementations.

Each policy is fed one tick at a time: `allocate(observed)` takes the demand seen in the
tick that just ended (NaN where unknown) and returns the allocation for the next tick.
So a policy can only ever use the past. All work on arrays: one element per guest, and
the knob may be an array that broadcasts against the guests (the benchmark sweeps all
knob values in one pass with knob shape (K, 1) and guests (n,)). Units are whatever the
caller uses (fractions of provisioned capacity in the benchmark, cores in the live loop);
allocations are clipped to `capacity`.

Every policy has one safety knob, a multiplier on its own estimate of demand (a headroom
h is the multiplier 1 + h), so that one sweep treats them all the same way.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np

STEPS_PER_DAY = 288  # 5-minute ticks


class AllocationPolicy(Protocol):
    name: ClassVar[str]
    default_knob: ClassVar[float]

    def allocate(self, observed: np.ndarray) -> np.ndarray: ...


class _Base:
    name: ClassVar[str] = ""
    default_knob: ClassVar[float] = 1.0

    def __init__(self, guests: int, knob: float | np.ndarray | None = None,
                 capacity: float | np.ndarray = 1.0) -> None:
        self.knob = np.asarray(self.default_knob if knob is None else knob, np.float64)
        self.capacity = np.asarray(capacity, np.float64)
        self.guests = guests

    def _clip(self, estimate: np.ndarray) -> np.ndarray:
        return np.minimum(self.knob * estimate, self.capacity)


class LastValue(_Base):
    """Allocate the last observed demand times the knob (1.25 = 25% headroom)."""

    name = "last-value"
    default_knob = 1.25

    def __init__(self, guests: int, knob: float | np.ndarray | None = None,
                 capacity: float | np.ndarray = 1.0) -> None:
        super().__init__(guests, knob, capacity)
        self.last = np.full(guests, np.inf)

    def allocate(self, observed: np.ndarray) -> np.ndarray:
        self.last = np.where(np.isnan(observed), self.last, observed)
        return self._clip(self.last)


class Ewma(_Base):
    """Exponentially weighted mean of demand (half-life 30 min) times the knob."""

    name = "ewma"
    default_knob = 1.25
    half_life_ticks = 6

    def __init__(self, guests: int, knob: float | np.ndarray | None = None,
                 capacity: float | np.ndarray = 1.0) -> None:
        super().__init__(guests, knob, capacity)
        self.alpha = 1.0 - 0.5 ** (1.0 / self.half_life_ticks)
        self.mean = np.full(guests, np.nan)

    def allocate(self, observed: np.ndarray) -> np.ndarray:
        seen = ~np.isnan(observed)
        blended = np.where(np.isnan(self.mean), observed, self.mean + self.alpha * (observed - self.mean))
        self.mean = np.where(seen, blended, self.mean)
        return self._clip(np.where(np.isnan(self.mean), np.inf, self.mean))


class StaticPeak(_Base):
    """Size once to the peak seen during a warm-up day, times the knob; never resize."""

    name = "static-peak"
    default_knob = 1.0

    def __init__(self, guests: int, knob: float | np.ndarray | None = None,
                 capacity: float | np.ndarray = 1.0, warmup_ticks: int = STEPS_PER_DAY) -> None:
        super().__init__(guests, knob, capacity)
        self.warmup = warmup_ticks
        self.seen = np.zeros(guests, np.int64)
        self.peak = np.zeros(guests)

    def allocate(self, observed: np.ndarray) -> np.ndarray:
        started = (self.seen > 0) | ~np.isnan(observed)  # the warm-up day starts at the first sample
        warming = started & (self.seen < self.warmup)
        value = np.where(np.isnan(observed), 0.0, observed)
        self.peak = np.where(warming, np.maximum(self.peak, value), self.peak)
        self.seen = self.seen + warming
        sized = self.seen >= self.warmup
        return np.where(sized, self._clip(self.peak), np.broadcast_to(self.capacity, self.peak.shape))


class MovingWindowMax(_Base):
    """Autopilot-style: the maximum demand over the last day, times the knob."""

    name = "window-max"
    default_knob = 1.0

    def __init__(self, guests: int, knob: float | np.ndarray | None = None,
                 capacity: float | np.ndarray = 1.0, window_ticks: int = STEPS_PER_DAY) -> None:
        super().__init__(guests, knob, capacity)
        self.ring = np.full((window_ticks, guests), np.nan)
        self.i = 0

    def allocate(self, observed: np.ndarray) -> np.ndarray:
        self.ring[self.i % len(self.ring)] = observed
        self.i += 1
        known = ~np.isnan(self.ring).all(axis=0)
        peak = np.where(known, np.nanmax(np.where(np.isnan(self.ring), -np.inf, self.ring), axis=0), np.inf)
        return self._clip(peak)


class WindowPercentile(_Base):
    """Kubernetes VPA-style recommender: P90 of a decaying 8-day histogram, plus 15%.

    As VPA does: exponential buckets growing by 5%, each sample weighted 2^(age/24h)
    so that a day-old sample counts half, samples older than 8 days dropped, and the
    percentile read as the upper edge of the bucket it falls in. The knob is VPA's
    safety margin multiplier (default 1.15).
    """

    name = "vpa-percentile"
    default_knob = 1.15
    percentile = 0.90
    window_ticks = 8 * STEPS_PER_DAY
    half_life_ticks = STEPS_PER_DAY

    def __init__(self, guests: int, knob: float | np.ndarray | None = None,
                 capacity: float | np.ndarray = 1.0, first_bucket: float = 1e-4,
                 growth: float = 1.05) -> None:
        super().__init__(guests, knob, capacity)
        top = float(np.max(capacity))
        n = int(np.ceil(np.log(top / first_bucket) / np.log(growth))) + 1
        self.edges = first_bucket * growth ** np.arange(n)  # upper edge of bucket i (bucket 0: [0, first])
        self.hist = np.zeros((guests, n))
        self.ring = np.full((self.window_ticks, guests), -1, np.int64)  # bucket of each sample, -1 none
        self.ring_w = np.zeros((self.window_ticks, guests))
        self.i = 0

    def allocate(self, observed: np.ndarray) -> np.ndarray:
        slot = self.i % self.window_ticks
        rows = np.arange(self.guests)
        old = self.ring[slot]
        gone = old >= 0
        np.subtract.at(self.hist, (rows[gone], old[gone]), self.ring_w[slot, gone])
        seen = ~np.isnan(observed)
        bucket = np.minimum(np.searchsorted(self.edges, np.where(seen, observed, 0.0)), len(self.edges) - 1)
        weight = 2.0 ** ((self.i % (16 * self.window_ticks)) / self.half_life_ticks)
        if self.i % (16 * self.window_ticks) == 0 and self.i:
            # Rescale before the weights overflow: ratios, and so percentiles, are unchanged.
            scale = 2.0 ** (-(16 * self.window_ticks) / self.half_life_ticks)
            self.hist *= scale
            self.ring_w *= scale
        np.add.at(self.hist, (rows[seen], bucket[seen]), weight)
        self.ring[slot] = np.where(seen, bucket, -1)
        self.ring_w[slot] = np.where(seen, weight, 0.0)
        self.i += 1
        total = self.hist.sum(axis=1)
        cum = np.cumsum(self.hist, axis=1)
        idx = (cum < self.percentile * total[:, None]).sum(axis=1)
        estimate = np.where(total > 0, self.edges[np.minimum(idx, len(self.edges) - 1)], np.inf)
        return self._clip(estimate)


class ReactiveThreshold(_Base):
    """oVirt MoM-style rules: grow at once when headroom runs short, shrink in steps.

    Target = last demand times the knob (1.25: keep 20% free, MoM's default free
    threshold). Below target: grow to it. Above target by more than half again: shrink
    by 10% of the allocation per tick, never below the target. Otherwise hold.
    """

    name = "reactive-threshold"
    default_knob = 1.25
    shrink_band = 0.5
    shrink_step = 0.10

    def __init__(self, guests: int, knob: float | np.ndarray | None = None,
                 capacity: float | np.ndarray = 1.0) -> None:
        super().__init__(guests, knob, capacity)
        self.alloc = np.broadcast_to(self.capacity, np.broadcast_shapes(self.knob.shape, (guests,))).copy()

    def allocate(self, observed: np.ndarray) -> np.ndarray:
        target = np.minimum(self.knob * observed, self.capacity)
        grow = target > self.alloc
        shrink = self.alloc > target * (1 + self.shrink_band)
        shrunk = np.maximum(target, self.alloc * (1 - self.shrink_step))
        new = np.where(grow, target, np.where(shrink, shrunk, self.alloc))
        self.alloc = np.where(np.isnan(target), self.alloc, new)
        return self.alloc.copy()


BASELINES: tuple[type[_Base], ...] = (StaticPeak, ReactiveThreshold, WindowPercentile, MovingWindowMax,
                                      Ewma, LastValue)

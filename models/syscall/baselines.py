"""The detectors NeuraOS is measured against, fitted on the same normal traces.

- STIDE (Forrest et al. 1996; Warrender et al. 1999): the database of every length-n
  window in normal traces; a trace's score is its share of windows not in the database.
- Bag of syscalls: each trace as its normalised syscall histogram, one-class by the
  standardised distance to the normal mean (a diagonal Gaussian's Mahalanobis distance).
- Kneser-Ney n-gram: an interpolated Kneser-Ney language model (absolute discount 0.75);
  a trace's score is its mean per-syscall surprise, the same statistic the LSTM is read by.
All three score a whole trace, higher = more anomalous.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

Trace = Sequence[int]


@dataclass
class Stide:
    n: int = 6
    db: set[tuple[int, ...]] = field(default_factory=set)

    def fit(self, traces: Sequence[Trace]) -> Stide:
        for t in traces:
            self.db.update(tuple(t[i:i + self.n]) for i in range(len(t) - self.n + 1))
        return self

    def score(self, trace: Trace) -> float:
        windows = [tuple(trace[i:i + self.n]) for i in range(len(trace) - self.n + 1)]
        if not windows:  # shorter than one window: the whole trace is its only window
            return float(tuple(trace) not in {w[:len(trace)] for w in self.db})
        return sum(w not in self.db for w in windows) / len(windows)


@dataclass
class BagOfSyscalls:
    floor: float = 1e-3  # keeps syscalls that never vary in normal traces from dividing by 0
    mean: dict[int, float] = field(default_factory=dict)
    scale: dict[int, float] = field(default_factory=dict)

    def fit(self, traces: Sequence[Trace]) -> BagOfSyscalls:
        calls = sorted({c for t in traces for c in t})
        col = {c: i for i, c in enumerate(calls)}
        h = np.zeros((len(traces), len(calls)))
        for i, t in enumerate(traces):
            for c, n in Counter(t).items():
                h[i, col[c]] = n / len(t)
        mu, sd = h.mean(0), h.std(0) + self.floor
        self.mean = {c: float(mu[col[c]]) for c in calls}
        self.scale = {c: float(sd[col[c]]) for c in calls}
        return self

    def score(self, trace: Trace) -> float:
        freq = {c: n / len(trace) for c, n in Counter(trace).items()}
        known = sum(((freq.get(c, 0.0) - m) / self.scale[c]) ** 2 for c, m in self.mean.items())
        unknown = sum((f / self.floor) ** 2 for c, f in freq.items() if c not in self.mean)
        return math.sqrt(known + unknown)


@dataclass
class KneserNey:
    order: int = 5
    discount: float = 0.75
    vocab_size: int = 512  # the uniform floor for never-seen calls
    _counts: list[dict[tuple[int, ...], Counter[int]]] = field(default_factory=list)
    _totals: list[dict[tuple[int, ...], tuple[int, int]]] = field(default_factory=list)

    BOS = -1

    def fit(self, traces: Sequence[Trace]) -> KneserNey:
        top: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        for t in traces:
            padded = [self.BOS] * (self.order - 1) + list(t)
            for i in range(self.order - 1, len(padded)):
                top[tuple(padded[i - self.order + 1:i])][padded[i]] += 1
        levels = [top]  # levels[k]: context length order-1-k; lower levels hold continuation counts
        for _ in range(self.order - 1):
            lower: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
            for ctx, nxt in levels[-1].items():
                for w in nxt:
                    lower[ctx[1:]][w] += 1  # one more distinct left extension of (ctx[1:], w)
            levels.append(lower)
        self._counts = levels[::-1]  # _counts[k]: context length k
        self._totals = [{c: (sum(v.values()), len(v)) for c, v in level.items()} for level in self._counts]
        return self

    def surprise(self, trace: Trace) -> np.ndarray:
        padded = [self.BOS] * (self.order - 1) + list(trace)
        out = np.empty(len(trace))
        for j, i in enumerate(range(self.order - 1, len(padded))):
            w, p = padded[i], 1.0 / self.vocab_size
            for k in range(self.order):
                ctx = tuple(padded[i - k:i]) if k else ()
                total = self._totals[k].get(ctx)
                if total is not None:
                    n, types = total
                    p = (max(self._counts[k][ctx][w] - self.discount, 0.0) + self.discount * types * p) / n
            out[j] = -math.log(p)
        return out

    def score(self, trace: Trace) -> float:
        return float(self.surprise(trace).mean()) if len(trace) else 0.0

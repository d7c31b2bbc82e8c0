"""Online per-guest calibration of the forecast tail: each guest's misses aimed at the policy's rate.

One forecaster serves every guest, so a given guest's demand may exceed its p98 more or
less often than 2% of ticks, and differently at rest than when busy: a batch VM at rest
can jump to full load at any tick, and that is where most misses and most slack are.
Adaptive conformal inference (Gibbs & Candès, NeurIPS 2021), per guest and per regime
(at rest: last demand below `idle_below` of capacity; busy otherwise): after each tick
the log of a divisor on the tail probability moves up by gamma x (1 - rate) on a miss
and down by gamma x rate otherwise, so each regime's miss rate tends to the target rate.
It reads only the guest's own past, one tick at a time.

Works on arrays: one element per guest, or knob x guest in the benchmark replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CalibrationConfig:
    """Chosen on the validation VMs (models/forecaster/MODEL_CARD.md)."""

    gamma: float = 0.2  # step of the log divisor per tick
    idle_below: float = 0.01  # a guest at rest: last demand under 1% of capacity (the forecaster's scale floor)
    max_shift: float = 3.0  # the divisor stays within e^-3 .. e^3 (about 1/20 .. 20)


class TailCalibrator:
    """Per guest and regime, the quantile level that keeps misses at `tail` (e.g. 0.02 for p98)."""

    def __init__(self, tail: np.ndarray | float, cfg: CalibrationConfig = CalibrationConfig()) -> None:
        self.tail = np.asarray(tail, np.float64)
        self.cfg = cfg
        self.shift = np.zeros(self.tail.shape + (2,))  # log divisor, [..., regime]
        self.regime: np.ndarray | None = None  # regime of the last levels() call
        self.predicted: np.ndarray | None = None  # what those levels forecast

    def levels(self, last: np.ndarray) -> np.ndarray:
        """Quantile levels for the coming tick from each guest's last demand (NaN unknown)."""
        busy = np.nan_to_num(np.asarray(last, np.float64), nan=0.0) >= self.cfg.idle_below
        self.regime = np.broadcast_to(busy, self.tail.shape).astype(np.int64)
        shift = np.take_along_axis(self.shift, self.regime[..., None], -1)[..., 0]
        return 1.0 - self.tail * np.exp(-shift)

    def forecast_was(self, predicted: np.ndarray) -> None:
        """The forecast at the levels just given (NaN: none, and no update next tick)."""
        self.predicted = np.broadcast_to(np.asarray(predicted, np.float64), self.tail.shape).copy()

    def observe(self, demand: np.ndarray) -> None:
        """The demand of the tick the last forecast was for (NaN unknown): move the divisors."""
        if self.regime is None or self.predicted is None:
            return
        demand = np.asarray(demand, np.float64)
        known = ~np.isnan(demand) & ~np.isnan(self.predicted)
        miss = known & (np.nan_to_num(demand, nan=-np.inf) > self.predicted)
        step = self.cfg.gamma * (miss - self.tail)
        pick = known[..., None] & (np.arange(2) == self.regime[..., None])
        self.shift = np.clip(np.where(pick, self.shift + step[..., None], self.shift),
                             -self.cfg.max_shift, self.cfg.max_shift)

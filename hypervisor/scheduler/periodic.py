"""The minute-scale path: find a repeating load in the tick series and say when it comes back.

The Transformer forecaster works on 5-minute steps, so a spike that repeats every
tens of seconds (a timer, a batch loop) is inside one of its steps. Here the last
few hundred ticks of one guest are read for a period (the autocorrelation's first
strong peak); when there is one, the forecast for the next ticks is the upper
envelope of what happened one, two and three periods earlier, widened by a tick
either side so that timer jitter does not make the guest late.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Periodicity:
    period_ticks: int
    strength: float  # autocorrelation at the period, 0..1
    period: float = 0.0  # refined between ticks (a parabola through the peak), so that three
    #                      cycles back do not add up a rounding error of a tick each


def resample(times: np.ndarray, values: np.ndarray, tick_s: float) -> np.ndarray:
    """Values on a regular grid of `tick_s` ending at the last sample (linear in between)."""
    times = np.asarray(times, np.float64)
    values = np.asarray(values, np.float64)
    ok = np.isfinite(times) & np.isfinite(values)
    times, values = times[ok], values[ok]
    if len(times) < 2:
        return values
    n = int((times[-1] - times[0]) // tick_s) + 1
    grid = times[-1] - tick_s * np.arange(n)[::-1]
    return np.interp(grid, times, values)


def detect_period(x: np.ndarray, min_period: int = 3, min_strength: float = 0.5,
                  min_cycles: float = 2.0) -> Periodicity | None:
    """The shortest lag whose autocorrelation is a peak within 20% of the strongest one.

    Taking the shortest near-best lag (not the best) keeps 2x and 3x the true period
    from winning on noise. None when the series is flat, too short for `min_cycles`
    repeats, or no lag correlates at `min_strength`.
    """
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    max_period = int(n / min_cycles)
    if max_period < min_period + 1:
        return None
    d = x - x.mean()
    var = float((d * d).sum())
    if var <= 1e-12 * n:
        return None
    acf = np.array([float((d[:-k] * d[k:]).sum()) / var * n / (n - k) for k in range(1, max_period + 1)])
    lags = np.arange(1, max_period + 1)
    peak = np.zeros_like(acf, bool)
    peak[1:-1] = (acf[1:-1] >= acf[:-2]) & (acf[1:-1] >= acf[2:])
    peak[-1] = acf[-1] >= acf[-2]
    cand = peak & (lags >= min_period) & (acf >= min_strength)
    if not cand.any():
        return None
    best = acf[cand].max()
    k = int(lags[cand & (acf >= 0.8 * best)].min())
    refined = float(k)
    if 1 < k < max_period:
        a, b, c = acf[k - 2], acf[k - 1], acf[k]
        curve = a - 2 * b + c
        if curve < 0:
            refined = k + float(np.clip(0.5 * (a - c) / curve, -0.5, 0.5))
    return Periodicity(k, float(min(acf[k - 1], 1.0)), refined)


def seasonal_envelope(x: np.ndarray, period: float, horizon: int, cycles: int = 3, jitter: int = 1) -> np.ndarray:
    """(horizon,) upper envelope of the ticks one to `cycles` periods before each future tick."""
    x = np.asarray(x, np.float64)
    n = len(x)
    out = np.full(horizon, np.nan)
    for h in range(1, horizon + 1):
        seen = []
        for c in range(1, cycles + 1):
            centre = n - 1 + h - int(round(c * period))
            lo, hi = max(centre - jitter, 0), min(centre + jitter + 1, n)
            if lo < hi:
                seen.append(np.nanmax(x[lo:hi]) if np.isfinite(x[lo:hi]).any() else np.nan)
        if seen and np.isfinite(seen).any():
            out[h - 1] = np.nanmax(seen)
    return out

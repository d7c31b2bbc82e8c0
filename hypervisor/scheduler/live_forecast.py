"""Each tick's forecast for every guest: the Transformer on 5-minute steps, a periodic
path on the tick series, and the agent's lead signals, in the policy's units.

Three views, because demand moves at three speeds:
- the shipped Transformer (`models/forecaster`) reads a guest's last day as 5-minute
  means (the ticks aggregated here), batched over all guests in one call;
- the tick series is read for a repeating load (`periodic.py`); where there is one,
  its envelope says when the next burst comes, at tick resolution, and it replaces
  the 5-minute view (a 5-minute mean would hold a spiky guest high between bursts);
- the agent's intent: a systemd/cron job due within the horizon, or RLM jobs queued,
  lifts the coming ticks to the guest's recent peak before any CPU shows it.
Results are absolute (cores, MiB) `GuestForecast`s over `horizon_ticks`, with a note
of which view drove them, so each action can be logged with its cause.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from hypervisor.scheduler.periodic import detect_period, resample, seasonal_envelope
from hypervisor.scheduler.policy import GuestForecast
from hypervisor.telemetry.collectors import Sample
from hypervisor.virt.templates import GuestPolicy

STEP_S = 300.0  # the forecaster's step


@dataclass(frozen=True)
class LiveForecastConfig:
    tick_s: float = 5.0
    horizon_ticks: int = 6
    period_min_ticks: int = 3
    period_min_strength: float = 0.5
    recent_ticks: int = 3          # without a period: the last ticks' peak is the floor
    memory_margin: float = 0.25    # the balloon leaves this share of used memory free
    memory_margin_min_mib: float = 128.0
    intent_fresh_s: float = 90.0   # an intent report older than this is not used for lead


@dataclass(frozen=True)
class Explained:
    """Why a guest's forecast is what it is (logged with every action it causes)."""

    source: str                     # "periodic", "transformer", "intent", or joined with "+"
    period_s: float | None = None
    period_strength: float | None = None
    transformer_cpu: dict[str, float] = field(default_factory=dict)  # quantile -> cores, next step
    job_due_in_s: float | None = None
    memory_known: bool = True


@dataclass
class _Steps:
    """One guest's 5-minute means, built tick by tick (the current step still open)."""

    done: deque = field(default_factory=lambda: deque(maxlen=288))  # (slot, cpu_frac, mem_frac)
    slot: int | None = None
    cpu: list = field(default_factory=list)
    mem: list = field(default_factory=list)

    def add(self, at: float, cpu_frac: float, mem_frac: float) -> None:
        slot = int(at // STEP_S)
        if self.slot is not None and slot != self.slot and self.cpu:
            self.done.append((self.slot, _mean(self.cpu), _mean(self.mem)))
            self.cpu, self.mem = [], []
        self.slot = slot
        self.cpu.append(cpu_frac)
        self.mem.append(mem_frac)

    def series(self) -> tuple[np.ndarray, float]:
        """(L, 2) history up to and including the open step, and the next step's Unix time."""
        rows = [(s, c, m) for s, c, m in self.done]
        if self.cpu:
            rows.append((self.slot, _mean(self.cpu), _mean(self.mem)))
        if not rows:
            return np.full((1, 2), np.nan, np.float32), (time.time() // STEP_S + 1) * STEP_S
        first, last = rows[0][0], rows[-1][0]
        out = np.full((last - first + 1, 2), np.nan, np.float32)
        for s, c, m in rows:
            out[s - first] = (c, m)
        return out, (last + 1) * STEP_S


def _mean(xs: list) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _one_thread(fn, *args):
    """Run a small torch model on one intra-op thread: ~1 ms for a batch of guests, where
    torch's default pool costs 0.3-0.9 s per call on a busy 2-core host (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def used_mib(s: Sample) -> float | None:
    if s.balloon_mib is None or s.usable_mib is None:
        return None
    return max(0.0, s.balloon_mib - s.usable_mib)


class LiveForecaster:
    """Keeps each guest's 5-minute steps; `forecast` runs one batched model call per tick."""

    def __init__(self, model, cfg: LiveForecastConfig = LiveForecastConfig()) -> None:
        self.model = model  # models.forecaster.Forecaster, or None (periodic and intent paths only)
        self.cfg = cfg
        self._steps: dict[str, _Steps] = {}

    def observe(self, s: Sample, bounds: GuestPolicy) -> None:
        mem = used_mib(s)
        self._steps.setdefault(s.guest, _Steps()).add(
            s.at, s.cpu_used / max(bounds.max_vcpus, 1),
            mem / bounds.max_memory_mib if mem is not None else float("nan"))

    def forget(self, guest: str) -> None:
        self._steps.pop(guest, None)

    def forecast(self, histories: dict[str, list[Sample]], bounds: dict[str, GuestPolicy],
                 demand: dict[str, np.ndarray] | None = None, intent_at: dict[str, float] | None = None,
                 now: float | None = None) -> dict[str, tuple[GuestForecast, Explained]]:
        """Forecasts for the guests in `histories` (each non-empty, oldest first).

        `demand[name]`, when given, is the CPU demand (cores) per sample in place of
        `cpu_used`: the loop passes the guest's capacity for ticks where it was held at its
        allocation, since a capped guest's use says only that it wanted at least that.
        """
        now = time.time() if now is None else now
        names = [n for n in histories if histories[n]]
        if not names:
            return {}
        cfg = self.cfg
        quantiles, coarse = self._transformer(names, bounds)
        out = {}
        for i, name in enumerate(names):
            hist, b = histories[name], bounds[name]
            cpu_cap, mem_cap = float(b.max_vcpus), float(b.max_memory_mib)
            t_cpu = coarse[i, 0] * cpu_cap  # (Q,) cores, the next 5-minute step
            t_mem = coarse[i, 1] * mem_cap
            times = np.array([s.at for s in hist])
            cores = np.asarray((demand or {}).get(name, [s.cpu_used for s in hist]), np.float64)
            grid = resample(times, cores, cfg.tick_s)
            per = detect_period(grid, cfg.period_min_ticks, cfg.period_min_strength)
            sources = []
            if per is not None:
                fine = seasonal_envelope(grid, per.period or per.period_ticks, cfg.horizon_ticks)
                fine = np.where(np.isfinite(fine), fine, grid[-1])
                cpu = np.repeat(fine[:, None], len(quantiles), axis=1)
                sources.append("periodic")
            else:
                recent = float(np.max(cores[-cfg.recent_ticks:]))
                cpu = np.fmax(np.broadcast_to(t_cpu, (cfg.horizon_ticks, len(quantiles))), recent)
                sources.append("transformer" if self.model is not None else "recent")
            due = self._job_due_in(hist[-1], (intent_at or {}).get(name), now)
            pending = hist[-1].intent.pending_rlm_jobs or 0
            if due is not None or pending > 0:
                peak = float(np.max(cores))
                first = 0 if due is None else max(int(due // cfg.tick_s) - 1, 0)
                if first < cfg.horizon_ticks:
                    cpu[first:] = np.maximum(cpu[first:], peak)
                    sources.append("intent")
            cpu = np.clip(cpu, 0.0, cpu_cap)

            mem_now = [m for s in hist[-cfg.recent_ticks:] if (m := used_mib(s)) is not None]
            known = bool(mem_now)
            if known:
                need = np.maximum(np.nan_to_num(t_mem, nan=0.0), max(mem_now))
                need = need + np.maximum(need * cfg.memory_margin, cfg.memory_margin_min_mib)
                mem = np.broadcast_to(np.minimum(need, mem_cap), (cfg.horizon_ticks, len(quantiles))).copy()
            else:
                mem = np.full((cfg.horizon_ticks, len(quantiles)), np.nan)
            explained = Explained(
                "+".join(sources),
                round((per.period or per.period_ticks) * cfg.tick_s, 2) if per else None,
                per.strength if per else None,
                {f"p{round(q * 100, 1):g}": round(float(v), 4) for q, v in zip(quantiles, t_cpu)},
                due, known)
            out[name] = (GuestForecast(tuple(quantiles), cpu, mem), explained)
        return out

    def _transformer(self, names: list[str], bounds: dict[str, GuestPolicy]) -> tuple[tuple[float, ...], np.ndarray]:
        """(quantiles, (n, 2, Q)) for the next 5-minute step of each guest, one batch."""
        if self.model is None:
            qs = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995)
            return qs, np.full((len(names), 2, len(qs)), np.nan)
        series = [self._steps.get(n, _Steps()).series() for n in names]
        length = max(len(s) for s, _ in series)
        hist = np.full((len(names), length, 2), np.nan, np.float32)
        for i, (s, _) in enumerate(series):
            hist[i, length - len(s):] = s
        f = _one_thread(self.model.predict, hist, np.array([t for _, t in series]))
        return tuple(f.quantiles), f.values[:, 0]  # (n, 2, Q)

    def _job_due_in(self, last: Sample, intent_at: float | None, now: float) -> float | None:
        """Seconds until the guest's next timer, counted down from when the agent said it."""
        due = last.intent.jobs_due_s
        if due is None or due <= 0 or intent_at is None or now - intent_at > self.cfg.intent_fresh_s:
            return None  # unknown, stale, or 0 (the agent's countdown ran out: already fired)
        left = due - (now - intent_at)
        return left if 0 <= left <= self.cfg.horizon_ticks * self.cfg.tick_s else None

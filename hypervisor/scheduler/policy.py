"""From demand forecasts to per-guest allocations: headroom, hysteresis, bounds, host share.

The policy looks ahead: each tick a guest's target is the upper quantile of its forecast
for the coming tick(s), times 1 + headroom. A guest below its target is raised at once,
before the demand arrives; a guest above it is lowered only when the target is clearly
below (a hysteresis band) and the allocation has been held for `hold_ticks`, so
allocations do not flap. Then per-guest bounds (GuestPolicy, from the domain metadata)
and the host's total (with its overcommit ratio) apply; when the host is short, guests
of higher priority are served first.

Two layers, both pure:
- `target` and `hysteresis` work on arrays (one element per guest, or knob x guest in
  the benchmark replay), in any unit;
- `decide` is what the live loop calls each tick with per-guest inputs and the state it
  got back last tick; it returns planned actions (vCPUs, CPU quota, balloon MiB), each
  with the forecast that caused it, and the next state. No libvirt here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hypervisor.virt.templates import GuestPolicy


@dataclass(frozen=True)
class PolicyConfig:
    """Defaults chosen on the validation VMs (models/forecaster/MODEL_CARD.md)."""

    cpu_quantile: float = 0.98  # the forecast quantile targets follow, per resource: a
    memory_quantile: float = 0.99  # memory shortfall (swap, OOM) costs more than CPU steal
    headroom: float = 0.0  # target = that quantile x (1 + headroom); the safety knob
    lead_ticks: int = 1  # the target covers the next `lead_ticks` (actuation delay)
    hold_ticks: int = 3  # an allocation is kept at least this many ticks before lowering
    lower_band: float = 0.2  # lower only when the target is this far below the allocation
    cpu_period_us: int = 100_000
    min_cpu_share: float = 1.0  # CPU may go down to this share of min_vcpus cores (by quota); 1: whole vCPUs


@dataclass(frozen=True)
class HostCapacity:
    cpus: float
    memory_mib: float
    cpu_overcommit: float = 1.0  # sum of guest cores may reach cpus x this
    memory_overcommit: float = 1.0

    @property
    def cpu_budget(self) -> float:
        return self.cpus * self.cpu_overcommit

    @property
    def memory_budget_mib(self) -> float:
        return self.memory_mib * self.memory_overcommit


@dataclass(frozen=True)
class GuestForecast:
    """One guest's forecast demand for the next H ticks, in absolute units."""

    quantiles: tuple[float, ...]
    cpu_cores: np.ndarray  # (H, Q): cores busy (vCPU-seconds per second)
    memory_mib: np.ndarray  # (H, Q)

    @classmethod
    def from_fractions(cls, quantiles: Sequence[float], values: np.ndarray, cpu_capacity_cores: float,
                       memory_capacity_mib: float) -> GuestForecast:
        """From the forecaster's (H, 2, Q) fractions of the guest's provisioned capacity."""
        values = np.asarray(values, np.float64)
        return cls(tuple(quantiles), values[:, 0] * cpu_capacity_cores, values[:, 1] * memory_capacity_mib)

    def at(self, quantile: float) -> tuple[np.ndarray, np.ndarray]:
        """(cpu, memory) paths of one forecast quantile, (H,) each."""
        if quantile not in self.quantiles:
            raise ValueError(f"quantile {quantile} not forecast (have {self.quantiles})")
        i = self.quantiles.index(quantile)
        return self.cpu_cores[:, i], self.memory_mib[:, i]


@dataclass(frozen=True)
class Allocation:
    vcpus: int
    cpu_quota_us: int  # per vCPU per `cpu_period_us` (libvirt schedinfo vcpu_quota)
    cpu_period_us: int
    memory_mib: int  # balloon target

    @property
    def cpu_cores(self) -> float:
        return self.vcpus * self.cpu_quota_us / self.cpu_period_us


@dataclass(frozen=True)
class GuestState:
    """What the policy remembers of a guest between ticks (continuous targets)."""

    cpu_cores: float
    memory_mib: float
    cpu_held: int = 0
    memory_held: int = 0


@dataclass(frozen=True)
class GuestInput:
    name: str
    bounds: GuestPolicy
    forecast: GuestForecast
    state: GuestState | None = None  # None: a guest seen for the first time (starts at its max)


@dataclass(frozen=True)
class PlannedAction:
    guest: str
    previous: Allocation | None
    target: Allocation
    forecast: GuestForecast
    reasons: tuple[str, ...]  # e.g. ("cpu raise", "memory hold", "host short: cpu")

    @property
    def changed(self) -> bool:
        return self.previous != self.target


@dataclass(frozen=True)
class Decision:
    actions: list[PlannedAction]
    states: dict[str, GuestState] = field(default_factory=dict)


# ---- array layer -----------------------------------------------------------------------


def target(upper: np.ndarray, headroom: float | np.ndarray, cfg: PolicyConfig) -> np.ndarray:
    """The target from a forecast quantile's path (..., H): its peak over the lead, plus headroom.

    Only the next `lead_ticks` count: the policy decides again every tick, so covering
    further ahead would only hold more than the coming ticks need.
    """
    upper = np.asarray(upper, np.float64)
    return upper[..., :max(cfg.lead_ticks, 1)].max(axis=-1) * (1.0 + np.asarray(headroom, np.float64))


def at_level(values: np.ndarray, quantiles: Sequence[float], level: float | np.ndarray) -> np.ndarray:
    """A forecast's value at any upper quantile level, from its (..., Q) quantile values.

    Linear in log(1 - level) between the forecast's own levels (a demand tail decays
    roughly exponentially), and past the highest one along its last segment, so the
    policy's knob can ask for a rarer miss (p99.8) or a commoner one (p97) than the
    forecaster was trained for. Levels below the lowest give the lowest. `level`
    broadcasts against `values[..., 0]`.
    """
    values = np.asarray(values, np.float64)
    tail = np.log1p(-np.asarray(quantiles, np.float64))  # decreasing
    x = np.log1p(-np.asarray(level, np.float64))
    shape = np.broadcast_shapes(values.shape[:-1], x.shape)
    x = np.broadcast_to(x, shape)
    v = np.broadcast_to(values, shape + values.shape[-1:])
    j = np.clip(np.searchsorted(-tail, -x), 1, len(tail) - 1)
    lo = np.take_along_axis(v, (j - 1)[..., None], -1)[..., 0]
    hi = np.take_along_axis(v, j[..., None], -1)[..., 0]
    w = np.maximum((x - tail[j - 1]) / (tail[j] - tail[j - 1]), 0.0)
    return lo + w * (hi - lo)


def hysteresis(alloc: np.ndarray, held: np.ndarray, goal: np.ndarray, cfg: PolicyConfig
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One tick of the raise-now / lower-after-hold rule; returns (alloc, held, changed).

    `held` counts the ticks the current allocation has been given, so a change is
    followed by at least `hold_ticks` ticks at the new value before a lowering. NaN
    targets hold.
    """
    up = goal > alloc
    down = (goal < alloc * (1.0 - cfg.lower_band)) & (held >= cfg.hold_ticks) & ~up
    changed = up | down
    return np.where(changed, goal, alloc), np.where(changed, 1, held + 1), changed


# ---- per-guest layer (the live loop) ---------------------------------------------------


def _share(want: np.ndarray, floor: np.ndarray, priority: np.ndarray, budget: float) -> tuple[np.ndarray, bool]:
    """Fit wants into a budget: every guest keeps its floor, then priority order decides.

    Guests of a higher priority get all they want before a lower one gets more than
    its floor; guests of equal priority are scaled in proportion to what they ask above
    their floor. Floors are never cut, even when they alone exceed the budget.
    """
    want = np.maximum(want, floor)
    if want.sum() <= budget:
        return want, False
    out = floor.astype(np.float64).copy()
    left = max(budget - floor.sum(), 0.0)
    for p in sorted(set(priority.tolist()), reverse=True):
        group = priority == p
        extra = (want - floor)[group]
        if extra.sum() <= left:
            out[group] += extra
            left -= extra.sum()
        else:
            out[group] += extra * (left / extra.sum()) if extra.sum() > 0 else 0.0
            left = 0.0
    return out, True


def to_allocation(cores: float, memory_mib: float, bounds: GuestPolicy, period_us: int) -> Allocation:
    """Cores -> whole vCPUs plus a per-vCPU quota; memory -> balloon MiB; within bounds."""
    cores = min(max(cores, 0.0), float(bounds.max_vcpus))
    vcpus = min(max(math.ceil(cores - 1e-9), bounds.min_vcpus, 1), bounds.max_vcpus)
    quota = int(round(period_us * max(cores, 0.01 * vcpus) / vcpus))
    quota = min(max(quota, 1000), period_us)  # libvirt's minimum quota is 1 ms
    memory = int(round(min(max(memory_mib, bounds.min_memory_mib), bounds.max_memory_mib)))
    return Allocation(vcpus, quota, period_us, memory)


def decide(guests: Sequence[GuestInput], host: HostCapacity, cfg: PolicyConfig = PolicyConfig()) -> Decision:
    """One tick for all guests: forecasts and last states in, planned actions and states out."""
    if not guests:
        return Decision([], {})
    n = len(guests)
    lo = np.array([[g.bounds.min_vcpus * cfg.min_cpu_share, g.bounds.min_memory_mib] for g in guests], np.float64)
    hi = np.array([[g.bounds.max_vcpus, g.bounds.max_memory_mib] for g in guests], np.float64)
    prev = np.array([[g.state.cpu_cores, g.state.memory_mib] if g.state else hi[i] for i, g in enumerate(guests)])
    held = np.array([[g.state.cpu_held, g.state.memory_held] if g.state else [0, 0] for g in guests], np.int64)
    uppers = np.stack([np.stack([g.forecast.at(cfg.cpu_quantile)[0], g.forecast.at(cfg.memory_quantile)[1]],
                                axis=-1) for g in guests])  # (n, H, 2)

    goal = np.clip(target(np.moveaxis(uppers, 1, -1), cfg.headroom, cfg), lo, hi)  # (n, 2)
    alloc, held, changed = hysteresis(prev, held, goal, cfg)
    alloc = np.clip(alloc, lo, hi)

    priority = np.array([g.bounds.priority for g in guests])
    short = [False, False]
    for r, budget in enumerate((host.cpu_budget, host.memory_budget_mib)):
        shared, short[r] = _share(alloc[:, r], lo[:, r], priority, budget)
        cut = shared < alloc[:, r] - 1e-9
        held[cut, r] = 0
        alloc[:, r] = shared

    actions, states = [], {}
    for i, g in enumerate(guests):
        reasons = []
        for r, what in enumerate(("cpu", "memory")):
            if changed[i, r]:
                reasons.append(f"{what} {'raise' if alloc[i, r] > prev[i, r] else 'lower'}")
            else:
                reasons.append(f"{what} hold")
            if short[r] and alloc[i, r] < goal[i, r] - 1e-9:
                reasons.append(f"host short: {what}")
        planned = to_allocation(alloc[i, 0], alloc[i, 1], g.bounds, cfg.cpu_period_us)
        before = (to_allocation(g.state.cpu_cores, g.state.memory_mib, g.bounds, cfg.cpu_period_us)
                  if g.state else None)
        actions.append(PlannedAction(g.name, before, planned, g.forecast, tuple(reasons)))
        states[g.name] = GuestState(float(alloc[i, 0]), float(alloc[i, 1]), int(held[i, 0]), int(held[i, 1]))
    return Decision(actions, states)

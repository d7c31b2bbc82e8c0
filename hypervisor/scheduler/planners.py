"""What the loop asks each tick for targets: the forecast policy, or a baseline run the same way.

Both take the same inputs (bounds, forecast, what is in effect, what was used) and
return the policy's `PlannedAction`s, so the loop, its actuators and its action log
are shared, and a comparison between them differs only in how targets are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, Sequence

import numpy as np

from hypervisor.scheduler.baselines import ReactiveThreshold
from hypervisor.scheduler.calibration import CalibrationConfig, TailCalibrator
from hypervisor.scheduler.policy import (
    Allocation, GuestForecast, GuestInput, GuestState, HostCapacity, PlannedAction, PolicyConfig, at_level, decide,
    to_allocation,
)
from hypervisor.virt.templates import GuestPolicy


@dataclass(frozen=True)
class PlanInput:
    name: str
    bounds: GuestPolicy
    forecast: GuestForecast
    current: Allocation
    used_cores: float


class Planner(Protocol):
    name: ClassVar[str]

    def plan(self, inputs: Sequence[PlanInput], host: HostCapacity) -> list[PlannedAction]: ...

    def forget(self, guest: str) -> None: ...


LIVE_POLICY = PolicyConfig(headroom=0.25, lead_ticks=3, min_cpu_share=0.1)
"""The live loop's policy: cover three ticks ahead (a burst shows in the tick series a tick
after it starts, one tick to act, one of jitter), keep 25%
above the forecast (a per-tick forecast is noisier than the 5-minute one the defaults were
chosen on, and a guest held at its cap hides its demand), and let the CPU quota go down to a
tenth of the guest's minimum vCPUs while it is idle."""


class ForecastPlanner:
    """`policy.decide` on the live forecast; a new guest starts from what it has now.

    With `calibration` (the default, as in the benchmark), each guest's CPU quantile is
    first moved to the level its own recent misses call for (`calibration.TailCalibrator`).
    """

    name = "neuraos"

    def __init__(self, cfg: PolicyConfig = LIVE_POLICY,
                 calibration: CalibrationConfig | None = CalibrationConfig()) -> None:
        self.cfg = cfg
        self.calibration = calibration
        self.states: dict[str, GuestState] = {}
        self.calibrators: dict[str, TailCalibrator] = {}

    def _calibrated(self, i: PlanInput) -> PlanInput:
        """The input with its CPU forecast at this guest's calibrated level in place of the policy's quantile."""
        cal = self.calibrators.get(i.name)
        if cal is None:
            cal = self.calibrators[i.name] = TailCalibrator(np.array(1.0 - self.cfg.cpu_quantile), self.calibration)
        cal.observe(np.array(i.used_cores))
        level = cal.levels(np.array(i.used_cores / max(i.bounds.max_vcpus, 1)))
        path = at_level(i.forecast.cpu_cores, i.forecast.quantiles, level)  # (H,)
        cal.forecast_was(path[0])
        cpu = np.array(i.forecast.cpu_cores, np.float64)
        cpu[:, i.forecast.quantiles.index(self.cfg.cpu_quantile)] = path
        return replace(i, forecast=replace(i.forecast, cpu_cores=cpu))

    def plan(self, inputs: Sequence[PlanInput], host: HostCapacity) -> list[PlannedAction]:
        if self.calibration is not None:
            inputs = [self._calibrated(i) for i in inputs]
        guests = [GuestInput(i.name, i.bounds, i.forecast,
                             self.states.get(i.name) or GuestState(i.current.cpu_cores, i.current.memory_mib))
                  for i in inputs]
        d = decide(guests, host, self.cfg)
        self.states.update(d.states)
        return d.actions

    def forget(self, guest: str) -> None:
        self.states.pop(guest, None)
        self.calibrators.pop(guest, None)


class ReactivePlanner:
    """oVirt MoM-style threshold rules (`baselines.ReactiveThreshold`) on the last tick's use.

    CPU only, as MoM's CPU rules: memory stays where it is.
    """

    name = "reactive"

    def __init__(self, knob: float | None = None, period_us: int = 100_000, floor_cores: float = 0.1) -> None:
        self.knob = knob
        self.period_us = period_us
        self.floor_cores = floor_cores  # the same floor the forecast path gets from the loop
        self.rules: dict[str, ReactiveThreshold] = {}

    def plan(self, inputs: Sequence[PlanInput], host: HostCapacity) -> list[PlannedAction]:
        actions = []
        for i in inputs:
            rule = self.rules.get(i.name)
            if rule is None:
                rule = self.rules[i.name] = ReactiveThreshold(1, self.knob, capacity=float(i.bounds.max_vcpus))
                rule.alloc[:] = i.current.cpu_cores
            cores = max(float(rule.allocate(np.array([i.used_cores]))[0]), self.floor_cores)
            target = to_allocation(cores, i.current.memory_mib, i.bounds, self.period_us)
            why = "cpu raise" if target.cpu_cores > i.current.cpu_cores else (
                "cpu lower" if target.cpu_cores < i.current.cpu_cores else "cpu hold")
            actions.append(PlannedAction(i.name, i.current, target, i.forecast, (why, "reactive")))
        return actions

    def forget(self, guest: str) -> None:
        self.rules.pop(guest, None)

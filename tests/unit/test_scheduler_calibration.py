"""The forecast tail at any quantile level, and the per-guest online calibration of that level."""

from __future__ import annotations

import numpy as np

from hypervisor.scheduler.calibration import CalibrationConfig, TailCalibrator
from hypervisor.scheduler.policy import at_level

QS = (0.5, 0.9, 0.98, 0.99)


def test_at_level_hits_the_forecast_levels_and_interpolates_in_log_tail():
    v = np.array([0.1, 0.2, 0.4, 0.5])
    for q, want in zip(QS, v):
        assert at_level(v, QS, q) == want
    # Halfway between p98 and p99 in log(1 - q) is 1 - sqrt(0.02 * 0.01).
    np.testing.assert_allclose(at_level(v, QS, 1 - np.sqrt(0.02 * 0.01)), 0.45)
    # Past the highest level it goes on along the last segment; below the lowest it holds.
    np.testing.assert_allclose(at_level(v, QS, 0.995), 0.6)
    assert at_level(v, QS, 0.2) == 0.1
    # Levels broadcast: a knob axis over guests.
    two = np.stack([v, 2 * v])
    assert at_level(two, QS, np.array([[0.98], [0.99]])).tolist() == [[0.4, 0.8], [0.5, 1.0]]


def replay(demand: np.ndarray, forecast: np.ndarray, cal: TailCalibrator) -> tuple[float, float]:
    """Miss rate of the calibrated p98 over the second half, and the final level."""
    misses, level = [], None
    last = np.array([np.nan])
    for d in demand:
        cal.observe(np.array([d]))
        level = cal.levels(last)
        value = at_level(forecast, QS, level)
        cal.forecast_was(value)
        misses.append(d > value[0])
        last = np.array([d])
    return float(np.mean(misses[len(misses) // 2:])), float(level[0])


def test_a_guest_that_misses_too_often_gets_a_higher_level_until_its_misses_fall():
    rng = np.random.default_rng(0)
    demand = rng.uniform(0.0, 1.0, 6000)  # busy throughout; the forecast says p98 = 0.8: 20% misses
    forecast = np.array([0.5, 0.7, 0.8, 0.85])
    rate, level = replay(demand, forecast, TailCalibrator(np.array([0.02])))
    assert level > 0.99
    assert rate < 0.08  # the bound of the shift (x20 at most) limits how far it can go


def test_a_guest_that_never_misses_is_lowered_and_idle_and_busy_adapt_apart():
    cal = TailCalibrator(np.array([0.02, 0.02]), CalibrationConfig(gamma=0.5))
    forecast = np.array([[0.1, 0.2, 0.4, 0.5], [0.1, 0.2, 0.4, 0.5]])
    busy = np.array([0.3, 0.005])  # guest 0 busy, guest 1 at rest
    for _ in range(200):
        cal.observe(np.array([0.3, 0.9]))  # guest 0 never misses; guest 1 always misses
        cal.forecast_was(at_level(forecast, QS, cal.levels(busy)))
    up = cal.levels(busy)
    assert up[0] < 0.98 < up[1]
    # Guest 1's busy regime never saw a tick, so it is still at the plain p98.
    assert cal.levels(np.array([0.3, 0.3]))[1] == 0.98


def test_unknown_demand_or_forecast_moves_nothing():
    cal = TailCalibrator(np.array([0.02]))
    cal.observe(np.array([0.5]))  # no forecast yet
    cal.levels(np.array([np.nan]))
    cal.forecast_was(np.array([np.nan]))
    cal.observe(np.array([0.9]))
    cal.forecast_was(np.array([0.1]))
    cal.observe(np.array([np.nan]))
    assert cal.levels(np.array([np.nan]))[0] == 0.98


def test_the_live_planner_raises_a_guest_whose_forecast_keeps_missing():
    from hypervisor.scheduler.planners import ForecastPlanner, PlanInput
    from hypervisor.scheduler.policy import Allocation, GuestForecast, HostCapacity
    from hypervisor.virt.templates import GuestPolicy

    bounds = GuestPolicy(min_vcpus=1, max_vcpus=4, min_memory_mib=512, max_memory_mib=2048)
    qs = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995)
    cpu = np.tile([0.5, 0.8, 1.0, 1.2, 1.5, 1.8], (3, 1))  # cores; p98 = 1.2
    forecast = GuestForecast(qs, cpu, np.full((3, len(qs)), 1024.0))
    start = Allocation(4, 100_000, 100_000, 2048)
    host = HostCapacity(16, 65536)
    targets = {}
    for name, planner in (("calibrated", ForecastPlanner()), ("plain", ForecastPlanner(calibration=None))):
        for _ in range(40):  # the guest uses 1.6 cores every tick: above the p98 each time
            action = planner.plan([PlanInput("g", bounds, forecast, start, 1.6)], host)[0]
        targets[name] = action.target.cpu_cores
    assert targets["plain"] < targets["calibrated"]
    assert targets["calibrated"] >= 1.6 * 1.25 - 1e-6  # the live headroom on top of a level past p99.5

"""The scheduler's policy (headroom, hysteresis, hold, bounds, host share) and its baselines."""

from __future__ import annotations

import numpy as np
import pytest

from hypervisor.scheduler.baselines import (BASELINES, Ewma, LastValue, MovingWindowMax, ReactiveThreshold,
                                            StaticPeak, WindowPercentile)
from hypervisor.scheduler.policy import (GuestForecast, GuestInput, GuestState, HostCapacity, PolicyConfig, decide,
                                         hysteresis, target, to_allocation)
from hypervisor.virt.templates import GuestPolicy

QS = (0.5, 0.9, 0.98, 0.99)


def flat(cpu: float, mem: float, horizon: int = 6) -> GuestForecast:
    """A forecast whose every quantile is the given level (upper = that level)."""
    return GuestForecast(QS, np.full((horizon, len(QS)), cpu), np.full((horizon, len(QS)), mem))


def path(cpu: list[float], mem: float = 512.0) -> GuestForecast:
    c = np.repeat(np.asarray(cpu, float)[:, None], len(QS), 1)
    return GuestForecast(QS, c, np.full_like(c, mem))


BIG_HOST = HostCapacity(cpus=64, memory_mib=65536)
WIDE = GuestPolicy(min_vcpus=1, max_vcpus=8, min_memory_mib=256, max_memory_mib=8192)


# ---- array layer -----------------------------------------------------------------------------


def test_target_is_the_upper_quantile_over_the_lead_plus_headroom():
    upper = np.array([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(target(upper, 0.25, PolicyConfig(lead_ticks=1)), [1.25, 5.0])
    np.testing.assert_allclose(target(upper, 0.25, PolicyConfig(lead_ticks=3)), [3.75, 5.0])
    # The headroom broadcasts as a knob axis over the guests (the benchmark's sweep).
    assert target(upper, np.array([[0.0], [1.0]]), PolicyConfig()).shape == (2, 2)


def test_hysteresis_raises_at_once_and_lowers_only_after_hold_and_beyond_band():
    cfg = PolicyConfig(hold_ticks=3, lower_band=0.2)
    alloc, held = np.array([1.0]), np.array([0])
    alloc, held, changed = hysteresis(alloc, held, np.array([2.0]), cfg)
    assert alloc[0] == 2.0 and changed[0] and held[0] == 1
    for _ in range(2):  # the demand drops, but the allocation has not been held 3 ticks yet
        alloc, held, changed = hysteresis(alloc, held, np.array([0.5]), cfg)
        assert alloc[0] == 2.0 and not changed[0]
    alloc, held, changed = hysteresis(alloc, held, np.array([0.5]), cfg)
    assert alloc[0] == 0.5 and changed[0]
    # Inside the band (less than 20% below): hold, however long.
    for _ in range(10):
        alloc, held, changed = hysteresis(alloc, held, np.array([0.45]), cfg)
        assert alloc[0] == 0.5 and not changed[0]
    # A rise is never held back.
    alloc, held, changed = hysteresis(alloc, held, np.array([0.51]), cfg)
    assert alloc[0] == 0.51 and changed[0]


def test_hysteresis_does_not_flap_on_an_oscillating_forecast():
    def changes(hold: int) -> int:
        cfg = PolicyConfig(hold_ticks=hold, lower_band=0.1)
        alloc, held, n = np.array([1.0]), np.array([0]), 0
        for t in range(60):
            alloc, held, changed = hysteresis(alloc, held, np.array([4.0 if t % 2 else 1.0]), cfg)
            n += int(changed[0])
        return n

    assert changes(1) >= 58  # a one-tick hold follows every wiggle
    assert changes(6) <= 2 * (60 // 6) + 1  # at most one lowering per hold window


def test_nan_targets_hold():
    alloc, held, changed = hysteresis(np.array([2.0]), np.array([10]), np.array([np.nan]), PolicyConfig())
    assert alloc[0] == 2.0 and not changed[0]


# ---- per-guest layer ---------------------------------------------------------------------------


def test_allocation_converts_cores_to_vcpus_and_quota_within_bounds():
    a = to_allocation(2.5, 1000.4, WIDE, 100_000)
    assert (a.vcpus, a.cpu_quota_us, a.memory_mib) == (3, 83_333, 1000)
    assert a.cpu_cores == pytest.approx(2.5, rel=1e-4)
    tight = GuestPolicy(min_vcpus=2, max_vcpus=4, min_memory_mib=512, max_memory_mib=1024)
    assert to_allocation(0.1, 10.0, tight, 100_000).vcpus == 2
    assert to_allocation(0.1, 10.0, tight, 100_000).memory_mib == 512
    high = to_allocation(40.0, 1e9, tight, 100_000)
    assert (high.vcpus, high.cpu_quota_us, high.memory_mib) == (4, 100_000, 1024)


def test_decide_applies_headroom_and_bounds_and_keeps_the_forecast():
    cfg = PolicyConfig(headroom=0.2)
    fc = flat(2.0, 1000.0)
    d = decide([GuestInput("a", WIDE, fc, GuestState(1.0, 500.0))], BIG_HOST, cfg)
    (act,) = d.actions
    assert act.forecast is fc
    assert act.target.cpu_cores == pytest.approx(2.4, rel=1e-3)
    assert act.target.memory_mib == 1200
    assert act.changed and "cpu raise" in act.reasons and "memory raise" in act.reasons
    assert d.states["a"].cpu_cores == pytest.approx(2.4)
    # Beyond the guest's bounds: clipped to max_vcpus / max_memory_mib.
    d = decide([GuestInput("a", WIDE, flat(50.0, 1e6))], BIG_HOST, cfg)
    assert d.actions[0].target.vcpus == WIDE.max_vcpus
    assert d.actions[0].target.memory_mib == WIDE.max_memory_mib


def test_decide_holds_then_lowers_across_ticks_with_returned_state():
    cfg = PolicyConfig(hold_ticks=3, lower_band=0.1)
    state = GuestState(4.0, 4096.0, cpu_held=0, memory_held=0)
    targets = []
    for _ in range(4):
        d = decide([GuestInput("a", WIDE, flat(1.0, 1024.0), state)], BIG_HOST, cfg)
        state = d.states["a"]
        targets.append(d.actions[0].target.vcpus)
    assert targets == [4, 4, 4, 1]
    assert "cpu lower" in d.actions[0].reasons


def test_a_new_guest_starts_at_its_maximum_and_is_lowered_only_after_hold():
    d = decide([GuestInput("new", WIDE, flat(1.0, 300.0))], BIG_HOST, PolicyConfig(hold_ticks=2))
    assert d.actions[0].previous is None
    assert d.actions[0].target.vcpus == WIDE.max_vcpus


def test_host_total_with_overcommit_is_never_exceeded():
    host = HostCapacity(cpus=4, memory_mib=4096, cpu_overcommit=1.5, memory_overcommit=1.0)
    guests = [GuestInput(f"g{i}", WIDE, flat(4.0, 2048.0), GuestState(1.0, 512.0)) for i in range(3)]
    d = decide(guests, host, PolicyConfig())
    assert sum(d.states[g.name].cpu_cores for g in guests) == pytest.approx(6.0)
    assert sum(d.states[g.name].memory_mib for g in guests) == pytest.approx(4096.0)
    assert all("host short: cpu" in a.reasons for a in d.actions)
    # Equal priority: an equal share of what they asked above their floors.
    assert len({round(d.states[g.name].cpu_cores, 6) for g in guests}) == 1


def test_priority_decides_who_is_served_when_the_host_is_short():
    host = HostCapacity(cpus=6, memory_mib=65536)
    hi = GuestPolicy(min_vcpus=1, max_vcpus=8, min_memory_mib=256, max_memory_mib=8192, priority=10)
    lo = GuestPolicy(min_vcpus=1, max_vcpus=8, min_memory_mib=256, max_memory_mib=8192, priority=0)
    d = decide([GuestInput("low", lo, flat(4.0, 512.0), GuestState(1.0, 512.0)),
                GuestInput("high", hi, flat(4.0, 512.0), GuestState(1.0, 512.0))], host, PolicyConfig())
    assert d.states["high"].cpu_cores == pytest.approx(4.0)
    assert d.states["low"].cpu_cores == pytest.approx(2.0)
    assert "host short: cpu" in d.actions[0].reasons and "host short: cpu" not in d.actions[1].reasons


def test_floors_are_kept_even_when_they_alone_exceed_the_host():
    host = HostCapacity(cpus=2, memory_mib=65536)
    floor = GuestPolicy(min_vcpus=2, max_vcpus=4, min_memory_mib=256, max_memory_mib=1024)
    d = decide([GuestInput(n, floor, flat(4.0, 512.0), GuestState(2.0, 512.0)) for n in "ab"], host,
               PolicyConfig())
    assert all(a.target.vcpus == 2 for a in d.actions)


def test_decide_follows_the_configured_quantile():
    fc = GuestForecast((0.5, 0.9, 0.99), np.tile([1.0, 2.0, 3.0], (6, 1)), np.tile([100.0, 200.0, 300.0], (6, 1)))
    cfg = PolicyConfig(cpu_quantile=0.9, memory_quantile=0.99)
    d = decide([GuestInput("a", WIDE, fc, GuestState(0.5, 50.0))], BIG_HOST, cfg)
    assert d.states["a"].cpu_cores == pytest.approx(2.0) and d.states["a"].memory_mib == pytest.approx(300.0)
    with pytest.raises(ValueError, match="not forecast"):
        decide([GuestInput("a", WIDE, fc)], BIG_HOST, PolicyConfig(cpu_quantile=0.95))


def test_the_raise_comes_before_the_forecast_demand_with_a_lead():
    cfg = PolicyConfig(lead_ticks=2, hold_ticks=3)
    state = GuestState(1.0, 512.0, cpu_held=10, memory_held=10)
    d = decide([GuestInput("a", WIDE, path([1.0, 3.0, 1.0, 1.0, 1.0, 1.0]), state)], BIG_HOST, cfg)
    assert d.actions[0].target.vcpus == 3 and "cpu raise" in d.actions[0].reasons


# ---- baselines -----------------------------------------------------------------------------------


def feed(policy, values) -> np.ndarray:
    out = None
    for v in values:
        out = policy.allocate(np.atleast_1d(np.asarray(v, float)))
    return out


def test_last_value_and_ewma_follow_demand_times_their_knob():
    assert feed(LastValue(1, 1.5), [0.2, 0.4]) == pytest.approx([0.6])
    assert feed(LastValue(1, 1.5), [0.2, 0.4, np.nan]) == pytest.approx([0.6])  # unknown: keep the last
    assert feed(LastValue(1, 4.0), [0.5]) == pytest.approx([1.0])  # never above capacity
    e = Ewma(1, 1.0)
    feed(e, [0.0])
    # Half-life of 6 ticks: after a step to 1.0, halfway there in 6 ticks.
    assert feed(e, [1.0] * 6) == pytest.approx([0.5], abs=1e-9)


def test_static_peak_sizes_once_after_warmup_and_never_resizes():
    p = StaticPeak(1, 1.2, warmup_ticks=3)
    assert feed(p, [np.nan, 0.1]) == pytest.approx([1.0])  # still warming up: full capacity
    assert feed(p, [0.3, 0.2]) == pytest.approx([0.36])
    assert feed(p, [0.9, 0.0, 0.95]) == pytest.approx([0.36])


def test_window_max_forgets_peaks_older_than_its_window():
    p = MovingWindowMax(1, 1.0, window_ticks=3)
    assert feed(p, [0.8, 0.1, 0.2]) == pytest.approx([0.8])
    assert feed(p, [0.3]) == pytest.approx([0.3])


def test_vpa_percentile_is_the_p90_of_the_decaying_histogram_plus_margin():
    p = WindowPercentile(1)  # knob 1.15
    rng = np.random.default_rng(0)
    values = np.where(rng.random(2000) < 0.8, 0.1, 0.5)
    out = feed(p, values)
    assert out[0] == pytest.approx(0.5 * 1.15, rel=0.06)  # bucket edges are 5% apart
    p = WindowPercentile(1)
    out = feed(p, [0.2] * 500)
    assert out[0] == pytest.approx(0.2 * 1.15, rel=0.06)


def test_vpa_percentile_decays_and_drops_old_samples():
    class Short(WindowPercentile):
        window_ticks = 20
        half_life_ticks = 5

    p = Short(1, 1.0)
    out = feed(p, [0.8] * 10 + [0.1] * 9)
    # The older high samples still in the window weigh less than a quarter: P90 is high
    # only if more than 10% of the decayed weight sits there.
    assert out[0] == pytest.approx(0.8, rel=0.06)
    out = feed(p, [0.1] * 11)  # now every 0.8 sample is older than the window
    assert out[0] == pytest.approx(0.1, rel=0.06)


def test_reactive_grows_at_once_and_shrinks_in_steps_per_tick():
    p = ReactiveThreshold(1, 1.25)  # one guest, as the live VM test runs it
    assert p.allocate(np.array([0.4]))[0] == pytest.approx(0.9)  # from capacity it shrinks in 10% steps
    p = ReactiveThreshold(1, 1.25)
    p.alloc[:] = 0.2
    assert p.allocate(np.array([0.4]))[0] == pytest.approx(0.5)  # grow to demand + 25% at once
    assert p.allocate(np.array([0.38]))[0] == pytest.approx(0.5)  # inside the band: hold
    a1 = p.allocate(np.array([0.1]))[0]
    a2 = p.allocate(np.array([0.1]))[0]
    assert a1 == pytest.approx(0.45) and a2 == pytest.approx(0.405)  # 10% per tick
    for _ in range(40):
        a = p.allocate(np.array([0.1]))[0]
    assert 0.125 <= a <= 0.125 * 1.5  # stops once inside the band, never below the target


@pytest.mark.parametrize("cls", BASELINES)
def test_every_baseline_broadcasts_knobs_over_guests(cls):
    knobs = np.array([[1.0], [2.0]])
    p = cls(3, knobs)
    out = None
    for t in range(300):
        out = p.allocate(np.array([0.1, 0.2, 0.3]) * (1 + 0.1 * np.sin(t)))
    assert out.shape == (2, 3)
    assert np.all(out[1] >= out[0] - 1e-12) and np.all(out <= 1.0)

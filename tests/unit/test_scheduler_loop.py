"""The live scheduler: periodic path, forecast → plan lead, and the loop on a real libvirt driver.

The loop runs against libvirt's built-in test driver (test:///default: real domains,
real setVcpusFlags/setMemoryFlags, a real refusal of schedinfo), with the real
LibvirtCollector, action log and live-state file; the shipped forecaster weights are
loaded where a test needs the Transformer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hypervisor.errors import GuestNotFound, GuestVanished
from hypervisor.scheduler.action_log import ActionLog, ActionRecord, read_actions
from hypervisor.scheduler.actuators import Actuator, DomainsResizer
from hypervisor.scheduler.live_forecast import LiveForecastConfig, LiveForecaster
from hypervisor.scheduler.live_state import LoopNotRunning, read_live, write_live
from hypervisor.scheduler.loop import LoopConfig, Paths, SchedulerLoop
from hypervisor.scheduler.periodic import detect_period, resample, seasonal_envelope
from hypervisor.scheduler.planners import ForecastPlanner, PlanInput, ReactivePlanner
from hypervisor.scheduler.policy import Allocation, HostCapacity, PolicyConfig
from hypervisor.telemetry.collectors import Intent, LibvirtCollector, Sample
from hypervisor.virt.connection import Connection
from hypervisor.virt.templates import GuestPolicy

PERIOD, SPIKE = 12, 4  # ticks


def spiky(n: int, period: int = PERIOD, spike: int = SPIKE, phase: int = 0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) + phase
    return np.where(t % period < spike, 1.0, 0.1) + rng.normal(0, 0.02, n)


def sample(guest: str, at: float, cpu: float, vcpus: int = 1, balloon: float | None = 768.0) -> Sample:
    return Sample(guest=guest, at=at, interval_s=1.0, vcpus=vcpus, cpu_used=cpu, cpu_steal=0.0,
                  balloon_mib=balloon, max_memory_mib=1024.0, unused_mib=300.0, available_mib=500.0,
                  usable_mib=400.0 if balloon else None, swap_in_kibps=0, swap_out_kibps=0, major_faults_ps=0,
                  disk_rd_bps=0, disk_wr_bps=0, net_rx_bps=None, net_tx_bps=None, intent=Intent())


# ---- periodic path -------------------------------------------------------------------


def test_period_is_found_and_not_its_multiple():
    p = detect_period(spiky(60))
    assert p is not None and p.period_ticks == PERIOD and p.strength > 0.8


def test_no_period_in_noise_flat_or_short_series():
    rng = np.random.default_rng(1)
    assert detect_period(rng.normal(0.5, 0.1, 80)) is None
    assert detect_period(np.full(80, 0.3)) is None
    assert detect_period(spiky(PERIOD + 3)) is None  # under two cycles


def test_envelope_sees_the_next_spike_before_it_starts():
    x = spiky(5 * PERIOD - 2)  # the series ends two ticks before a spike
    env = seasonal_envelope(x, PERIOD, horizon=4)
    assert env[0] < 0.5 and env[2] > 0.9  # quiet next tick; the spike two ticks out (1 tick jitter)


def test_resample_puts_irregular_ticks_on_a_grid():
    times = np.array([0.0, 0.9, 2.2, 3.0, 4.1])
    grid = resample(times, times * 2, 1.0)
    assert len(grid) == 5 and math.isclose(grid[-1], 8.2)


# ---- forecast → plan: raise before the spike, reactive after --------------------------


def _first_raise(planner, series: np.ndarray, start: int, fc: LiveForecaster, bounds: GuestPolicy,
                 threshold: float = 0.8) -> int:
    """Feed ticks through forecaster and planner as the loop does (a guest held at its cap
    counts as wanting all it may have); the tick from which the allocation reaches `threshold`."""
    cur = Allocation(1, 30_000, 100_000, 768)
    hist: list[Sample] = []
    demand: list[float] = []
    for t, cpu in enumerate(series):
        used = min(cpu, cur.cpu_cores)
        held = cur.cpu_cores < bounds.max_vcpus and used >= 0.9 * cur.cpu_cores
        demand.append(min(float(bounds.max_vcpus), 2 * cur.cpu_cores) if held else used)
        s = sample("g", float(t), used)
        hist.append(s)
        fc.observe(s, bounds)
        f, _ = fc.forecast({"g": hist}, {"g": bounds}, {"g": np.array(demand)})["g"]
        f = replace(f, cpu_cores=np.maximum(f.cpu_cores, 0.1))
        action = planner.plan([PlanInput("g", bounds, f, cur, used)], HostCapacity(2, 4096))[0]
        cur = action.target
        if t >= start and cur.cpu_cores >= threshold:
            return t + 1  # the allocation is in effect from the next tick on
    return len(series)


def test_forecast_planner_raises_before_the_spike_and_reactive_after():
    bounds = GuestPolicy(min_vcpus=1, max_vcpus=1, min_memory_mib=768, max_memory_mib=768)
    series = spiky(6 * PERIOD)
    onset = 5 * PERIOD  # the sixth spike starts here; look for raises after the fifth ended
    start = 4 * PERIOD + SPIKE + 1
    cfg = LiveForecastConfig(tick_s=1.0, horizon_ticks=4)
    ours = _first_raise(ForecastPlanner(), series, start,
                        LiveForecaster(None, cfg), bounds)
    theirs = _first_raise(ReactivePlanner(), series, start, LiveForecaster(None, cfg), bounds)
    assert ours < onset <= theirs, (ours, onset, theirs)


def test_transformer_forecast_is_batched_over_guests_and_in_cores():
    from models.forecaster import Forecaster

    fc = LiveForecaster(Forecaster.load(), LiveForecastConfig(tick_s=5.0, horizon_ticks=3))
    bounds = {"a": GuestPolicy(max_vcpus=4, max_memory_mib=2048), "b": GuestPolicy(max_vcpus=2, max_memory_mib=1024)}
    rng = np.random.default_rng(2)
    hist = {"a": [], "b": []}
    for t in range(120):
        for name, level in (("a", 2.0), ("b", 0.2)):
            s = sample(name, 1_700_000_000 + 5.0 * t, level + rng.normal(0, 0.05))
            hist[name].append(s)
            fc.observe(s, bounds[name])
    out = fc.forecast(hist, bounds)
    fa, wa = out["a"]
    fb, _ = out["b"]
    assert fa.cpu_cores.shape == (3, 6) and wa.source == "transformer"
    assert fa.cpu_cores[0, -1] > 1.5 and fb.cpu_cores[0, -1] < 1.0  # each in its own scale
    assert 0 < wa.transformer_cpu["p98"] <= 4.0


def test_job_due_from_intent_lifts_the_coming_ticks():
    fc = LiveForecaster(None, LiveForecastConfig(tick_s=1.0, horizon_ticks=6))
    bounds = {"g": GuestPolicy(max_vcpus=2)}
    hist = [sample("g", float(t), 1.5 if t == 3 else 0.1) for t in range(30)]
    now = time.time()
    hist[-1] = replace(hist[-1], intent=Intent(jobs_due_s=4.0))
    f, why = fc.forecast({"g": hist}, bounds, intent_at={"g": now}, now=now)["g"]
    assert "intent" in why.source and why.job_due_in_s == pytest.approx(4.0)
    assert f.cpu_cores[0, -1] < 0.5 and f.cpu_cores[4, -1] == pytest.approx(1.5)
    stale, why = fc.forecast({"g": hist}, bounds, intent_at={"g": now - 600}, now=now)["g"]
    assert why.job_due_in_s is None and stale.cpu_cores.max() < 0.5


# ---- the loop on libvirt's test driver ------------------------------------------------

DOMAIN = """<domain type='test'><name>{name}</name><memory unit='MiB'>1024</memory>
<currentMemory unit='MiB'>768</currentMemory><vcpu current='1'>2</vcpu>
<os><type>hvm</type></os></domain>"""


@pytest.fixture
def conn():
    c = Connection("test:///default")  # one driver state per process: each test makes its own domains
    c.open()
    yield c
    c.close()


@pytest.fixture
def dom(conn, request):
    name = f"g-{request.node.name[-20:]}"
    conn.conn.createXML(DOMAIN.format(name=name), 0)
    yield name
    try:
        conn.conn.lookupByName(name).destroy()
    except Exception:
        pass


def ticks(loop: SchedulerLoop, n: int):
    rep = None
    for _ in range(n):
        rep = loop.tick()
        time.sleep(0.02)
    return rep


def make_loop(conn: Connection, tmp_path: Path, names: list[str], intents=None, collector=None,
              planner=None) -> SchedulerLoop:
    return SchedulerLoop(conn, Actuator(DomainsResizer(conn)), planner or ForecastPlanner(),
                         LiveForecaster(None, LiveForecastConfig(tick_s=0.1)), Paths(tmp_path / "sched"),
                         HostCapacity(4, 8192), guests=lambda: names,
                         intents=intents or (lambda _n: (None, None)), cfg=LoopConfig(tick_s=0.1),
                         collector=collector)  # the GPU guard asks this host's NVML


def test_loop_ticks_on_a_real_driver_skipping_memory_without_balloon_stats(conn, dom, tmp_path):
    loop = make_loop(conn, tmp_path, [dom])
    first = loop.tick()
    assert "primes" in first.skipped[dom]
    rep = ticks(loop, 5)  # the policy holds 3 ticks before it lowers
    assert "no balloon stats" in rep.skipped[dom]
    assert dom in rep.planned
    live = read_live(loop.paths.live)
    assert live["guests"][dom]["forecast"]["memory_known"] is False
    assert "GPU" in live["gpu"] or "NVIDIA" in live["gpu"] or "nvidia" in live["gpu"]
    acts = read_actions(loop.paths.actions, dom)
    assert acts, "an idle guest is lowered from its start allocation"
    # libvirt's test driver refuses schedinfo: logged as an error, vCPUs still applied
    assert any("quota" in e for a in acts for e in a.errors)
    assert all("memory" not in a.applied for a in acts)
    assert acts[-1].forecast["source"] == "recent"
    # what the planner acted on: the forecast at the guest's calibrated level, logged beside it
    assert len(acts[-1].forecast["cpu_planned_cores"]) == len(acts[-1].forecast["cpu_p98_cores"])


def test_guest_vanishing_mid_tick_is_skipped_and_others_go_on(conn, tmp_path):
    conn.conn.createXML(DOMAIN.format(name="ghost"), 0)

    class VanishAfterCollect(LibvirtCollector):
        destroy = False

        def collect(self, guests=None, intents=None):
            out = super().collect(guests, intents)
            if self.destroy:
                conn.conn.lookupByName("ghost").destroy()  # gone between stats and actuation
                self.destroy = False
            return out

    col = VanishAfterCollect(conn)
    loop = make_loop(conn, tmp_path, ["test", "ghost"], collector=col)
    loop.tick()
    time.sleep(0.05)
    col.destroy = True
    rep = loop.tick()
    assert "vanished" in rep.skipped["ghost"]
    assert "test" in rep.planned and "ghost" not in loop.current
    time.sleep(0.05)
    rep = loop.tick()  # the next tick does not trip over it either
    assert "test" in rep.planned and "vanished" in rep.skipped.get("ghost", "vanished")


def test_garbage_intent_is_skipped_with_a_reason(conn, tmp_path, caplog):
    conn.conn.createXML(DOMAIN.format(name="noisy"), 0)
    raw = {"test": ("garbage", time.time()),  # the driver's own domain
           "noisy": ({"run_queue": float("nan"), "jobs_due_s": "soon", "top_cpu_pct": 12.0}, time.time())}
    loop = make_loop(conn, tmp_path, ["test", "noisy"], intents=lambda n: raw[n])
    loop.tick()
    time.sleep(0.05)
    with caplog.at_level("WARNING"):
        rep = loop.tick()
    assert "not a mapping" in rep.skipped["test"]
    assert "dropped bad intent" in caplog.text and "run_queue=nan" in caplog.text
    assert {"test", "noisy"} <= set(rep.planned)
    conn.conn.lookupByName("noisy").destroy()


def test_actuator_applies_only_what_changed_and_reports_refusals(conn, dom):
    act = Actuator(DomainsResizer(conn))
    cur = Allocation(1, 100_000, 100_000, 768)
    res = act.apply(dom, cur, Allocation(2, 100_000, 100_000, 512))
    assert res.applied == ["vcpus", "memory"] and res.allocation == Allocation(2, 100_000, 100_000, 512)
    assert conn.conn.lookupByName(dom).info()[3] == 2
    res = act.apply(dom, res.allocation, Allocation(2, 40_000, 100_000, 512))
    assert res.applied == [] and res.errors and res.allocation.cpu_quota_us == 100_000
    with pytest.raises((GuestVanished, GuestNotFound)):
        act.apply("nobody", cur, Allocation(2, 100_000, 100_000, 768))


def test_action_log_round_trip_skips_a_torn_line(tmp_path):
    log = ActionLog(tmp_path / "a.jsonl")
    log.write(ActionRecord(1.0, "g", "neuraos", "resize", reasons=["cpu raise"], forecast={"source": "periodic"}))
    with (tmp_path / "a.jsonl").open("a") as f:
        f.write('{"at": 2.0, "gue')
    recs = read_actions(tmp_path / "a.jsonl")
    assert len(recs) == 1 and recs[0].forecast["source"] == "periodic"


def test_live_state_is_atomic_and_stale_state_says_the_loop_is_not_running(tmp_path):
    p = tmp_path / "live.json"
    with pytest.raises(LoopNotRunning):
        read_live(p)
    write_live(p, {"at": time.time(), "tick_s": 1.0, "guests": {}})
    assert read_live(p)["guests"] == {}
    write_live(p, {"at": time.time() - 600, "tick_s": 1.0, "guests": {}})
    with pytest.raises(LoopNotRunning, match="not running"):
        read_live(p)
    assert not list(tmp_path.glob(".live.json.*"))


def test_cli_top_and_forecast_read_the_running_loops_files(conn, dom, tmp_path, capsys):
    from hypervisor.config import Config
    from hypervisor.scheduler.cli import cmd_forecast, cmd_top

    cfg = Config(state_dir=tmp_path)
    loop = make_loop(conn, tmp_path, [dom])
    loop.paths = Paths(tmp_path / "scheduler")
    loop.log = ActionLog(loop.paths.actions)
    ticks(loop, 6)

    class Args:
        json = True
        once = True
        name = dom
        limit = 10
    assert cmd_top(Args(), cfg) == 0
    top = json.loads(capsys.readouterr().out)
    assert top["guests"][dom]["allocation"]["vcpus"] >= 1
    assert cmd_forecast(Args(), cfg) == 0
    fc = json.loads(capsys.readouterr().out)
    assert fc["guest"] == dom and len(fc["forecast"]["cpu_p98_cores"]) == 6
    assert fc["actions"] and "planned" in fc


def test_loop_thread_ticks_on_schedule_until_stopped(conn, dom, tmp_path):
    loop = make_loop(conn, tmp_path, [dom])
    with loop:
        time.sleep(0.65)
    n = loop.ticks
    assert 4 <= n <= 8  # 0.1 s ticks
    time.sleep(0.3)
    assert loop.ticks == n


def test_a_guest_held_at_its_cap_counts_as_wanting_more(conn, dom, tmp_path):
    loop = make_loop(conn, tmp_path, [dom])
    b = GuestPolicy(max_vcpus=2)
    loop.current[dom] = Allocation(1, 30_000, 100_000, 768)  # 0.3 cores
    loop._observe_demand(sample(dom, 1.0, 0.29), b)  # at its cap: censored
    loop._observe_demand(sample(dom, 2.0, 0.10), b)  # well under: as used
    loop.current[dom] = Allocation(2, 100_000, 100_000, 768)
    loop._observe_demand(sample(dom, 3.0, 1.99), b)  # at its maximum: nothing more to give
    assert list(loop.demand[dom]) == pytest.approx([0.6, 0.10, 1.99])

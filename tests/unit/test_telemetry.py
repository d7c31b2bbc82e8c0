"""Telemetry: intent sanitising, the ring and its on-disk log, GPU headroom decisions."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hypervisor.telemetry.collectors import Intent, Sample, sanitize_intent
from hypervisor.telemetry.nvml import GpuSample, HeadroomGuard, open_nvml
from hypervisor.telemetry.ring import TelemetryRing


def sample(guest: str = "g1", cpu: float = 0.5, at: float = 1.0) -> Sample:
    return Sample(guest=guest, at=at, interval_s=5.0, vcpus=2, cpu_used=cpu, cpu_steal=0.0,
                  balloon_mib=1024, max_memory_mib=2048, unused_mib=100, available_mib=900,
                  usable_mib=256, swap_in_kibps=0, swap_out_kibps=0, major_faults_ps=0,
                  disk_rd_bps=0, disk_wr_bps=0, net_rx_bps=None, net_tx_bps=None,
                  intent=Intent(run_queue=1.5))


def test_garbage_intent_is_dropped_and_named():
    intent, dropped = sanitize_intent({"run_queue": float("nan"), "top_cpu_pct": "12.5",
                                       "pending_rlm_jobs": -3, "jobs_due_s": "soon", "unknown": 1})
    assert intent == Intent(top_cpu_pct=12.5)
    assert sorted(d.split("=")[0] for d in dropped) == ["jobs_due_s", "pending_rlm_jobs", "run_queue"]


def test_sample_derived_fractions():
    s = sample(cpu=0.5)
    assert s.cpu_demand_frac == 0.25
    assert math.isclose(s.mem_used_frac, 0.75)


def test_ring_is_bounded_and_reloads_after_a_torn_write(tmp_path: Path):
    ring = TelemetryRing(maxlen=3, log_dir=tmp_path)
    for i in range(5):
        ring.add(sample(cpu=i / 10, at=float(i)))
    assert [s.at for s in ring.history("g1")] == [2.0, 3.0, 4.0]
    with (tmp_path / "g1.jsonl").open("a") as f:
        f.write('{"guest": "g1", "at": ')  # the controller died mid-line
    fresh = TelemetryRing(maxlen=3, log_dir=tmp_path)
    assert fresh.reload("g1") == 3
    assert [s.at for s in fresh.history("g1")] == [2.0, 3.0, 4.0]
    assert fresh.history("g1")[0].intent == Intent(run_queue=1.5)
    assert json.loads((tmp_path / "g1.jsonl").read_text().splitlines()[0])["guest"] == "g1"


def gpu(temp: float, limit: float = 300.0, mask: int = 0) -> GpuSample:
    return GpuSample(index=0, name="test-gpu", temp_c=temp, slowdown_temp_c=87.0, power_w=limit * 0.9,
                     power_limit_w=limit, min_limit_w=100.0, max_limit_w=400.0, sm_clock_mhz=1800,
                     max_sm_clock_mhz=1980, throttle_mask=mask)


def test_headroom_lowers_power_before_slowdown_and_restores_when_cool():
    guard = HeadroomGuard(margin_c=5, step_frac=0.05, cool_c=10)
    hot = guard.plan([gpu(83.0)])
    assert hot and hot[0].power_limit_w == 280.0 and "slowdown" in hot[0].reason
    assert guard.plan([gpu(80.0)]) == []  # between the bands: hold
    cool = guard.plan([gpu(60.0)])
    assert cool and cool[0].power_limit_w == 320.0
    braking = guard.plan([gpu(60.0, mask=0x80)])
    assert braking and braking[0].power_limit_w == 280.0 and "hw_power_brake" in braking[0].reason
    assert guard.plan([gpu(86.0, limit=100.0)]) == []  # already at the floor


def test_host_without_nvidia_reports_cleanly():
    nv, why = open_nvml()
    if nv is None:
        assert why and "\n" not in why
    else:
        assert nv.samples()

"""Collect one `Sample` per guest per tick from libvirt's bulk domain stats.

Rates come from deltas between consecutive ticks, so the first tick of a guest
only primes its counters. A guest that vanished mid-tick, or one whose balloon
has not reported yet, is skipped or sampled partially with a logged reason;
the other guests are never held back by it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import libvirt

from hypervisor.errors import NeuraError
from hypervisor.virt.connection import Connection

log = logging.getLogger("neuraos.telemetry")

STATS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
         | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
         | libvirt.VIR_DOMAIN_STATS_BLOCK | libvirt.VIR_DOMAIN_STATS_INTERFACE)


@dataclass(frozen=True)
class Intent:
    """What the guest's agent says is coming; every field may be missing (None)."""

    run_queue: float | None = None
    top_cpu_pct: float | None = None       # the busiest process's CPU share
    pending_rlm_jobs: int | None = None
    file_write_bps: float | None = None
    jobs_due_s: float | None = None        # seconds until the next cron/systemd timer
    net_rx_bps: float | None = None
    net_tx_bps: float | None = None


@dataclass(frozen=True)
class Sample:
    guest: str
    at: float
    interval_s: float
    vcpus: int
    cpu_used: float                 # vCPU-seconds per second, 0..vcpus
    cpu_steal: float                # seconds per second vCPUs waited for a host CPU
    balloon_mib: float | None       # the balloon's current size as the guest sees memory
    max_memory_mib: float | None
    unused_mib: float | None
    available_mib: float | None
    usable_mib: float | None
    swap_in_kibps: float | None
    swap_out_kibps: float | None
    major_faults_ps: float | None
    disk_rd_bps: float
    disk_wr_bps: float
    net_rx_bps: float | None
    net_tx_bps: float | None
    intent: Intent = field(default_factory=Intent)

    @property
    def cpu_demand_frac(self) -> float:
        """CPU demand as a share of the vCPUs plugged, the forecaster's unit."""
        return self.cpu_used / self.vcpus if self.vcpus else 0.0

    @property
    def mem_used_frac(self) -> float | None:
        if self.balloon_mib and self.usable_mib is not None:
            return max(0.0, 1.0 - self.usable_mib / self.balloon_mib)
        return None


@dataclass
class _Raw:
    at: float
    stats: dict


def _finite(x: object) -> float | None:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def sanitize_intent(raw: dict | None) -> tuple[Intent, list[str]]:
    """Keep only finite, non-negative values; report what was dropped and why."""
    if not raw:
        return Intent(), []
    dropped, clean = [], {}
    for name in Intent.__dataclass_fields__:
        if name not in raw:
            continue
        v = _finite(raw[name])
        if v is None or v < 0:
            dropped.append(f"{name}={raw[name]!r}")
            continue
        clean[name] = int(v) if name == "pending_rlm_jobs" else v
    return Intent(**clean), dropped


class LibvirtCollector:
    """Turns consecutive `getAllDomainStats` snapshots into per-guest rates."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._prev: dict[str, _Raw] = {}
        self.skipped: dict[str, str] = {}  # guest → why it has no sample this tick

    def collect(self, guests: list[str] | None = None,
                intents: dict[str, dict] | None = None) -> dict[str, Sample]:
        try:
            records = self.conn.conn.getAllDomainStats(STATS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
        except libvirt.libvirtError as e:
            raise NeuraError(f"libvirt stats failed: {e.get_error_message()}") from None
        now = time.monotonic()
        wall = time.time()
        self.skipped = {}
        out: dict[str, Sample] = {}
        seen = set()
        for dom, stats in records:
            try:
                name = dom.name()
            except libvirt.libvirtError:
                continue  # vanished between listing and naming
            if guests is not None and name not in guests:
                continue
            seen.add(name)
            prev = self._prev.get(name)
            self._prev[name] = _Raw(now, stats)
            if prev is None:
                self.skipped[name] = "first tick primes the counters"
                continue
            dt = now - prev.at
            if dt <= 0:
                self.skipped[name] = "no time passed"
                continue
            intent, dropped = sanitize_intent((intents or {}).get(name))
            if dropped:
                log.warning("guest %s: dropped bad intent signals %s", name, ", ".join(dropped))
            out[name] = _sample(name, wall, dt, prev.stats, stats, intent)
            if out[name].balloon_mib is None:
                log.info("guest %s: no balloon stats yet; memory fields left empty", name)
        for name in list(self._prev):
            if name not in seen:
                del self._prev[name]
                if guests is None or name in guests:
                    self.skipped[name] = "guest vanished or stopped"
                    log.warning("guest %s vanished between ticks; skipped", name)
        return out


def _rate(cur: dict, prev: dict, key: str, dt: float, scale: float = 1.0) -> float | None:
    a, b = _finite(cur.get(key)), _finite(prev.get(key))
    if a is None or b is None or a < b:
        return None  # counter missing, or reset (guest rebooted)
    return (a - b) / dt * scale


def _sum_keys(stats: dict, prefix: str, suffix: str, count_key: str) -> float:
    n = int(stats.get(count_key, 0) or 0)
    return sum(float(stats.get(f"{prefix}.{i}.{suffix}", 0) or 0) for i in range(n))


def _sample(name: str, wall: float, dt: float, prev: dict, cur: dict, intent: Intent) -> Sample:
    vcpus = int(cur.get("vcpu.current", 0) or 0)
    cpu_used = (_rate(cur, prev, "cpu.time", dt, 1e-9) or 0.0)
    delay_now = _sum_keys(cur, "vcpu", "delay", "vcpu.current")
    delay_prev = _sum_keys(prev, "vcpu", "delay", "vcpu.current")
    steal = max(0.0, (delay_now - delay_prev) / dt * 1e-9)

    def kib_to_mib(key: str) -> float | None:
        v = _finite(cur.get(key))
        return v / 1024 if v is not None else None

    rd = _sum_keys(cur, "block", "rd.bytes", "block.count") - _sum_keys(prev, "block", "rd.bytes", "block.count")
    wr = _sum_keys(cur, "block", "wr.bytes", "block.count") - _sum_keys(prev, "block", "wr.bytes", "block.count")
    has_net = int(cur.get("net.count", 0) or 0) > 0
    rx = (_sum_keys(cur, "net", "rx.bytes", "net.count") - _sum_keys(prev, "net", "rx.bytes", "net.count")) / dt
    tx = (_sum_keys(cur, "net", "tx.bytes", "net.count") - _sum_keys(prev, "net", "tx.bytes", "net.count")) / dt
    return Sample(
        guest=name, at=wall, interval_s=dt, vcpus=vcpus,
        cpu_used=min(cpu_used, float(vcpus or 1)), cpu_steal=steal,
        balloon_mib=kib_to_mib("balloon.current") if "balloon.last-update" in cur else None,
        max_memory_mib=kib_to_mib("balloon.maximum"),
        unused_mib=kib_to_mib("balloon.unused"), available_mib=kib_to_mib("balloon.available"),
        usable_mib=kib_to_mib("balloon.usable"),
        swap_in_kibps=_rate(cur, prev, "balloon.swap_in", dt),
        swap_out_kibps=_rate(cur, prev, "balloon.swap_out", dt),
        major_faults_ps=_rate(cur, prev, "balloon.major_fault", dt),
        disk_rd_bps=max(0.0, rd / dt), disk_wr_bps=max(0.0, wr / dt),
        net_rx_bps=max(0.0, rx) if has_net else intent.net_rx_bps,
        net_tx_bps=max(0.0, tx) if has_net else intent.net_tx_bps,
        intent=intent,
    )

"""Intent signals: what the guest is about to need, read before it needs it.

The host's forecaster sees CPU and memory after the fact; these signals lead them:
a growing run queue, a process ramping up, queued RLM jobs, a burst of file writes,
a timer about to fire. Rates come from deltas between calls, so the sampler keeps
the previous counters; roots are parameters so tests can point at a fake /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class IntentSignals:
    run_queue: float                 # runnable tasks now (procs_running)
    top_cpu_pct: float               # the busiest process's share of one CPU since last call
    top_comm: str
    pending_rlm_jobs: int
    file_write_bps: float
    jobs_due_s: float                # seconds to the next systemd timer; -1 when none known
    net_rx_bps: float
    net_tx_bps: float


def _procs_running(proc: Path) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("procs_running"):
            return float(line.split()[1]) - 1.0  # not counting the sampler itself
    return 0.0


def _proc_ticks(proc: Path) -> dict[int, tuple[str, int]]:
    out = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        comm = raw[raw.find("(") + 1:raw.rfind(")")]
        fields = raw[raw.rfind(")") + 2:].split()
        out[int(d.name)] = (comm, int(fields[11]) + int(fields[12]))  # utime + stime
    return out


def _written_bytes(proc: Path) -> int:
    """Sectors written to real disks (not partitions' double counts) × 512."""
    total = 0
    for line in (proc / "diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 9 and not f[2].startswith(("loop", "ram", "dm-")) and not f[2][-1].isdigit():
            total += int(f[9]) * 512
    return total


def _net_bytes(proc: Path) -> tuple[int, int]:
    rx = tx = 0
    for line in (proc / "net" / "dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            continue
        f = rest.split()
        rx, tx = rx + int(f[0]), tx + int(f[8])
    return rx, tx


def next_timer_due_s(now_us: float | None = None) -> float:
    """Seconds until the next systemd timer elapses (-1 when unknown)."""
    if shutil.which("systemctl") is None:
        return -1.0
    try:
        out = subprocess.run(["systemctl", "list-timers", "--output=json", "--no-pager"],
                             capture_output=True, text=True, timeout=5)
        timers = json.loads(out.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return -1.0
    now = now_us if now_us is not None else time.time() * 1e6
    due = [t.get("next") for t in timers if isinstance(t.get("next"), (int, float)) and t["next"] > 0]
    return max(0.0, (min(due) - now) / 1e6) if due else -1.0


class IntentSampler:
    def __init__(self, proc: Path = PROC, pending_rlm_jobs: Callable[[], int] = lambda: 0,
                 timers: Callable[[], float] = next_timer_due_s, timers_every_s: float = 60.0) -> None:
        self.proc = proc
        self.pending_rlm_jobs = pending_rlm_jobs
        self.timers = timers
        self.timers_every_s = timers_every_s
        self._timer: tuple[float, float] | None = None  # (asked at, seconds due then)
        self._prev: tuple[float, dict[int, tuple[str, int]], int, tuple[int, int]] | None = None

    def sample(self) -> IntentSignals:
        now = time.monotonic()
        ticks, written, net = _proc_ticks(self.proc), _written_bytes(self.proc), _net_bytes(self.proc)
        top_pct, top_comm, wbps, rx, tx = 0.0, "", 0.0, 0.0, 0.0
        if self._prev is not None:
            t0, prev_ticks, prev_written, prev_net = self._prev
            dt = max(now - t0, 1e-3)
            for pid, (comm, t) in ticks.items():
                before = prev_ticks.get(pid)
                if before is None or before[0] != comm:
                    continue
                pct = (t - before[1]) / CLK_TCK / dt * 100.0
                if pct > top_pct:
                    top_pct, top_comm = pct, comm
            wbps = max(0.0, (written - prev_written) / dt)
            rx, tx = max(0.0, (net[0] - prev_net[0]) / dt), max(0.0, (net[1] - prev_net[1]) / dt)
        self._prev = (now, ticks, written, net)
        return IntentSignals(
            run_queue=max(0.0, _procs_running(self.proc)), top_cpu_pct=top_pct, top_comm=top_comm,
            pending_rlm_jobs=int(self.pending_rlm_jobs()), file_write_bps=wbps,
            jobs_due_s=self._jobs_due(now), net_rx_bps=rx, net_tx_bps=tx)

    def _jobs_due(self, now: float) -> float:
        """Ask systemd at most every `timers_every_s`; count down in between."""
        if self._timer is None or now - self._timer[0] >= self.timers_every_s:
            self._timer = (now, self.timers())
        asked, due = self._timer
        return -1.0 if due < 0 else max(0.0, due - (now - asked))

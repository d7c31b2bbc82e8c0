"""The guest's own view of itself, read from /proc and /sys, for the host and for `status --json`.

Plain data only (no gRPC here): the link turns it into a StatusReport, the CLI into JSON.
Roots are parameters so tests can read a fake /proc and /sys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neuraos_agent import __version__
from neuraos_agent.cpus import SYSFS, cpu_dir, parse_cpu_list

PROC = Path("/proc")


@dataclass(frozen=True)
class GuestStatus:
    agent_version: str
    uptime_s: float
    load1: float
    load5: float
    load15: float
    mem_total_kib: int
    mem_available_kib: int
    cpus_online: int
    cpus_present: int
    kernel: str
    boot_id: str


def read_uptime(proc: Path = PROC) -> float:
    return float((proc / "uptime").read_text().split()[0])


def read_loadavg(proc: Path = PROC) -> tuple[float, float, float]:
    one, five, fifteen = (proc / "loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def read_meminfo(proc: Path = PROC) -> dict[str, int]:
    """The kB values of /proc/meminfo by key (MemTotal, MemAvailable, ...)."""
    values: dict[str, int] = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0])
    return values


def read_boot_id(proc: Path = PROC) -> str:
    return (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()


def kernel_string() -> str:
    u = os.uname()
    return f"{u.sysname} {u.release} {u.machine}"


def read_status(proc: Path = PROC, sysfs: Path = SYSFS) -> GuestStatus:
    load1, load5, load15 = read_loadavg(proc)
    mem = read_meminfo(proc)
    cpus = cpu_dir(sysfs)
    return GuestStatus(
        agent_version=__version__,
        uptime_s=read_uptime(proc),
        load1=load1,
        load5=load5,
        load15=load15,
        mem_total_kib=mem.get("MemTotal", 0),
        # kernels before 3.14 have no MemAvailable; MemFree is the closest honest figure
        mem_available_kib=mem.get("MemAvailable", mem.get("MemFree", 0)),
        cpus_online=len(parse_cpu_list((cpus / "online").read_text())),
        cpus_present=len(parse_cpu_list((cpus / "present").read_text())),
        kernel=kernel_string(),
        boot_id=read_boot_id(proc),
    )

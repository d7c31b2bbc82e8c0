"""Apply a planned allocation to a live guest: vCPUs, per-vCPU CPU quota, balloon.

Only the knobs that differ from what is in effect are touched. Each knob is tried on
its own, so a refused quota (a driver without schedinfo) does not block the vCPUs or
the balloon; a guest that vanished raises, so the loop can skip it. The resizer is the
`Controller` (its set_vcpus goes through the agent to online CPUs) or, where there is
no link, `DomainsResizer` over libvirt alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Protocol

import libvirt

from hypervisor.errors import GuestNotFound, GuestVanished, NeuraError
from hypervisor.scheduler.policy import Allocation
from hypervisor.virt import domains
from hypervisor.virt.connection import Connection

log = logging.getLogger("neuraos.scheduler")


class Resizer(Protocol):
    def set_vcpus(self, name: str, count: int, timeout: float = ...) -> object: ...
    def set_cpu_quota(self, name: str, quota_frac: float | None) -> None: ...
    def set_memory(self, name: str, mib: int) -> None: ...


class DomainsResizer:
    """libvirt only: hot-plug up, guest-agent unplug down, schedinfo, balloon."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def set_vcpus(self, name: str, count: int, timeout: float = 10.0) -> None:
        if count > domains.info(self.conn, name).vcpus:
            domains.plug_vcpus(self.conn, name, count)
        else:
            domains.guest_set_vcpus(self.conn, name, count)

    def set_cpu_quota(self, name: str, quota_frac: float | None) -> None:
        domains.set_cpu_quota(self.conn, name, None if quota_frac is None else round(quota_frac * 100_000))

    def set_memory(self, name: str, mib: int) -> None:
        domains.set_balloon(self.conn, name, mib)


@dataclass(frozen=True)
class ApplyResult:
    allocation: Allocation          # what is in effect after this call
    applied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def current_allocation(conn: Connection, name: str, vcpus: int, balloon_mib: float | None,
                       period_us: int = 100_000) -> Allocation:
    """What a guest has now, read from libvirt (the loop's starting point for it)."""
    try:
        quota, period = domains.cpu_quota(conn, name)
    except GuestVanished:
        raise
    except NeuraError:
        quota, period = None, period_us
    memory = balloon_mib if balloon_mib is not None else domains.info(conn, name).memory_mib
    q = period_us if quota is None else round(quota * period_us / period)
    return Allocation(max(vcpus, 1), min(q, period_us), period_us, int(memory))


class Actuator:
    def __init__(self, resizer: Resizer, vcpu_timeout_s: float = 10.0) -> None:
        self.resizer = resizer
        self.vcpu_timeout_s = vcpu_timeout_s

    def apply(self, name: str, current: Allocation, target: Allocation, memory: bool = True) -> ApplyResult:
        """Move `name` from `current` to `target`; raises GuestVanished if it is gone."""
        now, applied, errors = current, [], []

        def knob(what: str, fn, new: Allocation) -> Allocation:
            try:
                fn()
            except (GuestVanished, GuestNotFound):
                raise
            except (NeuraError, libvirt.libvirtError) as e:
                errors.append(f"{what}: {e}")
                log.warning("guest %s: %s not applied: %s", name, what, e)
                return now
            applied.append(what)
            return new

        def quota() -> None:
            frac = target.cpu_quota_us / target.cpu_period_us
            self.resizer.set_cpu_quota(name, None if frac >= 1.0 else frac)

        raising = target.cpu_cores > current.cpu_cores
        steps = [("vcpus", target.vcpus != current.vcpus,
                  lambda: self.resizer.set_vcpus(name, target.vcpus, timeout=self.vcpu_timeout_s),
                  lambda a: replace(a, vcpus=target.vcpus)),
                 ("quota", target.cpu_quota_us != current.cpu_quota_us, quota,
                  lambda a: replace(a, cpu_quota_us=target.cpu_quota_us, cpu_period_us=target.cpu_period_us))]
        if not raising:
            steps.reverse()  # lowering: cap first, then take vCPUs away
        for what, differs, fn, new in steps:
            if differs:
                now = knob(what, fn, new(now))
        if memory and target.memory_mib != current.memory_mib:
            now = knob("memory", lambda: self.resizer.set_memory(name, target.memory_mib),
                       replace(now, memory_mib=target.memory_mib))
        return ApplyResult(now, applied, errors)

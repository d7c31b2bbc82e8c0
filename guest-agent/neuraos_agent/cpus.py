"""Bring guest CPUs online or offline through sysfs, as the host's scheduler asks.

The host hot-plugs vCPUs (they become *present*); the guest decides which are *online*. cpu0
stays online always (Linux usually cannot offline it). `root` is the sysfs mount so tests can
point it at a directory tree shaped like /sys.
"""

from __future__ import annotations

from pathlib import Path

SYSFS = Path("/sys")


class CpuError(Exception):
    """A CPU request the guest cannot satisfy; the message goes back to the host verbatim."""


def cpu_dir(root: Path = SYSFS) -> Path:
    return root / "devices" / "system" / "cpu"


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's CPU list format, e.g. "0-3,6,8-9"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise CpuError(f"unreadable CPU list {text.strip()!r}") from None
        if hi < lo:
            raise CpuError(f"unreadable CPU list {text.strip()!r}")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def present_cpus(root: Path = SYSFS) -> list[int]:
    return parse_cpu_list((cpu_dir(root) / "present").read_text())


def is_online(cpu: int, root: Path = SYSFS) -> bool:
    """A CPU without an `online` file cannot be offlined, so it is online (cpu0, usually)."""
    try:
        return (cpu_dir(root) / f"cpu{cpu}" / "online").read_text().strip() == "1"
    except FileNotFoundError:
        return True


def online_count(root: Path = SYSFS) -> int:
    return sum(is_online(cpu, root) for cpu in present_cpus(root))


def set_online_cpus(count: int, root: Path = SYSFS) -> int:
    """Keep the first `count` present CPUs online and the rest offline; return the online count.

    Offlines from the highest CPU down and onlines from the lowest up, so the set stays
    contiguous even if a write fails half way.
    """
    present = present_cpus(root)
    if count < 1:
        raise CpuError(f"asked for {count} CPUs online; at least 1 must stay online")
    if count > len(present):
        listing = (cpu_dir(root) / "present").read_text().strip()
        raise CpuError(f"asked for {count} CPUs online but only {len(present)} are present ({listing})")
    keep = set(present[:count])
    for cpu in sorted(present, reverse=True):
        if cpu not in keep and is_online(cpu, root):
            _write_online(cpu, False, root)
    for cpu in present:
        if cpu in keep and not is_online(cpu, root):
            _write_online(cpu, True, root)
    return online_count(root)


def _write_online(cpu: int, online: bool, root: Path) -> None:
    path = cpu_dir(root) / f"cpu{cpu}" / "online"
    if cpu == 0 or not path.exists():
        raise CpuError(f"cpu{cpu} cannot be {'onlined' if online else 'offlined'} (no {path})")
    try:
        path.write_text("1" if online else "0")
    except OSError as exc:
        raise CpuError(f"cannot {'online' if online else 'offline'} cpu{cpu}: {exc.strerror or exc}") from None

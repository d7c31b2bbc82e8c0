"""Who and what a process is: its profile key (user, service unit, executable) from /proc.

Read once per process (and again after an exec). A process gone before we look (a
flood of short-lived ones) still gets a key: its user and `comm:<name>` for the exe.
Only `.service` units name a profile: session scopes change with every login.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from neuraos_agent.monitor.profile import ProfileKey

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessInfo:
    tgid: int
    uid: int
    comm: str
    key: ProfileKey
    cgroup: str  # the cgroup v2 path, relative to the hierarchy's root ("" if unknown)


@lru_cache(maxsize=1024)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def cgroup_path(tgid: int, proc: Path = PROC) -> str:
    try:
        for line in (proc / str(tgid) / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return ""


def unit_of(cgroup: str) -> str:
    """The innermost systemd service in a cgroup path (`/system.slice/nginx.service` -> nginx.service)."""
    for part in reversed(cgroup.strip("/").split("/")):
        if part.endswith(".service"):
            return part
    return ""


def process_info(tgid: int, uid: int, comm: str, exe: str | None = None, proc: Path = PROC) -> ProcessInfo:
    if exe is None:
        try:
            exe = os.readlink(proc / str(tgid) / "exe")
        except OSError:
            exe = ""
    cg = cgroup_path(tgid, proc)
    return ProcessInfo(tgid, uid, comm, ProfileKey(user_name(uid), unit_of(cg), exe or f"comm:{comm}"), cg)

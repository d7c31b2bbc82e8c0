"""Start libvirt's daemons where no init system does it.

On a host without systemd as PID 1 (containers, this build machine) nothing starts
virtlogd, virtlockd and libvirtd; QEMU guests need all three. Each is started as a
classic daemon (`-d`) when its pid file names no live process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hypervisor.errors import DaemonError

LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
DAEMONS = ("virtlogd", "virtlockd", "libvirtd")


@dataclass(frozen=True)
class DaemonState:
    name: str
    running: bool
    started: bool  # True when this call started it
    pid: int | None


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _running(name: str) -> int | None:
    pid = _pid_alive(Path(f"/run/{name}.pid"))
    if pid is not None:
        return pid
    out = subprocess.run(["pidof", "-s", name], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.strip() else None


def libvirtd_answers(sock: Path = LIBVIRT_SOCK) -> bool:
    """True when libvirtd accepts connections on its socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def ensure_daemons(start: bool = True, timeout: float = 20.0) -> list[DaemonState]:
    """Make sure virtlogd, virtlockd and libvirtd run; start the missing ones."""
    states = []
    for name in DAEMONS:
        pid = _running(name)
        if pid is not None:
            states.append(DaemonState(name, True, False, pid))
            continue
        if not start:
            states.append(DaemonState(name, False, False, None))
            continue
        binary = shutil.which(name) or f"/usr/sbin/{name}"
        if not os.path.exists(binary):
            raise DaemonError(f"{name} is not installed", "run `bash .ci/setup` to install libvirt")
        if os.geteuid() != 0:
            raise DaemonError(f"{name} is not running and only root can start it")
        proc = subprocess.run([binary, "-d"], capture_output=True, text=True)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise DaemonError(f"{name} failed to start: {msg[-1] if msg else proc.returncode}")
        states.append(DaemonState(name, True, True, _running(name)))
    deadline = time.monotonic() + timeout
    while not libvirtd_answers():
        if time.monotonic() > deadline:
            raise DaemonError(f"libvirtd does not answer on {LIBVIRT_SOCK} after {timeout:.0f} s")
        time.sleep(0.2)
    return states


QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# The unix-socket link fallback has QEMU spawn `socat` per connection
# (guestfwd=…-cmd:…); libvirt's default QEMU seccomp filter denies spawning.
QEMU_SETTINGS = {"seccomp_sandbox": "0"}


def ensure_qemu_conf(conf: Path = QEMU_CONF, settings: dict[str, str] = QEMU_SETTINGS) -> bool:
    """Set the qemu.conf keys NeuraOS needs; True when the file changed (restart libvirtd)."""
    try:
        lines = conf.read_text().splitlines()
    except OSError as e:
        raise DaemonError(f"cannot read {conf}: {e.strerror}") from None
    todo = dict(settings)
    out = []
    for line in lines:
        key, sep, rest = line.partition("=")
        key = key.strip()
        if sep and key in settings and not line.lstrip().startswith("#"):
            if key in todo and rest.split("#", 1)[0].strip() == settings[key]:
                out.append(line)
            elif key in todo:
                out.append(f"{key} = {settings[key]}")
            todo.pop(key, None)  # a later duplicate of the key is dropped
            continue
        out.append(line)
    for key, value in todo.items():
        out.append("# set by NeuraOS: the link's guestfwd spawns socat")
        out.append(f"{key} = {value}")
    new = "\n".join(out) + "\n"
    if new == "\n".join(lines) + "\n":
        return False
    conf.write_text(new)
    return True


def restart_libvirtd(timeout: float = 20.0) -> None:
    """Stop libvirtd and start it again; running guests keep running meanwhile."""
    pid = _running("libvirtd")
    if pid is not None:
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while _running("libvirtd") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
    ensure_daemons(timeout=timeout)


def main() -> None:
    """`python -m hypervisor.virt.daemons`: configure qemu.conf and start libvirt's daemons."""
    import sys

    try:
        changed = ensure_qemu_conf()
        states = ensure_daemons()
        if changed:
            restart_libvirtd()
    except DaemonError as e:
        print(f"error: {e}\nhint: {e.hint}", file=sys.stderr)
        sys.exit(1)
    for s in states:
        print(f"{s.name}: {'started' if s.started else 'running'} (pid {s.pid})")
    if changed:
        print("qemu.conf: seccomp_sandbox = 0 set, libvirtd restarted")


if __name__ == "__main__":
    main()

"""Release or kill a contained process in a guest: a Command over that guest's link.

`release` / `kill` talk to the LinkServer directly (the controller, tests). `ActionPump`
runs beside a controller and carries out what the separate `neuraos release|kill`
processes queued in the alert store.
"""

from __future__ import annotations

import logging
import threading

from hypervisor.errors import LinkError, NeuraError
from hypervisor.link._gen import link_pb2
from hypervisor.link.server import LinkServer
from hypervisor.security.alerts import AlertStore

log = logging.getLogger("neuraos.security")
KINDS = ("release", "kill")


def act(link: LinkServer, guest: str, pid: int, kind: str, timeout: float = 20.0) -> str:
    """Ask the guest's agent to release or kill `pid`; returns what the agent said, raises on refusal."""
    if kind not in KINDS:
        raise NeuraError(f"unknown action {kind!r}", "use release or kill")
    if not 0 < pid < 2**22:
        raise NeuraError(f"{pid} is not a process id")
    cmd = link_pb2.Command(release=link_pb2.Release(pid=pid)) if kind == "release" else \
        link_pb2.Command(kill=link_pb2.Kill(pid=pid))
    result = link.send_command(guest, cmd, timeout)
    if not result.ok:
        raise LinkError(f"guest {guest} could not {kind} process {pid}: {result.error}",
                        hint="`neuraos alerts` lists the contained processes")
    return result.output


def release(link: LinkServer, guest: str, pid: int, timeout: float = 20.0) -> str:
    return act(link, guest, pid, "release", timeout)


def kill(link: LinkServer, guest: str, pid: int, timeout: float = 20.0) -> str:
    return act(link, guest, pid, "kill", timeout)


class ActionPump:
    """A thread that sends the queued operator actions and writes back their results."""

    def __init__(self, link: LinkServer, store: AlertStore, interval_s: float = 0.5) -> None:
        self.link = link
        self.store = store
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neuraos-security-actions", daemon=True)

    def __enter__(self) -> ActionPump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                for a in self.store.pending():
                    self.run_one(a.seq, a.guest, a.pid, a.kind)
            except NeuraError as e:
                log.warning("security actions: %s", e)

    def run_one(self, seq: int, guest: str, pid: int, kind: str) -> None:
        try:
            out = act(self.link, guest, pid, kind)
            self.store.set_state(guest, pid, "released" if kind == "release" else "killed")
            self.store.finish(seq, True, out)
        except NeuraError as e:
            self.store.finish(seq, False, str(e))

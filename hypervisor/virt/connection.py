"""A libvirt connection that outlives libvirtd restarts.

libvirt reports a dropped connection through its close callback only while an
event loop runs, so one process-wide default event loop thread is started first.
On close, a reconnect thread dials again with capped backoff and re-registers the
lifecycle subscribers; callers meanwhile get a clear `DaemonError`, never a stale
handle.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import libvirt

from hypervisor.errors import DaemonError

log = logging.getLogger("neuraos.virt")

# libvirt prints every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from-snapshot",
}


@dataclass(frozen=True)
class LifecycleEvent:
    domain: str
    event: str
    detail: str
    at: float


Subscriber = Callable[[LifecycleEvent], None]


class Connection:
    """Reconnecting libvirt connection. Use `.conn` for calls; subscribe for events."""

    def __init__(self, uri: str = "qemu:///system", max_backoff: float = 5.0) -> None:
        self.uri = uri
        self.max_backoff = max_backoff
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.RLock()
        self._subscribers: list[Subscriber] = []
        self._callback_ids: list[int] = []
        self._closed = False
        self._reconnecting = False
        self.reconnects = 0
        self.connected = threading.Event()

    def __enter__(self) -> Connection:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        _ensure_event_loop()
        self._dial()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conn, self._conn = self._conn, None
            self.connected.clear()
        if conn is not None:
            for cid in self._callback_ids:
                try:
                    conn.domainEventDeregisterAny(cid)
                except libvirt.libvirtError:
                    pass
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    @property
    def conn(self) -> libvirt.virConnect:
        """The live connection, or DaemonError while libvirtd is away."""
        with self._lock:
            conn = self._conn
        if conn is None or not conn.isAlive():
            if conn is not None:
                self._lost("connection found dead")
            raise DaemonError(f"not connected to libvirt at {self.uri} (libvirtd down or restarting)")
        return conn

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def subscribe(self, fn: Subscriber) -> None:
        """Call fn for every domain lifecycle event, across reconnects."""
        self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def _dial(self) -> None:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise DaemonError(f"cannot connect to {self.uri}: {e.get_error_message()}") from None
        try:
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError:  # local drivers (test:///) have no keepalive: nothing to lose
            if not self.uri.startswith("test:"):
                conn.close()
                raise DaemonError(f"cannot keep {self.uri} alive") from None
        ids = [conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)]
        with self._lock:
            self._conn = conn
            self._callback_ids = ids
            self.connected.set()
        log.info("connected to %s", self.uri)

    def _on_lifecycle(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        name = EVENT_NAMES.get(event, str(event))
        det = STOPPED_DETAILS.get(detail, str(detail)) if event == libvirt.VIR_DOMAIN_EVENT_STOPPED else str(detail)
        ev = LifecycleEvent(dom.name(), name, det, time.time())
        for fn in list(self._subscribers):
            try:
                fn(ev)
            except Exception:  # a subscriber's bug must not kill the event loop
                log.exception("lifecycle subscriber failed on %s", ev)

    def _on_close(self, _conn, reason: int, _opaque) -> None:
        self._lost(f"closed (reason {reason})")

    def _lost(self, why: str) -> None:
        with self._lock:
            if self._closed or self._reconnecting:
                return
            self._reconnecting = True
            self._conn = None
            self.connected.clear()
        log.warning("libvirt connection lost: %s; reconnecting", why)
        threading.Thread(target=self._reconnect_loop, name="libvirt-reconnect", daemon=True).start()

    def _reconnect_loop(self) -> None:
        delay = 0.2
        while not self._closed:
            try:
                self._dial()
                self.reconnects += 1
                break
            except DaemonError:
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        with self._lock:
            self._reconnecting = False

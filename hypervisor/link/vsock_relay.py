"""virtio-vsock in front of the per-guest unix sockets, for gRPC builds without vsock.

PyPI's grpcio wheels cannot listen on vsock, but Python's sockets can. So on a host
with /dev/vhost-vsock the LinkServer keeps one unix socket per guest (exactly as
with the user-mode forward), and this relay accepts every guest's vsock connection
on one port, reads the peer's CID — assigned by the hypervisor, unforgeable by the
guest — and splices the bytes to that guest's socket. An unknown CID is refused.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Callable

from hypervisor.errors import LinkError
from hypervisor.link.transport import LINK_PORT, Listener, UnixForwardTransport, ssh_hostfwd

log = logging.getLogger("neuraos.link")
CHUNK = 64 * 1024


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src→dst until EOF, then half-close dst so the other side sees the end."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def splice(a: socket.socket, b: socket.socket) -> threading.Thread:
    """Join two connected sockets both ways; both close when both directions end."""

    def run() -> None:
        back = threading.Thread(target=_pump, args=(b, a), daemon=True)
        back.start()
        _pump(a, b)
        back.join()
        a.close()
        b.close()

    t = threading.Thread(target=run, name="neuraos-vsock-splice", daemon=True)
    t.start()
    return t


def vsock_listener(port: int = LINK_PORT) -> socket.socket:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, port))
    s.listen(64)
    return s


class VsockRelay:
    """Route each accepted connection to `route(cid)`'s unix socket; refuse unknown CIDs."""

    def __init__(self, listener: socket.socket, route: Callable[[int], Path | None],
                 cid_of: Callable[[object], int] = lambda peer: int(peer[0])) -> None:  # type: ignore[index]
        self.listener = listener
        self.route = route
        self.cid_of = cid_of
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="neuraos-vsock-relay", daemon=True)

    def __enter__(self) -> VsockRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            try:
                cid = self.cid_of(peer)
                path = self.route(cid)
            except Exception:  # a bad peer address must not end the relay
                cid, path = -1, None
            if path is None:
                self.refused += 1
                log.warning("link: refused vsock peer %r (CID %s is no known guest)", peer, cid)
                conn.close()
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(path))
            except OSError as e:
                log.warning("link: guest socket %s for CID %d unavailable: %s", path, cid, e)
                upstream.close()
                conn.close()
                continue
            splice(conn, upstream)


class VsockRelayTransport(UnixForwardTransport):
    """Per-guest unix sockets served by the LinkServer, reached from guests over vsock."""

    kind = "vsock-relay"

    def __init__(self, socket_dir: Path, *, port: int = LINK_PORT) -> None:
        super().__init__(socket_dir, port=port, qemu_user=None, qemu_group=None)
        self.guest_link_address = f"vsock:2:{port}"  # CID 2 is always the host

    def qemu_netdev_args(self, guest: str, ssh_port: int | None) -> str:
        """Only the ssh forward: the link runs over the domain's <vsock> device."""
        self.socket_path(guest)
        return f"user,id=neura0,restrict=on{ssh_hostfwd(ssh_port)}"

    def listener(self, guest: str) -> Listener:
        path = self.socket_path(guest)
        return Listener(address=f"unix:{path}", guest=guest, socket_path=path)


class CidTable:
    """guest ↔ CID, as libvirt assigned them (read from the live domain XML)."""

    def __init__(self, transport: VsockRelayTransport) -> None:
        self.transport = transport
        self._by_cid: dict[int, str] = {}
        self._lock = threading.Lock()

    def set(self, guest: str, cid: int) -> None:
        if cid < 3:
            raise LinkError(f"guest {guest}: CID {cid} is reserved", hint="let libvirt pick one: <cid auto='yes'/>")
        with self._lock:
            self._by_cid = {c: g for c, g in self._by_cid.items() if g != guest}
            self._by_cid[cid] = guest

    def drop(self, guest: str) -> None:
        with self._lock:
            self._by_cid = {c: g for c, g in self._by_cid.items() if g != guest}

    def route(self, cid: int) -> Path | None:
        with self._lock:
            guest = self._by_cid.get(cid)
        return self.transport.socket_path(guest) if guest else None

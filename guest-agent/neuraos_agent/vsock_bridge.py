"""Reach the host over virtio-vsock with a gRPC build that cannot dial vsock.

PyPI's grpcio has no vsock support, so for a `vsock:CID:PORT` link address the
agent listens on an ephemeral 127.0.0.1 port inside the guest and carries each
connection to the host's vsock port byte for byte; gRPC dials the local port.
The host side (hypervisor/link/vsock_relay.py) routes by our CID.
"""

from __future__ import annotations

import logging
import re
import socket
import threading

log = logging.getLogger("neuraos.agent")
_VSOCK = re.compile(r"^vsock:(\d+):(\d+)$")


def parse_vsock(address: str) -> tuple[int, int] | None:
    m = _VSOCK.fullmatch(address)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _forward(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class VsockBridge:
    """127.0.0.1:<ephemeral> → AF_VSOCK (cid, port), one thread pair per connection."""

    def __init__(self, cid: int, port: int, family: int = getattr(socket, "AF_VSOCK", -1)) -> None:
        self.target = (cid, port)
        self.family = family
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, name="neuraos-vsock-bridge", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                local, _ = self._server.accept()
            except OSError:
                return  # closed
            remote = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                remote.connect(self.target)
            except OSError as e:
                log.warning("vsock %s:%s unreachable: %s", *self.target, e)
                remote.close()
                local.close()
                continue
            for a, b in ((local, remote), (remote, local)):
                threading.Thread(target=_forward, args=(a, b), daemon=True).start()

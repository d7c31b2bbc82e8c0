"""A local socket through which other processes search the running agent's index.

Milvus Lite allows one process per store, and the agent owns it; so `neuraos-agent search` asks
the agent over a unix socket instead of opening the store. The agent learns who is asking from
the kernel (SO_PEERCRED), never from the request, so permission filtering cannot be spoofed.
Protocol: one JSON request line, one JSON response line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from neuraos_agent.vfs.errors import VFSError
from neuraos_agent.vfs.permissions import Caller

if TYPE_CHECKING:
    from neuraos_agent.vfs.search import SearchHit

log = logging.getLogger("neuraos.vfs.socket")

SearchCall = Callable[[str, int, str, Caller], "list[SearchHit]"]
StatusCall = Callable[[str], dict]  # path prefix → the VFSStatus as a dict (counts only, no paths)
MAX_REQUEST = 64 * 1024


def peer_caller(sock: socket.socket) -> Caller:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    groups: set[int] = set()
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups = {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return Caller(uid, gid, frozenset(groups | {gid}))


class QueryServer:
    """Serves `search` on a unix socket at `path` (mode 0666: every user may ask, for their files)."""

    def __init__(self, path: Path, search: SearchCall, status: StatusCall | None = None) -> None:
        self.path = Path(path)
        self.search = search
        self.status = status
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    req = json.loads(self.rfile.readline(MAX_REQUEST))
                    if req.get("op") == "status" and outer.status is not None:
                        if peer_caller(self.request).uid != 0:  # counts under a prefix say what exists
                            raise PermissionError("the vector file system's status is for root only")
                        self.wfile.write(json.dumps({"status": outer.status(str(req.get("path_prefix", "")))})
                                         .encode() + b"\n")
                        return
                    caller = peer_caller(self.request)
                    hits = outer.search(str(req["query"]), int(req.get("k", 10)),
                                        str(req.get("path_prefix", "")), caller)
                    resp: dict[str, Any] = {"hits": [asdict(h) for h in hits]}
                except Exception as exc:  # noqa: BLE001 - the client shows one line
                    log.exception("search request failed")
                    resp = {"error": f"{type(exc).__name__}: {exc}"}
                self.wfile.write(json.dumps(resp).encode() + b"\n")

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        self._server.daemon_threads = True
        os.chmod(self.path, 0o666)
        self._thread = threading.Thread(target=self._server.serve_forever, name="vfs-query", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def query(path: Path, query_text: str, k: int = 10, path_prefix: str = "", timeout: float = 30.0) -> list["SearchHit"]:
    """Ask the running agent; `VFSError` when it is not running or the search failed."""
    from neuraos_agent.vfs.search import SearchHit

    resp = _ask(path, {"query": query_text, "k": k, "path_prefix": path_prefix}, timeout)
    if "error" in resp or "hits" not in resp:
        raise VFSError(resp.get("error", "empty answer from the vector file system"))
    return [SearchHit(**h) for h in resp["hits"]]


def status(path: Path, path_prefix: str = "", timeout: float = 30.0) -> dict:
    """The running VFS's counters (pending journal records, indexed files under a prefix, rebuilds)."""
    resp = _ask(path, {"op": "status", "path_prefix": path_prefix}, timeout)
    if "status" not in resp:
        raise VFSError(resp.get("error", "empty answer from the vector file system"))
    return resp["status"]


def _ask(path: Path, request: dict, timeout: float) -> dict:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                part = sock.recv(65536)
                if not part:
                    break
                buf += part
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise VFSError(f"the vector file system is not running (no socket at {path})") from exc
    except OSError as exc:
        raise VFSError(f"cannot reach the vector file system at {path}: {exc}") from exc
    return json.loads(buf or b"{}")

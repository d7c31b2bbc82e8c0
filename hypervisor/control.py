"""The running controller's local control socket, so one-shot CLI commands can reach it.

The link to every guest lives in the `neuraos up` process; a command such as `neuraos search`
runs in another process and asks that one through `<run_dir>/control.sock` (a unix socket, mode
0600: root only, nothing on the network). Protocol: one JSON request line `{"op": ..., "args":
{...}}`, one JSON answer line `{"result": ...}` or `{"error": ..., "hint": ...}`. Operations are
plain functions registered by the modules that own them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from hypervisor.config import Config
from hypervisor.errors import NeuraError

log = logging.getLogger("neuraos.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024

Op = Callable[[dict], Any]  # JSON-able arguments → JSON-able result; NeuraError for expected failures


class ControlError(NeuraError):
    hint = "is the controller running? `neuraos up NAME` starts it (and keeps the guests' links)"


def control_path(cfg: Config) -> Path:
    return cfg.run_dir / SOCKET_NAME


class ControlServer:
    """Serves `ops` on `path` until closed; a context manager."""

    def __init__(self, path: Path, ops: Mapping[str, Op]) -> None:
        self.path = Path(path)
        self.ops = dict(ops)
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(json.dumps(outer.answer(self.rfile.readline(MAX_REQUEST))).encode() + b"\n")

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="neuraos-control", daemon=True)

    def answer(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            op = self.ops.get(req.get("op"))
            if op is None:
                return {"error": f"unknown operation {req.get('op')!r}", "hint": f"known: {', '.join(sorted(self.ops))}"}
            return {"result": op(dict(req.get("args") or {}))}
        except NeuraError as exc:
            return {"error": str(exc), "hint": exc.hint}
        except (ValueError, TypeError, AttributeError) as exc:
            return {"error": f"bad request: {exc}", "hint": ""}
        except Exception as exc:  # noqa: BLE001 - the client prints one line; the trace goes to the log
            log.exception("control operation failed")
            return {"error": f"{type(exc).__name__}: {exc}", "hint": "see the controller's log"}

    def __enter__(self) -> "ControlServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def call(path: Path, op: str, args: dict, timeout: float = 120.0) -> Any:
    """Ask the running controller; `ControlError` when it is not there or the operation failed."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                part = sock.recv(65536)
                if not part:
                    break
                buf += part
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no running controller (no socket at {path})") from None
    except OSError as exc:
        raise ControlError(f"cannot reach the controller at {path}: {exc}") from None
    try:
        resp = json.loads(buf)
    except ValueError:
        raise ControlError("the controller closed the connection without an answer") from None
    if "error" in resp:
        raise NeuraError(resp["error"], resp.get("hint") or "")
    return resp.get("result")

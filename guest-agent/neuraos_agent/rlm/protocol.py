"""The parent<->REPL wire: one JSON object per line over a pair of pipes.

Parent to REPL: `exec` (run a turn), `reply` (answer to a call), `shutdown`.
REPL to parent: `ready` (with what confinement was applied), `call` (llm_query, rlm_query,
embed or a tool, served by the parent, which alone can reach a model), `result` (a turn's end).
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

MAX_LINE = 64 * 1024 * 1024  # a message larger than this is a protocol error, not a memory hazard


class ProtocolError(Exception):
    pass


def send(fh: BinaryIO, msg: dict[str, Any]) -> None:
    fh.write(json.dumps(msg, default=str).encode("utf-8") + b"\n")
    fh.flush()


def recv(fh: BinaryIO) -> dict[str, Any]:
    line = fh.readline(MAX_LINE)
    if not line:
        raise EOFError("peer closed the pipe")
    if not line.endswith(b"\n"):
        raise ProtocolError("message too long or cut off")
    msg = json.loads(line)
    if not isinstance(msg, dict) or "op" not in msg:
        raise ProtocolError(f"malformed message: {line[:80]!r}")
    return msg

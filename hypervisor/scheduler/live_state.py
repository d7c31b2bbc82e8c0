"""The running loop's last tick, as one JSON file other processes read (`neuraos top`).

The controller writes it after every tick (to a temporary file, then renamed, so a
reader never sees half of it); the CLI reads it instead of asking the controller over
a new socket. A file older than a few ticks means the loop is not running.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hypervisor.errors import NeuraError


class LoopNotRunning(NeuraError):
    hint = "the scheduler runs inside `neuraos up`; start it, or check its log"


def write_live(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def read_live(path: Path, max_age_ticks: float = 5.0) -> dict:
    """The last tick's document; raises LoopNotRunning when absent, unreadable or stale."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoopNotRunning(f"no scheduler state at {path}") from None
    except (OSError, ValueError) as e:
        raise LoopNotRunning(f"scheduler state {path} unreadable: {e}") from None
    age = time.time() - float(doc.get("at", 0))
    if age > max_age_ticks * float(doc.get("tick_s", 5.0)) + 5.0:
        raise LoopNotRunning(f"scheduler state is {age:.0f} s old: the loop is not running")
    return doc

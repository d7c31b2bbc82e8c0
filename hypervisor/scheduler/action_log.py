"""Every resize the scheduler makes, with the forecast that caused it (JSON lines on disk).

An operator reading `neuraos forecast NAME` or the file itself can see, per action,
what was planned, what libvirt accepted, what failed, and which forecast (its source,
period, quantile path) asked for it. Append-only, one line per action, rotated by size
like the telemetry log; a torn last line after a crash is skipped on read.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("neuraos.scheduler")


@dataclass(frozen=True)
class ActionRecord:
    at: float
    guest: str
    planner: str
    kind: str                      # "resize", "skip", "gpu"
    previous: dict | None = None   # Allocation as applied before
    target: dict | None = None     # Allocation the planner asked for
    applied: list[str] = field(default_factory=list)   # knobs libvirt accepted: vcpus, quota, memory
    in_effect: dict | None = None  # Allocation after this action (the target less what was refused)
    errors: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    forecast: dict = field(default_factory=dict)       # source, period_s, cpu path, memory path, ...


class ActionLog:
    def __init__(self, path: Path, max_bytes: int = 16 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rec: ActionRecord) -> None:
        line = json.dumps(asdict(rec)) + "\n"
        with self._lock:
            try:
                if self.path.exists() and self.path.stat().st_size > self.max_bytes:
                    self.path.replace(self.path.with_suffix(".jsonl.1"))
                with self.path.open("a") as f:
                    f.write(line)
            except OSError as e:  # a full disk must not stop the scheduler
                log.warning("action log %s not written: %s", self.path, e.strerror)


def read_actions(path: Path, guest: str | None = None, limit: int = 50) -> list[ActionRecord]:
    """The last `limit` records (of one guest, when given), oldest first."""
    out: list[ActionRecord] = []
    for p in (path.with_suffix(".jsonl.1"), path):
        if not p.exists():
            continue
        for line in p.read_text(errors="replace").splitlines():
            try:
                rec = ActionRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue
            if guest is None or rec.guest == guest:
                out.append(rec)
    return out[-limit:] if limit else out

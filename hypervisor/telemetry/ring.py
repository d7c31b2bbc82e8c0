"""Bounded per-guest history: a ring in memory and an append-only log on disk.

The forecaster reads the last N ticks from the ring; the on-disk log (JSON lines,
one file per guest, rotated by size) lets a restarted controller refill the ring
instead of waiting N ticks, and lets an operator replay what the scheduler saw.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict
from pathlib import Path

from hypervisor.telemetry.collectors import Intent, Sample

log = logging.getLogger("neuraos.telemetry")


class TelemetryRing:
    def __init__(self, maxlen: int = 288, log_dir: Path | None = None, max_log_bytes: int = 8 << 20) -> None:
        self.maxlen = maxlen
        self.log_dir = log_dir
        self.max_log_bytes = max_log_bytes
        self._rings: dict[str, deque[Sample]] = {}
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)

    def add(self, sample: Sample) -> None:
        self._rings.setdefault(sample.guest, deque(maxlen=self.maxlen)).append(sample)
        if self.log_dir is not None:
            self._append(sample)

    def history(self, guest: str) -> list[Sample]:
        return list(self._rings.get(guest, ()))

    def guests(self) -> list[str]:
        return sorted(self._rings)

    def drop(self, guest: str) -> None:
        self._rings.pop(guest, None)

    def _path(self, guest: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{guest}.jsonl"

    def _append(self, sample: Sample) -> None:
        path = self._path(sample.guest)
        try:
            if path.exists() and path.stat().st_size > self.max_log_bytes:
                path.replace(path.with_suffix(".jsonl.1"))
            with path.open("a") as f:
                f.write(json.dumps(asdict(sample)) + "\n")
        except OSError as e:  # a full disk must not stop the scheduler
            log.warning("telemetry log for %s not written: %s", sample.guest, e.strerror)

    def reload(self, guest: str) -> int:
        """Refill a guest's ring from its on-disk log; returns the samples loaded."""
        if self.log_dir is None:
            return 0
        ring = self._rings.setdefault(guest, deque(maxlen=self.maxlen))
        loaded = 0
        for path in (self._path(guest).with_suffix(".jsonl.1"), self._path(guest)):
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                try:
                    raw = json.loads(line)
                    raw["intent"] = Intent(**raw.get("intent") or {})
                    ring.append(Sample(**raw))
                    loaded += 1
                except (ValueError, TypeError):
                    continue  # a torn last line after a crash
        return min(loaded, self.maxlen)

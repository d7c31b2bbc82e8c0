"""The durable record of what changed, so no write is lost to indexing and indexing survives a crash.

Each record is one line `CRC32 JSON\n`, appended with a single os.write (whole, or torn at the
tail by a crash; a torn or damaged tail is cut off when the journal is opened). The bytes are in
the kernel as soon as `append` returns, so a kill -9 loses nothing; a flusher thread fsyncs them
within `sync_interval_s` (group commit), so a close() does not wait for the disk. The worker
acknowledges what it has indexed with `commit(seq)`, kept in a small checkpoint file written by
rename; `compact()` then rewrites the journal with only the pending records.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger("neuraos.vfs.journal")

JOURNAL = "journal.log"
CHECKPOINT = "journal.ckpt"


@dataclass(frozen=True)
class Record:
    """One change: `op` is "write" (close after write, or attributes), "unlink" or "rename"."""

    seq: int
    op: str
    path: str  # relative to the mount root, "/"-separated, no leading "/"
    dst: str = ""  # rename target
    ts: float = 0.0

    def encode(self) -> bytes:
        body = json.dumps({k: v for k, v in asdict(self).items() if v != ""}, separators=(",", ":"))
        raw = body.encode("utf-8")
        return b"%08x %s\n" % (zlib.crc32(raw), raw)


def _decode(line: bytes) -> Record | None:
    if len(line) < 10 or line[8:9] != b" ":
        return None
    raw = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(raw):
            return None
        return Record(**json.loads(raw))
    except (ValueError, TypeError):
        return None


class Journal:
    """Append-only, fsync'd, compacted journal in `directory`; one writer process at a time."""

    def __init__(self, directory: Path, sync_interval_s: float = 0.02) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / JOURNAL
        self.sync_interval_s = sync_interval_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._committed = self._read_checkpoint()
        self._records = self._recover()
        self._seq = max([self._committed, *(r.seq for r in self._records)])
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._dirty = False
        self._closed = False
        self._flusher = threading.Thread(target=self._flush_loop, name="vfs-journal-sync", daemon=True)
        self._flusher.start()

    # -- writing -------------------------------------------------------------------------------
    def append(self, op: str, path: str, dst: str = "") -> Record:
        with self._lock:
            if self._closed:
                raise ValueError("journal is closed")
            rec = Record(self._seq + 1, op, path, dst, time.time())
            data = rec.encode()
            end = os.fstat(self._fd).st_size
            try:
                if os.write(self._fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write to the journal")
            except OSError:
                os.ftruncate(self._fd, end)  # never leave half a record before the next one
                raise
            self._seq += 1
            self._records.append(rec)
            self._dirty = True
            self._changed.notify_all()
            return rec

    def sync(self) -> None:
        """Make every appended record durable now."""
        with self._lock:
            self._dirty = False
            fd = self._fd
        os.fsync(fd)

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                self._dirty = False
                fd = self._fd
            try:
                os.fsync(fd)
            except OSError:
                pass  # closed under us by compact(); the new file was fsync'd there
            time.sleep(self.sync_interval_s)

    # -- reading and acknowledging ---------------------------------------------------------------
    def pending(self, after: int | None = None) -> list[Record]:
        """Records not yet committed (and past `after`, when given), oldest first."""
        floor = self._committed if after is None else max(after, self._committed)
        with self._lock:
            return [r for r in self._records if r.seq > floor]

    def wait(self, after: int, timeout: float) -> bool:
        """Block until a record past `after` exists (True) or `timeout` passes (False)."""
        with self._lock:
            return self._changed.wait_for(lambda: self._seq > after or self._closed, timeout) and self._seq > after

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def last_seq(self) -> int:
        return self._seq

    def commit(self, seq: int) -> None:
        """Everything up to `seq` is indexed: persist that, and drop those records from memory."""
        with self._lock:
            if seq <= self._committed:
                return
            self._committed = seq
            self._records = [r for r in self._records if r.seq > seq]
        _atomic_write(self.directory / CHECKPOINT, str(seq).encode())

    def compact(self, min_bytes: int = 1 << 20) -> bool:
        """Rewrite the journal with only pending records once it has grown past `min_bytes`."""
        with self._lock:
            if self._closed or os.fstat(self._fd).st_size < min_bytes:
                return False
            _atomic_write(self.path, b"".join(r.encode() for r in self._records))
            old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.close(old)
        return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._flusher.join(timeout=5)
        os.fsync(self._fd)
        os.close(self._fd)

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery ------------------------------------------------------------------------------
    def _read_checkpoint(self) -> int:
        try:
            return int((self.directory / CHECKPOINT).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _recover(self) -> list[Record]:
        """Valid records past the checkpoint. A torn last line (a crash mid-append) is truncated
        away; a damaged line inside is skipped (the worker's reconcile covers what it said)."""
        records: list[Record] = []
        good = 0
        damaged = 0
        try:
            with open(self.path, "rb") as f:
                for line in _lines(f):
                    if not line.endswith(b"\n"):
                        break  # torn tail
                    good += len(line)
                    rec = _decode(line)
                    if rec is None:
                        damaged += 1
                    elif rec.seq > self._committed:
                        records.append(rec)
        except FileNotFoundError:
            return []
        if damaged:
            log.warning("journal %s: skipped %d damaged records", self.path, damaged)
        if good < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return records


def _lines(f) -> Iterator[bytes]:  # noqa: ANN001 - a binary file
    while line := f.readline():
        yield line


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

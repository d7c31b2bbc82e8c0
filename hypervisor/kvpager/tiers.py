"""Where page bytes live: fast memory, host RAM, NVMe files, each with an enforced capacity.

A tier stores and returns bytes and refuses what does not fit; it never chooses
what to evict (that is the policy's job, see policy.py) so a full tier is a
signal to the placement, not a crash. The NVMe tier writes one file per page with
a checksummed header and verifies it on every read: a page that is missing, torn
or corrupted reads as absent, so the caller re-prefills instead of using wrong KV.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from hypervisor.errors import NeuraError
from hypervisor.kvpager.pages import PageKey, checksum


class KVPagerError(NeuraError):
    """Every expected failure of the KV pager."""

    hint = "see `neuraos kv` for tiers and occupancy"


class TierFull(KVPagerError):
    hint = "the placement evicts before it writes; a tier full here is a placement bug"


class PageWriteError(KVPagerError):
    hint = "the disk under the NVMe tier is full or failing; the page is dropped and re-prefilled when needed"


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    capacity_bytes: int
    used_bytes: int
    pages: int
    corrupt_reads: int = 0
    failed_writes: int = 0


class Tier(ABC):
    """A byte store with a hard capacity; `put` beyond it raises TierFull."""

    def __init__(self, name: str, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.name = name
        self.capacity_bytes = capacity_bytes
        self._sizes: dict[PageKey, int] = {}
        self.used_bytes = 0
        self.corrupt_reads = 0
        self.failed_writes = 0

    def __contains__(self, key: PageKey) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def put(self, key: PageKey, data: bytes) -> None:
        old = self._sizes.get(key, 0)
        if self.used_bytes - old + len(data) > self.capacity_bytes:
            raise TierFull(f"tier {self.name}: {len(data)} B do not fit in {self.free_bytes() + old} B free")
        try:
            self._store(key, data)
        except OSError as e:
            self.failed_writes += 1
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise PageWriteError(f"tier {self.name}: cannot write a page: "
                                 f"{'disk full' if full else e.strerror}") from e
        self._sizes[key] = len(data)
        self.used_bytes += len(data) - old

    def get(self, key: PageKey) -> bytes | None:
        """The page's bytes, or None when it is absent or failed verification (then it is removed)."""
        if key not in self._sizes:
            return None
        data = self._load(key)
        if data is None:
            self.corrupt_reads += 1
            self.remove(key)
        return data

    def peek(self, key: PageKey) -> bytes | None:
        """A verified read that changes nothing: safe beside the request path for a slow tier."""
        return self._load(key) if key in self._sizes else None

    def remove(self, key: PageKey) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used_bytes -= size
            self._delete(key)

    def stats(self) -> TierStats:
        return TierStats(self.name, self.capacity_bytes, self.used_bytes, len(self._sizes),
                         self.corrupt_reads, self.failed_writes)

    @abstractmethod
    def _store(self, key: PageKey, data: bytes) -> None: ...

    @abstractmethod
    def _load(self, key: PageKey) -> bytes | None: ...

    @abstractmethod
    def _delete(self, key: PageKey) -> None: ...


class MemoryTier(Tier):
    """Fast memory (a live context slot or GPU memory stand-in) or pinned host RAM."""

    def __init__(self, name: str, capacity_bytes: int) -> None:
        super().__init__(name, capacity_bytes)
        self._data: dict[PageKey, bytes] = {}

    def _store(self, key: PageKey, data: bytes) -> None:
        self._data[key] = data

    def _load(self, key: PageKey) -> bytes | None:
        return self._data.get(key)

    def _delete(self, key: PageKey) -> None:
        self._data.pop(key, None)


_MAGIC = b"NEUKVPG1"
# magic, block hash (u64), payload length (u64), checksum (16 B), guest name length (u16)
_HEADER = struct.Struct("<8sQQ16sH")


class NvmeTier(Tier):
    """Page files under a directory, one folder per guest, each verified on read.

    A write goes to a temporary file, is fsync'ed, renamed into place, and the
    directory is fsync'ed too: only then does `put` return and the page count as
    stored, so a crash or power cut leaves the old page or the new one, whole, never
    a page the pager believes in but the disk lost. A torn file that slips through
    anyway (a lying disk) still fails its checksum and reads as a miss.
    """

    def __init__(self, name: str, capacity_bytes: int, directory: Path) -> None:
        super().__init__(name, capacity_bytes)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: PageKey) -> Path:
        return self.directory / _safe(key.guest) / key.filename()

    def _store(self, key: PageKey, data: bytes) -> None:
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        guest = key.guest.encode()
        header = _HEADER.pack(_MAGIC, key.block & 0xFFFFFFFFFFFFFFFF, len(data), checksum(data), len(guest))
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.directory)  # the new guest folder's entry is durable too
            with open(tmp, "wb") as f:
                f.write(header + guest)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # the rename itself reaches the disk
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _load(self, key: PageKey) -> bytes | None:
        try:
            raw = self.path(key).read_bytes()
        except OSError:
            return None
        if len(raw) < _HEADER.size:
            return None
        magic, block, length, digest, guest_len = _HEADER.unpack_from(raw)
        start = _HEADER.size + guest_len
        guest = raw[_HEADER.size:start]
        data = raw[start:]
        if (magic != _MAGIC or block != key.block & 0xFFFFFFFFFFFFFFFF or guest != key.guest.encode()
                or length != len(data) or checksum(data) != digest):
            return None
        return data

    def _delete(self, key: PageKey) -> None:
        self.path(key).unlink(missing_ok=True)


class SlowTier(NvmeTier):
    """Page files read back at no more than `read_mib_per_s`: a slower device, emulated.

    The bytes still go through a real file and its checksum; each read then waits until it has
    taken as long as the capped bandwidth allows. It stands for network storage or a busy disk
    in benchmarks and tests of the restore-or-recompute choice (this machine has one fast disk).
    """

    def __init__(self, name: str, capacity_bytes: int, directory: Path, read_mib_per_s: float) -> None:
        super().__init__(name, capacity_bytes, directory)
        self.read_mib_per_s = read_mib_per_s

    def _load(self, key: PageKey) -> bytes | None:
        t0 = time.perf_counter()
        data = super()._load(key)
        if data is not None and self.read_mib_per_s > 0:
            time.sleep(max(0.0, len(data) / (self.read_mib_per_s * 2**20) - (time.perf_counter() - t0)))
        return data


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe(guest: str) -> str:
    """A guest name as one safe path component (guest names come from libvirt, but never trust a path)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in guest).lstrip(".") or "_"
